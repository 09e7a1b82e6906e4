/**
 * @imgw/client: a client for the imgw gateway over WebSocket with the JSON codec
 * (docs/PROTOCOL.md). One `Client` is one device of one user:
 *
 * - `connect()` opens the WebSocket, sends `hello` with `resume {inbox_seq}` (the last inbox
 *   sequence this client has, 0 the first time: the device's stored cursor) and keeps the
 *   connection: a close, a failed connection or a `goaway` reconnects after a jittered
 *   exponential backoff (or the `goaway`'s `reconnect_ms`), calling the token getter again.
 * - Deliveries are emitted once (deduplicated by `mid` and, on a durable gateway, by inbox
 *   sequence / group `gseq`), in order, and acknowledged with cumulative `ack`s.
 * - The inbox is paged with `sync` until `more` is false; then each group named in
 *   `synced.groups` (and each group this client has seen before) with `sync {group}`.
 * - `send()` resolves with the `send_ack`, rejects with the `error`; a send not acked when the
 *   connection drops is sent again after the reconnect with the same `cmid` (the gateway's
 *   dedupe window stores it once).
 *
 * Every queue and table it keeps is bounded (see `ClientOptions`).
 */

/** What `new WebSocket(url, protocols)` must provide (the browser's, Node's, or `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  /** Set to `"arraybuffer"` for a binary codec (a browser's default is `"blob"`). */
  binaryType?: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code?: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}

/**
 * How frames go on the wire: the WebSocket subprotocol that names the gateway's codec, and
 * the frame's encoding. The SDK works on the JSON field names; any codec whose frames are "a
 * map with the JSON field names" (docs/PROTOCOL.md: JSON, MessagePack) fits.
 */
export interface FrameCodec {
  /** `imgw.v1.json`, `imgw.v1.msgpack`. */
  readonly subprotocol: string;
  /** Whether frames are binary (the socket's `binaryType` is then `"arraybuffer"`). */
  readonly binary: boolean;
  encode(frame: object): string | Uint8Array;
  /** Throws on a frame it cannot read. */
  decode(data: unknown): object;
}

/** JSON in text frames (the default). */
export const jsonCodec: FrameCodec = {
  subprotocol: "imgw.v1.json",
  binary: false,
  encode: (frame) => JSON.stringify(frame),
  decode: (data) => {
    if (typeof data !== "string") throw new Error("binary frame on a JSON connection");
    return JSON.parse(data) as object;
  },
};

/**
 * MessagePack in binary frames, with the caller's encoder and decoder (for example
 * `encode` and `decode` of the `@msgpack/msgpack` package), so that the SDK itself has no
 * runtime dependency. Mids and sequence numbers stay below 2^53, so plain numbers hold them.
 */
export function msgpackCodec(
  encode: (value: unknown) => Uint8Array,
  decode: (bytes: Uint8Array) => unknown,
): FrameCodec {
  return {
    subprotocol: "imgw.v1.msgpack",
    binary: true,
    encode: (frame) => encode(frame),
    decode: (data) => {
      let bytes: Uint8Array;
      if (data instanceof Uint8Array) bytes = data;
      else if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
      else throw new Error("text frame on a MessagePack connection");
      const v = decode(bytes);
      if (typeof v !== "object" || v === null) throw new Error("a MessagePack frame that is not a map");
      return v;
    },
  };
}

export type WebSocketFactory = new (url: string, protocols?: string | string[]) => WebSocketLike;

export type PresenceStatus = "online" | "busy" | "away" | "offline";

export type Target = { user: string } | { group: string };

/** `url` with `frame` (an encoded `hello`) in its `hello` query parameter, base64url without
 * padding (the gateway's PROTOCOL.md, section 1). */
export function withHelloParam(url: string, frame: string | Uint8Array): string {
  const bytes = typeof frame === "string" ? new TextEncoder().encode(frame) : frame;
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  const b64 = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const hash = url.indexOf("#");
  const [base, fragment] = hash < 0 ? [url, ""] : [url.slice(0, hash), url.slice(hash)];
  return `${base}${base.includes("?") ? "&" : "?"}hello=${b64}${fragment}`;
}

export interface ClientOptions {
  /** `ws://host:port/ws`, or a function called before each connection attempt. */
  url: string | (() => string);
  /** The `hello` token; called again before every (re)connection (a JWT may expire). */
  token: () => string | Promise<string>;
  /** This device's id (one user may have several devices online). */
  device: string;
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketFactory;
  /** The frames' codec; default `jsonCodec`; `msgpackCodec(...)` for MessagePack. */
  codec?: FrameCodec;
  /** First reconnect delay (ms); doubles per failed attempt up to `maxReconnectMs`. Default 250. */
  minReconnectMs?: number;
  /** Largest reconnect delay (ms). Default 10000. */
  maxReconnectMs?: number;
  /** Page size of `sync` (the gateway caps it at `limits.max_sync_limit`). Default 200. */
  syncLimit?: number;
  /** Sends waiting for their `send_ack` (queued or in flight); past it `send` rejects. Default 1000. */
  maxPendingSends?: number;
  /** A send not acked within this time rejects with code `timeout` (0: never). Default 60000. */
  sendTimeoutMs?: number;
  /** Retries of a send refused with `rate_limited`, `overloaded` or `unavailable`. Default 5. */
  sendRetries?: number;
  /** Requests (presence, groups) not answered within this time reject. Default 10000. */
  requestTimeoutMs?: number;
  /** Message ids remembered for dedupe. Default 10000. */
  dedupeWindow?: number;
  /** How long to wait for the `synced` that answers `hello.resume` before taking the inbox
   * sync as done (a gateway at durability `memory` keeps no inbox and sends none). Default 3000. */
  resumeTimeoutMs?: number;
  /** Group pushes held per group while a gap before them is being filled. Default 1000. */
  maxHeldPerGroup?: number;
  /** Last inbox sequence this device has (e.g. persisted by the app); default 0. */
  inboxSeq?: number;
  /** Delay before a cumulative inbox ack is sent (ms), so that a burst costs one ack. Default 20. */
  ackDelayMs?: number;
  /** Send `hello` in the URL (its `hello` query parameter, base64url of the encoded frame)
   * instead of after the socket opens: the gateway answers the upgrade and `welcome` together,
   * one round trip less per connection. The token is then in the URL, which a proxy or an
   * access log may record. Default false. */
  helloInUrl?: boolean;
  /** Delay before a group's cumulative ack is sent (ms). A group ack only moves the member's
   * cursor for a later catch-up (group pushes are not windowed or retransmitted), so one a
   * second per group is enough: a member of a busy group would otherwise ack every push.
   * `disconnect()` sends what is pending. Default 1000. */
  groupAckDelayMs?: number;
}

export interface Welcome {
  version: number;
  session: number;
  user: string;
  heartbeat_ms: number;
  server_time_ms: number;
  limits: { max_frame_bytes: number; sends_per_sec: number; window: number };
}

/** A delivered message. */
export interface Message {
  mid: number;
  from: string;
  /** Absent for a 1:1 message to this user; `{group}` for a group message; `{user}` (the
   * peer) for this user's own message sent from another device. */
  to?: Target;
  /** The inbox sequence, or the group's `gseq` for a group message (0: not stored). */
  seq: number;
  ts: number;
  type?: string;
  body: string;
  ext?: Record<string, string>;
  /** The group of a group message. */
  group?: string;
  /** The other user of a 1:1 conversation (the sender, or the recipient of one's own message). */
  peer?: string;
}

export interface SendAck {
  cmid: string;
  mid: number;
  /** The recipient's inbox sequence, or the group's `gseq`. */
  seq: number;
  ts: number;
}

export interface Presence {
  user: string;
  status: PresenceStatus;
  ts: number;
}

export type ConnectionState = "idle" | "connecting" | "connected" | "disconnected" | "closed";

export interface ClientEvents {
  state: ConnectionState;
  welcome: Welcome;
  message: Message;
  presence: Presence;
  /** A sync finished (`more` false): the inbox (`group` absent) or a group's timeline. */
  synced: { group?: string; upTo: number };
  goaway: { reason: string; reconnectMs: number };
  /** An `error` frame that answers no request of this client, or a connection failure. */
  error: Error;
}

/** An `error` frame from the gateway (docs/PROTOCOL.md section 5), or a client-side refusal
 * (`code` `timeout`, `closed`, `queue_full`). */
export class ImgwError extends Error {
  readonly code: string;
  readonly retryAfterMs?: number;
  constructor(code: string, message: string, retryAfterMs?: number) {
    super(`${code}: ${message}`);
    this.name = "ImgwError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

type Frame = { op: string; ref?: number; [k: string]: unknown };

interface PendingSend {
  cmid: string;
  frame: Frame;
  resolve: (a: SendAck) => void;
  reject: (e: Error) => void;
  retries: number;
  timer?: ReturnType<typeof setTimeout>;
  retryTimer?: ReturnType<typeof setTimeout>;
}

interface PendingRequest {
  frame: Frame;
  resolve: () => void;
  reject: (e: Error) => void;
  timer?: ReturnType<typeof setTimeout>;
}

interface GroupState {
  /** Highest gseq emitted in order (0: none yet). */
  last: number;
  /** A `sync {group}` is under way on this connection. */
  syncing: boolean;
  /** Pushes ahead of `last + 1`, by gseq, waiting for the gap to fill. */
  held: Map<number, Message>;
  /** The cumulative ack last sent. */
  acked: number;
}

const RETRIABLE = new Set(["rate_limited", "overloaded", "unavailable"]);
const WS_OPEN = 1;

/** A bounded set that forgets its oldest entries. */
class RecentSet {
  private readonly items = new Set<number>();
  constructor(private readonly cap: number) {}
  has(v: number): boolean {
    return this.items.has(v);
  }
  add(v: number): void {
    if (this.items.has(v)) return;
    this.items.add(v);
    if (this.items.size > this.cap) {
      const oldest = this.items.values().next().value;
      if (oldest !== undefined) this.items.delete(oldest);
    }
  }
}

function randomHex(bytes: number): string {
  const b = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

type Listener<T> = (value: T) => void;

export class Client {
  private readonly opts: Required<Omit<ClientOptions, "WebSocket" | "inboxSeq">> & {
    WebSocket?: WebSocketFactory;
  };
  private ws: WebSocketLike | null = null;
  private stateValue: ConnectionState = "idle";
  private stopped = true;
  private welcomed = false;
  private attempt = 0;
  private goawayMs: number | null = null;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private heartbeatTimer?: ReturnType<typeof setInterval>;
  private resumeTimer?: ReturnType<typeof setTimeout>;
  private ackTimer?: ReturnType<typeof setTimeout>;
  private groupAckTimer?: ReturnType<typeof setTimeout>;
  private lastRx = 0;
  private nextRef = 1;
  private cmidBase = randomHex(6);
  private cmidCount = 0;
  private welcomeInfo: Welcome | null = null;
  private connectWaiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  private readonly listeners = new Map<keyof ClientEvents, Set<Listener<never>>>();

  // Inbox position.
  private inboxSeq: number;
  private inboxAcked: number;
  /** The hello's resume is being answered (pages until `more` is false). */
  private inboxSyncing = false;
  /** Whether the gateway keeps an inbox (it answered `hello.resume` with `synced`): then
   * inbox sequences and gseqs are stable, used for dedupe and ordering. `false` once the
   * resume went unanswered (durability `memory`: ids restart with the gateway, so only
   * `mid`s dedupe); `null` until known. */
  private durable: boolean | null = null;
  private readonly seen: RecentSet;
  private readonly groups = new Map<string, GroupState>();
  /** Own messages (from another device, or this one's) held until pending acks tell which. */
  private ownHeld: Message[] = [];
  /** Groups to page once the current group sync ends (one at a time). */
  private groupQueue: string[] = [];

  private readonly sends = new Map<string, PendingSend>();
  private readonly requests = new Map<number, PendingRequest>();
  private readonly subscriptions = new Set<string>();
  private status: PresenceStatus | null = null;

  constructor(options: ClientOptions) {
    this.opts = {
      minReconnectMs: 250,
      maxReconnectMs: 10_000,
      syncLimit: 200,
      maxPendingSends: 1000,
      sendTimeoutMs: 60_000,
      sendRetries: 5,
      requestTimeoutMs: 10_000,
      dedupeWindow: 10_000,
      resumeTimeoutMs: 3000,
      maxHeldPerGroup: 1000,
      ackDelayMs: 20,
      groupAckDelayMs: 1000,
      helloInUrl: false,
      codec: jsonCodec,
      ...options,
    };
    this.inboxSeq = options.inboxSeq ?? 0;
    this.inboxAcked = this.inboxSeq;
    this.seen = new RecentSet(this.opts.dedupeWindow);
  }

  // ---- public API ------------------------------------------------------------------------

  /** The connection's state. */
  get state(): ConnectionState {
    return this.stateValue;
  }

  /** The last `welcome` (user, session, limits), or null before the first. */
  get welcome(): Welcome | null {
    return this.welcomeInfo;
  }

  /** The last inbox sequence processed (persist it to resume a later client from it). */
  get lastInboxSeq(): number {
    return this.inboxSeq;
  }

  /** Sends waiting for their `send_ack`. */
  get pendingSends(): number {
    return this.sends.size;
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(event: K, fn: Listener<ClientEvents[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(fn as Listener<never>);
    return () => set.delete(fn as Listener<never>);
  }

  /** Starts connecting (and reconnecting until `disconnect`); resolves at the next `welcome`. */
  connect(): Promise<void> {
    const p = new Promise<void>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this.stopped) {
      this.stopped = false;
      this.attempt = 0;
      this.open();
    } else if (this.welcomed) {
      this.settleConnect(null);
    }
    return p;
  }

  /** Closes the connection and stops reconnecting. Sends stay queued (a later `connect`
   * sends them) unless `rejectPending`; requests in flight reject. */
  disconnect(rejectPending = false): void {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    // What was shown is acked before the close, so the next session starts after it.
    this.flushAcks();
    this.flushGroupAcks();
    this.teardown();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      try {
        ws.close(1000, "bye");
      } catch {
        // already closed
      }
    }
    this.setState("closed");
    this.settleConnect(new ImgwError("closed", "disconnect() called"));
    for (const [ref, r] of this.requests) {
      clearTimeout(r.timer);
      r.reject(new ImgwError("closed", "disconnected"));
      this.requests.delete(ref);
    }
    if (rejectPending) {
      for (const s of this.sends.values()) this.failSend(s, new ImgwError("closed", "disconnected"));
    }
  }

  /** Sends `body` to a user or a group; resolves with the `send_ack`. */
  send(
    to: Target,
    body: string,
    opts: { type?: string; ext?: Record<string, string>; cmid?: string } = {},
  ): Promise<SendAck> {
    if (this.sends.size >= this.opts.maxPendingSends) {
      return Promise.reject(new ImgwError("queue_full", "too many sends waiting for their ack"));
    }
    const cmid = opts.cmid ?? `${this.cmidBase}-${++this.cmidCount}`;
    if (this.sends.has(cmid)) {
      return Promise.reject(new ImgwError("bad_request", `cmid ${cmid} is already in flight`));
    }
    const frame: Frame = { op: "send", to, cmid, body };
    if (opts.type !== undefined) frame.type = opts.type;
    if (opts.ext !== undefined) frame.ext = opts.ext;
    return new Promise<SendAck>((resolve, reject) => {
      const s: PendingSend = { cmid, frame, resolve, reject, retries: 0 };
      if (this.opts.sendTimeoutMs > 0) {
        s.timer = setTimeout(
          () => this.failSend(s, new ImgwError("timeout", `no send_ack for ${cmid}`)),
          this.opts.sendTimeoutMs,
        );
      }
      this.sends.set(cmid, s);
      if (this.welcomed) this.write({ ...frame, ref: this.ref() });
    });
  }

  /** Sets this user's presence status. It is set again after each reconnect. */
  setPresence(status: Exclude<PresenceStatus, "offline">): Promise<void> {
    this.status = status;
    return this.request({ op: "presence_set", status });
  }

  /** Subscribes to the presence of `users` (kept across reconnects). */
  subscribePresence(users: string[]): Promise<void> {
    for (const u of users) this.subscriptions.add(u);
    return this.request({ op: "presence_sub", users });
  }

  /** Joins a group (stored by the gateway: a member stays one across reconnects). */
  joinGroup(group: string): Promise<void> {
    return this.request({ op: "group_join", group }).then(() => {
      this.groupState(group);
    });
  }

  /** Leaves a group. */
  leaveGroup(group: string): Promise<void> {
    return this.request({ op: "group_leave", group }).then(() => {
      this.groups.delete(group);
    });
  }

  // ---- connection ------------------------------------------------------------------------

  private open(): void {
    if (this.stopped) return;
    this.setState("connecting");
    const url = typeof this.opts.url === "function" ? this.opts.url() : this.opts.url;
    Promise.resolve()
      .then(() => this.opts.token())
      .then(
        (token) => {
          if (this.stopped) return;
          const Ctor = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketFactory }).WebSocket;
          if (!Ctor) throw new Error("no WebSocket implementation: pass options.WebSocket");
          const codec = this.opts.codec;
          // resume {inbox_seq}: the last sequence this client has, or 0 for the stored cursor.
          const hello = {
            op: "hello",
            ref: this.ref(),
            version: 1,
            token,
            device: this.opts.device,
            resume: { inbox_seq: this.inboxSeq },
          };
          const inUrl = this.opts.helloInUrl;
          const target = inUrl ? withHelloParam(url, codec.encode(hello)) : url;
          const ws = new Ctor(target, [codec.subprotocol]);
          if (codec.binary) ws.binaryType = "arraybuffer";
          this.ws = ws;
          ws.onopen = () => {
            if (this.ws !== ws) return;
            this.lastRx = Date.now();
            this.inboxSyncing = true;
            if (!inUrl) this.write(hello);
          };
          ws.onmessage = (ev) => {
            if (this.ws !== ws) return;
            this.lastRx = Date.now();
            let frame: Frame;
            try {
              frame = codec.decode(ev.data) as Frame;
            } catch (err) {
              const why = err instanceof Error ? err.message : String(err);
              this.emit("error", new Error(`unreadable frame from the gateway: ${why}`));
              return;
            }
            this.onFrame(frame);
          };
          ws.onerror = () => {
            // onclose follows and reconnects.
          };
          ws.onclose = (ev) => {
            if (this.ws !== ws) return;
            this.ws = null;
            this.onClosed(ev?.code, ev?.reason);
          };
        },
        (err: unknown) => {
          this.emit("error", err instanceof Error ? err : new Error(String(err)));
          this.onClosed();
        },
      )
      .catch((err: unknown) => {
        this.emit("error", err instanceof Error ? err : new Error(String(err)));
        this.onClosed();
      });
  }

  private onClosed(_code?: number, _reason?: string): void {
    this.teardown();
    if (this.stopped) return;
    this.setState("disconnected");
    let delay: number;
    if (this.goawayMs !== null) {
      delay = this.goawayMs;
      this.goawayMs = null;
    } else {
      const ceiling = Math.min(
        this.opts.maxReconnectMs,
        this.opts.minReconnectMs * 2 ** Math.min(this.attempt, 20),
      );
      // Equal jitter: half fixed, half random, so a crowd spreads out but never rushes back.
      delay = ceiling / 2 + Math.random() * (ceiling / 2);
      this.attempt++;
    }
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.open(), delay);
  }

  /** Per-connection state goes; what survives reconnects (positions, sends) stays. */
  private teardown(): void {
    this.welcomed = false;
    this.inboxSyncing = false;
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.resumeTimer);
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    clearTimeout(this.groupAckTimer);
    this.groupAckTimer = undefined;
    for (const g of this.groups.values()) g.syncing = false;
    this.groupQueue = [];
    for (const s of this.sends.values()) clearTimeout(s.retryTimer);
  }

  private setState(s: ConnectionState): void {
    if (this.stateValue === s) return;
    this.stateValue = s;
    this.emit("state", s);
  }

  private settleConnect(err: Error | null): void {
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) {
      if (err) w.reject(err);
      else w.resolve();
    }
  }

  private ref(): number {
    const r = this.nextRef;
    this.nextRef = this.nextRef >= Number.MAX_SAFE_INTEGER ? 1 : this.nextRef + 1;
    return r;
  }

  private write(frame: Frame): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== WS_OPEN) return;
    try {
      ws.send(this.opts.codec.encode(frame));
    } catch (err) {
      this.emit("error", err instanceof Error ? err : new Error(String(err)));
      try {
        ws.close();
      } catch {
        // closing anyway
      }
    }
  }

  private emit<K extends keyof ClientEvents>(event: K, value: ClientEvents[K]): void {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        (fn as Listener<ClientEvents[K]>)(value);
      } catch (err) {
        if (event !== "error") this.emit("error", err instanceof Error ? err : new Error(String(err)));
      }
    }
  }

  // ---- frames ----------------------------------------------------------------------------

  private onFrame(f: Frame): void {
    switch (f.op) {
      case "welcome":
        return this.onWelcome(f as unknown as Welcome);
      case "deliver":
        return this.onDeliver(f);
      case "synced":
        return this.onSynced(f);
      case "send_ack":
        return this.onSendAck(f);
      case "ok":
        return this.onOk(f.ref);
      case "error":
        return this.onError(f);
      case "presence":
        this.emit("presence", { user: String(f.user), status: f.status as PresenceStatus, ts: Number(f.ts) });
        return;
      case "goaway": {
        const reconnectMs = Number(f.reconnect_ms ?? 0);
        this.goawayMs = Math.max(0, reconnectMs);
        this.emit("goaway", { reason: String(f.reason), reconnectMs });
        return;
      }
      case "ping":
        this.write({ op: "pong", ts: f.ts });
        return;
      case "pong":
        return;
      default:
        return; // unknown ops are ignored (docs/PROTOCOL.md versioning)
    }
  }

  private onWelcome(w: Welcome): void {
    this.welcomed = true;
    this.welcomeInfo = w;
    this.attempt = 0;
    this.setState("connected");
    this.emit("welcome", w);
    const hb = Math.max(1000, Number(w.heartbeat_ms) || 30_000);
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(() => {
      if (Date.now() - this.lastRx > 2 * hb + 5000) {
        // Nothing heard for two heartbeats: the connection is dead; reconnect.
        try {
          this.ws?.close(4000, "heartbeat timeout");
        } catch {
          // closing anyway
        }
        const ws = this.ws;
        this.ws = null;
        if (ws) this.onClosed();
        return;
      }
      this.write({ op: "ping", ts: Date.now() });
    }, hb);
    // A gateway at durability `memory` never answers the resume: do not wait forever.
    clearTimeout(this.resumeTimer);
    this.resumeTimer = setTimeout(() => {
      if (!this.inboxSyncing) return;
      if (this.durable === null) this.durable = false;
      this.inboxSyncDone([]);
    }, this.opts.resumeTimeoutMs);
    if (this.status) this.write({ op: "presence_set", status: this.status });
    if (this.subscriptions.size > 0) {
      this.write({ op: "presence_sub", users: [...this.subscriptions] });
    }
    for (const [ref, r] of this.requests) this.write({ ...r.frame, ref });
    for (const s of this.sends.values()) this.write({ ...s.frame, ref: this.ref() });
    this.settleConnect(null);
  }

  private onDeliver(f: Frame): void {
    const to = f.to as Target | undefined;
    const msg: Message = {
      mid: Number(f.mid),
      from: String(f.from),
      seq: Number(f.inbox_seq ?? 0),
      ts: Number(f.ts ?? 0),
      body: String(f.body ?? ""),
    };
    if (to) msg.to = to;
    if (typeof f.type === "string") msg.type = f.type;
    if (f.ext && typeof f.ext === "object") msg.ext = f.ext as Record<string, string>;
    if (to && "group" in to) {
      msg.group = to.group;
      this.onGroupDeliver(to.group, msg);
      return;
    }
    msg.peer = to && "user" in to ? to.user : msg.from;
    const dupSeq = this.durable === true && msg.seq > 0 && msg.seq <= this.inboxSeq;
    const dupMid = this.seen.has(msg.mid);
    if (msg.seq > this.inboxSeq) this.inboxSeq = msg.seq;
    if (msg.seq > 0) this.scheduleAck();
    if (dupSeq || dupMid) return;
    // This user's own message to `peer`: if a send of this client to `peer` awaits its ack,
    // it may be that one (its mid is not known yet): wait for the ack to tell.
    if (to && "user" in to && this.awaitingAck(to.user) && this.ownHeld.length < this.opts.maxPendingSends) {
      this.ownHeld.push(msg);
      return;
    }
    this.seen.add(msg.mid);
    this.emit("message", msg);
  }

  /** Whether a send to `user` waits for its `send_ack`. */
  private awaitingAck(user: string): boolean {
    for (const s of this.sends.values()) {
      const to = s.frame.to as Target;
      if ("user" in to && to.user === user) return true;
    }
    return false;
  }

  /** Settles held own messages once no send to their peer awaits its ack: dropped when the
   * ack named their mid (this client's own send), emitted otherwise (another device's). */
  private releaseOwn(): void {
    if (this.ownHeld.length === 0) return;
    const keep: Message[] = [];
    for (const m of this.ownHeld) {
      if (this.seen.has(m.mid)) continue;
      if (m.peer !== undefined && this.awaitingAck(m.peer)) {
        keep.push(m);
        continue;
      }
      this.seen.add(m.mid);
      this.emit("message", m);
    }
    this.ownHeld = keep;
  }

  private groupState(group: string): GroupState {
    let g = this.groups.get(group);
    if (!g) {
      g = { last: 0, syncing: false, held: new Map(), acked: 0 };
      this.groups.set(group, g);
    }
    return g;
  }

  private onGroupDeliver(group: string, msg: Message): void {
    const known = this.groups.has(group);
    const g = this.groupState(group);
    if (this.seen.has(msg.mid) || (this.durable === true && g.last > 0 && msg.seq <= g.last)) return;
    if (msg.seq === 0 || this.durable === false) {
      // Not on a timeline (nothing to order): show it.
      this.seen.add(msg.mid);
      this.emit("message", msg);
      return;
    }
    // Emit in gseq order: the next one, or the first of a group this client has no position
    // in (unless the inbox sync may still name the group as having unread messages).
    const first = g.last === 0 && !g.syncing && !(this.inboxSyncing && !known);
    if ((msg.seq === g.last + 1 && !g.syncing) || first) {
      this.emitGroup(g, msg);
      this.releaseHeld(g, 0);
      return;
    }
    if (g.held.size < this.opts.maxHeldPerGroup) g.held.set(msg.seq, msg);
    // A gap (or no position yet): fill it from the timeline, unless the inbox sync will
    // start the group's sync, or one runs.
    if (!g.syncing && !this.inboxSyncing && g.last > 0) this.startGroupSync(group);
  }

  private emitGroup(g: GroupState, msg: Message): void {
    g.last = msg.seq;
    g.held.delete(msg.seq);
    this.seen.add(msg.mid);
    this.emit("message", msg);
    this.scheduleGroupAck();
  }

  /** Emits the held messages up to gseq `upTo` in order (a sync page ended there: what is
   * missing below it is not on the timeline), then those that follow without a gap. */
  private releaseHeld(g: GroupState, upTo: number): void {
    if (g.held.size === 0) return;
    const seqs = [...g.held.keys()].sort((a, b) => a - b);
    for (const s of seqs) {
      const m = g.held.get(s);
      if (!m) continue;
      if (s <= g.last || this.seen.has(m.mid)) {
        g.held.delete(s);
      } else if (s <= upTo || s === g.last + 1) {
        this.emitGroup(g, m);
      } else {
        break;
      }
    }
  }

  private startGroupSync(group: string): void {
    const g = this.groupState(group);
    if (g.syncing) return;
    if ([...this.groups.values()].some((x) => x.syncing)) {
      if (!this.groupQueue.includes(group)) this.groupQueue.push(group);
      return;
    }
    g.syncing = true;
    this.write({
      op: "sync",
      ref: this.ref(),
      group,
      after_inbox_seq: g.last,
      limit: this.opts.syncLimit,
    });
  }

  private onSynced(f: Frame): void {
    const upTo = Number(f.up_to ?? 0);
    const more = f.more === true;
    if (typeof f.group === "string") {
      const group = f.group;
      const g = this.groupState(group);
      // The page's messages are held (a push may have overtaken them): show them in order.
      this.releaseHeld(g, more ? upTo : Number.MAX_SAFE_INTEGER);
      if (more) {
        this.write({
          op: "sync",
          ref: this.ref(),
          group,
          after_inbox_seq: Math.max(g.last, upTo),
          limit: this.opts.syncLimit,
        });
        return;
      }
      g.syncing = false;
      if (g.last < upTo && g.held.size === 0) {
        g.last = upTo;
        this.scheduleGroupAck();
      }
      this.emit("synced", { group, upTo });
      const next = this.groupQueue.shift();
      if (next !== undefined) this.startGroupSync(next);
      return;
    }
    if (more) {
      this.write({
        op: "sync",
        ref: this.ref(),
        after_inbox_seq: Math.max(this.inboxSeq, upTo),
        limit: this.opts.syncLimit,
      });
      return;
    }
    // Only a gateway that keeps an inbox answers an inbox sync it did not ask for.
    this.durable = true;
    const named = Array.isArray(f.groups) ? (f.groups as unknown[]).map(String) : [];
    this.emit("synced", { upTo });
    if (this.inboxSyncing) this.inboxSyncDone(named);
  }

  /** The inbox is caught up: page the groups with unread messages and the groups this
   * client knows (its own position may be behind the member's cursor, which other devices
   * move); release held pushes of the others. */
  private inboxSyncDone(named: string[]): void {
    this.inboxSyncing = false;
    clearTimeout(this.resumeTimer);
    const toSync = new Set(named);
    for (const [name, g] of this.groups) if (g.last > 0) toSync.add(name);
    for (const [name, g] of this.groups) {
      if (!toSync.has(name)) this.releaseHeld(g, Number.MAX_SAFE_INTEGER);
    }
    for (const name of toSync) this.startGroupSync(name);
  }

  private scheduleAck(): void {
    const window = this.welcomeInfo?.limits.window ?? 64;
    if (this.inboxSeq - this.inboxAcked >= Math.max(1, Math.floor(window / 2))) {
      this.flushAcks();
      return;
    }
    if (this.ackTimer === undefined) {
      this.ackTimer = setTimeout(() => this.flushAcks(), this.opts.ackDelayMs);
    }
  }

  private flushAcks(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    if (!this.welcomed) return;
    if (this.inboxSeq > this.inboxAcked) {
      this.inboxAcked = this.inboxSeq;
      this.write({ op: "ack", inbox_seq: this.inboxSeq });
    }
  }

  private scheduleGroupAck(): void {
    if (this.groupAckTimer === undefined) {
      this.groupAckTimer = setTimeout(() => this.flushGroupAcks(), this.opts.groupAckDelayMs);
    }
  }

  private flushGroupAcks(): void {
    clearTimeout(this.groupAckTimer);
    this.groupAckTimer = undefined;
    if (!this.welcomed) return;
    for (const [group, g] of this.groups) {
      if (g.last > g.acked) {
        g.acked = g.last;
        this.write({ op: "ack", inbox_seq: g.last, group });
      }
    }
  }

  private onSendAck(f: Frame): void {
    const s = this.sends.get(String(f.cmid));
    if (!s) return; // a duplicate ack of a send already settled
    const ack: SendAck = { cmid: s.cmid, mid: Number(f.mid), seq: Number(f.seq), ts: Number(f.ts) };
    // Our own message may come back from the inbox (a sync): it is dropped by its mid.
    this.seen.add(ack.mid);
    clearTimeout(s.timer);
    clearTimeout(s.retryTimer);
    this.sends.delete(s.cmid);
    s.resolve(ack);
    this.releaseOwn();
  }

  private onOk(ref: unknown): void {
    const r = this.requests.get(Number(ref));
    if (!r) return;
    clearTimeout(r.timer);
    this.requests.delete(Number(ref));
    r.resolve();
  }

  private onError(f: Frame): void {
    const code = String(f.code ?? "internal");
    const retryAfter = f.retry_after_ms === undefined ? undefined : Number(f.retry_after_ms);
    const err = new ImgwError(code, String(f.message ?? ""), retryAfter);
    if (typeof f.cmid === "string") {
      const s = this.sends.get(f.cmid);
      if (s) {
        if (RETRIABLE.has(code) && s.retries < this.opts.sendRetries) {
          s.retries++;
          clearTimeout(s.retryTimer);
          s.retryTimer = setTimeout(() => {
            if (this.welcomed && this.sends.has(s.cmid)) this.write({ ...s.frame, ref: this.ref() });
          }, retryAfter ?? 200);
        } else {
          this.failSend(s, err);
        }
        return;
      }
    }
    const ref = f.ref === undefined ? undefined : Number(f.ref);
    if (ref !== undefined && this.requests.has(ref)) {
      const r = this.requests.get(ref);
      this.requests.delete(ref);
      if (r) {
        clearTimeout(r.timer);
        r.reject(err);
      }
      return;
    }
    if (RETRIABLE.has(code) && (this.inboxSyncing || [...this.groups.values()].some((g) => g.syncing))) {
      // A sync page the gateway could not queue: ask again.
      setTimeout(() => {
        if (!this.welcomed) return;
        if (this.inboxSyncing) {
          this.write({ op: "sync", ref: this.ref(), after_inbox_seq: this.inboxSeq, limit: this.opts.syncLimit });
        }
        for (const [group, g] of this.groups) {
          if (g.syncing) {
            this.write({ op: "sync", ref: this.ref(), group, after_inbox_seq: g.last, limit: this.opts.syncLimit });
          }
        }
      }, retryAfter ?? 200);
    }
    this.emit("error", err);
  }

  private failSend(s: PendingSend, err: Error): void {
    clearTimeout(s.timer);
    clearTimeout(s.retryTimer);
    if (this.sends.get(s.cmid) === s) this.sends.delete(s.cmid);
    s.reject(err);
    this.releaseOwn();
  }

  private request(frame: Frame): Promise<void> {
    if (this.requests.size >= this.opts.maxPendingSends) {
      return Promise.reject(new ImgwError("queue_full", "too many requests waiting for an answer"));
    }
    const ref = this.ref();
    return new Promise<void>((resolve, reject) => {
      const r: PendingRequest = { frame, resolve, reject };
      r.timer = setTimeout(() => {
        this.requests.delete(ref);
        reject(new ImgwError("timeout", `no answer to ${frame.op}`));
      }, this.opts.requestTimeoutMs);
      this.requests.set(ref, r);
      if (this.welcomed) this.write({ ...frame, ref });
    });
  }
}
