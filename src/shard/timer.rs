//! The shard's timer wheel: one hashed wheel drives every handshake, idle, heartbeat and
//! retransmit deadline of the shard's connections (SPEC 2), advanced by one runtime timer per
//! shard instead of one per connection.
//!
//! Entries are never cancelled: the owner re-checks its real deadline when an entry fires and
//! re-arms if it moved (lazy invalidation), so arming is O(1) and nothing is searched.

/// Hashed timing wheel with `slots` buckets of `tick_ms` each; deadlines further out than one
/// revolution wait in their bucket for the right round.
pub struct TimerWheel<T> {
    tick_ms: u64,
    buckets: Vec<Vec<(u64, T)>>,
    /// The earliest tick that may still hold due entries.
    cursor: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    pub fn new(tick_ms: u64, slots: usize, now_ms: u64) -> Self {
        assert!(tick_ms > 0 && slots > 0);
        TimerWheel {
            tick_ms,
            buckets: (0..slots).map(|_| Vec::new()).collect(),
            cursor: now_ms / tick_ms,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms `item` to fire at `deadline_ms` (or at the next advance if already due).
    pub fn insert(&mut self, deadline_ms: u64, item: T) {
        let tick = (deadline_ms / self.tick_ms).max(self.cursor);
        let n = self.buckets.len() as u64;
        self.buckets[(tick % n) as usize].push((deadline_ms, item));
        self.len += 1;
    }

    /// Moves time to `now_ms`, appending every due `(deadline, item)` to `due`.
    pub fn advance(&mut self, now_ms: u64, due: &mut Vec<(u64, T)>) {
        let target = now_ms / self.tick_ms;
        let n = self.buckets.len() as u64;
        // Visiting more than one revolution would only revisit the same buckets.
        let first = self.cursor.max(target.saturating_sub(n - 1));
        for tick in first..=target {
            let bucket = &mut self.buckets[(tick % n) as usize];
            let mut i = 0;
            while i < bucket.len() {
                if bucket[i].0 <= now_ms {
                    due.push(bucket.swap_remove(i));
                    self.len -= 1;
                } else {
                    i += 1;
                }
            }
        }
        // The current tick is only partly over: look at its bucket again next time.
        self.cursor = target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = TimerWheel::new(10, 8, 0);
        w.insert(25, "a");
        w.insert(5, "b");
        w.insert(1_000, "far");
        let mut due = Vec::new();
        w.advance(9, &mut due);
        assert_eq!(due, vec![(5, "b")]);
        due.clear();
        w.advance(24, &mut due);
        assert!(due.is_empty());
        w.advance(30, &mut due);
        assert_eq!(due, vec![(25, "a")]);
        due.clear();
        // "far" shares buckets with earlier ticks on every revolution but waits its turn.
        w.advance(999, &mut due);
        assert!(due.is_empty());
        w.advance(1_000, &mut due);
        assert_eq!(due, vec![(1_000, "far")]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_fire_on_next_advance_and_big_jumps_lose_nothing() {
        let mut w = TimerWheel::new(10, 4, 100);
        w.insert(50, 1);
        for d in [150, 300, 777] {
            w.insert(d, d);
        }
        let mut due = Vec::new();
        w.advance(10_000, &mut due);
        let mut items: Vec<_> = due.iter().map(|(_, i)| *i).collect();
        items.sort();
        assert_eq!(items, vec![1, 150, 300, 777]);
    }
}
