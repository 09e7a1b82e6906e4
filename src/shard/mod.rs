//! One shard of the gateway, as a sans-IO state machine with an injected clock.
//!
//! A shard owns (SPEC 2): its connections (a generation-tagged [`slab::Slab`]), one
//! [`timer::TimerWheel`] for all their deadlines, and the routing entries, presence state and
//! subscriber lists of the users it owns (owner = hash of tenant and user id). It never does
//! I/O: the runtime (src/runtime) feeds it the bytes a socket produced ([`Shard::on_read`]),
//! time ([`Shard::tick`]) and batches from other shards ([`Shard::on_batch`]); it produces
//! bytes to write per connection, lists the connections that have some for the runtime's
//! driver ([`Shard::take_woken`]), and fills one outbox per
//! destination shard that the runtime ships through bounded channels.
//!
//! Parts stand on their own, without a shard: a connection's transport (transport.rs: framing
//! and codec to and from envelopes), the directory of owned users (owner.rs: routes and
//! presence, returning effects the shard carries out), the groups' roster (roster.rs), the
//! session rules (session.rs) and each device's delivery window (window.rs).
//!
//! Cross-shard traffic is batched per destination; when an outbox is full new work is shed
//! with `overloaded` (never blocked on).

pub mod admin;
mod delivery;
mod external;
mod frames;
mod groups;
mod outpool;
mod owner;
mod roster;
mod route;
mod session;
pub mod slab;
pub mod timer;
mod transport;
mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::task::Waker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::{CloseReason, Metrics, ShardMetrics, Stage};
use crate::protocol::{Deliver, Envelope, ErrorCode, Message, Presence, Status, Str};
use crate::ratelimit::TokenBucket;
pub use groups::GroupKey;
pub use session::Conn;
use session::{byte_burst, Phase, Session};
pub use slab::ConnId;
use timer::TimerWheel;
pub use transport::Transport;

/// Time as the runtime sees it: a monotonic clock for deadlines, the wall clock for `ts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub mono_ms: u64,
    /// The same monotonic clock in microseconds (stage latencies); one origin for every
    /// shard of the process, so times taken on two shards compare.
    pub mono_us: u64,
    pub unix_ms: u64,
}

/// Where a connection lives: its shard and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub shard: u16,
    pub conn: ConnId,
}

use crate::ids::{owner_shard, MidMint, UserKey};

/// What the `welcome` of a `hello` needs once the owner has registered the device: a client
/// that got its `welcome` is routable, so a message sent to it right after is delivered.
#[derive(Clone, Copy, Debug)]
pub struct HelloDone {
    pub reference: Option<u64>,
    pub version: u8,
    pub session: u64,
    /// `hello.resume`'s `inbox_seq`.
    pub resume: Option<u64>,
}

/// Where the answer to a request goes: the requesting connection and the request's `ref`.
#[derive(Clone, Copy, Debug)]
pub struct ReplyTo {
    pub route: Route,
    pub reference: Option<u64>,
}

/// A `send` on its way: where its `send_ack` or refusal goes, and the client's message id,
/// which they carry back.
#[derive(Clone, Debug)]
pub struct Origin {
    pub reply: ReplyTo,
    pub cmid: Str,
    /// When the `send` was read (the monotonic clock, µs): the `send_ack` stage's start.
    pub received_us: u64,
}

/// Messages between shards. Batched per destination by the sender.
#[derive(Debug)]
pub enum ShardMsg {
    /// To the user's owner: a device came online. The owner answers `Registered` (or
    /// `RegisterRefused`), handing `hello` back.
    Register {
        user: UserKey,
        route: Route,
        hello: HelloDone,
    },
    /// To a device's shard: the owner routes to it now; send the `welcome`.
    Registered { conn: ConnId, hello: HelloDone },
    /// To the user's owner: a device went away.
    Unregister { user: UserKey, route: Route },
    /// To a device's shard: the owner refused the registration (too many devices).
    RegisterRefused { conn: ConnId, message: Str },
    /// To a device's shard: an admin kicked its user; `goaway` and close the connection.
    Kick { conn: ConnId },
    /// To the user's owner: the user set busy/away/online.
    SetStatus { user: UserKey, status: Status },
    /// To the target's owner: `subscriber` wants presence events of `target`.
    Subscribe { target: UserKey, subscriber: Route },
    /// To the target's owner: the subscription ends.
    Unsubscribe { target: UserKey, subscriber: Route },
    /// To a subscriber's shard: a presence event for some of its connections.
    PresenceEvent {
        conns: Vec<ConnId>,
        presence: Presence,
    },
    /// To the recipient's owner: a 1:1 message to sequence and fan out.
    Direct {
        to: UserKey,
        origin: Origin,
        deliver: Deliver,
    },
    /// To the sender's owner: the sender's copy of a 1:1 message (`to` naming the peer), for
    /// the sender's devices but `except`, the one that sent it. At durability `memory` the
    /// owner numbers it in the sender's inbox; durable copies come numbered by the store.
    SentCopy {
        to: UserKey,
        except: Route,
        deliver: Deliver,
    },
    /// To the sending device's shard: its own message took `seq` in its user's inbox; the
    /// device's window steps over it (the device has the message already).
    SentSeq { conn: ConnId, seq: u64 },
    /// To the sender's shard: the message was accepted (`send_ack`).
    Accepted {
        origin: Origin,
        mid: u64,
        seq: u64,
        ts: u64,
    },
    /// To the sender's shard: the message was refused.
    Rejected {
        origin: Origin,
        code: ErrorCode,
        retry_after_ms: Option<u64>,
    },
    /// To a device shard: deliver to these connections (one crossing per shard).
    Deliver {
        conns: Vec<ConnId>,
        deliver: Deliver,
    },
    /// To the joining user's owner, first: is there room for one more group of the user
    /// (`limits.max_groups_per_user`)? If so it goes on to the group's owner as
    /// `GroupMembership`; if not the joining connection gets `limit_exceeded`.
    JoinCheck {
        group: groups::GroupKey,
        member: Str,
        reply: ReplyTo,
    },
    /// To a group's owner: join or leave.
    GroupMembership {
        group: groups::GroupKey,
        member: Str,
        join: bool,
        reply: ReplyTo,
    },
    /// To a group's owner: a message to the group.
    GroupSend {
        group: groups::GroupKey,
        origin: Origin,
        deliver: Deliver,
    },
    /// To every shard: forward a group message to its online members' devices.
    GroupFanout {
        group: groups::GroupKey,
        deliver: Deliver,
    },
    /// To a member's owner: `user` joined or left `group`.
    MemberOf {
        user: UserKey,
        group: groups::GroupKey,
        join: bool,
    },
    /// To a connection's shard: a reply to write as is.
    Reply { conn: ConnId, env: Envelope },
}

/// How long a closing connection may take to flush its last frames.
pub const CLOSE_FLUSH_MS: u64 = 2_000;
/// The largest capacity (entries) of a list kept for reuse (`local_spare`, `fx_spare`): a
/// burst's longer list is freed.
pub const SPARE_MAX: usize = 64;
/// Subscribers one user may have (the cost of a status change is bounded by this).
pub const MAX_SUBSCRIBERS_PER_USER: usize = 100_000;
/// Users one shard tracks (owned users with devices or subscribers).
pub const MAX_USERS_PER_SHARD: usize = 4_000_000;

/// A connection's output waiting to be written ([`Shard::output`]): its range of the shared
/// frame log first, then its own bytes.
pub struct Output<'a> {
    pub shared: &'a [u8],
    pub own: &'a [u8],
}

impl Output<'_> {
    /// Bytes waiting in all (the session fuzz target bounds it).
    pub fn len(&self) -> usize {
        self.shared.len() + self.own.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.is_empty() && self.own.is_empty()
    }

    /// Both parts in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        [self.shared, self.own].concat()
    }
}

pub struct Shard {
    pub id: usize,
    shards: usize,
    cfg: Arc<Config>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    conns: slab::Slab<Conn>,
    wheel: TimerWheel<ConnId>,
    /// The owned users' routes and presence.
    dir: owner::Directory,
    groups: roster::Roster,
    /// Outgoing messages per destination shard (index == shard id; ours is the local queue).
    outbox: Vec<Vec<ShardMsg>>,
    outbox_len: usize,
    /// Per destination: when the oldest message waiting in `outbox` was posted (µs; 0 when
    /// empty), carried with the batch for the `shard_queue` stage latency.
    outbox_since_us: Vec<u64>,
    outbox_waker: Option<Waker>,
    /// Buffers kept between uses (emptied, at most [`SPARE_MAX`] entries of capacity): the
    /// local queue's last batch, and the last list of the directory's effects. A `hello`
    /// posts its registration and its answer through the local queue, so each would
    /// otherwise allocate a list per connection.
    local_spare: Vec<ShardMsg>,
    fx_spare: Vec<owner::Effect>,
    /// How connections parse their input (framing, upgrade, their bounds).
    rules: transport::Rules,
    mids: MidMint,
    next_session: u64,
    draining: bool,
    drain_started_ms: u64,
    due: Vec<(u64, ConnId)>,
    /// Monotonic time of the latest input (for deadlines set outside `tick`).
    now_ms: u64,
    /// The same in microseconds (stage latencies).
    now_us: u64,
    /// The I/O core (durability `local`); `None` for `memory`.
    io: Option<crate::iocore::IoPort>,
    io_pending: HashMap<u64, delivery::IoWait>,
    next_token: u64,
    /// Connections with an acked inbox cursor not yet handed to the store (each at most once:
    /// bounded by the connection count); written together every [`delivery::CURSOR_FLUSH_MS`].
    cursor_dirty: Vec<ConnId>,
    /// Group cursors acked and not yet handed to the store: the highest `gseq` per (group,
    /// member), written with the inbox cursors every [`delivery::CURSOR_FLUSH_MS`], before
    /// a read of the store that would look at them (a group sync, the unread groups), when
    /// a connection closes, and when [`groups::MAX_PENDING_GROUP_CURSORS`] are pending.
    group_cursor_dirty: HashMap<(crate::store::GroupRef, Str), u64>,
    /// Monotonic time of the next cursor flush.
    cursor_flush_ms: u64,
    /// Lagging connections whose store read could not be made (the I/O queue was full, or
    /// the read failed), retried on the next tick: without it, a device with nothing in
    /// flight would wait for its next message. Each at most once (`Window::pump_retry`):
    /// bounded by the connection count.
    pump_retry: Vec<ConnId>,
    /// [`Shard::emit_many`]'s encodings of one envelope, one per (WebSocket?, codec): at
    /// most ten, empty between calls (kept only to reuse the allocation), each with the
    /// range of the shared frame log it was appended to (`None`: not shared, copied).
    encoded: Vec<(frames::Encoding, Vec<u8>, Option<frames::SharedRef>)>,
    /// Frames many connections' outputs share (bounded: frames.rs).
    frames: frames::FrameLog,
    /// Emptied output buffers for the next outputs (bounded: outpool.rs).
    out_pool: outpool::OutPool,
    /// Connections for the runtime to service (see [`Woken`]).
    woken: Woken,
}

impl Shard {
    pub fn new(
        id: usize,
        shards: usize,
        cfg: Arc<Config>,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
        io: Option<crate::iocore::IoPort>,
        clk: Clock,
    ) -> Shard {
        assert!(id < shards && shards <= usize::from(u16::MAX));
        let per_shard = (cfg.limits.max_conns as usize).div_ceil(shards);
        let mids = MidMint::unleased(id, cfg.cluster.slot, clk.unix_ms);
        let dir = owner::Directory::new(
            shards,
            MAX_USERS_PER_SHARD,
            cfg.limits.max_devices_per_user as usize,
            cfg.cluster.slot.is_some(),
            cfg.cluster.slot.is_some() && io.is_some(),
        );
        let groups = roster::Roster::new(cfg.cluster.slot.is_some());
        Shard {
            id,
            shards,
            rules: transport::Rules::new(&cfg),
            wheel: TimerWheel::new(cfg.runtime.tick_ms, 4096, clk.mono_ms),
            cfg,
            auth,
            metrics,
            conns: slab::Slab::new(per_shard),
            dir,
            groups,
            outbox: (0..shards).map(|_| Vec::new()).collect(),
            outbox_len: 0,
            outbox_since_us: vec![0; shards],
            outbox_waker: None,
            local_spare: Vec::new(),
            fx_spare: Vec::new(),
            // Without a lease until the runtime gives one (`Shard::set_mid_mint`).
            mids,
            next_session: 1,
            draining: false,
            drain_started_ms: 0,
            due: Vec::new(),
            encoded: Vec::new(),
            frames: frames::FrameLog::default(),
            out_pool: outpool::OutPool::default(),
            woken: Woken::default(),
            now_ms: clk.mono_ms,
            now_us: clk.mono_us,
            io,
            io_pending: HashMap::new(),
            cursor_dirty: Vec::new(),
            group_cursor_dirty: HashMap::new(),
            cursor_flush_ms: 0,
            pump_retry: Vec::new(),
            next_token: 0,
        }
    }

    fn m(&self) -> &ShardMetrics {
        &self.metrics.shards[self.id]
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Drain finished: every connection is gone, or the drain timeout passed.
    pub fn drained(&self, clk: Clock) -> bool {
        self.draining
            && (self.conns.is_empty()
                || clk.mono_ms >= self.drain_started_ms + self.cfg.server.drain_timeout_ms)
    }

    // ---- connection lifecycle --------------------------------------------------------------

    /// Registers an accepted socket; `None` when the shard is at its connection limit or
    /// draining (the runtime then drops the socket).
    pub fn accept(&mut self, transport: Transport, clk: Clock) -> Option<ConnId> {
        self.set_now(clk);
        self.m()
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.draining {
            return None;
        }
        let l = &self.cfg.limits;
        let conn = Conn {
            link: transport::Link::new(transport),
            phase: Phase::Handshake,
            session: None,
            out: Vec::new(),
            shared: frames::SharedRef::default(),
            out_since_us: 0,
            woken: false,
            out_pooled: false,
            opened_ms: clk.mono_ms,
            last_rx_ms: clk.mono_ms,
            armed_ms: 0,
            closing: None,
            sends: TokenBucket::new(l.send_burst, clk.mono_ms),
            bytes: TokenBucket::new(byte_burst(l), clk.mono_ms),
        };
        match self.conns.insert(conn) {
            Ok(id) => {
                self.m()
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.arm(id, clk.mono_ms + self.cfg.limits.handshake_timeout_ms);
                tracing::debug!(shard = self.id, conn = ?id, ?transport, "accepted");
                Some(id)
            }
            Err(_) => {
                self.m().close(CloseReason::Limit);
                None
            }
        }
    }

    /// Moves the connections that have new output (or a close to carry out) since the last
    /// call into `into`, each once.
    pub fn take_woken(&mut self, into: &mut Vec<ConnId>) {
        for id in self.woken.ids.drain(..) {
            if let Some(c) = self.conns.get_mut(id) {
                if std::mem::take(&mut c.woken) {
                    into.push(id);
                }
            }
        }
    }

    /// Connections wait in [`Shard::take_woken`].
    pub fn has_woken(&self) -> bool {
        !self.woken.ids.is_empty()
    }

    /// Wakes the runtime's connection driver (a drain began: it closes its listeners).
    pub fn wake_driver(&self) {
        if let Some(w) = &self.woken.driver {
            w.wake_by_ref();
        }
    }

    /// The runtime's connection driver parks with this waker; the first connection listed in
    /// [`Shard::take_woken`] wakes it.
    pub fn set_driver_waker(&mut self, waker: &Waker) {
        match &self.woken.driver {
            Some(w) if w.will_wake(waker) => {}
            _ => self.woken.driver = Some(waker.clone()),
        }
    }

    /// Output waiting for `id`, to be written by the runtime ([`Shard::wrote`] says how
    /// much was).
    pub fn output(&self, id: ConnId) -> Option<Output<'_>> {
        self.conns.get(id).map(|c| Output {
            shared: self.frames.bytes(&c.shared),
            own: &c.out,
        })
    }

    /// Records `n` bytes written from the front of the output and releases an emptied buffer
    /// (`now_us`: the monotonic clock, for the `output_wait` stage).
    pub fn wrote(&mut self, id: ConnId, n: usize, now_us: u64) {
        let m = &self.metrics.shards[self.id];
        if let Some(c) = self.conns.get_mut(id) {
            let from_shared = n.min(c.shared.len());
            if from_shared > 0 {
                self.frames.consume(&mut c.shared, from_shared);
            }
            let own = n - from_shared;
            if own > 0 {
                c.out.drain(..own.min(c.out.len()));
                if c.out.is_empty() {
                    // An idle connection keeps no output buffer: the pool keeps it for the next.
                    self.out_pool.release(&mut c.out, &mut c.out_pooled);
                }
            }
            if c.out.is_empty() && c.shared.is_empty() && c.out_since_us != 0 {
                let waited = (now_us as u32).wrapping_sub(c.out_since_us);
                m.stages[Stage::OutputWait as usize].record_us(u64::from(waited));
                c.out_since_us = 0;
            }
            m.bytes_out
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            m.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The connection has not said `hello` yet.
    pub fn awaits_hello(&self, id: ConnId) -> bool {
        self.conns
            .get(id)
            .is_some_and(|c| c.phase == Phase::Handshake)
    }

    /// The connection should be closed now: its closing output is flushed (or it is gone).
    pub fn should_close(&self, id: ConnId) -> bool {
        match self.conns.get(id) {
            Some(c) => c.closing.is_some() && c.out.is_empty() && c.shared.is_empty(),
            None => true,
        }
    }

    /// The connection is closing and its flush deadline ([`CLOSE_FLUSH_MS`]) has passed: the
    /// runtime closes it even if bytes below the shard (TLS records) are still unsent.
    pub fn close_overdue(&self, id: ConnId) -> bool {
        self.conns
            .get(id)
            .is_none_or(|c| c.closing.is_some() && self.now_ms >= c.last_rx_ms + CLOSE_FLUSH_MS)
    }

    /// The connection wants no more input (closing).
    pub fn is_closing(&self, id: ConnId) -> bool {
        self.conns.get(id).is_none_or(|c| c.closing.is_some())
    }

    /// Asks for `id` to be closed after its output is flushed; if that takes longer than
    /// [`CLOSE_FLUSH_MS`] the output is dropped and the socket closed anyway.
    fn close(&mut self, id: ConnId, reason: CloseReason) {
        let now = self.now_ms;
        if let Some(c) = self.conns.get_mut(id) {
            if c.closing.is_none() {
                c.closing = Some(reason);
                // While closing, `last_rx_ms` marks when the close began.
                c.last_rx_ms = now;
                self.woken.conn(c, id);
                self.arm(id, now + CLOSE_FLUSH_MS);
            }
        }
    }

    /// The socket is gone (closed by us after [`Shard::should_close`], or by the peer):
    /// releases everything the connection held.
    pub fn remove(&mut self, id: ConnId) {
        let Some(mut conn) = self.conns.remove(id) else {
            return;
        };
        self.frames.release(&mut conn.shared);
        let reason = conn.closing.unwrap_or(CloseReason::Peer);
        let m = &self.metrics.shards[self.id];
        m.close(reason);
        m.connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(shard = self.id, conn = ?id, reason = reason.name(), "closed");
        if let Some(s) = conn.session {
            if let Some(w) = &s.window {
                self.fail_window(w);
            }
            // The device's last ack is written now, not at the next flush, and the group
            // cursors pending on this shard with it (its user may log in elsewhere next).
            self.write_cursor_now(&s);
            if !self.group_cursor_dirty.is_empty() {
                self.flush_cursors();
            }
            let m = &self.metrics.shards[self.id];
            m.authenticated
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            m.tenant(&s.user.tenant, -1, 0);
            self.metrics.tenants_shared.release(&s.user.tenant);
            self.presence_event(
                &s.user,
                &s.device,
                id,
                crate::services::redis::PresenceKind::Down,
            );
            let route = self.route(id);
            for target in s.subs.into_iter().flat_map(|v| *v) {
                let dest = self.owner(&target);
                self.post_always(
                    dest,
                    ShardMsg::Unsubscribe {
                        target,
                        subscriber: route,
                    },
                );
            }
            let dest = self.owner(&s.user);
            self.post_always(
                dest,
                ShardMsg::Unregister {
                    user: s.user,
                    route,
                },
            );
        }
    }

    fn route(&self, conn: ConnId) -> Route {
        Route {
            shard: self.id as u16,
            conn,
        }
    }

    fn owner(&self, u: &UserKey) -> usize {
        owner_shard(&u.tenant, &u.user, self.shards)
    }

    // ---- timers ----------------------------------------------------------------------------

    fn arm(&mut self, id: ConnId, deadline_ms: u64) {
        if let Some(c) = self.conns.get_mut(id) {
            if c.armed_ms == 0 || deadline_ms < c.armed_ms {
                c.armed_ms = deadline_ms;
                self.wheel.insert(deadline_ms, id);
            }
        }
    }

    /// Advances the timer wheel: closes connections past their handshake or idle deadline.
    pub fn tick(&mut self, clk: Clock) {
        self.set_now(clk);
        self.out_pool.sweep(clk.mono_ms);
        self.frames.sweep(clk.mono_ms);
        self.flush_group_here();
        if !self.pump_retry.is_empty() {
            self.retry_pumps();
        }
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(clk.mono_ms, &mut due);
        for (fired, id) in due.drain(..) {
            let l = &self.cfg.limits;
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.armed_ms != fired {
                // Superseded by an earlier deadline armed later.
                continue;
            }
            c.armed_ms = 0;
            let deadline = match (c.closing, c.phase) {
                // A closing connection that could not flush in time is dropped by the runtime.
                (Some(_), _) => c.last_rx_ms + CLOSE_FLUSH_MS,
                (None, Phase::Handshake) => c.opened_ms + l.handshake_timeout_ms,
                (None, _) => c.last_rx_ms + l.idle_timeout_ms,
            };
            if clk.mono_ms < deadline {
                // Not idle: resend what is due and wake again at the earliest deadline.
                let next = match self.retransmit_due(id, clk) {
                    Some(rt) => rt.min(deadline),
                    None => deadline,
                };
                if self.conns.get(id).is_some_and(|c| c.closing.is_none()) {
                    self.arm(id, next);
                }
                continue;
            }
            match (c.closing, c.phase) {
                (Some(_), _) => {
                    // Give up on flushing: drop the output so the runtime closes now.
                    drop_output(c, &mut self.frames);
                    self.woken.conn(c, id);
                }
                (None, Phase::Handshake) => {
                    if c.link.is_tcp() {
                        self.reply_error(id, None, ErrorCode::HandshakeTimeout, "no hello in time");
                    }
                    self.close(id, CloseReason::HandshakeTimeout);
                }
                (None, _) => {
                    self.goaway(id, "idle", 0);
                    self.close(id, CloseReason::Idle);
                }
            }
        }
        self.due = due;
        if clk.mono_ms >= self.cursor_flush_ms {
            self.cursor_flush_ms = clk.mono_ms + delivery::CURSOR_FLUSH_MS;
            self.flush_cursors();
        }
        let m = &self.metrics.shards[self.id];
        m.timers.store(
            self.wheel.len() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Starts the graceful drain: `goaway` to every connection with a spread reconnect hint,
    /// then close each once flushed. New connections are refused from now on.
    pub fn start_drain(&mut self, clk: Clock) {
        if self.draining {
            return;
        }
        self.set_now(clk);
        self.draining = true;
        self.drain_started_ms = clk.mono_ms;
        let spread = self.cfg.server.drain_reconnect_spread_ms.max(1);
        for (i, id) in self.conns.ids().into_iter().enumerate() {
            let phase = self.conns.get(id).map(|c| c.phase);
            if phase == Some(Phase::Active) {
                // Deterministic spread: connection i reconnects after i * k mod spread.
                let hint = (i as u64).wrapping_mul(7_919) % spread;
                self.goaway(id, "drain", hint);
            }
            self.close(id, CloseReason::Drain);
        }
    }

    /// Mints message ids from `mids` from now on (the runtime's, leased in the data
    /// directory: see [`crate::ids`]).
    pub fn set_mid_mint(&mut self, mids: MidMint) {
        self.mids = mids;
    }

    /// The time of the input being handled (deadlines and stamps set while handling it).
    fn set_now(&mut self, clk: Clock) {
        self.now_ms = clk.mono_ms;
        self.now_us = clk.mono_us;
    }

    // ---- output ----------------------------------------------------------------------------

    /// Encodes `env` onto `id`'s output in its codec and transport, and wakes its task.
    fn emit(&mut self, id: ConnId, env: &Envelope) {
        let max_out = self.cfg.limits.max_outbound_bytes as usize;
        let m = &self.metrics.shards[self.id];
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        self.out_pool.fill(&mut c.out, &mut c.out_pooled);
        if c.link.encode_onto(&mut c.out, env)
            && queued(c, id, &mut self.woken, m, env, self.now_us, max_out)
        {
            self.close_slow(id);
        }
    }

    /// [`Shard::emit`] of one envelope to many connections (a group message, a presence
    /// change, a user's devices): encoded once per transport and codec in use and appended
    /// once to the shard's frame log; a connection with nothing of its own queued takes (or
    /// extends) a range of it, the others get the bytes copied (frames.rs).
    fn emit_many(&mut self, ids: &[ConnId], env: &Envelope) {
        const PREFETCH_SLOT_AHEAD: usize = 8;
        const PREFETCH_OUT_AHEAD: usize = 4;
        if let [id] = ids {
            return self.emit(*id, env);
        }
        let max_out = self.cfg.limits.max_outbound_bytes as usize;
        let mut encoded = std::mem::take(&mut self.encoded);
        encoded.clear();
        let mut shared_n = 0u64;
        for (k, &id) in ids.iter().enumerate() {
            // The members' slots (and the output buffers of those that have one) are cold
            // (thousands of them between two messages): ask for them a few members ahead, the
            // slot first, then (once the slot is in) the end of its output buffer.
            if let Some(&ahead) = ids.get(k + PREFETCH_SLOT_AHEAD) {
                self.conns.prefetch(ahead);
            }
            if let Some(c) = ids
                .get(k + PREFETCH_OUT_AHEAD)
                .and_then(|a| self.conns.get(*a))
            {
                if c.out.capacity() > 0 {
                    slab::prefetch(c.out.as_ptr().wrapping_add(c.out.len()));
                }
            }
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            let Some(key) = c.link.encoding() else {
                continue;
            };
            let (frame, shared) = match encoded.iter().position(|(k, ..)| *k == key) {
                Some(i) => (&encoded[i].1, encoded[i].2),
                None => {
                    let mut frame = Vec::new();
                    if !c.link.encode_onto(&mut frame, env) {
                        continue;
                    }
                    let shared = self.frames.append(key, &frame);
                    encoded.push((key, frame, shared));
                    let last = &encoded[encoded.len() - 1];
                    (&last.1, last.2)
                }
            };
            // A frame joins the connection's range only while nothing of its own is queued:
            // its output is the range, then its own bytes, in the order they were queued.
            match shared {
                Some(r) if c.out.is_empty() && c.shared.is_empty() => {
                    self.frames.attach(&mut c.shared, r);
                    shared_n += 1;
                }
                Some(r) if c.out.is_empty() && frames::FrameLog::extend(&mut c.shared, r) => {
                    shared_n += 1;
                }
                _ => {
                    self.out_pool.fill(&mut c.out, &mut c.out_pooled);
                    c.out.extend_from_slice(frame);
                }
            }
            let m = &self.metrics.shards[self.id];
            if queued(c, id, &mut self.woken, m, env, self.now_us, max_out) {
                self.close_slow(id);
            }
        }
        encoded.clear();
        self.encoded = encoded;
        self.metrics.shards[self.id]
            .frames_shared
            .fetch_add(shared_n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The client does not read ([`queued`] said so): drops what is queued for it and closes
    /// the connection (slow consumer).
    fn close_slow(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            drop_output(c, &mut self.frames);
        }
        self.close(id, CloseReason::SlowConsumer);
    }

    fn reply_error(&mut self, id: ConnId, reference: Option<u64>, code: ErrorCode, message: &str) {
        let env = Envelope {
            reference,
            msg: Message::Error(crate::protocol::Error {
                code,
                message: Str::from(message),
                cmid: None,
                retry_after_ms: None,
            }),
        };
        self.emit(id, &env);
    }

    fn goaway(&mut self, id: ConnId, reason: &'static str, reconnect_ms: u64) {
        let env = Envelope::new(Message::Goaway(crate::protocol::Goaway {
            reason: Str::from_static(reason),
            reconnect_ms,
        }));
        self.emit(id, &env);
        if let Some(c) = self.conns.get_mut(id) {
            c.link.write_going_away(&mut c.out, reason);
        }
    }

    // ---- cross-shard -----------------------------------------------------------------------

    /// Queues a message for shard `dest` (our own index: the local queue). `false` when the
    /// outbox is full: the caller sheds the work with `overloaded`.
    fn post(&mut self, dest: usize, msg: ShardMsg) -> bool {
        if self.outbox_len >= self.cfg.limits.shard_outbox_max as usize {
            self.m()
                .cross_shard_shed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        self.post_always(dest, msg);
        true
    }

    /// Like [`Shard::post`], for bookkeeping that must not be lost (unregister, unsubscribe):
    /// goes past the bound, which is why only cleanup uses it.
    fn post_always(&mut self, dest: usize, msg: ShardMsg) {
        if self.outbox[dest].is_empty() {
            self.outbox_since_us[dest] = self.now_us;
        }
        self.outbox[dest].push(msg);
        self.outbox_len += 1;
        if let Some(w) = &self.outbox_waker {
            w.wake_by_ref();
        }
    }

    /// The runtime's flusher parks with this waker; new outbox entries wake it.
    pub fn set_outbox_waker(&mut self, waker: &Waker) {
        match &self.outbox_waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.outbox_waker = Some(waker.clone()),
        }
    }

    /// Takes the batch queued for `dest` (empty if none).
    pub fn take_batch(&mut self, dest: usize) -> Batch {
        let next = if dest == self.id {
            std::mem::take(&mut self.local_spare)
        } else {
            Vec::new()
        };
        let msgs = std::mem::replace(&mut self.outbox[dest], next);
        let batch = Batch {
            posted_us: std::mem::take(&mut self.outbox_since_us[dest]),
            msgs,
        };
        self.outbox_len -= batch.msgs.len();
        if !batch.msgs.is_empty() && dest != self.id {
            self.m().cross_shard_sent.fetch_add(
                batch.msgs.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.m()
            .outbox_depth
            .store(self.outbox_len as i64, std::sync::atomic::Ordering::Relaxed);
        batch
    }

    /// Puts back a batch the channel refused (full): it goes first next time.
    pub fn return_batch(&mut self, dest: usize, mut batch: Batch) {
        self.outbox_len += batch.msgs.len();
        batch.msgs.append(&mut self.outbox[dest]);
        self.outbox[dest] = batch.msgs;
        self.outbox_since_us[dest] = batch.posted_us;
    }

    /// Messages for this shard itself wait in its outbox.
    pub fn has_local_batch(&self) -> bool {
        !self.outbox[self.id].is_empty()
    }

    /// How many messages for this shard itself wait in its outbox.
    pub fn local_batch_len(&self) -> usize {
        self.outbox[self.id].len()
    }

    /// Handles what this shard posted to itself, batch by batch, at most `rounds` batches: a
    /// message may post the next step to the same shard (a `hello`'s `Register` to its owner,
    /// then `Registered` back to the connection), and each round takes the batch the last one
    /// made. What is left waits for the runtime's flusher, woken when it was posted.
    pub fn run_local(&mut self, clk: Clock, rounds: usize) {
        for _ in 0..rounds {
            let mut local = self.take_batch(self.id);
            if local.msgs.is_empty() {
                self.keep_spare_local(local.msgs);
                return;
            }
            self.on_batch_drain(&mut local, clk);
            self.keep_spare_local(local.msgs);
        }
    }

    /// Keeps an emptied local batch's list for the next one, unless it grew past
    /// [`SPARE_MAX`] (a burst's) or one is kept already.
    fn keep_spare_local(&mut self, msgs: Vec<ShardMsg>) {
        debug_assert!(msgs.is_empty());
        if msgs.capacity() <= SPARE_MAX && self.local_spare.capacity() == 0 {
            self.local_spare = msgs;
        }
    }

    /// An empty list for the directory's effects (the last one's, kept by [`Shard::apply`]).
    fn take_fx(&mut self) -> Vec<owner::Effect> {
        std::mem::take(&mut self.fx_spare)
    }

    pub fn has_outbox(&self) -> bool {
        self.outbox_len > 0
    }

    pub fn shard_count(&self) -> usize {
        self.shards
    }
}

/// Bookkeeping after a frame was queued on `c`'s output: counts it, stamps when the output
/// started waiting, lists the connection for the driver. True when the unread output (its
/// shared range and its own bytes) passed `max_out`: the caller closes the connection with
/// [`Shard::close_slow`].
fn queued(
    c: &mut Conn,
    id: ConnId,
    woken: &mut Woken,
    m: &ShardMetrics,
    env: &Envelope,
    now_us: u64,
    max_out: usize,
) -> bool {
    m.frame_out(env.msg.op(), c.link.codec());
    if c.out_since_us == 0 {
        c.out_since_us = (now_us as u32).max(1);
    }
    if let Message::Error(e) = &env.msg {
        m.error(e.code);
    }
    woken.conn(c, id);
    c.out.len() + c.shared.len() > max_out && c.closing.is_none()
}

/// Drops what is queued for `c`, its shared range included.
fn drop_output(c: &mut Conn, frames: &mut frames::FrameLog) {
    c.out = Vec::new();
    c.out_pooled = false;
    frames.release(&mut c.shared);
}

/// The connections the runtime has to service because the shard gave them output or a close
/// (each listed once until [`Shard::take_woken`] takes them, so at most one entry per
/// connection, plus those removed since), and the waker of the runtime's driver, woken when
/// the list stops being empty.
#[derive(Default)]
struct Woken {
    ids: Vec<ConnId>,
    driver: Option<Waker>,
}

impl Woken {
    fn conn(&mut self, c: &mut Conn, id: ConnId) {
        if c.woken {
            return;
        }
        c.woken = true;
        if self.ids.is_empty() {
            if let Some(w) = &self.driver {
                w.wake_by_ref();
            }
        }
        self.ids.push(id);
    }
}

/// Messages from one shard to another (or to itself), handed over together.
#[derive(Debug, Default)]
pub struct Batch {
    /// When the first of them was posted (µs on the process-wide monotonic clock).
    pub posted_us: u64,
    pub msgs: Vec<ShardMsg>,
}

#[cfg(test)]
mod tests;
