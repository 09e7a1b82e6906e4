//! Fuzz two shards fed arbitrary sequences of what a runtime and its clients can do, on a
//! simulated clock: connections open (raw TCP or WebSocket), receive arbitrary bytes or
//! well-formed frames of any op in any codec, get their output written in arbitrary amounts,
//! are closed by the peer or by the shard, time moves on with the sweep tick, and the shards'
//! batches cross between them. Never a panic; no connection's pending output passes the
//! outbound bound by more than one frame; the open-connection count is what was opened and
//! not yet closed.
#![no_main]

use std::sync::Arc;

use imgw::auth::Authenticator;
use imgw::codec::CodecId;
use imgw::config::Config;
use imgw::metrics::Metrics;
use imgw::protocol::frame::write_frame;
use imgw::protocol::{
    Ack, Envelope, GroupJoin, GroupLeave, Hello, Message, Ping, PresenceSet, PresenceSub, Send,
    Status, Sync, Target, CURRENT_VERSION,
};
use imgw::shard::{Clock, ConnId, Shard, Transport};
use libfuzzer_sys::fuzz_target;

const SHARDS: usize = 2;
const MAX_OUT: usize = 4096;
const MAX_FRAME: usize = 4096;

/// Reads the fuzzer's bytes as a sequence of small numbers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn envelope(inp: &mut Input<'_>) -> Option<Envelope> {
    let kind = inp.byte()?;
    let n = inp.byte()?;
    let user = format!("u{}", n % 8);
    let msg = match kind % 9 {
        0 => Message::Hello(Hello {
            version: CURRENT_VERSION,
            token: user.as_str().into(),
            device: format!("d{}", n % 3).as_str().into(),
            ..Hello::default()
        }),
        1 => Message::Send(Send {
            to: if n & 0x80 == 0 {
                Target::User(user.as_str().into())
            } else {
                Target::Group(format!("g{}", n % 4).as_str().into())
            },
            cmid: format!("c{}", inp.byte()?).as_str().into(),
            kind: None,
            body: String::from_utf8_lossy(inp.bytes(usize::from(n % 64)))
                .as_ref()
                .into(),
            ext: Default::default(),
        }),
        2 => Message::Ping(Ping { ts: u64::from(n) }),
        3 => Message::Ack(Ack {
            inbox_seq: u64::from(n),
            group: None,
        }),
        4 => Message::PresenceSub(PresenceSub {
            users: vec![user.as_str().into()],
        }),
        5 => Message::PresenceSet(PresenceSet {
            status: if n & 1 == 0 {
                Status::Busy
            } else {
                Status::Online
            },
        }),
        6 => Message::GroupJoin(GroupJoin {
            group: format!("g{}", n % 4).as_str().into(),
        }),
        7 => Message::GroupLeave(GroupLeave {
            group: format!("g{}", n % 4).as_str().into(),
        }),
        _ => Message::Sync(Sync {
            after_inbox_seq: u64::from(n),
            limit: u32::from(inp.byte()?),
            group: None,
        }),
    };
    Some(Envelope::with_ref(msg, u64::from(kind)))
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = Config::default();
    cfg.auth.insecure_dev_auth = true;
    cfg.limits.max_conns = 16;
    cfg.limits.max_outbound_bytes = MAX_OUT as u32;
    cfg.limits.max_frame_bytes = MAX_FRAME as u32;
    cfg.limits.window = 4;
    cfg.limits.max_presence_subs = 4;
    cfg.limits.max_groups_per_user = 3;
    cfg.limits.max_group_members = 4;
    cfg.limits.shard_outbox_max = 64;
    let cfg = Arc::new(cfg);
    let Ok(auth) = Authenticator::from_config(&cfg.auth) else {
        return;
    };
    let (auth, metrics) = (Arc::new(auth), Arc::new(Metrics::new(SHARDS)));
    let mut clk = Clock {
        mono_ms: 1_000,
        mono_us: 1_000_000,
        unix_ms: 1_700_000_000_000,
    };
    let mut shards: Vec<Shard> = (0..SHARDS)
        .map(|i| {
            Shard::new(
                i,
                SHARDS,
                cfg.clone(),
                auth.clone(),
                metrics.clone(),
                None,
                clk,
            )
        })
        .collect();
    let mut open: Vec<(usize, ConnId, Transport)> = Vec::new();
    let mut inp = Input(data);
    while let Some(op) = inp.byte() {
        let pick = |inp: &mut Input<'_>, open: &Vec<(usize, ConnId, Transport)>| {
            let b = usize::from(inp.byte().unwrap_or(0));
            (!open.is_empty()).then(|| b % open.len())
        };
        match op % 8 {
            0 => {
                let s = usize::from(op >> 3) % SHARDS;
                let t = if op & 0x80 == 0 {
                    Transport::Tcp
                } else {
                    Transport::Ws
                };
                if let Some(id) = shards[s].accept(t, clk) {
                    open.push((s, id, t));
                }
            }
            1 => {
                let Some(i) = pick(&mut inp, &open) else {
                    continue;
                };
                let n = usize::from(inp.byte().unwrap_or(0));
                let mut raw = inp.bytes(n).to_vec();
                let (s, id, _) = open[i];
                shards[s].on_read(id, &mut raw, clk);
            }
            2 => {
                let Some(i) = pick(&mut inp, &open) else {
                    continue;
                };
                let codec = CodecId::ALL[usize::from(op >> 3) % CodecId::ALL.len()];
                let Some(env) = envelope(&mut inp) else {
                    continue;
                };
                let mut frame = Vec::new();
                if write_frame(&mut frame, codec, &[], &env).is_ok() {
                    let (s, id, _) = open[i];
                    shards[s].on_read(id, &mut frame, clk);
                }
            }
            3 => {
                let Some(i) = pick(&mut inp, &open) else {
                    continue;
                };
                let (s, id, _) = open[i];
                let take = usize::from(inp.byte().unwrap_or(0)) * 64;
                let n = shards[s].output(id).map_or(0, |o| o.len().min(take));
                shards[s].wrote(id, n, clk.mono_us);
            }
            4 => {
                let Some(i) = pick(&mut inp, &open) else {
                    continue;
                };
                let (s, id, _) = open.swap_remove(i);
                shards[s].remove(id);
            }
            5 => {
                let step = u64::from(inp.byte().unwrap_or(0)) * 40;
                clk.mono_ms += step;
                clk.mono_us += step * 1_000;
                clk.unix_ms += step;
                for s in &mut shards {
                    s.tick(clk);
                }
            }
            6 => {
                for from in 0..SHARDS {
                    for to in 0..SHARDS {
                        let batch = shards[from].take_batch(to);
                        shards[to].on_batch(batch, clk);
                    }
                }
            }
            _ => {
                // What the runtime does for a connection the shard wants closed.
                open.retain(|&(s, id, _)| {
                    let close = shards[s].should_close(id);
                    if close {
                        shards[s].remove(id);
                    }
                    !close
                });
            }
        }
        for &(s, id, _) in &open {
            if let Some(out) = shards[s].output(id) {
                assert!(
                    out.len() <= MAX_OUT + MAX_FRAME + 64,
                    "output {}",
                    out.len()
                );
            }
        }
        let held: usize = shards.iter().map(Shard::connections).sum();
        assert_eq!(held, open.len());
    }
});
