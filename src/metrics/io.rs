//! The counters of the I/O core and the services it runs (Redis, Kafka, cluster mode). They
//! live here, below the I/O core and the services that write them, so that the metrics page
//! (and the admin API's `GET /cluster`) read them without naming those modules.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::LatencyHist;

/// Counters of the I/O core (src/iocore.rs), read by /metrics.
#[derive(Debug, Default)]
pub struct IoStats {
    pub batches: AtomicU64,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    /// Commit latency sum (µs) and count, for the average.
    pub commit: LatencyHist,
    pub queue_depth: AtomicU64,
    /// Redis and Kafka counters.
    pub svc: Arc<ServiceStats>,
    /// Cluster counters (zero and not rendered on a single node).
    pub cluster: Arc<ClusterStats>,
    /// When a failed commit was last logged (ms since the epoch): during an outage every
    /// batch fails, so failures are logged at most once a second (the count is in `errors`).
    pub(crate) last_error_log_ms: AtomicU64,
}

/// Counters of the services (src/services: Redis, Kafka, push ingress), rendered on /metrics.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// 1 while a Redis connection is up.
    pub redis_up: AtomicU64,
    /// Pipelines sent, commands in them, pipelines that failed.
    pub redis_pipelines: AtomicU64,
    pub redis_commands: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Presence events dropped: the I/O queue or the Redis queue was full, or Redis was down
    /// (a re-publish after reconnect repairs the state).
    pub redis_dropped: AtomicU64,
    /// Successful (re)connects and the devices re-published after them.
    pub redis_connects: AtomicU64,
    pub redis_republished: AtomicU64,
    /// Records confirmed on Kafka (messages topic and routed topics), and failed attempts (a
    /// record produced again at durability `local` can fail more than once).
    pub kafka_produced: AtomicU64,
    pub kafka_failed: AtomicU64,
    /// A resent `cmid` whose first produce was not confirmed: produced again.
    pub kafka_reproduced: AtomicU64,
    /// Producers replaced after a fatal error.
    pub kafka_resets: AtomicU64,
    /// Durability `local`: records waiting to be produced again (gauge), records produced
    /// again from that backlog, and records given up (backlog full, an error about the record
    /// itself, or unconfirmed at shutdown): acked messages missing from their topic.
    pub kafka_backlog: AtomicU64,
    pub kafka_retried: AtomicU64,
    pub kafka_given_up: AtomicU64,
    /// Batches whose delivery reports are being awaited.
    pub kafka_in_flight: AtomicU64,
    /// Time from produce to the last delivery report of a batch.
    pub kafka_confirm: LatencyHist,
    /// Time of a Redis pipeline that succeeded, sent to answered.
    pub redis_pipeline: LatencyHist,
    /// Push ingress records: received, delivered to a shard, and refused as malformed.
    pub push_received: AtomicU64,
    pub push_delivered: AtomicU64,
    pub push_bad: AtomicU64,
}

impl ServiceStats {
    /// Appends the Prometheus text of these counters.
    pub fn render(&self, o: &mut String) {
        let rows: &[(&str, &str, &str, &AtomicU64)] = &[
            (
                "imgw_redis_up",
                "gauge",
                "1 while connected to Redis.",
                &self.redis_up,
            ),
            (
                "imgw_redis_pipelines_total",
                "counter",
                "Pipelines sent to Redis.",
                &self.redis_pipelines,
            ),
            (
                "imgw_redis_commands_total",
                "counter",
                "Commands sent to Redis.",
                &self.redis_commands,
            ),
            (
                "imgw_redis_errors_total",
                "counter",
                "Failed Redis pipelines or connects.",
                &self.redis_errors,
            ),
            (
                "imgw_redis_dropped_total",
                "counter",
                "Presence events dropped (queue full or Redis down).",
                &self.redis_dropped,
            ),
            (
                "imgw_redis_connects_total",
                "counter",
                "Connections made to Redis.",
                &self.redis_connects,
            ),
            (
                "imgw_redis_republished_total",
                "counter",
                "Devices re-published after a reconnect.",
                &self.redis_republished,
            ),
            (
                "imgw_kafka_produced_total",
                "counter",
                "Records confirmed by Kafka.",
                &self.kafka_produced,
            ),
            (
                "imgw_kafka_failed_total",
                "counter",
                "Produce attempts Kafka refused or did not confirm.",
                &self.kafka_failed,
            ),
            (
                "imgw_kafka_reproduced_total",
                "counter",
                "Resent messages produced again after a failed produce.",
                &self.kafka_reproduced,
            ),
            (
                "imgw_kafka_producer_resets_total",
                "counter",
                "Producers replaced after a fatal error.",
                &self.kafka_resets,
            ),
            (
                "imgw_kafka_backlog",
                "gauge",
                "Records waiting to be produced again (durability local).",
                &self.kafka_backlog,
            ),
            (
                "imgw_kafka_retried_total",
                "counter",
                "Records produced again from the backlog (durability local).",
                &self.kafka_retried,
            ),
            (
                "imgw_kafka_given_up_total",
                "counter",
                "Records given up, never on their topic (durability local).",
                &self.kafka_given_up,
            ),
            (
                "imgw_kafka_in_flight",
                "gauge",
                "Batches awaiting delivery reports.",
                &self.kafka_in_flight,
            ),
            (
                "imgw_push_received_total",
                "counter",
                "Push ingress records received.",
                &self.push_received,
            ),
            (
                "imgw_push_delivered_total",
                "counter",
                "Push ingress records handed to a shard.",
                &self.push_delivered,
            ),
            (
                "imgw_push_bad_total",
                "counter",
                "Push ingress records dropped as malformed.",
                &self.push_bad,
            ),
        ];
        render_rows(o, rows);
        self.kafka_confirm.render_family(
            o,
            "imgw_kafka_confirm_seconds",
            "Time from producing a batch's records to the last delivery report.",
        );
        self.redis_pipeline.render_family(
            o,
            "imgw_redis_pipeline_seconds",
            "Time of a Redis pipeline, sent to answered (pipelines that succeeded).",
        );
    }
}

/// Appends one Prometheus metric per row: (name, type, help, value).
pub(crate) fn render_rows(o: &mut String, rows: &[(&str, &str, &str, &AtomicU64)]) {
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

/// Counters of cluster mode (src/services/cluster.rs), rendered on /metrics.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Set when cluster mode starts: only then are these rendered.
    pub enabled: std::sync::atomic::AtomicBool,
    /// Live nodes in the registry as last read (this one included).
    pub nodes: AtomicU64,
    /// 1 while this node's registration is fresh in Redis.
    pub registered: AtomicU64,
    /// Nodes this node declared dead (their registration expired).
    pub dead: AtomicU64,
    /// Records produced to other nodes' topics, and those Kafka did not confirm.
    pub relayed: AtomicU64,
    /// Of `relayed`, the presence changes (one per other node per login and logout).
    pub relayed_presence: AtomicU64,
    pub relay_failed: AtomicU64,
    /// Relays dropped: the relay queue was full, or the recipient's nodes were unknown
    /// because Redis failed.
    pub relay_dropped: AtomicU64,
    /// Route lookups answered by the cache, and by Redis.
    pub route_cache_hits: AtomicU64,
    pub route_lookups: AtomicU64,
    /// Route announcements heard (each evicts one cached user or group).
    pub route_announcements: AtomicU64,
    /// Groups with online members on this node, as written to Redis (`{p}gnodes:..`).
    pub groups_here: AtomicU64,
    /// Group node sets read from Redis (the others came from the cache).
    pub group_lookups: AtomicU64,
    /// Records consumed from this node's topic and handed to a shard; malformed ones.
    pub ingress: AtomicU64,
    pub ingress_bad: AtomicU64,
    /// Time from the store's commit to the relay's produce (µs, sum; count: items taken by
    /// the relay task).
    pub relay_queue_us: AtomicU64,
    pub relay_queue_count: AtomicU64,
    /// Time from a record's creation on the sending node to its consumption here (ms, sum
    /// over `ingress`; both clocks are the hosts' wall clocks).
    pub transit_ms: AtomicU64,
    /// This node's id and the live nodes with what they publish (`ws=ADDR tcp=ADDR`), as
    /// last read: `GET /cluster` on the admin port.
    pub view: std::sync::Mutex<(String, Vec<(String, String)>)>,
}

impl ClusterStats {
    /// `GET /cluster`: `{"node":ID,"nodes":[{"id":..,"ws":..,"tcp":..}]}`, nodes by id.
    pub fn view_json(&self) -> String {
        let view = match self.view.lock() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        let nodes: Vec<serde_json::Value> = view
            .1
            .iter()
            .map(|(id, info)| {
                let field = |k: &str| {
                    info.split(' ')
                        .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                        .unwrap_or("")
                        .to_string()
                };
                serde_json::json!({"id": id, "ws": field("ws"), "tcp": field("tcp")})
            })
            .collect();
        serde_json::json!({"node": view.0, "nodes": nodes}).to_string()
    }
}

impl ClusterStats {
    /// Appends the Prometheus text of these counters.
    pub fn render(&self, o: &mut String) {
        let rows: &[(&str, &str, &str, &AtomicU64)] = &[
            (
                "imgw_cluster_nodes",
                "gauge",
                "Live nodes in the registry (this one included).",
                &self.nodes,
            ),
            (
                "imgw_cluster_registered",
                "gauge",
                "1 while this node's registration is fresh.",
                &self.registered,
            ),
            (
                "imgw_cluster_nodes_dead_total",
                "counter",
                "Nodes declared dead by this node.",
                &self.dead,
            ),
            (
                "imgw_cluster_relayed_total",
                "counter",
                "Records produced to other nodes' topics and confirmed.",
                &self.relayed,
            ),
            (
                "imgw_cluster_relayed_presence_total",
                "counter",
                "Of the relayed records, presence changes.",
                &self.relayed_presence,
            ),
            (
                "imgw_cluster_relay_failed_total",
                "counter",
                "Relay records Kafka did not confirm.",
                &self.relay_failed,
            ),
            (
                "imgw_cluster_relay_dropped_total",
                "counter",
                "Relays dropped (queue full, or routes unknown while Redis failed).",
                &self.relay_dropped,
            ),
            (
                "imgw_cluster_route_cache_hits_total",
                "counter",
                "Recipient node lookups answered by the route cache.",
                &self.route_cache_hits,
            ),
            (
                "imgw_cluster_route_lookups_total",
                "counter",
                "Recipient node lookups sent to Redis.",
                &self.route_lookups,
            ),
            (
                "imgw_cluster_route_announcements_total",
                "counter",
                "Devices coming up on any node, heard on the routes channel.",
                &self.route_announcements,
            ),
            (
                "imgw_cluster_groups_here",
                "gauge",
                "Groups with online members on this node (announced in Redis).",
                &self.groups_here,
            ),
            (
                "imgw_cluster_group_lookups_total",
                "counter",
                "Group node sets read from Redis for group relays.",
                &self.group_lookups,
            ),
            (
                "imgw_cluster_ingress_total",
                "counter",
                "Records from this node's topic handed to a shard.",
                &self.ingress,
            ),
            (
                "imgw_cluster_ingress_bad_total",
                "counter",
                "Malformed records on this node's topic (skipped).",
                &self.ingress_bad,
            ),
        ];
        render_rows(o, rows);
        let r = Ordering::Relaxed;
        let _ = std::fmt::Write::write_fmt(
            o,
            format_args!(
                "# HELP imgw_cluster_relay_queue_seconds From the store's commit to the relay's produce.\n\
                 # TYPE imgw_cluster_relay_queue_seconds summary\n\
                 imgw_cluster_relay_queue_seconds_sum {:.6}\nimgw_cluster_relay_queue_seconds_count {}\n\
                 # HELP imgw_cluster_relay_transit_seconds From a relay record's creation on its node to its consumption here.\n\
                 # TYPE imgw_cluster_relay_transit_seconds summary\n\
                 imgw_cluster_relay_transit_seconds_sum {:.3}\nimgw_cluster_relay_transit_seconds_count {}\n",
                self.relay_queue_us.load(r) as f64 / 1e6,
                self.relay_queue_count.load(r),
                self.transit_ms.load(r) as f64 / 1e3,
                self.ingress.load(r),
            ),
        );
    }
}
