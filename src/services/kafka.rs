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
//!
//! At durability `backend` a record that fails fails its `send` (the client resends). At
//! `local` the send was acked already, so the records are kept until confirmed (`Local`):
//! librdkafka retries them in order for as long as the broker is away (no message timeout),
//! and what it still hands back (queue full, a fenced producer) waits in a bounded backlog
//! and is produced again, in order per conversation.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use super::push::{parse_push, PushRecord};
use super::ServiceError;
use crate::config::KafkaConfig;
use crate::metrics::ServiceStats;
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
    /// Counts the producers: the one a record was enqueued on is current, or was replaced.
    generation: u64,
    /// Durability `local`: the records not yet confirmed and the backlog.
    local: Local,
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

/// One record at durability `local`, kept until the broker confirmed it.
pub struct Held {
    /// Orders the records (assigned when first produced): a record produced again goes back
    /// to its place in its conversation's backlog.
    seq: u64,
    /// The producer generation it was last enqueued on.
    generation: u64,
    mid: u64,
    topic: Arc<str>,
    /// The conversation ([`conversation_key`]).
    key: Arc<str>,
    payload: Arc<[u8]>,
}

/// An accepted message as Kafka records: one value under one key, for each of its topics.
struct Record {
    key: Arc<str>,
    payload: Arc<[u8]>,
    topics: Vec<Arc<str>>,
}

/// A [`Held`] record enqueued on the producer, and its delivery report ([`watch`]).
pub struct Sent {
    held: Held,
    report: DeliveryFuture,
}

/// How often the backlog is produced again, and how many records at most each time (the
/// I/O core's thread does it, between batches).
const RETRY_EVERY: Duration = Duration::from_millis(100);
const RETRY_CHUNK: usize = 4_096;
/// Records given up are logged at most this often (with their count).
const GIVE_UP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether a failure can be cured by producing the record again: the producer refused or lost
/// it (queue full, fatal or fenced, purged when replaced, report lost). librdkafka retries
/// everything else that is transient by itself (at `local` without a time limit), so any other
/// error it reports concerns the record (too large, not authorized, no such topic).
fn retriable(e: &KafkaError) -> bool {
    if matches!(e, KafkaError::Canceled) {
        return true;
    }
    e.rdkafka_error_code().is_some_and(|c| {
        fence(c)
            || matches!(
                c,
                RDKafkaErrorCode::QueueFull
                    | RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::PurgeQueue
                    | RDKafkaErrorCode::PurgeInflight
                    | RDKafkaErrorCode::MessageTimedOut
            )
    })
}

/// The errors of a producer the broker no longer accepts (its id or epoch).
fn fence(c: RDKafkaErrorCode) -> bool {
    matches!(
        c,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::InvalidProducerIdMapping
    )
}

/// Enqueues `h` on `producer` (never blocks).
fn enqueue(producer: &FutureProducer, h: &Held) -> Result<DeliveryFuture, KafkaError> {
    let mid = h.mid.to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: "mid",
        value: Some(&mid),
    });
    let rec = FutureRecord::to(&h.topic)
        .key(&*h.key)
        .payload(&*h.payload)
        .headers(headers);
    producer.send_result(rec).map_err(|(e, _)| e)
}

/// One conversation's records at durability `local`.
#[derive(Default)]
struct Lane {
    /// Records enqueued on the current producer, and on producers replaced since (those all
    /// report, most of them failures).
    live: u32,
    stale: u32,
    /// Records to produce again, by `seq`.
    backlog: VecDeque<Held>,
}

/// The records of durability `local` until the broker confirmed them, per conversation.
///
/// Order per conversation holds because a record goes to the producer only when everything
/// before it in its conversation did: a new record waits behind its conversation's backlog
/// and behind records still on a replaced producer; the backlog goes to the producer only
/// when none of the conversation's records is in flight (so every failure that could come
/// back is in it, sorted). librdkafka itself keeps the order of what it holds (idempotent
/// producer, no message timeout).
struct Local {
    lanes: HashMap<Arc<str>, Lane>,
    /// Conversations whose backlog is not empty.
    waiting: HashSet<Arc<str>>,
    /// Records in every backlog together (at most `retry_max`), and in flight.
    backlog: usize,
    in_flight: usize,
    retry_max: usize,
    next_seq: u64,
    /// Records given up and not logged yet; when the last warning was logged.
    unlogged: u64,
    logged_at: Option<Instant>,
    stats: Arc<ServiceStats>,
}

impl Local {
    fn new(retry_max: usize, stats: Arc<ServiceStats>) -> Local {
        Local {
            lanes: HashMap::new(),
            waiting: HashSet::new(),
            backlog: 0,
            in_flight: 0,
            retry_max,
            next_seq: 0,
            unlogged: 0,
            logged_at: None,
            stats,
        }
    }

    /// Records not confirmed yet (in flight or in the backlog).
    fn pending(&self) -> usize {
        self.in_flight + self.backlog
    }

    /// Whether a new record of `key` must wait (behind the backlog, or behind records on a
    /// replaced producer that may come back failed).
    fn must_wait(&self, key: &str) -> bool {
        self.lanes
            .get(key)
            .is_some_and(|l| !l.backlog.is_empty() || l.stale > 0)
    }

    /// `h` was enqueued on the current producer.
    fn enqueued(&mut self, h: &Held) {
        self.lanes.entry(h.key.clone()).or_default().live += 1;
        self.in_flight += 1;
    }

    /// `h`'s report came; `generation` is the current producer's.
    fn settled(&mut self, h: &Held, generation: u64) {
        if let Some(lane) = self.lanes.get_mut(&h.key) {
            if h.generation == generation {
                lane.live = lane.live.saturating_sub(1);
            } else {
                lane.stale = lane.stale.saturating_sub(1);
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.tidy(&h.key);
    }

    /// The producer was replaced: every record in flight is on the old one.
    fn retire(&mut self) {
        for lane in self.lanes.values_mut() {
            lane.stale += std::mem::take(&mut lane.live);
        }
    }

    /// Puts `h` in its conversation's backlog, at its place; gives it up when the backlog is
    /// full.
    fn hold_back(&mut self, h: Held) {
        if self.backlog >= self.retry_max {
            self.give_up(h, "the backlog is full (kafka.retry_max)");
            return;
        }
        let lane = self.lanes.entry(h.key.clone()).or_default();
        let at = lane.backlog.partition_point(|o| o.seq < h.seq);
        if lane.backlog.is_empty() {
            self.waiting.insert(h.key.clone());
        }
        lane.backlog.insert(at, h);
        self.backlog += 1;
        self.gauge();
    }

    /// Takes up to `max` records from the backlogs of the conversations with nothing in
    /// flight, in order per conversation.
    fn take_ready(&mut self, max: usize) -> Vec<Held> {
        let mut out = Vec::new();
        let ready: Vec<Arc<str>> = self
            .waiting
            .iter()
            .filter(|k| {
                self.lanes
                    .get(*k)
                    .is_some_and(|l| l.live == 0 && l.stale == 0)
            })
            .cloned()
            .collect();
        for key in ready {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            while out.len() < max {
                let Some(h) = lane.backlog.pop_front() else {
                    break;
                };
                out.push(h);
            }
            if lane.backlog.is_empty() {
                self.waiting.remove(&key);
            }
            if out.len() >= max {
                break;
            }
        }
        self.backlog -= out.len();
        self.gauge();
        out
    }

    /// Counts and (rate-limited) logs a record that will not be on its topic.
    fn give_up(&mut self, h: Held, why: &str) {
        self.stats.kafka_given_up.fetch_add(1, Relaxed);
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .logged_at
            .is_none_or(|t| now.duration_since(t) >= GIVE_UP_LOG_EVERY)
        {
            tracing::warn!(
                records = self.unlogged,
                last_mid = h.mid,
                topic = %h.topic,
                reason = why,
                "kafka records given up: acked messages missing from the topic"
            );
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
        self.tidy(&h.key);
    }

    /// At shutdown: what is still pending will not be on the topic.
    fn abandon(&mut self) {
        let n = self.pending() as u64;
        if n > 0 {
            self.stats.kafka_given_up.fetch_add(n, Relaxed);
            tracing::warn!(
                records = n,
                "kafka records not confirmed at shutdown: given up"
            );
        }
        self.lanes.clear();
        self.waiting.clear();
        self.backlog = 0;
        self.in_flight = 0;
        self.gauge();
    }

    /// Forgets `key`'s lane once it holds nothing.
    fn tidy(&mut self, key: &str) {
        if self
            .lanes
            .get(key)
            .is_some_and(|l| l.live == 0 && l.stale == 0 && l.backlog.is_empty())
        {
            self.lanes.remove(key);
        }
    }

    fn gauge(&self) {
        self.stats.kafka_backlog.store(self.backlog as u64, Relaxed);
    }
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
    /// start only makes the first produces wait or fail. `local`: durability `local`, whose
    /// records have no time limit (librdkafka retries them, in order, until the broker
    /// confirms) and are produced again when they fail ([`Kafka::produce_local`]).
    pub fn new(
        cfg: &KafkaConfig,
        stats: Arc<ServiceStats>,
        local: bool,
    ) -> Result<Kafka, ServiceError> {
        let mut c = client_config(cfg)?;
        // 0: no timeout. A record that timed out would leave a gap that later records of its
        // partition, still queued, close: produced again, it would come after them.
        let timeout = if local { 0 } else { cfg.produce_timeout_ms };
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout.to_string())
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
            generation: 0,
            local: Local::new(cfg.retry_max as usize, stats.clone()),
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
    pub fn settle(&mut self, mid: u64, ok: bool, error: Option<&KafkaError>) {
        self.in_flight.remove(&mid);
        if !ok {
            let fenced = error
                .and_then(|e| e.rdkafka_error_code())
                .is_some_and(fence);
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
                self.generation += 1;
                self.local.retire();
                let old = std::mem::replace(&mut self.producer, fresh);
                // Dropping a producer purges and joins its thread: not on the I/O core.
                let _ = std::thread::Builder::new()
                    .name("imgw-kafka-drop".into())
                    .spawn(move || drop(old));
            }
            Err(e) => tracing::warn!(error = %e, "kafka producer could not be replaced"),
        }
    }

    /// The record of `deliver` (accepted as `mid`/`seq`/`ts`): its key, its value, and the
    /// topics it goes to (the messages topic and every route its type matches).
    fn record(
        &self,
        tenant: &str,
        dest: &Dest,
        cmid: &str,
        deliver: &Deliver,
    ) -> Result<Record, String> {
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
        let mut topics: Vec<Arc<str>> = vec![self.cfg.messages_topic.as_str().into()];
        if let Some(kind) = &deliver.kind {
            for r in &self.cfg.routes {
                if kind.starts_with(r.prefix.as_str()) && !topics.iter().any(|t| **t == r.topic) {
                    topics.push(r.topic.as_str().into());
                }
            }
        }
        Ok(Record {
            key: key.into(),
            payload: payload.into(),
            topics,
        })
    }

    /// Durability `backend`: enqueues `deliver`'s records (`Kafka::record`). Records that
    /// librdkafka refused at once (queue full) are returned as errors: the caller fails the
    /// send.
    pub fn produce(
        &mut self,
        tenant: &str,
        dest: &Dest,
        cmid: &str,
        deliver: &Deliver,
    ) -> Result<Vec<Produced>, String> {
        let Record {
            key,
            payload,
            topics,
        } = self.record(tenant, dest, cmid, deliver)?;
        let mut out = Vec::with_capacity(topics.len());
        for topic in topics {
            let h = Held {
                seq: 0,
                generation: self.generation,
                mid: deliver.mid,
                topic,
                key: key.clone(),
                payload: payload.clone(),
            };
            match enqueue(&self.producer, &h) {
                Ok(report) => out.push(Produced {
                    mid: deliver.mid,
                    report,
                }),
                Err(e) => {
                    self.stats.kafka_failed.fetch_add(1, Relaxed);
                    return Err(format!("kafka enqueue: {e}"));
                }
            }
        }
        self.in_flight.insert(deliver.mid);
        Ok(out)
    }

    /// Durability `local`: enqueues `deliver`'s records (`Kafka::record`) unless their
    /// conversation has records to produce first (then they wait in the backlog), and appends
    /// the enqueued ones to `sent`, whose reports [`watch`] awaits.
    pub fn produce_local(
        &mut self,
        tenant: &str,
        dest: &Dest,
        cmid: &str,
        deliver: &Deliver,
        sent: &mut Vec<Sent>,
    ) {
        let Record {
            key,
            payload,
            topics,
        } = match self.record(tenant, dest, cmid, deliver) {
            Ok(r) => r,
            Err(e) => {
                // Not reached: the record is plain strings and numbers.
                tracing::warn!(mid = deliver.mid, error = %e, "kafka record not encoded");
                self.stats.kafka_given_up.fetch_add(1, Relaxed);
                return;
            }
        };
        for topic in topics {
            self.local.next_seq += 1;
            let h = Held {
                seq: self.local.next_seq,
                generation: self.generation,
                mid: deliver.mid,
                topic,
                key: key.clone(),
                payload: payload.clone(),
            };
            if self.local.must_wait(&h.key) {
                self.local.hold_back(h);
                continue;
            }
            match enqueue(&self.producer, &h) {
                Ok(report) => {
                    self.local.enqueued(&h);
                    sent.push(Sent { held: h, report });
                }
                Err(e) => self.failed_local(h, &e),
            }
        }
    }

    /// A record of durability `local` failed: produced again later, or given up.
    fn failed_local(&mut self, h: Held, e: &KafkaError) {
        self.stats.kafka_failed.fetch_add(1, Relaxed);
        self.recover_if_fatal(e.rdkafka_error_code().is_some_and(fence));
        if retriable(e) {
            self.local.hold_back(h);
        } else {
            self.local.give_up(h, &e.to_string());
        }
    }

    /// The report of a record of durability `local` came.
    fn settle_local(&mut self, h: Held, outcome: Result<(), KafkaError>) {
        self.local.settled(&h, self.generation);
        match outcome {
            Ok(()) => {
                self.stats.kafka_produced.fetch_add(1, Relaxed);
            }
            Err(e) => {
                tracing::debug!(mid = h.mid, error = %e, "kafka did not confirm; kept");
                self.failed_local(h, &e);
            }
        }
    }

    /// Enqueues up to `max` records of the backlog, those of conversations with nothing in
    /// flight, in order per conversation. Stops at the first refusal that concerns the
    /// producer (queue full, fatal): the rest waits for the next round.
    fn retry_backlog(&mut self, max: usize) -> Vec<Sent> {
        let mut out = Vec::new();
        let mut ready = self.local.take_ready(max).into_iter();
        while let Some(mut h) = ready.next() {
            h.generation = self.generation;
            match enqueue(&self.producer, &h) {
                Ok(report) => {
                    self.local.enqueued(&h);
                    self.stats.kafka_retried.fetch_add(1, Relaxed);
                    out.push(Sent { held: h, report });
                }
                Err(e) if retriable(&e) => {
                    self.local.hold_back(h);
                    for h in ready.by_ref() {
                        self.local.hold_back(h);
                    }
                    self.recover_if_fatal(e.rdkafka_error_code().is_some_and(fence));
                }
                Err(e) => {
                    self.stats.kafka_failed.fetch_add(1, Relaxed);
                    self.local.give_up(h, &e.to_string());
                }
            }
        }
        out
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

/// Awaits the reports of records of durability `local` and settles each as it comes: a failed
/// one goes back to its place in its conversation's backlog (or is given up). Reports have no
/// time limit at `local`; there are at most `kafka.queue_max` records in flight.
pub async fn watch(kafka: Rc<RefCell<Kafka>>, sent: Vec<Sent>) {
    use futures_util::stream::{FuturesUnordered, StreamExt as _};
    let (stats, started) = (kafka.borrow().stats.clone(), Instant::now());
    stats.kafka_in_flight.fetch_add(1, Relaxed);
    let mut reports: FuturesUnordered<_> = sent
        .into_iter()
        .map(|s| async move {
            let outcome = match s.report.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                // The producer dropped the report (replaced).
                Err(_) => Err(KafkaError::Canceled),
            };
            (s.held, outcome)
        })
        .collect();
    while let Some((held, outcome)) = reports.next().await {
        kafka.borrow_mut().settle_local(held, outcome);
    }
    let us = started.elapsed().as_micros() as u64;
    stats.kafka_confirm.record_us(us);
    stats.kafka_in_flight.fetch_sub(1, Relaxed);
}

/// Durability `local`: produces the backlog again every 100 ms (`RETRY_EVERY`), until the
/// runtime stops.
pub async fn retry_local(kafka: Rc<RefCell<Kafka>>) {
    let mut tick = tokio::time::interval(RETRY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sent = kafka.borrow_mut().retry_backlog(RETRY_CHUNK);
        if !sent.is_empty() {
            tokio::task::spawn_local(watch(kafka.clone(), sent));
        }
    }
}

/// Durability `local`, at shutdown: waits (at most `within`) until every record was
/// confirmed; what is left is counted as given up.
pub async fn flush_local(kafka: &Rc<RefCell<Kafka>>, within: Duration) {
    let deadline = Instant::now() + within;
    while kafka.borrow().local.pending() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kafka.borrow_mut().local.abandon();
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

    fn held(seq: u64, key: &str, generation: u64) -> Held {
        Held {
            seq,
            generation,
            mid: seq,
            topic: "m".into(),
            key: key.into(),
            payload: Arc::from(&b"{}"[..]),
        }
    }

    fn seqs(v: &[Held]) -> Vec<u64> {
        v.iter().map(|h| h.seq).collect()
    }

    /// A record refused at once (queue full) waits, and the later records of its conversation
    /// wait behind it; other conversations go on; the backlog is taken only once nothing of
    /// the conversation is in flight.
    #[test]
    fn a_conversation_with_a_backlog_keeps_its_order() {
        let stats = Arc::new(ServiceStats::default());
        let mut l = Local::new(10, stats.clone());
        let (a1, a2) = (held(1, "a", 0), held(2, "a", 0));
        l.enqueued(&a1);
        assert!(!l.must_wait("a"));
        l.hold_back(a2); // queue full
        assert!(l.must_wait("a"), "a3 must wait behind a2");
        l.hold_back(held(3, "a", 0));
        assert!(!l.must_wait("b"));
        l.enqueued(&held(4, "b", 0));
        assert_eq!(stats.kafka_backlog.load(Relaxed), 2);
        assert!(l.take_ready(100).is_empty(), "a1 is in flight");
        l.settled(&a1, 0);
        let ready = l.take_ready(100);
        assert_eq!(seqs(&ready), [2, 3]);
        assert_eq!(stats.kafka_backlog.load(Relaxed), 0);
        assert_eq!(l.pending(), 1, "b4 still in flight");
    }

    /// Records on a replaced producer fail after records of their conversation arrived: those
    /// wait, and the failed ones go back before them.
    #[test]
    fn a_replaced_producers_records_go_back_before_later_ones() {
        let stats = Arc::new(ServiceStats::default());
        let mut l = Local::new(10, stats);
        let (a1, a2) = (held(1, "a", 0), held(2, "a", 0));
        l.enqueued(&a1);
        l.enqueued(&a2);
        l.retire(); // generation 1 now
        assert!(l.must_wait("a"), "a1 and a2 may still fail");
        l.hold_back(held(3, "a", 1));
        l.settled(&a2, 1);
        l.hold_back(a2);
        assert!(l.take_ready(100).is_empty(), "a1 still on the old producer");
        l.settled(&a1, 1);
        l.hold_back(a1);
        let ready = l.take_ready(100);
        assert_eq!(seqs(&ready), [1, 2, 3]);
        assert!(!l.must_wait("a"));
    }

    #[test]
    fn the_backlog_is_bounded_and_taken_in_chunks() {
        let stats = Arc::new(ServiceStats::default());
        let mut l = Local::new(3, stats.clone());
        for seq in 1..=5 {
            l.hold_back(held(seq, if seq % 2 == 0 { "b" } else { "a" }, 0));
        }
        assert_eq!(stats.kafka_backlog.load(Relaxed), 3);
        assert_eq!(stats.kafka_given_up.load(Relaxed), 2);
        let first = l.take_ready(2);
        assert_eq!(first.len(), 2);
        assert_eq!(stats.kafka_backlog.load(Relaxed), 1);
        let rest = l.take_ready(2);
        assert_eq!(rest.len(), 1);
        let mut all = seqs(&first);
        all.extend(seqs(&rest));
        all.sort_unstable();
        assert_eq!(all, [1, 2, 3]);
        l.abandon();
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn only_failures_of_the_producer_are_retried() {
        let code = |c| KafkaError::MessageProduction(c);
        assert!(retriable(&code(RDKafkaErrorCode::QueueFull)));
        assert!(retriable(&code(RDKafkaErrorCode::ProducerFenced)));
        assert!(retriable(&code(RDKafkaErrorCode::PurgeInflight)));
        assert!(retriable(&KafkaError::Canceled));
        assert!(!retriable(&code(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(!retriable(&code(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
    }

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
