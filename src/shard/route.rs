//! The owner side of a shard: what it does with batches from other shards (and its own local
//! queue). Owned users' device routes, inbox sequence numbers, presence status and subscriber
//! lists live here; deliveries are grouped so each destination shard gets one message per
//! delivery, however many of the user's devices live there.

use super::{
    Batch, Clock, ConnId, Route, Shard, ShardMsg, UserEntry, UserKey, MAX_SUBSCRIBERS_PER_USER,
    MAX_USERS_PER_SHARD,
};
use crate::metrics::{CloseReason, Stage};
use crate::protocol::{
    Deliver, Envelope, Error, ErrorCode, Message, Presence, SendAck, Status, Str,
};

impl Shard {
    /// Handles a batch that arrived from shard `_from` (or from our own local queue).
    pub fn on_batch(&mut self, batch: Batch, clk: Clock) {
        self.set_now(clk);
        if batch.msgs.is_empty() {
            return;
        }
        self.metrics.shards[self.id].stages[Stage::ShardQueue as usize]
            .record_us(clk.mono_us.saturating_sub(batch.posted_us));
        for msg in batch.msgs {
            self.on_shard_msg(msg, clk);
        }
    }

    fn on_shard_msg(&mut self, msg: ShardMsg, clk: Clock) {
        match msg {
            ShardMsg::Register { user, route, hello } => {
                if self.on_register(user, route, clk) {
                    self.post_always(
                        usize::from(route.shard),
                        ShardMsg::Registered {
                            conn: route.conn,
                            hello,
                        },
                    );
                }
            }
            ShardMsg::Registered { conn, hello } => self.welcome(conn, hello, clk),
            ShardMsg::Unregister { user, route } => {
                let Some(e) = self.users.get_mut(&user) else {
                    return;
                };
                let before = e.statuses();
                e.devices.retain(|r| *r != route);
                if e.devices.is_empty() {
                    self.user_online_changed(&user, false);
                }
                self.presence_changed(&user, before, clk);
                self.gc_user(&user);
            }
            ShardMsg::Kick { conn } => {
                // A connection that is gone (or replaced: the id's generation) is left alone.
                if self.conns.get(conn).is_some() {
                    self.goaway(conn, "kicked", 0);
                    self.close(conn, CloseReason::Drain);
                }
            }
            ShardMsg::RegisterRefused { conn, message } => {
                let env = Envelope::new(Message::Error(Error {
                    code: ErrorCode::LimitExceeded,
                    message,
                    cmid: None,
                    retry_after_ms: None,
                }));
                self.emit(conn, &env);
                self.close(conn, CloseReason::Limit);
            }
            ShardMsg::SetStatus { user, status } => {
                let Some(e) = self.users.get_mut(&user) else {
                    return;
                };
                let before = e.statuses();
                e.status = Some(status);
                self.presence_changed(&user, before, clk);
            }
            ShardMsg::Subscribe { target, subscriber } => {
                if !self.users.contains_key(&target) && self.users.len() >= MAX_USERS_PER_SHARD {
                    return;
                }
                let cluster = self.cfg.cluster.slot.is_some() && self.durable();
                let e = self.users.entry(target.clone()).or_default();
                if e.subscribers.len() < MAX_SUBSCRIBERS_PER_USER
                    && !e.subscribers.contains(&subscriber)
                {
                    e.subscribers.push(subscriber);
                }
                // Cluster mode: the target may be online on other nodes only, and this node
                // may have heard nothing of it yet: ask Redis which nodes hold its devices.
                let probe = e.devices.is_empty()
                    && e.remote.is_empty()
                    && e.subscribers.len() == 1
                    && cluster;
                // The subscriber learns the current status at once.
                let presence = Presence {
                    user: target.user.clone(),
                    status: e.effective_status(),
                    ts: clk.unix_ms,
                };
                self.post_always(
                    usize::from(subscriber.shard),
                    ShardMsg::PresenceEvent {
                        conns: vec![subscriber.conn],
                        presence,
                    },
                );
                if probe {
                    self.probe_presence(target);
                }
            }
            ShardMsg::Unsubscribe { target, subscriber } => {
                if let Some(e) = self.users.get_mut(&target) {
                    e.subscribers.retain(|r| *r != subscriber);
                }
                self.gc_user(&target);
            }
            ShardMsg::PresenceEvent { conns, presence } => {
                let env = Envelope::new(Message::Presence(presence));
                self.emit_many(&conns, &env);
            }
            ShardMsg::Direct {
                to,
                origin,
                mut deliver,
            } => {
                let mid = self.next_mid();
                deliver.mid = mid;
                if self.durable() {
                    self.append_direct(to, origin, deliver);
                    return;
                }
                let seq = match self.users.get_mut(&to) {
                    Some(e) => {
                        e.inbox_seq += 1;
                        e.inbox_seq
                    }
                    // Durability `memory`: an offline user has no inbox; nothing is kept.
                    None => 0,
                };
                deliver.inbox_seq = seq;
                let ts = deliver.ts;
                let copy = self.sender_copy(&to, &deliver);
                self.push_to_devices(&to, deliver);
                if let Some((sender, copy)) = copy {
                    self.post_sent_copy(sender, origin.reply.route, copy, false);
                }
                self.accepted(origin, mid, seq, ts);
            }
            ShardMsg::SentCopy {
                to,
                except,
                mut deliver,
            } => self.sent_copy(to, except, &mut deliver),
            ShardMsg::SentSeq { conn, seq } => self.sent_seq(conn, seq),
            ShardMsg::Accepted {
                origin,
                mid,
                seq,
                ts,
            } => {
                self.metrics.shards[self.id].stages[Stage::SendAck as usize]
                    .record_us(clk.mono_us.saturating_sub(origin.received_us));
                let env = Envelope {
                    reference: origin.reply.reference,
                    msg: Message::SendAck(SendAck {
                        cmid: origin.cmid,
                        mid,
                        seq,
                        ts,
                    }),
                };
                self.emit(origin.reply.route.conn, &env);
            }
            ShardMsg::Rejected {
                origin,
                code,
                retry_after_ms,
            } => {
                let env = Envelope {
                    reference: origin.reply.reference,
                    msg: Message::Error(Error {
                        code,
                        message: Str::from(code.name()),
                        cmid: Some(origin.cmid),
                        retry_after_ms,
                    }),
                };
                self.emit(origin.reply.route.conn, &env);
            }
            ShardMsg::JoinCheck {
                group,
                member,
                reply,
            } => self.join_check(group, member, reply),
            ShardMsg::GroupMembership {
                group,
                member,
                join,
                reply,
            } => self.group_membership(group, member, join, reply),
            ShardMsg::GroupSend {
                group,
                origin,
                deliver,
            } => self.group_send(group, origin, deliver),
            ShardMsg::GroupFanout { group, deliver } => self.group_fanout_local(group, deliver),
            ShardMsg::MemberOf { user, group, join } => self.member_of(user, group, join),
            ShardMsg::Reply { conn, env } => self.emit(conn, &env),
            ShardMsg::Deliver { conns, deliver }
                if matches!(deliver.to, Some(crate::protocol::Target::Group(_))) =>
            {
                self.deliver_group_push(conns, deliver, clk)
            }
            ShardMsg::Deliver { conns, deliver } if self.durable() => {
                for conn in conns {
                    self.push_durable(conn, &deliver, clk);
                }
            }
            ShardMsg::Deliver { conns, deliver } => {
                let env = Envelope::new(Message::Deliver(deliver));
                let m = &self.metrics.shards[self.id];
                m.deliveries_confirmed
                    .fetch_add(conns.len() as u64, std::sync::atomic::Ordering::Relaxed);
                self.emit_many(&conns, &env);
            }
        }
    }

    /// Adds the device to its user's routes; false when refused (`RegisterRefused` sent).
    fn on_register(&mut self, user: UserKey, route: Route, clk: Clock) -> bool {
        if !self.users.contains_key(&user) && self.users.len() >= MAX_USERS_PER_SHARD {
            self.post_always(
                usize::from(route.shard),
                ShardMsg::RegisterRefused {
                    conn: route.conn,
                    message: Str::from_static("shard user table full"),
                },
            );
            return false;
        }
        let max = self.cfg.limits.max_devices_per_user as usize;
        let e = self.users.entry(user.clone()).or_default();
        if e.devices.len() >= max {
            self.post_always(
                usize::from(route.shard),
                ShardMsg::RegisterRefused {
                    conn: route.conn,
                    message: Str::from_static("too many devices online"),
                },
            );
            return false;
        }
        let before = e.statuses();
        e.devices.push(route);
        if e.devices.len() == 1 {
            self.user_online_changed(&user, true);
        }
        self.presence_changed(&user, before, clk);
        true
    }

    /// Tells subscribers when the user's effective status differs from `before.0`; in a
    /// cluster, tells the other nodes when the status of the devices here differs from
    /// `before.1`.
    pub(super) fn presence_changed(
        &mut self,
        user: &UserKey,
        before: (Status, Status),
        clk: Clock,
    ) {
        let Some(e) = self.users.get(user) else {
            return;
        };
        let (now, local) = e.statuses();
        if local != before.1 {
            self.relay(crate::services::cluster::RelayItem::Presence {
                tenant: user.tenant.clone(),
                user: user.user.clone(),
                status: local,
            });
        }
        let Some(e) = self.users.get(user) else {
            return;
        };
        if now == before.0 || e.subscribers.is_empty() {
            return;
        }
        let presence = Presence {
            user: user.user.clone(),
            status: now,
            ts: clk.unix_ms,
        };
        // One message per subscriber shard.
        let mut by_shard: Vec<Vec<ConnId>> = vec![Vec::new(); self.shards];
        for r in &e.subscribers {
            by_shard[usize::from(r.shard)].push(r.conn);
        }
        for (shard, conns) in by_shard.into_iter().enumerate() {
            if !conns.is_empty() {
                self.post_always(
                    shard,
                    ShardMsg::PresenceEvent {
                        conns,
                        presence: presence.clone(),
                    },
                );
            }
        }
    }

    /// Sends `deliver` to every route, one message per destination shard.
    pub(super) fn fan_out(&mut self, routes: &[Route], deliver: Deliver) {
        let mut by_shard: Vec<Vec<ConnId>> = vec![Vec::new(); self.shards];
        for r in routes {
            by_shard[usize::from(r.shard)].push(r.conn);
        }
        let mut last = None;
        for (shard, conns) in by_shard.into_iter().enumerate() {
            if !conns.is_empty() {
                if let Some((s, c)) = last.take() {
                    self.post_always(
                        s,
                        ShardMsg::Deliver {
                            conns: c,
                            deliver: deliver.clone(),
                        },
                    );
                }
                last = Some((shard, conns));
            }
        }
        if let Some((s, conns)) = last {
            self.post_always(s, ShardMsg::Deliver { conns, deliver });
        }
    }

    /// Owner of a sender: its copy of a 1:1 message to every device of the user but the one
    /// that sent it, which only learns the copy's place in the inbox (durable).
    fn sent_copy(&mut self, to: UserKey, except: Route, deliver: &mut Deliver) {
        let durable = self.durable();
        let Some(e) = self.users.get_mut(&to) else {
            return; // no device online: a durable copy waits in the inbox for `sync`
        };
        if !durable {
            e.inbox_seq += 1;
            deliver.inbox_seq = e.inbox_seq;
        }
        let routes: Vec<Route> = e.devices.iter().copied().filter(|r| *r != except).collect();
        if durable && e.devices.contains(&except) {
            let seq = deliver.inbox_seq;
            self.post_always(
                usize::from(except.shard),
                ShardMsg::SentSeq {
                    conn: except.conn,
                    seq,
                },
            );
        }
        if !routes.is_empty() {
            self.fan_out(&routes, deliver.clone());
        }
    }

    /// Drops a user entry that no longer holds anything.
    fn gc_user(&mut self, user: &UserKey) {
        let empty = self
            .users
            .get(user)
            .is_some_and(|e: &UserEntry| e.devices.is_empty() && e.subscribers.is_empty());
        if empty {
            self.users.remove(user);
        }
    }

    pub(super) fn next_mid(&mut self) -> u64 {
        self.mids.mint()
    }
}
