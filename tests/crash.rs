//! SIGKILL under load at durability `local` (SPEC 4): every `send_ack`ed message survives the
//! crash and reaches each device of its recipient exactly once after a restart on the same
//! data directory.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[test]
fn sigkill_under_load_loses_no_acked_message() {
    let mut g = Gateway::local();
    // (recipient, seq) -> body of every acked message.
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
    g.kill9();
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

    g.spawn();
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
