//! TLS through real sockets (issue 12): `wss://` and raw TCP over TLS in every codec, TLS 1.3
//! and 1.2, certificates made by the test, SIGHUP reloads, and handshakes that fail or stall.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::gateway::{deliveries, direct, join, ping, to_group, Gateway, DEV_TOML};
use imgw::client::{Client, ClientConfig, ClientError, TlsClient, Transport};
use imgw::codec::CodecId;
use imgw::protocol::{Hello, Message};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const WAIT: Duration = Duration::from_secs(5);

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1 (ECDSA P-256).
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("imgw test CA {name}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes the pair where the gateway reads it.
fn install(p: &Pki, dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, &p.key_pem).unwrap();
    (cert, key)
}

/// A dev gateway with both TLS listeners on the pair in `dir`.
fn tls_gateway(dir: &Path) -> Gateway {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    // Durability memory, as `Gateway::dev`: these tests read deliveries without acking them.
    let mut args = common::gateway::dev_args("memory");
    args.extend([
        "--wss-listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ]);
    Gateway::start(DEV_TOML, &args)
}

/// A gateway serving TLS with a new certificate (CA "a") installed in `test_dir(tag)`.
fn started(tag: &str) -> (PathBuf, Pki, Gateway) {
    let dir = test_dir(tag);
    let p = pki("a");
    install(&p, &dir);
    let g = tls_gateway(&dir);
    (dir, p, g)
}

fn tls_config(
    g: &Gateway,
    transport: Transport,
    codec: CodecId,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let addr = match transport {
        Transport::Ws => g.wss.expect("wss listener"),
        Transport::Tcp => g.tls.expect("tls listener"),
    };
    let mut c = ClientConfig::new(transport, codec, addr);
    c.tls = Some(TlsClient::new(ca_pem.as_bytes(), "localhost", versions).unwrap());
    c
}

fn test_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("imgw-tls-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn wss_and_tcp_over_tls_chat_in_every_codec_over_tls13_and_tls12() {
    let (dir, p, g) = started("codecs");
    let versions: [&[&'static rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];
    let mut sessions = 0;
    for codec in CodecId::ALL {
        for (i, v) in versions.iter().enumerate() {
            let (ta, tb) = if i == 0 {
                (Transport::Ws, Transport::Tcp)
            } else {
                (Transport::Tcp, Transport::Ws)
            };
            let alice = format!("alice-{}-{i}", codec.name());
            let bob = format!("bob-{}-{i}", codec.name());
            let mut a = Client::connect(&tls_config(&g, ta, codec, &p.ca_pem, v)).unwrap();
            sessions += 2;
            a.hello(&alice, "phone").unwrap();
            // Bob writes `hello` with the upgrade request (over wss with TLS 1.2).
            let cfg = tls_config(&g, tb, codec, &p.ca_pem, v);
            let hello = Hello::new(&bob, "phone");
            let (mut b, welcome) = Client::connect_hello(&cfg, None, hello).unwrap();
            assert_eq!(welcome.user, bob.as_str());
            ping(&mut b);
            for n in 0..3u64 {
                let r = a.next_ref();
                let body = format!("secret {n} 你好");
                a.send(&direct(&bob, &format!("c{n}"), &body, r)).unwrap();
                let ack = a
                    .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
                    .unwrap();
                assert!(matches!(ack.msg, Message::SendAck(ref s) if s.seq == n + 1));
            }
            for (n, d) in (0..3u64).zip(deliveries(&mut b, 3)) {
                assert_eq!(d.body, format!("secret {n} 你好").as_str(), "{codec:?}");
                assert_eq!(d.inbox_seq, n + 1);
            }
            a.close();
            b.close();
        }
    }
    assert!(g.metric("imgw_tls_handshakes_total", &[]) >= f64::from(sessions));
    // The plain listeners still serve beside the TLS ones.
    let mut plain = g.login(Transport::Tcp, CodecId::Json, "plain", "d");
    ping(&mut plain);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_gives_new_connections_the_new_certificate_and_keeps_old_ones() {
    let dir = test_dir("reload");
    let (old, new) = (pki("old"), pki("new"));
    install(&old, &dir);
    let g = tls_gateway(&dir);
    let both = &[];
    let mut before = Client::connect(&tls_config(
        &g,
        Transport::Tcp,
        CodecId::Json,
        &old.ca_pem,
        both,
    ))
    .unwrap();
    before.hello("early", "d").unwrap();
    let mut before_ws = Client::connect(&tls_config(
        &g,
        Transport::Ws,
        CodecId::Protobuf,
        &old.ca_pem,
        both,
    ))
    .unwrap();
    before_ws.hello("early-ws", "d").unwrap();

    install(&new, &dir);
    hup(&g);
    wait_metric(&g, "imgw_tls_reloads_total", 1.0);
    // New connections get the new certificate: a client trusting only the old CA fails.
    for t in Transport::ALL {
        let refused = Client::connect(&tls_config(&g, t, CodecId::Json, &old.ca_pem, both));
        assert!(refused.is_err(), "{t:?}: old CA still accepted");
        let mut c = Client::connect(&tls_config(&g, t, CodecId::Json, &new.ca_pem, both)).unwrap();
        c.hello(&format!("late-{}", t.name()), "d").unwrap();
        ping(&mut c);
    }
    // Connections made before the reload were not dropped.
    ping(&mut before);
    ping(&mut before_ws);

    // A broken new certificate is refused; the last good one stays.
    std::fs::write(
        dir.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .unwrap();
    hup(&g);
    wait_metric(&g, "imgw_tls_reload_failures_total", 1.0);
    let mut c = Client::connect(&tls_config(
        &g,
        Transport::Tcp,
        CodecId::Json,
        &new.ca_pem,
        both,
    ))
    .unwrap();
    c.hello("after-bad", "d").unwrap();
    ping(&mut c);
    ping(&mut before);
    // A key that does not match the certificate is refused too.
    let other = pki("other");
    std::fs::write(dir.join("cert.pem"), &new.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &other.key_pem).unwrap();
    hup(&g);
    wait_metric(&g, "imgw_tls_reload_failures_total", 2.0);
    let mut c = Client::connect(&tls_config(
        &g,
        Transport::Ws,
        CodecId::Json,
        &new.ca_pem,
        both,
    ))
    .unwrap();
    c.hello("after-mismatch", "d").unwrap();
    ping(&mut c);
    assert_eq!(g.metric("imgw_tls_reloads_total", &[]), 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn hup(g: &Gateway) {
    let status = Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_metric(g: &Gateway, name: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    while g.metric(name, &[]) < want {
        assert!(Instant::now() < deadline, "{name} did not reach {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until the gateway closes the socket (EOF or reset), at most `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) if start.elapsed() < within => return true,
            Ok(_) if start.elapsed() < within => {}
            _ => return false,
        }
    }
}

#[test]
fn bad_and_stalled_tls_handshakes_are_closed_counted_and_spare_others() {
    let (dir, p, g) = started("bad");
    let tls: SocketAddr = g.tls.unwrap();
    let mut good = Client::connect(&tls_config(
        &g,
        Transport::Tcp,
        CodecId::Json,
        &p.ca_pem,
        &[],
    ))
    .unwrap();
    good.hello("good", "d").unwrap();

    // Plaintext where a ClientHello should be: an alert, a close, counted as a failure.
    let mut garbage = TcpStream::connect(tls).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_within(&mut garbage, WAIT),
        "garbage handshake not closed"
    );
    wait_metric(&g, "imgw_tls_handshake_failures_total", 1.0);
    assert_eq!(
        g.metric("imgw_tls_handshake_failures_total", &["reason=\"error\""]),
        1.0
    );

    // A client that never sends its ClientHello is closed at limits.handshake_timeout_ms.
    let start = Instant::now();
    let mut silent = TcpStream::connect(g.wss.unwrap()).unwrap();
    assert!(
        closed_within(&mut silent, WAIT),
        "silent handshake not closed"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    wait_metric(&g, "imgw_tls_handshake_failures_total", 2.0);
    assert_eq!(
        g.metric("imgw_tls_handshake_failures_total", &["reason=\"timeout\""]),
        1.0
    );

    // A client that does not trust the certificate gives up; the gateway counts it.
    let stranger = pki("stranger");
    let refused = Client::connect(&tls_config(
        &g,
        Transport::Tcp,
        CodecId::Json,
        &stranger.ca_pem,
        &[],
    ));
    assert!(matches!(refused, Err(ClientError::Io(_))), "{refused:?}");
    wait_metric(&g, "imgw_tls_handshake_failures_total", 3.0);

    // The established TLS connection never noticed.
    ping(&mut good);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_certificate_at_start_is_a_configuration_error() {
    let dir = test_dir("start");
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, pki("k").key_pem).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args([
            "serve",
            "--insecure-dev-auth",
            "--tls-listen",
            "127.0.0.1:0",
        ])
        .args(["--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    // A TLS listener without a certificate is refused too.
    let out = Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args([
            "serve",
            "--insecure-dev-auth",
            "--wss-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Volume in both directions over TLS: records split across reads, many records per read,
/// and output beyond one record and beyond the connection's record buffer bound.
#[test]
fn bulk_messages_cross_tls_intact_and_in_order() {
    let (dir, p, g) = started("bulk");
    let mut a = Client::connect(&tls_config(
        &g,
        Transport::Ws,
        CodecId::Json,
        &p.ca_pem,
        &[],
    ))
    .unwrap();
    let mut b = Client::connect(&tls_config(
        &g,
        Transport::Tcp,
        CodecId::MessagePack,
        &p.ca_pem,
        &[],
    ))
    .unwrap();
    a.hello("bulk-a", "d").unwrap();
    b.hello("bulk-b", "d").unwrap();
    ping(&mut b);
    const N: usize = 300;
    let body = |i: usize| format!("{i:05}-{}", "x".repeat(3000 + i % 700));
    for i in 0..N {
        let r = a.next_ref();
        a.send(&direct("bulk-b", &format!("b{i}"), &body(i), r))
            .unwrap();
    }
    let mut acks = 0;
    while acks < N {
        let env = a
            .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
            .unwrap();
        assert!(matches!(env.msg, Message::SendAck(_)));
        acks += 1;
    }
    for (i, d) in deliveries(&mut b, N).into_iter().enumerate() {
        assert_eq!(d.body, body(i).as_str(), "message {i}");
        assert_eq!(d.inbox_seq, i as u64 + 1);
    }
    ping(&mut a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Group messages to members over TLS (wss and raw TCP, two codecs, two shards): the members
/// of a shard share one copy of each frame (src/shard/frames.rs), which each connection's TLS
/// session encrypts on its own, and every member reads every message once and in order.
#[test]
fn group_messages_shared_by_tls_members_arrive_once_and_in_order() {
    let (dir, p, g) = started("group");
    let mut members: Vec<Client> = (0..9)
        .map(|i| {
            let t = Transport::ALL[i % 2];
            let codec = [CodecId::Json, CodecId::Protobuf][i / 2 % 2];
            let mut c = Client::connect(&tls_config(&g, t, codec, &p.ca_pem, &[])).unwrap();
            c.hello(&format!("tls-member-{i}"), "d").unwrap();
            join(&mut c, "tls-group");
            c
        })
        .collect();
    let shared_before = g.metric("imgw_frames_shared_total", &[]);
    const N: u64 = 30;
    let (sender, rest) = members.split_first_mut().unwrap();
    for n in 1..=N {
        let r = sender.next_ref();
        let send = to_group("tls-group", &format!("t{n}"), &format!("tls {n}"), r);
        sender.send(&send).unwrap();
    }
    for _ in 0..N {
        sender
            .recv_until(|e| matches!(e.msg, Message::SendAck(_)), WAIT)
            .unwrap();
    }
    for (i, m) in rest.iter_mut().enumerate() {
        for (n, d) in (1..=N).zip(deliveries(m, N as usize)) {
            let body = format!("tls {n}");
            assert_eq!(
                (d.inbox_seq, &*d.body),
                (n, body.as_str()),
                "member {}",
                i + 1
            );
        }
    }
    assert!(g.metric("imgw_frames_shared_total", &[]) > shared_before);
    let _ = std::fs::remove_dir_all(&dir);
}
