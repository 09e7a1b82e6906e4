//! Tests of the opening handshake (no sockets).

use proptest::collection::vec;
use proptest::prelude::*;

use super::handshake::*;
use crate::codec::CodecId;

/// RFC 6455 section 1.3's example key and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The request with one header line replaced (matched by name prefix) or removed.
fn request_with(name: &str, line: Option<&str>) -> String {
    let base = request("");
    let mut out = String::new();
    for l in base.split_inclusive("\r\n") {
        if l.starts_with(name) {
            if let Some(new) = line {
                out.push_str(new);
                out.push_str("\r\n");
            }
        } else {
            out.push_str(l);
        }
    }
    out
}

fn run(cfg: &HandshakeConfig, req: &str) -> (Handshake, String) {
    let mut out = Vec::new();
    let h = accept(cfg, req.as_bytes(), &mut out);
    (h, String::from_utf8(out).unwrap())
}

fn rejected(req: &str) -> RejectReason {
    match run(&HandshakeConfig::default(), req).0 {
        Handshake::Rejected(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn accept_key_matches_the_rfc_example() {
    assert_eq!(&accept_key(KEY.as_bytes()), ACCEPT.as_bytes());
}

#[test]
fn valid_request_is_accepted_with_json_and_no_subprotocol() {
    let mut req = request("").into_bytes();
    let header_len = req.len();
    req.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]); // WebSocket bytes right behind
    let mut out = Vec::new();
    let h = accept(&HandshakeConfig::default(), &req, &mut out);
    let Handshake::Accepted(up) = h else {
        panic!("{h:?}")
    };
    assert_eq!(up.consumed, header_len);
    assert_eq!(up.codec, CodecId::Json);
    assert!(!up.subprotocol);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        )
    );
}

#[test]
fn every_prefix_is_incomplete() {
    let req = request("Origin: https://chat.example.com\r\n");
    let cfg = HandshakeConfig {
        allowed_origins: vec!["https://chat.example.com".into()],
        ..HandshakeConfig::default()
    };
    for n in 0..req.len() {
        let mut out = Vec::new();
        assert_eq!(
            accept(&cfg, &req.as_bytes()[..n], &mut out),
            Handshake::Incomplete,
            "{n}"
        );
        assert!(out.is_empty());
    }
    assert!(matches!(run(&cfg, &req).0, Handshake::Accepted(_)));
}

#[test]
fn header_bounds() {
    let cfg = HandshakeConfig {
        max_header_bytes: 300,
        max_headers: 8,
        ..HandshakeConfig::default()
    };
    // Too large: refused as soon as max bytes arrived without the end of the header block.
    let big = request(&format!("X-Pad: {}\r\n", "a".repeat(300)));
    let (h, resp) = run(&cfg, &big[..300]);
    assert_eq!(h, Handshake::Rejected(RejectReason::HeadersTooLarge));
    assert!(resp.starts_with("HTTP/1.1 431 "));
    assert_eq!(run(&cfg, &big[..299]).0, Handshake::Incomplete);
    // Too many fields: the request has 5, so 4 more make 9.
    let many = request("A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n");
    assert_eq!(
        run(&cfg, &many).0,
        Handshake::Rejected(RejectReason::TooManyHeaders)
    );
    assert!(matches!(
        run(&cfg, &request("A: 1\r\nB: 2\r\nC: 3\r\n")).0,
        Handshake::Accepted(_)
    ));
}

#[test]
fn method_version_and_path() {
    assert_eq!(rejected("POST /ws HTTP/1.1\r\n"), RejectReason::Method);
    assert_eq!(rejected("P"), RejectReason::Method);
    assert_eq!(rejected("\x16\x03\x01"), RejectReason::Malformed); // TLS to a plain port
    assert_eq!(rejected("GET /ws\r\n\r\n"), RejectReason::Malformed);
    let (h, resp) = run(&HandshakeConfig::default(), "PUT / HTTP/1.1\r\n\r\n");
    assert_eq!(h, Handshake::Rejected(RejectReason::Method));
    assert!(resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(resp.contains("Allow: GET\r\n"));
    assert!(resp.contains("Connection: close\r\n"));

    assert_eq!(
        rejected(&request("").replace("HTTP/1.1", "HTTP/1.0")),
        RejectReason::HttpVersion
    );
    let (h, resp) = run(
        &HandshakeConfig::default(),
        &request("").replace("/ws", "/other"),
    );
    assert_eq!(h, Handshake::Rejected(RejectReason::Path));
    assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"));
    assert_eq!(
        rejected(&request("").replace("/ws", "/ws/")),
        RejectReason::Path
    );
    assert!(matches!(
        run(
            &HandshakeConfig::default(),
            &request("").replace("/ws", "/ws?token=abc")
        )
        .0,
        Handshake::Accepted(_)
    ));
}

#[test]
fn upgrade_and_connection_tokens() {
    assert_eq!(
        rejected(&request_with("Upgrade", None)),
        RejectReason::NotUpgrade
    );
    assert_eq!(
        rejected(&request_with("Upgrade", Some("Upgrade: h2c"))),
        RejectReason::NotUpgrade
    );
    assert_eq!(
        rejected(&request_with("Connection", None)),
        RejectReason::NotUpgrade
    );
    assert_eq!(
        rejected(&request_with("Connection", Some("Connection: keep-alive"))),
        RejectReason::NotUpgrade
    );
    for (name, line) in [
        ("Upgrade", "Upgrade: WebSocket"),
        ("Upgrade", "upgrade:  h2c ,websocket "),
        ("Connection", "Connection: keep-alive, Upgrade"),
        ("Connection", "connection: UPGRADE"),
    ] {
        let req = request_with(name, Some(line));
        assert!(
            matches!(
                run(&HandshakeConfig::default(), &req).0,
                Handshake::Accepted(_)
            ),
            "{line}"
        );
    }
    // "Upgrade" as a substring of a token is not the token.
    assert_eq!(
        rejected(&request_with("Connection", Some("Connection: upgraded"))),
        RejectReason::NotUpgrade
    );
    assert_eq!(rejected(&request_with("Host", None)), RejectReason::Host);
    assert_eq!(rejected(&request("Host: second\r\n")), RejectReason::Host);
}

#[test]
fn websocket_version() {
    for line in [
        Some("Sec-WebSocket-Version: 8"),
        None,
        Some("Sec-WebSocket-Version: 13, 8"),
    ] {
        let (h, resp) = run(
            &HandshakeConfig::default(),
            &request_with("Sec-WebSocket-Version", line),
        );
        assert_eq!(h, Handshake::Rejected(RejectReason::WsVersion));
        assert!(
            resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{resp}"
        );
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }
}

#[test]
fn websocket_key() {
    for line in [
        None,
        Some("Sec-WebSocket-Key: "),
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ"), // no padding
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=!"), // not base64
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZXM="), // 17 bytes
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j"),   // 15 bytes
    ] {
        assert_eq!(
            rejected(&request_with("Sec-WebSocket-Key", line)),
            RejectReason::BadKey,
            "{line:?}"
        );
    }
    assert_eq!(
        rejected(&request(&format!("Sec-WebSocket-Key: {KEY}\r\n"))),
        RejectReason::BadKey
    );
}

#[test]
fn origin_allow_list() {
    let origin = |o: &str| request(&format!("Origin: {o}\r\n"));
    // Default: an empty list admits only clients without Origin.
    let (h, resp) = run(&HandshakeConfig::default(), &origin("https://evil.example"));
    assert_eq!(h, Handshake::Rejected(RejectReason::Origin));
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"));
    assert!(matches!(
        run(&HandshakeConfig::default(), &request("")).0,
        Handshake::Accepted(_)
    ));

    let cfg = HandshakeConfig {
        allowed_origins: vec![
            "https://chat.example.com".into(),
            "http://localhost:3000".into(),
        ],
        ..HandshakeConfig::default()
    };
    for ok in [
        "https://chat.example.com",
        "http://localhost:3000",
        "HTTPS://Chat.Example.com",
    ] {
        assert!(
            matches!(run(&cfg, &origin(ok)).0, Handshake::Accepted(_)),
            "{ok}"
        );
    }
    for bad in [
        "http://chat.example.com",
        "https://chat.example.com:443",
        "https://chat.example.com.evil",
        "http://localhost",
        "null",
        "*",
    ] {
        assert_eq!(
            run(&cfg, &origin(bad)).0,
            Handshake::Rejected(RejectReason::Origin),
            "{bad}"
        );
    }
    let two = request("Origin: https://chat.example.com\r\nOrigin: https://evil\r\n");
    assert_eq!(run(&cfg, &two).0, Handshake::Rejected(RejectReason::Origin));

    let any = HandshakeConfig {
        allowed_origins: vec!["*".into()],
        ..HandshakeConfig::default()
    };
    assert!(matches!(
        run(&any, &origin("https://anything")).0,
        Handshake::Accepted(_)
    ));
}

#[test]
fn subprotocol_negotiation() {
    let cfg = HandshakeConfig::default();
    let proto = |p: &str| request(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    let (h, resp) = run(&cfg, &proto("chat, imgw.v1.msgpack, imgw.v1.protobuf"));
    let Handshake::Accepted(up) = h else {
        panic!("{h:?}")
    };
    assert_eq!(up.codec, CodecId::MessagePack);
    assert!(up.subprotocol);
    assert!(resp.contains("\r\nSec-WebSocket-Protocol: imgw.v1.msgpack\r\n"));

    for c in CodecId::ALL {
        let (h, resp) = run(&cfg, &proto(c.subprotocol()));
        assert!(matches!(h, Handshake::Accepted(u) if u.codec == c));
        assert!(resp.contains(&format!("Sec-WebSocket-Protocol: {}\r\n", c.subprotocol())));
    }
    // Several header lines: the first supported in order wins.
    let two = request(
        "Sec-WebSocket-Protocol: x\r\nSec-WebSocket-Protocol: imgw.v1.hessian, imgw.v1.json\r\n",
    );
    assert!(matches!(run(&cfg, &two).0, Handshake::Accepted(u) if u.codec == CodecId::Hessian));
    // Offered, none supported: refused with a clear body.
    let (h, resp) = run(&cfg, &proto("mqtt, imgw.v2.json"));
    assert_eq!(h, Handshake::Rejected(RejectReason::Subprotocol));
    assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"));
    assert!(resp.contains("no supported subprotocol"));
    // An empty value offers nothing.
    assert!(
        matches!(run(&cfg, &proto("")).0, Handshake::Accepted(u) if u.codec == CodecId::Json && !u.subprotocol)
    );
}

#[test]
fn body_is_refused() {
    assert_eq!(
        rejected(&request("Content-Length: 5\r\n")),
        RejectReason::Body
    );
    assert_eq!(
        rejected(&request("Transfer-Encoding: chunked\r\n")),
        RejectReason::Body
    );
    assert!(matches!(
        run(
            &HandshakeConfig::default(),
            &request("Content-Length: 0\r\n")
        )
        .0,
        Handshake::Accepted(_)
    ));
}

/// The request with `target` in its request line instead of `/ws`.
fn request_to(target: &str) -> String {
    request("").replacen("GET /ws ", &format!("GET {target} "), 1)
}

fn accepted_hello(cfg: &HandshakeConfig, target: &str) -> Option<Vec<u8>> {
    match run(cfg, &request_to(target)).0 {
        Handshake::Accepted(up) => up.hello,
        other => panic!("{target}: {other:?}"),
    }
}

#[test]
fn a_hello_in_the_request_target_is_decoded_from_base64url() {
    let cfg = HandshakeConfig::default();
    let hello = br#"{"op":"hello","ref":1,"version":1,"token":"u?&=/+","device":"d"}"#;
    let target = hello_target("/ws", hello);
    assert!(target.starts_with("/ws?hello="), "{target}");
    // Only base64url's alphabet, unpadded: nothing a URL would need to escape.
    assert!(target["/ws?hello=".len()..]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_eq!(accepted_hello(&cfg, &target).as_deref(), Some(&hello[..]));
    // Other parameters are left alone, before or after it; `hello_target` appends to them.
    let t = hello_target("/ws?trace=7", hello);
    assert!(t.starts_with("/ws?trace=7&hello="), "{t}");
    assert_eq!(accepted_hello(&cfg, &t).as_deref(), Some(&hello[..]));
    assert_eq!(
        accepted_hello(&cfg, &format!("{t}&hellox=1&x=hello=2")).as_deref(),
        Some(&hello[..])
    );
    // Padding is optional: "ab" is YWI in base64url, YWI= padded.
    assert_eq!(
        accepted_hello(&cfg, "/ws?hello=YWI=").as_deref(),
        Some(&b"ab"[..])
    );
    assert_eq!(
        accepted_hello(&cfg, "/ws?hello=YWI").as_deref(),
        Some(&b"ab"[..])
    );
    // No parameter, or one of another name: no hello.
    assert_eq!(accepted_hello(&cfg, "/ws"), None);
    assert_eq!(accepted_hello(&cfg, "/ws?"), None);
    assert_eq!(accepted_hello(&cfg, "/ws?helloo=YWI"), None);
}

#[test]
fn a_bad_hello_parameter_refuses_the_upgrade_with_400() {
    let cfg = HandshakeConfig {
        max_hello_bytes: Some(6),
        ..HandshakeConfig::default()
    };
    let refused = |target: &str| match run(&cfg, &request_to(target)).0 {
        Handshake::Rejected(r) => r,
        other => panic!("{target}: {other:?}"),
    };
    for target in [
        "/ws?hello=",                       // empty
        "/ws?hello=YWI&hello=YWI",          // repeated
        "/ws?hello=YW+I",                   // standard base64, not base64url
        "/ws?hello=YWI%3D",                 // percent-encoded padding
        "/ws?hello=Y",                      // not a whole byte
        "/ws?hello=YWJjZGVmZw",             // 7 bytes decoded, over the bound of 6
        "/ws?hello=YWJjZGVmZ2hpamtsbW5vcA", // longer than any encoding of 6 bytes
    ] {
        assert_eq!(refused(target), RejectReason::Hello, "{target}");
    }
    // At the bound: accepted.
    assert_eq!(
        accepted_hello(&cfg, "/ws?hello=YWJjZGVm").as_deref(),
        Some(&b"abcdef"[..])
    );
    assert_eq!(RejectReason::Hello.status(), 400);
    assert_eq!(RejectReason::Hello.label(), "hello");
    // Where the parameter is not read (the echo path), none of that matters.
    let unread = HandshakeConfig {
        max_hello_bytes: None,
        ..cfg
    };
    for target in [
        "/ws?hello=",
        "/ws?hello=Y",
        "/ws?hello=YWJjZGVmZw",
        "/ws?hello=YWI",
    ] {
        assert_eq!(accepted_hello(&unread, target), None, "{target}");
    }
}

#[test]
fn rejection_responses_are_well_formed() {
    for r in [
        RejectReason::Hello,
        RejectReason::Malformed,
        RejectReason::HeadersTooLarge,
        RejectReason::Subprotocol,
        RejectReason::WsVersion,
    ] {
        let mut out = Vec::new();
        r.write_response(&mut out);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(resp.code, Some(r.status()));
        let len: usize = resp
            .headers
            .iter()
            .find(|h| h.name == "Content-Length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(out.len() - n, len);
        assert!(!r.label().is_empty());
    }
}

#[test]
fn client_and_server_agree() {
    let client = ClientHandshake::new(*b"0123456789abcdef");
    let offered = ["x.other", "imgw.v1.protobuf"];
    let mut req = Vec::new();
    client.write_request(
        &mut req,
        "127.0.0.1:8080",
        "/ws",
        &offered,
        Some("https://a.example"),
    );
    let cfg = HandshakeConfig {
        allowed_origins: vec!["https://a.example".into()],
        ..HandshakeConfig::default()
    };
    let mut resp = Vec::new();
    let Handshake::Accepted(up) = accept(&cfg, &req, &mut resp) else {
        panic!()
    };
    assert_eq!(up.codec, CodecId::Protobuf);
    resp.extend_from_slice(&[0x82, 0x00]); // a frame right behind
    for n in 0..resp.len() - 2 {
        assert_eq!(client.read_response(&resp[..n], &offered), Ok(None), "{n}");
    }
    let ok = client.read_response(&resp, &offered).unwrap().unwrap();
    assert_eq!(ok.consumed, resp.len() - 2);
    assert_eq!(ok.subprotocol, Some(1));

    // Without subprotocols.
    let mut req = Vec::new();
    client.write_request(&mut req, "h", "/ws", &[], None);
    let mut resp = Vec::new();
    assert!(matches!(
        accept(&cfg, &req, &mut resp),
        Handshake::Accepted(_)
    ));
    assert_eq!(
        client
            .read_response(&resp, &[])
            .unwrap()
            .unwrap()
            .subprotocol,
        None
    );

    // A different client's key does not match.
    let other = ClientHandshake::new([0; 16]);
    assert_eq!(other.read_response(&resp, &[]), Err(ClientError::BadAccept));
    // A subprotocol we did not offer.
    let mut req = Vec::new();
    client.write_request(&mut req, "h", "/ws", &["imgw.v1.json"], None);
    let mut resp = Vec::new();
    assert!(matches!(
        accept(&cfg, &req, &mut resp),
        Handshake::Accepted(_)
    ));
    assert_eq!(
        client.read_response(&resp, &["imgw.v1.msgpack"]),
        Err(ClientError::Subprotocol)
    );
    // An error status.
    let mut resp = Vec::new();
    RejectReason::Origin.write_response(&mut resp);
    assert_eq!(
        client.read_response(&resp, &[]),
        Err(ClientError::Status(403))
    );
    assert_eq!(
        client.read_response(b"\x00\x01garbage\r\n\r\n", &[]),
        Err(ClientError::Malformed)
    );
    assert_eq!(client.key().len(), KEY_LEN);
}

proptest! {
    /// Arbitrary bytes never panic the server or the client side.
    #[test]
    fn garbage_never_panics(bytes in vec(any::<u8>(), 0..1500), max in 0usize..2000, headers in 0usize..100) {
        let cfg = HandshakeConfig { max_header_bytes: max, max_headers: headers, ..HandshakeConfig::default() };
        let mut out = Vec::new();
        let _ = accept(&cfg, &bytes, &mut out);
        let _ = ClientHandshake::new([1; 16]).read_response(&bytes, &["a"]);
    }

    /// A valid request with random header noise, whitespace and case still negotiates the
    /// same way, or is refused for too many headers.
    #[test]
    fn header_noise(names in vec("[A-Za-z-]{1,12}", 0..10), values in vec("[ -~]{0,20}", 10)) {
        let mut extra = String::new();
        for (i, n) in names.iter().enumerate() {
            let lower = n.to_ascii_lowercase();
            if ["host", "upgrade", "connection", "origin", "content-length", "transfer-encoding"]
                .contains(&lower.as_str()) || lower.starts_with("sec-websocket") {
                continue;
            }
            extra.push_str(&format!("{n}: {}\r\n", values[i]));
        }
        let req = request(&extra);
        let mut out = Vec::new();
        let h = accept(&HandshakeConfig::default(), req.as_bytes(), &mut out);
        prop_assert!(matches!(h, Handshake::Accepted(ref u) if u.codec == CodecId::Json), "{:?}", h);
    }
}
