//! Runs the real `imgw serve` binary on free loopback ports for a test, and talks to it through
//! the sockets a user's client would use.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use imgw::client::{Client, ClientConfig, Transport};
use imgw::codec::CodecId;

pub struct Gateway {
    child: Option<Child>,
    pub ws: SocketAddr,
    pub tcp: SocketAddr,
    pub admin: SocketAddr,
    /// The TLS listeners, when the arguments asked for them (`--wss-listen`, `--tls-listen`).
    pub wss: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub dir: PathBuf,
    args: Vec<String>,
    /// Environment variables set for the process (beside the test's own).
    envs: Vec<(String, String)>,
}

/// A plain HTTP/1.1 GET against the admin port: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http(addr, "GET", path, "")
}

/// A plain HTTP/1.1 POST of `body` against the admin port: (status, body).
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http(addr, "POST", path, body)
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, method, path, body, None)
}

/// An HTTP/1.1 request against the admin port, with `Authorization: Bearer` when `bearer` is
/// given: (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The test gateways' flags: 2 shards, dev auth, and `durability`.
pub fn dev_args(durability: &str) -> Vec<&str> {
    let flags = ["--shards", "2", "--insecure-dev-auth", "--durability"];
    flags.into_iter().chain([durability]).collect()
}

impl Gateway {
    /// Starts `imgw serve` with `toml` as its config file plus `args`, on ports the kernel
    /// picks (port 0, read back from `--ports-file`), and waits until /readyz.
    pub fn start(toml: &str, args: &[&str]) -> Gateway {
        Gateway::start_with_env(toml, args, &[])
    }

    /// [`Gateway::start`] with these environment variables set for the process.
    pub fn start_with_env(toml: &str, args: &[&str], envs: &[(&str, &str)]) -> Gateway {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("imgw-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("imgw.toml"), toml).unwrap();
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut g = Gateway {
            child: None,
            ws: unbound,
            tcp: unbound,
            admin: unbound,
            wss: None,
            tls: None,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        g.spawn();
        g
    }

    /// Starts the process (again) with the same config and data directory: on the ports it
    /// had (a restart), or on new ones the first time.
    ///
    /// A restart whose ports are taken meanwhile (the kernel may hand a just-freed port to
    /// another test's listener on port 0, or to a client's ephemeral socket for a moment) is
    /// tried again on the same ports for about 3 s, then on new ones.
    pub fn spawn(&mut self) {
        for attempt in 0..12 {
            if self.try_spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
            if attempt == 9 {
                eprintln!("imgw: its ports stay taken; restarting it on new ones");
                let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
                (self.ws, self.tcp, self.admin) = (any, any, any);
            }
        }
        panic!("imgw exited before ready, 12 times");
    }

    /// One start; false if the process exited before it was ready.
    fn try_spawn(&mut self) -> bool {
        let (ws, tcp, admin) = (self.ws, self.tcp, self.admin);
        let config = self.dir.join("imgw.toml");
        let ports = self.dir.join("ports.json");
        let _ = std::fs::remove_file(&ports);
        let child = Command::new(env!("CARGO_BIN_EXE_imgw"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--ws-listen", &ws.to_string()])
            .args(["--tcp-listen", &tcp.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .arg("--ports-file")
            .arg(&ports)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn imgw");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                // A first start on port 0 cannot meet a taken port: that is a real failure.
                assert!(ws.port() != 0, "imgw exited before ready: {status}");
                self.child = None;
                return false;
            }
            if let Some(p) = imgw::runtime::Ports::read(&ports) {
                (self.ws, self.tcp, self.admin) = (p.ws, p.tcp, p.admin);
                (self.wss, self.tls) = (p.wss, p.tls);
                if let Ok((200, _)) = http_get(self.admin, "/readyz") {
                    return true;
                }
            }
            assert!(Instant::now() < deadline, "imgw not ready within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A gateway with 2 shards, dev auth, and short timeouts for tests, at durability
    /// `memory` (the tests of what does not depend on the store; the default is `local`).
    pub fn dev() -> Gateway {
        Gateway::start(DEV_TOML, &dev_args("memory"))
    }

    /// [`Gateway::dev`] at durability `local` with `toml` as its config file.
    pub fn local_with(toml: &str) -> Gateway {
        Gateway::start(toml, &dev_args("local"))
    }

    /// [`Gateway::dev`] at durability `local`.
    pub fn local() -> Gateway {
        Gateway::local_with(DEV_TOML)
    }

    pub fn config(&self, transport: Transport, codec: CodecId) -> ClientConfig {
        let addr = match transport {
            Transport::Ws => self.ws,
            Transport::Tcp => self.tcp,
        };
        let mut c = ClientConfig::new(transport, codec, addr);
        c.read_timeout = Duration::from_secs(5);
        c
    }

    pub fn client(&self, transport: Transport, codec: CodecId) -> Client {
        Client::connect(&self.config(transport, codec)).expect("connect")
    }

    /// A client that completed `hello` as `user`.
    pub fn login(&self, transport: Transport, codec: CodecId, user: &str, device: &str) -> Client {
        let mut c = self.client(transport, codec);
        c.hello(user, device).expect("hello");
        c
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").expect("GET /metrics").1
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`key="value"`).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits at most `within` for the sum of `name`'s samples to be `want`.
    pub fn wait_metric(&self, name: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let v = self.metric(name, &[]);
            if v == want {
                return;
            }
            assert!(Instant::now() < deadline, "{name} = {v}, want {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A histogram family's `_count`, after checking that it equals its `+Inf` bucket and
    /// that its buckets never decrease (they are cumulative).
    pub fn histogram_count(&self, name: &str) -> f64 {
        let text = self.metrics();
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .collect();
        assert!(!buckets.is_empty(), "no {name}_bucket in /metrics");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name}: {buckets:?}"
        );
        let count = self.metric(&format!("{name}_count"), &[]);
        assert_eq!(
            buckets.last().copied(),
            Some(count),
            "{name}: +Inf bucket and count"
        );
        count
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGKILL: no drain, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (graceful drain).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `sync` pages of `limit` from `after` until `synced` says there is no more; returns
/// every delivery in arrival order.
pub fn sync_all(c: &mut Client, after: u64, limit: u32) -> Vec<imgw::protocol::Deliver> {
    sync_pages(c, None, after, limit).0
}

/// Like [`sync_all`] for any timeline (`group`: a group's, after the member's stored cursor
/// when `after` is 0); also returns the last `synced`. Deliveries of another timeline that
/// arrive meanwhile (pushes) are left out.
#[allow(dead_code)]
pub fn sync_pages(
    c: &mut Client,
    group: Option<&str>,
    mut after: u64,
    limit: u32,
) -> (Vec<imgw::protocol::Deliver>, imgw::protocol::Synced) {
    use imgw::protocol::{Envelope, Message, Sync, Target};
    let mut got = Vec::new();
    loop {
        let r = c.next_ref();
        c.send(&Envelope::with_ref(
            Message::Sync(Sync {
                after_inbox_seq: after,
                limit,
                group: group.map(Into::into),
            }),
            r,
        ))
        .expect("send sync");
        loop {
            let env = c.recv().expect("sync reply");
            match env.msg {
                Message::Deliver(d) => {
                    let in_group = matches!(&d.to, Some(Target::Group(g)) if Some(&**g) == group);
                    let in_inbox = group.is_none() && !matches!(d.to, Some(Target::Group(_)));
                    if in_group || in_inbox {
                        got.push(d);
                    }
                }
                Message::Synced(s) if env.reference == Some(r) => {
                    if !s.more {
                        return (got, s);
                    }
                    after = s.up_to;
                    break;
                }
                _ => {}
            }
        }
    }
}

pub const DEV_TOML: &str = r#"
[limits]
handshake_timeout_ms = 1000
idle_timeout_ms = 1500
heartbeat_ms = 500
sends_per_sec = 10000
send_burst = 10000
max_frame_bytes = 4096

[runtime]
pin = false
tick_ms = 10

[server]
drain_timeout_ms = 3000
drain_reconnect_spread_ms = 1000
"#;

/// The Redis of `tests/services.sh` (`IMGW_REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("IMGW_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The broker of `tests/services.sh` (`IMGW_KAFKA`).
pub fn kafka_addr() -> String {
    std::env::var("IMGW_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// `group_join` and its `ok`, within 10 s.
pub fn join(c: &mut Client, group: &str) {
    use imgw::protocol::{Envelope, GroupJoin, Message};
    let r = c.next_ref();
    let msg = Message::GroupJoin(GroupJoin {
        group: group.into(),
    });
    c.send(&Envelope::with_ref(msg, r)).unwrap();
    let env = c
        .recv_until(|e| e.reference == Some(r), Duration::from_secs(10))
        .unwrap();
    assert_eq!(env.msg, Message::Ok, "join {group}");
}

/// A 1:1 `send` of `body` to `to` with reference `r` (no kind, no extensions).
pub fn direct(to: &str, cmid: &str, body: &str, r: u64) -> imgw::protocol::Envelope {
    use imgw::protocol::{Envelope, Message, Send, Target};
    Envelope::with_ref(
        Message::Send(Send {
            to: Target::User(to.into()),
            cmid: cmid.into(),
            kind: None,
            body: body.into(),
            ext: Default::default(),
        }),
        r,
    )
}

/// A group `send` of `body` to `group` with reference `r` (no kind, no extensions).
pub fn to_group(group: &str, cmid: &str, body: &str, r: u64) -> imgw::protocol::Envelope {
    use imgw::protocol::{Envelope, Message, Send, Target};
    Envelope::with_ref(
        Message::Send(Send {
            to: Target::Group(group.into()),
            cmid: cmid.into(),
            kind: None,
            body: body.into(),
            ext: Default::default(),
        }),
        r,
    )
}

/// The next `n` deliveries to `c`, each within 5 s (other messages are skipped).
pub fn deliveries(c: &mut Client, n: usize) -> Vec<imgw::protocol::Deliver> {
    use imgw::protocol::Message;
    (0..n)
        .map(|_| {
            let env = c
                .recv_until(
                    |e| matches!(e.msg, Message::Deliver(_)),
                    Duration::from_secs(5),
                )
                .expect("deliver");
            match env.msg {
                Message::Deliver(d) => d,
                _ => unreachable!(),
            }
        })
        .collect()
}

/// An admin kick as the client sees it: `goaway` `kicked`, then the close (not a timeout).
pub fn expect_kicked(c: &mut Client) {
    use imgw::client::ClientError;
    use imgw::protocol::Message;
    let wait = Duration::from_secs(5);
    let env = c
        .recv_until(|e| matches!(e.msg, Message::Goaway(_)), wait)
        .expect("goaway");
    let Message::Goaway(gw) = env.msg else {
        unreachable!()
    };
    assert_eq!(gw.reason, "kicked");
    // Then an orderly end (a FIN, and over WebSocket the close frame before it), not a reset:
    // the gateway lingers on the socket until the client closes too.
    let end = c.recv_until(|_| false, wait);
    assert!(
        matches!(end, Err(ClientError::Closed { .. })),
        "an orderly close, not {end:?}"
    );
}

/// A ping round trip within 5 s: the connection is served (and everything sent before the
/// ping was processed).
pub fn ping(c: &mut Client) {
    use imgw::protocol::{Envelope, Message, Ping};
    c.send(&Envelope::with_ref(Message::Ping(Ping { ts: 1 }), 99))
        .unwrap();
    c.recv_until(
        |e| matches!(e.msg, Message::Pong(_)),
        Duration::from_secs(5),
    )
    .unwrap();
}

/// The next `error` within 5 s, which must carry `code`.
pub fn expect_error(c: &mut Client, code: imgw::protocol::ErrorCode) {
    use imgw::protocol::Message;
    let env = c
        .recv_until(
            |e| matches!(e.msg, Message::Error(_)),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("waiting for error {code:?}: {e}"));
    let Message::Error(e) = env.msg else {
        unreachable!()
    };
    assert_eq!(e.code, code, "{}", e.message);
}

/// A group `send`; the answer to it (`send_ack` or `error`), within 5 s.
pub fn send_group(c: &mut Client, group: &str, cmid: &str, body: &str) -> imgw::protocol::Message {
    let r = c.next_ref();
    c.send(&to_group(group, cmid, body, r)).unwrap();
    c.recv_until(|e| e.reference == Some(r), Duration::from_secs(5))
        .unwrap()
        .msg
}

/// A port that was free a moment ago. Whoever starts a server on it checks afterwards that the
/// server holds it ([`listens_on`]); imgw itself listens on port 0 and reports the port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Attempts of [`spawn_on_free_port`] before it gives up.
pub const PORT_ATTEMPTS: usize = 5;

/// Starts a private server that must be told its port (Redis, the broker: neither reports a
/// port it bound itself) on a port the kernel just handed out, and returns once the server's
/// own process listens on it. Between the probe and the server's bind another process (a
/// parallel test's gateway on port 0) may take the port: then the server exits, or the socket
/// listening there is not the server's, and it is tried again on another port.
pub fn spawn_on_free_port(what: &str, command: impl Fn(u16) -> Command) -> (Proc, u16) {
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port();
        if let Some(server) = try_spawn_on(what, command(port), port, START_WAIT) {
            return (server, port);
        }
        eprintln!("{what}: port {port} was taken by another process, trying another");
    }
    panic!("{what}: no free port in {PORT_ATTEMPTS} attempts");
}

/// Starts `command` on `port`, which this test held before (a server restarted on its port),
/// and waits until it listens there.
pub fn spawn_on_port(what: &str, command: Command, port: u16) -> Proc {
    try_spawn_on(what, command, port, START_WAIT)
        .unwrap_or_else(|| panic!("{what} did not get port {port} back"))
}

/// How long a private server may take to listen.
const START_WAIT: Duration = Duration::from_secs(20);

/// Starts `command`, a server told to listen on `port`, and returns it once its own process
/// listens there; `None` (the process killed) when it exits first (its bind failed: Redis,
/// tansu and MariaDB exit then) or when `wait` ends with another process's socket on the
/// port. Panics when nothing listens there by then.
pub fn try_spawn_on(what: &str, mut command: Command, port: u16, wait: Duration) -> Option<Proc> {
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{what} (tests/services.sh start installs it): {e}"));
    let mut server = Proc(child);
    let deadline = Instant::now() + wait;
    loop {
        if !matches!(server.0.try_wait(), Ok(None)) {
            return None;
        }
        if listens_on(server.0.id(), port) {
            return Some(server);
        }
        if Instant::now() >= deadline {
            assert!(
                listener_inode(port).is_some(),
                "{what}: nothing listens on port {port} after {wait:?}"
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private server process (Redis, a broker), killed on drop.
pub struct Proc(pub Child);

impl Proc {
    /// Sends `sig` (`-STOP`, `-CONT`: a hung server, then one that answers again).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", self.0.id());
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`.
pub fn listens_on(pid: u32, port: u16) -> bool {
    listener_inode(port).is_some_and(|inode| holds_socket(pid, inode))
}

/// The inode of the socket listening on 127.0.0.1:`port` or 0.0.0.0:`port`, from
/// /proc/net/tcp (`local_address` in hex, state `0A` is LISTEN, the inode in the tenth
/// column).
fn listener_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (addr, p) = f.get(1)?.split_once(':')?;
        let listening = f.get(3) == Some(&"0A");
        let ours = addr == "0100007F" || addr == "00000000";
        (listening && ours && u16::from_str_radix(p, 16).ok()? == port)
            .then(|| f.get(9)?.parse().ok())?
    })
}

/// Whether process `pid` has socket `inode` among its descriptors.
fn holds_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
    })
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The HS256 secret of [`jwt_gateway`].
pub const JWT_SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";

/// A 2-shard gateway that takes JWTs signed with [`JWT_SECRET`] (no dev tokens), with
/// `extra_toml` appended to its configuration.
pub fn jwt_gateway(extra_toml: &str) -> Gateway {
    let toml = format!("{DEV_TOML}\n[auth]\njwt_hs256_secret = \"{JWT_SECRET}\"\n{extra_toml}");
    Gateway::start(&toml, &["--shards", "2"])
}

/// A token of `user` in `tenant`, valid for ten minutes.
pub fn jwt(tenant: &str, user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    imgw::auth::issue_hs256(JWT_SECRET.as_bytes(), tenant, user, exp)
}

/// A client of `user` in `tenant`, logged in over `transport` (JSON).
pub fn jwt_login(g: &Gateway, transport: Transport, tenant: &str, user: &str) -> Client {
    let mut c = g.client(transport, CodecId::Json);
    c.hello(&jwt(tenant, user), "d").unwrap();
    c
}

/// The command of a private `redis-server` without persistence on 127.0.0.1:`port` (a
/// restart comes back empty).
pub fn redis_command(port: u16) -> Command {
    let mut c = Command::new("redis-server");
    c.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// A private `redis-server` on a port of its own, and the port.
pub fn start_redis() -> (Proc, u16) {
    spawn_on_free_port("redis-server", redis_command)
}

/// The private `redis-server` again on `port`, which it had before.
pub fn restart_redis(port: u16) -> Proc {
    spawn_on_port("redis-server", redis_command(port), port)
}
