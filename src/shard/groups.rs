//! Groups: membership lives with the group's owner shard (hash of tenant and group id), which
//! checks senders and sequences the group's messages on one timeline (`gseq`). Each member's
//! own owner shard also learns the membership, and keeps, per group, the members it owns that
//! are online. A group message then crosses to each shard once: the group owner sends one
//! `GroupFanout` per shard, and each shard forwards to its online members' devices (one
//! message per device shard). The cost per message is O(shards + online members), whatever
//! the group size, and one timeline entry: no per-member copies.

use std::collections::{HashMap, HashSet};

use super::{owner_shard, Clock, ConnId, Route, Shard, ShardMsg, UserKey};
use crate::protocol::{Deliver, Envelope, Error, ErrorCode, Message, Str, Target};

/// A group, scoped by tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub tenant: Str,
    pub group: Str,
}

/// A group owned by this shard.
#[derive(Default)]
pub(super) struct GroupEntry {
    members: HashSet<Str>,
    /// Last timeline sequence (durability `memory`; the store assigns it at `local`).
    gseq: u64,
}

/// Group state of one shard.
#[derive(Default)]
pub(super) struct Groups {
    /// Groups this shard owns; bounded by [`MAX_GROUPS_PER_SHARD`].
    owned: HashMap<GroupKey, GroupEntry>,
    /// Groups of the users this shard owns (bounded by `limits.max_groups_per_user` each).
    of_user: HashMap<UserKey, Vec<GroupKey>>,
    /// Per group, the members this shard owns that are online now.
    online: HashMap<GroupKey, HashSet<Str>>,
}

pub const MAX_GROUPS_PER_SHARD: usize = 1_000_000;

impl Shard {
    fn group_owner(&self, g: &GroupKey) -> usize {
        owner_shard(&g.tenant, &g.group, self.shards)
    }

    /// `group_join` / `group_leave` from a connection.
    pub(super) fn on_group_membership(
        &mut self,
        id: ConnId,
        reference: Option<u64>,
        group: Str,
        join: bool,
    ) {
        let Some(user) = self.session_user_key(id) else {
            return;
        };
        if group.is_empty() || group.len() > 128 {
            self.reply_error(
                id,
                reference,
                ErrorCode::BadRequest,
                "group must be 1 to 128 bytes",
            );
            return;
        }
        let key = GroupKey {
            tenant: user.tenant.clone(),
            group,
        };
        let dest = self.group_owner(&key);
        let msg = ShardMsg::GroupMembership {
            group: key,
            member: user.user,
            join,
            origin: self.route(id),
            reference,
        };
        if !self.post(dest, msg) {
            self.overloaded(id, reference, None);
        }
    }

    /// A `send` to a group from a connection.
    pub(super) fn send_to_group(
        &mut self,
        id: ConnId,
        reference: Option<u64>,
        group: Str,
        cmid: Str,
        deliver: Deliver,
    ) {
        let Some(user) = self.session_user_key(id) else {
            return;
        };
        let key = GroupKey {
            tenant: user.tenant,
            group,
        };
        let dest = self.group_owner(&key);
        let msg = ShardMsg::GroupSend {
            group: key,
            origin: self.route(id),
            reference,
            deliver,
            cmid: cmid.clone(),
        };
        if !self.post(dest, msg) {
            self.overloaded(id, reference, None);
        }
    }

    fn reply_to(&mut self, route: Route, env: Envelope) {
        self.post_always(
            usize::from(route.shard),
            ShardMsg::Reply {
                conn: route.conn,
                env,
            },
        );
    }

    fn error_to(
        &mut self,
        route: Route,
        reference: Option<u64>,
        code: ErrorCode,
        cmid: Option<Str>,
    ) {
        let env = Envelope {
            reference,
            msg: Message::Error(Error {
                code,
                message: Str::from(code.name()),
                cmid,
                retry_after_ms: None,
            }),
        };
        self.reply_to(route, env);
    }

    /// Owner side of `group_join` / `group_leave`.
    pub(super) fn group_membership(
        &mut self,
        group: GroupKey,
        member: Str,
        join: bool,
        origin: Route,
        reference: Option<u64>,
    ) {
        let max = self.cfg.limits.max_group_members as usize;
        let owned = &mut self.groups.owned;
        if join {
            if !owned.contains_key(&group) && owned.len() >= MAX_GROUPS_PER_SHARD {
                self.error_to(origin, reference, ErrorCode::LimitExceeded, None);
                return;
            }
            let e = owned.entry(group.clone()).or_default();
            if !e.members.contains(&member) && e.members.len() >= max {
                self.error_to(origin, reference, ErrorCode::LimitExceeded, None);
                return;
            }
            e.members.insert(member.clone());
        } else if let Some(e) = owned.get_mut(&group) {
            e.members.remove(&member);
            if e.members.is_empty() {
                owned.remove(&group);
            }
        }
        if self.durable() {
            // The stored member list authorizes the stored timeline's appends; the I/O queue
            // keeps it ordered before any later send.
            let g = crate::store::GroupRef {
                tenant: group.tenant.clone(),
                group: group.group.clone(),
            };
            let op = if join {
                crate::store::Op::Join {
                    group: g,
                    member: member.clone(),
                }
            } else {
                crate::store::Op::Leave {
                    group: g,
                    member: member.clone(),
                }
            };
            self.submit_write(op);
        }
        // The member's owner tracks the membership for online fan-out.
        let user = UserKey {
            tenant: group.tenant.clone(),
            user: member,
        };
        let dest = self.owner(&user);
        self.post_always(dest, ShardMsg::MemberOf { user, group, join });
        self.reply_to(
            origin,
            Envelope {
                reference,
                msg: Message::Ok,
            },
        );
    }

    /// Owner side of a group `send`: members only; sequence, ack, fan out.
    pub(super) fn group_send(
        &mut self,
        group: GroupKey,
        origin: Route,
        reference: Option<u64>,
        mut deliver: Deliver,
        cmid: Str,
    ) {
        let Some(e) = self.groups.owned.get_mut(&group) else {
            self.error_to(origin, reference, ErrorCode::NotFound, Some(cmid));
            return;
        };
        if !e.members.contains(&deliver.from) {
            self.error_to(origin, reference, ErrorCode::Forbidden, Some(cmid));
            return;
        }
        let mid = self.next_mid();
        deliver.mid = mid;
        deliver.to = Some(Target::Group(group.group.clone()));
        if self.durable() {
            // Durability `local`: on the stored timeline before the ack and the pushes.
            self.append_group(group, origin, reference, deliver, cmid);
            return;
        }
        let Some(e) = self.groups.owned.get_mut(&group) else {
            return;
        };
        e.gseq += 1;
        let gseq = e.gseq;
        deliver.inbox_seq = gseq;
        let ts = deliver.ts;
        self.accepted(origin, reference, cmid, mid, gseq, ts);
        self.group_fan_out(&group, deliver);
    }

    /// Owner side, after the store accepted a group message: ack the sender, fan out.
    pub(super) fn group_appended(
        &mut self,
        group: GroupKey,
        origin: Route,
        reference: Option<u64>,
        cmid: Str,
        mut deliver: Deliver,
        (gseq, mid, ts, duplicate): (u64, u64, u64, bool),
    ) {
        self.accepted(origin, reference, cmid, mid, gseq, ts);
        if !duplicate {
            deliver.mid = mid;
            deliver.inbox_seq = gseq;
            deliver.ts = ts;
            self.group_fan_out(&group, deliver);
        }
    }

    /// One message to every shard: each forwards to its online members.
    pub(super) fn group_fan_out(&mut self, group: &GroupKey, deliver: Deliver) {
        for shard in 0..self.shards {
            self.post_always(
                shard,
                ShardMsg::GroupFanout {
                    group: group.clone(),
                    deliver: deliver.clone(),
                },
            );
        }
    }

    /// Member-owner side: forward to the devices of this shard's online members of `group`
    /// (not the sender's), one message per device shard.
    pub(super) fn group_fanout_local(&mut self, group: GroupKey, deliver: Deliver) {
        let Some(online) = self.groups.online.get(&group) else {
            return;
        };
        let mut routes = Vec::new();
        for user in online {
            if *user == deliver.from {
                continue;
            }
            let key = UserKey {
                tenant: group.tenant.clone(),
                user: user.clone(),
            };
            if let Some(e) = self.users.get(&key) {
                routes.extend(e.devices.iter().copied());
            }
        }
        if !routes.is_empty() {
            self.fan_out(&routes, deliver);
        }
    }

    /// Member-owner side: `user` joined or left `group`.
    pub(super) fn member_of(&mut self, user: UserKey, group: GroupKey, join: bool) {
        let max = self.cfg.limits.max_groups_per_user as usize;
        let online = self.users.get(&user).is_some_and(|e| !e.devices.is_empty());
        let groups = self.groups.of_user.entry(user.clone()).or_default();
        if join {
            if !groups.contains(&group) && groups.len() < max {
                groups.push(group.clone());
            }
        } else {
            groups.retain(|g| *g != group);
        }
        if groups.is_empty() {
            self.groups.of_user.remove(&user);
        }
        self.set_group_online(&user, &group, online && join);
    }

    fn set_group_online(&mut self, user: &UserKey, group: &GroupKey, online: bool) {
        if online {
            self.groups
                .online
                .entry(group.clone())
                .or_default()
                .insert(user.user.clone());
        } else if let Some(set) = self.groups.online.get_mut(group) {
            set.remove(&user.user);
            if set.is_empty() {
                self.groups.online.remove(group);
            }
        }
    }

    /// Member-owner side: `user` came online (first device) or went offline (last device).
    pub(super) fn user_online_changed(&mut self, user: &UserKey, online: bool) {
        let Some(groups) = self.groups.of_user.get(user) else {
            return;
        };
        for g in groups.clone() {
            self.set_group_online(user, &g, online);
        }
    }

    fn session_user_key(&self, id: ConnId) -> Option<UserKey> {
        self.conns.get(id)?.session.as_ref().map(|s| s.user.clone())
    }

    /// Group deliveries reach devices directly: they are on the group's timeline, not in the
    /// member's inbox, so they bypass the inbox window (members catch up by group sync).
    pub(super) fn deliver_group_push(&mut self, conns: Vec<ConnId>, deliver: Deliver, _clk: Clock) {
        let env = Envelope::new(Message::Deliver(deliver));
        for conn in conns {
            self.emit(conn, &env);
        }
    }
}
