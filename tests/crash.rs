//! SIGKILL and SIGTERM under load at durability `local`, the default (SPEC 4): every `send_ack`ed message
//! survives and reaches each device of its recipient exactly once after a restart on the same
//! data directory.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gateway::Gateway;
use imgw::client::{Client, ClientConfig, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Envelope, Message, Send, Target};

const SENDERS: usize = 4;
const RECIPIENTS: usize = 3;

fn recipient(i: usize) -> String {
    format!("crash-rcpt-{i}")
}

/// Syncs everything; returns (inbox_seq -> body), failing on any duplicate.
fn sync_all(c: &mut Client) -> BTreeMap<u64, String> {
    let mut got = BTreeMap::new();
    for d in common::gateway::sync_all(c, 0, 200) {
        let prev = got.insert(d.inbox_seq, d.body.to_string());
        assert!(prev.is_none(), "seq {} delivered twice", d.inbox_seq);
    }
    got
}

/// With no `--durability` flag: the default is the embedded store (SPEC 1, 6), so a gateway
/// started with its defaults loses no acked message either.
#[test]
fn sigkill_under_load_loses_no_acked_message() {
    let mut g = Gateway::start(
        common::gateway::DEV_TOML,
        &["--shards", "2", "--insecure-dev-auth"],
    );
    let acked = acked_under_load(&mut g, Gateway::kill9);
    g.spawn();
    check_after_restart(&mut g, &acked);
}

/// SIGTERM while senders are busy: every connection gets `goaway`, the process exits within
/// its drain bound, and after a restart every acked message is there once, gapless.
#[test]
fn sigterm_under_load_drains_and_loses_no_acked_message() {
    // The watchers only listen: an idle timeout above the run's length.
    let toml =
        common::gateway::DEV_TOML.replace("idle_timeout_ms = 1500", "idle_timeout_ms = 20000");
    let mut g = Gateway::local_with(&toml);
    let mut watchers: Vec<Client> = (0..RECIPIENTS)
        .map(|r| g.login(Transport::Tcp, CodecId::Json, &recipient(r), "watch"))
        .collect();
    let mut stopped_at = None;
    let acked = acked_under_load(&mut g, |g| {
        stopped_at = Some(Instant::now());
        g.sigterm();
    });
    for w in &mut watchers {
        let env = w
            .recv_until(
                |e| matches!(e.msg, Message::Goaway(_)),
                Duration::from_secs(5),
            )
            .expect("goaway");
        assert!(
            matches!(env.msg, Message::Goaway(ref ga) if ga.reason == "drain"),
            "{:?}",
            env.msg
        );
    }
    let status = g
        .wait_exit(Duration::from_secs(10))
        .expect("exit after drain");
    assert!(status.success(), "{status}");
    // DEV_TOML's drain_timeout_ms is 3 s.
    let took = stopped_at.map(|t| t.elapsed()).unwrap_or_default();
    assert!(took < Duration::from_secs(5), "drain took {took:?}");
    g.spawn();
    check_after_restart(&mut g, &acked);
}

/// SENDERS clients send to RECIPIENTS users, each waiting for its ack, until `interrupt`
/// stops the gateway 1.5 s in; returns (recipient, seq) -> body of every acked message.
fn acked_under_load(
    g: &mut Gateway,
    interrupt: impl FnOnce(&mut Gateway),
) -> BTreeMap<(usize, u64), String> {
    let acked: Arc<Mutex<BTreeMap<(usize, u64), String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for s in 0..SENDERS {
        let cfg: ClientConfig = g.config(Transport::Tcp, CodecId::Protobuf);
        let (acked, stop) = (acked.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(&cfg).unwrap();
            c.hello(&format!("crash-sender-{s}"), "d").unwrap();
            c.set_read_timeout(Duration::from_secs(2)).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let to = (s + i as usize) % RECIPIENTS;
                let body = format!("s{s}-m{i}");
                let r = c.next_ref();
                let env = Envelope::with_ref(
                    Message::Send(Send {
                        to: Target::User(recipient(to).into()),
                        cmid: format!("s{s}-{i}").into(),
                        kind: None,
                        body: body.clone().into(),
                        ext: Default::default(),
                    }),
                    r,
                );
                if c.send(&env).is_err() {
                    return;
                }
                // Wait for this send's ack; anything else (or the crash) ends the sender.
                match c.recv_until(|e| e.reference == Some(r), Duration::from_secs(2)) {
                    Ok(Envelope {
                        msg: Message::SendAck(a),
                        ..
                    }) => {
                        acked.lock().unwrap().insert((to, a.seq), body);
                    }
                    _ => return,
                }
                i += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    interrupt(g);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "too few messages acked before the kill: {}",
        acked.len()
    );
    acked
}

/// After a restart on the same data: each recipient device syncs every acked message, once,
/// gapless from 1.
fn check_after_restart(g: &mut Gateway, acked: &BTreeMap<(usize, u64), String>) {
    for r in 0..RECIPIENTS {
        for device in ["phone", "laptop"] {
            let mut c = g.login(Transport::Ws, CodecId::Json, &recipient(r), device);
            let got = sync_all(&mut c);
            // Gapless from 1: whatever was stored is contiguous.
            let seqs: Vec<u64> = got.keys().copied().collect();
            assert_eq!(
                seqs,
                (1..=seqs.len() as u64).collect::<Vec<_>>(),
                "gaps in {r}"
            );
            let mine: BTreeSet<_> = acked.keys().filter(|(to, _)| *to == r).collect();
            for (to, seq) in mine {
                assert_eq!(
                    got.get(seq),
                    acked.get(&(*to, *seq)),
                    "acked message {seq} to recipient {r} ({device}) lost or changed"
                );
            }
        }
    }
}
