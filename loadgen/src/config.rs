//! The loadgen's command line (SPEC 7: the names are a contract), the TOML scenario file, and
//! the resolved [`Options`] of a run: flags override the file, the file overrides defaults.
//! Also owns the [`Plan`] each worker process receives, and how a run's connections, rate and
//! source addresses are split over workers and threads.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use imgw::client::Transport;
use imgw::codec::CodecId;
use serde::{Deserialize, Serialize};

pub use crate::peer::Protocol;

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Pairs of users message each other at an open-loop aggregate rate.
    Chat,
    /// Connections that only heartbeat.
    Idle,
    /// Connect and `hello` as fast as possible (or at the ramp rate), then hold.
    ConnectStorm,
    /// Each publisher has K subscribers. imgw: by default the publisher sends each message
    /// 1:1 to each subscriber; with `--group` they all join one group and each message is one
    /// `send` to it. Peers (`--protocol nats|plainws`): one publish on one topic.
    Fanout,
    /// Idle connections, of which `--rate` per second are closed and at once reopened
    /// (connect, upgrade, `hello`), round robin; the reconnect time is the handshake latency.
    Churn,
    /// Chat pairs; a third into the run the second user of every pair goes offline, and two
    /// thirds in comes back with `hello.resume` (its last delivered inbox sequence): what was
    /// sent to it meanwhile must arrive then, once. Needs a gateway with `--durability local`.
    OfflineSync,
    /// Pairs of users: the first half of the pairs chat at `--rate`, the second half stay
    /// idle, and `--churn-rate` of those idle connections per second reconnect.
    Mixed,
    /// A fault campaign (`crate::chaos`): half the connections run `mixed` (chat and
    /// churn), half run group fan-out (`--fanout` members per group), all with
    /// `--reconnect`, while faults are injected; `--rate` is split evenly between 1:1
    /// messages and group publishes.
    Chaos,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Chat,
        Scenario::Idle,
        Scenario::ConnectStorm,
        Scenario::Fanout,
        Scenario::Churn,
        Scenario::OfflineSync,
        Scenario::Mixed,
        Scenario::Chaos,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Chat => "chat",
            Scenario::Idle => "idle",
            Scenario::ConnectStorm => "connect-storm",
            Scenario::Fanout => "fanout",
            Scenario::Churn => "churn",
            Scenario::OfflineSync => "offline-sync",
            Scenario::Mixed => "mixed",
            Scenario::Chaos => "chaos",
        }
    }

    pub fn from_name(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Connections that form one unit of the scenario (kept in one thread together).
    pub fn unit_size(self, fanout: u64) -> u64 {
        match self {
            Scenario::Chat | Scenario::OfflineSync | Scenario::Mixed => 2,
            Scenario::Fanout => 1 + fanout,
            _ => 1,
        }
    }

    /// Whether it sends messages (`--rate` is messages or publishes per second).
    pub fn sends(self) -> bool {
        matches!(
            self,
            Scenario::Chat
                | Scenario::Fanout
                | Scenario::OfflineSync
                | Scenario::Mixed
                | Scenario::Chaos
        )
    }

    /// Whether `--rate` means anything for it (churn: reconnections per second).
    pub fn scheduled(self) -> bool {
        self.sends() || self == Scenario::Churn
    }
}

/// `loadgen SCENARIO --target ws://HOST:PORT/ws|tcp://HOST:PORT [...]`
#[derive(Parser, Debug, Default)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for imgw: open-loop scenarios, integrity checks, HdrHistogram latency",
    after_help = "Scenarios: chat, idle, connect-storm, fanout, churn, offline-sync, mixed, chaos.\n\
                  chaos: loadgen chaos --serve 'ARGS' --duration 60s --seed 7 starts `imgw serve ARGS` itself \
                  and injects faults into a chat + group + churn load; exit 1 on any lost, duplicated or \
                  out-of-order message.\nExit codes: 0 ok, 1 --expect-no-loss (or chaos) failed or the run \
                  could not complete, 2 usage.",
    // A flag given twice takes its last value, as imgw's do: a script appends to a base command.
    args_override_self = true
)]
pub struct Cli {
    /// chat | idle | connect-storm | fanout | churn | offline-sync | mixed | chaos (or
    /// `scenario` in --scenario-file).
    pub scenario: Option<String>,
    /// ws://HOST:PORT/PATH or tcp://HOST:PORT. Repeatable: the connections are spread over
    /// the targets round robin (the nodes of a cluster).
    #[arg(long)]
    pub target: Vec<String>,
    /// A connection the server closed, or that failed, during the run reconnects to the next
    /// target with `hello.resume` from the last inbox sequence it has, and resends its unacked
    /// sends with their `cmid` (a failover run; imgw protocol only).
    #[arg(long)]
    pub reconnect: bool,
    /// json | protobuf | msgpack | flatbuffers | hessian [default: json].
    #[arg(long)]
    pub codec: Option<String>,
    /// imgw | nats | plainws [default: imgw]. nats: NATS text protocol over WebSocket;
    /// plainws: the JSON pub/sub of bench/peers/README.md (uWebSockets.js and tokio peers).
    #[arg(long)]
    pub protocol: Option<String>,
    /// imgw fanout through one group per publisher (`group_join`, `send` to the group)
    /// instead of one 1:1 `send` per subscriber. The peers' fanout is always one publish.
    #[arg(long)]
    pub group: bool,
    /// The server's pid: report its RSS before connecting and once connected, and its CPU
    /// time over the run per delivery (from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections in all [default: 100].
    #[arg(long)]
    pub conns: Option<u64>,
    /// Messages per second in all (chat), publishes per second (fanout) or reconnections per
    /// second (churn) [default: 1000].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Mixed: reconnections per second among its idle half [default: 0].
    #[arg(long)]
    pub churn_rate: Option<f64>,
    /// Length of the measured run: 30s, 500ms, 2m [default: 10s].
    #[arg(long)]
    pub duration: Option<String>,
    /// New connections per second while connecting; 0 = as fast as possible [default: 0].
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Message body size in bytes; the integrity header (20-40 bytes) is never cut [default: 64].
    #[arg(long)]
    pub payload: Option<usize>,
    /// Worker processes, each with its share of connections and rate [default: 1].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Threads per worker, each multiplexing its connections over epoll [default: 1].
    #[arg(long)]
    pub threads: Option<u32>,
    /// Source addresses: 127.0.0.2-127.0.0.9 or a comma list; spread over workers, then over
    /// each worker's connections.
    #[arg(long)]
    pub sources: Option<String>,
    /// Subscribers per publisher in fanout [default: conns - 1, one publisher].
    #[arg(long)]
    pub fanout: Option<u64>,
    /// After the run, wait at most this long for outstanding acks and deliveries [default: 3s].
    #[arg(long)]
    pub grace: Option<String>,
    /// Heartbeat interval [default: the server's welcome.heartbeat_ms].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Bound of each connect, upgrade and hello [default: 5s].
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// imgw over WebSocket: send `hello` in the upgrade request's write instead of after the
    /// 101 (`Client::connect_hello`: one round trip to `welcome`, as imgw's Rust client can
    /// and a browser cannot).
    #[arg(long)]
    pub early_hello: bool,
    /// imgw over WebSocket: send `hello` in the upgrade request's target (its `hello` query
    /// parameter, `Client::connect_url_hello`): one round trip to `welcome`, as a browser can.
    #[arg(long, conflicts_with = "early_hello")]
    pub url_hello: bool,
    /// Bound of the whole connection phase [default: 120s].
    #[arg(long)]
    pub setup_timeout: Option<String>,
    /// Do not send cumulative `ack`s for deliveries (clients normally do).
    #[arg(long)]
    pub no_client_ack: bool,
    /// Group fan-out: how often a member acks the group timeline, in ms, as the SDK's
    /// `groupAckDelayMs` [default: 1000].
    #[arg(long)]
    pub group_ack_ms: Option<u64>,
    /// Prefix of the user ids [default: lg<pid>-].
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Write every figure as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the delivery latency distribution (HdrHistogram .hgrm text, milliseconds).
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
    /// Write an SVG plot: latency percentiles, and latency and delivered/s over time.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Exit 1 on any lost, unconfirmed, duplicated, out-of-order or unknown delivery.
    #[arg(long)]
    pub expect_no_loss: bool,
    /// Read the scenario and any of these options from a TOML file (flags win).
    #[arg(long, value_name = "FILE")]
    pub scenario_file: Option<PathBuf>,
    /// Allow a target outside the loopback range.
    #[arg(long)]
    pub allow_remote: bool,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Log in with HS256 JWTs signed with the secret in this environment variable (the
    /// gateway's `--jwt-secret-env` secret) instead of the dev token (`--insecure-dev-auth`).
    #[arg(long, value_name = "VAR")]
    pub jwt_secret_env: Option<String>,
    /// Log in with RS256 JWTs signed with this private key (PEM; the gateway checks them
    /// with the public key in `auth.jwt_rs256_public_key_file`). One RSA signature per
    /// connection: slower to set up than HS256.
    #[arg(long, value_name = "FILE")]
    pub jwt_rs256_key_file: Option<PathBuf>,
    /// Spread the users over this many tenants (`t0`, `t1`, ...; a conversation or a fan-out
    /// group stays within one); needs --jwt-secret-env or --jwt-rs256-key-file [default: 1].
    #[arg(long)]
    pub tenants: Option<u32>,
    /// The certificates (PEM) to trust for `wss://` and `tls://` targets.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The name the gateway's certificate must carry (and the SNI sent) [default: localhost].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// chaos: the seed of the fault schedule (the same seed, duration and faults replay the
    /// same schedule) [default: from the clock, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// chaos: the faults to draw from, comma separated: kill, term, pause, storm,
    /// pause:NAME, restart:NAME [default: the gateway's three with --serve, storm, and each
    /// backend's pause and restart where given].
    #[arg(long)]
    pub faults: Option<String>,
    /// chaos: run `imgw serve ARGS` (split on spaces) and restart it after kill and term
    /// faults; the target is its listener (a --target with port 0 picks ws:// or tcp://).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub serve: Option<String>,
    /// chaos: the imgw binary [default: `imgw` beside loadgen, else on PATH].
    #[arg(long, value_name = "FILE")]
    pub imgw_bin: Option<PathBuf>,
    /// chaos: append the gateway's output to this file [default: discarded].
    #[arg(long, value_name = "FILE")]
    pub gateway_log: Option<PathBuf>,
    /// chaos: a backend to pause, NAME=PIDFILE (repeatable).
    #[arg(long, value_name = "NAME=PIDFILE")]
    pub backend: Vec<String>,
    /// chaos: the command that stops backend NAME, NAME=CMD (repeatable).
    #[arg(long, value_name = "NAME=CMD")]
    pub backend_stop: Vec<String>,
    /// chaos: the command that starts backend NAME again, NAME=CMD (repeatable).
    #[arg(long, value_name = "NAME=CMD")]
    pub backend_start: Vec<String>,
    /// chaos: quiet time between faults, MIN-MAX [default: 2s-5s].
    #[arg(long, value_name = "MIN-MAX")]
    pub fault_gap: Option<String>,
    /// chaos: how long a fault lasts (a pause, the time down), MIN-MAX [default: 500ms-3s].
    #[arg(long, value_name = "MIN-MAX")]
    pub fault_hold: Option<String>,
}

/// The scenario file: the same options as the flags, snake_case keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOptions {
    pub scenario: Option<String>,
    pub target: Option<String>,
    /// More targets (after `target`).
    pub targets: Option<Vec<String>>,
    pub reconnect: Option<bool>,
    pub codec: Option<String>,
    pub protocol: Option<String>,
    pub group: Option<bool>,
    pub conns: Option<u64>,
    pub rate: Option<f64>,
    pub churn_rate: Option<f64>,
    pub duration: Option<String>,
    pub ramp: Option<f64>,
    pub payload: Option<usize>,
    pub workers: Option<u32>,
    pub threads: Option<u32>,
    pub sources: Option<String>,
    pub fanout: Option<u64>,
    pub grace: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub connect_timeout: Option<String>,
    pub early_hello: Option<bool>,
    pub url_hello: Option<bool>,
    pub setup_timeout: Option<String>,
    pub client_ack: Option<bool>,
    pub group_ack_ms: Option<u64>,
    pub user_prefix: Option<String>,
    pub json: Option<PathBuf>,
    pub hgrm: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub expect_no_loss: Option<bool>,
}

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub url: String,
    #[serde(with = "transport_name")]
    pub transport: Transport,
    pub addr: SocketAddr,
    pub ws_path: String,
    /// `wss://` or `tls://`: TLS under the transport.
    #[serde(default)]
    pub tls: bool,
}

mod transport_name {
    use imgw::client::Transport;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Transport, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Transport, D::Error> {
        let name = String::deserialize(d)?;
        Transport::from_name(&name).ok_or_else(|| serde::de::Error::custom("unknown transport"))
    }
}

/// A run's options, resolved and checked.
#[derive(Clone, Debug)]
pub struct Options {
    pub scenario: Scenario,
    /// The first target; `targets` holds every one (this one first).
    pub target: Target,
    pub targets: Vec<Target>,
    pub reconnect: bool,
    pub codec: CodecId,
    pub protocol: Protocol,
    pub group: bool,
    pub server_pid: Option<u32>,
    pub conns: u64,
    pub rate: f64,
    pub churn_rate: f64,
    pub duration: Duration,
    pub ramp: f64,
    pub payload: usize,
    pub workers: u32,
    pub threads: u32,
    pub sources: Vec<Ipv4Addr>,
    pub fanout: u64,
    pub grace: Duration,
    pub heartbeat_ms: Option<u64>,
    pub connect_timeout: Duration,
    pub hello_via: HelloVia,
    pub setup_timeout: Duration,
    pub client_ack: bool,
    pub group_ack_ms: u64,
    pub user_prefix: String,
    pub json: Option<PathBuf>,
    pub hgrm: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub expect_no_loss: bool,
    pub quiet: bool,
    /// The HS256 secret tokens are signed with (`None`: dev tokens, the user id).
    pub jwt_secret: Option<String>,
    /// Or the RS256 private key (PEM) they are signed with.
    pub jwt_rs256_key: Option<String>,
    pub tenants: u32,
    /// TLS targets: the certificates to trust (PEM) and the name to ask for.
    pub tls_ca: Option<String>,
    pub tls_server_name: String,
    /// `loadgen chaos`: the campaign.
    pub chaos: Option<crate::chaos::ChaosOptions>,
}

/// Bodies are padded to at least this many bytes. The integrity header
/// `conv:seq:intended_us:` (20-40 bytes) is never cut: a smaller `--payload` sends it alone.
pub const MIN_PAYLOAD: usize = 16;
/// Largest body accepted (the gateway's default frame limit is 64 KiB).
pub const MAX_PAYLOAD: usize = 60 * 1024;
/// Group fan-out: a member's ack interval unless `--group-ack-ms` says otherwise: the SDK's
/// `groupAckDelayMs` (a group ack only moves the member's catch-up cursor).
pub const DEFAULT_GROUP_ACK_MS: u64 = 1000;
/// Longest ack interval accepted (a minute).
pub const MAX_GROUP_ACK_MS: u64 = 60_000;

fn default_group_ack_ms() -> u64 {
    DEFAULT_GROUP_ACK_MS
}

/// `loadgen chaos`'s own flags.
fn chaos_options(cli: &Cli) -> Result<crate::chaos::ChaosOptions, String> {
    use crate::chaos::{parse_range, Backend, ChaosOptions, FaultKind};
    let mut backends: Vec<Backend> = Vec::new();
    let mut entry = |flag: &str, spec: &str| -> Result<(usize, String), String> {
        let (name, value) = spec
            .split_once('=')
            .filter(|(n, v)| !n.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("{flag} {spec:?}: expected NAME=VALUE"))?;
        let i = match backends.iter().position(|b| b.name == name) {
            Some(i) => i,
            None => {
                backends.push(Backend {
                    name: name.into(),
                    ..Backend::default()
                });
                backends.len() - 1
            }
        };
        Ok((i, value.to_string()))
    };
    let mut sets = Vec::new();
    for s in &cli.backend {
        sets.push((0, entry("--backend", s)?));
    }
    for s in &cli.backend_stop {
        sets.push((1, entry("--backend-stop", s)?));
    }
    for s in &cli.backend_start {
        sets.push((2, entry("--backend-start", s)?));
    }
    for (what, (i, v)) in sets {
        match what {
            0 => backends[i].pidfile = Some(PathBuf::from(v)),
            1 => backends[i].stop = Some(v),
            _ => backends[i].start = Some(v),
        }
    }
    let serve: Option<Vec<String>> = cli
        .serve
        .as_ref()
        .map(|s| s.split_whitespace().map(String::from).collect());
    let kinds = match &cli.faults {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(FaultKind::parse)
            .collect::<Result<Vec<_>, _>>()?,
        None => ChaosOptions::default_kinds(serve.is_some(), &backends),
    };
    let imgw_bin = cli.imgw_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("imgw")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("imgw"))
    });
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let o = ChaosOptions {
        seed,
        kinds,
        serve,
        imgw_bin,
        backends,
        gap: parse_range(cli.fault_gap.as_deref().unwrap_or("2s-5s"))?,
        hold: parse_range(cli.fault_hold.as_deref().unwrap_or("500ms-3s"))?,
        gateway_log: cli.gateway_log.clone(),
    };
    o.check()?;
    Ok(o)
}

/// `10s`, `500ms`, `2m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("bad duration unit {other:?} in {s:?}")),
    };
    if !secs.is_finite() || !(0.0..=7.0 * 86400.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `127.0.0.2-127.0.0.9`, `127.0.0.2,127.0.0.5` or one address.
pub fn parse_sources(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_535 {
                return Err(format!("bad address range {part:?}"));
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(part.parse().map_err(|_| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        return Err("--sources names no address".into());
    }
    Ok(out)
}

/// `ws://HOST:PORT/PATH`, `tcp://HOST:PORT`, or the same over TLS: `wss://`, `tls://`.
pub fn parse_target(url: &str, allow_remote: bool) -> Result<Target, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("--target {url:?}: expected ws://HOST:PORT/ws or tcp://HOST:PORT")
    })?;
    let (transport, tls) = match scheme {
        "ws" => (Transport::Ws, false),
        "tcp" => (Transport::Tcp, false),
        "wss" => (Transport::Ws, true),
        "tls" => (Transport::Tcp, true),
        other => return Err(format!("--target {url:?}: unknown scheme {other:?}")),
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/ws"),
    };
    if transport == Transport::Tcp && !matches!(path, "" | "/" | "/ws") {
        return Err(format!("--target {url:?}: tcp targets have no path"));
    }
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("--target {url:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--target {url:?}: no address"))?;
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(format!(
            "--target {url:?} resolves to {}, outside the loopback range; pass --allow-remote \
             to load another host",
            addr.ip()
        ));
    }
    Ok(Target {
        url: url.to_owned(),
        transport,
        addr,
        ws_path: path.to_owned(),
        tls,
    })
}

impl Options {
    /// Resolves the flags over the scenario file over the defaults.
    pub fn resolve(mut cli: Cli) -> Result<Options, String> {
        let file = match &cli.scenario_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--scenario-file {}: {e}", path.display()))?;
                toml::from_str::<FileOptions>(&text)
                    .map_err(|e| format!("--scenario-file {}: {e}", path.display()))?
            }
            None => FileOptions::default(),
        };
        let scenario_name = cli
            .scenario
            .take()
            .or(file.scenario)
            .ok_or("no scenario: give one (chat, idle, connect-storm, fanout)")?;
        let scenario = Scenario::from_name(&scenario_name).ok_or_else(|| {
            format!("unknown scenario {scenario_name:?} (chat, idle, connect-storm, fanout, churn, offline-sync, mixed)")
        })?;
        let chaos = if scenario == Scenario::Chaos {
            Some(chaos_options(&cli)?)
        } else {
            None
        };
        let serve_given = cli.serve.is_some();
        let urls: Vec<String> = if cli.target.is_empty() {
            file.target
                .into_iter()
                .chain(file.targets.unwrap_or_default())
                .collect()
        } else {
            cli.target
        };
        let urls = if urls.is_empty() && scenario == Scenario::Chaos && serve_given {
            // The gateway loadgen starts: its WebSocket listener, once bound.
            vec!["ws://127.0.0.1:0/ws".to_string()]
        } else {
            urls
        };
        let targets = urls
            .iter()
            .map(|u| parse_target(u, cli.allow_remote))
            .collect::<Result<Vec<Target>, String>>()?;
        let target = targets
            .first()
            .cloned()
            .ok_or("--target is required (ws://127.0.0.1:8080/ws or tcp://127.0.0.1:9000)")?;
        let codec_name = cli.codec.or(file.codec).unwrap_or_else(|| "json".into());
        let codec = CodecId::from_name(&codec_name).ok_or_else(|| {
            format!("unknown codec {codec_name:?} (json, protobuf, msgpack, flatbuffers, hessian)")
        })?;
        let protocol_name = cli
            .protocol
            .or(file.protocol)
            .unwrap_or_else(|| "imgw".into());
        let protocol = Protocol::from_name(&protocol_name)
            .ok_or_else(|| format!("unknown protocol {protocol_name:?} (imgw, nats, plainws)"))?;
        let dur = |flag: Option<String>, file: Option<String>, default: &str| {
            parse_duration(flag.or(file).as_deref().unwrap_or(default))
        };
        let conns = cli.conns.or(file.conns).unwrap_or(100);
        let fanout = cli.fanout.or(file.fanout).unwrap_or(if chaos.is_some() {
            9
        } else {
            conns.saturating_sub(1).max(1)
        });
        let sources = match cli.sources.or(file.sources) {
            Some(s) => parse_sources(&s)?,
            None => Vec::new(),
        };
        let o = Options {
            scenario,
            codec,
            protocol,
            group: cli.group || file.group.unwrap_or(false),
            server_pid: cli.server_pid,
            conns,
            rate: cli.rate.or(file.rate).unwrap_or(1000.0),
            churn_rate: cli
                .churn_rate
                .or(file.churn_rate)
                .unwrap_or(if chaos.is_some() { 2.0 } else { 0.0 }),
            duration: dur(cli.duration, file.duration, "10s")?,
            ramp: cli.ramp.or(file.ramp).unwrap_or(0.0),
            payload: cli.payload.or(file.payload).unwrap_or(64),
            workers: cli.workers.or(file.workers).unwrap_or(1),
            threads: cli.threads.or(file.threads).unwrap_or(1),
            sources,
            fanout,
            grace: dur(
                cli.grace,
                file.grace,
                if chaos.is_some() { "30s" } else { "3s" },
            )?,
            heartbeat_ms: cli.heartbeat_ms.or(file.heartbeat_ms),
            connect_timeout: dur(cli.connect_timeout, file.connect_timeout, "5s")?,
            hello_via: HelloVia::from_flags(
                cli.early_hello || file.early_hello.unwrap_or(false),
                cli.url_hello || file.url_hello.unwrap_or(false),
            )?,
            setup_timeout: dur(cli.setup_timeout, file.setup_timeout, "120s")?,
            client_ack: !cli.no_client_ack && file.client_ack.unwrap_or(true),
            group_ack_ms: cli
                .group_ack_ms
                .or(file.group_ack_ms)
                .unwrap_or(DEFAULT_GROUP_ACK_MS)
                .clamp(1, MAX_GROUP_ACK_MS),
            user_prefix: cli
                .user_prefix
                .or(file.user_prefix)
                .unwrap_or_else(|| format!("lg{}-", std::process::id())),
            json: cli.json.or(file.json),
            hgrm: cli.hgrm.or(file.hgrm),
            svg: cli.svg.or(file.svg),
            expect_no_loss: cli.expect_no_loss || file.expect_no_loss.unwrap_or(false),
            quiet: cli.quiet,
            jwt_secret: match &cli.jwt_secret_env {
                Some(var) => match std::env::var(var) {
                    Ok(s) if !s.is_empty() => Some(s),
                    _ => {
                        return Err(format!(
                            "--jwt-secret-env {var}: the environment variable is unset or empty"
                        ))
                    }
                },
                None => None,
            },
            jwt_rs256_key: match &cli.jwt_rs256_key_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| format!("--jwt-rs256-key-file {}: {e}", f.display()))?,
                ),
                None => None,
            },
            tenants: cli.tenants.unwrap_or(1),
            tls_ca: match &cli.tls_ca {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| format!("--tls-ca {}: {e}", f.display()))?,
                ),
                None => None,
            },
            tls_server_name: cli.tls_server_name.unwrap_or_else(|| "localhost".into()),
            target,
            targets,
            reconnect: cli.reconnect || file.reconnect.unwrap_or(false) || chaos.is_some(),
            chaos,
        };
        o.check()?;
        Ok(o)
    }

    fn check(&self) -> Result<(), String> {
        if self.protocol != Protocol::Imgw {
            if self.targets.len() > 1 || self.reconnect {
                return Err(format!(
                    "several --target and --reconnect need --protocol imgw, not {}",
                    self.protocol.name()
                ));
            }
            if self.target.transport != Transport::Ws {
                return Err(format!(
                    "--protocol {} needs a ws:// target",
                    self.protocol.name()
                ));
            }
            if !matches!(
                self.scenario,
                Scenario::Idle
                    | Scenario::Chat
                    | Scenario::Fanout
                    | Scenario::ConnectStorm
                    | Scenario::Churn
            ) {
                return Err(format!(
                    "{} is not available with --protocol {} (idle, chat, fanout, connect-storm, churn are)",
                    self.scenario.name(),
                    self.protocol.name()
                ));
            }
        }
        if self.conns == 0 {
            return Err("--conns must be at least 1".into());
        }
        let unit = self.scenario.unit_size(self.fanout);
        if self.conns < unit {
            return Err(format!(
                "{} needs at least {unit} connections per unit (--conns {})",
                self.scenario.name(),
                self.conns
            ));
        }
        let finite = |x: f64| x.is_finite() && x >= 0.0;
        if !finite(self.rate) || !finite(self.ramp) || !finite(self.churn_rate) {
            return Err("--rate and --ramp must be finite and not negative".into());
        }
        if self.payload > MAX_PAYLOAD {
            return Err(format!("--payload above {MAX_PAYLOAD} bytes"));
        }
        if self.workers == 0 || self.workers > 64 || self.threads == 0 || self.threads > 64 {
            return Err("--workers and --threads must be between 1 and 64".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        if self.heartbeat_ms == Some(0) {
            return Err("--heartbeat-ms must be positive".into());
        }
        if let (Some(flag), false) = (self.hello_via.flag(), self.protocol == Protocol::Imgw) {
            return Err(format!("{flag} is imgw's (--protocol imgw)"));
        }
        if self.targets.iter().any(|t| t.addr.ip().is_loopback()) {
            if let Some(bad) = self.sources.iter().find(|s| !s.is_loopback()) {
                return Err(format!(
                    "--sources: {bad} is not a loopback address (the target is on loopback)"
                ));
            }
        }
        if self.user_prefix.is_empty() || self.user_prefix.contains(char::is_whitespace) {
            return Err("--user-prefix must be non-empty without spaces".into());
        }
        if self.tenants == 0 || self.tenants > 100_000 {
            return Err("--tenants must be between 1 and 100000".into());
        }
        if self.tenants > 1 && self.jwt_secret.is_none() && self.jwt_rs256_key.is_none() {
            return Err(
                "--tenants needs --jwt-secret-env or --jwt-rs256-key-file (a dev token has one \
                 tenant)"
                    .into(),
            );
        }
        if self.jwt_secret.is_some() && self.jwt_rs256_key.is_some() {
            return Err("--jwt-secret-env and --jwt-rs256-key-file: choose one".into());
        }
        if let Some(pem) = &self.jwt_rs256_key {
            imgw::auth::issue_rs256(pem.as_bytes(), "t0", "check", 0)
                .map_err(|e| format!("--jwt-rs256-key-file: {e}"))?;
        }
        if self.targets.iter().any(|t| t.tls) {
            let Some(ca) = &self.tls_ca else {
                return Err("wss:// and tls:// targets need --tls-ca FILE".into());
            };
            imgw::client::TlsClient::new(ca.as_bytes(), &self.tls_server_name, &[])
                .map_err(|e| format!("--tls-ca / --tls-server-name: {e}"))?;
        }
        Ok(())
    }

    /// Chaos: `mixed` (chat and churn) on one half of the connections, group fan-out on the
    /// other (whole groups of `1 + fanout`), each with half the rate, all reconnecting; the
    /// group users have their own prefix.
    fn chaos_plans(&self) -> Vec<Plan> {
        let group_unit = 1 + self.fanout;
        let group_conns = self.conns / 2 / group_unit * group_unit;
        let base = Options {
            chaos: None,
            reconnect: true,
            rate: self.rate / 2.0,
            ..self.clone()
        };
        let chat = Options {
            scenario: Scenario::Mixed,
            conns: self.conns - group_conns,
            ..base.clone()
        };
        let group = Options {
            scenario: Scenario::Fanout,
            group: true,
            conns: group_conns,
            churn_rate: 0.0,
            user_prefix: format!("{}g", self.user_prefix),
            ..base
        };
        let mut plans = chat.plans();
        if group_conns > 0 {
            let n = plans.len() as u32;
            plans.extend(group.plans().into_iter().map(|mut p| {
                p.worker += n;
                p
            }));
        }
        plans
    }

    /// The plans of the worker processes.
    pub fn plans(&self) -> Vec<Plan> {
        if self.scenario == Scenario::Chaos {
            return self.chaos_plans();
        }
        let unit = self.scenario.unit_size(self.fanout);
        let units = self.conns / unit;
        let w = u64::from(self.workers);
        let mut first_conn = 0;
        let mut first_slice = 0;
        (0..w)
            .map(|i| {
                let my_units = units / w + u64::from(i < units % w);
                // A scenario whose connections are not whole units: the rest go to worker 0
                // as lone connections that only heartbeat.
                let extra = if i == 0 { self.conns - units * unit } else { 0 };
                let conns = my_units * unit + extra;
                let share = if units == 0 {
                    0.0
                } else {
                    my_units as f64 / units as f64
                };
                let sources: Vec<Ipv4Addr> = if self.sources.is_empty() {
                    Vec::new()
                } else if self.sources.len() as u64 >= w {
                    self.sources
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j as u64 % w == i)
                        .map(|(_, a)| *a)
                        .collect()
                } else {
                    vec![self.sources[(i as usize) % self.sources.len()]]
                };
                let plan = Plan {
                    scenario: self.scenario,
                    target: self.target.clone(),
                    targets: self.targets.clone(),
                    reconnect: self.reconnect,
                    codec: self.codec.name().to_owned(),
                    protocol: self.protocol,
                    group: self.group,
                    worker: i as u32,
                    threads: self.threads,
                    conns,
                    units: my_units,
                    lone: extra,
                    first_conn,
                    first_slice,
                    slices: w * u64::from(self.threads),
                    rate: self.rate * share,
                    churn_rate: self.churn_rate * share,
                    ramp: if self.conns == 0 {
                        0.0
                    } else {
                        self.ramp * conns as f64 / self.conns as f64
                    },
                    payload: self.payload,
                    fanout: self.fanout,
                    duration_us: self.duration.as_micros() as u64,
                    grace_us: self.grace.as_micros() as u64,
                    heartbeat_ms: self.heartbeat_ms,
                    connect_timeout_us: self.connect_timeout.as_micros() as u64,
                    hello_via: self.hello_via,
                    setup_timeout_us: self.setup_timeout.as_micros() as u64,
                    client_ack: self.client_ack,
                    group_ack_ms: self.group_ack_ms,
                    user_prefix: self.user_prefix.clone(),
                    sources,
                    jwt_secret: self.jwt_secret.clone(),
                    jwt_rs256_key: self.jwt_rs256_key.clone(),
                    tenants: self.tenants,
                    tls_ca: self.tls_ca.clone(),
                    tls_server_name: self.tls_server_name.clone(),
                    rs256: Default::default(),
                };
                first_conn += conns;
                first_slice += u64::from(self.threads);
                plan
            })
            .collect()
    }
}

/// How an imgw WebSocket connection sends its `hello` (`--early-hello`, `--url-hello`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloVia {
    /// As the first frame after the 101 (two round trips to `welcome`).
    #[default]
    AfterUpgrade,
    /// In the upgrade request's write (`Client::connect_hello`: as imgw's Rust client can and
    /// a browser cannot).
    WithUpgrade,
    /// In the upgrade request's target, its `hello` query parameter
    /// (`Client::connect_url_hello`: as a browser can).
    InUrl,
}

impl HelloVia {
    /// From the two flags (or the scenario file's keys), which exclude each other.
    fn from_flags(early: bool, url: bool) -> Result<HelloVia, String> {
        match (early, url) {
            (true, true) => Err("--url-hello and --early-hello: choose one".into()),
            (true, false) => Ok(HelloVia::WithUpgrade),
            (false, true) => Ok(HelloVia::InUrl),
            (false, false) => Ok(HelloVia::AfterUpgrade),
        }
    }

    /// The flag that asks for it, if one does.
    fn flag(self) -> Option<&'static str> {
        match self {
            HelloVia::AfterUpgrade => None,
            HelloVia::WithUpgrade => Some("--early-hello"),
            HelloVia::InUrl => Some("--url-hello"),
        }
    }
}

/// What one worker process runs (sent as the first line of its stdin).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    pub target: Target,
    /// Every target, `target` first; connection `i` starts on `targets[i % len]`.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// Reconnect closed connections to the next target (`--reconnect`).
    #[serde(default)]
    pub reconnect: bool,
    pub codec: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Fanout through a group (imgw) or a topic (peers): one publish per event.
    #[serde(default)]
    pub group: bool,
    pub worker: u32,
    pub threads: u32,
    /// Connections of this worker: `units` whole units, then `lone` connections.
    pub conns: u64,
    pub units: u64,
    pub lone: u64,
    /// Global index of this worker's first connection (user ids are global).
    pub first_conn: u64,
    /// This worker's first schedule slice, and the slices of the whole run (phases).
    pub first_slice: u64,
    pub slices: u64,
    /// Events per second of this worker: messages (chat) or publishes (fanout).
    pub rate: f64,
    /// Mixed: reconnections per second of this worker.
    #[serde(default)]
    pub churn_rate: f64,
    /// New connections per second of this worker; 0 = as fast as possible.
    pub ramp: f64,
    pub payload: usize,
    pub fanout: u64,
    pub duration_us: u64,
    pub grace_us: u64,
    pub heartbeat_ms: Option<u64>,
    pub connect_timeout_us: u64,
    /// How an imgw WebSocket connection sends its `hello`.
    #[serde(default)]
    pub hello_via: HelloVia,
    pub setup_timeout_us: u64,
    pub client_ack: bool,
    /// Group fan-out: each member's ack interval (the SDK's `groupAckDelayMs`).
    #[serde(default = "default_group_ack_ms")]
    pub group_ack_ms: u64,
    pub user_prefix: String,
    pub sources: Vec<Ipv4Addr>,
    /// HS256 secret for the tokens (`None`: dev tokens). Sent to the worker on its stdin,
    /// never on a command line.
    #[serde(default)]
    pub jwt_secret: Option<String>,
    /// Or the RS256 private key (PEM), sent the same way.
    #[serde(default)]
    pub jwt_rs256_key: Option<String>,
    #[serde(default = "one_tenant")]
    pub tenants: u32,
    /// TLS targets: the certificates to trust (PEM) and the server name.
    #[serde(default)]
    pub tls_ca: Option<String>,
    #[serde(default)]
    pub tls_server_name: String,
    /// `jwt_rs256_key` parsed, on first use.
    #[serde(skip)]
    pub rs256: std::sync::OnceLock<Option<std::sync::Arc<imgw::auth::Rs256Signer>>>,
}

fn one_tenant() -> u32 {
    1
}

/// One thread's share of a worker's plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadShare {
    pub index: u32,
    /// Global index of the thread's first connection.
    pub first_conn: u64,
    pub units: u64,
    pub lone: u64,
    pub rate: f64,
    pub ramp: f64,
    /// Schedule phase (fraction of an interval) of this thread's slice.
    pub phase: f64,
}

impl Plan {
    /// The `hello.token` of global connection `conn` with user id `user`: the user id with
    /// dev tokens, else a JWT for tenant `t{unit % tenants}` (whole units share a tenant, so
    /// conversations and fan-out groups stay within one), valid for a day.
    pub fn token(&self, conn: u64, user: &str) -> String {
        if self.jwt_secret.is_none() && self.jwt_rs256_key.is_none() {
            return user.to_string();
        }
        let unit = conn / self.scenario.unit_size(self.fanout).max(1);
        let tenant = format!("t{}", unit % u64::from(self.tenants.max(1)));
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 86_400;
        match (&self.jwt_secret, &self.jwt_rs256_key) {
            (Some(secret), _) => imgw::auth::issue_hs256(secret.as_bytes(), &tenant, user, exp),
            // The key was checked by `Options::validate`; a failure here yields a token the
            // gateway refuses, which the run reports as a failed hello.
            (None, Some(pem)) => {
                let signer = self.rs256.get_or_init(|| {
                    imgw::auth::Rs256Signer::new(pem.as_bytes())
                        .ok()
                        .map(std::sync::Arc::new)
                });
                signer
                    .as_ref()
                    .and_then(|s| s.issue(&tenant, user, exp).ok())
                    .unwrap_or_default()
            }
            (None, None) => user.to_string(),
        }
    }

    /// The TLS client for `wss://` and `tls://` targets (checked by `Options::validate`).
    pub fn tls_client(&self) -> Result<Option<imgw::client::TlsClient>, String> {
        match &self.tls_ca {
            Some(ca) => imgw::client::TlsClient::new(ca.as_bytes(), &self.tls_server_name, &[])
                .map(Some)
                .map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    pub fn codec(&self) -> Result<CodecId, String> {
        CodecId::from_name(&self.codec).ok_or_else(|| format!("unknown codec {}", self.codec))
    }

    pub fn unit_size(&self) -> u64 {
        self.scenario.unit_size(self.fanout)
    }

    /// Splits the worker's units over its threads (whole units per thread).
    pub fn shares(&self) -> Vec<ThreadShare> {
        let t = u64::from(self.threads.max(1));
        let unit = self.unit_size();
        let mut first = self.first_conn;
        (0..t)
            .map(|i| {
                let units = self.units / t + u64::from(i < self.units % t);
                let lone = self.lone / t + u64::from(i < self.lone % t);
                let share = ThreadShare {
                    index: i as u32,
                    first_conn: first,
                    units,
                    lone,
                    rate: if self.units == 0 {
                        0.0
                    } else {
                        self.rate * units as f64 / self.units as f64
                    },
                    ramp: if self.conns == 0 {
                        0.0
                    } else {
                        self.ramp * (units * unit + lone) as f64 / self.conns as f64
                    },
                    phase: (self.first_slice + i) as f64 / self.slices.max(1) as f64,
                };
                first += units * unit + lone;
                share
            })
            .collect()
    }

    /// The source address of the worker's `i`-th connection, if any.
    /// Target number `k` (wrapping): connection `i` starts on `k = i` and moves to the next
    /// one at each reconnect.
    pub fn target_at(&self, k: u64) -> &Target {
        if self.targets.is_empty() {
            &self.target
        } else {
            &self.targets[(k % self.targets.len() as u64) as usize]
        }
    }

    pub fn source(&self, i: u64) -> Option<IpAddr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(IpAddr::V4(
                self.sources[(i % self.sources.len() as u64) as usize],
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("loadgen").chain(args.iter().copied()))
    }

    /// Tokens: the user id without a secret; with one, a JWT whose tenant is shared by a
    /// whole unit (both ends of a conversation), and `--tenants` needs the secret.
    #[test]
    fn tokens_and_tenants() {
        let t = ["chat", "--target", "ws://127.0.0.1:1/ws"];
        let e = Options::resolve(cli(&[&t[..], &["--tenants", "3"]].concat())).unwrap_err();
        assert!(e.contains("--jwt-secret-env"), "{e}");
        let mut o = Options::resolve(cli(&[&t[..], &["--conns", "12"]].concat())).unwrap();
        assert_eq!(o.plans()[0].token(5, "u5"), "u5");
        o.jwt_secret = Some("0123456789abcdef0123456789abcdef".into());
        o.tenants = 3;
        let plan = &o.plans()[0];
        let auth = imgw::auth::Authenticator::from_config(&imgw::config::AuthConfig {
            jwt_hs256_secret: o.jwt_secret.clone(),
            ..Default::default()
        })
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let tenant = |conn: u64| {
            let id = auth.verify(&plan.token(conn, "u"), now).unwrap();
            assert_eq!(&*id.user, "u");
            id.tenant.to_string()
        };
        // Chat units are pairs: 0 and 1 share t0, 2 and 3 share t1, 6 is t0 again.
        assert_eq!((tenant(0), tenant(1)), ("t0".into(), "t0".into()));
        assert_eq!((tenant(2), tenant(3)), ("t1".into(), "t1".into()));
        assert_eq!(tenant(4), "t2");
        assert_eq!(tenant(6), "t0");
    }

    #[test]
    fn durations_sources_targets() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 days").is_err());
        let s = parse_sources("127.0.0.2-127.0.0.4,127.0.0.9").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3], Ipv4Addr::new(127, 0, 0, 9));
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
        let t = parse_target("ws://127.0.0.1:8080/ws", false).unwrap();
        assert_eq!((t.transport, t.ws_path.as_str()), (Transport::Ws, "/ws"));
        let t = parse_target("tcp://127.0.0.1:9000", false).unwrap();
        assert_eq!(t.transport, Transport::Tcp);
        let t = parse_target("wss://127.0.0.1:8443/ws", false).unwrap();
        assert_eq!((t.transport, t.tls), (Transport::Ws, true));
        let t = parse_target("tls://127.0.0.1:9443", false).unwrap();
        assert_eq!((t.transport, t.tls), (Transport::Tcp, true));
        assert!(parse_target("http://127.0.0.1", false).is_err());
        assert!(parse_target("ws://10.1.2.3:80/ws", false)
            .unwrap_err()
            .contains("outside the loopback range"));
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_in() {
        let dir = std::env::temp_dir().join(format!("loadgen-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s.toml");
        std::fs::write(
            &f,
            "scenario = \"chat\"\ntarget = \"tcp://127.0.0.1:9000\"\nconns = 40\nrate = 200.0\n\
             duration = \"2s\"\ncodec = \"msgpack\"\nexpect_no_loss = true\n",
        )
        .unwrap();
        let o = Options::resolve(cli(&[
            "--scenario-file",
            f.to_str().unwrap(),
            "--rate",
            "300",
        ]))
        .unwrap();
        assert_eq!(o.scenario, Scenario::Chat);
        assert_eq!(o.conns, 40);
        assert_eq!(o.rate, 300.0);
        assert_eq!(o.codec, CodecId::MessagePack);
        assert_eq!(o.duration, Duration::from_secs(2));
        assert!(o.expect_no_loss);
        assert_eq!(o.grace, Duration::from_secs(3));
        std::fs::write(&f, "scenario = \"chat\"\nbogus = 1\n").unwrap();
        assert!(Options::resolve(cli(&["--scenario-file", f.to_str().unwrap()])).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_and_unsupported_scenarios_say_why() {
        let e = Options::resolve(cli(&["bogus", "--target", "ws://127.0.0.1:1/ws"])).unwrap_err();
        assert!(e.contains("unknown scenario"), "{e}");
        let e = Options::resolve(cli(&[
            "offline-sync",
            "--protocol",
            "nats",
            "--target",
            "ws://127.0.0.1:1/",
        ]))
        .unwrap_err();
        assert!(e.contains("not available with --protocol nats"), "{e}");
        assert!(Options::resolve(cli(&["chat"])).is_err(), "no target");
        let peer = [
            "idle",
            "--protocol",
            "plainws",
            "--target",
            "ws://127.0.0.1:1/",
        ];
        let e = Options::resolve(cli(&[&peer[..], &["--early-hello"]].concat())).unwrap_err();
        assert!(e.contains("--early-hello is imgw's"), "{e}");
        let o = Options::resolve(cli(&[
            "idle",
            "--target",
            "ws://127.0.0.1:1/ws",
            "--early-hello",
        ]));
        assert!(o
            .unwrap()
            .plans()
            .iter()
            .all(|p| p.hello_via == HelloVia::WithUpgrade));
        let e = Options::resolve(cli(&[&peer[..], &["--url-hello"]].concat())).unwrap_err();
        assert!(e.contains("--url-hello is imgw's"), "{e}");
        let o = Options::resolve(cli(&[
            "idle",
            "--target",
            "ws://127.0.0.1:1/ws",
            "--url-hello",
        ]));
        assert!(o
            .unwrap()
            .plans()
            .iter()
            .all(|p| p.hello_via == HelloVia::InUrl));
        // Both (clap refuses the two flags together; a scenario file may still set both).
        let e = HelloVia::from_flags(true, true).unwrap_err();
        assert!(e.contains("choose one"), "{e}");
    }

    #[test]
    fn plans_split_units_rate_and_sources() {
        let o = Options::resolve(cli(&[
            "chat",
            "--target",
            "ws://127.0.0.1:1/ws",
            "--conns",
            "101",
            "--rate",
            "1000",
            "--workers",
            "3",
            "--threads",
            "2",
            "--sources",
            "127.0.0.2-127.0.0.7",
        ]))
        .unwrap();
        let plans = o.plans();
        assert_eq!(plans.len(), 3);
        // 50 pairs: 17, 17, 16; the odd connection goes to worker 0 alone.
        assert_eq!(
            plans.iter().map(|p| p.units).collect::<Vec<_>>(),
            [17, 17, 16]
        );
        assert_eq!(plans.iter().map(|p| p.conns).sum::<u64>(), 101);
        assert_eq!(plans[0].lone, 1);
        assert_eq!(plans[1].first_conn, 35);
        let rate: f64 = plans.iter().map(|p| p.rate).sum();
        assert!((rate - 1000.0).abs() < 1e-6);
        assert_eq!(plans[1].sources.len(), 2);
        assert!(plans.iter().all(|p| !p.sources.is_empty()));
        let shares = plans[0].shares();
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[0].units + shares[1].units, 17);
        assert_eq!(shares[1].first_conn, shares[0].units * 2 + shares[0].lone);
        let phases: Vec<f64> = plans
            .iter()
            .flat_map(|p| p.shares().into_iter().map(|s| s.phase))
            .collect();
        assert_eq!(
            phases,
            [0.0, 1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 4.0 / 6.0, 5.0 / 6.0]
        );
    }
}
