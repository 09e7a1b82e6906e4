//! A small blocking client for imgw's two transports, in any codec.
//!
//! This module owns the client end of a connection over `std::net` (no async runtime): the
//! TCP connect (optionally from a chosen source address), TLS when asked for
//! ([`ClientConfig::tls`]), the WebSocket upgrade with the codec's
//! subprotocol, encoding each [`Envelope`] into one raw-TCP frame or one masked WebSocket
//! message (text for JSON, binary otherwise), and the incremental decoding of what the server
//! sends. WebSocket pings are answered with pongs transparently, a server Close is answered and
//! reported as [`ClientError::Closed`]. The integration tests drive the gateway through real
//! sockets with it, and the loadgen opens its connections with it.
//!
//! ```no_run
//! use imgw::client::{Client, ClientConfig, Transport};
//! use imgw::codec::CodecId;
//! use imgw::protocol::{Envelope, Message, Ping};
//!
//! let cfg = ClientConfig::new(Transport::Ws, CodecId::Protobuf, "127.0.0.1:8080".parse()?);
//! let mut client = Client::connect(&cfg)?;
//! let welcome = client.hello("alice", "phone-1")?;
//! client.send(&Envelope::new(Message::Ping(Ping { ts: 1 })))?;
//! let reply = client.recv()?;
//! client.close();
//! # let _ = (welcome, reply);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::codec::{CodecId, DecodeError, EncodeError};
use crate::protocol::frame::{self, FrameDecoder, FrameError};
use crate::protocol::{self, Envelope, Hello, Message, Welcome};
use crate::ws::frame::{write_client_close, write_client_frame};
use crate::ws::{self, ClientHandshake, CloseCode, Decoder, Event, Limits, OpCode, Role};

/// Smallest timeout handed to the socket (std refuses a zero timeout).
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// How long [`Client::close`] waits at most for the server to close its side.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Bytes asked of the socket per read (more when a known frame needs more).
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Per-thread read buffer shared by every client of the thread (see `Client::fill`).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which of imgw's transports to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// WebSocket (RFC 6455) after an HTTP/1.1 upgrade; the codec is the subprotocol.
    Ws,
    /// Raw TCP frames (12-byte header, TLV extensions, payload; [`crate::protocol::frame`]).
    Tcp,
}

impl Transport {
    /// Both transports.
    pub const ALL: [Transport; 2] = [Transport::Ws, Transport::Tcp];

    /// `ws` or `tcp`.
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Tcp => "tcp",
        }
    }

    /// Parses `ws` or `tcp`.
    pub fn from_name(name: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// How to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    pub transport: Transport,
    pub codec: CodecId,
    /// The gateway's listener for `transport`.
    pub addr: SocketAddr,
    /// WebSocket upgrade path. Default `/ws`.
    pub ws_path: String,
    /// `Origin` header of the upgrade request; none by default (a non-browser client).
    pub origin: Option<String>,
    /// Offer the codec's subprotocol in the upgrade (default). `false` offers none, which
    /// selects JSON on the server; only valid with [`CodecId::Json`].
    pub offer_subprotocol: bool,
    /// Bounds the connect, the whole WebSocket handshake, and each wait for bytes in
    /// [`Client::recv`]. Default 5 s.
    pub read_timeout: Duration,
    /// Largest frame (raw TCP: header + extensions + payload) or WebSocket message accepted
    /// from the server. Default [`frame::DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: u32,
    /// Speak TLS to the gateway's TLS listener (`--wss-listen`, `--tls-listen`). Default none.
    pub tls: Option<TlsClient>,
}

/// The TLS side of a [`ClientConfig`]: what to trust and the name to ask for (SNI, and the
/// name the certificate must carry).
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl TlsClient {
    /// Trusts the PEM certificates in `ca_pem` for `server_name` (a DNS name or an IP
    /// address), over TLS 1.3 and 1.2 or only the versions given.
    pub fn new(
        ca_pem: &[u8],
        server_name: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<TlsClient, ClientError> {
        let config = crate::tls::client_config(ca_pem, versions)
            .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| ClientError::Protocol(format!("TLS server name: {e}")))?;
        Ok(TlsClient {
            config,
            server_name,
        })
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for TlsClient {}

/// The client's socket: plain, or under a rustls client session.
#[derive(Debug)]
enum Sock {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Sock {
    fn tcp(&self) -> &TcpStream {
        match self {
            Sock::Plain(s) => s,
            Sock::Tls(t) => &t.sock,
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Plain(s) => s.read(buf),
            Sock::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Plain(s) => s.write(buf),
            Sock::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Plain(s) => s.flush(),
            Sock::Tls(t) => t.flush(),
        }
    }
}

impl ClientConfig {
    /// A configuration with the defaults above.
    pub fn new(transport: Transport, codec: CodecId, addr: SocketAddr) -> ClientConfig {
        ClientConfig {
            transport,
            codec,
            addr,
            ws_path: "/ws".to_owned(),
            origin: None,
            offer_subprotocol: true,
            read_timeout: Duration::from_secs(5),
            max_frame_bytes: frame::DEFAULT_MAX_FRAME_BYTES,
            tls: None,
        }
    }
}

/// What went wrong. After [`ClientError::Closed`], [`ClientError::Io`] or a framing error
/// ([`ClientError::Frame`], [`ClientError::WebSocket`]) the connection is unusable; the other
/// variants leave it open.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket operation failed (connection refused, write to a reset connection, ...).
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The server refused the WebSocket upgrade (e.g. `Status(403)` for a refused Origin) or
    /// answered it wrongly (bad accept key, a subprotocol other than the one offered).
    #[error("websocket handshake failed: {0}")]
    Handshake(#[from] ws::ClientError),
    /// No byte arrived within the read timeout (or the `within`/`timeout` argument).
    #[error("timed out waiting for the server")]
    Timeout,
    /// The server closed the connection. `code` is the WebSocket close code when a Close frame
    /// carried one; it is `None` for an empty Close, and for end of stream or a reset without
    /// a Close (always so on raw TCP). `reason` is the Close frame's reason text, or a short
    /// description (`"eof"`, `"connection reset"`) when there was no Close frame.
    #[error("connection closed by the server (code {code:?}, reason {reason:?})")]
    Closed { code: Option<u16>, reason: String },
    /// A well-framed payload did not decode with the connection's codec.
    #[error("undecodable payload: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded (a value too large for the codec or frame).
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    /// The server's raw-TCP framing is broken (bad magic, oversized frame, ...); later reads
    /// discard bytes until the server closes.
    #[error("bad frame from the server: {0}")]
    Frame(#[from] FrameError),
    /// The server broke RFC 6455 framing; the client sent a Close with the matching code and
    /// later reads discard bytes until the server closes.
    #[error("websocket protocol error from the server: {0}")]
    WebSocket(#[from] ws::ProtocolError),
    /// [`Client::hello`] got `error` instead of `welcome` (the server then closes).
    #[error("hello refused: {} ({})", .0.code.name(), .0.message)]
    Refused(protocol::Error),
    /// The server did something this client does not expect: a frame whose header names
    /// another codec or op than its payload, a text frame for a binary codec, a reply with the
    /// wrong `ref`, an unexpected reply, or a request the transport cannot carry.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// One blocking connection to the gateway. See the module documentation.
#[derive(Debug)]
pub struct Client {
    sock: Sock,
    transport: Transport,
    codec: CodecId,
    /// Received bytes not consumed yet. Raw TCP: the start of the next frame(s). WebSocket:
    /// bytes not yet fed to `ws` (which keeps partial frames itself). A decoded message's
    /// strings longer than `Str`'s inline size share this buffer's allocation instead of a
    /// copy per message: keeping such a string keeps up to one read's bytes.
    rbuf: BytesMut,
    /// Scratch for outgoing frames and payloads, reused between sends.
    wbuf: Vec<u8>,
    pbuf: Vec<u8>,
    frames: FrameDecoder,
    ws: Decoder,
    read_timeout: Duration,
    /// True when the socket's timeout is not `read_timeout` (a deadline read changed it).
    timeout_changed: bool,
    /// Set once the server closed: every later read reports it again.
    closed: Option<(Option<u16>, String)>,
    /// Set after a raw-TCP framing error: received bytes are discarded from then on.
    broken: bool,
    /// The socket is in non-blocking mode ([`Client::set_nonblocking`]).
    nonblocking: bool,
    next_ref: u64,
    /// xorshift64* state for WebSocket masking keys and the handshake nonce.
    rng: u64,
}

/// A `hello` sent with the upgrade request, before the 101.
#[derive(Clone, Copy)]
enum EarlyHello<'a> {
    None,
    /// In a WebSocket frame behind the request.
    Frame(&'a Envelope),
    /// In the request target's `hello` query parameter.
    Target(&'a Envelope),
}

impl Client {
    /// Connects to `cfg.addr` and, for WebSocket, performs the upgrade offering the codec's
    /// subprotocol (see [`ClientConfig::offer_subprotocol`]), requiring the server to pick it.
    pub fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        Client::open(cfg, None)
    }

    /// Like [`Client::connect`], from the source address `local_ip` (an ephemeral port): the
    /// loadgen spreads connections over 127.0.0.x to get past one address's port range.
    pub fn connect_from(cfg: &ClientConfig, local_ip: IpAddr) -> Result<Client, ClientError> {
        Client::open(cfg, Some(local_ip))
    }

    fn open(cfg: &ClientConfig, local_ip: Option<IpAddr>) -> Result<Client, ClientError> {
        let mut client = Client::start(cfg, Client::dial(cfg, local_ip)?)?;
        if cfg.transport == Transport::Ws {
            client.upgrade(cfg, EarlyHello::None)?;
        }
        Ok(client)
    }

    /// Connects (from `local_ip` when given) and says `hello` in one round trip: over
    /// WebSocket the `hello` goes out in the same write as the upgrade request instead of
    /// after the 101, and the gateway answers both in one write (the 101, then `welcome`).
    /// A browser cannot do this (its WebSocket sends nothing before the 101), and RFC 6455
    /// asks a client to wait for the 101, so only use it with imgw's gateway directly, not
    /// through a proxy that may drop what came early. Over raw TCP it is [`Client::connect`]
    /// and [`Client::hello_with`]. Errors as theirs.
    pub fn connect_hello(
        cfg: &ClientConfig,
        local_ip: Option<IpAddr>,
        hello: Hello,
    ) -> Result<(Client, Welcome), ClientError> {
        Client::open_hello(cfg, local_ip, hello, false)
    }

    /// Like [`Client::connect_hello`], with the `hello` in the upgrade request's target (its
    /// `hello` query parameter, base64url: PROTOCOL.md section 1) instead of in a frame
    /// behind it. This is the one round trip a browser can have: its WebSocket can choose the
    /// URL but send nothing before the 101. The token is then in the request line, which a
    /// proxy or an access log may record. Over raw TCP it is [`Client::connect_hello`].
    pub fn connect_url_hello(
        cfg: &ClientConfig,
        local_ip: Option<IpAddr>,
        hello: Hello,
    ) -> Result<(Client, Welcome), ClientError> {
        Client::open_hello(cfg, local_ip, hello, true)
    }

    /// [`Client::connect_hello`] (`in_target` false) or [`Client::connect_url_hello`].
    fn open_hello(
        cfg: &ClientConfig,
        local_ip: Option<IpAddr>,
        hello: Hello,
        in_target: bool,
    ) -> Result<(Client, Welcome), ClientError> {
        let mut client = Client::start(cfg, Client::dial(cfg, local_ip)?)?;
        let r = client.next_ref();
        let env = Envelope::with_ref(Message::Hello(hello), r);
        match cfg.transport {
            Transport::Ws if in_target => client.upgrade(cfg, EarlyHello::Target(&env))?,
            Transport::Ws => client.upgrade(cfg, EarlyHello::Frame(&env))?,
            Transport::Tcp => client.send(&env)?,
        }
        let welcome = client.welcome(r)?;
        Ok((client, welcome))
    }

    /// The TCP connection, from `local_ip` when given.
    fn dial(cfg: &ClientConfig, local_ip: Option<IpAddr>) -> Result<TcpStream, ClientError> {
        use socket2::{Domain, Protocol, Socket, Type};
        offered_subprotocol(cfg)?;
        let timeout = cfg.read_timeout.max(MIN_TIMEOUT);
        let Some(ip) = local_ip else {
            return Ok(TcpStream::connect_timeout(&cfg.addr, timeout)?);
        };
        let sock = Socket::new(
            Domain::for_address(cfg.addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
        sock.connect_timeout(&cfg.addr.into(), timeout)?;
        Ok(sock.into())
    }

    /// The client over `sock`, after the TLS handshake when `cfg` asks for TLS.
    fn start(cfg: &ClientConfig, sock: TcpStream) -> Result<Client, ClientError> {
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(cfg.read_timeout.max(MIN_TIMEOUT)))?;
        let sock = match &cfg.tls {
            None => Sock::Plain(sock),
            Some(tls) => {
                // The TLS handshake completes here, each step bounded by the socket's read
                // and write timeouts.
                let conn =
                    rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                        .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?;
                let mut stream = rustls::StreamOwned::new(conn, sock);
                stream
                    .sock
                    .set_write_timeout(Some(cfg.read_timeout.max(MIN_TIMEOUT)))?;
                while stream.conn.is_handshaking() {
                    stream.conn.complete_io(&mut stream.sock)?;
                }
                Sock::Tls(Box::new(stream))
            }
        };
        let max = cfg.max_frame_bytes;
        Ok(Client {
            sock,
            transport: cfg.transport,
            codec: cfg.codec,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            pbuf: Vec::new(),
            frames: FrameDecoder::new(max),
            ws: Decoder::new(Role::Client, Limits::new(max, max)),
            read_timeout: cfg.read_timeout,
            timeout_changed: false,
            closed: None,
            broken: false,
            nonblocking: false,
            next_ref: 1,
            rng: seed(),
        })
    }

    /// The WebSocket opening handshake; `early` goes out in the request's write.
    fn upgrade(&mut self, cfg: &ClientConfig, early: EarlyHello<'_>) -> Result<(), ClientError> {
        let offered = offered_subprotocol(cfg)?;
        let offered = offered.as_slice();
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        nonce[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        let hs = ClientHandshake::new(nonce);
        let target = match early {
            EarlyHello::Target(env) => {
                self.pbuf.clear();
                self.codec.encode(env, &mut self.pbuf)?;
                std::borrow::Cow::Owned(ws::hello_target(&cfg.ws_path, &self.pbuf))
            }
            EarlyHello::None | EarlyHello::Frame(_) => std::borrow::Cow::Borrowed(&*cfg.ws_path),
        };
        self.wbuf.clear();
        hs.write_request(
            &mut self.wbuf,
            &cfg.addr.to_string(),
            &target,
            offered,
            cfg.origin.as_deref(),
        );
        if let EarlyHello::Frame(env) = early {
            self.frame(env, &[])?;
        }
        self.write_wbuf()?;
        let deadline = Instant::now() + cfg.read_timeout;
        let accepted = loop {
            if let Some(a) = hs.read_response(&self.rbuf, offered)? {
                break a;
            }
            self.fill(Some(deadline), 0)?;
        };
        if !offered.is_empty() && accepted.subprotocol != Some(0) {
            return Err(ws::ClientError::Subprotocol.into());
        }
        // What follows the response header block is WebSocket data.
        self.rbuf.advance(accepted.consumed);
        self.restore_timeout()?;
        Ok(())
    }

    /// True when received bytes are waiting to be decoded: the next [`Client::recv`] starts
    /// with them rather than with a read. An event loop on a level-triggered poller can stop
    /// calling `recv` once this is false (the poller reports the socket again if more came),
    /// saving the read that would only find the socket empty.
    pub fn has_buffered_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The codec in use.
    pub fn codec(&self) -> CodecId {
        self.codec
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.tcp().local_addr()
    }

    /// A fresh correlation id (`ref`): 1, 2, 3, ... per connection.
    pub fn next_ref(&mut self) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        r
    }

    /// Sets how long [`Client::recv`] waits for bytes (at least 1 ms).
    pub fn set_read_timeout(&mut self, d: Duration) -> Result<(), ClientError> {
        self.read_timeout = d;
        self.sock.tcp().set_read_timeout(Some(d.max(MIN_TIMEOUT)))?;
        self.timeout_changed = false;
        Ok(())
    }

    /// Switches the socket to non-blocking mode (or back), for callers that multiplex many
    /// connections on one thread with `epoll`/`poll` over [`AsRawFd::as_raw_fd`] (the loadgen).
    ///
    /// In non-blocking mode [`Client::recv`] returns a message already buffered or readable
    /// now, and [`ClientError::Timeout`] at once when none is: after a readiness event, call
    /// it until it gives `Timeout`. Deadline reads ([`Client::recv_until`],
    /// [`Client::is_closed_by_peer`]) do not wait either. Writes still never tear a frame:
    /// when the socket's send buffer is full, the rest of the frame is written in blocking
    /// mode, bounded by the read timeout (a frame that cannot be finished in that time leaves
    /// the connection unusable and is reported as [`ClientError::Io`]).
    pub fn set_nonblocking(&mut self, on: bool) -> Result<(), ClientError> {
        self.sock.tcp().set_nonblocking(on)?;
        self.nonblocking = on;
        Ok(())
    }

    /// Writes `wbuf` whole (see [`write_out`]).
    fn write_wbuf(&mut self) -> io::Result<()> {
        write_out(
            &mut self.sock,
            &self.wbuf,
            self.nonblocking,
            self.read_timeout,
        )
    }

    /// Encodes `env` with the connection's codec and writes it as one frame: a raw-TCP frame,
    /// or one masked WebSocket message (text for JSON, binary otherwise).
    pub fn send(&mut self, env: &Envelope) -> Result<(), ClientError> {
        self.send_with_ext(env, &[])
    }

    /// Like [`Client::send`], with a raw-TCP extension block (TLV entries built with
    /// [`frame::push_extension`]). WebSocket has no extensions: a non-empty block is refused
    /// there with [`ClientError::Protocol`].
    pub fn send_with_ext(&mut self, env: &Envelope, ext: &[u8]) -> Result<(), ClientError> {
        self.wbuf.clear();
        self.frame(env, ext)?;
        self.write_wbuf()?;
        Ok(())
    }

    /// Appends `env` to `wbuf` as one frame (see [`Client::send_with_ext`]).
    fn frame(&mut self, env: &Envelope, ext: &[u8]) -> Result<(), ClientError> {
        match self.transport {
            Transport::Tcp => frame::write_frame(&mut self.wbuf, self.codec, ext, env)?,
            Transport::Ws => {
                if !ext.is_empty() {
                    return Err(ClientError::Protocol(
                        "extensions exist only on raw TCP".to_owned(),
                    ));
                }
                self.pbuf.clear();
                self.codec.encode(env, &mut self.pbuf)?;
                let op = if self.codec.is_text() {
                    OpCode::Text
                } else {
                    OpCode::Binary
                };
                let mask = self.mask();
                write_client_frame(&mut self.wbuf, op, true, mask, &self.pbuf);
            }
        }
        Ok(())
    }

    /// Sends `payload` as one message whatever it holds (for tests of hostile or future
    /// payloads): a WebSocket message (text for JSON, binary otherwise), or a raw-TCP frame
    /// whose header names `op` and the connection's codec.
    pub fn send_payload(&mut self, op: u8, payload: &[u8]) -> Result<(), ClientError> {
        self.wbuf.clear();
        match self.transport {
            Transport::Tcp => {
                let len = u32::try_from(payload.len())
                    .map_err(|_| ClientError::Protocol("payload too large".to_owned()))?;
                frame::Header {
                    version: crate::protocol::CURRENT_VERSION,
                    op,
                    codec: self.codec,
                    flags: 0,
                    ext_len: 0,
                    payload_len: len,
                }
                .write(&mut self.wbuf);
                self.wbuf.extend_from_slice(payload);
            }
            Transport::Ws => {
                let code = if self.codec.is_text() {
                    OpCode::Text
                } else {
                    OpCode::Binary
                };
                let mask = self.mask();
                write_client_frame(&mut self.wbuf, code, true, mask, payload);
            }
        }
        self.write_wbuf()?;
        Ok(())
    }

    /// Writes `bytes` to the socket as they are (no framing, no masking): for bad-input tests.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        write_out(&mut self.sock, bytes, self.nonblocking, self.read_timeout)?;
        Ok(())
    }

    /// The next application message. WebSocket pings are answered and pongs dropped on the
    /// way. Waits at most the read timeout for each read; a server Close (answered with a
    /// Close), end of stream or a reset gives [`ClientError::Closed`], now and on every later
    /// call.
    pub fn recv(&mut self) -> Result<Envelope, ClientError> {
        let raw = self.next_raw(None)?;
        self.decode_raw(&raw)
    }

    /// Like [`Client::recv`], also returning the frame's raw-TCP extension block (TLV, see
    /// [`crate::protocol::frame`]); always empty on WebSocket.
    pub fn recv_with_ext(&mut self) -> Result<(Envelope, Bytes), ClientError> {
        let raw = self.next_raw(None)?;
        Ok((self.decode_raw(&raw)?, raw.ext))
    }

    /// The first message for which `pred` is true, dropping the others, waiting `timeout` in
    /// all; [`ClientError::Timeout`] if none came. Errors other than a timeout end the wait.
    pub fn recv_until(
        &mut self,
        mut pred: impl FnMut(&Envelope) -> bool,
        timeout: Duration,
    ) -> Result<Envelope, ClientError> {
        let deadline = Instant::now() + timeout;
        let result = loop {
            match self
                .next_raw(Some(deadline))
                .and_then(|raw| self.decode_raw(&raw))
            {
                Ok(env) if pred(&env) => break Ok(env),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        };
        self.restore_timeout()?;
        result
    }

    /// Sends [`Hello::new`]`(token, device)` with a fresh `ref` and waits for the answer: see
    /// [`Client::hello_with`].
    pub fn hello(&mut self, token: &str, device: &str) -> Result<Welcome, ClientError> {
        self.hello_with(Hello::new(token, device))
    }

    /// Sends `hello` with a fresh `ref` and returns the `welcome`, which must be the next
    /// message and echo the `ref`. An `error` gives [`ClientError::Refused`]; anything else
    /// [`ClientError::Protocol`].
    pub fn hello_with(&mut self, hello: Hello) -> Result<Welcome, ClientError> {
        let r = self.next_ref();
        self.send(&Envelope::with_ref(Message::Hello(hello), r))?;
        self.welcome(r)
    }

    /// The answer to the `hello` with `ref` `r` (see [`Client::hello_with`]).
    fn welcome(&mut self, r: u64) -> Result<Welcome, ClientError> {
        let env = self.recv()?;
        match env.msg {
            Message::Welcome(w) if env.reference == Some(r) => Ok(w),
            Message::Welcome(_) => Err(ClientError::Protocol(format!(
                "welcome carries ref {:?}, hello had {r}",
                env.reference
            ))),
            Message::Error(e) => Err(ClientError::Refused(e)),
            other => Err(ClientError::Protocol(format!(
                "expected welcome, got {}",
                other.op().name()
            ))),
        }
    }

    /// True if the server closes the connection (end of stream, reset, or a WebSocket Close)
    /// within `within`; messages and undecodable bytes received meanwhile are dropped.
    pub fn is_closed_by_peer(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let closed = loop {
            // Payloads are dropped undecoded.
            match self.next_raw(Some(deadline)) {
                Err(ClientError::Timeout) => break false,
                Err(ClientError::Closed { .. } | ClientError::Io(_)) => break true,
                // Messages, framing errors (after which bytes are discarded).
                _ => {}
            }
        };
        // The timeout is restored on the next read otherwise.
        let _ = self.restore_timeout();
        closed
    }

    /// Closes the connection: a WebSocket Close 1000 (unless the server closed first), then a
    /// TCP half-close, then a short bounded wait (at most the read timeout, and 1 s) for the
    /// server to close its side, so that unread bytes do not turn the close into a reset.
    pub fn close(mut self) {
        if self.nonblocking && self.set_nonblocking(false).is_err() {
            return;
        }
        if self.closed.is_none() && self.transport == Transport::Ws {
            self.wbuf.clear();
            let mask = self.mask();
            write_client_close(&mut self.wbuf, mask, Some(CloseCode::Normal), "");
            let _ = self.write_wbuf();
        }
        if let Sock::Tls(t) = &mut self.sock {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        let _ = self.sock.tcp().shutdown(Shutdown::Write);
        if self.closed.is_some() {
            return;
        }
        let deadline = Instant::now() + self.read_timeout.min(CLOSE_LINGER);
        let mut scratch = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if self
                .sock
                .tcp()
                .set_read_timeout(Some(left.max(MIN_TIMEOUT)))
                .is_err()
            {
                return;
            }
            match self.sock.read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Reading.

    /// The next message's payload, not decoded yet: the callers decode it last, so that the
    /// decoded envelope (a few hundred bytes) is not copied through every layer of this
    /// path. `deadline`: `None` waits the read timeout per read; `Some` bounds the whole call
    /// (the caller restores the socket timeout afterwards).
    fn next_raw(&mut self, deadline: Option<Instant>) -> Result<Raw, ClientError> {
        loop {
            if self.closed.is_some() {
                return Err(self.closed_error());
            }
            let need = match self.transport {
                Transport::Tcp => {
                    if let Some(raw) = self.take_tcp()? {
                        return Ok(raw);
                    }
                    if self.broken {
                        0
                    } else {
                        self.frames.needed(&self.rbuf)?
                    }
                }
                Transport::Ws => {
                    if let Some(payload) = self.take_ws()? {
                        let (ext, op) = (Bytes::new(), None);
                        return Ok(Raw { payload, ext, op });
                    }
                    0
                }
            };
            self.fill(deadline, need)?;
        }
    }

    /// Decodes a payload [`Client::next_raw`] took, checking it against its frame header's op
    /// (raw TCP).
    fn decode_raw(&self, raw: &Raw) -> Result<Envelope, ClientError> {
        let env = self.codec.decode_bytes(&raw.payload)?;
        match raw.op {
            Some(op) if op != env.msg.op() as u8 => Err(ClientError::Protocol(format!(
                "frame header op {op} but the payload is {}",
                env.msg.op().name()
            ))),
            _ => Ok(env),
        }
    }

    /// Takes one raw-TCP frame off `rbuf`, if a whole one is there.
    fn take_tcp(&mut self) -> Result<Option<Raw>, ClientError> {
        if self.broken {
            self.rbuf.clear();
            return Ok(None);
        }
        let frame = match self.frames.decode(&mut self.rbuf) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.broken = true;
                self.rbuf.clear();
                return Err(e.into());
            }
        };
        if frame.header.codec != self.codec {
            return Err(ClientError::Protocol(format!(
                "frame header names codec {}, the connection uses {}",
                frame.header.codec.name(),
                self.codec.name()
            )));
        }
        Ok(Some(Raw {
            payload: frame.payload,
            ext: frame.ext,
            op: Some(frame.header.op),
        }))
    }

    /// Feeds `rbuf` to the WebSocket decoder until a data message completes or the bytes run
    /// out (the decoder keeps a partial frame itself, so `rbuf` is then empty); returns the
    /// message's payload.
    fn take_ws(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            let base = self.rbuf.as_ptr() as usize;
            let mut input: &mut [u8] = &mut self.rbuf[..];
            let before = input.len();
            // A payload that lies in `rbuf` (an unfragmented frame: the server does not mask)
            // is taken from it below without a copy, as the raw-TCP path takes its frames; a
            // message joined from fragments is copied out of the decoder.
            let data = |p: &[u8], text: bool| match (p.as_ptr() as usize).checked_sub(base) {
                Some(at) if at + p.len() <= before => WsStep::InPlace(at, p.len(), text),
                _ => WsStep::Data(Bytes::copy_from_slice(p), text),
            };
            let step = match self.ws.next_event(&mut input) {
                Ok(Some(Event::Text(t))) => data(t.as_bytes(), true),
                Ok(Some(Event::Binary(b))) => data(b, false),
                Ok(Some(Event::Ping(p))) => WsStep::Ping(p.to_vec()),
                Ok(Some(Event::Pong(_))) => WsStep::Skip,
                Ok(Some(Event::Close { code, reason })) => WsStep::Close(code, reason.to_owned()),
                Ok(None) => WsStep::NeedMore,
                Err(e) => WsStep::Error(e),
            };
            let consumed = before - input.len();
            let step = match step {
                WsStep::InPlace(at, len, text) => {
                    // Cut down to the payload before freezing: one reference to the shared
                    // buffer per message, not one for the frame and one for its payload.
                    let mut taken = self.rbuf.split_to(consumed);
                    taken.advance(at);
                    taken.truncate(len);
                    WsStep::Data(taken.freeze(), text)
                }
                other => {
                    self.rbuf.advance(consumed);
                    other
                }
            };
            match step {
                WsStep::Data(payload, text) => {
                    if text != self.codec.is_text() {
                        return Err(ClientError::Protocol(format!(
                            "{} frame for codec {}",
                            if text { "text" } else { "binary" },
                            self.codec.name()
                        )));
                    }
                    return Ok(Some(payload));
                }
                WsStep::Ping(payload) => {
                    self.wbuf.clear();
                    let mask = self.mask();
                    write_client_frame(&mut self.wbuf, OpCode::Pong, true, mask, &payload);
                    self.write_wbuf()?;
                }
                // `InPlace` became `Data` above.
                WsStep::Skip | WsStep::InPlace(..) => {}
                WsStep::Close(code, reason) => {
                    // Complete the close handshake; the server then closes the TCP connection.
                    self.wbuf.clear();
                    let mask = self.mask();
                    let echo = Some(code.unwrap_or(CloseCode::Normal));
                    write_client_close(&mut self.wbuf, mask, echo, "");
                    let _ = self.write_wbuf();
                    self.closed = Some((code.map(CloseCode::as_u16), reason));
                    return Err(self.closed_error());
                }
                WsStep::NeedMore => return Ok(None),
                WsStep::Error(e) => {
                    self.wbuf.clear();
                    let mask = self.mask();
                    write_client_close(&mut self.wbuf, mask, Some(e.close_code()), "");
                    let _ = self.write_wbuf();
                    return Err(e.into());
                }
            }
        }
    }

    fn closed_error(&self) -> ClientError {
        let (code, reason) = self.closed.clone().unwrap_or_default();
        ClientError::Closed { code, reason }
    }

    /// One read from the socket into `rbuf` (at least `need` bytes asked for). End of stream
    /// or a reset marks the connection closed.
    fn fill(&mut self, deadline: Option<Instant>, need: usize) -> Result<(), ClientError> {
        match deadline {
            Some(d) => {
                let left = d
                    .checked_duration_since(Instant::now())
                    .filter(|l| !l.is_zero())
                    .ok_or(ClientError::Timeout)?;
                self.sock
                    .tcp()
                    .set_read_timeout(Some(left.max(MIN_TIMEOUT)))?;
                self.timeout_changed = true;
            }
            None => self.restore_timeout()?,
        }
        // Read into this thread's scratch buffer and keep only what arrived: no per-read
        // zeroing of a large buffer, and an idle connection holds no read buffer of its own.
        let want = need.max(READ_CHUNK);
        let sock = &mut self.sock;
        let rbuf = &mut self.rbuf;
        let res = SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < want {
                scratch.resize(want, 0);
            }
            let res = loop {
                match sock.read(&mut scratch[..want]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            if let Ok(n) = res {
                rbuf.extend_from_slice(&scratch[..n]);
            }
            res
        });
        match res {
            Ok(0) => {
                self.closed = Some((None, "eof".to_owned()));
                Err(self.closed_error())
            }
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Err(ClientError::Timeout),
                // TLS: the end of the stream without a close_notify.
                io::ErrorKind::UnexpectedEof => {
                    self.closed = Some((None, "eof".to_owned()));
                    Err(self.closed_error())
                }
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                    self.closed = Some((None, "connection reset".to_owned()));
                    Err(self.closed_error())
                }
                _ => Err(e.into()),
            },
        }
    }

    /// Puts the socket's timeout back to `read_timeout` after a deadline read.
    fn restore_timeout(&mut self) -> Result<(), ClientError> {
        if self.timeout_changed {
            self.sock
                .tcp()
                .set_read_timeout(Some(self.read_timeout.max(MIN_TIMEOUT)))?;
            self.timeout_changed = false;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Randomness for masking keys (RFC 6455 asks for unpredictable keys; this is not a
    // security boundary for a test and load client, but keys differ per frame).

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn mask(&mut self) -> [u8; 4] {
        ((self.next_u64() >> 32) as u32).to_ne_bytes()
    }
}

impl std::os::fd::AsRawFd for Client {
    /// The socket's descriptor, for readiness polling only: reading or writing it directly
    /// would desynchronise the client's framing.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.tcp().as_raw_fd()
    }
}

/// Writes `buf` whole. On a non-blocking socket whose send buffer fills up, finishes the
/// frame in blocking mode with `timeout` as the write timeout, then goes back to non-blocking,
/// so that a frame is never left half-written while the caller moves on.
fn write_out(sock: &mut Sock, buf: &[u8], nonblocking: bool, timeout: Duration) -> io::Result<()> {
    if !nonblocking {
        sock.write_all(buf)?;
        // TLS: the records rustls made of it go out now.
        return sock.flush();
    }
    if let Sock::Tls(_) = sock {
        // Whole records only: finish in blocking mode, bounded by the timeout.
        sock.tcp().set_nonblocking(false)?;
        sock.tcp()
            .set_write_timeout(Some(timeout.max(MIN_TIMEOUT)))?;
        let res = sock.write_all(buf).and_then(|()| sock.flush());
        sock.tcp().set_nonblocking(true)?;
        return res;
    }
    let mut rest = buf;
    while !rest.is_empty() {
        match sock.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let tcp = sock.tcp();
                tcp.set_nonblocking(false)?;
                tcp.set_write_timeout(Some(timeout.max(MIN_TIMEOUT)))?;
                let res = sock.write_all(rest);
                sock.tcp().set_write_timeout(None)?;
                sock.tcp().set_nonblocking(true)?;
                return res;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A decoder event, owned.
/// A message's payload as [`Client::next_raw`] takes it off the wire.
struct Raw {
    payload: Bytes,
    /// The raw-TCP extension block (TLV); empty on WebSocket.
    ext: Bytes,
    /// The raw-TCP header's op, which the payload must match; `None` on WebSocket.
    op: Option<u8>,
}

enum WsStep {
    Data(Bytes, bool),
    /// A data payload at `.0` in the read buffer, `.1` bytes long (`.2`: text).
    InPlace(usize, usize, bool),
    Ping(Vec<u8>),
    Skip,
    Close(Option<CloseCode>, String),
    NeedMore,
    Error(ws::ProtocolError),
}

/// The subprotocol to offer in the upgrade: the codec's, or none for JSON when
/// [`ClientConfig::offer_subprotocol`] is false (other codecs cannot go without theirs).
fn offered_subprotocol(cfg: &ClientConfig) -> Result<Option<&'static str>, ClientError> {
    match (cfg.offer_subprotocol, cfg.codec) {
        (true, codec) => Ok(Some(codec.subprotocol())),
        (false, CodecId::Json) => Ok(None),
        (false, codec) => Err(ClientError::Protocol(format!(
            "{} needs its subprotocol offered",
            codec.name()
        ))),
    }
}

/// A non-zero seed from the process's random hasher keys and the clock.
fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish() | 1
}

#[cfg(test)]
mod tests;
