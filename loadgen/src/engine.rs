//! One loadgen thread: it owns a slice of the worker's connections and runs them all on one
//! event loop (non-blocking sockets under epoll, a timerfd for microsecond deadlines).
//!
//! The loop connects its connections (blocking connect + upgrade + `hello`, one at a time,
//! at the ramp rate), waits for `go`, then sends on the open-loop [`Schedule`], reads
//! whatever is readable, answers and sends heartbeats, acks deliveries, and every second
//! reports a [`Tick`]. After the run it waits out the grace period (ending early once every
//! conversation is settled) and reports a [`Final`].
//!
//! Why one loop per thread rather than a sender thread and reader threads: the blocking client
//! needs `&mut` for both directions, so splitting them would put a lock on every message. One
//! owner per connection keeps it lock-free; several threads (`--threads`) and processes
//! (`--workers`) scale it out, each with a phase-shifted slice of the schedule.
//!
//! Every message carries its conversation, sequence number and intended send time in its
//! body (`conv:seq:intended_us:` then padding) and its `cmid` (`conv:seq:intended_us`).
//! Sender and receiver of a conversation live in the same thread, so the intended time is on
//! the same clock as the receive time, and integrity is checked without any coordination.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use imgw::client::{Client, ClientConfig, ClientError};
use imgw::protocol::{
    Ack, Envelope, Ext, GroupJoin, Hello, Message, Ping, Pong, Resume, Send, Str, Sync, Target,
};

use crate::config::{HelloVia, Plan, Protocol, Scenario, ThreadShare, MIN_PAYLOAD};
use crate::hist::Hist;
use crate::integrity::{ConvTrack, Delivery, SharedAcks};
use crate::peer::{PeerConn, PeerError, Received};
use crate::poller::Poller;
use crate::schedule::Schedule;
use crate::stats::{Counters, Final, ServerLimits, Stage, Tick};

const SECOND_US: u64 = 1_000_000;
/// Most overdue sends taken before looking at the sockets again.
const SEND_BURST: usize = 256;
/// Group fan-out: members ack on a sweep every `plan.group_ack_ms` (the SDK's
/// `groupAckDelayMs`), not per delivery: a group ack only moves the member's cursor.
/// The sweep runs in this many slices spread over its interval, each acking its share of
/// the connections: acking all of them at once would hold the publisher's schedule back
/// for the thousands of writes (about 10 ms for 2,000 connections), and that lateness
/// would count against the server (latency is taken from the intended send time).
const ACK_SWEEP_SLICES: u64 = 20;
/// How often the grace period checks whether every conversation is settled.
const SETTLE_CHECK_US: u64 = 10_000;
/// Notes (shown live) per thread at most; later ones only count in the error map.
const MAX_NOTES: usize = 8;

/// The worker's clock and its go/abort signals, shared by its threads.
pub struct Shared {
    origin: Instant,
    /// Microseconds on the clock when `go` arrived; `u64::MAX` before.
    go_us: AtomicU64,
    /// Stop at once (the coordinator went away).
    pub abort: AtomicBool,
    /// End the run now and report (the user interrupted the coordinator).
    pub stop: AtomicBool,
    /// Reconnect storms asked for so far (`loadgen chaos`): each makes every thread drop
    /// all its connections at once; `--reconnect` brings them back.
    pub storms: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            origin: Instant::now(),
            go_us: AtomicU64::new(u64::MAX),
            abort: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            storms: AtomicU64::new(0),
        }
    }

    /// Microseconds since the worker started.
    pub fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    pub fn go(&self) {
        let _ = self.go_us.compare_exchange(
            u64::MAX,
            self.now_us(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    fn go_us(&self) -> Option<u64> {
        match self.go_us.load(Ordering::SeqCst) {
            u64::MAX => None,
            t => Some(t),
        }
    }
}

/// What a thread tells its worker.
#[allow(clippy::large_enum_variant)] // a few per second
pub enum ThreadMsg {
    Tick(usize, Tick),
    Ready(u64, ServerLimits),
    Final(usize, Final),
}

struct Conn {
    client: Option<Client>,
    /// The connection when the protocol is a peer's (nats, plainws).
    peer: Option<PeerConn>,
    user: Str,
    /// Highest `inbox_seq` delivered, and the highest acked to the server.
    ack_to: u64,
    acked_to: u64,
    /// A heartbeat for this connection is in the queue.
    ping_armed: bool,
    /// Offline-sync: reconnect with `hello.resume` from this inbox sequence.
    resume: Option<u64>,
    /// The target this connection uses (`Plan::target_at`); the next one after a reconnect.
    target: u64,
    /// `--reconnect`: sends not yet acked or refused, in send order, resent with the same
    /// cmid after a reconnect. At most `MAX_PENDING_SENDS`; a sender with that many
    /// unanswered stops sending until answers come (counted as skipped).
    pending: VecDeque<PendingSend>,
    /// Group fan-out: the member's view of the group timeline.
    timeline: GroupView,
}

/// `--reconnect`: one send not yet answered.
struct PendingSend {
    /// The conversation (1:1) or the publisher (group fan-out) it belongs to.
    key: usize,
    seq: u64,
    cmid: Str,
    body: Str,
    to: Target,
}

/// A group member's view of the timeline, as a client shows it: each `gseq` once and in
/// order. A push that overtakes a gap (a member catching up with `sync {group}` after a
/// reconnect gets live pushes meanwhile) waits in `held` until the gap is filled.
#[derive(Default)]
struct GroupView {
    /// The last `gseq` shown: every one up to it was shown (groups are new per run, so the
    /// timeline starts at 1).
    shown: u64,
    /// Deliveries past a gap: `gseq` -> (publisher tag, sequence, intended time).
    held: BTreeMap<u64, (usize, u64, u64)>,
}

/// Deliveries a member holds back behind a gap at most; beyond it the gap is given up (its
/// messages count as lost unless they arrive later) and the held ones are shown.
const MAX_HELD: usize = 65_536;
/// Page size of the `sync {group}` a member sends after a reconnect (the server's default
/// `limits.max_sync_limit`).
const GROUP_SYNC_LIMIT: u32 = 500;

/// `--reconnect`: unanswered sends one connection keeps for resending.
const MAX_PENDING_SENDS: usize = 4_096;
/// `--reconnect`: the wait before reconnecting a closed connection, and between attempts.
const RECONNECT_DELAY_US: u64 = 100_000;

impl Conn {
    fn alive(&self) -> bool {
        self.client.is_some() || self.peer.is_some()
    }
}

struct Conv {
    from: usize,
    to: usize,
    track: ConvTrack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connect,
    Ready,
    Run,
    Grace,
    Done,
}

pub struct Engine<'a> {
    plan: &'a Plan,
    share: ThreadShare,
    shared: &'a Shared,
    tx: Sender<ThreadMsg>,
    cfg: ClientConfig,
    /// The TLS client for `wss://` and `tls://` targets.
    tls: Option<imgw::client::TlsClient>,
    poller: Poller,
    ready: Vec<u64>,
    conns: Vec<Conn>,
    convs: Vec<Conv>,
    /// Fanout: the conversations of each publisher.
    publishers: Vec<Vec<usize>>,
    /// Pub/sub fanout: each publisher's acknowledgements, taken into its conversations by
    /// [`Engine::merge_pub_acks`].
    pub_acks: Vec<SharedAcks>,
    phase: Phase,
    // Connecting.
    next_connect: usize,
    connect_sched: Option<Schedule>,
    setup_deadline_us: u64,
    first_attempt_us: Option<u64>,
    last_hello_us: u64,
    connected: u64,
    // Running.
    sched: Schedule,
    run_end_us: u64,
    grace_end_us: u64,
    next_settle_check_us: u64,
    // Heartbeats.
    hb_us: u64,
    pings: BinaryHeap<Reverse<(u64, usize)>>,
    // Reporting.
    stage: Stage,
    tick_k: u32,
    next_tick_us: u64,
    tick_base: Counters,
    tick_latency: Hist,
    tick_handshake: Hist,
    notes: Vec<String>,
    notes_sent: usize,
    c: Counters,
    fin: Final,
    open: u64,
    body: String,
    /// Fanout: one publish per event to a group or topic (not one send per subscriber).
    pubsub: bool,
    /// Peer reads: the thread's read buffer and what a read completed.
    scratch: Vec<u8>,
    rx: Received,
    /// Offline-sync: 0 before, 1 offline, 2 back; the next pair to reconnect.
    offline_state: u8,
    offline_next: usize,
    go_us: Option<u64>,
    /// Mixed: reconnections of the idle half.
    churn_sched: Option<Schedule>,
    next_ack_sweep_us: u64,
    /// The next connection the ack sweep looks at.
    ack_sweep_next: usize,
    /// `--reconnect`: connections to reconnect, with when (in order of when).
    reconnect_due: VecDeque<(u64, usize)>,
    reconnects: u64,
    /// Reconnect storms handled (`Shared::storms`).
    storms_seen: u64,
}

impl<'a> Engine<'a> {
    pub fn new(
        plan: &'a Plan,
        share: ThreadShare,
        shared: &'a Shared,
        tx: Sender<ThreadMsg>,
    ) -> Result<Engine<'a>, String> {
        let codec = plan.codec()?;
        let mut cfg = ClientConfig::new(plan.target.transport, codec, plan.target.addr);
        cfg.ws_path = plan.target.ws_path.clone();
        let tls = plan.tls_client()?;
        cfg.read_timeout = Duration::from_micros(plan.connect_timeout_us.max(1000));
        let poller = Poller::new().map_err(|e| format!("epoll: {e}"))?;
        let unit = plan.unit_size();
        let n = (share.units * unit + share.lone) as usize;
        let conns: Vec<Conn> = (0..n)
            .map(|i| Conn {
                client: None,
                peer: None,
                user: Str::from(format!(
                    "{}{}",
                    plan.user_prefix,
                    share.first_conn + i as u64
                )),
                ack_to: 0,
                acked_to: 0,
                ping_armed: false,
                resume: None,
                target: share.first_conn + i as u64,
                pending: VecDeque::new(),
                timeline: GroupView::default(),
            })
            .collect();
        let mut convs = Vec::new();
        let mut publishers = Vec::new();
        for u in 0..share.units as usize {
            let base = u * unit as usize;
            match plan.scenario {
                // Mixed: only the first half of the pairs chat.
                Scenario::Mixed if u >= (share.units as usize).div_ceil(2) => {}
                Scenario::Chat | Scenario::OfflineSync | Scenario::Mixed => {
                    convs.push(Conv {
                        from: base,
                        to: base + 1,
                        track: ConvTrack::default(),
                    });
                    convs.push(Conv {
                        from: base + 1,
                        to: base,
                        track: ConvTrack::default(),
                    });
                }
                Scenario::Fanout => {
                    let mut mine = Vec::new();
                    for s in 1..unit as usize {
                        mine.push(convs.len());
                        convs.push(Conv {
                            from: base,
                            to: base + s,
                            track: ConvTrack::default(),
                        });
                    }
                    publishers.push(mine);
                }
                _ => {}
            }
        }
        let fin = Final {
            planned: n as u64,
            ..Final::default()
        };
        Ok(Engine {
            plan,
            share,
            shared,
            tx,
            cfg,
            tls,
            poller,
            ready: Vec::with_capacity(256),
            conns,
            convs,
            pub_acks: vec![SharedAcks::default(); publishers.len()],
            publishers,
            phase: Phase::Connect,
            next_connect: 0,
            connect_sched: None,
            setup_deadline_us: u64::MAX,
            first_attempt_us: None,
            last_hello_us: 0,
            connected: 0,
            sched: Schedule::new(0, 0.0, 0.0, 0),
            run_end_us: u64::MAX,
            grace_end_us: u64::MAX,
            next_settle_check_us: 0,
            hb_us: 0,
            pings: BinaryHeap::new(),
            stage: Stage::Setup,
            tick_k: 0,
            next_tick_us: 0,
            tick_base: Counters::default(),
            tick_latency: Hist::new(),
            tick_handshake: Hist::new(),
            notes: Vec::new(),
            notes_sent: 0,
            c: Counters::default(),
            fin,
            open: 0,
            body: String::new(),
            pubsub: plan.scenario == Scenario::Fanout
                && (plan.group || plan.protocol != Protocol::Imgw),
            scratch: if plan.protocol == Protocol::Imgw {
                Vec::new()
            } else {
                vec![0; 64 * 1024]
            },
            rx: Received::default(),
            offline_state: 0,
            offline_next: 0,
            go_us: None,
            churn_sched: None,
            next_ack_sweep_us: 0,
            ack_sweep_next: 0,
            reconnect_due: VecDeque::new(),
            reconnects: 0,
            storms_seen: 0,
        })
    }

    fn now(&self) -> u64 {
        self.shared.now_us()
    }

    /// Runs the thread's whole life: connect, wait for go, run, grace, report.
    pub fn run(mut self) {
        let start = self.now();
        self.setup_deadline_us = start.saturating_add(self.plan.setup_timeout_us);
        self.connect_sched = (self.share.ramp > 0.0)
            .then(|| Schedule::new(start, self.share.ramp, self.share.phase, u64::MAX));
        self.tick_k = (start / SECOND_US) as u32;
        self.next_tick_us = (u64::from(self.tick_k) + 1) * SECOND_US;
        if self.conns.is_empty() {
            self.enter_ready();
        }
        while self.phase != Phase::Done {
            if self.shared.abort.load(Ordering::Relaxed) {
                self.note("stopped early: the coordinator closed the control pipe".into());
                break;
            }
            let now = self.now();
            if self.shared.stop.load(Ordering::Relaxed) {
                match self.phase {
                    Phase::Connect | Phase::Ready => {
                        self.note("stopped before the run: interrupted".into());
                        break;
                    }
                    Phase::Run if self.run_end_us > now => self.run_end_us = now,
                    _ => {}
                }
            }
            match self.phase {
                Phase::Connect => self.connect_step(now),
                Phase::Ready => {
                    if let Some(go) = self.shared.go_us() {
                        self.start_run(go);
                    }
                }
                Phase::Run => {
                    let mut burst = 0;
                    while burst < SEND_BURST {
                        let Some((k, intended)) = self.sched.pop_due(now) else {
                            break;
                        };
                        self.send_event(k, intended);
                        burst += 1;
                    }
                    if self.plan.scenario == Scenario::OfflineSync {
                        self.offline_step(now);
                    }
                    self.mixed_churn(now);
                    if now >= self.run_end_us {
                        self.phase = Phase::Grace;
                        self.grace_end_us = self.run_end_us.saturating_add(self.plan.grace_us);
                    }
                }
                Phase::Grace => {
                    if self.plan.scenario == Scenario::OfflineSync {
                        self.offline_step(now);
                    }
                    if now >= self.grace_end_us {
                        self.phase = Phase::Done;
                    } else if now >= self.next_settle_check_us {
                        self.next_settle_check_us = now + SETTLE_CHECK_US;
                        self.merge_pub_acks();
                        if self.convs.iter().all(|c| c.track.settled()) {
                            self.phase = Phase::Done;
                        }
                    }
                }
                Phase::Done => {}
            }
            if matches!(self.phase, Phase::Run | Phase::Grace) {
                self.storm_step();
                self.reconnect_step(now);
            }
            self.heartbeats(now);
            if self.pubsub && self.plan.protocol == Protocol::Imgw && now >= self.next_ack_sweep_us
            {
                self.next_ack_sweep_us = now + self.plan.group_ack_ms * 1000 / ACK_SWEEP_SLICES;
                self.ack_sweep_slice();
            }
            self.ticks(now);
            if self.phase == Phase::Done {
                break;
            }
            let timeout = self.next_wake(now).saturating_sub(self.now());
            self.ready.clear();
            let mut ready = std::mem::take(&mut self.ready);
            if let Err(e) = self.poller.wait(Duration::from_micros(timeout), &mut ready) {
                self.error(format!("epoll_wait: {e}"));
                std::thread::sleep(Duration::from_millis(1));
            }
            for &token in &ready {
                self.read_conn(token as usize);
            }
            self.ready = ready;
        }
        self.finish();
    }

    /// When the loop must look again at the latest.
    fn next_wake(&self, now: u64) -> u64 {
        let mut wake = self.next_tick_us;
        if self.pubsub && self.plan.protocol == Protocol::Imgw {
            wake = wake.min(self.next_ack_sweep_us.max(now + 1));
        }
        if let Some(Reverse((due, _))) = self.pings.peek() {
            wake = wake.min(*due);
        }
        if let Some(&(due, _)) = self.reconnect_due.front() {
            wake = wake.min(due.max(now + 1));
        }
        match self.phase {
            Phase::Connect => wake = wake.min(self.next_connect_due(now)),
            Phase::Ready => wake = wake.min(now + 2_000),
            Phase::Run => {
                wake = wake
                    .min(self.sched.next_due().unwrap_or(self.run_end_us))
                    .min(self.run_end_us);
                if let Some(due) = self.churn_sched.as_ref().and_then(Schedule::next_due) {
                    wake = wake.min(due);
                }
                if let (Some(go), true) = (self.go_us, self.plan.scenario == Scenario::OfflineSync)
                {
                    let d = self.plan.duration_us;
                    wake = match self.offline_state {
                        0 => wake.min(go + d / 3),
                        1 => wake.min((go + 2 * d / 3).max(now + 1)),
                        _ => wake,
                    };
                }
            }
            Phase::Grace => wake = wake.min(self.next_settle_check_us).min(self.grace_end_us),
            Phase::Done => wake = now,
        }
        wake
    }

    // -----------------------------------------------------------------------------------------
    // Connecting.

    fn next_connect_due(&self, now: u64) -> u64 {
        match &self.connect_sched {
            Some(s) => s.due_at(self.next_connect as u64),
            None => now,
        }
    }

    fn connect_step(&mut self, now: u64) {
        if now >= self.setup_deadline_us {
            let left = self.conns.len() - self.next_connect;
            self.limit(format!(
                "setup timeout: {} of {} connections not attempted within {:.0} s",
                left,
                self.conns.len(),
                self.plan.setup_timeout_us as f64 / 1e6
            ));
            self.next_connect = self.conns.len();
        } else if self.next_connect < self.conns.len() && self.next_connect_due(now) <= now {
            let intended = match &self.connect_sched {
                Some(s) => s.due_at(self.next_connect as u64),
                None => now,
            };
            let i = self.next_connect;
            self.next_connect += 1;
            self.connect_one(i, intended);
        }
        if self.next_connect >= self.conns.len() {
            self.enter_ready();
        }
    }

    fn connect_one(&mut self, i: usize, intended: u64) {
        if self.plan.protocol != Protocol::Imgw {
            self.connect_peer(i, intended);
            return;
        }
        let start = self.now();
        self.first_attempt_us.get_or_insert(start);
        let worker_index = self.share.first_conn - self.plan.first_conn + i as u64;
        let mut cfg = self.cfg.clone();
        let target = self.plan.target_at(self.conns[i].target);
        (cfg.transport, cfg.addr) = (target.transport, target.addr);
        cfg.ws_path.clone_from(&target.ws_path);
        cfg.tls = if target.tls { self.tls.clone() } else { None };
        let token = self
            .plan
            .token(self.share.first_conn + i as u64, &self.conns[i].user);
        let hello = Hello {
            resume: self.conns[i].resume.map(|seq| Resume { inbox_seq: seq }),
            ..Hello::new(&token, "lg")
        };
        let source = self.plan.source(worker_index);
        let res = match self.plan.hello_via {
            HelloVia::WithUpgrade => Client::connect_hello(&cfg, source, hello),
            HelloVia::InUrl => Client::connect_url_hello(&cfg, source, hello),
            HelloVia::AfterUpgrade => match source {
                Some(ip) => Client::connect_from(&cfg, ip),
                None => Client::connect(&cfg),
            }
            .and_then(|mut client| {
                let welcome = client.hello_with(hello)?;
                Ok((client, welcome))
            }),
        }
        .and_then(|(mut client, welcome)| {
            if let Some(group) = self.group_of(i) {
                let r = client.next_ref();
                let join = Message::GroupJoin(GroupJoin {
                    group: Str::from(group),
                });
                client.send(&Envelope::with_ref(join, r))?;
                let timeout = Duration::from_micros(self.plan.connect_timeout_us.max(1000));
                let reply = client.recv_until(|e| e.reference == Some(r), timeout)?;
                match reply.msg {
                    Message::Ok => {}
                    Message::Error(e) => return Err(ClientError::Refused(e)),
                    other => {
                        return Err(ClientError::Protocol(format!(
                            "group_join answered with {}",
                            other.op().name()
                        )))
                    }
                }
            }
            client.set_nonblocking(true)?;
            Ok((client, welcome))
        });
        let done = self.now();
        match res {
            Ok((client, welcome)) => {
                if let Err(e) = self.poller.add(client.as_raw_fd(), i as u64) {
                    self.connect_failed(&ClientError::Io(e));
                    return;
                }
                if self.fin.server == ServerLimits::default() {
                    self.fin.server = ServerLimits {
                        heartbeat_ms: welcome.heartbeat_ms,
                        sends_per_sec: welcome.limits.sends_per_sec,
                    };
                }
                if self.hb_us == 0 {
                    self.hb_us = self.plan.heartbeat_ms.unwrap_or(welcome.heartbeat_ms) * 1000;
                }
                if self.hb_us > 0 && !self.conns[i].ping_armed {
                    self.conns[i].ping_armed = true;
                    // Spread the first pings over one interval (golden-ratio sequence).
                    let frac = (i as f64 * 0.618_033_988_75).fract();
                    let due = done + 1 + (self.hb_us as f64 * frac) as u64;
                    self.pings.push(Reverse((due, i)));
                }
                self.conns[i].client = Some(client);
                self.open += 1;
                self.connected += 1;
                self.c.connects_ok += 1;
                self.last_hello_us = done;
                let lat = done.saturating_sub(intended.min(start));
                self.fin.handshake.record(lat);
                self.tick_handshake.record(lat);
            }
            Err(e) => self.connect_failed(&e),
        }
    }

    /// The group (imgw) or topic (peers) connection `i` joins or publishes to in pub/sub
    /// fanout: one per publisher, named after the publisher's global connection index.
    fn group_of(&self, i: usize) -> Option<String> {
        if !self.pubsub {
            return None;
        }
        let unit = self.plan.unit_size() as usize;
        let base = i - i % unit;
        if base + unit > self.share.units as usize * unit {
            return None; // a lone connection
        }
        Some(format!(
            "{}t{}",
            self.plan.user_prefix,
            self.share.first_conn + base as u64
        ))
    }

    /// Connects to a peer server; subscribes to what the scenario needs.
    fn connect_peer(&mut self, i: usize, intended: u64) {
        let start = self.now();
        self.first_attempt_us.get_or_insert(start);
        let worker_index = self.share.first_conn - self.plan.first_conn + i as u64;
        let timeout = Duration::from_micros(self.plan.connect_timeout_us.max(1000));
        let topic = match self.plan.scenario {
            Scenario::Chat if i < self.share.units as usize * 2 => {
                Some(self.conns[i].user.to_string())
            }
            Scenario::Fanout => self
                .group_of(i)
                .filter(|_| !i.is_multiple_of(self.plan.unit_size() as usize)),
            _ => None,
        };
        let res = PeerConn::connect(
            self.plan.protocol,
            self.plan.target.addr,
            &self.plan.target.ws_path,
            self.plan.source(worker_index),
            timeout,
        )
        .and_then(|mut c| {
            if let Some(t) = &topic {
                c.subscribe(t, timeout)?;
            }
            c.set_nonblocking(true)?;
            Ok(c)
        });
        let done = self.now();
        match res {
            Ok(c) => {
                if let Err(e) = self.poller.add(c.as_raw_fd(), i as u64) {
                    self.connect_failed(&ClientError::Io(e));
                    return;
                }
                self.conns[i].peer = Some(c);
                self.open += 1;
                self.connected += 1;
                self.c.connects_ok += 1;
                self.last_hello_us = done;
                let lat = done.saturating_sub(intended.min(start));
                self.fin.handshake.record(lat);
                self.tick_handshake.record(lat);
            }
            Err(PeerError::Io(e)) => self.connect_failed(&ClientError::Io(e)),
            Err(PeerError::Timeout) => self.connect_failed(&ClientError::Timeout),
            Err(e) => {
                self.c.connects_failed += 1;
                self.error(format!("connect: {e}"));
            }
        }
    }

    fn connect_failed(&mut self, e: &ClientError) {
        self.c.connects_failed += 1;
        let (key, limit) = classify_connect_error(e);
        self.error(key);
        if let Some(limit) = limit {
            self.limit(format!(
                "{limit} (after {} connections in worker {} thread {})",
                self.connected, self.plan.worker, self.share.index
            ));
            // Later attempts would fail the same way.
            self.next_connect = self.conns.len();
        }
    }

    fn enter_ready(&mut self) {
        if self.phase != Phase::Connect {
            return;
        }
        self.phase = Phase::Ready;
        self.fin.connect_span_us = self
            .first_attempt_us
            .map_or(0, |f| self.last_hello_us.saturating_sub(f));
        let _ = self
            .tx
            .send(ThreadMsg::Ready(self.connected, self.fin.server));
    }

    // -----------------------------------------------------------------------------------------
    // Running.

    fn start_run(&mut self, go: u64) {
        // Close the setup grid up to the second holding `go` (every thread does the same).
        let last_setup = (go / SECOND_US) as u32;
        while self.tick_k <= last_setup {
            self.emit_tick(false);
        }
        self.stage = Stage::Run;
        self.go_us = Some(go);
        self.tick_k = 0;
        self.next_tick_us = go + SECOND_US;
        self.run_end_us = go + self.plan.duration_us;
        let rate = if self.plan.scenario.scheduled() {
            self.share.rate
        } else {
            0.0
        };
        self.sched = Schedule::new(go, rate, self.share.phase, self.run_end_us);
        if self.plan.scenario == Scenario::Mixed
            && self.plan.churn_rate > 0.0
            && self.plan.units > 0
        {
            let r = self.plan.churn_rate * self.share.units as f64 / self.plan.units as f64;
            self.churn_sched = Some(Schedule::new(go, r, self.share.phase, self.run_end_us));
        }
        self.phase = Phase::Run;
    }

    fn send_event(&mut self, k: u64, intended: u64) {
        match self.plan.scenario {
            Scenario::Chat | Scenario::OfflineSync | Scenario::Mixed if !self.convs.is_empty() => {
                let c = (k % self.convs.len() as u64) as usize;
                self.send_conv(c, intended);
            }
            Scenario::Churn if !self.conns.is_empty() => {
                let i = (k % self.conns.len() as u64) as usize;
                self.close_quietly(i);
                self.connect_one(i, intended);
            }
            Scenario::Fanout if !self.publishers.is_empty() && self.pubsub => {
                let p = (k % self.publishers.len() as u64) as usize;
                self.publish_fanout(p, intended);
            }
            Scenario::Fanout if !self.publishers.is_empty() => {
                let p = (k % self.publishers.len() as u64) as usize;
                for j in 0..self.publishers[p].len() {
                    let c = self.publishers[p][j];
                    self.send_conv(c, intended);
                }
            }
            _ => {}
        }
    }

    /// Fills `body` with `tag:seq:intended:` and padding; returns the header's length.
    fn fill_body(&mut self, tag: usize, seq: u64, intended: u64) -> usize {
        self.body.clear();
        let _ = write!(self.body, "{tag}:{seq}:{intended}:");
        let header = self.body.len() - 1;
        let want = self.plan.payload.max(MIN_PAYLOAD);
        while self.body.len() < want {
            self.body.push('x');
        }
        header
    }

    /// Pub/sub fanout: one publish to the publisher's group or topic; every subscriber's
    /// conversation advances by the same sequence number. The body's tag is the publisher's
    /// index in this thread.
    fn publish_fanout(&mut self, p: usize, intended: u64) {
        let first = self.publishers[p][0];
        let from = self.convs[first].from;
        let full = self.plan.reconnect && self.conns[from].pending.len() >= MAX_PENDING_SENDS;
        if !self.conns[from].alive() || full {
            self.c.skipped += self.publishers[p].len() as u64;
            return;
        }
        let seq = self.convs[first].track.next_seq();
        let header = self.fill_body(p, seq, intended);
        let Some(group) = self.group_of(from) else {
            return;
        };
        let res = if let Some(peer) = self.conns[from].peer.as_mut() {
            peer.publish(&group, &self.body).map_err(|e| e.to_string())
        } else if let Some(client) = self.conns[from].client.as_mut() {
            let (to, cmid, body) = (
                Target::Group(Str::from(group)),
                Str::from(&self.body[..header]),
                Str::from(self.body.as_str()),
            );
            let env = Envelope::new(Message::Send(Send {
                to: to.clone(),
                cmid: cmid.clone(),
                kind: None,
                body: body.clone(),
                ext: Ext::new(),
            }));
            let res = client.send(&env).map_err(|e| short_error(&e));
            if res.is_ok() && self.plan.reconnect {
                self.conns[from].pending.push_back(PendingSend {
                    key: p,
                    seq,
                    cmid,
                    body,
                    to,
                });
            }
            res
        } else {
            return;
        };
        match res {
            Ok(()) => {
                let peer = self.plan.protocol != Protocol::Imgw;
                for j in 0..self.publishers[p].len() {
                    let c = self.publishers[p][j];
                    let track = &mut self.convs[c].track;
                    if peer {
                        // No acknowledgement in the peers' protocols: written counts as accepted.
                        track.mark_sent_accepted();
                    } else {
                        track.mark_sent();
                    }
                }
                let n = self.publishers[p].len() as u64;
                self.c.sent += n;
                if peer {
                    self.c.acked += n;
                }
                let now = self.now();
                self.fin.send_lag.record(now.saturating_sub(intended));
            }
            Err(e) => self.drop_conn(from, format!("publish: {e}")),
        }
    }

    fn send_conv(&mut self, c: usize, intended: u64) {
        let (from, to) = (self.convs[c].from, self.convs[c].to);
        // Offline-sync sends to offline users on purpose: they get it when they come back.
        let offline_ok = self.plan.scenario == Scenario::OfflineSync;
        if !self.conns[from].alive() || !(offline_ok || self.conns[to].alive()) {
            self.c.skipped += 1;
            return;
        }
        let seq = self.convs[c].track.next_seq();
        let header = self.fill_body(c, seq, intended);
        if self.conns[from].peer.is_some() {
            let topic = self.conns[to].user.to_string();
            let Some(peer) = self.conns[from].peer.as_mut() else {
                return;
            };
            match peer.publish(&topic, &self.body) {
                Ok(()) => {
                    self.convs[c].track.mark_sent_accepted();
                    self.c.sent += 1;
                    self.c.acked += 1;
                    let now = self.now();
                    self.fin.send_lag.record(now.saturating_sub(intended));
                }
                Err(e) => self.drop_conn(from, format!("publish: {e}")),
            }
            return;
        }
        if self.plan.reconnect && self.conns[from].pending.len() >= MAX_PENDING_SENDS {
            self.c.skipped += 1;
            return;
        }
        let (cmid, body) = (
            Str::from(&self.body[..header]),
            Str::from(self.body.as_str()),
        );
        let to = Target::User(self.conns[to].user.clone());
        let env = Envelope::new(Message::Send(Send {
            to: to.clone(),
            cmid: cmid.clone(),
            kind: None,
            body: body.clone(),
            ext: Ext::new(),
        }));
        let Some(client) = self.conns[from].client.as_mut() else {
            return;
        };
        match client.send(&env) {
            Ok(()) => {
                if self.plan.reconnect {
                    self.conns[from].pending.push_back(PendingSend {
                        key: c,
                        seq,
                        cmid,
                        body,
                        to,
                    });
                }
                self.convs[c].track.mark_sent();
                self.c.sent += 1;
                let now = self.now();
                self.fin.send_lag.record(now.saturating_sub(intended));
            }
            Err(e) => self.drop_conn(from, format!("send: {}", short_error(&e))),
        }
    }

    fn heartbeats(&mut self, now: u64) {
        while let Some(&Reverse((due, i))) = self.pings.peek() {
            if due > now {
                break;
            }
            self.pings.pop();
            let Some(client) = self.conns[i].client.as_mut() else {
                self.conns[i].ping_armed = false;
                continue;
            };
            let ping = Envelope::new(Message::Ping(Ping { ts: now }));
            match client.send(&ping) {
                Ok(()) => {
                    self.c.pings += 1;
                    let next = (due + self.hb_us.max(1000)).max(now + 1);
                    self.pings.push(Reverse((next, i)));
                }
                Err(e) => self.drop_conn(i, format!("ping: {}", short_error(&e))),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Reading.

    fn read_conn(&mut self, i: usize) {
        if self.plan.protocol != Protocol::Imgw {
            self.read_peer(i);
            return;
        }
        // The messages of one read arrived together: one clock read for them all (as the
        // peers' path takes one per read).
        let mut now = None;
        loop {
            let Some(client) = self.conns.get_mut(i).and_then(|c| c.client.as_mut()) else {
                return;
            };
            match client.recv() {
                Ok(env) => {
                    // Level-triggered epoll reports the socket again if more arrived: no read
                    // that would only find it empty.
                    let more = client.has_buffered_input();
                    let at = *now.get_or_insert_with(|| self.now());
                    self.on_message(i, env, at);
                    if !more {
                        break;
                    }
                }
                Err(ClientError::Timeout) => break,
                Err(ClientError::Closed { code, reason }) => {
                    self.c.closed_by_server += 1;
                    let why = match code {
                        Some(code) => format!("closed by server: {code} {reason}"),
                        None => format!("closed by server: {reason}"),
                    };
                    self.drop_conn(i, why);
                    return;
                }
                Err(e @ (ClientError::Decode(_) | ClientError::Protocol(_))) => {
                    self.error(format!("recv: {}", short_error(&e)));
                }
                Err(e) => {
                    self.drop_conn(i, format!("recv: {}", short_error(&e)));
                    return;
                }
            }
        }
        // Group fan-out: the sweep acks (as the SDK's group ack timer); otherwise a cumulative
        // ack after every read.
        if !self.pubsub && self.ack_upto(i) > self.conns[i].acked_to {
            self.send_ack(i);
        }
    }

    /// Acks the next slice of connections (each connection once per `plan.group_ack_ms`).
    fn ack_sweep_slice(&mut self) {
        let n = self.conns.len();
        let per_slice = n.div_ceil(ACK_SWEEP_SLICES as usize).max(1);
        let start = self.ack_sweep_next.min(n);
        let end = (start + per_slice).min(n);
        for i in start..end {
            self.send_ack(i);
        }
        self.ack_sweep_next = if end >= n { 0 } else { end };
    }

    /// What connection `i` would ack: the group timeline shown (group fan-out, `ack
    /// {group}`), else the inbox.
    fn ack_upto(&self, i: usize) -> u64 {
        if self.pubsub {
            self.conns[i].timeline.shown
        } else {
            self.conns[i].ack_to
        }
    }

    /// Takes each pub/sub publisher's acknowledgements into its conversations (before their
    /// settlement or tally is read).
    fn merge_pub_acks(&mut self) {
        for (convs, acks) in self.publishers.iter().zip(&self.pub_acks) {
            for &c in convs {
                self.convs[c].track.merge_acks(acks);
            }
        }
    }

    /// Sends a cumulative `ack` for what connection `i` received, if anything is unacked.
    fn send_ack(&mut self, i: usize) {
        let upto = self.ack_upto(i);
        let group = self.group_of(i).map(Str::from);
        let conn = &mut self.conns[i];
        if self.plan.client_ack && upto > conn.acked_to {
            if let Some(client) = conn.client.as_mut() {
                match client.send(&Envelope::new(Message::Ack(Ack {
                    inbox_seq: upto,
                    group,
                }))) {
                    Ok(()) => conn.acked_to = upto,
                    Err(e) => self.drop_conn(i, format!("ack: {}", short_error(&e))),
                }
            }
        }
    }

    /// Reads what a peer connection has (one read, more only if the buffer filled).
    fn read_peer(&mut self, i: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut rx = std::mem::take(&mut self.rx);
        for _ in 0..8 {
            rx.clear();
            let Some(peer) = self.conns.get_mut(i).and_then(|c| c.peer.as_mut()) else {
                break;
            };
            let res = peer.read_some(&mut scratch, &mut rx);
            let now = self.now();
            for k in 0..rx.spans.len() {
                let (a, b) = rx.spans[k];
                match parse_tag_bytes(&rx.data[a..b]) {
                    Some((tag, seq, intended)) => self.on_data(i, tag, seq, intended, now),
                    None => self.error("deliver: not a loadgen message".into()),
                }
            }
            for note in rx.notes.drain(..) {
                let key = format!("server: {}", note.chars().take(80).collect::<String>());
                self.error(key);
            }
            match res {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    if matches!(e, PeerError::Closed(_)) {
                        self.c.closed_by_server += 1;
                    }
                    self.drop_conn(i, format!("recv: {e}"));
                    break;
                }
            }
        }
        self.scratch = scratch;
        self.rx = rx;
    }

    /// A delivery to connection `i` whose body carries `tag:seq:intended`: the tag is the
    /// conversation, or in pub/sub fanout the publisher's index in this thread.
    fn on_data(&mut self, i: usize, tag: usize, seq: u64, intended: u64, now: u64) {
        let conv = if self.pubsub {
            self.publishers.get(tag).and_then(|convs| {
                let from = self.convs[*convs.first()?].from;
                let s = i.checked_sub(from + 1)?;
                convs.get(s).copied()
            })
        } else {
            Some(tag)
        };
        let Some(c) = conv.filter(|c| self.convs.get(*c).is_some_and(|cv| cv.to == i)) else {
            self.error("deliver: to the wrong connection".into());
            return;
        };
        self.count_delivery(c, seq, intended, now);
    }

    /// Counts a delivery of `seq` in conversation `c` (integrity and latency).
    fn count_delivery(&mut self, c: usize, seq: u64, intended: u64, now: u64) {
        match self.convs[c].track.on_deliver(seq) {
            Delivery::InOrder | Delivery::OutOfOrder => {
                self.c.delivered += 1;
                let lat = now.saturating_sub(intended);
                // The run's histogram takes the second's at each tick (`emit_tick`).
                self.tick_latency.record(lat);
            }
            Delivery::Duplicate => {
                self.c.duplicates += 1;
                self.error("deliver: duplicate".into());
            }
            Delivery::Unknown => self.error("deliver: sequence never sent".into()),
        }
    }

    /// A message read on connection `i` at `now`.
    fn on_message(&mut self, i: usize, env: Envelope, now: u64) {
        match env.msg {
            Message::Deliver(d) => {
                let conn = &mut self.conns[i];
                let group = matches!(d.to, Some(Target::Group(_)));
                if !group && d.inbox_seq > 0 {
                    if d.inbox_seq <= conn.ack_to {
                        // A retransmit of an inbox position already processed (the server
                        // resends until acked): a client drops it by `inbox_seq`.
                        self.c.redelivered += 1;
                        return;
                    }
                    conn.ack_to = d.inbox_seq;
                }
                if matches!(d.to, Some(Target::User(_))) && *d.from == *conn.user {
                    // This user's own message, as its inbox holds it for its devices
                    // (`server.sync_sent`): acked with the rest, not a delivery to count.
                    return;
                }
                let Some((c, seq, intended)) = parse_tag(&d.body) else {
                    self.error("deliver: not a loadgen message".into());
                    return;
                };
                if self.pubsub {
                    if *d.from == *self.conns[i].user {
                        // The publisher's own group message (not a delivery to count).
                        return;
                    }
                    if group && d.inbox_seq > 0 {
                        self.on_group(i, d.inbox_seq, (c, seq, intended), now);
                    } else {
                        self.on_data(i, c, seq, intended, now);
                    }
                    return;
                }
                let valid = self
                    .convs
                    .get(c)
                    .is_some_and(|conv| conv.to == i && *d.from == *self.conns[conv.from].user);
                if !valid {
                    self.error("deliver: to the wrong connection or from the wrong user".into());
                    return;
                }
                self.count_delivery(c, seq, intended, now);
            }
            Message::SendAck(a) if self.pubsub => match parse_tag(&a.cmid) {
                Some((p, seq, intended)) if p < self.publishers.len() => {
                    self.answered(i, p, seq);
                    let sent = self.publishers[p]
                        .first()
                        .map_or(0, |&c| self.convs[c].track.next_seq());
                    let ok = self.pub_acks[p].on_ack(seq, sent);
                    if ok {
                        self.c.acked += self.publishers[p].len() as u64;
                        self.fin.ack_latency.record(now.saturating_sub(intended));
                    } else {
                        self.error("send_ack: duplicate or unknown".into());
                    }
                }
                _ => self.error("send_ack: unknown cmid".into()),
            },
            Message::SendAck(a) => match parse_tag(&a.cmid) {
                Some((c, seq, intended)) if c < self.convs.len() => {
                    self.answered(i, c, seq);
                    if self.convs[c].track.on_ack(seq) {
                        self.c.acked += 1;
                        self.fin.ack_latency.record(now.saturating_sub(intended));
                    } else {
                        self.error("send_ack: duplicate or unknown".into());
                    }
                }
                _ => self.error("send_ack: unknown cmid".into()),
            },
            Message::Error(e) => {
                let key = format!("server error: {}", e.code.name());
                if let Some((c, seq, _)) = e.cmid.as_deref().and_then(parse_tag) {
                    if self.pubsub {
                        self.answered(i, c, seq);
                        let acked = self.pub_acks.get(c).is_some_and(|a| a.is_acked(seq));
                        if let (Some(convs), false) = (self.publishers.get(c), acked) {
                            for &cv in convs {
                                if self.convs[cv].track.on_refused(seq) {
                                    self.c.refused += 1;
                                }
                            }
                        }
                    } else if c < self.convs.len() {
                        self.answered(i, c, seq);
                        if self.convs[c].track.on_refused(seq) {
                            self.c.refused += 1;
                        }
                    }
                }
                self.error(key);
            }
            Message::Pong(p) => {
                self.c.pongs += 1;
                self.fin.heartbeat.record(now.saturating_sub(p.ts));
            }
            Message::Ping(p) => {
                if let Some(client) = self.conns[i].client.as_mut() {
                    let pong = Envelope::new(Message::Pong(Pong { ts: p.ts }));
                    if let Err(e) = client.send(&pong) {
                        self.drop_conn(i, format!("pong: {}", short_error(&e)));
                    }
                }
            }
            Message::Goaway(g) => self.error(format!("goaway: {}", g.reason)),
            Message::Synced(s) => {
                // A member catching up on its group after a reconnect pages until `more`
                // is false (the inbox pages come by themselves after `hello.resume`).
                if let (Some(group), true) = (s.group, s.more) {
                    self.sync_group(i, group, s.up_to);
                }
            }
            other => self.error(format!("unexpected {}", other.op().name())),
        }
    }

    /// Offline-sync: a third into the run the second user of every pair goes offline; two
    /// thirds in they come back (a few per call, so sending goes on meanwhile) with
    /// `hello.resume` from the last inbox sequence each received.
    fn offline_step(&mut self, now: u64) {
        const RECONNECTS_PER_STEP: usize = 16;
        let Some(go) = self.go_us else { return };
        let d = self.plan.duration_us;
        let pairs = self.share.units as usize;
        if self.offline_state == 0 && now >= go + d / 3 {
            self.offline_state = 1;
            for u in 0..pairs {
                let i = u * 2 + 1;
                if self.conns[i].alive() {
                    self.conns[i].resume = Some(self.conns[i].ack_to);
                    self.close_quietly(i);
                }
            }
            self.note(format!("{pairs} users went offline"));
        }
        if self.offline_state == 1 && now >= go + 2 * d / 3 {
            let mut n = 0;
            while self.offline_next < pairs && n < RECONNECTS_PER_STEP {
                let i = self.offline_next * 2 + 1;
                self.offline_next += 1;
                if self.conns[i].resume.is_some() {
                    let intended = self.now();
                    self.connect_one(i, intended);
                    n += 1;
                }
            }
            if self.offline_next >= pairs {
                self.offline_state = 2;
                self.note(format!("{pairs} users came back with hello.resume"));
            }
        }
    }

    /// Mixed: reconnects the idle half's connections that are due, round robin.
    fn mixed_churn(&mut self, now: u64) {
        let pairs = self.share.units as usize;
        let first_idle = pairs.div_ceil(2) * 2;
        let idle = pairs * 2 - first_idle;
        let mut burst = 0;
        while burst < SEND_BURST {
            let Some((k, intended)) = self.churn_sched.as_mut().and_then(|s| s.pop_due(now)) else {
                break;
            };
            if idle == 0 {
                continue;
            }
            let i = first_idle + (k % idle as u64) as usize;
            self.close_quietly(i);
            self.connect_one(i, intended);
            burst += 1;
        }
    }

    /// Closes connection `i` on purpose (churn): no error counted.
    fn close_quietly(&mut self, i: usize) {
        if let Some(client) = self.conns[i].client.take() {
            let _ = self.poller.remove(client.as_raw_fd());
            self.open = self.open.saturating_sub(1);
        }
        if let Some(peer) = self.conns[i].peer.take() {
            let _ = self.poller.remove(peer.as_raw_fd());
            self.open = self.open.saturating_sub(1);
        }
    }

    /// `--reconnect`: send `seq` of conversation `c` from connection `i` was answered.
    fn answered(&mut self, i: usize, key: usize, seq: u64) {
        let pending = &mut self.conns[i].pending;
        if let Some(k) = pending.iter().position(|p| p.key == key && p.seq == seq) {
            pending.remove(k);
        }
    }

    /// Group fan-out: delivery of `gseq` to member `i`, shown in timeline order: at once if
    /// it is the next one, held if it overtook a gap, dropped if already shown.
    fn on_group(&mut self, i: usize, gseq: u64, data: (usize, u64, u64), now: u64) {
        let view = &mut self.conns[i].timeline;
        if gseq <= view.shown || view.held.contains_key(&gseq) {
            // A page of a catch-up overlapping live pushes: a client drops what it has.
            self.c.redelivered += 1;
            return;
        }
        if gseq != view.shown + 1 {
            if view.held.len() < MAX_HELD {
                view.held.insert(gseq, data);
                return;
            }
            // The bound: give the gap up and show what is held.
            self.limit(format!("{MAX_HELD} group deliveries held behind a gap"));
            self.show_held(i, u64::MAX, now);
        }
        self.conns[i].timeline.shown = gseq;
        self.on_data(i, data.0, data.1, data.2, now);
        self.show_held(i, 0, now);
    }

    /// Shows the held deliveries of member `i` that follow what it has shown without a gap,
    /// or, with `skip_gaps_until` past them, every held one up to it in order.
    fn show_held(&mut self, i: usize, skip_gaps_until: u64, now: u64) {
        loop {
            let view = &mut self.conns[i].timeline;
            let Some((&gseq, _)) = view.held.first_key_value() else {
                return;
            };
            if gseq != view.shown + 1 && gseq > skip_gaps_until {
                return;
            }
            let Some((tag, seq, intended)) = view.held.remove(&gseq) else {
                return;
            };
            view.shown = gseq;
            self.on_data(i, tag, seq, intended, now);
        }
    }

    /// Group fan-out: asks for the timeline of `group` after `after` (a member catching up).
    fn sync_group(&mut self, i: usize, group: Str, after: u64) {
        let Some(client) = self.conns[i].client.as_mut() else {
            return;
        };
        let sync = Envelope::new(Message::Sync(Sync {
            after_inbox_seq: after,
            limit: GROUP_SYNC_LIMIT,
            group: Some(group),
        }));
        if let Err(e) = client.send(&sync) {
            self.drop_conn(i, format!("sync: {}", short_error(&e)));
        }
    }

    /// `loadgen chaos`: on a reconnect storm, drops every open connection at once; each comes
    /// back through `--reconnect`.
    fn storm_step(&mut self) {
        let storms = self.shared.storms.load(Ordering::Relaxed);
        if storms == self.storms_seen {
            return;
        }
        self.storms_seen = storms;
        for i in 0..self.conns.len() {
            if self.conns[i].alive() {
                self.drop_conn(i, "reconnect storm (chaos)".into());
            }
        }
    }

    /// `--reconnect`: reconnects what is due, each to its next target; a failed attempt is
    /// tried again, on the target after, `RECONNECT_DELAY_US` later.
    fn reconnect_step(&mut self, now: u64) {
        while let Some(&(due, i)) = self.reconnect_due.front() {
            if due > now {
                break;
            }
            self.reconnect_due.pop_front();
            if self.conns[i].alive() {
                continue;
            }
            self.connect_one(i, now);
            if !self.conns[i].alive() {
                self.conns[i].target += 1;
                self.reconnect_due.push_back((now + RECONNECT_DELAY_US, i));
                continue;
            }
            self.reconnects += 1;
            // Unanswered sends again, in order, with their cmid: stored once by the dedupe
            // window, acked now.
            let resends: Vec<Envelope> = self.conns[i]
                .pending
                .iter()
                .map(|p| {
                    Envelope::new(Message::Send(Send {
                        to: p.to.clone(),
                        cmid: p.cmid.clone(),
                        kind: None,
                        body: p.body.clone(),
                        ext: Ext::new(),
                    }))
                })
                .collect();
            for env in resends {
                let Some(client) = self.conns[i].client.as_mut() else {
                    break;
                };
                if let Err(e) = client.send(&env) {
                    self.drop_conn(i, format!("resend: {}", short_error(&e)));
                    break;
                }
            }
            // A group member catches up on what it missed (pushes are not retransmitted).
            let unit = self.plan.unit_size() as usize;
            if let Some(group) = self.group_of(i).filter(|_| i % unit != 0) {
                let after = self.conns[i].timeline.shown;
                self.sync_group(i, Str::from(group), after);
            }
        }
    }

    fn drop_conn(&mut self, i: usize, why: String) {
        if let Some(client) = self.conns[i].client.take() {
            let _ = self.poller.remove(client.as_raw_fd());
            self.open = self.open.saturating_sub(1);
            drop(client);
        }
        if let Some(peer) = self.conns[i].peer.take() {
            let _ = self.poller.remove(peer.as_raw_fd());
            self.open = self.open.saturating_sub(1);
            drop(peer);
        }
        if self.plan.reconnect && matches!(self.phase, Phase::Run | Phase::Grace) {
            let conn = &mut self.conns[i];
            conn.resume = Some(conn.ack_to);
            conn.target += 1;
            self.reconnect_due
                .push_back((self.shared.now_us() + RECONNECT_DELAY_US, i));
        }
        self.error(why);
    }

    // -----------------------------------------------------------------------------------------
    // Reporting.

    fn error(&mut self, key: String) {
        self.c.errors += 1;
        *self.fin.errors.entry(key).or_default() += 1;
    }

    fn note(&mut self, text: String) {
        if self.notes_sent + self.notes.len() < MAX_NOTES {
            self.notes.push(text);
        }
    }

    fn limit(&mut self, text: String) {
        if !self.fin.limits.contains(&text) {
            self.fin.limits.push(text.clone());
            self.note(format!("limit reached: {text}"));
        }
    }

    fn ticks(&mut self, now: u64) {
        while now >= self.next_tick_us {
            self.emit_tick(false);
        }
    }

    /// Sends the tick of the current second and moves to the next one.
    fn emit_tick(&mut self, last: bool) {
        let tick_start = self.next_tick_us.saturating_sub(SECOND_US);
        let counters = delta(&self.c, &self.tick_base);
        self.tick_base = self.c;
        // One merge a second instead of a second record per delivery.
        if let Err(e) = self.fin.latency.merge(&self.tick_latency) {
            self.error(format!("latency histogram: {e}"));
        }
        let notes = std::mem::take(&mut self.notes);
        self.notes_sent += notes.len();
        let tick = Tick {
            stage: Some(self.stage),
            k: self.tick_k,
            conns: self.open,
            planned: self.conns.len() as u64,
            grace: self.stage == Stage::Run && tick_start >= self.run_end_us,
            counters,
            latency: std::mem::take(&mut self.tick_latency),
            handshake: std::mem::take(&mut self.tick_handshake),
            notes,
        };
        let _ = self
            .tx
            .send(ThreadMsg::Tick(self.share.index as usize, tick));
        if !last {
            self.tick_k += 1;
            self.next_tick_us += SECOND_US;
        }
    }

    fn finish(mut self) {
        if self.phase == Phase::Connect {
            self.enter_ready();
        }
        // Group deliveries still held behind a gap are shown (the gap's messages count as
        // lost).
        let now = self.now();
        for i in 0..self.conns.len() {
            self.show_held(i, u64::MAX, now);
        }
        if self.reconnects > 0 {
            self.note(format!(
                "{} reconnects to the next target (--reconnect)",
                self.reconnects
            ));
        }
        self.emit_tick(true);
        let mut fin = std::mem::take(&mut self.fin);
        fin.connected = self.connected;
        fin.open_at_end = self.open;
        fin.cpu_wait_s = run_queue_wait_s();
        fin.counters = self.c;
        fin.tally = Default::default();
        self.merge_pub_acks();
        for conv in &self.convs {
            fin.tally.add(&conv.track.tally());
        }
        fin.tally.duplicate_acks += self.pub_acks.iter().map(SharedAcks::dup_acks).sum::<u64>();
        let _ = self
            .tx
            .send(ThreadMsg::Final(self.share.index as usize, fin));
        // Connections close when `self` drops.
    }
}

/// `later - earlier` for every counter.
fn delta(later: &Counters, earlier: &Counters) -> Counters {
    Counters {
        connects_ok: later.connects_ok - earlier.connects_ok,
        connects_failed: later.connects_failed - earlier.connects_failed,
        sent: later.sent - earlier.sent,
        acked: later.acked - earlier.acked,
        refused: later.refused - earlier.refused,
        delivered: later.delivered - earlier.delivered,
        duplicates: later.duplicates - earlier.duplicates,
        redelivered: later.redelivered - earlier.redelivered,
        skipped: later.skipped - earlier.skipped,
        pings: later.pings - earlier.pings,
        pongs: later.pongs - earlier.pongs,
        closed_by_server: later.closed_by_server - earlier.closed_by_server,
        errors: later.errors - earlier.errors,
    }
}

/// `conv:seq:intended_us` at the start of a body or cmid.
pub fn parse_tag(s: &str) -> Option<(usize, u64, u64)> {
    parse_tag_bytes(s.as_bytes())
}

/// [`parse_tag`] on bytes, without a UTF-8 check or a string split (the peers' hot path).
pub fn parse_tag_bytes(s: &[u8]) -> Option<(usize, u64, u64)> {
    fn field(s: &[u8], i: &mut usize, last: bool) -> Option<u64> {
        let start = *i;
        let mut v: u64 = 0;
        while let Some(&b) = s.get(*i) {
            if b.is_ascii_digit() {
                v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                *i += 1;
            } else {
                break;
            }
        }
        if *i == start {
            return None;
        }
        match s.get(*i) {
            Some(b':') => *i += 1,
            None if last => {}
            _ => return None,
        }
        Some(v)
    }
    let mut i = 0;
    let c = usize::try_from(field(s, &mut i, false)?).ok()?;
    let seq = field(s, &mut i, false)?;
    let t = field(s, &mut i, true)?;
    Some((c, seq, t))
}

/// A short, stable description of an error, used as a key of the error map.
fn short_error(e: &ClientError) -> String {
    match e {
        ClientError::Io(io) => match io.raw_os_error() {
            Some(code) => format!("{} (os error {code})", io.kind()),
            None => io.kind().to_string(),
        },
        ClientError::Timeout => "timeout".into(),
        ClientError::Closed { .. } => "closed".into(),
        ClientError::Refused(err) => format!("refused: {}", err.code.name()),
        other => {
            let text = other.to_string();
            text.chars().take(80).collect()
        }
    }
}

/// The error map key of a failed connection, and the limit it reveals if it is one.
pub fn classify_connect_error(e: &ClientError) -> (String, Option<String>) {
    if let ClientError::Io(io) = e {
        match io.raw_os_error() {
            Some(libc::EMFILE) => {
                return (
                    "connect: too many open files (EMFILE)".into(),
                    Some(format!(
                        "EMFILE: the worker's open-file limit ({}) is reached; use more --workers",
                        nofile_limit()
                    )),
                )
            }
            Some(libc::ENFILE) => {
                return (
                    "connect: system file table full (ENFILE)".into(),
                    Some("ENFILE: the system-wide open-file limit is reached".into()),
                )
            }
            Some(libc::EADDRNOTAVAIL) => {
                return (
                    "connect: no free source port (EADDRNOTAVAIL)".into(),
                    Some(
                        "EADDRNOTAVAIL: source ports to the target are exhausted; add --sources \
                         127.0.0.2-127.0.0.9 or widen net.ipv4.ip_local_port_range"
                            .into(),
                    ),
                )
            }
            Some(libc::ECONNREFUSED) => return ("connect: refused".into(), None),
            _ => {}
        }
    }
    (format!("connect: {}", short_error(e)), None)
}

/// The soft open-file limit of this process.
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur
    } else {
        0
    }
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit that outlives the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    nofile_limit()
}

/// CPU seconds (user + system) this process used so far, and how often the kernel took the
/// CPU away from it while it could run (involuntary context switches: other processes
/// competing for its core, the usual cause of a late schedule).
pub fn cpu_usage() -> (f64, u64) {
    // SAFETY: getrusage fills one rusage struct, zero-initialised here and outliving the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0.0, 0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        tv(ru.ru_utime) + tv(ru.ru_stime),
        u64::try_from(ru.ru_nivcsw).unwrap_or(0),
    )
}

/// Seconds the calling thread spent runnable but waiting for a CPU (the kernel's run-queue
/// delay, /proc/thread-self/schedstat); 0 where unavailable. A loadgen thread that waits
/// here sends late: its send lag shows it, and this says why.
pub fn run_queue_wait_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// A map of error counts, most frequent first.
pub fn top_errors(errors: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = errors.iter().map(|(k, v)| (k.clone(), *v)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse_from_bodies_and_cmids() {
        assert_eq!(parse_tag("3:17:123456:xxxx"), Some((3, 17, 123456)));
        assert_eq!(parse_tag("3:17:123456"), Some((3, 17, 123456)));
        assert_eq!(parse_tag("hello"), None);
        assert_eq!(parse_tag("1:2"), None);
        assert_eq!(parse_tag("a:2:3"), None);
        for s in [
            "3:17:123456:xxxx",
            "3:17:123456",
            "hello",
            "1:2",
            "a:2:3",
            "1::3",
            "",
        ] {
            assert_eq!(parse_tag_bytes(s.as_bytes()), parse_tag(s), "{s}");
        }
        assert_eq!(parse_tag_bytes(b"1:2:99999999999999999999999"), None);
    }

    #[test]
    fn connect_errors_name_the_limit() {
        let emfile = ClientError::Io(std::io::Error::from_raw_os_error(libc::EMFILE));
        let (key, limit) = classify_connect_error(&emfile);
        assert!(key.contains("EMFILE"));
        assert!(limit.unwrap().starts_with("EMFILE"));
        let ports = ClientError::Io(std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
        assert!(classify_connect_error(&ports)
            .1
            .unwrap()
            .contains("--sources"));
        let refused = ClientError::Io(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(
            classify_connect_error(&refused),
            ("connect: refused".into(), None)
        );
    }
}
