//! A connection's byte stream as the connection task sees it: the plain socket, or the socket
//! with a [`rustls::ServerConnection`] between it and the shard.
//!
//! TLS is pumped sans-IO: rustls reads records from the socket through [`Polled`], an
//! `io::Read`/`io::Write` view of the socket that turns glommio's `Pending` into
//! `WouldBlock` (and leaves the waker registered), and the shard only ever sees plaintext.
//! Encrypted output rustls holds is bounded by its buffer limit (64 KiB, rustls's default):
//! a write of plaintext beyond it takes only what fits, so a slow reader is held back by the
//! shard's own outbound bound as on a plain connection.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::metrics::Metrics;
use crate::tls::TlsStats;

/// Records processed per read call before yielding (a peer sending tiny records cannot keep
/// the task in one poll for long).
const MAX_RECORD_ROUNDS: usize = 64;

/// The socket of one connection.
pub(super) enum Io {
    Plain(TcpStream),
    Tls(Box<Tls>),
}

/// A TLS connection: the socket and the rustls state machine.
pub(super) struct Tls {
    stream: TcpStream,
    conn: rustls::ServerConnection,
    /// The handshake finished (counted once).
    established: bool,
    /// The close_notify alert is queued.
    close_sent: bool,
}

impl Tls {
    pub(super) fn new(stream: TcpStream, conn: rustls::ServerConnection) -> Tls {
        Tls {
            stream,
            conn,
            established: false,
            close_sent: false,
        }
    }
}

/// The socket as a blocking-style reader/writer inside one poll: `Pending` becomes
/// `WouldBlock`, with the task's waker registered for the readiness it waits for.
struct Polled<'a, 'b> {
    stream: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for Polled<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Polled<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Io {
    /// TLS: writes the records rustls holds (handshake messages, alerts, encrypted output)
    /// until the socket would block. `Ok(true)` when something was written. Plain: nothing
    /// to do.
    pub(super) fn send_pending(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        match self {
            Io::Plain(_) => Ok(false),
            Io::Tls(t) => t.send_pending(cx),
        }
    }

    /// Hands `out` (plaintext) to the connection: the number of bytes taken, which may be 0
    /// when TLS's buffer is full; `Pending` when the socket would block (waker registered).
    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        out: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) => Pin::new(s).poll_write(cx, out),
            Io::Tls(t) => {
                let n = t.conn.writer().write(out)?;
                t.send_pending(cx)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    /// Reads plaintext into `buf`: `Ok(0)` at the end of the stream; `Pending` (waker
    /// registered) when the socket has nothing now. TLS errors are counted in `metrics` and
    /// reported as `InvalidData` after the alert was sent (best effort).
    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        metrics: &Metrics,
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(t) => t.poll_read(cx, buf, &metrics.tls),
        }
    }

    /// Called once the shard wants the connection closed: TLS sends its close_notify (once)
    /// and the records still held. `true` while records remain that the socket would not
    /// take yet (the caller waits for writability, up to the shard's close deadline).
    pub(super) fn closing(&mut self, cx: &mut Context<'_>) -> bool {
        let Io::Tls(t) = self else {
            return false;
        };
        if !t.close_sent {
            t.close_sent = true;
            t.conn.send_close_notify();
        }
        match t.send_pending(cx) {
            Ok(_) => t.conn.wants_write(),
            Err(_) => false,
        }
    }

    /// Whether a TLS handshake is still under way (always false for a plain socket).
    pub(super) fn handshaking(&self) -> bool {
        match self {
            Io::Plain(_) => false,
            Io::Tls(t) => t.conn.is_handshaking(),
        }
    }
}

impl Tls {
    fn send_pending(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut wrote = false;
        while self.conn.wants_write() {
            let mut sock = Polled {
                stream: &mut self.stream,
                cx,
            };
            match self.conn.write_tls(&mut sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(wrote)
    }

    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        stats: &TlsStats,
    ) -> Poll<io::Result<usize>> {
        for _ in 0..MAX_RECORD_ROUNDS {
            match self.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)), // 0: the peer's close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut sock = Polled {
                stream: &mut self.stream,
                cx,
            };
            match self.conn.read_tls(&mut sock) {
                Ok(0) => {
                    if self.conn.is_handshaking() {
                        TlsStats::add(&stats.handshake_failures);
                    }
                    return Poll::Ready(Ok(0));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = self.conn.process_new_packets() {
                TlsStats::add(if self.conn.is_handshaking() {
                    &stats.handshake_failures
                } else {
                    &stats.record_errors
                });
                // The alert rustls queued, if the socket takes it now.
                let _ = self.send_pending(cx);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if !self.established && !self.conn.is_handshaking() {
                self.established = true;
                TlsStats::add(&stats.handshakes);
            }
            // Handshake replies (and key updates) go out at once.
            self.send_pending(cx)?;
        }
        // Plenty done: come back after the other tasks.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
