//! A device's delivery window (durability `local`), sans-IO.
//!
//! It owns, for one device: the deliveries pushed and not yet acked (at most `limits.window`)
//! with their retransmit deadlines, the highest `inbox_seq` the device has, whether the store
//! holds messages after it that were not pushed (the device is "lagging"), the store read
//! under way to bring them (the pump), a `sync` holding live pushes back, the acked cursor not
//! yet written, and in a cluster the login catch-up read.
//!
//! It decides; the shard carries out (src/shard/delivery.rs): writes the deliveries it
//! returns, submits the reads it asks for, arms the deadlines, counts in the metrics.
//!
//! The rules, which `tests::no_loss_no_duplicate_no_disorder` checks against a model store:
//! - pushes are gapless and in order: a push that does not follow the last one, or that the
//!   window has no room for, is not written; the device is lagging and the pump reads the
//!   missing range from the store, after the last pushed;
//! - every message offered is in the store already (the owner pushes after the append), so a
//!   device is lagging while anything offered lies past its last push, whatever a page said:
//!   a read made before a message was stored answers "nothing more" and the message may be
//!   offered before that answer arrives;
//! - a `sync` holds live pushes back until its last page; what came meanwhile follows by the
//!   pump, so a message is never both pushed and paged, nor pushed ahead of older pages.

use std::collections::VecDeque;

use crate::protocol::Deliver;
use crate::store::InboxPage;

/// A window's bounds, from `limits`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds {
    /// Unacked deliveries at most (`limits.window`).
    pub max: usize,
    /// The first retransmit's delay (`limits.retransmit_base_ms`); doubled per attempt.
    pub retransmit_base_ms: u64,
    /// Retransmits of one delivery before the device is given up on (`limits.retry_limit`).
    pub retry_limit: u32,
}

impl Bounds {
    pub(super) fn of(l: &crate::config::Limits) -> Bounds {
        Bounds {
            max: l.window as usize,
            retransmit_base_ms: l.retransmit_base_ms,
            retry_limit: l.retry_limit,
        }
    }
}

/// One unacked delivery.
struct Pending {
    deliver: Deliver,
    attempts: u32,
    due_ms: u64,
}

/// A device's delivery window.
#[derive(Default)]
pub(super) struct Window {
    unacked: VecDeque<Pending>,
    /// Highest `inbox_seq` pushed (or synced) to this device.
    last_pushed: u64,
    /// `last_pushed` is the device's real position (a sync finished, or something was
    /// pushed), even at 0: an empty inbox synced. Until then the first push sets it.
    positioned: bool,
    /// Pushes were not written: the store holds messages after `last_pushed` not yet pushed.
    lagging: bool,
    /// The highest `inbox_seq` offered, written or not. The store holds it.
    offered: u64,
    /// Until positioned: the lowest `inbox_seq` offered (0: none), where a device that
    /// takes live messages from its first push starts when that push had to wait.
    first_offered: u64,
    /// A pump read is in flight.
    pumping: bool,
    /// A pump read could not be made and the shard lists this device for the next tick.
    pump_retry: bool,
    /// A `sync` (or `resume`, or a cluster login's position read) is under way: live pushes
    /// are held back (the device is marked lagging) and the pump resumes after its end.
    syncing: bool,
    /// The highest `inbox_seq` acked and not yet handed to the store (0: none).
    cursor: u64,
    /// Cluster mode: when to read the store once after login (0: not due). Other nodes learn
    /// that this device is here through Redis and their route caches, so a message accepted
    /// elsewhere right after the login's sync may not be relayed here; this one read, after
    /// the caches expired, closes that gap (src/services/cluster.rs).
    catchup_ms: u64,
}

/// What becomes of a live push.
#[derive(Debug)]
pub(super) enum Offer {
    /// Write it now: it entered the window, to be resent from `due_ms` until acked.
    Push { due_ms: u64 },
    /// The device has it already (pushed, or paged by a sync).
    Had,
    /// Not written: the device is lagging and the pump brings it (ask [`Window::pump`]).
    Lag,
}

/// What a page read for the pump gives.
#[derive(Debug, Default)]
pub(super) struct Pumped {
    /// The deliveries that entered the window, to write in this order; resent from `due_ms`.
    pub push: Vec<Deliver>,
    pub due_ms: u64,
    /// The page brought nothing though the device is lagging (the read was made before the
    /// message it lacks was stored): read again on the next tick rather than at once, so
    /// that a store that keeps answering so costs one read per tick.
    pub retry_on_tick: bool,
}

/// What a deadline finds.
#[derive(Debug)]
pub(super) enum Due {
    /// A delivery ran out of retransmits: the window is emptied (`dropped` deliveries failed)
    /// and the device is to be closed; it recovers by `sync`.
    RetryLimit { dropped: u64 },
    /// Resend these; `catchup`: the cluster login's catch-up is due (ask [`Window::pump`]);
    /// the next deadline, if any.
    Resend {
        resend: Vec<Deliver>,
        catchup: bool,
        next_ms: Option<u64>,
    },
}

impl Window {
    /// A live push of `d`.
    pub(super) fn offer(&mut self, d: &Deliver, now_ms: u64, b: &Bounds) -> Offer {
        let seq = d.inbox_seq;
        if seq <= self.last_pushed {
            return Offer::Had;
        }
        self.offered = self.offered.max(seq);
        if !self.positioned && (self.first_offered == 0 || seq < self.first_offered) {
            self.first_offered = seq;
        }
        if self.syncing {
            self.lagging = true;
            return Offer::Lag;
        }
        let unknown = !self.positioned && self.last_pushed == 0;
        let in_order = unknown || seq == self.last_pushed + 1;
        if !in_order || self.lagging || self.pumping || self.unacked.len() >= b.max {
            if unknown {
                // The device takes live messages from the first one offered on.
                self.last_pushed = self.first_offered.saturating_sub(1);
            }
            self.lagging = true;
            return Offer::Lag;
        }
        let due_ms = self.enter(d.clone(), now_ms, b);
        Offer::Push { due_ms }
    }

    fn enter(&mut self, d: Deliver, now_ms: u64, b: &Bounds) -> u64 {
        debug_assert!(self
            .unacked
            .back()
            .is_none_or(|p| p.deliver.inbox_seq < d.inbox_seq));
        self.last_pushed = d.inbox_seq;
        self.positioned = true;
        let due_ms = now_ms + b.retransmit_base_ms;
        self.unacked.push_back(Pending {
            deliver: d,
            attempts: 0,
            due_ms,
        });
        due_ms
    }

    /// This device's own message took `seq` in its user's inbox (the sender's copy): in step,
    /// the window steps over it, the device has it. Out of step, the pump brings the copy.
    pub(super) fn step_over(&mut self, seq: u64) {
        let in_step = self.positioned && !self.syncing && !self.lagging && !self.pumping;
        if in_step && self.last_pushed + 1 == seq {
            self.last_pushed = seq;
            self.offered = self.offered.max(seq);
        }
    }

    /// The pump read a lagging device needs, `(after, limit)`: when nothing else reads for it
    /// and the window has room for at least half its size. Marks the read in flight.
    pub(super) fn pump(&mut self, b: &Bounds) -> Option<(u64, u32)> {
        let room = b.max.saturating_sub(self.unacked.len());
        if !self.lagging || self.pumping || self.syncing || room < b.max / 2 || room == 0 {
            return None;
        }
        self.pumping = true;
        Some((self.last_pushed, u32::try_from(room).unwrap_or(u32::MAX)))
    }

    /// The pump read was refused or failed. `true`: list the device for the next tick's
    /// retry (once; [`Window::retry_taken`] when it is taken off the list).
    pub(super) fn pump_failed(&mut self) -> bool {
        self.pumping = false;
        !std::mem::replace(&mut self.pump_retry, true)
    }

    /// Taken off the shard's retry list.
    pub(super) fn retry_taken(&mut self) {
        self.pump_retry = false;
    }

    /// A pump page: the messages that follow the last push enter the window. During a sync
    /// nothing does (the sync pages them); the pump reads again after it.
    pub(super) fn pumped(&mut self, page: InboxPage, now_ms: u64, b: &Bounds) -> Pumped {
        self.pumping = false;
        let mut out = Pumped {
            due_ms: now_ms + b.retransmit_base_ms,
            ..Pumped::default()
        };
        if self.syncing {
            self.lagging = true;
            return out;
        }
        for d in page.messages {
            if d.inbox_seq == self.last_pushed + 1 && self.unacked.len() < b.max {
                self.enter(d.clone(), now_ms, b);
                out.push.push(d);
            }
        }
        self.offered = self.offered.max(self.last_pushed);
        // A page may end before a message offered meanwhile: the device still lacks it.
        self.lagging = page.more || self.offered > self.last_pushed;
        out.retry_on_tick = self.lagging && out.push.is_empty();
        out
    }

    /// A `sync` (or a read it waits for) begins: live pushes are held back. Returns whether
    /// one was under way already, for [`Window::sync_refused`].
    pub(super) fn begin_sync(&mut self) -> bool {
        std::mem::replace(&mut self.syncing, true)
    }

    /// The read `begin_sync` announced could not be made.
    pub(super) fn sync_refused(&mut self, was_syncing: bool) {
        self.syncing = was_syncing;
    }

    /// The sync ended without a position (its read failed, or it goes on as another).
    pub(super) fn end_sync(&mut self) {
        self.syncing = false;
    }

    /// The sync's last page: the device has everything up to `through`.
    pub(super) fn synced_through(&mut self, through: u64) {
        self.last_pushed = self.last_pushed.max(through);
        self.offered = self.offered.max(self.last_pushed);
        self.positioned = true;
        self.syncing = false;
    }

    /// A cumulative `ack`: how many deliveries it confirmed, and whether the device's cursor
    /// became dirty (the shard lists it for the next cursor write, once).
    pub(super) fn ack(&mut self, inbox_seq: u64) -> (u64, bool) {
        let mut confirmed = 0;
        while self
            .unacked
            .front()
            .is_some_and(|p| p.deliver.inbox_seq <= inbox_seq)
        {
            self.unacked.pop_front();
            confirmed += 1;
        }
        let first = self.cursor == 0 && inbox_seq > 0;
        self.cursor = self.cursor.max(inbox_seq);
        (confirmed, first)
    }

    /// The acked position not yet written (0: none).
    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The cursor was handed to the store.
    pub(super) fn cursor_written(&mut self) {
        self.cursor = 0;
    }

    /// Cluster mode: read the store once at `at_ms` (see `catchup_ms`).
    pub(super) fn schedule_catchup(&mut self, at_ms: u64) {
        self.catchup_ms = at_ms;
    }

    /// What is due at `now_ms`: retransmits with exponential backoff and jitter
    /// (deterministic per sequence, attempt and place), the catch-up, or the retry limit.
    pub(super) fn due(&mut self, now_ms: u64, b: &Bounds) -> Due {
        let mut resend = Vec::new();
        for (i, p) in self.unacked.iter_mut().enumerate() {
            if p.due_ms > now_ms {
                continue;
            }
            if p.attempts >= b.retry_limit {
                let dropped = self.unacked.len() as u64;
                self.unacked.clear();
                return Due::RetryLimit { dropped };
            }
            p.attempts += 1;
            let backoff = b.retransmit_base_ms.saturating_mul(1 << p.attempts.min(16));
            let jitter = (p.deliver.inbox_seq.wrapping_mul(2_654_435_761)
                ^ u64::from(p.attempts)
                ^ i as u64)
                % (backoff / 4 + 1);
            p.due_ms = now_ms + backoff + jitter;
            resend.push(p.deliver.clone());
        }
        let mut catchup = false;
        if self.catchup_ms != 0 && self.catchup_ms <= now_ms {
            self.catchup_ms = 0;
            // Only a device with a known position: one that never synced nor got a push
            // takes live messages from its first push on (as on a single node).
            if self.positioned {
                self.lagging = true;
                catchup = true;
            }
        }
        let pending_catchup = (self.catchup_ms != 0).then_some(self.catchup_ms);
        let next_ms = self
            .unacked
            .iter()
            .map(|p| p.due_ms)
            .chain(pending_catchup)
            .min();
        Due::Resend {
            resend,
            catchup,
            next_ms,
        }
    }

    /// Deliveries pushed and not acked.
    pub(super) fn unacked(&self) -> usize {
        self.unacked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(seq: u64) -> Deliver {
        Deliver {
            mid: seq,
            from: "a".into(),
            to: None,
            inbox_seq: seq,
            ts: 0,
            kind: None,
            body: "x".into(),
            ext: Default::default(),
        }
    }

    const B: Bounds = Bounds {
        max: 4,
        retransmit_base_ms: 100,
        retry_limit: 3,
    };

    fn synced() -> Window {
        let mut w = Window::default();
        w.synced_through(0);
        w
    }

    fn page(from: u64, to: u64, more: bool) -> InboxPage {
        InboxPage {
            messages: (from..=to).map(msg).collect(),
            more,
        }
    }

    #[test]
    fn pushes_in_order_until_the_window_is_full_then_pumps_the_rest() {
        let mut w = synced();
        for seq in 1..=4 {
            assert!(matches!(
                w.offer(&msg(seq), 0, &B),
                Offer::Push { due_ms: 100 }
            ));
        }
        assert!(matches!(w.offer(&msg(5), 0, &B), Offer::Lag));
        assert!(matches!(w.offer(&msg(4), 0, &B), Offer::Had));
        assert_eq!(w.pump(&B), None, "no room for half a window");
        assert_eq!(w.ack(2), (2, true));
        assert_eq!(w.pump(&B), Some((4, 2)));
        assert_eq!(w.pump(&B), None, "one read at a time");
        assert!(
            matches!(w.offer(&msg(6), 0, &B), Offer::Lag),
            "the pump is ahead of it"
        );
        let p = w.pumped(page(5, 6, false), 10, &B);
        assert_eq!(
            p.push.iter().map(|d| d.inbox_seq).collect::<Vec<_>>(),
            [5, 6]
        );
        assert_eq!((p.due_ms, p.retry_on_tick), (110, false));
        assert!(matches!(w.offer(&msg(7), 0, &B), Offer::Lag), "full again");
        assert_eq!(w.ack(6), (4, false));
        assert_eq!(w.cursor(), 6);
    }

    #[test]
    fn a_message_offered_while_a_page_was_read_stays_owed() {
        // The read saw the store up to 2; 3 was stored and offered before the page came back.
        let mut w = synced();
        assert!(
            matches!(w.offer(&msg(2), 0, &B), Offer::Lag),
            "1 is missing"
        );
        assert_eq!(w.pump(&B), Some((0, 4)));
        assert!(matches!(w.offer(&msg(3), 0, &B), Offer::Lag));
        let p = w.pumped(page(1, 2, false), 0, &B);
        assert_eq!(p.push.len(), 2);
        assert!(!p.retry_on_tick, "it made progress: read again at once");
        assert_eq!(
            w.pump(&B),
            Some((2, 2)),
            "3 is owed though the page said no more"
        );
        let p = w.pumped(page(3, 3, false), 0, &B);
        assert_eq!(p.push.len(), 1);
        assert_eq!(w.pump(&B), None, "caught up");
    }

    #[test]
    fn a_page_that_brings_nothing_owed_is_read_again_on_the_tick() {
        let mut w = synced();
        assert!(matches!(w.offer(&msg(2), 0, &B), Offer::Lag));
        assert_eq!(w.pump(&B), Some((0, 4)));
        let p = w.pumped(page(1, 0, false), 0, &B);
        assert!(p.push.is_empty() && p.retry_on_tick);
        assert!(w.pump_failed(), "listed once");
        assert!(!w.pump_failed(), "not twice");
        w.retry_taken();
        assert_eq!(w.pump(&B), Some((0, 4)));
    }

    #[test]
    fn a_sync_holds_pushes_back_and_the_pump_brings_them_after_it() {
        let mut w = synced();
        assert!(matches!(w.offer(&msg(1), 0, &B), Offer::Push { .. }));
        assert!(!w.begin_sync());
        assert!(matches!(w.offer(&msg(2), 0, &B), Offer::Lag));
        assert_eq!(w.pump(&B), None, "not during the sync");
        w.synced_through(1);
        assert_eq!(w.pump(&B), Some((1, 3)));
        // A sync that could not start lets pushes go again.
        let mut w = synced();
        let was = w.begin_sync();
        w.sync_refused(was);
        assert!(matches!(w.offer(&msg(1), 0, &B), Offer::Push { .. }));
    }

    #[test]
    fn an_unpositioned_device_starts_at_its_first_push() {
        let mut w = Window::default();
        assert!(matches!(w.offer(&msg(7), 0, &B), Offer::Push { .. }));
        let mut w = Window::default();
        w.begin_sync();
        assert!(matches!(w.offer(&msg(7), 0, &B), Offer::Lag));
        w.end_sync();
        assert!(matches!(w.offer(&msg(8), 0, &B), Offer::Lag));
        assert_eq!(
            w.pump(&B),
            Some((6, 4)),
            "from the first offered, held back by the sync"
        );
    }

    #[test]
    fn the_own_copy_is_stepped_over_only_in_step() {
        let mut w = synced();
        w.step_over(1);
        assert!(matches!(w.offer(&msg(2), 0, &B), Offer::Push { .. }));
        w.step_over(4);
        assert!(matches!(w.offer(&msg(3), 0, &B), Offer::Push { .. }));
    }

    #[test]
    fn retransmits_back_off_then_give_up() {
        let mut w = synced();
        let Offer::Push { due_ms: due } = w.offer(&msg(1), 0, &B) else {
            panic!("not pushed")
        };
        let Due::Resend {
            resend, next_ms, ..
        } = w.due(due - 1, &B)
        else {
            panic!("gave up early")
        };
        assert!(resend.is_empty());
        assert_eq!(next_ms, Some(due));
        let mut at = due;
        for attempt in 1..=3u32 {
            let Due::Resend {
                resend, next_ms, ..
            } = w.due(at, &B)
            else {
                panic!("gave up at attempt {attempt}")
            };
            assert_eq!(resend.len(), 1);
            let next = next_ms.unwrap();
            let backoff = 100 << attempt;
            assert!((at + backoff..=at + backoff + backoff / 4).contains(&next));
            at = next;
        }
        assert!(matches!(w.due(at, &B), Due::RetryLimit { dropped: 1 }));
        assert_eq!(w.unacked(), 0);
    }

    #[test]
    fn the_catchup_reads_once_for_a_positioned_device() {
        let mut w = synced();
        w.schedule_catchup(500);
        assert!(matches!(
            w.due(0, &B),
            Due::Resend {
                catchup: false,
                next_ms: Some(500),
                ..
            }
        ));
        assert!(matches!(
            w.due(500, &B),
            Due::Resend {
                catchup: true,
                next_ms: None,
                ..
            }
        ));
        assert_eq!(w.pump(&B), Some((0, 4)));
        let mut w = Window::default();
        w.schedule_catchup(500);
        assert!(matches!(w.due(500, &B), Due::Resend { catchup: false, .. }));
    }

    /// One step of the model run: what happens next among the store, the channels and the
    /// device. Indices pick among what is in flight (modulo its length).
    #[derive(Clone, Debug)]
    enum Step {
        /// A message is stored; its push is on its way to the device's shard.
        Store,
        /// One push in flight reaches the window (not necessarily the oldest: in a cluster
        /// pushes arrive by several paths).
        Arrive(usize),
        /// The oldest read asked for is made against the store as it is now.
        Read,
        /// The oldest read is refused (the I/O queue was full) or fails.
        ReadFails,
        /// One page read reaches the window.
        Page(usize),
        /// The device acks what it has in order.
        Ack,
        /// The tick: `ms` pass, retries and retransmits run.
        Tick(u64),
        /// A sync from the device's position, read at once, paged back later.
        Sync,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Store),
            4 => (0..8usize).prop_map(Step::Arrive),
            2 => Just(Step::Read),
            1 => Just(Step::ReadFails),
            2 => (0..4usize).prop_map(Step::Page),
            2 => Just(Step::Ack),
            1 => (1..300u64).prop_map(Step::Tick),
            1 => Just(Step::Sync),
        ]
    }

    /// The model: a store, pushes and reads in flight, the device's view.
    #[derive(Default)]
    struct Model {
        stored: u64,
        pushes: Vec<u64>,
        reads: VecDeque<(u64, u32)>,
        pages: Vec<(InboxPage, bool)>,
        sync_wait: Option<(u64, InboxPage)>,
        retry: bool,
        now_ms: u64,
        /// What the device has, in the order it first got it.
        got: Vec<u64>,
        closed: bool,
        /// The device logged in without a position: it takes messages from the first one
        /// it gets on, after the `before` stored before it came.
        unpositioned: bool,
        before: u64,
    }

    impl Model {
        fn read(&self, after: u64, limit: u32) -> InboxPage {
            let to = self.stored.min(after + u64::from(limit));
            page(after + 1, to, to < self.stored)
        }

        fn receive(&mut self, d: &Deliver) -> Result<(), String> {
            let seq = d.inbox_seq;
            let next = self.got.last().copied().unwrap_or(0) + 1;
            if seq == next || (self.got.is_empty() && self.unpositioned) {
                self.got.push(seq);
                Ok(())
            } else if seq < next {
                Err(format!("{seq} again after {:?}", self.got))
            } else {
                Err(format!("{seq} before {next}"))
            }
        }

        fn pump(&mut self, w: &mut Window) {
            if let Some(r) = w.pump(&B) {
                self.reads.push_back(r);
            }
        }

        fn apply(&mut self, w: &mut Window, s: Step) -> Result<(), String> {
            match s {
                Step::Store => {
                    self.stored += 1;
                    self.pushes.push(self.stored);
                }
                Step::Arrive(i) if !self.pushes.is_empty() => {
                    let seq = self.pushes.remove(i % self.pushes.len());
                    let d = msg(seq);
                    match w.offer(&d, self.now_ms, &B) {
                        Offer::Push { .. } => self.receive(&d)?,
                        Offer::Had => {}
                        Offer::Lag => self.pump(w),
                    }
                }
                Step::Read => {
                    if let Some((after, limit)) = self.reads.pop_front() {
                        let p = self.read(after, limit);
                        self.pages.push((p, true));
                    }
                }
                Step::ReadFails => {
                    let listed = self.reads.pop_front().is_some() && w.pump_failed();
                    self.retry |= listed;
                }
                Step::Page(i) if !self.pages.is_empty() => {
                    let (p, _) = self.pages.remove(i % self.pages.len());
                    let out = w.pumped(p, self.now_ms, &B);
                    for d in &out.push {
                        self.receive(d)?;
                    }
                    if out.retry_on_tick {
                        if w.pump_failed() {
                            self.retry = true;
                        }
                    } else {
                        self.pump(w);
                    }
                }
                Step::Ack => {
                    let at = self.got.last().copied().unwrap_or(0);
                    w.ack(at);
                    self.pump(w);
                }
                Step::Tick(ms) => {
                    self.now_ms += ms;
                    if std::mem::take(&mut self.retry) {
                        w.retry_taken();
                        self.pump(w);
                    }
                    if let Some((after, p)) = self.sync_wait.take() {
                        // The sync's page comes back: written as it is, then pushes resume.
                        let through = p.messages.last().map_or(after, |d| d.inbox_seq);
                        for d in &p.messages {
                            self.receive(d)?;
                        }
                        w.synced_through(through);
                        self.pump(w);
                    }
                    match w.due(self.now_ms, &B) {
                        Due::RetryLimit { .. } => self.closed = true,
                        Due::Resend { resend, .. } => {
                            for d in resend {
                                if !self.got.contains(&d.inbox_seq) {
                                    return Err(format!("{} resent, never sent", d.inbox_seq));
                                }
                            }
                        }
                    }
                }
                Step::Sync if self.sync_wait.is_none() => {
                    // A sync from what the device has, read whole (one page) at once.
                    w.begin_sync();
                    let at = self.got.last().copied().unwrap_or(0);
                    let p = self.read(at, u32::MAX);
                    self.sync_wait = Some((at, p));
                }
                _ => {}
            }
            Ok(())
        }

        /// The device ends at the last message stored: from 1 on, or when it logged in
        /// without a position, from the first it got (nothing if none came after it).
        fn has_all(&self) -> bool {
            let start = if self.unpositioned { self.before } else { 0 };
            self.got.last().copied().unwrap_or(start) == self.stored
        }

        /// Everything in flight arrives, the device acks, time passes: the device must end
        /// with every stored message.
        fn settle(&mut self, w: &mut Window) -> Result<(), String> {
            for _ in 0..10_000 {
                if self.closed {
                    return Ok(());
                }
                let quiet = self.pushes.is_empty()
                    && self.reads.is_empty()
                    && self.pages.is_empty()
                    && self.sync_wait.is_none()
                    && !self.retry;
                if quiet && self.has_all() && w.unacked() == 0 {
                    return Ok(());
                }
                let s = if !self.pushes.is_empty() {
                    Step::Arrive(0)
                } else if !self.reads.is_empty() {
                    Step::Read
                } else if !self.pages.is_empty() {
                    Step::Page(0)
                } else if w.unacked() > 0 {
                    Step::Ack
                } else {
                    Step::Tick(10)
                };
                self.apply(w, s)?;
            }
            Err(format!(
                "stuck: stored {}, device has {:?}",
                self.stored, self.got
            ))
        }
    }

    fn run(steps: Vec<Step>, mut m: Model, mut w: Window) -> Result<(), TestCaseError> {
        for s in steps {
            if m.closed {
                break;
            }
            m.apply(&mut w, s).map_err(TestCaseError::fail)?;
        }
        m.settle(&mut w).map_err(TestCaseError::fail)?;
        prop_assert!(
            m.closed || m.has_all(),
            "stored {}, got {:?}",
            m.stored,
            m.got
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Whatever the order pushes, reads, pages, acks, syncs and time come in, a device
        /// positioned at 0 gets every stored message once, in order, and only what it got is
        /// resent.
        #[test]
        fn no_loss_no_duplicate_no_disorder(steps in proptest::collection::vec(step(), 1..200)) {
            run(steps, Model::default(), synced())?;
        }

        /// The same for a device that logged in without a position after `before` messages:
        /// it gets, once and in order, everything from the first message it got.
        #[test]
        fn from_the_first_push_on_without_a_position(
            before in 0..5u64,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let m = Model { stored: before, before, unpositioned: true, ..Model::default() };
            run(steps, m, Window::default())?;
        }
    }
}
