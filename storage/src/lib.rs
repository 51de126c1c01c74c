//! Durable storage for WebPods: users, pods, the stream tree and the hash-chained records.
//!
//! One interface, [`Store`], over two backends: PostgreSQL (production, any number of server
//! instances on one database) and SQLite (the embedded default, one instance). Migrations are
//! embedded and applied by [`Store::migrate`].
//!
//! This crate knows nothing about hashing or permissions; it keeps these invariants:
//! - a stream's records occupy indices `0..=head_index` with no gap: a batch is inserted in the
//!   same transaction that moves `streams.head_*`, and the primary key `(stream_id, idx)` is the
//!   last guard against a fork;
//! - [`Store::append_batch`] locks the stream's row for the whole transaction (PostgreSQL
//!   `SELECT … FOR UPDATE`; SQLite's single writer), hands the *real* head to the caller's batch
//!   builder and writes whatever it returns with one statement per batch. Two writers can
//!   therefore never extend the same head twice, whichever instance they run in;
//! - a record name never equals a child stream's name in the same stream: record batches and
//!   stream creation both check the other side while holding the parent stream's row lock.

mod accounts;
mod notify;
mod postgres;
mod sqlite;

/// Column lists shared by both backends, in the order of the row structs.
const RECORD_COLUMNS: &str = "idx, name, content, content_type, headers, size, author, ts, \
     content_hash, hash, previous_hash, deleted, purged";
const STREAM_COLUMNS: &str = "id, pod_id, parent_id, path, name, access, creator_id, created_at, \
     head_index, head_hash, head_timestamp";

use std::collections::{HashMap, HashSet};
use std::time::Duration;

pub use accounts::{IdentityRow, OAuthStateRow, RateDelta, SessionRow};
pub use notify::{CHANNEL, Notice};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Everything that can go wrong in storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database cannot be reached right now (connection refused, pool exhausted, shutdown).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database answered with an error that is not about reachability.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The stream row disappeared (deleted concurrently).
    #[error("stream {0} does not exist")]
    StreamNotFound(i64),
    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL is not one we understand.
    #[error("invalid database url: {0}")]
    InvalidUrl(String),
    /// Stored data that cannot be decoded (a bug or manual tampering).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Whether a key sent from outside (a path, a record name, a user id) can name a stored row.
/// None holds a NUL, and PostgreSQL refuses text with one (SQLSTATE 22021): looking it up is
/// finding nothing, on every backend, not a database error.
fn lookable(key: &str) -> bool {
    !key.contains('\0')
}

/// The coarse class of an [`Error`], for callers that map errors to their own transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Unavailable,
    NotFound,
    /// The database refused a value the caller sent: text with a NUL character, which
    /// PostgreSQL cannot store (SQLSTATE 22021). Nothing was written.
    Unstorable,
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::StreamNotFound(_) => ErrorKind::NotFound,
            Error::Database(_) if self.sqlstate().as_deref() == Some("22021") => {
                ErrorKind::Unstorable
            }
            _ => ErrorKind::Internal,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let lost = connection_lost(&e);
        if lost {
            postgres::connection_lost();
        }
        let unavailable = lost
            || match &e {
                E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => true,
                // 57014 = statement cancelled (statement_timeout): the database is too slow or
                // a lock is held too long right now — retryable, not our bug. The others refuse
                // a new connection: class 53 (too many connections, disk full, out of memory),
                // 55000 (the database does not accept connections now), 3D000 (no such
                // database), 28xxx (authentication failed). Only PostgreSQL's five-character
                // SQLSTATEs: SQLite's codes are numbers of at most four digits, see
                // `sqlite_unavailable`.
                E::Database(db) => db.code().is_some_and(|c| {
                    if c.len() != 5 {
                        return sqlite_unavailable(&c);
                    }
                    c == "57014"
                        || c.starts_with("53")
                        || c == "55000"
                        || c == "3D000"
                        || c.starts_with("28")
                }),
                _ => false,
            };
        if unavailable {
            Error::Unavailable(e)
        } else {
            Error::Database(e)
        }
    }
}

/// SQLite result codes (extended; the primary code is the low byte) of a database that cannot
/// write now, not of a bad request: `SQLITE_BUSY` (another process holds the write lock past
/// `busy_timeout`), `SQLITE_LOCKED`, `SQLITE_IOERR` and `SQLITE_FULL` (disk full). Clients get
/// 503 with `Retry-After`, as for PostgreSQL's class 53, and nothing was written.
fn sqlite_unavailable(code: &str) -> bool {
    code.parse::<i32>()
        .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13))
}

/// The connection itself failed (not the pool, not a cancelled statement): its siblings in the
/// pool may be dead too (a database restart ends them all). SQLSTATE class 08 = connection
/// exception; 57P0x = server shutting down.
fn connection_lost(e: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::Tls(_) | E::Protocol(_) => true,
        E::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0")),
        _ => false,
    }
}

impl Error {
    /// The SQLSTATE the database answered with, if it answered with an error.
    pub(crate) fn sqlstate(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Error::Unavailable(sqlx::Error::Database(e))
            | Error::Database(sqlx::Error::Database(e)) => e.code(),
            _ => None,
        }
    }

    /// PostgreSQL rolled the transaction back to break a lock cycle or a serialization
    /// conflict with another writer: nothing was applied, and trying again is expected to work.
    pub fn is_conflict(&self) -> bool {
        matches!(self.sqlstate().as_deref(), Some("40P01" | "40001"))
    }

    /// True when the database certainly did not apply the failed statement: it answered with an
    /// error (an autocommit statement that fails rolls back), or the statement never left the
    /// pool. False when the outcome is unknown (the connection broke mid-statement), where a
    /// retry could write the same records twice.
    pub fn certainly_not_applied(&self) -> bool {
        use sqlx::Error as E;
        match self {
            Error::Unavailable(e) | Error::Database(e) => {
                matches!(e, E::Database(_) | E::PoolTimedOut | E::PoolClosed)
            }
            Error::StreamNotFound(_) | Error::InvalidUrl(_) => true,
            Error::Migrate(_) | Error::Corrupt(_) => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Pool and durability settings, read once from configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Maximum PostgreSQL connections (SQLite uses one writer and this many readers, capped at 8).
    pub max_connections: u32,
    /// How long to wait for a pooled connection before failing with [`Error::Unavailable`].
    pub acquire_timeout: Duration,
    /// PostgreSQL `statement_timeout` (and `idle_in_transaction_session_timeout`) of every
    /// connection (`None`: the server's settings).
    pub statement_timeout: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Connection-pool usage at one instant (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections, in use or idle.
    pub connections: u64,
    pub idle: u64,
    /// Most connections the pool(s) may open.
    pub max: u64,
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRow {
    pub id: String,
    pub created_at: i64,
}

/// A pod; `owner_id` mirrors the latest `.config/owner` record.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PodRow {
    pub id: i64,
    pub name: String,
    pub owner_id: String,
    pub created_at: i64,
}

/// The committed end of a chain. `index == -1` (and `hash == None`) for an empty stream.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Head {
    #[sqlx(rename = "head_index")]
    pub index: i64,
    #[sqlx(rename = "head_hash")]
    pub hash: Option<String>,
    #[sqlx(rename = "head_timestamp")]
    pub timestamp: i64,
}

impl Head {
    pub const EMPTY: Head = Head {
        index: -1,
        hash: None,
        timestamp: 0,
    };
}

/// A stream (a node of the pod's tree).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StreamRow {
    pub id: i64,
    pub pod_id: i64,
    pub parent_id: Option<i64>,
    /// Full path without leading slash; `""` is the pod's root stream.
    pub path: String,
    /// Last segment of `path` (`""` for the root stream).
    pub name: String,
    pub access: String,
    pub creator_id: String,
    pub created_at: i64,
    #[sqlx(flatten)]
    pub head: Head,
}

/// A stored record. `content` is empty when `purged`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RecordRow {
    #[sqlx(rename = "idx")]
    pub index: i64,
    pub name: String,
    pub content: Vec<u8>,
    pub content_type: String,
    /// Custom headers as a JSON object (keys lowercased and sorted).
    pub headers: String,
    pub size: i64,
    pub author: String,
    #[sqlx(rename = "ts")]
    pub timestamp: i64,
    pub content_hash: String,
    pub hash: String,
    pub previous_hash: Option<String>,
    pub deleted: bool,
    pub purged: bool,
}

/// A new stream to insert.
#[derive(Debug, Clone)]
pub struct NewStream {
    pub pod_id: i64,
    pub parent_id: Option<i64>,
    pub path: String,
    pub name: String,
    pub access: String,
    pub creator_id: String,
    pub created_at: i64,
}

/// What creating a stream did.
#[derive(Debug, Clone)]
pub enum CreateStream {
    Created(StreamRow),
    /// Another request created it first; this is the existing row.
    Exists(StreamRow),
    /// The parent stream has a record with the new stream's name.
    NameConflict,
}

/// What [`Store::append_batch`] must look up, under the stream lock, before the batch is built.
#[derive(Debug, Clone, Default)]
pub struct BatchProbe {
    /// Record names of the batch, checked against child stream names.
    pub names: Vec<String>,
    /// Idempotency keys of the batch, looked up in the stream's key table.
    pub idempotency_keys: Vec<String>,
}

/// What the batch builder sees: the locked head and the answers to the [`BatchProbe`].
#[derive(Debug, Clone)]
pub struct BatchContext {
    pub head: Head,
    /// Names from the probe that are child streams of this stream.
    pub conflicting_names: HashSet<String>,
    /// Keys from the probe already used, with the records they appended.
    pub existing_keys: HashMap<String, Vec<RecordRow>>,
    /// The stream's child version (bumped by each child stream creation); a later
    /// [`ChainedBatch`] built on this head must carry it.
    pub child_version: i64,
}

/// Records the engine already chained onto a head it holds in memory. [`Store::append_chained`]
/// commits them only if the stream still has exactly that head and child version and no child
/// stream is named like one of the records — a compare-and-swap, so a stale head (another
/// instance appended, a child stream appeared) commits nothing and the engine falls back to
/// [`Store::append_batch`], which locks and re-reads.
#[derive(Debug, Clone)]
pub struct ChainedBatch {
    pub stream_id: i64,
    /// The head the first record extends.
    pub expected: Head,
    pub child_version: i64,
    /// Consecutive records from `expected.index + 1`; never empty.
    pub records: Vec<RecordRow>,
}

/// An idempotency key to remember with the batch: `count` records from `first_index`.
#[derive(Debug, Clone)]
pub struct NewIdempotencyKey {
    pub key: String,
    pub first_index: i64,
    pub count: i32,
}

/// What the batch builder decided to write; all of it commits atomically or not at all.
#[derive(Debug, Clone, Default)]
pub struct BatchPlan {
    /// Consecutive records starting at `head.index + 1`.
    pub records: Vec<RecordRow>,
    pub idempotency_keys: Vec<NewIdempotencyKey>,
    /// Set when the batch writes `.config/owner`: the pod's new owner.
    pub pod_owner: Option<(i64, String)>,
    /// Purges: erase the content of every record with this name below this index.
    pub purges: Vec<(String, i64)>,
}

/// One page of records in index order.
#[derive(Debug, Clone, Copy)]
pub struct RecordRange {
    /// Only records with index > after.
    pub after: Option<i64>,
    /// Only records with index < before.
    pub before: Option<i64>,
    pub limit: i64,
    /// Only the latest record of each name, and only if it is not a tombstone.
    pub unique: bool,
}

/// The SQL condition of [`RecordRange::unique`]; the stream id is the first parameter.
pub(crate) fn unique_clause(range: &RecordRange, placeholder: &str) -> String {
    if range.unique {
        format!(
            " AND NOT deleted AND idx IN (SELECT MAX(idx) FROM records WHERE stream_id = {placeholder} GROUP BY name)"
        )
    } else {
        String::new()
    }
}

/// Why [`Store::set_domains`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainsOutcome {
    Set,
    /// This domain already serves another pod.
    Taken(String),
}

/// The storage handle. Cheap to clone (pools are reference-counted).
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

macro_rules! dispatch {
    // A transaction's future is large (several kB per backend); boxed, so that the futures of
    // the callers (every request's, up to the handler that axum boxes and moves) stay small.
    ($self:ident, $s:ident => boxed $e:expr) => {{
        $self.count_query();
        match $self {
            Store::Postgres($s) => Box::pin($e).await,
            Store::Sqlite($s) => Box::pin($e).await,
        }
    }};
    ($self:ident, $s:ident => $e:expr) => {{
        $self.count_query();
        match $self {
            Store::Postgres($s) => $e,
            Store::Sqlite($s) => $e,
        }
    }};
}

impl Store {
    /// Connects to `postgres://…` or `sqlite://path` (the SQLite file is created if missing).
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::connect(url, options).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(SqliteStore::connect(url, options).await?))
        } else {
            Err(Error::InvalidUrl(
                "expected postgres://… or sqlite://path".to_string(),
            ))
        }
    }

    /// `"postgres"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations (idempotent; safe to run from several instances).
    pub async fn migrate(&self) -> Result<()> {
        dispatch!(self, s => boxed s.migrate())
    }

    /// Answers when the database is reachable.
    pub async fn ping(&self) -> Result<()> {
        dispatch!(self, s => s.ping().await)
    }

    /// Connection-pool usage now (SQLite: the writer and the readers together).
    pub fn pool_stats(&self) -> PoolStats {
        dispatch!(self, s => s.pool_stats())
    }

    /// Closes every pooled connection.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    pub async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        dispatch!(self, s => s.get_setting(key).await)
    }

    /// Stores `value` unless the key already has one; returns the value now stored.
    pub async fn put_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        dispatch!(self, s => boxed s.put_setting_if_absent(key, value))
    }

    pub async fn get_user(&self, id: &str) -> Result<Option<UserRow>> {
        if !lookable(id) {
            return Ok(None);
        }
        dispatch!(self, s => s.get_user(id).await)
    }

    /// Finds the user of an identity, creating both when missing (race-safe).
    pub async fn upsert_identity_user(
        &self,
        provider: &str,
        provider_id: &str,
        email: Option<&str>,
        name: Option<&str>,
        new_user_id: &str,
        now: i64,
    ) -> Result<UserRow> {
        dispatch!(self, s => boxed s.upsert_identity_user(provider, provider_id, email, name, new_user_id, now))
    }

    /// Creates a pod with its initial streams `(path, name, access)` — a chain, each the parent
    /// of the next — and the first record of the last one (`.config/owner`). `None` when the
    /// name is taken.
    pub async fn create_pod(
        &self,
        name: &str,
        owner_id: &str,
        created_at: i64,
        streams: &[(&str, &str, &str)],
        first_record: &RecordRow,
    ) -> Result<Option<PodRow>> {
        dispatch!(self, s => boxed s.create_pod(name, owner_id, created_at, streams, first_record))
    }

    pub async fn get_pod(&self, name: &str) -> Result<Option<PodRow>> {
        dispatch!(self, s => s.get_pod(name).await)
    }

    pub async fn list_pods_owned_by(&self, user_id: &str) -> Result<Vec<PodRow>> {
        dispatch!(self, s => s.list_pods_owned_by(user_id).await)
    }

    pub async fn get_stream(&self, pod_id: i64, path: &str) -> Result<Option<StreamRow>> {
        if !lookable(path) {
            return Ok(None);
        }
        dispatch!(self, s => s.get_stream(pod_id, path).await)
    }

    /// Creates a stream under an existing parent, checking the parent's record names.
    pub async fn create_stream(&self, stream: &NewStream) -> Result<CreateStream> {
        dispatch!(self, s => boxed s.create_stream(stream))
    }

    /// Locks the stream, shows `build` the real head and probe answers, writes its plan and
    /// moves the head, in one transaction. Returns the plan as committed and the builder's output.
    pub async fn append_batch<T, F>(
        &self,
        stream_id: i64,
        probe: &BatchProbe,
        build: F,
    ) -> Result<(BatchPlan, T)>
    where
        F: FnOnce(BatchContext) -> (BatchPlan, T) + Send,
        T: Send,
    {
        dispatch!(self, s => boxed s.append_batch(stream_id, probe, build))
    }

    /// Commits several streams' [`ChainedBatch`]es in one statement (PostgreSQL) or one
    /// transaction (SQLite): group commit across streams. Answers, per batch, whether it was
    /// written; a batch whose stream moved on is skipped and the others still commit.
    pub async fn append_chained(&self, batches: &[ChainedBatch]) -> Result<Vec<bool>> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self, s => s.append_chained(batches).await)
    }

    /// Whether [`Store::append_following`] can overlap with the statement it follows
    /// (PostgreSQL; SQLite has a single writer, so there is nothing to overlap).
    pub fn overlaps_commits(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Commits `batch`, whose `expected` head is the last record of a batch of the same stream
    /// that is being committed concurrently (by [`Store::append_chained`]). `Ok(true)` only if
    /// that batch committed and nothing else moved the head; `Ok(false)`: nothing was written.
    /// Only on a store that [`overlaps_commits`](Store::overlaps_commits).
    pub async fn append_following(&self, batch: &ChainedBatch) -> Result<bool> {
        match self {
            Store::Postgres(s) => s.append_following(batch).await,
            Store::Sqlite(_) => Ok(false),
        }
    }

    pub async fn get_record(&self, stream_id: i64, index: i64) -> Result<Option<RecordRow>> {
        dispatch!(self, s => s.get_record(stream_id, index).await)
    }

    /// The latest record (highest index) with this name.
    pub async fn latest_by_name(&self, stream_id: i64, name: &str) -> Result<Option<RecordRow>> {
        if !lookable(name) {
            return Ok(None);
        }
        dispatch!(self, s => s.latest_by_name(stream_id, name).await)
    }

    /// Whether any record with this name still holds content a purge would erase (neither a
    /// tombstone nor purged).
    pub async fn has_unpurged(&self, stream_id: i64, name: &str) -> Result<bool> {
        dispatch!(self, s => s.has_unpurged(stream_id, name).await)
    }

    /// Records in index order within `range`.
    pub async fn list_records(&self, stream_id: i64, range: RecordRange) -> Result<Vec<RecordRow>> {
        dispatch!(self, s => s.list_records(stream_id, range).await)
    }

    /// The committed head as stored now.
    pub async fn stream_head(&self, stream_id: i64) -> Result<Option<Head>> {
        dispatch!(self, s => s.stream_head(stream_id).await)
    }

    /// Every stream of a pod, ordered by path.
    pub async fn list_streams(&self, pod_id: i64) -> Result<Vec<StreamRow>> {
        dispatch!(self, s => s.list_streams(pod_id).await)
    }

    /// The records of several streams' index spans (`(stream id, first, last)`, inclusive), in
    /// one query, each with its stream's id; in no particular order.
    pub async fn list_record_spans(
        &self,
        spans: &[(i64, i64, i64)],
    ) -> Result<Vec<(i64, RecordRow)>> {
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self, s => s.list_record_spans(spans).await)
    }

    /// Deletes a stream, its descendants and all their records. Returns how many streams went.
    pub async fn delete_stream_tree(&self, pod_id: i64, path: &str) -> Result<u64> {
        dispatch!(self, s => boxed s.delete_stream_tree(pod_id, path))
    }

    /// Deletes a pod with everything in it.
    pub async fn delete_pod(&self, pod_id: i64) -> Result<()> {
        dispatch!(self, s => boxed s.delete_pod(pod_id))
    }

    /// Replaces the custom domains of a pod (all or nothing).
    pub async fn set_domains(&self, pod_id: i64, domains: &[String]) -> Result<DomainsOutcome> {
        dispatch!(self, s => boxed s.set_domains(pod_id, domains))
    }

    /// The pod a custom domain serves.
    pub async fn pod_for_domain(&self, domain: &str) -> Result<Option<PodRow>> {
        dispatch!(self, s => s.pod_for_domain(domain).await)
    }

    /// Tells every instance about a change (PostgreSQL `NOTIFY`, sent outside any transaction;
    /// a no-op on SQLite, which serves one instance).
    pub async fn notify(&self, notice: &Notice) -> Result<()> {
        match self {
            Store::Postgres(s) => s.notify(notice).await,
            Store::Sqlite(_) => Ok(()),
        }
    }

    /// Queues an append notice; it is sent soon after, with others, without waiting
    /// (PostgreSQL; a no-op on SQLite). See the `notify` module for why.
    pub fn notify_appended(&self, notice: Notice) {
        if let Store::Postgres(s) = self {
            s.notify_appended(notice);
        }
    }

    /// Notices from every instance, from a listener task that reconnects by itself; `None` on
    /// SQLite (one instance: nothing to hear).
    pub fn notices(&self) -> Option<tokio::sync::mpsc::Receiver<Notice>> {
        match self {
            Store::Postgres(s) => Some(s.listen()),
            Store::Sqlite(_) => None,
        }
    }

    /// `(stream id, pod id)` of each existing stream among `ids` (recursive live subscriptions
    /// learn which pod a stream seen in an append notice belongs to; ids are never reused).
    pub async fn stream_pods(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        dispatch!(self, s => s.stream_pods(ids).await)
    }

    /// `(stream id, head index)` of each existing stream among `ids`.
    pub async fn stream_heads(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        match self {
            Store::Postgres(s) => s.stream_heads(ids).await,
            Store::Sqlite(s) => {
                let mut out = Vec::with_capacity(ids.len());
                for &id in ids {
                    if let Some(h) = s.stream_head(id).await? {
                        out.push((id, h.index));
                    }
                }
                Ok(out)
            }
        }
    }
}

// ----- query counting and batch loads for the GraphQL frontend ---------------------------------

/// Counts storage calls of one [`Store`] (shared by its clones).
pub(crate) type QueryCounter = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// A user with the email and name of their first identity.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserBrief {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

/// A record with the id of its stream (batch loads over many streams).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StreamRecordRow {
    pub stream_id: i64,
    #[sqlx(flatten)]
    pub record: RecordRow,
}

impl Store {
    fn count_query(&self) {
        let c = match self {
            Store::Postgres(s) => &s.queries,
            Store::Sqlite(s) => &s.queries,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Storage calls made so far through this store and its clones — each is one statement or
    /// one transaction. Tests use it to prove nested reads are batched (no N+1).
    pub fn query_count(&self) -> u64 {
        let c = match self {
            Store::Postgres(s) => &s.queries,
            Store::Sqlite(s) => &s.queries,
        };
        c.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Users by id, with the email and name of their first identity; unknown ids are skipped.
    pub async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserBrief>> {
        dispatch!(self, s => s.users_by_ids(ids).await)
    }

    /// Pods by name; unknown names are skipped.
    pub async fn pods_by_names(&self, names: &[String]) -> Result<Vec<PodRow>> {
        dispatch!(self, s => s.pods_by_names(names).await)
    }

    /// Every stream of these pods, ordered by pod id then path.
    pub async fn streams_of_pods(&self, pod_ids: &[i64]) -> Result<Vec<StreamRow>> {
        dispatch!(self, s => s.streams_of_pods(pod_ids).await)
    }

    /// The head record (highest index) of each of these streams; empty streams are skipped.
    pub async fn head_records(&self, stream_ids: &[i64]) -> Result<Vec<StreamRecordRow>> {
        dispatch!(self, s => s.head_records(stream_ids).await)
    }
}
