//! Client tests against tiny in-test servers on 127.0.0.1:0, one thread per connection, built
//! on the sans-IO server side of `crate::ws` and `crate::protocol::frame`. Every wait is bounded.

use std::net::{Ipv4Addr, TcpListener};
use std::thread::{self, JoinHandle};

use super::*;
use crate::protocol::frame::{push_extension, write_frame, EXT_TRACE_ID};
use crate::protocol::{samples, ErrorCode, Limits as WireLimits, Pong};
use crate::ws::{write_binary, write_close, write_ping, write_text, Handshake, HandshakeConfig};

/// Upper bound of any single wait in these tests (they finish far sooner).
const T: Duration = Duration::from_secs(2);

/// What the test server got.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // a short-lived test value
enum Got {
    /// A message, whether it came in a WebSocket text frame, and its raw-TCP extensions.
    Msg(Envelope, bool, Bytes),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
    Eof,
}

/// The server end of one connection.
struct Srv {
    sock: TcpStream,
    peer: SocketAddr,
    buf: BytesMut,
    transport: Transport,
    codec: CodecId,
    dec: Decoder,
}

impl Srv {
    /// Accepts one connection; for WebSocket, runs the upgrade (Origin allow-list:
    /// `http://ok.example`). A refused upgrade is answered, and `None` returned.
    fn accept(listener: &TcpListener, transport: Transport, codec: CodecId) -> Option<Srv> {
        let (sock, peer) = listener.accept().unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        let mut srv = Srv {
            sock,
            peer,
            buf: BytesMut::new(),
            transport,
            codec,
            dec: Decoder::new(Role::Server, Limits::default()),
        };
        if transport == Transport::Ws {
            let cfg = HandshakeConfig {
                allowed_origins: vec!["http://ok.example".to_owned()],
                ..HandshakeConfig::default()
            };
            let mut out = Vec::new();
            loop {
                assert!(srv.read_more(), "eof during the upgrade");
                match ws::accept(&cfg, &srv.buf, &mut out) {
                    Handshake::Incomplete => {}
                    Handshake::Accepted(up) => {
                        assert_eq!(up.codec, codec);
                        srv.buf.advance(up.consumed);
                        srv.sock.write_all(&out).unwrap();
                        break;
                    }
                    Handshake::Rejected(_) => {
                        srv.sock.write_all(&out).unwrap();
                        return None;
                    }
                }
            }
        }
        Some(srv)
    }

    fn read_more(&mut self) -> bool {
        let mut scratch = [0u8; 4096];
        match self.sock.read(&mut scratch) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&scratch[..n]);
                true
            }
            Err(e) => panic!("server read: {e}"),
        }
    }

    fn next(&mut self) -> Got {
        loop {
            match self.transport {
                Transport::Tcp => {
                    if let Some(f) = FrameDecoder::default().decode(&mut self.buf).unwrap() {
                        assert_eq!(f.header.codec, self.codec);
                        let env = self.codec.decode_bytes(&f.payload).unwrap();
                        assert_eq!(f.header.op, env.msg.op() as u8);
                        return Got::Msg(env, false, f.ext);
                    }
                }
                Transport::Ws => {
                    let mut input: &mut [u8] = &mut self.buf[..];
                    let before = input.len();
                    let got = match self.dec.next_event(&mut input).unwrap() {
                        Some(Event::Text(t)) => Some(Got::Msg(
                            self.codec.decode(t.as_bytes()).unwrap(),
                            true,
                            Bytes::new(),
                        )),
                        Some(Event::Binary(b)) => {
                            Some(Got::Msg(self.codec.decode(b).unwrap(), false, Bytes::new()))
                        }
                        Some(Event::Ping(p)) => Some(Got::Ping(p.to_vec())),
                        Some(Event::Pong(p)) => Some(Got::Pong(p.to_vec())),
                        Some(Event::Close { code, .. }) => {
                            Some(Got::Close(code.map(CloseCode::as_u16)))
                        }
                        None => None,
                    };
                    let consumed = before - input.len();
                    self.buf.advance(consumed);
                    if let Some(g) = got {
                        return g;
                    }
                }
            }
            if !self.read_more() {
                return Got::Eof;
            }
        }
    }

    fn send_with_ext(&mut self, env: &Envelope, ext: &[u8]) {
        let mut out = Vec::new();
        match self.transport {
            Transport::Tcp => write_frame(&mut out, self.codec, ext, env).unwrap(),
            Transport::Ws => {
                let mut payload = Vec::new();
                self.codec.encode(env, &mut payload).unwrap();
                if self.codec.is_text() {
                    write_text(&mut out, std::str::from_utf8(&payload).unwrap());
                } else {
                    write_binary(&mut out, &payload);
                }
            }
        }
        self.raw(&out);
    }

    fn send(&mut self, env: &Envelope) {
        self.send_with_ext(env, &[]);
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// Echoes every message (with its extensions) until the client closes; answers pings.
    fn echo(mut self) {
        loop {
            match self.next() {
                Got::Msg(env, text, ext) => {
                    if self.transport == Transport::Ws {
                        assert_eq!(text, self.codec.is_text());
                    }
                    self.send_with_ext(&env, &ext);
                }
                Got::Ping(p) => {
                    let mut out = Vec::new();
                    ws::frame::write_pong(&mut out, &p);
                    self.raw(&out);
                }
                Got::Pong(_) => {}
                Got::Close(code) => {
                    let mut out = Vec::new();
                    write_close(&mut out, code.and_then(CloseCode::from_u16), "");
                    self.raw(&out);
                    return;
                }
                Got::Eof => return,
            }
        }
    }
}

/// Starts a one-connection server running `f`; returns the client configuration for it.
fn serve<R: std::marker::Send + 'static>(
    transport: Transport,
    codec: CodecId,
    f: impl FnOnce(Srv) -> R + std::marker::Send + 'static,
) -> (ClientConfig, JoinHandle<Option<R>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || Srv::accept(&listener, transport, codec).map(f));
    let mut cfg = ClientConfig::new(transport, codec, addr);
    cfg.read_timeout = T;
    (cfg, handle)
}

fn pong(ts: u64) -> Envelope {
    Envelope::new(Message::Pong(Pong { ts }))
}

#[test]
fn every_codec_round_trips_over_both_transports() {
    let runs: Vec<_> = Transport::ALL
        .into_iter()
        .flat_map(|t| CodecId::ALL.into_iter().map(move |c| (t, c)))
        .map(|(t, c)| {
            thread::spawn(move || {
                let (cfg, server) = serve(t, c, Srv::echo);
                let mut client = Client::connect(&cfg).unwrap();
                assert_eq!((client.transport(), client.codec()), (t, c));
                for (name, env) in samples::all() {
                    client.send(&env).unwrap();
                    assert_eq!(
                        client.recv().unwrap(),
                        env,
                        "{} {} {name}",
                        t.name(),
                        c.name()
                    );
                }
                if t == Transport::Tcp {
                    let mut ext = Vec::new();
                    push_extension(&mut ext, EXT_TRACE_ID, b"trace-1").unwrap();
                    client.send_with_ext(&pong(9), &ext).unwrap();
                    let (env, got) = client.recv_with_ext().unwrap();
                    assert_eq!((env, &got[..]), (pong(9), &ext[..]));
                } else {
                    assert!(matches!(
                        client.send_with_ext(&pong(9), b"\0\x01\0\0"),
                        Err(ClientError::Protocol(_))
                    ));
                }
                client.close();
                server.join().unwrap().unwrap();
            })
        })
        .collect();
    for r in runs {
        r.join().unwrap();
    }
}

#[test]
fn ws_ping_is_answered_with_pong() {
    let (cfg, server) = serve(Transport::Ws, CodecId::MessagePack, |mut srv| {
        let mut out = Vec::new();
        write_ping(&mut out, b"hb-1");
        srv.raw(&out);
        let answer = srv.next();
        srv.send(&pong(1));
        answer
    });
    let mut client = Client::connect(&cfg).unwrap();
    assert_eq!(client.recv().unwrap(), pong(1));
    assert_eq!(server.join().unwrap(), Some(Got::Pong(b"hb-1".to_vec())));
}

#[test]
fn ws_server_close_gives_closed_with_code() {
    let (cfg, server) = serve(Transport::Ws, CodecId::Json, |mut srv| {
        let mut out = Vec::new();
        write_close(&mut out, Some(CloseCode::Private(4001)), "bye");
        srv.raw(&out);
        srv.next()
    });
    let mut client = Client::connect(&cfg).unwrap();
    for _ in 0..2 {
        match client.recv() {
            Err(ClientError::Closed { code, reason }) => {
                assert_eq!((code, reason.as_str()), (Some(4001), "bye"))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(client.is_closed_by_peer(T));
    // The client completed the close handshake with the same code.
    assert_eq!(server.join().unwrap(), Some(Got::Close(Some(4001))));
}

#[test]
fn tcp_eof_gives_closed() {
    let (cfg, server) = serve(Transport::Tcp, CodecId::Hessian, drop);
    let mut client = Client::connect(&cfg).unwrap();
    server.join().unwrap();
    match client.recv() {
        Err(ClientError::Closed { code: None, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(client.is_closed_by_peer(T));
}

#[test]
fn silence_gives_timeout_on_both_transports() {
    for t in Transport::ALL {
        let (mut cfg, server) = serve(t, CodecId::FlatBuffers, |mut srv| srv.next());
        cfg.read_timeout = Duration::from_millis(50);
        let mut client = Client::connect(&cfg).unwrap();
        assert!(matches!(client.recv(), Err(ClientError::Timeout)));
        let short = Duration::from_millis(30);
        assert!(matches!(
            client.recv_until(|_| true, short),
            Err(ClientError::Timeout)
        ));
        assert!(!client.is_closed_by_peer(short));
        client.set_read_timeout(short).unwrap();
        assert!(matches!(client.recv(), Err(ClientError::Timeout)));
        client.close();
        let expected = match t {
            Transport::Ws => Got::Close(Some(1000)),
            Transport::Tcp => Got::Eof,
        };
        assert_eq!(server.join().unwrap(), Some(expected));
    }
}

#[test]
fn recv_until_skips_other_messages() {
    let (cfg, server) = serve(Transport::Tcp, CodecId::Protobuf, |mut srv| {
        for ts in 1..=3 {
            srv.send(&pong(ts));
        }
    });
    let mut client = Client::connect(&cfg).unwrap();
    let got = client.recv_until(|e| *e == pong(3), T).unwrap();
    assert_eq!(got, pong(3));
    server.join().unwrap();
}

fn welcome_for(srv: &mut Srv, refuse: bool) -> Option<u64> {
    let Got::Msg(env, ..) = srv.next() else {
        panic!("expected hello")
    };
    let Message::Hello(h) = &env.msg else {
        panic!("expected hello, got {env:?}")
    };
    assert_eq!((&*h.token, &*h.device, h.version), ("alice", "d1", 1));
    let reply = if refuse {
        Message::Error(protocol::Error {
            code: ErrorCode::Unauthorized,
            message: "bad token".into(),
            cmid: None,
            retry_after_ms: None,
        })
    } else {
        Message::Welcome(Welcome {
            version: 1,
            session: 7,
            user: "alice".into(),
            heartbeat_ms: 30_000,
            server_time_ms: 1,
            limits: WireLimits::default(),
        })
    };
    srv.send(&Envelope {
        reference: env.reference,
        msg: reply,
    });
    env.reference
}

#[test]
fn hello_gets_welcome_or_refusal() {
    let (cfg, server) = serve(Transport::Tcp, CodecId::Protobuf, |mut srv| {
        welcome_for(&mut srv, false)
    });
    let mut client = Client::connect(&cfg).unwrap();
    let w = client.hello("alice", "d1").unwrap();
    assert_eq!((w.session, &*w.user), (7, "alice"));
    assert_eq!(server.join().unwrap(), Some(Some(1)));
    assert_eq!(client.next_ref(), 2);

    let (cfg, server) = serve(Transport::Ws, CodecId::Json, |mut srv| {
        welcome_for(&mut srv, true)
    });
    let mut client = Client::connect(&cfg).unwrap();
    match client.hello("alice", "d1") {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn refused_upgrade_and_origin() {
    let (mut cfg, server) = serve(Transport::Ws, CodecId::Json, |_| ());
    cfg.origin = Some("http://evil.example".to_owned());
    match Client::connect(&cfg) {
        Err(ClientError::Handshake(ws::ClientError::Status(403))) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(server.join().unwrap(), None);

    let (mut cfg, server) = serve(Transport::Ws, CodecId::Json, Srv::echo);
    cfg.origin = Some("http://ok.example".to_owned());
    let mut client = Client::connect(&cfg).unwrap();
    client.send(&pong(5)).unwrap();
    assert_eq!(client.recv().unwrap(), pong(5));
    client.close();
    server.join().unwrap();
}

#[test]
fn json_without_subprotocol() {
    let (mut cfg, server) = serve(Transport::Ws, CodecId::Json, Srv::echo);
    cfg.offer_subprotocol = false;
    let mut client = Client::connect(&cfg).unwrap();
    client.send(&pong(6)).unwrap();
    assert_eq!(client.recv().unwrap(), pong(6));
    client.close();
    server.join().unwrap();

    cfg.codec = CodecId::Protobuf;
    assert!(matches!(
        Client::connect(&cfg),
        Err(ClientError::Protocol(_))
    ));
}

#[test]
fn mismatched_frames_are_protocol_errors() {
    // Raw TCP: a frame in another codec than the connection's.
    let (cfg, server) = serve(Transport::Tcp, CodecId::Protobuf, |mut srv| {
        let mut out = Vec::new();
        write_frame(&mut out, CodecId::Json, &[], &pong(1)).unwrap();
        write_frame(&mut out, CodecId::Protobuf, &[], &pong(2)).unwrap();
        srv.raw(&out);
    });
    let mut client = Client::connect(&cfg).unwrap();
    assert!(matches!(client.recv(), Err(ClientError::Protocol(_))));
    // The connection goes on with the next frame.
    assert_eq!(client.recv().unwrap(), pong(2));
    server.join().unwrap();

    // WebSocket: a text frame for a binary codec, then a broken frame (masked from a server).
    let (cfg, server) = serve(Transport::Ws, CodecId::MessagePack, |mut srv| {
        let mut out = Vec::new();
        write_text(&mut out, "{}");
        write_client_frame(&mut out, OpCode::Binary, true, [1, 2, 3, 4], b"x");
        srv.raw(&out);
        srv.next()
    });
    let mut client = Client::connect(&cfg).unwrap();
    assert!(matches!(client.recv(), Err(ClientError::Protocol(_))));
    assert!(matches!(
        client.recv(),
        Err(ClientError::WebSocket(ws::ProtocolError::BadMask))
    ));
    // The client failed the connection with 1002.
    assert_eq!(server.join().unwrap(), Some(Got::Close(Some(1002))));
    assert!(client.is_closed_by_peer(T));
}

#[test]
fn bad_tcp_framing_then_discard_until_close() {
    let (cfg, server) = serve(Transport::Tcp, CodecId::Json, |mut srv| {
        srv.raw(b"GARBAGE");
        // Everything the client sends until it closes.
        while srv.read_more() {}
        srv.buf
    });
    let mut client = Client::connect(&cfg).unwrap();
    assert!(matches!(
        client.recv(),
        Err(ClientError::Frame(FrameError::BadMagic(_)))
    ));
    client.send_raw(b"bye").unwrap();
    client.close();
    assert_eq!(&server.join().unwrap().unwrap()[..], b"bye");
}

#[test]
fn connect_from_binds_the_source_address() {
    let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let (cfg, server) = serve(Transport::Ws, CodecId::Hessian, |srv| {
        let peer = srv.peer.ip();
        srv.echo();
        peer
    });
    let mut client = Client::connect_from(&cfg, local).unwrap();
    assert_eq!(client.local_addr().unwrap().ip(), local);
    client.send(&pong(3)).unwrap();
    assert_eq!(client.recv().unwrap(), pong(3));
    client.close();
    assert_eq!(server.join().unwrap(), Some(local));
}

#[test]
fn nonblocking_recv_returns_at_once_and_big_writes_stay_whole() {
    for t in Transport::ALL {
        let (cfg, server) = serve(t, CodecId::Json, |mut srv| {
            // Wait for the client's first message before answering, then echo the rest.
            let first = srv.next();
            srv.send(&pong(7));
            srv.echo();
            first
        });
        let mut client = Client::connect(&cfg).unwrap();
        client.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        assert!(matches!(client.recv(), Err(ClientError::Timeout)));
        assert!(t0.elapsed() < Duration::from_millis(500), "recv waited");
        client.send(&pong(1)).unwrap();
        let deadline = Instant::now() + T;
        let got = loop {
            match client.recv() {
                Ok(env) => break env,
                Err(ClientError::Timeout) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(got, pong(7));
        // Many 1 KiB frames in a row fill the socket buffers (the server echoes them only as
        // it reads): every frame still arrives whole and in order.
        let big = |i: u64| {
            Envelope::new(Message::Send(protocol::Send {
                to: protocol::Target::User("u".into()),
                cmid: i.to_string().into(),
                kind: None,
                body: "x".repeat(1024).into(),
                ext: protocol::Ext::new(),
            }))
        };
        let n = 1500u64;
        let mut seen = 0u64;
        for i in 0..n {
            client.send(&big(i)).unwrap();
            while let Ok(env) = client.recv() {
                assert_eq!(env, big(seen));
                seen += 1;
            }
        }
        let deadline = Instant::now() + T;
        while seen < n && Instant::now() < deadline {
            match client.recv() {
                Ok(env) => {
                    assert_eq!(env, big(seen));
                    seen += 1;
                }
                Err(ClientError::Timeout) => thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen, n);
        client.close();
        assert!(matches!(server.join().unwrap(), Some(Got::Msg(..))));
    }
}
