//! The only glommio-aware layer: one pinned executor per shard, its listeners, the
//! connection driver that moves bytes between sockets and the sans-IO [`Shard`]
//! ([`driver`]: one epoll set and one task per shard, not a task per connection), the bounded
//! channel mesh between shards, and one sweep timer per shard.
//!
//! Per connection the runtime holds a socket and a few bits of readiness; it reads into one
//! scratch buffer per shard, so an idle connection owns no read buffer. Output the shard
//! produced for a connection is written in one `send` per driver pass, which coalesces every
//! frame that became due meanwhile.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::{GlommioError, LocalExecutorBuilder, Placement, ResourceType};

use crate::auth::Authenticator;
use crate::config::{Config, Durability};
use crate::control::Control;
use crate::iocore::{IoConfig, IoCore, IoPort};
use crate::metrics::Metrics;
use crate::shard::{Batch, Clock, Shard, Transport};
use crate::tls::{Certs, ShardTls};

mod driver;
mod io;
use driver::{Driver, Listener};

/// Outbox batches the flusher ships per wake-up before yielding to other tasks.
const MAX_ROUNDS_PER_POLL: usize = 16;

/// Why the gateway could not run.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The configuration is unusable (auth keys, limits).
    #[error("configuration: {0}")]
    Config(String),
    /// An executor could not be created (io_uring missing, memlock too low, bad CPU).
    #[error("starting shard {shard}: {detail}")]
    Executor { shard: usize, detail: String },
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A shard stopped with an error.
    #[error("shard {shard} failed: {detail}")]
    Shard { shard: usize, detail: String },
}

/// Runs the gateway until a drain completes. Blocks the calling thread.
pub fn run(
    mut cfg: Config,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
) -> Result<(), RuntimeError> {
    let shards = cfg.shard_count();
    join_cluster(&mut cfg)?;
    let auth = Arc::new(
        Authenticator::from_config(&cfg.auth).map_err(|e| RuntimeError::Config(e.to_string()))?,
    );
    // Bind once here so a bad address fails fast with a clear error; each shard then binds
    // its own SO_REUSEPORT socket on the same address. Port 0 becomes the port the kernel
    // chose, held by a bound socket that does not listen (so it takes no connections) until
    // the gateway stops, so no other process gets it meanwhile.
    let mut reserved = Vec::new();
    let backlog = cfg.server.backlog;
    let server = &mut cfg.server;
    let share = server.share_ports;
    let tls_addrs = [server.wss_listen.as_mut(), server.tls_listen.as_mut()];
    let addrs = [Some(&mut server.ws_listen), Some(&mut server.tcp_listen)];
    for addr in addrs.into_iter().chain(tls_addrs).flatten() {
        let bound = if addr.port() == 0 {
            reserve_port(*addr).map(|(sock, at)| {
                reserved.push(sock);
                at
            })
        } else if share {
            bind_listener(*addr, backlog).map(|_| *addr)
        } else {
            claim_port(*addr)
                .and_then(|()| bind_listener(*addr, backlog))
                .map(|_| *addr)
        };
        match bound {
            Ok(at) => *addr = at,
            Err(source) => {
                return Err(RuntimeError::Bind {
                    addr: *addr,
                    source,
                })
            }
        }
    }
    control.set_ws_addr(cfg.server.ws_listen);
    if let Some(path) = &cfg.server.ports_file {
        write_ports_file(path, &cfg.server)
            .map_err(|e| RuntimeError::Config(format!("ports file {}: {e}", path.display())))?;
    }
    // Durability `local`: the I/O core owns the store; shards reach it through ports.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Durability `backend`: the same, over the MySQL store (send_ack after its commit).
    let (io_core, ports) = if matches!(
        cfg.server.durability,
        Durability::Local | Durability::Backend
    ) {
        let store_cfg = cfg.clone();
        let open: crate::iocore::BackendOpener =
            Box::new(move || Box::pin(async move { crate::store::open(&store_cfg).await }));
        let io_cfg = IoConfig {
            queue_depth: cfg.store.queue_depth as usize,
            batch_max: cfg.store.batch_max as usize,
            commit_delay_ms: cfg.store.commit_delay_ms,
            services: services(&cfg, &control),
        };
        // The I/O core takes the core after the shards', when there is one.
        let cpu = (cfg.runtime.pin && shards < cpus).then_some(shards);
        let (core, ports) = IoCore::start_with(open, io_cfg, shards, cpu)
            .map_err(|e| RuntimeError::Config(e.to_string()))?;
        let _ = metrics.io.set(core.stats.clone());
        control.set_pusher(core.pusher());
        (Some(core), ports.into_iter().map(Some).collect())
    } else {
        (None, (0..shards).map(|_| None).collect())
    };
    let ports: Arc<std::sync::Mutex<Vec<Option<IoPort>>>> = Arc::new(std::sync::Mutex::new(ports));
    // The admin API's way into the shards, at every durability (src/shard/admin.rs).
    let max_body = cfg.ws.max_message_bytes as usize;
    let queues = crate::shard::admin::AdminQueues::new(shards, max_body)
        .with_node(cfg.cluster.node_id.clone());
    control.set_admin(Arc::new(queues));
    let certs = tls_certs(&cfg, &control)?;
    let cfg = Arc::new(cfg);
    let mesh: MeshBuilder<Batch, _> =
        MeshBuilder::full(shards, cfg.limits.shard_channel_batches as usize);
    let mut handles = Vec::with_capacity(shards);
    for i in 0..shards {
        // Shards take cores 0..n; the I/O core (when it exists) takes the last one.
        let placement = if cfg.runtime.pin && i < cpus {
            Placement::Fixed(i)
        } else {
            Placement::Unbound
        };
        let (cfg, auth, metrics, control, mesh, ports, certs) = (
            cfg.clone(),
            auth.clone(),
            metrics.clone(),
            control.clone(),
            mesh.clone(),
            ports.clone(),
            certs.clone(),
        );
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("imgw-shard-{i}"))
            .io_memory(cfg.runtime.io_memory_kib * 1024)
            .ring_depth(cfg.runtime.ring_depth)
            .spawn(move || async move {
                let links = Links {
                    auth,
                    metrics,
                    control,
                    ports,
                    certs,
                };
                shard_main(i, cfg, links, mesh).await
            })
            .map_err(|e| RuntimeError::Executor {
                shard: i,
                detail: e.to_string(),
            })?;
        handles.push(h);
    }
    let mut first_error = None;
    for (i, h) in handles.into_iter().enumerate() {
        let r = match h.join() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => RuntimeError::Shard {
                shard: i,
                detail: e.to_string(),
            },
        };
        // One shard failing stops the others: start the drain.
        control.start_drain();
        first_error.get_or_insert(r);
    }
    if let Some(core) = io_core {
        // Every shard has stopped: finish what is queued, then stop the I/O core.
        core.shutdown();
    }
    first_error.map_or(Ok(()), Err)
}

/// The TLS listeners' certificate: the one `main` loaded (so that SIGHUP reloads it), or
/// loaded here for a caller that did not; `None` without TLS listeners.
fn tls_certs(cfg: &Config, control: &Control) -> Result<Option<Arc<Certs>>, RuntimeError> {
    if cfg.server.wss_listen.is_none() && cfg.server.tls_listen.is_none() {
        return Ok(None);
    }
    if let Some(c) = control.tls() {
        return Ok(Some(c.clone()));
    }
    let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) else {
        return Err(RuntimeError::Config(
            "TLS listeners need tls.cert_file and tls.key_file".into(),
        ));
    };
    let certs = Arc::new(Certs::load(cert, key).map_err(|e| RuntimeError::Config(e.to_string()))?);
    control.set_tls(certs.clone());
    Ok(Some(certs))
}

/// What a shard shares with the rest of the process.
struct Links {
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    ports: Arc<std::sync::Mutex<Vec<Option<IoPort>>>>,
    certs: Option<Arc<Certs>>,
}

/// Cluster mode: claims this node's slot in Redis before any shard mints a message id (the
/// slot is the node's bits in them), retrying while Redis is unreachable for up to
/// `cluster.dead_after_ms` × 4, and names the node in its session routes.
fn join_cluster(cfg: &mut Config) -> Result<(), RuntimeError> {
    let (Some(id), Some(url)) = (cfg.cluster.node_id.clone(), cfg.redis.url.clone()) else {
        return Ok(());
    };
    let ttl = cfg.cluster.dead_after_ms;
    let timeout = Duration::from_millis(cfg.redis.timeout_ms);
    let deadline = Instant::now() + Duration::from_millis(ttl * 4);
    let prefix = cfg.redis.key_prefix.clone();
    let slot = loop {
        match crate::services::cluster::claim_slot(&url, &prefix, &id, ttl, timeout) {
            Ok(slot) => break slot,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "cluster slot not claimed yet; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(RuntimeError::Config(format!("joining the cluster: {e}"))),
        }
    };
    tracing::info!(node = %id, slot, "cluster slot claimed");
    cfg.cluster.slot = Some(slot);
    cfg.redis.node = id;
    Ok(())
}

/// The services the I/O core runs, from the configuration.
fn services(cfg: &Config, control: &Arc<Control>) -> crate::iocore::Services {
    let node = if cfg.redis.node.is_empty() {
        cfg.server.ws_listen.to_string()
    } else {
        cfg.redis.node.clone()
    };
    let info = format!("ws={} tcp={}", cfg.server.ws_listen, cfg.server.tcp_listen);
    crate::iocore::Services {
        redis: cfg.redis.url.is_some().then(|| (cfg.redis.clone(), node)),
        kafka: cfg.kafka.brokers.is_some().then(|| cfg.kafka.clone()),
        ready: Some(control.clone()),
        kafka_confirms: cfg.server.durability == Durability::Backend,
        dedupe_window_ms: cfg.store.dedupe_window_ms,
        max_push_body: cfg.ws.max_message_bytes as usize,
        cluster: cfg
            .cluster
            .slot
            .is_some()
            .then(|| (cfg.cluster.clone(), info)),
    }
}

/// The origin of every shard's monotonic clock: one per process, so that times stamped on one
/// shard (a batch posted) can be compared on another (the batch handled).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn clock(base: Instant) -> Clock {
    let mono_us = base.elapsed().as_micros() as u64;
    Clock {
        mono_ms: mono_us / 1_000,
        mono_us,
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// A listening socket with SO_REUSEPORT and the configured backlog (glommio's own `bind`
/// fixes the backlog at 1024).
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(sock)
}

/// Fails if any other socket holds `addr`: another process's listener, or its port-0
/// reservation. The shards' listeners set SO_REUSEPORT to share one port among themselves,
/// and the kernel would let a second gateway of the same user join them silently and take
/// a share of the connections: two gateways that know nothing of each other behind one
/// address, each user's devices split between them. A bind without SO_REUSEPORT (with
/// SO_REUSEADDR, so a predecessor's TIME_WAIT connections do not count) finds any of them.
fn claim_port(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(
                e.kind(),
                "already in use by another process (imgw shares a port only among its own shards)",
            )
        } else {
            e
        }
    })
}

/// A socket bound (not listening) to `addr` with port 0, with SO_REUSEPORT so that the
/// shards' listeners can bind the same port: the address the kernel chose.
fn reserve_port(addr: SocketAddr) -> std::io::Result<(socket2::Socket, SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    let at = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((sock, at))
}

/// The listeners' bound addresses, as `--ports-file` holds them:
/// `{"ws":ADDR,"tcp":ADDR,"admin":ADDR}`, with `"wss"` and `"tls"` when those listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ports {
    pub ws: SocketAddr,
    pub tcp: SocketAddr,
    pub admin: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wss: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SocketAddr>,
}

impl Ports {
    /// Reads a ports file: `None` while it does not exist (it is written whole, by a rename).
    pub fn read(path: &std::path::Path) -> Option<Ports> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }
}

/// Writes the ports file to a temporary file and renames it, so that a reader never sees half
/// of it.
fn write_ports_file(
    path: &std::path::Path,
    s: &crate::config::ServerConfig,
) -> std::io::Result<()> {
    let ports = Ports {
        ws: s.ws_listen,
        tcp: s.tcp_listen,
        admin: s.admin_listen,
        wss: s.wss_listen,
        tls: s.tls_listen,
    };
    let json = serde_json::to_string(&ports).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{json}\n"))?;
    std::fs::rename(&tmp, path)
}

fn std_listener(addr: SocketAddr, backlog: u32) -> Result<std::net::TcpListener, RuntimeError> {
    let sock =
        bind_listener(addr, backlog).map_err(|source| RuntimeError::Bind { addr, source })?;
    Ok(sock.into())
}

async fn shard_main(
    index: usize,
    cfg: Arc<Config>,
    links: Links,
    mesh: MeshBuilder<Batch, glommio::channels::channel_mesh::Full>,
) -> Result<(), RuntimeError> {
    let Links {
        auth,
        metrics,
        control,
        ports,
        certs,
    } = links;
    let (senders, mut receivers) = mesh.join().await.map_err(|_| RuntimeError::Shard {
        shard: index,
        detail: "joining the shard mesh failed".into(),
    })?;
    // The mesh numbers peers in join order: that is the shard index routing uses.
    let id = senders.peer_id();
    let base = epoch();
    let shards = senders.nr_consumers();
    let mut port = ports
        .lock()
        .map_err(|_| RuntimeError::Shard {
            shard: id,
            detail: "I/O port table poisoned".into(),
        })?
        .get_mut(id)
        .and_then(Option::take);
    let wake_reader = port.as_mut().and_then(|p| p.wake_reader.take());
    let shard = Rc::new(RefCell::new(Shard::new(
        id,
        shards,
        cfg.clone(),
        auth,
        metrics.clone(),
        port,
        clock(base),
    )));
    let mids = crate::ids::MidMint::open(
        &cfg.server.data_dir,
        id,
        cfg.cluster.slot,
        clock(base).unix_ms,
    )
    .map_err(|e| RuntimeError::Shard {
        shard: id,
        detail: format!(
            "message id lease in {}: {e} (a garbled mids-{id}.lease may be removed: ids then \
             restart from the clock)",
            cfg.server.data_dir.display()
        ),
    })?;
    shard.borrow_mut().set_mid_mint(mids);
    let io_task = wake_reader.map(|r| glommio::spawn_local(io_completions(shard.clone(), r, base)));
    let tls = certs.map(|c| Rc::new(RefCell::new(ShardTls::new(c))));
    let s = &cfg.server;
    let listeners = [
        (Some(s.ws_listen), Transport::Ws, None),
        (Some(s.tcp_listen), Transport::Tcp, None),
        (s.wss_listen, Transport::Ws, tls.clone()),
        (s.tls_listen, Transport::Tcp, tls),
    ];
    let mut bound = Vec::new();
    for (addr, transport, tls) in listeners {
        let Some(addr) = addr else { continue };
        bound.push(Listener {
            socket: std_listener(addr, s.backlog)?,
            transport,
            tls,
        });
    }
    let driver = Driver::new(
        shard.clone(),
        bound,
        cfg.limits.max_lingering_closes as usize,
        cfg.runtime.poll_within_pass_us,
        metrics.clone(),
        base,
    )
    .map_err(|e| RuntimeError::Shard {
        shard: id,
        detail: format!("creating the connection set: {e}"),
    })?;
    let driver = glommio::spawn_local(driver.run());

    let senders = Rc::new(senders);
    let mut receiver_tasks = Vec::new();
    for (_peer, rx) in receivers.streams() {
        let shard = shard.clone();
        receiver_tasks.push(glommio::spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                shard.borrow_mut().on_batch(batch, clock(base));
            }
        }));
    }
    let flusher = glommio::spawn_local(flush_loop(shard.clone(), senders.clone(), base));
    control.shard_ready();
    tracing::info!(shard = id, shards, "shard serving");

    // The sweep timer: one per shard, for every connection's deadlines.
    let tick = Duration::from_millis(cfg.runtime.tick_ms);
    loop {
        glommio::timer::sleep(tick).await;
        let clk = clock(base);
        let mut s = shard.borrow_mut();
        s.tick(clk);
        if let Some(admin) = control.admin() {
            // Bounded by the queue's depth: the admin thread cannot add faster than this
            // drains, since every command it adds was counted against ADMIN_QUEUE_DEPTH.
            for _ in 0..crate::shard::admin::ADMIN_QUEUE_DEPTH {
                let Some(cmd) = admin.pop(id) else { break };
                s.on_admin(cmd, &admin.stats, clk);
            }
        }
        if control.draining() && !s.is_draining() {
            tracing::info!(shard = id, connections = s.connections(), "draining");
            s.start_drain(clk);
            // The driver closes its listeners on its next pass.
            s.wake_driver();
        }
        if s.drained(clk) && !s.has_outbox() {
            break;
        }
    }
    drop(driver);
    drop(io_task);
    drop(flusher);
    drop(receiver_tasks);
    senders.close();
    tracing::info!(shard = id, "shard stopped");
    Ok(())
}

/// Takes the I/O core's completions whenever it writes a wake-up byte.
async fn io_completions(
    shard: Rc<RefCell<Shard>>,
    reader: std::os::unix::net::UnixStream,
    base: Instant,
) {
    use futures_lite::AsyncReadExt;
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = reader.into_raw_fd();
    // SAFETY: `fd` is our end of a socket pair whose ownership `into_raw_fd` released; the
    // glommio stream becomes its only owner.
    #[allow(unsafe_code)]
    let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(fd) };
    let mut buf = [0u8; 64];
    let mut done = Vec::new();
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut s = shard.borrow_mut();
        if let Some(io) = s.io_port() {
            io.take_done(&mut done);
        }
        let clk = clock(base);
        for d in done.drain(..) {
            s.on_io_done(d, clk);
        }
    }
}

/// Ships outbox batches: the local queue straight into our own shard, the others through
/// the bounded mesh with `try_send` (a full channel keeps the batch for the next round; the
/// shard sheds new work once its outbox bound is reached, so nothing ever blocks).
async fn flush_loop(shard: Rc<RefCell<Shard>>, senders: Rc<Senders<Batch>>, base: Instant) {
    loop {
        poll_fn(|cx| {
            let mut s = shard.borrow_mut();
            if s.has_outbox() {
                return Poll::Ready(());
            }
            s.set_outbox_waker(cx.waker());
            Poll::Pending
        })
        .await;
        let mut blocked = false;
        for _ in 0..MAX_ROUNDS_PER_POLL {
            let (me, n) = {
                let s = shard.borrow();
                (s.id, s.shard_count())
            };
            // Local messages first, processed in arrival order.
            {
                let mut s = shard.borrow_mut();
                if s.has_local_batch() {
                    s.run_local(clock(base), 1);
                }
            }
            for dest in (0..n).filter(|d| *d != me) {
                let batch = shard.borrow_mut().take_batch(dest);
                if batch.msgs.is_empty() {
                    continue;
                }
                match senders.try_send_to(dest, batch) {
                    Ok(()) => {}
                    Err(GlommioError::WouldBlock(ResourceType::Channel(batch))) => {
                        shard.borrow_mut().return_batch(dest, batch);
                        blocked = true;
                    }
                    Err(e) => {
                        tracing::warn!(dest, error = %e, "shard channel closed; batch dropped");
                    }
                }
            }
            if blocked || !shard.borrow().has_outbox() {
                break;
            }
        }
        if blocked {
            // The peer drains its channel continuously; retry shortly.
            glommio::timer::sleep(Duration::from_millis(1)).await;
        } else {
            glommio::executor().yield_if_needed().await;
        }
    }
}
