//! The log store on simulated storage: crashes at every point of a commit, torn batches,
//! retention and checkpoints. The contract tests (src/store/tests.rs) cover the behaviour it
//! shares with the other stores.

use std::collections::BTreeMap;

use super::*;
use crate::protocol::Ext;
use crate::store::log::sim::{SimRng, SimStorage};

const T0: u64 = 1_700_000_000_000;
/// The errno of an I/O error.
const EIO: i32 = 5;

fn user(u: &str) -> UserRef {
    UserRef::new("t", u)
}

fn append(to: &str, cmid: &str) -> Op {
    Op::AppendInbox {
        user: user(to),
        sender: "s".into(),
        cmid: cmid.into(),
        deliver: Deliver {
            mid: 1,
            from: "s".into(),
            to: None,
            inbox_seq: 0,
            ts: T0,
            kind: None,
            // The body names the send: what a reader finds is checked against it.
            body: format!("body of {cmid}").into(),
            ext: Ext::new(),
        },
    }
}

fn opts(segment_bytes: u64, inbox_keep: u64) -> LogStoreOptions {
    let mut o = LogStoreOptions::default();
    o.store.inbox_keep = inbox_keep;
    o.store.dedupe_window_ms = 60_000;
    o.log.segment_bytes = segment_bytes;
    o.log.max_record_bytes = 1 << 10;
    o.log.max_pending_bytes = 4 << 10;
    o
}

/// Every message of `u`'s inbox: (seq, body), all pages.
fn inbox(s: &mut LogStore<SimStorage>, u: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = s.read_inbox(&user(u), after, 7).unwrap();
        for d in &page.messages {
            out.push((d.inbox_seq, d.body.to_string()));
            after = d.inbox_seq;
        }
        if !page.more {
            return out;
        }
    }
}

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

/// Random batches of appends, some of whose commits fail (a write or a sync error: what a
/// crash in the middle of the commit leaves), then a crash of any kind (unsynced bytes dropped,
/// kept in part, or torn) and a reopen. After it:
/// - every message of every batch whose `apply` returned `Ok` is there once, in order, gapless,
///   with its body;
/// - the batch whose commit failed is there whole or not at all (never half: its messages go
///   to several inboxes), and nothing else is;
/// - resending its sends with their cmids stores each exactly once.
#[test]
fn after_any_crash_acked_batches_are_whole_and_a_failed_one_is_whole_or_absent() {
    for seed in 0..400u64 {
        let storage = SimStorage::new();
        let o = opts(if seed % 2 == 0 { 4 << 10 } else { 64 << 10 }, 10_000);
        let mut rng = SimRng::new(seed);
        let mut s = LogStore::open_in(storage.clone(), o.clone()).unwrap();
        // Per user: the cmids acked, in seq order.
        let mut acked: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut failed: Vec<(&str, String)> = Vec::new();
        let mut n = 0;
        let rounds = 1 + rng.below(30);
        for _ in 0..rounds {
            let mut sends = Vec::new();
            for _ in 0..1 + rng.below(12) {
                n += 1;
                sends.push((USERS[rng.below(4) as usize], format!("c{n}")));
            }
            let ops = sends.iter().map(|(u, c)| append(u, c)).collect();
            match rng.below(10) {
                0 => storage.fail_next_write(EIO),
                1 => storage.fail_next_sync(EIO),
                _ => {}
            }
            match s.apply(ops, T0 + n) {
                Ok(results) => {
                    for ((u, c), r) in sends.iter().zip(&results) {
                        let list = acked.entry(u).or_default();
                        list.push(c.clone());
                        assert_eq!(
                            r,
                            &OpResult::Appended {
                                seq: list.len() as u64,
                                mid: 1,
                                ts: T0,
                                duplicate: false
                            },
                            "seed {seed}"
                        );
                    }
                }
                Err(_) => {
                    failed = sends;
                    break;
                }
            }
        }
        storage.crash(rng.next_u64());
        drop(s);
        let mut s = LogStore::open_in(storage.clone(), o.clone()).unwrap();
        let mut failed_present = None;
        for u in USERS {
            let got = inbox(&mut s, u);
            let want = acked.get(u).cloned().unwrap_or_default();
            for (i, (seq, _)) in got.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1, "seed {seed}: {u} not gapless: {got:?}");
            }
            let bodies: Vec<String> = got.iter().map(|(_, b)| b.clone()).collect();
            assert!(
                bodies.len() >= want.len(),
                "seed {seed}: {u} lost acked messages: {bodies:?} {want:?}"
            );
            for (b, c) in bodies.iter().zip(&want) {
                assert_eq!(b, &format!("body of {c}"), "seed {seed}: {u}");
            }
            let extra: Vec<String> = bodies[want.len()..].to_vec();
            let of_failed: Vec<String> = failed
                .iter()
                .filter(|(fu, _)| *fu == u)
                .map(|(_, c)| format!("body of {c}"))
                .collect();
            let present = if extra.is_empty() {
                of_failed.is_empty()
            } else {
                assert_eq!(extra, of_failed, "seed {seed}: {u} holds unacked messages");
                true
            };
            if !of_failed.is_empty() {
                match failed_present {
                    None => failed_present = Some(present),
                    Some(p) => assert_eq!(p, present, "seed {seed}: a batch applied in part"),
                }
            }
        }
        // The failed batch's sends again: each stored once (a duplicate if it was there).
        if !failed.is_empty() {
            let ops = failed.iter().map(|(u, c)| append(u, c)).collect();
            let r = s.apply(ops, T0 + n + 1).unwrap();
            let dup = failed_present == Some(true);
            for x in &r {
                assert!(
                    matches!(x, OpResult::Appended { duplicate, .. } if *duplicate == dup),
                    "seed {seed}: {x:?}, present {failed_present:?}"
                );
            }
            for u in USERS {
                let want = acked.get(u).map_or(0, |l| l.len())
                    + failed.iter().filter(|(fu, _)| *fu == u).count();
                assert_eq!(inbox(&mut s, u).len(), want, "seed {seed}: {u}");
            }
        }
    }
}

/// The records of a batch that never reached its closing record stay on disk before the next
/// batches; every later open skips them and applies the batches after them.
#[test]
fn a_torn_batch_is_skipped_at_every_open() {
    let storage = SimStorage::new();
    let mut o = opts(4 << 20, 100);
    // A batch of 12 messages of 100 KB is larger than one write may be: it goes out in parts.
    o.log.max_record_bytes = 300 << 10;
    o.log.max_pending_bytes = 400 << 10;
    let mut s = LogStore::open_in(storage.clone(), o.clone()).unwrap();
    s.apply(vec![append("u0", "a")], T0).unwrap();
    let big = |cmid: &str| {
        let mut op = append("u1", cmid);
        if let Op::AppendInbox { deliver, .. } = &mut op {
            deliver.body = "x".repeat(100_000).into();
        }
        op
    };
    // The first part is written and synced; the sync of the next part fails, then a crash
    // drops what was not synced: the batch's first records are on disk, its end is not.
    storage.fail_sync_after(1, EIO);
    let ops: Vec<Op> = (0..12).map(|i| big(&format!("b{i}"))).collect();
    assert!(s.apply(ops, T0 + 1).is_err());
    drop(s);
    storage.crash_with(
        crate::store::log::sim::CrashKind::DropUnsynced,
        &mut SimRng::new(1),
    );
    let mut s = LogStore::open_in(storage.clone(), o.clone()).unwrap();
    assert!(s.opened().torn_batch_records >= 2, "{:?}", s.opened());
    assert_eq!(inbox(&mut s, "u1"), vec![]);
    s.apply(vec![append("u1", "c"), append("u0", "d")], T0 + 2)
        .unwrap();
    drop(s);
    let mut s = LogStore::open_in(storage.clone(), o).unwrap();
    assert!(s.opened().torn_batch_records >= 2, "{:?}", s.opened());
    assert_eq!(inbox(&mut s, "u1"), vec![(1, "body of c".to_string())]);
    assert_eq!(inbox(&mut s, "u0").len(), 2);
}

/// A store written far past `inbox_keep` deletes the segments nothing is left in: the files
/// stay within a bound, the newest messages, the cursors and the memberships (in the
/// checkpoint once their segments are gone) survive a reopen.
#[test]
fn retention_bounds_the_segments_and_keeps_what_is_live() {
    let storage = SimStorage::new();
    let mut o = opts(8 << 10, 5);
    o.store.dedupe_window_ms = 1_000;
    let mut s = LogStore::open_in(storage.clone(), o.clone()).unwrap();
    let g = GroupRef::new("t", "g");
    s.apply(
        vec![
            Op::Join {
                group: g.clone(),
                member: "u0".into(),
            },
            Op::SetCursor {
                user: user("u1"),
                device: "phone".into(),
                seq: 0,
            },
        ],
        T0,
    )
    .unwrap();
    let mut most = 0;
    for i in 0..3_000u64 {
        let ops = vec![
            append(USERS[(i % 4) as usize], &format!("m{i}")),
            Op::SetCursor {
                user: user("u1"),
                device: "phone".into(),
                seq: i / 4,
            },
        ];
        // The clock runs 100 ms per batch: the dedupe window holds the last 10 batches.
        s.apply(ops, T0 + i * 100).unwrap();
        most = most.max(s.segment_count());
    }
    // 3,000 messages of ~120 bytes and as many cursor records: about 100 segments written.
    assert!(most <= 4, "segments: at most {most}");
    drop(s);
    let mut s = LogStore::open_in(storage, o).unwrap();
    for (k, u) in USERS.iter().enumerate() {
        let got = inbox(&mut s, u);
        let last = 750u64;
        let want: Vec<(u64, String)> = (last - 4..=last)
            .map(|seq| (seq, format!("body of m{}", (seq - 1) * 4 + k as u64)))
            .collect();
        assert_eq!(got, want, "{u}");
    }
    assert_eq!(s.cursor(&user("u1"), "phone"), 749);
    assert_eq!(s.group_members(&g, None, 10), vec![Str::from("u0")]);
    assert_eq!(s.user_groups(&user("u0")), vec![Str::from("g")]);
}

/// One process per data directory: a second open of the same directory fails while the first
/// holds it, and succeeds once it is closed.
#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = LogStore::open(dir.path(), LogStoreOptions::default()).unwrap();
    let second = LogStore::open(dir.path(), LogStoreOptions::default());
    assert!(
        matches!(&second, Err(StoreError::Config(m)) if m.contains("in use")),
        "{:?}",
        second.err()
    );
    drop(first);
    LogStore::open(dir.path(), LogStoreOptions::default()).unwrap();
}
