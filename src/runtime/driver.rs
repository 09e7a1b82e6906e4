//! Every connection of one shard, driven without a task or a poll source of its own: the
//! shard's listeners and sockets sit in one edge-triggered epoll set, and one driver task per
//! shard waits for that set (a single io_uring poll of its descriptor,
//! `glommio::net::Readable`) or for the shard's wake-ups, then services what is ready. It
//! accepts, reads into the shard's scratch buffer and feeds the shard, writes what the shard
//! queued (one `send` per connection per pass, coalescing every frame queued meanwhile), and
//! carries out closes and their lingering. A long round (a group message written to thousands)
//! looks at the epoll set again on the way, so what arrives meanwhile is not left for the next
//! pass ([`Driver::poll_within_pass`]).
//!
//! What a connection costs the runtime is its [`Slot`]: the socket (a descriptor and two
//! readiness bits; TLS adds rustls's state) and a flag. The kernel holds its epoll
//! registration. A group message to 2,000 members is written by one loop over their slots
//! in the pass after the shard queued it, not by 2,000 task wake-ups.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::clock;
use super::io::{Io, Sock, Tls};
use crate::metrics::Metrics;
use crate::shard::{ConnId, Shard, Transport, CLOSE_FLUSH_MS};
use crate::tls::{ShardTls, TlsStats};

/// Events taken from the epoll set per pass.
const EVENTS: usize = 256;
/// Connections accepted per listener per pass (the rest wait for the next pass).
const MAX_ACCEPTS_PER_PASS: usize = 64;
/// Reads and writes of one connection per pass before the others get their turn (and
/// turns of one connection paused for its own shard's work, [`Served::Local`]).
const MAX_ROUNDS_PER_PASS: usize = 16;
/// Batches a shard posted to itself handled in a turn paused by a `hello` (`Register`, then
/// `Registered`; [`Shard::run_local`]).
const LOCAL_ROUNDS: usize = 4;
/// How long a listener rests after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_RETRY_MS: u64 = 50;
/// Connections a round services between looks at the clock (for `poll_within_pass_us`).
const POLL_CHECK_EVERY: usize = 16;
/// Bytes read from a socket in one go (per shard, shared by all its connections).
const SCRATCH_BYTES: usize = 64 * 1024;

/// What an epoll event's data says: the kind of descriptor in the high half, its index in the
/// low half. A connection's index is its slab index; its generation is checked in the slot
/// (an event of a freed index reaches at most a harmless extra look at the next occupant).
const KIND_CONN: u64 = 0;
const KIND_LINGER: u64 = 1 << 32;
const KIND_LISTENER: u64 = 2 << 32;
const KIND_MASK: u64 = !0 << 32;

/// Makes `listener` non-blocking and sets TCP_NODELAY on it, which the sockets it accepts
/// inherit (Linux copies the listener's TCP state into each new socket): no `setsockopt` per
/// connection.
fn prepare_listener(listener: &std::net::TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    socket2::SockRef::from(listener).set_nodelay(true)
}

/// Accepts one connection, non-blocking from the start (`accept4`'s flag: no `ioctl` per
/// connection) and with TCP_NODELAY from [`prepare_listener`].
fn accept_one(listener: &std::net::TcpListener) -> io::Result<std::net::TcpStream> {
    let (socket, _) = socket2::SockRef::from(listener)
        .accept4(nix::libc::SOCK_NONBLOCK | nix::libc::SOCK_CLOEXEC)?;
    Ok(socket.into())
}

/// One listening socket of the shard: its transport and whether TLS runs under it.
pub(super) struct Listener {
    pub(super) socket: std::net::TcpListener,
    pub(super) transport: Transport,
    pub(super) tls: Option<Rc<RefCell<ShardTls>>>,
}

struct ListenerState {
    listener: Listener,
    /// The last accept did not find the backlog empty.
    ready: bool,
    /// After a failed accept: no accept before this (monotonic ms).
    rest_until_ms: u64,
}

/// A live connection's socket.
struct Slot {
    io: Io,
    generation: u32,
    /// In the driver's queue for this pass or the next.
    queued: bool,
}

/// A socket the shard closed, shut for writing, read and dropped until the peer closes too
/// or `deadline_ms` passes (see [`Io::linger`]).
struct Lingering {
    io: Io,
    shut: bool,
    deadline_ms: u64,
}

/// The shard's connections as the runtime holds them, and the epoll set that watches them.
pub(super) struct Driver {
    shard: Rc<RefCell<Shard>>,
    epoll: Epoll,
    listeners: Vec<Option<ListenerState>>,
    /// By slab index.
    slots: Vec<Option<Slot>>,
    /// Connections to service in this pass, and those that asked for the next one (each
    /// marked `queued` while listed, so listed once).
    queue: Vec<ConnId>,
    next: Vec<ConnId>,
    /// What the shard listed for the runtime, before it is queued (kept for its allocation).
    woken: Vec<ConnId>,
    lingering: Vec<Option<Lingering>>,
    lingering_free: Vec<usize>,
    lingering_len: usize,
    max_lingering: usize,
    /// `runtime.poll_within_pass_us`: a round this long looks at the epoll set again.
    poll_within_pass_us: u64,
    /// Lingering sockets with input to drop.
    linger_queue: Vec<usize>,
    /// The earliest lingering deadline (`u64::MAX`: none).
    linger_check_ms: u64,
    events: Vec<EpollEvent>,
    scratch: Vec<u8>,
    metrics: Arc<Metrics>,
    base: Instant,
    /// The io_uring poll of the epoll set, kept armed across waits until it fires.
    epoll_ready: glommio::net::Readable,
}

impl Driver {
    pub(super) fn new(
        shard: Rc<RefCell<Shard>>,
        listeners: Vec<Listener>,
        max_lingering: usize,
        poll_within_pass_us: u64,
        metrics: Arc<Metrics>,
        base: Instant,
    ) -> io::Result<Driver> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let epoll_fd = epoll.0.as_raw_fd();
        for (i, l) in listeners.iter().enumerate() {
            prepare_listener(&l.socket)?;
            let ev = EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                KIND_LISTENER | i as u64,
            );
            epoll.add(&l.socket, ev)?;
        }
        Ok(Driver {
            shard,
            epoll,
            listeners: listeners
                .into_iter()
                .map(|listener| {
                    Some(ListenerState {
                        listener,
                        // A connection may have queued before the registration.
                        ready: true,
                        rest_until_ms: 0,
                    })
                })
                .collect(),
            slots: Vec::new(),
            queue: Vec::new(),
            next: Vec::new(),
            woken: Vec::new(),
            lingering: Vec::new(),
            lingering_free: Vec::new(),
            lingering_len: 0,
            max_lingering,
            poll_within_pass_us,
            linger_queue: Vec::new(),
            linger_check_ms: u64::MAX,
            events: vec![EpollEvent::empty(); EVENTS],
            scratch: vec![0; SCRATCH_BYTES],
            metrics,
            base,
            epoll_ready: glommio::net::Readable::new(epoll_fd),
        })
    }

    /// Services the shard's connections until the task is dropped (the shard stopped).
    pub(super) async fn run(mut self) {
        loop {
            if self.pass() {
                // More to do: let the shard's other tasks (mesh, I/O completions, timers) run
                // first.
                futures_lite::future::yield_now().await;
            } else {
                self.wait().await;
            }
        }
    }

    /// Waits for the epoll set, the shard's wake-up, or the next deadline (a lingering close,
    /// a resting listener).
    async fn wait(&mut self) {
        let deadline = self.next_deadline_ms();
        let ready = &mut self.epoll_ready;
        let shard = &self.shard;
        let base = self.base;
        let mut timer = deadline.map(|ms| {
            let now = clock(base).mono_ms;
            glommio::timer::Timer::new(Duration::from_millis(ms.saturating_sub(now)))
        });
        let fired = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = ready.poll_readable(cx) {
                return Poll::Ready(Some(r));
            }
            {
                let mut s = shard.borrow_mut();
                if s.has_woken() {
                    return Poll::Ready(None);
                }
                s.set_driver_waker(cx.waker());
            }
            if let Some(t) = timer.as_mut() {
                if Pin::new(t).poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        if let Some(Err(e)) = fired {
            // The set itself cannot fail to poll; if it did, back off instead of spinning.
            tracing::warn!(error = %e, "polling the connection set failed");
            glommio::timer::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
        }
    }

    /// The earliest moment the driver has to look again without an event.
    fn next_deadline_ms(&self) -> Option<u64> {
        let linger = (self.lingering_len > 0).then_some(self.linger_check_ms);
        let rest = self
            .listeners
            .iter()
            .flatten()
            .filter(|l| l.ready)
            .map(|l| l.rest_until_ms)
            .min();
        match (linger, rest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One round over everything ready. `true` when work is left for another pass.
    fn pass(&mut self) -> bool {
        let shard = self.shard.clone();
        let mut s = shard.borrow_mut();
        let clk = clock(self.base);
        if s.is_draining() && self.listeners.iter().any(Option::is_some) {
            // Dropping the listeners closes them: new connections are refused.
            self.listeners.iter_mut().for_each(|l| *l = None);
        }
        self.poll_events();
        self.take_woken(&mut s);
        for i in 0..self.listeners.len() {
            self.accept(&mut s, i, clk.mono_ms);
        }
        self.service_queue(&mut s);
        // Write in this pass what this pass made: the fan-out of a group message just read,
        // the replies to what was just read.
        self.take_woken(&mut s);
        self.service_queue(&mut s);
        std::mem::swap(&mut self.queue, &mut self.next);
        self.linger_pass(clk.mono_ms);
        // One clock read (the monotonic one) per pass.
        let took_us = (self.base.elapsed().as_micros() as u64).saturating_sub(clk.mono_us);
        self.metrics.shards[s.id].driver_pass.record_us(took_us);
        !self.queue.is_empty()
            || !self.linger_queue.is_empty()
            || self
                .listeners
                .iter()
                .flatten()
                .any(|l| l.ready && l.rest_until_ms <= clk.mono_ms)
    }

    /// Queues the connections the shard gave output or a close, unless an event or the last
    /// pass queued them already.
    fn take_woken(&mut self, s: &mut Shard) {
        let mut woken = std::mem::take(&mut self.woken);
        s.take_woken(&mut woken);
        for id in woken.drain(..) {
            self.enqueue(id);
        }
        self.woken = woken;
    }

    /// Queues `id` for this pass if it is live and not queued yet.
    fn enqueue(&mut self, id: ConnId) {
        if let Some(slot) = self.slot(id) {
            if !slot.queued {
                slot.queued = true;
                self.queue.push(id);
            }
        }
    }

    /// Services the connections queued for this pass, each once. A long round (a group
    /// message's fan-out to thousands) looks at the epoll set every `poll_within_pass_us` on
    /// the way ([`Driver::poll_within_pass`]).
    fn service_queue(&mut self, s: &mut Shard) {
        let mut queue = std::mem::take(&mut self.queue);
        let mut polled_us = self.base.elapsed().as_micros() as u64;
        for (k, id) in queue.drain(..).enumerate() {
            self.service_listed(s, id);
            if k % POLL_CHECK_EVERY == POLL_CHECK_EVERY - 1 {
                let now_us = self.base.elapsed().as_micros() as u64;
                if now_us.saturating_sub(polled_us) >= self.poll_within_pass_us {
                    self.poll_within_pass(s);
                    polled_us = now_us;
                }
            }
        }
        debug_assert!(
            self.queue.is_empty(),
            "the round's additions went to `next`"
        );
        self.queue = queue;
    }

    /// Services a connection taken from a queue (unless it is gone since it was listed).
    fn service_listed(&mut self, s: &mut Shard, id: ConnId) {
        if let Some(slot) = self.slot(id) {
            slot.queued = false;
            self.service_one(s, id);
        }
    }

    /// Services one connection, and at once what it asked of its own shard: one batch of
    /// what this shard posted to itself (a send to a group or user it owns), after which the
    /// connection is serviced once more, so the reply (`send_ack`) is written in this pass
    /// and not after the rest of it. What that batch posts in turn (a group's fan-out to its
    /// members) waits for the next connection's turn or the flusher.
    ///
    /// A `hello` is answered in two batches (`Register` at the owner, `Registered` back): the
    /// read that brings it pauses the turn ([`Served::Local`]), the shard handles up to
    /// [`LOCAL_ROUNDS`] batches, and the turn goes on, so `welcome` is written in this pass
    /// and together with the 101 of an upgrade whose request came with the `hello`, in one
    /// send. (Pausing every read that posts, and running every batch in turn, made the
    /// passes of a 600 msgs/s fan-out longer and its latency higher: measured.)
    fn service_one(&mut self, s: &mut Shard, id: ConnId) {
        let mut answered = false;
        for _ in 0..MAX_ROUNDS_PER_PASS {
            let paused = self.service(s, id);
            if !paused {
                if answered || !s.has_local_batch() {
                    return;
                }
                answered = true;
            }
            let rounds = if paused { LOCAL_ROUNDS } else { 1 };
            s.run_local(clock(self.base), rounds);
            if self.slot(id).is_none() {
                return;
            }
        }
        // Still reading after that many turns: the next pass goes on.
        if let Some(slot) = self.slot(id) {
            if !slot.queued {
                slot.queued = true;
                self.next.push(id);
            }
        }
    }

    /// In the middle of a round ([`Driver::service_queue`] holds the round's queue): takes
    /// what the epoll set reports now and services the connections it names, so a group
    /// message that arrived meanwhile is read at once. Its frames reach the members still
    /// ahead in the round there (they are queued, so they are not listed again); the members
    /// the round has passed get them first thing in the next pass, coalesced with what
    /// follows. Without this a message waits for the round to end (tens of milliseconds under
    /// load) before it is even read, and then for its member's turn in the next round.
    fn poll_within_pass(&mut self, s: &mut Shard) {
        self.poll_events();
        let mut ready = std::mem::take(&mut self.queue);
        for id in ready.drain(..) {
            self.service_listed(s, id);
        }
        self.queue = ready;
        self.take_woken(s);
        // `take_woken` listed only connections not queued: those the round has passed.
        self.next.append(&mut self.queue);
        self.metrics.shards[s.id]
            .driver_polls_within_pass
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn slot(&mut self, id: ConnId) -> Option<&mut Slot> {
        self.slots
            .get_mut(id.index as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == id.generation)
    }

    /// Takes what the epoll set reports and marks it: readiness on the sockets, the
    /// connections queued for this pass.
    fn poll_events(&mut self) {
        let n = match self.epoll.wait(&mut self.events, 0) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => return,
            Err(e) => {
                tracing::warn!(error = %e, "epoll_wait failed");
                return;
            }
        };
        for i in 0..n {
            let ev = self.events[i];
            let flags = ev.events();
            let token = ev.data();
            let index = (token & !KIND_MASK) as usize;
            let hup = flags
                .intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
            let input = hup || flags.intersects(EpollFlags::EPOLLIN);
            let output = flags
                .intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
            match token & KIND_MASK {
                KIND_CONN => {
                    let Some(Some(slot)) = self.slots.get_mut(index) else {
                        continue;
                    };
                    slot.io.sock().mark(input, output, hup);
                    let id = ConnId {
                        index: index as u32,
                        generation: slot.generation,
                    };
                    self.enqueue(id);
                }
                KIND_LINGER => {
                    if let Some(Some(l)) = self.lingering.get_mut(index) {
                        l.io.sock().mark(input, false, hup);
                        if input {
                            self.linger_queue.push(index);
                        }
                    }
                }
                KIND_LISTENER => {
                    if let Some(Some(l)) = self.listeners.get_mut(index) {
                        l.ready = true;
                    }
                }
                _ => {}
            }
        }
    }

    /// Accepts what listener `i` has waiting, up to [`MAX_ACCEPTS_PER_PASS`].
    fn accept(&mut self, s: &mut Shard, i: usize, now_ms: u64) {
        for _ in 0..MAX_ACCEPTS_PER_PASS {
            let Some(Some(l)) = self.listeners.get_mut(i) else {
                return;
            };
            if !l.ready || l.rest_until_ms > now_ms {
                return;
            }
            let stream = match accept_one(&l.listener.socket) {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the backlog keeps them; rest instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    l.rest_until_ms = now_ms + ACCEPT_RETRY_MS;
                    return;
                }
            };
            let (transport, tls) = (l.listener.transport, l.listener.tls.clone());
            // A client sends its first bytes (an upgrade request, a `hello`, a ClientHello)
            // right behind its connect, so by the time it is accepted they have usually
            // arrived: the socket is tried at once, in this pass, instead of in the pass after
            // its registration's first event (a read that finds nothing costs an EAGAIN; the
            // figures are in ARCHITECTURE). An empty send buffer takes the reply.
            let mut sock = Sock::new(stream);
            sock.mark(true, true, false);
            let io = match tls {
                None => Io::Plain(sock),
                Some(tls) => match tls.borrow_mut().accept() {
                    Ok(conn) => Io::Tls(Box::new(Tls::new(sock, conn))),
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS session refused");
                        continue;
                    }
                },
            };
            let Some(id) = s.accept(transport, clock(self.base)) else {
                continue; // over the limit or draining: dropping the socket closes it
            };
            // Edge-triggered: the registration reports what is ready now, then every change.
            let ev = EpollEvent::new(
                EpollFlags::EPOLLIN
                    | EpollFlags::EPOLLOUT
                    | EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLET,
                KIND_CONN | u64::from(id.index),
            );
            if let Err(e) = self.epoll.add(io.fd(), ev) {
                tracing::warn!(error = %e, "adding a connection to the epoll set failed");
                s.remove(id);
                continue;
            }
            let index = id.index as usize;
            if self.slots.len() <= index {
                self.slots.resize_with(index + 1, || None);
            }
            // Served in this pass, readable and writable as marked above.
            self.slots[index] = Some(Slot {
                io,
                generation: id.generation,
                queued: true,
            });
            self.queue.push(id);
        }
    }

    /// Moves bytes for one connection: what the shard queued out, what the socket has in,
    /// and the close the shard asked for. `true` when a read paused the turn for the
    /// shard's own work ([`Served::Local`]).
    fn service(&mut self, s: &mut Shard, id: ConnId) -> bool {
        let index = id.index as usize;
        let Some(slot) = self.slots[index].as_mut() else {
            return false;
        };
        match serve(
            &mut slot.io,
            s,
            id,
            &mut self.scratch,
            &self.metrics,
            self.base,
        ) {
            Served::Idle => {}
            Served::Local => return true,
            Served::More => {
                slot.queued = true;
                self.next.push(id);
            }
            Served::Gone => {
                s.remove(id);
                self.slots[index] = None;
            }
            Served::Closed { linger } => {
                s.remove(id);
                if let Some(slot) = self.slots[index].take() {
                    if linger {
                        self.linger(slot.io);
                    }
                }
            }
        }
        false
    }

    /// Starts the lingering close of a socket the shard closed (its slot is already free):
    /// at most `limits.max_lingering_closes` per shard at once, beyond that it is closed at
    /// once (counted in `imgw_closes_not_lingered_total`).
    fn linger(&mut self, io: Io) {
        if self.lingering_len >= self.max_lingering {
            self.metrics
                .linger_skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let index = match self.lingering_free.pop() {
            Some(i) => i,
            None => {
                self.lingering.push(None);
                self.lingering.len() - 1
            }
        };
        let mut ev = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET,
            KIND_LINGER | index as u64,
        );
        if self.epoll.modify(io.fd(), &mut ev).is_err() {
            self.lingering_free.push(index);
            return;
        }
        let deadline_ms = clock(self.base).mono_ms + CLOSE_FLUSH_MS;
        self.lingering[index] = Some(Lingering {
            io,
            shut: false,
            deadline_ms,
        });
        self.lingering_len += 1;
        self.linger_check_ms = self.linger_check_ms.min(deadline_ms);
        self.linger_queue.push(index);
    }

    /// Reads and drops what lingering sockets received, and closes those whose peer closed
    /// or whose deadline passed.
    fn linger_pass(&mut self, now_ms: u64) {
        let mut queue = std::mem::take(&mut self.linger_queue);
        for index in queue.drain(..) {
            let Some(Some(l)) = self.lingering.get_mut(index) else {
                continue;
            };
            match l.io.linger(&mut l.shut, &mut self.scratch) {
                Poll::Ready(()) => self.end_linger(index),
                Poll::Pending if l.io.has_input() => self.linger_queue.push(index),
                Poll::Pending => {}
            }
        }
        self.linger_queue.append(&mut queue);
        if self.lingering_len > 0 && now_ms >= self.linger_check_ms {
            let mut next = u64::MAX;
            for index in 0..self.lingering.len() {
                match &self.lingering[index] {
                    Some(l) if l.deadline_ms <= now_ms => self.end_linger(index),
                    Some(l) => next = next.min(l.deadline_ms),
                    None => {}
                }
            }
            self.linger_check_ms = next;
        }
    }

    fn end_linger(&mut self, index: usize) {
        if self.lingering[index].take().is_some() {
            self.lingering_len -= 1;
            self.lingering_free.push(index);
        }
    }
}

/// What servicing a connection came to.
enum Served {
    /// Nothing more until an event or the shard's next wake-up.
    Idle,
    /// Work is left: again in the next pass, after the other connections.
    More,
    /// A read that brought `hello` posted to this shard itself: the caller handles that,
    /// then serves the connection again (its output so far, an upgrade's 101, is not
    /// written yet, so `welcome` joins it).
    Local,
    /// The peer closed or the socket failed.
    Gone,
    /// The shard's close is carried out; `linger` unless its deadline passed.
    Closed { linger: bool },
}

/// One connection's turn: the TLS records held, the shard's output, the close it asked for,
/// then input, for up to [`MAX_ROUNDS_PER_PASS`] rounds.
fn serve(
    io: &mut Io,
    s: &mut Shard,
    id: ConnId,
    scratch: &mut [u8],
    metrics: &Metrics,
    base: Instant,
) -> Served {
    for _ in 0..MAX_ROUNDS_PER_PASS {
        // TLS records rustls still holds go first (none on a plain socket).
        let mut progressed = match io.send_pending() {
            Ok(wrote) => wrote,
            Err(_) => return Served::Gone,
        };
        // Write everything queued, in as few sends as the kernel allows.
        if let Some(out) = s.output(id) {
            if !out.is_empty() {
                match io.write(out.shared, out.own) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        // One clock read per write: only the monotonic one.
                        s.wrote(id, n, base.elapsed().as_micros() as u64);
                        progressed = true;
                    }
                    Poll::Ready(Ok(_)) | Poll::Pending => {}
                    Poll::Ready(Err(_)) => return Served::Gone,
                }
            }
        }
        if s.should_close(id) {
            // TLS: the close_notify and the last records, unless the deadline has passed (the
            // shard's tick wakes the connection then).
            if io.closing() && !s.close_overdue(id) {
                return Served::Idle;
            }
            if io.handshaking() {
                TlsStats::add(&metrics.tls.handshake_timeouts);
            }
            // Lingering is pointless once the flush deadline has passed (a peer that does not
            // read will not close either).
            return Served::Closed {
                linger: !s.close_overdue(id),
            };
        }
        if !s.is_closing(id) {
            match io.read(scratch, metrics) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Served::Gone,
                Poll::Ready(Ok(n)) => {
                    // A read that brings `hello` posts its registration to this shard
                    // (when it owns the user): only that pauses the turn.
                    let posted = s.awaits_hello(id).then(|| s.local_batch_len());
                    s.on_read(id, &mut scratch[..n], clock(base));
                    if posted.is_some_and(|before| s.local_batch_len() > before) {
                        return Served::Local;
                    }
                    progressed = true;
                }
                Poll::Pending => {}
            }
        }
        if !progressed {
            return Served::Idle;
        }
    }
    let writable = io.sock().writable;
    if io.has_input() || (writable && s.output(id).is_some_and(|o| !o.is_empty())) {
        Served::More
    } else {
        Served::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn accepted_sockets_are_non_blocking_with_nodelay_and_no_call_of_their_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing waiting: the listener itself does not block.
        assert_eq!(
            accept_one(&listener).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let mut accepted = None;
        for _ in 0..1_000 {
            match accept_one(&listener) {
                Ok(s) => {
                    accepted = Some(s);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        let mut stream = accepted.expect("the connection within a second");
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY from the listener");
        let mut buf = [0u8; 8];
        assert_eq!(
            stream.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "non-blocking from accept4"
        );
        let fd_flags = nix::fcntl::fcntl(stream.as_raw_fd(), nix::fcntl::F_GETFD).unwrap();
        assert_ne!(fd_flags & nix::libc::FD_CLOEXEC, 0, "close-on-exec");
    }
}
