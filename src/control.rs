//! Process-wide control flags shared by the shards, the admin server and signal handlers.
//!
//! Only atomics and set-once cells live here: shards poll them on their sweep tick, nothing
//! blocks on them.
//!
//! Layering: this module is a plain bundle of flags and handles above the I/O core and the
//! shards. It holds their handles (the I/O core's [`Pusher`], the shards'
//! [`AdminQueues`]) and neither of them names it: the I/O core and its services see it only as
//! an [`iocore::Readiness`](Readiness), which [`Control`] implements.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::iocore::{Pusher, Readiness};
use crate::shard::admin::AdminQueues;
use crate::tls::Certs;

/// Lifecycle flags of one gateway process.
#[derive(Debug, Default)]
pub struct Control {
    /// Set by SIGTERM/SIGINT or the admin API: stop accepting, `goaway` everyone, exit.
    drain: AtomicBool,
    /// Shards that have bound their listeners and entered their loop.
    shards_ready: AtomicUsize,
    /// Shards in this process.
    shards_total: AtomicUsize,
    /// Backends that must be ready before clients are sent here (Kafka's topics): a send
    /// that needs them would only wait and fail.
    backends_pending: AtomicUsize,
    /// Queues push records and kicks for their owner shards; set once the I/O core runs
    /// (durability `local` or `backend`), for the admin API's `POST /push` and `POST /kick`.
    pusher: OnceLock<Pusher>,
    /// The admin API's own bounded way into the shards (one queue per shard), set once by
    /// the runtime before the shards start, at every durability.
    admin: OnceLock<Arc<AdminQueues>>,
    /// The TLS listeners' certificate, set once at start when they are configured; SIGHUP
    /// reloads it.
    tls: OnceLock<Arc<Certs>>,
    /// The WebSocket listener's bound address (port 0 resolved), set once by the runtime:
    /// the `--web` pages connect there.
    ws_addr: OnceLock<SocketAddr>,
    /// Admin API requests that queue work for the shards (`POST /push`, `POST /kick`):
    /// queued (index 0) and refused (1: a bad body, overloaded, unavailable).
    pub admin_pushes: [AtomicU64; 2],
    pub admin_kicks: [AtomicU64; 2],
    /// The same for `POST /broadcast`, for group management (`/groups...`: done, refused)
    /// and for user inspection (`GET /users/...`).
    pub admin_broadcasts: [AtomicU64; 2],
    pub admin_groups: [AtomicU64; 2],
    pub admin_users: [AtomicU64; 2],
    /// Admin requests answered 503 because a shard's admin queue was full.
    pub admin_queue_full: AtomicU64,
    /// Admin requests whose shard answer did not come in time (504).
    pub admin_timeouts: AtomicU64,
    /// Admin requests refused for a missing or wrong bearer token.
    pub admin_unauthorized: AtomicU64,
}

impl Control {
    pub fn new(shards_total: usize) -> Self {
        Control {
            drain: AtomicBool::new(false),
            shards_ready: AtomicUsize::new(0),
            shards_total: AtomicUsize::new(shards_total),
            backends_pending: AtomicUsize::new(0),
            pusher: OnceLock::new(),
            admin: OnceLock::new(),
            tls: OnceLock::new(),
            ws_addr: OnceLock::new(),
            admin_pushes: Default::default(),
            admin_kicks: Default::default(),
            admin_broadcasts: Default::default(),
            admin_groups: Default::default(),
            admin_users: Default::default(),
            admin_queue_full: AtomicU64::new(0),
            admin_timeouts: AtomicU64::new(0),
            admin_unauthorized: AtomicU64::new(0),
        }
    }

    /// Makes pushes and kicks possible (the I/O core has started). Only the first call counts.
    pub fn set_pusher(&self, pusher: Pusher) {
        let _ = self.pusher.set(pusher);
    }

    /// The handle to the shards, once the I/O core runs; `None` at durability `memory`.
    pub fn pusher(&self) -> Option<&Pusher> {
        self.pusher.get()
    }

    /// Installs the shards' admin queues (the runtime, before the shards start). Only the
    /// first call counts.
    pub fn set_admin(&self, queues: Arc<AdminQueues>) {
        let _ = self.admin.set(queues);
    }

    /// The shards' admin queues, once the runtime created them.
    pub fn admin(&self) -> Option<&Arc<AdminQueues>> {
        self.admin.get()
    }

    /// Installs the TLS certificate (start-up). Only the first call counts.
    pub fn set_tls(&self, certs: Arc<Certs>) {
        let _ = self.tls.set(certs);
    }

    /// The TLS certificate, when TLS listeners are configured.
    pub fn tls(&self) -> Option<&Arc<Certs>> {
        self.tls.get()
    }

    /// Records the WebSocket listener's bound address (start-up). Only the first call counts.
    pub fn set_ws_addr(&self, addr: SocketAddr) {
        let _ = self.ws_addr.set(addr);
    }

    /// The WebSocket listener's bound address, once bound.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr.get().copied()
    }

    pub fn start_drain(&self) {
        self.drain.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.drain.load(Ordering::Acquire)
    }

    pub fn shard_ready(&self) {
        self.shards_ready.fetch_add(1, Ordering::AcqRel);
    }

    /// One more backend to wait for; `backend_ready` releases it.
    pub fn backend_pending(&self) {
        self.backends_pending.fetch_add(1, Ordering::AcqRel);
    }

    pub fn backend_ready(&self) {
        let before = self.backends_pending.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "backend_ready without backend_pending");
    }

    /// Whether a backend that clients need is not ready yet.
    pub fn waiting_for_backends(&self) -> bool {
        self.backends_pending.load(Ordering::Acquire) > 0
    }

    /// Ready: every shard is serving, every backend is ready and no drain has started.
    pub fn ready(&self) -> bool {
        !self.draining()
            && !self.waiting_for_backends()
            && self.shards_ready.load(Ordering::Acquire)
                >= self.shards_total.load(Ordering::Acquire)
    }
}

/// The I/O core's narrow view of the readiness state: the same counter as
/// [`Control::backend_pending`] and [`Control::backend_ready`].
impl Readiness for Control {
    fn backend_pending(&self) {
        Control::backend_pending(self);
    }

    fn backend_ready(&self) {
        Control::backend_ready(self);
    }
}
