//! Reliable delivery at durability `local`, through real sockets (SPEC 4): offline inboxes,
//! per-device cursors, retransmission, dedupe, overload.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::gateway::{Gateway, DEV_TOML};
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{
    Ack, Deliver, Envelope, ErrorCode, Hello, Message, Resume, Send, SendAck, Target,
};

const WAIT: Duration = Duration::from_secs(5);

/// `limits`: extra lines for the `[limits]` table; `extra`: further tables.
fn local_with(limits: &str, extra: &str) -> Gateway {
    let toml = DEV_TOML.replace("[limits]\n", &format!("[limits]\n{limits}\n"));
    let toml = format!("{toml}\n{extra}\n");
    Gateway::local_with(&toml)
}

fn local(extra: &str) -> Gateway {
    local_with("", extra)
}

fn send(c: &mut Client, to: &str, cmid: &str, body: &str) -> SendAck {
    let r = c.next_ref();
    c.send(&common::gateway::direct(to, cmid, body, r)).unwrap();
    let env = c
        .recv_until(|e| e.reference == Some(r), WAIT)
        .expect("send_ack");
    match env.msg {
        Message::SendAck(a) => a,
        other => panic!("{other:?}"),
    }
}

fn sync_all(c: &mut Client, after: u64) -> Vec<Deliver> {
    common::gateway::sync_all(c, after, 7)
}

fn hello_resume(g: &Gateway, user: &str, device: &str, inbox_seq: u64) -> Client {
    let mut c = g.client(Transport::Tcp, CodecId::Protobuf);
    c.hello_with(Hello {
        version: 1,
        token: user.into(),
        device: device.into(),
        codecs: vec![],
        resume: Some(Resume { inbox_seq }),
    })
    .unwrap();
    c
}

#[test]
fn offline_user_gets_everything_in_order_exactly_once() {
    let g = local("");
    let mut a = g.login(Transport::Ws, CodecId::Json, "sender", "d");
    let acks: Vec<SendAck> = (0..25)
        .map(|i| send(&mut a, "offline-bob", &format!("c{i}"), &format!("m{i}")))
        .collect();
    let seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>(), "gapless inbox_seq");
    let mut b = g.login(Transport::Tcp, CodecId::MessagePack, "offline-bob", "phone");
    let got = sync_all(&mut b, 0);
    let bodies: Vec<String> = got.iter().map(|d| d.body.to_string()).collect();
    assert_eq!(bodies, (0..25).map(|i| format!("m{i}")).collect::<Vec<_>>());
    for (d, ack) in got.iter().zip(&acks) {
        assert_eq!((d.inbox_seq, d.mid), (ack.seq, ack.mid));
    }
    // Nothing more arrives: exactly once.
    b.set_read_timeout(Duration::from_millis(300)).unwrap();
    assert!(b.recv().is_err());
}

#[test]
fn each_device_catches_up_from_its_own_cursor() {
    let g = local("");
    let mut a = g.login(Transport::Ws, CodecId::Json, "s2", "d");
    for i in 0..6 {
        send(&mut a, "multi", &format!("c{i}"), &format!("m{i}"));
    }
    // Device 1 reads and acks up to 2, device 2 up to 5.
    for (device, upto) in [("one", 2u64), ("two", 5)] {
        let mut c = g.login(Transport::Tcp, CodecId::Json, "multi", device);
        sync_all(&mut c, 0);
        c.send(&Envelope::new(Message::Ack(Ack {
            inbox_seq: upto,
            group: None,
        })))
        .unwrap();
        // The cursor write is fire-and-forget: a ping round trip orders after it.
        c.send(&Envelope::with_ref(Message::Ping(Default::default()), 77))
            .unwrap();
        c.recv_until(|e| e.reference == Some(77), WAIT).unwrap();
        c.close();
    }
    std::thread::sleep(Duration::from_millis(200));
    for (device, from) in [("one", 3u64), ("two", 6)] {
        let mut c = hello_resume(&g, "multi", device, 0);
        let mut seqs = Vec::new();
        loop {
            let env = c.recv().unwrap();
            match env.msg {
                Message::Deliver(d) => seqs.push(d.inbox_seq),
                Message::Synced(s) => {
                    assert!(!s.more);
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(seqs, (from..=6).collect::<Vec<_>>(), "device {device}");
    }
}

#[test]
fn a_device_that_never_acks_is_retransmitted_to_then_closed_then_syncs() {
    let g = local_with("retransmit_base_ms = 100\nretry_limit = 2", "");
    let mut mute = g.login(Transport::Tcp, CodecId::Protobuf, "mute", "d");
    let mut a = g.login(Transport::Ws, CodecId::Json, "s3", "d");
    send(&mut a, "mute", "c1", "hello?");
    let mut copies = 0;
    let mut closed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match mute.recv() {
            Ok(env) => {
                if let Message::Deliver(d) = env.msg {
                    assert_eq!(d.inbox_seq, 1);
                    copies += 1;
                }
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the mute device is closed past the retry limit");
    assert_eq!(copies, 3, "first push plus 2 retransmits");
    assert!(g.metric("imgw_retransmits_total", &[]) >= 2.0);
    assert!(g.metric("imgw_deliveries", &["state=\"failed\""]) >= 1.0);
    let mut again = g.login(Transport::Tcp, CodecId::Protobuf, "mute", "d");
    let got = sync_all(&mut again, 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "hello?");
}

#[test]
fn a_resent_cmid_gets_the_same_ack_and_is_delivered_once() {
    let g = local("");
    let mut b = g.login(Transport::Ws, CodecId::Json, "dedupe-b", "d");
    let mut a = g.login(Transport::Tcp, CodecId::Hessian, "dedupe-a", "d");
    // b's registration reaches its owner before a sends (ping round trip on b).
    b.send(&Envelope::with_ref(Message::Ping(Default::default()), 5))
        .unwrap();
    b.recv_until(|e| e.reference == Some(5), WAIT).unwrap();
    let first = send(&mut a, "dedupe-b", "same", "once");
    let second = send(&mut a, "dedupe-b", "same", "once");
    assert_eq!(
        (first.mid, first.seq, first.ts),
        (second.mid, second.seq, second.ts)
    );
    let third = send(&mut a, "dedupe-b", "other", "next");
    assert_eq!(third.seq, first.seq + 1);
    let mut seen = BTreeSet::new();
    b.set_read_timeout(Duration::from_millis(500)).unwrap();
    while let Ok(env) = b.recv() {
        if let Message::Deliver(d) = env.msg {
            assert!(seen.insert(d.inbox_seq), "delivered twice: {}", d.inbox_seq);
            let r = Envelope::new(Message::Ack(Ack {
                inbox_seq: d.inbox_seq,
                group: None,
            }));
            b.send(&r).unwrap();
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![first.seq, third.seq]
    );
}

#[test]
fn a_slow_store_sheds_with_overloaded_instead_of_growing() {
    let g = local("[store]\nqueue_depth = 4\nbatch_max = 2\ncommit_delay_ms = 200\n");
    let mut a = g.login(Transport::Tcp, CodecId::Json, "flood", "d");
    for i in 0..60 {
        let r = 1000 + i;
        a.send(&common::gateway::direct("sink", &format!("f{i}"), "x", r))
            .unwrap();
    }
    let (mut acked, mut shed) = (0, 0);
    while acked + shed < 60 {
        let env = a
            .recv_until(
                |e| e.reference.is_some_and(|r| r >= 1000),
                Duration::from_secs(20),
            )
            .unwrap();
        match env.msg {
            Message::SendAck(_) => acked += 1,
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::Overloaded);
                assert!(e.retry_after_ms.is_some());
                shed += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(shed > 0, "a 4-deep queue behind a 200 ms disk must shed");
    assert!(acked > 0);
    assert!(g.metric("imgw_errors_total", &["code=\"overloaded\""]) >= shed as f64);
    // Still responsive.
    a.send(&Envelope::with_ref(Message::Ping(Default::default()), 9))
        .unwrap();
    a.recv_until(|e| e.reference == Some(9), WAIT).unwrap();
}

#[test]
fn group_messages_are_stored_on_the_timeline_before_the_ack() {
    let g = local("");
    let mut a = g.login(Transport::Ws, CodecId::Json, "ta", "d");
    let mut b = g.login(Transport::Tcp, CodecId::Protobuf, "tb", "d");
    for c in [&mut a, &mut b] {
        let r = c.next_ref();
        c.send(&Envelope::with_ref(
            Message::GroupJoin(imgw::protocol::GroupJoin {
                group: "durable-team".into(),
            }),
            r,
        ))
        .unwrap();
        assert_eq!(
            c.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg,
            Message::Ok
        );
    }
    let mut seqs = Vec::new();
    for i in 0..3 {
        let r = a.next_ref();
        a.send(&Envelope::with_ref(
            Message::Send(Send {
                to: Target::Group("durable-team".into()),
                cmid: format!("t{i}").into(),
                kind: None,
                body: format!("team {i}").into(),
                ext: Default::default(),
            }),
            r,
        ))
        .unwrap();
        match a.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg {
            Message::SendAck(ack) => seqs.push(ack.seq),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2, 3], "gapless group timeline");
    for i in 0..3u64 {
        let env = b
            .recv_until(|e| matches!(e.msg, Message::Deliver(_)), WAIT)
            .unwrap();
        let Message::Deliver(d) = env.msg else {
            unreachable!()
        };
        assert_eq!(
            (d.inbox_seq, d.body.to_string()),
            (i + 1, format!("team {i}"))
        );
        assert_eq!(d.to, Some(Target::Group("durable-team".into())));
    }
    assert!(
        g.metric("imgw_store_ops_total", &[]) >= 5.0,
        "joins and appends were stored"
    );
}
