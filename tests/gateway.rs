//! The gateway through real sockets: `imgw serve` as a process, clients over WebSocket and raw
//! TCP in every codec (SPEC 3, 4, 5, 7).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::gateway::{
    deliveries, expect_error, expect_kicked, http_post, jwt, jwt_gateway, jwt_login, ping,
    send_group, sync_all, Gateway, DEV_TOML,
};
use imgw::client::{Client, ClientError, Transport};
use imgw::codec::CodecId;
use imgw::ids::owner_shard;
use imgw::protocol::{
    Envelope, ErrorCode, Hello, Message, Ping, PresenceSet, PresenceSub, Send, Status, Str, Target,
};

const WAIT: Duration = Duration::from_secs(5);

/// A user id whose owner is shard `shard` of 2 (tenant "dev").
fn user_on(shard: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|u| owner_shard("dev", u, 2) == shard)
        .unwrap()
}

fn send(c: &mut Client, to: &str, cmid: &str, body: &str) {
    let r = c.next_ref();
    c.send(&Envelope::with_ref(
        Message::Send(Send {
            to: Target::User(to.into()),
            cmid: cmid.into(),
            kind: Some("text".into()),
            body: body.into(),
            ext: [("k", "v")].into_iter().collect(),
        }),
        r,
    ))
    .unwrap();
}

#[test]
fn users_on_different_shards_chat_in_every_codec_and_transport() {
    let g = Gateway::dev();
    for codec in CodecId::ALL {
        for (ta, tb) in [
            (Transport::Ws, Transport::Tcp),
            (Transport::Tcp, Transport::Ws),
        ] {
            let alice = user_on(0, &format!("alice-{}", codec.name()));
            let bob = user_on(1, &format!("bob-{}", codec.name()));
            let mut a = g.login(ta, codec, &alice, "phone");
            let mut b = g.login(tb, codec, &bob, "phone");
            // The owner must know bob's device before alice sends: a ping round trip on b
            // orders after its registration.
            ping(&mut b);
            for i in 0..5 {
                send(&mut a, &bob, &format!("c{i}"), &format!("hello {i} 你好"));
            }
            for i in 0..5u64 {
                let env = a
                    .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
                    .unwrap();
                let Message::SendAck(ack) = env.msg else {
                    unreachable!()
                };
                assert_eq!(ack.cmid, format!("c{i}").as_str());
                assert_eq!(ack.seq, i + 1);
            }
            let got = deliveries(&mut b, 5);
            for (i, d) in got.iter().enumerate() {
                assert_eq!(
                    d.body,
                    format!("hello {i} 你好").as_str(),
                    "{} {ta:?}->{tb:?}",
                    codec.name()
                );
                assert_eq!(d.from, alice.as_str());
                assert_eq!(d.inbox_seq, i as u64 + 1);
                assert_eq!(d.ext.get("k").map(|v| v.as_ref()), Some("v"));
            }
            a.close();
            b.close();
        }
    }
    assert!(g.metric("imgw_frames_in_total", &["op=\"send\""]) >= 50.0);
}

/// `Client::connect_hello` and `Client::connect_url_hello`: over WebSocket the `hello` goes out
/// with the upgrade request (in a frame in the same write, or in the request target's `hello`
/// parameter) and the gateway (one shard, so it owns every user and registers the device in
/// the same turn) answers the 101 and `welcome` in one write, where an upgrade and then a
/// `hello` take two; over raw TCP it is one write either way. Such clients then chat as any
/// other, in every codec, and each is counted once as a handshake.
#[test]
fn a_hello_sent_with_the_upgrade_is_answered_in_one_write() {
    // The clients stay silent for longer than DEV_TOML's idle timeout (1.5 s), whose closes
    // would be writes too.
    let toml = DEV_TOML.replace("idle_timeout_ms = 1500", "idle_timeout_ms = 60000");
    assert_ne!(toml, DEV_TOML);
    let g = Gateway::start(&toml, &["--shards", "1", "--insecure-dev-auth"]);
    // The shard counts a write once it is made, so the client may see the bytes first: wait
    // for the count to reach `want`, then check that nothing follows.
    let writes = |want: f64, what: &str| {
        g.wait_metric("imgw_writes_total", want, WAIT);
        std::thread::sleep(Duration::from_millis(100));
        let n = g.metric("imgw_writes_total", &[]);
        assert_eq!(n, want, "{what}: a write after the answer");
    };
    let hello = |user: &str| Hello::new(user, "d");
    // The counter's baseline: an upgrade, then a `hello` after the 101.
    let mut total = g.metric("imgw_writes_total", &[]);
    let mut late = g.client(Transport::Ws, CodecId::Json);
    late.hello("late", "d").unwrap();
    total += 2.0;
    writes(total, "the 101, then welcome");
    type Connect = fn(
        &imgw::client::ClientConfig,
        Option<std::net::IpAddr>,
        Hello,
    ) -> Result<(Client, imgw::protocol::Welcome), ClientError>;
    let ways: [(&str, Connect); 2] = [
        ("frame", Client::connect_hello),
        ("target", Client::connect_url_hello),
    ];
    let mut early = Vec::new();
    for (way, connect) in ways {
        for (i, codec) in CodecId::ALL.into_iter().enumerate() {
            for transport in Transport::ALL {
                let user = format!("early-{way}-{i}-{}", transport.name());
                let (c, welcome) =
                    connect(&g.config(transport, codec), None, hello(&user)).unwrap();
                assert_eq!(welcome.user, user);
                total += 1.0;
                writes(total, &format!("{user}: the 101 and welcome together"));
                early.push((user, c));
            }
        }
    }
    assert_eq!(
        g.metric("imgw_handshakes_ok_total", &[]),
        1.0 + early.len() as f64
    );
    // Only the WebSocket clients of `connect_url_hello` put it in the target.
    assert_eq!(
        g.metric("imgw_url_hellos_total", &[]),
        CodecId::ALL.len() as f64
    );
    // Each early client sends to the next (and the last to the late one); every one receives
    // exactly its message.
    let n = early.len();
    for k in 0..n {
        let to = early
            .get(k + 1)
            .map_or("late".to_owned(), |(u, _)| u.clone());
        let body = format!("from {}", early[k].0);
        send(&mut early[k].1, &to, &format!("m{k}"), &body);
    }
    let got = deliveries(&mut late, 1);
    assert_eq!(got[0].body, format!("from {}", early[n - 1].0));
    for k in 1..n {
        let got = deliveries(&mut early[k].1, 1);
        assert_eq!(
            got[0].body,
            format!("from {}", early[k - 1].0),
            "{}",
            early[k].0
        );
    }
    // A refused early hello, either way: the 101, then the error, then the close.
    let g = jwt_gateway("");
    for (way, connect) in ways {
        match connect(&g.config(Transport::Ws, CodecId::Json), None, hello("x")) {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::Unauthorized, "{way}: {e:?}")
            }
            other => panic!("{way}: {other:?}"),
        }
    }
}

/// A `hello` parameter that is not base64url is refused with a 400 before any 101; one that
/// decodes to bytes that are no message gets `bad_frame` after the 101, then the close. Both
/// are counted as failed handshakes, and the gateway goes on serving.
#[test]
fn a_bad_hello_in_the_request_target_is_refused_and_counted() {
    let g = Gateway::start(DEV_TOML, &["--shards", "1", "--insecure-dev-auth"]);
    let upgrade = |target: &str| {
        let mut s = TcpStream::connect(g.ws).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut req = Vec::new();
        imgw::ws::ClientHandshake::new([7; 16]).write_request(&mut req, "gw", target, &[], None);
        s.write_all(&req).unwrap();
        let mut got = Vec::new();
        // The gateway closes after its answer: read to the end.
        s.read_to_end(&mut got).unwrap();
        got
    };
    let got = upgrade("/ws?hello=not%20base64");
    assert!(
        got.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(String::from_utf8_lossy(&got).contains("invalid hello query parameter"));
    g.wait_metric("imgw_handshakes_failed_total", 1.0, WAIT);

    let got = upgrade(&imgw::ws::hello_target("/ws", b"{\"op\":"));
    assert!(
        got.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("bad_frame"), "{text}");
    g.wait_metric("imgw_handshakes_failed_total", 2.0, WAIT);
    // The second came in the target; the first was refused before.
    assert_eq!(g.metric("imgw_url_hellos_total", &[]), 1.0);

    let mut c = g.login(Transport::Ws, CodecId::Json, "after", "d");
    ping(&mut c);
    assert_eq!(g.metric("imgw_handshakes_failed_total", &[]), 2.0);
}

#[test]
fn a_user_with_two_devices_gets_each_message_on_both() {
    let g = Gateway::dev();
    let mut a = g.login(Transport::Tcp, CodecId::Protobuf, "ann", "laptop");
    let mut b1 = g.login(Transport::Ws, CodecId::Json, "ben", "phone");
    let mut b2 = g.login(Transport::Tcp, CodecId::MessagePack, "ben", "tablet");
    for b in [&mut b1, &mut b2] {
        ping(b);
    }
    for i in 0..3 {
        send(&mut a, "ben", &format!("m{i}"), &format!("body {i}"));
    }
    // Every send is acked, in order, each with its own mid.
    let mids: Vec<u64> = (0..3)
        .map(|i| {
            let env = a
                .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
                .expect("send_ack");
            let Message::SendAck(ack) = env.msg else {
                unreachable!()
            };
            assert_eq!(ack.cmid, format!("m{i}").as_str());
            ack.mid
        })
        .collect();
    for b in [&mut b1, &mut b2] {
        let got: Vec<(String, u64, u64)> = deliveries(b, 3)
            .iter()
            .map(|d| (d.body.to_string(), d.mid, d.inbox_seq))
            .collect();
        let want: Vec<(String, u64, u64)> = (0..3)
            .map(|i| (format!("body {i}"), mids[i], i as u64 + 1))
            .collect();
        // The user's sequence numbers, the same on both devices.
        assert_eq!(got, want);
    }
}

/// Multi-device consistency (issue 12): what one device of a user sends reaches the user's
/// other online devices (`to` naming the peer, in the sender's inbox), not the device that
/// sent it, and a device that was offline gets the whole conversation at `sync`, in order.
#[test]
fn a_users_own_messages_reach_its_other_devices_and_an_offline_one_at_sync() {
    for durable in [false, true] {
        let g = if durable {
            Gateway::local()
        } else {
            Gateway::dev()
        };
        let ann = user_on(0, "ann");
        let bob = user_on(1, "bob");
        let mut laptop = g.login(Transport::Tcp, CodecId::Json, &ann, "laptop");
        let mut phone = g.login(Transport::Ws, CodecId::Protobuf, &ann, "phone");
        let mut b = g.login(Transport::Tcp, CodecId::MessagePack, &bob, "phone");
        for c in [&mut laptop, &mut phone, &mut b] {
            ping(c);
        }
        for i in 0..3 {
            send(
                &mut laptop,
                &bob,
                &format!("m{i}"),
                &format!("from ann {i}"),
            );
        }
        for d in deliveries(&mut b, 3).iter().enumerate() {
            assert_eq!(d.1.body, format!("from ann {}", d.0).as_str());
            assert_eq!(d.1.to, None, "bob's copy names no peer");
        }
        let copies = deliveries(&mut phone, 3);
        for (i, d) in copies.iter().enumerate() {
            assert_eq!(
                d.body,
                format!("from ann {i}").as_str(),
                "durable {durable}"
            );
            assert_eq!(d.from, ann.as_str());
            assert_eq!(d.to, Some(Target::User(bob.as_str().into())));
            assert_eq!(d.inbox_seq, i as u64 + 1, "ann's own inbox numbers it");
        }
        // bob answers: both of ann's devices get it, and the laptop's next delivery is that
        // answer, not an echo of what it sent itself.
        ping(&mut b);
        send(&mut b, &ann, "r0", "from bob");
        for c in [&mut laptop, &mut phone] {
            let d = deliveries(c, 1).remove(0);
            assert_eq!((d.body.as_ref(), d.to.as_ref()), ("from bob", None));
            assert_eq!(d.inbox_seq, 4);
        }
        if durable {
            // A device that was offline syncs the whole conversation, in order.
            let mut tablet = g.login(Transport::Tcp, CodecId::Hessian, &ann, "tablet");
            let all = sync_all(&mut tablet, 0, 10);
            let got: Vec<(u64, &str, bool)> = all
                .iter()
                .map(|d| (d.inbox_seq, d.body.as_ref(), d.to.is_some()))
                .collect();
            assert_eq!(
                got,
                [
                    (1, "from ann 0", true),
                    (2, "from ann 1", true),
                    (3, "from ann 2", true),
                    (4, "from bob", false)
                ]
            );
        }
    }
}

#[test]
fn presence_changes_reach_subscribers() {
    let g = Gateway::dev();
    let watched = user_on(1, "watched");
    let mut w = g.login(Transport::Ws, CodecId::Json, "watcher", "d");
    let r = w.next_ref();
    w.send(&Envelope::with_ref(
        Message::PresenceSub(PresenceSub {
            users: vec![Str::from(watched.as_str())],
        }),
        r,
    ))
    .unwrap();
    let status = |w: &mut Client| {
        let env = w
            .recv_until(|e| matches!(e.msg, Message::Presence(_)), WAIT)
            .unwrap();
        let Message::Presence(p) = env.msg else {
            unreachable!()
        };
        assert_eq!(p.user, watched.as_str());
        p.status
    };
    assert_eq!(status(&mut w), Status::Offline);
    let mut d = g.login(Transport::Tcp, CodecId::FlatBuffers, &watched, "d1");
    assert_eq!(status(&mut w), Status::Online);
    d.send(&Envelope::with_ref(
        Message::PresenceSet(PresenceSet {
            status: Status::Busy,
        }),
        5,
    ))
    .unwrap();
    assert_eq!(status(&mut w), Status::Busy);
    d.close();
    assert_eq!(status(&mut w), Status::Offline);
}

#[test]
fn silent_connections_are_closed_at_their_timeouts() {
    let g = Gateway::dev();
    // Authenticated but silent: closed at the idle timeout (1.5 s) with goaway.
    let mut idle = g.login(Transport::Tcp, CodecId::Json, "quiet", "d");
    // A live one that pings keeps going.
    let mut live = g.login(Transport::Ws, CodecId::Json, "chatty", "d");
    // Half-open handshakes: a TCP connection that never says hello, and a WebSocket upgrade
    // request that never completes.
    let mut raw_tcp = TcpStream::connect(g.tcp).unwrap();
    let mut raw_ws = TcpStream::connect(g.ws).unwrap();
    raw_ws
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        live.send(&Envelope::new(Message::Ping(Ping { ts: 0 })))
            .unwrap();
        live.recv_until(|e| matches!(e.msg, Message::Pong(_)), WAIT)
            .unwrap();
    }
    let env = idle
        .recv_until(|e| matches!(e.msg, Message::Goaway(_)), WAIT)
        .unwrap();
    assert!(matches!(env.msg, Message::Goaway(ref g) if g.reason == "idle"));
    assert!(idle.is_closed_by_peer(WAIT));
    for s in [&mut raw_tcp, &mut raw_ws] {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = Vec::new();
        // The server closes: read_to_end returns (with an error frame for TCP first).
        s.read_to_end(&mut buf).unwrap();
    }
    assert!(g.metric("imgw_closes_total", &["reason=\"handshake_timeout\""]) >= 2.0);
    assert!(g.metric("imgw_closes_total", &["reason=\"idle\""]) >= 1.0);
    live.send(&Envelope::new(Message::Ping(Ping { ts: 0 })))
        .unwrap();
    live.recv_until(|e| matches!(e.msg, Message::Pong(_)), WAIT)
        .unwrap();
}

/// A peer that sends its last frame and closes at once: the frame and the FIN reach the
/// gateway together, one edge of the epoll set for both. The gateway still reads the end and
/// closes (reason `peer`), well before the idle timeout would (1.5 s here).
#[test]
fn a_frame_followed_at_once_by_the_peers_close_is_read_to_the_end() {
    const CONNS: usize = 32;
    let g = Gateway::dev();
    let clients: Vec<Client> = (0..CONNS)
        .map(|i| g.login(Transport::Tcp, CodecId::Json, &format!("brief-{i}"), "d"))
        .collect();
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.send(&Envelope::new(Message::Ping(Ping { ts: 1 })))
                    .unwrap();
                c.close();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let closes = |reason: &str| g.metric("imgw_closes_total", &[&format!("reason=\"{reason}\"")]);
    let until = std::time::Instant::now() + WAIT;
    while closes("peer") + closes("idle") < CONNS as f64 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        closes("idle"),
        0.0,
        "a peer's close went unseen until the idle timeout"
    );
    assert_eq!(closes("peer"), CONNS as f64);
}

#[test]
fn bad_input_gets_errors_is_counted_and_spares_neighbours() {
    let g = Gateway::start(DEV_TOML, &["--shards", "1", "--insecure-dev-auth"]);
    // One shard: every connection below shares it with this bystander.
    let mut bystander = g.login(Transport::Tcp, CodecId::Json, "bystander", "d");
    let mut peer = g.login(Transport::Ws, CodecId::Json, "peer", "d");

    // Garbage before hello, on both transports.
    let mut c = g.client(Transport::Tcp, CodecId::Json);
    c.send_raw(b"\x00\x01garbage garbage garbage").unwrap();
    assert!(c.is_closed_by_peer(WAIT));
    let mut c = g.client(Transport::Ws, CodecId::Json);
    c.send_raw(b"\x81\x85\x00\x00\x00\x00hello").unwrap(); // a valid frame, but not JSON
    assert!(c.is_closed_by_peer(WAIT));

    // A frame other than hello first.
    let mut c = g.client(Transport::Tcp, CodecId::Protobuf);
    c.send(&Envelope::new(Message::Ping(Ping { ts: 1 })))
        .unwrap();
    expect_error(&mut c, ErrorCode::NotAuthenticated);
    assert!(c.is_closed_by_peer(WAIT));

    // Oversized frame: refused from its header (max_frame_bytes = 4096).
    let mut c = g.login(Transport::Tcp, CodecId::Json, "big", "d");
    let mut head = Vec::new();
    imgw::protocol::frame::Header {
        version: 1,
        op: 5,
        codec: CodecId::Json,
        flags: 0,
        ext_len: 0,
        payload_len: 1 << 20,
    }
    .write(&mut head);
    c.send_raw(&head).unwrap();
    expect_error(&mut c, ErrorCode::FrameTooLarge);
    assert!(c.is_closed_by_peer(WAIT));

    // Unknown op: `unsupported`, and the connection stays open.
    let mut c = g.login(Transport::Ws, CodecId::Json, "curious", "d");
    c.send_payload(200, br#"{"op":"teleport","ref":42,"to":"mars"}"#)
        .unwrap();
    let env = c
        .recv_until(|e| matches!(e.msg, Message::Error(_)), WAIT)
        .unwrap();
    assert_eq!(env.reference, Some(42));
    assert!(matches!(env.msg, Message::Error(ref e) if e.code == ErrorCode::Unsupported));
    c.send(&Envelope::with_ref(Message::Ping(Ping { ts: 3 }), 43))
        .unwrap();
    c.recv_until(|e| matches!(e.msg, Message::Pong(_)), WAIT)
        .unwrap();

    // Sending as another user: a `from` field is ignored, deliveries carry the real sender.
    c.send_payload(
        5,
        br#"{"op":"send","ref":44,"from":"peer","to":{"user":"peer"},"cmid":"x","body":"spoof?"}"#,
    )
    .unwrap();
    let d = deliveries(&mut peer, 1);
    assert_eq!(d[0].from, "curious");

    // Bystander unaffected throughout.
    bystander
        .send(&Envelope::with_ref(Message::Ping(Ping { ts: 9 }), 1))
        .unwrap();
    let env = bystander
        .recv_until(|e| matches!(e.msg, Message::Pong(_)), WAIT)
        .unwrap();
    assert!(matches!(env.msg, Message::Pong(ref p) if p.ts == 9));

    assert!(g.metric("imgw_errors_total", &["code=\"not_authenticated\""]) >= 1.0);
    assert!(g.metric("imgw_errors_total", &["code=\"frame_too_large\""]) >= 1.0);
    assert!(g.metric("imgw_errors_total", &["code=\"unsupported\""]) >= 1.0);
    assert!(g.metric("imgw_errors_total", &["code=\"bad_frame\""]) >= 1.0);
    assert!(g.metric("imgw_closes_total", &["reason=\"protocol\""]) >= 2.0);
}

/// A `hello` in a protocol version the server does not speak is refused with
/// `version_unsupported` naming the versions it speaks, on both transports, and closed.
#[test]
fn an_unsupported_hello_version_is_refused_naming_the_supported_ones() {
    let g = Gateway::dev();
    for transport in [Transport::Ws, Transport::Tcp] {
        let mut c = g.client(transport, CodecId::Json);
        let r = c.hello_with(imgw::protocol::Hello {
            version: 9,
            token: "v9".into(),
            device: "d".into(),
            codecs: vec![],
            resume: None,
        });
        match r {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::VersionUnsupported);
                assert_eq!(
                    e.message,
                    "protocol version 9 not spoken here: this server speaks 1 to 1"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(c.is_closed_by_peer(WAIT));
    }
    assert_eq!(
        g.metric("imgw_errors_total", &["code=\"version_unsupported\""]),
        2.0
    );
    // Version 0 (absent) means 1.
    let mut c = g.client(Transport::Tcp, CodecId::Protobuf);
    let w = c
        .hello_with(imgw::protocol::Hello {
            version: 0,
            token: "v0".into(),
            device: "d".into(),
            codecs: vec![],
            resume: None,
        })
        .unwrap();
    assert_eq!(w.version, 1);
}

/// `limits.max_conns_per_tenant`, and a tenant's own `[tenants.NAME] max_conns`, hold over
/// both shards: the connection past the limit is refused with `limit_exceeded` and closed,
/// other tenants are untouched, a closed connection frees its place, and refusals are
/// counted per tenant.
#[test]
fn a_tenant_at_its_connection_limit_is_refused_and_others_are_not() {
    let g = jwt_gateway("[tenants.acme]\nmax_conns = 3\n");
    // Three of acme's users on both transports (the listeners spread them over the shards).
    let mut acme = Vec::new();
    for (i, t) in [Transport::Ws, Transport::Tcp, Transport::Ws]
        .into_iter()
        .enumerate()
    {
        let mut c = g.client(t, CodecId::Json);
        c.hello(&jwt("acme", &format!("a{i}")), "d").unwrap();
        acme.push(c);
    }
    for t in [Transport::Tcp, Transport::Ws] {
        let mut c = g.client(t, CodecId::Json);
        match c.hello(&jwt("acme", "a9"), "d") {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::LimitExceeded);
                assert_eq!(e.message, "tenant connection limit reached (3)");
            }
            other => panic!("{other:?}"),
        }
        assert!(c.is_closed_by_peer(WAIT));
    }
    // Another tenant is not limited by acme's count.
    let mut others = Vec::new();
    for i in 0..5 {
        let mut c = g.client(Transport::Tcp, CodecId::Protobuf);
        c.hello(&jwt("globex", &format!("g{i}")), "d").unwrap();
        others.push(c);
    }
    assert_eq!(
        g.metric("imgw_tenant_refused_total", &["tenant=\"acme\""]),
        2.0
    );
    assert_eq!(
        g.metric("imgw_tenant_refused_total", &["tenant=\"globex\""]),
        0.0
    );
    // A closed connection gives its place back.
    drop(acme.pop());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut c = g.client(Transport::Ws, CodecId::Json);
        match c.hello(&jwt("acme", "a3"), "d") {
            Ok(_) => break,
            Err(ClientError::Refused(e)) if e.code == ErrorCode::LimitExceeded => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the place was not freed"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// Nothing crosses tenants, whatever ids a client guesses: the same user ids and group id in
/// two tenants are different users and groups. A send from tenant A to "bob" does not reach
/// tenant B's online "bob", A's presence subscription to "bob" sees A's bob (offline), and a
/// message to group "team" from A does not reach B's members of "team".
#[test]
fn nothing_crosses_tenants_whatever_ids_are_guessed() {
    let g = jwt_gateway("");
    let login = |tenant: &str, user: &str, t: Transport| jwt_login(&g, t, tenant, user);
    let mut a_alice = login("tenant-a", "alice", Transport::Ws);
    let mut b_bob = login("tenant-b", "bob", Transport::Tcp);
    let mut b_carol = login("tenant-b", "carol", Transport::Ws);
    // Tenant B's group "team": bob and carol.
    assert_eq!(join(&mut b_bob, "team"), Message::Ok);
    assert_eq!(join(&mut b_carol, "team"), Message::Ok);
    // A's alice sends to "bob" (offline in tenant A: accepted, stored nowhere at memory).
    send(&mut a_alice, "bob", "x1", "for a's bob");
    a_alice
        .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
        .unwrap();
    // A's alice watches "bob": A's bob is offline although B's bob is online.
    let r = a_alice.next_ref();
    a_alice
        .send(&Envelope::with_ref(
            Message::PresenceSub(PresenceSub {
                users: vec![Str::from("bob")],
            }),
            r,
        ))
        .unwrap();
    let env = a_alice
        .recv_until(|e| matches!(e.msg, Message::Presence(_)), WAIT)
        .unwrap();
    let Message::Presence(p) = env.msg else {
        unreachable!()
    };
    assert_eq!(p.status, Status::Offline);
    // A's alice joins "team": A's own group, with her alone; her message reaches nobody in B.
    assert_eq!(join(&mut a_alice, "team"), Message::Ok);
    assert!(matches!(
        send_group(&mut a_alice, "team", "x2", "to a's team"),
        Message::SendAck(_)
    ));
    // B's bob sends to B's team: carol gets it, and A's alice (a member of A's team) does not.
    assert!(matches!(
        send_group(&mut b_bob, "team", "y1", "to b's team"),
        Message::SendAck(_)
    ));
    assert_eq!(deliveries(&mut b_carol, 1)[0].body, "to b's team");
    // The business side pushes to tenant A's "carol": tenant B's carol gets nothing. And to
    // tenant B's: she gets that one.
    for (tenant, id) in [("tenant-a", "pa"), ("tenant-b", "pb")] {
        let body = format!(
            r#"{{"tenant":"{tenant}","user":"carol","type":"note","body":"{id}","from":"ops","id":"{id}"}}"#
        );
        let (status, _) = http_post(g.admin, "/push", &body).unwrap();
        assert_eq!(status, 202);
    }
    assert_eq!(deliveries(&mut b_carol, 1)[0].body, "pb");
    // Nothing of the above reached tenant B's bob or tenant A's alice (nor carol twice).
    for c in [&mut b_bob, &mut a_alice, &mut b_carol] {
        ping(c);
        assert!(c
            .recv_until(
                |e| matches!(e.msg, Message::Deliver(_)),
                Duration::from_millis(300)
            )
            .is_err());
    }
}

/// `[tenants.NAME] sends_per_sec` / `send_burst`: one bucket over all the tenant's
/// connections (on any shard). Past the burst its sends get `rate_limited` with a retry hint,
/// counted per tenant; another tenant's sends are not limited by it.
#[test]
fn a_tenant_send_rate_holds_over_all_its_connections() {
    let g = jwt_gateway("[tenants.acme]\nsends_per_sec = 2\nsend_burst = 10\n");
    let login = |tenant: &str, user: &str, t: Transport| jwt_login(&g, t, tenant, user);
    let mut acme = [
        login("acme", "a0", Transport::Tcp),
        login("acme", "a1", Transport::Ws),
        login("acme", "a2", Transport::Tcp),
    ];
    let mut other = login("globex", "g0", Transport::Tcp);
    let started = std::time::Instant::now();
    let (mut acked, mut limited) = (0u64, 0u64);
    for i in 0..30 {
        let c = &mut acme[i % 3];
        let r = c.next_ref();
        c.send(&Envelope::with_ref(
            Message::Send(Send {
                to: Target::User("peer".into()),
                cmid: format!("t{i}").as_str().into(),
                kind: None,
                body: "x".into(),
                ext: Default::default(),
            }),
            r,
        ))
        .unwrap();
        match c.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg {
            Message::SendAck(_) => acked += 1,
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                assert_eq!(e.message, "tenant send rate exceeded");
                assert!(e.retry_after_ms.is_some_and(|ms| ms > 0));
                limited += 1;
            }
            m => panic!("{m:?}"),
        }
    }
    // The burst of 10, plus 2 a second for the time the 30 sends took.
    let most = 10 + (started.elapsed().as_secs_f64() * 2.0).ceil() as u64;
    assert!(
        acked >= 10 && acked <= most,
        "{acked} acked, at most {most}"
    );
    assert_eq!(acked + limited, 30);
    assert_eq!(
        g.metric("imgw_tenant_rate_limited_total", &["tenant=\"acme\""]),
        limited as f64
    );
    // Another tenant is not limited by acme's bucket.
    for i in 0..30 {
        send(&mut other, "peer", &format!("o{i}"), "x");
        let env = other
            .recv_until(
                |e| matches!(e.msg, Message::SendAck(_) | Message::Error(_)),
                WAIT,
            )
            .unwrap();
        assert!(matches!(env.msg, Message::SendAck(_)), "{env:?}");
    }
}

#[test]
fn bad_tokens_are_refused_with_unauthorized() {
    let secret = "test-secret-0123456789-abcdefghijklmnop";
    let toml = format!("{DEV_TOML}\n[auth]\njwt_hs256_secret = \"{secret}\"\n");
    let g = Gateway::start(&toml, &["--shards", "1"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = imgw::auth::issue_hs256(secret.as_bytes(), "acme", "ok-user", now + 600);
    let expired = imgw::auth::issue_hs256(secret.as_bytes(), "acme", "late", now - 600);
    let forged = imgw::auth::issue_hs256(b"wrong-secret", "acme", "mallory", now + 600);
    for token in [expired.as_str(), forged.as_str(), "not-a-jwt", ""] {
        let mut c = g.client(Transport::Ws, CodecId::Json);
        match c.hello(token, "d") {
            Err(ClientError::Refused(e)) => assert!(
                matches!(e.code, ErrorCode::Unauthorized | ErrorCode::BadRequest),
                "{token}: {e:?}"
            ),
            other => panic!("{token}: {other:?}"),
        }
        assert!(c.is_closed_by_peer(WAIT));
    }
    let mut c = g.client(Transport::Tcp, CodecId::Hessian);
    let w = c.hello(&good, "d").unwrap();
    assert_eq!(w.user, "ok-user");
    assert!(g.metric("imgw_errors_total", &["code=\"unauthorized\""]) >= 3.0);
}

#[test]
fn sigterm_drains_with_goaway_and_exits() {
    let mut g = Gateway::dev();
    let mut clients: Vec<Client> = (0..4)
        .map(|i| {
            g.login(
                Transport::ALL[i % 2],
                CodecId::Json,
                &format!("drainee-{i}"),
                "d",
            )
        })
        .collect();
    g.sigterm();
    for c in &mut clients {
        let env = c
            .recv_until(|e| matches!(e.msg, Message::Goaway(_)), WAIT)
            .unwrap();
        let Message::Goaway(ga) = env.msg else {
            unreachable!()
        };
        assert_eq!(ga.reason, "drain");
        assert!(ga.reconnect_ms <= 1000);
        assert!(c.is_closed_by_peer(WAIT));
    }
    let status = g
        .wait_exit(Duration::from_secs(10))
        .expect("imgw exits after drain");
    assert!(status.success(), "{status}");
    // The process is gone, and its listeners with it. (A connect to its old port is no proof
    // either way: another test's gateway on port 0 may get the freed port at once.)
}

fn join(c: &mut Client, group: &str) -> Message {
    let r = c.next_ref();
    c.send(&Envelope::with_ref(
        Message::GroupJoin(imgw::protocol::GroupJoin {
            group: group.into(),
        }),
        r,
    ))
    .unwrap();
    c.recv_until(|e| e.reference == Some(r), WAIT).unwrap().msg
}

#[test]
fn group_messages_reach_every_online_member_once_per_device() {
    let g = Gateway::dev();
    let mut a = g.login(Transport::Ws, CodecId::Json, "ga", "d");
    let mut b1 = g.login(Transport::Tcp, CodecId::Protobuf, "gb", "phone");
    let mut b2 = g.login(Transport::Ws, CodecId::MessagePack, "gb", "laptop");
    let mut c = g.login(Transport::Tcp, CodecId::FlatBuffers, "gc", "d");
    let mut outsider = g.login(Transport::Ws, CodecId::Json, "gx", "d");
    for m in [&mut a, &mut b1, &mut c] {
        assert_eq!(join(m, "team"), Message::Ok);
    }
    // Not a member: forbidden; no such group: not_found.
    assert!(
        matches!(send_group(&mut outsider, "team", "x1", "hi"), Message::Error(e) if e.code == ErrorCode::Forbidden)
    );
    assert!(
        matches!(send_group(&mut outsider, "nope", "x2", "hi"), Message::Error(e) if e.code == ErrorCode::NotFound)
    );
    let stage =
        |stage: &str| g.metric("imgw_stage_seconds_count", &[&format!("stage=\"{stage}\"")]);
    let written_before = stage("output_wait");
    for i in 0..3u64 {
        let Message::SendAck(ack) =
            send_group(&mut a, "team", &format!("g{i}"), &format!("to all {i}"))
        else {
            panic!("no send_ack")
        };
        assert_eq!(ack.seq, i + 1, "group timeline sequence");
    }
    for m in [&mut b1, &mut b2, &mut c] {
        let got = deliveries(m, 3);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.to, Some(Target::Group("team".into())));
            assert_eq!(d.inbox_seq, i as u64 + 1);
            assert_eq!(d.from, "ga");
            assert_eq!(d.body, format!("to all {i}").as_str());
        }
    }
    // The stage latencies saw the batches between shards and the outputs being written, and
    // the histogram's buckets are cumulative up to the count.
    assert!(stage("shard_queue") > 0.0);
    assert!(
        stage("output_wait") >= written_before + 3.0,
        "{}",
        g.metrics()
    );
    let inf = g.metric(
        "imgw_stage_seconds_bucket",
        &["stage=\"output_wait\"", "le=\"+Inf\""],
    );
    assert_eq!(inf, stage("output_wait"));
    // The connection drivers timed their passes: every shard served connections.
    for shard in ["0", "1"] {
        let label = format!("shard=\"{shard}\"");
        let passes = g.metric("imgw_driver_pass_seconds_count", &[&label]);
        assert!(passes > 0.0, "shard {shard}: {}", g.metrics());
    }
    // The sender does not get its own message; a member who left gets nothing more.
    let r = c.next_ref();
    c.send(&Envelope::with_ref(
        Message::GroupLeave(imgw::protocol::GroupLeave {
            group: "team".into(),
        }),
        r,
    ))
    .unwrap();
    c.recv_until(|e| e.reference == Some(r), WAIT).unwrap();
    send_group(&mut a, "team", "g9", "after leave");
    assert_eq!(deliveries(&mut b1, 1)[0].body, "after leave");
    c.set_read_timeout(Duration::from_millis(300)).unwrap();
    assert!(c
        .recv_until(
            |e| matches!(e.msg, Message::Deliver(_)),
            Duration::from_millis(300)
        )
        .is_err());
    a.set_read_timeout(Duration::from_millis(300)).unwrap();
    assert!(a
        .recv_until(
            |e| matches!(e.msg, Message::Deliver(_)),
            Duration::from_millis(300)
        )
        .is_err());
}

/// A group message that arrives while the shard's driver is still writing the one before to
/// hundreds of members is read in the middle of that pass (`runtime.poll_within_pass_us`, 0
/// here: a look after every few connections) and reaches the members the pass has not
/// written yet there, the others in the next pass. However the passes cut the stream, every
/// member gets every message exactly once and in the group's order.
#[test]
fn group_messages_read_in_the_middle_of_a_fan_out_reach_every_member_once_in_order() {
    const MEMBERS: usize = 200;
    const BURSTS: u64 = 8;
    const PER_BURST: u64 = 5;
    let toml = r#"
[limits]
idle_timeout_ms = 60000
heartbeat_ms = 30000
sends_per_sec = 10000
send_burst = 10000

[runtime]
pin = false
poll_within_pass_us = 0
"#;
    let g = Gateway::start(toml, &["--shards", "1", "--insecure-dev-auth"]);
    let codecs = [CodecId::Json, CodecId::Protobuf, CodecId::MessagePack];
    let mut members: Vec<Client> = (0..MEMBERS)
        .map(|i| {
            g.login(
                Transport::ALL[i % 2],
                codecs[i % 3],
                &format!("wide-{i}"),
                "d",
            )
        })
        .collect();
    for m in members.iter_mut() {
        common::gateway::join(m, "wide");
    }
    let polls = || g.metric("imgw_driver_polls_within_pass_total", &[]);
    let polls_before = polls();
    let shared = || g.metric("imgw_frames_shared_total", &[]);
    let shared_before = shared();
    let (sender, rest) = members.split_first_mut().unwrap();
    // Bursts of sends that do not wait for their `send_ack`, a millisecond apart: a burst
    // arrives while the driver is still writing the one before to the other 199 members.
    let mut refs = Vec::new();
    for b in 0..BURSTS {
        for k in 0..PER_BURST {
            let n = b * PER_BURST + k + 1;
            let r = sender.next_ref();
            let send = common::gateway::to_group("wide", &format!("w{n}"), &format!("m{n}"), r);
            sender.send(&send).unwrap();
            refs.push(r);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (i, r) in refs.iter().enumerate() {
        let env = sender
            .recv_until(|e| e.reference == Some(*r), WAIT)
            .expect("send_ack");
        let Message::SendAck(ack) = env.msg else {
            panic!("send {i}: {:?}", env.msg)
        };
        assert_eq!(
            ack.seq,
            i as u64 + 1,
            "the group's sequence follows the sends"
        );
    }
    let total = BURSTS * PER_BURST;
    for (i, m) in rest.iter_mut().enumerate() {
        let got: Vec<(u64, String)> = deliveries(m, total as usize)
            .into_iter()
            .map(|d| (d.inbox_seq, d.body.to_string()))
            .collect();
        let want: Vec<(u64, String)> = (1..=total).map(|n| (n, format!("m{n}"))).collect();
        assert_eq!(got, want, "member {}: every message once, in order", i + 1);
    }
    // Nothing beyond them: no second copy of any.
    for m in rest.iter_mut() {
        assert!(m
            .recv_until(
                |e| matches!(e.msg, Message::Deliver(_)),
                Duration::from_millis(20)
            )
            .is_err());
    }
    assert!(
        polls() > polls_before,
        "the driver looked for input in the middle of its fan-out passes: {}",
        g.metrics()
    );
    // The members' outputs shared the frames (one copy per codec and transport) rather than
    // each holding its own: most of the 199 times 40 deliveries.
    let shared_n = shared() - shared_before;
    assert!(
        shared_n > ((MEMBERS as u64 - 1) * total / 2) as f64,
        "{shared_n} deliveries shared"
    );
}

/// A group large enough that its owner shard keeps the list of its members' routes between
/// messages (roster.rs, `MIN_KEPT_ROUTES`): the list follows devices that come and go while
/// their users stay online. Every member owned by one shard, so one list holds them all.
#[test]
fn a_large_groups_kept_routes_follow_devices_that_come_and_go() {
    let g = Gateway::dev();
    let users: Vec<String> = (0..)
        .map(|i| format!("big-{i}"))
        .filter(|u| owner_shard("dev", u, 2) == 0)
        .take(20)
        .collect();
    let codecs = [CodecId::Json, CodecId::Protobuf];
    let mut members: Vec<Client> = users
        .iter()
        .enumerate()
        .map(|(i, u)| g.login(Transport::Ws, codecs[i % 2], u, "d1"))
        .collect();
    for m in members.iter_mut() {
        assert_eq!(join(m, "big"), Message::Ok);
    }
    let (sender, rest) = members.split_first_mut().unwrap();
    // Each member's deliveries of one message: exactly one, the expected one.
    let expect = |c: &mut Client, seq: u64, body: &str| {
        let d = deliveries(c, 1).remove(0);
        assert_eq!((d.inbox_seq, d.body.as_str()), (seq, body));
    };
    send_group(sender, "big", "m1", "one");
    for m in rest.iter_mut() {
        expect(m, 1, "one");
    }
    // A second device of a member who is online already: no change of who is online, only
    // of the member's devices.
    let mut second = g.login(Transport::Tcp, CodecId::MessagePack, &users[1], "d2");
    send_group(sender, "big", "m2", "two");
    for m in rest.iter_mut() {
        expect(m, 2, "two");
    }
    expect(&mut second, 2, "two");
    // The first device goes; a connection that may take its slot is no member.
    let first = members.remove(1);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let mut outsiders: Vec<Client> = (0..4)
        .map(|i| g.login(Transport::Ws, CodecId::Json, &format!("out-{i}"), "d"))
        .collect();
    let (sender, rest) = members.split_first_mut().unwrap();
    send_group(sender, "big", "m3", "three");
    for m in rest.iter_mut() {
        expect(m, 3, "three");
    }
    expect(&mut second, 3, "three");
    // Nothing else reached anyone: not a second copy, not the outsiders, not the sender.
    for c in rest
        .iter_mut()
        .chain(outsiders.iter_mut())
        .chain([&mut second, sender])
    {
        assert!(c
            .recv_until(
                |e| matches!(e.msg, Message::Deliver(_)),
                Duration::from_millis(100)
            )
            .is_err());
    }
}

/// The next delivery on `c`, with what the recipient sees of a push: (from, type, body, to).
fn next_push(c: &mut Client) -> (String, Option<String>, String, Option<Target>) {
    let d = deliveries(c, 1).remove(0);
    (
        d.from.to_string(),
        d.kind.map(|k| k.to_string()),
        d.body.to_string(),
        d.to,
    )
}

#[test]
fn admin_push_reaches_users_groups_and_offline_inboxes() {
    let g = Gateway::local();
    let push = |json: &str| http_post(g.admin, "/push", json).expect("POST /push");
    let mut carol = g.login(Transport::Ws, CodecId::Json, "carol", "phone");
    let first = r#"{"tenant":"dev","user":"carol","type":"promo","body":"hello from admin","from":"shop","id":"p1"}"#;
    let (status, body) = push(first);
    assert_eq!((status, body.trim()), (202, r#"{"id":"p1"}"#));
    assert_eq!(
        next_push(&mut carol),
        (
            "shop".into(),
            Some("promo".into()),
            "hello from admin".into(),
            None
        )
    );
    // The same record again (a retry: same sender and id) is accepted and stored once: the
    // next delivery is the next push.
    assert_eq!(push(first).0, 202);
    let (status, body) = push(r#"{"tenant":"dev","user":"carol","body":"second"}"#);
    assert_eq!(status, 202);
    assert!(body.contains(r#""id":"admin:"#), "{body}");
    let (from, kind, text, _) = next_push(&mut carol);
    assert_eq!(
        (from.as_str(), kind, text.as_str()),
        ("system", None, "second")
    );
    // A group push reaches its members.
    assert!(matches!(join(&mut carol, "news"), Message::Ok));
    assert_eq!(
        push(r#"{"tenant":"dev","group":"news","body":"to the group","from":"ops"}"#).0,
        202
    );
    let (from, _, text, to) = next_push(&mut carol);
    assert_eq!((from.as_str(), text.as_str()), ("ops", "to the group"));
    assert_eq!(to, Some(Target::Group("news".into())));
    // A user who is offline finds it in the inbox, stored once. (202 means queued: the push
    // may be stored after dave's hello, and then arrives live, possibly besides the sync,
    // with the same inbox_seq, which is what clients dedupe by.)
    assert_eq!(
        push(r#"{"tenant":"dev","user":"dave","body":"while you were away"}"#).0,
        202
    );
    let mut dave = g.login(Transport::Tcp, CodecId::Protobuf, "dave", "laptop");
    let mut got: std::collections::BTreeMap<u64, String> = sync_all(&mut dave, 0, 10)
        .into_iter()
        .map(|d| (d.inbox_seq, d.body.to_string()))
        .collect();
    if got.is_empty() {
        // Stored after the sync: it comes live.
        let d = deliveries(&mut dave, 1).remove(0);
        got.insert(d.inbox_seq, d.body.to_string());
    }
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [(1, "while you were away".to_string())]
    );
    // Bad records and methods are refused and counted.
    for bad in [
        "not json",
        r#"{"tenant":"dev","body":"no target"}"#,
        r#"{"tenant":"dev","user":"carol","group":"news","body":"both"}"#,
    ] {
        assert_eq!(push(bad).0, 400, "{bad}");
    }
    assert_eq!(common::gateway::http_get(g.admin, "/push").unwrap().0, 405);
    let pushes = |outcome: &str| {
        let o = format!(r#"outcome="{outcome}""#);
        g.metric("imgw_admin_requests_total", &[r#"path="/push""#, &o])
    };
    assert_eq!((pushes("queued"), pushes("refused")), (5.0, 3.0));
}

#[test]
fn admin_kick_closes_every_device_of_the_user_only() {
    let g = Gateway::local();
    let mut phone = g.login(Transport::Ws, CodecId::Json, "eve", "phone");
    let mut laptop = g.login(Transport::Tcp, CodecId::Protobuf, "eve", "laptop");
    let mut other = g.login(Transport::Tcp, CodecId::MessagePack, "frank", "phone");
    let (status, body) = http_post(g.admin, "/kick", r#"{"tenant":"dev","user":"eve"}"#).unwrap();
    assert_eq!(status, 202, "{body}");
    for c in [&mut phone, &mut laptop] {
        expect_kicked(c);
    }
    // Another user is untouched, and the kicked user may log in again.
    ping(&mut other);
    ping(&mut g.login(Transport::Ws, CodecId::Json, "eve", "phone"));
    for bad in ["{}", r#"{"tenant":"dev","user":""}"#, "not json"] {
        assert_eq!(http_post(g.admin, "/kick", bad).unwrap().0, 400, "{bad}");
    }
    let kicks = |outcome: &str| {
        let o = format!(r#"outcome="{outcome}""#);
        g.metric("imgw_admin_requests_total", &[r#"path="/kick""#, &o])
    };
    assert_eq!((kicks("queued"), kicks("refused")), (1.0, 3.0));
}

#[test]
fn listeners_on_port_0_get_their_own_ports_and_the_ports_file_names_them() {
    // Gateway::start listens on port 0 and reads the addresses back from --ports-file.
    let a = Gateway::dev();
    let b = Gateway::dev();
    let ports: std::collections::BTreeSet<u16> = [a.ws, a.tcp, a.admin, b.ws, b.tcp, b.admin]
        .iter()
        .map(|p| p.port())
        .collect();
    assert_eq!(ports.len(), 6, "every listener its own port");
    assert!(!ports.contains(&0));
    // Both transports answer on the reported ports of each gateway (2 shards each).
    for g in [&a, &b] {
        for t in [Transport::Ws, Transport::Tcp] {
            let mut c = g.login(t, CodecId::Json, "porty", "d");
            let r = c.next_ref();
            c.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), r))
                .unwrap();
            let env = c
                .recv_until(|e| e.reference == Some(r), Duration::from_secs(5))
                .unwrap();
            assert!(matches!(env.msg, Message::Pong(_)), "{env:?}");
        }
    }
}

/// Message ids stay unique across a restart even after a burst of more than one id per
/// millisecond: ids count up from the clock's milliseconds, so such a burst runs ahead of the
/// clock, and the restarted gateway must start above the lease it wrote (src/ids.rs) rather
/// than at the clock, or it would hand out the burst's ids again.
#[test]
fn message_ids_grow_across_a_restart_after_a_burst_faster_than_the_clock() {
    const BURST: usize = 5_000;
    let mut g = Gateway::dev();
    let mut a = g.login(Transport::Tcp, CodecId::Protobuf, "mid-a", "d");
    let mut highest = 0;
    let mut acked = 0;
    let started = std::time::Instant::now();
    for chunk in 0..BURST / 500 {
        for i in 0..500 {
            send(&mut a, "mid-b", &format!("c{chunk}-{i}"), "x");
        }
        for _ in 0..500 {
            let env = a
                .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
                .unwrap();
            let Message::SendAck(ack) = env.msg else {
                unreachable!()
            };
            highest = highest.max(ack.mid);
            acked += 1;
        }
    }
    assert_eq!(acked, BURST);
    // The point of the test: the burst ran ahead of the clock by more than the restart takes.
    let burst_ms = started.elapsed().as_millis() as usize;
    assert!(burst_ms < BURST / 2, "the burst took {burst_ms} ms");
    drop(a);
    g.kill9();
    g.spawn();
    let mut a = g.login(Transport::Tcp, CodecId::Protobuf, "mid-a", "d");
    send(&mut a, "mid-b", "after", "x");
    let env = a
        .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
        .unwrap();
    let Message::SendAck(ack) = env.msg else {
        unreachable!()
    };
    assert!(
        ack.mid > highest,
        "mid {} after the restart, {highest} before it",
        ack.mid
    );
}

/// A second gateway started on a port the first one serves is refused at start instead of
/// joining its SO_REUSEPORT group: otherwise the kernel splits the connections between two
/// gateways that know nothing of each other (a user's devices on both: the cause of the rare
/// `a_user_with_two_devices_gets_each_message_on_both` failure when tests guessed free ports).
#[test]
fn a_second_gateway_on_a_served_port_is_refused() {
    let g = Gateway::dev();
    for (flag, taken) in [("--ws-listen", g.ws), ("--tcp-listen", g.tcp)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgw"))
            .args(["serve", "--insecure-dev-auth", "--shards", "1"])
            .args(["--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args([flag, &taken.to_string()])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run imgw");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: {stderr}");
        assert!(
            stderr.contains("already in use by another process"),
            "{flag}: {stderr}"
        );
    }
    // The first one still serves.
    let mut c = g.login(Transport::Tcp, CodecId::Json, "still-here", "d");
    ping(&mut c);
}

/// `server.share_ports = true` is the opt-in to what the test above refuses: several
/// gateways on one port on purpose (bench/many_conns.sh, a host whose per-process descriptor
/// limit is below the connections wanted). The second one starts on the first one's port and
/// the kernel gives it a share of the connections.
#[test]
fn a_gateway_with_share_ports_joins_a_served_port() {
    let g = Gateway::dev();
    let dir = std::env::temp_dir().join(format!("imgw-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("imgw.toml"), "[server]\nshare_ports = true\n").unwrap();
    let ports_file = dir.join("ports.json");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args([
            "serve",
            "--insecure-dev-auth",
            "--shards",
            "1",
            "--log",
            "error",
        ])
        .arg("--config")
        .arg(dir.join("imgw.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--ports-file")
        .arg(&ports_file)
        .args([
            "--ws-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--tcp-listen", &g.tcp.to_string()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("run imgw");
    let deadline = std::time::Instant::now() + WAIT;
    let admin = loop {
        if let Some(p) = imgw::runtime::Ports::read(&ports_file) {
            if common::gateway::http_get(p.admin, "/readyz").is_ok_and(|(code, _)| code == 200) {
                break p.admin;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // 32 connections over the shared port: the kernel spreads them by their addresses, so
    // each gateway gets some (all 32 on one of two listeners: about 1 in 2^31).
    let clients: Vec<Client> = (0..32)
        .map(|i| g.login(Transport::Tcp, CodecId::Json, &format!("share-{i}"), "d"))
        .collect();
    let metrics = common::gateway::http_get(admin, "/metrics").unwrap().1;
    let held: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("imgw_connections{") || l.starts_with("imgw_connections "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let _ = second.kill();
    let _ = second.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        held > 0.0,
        "the second gateway took none of 32 connections:\n{metrics}"
    );
    drop(clients);
}
