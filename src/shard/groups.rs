//! Groups: membership lives with the group's owner shard (hash of tenant and group id), which
//! checks senders and sequences the group's messages on one timeline (`gseq`). Each member's
//! own owner shard also learns the membership, and keeps, per group, the members it owns that
//! are online. A group message then crosses to each shard once: the group owner sends one
//! `GroupFanout` per shard, and each shard forwards to its online members' devices (one
//! message per device shard). The cost per message is O(shards + online members), whatever
//! the group size, and one timeline entry: no per-member copies.
//!
//! The tables and their rules (who may join or send, the next `gseq`, who is online per
//! group) are the [`Roster`](super::roster::Roster)'s; this file carries out what follows
//! from them: replies, posts between shards, store operations and reads, the fan-out.

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

/// Group cursors a shard holds before it writes them (see `Shard::set_group_cursor`).
pub const MAX_PENDING_GROUP_CURSORS: usize = 16_384;

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
        let Some(user) = self.group_requester(id, reference, &group) else {
            return;
        };
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
        if !self.groups.may_join(&user, &group, max) {
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
        let Some(user) = self.session_user(id) else {
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
        if join && !self.groups.admits_join(&group, &member, max) {
            self.error_to(reply, ErrorCode::LimitExceeded, None);
            return;
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
        self.groups.set_member(group, member, join);
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
        if let Err(code) = self.groups.may_send(&group, &deliver.from) {
            self.reject(origin, code, None);
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
        let Some(gseq) = self.groups.next_gseq(&group) else {
            return;
        };
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
    /// (not the sender's), one message per device shard. The roster keeps the group's routes
    /// while neither the members online here nor their devices change
    /// ([`super::roster::Roster::online_routes`]).
    pub(super) fn group_fanout_local(&mut self, group: GroupKey, deliver: Deliver) {
        let dir = &self.dir;
        let member = |user: &Str| {
            dir.devices(&UserKey {
                tenant: group.tenant.clone(),
                user: user.clone(),
            })
        };
        let Some(routes) = self.groups.online_routes(&group, member) else {
            return;
        };
        // The sender's own devices are left out (a device is one user's: leaving out its
        // routes leaves out exactly that user).
        let sender = UserKey {
            tenant: group.tenant.clone(),
            user: deliver.from.clone(),
        };
        let except = self.dir.device_routes(&sender);
        self.fan_out(&routes, &except, deliver);
    }

    /// Member-owner side: `user` joined or left `group`.
    pub(super) fn member_of(&mut self, user: UserKey, group: GroupKey, join: bool) {
        // Joins are checked against `max_groups_per_user` before they happen (`join_check`);
        // joins checked at the same time from several devices, and admin additions, may pass
        // it by a little. The roster follows the stored membership up to twice the limit (its
        // memory bound), and says so when it cannot.
        let max = 2 * self.cfg.limits.max_groups_per_user as usize;
        let online = self.dir.is_online(&user);
        if !self.groups.member_of(&user, &group, join, online, max) {
            tracing::warn!(
                tenant = %user.tenant,
                user = %user.user,
                group = %group.group,
                "member of more than twice limits.max_groups_per_user: group not routed"
            );
        }
        self.flush_group_here();
    }

    /// Cluster mode: tells the I/O core of each group whose online members on this shard
    /// came or went (the node then tells the other nodes, which relay the group's messages
    /// only to nodes with members). What a full I/O queue refuses waits for the next tick.
    pub(super) fn flush_group_here(&mut self) {
        if !self.groups.has_here_pending() {
            return;
        }
        let Some(io) = &self.io else {
            self.groups.forget_here();
            return;
        };
        while let Some((group, here)) = self.groups.next_here() {
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
            self.groups.here_told(&group);
        }
    }

    /// Member-owner side: `user` came online (first device) or went offline (last device).
    pub(super) fn user_online_changed(&mut self, user: &UserKey, online: bool) {
        if online && self.durable() {
            // The stored memberships are the truth after a restart: read them back.
            self.load_user_groups(user.clone());
        }
        self.groups.user_online_changed(user, online);
        self.flush_group_here();
    }

    /// The user of connection `id` making a request that names `group`: `None` when there is
    /// none, or the group id is not 1 to `MAX_ID_BYTES` bytes (then answered with
    /// `bad_request`).
    fn group_requester(
        &mut self,
        id: ConnId,
        reference: Option<u64>,
        group: &Str,
    ) -> Option<UserKey> {
        let user = self.session_user(id)?;
        if !super::session::valid_id(group) {
            let msg = format!("group must be 1 to {} bytes", crate::protocol::MAX_ID_BYTES);
            self.reply_error(id, reference, ErrorCode::BadRequest, &msg);
            return None;
        }
        Some(user)
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
        self.durable() && !self.groups.is_owned(group)
    }

    /// Queues `work` behind a read of the group's members (starting the read if needed).
    pub(super) fn load_group_then(&mut self, group: GroupKey, work: GroupWork) {
        if self.groups.is_loading(&group) {
            if let Some(work) = self.groups.wait_for_load(&group, work) {
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
        self.groups.load_started(group, work);
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
        let Some(waiting) = self.groups.load_ended(&group) else {
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
        self.groups.install(&group, members);
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
        if self.groups.is_user_loading(&user) {
            return;
        }
        let req = IoRequest::UserGroups {
            user: user_ref(&user),
        };
        if self.submit(req, IoWait::UserGroups { user: user.clone() }) {
            self.groups.user_load_started(user);
        }
    }

    /// Member-owner side: the user's stored groups replace what this shard knew.
    pub(super) fn user_groups_loaded(&mut self, user: UserKey, groups: Result<Vec<Str>, IoError>) {
        let Some(dirty) = self.groups.user_load_ended(&user) else {
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
        self.groups.replace_user_groups(&user, groups, online, max);
        self.flush_group_here();
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
        let Some(user) = self.group_requester(conn, reference, &group) else {
            return;
        };
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
        let Some(user) = self.group_requester(conn, reference, &group) else {
            return;
        };
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
