//! The durable store behind a backend trait (placeholder for the embedded engine, which lands
//! from its own branch; this file only fixes the interface the I/O core uses).

use crate::protocol::{Deliver, Str};

/// A user, scoped by tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserRef {
    pub tenant: Str,
    pub user: Str,
}

/// A group, scoped by tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupRef {
    pub tenant: Str,
    pub group: Str,
}

/// One write. Appends dominate, so the large variant is the common case.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Op {
    AppendInbox {
        user: UserRef,
        sender: Str,
        cmid: Str,
        deliver: Deliver,
    },
    SetCursor {
        user: UserRef,
        device: Str,
        seq: u64,
    },
}

/// The result of one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Appended {
        seq: u64,
        mid: u64,
        ts: u64,
        duplicate: bool,
    },
    Done,
}

/// A page of an inbox.
#[derive(Clone, Debug, Default)]
pub struct InboxPage {
    pub messages: Vec<Deliver>,
    pub more: bool,
}

/// Why the store failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine reported an error.
    #[error("store: {0}")]
    Engine(String),
}

/// Opens the configured store under the data directory.
pub fn open(cfg: &crate::config::Config) -> Result<Box<dyn Backend>, StoreError> {
    // The embedded durable engine replaces this in-memory stand-in when it lands.
    Ok(Box::new(MemBackend::new(cfg.store.dedupe_window_ms)))
}

pub trait Backend: Send {
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> Result<Vec<OpResult>, StoreError>;
    fn read_inbox(
        &mut self,
        user: &UserRef,
        after_seq: u64,
        limit: u32,
    ) -> Result<InboxPage, StoreError>;
    fn cursor(&mut self, user: &UserRef, device: &str) -> Result<u64, StoreError>;
}

type DedupeKey = (Str, Str, Str);

/// A store in memory: the same semantics as the durable engine without durability. Used by
/// shard unit tests and as the reference the durable engine is tested against.
#[derive(Default)]
pub struct MemBackend {
    inboxes: std::collections::HashMap<UserRef, Vec<Deliver>>,
    cursors: std::collections::HashMap<(UserRef, Str), u64>,
    /// (tenant, sender, cmid) -> (seq, mid, ts, stored at ms).
    dedupe: std::collections::HashMap<DedupeKey, (u64, u64, u64, u64)>,
    dedupe_window_ms: u64,
}

impl MemBackend {
    pub fn new(dedupe_window_ms: u64) -> Self {
        MemBackend {
            dedupe_window_ms,
            ..Default::default()
        }
    }
}

impl Backend for MemBackend {
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> Result<Vec<OpResult>, StoreError> {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::AppendInbox {
                    user,
                    sender,
                    cmid,
                    mut deliver,
                } => {
                    let key = (user.tenant.clone(), sender, cmid);
                    if let Some(&(seq, mid, ts, at)) = self.dedupe.get(&key) {
                        if now_ms.saturating_sub(at) <= self.dedupe_window_ms {
                            out.push(OpResult::Appended {
                                seq,
                                mid,
                                ts,
                                duplicate: true,
                            });
                            continue;
                        }
                    }
                    let inbox = self.inboxes.entry(user).or_default();
                    deliver.inbox_seq = inbox.len() as u64 + 1;
                    let r = (deliver.inbox_seq, deliver.mid, deliver.ts, now_ms);
                    self.dedupe.insert(key, r);
                    out.push(OpResult::Appended {
                        seq: r.0,
                        mid: r.1,
                        ts: r.2,
                        duplicate: false,
                    });
                    inbox.push(deliver);
                }
                Op::SetCursor { user, device, seq } => {
                    let c = self.cursors.entry((user, device)).or_default();
                    *c = (*c).max(seq);
                    out.push(OpResult::Done);
                }
            }
        }
        Ok(out)
    }

    fn read_inbox(
        &mut self,
        user: &UserRef,
        after_seq: u64,
        limit: u32,
    ) -> Result<InboxPage, StoreError> {
        let Some(inbox) = self.inboxes.get(user) else {
            return Ok(InboxPage::default());
        };
        let start = usize::try_from(after_seq)
            .unwrap_or(usize::MAX)
            .min(inbox.len());
        let end = start.saturating_add(limit as usize).min(inbox.len());
        Ok(InboxPage {
            messages: inbox[start..end].to_vec(),
            more: end < inbox.len(),
        })
    }

    fn cursor(&mut self, user: &UserRef, device: &str) -> Result<u64, StoreError> {
        Ok(self
            .cursors
            .get(&(user.clone(), Str::from(device)))
            .copied()
            .unwrap_or(0))
    }
}
