//! End to end: the real `imgw serve --insecure-dev-auth --shards 2` on free loopback ports,
//! and the real `loadgen` binary against it, checked through its exit code and `--json`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway binary, built next to the loadgen binary (the workspace's `cargo test` /
/// `cargo nextest --workspace` builds it; a `cargo test -p loadgen` builds it here).
fn imgw_binary() -> PathBuf {
    // Tests of this file run in parallel threads: build at most once.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_loadgen"));
    let dir = loadgen.parent().expect("binary directory").to_path_buf();
    let imgw = dir.join("imgw");
    if !imgw.exists() {
        let target_dir = dir.parent().expect("target directory");
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "imgw", "--bin", "imgw"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bin imgw failed");
    }
    imgw
}

struct Gateway {
    child: Child,
    ws: SocketAddr,
    tcp: SocketAddr,
    admin: SocketAddr,
    /// The TLS listeners, when `extra` asked for them.
    wss: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    dir: PathBuf,
}

impl Gateway {
    fn start() -> Gateway {
        Gateway::start_with(&[])
    }

    /// `imgw serve --insecure-dev-auth` on ports the kernel picks (port 0, read back from
    /// `--ports-file`).
    fn start_with(extra: &[&str]) -> Gateway {
        Gateway::launch(&["--insecure-dev-auth"], extra, &[])
    }

    /// `imgw serve` with `auth` flags, `extra` flags and `env` variables.
    fn launch(auth: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("loadgen-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ports = dir.join("ports.json");
        let any = "127.0.0.1:0";
        let child = Command::new(imgw_binary())
            .args(["serve", "--shards", "2"])
            .args(auth)
            .envs(env.iter().copied())
            .args([
                "--ws-listen",
                any,
                "--tcp-listen",
                any,
                "--admin-listen",
                any,
            ])
            .arg("--ports-file")
            .arg(&ports)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn imgw");
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut g = Gateway {
            child,
            ws: unbound,
            tcp: unbound,
            admin: unbound,
            wss: None,
            tls: None,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("imgw exited before listening: {status}");
            }
            if let Some(p) = imgw::runtime::Ports::read(&ports) {
                (g.ws, g.tcp, g.admin) = (p.ws, p.tcp, p.admin);
                (g.wss, g.tls) = (p.wss, p.tls);
                if TcpStream::connect(g.ws).is_ok() && TcpStream::connect(g.tcp).is_ok() {
                    return g;
                }
            }
            assert!(Instant::now() < deadline, "imgw not listening within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Gateway {
    /// Waits until `/readyz` answers 200 (a cluster node: registered, its topic consumed).
    fn wait_ready(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = TcpStream::connect(self.admin).is_ok_and(|mut s| {
                let _ =
                    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                text.starts_with("HTTP/1.1 200")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "imgw not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn loadgen(args: &[&str]) -> std::process::Output {
    loadgen_env(args, &[])
}

/// [`loadgen`] with `env` variables set.
fn loadgen_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .envs(env.iter().copied())
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadgen");
    // Bounded: the run is 3 s plus setup and grace; the coordinator has its own deadline too.
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadgen did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Against a gateway with real authentication (HS256 JWTs, no dev tokens), loadgen logs in
/// with signed tokens spread over three tenants; every message arrives, and the gateway
/// counts sends in each tenant.
#[test]
fn chat_with_jwts_over_three_tenants_loses_nothing() {
    const SECRET: &str = "loadgen-e2e-secret-0123456789abcdef";
    let g = Gateway::launch(
        &["--jwt-secret-env", "IMGW_E2E_JWT"],
        &[],
        &[("IMGW_E2E_JWT", SECRET)],
    );
    let out_json = g.dir.join("out.json");
    let target = format!("ws://{}/ws", g.ws);
    let out = loadgen_env(
        &[
            "chat",
            "--target",
            &target,
            "--conns",
            "24",
            "--rate",
            "300",
            "--duration",
            "2s",
            "--tenants",
            "3",
            "--jwt-secret-env",
            "LOADGEN_E2E_JWT",
            "--expect-no-loss",
            "--json",
            out_json.to_str().unwrap(),
        ],
        &[("LOADGEN_E2E_JWT", SECRET)],
    );
    chat_passed(&out, &out_json, 24, 400);
    // The gateway saw sends in each of the three tenants, and in no dev tenant.
    let metrics = http_get(g.admin, "/metrics");
    for t in ["t0", "t1", "t2"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("imgw_tenant_sends_total{{tenant=\"{t}\"}}")))
            .unwrap_or_else(|| panic!("no sends of tenant {t}:\n{metrics}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 50.0, "{line}");
    }
    assert!(!metrics.contains("tenant=\"dev\""), "{metrics}");
}

/// A production-shaped gateway: TLS listeners with a certificate made here, RS256 JWTs
/// checked with a public key. loadgen drives `wss://` and `tls://` targets with tokens signed
/// by the private key, over two tenants, and loses nothing.
#[test]
fn chat_over_wss_and_tls_with_rs256_tokens_loses_nothing() {
    use rcgen::{CertificateParams, KeyPair};
    let dir = std::env::temp_dir().join(format!("loadgen-e2e-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file, config) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("imgw.toml"),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/keys");
    std::fs::write(
        &config,
        format!(
            "[auth]\njwt_rs256_public_key_file = {:?}\n",
            keys.join("TEST_ONLY_rs256_public.pem")
        ),
    )
    .unwrap();
    let g = Gateway::launch(
        &["--config", config.to_str().unwrap()],
        &[
            "--wss-listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
        &[],
    );
    let out_json = g.dir.join("out.json");
    let (wss, tls) = (
        format!("wss://{}/ws", g.wss.unwrap()),
        format!("tls://{}", g.tls.unwrap()),
    );
    let out = loadgen_env(
        &[
            "chat",
            "--target",
            &wss,
            "--target",
            &tls,
            "--conns",
            "24",
            "--rate",
            "300",
            "--duration",
            "2s",
            "--tenants",
            "2",
            "--jwt-rs256-key-file",
            keys.join("TEST_ONLY_rs256_private.pem").to_str().unwrap(),
            "--tls-ca",
            cert_file.to_str().unwrap(),
            "--expect-no-loss",
            "--json",
            out_json.to_str().unwrap(),
        ],
        &[],
    );
    chat_passed(&out, &out_json, 24, 400);
    let metrics = http_get(g.admin, "/metrics");
    let handshakes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("imgw_tls_handshakes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        handshakes >= 24.0,
        "{handshakes} TLS handshakes for 24 connections"
    );
    for t in ["t0", "t1"] {
        assert!(
            metrics.contains(&format!("imgw_tenant_sends_total{{tenant=\"{t}\"}}")),
            "{metrics}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chat run that exited 0 with all `conns` connected, more than `min_sent` messages sent
/// and every one delivered.
fn chat_passed(out: &std::process::Output, out_json: &Path, conns: u64, min_sent: u64) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(out_json);
    assert_eq!(r["connected"].as_u64(), Some(conns));
    let m = &r["messages"];
    assert_eq!(m["delivered"].as_u64(), m["sent"].as_u64(), "{m}");
    assert!(m["sent"].as_u64().unwrap() > min_sent, "{m}");
}

/// The body of `GET path` on the admin port.
fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn chat_against_a_real_gateway_loses_nothing() {
    let g = Gateway::start();
    let out_json = g.dir.join("out.json");
    let target = format!("ws://{}/ws", g.ws);
    let out = loadgen(&[
        "chat",
        "--target",
        &target,
        "--conns",
        "20",
        "--rate",
        "500",
        "--duration",
        "3s",
        "--expect-no-loss",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
    let r = json(&out_json);
    let m = &r["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!((1400..=1500).contains(&sent), "sent {sent}");
    assert_eq!(m["delivered"].as_u64(), Some(sent), "{m}");
    assert_eq!(m["acked"].as_u64(), Some(sent), "{m}");
    for zero in ["lost", "unconfirmed", "duplicates", "unknown", "refused"] {
        assert_eq!(m[zero].as_u64(), Some(0), "{zero}: {m}");
    }
    assert_eq!(r["connected"].as_u64(), Some(20));
    assert_eq!(r["latency_us"]["count"].as_u64(), Some(sent));
    assert!(r["series"].as_array().unwrap().len() >= 3);
    assert_eq!(r["pass"].as_bool(), Some(true));
}

#[test]
fn tcp_idle_and_two_workers_report_every_connection() {
    let g = Gateway::start();
    let out_json = g.dir.join("idle.json");
    let target = format!("tcp://{}", g.tcp);
    let out = loadgen(&[
        "idle",
        "--target",
        &target,
        "--codec",
        "protobuf",
        "--conns",
        "40",
        "--workers",
        "2",
        "--threads",
        "2",
        "--sources",
        "127.0.0.2-127.0.0.3",
        "--heartbeat-ms",
        "200",
        "--duration",
        "1s",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out_json);
    assert_eq!(r["connected"].as_u64(), Some(40));
    assert_eq!(r["open_at_end"].as_u64(), Some(40));
    let pings = r["counters"]["pings"].as_u64().unwrap();
    assert!(
        pings >= 100,
        "{pings} pings from 40 connections at 200 ms over 1 s"
    );
    assert!(r["counters"]["pongs"].as_u64().unwrap() + 40 >= pings);
}

#[test]
fn a_refused_target_fails_clearly() {
    // A port bound and not listening, held for the test: connecting is refused, and no other
    // process can listen there meanwhile (no SO_REUSEADDR), as it could on a port merely
    // found free.
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = held.local_addr().unwrap().as_socket().unwrap();
    let target = format!("ws://{port}/ws");
    let out = loadgen(&[
        "chat",
        "--target",
        &target,
        "--conns",
        "2",
        "--duration",
        "5s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no connection could be opened"), "{stdout}");
    assert!(stdout.contains("connect: refused"), "{stdout}");
}

#[test]
fn usage_errors_exit_2() {
    let out = loadgen(&["bogus", "--target", "ws://127.0.0.1:9/ws"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
    let out = loadgen(&[
        "chat",
        "--protocol",
        "mqtt",
        "--target",
        "ws://127.0.0.1:9/",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = loadgen(&["chat", "--target", "ws://192.0.2.1:80/ws"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn group_fanout_churn_and_offline_sync_against_a_real_gateway() {
    let g = Gateway::start_with(&["--durability", "local"]);
    let target = format!("ws://{}/ws", g.ws);
    // Fan-out through one group: one send per publish, 20 copies each.
    let out_json = g.dir.join("fanout.json");
    let out = loadgen(&[
        "fanout",
        "--group",
        "--target",
        &target,
        "--conns",
        "21",
        "--fanout",
        "20",
        "--rate",
        "40",
        "--duration",
        "2s",
        "--expect-no-loss",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fanout failed\n{stdout}");
    let m = json(&out_json)["messages"].clone();
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 20 * 70, "{m}");
    assert_eq!(m["delivered"].as_u64(), Some(sent), "{m}");
    // Offline-sync: half the users leave and come back with hello.resume. Nothing may be
    // lost or delivered twice (a push racing the resume page is held until the page is out).
    let out_json = g.dir.join("offline.json");
    let out = loadgen(&[
        "offline-sync",
        "--target",
        &target,
        "--conns",
        "20",
        "--rate",
        "100",
        "--duration",
        "3s",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "offline-sync failed\n{stdout}");
    let r = json(&out_json);
    assert_eq!(r["connect"]["ok"].as_u64(), Some(30), "{}", r["connect"]);
    assert!(r["counters"]["skipped"].as_u64().unwrap() > 0);
    let m = &r["messages"];
    for zero in ["lost", "unconfirmed", "unknown", "duplicates"] {
        assert_eq!(m[zero].as_u64(), Some(0), "{zero}: {m}");
    }
    assert!(m["delivered"].as_u64().unwrap() > 200, "{m}");
    // Mixed: 10 pairs, 5 chatting at 100 msgs/s, the idle 10 connections churning 10/s.
    let out_json = g.dir.join("mixed.json");
    let out = loadgen(&[
        "mixed",
        "--target",
        &target,
        "--conns",
        "20",
        "--rate",
        "100",
        "--churn-rate",
        "10",
        "--duration",
        "2s",
        "--expect-no-loss",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mixed failed\n{stdout}");
    let r = json(&out_json);
    assert_eq!(r["messages"]["conversations"].as_u64(), Some(10));
    let ok = r["connect"]["ok"].as_u64().unwrap();
    assert!((37..=42).contains(&ok), "connects {ok}");
    // Churn: 20 connections, 20 reconnections a second.
    let out_json = g.dir.join("churn.json");
    let out = loadgen(&[
        "churn",
        "--target",
        &target,
        "--conns",
        "20",
        "--rate",
        "20",
        "--duration",
        "2s",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "churn failed\n{stdout}");
    let r = json(&out_json);
    let ok = r["connect"]["ok"].as_u64().unwrap();
    assert!((55..=62).contains(&ok), "connects {ok}");
    assert_eq!(r["open_at_end"].as_u64(), Some(20));
}

/// A minimal plain-ws pub/sub server (bench/peers/README.md) on a free port, one thread per
/// connection, built from imgw's server-side WebSocket pieces.
fn plain_ws_server() -> SocketAddr {
    use imgw::ws::{self, Decoder, Event, Handshake, HandshakeConfig, Limits, Role};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    type Subs = Arc<Mutex<HashMap<String, Vec<TcpStream>>>>;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let subs: Subs = Arc::default();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let subs = Arc::clone(&subs);
            std::thread::spawn(move || {
                let cfg = HandshakeConfig {
                    path: "/".into(),
                    ..HandshakeConfig::default()
                };
                let (mut got, mut out, mut chunk) = (Vec::new(), Vec::new(), [0u8; 4096]);
                let consumed = loop {
                    let Ok(n @ 1..) = sock.read(&mut chunk) else {
                        return;
                    };
                    got.extend_from_slice(&chunk[..n]);
                    match ws::accept(&cfg, &got, &mut out) {
                        Handshake::Incomplete => {}
                        Handshake::Accepted(up) => break up.consumed,
                        Handshake::Rejected(_) => return,
                    }
                };
                if sock.write_all(&out).is_err() {
                    return;
                }
                let mut dec = Decoder::new(Role::Server, Limits::default());
                let mut pending = got.split_off(consumed);
                loop {
                    let mut input = &mut pending[..];
                    loop {
                        let text = match dec.next_event(&mut input) {
                            Ok(Some(Event::Text(t))) => t.to_owned(),
                            Ok(Some(_)) => continue,
                            Ok(None) => break,
                            Err(_) => return,
                        };
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                            continue;
                        };
                        let topic = v["topic"].as_str().unwrap_or_default().to_owned();
                        let mut subs = subs.lock().unwrap();
                        match (v["op"].as_str(), v["data"].as_str()) {
                            (Some("sub"), _) => {
                                let clone = sock.try_clone().unwrap();
                                subs.entry(topic).or_default().push(clone);
                            }
                            (Some("pub"), Some(data)) => {
                                let mut frame = Vec::new();
                                ws::write_text(&mut frame, data);
                                for s in subs.get_mut(&topic).into_iter().flatten() {
                                    let _ = s.write_all(&frame);
                                }
                            }
                            _ => {}
                        }
                    }
                    let Ok(n @ 1..) = sock.read(&mut chunk) else {
                        return;
                    };
                    pending = chunk[..n].to_vec();
                }
            });
        }
    });
    addr
}

#[test]
fn plainws_chat_and_fanout_against_a_pub_sub_server() {
    let addr = plain_ws_server();
    let target = format!("ws://{addr}/");
    let dir = std::env::temp_dir().join(format!("loadgen-e2e-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (scenario, extra) in [
        ("chat", &["--conns", "10", "--rate", "200"][..]),
        (
            "fanout",
            &["--conns", "11", "--fanout", "10", "--rate", "50"][..],
        ),
    ] {
        let out_json = dir.join(format!("{scenario}.json"));
        let mut args = vec![scenario, "--protocol", "plainws", "--target", &target];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--duration", "2s", "--expect-no-loss", "--json"]);
        args.push(out_json.to_str().unwrap());
        let out = loadgen(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{scenario} failed\n{stdout}");
        let m = json(&out_json)["messages"].clone();
        let sent = m["sent"].as_u64().unwrap();
        assert!(sent >= 300, "{scenario}: {m}");
        assert_eq!(m["delivered"].as_u64(), Some(sent), "{scenario}: {m}");
        assert_eq!(m["duplicates"].as_u64(), Some(0), "{scenario}: {m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A receiver that never acks is retransmitted to (every 5 ms, backing off): loadgen drops the
/// resent positions by `inbox_seq` (counted as retransmits), and they are neither duplicates
/// nor losses. 30 messages per receiver stay inside the window, and 60 retries outlast the run.
#[test]
fn retransmits_are_counted_apart_from_duplicates() {
    let cfg = std::env::temp_dir().join(format!(
        "loadgen-e2e-retransmit-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &cfg,
        "[limits]\nretransmit_base_ms = 5\nretry_limit = 60\nwindow = 256\n",
    )
    .unwrap();
    let g = Gateway::start_with(&["--durability", "local", "--config", cfg.to_str().unwrap()]);
    let out_json = g.dir.join("retransmit.json");
    let target = format!("ws://{}/ws", g.ws);
    let out = loadgen(&[
        "chat",
        "--target",
        &target,
        "--conns",
        "10",
        "--rate",
        "50",
        "--duration",
        "3s",
        "--no-client-ack",
        "--expect-no-loss",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loadgen failed\n{stdout}");
    let r = json(&out_json);
    let m = &r["messages"];
    for zero in ["lost", "unconfirmed", "duplicates", "unknown"] {
        assert_eq!(m[zero].as_u64(), Some(0), "{zero}: {m}");
    }
    assert!(
        r["counters"]["redelivered"].as_u64().unwrap() > 0,
        "no retransmit seen: {}",
        r["counters"]
    );
}

/// SPEC 8 and issue 11: one loadgen command spread over three cluster nodes, with
/// `--reconnect` and `--expect-no-loss`, while one node is SIGKILLed: every acked message is
/// delivered once and in order. Needs MariaDB, Redis and the broker (`tests/services.sh start`).
#[test]
fn a_cluster_failover_run_loses_nothing() {
    let db = format!("imgw_lg_failover_{}", std::process::id());
    let mysql = imgw::store::mysql_testdb::fresh(&db)
        .unwrap_or_else(|e| panic!("MariaDB not reachable ({e}): run `tests/services.sh start`"));
    let redis =
        std::env::var("IMGW_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let kafka = std::env::var("IMGW_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let config = std::env::temp_dir().join(format!("{db}.toml"));
    std::fs::write(
        &config,
        format!(
            "[limits]\nsends_per_sec = 10000\nsend_burst = 10000\n\
             [redis]\nkey_prefix = \"{db}:\"\n\
             [kafka]\nmessages_topic = \"{db}.messages\"\npush_topic = \"\"\n\
             [cluster]\nheartbeat_ms = 200\ndead_after_ms = 1000\ntopic_prefix = \"{db}.node.\"\n"
        ),
    )
    .unwrap();
    let mut nodes: Vec<Gateway> = (1..=3)
        .map(|n| {
            let node = format!("n{n}");
            Gateway::start_with(&[
                "--config",
                config.to_str().unwrap(),
                "--durability",
                "backend",
                "--mysql",
                &mysql,
                "--redis",
                &redis,
                "--kafka",
                &kafka,
                "--node-id",
                &node,
            ])
        })
        .collect();
    for g in &nodes {
        g.wait_ready();
    }
    let out_json = nodes[0].dir.join("failover.json");
    let targets = [
        format!("ws://{}/ws", nodes[0].ws),
        format!("tcp://{}", nodes[1].tcp),
        format!("ws://{}/ws", nodes[2].ws),
    ];
    let args: Vec<String> = [
        "chat",
        "--target",
        &targets[0],
        "--target",
        &targets[1],
        "--target",
        &targets[2],
        "--conns",
        "150",
        "--rate",
        "600",
        "--duration",
        "8s",
        "--reconnect",
        "--expect-no-loss",
        "--json",
        out_json.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        loadgen(&args)
    });
    std::thread::sleep(Duration::from_secs(4));
    let _ = nodes[1].child.kill(); // SIGKILL
    let out = run.join().unwrap();
    let _ = imgw::store::mysql_testdb::drop_database(&db);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed\n{stdout}\n{stderr}");
    let r = json(&out_json);
    let m = &r["messages"];
    for zero in [
        "lost",
        "unconfirmed",
        "duplicates",
        "out_of_order",
        "unknown",
    ] {
        assert_eq!(m[zero].as_u64(), Some(0), "{zero}: {m}");
    }
    assert!(m["acked"].as_u64().unwrap() > 3000, "{m}");
    // The node's third of the connections came back elsewhere.
    let connects = r["connect"]["ok"].as_u64().unwrap();
    assert!(
        connects >= 150 + 40,
        "reconnects: {connects} connects for 150 connections"
    );
}

/// `loadgen chaos` with the gateway it starts itself (`--serve`, with `serve` flags such as
/// the durability), for `secs` seconds, drawing from `faults`, plus `extra` flags; returns
/// the output and the JSON.
fn chaos(
    tag: &str,
    serve: &str,
    secs: u32,
    faults: &str,
    seed: &str,
    extra: &[&str],
) -> (std::process::Output, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("loadgen-chaos-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let serve = format!(
        "--insecure-dev-auth --shards 2 {serve} --data-dir {} \
         --ws-listen 127.0.0.1:0 --tcp-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0",
        dir.join("data").display()
    );
    let (imgw, log, out_json) = (imgw_binary(), dir.join("gateway.log"), dir.join("out.json"));
    let duration = format!("{secs}s");
    let out = loadgen(
        &[
            "chaos",
            "--serve",
            &serve,
            "--imgw-bin",
            imgw.to_str().unwrap(),
            "--gateway-log",
            log.to_str().unwrap(),
            "--duration",
            &duration,
            "--conns",
            "60",
            "--rate",
            "100",
            "--seed",
            seed,
            "--faults",
            faults,
            "--fault-gap",
            "1s-3s",
            "--fault-hold",
            "300ms-2s",
            "--json",
            out_json.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
    );
    let r = json(&out_json);
    (out, r)
}

/// A campaign's messages: none lost, duplicated, out of order, unknown or unconfirmed.
fn assert_nothing_lost(r: &serde_json::Value) -> &serde_json::Value {
    let m = &r["messages"];
    for k in [
        "lost",
        "duplicates",
        "out_of_order",
        "unknown",
        "unconfirmed",
    ] {
        assert_eq!(m[k].as_u64(), Some(0), "{k}: {m}");
    }
    m
}

/// The fault campaign of the test command: chat, group fan-out and churn at durability
/// `local` while the gateway is killed, drained and restarted, paused, and every connection
/// dropped at once. Every acked message arrives once and in order per conversation.
#[test]
fn a_chaos_campaign_at_local_loses_nothing() {
    let (out, r) = chaos(
        "local",
        "--durability local",
        35,
        "kill,term,pause,storm",
        "11",
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let c = &r["chaos"];
    assert_eq!(c["pass"], true, "{stdout}");
    for kind in ["kill", "term", "pause", "storm"] {
        assert!(c["faults"][kind].as_u64() >= Some(1), "no {kind}: {c}");
    }
    let m = assert_nothing_lost(&r);
    assert!(m["acked"].as_u64() > Some(2_000), "{m}");
    // Both halves ran: 1:1 messages and group deliveries (the group worker's users).
    assert!(stdout.contains("chaos (seed 11)"), "{stdout}");
    assert!(stderr.contains("chaos schedule (seed 11)"), "{stderr}");
}

/// Ten SIGKILLs of `imgw serve --durability local` under chat, group and churn load (issue
/// 13): after each restart every client resends its unacked sends with their `cmid`; every
/// acked message is delivered once and in order, and every resend of an in-flight send is
/// stored once (no duplicate shown, none lost, none unconfirmed at the end).
#[test]
fn ten_sigkills_at_local_lose_nothing_and_resends_arrive_once() {
    let (out, r) = chaos(
        "kill10",
        "--durability local",
        32,
        "kill",
        "21",
        &["--fault-gap", "1s-1500ms", "--fault-hold", "100ms-300ms"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let c = &r["chaos"];
    assert_eq!(c["pass"], true, "{stdout}");
    assert!(c["faults"]["kill"].as_u64() >= Some(10), "{c}");
    let m = assert_nothing_lost(&r);
    assert!(m["acked"].as_u64() > Some(1_000), "{m}");
}

/// The campaign fails a gateway that loses acknowledged messages: at durability `memory` a
/// SIGKILL loses what was acked and not yet delivered (as documented), and loadgen exits 1.
#[test]
fn a_chaos_campaign_catches_loss() {
    let (out, r) = chaos(
        "memory",
        "--durability memory",
        12,
        "kill",
        "5",
        &["--grace", "5s"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(r["chaos"]["pass"], false, "{stdout}");
    assert!(r["chaos"]["faults"]["kill"].as_u64() >= Some(1), "{stdout}");
    assert!(r["messages"]["lost"].as_u64() > Some(0), "{stdout}");
    assert!(stdout.contains("FAIL (chaos)"), "{stdout}");
}

/// The same campaign at durability `backend` (MariaDB from `tests/services.sh start`): the
/// gateway killed, drained and restarted under load with its store on the network.
#[test]
fn a_chaos_campaign_at_backend_loses_nothing() {
    let url = std::env::var("IMGW_MYSQL_URL")
        .expect("IMGW_MYSQL_URL (run tests/services.sh start and export what it prints)");
    let serve = format!("--durability backend --mysql {url}");
    let (out, r) = chaos("backend", &serve, 25, "kill,term,storm", "3", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let c = &r["chaos"];
    assert_eq!(c["pass"], true, "{stdout}");
    assert!(c["faults"]["kill"].as_u64() >= Some(1), "{c}");
    assert!(r["messages"]["acked"].as_u64() > Some(1_000), "{stdout}");
}
