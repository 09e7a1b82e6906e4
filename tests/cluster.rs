//! Cluster mode (SPEC 8, issue 11): several `imgw serve --node-id` processes on 127.0.0.1
//! sharing one MariaDB, one Redis and one Kafka-compatible broker, tested through the sockets
//! a user's client would use.
//!
//! Servers: `tests/services.sh start` (IMGW_MYSQL_URL, IMGW_REDIS_URL, IMGW_KAFKA). An
//! unreachable server fails the test with a message saying so; nothing is skipped. Each test
//! has its own database, Redis key prefix and topics.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::gateway::Gateway;
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Ack, Envelope, Hello, Message, Ping, Resume, Send, Target};
use imgw::store::mysql_testdb;

const WAIT: Duration = Duration::from_secs(10);

fn redis_url() -> String {
    std::env::var("IMGW_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn kafka_addr() -> String {
    std::env::var("IMGW_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test run uses (letters, digits and `_` only: also a database name).
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("imgw_cl_{tag}_{}_{nanos}", std::process::id())
}

/// One test's shared services: a fresh database (dropped afterwards), a key prefix and topic
/// names of its own.
struct Shared {
    db: String,
    mysql: String,
    prefix: String,
    toml: String,
}

impl Shared {
    fn new(tag: &str) -> Shared {
        let db = unique(tag);
        let mysql = mysql_testdb::fresh(&db).unwrap_or_else(|e| {
            panic!("MariaDB not reachable ({e}): start it with `tests/services.sh start`")
        });
        let prefix = format!("{db}:");
        let toml = format!(
            r#"
[limits]
handshake_timeout_ms = 2000
idle_timeout_ms = 30000
heartbeat_ms = 10000
sends_per_sec = 10000
send_burst = 10000
retransmit_base_ms = 3000

[runtime]
pin = false

[redis]
key_prefix = "{prefix}"

[kafka]
messages_topic = "{db}.messages"
push_topic = ""
partitions = 2

[cluster]
heartbeat_ms = 200
dead_after_ms = 1000
topic_prefix = "{db}.node."
"#
        );
        Shared {
            db,
            mysql,
            prefix,
            toml,
        }
    }

    fn node(&self, id: &str) -> Gateway {
        let (redis, kafka) = (redis_url(), kafka_addr());
        let args = [
            "--shards",
            "2",
            "--insecure-dev-auth",
            "--durability",
            "backend",
            "--mysql",
            &self.mysql,
            "--redis",
            &redis,
            "--kafka",
            &kafka,
            "--node-id",
            id,
        ];
        Gateway::start(&self.toml, &args)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = mysql_testdb::drop_database(&self.db);
    }
}

/// A device that logs in with `resume` (syncing its inbox first, as real clients do) and
/// returns once the sync finished.
fn login(g: &Gateway, transport: Transport, codec: CodecId, user: &str, device: &str) -> Client {
    let mut c = g.client(transport, codec);
    c.hello_with(Hello {
        version: 1,
        token: user.into(),
        device: device.into(),
        codecs: vec![],
        resume: Some(Resume { inbox_seq: 0 }),
    })
    .unwrap();
    c.recv_until(|e| matches!(&e.msg, Message::Synced(s) if !s.more), WAIT)
        .expect("the resume sync finished");
    c
}

/// Sends a 1:1 message and returns its `send_ack`'s mid.
fn send(c: &mut Client, to: &str, cmid: &str) -> u64 {
    let r = c.next_ref();
    let msg = Message::Send(Send {
        to: Target::User(to.into()),
        cmid: cmid.into(),
        kind: None,
        body: cmid.into(),
        ext: Default::default(),
    });
    c.send(&Envelope::with_ref(msg, r)).unwrap();
    let env = c
        .recv_until(|e| e.reference == Some(r), WAIT)
        .expect("an answer to send");
    match env.msg {
        Message::SendAck(a) => a.mid,
        other => panic!("send {cmid}: {other:?}"),
    }
}

/// Receives `n` deliveries, acking each, and checks them: bodies in the order given,
/// gapless increasing `inbox_seq`, no delivery twice.
fn expect_bodies(c: &mut Client, want: &[String]) -> Vec<u64> {
    let mut got = Vec::new();
    let mut seqs: Vec<u64> = Vec::new();
    let mut mids = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "got {got:?}, want {want:?}");
        let env = c
            .recv_until(|e| matches!(e.msg, Message::Deliver(_)), left)
            .unwrap_or_else(|e| panic!("got {got:?} (seqs {seqs:?}), want {want:?}: {e}"));
        let Message::Deliver(d) = env.msg else {
            unreachable!()
        };
        if let Some(&last) = seqs.last() {
            assert_eq!(d.inbox_seq, last + 1, "gapless, in order, once: {got:?}");
        }
        seqs.push(d.inbox_seq);
        mids.push(d.mid);
        got.push(d.body.to_string());
        let ack = Message::Ack(Ack {
            inbox_seq: d.inbox_seq,
            group: None,
        });
        c.send(&Envelope::new(ack)).unwrap();
    }
    assert_eq!(got, want);
    mids
}

fn metric(g: &Gateway, name: &str) -> f64 {
    g.metric(name, &[])
}

fn wait_metric(g: &Gateway, name: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = metric(g, name);
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} = {v}, want {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn users_on_different_nodes_chat_both_ways_in_every_codec_over_both_transports() {
    let shared = Shared::new("chat");
    let nodes: Vec<Gateway> = ["n1", "n2", "n3"].iter().map(|n| shared.node(n)).collect();
    for g in &nodes {
        wait_metric(g, "imgw_cluster_nodes", 3.0, WAIT);
        assert_eq!(metric(g, "imgw_cluster_registered"), 1.0);
    }
    let mut all_mids = BTreeSet::new();
    let mut combo = 0;
    for transport in [Transport::Ws, Transport::Tcp] {
        for codec in CodecId::ALL {
            let (na, nb) = (combo % 3, (combo + 1) % 3);
            combo += 1;
            let (ua, ub) = (format!("a{combo}"), format!("b{combo}"));
            let mut a = login(&nodes[na], transport, codec, &ua, "d");
            let mut b = login(&nodes[nb], transport, codec, &ub, "d");
            // Both directions, several messages each way (`send` waits for its ack and
            // skips what arrives meanwhile, so each side sends its turn whole).
            let to_b: Vec<String> = (0..4).map(|i| format!("{ua}>{ub}#{i}")).collect();
            for m in &to_b {
                all_mids.insert(send(&mut a, &ub, m));
            }
            let mids_b = expect_bodies(&mut b, &to_b);
            let to_a: Vec<String> = (0..4).map(|i| format!("{ub}>{ua}#{i}")).collect();
            for m in &to_a {
                all_mids.insert(send(&mut b, &ua, m));
            }
            let mids_a = expect_bodies(&mut a, &to_a);
            assert!(mids_a.iter().chain(&mids_b).all(|m| all_mids.contains(m)));
        }
    }
    assert_eq!(all_mids.len(), combo * 8, "mids are unique across nodes");
    // The messages crossed nodes through Kafka, not only through the catch-up reads.
    let ingress: f64 = nodes
        .iter()
        .map(|g| metric(g, "imgw_cluster_ingress_total"))
        .sum();
    assert!(ingress >= (combo * 4) as f64, "relayed records: {ingress}");
}

#[test]
fn a_node_that_stops_is_declared_dead_and_a_drained_node_leaves_at_once() {
    let shared = Shared::new("members");
    let a = shared.node("a");
    let mut b = shared.node("b");
    let c = shared.node("c");
    wait_metric(&a, "imgw_cluster_nodes", 3.0, WAIT);
    // SIGKILL: its registration expires after dead_after_ms (1 s); a survivor removes it.
    b.kill9();
    let started = Instant::now();
    wait_metric(&a, "imgw_cluster_nodes", 2.0, Duration::from_secs(5));
    wait_metric(&c, "imgw_cluster_nodes", 2.0, Duration::from_secs(5));
    let dead =
        metric(&a, "imgw_cluster_nodes_dead_total") + metric(&c, "imgw_cluster_nodes_dead_total");
    assert_eq!(dead, 1.0, "exactly one survivor counts the dead node");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // It comes back under the same name and serves again.
    b.spawn();
    wait_metric(&a, "imgw_cluster_nodes", 3.0, WAIT);
    // SIGTERM drains: the node deletes its registration as it exits, well before its TTL.
    c.sigterm();
    let mut c = c;
    assert!(c.wait_exit(WAIT).is_some(), "drained within its bound");
    let mut r = redis::Client::open(redis_url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let members: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg(format!("{}nodes", shared.prefix))
        .query(&mut r)
        .unwrap();
    assert_eq!(
        members,
        ["a", "b"].iter().map(|s| s.to_string()).collect(),
        "the drained node left the set"
    );
    let key: Option<String> = redis::cmd("GET")
        .arg(format!("{}node:c", shared.prefix))
        .query(&mut r)
        .unwrap();
    assert_eq!(key, None);
}

#[test]
fn a_user_who_moves_to_another_node_misses_nothing() {
    let shared = Shared::new("move");
    let nodes: Vec<Gateway> = ["m1", "m2"].iter().map(|n| shared.node(n)).collect();
    wait_metric(&nodes[0], "imgw_cluster_nodes", 2.0, WAIT);
    let mut a = login(&nodes[0], Transport::Tcp, CodecId::Protobuf, "mover-a", "d");
    let mut b = login(&nodes[1], Transport::Ws, CodecId::Json, "mover-b", "d");
    let first: Vec<String> = (0..3).map(|i| format!("one{i}")).collect();
    for m in &first {
        send(&mut a, "mover-b", m);
    }
    expect_bodies(&mut b, &first);
    // b moves to a's node; a keeps sending meanwhile and afterwards.
    drop(b);
    send(&mut a, "mover-b", "between");
    let mut b = login(&nodes[0], Transport::Ws, CodecId::Json, "mover-b", "d");
    let mut rest = Vec::new();
    for i in 0..3 {
        let m = format!("two{i}");
        send(&mut a, "mover-b", &m);
        rest.push(m);
    }
    // `between` came with the resume sync (login waited for it); the rest are pushed.
    expect_bodies(&mut b, &rest);
    let r = b.next_ref();
    b.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
        .unwrap();
    let extra = b
        .recv_until(
            |e| e.reference == Some(r) || matches!(e.msg, Message::Deliver(_)),
            WAIT,
        )
        .unwrap();
    assert!(
        matches!(extra.msg, Message::Pong(_)),
        "nothing delivered twice: {extra:?}"
    );
}

#[test]
fn cluster_mode_refuses_to_start_without_the_shared_services() {
    let out = Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args([
            "serve",
            "--insecure-dev-auth",
            "--node-id",
            "x",
            "--durability",
            "local",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster mode (--node-id) needs --durability backend, --mysql URL, --redis URL, --kafka HOST:PORT"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
