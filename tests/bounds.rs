//! Every bound a client can run into, reached through real sockets (issue 14): the limit
//! holds, the client gets its documented error or close, it is counted, and the other
//! connections are untouched.

mod common;

use std::time::Duration;

use common::gateway::{direct, expect_error, join, ping, send_group, Gateway, DEV_TOML};
use imgw::client::{Client, ClientError, Transport};
use imgw::codec::CodecId;
use imgw::ids::owner_shard;
use imgw::protocol::{frame, Ack, Envelope, ErrorCode, GroupJoin, Message, PresenceSub, Sync};

const WAIT: Duration = Duration::from_secs(5);

/// DEV_TOML with `limits` added to its `[limits]` table.
fn limits(extra: &str) -> String {
    DEV_TOML.replace("[limits]\n", &format!("[limits]\n{extra}\n"))
}

fn dev(extra_limits: &str, shards: &str) -> Gateway {
    Gateway::start(
        &limits(extra_limits),
        &["--shards", shards, "--insecure-dev-auth"],
    )
}

fn local(extra_limits: &str) -> Gateway {
    let args = [
        "--shards",
        "1",
        "--insecure-dev-auth",
        "--durability",
        "local",
    ];
    Gateway::start(&limits(extra_limits), &args)
}

/// The next `deliver` within `within`, or `None`.
fn next_deliver(c: &mut Client, within: Duration) -> Option<imgw::protocol::Deliver> {
    match c.recv_until(|e| matches!(e.msg, Message::Deliver(_)), within) {
        Ok(Envelope {
            msg: Message::Deliver(d),
            ..
        }) => Some(d),
        Err(ClientError::Timeout) => None,
        other => panic!("{other:?}"),
    }
}

#[test]
fn max_conns_refuses_the_connection_past_it_and_frees_its_place_on_close() {
    let g = dev("max_conns = 3", "1");
    let mut held: Vec<Client> = (0..3)
        .map(|i| g.login(Transport::Tcp, CodecId::Json, &format!("u{i}"), "d"))
        .collect();
    // The kernel accepts the socket; the gateway closes it at once (the upgrade or the hello
    // fails, whichever comes first).
    let refused = match Client::connect(&g.config(Transport::Ws, CodecId::Json)) {
        Err(_) => true,
        Ok(mut extra) => extra.hello("u3", "d").is_err(),
    };
    assert!(refused, "a fourth connection was served");
    assert!(g.metric("imgw_closes_total", &["reason=\"limit\""]) >= 1.0);
    for c in &mut held {
        ping(c);
    }
    held.pop().unwrap().close();
    // The closed connection's place is free again.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = Client::connect(&g.config(Transport::Tcp, CodecId::Json)) {
            if c.hello("u4", "d").is_ok() {
                ping(&mut c);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no place after a close"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_inbound_byte_rate_closes_a_flooding_connection_only() {
    // Burst: max(bytes_per_sec, max_frame_bytes) = 8 KiB.
    let g = dev("bytes_per_sec = 8192", "1");
    let mut quiet = g.login(Transport::Tcp, CodecId::Json, "quiet", "d");
    let mut flood = g.login(Transport::Tcp, CodecId::Json, "flood", "d");
    let body = "x".repeat(3000);
    for i in 0..6 {
        if flood
            .send(&direct("quiet", &format!("f{i}"), &body, i + 1))
            .is_err()
        {
            break;
        }
    }
    expect_error(&mut flood, ErrorCode::RateLimited);
    assert!(flood.is_closed_by_peer(WAIT), "the flood was not closed");
    ping(&mut quiet);
    assert!(g.metric("imgw_errors_total", &["code=\"rate_limited\""]) >= 1.0);
}

#[test]
fn a_consumer_that_does_not_read_is_closed_and_the_sender_goes_on() {
    // The sender's own inbound byte bucket must not be what stops it.
    let g = dev("max_outbound_bytes = 16384\nbytes_per_sec = 100000000", "1");
    let mut sender = g.login(Transport::Tcp, CodecId::Json, "sender", "d");
    let mut stuck = g.login(Transport::Tcp, CodecId::Json, "stuck", "d");
    ping(&mut stuck);
    // stuck never reads again: the kernel's buffers fill, then the gateway's 16 KiB. The
    // sender reads its acks (or it would be a slow consumer of them).
    let body = "y".repeat(3500);
    for i in 0..4000u64 {
        sender
            .send(&direct("stuck", &format!("s{i}"), &body, i + 1))
            .unwrap();
        sender
            .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
            .unwrap();
        if i % 200 == 199 && g.metric("imgw_closes_total", &["reason=\"slow_consumer\""]) >= 1.0 {
            break;
        }
    }
    let deadline = std::time::Instant::now() + WAIT;
    while g.metric("imgw_closes_total", &["reason=\"slow_consumer\""]) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no slow-consumer close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ping(&mut sender);
    drop(stuck);
}

#[test]
fn the_delivery_window_holds_back_pushes_until_acked() {
    let g = local("window = 2");
    let mut a = g.login(Transport::Tcp, CodecId::Json, "wa", "d");
    let mut b = g.login(Transport::Tcp, CodecId::Json, "wb", "d");
    ping(&mut b);
    for i in 0..5u64 {
        a.send(&direct("wb", &format!("w{i}"), &format!("m{i}"), i + 1))
            .unwrap();
    }
    for i in 0..5u64 {
        a.recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
            .unwrap_or_else(|e| panic!("ack {i}: {e}"));
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let before = seen.len();
        // At most two unacked deliveries are pushed (a retransmit repeats one of them).
        while let Some(d) = next_deliver(&mut b, Duration::from_millis(400)) {
            if !seen.contains(&d.inbox_seq) {
                seen.push(d.inbox_seq);
            }
            assert!(
                seen.len() - before <= 2,
                "more than the window pushed: {seen:?}"
            );
        }
        assert!(seen.len() > before, "nothing pushed after an ack: {seen:?}");
        let last = *seen.last().unwrap();
        b.send(&Envelope::new(Message::Ack(Ack {
            inbox_seq: last,
            group: None,
        })))
        .unwrap();
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
}

#[test]
fn a_sync_page_holds_at_most_max_sync_limit() {
    let g = local("max_sync_limit = 3");
    let mut a = g.login(Transport::Tcp, CodecId::Json, "sa", "d");
    for i in 0..7u64 {
        a.send(&direct("sb", &format!("q{i}"), &format!("m{i}"), i + 1))
            .unwrap();
        a.recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
            .unwrap();
    }
    let mut b = g.login(Transport::Tcp, CodecId::Json, "sb", "d");
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        b.send(&Envelope::with_ref(
            Message::Sync(Sync {
                after_inbox_seq: after,
                limit: 1000,
                group: None,
            }),
            7,
        ))
        .unwrap();
        let mut page = Vec::new();
        let synced = loop {
            let env = b.recv_until(|_| true, WAIT).unwrap();
            match env.msg {
                Message::Deliver(d) => page.push(d.inbox_seq),
                Message::Synced(s) if env.reference == Some(7) => break s,
                _ => {}
            }
        };
        assert!(page.len() <= 3, "a page of {}", page.len());
        pages.push(page);
        if !synced.more {
            break;
        }
        after = synced.up_to;
    }
    let all: Vec<u64> = pages.concat();
    assert_eq!(all, (1..=7).collect::<Vec<u64>>(), "{pages:?}");
    assert_eq!(pages.len(), 3, "{pages:?}");
}

#[test]
fn presence_subscriptions_stop_at_max_presence_subs() {
    let g = dev("max_presence_subs = 3", "1");
    let mut c = g.login(Transport::Tcp, CodecId::Json, "watcher", "d");
    let sub = |users: &[&str]| {
        Message::PresenceSub(PresenceSub {
            users: users.iter().map(|u| (*u).into()).collect(),
        })
    };
    // Exactly the limit is fine.
    c.send(&Envelope::with_ref(sub(&["a", "b", "c"]), 1))
        .unwrap();
    let env = c.recv_until(|e| e.reference == Some(1), WAIT).unwrap();
    assert_eq!(env.msg, Message::Ok);
    // Past it, refused.
    c.send(&Envelope::with_ref(sub(&["d"]), 2)).unwrap();
    expect_error(&mut c, ErrorCode::LimitExceeded);
    ping(&mut c);
}

#[test]
fn a_user_has_at_most_max_devices_per_user() {
    let g = dev("max_devices_per_user = 2", "2");
    let mut d1 = g.login(Transport::Tcp, CodecId::Json, "many", "d1");
    let mut d2 = g.login(Transport::Ws, CodecId::Protobuf, "many", "d2");
    let mut d3 = g.client(Transport::Tcp, CodecId::MessagePack);
    match d3.hello("many", "d3") {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::LimitExceeded),
        other => panic!("third device: {other:?}"),
    }
    assert!(d3.is_closed_by_peer(WAIT));
    ping(&mut d1);
    ping(&mut d2);
}

#[test]
fn a_user_joins_at_most_max_groups_per_user() {
    let g = dev("max_groups_per_user = 2", "2");
    let mut a = g.login(Transport::Tcp, CodecId::Json, "joiner", "d1");
    let mut a2 = g.login(Transport::Ws, CodecId::Json, "joiner", "d2");
    join(&mut a, "g1");
    join(&mut a2, "g2");
    // Rejoining a group the user is in is not one more.
    join(&mut a, "g1");
    // The user's owner learns of g2 from the group's owner, beside the `ok`: a moment later.
    std::thread::sleep(Duration::from_millis(100));
    for (c, r) in [(&mut a, 5), (&mut a2, 6)] {
        c.send(&Envelope::with_ref(
            Message::GroupJoin(GroupJoin { group: "g3".into() }),
            r,
        ))
        .unwrap();
        expect_error(c, ErrorCode::LimitExceeded);
    }
    // A leave makes room.
    let r = a.next_ref();
    a.send(&Envelope::with_ref(
        Message::GroupLeave(imgw::protocol::GroupLeave { group: "g2".into() }),
        r,
    ))
    .unwrap();
    let env = a.recv_until(|e| e.reference == Some(r), WAIT).unwrap();
    assert_eq!(env.msg, Message::Ok);
    join(&mut a2, "g3");
    // g3 is one of its groups now: both devices get its messages.
    let mut other = g.login(Transport::Tcp, CodecId::Json, "other", "d");
    join(&mut other, "g3");
    assert!(matches!(
        send_group(&mut other, "g3", "x1", "to g3"),
        Message::SendAck(_)
    ));
    assert_eq!(next_deliver(&mut a, WAIT).unwrap().body, "to g3");
    assert_eq!(next_deliver(&mut a2, WAIT).unwrap().body, "to g3");
}

#[test]
fn a_group_stops_at_max_group_members() {
    let g = dev("max_group_members = 2", "1");
    let mut a = g.login(Transport::Tcp, CodecId::Json, "ga", "d");
    join(&mut a, "g1");
    let mut b = g.login(Transport::Tcp, CodecId::Json, "gb", "d");
    let mut c = g.login(Transport::Tcp, CodecId::Json, "gc", "d");
    join(&mut b, "g1");
    c.send(&Envelope::with_ref(
        Message::GroupJoin(GroupJoin { group: "g1".into() }),
        6,
    ))
    .unwrap();
    expect_error(&mut c, ErrorCode::LimitExceeded);
    // The members in reach each other; the refused one is not a member.
    assert!(matches!(
        send_group(&mut a, "g1", "c1", "hi"),
        Message::SendAck(_)
    ));
    assert_eq!(next_deliver(&mut b, WAIT).unwrap().body, "hi");
    assert!(next_deliver(&mut c, Duration::from_millis(300)).is_none());
}

#[test]
fn a_full_shard_outbox_sheds_sends_with_overloaded_and_loses_no_acked_one() {
    let g = dev("shard_outbox_max = 1", "2");
    let from = (0..)
        .map(|i| format!("ob-a{i}"))
        .find(|u| owner_shard("dev", u, 2) == 0)
        .unwrap();
    let to = (0..)
        .map(|i| format!("ob-b{i}"))
        .find(|u| owner_shard("dev", u, 2) == 1)
        .unwrap();
    let mut b = g.login(Transport::Tcp, CodecId::Json, &to, "d");
    let mut a = g.login(Transport::Tcp, CodecId::Json, &from, "d");
    ping(&mut b);
    // Many sends in one write: the shard reads them in one go, faster than its flusher runs.
    const N: u64 = 50;
    let mut burst = Vec::new();
    for i in 0..N {
        let env = direct(&to, &format!("o{i}"), &format!("m{i}"), i + 1);
        frame::write_frame(&mut burst, CodecId::Json, &[], &env).unwrap();
    }
    a.send_raw(&burst).unwrap();
    let (mut acked, mut shed) = (Vec::new(), 0);
    for _ in 0..N {
        let env = a
            .recv_until(
                |e| matches!(e.msg, Message::SendAck(_) | Message::Error(_)),
                WAIT,
            )
            .unwrap();
        match env.msg {
            Message::SendAck(s) => acked.push(s.cmid.to_string()),
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::Overloaded, "{}", e.message);
                assert!(e.retry_after_ms.is_some());
                shed += 1;
            }
            _ => unreachable!(),
        }
    }
    assert!(shed > 0, "nothing was shed with an outbox of 1");
    assert!(g.metric("imgw_cross_shard_shed_total", &[]) >= f64::from(shed));
    // Every acked send is delivered, once, in order.
    let got: Vec<String> = (0..acked.len())
        .map(|_| next_deliver(&mut b, WAIT).unwrap().body.to_string())
        .collect();
    let want: Vec<String> = acked.iter().map(|c| format!("m{}", &c[1..])).collect();
    assert_eq!(got, want);
    assert!(next_deliver(&mut b, Duration::from_millis(300)).is_none());
}
