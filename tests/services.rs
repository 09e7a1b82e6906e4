//! imgw against the real Redis and the real Kafka-compatible broker (SPEC 6): presence with a
//! TTL, every accepted message on the messages topic exactly once, routed business events,
//! the push ingress, and outages of both services during steady load.
//!
//! Servers: `tests/services.sh start` (URLs from IMGW_REDIS_URL and IMGW_KAFKA, defaults
//! redis://127.0.0.1:6379/ and 127.0.0.1:9092). An unreachable server fails the test with a
//! message saying so; nothing is skipped. Each test uses its own key prefix and topics. The
//! outage tests start private `redis-server` and `tansu` processes on free ports, so stopping
//! them disturbs nobody else.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::gateway::{
    free_port, join, kafka_addr, redis_url, start_redis, wait_port, Gateway, Proc, DEV_TOML,
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
    let toml = format!("{DEV_TOML}\n{extra}\n");
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

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
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

fn start_tansu(port: u16) -> Proc {
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(tansu_bin())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu (tests/services.sh start builds it)");
    wait_port(port, "tansu");
    Proc(child)
}

/// Sends one message per round from `a` to `to`, resending each unacked cmid in later rounds;
/// pings between rounds. Records acked cmids and error codes; returns the worst ping.
#[allow(clippy::too_many_arguments)]
fn load(
    a: &mut Client,
    to: &str,
    from: usize,
    rounds: usize,
    pause: Duration,
    pending: &mut Vec<String>,
    acked: &mut BTreeSet<String>,
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
    acked: &mut BTreeSet<String>,
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
                Ok(_) => {
                    acked.insert(cmid);
                }
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
#[test]
fn a_hung_redis_loses_nothing_and_presence_is_republished() {
    redis_outage(true);
}

/// Redis goes away (`hung`: stops answering instead) under load and comes back.
fn redis_outage(hung: bool) {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let mut server = Some(start_redis(port));
    let g = gateway("local", &redis_toml(&url, "o:", 60_000));
    let mut a = g.login(Transport::Tcp, CodecId::Json, "gina", "d");
    let mut r = redis_conn(&url);
    let pkey = "o:presence:dev:gina";
    let deadline = Instant::now() + WAIT;
    while hgetall(&mut r, pkey).is_empty() {
        assert!(Instant::now() < deadline, "presence never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut pending, mut acked, mut errors) = (Vec::new(), BTreeSet::new(), BTreeMap::new());
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
        signal(server.as_ref().expect("redis"), "-STOP");
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
        signal(server.as_ref().expect("redis"), "-CONT");
    } else {
        server = Some(start_redis(port));
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
    assert!(acked.is_subset(&set), "acked messages lost");
    if !hung {
        assert!(g.metric("imgw_redis_connects_total", &[]) >= 2.0);
    }
    drop(server);
}

#[test]
fn broker_outage_fails_acks_explicitly_and_recovers() {
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let broker = start_tansu(port);
    let (messages, push) = ("outage.messages", "outage.push");
    // librdkafka scans for timed-out records about once a second: a send fails within
    // produce_timeout_ms + 1 s, and the client waits silently, so the idle timeout is raised.
    let extra = "produce_timeout_ms = 800\n";
    let toml = format!(
        "{}\n{}",
        DEV_TOML.replace("idle_timeout_ms = 1500", "idle_timeout_ms = 6000"),
        kafka_toml(&brokers, messages, push, extra)
    );
    let g = Gateway::start(
        &toml,
        &[
            "--shards",
            "2",
            "--insecure-dev-auth",
            "--durability",
            "backend",
        ],
    );
    let mut a = g.login(Transport::Tcp, CodecId::Json, "jack", "d");
    // The first produce also waits for the producer's id and the topic's metadata: on a
    // loaded machine that can outlast the short produce timeout once, so it is retried (only
    // with `unavailable`) until acked; everything after it must be acked at the first try.
    let deadline = Instant::now() + WAIT;
    while let Err(code) = send(&mut a, "kate", "warm-up", None) {
        assert_eq!(code.name(), "unavailable");
        assert!(Instant::now() < deadline, "the broker never confirmed");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (mut pending, mut acked, mut errors) = (Vec::new(), BTreeSet::new(), BTreeMap::new());
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
    signal(&broker, "-STOP");
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
    signal(&broker, "-CONT");
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
    assert!(acked.is_subset(&set), "acked messages lost");
    // Everything acked after the restart is on the topic.
    let on_topic = consume(&brokers, messages, 1, Duration::from_secs(10));
    assert!(!on_topic.is_empty());
    drop(broker);
}
