//! The client side of a shard: bytes in from a connection, through the transport (raw-TCP
//! frames or WebSocket) and the codec, into the session rules: nothing but `hello` before
//! authentication, the handshake timeout, rate limits, one user per connection, and the
//! replies and cross-shard messages each op causes.

use bytes::Bytes;

use super::{ConnId, HelloDone, Origin, Phase, Proto, Session, Shard, ShardMsg, UserKey};
use crate::codec::DecodeError;
use crate::metrics::{CloseReason, TenantRefusal};
use crate::protocol::frame::FrameError;
use crate::protocol::{
    Deliver, Envelope, Error, ErrorCode, Hello, Limits, Message, Send, Str, Target, Welcome,
    CURRENT_VERSION, PREVIOUS_VERSION,
};
use crate::ws;

use super::Clock;

/// A WebSocket event copied out of the decoder (which lends its payload only until the next
/// call), so the shard can act on it.
enum WsIn {
    Text(Bytes),
    Binary(Bytes),
    Ping,
    Close,
    Pong,
}

/// Send tokens a bad payload costs an authenticated connection.
const BAD_FRAME_COST: u32 = 8;

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
            .take(n, l.bytes_per_sec, super::byte_burst(l), clk.mono_ms)
            .is_err();
        if over && c.phase != Phase::Echo {
            self.reply_error(id, None, ErrorCode::RateLimited, "byte rate exceeded");
            self.close(id, CloseReason::Protocol);
            return;
        }
        match c.proto {
            Proto::Tcp => self.read_tcp(id, data, clk),
            Proto::WsHandshake => self.read_ws_handshake(id, data, clk),
            Proto::Ws(_) => self.read_ws(id, data, clk),
        }
    }

    fn read_tcp(&mut self, id: ConnId, data: &[u8], clk: Clock) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.inbuf.extend_from_slice(data);
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if c.closing.is_some() {
                return;
            }
            match self.frames.decode(&mut c.inbuf) {
                Ok(Some(frame)) => {
                    let m = &self.metrics.shards[self.id];
                    m.frame_in(frame.header.op, frame.header.codec);
                    if c.phase == Phase::Handshake {
                        // The codec of the `hello` frame is the connection's codec.
                        c.codec = frame.header.codec;
                    } else if frame.header.codec != c.codec {
                        self.reply_error(
                            id,
                            None,
                            ErrorCode::BadFrame,
                            "codec differs from hello's",
                        );
                        continue;
                    }
                    let op = frame.header.op;
                    self.on_payload(id, frame.payload, Some(op), clk);
                }
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::BadFrame,
                    };
                    self.reply_error(id, None, code, &e.to_string());
                    self.close(id, CloseReason::Protocol);
                    return;
                }
            }
        }
        if let Some(c) = self.conns.get_mut(id) {
            if c.inbuf.is_empty() {
                // An idle connection holds no input buffer.
                c.inbuf = bytes::BytesMut::new();
            }
        }
    }

    fn read_ws_handshake(&mut self, id: ConnId, data: &mut [u8], clk: Clock) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.inbuf.extend_from_slice(data);
        let parsed = match ws::parse_request(&self.hs, &c.inbuf) {
            Err(ws::RejectReason::Path) if self.echo_hs.is_some() => self
                .echo_hs
                .as_ref()
                .map(|e| ws::parse_request(e, &c.inbuf).map(|u| u.map(|u| (u, true))))
                .unwrap_or(Err(ws::RejectReason::Path)),
            other => other.map(|u| u.map(|u| (u, false))),
        };
        match parsed {
            Ok(None) => {
                if c.inbuf.len() > self.cfg.ws.max_handshake_bytes as usize {
                    ws::RejectReason::HeadersTooLarge.write_response(&mut c.out);
                    self.m()
                        .handshakes_failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.close(id, CloseReason::Protocol);
                }
            }
            Err(reason) => {
                reason.write_response(&mut c.out);
                self.m()
                    .handshakes_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(shard = self.id, conn = ?id, reason = reason.label(), "upgrade refused");
                self.close(id, CloseReason::Protocol);
            }
            Ok(Some((up, echo))) => {
                up.write_response(&mut c.out);
                c.codec = up.codec;
                let limits = if echo {
                    ws::Limits::new(
                        self.cfg.ws.max_frame_bytes.max(16 << 20),
                        self.cfg.ws.max_message_bytes.max(16 << 20),
                    )
                } else {
                    ws::Limits::new(self.cfg.ws.max_frame_bytes, self.cfg.ws.max_message_bytes)
                };
                c.proto = Proto::Ws(ws::Decoder::new(ws::Role::Server, limits));
                if echo {
                    c.phase = Phase::Echo;
                }
                let mut rest = c.inbuf.split_off(up.consumed);
                c.inbuf = bytes::BytesMut::new();
                self.woken.conn(c, id);
                if !rest.is_empty() {
                    self.read_ws(id, &mut rest, clk);
                }
            }
        }
    }

    fn read_ws(&mut self, id: ConnId, mut data: &mut [u8], clk: Clock) {
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if c.closing.is_some() {
                return;
            }
            let Proto::Ws(dec) = &mut c.proto else {
                return;
            };
            let input = match dec.next_event(&mut data) {
                Ok(None) => return,
                Ok(Some(ev)) => {
                    let reply_needed = matches!(ev, ws::Event::Ping(_) | ws::Event::Close { .. });
                    if reply_needed {
                        let next = ws::respond(&ev, false, &mut c.out);
                        if next == ws::Next::Close {
                            self.close(id, CloseReason::Peer);
                            return;
                        }
                    }
                    match ev {
                        ws::Event::Text(t) => WsIn::Text(Bytes::copy_from_slice(t.as_bytes())),
                        ws::Event::Binary(b) => WsIn::Binary(Bytes::copy_from_slice(b)),
                        ws::Event::Ping(_) => WsIn::Ping,
                        ws::Event::Pong(_) => WsIn::Pong,
                        ws::Event::Close { .. } => WsIn::Close,
                    }
                }
                Err(e) => {
                    ws::respond_error(e, &mut c.out);
                    self.woken.conn(c, id);
                    self.close(id, CloseReason::Protocol);
                    return;
                }
            };
            let (payload, is_text) = match input {
                WsIn::Text(p) => (p, true),
                WsIn::Binary(p) => (p, false),
                WsIn::Ping | WsIn::Pong => {
                    if matches!(input, WsIn::Ping) {
                        self.heartbeat(id, clk);
                    }
                    if let Some(c) = self.conns.get_mut(id) {
                        self.woken.conn(c, id);
                    }
                    continue;
                }
                WsIn::Close => {
                    self.close(id, CloseReason::Peer);
                    return;
                }
            };
            match input_payload(self, id, payload, is_text) {
                Some(payload) => self.on_payload(id, payload, None, clk),
                None => continue,
            }
        }
    }
}

/// Echo connections answer here (text back as text, already UTF-8 validated by the decoder;
/// binary as binary) and `None` is returned; otherwise the payload goes on to the codec.
fn input_payload(shard: &mut Shard, id: ConnId, payload: Bytes, is_text: bool) -> Option<Bytes> {
    let c = shard.conns.get_mut(id)?;
    if c.phase != Phase::Echo {
        return Some(payload);
    }
    match (is_text, std::str::from_utf8(&payload)) {
        (true, Ok(t)) => ws::write_text(&mut c.out, t),
        _ => ws::write_binary(&mut c.out, &payload),
    }
    shard.woken.conn(c, id);
    None
}

impl Shard {
    /// One payload from either transport; `header_op` is the raw-TCP header's op number.
    fn on_payload(&mut self, id: ConnId, payload: Bytes, header_op: Option<u8>, clk: Clock) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let codec = c.codec;
        match codec.decode_bytes(&payload) {
            Ok(env) => {
                if header_op.is_none() {
                    // WebSocket: no header, so count the frame once its op is known.
                    self.m().frame_in(env.msg.op() as u8, codec);
                }
                if header_op.is_some_and(|op| op != env.msg.op() as u8) {
                    self.reply_error(
                        id,
                        env.reference,
                        ErrorCode::BadFrame,
                        "header op differs from payload op",
                    );
                    return;
                }
                self.on_message(id, env, clk);
            }
            Err(DecodeError::UnknownOp { reference, .. }) => {
                self.reply_error(id, reference, ErrorCode::Unsupported, "unknown op");
            }
            Err(e) => {
                let handshake = self
                    .conns
                    .get(id)
                    .is_some_and(|c| c.phase == Phase::Handshake);
                self.reply_error(id, None, ErrorCode::BadFrame, &e.to_string());
                if handshake {
                    self.m()
                        .handshakes_failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.close(id, CloseReason::Protocol);
                } else {
                    self.count_bad_frame(id);
                }
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

    fn session_user(&self, id: ConnId) -> Option<UserKey> {
        self.conns.get(id)?.session.as_ref().map(|s| s.user.clone())
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
        let version = if h.version == 0 { 1 } else { h.version };
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
        if version != CURRENT_VERSION && version != PREVIOUS_VERSION {
            let msg = format!(
                "protocol version {version} not spoken here: this server speaks {} to {}",
                PREVIOUS_VERSION.min(CURRENT_VERSION),
                CURRENT_VERSION.max(PREVIOUS_VERSION)
            );
            refuse(self, ErrorCode::VersionUnsupported, &msg);
            return;
        }
        if h.device.is_empty() || h.device.len() > 128 {
            refuse(self, ErrorCode::BadRequest, "device must be 1 to 128 bytes");
            return;
        }
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
                window: Default::default(),
                tenant_sends,
                subs: Vec::new(),
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
        let l = &self.cfg.limits;
        if let Err(wait_ms) = c.sends.take(1, l.sends_per_sec, l.send_burst, clk.mono_ms) {
            self.rate_limited(id, reference, s.cmid, "send rate exceeded", wait_ms);
            return;
        }
        let Some(sess) = c.session.as_ref() else {
            return;
        };
        if let Some(Err(wait_ms)) = sess.tenant_sends.as_ref().map(|b| b.take(clk.mono_ms)) {
            let tenant = sess.user.tenant.clone();
            self.m().tenant_refused(&tenant, TenantRefusal::Rate);
            self.rate_limited(id, reference, s.cmid, "tenant send rate exceeded", wait_ms);
            return;
        }
        let from = sess.user.clone();
        if s.cmid.is_empty() || s.cmid.len() > 128 {
            self.send_error(id, reference, s.cmid, ErrorCode::BadRequest);
            return;
        }
        let valid = |id: &Str| !id.is_empty() && id.len() <= 128;
        let target_ok = match &s.to {
            Target::User(u) | Target::Group(u) => valid(u),
        };
        if !target_ok {
            self.send_error(id, reference, s.cmid, ErrorCode::BadRequest);
            return;
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
            route: self.route(id),
            reference,
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
            if u.is_empty() || u.len() > 128 {
                continue;
            }
            let key = UserKey {
                tenant: tenant.clone(),
                user: u,
            };
            if sess.subs.contains(&key) {
                continue;
            }
            if sess.subs.len() >= max {
                refused = true;
                break;
            }
            sess.subs.push(key.clone());
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
