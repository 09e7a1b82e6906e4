//! Group timelines at durability `local`, through real sockets (SPEC 4): an offline member
//! catches up with `sync {group}`, `ack {group}` moves its group cursor, the inbox sync's last
//! `synced` names the groups with unread messages, and memberships survive a restart.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::gateway::{sync_pages, Gateway};
use imgw::client::{Client, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Ack, Envelope, ErrorCode, GroupJoin, Message, Send, SendAck, Str, Target};

const WAIT: Duration = Duration::from_secs(5);

fn join(c: &mut Client, group: &str) {
    let r = c.next_ref();
    c.send(&Envelope::with_ref(
        Message::GroupJoin(GroupJoin {
            group: group.into(),
        }),
        r,
    ))
    .unwrap();
    let env = c.recv_until(|e| e.reference == Some(r), WAIT).unwrap();
    assert_eq!(env.msg, Message::Ok);
}

fn send_group(c: &mut Client, group: &str, cmid: &str, body: &str) -> SendAck {
    match common::gateway::send_group(c, group, cmid, body) {
        Message::SendAck(a) => a,
        other => panic!("{other:?}"),
    }
}

fn ack_group(c: &mut Client, group: &str, gseq: u64) {
    c.send(&Envelope::new(Message::Ack(Ack {
        inbox_seq: gseq,
        group: Some(group.into()),
    })))
    .unwrap();
}

#[test]
fn offline_member_syncs_the_group_once_in_order_then_nothing_after_ack() {
    let g = Gateway::local();
    for codec in [
        CodecId::Json,
        CodecId::Protobuf,
        CodecId::FlatBuffers,
        CodecId::MessagePack,
        CodecId::Hessian,
    ] {
        let (group, other) = (
            format!("team-{}", codec.name()),
            format!("quiet-{}", codec.name()),
        );
        let (alice, bob) = (
            format!("alice-{}", codec.name()),
            format!("bob-{}", codec.name()),
        );
        let mut a = g.login(Transport::Tcp, codec, &alice, "phone");
        let mut b = g.login(Transport::Ws, codec, &bob, "laptop");
        join(&mut a, &group);
        join(&mut b, &group);
        join(&mut a, &other);
        join(&mut b, &other);
        b.close();
        // Bob is offline while Alice writes 25 messages.
        let mut acked = Vec::new();
        for i in 0..25 {
            let ack = send_group(&mut a, &group, &format!("c{i}"), &format!("m{i}"));
            acked.push(ack.seq);
        }
        assert_eq!(acked, (1..=25).collect::<Vec<u64>>(), "gapless gseq");
        // Back online: the inbox sync lists the unread group (not the quiet one).
        let mut b = g.login(Transport::Ws, codec, &bob, "laptop");
        let (inbox, synced) = sync_pages(&mut b, None, 0, 100);
        assert!(inbox.is_empty(), "{inbox:?}");
        assert_eq!(synced.groups, vec![Str::from(group.as_str())]);
        // Pages of 10, from the stored group cursor: every message once, in order.
        let (got, last) = sync_pages(&mut b, Some(&group), 0, 10);
        let seqs: Vec<u64> = got.iter().map(|d| d.inbox_seq).collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<u64>>());
        let bodies: Vec<String> = got.iter().map(|d| d.body.to_string()).collect();
        assert_eq!(bodies, (0..25).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert!(got.iter().all(
            |d| d.from == alice.as_str() && d.to == Some(Target::Group(group.as_str().into()))
        ));
        assert_eq!(last.group.as_deref(), Some(group.as_str()));
        assert_eq!(last.up_to, 25);
        ack_group(&mut b, &group, last.up_to);
        // The ack is a write: a ping round trip does not prove it is stored, so poll.
        b.close();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut b = g.login(Transport::Ws, codec, &bob, "laptop");
            let (again, s) = sync_pages(&mut b, Some(&group), 0, 10);
            let (_, inbox_synced) = sync_pages(&mut b, None, 0, 100);
            if again.is_empty() && inbox_synced.groups.is_empty() {
                assert_eq!(s.up_to, 25);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still unread after the ack: {again:?} {inbox_synced:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_non_member_cannot_read_or_write_a_group() {
    let g = Gateway::local();
    let mut a = g.login(Transport::Tcp, CodecId::Json, "nm-alice", "d");
    join(&mut a, "private");
    send_group(&mut a, "private", "c1", "secret");
    let mut m = g.login(Transport::Tcp, CodecId::Json, "nm-mallory", "d");
    let r = m.next_ref();
    m.send(&Envelope::with_ref(
        Message::Sync(imgw::protocol::Sync {
            after_inbox_seq: 0,
            limit: 10,
            group: Some("private".into()),
        }),
        r,
    ))
    .unwrap();
    match m.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
}

#[test]
fn memberships_survive_a_sigkill_and_online_members_get_pushes() {
    let mut g = Gateway::local();
    let members = ["rs-alice", "rs-bob", "rs-carol"];
    for m in members {
        let mut c = g.login(Transport::Tcp, CodecId::Protobuf, m, "d");
        join(&mut c, "restart-team");
    }
    // `ok` came after the commit: SIGKILL right away loses nothing.
    g.kill9();
    g.spawn();
    let mut a = g.login(Transport::Tcp, CodecId::Protobuf, "rs-alice", "d");
    let mut b = g.login(Transport::Ws, CodecId::Json, "rs-bob", "d");
    let mut c = g.login(Transport::Tcp, CodecId::MessagePack, "rs-carol", "d");
    // The member side reads the user's groups at login: wait until Bob and Carol get pushes.
    let deadline = std::time::Instant::now() + WAIT;
    let mut i = 0;
    let mut seen: [BTreeSet<String>; 2] = Default::default();
    loop {
        let body = format!("after-restart-{i}");
        let ack = send_group(&mut a, "restart-team", &format!("r{i}"), &body);
        assert_eq!(ack.seq, i + 1);
        for (k, cl) in [&mut b, &mut c].into_iter().enumerate() {
            if let Ok(env) = cl.recv_until(
                |e| matches!(&e.msg, Message::Deliver(d) if d.body == body.as_str()),
                Duration::from_millis(500),
            ) {
                let Message::Deliver(d) = env.msg else {
                    unreachable!()
                };
                assert_eq!(d.to, Some(Target::Group("restart-team".into())));
                seen[k].insert(d.body.to_string());
            }
        }
        if seen.iter().all(|s| !s.is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no push after restart"
        );
        i += 1;
    }
    // A stranger is still refused after the restart.
    let mut m = g.login(Transport::Tcp, CodecId::Json, "rs-mallory", "d");
    let r = m.next_ref();
    m.send(&Envelope::with_ref(
        Message::Send(Send {
            to: Target::Group("restart-team".into()),
            cmid: "x".into(),
            kind: None,
            body: "x".into(),
            ext: Default::default(),
        }),
        r,
    ))
    .unwrap();
    match m.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
}
