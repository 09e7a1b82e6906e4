//! `loadgen`: the bundled load generator for imgw (SPEC 7 and 9).
//!
//! `loadgen SCENARIO --target ws://HOST:PORT/ws|tcp://HOST:PORT [options]` runs a scenario
//! (chat, idle, connect-storm, fanout, churn, offline-sync, mixed) from one or more worker
//! processes and prints a summary; `--protocol nats|plainws` speaks a peer server's protocol
//! instead of imgw's (side-by-side runs, see [`peer`]);
//! `loadgen --help` lists the options. `loadgen worker` is the hidden entry point of a worker
//! process (see [`worker`]).
//!
//! Modules: [`config`] (flags, scenario file, plans), [`coord`] (the coordinator process),
//! [`chaos`] (the fault campaign of `loadgen chaos`),
//! [`worker`] (a worker process), [`engine`] (one thread's event loop and scenarios),
//! [`schedule`] (open-loop timing), [`integrity`] (loss/duplicate/order accounting),
//! [`hist`] (HdrHistogram), [`stats`] (reports and their merge), [`poller`] (epoll and
//! timerfd), [`report`] (progress, summary, JSON), [`svg`] (the plot), [`peer`] (NATS over
//! WebSocket and plain-ws pub/sub).

mod chaos;
mod config;
mod coord;
mod engine;
mod hist;
mod integrity;
mod peer;
mod poller;
mod report;
mod schedule;
mod stats;
mod svg;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker::main();
    }
    let cli = config::Cli::parse();
    match config::Options::resolve(cli) {
        Ok(o) => coord::run(&o),
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
