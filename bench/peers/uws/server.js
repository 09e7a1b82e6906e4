// uWebSockets.js pub/sub peer for imgw's side-by-side benchmark: the plain-ws protocol of
// bench/peers/README.md. Text frames {"op":"sub","topic":T} subscribe the connection to T;
// {"op":"pub","topic":T,"data":D} sends D as one text frame to every subscriber of T.
//
// node server.js [PORT] [HOST]   (default 8091 127.0.0.1)
'use strict';
const uWS = require('@trufflesuite/uws-js-unofficial');

const port = Number(process.argv[2] || 8091);
const host = process.argv[3] || '127.0.0.1';
const decoder = new TextDecoder();

const app = uWS.App();
app.ws('/*', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  // No server-side idle close or pings: the benchmark's idle connections stay silent.
  idleTimeout: 0,
  sendPingsAutomatically: false,
  // Room for a burst to a slow reader instead of silently skipping it.
  maxBackpressure: 16 * 1024 * 1024,
  closeOnBackpressureLimit: false,
  message: (ws, message, isBinary) => {
    if (isBinary) return;
    let req;
    try {
      req = JSON.parse(decoder.decode(message));
    } catch (e) {
      return;
    }
    if (!req || typeof req.topic !== 'string') return;
    if (req.op === 'sub') {
      ws.subscribe(req.topic);
    } else if (req.op === 'pub' && typeof req.data === 'string') {
      app.publish(req.topic, req.data, false);
    }
  },
});
app.listen(host, port, (token) => {
  if (!token) {
    console.error(`uws peer: cannot listen on ${host}:${port}`);
    process.exit(1);
  }
  console.error(`uws peer listening on ws://${host}:${port}`);
});
