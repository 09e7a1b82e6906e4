//! Cluster mode on the I/O core (SPEC 8; docs/ARCHITECTURE.md "Cluster"): what one node does
//! so that a fleet of nodes sharing one MariaDB, one Redis and one Kafka behaves as one
//! gateway. There is no node-to-node protocol beyond records on Kafka.
//!
//! This module owns:
//! - **Membership.** At start, before any shard mints a message id, the node claims a slot
//!   (`0..MAX_NODES`) in Redis ([`claim_slot`]); the slot is the node's bits in message ids, so
//!   two nodes never mint the same `mid`. A task then refreshes `{p}node:{id}` and the slot
//!   every `cluster.heartbeat_ms` with a TTL of `cluster.dead_after_ms`, keeps `{p}nodes` (the
//!   set of node ids), and drops from it the nodes whose key expired: a node that stopped
//!   refreshing is declared dead within `dead_after_ms` + one heartbeat. At shutdown the node
//!   deletes its keys (leaves at once).
//! - **Relay.** After the store commit, each fresh 1:1 message is relayed to every *other*
//!   live node where the recipient has a device (the nodes named in the Redis route hash), and
//!   each fresh group message to every other live node: one record per destination node,
//!   never one per device, on that node's topic `{topic_prefix}{node}`, keyed by the
//!   conversation's recipient so one recipient's records keep their order.
//! - **Ingress.** The node consumes its own topic, starting at its end when the node starts
//!   (records produced while it was down are not needed: the store has every message, and a
//!   reconnecting device syncs from its cursor), and hands each record to the owner shard of
//!   its user or group, which delivers to this node's devices without writing the store.
//!
//! Correctness never depends on a relay: per-device pushes are gapless (a device whose next
//! push does not follow its last one reads the gap from the shared store), so a relay that is
//! dropped, late or out of order costs latency, not messages.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::MultiplexedConnection;

use super::kafka::{Dest, Kafka};
use crate::codec::CodecId;
use crate::config::{ClusterConfig, KafkaConfig, RedisConfig};
use crate::iocore::Readiness;
use crate::metrics::ClusterStats;
use crate::protocol::{Deliver, Envelope, Message, Status, Str, Target};
use crate::twogen::TwoGen;

/// Slots a cluster has: the node's bits in message ids (6 bits).
pub const MAX_NODES: u8 = 64;

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Redis could not be reached or refused a command.
    #[error("redis: {0}")]
    Redis(String),
    /// Every slot is held by another live node.
    #[error("all {MAX_NODES} node slots are taken by live nodes")]
    Full,
}

fn route_key(prefix: &str, tenant: &str, user: &str) -> String {
    super::redis::user_key(prefix, "route", tenant, user)
}

/// The nodes with online members of a group (a set of node ids, at most one per slot).
fn group_nodes_key(prefix: &str, tenant: &str, group: &str) -> String {
    super::redis::user_key(prefix, "gnodes", tenant, group)
}

/// The groups a node announced itself in (`tenant\ngroup`), to take it out of them when it
/// leaves, restarts or is declared dead.
fn node_groups_key(prefix: &str, id: &str) -> String {
    format!("{prefix}ngroups:{id}")
}

fn node_key(prefix: &str, id: &str) -> String {
    format!("{prefix}node:{id}")
}

fn slot_key(prefix: &str, slot: u8) -> String {
    format!("{prefix}slot:{slot}")
}

fn nodes_key(prefix: &str) -> String {
    format!("{prefix}nodes")
}

/// The topic of node `id`.
pub fn node_topic(cfg: &ClusterConfig, id: &str) -> String {
    format!("{}{id}", cfg.topic_prefix)
}

/// Claims a slot for `node_id`: the first slot that is free or already this node's (a restart
/// within `dead_after_ms`). Blocking: called once at start, before the shards run.
pub fn claim_slot(
    redis_url: &str,
    prefix: &str,
    node_id: &str,
    ttl_ms: u64,
    timeout: Duration,
) -> Result<u8, ClusterError> {
    let err = |e: redis::RedisError| ClusterError::Redis(e.to_string());
    let client = redis::Client::open(redis_url).map_err(err)?;
    let mut c = client.get_connection_with_timeout(timeout).map_err(err)?;
    c.set_read_timeout(Some(timeout)).map_err(err)?;
    c.set_write_timeout(Some(timeout)).map_err(err)?;
    for slot in 0..MAX_NODES {
        let key = slot_key(prefix, slot);
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(node_id)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query(&mut c)
            .map_err(err)?;
        let holder: Option<String> = if set.is_some() {
            Some(node_id.to_string())
        } else {
            redis::cmd("GET").arg(&key).query(&mut c).map_err(err)?
        };
        if holder.as_deref() == Some(node_id) {
            return Ok(slot);
        }
    }
    Err(ClusterError::Full)
}

/// A remembered recipient: the nodes holding its devices, and when Redis said so.
#[derive(Clone, Debug)]
struct Routes {
    nodes: Vec<Str>,
    at: Instant,
}

/// Recipient (or group) -> nodes, bounded ([`TwoGen`], at most `capacity` entries).
/// Invalidation: a device coming up on any node is announced on `{p}routes` (a node gaining a
/// group's members on `{p}gnodes`) and evicts that entry on every node; as a backstop for a
/// lost announcement (the subscription was down), an entry is used for `ttl` after Redis
/// answered, then asked again.
struct RouteCache {
    map: TwoGen<(Str, Str), Routes>,
    ttl: Duration,
}

impl RouteCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        RouteCache {
            map: TwoGen::new(capacity),
            ttl,
        }
    }

    /// A fresh entry, if any.
    fn get(&mut self, key: &(Str, Str), now: Instant) -> Option<&Routes> {
        let ttl = self.ttl;
        self.map.get(key).filter(|r| now.duration_since(r.at) < ttl)
    }

    fn evict(&mut self, key: &(Str, Str)) {
        self.map.remove(key);
    }

    fn insert(&mut self, key: (Str, Str), routes: Routes) {
        self.map.insert(key, routes);
    }
}

/// What a node tells the other nodes.
// Messages are nearly every item: boxing their deliver would cost an allocation per relay to
// save memory on the rare joins and kicks.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RelayItem {
    /// An accepted message (its sequence assigned): to the nodes holding the recipient's
    /// devices, or for a group to the other nodes with online members of it.
    Message {
        tenant: Str,
        dest: Dest,
        deliver: Deliver,
    },
    /// A stored join or leave: to the nodes holding the member's devices, whose owner shard
    /// then fans the group's messages out to them (or stops).
    Member {
        tenant: Str,
        user: Str,
        group: Str,
        join: bool,
    },
    /// An admin kick: to the nodes holding the user's devices.
    Kick { tenant: Str, user: Str },
    /// A first subscriber on this node of a user with no devices here: to the nodes holding
    /// the user's devices, each of which answers with a `Presence` of its devices' status (a
    /// `busy` set before the subscription would otherwise show as `online`).
    Query { tenant: Str, user: Str },
    /// The status of a user's devices on this node changed (`Offline` when the last one
    /// left): to every other live node, whose owner shard of the user tells its subscribers.
    Presence {
        tenant: Str,
        user: Str,
        status: Status,
    },
}

impl RelayItem {
    fn tenant(&self) -> &Str {
        match self {
            RelayItem::Message { tenant, .. }
            | RelayItem::Member { tenant, .. }
            | RelayItem::Kick { tenant, .. }
            | RelayItem::Query { tenant, .. }
            | RelayItem::Presence { tenant, .. } => tenant,
        }
    }

    /// The group whose nodes with online members receive it.
    fn group(&self) -> Option<&Str> {
        match self {
            RelayItem::Message {
                dest: Dest::Group(g),
                ..
            } => Some(g),
            _ => None,
        }
    }

    /// Whether it goes to every other live node when Redis cannot say which nodes hold the
    /// user's devices: a kick, a presence query and a membership change cost those nodes a
    /// lookup that finds nothing (a node that does not know the user ignores the change).
    /// Dropped, the change would leave the user's devices out of the group's live messages
    /// until their next login. A message is not (the store has it: the devices read it at
    /// their next gap or sync).
    fn to_every_node_when_unresolved(&self) -> bool {
        matches!(
            self,
            RelayItem::Kick { .. } | RelayItem::Query { .. } | RelayItem::Member { .. }
        )
    }

    /// The user whose devices' nodes receive it; `None`: a group's nodes ([`Self::group`]),
    /// or every other live node.
    fn user(&self) -> Option<&Str> {
        match self {
            RelayItem::Message {
                dest: Dest::User(u),
                ..
            }
            | RelayItem::Member { user: u, .. }
            | RelayItem::Kick { user: u, .. }
            | RelayItem::Query { user: u, .. } => Some(u),
            RelayItem::Message {
                dest: Dest::Group(_),
                ..
            }
            | RelayItem::Presence { .. } => None,
        }
    }
}

/// A relayed record, for the owner shard of its user or group on this node.
#[allow(clippy::large_enum_variant)] // as RelayItem: delivers dominate
#[derive(Debug, PartialEq, Eq)]
pub enum Relayed {
    Deliver {
        tenant: Str,
        to: Target,
        deliver: Deliver,
    },
    Member {
        tenant: Str,
        user: Str,
        group: Str,
        join: bool,
    },
    Kick {
        tenant: Str,
        user: Str,
    },
    /// Another node asks for the status of the user's devices here.
    Query {
        tenant: Str,
        user: Str,
    },
    /// The user's devices on `node` now have `status`.
    Presence {
        tenant: Str,
        user: Str,
        node: Str,
        status: Status,
    },
    /// Not a record: the registry declared `node` dead; every shard forgets the presence it
    /// heard from it.
    NodeDown {
        node: Str,
    },
}

impl Relayed {
    /// The tenant and the id (user or group) whose owner shard takes it.
    pub fn owner_key(&self) -> (&Str, &Str) {
        match self {
            Relayed::Deliver {
                tenant,
                to: Target::User(id) | Target::Group(id),
                ..
            }
            | Relayed::Member {
                tenant, user: id, ..
            }
            | Relayed::Kick { tenant, user: id }
            | Relayed::Query { tenant, user: id }
            | Relayed::Presence {
                tenant, user: id, ..
            } => (tenant, id),
            // Sent to every shard, not to an owner (`Pusher::node_down`).
            Relayed::NodeDown { node } => (node, node),
        }
    }
}

/// Cluster mode as the I/O loop holds it.
pub struct Node {
    relay: tokio::sync::mpsc::Sender<(Instant, RelayItem)>,
    stats: Arc<ClusterStats>,
    registry: Rc<Registry>,
    here: Rc<GroupsHere>,
}

/// Which groups have online members on this node, and what Redis must be told of it.
#[derive(Default)]
struct GroupsHere {
    /// Per group, the shards with online members of it (a shard reports each change; a
    /// report repeated after a full I/O queue changes nothing). Bounded by the shards' own
    /// bounds on groups with online members.
    shards: RefCell<HashMap<(Str, Str), Vec<u16>>>,
    /// Groups whose presence on this node changed and is not yet in Redis: `true` when it
    /// has online members now. Bounded like `shards` (one entry per group).
    dirty: RefCell<HashMap<(Str, Str), bool>>,
    /// Redis failed since the last write: write every group again.
    reassert: std::cell::Cell<bool>,
    wake: tokio::sync::Notify,
}

impl Node {
    /// Queues a relay; never waits (a full queue drops it and counts it).
    pub fn relay(&self, item: RelayItem) {
        if self.relay.try_send((Instant::now(), item)).is_err() {
            self.stats.relay_dropped.fetch_add(1, Relaxed);
        }
    }

    /// The live nodes holding `user`'s devices, from its Redis route hash: one round trip,
    /// bounded by the Redis timeout. The future owns what it needs, so the I/O loop can run it
    /// as a task of its own instead of waiting for it.
    pub fn route_nodes(
        &self,
        user: &crate::store::UserRef,
    ) -> impl std::future::Future<Output = Result<Vec<Str>, crate::iocore::IoError>> + 'static {
        use crate::iocore::IoError;
        let reg = self.registry.clone();
        let key = route_key(&reg.prefix, &user.tenant, &user.user);
        async move {
            let lookup = async {
                let mut c = reg.conn().await.map_err(IoError::Unavailable)?;
                let r = redis::cmd("HVALS")
                    .arg(key)
                    .query_async::<Vec<String>>(&mut c)
                    .await;
                r.map_err(|e| IoError::Unavailable(reg.failed(e)))
            };
            let values = tokio::time::timeout(reg.timeout, lookup)
                .await
                .map_err(|_| IoError::Timeout("redis did not answer".into()))??;
            Ok(route_nodes(&values)
                .into_iter()
                .filter(|n| reg.is_alive(n))
                .collect())
        }
    }

    /// A shard now has online members of `group` (`here`), or no longer has any. When the
    /// node as a whole changes, the group task adds it to or removes it from the group's node
    /// set in Redis, which senders read to relay group messages only to nodes with members.
    pub fn group_here(&self, shard: u16, tenant: &Str, group: &Str, here: bool) {
        let key = (tenant.clone(), group.clone());
        let mut all = self.here.shards.borrow_mut();
        let before = all.contains_key(&key);
        if here {
            let shards = all.entry(key.clone()).or_default();
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        } else if let Some(shards) = all.get_mut(&key) {
            shards.retain(|s| *s != shard);
            if shards.is_empty() {
                all.remove(&key);
            }
        }
        let after = all.contains_key(&key);
        if before != after {
            self.here.dirty.borrow_mut().insert(key, after);
            self.here.wake.notify_one();
        }
    }

    /// Deletes this node's registration, so the others stop relaying to it at once, and takes
    /// it out of the group node sets.
    pub async fn leave(&self) {
        self.registry.leave().await;
    }
}

/// What the registry task and `leave` share.
struct Registry {
    cfg: ClusterConfig,
    prefix: String,
    id: String,
    slot: u8,
    /// What other nodes may read about this one.
    info: String,
    client: redis::Client,
    timeout: Duration,
    stats: Arc<ClusterStats>,
    /// Live node ids as last read (this one included).
    alive: RefCell<BTreeSet<Str>>,
    /// Tells every shard that a node is gone (its presence no longer holds).
    node_down: Box<dyn Fn(Str)>,
    /// The one connection the heartbeat, the relay's route lookups, the presence probes and
    /// `leave` share (a multiplexed connection: a clone is a handle); `None` after a failure,
    /// until the next use connects again.
    shared: RefCell<Option<MultiplexedConnection>>,
    /// This node's groups with online members (their writes to Redis are redone after a
    /// failure: Redis may have come back empty).
    here: Rc<GroupsHere>,
}

impl Registry {
    /// The shared connection, connecting it first when there is none.
    async fn conn(&self) -> Result<MultiplexedConnection, String> {
        if let Some(c) = self.shared.borrow().clone() {
            return Ok(c);
        }
        let c = super::redis::connect(&self.client, self.timeout).await?;
        *self.shared.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    /// A command on the shared connection failed: the next use connects again, and the
    /// group task writes every group node set of this node again (a restarted Redis without
    /// persistence lost them; routes are republished by the Redis worker the same way).
    fn failed(&self, e: impl std::fmt::Display) -> String {
        *self.shared.borrow_mut() = None;
        self.here.reassert.set(true);
        self.here.wake.notify_one();
        e.to_string()
    }

    /// One heartbeat: refresh this node's keys, read the node set, drop the dead.
    async fn beat(&self, c: &mut MultiplexedConnection) -> Result<(), String> {
        let ttl = self.cfg.dead_after_ms;
        let (nk, sk, set) = (
            node_key(&self.prefix, &self.id),
            slot_key(&self.prefix, self.slot),
            nodes_key(&self.prefix),
        );
        let mut p = redis::pipe();
        p.cmd("SET").arg(&nk).arg(&self.info).arg("PX").arg(ttl);
        p.cmd("GET").arg(&sk);
        p.cmd("SADD").arg(&set).arg(&self.id).ignore();
        p.cmd("SMEMBERS").arg(&set);
        let (_, holder, members): (String, Option<String>, Vec<String>) =
            p.query_async(c).await.map_err(|e| e.to_string())?;
        match holder.as_deref() {
            Some(h) if h != self.id => {
                // The slot expired and another node took it: this node was declared dead
                // (it did not refresh for `dead_after_ms`). Message ids could now collide.
                tracing::error!(
                    slot = self.slot,
                    holder = h,
                    "cluster slot taken by another node; restart this node"
                );
                self.stats.registered.store(0, Relaxed);
                return Err("slot lost".into());
            }
            _ => {
                redis::cmd("SET")
                    .arg(&sk)
                    .arg(&self.id)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(c)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut alive = BTreeSet::new();
        if !members.is_empty() {
            let keys: Vec<String> = members.iter().map(|m| node_key(&self.prefix, m)).collect();
            let infos: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(c)
                .await
                .map_err(|e| e.to_string())?;
            let mut dead = Vec::new();
            let mut view = Vec::new();
            for (m, info) in members.iter().zip(infos) {
                if let Some(info) = info {
                    alive.insert(Str::from(m.as_str()));
                    view.push((m.clone(), info));
                } else if *m == self.id {
                    alive.insert(Str::from(m.as_str()));
                    view.push((m.clone(), self.info.clone()));
                } else {
                    dead.push(m.clone());
                }
            }
            view.sort();
            if let Ok(mut v) = self.stats.view.lock() {
                *v = (self.id.clone(), view);
            }
            if !dead.is_empty() {
                let removed: u64 = redis::cmd("SREM")
                    .arg(&set)
                    .arg(&dead)
                    .query_async(c)
                    .await
                    .map_err(|e| e.to_string())?;
                // Several survivors race to remove a node: the one that removed it counts it.
                self.stats.dead.fetch_add(removed, Relaxed);

                if removed > 0 {
                    tracing::warn!(nodes = ?dead, "cluster nodes declared dead");
                }
                // Out of the group node sets too (every survivor may do it: idempotent).
                for d in &dead {
                    leave_groups(&self.prefix, d, c).await?;
                }
            }
        }
        self.stats.nodes.store(alive.len() as u64, Relaxed);
        self.stats.registered.store(1, Relaxed);
        let before = std::mem::replace(&mut *self.alive.borrow_mut(), alive);
        // Gone since the last beat (dead, whoever removed it, or drained): what this node
        // heard from it no longer holds.
        for gone in before.iter().filter(|n| !self.alive.borrow().contains(*n)) {
            (self.node_down)(gone.clone());
        }
        Ok(())
    }

    async fn leave(&self) {
        let Ok(mut c) = self.conn().await else {
            return;
        };
        let mut p = redis::pipe();
        p.cmd("DEL")
            .arg(node_key(&self.prefix, &self.id))
            .arg(slot_key(&self.prefix, self.slot))
            .ignore();
        p.cmd("SREM")
            .arg(nodes_key(&self.prefix))
            .arg(&self.id)
            .ignore();
        let r = tokio::time::timeout(self.timeout, p.query_async::<()>(&mut c)).await;
        if matches!(r, Ok(Ok(()))) {
            self.stats.registered.store(0, Relaxed);
            tracing::info!(node = %self.id, "left the cluster");
        }
        let clean = leave_groups(&self.prefix, &self.id, &mut c);
        let _ = tokio::time::timeout(self.timeout, clean).await;
    }

    fn is_alive(&self, node: &str) -> bool {
        self.alive.borrow().contains(node)
    }
}

/// What starting cluster mode needs.
pub struct Setup<'a> {
    pub cluster: &'a ClusterConfig,
    pub redis: &'a RedisConfig,
    pub kafka: &'a KafkaConfig,
    /// Where clients reach this node (published in its registration).
    pub info: String,
    pub producer: Rc<RefCell<Kafka>>,
    pub stats: Arc<ClusterStats>,
    /// Released once registered, and once the ingress consumer is positioned.
    pub ready: Option<Arc<dyn Readiness>>,
    /// Tells every shard that a node is gone.
    pub node_down: Box<dyn Fn(Str)>,
}

/// Starts the registry, relay and ingress tasks on the current (I/O core's) runtime.
/// `sink` hands a relayed record to its owner shard and gives it back when that shard's queue
/// is full (the consumer then waits: back-pressure, never a drop).
pub fn start<F>(s: Setup<'_>, sink: F) -> Result<Node, ClusterError>
where
    F: Fn(Box<Relayed>) -> Result<(), Box<Relayed>> + Send + 'static,
{
    let cfg = s.cluster.clone();
    let (Some(id), Some(slot), Some(url)) = (&cfg.node_id, cfg.slot, &s.redis.url) else {
        return Err(ClusterError::Redis(
            "cluster mode without a node id, slot or redis".into(),
        ));
    };
    let client =
        redis::Client::open(url.as_str()).map_err(|e| ClusterError::Redis(e.to_string()))?;
    let here = Rc::new(GroupsHere::default());
    let registry = Rc::new(Registry {
        here: here.clone(),
        prefix: s.redis.key_prefix.clone(),
        id: id.clone(),
        slot,
        info: s.info,
        client,
        timeout: Duration::from_millis(s.redis.timeout_ms),
        stats: s.stats.clone(),
        alive: RefCell::new(BTreeSet::new()),
        node_down: s.node_down,
        shared: RefCell::new(None),
        cfg: cfg.clone(),
    });
    s.stats.enabled.store(true, Relaxed);
    if let Some(c) = &s.ready {
        c.backend_pending(); // registration
        c.backend_pending(); // ingress positioned
    }
    tokio::task::spawn_local(heartbeat(registry.clone(), s.ready.clone()));
    let (tx, rx) = tokio::sync::mpsc::channel(cfg.relay_queue_max.max(1) as usize);
    let cache = Rc::new(RefCell::new(RouteCache::new(
        cfg.route_cache_entries as usize,
        Duration::from_millis(cfg.route_cache_ttl_ms),
    )));
    let group_cache = Rc::new(RefCell::new(RouteCache::new(
        cfg.route_cache_entries as usize,
        Duration::from_millis(cfg.route_cache_ttl_ms),
    )));
    let caches = Caches {
        users: cache,
        groups: group_cache,
    };
    tokio::task::spawn_local(announcements(registry.clone(), caches.clone()));
    tokio::task::spawn_local(relay_task(registry.clone(), s.producer, rx, caches));
    tokio::task::spawn_local(group_task(registry.clone(), here.clone()));
    let topic = node_topic(&cfg, id);
    start_ingress(s.kafka, topic, id.clone(), s.stats.clone(), s.ready, sink);
    Ok(Node {
        relay: tx,
        stats: s.stats,
        registry,
        here,
    })
}

/// The route caches: a user's nodes (from its route hash) and a group's nodes with online
/// members (from its node set).
#[derive(Clone)]
struct Caches {
    users: Rc<RefCell<RouteCache>>,
    groups: Rc<RefCell<RouteCache>>,
}

/// Listens on `{p}routes` (a device came up) and `{p}gnodes` (a node now has online members of
/// a group) and evicts the announced user or group from its cache; resubscribes after a
/// failure (entries then fall back to their TTL).
async fn announcements(reg: Rc<Registry>, caches: Caches) {
    use futures_lite::StreamExt as _;
    let users = format!("{}routes", reg.prefix);
    let groups = format!("{}gnodes", reg.prefix);
    let mut failing = false;
    loop {
        let sub = async {
            let mut ps = reg.client.get_async_pubsub().await?;
            ps.subscribe(&[&users, &groups]).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(reg.timeout, sub).await {
            Ok(Ok(ps)) => {
                failing = false;
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    let Ok(text) = std::str::from_utf8(msg.get_payload_bytes()) else {
                        continue;
                    };
                    let cache = if msg.get_channel_name() == groups {
                        &caches.groups
                    } else {
                        &caches.users
                    };
                    if let Some((tenant, id)) = text.split_once('\n') {
                        reg.stats.route_announcements.fetch_add(1, Relaxed);
                        cache
                            .borrow_mut()
                            .evict(&(Str::from(tenant), Str::from(id)));
                    }
                }
            }
            _ => {
                if !failing {
                    tracing::warn!("route announcements not subscribed; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(reg.cfg.heartbeat_ms)).await;
    }
}

/// Takes `node` out of every group node set it announced itself in, and drops its index.
async fn leave_groups(
    prefix: &str,
    node: &str,
    c: &mut MultiplexedConnection,
) -> Result<(), String> {
    let index = node_groups_key(prefix, node);
    let groups: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&index)
        .query_async(c)
        .await
        .map_err(|e| e.to_string())?;
    let mut p = redis::pipe();
    for g in &groups {
        if let Some((tenant, group)) = g.split_once('\n') {
            p.cmd("SREM")
                .arg(group_nodes_key(prefix, tenant, group))
                .arg(node)
                .ignore();
        }
    }
    p.cmd("DEL").arg(&index).ignore();
    p.query_async::<()>(c).await.map_err(|e| e.to_string())
}

/// Group node sets changed per pipeline.
const GROUP_CHANGES_PER_WRITE: usize = 4_096;

/// Tells Redis which groups have online members on this node: first takes the node out of
/// the sets a previous run left behind, then writes the changes the shards report, batched
/// (a group that came and went before a write costs nothing), announcing each addition on
/// `{p}gnodes` so that senders stop using a cached set without this node. A removal is not
/// announced: a stale set only costs a record the node drops, for at most the cache's TTL.
/// A failed write is retried after a heartbeat period, unless a newer change replaced it;
/// after any failure on the shared connection every group is written again (Redis may have
/// restarted empty).
async fn group_task(reg: Rc<Registry>, here: Rc<GroupsHere>) {
    let every = Duration::from_millis(reg.cfg.heartbeat_ms);
    loop {
        let clean = async {
            let mut c = reg.conn().await?;
            leave_groups(&reg.prefix, &reg.id, &mut c)
                .await
                .map_err(|e| reg.failed(e))
        };
        match tokio::time::timeout(reg.timeout, clean).await {
            Ok(Ok(())) => break,
            _ => tokio::time::sleep(every).await,
        }
    }
    let index = node_groups_key(&reg.prefix, &reg.id);
    let channel = format!("{}gnodes", reg.prefix);
    // What Redis holds of this node (the `groups_here` gauge).
    let mut announced: HashSet<(Str, Str)> = HashSet::new();
    // Groups to write whatever `announced` says (after a Redis failure).
    let mut forced: HashSet<(Str, Str)> = HashSet::new();
    loop {
        if here.reassert.replace(false) {
            let shards = here.shards.borrow();
            let mut dirty = here.dirty.borrow_mut();
            for k in announced.iter().filter(|k| !shards.contains_key(*k)) {
                dirty.entry(k.clone()).or_insert(false);
                forced.insert(k.clone());
            }
            for k in shards.keys() {
                dirty.entry(k.clone()).or_insert(true);
                forced.insert(k.clone());
            }
        }
        if here.dirty.borrow().is_empty() {
            here.wake.notified().await;
            continue;
        }
        let batch: Vec<((Str, Str), bool)> = {
            let mut dirty = here.dirty.borrow_mut();
            let keys: Vec<(Str, Str)> = dirty
                .keys()
                .take(GROUP_CHANGES_PER_WRITE)
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| dirty.remove_entry(&k))
                .collect()
        };
        let mut p = redis::pipe();
        let mut writes = 0;
        for (k, on) in &batch {
            if !forced.remove(k) && announced.contains(k) == *on {
                continue; // came and went before the last write
            }
            writes += 1;
            let (tenant, group) = k;
            let key = group_nodes_key(&reg.prefix, tenant, group);
            let member = format!("{tenant}\n{group}");
            if *on {
                p.cmd("SADD").arg(&key).arg(&reg.id).ignore();
                p.cmd("SADD").arg(&index).arg(&member).ignore();
                p.cmd("PUBLISH").arg(&channel).arg(&member).ignore();
            } else {
                p.cmd("SREM").arg(&key).arg(&reg.id).ignore();
                p.cmd("SREM").arg(&index).arg(&member).ignore();
            }
        }
        let write = async {
            if writes == 0 {
                return Ok(());
            }
            let mut c = reg.conn().await?;
            p.query_async::<()>(&mut c).await.map_err(|e| reg.failed(e))
        };
        if matches!(tokio::time::timeout(reg.timeout, write).await, Ok(Ok(()))) {
            for (k, on) in batch {
                if on {
                    announced.insert(k);
                } else {
                    announced.remove(&k);
                }
            }
            reg.stats.groups_here.store(announced.len() as u64, Relaxed);
        } else {
            {
                let mut dirty = here.dirty.borrow_mut();
                for (k, v) in batch {
                    // Whether or not it reached Redis, write it again.
                    forced.insert(k.clone());
                    dirty.entry(k).or_insert(v);
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

async fn heartbeat(reg: Rc<Registry>, ready: Option<Arc<dyn Readiness>>) {
    let every = Duration::from_millis(reg.cfg.heartbeat_ms);
    let mut ready = ready;
    let mut failing = false;
    loop {
        let beat = async {
            let mut c = reg.conn().await?;
            reg.beat(&mut c).await.map_err(|e| reg.failed(e))
        };
        let outcome = match tokio::time::timeout(reg.timeout, beat).await {
            Ok(r) => r,
            Err(_) => Err(reg.failed("timed out")),
        };
        match outcome {
            Ok(()) => {
                failing = false;
                if let Some(ctl) = ready.take() {
                    tracing::info!(node = %reg.id, slot = reg.slot, "registered in the cluster");
                    ctl.backend_ready();
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// The nodes named by a route hash's values (`{node}/{shard}/{conn}`), deduplicated.
fn route_nodes(values: &[String]) -> Vec<Str> {
    let mut nodes: Vec<Str> = Vec::new();
    for v in values {
        let node = v.rsplitn(3, '/').nth(2).unwrap_or("");
        if !node.is_empty() && !nodes.iter().any(|n| &**n == node) {
            nodes.push(Str::from(node));
        }
    }
    nodes
}

/// Relays, in the order the store accepted them, batch by batch: the recipients and groups
/// whose nodes are not cached are looked up in one Redis pipeline, then one record per
/// destination node.
async fn relay_task(
    reg: Rc<Registry>,
    kafka: Rc<RefCell<Kafka>>,
    mut rx: tokio::sync::mpsc::Receiver<(Instant, RelayItem)>,
    caches: Caches,
) {
    const BATCH: usize = 512;
    let mut buf = Vec::with_capacity(BATCH);
    let stats = reg.stats.clone();
    // This batch's recipients and groups and their nodes (from the caches or Redis); `None`:
    // unknown.
    let mut resolved: HashMap<(Str, Str), Option<Vec<Str>>> = HashMap::new();
    let mut gresolved: HashMap<(Str, Str), Option<Vec<Str>>> = HashMap::new();
    loop {
        if rx.recv_many(&mut buf, BATCH).await == 0 {
            return;
        }
        let now = Instant::now();
        resolved.clear();
        gresolved.clear();
        let mut missing: Vec<(Str, Str)> = Vec::new();
        let mut gmissing: Vec<(Str, Str)> = Vec::new();
        {
            let mut cache = caches.users.borrow_mut();
            let mut gcache = caches.groups.borrow_mut();
            for (_, it) in &buf {
                let (id, cache, resolved, missing) = match (it.group(), it.user()) {
                    (Some(g), _) => (g, &mut gcache, &mut gresolved, &mut gmissing),
                    (None, Some(u)) => (u, &mut cache, &mut resolved, &mut missing),
                    (None, None) => continue,
                };
                let k = (it.tenant().clone(), id.clone());
                if resolved.contains_key(&k) {
                    continue;
                }
                let hit = cache.get(&k, now).map(|r| r.nodes.clone());
                if hit.is_none() {
                    missing.push(k.clone());
                } else if it.group().is_none() {
                    // Counted for recipients only, as before groups had a cache.
                    stats.route_cache_hits.fetch_add(1, Relaxed);
                }
                resolved.insert(k, hit);
            }
        }
        if !missing.is_empty() || !gmissing.is_empty() {
            if let Ok(mut c) = reg.conn().await {
                let mut p = redis::pipe();
                for (t, u) in &missing {
                    p.cmd("HVALS").arg(route_key(&reg.prefix, t, u));
                }
                for (t, g) in &gmissing {
                    p.cmd("SMEMBERS").arg(group_nodes_key(&reg.prefix, t, g));
                }
                let announced = stats.route_announcements.load(Relaxed);
                let lookup = p.query_async::<Vec<Vec<String>>>(&mut c);
                match tokio::time::timeout(reg.timeout, lookup).await {
                    Ok(Ok(mut rows)) => {
                        stats.route_lookups.fetch_add(missing.len() as u64, Relaxed);
                        stats
                            .group_lookups
                            .fetch_add(gmissing.len() as u64, Relaxed);
                        // An announcement heard meanwhile may postdate this answer: then the
                        // answer serves this batch only and is not cached.
                        let quiet = stats.route_announcements.load(Relaxed) == announced;
                        let group_rows = rows.split_off(missing.len().min(rows.len()));
                        // This batch's answer, cached unless an announcement intervened.
                        let keep = |cache: &RefCell<RouteCache>,
                                    out: &mut HashMap<(Str, Str), Option<Vec<Str>>>,
                                    k: (Str, Str),
                                    nodes: Vec<Str>| {
                            if quiet {
                                let routes = Routes {
                                    nodes: nodes.clone(),
                                    at: now,
                                };
                                cache.borrow_mut().insert(k.clone(), routes);
                            }
                            out.insert(k, Some(nodes));
                        };
                        for (k, values) in missing.drain(..).zip(rows) {
                            keep(&caches.users, &mut resolved, k, route_nodes(&values));
                        }
                        for (k, members) in gmissing.drain(..).zip(group_rows) {
                            let nodes = members.iter().map(|m| Str::from(m.as_str())).collect();
                            keep(&caches.groups, &mut gresolved, k, nodes);
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "route lookup failed");
                        reg.failed(e);
                    }
                    Err(_) => {
                        reg.failed("route lookup timed out");
                    }
                }
            }
        }
        let alive: Vec<Str> = reg
            .alive
            .borrow()
            .iter()
            .filter(|n| ***n != *reg.id)
            .cloned()
            .collect();
        for (queued, it) in buf.drain(..) {
            stats.relay_queue_count.fetch_add(1, Relaxed);
            let waited = queued.elapsed().as_micros() as u64;
            stats.relay_queue_us.fetch_add(waited, Relaxed);
            let group = it
                .group()
                .map(|g| gresolved.get(&(it.tenant().clone(), g.clone())));
            let targets: Vec<Str> = match (group, it.user()) {
                // Redis failed: every other live node (a superset), so members miss nothing.
                (Some(None | Some(None)), _) => alive.clone(),
                (Some(Some(Some(nodes))), _) => nodes
                    .iter()
                    .filter(|n| ***n != *reg.id && reg.is_alive(n))
                    .cloned()
                    .collect(),
                (None, None) => alive.clone(),
                (None, Some(u)) => match resolved.get(&(it.tenant().clone(), u.clone())) {
                    Some(Some(nodes)) => nodes
                        .iter()
                        .filter(|n| ***n != *reg.id && reg.is_alive(n))
                        .cloned()
                        .collect(),
                    // Redis failed, for a kick, a presence query or a membership change:
                    // every other live node (a superset); dropped, the kick would leave
                    // devices connected, the subscriber would see `offline` until the user's
                    // next change, and the member's devices would miss the group live.
                    _ if it.to_every_node_when_unresolved() => alive.clone(),
                    _ => {
                        // Redis failed: the recipient's other nodes are unknown. The store
                        // has the message; those devices get it at their next gap or sync.
                        stats.relay_dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                },
            };
            if targets.is_empty() {
                continue;
            }
            let presence = matches!(it, RelayItem::Presence { .. });
            let Some((key, payload, headers)) = record(&it, &reg.id) else {
                stats.relay_failed.fetch_add(targets.len() as u64, Relaxed);
                continue;
            };
            for node in targets {
                let topic = node_topic(&reg.cfg, &node);
                let rec = FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers.clone());
                let sent = kafka.borrow().send_raw(rec);
                match sent {
                    Ok(report) => {
                        let stats = stats.clone();
                        tokio::task::spawn_local(async move {
                            match report.await {
                                Ok(Ok(_)) => {
                                    stats.relayed.fetch_add(1, Relaxed);
                                    if presence {
                                        stats.relayed_presence.fetch_add(1, Relaxed);
                                    }
                                }
                                _ => {
                                    stats.relay_failed.fetch_add(1, Relaxed);
                                }
                            };
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, node = %node, "relay not enqueued");
                        stats.relay_failed.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }
}

/// A relay record: key `{tenant}/{user or group}` (one recipient's records keep their
/// order), headers `op` (`deliver`, `member`, `kick`), `tenant`, `user` and/or `group`, and
/// `join` (`1`/`0`) for `member`; a `deliver`'s payload is the deliver (with its sequence) as
/// a Protobuf envelope, the others have none.
fn record(it: &RelayItem, node: &str) -> Option<(String, Vec<u8>, OwnedHeaders)> {
    let h = |hs: OwnedHeaders, key: &str, v: &str| {
        hs.insert(Header {
            key,
            value: Some(v.as_bytes()),
        })
    };
    let tenant = it.tenant();
    let mut headers = h(OwnedHeaders::new(), "tenant", tenant);
    let mut payload = Vec::new();
    let id = match it {
        RelayItem::Message { dest, deliver, .. } => {
            headers = h(headers, "op", "deliver");
            let (kind, id) = match dest {
                Dest::User(u) => ("user", u),
                Dest::Group(g) => ("group", g),
            };
            headers = h(headers, kind, id);
            payload.reserve(64 + deliver.body.len());
            let env = Envelope::new(Message::Deliver(deliver.clone()));
            CodecId::Protobuf.encode(&env, &mut payload).ok()?;
            id
        }
        RelayItem::Member {
            user, group, join, ..
        } => {
            headers = h(headers, "op", "member");
            headers = h(headers, "user", user);
            headers = h(headers, "group", group);
            headers = h(headers, "join", if *join { "1" } else { "0" });
            user
        }
        RelayItem::Kick { user, .. } => {
            headers = h(headers, "op", "kick");
            headers = h(headers, "user", user);
            user
        }
        RelayItem::Query { user, .. } => {
            headers = h(headers, "op", "query");
            headers = h(headers, "user", user);
            user
        }
        RelayItem::Presence { user, status, .. } => {
            headers = h(headers, "op", "presence");
            headers = h(headers, "user", user);
            headers = h(headers, "node", node);
            headers = h(headers, "status", status.name());
            user
        }
    };
    Some((format!("{tenant}/{id}"), payload, headers))
}

/// Parses a relay record (the inverse of [`record`]).
pub fn parse_record<H: Headers + ?Sized>(
    headers: Option<&H>,
    payload: &[u8],
) -> Result<Relayed, String> {
    let (mut op, mut tenant, mut user, mut group, mut join) = (None, None, None, None, None);
    let (mut node, mut status) = (None, None);
    if let Some(h) = headers {
        for i in 0..h.count() {
            let hd = h.get(i);
            let Some(v) = hd.value else { continue };
            let v = std::str::from_utf8(v).map_err(|_| "header not UTF-8".to_string())?;
            let slot = match hd.key {
                "op" => &mut op,
                "tenant" => &mut tenant,
                "user" => &mut user,
                "group" => &mut group,
                "join" => &mut join,
                "node" => &mut node,
                "status" => &mut status,
                _ => continue,
            };
            *slot = Some(Str::from(v));
        }
    }
    let tenant = tenant.ok_or("no tenant header")?;
    match (op.as_deref(), user, group) {
        (Some("deliver"), user, group) => {
            let to = match (user, group) {
                (Some(u), None) => Target::User(u),
                (None, Some(g)) => Target::Group(g),
                _ => return Err("a deliver names one user or one group".into()),
            };
            let env = CodecId::Protobuf
                .decode_bytes(&Bytes::copy_from_slice(payload))
                .map_err(|e| e.to_string())?;
            let Message::Deliver(deliver) = env.msg else {
                return Err("not a deliver".into());
            };
            if deliver.inbox_seq == 0 {
                return Err("deliver without a sequence".into());
            }
            Ok(Relayed::Deliver {
                tenant,
                to,
                deliver,
            })
        }
        (Some("member"), Some(user), Some(group)) => {
            let join = match join.as_deref() {
                Some("1") => true,
                Some("0") => false,
                _ => return Err("member without join 1 or 0".into()),
            };
            Ok(Relayed::Member {
                tenant,
                user,
                group,
                join,
            })
        }
        (Some("kick"), Some(user), None) => Ok(Relayed::Kick { tenant, user }),
        (Some("query"), Some(user), None) => Ok(Relayed::Query { tenant, user }),
        (Some("presence"), Some(user), None) => {
            let status = status
                .and_then(|s| Status::ALL.into_iter().find(|x| x.name() == &*s))
                .ok_or("presence without a known status")?;
            let node = node.ok_or("presence without its node")?;
            Ok(Relayed::Presence {
                tenant,
                user,
                node,
                status,
            })
        }
        (op, ..) => Err(format!("bad relay record (op {op:?})")),
    }
}

/// Positions a consumer at the end of every partition of `topic` (blocking; retried until the
/// topic exists), then hands every record to `sink`.
fn start_ingress<F>(
    kcfg: &KafkaConfig,
    topic: String,
    node: String,
    stats: Arc<ClusterStats>,
    ready: Option<Arc<dyn Readiness>>,
    sink: F,
) where
    F: Fn(Box<Relayed>) -> Result<(), Box<Relayed>> + Send + 'static,
{
    let brokers = kcfg.brokers.clone().unwrap_or_default();
    tokio::task::spawn_local(async move {
        let consumer = loop {
            let (b, t, n) = (brokers.clone(), topic.clone(), node.clone());
            match tokio::task::spawn_blocking(move || position(&b, &t, &n)).await {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) => tracing::debug!(error = %e, "node topic not ready; retrying"),
                Err(e) => tracing::warn!(error = %e, "node topic positioning panicked"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        tracing::info!(topic = %topic, "consuming this node's topic");
        if let Some(c) = ready {
            c.backend_ready();
        }
        let parse = |m: &rdkafka::message::BorrowedMessage<'_>| {
            if let Some(created_ms) = m.timestamp().to_millis() {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let transit = u64::try_from(now_ms - created_ms).unwrap_or(0);
                stats.transit_ms.fetch_add(transit, Relaxed);
            }
            let payload = m.payload().ok_or_else(|| "empty record".to_string())?;
            parse_record(m.headers(), payload).map(Box::new)
        };
        let counts = super::kafka::Counts {
            what: "node topic",
            bad: || stats.ingress_bad.fetch_add(1, Relaxed),
            ok: || stats.ingress.fetch_add(1, Relaxed),
        };
        super::kafka::consume(consumer, parse, sink, counts).await;
    });
}

fn position(brokers: &str, topic: &str, node: &str) -> Result<StreamConsumer, String> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("imgw-node-{node}"))
        .set("enable.auto.commit", "false")
        .set("socket.timeout.ms", "5000")
        .set("fetch.wait.max.ms", "10")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .create()
        .map_err(|e| e.to_string())?;
    let t = Duration::from_secs(5);
    let md = consumer
        .fetch_metadata(Some(topic), t)
        .map_err(|e| e.to_string())?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|m| m.name() == topic && m.error().is_none())
        .flat_map(|m| m.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(format!("topic {topic} has no partitions yet"));
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, t)
            .map_err(|e| e.to_string())?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_values_name_their_nodes_once() {
        let v = vec![
            "a/0/4294967296".to_string(),
            "b.x/1/7".to_string(),
            "a/1/9".to_string(),
            "127.0.0.1:8080/0/1".to_string(),
            "garbage".to_string(),
        ];
        let nodes = route_nodes(&v);
        let names: Vec<&str> = nodes.iter().map(|n| &**n).collect();
        assert_eq!(names, ["a", "b.x", "127.0.0.1:8080"]);
    }

    #[test]
    fn route_cache_is_bounded_and_expires() {
        let mut c = RouteCache::new(4, Duration::from_millis(50));
        let t0 = Instant::now();
        let key = |i: u32| (Str::from("t"), Str::from(i.to_string().as_str()));
        for i in 0..10 {
            c.insert(
                key(i),
                Routes {
                    nodes: vec![],
                    at: t0,
                },
            );
            assert!(c.map.len() <= 4);
        }
        assert!(c.get(&key(9), t0).is_some());
        assert!(c.get(&key(0), t0).is_none(), "evicted");
        assert!(
            c.get(&key(9), t0 + Duration::from_millis(50)).is_none(),
            "expired after the TTL"
        );
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let deliver = Deliver {
            mid: 7,
            from: "alice".into(),
            to: None,
            inbox_seq: 3,
            ts: 9,
            kind: Some("chat".into()),
            body: "hi".into(),
            ext: Default::default(),
        };
        let it = RelayItem::Message {
            tenant: "t1".into(),
            dest: Dest::User("bob".into()),
            deliver: deliver.clone(),
        };
        let (key, payload, headers) = record(&it, "n").unwrap();
        assert_eq!(key, "t1/bob");
        let back = parse_record(Some(&headers), &payload).unwrap();
        let want = Relayed::Deliver {
            tenant: "t1".into(),
            to: Target::User("bob".into()),
            deliver: deliver.clone(),
        };
        assert_eq!(back, want);
        assert_eq!(back.owner_key(), (&Str::from("t1"), &Str::from("bob")));
        let none: Option<&OwnedHeaders> = None;
        assert!(parse_record(none, &payload).is_err(), "no headers");
        let bad = parse_record(Some(&headers), b"\xff\xff");
        assert!(bad.is_err(), "bad payload");
        let unsequenced = RelayItem::Message {
            tenant: "t1".into(),
            dest: Dest::Group("g".into()),
            deliver: Deliver {
                inbox_seq: 0,
                ..deliver
            },
        };
        let (key, payload, headers) = record(&unsequenced, "n").unwrap();
        assert_eq!(key, "t1/g");
        let bad = parse_record(Some(&headers), &payload);
        assert!(bad.is_err(), "no sequence");
        let member = RelayItem::Member {
            tenant: "t".into(),
            user: "u".into(),
            group: "g".into(),
            join: false,
        };
        let member_back = Relayed::Member {
            tenant: "t".into(),
            user: "u".into(),
            group: "g".into(),
            join: false,
        };
        let kick = RelayItem::Kick {
            tenant: "t".into(),
            user: "u".into(),
        };
        let kick_back = Relayed::Kick {
            tenant: "t".into(),
            user: "u".into(),
        };
        let presence = RelayItem::Presence {
            tenant: "t".into(),
            user: "u".into(),
            status: Status::Away,
        };
        let presence_back = Relayed::Presence {
            tenant: "t".into(),
            user: "u".into(),
            node: "n".into(),
            status: Status::Away,
        };
        let query = RelayItem::Query {
            tenant: "t".into(),
            user: "u".into(),
        };
        let query_back = Relayed::Query {
            tenant: "t".into(),
            user: "u".into(),
        };
        for (it, want) in [
            (member, member_back),
            (kick, kick_back),
            (query, query_back),
            (presence, presence_back),
        ] {
            let (key, payload, headers) = record(&it, "n").unwrap();
            assert_eq!(key, "t/u");
            assert_eq!(parse_record(Some(&headers), &payload).unwrap(), want);
        }
        let h = |hs: OwnedHeaders, key: &str, v: &str| {
            hs.insert(Header {
                key,
                value: Some(v),
            })
        };
        let odd = h(
            h(h(OwnedHeaders::new(), "tenant", "t"), "op", "member"),
            "user",
            "u",
        );
        assert!(
            parse_record(Some(&odd), b"").is_err(),
            "member without group"
        );
    }
}
