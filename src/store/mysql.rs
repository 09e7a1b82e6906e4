//! The MySQL / MariaDB backend: the same contract as [`super::EmbeddedStore`] on a server
//! (docs/STORE.md, "MySQL backend").
//!
//! One `apply` is one InnoDB transaction: the counter rows of every inbox and group the batch
//! touches are read with `SELECT ... FOR UPDATE` (so the seqs stay gapless even with several
//! writers), the batch runs in memory against what was read through the store rules
//! ([`super::rules`]; later ops of a batch see the earlier ones), and its writes go out as
//! multi-row `INSERT`s and `DELETE`s before one `COMMIT`. Any error rolls the whole
//! transaction back. Every call is bounded by `query_timeout_ms`, every new connection by
//! `connect_timeout_ms`; the pool reconnects by itself when the server comes back.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use mysql_async::prelude::Queryable;
use mysql_async::{
    IsolationLevel, Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, TxOpts, Value,
};

use super::keys::DedupeRecord;
use super::rules::{self, DedupeKey as RuleDedupeKey, Log, StoreTx};
use super::{
    Backend, GroupEntry, GroupPage, GroupRef, InboxPage, Op, OpResult, StoreError, StoreFuture,
    StoreOptions, UserRef,
};
use crate::protocol::Str;

/// The longest id (tenant, user, group, member, device, sender, cmid) this backend stores, in
/// bytes: the columns are `VARBINARY(255)` so that the composite keys fit InnoDB's index limit.
pub const MYSQL_MAX_ID_BYTES: usize = 255;

/// Rows per multi-row statement.
const ROWS_PER_STATEMENT: usize = 1_000;
/// Bytes of values per multi-row `INSERT` (hex-encoded: twice the raw size), well below
/// MariaDB's default `max_allowed_packet` (16 MiB).
const BYTES_PER_STATEMENT: usize = 4 << 20;

/// Bytes of one multi-statement query (several statements, one round trip), half of
/// MariaDB's default `max_allowed_packet` (16 MiB); a single statement is at most about
/// [`BYTES_PER_STATEMENT`].
const PACKET_BYTES: usize = 8 << 20;

/// The migrations, in order: (version, name, SQL). Each is applied once and recorded in
/// `schema_migrations`; their statements are idempotent.
const MIGRATIONS: &[(u32, &str, &str)] =
    &[(1, "init", include_str!("../../schemas/mysql/001_init.sql"))];

/// How to reach the server and the bounds of the pool.
#[derive(Clone)]
pub struct MySqlOptions {
    /// `mysql://user:password@host:port/database`.
    pub url: String,
    /// Connections the pool keeps open.
    pub pool_min: usize,
    /// Connections at most.
    pub pool_max: usize,
    /// Deadline for getting a connection (a new one: TCP, handshake, authentication).
    pub connect_timeout_ms: u64,
    /// Deadline of one call: a whole `apply` transaction, or one read.
    pub query_timeout_ms: u64,
    /// Prepared statements cached per connection.
    pub stmt_cache: usize,
    /// Transactions one `apply` runs at once, each on its own connection (at most
    /// `pool_max`): the batch is split by inbox and group, so that one inbox or group is only
    /// ever written by one of them.
    pub writers: usize,
    /// Ops per transaction below which a batch is not split further: a small batch runs as
    /// one transaction (fewer statements for the server to run).
    pub writer_min_ops: usize,
    /// The store's limits (dedupe window, kept messages, devices, groups, members, pages).
    pub store: StoreOptions,
}

impl std::fmt::Debug for MySqlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlOptions")
            .field("url", &crate::config::redact_url(&self.url))
            .field("pool_min", &self.pool_min)
            .field("pool_max", &self.pool_max)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("query_timeout_ms", &self.query_timeout_ms)
            .field("writers", &self.writers)
            .field("writer_min_ops", &self.writer_min_ops)
            .finish_non_exhaustive()
    }
}

/// The durable store on MySQL / MariaDB.
pub struct MySqlStore {
    pool: Pool,
    opts: MySqlOptions,
    /// The largest `now_ms` used so far: dedupe records are never dated backwards.
    last_now_ms: u64,
}

/// Server errors of a full table or disk: 1114 ER_RECORD_FILE_FULL ("The table is full",
/// also InnoDB's full tablespace) and 1021 ER_DISK_FULL.
const FULL_CODES: [u16; 2] = [1114, 1021];

fn engine(e: mysql_async::Error) -> StoreError {
    match &e {
        mysql_async::Error::Server(s) if FULL_CODES.contains(&s.code) => {
            StoreError::Full(Box::new(e))
        }
        _ => StoreError::Engine(Box::new(e)),
    }
}

/// Runs of one batch's transaction when InnoDB chose it as a deadlock victim.
const DEADLOCK_ATTEMPTS: u32 = 4;

/// A transaction that failed whole and may succeed when run again: a deadlock (1213), a lock
/// wait timeout (1205), or a duplicate key (1062): two writers that both found no counter row
/// for a new inbox or group, or no dedupe record for a new cmid, both insert it; run again,
/// the loser reads the winner's row (the next seq, or the duplicate's first ack).
fn retryable(e: &StoreError) -> bool {
    let StoreError::Engine(inner) = e else {
        return false;
    };
    matches!(
        inner.downcast_ref::<mysql_async::Error>(),
        Some(mysql_async::Error::Server(s)) if matches!(s.code, 1213 | 1205 | 1062)
    )
}

/// A (tenant, name) pair: a user's inbox or a group.
type Owner = (Str, Str);
/// (tenant, owner, name): a device cursor (user, device) or a membership (group, member).
type Triple = (Str, Str, Str);
/// (tenant, sender, cmid, dest kind, dest).
type DedupeKey = (Str, Str, Str, u8, Str);

/// A row of `dedupe` as read.
type DedupeSqlRow = (Vec<u8>, Vec<u8>, Vec<u8>, u8, Vec<u8>, u64, u64, u64, u64);
/// Three ids and a number: a `device_cursor` or `group_member` row as read.
type TripleSqlRow = (Vec<u8>, Vec<u8>, Vec<u8>, u64);

const DEST_INBOX: u8 = 0;
const DEST_GROUP: u8 = 1;

#[derive(Clone, Copy, Debug, Default)]
struct Head {
    last: u64,
    /// Groups only: the member count.
    members: u64,
    dirty: bool,
}

/// A batch in memory: what was read under lock, and the writes it will commit.
#[derive(Default)]
struct Tx {
    inbox_heads: HashMap<Owner, Head>,
    group_heads: HashMap<Owner, Head>,
    /// Device cursors: `None` = no row (deleted by this batch).
    cursors: HashMap<Triple, Option<u64>>,
    cursors_dirty: HashSet<Triple>,
    /// Users whose every cursor was read into `cursors` (every user with a cursor op).
    cursors_loaded: HashSet<Owner>,
    /// Memberships and their group cursors: `None` = not a member.
    members: HashMap<Triple, Option<u64>>,
    members_dirty: HashSet<Triple>,
    /// (tenant, member) whose every membership was read into `members` (every joining member).
    groups_loaded: HashSet<Owner>,
    /// Dedupe records: `None` = no row.
    dedupe: HashMap<DedupeKey, Option<DedupeRecord>>,
    /// Keys that had a row when the batch read them (an expired one is overwritten).
    dedupe_in_db: HashSet<DedupeKey>,
    /// Keys this batch writes, in order.
    dedupe_written: HashSet<DedupeKey>,
    dedupe_order: Vec<DedupeKey>,
    inbox_rows: Vec<(Owner, u64, Vec<u8>)>,
    inbox_trim: Vec<(Owner, u64)>,
    timeline_rows: Vec<(Owner, u64, Vec<u8>)>,
    timeline_trim: Vec<(Owner, u64)>,
}

fn ids_fit(ids: &[&str]) -> bool {
    ids.iter().all(|s| s.len() <= MYSQL_MAX_ID_BYTES)
}

fn b(s: &str) -> Value {
    Value::Bytes(s.as_bytes().to_vec())
}

fn to_str(v: Vec<u8>, table: &'static str) -> Result<Str, StoreError> {
    String::from_utf8(v)
        .map(Str::from)
        .map_err(|_| StoreError::Corrupt {
            table,
            detail: "id is not UTF-8".into(),
        })
}

/// `(?,?,...)` of `cols` placeholders, `rows` times, comma-separated.
fn placeholders(rows: usize, cols: usize) -> String {
    let mut one = String::from("(");
    for i in 0..cols {
        one.push_str(if i == 0 { "?" } else { ",?" });
    }
    one.push(')');
    let mut s = String::with_capacity(rows * (one.len() + 1));
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&one);
    }
    s
}

/// Splits `sql` into statements: `;` at the end of a line ends one; `--` lines are comments.
fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("--") {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if t.ends_with(';') {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

impl MySqlStore {
    /// Connects, applies the migrations not yet applied and returns the store. Must run on a
    /// tokio runtime with I/O and time enabled (the pool lives on it).
    pub async fn connect(opts: MySqlOptions) -> Result<MySqlStore, StoreError> {
        let parsed = Opts::from_url(&opts.url).map_err(|e| StoreError::Config(e.to_string()))?;
        // The lanes' connections stay open: a batch that splits does not wait for new ones.
        let max = opts.pool_max.max(1);
        let min = opts.pool_min.max(opts.writers).min(max);
        let constraints = PoolConstraints::new(min.min(max), max).ok_or_else(|| {
            StoreError::Config(format!("mysql pool sizes: min {min} > max {max}"))
        })?;
        let pool_opts = PoolOpts::default()
            .with_constraints(constraints)
            // Every transaction ends with COMMIT or ROLLBACK and no session state is changed,
            // so a returned connection needs no reset (which would drop its prepared
            // statements).
            .with_reset_connection(false);
        let builder = OptsBuilder::from_opts(parsed)
            .pool_opts(pool_opts)
            // No gap locks: the lanes of a batch (and other nodes) lock only the rows they
            // read; two writers that both find a row absent and insert it collide on the
            // primary key instead, and the loser runs again (`retryable`). Joins keep
            // REPEATABLE READ (`apply_inner`).
            .setup(vec![
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            ])
            .stmt_cache_size(opts.stmt_cache);
        let pool = Pool::new(builder);
        let mut store = MySqlStore {
            pool,
            opts,
            last_now_ms: 0,
        };
        let t = store.opts.query_timeout_ms.max(1) * (MIGRATIONS.len() as u64 + 1);
        match tokio::time::timeout(Duration::from_millis(t), store.migrate()).await {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::Timeout { ms: t }),
        }
        Ok(store)
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &MySqlOptions {
        &self.opts
    }

    /// Closes the pool's connections.
    pub async fn disconnect(self) {
        let _ = self.pool.disconnect().await;
    }

    async fn conn(&self) -> Result<mysql_async::Conn, StoreError> {
        let ms = self.opts.connect_timeout_ms.max(1);
        match tokio::time::timeout(Duration::from_millis(ms), self.pool.get_conn()).await {
            Ok(r) => r.map_err(engine),
            Err(_) => Err(StoreError::Timeout { ms }),
        }
    }

    /// Bounds `fut` by `query_timeout_ms`.
    async fn bounded<T>(
        ms: u64,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let ms = ms.max(1);
        match tokio::time::timeout(Duration::from_millis(ms), fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout { ms }),
        }
    }

    async fn migrate(&mut self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
               version INT UNSIGNED NOT NULL PRIMARY KEY, \
               name VARCHAR(255) NOT NULL, \
               applied_at_ms BIGINT UNSIGNED NOT NULL) ENGINE = InnoDB",
        )
        .await
        .map_err(engine)?;
        // One imgw migrates at a time (several may start together against one database).
        let lock: Option<i64> = conn
            .query_first("SELECT GET_LOCK('imgw_schema_migrations', 30)")
            .await
            .map_err(engine)?;
        if lock != Some(1) {
            return Err(StoreError::Migration {
                version: 0,
                detail: "could not take the migration lock within 30 s".into(),
            });
        }
        let result = async {
            let done: Vec<u32> = conn
                .query("SELECT version FROM schema_migrations")
                .await
                .map_err(engine)?;
            for (version, name, sql) in MIGRATIONS {
                if done.contains(version) {
                    continue;
                }
                for stmt in statements(sql) {
                    conn.query_drop(stmt)
                        .await
                        .map_err(|e| StoreError::Migration {
                            version: *version,
                            detail: e.to_string(),
                        })?;
                }
                conn.exec_drop(
                    "INSERT IGNORE INTO schema_migrations (version, name, applied_at_ms) \
                     VALUES (?, ?, ?)",
                    (*version, *name, super_now_ms()),
                )
                .await
                .map_err(engine)?;
                tracing::info!(version, name, "mysql migration applied");
            }
            Ok(())
        }
        .await;
        let _ = conn
            .query_drop("DO RELEASE_LOCK('imgw_schema_migrations')")
            .await;
        result
    }

    fn page_limit(&self, limit: u32) -> usize {
        limit.clamp(1, self.opts.store.max_page.max(1)) as usize
    }

    /// One transaction over `ops`; with `collect` > 0 it also deletes up to that many expired
    /// dedupe records.
    async fn apply_inner(
        &self,
        ops: Vec<Op>,
        now_ms: u64,
        collect: u64,
    ) -> Result<Vec<OpResult>, StoreError> {
        let mut opts = TxOpts::default();
        if ops.iter().any(|o| matches!(o, Op::Join { .. })) {
            // A join counts the member's groups and may create the group's counter row: the
            // gap locks of REPEATABLE READ make a concurrent join of the same member, or to
            // the same new group, wait instead of exceeding a limit or losing a count.
            opts.with_isolation_level(IsolationLevel::RepeatableRead);
        }
        let mut sql = self.pool.start_transaction(opts).await.map_err(engine)?;
        let mut tx = Tx::default();
        prefetch(
            &mut sql,
            &mut tx,
            &ops,
            self.opts.store.dedupe_window_ms > 0,
        )
        .await?;
        let mut results = Vec::with_capacity(ops.len());
        let limits = self.opts.store.limits();
        for op in ops {
            results.push(rules::apply_op(&mut tx, &limits, op, now_ms)?);
        }
        let mut script = Vec::new();
        write(&mut script, &mut tx)?;
        let window = self.opts.store.dedupe_window_ms;
        if window > 0 && now_ms > window && collect > 0 {
            script.push(format!(
                "DELETE FROM dedupe WHERE stored_at <= {} ORDER BY stored_at LIMIT {collect}",
                now_ms - window
            ));
        }
        for packet in packets(&script) {
            sql.query_drop(packet).await.map_err(engine)?;
        }
        sql.commit().await.map_err(engine)?;
        Ok(results)
    }

    /// One lane's transaction, run again when InnoDB picked it as a deadlock victim, a lock
    /// wait timed out, or it raced another writer to insert one new row.
    async fn run_lane(
        &self,
        ops: Vec<Op>,
        now_ms: u64,
        collect: u64,
    ) -> Result<Vec<OpResult>, StoreError> {
        let mut attempt = 1;
        loop {
            // Several writers (lanes, cluster nodes) can deadlock on the rows they lock, or
            // race to insert one new row; the loser's transaction is rolled back whole and run
            // again.
            match self.apply_inner(ops.clone(), now_ms, collect).await {
                Err(e) if attempt < DEADLOCK_ATTEMPTS && retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "transaction retried");
                    // Apart in time from the other victim, which retries too: up to 4 ms times
                    // the attempt, from the clock's nanoseconds.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos());
                    let us = u64::from(nanos % 4_000) * u64::from(attempt);
                    tokio::time::sleep(Duration::from_micros(us)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

fn super_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A read the prefetch did not cover: a bug in [`prefetch`], reported as a failed batch.
fn not_prefetched(what: &str) -> StoreError {
    StoreError::Corrupt {
        table: "batch",
        detail: format!("{what} was not prefetched"),
    }
}

fn owner_of(log: Log<'_>) -> (bool, Owner) {
    match log {
        Log::Inbox(u) => (false, (u.tenant.clone(), u.user.clone())),
        Log::Group(g) => (true, (g.tenant.clone(), g.group.clone())),
    }
}

fn dedupe_key(key: RuleDedupeKey<'_>) -> DedupeKey {
    let (group, (tenant, dest)) = owner_of(key.log);
    let kind = if group { DEST_GROUP } else { DEST_INBOX };
    (
        tenant,
        Str::from(key.sender),
        Str::from(key.cmid),
        kind,
        dest,
    )
}

fn triple(tenant: &str, owner: &str, name: &str) -> Triple {
    (Str::from(tenant), Str::from(owner), Str::from(name))
}

/// The rules' view of the batch: the rows [`prefetch`] read, and the batch's writes over them.
impl StoreTx for Tx {
    fn max_id_bytes(&self) -> usize {
        MYSQL_MAX_ID_BYTES
    }

    fn last_seq(&mut self, log: Log<'_>) -> Result<u64, StoreError> {
        let (group, owner) = owner_of(log);
        let heads = if group {
            &self.group_heads
        } else {
            &self.inbox_heads
        };
        // No head row: nothing appended yet (every head the batch names was read).
        Ok(heads.get(&owner).map_or(0, |h| h.last))
    }

    fn set_last_seq(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError> {
        let (group, owner) = owner_of(log);
        let heads = if group {
            &mut self.group_heads
        } else {
            &mut self.inbox_heads
        };
        let head = heads.entry(owner).or_default();
        head.last = seq;
        head.dirty = true;
        Ok(())
    }

    fn put_message(&mut self, log: Log<'_>, seq: u64, msg: Vec<u8>) -> Result<(), StoreError> {
        match owner_of(log) {
            (true, owner) => self.timeline_rows.push((owner, seq, msg)),
            (false, owner) => self.inbox_rows.push((owner, seq, msg)),
        }
        Ok(())
    }

    fn trim_message(&mut self, log: Log<'_>, seq: u64) -> Result<(), StoreError> {
        match owner_of(log) {
            (true, owner) => self.timeline_trim.push((owner, seq)),
            (false, owner) => self.inbox_trim.push((owner, seq)),
        }
        Ok(())
    }

    fn dedupe(
        &mut self,
        key: RuleDedupeKey<'_>,
        _expired_before_ms: u64,
    ) -> Result<Option<DedupeRecord>, StoreError> {
        match self.dedupe.get(&dedupe_key(key)) {
            Some(rec) => Ok(*rec),
            None => Err(not_prefetched("a dedupe record")),
        }
    }

    fn put_dedupe(&mut self, key: RuleDedupeKey<'_>, rec: DedupeRecord) -> Result<(), StoreError> {
        let key = dedupe_key(key);
        if self.dedupe_written.insert(key.clone()) {
            self.dedupe_order.push(key.clone());
        }
        self.dedupe.insert(key, Some(rec));
        Ok(())
    }

    fn cursor(&mut self, user: &UserRef, device: &str) -> Result<Option<u64>, StoreError> {
        match self.cursors.get(&triple(&user.tenant, &user.user, device)) {
            Some(c) => Ok(*c),
            None if self
                .cursors_loaded
                .contains(&(user.tenant.clone(), user.user.clone())) =>
            {
                Ok(None)
            }
            None => Err(not_prefetched("a device cursor")),
        }
    }

    fn cursors(&mut self, user: &UserRef) -> Result<Vec<(Str, u64)>, StoreError> {
        if !self
            .cursors_loaded
            .contains(&(user.tenant.clone(), user.user.clone()))
        {
            return Err(not_prefetched("a user's cursors"));
        }
        Ok(self
            .cursors
            .iter()
            .filter(|((t, u, _), _)| *t == user.tenant && *u == user.user)
            .filter_map(|((_, _, d), c)| c.map(|c| (d.clone(), c)))
            .collect())
    }

    fn put_cursor(&mut self, user: &UserRef, device: &str, seq: u64) -> Result<(), StoreError> {
        let key = triple(&user.tenant, &user.user, device);
        self.cursors.insert(key.clone(), Some(seq));
        self.cursors_dirty.insert(key);
        Ok(())
    }

    fn delete_cursor(&mut self, user: &UserRef, device: &str) -> Result<(), StoreError> {
        let key = triple(&user.tenant, &user.user, device);
        self.cursors.insert(key.clone(), None);
        self.cursors_dirty.insert(key);
        Ok(())
    }

    fn member_cursor(&mut self, group: &GroupRef, member: &str) -> Result<Option<u64>, StoreError> {
        match self
            .members
            .get(&triple(&group.tenant, &group.group, member))
        {
            Some(c) => Ok(*c),
            None if self
                .groups_loaded
                .contains(&(group.tenant.clone(), Str::from(member))) =>
            {
                Ok(None)
            }
            None => Err(not_prefetched("a membership")),
        }
    }

    fn group_size(&mut self, group: &GroupRef) -> Result<u64, StoreError> {
        let owner = (group.tenant.clone(), group.group.clone());
        Ok(self.group_heads.get(&owner).map_or(0, |h| h.members))
    }

    fn set_group_size(&mut self, group: &GroupRef, members: u64) -> Result<(), StoreError> {
        let owner = (group.tenant.clone(), group.group.clone());
        let head = self.group_heads.entry(owner).or_default();
        head.members = members;
        head.dirty = true;
        Ok(())
    }

    fn user_group_count(&mut self, tenant: &str, member: &str) -> Result<u64, StoreError> {
        if !self
            .groups_loaded
            .contains(&(Str::from(tenant), Str::from(member)))
        {
            return Err(not_prefetched("a member's groups"));
        }
        Ok(self
            .members
            .iter()
            .filter(|((t, _, m), c)| &**t == tenant && &**m == member && c.is_some())
            .count() as u64)
    }

    fn put_member(&mut self, group: &GroupRef, member: &str, gseq: u64) -> Result<(), StoreError> {
        self.set_member_cursor(group, member, gseq)
    }

    fn set_member_cursor(
        &mut self,
        group: &GroupRef,
        member: &str,
        gseq: u64,
    ) -> Result<(), StoreError> {
        let key = triple(&group.tenant, &group.group, member);
        self.members.insert(key.clone(), Some(gseq));
        self.members_dirty.insert(key);
        Ok(())
    }

    fn delete_member(&mut self, group: &GroupRef, member: &str) -> Result<(), StoreError> {
        let key = triple(&group.tenant, &group.group, member);
        self.members.insert(key.clone(), None);
        self.members_dirty.insert(key);
        Ok(())
    }
}

/// Reads, under lock, every counter row, dedupe record, cursor and membership the batch's
/// rules will read ([`rules`]), in a few multi-row `SELECT ... FOR UPDATE`s sent as one query.
/// Absent rows are recorded as such. For a user with a cursor op that is every cursor of the
/// user (a new device may evict another: at most `max_devices_per_user` rows), for a joining
/// member every membership of the member (the groups limit: at most `max_groups_per_user`),
/// so the rules never need a second round trip.
async fn prefetch(
    sql: &mut mysql_async::Transaction<'static>,
    tx: &mut Tx,
    ops: &[Op],
    dedupe: bool,
) -> Result<(), StoreError> {
    let mut users: HashSet<Owner> = HashSet::new();
    let mut groups: HashSet<Owner> = HashSet::new();
    let mut dkeys: HashSet<DedupeKey> = HashSet::new();
    let mut cursor_users: HashSet<Owner> = HashSet::new();
    let mut members: HashSet<Triple> = HashSet::new();
    let mut joiners: HashSet<Owner> = HashSet::new();
    for op in ops {
        match op {
            Op::AppendInbox {
                user, sender, cmid, ..
            } if ids_fit(&[&user.tenant, &user.user, sender, cmid]) => {
                users.insert((user.tenant.clone(), user.user.clone()));
                if dedupe {
                    dkeys.insert((
                        user.tenant.clone(),
                        sender.clone(),
                        cmid.clone(),
                        DEST_INBOX,
                        user.user.clone(),
                    ));
                }
            }
            Op::AppendGroup {
                group,
                sender,
                cmid,
                ..
            } if ids_fit(&[&group.tenant, &group.group, sender, cmid]) => {
                groups.insert((group.tenant.clone(), group.group.clone()));
                if dedupe {
                    dkeys.insert((
                        group.tenant.clone(),
                        sender.clone(),
                        cmid.clone(),
                        DEST_GROUP,
                        group.group.clone(),
                    ));
                }
            }
            Op::SetCursor { user, device, .. } if ids_fit(&[&user.tenant, &user.user, device]) => {
                users.insert((user.tenant.clone(), user.user.clone()));
                cursor_users.insert((user.tenant.clone(), user.user.clone()));
            }
            Op::Join { group, member } if ids_fit(&[&group.tenant, &group.group, member]) => {
                groups.insert((group.tenant.clone(), group.group.clone()));
                joiners.insert((group.tenant.clone(), member.clone()));
            }
            Op::SetGroupCursor { group, member, .. } | Op::Leave { group, member }
                if ids_fit(&[&group.tenant, &group.group, member]) =>
            {
                groups.insert((group.tenant.clone(), group.group.clone()));
                members.insert((group.tenant.clone(), group.group.clone(), member.clone()));
            }
            _ => {}
        }
    }
    // Sorted, so that concurrent writers lock rows in one order (no deadlock between them).
    let mut users: Vec<Owner> = users.into_iter().collect();
    users.sort();
    let mut groups: Vec<Owner> = groups.into_iter().collect();
    groups.sort();
    // A joiner's memberships hold the named one.
    let mut members: Vec<Triple> = members
        .into_iter()
        .filter(|(t, _, m)| !joiners.contains(&(t.clone(), m.clone())))
        .collect();
    members.sort();
    let mut cursor_users: Vec<Owner> = cursor_users.into_iter().collect();
    cursor_users.sort();
    let mut joiners: Vec<Owner> = joiners.into_iter().collect();
    joiners.sort();
    let dkeys: Vec<DedupeKey> = dkeys.into_iter().collect();
    // Every read of the batch, in one multi-statement query (one round trip) unless they are
    // very large: each statement with what its result set fills.
    let mut reads: Vec<(String, Read)> = Vec::new();
    for chunk in users.chunks(ROWS_PER_STATEMENT) {
        let q = format!(
            "SELECT tenant, user_id, last_seq FROM inbox_head WHERE (tenant, user_id) IN ({}) \
             FOR UPDATE",
            placeholders(chunk.len(), 2)
        );
        let params: Vec<Value> = chunk.iter().flat_map(|(t, u)| [b(t), b(u)]).collect();
        reads.push((inline(&q, &params)?, Read::InboxHeads));
    }
    for chunk in groups.chunks(ROWS_PER_STATEMENT) {
        let q = format!(
            "SELECT tenant, group_id, last_gseq, members FROM group_head \
             WHERE (tenant, group_id) IN ({}) FOR UPDATE",
            placeholders(chunk.len(), 2)
        );
        let params: Vec<Value> = chunk.iter().flat_map(|(t, g)| [b(t), b(g)]).collect();
        reads.push((inline(&q, &params)?, Read::GroupHeads));
    }
    for chunk in dkeys.chunks(ROWS_PER_STATEMENT) {
        let q = format!(
            "SELECT tenant, sender, cmid, dest_kind, dest, seq, mid, ts, stored_at FROM dedupe \
             WHERE (tenant, sender, cmid, dest_kind, dest) IN ({}) FOR UPDATE",
            placeholders(chunk.len(), 5)
        );
        let params: Vec<Value> = chunk
            .iter()
            .flat_map(|(t, s, c, k, d)| [b(t), b(s), b(c), Value::from(*k), b(d)])
            .collect();
        reads.push((inline(&q, &params)?, Read::Dedupe(chunk.to_vec())));
    }
    for chunk in members.chunks(ROWS_PER_STATEMENT) {
        let q = format!(
            "SELECT tenant, group_id, member_id, cursor_gseq FROM group_member \
             WHERE (tenant, group_id, member_id) IN ({}) FOR UPDATE",
            placeholders(chunk.len(), 3)
        );
        reads.push((
            inline(&q, &triple_params(chunk))?,
            Read::Members(chunk.to_vec()),
        ));
    }
    // Whole sets of rows by owner: every cursor of a user, every membership of a member.
    type OwnerRead = (Vec<Owner>, &'static str, fn(Vec<Owner>) -> Read);
    let owned: [OwnerRead; 2] = [
        (
            cursor_users,
            "SELECT tenant, user_id, device_id, seq FROM device_cursor \
             WHERE (tenant, user_id)",
            Read::UserCursors,
        ),
        (
            joiners,
            "SELECT tenant, group_id, member_id, cursor_gseq FROM group_member \
             WHERE (tenant, member_id)",
            Read::Memberships,
        ),
    ];
    for (keys, select, read) in owned {
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let q = format!("{select} IN ({}) FOR UPDATE", placeholders(chunk.len(), 2));
            let params: Vec<Value> = chunk.iter().flat_map(|(t, o)| [b(t), b(o)]).collect();
            reads.push((inline(&q, &params)?, read(chunk.to_vec())));
        }
    }
    let texts: Vec<String> = reads.iter().map(|(q, _)| q.clone()).collect();
    let mut reads = reads.into_iter().map(|(_, r)| r);
    for packet in packets(&texts) {
        let mut result = sql.query_iter(packet).await.map_err(engine)?;
        while !result.is_empty() {
            let rows: Vec<mysql_async::Row> = result.collect().await.map_err(engine)?;
            let Some(read) = reads.next() else {
                return Err(StoreError::Corrupt {
                    table: "batch",
                    detail: "more result sets than reads".into(),
                });
            };
            fill(tx, read, rows)?;
        }
    }
    if reads.next().is_some() {
        return Err(StoreError::Corrupt {
            table: "batch",
            detail: "fewer result sets than reads".into(),
        });
    }
    Ok(())
}

/// What one locking read of [`prefetch`] fills in a [`Tx`]; the keys are those the read named
/// (absent rows are recorded as `None`).
enum Read {
    InboxHeads,
    GroupHeads,
    Dedupe(Vec<DedupeKey>),
    /// Every cursor of these users.
    UserCursors(Vec<Owner>),
    /// These memberships (group, member).
    Members(Vec<Triple>),
    /// Every membership of these (tenant, member).
    Memberships(Vec<Owner>),
}

fn typed<T: mysql_async::prelude::FromRow>(
    row: mysql_async::Row,
    table: &'static str,
) -> Result<T, StoreError> {
    mysql_async::from_row_opt(row).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

fn triple_params(keys: &[Triple]) -> Vec<Value> {
    keys.iter()
        .flat_map(|(x, y, z)| [b(x), b(y), b(z)])
        .collect()
}

/// Records the rows of one read in `tx`.
fn fill(tx: &mut Tx, read: Read, rows: Vec<mysql_async::Row>) -> Result<(), StoreError> {
    match read {
        Read::InboxHeads => {
            for row in rows {
                let (t, u, last): (Vec<u8>, Vec<u8>, u64) = typed(row, "inbox_head")?;
                let key = (to_str(t, "inbox_head")?, to_str(u, "inbox_head")?);
                let head = Head {
                    last,
                    members: 0,
                    dirty: false,
                };
                tx.inbox_heads.insert(key, head);
            }
        }
        Read::GroupHeads => {
            for row in rows {
                let (t, g, last, members): (Vec<u8>, Vec<u8>, u64, u64) = typed(row, "group_head")?;
                let key = (to_str(t, "group_head")?, to_str(g, "group_head")?);
                let head = Head {
                    last,
                    members,
                    dirty: false,
                };
                tx.group_heads.insert(key, head);
            }
        }
        Read::Dedupe(keys) => {
            for row in rows {
                let (t, s, c, k, d, seq, mid, ts, stored_at): DedupeSqlRow = typed(row, "dedupe")?;
                let key = (
                    to_str(t, "dedupe")?,
                    to_str(s, "dedupe")?,
                    to_str(c, "dedupe")?,
                    k,
                    to_str(d, "dedupe")?,
                );
                tx.dedupe_in_db.insert(key.clone());
                let rec = DedupeRecord {
                    seq,
                    mid,
                    ts,
                    stored_at_ms: stored_at,
                };
                tx.dedupe.insert(key, Some(rec));
            }
            for key in keys {
                tx.dedupe.entry(key).or_insert(None);
            }
        }
        Read::UserCursors(users) => {
            fill_triples(&mut tx.cursors, Vec::new(), rows, "device_cursor")?;
            tx.cursors_loaded.extend(users);
        }
        Read::Members(keys) => fill_triples(&mut tx.members, keys, rows, "group_member")?,
        Read::Memberships(who) => {
            fill_triples(&mut tx.members, Vec::new(), rows, "group_member")?;
            tx.groups_loaded.extend(who);
        }
    }
    Ok(())
}

/// Records `device_cursor` or `group_member` rows (three ids and a number) in `out`, and the
/// keys read without a row as `None`.
fn fill_triples(
    out: &mut HashMap<Triple, Option<u64>>,
    keys: Vec<Triple>,
    rows: Vec<mysql_async::Row>,
    table: &'static str,
) -> Result<(), StoreError> {
    for row in rows {
        let (x, y, z, v): TripleSqlRow = typed(row, table)?;
        let key = (to_str(x, table)?, to_str(y, table)?, to_str(z, table)?);
        out.insert(key, Some(v));
    }
    for key in keys {
        out.entry(key).or_insert(None);
    }
    Ok(())
}

/// `head VALUES (..),(..) tail` over `rows` of `cols` values each: one statement per at most
/// [`ROWS_PER_STATEMENT`] rows and about [`BYTES_PER_STATEMENT`] bytes of values (at least one
/// row), so that no statement nears the server's `max_allowed_packet`.
fn insert_rows(
    script: &mut Vec<String>,
    head: &str,
    tail: &str,
    cols: usize,
    rows: Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < rows.len() && end - start < ROWS_PER_STATEMENT {
            let row_bytes: usize = rows[end].iter().map(value_len).sum();
            if end > start && bytes + row_bytes > BYTES_PER_STATEMENT {
                break;
            }
            bytes += row_bytes;
            end += 1;
        }
        let chunk = &rows[start..end];
        let mut q = String::with_capacity(head.len() + tail.len() + chunk.len() * cols * 2 + 8);
        let _ = write!(q, "{head} VALUES {}{tail}", placeholders(chunk.len(), cols));
        let params: Vec<Value> = chunk.iter().flatten().cloned().collect();
        script.push(inline(&q, &params)?);
        start = end;
    }
    Ok(())
}

/// About how many bytes `v` takes in a statement.
fn value_len(v: &Value) -> usize {
    match v {
        Value::Bytes(b) => 2 * b.len() + 3,
        _ => 20,
    }
}

/// `q` with each `?` replaced by the SQL literal of the next of `params`: the batch's
/// statements differ in their row counts, so they go as text (one round trip) rather than as
/// prepared statements (prepare, execute, and a cache that would rarely hit). Ids and messages
/// become hex literals (`X'..'`) and numbers decimal digits, so no value can change the
/// statement. The templates hold no `?` other than the placeholders.
fn inline(q: &str, params: &[Value]) -> Result<String, StoreError> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let extra: usize = params.iter().map(value_len).sum();
    let mut out = String::with_capacity(q.len() + extra);
    let mut values = params.iter();
    for ch in q.chars() {
        if ch != '?' {
            out.push(ch);
            continue;
        }
        match values.next() {
            Some(Value::Bytes(b)) if b.is_empty() => out.push_str("''"),
            Some(Value::Bytes(b)) => {
                out.push_str("X'");
                for byte in b {
                    out.push(char::from(HEX[usize::from(byte >> 4)]));
                    out.push(char::from(HEX[usize::from(byte & 0xf)]));
                }
                out.push('\'');
            }
            Some(Value::UInt(n)) => {
                let _ = write!(out, "{n}");
            }
            Some(Value::Int(n)) => {
                let _ = write!(out, "{n}");
            }
            other => {
                return Err(StoreError::Config(format!(
                    "internal: no SQL literal for {other:?}"
                )))
            }
        }
    }
    if values.next().is_some() {
        return Err(StoreError::Config(
            "internal: more values than placeholders".into(),
        ));
    }
    Ok(out)
}

/// The statements of `script` joined into multi-statement queries of at most about
/// [`PACKET_BYTES`] each (at least one statement per query): one round trip per query instead
/// of one per statement. The server stops a query at its first failing statement and the
/// error fails the transaction.
fn packets(script: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for stmt in script {
        if !cur.is_empty() && cur.len() + stmt.len() + 1 > PACKET_BYTES {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(';');
        }
        cur.push_str(stmt);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `DELETE FROM table WHERE (cols) IN (...)`, in chunks.
/// Writes the `dirty` rows of `table` (three key columns `keys`, one value column `value`): a
/// key whose value in `values` is `None` is deleted, the others are upserted.
fn write_triples(
    script: &mut Vec<String>,
    dirty: HashSet<Triple>,
    values: &HashMap<Triple, Option<u64>>,
    table: &str,
    keys: &str,
    value: &str,
) -> Result<(), StoreError> {
    let (mut up, mut del) = (Vec::new(), Vec::new());
    for key in dirty {
        let (x, y, z) = &key;
        match values.get(&key).copied().flatten() {
            Some(v) => up.push(vec![b(x), b(y), b(z), Value::from(v)]),
            None => del.push(vec![b(x), b(y), b(z)]),
        }
    }
    delete_rows(script, table, keys, 3, del)?;
    insert_rows(
        script,
        &format!("INSERT INTO {table} ({keys}, {value})"),
        // Cursors only move forward, whoever wrote the row last (another node's batch).
        &format!(" ON DUPLICATE KEY UPDATE {value} = GREATEST({value}, VALUES({value}))"),
        4,
        up,
    )
}

fn delete_rows(
    script: &mut Vec<String>,
    table: &str,
    cols: &str,
    ncols: usize,
    rows: Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let q = format!(
            "DELETE FROM {table} WHERE ({cols}) IN ({})",
            placeholders(chunk.len(), ncols)
        );
        let params: Vec<Value> = chunk.iter().flatten().cloned().collect();
        script.push(inline(&q, &params)?);
    }
    Ok(())
}

/// The batch's writes: multi-row statements, one per table and kind of change, appended to
/// `script`.
fn write(script: &mut Vec<String>, tx: &mut Tx) -> Result<(), StoreError> {
    let msg_row = |((t, o), seq, v): (Owner, u64, Vec<u8>)| {
        vec![b(&t), b(&o), Value::from(seq), Value::Bytes(v)]
    };
    let trim_row = |((t, o), seq): (Owner, u64)| vec![b(&t), b(&o), Value::from(seq)];
    let rows: Vec<_> = std::mem::take(&mut tx.inbox_rows)
        .into_iter()
        .map(msg_row)
        .collect();
    insert_rows(
        script,
        "INSERT INTO inbox (tenant, user_id, seq, msg)",
        "",
        4,
        rows,
    )?;
    let rows: Vec<_> = std::mem::take(&mut tx.inbox_trim)
        .into_iter()
        .map(trim_row)
        .collect();
    delete_rows(script, "inbox", "tenant, user_id, seq", 3, rows)?;
    let rows: Vec<_> = std::mem::take(&mut tx.timeline_rows)
        .into_iter()
        .map(msg_row)
        .collect();
    insert_rows(
        script,
        "INSERT INTO timeline (tenant, group_id, gseq, msg)",
        "",
        4,
        rows,
    )?;
    let rows: Vec<_> = std::mem::take(&mut tx.timeline_trim)
        .into_iter()
        .map(trim_row)
        .collect();
    delete_rows(script, "timeline", "tenant, group_id, gseq", 3, rows)?;

    let rows: Vec<_> = tx
        .inbox_heads
        .iter()
        .filter(|(_, h)| h.dirty)
        .map(|((t, u), h)| vec![b(t), b(u), Value::from(h.last)])
        .collect();
    insert_rows(
        script,
        "INSERT INTO inbox_head (tenant, user_id, last_seq)",
        " ON DUPLICATE KEY UPDATE last_seq = VALUES(last_seq)",
        3,
        rows,
    )?;
    let rows: Vec<_> = tx
        .group_heads
        .iter()
        .filter(|(_, h)| h.dirty)
        .map(|((t, g), h)| vec![b(t), b(g), Value::from(h.last), Value::from(h.members)])
        .collect();
    insert_rows(
        script,
        "INSERT INTO group_head (tenant, group_id, last_gseq, members)",
        " ON DUPLICATE KEY UPDATE last_gseq = VALUES(last_gseq), members = VALUES(members)",
        4,
        rows,
    )?;

    let dirty = std::mem::take(&mut tx.cursors_dirty);
    write_triples(
        script,
        dirty,
        &tx.cursors,
        "device_cursor",
        "tenant, user_id, device_id",
        "seq",
    )?;
    let dirty = std::mem::take(&mut tx.members_dirty);
    write_triples(
        script,
        dirty,
        &tx.members,
        "group_member",
        "tenant, group_id, member_id",
        "cursor_gseq",
    )?;

    let dedupe_row = |tx: &Tx, key: &DedupeKey| {
        let rec = tx
            .dedupe
            .get(key)
            .copied()
            .flatten()
            .unwrap_or(DedupeRecord {
                seq: 0,
                mid: 0,
                ts: 0,
                stored_at_ms: 0,
            });
        let (t, s, c, k, d) = key;
        vec![
            b(t),
            b(s),
            b(c),
            Value::from(*k),
            b(d),
            Value::from(rec.seq),
            Value::from(rec.mid),
            Value::from(rec.ts),
            Value::from(rec.stored_at_ms),
        ]
    };
    let cols =
        "INSERT INTO dedupe (tenant, sender, cmid, dest_kind, dest, seq, mid, ts, stored_at)";
    let (renewed, new): (Vec<&DedupeKey>, Vec<&DedupeKey>) = tx
        .dedupe_order
        .iter()
        .partition(|k| tx.dedupe_in_db.contains(*k));
    let rows: Vec<_> = new.into_iter().map(|k| dedupe_row(tx, k)).collect();
    // A plain INSERT: a concurrent writer that stored the same key first makes this batch
    // fail (and roll back) instead of appending the message twice.
    insert_rows(script, cols, "", 9, rows)?;
    let rows: Vec<_> = renewed.into_iter().map(|k| dedupe_row(tx, k)).collect();
    insert_rows(
        script,
        cols,
        " ON DUPLICATE KEY UPDATE seq = VALUES(seq), mid = VALUES(mid), ts = VALUES(ts), \
         stored_at = VALUES(stored_at)",
        9,
        rows,
    )?;
    Ok(())
}

/// Splits a batch into at most `writers` lanes by the inbox or group each op writes (ops of
/// one inbox or group keep their order in one lane), each with the ops' positions in the batch.
/// A join counts the member's groups, which other lanes may be changing: a batch with a join
/// or a leave keeps all its group ops in one lane, so they see each other in batch order as in
/// one transaction (batches without one, nearly all of them, spread their groups).
fn split_lanes(ops: Vec<Op>, writers: usize) -> Vec<(Vec<usize>, Vec<Op>)> {
    use std::hash::{Hash, Hasher};
    let writers = writers.max(1);
    if writers == 1 {
        return vec![((0..ops.len()).collect(), ops)];
    }
    let memberships = ops
        .iter()
        .any(|o| matches!(o, Op::Join { .. } | Op::Leave { .. }));
    let mut lanes: Vec<(Vec<usize>, Vec<Op>)> = (0..writers).map(|_| Default::default()).collect();
    for (i, op) in ops.into_iter().enumerate() {
        let mut h = std::hash::DefaultHasher::new();
        match &op {
            Op::AppendInbox { user, .. } | Op::SetCursor { user, .. } => {
                (DEST_INBOX, &user.tenant, &user.user).hash(&mut h)
            }
            Op::AppendGroup { .. }
            | Op::SetGroupCursor { .. }
            | Op::Join { .. }
            | Op::Leave { .. }
                if memberships =>
            {
                DEST_GROUP.hash(&mut h)
            }
            Op::AppendGroup { group, .. }
            | Op::SetGroupCursor { group, .. }
            | Op::Join { group, .. }
            | Op::Leave { group, .. } => (DEST_GROUP, &group.tenant, &group.group).hash(&mut h),
        }
        let lane = (h.finish() % writers as u64) as usize;
        if let Some(l) = lanes.get_mut(lane) {
            l.0.push(i);
            l.1.push(op);
        }
    }
    lanes.retain(|l| !l.1.is_empty());
    lanes
}

impl Backend for MySqlStore {
    fn apply(&mut self, ops: Vec<Op>, now_ms: u64) -> StoreFuture<'_, Vec<OpResult>> {
        Box::pin(async move {
            if ops.is_empty() {
                return Ok(Vec::new());
            }
            let now_ms = now_ms.max(self.last_now_ms);
            // Expired dedupe records, oldest first, at most 64 + 2 × appends per batch:
            // collection outpaces insertion and the work per batch is bounded. Only the first
            // lane collects, so that the lanes do not contend for the oldest rows.
            let appends = ops
                .iter()
                .filter(|o| matches!(o, Op::AppendInbox { .. } | Op::AppendGroup { .. }))
                .count() as u64;
            let mut collect = 64 + 2 * appends;
            let wanted = ops.len() / self.opts.writer_min_ops.max(1);
            let lanes = split_lanes(ops, wanted.clamp(1, self.opts.writers.max(1)));
            let total: usize = lanes.iter().map(|l| l.0.len()).sum();
            let runs = lanes.into_iter().map(|(at, ops)| {
                let lane_collect = std::mem::take(&mut collect);
                let run = self.run_lane(ops, now_ms, lane_collect);
                async move { run.await.map(|results| (at, results)) }
            });
            let ms = self.opts.query_timeout_ms;
            let done = Self::bounded(ms, async {
                let mut out = Vec::new();
                for r in futures_util::future::join_all(runs).await {
                    out.push(r?);
                }
                Ok(out)
            })
            .await?;
            // Each lane's results back in the batch's order.
            let mut results: Vec<Option<OpResult>> = (0..total).map(|_| None).collect();
            for (at, lane) in done {
                for (i, r) in at.into_iter().zip(lane) {
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Some(r);
                    }
                }
            }
            let results: Option<Vec<OpResult>> = results.into_iter().collect();
            let results = results.ok_or_else(|| StoreError::Corrupt {
                table: "batch",
                detail: "a lane returned fewer results than ops".into(),
            })?;
            self.last_now_ms = now_ms;
            Ok(results)
        })
    }

    fn read_inbox<'a>(
        &'a mut self,
        user: &'a UserRef,
        after_seq: u64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        Box::pin(async move {
            if !ids_fit(&[&user.tenant, &user.user]) {
                return Ok(InboxPage::default());
            }
            let limit = self.page_limit(limit);
            Self::bounded(self.opts.query_timeout_ms, async {
                let mut conn = self.conn().await?;
                let rows: Vec<(u64, Vec<u8>)> = conn
                    .exec(
                        "SELECT seq, msg FROM inbox WHERE tenant = ? AND user_id = ? AND seq > ? \
                         ORDER BY seq LIMIT ?",
                        (b(&user.tenant), b(&user.user), after_seq, limit as u64 + 1),
                    )
                    .await
                    .map_err(engine)?;
                let more = rows.len() > limit;
                let mut messages = Vec::with_capacity(rows.len().min(limit));
                for (seq, v) in rows.into_iter().take(limit) {
                    let mut d = super::decode_stored("inbox", Bytes::from(v))?;
                    d.inbox_seq = seq;
                    messages.push(d);
                }
                Ok(InboxPage { messages, more })
            })
            .await
        })
    }

    fn last_inbox_seq<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if !ids_fit(&[&user.tenant, &user.user]) {
                return Ok(0);
            }
            self.first_u64(
                "SELECT last_seq FROM inbox_head WHERE tenant = ? AND user_id = ?",
                vec![b(&user.tenant), b(&user.user)],
            )
            .await
        })
    }

    fn cursor<'a>(&'a mut self, user: &'a UserRef, device: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if !ids_fit(&[&user.tenant, &user.user, device]) {
                return Ok(0);
            }
            self.first_u64(
                "SELECT seq FROM device_cursor WHERE tenant = ? AND user_id = ? AND device_id = ?",
                vec![b(&user.tenant), b(&user.user), b(device)],
            )
            .await
        })
    }

    fn group_members<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after: Option<&'a str>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<Str>> {
        Box::pin(async move {
            if !ids_fit(&[&group.tenant, &group.group]) {
                return Ok(Vec::new());
            }
            let limit = self.page_limit(limit) as u64;
            let (q, params) = match after {
                Some(a) => (
                    "SELECT member_id FROM group_member WHERE tenant = ? AND group_id = ? \
                     AND member_id > ? ORDER BY member_id LIMIT ?",
                    vec![b(&group.tenant), b(&group.group), b(a), Value::from(limit)],
                ),
                None => (
                    "SELECT member_id FROM group_member WHERE tenant = ? AND group_id = ? \
                     ORDER BY member_id LIMIT ?",
                    vec![b(&group.tenant), b(&group.group), Value::from(limit)],
                ),
            };
            self.names(q, params, "group_member").await
        })
    }

    fn group_size<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if !ids_fit(&[&group.tenant, &group.group]) {
                return Ok(0);
            }
            self.first_u64(
                "SELECT members FROM group_head WHERE tenant = ? AND group_id = ?",
                vec![b(&group.tenant), b(&group.group)],
            )
            .await
        })
    }

    fn user_groups<'a>(&'a mut self, user: &'a UserRef) -> StoreFuture<'a, Vec<Str>> {
        Box::pin(async move {
            if !ids_fit(&[&user.tenant, &user.user]) {
                return Ok(Vec::new());
            }
            let max = u64::from(self.opts.store.max_groups_per_user.max(1));
            self.names(
                "SELECT group_id FROM group_member WHERE tenant = ? AND member_id = ? \
                 ORDER BY group_id LIMIT ?",
                vec![b(&user.tenant), b(&user.user), Value::from(max)],
                "group_member",
            )
            .await
        })
    }

    fn read_group<'a>(
        &'a mut self,
        group: &'a GroupRef,
        after_gseq: u64,
        limit: u32,
    ) -> StoreFuture<'a, GroupPage> {
        Box::pin(async move {
            if !ids_fit(&[&group.tenant, &group.group]) {
                return Ok(GroupPage::default());
            }
            let limit = self.page_limit(limit);
            Self::bounded(self.opts.query_timeout_ms, async {
                let mut conn = self.conn().await?;
                let rows: Vec<(u64, Vec<u8>)> = conn
                    .exec(
                        "SELECT gseq, msg FROM timeline WHERE tenant = ? AND group_id = ? \
                         AND gseq > ? ORDER BY gseq LIMIT ?",
                        (
                            b(&group.tenant),
                            b(&group.group),
                            after_gseq,
                            limit as u64 + 1,
                        ),
                    )
                    .await
                    .map_err(engine)?;
                let more = rows.len() > limit;
                let mut messages = Vec::with_capacity(rows.len().min(limit));
                for (gseq, v) in rows.into_iter().take(limit) {
                    let deliver = super::decode_stored("timeline", Bytes::from(v))?;
                    messages.push(GroupEntry { gseq, deliver });
                }
                Ok(GroupPage { messages, more })
            })
            .await
        })
    }

    fn last_group_seq<'a>(&'a mut self, group: &'a GroupRef) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if !ids_fit(&[&group.tenant, &group.group]) {
                return Ok(0);
            }
            self.first_u64(
                "SELECT last_gseq FROM group_head WHERE tenant = ? AND group_id = ?",
                vec![b(&group.tenant), b(&group.group)],
            )
            .await
        })
    }

    fn group_cursor<'a>(
        &'a mut self,
        group: &'a GroupRef,
        member: &'a str,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if !ids_fit(&[&group.tenant, &group.group, member]) {
                return Ok(0);
            }
            self.first_u64(
                "SELECT cursor_gseq FROM group_member WHERE tenant = ? AND group_id = ? \
                 AND member_id = ?",
                vec![b(&group.tenant), b(&group.group), b(member)],
            )
            .await
        })
    }
}

impl MySqlStore {
    /// The first column of the first row as a u64 (0: no row).
    async fn first_u64(&self, q: &str, params: Vec<Value>) -> Result<u64, StoreError> {
        Self::bounded(self.opts.query_timeout_ms, async {
            let mut conn = self.conn().await?;
            let v: Option<u64> = conn
                .exec_first(q, Params::Positional(params))
                .await
                .map_err(engine)?;
            Ok(v.unwrap_or(0))
        })
        .await
    }

    /// The first column of every row, as ids.
    async fn names(
        &self,
        q: &str,
        params: Vec<Value>,
        table: &'static str,
    ) -> Result<Vec<Str>, StoreError> {
        Self::bounded(self.opts.query_timeout_ms, async {
            let mut conn = self.conn().await?;
            let rows: Vec<Vec<u8>> = conn
                .exec(q, Params::Positional(params))
                .await
                .map_err(engine)?;
            rows.into_iter().map(|v| to_str(v, table)).collect()
        })
        .await
    }
}

#[cfg(test)]
#[test]
fn deadlocks_and_lock_wait_timeouts_are_retried_other_errors_are_not() {
    let server = |code| {
        StoreError::Engine(Box::new(mysql_async::Error::Server(
            mysql_async::ServerError {
                code,
                message: String::new(),
                state: String::new(),
            },
        )))
    };
    assert!(retryable(&server(1213)));
    assert!(retryable(&server(1205)));
    assert!(
        retryable(&server(1062)),
        "two writers inserting one new row"
    );
    assert!(!retryable(&server(1146)), "a missing table is no race");
    assert!(!retryable(&StoreError::Timeout { ms: 1 }));
}

#[cfg(test)]
#[test]
fn a_full_table_or_disk_is_storage_full_other_server_errors_are_not() {
    let server = |code| {
        engine(mysql_async::Error::Server(mysql_async::ServerError {
            code,
            message: String::new(),
            state: String::new(),
        }))
    };
    assert!(
        matches!(server(1114), StoreError::Full(_)),
        "the table is full"
    );
    assert!(matches!(server(1021), StoreError::Full(_)), "disk full");
    assert!(matches!(server(1213), StoreError::Engine(_)));
}

#[cfg(test)]
#[test]
fn inline_makes_hex_and_decimal_literals() {
    let q = inline(
        "INSERT INTO t VALUES (?, ?, ?), (?, ?, ?)",
        &[
            Value::Bytes(b"a'?\\".to_vec()),
            Value::UInt(7),
            Value::Bytes(Vec::new()),
            Value::Int(-1),
            Value::Bytes(vec![0, 255]),
            Value::UInt(u64::MAX),
        ],
    )
    .unwrap();
    assert_eq!(
        q,
        "INSERT INTO t VALUES (X'61273f5c', 7, ''), (-1, X'00ff', 18446744073709551615)"
    );
    assert!(inline("?", &[]).is_err(), "fewer values than placeholders");
    assert!(inline("", &[Value::UInt(1)]).is_err());
}

#[cfg(test)]
impl MySqlStore {
    /// The first column of `q`'s first row (tests count rows with it).
    pub(super) async fn count(&self, q: &str) -> Result<u64, StoreError> {
        self.first_u64(q, Vec::new()).await
    }
}

/// Test support: fresh databases on the MariaDB the tests use.
pub mod testdb {
    use mysql_async::prelude::Queryable;

    use super::{engine, StoreError};

    /// The server the tests use: `IMGW_MYSQL_URL`, by default the one `tests/services.sh start`
    /// runs.
    pub fn base_url() -> String {
        std::env::var("IMGW_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://imgw:imgw@127.0.0.1:3306/imgw".to_string())
    }

    /// `url` with its database replaced by `db`.
    pub fn with_database(url: &str, db: &str) -> String {
        let host_start = url.find("://").map_or(0, |i| i + 3);
        let (head, query) = match url.find('?') {
            Some(q) => (&url[..q], &url[q..]),
            None => (url, ""),
        };
        let base = match head[host_start..].find('/') {
            Some(i) => &head[..host_start + i],
            None => head,
        };
        format!("{base}/{db}{query}")
    }

    /// Drops and creates the database `name` (the test user may create `imgw_*` databases)
    /// and returns its URL. Fails when the server is not reachable within 10 s.
    pub fn fresh(name: &str) -> Result<String, StoreError> {
        run_on_server(&[
            format!("DROP DATABASE IF EXISTS `{}`", checked(name)?),
            format!("CREATE DATABASE `{name}`"),
        ])?;
        Ok(with_database(&base_url(), name))
    }

    /// Drops the database `name`, if it exists.
    pub fn drop_database(name: &str) -> Result<(), StoreError> {
        run_on_server(&[format!("DROP DATABASE IF EXISTS `{}`", checked(name)?)])
    }

    fn checked(name: &str) -> Result<&str, StoreError> {
        if !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') || name.len() > 64 {
            return Err(StoreError::Config(format!(
                "bad test database name {name:?}"
            )));
        }
        Ok(name)
    }

    /// Runs `statements` on one connection to the server of [`base_url`].
    fn run_on_server(statements: &[String]) -> Result<(), StoreError> {
        let url = base_url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Engine(Box::new(e)))?;
        rt.block_on(async {
            let opts =
                mysql_async::Opts::from_url(&url).map_err(|e| StoreError::Config(e.to_string()))?;
            let connect = mysql_async::Conn::new(opts);
            let mut conn = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                .await
                .map_err(|_| StoreError::Timeout { ms: 10_000 })?
                .map_err(engine)?;
            for sql in statements {
                conn.query_drop(sql).await.map_err(engine)?;
            }
            let _ = conn.disconnect().await;
            Ok(())
        })
    }
}

#[cfg(test)]
#[test]
fn lanes_keep_each_inbox_and_group_in_one_lane_in_batch_order() {
    let user = |u: &str| UserRef::new("t", u);
    let group = |g: &str| GroupRef::new("t", g);
    let mut ops = Vec::new();
    for i in 0..200u64 {
        let to = format!("u{}", i % 13);
        ops.push(Op::AppendInbox {
            user: user(&to),
            sender: "s".into(),
            cmid: format!("c{i}").into(),
            deliver: crate::protocol::Deliver {
                mid: i,
                from: "s".into(),
                to: None,
                inbox_seq: 0,
                ts: i,
                kind: None,
                body: "b".into(),
                ext: crate::protocol::Ext::new(),
            },
        });
        if i % 3 == 0 {
            ops.push(Op::SetCursor {
                user: user(&to),
                device: "d".into(),
                seq: i,
            });
        }
        if i % 5 == 0 {
            let g = format!("g{}", i % 7);
            ops.push(Op::Join {
                group: group(&g),
                member: to.clone().into(),
            });
            ops.push(Op::SetGroupCursor {
                group: group(&g),
                member: to.into(),
                gseq: i,
            });
        }
    }
    let owner = |op: &Op| match op {
        Op::AppendInbox { user, .. } | Op::SetCursor { user, .. } => format!("u:{}", user.user),
        Op::AppendGroup { .. } | Op::SetGroupCursor { .. } | Op::Join { .. } | Op::Leave { .. } => {
            "groups".to_string()
        } // the batch has joins: one lane
    };
    let n = ops.len();
    let owners: Vec<String> = ops.iter().map(owner).collect();
    let lanes = split_lanes(ops.clone(), 4);
    assert!(lanes.len() > 1 && lanes.len() <= 4, "{} lanes", lanes.len());
    let mut seen = vec![false; n];
    let mut lane_of = HashMap::new();
    for (k, (at, lane_ops)) in lanes.iter().enumerate() {
        assert_eq!(at.len(), lane_ops.len());
        assert!(at.windows(2).all(|w| w[0] < w[1]), "batch order kept");
        for (&i, op) in at.iter().zip(lane_ops) {
            assert!(!std::mem::replace(&mut seen[i], true), "op {i} twice");
            assert_eq!(owner(op), owners[i]);
            assert_eq!(
                *lane_of.entry(owners[i].clone()).or_insert(k),
                k,
                "{}",
                owners[i]
            );
        }
    }
    assert!(seen.iter().all(|s| *s), "every op in a lane");
    // One writer: the batch as it came.
    let one = split_lanes(ops.clone(), 1);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].0, (0..n).collect::<Vec<_>>());
    // Without joins and leaves the groups spread over the lanes, each group in one.
    let sends: Vec<Op> = (0..64u64)
        .map(|i| Op::SetGroupCursor {
            group: group(&format!("g{}", i % 16)),
            member: "m".into(),
            gseq: i,
        })
        .collect();
    let lanes = split_lanes(sends, 4);
    assert!(lanes.len() > 1);
    let mut lane_of = HashMap::new();
    for (k, (_, lane_ops)) in lanes.iter().enumerate() {
        for op in lane_ops {
            let Op::SetGroupCursor { group, .. } = op else {
                unreachable!()
            };
            assert_eq!(*lane_of.entry(group.group.clone()).or_insert(k), k);
        }
    }
}
