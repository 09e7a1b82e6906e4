//! The peer servers' protocols, for side-by-side runs (bench/peers/README.md): NATS's text
//! protocol over WebSocket, and the plain-ws pub/sub protocol that the uWebSockets.js and
//! tokio-tungstenite peers speak.
//!
//! [`PeerConn`] is one connection: a blocking connect (TCP, WebSocket upgrade, and for NATS
//! `INFO` / `CONNECT` / `PING` / `PONG`), then non-blocking use under the engine's epoll:
//! [`PeerConn::subscribe`], [`PeerConn::publish`], and [`PeerConn::read_some`], which does one
//! read and hands out the payloads of the messages that completed. [`NatsParser`] is the
//! incremental NATS server-protocol parser (messages split across reads and WebSocket
//! frames, several per read); every buffer is bounded, and bad input is an error, never a
//! panic.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use imgw::ws::frame::{write_client_close, write_client_frame};
use imgw::ws::{ClientHandshake, CloseCode, Decoder, Event, Limits, OpCode, Role};
use serde::{Deserialize, Serialize};

/// Largest NATS payload or plain-ws message accepted from a server.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest WebSocket frame or message accepted from a server (NATS batches many
/// operations into one frame).
pub const MAX_WS_MESSAGE: usize = 1 << 20;
/// Longest NATS protocol line (`MSG subject sid reply len`, `INFO {...}`, `-ERR '...'`).
pub const MAX_LINE: usize = 8 * 1024;

/// Which protocol loadgen speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// imgw's own protocol (any codec, WebSocket or raw TCP).
    #[default]
    Imgw,
    /// NATS text protocol over WebSocket (nats-server's `websocket` listener).
    Nats,
    /// Plain WebSocket pub/sub: JSON text frames `sub` / `pub`, data frames back.
    Plainws,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imgw => "imgw",
            Protocol::Nats => "nats",
            Protocol::Plainws => "plainws",
        }
    }

    pub fn from_name(s: &str) -> Option<Protocol> {
        [Protocol::Imgw, Protocol::Nats, Protocol::Plainws]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// What went wrong on a peer connection.
#[derive(Debug)]
pub enum PeerError {
    Io(io::Error),
    Timeout,
    Closed(String),
    Protocol(String),
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Io(e) => match e.raw_os_error() {
                Some(code) => write!(f, "{} (os error {code})", e.kind()),
                None => write!(f, "{}", e.kind()),
            },
            PeerError::Timeout => f.write_str("timeout"),
            PeerError::Closed(why) => write!(f, "closed: {why}"),
            PeerError::Protocol(why) => write!(f, "protocol: {why}"),
        }
    }
}

impl From<io::Error> for PeerError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => PeerError::Timeout,
            _ => PeerError::Io(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NATS server protocol.

/// One operation from a NATS server.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsOp<'a> {
    Info,
    Msg {
        subject: &'a [u8],
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Incremental parser of what a NATS server sends. Feed bytes as they come
/// ([`NatsParser::feed`]), then take operations with [`NatsParser::next_op`] until `Ok(None)`.
#[derive(Debug, Default)]
pub struct NatsParser {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

impl NatsParser {
    /// Appends received bytes. Fails when more than one operation's worth is pending.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos > self.buf.len() / 2) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.len() - self.pos + data.len() > MAX_PAYLOAD + MAX_LINE + MAX_WS_MESSAGE {
            return Err("NATS input buffer over its bound".into());
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete operation, if one is there.
    pub fn next_op(&mut self) -> Result<Option<NatsOp<'_>>, String> {
        let rest = &self.buf[self.pos..];
        let Some(eol) = find_crlf(rest) else {
            if rest.len() > MAX_LINE {
                return Err("NATS protocol line too long".into());
            }
            return Ok(None);
        };
        if eol > MAX_LINE {
            return Err("NATS protocol line too long".into());
        }
        let line = &rest[..eol];
        let (verb, args) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
            Some(i) => (&line[..i], trim_start(&line[i + 1..])),
            None => (line, &line[..0]),
        };
        let start = self.pos;
        let after_line = start + eol + 2;
        if verb.eq_ignore_ascii_case(b"MSG") {
            let fields: Vec<&[u8]> = args
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|f| !f.is_empty())
                .collect();
            if !(3..=4).contains(&fields.len()) {
                return Err(format!("bad MSG line: {}", lossy(line)));
            }
            let len = parse_len(fields[fields.len() - 1])
                .ok_or_else(|| format!("bad MSG length: {}", lossy(line)))?;
            if len > MAX_PAYLOAD {
                return Err(format!("MSG payload of {len} bytes is over the bound"));
            }
            if self.buf.len() < after_line + len + 2 {
                return Ok(None);
            }
            if &self.buf[after_line + len..after_line + len + 2] != b"\r\n" {
                return Err("MSG payload not followed by CRLF".into());
            }
            // Offsets of the subject within `buf`.
            let subj_off = fields[0].as_ptr() as usize - self.buf.as_ptr() as usize;
            let subj_len = fields[0].len();
            self.pos = after_line + len + 2;
            return Ok(Some(NatsOp::Msg {
                subject: &self.buf[subj_off..subj_off + subj_len],
                payload: &self.buf[after_line..after_line + len],
            }));
        }
        let op = if verb.eq_ignore_ascii_case(b"PING") {
            NatsOp::Ping
        } else if verb.eq_ignore_ascii_case(b"PONG") {
            NatsOp::Pong
        } else if verb.eq_ignore_ascii_case(b"+OK") {
            NatsOp::Ok
        } else if verb.eq_ignore_ascii_case(b"INFO") {
            NatsOp::Info
        } else if verb.eq_ignore_ascii_case(b"-ERR") {
            NatsOp::Err(lossy(args).chars().take(200).collect())
        } else {
            return Err(format!(
                "unknown NATS operation: {}",
                lossy(&line[..line.len().min(40)])
            ));
        };
        self.pos = after_line;
        Ok(Some(op))
    }
}

fn find_crlf(s: &[u8]) -> Option<usize> {
    s.windows(2).position(|w| w == b"\r\n")
}

fn trim_start(s: &[u8]) -> &[u8] {
    let i = s
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(s.len());
    &s[i..]
}

fn parse_len(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 9 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn lossy(s: &[u8]) -> String {
    String::from_utf8_lossy(s).into_owned()
}

/// `PUB subject len\r\npayload\r\n`
pub fn nats_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------------------------
// Plain-ws pub/sub.

/// `{"op":"pub","topic":T,"data":D}` (or `sub` without data), JSON-escaped.
pub fn plain_request(out: &mut Vec<u8>, op: &str, topic: &str, data: Option<&str>) {
    out.extend_from_slice(b"{\"op\":");
    json_str(out, op);
    out.extend_from_slice(b",\"topic\":");
    json_str(out, topic);
    if let Some(d) = data {
        out.extend_from_slice(b",\"data\":");
        json_str(out, d);
    }
    out.push(b'}');
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

// ---------------------------------------------------------------------------------------------
// The connection.

/// Payloads received by one [`PeerConn::read_some`]: `data[spans[k].0..spans[k].1]`.
#[derive(Debug, Default)]
pub struct Received {
    pub data: Vec<u8>,
    pub spans: Vec<(usize, usize)>,
    /// `-ERR` lines and other notes from the server.
    pub notes: Vec<String>,
}

impl Received {
    pub fn clear(&mut self) {
        self.data.clear();
        self.spans.clear();
        self.notes.clear();
    }

    fn push(&mut self, payload: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.spans.push((start, self.data.len()));
    }
}

/// One connection to a peer server. See the module documentation.
#[derive(Debug)]
pub struct PeerConn {
    sock: TcpStream,
    proto: Protocol,
    ws: Decoder,
    nats: NatsParser,
    wbuf: Vec<u8>,
    pbuf: Vec<u8>,
    rng: u64,
    closed: bool,
    nonblocking: bool,
    /// NATS: PONGs received (the connect handshake waits for one).
    pub pongs: u64,
}

impl PeerConn {
    /// Connects, upgrades to WebSocket on `path`, and for NATS completes the `CONNECT`
    /// handshake (confirmed by a `PONG`). Blocking, each step bounded by `timeout`.
    pub fn connect(
        proto: Protocol,
        addr: SocketAddr,
        path: &str,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<PeerConn, PeerError> {
        use socket2::{Domain, Protocol as SockProto, Socket, Type};
        let timeout = timeout.max(Duration::from_millis(1));
        let sock = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(SockProto::TCP),
        )?;
        if let Some(ip) = source {
            sock.bind(&SocketAddr::new(ip, 0).into())?;
        }
        sock.connect_timeout(&addr.into(), timeout)?;
        let sock: TcpStream = sock.into();
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let mut c = PeerConn {
            sock,
            proto,
            ws: Decoder::new(
                Role::Client,
                Limits::new(MAX_WS_MESSAGE as u32, MAX_WS_MESSAGE as u32),
            ),
            nats: NatsParser::default(),
            wbuf: Vec::new(),
            pbuf: Vec::new(),
            rng: seed(),
            closed: false,
            nonblocking: false,
            pongs: 0,
        };
        let deadline = Instant::now() + timeout;
        c.upgrade(addr, path, deadline)?;
        if proto == Protocol::Nats {
            c.pbuf.clear();
            c.pbuf.extend_from_slice(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"lang\":\"rust\",\
                  \"version\":\"0.1\",\"protocol\":1,\"echo\":false,\"name\":\"loadgen\"}\r\nPING\r\n",
            );
            c.send_data()?;
            c.wait_pong(deadline)?;
        }
        Ok(c)
    }

    fn upgrade(
        &mut self,
        addr: SocketAddr,
        path: &str,
        deadline: Instant,
    ) -> Result<(), PeerError> {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        nonce[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        let hs = ClientHandshake::new(nonce);
        self.wbuf.clear();
        hs.write_request(&mut self.wbuf, &addr.to_string(), path, &[], None);
        self.sock.write_all(&self.wbuf)?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if Instant::now() >= deadline {
                return Err(PeerError::Timeout);
            }
            let n = self.sock.read(&mut chunk)?;
            if n == 0 {
                return Err(PeerError::Closed("eof during the upgrade".into()));
            }
            got.extend_from_slice(&chunk[..n]);
            match hs.read_response(&got, &[]) {
                Ok(Some(a)) => {
                    let mut rest = got.split_off(a.consumed);
                    if !rest.is_empty() {
                        let mut sink = Received::default();
                        self.consume(&mut rest, &mut sink)?;
                    }
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(PeerError::Protocol(format!("upgrade: {e}"))),
            }
        }
    }

    /// Blocking: reads until a NATS `PONG` arrives (messages received meanwhile are dropped).
    fn wait_pong(&mut self, deadline: Instant) -> Result<(), PeerError> {
        let want = self.pongs + 1;
        let mut sink = Received::default();
        let mut chunk = vec![0u8; 16 * 1024];
        while self.pongs < want {
            if Instant::now() >= deadline {
                return Err(PeerError::Timeout);
            }
            sink.clear();
            self.read_into(&mut chunk, &mut sink)?;
            if let Some(note) = sink.notes.first() {
                return Err(PeerError::Protocol(note.clone()));
            }
        }
        Ok(())
    }

    /// Subscribes to `topic` (NATS: `SUB topic 1`; plain: `{"op":"sub"}`). With `confirm`
    /// (NATS only, blocking mode) waits for the server to have processed it.
    pub fn subscribe(&mut self, topic: &str, confirm: Duration) -> Result<(), PeerError> {
        self.pbuf.clear();
        match self.proto {
            Protocol::Nats => {
                self.pbuf.extend_from_slice(b"SUB ");
                self.pbuf.extend_from_slice(topic.as_bytes());
                self.pbuf.extend_from_slice(b" 1\r\nPING\r\n");
                self.send_data()?;
                if !self.nonblocking {
                    self.wait_pong(Instant::now() + confirm)?;
                }
                Ok(())
            }
            _ => {
                plain_request(&mut self.pbuf, "sub", topic, None);
                self.send_data()
            }
        }
    }

    /// Publishes `data` on `topic`.
    pub fn publish(&mut self, topic: &str, data: &str) -> Result<(), PeerError> {
        self.pbuf.clear();
        match self.proto {
            Protocol::Nats => nats_pub(&mut self.pbuf, topic, data.as_bytes()),
            _ => plain_request(&mut self.pbuf, "pub", topic, Some(data)),
        }
        self.send_data()
    }

    pub fn set_nonblocking(&mut self, on: bool) -> Result<(), PeerError> {
        self.sock.set_nonblocking(on)?;
        self.nonblocking = on;
        Ok(())
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// One read from the socket (`scratch` is the caller's buffer); the payloads of the
    /// messages it completed are appended to `out`. Returns whether the read filled
    /// `scratch` (more may be waiting). A would-block read gives `Ok(false)`.
    pub fn read_some(&mut self, scratch: &mut [u8], out: &mut Received) -> Result<bool, PeerError> {
        match self.read_into(scratch, out) {
            Ok(full) => Ok(full),
            Err(PeerError::Timeout) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn read_into(&mut self, scratch: &mut [u8], out: &mut Received) -> Result<bool, PeerError> {
        if self.closed {
            return Err(PeerError::Closed("closed".into()));
        }
        let n = loop {
            match self.sock.read(scratch) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    self.closed = true;
                    return Err(PeerError::Closed("connection reset".into()));
                }
                other => break other?,
            }
        };
        if n == 0 {
            self.closed = true;
            return Err(PeerError::Closed("eof".into()));
        }
        self.consume(&mut scratch[..n], out)?;
        Ok(n == scratch.len())
    }

    /// Feeds received bytes through the WebSocket decoder (and the NATS parser).
    fn consume(&mut self, bytes: &mut [u8], out: &mut Received) -> Result<(), PeerError> {
        let mut input: &mut [u8] = bytes;
        let mut pong_due = false;
        loop {
            let ev = match self.ws.next_event(&mut input) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    self.closed = true;
                    return Err(PeerError::Protocol(format!("websocket: {e}")));
                }
            };
            let data: &[u8] = match ev {
                Event::Text(t) => t.as_bytes(),
                Event::Binary(b) => b,
                Event::Ping(p) => {
                    let p = p.to_vec();
                    self.wbuf.clear();
                    let mask = self.mask();
                    write_client_frame(&mut self.wbuf, OpCode::Pong, true, mask, &p);
                    self.flush_wbuf()?;
                    continue;
                }
                Event::Pong(_) => continue,
                Event::Close { code, reason } => {
                    let why = format!(
                        "closed by server: {} {reason}",
                        code.map_or(0, CloseCode::as_u16)
                    );
                    self.wbuf.clear();
                    let mask = self.mask();
                    write_client_close(&mut self.wbuf, mask, code, "");
                    let _ = self.flush_wbuf();
                    self.closed = true;
                    return Err(PeerError::Closed(why));
                }
            };
            match self.proto {
                Protocol::Nats => {
                    self.nats.feed(data).map_err(PeerError::Protocol)?;
                    loop {
                        match self.nats.next_op() {
                            Ok(Some(NatsOp::Msg { payload, .. })) => out.push(payload),
                            Ok(Some(NatsOp::Ping)) => pong_due = true,
                            Ok(Some(NatsOp::Pong)) => self.pongs += 1,
                            Ok(Some(NatsOp::Err(e))) => out.notes.push(format!("-ERR {e}")),
                            Ok(Some(NatsOp::Info | NatsOp::Ok)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                self.closed = true;
                                return Err(PeerError::Protocol(e));
                            }
                        }
                    }
                }
                _ => out.push(data),
            }
        }
        if pong_due {
            self.pbuf.clear();
            self.pbuf.extend_from_slice(b"PONG\r\n");
            self.send_data()?;
        }
        Ok(())
    }

    /// Sends `pbuf` as one masked data frame (binary for NATS, text for plain-ws).
    fn send_data(&mut self) -> Result<(), PeerError> {
        let op = match self.proto {
            Protocol::Nats => OpCode::Binary,
            _ => OpCode::Text,
        };
        self.wbuf.clear();
        let mask = self.mask();
        write_client_frame(&mut self.wbuf, op, true, mask, &self.pbuf);
        self.flush_wbuf()
    }

    /// Writes all of `wbuf`; in non-blocking mode waits (bounded) while the socket is full.
    fn flush_wbuf(&mut self) -> Result<(), PeerError> {
        let mut off = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while off < self.wbuf.len() {
            match self.sock.write(&self.wbuf[off..]) {
                Ok(0) => return Err(PeerError::Closed("write returned 0".into())),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(PeerError::Timeout);
                    }
                    wait_writable(&self.sock);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

fn wait_writable(sock: &TcpStream) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd that outlives the call.
    unsafe {
        libc::poll(&mut pfd, 1, 100);
    }
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut NatsParser) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        while let Some(op) = p.next_op()? {
            out.push(match op {
                NatsOp::Msg { subject, payload } => {
                    format!("MSG {} {}", lossy(subject), lossy(payload))
                }
                NatsOp::Ping => "PING".into(),
                NatsOp::Pong => "PONG".into(),
                NatsOp::Ok => "+OK".into(),
                NatsOp::Info => "INFO".into(),
                NatsOp::Err(e) => format!("ERR {e}"),
            });
        }
        Ok(out)
    }

    const STREAM: &[u8] = b"INFO {\"server_id\":\"x\",\"max_payload\":65536}\r\n+OK\r\nPONG\r\n\
        MSG t.1 1 5\r\nhello\r\nPING\r\nMSG t.2 9 reply.to 11\r\n0:1:2:x\r\nyy\r\n\
        MSG  t.3\t1 0\r\n\r\n-ERR 'Slow Consumer'\r\n";

    fn expected() -> Vec<String> {
        [
            "INFO",
            "+OK",
            "PONG",
            "MSG t.1 hello",
            "PING",
            "MSG t.2 0:1:2:x\r\nyy",
            "MSG t.3 ",
            "ERR 'Slow Consumer'",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn nats_ops_parse_whole() {
        let mut p = NatsParser::default();
        p.feed(STREAM).unwrap();
        assert_eq!(drain(&mut p).unwrap(), expected());
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn nats_ops_parse_across_every_split() {
        for cut in 0..=STREAM.len() {
            let mut p = NatsParser::default();
            p.feed(&STREAM[..cut]).unwrap();
            let mut got = drain(&mut p).unwrap();
            p.feed(&STREAM[cut..]).unwrap();
            got.extend(drain(&mut p).unwrap());
            assert_eq!(got, expected(), "split at {cut}");
        }
        // One byte at a time.
        let mut p = NatsParser::default();
        let mut got = Vec::new();
        for b in STREAM {
            p.feed(std::slice::from_ref(b)).unwrap();
            got.extend(drain(&mut p).unwrap());
        }
        assert_eq!(got, expected());
    }

    #[test]
    fn nats_bad_input_is_an_error_not_a_panic() {
        for bad in [
            &b"MSG a 1 x\r\n"[..],
            b"MSG a\r\n",
            b"MSG a 1 2 3 4 5\r\n",
            b"MSG a 1 99999999\r\n",
            b"MSG a 1 3\r\nabcXY",
            b"WHAT\r\n",
            b"MSG a 1 -1\r\n",
        ] {
            let mut p = NatsParser::default();
            p.feed(bad).unwrap();
            assert!(p.next_op().is_err(), "{}", lossy(bad));
        }
        // A line that never ends is refused once it is over the bound.
        let mut p = NatsParser::default();
        p.feed(&vec![b'M'; MAX_LINE + 10]).unwrap();
        assert!(p.next_op().is_err());
        // A huge feed without consuming is refused, not buffered.
        let mut p = NatsParser::default();
        p.feed(b"MSG a 1 60000\r\n").unwrap();
        assert!(p.feed(&vec![b'x'; 8 << 20]).is_err());
    }

    #[test]
    fn requests_are_escaped_json() {
        let mut out = Vec::new();
        plain_request(&mut out, "pub", "t\"1", Some("a\\b\nc"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["op"], "pub");
        assert_eq!(v["topic"], "t\"1");
        assert_eq!(v["data"], "a\\b\nc");
        out.clear();
        nats_pub(&mut out, "t.1", b"hi");
        assert_eq!(out, b"PUB t.1 2\r\nhi\r\n");
        assert_eq!(Protocol::from_name("nats"), Some(Protocol::Nats));
        assert_eq!(Protocol::from_name("plainws").unwrap().name(), "plainws");
    }
}
