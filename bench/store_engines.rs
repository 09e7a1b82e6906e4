//! Embedded-engine comparison for the durable store (docs/STORE.md).
//!
//! Workload: append 150-byte messages to the inboxes of 10,000 users (picked pseudo-randomly),
//! in batches of 1, 64 and 512 messages per durable commit (one fsync-class sync per commit),
//! each message writing its inbox row and its dedupe row, then reading back ranges of single
//! inboxes. Each engine runs the same key/value bytes (big-endian composite keys, as the store
//! lays them out). Candidates: redb, fjall, SQLite (rusqlite, bundled).
//!
//! ```text
//! cargo run --release --features store-bench --example store_engines -- [--dir DIR] [--quick] [ENGINE[:BATCH]...]
//! ```
//! DIR must be on a real disk (not tmpfs), or fsync costs nothing. `--quick` divides the
//! message counts by 10. ENGINE is `redb`, `fjall` or `sqlite`; `:BATCH` runs one batch size
//! (for `strace -f -c` counts of the sync calls per commit).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const USERS: u32 = 10_000;
const BODY: usize = 150;
const READS: u32 = 2_000;
const READ_LIMIT: u32 = 100;
/// Page/block cache given to every engine (SQLite: `cache_size=-65536`).
const CACHE: usize = 64 << 20;

/// The three candidates behind one small interface.
trait Engine {
    fn commit(&mut self, inbox: &[(Vec<u8>, Vec<u8>)], dedupe: &[(Vec<u8>, Vec<u8>)]);
    /// Returns the number of rows in `[from, to)`, at most `limit`, reading keys and values.
    fn range(&mut self, from: &[u8], to: &[u8], limit: u32) -> usize;
}

struct Redb {
    db: redb::Database,
}

const INBOX: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("inbox");
const DEDUPE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("dedupe");

impl Redb {
    fn open(dir: &Path) -> Self {
        let db = redb::Database::builder()
            .set_cache_size(CACHE)
            .create(dir.join("store.redb"))
            .expect("redb open");
        Redb { db }
    }
}

impl Engine for Redb {
    fn commit(&mut self, inbox: &[(Vec<u8>, Vec<u8>)], dedupe: &[(Vec<u8>, Vec<u8>)]) {
        let tx = self.db.begin_write().expect("begin");
        {
            let mut t = tx.open_table(INBOX).expect("table");
            for (k, v) in inbox {
                t.insert(k.as_slice(), v.as_slice()).expect("insert");
            }
            let mut d = tx.open_table(DEDUPE).expect("table");
            for (k, v) in dedupe {
                d.insert(k.as_slice(), v.as_slice()).expect("insert");
            }
        }
        tx.commit().expect("commit"); // Durability::Immediate is the default.
    }

    fn range(&mut self, from: &[u8], to: &[u8], limit: u32) -> usize {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().expect("read");
        let t = tx.open_table(INBOX).expect("table");
        let mut n = 0;
        for row in t.range(from..to).expect("range").take(limit as usize) {
            let (k, v) = row.expect("row");
            n += usize::from(!k.value().is_empty() && !v.value().is_empty());
        }
        n
    }
}

struct Fjall {
    db: fjall::Database,
    inbox: fjall::Keyspace,
    dedupe: fjall::Keyspace,
}

impl Fjall {
    fn open(dir: &Path) -> Self {
        let db = fjall::Database::builder(dir.join("fjall"))
            .cache_size(CACHE as u64)
            .open()
            .expect("fjall open");
        let inbox = db
            .keyspace("inbox", fjall::KeyspaceCreateOptions::default)
            .expect("ks");
        let dedupe = db
            .keyspace("dedupe", fjall::KeyspaceCreateOptions::default)
            .expect("ks");
        Fjall { db, inbox, dedupe }
    }
}

impl Engine for Fjall {
    fn commit(&mut self, inbox: &[(Vec<u8>, Vec<u8>)], dedupe: &[(Vec<u8>, Vec<u8>)]) {
        let mut b = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for (k, v) in inbox {
            b.insert(&self.inbox, k.as_slice(), v.as_slice());
        }
        for (k, v) in dedupe {
            b.insert(&self.dedupe, k.as_slice(), v.as_slice());
        }
        b.commit().expect("commit");
    }

    fn range(&mut self, from: &[u8], to: &[u8], limit: u32) -> usize {
        let mut n = 0;
        for g in self.inbox.range(from..to).take(limit as usize) {
            let (k, v) = g.into_inner().expect("row");
            n += usize::from(!k.is_empty() && !v.is_empty());
        }
        n
    }
}

struct Sqlite {
    conn: rusqlite::Connection,
}

impl Sqlite {
    fn open(dir: &Path) -> Self {
        let conn = rusqlite::Connection::open(dir.join("store.sqlite")).expect("sqlite open");
        // WAL + synchronous=FULL: every COMMIT fsyncs the WAL (NORMAL would not be durable).
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-65536;
             CREATE TABLE IF NOT EXISTS inbox(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS dedupe(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .expect("schema");
        Sqlite { conn }
    }
}

impl Engine for Sqlite {
    fn commit(&mut self, inbox: &[(Vec<u8>, Vec<u8>)], dedupe: &[(Vec<u8>, Vec<u8>)]) {
        let tx = self.conn.transaction().expect("begin");
        {
            let mut i = tx
                .prepare_cached("INSERT INTO inbox(k, v) VALUES (?1, ?2)")
                .expect("prepare");
            for (k, v) in inbox {
                i.execute((k, v)).expect("insert");
            }
            let mut d = tx
                .prepare_cached("INSERT OR REPLACE INTO dedupe(k, v) VALUES (?1, ?2)")
                .expect("prepare");
            for (k, v) in dedupe {
                d.execute((k, v)).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }

    fn range(&mut self, from: &[u8], to: &[u8], limit: u32) -> usize {
        let mut s = self
            .conn
            .prepare_cached("SELECT k, v FROM inbox WHERE k >= ?1 AND k < ?2 ORDER BY k LIMIT ?3")
            .expect("prepare");
        let mut rows = s.query((from, to, limit)).expect("query");
        let mut n = 0;
        while let Some(r) = rows.next().expect("row") {
            let k: &[u8] = r.get_ref(0).expect("k").as_blob().expect("blob");
            let v: &[u8] = r.get_ref(1).expect("v").as_blob().expect("blob");
            n += usize::from(!k.is_empty() && !v.is_empty());
        }
        n
    }
}

/// xorshift64*: deterministic, so every engine sees the same users and bodies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn push_str(k: &mut Vec<u8>, s: &str) {
    k.push(s.len() as u8);
    k.extend_from_slice(s.as_bytes());
}

/// `[len tenant][len user]`: the inbox prefix of one user.
fn user_prefix(user: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    push_str(&mut k, "t1");
    push_str(&mut k, &format!("u{user:05}"));
    k
}

/// A value of the size the store writes: ~40 bytes of envelope around a 150-byte body of
/// printable text (LZ4 in fjall gains little on it, as on real chat text).
fn message_value(rng: &mut Rng, mid: u64, sender: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(BODY + 48);
    v.extend_from_slice(&mid.to_be_bytes());
    v.extend_from_slice(&1_700_000_000_000u64.wrapping_add(mid).to_be_bytes());
    push_str(&mut v, &format!("u{sender:05}"));
    push_str(&mut v, "text");
    for _ in 0..BODY / 8 + 1 {
        let r = rng.next();
        for b in r.to_le_bytes() {
            if v.len() < BODY + 32 {
                v.push(b' ' + (b % 94));
            }
        }
    }
    v
}

/// CPU seconds (user + system) of this process so far, all threads (fjall's workers too).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of proc(5) (utime, stime) are 11 and 12 after the state field; USER_HZ = 100.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

struct RunResult {
    cpu: f64,
    commits: usize,
    msgs: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

fn run_appends(
    engine: &mut dyn Engine,
    batch: usize,
    commits: usize,
    seqs: &mut [u64],
) -> RunResult {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ batch as u64);
    let mut mid = 0u64;
    let mut lat = Vec::with_capacity(commits);
    let cpu0 = cpu_secs();
    let start = Instant::now();
    for _ in 0..commits {
        // Building the rows is part of the cost the store pays too (it is small).
        let mut inbox = Vec::with_capacity(batch);
        let mut dedupe = Vec::with_capacity(batch);
        for _ in 0..batch {
            let user = (rng.next() % u64::from(USERS)) as u32;
            let sender = (rng.next() % u64::from(USERS)) as u32;
            mid += 1;
            seqs[user as usize] += 1;
            let mut k = user_prefix(user);
            k.extend_from_slice(&seqs[user as usize].to_be_bytes());
            inbox.push((k.clone(), message_value(&mut rng, mid, sender)));
            let mut dk = Vec::with_capacity(32);
            push_str(&mut dk, "t1");
            push_str(&mut dk, &format!("u{sender:05}"));
            push_str(&mut dk, &format!("c{mid:016x}"));
            let mut dv = k;
            dv.extend_from_slice(&mid.to_be_bytes());
            dedupe.push((dk, dv));
        }
        let t = Instant::now();
        engine.commit(&inbox, &dedupe);
        lat.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    let cpu = cpu_secs() - cpu0;
    lat.sort();
    RunResult {
        cpu,
        commits,
        msgs: commits * batch,
        elapsed,
        p50: lat[lat.len() / 2],
        p99: lat[lat.len() * 99 / 100],
    }
}

fn run_reads(engine: &mut dyn Engine) -> (f64, f64) {
    let mut rng = Rng(42);
    let start = Instant::now();
    let mut rows = 0usize;
    for _ in 0..READS {
        let user = (rng.next() % u64::from(USERS)) as u32;
        // The shape of a sync: `inbox_seq > after`, ascending, at most READ_LIMIT rows.
        let after = 0u64;
        let mut from = user_prefix(user);
        from.extend_from_slice(&(after + 1).to_be_bytes());
        let mut to = user_prefix(user);
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        rows += engine.range(&from, &to, READ_LIMIT);
    }
    let secs = start.elapsed().as_secs_f64();
    (f64::from(READS) / secs, rows as f64 / f64::from(READS))
}

/// Bytes allocated on disk (blocks, not apparent length: preallocated and sparse files count
/// for what they use).
fn dir_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                total += dir_bytes(&e.path());
            } else {
                total += md.blocks() * 512;
            }
        }
    }
    total
}

fn open(name: &str, dir: &Path) -> Box<dyn Engine> {
    match name {
        "redb" => Box::new(Redb::open(dir)),
        "fjall" => Box::new(Fjall::open(dir)),
        "sqlite" => Box::new(Sqlite::open(dir)),
        other => panic!("unknown engine {other}"),
    }
}

/// Child process: append 20 more batches of 512 to an existing store, then exit without
/// closing it (what SIGKILL leaves behind, as far as the engine can tell).
fn dirty_child(engine: &str, dir: &Path) -> ! {
    let mut e = open(engine, dir);
    // Sequence numbers far above the parent's, so no key collides.
    let mut seqs = vec![1_000_000u64; USERS as usize];
    run_appends(e.as_mut(), 512, 20, &mut seqs);
    std::mem::forget(e);
    std::process::exit(0);
}

struct Cell {
    msgs_s: f64,
    cpu_us: f64,
    commits_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    disk: f64,
    reads_s: f64,
    rows: f64,
    reopen_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut base = std::env::temp_dir().join("imgw-store-bench");
    let mut scale = 1usize;
    let mut runs = 3usize;
    let mut jobs: Vec<(String, Option<usize>)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => base = PathBuf::from(args.next().expect("--dir DIR")),
            "--quick" => scale = 10,
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            "--dirty-child" => {
                let engine = args.next().expect("engine");
                let dir = PathBuf::from(args.next().expect("dir"));
                dirty_child(&engine, &dir);
            }
            spec => {
                let (e, b) = match spec.split_once(':') {
                    Some((e, b)) => (e, Some(b.parse().expect("batch size"))),
                    None => (spec, None),
                };
                jobs.push((e.to_string(), b));
            }
        }
    }
    if jobs.is_empty() {
        jobs = ["redb", "fjall", "sqlite"]
            .iter()
            .map(|e| (e.to_string(), None))
            .collect();
    }
    // Commits per batch size: enough for a steady state, bounded in time on a slow disk.
    // 4096 is past the brief's sizes: the batch a loaded I/O core reaches (SPEC 10 asks 200k/s).
    let plan = [(1usize, 2_000usize), (64, 1_000), (512, 400), (4096, 50)];
    let mut cells: Vec<(String, usize, usize, Vec<Cell>)> = Vec::new();
    for run in 0..runs {
        for (engine, only) in &jobs {
            for &(batch, commits) in &plan {
                if only.is_some_and(|b| b != batch) {
                    continue;
                }
                let dir = base.join(format!("{engine}-{batch}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("mkdir");
                let mut seqs = vec![0u64; USERS as usize];
                let mut e = open(engine, &dir);
                let r = run_appends(e.as_mut(), batch, (commits / scale).max(10), &mut seqs);
                let (reads_s, rows) = if batch == 512 {
                    run_reads(e.as_mut())
                } else {
                    (0.0, 0.0)
                };
                drop(e);
                let disk = dir_bytes(&dir) as f64;
                let mut reopen_ms = 0.0;
                if batch == 512 {
                    let st = std::process::Command::new(std::env::current_exe().expect("exe"))
                        .arg("--dirty-child")
                        .arg(engine)
                        .arg(&dir)
                        .status()
                        .expect("spawn");
                    assert!(st.success(), "dirty child failed");
                    let t = Instant::now();
                    let mut e = open(engine, &dir);
                    assert!(e.range(&user_prefix(1), &user_prefix(2), 1) <= 1);
                    reopen_ms = t.elapsed().as_secs_f64() * 1e3;
                }
                let secs = r.elapsed.as_secs_f64();
                let cell = Cell {
                    msgs_s: r.msgs as f64 / secs,
                    cpu_us: r.cpu * 1e6 / r.msgs as f64,
                    commits_s: r.commits as f64 / secs,
                    p50_ms: r.p50.as_secs_f64() * 1e3,
                    p99_ms: r.p99.as_secs_f64() * 1e3,
                    disk,
                    reads_s,
                    rows,
                    reopen_ms,
                };
                eprintln!(
                    "run {run}: {engine} batch {batch}: {:.0} msgs/s, {:.1} commits/s",
                    cell.msgs_s, cell.commits_s
                );
                match cells.iter_mut().find(|c| c.0 == *engine && c.1 == batch) {
                    Some(c) => c.3.push(cell),
                    None => cells.push((engine.clone(), batch, r.msgs, vec![cell])),
                }
            }
        }
    }
    println!("medians of {runs} runs; every commit durable (fsync class); disk = allocated bytes after close");
    println!(
        "engine  batch     msgs   msgs/s  cpu_us/msg  commits/s  p50_ms  p99_ms  disk_MiB  B/msg  ranges/s  rows/range  reopen_ms"
    );
    for (engine, batch, msgs, v) in &cells {
        let m = |f: fn(&Cell) -> f64| median(v.iter().map(f).collect());
        let disk = m(|c| c.disk);
        let (reads, reopen) = if *batch == 512 {
            (
                format!("{:>9.0} {:>11.1}", m(|c| c.reads_s), m(|c| c.rows)),
                format!("{:>10.1}", m(|c| c.reopen_ms)),
            )
        } else {
            (format!("{:>9} {:>11}", "-", "-"), format!("{:>10}", "-"))
        };
        println!(
            "{engine:<7} {batch:>5} {msgs:>8} {:>8.0} {:>11.1} {:>10.1} {:>7.2} {:>7.2} {:>9.1} {:>6.0} {reads} {reopen}",
            m(|c| c.msgs_s),
            m(|c| c.cpu_us),
            m(|c| c.commits_s),
            m(|c| c.p50_ms),
            m(|c| c.p99_ms),
            disk / (1024.0 * 1024.0),
            disk / *msgs as f64,
        );
    }
}
