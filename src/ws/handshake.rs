//! The WebSocket opening handshake (RFC 6455 section 4): the server side, and a small client
//! side for tests and the loadgen.
//!
//! [`accept`] is called with every byte received so far on a new connection. It answers
//! [`Handshake::Incomplete`] until the whole header block has arrived (bounded by
//! [`HandshakeConfig::max_header_bytes`] and [`HandshakeConfig::max_headers`]), then either
//! accepts the upgrade (the `101 Switching Protocols` response is appended to the output and
//! the negotiated codec returned) or rejects it with a short HTTP error response after which
//! the connection must be closed. Bytes after the header block belong to the WebSocket stream.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as B64};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use crate::codec::CodecId;

/// The GUID of RFC 6455 section 1.3, appended to the key before hashing.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Hard cap on [`HandshakeConfig::max_headers`] (the header table lives on the stack).
pub const MAX_HEADERS_CAP: usize = 64;

/// Length of a `Sec-WebSocket-Accept` value: base64 of a 20-byte SHA-1.
pub const ACCEPT_LEN: usize = 28;

/// What [`Upgrade::write_response`] reserves in the output: the 101 (at most about 180 bytes
/// with the longest subprotocol name) and a `welcome` frame (about 200 bytes and the user id).
const RESPONSE_ROOM: usize = 512;

/// Length of a `Sec-WebSocket-Key` value: base64 of 16 bytes.
pub const KEY_LEN: usize = 24;

/// The query parameter that carries a `hello` in the request target (PROTOCOL.md section 1).
pub const HELLO_PARAM: &str = "hello";

/// base64url (RFC 4648 section 5), with or without its `=` padding: how the `hello` query
/// parameter is encoded.
const B64_URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Handshake policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// The request path that upgrades (the query string is ignored but for its `hello`
    /// parameter). Default `/ws`.
    pub path: String,
    /// Allowed `Origin` values, matched exactly as `scheme://host[:port]` (ASCII case-
    /// insensitive). A request without `Origin` (a non-browser client) is always allowed; an
    /// empty list therefore admits only such clients. The entry `*` admits every origin; it is
    /// never a default.
    pub allowed_origins: Vec<String>,
    /// Largest request header block, in bytes. Default 8 KiB.
    pub max_header_bytes: usize,
    /// Largest number of header fields (capped at [`MAX_HEADERS_CAP`]). Default 32.
    pub max_headers: usize,
    /// Largest `hello` carried in the request target, in bytes once decoded. Default 4 KiB
    /// (the gateway sets it to `ws.max_message_bytes`). `None`: the target's `hello`
    /// parameter is not read at all (the conformance echo path, which has no session).
    pub max_hello_bytes: Option<usize>,
}

impl Default for HandshakeConfig {
    fn default() -> HandshakeConfig {
        HandshakeConfig {
            path: "/ws".to_owned(),
            allowed_origins: Vec::new(),
            max_header_bytes: 8 * 1024,
            max_headers: 32,
            max_hello_bytes: Some(4 * 1024),
        }
    }
}

/// Why an upgrade request was refused. Each reason maps to an HTTP status and a short body.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The bytes are not an HTTP/1.x request (400).
    #[error("malformed HTTP request")]
    Malformed,
    /// The header block exceeds `max_header_bytes` (431).
    #[error("request header block too large")]
    HeadersTooLarge,
    /// More header fields than `max_headers` (431).
    #[error("too many request header fields")]
    TooManyHeaders,
    /// Not a GET (405).
    #[error("method not allowed")]
    Method,
    /// Not HTTP/1.1 (400).
    #[error("HTTP/1.1 required")]
    HttpVersion,
    /// Not the WebSocket path (404).
    #[error("not found")]
    Path,
    /// No or more than one `Host` (400).
    #[error("exactly one Host header required")]
    Host,
    /// `Upgrade` lacks the `websocket` token, or `Connection` lacks `Upgrade` (400).
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13 (426, with `Sec-WebSocket-Version: 13`).
    #[error("unsupported WebSocket version (13 required)")]
    WsVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes (400).
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
    /// `Origin` present and not in the allow-list, or repeated (403).
    #[error("origin not allowed")]
    Origin,
    /// Subprotocols offered, none of them an imgw codec (400).
    #[error("no supported subprotocol offered (imgw.v1.json, imgw.v1.protobuf, imgw.v1.msgpack, imgw.v1.flatbuffers, imgw.v1.hessian)")]
    Subprotocol,
    /// The request announces a body (400).
    #[error("upgrade request must not have a body")]
    Body,
    /// The request target's `hello` parameter is repeated, empty, not base64url, or larger
    /// than `max_hello_bytes` once decoded (400).
    #[error("invalid hello query parameter (base64url of one hello message)")]
    Hello,
}

impl RejectReason {
    /// The HTTP status to answer with.
    pub const fn status(self) -> u16 {
        match self {
            RejectReason::HeadersTooLarge | RejectReason::TooManyHeaders => 431,
            RejectReason::Method => 405,
            RejectReason::Path => 404,
            RejectReason::WsVersion => 426,
            RejectReason::Origin => 403,
            _ => 400,
        }
    }

    /// A stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::HeadersTooLarge => "headers_too_large",
            RejectReason::TooManyHeaders => "too_many_headers",
            RejectReason::Method => "method",
            RejectReason::HttpVersion => "http_version",
            RejectReason::Path => "path",
            RejectReason::Host => "host",
            RejectReason::NotUpgrade => "not_upgrade",
            RejectReason::WsVersion => "ws_version",
            RejectReason::BadKey => "bad_key",
            RejectReason::Origin => "origin",
            RejectReason::Subprotocol => "subprotocol",
            RejectReason::Body => "body",
            RejectReason::Hello => "hello",
        }
    }

    /// Appends the complete HTTP error response (`Connection: close`, a short text body).
    pub fn write_response(self, out: &mut Vec<u8>) {
        let status = self.status();
        let phrase = match status {
            404 => "Not Found",
            403 => "Forbidden",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        let body = self.to_string();
        let extra = match self {
            RejectReason::WsVersion => "Sec-WebSocket-Version: 13\r\n",
            RejectReason::Method => "Allow: GET\r\n",
            _ => "",
        };
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}\n",
                body.len() + 1
            )
            .as_bytes(),
        );
    }
}

/// An accepted upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Bytes of the request header block; what follows is WebSocket data.
    pub consumed: usize,
    /// The negotiated codec ([`CodecId::Json`] when no subprotocol was offered).
    pub codec: CodecId,
    /// Whether the client offered subprotocols (so the response names the chosen one).
    pub subprotocol: bool,
    /// The `Sec-WebSocket-Accept` value.
    pub accept: [u8; ACCEPT_LEN],
    /// The `hello` the request target carried ([`HELLO_PARAM`]), decoded from base64url: the
    /// connection's first message, in its codec.
    pub hello: Option<Vec<u8>>,
}

impl Upgrade {
    /// Appends the `101 Switching Protocols` response.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        // Room for the response and the `welcome` that usually follows it in the same write,
        // so neither grows the buffer a second time.
        out.reserve(RESPONSE_ROOM);
        out.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Accept: ",
        );
        out.extend_from_slice(&self.accept);
        if self.subprotocol {
            out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
            out.extend_from_slice(self.codec.subprotocol().as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
    }
}

/// The outcome of [`accept`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The header block has not fully arrived: call again with more bytes.
    Incomplete,
    /// The upgrade is accepted and the 101 response was appended to the output.
    Accepted(Upgrade),
    /// The request is refused and the error response was appended to the output: send it,
    /// then close the connection.
    Rejected(RejectReason),
}

/// Server side: looks at the bytes received so far and, once the request is complete, appends
/// the response to `out`.
pub fn accept(cfg: &HandshakeConfig, input: &[u8], out: &mut Vec<u8>) -> Handshake {
    match parse_request(cfg, input) {
        Ok(None) => Handshake::Incomplete,
        Ok(Some(up)) => {
            up.write_response(out);
            Handshake::Accepted(up)
        }
        Err(r) => {
            r.write_response(out);
            Handshake::Rejected(r)
        }
    }
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key` value.
pub fn accept_key(key: &[u8]) -> [u8; ACCEPT_LEN] {
    use sha1::Digest as _;
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    let digest = sha.finalize();
    let mut out = [0u8; ACCEPT_LEN];
    // base64 of 20 bytes is exactly 28 bytes, so this cannot fail; if it somehow did, the
    // client would refuse the all-zero accept value rather than us panicking.
    let _ = B64.encode_slice(digest, &mut out);
    out
}

/// Trims ASCII spaces and tabs.
fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// The non-empty comma-separated tokens of a header value.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(trim).filter(|t| !t.is_empty())
}

/// True if `input` could still become a request line starting with `GET `.
fn could_be_get(input: &[u8]) -> bool {
    let n = input.len().min(4);
    input[..n] == b"GET "[..n]
}

/// True once the input holds an empty line (the end of the header block, as httparse sees it).
fn has_header_end(input: &[u8]) -> bool {
    // One SIMD search for the line ends (a dozen in a request), then a look past each.
    memchr::memchr_iter(b'\n', input)
        .any(|at| matches!(&input[at + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// Parses and validates an upgrade request. `Ok(None)`: incomplete so far.
pub fn parse_request(cfg: &HandshakeConfig, input: &[u8]) -> Result<Option<Upgrade>, RejectReason> {
    // Cheap early answers: garbage or another method is refused at once, and the full parse
    // runs only once the header block is complete (slowloris clients cost a scan, not a parse).
    if !could_be_get(input) {
        return Err(if input.first().is_some_and(u8::is_ascii_uppercase) {
            RejectReason::Method
        } else {
            RejectReason::Malformed
        });
    }
    let window = &input[..input.len().min(cfg.max_header_bytes)];
    if !has_header_end(window) {
        return if input.len() >= cfg.max_header_bytes {
            Err(RejectReason::HeadersTooLarge)
        } else {
            Ok(None)
        };
    }
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let max_headers = cfg.max_headers.min(MAX_HEADERS_CAP);
    let mut req = httparse::Request::new(&mut storage[..max_headers]);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if window.len() >= cfg.max_header_bytes {
                Err(RejectReason::HeadersTooLarge)
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RejectReason::TooManyHeaders),
        Err(_) => return Err(RejectReason::Malformed),
    };
    if req.method != Some("GET") {
        return Err(RejectReason::Method);
    }
    if req.version != Some(1) {
        return Err(RejectReason::HttpVersion);
    }
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != cfg.path {
        return Err(RejectReason::Path);
    }

    let mut host = 0;
    let mut upgrade = false;
    let mut connection = false;
    let mut version: Option<&[u8]> = None;
    let mut versions = 0;
    let mut key: Option<&[u8]> = None;
    let mut keys = 0;
    let mut origin: Option<&[u8]> = None;
    let mut origins = 0;
    let mut offered = false;
    let mut chosen: Option<CodecId> = None;
    let mut body = false;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            host += 1;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            versions += 1;
            version = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            keys += 1;
            key = Some(trim(value));
        } else if name.eq_ignore_ascii_case("origin") {
            origins += 1;
            origin = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for t in tokens(value) {
                offered = true;
                if chosen.is_none() {
                    chosen = std::str::from_utf8(t)
                        .ok()
                        .and_then(CodecId::from_subprotocol);
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            body = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            body |= trim(value) != b"0";
        }
    }
    if host != 1 {
        return Err(RejectReason::Host);
    }
    if !upgrade || !connection {
        return Err(RejectReason::NotUpgrade);
    }
    if versions != 1 || version != Some(b"13") {
        return Err(RejectReason::WsVersion);
    }
    let key = match key {
        Some(k) if keys == 1 && k.len() == KEY_LEN => k,
        _ => return Err(RejectReason::BadKey),
    };
    let mut raw = [0u8; 18];
    if !matches!(B64.decode_slice(key, &mut raw), Ok(16)) {
        return Err(RejectReason::BadKey);
    }
    if origins > 1 {
        return Err(RejectReason::Origin);
    }
    if let Some(o) = origin {
        let ok = cfg
            .allowed_origins
            .iter()
            .any(|a| a == "*" || a.as_bytes().eq_ignore_ascii_case(o));
        if !ok {
            return Err(RejectReason::Origin);
        }
    }
    if body {
        return Err(RejectReason::Body);
    }
    let hello = match cfg.max_hello_bytes {
        Some(max) => hello_param(query, max)?,
        None => None,
    };
    let codec = match (offered, chosen) {
        (false, _) => CodecId::Json,
        (true, Some(c)) => c,
        (true, None) => return Err(RejectReason::Subprotocol),
    };
    Ok(Some(Upgrade {
        consumed,
        codec,
        subprotocol: offered,
        accept: accept_key(key),
        hello,
    }))
}

/// The `hello` parameter of a request target's query, decoded. Other parameters are left
/// alone; one that is repeated, empty, not base64url (percent-encoding is not undone: the
/// alphabet needs none), or over `max_bytes` decoded refuses the upgrade.
fn hello_param(query: &str, max_bytes: usize) -> Result<Option<Vec<u8>>, RejectReason> {
    let mut values = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix(HELLO_PARAM)?.strip_prefix('='));
    let Some(value) = values.next() else {
        return Ok(None);
    };
    // Checked before decoding: base64 of `max_bytes` is at most this long (padded).
    if values.next().is_some() || value.is_empty() || value.len() > max_bytes.div_ceil(3) * 4 {
        return Err(RejectReason::Hello);
    }
    match B64_URL.decode(value) {
        Ok(bytes) if bytes.len() <= max_bytes && !bytes.is_empty() => Ok(Some(bytes)),
        _ => Err(RejectReason::Hello),
    }
}

// ---------------------------------------------------------------------------------------------
// Client side (tests, loadgen).

/// The request target `path` with `hello` (an encoded `hello` message) in its [`HELLO_PARAM`]
/// query parameter, base64url without padding.
pub fn hello_target(path: &str, hello: &[u8]) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut target = format!("{path}{sep}{HELLO_PARAM}=");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(hello, &mut target);
    target
}

/// Why a server's handshake response was refused by [`ClientHandshake::read_response`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Not a parsable HTTP/1.1 response, or its header block is over 8 KiB.
    #[error("malformed handshake response")]
    Malformed,
    /// The status is not 101.
    #[error("server answered {0} instead of 101")]
    Status(u16),
    /// `Upgrade: websocket` or `Connection: Upgrade` missing.
    #[error("response is not a WebSocket upgrade")]
    NotUpgrade,
    /// `Sec-WebSocket-Accept` missing or wrong.
    #[error("wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// The server chose a subprotocol we did not offer, or named more than one.
    #[error("subprotocol mismatch")]
    Subprotocol,
}

/// A successful client handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAccepted {
    /// Bytes of the response header block; what follows is WebSocket data.
    pub consumed: usize,
    /// Index into the offered subprotocols of the one the server chose.
    pub subprotocol: Option<usize>,
}

/// Client side of one handshake: builds the request and checks the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHandshake {
    key: [u8; KEY_LEN],
    accept: [u8; ACCEPT_LEN],
}

impl ClientHandshake {
    /// A handshake with the given 16-byte nonce (random per connection for a real client).
    pub fn new(nonce: [u8; 16]) -> ClientHandshake {
        let mut key = [0u8; KEY_LEN];
        // base64 of 16 bytes is exactly 24 bytes: cannot fail.
        let _ = B64.encode_slice(nonce, &mut key);
        ClientHandshake {
            key,
            accept: accept_key(&key),
        }
    }

    /// The `Sec-WebSocket-Key` value.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Appends the upgrade request for `host` (as in the `Host` header) and `path`.
    pub fn write_request(
        &self,
        out: &mut Vec<u8>,
        host: &str,
        path: &str,
        subprotocols: &[&str],
        origin: Option<&str>,
    ) {
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: ",
        );
        out.extend_from_slice(&self.key);
        if !subprotocols.is_empty() {
            out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
            out.extend_from_slice(subprotocols.join(", ").as_bytes());
        }
        if let Some(o) = origin {
            out.extend_from_slice(b"\r\nOrigin: ");
            out.extend_from_slice(o.as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
    }

    /// Checks the server's response. `Ok(None)`: incomplete so far.
    pub fn read_response(
        &self,
        input: &[u8],
        subprotocols: &[&str],
    ) -> Result<Option<ClientAccepted>, ClientError> {
        const MAX: usize = 8 * 1024;
        let window = &input[..input.len().min(MAX)];
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
        let mut resp = httparse::Response::new(&mut storage);
        let consumed = match resp.parse(window) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if window.len() < MAX => return Ok(None),
            _ => return Err(ClientError::Malformed),
        };
        match resp.code {
            Some(101) => {}
            Some(c) => return Err(ClientError::Status(c)),
            None => return Err(ClientError::Malformed),
        }
        let (mut upgrade, mut connection, mut accepted) = (false, false, false);
        let mut protocol: Option<&[u8]> = None;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"websocket"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                connection |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
            } else if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
                accepted = trim(h.value) == self.accept;
            } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                if protocol.is_some() {
                    return Err(ClientError::Subprotocol);
                }
                protocol = Some(trim(h.value));
            }
        }
        if !upgrade || !connection {
            return Err(ClientError::NotUpgrade);
        }
        if !accepted {
            return Err(ClientError::BadAccept);
        }
        let subprotocol = match protocol {
            // RFC 6455 lets a server ignore offered subprotocols; the caller decides.
            None => None,
            Some(p) => Some(
                subprotocols
                    .iter()
                    .position(|s| s.as_bytes() == p)
                    .ok_or(ClientError::Subprotocol)?,
            ),
        };
        Ok(Some(ClientAccepted {
            consumed,
            subprotocol,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::has_header_end;
    use proptest::prelude::*;

    /// The definition: an empty line, after a bare `\n` or a CRLF.
    fn by_windows(input: &[u8]) -> bool {
        input.windows(2).any(|w| w == b"\n\n") || input.windows(3).any(|w| w == b"\n\r\n")
    }

    #[test]
    fn the_header_block_ends_at_an_empty_line() {
        for (input, end) in [
            (&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..], true),
            (b"GET / HTTP/1.1\nHost: a\n\n", true),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r", false),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", false),
            (b"\n", false),
            (b"\n\r", false),
            (b"", false),
        ] {
            assert_eq!(
                has_header_end(input),
                end,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    proptest! {
        #[test]
        fn finds_the_end_where_the_definition_does(
            input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a')], 0..64)
        ) {
            prop_assert_eq!(has_header_end(&input), by_windows(&input));
        }
    }
}
