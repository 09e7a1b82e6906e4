//! Connection benchmark driver (until the loadgen lands): opens N WebSocket connections that
//! each complete the upgrade and `hello`, reports the rate, then holds them idle and reports
//! the server's RSS per connection read from /proc.
//!
//! `cargo run --release --example conn_bench -- --ws 127.0.0.1:8080 --conns 19000 --pid PID`
//! Pin it away from the shard core: `taskset -c 1 target/release/examples/conn_bench ...`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "util.rs"]
mod util;
use util::{arg, cpu_secs, rss_kib};

/// The upgrade request followed by a masked `hello` text frame, in one write.
fn opening(host: &str, user: usize, hello: bool) -> Vec<u8> {
    let mut out = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: imgw.v1.json\r\n\r\n"
    )
    .into_bytes();
    if !hello {
        return out;
    }
    let hello = format!(r#"{{"op":"hello","ref":1,"token":"u{user}","device":"d"}}"#);
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    out.push(0x81);
    out.push(0x80 | hello.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(hello.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn main() {
    let addr: SocketAddr = arg("--ws")
        .unwrap_or("127.0.0.1:8080".into())
        .parse()
        .unwrap();
    let n: usize = arg("--conns").map_or(1000, |s| s.parse().unwrap());
    let batch: usize = arg("--batch").map_or(200, |s| s.parse().unwrap());
    let pid: u32 = arg("--pid").map_or(0, |s| s.parse().unwrap());
    let hold: u64 = arg("--hold-secs").map_or(3, |s| s.parse().unwrap());
    // `--upgrade-only`: stop after the 101 (measures a connection without a session).
    let hello = !std::env::args().any(|a| a == "--upgrade-only");
    let done: &[u8] = if hello { b"\"welcome\"" } else { b"\r\n\r\n" };
    let before = rss_kib(pid);
    let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    let cpu_before = cpu_secs(pid);
    let started = Instant::now();
    while conns.len() < n {
        let k = batch.min(n - conns.len());
        let first = conns.len();
        for i in 0..k {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).unwrap();
            s.write_all(&opening(&addr.to_string(), first + i, hello))
                .unwrap();
            conns.push(s);
        }
        // Read each connection's 101 response and welcome.
        for s in &mut conns[first..] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = Vec::new();
            while !got.windows(done.len()).any(|w| w == done) {
                let r = s.read(&mut buf).expect("read welcome");
                assert!(r > 0, "server closed during handshake");
                got.extend_from_slice(&buf[..r]);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu_before;
    println!(
        "connections: {n} upgrades+hello in {secs:.3} s = {:.0} per second (wall clock, client-bound)",
        n as f64 / secs
    );
    if pid != 0 && cpu > 0.0 {
        println!(
            "server CPU: {cpu:.2} s = {:.1} us per connection = {:.0} connections per second per core",
            cpu * 1e6 / n as f64,
            n as f64 / cpu
        );
    }
    std::thread::sleep(Duration::from_secs(hold));
    let after = rss_kib(pid);
    if pid != 0 {
        println!(
            "server RSS: {before} KiB before, {after} KiB with {n} idle authenticated connections = {:.0} bytes per connection",
            (after.saturating_sub(before)) as f64 * 1024.0 / n as f64
        );
    }
    drop(conns);
}
