//! The dedupe keys written recently, in memory, in front of the dedupe table.
//!
//! Nearly every append carries a new cmid, so the dedupe lookup is a point read of an absent
//! key (memtables and every L0 table's filter searched: several µs under load). This filter
//! answers "certainly no live record" without the engine when it can, and otherwise defers to
//! the table. It is exact in one direction only: a key it does not hold has no live record,
//! when [`RecentKeys::surely_absent`] says so; a key it holds (or a fingerprint collision) is
//! read.
//!
//! Why a key not held has no live record: every record stored by this process is held until it
//! expires (entries leave in `stored_at` order once they are older than the dedupe window), and
//! records from before this process, or forgotten early because the filter was full, are all
//! older than `exact_since`; the filter only answers once everything before `exact_since` has
//! expired. An expired record may still be in the table (compactions drop it later): the
//! append overwrites it, as it would after reading it.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use super::keys::{FastMap, FastState};

pub(super) struct RecentKeys {
    /// (stored_at, fingerprint) in insertion order (`stored_at` never decreases: the store's
    /// clock does not go back).
    order: VecDeque<(u64, u64)>,
    /// Fingerprint -> entries of `order` holding it.
    counts: FastMap<u64, u32>,
    /// At most this many entries; 0 disables the filter.
    max: usize,
    /// Every record stored at or after this time is held (or has expired).
    exact_since: u64,
}

fn fingerprint(key: &[u8]) -> u64 {
    // The store's keyed hash: fixed for the life of the process, which is all a fingerprint
    // needs (the filter is not persisted).
    FastState::default().hash_one(key)
}

impl RecentKeys {
    /// `exact_since`: a time after every record already in the table (0 for an empty table).
    pub(super) fn new(max: usize, exact_since: u64) -> RecentKeys {
        RecentKeys {
            order: VecDeque::new(),
            counts: FastMap::default(),
            max,
            exact_since,
        }
    }

    /// Whether `key` certainly has no live record, given that every record stored before
    /// `expired_before` has expired.
    pub(super) fn surely_absent(&self, key: &[u8], expired_before: u64) -> bool {
        self.max > 0
            && expired_before >= self.exact_since
            && !self.counts.contains_key(&fingerprint(key))
    }

    /// A record for `key` was stored at `stored_at`.
    pub(super) fn insert(&mut self, key: &[u8], stored_at: u64) {
        if self.max == 0 {
            return;
        }
        if self.order.len() >= self.max {
            // Forgotten while its record may live: the filter stays silent until it has
            // expired.
            if let Some((at, _)) = self.pop() {
                self.exact_since = self.exact_since.max(at.saturating_add(1));
            }
        }
        let fp = fingerprint(key);
        self.order.push_back((stored_at, fp));
        *self.counts.entry(fp).or_insert(0) += 1;
    }

    /// Every record stored before `expired_before` has expired.
    pub(super) fn expired(&mut self, expired_before: u64) {
        while self
            .order
            .front()
            .is_some_and(|&(at, _)| at < expired_before)
        {
            self.pop();
        }
    }

    fn pop(&mut self) -> Option<(u64, u64)> {
        let (at, fp) = self.order.pop_front()?;
        if let Some(n) = self.counts.get_mut(&fp) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&fp);
            }
        }
        Some((at, fp))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::RecentKeys;

    #[test]
    fn absent_only_when_exact_and_not_held() {
        let mut r = RecentKeys::new(2, 100);
        // Records from before this process may exist until the collector passed 100.
        assert!(!r.surely_absent(b"a", 50));
        assert!(r.surely_absent(b"a", 100));
        r.insert(b"a", 120);
        assert!(!r.surely_absent(b"a", 100));
        r.insert(b"a", 130);
        r.insert(b"b", 140);
        // Full: the oldest `a` was forgotten, so nothing is certain before 121.
        assert_eq!(r.len(), 2);
        assert!(!r.surely_absent(b"c", 120));
        assert!(r.surely_absent(b"c", 121));
        // The renewed `a` is still held (counted twice, forgotten once).
        assert!(!r.surely_absent(b"a", 1_000));
        r.expired(135);
        assert!(r.surely_absent(b"a", 1_000));
        assert!(!r.surely_absent(b"b", 1_000));
        assert!(!RecentKeys::new(0, 0).surely_absent(b"x", 10));
    }
}
