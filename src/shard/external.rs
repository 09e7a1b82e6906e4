//! The shard's side of the external services (src/services): presence events for Redis
//! (device up, heartbeat refresh, device down) and records of the Kafka push ingress, which
//! the I/O core hands to the owner shard of their user or group.

use std::sync::atomic::Ordering::Relaxed;

use super::groups::GroupKey;
use super::{Clock, ConnId, Shard, UserKey};
use crate::iocore::{IoCmd, IoError, IoRequest};
use crate::protocol::{Deliver, Status, Str, Target};
use crate::services::push::PushRecord;
use crate::services::redis::{PresenceEvent, PresenceKind};
use crate::store::{GroupRef, Op, UserRef};

impl Shard {
    fn redis_on(&self) -> bool {
        self.io.is_some() && self.cfg.redis.url.is_some()
    }

    /// Tells Redis (through the I/O core) about a device; never waits: a full queue drops
    /// the event and counts it.
    pub(super) fn presence_event(
        &mut self,
        user: &UserKey,
        device: &Str,
        conn: ConnId,
        kind: PresenceKind,
    ) {
        if !self.redis_on() {
            return;
        }
        let Some(io) = &self.io else { return };
        let event = PresenceEvent {
            kind,
            tenant: user.tenant.clone(),
            user: user.user.clone(),
            device: device.clone(),
            shard: self.id as u16,
            conn: (u64::from(conn.generation) << 32) | u64::from(conn.index),
        };
        let cmd = IoCmd {
            shard: self.id as u16,
            token: 0,
            req: IoRequest::Presence(Box::new(event)),
        };
        if io.submit(cmd).is_err() {
            io.stats.svc.redis_dropped.fetch_add(1, Relaxed);
        }
    }

    /// A heartbeat from `id`: refreshes its presence TTL, at most once per third of the TTL.
    pub(super) fn heartbeat(&mut self, id: ConnId, clk: Clock) {
        if !self.redis_on() {
            return;
        }
        let every = self.cfg.redis.presence_ttl_ms / 3;
        let Some(s) = self.session_mut(id) else {
            return;
        };
        if clk.mono_ms < s.presence_ms + every {
            return;
        }
        s.presence_ms = clk.mono_ms;
        let (user, device) = (s.user.clone(), s.device.clone());
        self.presence_event(&user, &device, id, PresenceKind::Refresh);
    }

    /// A message another cluster node stored, for this node's devices of a user or group
    /// this shard owns: delivered like a local one (the device shard keeps pushes gapless,
    /// reading any gap from the shared store), never stored again.
    pub fn on_relayed(&mut self, r: crate::services::cluster::Relayed, clk: Clock) {
        use crate::services::cluster::Relayed;
        match r {
            Relayed::Deliver {
                tenant,
                to: Target::User(user),
                deliver,
            } => self.push_to_devices(&UserKey { tenant, user }, deliver),
            Relayed::Deliver {
                tenant,
                to: Target::Group(group),
                deliver,
            } => self.group_fan_out(&GroupKey { tenant, group }, deliver),
            Relayed::Member {
                tenant,
                user,
                group,
                join,
            } => {
                let user = UserKey { tenant, user };
                // Sent to every node when Redis could not say which hold the user's devices:
                // a node that neither has one online nor holds the user's groups keeps
                // nothing (its first device reads the stored groups at login).
                if !self.dir.is_online(&user) && !self.groups.knows_user(&user) {
                    return;
                }
                let group = GroupKey {
                    tenant: user.tenant.clone(),
                    group,
                };
                self.member_of(user, group, join);
            }
            Relayed::Kick { tenant, user } => self.kick(&UserKey { tenant, user }),
            Relayed::Query { tenant, user } => {
                // The status of the user's devices here (offline if none), to every other
                // node: the asking node's subscribers then see it.
                let key = UserKey { tenant, user };
                let status = self.dir.local_status(&key);
                self.relay(crate::services::cluster::RelayItem::Presence {
                    tenant: key.tenant,
                    user: key.user,
                    status,
                });
            }
            Relayed::Presence {
                tenant,
                user,
                node,
                status,
            } => self.remote_presence(&UserKey { tenant, user }, &[(node, status)], clk),
            Relayed::NodeDown { node } => {
                for user in self.dir.reported_by(&node) {
                    self.remote_presence(&user, &[(node.clone(), Status::Offline)], clk);
                }
            }
        }
    }

    /// Cluster mode: `user`'s devices on other nodes now have these statuses; subscribers
    /// here hear of a change of what they see. Only a user with an entry here (devices or
    /// subscribers) is tracked.
    fn remote_presence(&mut self, user: &UserKey, reports: &[(Str, Status)], clk: Clock) {
        let mut fx = self.take_fx();
        self.dir
            .remote_presence(user, reports, clk.unix_ms, &mut fx);
        self.apply(fx);
    }

    /// Cluster mode, first subscriber of a user with no devices here: which other nodes hold
    /// its devices (Redis routes, live nodes only); each counts as online until it answers
    /// the query relayed to it with its devices' status.
    pub(super) fn probe_presence(&mut self, user: UserKey) {
        let req = IoRequest::RouteNodes {
            user: UserRef::new(user.tenant.clone(), user.user.clone()),
        };
        // A full queue skips the probe: the subscriber hears of the next change.
        let (tenant, id) = (user.tenant.clone(), user.user.clone());
        let _ = self.submit(req, super::delivery::IoWait::PresenceProbe { user });
        // The probe counts each node online; their answers say busy or away.
        self.relay(crate::services::cluster::RelayItem::Query { tenant, user: id });
    }

    /// The answer to [`Shard::probe_presence`].
    pub(super) fn presence_probed(
        &mut self,
        user: UserKey,
        nodes: Result<Vec<Str>, IoError>,
        clk: Clock,
    ) {
        let own = self.cfg.cluster.node_id.as_deref().unwrap_or("");
        let Ok(nodes) = nodes else { return };
        let known = self.dir.remote_nodes(&user);
        let reports: Vec<(Str, Status)> = nodes
            .into_iter()
            .filter(|n| &**n != own && !known.contains(n))
            .map(|n| (n, Status::Online))
            .collect();
        if !reports.is_empty() {
            self.remote_presence(&user, &reports, clk);
        }
    }

    /// Cluster mode: tells the other nodes (through the I/O core); never waits: a full queue
    /// drops it and counts it (a missed join is repaired at the member's next login, a missed
    /// kick leaves the devices connected).
    pub(super) fn relay(&mut self, item: crate::services::cluster::RelayItem) {
        if self.cfg.cluster.slot.is_none() {
            return;
        }
        let Some(io) = &self.io else { return };
        let cmd = IoCmd {
            shard: self.id as u16,
            token: 0,
            req: IoRequest::Relay(Box::new(item)),
        };
        if io.submit(cmd).is_err() {
            io.stats.cluster.relay_dropped.fetch_add(1, Relaxed);
        }
    }

    /// The `deliver` of a push from the business side (Kafka ingress or the admin API), with
    /// a fresh message id; its place (`inbox_seq`, `to`) is set by the caller.
    pub(super) fn push_deliver(
        &mut self,
        from: Str,
        kind: Option<Str>,
        body: Str,
        clk: Clock,
    ) -> Deliver {
        Deliver {
            mid: self.next_mid(),
            from,
            to: None,
            inbox_seq: 0,
            ts: clk.unix_ms,
            kind,
            body,
            ext: Default::default(),
        }
    }

    /// A push ingress record for a user or group this shard owns: stored like a `send`
    /// (inbox or timeline, deduped by its id), then delivered to the online devices.
    pub fn on_push(&mut self, rec: PushRecord, clk: Clock) {
        let mut deliver = self.push_deliver(rec.from.clone(), rec.kind, rec.body, clk);
        let (op, wait) = match rec.to {
            Target::User(u) => {
                let to = UserKey {
                    tenant: rec.tenant.clone(),
                    user: u.clone(),
                };
                let op = Op::AppendInbox {
                    user: UserRef::new(rec.tenant, u),
                    sender: rec.from,
                    cmid: rec.cmid,
                    deliver: deliver.clone(),
                };
                (op, super::delivery::IoWait::PushUser { to, deliver })
            }
            Target::Group(g) => {
                deliver.to = Some(Target::Group(g.clone()));
                let group = GroupKey {
                    tenant: rec.tenant.clone(),
                    group: g.clone(),
                };
                let op = Op::AppendGroup {
                    group: GroupRef::new(rec.tenant, g),
                    sender: rec.from,
                    cmid: rec.cmid,
                    deliver: deliver.clone(),
                };
                (op, super::delivery::IoWait::PushGroup { group, deliver })
            }
        };
        if !self.submit(IoRequest::Apply(vec![op]), wait) {
            // The I/O queue is full: the record is dropped (counted). Its id dedupes a replay.
            if let Some(io) = &self.io {
                io.stats.svc.push_bad.fetch_add(1, Relaxed);
            }
        }
    }
}
