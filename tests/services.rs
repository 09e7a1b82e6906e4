//! imgw against the real Redis and the real Kafka-compatible broker (SPEC 6): presence with a
//! TTL, every accepted message on the messages topic exactly once, routed business events,
//! the push ingress, and outages of both services during steady load.
//!
//! Servers: `tests/services.sh start` (URLs from IMGW_REDIS_URL and IMGW_KAFKA, defaults
//! redis://127.0.0.1:6379/ and 127.0.0.1:9092). An unreachable server fails the test with a
//! message saying so; nothing is skipped. Each test uses its own key prefix and topics. The
//! outage tests start private `redis-server` and `tansu` processes, each on a port shown to
//! be its own (`spawn_on_free_port`), so stopping them disturbs nobody else.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::gateway::{
    join, kafka_addr, redis_command, redis_url, restart_redis, spawn_on_free_port, start_redis,
    try_spawn_on, Gateway, Proc, DEV_TOML,
};
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Envelope, ErrorCode, Message, Ping, Send, Target};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(10);
const PARTITIONS: i32 = 3;

fn reachable(host_port: &str, what: &str) {
    let addr: SocketAddr = host_port
        .parse()
        .unwrap_or_else(|e| panic!("{what} address {host_port}: {e}"));
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_or_else(|e| {
        panic!("{what} is not reachable at {host_port} ({e}): run `tests/services.sh start`")
    });
}

fn redis_host_port(url: &str) -> String {
    let rest = url.trim_start_matches("redis://");
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A name no other test run uses.
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t{}-{nanos}-{tag}", std::process::id())
}

/// Every record of `topic` from the beginning, until `want` arrived and `quiet` passed with
/// nothing new (or `within` ran out): (key, mid header, JSON value).
fn consume(
    brokers: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> Vec<(String, u64, serde_json::Value)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut quiet_until = None;
    while Instant::now() < deadline {
        if let Some(q) = quiet_until {
            if Instant::now() > q {
                break;
            }
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                let mid = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "mid"))
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .expect("mid header");
                let v: serde_json::Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                out.push((key, mid, v));
                if out.len() >= want {
                    quiet_until.get_or_insert(Instant::now() + Duration::from_secs(1));
                }
            }
            Some(Err(e)) => eprintln!("consume {topic}: {e}"),
            None => {}
        }
    }
    out
}

fn produce(brokers: &str, topic: &str, value: &str) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    p.send(BaseRecord::<str, str>::to(topic).payload(value).key("k"))
        .map_err(|(e, _)| e)
        .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
}

fn send_env(to: &str, cmid: &str, kind: Option<&str>, body: &str) -> Message {
    Message::Send(Send {
        to: Target::User(to.into()),
        cmid: cmid.into(),
        kind: kind.map(Into::into),
        body: body.into(),
        ext: Default::default(),
    })
}

/// Sends and waits for its answer: `Ok(mid)` on `send_ack`, `Err(code)` on an error.
fn send(c: &mut Client, to: &str, cmid: &str, kind: Option<&str>) -> Result<u64, ErrorCode> {
    let r = c.next_ref();
    c.send(&Envelope::with_ref(send_env(to, cmid, kind, cmid), r))
        .unwrap();
    let env = c
        .recv_until(|e| e.reference == Some(r), WAIT)
        .expect("an answer to send");
    match env.msg {
        Message::SendAck(a) => Ok(a.mid),
        Message::Error(e) => Err(e.code),
        other => panic!("{other:?}"),
    }
}

/// A ping round trip (the connection's heartbeat).
fn ping(c: &mut Client) -> Duration {
    let started = Instant::now();
    let r = c.next_ref();
    c.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
        .unwrap();
    c.recv_until(
        |e| e.reference == Some(r) && matches!(e.msg, Message::Pong(_)),
        WAIT,
    )
    .expect("pong");
    started.elapsed()
}

fn gateway(durability: &str, extra: &str) -> Gateway {
    gateway_on(DEV_TOML, durability, extra)
}

/// [`gateway`] with `base` instead of `DEV_TOML`.
fn gateway_on(base: &str, durability: &str, extra: &str) -> Gateway {
    let toml = format!("{base}\n{extra}\n");
    Gateway::start(
        &toml,
        &[
            "--shards",
            "2",
            "--insecure-dev-auth",
            "--durability",
            durability,
        ],
    )
}

fn kafka_toml(brokers: &str, messages: &str, push: &str, extra: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{brokers}\"\nmessages_topic = \"{messages}\"\npush_topic = \"{push}\"\n\
         push_group = \"{push}-g\"\npartitions = {PARTITIONS}\n{extra}\n"
    )
}

#[test]
fn every_accepted_message_is_on_the_topic_exactly_once_and_routes_work() {
    let brokers = kafka_addr();
    reachable(&brokers, "the Kafka broker");
    let (messages, push, orders) = (unique("msgs"), unique("push"), unique("orders"));
    let extra = format!("[[kafka.routes]]\nprefix = \"order.\"\ntopic = \"{orders}\"\n");
    let g = gateway("backend", &kafka_toml(&brokers, &messages, &push, &extra));
    let mut a = g.login(Transport::Ws, CodecId::Json, "alice", "d1");
    let mut b = g.login(Transport::Tcp, CodecId::Protobuf, "bob", "d1");
    let mut acked = BTreeMap::new();
    for i in 0..150 {
        let (c, to) = if i % 3 == 0 {
            (&mut b, "alice")
        } else {
            (&mut a, "bob")
        };
        let cmid = format!("m{i}");
        let mid = send(c, to, &cmid, None).expect("send_ack at backend durability");
        acked.insert(mid, cmid);
    }
    // Resent cmids: the same ack, nothing produced again.
    for i in [1, 2, 4] {
        let mid = send(&mut a, "bob", &format!("m{i}"), None).unwrap();
        assert_eq!(acked.get(&mid), Some(&format!("m{i}")));
    }
    let order_mid = send(&mut a, "bob", "o1", Some("order.created")).unwrap();
    acked.insert(order_mid, "o1".into());
    // Every acked send waited for a commit and a Kafka confirm: both histograms saw them.
    assert!(g.histogram_count("imgw_store_commit_seconds") >= 1.0);
    assert!(g.histogram_count("imgw_kafka_confirm_seconds") >= 1.0);
    // Group messages too, keyed by the group.
    join(&mut a, "team");
    join(&mut b, "team");
    for i in 0..5 {
        let cmid = format!("g{i}");
        let r = a.next_ref();
        let msg = Message::Send(Send {
            to: Target::Group("team".into()),
            cmid: cmid.as_str().into(),
            kind: None,
            body: "to the team".into(),
            ext: Default::default(),
        });
        a.send(&Envelope::with_ref(msg, r)).unwrap();
        let env = a.recv_until(|e| e.reference == Some(r), WAIT).unwrap();
        let Message::SendAck(ack) = env.msg else {
            panic!("{env:?}")
        };
        acked.insert(ack.mid, cmid);
    }

    let got = consume(&brokers, &messages, acked.len(), Duration::from_secs(20));
    let mut seen = BTreeMap::new();
    for (key, mid, v) in &got {
        *seen.entry(*mid).or_insert(0) += 1;
        assert_eq!(v["mid"].as_u64(), Some(*mid));
        let want = if v["group"].is_string() {
            "dev/g/team"
        } else {
            "dev/u/alice/bob"
        };
        assert_eq!(key, want, "keyed by conversation");
        assert_eq!(v["cmid"].as_str(), acked.get(mid).map(String::as_str));
    }
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        acked.keys().copied().collect::<BTreeSet<_>>(),
        "every acked message on the topic"
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "exactly once: {:?}",
        seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let routed = consume(&brokers, &orders, 1, Duration::from_secs(10));
    assert_eq!(routed.len(), 1, "the routed business event");
    assert_eq!(routed[0].1, order_mid);
    assert_eq!(routed[0].2["type"].as_str(), Some("order.created"));
    assert!(g.metric("imgw_kafka_failed_total", &[]) == 0.0);
}

#[test]
fn a_push_ingress_record_reaches_a_connected_user() {
    let brokers = kafka_addr();
    reachable(&brokers, "the Kafka broker");
    let (messages, push) = (unique("msgs"), unique("push"));
    let g = gateway("local", &kafka_toml(&brokers, &messages, &push, ""));
    let mut u = g.login(Transport::Ws, CodecId::Json, "carol", "phone");
    produce(&brokers, &push, "this is not json");
    produce(
        &brokers,
        &push,
        r#"{"tenant":"dev","user":"carol","type":"promo","body":"hello from kafka","from":"shop"}"#,
    );
    // The push consumer joins its group after the topic exists, which can take longer than
    // the test config's idle timeout: the client pings meanwhile, as a real one would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let d = loop {
        assert!(Instant::now() < deadline, "no pushed record within 30 s");
        let r = u.next_ref();
        u.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
            .unwrap();
        match u.recv_until(
            |e| matches!(&e.msg, Message::Deliver(d) if &*d.body == "hello from kafka"),
            Duration::from_millis(500),
        ) {
            Ok(env) => {
                let Message::Deliver(d) = env.msg else {
                    unreachable!()
                };
                break d;
            }
            Err(imgw::client::ClientError::Timeout) => continue,
            Err(e) => panic!("the pushed record over the WebSocket: {e}"),
        }
    };
    assert_eq!(&*d.from, "shop");
    assert_eq!(d.kind.as_deref(), Some("promo"));
    assert!(d.inbox_seq > 0, "stored in the inbox");
    assert_eq!(
        g.metric("imgw_push_bad_total", &[]),
        1.0,
        "the bad record counted"
    );
}

fn redis_conn(url: &str) -> redis::Connection {
    let c = redis::Client::open(url).unwrap();
    c.get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("Redis at {url}: {e}: run `tests/services.sh start`"))
}

fn hgetall(c: &mut redis::Connection, key: &str) -> BTreeMap<String, String> {
    redis::cmd("HGETALL").arg(key).query(c).unwrap()
}

fn redis_toml(url: &str, prefix: &str, ttl_ms: u64) -> String {
    format!(
        "[redis]\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\npresence_ttl_ms = {ttl_ms}\n\
         timeout_ms = 300\nreconnect_ms = 200\nnode = \"n1\"\n"
    )
}

#[test]
fn presence_is_in_redis_and_expires_after_sigkill() {
    let url = redis_url();
    reachable(&redis_host_port(&url), "Redis");
    let mut r = redis_conn(&url);
    let prefix = format!("{}:", unique("p"));
    let mut g = gateway("local", &redis_toml(&url, &prefix, 1_200));
    let mut c = g.login(Transport::Ws, CodecId::Json, "dave", "laptop");
    let pkey = format!("{prefix}presence:dev:dave");
    let rkey = format!("{prefix}route:dev:dave");
    let deadline = Instant::now() + WAIT;
    while hgetall(&mut r, &pkey).is_empty() {
        assert!(Instant::now() < deadline, "presence never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        hgetall(&mut r, &pkey).get("laptop").map(String::as_str),
        Some("online")
    );
    let route = hgetall(&mut r, &rkey);
    assert!(route["laptop"].starts_with("n1/"), "{route:?}");
    // Heartbeats keep it alive past the TTL.
    let until = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < until {
        ping(&mut c);
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        !hgetall(&mut r, &pkey).is_empty(),
        "refreshed by heartbeats"
    );
    assert!(g.histogram_count("imgw_redis_pipeline_seconds") >= 1.0);
    // A dedupe key was not written (no message yet); a send writes one.
    g.kill9();
    std::thread::sleep(Duration::from_millis(1_800));
    assert!(hgetall(&mut r, &pkey).is_empty(), "expired after the TTL");
    assert!(hgetall(&mut r, &rkey).is_empty());
}

#[test]
fn dedupe_keys_and_clean_logout_in_redis() {
    let url = redis_url();
    reachable(&redis_host_port(&url), "Redis");
    let mut r = redis_conn(&url);
    let prefix = format!("{}:", unique("d"));
    let g = gateway("local", &redis_toml(&url, &prefix, 30_000));
    let mut a = g.login(Transport::Tcp, CodecId::Json, "erin", "d");
    let mid = send(&mut a, "frank", "c1", None).unwrap();
    let key = format!("{prefix}dedupe:dev:erin:c1");
    let deadline = Instant::now() + WAIT;
    loop {
        let v: Option<u64> = redis::cmd("GET").arg(&key).query(&mut r).unwrap();
        if v == Some(mid) {
            break;
        }
        assert!(Instant::now() < deadline, "dedupe key never written: {v:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut r).unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "the dedupe window as TTL: {ttl}");
    drop(a);
    let pkey = format!("{prefix}presence:dev:erin");
    let deadline = Instant::now() + WAIT;
    while !hgetall(&mut r, &pkey).is_empty() {
        assert!(Instant::now() < deadline, "presence not removed at logout");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tansu_bin() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let local = format!("{home}/.cargo/bin/tansu");
    if std::path::Path::new(&local).exists() {
        local
    } else {
        "tansu".into()
    }
}

/// A private broker on a port of its own, and the port.
fn start_tansu() -> (Proc, u16) {
    spawn_on_free_port("tansu", |port| {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut c = Command::new(tansu_bin());
        c.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    })
}

/// Sends one message per round from `a` to `to`, resending each unacked cmid in later rounds;
/// pings between rounds. Records acked cmids (in ack order) and error codes; returns the worst
/// ping.
#[allow(clippy::too_many_arguments)]
fn load(
    a: &mut Client,
    to: &str,
    from: usize,
    rounds: usize,
    pause: Duration,
    pending: &mut Vec<String>,
    acked: &mut Vec<String>,
    errors: &mut BTreeMap<String, usize>,
) -> Duration {
    load_with(a, to, from, rounds, pause, true, pending, acked, errors)
}

/// Like [`load`]; without `retry` only the new cmid of each round is sent.
#[allow(clippy::too_many_arguments)]
fn load_with(
    a: &mut Client,
    to: &str,
    from: usize,
    rounds: usize,
    pause: Duration,
    retry: bool,
    pending: &mut Vec<String>,
    acked: &mut Vec<String>,
    errors: &mut BTreeMap<String, usize>,
) -> Duration {
    let mut worst = Duration::ZERO;
    for i in from..from + rounds {
        let retry: Vec<String> = if retry {
            pending.push(format!("c{i}"));
            std::mem::take(pending)
        } else {
            vec![format!("c{i}")]
        };
        for cmid in retry {
            match send(a, to, &cmid, None) {
                Ok(_) => acked.push(cmid),
                Err(code) => {
                    *errors.entry(code.name().to_string()).or_insert(0) += 1;
                    pending.push(cmid);
                }
            }
        }
        worst = worst.max(ping(a));
        std::thread::sleep(pause);
    }
    worst
}

fn deliveries(b: &mut Client) -> Vec<String> {
    common::gateway::sync_all(b, 0, 100)
        .into_iter()
        .map(|d| d.body.to_string())
        .collect()
}

#[test]
fn redis_outage_loses_nothing_and_presence_is_republished() {
    redis_outage(false);
}

/// Redis stops answering (SIGSTOP: hung, or partitioned) with its connections left open:
/// sends are still acked at `local`, heartbeats flow, and after SIGCONT presence is there.
/// The tests' private servers are told a port that was free a moment earlier: the helper
/// must notice when another process took it, whether the server then exits (its bind failed)
/// or stays up without listening there.
#[test]
fn a_private_server_on_a_taken_port_is_noticed() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let short = Duration::from_secs(2);
    assert!(
        try_spawn_on("redis-server", redis_command(port), port, short).is_none(),
        "redis-server on a port another process listens on"
    );
    let mut idle = Command::new("sleep");
    idle.arg("30");
    assert!(
        try_spawn_on("sleep", idle, port, short).is_none(),
        "a process that never listens, with another process on its port"
    );
    drop(taken);
    let (server, port) = start_redis();
    let mut r = redis_conn(&format!("redis://127.0.0.1:{port}/"));
    let pong: String = redis::cmd("PING").query(&mut r).unwrap();
    assert_eq!(pong, "PONG");
    drop(server);
}

#[test]
fn a_hung_redis_loses_nothing_and_presence_is_republished() {
    redis_outage(true);
}

/// Redis goes away (`hung`: stops answering instead) under load and comes back.
fn redis_outage(hung: bool) {
    let (redis, port) = start_redis();
    let url = format!("redis://127.0.0.1:{port}/");
    let mut server = Some(redis);
    let g = gateway("local", &redis_toml(&url, "o:", 60_000));
    let mut a = g.login(Transport::Tcp, CodecId::Json, "gina", "d");
    let mut r = redis_conn(&url);
    let pkey = "o:presence:dev:gina";
    let deadline = Instant::now() + WAIT;
    while hgetall(&mut r, pkey).is_empty() {
        assert!(Instant::now() < deadline, "presence never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut pending, mut acked, mut errors) = (Vec::new(), Vec::new(), BTreeMap::new());
    let pause = Duration::from_millis(20);
    load(
        &mut a,
        "hank",
        0,
        20,
        pause,
        &mut pending,
        &mut acked,
        &mut errors,
    );
    if hung {
        server.as_ref().expect("redis").signal("-STOP");
    } else {
        drop(server.take()); // Redis goes away
    }
    let worst = load(
        &mut a,
        "hank",
        20,
        60,
        pause,
        &mut pending,
        &mut acked,
        &mut errors,
    );
    assert!(
        worst < Duration::from_secs(1),
        "heartbeats stalled: {worst:?}"
    );
    // A user who logs in during the outage is published after it.
    let _late = g.login(Transport::Ws, CodecId::Json, "ivy", "d");
    if hung {
        server.as_ref().expect("redis").signal("-CONT");
    } else {
        server = Some(restart_redis(port));
    }
    load(
        &mut a,
        "hank",
        80,
        20,
        pause,
        &mut pending,
        &mut acked,
        &mut errors,
    );
    let mut r = redis_conn(&url);
    let deadline = Instant::now() + Duration::from_secs(15);
    while hgetall(&mut r, pkey).is_empty() || hgetall(&mut r, "o:presence:dev:ivy").is_empty() {
        assert!(
            Instant::now() < deadline,
            "presence not re-published after reconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pending.is_empty(), "unacked: {pending:?}");
    assert!(
        errors.is_empty(),
        "Redis is not on the ack path: {errors:?}"
    );
    let mut b = g.login(Transport::Tcp, CodecId::Json, "hank", "d");
    let got = deliveries(&mut b);
    let set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(set.len(), got.len(), "no duplicates");
    assert!(acked.iter().all(|c| set.contains(c)), "acked messages lost");
    if !hung {
        assert!(g.metric("imgw_redis_connects_total", &[]) >= 2.0);
    }
    drop(server);
}

/// A private tansu on a port of its own (stopping it disturbs nobody else) and a gateway at
/// `durability` producing to it (`outage.messages`, `outage.push`), `extra` in `[kafka]`.
/// librdkafka scans for timed-out records about once a second: at `backend` a send fails
/// within produce_timeout_ms + 1 s, and the client waits silently, so the idle timeout is
/// raised.
fn broker_gateway(durability: &str, extra: &str) -> (Proc, String, Gateway) {
    let (broker, port) = start_tansu();
    let brokers = format!("127.0.0.1:{port}");
    let g = gateway_on(
        &DEV_TOML.replace("idle_timeout_ms = 1500", "idle_timeout_ms = 6000"),
        durability,
        &kafka_toml(&brokers, OUTAGE_TOPIC, "outage.push", extra),
    );
    (broker, brokers, g)
}

const OUTAGE_TOPIC: &str = "outage.messages";

/// Checks the messages topic against the acks (`acked`: per conversation key, the acked cmids
/// in ack order) and returns the acked messages it lacks (`key:cmid`). Every record must be
/// an acked message, its `mid` header the record's. With `once` (durability `local`) no mid
/// comes twice and each conversation's records follow ack order. Without it (`backend`, where
/// a produce that timed out may have reached the broker all the same, and the resend puts a
/// second record on the topic) each conversation's acked messages must be on the topic in ack
/// order, whatever duplicates lie around them: what is not is returned as missing.
fn check_topic(
    got: &[(String, u64, serde_json::Value)],
    acked: &BTreeMap<String, Vec<String>>,
    once: bool,
) -> Vec<String> {
    let mut seen = BTreeSet::new();
    // Per conversation: how many of its acked messages were found in order.
    let mut found: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, mid, v) in got {
        assert_eq!(
            v["mid"].as_u64(),
            Some(*mid),
            "the mid header is the record's"
        );
        let cmid = v["cmid"].as_str().expect("cmid");
        let want = acked
            .get(key)
            .unwrap_or_else(|| panic!("a record of an unknown conversation {key}"));
        let at = want
            .iter()
            .position(|c| c == cmid)
            .unwrap_or_else(|| panic!("{key}: {cmid} on the topic was never acked"));
        let first = seen.insert(*mid);
        let n = found.entry(key).or_insert(0);
        if once {
            assert!(first, "{key}: {cmid} (mid {mid}) twice on the topic");
            assert!(
                at >= *n,
                "{key}: {cmid} after {} on the topic, acked before it",
                want[*n - 1]
            );
            *n = at + 1;
        } else if want.get(*n) == Some(&cmid.to_string()) {
            *n += 1;
        }
    }
    let mut missing = Vec::new();
    for (key, want) in acked {
        let n = found.get(key.as_str()).copied().unwrap_or(0);
        let on_topic: BTreeSet<&str> = got
            .iter()
            .filter(|(k, ..)| k == key)
            .filter_map(|(.., v)| v["cmid"].as_str())
            .collect();
        // With `once`, every acked message not on the topic; without, every one after the
        // last one found in ack order.
        for (i, c) in want.iter().enumerate() {
            if (once && !on_topic.contains(c.as_str())) || (!once && i >= n) {
                missing.push(format!("{key}:{c}"));
            }
        }
    }
    missing
}

/// Two senders to two receivers: four conversations with one sender each, so that each one's
/// send order is its sender's.
struct Talk {
    senders: Vec<(&'static str, Client)>,
    /// Per conversation key, the acked cmids in ack (= send) order.
    acked: BTreeMap<String, Vec<String>>,
    round: usize,
    /// The slowest ack.
    worst: Duration,
}

const RECEIVERS: [&str; 2] = ["cal", "dan"];

impl Talk {
    fn new(g: &Gateway) -> Talk {
        let senders = vec![
            ("amy", g.login(Transport::Tcp, CodecId::Json, "amy", "d")),
            ("ben", g.login(Transport::Ws, CodecId::Protobuf, "ben", "d")),
        ];
        Talk {
            senders,
            acked: BTreeMap::new(),
            round: 0,
            worst: Duration::ZERO,
        }
    }

    /// `n` rounds of one send per conversation, `pause` apart; at `local` every send is acked.
    /// Returns the cmids sent.
    fn rounds(&mut self, n: usize, pause: Duration) -> Vec<String> {
        let mut sent = Vec::new();
        for _ in 0..n {
            for (from, c) in &mut self.senders {
                for to in RECEIVERS {
                    let cmid = format!("{to}{}", self.round);
                    let started = Instant::now();
                    let r = send(c, to, &cmid, None);
                    assert!(r.is_ok(), "{from} -> {to} {cmid}: {r:?}");
                    self.worst = self.worst.max(started.elapsed());
                    let key = format!("dev/u/{from}/{to}");
                    self.acked
                        .entry(key.clone())
                        .or_default()
                        .push(cmid.clone());
                    sent.push(format!("{key}:{cmid}"));
                }
            }
            self.round += 1;
            std::thread::sleep(pause);
        }
        sent
    }

    fn total(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }
}

/// Waits until `cond` holds on the gateway's metrics, at most `within`.
fn wait_metric(g: &Gateway, what: &str, within: Duration, cond: impl Fn(&Gateway) -> bool) {
    let deadline = Instant::now() + within;
    while !cond(g) {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// At `local` every send is acked whatever the broker does; a broker that hangs (SIGSTOP)
/// for longer than the produce timeout, and longer than librdkafka's request timeout (5 s),
/// costs the topic nothing: afterwards it holds every acked message exactly once, in send
/// order per conversation.
#[test]
fn a_hung_broker_at_local_loses_nothing_on_the_topic() {
    let (broker, brokers, g) = broker_gateway("local", "produce_timeout_ms = 800\n");
    let mut talk = Talk::new(&g);
    let pause = Duration::from_millis(20);
    talk.rounds(10, pause);
    broker.signal("-STOP");
    let (outage, before) = (Instant::now(), talk.total());
    while outage.elapsed() < Duration::from_secs(6) {
        talk.rounds(1, pause);
    }
    let during = talk.total() - before;
    assert!(
        talk.worst < Duration::from_secs(2),
        "acks at local do not wait for the broker: {:?}",
        talk.worst
    );
    broker.signal("-CONT");
    talk.rounds(10, pause);
    let got = consume(
        &brokers,
        OUTAGE_TOPIC,
        talk.total(),
        Duration::from_secs(40),
    );
    let missing = check_topic(&got, &talk.acked, true);
    assert!(
        missing.is_empty(),
        "{} of {} acked messages missing: {missing:?}",
        missing.len(),
        talk.total()
    );
    assert_eq!(got.len(), talk.total());
    assert_eq!(g.metric("imgw_kafka_given_up_total", &[]), 0.0);
    assert_eq!(g.metric("imgw_kafka_backlog", &[]), 0.0);
    eprintln!(
        "{} messages, {during} sent during the outage; slowest ack {:?}",
        talk.total(),
        talk.worst
    );
    drop(broker);
}

/// At `local` with a tiny librdkafka queue and backlog: while the broker hangs, what the
/// queue cannot hold waits in the backlog up to `kafka.retry_max`, and beyond it is given up
/// (counted in /metrics); once the broker is back the backlog is produced, and later records
/// reach the topic. The topic misses exactly the records given up, and keeps the order.
#[test]
fn the_local_backlog_is_bounded_and_drains_when_the_broker_returns() {
    let extra = "produce_timeout_ms = 800\nqueue_max = 4\nretry_max = 3\n";
    let (broker, brokers, mut g) = broker_gateway("local", extra);
    let mut talk = Talk::new(&g);
    let pause = Duration::from_millis(20);
    // librdkafka's queue empties before the outage. Each round (4 records, queue_max) is
    // confirmed before the next: the broker's first answers (the producer's id, the topic's
    // metadata) can take long enough on a loaded machine that three rounds at once would
    // fill the queue and the backlog, and a record would be given up before the outage.
    for _ in 0..3 {
        talk.rounds(1, pause);
        let sent = talk.total() as f64;
        wait_metric(&g, "the first records confirmed", WAIT, |g| {
            g.metric("imgw_kafka_produced_total", &[]) >= sent
        });
    }
    broker.signal("-STOP");
    talk.rounds(5, pause);
    // The records reach the producer after their acks (the I/O core hands them over in its
    // own time): wait for the bound instead of reading the gauge once.
    wait_metric(&g, "the backlog at its bound", WAIT, |g| {
        g.metric("imgw_kafka_backlog", &[]) == 3.0
            && g.metric("imgw_kafka_given_up_total", &[]) >= 1.0
    });
    let given_up = g.metric("imgw_kafka_given_up_total", &[]);
    std::thread::sleep(Duration::from_secs(1));
    broker.signal("-CONT");
    wait_metric(
        &g,
        "the backlog produced again",
        Duration::from_secs(30),
        |g| {
            g.metric("imgw_kafka_backlog", &[]) == 0.0
                && g.metric("imgw_kafka_retried_total", &[]) >= 3.0
        },
    );
    let later = talk.rounds(3, Duration::from_millis(50));
    assert_eq!(
        g.metric("imgw_kafka_given_up_total", &[]),
        given_up,
        "nothing given up once the broker is back"
    );
    let want = talk.total() - given_up as usize;
    let got = consume(&brokers, OUTAGE_TOPIC, want, Duration::from_secs(30));
    let missing = check_topic(&got, &talk.acked, true);
    assert_eq!(missing.len() as f64, given_up, "missing: {missing:?}");
    assert!(
        later.iter().all(|c| !missing.contains(c)),
        "later records on the topic: {missing:?}"
    );
    eprintln!(
        "{} acked, {given_up} given up, {} produced again",
        talk.total(),
        g.metric("imgw_kafka_retried_total", &[])
    );
    // A record the hung broker holds back delays a graceful stop by the produce timeout at
    // most (then it is given up), not for ever.
    broker.signal("-STOP");
    talk.rounds(1, pause);
    let stopping = Instant::now();
    g.sigterm();
    let exit = g.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some_and(|s| s.success()), "no clean exit: {exit:?}");
    eprintln!("stopped in {:?} with the broker hung", stopping.elapsed());
    broker.signal("-CONT");
    drop(broker);
}

#[test]
fn broker_outage_fails_acks_explicitly_and_recovers() {
    let (broker, brokers, g) = broker_gateway("backend", "produce_timeout_ms = 800\n");
    let mut a = g.login(Transport::Tcp, CodecId::Json, "jack", "d");
    // The first produce also waits for the producer's id and the topic's metadata: on a
    // loaded machine that can outlast the short produce timeout once, so it is retried (only
    // with `unavailable`) until acked; everything after it must be acked at the first try.
    let deadline = Instant::now() + WAIT;
    let mut warm_up = 0;
    while let Err(code) = send(&mut a, "kate", "warm-up", None) {
        warm_up += 1;
        assert_eq!(code.name(), "unavailable");
        assert!(Instant::now() < deadline, "the broker never confirmed");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (mut pending, mut acked, mut errors) = (Vec::new(), Vec::new(), BTreeMap::new());
    let pause = Duration::from_millis(20);
    load(
        &mut a,
        "kate",
        0,
        20,
        pause,
        &mut pending,
        &mut acked,
        &mut errors,
    );
    assert!(
        errors.is_empty() && pending.is_empty(),
        "{errors:?} {pending:?}"
    );
    // The broker stops answering (SIGSTOP: a hung or partitioned broker; its memory storage
    // would not survive a restart, a real broker's log does).
    broker.signal("-STOP");
    let outage = Instant::now();

    let worst = load_with(
        &mut a,
        "kate",
        20,
        4,
        pause,
        false,
        &mut pending,
        &mut acked,
        &mut errors,
    );
    assert!(outage.elapsed() < Duration::from_secs(20));
    assert!(
        !pending.is_empty(),
        "nothing can be acked without the broker"
    );
    // Meanwhile the connection's heartbeat is answered (the shard does not stall).
    let mut c = g.login(Transport::Ws, CodecId::Json, "liam", "d");
    assert!(ping(&mut c) < Duration::from_secs(1));
    let _ = worst;
    // The broker comes back.
    broker.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 24;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "not recovered: {pending:?} {errors:?}"
        );
        load(
            &mut a,
            "kate",
            i,
            1,
            pause,
            &mut pending,
            &mut acked,
            &mut errors,
        );
        i += 1;
    }
    for code in errors.keys() {
        assert!(
            code == "unavailable" || code == "overloaded",
            "only documented errors: {errors:?}"
        );
    }
    let mut b = g.login(Transport::Tcp, CodecId::Json, "kate", "d");
    let got = deliveries(&mut b);
    let set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(set.len(), got.len(), "no duplicates delivered");
    assert!(acked.iter().all(|c| set.contains(c)), "acked messages lost");
    // The topic holds every acked message at least once, in ack order (a produce that timed
    // out but had reached the broker is there twice once resent, and that first record can
    // come before messages acked earlier than its resend: docs/ARCHITECTURE.md "Services").
    acked.insert(0, "warm-up".into());
    let want = BTreeMap::from([("dev/u/jack/kate".to_string(), acked)]);
    let on_topic = consume(&brokers, OUTAGE_TOPIC, want["dev/u/jack/kate"].len(), WAIT);
    let missing = check_topic(&on_topic, &want, false);
    assert!(missing.is_empty(), "acked, not on the topic: {missing:?}");
    eprintln!(
        "{} records for {} messages ({warm_up} warm-up retries, errors {errors:?})",
        on_topic.len(),
        want["dev/u/jack/kate"].len()
    );
    drop(broker);
}

/// tuning/grafana-imgw.json queries only metric families a gateway exports: one at `local`
/// with Kafka and Redis (every family of the dashboard is there once something was sent).
#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let (brokers, url) = (kafka_addr(), redis_url());
    reachable(&brokers, "the Kafka broker");
    reachable(&redis_host_port(&url), "Redis");
    let (messages, push) = (unique("gmsgs"), unique("gpush"));
    let toml = format!(
        "{}\n{}",
        kafka_toml(&brokers, &messages, &push, ""),
        redis_toml(&url, &format!("{}:", unique("g")), 5_000)
    );
    let g = gateway("local", &toml);
    let mut a = g.login(Transport::Ws, CodecId::Json, "gina", "d");
    send(&mut a, "hal", "m1", None).expect("send_ack");
    let exported: BTreeSet<String> = g
        .metrics()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    let json = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tuning/grafana-imgw.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("imgw_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name.strip_suffix("_bucket").unwrap_or(&name).to_string());
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
}
