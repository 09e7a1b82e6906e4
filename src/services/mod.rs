//! External services on the I/O core (SPEC 6): Redis (presence with a TTL, session routes,
//! send dedupe keys) and Kafka (the messages topic, routed business events, the push ingress
//! topic). docs/ARCHITECTURE.md "Services" describes how they sit beside the store.
//!
//! Both run as tokio tasks on the I/O core's current-thread runtime. The I/O core's loop never
//! waits for Redis; it waits for Kafka only for a free in-flight slot (bounded), never for a
//! delivery report: those are awaited by one task per batch.

pub mod cluster;
pub mod kafka;
pub mod push;
pub mod redis;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a service could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The Redis URL does not parse, or the client refused it.
    #[error("redis: {0}")]
    Redis(String),
    /// The Kafka client could not be created (bad broker list or configuration).
    #[error("kafka client: {0}")]
    KafkaClient(String),
    /// A topic could not be created (other than "already exists").
    #[error("kafka topic {topic}: {detail}")]
    KafkaTopic { topic: String, detail: String },
}

/// Counters of the services, rendered on /metrics.
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
    pub kafka_confirm: crate::metrics::LatencyHist,
    /// Time of a Redis pipeline that succeeded, sent to answered.
    pub redis_pipeline: crate::metrics::LatencyHist,
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
