//! The durable store: inboxes, group timelines, cursors, group membership and the send dedupe
//! records, behind the object-safe [`Backend`] trait.
//!
//! This module owns the persistent state of SPEC 4 and 6: every user's inbox with its gapless
//! `inbox_seq`, every device's cursor, every group's timeline (`gseq`), member list and
//! per-member cursors, and the `(tenant, sender, cmid)` dedupe window. [`LogStore`] is the
//! embedded implementation (durability `local`: records in an append-only log, [`log`], indexed
//! in memory; its measurement is in docs/STORE.md), [`MySqlStore`] the MySQL one. What an
//! [`Op`] does (seqs, trimming, dedupe, cursors, groups and their limits, refusals) is stated
//! once in [`rules`], which both call.
//!
//! It knows nothing of sockets, shards or glommio. The gateway's I/O core is a single thread
//! that owns one [`Backend`], batches the commands of the shards and awaits
//! [`Backend::apply`] for each batch: one atomic, durable commit per batch (group commit).

mod keys;
pub mod log;
mod logstore;
mod mysql;
pub mod rules;
#[cfg(test)]
mod tests;

pub use logstore::{LogStore, LogStoreOptions};
pub use mysql::{testdb as mysql_testdb, MySqlOptions, MySqlStore, MYSQL_MAX_ID_BYTES};
pub use rules::Limits;

use std::future::Future;
use std::pin::Pin;

use crate::codec::CodecId;
use crate::protocol::{Deliver, Envelope, Message, Str};

/// The limits of a store (from the gateway's configuration: [`store_options`]). Every table's
/// bound derives from these (docs/STORE.md, "Bounds").
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a (tenant, sender, cmid, destination) is remembered for dedupe; 0 disables
    /// dedupe (no records written).
    pub dedupe_window_ms: u64,
    /// Messages kept per inbox: appending seq `s` deletes seq `s - inbox_keep`.
    pub inbox_keep: u64,
    /// Messages kept per group timeline.
    pub group_keep: u64,
    /// Device cursors kept per user; a new device past this evicts the lowest cursor.
    pub max_devices_per_user: u32,
    /// Groups one user may be a member of ([`Refusal::TooManyGroups`] past it).
    pub max_groups_per_user: u32,
    /// Members of one group ([`Refusal::GroupFull`] past it).
    pub max_group_members: u64,
    /// Largest page [`Backend::read_inbox`], [`Backend::read_group`] and
    /// [`Backend::group_members`] return.
    pub max_page: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dedupe_window_ms: 5 * 60 * 1000,
            inbox_keep: 10_000,
            group_keep: 10_000,
            max_devices_per_user: 32,
            max_groups_per_user: 1_000,
            max_group_members: 100_000,
            max_page: 1_000,
        }
    }
}

impl StoreOptions {
    /// The limits the store rules enforce ([`rules::apply_op`]).
    pub fn limits(&self) -> Limits {
        Limits {
            dedupe_window_ms: self.dedupe_window_ms,
            inbox_keep: self.inbox_keep.max(1),
            group_keep: self.group_keep.max(1),
            max_devices_per_user: self.max_devices_per_user.max(1),
            max_groups_per_user: self.max_groups_per_user,
            max_group_members: self.max_group_members,
        }
    }
}

/// A user, scoped by tenant (nothing crosses tenants).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserRef {
    pub tenant: Str,
    pub user: Str,
}

impl UserRef {
    pub fn new(tenant: impl Into<Str>, user: impl Into<Str>) -> Self {
        UserRef {
            tenant: tenant.into(),
            user: user.into(),
        }
    }
}

/// A group, scoped by tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupRef {
    pub tenant: Str,
    pub group: Str,
}

impl GroupRef {
    pub fn new(tenant: impl Into<Str>, group: impl Into<Str>) -> Self {
        GroupRef {
            tenant: tenant.into(),
            group: group.into(),
        }
    }
}

/// One write of a batch handed to [`Backend::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Appends a message to a user's inbox. The store assigns the user's next `inbox_seq`
    /// (gapless per (tenant, user), from 1, continuing after a restart); `deliver.inbox_seq` is
    /// ignored and `deliver.mid`/`deliver.ts` are stored as given.
    ///
    /// Dedupe: if the same (tenant, `sender`, `cmid`) was appended to the same inbox within the
    /// dedupe window, nothing is appended and the original seq, mid and ts are returned with
    /// `duplicate: true`. The destination is part of the key so that one send written to two
    /// inboxes (the recipient's, and the sender's own for its other devices) is two records.
    AppendInbox {
        user: UserRef,
        sender: Str,
        cmid: Str,
        deliver: Deliver,
    },
    /// Appends a message to a group's timeline: gapless `gseq` per group, same dedupe rule
    /// (the group is the destination). Membership of `sender` is the caller's check.
    AppendGroup {
        group: GroupRef,
        sender: Str,
        cmid: Str,
        deliver: Deliver,
    },
    /// Moves a device's inbox cursor forward. Never moves backwards, never past the inbox's last
    /// seq. Result: [`OpResult::Cursor`] with the cursor after the op.
    SetCursor {
        user: UserRef,
        device: Str,
        seq: u64,
    },
    /// Moves a member's group cursor forward (same rules, bounded by the group's last gseq).
    /// Refused with [`Refusal::NotMember`] for a non-member.
    SetGroupCursor {
        group: GroupRef,
        member: Str,
        gseq: u64,
    },
    /// Adds a member. A new member's group cursor starts at the group's current gseq: it sees
    /// the messages sent after it joined. Result: [`OpResult::Membership`].
    Join { group: GroupRef, member: Str },
    /// Removes a member and its group cursor. Result: [`OpResult::Membership`].
    Leave { group: GroupRef, member: Str },
}

/// The outcome of one [`Op`], in the order of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpResult {
    /// The message is in the inbox or timeline under `seq` (`inbox_seq` or `gseq`). With
    /// `duplicate`, it was there already and `seq`, `mid` and `ts` are the original ones.
    Appended {
        seq: u64,
        mid: u64,
        ts: u64,
        duplicate: bool,
    },
    /// The cursor's value after the op.
    Cursor { seq: u64 },
    /// `changed`: the member joined (was not a member) or left (was one). `members`: the
    /// group's member count after the op.
    Membership { changed: bool, members: u64 },
    /// The op was not applied; the rest of the batch was.
    Refused(Refusal),
}

/// Why one op of a batch was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// A tenant, user, group, member, device, sender or cmid is longer than a key can hold
    /// ([`MAX_ID_BYTES`]).
    IdTooLong,
    /// The user is in [`StoreOptions::max_groups_per_user`] groups already.
    TooManyGroups,
    /// The group has [`StoreOptions::max_group_members`] members already.
    GroupFull,
    /// A group cursor was set for someone who is not a member.
    NotMember,
    /// The message could not be encoded for storage.
    Unencodable,
}

/// The longest id (tenant, user, group, member, device, sender, cmid) in bytes.
pub const MAX_ID_BYTES: usize = u16::MAX as usize;

/// Messages of one inbox, ascending by `inbox_seq` (set in each [`Deliver`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboxPage {
    pub messages: Vec<Deliver>,
    /// More messages follow the last one returned.
    pub more: bool,
}

/// One message of a group timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    pub gseq: u64,
    /// As appended (its `inbox_seq` is 0: members' inbox seqs are not the group's).
    pub deliver: Deliver,
}

/// Messages of one group timeline, ascending by `gseq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPage {
    pub messages: Vec<GroupEntry>,
    /// More messages follow the last one returned.
    pub more: bool,
}

/// Why the store failed. A failed [`Backend::apply`] wrote nothing of its batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory could not be created or opened.
    #[error("data directory {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The data directory holds a store of another, incompatible format version.
    #[error("store format version {found}, this build reads version {expected}")]
    Format { found: u32, expected: u32 },
    /// A stored record could not be decoded: the data is damaged (or a bug wrote it).
    #[error("corrupt record in `{table}`: {detail}")]
    Corrupt { table: &'static str, detail: String },
    /// The storage engine failed (I/O error, a lock held by another process). After a failed
    /// durable commit the engine refuses further writes: restart to recover.
    #[error("storage engine: {0}")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The storage is full: no space left on the embedded store's disk (ENOSPC), or the MySQL
    /// server's table or disk is full. Nothing of the batch was written; writes can succeed
    /// again once space is freed (the embedded store after a restart, like [`Self::Engine`]).
    #[error("storage full: {0}")]
    Full(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The backend's settings are unusable (a malformed MySQL URL, pool sizes).
    #[error("store configuration: {0}")]
    Config(String),
    /// A network backend did not answer within its configured deadline (connect or query).
    /// For an `apply`, the transaction was abandoned: the server rolls it back, unless the
    /// deadline passed while its COMMIT was in flight, in which case it may have committed; a
    /// resend of the same cmid is then deduplicated.
    #[error("store did not answer within {ms} ms")]
    Timeout { ms: u64 },
    /// A schema migration of a network backend failed (docs/STORE.md, "MySQL backend").
    #[error("schema migration {version}: {detail}")]
    Migration { version: u32, detail: String },
}

/// A message in the stored form of the embedded and MySQL stores: a Protobuf `Deliver` with
/// `inbox_seq` 0 (the seq is the row's key). `None`: it cannot be encoded.
fn encode_stored(deliver: Deliver) -> Option<Vec<u8>> {
    let mut value = Vec::with_capacity(64 + deliver.body.len());
    let env = Envelope::new(Message::Deliver(Deliver {
        inbox_seq: 0,
        ..deliver
    }));
    CodecId::Protobuf.encode(&env, &mut value).ok()?;
    Some(value)
}

/// A message stored by [`encode_stored`], read from `table`.
fn decode_stored(table: &'static str, v: bytes::Bytes) -> Result<Deliver, StoreError> {
    let corrupt = |detail| StoreError::Corrupt { table, detail };
    match CodecId::Protobuf.decode_bytes(&v) {
        Ok(Envelope {
            msg: Message::Deliver(d),
            ..
        }) => Ok(d),
        Ok(other) => Err(corrupt(format!("not a deliver: {:?}", other.msg.op()))),
        Err(e) => Err(corrupt(e.to_string())),
    }
}

/// The future every [`Backend`] method returns: boxed so that the trait stays object-safe, and
/// `Send` so that a backend may be moved to the I/O core's thread.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A durable store of inboxes, group timelines, cursors and memberships.
///
/// Object-safe and `Send`: the I/O core owns one as `Box<dyn Backend>` on its thread and awaits
/// each call on its tokio runtime. [`EmbeddedStore`] answers with ready futures (its work is
/// synchronous: it blocks the I/O core, which owns nothing else); a network backend awaits the
/// network. Reads see exactly what earlier `apply` calls committed. Callers await one call at a
/// time (`&mut self`).
pub trait Backend: Send {
    /// Applies `ops` atomically with one durable commit before the future completes; the
    /// results are in the order of `ops`. `now_ms` (wall clock) dates the dedupe records. On
    /// `Err` nothing of the batch was applied. A batch that writes nothing (only duplicates,
    /// refusals and no-op cursors) commits nothing.
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> StoreFuture<'_, Vec<OpResult>>;

    /// Messages with `inbox_seq > after_seq`, ascending, at most `limit` (clamped to
    /// `1..=`[`StoreOptions::max_page`]).
    fn read_inbox<'a>(
        &'a mut self,
        user: &'a UserRef,
        after_seq: u64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage>;

    /// The user's last `inbox_seq` (0: nothing appended yet).
    fn last_inbox_seq<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, u64>;

    /// The device's cursor (0: never set).
    fn cursor<'a>(&'a mut self, user: &'a UserRef, device: &'a str) -> StoreFuture<'a, u64>;

    /// Members in byte order, after `after` (exclusive), at most `limit` (clamped like
    /// [`Backend::read_inbox`]): page through a large group.
    fn group_members<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after: Option<&'a str>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<Str>>;

    /// The group's member count.
    fn group_size<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64>;

    /// The groups the user is a member of, in byte order (at most
    /// [`StoreOptions::max_groups_per_user`]).
    fn user_groups<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, Vec<Str>>;

    /// Timeline messages with `gseq > after_gseq`, ascending, at most `limit` (clamped).
    fn read_group<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after_gseq: u64,
        limit: u32,
    ) -> StoreFuture<'a, GroupPage>;

    /// The group's last `gseq` (0: nothing appended yet).
    fn last_group_seq<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64>;

    /// The member's group cursor (0: not a member, or never set and joined before any message).
    fn group_cursor<'a>(&'a mut self, group: &'a GroupRef, member: &'a str)
        -> StoreFuture<'a, u64>;
}

/// The store's limits from the gateway's configuration.
pub fn store_options(cfg: &crate::config::Config) -> StoreOptions {
    let l = &cfg.limits;
    StoreOptions {
        dedupe_window_ms: cfg.store.dedupe_window_ms,
        max_devices_per_user: l.max_devices_per_user,
        max_groups_per_user: l.max_groups_per_user,
        max_group_members: u64::from(l.max_group_members),
        ..StoreOptions::default()
    }
}

/// The MySQL backend's options from the gateway's configuration (`None`: no `mysql.url`).
pub fn mysql_options(cfg: &crate::config::Config) -> Option<MySqlOptions> {
    let m = &cfg.mysql;
    Some(MySqlOptions {
        url: m.url.clone()?,
        pool_min: m.pool_min as usize,
        pool_max: m.pool_max as usize,
        connect_timeout_ms: m.connect_timeout_ms,
        query_timeout_ms: m.query_timeout_ms,
        stmt_cache: m.stmt_cache as usize,
        writers: m.writers.min(m.pool_max) as usize,
        writer_min_ops: m.writer_min_ops as usize,
        store: store_options(cfg),
    })
}

/// Opens the durable store the configuration selects: MySQL for durability `backend` with a
/// `mysql.url`, otherwise the log store under the data directory (`DATA_DIR/log`). Runs on the
/// I/O core's runtime (the MySQL pool lives there).
pub async fn open(cfg: &crate::config::Config) -> Result<Box<dyn Backend>, StoreError> {
    // `backend` with Kafka only: the embedded store, and Kafka confirms (src/iocore.rs).
    let kafka_only = cfg.mysql.url.is_none() && cfg.kafka.brokers.is_some();
    if cfg.server.durability == crate::config::Durability::Backend && !kafka_only {
        let Some(opts) = mysql_options(cfg) else {
            return Err(StoreError::Config(
                "durability `backend` without a backend: set mysql.url (--mysql URL)".into(),
            ));
        };
        return Ok(Box::new(MySqlStore::connect(opts).await?));
    }
    let data = &cfg.server.data_dir;
    refuse_fjall_store(data)?;
    let dir = data.join("log");
    let store = LogStore::open(
        &dir,
        LogStoreOptions {
            store: store_options(cfg),
            ..LogStoreOptions::default()
        },
    )?;
    let o = store.opened();
    tracing::info!(
        dir = %dir.display(),
        records = o.records,
        batches = o.batches,
        torn_batch_records = o.torn_batch_records,
        "store opened"
    );
    if let Some(t) = &o.truncated {
        tracing::warn!("store recovery: {t}");
    }
    Ok(Box::new(store))
}

/// Refuses a data directory that holds the fjall store of earlier builds (`DATA_DIR/store`):
/// this build cannot read it, and starting beside it would look like every message was lost.
fn refuse_fjall_store(data: &std::path::Path) -> Result<(), StoreError> {
    let old = data.join("store");
    let holds_files = std::fs::read_dir(&old)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if holds_files {
        return Err(StoreError::Config(format!(
            "{} holds the fjall store of imgw builds before the log store (issue 13), which this \
             build cannot read: start with an empty --data-dir, or move that directory away. \
             There is no migration command: that format was never in a release of imgw, so no \
             deployment keeps messages in it; a development store starts afresh",
            old.display()
        )));
    }
    Ok(())
}
