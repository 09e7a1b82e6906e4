//! Reliable delivery (durability `local`): the shard's side of the I/O core, and carrying out
//! what each device's delivery window (window.rs) decides.
//!
//! - The recipient's owner shard hands a `send` to the I/O core, which appends it to the
//!   recipient's durable inbox (gapless `inbox_seq`, `cmid` dedupe) in a group commit; only
//!   then are `send_ack` and the deliveries sent.
//! - Per device, at most `limits.window` deliveries are unacked. Each is retransmitted with
//!   exponential backoff and jitter until acked; past `limits.retry_limit` the connection is
//!   closed (the device catches up by `sync`). A cumulative `ack` confirms and stores the
//!   device's cursor.
//! - Pushes to a device are gapless: a push that does not follow the last one pushed (the
//!   window was full, or a page is being read) is dropped and the device is "lagging"; the
//!   shard then reads the missing range from the store and pushes it (the pump).

use std::sync::atomic::Ordering::Relaxed;

use super::window::{Bounds, Due, Offer, Window};
use super::{Clock, ConnId, Origin, ReplyTo, Route, Shard, ShardMsg, UserKey};
use crate::iocore::{IoCmd, IoDone, IoError, IoReply, IoRequest};
use crate::metrics::CloseReason;
use crate::protocol::{Deliver, Envelope, ErrorCode, Message, Str, Synced};
use crate::store::{InboxPage, Op, OpResult, UserRef};

/// How long after the route caches' TTL the login catch-up read waits (the route itself
/// reaches Redis through the presence pipeline, usually within milliseconds).
pub const CATCHUP_MARGIN_MS: u64 = 500;

/// How long an acked inbox cursor may wait in memory before it is written. Acks arrive with
/// nearly every delivery; writing each one made the I/O core commit batches of cursors alone
/// between appends (an fsync each). Coalesced, a shard hands all its devices' cursors to the
/// store in one command per interval, and a closing connection writes its own at once.
pub const CURSOR_FLUSH_MS: u64 = 100;

/// What an I/O completion belongs to. Appends dominate, so the size difference is the common
/// case, not waste.
#[allow(clippy::large_enum_variant)]
pub(super) enum IoWait {
    /// A 1:1 message being made durable for `to` (and `copy` for its sender, in the same
    /// batch).
    Append {
        to: UserKey,
        origin: Origin,
        deliver: Deliver,
        copy: bool,
    },
    /// A `sync` (or `hello` with `resume`) page for a connection, after `after`.
    Sync {
        conn: ConnId,
        reference: Option<u64>,
        after: u64,
    },
    /// `resume` without a sequence: the stored device cursor first, then a sync.
    ResumeCursor {
        conn: ConnId,
        reference: Option<u64>,
    },
    /// A pump page for a lagging device.
    Pump { conn: ConnId },
    /// Cluster mode, `hello` without `resume`: the inbox's last sequence at login, where the
    /// device's pushes start; the `welcome` waits for it.
    Position {
        conn: ConnId,
        hello: super::HelloDone,
    },
    /// A group message being made durable on its timeline.
    GroupAppend {
        group: super::groups::GroupKey,
        origin: Origin,
        deliver: Deliver,
    },
    /// A group `sync` page for a connection.
    GroupSync {
        conn: ConnId,
        reference: Option<u64>,
        group: Str,
    },
    /// The unread-groups summary closing an inbox sync.
    Unread {
        conn: ConnId,
        reference: Option<u64>,
        up_to: u64,
    },
    /// A group's member list, read back after a restart (the group owner's side).
    GroupLoad { group: super::groups::GroupKey },
    /// A user's groups, read back when the user comes online (the member owner's side).
    UserGroups { user: UserKey },
    /// A join or leave being stored; `ok` waits for it.
    Membership {
        group: super::groups::GroupKey,
        member: Str,
        join: bool,
        reply: ReplyTo,
    },
    /// An admin API membership change (src/shard/admin.rs) being stored; `users` in the
    /// order of the batch's ops.
    AdminMembers {
        group: super::groups::GroupKey,
        users: Vec<Str>,
        join: bool,
        reply: super::admin::ReplyTx,
    },
    /// A push ingress record being stored in a user's inbox.
    PushUser { to: UserKey, deliver: Deliver },
    /// Cluster mode: the nodes holding a user's devices, for its first subscriber here.
    PresenceProbe { user: UserKey },
    /// A push ingress record being stored on a group's timeline.
    PushGroup {
        group: super::groups::GroupKey,
        deliver: Deliver,
    },
    /// A write nobody waits for (cursor updates).
    Nothing,
}

/// Whether a push ingress record was stored as a new message; if so, `deliver` takes its
/// stored position (seq, mid, ts). A duplicate or a failed write pushes nothing.
/// The client error for a failed store call: the error's own code (`unavailable`, or
/// `internal` for damaged data), `unavailable` when the call answered but not as expected.
fn stored_error<T>(r: &Result<T, IoError>) -> ErrorCode {
    match r {
        Err(e) => e.code(),
        Ok(_) => ErrorCode::Unavailable,
    }
}

fn stored_fresh(r: Result<Vec<OpResult>, IoError>, deliver: &mut Deliver) -> bool {
    let Some(OpResult::Appended {
        seq,
        mid,
        ts,
        duplicate: false,
    }) = r.ok().and_then(|v| v.into_iter().next())
    else {
        return false;
    };
    deliver.mid = mid;
    deliver.inbox_seq = seq;
    deliver.ts = ts;
    true
}

fn user_ref(u: &UserKey) -> UserRef {
    UserRef {
        tenant: u.tenant.clone(),
        user: u.user.clone(),
    }
}

impl Shard {
    /// The I/O core port, for the runtime's completion task.
    pub fn io_port(&self) -> Option<&crate::iocore::IoPort> {
        self.io.as_ref()
    }

    /// Whether `send_ack` waits for the I/O core (durability `local`).
    pub(super) fn durable(&self) -> bool {
        self.io.is_some()
    }

    pub(super) fn submit(&mut self, req: IoRequest, wait: IoWait) -> bool {
        let Some(io) = &self.io else { return false };
        self.next_token += 1;
        let token = self.next_token;
        let cmd = IoCmd {
            shard: self.id as u16,
            token,
            req,
        };
        if io.submit(cmd).is_err() {
            return false;
        }
        self.io_pending.insert(token, wait);
        true
    }

    /// Tells the sender's shard that its `send` was accepted (`send_ack`).
    pub(super) fn accepted(&mut self, origin: Origin, mid: u64, seq: u64, ts: u64) {
        let shard = usize::from(origin.reply.route.shard);
        self.post_always(
            shard,
            ShardMsg::Accepted {
                origin,
                mid,
                seq,
                ts,
            },
        );
    }

    /// Tells the sender's shard that its `send` was refused with `code`.
    pub(super) fn reject(&mut self, origin: Origin, code: ErrorCode, retry_after_ms: Option<u64>) {
        let shard = usize::from(origin.reply.route.shard);
        self.post_always(
            shard,
            ShardMsg::Rejected {
                origin,
                code,
                retry_after_ms,
            },
        );
    }

    /// A write whose result nobody waits for; skipped (and logged) when the I/O queue is full.
    pub(super) fn submit_write(&mut self, op: Op) {
        if !self.submit(IoRequest::Apply(vec![op]), IoWait::Nothing) {
            tracing::debug!(
                shard = self.id,
                "I/O queue full: a bookkeeping write was skipped"
            );
        }
    }

    /// Group owner: append to the stored timeline, then ack and fan out (`on_io_done`).
    pub(super) fn append_group(
        &mut self,
        group: super::groups::GroupKey,
        origin: Origin,
        deliver: Deliver,
    ) {
        let op = Op::AppendGroup {
            group: crate::store::GroupRef {
                tenant: group.tenant.clone(),
                group: group.group.clone(),
            },
            sender: deliver.from.clone(),
            cmid: origin.cmid.clone(),
            deliver: deliver.clone(),
        };
        let refused = origin.clone();
        let wait = IoWait::GroupAppend {
            group,
            origin,
            deliver,
        };
        if !self.submit(IoRequest::Apply(vec![op]), wait) {
            let retry = Some(self.cfg.limits.retry_after_ms);
            self.reject(refused, ErrorCode::Overloaded, retry);
        }
    }

    /// The sender's copy of a 1:1 message to `to` (`server.sync_sent`): for the sender's
    /// inbox, `to` naming the peer. None when turned off, and for a message to oneself (the
    /// recipient's inbox is the sender's).
    pub(super) fn sender_copy(
        &self,
        to: &UserKey,
        deliver: &Deliver,
    ) -> Option<(UserKey, Deliver)> {
        if !self.cfg.server.sync_sent || deliver.from == to.user {
            return None;
        }
        let sender = UserKey {
            tenant: to.tenant.clone(),
            user: deliver.from.clone(),
        };
        let mut copy = deliver.clone();
        copy.to = Some(crate::protocol::Target::User(to.user.clone()));
        Some((sender, copy))
    }

    /// Hands the sender's copy, numbered, to the sender's owner, for every device of the
    /// sender but `except`, the one that sent it. `must`: past the outbox bound too (a stored
    /// copy); otherwise shed when overloaded, like the message itself at `memory`.
    pub(super) fn post_sent_copy(
        &mut self,
        sender: UserKey,
        except: Route,
        deliver: Deliver,
        must: bool,
    ) {
        let owner = self.owner(&sender);
        let msg = ShardMsg::SentCopy {
            to: sender,
            except,
            deliver,
        };
        if must {
            self.post_always(owner, msg);
        } else {
            let _ = self.post(owner, msg);
        }
    }

    /// Owner side: make a 1:1 message durable, then deliver and ack (see `on_io_done`).
    pub(super) fn append_direct(&mut self, to: UserKey, origin: Origin, deliver: Deliver) {
        let mut ops = vec![Op::AppendInbox {
            user: user_ref(&to),
            sender: deliver.from.clone(),
            cmid: origin.cmid.clone(),
            deliver: deliver.clone(),
        }];
        // The sender's copy commits with the message: acked means both are stored.
        let copy = self.sender_copy(&to, &deliver);
        if let Some((sender, copy)) = &copy {
            ops.push(Op::AppendInbox {
                user: user_ref(sender),
                sender: copy.from.clone(),
                cmid: origin.cmid.clone(),
                deliver: copy.clone(),
            });
        }
        let refused = origin.clone();
        let wait = IoWait::Append {
            to,
            origin,
            deliver,
            copy: copy.is_some(),
        };
        if !self.submit(IoRequest::Apply(ops), wait) {
            let retry = Some(self.cfg.limits.retry_after_ms);
            self.reject(refused, ErrorCode::Overloaded, retry);
        }
    }

    /// Completions from the I/O core.
    pub fn on_io_done(&mut self, done: IoDone, clk: Clock) {
        self.set_now(clk);
        if done.token == 0 {
            // Nobody waits for token 0: work from outside the shards (`iocore::Pusher`).
            match done.reply {
                IoReply::Push(rec) => self.on_push(*rec, clk),
                IoReply::Kick(user) => {
                    // An admin kick reaches this node's devices here, the others' by relay.
                    self.kick(&user);
                    let (tenant, user) = (user.tenant.clone(), user.user.clone());
                    self.relay(crate::services::cluster::RelayItem::Kick { tenant, user });
                }
                IoReply::Relayed(r) => self.on_relayed(*r, clk),
                _ => {}
            }
            return;
        }
        let Some(wait) = self.io_pending.remove(&done.token) else {
            return;
        };
        match (wait, done.reply) {
            (
                IoWait::Append {
                    to,
                    origin,
                    mut deliver,
                    copy,
                },
                IoReply::Applied(r),
            ) => {
                let code = stored_error(&r);
                let base_ms = self.cfg.limits.retry_after_ms;
                let retry = match &r {
                    Err(e) => e.retry_after_ms(base_ms),
                    Ok(_) => Some(base_ms),
                };
                let mut results = r.ok().map(Vec::into_iter);
                let first = results.as_mut().and_then(Iterator::next);
                let copied = results.as_mut().and_then(Iterator::next);
                let Some(OpResult::Appended {
                    seq,
                    mid,
                    ts,
                    duplicate,
                }) = first
                else {
                    self.reject(origin, code, retry);
                    return;
                };
                let copy = copy.then(|| self.sender_copy(&to, &deliver)).flatten();
                if let (
                    Some((sender, mut c)),
                    Some(OpResult::Appended {
                        seq,
                        mid,
                        ts,
                        duplicate: false,
                    }),
                ) = (copy, copied)
                {
                    (c.mid, c.inbox_seq, c.ts) = (mid, seq, ts);
                    self.post_sent_copy(sender, origin.reply.route, c, true);
                }
                if !duplicate {
                    // A resent cmid was delivered the first time: never twice.
                    deliver.mid = mid;
                    deliver.inbox_seq = seq;
                    deliver.ts = ts;
                    self.push_to_devices(&to, deliver);
                }
                self.accepted(origin, mid, seq, ts);
            }
            (
                IoWait::GroupAppend {
                    group,
                    origin,
                    deliver,
                },
                IoReply::Applied(r),
            ) => {
                let code = stored_error(&r);
                match r.ok().and_then(|v| v.into_iter().next()) {
                    Some(OpResult::Appended {
                        seq,
                        mid,
                        ts,
                        duplicate,
                    }) => self.group_appended(group, origin, deliver, (seq, mid, ts, duplicate)),
                    Some(OpResult::Refused(_)) => self.reject(origin, ErrorCode::Forbidden, None),
                    _ => self.reject(origin, code, None),
                }
            }
            (IoWait::PushUser { to, mut deliver }, IoReply::Applied(r)) => {
                let fresh = stored_fresh(r, &mut deliver);
                if fresh {
                    self.push_to_devices(&to, deliver);
                }
            }
            (IoWait::PushGroup { group, mut deliver }, IoReply::Applied(r)) => {
                let fresh = stored_fresh(r, &mut deliver);
                if fresh {
                    self.group_fan_out(&group, deliver);
                }
            }
            (
                IoWait::Sync {
                    conn,
                    reference,
                    after,
                },
                IoReply::Inbox(r),
            ) => {
                self.sync_page(conn, reference, r, Some(after));
            }
            (IoWait::Pump { conn }, IoReply::Inbox(r)) => {
                self.sync_page(conn, None, r, None);
            }
            (IoWait::Position { conn, hello }, IoReply::Cursor(r)) => {
                self.positioned(conn, hello, r, clk);
            }
            (IoWait::ResumeCursor { conn, reference }, IoReply::Cursor(r)) => {
                let after = r.unwrap_or(0);
                // `sync_request` holds pushes again, or lets them go if it is refused.
                if let Some(s) = self.session_mut(conn) {
                    s.window_mut().end_sync();
                }
                self.sync_request(conn, reference, after, u32::MAX);
            }
            (
                IoWait::GroupSync {
                    conn,
                    reference,
                    group,
                },
                IoReply::Group(r),
            ) => self.group_sync_page(conn, reference, group, r),
            (
                IoWait::Unread {
                    conn,
                    reference,
                    up_to,
                },
                IoReply::Groups(r),
            ) => {
                // A failed summary read still closes the sync; the groups are only a hint.
                let groups = r.unwrap_or_default();
                self.emit_synced(conn, reference, up_to, false, None, groups);
            }
            (IoWait::GroupLoad { group }, IoReply::Members(r)) => self.group_loaded(group, r),
            (
                IoWait::Membership {
                    group,
                    member,
                    join,
                    reply,
                },
                IoReply::Applied(r),
            ) => self.membership_stored((group, member, join), reply, r),
            (
                IoWait::AdminMembers {
                    group,
                    users,
                    join,
                    reply,
                },
                IoReply::Applied(r),
            ) => self.admin_members_stored(group, users, join, reply, r),
            (IoWait::UserGroups { user }, IoReply::Groups(r)) => self.user_groups_loaded(user, r),
            (IoWait::PresenceProbe { user }, IoReply::Nodes(r)) => {
                self.presence_probed(user, r, clk)
            }
            _ => {}
        }
    }

    /// Owner side: `deliver` to every online device of `to`, one message per device shard.
    /// Owner side of an admin kick: every device of `user` gets `goaway` and is closed by
    /// its shard (the owner drops the routes when the devices unregister).
    pub(super) fn kick(&mut self, user: &UserKey) {
        for route in self.dir.device_routes(user) {
            self.post_always(
                usize::from(route.shard),
                ShardMsg::Kick { conn: route.conn },
            );
        }
    }

    pub(super) fn push_to_devices(&mut self, to: &UserKey, deliver: Deliver) {
        let routes = self.dir.device_routes(to);
        if !routes.is_empty() {
            self.fan_out(&routes, &[], deliver);
        }
    }

    /// Device side: this device's own message took `seq` in its user's inbox (the sender's
    /// copy). In step, the window steps over it: the device has the message. Out of step (a
    /// sync or pump under way, a gap), the pump brings the copy like any other message.
    pub(super) fn sent_seq(&mut self, conn: ConnId, seq: u64) {
        if let Some(s) = self.session_mut(conn) {
            s.window_mut().step_over(seq);
        }
    }

    /// Device side: a pushed delivery for `conn`.
    pub(super) fn push_durable(&mut self, conn: ConnId, deliver: &Deliver, clk: Clock) {
        let b = Bounds::of(&self.cfg.limits);
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        match s.window_mut().offer(deliver, clk.mono_ms, &b) {
            Offer::Push { due_ms } => self.pushed(conn, deliver.clone(), due_ms),
            Offer::Had => {}
            Offer::Lag => self.maybe_pump(conn),
        }
    }

    /// A delivery entered `conn`'s window: write it and arm its retransmit.
    fn pushed(&mut self, conn: ConnId, deliver: Deliver, due_ms: u64) {
        self.metrics.shards[self.id]
            .deliveries_pending
            .fetch_add(1, Relaxed);
        self.emit(conn, &Envelope::new(Message::Deliver(deliver)));
        self.arm(conn, due_ms);
    }

    /// Reads the range a lagging device is missing, when the window has room.
    fn maybe_pump(&mut self, conn: ConnId) {
        let b = Bounds::of(&self.cfg.limits);
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        let Some((after, limit)) = s.window_mut().pump(&b) else {
            return;
        };
        let req = IoRequest::ReadInbox {
            user: user_ref(&s.user),
            after,
            limit,
        };
        if !self.submit(req, IoWait::Pump { conn }) {
            self.pump_failed(conn);
        }
    }

    /// A pump read was refused or failed: the connection is retried on the next tick.
    pub(super) fn pump_failed(&mut self, conn: ConnId) {
        if self
            .session_mut(conn)
            .is_some_and(|s| s.window_mut().pump_failed())
        {
            self.pump_retry.push(conn);
        }
    }

    /// The tick's retry of the pump reads that could not be made, until one is refused again
    /// (the I/O queue is still full: the rest wait for the next tick).
    pub(super) fn retry_pumps(&mut self) {
        let mut waiting = std::mem::take(&mut self.pump_retry).into_iter();
        for conn in waiting.by_ref() {
            let Some(s) = self.session_mut(conn) else {
                continue;
            };
            s.window_mut().retry_taken();
            self.maybe_pump(conn);
            if !self.pump_retry.is_empty() {
                break;
            }
        }
        self.pump_retry.extend(waiting);
    }

    /// A page from the store for `conn`: pumped pages (`sync_after` = `None`) enter the
    /// window; sync pages (read after `sync_after`) are sent as they are and answered with
    /// `synced`.
    fn sync_page(
        &mut self,
        conn: ConnId,
        reference: Option<u64>,
        page: Result<InboxPage, IoError>,
        sync_after: Option<u64>,
    ) {
        let page = match (page, sync_after) {
            (Ok(p), _) => p,
            // Retried on the next tick (or by the next ack or push before it).
            (Err(_), None) => return self.pump_failed(conn),
            (Err(e), Some(_)) => {
                if let Some(s) = self.session_mut(conn) {
                    s.window_mut().end_sync();
                }
                self.maybe_pump(conn);
                self.reply_error(conn, reference, e.code(), "store read failed");
                return;
            }
        };
        let Some(after) = sync_after else {
            let b = Bounds::of(&self.cfg.limits);
            let now_ms = self.now_ms;
            let Some(s) = self.session_mut(conn) else {
                return;
            };
            let pumped = s.window_mut().pumped(page, now_ms, &b);
            for d in pumped.push {
                self.pushed(conn, d, pumped.due_ms);
            }
            if pumped.retry_on_tick {
                self.pump_failed(conn);
            } else {
                self.maybe_pump(conn);
            }
            return;
        };
        let mut up_to = 0;
        for d in page.messages {
            up_to = d.inbox_seq;
            self.emit(conn, &Envelope::new(Message::Deliver(d)));
        }
        if page.more {
            self.emit_synced(conn, reference, up_to, true, None, Vec::new());
            return;
        }
        if let Some(s) = self.session_mut(conn) {
            // The device has everything up to here (an empty page: everything after the
            // sync's start): pushes continue after it, and what was held back meanwhile comes
            // through the pump, in order.
            s.window_mut().synced_through(up_to.max(after));
        }
        self.maybe_pump(conn);
        // The last page: list the groups with unread messages in `synced`. The group cursors
        // acked so far first: the read sees them (one I/O queue).
        self.flush_cursors();
        if let Some(s) = self.session_mut(conn) {
            let req = IoRequest::UnreadGroups {
                user: user_ref(&s.user),
            };
            let wait = IoWait::Unread {
                conn,
                reference,
                up_to,
            };
            if self.submit(req, wait) {
                return;
            }
        }
        self.emit_synced(conn, reference, up_to, false, None, Vec::new());
    }

    pub(super) fn emit_synced(
        &mut self,
        conn: ConnId,
        reference: Option<u64>,
        up_to: u64,
        more: bool,
        group: Option<Str>,
        groups: Vec<Str>,
    ) {
        let env = Envelope {
            reference,
            msg: Message::Synced(Synced {
                up_to,
                more,
                group,
                groups,
            }),
        };
        self.emit(conn, &env);
    }

    /// `sync` (or `resume`) from a device: a page of its inbox after `after`.
    pub(super) fn sync_request(
        &mut self,
        conn: ConnId,
        reference: Option<u64>,
        after: u64,
        limit: u32,
    ) {
        let limit = limit.clamp(1, self.cfg.limits.max_sync_limit);
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        let req = IoRequest::ReadInbox {
            user: user_ref(&s.user),
            after,
            limit,
        };
        let was_syncing = s.window_mut().begin_sync();
        let wait = IoWait::Sync {
            conn,
            reference,
            after,
        };
        if !self.submit(req, wait) {
            if let Some(s) = self.session_mut(conn) {
                s.window_mut().sync_refused(was_syncing);
            }
            self.overloaded(conn, reference, None);
        }
    }

    /// `hello` with `resume`: from the given sequence, or from the device's stored cursor.
    pub(super) fn resume(&mut self, conn: ConnId, reference: Option<u64>, inbox_seq: u64) {
        if inbox_seq > 0 {
            self.sync_request(conn, reference, inbox_seq, u32::MAX);
            return;
        }
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        let req = IoRequest::Cursor {
            user: user_ref(&s.user),
            device: s.device.clone(),
        };
        // Pushes wait from now: the cursor read and the pages after it come first.
        let was_syncing = s.window_mut().begin_sync();
        if !self.submit(req, IoWait::ResumeCursor { conn, reference }) {
            if let Some(s) = self.session_mut(conn) {
                s.window_mut().sync_refused(was_syncing);
            }
            self.overloaded(conn, reference, None);
        }
    }

    /// A cumulative `ack` from a device.
    pub(super) fn on_ack(&mut self, conn: ConnId, inbox_seq: u64) {
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        let (confirmed, first) = s.window_mut().ack(inbox_seq);
        // Coalesced (`CURSOR_FLUSH_MS`): only the latest ack per device is written.
        if first {
            self.cursor_dirty.push(conn);
        }
        let m = &self.metrics.shards[self.id];
        m.deliveries_pending.fetch_sub(confirmed as i64, Relaxed);
        m.deliveries_confirmed.fetch_add(confirmed, Relaxed);
        self.maybe_pump(conn);
    }

    /// Hands every pending device cursor and group cursor to the store in one command. The
    /// cursors are advisory (a device resumes from its own position when it gives one): when
    /// the I/O queue is full they stay pending for the next flush rather than queue without
    /// bound.
    pub(super) fn flush_cursors(&mut self) {
        if (self.cursor_dirty.is_empty() && self.group_cursor_dirty.is_empty()) || !self.durable() {
            return;
        }
        let mut ops = Vec::with_capacity(self.cursor_dirty.len() + self.group_cursor_dirty.len());
        for ((group, member), gseq) in &self.group_cursor_dirty {
            ops.push(Op::SetGroupCursor {
                group: group.clone(),
                member: member.clone(),
                gseq: *gseq,
            });
        }
        for &conn in &self.cursor_dirty {
            let Some(s) = self.conns.get(conn).and_then(|c| c.session.as_ref()) else {
                continue;
            };
            if s.cursor() > 0 {
                ops.push(Op::SetCursor {
                    user: user_ref(&s.user),
                    device: s.device.clone(),
                    seq: s.cursor(),
                });
            }
        }
        if !ops.is_empty() && !self.submit(IoRequest::Apply(ops), IoWait::Nothing) {
            return;
        }
        self.group_cursor_dirty.clear();
        for conn in std::mem::take(&mut self.cursor_dirty) {
            if let Some(s) = self.session_mut(conn) {
                s.window_mut().cursor_written();
            }
        }
    }

    /// A closing device's pending cursor, written at once (skipped when the queue is full).
    pub(super) fn write_cursor_now(&mut self, s: &super::Session) {
        if s.cursor() > 0 {
            self.submit_write(Op::SetCursor {
                user: user_ref(&s.user),
                device: s.device.clone(),
                seq: s.cursor(),
            });
        }
    }

    /// Retransmits what is due on `conn`; returns the next retransmit deadline, or `None`.
    /// Closes the connection when a delivery ran out of retries.
    pub(super) fn retransmit_due(&mut self, conn: ConnId, clk: Clock) -> Option<u64> {
        let b = Bounds::of(&self.cfg.limits);
        let due = self
            .session_mut(conn)?
            .window
            .as_mut()?
            .due(clk.mono_ms, &b);
        let m = &self.metrics.shards[self.id];
        match due {
            Due::RetryLimit { dropped } => {
                m.deliveries_pending.fetch_sub(dropped as i64, Relaxed);
                m.deliveries_failed.fetch_add(dropped, Relaxed);
                self.goaway(conn, "retry_limit", 0);
                self.close(conn, CloseReason::RetryLimit);
                None
            }
            Due::Resend {
                resend,
                catchup,
                next_ms,
            } => {
                m.retransmits.fetch_add(resend.len() as u64, Relaxed);
                if catchup {
                    m.catchups.fetch_add(1, Relaxed);
                }
                for d in resend {
                    self.emit(conn, &Envelope::new(Message::Deliver(d)));
                }
                if catchup {
                    self.maybe_pump(conn);
                }
                next_ms
            }
        }
    }

    /// Cluster mode: a device that logs in without `resume` takes the messages stored after
    /// its login. On one node the owner shard's order makes the first push the next message;
    /// in a cluster a message stored elsewhere may be relayed after a later one, so the
    /// position is read from the store (the inbox's last sequence) before the `welcome`, and
    /// pushes wait for it. `false`: not needed, carry on with the `welcome`.
    pub(super) fn position_first(&mut self, conn: ConnId, hello: &super::HelloDone) -> bool {
        if self.cfg.cluster.slot.is_none() || !self.durable() || hello.resume.is_some() {
            return false;
        }
        let Some(s) = self.session_mut(conn) else {
            return false;
        };
        let req = IoRequest::LastInboxSeq {
            user: user_ref(&s.user),
        };
        let was_syncing = s.window_mut().begin_sync();
        let wait = IoWait::Position {
            conn,
            hello: *hello,
        };
        if self.submit(req, wait) {
            return true;
        }
        // The I/O queue is full: the welcome goes now, and the first push sets the position.
        if let Some(s) = self.session_mut(conn) {
            s.window_mut().sync_refused(was_syncing);
        }
        false
    }

    fn positioned(
        &mut self,
        conn: ConnId,
        hello: super::HelloDone,
        last: Result<u64, IoError>,
        clk: Clock,
    ) {
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        match last {
            Ok(last) => s.window_mut().synced_through(last),
            Err(_) => s.window_mut().end_sync(),
        }
        self.emit_welcome(conn, hello, clk);
        // Pushes held back meanwhile come from the store, in order.
        self.maybe_pump(conn);
    }

    /// Cluster mode: schedules the login catch-up read of `conn` (see `Window::catchup_ms`).
    pub(super) fn schedule_catchup(&mut self, conn: ConnId, clk: Clock) {
        if self.cfg.cluster.slot.is_none() || !self.durable() {
            return;
        }
        let at = clk.mono_ms + self.cfg.cluster.route_cache_ttl_ms + CATCHUP_MARGIN_MS;
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        s.window_mut().schedule_catchup(at);
        self.arm(conn, at);
    }

    /// A closing device's unacked deliveries become FAILED (the device recovers them by sync).
    pub(super) fn fail_window(&mut self, window: &Window) {
        let n = window.unacked() as u64;
        if n > 0 {
            let m = &self.metrics.shards[self.id];
            m.deliveries_pending.fetch_sub(n as i64, Relaxed);
            m.deliveries_failed.fetch_add(n, Relaxed);
        }
    }
}
