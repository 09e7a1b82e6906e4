//! The admin API's own way into the shards (src/admin.rs), which needs no I/O core.
//!
//! This module owns [`AdminQueues`]: one bounded lock-free queue per shard, created by the
//! runtime at start and handed to the admin thread through `control::Control` (src/control.rs,
//! above the shards, which do not name it). The admin thread pushes [`AdminCmd`]s (never
//! waiting: a full queue is the caller's 503); each shard drains its own queue on its sweep
//! tick (every `runtime.tick_ms`) and handles the commands here, on the shard's thread, like
//! any other input. A command that needs an answer carries a [`ReplyTx`] (a `sync_channel(1)`),
//! which the shard fills with `try_send`: it never waits for the admin thread, and an admin
//! thread that gave up (timeout) only finds its channel closed.
//!
//! What the shards do for the admin API:
//! - push (durability `memory`: to the online devices only, as a 1:1 `send` at `memory`) and
//!   kick, on the owner shard of the user or group;
//! - group management on the group's owner shard, through the same membership bookkeeping as
//!   `group_join` / `group_leave` (src/shard/groups.rs), so members added while online get the
//!   group's messages at once; at durability `local` the change is stored first;
//! - user inspection: the owner's routes and presence, then each device shard's details;
//! - broadcast: one command per shard, each delivering to its own connections of the tenant.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;

use crossbeam_queue::ArrayQueue;

use super::groups::{GroupKey, GroupWork};
use super::{Clock, ConnId, Phase, Route, Shard, UserKey};
use crate::protocol::{Deliver, Envelope, Message, Status, Str, Target};
use crate::services::push::PushRecord;

/// Commands one shard's admin queue holds; beyond, the admin API answers 503.
pub const ADMIN_QUEUE_DEPTH: usize = 1024;

/// Where a shard puts its answer to one admin request.
pub type ReplyTx = SyncSender<AdminAnswer>;

/// Work the admin thread hands to one shard.
#[derive(Debug)]
pub enum AdminCmd {
    /// To the owner of the record's user or group: deliver it (durability `memory`: online
    /// devices only; with an I/O core the shard stores it first, as for the Kafka ingress).
    Push(Box<PushRecord>),
    /// To the user's owner: `goaway` `kicked` and close every device of the user.
    Kick(UserKey),
    /// To every shard: deliver to each of its own connections of `tenant`.
    Broadcast {
        tenant: Str,
        from: Str,
        kind: Option<Str>,
        body: Str,
    },
    /// To the group's owner.
    Group {
        group: GroupKey,
        op: GroupOp,
        reply: ReplyTx,
    },
    /// To the user's owner: the user's device routes and presence.
    User { user: UserKey, reply: ReplyTx },
    /// To one device shard: what it knows of these connections.
    Devices { conns: Vec<ConnId>, reply: ReplyTx },
}

/// A group management request.
#[derive(Debug)]
pub enum GroupOp {
    /// Create the group with these first members (409 if it exists).
    Create(Vec<Str>),
    /// Add members to an existing group.
    Add(Vec<Str>),
    /// Remove one member.
    Remove(Str),
    /// The member list.
    List,
    /// Remove every member: the group is gone.
    Delete,
}

/// One connection's details, from its own shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub shard: u16,
    pub device: Str,
    /// `tcp` or `ws` (with or without TLS: the shard does not know).
    pub transport: &'static str,
    pub codec: &'static str,
}

/// A shard's answer to an admin request.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminAnswer {
    /// A membership change was applied: how many members changed, the count after it, and
    /// how many the store refused (its per-user or per-group limits).
    Changed {
        changed: usize,
        members: usize,
        refused: usize,
    },
    /// The member list (sorted).
    Members(Vec<Str>),
    /// No such group, or no such member of it.
    NotFound,
    /// `Create` of a group that exists.
    Exists,
    /// A group or shard limit would be passed.
    Limit,
    /// The store could not take or apply the change (queue full, store error).
    Unavailable,
    /// The user's owner: device routes, presence, and the other cluster nodes' statuses.
    User {
        devices: Vec<Route>,
        status: Status,
        remote: Vec<(Str, Status)>,
    },
    /// A device shard: the details of those of the connections it still has.
    Devices(Vec<DeviceInfo>),
}

/// Counters of the shards' side (the admin thread counts requests in `Control`).
#[derive(Debug, Default)]
pub struct AdminStats {
    /// Frames written by broadcasts (one per connection reached).
    pub broadcast_deliveries: AtomicU64,
    /// Pushes delivered at durability `memory` to online devices (one per push with any).
    pub pushes_delivered: AtomicU64,
}

/// One bounded queue per shard, indexed like the shards (`owner_shard`).
#[derive(Debug)]
pub struct AdminQueues {
    queues: Vec<ArrayQueue<AdminCmd>>,
    /// Largest body a push or broadcast may carry (the WebSocket message limit).
    pub max_body: usize,
    /// This node's name in a cluster (`--node-id`), which user inspection reports.
    pub node: Option<String>,
    pub stats: AdminStats,
}

impl AdminQueues {
    pub fn new(shards: usize, max_body: usize) -> AdminQueues {
        AdminQueues {
            queues: (0..shards)
                .map(|_| ArrayQueue::new(ADMIN_QUEUE_DEPTH))
                .collect(),
            max_body,
            node: None,
            stats: AdminStats::default(),
        }
    }

    /// Names this node (cluster mode).
    pub fn with_node(mut self, node: Option<String>) -> AdminQueues {
        self.node = node;
        self
    }

    pub fn shards(&self) -> usize {
        self.queues.len()
    }

    /// Queues `cmd` for shard `dest`; `false` (the command dropped) when that queue is full
    /// or there is no such shard.
    pub fn post(&self, dest: usize, cmd: AdminCmd) -> bool {
        self.queues.get(dest).is_some_and(|q| q.push(cmd).is_ok())
    }

    /// The next command for shard `shard`, if any.
    pub fn pop(&self, shard: usize) -> Option<AdminCmd> {
        self.queues.get(shard)?.pop()
    }
}

impl Shard {
    /// Handles one admin command (the runtime drains the shard's queue on its tick).
    pub fn on_admin(&mut self, cmd: AdminCmd, stats: &AdminStats, clk: Clock) {
        self.set_now(clk);
        match cmd {
            AdminCmd::Push(rec) if self.durable() => self.on_push(*rec, clk),
            AdminCmd::Push(rec) => self.admin_push(*rec, stats, clk),
            AdminCmd::Kick(user) => self.kick(&user),
            AdminCmd::Broadcast {
                tenant,
                from,
                kind,
                body,
            } => self.broadcast(&tenant, from, kind, body, stats, clk),
            AdminCmd::Group { group, op, reply } => self.admin_group(group, op, reply),
            AdminCmd::User { user, reply } => {
                let (devices, status, remote) = self.dir.view(&user);
                let answer = AdminAnswer::User {
                    devices,
                    status,
                    remote,
                };
                let _ = reply.try_send(answer);
            }
            AdminCmd::Devices { conns, reply } => {
                let mut out = Vec::new();
                for id in conns {
                    let Some(c) = self.conns.get(id) else {
                        continue;
                    };
                    let Some(s) = &c.session else { continue };
                    out.push(DeviceInfo {
                        shard: self.id as u16,
                        device: s.device.clone(),
                        transport: c.link.name(),
                        codec: c.link.codec().name(),
                    });
                }
                let _ = reply.try_send(AdminAnswer::Devices(out));
            }
        }
    }

    /// Durability `memory`: a push reaches the online devices of its user (sequenced like a
    /// 1:1 `send` at `memory`) or the online members of its group (on the group's timeline);
    /// nothing is kept for anyone offline, and a group this shard does not hold is ignored.
    fn admin_push(&mut self, rec: PushRecord, stats: &AdminStats, clk: Clock) {
        let mut deliver = self.push_deliver(rec.from, rec.kind, rec.body, clk);
        match rec.to {
            Target::User(user) => {
                let to = UserKey {
                    tenant: rec.tenant,
                    user,
                };
                let Some(seq) = self.dir.next_inbox_seq(&to, true) else {
                    return;
                };
                deliver.inbox_seq = seq;
                self.push_to_devices(&to, deliver);
            }
            Target::Group(group) => {
                let key = GroupKey {
                    tenant: rec.tenant,
                    group: group.clone(),
                };
                let Some(gseq) = self.groups.next_gseq(&key) else {
                    return;
                };
                deliver.inbox_seq = gseq;
                deliver.to = Some(Target::Group(group));
                self.group_fan_out(&key, deliver);
            }
        }
        stats.pushes_delivered.fetch_add(1, Relaxed);
    }

    /// One broadcast on this shard: every authenticated connection of `tenant` here gets one
    /// `deliver` (from `from`, no `to`, `inbox_seq` 0: not on any inbox or timeline), encoded
    /// once per transport and codec in use.
    fn broadcast(
        &mut self,
        tenant: &Str,
        from: Str,
        kind: Option<Str>,
        body: Str,
        stats: &AdminStats,
        clk: Clock,
    ) {
        let conns: Vec<ConnId> = self
            .conns
            .ids()
            .into_iter()
            .filter(|&id| {
                self.conns.get(id).is_some_and(|c| {
                    c.phase == Phase::Active
                        && c.closing.is_none()
                        && c.session.as_ref().is_some_and(|s| s.user.tenant == *tenant)
                })
            })
            .collect();
        if conns.is_empty() {
            return;
        }
        let deliver = Deliver {
            mid: self.next_mid(),
            from,
            to: None,
            inbox_seq: 0,
            ts: clk.unix_ms,
            kind,
            body,
            ext: Default::default(),
        };
        self.emit_many(&conns, &Envelope::new(Message::Deliver(deliver)));
        stats
            .broadcast_deliveries
            .fetch_add(conns.len() as u64, Relaxed);
    }

    /// Group owner side of a group management request. At durability `local` a group this
    /// shard has not loaded is read back from the store first (as for a client's join).
    fn admin_group(&mut self, group: GroupKey, op: GroupOp, reply: ReplyTx) {
        if self.needs_load(&group) {
            self.load_group_then(group, GroupWork::Admin { op, reply });
            return;
        }
        self.admin_group_now(group, op, reply);
    }

    pub(super) fn admin_group_now(&mut self, group: GroupKey, op: GroupOp, reply: ReplyTx) {
        let members = self.groups.members(&group);
        let (users, join) = match op {
            GroupOp::List => {
                let answer = match members {
                    Some(m) => {
                        let mut list: Vec<Str> = m.iter().cloned().collect();
                        list.sort_unstable();
                        AdminAnswer::Members(list)
                    }
                    None => AdminAnswer::NotFound,
                };
                let _ = reply.try_send(answer);
                return;
            }
            GroupOp::Create(users) => {
                if members.is_some() {
                    let _ = reply.try_send(AdminAnswer::Exists);
                    return;
                }
                (users, true)
            }
            GroupOp::Add(users) => {
                let Some(m) = members else {
                    let _ = reply.try_send(AdminAnswer::NotFound);
                    return;
                };
                let new: Vec<Str> = users.into_iter().filter(|u| !m.contains(u)).collect();
                (new, true)
            }
            GroupOp::Remove(user) => {
                if !members.is_some_and(|m| m.contains(&user)) {
                    let _ = reply.try_send(AdminAnswer::NotFound);
                    return;
                }
                (vec![user], false)
            }
            GroupOp::Delete => {
                let Some(m) = members else {
                    let _ = reply.try_send(AdminAnswer::NotFound);
                    return;
                };
                (m.iter().cloned().collect(), false)
            }
        };
        let count = self.groups.member_count(&group);
        let max = self.cfg.limits.max_group_members as usize;
        if join && !self.groups.admits(&group, users.len(), max) {
            let _ = reply.try_send(AdminAnswer::Limit);
            return;
        }
        if users.is_empty() {
            let _ = reply.try_send(AdminAnswer::Changed {
                changed: 0,
                members: count,
                refused: 0,
            });
            return;
        }
        if self.durable() {
            // Stored first; memory follows the store's answer (`admin_members_stored`).
            let g = super::groups::group_ref(&group);
            let ops = users
                .iter()
                .map(|m| {
                    let (group, member) = (g.clone(), m.clone());
                    if join {
                        crate::store::Op::Join { group, member }
                    } else {
                        crate::store::Op::Leave { group, member }
                    }
                })
                .collect();
            let wait = super::delivery::IoWait::AdminMembers {
                group,
                users,
                join,
                reply,
            };
            // A full store queue drops `wait` and its reply channel with it: the admin
            // thread sees the channel closed and answers 503.
            let _ = self.submit(crate::iocore::IoRequest::Apply(ops), wait);
            return;
        }
        for u in &users {
            self.apply_membership(&group, u, join);
        }
        let members = self.groups.member_count(&group);
        let _ = reply.try_send(AdminAnswer::Changed {
            changed: users.len(),
            members,
            refused: 0,
        });
    }

    /// Durability `local`: the store's answer to an admin membership change. What it stored
    /// is applied in memory (and relayed to the other cluster nodes); what it refused is
    /// counted in the answer.
    pub(super) fn admin_members_stored(
        &mut self,
        group: GroupKey,
        users: Vec<Str>,
        join: bool,
        reply: ReplyTx,
        result: Result<Vec<crate::store::OpResult>, crate::iocore::IoError>,
    ) {
        use crate::store::OpResult;
        let results = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(shard = self.id, error = %e, "admin membership change failed");
                let _ = reply.try_send(AdminAnswer::Unavailable);
                return;
            }
        };
        let (mut changed, mut refused) = (0, 0);
        for (user, r) in users.into_iter().zip(results) {
            match r {
                OpResult::Membership { .. } => {
                    changed += 1;
                    self.apply_membership(&group, &user, join);
                    self.relay(crate::services::cluster::RelayItem::Member {
                        tenant: group.tenant.clone(),
                        user,
                        group: group.group.clone(),
                        join,
                    });
                }
                _ => refused += 1,
            }
        }
        let members = self.groups.member_count(&group);
        let _ = reply.try_send(AdminAnswer::Changed {
            changed,
            members,
            refused,
        });
    }
}
