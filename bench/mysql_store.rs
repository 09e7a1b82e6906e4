//! The MySQL store alone: appends per second through `MySqlStore::apply` against MariaDB with
//! 1, 2 and 4 concurrent transactions per batch (`mysql.writers`), without the gateway or a
//! load generator on the machine's cores (docs/STORE.md, "MySQL backend: measured").
//!
//! ```text
//! tests/services.sh start
//! cargo run --release --example mysql_store -- [SECONDS] [BATCH] [WRITERS...]
//! ```
//! Defaults: 5 s per point, batches of 1,024 appends, writers 1 2 4. Each point runs on a
//! fresh database `imgw_bench_store` of the server `IMGW_MYSQL_URL` names (the one
//! tests/services.sh starts by default): 150-byte bodies to 10,000 users picked
//! pseudo-randomly, one cmid per message, the default store options (dedupe on). Prints per
//! point: appends/s, batch commit p50 / p99 ms, and the CPU of mariadbd (from /proc) and of
//! this process per append.

use std::time::{Duration, Instant};

use imgw::protocol::{Deliver, Ext};
use imgw::store::{mysql_testdb, Backend, MySqlOptions, MySqlStore, Op, StoreOptions, UserRef};

const USERS: u64 = 10_000;
const BODY: usize = 150;
const DB: &str = "imgw_bench_store";

/// utime + stime of a process in clock ticks (0 when it cannot be read).
fn ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12) // fields 14 and 15 of the whole line
}

fn mariadb_pid() -> Option<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-o", "-x", "mariadbd"])
        .output()
        .ok()?;
    let pid = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!pid.is_empty()).then_some(pid)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn point(
    url: String,
    seconds: u64,
    batch: usize,
    writers: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut store = MySqlStore::connect(MySqlOptions {
        url,
        pool_min: writers,
        pool_max: writers,
        connect_timeout_ms: 5_000,
        query_timeout_ms: 30_000,
        stmt_cache: 64,
        writers,
        writer_min_ops: 1,
        store: StoreOptions::default(),
    })
    .await?;
    let body = "x".repeat(BODY);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_user = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % USERS
    };
    let maria = mariadb_pid();
    let me = std::process::id().to_string();
    let (m0, c0) = (maria.as_deref().map_or(0, ticks), ticks(&me));
    let started = Instant::now();
    let mut commits = Vec::new();
    let mut appended = 0u64;
    let mut mid = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let ops: Vec<Op> = (0..batch)
            .map(|_| {
                mid += 1;
                let to = next_user();
                Op::AppendInbox {
                    user: UserRef::new("bench", format!("u{to:05}")),
                    sender: "s".into(),
                    cmid: format!("c{mid}").into(),
                    deliver: Deliver {
                        mid,
                        from: "s".into(),
                        to: None,
                        inbox_seq: 0,
                        ts: now_ms,
                        kind: None,
                        body: body.as_str().into(),
                        ext: Ext::new(),
                    },
                }
            })
            .collect();
        let t = Instant::now();
        let results = store.apply(ops, now_ms).await?;
        commits.push(t.elapsed());
        appended += results.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    let (m1, c1) = (maria.as_deref().map_or(0, ticks), ticks(&me));
    let hz = 100.0; // CLK_TCK on Linux
    let per = |t: u64| t as f64 * 1e6 / hz / appended.max(1) as f64;
    commits.sort();
    println!(
        "| {writers} | {batch} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} |",
        appended as f64 / secs,
        percentile(&commits, 0.5),
        percentile(&commits, 0.99),
        per(m1.saturating_sub(m0)),
        per(c1.saturating_sub(c0)),
    );
    store.disconnect().await;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let batch = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_024);
    let mut writers: Vec<usize> = args.iter().skip(2).filter_map(|s| s.parse().ok()).collect();
    if writers.is_empty() {
        writers = vec![1, 2, 4];
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("| writers | batch | appends/s | commit p50 ms | commit p99 ms | MariaDB CPU µs/append | client CPU µs/append |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for w in writers {
        let url = mysql_testdb::fresh(DB)?;
        rt.block_on(point(url, seconds, batch, w))?;
        mysql_testdb::drop_database(DB)?;
    }
    Ok(())
}
