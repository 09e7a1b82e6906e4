//! The I/O core: one dedicated thread (pinned to the core the shards leave free) running a
//! tokio current-thread runtime, the only place that touches the durable store, Redis and
//! Kafka (SPEC 2; the services are in src/services).
//!
//! Shards never block on it. They push commands into one bounded lock-free queue and return at
//! once; a full queue is an explicit refusal that the shard turns into `overloaded`. The I/O
//! thread drains up to `batch_max` commands, applies every write among them with one durable
//! commit (group commit: one fsync per batch), answers the reads, and pushes each completion
//! into its shard's bounded completion queue, waking the shard through a socket pair (one byte
//! per wake-up, only when the shard is not already awake).

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use std::cell::RefCell;
use std::rc::Rc;

use crossbeam_queue::ArrayQueue;

use crate::config::{KafkaConfig, RedisConfig};
use crate::ids::{owner_shard, UserKey};
use crate::metrics::{ClusterStats, IoStats, ServiceStats};
use crate::protocol::{Deliver, Str, Target};
use crate::services::kafka::{Dest, Kafka, Produced, Sent};
use crate::services::push::PushRecord;
use crate::services::redis::{PresenceEvent, RedisCmd, RedisHandle};
use crate::store::{Backend, GroupPage, GroupRef, InboxPage, Op, OpResult, StoreError, UserRef};

/// What a shard asks of the I/O core.
#[derive(Debug)]
pub enum IoRequest {
    /// Writes, applied atomically with the batch's one durable commit.
    Apply(Vec<Op>),
    /// A page of a user's inbox after `after`.
    ReadInbox {
        user: UserRef,
        after: u64,
        limit: u32,
    },
    /// The stored cursor of one device.
    Cursor { user: UserRef, device: Str },
    /// The last `inbox_seq` of a user's inbox (answered as [`IoReply::Cursor`]).
    LastInboxSeq { user: UserRef },
    /// Cluster mode: the live nodes holding a user's devices (Redis routes).
    RouteNodes { user: UserRef },
    /// A page of a group's timeline for one of its members: after `after`, or after the
    /// member's stored group cursor when `after` is 0. A non-member gets `Ok(None)`.
    ReadGroup {
        /// Boxed: keeps [`IoCmd`] small (the queue holds it by value).
        member: Box<UserRef>,
        group: Str,
        after: u64,
        limit: u32,
    },
    /// The user's groups whose timeline has messages after the user's group cursor.
    UnreadGroups { user: UserRef },
    /// Every member of a group (at most the store's group size bound), to reload a group.
    GroupMembers { group: GroupRef },
    /// The groups a user is a member of, to reload a member's side after a restart.
    UserGroups { user: UserRef },
    /// A device's presence/route change, for Redis. No completion; dropped (and counted)
    /// by the shard when the queue is full.
    Presence(Box<PresenceEvent>),
    /// Cluster mode: something other nodes must hear (a stored join or leave, an admin
    /// kick). No completion.
    Relay(Box<crate::services::cluster::RelayItem>),
    /// Cluster mode: the shard now has online members of `group` (`here`) or no longer has
    /// any. No completion; repeating one changes nothing.
    GroupHere { group: GroupRef, here: bool },
}

/// Why the I/O core could not do what a shard asked; the shard answers the client with the
/// error code [`IoError::code`] names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The store, or a service the request needs (Redis, the Kafka broker's confirmation), did
    /// not answer within its deadline. Retryable: a resent `cmid` is deduplicated.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The store or a needed service cannot serve now: an engine failure (a full disk, a
    /// failed commit), a refused or broken connection, a refused Kafka produce.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The store's disk (or the MySQL server's table space) is full: nothing can be written
    /// until space is freed. Retryable, though not soon.
    #[error("store full: {0}")]
    StoreFull(String),
    /// A stored record could not be decoded: the data is damaged (or a bug wrote it). Not
    /// retryable by the client.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
}

impl IoError {
    /// The client error for this failure (docs/PROTOCOL.md section 5): `unavailable` when a
    /// retry may succeed, `internal` for damaged data.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        match self {
            IoError::Timeout(_) | IoError::Unavailable(_) | IoError::StoreFull(_) => {
                crate::protocol::ErrorCode::Unavailable
            }
            IoError::Corrupt(_) => crate::protocol::ErrorCode::Internal,
        }
    }

    /// The `retry_after_ms` hint for this failure, from the configured one (`base_ms`): none
    /// for damaged data, [`STORE_FULL_RETRY_FACTOR`] times longer for a full store (space is
    /// not freed in a moment), `base_ms` otherwise.
    pub fn retry_after_ms(&self, base_ms: u64) -> Option<u64> {
        match self {
            IoError::Corrupt(_) => None,
            IoError::StoreFull(_) => Some(base_ms.saturating_mul(STORE_FULL_RETRY_FACTOR)),
            IoError::Timeout(_) | IoError::Unavailable(_) => Some(base_ms),
        }
    }
}

/// How much longer a client waits before resending to a full store than after another failure.
pub const STORE_FULL_RETRY_FACTOR: u64 = 25;

impl From<crate::store::StoreError> for IoError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        match e {
            E::Timeout { .. } => IoError::Timeout(e.to_string()),
            E::Corrupt { .. } => IoError::Corrupt(e.to_string()),
            E::Full(_) => IoError::StoreFull(e.to_string()),
            other => IoError::Unavailable(other.to_string()),
        }
    }
}

/// The I/O core's answer.
#[derive(Debug)]
pub enum IoReply {
    Applied(Result<Vec<OpResult>, IoError>),
    Inbox(Result<InboxPage, IoError>),
    Cursor(Result<u64, IoError>),
    /// The cursor the page starts after, and the page; `None`: not a member of the group.
    Group(Result<Option<(u64, GroupPage)>, IoError>),
    /// Group ids (unread groups, or a user's groups).
    Groups(Result<Vec<Str>, IoError>),
    /// Member ids of one group.
    Members(Result<Vec<Str>, IoError>),
    /// Cluster node ids.
    Nodes(Result<Vec<Str>, IoError>),
    /// A push ingress record for this shard, the owner of its user or group (token 0:
    /// nobody waits for it).
    Push(Box<PushRecord>),
    /// An admin kick of a user this shard owns: every device gets `goaway` and is closed
    /// (token 0).
    Kick(Box<UserKey>),
    /// A message another cluster node stored, for this node's devices of a user or group
    /// this shard owns (token 0; src/services/cluster.rs).
    Relayed(Box<crate::services::cluster::Relayed>),
}

#[derive(Debug)]
pub struct IoCmd {
    pub shard: u16,
    pub token: u64,
    pub req: IoRequest,
}

#[derive(Debug)]
pub struct IoDone {
    pub token: u64,
    pub reply: IoReply,
}

/// Bounds and knobs of the I/O core.
#[derive(Clone, Debug)]
pub struct IoConfig {
    /// Commands waiting for the I/O core, all shards together.
    pub queue_depth: usize,
    /// Commands per batch (one durable commit per batch).
    pub batch_max: usize,
    /// Test-only: sleep this long before each commit, to simulate a slow disk.
    pub commit_delay_ms: u64,
    /// The external services, when configured.
    pub services: Services,
}

/// The services the I/O core runs beside the store (src/services).
#[derive(Clone, Debug, Default)]
pub struct Services {
    /// Redis, and this node's name in session routes.
    pub redis: Option<(RedisConfig, String)>,
    pub kafka: Option<KafkaConfig>,
    /// Durability `backend`: a `send` completes only after Kafka confirmed it.
    pub kafka_confirms: bool,
    /// The store's dedupe window (TTL of the Redis dedupe keys).
    pub dedupe_window_ms: u64,
    /// Largest push ingress body accepted.
    pub max_push_body: usize,
    /// Readiness: a configured Kafka is counted pending at start, ready once its topics
    /// exist ([`Readiness`]; the runtime passes the process's `control::Control`).
    pub ready: Option<Arc<dyn Readiness>>,
    /// Cluster mode (`cluster.node_id` set, slot claimed), with where clients reach this
    /// node (published in its registration).
    pub cluster: Option<(crate::config::ClusterConfig, String)>,
}

/// What the I/O core and its services need of the process's readiness: backends that clients
/// must wait for are counted pending at start and released once ready (until then `GET
/// /readyz` answers not ready). `control::Control` implements it; the I/O core takes this
/// handle rather than naming the control module, which sits above it.
pub trait Readiness: std::fmt::Debug + Send + Sync {
    /// One more backend to wait for; `backend_ready` releases it.
    fn backend_pending(&self);
    /// A backend counted by `backend_pending` is ready.
    fn backend_ready(&self);
}

/// The shard's end: submit commands, take completions.
pub struct IoPort {
    pub shard: u16,
    inbound: Arc<ArrayQueue<IoCmd>>,
    io_wake: Arc<tokio::sync::Notify>,
    done: Arc<ArrayQueue<IoDone>>,
    /// Set by the I/O core when it has written a wake-up byte not yet consumed.
    notified: Arc<AtomicBool>,
    /// The shard's end of the wake-up socket pair (the runtime wraps it in a glommio stream).
    pub wake_reader: Option<UnixStream>,
    pub stats: Arc<IoStats>,
}

impl IoPort {
    /// Queues a command; `Err` gives it back when the I/O queue is full.
    pub fn submit(&self, cmd: IoCmd) -> Result<(), IoCmd> {
        if matches!(cmd.req, IoRequest::Presence(_))
            && self.inbound.len() * 2 > self.inbound.capacity()
        {
            // Presence never takes the second half of the queue: that is kept for messages.
            return Err(cmd);
        }
        self.inbound.push(cmd)?;
        self.stats
            .queue_depth
            .store(self.inbound.len() as u64, Ordering::Relaxed);
        self.io_wake.notify_one();
        Ok(())
    }

    /// Takes the completions that arrived. Call after the wake-up byte was read: the flag is
    /// cleared first, so a completion pushed meanwhile sends a new byte.
    pub fn take_done(&self, out: &mut Vec<IoDone>) {
        self.notified.store(false, Ordering::Release);
        while let Some(d) = self.done.pop() {
            out.push(d);
        }
    }
}

#[derive(Debug)]
struct ShardLink {
    done: Arc<ArrayQueue<IoDone>>,
    notified: Arc<AtomicBool>,
    wake_writer: UnixStream,
}

/// Hands work from outside the shards to the owner shard of a user or group, from any
/// thread: push records (the Kafka push consumer and the admin API's `POST /push`; the shard
/// stores the record, then delivers it) and admin kicks.
#[derive(Clone, Debug)]
pub struct Pusher {
    links: Arc<Vec<ShardLink>>,
    /// Largest body a push may carry (the WebSocket message limit).
    pub max_body: usize,
}

impl Pusher {
    /// Queues `rec` for its owner shard; gives it back when that shard's completion queue is
    /// full (the caller waits and retries, or answers `overloaded`).
    pub fn push(&self, rec: Box<PushRecord>) -> Result<(), Box<PushRecord>> {
        let id = match &rec.to {
            Target::User(u) | Target::Group(u) => u,
        };
        let dest = owner_shard(&rec.tenant, id, self.links.len());
        match self.queue(dest, IoReply::Push(rec)) {
            Err(IoReply::Push(rec)) => Err(rec),
            // The queue gives back what it was given, a Push.
            _ => Ok(()),
        }
    }

    /// Queues a relayed message for the owner shard of its user or group; gives it back when
    /// that shard's completion queue is full.
    pub fn relayed(
        &self,
        r: Box<crate::services::cluster::Relayed>,
    ) -> Result<(), Box<crate::services::cluster::Relayed>> {
        let (tenant, id) = r.owner_key();
        let dest = owner_shard(tenant, id, self.links.len());
        match self.queue(dest, IoReply::Relayed(r)) {
            Err(IoReply::Relayed(r)) => Err(r),
            // The queue gives back what it was given, a Relayed.
            _ => Ok(()),
        }
    }

    /// Tells every shard that cluster node `node` is gone; a shard whose queue is full misses
    /// it (counted in `imgw_cluster_relay_dropped_total`).
    pub fn node_down(&self, node: &Str, stats: &ClusterStats) {
        for dest in 0..self.links.len() {
            let r = crate::services::cluster::Relayed::NodeDown { node: node.clone() };
            if self.queue(dest, IoReply::Relayed(Box::new(r))).is_err() {
                stats.relay_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues a kick of `user` for its owner shard; `false` when that shard's queue is full.
    pub fn kick(&self, user: UserKey) -> bool {
        let dest = owner_shard(&user.tenant, &user.user, self.links.len());
        self.queue(dest, IoReply::Kick(Box::new(user))).is_ok()
    }

    /// Queues `reply` (token 0: nobody waits for it) for shard `dest`; gives it back when the
    /// shard's completion queue is full.
    fn queue(&self, dest: usize, reply: IoReply) -> Result<(), IoReply> {
        let Some(link) = self.links.get(dest) else {
            // Not reached: owner_shard answers below the number of shards, one link each.
            return Ok(());
        };
        match link.done.push(IoDone { token: 0, reply }) {
            Ok(()) => {
                wake(link);
                Ok(())
            }
            Err(back) => Err(back.reply),
        }
    }
}

/// A running I/O core.
pub struct IoCore {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    io_wake: Arc<tokio::sync::Notify>,
    pub stats: Arc<IoStats>,
    pusher: Pusher,
}

/// Opens the backend on the I/O core's runtime (a network backend's connections live there).
pub type BackendOpener = Box<
    dyn FnOnce() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Box<dyn Backend>, StoreError>>>,
        > + Send,
>;

/// Why the I/O core did not start.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum IoStartError {
    /// The thread, its runtime or a wake-up socket could not be created.
    #[error("starting the I/O core: {0}")]
    Io(#[from] std::io::Error),
    /// The durable store could not be opened (or migrated).
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
}

impl IoCore {
    /// Starts the I/O thread over `backend`; returns one port per shard.
    pub fn start(
        backend: Box<dyn Backend>,
        cfg: IoConfig,
        shards: usize,
        cpu: Option<usize>,
    ) -> Result<(IoCore, Vec<IoPort>), IoStartError> {
        Self::start_with(
            Box::new(move || Box::pin(async move { Ok(backend) })),
            cfg,
            shards,
            cpu,
        )
    }

    /// Starts the I/O thread, opens the backend on it with `open` and returns one port per
    /// shard once it is open (or the error that stopped it).
    pub fn start_with(
        open: BackendOpener,
        cfg: IoConfig,
        shards: usize,
        cpu: Option<usize>,
    ) -> Result<(IoCore, Vec<IoPort>), IoStartError> {
        // Counted before any shard can report ready; released by the topic task.
        if let (Some(_), Some(c)) = (&cfg.services.kafka, &cfg.services.ready) {
            c.backend_pending();
        }
        let inbound = Arc::new(ArrayQueue::new(cfg.queue_depth.max(1)));
        let io_wake = Arc::new(tokio::sync::Notify::new());
        let stats = Arc::new(IoStats::default());
        let mut ports = Vec::with_capacity(shards);
        let mut links = Vec::with_capacity(shards);
        for i in 0..shards {
            let (reader, writer) = UnixStream::pair()?;
            reader.set_nonblocking(true)?;
            writer.set_nonblocking(true)?;
            // The shard's own completions never exceed its commands in flight, which the
            // inbound bound caps; pushes and kicks from outside (`Pusher`) wait or are
            // refused when it is full.
            let done = Arc::new(ArrayQueue::new(cfg.queue_depth.max(1)));
            let notified = Arc::new(AtomicBool::new(false));
            ports.push(IoPort {
                shard: i as u16,
                inbound: inbound.clone(),
                io_wake: io_wake.clone(),
                done: done.clone(),
                notified: notified.clone(),
                wake_reader: Some(reader),
                stats: stats.clone(),
            });
            links.push(ShardLink {
                done,
                notified,
                wake_writer: writer,
            });
        }
        let links = Arc::new(links);
        let pusher = Pusher {
            links: links.clone(),
            max_body: cfg.services.max_push_body,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, wake2, stats2) = (stop.clone(), io_wake.clone(), stats.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), IoStartError>>(1);
        let thread = std::thread::Builder::new()
            .name("imgw-io".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                // A LocalSet: the services' tasks share the producer through Rc, on this thread.
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let backend = match open().await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    io_loop(backend, cfg, inbound, links, wake2, stop2, stats2).await;
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(IoStartError::Io(std::io::Error::other(
                    "the I/O core stopped while starting",
                )));
            }
        }
        Ok((
            IoCore {
                thread: Some(thread),
                stop,
                io_wake,
                stats,
                pusher,
            },
            ports,
        ))
    }

    /// A handle that queues push records and kicks for their owner shards, from any thread.
    pub fn pusher(&self) -> Pusher {
        self.pusher.clone()
    }

    /// Finishes the commands already queued, then stops the thread.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        self.io_wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for IoCore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.io_wake.notify_one();
    }
}

/// Pins the calling thread to `cpu`; best effort (an unpinned I/O core still works).
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            tracing::warn!(cpu, error = %e, "could not pin the I/O core");
        }
    }
}

/// The services as the I/O loop holds them.
struct Running {
    redis: Option<RedisHandle>,
    kafka: Option<Rc<RefCell<Kafka>>>,
    confirms: bool,
    /// Bounds the batches whose delivery reports are awaited (`kafka.max_in_flight`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Completes when the previous batch's deferred completions were handed out: batches
    /// complete in order, so per-conversation order survives Kafka's confirmations.
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    produce_timeout: Duration,
    /// Cluster mode: relays to other nodes, registration.
    cluster: Option<crate::services::cluster::Node>,
}

/// Starts the services on the I/O core's runtime. A service that cannot start is logged and
/// left off (an unreachable broker or Redis is not an error: clients reconnect by themselves).
async fn start_services(cfg: &Services, links: &Arc<Vec<ShardLink>>, stats: &IoStats) -> Running {
    let svc = stats.svc.clone();
    let redis = cfg.redis.as_ref().and_then(|(rc, node)| {
        let announce = cfg.cluster.is_some();
        crate::services::redis::start(
            rc,
            node.clone(),
            cfg.dedupe_window_ms,
            announce,
            svc.clone(),
        )
        .map_err(|e| tracing::error!(error = %e, "redis not started"))
        .ok()
    });
    let mut kafka = None;
    let mut max_in_flight = 1;
    let mut produce_timeout = Duration::from_secs(5);
    if let Some(kc) = &cfg.kafka {
        max_in_flight = kc.max_in_flight.max(1) as usize;
        produce_timeout = Duration::from_millis(kc.produce_timeout_ms);
        // Topics are created in the background, retried until the broker answers: a broker
        // that is down at start delays nothing else (the producer waits for the topics).
        let topics = kc.clone();
        let ready = cfg.ready.clone();
        let node_topic = cfg.cluster.as_ref().and_then(|(c, _)| {
            let id = c.node_id.as_deref()?;
            Some(crate::services::cluster::node_topic(c, id))
        });
        tokio::task::spawn_local(async move {
            let mut warned = false;
            loop {
                match crate::services::kafka::ensure_topics(&topics, node_topic.as_deref()).await {
                    Ok(()) => {
                        tracing::info!(topic = %topics.messages_topic, "kafka topics ready");
                        if let Some(c) = &ready {
                            c.backend_ready();
                        }
                        return;
                    }
                    Err(e) if !warned => {
                        tracing::warn!(error = %e, "kafka topics not created yet; retrying");
                        warned = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let local = !cfg.kafka_confirms;
        match Kafka::new(kc, svc.clone(), local) {
            Ok(k) => {
                let k = Rc::new(RefCell::new(k));
                if local {
                    tokio::task::spawn_local(crate::services::kafka::retry_local(k.clone()));
                }
                kafka = Some(k);
            }
            Err(e) => tracing::error!(error = %e, "kafka producer not started"),
        }
        if !kc.push_topic.is_empty() {
            let pusher = Pusher {
                links: links.clone(),
                max_body: cfg.max_push_body,
            };
            let sink = move |rec: Box<PushRecord>| pusher.push(rec);
            if let Err(e) =
                crate::services::kafka::start_push_consumer(kc, cfg.max_push_body, svc, sink)
            {
                tracing::error!(error = %e, "push ingress consumer not started");
            }
        }
    }
    let cluster = match (&cfg.cluster, &cfg.redis, &cfg.kafka, &kafka) {
        (Some((cc, info)), Some((rc, _)), Some(kc), Some(producer)) => {
            let pusher = Pusher {
                links: links.clone(),
                max_body: cfg.max_push_body,
            };
            let (down, down_stats) = (pusher.clone(), stats.cluster.clone());
            let setup = crate::services::cluster::Setup {
                cluster: cc,
                redis: rc,
                kafka: kc,
                info: info.clone(),
                producer: producer.clone(),
                stats: stats.cluster.clone(),
                ready: cfg.ready.clone(),
                node_down: Box::new(move |node| down.node_down(&node, &down_stats)),
            };
            match crate::services::cluster::start(setup, move |r| pusher.relayed(r)) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::error!(error = %e, "cluster mode not started");
                    None
                }
            }
        }
        (Some(_), ..) => {
            tracing::error!("cluster mode needs Redis and a Kafka producer; not started");
            None
        }
        _ => None,
    };
    Running {
        redis,
        kafka,
        confirms: cfg.kafka_confirms,
        slots: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
        previous: None,
        produce_timeout,
        cluster,
    }
}

fn wake(link: &ShardLink) {
    if !link.notified.swap(true, Ordering::AcqRel) {
        // A full socket buffer means unread wake-ups are pending: that is enough.
        let _ = (&link.wake_writer).write(&[1]);
    }
}

/// Hands a completion to its shard; waits (briefly, repeatedly) while the shard's completion
/// queue is full.
async fn complete(link: &ShardLink, mut done: IoDone) {
    while let Err(back) = link.done.push(done) {
        done = back;
        wake(link);
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

async fn io_loop(
    mut backend: Box<dyn Backend>,
    cfg: IoConfig,
    inbound: Arc<ArrayQueue<IoCmd>>,
    links: Arc<Vec<ShardLink>>,
    wake: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    stats: Arc<IoStats>,
) {
    let mut services = start_services(&cfg.services, &links, &stats).await;
    let mut batch: Vec<IoCmd> = Vec::with_capacity(cfg.batch_max);
    loop {
        while batch.len() < cfg.batch_max {
            match inbound.pop() {
                Some(c) => batch.push(c),
                None => break,
            }
        }
        if batch.is_empty() {
            if stop.load(Ordering::Acquire) {
                // Let the last batches' confirmations finish (at `local`: the records not
                // confirmed yet, for at most the produce timeout).
                if let Some(prev) = services.previous.take() {
                    let _ = prev.await;
                }
                if let (Some(k), false) = (&services.kafka, services.confirms) {
                    crate::services::kafka::flush_local(k, services.produce_timeout).await;
                }
                if let Some(c) = &services.cluster {
                    c.leave().await;
                }
                return;
            }
            // Re-check after registering interest so a push between pop and wait is not lost.
            let notified = wake.notified();
            if inbound.is_empty() && !stop.load(Ordering::Acquire) {
                notified.await;
            }
            continue;
        }
        stats
            .queue_depth
            .store(inbound.len() as u64, Ordering::Relaxed);
        run_batch(
            &mut *backend,
            &cfg,
            &mut batch,
            &links,
            &stats,
            &mut services,
        )
        .await;
    }
}

/// What an append needs for Kafka and Redis once the store accepted it.
struct Noted {
    tenant: Str,
    dest: Dest,
    cmid: Str,
    deliver: Deliver,
}

fn note(op: &Op) -> Option<Noted> {
    match op {
        Op::AppendInbox {
            user,
            cmid,
            deliver,
            ..
        } => Some(Noted {
            tenant: user.tenant.clone(),
            dest: Dest::User(user.user.clone()),
            cmid: cmid.clone(),
            deliver: deliver.clone(),
        }),
        Op::AppendGroup {
            group,
            cmid,
            deliver,
            ..
        } => Some(Noted {
            tenant: group.tenant.clone(),
            dest: Dest::Group(group.group.clone()),
            cmid: cmid.clone(),
            deliver: deliver.clone(),
        }),
        _ => None,
    }
}

/// A completion held back until Kafka confirmed its records (durability `backend`).
struct Deferred {
    shard: u16,
    token: u64,
    results: Vec<OpResult>,
    reports: Vec<Produced>,
}

/// After the store accepted the appends of one command: records dedupe keys in Redis and
/// produces to Kafka. Returns the reports to await before completing (`backend`), or `Err`
/// when the command must fail (`backend` and the records could not be enqueued, or a resend
/// of a message whose first produce is still unconfirmed). At `local` the records enqueued
/// are appended to `sent` (their reports are awaited apart: the command completes now).
fn publish(
    results: &mut [OpResult],
    notes: &mut [Option<Noted>],
    svc: &Running,
    sent: &mut Vec<Sent>,
) -> Result<Vec<Produced>, IoError> {
    let mut reports = Vec::new();
    for (r, n) in results.iter_mut().zip(notes.iter_mut()) {
        let (
            Some(n),
            OpResult::Appended {
                seq,
                mid,
                ts,
                duplicate,
            },
        ) = (n.take(), r)
        else {
            continue;
        };
        // The sender's copy of a 1:1 message (`server.sync_sent`) is not a message of its
        // own: no dedupe key and no Kafka record, only the relay to the other nodes with the
        // sender's devices (a cluster always has Kafka).
        let copy = matches!(n.deliver.to, Some(crate::protocol::Target::User(_)));
        if let (Some(redis), false, false) = (&svc.redis, *duplicate, copy) {
            redis.send(RedisCmd::Dedupe {
                tenant: n.tenant.clone(),
                sender: n.deliver.from.clone(),
                cmid: n.cmid.clone(),
                mid: *mid,
            });
        }
        let Some(kafka) = &svc.kafka else { continue };
        let mut k = kafka.borrow_mut();
        if *duplicate {
            // Only at `backend` can a stored message lack its record: its produce failed and
            // the client resends the cmid. Produce it again, unless it was confirmed (then
            // the resend is a plain duplicate) or is still awaited (the client retries).
            if copy || !svc.confirms || k.is_confirmed(*mid) {
                continue;
            }
            if k.is_in_flight(*mid) {
                return Err(IoError::Unavailable(
                    "kafka confirmation of the first attempt pending".into(),
                ));
            }
            k.stats.kafka_reproduced.fetch_add(1, Ordering::Relaxed);
            // The first attempt was refused before delivery: deliver it now.
            *duplicate = false;
        }
        let mut d = n.deliver;
        d.mid = *mid;
        d.inbox_seq = *seq;
        d.ts = *ts;
        if let Some(c) = &svc.cluster {
            c.relay(crate::services::cluster::RelayItem::Message {
                tenant: n.tenant.clone(),
                dest: n.dest.clone(),
                deliver: d.clone(),
            });
        }
        if copy {
            continue;
        }
        if svc.confirms {
            match k.produce(&n.tenant, &n.dest, &n.cmid, &d) {
                Ok(mut p) => reports.append(&mut p),
                Err(e) => return Err(IoError::Unavailable(e)),
            }
        } else {
            k.produce_local(&n.tenant, &n.dest, &n.cmid, &d, sent);
        }
    }
    Ok(reports)
}

/// Awaits the delivery reports of one batch, then hands out its completions (after the
/// previous batch's), and frees the in-flight slot.
async fn confirm(
    deferred: Vec<Deferred>,
    kafka: Rc<RefCell<Kafka>>,
    links: Arc<Vec<ShardLink>>,
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    next: tokio::sync::oneshot::Sender<()>,
    permit: tokio::sync::OwnedSemaphorePermit,
    limit: Duration,
) {
    let started = std::time::Instant::now();
    let stats = kafka.borrow().stats.clone();
    stats.kafka_in_flight.fetch_add(1, Ordering::Relaxed);
    // librdkafka fails a record after `message.timeout.ms`; the extra margin only guards
    // against a report that never comes.
    let limit = limit + Duration::from_secs(5);
    let wait = |p: Produced| async move {
        let error = match tokio::time::timeout(limit, p.report).await {
            Ok(Ok(Ok(_))) => None,
            Ok(Ok(Err((e, _)))) => {
                tracing::debug!(mid = p.mid, error = %e, "kafka did not confirm");
                Some(e)
            }
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(mid = p.mid, "kafka delivery report lost");
                Some(rdkafka::error::KafkaError::Canceled)
            }
        };
        (p.mid, error)
    };
    let mut outcomes = Vec::with_capacity(deferred.len());
    for d in deferred {
        let mut all_ok = true;
        for p in d.reports {
            let (mid, error) = wait(p).await;
            all_ok &= error.is_none();
            settle(&kafka, &stats, mid, error);
        }
        outcomes.push((d.shard, d.token, d.results, all_ok));
    }
    stats
        .kafka_confirm
        .record_us(started.elapsed().as_micros() as u64);
    if let Some(prev) = previous {
        let _ = prev.await;
    }
    let mut woken = vec![false; links.len()];
    for (shard, token, results, ok) in outcomes {
        let Some(link) = links.get(usize::from(shard)) else {
            continue;
        };
        let reply = if ok {
            IoReply::Applied(Ok(results))
        } else {
            IoReply::Applied(Err(IoError::Timeout(
                "kafka did not confirm the message".into(),
            )))
        };
        complete(link, IoDone { token, reply }).await;
        woken[usize::from(shard)] = true;
    }
    for (i, link) in links.iter().enumerate() {
        if woken[i] {
            wake(link);
        }
    }
    stats.kafka_in_flight.fetch_sub(1, Ordering::Relaxed);
    let _ = next.send(());
    drop(permit);
}

fn settle(
    kafka: &Rc<RefCell<Kafka>>,
    stats: &ServiceStats,
    mid: u64,
    error: Option<rdkafka::error::KafkaError>,
) {
    let ok = error.is_none();
    kafka.borrow_mut().settle(mid, ok, error.as_ref());
    if ok {
        stats.kafka_produced.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.kafka_failed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn run_batch(
    backend: &mut dyn Backend,
    cfg: &IoConfig,
    batch: &mut Vec<IoCmd>,
    links: &Arc<Vec<ShardLink>>,
    stats: &IoStats,
    svc: &mut Running,
) {
    // Every write of the batch in one apply: one durable commit.
    let mut ops = Vec::new();
    let mut spans = Vec::new();
    let noting = svc.kafka.is_some() || svc.redis.is_some();
    let mut notes: Vec<Option<Noted>> = Vec::new();
    for cmd in batch.iter_mut() {
        match &mut cmd.req {
            IoRequest::Apply(o) => {
                spans.push(o.len());
                if noting {
                    notes.extend(o.iter().map(note));
                }
                ops.append(o);
            }
            IoRequest::Presence(e) => {
                if let Some(r) = &svc.redis {
                    r.send(RedisCmd::Presence((**e).clone()));
                }
            }
            _ => {}
        }
    }
    let mut applied: Option<Result<std::vec::IntoIter<OpResult>, IoError>> = None;
    if !spans.is_empty() {
        if cfg.commit_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(cfg.commit_delay_ms)).await;
        }
        let started = std::time::Instant::now();
        let n = ops.len() as u64;
        let r = backend.apply(ops, now_ms()).await;
        stats.commit.record_us(started.elapsed().as_micros() as u64);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(n, Ordering::Relaxed);
        applied = Some(match r {
            Ok(results) => Ok(results.into_iter()),
            Err(e) => {
                let failed = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                let now = now_ms();
                if now.saturating_sub(stats.last_error_log_ms.load(Ordering::Relaxed)) >= 1_000 {
                    stats.last_error_log_ms.store(now, Ordering::Relaxed);
                    tracing::error!(error = %e, failed_batches_so_far = failed, "store commit failed");
                }
                Err(IoError::from(e))
            }
        });
    }
    let mut spans = spans.into_iter();
    let mut notes = notes.into_iter();
    let mut woken = vec![false; links.len()];
    let mut deferred = Vec::new();
    let mut sent = Vec::new();
    for cmd in batch.drain(..) {
        let reply = match cmd.req {
            IoRequest::Apply(_) => {
                let n = spans.next().unwrap_or(0);
                let mut cmd_notes: Vec<Option<Noted>> = if noting {
                    notes.by_ref().take(n).collect()
                } else {
                    Vec::new()
                };
                match &mut applied {
                    Some(Ok(it)) => {
                        let mut results: Vec<OpResult> = it.by_ref().take(n).collect();
                        match publish(&mut results, &mut cmd_notes, svc, &mut sent) {
                            Ok(reports) if reports.is_empty() => IoReply::Applied(Ok(results)),
                            Ok(reports) => {
                                deferred.push(Deferred {
                                    shard: cmd.shard,
                                    token: cmd.token,
                                    results,
                                    reports,
                                });
                                continue;
                            }
                            Err(e) => IoReply::Applied(Err(e)),
                        }
                    }
                    Some(Err(e)) => IoReply::Applied(Err(e.clone())),
                    // Not reached: a batch with an `Apply` always ran `apply`.
                    None => IoReply::Applied(Err(IoError::Unavailable("no apply ran".into()))),
                }
            }
            IoRequest::ReadInbox { user, after, limit } => IoReply::Inbox(
                backend
                    .read_inbox(&user, after, limit)
                    .await
                    .map_err(IoError::from),
            ),
            IoRequest::Cursor { user, device } => {
                IoReply::Cursor(backend.cursor(&user, &device).await.map_err(IoError::from))
            }
            IoRequest::RouteNodes { user } => match &svc.cluster {
                // A Redis round trip: answered by a task of its own, so that the batch's
                // other completions do not wait for it.
                Some(c) => {
                    let (lookup, links) = (c.route_nodes(&user), links.clone());
                    let (shard, token) = (usize::from(cmd.shard), cmd.token);
                    tokio::task::spawn_local(async move {
                        let reply = IoReply::Nodes(lookup.await);
                        if let Some(link) = links.get(shard) {
                            complete(link, IoDone { token, reply }).await;
                            wake(link);
                        }
                    });
                    continue;
                }
                None => IoReply::Nodes(Ok(Vec::new())),
            },
            IoRequest::LastInboxSeq { user } => {
                IoReply::Cursor(backend.last_inbox_seq(&user).await.map_err(IoError::from))
            }
            IoRequest::ReadGroup {
                member,
                group,
                after,
                limit,
            } => IoReply::Group(
                read_group_for(backend, &member, group, after, limit)
                    .await
                    .map_err(IoError::from),
            ),
            IoRequest::UnreadGroups { user } => {
                IoReply::Groups(unread_groups(backend, &user).await.map_err(IoError::from))
            }
            IoRequest::GroupMembers { group } => {
                IoReply::Members(all_members(backend, &group).await.map_err(IoError::from))
            }
            IoRequest::UserGroups { user } => {
                IoReply::Groups(backend.user_groups(&user).await.map_err(IoError::from))
            }
            IoRequest::Presence(_) => continue,
            IoRequest::Relay(item) => {
                if let Some(c) = &svc.cluster {
                    c.relay(*item);
                }
                continue;
            }
            IoRequest::GroupHere { group, here } => {
                if let Some(c) = &svc.cluster {
                    c.group_here(cmd.shard, &group.tenant, &group.group, here);
                }
                continue;
            }
        };
        let Some(link) = links.get(usize::from(cmd.shard)) else {
            continue;
        };
        complete(
            link,
            IoDone {
                token: cmd.token,
                reply,
            },
        )
        .await;
        woken[usize::from(cmd.shard)] = true;
    }
    for (i, link) in links.iter().enumerate() {
        if woken[i] {
            wake(link);
        }
    }
    let Some(kafka) = svc.kafka.clone() else {
        return;
    };
    if !sent.is_empty() {
        // Durability `local`: the reports are awaited without holding a slot (they have no
        // time limit; librdkafka's queue bounds them).
        tokio::task::spawn_local(crate::services::kafka::watch(kafka.clone(), sent));
    }
    if deferred.is_empty() {
        return;
    }
    // At most `max_in_flight` batches await reports: beyond, the loop waits here (its queue
    // then fills and shards answer `overloaded`); each wait is bounded by the produce timeout.
    let Ok(permit) = svc.slots.clone().acquire_owned().await else {
        return; // the semaphore is never closed
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let previous = svc.previous.replace(rx);
    tokio::task::spawn_local(confirm(
        deferred,
        kafka,
        links.clone(),
        previous,
        tx,
        permit,
        svc.produce_timeout,
    ));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A member's page of a group timeline (`None` for a non-member), each message's
/// `inbox_seq` set to its `gseq`.
async fn read_group_for(
    backend: &mut dyn Backend,
    member: &UserRef,
    group: Str,
    after: u64,
    limit: u32,
) -> Result<Option<(u64, GroupPage)>, crate::store::StoreError> {
    // The user's groups are bounded (`max_groups_per_user`): a member check without a
    // dedicated store call.
    if !backend.user_groups(member).await?.contains(&group) {
        return Ok(None);
    }
    let g = GroupRef {
        tenant: member.tenant.clone(),
        group,
    };
    let after = if after == 0 {
        backend.group_cursor(&g, &member.user).await?
    } else {
        after
    };
    let mut page = backend.read_group(&g, after, limit).await?;
    for e in &mut page.messages {
        e.deliver.inbox_seq = e.gseq;
        e.deliver.to = Some(crate::protocol::Target::Group(g.group.clone()));
    }
    Ok(Some((after, page)))
}

/// The user's groups with messages after the user's group cursor (at most
/// `max_groups_per_user`, two point reads each).
async fn unread_groups(
    backend: &mut dyn Backend,
    user: &UserRef,
) -> Result<Vec<Str>, crate::store::StoreError> {
    let mut out = Vec::new();
    for group in backend.user_groups(user).await? {
        let g = GroupRef {
            tenant: user.tenant.clone(),
            group,
        };
        if backend.last_group_seq(&g).await? > backend.group_cursor(&g, &user.user).await? {
            out.push(g.group);
        }
    }
    Ok(out)
}

/// Every member of `group`, page by page (the store bounds a group's size).
async fn all_members(
    backend: &mut dyn Backend,
    group: &GroupRef,
) -> Result<Vec<Str>, crate::store::StoreError> {
    let mut out: Vec<Str> = Vec::new();
    loop {
        let page = backend
            .group_members(group, out.last().map(|s| &**s), u32::MAX)
            .await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

#[cfg(test)]
mod error_tests {
    use super::IoError;
    use crate::protocol::ErrorCode;
    use crate::store::StoreError;

    /// Each store failure reaches the client as its documented code: a timeout or an engine
    /// failure is `unavailable` (retry), damaged data is `internal`.
    #[test]
    fn store_errors_map_to_the_documented_client_codes() {
        let timeout = IoError::from(StoreError::Timeout { ms: 500 });
        assert!(matches!(timeout, IoError::Timeout(_)));
        assert_eq!(timeout.code(), ErrorCode::Unavailable);
        let corrupt = IoError::from(StoreError::Corrupt {
            table: "inbox",
            detail: "short record".into(),
        });
        assert!(matches!(corrupt, IoError::Corrupt(_)));
        assert_eq!(corrupt.code(), ErrorCode::Internal);
        assert_eq!(
            corrupt.to_string(),
            "corrupt store data: corrupt record in `inbox`: short record"
        );
        let engine = IoError::from(StoreError::Engine("lock held".into()));
        assert!(matches!(engine, IoError::Unavailable(_)));
        assert_eq!(engine.code(), ErrorCode::Unavailable);
        // A full disk is its own kind, decided by the error's kind (not its text).
        let full = IoError::from(StoreError::Full("no space left".into()));
        assert!(matches!(full, IoError::StoreFull(_)));
        assert_eq!(full.code(), ErrorCode::Unavailable);
        assert_eq!(
            full.retry_after_ms(200),
            Some(200 * super::STORE_FULL_RETRY_FACTOR)
        );
        assert_eq!(engine.retry_after_ms(200), Some(200));
        assert_eq!(corrupt.retry_after_ms(200), None);
    }
}
