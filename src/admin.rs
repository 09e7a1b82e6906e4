//! The admin HTTP/1.1 server (SPEC 7): /metrics, /healthz, /readyz, POST /drain, POST /push
//! and POST /kick.
//!
//! This module owns the admin port. It runs on one plain std thread with blocking sockets,
//! off the shards: one short-lived connection at a time, `Connection: close` on every answer,
//! a request (head and body) of at most [`MAX_REQUEST_BYTES`] and a deadline of
//! [`REQUEST_DEADLINE`] per connection, so a slow or hostile client holds it only briefly.
//! It reads shard state only through [`Metrics::render`] and [`Control`].
//!
//! With a bearer token (`--admin-token-env VAR`), every request but the probes (`/healthz`,
//! `/readyz`) must carry `Authorization: Bearer TOKEN`, or gets 401. The configuration
//! refuses an admin address beyond loopback without a token.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::control::Control;
use crate::ids::UserKey;
use crate::metrics::Metrics;
use crate::protocol::Str;
use crate::services::push::{parse_push, MAX_PUSH_ID};

/// Largest request accepted (request line, headers and body together).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time one connection may take to send its request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After an error answer, unread input is drained for at most this long before the close, so
/// that the client sees the answer rather than a reset.
const LINGER: Duration = Duration::from_millis(250);
const LINGER_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;

/// A bound, not yet serving, admin listener.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    /// The bearer token requests must carry (`None`: none needed, loopback only).
    token: Option<String>,
}

impl AdminServer {
    /// Binds the admin address; bind errors surface here, before any thread starts.
    pub fn bind(addr: SocketAddr) -> io::Result<AdminServer> {
        Ok(AdminServer {
            listener: TcpListener::bind(addr)?,
            token: None,
        })
    }

    /// Requires `Authorization: Bearer TOKEN` on every request but the probes.
    pub fn with_token(mut self, token: Option<String>) -> AdminServer {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves on a thread named `imgw-admin` for the life of the process.
    pub fn spawn(self, control: Arc<Control>, metrics: Arc<Metrics>) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("imgw-admin".into())
            .spawn(move || self.serve(&control, &metrics))
    }

    fn serve(self, control: &Control, metrics: &Metrics) {
        for conn in self.listener.incoming() {
            match conn {
                Ok(stream) => {
                    if let Err(e) = handle(stream, self.token.as_deref(), control, metrics) {
                        tracing::debug!(error = %e, "admin connection");
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Binds `addr` and serves the admin API on its own thread; returns once the socket is bound.
pub fn spawn(
    addr: SocketAddr,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
) -> io::Result<JoinHandle<()>> {
    AdminServer::bind(addr)?.spawn(control, metrics)
}

/// One answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// `Allow` header for 405.
    pub allow: Option<&'static str>,
    /// `WWW-Authenticate: Bearer` with a 401.
    pub challenge: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: None,
            challenge: false,
        }
    }

    fn not_allowed(allow: &'static str) -> Response {
        Response {
            allow: Some(allow),
            ..Response::text(405, "method not allowed\n")
        }
    }

    fn unauthorized() -> Response {
        Response {
            challenge: true,
            ..Response::text(
                401,
                "unauthorized: send Authorization: Bearer <admin token>\n",
            )
        }
    }
}

/// Whether a request for `path` carrying `bearer` may pass: always for the probes and when
/// no token is set; otherwise only with the token (compared in constant time).
fn authorized(path: &str, bearer: Option<&[u8]>, token: Option<&str>) -> bool {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let Some(token) = token else {
        return true;
    };
    if matches!(path, "/healthz" | "/readyz") {
        return true;
    }
    let Some(given) = bearer else {
        return false;
    };
    let want = token.as_bytes();
    // Constant time over the token's length: no early exit on the first differing byte.
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Routes one parsed request. `path` may carry a query string, which is ignored.
/// `body` is the request's body (empty without one).
pub fn route(
    method: &str,
    path: &str,
    body: &[u8],
    control: &Control,
    metrics: &Metrics,
) -> Response {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let get = matches!(method, "GET" | "HEAD");
    match path {
        "/metrics" if get => {
            let mut body = metrics.render();
            body.push_str(&format!(
                "# HELP imgw_ready 1 when every shard serves, the backends are ready and no drain has started.\n\
                 # TYPE imgw_ready gauge\nimgw_ready {}\n\
                 # HELP imgw_draining 1 once a drain has started.\n\
                 # TYPE imgw_draining gauge\nimgw_draining {}\n\
                 # HELP imgw_admin_unauthorized_total Admin requests refused for a missing or wrong bearer token.\n\
                 # TYPE imgw_admin_unauthorized_total counter\nimgw_admin_unauthorized_total {}\n\
                 # HELP imgw_admin_requests_total Admin requests that queue work for the shards, by outcome.\n\
                 # TYPE imgw_admin_requests_total counter\n",
                u8::from(control.ready()),
                u8::from(control.draining()),
                control.admin_unauthorized.load(Ordering::Relaxed),
            ));
            for (path, counts) in [
                ("/push", &control.admin_pushes),
                ("/kick", &control.admin_kicks),
            ] {
                for (outcome, n) in ["queued", "refused"].iter().zip(counts) {
                    body.push_str(&format!(
                        "imgw_admin_requests_total{{path=\"{path}\",outcome=\"{outcome}\"}} {}\n",
                        n.load(Ordering::Relaxed)
                    ));
                }
            }
            Response {
                content_type: "text/plain; version=0.0.4",
                ..Response::text(200, body)
            }
        }
        "/healthz" if get => Response::text(200, "ok\n"),
        "/cluster" if get => match metrics
            .io
            .get()
            .filter(|io| io.cluster.enabled.load(Ordering::Relaxed))
        {
            Some(io) => Response {
                content_type: "application/json",
                ..Response::text(200, io.cluster.view_json() + "\n")
            },
            None => Response::text(404, "not a cluster node (start with --node-id)\n"),
        },
        "/readyz" if get => {
            if control.ready() {
                Response::text(200, "ready\n")
            } else if control.draining() {
                Response::text(503, "draining\n")
            } else if control.waiting_for_backends() {
                Response::text(503, "waiting for backends\n")
            } else {
                Response::text(503, "starting\n")
            }
        }
        "/drain" if method == "POST" => {
            if !control.draining() {
                tracing::info!("drain requested through the admin API");
            }
            control.start_drain();
            Response::text(202, "draining\n")
        }
        "/push" if method == "POST" => counted(push(body, control), &control.admin_pushes),
        "/kick" if method == "POST" => counted(kick(body, control), &control.admin_kicks),
        "/metrics" | "/healthz" | "/readyz" | "/cluster" => Response::not_allowed("GET, HEAD"),
        "/drain" | "/push" | "/kick" => Response::not_allowed("POST"),
        _ => Response::text(404, "not found\n"),
    }
}

/// Counts `r` as queued (202) or refused in `counts`.
fn counted(r: Response, counts: &[AtomicU64; 2]) -> Response {
    let i = usize::from(r.status != 202);
    counts[i].fetch_add(1, Ordering::Relaxed);
    r
}

/// `POST /push`: a push record (docs/PROTOCOL.md "Push records") for the owner shard of its
/// user or group, which stores it, then delivers it. 202 with the record's idempotency key
/// once queued; 400 for a bad record; 503 while draining or when the shard's queue is full
/// (retry, with the same `id` to stay idempotent); 501 at durability `memory` (no I/O core).
fn push(body: &[u8], control: &Control) -> Response {
    /// Makes unique default ids: this process's start time and a count.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    static START_US: OnceLock<u128> = OnceLock::new();
    let Some(pusher) = control.pusher() else {
        return Response::text(501, "push needs durability local or backend\n");
    };
    if control.draining() {
        return Response::text(503, "draining\n");
    }
    let default_id = || {
        let start = START_US.get_or_init(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros())
        });
        format!("admin:{start}:{}", SEQ.fetch_add(1, Ordering::Relaxed))
    };
    let rec = match parse_push(body, default_id, pusher.max_body) {
        Ok(r) => r,
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let id = rec.cmid.clone();
    match pusher.push(Box::new(rec)) {
        Ok(()) => Response {
            content_type: "application/json",
            ..Response::text(
                202,
                format!("{}\n", serde_json::json!({ "id": id.as_str() })),
            )
        },
        Err(_) => Response::text(503, "overloaded; retry with the same id\n"),
    }
}

/// The body of `POST /kick`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KickJson {
    tenant: String,
    user: String,
}

/// `POST /kick` (`{"tenant": "t", "user": "u"}`): every device of the user gets `goaway`
/// (reason `kicked`) and is closed; the user may log in again. 202 once queued for the
/// user's owner shard; 400 for a bad body; 503 when that shard's queue is full; 501 at
/// durability `memory` (no I/O core to reach the shards through).
fn kick(body: &[u8], control: &Control) -> Response {
    let Some(pusher) = control.pusher() else {
        return Response::text(501, "kick needs durability local or backend\n");
    };
    let k: KickJson = match serde_json::from_slice(body) {
        Ok(k) => k,
        Err(e) => return Response::text(400, format!("not a kick: {e}\n")),
    };
    let bad = |id: &str| id.is_empty() || id.len() > MAX_PUSH_ID;
    if bad(&k.tenant) || bad(&k.user) {
        return Response::text(400, "an id is empty or too long\n");
    }
    let user = UserKey {
        tenant: Str::from(k.tenant),
        user: Str::from(k.user),
    };
    if pusher.kick(user) {
        Response::text(202, "kicking\n")
    } else {
        Response::text(503, "overloaded; retry\n")
    }
}

/// What reading a request produced.
enum Incoming {
    Request {
        method: String,
        path: String,
        body: Vec<u8>,
        /// The token of an `Authorization: Bearer` header.
        bearer: Option<Vec<u8>>,
    },
    /// Answer with this and close.
    Refuse(Response),
    /// The client went away before sending anything.
    Gone,
}

/// Reads one request within the size limit and the deadline.
fn read_request(stream: &mut TcpStream, deadline: Instant) -> io::Result<Incoming> {
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(Incoming::Refuse(Response::text(408, "request timeout\n")));
        }
        stream.set_read_timeout(Some(remaining))?;
        if len == buf.len() {
            return Ok(Incoming::Refuse(Response::text(431, "request too large\n")));
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) if len == 0 => return Ok(Incoming::Gone),
            Ok(0) => return Ok(Incoming::Refuse(Response::text(400, "truncated request\n"))),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Incoming::Refuse(Response::text(408, "request timeout\n")))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(h)) => h,
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => {
                return Ok(Incoming::Refuse(Response::text(431, "too many headers\n")))
            }
            Err(e) => {
                return Ok(Incoming::Refuse(Response::text(
                    400,
                    format!("bad request: {e}\n"),
                )))
            }
        };
        let mut body_len = 0usize;
        let mut bearer = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("authorization") {
                bearer = h
                    .value
                    .strip_prefix(b"Bearer ")
                    .map(|t| t.trim_ascii().to_vec());
            }
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Ok(Incoming::Refuse(Response::text(
                    501,
                    "transfer-encoding not supported\n",
                )));
            }
            if h.name.eq_ignore_ascii_case("content-length") {
                let parsed = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok());
                match parsed {
                    Some(n) => body_len = n,
                    None => {
                        return Ok(Incoming::Refuse(Response::text(
                            400,
                            "bad content-length\n",
                        )))
                    }
                }
            }
        }
        if head_len.saturating_add(body_len) > MAX_REQUEST_BYTES {
            return Ok(Incoming::Refuse(Response::text(413, "request too large\n")));
        }
        // A complete head parsed, so method and path are present (httparse's invariant).
        let method = req.method.unwrap_or_default().to_string();
        let path = req.path.unwrap_or_default().to_string();
        // Read the body (to the end, so closing does not reset the connection).
        let mut have = len - head_len;
        while have < body_len {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(Incoming::Refuse(Response::text(408, "request timeout\n")));
            }
            stream.set_read_timeout(Some(remaining))?;
            match stream.read(&mut buf[len..]) {
                Ok(0) => return Ok(Incoming::Refuse(Response::text(400, "truncated body\n"))),
                Ok(n) => {
                    have += n;
                    len += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Incoming::Refuse(Response::text(408, "request timeout\n")))
                }
                Err(e) => return Err(e),
            }
        }
        // The head is complete and the body in, within MAX_REQUEST_BYTES (checked above).
        let body = buf
            .get(head_len..head_len + body_len)
            .unwrap_or_default()
            .to_vec();
        return Ok(Incoming::Request {
            method,
            path,
            body,
            bearer,
        });
    }
}

fn write_response(stream: &mut TcpStream, r: &Response, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    if let Some(allow) = r.allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    if r.challenge {
        out.push_str("WWW-Authenticate: Bearer realm=\"imgw admin\"\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&r.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// Drains what the client still sends, briefly, after our answer (a lingering close).
fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let until = Instant::now() + LINGER;
    let mut scratch = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut scratch) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn handle(
    mut stream: TcpStream,
    token: Option<&str>,
    control: &Control,
    metrics: &Metrics,
) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    match read_request(&mut stream, deadline)? {
        Incoming::Gone => Ok(()),
        Incoming::Refuse(r) => {
            tracing::debug!(status = r.status, "admin request refused");
            write_response(&mut stream, &r, false)?;
            linger(&mut stream);
            Ok(())
        }
        Incoming::Request {
            method,
            path,
            body,
            bearer,
        } => {
            let r = if authorized(&path, bearer.as_deref(), token) {
                route(&method, &path, &body, control, metrics)
            } else {
                control.admin_unauthorized.fetch_add(1, Ordering::Relaxed);
                Response::unauthorized()
            };
            tracing::debug!(%method, %path, status = r.status, "admin request");
            write_response(&mut stream, &r, method == "HEAD")?;
            let _ = stream.shutdown(Shutdown::Write);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        addr: SocketAddr,
        control: Arc<Control>,
    }

    fn start(shards: usize) -> Fixture {
        start_with(shards, None)
    }

    fn start_with(shards: usize, token: Option<&str>) -> Fixture {
        let control = Arc::new(Control::new(shards));
        let metrics = Arc::new(Metrics::new(shards));
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .with_token(token.map(String::from));
        let addr = server.local_addr().unwrap();
        server.spawn(control.clone(), metrics).unwrap();
        Fixture { addr, control }
    }

    /// Sends raw bytes, returns everything the server wrote before closing.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let resp = exchange(
            addr,
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    fn status_line(head: &str) -> &str {
        head.lines().next().unwrap()
    }

    #[test]
    fn health_ready_drain_cycle() {
        let f = start(2);
        let (h, b) = get(f.addr, "GET", "/healthz");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK");
        assert_eq!(b, "ok\n");
        assert!(h.contains("Connection: close"));

        let (h, b) = get(f.addr, "GET", "/readyz");
        assert_eq!(status_line(&h), "HTTP/1.1 503 Service Unavailable");
        assert_eq!(b, "starting\n");
        f.control.shard_ready();
        f.control.shard_ready();
        let (h, b) = get(f.addr, "GET", "/readyz?verbose=1");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK");
        assert_eq!(b, "ready\n");

        let resp = exchange(
            f.addr,
            b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(resp.starts_with("HTTP/1.1 202 Accepted\r\n"), "{resp}");
        assert!(f.control.draining());
        let (h, b) = get(f.addr, "GET", "/readyz");
        assert_eq!(status_line(&h), "HTTP/1.1 503 Service Unavailable");
        assert_eq!(b, "draining\n");
        let (h, _) = get(f.addr, "GET", "/healthz");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK", "healthy while draining");
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let f = start(1);
        let (h, b) = get(f.addr, "GET", "/metrics");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK");
        assert!(h.contains("Content-Type: text/plain; version=0.0.4"), "{h}");
        assert!(b.contains("# TYPE imgw_connections gauge"));
        assert!(b.contains("imgw_connections{shard=\"0\"} 0"));
        assert!(b.contains("imgw_ready 0\n"));
        assert!(b.contains("imgw_draining 0\n"));
        let len: usize = h
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, b.len());
        let (h, b) = get(f.addr, "HEAD", "/metrics");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK");
        assert!(b.is_empty());
    }

    #[test]
    fn unknown_paths_and_methods() {
        let f = start(1);
        let (h, _) = get(f.addr, "GET", "/nope");
        assert_eq!(status_line(&h), "HTTP/1.1 404 Not Found");
        let (h, _) = get(f.addr, "POST", "/metrics");
        assert_eq!(status_line(&h), "HTTP/1.1 405 Method Not Allowed");
        assert!(h.contains("Allow: GET, HEAD"));
        let (h, _) = get(f.addr, "GET", "/drain");
        assert_eq!(status_line(&h), "HTTP/1.1 405 Method Not Allowed");
        assert!(h.contains("Allow: POST"));
        assert!(!f.control.draining(), "GET /drain must not drain");
        let (h, _) = get(f.addr, "DELETE", "/healthz");
        assert_eq!(status_line(&h), "HTTP/1.1 405 Method Not Allowed");
    }

    #[test]
    fn bad_request_lines() {
        let f = start(1);
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /healthz HTTP/9.9\r\n\r\n",
            b"GET\x01 / HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n",
            b"POST /drain HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        ] {
            let resp = exchange(f.addr, bad);
            assert!(
                resp.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{:?} -> {resp}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(!f.control.draining());
        // A truncated request (client half-closes mid-head).
        let mut s = TcpStream::connect(f.addr).unwrap();
        s.write_all(b"GET /heal").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    }

    #[test]
    fn oversize_requests_are_refused_and_closed() {
        let f = start(1);
        let mut big = b"GET /healthz HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_REQUEST_BYTES * 2, b'a');
        let mut s = TcpStream::connect(f.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&big).unwrap();
        let mut out = Vec::new();
        // The server closes after its answer: read_to_end returns (EOF) rather than hanging.
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{out}"
        );

        let resp = exchange(
            f.addr,
            b"POST /drain HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
        );
        assert!(resp.starts_with("HTTP/1.1 413 "), "{resp}");
        assert!(!f.control.draining());

        // The server still serves after refusing.
        let (h, _) = get(f.addr, "GET", "/healthz");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK");
    }

    #[test]
    fn a_silent_client_does_not_wedge_the_server_forever() {
        let f = start(1);
        let _idle = TcpStream::connect(f.addr).unwrap();
        // One connection at a time: this waits at most REQUEST_DEADLINE behind the idle one.
        let t = Instant::now();
        let (h, _) = get(f.addr, "GET", "/healthz");
        assert_eq!(status_line(&h), "HTTP/1.1 200 OK");
        assert!(t.elapsed() < REQUEST_DEADLINE + Duration::from_secs(3));
    }

    #[test]
    fn bind_errors_surface_before_the_thread() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = spawn(addr, Arc::new(Control::new(1)), Arc::new(Metrics::new(1)));
        assert!(err.is_err());
    }

    #[test]
    fn routing_without_sockets() {
        let c = Control::new(0);
        let m = Metrics::new(0);
        assert_eq!(route("GET", "/readyz", b"", &c, &m).status, 200);
        c.backend_pending();
        let r = route("GET", "/readyz", b"", &c, &m);
        assert_eq!((r.status, r.body.as_str()), (503, "waiting for backends\n"));
        c.backend_ready();
        assert_eq!(route("GET", "/readyz", b"", &c, &m).status, 200);
        assert_eq!(route("PUT", "/drain", b"", &c, &m).status, 405);
        assert_eq!(route("POST", "/drain", b"", &c, &m).status, 202);
        assert_eq!(route("GET", "/readyz", b"", &c, &m).status, 503);
    }

    /// With a token, every request but the probes needs `Authorization: Bearer TOKEN`: 401
    /// with a `WWW-Authenticate` challenge otherwise (counted), whatever the method or path.
    #[test]
    fn a_bearer_token_guards_everything_but_the_probes() {
        let token = "0123456789abcdef-admin";
        let f = start_with(1, Some(token));
        let ask = |extra: &str, method: &str, path: &str| {
            exchange(
                f.addr,
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes(),
            )
        };
        for (method, path) in [("GET", "/metrics"), ("POST", "/drain"), ("POST", "/kick")] {
            for extra in [
                "",
                "Authorization: Bearer wrong-token-0000000\r\n",
                "Authorization: Basic MDEyMzQ1Njc4OWFiY2RlZi1hZG1pbg==\r\n",
                "Authorization: Bearer 0123456789abcdef-admin-and-more\r\n",
            ] {
                let r = ask(extra, method, path);
                assert!(
                    r.starts_with("HTTP/1.1 401 "),
                    "{method} {path} {extra:?}: {r}"
                );
                assert!(r.contains("WWW-Authenticate: Bearer"), "{r}");
            }
        }
        assert!(!f.control.draining(), "an unauthorized drain was obeyed");
        for path in ["/healthz", "/readyz"] {
            let r = ask("", "GET", path);
            assert!(!r.starts_with("HTTP/1.1 401 "), "{path}: {r}");
        }
        let auth = format!("Authorization: Bearer {token}\r\n");
        let r = ask(&auth, "GET", "/metrics");
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.contains("imgw_admin_unauthorized_total 12\n"), "{r}");
        assert!(ask(&auth, "POST", "/drain").starts_with("HTTP/1.1 202 "));
        assert!(f.control.draining());
    }

    #[test]
    fn without_a_token_nothing_is_asked() {
        assert!(authorized("/metrics", None, None));
        assert!(authorized("/drain", Some(b"anything"), None));
        assert!(authorized(
            "/readyz?verbose=1",
            None,
            Some("0123456789abcdef")
        ));
        assert!(!authorized("/metrics?x=1", None, Some("0123456789abcdef")));
    }
}
