//! [`EmbeddedStore`]: the [`Backend`] on fjall, an embedded LSM key-value engine (docs/STORE.md
//! has the measurement that chose it, the key layout and the bounds).
//!
//! Every table is a fjall keyspace of big-endian keys (see [`super::keys`]). A batch is built
//! in an overlay (so later ops of a batch see earlier ones), then written as one fjall write
//! batch that is journaled and `fdatasync`ed before `apply` returns.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::keys::FastState;
use super::keys::{self, DedupeRecord, Dest, FastMap, TooLong};
use super::rules::{self, expired_before, DedupeKey, Limits, Log, StoreTx};
use super::{
    Backend, GroupEntry, GroupPage, GroupRef, InboxPage, Op, OpResult, StoreError, StoreFuture,
    UserRef, MAX_ID_BYTES,
};
use crate::protocol::{Deliver, Str};
use crate::twogen::TwoGen;

/// Version of the key and value layout; bumped on any incompatible change.
const FORMAT: u32 = 2;

/// Format 1 had a `dedupe_expiry` index and collected expired records by deleting them; format
/// 2 drops them in compactions (see [`DedupeTtl`]). A format-1 store is upgraded at open.
const FORMAT_V1: u32 = 1;
const V1_EXPIRY: &str = "dedupe_expiry";

/// `meta` key of the store's clock: the latest `now_ms` of a committed batch (u64). Every
/// dedupe record is stored at or before it.
const CLOCK: &[u8] = b"clock";

/// Tunables and bounds of the embedded store. Every table's bound derives from these
/// (docs/STORE.md, "Bounds").
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
    /// Entries of the in-memory last-seq cache (about 100 bytes each).
    pub seq_cache_entries: usize,
    /// fjall block cache, bytes.
    pub cache_bytes: u64,
    /// fjall journal size before memtables are flushed (at least 64 MiB): bounds the replay
    /// after a crash.
    pub journal_bytes: u64,
    /// Largest memtable of the message and dedupe tables, bytes (the other tables: a quarter).
    pub memtable_bytes: u64,
    /// fjall background threads (flushes, compactions).
    pub worker_threads: usize,
    /// Dedupe keys remembered in memory (about 40 bytes each) so that a new cmid skips the
    /// dedupe table's lookup; 0 disables the filter (store/recent.rs).
    pub recent_dedupe_keys: usize,
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
            seq_cache_entries: 1 << 18,
            cache_bytes: 64 << 20,
            journal_bytes: 64 << 20,
            recent_dedupe_keys: 1 << 20,
            memtable_bytes: 16 << 20,
            worker_threads: 1,
        }
    }
}

impl StoreOptions {
    /// The limits the store rules enforce ([`rules::apply_op`]).
    pub fn limits(&self) -> Limits {
        Limits {
            dedupe_window_ms: self.dedupe_window_ms,
            inbox_keep: self.inbox_keep,
            group_keep: self.group_keep,
            max_devices_per_user: self.max_devices_per_user,
            max_groups_per_user: self.max_groups_per_user,
            max_group_members: self.max_group_members,
        }
    }
}

/// The keyspaces (tables). Names are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ks {
    /// `user ‖ inbox_seq` → message.
    Inbox,
    /// `group ‖ gseq` → message.
    Timeline,
    /// `user ‖ device` → seq.
    Cursor,
    /// `group ‖ member` → gseq.
    GroupCursor,
    /// `group ‖ member` → empty.
    Member,
    /// `user ‖ group` → empty (the reverse of `Member`).
    Membership,
    /// `group` → member count.
    GroupSize,
    /// dedupe key → [`DedupeRecord`].
    Dedupe,
    /// `"format"` → u32.
    Meta,
}

const KS: [(Ks, &str); 9] = [
    (Ks::Inbox, "inbox"),
    (Ks::Timeline, "timeline"),
    (Ks::Cursor, "cursor"),
    (Ks::GroupCursor, "group_cursor"),
    (Ks::Member, "member"),
    (Ks::Membership, "membership"),
    (Ks::GroupSize, "group_size"),
    (Ks::Dedupe, "dedupe"),
    (Ks::Meta, "meta"),
];

impl Ks {
    fn name(self) -> &'static str {
        KS[self as usize].1
    }
}

fn engine(e: fjall::Error) -> StoreError {
    // ENOSPC, wherever in the engine's chain of errors it came from.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut full = false;
    while let Some(c) = cause {
        full |= c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull);
        cause = c.source();
    }
    if full {
        StoreError::Full(Box::new(e))
    } else {
        StoreError::Engine(Box::new(e))
    }
}

fn corrupt(ks: Ks, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table: ks.name(),
        detail: detail.into(),
    }
}

/// Writes of the batch being built: per keyspace, key → value (`None`: delete). The tables
/// written once or more per message (inbox, timeline, dedupe) are only looked up by
/// key, so they go in hash maps; the others in ordered maps, for the prefix scans
/// ([`EmbeddedStore::tx_prefix`]).
struct Tx {
    writes: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; KS.len()],
    hot: [FastMap<Vec<u8>, Option<Vec<u8>>>; KS.len()],
    /// Last seqs assigned in this batch (cache key → seq), merged into the cache on commit.
    seqs: FastMap<Vec<u8>, u64>,
}

/// Tables of [`Tx::hot`]: written per message, never scanned by prefix within a batch.
fn is_hot(ks: Ks) -> bool {
    matches!(ks, Ks::Inbox | Ks::Timeline | Ks::Dedupe)
}

impl Tx {
    /// A batch of `ops` operations: the per-message maps sized for one write each.
    fn new(ops: usize) -> Self {
        let mut hot: [FastMap<Vec<u8>, Option<Vec<u8>>>; KS.len()] = Default::default();
        for ks in [Ks::Inbox, Ks::Dedupe] {
            hot[ks as usize].reserve(ops);
        }
        let mut seqs = FastMap::default();
        seqs.reserve(ops);
        Tx {
            writes: Default::default(),
            hot,
            seqs,
        }
    }

    fn set(&mut self, ks: Ks, key: Vec<u8>, value: Option<Vec<u8>>) {
        if is_hot(ks) {
            self.hot[ks as usize].insert(key, value);
        } else {
            self.writes[ks as usize].insert(key, value);
        }
    }

    fn put(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.set(ks, key, Some(value));
    }

    fn delete(&mut self, ks: Ks, key: Vec<u8>) {
        self.set(ks, key, None);
    }

    /// This batch's write of `key`, if any (`Some(None)`: deleted).
    fn pending(&self, ks: Ks, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        if is_hot(ks) {
            self.hot[ks as usize].get(key)
        } else {
            self.writes[ks as usize].get(key)
        }
    }

    fn len(&self) -> usize {
        self.writes.iter().map(BTreeMap::len).sum::<usize>()
            + self.hot.iter().map(|m| m.len()).sum::<usize>()
    }
}

/// The dedupe table's compaction filter: drops the records expired at the store's clock.
/// Expired records cost nothing until then (an append overwrites one it meets), so they need
/// no index and no deletes: the store writes one dedupe row per append and nothing more.
struct DedupeTtl {
    clock: Arc<AtomicU64>,
    window_ms: u64,
}

struct DedupeTtlFilter {
    expired_before: u64,
}

impl fjall::compaction::filter::Factory for DedupeTtl {
    fn name(&self) -> &str {
        "imgw-dedupe-ttl"
    }

    fn make_filter(
        &self,
        _: &fjall::compaction::filter::Context,
    ) -> Box<dyn fjall::compaction::filter::CompactionFilter> {
        let now = self.clock.load(Ordering::Acquire);
        Box::new(DedupeTtlFilter {
            // Before the first commit of a process the clock is unknown (0): keep everything.
            expired_before: if now == 0 {
                0
            } else {
                expired_before(now, self.window_ms)
            },
        })
    }
}

impl fjall::compaction::filter::CompactionFilter for DedupeTtlFilter {
    fn filter_item(
        &mut self,
        item: fjall::compaction::filter::ItemAccessor<'_>,
        _: &fjall::compaction::filter::Context,
    ) -> fjall::compaction::filter::CompactionFilterResult {
        use fjall::compaction::filter::Verdict;
        let value = item.value()?;
        Ok(match DedupeRecord::decode(&value) {
            Some(rec) if rec.stored_at_ms < self.expired_before => Verdict::Remove,
            _ => Verdict::Keep,
        })
    }
}

/// Which sequence an append draws from.
#[derive(Clone, Copy)]
enum SeqKind {
    Inbox,
    Group,
}

/// The embedded durable store. Owned by one thread (the I/O core); every call blocks.
pub struct EmbeddedStore {
    db: fjall::Database,
    ks: Vec<fjall::Keyspace>,
    opts: StoreOptions,
    /// The last seq of recently used inboxes and timelines, so an append does not read the
    /// engine.
    cache: TwoGen<Vec<u8>, u64, FastState>,
    /// Latest `now_ms` seen (at open: the persisted clock): dedupe dates never go backwards,
    /// even if the wall clock steps back.
    last_now_ms: u64,
    /// The persisted clock (the latest committed `now_ms`), shared with the dedupe table's
    /// compaction filter.
    clock: Arc<AtomicU64>,
    /// Dedupe keys stored recently: lets a new cmid skip the dedupe lookup.
    recent: super::recent::RecentKeys,
}

impl EmbeddedStore {
    /// Opens the store in `dir` (created if missing; the engine's files go in `dir/fjall`).
    /// After a crash this replays the journal: every batch whose `apply` returned is there.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let clock = Arc::new(AtomicU64::new(0));
        let ttl: Arc<dyn fjall::compaction::filter::Factory> = Arc::new(DedupeTtl {
            clock: clock.clone(),
            window_ms: opts.dedupe_window_ms,
        });
        let db = fjall::Database::builder(dir.join("fjall"))
            .cache_size(opts.cache_bytes)
            .max_journaling_size(opts.journal_bytes.max(64 << 20))
            .worker_threads(opts.worker_threads.max(1))
            .with_compaction_filter_factories(Arc::new(move |name: &str| {
                (name == Ks::Dedupe.name()).then(|| ttl.clone())
            }))
            .open()
            .map_err(engine)?;
        let mut ks = Vec::with_capacity(KS.len());
        for (i, (kind, name)) in KS.iter().enumerate() {
            debug_assert_eq!(*kind as usize, i);
            // The dedupe table takes a write per message too: same memtables as the messages.
            let memtable = match kind {
                Ks::Inbox | Ks::Timeline | Ks::Dedupe => opts.memtable_bytes,
                _ => (opts.memtable_bytes / 4).max(1 << 20),
            };
            let handle = db
                .keyspace(name, || {
                    fjall::KeyspaceCreateOptions::default().max_memtable_size(memtable)
                })
                .map_err(engine)?;
            ks.push(handle);
        }
        let mut store = EmbeddedStore {
            db,
            ks,
            cache: TwoGen::new(opts.seq_cache_entries.max(2)),
            opts,
            last_now_ms: 0,
            clock,
            recent: super::recent::RecentKeys::new(0, 0),
        };
        // Every dedupe record of an earlier process was stored at or before the clock.
        let exact_since = match store.check_format()? {
            Some(clock) => {
                store.last_now_ms = clock;
                store.clock.store(clock, Ordering::Release);
                clock.saturating_add(1)
            }
            None => 0,
        };
        store.recent = super::recent::RecentKeys::new(store.opts.recent_dedupe_keys, exact_since);
        Ok(store)
    }

    /// Checks (or writes) the format version, upgrades a format-1 store, and returns the
    /// persisted clock (`None`: no dedupe record was ever stored).
    fn check_format(&mut self) -> Result<Option<u64>, StoreError> {
        let meta = self.ks(Ks::Meta);
        let found = match meta.get(b"format").map_err(engine)? {
            Some(v) => Some(
                <[u8; 4]>::try_from(&*v)
                    .map(u32::from_be_bytes)
                    .map_err(|_| corrupt(Ks::Meta, "format is not a u32"))?,
            ),
            None => None,
        };
        let mut clock = match meta.get(CLOCK).map_err(engine)? {
            Some(v) => Some(keys::decode_u64(&v).ok_or_else(|| corrupt(Ks::Meta, "bad clock"))?),
            None => None,
        };
        match found {
            Some(FORMAT) => {}
            Some(FORMAT_V1) | None => {
                // Format 1: its records were all stored before the newest expiry entry.
                if found.is_some() && self.db.keyspace_exists(V1_EXPIRY) {
                    let expiry = self
                        .db
                        .keyspace(V1_EXPIRY, fjall::KeyspaceCreateOptions::default)
                        .map_err(engine)?;
                    if let Some(g) = expiry.last_key_value() {
                        let k = g.key().map_err(engine)?;
                        let at = keys::decode_u64(k.get(..8).unwrap_or_default())
                            .ok_or_else(|| corrupt(Ks::Dedupe, "v1 expiry key too short"))?;
                        clock = Some(clock.unwrap_or(0).max(at));
                    }
                }
                let mut b = self
                    .db
                    .batch()
                    .durability(Some(fjall::PersistMode::SyncAll));
                b.insert(meta, &b"format"[..], &FORMAT.to_be_bytes()[..]);
                if let Some(c) = clock {
                    b.insert(meta, CLOCK, &c.to_be_bytes()[..]);
                }
                b.commit().map_err(engine)?;
            }
            Some(found) => {
                return Err(StoreError::Format {
                    found,
                    expected: FORMAT,
                })
            }
        }
        // The format-1 expiry index (also after a crash during the upgrade above).
        if self.db.keyspace_exists(V1_EXPIRY) {
            let expiry = self
                .db
                .keyspace(V1_EXPIRY, fjall::KeyspaceCreateOptions::default)
                .map_err(engine)?;
            self.db.delete_keyspace(expiry).map_err(engine)?;
        }
        Ok(clock)
    }

    fn ks(&self, ks: Ks) -> &fjall::Keyspace {
        &self.ks[ks as usize]
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Disk space used by the engine's files, bytes.
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.db.disk_space().map_err(engine)
    }

    fn page_limit(&self, limit: u32) -> usize {
        limit.clamp(1, self.opts.max_page.max(1)) as usize
    }

    /// A committed value.
    fn get(&self, ks: Ks, key: &[u8]) -> Result<Option<fjall::Slice>, StoreError> {
        self.ks(ks).get(key).map_err(engine)
    }

    /// A value as the batch sees it: its own writes first, then committed data.
    fn tx_get(&self, tx: &Tx, ks: Ks, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match tx.pending(ks, key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.get(ks, key)?.map(|v| v.to_vec())),
        }
    }

    fn tx_get_u64(&self, tx: &Tx, ks: Ks, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.tx_get(tx, ks, key)? {
            Some(v) => keys::decode_u64(&v)
                .map(Some)
                .ok_or_else(|| corrupt(ks, "value is not a u64")),
            None => Ok(None),
        }
    }

    /// The rows under `prefix` as the batch sees them. Only used where the row count is
    /// bounded by an option (devices per user, groups per user).
    fn tx_prefix(
        &self,
        tx: &Tx,
        ks: Ks,
        prefix: &[u8],
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
        debug_assert!(!is_hot(ks), "prefix scans only on the ordered tables");
        let mut rows = BTreeMap::new();
        for g in self.ks(ks).prefix(prefix) {
            let (k, v) = g.into_inner().map_err(engine)?;
            rows.insert(k.to_vec(), v.to_vec());
        }
        let pending = &tx.writes[ks as usize];
        for (k, v) in pending.range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => rows.insert(k.clone(), v.clone()),
                None => rows.remove(k),
            };
        }
        Ok(rows)
    }

    /// Last seq of an inbox or timeline: the batch's, the cache's, or the last row's.
    fn last_seq(
        &mut self,
        tx: Option<&Tx>,
        kind: SeqKind,
        prefix: &[u8],
    ) -> Result<u64, StoreError> {
        let (tag, ks) = match kind {
            SeqKind::Inbox => (b'u', Ks::Inbox),
            SeqKind::Group => (b'g', Ks::Timeline),
        };
        let mut ckey = Vec::with_capacity(prefix.len() + 1);
        ckey.push(tag);
        ckey.extend_from_slice(prefix);
        if let Some(s) = tx.and_then(|tx| tx.seqs.get(&ckey)) {
            return Ok(*s);
        }
        if let Some(s) = self.cache.get(&ckey) {
            return Ok(*s);
        }
        // Trimming never removes the newest row, so the last row holds the last seq.
        let last = match self.ks(ks).prefix(prefix).next_back() {
            Some(g) => {
                let k = g.key().map_err(engine)?;
                keys::seq_suffix(&k[prefix.len()..])
                    .filter(|_| k.len() == prefix.len() + 8)
                    .ok_or_else(|| corrupt(ks, "key is not prefix ‖ seq"))?
            }
            None => 0,
        };
        self.cache.insert(ckey, last);
        Ok(last)
    }

    fn set_last_seq(tx: &mut Tx, kind: SeqKind, prefix: &[u8], seq: u64) {
        let tag = match kind {
            SeqKind::Inbox => b'u',
            SeqKind::Group => b'g',
        };
        let mut ckey = Vec::with_capacity(prefix.len() + 1);
        ckey.push(tag);
        ckey.extend_from_slice(prefix);
        tx.seqs.insert(ckey, seq);
    }

    /// Rows of `prefix ‖ seq` with seq > `after`, at most `limit` + whether more follow.
    fn read_seqs(
        &self,
        ks: Ks,
        prefix: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Deliver)>, bool), StoreError> {
        let Some(first) = after.checked_add(1) else {
            return Ok((Vec::new(), false));
        };
        let from = keys::with_seq(prefix, first);
        let to = keys::with_seq(prefix, u64::MAX);
        let mut out = Vec::with_capacity(limit.min(256));
        let mut more = false;
        for g in self.ks(ks).range(from..=to) {
            if out.len() == limit {
                more = true;
                break;
            }
            let (k, v) = g.into_inner().map_err(engine)?;
            let seq = keys::seq_suffix(&k).ok_or_else(|| corrupt(ks, "short key"))?;
            out.push((
                seq,
                super::decode_stored(ks.name(), Bytes::copy_from_slice(&v))?,
            ));
        }
        Ok((out, more))
    }

    fn names_after(
        &self,
        ks: Ks,
        prefix: &[u8],
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Str>, StoreError> {
        let start = match after {
            Some(a) => {
                let mut k = prefix.to_vec();
                k.extend_from_slice(a.as_bytes());
                Bound::Excluded(k)
            }
            None => Bound::Included(prefix.to_vec()),
        };
        let mut out = Vec::new();
        for g in self.ks(ks).range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let k = g.key().map_err(engine)?;
            if !k.starts_with(prefix) || out.len() == limit {
                break;
            }
            let name = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| corrupt(ks, "name is not UTF-8"))?;
            out.push(Str::from(name));
        }
        Ok(out)
    }
}

/// The synchronous API: the same contract as [`Backend`], blocking. The [`Backend`] impl wraps
/// these in ready futures; tests and benches call them directly.
impl EmbeddedStore {
    pub fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> Result<Vec<OpResult>, StoreError> {
        let now_ms = now_ms.max(self.last_now_ms);
        let mut tx = Tx::new(ops.len());
        let mut results = Vec::with_capacity(ops.len());
        let limits = self.opts.limits();
        let mut batch = Batch {
            store: self,
            tx: &mut tx,
            now_ms,
            log_memo: None,
            dedupe_memo: None,
        };
        for op in ops {
            results.push(rules::apply_op(&mut batch, &limits, op, now_ms)?);
        }
        let n = tx.len();
        if n > 0 {
            let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), n + 1)
                .durability(Some(fjall::PersistMode::SyncData));
            // Every record of the batch is stored at or before the clock it persists.
            batch.insert(self.ks(Ks::Meta), CLOCK, &now_ms.to_be_bytes()[..]);
            let stage = |batch: &mut fjall::OwnedWriteBatch, i: usize, k, v| match v {
                Some(v) => batch.insert(&self.ks[i], k, v),
                None => batch.remove(&self.ks[i], k),
            };
            for (i, writes) in std::mem::take(&mut tx.writes).into_iter().enumerate() {
                for (k, v) in writes {
                    stage(&mut batch, i, k, v);
                }
            }
            for (i, writes) in std::mem::take(&mut tx.hot).into_iter().enumerate() {
                for (k, v) in writes {
                    stage(&mut batch, i, k, v);
                }
            }
            batch.commit().map_err(engine)?;
            // The compaction filter follows the persisted clock only: after a restart the
            // clock resumes from there, and no record it still counts as live was dropped.
            self.clock.store(now_ms, Ordering::Release);
        }
        for (k, s) in tx.seqs {
            self.cache.insert(k, s);
        }
        self.recent
            .expired(expired_before(now_ms, self.opts.dedupe_window_ms));
        self.last_now_ms = now_ms;
        Ok(results)
    }

    pub fn read_inbox(
        &mut self,
        user: &UserRef,
        after_seq: u64,
        limit: u32,
    ) -> Result<InboxPage, StoreError> {
        let Ok(prefix) = keys::user(user) else {
            return Ok(InboxPage::default());
        };
        let (rows, more) = self.read_seqs(Ks::Inbox, &prefix, after_seq, self.page_limit(limit))?;
        let messages = rows
            .into_iter()
            .map(|(seq, mut d)| {
                d.inbox_seq = seq;
                d
            })
            .collect();
        Ok(InboxPage { messages, more })
    }

    pub fn last_inbox_seq(&mut self, user: &UserRef) -> Result<u64, StoreError> {
        match keys::user(user) {
            Ok(prefix) => self.last_seq(None, SeqKind::Inbox, &prefix),
            Err(TooLong) => Ok(0),
        }
    }

    pub fn cursor(&mut self, user: &UserRef, device: &str) -> Result<u64, StoreError> {
        let Ok(key) = keys::user(user).and_then(|p| keys::with_name(&p, device)) else {
            return Ok(0);
        };
        match self.get(Ks::Cursor, &key)? {
            Some(v) => keys::decode_u64(&v).ok_or_else(|| corrupt(Ks::Cursor, "not a u64")),
            None => Ok(0),
        }
    }

    pub fn group_members(
        &mut self,
        group: &GroupRef,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Str>, StoreError> {
        let Ok(prefix) = keys::group(group) else {
            return Ok(Vec::new());
        };
        self.names_after(Ks::Member, &prefix, after, self.page_limit(limit))
    }

    pub fn group_size(&mut self, group: &GroupRef) -> Result<u64, StoreError> {
        let Ok(prefix) = keys::group(group) else {
            return Ok(0);
        };
        match self.get(Ks::GroupSize, &prefix)? {
            Some(v) => keys::decode_u64(&v).ok_or_else(|| corrupt(Ks::GroupSize, "not a u64")),
            None => Ok(0),
        }
    }

    pub fn user_groups(&mut self, user: &UserRef) -> Result<Vec<Str>, StoreError> {
        let Ok(prefix) = keys::user(user) else {
            return Ok(Vec::new());
        };
        let max = self.opts.max_groups_per_user as usize;
        self.names_after(Ks::Membership, &prefix, None, max.max(1))
    }

    pub fn read_group(
        &mut self,
        group: &GroupRef,
        after_gseq: u64,
        limit: u32,
    ) -> Result<GroupPage, StoreError> {
        let Ok(prefix) = keys::group(group) else {
            return Ok(GroupPage::default());
        };
        let (rows, more) =
            self.read_seqs(Ks::Timeline, &prefix, after_gseq, self.page_limit(limit))?;
        let messages = rows
            .into_iter()
            .map(|(gseq, deliver)| GroupEntry { gseq, deliver })
            .collect();
        Ok(GroupPage { messages, more })
    }

    pub fn last_group_seq(&mut self, group: &GroupRef) -> Result<u64, StoreError> {
        match keys::group(group) {
            Ok(prefix) => self.last_seq(None, SeqKind::Group, &prefix),
            Err(TooLong) => Ok(0),
        }
    }

    pub fn group_cursor(&mut self, group: &GroupRef, member: &str) -> Result<u64, StoreError> {
        let Ok(key) = keys::group(group).and_then(|p| keys::with_name(&p, member)) else {
            return Ok(0);
        };
        match self.get(Ks::GroupCursor, &key)? {
            Some(v) => keys::decode_u64(&v).ok_or_else(|| corrupt(Ks::GroupCursor, "not a u64")),
            None => Ok(0),
        }
    }
}

impl Backend for EmbeddedStore {
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> StoreFuture<'_, Vec<OpResult>> {
        Box::pin(std::future::ready(EmbeddedStore::apply(self, ops, now_ms)))
    }

    fn read_inbox<'a>(
        &'a mut self,
        user: &'a UserRef,
        after_seq: u64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        Box::pin(std::future::ready(EmbeddedStore::read_inbox(
            self, user, after_seq, limit,
        )))
    }

    fn last_inbox_seq<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(EmbeddedStore::last_inbox_seq(
            self, user,
        )))
    }

    fn cursor<'a>(&'a mut self, user: &'a UserRef, device: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(EmbeddedStore::cursor(
            self, user, device,
        )))
    }

    fn group_members<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after: Option<&'a str>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<Str>> {
        Box::pin(std::future::ready(EmbeddedStore::group_members(
            self, group, after, limit,
        )))
    }

    fn group_size<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(EmbeddedStore::group_size(self, group)))
    }

    fn user_groups<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, Vec<Str>> {
        Box::pin(std::future::ready(EmbeddedStore::user_groups(self, user)))
    }

    fn read_group<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after_gseq: u64,
        limit: u32,
    ) -> StoreFuture<'a, GroupPage> {
        Box::pin(std::future::ready(EmbeddedStore::read_group(
            self, group, after_gseq, limit,
        )))
    }

    fn last_group_seq<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(EmbeddedStore::last_group_seq(
            self, group,
        )))
    }

    fn group_cursor<'a>(
        &'a mut self,
        group: &'a GroupRef,
        member: &'a str,
    ) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(EmbeddedStore::group_cursor(
            self, group, member,
        )))
    }
}

/// A batch being built: the rules' view of the store ([`StoreTx`]), the batch's writes in `tx`
/// over the committed data.
struct Batch<'a> {
    store: &'a mut EmbeddedStore,
    tx: &'a mut Tx,
    now_ms: u64,
    /// The last log prefix and dedupe key built: an append asks for its log's several times
    /// (last seq, message, trim, new last seq) and for its dedupe key twice (lookup, record),
    /// and each build is an allocation on the per-message path.
    log_memo: Option<Memo>,
    dedupe_memo: Option<Memo>,
}

/// A key and the ids it was built from: (log kind, tenant, user or group, sender, cmid), ""
/// where unused.
struct Memo {
    ids: [Str; 5],
    key: Vec<u8>,
}

impl Memo {
    fn new(ids: [&str; 5], key: Vec<u8>) -> Memo {
        Memo {
            ids: ids.map(Str::from),
            key,
        }
    }

    fn is(&self, ids: &[&str; 5]) -> bool {
        self.ids.iter().zip(ids).all(|(a, b)| &**a == *b)
    }
}

fn log_ids<'b>(log: Log<'b>, sender: &'b str, cmid: &'b str) -> [&'b str; 5] {
    match log {
        Log::Inbox(u) => ["u", &u.tenant, &u.user, sender, cmid],
        Log::Group(g) => ["g", &g.tenant, &g.group, sender, cmid],
    }
}

impl Batch<'_> {
    /// The key prefix of `log`'s rows; hand it back with [`Batch::keep_prefix`].
    fn prefix(&mut self, log: Log<'_>) -> Result<Memo, StoreError> {
        let ids = log_ids(log, "", "");
        match self.log_memo.take() {
            Some(m) if m.is(&ids) => Ok(m),
            _ => {
                let prefix = match log {
                    Log::Inbox(u) => checked(keys::user(u))?,
                    Log::Group(g) => checked(keys::group(g))?,
                };
                Ok(Memo::new(ids, prefix))
            }
        }
    }

    fn keep_prefix(&mut self, memo: Memo) {
        self.log_memo = Some(memo);
    }

    /// The dedupe key of `key`, the one built last if it is the same.
    fn dedupe_key(&mut self, key: DedupeKey<'_>) -> Result<Memo, StoreError> {
        let ids = log_ids(key.log, key.sender, key.cmid);
        match self.dedupe_memo.take() {
            Some(m) if m.is(&ids) => Ok(m),
            _ => Ok(Memo::new(ids, dedupe_key(key)?)),
        }
    }
}

/// Which sequence and table a log's rows are in.
fn log_kind(log: Log<'_>) -> (SeqKind, Ks) {
    match log {
        Log::Inbox(_) => (SeqKind::Inbox, Ks::Inbox),
        Log::Group(_) => (SeqKind::Group, Ks::Timeline),
    }
}

/// A key of an id the rules checked against [`MAX_ID_BYTES`]: too long cannot happen, and is
/// reported as a damaged batch if it does.
fn checked<T>(key: Result<T, TooLong>) -> Result<T, StoreError> {
    key.map_err(|TooLong| StoreError::Corrupt {
        table: "batch",
        detail: "an id longer than a key holds passed the rules".into(),
    })
}

fn dedupe_key(key: DedupeKey<'_>) -> Result<Vec<u8>, StoreError> {
    let dest = match key.log {
        Log::Inbox(u) => Dest::Inbox(&u.user),
        Log::Group(g) => Dest::Group(&g.group),
    };
    checked(keys::dedupe(key.log.tenant(), key.sender, key.cmid, dest))
}

fn name_key(owner: Result<Vec<u8>, TooLong>, name: &str) -> Result<Vec<u8>, StoreError> {
    checked(owner.and_then(|p| keys::with_name(&p, name)))
}

/// The key of `member` in `group`, and of `group` under the member (`user ‖ group`).
fn member_keys(group: &GroupRef, member: &str) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    let user = UserRef::new(group.tenant.clone(), member);
    Ok((
        name_key(keys::group(group), member)?,
        name_key(keys::user(&user), &group.group)?,
    ))
}

impl StoreTx for Batch<'_> {
    fn max_id_bytes(&self) -> usize {
        MAX_ID_BYTES
    }

    fn last_seq(&mut self, log: Log<'_>) -> Result<u64, StoreError> {
        let prefix = self.prefix(log)?;
        let last = self
            .store
            .last_seq(Some(self.tx), log_kind(log).0, &prefix.key);
        self.keep_prefix(prefix);
        last
    }

    fn set_last_seq(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError> {
        let prefix = self.prefix(log)?;
        EmbeddedStore::set_last_seq(self.tx, log_kind(log).0, &prefix.key, seq);
        self.keep_prefix(prefix);
        Ok(())
    }

    fn put_message(&mut self, log: Log<'_>, seq: u64, msg: Vec<u8>) -> Result<(), StoreError> {
        let prefix = self.prefix(log)?;
        self.tx
            .put(log_kind(log).1, keys::with_seq(&prefix.key, seq), msg);
        self.keep_prefix(prefix);
        Ok(())
    }

    fn trim_message(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError> {
        let prefix = self.prefix(log)?;
        self.tx
            .delete(log_kind(log).1, keys::with_seq(&prefix.key, seq));
        self.keep_prefix(prefix);
        Ok(())
    }

    fn dedupe(
        &mut self,
        key: DedupeKey<'_>,
        expired_before_ms: u64,
    ) -> Result<Option<DedupeRecord>, StoreError> {
        let dkey = self.dedupe_key(key)?;
        // A key not stored since `expired_before_ms` needs no lookup.
        let found = if self
            .store
            .recent
            .surely_absent(&dkey.key, expired_before_ms)
        {
            None
        } else {
            self.store.tx_get(self.tx, Ks::Dedupe, &dkey.key)?
        };
        self.dedupe_memo = Some(dkey);
        match found {
            Some(v) => DedupeRecord::decode(&v)
                .map(Some)
                .ok_or_else(|| corrupt(Ks::Dedupe, "bad record")),
            None => Ok(None),
        }
    }

    fn put_dedupe(&mut self, key: DedupeKey<'_>, rec: DedupeRecord) -> Result<(), StoreError> {
        let dkey = self.dedupe_key(key)?.key;
        self.store.recent.insert(&dkey, self.now_ms);
        self.tx.put(Ks::Dedupe, dkey, rec.encode().to_vec());
        Ok(())
    }

    fn cursor(&mut self, user: &UserRef, device: &str) -> Result<Option<u64>, StoreError> {
        let key = name_key(keys::user(user), device)?;
        self.store.tx_get_u64(self.tx, Ks::Cursor, &key)
    }

    fn cursors(&mut self, user: &UserRef) -> Result<Vec<(Str, u64)>, StoreError> {
        let prefix = checked(keys::user(user))?;
        let rows = self.store.tx_prefix(self.tx, Ks::Cursor, &prefix)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let device = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| corrupt(Ks::Cursor, "device is not UTF-8"))?;
            let seq = keys::decode_u64(&v).ok_or_else(|| corrupt(Ks::Cursor, "not a u64"))?;
            out.push((Str::from(device), seq));
        }
        Ok(out)
    }

    fn put_cursor(&mut self, user: &UserRef, device: &str, seq: u64) -> Result<(), StoreError> {
        let key = name_key(keys::user(user), device)?;
        self.tx.put(Ks::Cursor, key, seq.to_be_bytes().to_vec());
        Ok(())
    }

    fn delete_cursor(&mut self, user: &UserRef, device: &str) -> Result<(), StoreError> {
        let key = name_key(keys::user(user), device)?;
        self.tx.delete(Ks::Cursor, key);
        Ok(())
    }

    fn member_cursor(&mut self, group: &GroupRef, member: &str) -> Result<Option<u64>, StoreError> {
        let key = name_key(keys::group(group), member)?;
        if self.store.tx_get(self.tx, Ks::Member, &key)?.is_none() {
            return Ok(None);
        }
        // No cursor row: joined before any message and never moved.
        Ok(Some(
            self.store
                .tx_get_u64(self.tx, Ks::GroupCursor, &key)?
                .unwrap_or(0),
        ))
    }

    fn group_size(&mut self, group: &GroupRef) -> Result<u64, StoreError> {
        let key = checked(keys::group(group))?;
        Ok(self
            .store
            .tx_get_u64(self.tx, Ks::GroupSize, &key)?
            .unwrap_or(0))
    }

    fn set_group_size(&mut self, group: &GroupRef, members: u64) -> Result<(), StoreError> {
        let key = checked(keys::group(group))?;
        if members == 0 {
            self.tx.delete(Ks::GroupSize, key);
        } else {
            self.tx
                .put(Ks::GroupSize, key, members.to_be_bytes().to_vec());
        }
        Ok(())
    }

    fn user_group_count(&mut self, tenant: &str, member: &str) -> Result<u64, StoreError> {
        let prefix = checked(keys::user(&UserRef::new(tenant, member)))?;
        let rows = self.store.tx_prefix(self.tx, Ks::Membership, &prefix)?;
        Ok(rows.len() as u64)
    }

    fn put_member(&mut self, group: &GroupRef, member: &str, gseq: u64) -> Result<(), StoreError> {
        let (mkey, rkey) = member_keys(group, member)?;
        self.tx.put(Ks::Member, mkey.clone(), Vec::new());
        self.tx.put(Ks::Membership, rkey, Vec::new());
        if gseq > 0 {
            self.tx
                .put(Ks::GroupCursor, mkey, gseq.to_be_bytes().to_vec());
        }
        Ok(())
    }

    fn set_member_cursor(
        &mut self,
        group: &GroupRef,
        member: &str,
        gseq: u64,
    ) -> Result<(), StoreError> {
        let key = name_key(keys::group(group), member)?;
        self.tx
            .put(Ks::GroupCursor, key, gseq.to_be_bytes().to_vec());
        Ok(())
    }

    fn delete_member(&mut self, group: &GroupRef, member: &str) -> Result<(), StoreError> {
        let (mkey, rkey) = member_keys(group, member)?;
        self.tx.delete(Ks::Member, mkey.clone());
        self.tx.delete(Ks::GroupCursor, mkey);
        self.tx.delete(Ks::Membership, rkey);
        Ok(())
    }
}

#[cfg(test)]
impl EmbeddedStore {
    /// Rows in a table, by name (tests check the bounds with it).
    pub(super) fn table_len(&self, name: &str) -> usize {
        KS.iter()
            .find(|(_, n)| *n == name)
            .map_or(0, |(ks, _)| self.ks(*ks).iter().count())
    }

    /// Whether the engine holds a keyspace of that name (tables of older formats too).
    pub(super) fn has_keyspace(&self, name: &str) -> bool {
        self.db.keyspace_exists(name)
    }

    /// Flushes a table's memtable and compacts it whole (runs its compaction filter).
    pub(super) fn compact(&self, name: &str) {
        let (ks, _) = KS.iter().find(|(_, n)| *n == name).expect("table");
        let t = self.ks(*ks);
        t.rotate_memtable_and_wait().unwrap();
        t.major_compact().unwrap();
    }
}

#[cfg(test)]
#[test]
fn no_space_left_is_storage_full_other_engine_errors_are_not() {
    let enospc = || std::io::Error::from(std::io::ErrorKind::StorageFull);
    assert!(matches!(
        engine(fjall::Error::Io(enospc())),
        StoreError::Full(_)
    ));
    assert!(matches!(
        engine(fjall::Error::Storage(fjall::LsmError::Io(enospc()))),
        StoreError::Full(_)
    ));
    assert!(matches!(
        engine(fjall::Error::Io(
            std::io::ErrorKind::PermissionDenied.into()
        )),
        StoreError::Engine(_)
    ));
}
