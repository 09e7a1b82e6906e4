//! Delivery integrity per conversation: what was sent, acknowledged, refused and delivered,
//! and from that the lost, duplicated and out-of-order deliveries.
//!
//! A conversation is one direction of traffic from one sender connection to one receiver
//! connection; its messages carry sequence numbers 0, 1, 2, ... in send order. This module
//! owns the bookkeeping of one conversation ([`ConvTrack`]), the acknowledgements a pub/sub
//! publisher's conversations share ([`SharedAcks`]), and the totals that are summed over
//! conversations, threads and workers ([`Tally`]). It does no I/O.
//!
//! Definitions (also in the summary and the JSON):
//! - `lost`: acknowledged by the server (`send_ack`) and never delivered.
//! - `unconfirmed`: sent, neither acknowledged nor refused, and never delivered.
//! - `duplicates`: deliveries of a sequence number already delivered.
//! - `out_of_order`: first deliveries of a sequence number below one delivered before.
//! - `unknown`: deliveries of a sequence number that was never sent.

use serde::{Deserialize, Serialize};

/// A growable set of sequence numbers.
#[derive(Clone, Debug, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn get(&self, i: u64) -> bool {
        let w = (i / 64) as usize;
        self.0.get(w).is_some_and(|x| x & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; returns whether it was already set.
    fn set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let mask = 1 << (i % 64);
        let was = self.0[w] & mask != 0;
        self.0[w] |= mask;
        was
    }

    /// Word `w` of the set (bits `64 * w ..`), 0 past its end.
    fn word(&self, w: usize) -> u64 {
        self.0.get(w).copied().unwrap_or(0)
    }

    /// Sets the bits of `bits` in word `w`.
    fn or_word(&mut self, w: usize, bits: u64) {
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= bits;
    }
}

/// The acknowledgements of one publisher's messages in pub/sub fan-out. Every subscriber's
/// conversation of a publisher carries the same sequence numbers, so a `send_ack` is one bit
/// here rather than one in each of its thousands of conversations (one bit per delivery,
/// touched at the rate of the deliveries); [`ConvTrack::merge_acks`] takes them into a
/// conversation when its tally or settlement is asked for.
#[derive(Clone, Debug, Default)]
pub struct SharedAcks {
    acked: Bits,
    dup_acks: u64,
}

impl SharedAcks {
    /// The server acknowledged `seq`, of the `sent` messages published so far. Returns false
    /// for a sequence number never sent or acknowledged twice (counted in
    /// [`SharedAcks::dup_acks`]).
    pub fn on_ack(&mut self, seq: u64, sent: u64) -> bool {
        if seq >= sent || self.acked.set(seq) {
            self.dup_acks += 1;
            return false;
        }
        true
    }

    /// The server acknowledged `seq`.
    pub fn is_acked(&self, seq: u64) -> bool {
        self.acked.get(seq)
    }

    /// Acknowledgements of a sequence number never sent or acknowledged before.
    pub fn dup_acks(&self) -> u64 {
        self.dup_acks
    }
}

/// What one delivery was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// First delivery of this sequence number, after every lower one delivered so far.
    InOrder,
    /// First delivery, but a higher sequence number was delivered before it.
    OutOfOrder,
    /// This sequence number was delivered before.
    Duplicate,
    /// This sequence number was never sent.
    Unknown,
}

/// The bookkeeping of one conversation. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct ConvTrack {
    sent: u64,
    acked: Bits,
    refused: Bits,
    delivered: Bits,
    acked_n: u64,
    refused_n: u64,
    delivered_n: u64,
    /// Sequence numbers both acknowledged and delivered.
    acked_delivered: u64,
    max_delivered: Option<u64>,
    duplicates: u64,
    out_of_order: u64,
    unknown: u64,
    dup_acks: u64,
    /// Every message was accepted as it was written ([`ConvTrack::mark_sent_accepted`]):
    /// `acked` is not kept.
    implicit_acks: bool,
}

impl ConvTrack {
    /// The sequence number the next message will carry.
    pub fn next_seq(&self) -> u64 {
        self.sent
    }

    /// The message with [`ConvTrack::next_seq`] was written to the server.
    pub fn mark_sent(&mut self) {
        self.sent += 1;
    }

    /// The message with [`ConvTrack::next_seq`] was written and counts as accepted at once
    /// (protocols without acknowledgements: the peers). Do not mix with [`ConvTrack::on_ack`].
    pub fn mark_sent_accepted(&mut self) {
        self.implicit_acks = true;
        self.sent += 1;
        self.acked_n += 1;
    }

    fn is_acked(&self, seq: u64) -> bool {
        if self.implicit_acks {
            seq < self.sent
        } else {
            self.acked.get(seq)
        }
    }

    /// The server acknowledged `seq` (`send_ack`). Returns false for a sequence number never
    /// sent or acknowledged twice (counted apart, never as a delivery).
    pub fn on_ack(&mut self, seq: u64) -> bool {
        if seq >= self.sent || self.acked.set(seq) {
            self.dup_acks += 1;
            return false;
        }
        self.acked_n += 1;
        if self.delivered.get(seq) {
            self.acked_delivered += 1;
        }
        true
    }

    /// Takes the acknowledgements in `acks` (its publisher's, see [`SharedAcks`]) that this
    /// conversation has not taken yet, as [`ConvTrack::on_ack`] would one by one; taking them
    /// again changes nothing. Duplicates were counted in `acks`.
    pub fn merge_acks(&mut self, acks: &SharedAcks) {
        for (w, &all) in acks.acked.0.iter().enumerate() {
            // Only what this conversation sent (the publisher's conversations advance
            // together, so this drops nothing unless they were set up apart).
            let first = 64 * w as u64;
            let below_sent = match self.sent.saturating_sub(first) {
                0 => 0,
                n if n >= 64 => u64::MAX,
                n => (1u64 << n) - 1,
            };
            let new = all & below_sent & !self.acked.word(w);
            if new == 0 {
                continue;
            }
            self.acked.or_word(w, new);
            self.acked_n += u64::from(new.count_ones());
            self.acked_delivered += u64::from((new & self.delivered.word(w)).count_ones());
        }
    }

    /// The server refused `seq` (an `error` naming its `cmid`: rate limited, overloaded, ...).
    pub fn on_refused(&mut self, seq: u64) -> bool {
        if seq >= self.sent || self.refused.get(seq) || self.is_acked(seq) {
            return false;
        }
        self.refused.set(seq);
        self.refused_n += 1;
        true
    }

    /// `seq` was delivered to the receiver.
    pub fn on_deliver(&mut self, seq: u64) -> Delivery {
        if seq >= self.sent {
            self.unknown += 1;
            return Delivery::Unknown;
        }
        if self.delivered.set(seq) {
            self.duplicates += 1;
            return Delivery::Duplicate;
        }
        self.delivered_n += 1;
        if self.is_acked(seq) {
            self.acked_delivered += 1;
        }
        match self.max_delivered {
            Some(m) if m > seq => {
                self.out_of_order += 1;
                Delivery::OutOfOrder
            }
            _ => {
                self.max_delivered = Some(seq);
                Delivery::InOrder
            }
        }
    }

    /// Nothing is outstanding: every message sent was acknowledged or refused, and every
    /// acknowledged one was delivered. The grace period after the run ends early then.
    pub fn settled(&self) -> bool {
        self.acked_n + self.refused_n == self.sent && self.acked_delivered == self.acked_n
    }

    pub fn tally(&self) -> Tally {
        // Unconfirmed: sent, not acked, not refused, not delivered. Delivered-but-unacked
        // messages are neither lost nor unconfirmed: they arrived.
        let mut unconfirmed = 0;
        for seq in 0..self.sent {
            if !self.is_acked(seq) && !self.refused.get(seq) && !self.delivered.get(seq) {
                unconfirmed += 1;
            }
        }
        Tally {
            conversations: 1,
            sent: self.sent,
            acked: self.acked_n,
            refused: self.refused_n,
            delivered: self.delivered_n,
            lost: self.acked_n - self.acked_delivered,
            unconfirmed,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            unknown: self.unknown,
            duplicate_acks: self.dup_acks,
            conversations_with_loss: u64::from(self.acked_n > self.acked_delivered),
        }
    }
}

/// Integrity totals over any number of conversations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub conversations: u64,
    pub sent: u64,
    pub acked: u64,
    pub refused: u64,
    pub delivered: u64,
    pub lost: u64,
    pub unconfirmed: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub unknown: u64,
    pub duplicate_acks: u64,
    pub conversations_with_loss: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.conversations += o.conversations;
        self.sent += o.sent;
        self.acked += o.acked;
        self.refused += o.refused;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.unconfirmed += o.unconfirmed;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.unknown += o.unknown;
        self.duplicate_acks += o.duplicate_acks;
        self.conversations_with_loss += o.conversations_with_loss;
    }

    /// What `--expect-no-loss` forbids: lost, unconfirmed, duplicated, out-of-order or unknown
    /// deliveries.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (n, what) in [
            (self.lost, "lost (acked, never delivered)"),
            (
                self.unconfirmed,
                "unconfirmed (sent, never acked nor delivered)",
            ),
            (self.duplicates, "duplicated deliveries"),
            (
                self.out_of_order,
                "out-of-order deliveries within a conversation",
            ),
            (self.unknown, "deliveries of messages never sent"),
        ] {
            if n > 0 {
                v.push(format!("{n} {what}"));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: u64) -> ConvTrack {
        let mut t = ConvTrack::default();
        for _ in 0..n {
            t.mark_sent();
        }
        t
    }

    #[test]
    fn clean_run_is_settled_and_counts_nothing_bad() {
        let mut t = sent(100);
        for s in 0..100 {
            assert!(t.on_ack(s));
            assert_eq!(t.on_deliver(s), Delivery::InOrder);
        }
        assert!(t.settled());
        let tally = t.tally();
        assert_eq!((tally.sent, tally.acked, tally.delivered), (100, 100, 100));
        assert!(tally.violations().is_empty());
    }

    #[test]
    fn injected_loss_is_counted_and_blocks_settling() {
        let mut t = sent(10);
        for s in 0..10 {
            t.on_ack(s);
            if s != 3 && s != 7 {
                t.on_deliver(s);
            }
        }
        assert!(!t.settled());
        let tally = t.tally();
        assert_eq!((tally.lost, tally.delivered), (2, 8));
        assert_eq!(tally.conversations_with_loss, 1);
        assert_eq!(tally.out_of_order, 0);
        assert_eq!(tally.violations().len(), 1);
    }

    #[test]
    fn injected_duplicates_and_reordering() {
        let mut t = sent(6);
        // Deliveries 0 2 1 1 3 5 4 5, every message acked (delivery may come before the ack).
        let order = [0, 2, 1, 1, 3, 5, 4, 5];
        let got: Vec<Delivery> = order.iter().map(|&s| t.on_deliver(s)).collect();
        use Delivery::*;
        assert_eq!(
            got,
            [InOrder, InOrder, OutOfOrder, Duplicate, InOrder, InOrder, OutOfOrder, Duplicate]
        );
        for s in 0..6 {
            t.on_ack(s);
        }
        assert!(t.settled());
        let tally = t.tally();
        assert_eq!(
            (
                tally.delivered,
                tally.duplicates,
                tally.out_of_order,
                tally.lost
            ),
            (6, 2, 2, 0)
        );
        assert_eq!(
            tally.violations(),
            [
                "2 duplicated deliveries",
                "2 out-of-order deliveries within a conversation"
            ]
        );
    }

    #[test]
    fn refused_unconfirmed_unknown_and_duplicate_acks() {
        let mut t = sent(5);
        assert!(t.on_ack(0));
        assert!(!t.on_ack(0), "second ack of 0");
        assert!(!t.on_ack(9), "ack of a message never sent");
        assert!(t.on_refused(1));
        assert!(!t.on_refused(0), "already acked");
        t.on_deliver(0);
        // 2 delivered without an ack: arrived, so neither lost nor unconfirmed.
        t.on_deliver(2);
        assert_eq!(t.on_deliver(42), Delivery::Unknown);
        // 3 and 4: sent, never acked, never delivered.
        assert!(!t.settled());
        let tally = t.tally();
        assert_eq!(tally.refused, 1);
        assert_eq!(tally.unconfirmed, 2);
        assert_eq!(tally.lost, 0);
        assert_eq!(tally.unknown, 1);
        assert_eq!(tally.duplicate_acks, 2);
        assert_eq!(tally.violations().len(), 2);
    }

    #[test]
    fn tallies_add_up() {
        let mut a = sent(3);
        for s in 0..3 {
            a.on_ack(s);
        }
        a.on_deliver(0);
        let mut b = sent(2);
        b.on_deliver(1);
        b.on_deliver(1);
        let mut total = Tally::default();
        total.add(&a.tally());
        total.add(&b.tally());
        assert_eq!(total.conversations, 2);
        assert_eq!(total.sent, 5);
        assert_eq!(total.lost, 2);
        assert_eq!(total.unconfirmed, 1);
        assert_eq!(total.duplicates, 1);
        assert_eq!(total.conversations_with_loss, 1);
    }

    #[test]
    fn shared_acks_merged_tally_as_acks_one_by_one() {
        // One conversation kept twice, its acks taken one by one and through SharedAcks
        // (merged in two steps and once more): 200 messages (three words and a part),
        // delivered with gaps, duplicates and a reordering, acked before and after delivery.
        // 33 is neither acked nor delivered (unconfirmed); 5, 22, ... are acked, not delivered.
        let deliveries: Vec<u64> = (0..200)
            .filter(|s| s % 17 != 5 && *s != 33)
            .chain([3, 150, 64])
            .collect();
        let acks: Vec<u64> = (0..200).rev().filter(|s| s % 31 != 2).collect();
        let mut by_one = sent(200);
        let mut merged = sent(200);
        let mut shared = SharedAcks::default();
        for (k, &s) in deliveries.iter().enumerate() {
            by_one.on_deliver(s);
            merged.on_deliver(s);
            if let Some(&a) = acks.get(k) {
                assert!(by_one.on_ack(a));
                assert!(shared.on_ack(a, 200));
            }
            if k == 100 {
                merged.merge_acks(&shared);
            }
        }
        for &a in acks.iter().skip(deliveries.len()) {
            by_one.on_ack(a);
            shared.on_ack(a, 200);
        }
        merged.merge_acks(&shared);
        merged.merge_acks(&shared);
        assert_eq!(merged.tally(), by_one.tally());
        assert_eq!(merged.settled(), by_one.settled());
        assert!(merged.tally().lost > 0 && merged.tally().unconfirmed > 0);
        assert!(!shared.on_ack(7, 200), "acked twice");
        assert!(!shared.on_ack(200, 200), "never sent");
        assert_eq!(shared.dup_acks(), 2);
        assert!(shared.is_acked(7) && !shared.is_acked(2));
        // A conversation that sent fewer takes only what it sent.
        let mut short = sent(10);
        short.merge_acks(&shared);
        assert_eq!(
            short.tally().acked,
            (0..10).filter(|s| s % 31 != 2).count() as u64
        );
    }

    #[test]
    fn implicit_acks_count_written_messages_as_accepted() {
        let mut t = ConvTrack::default();
        for _ in 0..4 {
            t.mark_sent_accepted();
        }
        assert_eq!(t.on_deliver(0), Delivery::InOrder);
        assert_eq!(t.on_deliver(2), Delivery::InOrder);
        assert_eq!(t.on_deliver(2), Delivery::Duplicate);
        assert_eq!(t.on_deliver(1), Delivery::OutOfOrder);
        assert_eq!(t.on_deliver(9), Delivery::Unknown);
        assert!(!t.settled());
        let tally = t.tally();
        assert_eq!((tally.sent, tally.acked, tally.delivered), (4, 4, 3));
        assert_eq!((tally.lost, tally.unconfirmed, tally.duplicates), (1, 0, 1));
        assert_eq!(t.on_deliver(3), Delivery::InOrder);
        assert!(t.settled());
    }
}
