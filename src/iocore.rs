//! The I/O core: one dedicated thread (pinned to the core the shards leave free) running a
//! tokio current-thread runtime, the only place that touches the durable store and, later,
//! MySQL, Redis and Kafka (SPEC 2).
//!
//! Shards never block on it. They push commands into one bounded lock-free queue and return at
//! once; a full queue is an explicit refusal that the shard turns into `overloaded`. The I/O
//! thread drains up to `batch_max` commands, applies every write among them with one durable
//! commit (group commit: one fsync per batch), answers the reads, and pushes each completion
//! into its shard's bounded completion queue, waking the shard through a socket pair (one byte
//! per wake-up, only when the shard is not already awake).

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::protocol::Str;
use crate::store::{Backend, GroupPage, GroupRef, InboxPage, Op, OpResult, StoreError, UserRef};

/// What a shard asks of the I/O core.
#[derive(Debug)]
pub enum IoRequest {
    /// Writes, applied atomically with the batch's one durable commit.
    Apply(Vec<Op>),
    /// A page of a user's inbox after `after`.
    ReadInbox {
        user: UserRef,
        after: u64,
        limit: u32,
    },
    /// The stored cursor of one device.
    Cursor { user: UserRef, device: Str },
    /// A page of a group's timeline for one of its members: after `after`, or after the
    /// member's stored group cursor when `after` is 0. A non-member gets `Ok(None)`.
    ReadGroup {
        /// Boxed: keeps [`IoCmd`] small (the queue holds it by value).
        member: Box<UserRef>,
        group: Str,
        after: u64,
        limit: u32,
    },
    /// The user's groups whose timeline has messages after the user's group cursor.
    UnreadGroups { user: UserRef },
    /// Every member of a group (at most the store's group size bound), to reload a group.
    GroupMembers { group: GroupRef },
    /// The groups a user is a member of, to reload a member's side after a restart.
    UserGroups { user: UserRef },
}

/// The I/O core's answer.
#[derive(Debug)]
pub enum IoReply {
    Applied(Result<Vec<OpResult>, String>),
    Inbox(Result<InboxPage, String>),
    Cursor(Result<u64, String>),
    /// The cursor the page starts after, and the page; `None`: not a member of the group.
    Group(Result<Option<(u64, GroupPage)>, String>),
    /// Group ids (unread groups, or a user's groups).
    Groups(Result<Vec<Str>, String>),
    /// Member ids of one group.
    Members(Result<Vec<Str>, String>),
}

#[derive(Debug)]
pub struct IoCmd {
    pub shard: u16,
    pub token: u64,
    pub req: IoRequest,
}

#[derive(Debug)]
pub struct IoDone {
    pub token: u64,
    pub reply: IoReply,
}

/// Bounds and knobs of the I/O core.
#[derive(Clone, Debug)]
pub struct IoConfig {
    /// Commands waiting for the I/O core, all shards together.
    pub queue_depth: usize,
    /// Commands per batch (one durable commit per batch).
    pub batch_max: usize,
    /// Test-only: sleep this long before each commit, to simulate a slow disk.
    pub commit_delay_ms: u64,
}

/// Counters of the I/O core, read by /metrics.
#[derive(Debug, Default)]
pub struct IoStats {
    pub batches: AtomicU64,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    /// Commit latency sum (µs) and count, for the average.
    pub commit_us_sum: AtomicU64,
    pub queue_depth: AtomicU64,
    /// When a failed commit was last logged (ms since the epoch): during an outage every
    /// batch fails, so failures are logged at most once a second (the count is in `errors`).
    last_error_log_ms: AtomicU64,
}

/// The shard's end: submit commands, take completions.
pub struct IoPort {
    pub shard: u16,
    inbound: Arc<ArrayQueue<IoCmd>>,
    io_wake: Arc<tokio::sync::Notify>,
    done: Arc<ArrayQueue<IoDone>>,
    /// Set by the I/O core when it has written a wake-up byte not yet consumed.
    notified: Arc<AtomicBool>,
    /// The shard's end of the wake-up socket pair (the runtime wraps it in a glommio stream).
    pub wake_reader: Option<UnixStream>,
    pub stats: Arc<IoStats>,
}

impl IoPort {
    /// Queues a command; `Err` gives it back when the I/O queue is full.
    pub fn submit(&self, cmd: IoCmd) -> Result<(), IoCmd> {
        self.inbound.push(cmd)?;
        self.stats
            .queue_depth
            .store(self.inbound.len() as u64, Ordering::Relaxed);
        self.io_wake.notify_one();
        Ok(())
    }

    /// Takes the completions that arrived. Call after the wake-up byte was read: the flag is
    /// cleared first, so a completion pushed meanwhile sends a new byte.
    pub fn take_done(&self, out: &mut Vec<IoDone>) {
        self.notified.store(false, Ordering::Release);
        while let Some(d) = self.done.pop() {
            out.push(d);
        }
    }
}

struct ShardLink {
    done: Arc<ArrayQueue<IoDone>>,
    notified: Arc<AtomicBool>,
    wake_writer: UnixStream,
}

/// A running I/O core.
pub struct IoCore {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    io_wake: Arc<tokio::sync::Notify>,
    pub stats: Arc<IoStats>,
}

/// Opens the backend on the I/O core's runtime (a network backend's connections live there).
pub type BackendOpener = Box<
    dyn FnOnce() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Box<dyn Backend>, StoreError>>>,
        > + Send,
>;

/// Why the I/O core did not start.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum IoStartError {
    /// The thread, its runtime or a wake-up socket could not be created.
    #[error("starting the I/O core: {0}")]
    Io(#[from] std::io::Error),
    /// The durable store could not be opened (or migrated).
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
}

impl IoCore {
    /// Starts the I/O thread over `backend`; returns one port per shard.
    pub fn start(
        backend: Box<dyn Backend>,
        cfg: IoConfig,
        shards: usize,
        cpu: Option<usize>,
    ) -> Result<(IoCore, Vec<IoPort>), IoStartError> {
        Self::start_with(
            Box::new(move || Box::pin(async move { Ok(backend) })),
            cfg,
            shards,
            cpu,
        )
    }

    /// Starts the I/O thread, opens the backend on it with `open` and returns one port per
    /// shard once it is open (or the error that stopped it).
    pub fn start_with(
        open: BackendOpener,
        cfg: IoConfig,
        shards: usize,
        cpu: Option<usize>,
    ) -> Result<(IoCore, Vec<IoPort>), IoStartError> {
        let inbound = Arc::new(ArrayQueue::new(cfg.queue_depth.max(1)));
        let io_wake = Arc::new(tokio::sync::Notify::new());
        let stats = Arc::new(IoStats::default());
        let mut ports = Vec::with_capacity(shards);
        let mut links = Vec::with_capacity(shards);
        for i in 0..shards {
            let (reader, writer) = UnixStream::pair()?;
            reader.set_nonblocking(true)?;
            writer.set_nonblocking(true)?;
            // Completions per shard never exceed the commands in flight, which the inbound
            // bound caps: the completion queue cannot overflow.
            let done = Arc::new(ArrayQueue::new(cfg.queue_depth.max(1)));
            let notified = Arc::new(AtomicBool::new(false));
            ports.push(IoPort {
                shard: i as u16,
                inbound: inbound.clone(),
                io_wake: io_wake.clone(),
                done: done.clone(),
                notified: notified.clone(),
                wake_reader: Some(reader),
                stats: stats.clone(),
            });
            links.push(ShardLink {
                done,
                notified,
                wake_writer: writer,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, wake2, stats2) = (stop.clone(), io_wake.clone(), stats.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), IoStartError>>(1);
        let thread = std::thread::Builder::new()
            .name("imgw-io".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .enable_io()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let backend = match open().await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    io_loop(backend, cfg, inbound, links, wake2, stop2, stats2).await;
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(IoStartError::Io(std::io::Error::other(
                    "the I/O core stopped while starting",
                )));
            }
        }
        Ok((
            IoCore {
                thread: Some(thread),
                stop,
                io_wake,
                stats,
            },
            ports,
        ))
    }

    /// Finishes the commands already queued, then stops the thread.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        self.io_wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for IoCore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.io_wake.notify_one();
    }
}

/// Pins the calling thread to `cpu`; best effort (an unpinned I/O core still works).
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            tracing::warn!(cpu, error = %e, "could not pin the I/O core");
        }
    }
}

async fn io_loop(
    mut backend: Box<dyn Backend>,
    cfg: IoConfig,
    inbound: Arc<ArrayQueue<IoCmd>>,
    links: Vec<ShardLink>,
    wake: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    stats: Arc<IoStats>,
) {
    let mut batch: Vec<IoCmd> = Vec::with_capacity(cfg.batch_max);
    loop {
        while batch.len() < cfg.batch_max {
            match inbound.pop() {
                Some(c) => batch.push(c),
                None => break,
            }
        }
        if batch.is_empty() {
            if stop.load(Ordering::Acquire) {
                return;
            }
            // Re-check after registering interest so a push between pop and wait is not lost.
            let notified = wake.notified();
            if inbound.is_empty() && !stop.load(Ordering::Acquire) {
                notified.await;
            }
            continue;
        }
        stats
            .queue_depth
            .store(inbound.len() as u64, Ordering::Relaxed);
        run_batch(&mut *backend, &cfg, &mut batch, &links, &stats).await;
    }
}

async fn run_batch(
    backend: &mut dyn Backend,
    cfg: &IoConfig,
    batch: &mut Vec<IoCmd>,
    links: &[ShardLink],
    stats: &IoStats,
) {
    // Every write of the batch in one apply: one durable commit.
    let mut ops = Vec::new();
    let mut spans = Vec::new();
    for cmd in batch.iter_mut() {
        if let IoRequest::Apply(o) = &mut cmd.req {
            spans.push(o.len());
            ops.append(o);
        }
    }
    let mut applied: Option<Result<std::vec::IntoIter<OpResult>, String>> = None;
    if !spans.is_empty() {
        if cfg.commit_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(cfg.commit_delay_ms)).await;
        }
        let started = std::time::Instant::now();
        let n = ops.len() as u64;
        let r = backend.apply(ops, now_ms()).await;
        stats
            .commit_us_sum
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(n, Ordering::Relaxed);
        applied = Some(match r {
            Ok(results) => Ok(results.into_iter()),
            Err(e) => {
                let failed = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                let now = now_ms();
                if now.saturating_sub(stats.last_error_log_ms.load(Ordering::Relaxed)) >= 1_000 {
                    stats.last_error_log_ms.store(now, Ordering::Relaxed);
                    tracing::error!(error = %e, failed_batches_so_far = failed, "store commit failed");
                }
                Err(e.to_string())
            }
        });
    }
    let mut spans = spans.into_iter();
    let mut woken = vec![false; links.len()];
    for cmd in batch.drain(..) {
        let reply = match cmd.req {
            IoRequest::Apply(_) => {
                let n = spans.next().unwrap_or(0);
                match &mut applied {
                    Some(Ok(it)) => IoReply::Applied(Ok(it.by_ref().take(n).collect())),
                    Some(Err(e)) => IoReply::Applied(Err(e.clone())),
                    None => IoReply::Applied(Err("internal: no apply".into())),
                }
            }
            IoRequest::ReadInbox { user, after, limit } => IoReply::Inbox(
                backend
                    .read_inbox(&user, after, limit)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            IoRequest::Cursor { user, device } => IoReply::Cursor(
                backend
                    .cursor(&user, &device)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            IoRequest::ReadGroup {
                member,
                group,
                after,
                limit,
            } => IoReply::Group(
                read_group_for(backend, &member, group, after, limit)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            IoRequest::UnreadGroups { user } => IoReply::Groups(
                unread_groups(backend, &user)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            IoRequest::GroupMembers { group } => IoReply::Members(
                all_members(backend, &group)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            IoRequest::UserGroups { user } => {
                IoReply::Groups(backend.user_groups(&user).await.map_err(|e| e.to_string()))
            }
        };
        let Some(link) = links.get(usize::from(cmd.shard)) else {
            continue;
        };
        let mut done = IoDone {
            token: cmd.token,
            reply,
        };
        // Cannot stay full (see IoCore::start); if it ever does, wait for the shard.
        while let Err(back) = link.done.push(done) {
            done = back;
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        woken[usize::from(cmd.shard)] = true;
    }
    for (i, link) in links.iter().enumerate() {
        if woken[i] && !link.notified.swap(true, Ordering::AcqRel) {
            // A full socket buffer means unread wake-ups are pending: that is enough.
            let _ = (&link.wake_writer).write(&[1]);
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A member's page of a group timeline (`None` for a non-member), each message's
/// `inbox_seq` set to its `gseq`.
async fn read_group_for(
    backend: &mut dyn Backend,
    member: &UserRef,
    group: Str,
    after: u64,
    limit: u32,
) -> Result<Option<(u64, GroupPage)>, crate::store::StoreError> {
    // The user's groups are bounded (`max_groups_per_user`): a member check without a
    // dedicated store call.
    if !backend.user_groups(member).await?.contains(&group) {
        return Ok(None);
    }
    let g = GroupRef {
        tenant: member.tenant.clone(),
        group,
    };
    let after = if after == 0 {
        backend.group_cursor(&g, &member.user).await?
    } else {
        after
    };
    let mut page = backend.read_group(&g, after, limit).await?;
    for e in &mut page.messages {
        e.deliver.inbox_seq = e.gseq;
        e.deliver.to = Some(crate::protocol::Target::Group(g.group.clone()));
    }
    Ok(Some((after, page)))
}

/// The user's groups with messages after the user's group cursor (at most
/// `max_groups_per_user`, two point reads each).
async fn unread_groups(
    backend: &mut dyn Backend,
    user: &UserRef,
) -> Result<Vec<Str>, crate::store::StoreError> {
    let mut out = Vec::new();
    for group in backend.user_groups(user).await? {
        let g = GroupRef {
            tenant: user.tenant.clone(),
            group,
        };
        if backend.last_group_seq(&g).await? > backend.group_cursor(&g, &user.user).await? {
            out.push(g.group);
        }
    }
    Ok(out)
}

/// Every member of `group`, page by page (the store bounds a group's size).
async fn all_members(
    backend: &mut dyn Backend,
    group: &GroupRef,
) -> Result<Vec<Str>, crate::store::StoreError> {
    let mut out: Vec<Str> = Vec::new();
    loop {
        let page = backend
            .group_members(group, out.last().map(|s| &**s), u32::MAX)
            .await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}
