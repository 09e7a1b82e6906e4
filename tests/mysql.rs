//! Durability `backend` on MariaDB through the gateway's sockets (issue 6): messages, inboxes,
//! cursors and groups round-trip through MySQL across a restart of imgw, and a MariaDB outage
//! under load loses no acked message, delivers nothing twice, stalls no shard and gives clients
//! only the documented errors.
//!
//! Needs MariaDB: `IMGW_MYSQL_URL` (default: the one `tests/services.sh start` runs). The tests
//! fail, they do not skip, when it is not reachable. The outage test starts its own private
//! MariaDB on a free port (tests/services.sh start-mysql / kill-mysql with their own
//! IMGW_SERVICES_DIR), so killing it does not disturb the other tests.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gateway::{free_port, listens_on, Gateway, DEV_TOML, PORT_ATTEMPTS};
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{
    Ack, Envelope, ErrorCode, GroupJoin, Hello, Message, Resume, Send, SendAck, Target,
};
use imgw::store::{mysql_testdb, Backend, GroupRef, MySqlOptions, MySqlStore, StoreOptions};

const WAIT: Duration = Duration::from_secs(5);

/// A fresh database on the test MariaDB, named `{name}_{pid}` so that two test runs at once
/// (two checkouts) do not share it, and dropped with the value; panics with how to start
/// MariaDB when unreachable.
struct FreshDb {
    name: String,
    url: String,
}

impl FreshDb {
    fn new(name: &str) -> FreshDb {
        let name = format!("{name}_{}", std::process::id());
        let url = mysql_testdb::fresh(&name).unwrap_or_else(|e| {
            panic!(
                "MariaDB not reachable at {} ({e}): start it with `tests/services.sh start`",
                imgw::config::redact_url(&mysql_testdb::base_url())
            )
        });
        FreshDb { name, url }
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        let _ = mysql_testdb::drop_database(&self.name);
    }
}

fn backend(url: &str, mysql_toml: &str) -> Gateway {
    let toml = format!("{DEV_TOML}\n[mysql]\n{mysql_toml}\n");
    Gateway::start(
        &toml,
        &[
            "--shards",
            "2",
            "--insecure-dev-auth",
            "--durability",
            "backend",
            "--mysql",
            url,
        ],
    )
}

fn send_env(c: &mut Client, to: Target, cmid: &str, body: &str) -> u64 {
    let r = c.next_ref();
    c.send(&Envelope::with_ref(
        Message::Send(Send {
            to,
            cmid: cmid.into(),
            kind: None,
            body: body.into(),
            ext: Default::default(),
        }),
        r,
    ))
    .unwrap();
    r
}

fn send(c: &mut Client, to: Target, cmid: &str, body: &str) -> SendAck {
    let r = send_env(c, to, cmid, body);
    match c.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg {
        Message::SendAck(a) => a,
        other => panic!("{other:?}"),
    }
}

fn user(u: &str) -> Target {
    Target::User(u.into())
}

/// Waits until the gateway has written what it was sent (cursor writes are fire-and-forget):
/// a ping round trip orders after them on the connection.
fn flush(c: &mut Client) {
    c.send(&Envelope::with_ref(Message::Ping(Default::default()), 77))
        .unwrap();
    c.recv_until(|e| e.reference == Some(77), WAIT).unwrap();
}

fn resume(g: &Gateway, u: &str, device: &str) -> Vec<u64> {
    let mut c = g.client(Transport::Tcp, CodecId::Protobuf);
    c.hello_with(Hello {
        version: 1,
        token: u.into(),
        device: device.into(),
        codecs: vec![],
        resume: Some(Resume { inbox_seq: 0 }),
    })
    .unwrap();
    let mut seqs = Vec::new();
    loop {
        match c.recv().unwrap().msg {
            Message::Deliver(d) => seqs.push(d.inbox_seq),
            Message::Synced(s) if !s.more => return seqs,
            _ => {}
        }
    }
}

#[test]
fn messages_cursors_and_groups_round_trip_through_mysql_across_a_restart() {
    let db = FreshDb::new("imgw_it_roundtrip");
    let url = db.url.clone();
    let mut g = backend(&url, "");
    let mut a = g.login(Transport::Ws, CodecId::Json, "rt-amy", "d");
    let seqs: Vec<u64> = (0..10)
        .map(|i| send(&mut a, user("rt-bob"), &format!("c{i}"), &format!("m{i}")).seq)
        .collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "gapless inbox_seq");
    // A resent cmid: the same ack, nothing stored twice.
    let again = send(&mut a, user("rt-bob"), "c3", "m3");
    assert_eq!(again.seq, 4);
    // Device "one" reads everything and acks up to 4.
    let mut b = g.login(Transport::Tcp, CodecId::Protobuf, "rt-bob", "one");
    let got = common::gateway::sync_all(&mut b, 0, 3);
    assert_eq!(got.len(), 10);
    b.send(&Envelope::new(Message::Ack(Ack {
        inbox_seq: 4,
        group: None,
    })))
    .unwrap();
    flush(&mut b);
    b.close();
    // A group with two members and three messages.
    let mut gb = g.login(Transport::Tcp, CodecId::Protobuf, "rt-bea", "d");
    for c in [&mut a, &mut gb] {
        let r = c.next_ref();
        c.send(&Envelope::with_ref(
            Message::GroupJoin(GroupJoin {
                group: "rt-team".into(),
            }),
            r,
        ))
        .unwrap();
        assert_eq!(
            c.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg,
            Message::Ok
        );
    }
    let gseqs: Vec<u64> = (0..3)
        .map(|i| {
            send(
                &mut a,
                Target::Group("rt-team".into()),
                &format!("t{i}"),
                &format!("team {i}"),
            )
            .seq
        })
        .collect();
    assert_eq!(gseqs, vec![1, 2, 3]);
    drop((a, gb));

    // Kill imgw (no drain) and start it again on a fresh data directory: only MySQL remembers.
    g.kill9();
    let _ = std::fs::remove_dir_all(g.dir.join("data"));
    g.spawn();
    assert_eq!(resume(&g, "rt-bob", "one"), (5..=10).collect::<Vec<_>>());
    assert_eq!(resume(&g, "rt-bob", "two"), (1..=10).collect::<Vec<_>>());
    let mut c = g.login(Transport::Ws, CodecId::MessagePack, "rt-bob", "three");
    let bodies: Vec<String> = common::gateway::sync_all(&mut c, 0, 100)
        .iter()
        .map(|d| d.body.to_string())
        .collect();
    assert_eq!(bodies, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // Seqs and dedupe continue after the restart.
    let mut a = g.login(Transport::Ws, CodecId::Json, "rt-amy", "d");
    assert_eq!(send(&mut a, user("rt-bob"), "c3", "m3").seq, 4);
    assert_eq!(send(&mut a, user("rt-bob"), "c10", "m10").seq, 11);
    drop((a, c));
    g.kill9();

    // The group, its members and its timeline are in MySQL (read through the store API).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = MySqlStore::connect(MySqlOptions {
            url: url.clone(),
            pool_min: 1,
            pool_max: 1,
            connect_timeout_ms: 5_000,
            query_timeout_ms: 10_000,
            stmt_cache: 16,
            writers: 1,
            writer_min_ops: 1,
            store: StoreOptions::default(),
        })
        .await
        .unwrap();
        let team = GroupRef::new("dev", "rt-team");
        assert_eq!(
            s.group_members(&team, None, 100).await.unwrap(),
            vec!["rt-amy", "rt-bea"]
        );
        assert_eq!(s.last_group_seq(&team).await.unwrap(), 3);
        let page = s.read_group(&team, 0, 100).await.unwrap();
        let bodies: Vec<String> = page
            .messages
            .iter()
            .map(|e| e.deliver.body.to_string())
            .collect();
        assert_eq!(bodies, vec!["team 0", "team 1", "team 2"]);
    });
}

/// A private MariaDB for the outage test: its own data directory and port.
struct PrivateMariaDb {
    dir: std::path::PathBuf,
    port: u16,
}

impl PrivateMariaDb {
    fn script(&self, cmd: &str) -> bool {
        let status = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/services.sh"))
            .arg(cmd)
            .env("IMGW_SERVICES_DIR", &self.dir)
            .env("IMGW_MYSQL_PORT", self.port.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run tests/services.sh");
        status.success()
    }

    /// Started on a port the kernel just handed out; when another process took the port
    /// first (the server did not start, or the socket there is not the server's), stopped
    /// and started again on another.
    fn start() -> PrivateMariaDb {
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let db = PrivateMariaDb {
                dir: std::env::temp_dir()
                    .join(format!("imgw-mariadb-{}-{port}", std::process::id())),
                port,
            };
            if db.script("start-mysql") && db.listens() {
                return db;
            }
            eprintln!("private MariaDB: port {port} was taken, trying another");
        }
        panic!(
            "could not start a private MariaDB in {PORT_ATTEMPTS} attempts (is mariadb-server \
             installed? `tests/services.sh start` installs it)"
        );
    }

    /// Whether the server process (its pid file's) holds the socket listening on our port.
    fn listens(&self) -> bool {
        std::fs::read_to_string(self.dir.join("mariadb/mariadbd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| listens_on(pid, self.port))
    }

    fn url(&self) -> String {
        format!("mysql://imgw:imgw@127.0.0.1:{}/imgw", self.port)
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server process.
    fn signal(&self, signal: &str) -> bool {
        let pid = std::fs::read_to_string(self.dir.join("mariadb/mariadbd.pid"))
            .expect("the private MariaDB's pid file");
        Command::new("kill")
            .args([signal, pid.trim()])
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// The answer to request `r`, heartbeating as a client must while it waits: a send can wait
/// longer than the test config's 1.5 s idle timeout while MariaDB hangs (each attempt runs to
/// `query_timeout_ms`, and the batches queue behind it).
fn answer(c: &mut Client, r: u64, within: Duration) -> Result<Envelope, imgw::client::ClientError> {
    let deadline = Instant::now() + within;
    loop {
        match c.recv_until(|e| e.reference == Some(r), Duration::from_millis(400)) {
            Err(imgw::client::ClientError::Timeout) if Instant::now() < deadline => {
                c.send(&Envelope::new(Message::Ping(Default::default())))?;
            }
            other => return other,
        }
    }
}

/// How the outage test takes MariaDB away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// SIGKILL, then a restart: connections are refused and reset.
    Killed,
    /// SIGSTOP, then SIGCONT: a hung server (or a partition): connections stay open and
    /// nothing answers, so only imgw's deadlines (`query_timeout_ms`) end each attempt.
    Hung,
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        let _ = self.script("stop-mysql");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SENDERS: usize = 3;
const RECIPIENTS: usize = 3;

#[test]
fn a_mariadb_outage_under_load_loses_nothing_and_stalls_no_shard() {
    outage_under_load(Outage::Killed);
}

#[test]
fn a_hung_mariadb_under_load_fails_sends_in_time_loses_nothing_and_stalls_no_shard() {
    outage_under_load(Outage::Hung);
}

/// Senders keep sending (each cmid again until acked) while MariaDB goes away for 3 s and
/// comes back: every send is answered within 10 s with an ack or a documented error, pings
/// stay fast, sends are acked again within 15 s, and every acked message is stored exactly
/// once, gapless, in its recipient's inbox.
fn outage_under_load(outage: Outage) {
    let started = Instant::now();
    let db = PrivateMariaDb::start();
    let g = backend(
        &db.url(),
        "query_timeout_ms = 1000\nconnect_timeout_ms = 500",
    );

    let stop = Arc::new(AtomicBool::new(false));
    // (recipient, seq) -> body of every acked send; error codes seen by the senders.
    let acked: Arc<Mutex<BTreeMap<(usize, u64), String>>> = Arc::default();
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let acked_after_outage = Arc::new(AtomicU64::new(0));
    let outage_over = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for s in 0..SENDERS {
        let cfg = g.config(Transport::Tcp, CodecId::Protobuf);
        let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
        let (after, over) = (acked_after_outage.clone(), outage_over.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(&cfg).unwrap();
            c.hello(&format!("out-sender-{s}"), "d").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let to = (s + i as usize) % RECIPIENTS;
                let body = format!("s{s}-m{i}");
                let cmid = format!("s{s}-{i}");
                // The same cmid until it is acked: a failed batch wrote nothing, and the retry
                // of a batch that did commit gets the original ack.
                loop {
                    let r = send_env(&mut c, user(&format!("out-rcpt-{to}")), &cmid, &body);
                    let env = answer(&mut c, r, Duration::from_secs(10))
                        .expect("an answer to every send within 10 s");
                    match env.msg {
                        Message::SendAck(a) => {
                            let prev = acked.lock().unwrap().insert((to, a.seq), body.clone());
                            assert!(
                                prev.is_none() || prev.as_deref() == Some(body.as_str()),
                                "seq {} to {to} acked for two different messages",
                                a.seq
                            );
                            if over.load(Ordering::Relaxed) {
                                after.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        Message::Error(e) => {
                            *errors
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", e.code))
                                .or_default() += 1;
                            assert!(
                                matches!(e.code, ErrorCode::Unavailable | ErrorCode::Overloaded),
                                "undocumented error for a send during an outage: {e:?}"
                            );
                            std::thread::sleep(Duration::from_millis(
                                e.retry_after_ms.unwrap_or(100).min(500),
                            ));
                        }
                        other => panic!("unexpected reply {other:?}"),
                    }
                }
                i += 1;
            }
        }));
    }
    // Heartbeats: a ping every 100 ms on each shard's connections must keep being answered
    // promptly while the store is down (the shards never wait for the I/O core).
    let worst_ping = Arc::new(AtomicU64::new(0));
    let pinger = {
        let (stop, worst) = (stop.clone(), worst_ping.clone());
        let cfgs: Vec<_> = (0..4)
            .map(|_| g.config(Transport::Tcp, CodecId::Protobuf))
            .collect();
        std::thread::spawn(move || {
            let mut clients: Vec<Client> = cfgs
                .iter()
                .enumerate()
                .map(|(i, cfg)| {
                    let mut c = Client::connect(cfg).unwrap();
                    c.hello(&format!("out-pinger-{i}"), "d").unwrap();
                    c
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                for c in &mut clients {
                    let t = Instant::now();
                    let r = c.next_ref();
                    c.send(&Envelope::with_ref(Message::Ping(Default::default()), r))
                        .unwrap();
                    c.recv_until(|e| e.reference == Some(r), Duration::from_secs(5))
                        .expect("pong within 5 s");
                    worst.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    std::thread::sleep(Duration::from_millis(1500));
    let before_outage = acked.lock().unwrap().len();
    assert!(
        before_outage > 20,
        "too few acks before the outage: {before_outage}"
    );
    match outage {
        Outage::Killed => assert!(db.script("kill-mysql"), "kill the private MariaDB"),
        Outage::Hung => assert!(db.signal("-STOP"), "stop the private MariaDB"),
    }
    std::thread::sleep(Duration::from_secs(3));
    let during = acked.lock().unwrap().len();
    match outage {
        Outage::Killed => assert!(db.script("start-mysql"), "restart the private MariaDB"),
        Outage::Hung => assert!(db.signal("-CONT"), "continue the private MariaDB"),
    }
    outage_over.store(true, Ordering::Relaxed);
    // Catch-up: sends are acked again once MariaDB is back.
    let deadline = Instant::now() + Duration::from_secs(15);
    while acked_after_outage.load(Ordering::Relaxed) < 50 {
        assert!(
            Instant::now() < deadline,
            "imgw did not recover within 15 s of MariaDB's return"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("sender");
    }
    pinger.join().expect("pinger");
    let acked = acked.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "outage {outage:?}: {before_outage} acked before, {} during, {} in all; errors {errors:?}; \
         worst ping {} ms",
        during - before_outage,
        acked.len(),
        worst_ping.load(Ordering::Relaxed)
    );
    assert!(
        !errors.is_empty(),
        "the outage produced no error at all: was MariaDB really down?"
    );
    assert!(
        worst_ping.load(Ordering::Relaxed) < 1_000,
        "a shard stalled: a ping took {} ms",
        worst_ping.load(Ordering::Relaxed)
    );

    // Every acked message is stored, exactly once, gapless, in each recipient's inbox.
    for r in 0..RECIPIENTS {
        let mut c = g.login(
            Transport::Ws,
            CodecId::Json,
            &format!("out-rcpt-{r}"),
            "fresh",
        );
        let mut got = BTreeMap::new();
        let mut bodies = BTreeSet::new();
        for d in common::gateway::sync_all(&mut c, 0, 500) {
            assert!(
                got.insert(d.inbox_seq, d.body.to_string()).is_none(),
                "seq {} delivered twice",
                d.inbox_seq
            );
            assert!(
                bodies.insert(d.body.to_string()),
                "message {} stored twice",
                d.body
            );
        }
        let seqs: Vec<u64> = got.keys().copied().collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gaps");
        for ((to, seq), body) in acked.iter().filter(|((to, _), _)| *to == r) {
            assert_eq!(
                got.get(seq),
                Some(body),
                "acked message {seq} to {to} lost or changed"
            );
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the outage test took {:?}",
        started.elapsed()
    );
}
