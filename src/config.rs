//! Gateway configuration: the TOML file's shape, its defaults, and the bounds every queue,
//! buffer and timeout takes (SPEC 5). Command-line flags override the file (src/main.rs).
//!
//! Every limit lives here with a sane default; nothing else in the gateway invents a bound.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// When a `send` is acknowledged (SPEC 4).
///
/// The default is `local`: with no backend configured, `imgw serve` acks what the embedded
/// store in `server.data_dir` has fsynced (SPEC 1 and 6), so a gateway started with its
/// defaults loses no acknowledged message to a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acked on accept; nothing survives a crash, and an offline device's messages are not
    /// kept. For load tests only: chosen explicitly, never by default.
    Memory,
    /// Acked after the embedded store's group commit has fsynced it. The default.
    #[default]
    Local,
    /// Acked after the configured backends (MySQL and/or Kafka) confirmed it.
    Backend,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Durability::Memory),
            "local" => Ok(Durability::Local),
            "backend" => Ok(Durability::Backend),
            other => Err(format!(
                "unknown durability {other:?} (memory|local|backend)"
            )),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub ws: WsConfig,
    pub auth: AuthConfig,
    pub runtime: RuntimeConfig,
    pub store: StoreConfig,
    pub mysql: MysqlConfig,
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    pub cluster: ClusterConfig,
    pub tls: TlsConfig,
    /// Per-tenant settings over the defaults in `[limits]`: `[tenants.NAME]`.
    pub tenants: std::collections::BTreeMap<String, TenantConfig>,
}

/// The TLS listeners' certificate and key (`[tls]`, or `--tls-cert` / `--tls-key`): PEM
/// files, read at start and again on SIGHUP.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// One tenant's own limits (`[tenants.NAME]`); what is absent comes from `[limits]`.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Authenticated connections of the tenant over the whole process (default
    /// `limits.max_conns_per_tenant`).
    pub max_conns: Option<u32>,
    /// The tenant's send bucket (defaults `limits.tenant_sends_per_sec` and
    /// `limits.tenant_send_burst`; a rate of 0: none).
    pub sends_per_sec: Option<u32>,
    pub send_burst: Option<u32>,
}

/// Tenants with settings of their own, at most.
pub const MAX_TENANTS_CONFIGURED: usize = 100_000;

impl Config {
    /// The connection limit of `tenant`: its own, or `limits.max_conns_per_tenant`.
    pub fn max_conns_of(&self, tenant: &str) -> u32 {
        self.tenants
            .get(tenant)
            .and_then(|t| t.max_conns)
            .unwrap_or(self.limits.max_conns_per_tenant)
    }

    /// The send bucket of `tenant` as (rate, burst); `None`: no tenant rate. A burst below
    /// one send is one send.
    pub fn tenant_sends_of(&self, tenant: &str) -> Option<(u32, u32)> {
        let t = self.tenants.get(tenant);
        let rate = t
            .and_then(|t| t.sends_per_sec)
            .unwrap_or(self.limits.tenant_sends_per_sec);
        let burst = t
            .and_then(|t| t.send_burst)
            .unwrap_or(self.limits.tenant_send_burst);
        (rate > 0).then_some((rate, burst.max(1)))
    }
}

/// Cluster mode (docs/ARCHITECTURE.md "Cluster", src/cluster.rs): several nodes share one
/// MariaDB (the store), one Redis (node registry, device routes) and one Kafka (a topic per
/// node for cross-node delivery). Off unless `node_id` is set (`--node-id NAME`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name (`[A-Za-z0-9._-]`, 1 to 64 bytes); `None` (the default): one node.
    pub node_id: Option<String>,
    /// How often the node refreshes its registration in Redis (default 1 000 ms).
    pub heartbeat_ms: u64,
    /// A node whose registration was not refreshed for this long is dead (default 5 000 ms):
    /// its key expires and the survivors drop it from the node set.
    pub dead_after_ms: u64,
    /// Recipients whose nodes a node remembers (default 65 536; two generations, like the
    /// store's sequence cache).
    pub route_cache_entries: u32,
    /// How long a remembered recipient's node list is used before Redis is asked again
    /// (default 1 000 ms). A stale entry can only lack a node the recipient logged in to
    /// meanwhile: that device then gets the message from the store (at its next gap or sync).
    pub route_cache_ttl_ms: u64,
    /// Accepted messages waiting to be relayed to other nodes (default 65 536); beyond it a
    /// relay is dropped and counted (the store has the message; the device catches up).
    pub relay_queue_max: u32,
    /// Node topics are `{topic_prefix}{node_id}` (default `imgw.node.`).
    pub topic_prefix: String,
    /// Set at start from the slot this node claimed in Redis (0..MAX_NODES): the node's bits
    /// in message ids. Not a configuration key.
    #[serde(skip)]
    pub slot: Option<u8>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            heartbeat_ms: 1_000,
            dead_after_ms: 5_000,
            route_cache_entries: 65_536,
            route_cache_ttl_ms: 1_000,
            relay_queue_max: 65_536,
            topic_prefix: "imgw.node.".into(),
            slot: None,
        }
    }
}

/// The MySQL / MariaDB backend (durability `backend`; docs/STORE.md, "MySQL backend").
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user:password@host:port/database` (`--mysql URL`). Unset: no MySQL backend.
    /// With durability `backend`, the durable store lives there and `send_ack` follows its
    /// commit.
    pub url: Option<String>,
    /// Connections the pool keeps open (at least `writers`).
    pub pool_min: u32,
    /// Connections at most.
    pub pool_max: u32,
    /// Transactions a batch runs at once (at most `pool_max` of them), split by inbox and
    /// group: one inbox or group is only ever written by one of them. 1 runs each batch as one
    /// transaction.
    pub writers: u32,
    /// Ops per transaction below which a batch is not split: a batch of fewer than
    /// `2 × writer_min_ops` ops runs as one transaction (under light load one transaction
    /// costs the server less than several, and is as fast).
    pub writer_min_ops: u32,
    /// Deadline for getting a connection: a new one's TCP connect, handshake and login.
    pub connect_timeout_ms: u64,
    /// Deadline of one store call: a whole batch's transaction (the group commit) or one read.
    /// Past it the call fails, the transaction is rolled back and the sends of the batch get
    /// `unavailable`: this bounds how long a send waits while MySQL is down.
    pub query_timeout_ms: u64,
    /// Prepared statements cached per connection.
    pub stmt_cache: u32,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            url: None,
            pool_min: 1,
            pool_max: 4,
            writers: 4,
            writer_min_ops: 512,
            connect_timeout_ms: 2_000,
            query_timeout_ms: 5_000,
            stmt_cache: 128,
        }
    }
}

impl std::fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("pool_min", &self.pool_min)
            .field("pool_max", &self.pool_max)
            .field("writers", &self.writers)
            .field("writer_min_ops", &self.writer_min_ops)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("query_timeout_ms", &self.query_timeout_ms)
            .field("stmt_cache", &self.stmt_cache)
            .finish()
    }
}

/// `url` with the password of its user-info part (`scheme://user:PASSWORD@host`) replaced by
/// `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// Redis on the I/O core (docs/ARCHITECTURE.md "Services"): presence with a TTL, user ->
/// session routes, send dedupe keys. Off unless `url` is set (or `--redis URL`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://HOST:PORT/DB`; `None` (the default) turns Redis off.
    pub url: Option<String>,
    /// Prefix of every key imgw writes (default `imgw:`), so several deployments or tests can
    /// share one Redis.
    pub key_prefix: String,
    /// This node's name in session routes (default: empty = the WebSocket listen address).
    pub node: String,
    /// Lifetime of a presence/route key (default 30 000 ms). Refreshed by heartbeats (at most
    /// once per a third of it per device), so keys of a node that died expire after it.
    pub presence_ttl_ms: u64,
    /// Connect and per-pipeline timeout (default 1 000 ms).
    pub timeout_ms: u64,
    /// Commands per pipeline (default 512): a batch of presence events becomes one round trip.
    pub pipeline_max: u32,
    /// Presence events waiting for Redis (default 65 536). Beyond it events are dropped and
    /// counted (`imgw_redis_dropped_total`); a re-publish after reconnect repairs the state.
    pub queue_max: u32,
    /// Delay between reconnect attempts while Redis is down (default 500 ms).
    pub reconnect_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            key_prefix: "imgw:".into(),
            node: String::new(),
            presence_ttl_ms: 30_000,
            timeout_ms: 1_000,
            pipeline_max: 512,
            queue_max: 65_536,
            reconnect_ms: 500,
        }
    }
}

/// One business-event routing rule: a `send` whose `type` starts with `prefix` is also
/// appended to `topic` (besides the normal delivery and the messages topic).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaRoute {
    pub prefix: String,
    pub topic: String,
}

/// Kafka on the I/O core (docs/ARCHITECTURE.md "Services"): the messages topic, routed
/// business events, the push ingress topic. Off unless `brokers` is set (or `--kafka`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `HOST:PORT[,HOST:PORT...]`; `None` (the default) turns Kafka off.
    pub brokers: Option<String>,
    /// Every accepted message, keyed by conversation (default `imgw.messages`).
    pub messages_topic: String,
    /// Records imgw consumes and delivers to users or groups (default `imgw.push`); empty
    /// turns the consumer off.
    pub push_topic: String,
    /// Consumer group of the push ingress (default `imgw-push`).
    pub push_group: String,
    /// Partitions of the topics imgw creates at start (default 3).
    pub partitions: i32,
    /// Replication factor of the topics imgw creates (default 1).
    pub replication: i32,
    /// Business-event routes (default none): `[[kafka.routes]] prefix = "order." topic = "orders"`.
    pub routes: Vec<KafkaRoute>,
    /// How long a produce may take before it fails (librdkafka `message.timeout.ms`; default
    /// 5 000 ms; librdkafka checks about once a second). At durability `backend` the `send`
    /// then gets `unavailable`. At `local` records have no time limit (librdkafka retries them
    /// in order until the broker confirms); there it bounds only the wait for the last records
    /// at shutdown.
    pub produce_timeout_ms: u64,
    /// Batches whose delivery reports are awaited at once (default 64); the I/O core waits for
    /// a slot beyond it (back-pressure into its bounded queue).
    pub max_in_flight: u32,
    /// Records librdkafka may buffer (default 100 000); beyond it a produce fails at once.
    pub queue_max: u32,
    /// Message ids remembered as confirmed on the topic (default 100 000), so a resent `cmid`
    /// after a failed produce is produced again only if it never was confirmed.
    pub confirmed_max: u32,
    /// Producer linger (librdkafka `linger.ms`; default 2 ms).
    pub linger_ms: u64,
    /// Durability `local`: records to produce again, at most (default 100 000, as
    /// `queue_max`, so that a replaced producer's whole queue fits). The backlog holds what
    /// librdkafka refused or handed back (queue full, fenced producer), and the records of
    /// the same conversations behind them; beyond it a record is given up
    /// (`imgw_kafka_given_up_total`).
    pub retry_max: u32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: None,
            messages_topic: "imgw.messages".into(),
            push_topic: "imgw.push".into(),
            push_group: "imgw-push".into(),
            partitions: 3,
            replication: 1,
            routes: Vec::new(),
            produce_timeout_ms: 5_000,
            max_in_flight: 64,
            queue_max: 100_000,
            confirmed_max: 100_000,
            linger_ms: 2,
            retry_max: 100_000,
        }
    }
}

/// The I/O core and the embedded store (durability `local`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Commands waiting for the I/O core, all shards together; beyond it sends get
    /// `overloaded`.
    pub queue_depth: u32,
    /// Commands per group commit (one fsync per batch).
    pub batch_max: u32,
    /// A resent `cmid` within this window returns the first `send_ack` and stores nothing.
    pub dedupe_window_ms: u64,
    /// Test-only: delay before each commit, to simulate a slow disk.
    pub commit_delay_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            queue_depth: 65_536,
            batch_max: 1_024,
            dedupe_window_ms: 600_000,
            commit_delay_ms: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// WebSocket listener (upgrade at `ws.path`).
    pub ws_listen: SocketAddr,
    /// Raw-TCP listener (docs/PROTOCOL.md frames).
    pub tcp_listen: SocketAddr,
    /// WebSocket over TLS (`wss://`), beside the plain listener; needs `[tls]`.
    pub wss_listen: Option<SocketAddr>,
    /// Raw-TCP frames over TLS, beside the plain listener; needs `[tls]`.
    pub tls_listen: Option<SocketAddr>,
    /// Admin HTTP: /metrics, /healthz, /readyz.
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Listen backlog for both listeners (also capped by net.core.somaxconn).
    pub backlog: u32,
    /// Upper bound of the reconnect hint spread in `goaway` during drain.
    pub drain_reconnect_spread_ms: u64,
    /// How long a drain waits for connections to flush before exiting anyway.
    pub drain_timeout_ms: u64,
    /// Accept a WebSocket echo endpoint at `/echo` (conformance testing only).
    pub ws_echo: bool,
    /// Serve the browser pages on the admin listener: the chat page at `/chat` and the
    /// dashboard at `/dashboard` (`--web`; src/web.rs). Their origin is admitted by the
    /// WebSocket listener's `Origin` check without `allowed_origins`.
    pub web: bool,
    /// A 1:1 message also goes into its sender's inbox, `to` naming the peer: the sender's
    /// other devices get it at once and an offline one at `sync` (docs/PROTOCOL.md). Costs a
    /// second inbox append per message; `false` turns it off.
    pub sync_sent: bool,
    /// Where to write the bound addresses once the listeners are bound, as JSON
    /// `{"ws":ADDR,"tcp":ADDR,"admin":ADDR}` (`--ports-file`): how a script or test learns
    /// the ports of listeners given port 0.
    pub ports_file: Option<PathBuf>,
    /// Share the listening ports with other imgw processes on purpose (SO_REUSEPORT: the
    /// kernel spreads the connections over them), for a host whose per-process descriptor
    /// limit is below the connections wanted (bench/many_conns.sh). Off by default: a port
    /// another process holds is then refused at start, so two gateways that know nothing of
    /// each other never split one address's clients by accident.
    pub share_ports: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Maximum raw-TCP frame (header + extensions + payload).
    pub max_frame_bytes: u32,
    /// Time allowed between accept and a successful `hello`.
    pub handshake_timeout_ms: u64,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u64,
    /// Heartbeat interval announced in `welcome` (clients ping at least this often).
    pub heartbeat_ms: u64,
    /// Token bucket per connection: sustained sends per second and burst.
    pub sends_per_sec: u32,
    pub send_burst: u32,
    /// Token bucket per connection on inbound bytes.
    pub bytes_per_sec: u32,
    /// Connections per process (all shards together) and per tenant.
    pub max_conns: u32,
    pub max_conns_per_tenant: u32,
    /// Token bucket per tenant over all its connections and shards: sustained sends per
    /// second and burst (0: no tenant rate, only the per-connection one).
    pub tenant_sends_per_sec: u32,
    pub tenant_send_burst: u32,
    /// Online devices per user.
    pub max_devices_per_user: u32,
    /// Users one connection may subscribe to for presence.
    pub max_presence_subs: u32,
    /// Groups one user may join.
    pub max_groups_per_user: u32,
    /// Members of one group.
    pub max_group_members: u32,
    /// Bytes of encoded output waiting for one connection before it is closed as too slow.
    pub max_outbound_bytes: u32,
    /// Sockets per shard in their lingering close at once (the gateway closed them: its side
    /// is shut and the peer's last input is read and dropped, for at most 2 s, so the peer
    /// reads the last frames instead of a reset). Beyond it a socket is closed at once.
    pub max_lingering_closes: u32,
    /// Unacked deliveries in flight per device (the window W).
    pub window: u32,
    /// Cross-shard channel capacity, in batches, per shard pair.
    pub shard_channel_batches: u32,
    /// Messages buffered per destination shard before new work is shed with `overloaded`.
    pub shard_outbox_max: u32,
    /// Suggested retry delay in `overloaded` and `rate_limited` errors.
    pub retry_after_ms: u64,
    /// Largest `sync.limit` honoured.
    pub max_sync_limit: u32,
    /// First retransmit of an unacked `deliver` after this long; doubling, with jitter.
    pub retransmit_base_ms: u64,
    /// Retransmits per delivery before the connection is closed (the device then syncs).
    pub retry_limit: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    pub path: String,
    /// Allowed `Origin` values (scheme://host[:port]). Requests without `Origin` (non-browser
    /// clients) are always allowed; "*" allows every origin and is never the default.
    pub allowed_origins: Vec<String>,
    pub max_frame_bytes: u32,
    pub max_message_bytes: u32,
    /// Largest HTTP upgrade request accepted.
    pub max_handshake_bytes: u32,
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret for `hello.token` JWTs.
    pub jwt_hs256_secret: Option<String>,
    /// RS256 public key (PEM file) for `hello.token` JWTs.
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// Token = user id, tenant "dev". Demos only; loudly logged.
    pub insecure_dev_auth: bool,
    /// Bearer token of the admin API (`--admin-token-env VAR` reads it from the environment);
    /// required when `server.admin_listen` is beyond loopback.
    pub admin_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Shard executors; 0 = all cores but one (at least 1).
    pub shards: usize,
    /// Pin shards (and the I/O thread) to cores.
    pub pin: bool,
    /// glommio io_uring registered-buffer memory per shard (KiB). Must fit in RLIMIT_MEMLOCK.
    pub io_memory_kib: usize,
    /// Sweep tick of each shard's timer wheel.
    pub tick_ms: u64,
    /// io_uring submission-queue depth per shard ring. The kernel sizes the ring's
    /// cancellation hash table from it, and glommio cancels a poll for most reads and
    /// writes, so with many connections a deep ring keeps each cancellation cheap.
    pub ring_depth: usize,
    /// How often a long pass of a shard's connection driver (a group message written to
    /// thousands of members) looks for new input on the way, in µs: a message that arrives
    /// meanwhile is read and reaches the members the pass has not written yet in this pass.
    /// 0 looks after every few connections; 1000000 all but turns it off.
    pub poll_within_pass_us: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            ws_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tcp_listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            wss_listen: None,
            tls_listen: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            data_dir: PathBuf::from("./imgw-data"),
            durability: Durability::Local,
            backlog: 4096,
            drain_reconnect_spread_ms: 5_000,
            drain_timeout_ms: 5_000,
            ws_echo: false,
            web: false,
            sync_sent: true,
            ports_file: None,
            share_ports: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: crate::protocol::frame::DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            heartbeat_ms: 30_000,
            sends_per_sec: 100,
            send_burst: 200,
            bytes_per_sec: 1 << 20,
            max_conns: 1_000_000,
            max_conns_per_tenant: 1_000_000,
            tenant_sends_per_sec: 0,
            tenant_send_burst: 0,
            max_devices_per_user: 16,
            max_presence_subs: 1_000,
            max_groups_per_user: 1_000,
            max_group_members: 100_000,
            max_outbound_bytes: 1 << 20,
            max_lingering_closes: 1_024,
            window: 64,
            shard_channel_batches: 1_024,
            shard_outbox_max: 65_536,
            retry_after_ms: 200,
            max_sync_limit: 500,
            retransmit_base_ms: 1_000,
            retry_limit: 5,
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            path: "/ws".into(),
            allowed_origins: Vec::new(),
            max_frame_bytes: 64 * 1024,
            max_message_bytes: 64 * 1024,
            max_handshake_bytes: 8 * 1024,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: 0,
            pin: true,
            io_memory_kib: 512,
            tick_ms: 10,
            ring_depth: 4096,
            poll_within_pass_us: 1_000,
        }
    }
}

/// Why a configuration was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys are errors).
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// A value is out of its allowed range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Number of shard executors this machine gets.
    pub fn shard_count(&self) -> usize {
        if self.runtime.shards > 0 {
            return self.runtime.shards;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }

    /// Checks cross-field rules; called once at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.tenants.len() > MAX_TENANTS_CONFIGURED {
            return bad("at most 100000 [tenants.NAME] tables");
        }
        let admin_token = self.auth.admin_token.as_deref().unwrap_or("");
        if !self.server.admin_listen.ip().is_loopback() && admin_token.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "server.admin_listen {} is beyond loopback: give the admin API a bearer token \
                 (--admin-token-env VAR) or listen on 127.0.0.1",
                self.server.admin_listen
            )));
        }
        if !admin_token.is_empty() && admin_token.len() < 16 {
            return bad("the admin token must be at least 16 bytes");
        }
        let tls_listeners = self.server.wss_listen.is_some() || self.server.tls_listen.is_some();
        let tls_files = (self.tls.cert_file.is_some(), self.tls.key_file.is_some());
        if tls_listeners && tls_files != (true, true) {
            return bad(
                "a TLS listener (server.wss_listen, server.tls_listen) needs tls.cert_file and \
                 tls.key_file (--tls-cert FILE --tls-key FILE)",
            );
        }
        if l.max_frame_bytes < crate::protocol::frame::HEADER_LEN as u32 + 16 {
            return bad("limits.max_frame_bytes is too small");
        }
        if l.handshake_timeout_ms == 0 || l.idle_timeout_ms == 0 {
            return bad("timeouts must be positive");
        }
        if l.heartbeat_ms >= l.idle_timeout_ms {
            return bad("limits.heartbeat_ms must be below limits.idle_timeout_ms");
        }
        if l.sends_per_sec == 0 || l.send_burst == 0 || l.window == 0 {
            return bad("rates, bursts and window must be positive");
        }
        if l.shard_channel_batches == 0 || l.shard_outbox_max == 0 {
            return bad("shard queue bounds must be positive");
        }
        if !(16..=32_768).contains(&self.runtime.ring_depth) {
            return bad("runtime.ring_depth must be in 16..=32768");
        }
        if self.runtime.poll_within_pass_us > 1_000_000 {
            return bad("runtime.poll_within_pass_us must be in 0..=1000000");
        }
        if self.runtime.tick_ms == 0 || self.runtime.tick_ms > 1_000 {
            return bad("runtime.tick_ms must be in 1..=1000");
        }
        if l.retransmit_base_ms == 0 || l.max_sync_limit == 0 {
            return bad("limits.retransmit_base_ms and limits.max_sync_limit must be positive");
        }
        if self.store.queue_depth == 0 || self.store.batch_max == 0 {
            return bad("store.queue_depth and store.batch_max must be positive");
        }
        if self.server.durability == Durability::Backend
            && self.mysql.url.is_none()
            && self.kafka.brokers.is_none()
        {
            return bad(
                "durability `backend` needs a backend: set mysql.url (--mysql URL) or \
                 kafka.brokers (--kafka HOST:PORT), or use --durability local",
            );
        }
        let m = &self.mysql;
        if m.pool_max == 0 || m.pool_min > m.pool_max {
            return bad("mysql.pool_max must be positive and at least mysql.pool_min");
        }
        if m.writers == 0 || m.writer_min_ops == 0 {
            return bad("mysql.writers and mysql.writer_min_ops must be positive");
        }
        if m.connect_timeout_ms == 0 || m.query_timeout_ms == 0 {
            return bad("mysql.connect_timeout_ms and mysql.query_timeout_ms must be positive");
        }
        let services = self.redis.url.is_some() || self.kafka.brokers.is_some();
        if services && self.server.durability == Durability::Memory {
            return bad("redis and kafka run on the I/O core: use durability local or backend");
        }
        if self.redis.presence_ttl_ms < 300
            || self.redis.timeout_ms == 0
            || self.redis.pipeline_max == 0
            || self.redis.queue_max == 0
            || self.redis.reconnect_ms == 0
        {
            return bad("redis: presence_ttl_ms >= 300, other bounds positive");
        }
        let k = &self.kafka;
        if k.messages_topic.is_empty()
            || k.partitions < 1
            || k.replication < 1
            || k.produce_timeout_ms == 0
            || k.max_in_flight == 0
            || k.queue_max == 0
            || k.confirmed_max == 0
            || k.retry_max == 0
            || k.routes
                .iter()
                .any(|r| r.prefix.is_empty() || r.topic.is_empty())
        {
            return bad("kafka: topics and route fields non-empty, bounds positive");
        }
        self.validate_cluster()?;
        if self.ws.allowed_origins.iter().any(|o| o.is_empty()) {
            return bad("ws.allowed_origins holds an empty entry");
        }
        if !self.auth.insecure_dev_auth
            && self.auth.jwt_hs256_secret.is_none()
            && self.auth.jwt_rs256_public_key_file.is_none()
        {
            return bad(
                "no authentication configured: set auth.jwt_hs256_secret or \
                 auth.jwt_rs256_public_key_file, or pass --insecure-dev-auth for a demo",
            );
        }
        Ok(())
    }

    /// Cluster mode's rules: the shared store, registry and transport must all be there.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let Some(id) = &c.node_id else {
            return Ok(());
        };
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !id_ok {
            return bad(format!("--node-id {id:?}: use 1 to 64 of [A-Za-z0-9._-]"));
        }
        let mut missing = Vec::new();
        if self.server.durability != Durability::Backend {
            missing.push("--durability backend");
        }
        if self.mysql.url.is_none() {
            missing.push("--mysql URL");
        }
        if self.redis.url.is_none() {
            missing.push("--redis URL");
        }
        if self.kafka.brokers.is_none() {
            missing.push("--kafka HOST:PORT");
        }
        if !missing.is_empty() {
            return bad(format!(
                "cluster mode (--node-id) needs {}: the nodes share MariaDB, Redis and Kafka",
                missing.join(", ")
            ));
        }
        if c.heartbeat_ms == 0
            || c.dead_after_ms < 2 * c.heartbeat_ms
            || c.route_cache_entries == 0
            || c.relay_queue_max == 0
            || c.topic_prefix.is_empty()
        {
            return bad(
                "cluster: dead_after_ms at least twice heartbeat_ms, bounds positive, \
                 topic_prefix non-empty"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_cli_contract() {
        let c = Config::default();
        assert_eq!(c.server.ws_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.tcp_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.server.data_dir, PathBuf::from("./imgw-data"));
        assert!(
            c.ws.allowed_origins.is_empty(),
            "allow-all is never the default"
        );
    }

    #[test]
    fn a_tenant_table_overrides_the_default_connection_limit() {
        let c: Config = toml::from_str(
            "[limits]\nmax_conns_per_tenant = 7\n[tenants.acme]\nmax_conns = 2\n[tenants.\"big co\"]\n",
        )
        .unwrap();
        assert_eq!(c.max_conns_of("acme"), 2);
        assert_eq!(c.max_conns_of("big co"), 7);
        assert_eq!(c.max_conns_of("other"), 7);
        assert!(toml::from_str::<Config>("[tenants.acme]\nmax_con = 2\n").is_err());
        // No tenant rate by default; a tenant's own rate, with the default or its own burst.
        assert_eq!(c.tenant_sends_of("acme"), None);
        let c: Config = toml::from_str(
            "[limits]\ntenant_sends_per_sec = 100\ntenant_send_burst = 50\n\
             [tenants.a]\nsends_per_sec = 5\n[tenants.b]\nsends_per_sec = 0\n",
        )
        .unwrap();
        assert_eq!(c.tenant_sends_of("a"), Some((5, 50)));
        assert_eq!(c.tenant_sends_of("b"), None);
        assert_eq!(c.tenant_sends_of("c"), Some((100, 50)));
    }

    #[test]
    fn toml_overrides_and_unknown_keys() {
        let c: Config = toml::from_str(
            "[server]\nws_listen = \"127.0.0.1:1\"\n[limits]\nidle_timeout_ms = 5000\nheartbeat_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(c.server.ws_listen.port(), 1);
        assert_eq!(c.limits.idle_timeout_ms, 5000);
        assert!(toml::from_str::<Config>("[server]\nbogus = 1\n").is_err());
        // The driver's look within a pass: 0 (after every few connections) up to a second.
        for (us, ok) in [(0, true), (1_000_000, true), (1_000_001, false)] {
            let c: Config = toml::from_str(&format!(
                "[auth]\ninsecure_dev_auth = true\n[runtime]\npoll_within_pass_us = {us}\n"
            ))
            .unwrap();
            assert_eq!(c.validate().is_ok(), ok, "poll_within_pass_us = {us}");
        }
    }

    #[test]
    fn mysql_section_and_backend_selection() {
        let mut c: Config = toml::from_str(
            "[server]\ndurability = \"backend\"\n[auth]\ninsecure_dev_auth = true\n\
             [mysql]\npool_max = 2\nquery_timeout_ms = 100\n",
        )
        .unwrap();
        assert_eq!(c.mysql.pool_max, 2);
        assert!(
            c.validate().is_err(),
            "backend without a backend configured"
        );
        c.mysql.url = Some("mysql://u:secret@127.0.0.1/imgw".into());
        c.validate().unwrap();
        assert!(!format!("{:?}", c.mysql).contains("secret"));
        assert_eq!(
            redact_url("mysql://u:secret@h:1/db"),
            "mysql://u:***@h:1/db"
        );
        assert_eq!(redact_url("mysql://u@h/db"), "mysql://u@h/db");
    }

    #[test]
    fn cluster_mode_needs_every_shared_service() {
        let mut c = Config::default();
        c.auth.insecure_dev_auth = true;
        c.cluster.node_id = Some("a".into());
        let e = c.validate().unwrap_err().to_string();
        for want in ["--durability backend", "--mysql", "--redis", "--kafka"] {
            assert!(e.contains(want), "{e}");
        }
        c.server.durability = Durability::Backend;
        c.mysql.url = Some("mysql://u@h/db".into());
        c.redis.url = Some("redis://h/".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--kafka") && !e.contains("--mysql"), "{e}");
        c.kafka.brokers = Some("h:9092".into());
        c.validate().unwrap();
        c.cluster.node_id = Some("a b".into());
        assert!(c.validate().is_err(), "space in a node id");
        c.cluster.node_id = Some("n-1.x_y".into());
        c.cluster.dead_after_ms = c.cluster.heartbeat_ms;
        assert!(c.validate().is_err(), "dead_after_ms below two heartbeats");
    }

    #[test]
    fn validate_requires_auth() {
        let mut c = Config::default();
        assert!(c.validate().is_err());
        c.auth.insecure_dev_auth = true;
        c.validate().unwrap();
    }
}
