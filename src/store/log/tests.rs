//! The log's tests: crash property over [`SimStorage`], recovery, rollover, retention,
//! checkpoints, injected faults, and one run on real files.

use super::sim::{SimRng, SimStorage};
use super::*;

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

/// Small bounds so that a test crosses many segments and batches.
fn small() -> LogOptions {
    LogOptions {
        segment_bytes: 4096,
        max_record_bytes: 600,
        max_pending_bytes: 2048,
        scan_chunk_bytes: 1000,
        max_checkpoint_bytes: 1 << 16,
    }
}

type Rec = (Position, u8, Vec<u8>);

fn open_sim(
    s: &SimStorage,
    opts: LogOptions,
) -> Result<(Log<SimStorage>, Recovery, Vec<Rec>), LogError> {
    let mut seen = Vec::new();
    let (log, rec) = Log::open(s.clone(), opts, |p, k, b: &[u8]| {
        seen.push((p, k, b.to_vec()));
        Ok::<(), LogError>(())
    })?;
    Ok((log, rec, seen))
}

fn payload(rng: &mut SimRng, max: u64) -> Vec<u8> {
    let n = rng.below(max + 1) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn segment_name(n: u64) -> String {
    SimStorage::segment_file_name(n)
}

/// Random batches, a crash at a random point, reopen; several lives per seed. After each
/// reopen the records are exactly: every record of every commit that returned `Ok` (minus
/// the segments retention deleted), once, in order, with its position, kind and bytes; then,
/// possibly, a whole-record prefix of the one batch whose commit did not return `Ok`. Never a
/// partial record, never a record after a missing one, never a record of a batch that was
/// only appended.
#[test]
fn crash_property() {
    let mut stats = Stats::default();
    for seed in 0..500u64 {
        crash_case(seed, &mut stats);
    }
    eprintln!("crash_property: {stats:?}");
    // The seeds reach the cases that matter.
    assert!(stats.truncated > 25, "{stats:?}");
    assert!(stats.unacked_survived > 20, "{stats:?}");
    assert!(stats.unacked_lost > 20, "{stats:?}");
    assert!(stats.max_segment > 5, "{stats:?}");
    assert!(stats.deleted > 20, "{stats:?}");
    assert!(stats.restarts > 20, "{stats:?}");
}

/// What the crash property's seeds went through.
#[derive(Debug, Default)]
struct Stats {
    /// Reopens that cut a torn tail.
    truncated: u32,
    /// Reopens that found records of a batch whose commit failed; and that found none of it.
    unacked_survived: u32,
    unacked_lost: u32,
    max_segment: u64,
    deleted: usize,
    /// Reopens after a failed commit without a crash.
    restarts: u32,
}

fn crash_case(seed: u64, stats: &mut Stats) {
    let mut rng = SimRng::new(seed.wrapping_mul(0x1234_5678_9ABC_DEF1) ^ 0xC0FFEE);
    let s = SimStorage::new();
    let opts = small();
    // The records the log must hold: committed (acked) ones.
    let mut acked: Vec<Rec> = Vec::new();
    // The batch whose commit did not return Ok before the crash: a prefix of it may survive.
    let mut unacked: Vec<Rec> = Vec::new();
    for life in 0..5 {
        let (mut log, recovery, seen) =
            open_sim(&s, opts.clone()).unwrap_or_else(|e| panic!("seed {seed} life {life}: {e}"));
        check(seed, life, &acked, &unacked, &seen, &recovery);
        stats.truncated += u32::from(recovery.truncated.is_some());
        if !unacked.is_empty() {
            if seen.len() > acked.len() {
                stats.unacked_survived += 1;
            } else {
                stats.unacked_lost += 1;
            }
        }
        stats.max_segment = stats.max_segment.max(log.committed_end().segment);
        acked = seen;
        for (p, k, b) in &acked {
            let (k2, b2) = log
                .read(*p)
                .unwrap_or_else(|e| panic!("seed {seed}: read {p}: {e}"));
            assert_eq!((k2, &b2), (*k, b), "seed {seed}: read {p}");
        }
        let commits = rng.below(60);
        unacked.clear();
        for _ in 0..commits {
            let mut batch = Vec::new();
            for _ in 0..1 + rng.below(8) {
                let kind = rng.next_u64() as u8;
                let max = if rng.below(4) == 0 { 600 } else { 80 };
                let b = payload(&mut rng, max);
                match log.append(kind, &b) {
                    Ok(p) => batch.push((p, kind, b)),
                    Err(LogError::BatchFull { .. }) => break,
                    Err(e) => panic!("seed {seed}: append: {e}"),
                }
            }
            match rng.below(25) {
                // A crash after the write, before or during a sync (of a segment, or of the
                // directory when the batch starts a segment): the batch is written, not acked.
                // A commit with fewer syncs than skipped passes.
                0 => {
                    s.fail_sync_after(rng.below(3), EIO);
                    if log.commit().is_err() {
                        unacked = batch;
                        break;
                    }
                    s.clear_fault();
                    acked.extend(batch);
                }
                // The write fails (disk full): nothing of it may be acked.
                1 => {
                    s.fail_next_write(ENOSPC);
                    let e = log.commit().expect_err("injected");
                    assert!(e.is_storage_full(), "seed {seed}: {e}");
                    assert!(matches!(
                        log.commit(),
                        Err(LogError::Failed {
                            storage_full: true,
                            ..
                        })
                    ));
                    unacked = batch;
                    break;
                }
                // Appended, never committed.
                2 => break,
                // A crash between commits.
                3 => {
                    acked.extend(batch);
                    log.commit()
                        .unwrap_or_else(|e| panic!("seed {seed}: commit: {e}"));
                    break;
                }
                _ => {
                    log.commit()
                        .unwrap_or_else(|e| panic!("seed {seed}: commit: {e}"));
                    acked.extend(batch);
                }
            }
            if rng.below(8) == 0 {
                let before = log.committed_end().segment.saturating_sub(rng.below(3));
                stats.deleted += log
                    .delete_segments_before(before)
                    .unwrap_or_else(|e| panic!("seed {seed}: delete: {e}"));
                acked.retain(|r| r.0.segment >= before.min(log.committed_end().segment));
                assert!(log
                    .segments()
                    .iter()
                    .all(|i| i.segment >= before.min(log.committed_end().segment)));
            }
        }
        drop(log);
        // After a failed commit, half the time the process restarts without a crash: the
        // reopened log must make what it recovered durable, since the caller builds on it.
        if unacked.is_empty() || rng.below(2) == 0 {
            s.crash(rng.next_u64());
        } else {
            stats.restarts += 1;
        }
    }
}

fn check(seed: u64, life: u32, acked: &[Rec], unacked: &[Rec], seen: &[Rec], rec: &Recovery) {
    let ctx = format!("seed {seed} life {life} ({rec:?})");
    assert!(
        seen.len() >= acked.len(),
        "{ctx}: {} records recovered, {} acked",
        seen.len(),
        acked.len()
    );
    assert_eq!(&seen[..acked.len()], acked, "{ctx}: acked records");
    let extra = &seen[acked.len()..];
    assert!(extra.len() <= unacked.len(), "{ctx}: records never written");
    assert_eq!(extra, &unacked[..extra.len()], "{ctx}: unacked prefix");
    assert_eq!(rec.records, seen.len() as u64, "{ctx}");
}

/// A torn last write is cut off, reported, and the log appends after it.
#[test]
fn torn_tail_truncated_and_reported() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    for i in 0..3u8 {
        log.append(i, &[i; 50]).unwrap();
    }
    log.commit().unwrap();
    let end = log.committed_end();
    drop(log);
    // A record cut in its payload.
    let name = segment_name(1);
    let mut bytes = s.file(&name).unwrap();
    assert_eq!(bytes.len(), 4096, "created at its full size");
    let mut rec = Vec::new();
    format::encode_record(&mut rec, 9, &[7; 40]);
    let at = end.offset as usize;
    bytes[at..at + 20].copy_from_slice(&rec[..20]);
    s.set_file(&name, bytes);
    let (mut log, recovery, seen) = open_sim(&s, small()).unwrap();
    assert_eq!(seen.len(), 3);
    let t = recovery.truncated.clone().expect("truncated");
    assert_eq!((t.segment, t.offset, t.dropped_bytes), (1, end.offset, 20));
    // The zeros after it (the file's unwritten rest) fail the checksum.
    assert_eq!(t.reason, "checksum mismatch");
    assert!(
        t.to_string().contains("20 bytes at segment 1 offset"),
        "{t}"
    );
    let bytes = s.file(&name).unwrap();
    assert_eq!(bytes.len(), 4096);
    assert!(bytes[at..].iter().all(|&b| b == 0), "cut");
    let p = log.append(1, b"after").unwrap();
    log.commit().unwrap();
    assert_eq!(p, end);
    drop(log);
    // Garbage (bad checksum) at the end.
    let mut bytes = s.file(&name).unwrap();
    let good = end.offset + 9 + 5;
    let g = good as usize;
    bytes[g..g + 14].copy_from_slice(&[5, 0, 0, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]);
    s.set_file(&name, bytes);
    let (_, recovery, seen) = open_sim(&s, small()).unwrap();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].2, b"after");
    let t = recovery.truncated.expect("truncated");
    assert_eq!((t.offset, t.dropped_bytes), (good, 14));
    assert_eq!(t.reason, "checksum mismatch");
}

/// Damage in a segment other than the last, or in the last one further from its end than a
/// batch, is refused with its place.
#[test]
fn corruption_in_middle_segment_refused() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    let mut positions = Vec::new();
    for i in 0..60u32 {
        positions.push(log.append(1, &[i as u8; 200]).unwrap());
        if i % 5 == 4 {
            log.commit().unwrap();
        }
    }
    assert!(log.committed_end().segment >= 3);
    drop(log);
    let victim = positions.iter().find(|p| p.segment == 2).copied().unwrap();
    let name = segment_name(2);
    let mut bytes = s.file(&name).unwrap();
    bytes[victim.offset as usize + 20] ^= 0x40;
    s.set_file(&name, bytes);
    match open_sim(&s, small()) {
        Err(LogError::Corrupt {
            segment, offset, ..
        }) => assert_eq!((segment, offset), (2, victim.offset)),
        other => panic!("expected Corrupt, got {:?}", other.map(|r| r.1)),
    }
    // A bad header in a middle segment.
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    for i in 0..60u32 {
        log.append(1, &[i as u8; 200]).unwrap();
        log.commit().unwrap();
    }
    drop(log);
    let mut bytes = s.file(&segment_name(1)).unwrap();
    bytes[3] = b'X';
    s.set_file(&segment_name(1), bytes);
    assert!(matches!(
        open_sim(&s, small()).map(|r| r.1),
        Err(LogError::Corrupt {
            segment: 1,
            offset: 0,
            ..
        })
    ));
    // The last segment, damaged at its start while it is longer than a batch.
    let s = SimStorage::new();
    let opts = LogOptions {
        segment_bytes: 1 << 20,
        ..small()
    };
    let (mut log, _, _) = open_sim(&s, opts.clone()).unwrap();
    let first = log.append(1, &[1; 100]).unwrap();
    for _ in 0..40 {
        log.append(2, &[2; 100]).unwrap();
        log.commit().unwrap();
    }
    drop(log);
    let mut bytes = s.file(&segment_name(1)).unwrap();
    bytes[first.offset as usize + 30] ^= 1;
    s.set_file(&segment_name(1), bytes);
    match open_sim(&s, opts) {
        Err(LogError::Corrupt {
            segment: 1,
            offset,
            detail,
        }) => {
            assert_eq!(offset, first.offset);
            assert!(detail.contains("more than a batch"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|r| r.1)),
    }
    // The last records of a middle segment lost (zeros, as an unwritten tail reads): the
    // next segment's header says where its records ended.
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    let mut positions = Vec::new();
    for i in 0..60u32 {
        positions.push(log.append(1, &[i as u8 | 1; 200]).unwrap());
        log.commit().unwrap();
    }
    drop(log);
    let lost = positions.iter().rfind(|p| p.segment == 1).copied().unwrap();
    let mut bytes = s.file(&segment_name(1)).unwrap();
    bytes[lost.offset as usize..].fill(0);
    s.set_file(&segment_name(1), bytes);
    match open_sim(&s, small()) {
        Err(LogError::Corrupt {
            segment: 1,
            offset,
            detail,
        }) => {
            assert_eq!(offset, lost.offset);
            assert!(detail.contains("records lost"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|r| r.1)),
    }
    // A missing segment.
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    for i in 0..60u32 {
        log.append(1, &[i as u8; 200]).unwrap();
        log.commit().unwrap();
    }
    log.storage().delete_segment(2).unwrap();
    drop(log);
    assert!(matches!(
        open_sim(&s, small()).map(|r| r.1),
        Err(LogError::Corrupt { segment: 2, .. })
    ));
}

/// Records go to the next segment when the current one would pass `segment_bytes`; positions
/// stay readable, the listing has each segment's first and last record, reopen sees all.
#[test]
fn rollover_across_segments() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    let mut written = Vec::new();
    let mut rng = SimRng::new(7);
    for i in 0..200u32 {
        let b = payload(&mut rng, 300);
        let p = log.append((i % 7) as u8, &b).unwrap();
        written.push((p, (i % 7) as u8, b));
        if rng.below(3) == 0 {
            log.commit().unwrap();
        }
    }
    log.commit().unwrap();
    let segs = log.segments();
    assert!(segs.len() > 5, "{}", segs.len());
    for (i, info) in segs.iter().enumerate() {
        assert_eq!(info.segment, i as u64 + 1);
        assert!(info.bytes <= 4096, "{info:?}");
        let mine: Vec<_> = written
            .iter()
            .filter(|r| r.0.segment == info.segment)
            .collect();
        assert_eq!(info.first, mine.first().map(|r| r.0));
        assert_eq!(info.last, mine.last().map(|r| r.0));
    }
    for (p, k, b) in &written {
        assert_eq!(log.read(*p).unwrap(), (*k, b.clone()));
    }
    // A batch that crosses a segment boundary costs a write and a sync per segment, plus the
    // directory sync of the new one.
    // Room for one more record of 500 bytes (509 with its header), not two.
    let active = log.committed_end().segment;
    while log.committed_end().offset + 2 * 509 <= 4096 {
        log.append(0, &[0; 500]).unwrap();
        log.commit().unwrap();
    }
    let (w0, s0) = s.counts();
    let a = log.append(0, &[0; 500]).unwrap();
    let b = log.append(0, &[0; 500]).unwrap();
    assert_eq!((a.segment, b.segment), (active, active + 1));
    log.commit().unwrap();
    let (w1, s1) = s.counts();
    assert_eq!((w1 - w0, s1 - s0), (2, 3));
    drop(log);
    let (_, rec, seen) = open_sim(&s, small()).unwrap();
    assert_eq!(rec.truncated, None);
    assert_eq!(&seen[..written.len()], &written[..]);
}

/// Retention deletes whole segments below the given one, never the newest; their positions
/// are gone, the rest stay readable, and reopen starts at the oldest left.
#[test]
fn retention_deletes_whole_older_segments() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    let mut written = Vec::new();
    for i in 0..100u32 {
        written.push(log.append(1, &[i as u8; 150]).unwrap());
        log.commit().unwrap();
    }
    let last = log.committed_end().segment;
    assert!(last >= 4);
    assert_eq!(log.delete_segments_before(3).unwrap(), 2);
    assert_eq!(log.segments()[0].segment, 3);
    assert!(!s.names().contains(&segment_name(1)));
    assert!(!s.names().contains(&segment_name(2)));
    for p in &written {
        let r = log.read(*p);
        if p.segment < 3 {
            assert!(matches!(r, Err(LogError::NotFound { .. })), "{p}");
        } else {
            assert_eq!(
                r.unwrap().1,
                vec![written.iter().position(|q| q == p).unwrap() as u8; 150]
            );
        }
    }
    // Never the newest segment.
    assert_eq!(
        log.delete_segments_before(u64::MAX).unwrap() as u64,
        last - 3
    );
    assert_eq!(log.segments().len(), 1);
    assert_eq!(log.segments()[0].segment, last);
    log.append(2, b"x").unwrap();
    log.commit().unwrap();
    drop(log);
    s.crash(1);
    let (_, _, seen) = open_sim(&s, small()).unwrap();
    assert!(seen.iter().all(|r| r.0.segment == last));
    assert_eq!(seen.last().unwrap().2, b"x");
}

/// A checkpoint round-trips; a torn temporary file and a failed replace leave the old one.
#[test]
fn checkpoints_round_trip_and_torn_tmp_ignored() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    assert_eq!(log.read_checkpoint().unwrap(), None);
    log.append(1, b"a").unwrap();
    log.commit().unwrap();
    let upto = log.committed_end();
    log.write_checkpoint(b"tables v1", upto).unwrap();
    let want = Checkpoint {
        bytes: b"tables v1".to_vec(),
        upto,
    };
    assert_eq!(log.read_checkpoint().unwrap(), Some(want.clone()));
    // Past the committed end: refused.
    let past = Position {
        segment: upto.segment,
        offset: upto.offset + 1,
    };
    assert!(matches!(
        log.write_checkpoint(b"x", past),
        Err(LogError::Config(_))
    ));
    // Too large.
    assert!(matches!(
        log.write_checkpoint(&vec![0; (1 << 16) + 1], upto),
        Err(LogError::TooLarge { .. })
    ));
    // A torn temporary file next to it is never read.
    s.set_file("checkpoint.tmp", b"IMGWCKPT garbage".to_vec());
    assert_eq!(log.read_checkpoint().unwrap(), Some(want.clone()));
    // A replace whose sync fails, then a crash: the old checkpoint, whole.
    log.append(1, b"b").unwrap();
    log.commit().unwrap();
    s.fail_next_sync(EIO);
    assert!(log
        .write_checkpoint(b"tables v2", log.committed_end())
        .is_err());
    // The log itself goes on.
    log.append(1, b"c").unwrap();
    log.commit().unwrap();
    drop(log);
    s.crash(3);
    assert_eq!(
        Log::read_checkpoint_in(&s, &small()).unwrap(),
        Some(want.clone())
    );
    let (mut log, _, seen) = open_sim(&s, small()).unwrap();
    // Replay from the checkpoint: only the records after it.
    let after: Vec<_> = seen
        .iter()
        .filter(|r| r.0 >= want.upto)
        .map(|r| r.2.clone())
        .collect();
    assert_eq!(after, vec![b"b".to_vec(), b"c".to_vec()]);
    let end = log.committed_end();
    log.write_checkpoint(b"tables v3", end).unwrap();
    assert_eq!(log.read_checkpoint().unwrap().unwrap().bytes, b"tables v3");
    drop(log);
    // A damaged checkpoint is an error, not silently empty.
    let mut bytes = s.file("checkpoint").unwrap();
    bytes[40] ^= 1;
    s.set_file("checkpoint", bytes);
    assert!(matches!(
        Log::read_checkpoint_in(&s, &small()),
        Err(LogError::CorruptCheckpoint { .. })
    ));
}

/// A failed sync fails the commit and every later one (typed, convertible to a StoreError that
/// still says "storage full"); a reopen recovers everything acked.
#[test]
fn error_injection_stops_the_log() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    log.append(1, b"acked").unwrap();
    log.commit().unwrap();
    log.append(1, b"lost?").unwrap();
    s.fail_next_sync(ENOSPC);
    let e = log.commit().expect_err("sync fails");
    assert!(
        matches!(
            e,
            LogError::StorageFull {
                op: "sync segment",
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(
        log.append(1, b"more"),
        Err(LogError::Failed { .. })
    ));
    let e = log.commit().expect_err("refused");
    assert!(e.is_storage_full());
    // The store sees a full store (the client's `unavailable` with a longer retry hint).
    let store: crate::store::StoreError = e.into();
    match &store {
        crate::store::StoreError::Full(b) => {
            assert!(b
                .downcast_ref::<LogError>()
                .is_some_and(LogError::is_storage_full))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        crate::iocore::IoError::from(store),
        crate::iocore::IoError::StoreFull(_)
    ));
    drop(log);
    s.crash(11);
    let (mut log, _, seen) = open_sim(&s, small()).unwrap();
    assert_eq!(seen[0].2, b"acked");
    assert!(seen.len() <= 2);
    // A write error other than ENOSPC.
    log.append(1, b"x").unwrap();
    s.fail_next_write(EIO);
    assert!(matches!(
        log.commit(),
        Err(LogError::Io {
            op: "write segment",
            ..
        })
    ));
    assert!(matches!(
        log.commit(),
        Err(LogError::Failed {
            storage_full: false,
            ..
        })
    ));
    // A failure while creating the next segment: its directory sync (the third sync of a
    // commit that ends segment 1 and starts segment 2).
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    for i in 0..14 {
        log.append(1, &[1; 200]).unwrap();
        if i % 7 == 6 {
            log.commit().unwrap();
        }
    }
    let batch: Vec<Position> = (0..6).map(|_| log.append(1, &[1; 200]).unwrap()).collect();
    assert_eq!(batch[4].segment, 1);
    assert_eq!(
        batch[5],
        Position {
            segment: 2,
            offset: format::SEGMENT_HEADER_BYTES
        }
    );
    s.fail_sync_after(2, EIO);
    let e = log.commit().expect_err("injected");
    assert!(
        matches!(
            e,
            LogError::Io {
                op: "sync directory",
                ..
            }
        ),
        "{e}"
    );
    drop(log);
    s.crash(5);
    let (_, _, seen) = open_sim(&s, small()).unwrap();
    // Segment 1's part was synced; segment 2 may or may not have survived.
    assert!((19..=20).contains(&seen.len()), "{}", seen.len());
}

/// Typed refusals of the bounds, and of another format version.
#[test]
fn bounds_and_format_version() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    assert!(matches!(
        log.append(1, &[0; 601]),
        Err(LogError::TooLarge {
            bytes: 601,
            max: 600
        })
    ));
    let mut n = 0;
    let e = loop {
        match log.append(1, &[0; 500]) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(n, 4);
    assert!(matches!(e, LogError::BatchFull { max: 2048, .. }), "{e}");
    log.commit().unwrap();
    log.append(1, &[0; 500]).unwrap();
    log.commit().unwrap();
    drop(log);
    assert!(matches!(
        Log::open(
            s.clone(),
            LogOptions {
                segment_bytes: 100,
                ..small()
            },
            |_, _, _| Ok::<(), LogError>(())
        )
        .map(|r| r.1),
        Err(LogError::Config(_))
    ));
    let store: crate::store::StoreError = LogError::Format {
        found: 2,
        expected: 1,
    }
    .into();
    assert!(matches!(
        store,
        crate::store::StoreError::Format {
            found: 2,
            expected: 1
        }
    ));
    // Version 2 in a header with a valid checksum.
    let name = segment_name(1);
    let mut bytes = s.file(&name).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..28]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    s.set_file(&name, bytes);
    assert!(matches!(
        open_sim(&s, small()).map(|r| r.1),
        Err(LogError::Format {
            found: 2,
            expected: 1
        })
    ));
}

/// The same on real files: rollover, a checkpoint, a torn tail written by hand, reopen.
#[test]
fn fs_storage_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small();
    let fs = FsStorage::open(dir.path().join("log")).unwrap();
    let mut seen = Vec::new();
    let (mut log, rec) =
        Log::open(fs.clone(), opts.clone(), |_, _, _| Ok::<(), LogError>(())).unwrap();
    assert_eq!(rec.records, 0);
    let mut written = Vec::new();
    for i in 0..50u32 {
        let b = vec![i as u8; 100 + i as usize];
        written.push((log.append(3, &b).unwrap(), 3u8, b));
        if i % 4 == 3 {
            log.commit().unwrap();
        }
    }
    log.commit().unwrap();
    assert!(log.segments().len() >= 2);
    let end = log.committed_end();
    log.write_checkpoint(b"snap", end).unwrap();
    for (p, k, b) in &written {
        assert_eq!(log.read(*p).unwrap(), (*k, b.clone()));
    }
    drop(log);
    let path = fs.dir().join(format!("{:020}.seg", end.segment));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9, 0, 0, 0, 1], end.offset).unwrap();
    drop(f);
    let (log, rec) = Log::open(fs.clone(), opts.clone(), |p, k, b: &[u8]| {
        seen.push((p, k, b.to_vec()));
        Ok::<(), LogError>(())
    })
    .unwrap();
    assert_eq!(seen, written);
    let t = rec.truncated.expect("torn tail");
    assert_eq!(
        (t.segment, t.offset, t.dropped_bytes),
        (end.segment, end.offset, 5)
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes[end.offset as usize..].iter().all(|&b| b == 0));
    assert_eq!(
        log.read_checkpoint().unwrap(),
        Some(Checkpoint {
            bytes: b"snap".to_vec(),
            upto: end
        })
    );
    // The visitor's error stops the open.
    drop(log);
    let r = Log::open(fs, opts, |_, _, _| {
        Err::<(), _>(LogError::Config("stop".into()))
    });
    assert!(matches!(r.map(|r| r.1), Err(LogError::Config(s)) if s == "stop"));
}

/// Reads check the checksum and the bounds: a damaged record, a position inside a record, one
/// past the committed end.
#[test]
fn read_checks_checksum_and_bounds() {
    let s = SimStorage::new();
    let (mut log, _, _) = open_sim(&s, small()).unwrap();
    let small_rec = log.append(1, &[1; 10]).unwrap();
    let big_rec = log.append(2, &[2; 590]).unwrap();
    log.commit().unwrap();
    assert_eq!(log.read(small_rec).unwrap(), (1, vec![1; 10]));
    assert_eq!(log.read(big_rec).unwrap(), (2, vec![2; 590]));
    let pending = log.append(3, b"pending").unwrap();
    assert!(matches!(log.read(pending), Err(LogError::NotFound { .. })));
    let inside = Position {
        segment: 1,
        offset: small_rec.offset + 3,
    };
    assert!(matches!(log.read(inside), Err(LogError::Corrupt { .. })));
    let name = segment_name(1);
    let mut bytes = s.file(&name).unwrap();
    bytes[big_rec.offset as usize + 580] ^= 1;
    s.set_file(&name, bytes);
    match log.read(big_rec) {
        Err(LogError::Corrupt {
            segment,
            offset,
            detail,
        }) => {
            assert_eq!((segment, offset), (1, big_rec.offset));
            assert_eq!(detail, "checksum mismatch");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(log.read(small_rec).unwrap(), (1, vec![1; 10]));
}
