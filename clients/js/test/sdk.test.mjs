// The SDK against a real gateway (test/gateway.mjs): chat, offline catch-up, send retry
// across a closed connection, groups. Node 20 has no global WebSocket: the `ws` package
// (a dev dependency) stands in for the browser's.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { encode as mpEncode, decode as mpDecode } from "@msgpack/msgpack";
import { Client, msgpackCodec } from "../dist/index.js";
import { startGateway, waitFor, sleep, adminPost } from "./gateway.mjs";

const gateways = [];
const clients = [];
after(async () => {
  for (const c of clients) c.disconnect(true);
  for (const gw of gateways) {
    await gw.stop();
    gw.cleanup();
  }
});

async function gateway(args = ["--durability", "local"]) {
  const gw = await startGateway({ args });
  gateways.push(gw);
  return gw;
}

/** A client for `user` on `device`, recording what it receives. `url` may be a function. */
function client(url, user, device, extra = {}) {
  const got = [];
  const tokens = { calls: 0 };
  const c = new Client({
    url,
    token: () => {
      tokens.calls++;
      return user;
    },
    device,
    WebSocket,
    minReconnectMs: 50,
    maxReconnectMs: 500,
    ...extra,
  });
  c.on("message", (m) => got.push(m));
  clients.push(c);
  return { c, got, tokens };
}

const bodies = (msgs) => msgs.map((m) => m.body);

test("two clients chat; acks, sequences and the sender's other device", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  const alice = client(gw.ws, "alice", "laptop");
  const alice2 = client(gw.ws, "alice", "phone");
  const bob = client(gw.ws, "bob", "phone");
  await Promise.all([alice.c.connect(), alice2.c.connect(), bob.c.connect()]);
  assert.equal(alice.c.welcome.user, "alice");
  const acks = [];
  for (let i = 1; i <= 5; i++) acks.push(await alice.c.send({ user: "bob" }, `hi ${i}`));
  // Each send_ack names the recipient's inbox position: 1..5.
  assert.deepEqual(acks.map((a) => a.seq), [1, 2, 3, 4, 5]);
  await waitFor(() => bob.got.length >= 5, 10_000, "bob's 5 deliveries");
  assert.deepEqual(bodies(bob.got), ["hi 1", "hi 2", "hi 3", "hi 4", "hi 5"]);
  assert.deepEqual(bob.got.map((m) => m.from), Array(5).fill("alice"));
  assert.deepEqual(bob.got.map((m) => m.peer), Array(5).fill("alice"));
  assert.deepEqual(bob.got.map((m) => m.mid), acks.map((a) => a.mid));
  // alice's other device gets her own messages (to: bob); the sending device does not.
  await waitFor(() => alice2.got.length >= 5, 10_000, "alice's phone's copies");
  assert.deepEqual(alice2.got.map((m) => m.peer), Array(5).fill("bob"));
  assert.deepEqual(alice2.got.map((m) => m.mid), acks.map((a) => a.mid));
  const reply = await bob.c.send({ user: "alice" }, "hello alice");
  await waitFor(() => alice.got.length >= 1, 10_000, "alice's delivery");
  assert.equal(alice.got[0].body, "hello alice");
  assert.equal(alice.got[0].mid, reply.mid);
  await sleep(200);
  assert.equal(alice.got.length, 1, "the sender's own messages are not shown back to it");
  assert.equal(bob.got.length, 5, "nothing twice");
  // bob's own message took seq 6 in his inbox, but the sending device is not sent it: its
  // position stays at 5 (a resume from 5 brings it back, dropped by its mid).
  assert.equal(bob.c.lastInboxSeq, 5);
  // The gateway timed the 6 sends from read to send_ack (the dashboard's latency plot).
  const metrics = await (await fetch(`${gw.admin}/metrics`)).text();
  const acked = /imgw_stage_seconds_count\{shard="0",stage="send_ack"\} (\d+)/.exec(metrics);
  assert.ok(acked && Number(acked[1]) >= 6, `send_ack stage counted: ${acked?.[0]}`);
});

test("an offline client gets what it missed once and in order", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  const alice = client(gw.ws, "ann", "laptop");
  const bob = client(gw.ws, "ben", "phone", { syncLimit: 7 });
  await Promise.all([alice.c.connect(), bob.c.connect()]);
  await alice.c.send({ user: "ben" }, "before");
  await waitFor(() => bob.got.length === 1, 10_000, "the first message");
  bob.c.disconnect();
  const n = 30;
  for (let i = 0; i < n; i++) await alice.c.send({ user: "ben" }, `missed ${i}`);
  const calls = bob.tokens.calls;
  // Back: resume from its last inbox sequence, paged by 7 until `more` is false.
  await bob.c.connect();
  await waitFor(() => bob.got.length >= n + 1, 15_000, "the missed messages");
  await sleep(300);
  assert.deepEqual(bodies(bob.got), ["before", ...Array.from({ length: n }, (_, i) => `missed ${i}`)]);
  assert.deepEqual(bob.got.map((m) => m.seq), Array.from({ length: n + 1 }, (_, i) => i + 1));
  assert.equal(bob.tokens.calls, calls + 1, "the token getter is called for the new connection");

  // A new client of the same device (a reloaded page: no state) starts at the device's
  // stored cursor, which the cumulative acks moved: nothing old comes again, new ones do.
  bob.c.disconnect();
  await alice.c.send({ user: "ben" }, "after reload");
  await sleep(100);
  const fresh = client(gw.ws, "ben", "phone");
  await fresh.c.connect();
  await waitFor(() => fresh.got.length >= 1, 10_000, "the message sent while reloading");
  await sleep(300);
  assert.deepEqual(bodies(fresh.got), ["after reload"]);
});

test("sends are retried with their cmid after the gateway closes the connection", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  const alice = client(gw.ws, "amy", "laptop");
  const bob = client(gw.ws, "bo", "phone");
  await Promise.all([alice.c.connect(), bob.c.connect()]);
  // The kick's goaway arrives even though alice is still sending (the gateway shuts its
  // side and drains hers before closing: no reset), then the close and the reconnect.
  let welcomes = 0;
  const goaways = [];
  alice.c.on("welcome", () => welcomes++);
  alice.c.on("goaway", (g) => goaways.push(g.reason));
  const n = 40;
  const sends = [];
  for (let i = 0; i < n; i++) {
    sends.push(alice.c.send({ user: "bo" }, `m${i}`));
    // Kick alice in the middle of the burst: some sends are acked, some stored but not yet
    // acked (the dedupe window stores those once), some not read at all.
    if (i === n / 2) assert.equal(await adminPost(gw, "/kick", { tenant: "dev", user: "amy" }), 202);
  }
  await waitFor(() => welcomes >= 1, 10_000, "alice's reconnect after the kick");
  assert.deepEqual(goaways, ["kicked"]);
  const acks = await Promise.all(sends);
  await waitFor(() => bob.got.length >= n, 15_000, "every message");
  await sleep(300);
  assert.deepEqual(bodies(bob.got), Array.from({ length: n }, (_, i) => `m${i}`), "once each, in order");
  assert.equal(new Set(acks.map((a) => a.mid)).size, n);

  // A gateway that dies with sends queued in the client: they go to its successor (same
  // store) once it is up, each delivered once.
  let url = gw.ws;
  const carol = client(() => url, "cy", "tab");
  await carol.c.connect();
  const bobSeen = bob.got.length;
  gw.proc.kill("SIGSTOP");
  const pending = [carol.c.send({ user: "bo" }, "x1"), carol.c.send({ user: "bo" }, "x2")];
  await sleep(200);
  gw.proc.kill("SIGKILL");
  await gw.stop();
  const gw2 = await startGateway({ args: ["--durability", "local"], dataDir: gw.dataDir });
  gateways.push(gw2);
  url = gw2.ws;
  const bob2 = client(gw2.ws, "bo", "phone", { inboxSeq: bob.c.lastInboxSeq });
  await bob2.c.connect();
  await Promise.all(pending);
  await waitFor(() => bob2.got.length >= 2, 15_000, "the retried sends");
  await sleep(300);
  assert.deepEqual(bodies(bob2.got), ["x1", "x2"]);
  assert.equal(bob.got.length, bobSeen);
});

test("group send, and a member's catch-up after being offline", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  const ann = client(gw.ws, "gann", "laptop");
  const bob = client(gw.ws, "gbob", "phone");
  const cat = client(gw.ws, "gcat", "tab", { syncLimit: 4 });
  await Promise.all([ann.c.connect(), bob.c.connect(), cat.c.connect()]);
  for (const m of [ann, bob, cat]) await m.c.joinGroup("crew");
  const first = [];
  for (let i = 1; i <= 3; i++) first.push(await ann.c.send({ group: "crew" }, `g${i}`));
  assert.deepEqual(first.map((a) => a.seq), [1, 2, 3], "send_ack.seq is the gseq");
  await waitFor(() => bob.got.length >= 3 && cat.got.length >= 3, 10_000, "the group messages");
  assert.deepEqual(bodies(bob.got), ["g1", "g2", "g3"]);
  assert.deepEqual(bob.got.map((m) => m.group), ["crew", "crew", "crew"]);

  // cat goes offline; the timeline moves on; cat comes back and pages what it missed.
  cat.c.disconnect();
  for (let i = 4; i <= 13; i++) await ann.c.send({ group: "crew" }, `g${i}`);
  await cat.c.connect();
  await waitFor(() => cat.got.length >= 13, 15_000, "cat's catch-up");
  await sleep(300);
  assert.deepEqual(bodies(cat.got), Array.from({ length: 13 }, (_, i) => `g${i + 1}`));
  assert.deepEqual(cat.got.map((m) => m.seq), Array.from({ length: 13 }, (_, i) => i + 1));

  // A fresh client of bob (no state): the group's unread messages come from the member's
  // cursor, named by the inbox sync's `synced.groups`.
  bob.c.disconnect();
  await sleep(100);
  for (let i = 14; i <= 16; i++) await ann.c.send({ group: "crew" }, `g${i}`);
  const bobAgain = client(gw.ws, "gbob", "phone");
  await bobAgain.c.connect();
  await waitFor(() => bobAgain.got.length >= 3, 15_000, "bob's unread group messages");
  await sleep(300);
  assert.deepEqual(bodies(bobAgain.got), ["g14", "g15", "g16"]);
});

test("a group member acks a burst once a second, and what it saw before disconnect()", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  const ann = client(gw.ws, "bann", "laptop");
  const bob = client(gw.ws, "bbob", "phone");
  await Promise.all([ann.c.connect(), bob.c.connect()]);
  for (const m of [ann, bob]) await m.c.joinGroup("busy");
  const acks = async () => {
    const metrics = await (await fetch(`${gw.admin}/metrics`)).text();
    const m = /imgw_frames_in_total\{shard="0",op="ack",codec="json"\} (\d+)/.exec(metrics);
    return m ? Number(m[1]) : 0;
  };
  // 30 pushes over about 600 ms: an ack per push (or per 20 ms) would be dozens.
  for (let i = 1; i <= 30; i++) {
    await ann.c.send({ group: "busy" }, `b${i}`);
    await sleep(20);
  }
  await waitFor(() => bob.got.length >= 30, 10_000, "the burst");
  let n = 0;
  await waitFor(async () => (n = await acks()) >= 1, 10_000, "bob's group ack");
  await sleep(1200);
  n = await acks();
  assert.ok(n >= 1 && n <= 3, `group acks for 30 pushes: ${n}`);
  // Three more, and bob leaves before its ack timer fires: disconnect() sends the ack, so
  // a fresh client of bob is not given them again from the group cursor.
  for (let i = 31; i <= 33; i++) await ann.c.send({ group: "busy" }, `b${i}`);
  await waitFor(() => bob.got.length >= 33, 10_000, "the last three");
  bob.c.disconnect();
  await waitFor(async () => (await acks()) > n, 5_000, "the ack sent by disconnect()");
  const bobAgain = client(gw.ws, "bbob", "phone");
  await bobAgain.c.connect();
  await ann.c.send({ group: "busy" }, "b34");
  await waitFor(() => bobAgain.got.length >= 1, 10_000, "the next push");
  await sleep(300);
  assert.deepEqual(bodies(bobAgain.got), ["b34"]);
});

test("presence and requests are promises; subscriptions survive a reconnect", { timeout: 60_000 }, async () => {
  const gw = await gateway(["--durability", "memory"]);
  const ann = client(gw.ws, "pann", "laptop", { resumeTimeoutMs: 500 });
  const seen = [];
  ann.c.on("presence", (p) => seen.push(`${p.user}:${p.status}`));
  await ann.c.connect();
  await ann.c.subscribePresence(["pbob"]);
  const bob = client(gw.ws, "pbob", "phone", { resumeTimeoutMs: 500 });
  await bob.c.connect();
  await waitFor(() => seen.includes("pbob:online"), 10_000, "pbob online");
  await bob.c.setPresence("busy");
  await waitFor(() => seen.includes("pbob:busy"), 10_000, "pbob busy");
  // ann's connection is closed by the gateway; the SDK subscribes again on the new one.
  let welcomes = 0;
  ann.c.on("welcome", () => welcomes++);
  assert.equal(await adminPost(gw, "/kick", { tenant: "dev", user: "pann" }), 202);
  await waitFor(() => welcomes === 1, 10_000, "ann's reconnect after the kick");
  await sleep(200);
  bob.c.disconnect();
  await waitFor(() => seen.includes("pbob:offline"), 10_000, "pbob offline after the reconnect");
  // An error frame rejects the request's promise.
  await assert.rejects(ann.c.joinGroup(""), (e) => e.code === "bad_request" || e.code === "forbidden" || e.code === "not_found");
  // At durability memory a message to an online user still arrives (no inbox to sync).
  await bob.c.connect();
  await ann.c.send({ user: "pbob" }, "live");
  await waitFor(() => bob.got.length === 1, 10_000, "the live message");
});

test("a MessagePack client chats with a JSON client, 1:1 and in a group, and catches up", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  const codec = msgpackCodec(mpEncode, mpDecode);
  const mia = client(gw.ws, "mia", "laptop", { codec });
  const ned = client(gw.ws, "ned", "phone");
  await Promise.all([mia.c.connect(), ned.c.connect()]);
  const ack = await mia.c.send({ user: "ned" }, "from msgpack", { type: "text", ext: { k: "v" } });
  assert.equal(ack.seq, 1);
  await ned.c.send({ user: "mia" }, "from json");
  await waitFor(() => ned.got.length >= 1 && mia.got.length >= 1, 10_000, "both 1:1 messages");
  assert.deepEqual([ned.got[0].body, ned.got[0].from, ned.got[0].type], ["from msgpack", "mia", "text"]);
  assert.deepEqual(ned.got[0].ext, { k: "v" });
  // Mia's inbox holds her own message first (for her other devices: server.sync_sent).
  assert.deepEqual([mia.got[0].body, mia.got[0].from, mia.got[0].seq], ["from json", "ned", 2]);
  // A group, and what the MessagePack client missed while offline, once and in order.
  for (const m of [mia, ned]) await m.c.joinGroup("mp");
  await ned.c.send({ group: "mp" }, "g1");
  await waitFor(() => mia.got.length >= 2, 10_000, "the group message");
  assert.equal(mia.got[1].group, "mp");
  mia.c.disconnect();
  for (let i = 1; i <= 5; i++) await ned.c.send({ user: "mia" }, `missed ${i}`);
  await mia.c.connect();
  await waitFor(() => mia.got.length >= 7, 15_000, "the missed messages");
  assert.deepEqual(bodies(mia.got.slice(2)), ["missed 1", "missed 2", "missed 3", "missed 4", "missed 5"]);
  assert.deepEqual(mia.got.slice(2).map((m) => m.seq), [3, 4, 5, 6, 7]);
});

test("helloInUrl: the hello rides in the URL, in JSON and MessagePack, and again on reconnect", { timeout: 60_000 }, async () => {
  const gw = await gateway();
  // The `ws` package's WebSocket, recording each URL and every frame sent.
  const urls = [];
  const sent = [];
  class Recording extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push(url);
    }
    send(data, ...rest) {
      sent.push(typeof data === "string" ? JSON.parse(data) : mpDecode(data));
      return super.send(data, ...rest);
    }
  }
  const codec = msgpackCodec(mpEncode, mpDecode);
  const ann = client(gw.ws, "uann", "d", { WebSocket: Recording, helloInUrl: true });
  const ben = client(gw.ws, "uben", "d", { WebSocket: Recording, helloInUrl: true, codec });
  await Promise.all([ann.c.connect(), ben.c.connect()]);
  assert.equal(ann.c.welcome.user, "uann");
  assert.equal(ben.c.welcome.user, "uben");
  assert.equal(urls.length, 2);
  for (const u of urls) assert.match(u, /\/ws\?hello=[A-Za-z0-9_-]+$/);
  await ann.c.send({ user: "uben" }, "to msgpack");
  await ben.c.send({ user: "uann" }, "to json");
  await waitFor(() => ann.got.length === 1 && ben.got.length === 1, 10_000, "both messages");
  assert.deepEqual([bodies(ann.got), bodies(ben.got)], [["to json"], ["to msgpack"]]);
  // A reconnect says hello in its URL again, with the token asked for anew.
  const tokensBefore = ann.tokens.calls;
  let welcomes = 0;
  ann.c.on("welcome", () => welcomes++);
  assert.equal(await adminPost(gw, "/kick", { tenant: "dev", user: "uann" }), 202);
  await waitFor(() => welcomes === 1, 10_000, "ann's reconnect after the kick");
  assert.equal(urls.length, 3);
  assert.equal(ann.tokens.calls, tokensBefore + 1);
  // No client wrote a `hello` frame: the gateway counted the URLs' hellos as frames in.
  assert.deepEqual(sent.filter((f) => f.op === "hello"), []);
  const metrics = await (await fetch(`${gw.admin}/metrics`)).text();
  const hellos = [...metrics.matchAll(/imgw_frames_in_total\{shard="\d+",op="hello",codec="\w+"\} (\d+)/g)]
    .reduce((n, m) => n + Number(m[1]), 0);
  assert.equal(hellos, 3);
});
