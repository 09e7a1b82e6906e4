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
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
    onclose: ((ev: {
        code?: number;
        reason?: string;
    }) => void) | null;
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
export declare const jsonCodec: FrameCodec;
/**
 * MessagePack in binary frames, with the caller's encoder and decoder (for example
 * `encode` and `decode` of the `@msgpack/msgpack` package), so that the SDK itself has no
 * runtime dependency. Mids and sequence numbers stay below 2^53, so plain numbers hold them.
 */
export declare function msgpackCodec(encode: (value: unknown) => Uint8Array, decode: (bytes: Uint8Array) => unknown): FrameCodec;
export type WebSocketFactory = new (url: string, protocols?: string | string[]) => WebSocketLike;
export type PresenceStatus = "online" | "busy" | "away" | "offline";
export type Target = {
    user: string;
} | {
    group: string;
};
/** `url` with `frame` (an encoded `hello`) in its `hello` query parameter, base64url without
 * padding (the gateway's PROTOCOL.md, section 1). */
export declare function withHelloParam(url: string, frame: string | Uint8Array): string;
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
    limits: {
        max_frame_bytes: number;
        sends_per_sec: number;
        window: number;
    };
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
    synced: {
        group?: string;
        upTo: number;
    };
    goaway: {
        reason: string;
        reconnectMs: number;
    };
    /** An `error` frame that answers no request of this client, or a connection failure. */
    error: Error;
}
/** An `error` frame from the gateway (docs/PROTOCOL.md section 5), or a client-side refusal
 * (`code` `timeout`, `closed`, `queue_full`). */
export declare class ImgwError extends Error {
    readonly code: string;
    readonly retryAfterMs?: number;
    constructor(code: string, message: string, retryAfterMs?: number);
}
type Listener<T> = (value: T) => void;
export declare class Client {
    private readonly opts;
    private ws;
    private stateValue;
    private stopped;
    private welcomed;
    private attempt;
    private goawayMs;
    private reconnectTimer?;
    private heartbeatTimer?;
    private resumeTimer?;
    private ackTimer?;
    private groupAckTimer?;
    private lastRx;
    private nextRef;
    private cmidBase;
    private cmidCount;
    private welcomeInfo;
    private connectWaiters;
    private readonly listeners;
    private inboxSeq;
    private inboxAcked;
    /** The hello's resume is being answered (pages until `more` is false). */
    private inboxSyncing;
    /** Whether the gateway keeps an inbox (it answered `hello.resume` with `synced`): then
     * inbox sequences and gseqs are stable, used for dedupe and ordering. `false` once the
     * resume went unanswered (durability `memory`: ids restart with the gateway, so only
     * `mid`s dedupe); `null` until known. */
    private durable;
    private readonly seen;
    private readonly groups;
    /** Own messages (from another device, or this one's) held until pending acks tell which. */
    private ownHeld;
    /** Groups to page once the current group sync ends (one at a time). */
    private groupQueue;
    private readonly sends;
    private readonly requests;
    private readonly subscriptions;
    private status;
    constructor(options: ClientOptions);
    /** The connection's state. */
    get state(): ConnectionState;
    /** The last `welcome` (user, session, limits), or null before the first. */
    get welcome(): Welcome | null;
    /** The last inbox sequence processed (persist it to resume a later client from it). */
    get lastInboxSeq(): number;
    /** Sends waiting for their `send_ack`. */
    get pendingSends(): number;
    /** Subscribes to an event; returns the function that unsubscribes. */
    on<K extends keyof ClientEvents>(event: K, fn: Listener<ClientEvents[K]>): () => void;
    /** Starts connecting (and reconnecting until `disconnect`); resolves at the next `welcome`. */
    connect(): Promise<void>;
    /** Closes the connection and stops reconnecting. Sends stay queued (a later `connect`
     * sends them) unless `rejectPending`; requests in flight reject. */
    disconnect(rejectPending?: boolean): void;
    /** Sends `body` to a user or a group; resolves with the `send_ack`. */
    send(to: Target, body: string, opts?: {
        type?: string;
        ext?: Record<string, string>;
        cmid?: string;
    }): Promise<SendAck>;
    /** Sets this user's presence status. It is set again after each reconnect. */
    setPresence(status: Exclude<PresenceStatus, "offline">): Promise<void>;
    /** Subscribes to the presence of `users` (kept across reconnects). */
    subscribePresence(users: string[]): Promise<void>;
    /** Joins a group (stored by the gateway: a member stays one across reconnects). */
    joinGroup(group: string): Promise<void>;
    /** Leaves a group. */
    leaveGroup(group: string): Promise<void>;
    private open;
    private onClosed;
    /** Per-connection state goes; what survives reconnects (positions, sends) stays. */
    private teardown;
    private setState;
    private settleConnect;
    private ref;
    private write;
    private emit;
    private onFrame;
    private onWelcome;
    private onDeliver;
    /** Whether a send to `user` waits for its `send_ack`. */
    private awaitingAck;
    /** Settles held own messages once no send to their peer awaits its ack: dropped when the
     * ack named their mid (this client's own send), emitted otherwise (another device's). */
    private releaseOwn;
    private groupState;
    private onGroupDeliver;
    private emitGroup;
    /** Emits the held messages up to gseq `upTo` in order (a sync page ended there: what is
     * missing below it is not on the timeline), then those that follow without a gap. */
    private releaseHeld;
    private startGroupSync;
    private onSynced;
    /** The inbox is caught up: page the groups with unread messages and the groups this
     * client knows (its own position may be behind the member's cursor, which other devices
     * move); release held pushes of the others. */
    private inboxSyncDone;
    private scheduleAck;
    private flushAcks;
    private scheduleGroupAck;
    private flushGroupAcks;
    private onSendAck;
    private onOk;
    private onError;
    private failSend;
    private request;
}
export {};
