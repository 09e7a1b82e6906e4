//! The results of a run as the user sees them: the live progress line, the [`Report`] (every
//! figure; written as `--json`), the summary table on stdout, and the verdict of
//! `--expect-no-loss`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

use serde::Serialize;

use crate::config::{Options, Scenario};
use crate::engine::top_errors;
use crate::hist::Percentiles;
use crate::integrity::Tally;
use crate::stats::{Counters, Final, ServerLimits, Stage, Tick};

/// One second of the measured run (and its grace period), all workers merged.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeriesPoint {
    pub t: u32,
    pub grace: bool,
    pub conns: u64,
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// One second of the connection phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SetupPoint {
    pub t: u32,
    pub conns: u64,
    pub connects: u64,
    pub failed: u64,
    pub handshake_p99_us: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectReport {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// From the first attempt to the last completed `hello` (slowest worker).
    pub span_s: f64,
    pub per_s: f64,
    pub handshake_us: Percentiles,
}

/// `loadgen chaos`: the campaign's faults and verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChaosVerdict {
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// The one-line summary.
    pub line: String,
    /// No lost, duplicated, out-of-order or unknown delivery, and the campaign ran as planned.
    pub pass: bool,
}

/// The server process, sampled from /proc when `--server-pid` is given.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerProc {
    pub pid: u32,
    /// VmRSS before the first connection, and once every connection is up (before `go`).
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    /// (connected - before) / connections, in bytes.
    pub rss_per_conn_bytes: f64,
    /// utime + stime of the server from `go` to the last worker's final report (the run
    /// and its grace period).
    pub cpu_run_s: f64,
    /// `cpu_run_s` per delivery, in microseconds (0 without deliveries).
    pub cpu_per_delivery_us: f64,
    /// utime + stime of the server from loadgen's start until every connection was up
    /// (accepts, TLS handshakes, upgrades, hellos), and per connection, in microseconds.
    pub cpu_setup_s: f64,
    pub cpu_per_connect_us: f64,
}

/// Every figure of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub transport: String,
    pub codec: String,
    pub protocol: String,
    pub conns: u64,
    pub connected: u64,
    pub open_at_end: u64,
    /// Offered rate: messages/s (chat) or publishes/s (fanout); 0 for the others.
    pub rate: f64,
    pub fanout: Option<u64>,
    /// Offered connection rate (connections/s; 0 = as fast as possible).
    pub ramp: f64,
    pub duration_s: f64,
    /// How long the measured run lasted (shorter than `duration_s` if interrupted).
    pub run_s: f64,
    pub grace_s: f64,
    pub payload: usize,
    pub workers: u32,
    pub threads: u32,
    pub sources: Vec<String>,
    pub connect: ConnectReport,
    pub messages: Tally,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    /// Delivery latency: receive time minus intended send time (coordinated omission
    /// corrected).
    pub latency_us: Percentiles,
    pub ack_latency_us: Percentiles,
    /// Lateness of the loadgen against its own schedule.
    pub send_lag_us: Percentiles,
    pub heartbeat_rtt_us: Percentiles,
    pub counters: Counters,
    pub errors: BTreeMap<String, u64>,
    pub limits_reached: Vec<String>,
    pub server: ServerLimits,
    /// The heartbeat interval used (`--heartbeat-ms`, else the server's).
    pub heartbeat_ms: u64,
    pub loadgen_cpu_s: f64,
    /// Involuntary context switches of the workers: how often other processes took their core.
    pub loadgen_preempted: u64,
    /// Seconds the loadgen's loop threads were runnable but waited for a CPU.
    pub loadgen_cpu_wait_s: f64,
    /// Wall time from the first worker's start to the last report.
    pub wall_s: f64,
    pub series: Vec<SeriesPoint>,
    pub setup_series: Vec<SetupPoint>,
    pub expect_no_loss: bool,
    /// What `--expect-no-loss` forbids and found.
    pub violations: Vec<String>,
    /// What kept the run from completing as asked (workers that failed, connections missing).
    pub problems: Vec<String>,
    pub pass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_proc: Option<ServerProc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<ChaosVerdict>,
}

impl Report {
    pub fn new(
        o: &Options,
        fin: &Final,
        series: Vec<SeriesPoint>,
        setup_series: Vec<SetupPoint>,
        mut problems: Vec<String>,
        wall_s: f64,
        run_s: f64,
    ) -> Report {
        let per_s = |n: u64| if run_s > 0.0 { n as f64 / run_s } else { 0.0 };
        let tally = fin.tally;
        let mut violations = Vec::new();
        if o.expect_no_loss {
            violations = tally.violations();
            if o.scenario.sends() && o.rate > 0.0 && tally.sent == 0 {
                violations.push("no message was sent: nothing to check".into());
            }
        }
        if fin.connected < fin.planned {
            problems.push(format!(
                "only {} of {} connections came up",
                fin.connected, fin.planned
            ));
        }
        let span_s = fin.connect_span_us as f64 / 1e6;
        let pass = violations.is_empty() && problems.is_empty();
        Report {
            scenario: o.scenario.name().into(),
            target: o.target.url.clone(),
            transport: o.target.transport.name().into(),
            codec: o.codec.name().into(),
            protocol: o.protocol.name().into(),
            conns: o.conns,
            connected: fin.connected,
            open_at_end: fin.open_at_end,
            rate: if o.scenario.scheduled() { o.rate } else { 0.0 },
            fanout: (o.scenario == Scenario::Fanout).then_some(o.fanout),
            ramp: o.ramp,
            duration_s: o.duration.as_secs_f64(),
            run_s,
            grace_s: o.grace.as_secs_f64(),
            payload: o.payload,
            workers: o.workers,
            threads: o.threads,
            sources: o.sources.iter().map(|s| s.to_string()).collect(),
            connect: ConnectReport {
                attempted: fin.counters.connects_ok + fin.counters.connects_failed,
                ok: fin.counters.connects_ok,
                failed: fin.counters.connects_failed,
                span_s,
                per_s: if span_s > 0.0 {
                    fin.counters.connects_ok as f64 / span_s
                } else {
                    0.0
                },
                handshake_us: fin.handshake.percentiles(),
            },
            messages: tally,
            sent_per_s: per_s(tally.sent),
            delivered_per_s: per_s(tally.delivered),
            latency_us: fin.latency.percentiles(),
            ack_latency_us: fin.ack_latency.percentiles(),
            send_lag_us: fin.send_lag.percentiles(),
            heartbeat_rtt_us: fin.heartbeat.percentiles(),
            counters: fin.counters,
            errors: fin.errors.clone(),
            limits_reached: fin.limits.clone(),
            server: fin.server,
            heartbeat_ms: o.heartbeat_ms.unwrap_or(fin.server.heartbeat_ms),
            loadgen_cpu_s: fin.cpu_s,
            loadgen_preempted: fin.preempted,
            loadgen_cpu_wait_s: fin.cpu_wait_s,
            wall_s,
            series,
            setup_series,
            expect_no_loss: o.expect_no_loss,
            violations,
            problems,
            pass,
            server_proc: None,
            chaos: None,
        }
    }

    /// The summary table.
    pub fn summary(&self) -> String {
        let mut t = Table::default();
        let ms = |us: u64| us as f64 / 1000.0;
        let pct = |p: &Percentiles| {
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  p99.99 {:.3}  max {:.3}",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.p9999),
                ms(p.max)
            )
        };
        t.row(
            "run",
            format!(
                "{} -> {} ({}), {} worker{} x {} thread{}",
                self.scenario,
                self.target,
                self.codec,
                self.workers,
                plural(self.workers),
                self.threads,
                plural(self.threads)
            ),
        );
        t.row(
            "connections",
            format!(
                "{} of {} up in {:.2} s ({:.0}/s), {} open at the end",
                self.connected,
                self.conns,
                self.connect.span_s,
                self.connect.per_s,
                self.open_at_end
            ),
        );
        t.row("handshake (ms)", pct(&self.connect.handshake_us));
        if self.ramp > 0.0 && self.connect.ok > 1 && self.connect.per_s < 0.9 * self.ramp {
            t.row(
                "ramp not reached",
                format!(
                    "offered {:.0}/s, reached {:.0}/s (handshake latency counts the backlog): \
                     each thread opens one connection at a time; add --threads or --workers",
                    self.ramp, self.connect.per_s
                ),
            );
        }
        if self.rate > 0.0 {
            let what = if self.fanout.is_some() {
                format!(
                    "{} publishes/s to {} subscribers each",
                    self.rate,
                    self.fanout.unwrap_or(0)
                )
            } else {
                format!("{} msgs/s", self.rate)
            };
            t.row(
                "offered",
                format!("{what} for {:.1} s, payload {} B", self.run_s, self.payload),
            );
            let m = &self.messages;
            t.row(
                "sent",
                format!(
                    "{} ({:.1}/s); acked {}, refused {}",
                    m.sent, self.sent_per_s, m.acked, m.refused
                ),
            );
            t.row(
                "delivered",
                format!("{} ({:.1}/s)", m.delivered, self.delivered_per_s),
            );
            t.row(
                "integrity",
                format!(
                    "lost {}, unconfirmed {}, duplicates {}, out of order {}, unknown {} ({} conversations); \
                     retransmits dropped by inbox_seq {}",
                    m.lost,
                    m.unconfirmed,
                    m.duplicates,
                    m.out_of_order,
                    m.unknown,
                    m.conversations,
                    self.counters.redelivered
                ),
            );
            if m.unconfirmed > 0 {
                // The grace period ended with messages in flight: an ack read just before the
                // end whose delivery was not read yet counts as lost.
                t.row(
                    "not settled",
                    "messages were in flight when --grace ran out: lost may count deliveries \
                     still on their way; raise --grace"
                        .to_string(),
                );
            }
            t.row(
                "latency (ms)",
                format!(
                    "{}  ({} deliveries, from intended send time)",
                    pct(&self.latency_us),
                    self.latency_us.count
                ),
            );
            t.row("ack latency (ms)", pct(&self.ack_latency_us));
            t.row(
                "send lag (ms)",
                format!(
                    "p99 {:.3}  max {:.3}  (loadgen's lateness against its schedule)",
                    ms(self.send_lag_us.p99),
                    ms(self.send_lag_us.max)
                ),
            );
        } else {
            t.row("held", format!("{:.1} s with heartbeats only", self.run_s));
        }
        t.row(
            "heartbeats",
            format!(
                "{} pings, {} pongs, rtt p50 {:.3} ms, p99 {:.3} ms (every {} ms)",
                self.counters.pings,
                self.counters.pongs,
                ms(self.heartbeat_rtt_us.p50),
                ms(self.heartbeat_rtt_us.p99),
                self.heartbeat_ms
            ),
        );
        if self.errors.is_empty() {
            t.row("errors", "none".into());
        } else {
            let top = top_errors(&self.errors);
            let total: u64 = top.iter().map(|(_, n)| n).sum();
            let list: Vec<String> = top
                .iter()
                .take(6)
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            t.row("errors", format!("{total}: {}", list.join("; ")));
        }
        for l in &self.limits_reached {
            t.row("limit reached", l.clone());
        }
        t.row(
            "loadgen CPU",
            format!(
                "{:.2} s over {:.1} s wall ({:.1}% of one core); waited {:.2} s for a CPU, \
                 preempted {} times",
                self.loadgen_cpu_s,
                self.wall_s,
                if self.wall_s > 0.0 {
                    100.0 * self.loadgen_cpu_s / self.wall_s
                } else {
                    0.0
                },
                self.loadgen_cpu_wait_s,
                self.loadgen_preempted
            ),
        );
        if let Some(sp) = &self.server_proc {
            t.row(
                "server",
                format!(
                    "pid {}: RSS {} -> {} KiB ({:.0} B per connection); CPU {:.3} s to connect \
                     = {:.1} us per connection; CPU {:.3} s over the run = {:.3} us per delivery",
                    sp.pid,
                    sp.rss_before_kib,
                    sp.rss_connected_kib,
                    sp.rss_per_conn_bytes,
                    sp.cpu_setup_s,
                    sp.cpu_per_connect_us,
                    sp.cpu_run_s,
                    sp.cpu_per_delivery_us
                ),
            );
        }
        for p in &self.problems {
            t.row("problem", p.clone());
        }
        if let Some(c) = &self.chaos {
            t.row("chaos", c.line.clone());
        }
        let verdict = if self.chaos.as_ref().is_some_and(|c| !c.pass) {
            "FAIL (chaos): lost, duplicated or out-of-order messages, or the campaign did not \
             run as planned"
                .into()
        } else if !self.violations.is_empty() {
            format!("FAIL (--expect-no-loss): {}", self.violations.join("; "))
        } else if !self.problems.is_empty() {
            "FAIL: the run did not complete as asked".into()
        } else if self.expect_no_loss && self.messages.refused > 0 {
            format!(
                "PASS: no loss, no duplicates ({} refused by the server, see errors)",
                self.messages.refused
            )
        } else if self.expect_no_loss || self.chaos.is_some() {
            "PASS: no loss, no duplicates, no disorder".into()
        } else {
            "done".into()
        };
        t.row("result", verdict);
        t.render()
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A two-column table.
#[derive(Default)]
struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, k: &str, v: String) {
        self.0.push((k.to_owned(), v));
    }

    fn render(&self) -> String {
        let w = self.0.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &self.0 {
            let _ = writeln!(out, "  {k:<w$}  {v}");
        }
        out
    }
}

/// The live progress line on stderr: one line a second, redrawn in place on a terminal.
pub struct Progress {
    quiet: bool,
    /// The scenario sends messages (else the run line shows heartbeats).
    sends: bool,
    tty: bool,
    open_line: bool,
}

impl Progress {
    pub fn new(quiet: bool, sends: bool) -> Progress {
        Progress {
            quiet,
            sends,
            tty: std::io::stderr().is_terminal(),
            open_line: false,
        }
    }

    /// Prints a message on its own line.
    pub fn say(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.open_line {
            let _ = writeln!(err);
            self.open_line = false;
        }
        let _ = writeln!(err, "{text}");
    }

    pub fn tick(&mut self, t: &Tick) {
        for n in &t.notes {
            self.say(&format!("note: {n}"));
        }
        if self.quiet {
            return;
        }
        let p99 = |h: &crate::hist::Hist| h.quantile(0.99) as f64 / 1000.0;
        let c = &t.counters;
        let line = match t.stage.unwrap_or(Stage::Setup) {
            Stage::Setup => format!(
                "[setup {:>4}s] conns {}/{}  connects {}/s  failed {}  handshake p99 {:.2} ms  errors {}",
                t.k,
                t.conns,
                t.planned,
                c.connects_ok,
                c.connects_failed,
                p99(&t.handshake),
                c.errors
            ),
            Stage::Run if !self.sends => format!(
                "[{} {:>4}s] conns {}/{}  pings {}/s  pongs {}/s  closed {}  errors {}",
                if t.grace { "grace" } else { "run  " },
                t.k,
                t.conns,
                t.planned,
                c.pings,
                c.pongs,
                c.closed_by_server,
                c.errors
            ),
            Stage::Run => format!(
                "[{} {:>4}s] conns {}/{}  sent {}/s  delivered {}/s  p99 {:.2} ms  errors {}",
                if t.grace { "grace" } else { "run  " },
                t.k,
                t.conns,
                t.planned,
                c.sent,
                c.delivered,
                p99(&t.latency),
                c.errors
            ),
        };
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{line}");
            self.open_line = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub fn end(&mut self) {
        if self.open_line {
            let _ = writeln!(std::io::stderr());
            self.open_line = false;
        }
    }
}
