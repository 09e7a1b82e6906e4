//! The owner side of a shard: what it does with batches from other shards (and its own local
//! queue). The owned users' device routes, inbox sequence numbers, presence status and
//! subscriber lists are the directory's (owner.rs); this carries out the effects it returns
//! ([`Shard::apply`]). Deliveries are grouped so each destination shard gets one message per
//! delivery, however many of the user's devices live there.

use super::owner::Effect;
use super::{Batch, Clock, ConnId, Route, Shard, ShardMsg, UserKey};
use crate::metrics::{CloseReason, Stage};
use crate::protocol::{Deliver, Envelope, Error, ErrorCode, Message, SendAck, Str};

impl Shard {
    /// Handles a batch that arrived from shard `_from` (or from our own local queue).
    pub fn on_batch(&mut self, mut batch: Batch, clk: Clock) {
        self.on_batch_drain(&mut batch, clk);
    }

    /// [`Shard::on_batch`], leaving the batch's emptied list to the caller (to keep).
    pub(super) fn on_batch_drain(&mut self, batch: &mut Batch, clk: Clock) {
        self.set_now(clk);
        if batch.msgs.is_empty() {
            return;
        }
        self.metrics.shards[self.id].stages[Stage::ShardQueue as usize]
            .record_us(clk.mono_us.saturating_sub(batch.posted_us));
        for msg in batch.msgs.drain(..) {
            self.on_shard_msg(msg, clk);
        }
    }

    fn on_shard_msg(&mut self, msg: ShardMsg, clk: Clock) {
        match msg {
            ShardMsg::Register { user, route, hello } => {
                let mut fx = self.take_fx();
                if self.dir.register(&user, route, clk.unix_ms, &mut fx) {
                    self.groups.devices_changed(&user);
                    fx.push(Effect::Post(
                        usize::from(route.shard),
                        ShardMsg::Registered {
                            conn: route.conn,
                            hello,
                        },
                    ));
                }
                self.apply(fx);
            }
            ShardMsg::Registered { conn, hello } => self.welcome(conn, hello, clk),
            ShardMsg::Unregister { user, route } => {
                let mut fx = self.take_fx();
                self.dir.unregister(&user, route, clk.unix_ms, &mut fx);
                self.groups.devices_changed(&user);
                self.apply(fx);
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
                let mut fx = self.take_fx();
                self.dir.set_status(&user, status, clk.unix_ms, &mut fx);
                self.apply(fx);
            }
            ShardMsg::Subscribe { target, subscriber } => {
                let mut fx = self.take_fx();
                self.dir
                    .subscribe(&target, subscriber, clk.unix_ms, &mut fx);
                self.apply(fx);
            }
            ShardMsg::Unsubscribe { target, subscriber } => {
                self.dir.unsubscribe(&target, subscriber)
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
                // Durability `memory`: a user without an entry has no inbox; nothing is kept.
                let seq = self.dir.next_inbox_seq(&to, false).unwrap_or(0);
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

    /// Carries out what the directory asked, in its order.
    /// The emptied list is kept for the next ([`Shard::take_fx`]) unless it grew past
    /// [`super::SPARE_MAX`].
    pub(super) fn apply(&mut self, mut fx: Vec<Effect>) {
        for e in fx.drain(..) {
            match e {
                Effect::Post(shard, msg) => self.post_always(shard, msg),
                Effect::Relay(item) => self.relay(item),
                Effect::Online(user, online) => self.user_online_changed(&user, online),
                Effect::Probe(user) => self.probe_presence(user),
            }
        }
        if fx.capacity() <= super::SPARE_MAX {
            self.fx_spare = fx;
        }
    }

    /// Sends `deliver` to every route but those in `except`, one message per destination
    /// shard.
    pub(super) fn fan_out(&mut self, routes: &[Route], except: &[Route], deliver: Deliver) {
        let mut by_shard: Vec<Vec<ConnId>> = vec![Vec::new(); self.shards];
        for r in routes.iter().filter(|r| !except.contains(r)) {
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
        if !durable {
            let Some(seq) = self.dir.next_inbox_seq(&to, false) else {
                return; // no entry: nobody to tell
            };
            deliver.inbox_seq = seq;
        }
        // No device online: a durable copy waits in the inbox for `sync`.
        let devices = self.dir.device_routes(&to);
        let routes: Vec<Route> = devices.iter().copied().filter(|r| *r != except).collect();
        if durable && devices.contains(&except) {
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
            self.fan_out(&routes, &[], deliver.clone());
        }
    }

    pub(super) fn next_mid(&mut self) -> u64 {
        self.mids.mint()
    }
}
