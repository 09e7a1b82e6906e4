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

use common::gateway::{join, kafka_addr, redis_url, restart_redis, start_redis, Gateway};
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Ack, Envelope, Hello, Message, Ping, Resume, Send, Target};
use imgw::store::mysql_testdb;

const WAIT: Duration = Duration::from_secs(10);

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
dead_after_ms = 2000
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
        self.node_on(id, &redis_url())
    }

    /// A node using the Redis at `redis`.
    fn node_on(&self, id: &str, redis: &str) -> Gateway {
        let kafka = kafka_addr();
        let args = [
            "--shards",
            "2",
            "--insecure-dev-auth",
            "--durability",
            "backend",
            "--mysql",
            &self.mysql,
            "--redis",
            redis,
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
    send_to(c, Target::User(to.into()), cmid)
}

/// Sends a message to a group and returns its `send_ack`'s mid.
fn send_group(c: &mut Client, group: &str, cmid: &str) -> u64 {
    send_to(c, Target::Group(group.into()), cmid)
}

/// Sends `cmid` (also its body) to `to` and returns its `send_ack`'s mid.
fn send_to(c: &mut Client, to: Target, cmid: &str) -> u64 {
    let r = c.next_ref();
    let msg = Message::Send(Send {
        to,
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

#[test]
fn users_on_different_nodes_chat_both_ways_in_every_codec_over_both_transports() {
    let shared = Shared::new("chat");
    let nodes: Vec<Gateway> = ["n1", "n2", "n3"].iter().map(|n| shared.node(n)).collect();
    for g in &nodes {
        g.wait_metric("imgw_cluster_nodes", 3.0, WAIT);
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
    // Every message crossed nodes through Kafka exactly once (one record to the recipient's
    // node, none elsewhere), not only through the catch-up reads. Presence relays (logins and
    // logouts) are counted apart; a late confirmation is waited for.
    let want = (combo * 8) as f64;
    let sum = |name: &str| -> f64 { nodes.iter().map(|g| metric(g, name)).sum() };
    let deadline = Instant::now() + WAIT;
    let (relayed, ingress) = loop {
        let relayed =
            sum("imgw_cluster_relayed_total") - sum("imgw_cluster_relayed_presence_total");
        let ingress = sum("imgw_cluster_ingress_total");
        if (relayed >= want && ingress >= want) || Instant::now() > deadline {
            break (relayed, ingress);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(relayed, want, "message relay records");
    assert!(
        ingress >= want,
        "records consumed (presence included): {ingress}"
    );
}

#[test]
fn a_node_that_stops_is_declared_dead_and_a_drained_node_leaves_at_once() {
    let shared = Shared::new("members");
    let a = shared.node("a");
    let mut b = shared.node("b");
    let c = shared.node("c");
    a.wait_metric("imgw_cluster_nodes", 3.0, WAIT);
    // GET /cluster: how clients and load balancers find the nodes.
    let (status, body) = common::gateway::http_get(a.admin, "/cluster").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["node"], "a");
    let listed: Vec<(String, String, String)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let f = |k: &str| n[k].as_str().unwrap().to_string();
            (f("id"), f("ws"), f("tcp"))
        })
        .collect();
    let want: Vec<(String, String, String)> = [("a", &a), ("b", &b), ("c", &c)]
        .iter()
        .map(|(id, g)| (id.to_string(), g.ws.to_string(), g.tcp.to_string()))
        .collect();
    assert_eq!(listed, want);
    // SIGKILL: its registration expires after dead_after_ms (2 s); a survivor removes it.
    b.kill9();
    let started = Instant::now();
    a.wait_metric("imgw_cluster_nodes", 2.0, Duration::from_secs(8));
    c.wait_metric("imgw_cluster_nodes", 2.0, Duration::from_secs(8));
    let dead =
        metric(&a, "imgw_cluster_nodes_dead_total") + metric(&c, "imgw_cluster_nodes_dead_total");
    assert_eq!(dead, 1.0, "exactly one survivor counts the dead node");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // It comes back under the same name and serves again.
    b.spawn();
    a.wait_metric("imgw_cluster_nodes", 3.0, WAIT);
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
    nodes[0].wait_metric("imgw_cluster_nodes", 2.0, WAIT);
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

/// Every record on `topic` from its beginning, until `quiet` passed with nothing new: the
/// `op` and `group` headers of each.
fn topic_ops(topic: &str, quiet: Duration) -> Vec<(String, Option<String>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message as _};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_addr())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    let started = Instant::now();
    while last.elapsed() < quiet && started.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            last = Instant::now();
            let header = |k: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == k))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).to_string())
            };
            out.push((header("op").unwrap_or_default(), header("group")));
        }
    }
    out
}

#[test]
fn a_group_spread_over_three_nodes_gets_each_message_once_with_one_record_per_node() {
    const MEMBERS: usize = 300;
    const MESSAGES: usize = 5;
    let shared = Shared::new("group");
    let names = ["g1", "g2", "g3"];
    let nodes: Vec<Gateway> = names.iter().map(|n| shared.node(n)).collect();
    nodes[0].wait_metric("imgw_cluster_nodes", 3.0, WAIT);
    let mut members: Vec<Client> = (0..MEMBERS)
        .map(|i| {
            let transport = if i.is_multiple_of(2) {
                Transport::Ws
            } else {
                Transport::Tcp
            };
            let codec = CodecId::ALL[i % CodecId::ALL.len()];
            let mut c = login(&nodes[i % 3], transport, codec, &format!("gm{i}"), "d");
            join(&mut c, "big");
            c
        })
        .collect();
    // The sender is member 0 (on node g1); it does not get its own messages.
    let mut sender = members.remove(0);
    let bodies: Vec<String> = (0..MESSAGES).map(|i| format!("group#{i}")).collect();
    for b in &bodies {
        send_group(&mut sender, "big", b);
    }
    for (i, m) in members.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < MESSAGES {
            let env = m
                .recv_until(|e| matches!(e.msg, Message::Deliver(_)), WAIT)
                .unwrap_or_else(|e| panic!("member {} got {got:?}: {e}", i + 1));
            let Message::Deliver(d) = env.msg else {
                unreachable!()
            };
            assert_eq!(d.to, Some(Target::Group("big".into())));
            got.push(d.body.to_string());
        }
        assert_eq!(got, bodies, "member {}: each once, in order", i + 1);
    }
    // Nothing more: a ping's answer comes before any second copy would.
    for m in members.iter_mut().step_by(7) {
        let r = m.next_ref();
        m.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
            .unwrap();
        let env = m
            .recv_until(
                |e| e.reference == Some(r) || matches!(e.msg, Message::Deliver(_)),
                WAIT,
            )
            .unwrap();
        assert!(
            matches!(env.msg, Message::Pong(_)),
            "a second copy: {env:?}"
        );
    }
    // One record per group message on each other node's topic, none on the sender's.
    for (i, name) in names.iter().enumerate() {
        let topic = format!("{}.node.{name}", shared.db);
        let group_records = topic_ops(&topic, Duration::from_secs(2))
            .into_iter()
            .filter(|(op, g)| op == "deliver" && g.as_deref() == Some("big"))
            .count();
        let want = if i == 0 { 0 } else { MESSAGES };
        assert_eq!(group_records, want, "group records on {topic}");
    }

    // Every member on g3 goes offline: g3 leaves the group's node set, and the next messages
    // go to g2 only. Member j is user gm{j+1} on node (j+1) % 3.
    type Numbered = Vec<(usize, Client)>;
    let (on_g3, mut others): (Numbered, Numbered) = members
        .into_iter()
        .enumerate()
        .partition(|(j, _)| (j + 1) % 3 == 2);
    drop(on_g3);
    nodes[2].wait_metric("imgw_cluster_groups_here", 0.0, WAIT);
    // Past the senders' cache TTL (removals are not announced).
    std::thread::sleep(Duration::from_millis(1_200));
    send_group(&mut sender, "big", "after#0");
    for (j, m) in others.iter_mut().step_by(5) {
        let env = m
            .recv_until(|e| matches!(e.msg, Message::Deliver(_)), WAIT)
            .unwrap_or_else(|e| panic!("member {} missed after#0: {e}", *j + 1));
        let Message::Deliver(d) = env.msg else {
            unreachable!()
        };
        assert_eq!(&*d.body, "after#0");
    }
    let group_records = |name: &str| {
        topic_ops(
            &format!("{}.node.{name}", shared.db),
            Duration::from_secs(2),
        )
        .into_iter()
        .filter(|(op, g)| op == "deliver" && g.as_deref() == Some("big"))
        .count()
    };
    assert_eq!(group_records("g2"), MESSAGES + 1, "g2 still has members");
    assert_eq!(group_records("g3"), MESSAGES, "g3 has no member online");

    // One comes back on g3: g3 announces itself again and gets the next message.
    let mut back = login(&nodes[2], Transport::Ws, CodecId::Json, "gm2", "d");
    nodes[2].wait_metric("imgw_cluster_groups_here", 1.0, WAIT);
    send_group(&mut sender, "big", "after#1");
    let env = back
        .recv_until(
            |e| matches!(&e.msg, Message::Deliver(d) if &*d.body == "after#1"),
            WAIT,
        )
        .unwrap();
    assert!(matches!(env.msg, Message::Deliver(_)));
    assert_eq!(group_records("g3"), MESSAGES + 1, "g3 has a member again");
}

#[test]
fn kick_and_push_on_one_node_reach_the_user_on_the_others() {
    let shared = Shared::new("admin");
    let nodes: Vec<Gateway> = ["k1", "k2", "k3"].iter().map(|n| shared.node(n)).collect();
    nodes[0].wait_metric("imgw_cluster_nodes", 3.0, WAIT);
    let mut phone = login(&nodes[0], Transport::Tcp, CodecId::Protobuf, "kim", "phone");
    let mut laptop = login(&nodes[1], Transport::Ws, CodecId::Json, "kim", "laptop");
    // A push on the third node, where kim has no device, reaches both devices.
    let body = r#"{"tenant":"dev","user":"kim","body":"from the shop","from":"shop","id":"p1"}"#;
    let (status, _) = common::gateway::http_post(nodes[2].admin, "/push", body).unwrap();
    assert_eq!(status, 202);
    for c in [&mut phone, &mut laptop] {
        let env = c
            .recv_until(|e| matches!(e.msg, Message::Deliver(_)), WAIT)
            .expect("the push");
        let Message::Deliver(d) = env.msg else {
            unreachable!()
        };
        assert_eq!(&*d.body, "from the shop");
        assert_eq!(d.inbox_seq, 1);
    }
    // Inspection on the first node: its own device, named by node and shard, and the second
    // node (where the laptop is) among the others, once presence has crossed.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = common::gateway::http_get(nodes[0].admin, "/users/dev/kim").unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["node"], "k1", "{v}");
        assert_eq!(v["devices"][0]["device"], "phone", "{v}");
        assert!(v["devices"][0]["shard"].is_u64(), "{v}");
        let others = v["other_nodes"].as_array().cloned().unwrap_or_default();
        if others.iter().any(|n| n["node"] == "k2") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "k2 never listed: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A kick on the third node closes both.
    let (status, _) =
        common::gateway::http_post(nodes[2].admin, "/kick", r#"{"tenant":"dev","user":"kim"}"#)
            .unwrap();
    assert_eq!(status, 202);
    for c in [&mut phone, &mut laptop] {
        let env = c
            .recv_until(|e| matches!(e.msg, Message::Goaway(_)), WAIT)
            .expect("goaway");
        let Message::Goaway(g) = env.msg else {
            unreachable!()
        };
        assert_eq!(&*g.reason, "kicked");
        assert!(c.is_closed_by_peer(WAIT));
    }
    // Someone else on those nodes is untouched.
    let mut other = login(&nodes[0], Transport::Tcp, CodecId::Json, "kam", "d");
    let r = other.next_ref();
    other
        .send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
        .unwrap();
    assert!(other.recv_until(|e| e.reference == Some(r), WAIT).is_ok());
}

/// One device that follows the cluster: on a failure it reconnects to the next node of
/// `addrs` (a dead node refuses at once) with `hello.resume` from the last sequence it has.
struct Roamer {
    addrs: Vec<std::net::SocketAddr>,
    transport: Transport,
    codec: CodecId,
    user: String,
    next: usize,
    client: Option<Client>,
    /// Highest inbox_seq shown (receivers).
    last_seq: u64,
    reconnects: u32,
}

impl Roamer {
    fn client(&mut self) -> &mut Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.client.is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: no node took it back",
                self.user
            );
            let addr = self.addrs[self.next % self.addrs.len()];
            self.next += 1;
            let mut cfg = imgw::client::ClientConfig::new(self.transport, self.codec, addr);
            cfg.read_timeout = Duration::from_secs(2);
            let Ok(mut c) = Client::connect(&cfg) else {
                continue;
            };
            let hello = Hello {
                version: 1,
                token: self.user.as_str().into(),
                device: "d".into(),
                codecs: vec![],
                resume: Some(Resume {
                    inbox_seq: self.last_seq,
                }),
            };
            if c.hello_with(hello).is_ok() {
                self.reconnects += 1;
                self.client = Some(c);
            }
        }
        self.client.as_mut().expect("connected above")
    }

    fn failed(&mut self) {
        self.client = None;
    }
}

#[test]
fn sigkill_of_a_node_under_load_loses_nothing_shows_nothing_twice_and_keeps_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const CONVERSATIONS: usize = 4;
    const MESSAGES: usize = 80;
    let shared = Shared::new("failover");
    let mut nodes: Vec<Gateway> = ["f1", "f2", "f3"].iter().map(|n| shared.node(n)).collect();
    nodes[0].wait_metric("imgw_cluster_nodes", 3.0, WAIT);
    // Conversations 0 and 1: sender on f1, receiver on f2 (killed). 2 and 3: sender on f2
    // (killed), receiver on f3. Each device roams to the next node when its own dies.
    let homes = [(0, 1), (0, 1), (1, 2), (1, 2)];
    let acked: Vec<Arc<Mutex<Vec<String>>>> = (0..CONVERSATIONS)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let senders_done = Arc::new(AtomicBool::new(false));
    let roamer = |g: usize, k: usize, user: String| {
        let transport = if k.is_multiple_of(2) {
            Transport::Ws
        } else {
            Transport::Tcp
        };
        let mut addrs: Vec<_> = nodes
            .iter()
            .map(|n| match transport {
                Transport::Ws => n.ws,
                Transport::Tcp => n.tcp,
            })
            .collect();
        addrs.rotate_left(g);
        Roamer {
            addrs,
            transport,
            codec: CodecId::ALL[k % CodecId::ALL.len()],
            user,
            next: 0,
            client: None,
            last_seq: 0,
            reconnects: 0,
        }
    };
    let mut receivers = Vec::new();
    for (k, &(_, rx_home)) in homes.iter().enumerate() {
        let mut r = roamer(rx_home, k, format!("rx{k}"));
        let acked = acked[k].clone();
        let done = senders_done.clone();
        receivers.push(std::thread::spawn(move || {
            let mut shown: Vec<String> = Vec::new();
            let mut last_seq = 0u64;
            let mut redelivered = 0u32;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if done.load(Ordering::Acquire) && shown.len() >= acked.lock().unwrap().len() {
                    break;
                }
                assert!(Instant::now() < deadline, "rx{k} stuck at {}", shown.len());
                r.last_seq = last_seq;
                let c = r.client();
                match c.recv_until(
                    |e| matches!(e.msg, Message::Deliver(_)),
                    Duration::from_millis(300),
                ) {
                    Ok(env) => {
                        let Message::Deliver(d) = env.msg else {
                            unreachable!()
                        };
                        if d.inbox_seq <= last_seq {
                            redelivered += 1; // the client already shows it: not shown twice
                        } else {
                            assert_eq!(d.inbox_seq, last_seq + 1, "rx{k}: a gap after {shown:?}");
                            last_seq = d.inbox_seq;
                            shown.push(d.body.to_string());
                        }
                        let ack = Message::Ack(Ack {
                            inbox_seq: d.inbox_seq,
                            group: None,
                        });
                        if c.send(&Envelope::new(ack)).is_err() {
                            r.failed();
                        }
                    }
                    Err(imgw::client::ClientError::Timeout) => {}
                    Err(_) => r.failed(),
                }
            }
            (shown, redelivered, r.reconnects)
        }));
    }
    let mut senders = Vec::new();
    for (k, &(tx_home, _)) in homes.iter().enumerate() {
        let mut s = roamer(tx_home, k, format!("tx{k}"));
        let acked = acked[k].clone();
        senders.push(std::thread::spawn(move || {
            for i in 0..MESSAGES {
                let cmid = format!("c{k}-{i}");
                let deadline = Instant::now() + Duration::from_secs(30);
                // The same cmid until acked: a resend after a crash is delivered once.
                loop {
                    assert!(Instant::now() < deadline, "tx{k}: {cmid} never acked");
                    let c = s.client();
                    let r = c.next_ref();
                    let msg = Message::Send(Send {
                        to: Target::User(format!("rx{k}").as_str().into()),
                        cmid: cmid.as_str().into(),
                        kind: None,
                        body: cmid.as_str().into(),
                        ext: Default::default(),
                    });
                    if c.send(&Envelope::with_ref(msg, r)).is_err() {
                        s.failed();
                        continue;
                    }
                    match c.recv_until(|e| e.reference == Some(r), Duration::from_secs(3)) {
                        Ok(Envelope {
                            msg: Message::SendAck(_),
                            ..
                        }) => break,
                        Ok(_) => std::thread::sleep(Duration::from_millis(100)), // retry later
                        Err(_) => s.failed(),
                    }
                }
                acked.lock().unwrap().push(cmid);
                std::thread::sleep(Duration::from_millis(20));
            }
            s.reconnects
        }));
    }
    std::thread::sleep(Duration::from_millis(700));
    nodes[1].kill9();
    let sender_reconnects: Vec<u32> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    senders_done.store(true, Ordering::Release);
    for (k, t) in receivers.into_iter().enumerate() {
        let (shown, redelivered, reconnects) = t.join().unwrap();
        let acked = acked[k].lock().unwrap().clone();
        assert_eq!(acked.len(), MESSAGES);
        assert_eq!(
            shown, acked,
            "conversation {k}: every acked message once, in order"
        );
        eprintln!(
            "conversation {k}: {} shown, {redelivered} redelivered and skipped, receiver \
             connected {reconnects}x, sender {}x",
            shown.len(),
            sender_reconnects[k]
        );
        if homes[k].1 == 1 {
            assert!(reconnects >= 2, "rx{k} was on the killed node and moved");
        }
        if homes[k].0 == 1 {
            assert!(
                sender_reconnects[k] >= 2,
                "tx{k} was on the killed node and moved"
            );
        }
    }
    // The node comes back and serves again.
    nodes[1].spawn();
    nodes[0].wait_metric("imgw_cluster_nodes", 3.0, WAIT);
    let mut a = login(&nodes[1], Transport::Tcp, CodecId::Protobuf, "back-a", "d");
    let mut b = login(&nodes[2], Transport::Ws, CodecId::Json, "back-b", "d");
    send(&mut a, "back-b", "after the restart");
    expect_bodies(&mut b, &["after the restart".to_string()]);
}

fn subscribe(c: &mut Client, user: &str) {
    let msg = Message::PresenceSub(imgw::protocol::PresenceSub {
        users: vec![user.into()],
    });
    let r = c.next_ref();
    c.send(&Envelope::with_ref(msg, r)).unwrap();
}

/// The next presence event about `user`.
fn presence_of(c: &mut Client, user: &str, within: Duration) -> imgw::protocol::Status {
    let env = c
        .recv_until(
            |e| matches!(&e.msg, Message::Presence(p) if &*p.user == user),
            within,
        )
        .unwrap_or_else(|e| panic!("no presence of {user}: {e}"));
    let Message::Presence(p) = env.msg else {
        unreachable!()
    };
    p.status
}

#[test]
fn presence_crosses_nodes_and_a_dead_node_takes_its_users_offline() {
    use imgw::protocol::{PresenceSet, Status};
    let shared = Shared::new("presence");
    let mut nodes: Vec<Gateway> = ["p1", "p2"].iter().map(|n| shared.node(n)).collect();
    nodes[0].wait_metric("imgw_cluster_nodes", 2.0, WAIT);
    // A watcher on p1, the watched user logging in and out on p2.
    let mut w = login(&nodes[0], Transport::Ws, CodecId::Json, "watcher", "d");
    subscribe(&mut w, "pat");
    assert_eq!(presence_of(&mut w, "pat", WAIT), Status::Offline);
    let mut pat = login(&nodes[1], Transport::Tcp, CodecId::Protobuf, "pat", "d");
    assert_eq!(presence_of(&mut w, "pat", WAIT), Status::Online);
    pat.send(&Envelope::with_ref(
        Message::PresenceSet(PresenceSet {
            status: Status::Busy,
        }),
        9,
    ))
    .unwrap();
    assert_eq!(presence_of(&mut w, "pat", WAIT), Status::Busy);
    pat.close();
    assert_eq!(presence_of(&mut w, "pat", WAIT), Status::Offline);
    // Already online on p2 when the subscription starts on p1: offline at once (p1 has heard
    // nothing), then online once p1 asked Redis which nodes hold the user's devices.
    let _kim = login(&nodes[1], Transport::Ws, CodecId::Hessian, "kim", "d");
    std::thread::sleep(Duration::from_millis(300)); // the route reaches Redis
    subscribe(&mut w, "kim");
    assert_eq!(presence_of(&mut w, "kim", WAIT), Status::Offline);
    assert_eq!(presence_of(&mut w, "kim", WAIT), Status::Online);
    // Busy on p2 before the subscription on p1 starts: p1 asks p2, which answers busy.
    let mut lee = login(&nodes[1], Transport::Tcp, CodecId::MessagePack, "lee", "d");
    let r = lee.next_ref();
    let busy = Message::PresenceSet(PresenceSet {
        status: Status::Busy,
    });
    lee.send(&Envelope::with_ref(busy, r)).unwrap();
    lee.recv_until(|e| e.reference == Some(r), WAIT).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the route reaches Redis
    subscribe(&mut w, "lee");
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while seen.last() != Some(&Status::Busy) {
        let left = deadline.saturating_duration_since(Instant::now());
        seen.push(presence_of(&mut w, "lee", left));
    }
    assert!(
        seen.iter()
            .all(|s| matches!(s, Status::Offline | Status::Online | Status::Busy)),
        "{seen:?}"
    );
    // SIGKILL p2: its users go offline for p1's subscribers once p2 is declared dead.
    nodes[1].kill9();
    let started = Instant::now();
    assert_eq!(
        presence_of(&mut w, "kim", Duration::from_secs(8)),
        Status::Offline
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn group_node_sets_are_written_again_when_redis_comes_back_empty() {
    let shared = Shared::new("gredis");
    // A private Redis that can restart empty (no persistence).
    let (mut redis, port) = start_redis();
    let url = format!("redis://127.0.0.1:{port}/");
    let n1 = shared.node_on("r1", &url);
    let n2 = shared.node_on("r2", &url);
    n1.wait_metric("imgw_cluster_nodes", 2.0, WAIT);
    let mut sender = login(&n1, Transport::Ws, CodecId::Json, "rs", "d");
    join(&mut sender, "team");
    let mut member = login(&n2, Transport::Tcp, CodecId::Protobuf, "rm", "d");
    join(&mut member, "team");
    n2.wait_metric("imgw_cluster_groups_here", 1.0, WAIT);
    send_group(&mut sender, "team", "m0");
    let env = member
        .recv_until(|e| matches!(e.msg, Message::Deliver(_)), WAIT)
        .unwrap();
    assert!(matches!(&env.msg, Message::Deliver(d) if &*d.body == "m0"));
    // Redis restarts empty: r2 must write itself into the group's node set again, or r1
    // relays the group's messages to nobody (past its cache's TTL).
    drop(redis);
    redis = restart_redis(port);
    std::thread::sleep(Duration::from_millis(1_500));
    let deadline = Instant::now() + WAIT;
    for n in 1.. {
        assert!(
            Instant::now() < deadline,
            "no group message reached r2 after Redis came back"
        );
        let body = format!("m{n}");
        send_group(&mut sender, "team", &body);
        if let Ok(env) = member.recv_until(
            |e| matches!(&e.msg, Message::Deliver(d) if *d.body == *body),
            Duration::from_millis(500),
        ) {
            assert!(matches!(env.msg, Message::Deliver(_)));
            break;
        }
    }
    drop(redis);
}

/// Redis hung (SIGSTOP) while a node asks which nodes hold a user's devices: a presence query,
/// a membership change and a kick then go to every other live node instead of being dropped.
/// Without that the subscriber would see `offline` for a user online elsewhere, the user's
/// devices there would miss the group's messages, and the kick would leave them connected.
#[test]
fn with_redis_hung_a_presence_query_a_join_and_a_kick_still_reach_the_users_node() {
    use imgw::protocol::Status;
    let shared = Shared::new("qhung");
    // A private Redis this test can stop.
    let (redis, port) = start_redis();
    let url = format!("redis://127.0.0.1:{port}/");
    let nodes: Vec<Gateway> = ["q1", "q2"]
        .iter()
        .map(|n| shared.node_on(n, &url))
        .collect();
    nodes[0].wait_metric("imgw_cluster_nodes", 2.0, WAIT);
    let mut w = login(&nodes[0], Transport::Ws, CodecId::Json, "watcher", "d");
    let mut kim = login(&nodes[1], Transport::Tcp, CodecId::Protobuf, "kim", "d");
    // The route reaches Redis, and q2's record of kim coming online reaches q1 (which keeps
    // nothing of it, having no subscriber yet): only the query can tell q1's subscriber below.
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + WAIT;
    while metric(&nodes[0], "imgw_cluster_ingress_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "q2's presence record never reached q1"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    redis.signal("-STOP");
    let dropped_before = metric(&nodes[0], "imgw_cluster_relay_dropped_total");
    // q1 cannot look kim up (its lookups time out after redis.timeout_ms, 1 s): its
    // subscriber sees offline at once, then online once q2 answered the query sent to it.
    subscribe(&mut w, "kim");
    let seen = (
        presence_of(&mut w, "kim", WAIT),
        presence_of(&mut w, "kim", WAIT),
    );
    // kim joins a group on q1 (an admin adds kim): q1 cannot look kim's nodes up, so the
    // change goes to every live node. q2, which holds kim's device, routes the group's next
    // message to it live; dropped, kim would miss the group until its next login.
    let ingress = metric(&nodes[1], "imgw_cluster_ingress_total");
    let (created, _) = common::gateway::http_post(
        nodes[0].admin,
        "/groups",
        r#"{"tenant":"dev","group":"hung-room","users":["watcher","kim"]}"#,
    )
    .unwrap();
    // Both members' changes reach q2 (each went to every live node; q2 keeps kim's and
    // ignores the watcher's) before the message, which could otherwise overtake them.
    let deadline = Instant::now() + WAIT;
    while metric(&nodes[1], "imgw_cluster_ingress_total") < ingress + 2.0 {
        assert!(
            Instant::now() < deadline,
            "the membership changes never reached q2"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    send_group(&mut w, "hung-room", "while-hung");
    let live = kim.recv_until(
        |e| matches!(&e.msg, Message::Deliver(d) if &*d.body == "while-hung"),
        WAIT,
    );
    // A kick on q1 reaches kim's device on q2.
    let (status, _) =
        common::gateway::http_post(nodes[0].admin, "/kick", r#"{"tenant":"dev","user":"kim"}"#)
            .unwrap();
    let kicked = kim.recv_until(|e| matches!(e.msg, Message::Goaway(_)), WAIT);
    let dropped = metric(&nodes[0], "imgw_cluster_relay_dropped_total") - dropped_before;
    redis.signal("-CONT");
    assert_eq!(seen, (Status::Offline, Status::Online));
    assert_eq!(created, 201);
    live.expect("the group's message, live on kim's node");
    assert_eq!(status, 202);
    let env = kicked.expect("the kick's goaway");
    assert!(
        matches!(&env.msg, Message::Goaway(g) if &*g.reason == "kicked"),
        "{env:?}"
    );
    assert_eq!(dropped, 0.0, "relays dropped while Redis was hung");
    drop(redis);
}
