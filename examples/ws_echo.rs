//! A WebSocket echo server on `std::net`, one thread per connection, built on the sans-IO
//! `imgw::ws` module. Text is echoed as text, binary as binary; pings are answered, closes
//! completed. It exists for the Autobahn conformance run (tests/autobahn.sh).
//!
//! Usage: `ws_echo [ADDR]` (default 127.0.0.1:9001). Every Origin is allowed and the size
//! limits are 64 MiB, as the Autobahn cases need (up to 16 MiB messages).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use imgw::ws::{self, frame, Decoder, Event, Handshake, HandshakeConfig, Limits, Next, Role};

const LIMIT: u32 = 64 << 20;

fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let listener = TcpListener::bind(&addr)?;
    eprintln!("ws_echo listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("ws_echo: connection ended: {e}");
            }
        });
    }
    Ok(())
}

fn serve(mut sock: TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    // The handshake timeout.
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let cfg = HandshakeConfig {
        allowed_origins: vec!["*".to_owned()],
        ..HandshakeConfig::default()
    };
    let mut scratch = vec![0u8; 64 * 1024];
    let mut request = Vec::new();
    let mut out = Vec::new();
    let upgrade = loop {
        let n = sock.read(&mut scratch)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&scratch[..n]);
        match ws::accept(&cfg, &request, &mut out) {
            Handshake::Incomplete => continue,
            Handshake::Accepted(up) => break up,
            Handshake::Rejected(_) => {
                sock.write_all(&out)?;
                return linger_close(sock);
            }
        }
    };
    sock.write_all(&out)?;
    out.clear();
    sock.set_read_timeout(Some(Duration::from_secs(120)))?;

    let mut dec = Decoder::new(Role::Server, Limits::new(LIMIT, LIMIT));
    // Bytes after the request header are the first WebSocket bytes.
    let mut first = request.split_off(upgrade.consumed);
    drop(request);
    let mut from_scratch = 0;
    loop {
        let mut input: &mut [u8] = if first.is_empty() {
            &mut scratch[..from_scratch]
        } else {
            &mut first[..]
        };
        let mut done = false;
        loop {
            match dec.next_event(&mut input) {
                Ok(Some(Event::Text(t))) => frame::write_text(&mut out, t),
                Ok(Some(Event::Binary(b))) => frame::write_binary(&mut out, b),
                Ok(Some(ev)) => {
                    if ws::respond(&ev, false, &mut out) == Next::Close {
                        done = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ws::respond_error(e, &mut out);
                    done = true;
                    break;
                }
            }
        }
        first = Vec::new();
        if !out.is_empty() {
            sock.write_all(&out)?;
            out.clear();
            if out.capacity() > 1 << 20 {
                out = Vec::new();
            }
        }
        if done {
            return linger_close(sock);
        }
        from_scratch = sock.read(&mut scratch)?;
        if from_scratch == 0 {
            return Ok(());
        }
    }
}

/// Closes our side, then drains what the peer still sends for a moment, so that unread
/// bytes do not turn our close into a reset that could destroy the Close frame in flight.
fn linger_close(mut sock: TcpStream) -> io::Result<()> {
    sock.flush()?;
    sock.shutdown(Shutdown::Write)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}
