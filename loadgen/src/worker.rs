//! A worker process (`loadgen worker`, started by the coordinator, hidden from `--help`).
//!
//! Protocol with the coordinator: the first line on stdin is the worker's [`Plan`] (JSON);
//! a later line `go` starts the measured run, `stop` ends it early (the worker still reports),
//! `storm` drops every connection at once (`loadgen chaos`; they come back by `--reconnect`);
//! end of stdin means the coordinator is gone and the worker stops at once. The worker ignores
//! SIGINT: a Ctrl-C is the coordinator's to handle. On stdout the worker writes one [`WorkerLine`] JSON object per
//! line: a merged [`Tick`] every second, `ready` once every connection was attempted, and
//! `final` with its totals (histograms serialized V2 + base64), after which it exits.
//!
//! This module owns the worker's threads (one [`Engine`] each), the merge of their reports,
//! and the raising of the open-file limit.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use crate::config::Plan;
use crate::engine::{cpu_usage, raise_nofile_limit, Engine, Shared, ThreadMsg};
use crate::stats::{Final, Merger, ServerLimits, WorkerLine};

fn emit(line: &WorkerLine) {
    // A line that cannot be serialized or written (the coordinator is gone) is dropped: the
    // worker then finishes and exits on its own, bounded by the run's duration.
    if let Ok(text) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

fn fatal(message: String) -> ExitCode {
    emit(&WorkerLine::Fatal { message });
    ExitCode::from(1)
}

/// The `worker` subcommand.
pub fn main() -> ExitCode {
    let mut first = String::new();
    let stdin = std::io::stdin();
    if let Err(e) = stdin.lock().read_line(&mut first) {
        return fatal(format!("reading the plan: {e}"));
    }
    let plan: Plan = match serde_json::from_str(&first) {
        Ok(p) => p,
        Err(e) => return fatal(format!("bad plan: {e}")),
    };
    if let Err(e) = plan.codec() {
        return fatal(e);
    }
    // Ctrl-C reaches the whole process group: the coordinator decides (it sends `stop`).
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let nofile = raise_nofile_limit();
    let shared = Arc::new(Shared::new());
    let plan = Arc::new(plan);

    // Control lines from the coordinator.
    {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("loadgen-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    match line {
                        Ok(l) if l.trim() == "go" => shared.go(),
                        Ok(l) if l.trim() == "stop" => shared.stop.store(true, Ordering::SeqCst),
                        Ok(l) if l.trim() == "storm" => {
                            shared.storms.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                shared.abort.store(true, Ordering::SeqCst);
            })
            .ok();
    }

    let shares = plan.shares();
    let threads = shares.len();
    let (tx, rx) = mpsc::channel::<ThreadMsg>();
    let mut handles = Vec::new();
    for share in shares {
        let (plan, shared, tx) = (Arc::clone(&plan), Arc::clone(&shared), tx.clone());
        let name = format!("loadgen-w{}t{}", plan.worker, share.index);
        let h = std::thread::Builder::new().name(name).spawn(move || {
            let index = share.index as usize;
            match Engine::new(&plan, share, &shared, tx.clone()) {
                Ok(engine) => engine.run(),
                Err(e) => {
                    let mut fin = Final::default();
                    fin.errors.insert(format!("thread setup: {e}"), 1);
                    let _ = tx.send(ThreadMsg::Ready(0, ServerLimits::default()));
                    let _ = tx.send(ThreadMsg::Final(index, fin));
                }
            }
        });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => return fatal(format!("spawning a thread: {e}")),
        }
    }
    drop(tx);

    let mut merger = Merger::new(threads);
    let mut ready = 0;
    let mut connected = 0;
    let mut server = ServerLimits::default();
    let mut finals = 0;
    let mut total = Final::default();
    while finals < threads {
        let Ok(msg) = rx.recv() else {
            // Every thread is gone without its final report (a panic).
            total
                .errors
                .insert("a loadgen thread died".into(), (threads - finals) as u64);
            break;
        };
        match msg {
            ThreadMsg::Tick(t, tick) => {
                for merged in merger.push(t, tick) {
                    emit(&WorkerLine::Tick(merged));
                }
            }
            ThreadMsg::Ready(n, limits) => {
                ready += 1;
                connected += n;
                if server == ServerLimits::default() {
                    server = limits;
                }
                if ready == threads {
                    emit(&WorkerLine::Ready { connected, server });
                }
            }
            ThreadMsg::Final(t, fin) => {
                finals += 1;
                total.absorb(&fin);
                for merged in merger.finish(t) {
                    emit(&WorkerLine::Tick(merged));
                }
            }
        }
    }
    for merged in merger.flush() {
        emit(&WorkerLine::Tick(merged));
    }
    for h in handles {
        let _ = h.join();
    }
    if total.connected < total.planned && nofile < total.planned + 64 {
        let text = format!(
            "worker {} plans {} connections but may open only {nofile} files",
            plan.worker, total.planned
        );
        if !total.limits.iter().any(|l| l.starts_with("EMFILE")) {
            total.limits.push(text);
        }
    }
    (total.cpu_s, total.preempted) = cpu_usage();
    emit(&WorkerLine::Final(total));
    ExitCode::SUCCESS
}
