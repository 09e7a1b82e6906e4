//! The open-loop schedule: when each event (a message, a publish, a connection attempt) is
//! meant to happen, whatever happened before.
//!
//! Event `k` of a schedule with rate `r` and phase `p` is due at
//! `start + (k + p) / r`, computed from `k` each time so that no error accumulates. A sender
//! that falls behind does not shift later events: it sends the overdue ones at once, each with
//! its own intended time, and latency is measured from that intended time. This is what
//! corrects coordinated omission (a stalled server cannot slow the offered load down and hide
//! its stall from the figures). Several schedules with the same rate and phases `i / n`
//! interleave into one even schedule of `n` times the rate: the loadgen gives each thread
//! of each worker its slice that way.

/// See the module documentation. Times are microseconds on the caller's clock.
#[derive(Clone, Debug)]
pub struct Schedule {
    start_us: u64,
    /// Events per second; 0 for no events.
    rate: f64,
    phase: f64,
    /// Events due at or after this time are not part of the schedule.
    end_us: u64,
    next: u64,
}

impl Schedule {
    /// Events at `rate` per second from `start_us` (shifted by `phase` of an interval,
    /// `0.0 <= phase < 1.0`) until `end_us` (exclusive). A rate of 0 or less has no events.
    pub fn new(start_us: u64, rate: f64, phase: f64, end_us: u64) -> Schedule {
        let rate = if rate > 0.0 && rate.is_finite() {
            rate
        } else {
            0.0
        };
        Schedule {
            start_us,
            rate,
            phase: phase.clamp(0.0, 1.0),
            end_us,
            next: 0,
        }
    }

    /// The intended time of event `k`.
    pub fn due_at(&self, k: u64) -> u64 {
        if self.rate == 0.0 {
            return u64::MAX;
        }
        let offset = (k as f64 + self.phase) * 1e6 / self.rate;
        if offset.is_finite() && offset < (u64::MAX - self.start_us) as f64 {
            self.start_us + offset as u64
        } else {
            u64::MAX
        }
    }

    /// The intended time of the next event, or `None` when the schedule is over.
    pub fn next_due(&self) -> Option<u64> {
        let due = self.due_at(self.next);
        (due < self.end_us).then_some(due)
    }

    /// Takes the next event if it is due at `now_us`: its index and intended time.
    pub fn pop_due(&mut self, now_us: u64) -> Option<(u64, u64)> {
        let due = self.next_due()?;
        if due > now_us {
            return None;
        }
        let k = self.next;
        self.next += 1;
        Some((k, due))
    }

    /// How many events were taken.
    #[cfg(test)]
    pub fn taken(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_evenly_spaced_and_bounded() {
        let mut s = Schedule::new(1_000, 5000.0, 0.0, 1_000 + 1_000_000);
        let mut times = Vec::new();
        while let Some((k, t)) = s.pop_due(u64::MAX - 1) {
            assert_eq!(k, times.len() as u64);
            times.push(t);
        }
        assert_eq!(times.len(), 5000, "one second at 5000/s");
        assert_eq!(times[0], 1_000);
        assert!(times.windows(2).all(|w| w[1] - w[0] == 200));
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn a_stall_keeps_intended_times_and_catches_up_at_once() {
        let mut s = Schedule::new(0, 1000.0, 0.0, 10_000_000);
        // On time for 10 ms.
        let mut sent = Vec::new();
        for now in (0..10_000).step_by(100) {
            while let Some((_, t)) = s.pop_due(now) {
                sent.push((t, now));
            }
        }
        assert_eq!(sent.len(), 10);
        assert!(sent.iter().all(|(t, now)| now - t < 100));
        // The sender stalls 50 ms, then everything overdue comes out in one go, with the
        // times it was meant for (so latency counts the stall), not the time it left.
        let late: Vec<(u64, u64)> = std::iter::from_fn(|| s.pop_due(60_000)).collect();
        assert_eq!(late.len(), 51, "events 10..=60");
        assert_eq!(late.first().unwrap().1, 10_000);
        assert_eq!(late.last().unwrap().1, 60_000);
        assert!(late.windows(2).all(|w| w[1].1 - w[0].1 == 1000));
        // And the schedule goes on where it was meant to be.
        assert_eq!(s.next_due(), Some(61_000));
        assert_eq!(s.taken(), 61);
    }

    #[test]
    fn phased_slices_interleave_into_one_even_schedule() {
        // 4 slices at 250/s each, phases 0, 1/4, 2/4, 3/4: together 1000/s, 1 ms apart.
        let mut all: Vec<u64> = (0..4)
            .flat_map(|i| {
                let mut s = Schedule::new(0, 250.0, i as f64 / 4.0, 1_000_000);
                std::iter::from_fn(move || s.pop_due(u64::MAX - 1).map(|(_, t)| t))
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all.len(), 1000);
        assert!(
            all.windows(2).all(|w| w[1] - w[0] == 1000),
            "{:?}",
            &all[..8]
        );
    }

    #[test]
    fn no_drift_over_long_runs_and_zero_rate() {
        // 3 per second does not divide a microsecond grid: times come from k, not summed.
        let s = Schedule::new(0, 3.0, 0.0, u64::MAX);
        assert_eq!(s.due_at(3_000_000), 1_000_000_000_000);
        let mut none = Schedule::new(0, 0.0, 0.0, u64::MAX);
        assert_eq!(none.next_due(), None);
        assert_eq!(none.pop_due(u64::MAX - 1), None);
    }
}
