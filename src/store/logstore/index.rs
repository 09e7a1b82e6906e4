//! The log store's in-memory state: where every retained message is in the log, the cursors,
//! the memberships and the dedupe window.
//!
//! This module owns the indexes rebuilt from the log at open and kept current by every commit.
//! [`Index::apply`] is the one way a committed record changes them: the same function replays
//! the log at open and applies a batch after its commit, so what a restart rebuilds is what
//! the running store held. It holds no message bodies: an inbox or timeline is the seq of its
//! oldest retained message and the log position of each retained one (8 bytes per message).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use super::record::{mid_and_ts, Appended, Record};
use crate::protocol::Str;
use crate::store::keys::{DedupeRecord, FastMap, FastState};
use crate::store::log::Position;
use crate::store::rules::{expired_before, DedupeKey, Log};
use crate::store::{GroupRef, StoreError, UserRef};

/// A log position in 8 bytes: segment in the high half, offset in the low half (segments are
/// smaller than 4 GiB and numbered below 2^32: checked at open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos(u64);

impl Pos {
    pub fn new(p: Position) -> Pos {
        debug_assert!(p.segment <= u64::from(u32::MAX) && p.offset <= u64::from(u32::MAX));
        Pos((p.segment << 32) | (p.offset & 0xFFFF_FFFF))
    }

    pub fn get(self) -> Position {
        Position {
            segment: self.0 >> 32,
            offset: self.0 & 0xFFFF_FFFF,
        }
    }

    pub fn segment(self) -> u64 {
        self.0 >> 32
    }
}

/// The retained messages of one inbox or timeline: seqs `first..=last`, the newest at most
/// `keep` of them.
#[derive(Debug, Default)]
pub struct Timeline {
    /// The seq of `positions[0]`.
    pub first: u64,
    /// The last seq appended (0: none).
    pub last: u64,
    pub positions: VecDeque<Pos>,
}

impl Timeline {
    /// Where message `seq` is, if it is retained.
    pub fn position(&self, seq: u64) -> Option<Pos> {
        let i = seq.checked_sub(self.first)?;
        self.positions.get(usize::try_from(i).ok()?).copied()
    }
}

/// A group: its timeline and its members with their group cursors.
#[derive(Debug, Default)]
pub struct Group {
    pub timeline: Timeline,
    pub members: BTreeMap<Str, u64>,
}

/// Messages still retained and the newest dedupe record of one segment: it may be deleted
/// when neither is left.
#[derive(Clone, Copy, Debug, Default)]
pub struct SegmentUse {
    pub messages: u64,
    pub newest_stored_ms: u64,
}

/// A 128-bit fingerprint of a dedupe key (two independently keyed 64-bit hashes): the map holds
/// no ids. A false match would need two colliding 64-bit hashes at once.
pub fn fingerprint(key: &DedupeKey<'_>) -> u128 {
    let hash = |salt: u64| {
        let mut h = FastState::default().build_hasher();
        h.write_u64(salt);
        key.log.tenant().hash(&mut h);
        key.sender.hash(&mut h);
        key.cmid.hash(&mut h);
        h.write_u8(match key.log {
            Log::Inbox(_) => b'u',
            Log::Group(_) => b'g',
        });
        key.log.name().hash(&mut h);
        h.finish()
    };
    (u128::from(hash(0x5EED_0001)) << 64) | u128::from(hash(0x5EED_0002))
}

/// The dedupe window: records by fingerprint, and their order of storing for expiry.
#[derive(Default)]
pub struct Dedupe {
    records: FastMap<u128, DedupeRecord>,
    /// (stored_at, fingerprint), ascending by stored_at (the store's clock never goes back).
    order: VecDeque<(u64, u128)>,
    /// Records dropped before their window ended because the map was full.
    pub evicted_early: u64,
}

impl Dedupe {
    pub fn get(&self, fp: u128) -> Option<DedupeRecord> {
        self.records.get(&fp).copied()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    fn insert(&mut self, fp: u128, rec: DedupeRecord, max_entries: usize) {
        if max_entries == 0 {
            return;
        }
        while self.order.len() >= max_entries {
            if self.pop_oldest() {
                self.evicted_early += 1;
            }
        }
        self.records.insert(fp, rec);
        self.order.push_back((rec.stored_at_ms, fp));
    }

    /// Drops the oldest order entry, and its record unless a newer one replaced it; true if a
    /// record went.
    fn pop_oldest(&mut self) -> bool {
        let Some((at, fp)) = self.order.pop_front() else {
            return false;
        };
        match self.records.get(&fp) {
            Some(r) if r.stored_at_ms == at => {
                self.records.remove(&fp);
                true
            }
            _ => false,
        }
    }

    /// Drops every record stored before `before_ms`.
    pub fn expire(&mut self, before_ms: u64) {
        while self.order.front().is_some_and(|&(at, _)| at < before_ms) {
            self.pop_oldest();
        }
    }
}

/// The limits [`Index::apply`] enforces as it applies (the rules decided them already: the
/// index only trims what the rules trimmed, and bounds the dedupe map).
#[derive(Clone, Copy, Debug)]
pub struct IndexLimits {
    pub inbox_keep: u64,
    pub group_keep: u64,
    pub dedupe_window_ms: u64,
    pub max_dedupe_entries: usize,
}

/// The store's state in memory (module doc).
#[derive(Default)]
pub struct Index {
    pub inboxes: FastMap<UserRef, Timeline>,
    pub groups: FastMap<GroupRef, Group>,
    /// Device cursors per user (at most `max_devices_per_user` each).
    pub cursors: FastMap<UserRef, Vec<(Str, u64)>>,
    /// The groups of each (tenant, member).
    pub memberships: FastMap<UserRef, BTreeSet<Str>>,
    pub dedupe: Dedupe,
    /// The latest `now_ms` of a committed batch.
    pub clock_ms: u64,
    /// Per segment: what still pins it.
    pub segments: BTreeMap<u64, SegmentUse>,
    /// While the log is replayed: the dedupe records met, in order, fingerprinted only if they
    /// are still in the window when the replay ends ([`Index::finish_replay`]); most are not.
    pub replaying: Option<VecDeque<Deferred>>,
}

/// A dedupe record met during replay (see [`Index::replaying`]).
pub struct Deferred {
    group: bool,
    tenant: Str,
    owner: Str,
    sender: Str,
    cmid: Str,
    rec: DedupeRecord,
}

/// A record of the log that cannot be what the store wrote.
pub(super) fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt {
        table: "log",
        detail,
    }
}

impl Index {
    /// Applies one committed record at `pos`.
    pub fn apply(&mut self, rec: Record, pos: Pos, l: &IndexLimits) -> Result<(), StoreError> {
        match rec {
            Record::Batch { now_ms, .. } => {
                // The end of a batch: the clock moves, and the dedupe window with it (also
                // while the log is replayed, so that the map never holds more than a window).
                self.clock_ms = self.clock_ms.max(now_ms);
                let before = expired_before(self.clock_ms, l.dedupe_window_ms);
                self.dedupe.expire(before);
                if let Some(q) = &mut self.replaying {
                    while q.front().is_some_and(|d| d.rec.stored_at_ms < before) {
                        q.pop_front();
                    }
                }
            }
            Record::Inbox(a) => {
                let key = UserRef::new(a.tenant.clone(), a.owner.clone());
                let t = self.inboxes.entry(key.clone()).or_default();
                Self::append(&mut self.segments, t, &a, pos, l.inbox_keep)?;
                self.remember(&a, Log::Inbox(&key), l)?;
            }
            Record::Group(a) => {
                let key = GroupRef::new(a.tenant.clone(), a.owner.clone());
                let g = self.groups.entry(key.clone()).or_default();
                Self::append(&mut self.segments, &mut g.timeline, &a, pos, l.group_keep)?;
                self.remember(&a, Log::Group(&key), l)?;
            }
            Record::Cursor { user, device, seq } => {
                let list = self.cursors.entry(user).or_default();
                match list.iter_mut().find(|(d, _)| *d == device) {
                    Some(c) => c.1 = seq,
                    None => list.push((device, seq)),
                }
            }
            Record::CursorGone { user, device } => {
                if let Some(list) = self.cursors.get_mut(&user) {
                    list.retain(|(d, _)| *d != device);
                    if list.is_empty() {
                        self.cursors.remove(&user);
                    }
                }
            }
            Record::GroupCursor {
                group,
                member,
                gseq,
            } => {
                if let Some(c) = self
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.members.get_mut(&member))
                {
                    *c = gseq;
                }
            }
            Record::Join {
                group,
                member,
                gseq,
            } => {
                self.memberships
                    .entry(UserRef::new(group.tenant.clone(), member.clone()))
                    .or_default()
                    .insert(group.group.clone());
                self.groups
                    .entry(group)
                    .or_default()
                    .members
                    .insert(member, gseq);
            }
            Record::Leave { group, member } => {
                let user = UserRef::new(group.tenant.clone(), member.clone());
                if let Some(set) = self.memberships.get_mut(&user) {
                    set.remove(&group.group);
                    if set.is_empty() {
                        self.memberships.remove(&user);
                    }
                }
                if let Some(g) = self.groups.get_mut(&group) {
                    g.members.remove(&member);
                    if g.members.is_empty() && g.timeline.last == 0 {
                        self.groups.remove(&group);
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends one message (the next seq of its log, or the first one the log still holds),
    /// then trims to `keep`.
    fn append(
        segments: &mut BTreeMap<u64, SegmentUse>,
        t: &mut Timeline,
        a: &Appended,
        pos: Pos,
        keep: u64,
    ) -> Result<(), StoreError> {
        let keep = keep.max(1);
        if t.last == 0 {
            t.first = a.seq;
        } else if a.seq != t.last + 1 {
            return Err(corrupt(format!(
                "seq {} of {}/{} follows {}",
                a.seq, a.tenant, a.owner, t.last
            )));
        }
        t.last = a.seq;
        t.positions.push_back(pos);
        let seg = segments.entry(pos.segment()).or_default();
        seg.messages += 1;
        seg.newest_stored_ms = seg.newest_stored_ms.max(a.stored_at_ms);
        while t.positions.len() as u64 > keep {
            if let Some(s) = t
                .positions
                .pop_front()
                .and_then(|gone| segments.get_mut(&gone.segment()))
            {
                s.messages = s.messages.saturating_sub(1);
            }
            t.first += 1;
        }
        Ok(())
    }

    /// Records the dedupe entry of an appended message (none without a cmid, or when the
    /// window is off, or when it is already past its window).
    fn remember(&mut self, a: &Appended, log: Log<'_>, l: &IndexLimits) -> Result<(), StoreError> {
        if l.dedupe_window_ms == 0 || a.cmid.is_empty() {
            return Ok(());
        }
        if a.stored_at_ms < expired_before(self.clock_ms, l.dedupe_window_ms) {
            return Ok(());
        }
        let (mid, ts) = mid_and_ts(&a.deliver).map_err(|e| {
            corrupt(format!(
                "message {} of {}/{}: {e}",
                a.seq, a.tenant, a.owner
            ))
        })?;
        let rec = DedupeRecord {
            seq: a.seq,
            mid,
            ts,
            stored_at_ms: a.stored_at_ms,
        };
        if let Some(q) = &mut self.replaying {
            q.push_back(Deferred {
                group: matches!(log, Log::Group(_)),
                tenant: a.tenant.clone(),
                owner: a.owner.clone(),
                sender: a.sender.clone(),
                cmid: a.cmid.clone(),
                rec,
            });
            while q.len() > l.max_dedupe_entries {
                q.pop_front();
                self.dedupe.evicted_early += 1;
            }
            return Ok(());
        }
        let fp = fingerprint(&DedupeKey {
            sender: &a.sender,
            cmid: &a.cmid,
            log,
        });
        self.dedupe.insert(fp, rec, l.max_dedupe_entries);
        Ok(())
    }

    /// Ends a replay: the dedupe records still in the window enter the map.
    pub fn finish_replay(&mut self, l: &IndexLimits) {
        let Some(q) = self.replaying.take() else {
            return;
        };
        let before = expired_before(self.clock_ms, l.dedupe_window_ms);
        for d in q {
            if d.rec.stored_at_ms < before {
                continue;
            }
            let (user, group);
            let log = if d.group {
                group = GroupRef::new(d.tenant, d.owner);
                Log::Group(&group)
            } else {
                user = UserRef::new(d.tenant, d.owner);
                Log::Inbox(&user)
            };
            let fp = fingerprint(&DedupeKey {
                sender: &d.sender,
                cmid: &d.cmid,
                log,
            });
            self.dedupe.insert(fp, d.rec, l.max_dedupe_entries);
        }
    }

    /// The snapshot of the small tables (cursors, memberships with their group cursors, the
    /// clock) as records, for a checkpoint.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out = vec![Record::Batch {
            now_ms: self.clock_ms,
            records: 0,
        }];
        for (user, list) in &self.cursors {
            for (device, seq) in list {
                out.push(Record::Cursor {
                    user: user.clone(),
                    device: device.clone(),
                    seq: *seq,
                });
            }
        }
        for (group, g) in &self.groups {
            for (member, gseq) in &g.members {
                out.push(Record::Join {
                    group: group.clone(),
                    member: member.clone(),
                    gseq: *gseq,
                });
            }
        }
        out
    }
}
