//! The coordinator: the process the user starts. It spawns the worker processes (the same
//! binary, `loadgen worker`), hands each its [`Plan`], merges their per-second ticks into the
//! live progress line and the time series, starts the measured run on every worker at once
//! (`go` once all of them are connected), merges their final histograms and counters, and
//! writes the summary, `--json`, `--hgrm` and `--svg`.
//!
//! Every wait is bounded: a worker that has not finished by the end of the setup timeout, the
//! run, the grace period and a margin is killed (by its own pid) and reported.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use imgw::client::Transport;

use crate::chaos::{Chaos, Ports};
use crate::config::{Options, Plan};
use crate::report::{Progress, Report, SeriesPoint, SetupPoint};
use crate::stats::{Final, Merger, ServerLimits, Stage, Tick, WorkerLine};

/// Extra time allowed beyond the planned phases before workers are killed.
const MARGIN: Duration = Duration::from_secs(30);

#[allow(clippy::large_enum_variant)] // a few lines per second
enum Event {
    Line(usize, WorkerLine),
    Garbage(usize, String),
    Eof(usize),
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    ready: bool,
    done: bool,
}

/// Runs the whole load test; the exit code is the verdict.
pub fn run(o: &Options) -> ExitCode {
    let mut o = o.clone();
    let mut chaos = match o.chaos.clone() {
        Some(c) => match Chaos::new(c, o.duration) {
            Ok((chaos, ports)) => {
                if let Some(p) = ports {
                    aim_at(&mut o, &p);
                }
                Some(chaos)
            }
            Err(e) => {
                eprintln!("loadgen chaos: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let o = &o;
    let started = Instant::now();
    let mut progress = Progress::new(o.quiet, o.scenario.sends());
    let plans = o.plans();
    let rss_before = o.server_pid.map(rss_kib);
    let cpu_before = o.server_pid.map_or(0.0, cpu_secs);
    let mut rss_connected = 0;
    let mut cpu_at_go = 0.0;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut workers = Vec::new();
    for plan in &plans {
        match spawn(plan, workers.len(), tx.clone()) {
            Ok(w) => workers.push(w),
            Err(e) => {
                progress.say(&format!(
                    "loadgen: cannot start worker {}: {e}",
                    plan.worker
                ));
                for w in &mut workers {
                    stop(w);
                }
                return ExitCode::from(1);
            }
        }
    }
    drop(tx);
    if let Some(c) = &chaos {
        progress.say(&c.describe());
    }
    let more = match o.targets.len() {
        0 | 1 => String::new(),
        n => format!(" and {} more target(s)", n - 1),
    };
    progress.say(&format!(
        "loadgen {}: {} connections to {}{more} ({} {}), {} worker(s) x {} thread(s)",
        o.scenario.name(),
        o.conns,
        o.target.url,
        o.target.transport.name(),
        o.codec.name(),
        plans.len(),
        o.threads
    ));

    // Ctrl-C: end the run early and still report; a second Ctrl-C exits at once.
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ =
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&interrupted));
        let _ = signal_hook::flag::register(sig, Arc::clone(&interrupted));
    }
    let mut stop_sent = false;
    let mut go_at = None;
    let mut stop_at = None;
    let deadline = started + o.setup_timeout + o.connect_timeout + o.duration + o.grace + MARGIN;
    let n = workers.len();
    let mut merger = Merger::new(n);
    let mut series = Vec::new();
    let mut setup_series = Vec::new();
    let mut problems = Vec::new();
    let mut connected = 0;
    let mut server = ServerLimits::default();
    let mut total = Final::default();
    let mut finished = 0;
    let mut go_sent = false;
    while finished < n {
        if let Some(c) = chaos.as_mut() {
            let mut storm = || {
                for w in &mut workers {
                    if let Some(stdin) = w.stdin.as_mut() {
                        let _ = stdin.write_all(b"storm\n").and_then(|_| stdin.flush());
                    }
                }
            };
            if let Some(line) = c.step(Instant::now(), &mut storm) {
                progress.say(&line);
            }
        }
        if !stop_sent && interrupted.load(Ordering::SeqCst) {
            stop_sent = true;
            stop_at = Some(Instant::now());
            progress.say("interrupted: ending the run and reporting (again to quit at once)");
            problems.push("interrupted by the user".into());
            for w in &mut workers {
                if let Some(stdin) = w.stdin.as_mut() {
                    let _ = stdin.write_all(b"stop\n").and_then(|_| stdin.flush());
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            problems.push(format!(
                "{} worker(s) did not finish in time and were stopped",
                n - finished
            ));
            break;
        }
        let event = match rx.recv_timeout((deadline - now).min(Duration::from_millis(200))) {
            Ok(e) => e,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut merged = Vec::new();
        match event {
            Event::Line(w, WorkerLine::Tick(t)) => merged = merger.push(w, t),
            Event::Line(
                w,
                WorkerLine::Ready {
                    connected: c,
                    server: s,
                },
            ) => {
                workers[w].ready = true;
                connected += c;
                if server == ServerLimits::default() {
                    server = s;
                }
            }
            Event::Line(w, WorkerLine::Final(f)) => {
                total.absorb(&f);
                workers[w].done = true;
                finished += 1;
                merged = merger.finish(w);
            }
            Event::Line(w, WorkerLine::Fatal { message }) => {
                problems.push(format!("worker {w}: {message}"));
            }
            Event::Garbage(w, line) => {
                problems.push(format!("worker {w} wrote an unreadable line: {line}"));
            }
            Event::Eof(w) => {
                if !workers[w].done {
                    workers[w].done = true;
                    finished += 1;
                    problems.push(format!("worker {w} exited without its final report"));
                    merged = merger.finish(w);
                }
            }
        }
        for t in merged {
            record(&t, &mut series, &mut setup_series);
            progress.tick(&t);
        }
        // Start the measured run once every live worker is connected.
        if !go_sent && workers.iter().all(|w| w.ready || w.done) {
            go_sent = true;
            if connected == 0 {
                problems.push("no connection could be opened: nothing to run".into());
                for w in &mut workers {
                    // End of stdin: the workers stop and report at once.
                    drop(w.stdin.take());
                }
                continue;
            }
            warn_rate(o, server, connected, &mut progress);
            progress.say(&format!(
                "{connected} of {} connections up after {:.1} s; running {} for {:.1} s",
                o.conns,
                started.elapsed().as_secs_f64(),
                o.scenario.name(),
                o.duration.as_secs_f64()
            ));
            go_at = Some(Instant::now());
            if let Some(c) = chaos.as_mut() {
                c.go(Instant::now());
            }
            if let Some(pid) = o.server_pid {
                rss_connected = rss_kib(pid);
                cpu_at_go = cpu_secs(pid);
            }
            for w in &mut workers {
                if let Some(stdin) = w.stdin.as_mut() {
                    let _ = stdin.write_all(b"go\n").and_then(|_| stdin.flush());
                }
            }
        }
    }
    let cpu_run = o
        .server_pid
        .filter(|_| go_at.is_some())
        .map(|pid| (cpu_secs(pid) - cpu_at_go).max(0.0));
    for t in merger.flush() {
        record(&t, &mut series, &mut setup_series);
        progress.tick(&t);
    }
    progress.end();
    for w in &mut workers {
        stop(w);
    }
    let wall = started.elapsed().as_secs_f64();
    // The measured run's length: shorter than asked when interrupted.
    let run_s = match (go_at, stop_at) {
        (Some(go), Some(stop)) => stop.saturating_duration_since(go).min(o.duration),
        (Some(_), None) => o.duration,
        _ => Duration::ZERO,
    }
    .as_secs_f64();
    let mut report = Report::new(o, &total, series, setup_series, problems, wall, run_s);
    if let (Some(pid), Some(before)) = (o.server_pid, rss_before) {
        let cpu = cpu_run.unwrap_or(0.0);
        let delivered = total.tally.delivered;
        report.server_proc = Some(crate::report::ServerProc {
            pid,
            rss_before_kib: before,
            rss_connected_kib: rss_connected,
            rss_per_conn_bytes: if total.connected > 0 {
                (rss_connected as f64 - before as f64) * 1024.0 / total.connected as f64
            } else {
                0.0
            },
            cpu_run_s: cpu,
            cpu_per_delivery_us: if delivered > 0 {
                cpu * 1e6 / delivered as f64
            } else {
                0.0
            },
            cpu_setup_s: (cpu_at_go - cpu_before).max(0.0),
            cpu_per_connect_us: if total.connected > 0 {
                (cpu_at_go - cpu_before).max(0.0) * 1e6 / total.connected as f64
            } else {
                0.0
            },
        });
    }
    if let Some(c) = &chaos {
        let t = &total.tally;
        report.problems.extend(c.problems.iter().cloned());
        let pass = t.lost + t.duplicates + t.out_of_order + t.unknown == 0
            && report.problems.is_empty()
            && t.acked > 0;
        report.pass &= pass;
        report.chaos = Some(crate::report::ChaosVerdict {
            seed: c.seed(),
            faults: c.counts.clone(),
            line: c.summary(t),
            pass,
        });
    }
    print!("{}", report.summary());
    let mut ok = report.pass;
    if let Err(e) = write_outputs(o, &report, &total) {
        eprintln!("loadgen: {e}");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Chaos with `--serve`: targets with port 0 are the gateway's listeners as bound.
fn aim_at(o: &mut Options, p: &Ports) {
    for t in &mut o.targets {
        if t.addr.port() != 0 {
            continue;
        }
        match t.transport {
            Transport::Ws => {
                t.addr = p.ws;
                t.url = format!("ws://{}{}", p.ws, t.ws_path);
            }
            Transport::Tcp => {
                t.addr = p.tcp;
                t.url = format!("tcp://{}", p.tcp);
            }
        }
    }
    if let Some(first) = o.targets.first() {
        o.target = first.clone();
    }
}

fn spawn(plan: &Plan, index: usize, tx: mpsc::Sender<Event>) -> Result<Worker, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take();
    let line = serde_json::to_string(plan).map_err(|e| e.to_string())?;
    if let Some(s) = stdin.as_mut() {
        s.write_all(line.as_bytes())
            .and_then(|_| s.write_all(b"\n"))
            .and_then(|_| s.flush())
            .map_err(|e| format!("sending the plan: {e}"))?;
    }
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    std::thread::Builder::new()
        .name(format!("loadgen-read{index}"))
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let ev = match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(l) => Event::Line(index, l),
                    Err(_) => Event::Garbage(index, line.chars().take(200).collect()),
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Eof(index));
        })
        .map_err(|e| e.to_string())?;
    Ok(Worker {
        child,
        stdin,
        ready: false,
        done: false,
    })
}

/// Closes the worker's stdin (it stops if still running), waits a little, then kills it.
fn stop(w: &mut Worker) {
    drop(w.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match w.child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => break,
        }
    }
    let _ = w.child.kill();
    let _ = w.child.wait();
}

fn record(t: &Tick, series: &mut Vec<SeriesPoint>, setup: &mut Vec<SetupPoint>) {
    match t.stage.unwrap_or(Stage::Setup) {
        Stage::Setup => setup.push(SetupPoint {
            t: t.k,
            conns: t.conns,
            connects: t.counters.connects_ok,
            failed: t.counters.connects_failed,
            handshake_p99_us: t.handshake.quantile(0.99),
        }),
        Stage::Run => series.push(SeriesPoint {
            t: t.k,
            grace: t.grace,
            conns: t.conns,
            sent: t.counters.sent,
            delivered: t.counters.delivered,
            acked: t.counters.acked,
            errors: t.counters.errors,
            p50_us: t.latency.quantile(0.5),
            p90_us: t.latency.quantile(0.9),
            p99_us: t.latency.quantile(0.99),
            p999_us: t.latency.quantile(0.999),
            max_us: t.latency.max(),
        }),
    }
}

/// Warns when each connection would send faster than the gateway allows it.
fn warn_rate(o: &Options, server: ServerLimits, connected: u64, progress: &mut Progress) {
    if !o.scenario.sends() || server.sends_per_sec == 0 || connected == 0 {
        return;
    }
    let per_conn = sends_per_conn(o.scenario, o.group, o.rate, o.fanout, o.conns);
    if per_conn > f64::from(server.sends_per_sec) {
        progress.say(&format!(
            "warning: each sending connection sends {per_conn:.0} msgs/s but the gateway allows \
             {} (limits.sends_per_sec): expect rate_limited refusals; raise --conns or the \
             gateway's limit",
            server.sends_per_sec
        ));
    }
}

/// The `send`s per second of each sending connection: a fan-out publisher sends one `send`
/// per member (1:1) or one per message (`--group`, the gateway fans it out).
fn sends_per_conn(
    scenario: crate::config::Scenario,
    group: bool,
    rate: f64,
    fanout: u64,
    conns: u64,
) -> f64 {
    match scenario {
        crate::config::Scenario::Fanout => {
            let senders = (conns / scenario.unit_size(fanout)).max(1);
            let per_message = if group { 1.0 } else { fanout as f64 };
            rate * per_message / senders as f64
        }
        _ => rate / conns.max(1) as f64,
    }
}

fn write_outputs(o: &Options, report: &Report, total: &Final) -> Result<(), String> {
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(report).map_err(|e| format!("--json: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    if let Some(path) = &o.hgrm {
        std::fs::write(path, total.latency.write_hgrm(1000.0))
            .map_err(|e| format!("--hgrm {}: {e}", path.display()))?;
    }
    if let Some(path) = &o.svg {
        let title = format!(
            "loadgen {} -> {} ({}), {} conns, {} msgs/s offered",
            report.scenario, report.target, report.codec, report.conns, report.rate
        );
        std::fs::write(
            path,
            crate::svg::render(&title, &total.latency, &report.series),
        )
        .map_err(|e| format!("--svg {}: {e}", path.display()))?;
    }
    Ok(())
}

/// VmRSS of a process in KiB (0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// utime + stime of a process (all its threads) in seconds (0 if unreadable).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    parse_stat_cpu(&stat).unwrap_or(0.0) / clock_ticks()
}

/// utime + stime, in clock ticks, from a /proc/PID/stat line (fields 14 and 15; the command
/// name in parentheses may hold spaces).
pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is f[0], so field N is f[N - 3].
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_fields() {
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    4 0 100 1000000 300 18446744073709551615";
        assert_eq!(parse_stat_cpu(line), Some(300.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert!(rss_kib(std::process::id()) > 0);
        assert!(cpu_secs(std::process::id()) >= 0.0);
    }

    #[test]
    fn a_group_publisher_sends_once_per_message() {
        use crate::config::Scenario;
        // 2,000 members, 600 messages a second: 1:1 fan-out sends 2,000 `send`s per message,
        // a group one.
        assert_eq!(
            sends_per_conn(Scenario::Fanout, false, 600.0, 2000, 2001),
            1_200_000.0
        );
        assert_eq!(
            sends_per_conn(Scenario::Fanout, true, 600.0, 2000, 2001),
            600.0
        );
        assert_eq!(sends_per_conn(Scenario::Chat, false, 5000.0, 0, 1000), 5.0);
    }
}
