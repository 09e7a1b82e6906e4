//! The groups as one shard holds them, on their own: for the groups the shard owns, the
//! member lists, the timeline's last `gseq` (durability `memory`) and the work waiting for a
//! member list read back from the store; for the users the shard owns, their groups, the
//! members online per group and, in a cluster, the groups whose having members online here
//! changed and the other nodes have not been told yet.
//!
//! It is sans-IO and knows no shard, clock or queue: the shard (groups.rs, admin.rs) asks it
//! and carries out what follows (replies, posts, store operations, the fan-out). It holds
//! the rules: who may join (`limits.max_group_members`, [`MAX_GROUPS_PER_SHARD`],
//! `limits.max_groups_per_user`), who may send, the next `gseq`, and which groups a user's
//! coming online or going offline makes routed here.
//!
//! Bounds: [`MAX_GROUPS_PER_SHARD`] owned groups of at most `limits.max_group_members`
//! members (admin additions checked the same way), up to twice `limits.max_groups_per_user`
//! groups per owned user, [`MAX_WAITING_PER_GROUP`] pieces of work per loading group; the
//! loading maps hold one entry per store read in flight (bounded by the I/O queue), and the
//! pending cluster notices one per group of `online`; the fan-out's remembered routes at most
//! [`MAX_KEPT_ROUTES`] routes in all.
//!
//! It also remembers, per group of `online`, the routes of those members' devices as the
//! fan-out last worked them out (one directory lookup per member, [`Roster::online_routes`]), so
//! that the next message to the group copies one list instead. An entry is dropped when the
//! group's online members here change and when a device of one of them comes or goes (the
//! shard says so: [`Roster::devices_changed`]).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use super::groups::GroupWork;
use super::{GroupKey, Route, UserKey};
use crate::protocol::{ErrorCode, Str};

pub const MAX_GROUPS_PER_SHARD: usize = 1_000_000;
/// Sends and membership changes that wait for one group's member list to be read back.
pub const MAX_WAITING_PER_GROUP: usize = 4096;
/// Routes the fan-out's remembered lists hold in all, per shard (12 bytes each: at most 3 MiB).
/// Past it a group's routes are worked out per message, as without the lists.
pub const MAX_KEPT_ROUTES: usize = 256 * 1024;
/// Groups with fewer routes than this are not remembered: their lookups cost little.
pub const MIN_KEPT_ROUTES: usize = 16;

/// A group owned by this shard.
#[derive(Default)]
struct GroupEntry {
    members: HashSet<Str>,
    /// Last timeline sequence (durability `memory`; the store assigns it at `local`).
    gseq: u64,
}

/// Group state of one shard.
#[derive(Default)]
pub(super) struct Roster {
    /// Groups this shard owns; bounded by [`MAX_GROUPS_PER_SHARD`].
    owned: HashMap<GroupKey, GroupEntry>,
    /// Groups of the users this shard owns (bounded by twice `limits.max_groups_per_user`
    /// each).
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
    here_pending: HashMap<GroupKey, bool>,
    /// In a cluster: note the groups whose having members online here changed.
    cluster: bool,
    /// Per group of `online`, its online members' device routes as last worked out, while
    /// neither those members nor their devices changed; `kept_routes` of them in all, at
    /// most [`MAX_KEPT_ROUTES`].
    routes: HashMap<GroupKey, Rc<[Route]>>,
    kept_routes: usize,
    /// [`MIN_KEPT_ROUTES`] and [`MAX_KEPT_ROUTES`] (smaller in tests).
    min_kept_routes: usize,
    max_kept_routes: usize,
}

impl Roster {
    pub(super) fn new(cluster: bool) -> Roster {
        Roster {
            cluster,
            min_kept_routes: MIN_KEPT_ROUTES,
            max_kept_routes: MAX_KEPT_ROUTES,
            ..Roster::default()
        }
    }

    // ---- the group owner's side --------------------------------------------------------

    /// The members of an owned group (`None`: not owned here, or not loaded yet).
    pub(super) fn members(&self, group: &GroupKey) -> Option<&HashSet<Str>> {
        self.owned.get(group).map(|e| &e.members)
    }

    pub(super) fn member_count(&self, group: &GroupKey) -> usize {
        self.owned.get(group).map_or(0, |e| e.members.len())
    }

    /// Whether the group's member list is here (owned and loaded).
    pub(super) fn is_owned(&self, group: &GroupKey) -> bool {
        self.owned.contains_key(group)
    }

    /// Whether `new_members` more members fit: within `max_members`, and a group not owned
    /// yet within [`MAX_GROUPS_PER_SHARD`].
    pub(super) fn admits(&self, group: &GroupKey, new_members: usize, max_members: usize) -> bool {
        match self.owned.get(group) {
            Some(e) => e.members.len() + new_members <= max_members,
            None => self.owned.len() < MAX_GROUPS_PER_SHARD && new_members <= max_members,
        }
    }

    /// Whether `member` may join: a member rejoining always may.
    pub(super) fn admits_join(&self, group: &GroupKey, member: &Str, max_members: usize) -> bool {
        let new = !self.members(group).is_some_and(|m| m.contains(member));
        self.admits(group, usize::from(new), max_members)
    }

    /// Adds or removes a member of an owned group (a group is created by its first member
    /// and dropped with its last).
    pub(super) fn set_member(&mut self, group: &GroupKey, member: &Str, join: bool) {
        if join {
            self.owned
                .entry(group.clone())
                .or_default()
                .members
                .insert(member.clone());
        } else if let Some(e) = self.owned.get_mut(group) {
            e.members.remove(member);
            if e.members.is_empty() {
                self.owned.remove(group);
            }
        }
    }

    /// Whether `from` may send to `group`: `not_found` when the group is not here,
    /// `forbidden` when `from` is not a member. In a cluster the store checks membership
    /// instead (`Refusal::NotMember`): this node's list may miss a join made on another node.
    pub(super) fn may_send(&self, group: &GroupKey, from: &Str) -> Result<(), ErrorCode> {
        let e = self.owned.get(group).ok_or(ErrorCode::NotFound)?;
        if !self.cluster && !e.members.contains(from) {
            return Err(ErrorCode::Forbidden);
        }
        Ok(())
    }

    /// Durability `memory`: the next position on an owned group's timeline.
    pub(super) fn next_gseq(&mut self, group: &GroupKey) -> Option<u64> {
        let e = self.owned.get_mut(group)?;
        e.gseq += 1;
        Some(e.gseq)
    }

    /// Durability `local`: the stored member list of a group read back. An empty list leaves
    /// the group absent (a send gets `not_found`, a join creates it); a group changed here
    /// meanwhile, or past [`MAX_GROUPS_PER_SHARD`], is left as it is.
    pub(super) fn install(&mut self, group: &GroupKey, members: Vec<Str>) {
        if members.is_empty()
            || self.owned.contains_key(group)
            || self.owned.len() >= MAX_GROUPS_PER_SHARD
        {
            return;
        }
        self.owned
            .entry(group.clone())
            .or_default()
            .members
            .extend(members);
    }

    /// Whether the group's member list is being read back.
    pub(super) fn is_loading(&self, group: &GroupKey) -> bool {
        self.loading.contains_key(group)
    }

    /// Queues `work` behind the read under way (`None`); gives it back when none is, or
    /// [`MAX_WAITING_PER_GROUP`] wait already.
    pub(super) fn wait_for_load(&mut self, group: &GroupKey, work: GroupWork) -> Option<GroupWork> {
        match self.loading.get_mut(group) {
            Some(waiting) if waiting.len() < MAX_WAITING_PER_GROUP => {
                waiting.push(work);
                None
            }
            _ => Some(work),
        }
    }

    /// A read of the group's member list started, `work` the first to wait for it.
    pub(super) fn load_started(&mut self, group: GroupKey, work: GroupWork) {
        self.loading.insert(group, vec![work]);
    }

    /// The read ended: the work that waited, in order (`None`: no read was under way).
    pub(super) fn load_ended(&mut self, group: &GroupKey) -> Option<Vec<GroupWork>> {
        self.loading.remove(group)
    }

    // ---- the member's owner's side -----------------------------------------------------

    /// Whether `user` may join one more group: a rejoin always may. While the user's stored
    /// groups are still loading the count is not known yet, and the join goes on.
    pub(super) fn may_join(&self, user: &UserKey, group: &GroupKey, max_groups: usize) -> bool {
        !self
            .of_user
            .get(user)
            .is_some_and(|gs| gs.len() >= max_groups && !gs.contains(group))
    }

    /// `user` joined or left `group`; `online`: the user has a device here. `false` when the
    /// join was not kept: `user` is in `max_groups` groups already.
    pub(super) fn member_of(
        &mut self,
        user: &UserKey,
        group: &GroupKey,
        join: bool,
        online: bool,
        max_groups: usize,
    ) -> bool {
        if let Some(dirty) = self.user_loading.get_mut(user) {
            // The read in flight may predate this change: read again when it lands.
            *dirty = true;
        }
        let mut kept = true;
        let groups = self.of_user.entry(user.clone()).or_default();
        if !join {
            groups.retain(|g| g != group);
        } else if groups.contains(group) {
            // A rejoin: nothing new.
        } else if groups.len() < max_groups {
            groups.push(group.clone());
        } else {
            kept = false;
        }
        if groups.is_empty() {
            self.of_user.remove(user);
        }
        self.set_online(user, group, online && join && kept);
        kept
    }

    /// `user` came online (first device) or went offline (last device): the groups it is a
    /// member of start or stop routing to it.
    pub(super) fn user_online_changed(&mut self, user: &UserKey, online: bool) {
        let Some(groups) = self.of_user.get(user) else {
            return;
        };
        for g in groups.clone() {
            self.set_online(user, &g, online);
        }
    }

    /// Durability `local`: the user's stored groups (the first `max_groups`) replace what
    /// this shard knew.
    pub(super) fn replace_user_groups(
        &mut self,
        user: &UserKey,
        groups: Vec<Str>,
        online: bool,
        max_groups: usize,
    ) {
        for g in self.of_user.remove(user).unwrap_or_default() {
            self.set_online(user, &g, false);
        }
        let keys: Vec<GroupKey> = groups
            .into_iter()
            .take(max_groups)
            .map(|group| GroupKey {
                tenant: user.tenant.clone(),
                group,
            })
            .collect();
        for g in &keys {
            self.set_online(user, g, online);
        }
        if !keys.is_empty() {
            self.of_user.insert(user.clone(), keys);
        }
    }

    /// This shard's members of `group` online now (what [`Roster::online_routes`] reads).
    #[cfg(test)]
    fn online_members(&self, group: &GroupKey) -> Option<&HashSet<Str>> {
        self.online.get(group)
    }

    /// The routes of `group`'s online members' devices: the list kept since neither changed,
    /// or one worked out with `devices` (the directory's routes of one member) and kept for
    /// the next message. `None` when no member of the group is online here.
    pub(super) fn online_routes<'d>(
        &mut self,
        group: &GroupKey,
        mut devices: impl FnMut(&Str) -> &'d [Route],
    ) -> Option<Rc<[Route]>> {
        if let Some(routes) = self.routes.get(group) {
            return Some(routes.clone());
        }
        let mut routes = Vec::new();
        for user in self.online.get(group)? {
            routes.extend_from_slice(devices(user));
        }
        let routes: Rc<[Route]> = routes.into();
        self.keep_routes(group, routes.clone());
        Some(routes)
    }

    /// Remembers what the fan-out worked out for `group`, unless the group has no members
    /// online here, the list is short, or [`MAX_KEPT_ROUTES`] would be passed.
    fn keep_routes(&mut self, group: &GroupKey, routes: Rc<[Route]>) {
        if routes.len() < self.min_kept_routes
            || self.kept_routes + routes.len() > self.max_kept_routes
            || !self.online.contains_key(group)
        {
            return;
        }
        self.kept_routes += routes.len();
        if let Some(old) = self.routes.insert(group.clone(), routes) {
            self.kept_routes -= old.len();
        }
    }

    /// A device of `user` came or went: the routes remembered for its groups are stale.
    pub(super) fn devices_changed(&mut self, user: &UserKey) {
        if self.routes.is_empty() {
            return;
        }
        if let Some(groups) = self.of_user.get(user) {
            for g in groups.clone() {
                self.forget_routes(&g);
            }
        }
    }

    fn forget_routes(&mut self, group: &GroupKey) {
        if let Some(old) = self.routes.remove(group) {
            self.kept_routes -= old.len();
        }
    }

    fn set_online(&mut self, user: &UserKey, group: &GroupKey, online: bool) {
        self.forget_routes(group);
        let before = self.online.contains_key(group);
        if online {
            self.online
                .entry(group.clone())
                .or_default()
                .insert(user.user.clone());
        } else if let Some(set) = self.online.get_mut(group) {
            set.remove(&user.user);
            if set.is_empty() {
                self.online.remove(group);
            }
        }
        if self.cluster && before != self.online.contains_key(group) {
            self.here_pending.insert(group.clone(), !before);
        }
    }

    /// Whether the user's stored groups are being read back.
    pub(super) fn is_user_loading(&self, user: &UserKey) -> bool {
        self.user_loading.contains_key(user)
    }

    /// Whether this shard holds the user's groups or is reading them back.
    pub(super) fn knows_user(&self, user: &UserKey) -> bool {
        self.of_user.contains_key(user) || self.user_loading.contains_key(user)
    }

    pub(super) fn user_load_started(&mut self, user: UserKey) {
        self.user_loading.insert(user, false);
    }

    /// The read of the user's groups ended: `Some(true)` when a membership changed meanwhile
    /// (read again), `None` when no read was under way.
    pub(super) fn user_load_ended(&mut self, user: &UserKey) -> Option<bool> {
        self.user_loading.remove(user)
    }

    /// Cluster mode: the next group whose having online members here changed, and whether
    /// it has some now. It stays next until [`Roster::here_told`].
    pub(super) fn next_here(&self) -> Option<(GroupKey, bool)> {
        self.here_pending
            .iter()
            .next()
            .map(|(g, h)| (g.clone(), *h))
    }

    pub(super) fn here_told(&mut self, group: &GroupKey) {
        self.here_pending.remove(group);
    }

    pub(super) fn has_here_pending(&self) -> bool {
        !self.here_pending.is_empty()
    }

    /// Outside a cluster nobody is told: forget what is pending.
    pub(super) fn forget_here(&mut self) {
        self.here_pending.clear();
    }
}

#[cfg(test)]
mod tests {
    //! The roster driven alone: no shard, no store, no queue.
    use super::*;

    fn group(name: &str) -> GroupKey {
        GroupKey {
            tenant: Str::from("t"),
            group: Str::from(name),
        }
    }

    fn user(name: &str) -> UserKey {
        UserKey {
            tenant: Str::from("t"),
            user: Str::from(name),
        }
    }

    fn online(r: &Roster, g: &GroupKey) -> Vec<String> {
        let mut v: Vec<String> = r
            .online_members(g)
            .into_iter()
            .flatten()
            .map(|s| s.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn joins_stop_at_the_member_limit_but_a_rejoin_passes() {
        let mut r = Roster::new(false);
        let g = group("g");
        let (a, b, c) = (Str::from("a"), Str::from("b"), Str::from("c"));
        assert!(r.admits_join(&g, &a, 2));
        r.set_member(&g, &a, true);
        r.set_member(&g, &b, true);
        assert!(!r.admits_join(&g, &c, 2), "a third member of two at most");
        assert!(
            r.admits_join(&g, &a, 2),
            "a member rejoining is not one more"
        );
        assert!(!r.admits(&g, 1, 2) && r.admits(&g, 0, 2));
        assert!(
            !r.admits(&group("new"), 3, 2),
            "an admin creation past the limit"
        );
        // The last member leaving drops the group.
        r.set_member(&g, &a, false);
        r.set_member(&g, &b, false);
        assert!(!r.is_owned(&g));
        assert_eq!(r.member_count(&g), 0);
    }

    #[test]
    fn members_send_in_sequence_and_others_are_refused() {
        let mut r = Roster::new(false);
        let (g, h) = (group("g"), group("h"));
        r.set_member(&g, &Str::from("a"), true);
        r.set_member(&h, &Str::from("a"), true);
        assert_eq!(r.may_send(&g, &Str::from("a")), Ok(()));
        assert_eq!(r.may_send(&g, &Str::from("z")), Err(ErrorCode::Forbidden));
        assert_eq!(
            r.may_send(&group("none"), &Str::from("a")),
            Err(ErrorCode::NotFound)
        );
        // In a cluster the store checks membership instead; the group must still be here.
        let mut c = Roster::new(true);
        c.set_member(&g, &Str::from("a"), true);
        assert_eq!(c.may_send(&g, &Str::from("z")), Ok(()));
        assert_eq!(
            c.may_send(&group("none"), &Str::from("a")),
            Err(ErrorCode::NotFound)
        );
        assert_eq!(r.next_gseq(&g), Some(1));
        assert_eq!(r.next_gseq(&g), Some(2));
        assert_eq!(r.next_gseq(&h), Some(1), "one timeline per group");
        assert_eq!(r.next_gseq(&group("none")), None);
    }

    #[test]
    fn a_stored_member_list_fills_an_absent_group_only() {
        let mut r = Roster::new(false);
        let g = group("g");
        r.install(&g, Vec::new());
        assert!(!r.is_owned(&g), "an empty list leaves the group absent");
        r.install(&g, vec![Str::from("a"), Str::from("b")]);
        assert_eq!(r.member_count(&g), 2);
        // A group present here is the newer truth.
        r.install(&g, vec![Str::from("c")]);
        assert_eq!(r.member_count(&g), 2);
    }

    #[test]
    fn work_waits_for_a_load_in_order_up_to_its_bound() {
        fn work(n: u64) -> GroupWork {
            GroupWork::Membership {
                member: Str::from(n.to_string().as_str()),
                join: true,
                reply: super::super::ReplyTo {
                    route: super::super::Route {
                        shard: 0,
                        conn: super::super::ConnId {
                            index: 0,
                            generation: 0,
                        },
                    },
                    reference: Some(n),
                },
            }
        }
        let mut r = Roster::new(false);
        let g = group("g");
        assert!(
            r.wait_for_load(&g, work(0)).is_some(),
            "nothing to wait for before a read starts"
        );
        r.load_started(g.clone(), work(0));
        assert!(r.is_loading(&g));
        for n in 1..MAX_WAITING_PER_GROUP as u64 {
            assert!(r.wait_for_load(&g, work(n)).is_none());
        }
        assert!(r.wait_for_load(&g, work(99_999)).is_some(), "the bound");
        let waiting = r.load_ended(&g).unwrap_or_default();
        assert_eq!(waiting.len(), MAX_WAITING_PER_GROUP);
        let order: Vec<u64> = waiting
            .iter()
            .map(|w| match w {
                GroupWork::Membership { reply, .. } => reply.reference.unwrap_or(u64::MAX),
                _ => u64::MAX,
            })
            .collect();
        assert!(order.windows(2).all(|p| p[0] + 1 == p[1]), "in order");
        assert!(!r.is_loading(&g) && r.load_ended(&g).is_none());
    }

    #[test]
    fn online_members_follow_joins_and_devices() {
        let mut r = Roster::new(false);
        let (g, a, b) = (group("g"), user("a"), user("b"));
        assert!(r.member_of(&a, &g, true, true, 10));
        assert!(r.member_of(&b, &g, true, false, 10));
        assert_eq!(online(&r, &g), ["a"]);
        r.user_online_changed(&b, true);
        assert_eq!(online(&r, &g), ["a", "b"]);
        r.user_online_changed(&a, false);
        assert_eq!(online(&r, &g), ["b"]);
        assert!(r.member_of(&b, &g, false, true, 10));
        assert!(r.online_members(&g).is_none(), "no one online: no entry");
        // A user not in any group going online changes nothing.
        r.user_online_changed(&user("c"), true);
        assert!(r.online_members(&g).is_none());
        assert!(!r.has_here_pending(), "outside a cluster nobody is told");
    }

    #[test]
    fn a_user_in_too_many_groups_is_refused_and_not_routed() {
        let mut r = Roster::new(false);
        let a = user("a");
        let (g1, g2, g3) = (group("1"), group("2"), group("3"));
        assert!(r.member_of(&a, &g1, true, true, 2));
        assert!(r.member_of(&a, &g2, true, true, 2));
        assert!(!r.may_join(&a, &g3, 2));
        assert!(r.may_join(&a, &g1, 2), "a rejoin");
        assert!(
            !r.member_of(&a, &g3, true, true, 2),
            "past the list's bound"
        );
        assert!(
            r.online_members(&g3).is_none(),
            "a join not kept is not routed"
        );
        assert_eq!(online(&r, &g1), ["a"]);
    }

    #[test]
    fn stored_groups_replace_what_the_shard_knew() {
        let mut r = Roster::new(false);
        let a = user("a");
        r.member_of(&a, &group("old"), true, true, 10);
        r.user_load_started(a.clone());
        assert!(r.is_user_loading(&a));
        // A change during the read marks it to be read again.
        r.member_of(&a, &group("during"), true, true, 10);
        assert_eq!(r.user_load_ended(&a), Some(true));
        r.replace_user_groups(
            &a,
            vec![Str::from("x"), Str::from("y"), Str::from("z")],
            true,
            2,
        );
        assert!(r.online_members(&group("old")).is_none());
        assert!(r.online_members(&group("during")).is_none());
        assert_eq!(online(&r, &group("x")), ["a"]);
        assert_eq!(online(&r, &group("y")), ["a"]);
        assert!(
            r.online_members(&group("z")).is_none(),
            "the first max only"
        );
        assert_eq!(r.user_load_ended(&a), None);
    }

    #[test]
    fn a_cluster_hears_when_a_group_gains_or_loses_its_last_member_here() {
        let mut r = Roster::new(true);
        let (g, a, b) = (group("g"), user("a"), user("b"));
        r.member_of(&a, &g, true, true, 10);
        assert_eq!(r.next_here(), Some((g.clone(), true)));
        r.here_told(&g);
        // A second member online here changes nothing the other nodes see.
        r.member_of(&b, &g, true, true, 10);
        assert_eq!(r.next_here(), None);
        r.user_online_changed(&a, false);
        assert_eq!(r.next_here(), None, "b is still here");
        r.user_online_changed(&b, false);
        assert_eq!(r.next_here(), Some((g.clone(), false)));
        // Not told yet, and back: the pending notice says what is true now.
        r.user_online_changed(&b, true);
        assert_eq!(r.next_here(), Some((g.clone(), true)));
        r.forget_here();
        assert!(!r.has_here_pending());
    }

    /// One step of the member side's model run (indices into a few users and groups).
    #[derive(Clone, Debug)]
    enum Step {
        Join(usize, usize),
        Leave(usize, usize),
        Online(usize, bool),
        /// The user's stored groups read back (distinct, in the store's order).
        Replace(usize, Vec<usize>),
        /// The next pending cluster notice is told to the other nodes.
        Tell,
        /// Device `k` of the user comes or goes.
        Device(usize, usize),
        /// A message to the group: the routes it goes to.
        FanOut(usize),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..4usize, 0..4usize).prop_map(|(u, g)| Step::Join(u, g)),
            2 => (0..4usize, 0..4usize).prop_map(|(u, g)| Step::Leave(u, g)),
            3 => (0..4usize, any::<bool>()).prop_map(|(u, o)| Step::Online(u, o)),
            1 => (0..4usize, proptest::sample::subsequence((0..4usize).collect::<Vec<_>>(), 0..4))
                .prop_map(|(u, gs)| Step::Replace(u, gs)),
            2 => Just(Step::Tell),
            2 => (0..4usize, 0..3usize).prop_map(|(u, k)| Step::Device(u, k)),
            3 => (0..4usize).prop_map(Step::FanOut),
        ]
    }

    fn route(index: u32) -> Route {
        Route {
            shard: 0,
            conn: super::super::ConnId {
                index,
                generation: 1,
            },
        }
    }

    /// The routes a message to `g` goes to, sorted; the members' devices are in `devices`,
    /// indexed like the users `u0`...
    fn fan_out(r: &mut Roster, g: &GroupKey, devices: &[Vec<Route>]) -> Vec<Route> {
        let lookup = |u: &Str| &devices[u.to_string()[1..].parse::<usize>().unwrap()][..];
        let mut v = r
            .online_routes(g, lookup)
            .map_or(Vec::new(), |r| r.to_vec());
        v.sort_by_key(|r| r.conn.index);
        v
    }

    #[test]
    fn remembered_routes_stop_at_their_bound_and_go_with_a_change() {
        let mut r = Roster::new(false);
        r.max_kept_routes = MIN_KEPT_ROUTES + 1;
        let (g1, g2, a) = (group("1"), group("2"), user("a"));
        assert!(r.member_of(&a, &g1, true, true, 10));
        assert!(r.member_of(&a, &g2, true, true, 10));
        let many: Rc<[Route]> = (0..MIN_KEPT_ROUTES as u32).map(route).collect();
        r.keep_routes(&g1, many.clone());
        assert_eq!(r.routes.get(&g1).map(|r| &r[..]), Some(&many[..]));
        // The bound: a second list of the same length would pass it.
        r.keep_routes(&g2, many.clone());
        assert!(!r.routes.contains_key(&g2));
        assert_eq!(r.kept_routes, MIN_KEPT_ROUTES);
        // A short list is not kept; a group without members online here is not kept.
        r.keep_routes(&g2, many[..1].into());
        assert!(!r.routes.contains_key(&g2));
        r.keep_routes(&group("3"), many.clone());
        assert!(!r.routes.contains_key(&group("3")));
        // A device of a member changing drops the lists of the member's groups.
        r.devices_changed(&a);
        assert!(!r.routes.contains_key(&g1));
        assert_eq!(r.kept_routes, 0);
        r.keep_routes(&g2, many.clone());
        assert!(r.routes.contains_key(&g2));
        // So does a change of who is online.
        r.user_online_changed(&a, false);
        assert!(!r.routes.contains_key(&g2));
        assert_eq!(r.kept_routes, 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_000))]

        /// Whatever the order of joins, leaves, comings online and going offline, stored
        /// groups read back and devices coming and going: a group's online members here are
        /// exactly its members with a device here, no user is routed more than `max_groups`
        /// groups, in a cluster every group without a pending notice was last told what is
        /// true, and a message to a group goes to the devices of exactly those members
        /// whether its routes were remembered or looked up (the lists within their bound).
        #[test]
        fn online_members_follow_membership_and_presence(
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            const MAX: usize = 2;
            let users: Vec<UserKey> = (0..4).map(|i| user(&format!("u{i}"))).collect();
            let groups: Vec<GroupKey> = (0..4).map(|i| group(&format!("g{i}"))).collect();
            let mut r = Roster::new(true);
            let mut of: Vec<Vec<usize>> = vec![Vec::new(); 4];
            let mut on = [false; 4];
            let mut told = [false; 4];
            let mut devices: Vec<Vec<Route>> = vec![Vec::new(); 4];
            r.min_kept_routes = 1;
            r.max_kept_routes = 5;
            for s in steps {
                match s {
                    Step::Join(u, g) => {
                        let kept = r.member_of(&users[u], &groups[g], true, on[u], MAX);
                        let fits = of[u].contains(&g) || of[u].len() < MAX;
                        proptest::prop_assert_eq!(kept, fits);
                        if fits && !of[u].contains(&g) {
                            of[u].push(g);
                        }
                    }
                    Step::Leave(u, g) => {
                        r.member_of(&users[u], &groups[g], false, on[u], MAX);
                        of[u].retain(|&x| x != g);
                    }
                    Step::Online(u, o) if on[u] != o => {
                        on[u] = o;
                        r.user_online_changed(&users[u], o);
                    }
                    Step::Online(..) => {}
                    Step::Replace(u, gs) => {
                        let names = gs.iter().map(|&g| groups[g].group.clone()).collect();
                        r.replace_user_groups(&users[u], names, on[u], MAX);
                        of[u] = gs.into_iter().take(MAX).collect();
                    }
                    Step::Tell => {
                        if let Some((g, here)) = r.next_here() {
                            let i = groups.iter().position(|x| *x == g).unwrap();
                            told[i] = here;
                            r.here_told(&g);
                        }
                    }
                    Step::Device(u, k) => {
                        let d = route((u * 3 + k) as u32);
                        match devices[u].iter().position(|x| *x == d) {
                            Some(at) => {
                                devices[u].remove(at);
                            }
                            None => devices[u].push(d),
                        }
                        r.devices_changed(&users[u]);
                    }
                    Step::FanOut(g) => {
                        let got = fan_out(&mut r, &groups[g], &devices);
                        let mut want: Vec<Route> = (0..4)
                            .filter(|&u| on[u] && of[u].contains(&g))
                            .flat_map(|u| devices[u].clone())
                            .collect();
                        want.sort_by_key(|r| r.conn.index);
                        proptest::prop_assert_eq!(got, want, "routes of g{}", g);
                    }
                }
                let kept: usize = r.routes.values().map(|v| v.len()).sum();
                proptest::prop_assert_eq!(kept, r.kept_routes);
                proptest::prop_assert!(kept <= r.max_kept_routes);
                proptest::prop_assert!(r.routes.keys().all(|g| r.online.contains_key(g)));
                for (g, key) in groups.iter().enumerate() {
                    let mut want: Vec<String> = (0..4)
                        .filter(|&u| on[u] && of[u].contains(&g))
                        .map(|u| format!("u{u}"))
                        .collect();
                    want.sort();
                    proptest::prop_assert_eq!(online(&r, key), want.clone(), "group g{}", g);
                    if !r.here_pending.contains_key(key) {
                        proptest::prop_assert_eq!(told[g], !want.is_empty(), "told of g{}", g);
                    }
                }
                for (u, key) in users.iter().enumerate() {
                    let n = r.of_user.get(key).map_or(0, Vec::len);
                    proptest::prop_assert_eq!(n, of[u].len());
                    proptest::prop_assert!(n <= MAX);
                }
            }
        }
    }
}
