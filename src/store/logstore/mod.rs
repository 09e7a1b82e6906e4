//! The log-structured store of durability `local`: inboxes, group timelines, cursors,
//! memberships and the dedupe window as records in an append-only log, indexed in memory.
//!
//! This module owns the store built on [`super::log`] (segment files, checksums, group commit,
//! recovery) and the rules of [`super::rules`] (what each op reads, writes and answers):
//! - **A batch** runs its ops through the rules against the in-memory [`Index`] seen through the
//!   batch's own pending writes ([`Batch`]), turns the writes into [`Record`]s, appends them
//!   and a closing [`Record::Batch`] (the clock and the record count) to the log, and commits:
//!   one write and one `fdatasync`. Only then does the index take the records
//!   ([`Index::apply`]), so a failed commit changes nothing in memory (and the log refuses
//!   further writes: restart to recover, as docs/STORE.md says).
//! - **Recovery** reads the checkpoint (the cursors, memberships and clock, as records, up to a
//!   log position), then replays the log: message records always (they rebuild the positions
//!   and the dedupe window), the others only after the checkpoint's position, and each batch
//!   only once its closing record is read, so a torn batch is never half-applied. The records
//!   of a torn batch stay on disk before the next batch and are skipped again at every open
//!   (the closing record's count says where its batch starts).
//! - **Reads** of messages go to the log by position (a `pread` each); everything else is
//!   answered from memory.
//! - **Retention**: a segment is deleted once no retained message is in it (trimmed by
//!   `inbox_keep` / `group_keep`), its newest dedupe record is past the window, and a
//!   checkpoint taken after it holds its cursors and memberships.

mod index;
mod record;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use bytes::Bytes;

use self::index::{corrupt, fingerprint, Index, IndexLimits, Pos, Timeline};
use self::record::{Appended, Record};
use super::keys::{DedupeRecord, FastMap};
use super::log::{FsStorage, Log, LogError, LogOptions, Position, Storage};
use super::rules::{self, DedupeKey, StoreTx};
use super::{
    Backend, GroupEntry, GroupPage, GroupRef, InboxPage, Op, OpResult, StoreError, StoreFuture,
    StoreOptions, UserRef, MAX_ID_BYTES,
};
use crate::protocol::{Deliver, Str};

/// The log store's options: the store's limits and the log's bounds.
#[derive(Clone, Debug)]
pub struct LogStoreOptions {
    pub store: StoreOptions,
    pub log: LogOptions,
    /// Dedupe records held in memory (about 80 bytes each); past it the oldest go before their
    /// window ends (counted: [`LogStore::dedupe_evicted_early`]).
    pub max_dedupe_entries: usize,
}

impl Default for LogStoreOptions {
    fn default() -> Self {
        LogStoreOptions {
            store: StoreOptions::default(),
            // Room for a message of 1.5 MiB and four ids of the longest.
            // A batch goes out in writes of at most 4 MiB (a larger one in several): damage
            // within that of the end of the last segment is cut as a torn write, so it is kept
            // small.
            log: LogOptions {
                max_record_bytes: 2 << 20,
                max_pending_bytes: 4 << 20,
                ..LogOptions::default()
            },
            max_dedupe_entries: 4 << 20,
        }
    }
}

/// How often retention looks for segments to delete, in commits: a segment frees slowly (its
/// messages are trimmed one append at a time), and a look lists the segments.
const RETIRE_EVERY_COMMITS: u32 = 64;

/// What an open found, for one line in the gateway's log.
#[derive(Clone, Debug, Default)]
pub struct Opened {
    pub records: u64,
    pub batches: u64,
    /// Records of batches that never reached their closing record (torn before the crash).
    pub torn_batch_records: u64,
    /// The torn tail the log cut off, described.
    pub truncated: Option<String>,
}

/// The log-structured store (module doc).
pub struct LogStore<S: Storage = FsStorage> {
    log: Log<S>,
    opts: LogStoreOptions,
    index: Index,
    /// The checkpoint covers every record before this position.
    checkpoint_upto: Position,
    /// Commits since retention last looked.
    commits_since_retire: u32,
    opened: Opened,
    scratch: Vec<u8>,
    /// The directory's lock, held while the store is open (one process per directory).
    _lock: Option<std::fs::File>,
}

fn index_limits(o: &LogStoreOptions) -> IndexLimits {
    IndexLimits {
        inbox_keep: o.store.inbox_keep.max(1),
        group_keep: o.store.group_keep.max(1),
        dedupe_window_ms: o.store.dedupe_window_ms,
        max_dedupe_entries: o.max_dedupe_entries,
    }
}

/// The checkpoint's bytes: records, each `kind:u8 | len:u32 LE | payload`.
fn encode_snapshot(records: &[Record]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    let mut payload = Vec::new();
    for r in records {
        r.encode(&mut payload).map_err(|e| StoreError::Corrupt {
            table: "checkpoint",
            detail: e.to_string(),
        })?;
        out.push(r.kind());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
    }
    Ok(out)
}

fn decode_snapshot(bytes: Vec<u8>) -> Result<Vec<Record>, StoreError> {
    let bad = |detail: String| StoreError::Corrupt {
        table: "checkpoint",
        detail,
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < 5 {
            return Err(bad("truncated record header".into()));
        }
        let kind = bytes[at];
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[at + 1..at + 5]);
        let len = u32::from_le_bytes(len) as usize;
        let start = at + 5;
        if bytes.len() - start < len {
            return Err(bad("truncated record".into()));
        }
        let rec =
            Record::decode(kind, &bytes[start..start + len]).map_err(|e| bad(e.to_string()))?;
        out.push(rec);
        at = start + len;
    }
    Ok(out)
}

/// Whether a record changes the small tables a checkpoint holds (not a message).
fn in_checkpoint(r: &Record) -> bool {
    !matches!(r, Record::Inbox(_) | Record::Group(_))
}

impl LogStore<FsStorage> {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &std::path::Path, opts: LogStoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        let storage = FsStorage::open(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut store = LogStore::open_in(storage, opts)?;
        store._lock = Some(lock);
        Ok(store)
    }
}

/// Takes the exclusive lock of `dir/LOCK`: a second process opening the same store fails at
/// once instead of writing the same segments.
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join("LOCK");
    let dir_err = |source| StoreError::Dir {
        path: path.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(dir_err)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Config(format!(
            "{} is in use by another process (one gateway per data directory)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(dir_err(e)),
    }
}

impl<S: Storage> LogStore<S> {
    /// Opens the store on `storage`: the checkpoint, then the log replayed (module doc).
    pub fn open_in(storage: S, opts: LogStoreOptions) -> Result<Self, StoreError> {
        if opts.log.segment_bytes > u64::from(u32::MAX) {
            return Err(StoreError::Config(
                "log segments must be smaller than 4 GiB".into(),
            ));
        }
        let il = index_limits(&opts);
        let mut index = Index::default();
        let checkpoint = Log::read_checkpoint_in(&storage, &opts.log)?;
        let upto = match checkpoint {
            Some(c) => {
                for r in decode_snapshot(c.bytes)? {
                    index.apply(r, Pos::new(Position::MIN), &il)?;
                }
                c.upto
            }
            None => Position::MIN,
        };
        let mut opened = Opened::default();
        index.replaying = Some(VecDeque::new());
        // Records of the batch being read, until its closing record.
        let mut batch: VecDeque<(Position, Record)> = VecDeque::new();
        let (log, recovery) = Log::open(storage, opts.log.clone(), |pos, kind, payload| {
            if pos.segment > u64::from(u32::MAX) {
                return Err(corrupt(format!("segment number {} too large", pos.segment)));
            }
            let rec = Record::decode(kind, payload).map_err(|e| corrupt(format!("{pos}: {e}")))?;
            opened.records += 1;
            let Record::Batch { records, .. } = rec else {
                batch.push_back((pos, rec));
                return Ok::<(), StoreError>(());
            };
            // Anything before the batch's own records is a torn batch's leftovers.
            while batch.len() > records as usize {
                batch.pop_front();
                opened.torn_batch_records += 1;
            }
            opened.batches += 1;
            for (p, r) in batch.drain(..).chain(std::iter::once((pos, rec))) {
                if p < upto && in_checkpoint(&r) {
                    continue;
                }
                index.apply(r, Pos::new(p), &il)?;
            }
            Ok(())
        })?;
        opened.torn_batch_records += batch.len() as u64;
        opened.truncated = recovery.truncated.map(|t| t.to_string());
        index.finish_replay(&il);
        Ok(LogStore {
            log,
            opts,
            index,
            checkpoint_upto: upto,
            commits_since_retire: 0,
            opened,
            scratch: Vec::new(),
            _lock: None,
        })
    }

    /// What the open found (records, batches, what recovery dropped).
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    pub fn options(&self) -> &LogStoreOptions {
        &self.opts
    }

    /// Dedupe records dropped before their window ended because the map was full.
    pub fn dedupe_evicted_early(&self) -> u64 {
        self.index.dedupe.evicted_early
    }

    /// Dedupe records held in memory.
    pub fn dedupe_entries(&self) -> usize {
        self.index.dedupe.len()
    }

    /// The number of segment files (retention's measure).
    pub fn segment_count(&self) -> usize {
        self.log.segments().len()
    }

    /// Entries of what the embedded store keeps as a table of this name (contract tests).
    #[cfg(test)]
    pub(super) fn table_len(&self, name: &str) -> usize {
        let i = &self.index;
        match name {
            "inbox" => i.inboxes.values().map(|t| t.positions.len()).sum(),
            "cursor" => i.cursors.values().map(Vec::len).sum(),
            "group_size" => i.groups.values().filter(|g| !g.members.is_empty()).count(),
            "dedupe" => i.dedupe.len(),
            "group_cursor" => i
                .groups
                .values()
                .map(|g| g.members.values().filter(|&&c| c > 0).count())
                .sum(),
            other => panic!("no log store table {other}"),
        }
    }

    fn page_limit(&self, limit: u32) -> u64 {
        u64::from(limit.clamp(1, self.opts.store.max_page.max(1)))
    }

    /// The message at `pos`.
    fn read_deliver(&mut self, pos: Pos) -> Result<Deliver, StoreError> {
        let kind = self.log.read_into(pos.get(), &mut self.scratch)?;
        let bad = |e: &dyn std::fmt::Display| corrupt(format!("{}: {e}", pos.get()));
        match Record::decode(kind, &self.scratch) {
            Ok(Record::Inbox(a) | Record::Group(a)) => {
                record::decode_deliver(&a.deliver).map_err(|e| bad(&e))
            }
            Ok(_) => Err(bad(&"not a message")),
            Err(e) => Err(bad(&e)),
        }
    }

    /// The retained messages of `t` after `after`, at most `limit`: (seq, message).
    fn read_timeline(
        &mut self,
        t: Option<(u64, u64, Vec<Pos>)>,
    ) -> Result<(Vec<(u64, Deliver)>, bool), StoreError> {
        let Some((start, last, positions)) = t else {
            return Ok((Vec::new(), false));
        };
        let mut out = Vec::with_capacity(positions.len());
        for (i, pos) in positions.into_iter().enumerate() {
            out.push((start + i as u64, self.read_deliver(pos)?));
        }
        let more = out.last().is_some_and(|(s, _)| *s < last);
        Ok((out, more))
    }

    /// `(first seq, last seq, positions)` of the page after `after` of `t`.
    fn page(t: Option<&Timeline>, after: u64, limit: u64) -> Option<(u64, u64, Vec<Pos>)> {
        let t = t?;
        let start = after.saturating_add(1).max(t.first);
        if start > t.last {
            return None;
        }
        let end = t.last.min(start.saturating_add(limit - 1));
        let positions = (start..=end).filter_map(|s| t.position(s)).collect();
        Some((start, t.last, positions))
    }

    /// Applies `ops` in one durable commit (see [`Backend::apply`]).
    pub fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> Result<Vec<OpResult>, StoreError> {
        let now_ms = now_ms.max(self.index.clock_ms);
        let lim = self.opts.store.limits();
        let mut batch = Batch::new(&self.index, ops.len(), self.opts.log.max_record_bytes);
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(rules::apply_op(&mut batch, &lim, op, now_ms)?);
        }
        let records = batch.records;
        if records.is_empty() {
            return Ok(results);
        }
        let mut placed = Vec::with_capacity(records.len() + 1);
        let mut payload = std::mem::take(&mut self.scratch);
        let count = u32::try_from(records.len())
            .map_err(|_| StoreError::Config(format!("a batch of {} records", records.len())))?;
        for rec in records.into_iter().chain(std::iter::once(Record::Batch {
            now_ms,
            records: count,
        })) {
            rec.encode(&mut payload)
                .map_err(|e| corrupt(e.to_string()))?;
            let pos = match self.log.append(rec.kind(), &payload) {
                // The batch is larger than one write may be: what is appended goes out now
                // (recovery ignores it unless the closing record follows), then the rest.
                Err(LogError::BatchFull { .. }) => {
                    self.log.commit()?;
                    self.log.append(rec.kind(), &payload)?
                }
                r => r?,
            };
            placed.push((pos, rec));
        }
        self.scratch = payload;
        self.log.commit()?;
        let il = index_limits(&self.opts);
        // The closing record comes last: it moves the clock and expires the dedupe window.
        for (pos, rec) in placed {
            self.index.apply(rec, Pos::new(pos), &il)?;
        }
        self.retire()?;
        Ok(results)
    }

    /// Retention (module doc): deletes the oldest segments nothing pins, writing a checkpoint
    /// first when theirs does not cover them. Looks once per [`RETIRE_EVERY_COMMITS`].
    fn retire(&mut self) -> Result<(), StoreError> {
        self.commits_since_retire += 1;
        if self.commits_since_retire < RETIRE_EVERY_COMMITS {
            return Ok(());
        }
        self.commits_since_retire = 0;
        let active = self.log.committed_end().segment;
        let stale_before =
            rules::expired_before(self.index.clock_ms, self.opts.store.dedupe_window_ms);
        let Some(&first) = self.log.segments().first().map(|s| &s.segment) else {
            return Ok(());
        };
        let mut upto = first;
        while upto < active {
            let u = self.index.segments.get(&upto).copied().unwrap_or_default();
            let dedupe_live =
                self.opts.store.dedupe_window_ms > 0 && u.newest_stored_ms >= stale_before;
            if u.messages > 0 || dedupe_live {
                break;
            }
            upto += 1;
        }
        if upto == first {
            return Ok(());
        }
        if self.checkpoint_upto.segment < upto {
            let end = self.log.committed_end();
            let bytes = encode_snapshot(&self.index.snapshot())?;
            self.log.write_checkpoint(&bytes, end)?;
            self.checkpoint_upto = end;
        }
        self.log.delete_segments_before(upto)?;
        self.index.segments.retain(|&s, _| s >= upto);
        Ok(())
    }

    pub fn read_inbox(
        &mut self,
        user: &UserRef,
        after_seq: u64,
        limit: u32,
    ) -> Result<InboxPage, StoreError> {
        let page = Self::page(
            self.index.inboxes.get(user),
            after_seq,
            self.page_limit(limit),
        );
        let (msgs, more) = self.read_timeline(page)?;
        Ok(InboxPage {
            messages: msgs
                .into_iter()
                .map(|(seq, d)| Deliver {
                    inbox_seq: seq,
                    ..d
                })
                .collect(),
            more,
        })
    }

    pub fn read_group(
        &mut self,
        group: &GroupRef,
        after_gseq: u64,
        limit: u32,
    ) -> Result<GroupPage, StoreError> {
        let page = Self::page(
            self.index.groups.get(group).map(|g| &g.timeline),
            after_gseq,
            self.page_limit(limit),
        );
        let (msgs, more) = self.read_timeline(page)?;
        Ok(GroupPage {
            messages: msgs
                .into_iter()
                .map(|(gseq, deliver)| GroupEntry { gseq, deliver })
                .collect(),
            more,
        })
    }

    pub fn last_inbox_seq(&self, user: &UserRef) -> u64 {
        self.index.inboxes.get(user).map_or(0, |t| t.last)
    }

    pub fn cursor(&self, user: &UserRef, device: &str) -> u64 {
        self.index
            .cursors
            .get(user)
            .and_then(|l| l.iter().find(|(d, _)| d == device))
            .map_or(0, |c| c.1)
    }

    pub fn group_members(&self, group: &GroupRef, after: Option<&str>, limit: u32) -> Vec<Str> {
        let n = self.page_limit(limit) as usize;
        let Some(g) = self.index.groups.get(group) else {
            return Vec::new();
        };
        let range = match after {
            Some(a) => g
                .members
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => g.members.range::<str, _>(..),
        };
        range.take(n).map(|(m, _)| m.clone()).collect()
    }

    pub fn group_size(&self, group: &GroupRef) -> u64 {
        self.index
            .groups
            .get(group)
            .map_or(0, |g| g.members.len() as u64)
    }

    pub fn user_groups(&self, user: &UserRef) -> Vec<Str> {
        self.index
            .memberships
            .get(user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn last_group_seq(&self, group: &GroupRef) -> u64 {
        self.index.groups.get(group).map_or(0, |g| g.timeline.last)
    }

    pub fn group_cursor(&self, group: &GroupRef, member: &str) -> u64 {
        self.index
            .groups
            .get(group)
            .and_then(|g| g.members.get(member))
            .copied()
            .unwrap_or(0)
    }
}

/// Ready futures: the store works synchronously on the I/O core's thread, which owns nothing
/// else while it runs.
impl<S: Storage> Backend for LogStore<S> {
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> StoreFuture<'_, Vec<OpResult>> {
        let r = LogStore::apply(self, ops, now_ms);
        Box::pin(std::future::ready(r))
    }

    fn read_inbox<'a>(
        &'a mut self,
        user: &'a UserRef,
        after_seq: u64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        let r = LogStore::read_inbox(self, user, after_seq, limit);
        Box::pin(std::future::ready(r))
    }

    fn last_inbox_seq<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(LogStore::last_inbox_seq(self, user))))
    }

    fn cursor<'a>(&'a mut self, user: &'a UserRef, device: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(LogStore::cursor(self, user, device))))
    }

    fn group_members<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after: Option<&'a str>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<Str>> {
        let r = LogStore::group_members(self, group, after, limit);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn group_size<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(LogStore::group_size(self, group))))
    }

    fn user_groups<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, Vec<Str>> {
        Box::pin(std::future::ready(Ok(LogStore::user_groups(self, user))))
    }

    fn read_group<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after_gseq: u64,
        limit: u32,
    ) -> StoreFuture<'a, GroupPage> {
        let r = LogStore::read_group(self, group, after_gseq, limit);
        Box::pin(std::future::ready(r))
    }

    fn last_group_seq<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(LogStore::last_group_seq(
            self, group,
        ))))
    }

    fn group_cursor<'a>(
        &'a mut self,
        group: &'a GroupRef,
        member: &'a str,
    ) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(LogStore::group_cursor(
            self, group, member,
        ))))
    }
}

/// One batch as the rules see it: the index through the batch's pending writes, and the
/// records those writes become.
struct Batch<'a> {
    index: &'a Index,
    records: Vec<Record>,
    /// The log's largest record.
    max_record_bytes: usize,
    /// Last seqs written by this batch: (is a group, tenant, name).
    last: FastMap<(bool, Str, Str), u64>,
    dedupe: FastMap<u128, DedupeRecord>,
    /// Device cursors written (`None`: evicted).
    cursors: FastMap<(UserRef, Str), Option<u64>>,
    /// Members written (`None`: left) with their group cursors.
    members: FastMap<(GroupRef, Str), Option<u64>>,
    sizes: FastMap<GroupRef, u64>,
    /// Change of each (tenant, member)'s group count.
    group_counts: FastMap<UserRef, i64>,
}

fn log_key(log: rules::Log<'_>) -> (bool, Str, Str) {
    match log {
        rules::Log::Inbox(u) => (false, u.tenant.clone(), u.user.clone()),
        rules::Log::Group(g) => (true, g.tenant.clone(), g.group.clone()),
    }
}

impl<'a> Batch<'a> {
    fn new(index: &'a Index, ops: usize, max_record_bytes: usize) -> Self {
        Batch {
            index,
            records: Vec::with_capacity(ops * 2),
            max_record_bytes,
            last: FastMap::default(),
            dedupe: FastMap::default(),
            cursors: FastMap::default(),
            members: FastMap::default(),
            sizes: FastMap::default(),
            group_counts: FastMap::default(),
        }
    }

    fn member(&self, group: &GroupRef, member: &str) -> Option<u64> {
        match self.members.get(&(group.clone(), Str::from(member))) {
            Some(m) => *m,
            None => self
                .index
                .groups
                .get(group)
                .and_then(|g| g.members.get(member))
                .copied(),
        }
    }
}

impl StoreTx for Batch<'_> {
    fn max_id_bytes(&self) -> usize {
        MAX_ID_BYTES
    }

    /// The store's own form ([`record::encode_deliver`]), refused when the record holding it
    /// would pass the log's largest record.
    fn encode(&mut self, key: &DedupeKey<'_>, deliver: Deliver) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + deliver.body.len());
        record::encode_deliver(&deliver, &mut out).ok()?;
        let ids = [key.log.tenant(), key.log.name(), key.sender, key.cmid];
        let record_bytes = out.len() + 16 + ids.iter().map(|s| 2 + s.len()).sum::<usize>();
        (record_bytes <= self.max_record_bytes).then_some(out)
    }

    fn last_seq(&mut self, log: rules::Log<'_>) -> Result<u64, StoreError> {
        if let Some(&s) = self.last.get(&log_key(log)) {
            return Ok(s);
        }
        Ok(match log {
            rules::Log::Inbox(u) => self.index.inboxes.get(u).map_or(0, |t| t.last),
            rules::Log::Group(g) => self.index.groups.get(g).map_or(0, |g| g.timeline.last),
        })
    }

    fn set_last_seq(&mut self, log: rules::Log<'_>, seq: u64) -> Result<(), StoreError> {
        self.last.insert(log_key(log), seq);
        Ok(())
    }

    fn put_message(
        &mut self,
        log: rules::Log<'_>,
        seq: u64,
        deliver: Vec<u8>,
    ) -> Result<(), StoreError> {
        let a = Appended {
            tenant: log.tenant().into(),
            owner: log.name().into(),
            seq,
            sender: Str::default(),
            cmid: Str::default(),
            stored_at_ms: 0,
            deliver: Bytes::from(deliver),
        };
        self.records.push(match log {
            rules::Log::Inbox(_) => Record::Inbox(a),
            rules::Log::Group(_) => Record::Group(a),
        });
        Ok(())
    }

    fn trim_message(&mut self, _: rules::Log<'_>, _: u64) -> Result<(), StoreError> {
        // Implied by the append: the index keeps the newest `keep` of each log.
        Ok(())
    }

    fn dedupe(
        &mut self,
        key: DedupeKey<'_>,
        _expired_before_ms: u64,
    ) -> Result<Option<DedupeRecord>, StoreError> {
        let fp = fingerprint(&key);
        Ok(self
            .dedupe
            .get(&fp)
            .copied()
            .or_else(|| self.index.dedupe.get(fp)))
    }

    fn put_dedupe(&mut self, key: DedupeKey<'_>, rec: DedupeRecord) -> Result<(), StoreError> {
        // The record is rebuilt from the message's own record (sender, cmid, stored_at): the
        // rules put the message just before its dedupe record.
        match self.records.last_mut() {
            Some(Record::Inbox(a)) | Some(Record::Group(a)) if a.seq == rec.seq => {
                a.sender = key.sender.into();
                a.cmid = key.cmid.into();
                a.stored_at_ms = rec.stored_at_ms;
            }
            _ => {
                return Err(StoreError::Config(
                    "a dedupe record without its message (rules changed?)".into(),
                ))
            }
        }
        self.dedupe.insert(fingerprint(&key), rec);
        Ok(())
    }

    fn cursor(&mut self, user: &UserRef, device: &str) -> Result<Option<u64>, StoreError> {
        if let Some(c) = self.cursors.get(&(user.clone(), Str::from(device))) {
            return Ok(*c);
        }
        Ok(self
            .index
            .cursors
            .get(user)
            .and_then(|l| l.iter().find(|(d, _)| d == device))
            .map(|c| c.1))
    }

    fn cursors(&mut self, user: &UserRef) -> Result<Vec<(Str, u64)>, StoreError> {
        let mut all: Vec<(Str, u64)> = self.index.cursors.get(user).cloned().unwrap_or_default();
        for ((u, device), c) in &self.cursors {
            if u != user {
                continue;
            }
            all.retain(|(d, _)| d != device);
            if let Some(seq) = c {
                all.push((device.clone(), *seq));
            }
        }
        Ok(all)
    }

    fn put_cursor(&mut self, user: &UserRef, device: &str, seq: u64) -> Result<(), StoreError> {
        self.cursors
            .insert((user.clone(), Str::from(device)), Some(seq));
        self.records.push(Record::Cursor {
            user: user.clone(),
            device: device.into(),
            seq,
        });
        Ok(())
    }

    fn delete_cursor(&mut self, user: &UserRef, device: &str) -> Result<(), StoreError> {
        self.cursors.insert((user.clone(), Str::from(device)), None);
        self.records.push(Record::CursorGone {
            user: user.clone(),
            device: device.into(),
        });
        Ok(())
    }

    fn member_cursor(&mut self, group: &GroupRef, member: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.member(group, member))
    }

    fn group_size(&mut self, group: &GroupRef) -> Result<u64, StoreError> {
        if let Some(&n) = self.sizes.get(group) {
            return Ok(n);
        }
        Ok(self
            .index
            .groups
            .get(group)
            .map_or(0, |g| g.members.len() as u64))
    }

    fn set_group_size(&mut self, group: &GroupRef, members: u64) -> Result<(), StoreError> {
        // Implied by the joins and leaves; held for the batch's later reads.
        self.sizes.insert(group.clone(), members);
        Ok(())
    }

    fn user_group_count(&mut self, tenant: &str, member: &str) -> Result<u64, StoreError> {
        let user = UserRef::new(tenant, member);
        let stored = self.index.memberships.get(&user).map_or(0, |s| s.len()) as i64;
        let delta = self.group_counts.get(&user).copied().unwrap_or(0);
        Ok((stored + delta).max(0) as u64)
    }

    fn put_member(&mut self, group: &GroupRef, member: &str, gseq: u64) -> Result<(), StoreError> {
        self.members
            .insert((group.clone(), Str::from(member)), Some(gseq));
        *self
            .group_counts
            .entry(UserRef::new(group.tenant.clone(), member))
            .or_default() += 1;
        self.records.push(Record::Join {
            group: group.clone(),
            member: member.into(),
            gseq,
        });
        Ok(())
    }

    fn set_member_cursor(
        &mut self,
        group: &GroupRef,
        member: &str,
        gseq: u64,
    ) -> Result<(), StoreError> {
        self.members
            .insert((group.clone(), Str::from(member)), Some(gseq));
        self.records.push(Record::GroupCursor {
            group: group.clone(),
            member: member.into(),
            gseq,
        });
        Ok(())
    }

    fn delete_member(&mut self, group: &GroupRef, member: &str) -> Result<(), StoreError> {
        self.members
            .insert((group.clone(), Str::from(member)), None);
        *self
            .group_counts
            .entry(UserRef::new(group.tenant.clone(), member))
            .or_default() -= 1;
        self.records.push(Record::Leave {
            group: group.clone(),
            member: member.into(),
        });
        Ok(())
    }
}
