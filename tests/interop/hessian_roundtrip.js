#!/usr/bin/env node
// Cross-check for imgw's Hessian 2.0 codec (driven by tests/hessian_interop.rs).
//
// Reads one payload per line on stdin, as hex. For each, decodes it with hessian.js
// (`decode(buf, '2.0')`), re-encodes the decoded value with `encode(value, '2.0')`, and writes
// one JSON line to stdout: {"ok":true,"value":<decoded value>,"hex":"<re-encoded bytes>"}, or
// {"ok":false,"error":"<message>"} when hessian.js cannot decode the payload.
//
// Exit status: 0 when every line was processed (even if some failed to decode), 3 when the
// hessian.js module is not installed (`npm ci --prefix tests/interop`), 2 on bad usage.
'use strict';

let hessian;
try {
  hessian = require('hessian.js');
} catch (e) {
  process.stderr.write(
    'hessian.js is not installed: run `npm ci --prefix tests/interop` (' + e.message + ')\n');
  process.exit(3);
}

function roundTrip(hex) {
  if (!/^([0-9a-fA-F]{2})*$/.test(hex)) {
    return { ok: false, error: 'not hex' };
  }
  try {
    const value = hessian.decode(Buffer.from(hex, 'hex'), '2.0');
    const again = hessian.encode(value, '2.0');
    return { ok: true, value: value, hex: Buffer.from(again).toString('hex') };
  } catch (e) {
    return { ok: false, error: String(e && e.message || e) };
  }
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const out = [];
  for (const line of input.split('\n')) {
    const hex = line.trim();
    if (hex === '') continue;
    out.push(JSON.stringify(roundTrip(hex)));
  }
  process.stdout.write(out.join('\n') + (out.length ? '\n' : ''));
});
