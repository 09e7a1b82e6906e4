//! Behaviour of the stores. The contract tests (`contract!`) run against [`LogStore`] and
//! against [`MySqlStore`] on the MariaDB of `IMGW_MYSQL_URL` (a fresh database per test; they
//! fail when it is not reachable: CI starts it with tests/services.sh). Crash safety (SIGKILL of
//! a writing process) is in tests/store.rs.

use super::*;
use crate::protocol::{Ext, Target};

const T0: u64 = 1_700_000_000_000;

fn user(u: &str) -> UserRef {
    UserRef::new("t1", u)
}

fn group(g: &str) -> GroupRef {
    GroupRef::new("t1", g)
}

fn deliver(from: &str, mid: u64, body: &str) -> Deliver {
    Deliver {
        mid,
        from: from.into(),
        to: None,
        inbox_seq: 999, // ignored by the store
        ts: T0 + mid,
        kind: None,
        body: body.into(),
        ext: Ext::new(),
    }
}

fn append(to: &str, from: &str, cmid: &str, mid: u64, body: &str) -> Op {
    Op::AppendInbox {
        user: user(to),
        sender: from.into(),
        cmid: cmid.into(),
        deliver: deliver(from, mid, body),
    }
}

fn gappend(g: &str, from: &str, cmid: &str, mid: u64, body: &str) -> Op {
    let mut d = deliver(from, mid, body);
    d.to = Some(Target::Group(g.into()));
    Op::AppendGroup {
        group: group(g),
        sender: from.into(),
        cmid: cmid.into(),
        deliver: d,
    }
}

// The contract tests run against every store: `contract!(name)` makes `name::log` and
// `name::mysql` from `fn name(f: &Fixture)`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn mysql() {
                super::$name(&super::Fixture::mysql(stringify!($name)));
            }
            #[test]
            fn log() {
                super::$name(&super::Fixture::log());
            }
        }
    )*};
}

contract!(
    gapless_seqs_per_user_in_one_batch,
    message_fields_roundtrip,
    seqs_continue_after_reopen,
    dedupe_returns_the_original_and_appends_nothing,
    dedupe_survives_a_clock_step_back,
    cursors_are_monotonic_and_bounded_by_the_inbox,
    read_inbox_pages_with_more,
    inboxes_keep_the_newest_messages,
    membership_members_paging_and_user_groups,
    group_timeline_and_group_cursors,
    refused_ops_leave_the_rest_of_the_batch,
    randomized_batches_match_a_model_across_reopens,
);

/// Where a contract test's store lives: a temporary directory, or a fresh MySQL database.
enum Fixture {
    /// The log store in a temporary directory.
    Log(tempfile::TempDir),
    /// The URL and the database, dropped with the fixture.
    MySql(String, String),
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Fixture::MySql(_, db) = self {
            let _ = crate::store::mysql_testdb::drop_database(db);
        }
    }
}

impl Fixture {
    fn log() -> Fixture {
        Fixture::Log(tempfile::tempdir().unwrap())
    }

    /// A fresh database `imgw_t_NAME_PID` on the MariaDB of `IMGW_MYSQL_URL` (CI starts it
    /// with tests/services.sh): the process id keeps two test runs at once (two checkouts)
    /// apart. Fails, never skips, when the server is not reachable.
    fn mysql(name: &str) -> Fixture {
        let name = &name[..name.len().min(40)];
        let db = format!("imgw_t_{name}_{}", std::process::id());
        match crate::store::mysql_testdb::fresh(&db) {
            Ok(url) => Fixture::MySql(url, db),
            Err(e) => panic!(
                "MariaDB not reachable at {} ({e}): start it with `tests/services.sh start`",
                crate::config::redact_url(&crate::store::mysql_testdb::base_url())
            ),
        }
    }

    fn open(&self, opts: StoreOptions) -> TestStore {
        match self {
            Fixture::Log(dir) => TestStore::Log(
                LogStore::open(
                    dir.path(),
                    LogStoreOptions {
                        store: opts,
                        ..LogStoreOptions::default()
                    },
                )
                .unwrap(),
            ),
            Fixture::MySql(url, _) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let store = rt
                    .block_on(MySqlStore::connect(MySqlOptions {
                        url: url.clone(),
                        pool_min: 1,
                        pool_max: 2,
                        connect_timeout_ms: 5_000,
                        query_timeout_ms: 30_000,
                        stmt_cache: 64,
                        writers: 2,
                        writer_min_ops: 1,
                        store: opts,
                    }))
                    .unwrap();
                TestStore::MySql(Box::new(store), rt)
            }
        }
    }
}

/// One store, called synchronously: the log store's ready futures, or the MySQL
/// store's [`Backend`] futures run on a private runtime. Test-only and one per test: the
/// variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum TestStore {
    Log(LogStore),
    MySql(Box<MySqlStore>, tokio::runtime::Runtime),
}

macro_rules! dispatch {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self {
            TestStore::Log(s) => ready(Backend::$method(s, $($arg),*)),
            TestStore::MySql(s, rt) => rt.block_on(Backend::$method(&mut **s, $($arg),*)),
        }
    };
}

/// The result of a future that is ready at once (the log store's).
fn ready<T>(mut f: StoreFuture<'_, T>) -> Result<T, StoreError> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => panic!("the log store's futures are ready at once"),
    }
}

impl TestStore {
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> Result<Vec<OpResult>, StoreError> {
        dispatch!(self, apply(ops, now_ms))
    }
    fn read_inbox(&mut self, u: &UserRef, after: u64, limit: u32) -> Result<InboxPage, StoreError> {
        dispatch!(self, read_inbox(u, after, limit))
    }
    fn last_inbox_seq(&mut self, u: &UserRef) -> Result<u64, StoreError> {
        dispatch!(self, last_inbox_seq(u))
    }
    fn cursor(&mut self, u: &UserRef, device: &str) -> Result<u64, StoreError> {
        dispatch!(self, cursor(u, device))
    }
    fn group_members(
        &mut self,
        g: &GroupRef,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Str>, StoreError> {
        dispatch!(self, group_members(g, after, limit))
    }
    fn group_size(&mut self, g: &GroupRef) -> Result<u64, StoreError> {
        dispatch!(self, group_size(g))
    }
    fn user_groups(&mut self, u: &UserRef) -> Result<Vec<Str>, StoreError> {
        dispatch!(self, user_groups(u))
    }
    fn read_group(
        &mut self,
        g: &GroupRef,
        after: u64,
        limit: u32,
    ) -> Result<GroupPage, StoreError> {
        dispatch!(self, read_group(g, after, limit))
    }
    fn last_group_seq(&mut self, g: &GroupRef) -> Result<u64, StoreError> {
        dispatch!(self, last_group_seq(g))
    }
    fn group_cursor(&mut self, g: &GroupRef, member: &str) -> Result<u64, StoreError> {
        dispatch!(self, group_cursor(g, member))
    }

    /// Rows of a table (by these names: in the log store the index entries, in MySQL the
    /// live rows of the table that holds the same records).
    fn table_len(&mut self, name: &str) -> usize {
        match self {
            TestStore::Log(s) => s.table_len(name),
            TestStore::MySql(s, rt) => {
                let q = match name {
                    "inbox" => "SELECT COUNT(*) FROM inbox",
                    "cursor" => "SELECT COUNT(*) FROM device_cursor",
                    "group_size" => "SELECT COUNT(*) FROM group_head WHERE members > 0",
                    "dedupe" => "SELECT COUNT(*) FROM dedupe",
                    "group_cursor" => "SELECT COUNT(*) FROM group_member WHERE cursor_gseq > 0",
                    other => panic!("no MySQL table for {other}"),
                };
                rt.block_on(s.count(q)).unwrap() as usize
            }
        }
    }
}

fn seq_of(r: &OpResult) -> u64 {
    match r {
        OpResult::Appended { seq, .. } => *seq,
        other => panic!("not appended: {other:?}"),
    }
}

fn bodies(page: &InboxPage) -> Vec<(u64, String)> {
    page.messages
        .iter()
        .map(|d| (d.inbox_seq, d.body.to_string()))
        .collect()
}

fn gapless_seqs_per_user_in_one_batch(f: &Fixture) {
    let mut s = f.open(StoreOptions::default());
    let mut ops = Vec::new();
    for round in 0..5u64 {
        for u in 0..100u64 {
            let mid = round * 100 + u + 1;
            ops.push(append(
                &format!("u{u}"),
                "alice",
                &format!("c{mid}"),
                mid,
                &format!("r{round}"),
            ));
        }
    }
    let res = s.apply(ops, T0).unwrap();
    assert_eq!(res.len(), 500);
    for (i, r) in res.iter().enumerate() {
        let round = i as u64 / 100;
        assert_eq!(
            *r,
            OpResult::Appended {
                seq: round + 1,
                mid: i as u64 + 1,
                ts: T0 + i as u64 + 1,
                duplicate: false
            }
        );
    }
    for u in 0..100 {
        let page = s.read_inbox(&user(&format!("u{u}")), 0, 100).unwrap();
        let want: Vec<_> = (0..5u64).map(|r| (r + 1, format!("r{r}"))).collect();
        assert_eq!(bodies(&page), want);
        assert!(!page.more);
        assert_eq!(page.messages[0].from, "alice");
        assert_eq!(page.messages[0].mid, u + 1);
        assert_eq!(s.last_inbox_seq(&user(&format!("u{u}"))).unwrap(), 5);
    }
    assert_eq!(s.last_inbox_seq(&user("nobody")).unwrap(), 0);
}

fn message_fields_roundtrip(f: &Fixture) {
    let mut s = f.open(StoreOptions::default());
    let mut d = deliver("bob", 42, "héllo");
    d.to = Some(Target::User("bob".into()));
    d.kind = Some("text".into());
    d.ext = [("a", "1"), ("z", "2")].into_iter().collect();
    s.apply(
        vec![Op::AppendInbox {
            user: user("amy"),
            sender: "bob".into(),
            cmid: "c1".into(),
            deliver: d.clone(),
        }],
        T0,
    )
    .unwrap();
    let page = s.read_inbox(&user("amy"), 0, 10).unwrap();
    d.inbox_seq = 1;
    assert_eq!(page.messages, vec![d]);
}

fn seqs_continue_after_reopen(f: &Fixture) {
    let opts = StoreOptions::default();
    let mut mid = 0;
    let mut next = |to: &str| {
        mid += 1;
        append(to, "x", &format!("c{mid}"), mid, "b")
    };
    {
        let mut s = f.open(opts.clone());
        let ops = (0..30).map(|i| next(&format!("u{}", i % 10))).collect();
        s.apply(ops, T0).unwrap();
    }
    let mut s = f.open(opts);
    let res = s
        .apply((0..20).map(|i| next(&format!("u{}", i % 10))).collect(), T0)
        .unwrap();
    let seqs: Vec<u64> = res.iter().map(seq_of).collect();
    assert_eq!(seqs, [vec![4; 10], vec![5; 10]].concat());
    for u in 0..10 {
        let page = s.read_inbox(&user(&format!("u{u}")), 0, 100).unwrap();
        let got: Vec<u64> = page.messages.iter().map(|d| d.inbox_seq).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
    }
}

fn dedupe_returns_the_original_and_appends_nothing(f: &Fixture) {
    let window = 60_000;
    let mut s = f.open(StoreOptions {
        dedupe_window_ms: window,
        ..StoreOptions::default()
    });
    let first = s
        .apply(vec![append("bob", "amy", "c1", 7, "hi")], T0)
        .unwrap();
    assert_eq!(
        first[0],
        OpResult::Appended {
            seq: 1,
            mid: 7,
            ts: T0 + 7,
            duplicate: false
        }
    );
    // Resent in a later batch, and twice within one batch: the original, nothing appended.
    let again = s
        .apply(
            vec![
                append("bob", "amy", "c1", 8, "hi"),
                append("bob", "amy", "c2", 9, "second"),
                append("bob", "amy", "c2", 10, "second"),
            ],
            T0 + 1_000,
        )
        .unwrap();
    assert_eq!(
        again,
        vec![
            OpResult::Appended {
                seq: 1,
                mid: 7,
                ts: T0 + 7,
                duplicate: true
            },
            OpResult::Appended {
                seq: 2,
                mid: 9,
                ts: T0 + 9,
                duplicate: false
            },
            OpResult::Appended {
                seq: 2,
                mid: 9,
                ts: T0 + 9,
                duplicate: true
            },
        ]
    );
    assert_eq!(s.last_inbox_seq(&user("bob")).unwrap(), 2);
    // The same send written to the sender's own inbox (multi-device sync) is its own record.
    let own = s
        .apply(vec![append("amy", "amy", "c1", 7, "hi")], T0 + 2_000)
        .unwrap();
    assert_eq!(seq_of(&own[0]), 1);
    // Same cmid from another sender, or another tenant: not a duplicate.
    let other = s
        .apply(vec![append("bob", "carl", "c1", 11, "yo")], T0 + 2_000)
        .unwrap();
    assert_eq!(seq_of(&other[0]), 3);
    // Survives a restart.
    drop(s);
    let mut s = f.open(StoreOptions {
        dedupe_window_ms: window,
        ..StoreOptions::default()
    });
    let r = s
        .apply(vec![append("bob", "amy", "c1", 12, "hi")], T0 + 3_000)
        .unwrap();
    assert_eq!(
        r[0],
        OpResult::Appended {
            seq: 1,
            mid: 7,
            ts: T0 + 7,
            duplicate: true
        }
    );
    // After the window the cmid is new again.
    let late = s
        .apply(vec![append("bob", "amy", "c1", 13, "hi")], T0 + window)
        .unwrap();
    assert_eq!(
        late[0],
        OpResult::Appended {
            seq: 4,
            mid: 13,
            ts: T0 + 13,
            duplicate: false
        }
    );
    // ... and that renewed record dedupes for a full window, even after collection ran.
    let r = s
        .apply(
            vec![append("bob", "amy", "c1", 14, "hi")],
            T0 + window + window / 2,
        )
        .unwrap();
    assert_eq!(seq_of(&r[0]), 4);
}

fn dedupe_survives_a_clock_step_back(f: &Fixture) {
    let mut s = f.open(StoreOptions::default());
    s.apply(vec![append("bob", "amy", "c1", 1, "x")], T0)
        .unwrap();
    let r = s
        .apply(vec![append("bob", "amy", "c1", 2, "x")], T0 - 3_600_000)
        .unwrap();
    assert!(matches!(
        r[0],
        OpResult::Appended {
            duplicate: true,
            seq: 1,
            ..
        }
    ));
}

fn cursors_are_monotonic_and_bounded_by_the_inbox(f: &Fixture) {
    let mut s = f.open(StoreOptions {
        max_devices_per_user: 3,
        ..StoreOptions::default()
    });
    let ops = (1..=10)
        .map(|i| append("bob", "amy", &format!("c{i}"), i, "x"))
        .collect();
    s.apply(ops, T0).unwrap();
    let set = |device: &str, seq: u64| Op::SetCursor {
        user: user("bob"),
        device: device.into(),
        seq,
    };
    let r = s
        .apply(
            vec![
                set("phone", 5),
                set("phone", 3),
                set("laptop", 100),
                set("tab", 0),
            ],
            T0,
        )
        .unwrap();
    assert_eq!(
        r,
        vec![
            OpResult::Cursor { seq: 5 },
            OpResult::Cursor { seq: 5 },
            OpResult::Cursor { seq: 10 },
            OpResult::Cursor { seq: 0 },
        ]
    );
    assert_eq!(s.cursor(&user("bob"), "phone").unwrap(), 5);
    assert_eq!(s.cursor(&user("bob"), "laptop").unwrap(), 10);
    assert_eq!(s.cursor(&user("bob"), "tab").unwrap(), 0);
    assert_eq!(s.table_len("cursor"), 2);
    let r = s.apply(vec![set("phone", 4)], T0).unwrap();
    assert_eq!(r, vec![OpResult::Cursor { seq: 5 }]);
    // A fourth device evicts the lowest cursor (phone at 5).
    s.apply(vec![set("tab", 7), set("watch", 8)], T0).unwrap();
    assert_eq!(s.table_len("cursor"), 3);
    assert_eq!(s.cursor(&user("bob"), "phone").unwrap(), 0);
    assert_eq!(s.cursor(&user("bob"), "watch").unwrap(), 8);
    // No inbox, no cursor.
    let r = s
        .apply(
            vec![Op::SetCursor {
                user: user("zed"),
                device: "d".into(),
                seq: 3,
            }],
            T0,
        )
        .unwrap();
    assert_eq!(r, vec![OpResult::Cursor { seq: 0 }]);
}

fn read_inbox_pages_with_more(f: &Fixture) {
    let mut s = f.open(StoreOptions {
        max_page: 8,
        ..StoreOptions::default()
    });
    let ops = (1..=25)
        .map(|i| append("bob", "amy", &format!("c{i}"), i, &format!("m{i}")))
        .collect();
    s.apply(ops, T0).unwrap();
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let p = s.read_inbox(&user("bob"), after, 10).unwrap();
        let seqs: Vec<u64> = p.messages.iter().map(|d| d.inbox_seq).collect();
        after = *seqs.last().unwrap();
        pages.push((seqs.len(), p.more));
        if !p.more {
            break;
        }
    }
    // `limit` 10 is clamped to max_page 8.
    assert_eq!(pages, vec![(8, true), (8, true), (8, true), (1, false)]);
    assert_eq!(after, 25);
    let p = s.read_inbox(&user("bob"), 24, 1).unwrap();
    assert_eq!((bodies(&p), p.more), (vec![(25, "m25".to_string())], false));
    let p = s.read_inbox(&user("bob"), 23, 0).unwrap();
    assert_eq!((p.messages.len(), p.more), (1, true));
    assert_eq!(
        s.read_inbox(&user("bob"), 25, 10).unwrap(),
        InboxPage::default()
    );
    assert_eq!(
        s.read_inbox(&user("bob"), u64::MAX, 10).unwrap(),
        InboxPage::default()
    );
    // Another user with a name that extends this one's shares nothing.
    assert_eq!(
        s.read_inbox(&user("bo"), 0, 10).unwrap(),
        InboxPage::default()
    );
}

fn inboxes_keep_the_newest_messages(f: &Fixture) {
    let mut s = f.open(StoreOptions {
        inbox_keep: 5,
        ..StoreOptions::default()
    });
    for i in 1..=8 {
        s.apply(vec![append("bob", "amy", &format!("c{i}"), i, "x")], T0)
            .unwrap();
    }
    let p = s.read_inbox(&user("bob"), 0, 100).unwrap();
    let seqs: Vec<u64> = p.messages.iter().map(|d| d.inbox_seq).collect();
    assert_eq!(seqs, vec![4, 5, 6, 7, 8]);
    assert_eq!(s.table_len("inbox"), 5);
    drop(s);
    let mut s = f.open(StoreOptions::default());
    assert_eq!(s.last_inbox_seq(&user("bob")).unwrap(), 8);
}

fn membership_members_paging_and_user_groups(f: &Fixture) {
    let mut s = f.open(StoreOptions {
        max_groups_per_user: 2,
        max_group_members: 30,
        ..StoreOptions::default()
    });
    let join = |g: &str, m: &str| Op::Join {
        group: group(g),
        member: m.into(),
    };
    let leave = |g: &str, m: &str| Op::Leave {
        group: group(g),
        member: m.into(),
    };
    let ops = (0..25).map(|i| join("g1", &format!("m{i:02}"))).collect();
    let r = s.apply(ops, T0).unwrap();
    assert_eq!(
        r[24],
        OpResult::Membership {
            changed: true,
            members: 25
        }
    );
    let r = s
        .apply(vec![join("g1", "m00"), leave("g1", "zz")], T0)
        .unwrap();
    assert_eq!(
        r,
        vec![
            OpResult::Membership {
                changed: false,
                members: 25
            },
            OpResult::Membership {
                changed: false,
                members: 25
            },
        ]
    );
    assert_eq!(s.group_size(&group("g1")).unwrap(), 25);
    // Paging through the members.
    let mut all = Vec::new();
    let mut after: Option<Str> = None;
    loop {
        let page = s.group_members(&group("g1"), after.as_deref(), 10).unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        all.extend(page);
    }
    let want: Vec<Str> = (0..25).map(|i| Str::from(format!("m{i:02}"))).collect();
    assert_eq!(all, want);
    // Group g1 and g1x do not share members (prefix-free keys).
    s.apply(vec![join("g1x", "m00")], T0).unwrap();
    assert_eq!(
        s.group_members(&group("g1x"), None, 100).unwrap(),
        vec![Str::from("m00")]
    );
    assert_eq!(
        s.user_groups(&user("m00")).unwrap(),
        vec![Str::from("g1"), Str::from("g1x")]
    );
    // Limits: groups per user, members per group.
    let r = s
        .apply(
            vec![
                join("g3", "m00"),
                join("g1", "n1"),
                join("g1", "n2"),
                join("g1", "n3"),
                join("g1", "n4"),
                join("g1", "n5"),
                join("g1", "n6"),
            ],
            T0,
        )
        .unwrap();
    assert_eq!(r[0], OpResult::Refused(Refusal::TooManyGroups));
    assert_eq!(
        r[5],
        OpResult::Membership {
            changed: true,
            members: 30
        }
    );
    assert_eq!(r[6], OpResult::Refused(Refusal::GroupFull));
    // Leave, within a batch after a join too.
    let r = s
        .apply(
            vec![leave("g1", "m00"), join("g3", "m00"), leave("g3", "m00")],
            T0,
        )
        .unwrap();
    assert_eq!(
        r[0],
        OpResult::Membership {
            changed: true,
            members: 29
        }
    );
    assert_eq!(
        r[1],
        OpResult::Membership {
            changed: true,
            members: 1
        }
    );
    assert_eq!(
        r[2],
        OpResult::Membership {
            changed: true,
            members: 0
        }
    );
    assert_eq!(s.user_groups(&user("m00")).unwrap(), vec![Str::from("g1x")]);
    assert_eq!(s.group_size(&group("g3")).unwrap(), 0);
    assert_eq!(s.table_len("group_size"), 2);
    assert!(!s
        .group_members(&group("g1"), None, 100)
        .unwrap()
        .contains(&Str::from("m00")));
}

fn group_timeline_and_group_cursors(f: &Fixture) {
    let mut s = f.open(StoreOptions {
        group_keep: 50,
        ..StoreOptions::default()
    });
    let join = |m: &str| Op::Join {
        group: group("g"),
        member: m.into(),
    };
    let gcur = |m: &str, gseq: u64| Op::SetGroupCursor {
        group: group("g"),
        member: m.into(),
        gseq,
    };
    s.apply(vec![join("amy")], T0).unwrap();
    let ops = (1..=30)
        .map(|i| gappend("g", "amy", &format!("c{i}"), i, &format!("m{i}")))
        .collect();
    let r = s.apply(ops, T0).unwrap();
    assert_eq!(
        r.iter().map(seq_of).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    // Another group's sequence is independent; a duplicate returns the original gseq.
    let r = s
        .apply(
            vec![
                gappend("h", "amy", "c1", 99, "x"),
                gappend("g", "amy", "c3", 100, "m3"),
            ],
            T0,
        )
        .unwrap();
    assert_eq!(r.iter().map(seq_of).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(s.last_group_seq(&group("g")).unwrap(), 30);
    // Pages.
    let p = s.read_group(&group("g"), 20, 7).unwrap();
    assert!(p.more);
    assert_eq!(
        p.messages.iter().map(|e| e.gseq).collect::<Vec<_>>(),
        (21..=27).collect::<Vec<_>>()
    );
    assert_eq!(p.messages[0].deliver.body, "m21");
    assert_eq!(p.messages[0].deliver.to, Some(Target::Group("g".into())));
    let p = s.read_group(&group("g"), 27, 7).unwrap();
    assert!(!p.more && p.messages.len() == 3);
    // Cursors: monotonic, bounded by the timeline; non-members refused.
    let r = s
        .apply(
            vec![
                gcur("amy", 10),
                gcur("amy", 5),
                gcur("amy", 1000),
                gcur("bob", 3),
            ],
            T0,
        )
        .unwrap();
    assert_eq!(
        r,
        vec![
            OpResult::Cursor { seq: 10 },
            OpResult::Cursor { seq: 10 },
            OpResult::Cursor { seq: 30 },
            OpResult::Refused(Refusal::NotMember),
        ]
    );
    assert_eq!(s.group_cursor(&group("g"), "amy").unwrap(), 30);
    // A new member starts at the current gseq.
    s.apply(vec![join("bob")], T0).unwrap();
    assert_eq!(s.group_cursor(&group("g"), "bob").unwrap(), 30);
    // Leaving drops the cursor; rejoining starts at the gseq of then.
    s.apply(
        vec![Op::Leave {
            group: group("g"),
            member: "amy".into(),
        }],
        T0,
    )
    .unwrap();
    assert_eq!(s.group_cursor(&group("g"), "amy").unwrap(), 0);
    assert_eq!(s.table_len("group_cursor"), 1);
    // Timeline trimming keeps the newest `group_keep`.
    let ops = (31..=60)
        .map(|i| gappend("g", "bob", &format!("c{i}"), i, "x"))
        .collect();
    s.apply(ops, T0).unwrap();
    let p = s.read_group(&group("g"), 0, 1000).unwrap();
    assert_eq!(p.messages.first().map(|e| e.gseq), Some(11));
    assert_eq!(p.messages.len(), 50);
    // Reopen: gseq continues.
    drop(s);
    let mut s = f.open(StoreOptions::default());
    let r = s
        .apply(vec![gappend("g", "bob", "new", 61, "x")], T0)
        .unwrap();
    assert_eq!(seq_of(&r[0]), 61);
}

fn refused_ops_leave_the_rest_of_the_batch(f: &Fixture) {
    let mut s = f.open(StoreOptions::default());
    let long = "x".repeat(MAX_ID_BYTES + 1);
    let r = s
        .apply(
            vec![
                append(&long, "amy", "c1", 1, "x"),
                append("bob", "amy", &long, 2, "x"),
                append("bob", "amy", "c3", 3, "x"),
                Op::Join {
                    group: group("g"),
                    member: long.as_str().into(),
                },
                Op::SetCursor {
                    user: user("bob"),
                    device: long.as_str().into(),
                    seq: 1,
                },
            ],
            T0,
        )
        .unwrap();
    assert_eq!(
        r,
        vec![
            OpResult::Refused(Refusal::IdTooLong),
            OpResult::Refused(Refusal::IdTooLong),
            OpResult::Appended {
                seq: 1,
                mid: 3,
                ts: T0 + 3,
                duplicate: false
            },
            OpResult::Refused(Refusal::IdTooLong),
            OpResult::Refused(Refusal::IdTooLong),
        ]
    );
    // A batch that writes nothing commits nothing and still answers.
    let r = s
        .apply(vec![append("bob", "amy", "c3", 3, "x")], T0)
        .unwrap();
    assert!(matches!(
        r[0],
        OpResult::Appended {
            duplicate: true,
            ..
        }
    ));
    assert_eq!(s.apply(Vec::new(), T0).unwrap(), Vec::new());
}

#[test]
fn backend_is_object_safe_and_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Box<dyn Backend>>();
    let dir = tempfile::tempdir().unwrap();
    let mut b: Box<dyn Backend> =
        Box::new(LogStore::open(dir.path(), LogStoreOptions::default()).unwrap());
    futures_lite::future::block_on(async {
        b.apply(vec![append("bob", "amy", "c", 1, "x")], T0)
            .await
            .unwrap();
        assert_eq!(b.last_inbox_seq(&user("bob")).await.unwrap(), 1);
    });
}

type DedupeKey = (String, String, String);

/// A plain in-memory model of the store's rules, for the randomized comparison below.
#[derive(Default)]
struct Model {
    inbox: std::collections::HashMap<String, Vec<(u64, String)>>,
    timeline: std::collections::HashMap<String, Vec<(u64, String)>>,
    /// (destination, sender, cmid) -> (seq, mid, ts, stored_at).
    dedupe: std::collections::HashMap<DedupeKey, (u64, u64, u64, u64)>,
    cursor: std::collections::HashMap<(String, String), u64>,
    members: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    gcursor: std::collections::HashMap<(String, String), u64>,
}

const KEEP: u64 = 7;
const WINDOW: u64 = 1_000;

impl Model {
    fn last(list: &[(u64, String)]) -> u64 {
        list.last().map_or(0, |e| e.0)
    }

    /// `dest`: (is a group, id).
    fn append(
        &mut self,
        dest: (bool, &str),
        sender: &str,
        cmid: &str,
        deliver: &Deliver,
        now: u64,
    ) -> OpResult {
        let (group, dest) = dest;
        let (mid, body) = (deliver.mid, &deliver.body);
        let dkey = (
            format!("{}{dest}", if group { "g" } else { "u" }),
            sender.to_string(),
            cmid.to_string(),
        );
        if let Some(&(seq, mid, ts, at)) = self.dedupe.get(&dkey) {
            if now - at < WINDOW {
                return OpResult::Appended {
                    seq,
                    mid,
                    ts,
                    duplicate: true,
                };
            }
        }
        let list = if group {
            &mut self.timeline
        } else {
            &mut self.inbox
        }
        .entry(dest.to_string())
        .or_default();
        let seq = Self::last(list) + 1;
        list.push((seq, body.to_string()));
        list.retain(|e| e.0 + KEEP > seq);
        self.dedupe.insert(dkey, (seq, mid, T0 + mid, now));
        OpResult::Appended {
            seq,
            mid,
            ts: T0 + mid,
            duplicate: false,
        }
    }

    fn apply(&mut self, op: &Op, now: u64) -> OpResult {
        match op {
            Op::AppendInbox {
                user,
                sender,
                cmid,
                deliver,
            } => self.append((false, &user.user), sender, cmid, deliver, now),
            Op::AppendGroup {
                group,
                sender,
                cmid,
                deliver,
            } => self.append((true, &group.group), sender, cmid, deliver, now),
            Op::SetCursor { user, device, seq } => {
                let last = self.inbox.get(&*user.user).map_or(0, |l| Self::last(l));
                let c = self
                    .cursor
                    .entry((user.user.to_string(), device.to_string()))
                    .or_default();
                *c = (*c).max((*seq).min(last));
                OpResult::Cursor { seq: *c }
            }
            Op::SetGroupCursor {
                group,
                member,
                gseq,
            } => {
                if !self
                    .members
                    .get(&*group.group)
                    .is_some_and(|m| m.contains(&**member))
                {
                    return OpResult::Refused(Refusal::NotMember);
                }
                let last = self
                    .timeline
                    .get(&*group.group)
                    .map_or(0, |l| Self::last(l));
                let c = self
                    .gcursor
                    .entry((group.group.to_string(), member.to_string()))
                    .or_default();
                *c = (*c).max((*gseq).min(last));
                OpResult::Cursor { seq: *c }
            }
            Op::Join { group, member } => {
                let last = self
                    .timeline
                    .get(&*group.group)
                    .map_or(0, |l| Self::last(l));
                let m = self.members.entry(group.group.to_string()).or_default();
                let changed = m.insert(member.to_string());
                if changed {
                    self.gcursor
                        .insert((group.group.to_string(), member.to_string()), last);
                }
                OpResult::Membership {
                    changed,
                    members: m.len() as u64,
                }
            }
            Op::Leave { group, member } => {
                let m = self.members.entry(group.group.to_string()).or_default();
                let changed = m.remove(&**member);
                self.gcursor
                    .remove(&(group.group.to_string(), member.to_string()));
                OpResult::Membership {
                    changed,
                    members: m.len() as u64,
                }
            }
        }
    }
}

fn randomized_batches_match_a_model_across_reopens(f: &Fixture) {
    let opts = StoreOptions {
        inbox_keep: KEEP,
        group_keep: KEEP,
        dedupe_window_ms: WINDOW,
        ..StoreOptions::default()
    };
    let mut s = f.open(opts.clone());
    let mut model = Model::default();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut now = T0;
    let mut mid = 0;
    for batch in 0..300 {
        now += next(WINDOW / 3);
        let mut ops = Vec::new();
        for _ in 0..next(12) {
            let u = format!("u{}", next(4));
            let g = format!("g{}", next(2));
            // Few cmids, so resends within and after the window are common.
            let cmid = format!("c{}", next(6));
            mid += 1;
            ops.push(match next(6) {
                0 | 1 => append(&u, "s", &cmid, mid, &format!("m{mid}")),
                2 => gappend(&g, "s", &cmid, mid, &format!("m{mid}")),
                3 => Op::SetCursor {
                    user: user(&u),
                    device: format!("d{}", next(2)).into(),
                    seq: next(40),
                },
                4 => Op::SetGroupCursor {
                    group: group(&g),
                    member: u.as_str().into(),
                    gseq: next(40),
                },
                _ if next(2) == 0 => Op::Join {
                    group: group(&g),
                    member: u.as_str().into(),
                },
                _ => Op::Leave {
                    group: group(&g),
                    member: u.as_str().into(),
                },
            });
        }
        let want: Vec<OpResult> = ops.iter().map(|op| model.apply(op, now)).collect();
        assert_eq!(s.apply(ops, now).unwrap(), want, "batch {batch}");
        if batch % 50 == 49 {
            drop(s);
            s = f.open(opts.clone());
        }
    }
    for u in 0..4 {
        let u = format!("u{u}");
        let page = s.read_inbox(&user(&u), 0, 100).unwrap();
        let got: Vec<(u64, String)> = page
            .messages
            .iter()
            .map(|d| (d.inbox_seq, d.body.to_string()))
            .collect();
        assert_eq!(
            got,
            model.inbox.get(&u).cloned().unwrap_or_default(),
            "inbox {u}"
        );
        for d in 0..2 {
            let d = format!("d{d}");
            let want = model
                .cursor
                .get(&(u.clone(), d.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(s.cursor(&user(&u), &d).unwrap(), want);
        }
    }
    for g in 0..2 {
        let g = format!("g{g}");
        let page = s.read_group(&group(&g), 0, 100).unwrap();
        let got: Vec<(u64, String)> = page
            .messages
            .iter()
            .map(|e| (e.gseq, e.deliver.body.to_string()))
            .collect();
        assert_eq!(
            got,
            model.timeline.get(&g).cloned().unwrap_or_default(),
            "timeline {g}"
        );
        let members: Vec<String> = s
            .group_members(&group(&g), None, 100)
            .unwrap()
            .iter()
            .map(|m| m.to_string())
            .collect();
        let want: Vec<String> = model
            .members
            .get(&g)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        assert_eq!(members, want);
        for m in &want {
            let c = model
                .gcursor
                .get(&(g.clone(), m.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(s.group_cursor(&group(&g), m).unwrap(), c);
        }
    }
    // Only the records of the last window are held.
    let live = model.dedupe.values().filter(|r| now - r.3 < WINDOW).count();
    match &mut s {
        TestStore::Log(_) => assert_eq!(s.table_len("dedupe"), live),
        // MySQL collects in the batches: a batch's lag of records may remain.
        _ => assert!(
            s.table_len("dedupe") <= live + 64,
            "{} > {live} + 64",
            s.table_len("dedupe")
        ),
    }
}
