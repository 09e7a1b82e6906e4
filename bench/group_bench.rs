//! A large group: N members join (each through its own short-lived connection, so nearly all
//! of them are offline afterwards), K stay online, and one member sends M messages. Reports the
//! time to build the group, the time and server CPU per group message, and the deliveries the
//! online members received.
//!
//! `cargo run --release --example group_bench -- --ws 127.0.0.1:8080 --members 100000 --online 100 --messages 200 --pid PID`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "util.rs"]
mod util;
use util::{arg, cpu_secs};

fn masked_text(out: &mut Vec<u8>, text: &str) {
    let mask = [0x5au8, 0x17, 0x33, 0x81];
    out.push(0x81);
    let n = text.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

fn open(addr: SocketAddr, user: &str, extra: &[String]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    masked_text(
        &mut out,
        &format!(r#"{{"op":"hello","ref":1,"token":"{user}","device":"d"}}"#),
    );
    for e in extra {
        masked_text(&mut out, e);
    }
    s.write_all(&out).unwrap();
    s
}

/// Reads until `needle` has been seen `times` times.
fn read_until(s: &mut TcpStream, needle: &[u8], times: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.windows(needle.len()).filter(|w| *w == needle).count() < times {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "server closed");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn main() {
    let addr: SocketAddr = arg("--ws")
        .unwrap_or("127.0.0.1:8080".into())
        .parse()
        .unwrap();
    let members: usize = arg("--members").map_or(100_000, |s| s.parse().unwrap());
    let online: usize = arg("--online").map_or(100, |s| s.parse().unwrap());
    let messages: usize = arg("--messages").map_or(200, |s| s.parse().unwrap());
    let pid: u32 = arg("--pid").map_or(0, |s| s.parse().unwrap());
    let group = "big";
    let join = format!(r#"{{"op":"group_join","ref":2,"group":"{group}"}}"#);

    let t = Instant::now();
    let mut kept = Vec::new();
    let batch = 256;
    let mut next = 0;
    while next < members {
        let k = batch.min(members - next);
        let mut conns: Vec<(usize, TcpStream)> = (next..next + k)
            .map(|i| (i, open(addr, &format!("m{i}"), std::slice::from_ref(&join))))
            .collect();
        for (i, s) in &mut conns {
            read_until(s, br#""op":"ok""#, 1);
            let _ = i;
        }
        for (i, s) in conns {
            if i < online {
                kept.push(s);
            }
            // Others close: offline members.
        }
        next += k;
    }
    let build = t.elapsed().as_secs_f64();
    println!("group of {members} members built in {build:.2} s ({online} online)");

    // The sender is member 0 (online). Send M messages, each awaited (send_ack).
    let sender = kept.first_mut().expect("at least one online member");
    let cpu0 = cpu_secs(pid);
    let t = Instant::now();
    for i in 0..messages {
        let mut out = Vec::new();
        masked_text(
            &mut out,
            &format!(
                r#"{{"op":"send","ref":{},"to":{{"group":"{group}"}},"cmid":"b{i}","body":"hello group {i}"}}"#,
                100 + i
            ),
        );
        sender.write_all(&out).unwrap();
        read_until(sender, br#""op":"send_ack""#, 1);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    println!(
        "{messages} group messages: {:.1} us each (wall, send to send_ack), server CPU {:.1} us per message",
        secs * 1e6 / messages as f64,
        cpu * 1e6 / messages as f64
    );
    // Every other online member receives every message.
    let mut received = 0;
    for s in kept.iter_mut().skip(1) {
        let got = read_until(s, br#""op":"deliver""#, messages);
        received += got
            .windows(14)
            .filter(|w| *w == br#""op":"deliver""#)
            .count();
    }
    println!(
        "online members received {received} deliveries (expected {})",
        (online - 1) * messages
    );
}
