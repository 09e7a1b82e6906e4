//! Groups: membership lives with the group's owner shard (hash of tenant and group id), which
//! checks senders and sequences the group's messages on one timeline (`gseq`). Each member's
//! own owner shard also learns the membership, and keeps, per group, the members it owns that
//! are online. A group message then crosses to each shard once: the group owner sends one
//! `GroupFanout` per shard, and each shard forwards to its online members' devices (one
//! message per device shard). The cost per message is O(shards + online members), whatever
//! the group size, and one timeline entry: no per-member copies.

use std::collections::{HashMap, HashSet};

use super::delivery::IoWait;
use super::{owner_shard, Clock, ConnId, Origin, ReplyTo, Route, Shard, ShardMsg, UserKey};
use crate::iocore::{IoCmd, IoError, IoRequest};
use crate::protocol::{Deliver, Envelope, Error, ErrorCode, Message, Str, Target};
use crate::store::{GroupPage, GroupRef, UserRef};

/// A group, scoped by tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub tenant: Str,
    pub group: Str,
}

/// A group owned by this shard.
#[derive(Default)]
pub(super) struct GroupEntry {
    pub(super) members: HashSet<Str>,
    /// Last timeline sequence (durability `memory`; the store assigns it at `local`).
    pub(super) gseq: u64,
}

/// Group state of one shard.
#[derive(Default)]
pub(super) struct Groups {
    /// Groups this shard owns; bounded by [`MAX_GROUPS_PER_SHARD`].
    pub(super) owned: HashMap<GroupKey, GroupEntry>,
    /// Groups of the users this shard owns (bounded by `limits.max_groups_per_user` each).
    of_user: HashMap<UserKey, Vec<GroupKey>>,
    /// Per group, the members this shard owns that are online now.
    online: HashMap<GroupKey, HashSet<Str>>,
    /// Durability `local`: groups whose member list is being read back from the store, with
    /// the work that waits for it (at most [`MAX_WAITING_PER_GROUP`] each). One I/O read is
    /// in flight per entry, so `store.queue_depth` bounds the map.
    loading: HashMap<GroupKey, Vec<GroupWork>>,
    /// Durability `local`: users whose groups are being read back from the store; `true` when
    /// a membership change arrived meanwhile (the read is then repeated). Bounded like
    /// `loading`: one I/O read in flight per entry.
    user_loading: HashMap<UserKey, bool>,
    /// Cluster mode: groups whose having online members here changed and the I/O core has
    /// not been told yet (its queue was full): `true` when they have some now. At most one
    /// entry per group in `online` or just left it.
    pub(super) here_pending: HashMap<GroupKey, bool>,
}

pub const MAX_GROUPS_PER_SHARD: usize = 1_000_000;
/// Group cursors a shard holds before it writes them (see `Shard::set_group_cursor`).
pub const MAX_PENDING_GROUP_CURSORS: usize = 16_384;
/// Sends and membership changes that wait for one group's member list to be read back.
pub const MAX_WAITING_PER_GROUP: usize = 4096;

/// Work for a group owner that waits for the group's member list.
// Most waiting work is `Send`: boxing its `Deliver` would add an allocation to the common
// case and save nothing for it.
#[allow(clippy::large_enum_variant)]
pub(super) enum GroupWork {
    Send {
        origin: Origin,
        deliver: Deliver,
    },
    Membership {
        member: Str,
        join: bool,
        reply: ReplyTo,
    },
    /// An admin API group request (src/shard/admin.rs).
    Admin {
        op: super::admin::GroupOp,
        reply: super::admin::ReplyTx,
    },
}

pub(super) fn group_ref(g: &GroupKey) -> GroupRef {
    GroupRef {
        tenant: g.tenant.clone(),
        group: g.group.clone(),
    }
}

fn user_ref(u: &UserKey) -> UserRef {
    UserRef {
        tenant: u.tenant.clone(),
        user: u.user.clone(),
    }
}

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
        let reply = ReplyTo {
            route: self.route(id),
            reference,
        };
        // A join asks the user's owner first, which knows how many groups the user has.
        let (dest, msg) = if join {
            let msg = ShardMsg::JoinCheck {
                group: key,
                member: user.user.clone(),
                reply,
            };
            (self.owner(&user), msg)
        } else {
            let msg = ShardMsg::GroupMembership {
                group: key.clone(),
                member: user.user,
                join,
                reply,
            };
            (self.group_owner(&key), msg)
        };
        if !self.post(dest, msg) {
            self.overloaded(id, reference, None);
        }
    }

    /// Member-owner side of a `group_join`: refuses a join past `limits.max_groups_per_user`
    /// (rejoining a group the user is in is not one more), else passes it to the group's
    /// owner. While the user's stored groups are still loading the count is not known yet,
    /// and the join goes on.
    pub(super) fn join_check(&mut self, group: GroupKey, member: Str, reply: ReplyTo) {
        let max = self.cfg.limits.max_groups_per_user as usize;
        let user = UserKey {
            tenant: group.tenant.clone(),
            user: member.clone(),
        };
        let full = self
            .groups
            .of_user
            .get(&user)
            .is_some_and(|gs| gs.len() >= max && !gs.contains(&group));
        if full {
            self.error_to(reply, ErrorCode::LimitExceeded, None);
            return;
        }
        let dest = self.group_owner(&group);
        let msg = ShardMsg::GroupMembership {
            group,
            member,
            join: true,
            reply,
        };
        // Like the membership it forwards: bookkeeping that must not be shed half way.
        self.post_always(dest, msg);
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
        let origin = Origin {
            reply: ReplyTo {
                route: self.route(id),
                reference,
            },
            cmid: cmid.clone(),
            received_us: self.now_us,
        };
        let msg = ShardMsg::GroupSend {
            group: key,
            origin,
            deliver,
        };
        if !self.post(dest, msg) {
            self.overloaded(id, reference, Some(cmid));
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

    /// An `error` for a request answered from another shard; `retry_after_ms` where
    /// retrying can help.
    fn error_to(&mut self, reply: ReplyTo, code: ErrorCode, retry_after_ms: Option<u64>) {
        let env = Envelope {
            reference: reply.reference,
            msg: Message::Error(Error {
                code,
                message: Str::from(code.name()),
                cmid: None,
                retry_after_ms,
            }),
        };
        self.reply_to(reply.route, env);
    }

    fn ok_to(&mut self, reply: ReplyTo) {
        let env = Envelope {
            reference: reply.reference,
            msg: Message::Ok,
        };
        self.reply_to(reply.route, env);
    }

    /// Owner side of `group_join` / `group_leave`.
    pub(super) fn group_membership(
        &mut self,
        group: GroupKey,
        member: Str,
        join: bool,
        reply: ReplyTo,
    ) {
        if self.needs_load(&group) {
            let work = GroupWork::Membership {
                member,
                join,
                reply,
            };
            self.load_group_then(group, work);
            return;
        }
        self.group_membership_now(group, member, join, reply);
    }

    fn group_membership_now(&mut self, group: GroupKey, member: Str, join: bool, reply: ReplyTo) {
        let max = self.cfg.limits.max_group_members as usize;
        let owned = &self.groups.owned;
        if join {
            let full = match owned.get(&group) {
                Some(e) => !e.members.contains(&member) && e.members.len() >= max,
                None => owned.len() >= MAX_GROUPS_PER_SHARD,
            };
            if full {
                self.error_to(reply, ErrorCode::LimitExceeded, None);
                return;
            }
        }
        if self.durable() {
            // The stored member list authorizes the stored timeline's appends and survives a
            // restart; the I/O queue keeps it ordered before any later send. `ok` waits for the
            // commit (`membership_stored`).
            let g = group_ref(&group);
            let m = member.clone();
            let op = if join {
                crate::store::Op::Join {
                    group: g,
                    member: m,
                }
            } else {
                crate::store::Op::Leave {
                    group: g,
                    member: m,
                }
            };
            let wait = IoWait::Membership {
                group: group.clone(),
                member: member.clone(),
                join,
                reply,
            };
            if !self.submit(crate::iocore::IoRequest::Apply(vec![op]), wait) {
                let retry = Some(self.cfg.limits.retry_after_ms);
                self.error_to(reply, ErrorCode::Overloaded, retry);
                return;
            }
        }
        self.apply_membership(&group, &member, join);
        if !self.durable() {
            self.ok_to(reply);
        }
    }

    /// Updates the owner's member list and tells the member's owner (online fan-out).
    pub(super) fn apply_membership(&mut self, group: &GroupKey, member: &Str, join: bool) {
        let owned = &mut self.groups.owned;
        if join {
            owned
                .entry(group.clone())
                .or_default()
                .members
                .insert(member.clone());
        } else if let Some(e) = owned.get_mut(group) {
            e.members.remove(member);
            if e.members.is_empty() {
                owned.remove(group);
            }
        }
        let user = UserKey {
            tenant: group.tenant.clone(),
            user: member.clone(),
        };
        let dest = self.owner(&user);
        let group = group.clone();
        self.post_always(dest, ShardMsg::MemberOf { user, group, join });
    }

    /// Durability `local`: the store's answer to a join or leave. `ok` when it is stored; a
    /// refusal (the store's group or per-user limits) undoes the change in memory.
    pub(super) fn membership_stored(
        &mut self,
        (group, member, join): (GroupKey, Str, bool),
        reply: ReplyTo,
        result: Result<Vec<crate::store::OpResult>, IoError>,
    ) {
        use crate::store::{OpResult, Refusal};
        let code = match result.map(|v| v.into_iter().next()) {
            Ok(Some(OpResult::Membership { .. })) => None,
            Ok(Some(OpResult::Refused(Refusal::TooManyGroups | Refusal::GroupFull))) => {
                Some(ErrorCode::LimitExceeded)
            }
            Ok(Some(OpResult::Refused(_))) => Some(ErrorCode::BadRequest),
            Ok(_) => Some(ErrorCode::Unavailable),
            Err(e) => Some(e.code()),
        };
        match code {
            None => {
                // Cluster mode: the member's devices on other nodes follow the group too.
                self.relay(crate::services::cluster::RelayItem::Member {
                    tenant: group.tenant.clone(),
                    user: member,
                    group: group.group.clone(),
                    join,
                });
                self.ok_to(reply)
            }
            Some(code) => {
                // Not stored: memory follows the store.
                self.apply_membership(&group, &member, !join);
                self.error_to(reply, code, None);
            }
        }
    }

    /// Owner side of a group `send`: members only; sequence, ack, fan out.
    pub(super) fn group_send(&mut self, group: GroupKey, origin: Origin, deliver: Deliver) {
        if self.needs_load(&group) {
            self.load_group_then(group, GroupWork::Send { origin, deliver });
            return;
        }
        self.group_send_now(group, origin, deliver);
    }

    fn group_send_now(&mut self, group: GroupKey, origin: Origin, mut deliver: Deliver) {
        let Some(e) = self.groups.owned.get_mut(&group) else {
            self.reject(origin, ErrorCode::NotFound, None);
            return;
        };
        // Cluster mode: this node's copy of the member list may miss a join made on another
        // node; the store checks membership as it appends (`Refusal::NotMember`).
        if !e.members.contains(&deliver.from) && self.cfg.cluster.slot.is_none() {
            self.reject(origin, ErrorCode::Forbidden, None);
            return;
        }
        let mid = self.next_mid();
        deliver.mid = mid;
        deliver.to = Some(Target::Group(group.group.clone()));
        if self.durable() {
            // Durability `local`: on the stored timeline before the ack and the pushes.
            self.append_group(group, origin, deliver);
            return;
        }
        let Some(e) = self.groups.owned.get_mut(&group) else {
            return;
        };
        e.gseq += 1;
        let gseq = e.gseq;
        deliver.inbox_seq = gseq;
        let ts = deliver.ts;
        self.accepted(origin, mid, gseq, ts);
        self.group_fan_out(&group, deliver);
    }

    /// Owner side, after the store accepted a group message: ack the sender, fan out.
    pub(super) fn group_appended(
        &mut self,
        group: GroupKey,
        origin: Origin,
        mut deliver: Deliver,
        (gseq, mid, ts, duplicate): (u64, u64, u64, bool),
    ) {
        self.accepted(origin, mid, gseq, ts);
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
            routes.extend(self.dir.devices(&key).iter().copied());
        }
        if !routes.is_empty() {
            self.fan_out(&routes, deliver);
        }
    }

    /// Member-owner side: `user` joined or left `group`.
    pub(super) fn member_of(&mut self, user: UserKey, group: GroupKey, join: bool) {
        if let Some(dirty) = self.groups.user_loading.get_mut(&user) {
            // The read in flight may predate this change: read again when it lands.
            *dirty = true;
        }
        // Joins are checked against `max_groups_per_user` before they happen (`join_check`);
        // joins checked at the same time from several devices, and admin additions, may pass
        // it by a little. This list follows the stored membership up to twice the limit (its
        // memory bound), and says so when it cannot.
        let max = 2 * self.cfg.limits.max_groups_per_user as usize;
        let online = self.dir.is_online(&user);
        let groups = self.groups.of_user.entry(user.clone()).or_default();
        if !join {
            groups.retain(|g| *g != group);
        } else if groups.contains(&group) {
            // A rejoin: nothing new.
        } else if groups.len() < max {
            groups.push(group.clone());
        } else {
            tracing::warn!(
                tenant = %user.tenant,
                user = %user.user,
                group = %group.group,
                "member of more than twice limits.max_groups_per_user: group not routed"
            );
        }
        if groups.is_empty() {
            self.groups.of_user.remove(&user);
        }
        self.set_group_online(&user, &group, online && join);
    }

    fn set_group_online(&mut self, user: &UserKey, group: &GroupKey, online: bool) {
        let before = self.groups.online.contains_key(group);
        self.set_group_online_now(user, group, online);
        if before != self.groups.online.contains_key(group) && self.cfg.cluster.slot.is_some() {
            self.groups.here_pending.insert(group.clone(), !before);
            self.flush_group_here();
        }
    }

    /// Cluster mode: tells the I/O core of each group whose online members on this shard
    /// came or went (the node then tells the other nodes, which relay the group's messages
    /// only to nodes with members). What a full I/O queue refuses waits for the next tick.
    pub(super) fn flush_group_here(&mut self) {
        let Some(io) = &self.io else {
            self.groups.here_pending.clear();
            return;
        };
        while let Some(group) = self.groups.here_pending.keys().next().cloned() {
            let here = self
                .groups
                .here_pending
                .get(&group)
                .copied()
                .unwrap_or(false);
            let cmd = IoCmd {
                shard: self.id as u16,
                token: 0,
                req: IoRequest::GroupHere {
                    group: group_ref(&group),
                    here,
                },
            };
            if io.submit(cmd).is_err() {
                return;
            }
            self.groups.here_pending.remove(&group);
        }
    }

    fn set_group_online_now(&mut self, user: &UserKey, group: &GroupKey, online: bool) {
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
        if online && self.durable() {
            // The stored memberships are the truth after a restart: read them back.
            self.load_user_groups(user.clone());
        }
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
        self.emit_many(&conns, &env);
    }
}

/// Durability `local`: offline catch-up on group timelines, and reloading memberships from
/// the store after a restart (docs/ARCHITECTURE.md, "Groups").
impl Shard {
    /// Whether `group` must be read back from the store before this owner can decide.
    pub(super) fn needs_load(&self, group: &GroupKey) -> bool {
        self.durable() && !self.groups.owned.contains_key(group)
    }

    /// Queues `work` behind a read of the group's members (starting the read if needed).
    pub(super) fn load_group_then(&mut self, group: GroupKey, work: GroupWork) {
        if let Some(waiting) = self.groups.loading.get_mut(&group) {
            if waiting.len() < MAX_WAITING_PER_GROUP {
                waiting.push(work);
            } else {
                self.refuse_group_work(work, ErrorCode::Overloaded);
            }
            return;
        }
        let req = IoRequest::GroupMembers {
            group: group_ref(&group),
        };
        if !self.submit(
            req,
            IoWait::GroupLoad {
                group: group.clone(),
            },
        ) {
            self.refuse_group_work(work, ErrorCode::Overloaded);
            return;
        }
        self.groups.loading.insert(group, vec![work]);
    }

    fn refuse_group_work(&mut self, work: GroupWork, code: ErrorCode) {
        // A retry hint only where retrying can help (not for damaged data: `internal`).
        let retry = matches!(code, ErrorCode::Overloaded | ErrorCode::Unavailable)
            .then_some(self.cfg.limits.retry_after_ms);
        match work {
            GroupWork::Send { origin, .. } => self.reject(origin, code, retry),
            GroupWork::Membership { reply, .. } => self.error_to(reply, code, retry),
            GroupWork::Admin { reply, .. } => {
                let _ = reply.try_send(super::admin::AdminAnswer::Unavailable);
            }
        }
    }

    /// The group's stored members arrived: install them, then run the waiting work in order.
    pub(super) fn group_loaded(&mut self, group: GroupKey, members: Result<Vec<Str>, IoError>) {
        let Some(waiting) = self.groups.loading.remove(&group) else {
            return;
        };
        let members = match members {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(shard = self.id, error = %e, "reading a group's members failed");
                for w in waiting {
                    self.refuse_group_work(w, e.code());
                }
                return;
            }
        };
        let owned = &mut self.groups.owned;
        if !members.is_empty() && !owned.contains_key(&group) && owned.len() < MAX_GROUPS_PER_SHARD
        {
            let e = owned.entry(group.clone()).or_default();
            e.members.extend(members);
        }
        // An absent group stays unloaded: a send gets `not_found`, a join creates it.
        for w in waiting {
            match w {
                GroupWork::Send { origin, deliver } => {
                    self.group_send_now(group.clone(), origin, deliver)
                }
                GroupWork::Membership {
                    member,
                    join,
                    reply,
                } => self.group_membership_now(group.clone(), member, join, reply),
                GroupWork::Admin { op, reply } => self.admin_group_now(group.clone(), op, reply),
            }
        }
    }

    /// Member-owner side: reads the user's stored groups (on the user's first device).
    fn load_user_groups(&mut self, user: UserKey) {
        if self.groups.user_loading.contains_key(&user) {
            return;
        }
        let req = IoRequest::UserGroups {
            user: user_ref(&user),
        };
        if self.submit(req, IoWait::UserGroups { user: user.clone() }) {
            self.groups.user_loading.insert(user, false);
        }
    }

    /// Member-owner side: the user's stored groups replace what this shard knew.
    pub(super) fn user_groups_loaded(&mut self, user: UserKey, groups: Result<Vec<Str>, IoError>) {
        let Some(dirty) = self.groups.user_loading.remove(&user) else {
            return;
        };
        if dirty {
            self.load_user_groups(user);
            return;
        }
        let Ok(groups) = groups else {
            // Keep what this shard knows; the next login reads again.
            return;
        };
        let max = self.cfg.limits.max_groups_per_user as usize;
        let online = self.dir.is_online(&user);
        let old = self.groups.of_user.remove(&user).unwrap_or_default();
        for g in &old {
            self.set_group_online(&user, g, false);
        }
        let keys: Vec<GroupKey> = groups
            .into_iter()
            .take(max)
            .map(|group| GroupKey {
                tenant: user.tenant.clone(),
                group,
            })
            .collect();
        for g in &keys {
            self.set_group_online(&user, g, online);
        }
        if !keys.is_empty() {
            self.groups.of_user.insert(user, keys);
        }
    }

    /// `sync {group}`: a page of the group's timeline after `after` (0: after the member's
    /// stored group cursor). Read by the connection's shard straight from the store.
    pub(super) fn group_sync_request(
        &mut self,
        conn: ConnId,
        reference: Option<u64>,
        group: Str,
        after: u64,
        limit: u32,
    ) {
        let Some(user) = self.session_user_key(conn) else {
            return;
        };
        if group.is_empty() || group.len() > 128 {
            self.reply_error(
                conn,
                reference,
                ErrorCode::BadRequest,
                "group must be 1 to 128 bytes",
            );
            return;
        }
        let limit = limit.clamp(1, self.cfg.limits.max_sync_limit);
        // The group cursors acked so far first: a sync from the stored cursor sees them.
        if after == 0 {
            self.flush_cursors();
        }
        let req = IoRequest::ReadGroup {
            member: Box::new(user_ref(&user)),
            group: group.clone(),
            after,
            limit,
        };
        let wait = IoWait::GroupSync {
            conn,
            reference,
            group,
        };
        if !self.submit(req, wait) {
            self.overloaded(conn, reference, None);
        }
    }

    /// A group page for `conn`: the deliveries, then `synced {group}`.
    pub(super) fn group_sync_page(
        &mut self,
        conn: ConnId,
        reference: Option<u64>,
        group: Str,
        page: Result<Option<(u64, GroupPage)>, IoError>,
    ) {
        let (after, page) = match page {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.reply_error(conn, reference, ErrorCode::Forbidden, "not a member");
                return;
            }
            Err(e) => {
                self.reply_error(conn, reference, e.code(), "store read failed");
                return;
            }
        };
        let mut up_to = after;
        for e in page.messages {
            up_to = e.gseq;
            self.emit(conn, &Envelope::new(Message::Deliver(e.deliver)));
        }
        self.emit_synced(conn, reference, up_to, page.more, Some(group), Vec::new());
    }

    /// `ack {group, inbox_seq}`: moves the member's group cursor (the store ignores a
    /// non-member's and never moves a cursor backwards).
    pub(super) fn on_group_ack(
        &mut self,
        conn: ConnId,
        reference: Option<u64>,
        group: Str,
        gseq: u64,
    ) {
        let Some(user) = self.session_user_key(conn) else {
            return;
        };
        if group.is_empty() || group.len() > 128 {
            self.reply_error(
                conn,
                reference,
                ErrorCode::BadRequest,
                "group must be 1 to 128 bytes",
            );
            return;
        }
        self.set_group_cursor(
            GroupRef {
                tenant: user.tenant,
                group,
            },
            user.user,
            gseq,
        );
    }

    /// Coalesced like the inbox cursors (`CURSOR_FLUSH_MS`): a member of a busy group acks
    /// every message it gets, and the store needs only the latest. Bounded by
    /// [`MAX_PENDING_GROUP_CURSORS`]: at the bound the pending ones are written at once, and
    /// if the I/O queue refuses them a new pair's ack is not kept (logged at debug, as a
    /// refused cursor write was before; the member's next ack or sync moves it).
    fn set_group_cursor(&mut self, group: GroupRef, member: Str, gseq: u64) {
        if !self.durable() {
            return;
        }
        let key = (group, member);
        if let Some(pending) = self.group_cursor_dirty.get_mut(&key) {
            *pending = (*pending).max(gseq);
            return;
        }
        if self.group_cursor_dirty.len() >= MAX_PENDING_GROUP_CURSORS {
            self.flush_cursors();
        }
        if self.group_cursor_dirty.len() >= MAX_PENDING_GROUP_CURSORS {
            tracing::debug!(
                shard = self.id,
                "I/O queue full: a group cursor was skipped"
            );
            return;
        }
        self.group_cursor_dirty.insert(key, gseq);
    }
}
