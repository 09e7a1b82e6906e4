//! What loadgen threads and workers report, and how reports from several sources merge.
//!
//! This module owns the report types: [`Counters`] (event counts), [`Tick`] (one second of one
//! source: counter deltas, interval histograms, open connections), [`Final`] (a source's totals
//! at the end) and the line protocol between a worker process and the coordinator
//! ([`WorkerLine`], one JSON object per line on the worker's stdout). [`Merger`] combines the
//! ticks of several sources (the threads of a worker, the workers of a run) second by second;
//! the same code serves both levels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hist::Hist;
use crate::integrity::Tally;

/// Event counts. In a [`Tick`] they are the second's deltas; in a [`Final`] the totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub sent: u64,
    pub acked: u64,
    pub refused: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Deliveries whose `inbox_seq` the connection had already seen: retransmits (the server
    /// resends until acked), dropped by `inbox_seq` as a client does. Not duplicates: a
    /// duplicate is one message stored or delivered under two positions.
    #[serde(default)]
    pub redelivered: u64,
    /// Sends skipped because an end of the conversation was not connected.
    pub skipped: u64,
    pub pings: u64,
    pub pongs: u64,
    pub closed_by_server: u64,
    /// Everything that went wrong: failed connects, server errors, closes, send failures.
    pub errors: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.connects_ok += o.connects_ok;
        self.connects_failed += o.connects_failed;
        self.sent += o.sent;
        self.acked += o.acked;
        self.refused += o.refused;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.redelivered += o.redelivered;
        self.skipped += o.skipped;
        self.pings += o.pings;
        self.pongs += o.pongs;
        self.closed_by_server += o.closed_by_server;
        self.errors += o.errors;
    }
}

/// Before `go` (connecting, then waiting for the other workers) or after (the measured run
/// and its grace period).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Setup,
    Run,
}

/// One second of one source.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tick {
    pub stage: Option<Stage>,
    /// Second index: since the worker started (setup) or since `go` (run).
    pub k: u32,
    /// Connections open at the end of the second (a gauge, summed over sources).
    pub conns: u64,
    /// Connections planned (summed over sources).
    pub planned: u64,
    /// True if the second is past the run's duration (grace period).
    pub grace: bool,
    pub counters: Counters,
    /// Delivery latency recorded during the second.
    pub latency: Hist,
    /// Handshake latency (connect + upgrade + hello) recorded during the second.
    pub handshake: Hist,
    /// Things to tell the user at once (a limit reached, a refused hello, ...).
    pub notes: Vec<String>,
}

impl Tick {
    pub fn key(&self) -> (Stage, u32) {
        (self.stage.unwrap_or(Stage::Setup), self.k)
    }

    /// Adds `o` (same key) into this tick. Histogram merges cannot fail between the
    /// loadgen's own histograms (same bounds); a failure is kept as a note.
    pub fn absorb(&mut self, o: &Tick) {
        self.stage = self.stage.or(o.stage);
        self.conns += o.conns;
        self.planned += o.planned;
        self.grace |= o.grace;
        self.counters.add(&o.counters);
        for (mine, theirs) in [
            (&mut self.latency, &o.latency),
            (&mut self.handshake, &o.handshake),
        ] {
            if let Err(e) = mine.merge(theirs) {
                self.notes.push(format!("histogram merge: {e}"));
            }
        }
        self.notes.extend(o.notes.iter().cloned());
    }
}

/// What the server announced in `welcome` (the first one a source saw).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLimits {
    pub heartbeat_ms: u64,
    pub sends_per_sec: u32,
}

/// A source's totals at the end of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Final {
    pub planned: u64,
    /// Connections that completed `hello`.
    pub connected: u64,
    /// Connections still open at the end.
    pub open_at_end: u64,
    /// Microseconds from the first connection attempt to the last completed `hello`.
    pub connect_span_us: u64,
    pub counters: Counters,
    pub tally: Tally,
    /// Delivery latency from the intended send time.
    pub latency: Hist,
    /// `send_ack` latency from the intended send time.
    pub ack_latency: Hist,
    /// Connect + upgrade + `hello` latency (from the intended start when ramping).
    pub handshake: Hist,
    /// Heartbeat round trips (`ping` to `pong`).
    pub heartbeat: Hist,
    /// How late the loadgen sent each message against its schedule: its own bottleneck.
    pub send_lag: Hist,
    pub errors: BTreeMap<String, u64>,
    /// Limits that stopped the run from opening all of its connections.
    pub limits: Vec<String>,
    pub server: ServerLimits,
    /// CPU seconds (user + system) the source used, when it knows.
    pub cpu_s: f64,
    /// Involuntary context switches of the source (its core was taken by another process).
    pub preempted: u64,
    /// Seconds the source's loop threads were runnable but waited for a CPU.
    pub cpu_wait_s: f64,
}

impl Final {
    pub fn absorb(&mut self, o: &Final) {
        self.planned += o.planned;
        self.connected += o.connected;
        self.open_at_end += o.open_at_end;
        self.connect_span_us = self.connect_span_us.max(o.connect_span_us);
        self.counters.add(&o.counters);
        self.tally.add(&o.tally);
        let mut notes = Vec::new();
        for (mine, theirs) in [
            (&mut self.latency, &o.latency),
            (&mut self.ack_latency, &o.ack_latency),
            (&mut self.handshake, &o.handshake),
            (&mut self.heartbeat, &o.heartbeat),
            (&mut self.send_lag, &o.send_lag),
        ] {
            if let Err(e) = mine.merge(theirs) {
                notes.push(e);
            }
        }
        for e in notes {
            *self
                .errors
                .entry(format!("histogram merge: {e}"))
                .or_default() += 1;
        }
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for l in &o.limits {
            if !self.limits.contains(l) {
                self.limits.push(l.clone());
            }
        }
        if self.server == ServerLimits::default() {
            self.server = o.server;
        }
        self.cpu_s += o.cpu_s;
        self.preempted += o.preempted;
        self.cpu_wait_s += o.cpu_wait_s;
    }
}

/// One line of a worker's stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one line at a time
pub enum WorkerLine {
    Tick(Tick),
    /// Every connection of the worker was attempted; it waits for `go` on stdin.
    Ready {
        connected: u64,
        server: ServerLimits,
    },
    Final(Final),
    /// The worker cannot run at all (bad plan, no poller).
    Fatal {
        message: String,
    },
}

/// Merges per-second ticks of `n` sources: a key is complete once every source that has not
/// finished reported it. Sources report their keys in order and report all of their keys
/// before they finish.
pub struct Merger {
    finished: Vec<bool>,
    pending: BTreeMap<(Stage, u32), (Vec<bool>, Tick)>,
}

impl Merger {
    pub fn new(sources: usize) -> Merger {
        Merger {
            finished: vec![false; sources],
            pending: BTreeMap::new(),
        }
    }

    /// Takes `tick` from `source`; returns the ticks that became complete, in key order.
    pub fn push(&mut self, source: usize, tick: Tick) -> Vec<Tick> {
        let n = self.finished.len();
        let entry = self.pending.entry(tick.key()).or_insert_with(|| {
            let t = Tick {
                stage: tick.stage,
                k: tick.k,
                ..Tick::default()
            };
            (vec![false; n], t)
        });
        if let Some(seen) = entry.0.get_mut(source) {
            *seen = true;
        }
        entry.1.absorb(&tick);
        self.drain()
    }

    /// `source` will report nothing more.
    pub fn finish(&mut self, source: usize) -> Vec<Tick> {
        if let Some(f) = self.finished.get_mut(source) {
            *f = true;
        }
        self.drain()
    }

    /// Everything still pending, complete or not (at the end of a run).
    pub fn flush(&mut self) -> Vec<Tick> {
        std::mem::take(&mut self.pending)
            .into_values()
            .map(|(_, t)| t)
            .collect()
    }

    fn drain(&mut self) -> Vec<Tick> {
        let mut out = Vec::new();
        // Keys complete in order; a key newer by 3 seconds than an incomplete one also
        // releases it (a source that skipped a second must not hold the display back).
        let newest = self.pending.keys().next_back().copied();
        while let Some((&key, (seen, _))) = self.pending.iter().next() {
            let complete = seen
                .iter()
                .zip(&self.finished)
                .all(|(&seen, &finished)| seen || finished);
            let stale = newest.is_some_and(|(s, k)| s > key.0 || k >= key.1 + 3);
            if !(complete || stale) {
                break;
            }
            if let Some((_, (_, t))) = self.pending.remove_entry(&key) {
                out.push(t);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(stage: Stage, k: u32, delivered: u64, lat: &[u64]) -> Tick {
        let mut t = Tick {
            stage: Some(stage),
            k,
            conns: 10,
            ..Tick::default()
        };
        t.counters.delivered = delivered;
        for &v in lat {
            t.latency.record(v);
        }
        t
    }

    #[test]
    fn merger_waits_for_every_live_source_then_sums() {
        let mut m = Merger::new(2);
        assert!(m.push(0, tick(Stage::Setup, 0, 0, &[])).is_empty());
        let out = m.push(1, tick(Stage::Setup, 0, 0, &[]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].conns, 20);
        assert!(m.push(1, tick(Stage::Run, 0, 5, &[100, 200])).is_empty());
        assert!(m.push(1, tick(Stage::Run, 1, 7, &[300])).is_empty());
        let out = m.push(0, tick(Stage::Run, 0, 3, &[400]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].counters.delivered, 8);
        assert_eq!(out[0].latency.len(), 3);
        assert_eq!(out[0].latency.max(), 400);
        // Source 0 finishes: key 1 only waited for it.
        let out = m.finish(0);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].k, out[0].counters.delivered), (1, 7));
        // A finished source's earlier keys were all in; source 1 alone from here.
        let out = m.push(1, tick(Stage::Run, 2, 1, &[]));
        assert_eq!(out.len(), 1);
        assert!(m.flush().is_empty());
    }

    #[test]
    fn stale_keys_are_released() {
        let mut m = Merger::new(2);
        assert!(m.push(0, tick(Stage::Run, 0, 1, &[])).is_empty());
        assert!(m.push(0, tick(Stage::Run, 1, 1, &[])).is_empty());
        assert!(m.push(0, tick(Stage::Run, 2, 1, &[])).is_empty());
        let out = m.push(0, tick(Stage::Run, 3, 1, &[]));
        assert_eq!(out.iter().map(|t| t.k).collect::<Vec<_>>(), [0]);
        assert_eq!(m.flush().len(), 3);
    }

    #[test]
    fn lines_round_trip_through_json() {
        let mut f = Final::default();
        f.latency.record(1234);
        f.tally.sent = 3;
        f.errors.insert("server:rate_limited".into(), 2);
        let line = serde_json::to_string(&WorkerLine::Final(f)).unwrap();
        assert!(line.starts_with("{\"type\":\"final\""));
        match serde_json::from_str::<WorkerLine>(&line).unwrap() {
            WorkerLine::Final(g) => {
                assert_eq!(g.latency.max(), 1234);
                assert_eq!(g.tally.sent, 3);
                assert_eq!(g.errors["server:rate_limited"], 2);
            }
            other => panic!("{other:?}"),
        }
        let mut a = Final::default();
        let mut b = Final::default();
        a.latency.record(10);
        b.latency.record(20);
        b.limits.push("open files".into());
        a.absorb(&b);
        a.absorb(&b);
        assert_eq!(a.latency.len(), 3);
        assert_eq!(a.limits, ["open files"]);
    }
}
