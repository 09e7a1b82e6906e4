//! Redis on the I/O core: presence with a TTL, user -> session routes, and send dedupe keys.
//!
//! Keys (prefix `redis.key_prefix`, default `imgw:`):
//! - `{p}presence:{tenant}:{user}`: a hash, device -> `online`; the user is online while the
//!   key exists. TTL `presence_ttl_ms`, refreshed by the devices' heartbeats.
//! - `{p}route:{tenant}:{user}`: a hash, device -> `{node}/{shard}/{conn}`: where each online
//!   device's session lives. Same TTL.
//! - `{p}dedupe:{tenant}:{sender}:{cmid}`: the accepted message's mid, `SET NX PX` with the
//!   dedupe window as its TTL. The durable store stays the authority on duplicates; the key is
//!   the record other nodes and tools can check without the store.
//!
//! The I/O core hands events to [`RedisHandle::send`] (never waits: a full queue drops and
//! counts). One task owns the connection: it takes up to `pipeline_max` events at a time and
//! sends them as one pipeline. It keeps a mirror of the online devices, so that after Redis
//! comes back (or after a failed pipeline) it re-publishes every online device.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use super::ServiceError;
use crate::config::RedisConfig;
use crate::metrics::ServiceStats;
use crate::protocol::Str;

/// What happened to one device's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceKind {
    /// The device authenticated.
    Up,
    /// A heartbeat: extend the TTL (and write the entry if it is missing).
    Refresh,
    /// The device's connection closed.
    Down,
}

/// One presence/route event from a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    pub kind: PresenceKind,
    pub tenant: Str,
    pub user: Str,
    pub device: Str,
    /// Where the session lives on this node.
    pub shard: u16,
    pub conn: u64,
}

/// A command for the Redis task.
#[derive(Debug)]
pub enum RedisCmd {
    Presence(PresenceEvent),
    /// A message was accepted: record `(tenant, sender, cmid) -> mid` for the dedupe window.
    Dedupe {
        tenant: Str,
        sender: Str,
        cmid: Str,
        mid: u64,
    },
}

/// The I/O core's end of the Redis task.
#[derive(Clone)]
pub struct RedisHandle {
    tx: tokio::sync::mpsc::Sender<RedisCmd>,
    stats: Arc<ServiceStats>,
}

impl RedisHandle {
    /// Queues a command; a full queue drops it (counted in `imgw_redis_dropped_total`).
    pub fn send(&self, cmd: RedisCmd) {
        if self.tx.try_send(cmd).is_err() {
            self.stats.redis_dropped.fetch_add(1, Relaxed);
        }
    }
}

/// The key of one user's `presence` or `route` hash (the module docs list the keys).
pub(crate) fn user_key(prefix: &str, what: &str, tenant: &str, user: &str) -> String {
    format!("{prefix}{what}:{tenant}:{user}")
}

/// A multiplexed connection whose connect and every response are bounded by `timeout`.
pub(crate) async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> Result<MultiplexedConnection, String> {
    let t = Some(timeout);
    let c = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(t)
        .set_response_timeout(t);
    client
        .get_multiplexed_async_connection_with_config(&c)
        .await
        .map_err(|e| e.to_string())
}

/// Starts the Redis task on the current tokio runtime (the I/O core's).
/// `announce`: cluster mode, where each device that comes up is also published on
/// `{p}routes` (`{tenant}\n{user}`), so other nodes drop their cached routes of that user at
/// once (src/services/cluster.rs).
pub fn start(
    cfg: &RedisConfig,
    node: String,
    dedupe_window_ms: u64,
    announce: bool,
    stats: Arc<ServiceStats>,
) -> Result<RedisHandle, ServiceError> {
    let url = cfg
        .url
        .as_deref()
        .ok_or_else(|| ServiceError::Redis("no url".into()))?;
    let client = redis::Client::open(url).map_err(|e| ServiceError::Redis(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(cfg.queue_max.max(1) as usize);
    let worker = Worker {
        cfg: cfg.clone(),
        node,
        dedupe_window_ms,
        announce,
        client,
        stats: stats.clone(),
        mirror: HashMap::new(),
    };
    tokio::spawn(worker.run(rx));
    Ok(RedisHandle { tx, stats })
}

/// Where one online device lives (the mirror, for re-publishing).
#[derive(Clone, Copy, Debug)]
struct Session {
    shard: u16,
    conn: u64,
}

struct Worker {
    cfg: RedisConfig,
    node: String,
    dedupe_window_ms: u64,
    /// Publish each device that comes up on `{p}routes` (cluster mode).
    announce: bool,
    client: redis::Client,
    stats: Arc<ServiceStats>,
    /// Online devices: (tenant, user, device) -> session. Bounded by the connections the
    /// gateway admits (`limits.max_conns`).
    mirror: HashMap<(Str, Str, Str), Session>,
}

impl Worker {
    fn key(&self, what: &str, tenant: &str, user: &str) -> String {
        user_key(&self.cfg.key_prefix, what, tenant, user)
    }

    fn up(&self, p: &mut redis::Pipeline, tenant: &str, user: &str, device: &str, s: Session) {
        let ttl = self.cfg.presence_ttl_ms;
        let pk = self.key("presence", tenant, user);
        let rk = self.key("route", tenant, user);
        let route = format!("{}/{}/{}", self.node, s.shard, s.conn);
        p.cmd("HSET").arg(&pk).arg(device).arg("online").ignore();
        p.cmd("PEXPIRE").arg(&pk).arg(ttl).ignore();
        p.cmd("HSET").arg(&rk).arg(device).arg(route).ignore();
        p.cmd("PEXPIRE").arg(&rk).arg(ttl).ignore();
    }

    /// Applies an event to the mirror and adds its commands to `p`.
    fn add(&mut self, p: &mut redis::Pipeline, cmd: RedisCmd) {
        match cmd {
            RedisCmd::Presence(e) => {
                let s = Session {
                    shard: e.shard,
                    conn: e.conn,
                };
                match e.kind {
                    PresenceKind::Up | PresenceKind::Refresh => {
                        self.up(p, &e.tenant, &e.user, &e.device, s);
                        if self.announce && e.kind == PresenceKind::Up {
                            // After the route's HSET in the same pipeline: a node that
                            // hears it and looks the user up again finds the new route.
                            p.cmd("PUBLISH")
                                .arg(format!("{}routes", self.cfg.key_prefix))
                                .arg(format!("{}\n{}", e.tenant, e.user))
                                .ignore();
                        }
                        self.mirror.insert((e.tenant, e.user, e.device), s);
                    }
                    PresenceKind::Down => {
                        let k = (e.tenant, e.user, e.device);
                        // A device that reconnected on another connection keeps its entry.
                        if self
                            .mirror
                            .get(&k)
                            .is_some_and(|m| m.conn != e.conn || m.shard != e.shard)
                        {
                            return;
                        }
                        self.mirror.remove(&k);
                        let (tenant, user, device) = k;
                        let pk = self.key("presence", &tenant, &user);
                        let rk = self.key("route", &tenant, &user);
                        p.cmd("HDEL").arg(pk).arg(&*device).ignore();
                        p.cmd("HDEL").arg(rk).arg(&*device).ignore();
                    }
                }
            }
            RedisCmd::Dedupe {
                tenant,
                sender,
                cmid,
                mid,
            } => {
                let k = format!("{}dedupe:{tenant}:{sender}:{cmid}", self.cfg.key_prefix);
                p.cmd("SET")
                    .arg(k)
                    .arg(mid)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.dedupe_window_ms.max(1))
                    .ignore();
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        connect(&self.client, Duration::from_millis(self.cfg.timeout_ms)).await
    }

    async fn exec(&self, conn: &mut MultiplexedConnection, p: &redis::Pipeline) -> bool {
        let n = p.len() as u64;
        if n == 0 {
            return true;
        }
        let t = Duration::from_millis(self.cfg.timeout_ms);
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(t, p.query_async::<()>(conn)).await;
        match r {
            Ok(Ok(())) => {
                self.stats
                    .redis_pipeline
                    .record_us(started.elapsed().as_micros() as u64);
                self.stats.redis_pipelines.fetch_add(1, Relaxed);
                self.stats.redis_commands.fetch_add(n, Relaxed);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis pipeline failed");
                self.stats.redis_errors.fetch_add(1, Relaxed);
                false
            }
            Err(_) => {
                tracing::warn!("redis pipeline timed out");
                self.stats.redis_errors.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Writes every online device again, `pipeline_max` commands per round trip.
    async fn republish(&self, conn: &mut MultiplexedConnection) -> bool {
        let per = (self.cfg.pipeline_max as usize / 4).max(1);
        let mut p = redis::pipe();
        let mut n = 0;
        for ((t, u, d), s) in &self.mirror {
            self.up(&mut p, t, u, d, *s);
            n += 1;
            if n % per == 0 {
                if !self.exec(conn, &p).await {
                    return false;
                }
                p = redis::pipe();
            }
        }
        if !self.exec(conn, &p).await {
            return false;
        }
        self.stats.redis_republished.fetch_add(n as u64, Relaxed);
        true
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<RedisCmd>) {
        let max = self.cfg.pipeline_max.max(1) as usize;
        let retry = Duration::from_millis(self.cfg.reconnect_ms);
        let mut conn: Option<MultiplexedConnection> = None;
        let mut next_try = Instant::now();
        let mut buf = Vec::with_capacity(max);
        let mut failing = false;
        loop {
            if conn.is_none() && Instant::now() >= next_try {
                match self.connect().await {
                    Ok(mut c) => {
                        self.stats.redis_connects.fetch_add(1, Relaxed);
                        failing = false;
                        if self.republish(&mut c).await {
                            tracing::info!(devices = self.mirror.len(), "redis connected");
                            self.stats.redis_up.store(1, Relaxed);
                            conn = Some(c);
                        } else {
                            next_try = Instant::now() + retry;
                        }
                    }
                    Err(e) => {
                        // One warning per outage, not one per attempt.
                        if !failing {
                            tracing::warn!(error = %e, "redis connect failed; retrying");
                        }
                        failing = true;
                        self.stats.redis_errors.fetch_add(1, Relaxed);
                        next_try = Instant::now() + retry;
                    }
                }
            }
            // While down, wake up in time for the next connect attempt.
            let got = if conn.is_some() {
                rx.recv_many(&mut buf, max).await
            } else {
                let wait = next_try.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, rx.recv_many(&mut buf, max)).await {
                    Ok(n) => n,
                    Err(_) => continue,
                }
            };
            if got == 0 {
                return; // the I/O core stopped
            }
            let mut p = redis::pipe();
            for cmd in buf.drain(..) {
                self.add(&mut p, cmd);
            }
            match conn.as_mut() {
                Some(c) => {
                    if !self.exec(c, &p).await {
                        // The mirror holds the state: it is re-published after reconnecting.
                        self.stats.redis_up.store(0, Relaxed);
                        self.stats.redis_dropped.fetch_add(got as u64, Relaxed);
                        conn = None;
                        next_try = Instant::now() + retry;
                    }
                }
                None => {
                    self.stats.redis_dropped.fetch_add(got as u64, Relaxed);
                }
            }
        }
    }
}
