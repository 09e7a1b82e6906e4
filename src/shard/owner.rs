//! The owner's directory of its users, on its own: the routes of each owned user's online
//! devices, the user's inbox sequence at durability `memory`, its presence status, the
//! connections subscribed to that status and, in a cluster, what the other nodes report of
//! the user's devices there.
//!
//! It is sans-IO and knows no shard, clock or queue. A change returns what it asks of the
//! shard as [`Effect`]s, in the order the shard must carry them out (route.rs and
//! external.rs do): post a message to a shard, relay to the other nodes, tell the groups
//! that a user came online or went offline, probe Redis for a user's nodes. Readers (the
//! delivery paths, the admin API) look routes up directly.
//!
//! Bounds: at most `max_users` entries, `max_devices` routes per user,
//! [`MAX_SUBSCRIBERS_PER_USER`] subscribers per user and one remote status per node
//! (`MAX_NODES`). An entry lives while its user has a device or a subscriber here.
//!
//! Memory: the users are an [`IndexMap`], a hash table of indices over a dense vector of
//! entries. Every connection's user has an entry, and a hash table is grown ahead of its
//! contents (with 19,000 users, 32,768 slots, every page of them touched by scattered
//! inserts): its slots are 8-byte indices, not a key and an entry each (152 bytes in the
//! `HashMap` this replaced: 88 B more RSS per idle connection). The vector's capacity beyond
//! its length is never touched, so it is not resident.

use indexmap::IndexMap;

use smallvec::SmallVec;

use super::{ConnId, Route, ShardMsg, UserKey, MAX_SUBSCRIBERS_PER_USER};
use crate::protocol::{Presence, Status, Str};
use crate::services::cluster::{RelayItem, MAX_NODES};

/// What a change of the directory asks of its shard.
#[derive(Debug)]
pub(super) enum Effect {
    /// Post to shard `.0` (owner messages are never shed: `post_always`).
    Post(usize, ShardMsg),
    /// Cluster: tell the other nodes (the status of a user's devices here).
    Relay(RelayItem),
    /// The user's first device came online (`true`) or its last went offline: the groups
    /// the user is a member of start or stop routing to it.
    Online(UserKey, bool),
    /// Cluster: ask which nodes hold the user's devices (a first subscriber here).
    Probe(UserKey),
}

/// Owned users and the rules of their routes and presence.
pub(super) struct Directory {
    users: IndexMap<UserKey, UserEntry>,
    /// Shards of this process (subscribers are told one message per shard).
    shards: usize,
    max_users: usize,
    max_devices: usize,
    /// In a cluster: relay the status of the devices here to the other nodes.
    cluster: bool,
    /// In a durable cluster: probe Redis for the nodes of a user first subscribed to here.
    probe: bool,
}

impl Directory {
    pub(super) fn new(
        shards: usize,
        max_users: usize,
        max_devices: usize,
        cluster: bool,
        probe: bool,
    ) -> Directory {
        Directory {
            users: IndexMap::new(),
            shards,
            max_users,
            max_devices,
            cluster,
            probe,
        }
    }

    /// Users with an entry (a device or a subscriber here).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.users.len()
    }

    /// The routes of `user`'s online devices (empty when none).
    pub(super) fn devices(&self, user: &UserKey) -> &[Route] {
        self.users.get(user).map_or(&[], |e| &e.devices[..])
    }

    /// The routes of `user`'s online devices, owned (inline for the usual one).
    pub(super) fn device_routes(&self, user: &UserKey) -> SmallVec<[Route; 1]> {
        SmallVec::from_slice(self.devices(user))
    }

    pub(super) fn is_online(&self, user: &UserKey) -> bool {
        !self.devices(user).is_empty()
    }

    /// What the admin API shows of `user`: its devices, the status its subscribers see, and
    /// the other nodes' reports.
    pub(super) fn view(&self, user: &UserKey) -> (Vec<Route>, Status, Vec<(Str, Status)>) {
        match self.users.get(user) {
            Some(e) => (
                e.devices.to_vec(),
                e.effective_status(),
                e.remote().to_vec(),
            ),
            None => (Vec::new(), Status::Offline, Vec::new()),
        }
    }

    /// The status of `user`'s devices on this node (offline when none).
    pub(super) fn local_status(&self, user: &UserKey) -> Status {
        self.users
            .get(user)
            .map_or(Status::Offline, UserEntry::local_status)
    }

    /// The nodes that reported a status of `user`.
    pub(super) fn remote_nodes(&self, user: &UserKey) -> Vec<Str> {
        self.users
            .get(user)
            .map(|e| e.remote().iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// The users some of whose devices `node` reported.
    pub(super) fn reported_by(&self, node: &str) -> Vec<UserKey> {
        self.users
            .iter()
            .filter(|(_, e)| e.remote().iter().any(|(n, _)| &**n == node))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Durability `memory`: the next position in `user`'s inbox, when it has an entry here
    /// (`only_online`: and a device online). An offline user keeps no inbox.
    pub(super) fn next_inbox_seq(&mut self, user: &UserKey, only_online: bool) -> Option<u64> {
        let e = self.users.get_mut(user)?;
        if only_online && e.devices.is_empty() {
            return None;
        }
        e.inbox_seq += 1;
        Some(e.inbox_seq)
    }

    /// A device of `user` came online at `route`. Refused (`RegisterRefused` posted to the
    /// device's shard, `false`) when the table or the user's devices are at their bound.
    pub(super) fn register(
        &mut self,
        user: &UserKey,
        route: Route,
        unix_ms: u64,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let refuse = |fx: &mut Vec<Effect>, why: &'static str| {
            fx.push(Effect::Post(
                usize::from(route.shard),
                ShardMsg::RegisterRefused {
                    conn: route.conn,
                    message: Str::from_static(why),
                },
            ));
            false
        };
        if !self.users.contains_key(user) && self.users.len() >= self.max_users {
            return refuse(fx, "shard user table full");
        }
        let max = self.max_devices;
        let e = self.users.entry(user.clone()).or_default();
        if e.devices.len() >= max {
            return refuse(fx, "too many devices online");
        }
        let before = e.statuses();
        e.devices.push(route);
        if e.devices.len() == 1 {
            fx.push(Effect::Online(user.clone(), true));
        }
        self.presence_changed(user, before, unix_ms, fx);
        true
    }

    /// The device at `route` went away.
    pub(super) fn unregister(
        &mut self,
        user: &UserKey,
        route: Route,
        unix_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let Some(e) = self.users.get_mut(user) else {
            return;
        };
        let Some(at) = e.devices.iter().position(|r| *r == route) else {
            // Not a device of the user (its registration was refused, or it went already):
            // nothing changes, and the groups must not hear "offline" of a user never online.
            return;
        };
        let before = e.statuses();
        e.devices.remove(at);
        if e.devices.is_empty() {
            // A status set on a device lasts while one is connected: the next login is
            // online, whether or not the entry outlives this (a subscriber keeps it).
            e.status = None;
            fx.push(Effect::Online(user.clone(), false));
        }
        self.presence_changed(user, before, unix_ms, fx);
        self.gc(user);
    }

    /// The user set its status (busy, away, online) on one of its devices. It lasts while a
    /// device is connected: with none here (a subscriber keeps the entry) it is ignored, so
    /// the next login is online.
    pub(super) fn set_status(
        &mut self,
        user: &UserKey,
        status: Status,
        unix_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let Some(e) = self.users.get_mut(user).filter(|e| !e.devices.is_empty()) else {
            return;
        };
        let before = e.statuses();
        e.status = Some(status);
        self.presence_changed(user, before, unix_ms, fx);
    }

    /// `subscriber` wants `target`'s presence events; it is told the current status at
    /// once. Ignored when the table is full; the user's subscribers are bounded.
    pub(super) fn subscribe(
        &mut self,
        target: &UserKey,
        subscriber: Route,
        unix_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        if !self.users.contains_key(target) && self.users.len() >= self.max_users {
            return;
        }
        let e = self.users.entry(target.clone()).or_default();
        let w = e.watchers_mut();
        if w.subscribers.len() < MAX_SUBSCRIBERS_PER_USER && !w.subscribers.contains(&subscriber) {
            w.subscribers.push(subscriber);
        }
        // In a cluster the target may be online on other nodes only, and this node may have
        // heard nothing of it yet.
        let probe = self.probe
            && e.devices.is_empty()
            && e.remote().is_empty()
            && e.subscribers().len() == 1;
        fx.push(Effect::Post(
            usize::from(subscriber.shard),
            ShardMsg::PresenceEvent {
                conns: vec![subscriber.conn],
                presence: Presence {
                    user: target.user.clone(),
                    status: e.effective_status(),
                    ts: unix_ms,
                },
            },
        ));
        if probe {
            fx.push(Effect::Probe(target.clone()));
        }
    }

    pub(super) fn unsubscribe(&mut self, target: &UserKey, subscriber: Route) {
        if let Some(e) = self.users.get_mut(target) {
            if let Some(w) = e.watchers.as_mut() {
                w.subscribers.retain(|r| *r != subscriber);
            }
            e.trim();
        }
        self.gc(target);
    }

    /// Cluster: `user`'s devices on other nodes now have these statuses (offline forgets the
    /// node). Only a user with an entry here is tracked.
    pub(super) fn remote_presence(
        &mut self,
        user: &UserKey,
        reports: &[(Str, Status)],
        unix_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let Some(e) = self.users.get_mut(user) else {
            return;
        };
        let before = e.statuses();
        for (node, status) in reports {
            if let Some(w) = e.watchers.as_mut() {
                w.remote.retain(|(n, _)| n != node);
            }
            // Only a report kept allocates the watchers (an offline one, the usual relay for
            // a user watched by no one here, does not).
            if *status != Status::Offline && e.remote().len() < usize::from(MAX_NODES) {
                e.watchers_mut().remote.push((node.clone(), *status));
            }
        }
        e.trim();
        self.presence_changed(user, before, unix_ms, fx);
    }

    /// Tells subscribers when what they see differs from `before.0` (one message per
    /// subscriber shard); in a cluster, tells the other nodes when the status of the devices
    /// here differs from `before.1`.
    fn presence_changed(
        &self,
        user: &UserKey,
        before: (Status, Status),
        unix_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let Some(e) = self.users.get(user) else {
            return;
        };
        let (now, local) = e.statuses();
        if self.cluster && local != before.1 {
            fx.push(Effect::Relay(RelayItem::Presence {
                tenant: user.tenant.clone(),
                user: user.user.clone(),
                status: local,
            }));
        }
        if now == before.0 || e.subscribers().is_empty() {
            return;
        }
        let presence = Presence {
            user: user.user.clone(),
            status: now,
            ts: unix_ms,
        };
        let mut by_shard: Vec<Vec<ConnId>> = vec![Vec::new(); self.shards];
        for r in e.subscribers() {
            if let Some(conns) = by_shard.get_mut(usize::from(r.shard)) {
                conns.push(r.conn);
            }
        }
        for (shard, conns) in by_shard.into_iter().enumerate() {
            if !conns.is_empty() {
                fx.push(Effect::Post(
                    shard,
                    ShardMsg::PresenceEvent {
                        conns,
                        presence: presence.clone(),
                    },
                ));
            }
        }
    }

    /// Drops `user`'s entry once it holds no device and no subscriber.
    fn gc(&mut self, user: &UserKey) {
        if self
            .users
            .get(user)
            .is_some_and(|e| e.devices.is_empty() && e.subscribers().is_empty())
        {
            // O(1): the last entry takes this one's place (the order is never read).
            self.users.swap_remove(user);
        }
    }
}

/// State of one user owned by this shard.
#[derive(Default)]
pub(super) struct UserEntry {
    /// Online devices; inline for the usual one.
    devices: SmallVec<[Route; 1]>,
    inbox_seq: u64,
    /// Status set by the user (online unless busy/away); offline when no device is connected.
    status: Option<Status>,
    /// Who watches the user and what other nodes report of it; `None` while both are empty,
    /// as for most users: one pointer in every entry instead of two vectors (40 bytes).
    watchers: Option<Box<Watchers>>,
}

/// The parts of a [`UserEntry`] that most users do not have.
#[derive(Default)]
struct Watchers {
    subscribers: Vec<Route>,
    /// Cluster mode: the status of this user's devices on other nodes, as they relayed it
    /// (only nodes where it is not offline; at most one entry per node, so at most
    /// `MAX_NODES`). Kept only while the user has an entry here (devices or subscribers).
    remote: Vec<(Str, Status)>,
}

impl UserEntry {
    /// The connections subscribed to the user's status.
    fn subscribers(&self) -> &[Route] {
        self.watchers.as_ref().map_or(&[], |w| &w.subscribers[..])
    }

    /// What other nodes reported of the user's devices (cluster mode).
    fn remote(&self) -> &[(Str, Status)] {
        self.watchers.as_ref().map_or(&[], |w| &w.remote[..])
    }

    /// The watchers, allocated if the user had none; [`UserEntry::trim`] frees them again.
    fn watchers_mut(&mut self) -> &mut Watchers {
        self.watchers.get_or_insert_with(Box::default)
    }

    /// Frees the watchers once they hold nothing.
    fn trim(&mut self) {
        if self
            .watchers
            .as_ref()
            .is_some_and(|w| w.subscribers.is_empty() && w.remote.is_empty())
        {
            self.watchers = None;
        }
    }

    /// The status of the user's devices on this node.
    fn local_status(&self) -> Status {
        if self.devices.is_empty() {
            Status::Offline
        } else {
            self.status.unwrap_or(Status::Online)
        }
    }

    /// What subscribers see: this node's devices first, else the most available status
    /// another node reported.
    fn effective_status(&self) -> Status {
        let local = self.local_status();
        if local != Status::Offline {
            return local;
        }
        [Status::Online, Status::Busy, Status::Away]
            .into_iter()
            .find(|s| self.remote().iter().any(|(_, r)| r == s))
            .unwrap_or(Status::Offline)
    }

    /// (effective, local), before a change: see `Shard::presence_changed`.
    fn statuses(&self) -> (Status, Status) {
        (self.effective_status(), self.local_status())
    }
}

#[cfg(test)]
mod tests {
    //! The directory driven alone: no shard, no clock, no queue; each test reads the effects.
    use super::*;
    use std::collections::HashMap;

    const T: u64 = 1_700_000_000_000;

    fn user(name: &str) -> UserKey {
        UserKey {
            tenant: Str::from("t"),
            user: Str::from(name),
        }
    }

    fn route(shard: u16, index: u32) -> Route {
        Route {
            shard,
            conn: ConnId {
                index,
                generation: 1,
            },
        }
    }

    /// Two shards, room for `max_users` users of two devices each, outside a cluster.
    fn dir(max_users: usize) -> Directory {
        Directory::new(2, max_users, 2, false, false)
    }

    /// The presence events among `fx`: (shard, connection indexes, status).
    fn events(fx: &[Effect]) -> Vec<(usize, Vec<u32>, Status)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Post(shard, ShardMsg::PresenceEvent { conns, presence }) => Some((
                    *shard,
                    conns.iter().map(|c| c.index).collect(),
                    presence.status,
                )),
                _ => None,
            })
            .collect()
    }

    fn refused(fx: &[Effect]) -> Vec<(usize, String)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Post(shard, ShardMsg::RegisterRefused { message, .. }) => {
                    Some((*shard, message.to_string()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn subscribers_hear_each_change_of_what_they_see_once_per_shard() {
        let mut d = dir(10);
        let bob = user("bob");
        let mut fx = Vec::new();
        // Two subscribers on shard 1, one on shard 0: each learns "offline" at once.
        for r in [route(1, 7), route(1, 8), route(0, 9)] {
            d.subscribe(&bob, r, T, &mut fx);
        }
        assert_eq!(
            events(&fx),
            vec![
                (1, vec![7], Status::Offline),
                (1, vec![8], Status::Offline),
                (0, vec![9], Status::Offline)
            ]
        );
        // A second subscription of the same connection is not a second subscriber.
        fx.clear();
        d.subscribe(&bob, route(1, 7), T, &mut fx);
        assert_eq!(events(&fx), vec![(1, vec![7], Status::Offline)]);

        // bob's first device: the groups hear of it, then one event per subscriber shard.
        fx.clear();
        assert!(d.register(&bob, route(0, 1), T, &mut fx));
        assert!(matches!(&fx[0], Effect::Online(u, true) if *u == bob));
        assert_eq!(
            events(&fx),
            vec![
                (0, vec![9], Status::Online),
                (1, vec![7, 8], Status::Online)
            ]
        );
        // A second device changes nothing anyone sees.
        fx.clear();
        assert!(d.register(&bob, route(1, 2), T, &mut fx));
        assert!(fx.is_empty(), "{fx:?}");
        // busy is news; busy again is not.
        d.set_status(&bob, Status::Busy, T, &mut fx);
        assert_eq!(events(&fx).len(), 2);
        fx.clear();
        d.set_status(&bob, Status::Busy, T, &mut fx);
        assert!(fx.is_empty(), "{fx:?}");
        // One device leaves: still busy. The last leaves: offline, and the groups hear it.
        d.unregister(&bob, route(0, 1), T, &mut fx);
        assert!(fx.is_empty(), "{fx:?}");
        d.unregister(&bob, route(1, 2), T, &mut fx);
        assert!(matches!(&fx[0], Effect::Online(u, false) if *u == bob));
        assert_eq!(
            events(&fx).iter().map(|e| e.2).collect::<Vec<_>>(),
            [Status::Offline; 2]
        );
        // The next login is online again (busy ended with the last device), and an
        // unsubscribed connection hears nothing more.
        d.unsubscribe(&bob, route(1, 8));
        fx.clear();
        assert!(d.register(&bob, route(0, 3), T, &mut fx));
        assert_eq!(
            events(&fx),
            vec![(0, vec![9], Status::Online), (1, vec![7], Status::Online)]
        );
    }

    #[test]
    fn registrations_stop_at_the_device_and_user_bounds() {
        let mut d = dir(2);
        let mut fx = Vec::new();
        let ann = user("ann");
        assert!(d.register(&ann, route(0, 1), T, &mut fx));
        assert!(d.register(&ann, route(1, 2), T, &mut fx));
        fx.clear();
        // A third device of ann: refused on its own shard; ann's routes are unchanged.
        assert!(!d.register(&ann, route(1, 3), T, &mut fx));
        assert_eq!(refused(&fx), [(1, "too many devices online".to_string())]);
        assert_eq!(d.devices(&ann), &[route(0, 1), route(1, 2)]);
        // A second user fits, a third does not (register nor subscribe makes an entry).
        assert!(d.register(&user("bob"), route(0, 4), T, &mut fx));
        fx.clear();
        assert!(!d.register(&user("cat"), route(0, 5), T, &mut fx));
        assert_eq!(refused(&fx), [(0, "shard user table full".to_string())]);
        fx.clear();
        d.subscribe(&user("cat"), route(0, 6), T, &mut fx);
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(d.len(), 2);
        // Entries go once they hold nothing: room again.
        d.unregister(&user("bob"), route(0, 4), T, &mut fx);
        assert_eq!(d.len(), 1);
        assert!(d.register(&user("cat"), route(0, 5), T, &mut fx));
    }

    #[test]
    fn inbox_sequences_live_with_the_entry() {
        let mut d = dir(10);
        let mut fx = Vec::new();
        let ann = user("ann");
        assert_eq!(d.next_inbox_seq(&ann, false), None, "no entry, no inbox");
        d.subscribe(&ann, route(0, 9), T, &mut fx);
        assert_eq!(
            d.next_inbox_seq(&ann, true),
            None,
            "a subscriber only: not online"
        );
        assert_eq!(d.next_inbox_seq(&ann, false), Some(1));
        assert!(d.register(&ann, route(0, 1), T, &mut fx));
        assert_eq!(d.next_inbox_seq(&ann, true), Some(2));
        d.unregister(&ann, route(0, 1), T, &mut fx);
        d.unsubscribe(&ann, route(0, 9));
        assert_eq!(d.next_inbox_seq(&ann, false), None, "gone with its entry");
    }

    #[test]
    fn in_a_cluster_other_nodes_count_and_the_status_here_is_relayed() {
        let mut d = Directory::new(1, 10, 2, true, true);
        let mut fx = Vec::new();
        let bob = user("bob");
        // A first subscriber of a user unknown here: probe Redis for its nodes.
        d.subscribe(&bob, route(0, 9), T, &mut fx);
        assert!(matches!(fx.last(), Some(Effect::Probe(u)) if *u == bob));
        fx.clear();
        // Node n2 says busy: the subscriber sees busy; nothing is relayed (nothing changed
        // here).
        d.remote_presence(&bob, &[(Str::from("n2"), Status::Busy)], T, &mut fx);
        assert_eq!(events(&fx), [(0, vec![9], Status::Busy)]);
        assert!(!fx.iter().any(|e| matches!(e, Effect::Relay(_))));
        assert_eq!(d.reported_by("n2"), std::slice::from_ref(&bob));
        // A device here: online wins over a remote busy, and the other nodes hear of it.
        fx.clear();
        assert!(d.register(&bob, route(0, 1), T, &mut fx));
        assert!(fx.iter().any(|e| matches!(
            e,
            Effect::Relay(RelayItem::Presence {
                status: Status::Online,
                ..
            })
        )));
        assert_eq!(events(&fx), [(0, vec![9], Status::Online)]);
        assert_eq!(d.local_status(&bob), Status::Online);
        // It leaves: the remote busy shows again; n2 going offline leaves offline.
        fx.clear();
        d.unregister(&bob, route(0, 1), T, &mut fx);
        assert_eq!(events(&fx), [(0, vec![9], Status::Busy)]);
        fx.clear();
        d.remote_presence(&bob, &[(Str::from("n2"), Status::Offline)], T, &mut fx);
        assert_eq!(events(&fx), [(0, vec![9], Status::Offline)]);
        assert!(d.remote_nodes(&bob).is_empty());
        // A second subscriber does not probe again.
        fx.clear();
        d.subscribe(&bob, route(0, 10), T, &mut fx);
        assert!(!fx.iter().any(|e| matches!(e, Effect::Probe(_))));
    }

    /// One step of the directory's model run: users 0..4, each with device connections
    /// 0..3 of its own, subscriber connections 0..3, other nodes 0..2.
    #[derive(Clone, Debug)]
    enum Step {
        Register(usize, u32),
        Unregister(usize, u32),
        SetStatus(usize, Status),
        Subscribe(usize, u32),
        Unsubscribe(usize, u32),
        Remote(usize, usize, Status),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let status = proptest::sample::select(Status::ALL.to_vec());
        // Clients may set these (the session refuses `offline`).
        let settable = proptest::sample::select(vec![Status::Online, Status::Busy, Status::Away]);
        prop_oneof![
            4 => (0..4usize, 0..3u32).prop_map(|(u, k)| Step::Register(u, k)),
            3 => (0..4usize, 0..3u32).prop_map(|(u, k)| Step::Unregister(u, k)),
            2 => (0..4usize, settable).prop_map(|(u, s)| Step::SetStatus(u, s)),
            3 => (0..4usize, 0..3u32).prop_map(|(u, k)| Step::Subscribe(u, k)),
            1 => (0..4usize, 0..3u32).prop_map(|(u, k)| Step::Unsubscribe(u, k)),
            2 => (0..4usize, 0..2usize, status).prop_map(|(u, n, s)| Step::Remote(u, n, s)),
        ]
    }

    /// What the model expects a user's subscribers to see.
    #[derive(Clone, Default)]
    struct Model {
        devices: Vec<u32>,
        status: Option<Status>,
        subscribers: Vec<u32>,
        remote: Vec<(usize, Status)>,
    }

    impl Model {
        fn local(&self) -> Status {
            if self.devices.is_empty() {
                Status::Offline
            } else {
                self.status.unwrap_or(Status::Online)
            }
        }

        fn effective(&self) -> Status {
            match self.local() {
                Status::Offline => [Status::Online, Status::Busy, Status::Away]
                    .into_iter()
                    .find(|s| self.remote.iter().any(|(_, r)| r == s))
                    .unwrap_or(Status::Offline),
                local => local,
            }
        }

        fn has_entry(&self) -> bool {
            !self.devices.is_empty() || !self.subscribers.is_empty()
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_000))]

        /// Whatever the order of devices coming and going, statuses, subscriptions and other
        /// nodes' reports (in a cluster, 3 users' entries at most, 2 devices each): the
        /// routes, the status and the entries are the model's, registrations are refused
        /// exactly at the bounds, the groups hear each first and last device once, every
        /// subscriber last heard what it sees now, and the other nodes last heard the status
        /// of the devices here.
        #[test]
        fn subscribers_and_nodes_last_heard_the_truth(
            steps in proptest::collection::vec(step(), 1..150),
        ) {
            const MAX_USERS: usize = 3;
            let users: Vec<UserKey> = (0..4).map(|i| user(&format!("u{i}"))).collect();
            let device = |u: usize, k: u32| route(k as u16 % 2, u as u32 * 10 + k);
            let sub = |k: u32| route(k as u16 % 2, 100 + k);
            let mut d = Directory::new(2, MAX_USERS, 2, true, false);
            let mut m: Vec<Model> = vec![Model::default(); 4];
            // What each (subscriber, user) last heard, whether each user is online for its
            // groups, and the status the other nodes last heard.
            let mut heard: HashMap<(u32, usize), Status> = HashMap::new();
            let mut online = [false; 4];
            let mut relayed = [Status::Offline; 4];
            for s in steps {
                let mut fx = Vec::new();
                let entries = m.iter().filter(|x| x.has_entry()).count();
                match s {
                    Step::Register(u, k) if !m[u].devices.contains(&k) => {
                        let fits = (m[u].has_entry() || entries < MAX_USERS)
                            && m[u].devices.len() < 2;
                        let ok = d.register(&users[u], device(u, k), T, &mut fx);
                        proptest::prop_assert_eq!(ok, fits);
                        proptest::prop_assert_eq!(refused(&fx).len(), usize::from(!fits));
                        if fits {
                            m[u].devices.push(k);
                        }
                    }
                    Step::Register(..) => {}
                    Step::Unregister(u, k) => {
                        d.unregister(&users[u], device(u, k), T, &mut fx);
                        m[u].devices.retain(|&x| x != k);
                        if m[u].devices.is_empty() {
                            m[u].status = None;
                        }
                    }
                    Step::SetStatus(u, st) => {
                        d.set_status(&users[u], st, T, &mut fx);
                        if !m[u].devices.is_empty() {
                            m[u].status = Some(st);
                        }
                    }
                    Step::Subscribe(u, k) => {
                        d.subscribe(&users[u], sub(k), T, &mut fx);
                        if (m[u].has_entry() || entries < MAX_USERS)
                            && !m[u].subscribers.contains(&k)
                        {
                            m[u].subscribers.push(k);
                        }
                    }
                    Step::Unsubscribe(u, k) => {
                        d.unsubscribe(&users[u], sub(k));
                        m[u].subscribers.retain(|&x| x != k);
                    }
                    Step::Remote(u, node, st) => {
                        let name = Str::from(format!("n{node}"));
                        d.remote_presence(&users[u], &[(name, st)], T, &mut fx);
                        if m[u].has_entry() {
                            m[u].remote.retain(|(n, _)| *n != node);
                            if st != Status::Offline {
                                m[u].remote.push((node, st));
                            }
                        }
                    }
                }
                for x in m.iter_mut().filter(|x| !x.has_entry()) {
                    // A dropped entry forgets the other nodes' reports.
                    x.remote.clear();
                }
                for e in fx {
                    match e {
                        Effect::Online(key, on) => {
                            let u = users.iter().position(|x| *x == key).unwrap();
                            proptest::prop_assert_ne!(online[u], on, "told twice: u{}", u);
                            online[u] = on;
                        }
                        Effect::Relay(RelayItem::Presence { user: name, status, .. }) => {
                            let u = users.iter().position(|x| x.user == name).unwrap();
                            relayed[u] = status;
                        }
                        Effect::Post(_, ShardMsg::PresenceEvent { conns, presence }) => {
                            let u = users.iter().position(|x| x.user == presence.user).unwrap();
                            for c in conns {
                                heard.insert((c.index - 100, u), presence.status);
                            }
                        }
                        _ => {}
                    }
                }
                for (u, key) in users.iter().enumerate() {
                    let (routes, status, _) = d.view(key);
                    let mut got: Vec<u32> = routes.iter().map(|r| r.conn.index % 10).collect();
                    got.sort();
                    let mut want = m[u].devices.clone();
                    want.sort();
                    proptest::prop_assert_eq!(got, want, "routes of u{}", u);
                    proptest::prop_assert_eq!(status, m[u].effective(), "status of u{}", u);
                    proptest::prop_assert_eq!(online[u], !m[u].devices.is_empty());
                    proptest::prop_assert_eq!(relayed[u], m[u].local(), "relayed of u{}", u);
                    for &k in &m[u].subscribers {
                        proptest::prop_assert_eq!(
                            heard.get(&(k, u)).copied(),
                            Some(status),
                            "subscriber {} of u{}", k, u
                        );
                    }
                }
                let entries = m.iter().filter(|x| x.has_entry()).count();
                proptest::prop_assert_eq!(d.len(), entries);
                for (u, key) in users.iter().enumerate() {
                    // The watchers are allocated only while they hold something.
                    let boxed = d.users.get(key).is_some_and(|e| e.watchers.is_some());
                    let want = !m[u].subscribers.is_empty() || !m[u].remote.is_empty();
                    proptest::prop_assert_eq!(boxed, want, "watchers of u{}", u);
                }
            }
        }
    }
}
