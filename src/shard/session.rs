//! The client side of a shard: the session rules over what a connection's transport
//! (transport.rs: raw-TCP frames or WebSocket, and the codec) makes of the bytes read: nothing
//! but `hello` before authentication, the handshake timeout, rate limits, one user per
//! connection, and the replies and cross-shard messages each op causes.

use super::transport::Input;
use super::{ConnId, HelloDone, Origin, Phase, ReplyTo, Session, Shard, ShardMsg, UserKey};
use crate::codec::DecodeError;
use crate::metrics::{CloseReason, TenantRefusal};
use crate::protocol::{
    Deliver, Envelope, Error, ErrorCode, Hello, Limits, Message, Send, Str, Target, Welcome,
    CURRENT_VERSION, PREVIOUS_VERSION,
};

use super::Clock;

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
                Input::Upgraded { echo, mut rest } => {
                    if echo {
                        c.phase = Phase::Echo;
                    }
                    self.woken.conn(c, id);
                    if !rest.is_empty() {
                        self.read(id, &mut rest, clk);
                    }
                    return;
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
