//! The client side of a shard: the session rules over what a connection's transport
//! (transport.rs: raw-TCP frames or WebSocket, and the codec) makes of the bytes read: nothing
//! but `hello` before authentication, the handshake timeout, rate limits, one user per
//! connection, and the replies and cross-shard messages each op causes. It owns a connection's
//! state in the shard's slab (`Conn`: its transport, phase, output, deadlines and buckets) and
//! an authenticated connection's `Session` (its user, device, delivery window, subscriptions).

use super::transport::Input;
use super::window::Window;
use super::{ConnId, HelloDone, Origin, ReplyTo, Shard, ShardMsg, UserKey};
use crate::codec::DecodeError;
use crate::metrics::{CloseReason, TenantRefusal};
use crate::protocol::{
    Deliver, Envelope, Error, ErrorCode, Hello, Limits, Message, Send, Str, Target, Welcome,
    CURRENT_VERSION, PREVIOUS_VERSION,
};

use super::Clock;
use crate::protocol::MAX_ID_BYTES;
use crate::ratelimit::TokenBucket;

/// Send tokens a bad payload costs an authenticated connection.
const BAD_FRAME_COST: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for `hello` (or the WebSocket upgrade).
    Handshake,
    /// Authenticated.
    Active,
    /// A WebSocket conformance echo connection (no `hello`).
    Echo,
}

/// What an authenticated connection knows about its user.
pub(super) struct Session {
    pub(super) user: UserKey,
    pub(super) device: Str,
    /// The delivery window (durability `local` and `backend`): `None` until the device is
    /// first pushed to, synced, acked or sends (`window_mut`), so an idle device holds 8
    /// bytes here instead of the window's 80.
    pub(super) window: Option<Box<Window>>,
    /// The tenant's send bucket, shared with the tenant's other connections (`None`: no
    /// tenant rate).
    pub(super) tenant_sends: Option<std::sync::Arc<crate::metrics::SendBucket>>,
    /// Users this connection subscribed to, for cleanup (bounded by `max_presence_subs`);
    /// `None` until the first: one pointer instead of an empty vector in every session.
    #[allow(
        clippy::box_collection,
        reason = "8 bytes in every session instead of 24"
    )]
    pub(super) subs: Option<Box<Vec<UserKey>>>,
    /// Monotonic time of the last presence refresh sent to Redis.
    pub(super) presence_ms: u64,
}

impl Session {
    /// The delivery window, made on first use.
    pub(super) fn window_mut(&mut self) -> &mut Window {
        self.window.get_or_insert_with(Box::default)
    }

    /// The acked position not yet handed to the store (0: none, or no window yet).
    pub(super) fn cursor(&self) -> u64 {
        self.window.as_deref().map_or(0, Window::cursor)
    }
}

/// One connection. Kept small: an idle connection holds no buffers (SPEC 2).
pub struct Conn {
    pub(super) link: super::transport::Link,
    pub(super) phase: Phase,
    pub(super) session: Option<Box<Session>>,
    /// Encoded output not yet written; unallocated when idle.
    pub(super) out: Vec<u8>,
    /// Output shared with other connections, written before `out` (frames.rs; empty when
    /// idle).
    pub(super) shared: super::frames::SharedRef,
    /// Listed in [`super::Woken`] and not yet taken by the runtime.
    pub(super) woken: bool,
    /// `out` was given by the shard's output pool (or allocated in its place): it goes back
    /// there when emptied. Buffers of other writes (the transport's 101, pongs) are freed.
    pub(super) out_pooled: bool,
    pub(super) opened_ms: u64,
    pub(super) last_rx_ms: u64,
    /// Deadline currently armed in the wheel (0: none).
    pub(super) armed_ms: u64,
    /// When the oldest byte now in `out` was queued: the low 32 bits of the monotonic clock
    /// in µs (wraps every 71 minutes; 0: `out` is empty), for the `output_wait` stage.
    pub(super) out_since_us: u32,
    /// Set when the connection is to be closed once `out` is flushed.
    pub(super) closing: Option<CloseReason>,
    pub(super) sends: TokenBucket,
    pub(super) bytes: TokenBucket,
}

/// Burst of the per-connection byte bucket: a second's worth, and at least one whole frame.
pub(super) fn byte_burst(l: &crate::config::Limits) -> u32 {
    l.bytes_per_sec.max(l.max_frame_bytes)
}

/// The rules of a `hello` that need no token check and no shard: the protocol version it
/// asks for (0 on the wire reads as 1) must be spoken here, and its device id be 1 to
/// [`MAX_ID_BYTES`] bytes. The version to speak, or the error to answer before closing.
pub(super) fn hello_rules(h: &Hello) -> Result<u8, (ErrorCode, String)> {
    let version = if h.version == 0 { 1 } else { h.version };
    if version != CURRENT_VERSION && version != PREVIOUS_VERSION {
        let msg = format!(
            "protocol version {version} not spoken here: this server speaks {} to {}",
            PREVIOUS_VERSION.min(CURRENT_VERSION),
            CURRENT_VERSION.max(PREVIOUS_VERSION)
        );
        return Err((ErrorCode::VersionUnsupported, msg));
    }
    if !valid_id(&h.device) {
        return Err((
            ErrorCode::BadRequest,
            format!("device must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    Ok(version)
}

/// Why a `send` is refused on its connection's shard.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SendRefusal {
    /// A token bucket is empty: `rate_limited`, retry after `wait_ms`. `tenant`: the
    /// tenant's bucket (shared by its connections), else the connection's.
    Rate { tenant: bool, wait_ms: u64 },
    /// The `cmid` or the target's id is not 1 to [`MAX_ID_BYTES`] bytes: `bad_request`.
    BadRequest,
}

/// The rules of a `send` on its connection's shard, in order: the connection's send bucket
/// (`limits.sends_per_sec`, `limits.send_burst`), the tenant's, then the `cmid` and the
/// target's id. A refused send takes a token from the buckets it passed.
pub(super) fn send_rules(
    conn: &mut crate::ratelimit::TokenBucket,
    tenant: Option<&crate::metrics::SendBucket>,
    l: &crate::config::Limits,
    s: &Send,
    now_ms: u64,
) -> Result<(), SendRefusal> {
    if let Err(wait_ms) = conn.take(1, l.sends_per_sec, l.send_burst, now_ms) {
        return Err(SendRefusal::Rate {
            tenant: false,
            wait_ms,
        });
    }
    if let Some(Err(wait_ms)) = tenant.map(|b| b.take(now_ms)) {
        return Err(SendRefusal::Rate {
            tenant: true,
            wait_ms,
        });
    }
    let target = match &s.to {
        Target::User(u) | Target::Group(u) => u,
    };
    if !valid_id(&s.cmid) || !valid_id(target) {
        return Err(SendRefusal::BadRequest);
    }
    Ok(())
}

/// Whether an id (device, `cmid`, user, group) is 1 to [`MAX_ID_BYTES`] bytes.
pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

impl Shard {
    /// Feeds bytes read from connection `id`'s socket. `data` may be modified (WebSocket
    /// payloads are unmasked in place).
    pub fn on_read(&mut self, id: ConnId, data: &mut [u8], clk: Clock) {
        let m = &self.metrics.shards[self.id];
        m.bytes_in
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.set_now(clk);
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.last_rx_ms = clk.mono_ms;
        if c.phase != Phase::Handshake {
            let deadline = clk.mono_ms + self.cfg.limits.idle_timeout_ms;
            if c.armed_ms == 0 {
                self.arm(id, deadline);
            }
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let l = &self.cfg.limits;
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let over = c
            .bytes
            .take(n, l.bytes_per_sec, byte_burst(l), clk.mono_ms)
            .is_err();
        if over && c.phase != Phase::Echo {
            self.reply_error(id, None, ErrorCode::RateLimited, "byte rate exceeded");
            self.close(id, CloseReason::Protocol);
            return;
        }
        self.read(id, data, clk);
    }

    /// Pulls what the connection's transport makes of `data` and acts on each, until it
    /// is all taken or the connection is closing.
    fn read(&mut self, id: ConnId, mut data: &mut [u8], clk: Clock) {
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if c.closing.is_some() {
                return;
            }
            let hello_pending = c.phase == Phase::Handshake;
            match c
                .link
                .next(&self.rules, &mut data, hello_pending, &mut c.out)
            {
                Input::Done => return,
                Input::Message(env) => {
                    let codec = c.link.codec();
                    self.m().frame_in(env.msg.op() as u8, codec);
                    self.on_message(id, env, clk);
                }
                Input::Undecodable(DecodeError::UnknownOp { reference, .. }) => {
                    self.reply_error(id, reference, ErrorCode::Unsupported, "unknown op");
                }
                Input::Undecodable(e) => {
                    self.reply_error(id, None, ErrorCode::BadFrame, &e.to_string());
                    if hello_pending {
                        self.m()
                            .handshakes_failed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.close(id, CloseReason::Protocol);
                    } else {
                        self.count_bad_frame(id);
                    }
                }
                Input::Refused {
                    reference,
                    code,
                    message,
                } => self.reply_error(id, reference, code, message),
                Input::Ping => {
                    self.woken.conn(c, id);
                    self.heartbeat(id, clk);
                }
                Input::Echoed => self.woken.conn(c, id),
                Input::Upgraded {
                    echo,
                    mut rest,
                    hello,
                } => {
                    if echo {
                        c.phase = Phase::Echo;
                    }
                    self.woken.conn(c, id);
                    if let Some(hello) = hello {
                        self.on_target_hello(id, &hello, clk);
                    }
                    if !rest.is_empty() {
                        self.read(id, &mut rest, clk);
                        return;
                    }
                    // Anything after the request (an early `hello`) is left in `data`.
                    if data.is_empty() {
                        return;
                    }
                }
                Input::PeerClosed => {
                    self.close(id, CloseReason::Peer);
                    return;
                }
                Input::Broken { reply, upgrade } => {
                    if let Some((code, message)) = reply {
                        self.reply_error(id, None, code, &message);
                    }
                    if upgrade {
                        self.m()
                            .handshakes_failed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.close(id, CloseReason::Protocol);
                    return;
                }
            }
        }
    }

    /// The `hello` an upgrade request's target carried: taken as the connection's first
    /// message. Bytes that do not decode fail the handshake, an unknown op included (a first
    /// frame with an unknown op is answered `unsupported` and the handshake waits on).
    fn on_target_hello(&mut self, id: ConnId, payload: &bytes::Bytes, clk: Clock) {
        let Some(c) = self.conns.get(id) else {
            return;
        };
        let codec = c.link.codec();
        self.m()
            .url_hellos
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match codec.decode_bytes(payload) {
            Ok(env) => {
                self.m().frame_in(env.msg.op() as u8, codec);
                self.on_message(id, env, clk);
            }
            Err(e) => {
                self.reply_error(id, None, ErrorCode::BadFrame, &e.to_string());
                self.m()
                    .handshakes_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.close(id, CloseReason::Protocol);
            }
        }
    }

    /// A bad payload from an authenticated connection costs [`BAD_FRAME_COST`] send tokens
    /// (no extra per-connection counter): a run of them exhausts the bucket and closes it.
    fn count_bad_frame(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            let l = &self.cfg.limits;
            if c.sends
                .take(BAD_FRAME_COST, l.sends_per_sec, l.send_burst, c.last_rx_ms)
                .is_err()
            {
                self.close(id, CloseReason::Protocol);
            }
        }
    }

    /// One decoded message from connection `id`.
    pub(super) fn on_message(&mut self, id: ConnId, env: Envelope, clk: Clock) {
        let Some(c) = self.conns.get(id) else {
            return;
        };
        let reference = env.reference;
        if c.phase == Phase::Handshake {
            match env.msg {
                Message::Hello(h) => self.on_hello(id, reference, h, clk),
                _ => {
                    self.reply_error(id, reference, ErrorCode::NotAuthenticated, "hello first");
                    self.m()
                        .handshakes_failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.close(id, CloseReason::AuthFailed);
                }
            }
            return;
        }
        match env.msg {
            Message::Ping(p) => {
                self.heartbeat(id, clk);
                let pong = Envelope {
                    reference,
                    msg: Message::Pong(crate::protocol::Pong { ts: p.ts }),
                };
                self.emit(id, &pong);
            }
            Message::Pong(_) => {}
            Message::Send(s) => self.on_send(id, reference, s, clk),
            Message::Ack(a) if self.durable() => match a.group {
                Some(g) => self.on_group_ack(id, reference, g, a.inbox_seq),
                None => self.on_ack(id, a.inbox_seq),
            },
            Message::Ack(_) => {}
            Message::Sync(s) if self.durable() => match s.group {
                Some(g) => self.group_sync_request(id, reference, g, s.after_inbox_seq, s.limit),
                None => self.sync_request(id, reference, s.after_inbox_seq, s.limit),
            },
            Message::Sync(s) => {
                // Durability `memory` keeps no inbox: nothing to replay (docs/ARCHITECTURE.md).
                self.emit_synced(id, reference, s.after_inbox_seq, false, s.group, Vec::new());
            }
            Message::PresenceSet(p) => {
                let Some(user) = self.session_user(id) else {
                    return;
                };
                if p.status == crate::protocol::Status::Offline {
                    self.reply_error(
                        id,
                        reference,
                        ErrorCode::BadRequest,
                        "offline is not settable",
                    );
                    return;
                }
                let dest = self.owner(&user);
                if self.post(
                    dest,
                    ShardMsg::SetStatus {
                        user,
                        status: p.status,
                    },
                ) {
                    self.emit(
                        id,
                        &Envelope {
                            reference,
                            msg: Message::Ok,
                        },
                    );
                } else {
                    self.overloaded(id, reference, None);
                }
            }
            Message::PresenceSub(p) => self.on_presence_sub(id, reference, p.users),
            Message::GroupJoin(g) => self.on_group_membership(id, reference, g.group, true),
            Message::GroupLeave(g) => self.on_group_membership(id, reference, g.group, false),
            Message::Hello(_) => {
                self.reply_error(
                    id,
                    reference,
                    ErrorCode::BadRequest,
                    "already authenticated",
                );
            }
            Message::Welcome(_)
            | Message::SendAck(_)
            | Message::Deliver(_)
            | Message::Synced(_)
            | Message::Presence(_)
            | Message::Ok
            | Message::Error(_)
            | Message::Goaway(_) => {
                self.reply_error(id, reference, ErrorCode::BadRequest, "server-to-client op");
            }
        }
    }

    /// The user of connection `id`, when it is authenticated.
    pub(super) fn session_user(&self, id: ConnId) -> Option<UserKey> {
        self.conns.get(id)?.session.as_ref().map(|s| s.user.clone())
    }

    /// The session of connection `id`, when it is authenticated.
    pub(super) fn session_mut(&mut self, id: ConnId) -> Option<&mut Session> {
        self.conns.get_mut(id)?.session.as_deref_mut()
    }

    /// `error` `overloaded` with the configured retry hint: work was shed, nothing queued.
    pub(super) fn overloaded(&mut self, id: ConnId, reference: Option<u64>, cmid: Option<Str>) {
        let env = Envelope {
            reference,
            msg: Message::Error(Error {
                code: ErrorCode::Overloaded,
                message: Str::from_static("queue full, retry later"),
                cmid,
                retry_after_ms: Some(self.cfg.limits.retry_after_ms),
            }),
        };
        self.emit(id, &env);
    }

    fn on_hello(&mut self, id: ConnId, reference: Option<u64>, h: Hello, clk: Clock) {
        let refuse = |s: &mut Shard, code: ErrorCode, msg: &str| {
            s.reply_error(id, reference, code, msg);
            s.m()
                .handshakes_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let reason = match code {
                ErrorCode::LimitExceeded => CloseReason::Limit,
                _ => CloseReason::AuthFailed,
            };
            s.close(id, reason);
        };
        let version = match hello_rules(&h) {
            Ok(v) => v,
            Err((code, msg)) => {
                refuse(self, code, &msg);
                return;
            }
        };
        let identity = match self.auth.verify(&h.token, clk.unix_ms / 1000) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(shard = self.id, conn = ?id, error = %e, "hello refused");
                refuse(self, ErrorCode::Unauthorized, &e.to_string());
                return;
            }
        };
        let user = UserKey {
            tenant: identity.tenant,
            user: identity.user,
        };
        // The tenant's connection limit over every shard (released in `Shard::remove`, or
        // below when the registration cannot even be queued).
        let max = self.cfg.max_conns_of(&user.tenant);
        let sends = self.cfg.tenant_sends_of(&user.tenant);
        let admitted = self
            .metrics
            .tenants_shared
            .admit(&user.tenant, max, sends, clk.mono_ms);
        let Some(tenant_sends) = admitted else {
            self.m().tenant_refused(&user.tenant, TenantRefusal::Conns);
            let msg = format!("tenant connection limit reached ({max})");
            refuse(self, ErrorCode::LimitExceeded, &msg);
            return;
        };
        let session_id = ((self.next_session) << 8) | self.id as u64;
        self.next_session += 1;
        let route = self.route(id);
        let dest = self.owner(&user);
        let hello = HelloDone {
            reference,
            version,
            session: session_id,
            resume: h.resume.map(|r| r.inbox_seq),
        };
        if !self.post(
            dest,
            ShardMsg::Register {
                user: user.clone(),
                route,
                hello,
            },
        ) {
            self.metrics.tenants_shared.release(&user.tenant);
            self.overloaded(id, reference, None);
            self.close(id, CloseReason::Limit);
            return;
        }
        let idle = clk.mono_ms + self.cfg.limits.idle_timeout_ms;
        let m = &self.metrics.shards[self.id];
        m.handshakes_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.authenticated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.tenant(&user.tenant, 1, 0);
        tracing::debug!(shard = self.id, conn = ?id, tenant = %user.tenant, user = %user.user, "authenticated");
        if let Some(c) = self.conns.get_mut(id) {
            c.phase = Phase::Active;
            c.session = Some(Box::new(Session {
                user,
                device: h.device,
                window: None,
                tenant_sends,
                subs: None,
                presence_ms: clk.mono_ms,
            }));
            // Replace the handshake deadline by the idle one.
            c.armed_ms = 0;
        }
        self.arm(id, idle);
        if let Some((u, d)) = self
            .conns
            .get(id)
            .and_then(|c| c.session.as_ref())
            .map(|s| (s.user.clone(), s.device.clone()))
        {
            self.presence_event(&u, &d, id, crate::services::redis::PresenceKind::Up);
        }
    }

    /// The owner registered connection `id`'s device: `welcome`, then the `resume` replay.
    pub(super) fn welcome(&mut self, id: ConnId, hello: HelloDone, clk: Clock) {
        if self.position_first(id, &hello) {
            return; // `emit_welcome` follows the position read
        }
        self.emit_welcome(id, hello, clk);
    }

    pub(super) fn emit_welcome(&mut self, id: ConnId, hello: HelloDone, clk: Clock) {
        let Some(user) = self
            .conns
            .get(id)
            .and_then(|c| c.session.as_ref())
            .map(|s| s.user.user.clone())
        else {
            return; // closed meanwhile (its Unregister follows the Register)
        };
        let l = &self.cfg.limits;
        let welcome = Envelope {
            reference: hello.reference,
            msg: Message::Welcome(Welcome {
                version: hello.version,
                session: hello.session,
                user,
                heartbeat_ms: l.heartbeat_ms,
                server_time_ms: clk.unix_ms,
                limits: Limits {
                    max_frame_bytes: l.max_frame_bytes,
                    sends_per_sec: l.sends_per_sec,
                    window: l.window,
                },
            }),
        };
        self.emit(id, &welcome);
        if let (Some(seq), true) = (hello.resume, self.durable()) {
            self.resume(id, hello.reference, seq);
        }
        self.schedule_catchup(id, clk);
    }

    fn on_send(&mut self, id: ConnId, reference: Option<u64>, s: Send, clk: Clock) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Some(sess) = c.session.as_ref() else {
            return;
        };
        let from = sess.user.clone();
        let tenant = sess.tenant_sends.as_deref();
        match send_rules(&mut c.sends, tenant, &self.cfg.limits, &s, clk.mono_ms) {
            Ok(()) => {}
            Err(SendRefusal::Rate { tenant, wait_ms }) => {
                let message = if tenant {
                    self.m().tenant_refused(&from.tenant, TenantRefusal::Rate);
                    "tenant send rate exceeded"
                } else {
                    "send rate exceeded"
                };
                self.rate_limited(id, reference, s.cmid, message, wait_ms);
                return;
            }
            Err(SendRefusal::BadRequest) => {
                self.send_error(id, reference, s.cmid, ErrorCode::BadRequest);
                return;
            }
        }
        self.m().tenant(&from.tenant, 0, 1);
        let deliver = Deliver {
            mid: 0,
            from: from.user.clone(),
            to: None,
            inbox_seq: 0,
            ts: clk.unix_ms,
            kind: s.kind,
            body: s.body,
            ext: s.ext,
        };
        let to = match s.to {
            Target::User(u) => UserKey {
                tenant: from.tenant.clone(),
                user: u,
            },
            Target::Group(g) => {
                self.send_to_group(id, reference, g, s.cmid, deliver);
                return;
            }
        };
        let dest = self.owner(&to);
        let cmid = s.cmid;
        let origin = Origin {
            reply: ReplyTo {
                route: self.route(id),
                reference,
            },
            cmid: cmid.clone(),
            received_us: self.now_us,
        };
        if !self.post(
            dest,
            ShardMsg::Direct {
                to,
                origin,
                deliver,
            },
        ) {
            self.overloaded(id, reference, Some(cmid));
        }
    }

    /// A `send` refused by a token bucket: `rate_limited`, retry after `wait_ms`.
    fn rate_limited(
        &mut self,
        id: ConnId,
        reference: Option<u64>,
        cmid: Str,
        message: &'static str,
        wait_ms: u64,
    ) {
        let env = Envelope {
            reference,
            msg: Message::Error(Error {
                code: ErrorCode::RateLimited,
                message: Str::from_static(message),
                cmid: Some(cmid),
                retry_after_ms: Some(wait_ms.max(1)),
            }),
        };
        self.emit(id, &env);
    }

    fn send_error(&mut self, id: ConnId, reference: Option<u64>, cmid: Str, code: ErrorCode) {
        let env = Envelope {
            reference,
            msg: Message::Error(Error {
                code,
                message: Str::from(code.name()),
                cmid: Some(cmid),
                retry_after_ms: None,
            }),
        };
        self.emit(id, &env);
    }

    fn on_presence_sub(&mut self, id: ConnId, reference: Option<u64>, users: Vec<Str>) {
        let max = self.cfg.limits.max_presence_subs as usize;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Some(sess) = c.session.as_mut() else {
            return;
        };
        let tenant = sess.user.tenant.clone();
        let mut fresh = Vec::new();
        let mut refused = false;
        for u in users {
            if !valid_id(&u) {
                continue;
            }
            let key = UserKey {
                tenant: tenant.clone(),
                user: u,
            };
            let subs = sess.subs.get_or_insert_with(Box::default);
            if subs.contains(&key) {
                continue;
            }
            if subs.len() >= max {
                refused = true;
                break;
            }
            subs.push(key.clone());
            fresh.push(key);
        }
        // Past the limit the rest of the list is refused (what fitted is subscribed).
        let over = refused;
        let route = self.route(id);
        for target in fresh {
            let dest = self.owner(&target);
            self.post_always(
                dest,
                ShardMsg::Subscribe {
                    target,
                    subscriber: route,
                },
            );
        }
        if over {
            self.reply_error(
                id,
                reference,
                ErrorCode::LimitExceeded,
                "presence subscriptions limit",
            );
        } else {
            self.emit(
                id,
                &Envelope {
                    reference,
                    msg: Message::Ok,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! The session rules alone: no shard, no socket.
    use super::*;
    use crate::ratelimit::TokenBucket;

    fn hello(version: u8, device: &str) -> Hello {
        Hello {
            version,
            token: Str::from("t"),
            device: Str::from(device),
            codecs: Vec::new(),
            resume: None,
        }
    }

    fn send(cmid: &str, to: Target) -> Send {
        Send {
            to,
            cmid: Str::from(cmid),
            kind: None,
            body: Str::from("hi"),
            ext: Default::default(),
        }
    }

    #[test]
    fn a_hello_speaks_a_known_version_from_a_named_device() {
        assert_eq!(hello_rules(&hello(0, "d")), Ok(1), "0 reads as version 1");
        assert_eq!(
            hello_rules(&hello(CURRENT_VERSION, "d")),
            Ok(CURRENT_VERSION)
        );
        let Err((code, msg)) = hello_rules(&hello(CURRENT_VERSION + 1, "d")) else {
            panic!("a version from the future was accepted");
        };
        assert_eq!(code, ErrorCode::VersionUnsupported);
        assert!(msg.contains("not spoken here"), "{msg}");
        let long = "d".repeat(MAX_ID_BYTES + 1);
        for device in ["", long.as_str()] {
            assert_eq!(
                hello_rules(&hello(1, device)).map_err(|e| e.0),
                Err(ErrorCode::BadRequest)
            );
        }
        assert!(hello_rules(&hello(1, &"d".repeat(MAX_ID_BYTES))).is_ok());
    }

    #[test]
    fn a_send_passes_its_buckets_then_its_ids() {
        let mut l = crate::config::Limits::default();
        (l.sends_per_sec, l.send_burst) = (10, 2);
        let mut conn = TokenBucket::new(l.send_burst, 0);
        let ok = send("c1", Target::User(Str::from("u")));
        assert_eq!(send_rules(&mut conn, None, &l, &ok, 0), Ok(()));
        assert_eq!(send_rules(&mut conn, None, &l, &ok, 0), Ok(()));
        // The burst spent: the next token comes after 100 ms at 10 a second.
        assert_eq!(
            send_rules(&mut conn, None, &l, &ok, 0),
            Err(SendRefusal::Rate {
                tenant: false,
                wait_ms: 100
            })
        );
        assert_eq!(send_rules(&mut conn, None, &l, &ok, 100), Ok(()));
        let long = "x".repeat(MAX_ID_BYTES + 1);
        for bad in [
            send("", Target::User(Str::from("u"))),
            send(&long, Target::User(Str::from("u"))),
            send("c", Target::User(Str::from(""))),
            send("c", Target::Group(Str::from(long.as_str()))),
        ] {
            let mut full = TokenBucket::new(l.send_burst, 0);
            assert_eq!(
                send_rules(&mut full, None, &l, &bad, 0),
                Err(SendRefusal::BadRequest)
            );
        }
    }

    #[test]
    fn the_tenant_bucket_is_shared_by_its_connections() {
        let l = crate::config::Limits::default();
        let shared = crate::metrics::TenantShared::default();
        let bucket = shared
            .admit("t", 10, Some((1, 1)), 0)
            .flatten()
            .expect("a tenant rate gives a bucket");
        let (mut a, mut b) = (TokenBucket::new(100, 0), TokenBucket::new(100, 0));
        let ok = send("c", Target::Group(Str::from("g")));
        assert_eq!(send_rules(&mut a, Some(&bucket), &l, &ok, 0), Ok(()));
        assert_eq!(
            send_rules(&mut b, Some(&bucket), &l, &ok, 0),
            Err(SendRefusal::Rate {
                tenant: true,
                wait_ms: 1000
            }),
            "one send a second for the tenant, over both connections"
        );
    }
}
