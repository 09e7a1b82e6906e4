//! Kafka on the I/O core: the messages topic, routed business events and the push ingress.
//!
//! - Every accepted message (1:1 and group; not a duplicate) is appended to
//!   `kafka.messages_topic`, keyed by conversation ([`conversation_key`]), with its mid in the
//!   `mid` header, by an idempotent producer with `acks=all`. The record is JSON
//!   ([`MessageRecord`], docs/PROTOCOL.md "Kafka records").
//! - A `send` whose `type` starts with a route's prefix is also appended to the route's topic
//!   (same record, same key). It is still stored and delivered as usual.
//! - The push ingress topic is consumed; each record ([`PushRecord`]) is parsed and handed to
//!   the owner shard of its user or group. Malformed records are counted and skipped.
//!
//! The producer never blocks: `send_result` only enqueues into librdkafka's bounded queue
//! (`kafka.queue_max`); the delivery reports are futures awaited elsewhere.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use super::push::{parse_push, PushRecord};
use super::{ServiceError, ServiceStats};
use crate::config::KafkaConfig;
use crate::protocol::{Deliver, Str};

/// The JSON value of a record on the messages topic (and on routed topics).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRecord {
    pub tenant: String,
    pub mid: u64,
    pub from: String,
    /// The recipient of a 1:1 message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to: Option<String>,
    /// The group of a group message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub group: Option<String>,
    /// `inbox_seq` of the recipient (1:1) or `gseq` (group).
    pub seq: u64,
    pub ts: u64,
    pub cmid: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
    pub body: String,
}

/// Where an accepted message went.
#[derive(Clone, Debug)]
pub enum Dest {
    User(Str),
    Group(Str),
}

/// The record key of a conversation: `{tenant}/u/{a}/{b}` for a pair (the two users in byte
/// order, so both directions share a partition and keep their order) or `{tenant}/g/{group}`.
pub fn conversation_key(tenant: &str, from: &str, dest: &Dest) -> String {
    match dest {
        Dest::User(to) => {
            let to: &str = to;
            let (a, b) = if from <= to { (from, to) } else { (to, from) };
            format!("{tenant}/u/{a}/{b}")
        }
        Dest::Group(g) => format!("{tenant}/g/{g}"),
    }
}

/// The producer and what it needs to pick topics.
pub struct Kafka {
    producer: FutureProducer,
    /// The producer's configuration, to replace it after a fatal error.
    producer_cfg: ClientConfig,
    /// When the producer was last replaced.
    replaced_at: Option<std::time::Instant>,
    pub cfg: KafkaConfig,
    pub stats: Arc<ServiceStats>,
    /// Mids confirmed on the messages topic, newest last, at most `confirmed_max`.
    confirmed: HashSet<u64>,
    confirmed_order: VecDeque<u64>,
    /// Mids whose delivery reports are being awaited.
    in_flight: HashSet<u64>,
}

/// One produced record whose report is pending.
pub struct Produced {
    pub mid: u64,
    pub report: DeliveryFuture,
}

fn client_config(cfg: &KafkaConfig) -> Result<ClientConfig, ServiceError> {
    let brokers = cfg
        .brokers
        .as_deref()
        .ok_or_else(|| ServiceError::KafkaClient("no brokers".into()))?;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "5000")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000");
    Ok(c)
}

impl Kafka {
    /// Creates the idempotent producer (acks=all). Connects lazily: a broker that is down at
    /// start only makes the first produces wait or fail.
    pub fn new(cfg: &KafkaConfig, stats: Arc<ServiceStats>) -> Result<Kafka, ServiceError> {
        let mut c = client_config(cfg)?;
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", cfg.produce_timeout_ms.to_string())
            .set("linger.ms", cfg.linger_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.queue_max.max(1).to_string(),
            );
        let producer: FutureProducer = c
            .create()
            .map_err(|e| ServiceError::KafkaClient(e.to_string()))?;
        Ok(Kafka {
            producer,
            producer_cfg: c,
            replaced_at: None,
            cfg: cfg.clone(),
            stats,
            confirmed: HashSet::new(),
            confirmed_order: VecDeque::new(),
            in_flight: HashSet::new(),
        })
    }

    /// Whether `mid` was confirmed on the messages topic (within the remembered window).
    pub fn is_confirmed(&self, mid: u64) -> bool {
        self.confirmed.contains(&mid)
    }

    /// Whether a produce of `mid` awaits its report.
    pub fn is_in_flight(&self, mid: u64) -> bool {
        self.in_flight.contains(&mid)
    }

    /// Records the outcome of `mid`'s produce; `error` is the failure, if any.
    pub fn settle(&mut self, mid: u64, ok: bool, error: Option<&rdkafka::error::KafkaError>) {
        self.in_flight.remove(&mid);
        if !ok {
            let fenced = error.and_then(|e| e.rdkafka_error_code()).is_some_and(|c| {
                matches!(
                    c,
                    RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                        | RDKafkaErrorCode::UnknownProducerId
                        | RDKafkaErrorCode::OutOfOrderSequenceNumber
                        | RDKafkaErrorCode::InvalidProducerIdMapping
                )
            });
            self.recover_if_fatal(fenced);
        }
        if ok && self.confirmed.insert(mid) {
            self.confirmed_order.push_back(mid);
            while self.confirmed_order.len() > self.cfg.confirmed_max as usize {
                if let Some(old) = self.confirmed_order.pop_front() {
                    self.confirmed.remove(&old);
                }
            }
        }
    }

    /// An idempotent producer that hit a fatal error (e.g. fenced: after timed-out records it
    /// bumps its epoch, and a broker that lost its state refuses it) fails every later record.
    /// Replace it with a fresh producer (a new producer id); the old one's records fail, so
    /// their sends got `unavailable` and are produced again when resent.
    fn recover_if_fatal(&mut self, fenced: bool) {
        let fatal = self.producer.client().fatal_error();
        if fatal.is_none() && !fenced {
            return;
        }
        // One replacement per second at most: the old producer's pending records all fail
        // with the same error.
        let now = std::time::Instant::now();
        if self
            .replaced_at
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.replaced_at = Some(now);
        let (code, reason) = fatal.unwrap_or((RDKafkaErrorCode::ProducerFenced, "fenced".into()));
        match self.producer_cfg.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(?code, %reason, "kafka producer failed fatally; replaced");
                self.stats.kafka_resets.fetch_add(1, Relaxed);
                let old = std::mem::replace(&mut self.producer, fresh);
                // Dropping a producer purges and joins its thread: not on the I/O core.
                let _ = std::thread::Builder::new()
                    .name("imgw-kafka-drop".into())
                    .spawn(move || drop(old));
            }
            Err(e) => tracing::warn!(error = %e, "kafka producer could not be replaced"),
        }
    }

    /// Enqueues `deliver` (accepted as `mid`/`seq`/`ts`) on the messages topic and on every
    /// route its type matches. Records that librdkafka refused at once (queue full) are
    /// returned as errors: the caller fails the send.
    pub fn produce(
        &mut self,
        tenant: &str,
        dest: &Dest,
        cmid: &str,
        deliver: &Deliver,
    ) -> Result<Vec<Produced>, String> {
        let record = MessageRecord {
            tenant: tenant.to_string(),
            mid: deliver.mid,
            from: deliver.from.to_string(),
            to: match dest {
                Dest::User(u) => Some(u.to_string()),
                Dest::Group(_) => None,
            },
            group: match dest {
                Dest::Group(g) => Some(g.to_string()),
                Dest::User(_) => None,
            },
            seq: deliver.inbox_seq,
            ts: deliver.ts,
            cmid: cmid.to_string(),
            kind: deliver.kind.as_ref().map(|k| k.to_string()),
            body: deliver.body.to_string(),
        };
        let payload = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let key = conversation_key(tenant, &deliver.from, dest);
        let mid_text = deliver.mid.to_string();
        let mut topics: Vec<&str> = vec![&self.cfg.messages_topic];
        if let Some(kind) = &deliver.kind {
            for r in &self.cfg.routes {
                if kind.starts_with(r.prefix.as_str()) && !topics.contains(&r.topic.as_str()) {
                    topics.push(&r.topic);
                }
            }
        }
        let mut out = Vec::with_capacity(topics.len());
        for topic in topics {
            let headers = OwnedHeaders::new().insert(Header {
                key: "mid",
                value: Some(&mid_text),
            });
            let rec = FutureRecord::to(topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            match self.producer.send_result(rec) {
                Ok(report) => out.push(Produced {
                    mid: deliver.mid,
                    report,
                }),
                Err((e, _)) => {
                    self.stats.kafka_failed.fetch_add(1, Relaxed);
                    return Err(format!("kafka enqueue: {e}"));
                }
            }
        }
        self.in_flight.insert(deliver.mid);
        Ok(out)
    }

    /// Enqueues one record as it is (cluster relays: src/services/cluster.rs); `Err` when
    /// librdkafka refused it at once (queue full).
    pub fn send_raw(
        &self,
        rec: FutureRecord<'_, String, Vec<u8>>,
    ) -> Result<DeliveryFuture, String> {
        self.producer
            .send_result(rec)
            .map_err(|(e, _)| format!("kafka enqueue: {e}"))
    }
}

/// Creates the messages, push and route topics and `extra` (a cluster node's own topic);
/// "already exists" counts as success.
pub async fn ensure_topics(cfg: &KafkaConfig, extra: Option<&str>) -> Result<(), ServiceError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)?
        .create()
        .map_err(|e| ServiceError::KafkaClient(e.to_string()))?;
    let mut names: Vec<&str> = vec![&cfg.messages_topic];
    if !cfg.push_topic.is_empty() {
        names.push(&cfg.push_topic);
    }
    for r in &cfg.routes {
        if !names.contains(&r.topic.as_str()) {
            names.push(&r.topic);
        }
    }
    names.extend(extra);
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, cfg.partitions, TopicReplication::Fixed(cfg.replication)))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(topics.iter(), &opts)
        .await
        .map_err(|e| ServiceError::KafkaTopic {
            topic: names.join(","),
            detail: e.to_string(),
        })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(ServiceError::KafkaTopic {
                    topic,
                    detail: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Consumes the push ingress topic until the runtime stops, handing each valid record to
/// `sink`. `sink` gives the record back when the shard's queue is full: the consumer then
/// waits and retries (back-pressure on the topic, never a drop of a valid record).
pub fn start_push_consumer<F>(
    cfg: &KafkaConfig,
    max_body: usize,
    stats: Arc<ServiceStats>,
    sink: F,
) -> Result<(), ServiceError>
where
    F: Fn(Box<PushRecord>) -> Result<(), Box<PushRecord>> + Send + 'static,
{
    let mut c = client_config(cfg)?;
    c.set("group.id", &cfg.push_group)
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000");
    let consumer: StreamConsumer = c
        .create()
        .map_err(|e| ServiceError::KafkaClient(e.to_string()))?;
    consumer
        .subscribe(&[&cfg.push_topic])
        .map_err(|e| ServiceError::KafkaClient(e.to_string()))?;
    let (received, bad, delivered) = (stats.clone(), stats.clone(), stats);
    let parse = move |m: &rdkafka::message::BorrowedMessage<'_>| {
        received.push_received.fetch_add(1, Relaxed);
        let payload = m.payload().ok_or_else(|| "empty record".to_string())?;
        let id = || format!("kafka:{}:{}", m.partition(), m.offset());
        parse_push(payload, id, max_body).map(Box::new)
    };
    let counts = Counts {
        what: "push",
        bad: move || bad.push_bad.fetch_add(1, Relaxed),
        ok: move || delivered.push_delivered.fetch_add(1, Relaxed),
    };
    tokio::spawn(consume(consumer, parse, sink, counts));
    Ok(())
}

/// What [`consume`] counts: malformed records and records handed over.
pub(crate) struct Counts<B, O> {
    /// Names the consumer in its log lines.
    pub what: &'static str,
    pub bad: B,
    pub ok: O,
}

/// Hands every record of `consumer` that `parse` accepts to `sink`, until the runtime stops.
/// A malformed record is counted and skipped; `sink` gives a record back when its shard's
/// queue is full, and the consumer then waits and retries (back-pressure on the topic, never
/// a drop of a valid record). A failing consumer is retried every 200 ms, with one warning
/// per outage (librdkafka logs the details itself).
pub(crate) async fn consume<T, P, F, B, O>(
    consumer: StreamConsumer,
    parse: P,
    sink: F,
    counts: Counts<B, O>,
) where
    P: Fn(&rdkafka::message::BorrowedMessage<'_>) -> Result<Box<T>, String>,
    F: Fn(Box<T>) -> Result<(), Box<T>>,
    B: Fn() -> u64,
    O: Fn() -> u64,
{
    let mut failing = false;
    loop {
        let mut rec = match consumer.recv().await {
            Ok(m) => {
                failing = false;
                match parse(&m) {
                    Ok(r) => r,
                    Err(e) => {
                        (counts.bad)();
                        tracing::debug!(error = %e, consumer = counts.what, "record dropped");
                        continue;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, consumer = counts.what, "consumer failing; retrying");
                }
                failing = true;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            match sink(rec) {
                Ok(()) => break,
                Err(back) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        (counts.ok)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_keys_are_symmetric() {
        let k1 = conversation_key("t", "alice", &Dest::User("bob".into()));
        let k2 = conversation_key("t", "bob", &Dest::User("alice".into()));
        assert_eq!(k1, k2);
        assert_eq!(k1, "t/u/alice/bob");
        assert_eq!(
            conversation_key("t", "x", &Dest::Group("g".into())),
            "t/g/g"
        );
    }
}
