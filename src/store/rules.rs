//! The rules of a batch's ops, stated once for every store: what [`Op`] reads and writes, and
//! what it answers.
//!
//! This module owns:
//! - inbox and timeline sequence numbers: gapless per inbox or group, the next is the last + 1;
//!   appending seq `s` trims seq `s - keep` (`inbox_keep`, `group_keep`);
//! - the dedupe window: a record younger than `dedupe_window_ms` answers with the original
//!   seq, mid and ts (`duplicate: true`); an older one is overwritten; a window of 0 writes no
//!   records;
//! - cursor bounds: a cursor never moves backwards nor past the last seq; a new cursor of 0 is
//!   not written; a new device cursor past `max_devices_per_user` evicts the lowest ones;
//! - group joins and leaves: [`Refusal::GroupFull`], [`Refusal::TooManyGroups`], a new member's
//!   cursor starting at the group's last gseq, the member count;
//! - group cursors: [`Refusal::NotMember`], bounded by the last gseq;
//! - the [`Refusal::IdTooLong`] and [`Refusal::Unencodable`] decisions.
//!
//! A store implements [`StoreTx`]: the reads these rules need, as the batch sees them (its own
//! pending writes first), and the writes they make, in domain terms ([`UserRef`], [`GroupRef`],
//! names, seqs). How those map to keys or rows, and how a message is encoded, is the store's.
//! [`apply_op`] runs one op against it.
//!
//! The trait is synchronous. The embedded store reads its engine directly. The MySQL store
//! runs a batch in memory against rows it read beforehand in one multi-statement query (its
//! `prefetch`): for every user with a cursor op it reads all of that user's device cursors
//! (not only the named one), and for every joining member all of that member's memberships, so
//! that eviction and the group limit need no further round trip. The common batch (appends and
//! cursor moves) still costs one read query and one write query; a read the prefetch did not
//! cover is an error, not an extra query.

pub use super::keys::DedupeRecord;
use super::{GroupRef, Op, OpResult, Refusal, StoreError, UserRef};
use crate::protocol::{Deliver, Str};

/// The limits the rules enforce (from [`super::StoreOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a (tenant, sender, cmid, destination) is remembered; 0: no dedupe.
    pub dedupe_window_ms: u64,
    /// Messages kept per inbox (at least 1).
    pub inbox_keep: u64,
    /// Messages kept per group timeline (at least 1).
    pub group_keep: u64,
    /// Device cursors kept per user (at least 1).
    pub max_devices_per_user: u32,
    /// Groups one user may be a member of.
    pub max_groups_per_user: u32,
    /// Members of one group.
    pub max_group_members: u64,
}

/// An inbox or a group timeline: what an append draws a seq from.
#[derive(Clone, Copy, Debug)]
pub enum Log<'a> {
    /// A user's inbox (`inbox_seq`).
    Inbox(&'a UserRef),
    /// A group's timeline (`gseq`).
    Group(&'a GroupRef),
}

impl Log<'_> {
    /// The tenant of the inbox or group.
    pub fn tenant(&self) -> &str {
        match self {
            Log::Inbox(u) => &u.tenant,
            Log::Group(g) => &g.tenant,
        }
    }

    /// The user or group id.
    pub fn name(&self) -> &str {
        match self {
            Log::Inbox(u) => &u.user,
            Log::Group(g) => &g.group,
        }
    }
}

/// The key of a dedupe record: (tenant, sender, cmid, destination); the tenant is the log's.
#[derive(Clone, Copy, Debug)]
pub struct DedupeKey<'a> {
    pub sender: &'a str,
    pub cmid: &'a str,
    pub log: Log<'a>,
}

/// One batch of a store, as the rules see it: reads see the batch's earlier writes.
///
/// Writes are staged in the batch and committed (or dropped) with it by the store. Every
/// method may fail with the store's error; the rules pass it on and the batch fails whole.
pub trait StoreTx {
    /// The longest id (tenant, user, group, member, device, sender, cmid) the store holds.
    fn max_id_bytes(&self) -> usize;
    /// The message in its stored form (its `inbox_seq` is not stored); `None`: it cannot be
    /// encoded ([`Refusal::Unencodable`]). By default the Protobuf form of both stores; a
    /// store with another form overrides it.
    /// `key` names where it goes and who sent it, for a store whose record holds them too.
    fn encode(&mut self, key: &DedupeKey<'_>, deliver: Deliver) -> Option<Vec<u8>> {
        let _ = key;
        super::encode_stored(deliver)
    }

    /// The last seq of an inbox or timeline (0: nothing appended).
    fn last_seq(&mut self, log: Log<'_>) -> Result<u64, StoreError>;
    /// Records the last seq of an inbox or timeline.
    fn set_last_seq(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError>;
    /// Stores a message under `seq`.
    fn put_message(&mut self, log: Log<'_>, seq: u64, msg: Vec<u8>) -> Result<(), StoreError>;
    /// Deletes the message under `seq` (absent: nothing to do).
    fn trim_message(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError>;

    /// The dedupe record of `key`, if one is stored. A store may answer `None` for a record it
    /// knows to be older than `expired_before_ms` (the rules would overwrite it anyway).
    fn dedupe(
        &mut self,
        key: DedupeKey<'_>,
        expired_before_ms: u64,
    ) -> Result<Option<DedupeRecord>, StoreError>;
    /// Stores (or overwrites) the dedupe record of `key`.
    fn put_dedupe(&mut self, key: DedupeKey<'_>, rec: DedupeRecord) -> Result<(), StoreError>;

    /// A device's cursor (`None`: no cursor stored).
    fn cursor(&mut self, user: &UserRef, device: &str) -> Result<Option<u64>, StoreError>;
    /// Every device cursor of the user: (device, seq), in any order.
    fn cursors(&mut self, user: &UserRef) -> Result<Vec<(Str, u64)>, StoreError>;
    /// Stores a device's cursor (new or moved).
    fn put_cursor(&mut self, user: &UserRef, device: &str, seq: u64) -> Result<(), StoreError>;
    /// Deletes a device's cursor (an eviction).
    fn delete_cursor(&mut self, user: &UserRef, device: &str) -> Result<(), StoreError>;

    /// A member's group cursor (`None`: not a member; 0: a member that never moved it).
    fn member_cursor(&mut self, group: &GroupRef, member: &str) -> Result<Option<u64>, StoreError>;
    /// The group's member count.
    fn group_size(&mut self, group: &GroupRef) -> Result<u64, StoreError>;
    /// Records the group's member count.
    fn set_group_size(&mut self, group: &GroupRef, members: u64) -> Result<(), StoreError>;
    /// How many groups `member` (of the group's tenant) is a member of.
    fn user_group_count(&mut self, tenant: &str, member: &str) -> Result<u64, StoreError>;
    /// Adds a member (both directions of the membership) with its group cursor.
    fn put_member(&mut self, group: &GroupRef, member: &str, gseq: u64) -> Result<(), StoreError>;
    /// Moves an existing member's group cursor.
    fn set_member_cursor(
        &mut self,
        group: &GroupRef,
        member: &str,
        gseq: u64,
    ) -> Result<(), StoreError>;
    /// Removes a member: both directions of the membership and its group cursor.
    fn delete_member(&mut self, group: &GroupRef, member: &str) -> Result<(), StoreError>;
}

/// Every dedupe record stored before this time is expired at `now_ms` (`u64::MAX` for a
/// window of 0: every record is).
pub fn expired_before(now_ms: u64, window_ms: u64) -> u64 {
    if window_ms == 0 {
        return u64::MAX;
    }
    now_ms.checked_sub(window_ms).map_or(0, |t| t + 1)
}

/// Applies one op to the batch `tx` at `now_ms` (the batch's clock, never behind an earlier
/// batch's). An `Err` fails the whole batch; a refusal is an `Ok`.
pub fn apply_op(
    tx: &mut impl StoreTx,
    limits: &Limits,
    op: Op,
    now_ms: u64,
) -> Result<OpResult, StoreError> {
    let max = tx.max_id_bytes();
    let fits = |ids: &[&str]| ids.iter().all(|s| s.len() <= max);
    match op {
        Op::AppendInbox {
            user,
            sender,
            cmid,
            deliver,
        } => {
            if !fits(&[&user.tenant, &user.user, &sender, &cmid]) {
                return Ok(OpResult::Refused(Refusal::IdTooLong));
            }
            let key = DedupeKey {
                sender: &sender,
                cmid: &cmid,
                log: Log::Inbox(&user),
            };
            append(tx, limits, key, deliver, now_ms)
        }
        Op::AppendGroup {
            group,
            sender,
            cmid,
            deliver,
        } => {
            if !fits(&[&group.tenant, &group.group, &sender, &cmid]) {
                return Ok(OpResult::Refused(Refusal::IdTooLong));
            }
            let key = DedupeKey {
                sender: &sender,
                cmid: &cmid,
                log: Log::Group(&group),
            };
            append(tx, limits, key, deliver, now_ms)
        }
        Op::SetCursor { user, device, seq } => {
            if !fits(&[&user.tenant, &user.user, &device]) {
                return Ok(OpResult::Refused(Refusal::IdTooLong));
            }
            set_cursor(tx, limits, &user, &device, seq)
        }
        Op::SetGroupCursor {
            group,
            member,
            gseq,
        } => {
            if !fits(&[&group.tenant, &group.group, &member]) {
                return Ok(OpResult::Refused(Refusal::IdTooLong));
            }
            let Some(old) = tx.member_cursor(&group, &member)? else {
                return Ok(OpResult::Refused(Refusal::NotMember));
            };
            let new = gseq.min(tx.last_seq(Log::Group(&group))?);
            if new <= old {
                return Ok(OpResult::Cursor { seq: old });
            }
            tx.set_member_cursor(&group, &member, new)?;
            Ok(OpResult::Cursor { seq: new })
        }
        Op::Join { group, member } => {
            if !fits(&[&group.tenant, &group.group, &member]) {
                return Ok(OpResult::Refused(Refusal::IdTooLong));
            }
            join(tx, limits, &group, &member)
        }
        Op::Leave { group, member } => {
            if !fits(&[&group.tenant, &group.group, &member]) {
                return Ok(OpResult::Refused(Refusal::IdTooLong));
            }
            let members = tx.group_size(&group)?;
            if tx.member_cursor(&group, &member)?.is_none() {
                return Ok(OpResult::Membership {
                    changed: false,
                    members,
                });
            }
            let left = members.saturating_sub(1);
            tx.delete_member(&group, &member)?;
            tx.set_group_size(&group, left)?;
            Ok(OpResult::Membership {
                changed: true,
                members: left,
            })
        }
    }
}

fn append<T: StoreTx>(
    tx: &mut T,
    limits: &Limits,
    key: DedupeKey<'_>,
    deliver: Deliver,
    now_ms: u64,
) -> Result<OpResult, StoreError> {
    let window_ms = limits.dedupe_window_ms;
    if window_ms > 0 {
        let expired = expired_before(now_ms, window_ms);
        if let Some(rec) = tx.dedupe(key, expired)? {
            // An expired record is overwritten below.
            if rec.stored_at_ms >= expired {
                return Ok(OpResult::Appended {
                    seq: rec.seq,
                    mid: rec.mid,
                    ts: rec.ts,
                    duplicate: true,
                });
            }
        }
    }
    let (mid, ts) = (deliver.mid, deliver.ts);
    let Some(stored) = tx.encode(&key, deliver) else {
        return Ok(OpResult::Refused(Refusal::Unencodable));
    };
    let log = key.log;
    let seq = tx.last_seq(log)? + 1;
    let keep = match log {
        Log::Inbox(_) => limits.inbox_keep,
        Log::Group(_) => limits.group_keep,
    }
    .max(1);
    tx.put_message(log, seq, stored)?;
    if seq > keep {
        tx.trim_message(log, seq - keep)?;
    }
    tx.set_last_seq(log, seq)?;
    if window_ms > 0 {
        let rec = DedupeRecord {
            seq,
            mid,
            ts,
            stored_at_ms: now_ms,
        };
        tx.put_dedupe(key, rec)?;
    }
    Ok(OpResult::Appended {
        seq,
        mid,
        ts,
        duplicate: false,
    })
}

fn set_cursor<T: StoreTx>(
    tx: &mut T,
    limits: &Limits,
    user: &UserRef,
    device: &str,
    seq: u64,
) -> Result<OpResult, StoreError> {
    let new = seq.min(tx.last_seq(Log::Inbox(user))?);
    match tx.cursor(user, device)? {
        Some(old) if old >= new => return Ok(OpResult::Cursor { seq: old }),
        None if new == 0 => return Ok(OpResult::Cursor { seq: 0 }),
        Some(_) => {}
        None => {
            // A new device: evict the lowest cursors of a user who has the most allowed (more
            // than one only if the limit was lowered since they were written).
            let max = limits.max_devices_per_user.max(1) as usize;
            let mut all = tx.cursors(user)?;
            if all.len() >= max {
                all.sort_by(|a, b| {
                    a.1.cmp(&b.1)
                        .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
                });
                let evict = all.len() + 1 - max;
                for (device, _) in all.into_iter().take(evict) {
                    tx.delete_cursor(user, &device)?;
                }
            }
        }
    }
    tx.put_cursor(user, device, new)?;
    Ok(OpResult::Cursor { seq: new })
}

fn join<T: StoreTx>(
    tx: &mut T,
    limits: &Limits,
    group: &GroupRef,
    member: &str,
) -> Result<OpResult, StoreError> {
    let members = tx.group_size(group)?;
    if tx.member_cursor(group, member)?.is_some() {
        return Ok(OpResult::Membership {
            changed: false,
            members,
        });
    }
    if members >= limits.max_group_members {
        return Ok(OpResult::Refused(Refusal::GroupFull));
    }
    if tx.user_group_count(&group.tenant, member)? >= u64::from(limits.max_groups_per_user) {
        return Ok(OpResult::Refused(Refusal::TooManyGroups));
    }
    let gseq = tx.last_seq(Log::Group(group))?;
    tx.put_member(group, member, gseq)?;
    tx.set_group_size(group, members + 1)?;
    Ok(OpResult::Membership {
        changed: true,
        members: members + 1,
    })
}

#[cfg(test)]
mod tests {
    //! The rules against an independent model: random op sequences over few users, devices,
    //! groups and cmids, with small limits and a moving clock, checked op by op (the result,
    //! then the stored state).

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    use super::*;

    const TENANT: &str = "t";
    /// Ids longer than this are refused; `NAMES` holds one.
    const MAX_ID: usize = 4;
    const NAMES: [&str; 4] = ["a", "b", "c", "toolong"];
    /// A body the in-memory store cannot encode.
    const BAD_BODY: &str = "unencodable";

    fn limits(window_ms: u64) -> Limits {
        Limits {
            dedupe_window_ms: window_ms,
            inbox_keep: 3,
            group_keep: 3,
            max_devices_per_user: 2,
            max_groups_per_user: 2,
            max_group_members: 2,
        }
    }

    /// (is a group, user or group id).
    type LogId = (bool, String);

    fn log_id(log: Log<'_>) -> LogId {
        (matches!(log, Log::Group(_)), log.name().to_string())
    }

    /// The simplest [`StoreTx`]: ordered maps, writes in place (one batch that never ends).
    #[derive(Default)]
    struct MemTx {
        last: BTreeMap<LogId, u64>,
        messages: BTreeMap<(LogId, u64), u64>,
        dedupe: BTreeMap<SendKey, DedupeRecord>,
        cursors: BTreeMap<(String, String), u64>,
        members: BTreeMap<(String, String), u64>,
        sizes: BTreeMap<String, u64>,
    }

    impl StoreTx for MemTx {
        fn max_id_bytes(&self) -> usize {
            MAX_ID
        }

        /// The stored form is the mid (big-endian).
        fn encode(&mut self, _: &DedupeKey<'_>, deliver: Deliver) -> Option<Vec<u8>> {
            (&*deliver.body != BAD_BODY).then(|| deliver.mid.to_be_bytes().to_vec())
        }

        fn last_seq(&mut self, log: Log<'_>) -> Result<u64, StoreError> {
            Ok(self.last.get(&log_id(log)).copied().unwrap_or(0))
        }

        fn set_last_seq(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError> {
            self.last.insert(log_id(log), seq);
            Ok(())
        }

        fn put_message(&mut self, log: Log<'_>, seq: u64, msg: Vec<u8>) -> Result<(), StoreError> {
            let mid = msg.try_into().map(u64::from_be_bytes).unwrap();
            self.messages.insert((log_id(log), seq), mid);
            Ok(())
        }

        fn trim_message(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError> {
            self.messages.remove(&(log_id(log), seq));
            Ok(())
        }

        fn dedupe(
            &mut self,
            key: DedupeKey<'_>,
            _: u64,
        ) -> Result<Option<DedupeRecord>, StoreError> {
            let k = (
                key.sender.to_string(),
                key.cmid.to_string(),
                log_id(key.log),
            );
            Ok(self.dedupe.get(&k).copied())
        }

        fn put_dedupe(&mut self, key: DedupeKey<'_>, rec: DedupeRecord) -> Result<(), StoreError> {
            let k = (
                key.sender.to_string(),
                key.cmid.to_string(),
                log_id(key.log),
            );
            self.dedupe.insert(k, rec);
            Ok(())
        }

        fn cursor(&mut self, user: &UserRef, device: &str) -> Result<Option<u64>, StoreError> {
            Ok(self
                .cursors
                .get(&(user.user.to_string(), device.to_string()))
                .copied())
        }

        fn cursors(&mut self, user: &UserRef) -> Result<Vec<(Str, u64)>, StoreError> {
            Ok(self
                .cursors
                .iter()
                .filter(|((u, _), _)| **u == *user.user)
                .map(|((_, d), s)| (Str::from(d.as_str()), *s))
                .collect())
        }

        fn put_cursor(&mut self, user: &UserRef, device: &str, seq: u64) -> Result<(), StoreError> {
            self.cursors
                .insert((user.user.to_string(), device.to_string()), seq);
            Ok(())
        }

        fn delete_cursor(&mut self, user: &UserRef, device: &str) -> Result<(), StoreError> {
            self.cursors
                .remove(&(user.user.to_string(), device.to_string()));
            Ok(())
        }

        fn member_cursor(&mut self, g: &GroupRef, m: &str) -> Result<Option<u64>, StoreError> {
            Ok(self
                .members
                .get(&(g.group.to_string(), m.to_string()))
                .copied())
        }

        fn group_size(&mut self, g: &GroupRef) -> Result<u64, StoreError> {
            Ok(self.sizes.get(&*g.group).copied().unwrap_or(0))
        }

        fn set_group_size(&mut self, g: &GroupRef, members: u64) -> Result<(), StoreError> {
            self.sizes.insert(g.group.to_string(), members);
            Ok(())
        }

        fn user_group_count(&mut self, _: &str, member: &str) -> Result<u64, StoreError> {
            Ok(self.members.keys().filter(|(_, m)| m == member).count() as u64)
        }

        fn put_member(&mut self, g: &GroupRef, m: &str, gseq: u64) -> Result<(), StoreError> {
            self.members
                .insert((g.group.to_string(), m.to_string()), gseq);
            Ok(())
        }

        fn set_member_cursor(
            &mut self,
            g: &GroupRef,
            m: &str,
            gseq: u64,
        ) -> Result<(), StoreError> {
            self.put_member(g, m, gseq)
        }

        fn delete_member(&mut self, g: &GroupRef, m: &str) -> Result<(), StoreError> {
            self.members.remove(&(g.group.to_string(), m.to_string()));
            Ok(())
        }
    }

    /// (sender, cmid, log).
    type SendKey = (String, String, LogId);

    /// The reference: the rules as the docs state them, on plain collections.
    #[derive(Default)]
    struct Model {
        /// Per inbox or timeline: every seq appended, and the mid of each.
        logs: BTreeMap<LogId, Vec<u64>>,
        /// (sender, cmid, log) → (seq, mid, ts, stored at).
        sent: BTreeMap<SendKey, (u64, u64, u64, u64)>,
        /// user → device → cursor.
        devices: BTreeMap<String, BTreeMap<String, u64>>,
        /// group → member → cursor.
        groups: BTreeMap<String, BTreeMap<String, u64>>,
    }

    impl Model {
        fn last(&self, log: &LogId) -> u64 {
            self.logs.get(log).map_or(0, |l| l.len() as u64)
        }

        fn step(&mut self, l: &Limits, op: &Op, now: u64) -> OpResult {
            let long = |ids: &[&str]| ids.iter().any(|s| s.len() > MAX_ID);
            match op {
                Op::AppendInbox {
                    user: UserRef { user: name, .. },
                    sender,
                    cmid,
                    deliver,
                }
                | Op::AppendGroup {
                    group: GroupRef { group: name, .. },
                    sender,
                    cmid,
                    deliver,
                } => {
                    if long(&[name, sender, cmid]) {
                        return OpResult::Refused(Refusal::IdTooLong);
                    }
                    let log = (matches!(op, Op::AppendGroup { .. }), name.to_string());
                    let key = (sender.to_string(), cmid.to_string(), log.clone());
                    if let Some(&(seq, mid, ts, at)) = self.sent.get(&key) {
                        if l.dedupe_window_ms > 0 && now < at + l.dedupe_window_ms {
                            return OpResult::Appended {
                                seq,
                                mid,
                                ts,
                                duplicate: true,
                            };
                        }
                    }
                    if &*deliver.body == BAD_BODY {
                        return OpResult::Refused(Refusal::Unencodable);
                    }
                    let msgs = self.logs.entry(log).or_default();
                    msgs.push(deliver.mid);
                    let seq = msgs.len() as u64;
                    if l.dedupe_window_ms > 0 {
                        self.sent.insert(key, (seq, deliver.mid, deliver.ts, now));
                    }
                    OpResult::Appended {
                        seq,
                        mid: deliver.mid,
                        ts: deliver.ts,
                        duplicate: false,
                    }
                }
                Op::SetCursor { user, device, seq } => {
                    if long(&[&user.user, device]) {
                        return OpResult::Refused(Refusal::IdTooLong);
                    }
                    let target = (*seq).min(self.last(&(false, user.user.to_string())));
                    let devices = self.devices.entry(user.user.to_string()).or_default();
                    match devices.get(&**device) {
                        Some(&old) if old >= target => return OpResult::Cursor { seq: old },
                        None if target == 0 => return OpResult::Cursor { seq: 0 },
                        Some(_) => {}
                        None => {
                            while devices.len() >= l.max_devices_per_user as usize {
                                let lowest = devices
                                    .iter()
                                    .min_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
                                    .map(|(d, _)| d.clone())
                                    .unwrap();
                                devices.remove(&lowest);
                            }
                        }
                    }
                    devices.insert(device.to_string(), target);
                    OpResult::Cursor { seq: target }
                }
                Op::SetGroupCursor {
                    group,
                    member,
                    gseq,
                } => {
                    if long(&[&group.group, member]) {
                        return OpResult::Refused(Refusal::IdTooLong);
                    }
                    let last = self.last(&(true, group.group.to_string()));
                    let Some(cur) = self
                        .groups
                        .get_mut(&*group.group)
                        .and_then(|m| m.get_mut(&**member))
                    else {
                        return OpResult::Refused(Refusal::NotMember);
                    };
                    *cur = (*cur).max((*gseq).min(last));
                    OpResult::Cursor { seq: *cur }
                }
                Op::Join { group, member } => {
                    if long(&[&group.group, member]) {
                        return OpResult::Refused(Refusal::IdTooLong);
                    }
                    let last = self.last(&(true, group.group.to_string()));
                    let in_groups = self
                        .groups
                        .values()
                        .filter(|m| m.contains_key(&**member))
                        .count();
                    let members = self.groups.entry(group.group.to_string()).or_default();
                    if members.contains_key(&**member) {
                        return OpResult::Membership {
                            changed: false,
                            members: members.len() as u64,
                        };
                    }
                    if members.len() as u64 >= l.max_group_members {
                        return OpResult::Refused(Refusal::GroupFull);
                    }
                    if in_groups >= l.max_groups_per_user as usize {
                        return OpResult::Refused(Refusal::TooManyGroups);
                    }
                    members.insert(member.to_string(), last);
                    OpResult::Membership {
                        changed: true,
                        members: members.len() as u64,
                    }
                }
                Op::Leave { group, member } => {
                    if long(&[&group.group, member]) {
                        return OpResult::Refused(Refusal::IdTooLong);
                    }
                    let members = self.groups.entry(group.group.to_string()).or_default();
                    let changed = members.remove(&**member).is_some();
                    OpResult::Membership {
                        changed,
                        members: members.len() as u64,
                    }
                }
            }
        }

        /// Checks the store's state against the model's.
        fn check(&self, l: &Limits, tx: &MemTx) -> Result<(), TestCaseError> {
            let mut kept = BTreeMap::new();
            for (log, mids) in &self.logs {
                let keep = if log.0 { l.group_keep } else { l.inbox_keep } as usize;
                let from = mids.len().saturating_sub(keep);
                for (i, mid) in mids.iter().enumerate().skip(from) {
                    kept.insert((log.clone(), i as u64 + 1), *mid);
                }
                prop_assert_eq!(tx.last.get(log).copied(), Some(mids.len() as u64));
            }
            prop_assert_eq!(&tx.messages, &kept);
            let cursors: BTreeMap<(String, String), u64> = self
                .devices
                .iter()
                .flat_map(|(u, ds)| ds.iter().map(move |(d, s)| ((u.clone(), d.clone()), *s)))
                .collect();
            prop_assert_eq!(&tx.cursors, &cursors);
            let members: BTreeMap<(String, String), u64> = self
                .groups
                .iter()
                .flat_map(|(g, ms)| ms.iter().map(move |(m, c)| ((g.clone(), m.clone()), *c)))
                .collect();
            prop_assert_eq!(&tx.members, &members);
            for (g, ms) in &self.groups {
                let size = tx.sizes.get(g).copied().unwrap_or(0);
                prop_assert_eq!(size, ms.len() as u64, "size of group {}", g);
            }
            if l.dedupe_window_ms == 0 {
                prop_assert!(tx.dedupe.is_empty(), "a window of 0 writes no records");
            }
            Ok(())
        }
    }

    /// One generated op: (kind, id, id, number, clock step in ms).
    type Step = (u8, usize, usize, u64, u64);

    fn op(step: Step, mid: u64) -> Op {
        let (kind, a, b, n, _) = step;
        let (a, b) = (NAMES[a % NAMES.len()], NAMES[b % NAMES.len()]);
        let deliver = Deliver {
            mid,
            from: Str::from(b),
            to: None,
            inbox_seq: 0,
            ts: mid * 10,
            kind: None,
            // One body in eight cannot be stored.
            body: Str::from(if n % 8 == 7 { BAD_BODY } else { "hi" }),
            ext: crate::protocol::Ext::new(),
        };
        let group = GroupRef::new(TENANT, a);
        let user = UserRef::new(TENANT, a);
        match kind % 6 {
            0 => Op::AppendInbox {
                user,
                sender: Str::from(b),
                cmid: Str::from(["m1", "m2", "m3"][(n % 3) as usize]),
                deliver,
            },
            1 => Op::AppendGroup {
                group,
                sender: Str::from(b),
                cmid: Str::from(["m1", "m2", "m3"][(n % 3) as usize]),
                deliver,
            },
            2 => Op::SetCursor {
                user,
                device: Str::from(b),
                seq: n % 8,
            },
            3 => Op::SetGroupCursor {
                group,
                member: Str::from(b),
                gseq: n % 8,
            },
            4 => Op::Join {
                group,
                member: Str::from(b),
            },
            _ => Op::Leave {
                group,
                member: Str::from(b),
            },
        }
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec((0u8..6, 0usize..4, 0usize..4, 0u64..64, 0u64..6), 1..120)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every result and every stored row as the model says, with dedupe on (10 ms) or off.
        #[test]
        fn rules_match_the_model(steps in steps(), window in prop_oneof![Just(0u64), Just(10u64)]) {
            let l = limits(window);
            let (mut tx, mut model) = (MemTx::default(), Model::default());
            let mut now = 1_000;
            for (i, step) in steps.into_iter().enumerate() {
                now += step.4;
                let op = op(step, i as u64 + 1);
                let want = model.step(&l, &op, now);
                let got = apply_op(&mut tx, &l, op.clone(), now)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, want, "op {} {:?} at {}", i, op, now);
                model.check(&l, &tx)?;
            }
        }
    }

    /// The limits are reached in the generated sequences, so the model test covers them.
    #[test]
    fn the_model_test_reaches_every_limit() {
        let l = limits(10);
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut seen = BTreeSet::new();
        for _ in 0..256 {
            let steps = steps().new_tree(&mut runner).unwrap().current();
            let mut tx = MemTx::default();
            let mut now = 1_000;
            for (i, step) in steps.into_iter().enumerate() {
                now += step.4;
                let op = op(step, i as u64 + 1);
                // A new device of a user who has the most allowed.
                let full = match &op {
                    Op::SetCursor { user, device, .. } => {
                        tx.cursor(user, device).unwrap().is_none()
                            && tx.cursors(user).unwrap().len() >= 2
                    }
                    _ => false,
                };
                let r = apply_op(&mut tx, &l, op, now).unwrap();
                let what = match r {
                    OpResult::Refused(r) => format!("{r:?}"),
                    OpResult::Appended {
                        duplicate: true, ..
                    } => "duplicate".into(),
                    OpResult::Appended { seq, .. } if seq > 3 => "trimmed".into(),
                    OpResult::Cursor { seq } if full && seq > 0 => "evicted".into(),
                    _ => continue,
                };
                seen.insert(what);
            }
        }
        for want in [
            "IdTooLong",
            "Unencodable",
            "GroupFull",
            "TooManyGroups",
            "NotMember",
            "duplicate",
            "trimmed",
            "evicted",
        ] {
            assert!(seen.contains(want), "never reached: {want} ({seen:?})");
        }
    }
}
