//! Crash safety of the log store of durability `local` on a real file system (SPEC 4, 6): a child process applies batches in a loop and
//! prints each batch number once `apply` returned; it is killed with SIGKILL at a random point.
//! On reopen every acknowledged batch must be there, whole, and the seqs gapless.
//!
//! The child is this test binary re-executed with `IMGW_STORE_CRASH_DIR` set, running only
//! `crash_child` (which does nothing in a normal run).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imgw::protocol::{Deliver, Ext};
use imgw::store::{LogStore, LogStoreOptions, Op, OpResult, UserRef};

const ENV_DIR: &str = "IMGW_STORE_CRASH_DIR";
/// Users the batches write to, besides the marker user (whose inbox counts the batches).
const USERS: u64 = 13;
/// Messages per batch, spread over the users.
const PER_BATCH: u64 = 40;
const MARKER: &str = "marker";

fn user(u: &str) -> UserRef {
    UserRef::new("t", u)
}

/// Batch `b`'s messages: (user, body), in order; the marker's message last. Bodies are 1 KB so
/// that the runs cross segment rollovers (1 MiB segments).
fn batch_messages(b: u64) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = (0..PER_BATCH)
        .map(|j| {
            let body = format!("b{b}-{j}:{}", ".".repeat(1000));
            (format!("u{}", (b * 7 + j * 3) % USERS), body)
        })
        .collect();
    v.push((MARKER.to_string(), format!("b{b}")));
    v
}

fn options() -> LogStoreOptions {
    let mut o = LogStoreOptions::default();
    // Small segments: the kills land in rollovers too.
    o.log.segment_bytes = 1 << 20;
    o.log.max_record_bytes = 64 << 10;
    o.log.max_pending_bytes = 512 << 10;
    o
}

/// The child's loop: runs only when re-executed by `sigkill_loses_no_acknowledged_batch`.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(ENV_DIR) else {
        return;
    };
    let mut store = LogStore::open(Path::new(&dir), options()).unwrap();
    let mut b = store.last_inbox_seq(&user(MARKER)) + 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = std::io::stdout();
    while Instant::now() < deadline {
        let ops = batch_messages(b)
            .into_iter()
            .enumerate()
            .map(|(j, (to, body))| Op::AppendInbox {
                user: user(&to),
                sender: "s".into(),
                cmid: format!("{b}-{j}").into(),
                deliver: Deliver {
                    mid: b * 1000 + j as u64,
                    from: "s".into(),
                    to: None,
                    inbox_seq: 0,
                    ts: b,
                    kind: None,
                    body: body.into(),
                    ext: Ext::new(),
                },
            })
            .collect();
        let res = store.apply(ops, 1_700_000_000_000 + b).unwrap();
        assert!(res.iter().all(|r| matches!(
            r,
            OpResult::Appended {
                duplicate: false,
                ..
            }
        )));
        writeln!(out, "acked {b}").unwrap();
        out.flush().unwrap();
        b += 1;
    }
}

/// Runs the child until it acknowledged `kill_after` batches (and a little more), SIGKILLs it,
/// and returns the last batch it acknowledged.
fn run_child_and_kill(dir: &Path, kill_after: u64, extra: Duration) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ENV_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = 0u64;
    let mut seen = 0u64;
    while seen < kill_after {
        let Some(line) = lines.next() else {
            panic!("child exited before {kill_after} batches");
        };
        if let Some(n) = parse_ack(&line.unwrap()) {
            acked = acked.max(n);
            seen += 1;
        }
    }
    std::thread::sleep(extra);
    child.kill().unwrap(); // SIGKILL
                           // What the child printed before it died is still in the pipe.
    for line in lines {
        if let Some(n) = line.ok().as_deref().and_then(parse_ack) {
            acked = acked.max(n);
        }
    }
    child.wait().unwrap();
    acked
}

fn parse_ack(line: &str) -> Option<u64> {
    let i = line.find("acked ")?;
    line[i + 6..].trim().parse().ok()
}

/// Checks that the store holds exactly batches `1..=n` for some `n >= acked`, each whole, with
/// gapless seqs; returns `n`.
fn verify(dir: &Path, acked: u64) -> u64 {
    let mut store = LogStore::open(dir, options()).unwrap();
    let n = store.last_inbox_seq(&user(MARKER));
    assert!(n >= acked, "acknowledged batch {acked} lost: store has {n}");
    let mut expected: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for b in 1..=n {
        for (u, body) in batch_messages(b) {
            expected.entry(u).or_default().push(body);
        }
    }
    for (u, bodies) in expected {
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let page = store.read_inbox(&user(&u), after, 1000).unwrap();
            for d in &page.messages {
                assert_eq!(d.inbox_seq, after + 1, "gap in {u}'s inbox");
                after = d.inbox_seq;
                got.push(d.body.to_string());
            }
            if !page.more {
                break;
            }
        }
        assert_eq!(store.last_inbox_seq(&user(&u)), after);
        assert_eq!(got, bodies, "inbox of {u} is not batches 1..={n}");
    }
    n
}

#[test]
fn sigkill_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut total = 0;
    // Different kill points; each round continues the previous one's store.
    for (round, (kill_after, extra_ms)) in [(5u64, 0u64), (40, 3), (17, 11), (60, 1)]
        .into_iter()
        .enumerate()
    {
        let acked = run_child_and_kill(dir.path(), kill_after, Duration::from_millis(extra_ms));
        assert!(acked > total, "round {round}: no progress");
        total = verify(dir.path(), acked);
        eprintln!("round {round}: acked {acked}, store has {total}");
    }
}
