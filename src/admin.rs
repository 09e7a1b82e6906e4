//! The admin HTTP/1.1 server (SPEC 7): /metrics, /healthz, /readyz, /cluster, POST /drain,
//! POST /push, POST /kick, POST /broadcast, group management under /groups and user
//! inspection under /users (docs/ADMIN.md lists the routes and their status codes).
//!
//! This module owns the admin port. It runs on one plain std thread with blocking sockets,
//! off the shards: one short-lived connection at a time, `Connection: close` on every answer,
//! a request head of at most [`MAX_HEAD_BYTES`], a body of at most [`MAX_BODY_BYTES`] and a
//! deadline of
//! [`REQUEST_DEADLINE`] per connection, so a slow or hostile client holds it only briefly.
//! It reads shard state only through [`Metrics::render`] and [`Control`], and reaches the
//! shards through their admin queues ([`crate::shard::admin`], bounded, one per shard, never
//! waited on: a full queue is a 503). A request that needs a shard's answer carries a
//! `sync_channel(1)` and waits at most [`REPLY_TIMEOUT`] for it (504 after that).
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
use crate::ids::{owner_shard, UserKey};
use crate::metrics::Metrics;
use crate::protocol::{Str, Target};
use crate::services::push::{parse_push, MAX_PUSH_ID};
use crate::shard::admin::{AdminAnswer, AdminCmd, AdminQueues, DeviceInfo, GroupOp};
use crate::shard::GroupKey;
use crate::web::WebConfig;

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body accepted: room for [`MAX_USERS_PER_REQUEST`] user ids of the longest
/// length ([`MAX_PUSH_ID`]), quoted and separated, and the rest of the object. (At 8 KiB for
/// head and body together, a member list of 1,000 ids of 10 bytes did not fit.)
pub const MAX_BODY_BYTES: usize = MAX_USERS_PER_REQUEST * (MAX_PUSH_ID + 3) + 1024;
/// Time one connection may take to send its request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After an error answer, unread input is drained for at most this long before the close, so
/// that the client sees the answer rather than a reset.
const LINGER: Duration = Duration::from_millis(250);
const LINGER_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;
/// How long a request waits for a shard's answer (a shard drains its admin queue every
/// `runtime.tick_ms`, 10 ms by default; the store may take a commit more at `local`).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Users one `POST /groups` or `POST /groups/{tenant}/{group}/members` may name.
pub const MAX_USERS_PER_REQUEST: usize = 1000;
/// Longest group id (as for a client's `group_join`).
pub const MAX_GROUP_ID: usize = crate::protocol::MAX_ID_BYTES;

/// A bound, not yet serving, admin listener.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    /// The bearer token requests must carry (`None`: none needed, loopback only).
    token: Option<String>,
    /// The `--web` pages (`None`: not served).
    web: Option<WebConfig>,
}

impl AdminServer {
    /// Binds the admin address; bind errors surface here, before any thread starts.
    pub fn bind(addr: SocketAddr) -> io::Result<AdminServer> {
        Ok(AdminServer {
            listener: TcpListener::bind(addr)?,
            token: None,
            web: None,
        })
    }

    /// Requires `Authorization: Bearer TOKEN` on every request but the probes.
    pub fn with_token(mut self, token: Option<String>) -> AdminServer {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Serves the browser pages (`--web`, [`crate::web`]): public, before the token check.
    pub fn with_web(mut self, web: Option<WebConfig>) -> AdminServer {
        self.web = web;
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
        // The bound address, for the pages' config; bind succeeded, so it is known.
        let web = match self.listener.local_addr() {
            Ok(addr) => self.web.as_ref().map(|w| (w, addr)),
            Err(_) => None,
        };
        for conn in self.listener.incoming() {
            match conn {
                Ok(stream) => {
                    if let Err(e) = handle(stream, self.token.as_deref(), web, control, metrics) {
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
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
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
            for (path, counts, done) in [
                ("/push", &control.admin_pushes, "queued"),
                ("/kick", &control.admin_kicks, "queued"),
                ("/broadcast", &control.admin_broadcasts, "queued"),
                ("/groups", &control.admin_groups, "ok"),
                ("/users", &control.admin_users, "ok"),
            ] {
                for (outcome, n) in [done, "refused"].iter().zip(counts) {
                    body.push_str(&format!(
                        "imgw_admin_requests_total{{path=\"{path}\",outcome=\"{outcome}\"}} {}\n",
                        n.load(Ordering::Relaxed)
                    ));
                }
            }
            let (broadcast, pushed) = control.admin().map_or((0, 0), |q| {
                (
                    q.stats.broadcast_deliveries.load(Ordering::Relaxed),
                    q.stats.pushes_delivered.load(Ordering::Relaxed),
                )
            });
            body.push_str(&format!(
                "# HELP imgw_admin_queue_full_total Admin requests refused (503) because a shard's admin queue was full.\n\
                 # TYPE imgw_admin_queue_full_total counter\nimgw_admin_queue_full_total {}\n\
                 # HELP imgw_admin_timeouts_total Admin requests whose shard answer came too late (504).\n\
                 # TYPE imgw_admin_timeouts_total counter\nimgw_admin_timeouts_total {}\n\
                 # HELP imgw_admin_broadcast_deliveries_total Connections reached by admin broadcasts.\n\
                 # TYPE imgw_admin_broadcast_deliveries_total counter\nimgw_admin_broadcast_deliveries_total {broadcast}\n\
                 # HELP imgw_admin_memory_pushes_delivered_total Admin pushes delivered to online devices at durability memory.\n\
                 # TYPE imgw_admin_memory_pushes_delivered_total counter\nimgw_admin_memory_pushes_delivered_total {pushed}\n",
                control.admin_queue_full.load(Ordering::Relaxed),
                control.admin_timeouts.load(Ordering::Relaxed),
            ));
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
        "/broadcast" if method == "POST" => {
            counted(broadcast(body, control), &control.admin_broadcasts)
        }
        "/drain" | "/push" | "/kick" | "/broadcast" => Response::not_allowed("POST"),
        _ => resource(method, path, body, control),
    }
}

/// The routes with ids in their path: `/groups...` and `/users/{tenant}/{user}`.
fn resource(method: &str, path: &str, body: &[u8], control: &Control) -> Response {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = matches!(method, "GET" | "HEAD");
    match segments.as_slice() {
        ["groups"] => match method {
            "POST" => counted(create_group(body, control), &control.admin_groups),
            _ => Response::not_allowed("POST"),
        },
        ["groups", tenant, group] => match method {
            "DELETE" => counted(
                group_path(tenant, group, control, || Ok(GroupOp::Delete)),
                &control.admin_groups,
            ),
            _ => Response::not_allowed("DELETE"),
        },
        ["groups", tenant, group, "members"] => {
            let r = match method {
                _ if get => group_path(tenant, group, control, || Ok(GroupOp::List)),
                "POST" => group_path(tenant, group, control, || {
                    members_body(body).map(GroupOp::Add)
                }),
                _ => return Response::not_allowed("GET, HEAD, POST"),
            };
            counted(r, &control.admin_groups)
        }
        ["groups", tenant, group, "members", user] => match method {
            "DELETE" => counted(
                group_path(tenant, group, control, || {
                    path_id(user, MAX_PUSH_ID).map(GroupOp::Remove)
                }),
                &control.admin_groups,
            ),
            _ => Response::not_allowed("DELETE"),
        },
        ["users", tenant, user] => match method {
            _ if get => counted(inspect_user(tenant, user, control), &control.admin_users),
            _ => Response::not_allowed("GET, HEAD"),
        },
        _ => Response::text(404, "not found\n"),
    }
}

/// Counts `r` as done (2xx: queued or served) or refused in `counts`.
fn counted(r: Response, counts: &[AtomicU64; 2]) -> Response {
    let i = usize::from(!(200..300).contains(&r.status));
    counts[i].fetch_add(1, Ordering::Relaxed);
    r
}

/// A JSON answer.
fn json(status: u16, value: serde_json::Value) -> Response {
    Response {
        content_type: "application/json",
        ..Response::text(status, format!("{value}\n"))
    }
}

/// A JSON error answer: `{"error": "..."}`.
fn json_error(status: u16, message: impl std::fmt::Display) -> Response {
    json(status, serde_json::json!({ "error": message.to_string() }))
}

/// The shards' admin queues, when the shards run and no drain has started.
fn admin_queues(control: &Control) -> Result<&AdminQueues, Response> {
    if control.draining() {
        return Err(json_error(503, "draining"));
    }
    match control.admin() {
        Some(q) => Ok(q),
        None => Err(json_error(503, "the shards are not running yet")),
    }
}

/// Queues `cmd` for shard `dest`; a full queue is a 503 (counted).
fn post(
    control: &Control,
    queues: &AdminQueues,
    dest: usize,
    cmd: AdminCmd,
) -> Result<(), Response> {
    if queues.post(dest, cmd) {
        return Ok(());
    }
    control.admin_queue_full.fetch_add(1, Ordering::Relaxed);
    Err(json_error(
        503,
        "overloaded: the shard's admin queue is full; retry",
    ))
}

/// Queues a command that answers, built around its reply channel, for shard `dest`, and
/// waits for the answer: 503 for a full queue or a request the shard dropped (its store
/// queue was full), 504 after [`REPLY_TIMEOUT`] (counted).
fn ask(
    control: &Control,
    queues: &AdminQueues,
    dest: usize,
    make: impl FnOnce(crate::shard::admin::ReplyTx) -> AdminCmd,
) -> Result<AdminAnswer, Response> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    post(control, queues, dest, make(tx))?;
    match rx.recv_timeout(REPLY_TIMEOUT) {
        Ok(a) => Ok(a),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            control.admin_timeouts.fetch_add(1, Ordering::Relaxed);
            Err(json_error(504, "the shard did not answer in time"))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(json_error(
            503,
            "overloaded: the store's queue is full; retry",
        )),
    }
}

/// `POST /push`: a push record (docs/PROTOCOL.md "Push records") for the owner shard of its
/// user or group. With an I/O core (durability `local`, `backend`) the shard stores it, then
/// delivers it; at `memory` it reaches the online devices only (nothing is kept for anyone
/// offline). 202 with the record's idempotency key once queued; 400 for a bad record; 503
/// while draining or when the shard's queue is full (retry, with the same `id` to stay
/// idempotent where the record is stored).
fn push(body: &[u8], control: &Control) -> Response {
    /// Makes unique default ids: this process's start time and a count.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    static START_US: OnceLock<u128> = OnceLock::new();
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
    let max_body = match (control.pusher(), control.admin()) {
        (Some(p), _) => p.max_body,
        (None, Some(q)) => q.max_body,
        (None, None) => return Response::text(503, "the shards are not running yet\n"),
    };
    let rec = match parse_push(body, default_id, max_body) {
        Ok(r) => r,
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let id = rec.cmid.clone();
    let queued = match (control.pusher(), control.admin()) {
        (Some(pusher), _) => pusher.push(Box::new(rec)).is_ok(),
        (None, Some(q)) => {
            let target = match &rec.to {
                Target::User(u) | Target::Group(u) => u,
            };
            let dest = owner_shard(&rec.tenant, target, q.shards());
            post(control, q, dest, AdminCmd::Push(Box::new(rec))).is_ok()
        }
        (None, None) => false,
    };
    if queued {
        json(202, serde_json::json!({ "id": id.as_str() }))
    } else {
        Response::text(503, "overloaded; retry with the same id\n")
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
/// user's owner shard; 400 for a bad body; 503 when that shard's queue is full.
fn kick(body: &[u8], control: &Control) -> Response {
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
    let queued = match (control.pusher(), control.admin()) {
        // With an I/O core its path also relays the kick to the other cluster nodes.
        (Some(pusher), _) => pusher.kick(user),
        (None, Some(q)) => {
            let dest = owner_shard(&user.tenant, &user.user, q.shards());
            post(control, q, dest, AdminCmd::Kick(user)).is_ok()
        }
        (None, None) => return Response::text(503, "the shards are not running yet\n"),
    };
    if queued {
        Response::text(202, "kicking\n")
    } else {
        Response::text(503, "overloaded; retry\n")
    }
}

/// The body of `POST /broadcast`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastJson {
    tenant: String,
    body: String,
    #[serde(default)]
    kind: Option<String>,
    /// The sender shown (default `system`).
    #[serde(default)]
    from: Option<String>,
}

/// `POST /broadcast` (`{"tenant": "t", "body": "...", "kind": "notice"}`): one `deliver` to
/// every online connection of the tenant, not stored. One command per shard, each delivering
/// to its own connections. 202 with `{"shards": n}` queued; 400 for a bad body; 503 when no
/// shard could take it (or while draining). A shard whose queue was full is skipped and
/// named in `skipped` (its connections miss the broadcast).
fn broadcast(body: &[u8], control: &Control) -> Response {
    let q = match admin_queues(control) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let b: BroadcastJson = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return json_error(400, format_args!("not a broadcast: {e}")),
    };
    let from = b.from.unwrap_or_else(|| "system".into());
    let bad = |id: &str| id.is_empty() || id.len() > MAX_PUSH_ID;
    if bad(&b.tenant) || bad(&from) || b.kind.as_deref().is_some_and(bad) {
        return json_error(400, "tenant, from and kind must be 1 to 256 bytes");
    }
    if b.body.len() > q.max_body {
        return json_error(400, "body too large");
    }
    let (tenant, from, body) = (Str::from(b.tenant), Str::from(from), Str::from(b.body));
    let kind = b.kind.map(Str::from);
    let mut skipped = Vec::new();
    for shard in 0..q.shards() {
        let cmd = AdminCmd::Broadcast {
            tenant: tenant.clone(),
            from: from.clone(),
            kind: kind.clone(),
            body: body.clone(),
        };
        if post(control, q, shard, cmd).is_err() {
            skipped.push(shard);
        }
    }
    let queued = q.shards() - skipped.len();
    if queued == 0 {
        return json_error(503, "overloaded: every shard's admin queue is full; retry");
    }
    json(
        202,
        serde_json::json!({ "shards": queued, "skipped": skipped }),
    )
}

/// Decodes one path segment (`%XX` escapes) into an id of 1 to `max` bytes of UTF-8.
fn path_id(segment: &str, max: usize) -> Result<Str, Response> {
    let raw = segment.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(b) = hex else {
                return Err(json_error(400, "bad %-escape in the path"));
            };
            out.push(b);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    let Ok(id) = String::from_utf8(out) else {
        return Err(json_error(400, "an id in the path is not UTF-8"));
    };
    if id.is_empty() || id.len() > max {
        return Err(json_error(
            400,
            format_args!("an id in the path is empty or longer than {max} bytes"),
        ));
    }
    Ok(Str::from(id))
}

/// Checks a list of user ids from a body: 1 to [`MAX_USERS_PER_REQUEST`] ids of 1 to 256
/// bytes; duplicates are dropped (the first kept).
fn user_list(users: Vec<String>) -> Result<Vec<Str>, Response> {
    if users.is_empty() || users.len() > MAX_USERS_PER_REQUEST {
        return Err(json_error(
            400,
            format_args!("users must list 1 to {MAX_USERS_PER_REQUEST} ids"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(users.len());
    for u in users {
        if u.is_empty() || u.len() > MAX_PUSH_ID {
            return Err(json_error(
                400,
                "a user id is empty or longer than 256 bytes",
            ));
        }
        if seen.insert(u.clone()) {
            out.push(Str::from(u));
        }
    }
    Ok(out)
}

/// The body of `POST /groups/{tenant}/{group}/members`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersJson {
    users: Vec<String>,
}

fn members_body(body: &[u8]) -> Result<Vec<Str>, Response> {
    let m: MembersJson = serde_json::from_slice(body)
        .map_err(|e| json_error(400, format_args!("expected {{\"users\": [...]}}: {e}")))?;
    user_list(m.users)
}

/// The body of `POST /groups`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroupJson {
    tenant: String,
    group: String,
    users: Vec<String>,
}

/// `POST /groups` (`{"tenant": "t", "group": "g", "users": ["a", "b"]}`): creates the group
/// with its first members. A group is its member list (as for clients' joins, and as the
/// store keeps it), so at least one member is needed. 201; 409 if the group exists.
fn create_group(body: &[u8], control: &Control) -> Response {
    let c: CreateGroupJson = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => {
            return json_error(
                400,
                format_args!("expected {{\"tenant\": .., \"group\": .., \"users\": [..]}}: {e}"),
            )
        }
    };
    if c.tenant.is_empty() || c.tenant.len() > MAX_PUSH_ID {
        return json_error(400, "tenant must be 1 to 256 bytes");
    }
    if c.group.is_empty() || c.group.len() > MAX_GROUP_ID {
        return json_error(400, format_args!("group must be 1 to {MAX_GROUP_ID} bytes"));
    }
    let users = match user_list(c.users) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let group = GroupKey {
        tenant: Str::from(c.tenant),
        group: Str::from(c.group),
    };
    group_request(group, GroupOp::Create(users), control)
}

/// A route under `/groups/{tenant}/{group}`: decodes the ids, builds the operation (which
/// may read the body) and asks the group's owner shard.
fn group_path(
    tenant: &str,
    group: &str,
    control: &Control,
    op: impl FnOnce() -> Result<GroupOp, Response>,
) -> Response {
    let key = match (path_id(tenant, MAX_PUSH_ID), path_id(group, MAX_GROUP_ID)) {
        (Ok(tenant), Ok(group)) => GroupKey { tenant, group },
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match op() {
        Ok(op) => group_request(key, op, control),
        Err(r) => r,
    }
}

/// Asks the group's owner shard to run `op`, and answers with what it did.
fn group_request(group: GroupKey, op: GroupOp, control: &Control) -> Response {
    let q = match admin_queues(control) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let creating = matches!(op, GroupOp::Create(_));
    let deleting = matches!(op, GroupOp::Delete);
    let dest = owner_shard(&group.tenant, &group.group, q.shards());
    let names = (group.tenant.clone(), group.group.clone());
    let answer = match ask(control, q, dest, |reply| AdminCmd::Group {
        group,
        op,
        reply,
    }) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let (tenant, group) = (names.0.as_str(), names.1.as_str());
    match answer {
        AdminAnswer::Members(m) => {
            let members: Vec<&str> = m.iter().map(|u| u.as_str()).collect();
            json(
                200,
                serde_json::json!({ "tenant": tenant, "group": group, "members": members }),
            )
        }
        AdminAnswer::Changed {
            changed,
            members,
            refused,
        } => {
            if creating && changed == 0 {
                return json_error(409, "the store refused every member: no group");
            }
            let status = if creating { 201 } else { 200 };
            let key = if deleting { "removed" } else { "changed" };
            json(
                status,
                serde_json::json!({
                    "tenant": tenant, "group": group, key: changed,
                    "members": members, "refused": refused,
                }),
            )
        }
        AdminAnswer::NotFound => json_error(404, "no such group or member"),
        AdminAnswer::Exists => json_error(409, "the group exists"),
        AdminAnswer::Limit => json_error(409, "a group or shard limit would be passed"),
        AdminAnswer::Unavailable => json_error(503, "the store is unavailable; retry"),
        AdminAnswer::User { .. } | AdminAnswer::Devices(_) => {
            json_error(500, "unexpected answer from the shard")
        }
    }
}

/// `GET /users/{tenant}/{user}`: the user's presence and online devices (each with its
/// shard, transport and codec) on this node, `node` naming this node (null outside a
/// cluster); in cluster mode also the other nodes where the user has devices, with their
/// status. Asks the user's owner shard for the routes,
/// then each device shard for the details. A user nobody knows is `offline` with no
/// devices (200): users are not registered anywhere.
fn inspect_user(tenant: &str, user: &str, control: &Control) -> Response {
    let key = match (path_id(tenant, MAX_PUSH_ID), path_id(user, MAX_PUSH_ID)) {
        (Ok(tenant), Ok(user)) => UserKey { tenant, user },
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let q = match admin_queues(control) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let dest = owner_shard(&key.tenant, &key.user, q.shards());
    let (tenant, user) = (key.tenant.clone(), key.user.clone());
    let (routes, status, remote) = match ask(control, q, dest, |reply| AdminCmd::User {
        user: key,
        reply,
    }) {
        Ok(AdminAnswer::User {
            devices,
            status,
            remote,
        }) => (devices, status, remote),
        Ok(_) => return json_error(500, "unexpected answer from the shard"),
        Err(r) => return r,
    };
    let mut devices: Vec<DeviceInfo> = Vec::new();
    for shard in 0..q.shards() {
        let conns: Vec<_> = routes
            .iter()
            .filter(|r| usize::from(r.shard) == shard)
            .map(|r| r.conn)
            .collect();
        if conns.is_empty() {
            continue;
        }
        match ask(control, q, shard, |reply| AdminCmd::Devices {
            conns,
            reply,
        }) {
            Ok(AdminAnswer::Devices(d)) => devices.extend(d),
            Ok(_) => return json_error(500, "unexpected answer from the shard"),
            Err(r) => return r,
        }
    }
    let devices: Vec<serde_json::Value> = devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "device": d.device.as_str(), "shard": d.shard,
                "transport": d.transport, "codec": d.codec,
            })
        })
        .collect();
    let nodes: Vec<serde_json::Value> = remote
        .iter()
        .map(|(node, s)| serde_json::json!({ "node": node.as_str(), "status": s.name() }))
        .collect();
    json(
        200,
        serde_json::json!({
            "tenant": tenant.as_str(), "user": user.as_str(), "status": status.name(),
            "node": q.node.as_deref(), "devices": devices, "other_nodes": nodes,
        }),
    )
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

/// A request head parsed from the bytes received so far.
#[derive(Debug)]
pub struct Head {
    /// Bytes of the head; the body follows.
    pub head_len: usize,
    /// `Content-Length` (0 without one).
    pub body_len: usize,
    pub method: String,
    pub path: String,
    /// The token of `Authorization: Bearer TOKEN`.
    pub bearer: Option<Vec<u8>>,
}

/// Parses the request head at the start of `buf` (the bytes received so far): `Ok(None)`
/// while it is incomplete, `Err` with the answer for a request refused as it stands (bad
/// syntax, too many headers, chunked bodies, a bad or too large `Content-Length`).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(h)) => h,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::text(431, "too many headers\n"))
        }
        Err(e) => return Err(Response::text(400, format!("bad request: {e}\n"))),
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
            return Err(Response::text(501, "transfer-encoding not supported\n"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            match parsed {
                Some(n) => body_len = n,
                None => return Err(Response::text(400, "bad content-length\n")),
            }
        }
    }
    if body_len > MAX_BODY_BYTES {
        return Err(Response::text(413, "request too large\n"));
    }
    // A complete head parsed, so method and path are present (httparse's invariant).
    Ok(Some(Head {
        head_len,
        body_len,
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        bearer,
    }))
}

/// Reads one request within the size limit and the deadline.
fn read_request(stream: &mut TcpStream, deadline: Instant) -> io::Result<Incoming> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
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
        let head = match parse_head(&buf[..len]) {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(refusal) => return Ok(Incoming::Refuse(refusal)),
        };
        let Head {
            head_len,
            body_len,
            method,
            path,
            bearer,
        } = head;
        // Read the body (to the end, so closing does not reset the connection), into a
        // buffer grown to its declared length (at most MAX_BODY_BYTES, checked above).
        if buf.len() < head_len + body_len {
            buf.resize(head_len + body_len, 0);
        }
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
        // The head is complete and the body in, within the buffer grown for it.
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
    web: Option<(&WebConfig, SocketAddr)>,
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
            let page = web.and_then(|(cfg, admin)| {
                crate::web::route(&method, &path, cfg, admin, control.ws_addr())
            });
            let r = if let Some(p) = page {
                Response {
                    status: p.status,
                    content_type: p.content_type,
                    body: p.body,
                    allow: (p.status == 405).then_some("GET, HEAD"),
                    challenge: false,
                }
            } else if authorized(&path, bearer.as_deref(), token) {
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

    /// `--web`: the pages are served without the admin token (which still guards the rest),
    /// the config names the WebSocket listener once bound; without `--web` they are unknown.
    #[test]
    fn web_pages_are_public_and_off_by_default() {
        let off = start(1);
        assert!(status_line(&get(off.addr, "GET", "/chat").0).contains("404"));
        let control = Arc::new(Control::new(1));
        let metrics = Arc::new(Metrics::new(1));
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .with_token(Some("0123456789abcdef".into()))
            .with_web(Some(WebConfig {
                ws_path: "/ws".into(),
                dev_auth: true,
            }));
        let addr = server.local_addr().unwrap();
        server.spawn(control.clone(), metrics).unwrap();
        let (h, b) = get(addr, "GET", "/chat");
        assert!(status_line(&h).contains("200"), "{h}");
        assert!(h.contains("Content-Type: text/html"), "{h}");
        assert!(b.contains("/web/pages/chat.js"));
        let (h, _) = get(addr, "GET", "/metrics");
        assert!(
            status_line(&h).contains("401"),
            "the token still guards the API: {h}"
        );
        let (h, _) = get(addr, "POST", "/dashboard");
        assert!(
            status_line(&h).contains("405") && h.contains("Allow: GET, HEAD"),
            "{h}"
        );
        let (h, _) = get(addr, "GET", "/web/config.json");
        assert!(status_line(&h).contains("503"), "no ws listener yet: {h}");
        control.set_ws_addr("127.0.0.1:8123".parse().unwrap());
        let (h, b) = get(addr, "GET", "/web/config.json");
        assert!(status_line(&h).contains("200"), "{h}");
        assert!(b.contains("\"ws_port\":8123"), "{b}");
    }

    /// The admin queues' bound: once a shard's queue holds ADMIN_QUEUE_DEPTH commands the
    /// routes that need it answer 503 (counted); a shard that never answers gets 504.
    #[test]
    fn full_admin_queues_answer_503_and_a_silent_shard_504() {
        use crate::shard::admin::{AdminCmd, AdminQueues, ADMIN_QUEUE_DEPTH};
        let control = Control::new(2);
        let metrics = Metrics::new(2);
        let queues = Arc::new(AdminQueues::new(2, 1024));
        control.set_admin(queues.clone());
        // Nothing drains (no shard runs): a request that waits for an answer times out.
        let r = route("GET", "/users/dev/ann", b"", &control, &metrics);
        assert_eq!(r.status, 504, "{}", r.body);
        let kick = || {
            AdminCmd::Kick(UserKey {
                tenant: "dev".into(),
                user: "x".into(),
            })
        };
        let mut posted = 0;
        for shard in 0..2 {
            while queues.post(shard, kick()) {
                posted += 1;
            }
        }
        // Each queue took exactly its bound (the 504 request left one command in one).
        assert_eq!(posted, 2 * ADMIN_QUEUE_DEPTH - 1);
        let body = br#"{"tenant":"dev","body":"hi"}"#;
        let r = route("POST", "/broadcast", body, &control, &metrics);
        assert_eq!(r.status, 503, "{}", r.body);
        let r = route(
            "POST",
            "/groups",
            br#"{"tenant":"dev","group":"g","users":["a"]}"#,
            &control,
            &metrics,
        );
        assert_eq!(r.status, 503, "{}", r.body);
        // The broadcast counted once per full shard, the group create once.
        assert_eq!(control.admin_queue_full.load(Ordering::Relaxed), 3);
        assert_eq!(control.admin_timeouts.load(Ordering::Relaxed), 1);
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
        big.resize(MAX_HEAD_BYTES * 2, b'a');
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
            format!(
                "POST /drain HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY_BYTES + 1
            )
            .as_bytes(),
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
