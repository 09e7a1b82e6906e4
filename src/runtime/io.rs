//! A connection's byte stream as the shard's driver (src/runtime/driver.rs) sees it: the plain
//! socket, or the socket with rustls's unbuffered server state machine between it and the
//! shard. `Poll::Pending` means "not now": the socket would block, and the driver's epoll set
//! reports when it can go on (or, after a bounded amount of work, the readiness is kept and
//! the driver comes back on its next pass).
//!
//! TLS is pumped sans-IO and the runtime owns every buffer: ciphertext is read into one buffer
//! per shard and processed there, so a connection keeps only the unfinished tail of a record;
//! records rustls makes go to the connection's output buffer, bounded by
//! [`MAX_TLS_OUT_BYTES`] (a write of plaintext beyond it takes only what fits, so a slow reader
//! is held back by the shard's own outbound bound as on a plain connection). Every buffer is
//! released when it empties: an idle TLS connection holds rustls's state (keys, record
//! counters) and nothing else. The shard only ever sees plaintext.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::task::Poll;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};

use crate::metrics::Metrics;

/// Reads of what a closing connection's peer still sends, per pass (each into the shard's
/// scratch buffer, dropped).
const MAX_LINGER_READS: usize = 16;
use crate::tls::TlsStats;

/// Socket reads processed per read call before yielding (a peer sending tiny records cannot
/// keep the task in one poll for long).
const MAX_RECORD_ROUNDS: usize = 64;
/// Ciphertext read from a socket in one go (per shard).
const CIPHER_BYTES: usize = 64 * 1024;
/// Encrypted output one connection may hold before the shard's output waits (as a plain
/// socket's send buffer would make it).
const MAX_TLS_OUT_BYTES: usize = 64 * 1024;
/// Unprocessed ciphertext one connection may hold: a read's worth and a handshake message.
const MAX_TLS_IN_BYTES: usize = CIPHER_BYTES + 64 * 1024;
/// Room first offered to rustls for one handshake record.
const ENCODE_RESERVE: usize = 4096;
/// A TLS record's payload limit and the bytes a record adds at most (header, type, tag).
const MAX_FRAGMENT_BYTES: usize = 16 * 1024;
const RECORD_OVERHEAD_BYTES: usize = 64;

/// A connection's non-blocking socket and the readiness its epoll registration last reported
/// (edge-triggered: an event sets a flag, and it is cleared when the socket would block or a
/// read or write took less than was offered, which means the socket is drained or full; the
/// next change brings a new event).
pub(super) struct Sock {
    stream: std::net::TcpStream,
    readable: bool,
    pub(super) writable: bool,
    /// The peer closed or the socket failed (`EPOLLRDHUP`, `EPOLLHUP`, `EPOLLERR`): that
    /// edge came once, so a short read no longer means drained. Reads go on until the end
    /// (0) or the error is read.
    hup: bool,
}

impl Sock {
    pub(super) fn new(stream: std::net::TcpStream) -> Sock {
        Sock {
            stream,
            readable: false,
            writable: false,
            hup: false,
        }
    }

    /// Records what an epoll event reported: input, room for output, the peer's close or
    /// an error.
    pub(super) fn mark(&mut self, input: bool, output: bool, hup: bool) {
        self.readable |= input;
        self.writable |= output;
        self.hup |= hup;
    }

    fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // After the peer's FIN a short read is not the last one: the end is still to be read
        // and no new edge would say so (0 offered: no result counts as short).
        let len = if self.hup { 0 } else { buf.len() };
        let stream = &self.stream;
        step(&mut self.readable, len, || (&*stream).read(buf))
    }

    fn write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        let stream = &self.stream;
        step(&mut self.writable, buf.len(), || (&*stream).write(buf))
    }

    /// One vectored write of `a` then `b`.
    fn write_two(&mut self, a: &[u8], b: &[u8]) -> Poll<io::Result<usize>> {
        let stream = &self.stream;
        let bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
        step(&mut self.writable, a.len() + b.len(), || {
            (&*stream).write_vectored(&bufs)
        })
    }
}

/// One read or write of `len` bytes while `ready`: a result that took less than offered, or
/// would block, clears `ready` (the socket is drained or full; its next edge sets it again);
/// an interrupted call is retried.
fn step(
    ready: &mut bool,
    len: usize,
    mut op: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    while *ready {
        match op() {
            Ok(n) => {
                if n < len {
                    *ready = false;
                }
                return Poll::Ready(Ok(n));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => *ready = false,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Pending
}

/// The socket of one connection.
pub(super) enum Io {
    Plain(Sock),
    Tls(Box<Tls>),
}

/// A TLS connection: the socket and rustls's unbuffered state machine, with buffers that
/// hold bytes only while they are in flight (an idle connection allocates none of them).
pub(super) struct Tls {
    stream: Sock,
    conn: UnbufferedServerConnection,
    /// Ciphertext read but not yet processed: the start of a record (or of a handshake
    /// message) whose rest has not arrived.
    inbuf: Vec<u8>,
    /// Records made but not yet written.
    outbuf: Vec<u8>,
    /// Plaintext decrypted beyond what the caller's buffer took.
    plain: Vec<u8>,
    /// The handshake finished (counted once).
    established: bool,
    /// The close_notify alert is queued.
    close_sent: bool,
    /// The peer closed (close_notify, or the end of the stream).
    eof: bool,
}

impl Tls {
    pub(super) fn new(stream: Sock, conn: UnbufferedServerConnection) -> Tls {
        Tls {
            stream,
            conn,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            plain: Vec::new(),
            established: false,
            close_sent: false,
            eof: false,
        }
    }
}

/// What processing the received records led to.
enum Step {
    /// Waiting for more bytes from the peer.
    NeedData,
    /// The peer closed the TLS stream.
    Closed,
}

impl Io {
    /// The socket and its readiness.
    pub(super) fn sock(&mut self) -> &mut Sock {
        match self {
            Io::Plain(s) => s,
            Io::Tls(t) => &mut t.stream,
        }
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Io::Plain(s) => s.stream.as_fd(),
            Io::Tls(t) => t.stream.stream.as_fd(),
        }
    }

    /// Input is waiting without a new event: the socket was not drained yet, or TLS holds
    /// decrypted bytes the last read did not take.
    pub(super) fn has_input(&self) -> bool {
        match self {
            Io::Plain(s) => s.readable,
            Io::Tls(t) => t.stream.readable || !t.plain.is_empty(),
        }
    }

    /// TLS: writes the records made so far (handshake messages, encrypted output,
    /// close_notify) until the socket would block. `Ok(true)` when something was written.
    /// Plain: nothing to do.
    pub(super) fn send_pending(&mut self) -> io::Result<bool> {
        match self {
            Io::Plain(_) => Ok(false),
            Io::Tls(t) => t.send_pending(),
        }
    }

    /// Hands `first` then `then` (plaintext) to the connection: the number of bytes taken
    /// (from `first` on), which may be 0 when TLS's record buffer is full or the handshake has
    /// not finished; `Pending` when the socket would block. On a plain socket both go in one
    /// system call (`writev`).
    pub(super) fn write(&mut self, first: &[u8], then: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) if first.is_empty() => s.write(then),
            Io::Plain(s) if then.is_empty() => s.write(first),
            Io::Plain(s) => s.write_two(first, then),
            Io::Tls(t) => {
                let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
                let mut n = t.encrypt(first).map_err(invalid)?;
                if n == first.len() && !then.is_empty() {
                    n += t.encrypt(then).map_err(invalid)?;
                }
                t.send_pending()?;
                Poll::Ready(Ok(n))
            }
        }
    }

    /// Reads plaintext into `buf`: `Ok(0)` at the end of the stream; `Pending` when the
    /// socket has nothing now. TLS errors are counted in `metrics` and reported as
    /// `InvalidData`, and the caller closes the connection (without an alert).
    pub(super) fn read(&mut self, buf: &mut [u8], metrics: &Metrics) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(t) => t.read(buf, &metrics.tls),
        }
    }

    /// Called once the shard wants the connection closed: TLS sends its close_notify (once)
    /// and the records still held. `true` while records remain that the socket would not
    /// take yet (the caller waits for writability, up to the shard's close deadline).
    pub(super) fn closing(&mut self) -> bool {
        let Io::Tls(t) = self else {
            return false;
        };
        if !t.close_sent {
            t.close_sent = true;
            let status = t.conn.process_tls_records(&mut []);
            if let Ok(ConnectionState::WriteTraffic(mut w)) = status.state {
                let start = t.outbuf.len();
                t.outbuf.resize(start + RECORD_OVERHEAD_BYTES * 2, 0);
                let n = w.queue_close_notify(&mut t.outbuf[start..]).unwrap_or(0);
                t.outbuf.truncate(start + n);
            }
        }
        match t.send_pending() {
            Ok(_) => !t.outbuf.is_empty(),
            Err(_) => false,
        }
    }

    /// The lingering close, once the last bytes (and TLS's close_notify) are written: shuts
    /// the write side once, so that a FIN follows them, then reads and drops whatever the
    /// peer still sends. Closing a socket with unread input would reset the connection: a
    /// peer still writing (a WebSocket client answering our close frame, a client sending
    /// when kicked) would get the reset instead of reading our last frames to the end.
    /// `Ready` once the peer closed too (or the socket failed); `Pending` otherwise (the
    /// caller bounds the wait with a deadline; after [`MAX_LINGER_READS`] reads the socket
    /// stays readable and the caller comes back later).
    pub(super) fn linger(&mut self, shut: &mut bool, scratch: &mut [u8]) -> Poll<()> {
        let sock = self.sock();
        if !*shut {
            *shut = true;
            if sock.stream.shutdown(std::net::Shutdown::Write).is_err() {
                return Poll::Ready(());
            }
        }
        for _ in 0..MAX_LINGER_READS {
            match sock.read(scratch) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
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
    /// Writes the records made so far until the socket would block (`Ok(true)`: something
    /// was written). An emptied buffer is released.
    fn send_pending(&mut self) -> io::Result<bool> {
        let mut wrote = false;
        while !self.outbuf.is_empty() {
            match self.stream.write(&self.outbuf) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.outbuf.drain(..n);
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(wrote),
            }
        }
        self.outbuf = Vec::new();
        Ok(wrote)
    }

    /// Runs rustls over `incoming` until it needs more bytes (or the peer closed): handshake
    /// records it makes go to `outbuf`, decrypted application data to `plain`. Returns how
    /// many bytes of `incoming` it consumed.
    fn process(
        conn: &mut UnbufferedServerConnection,
        incoming: &mut [u8],
        outbuf: &mut Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> Result<(usize, Step), rustls::Error> {
        let mut used = 0;
        loop {
            let status = conn.process_tls_records(&mut incoming[used..]);
            let discard = status.discard;
            let step = match status.state? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        plain.extend_from_slice(rec?.payload);
                    }
                    None
                }
                ConnectionState::ReadEarlyData(mut r) => {
                    while let Some(rec) = r.next_record() {
                        plain.extend_from_slice(rec?.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let start = outbuf.len();
                    outbuf.resize(start + ENCODE_RESERVE, 0);
                    let n = match e.encode(&mut outbuf[start..]) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(need)) => {
                            outbuf.resize(start + need.required_size, 0);
                            e.encode(&mut outbuf[start..]).unwrap_or(0)
                        }
                        Err(_) => 0,
                    };
                    outbuf.truncate(start + n);
                    None
                }
                // `outbuf` is written by the caller; rustls only needs to know it is taken.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => Some(Step::Closed),
                // BlockedHandshake, WriteTraffic (nothing left to read), and anything newer.
                _ => Some(Step::NeedData),
            };
            used += discard;
            if let Some(step) = step {
                return Ok((used, step));
            }
        }
    }

    /// Encrypts as much of `out` as the record buffer bound allows into `outbuf`; 0 while
    /// the handshake has not reached application data yet.
    fn encrypt(&mut self, out: &[u8]) -> Result<usize, rustls::Error> {
        // Records (tickets, key updates) rustls has to say first.
        let (_, _) = Self::process(&mut self.conn, &mut [], &mut self.outbuf, &mut self.plain)?;
        let room = MAX_TLS_OUT_BYTES.saturating_sub(self.outbuf.len());
        let take = out.len().min(room);
        if take == 0 {
            return Ok(0);
        }
        let status = self.conn.process_tls_records(&mut []);
        let Ok(ConnectionState::WriteTraffic(mut w)) = status.state else {
            return Ok(0);
        };
        let start = self.outbuf.len();
        // TLS 1.3 adds 22 bytes per record of at most 16 KiB, TLS 1.2 with AES-GCM 29.
        let reserve = take + (take / MAX_FRAGMENT_BYTES + 1) * RECORD_OVERHEAD_BYTES;
        self.outbuf.resize(start + reserve, 0);
        let n = match w.encrypt(&out[..take], &mut self.outbuf[start..]) {
            Ok(n) => n,
            Err(EncryptError::InsufficientSize(need)) => {
                self.outbuf.resize(start + need.required_size, 0);
                match w.encrypt(&out[..take], &mut self.outbuf[start..]) {
                    Ok(n) => n,
                    Err(_) => {
                        self.outbuf.truncate(start);
                        return Err(rustls::Error::EncryptError);
                    }
                }
            }
            Err(_) => {
                self.outbuf.truncate(start);
                return Err(rustls::Error::EncryptError);
            }
        };
        self.outbuf.truncate(start + n);
        Ok(take)
    }

    fn read(&mut self, buf: &mut [u8], stats: &TlsStats) -> Poll<io::Result<usize>> {
        for _ in 0..MAX_RECORD_ROUNDS {
            if !self.plain.is_empty() {
                let n = self.plain.len().min(buf.len());
                buf[..n].copy_from_slice(&self.plain[..n]);
                self.plain.drain(..n);
                if self.plain.is_empty() {
                    self.plain = Vec::new();
                }
                return Poll::Ready(Ok(n));
            }
            if self.eof {
                return Poll::Ready(Ok(0));
            }
            let read = CIPHER.with(|cell| {
                let mut cipher = cell.borrow_mut();
                if cipher.is_empty() {
                    cipher.resize(CIPHER_BYTES, 0);
                }
                let n = match self.stream.read(&mut cipher[..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(None)),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                // Records complete in this read are processed where they landed; only an
                // unfinished one is kept, in the connection's own buffer.
                let res = if self.inbuf.is_empty() {
                    Self::process(
                        &mut self.conn,
                        &mut cipher[..n],
                        &mut self.outbuf,
                        &mut self.plain,
                    )
                    .map(|(used, step)| {
                        self.inbuf.extend_from_slice(&cipher[used..n]);
                        step
                    })
                } else {
                    self.inbuf.extend_from_slice(&cipher[..n]);
                    Self::process(
                        &mut self.conn,
                        &mut self.inbuf,
                        &mut self.outbuf,
                        &mut self.plain,
                    )
                    .map(|(used, step)| {
                        self.inbuf.drain(..used);
                        if self.inbuf.is_empty() {
                            self.inbuf = Vec::new();
                        }
                        step
                    })
                };
                Poll::Ready(Ok(Some(res)))
            });
            let step = match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(None)) => {
                    // The end of the stream (without close_notify).
                    if self.conn.is_handshaking() {
                        TlsStats::add(&stats.handshake_failures);
                    }
                    self.eof = true;
                    continue;
                }
                Poll::Ready(Ok(Some(step))) => step,
            };
            let step = match step {
                Ok(step) => step,
                Err(e) => {
                    TlsStats::add(if self.conn.is_handshaking() {
                        &stats.handshake_failures
                    } else {
                        &stats.record_errors
                    });
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            };
            if self.inbuf.len() > MAX_TLS_IN_BYTES {
                // Only a handshake message can grow this (rustls caps them at 64 KiB).
                TlsStats::add(&stats.handshake_failures);
                return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
            }
            if !self.established && !self.conn.is_handshaking() {
                self.established = true;
                TlsStats::add(&stats.handshakes);
            }
            if matches!(step, Step::Closed) {
                self.eof = true;
            }
            // Handshake replies go out at once.
            self.send_pending()?;
        }
        // Plenty done: the socket stays readable, so the driver comes back on its next pass.
        Poll::Pending
    }
}

thread_local! {
    /// Per-shard buffer ciphertext is read into (and decrypted from) before the plaintext is
    /// handed on, so that an idle TLS connection keeps no read buffer of its own.
    static CIPHER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_range_and_own_bytes_go_out_in_one_write_and_in_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut io = Io::Plain(Sock::new(accepted));
        let writes: [(&[u8], &[u8]); 3] = [(b"shared", b"-own"), (b"", b"+own"), (b"+shared", b"")];
        for (first, then) in writes {
            io.sock().writable = true;
            match io.write(first, then) {
                Poll::Ready(Ok(n)) => assert_eq!(n, first.len() + then.len()),
                other => panic!("{other:?}"),
            }
        }
        let want = b"shared-own+own+shared";
        let mut got = vec![0; want.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &want[..]);
    }
}
