//! Counters and gauges, one block per shard, rendered as Prometheus text for /metrics.
//!
//! Each shard is the only writer of its own block (relaxed atomics, no contention); the admin
//! server reads all blocks when scraped. Per-tenant figures live in a small bounded map per
//! shard, touched only on connect and disconnect.
//!
//! The counters of the I/O core and of its services ([`IoStats`], [`ServiceStats`],
//! [`ClusterStats`]) are defined here too (`metrics::io`): the I/O core and its services write
//! them and name this module, never the other way round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::codec::CodecId;
use crate::protocol::{ErrorCode, Op};
use crate::ratelimit::TokenBucket;

mod io;
pub use io::{ClusterStats, IoStats, ServiceStats};

/// Tenants tracked by name per shard; the rest are summed under `_other`.
pub const MAX_TENANTS_TRACKED: usize = 1_000;

const OPS: usize = Op::ALL.len() + 1; // slot 0: unknown op
const CODECS: usize = CodecId::ALL.len() + 1;
const CODES: usize = ErrorCode::ALL.len() + 1;

/// Why a connection was closed (label of `imgw_closes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseReason {
    /// The peer closed or reset the connection.
    Peer = 0,
    /// No `hello` before the handshake timeout.
    HandshakeTimeout,
    /// Silent past the idle timeout.
    Idle,
    /// Unparseable frame, oversized frame, or a WebSocket protocol violation.
    Protocol,
    /// `hello` refused (bad token, version, limits).
    AuthFailed,
    /// Output backed up past `max_outbound_bytes`.
    SlowConsumer,
    /// Graceful drain or an admin kick.
    Drain,
    /// Retransmit limit reached (the device syncs on reconnect).
    RetryLimit,
    /// Connection limit reached at accept.
    Limit,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Peer,
        CloseReason::HandshakeTimeout,
        CloseReason::Idle,
        CloseReason::Protocol,
        CloseReason::AuthFailed,
        CloseReason::SlowConsumer,
        CloseReason::Drain,
        CloseReason::RetryLimit,
        CloseReason::Limit,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            CloseReason::Peer => "peer",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Protocol => "protocol",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Drain => "drain",
            CloseReason::RetryLimit => "retry_limit",
            CloseReason::Limit => "limit",
        }
    }
}

/// A stage of a message's way through a shard, timed into a [`LatencyHist`] (label `stage`
/// of `imgw_stage_seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Stage {
    /// A batch of messages between shards (or a shard's own local queue: fan-out, owner
    /// work): from the first message posted to the batch handled by its shard.
    ShardQueue = 0,
    /// A connection's output: from the first frame queued on an empty output to the output
    /// fully written to the socket (the driver's pass reaching the connection and writing).
    OutputWait,
    /// A `send`: from read on its connection's shard to its `send_ack` queued there (the
    /// owner's sequencing, and at durability `local` / `backend` the store's commit), on the
    /// sender's shard.
    SendAck,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::ShardQueue, Stage::OutputWait, Stage::SendAck];

    pub const fn name(self) -> &'static str {
        match self {
            Stage::ShardQueue => "shard_queue",
            Stage::OutputWait => "output_wait",
            Stage::SendAck => "send_ack",
        }
    }
}

/// Upper bounds of [`LatencyHist`]'s buckets in µs (a last, unbounded bucket follows).
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// A latency histogram with fixed buckets: one writer (its shard), relaxed atomics.
#[derive(Debug)]
pub struct LatencyHist {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHist {
    pub fn record_us(&self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|b| *b < us);
        inc(&self.buckets[i]);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Counts per bucket (not cumulative), the last one unbounded.
    pub fn counts(&self) -> [u64; LATENCY_BOUNDS_US.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Appends this histogram's Prometheus samples (`NAME_bucket` per bound, cumulative, then
    /// `NAME_sum` in seconds and `NAME_count`), with `labels` (`a="x",b="y"`, or empty).
    pub fn render(&self, o: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut total = 0;
        for (k, n) in self.counts().into_iter().enumerate() {
            total += n;
            let le = match LATENCY_BOUNDS_US.get(k) {
                Some(b) => format!("{}", *b as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(o, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {total}");
        }
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(
            o,
            "{name}_sum{} {}",
            braces(labels),
            self.sum_us() as f64 / 1e6
        );
        let _ = writeln!(o, "{name}_count{} {total}", braces(labels));
    }

    /// [`LatencyHist::render`] of an unlabelled histogram with its HELP and TYPE lines.
    pub fn render_family(&self, o: &mut String, name: &str, help: &str) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render(o, name, "");
    }
}

/// Per-tenant figures.
#[derive(Debug, Default, Clone)]
pub struct TenantStats {
    pub connections: i64,
    pub sends: u64,
    /// `hello`s refused because the tenant was at its connection limit.
    pub refused: u64,
    /// Sends refused by the tenant's send bucket.
    pub rate_limited: u64,
}

/// What a tenant was refused (per-tenant counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantRefusal {
    /// A `hello` past `limits.max_conns_per_tenant`.
    Conns,
    /// A `send` past the tenant's send bucket.
    Rate,
}

/// What the shards share per tenant, for the limits that hold over the whole process:
/// authenticated connections (`limits.max_conns_per_tenant`) and the tenant's send bucket
/// (`limits.tenant_sends_per_sec`). A short lock per `hello` and per close of an
/// authenticated connection; a tenant is held only while it has connections (bounded by the
/// connection count). It lives beside the metrics because every shard already holds them.
#[derive(Debug, Default)]
pub struct TenantShared {
    map: Mutex<std::collections::HashMap<String, TenantEntry>>,
}

#[derive(Debug)]
struct TenantEntry {
    conns: u32,
    sends: Option<Arc<SendBucket>>,
}

/// A tenant's send rate over all its connections and shards: a token bucket behind a lock
/// of its own, taken once per `send` of the tenant (uncontended unless two shards send for
/// the same tenant at the same moment).
#[derive(Debug)]
pub struct SendBucket {
    rate: u32,
    burst: u32,
    bucket: Mutex<TokenBucket>,
}

impl SendBucket {
    /// Takes one send; `Err(ms)`: refused, retry after `ms`.
    pub fn take(&self, now_ms: u64) -> Result<(), u64> {
        match self.bucket.lock() {
            Ok(mut b) => b.take(1, self.rate, self.burst, now_ms),
            // A poisoned lock (a panic while held) must not stop the tenant's sends.
            Err(_) => Ok(()),
        }
    }
}

impl TenantShared {
    /// Counts one more connection of `tenant` unless it has `max_conns` already (`None`:
    /// refused, nothing counted). Otherwise the tenant's send bucket, created full with
    /// `sends` (rate, burst) for the tenant's first connection; `None` inside when `sends`
    /// is `None` (no tenant rate).
    pub fn admit(
        &self,
        tenant: &str,
        max_conns: u32,
        sends: Option<(u32, u32)>,
        now_ms: u64,
    ) -> Option<Option<Arc<SendBucket>>> {
        let Ok(mut map) = self.map.lock() else {
            return None;
        };
        if let Some(e) = map.get_mut(tenant) {
            if e.conns >= max_conns {
                return None;
            }
            e.conns += 1;
            return Some(e.sends.clone());
        }
        if max_conns == 0 {
            return None;
        }
        let sends = sends.map(|(rate, burst)| {
            Arc::new(SendBucket {
                rate,
                burst,
                bucket: Mutex::new(TokenBucket::new(burst, now_ms)),
            })
        });
        map.insert(
            tenant.to_string(),
            TenantEntry {
                conns: 1,
                sends: sends.clone(),
            },
        );
        Some(sends)
    }

    /// One connection of `tenant` fewer.
    pub fn release(&self, tenant: &str) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        if let Some(e) = map.get_mut(tenant) {
            e.conns = e.conns.saturating_sub(1);
            if e.conns == 0 {
                map.remove(tenant);
            }
        }
    }
}

/// One shard's block.
#[derive(Debug)]
pub struct ShardMetrics {
    pub connections: AtomicI64,
    pub authenticated: AtomicI64,
    pub accepted: AtomicU64,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    /// `hello`s that came in a WebSocket upgrade's request target (PROTOCOL.md section 1).
    pub url_hellos: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub writes: AtomicU64,
    frames_in: [[AtomicU64; CODECS]; OPS],
    frames_out: [[AtomicU64; CODECS]; OPS],
    errors: [AtomicU64; CODES],
    closes: [AtomicU64; CloseReason::ALL.len()],
    pub deliveries_pending: AtomicI64,
    pub deliveries_confirmed: AtomicU64,
    pub deliveries_failed: AtomicU64,
    pub retransmits: AtomicU64,
    /// Cluster mode: login catch-up reads started (src/shard/delivery.rs `catchup_ms`).
    pub catchups: AtomicU64,
    pub cross_shard_sent: AtomicU64,
    pub cross_shard_shed: AtomicU64,
    pub outbox_depth: AtomicI64,
    pub timers: AtomicI64,
    /// Stage latencies, indexed by [`Stage`].
    pub stages: [LatencyHist; Stage::ALL.len()],
    /// How long each pass of the shard's connection driver took (src/runtime/driver.rs).
    pub driver_pass: LatencyHist,
    /// Looks at the epoll set in the middle of a long round of the driver's pass.
    pub driver_polls_within_pass: AtomicU64,
    /// Frames for many connections queued as a range of the shard's shared frame log
    /// instead of a copy (src/shard/frames.rs), counted per connection.
    pub frames_shared: AtomicU64,
    tenants: Mutex<BTreeMap<String, TenantStats>>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            connections: AtomicI64::new(0),
            authenticated: AtomicI64::new(0),
            accepted: AtomicU64::new(0),
            handshakes_ok: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            url_hellos: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            frames_in: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            frames_out: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            closes: std::array::from_fn(|_| AtomicU64::new(0)),
            deliveries_pending: AtomicI64::new(0),
            deliveries_confirmed: AtomicU64::new(0),
            deliveries_failed: AtomicU64::new(0),
            retransmits: AtomicU64::new(0),
            catchups: AtomicU64::new(0),
            cross_shard_sent: AtomicU64::new(0),
            cross_shard_shed: AtomicU64::new(0),
            outbox_depth: AtomicI64::new(0),
            timers: AtomicI64::new(0),
            stages: std::array::from_fn(|_| LatencyHist::default()),
            driver_pass: LatencyHist::default(),
            driver_polls_within_pass: AtomicU64::new(0),
            frames_shared: AtomicU64::new(0),
            tenants: Mutex::new(BTreeMap::new()),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl ShardMetrics {
    /// A frame received; `op` is the raw op number (unknown ops counted in slot 0).
    pub fn frame_in(&self, op: u8, codec: CodecId) {
        let o = Op::from_u8(op).map_or(0, |o| o as usize);
        inc(&self.frames_in[o][codec as usize]);
    }

    pub fn frame_out(&self, op: Op, codec: CodecId) {
        inc(&self.frames_out[op as usize][codec as usize]);
    }

    pub fn error(&self, code: ErrorCode) {
        inc(&self.errors[code as usize]);
    }

    pub fn close(&self, reason: CloseReason) {
        inc(&self.closes[reason as usize]);
    }

    pub fn frames_out_total(&self, op: Op, codec: CodecId) -> u64 {
        self.frames_out[op as usize][codec as usize].load(Ordering::Relaxed)
    }

    pub fn errors_total(&self, code: ErrorCode) -> u64 {
        self.errors[code as usize].load(Ordering::Relaxed)
    }

    pub fn closes_total(&self, reason: CloseReason) -> u64 {
        self.closes[reason as usize].load(Ordering::Relaxed)
    }

    /// Adjusts a tenant's figures (connect: +1, disconnect: -1; sends).
    pub fn tenant(&self, tenant: &str, connections: i64, sends: u64) {
        self.with_tenant(tenant, |e| {
            e.connections += connections;
            e.sends += sends;
        });
    }

    /// A `hello` or a `send` of `tenant` refused at one of the tenant's limits.
    pub fn tenant_refused(&self, tenant: &str, what: TenantRefusal) {
        self.with_tenant(tenant, |e| match what {
            TenantRefusal::Conns => e.refused += 1,
            TenantRefusal::Rate => e.rate_limited += 1,
        });
    }

    /// Applies `f` to the figures of `tenant` (of `_other` once the map is full).
    fn with_tenant(&self, tenant: &str, f: impl FnOnce(&mut TenantStats)) {
        let Ok(mut map) = self.tenants.lock() else {
            return;
        };
        // The key is copied only when the tenant is first seen.
        if let Some(e) = map.get_mut(tenant) {
            return f(e);
        }
        let key = if map.len() < MAX_TENANTS_TRACKED {
            tenant
        } else {
            "_other"
        };
        f(map.entry(key.to_owned()).or_default());
    }
}

/// All shards' blocks.
#[derive(Debug)]
pub struct Metrics {
    pub shards: Vec<ShardMetrics>,
    /// The I/O core's counters, once it runs (durability `local`).
    pub io: std::sync::OnceLock<Arc<IoStats>>,
    /// Per-tenant state over all shards: connection counts and send buckets.
    pub tenants_shared: TenantShared,
    /// TLS handshakes, failures and certificate reloads (all shards).
    pub tls: crate::tls::TlsStats,
    /// Closes that could not linger: `limits.max_lingering_closes` sockets were lingering.
    pub linger_skipped: AtomicU64,
}

impl Metrics {
    pub fn new(shards: usize) -> Self {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            io: std::sync::OnceLock::new(),
            tenants_shared: TenantShared::default(),
            tls: crate::tls::TlsStats::default(),
            linger_skipped: AtomicU64::new(0),
        }
    }

    /// Sum of one counter over all shards.
    pub fn sum(&self, f: impl Fn(&ShardMetrics) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(16 * 1024);
        let r = Ordering::Relaxed;
        let per_shard_i = |o: &mut String,
                           name: &str,
                           help: &str,
                           kind: &str,
                           f: &dyn Fn(&ShardMetrics) -> i64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, s) in self.shards.iter().enumerate() {
                let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {}", f(s));
            }
        };
        per_shard_i(
            &mut o,
            "imgw_connections",
            "Open connections.",
            "gauge",
            &|s| s.connections.load(r),
        );
        per_shard_i(
            &mut o,
            "imgw_connections_authenticated",
            "Connections past hello.",
            "gauge",
            &|s| s.authenticated.load(r),
        );
        per_shard_i(
            &mut o,
            "imgw_accepted_total",
            "Accepted sockets.",
            "counter",
            &|s| s.accepted.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_handshakes_ok_total",
            "Successful hello handshakes.",
            "counter",
            &|s| s.handshakes_ok.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_handshakes_failed_total",
            "Refused handshakes.",
            "counter",
            &|s| s.handshakes_failed.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_url_hellos_total",
            "hello messages that came in a WebSocket upgrade's request target.",
            "counter",
            &|s| s.url_hellos.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_bytes_in_total",
            "Bytes read from clients.",
            "counter",
            &|s| s.bytes_in.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_bytes_out_total",
            "Bytes written to clients.",
            "counter",
            &|s| s.bytes_out.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_writes_total",
            "Socket writes (frames are coalesced per write).",
            "counter",
            &|s| s.writes.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_retransmits_total",
            "Deliveries sent again.",
            "counter",
            &|s| s.retransmits.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_cluster_catchups_total",
            "Login catch-up reads of the store (cluster mode).",
            "counter",
            &|s| s.catchups.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_cross_shard_sent_total",
            "Messages sent to other shards.",
            "counter",
            &|s| s.cross_shard_sent.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_cross_shard_shed_total",
            "Messages shed because a shard channel was full.",
            "counter",
            &|s| s.cross_shard_shed.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_outbox_depth",
            "Messages waiting for a full shard channel.",
            "gauge",
            &|s| s.outbox_depth.load(r),
        );
        per_shard_i(
            &mut o,
            "imgw_driver_polls_within_pass_total",
            "Looks at the epoll set in the middle of a long pass of the connection driver, \
             so input that arrived meanwhile (a group message) is read and fanned out at once.",
            "counter",
            &|s| s.driver_polls_within_pass.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_frames_shared_total",
            "Frames for many connections (a group message, a presence change) queued as a \
             range of the shard's shared frame log instead of a copy onto the connection's \
             output, counted per connection (part of imgw_frames_out_total).",
            "counter",
            &|s| s.frames_shared.load(r) as i64,
        );
        per_shard_i(
            &mut o,
            "imgw_timers",
            "Entries in the shard's timer wheel.",
            "gauge",
            &|s| s.timers.load(r),
        );

        let _ = writeln!(
            o,
            "# HELP imgw_stage_seconds Time a message spends in a stage of its shard \
             (shard_queue: posted to handled; output_wait: queued to written; send_ack: send read to send_ack queued).\n\
             # TYPE imgw_stage_seconds histogram"
        );
        for (i, s) in self.shards.iter().enumerate() {
            for stage in Stage::ALL {
                let labels = format!("shard=\"{i}\",stage=\"{}\"", stage.name());
                s.stages[stage as usize].render(&mut o, "imgw_stage_seconds", &labels);
            }
        }

        let _ = writeln!(
            o,
            "# HELP imgw_driver_pass_seconds Time one pass of a shard's connection driver took \
             (what was ready read, handled by the shard, and what that made written); a long \
             pass looks for new input every runtime.poll_within_pass_us (imgw_driver_polls_within_pass_total).\n\
             # TYPE imgw_driver_pass_seconds histogram"
        );
        for (i, s) in self.shards.iter().enumerate() {
            let labels = format!("shard=\"{i}\"");
            s.driver_pass
                .render(&mut o, "imgw_driver_pass_seconds", &labels);
        }

        let _ = writeln!(
            o,
            "# HELP imgw_deliveries Deliveries by state.\n# TYPE imgw_deliveries gauge"
        );
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                o,
                "imgw_deliveries{{shard=\"{i}\",state=\"pending\"}} {}",
                s.deliveries_pending.load(r)
            );
            let _ = writeln!(
                o,
                "imgw_deliveries{{shard=\"{i}\",state=\"confirmed\"}} {}",
                s.deliveries_confirmed.load(r)
            );
            let _ = writeln!(
                o,
                "imgw_deliveries{{shard=\"{i}\",state=\"failed\"}} {}",
                s.deliveries_failed.load(r)
            );
        }
        for (name, dir) in [
            ("imgw_frames_in_total", true),
            ("imgw_frames_out_total", false),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} Frames by op and codec.\n# TYPE {name} counter"
            );
            for (i, s) in self.shards.iter().enumerate() {
                let table = if dir { &s.frames_in } else { &s.frames_out };
                for (oi, row) in table.iter().enumerate() {
                    let op = if oi == 0 {
                        "unknown"
                    } else {
                        Op::ALL[oi - 1].name()
                    };
                    for codec in CodecId::ALL {
                        let v = row[codec as usize].load(r);
                        if v > 0 {
                            let _ = writeln!(
                                o,
                                "{name}{{shard=\"{i}\",op=\"{op}\",codec=\"{}\"}} {v}",
                                codec.name()
                            );
                        }
                    }
                }
            }
        }
        let _ = writeln!(o, "# HELP imgw_errors_total Error frames sent, by code.\n# TYPE imgw_errors_total counter");
        for (i, s) in self.shards.iter().enumerate() {
            for code in ErrorCode::ALL {
                let _ = writeln!(
                    o,
                    "imgw_errors_total{{shard=\"{i}\",code=\"{}\"}} {}",
                    code.name(),
                    s.errors_total(code)
                );
            }
        }
        let _ = writeln!(o, "# HELP imgw_closes_total Closed connections, by reason.\n# TYPE imgw_closes_total counter");
        for (i, s) in self.shards.iter().enumerate() {
            for reason in CloseReason::ALL {
                let _ = writeln!(
                    o,
                    "imgw_closes_total{{shard=\"{i}\",reason=\"{}\"}} {}",
                    reason.name(),
                    s.closes_total(reason)
                );
            }
        }
        if let Some(io) = self.io.get() {
            let batches = io.batches.load(r);
            let _ = writeln!(o, "# HELP imgw_store_commits_total Group commits (one fsync each).\n# TYPE imgw_store_commits_total counter\nimgw_store_commits_total {batches}");
            let _ = writeln!(o, "# HELP imgw_store_ops_total Writes applied.\n# TYPE imgw_store_ops_total counter\nimgw_store_ops_total {}", io.ops.load(r));
            let _ = writeln!(o, "# HELP imgw_store_errors_total Failed commits.\n# TYPE imgw_store_errors_total counter\nimgw_store_errors_total {}", io.errors.load(r));
            io.commit.render_family(
                &mut o,
                "imgw_store_commit_seconds",
                "Time of one group commit: the embedded store's write and fsync, or at durability \
                 backend the MySQL transactions of the batch (its lanes run in parallel).",
            );
            let _ = writeln!(o, "# HELP imgw_io_queue_depth Commands waiting for the I/O core.\n# TYPE imgw_io_queue_depth gauge\nimgw_io_queue_depth {}", io.queue_depth.load(r));
            io.svc.render(&mut o);
            if io.cluster.enabled.load(r) {
                io.cluster.render(&mut o);
            }
        }
        let _ = writeln!(
            o,
            "# HELP imgw_closes_not_lingered_total Gateway closes with no lingering close \
             (limits.max_lingering_closes sockets of the shard were lingering).\n\
             # TYPE imgw_closes_not_lingered_total counter\nimgw_closes_not_lingered_total {}",
            self.linger_skipped.load(r)
        );
        let t = &self.tls;
        let tls: [(&str, &str, &AtomicU64); 4] = [
            (
                "imgw_tls_handshakes_total",
                "TLS handshakes completed.",
                &t.handshakes,
            ),
            (
                "imgw_tls_record_errors_total",
                "Established TLS connections closed on a bad record.",
                &t.record_errors,
            ),
            (
                "imgw_tls_reloads_total",
                "Certificate reloads (SIGHUP) that took effect.",
                &t.reloads,
            ),
            (
                "imgw_tls_reload_failures_total",
                "Certificate reloads refused; the old certificate stays.",
                &t.reload_failures,
            ),
        ];
        for (name, help, v) in tls {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(r)
            );
        }
        let _ = writeln!(o, "# HELP imgw_tls_handshake_failures_total TLS handshakes that failed, by reason.\n# TYPE imgw_tls_handshake_failures_total counter\nimgw_tls_handshake_failures_total{{reason=\"error\"}} {}\nimgw_tls_handshake_failures_total{{reason=\"timeout\"}} {}", t.handshake_failures.load(r), t.handshake_timeouts.load(r));
        let mut tenants: BTreeMap<String, TenantStats> = BTreeMap::new();
        for s in &self.shards {
            if let Ok(map) = s.tenants.lock() {
                for (t, st) in map.iter() {
                    let e = tenants.entry(t.clone()).or_default();
                    e.connections += st.connections;
                    e.sends += st.sends;
                    e.refused += st.refused;
                    e.rate_limited += st.rate_limited;
                }
            }
        }
        let per_tenant: [PerTenant; 4] = [
            (
                "imgw_tenant_connections",
                "Open connections per tenant.",
                "gauge",
                |st| st.connections,
            ),
            (
                "imgw_tenant_sends_total",
                "Accepted sends per tenant.",
                "counter",
                |st| st.sends as i64,
            ),
            (
                "imgw_tenant_refused_total",
                "Hellos refused at the tenant's connection limit.",
                "counter",
                |st| st.refused as i64,
            ),
            (
                "imgw_tenant_rate_limited_total",
                "Sends refused by the tenant's send bucket.",
                "counter",
                |st| st.rate_limited as i64,
            ),
        ];
        for (name, help, kind, value) in per_tenant {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (t, st) in &tenants {
                let _ = writeln!(o, "{name}{{tenant=\"{}\"}} {}", escape(t), value(st));
            }
        }
        o
    }
}

/// One per-tenant metric: name, help, type and its value from a tenant's figures.
type PerTenant = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TenantStats) -> i64,
);

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = LatencyHist::default();
        for us in [5, 10, 11, 300, 2_000_000] {
            h.record_us(us);
        }
        let mut o = String::new();
        h.render_family(&mut o, "imgw_x_seconds", "Help.");
        let lines: Vec<&str> = o.lines().collect();
        assert_eq!(lines[0], "# HELP imgw_x_seconds Help.");
        assert_eq!(lines[1], "# TYPE imgw_x_seconds histogram");
        // 5 and 10 µs fall in le=0.00001 (bounds are inclusive), 11 in le=0.000025.
        assert!(
            lines.contains(&"imgw_x_seconds_bucket{le=\"0.00001\"} 2"),
            "{o}"
        );
        assert!(
            lines.contains(&"imgw_x_seconds_bucket{le=\"0.000025\"} 3"),
            "{o}"
        );
        assert!(
            lines.contains(&"imgw_x_seconds_bucket{le=\"0.0005\"} 4"),
            "{o}"
        );
        assert!(lines.contains(&"imgw_x_seconds_bucket{le=\"1\"} 4"), "{o}");
        assert!(
            lines.contains(&"imgw_x_seconds_bucket{le=\"+Inf\"} 5"),
            "{o}"
        );
        assert!(lines.contains(&"imgw_x_seconds_sum 2.000326"), "{o}");
        assert!(lines.contains(&"imgw_x_seconds_count 5"), "{o}");
        let mut labelled = String::new();
        h.render(&mut labelled, "imgw_y_seconds", "shard=\"1\"");
        assert!(labelled.contains("imgw_y_seconds_bucket{shard=\"1\",le=\"+Inf\"} 5"));
        assert!(labelled.contains("imgw_y_seconds_count{shard=\"1\"} 5"));
    }

    #[test]
    fn help_texts_are_one_clean_line_each() {
        let text = Metrics::new(2).render();
        let help: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert!(help.iter().any(|l| l.contains("imgw_driver_pass_seconds")));
        for line in help {
            assert!(!line.contains("  "), "a run of spaces in {line:?}");
        }
    }
}
