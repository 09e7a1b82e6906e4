//! External services on the I/O core (SPEC 6): Redis (presence with a TTL, session routes,
//! send dedupe keys) and Kafka (the messages topic, routed business events, the push ingress
//! topic). docs/ARCHITECTURE.md "Services" describes how they sit beside the store.
//!
//! Both run as tokio tasks on the I/O core's current-thread runtime. The I/O core's loop never
//! waits for Redis; it waits for Kafka only for a free in-flight slot (bounded), never for a
//! delivery report: those are awaited by one task per batch.
//!
//! Their counters ([`crate::metrics::ServiceStats`], [`crate::metrics::ClusterStats`]) are
//! defined in [`crate::metrics`], which renders them.

pub mod cluster;
pub mod kafka;
pub mod push;
pub mod redis;

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
