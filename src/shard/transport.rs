//! A connection's transport, sans IO: raw-TCP frames (docs/PROTOCOL.md section 2), or the
//! WebSocket upgrade and WebSocket frames, and the codec between payloads and envelopes.
//!
//! A [`Link`] owns what the transport keeps per connection (the framing state, the bytes of
//! a partial frame, the codec the connection chose) and nothing else: no clock, no socket, no
//! shard. The session (session.rs) hands it the bytes the runtime read and the connection's
//! output buffer, and pulls [`Input`]s one at a time, so a session rule that closes the
//! connection stops the reading there. The transport's own answers (the upgrade's HTTP
//! response, a pong, a close frame, the echo of the conformance path) it writes into the
//! output itself; what the session must answer (an error envelope) it names in the input.

use bytes::{Bytes, BytesMut};

use crate::codec::{CodecId, DecodeError};
use crate::protocol::frame::{write_frame, FrameDecoder, FrameError};
use crate::protocol::{Envelope, ErrorCode};
use crate::ws;

/// What every connection of a shard parses its input with: built once per shard.
pub(super) struct Rules {
    pub frames: FrameDecoder,
    /// The gateway's WebSocket upgrade (path, origins, header bound).
    pub upgrade: ws::HandshakeConfig,
    /// The conformance echo path's upgrade (`None`: not served).
    pub echo_upgrade: Option<ws::HandshakeConfig>,
    /// Bounds of a WebSocket frame and message on the gateway's path.
    pub ws_limits: ws::Limits,
}

/// Largest frame and message on the conformance echo path (its suite sends 16 MiB).
const ECHO_MAX_BYTES: u32 = 16 << 20;

impl Rules {
    pub fn new(cfg: &crate::config::Config) -> Rules {
        let upgrade = ws::HandshakeConfig {
            path: cfg.ws.path.clone(),
            allowed_origins: cfg.ws.allowed_origins.clone(),
            max_header_bytes: cfg.ws.max_handshake_bytes as usize,
            max_hello_bytes: Some(cfg.ws.max_message_bytes as usize),
            ..ws::HandshakeConfig::default()
        };
        let echo_upgrade = cfg.server.ws_echo.then(|| ws::HandshakeConfig {
            path: "/echo".into(),
            allowed_origins: vec!["*".into()],
            // No session there to take a `hello`: the parameter is not read.
            max_hello_bytes: None,
            ..upgrade.clone()
        });
        Rules {
            frames: FrameDecoder::new(cfg.limits.max_frame_bytes),
            upgrade,
            echo_upgrade,
            ws_limits: ws::Limits::new(cfg.ws.max_frame_bytes, cfg.ws.max_message_bytes),
        }
    }
}

/// The framing state of one connection.
enum Proto {
    /// Raw TCP frames, with the bytes of a partial one (unallocated when idle).
    Tcp(BytesMut),
    /// WebSocket, before the upgrade request completed, with the part of a request that came
    /// in pieces.
    WsUpgrade(BytesMut),
    /// WebSocket after the upgrade: the decoder keeps a partial frame itself.
    Ws(ws::Decoder),
}

/// The transport a listener accepted a connection on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
}

/// What the transport made of the bytes read, for the session to act on, in order.
// The envelope goes on to the session by value, as it did before there was a transport
// layer; a box would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Input {
    /// Nothing more in what was read (the bytes of a partial frame are kept).
    Done,
    /// An envelope in the connection's codec.
    Message(Envelope),
    /// A payload the codec could not decode.
    Undecodable(DecodeError),
    /// A frame refused without closing the connection: the error envelope to answer with.
    /// (A raw-TCP header that disagrees with the connection's codec or with its payload.)
    Refused {
        reference: Option<u64>,
        code: ErrorCode,
        message: &'static str,
    },
    /// A WebSocket ping, answered in the output: the peer is alive.
    Ping,
    /// The WebSocket upgrade completed; its response is in the output. What followed the
    /// request is next in the caller's data when the request came in one read, else in
    /// `rest` (the request was gathered from several reads), to be read next. `hello`: the
    /// message the request target carried (not on the echo path), to be taken first.
    Upgraded {
        echo: bool,
        rest: BytesMut,
        hello: Option<Bytes>,
    },
    /// A message on the echo path, written back into the output.
    Echoed,
    /// The peer closed the WebSocket (the close frame's answer is in the output).
    PeerClosed,
    /// The input broke the transport's rules: the connection is to be closed (reason
    /// protocol). `reply`: an error envelope to send first (raw TCP; on a WebSocket the
    /// close frame is in the output already). `upgrade`: it was the WebSocket upgrade that
    /// failed (its HTTP response is in the output).
    Broken {
        reply: Option<(ErrorCode, String)>,
        upgrade: bool,
    },
}

/// One connection's transport. Idle, it holds no buffer.
pub(super) struct Link {
    proto: Proto,
    codec: CodecId,
    /// The WebSocket conformance echo path (`server.ws_echo`): messages go back as they
    /// came. (A flag, not a fourth `Proto` variant: `Proto` keeps its tag in the decoder's
    /// niche only while one variant holds a decoder, which saves 8 bytes per connection.)
    echo: bool,
}

impl Link {
    pub fn new(transport: Transport) -> Link {
        Link {
            proto: match transport {
                Transport::Tcp => Proto::Tcp(BytesMut::new()),
                Transport::Ws => Proto::WsUpgrade(BytesMut::new()),
            },
            codec: CodecId::Json,
            echo: false,
        }
    }

    /// The codec the connection chose (its `hello` frame's on raw TCP, the subprotocol on a
    /// WebSocket; JSON until then).
    pub fn codec(&self) -> CodecId {
        self.codec
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.proto, Proto::Tcp(_))
    }

    pub fn name(&self) -> &'static str {
        if self.is_tcp() {
            "tcp"
        } else {
            "ws"
        }
    }

    /// What an envelope's encoding on this link depends on (WebSocket?, codec): links with
    /// the same key carry the same bytes for it. `None` until the link carries envelopes.
    pub fn encoding(&self) -> Option<(bool, CodecId)> {
        match self.proto {
            Proto::Tcp(_) => Some((false, self.codec)),
            Proto::Ws(_) if !self.echo => Some((true, self.codec)),
            Proto::Ws(_) | Proto::WsUpgrade(_) => None,
        }
    }

    /// Appends `env` as one frame; false (nothing appended) when it cannot be encoded or
    /// the link carries no envelopes (upgrade not done, echo path).
    pub fn encode_onto(&self, out: &mut Vec<u8>, env: &Envelope) -> bool {
        if self.echo {
            return false;
        }
        let r = match self.proto {
            Proto::Tcp(_) => write_frame(out, self.codec, &[], env),
            Proto::Ws(_) => {
                let op = if self.codec.is_text() {
                    ws::OpCode::Text
                } else {
                    ws::OpCode::Binary
                };
                ws::write_message_with(out, op, |o| self.codec.encode(env, o))
            }
            Proto::WsUpgrade(_) => return false,
        };
        r.is_ok()
    }

    /// Appends a WebSocket close frame (going away, `reason`) after a `goaway`; nothing on
    /// raw TCP, where closing the socket says it.
    pub fn write_going_away(&self, out: &mut Vec<u8>, reason: &str) {
        if matches!(self.proto, Proto::Ws(_)) {
            ws::write_close(out, Some(ws::CloseCode::GoingAway), reason);
        }
    }

    /// The next input in `data` (bytes just read; advanced past what was taken, and WebSocket
    /// payloads unmasked in place), writing the transport's own answers into `out`.
    /// `hello_pending`: the session has not authenticated yet, so a raw-TCP frame's codec
    /// becomes the connection's. After [`Input::Broken`] or [`Input::PeerClosed`] the caller
    /// stops reading.
    pub fn next(
        &mut self,
        rules: &Rules,
        data: &mut &mut [u8],
        hello_pending: bool,
        out: &mut Vec<u8>,
    ) -> Input {
        match self.proto {
            Proto::Tcp(_) => self.next_tcp(rules, data, hello_pending),
            Proto::WsUpgrade(_) => self.upgrade(rules, data, out),
            Proto::Ws(_) => self.next_ws(data, out),
        }
    }

    fn next_tcp(&mut self, rules: &Rules, data: &mut &mut [u8], hello_pending: bool) -> Input {
        let Proto::Tcp(inbuf) = &mut self.proto else {
            return Input::Done;
        };
        if !data.is_empty() {
            inbuf.extend_from_slice(data);
            *data = &mut [];
        }
        match rules.frames.decode(inbuf) {
            Ok(Some(frame)) => {
                if hello_pending {
                    // The codec of the `hello` frame is the connection's codec.
                    self.codec = frame.header.codec;
                } else if frame.header.codec != self.codec {
                    return Input::Refused {
                        reference: None,
                        code: ErrorCode::BadFrame,
                        message: "codec differs from hello's",
                    };
                }
                self.decode(&frame.payload, Some(frame.header.op))
            }
            Ok(None) => {
                if inbuf.is_empty() {
                    // An idle connection holds no input buffer.
                    *inbuf = BytesMut::new();
                }
                Input::Done
            }
            Err(e) => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::BadFrame,
                };
                Input::Broken {
                    reply: Some((code, e.to_string())),
                    upgrade: false,
                }
            }
        }
    }

    fn upgrade(&mut self, rules: &Rules, data: &mut &mut [u8], out: &mut Vec<u8>) -> Input {
        // The usual case, the whole request in one read, is parsed where it lies; only a
        // request that comes in pieces is gathered in the variant's buffer.
        let Proto::WsUpgrade(inbuf) = &mut self.proto else {
            return Input::Done;
        };
        let buffered = !inbuf.is_empty();
        if buffered {
            inbuf.extend_from_slice(data);
            *data = &mut [];
        }
        let request: &[u8] = if buffered { inbuf } else { data };
        let parsed = match ws::parse_request(&rules.upgrade, request) {
            Err(ws::RejectReason::Path) if rules.echo_upgrade.is_some() => rules
                .echo_upgrade
                .as_ref()
                .map(|e| ws::parse_request(e, request).map(|u| u.map(|u| (u, true))))
                .unwrap_or(Err(ws::RejectReason::Path)),
            other => other.map(|u| u.map(|u| (u, false))),
        };
        let refused = |reason: ws::RejectReason, out: &mut Vec<u8>| {
            reason.write_response(out);
            tracing::debug!(reason = reason.label(), "upgrade refused");
            Input::Broken {
                reply: None,
                upgrade: true,
            }
        };
        match parsed {
            Ok(None) => {
                if !buffered {
                    inbuf.extend_from_slice(data);
                    *data = &mut [];
                }
                if inbuf.len() > rules.upgrade.max_header_bytes {
                    refused(ws::RejectReason::HeadersTooLarge, out)
                } else {
                    Input::Done
                }
            }
            Err(reason) => {
                *data = &mut [];
                refused(reason, out)
            }
            Ok(Some((mut up, echo))) => {
                up.write_response(out);
                // The echo path's rules do not read a `hello` parameter.
                let hello = up.hello.take().map(Bytes::from);
                self.codec = up.codec;
                let limits = if echo {
                    ws::Limits::new(
                        rules.ws_limits.max_frame.max(ECHO_MAX_BYTES),
                        rules.ws_limits.max_message.max(ECHO_MAX_BYTES),
                    )
                } else {
                    rules.ws_limits
                };
                let rest = if buffered {
                    inbuf.split_off(up.consumed)
                } else {
                    let all = std::mem::take(data);
                    *data = &mut all[up.consumed..];
                    BytesMut::new()
                };
                // Drops the request's buffer.
                self.proto = Proto::Ws(ws::Decoder::new(ws::Role::Server, limits));
                self.echo = echo;
                Input::Upgraded { echo, rest, hello }
            }
        }
    }

    fn next_ws(&mut self, data: &mut &mut [u8], out: &mut Vec<u8>) -> Input {
        let echo = self.echo;
        let Proto::Ws(dec) = &mut self.proto else {
            return Input::Done;
        };
        let payload = loop {
            let ev = match dec.next_event(data) {
                Ok(None) => return Input::Done,
                Ok(Some(ev)) => ev,
                Err(e) => {
                    ws::respond_error(e, out);
                    return Input::Broken {
                        reply: None,
                        upgrade: false,
                    };
                }
            };
            match ev {
                ws::Event::Ping(_) => {
                    ws::respond(&ev, false, out);
                    return Input::Ping;
                }
                ws::Event::Close { .. } => {
                    ws::respond(&ev, false, out);
                    return Input::PeerClosed;
                }
                // Nothing to do for a pong: the next frame.
                ws::Event::Pong(_) => continue,
                // The decoder has checked text for UTF-8.
                ws::Event::Text(t) if echo => ws::write_text(out, t),
                ws::Event::Binary(b) if echo => ws::write_binary(out, b),
                ws::Event::Text(t) => break Bytes::copy_from_slice(t.as_bytes()),
                ws::Event::Binary(b) => break Bytes::copy_from_slice(b),
            }
            return Input::Echoed;
        };
        self.decode(&payload, None)
    }

    /// A payload through the codec; `header_op`: the raw-TCP header's op, which must agree.
    fn decode(&self, payload: &Bytes, header_op: Option<u8>) -> Input {
        match self.codec.decode_bytes(payload) {
            Ok(env) if header_op.is_some_and(|op| op != env.msg.op() as u8) => Input::Refused {
                reference: env.reference,
                code: ErrorCode::BadFrame,
                message: "header op differs from payload op",
            },
            Ok(env) => Input::Message(env),
            Err(e) => Input::Undecodable(e),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The transport without a shard or a socket: bytes in, inputs and answers out.

    use super::*;
    use crate::config::Config;
    use crate::protocol::{Hello, Message, Ping};

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn rules(echo: bool) -> Rules {
        let mut cfg = Config::default();
        cfg.server.ws_echo = echo;
        cfg.limits.max_frame_bytes = 4096;
        Rules::new(&cfg)
    }

    fn hello() -> Envelope {
        Envelope::with_ref(
            Message::Hello(Hello {
                version: 1,
                token: "u".into(),
                device: "d".into(),
                codecs: vec![],
                resume: None,
            }),
            1,
        )
    }

    fn upgrade_request(path: &str, subprotocols: &[&str]) -> Vec<u8> {
        let mut req = Vec::new();
        ws::ClientHandshake::new([7; 16]).write_request(&mut req, "gw", path, subprotocols, None);
        req
    }

    fn client_text(out: &mut Vec<u8>, text: &str) {
        ws::frame::write_client_frame(out, ws::OpCode::Text, true, MASK, text.as_bytes());
    }

    /// Every input of `bytes` until `Done` (or an input after which reading stops), going on
    /// after an upgrade with what followed it in the same read, as the session does.
    fn read_all(link: &mut Link, rules: &Rules, bytes: &[u8], out: &mut Vec<u8>) -> Vec<Input> {
        let mut buf = bytes.to_vec();
        let mut data = &mut buf[..];
        let mut inputs = Vec::new();
        loop {
            let input = link.next(rules, &mut data, true, out);
            let stop = match &input {
                Input::Done | Input::PeerClosed | Input::Broken { .. } => true,
                Input::Upgraded { rest, .. } => !rest.is_empty() || data.is_empty(),
                _ => false,
            };
            inputs.push(input);
            if stop {
                return inputs;
            }
        }
    }

    #[test]
    fn an_upgrade_and_the_frames_after_it_in_one_read() {
        let rules = rules(false);
        let mut link = Link::new(Transport::Ws);
        assert_eq!(link.encoding(), None, "no envelopes before the upgrade");
        let mut bytes = upgrade_request("/ws", &["imgw.v1.msgpack"]);
        let mut hello_bytes = Vec::new();
        CodecId::MessagePack
            .encode(&hello(), &mut hello_bytes)
            .unwrap();
        ws::frame::write_client_frame(&mut bytes, ws::OpCode::Binary, true, MASK, &hello_bytes);
        ws::frame::write_client_frame(&mut bytes, ws::OpCode::Ping, true, MASK, b"p");
        ws::frame::write_client_frame(&mut bytes, ws::OpCode::Pong, true, MASK, b"q");
        ws::frame::write_client_close(&mut bytes, MASK, Some(ws::CloseCode::Normal), "");

        // The frames are read from the same data, right after the upgrade (no copy in `rest`).
        let mut out = Vec::new();
        let inputs = read_all(&mut link, &rules, &bytes, &mut out);
        assert!(
            matches!(
                inputs.as_slice(),
                [Input::Upgraded { echo: false, rest, hello: None }, Input::Message(env), Input::Ping, Input::PeerClosed]
                    if rest.is_empty()
                        && matches!(env.msg, Message::Hello(_))
                        && env.reference == Some(1)
            ),
            "the pong asks nothing: {inputs:?}"
        );
        assert_eq!(link.codec(), CodecId::MessagePack);
        assert_eq!(link.encoding(), Some((true, CodecId::MessagePack)));
        // The 101, then the pong for the ping and the close frame's answer (unmasked server
        // frames).
        let head = memchr::memmem::find(&out, b"\r\n\r\n").map(|at| at + 4);
        let Some(head) = head.filter(|_| out.starts_with(b"HTTP/1.1 101")) else {
            panic!("{:?}", String::from_utf8_lossy(&out));
        };
        assert_eq!(&out[head..head + 3], &[0x8a, 1, b'p']);
        assert_eq!(out[head + 3], 0x88);
    }

    #[test]
    fn a_hello_in_the_request_target_comes_with_the_upgrade_in_the_connections_codec() {
        let mut hello_bytes = Vec::new();
        CodecId::MessagePack
            .encode(&hello(), &mut hello_bytes)
            .unwrap();
        let target = ws::hello_target("/ws", &hello_bytes);
        let mut link = Link::new(Transport::Ws);
        let mut out = Vec::new();
        let inputs = read_all(
            &mut link,
            &rules(false),
            &upgrade_request(&target, &["imgw.v1.msgpack"]),
            &mut out,
        );
        let [Input::Upgraded {
            echo: false,
            hello: Some(payload),
            ..
        }] = inputs.as_slice()
        else {
            panic!("{inputs:?}");
        };
        assert!(out.starts_with(b"HTTP/1.1 101"));
        assert_eq!(&payload[..], &hello_bytes[..]);
        assert_eq!(link.codec(), CodecId::MessagePack);
        assert!(matches!(
            link.codec().decode_bytes(payload).map(|e| e.msg),
            Ok(Message::Hello(_))
        ));

        // The echo path has no session: its `hello` parameter is not read, whether it is a
        // `hello` or not base64url at all.
        for target in [
            ws::hello_target("/echo", &hello_bytes),
            "/echo?hello=%%".into(),
        ] {
            let mut link = Link::new(Transport::Ws);
            let mut out = Vec::new();
            let inputs = read_all(
                &mut link,
                &rules(true),
                &upgrade_request(&target, &[]),
                &mut out,
            );
            assert!(
                matches!(
                    inputs.as_slice(),
                    [Input::Upgraded {
                        echo: true,
                        hello: None,
                        ..
                    }]
                ),
                "{target}: {inputs:?}"
            );
            assert!(out.starts_with(b"HTTP/1.1 101"), "{target}");
        }

        // One that is not base64url refuses the upgrade, before any 101.
        let mut link = Link::new(Transport::Ws);
        let mut out = Vec::new();
        let inputs = read_all(
            &mut link,
            &rules(false),
            &upgrade_request("/ws?hello=%%", &[]),
            &mut out,
        );
        assert!(matches!(
            inputs.as_slice(),
            [Input::Broken { upgrade: true, .. }]
        ));
        assert!(
            out.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    /// The capacity of the link's input buffer (0 after the upgrade: the decoder has its own).
    fn input_capacity(link: &Link) -> usize {
        match &link.proto {
            Proto::Tcp(b) | Proto::WsUpgrade(b) => b.capacity(),
            Proto::Ws(_) => 0,
        }
    }

    #[test]
    fn a_frame_split_over_reads_waits_and_an_idle_link_holds_no_buffer() {
        let rules = rules(false);
        let mut link = Link::new(Transport::Ws);
        let mut out = Vec::new();
        let req = upgrade_request("/ws", &[]);
        let (head, tail) = req.split_at(10);
        assert!(matches!(
            read_all(&mut link, &rules, head, &mut out).as_slice(),
            [Input::Done]
        ));
        assert!(out.is_empty());
        assert!(input_capacity(&link) > 0, "a partial request is kept");
        let inputs = read_all(&mut link, &rules, tail, &mut out);
        assert!(matches!(inputs.as_slice(), [Input::Upgraded { rest, .. }] if rest.is_empty()));
        assert_eq!(input_capacity(&link), 0, "upgraded: no input buffer");

        // A request gathered from two reads, with a frame after it in the second: the frame
        // comes back in `rest`.
        let mut link = Link::new(Transport::Ws);
        let mut tail = tail.to_vec();
        client_text(&mut tail, "{}");
        read_all(&mut link, &rules, head, &mut out);
        let inputs = read_all(&mut link, &rules, &tail, &mut out);
        let [Input::Upgraded { rest, .. }] = inputs.as_slice() else {
            panic!("{inputs:?}");
        };
        let mut frame = Vec::new();
        client_text(&mut frame, "{}");
        assert_eq!(&rest[..], &frame[..]);

        let mut tcp = Link::new(Transport::Tcp);
        let mut frame = Vec::new();
        write_frame(&mut frame, CodecId::Protobuf, &[], &hello()).unwrap();
        let (a, b) = frame.split_at(frame.len() - 1);
        assert!(matches!(
            read_all(&mut tcp, &rules, a, &mut out).as_slice(),
            [Input::Done]
        ));
        assert!(input_capacity(&tcp) > 0, "a partial frame is kept");
        let inputs = read_all(&mut tcp, &rules, b, &mut out);
        assert!(
            matches!(inputs.as_slice(), [Input::Message(_), Input::Done]),
            "{inputs:?}"
        );
        assert_eq!(tcp.codec(), CodecId::Protobuf, "the hello frame's codec");
        assert_eq!(input_capacity(&tcp), 0, "idle: no input buffer");
    }

    #[test]
    fn raw_tcp_headers_that_disagree_are_refused_and_broken_frames_close() {
        let rules = rules(false);
        let mut link = Link::new(Transport::Tcp);
        let mut out = Vec::new();
        let mut bytes = Vec::new();
        write_frame(&mut bytes, CodecId::Json, &[], &hello()).unwrap();
        read_all(&mut link, &rules, &bytes, &mut out);

        // After the hello: another codec in the header, then a header op that is not the
        // payload's: each refused, the connection kept.
        let ping = Envelope::with_ref(Message::Ping(Ping { ts: 5 }), 9);
        bytes.clear();
        write_frame(&mut bytes, CodecId::MessagePack, &[], &ping).unwrap();
        let at = bytes.len();
        write_frame(&mut bytes, CodecId::Json, &[], &ping).unwrap();
        bytes[at + 3] = Message::Hello(hello_body()).op() as u8;
        let mut data = &mut bytes[..];
        let first = link.next(&rules, &mut data, false, &mut out);
        let second = link.next(&rules, &mut data, false, &mut out);
        assert!(
            matches!(first, Input::Refused { code: ErrorCode::BadFrame, message, .. }
                if message == "codec differs from hello's"),
            "{first:?}"
        );
        assert!(
            matches!(
                second,
                Input::Refused {
                    reference: Some(9),
                    code: ErrorCode::BadFrame,
                    ..
                }
            ),
            "{second:?}"
        );
        assert!(matches!(
            link.next(&rules, &mut data, false, &mut out),
            Input::Done
        ));

        // A frame over the bound: broken, with the error to send before closing.
        let mut big = Vec::new();
        write_frame(&mut big, CodecId::Json, &[], &ping).unwrap();
        big[8..12].copy_from_slice(&100_000u32.to_be_bytes());
        let inputs = read_all(&mut link, &rules, &big, &mut out);
        assert!(
            matches!(
                inputs.as_slice(),
                [Input::Broken {
                    reply: Some((ErrorCode::FrameTooLarge, _)),
                    upgrade: false
                }]
            ),
            "{inputs:?}"
        );
        assert!(
            out.is_empty(),
            "the session encodes the error, not the transport"
        );
    }

    fn hello_body() -> Hello {
        match hello().msg {
            Message::Hello(h) => h,
            _ => unreachable!(),
        }
    }

    /// `request` read by a fresh WebSocket link breaks it with an HTTP `status` answer.
    fn assert_upgrade_refused(rules: &Rules, request: &[u8], status: &str) {
        let (mut link, mut out) = (Link::new(Transport::Ws), Vec::new());
        let inputs = read_all(&mut link, rules, request, &mut out);
        let broken = Input::Broken {
            reply: None,
            upgrade: true,
        };
        assert_eq!(format!("{inputs:?}"), format!("{:?}", [broken]));
        let head = format!("HTTP/1.1 {status}");
        assert!(
            out.starts_with(head.as_bytes()),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn a_refused_upgrade_and_an_oversized_request_are_broken() {
        let rules = rules(false);
        assert_upgrade_refused(&rules, &upgrade_request("/nope", &[]), "404");
        let mut endless = b"GET /ws HTTP/1.1\r\n".to_vec();
        endless.resize(rules.upgrade.max_header_bytes + 1, b'a');
        assert_upgrade_refused(&rules, &endless, "431");
    }

    #[test]
    fn the_echo_path_writes_messages_back_and_carries_no_envelopes() {
        // Not served unless `server.ws_echo`.
        assert_upgrade_refused(&rules(false), &upgrade_request("/echo", &[]), "404");

        let rules = rules(true);
        let (mut link, mut out) = (Link::new(Transport::Ws), Vec::new());
        let mut bytes = upgrade_request("/echo", &[]);
        client_text(&mut bytes, "héllo");
        let inputs = read_all(&mut link, &rules, &bytes, &mut out);
        assert!(
            matches!(
                inputs.as_slice(),
                [
                    Input::Upgraded { echo: true, .. },
                    Input::Echoed,
                    Input::Done
                ]
            ),
            "{inputs:?}"
        );
        let mut expected = Vec::new();
        ws::write_text(&mut expected, "héllo");
        assert!(out.starts_with(b"HTTP/1.1 101") && out.ends_with(&expected));
        assert_eq!(link.encoding(), None);
        assert!(!link.encode_onto(&mut out, &hello()));
    }

    #[test]
    fn a_link_is_no_larger_than_its_parts() {
        // The decoder's niche holds `Proto`'s tag, the input buffer of the variants before the
        // upgrade lies beside that niche, and the codec and the echo flag take the padding
        // after: a connection's slab entry carries this per connection (docs/ARCHITECTURE.md,
        // idle memory).
        let parts = std::mem::size_of::<ws::Decoder>() + 2;
        assert_eq!(
            std::mem::size_of::<Proto>(),
            std::mem::size_of::<ws::Decoder>()
        );
        assert_eq!(std::mem::size_of::<Link>(), parts.next_multiple_of(8));
    }

    #[test]
    fn a_websocket_protocol_error_answers_with_a_close_frame() {
        let rules = rules(false);
        let mut out = Vec::new();
        let mut link = Link::new(Transport::Ws);
        read_all(&mut link, &rules, &upgrade_request("/ws", &[]), &mut out);
        out.clear();
        // Unmasked client frame: a protocol error (RFC 6455 5.1).
        let mut bad = Vec::new();
        ws::frame::write_frame(&mut bad, ws::OpCode::Text, true, b"{}");
        let inputs = read_all(&mut link, &rules, &bad, &mut out);
        assert!(matches!(
            inputs.as_slice(),
            [Input::Broken {
                reply: None,
                upgrade: false
            }]
        ));
        assert_eq!(out[0], 0x88, "a close frame");
    }
}
