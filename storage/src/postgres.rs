//! The PostgreSQL backend: a connection pool, batches written with one `UNNEST` insert, and the
//! stream row locked with `FOR UPDATE` so that instances sharing the database serialize on it.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::QueryScalar;
use sqlx::{FromRow, Postgres, Row, Transaction};

use crate::{
    BatchContext, BatchPlan, BatchProbe, ChainedBatch, CreateStream, DomainsOutcome, Error, Head,
    NewStream, PodRow, PoolStats, RECORD_COLUMNS, RecordRange, RecordRow, Result, STREAM_COLUMNS,
    StoreOptions, StreamRow, UserRow, unique_clause,
};

/// A pooled connection idle at least this long is pinged before it is handed out.
const PING_WHEN_IDLE: Duration = Duration::from_secs(1);

/// When a connection last failed (ms since the Unix epoch; 0: never), process-wide.
static CONNECTION_LOST_AT: AtomicU64 = AtomicU64::new(0);

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records that a connection failed: until they are used again, the pool pings the connections
/// that went idle before that moment, since a database restart ends them all at once.
pub(crate) fn connection_lost() {
    CONNECTION_LOST_AT.store(epoch_ms(), Ordering::Relaxed);
}

/// Whether a connection idle for `idle_for` should be pinged before use: it idled long enough
/// to have been cut, or it was idle when another connection failed.
fn needs_ping(idle_for: Duration) -> bool {
    let idle_since = epoch_ms().saturating_sub(idle_for.as_millis() as u64);
    idle_for >= PING_WHEN_IDLE || idle_since <= CONNECTION_LOST_AT.load(Ordering::Relaxed)
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    /// Storage calls made through [`crate::Store`] (see [`crate::Store::query_count`]).
    pub(crate) queries: crate::QueryCounter,
    /// Append notices waiting to be sent (started on first use; see `notify`).
    pub(crate) outbox: std::sync::Arc<std::sync::OnceLock<crate::notify::Outbox>>,
}

impl PgStore {
    pub(crate) async fn connect(url: &str, options: &StoreOptions) -> Result<Self> {
        let mut connect = PgConnectOptions::from_str(url).map_err(|e| match e {
            sqlx::Error::Configuration(c) => Error::InvalidUrl(c.to_string()),
            other => Error::from(other),
        })?;
        if let Some(t) = options.statement_timeout {
            // A runaway statement, or a wait for a stream's row lock, is cancelled by the server
            // instead of holding a connection forever; a transaction left open by a client
            // that vanished (it never idles in one otherwise) releases its locks too.
            let ms = format!("{}ms", t.as_millis());
            connect = connect.options([
                ("statement_timeout", ms.as_str()),
                ("idle_in_transaction_session_timeout", ms.as_str()),
            ]);
        }
        // Every statement here is prepared once per connection and runs over and over with
        // different keys and arrays; re-planning each execution (PostgreSQL's default for the
        // first runs, and for good for the `UNNEST`-fed write statement) cost more than the
        // statement itself (measured: ~2 ms of planning for a 0.3 ms append).
        connect = connect.options([("plan_cache_mode", "force_generic_plan")]);
        // Two at least: a split batch's lead and follower statements run at once, and the
        // follower waits for the lead's row lock (a pool of one would deadlock them).
        if options.max_connections < 2 {
            tracing::warn!(
                configured = options.max_connections,
                "a PostgreSQL pool needs 2 connections at least; using 2"
            );
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(options.acquire_timeout)
            // sqlx pings every connection it hands out: a round trip before each statement,
            // on the commit path of every append (without it, +5% to +31% appends/s at 1,000
            // streams in alternating runs; BENCHMARKS.md). Ping only connections that may be
            // dead (`needs_ping`): a busy pool's connections are in use every few milliseconds.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if needs_ping(meta.idle_for) {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect.clone())
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(sqlx::Error::PoolTimedOut) => {
                // The pool only says it timed out: one direct attempt names the cause
                // (connection refused, unknown host, authentication…).
                let attempt = tokio::time::timeout(
                    options.acquire_timeout,
                    sqlx::ConnectOptions::connect(&connect),
                )
                .await;
                return Err(match attempt {
                    Ok(Err(cause)) => Error::from(cause),
                    _ => Error::from(sqlx::Error::PoolTimedOut),
                });
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            pool,
            queries: Default::default(),
            outbox: Default::default(),
        })
    }

    pub(crate) fn pool_stats(&self) -> PoolStats {
        PoolStats {
            connections: u64::from(self.pool.size()),
            idle: self.pool.num_idle() as u64,
            max: u64::from(self.pool.options().get_max_connections()),
        }
    }

    /// The pool, for tests and benchmarks that inspect the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Migrations run on a connection of their own, taken out of the pool, without the
    /// statement timeouts: a migration on a large database may rightly take longer.
    pub(crate) async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?.detach();
        sqlx::Executor::execute(
            &mut conn,
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0",
        )
        .await?;
        let result = MIGRATOR.run_direct(None, &mut conn, false).await;
        let _ = sqlx::Connection::close(conn).await;
        result?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        let v = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v)
    }

    pub(crate) async fn put_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        let v: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        Ok(v)
    }

    pub(crate) async fn get_user(&self, id: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query_as("SELECT id, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    pub(crate) async fn upsert_identity_user(
        &self,
        provider: &str,
        provider_id: &str,
        email: Option<&str>,
        name: Option<&str>,
        new_user_id: &str,
        now: i64,
    ) -> Result<UserRow> {
        let mut tx = self.pool.begin().await?;
        // Serialize concurrent first logins of one identity on an advisory lock of its key.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || ':' || $2))")
            .bind(provider)
            .bind(provider_id)
            .execute(&mut *tx)
            .await?;
        let existing: Option<UserRow> = sqlx::query_as(
            "SELECT u.id, u.created_at FROM identities i JOIN users u ON u.id = i.user_id \
             WHERE i.provider = $1 AND i.provider_id = $2",
        )
        .bind(provider)
        .bind(provider_id)
        .fetch_optional(&mut *tx)
        .await?;
        let user = match existing {
            Some(u) => u,
            None => {
                sqlx::query("INSERT INTO users (id, created_at) VALUES ($1, $2)")
                    .bind(new_user_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO identities (provider, provider_id, user_id, email, name, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(provider)
                .bind(provider_id)
                .bind(new_user_id)
                .bind(email)
                .bind(name)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                UserRow {
                    id: new_user_id.to_string(),
                    created_at: now,
                }
            }
        };
        tx.commit().await?;
        Ok(user)
    }

    pub(crate) async fn create_pod(
        &self,
        name: &str,
        owner_id: &str,
        created_at: i64,
        streams: &[(&str, &str, &str)],
        first_record: &RecordRow,
    ) -> Result<Option<PodRow>> {
        let mut tx = self.pool.begin().await?;
        let pod_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO pods (name, owner_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .bind(name)
        .bind(owner_id)
        .bind(created_at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(pod_id) = pod_id else {
            return Ok(None);
        };
        let mut parent: Option<i64> = None;
        for (path, seg, access) in streams {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO streams (pod_id, parent_id, path, name, access, creator_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(pod_id)
            .bind(parent)
            .bind(path)
            .bind(seg)
            .bind(access)
            .bind(owner_id)
            .bind(created_at)
            .fetch_one(&mut *tx)
            .await?;
            parent = Some(id);
        }
        if let Some(stream_id) = parent {
            insert_records(&mut tx, stream_id, std::slice::from_ref(first_record)).await?;
            set_head(&mut tx, stream_id, first_record).await?;
        }
        tx.commit().await?;
        Ok(Some(PodRow {
            id: pod_id,
            name: name.to_string(),
            owner_id: owner_id.to_string(),
            created_at,
        }))
    }

    pub(crate) async fn get_pod(&self, name: &str) -> Result<Option<PodRow>> {
        let row = sqlx::query_as("SELECT id, name, owner_id, created_at FROM pods WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    pub(crate) async fn list_pods_owned_by(&self, user_id: &str) -> Result<Vec<PodRow>> {
        let rows = sqlx::query_as(
            "SELECT id, name, owner_id, created_at FROM pods WHERE owner_id = $1 ORDER BY name",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn get_stream(&self, pod_id: i64, path: &str) -> Result<Option<StreamRow>> {
        let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = $1 AND path = $2"
        )))
        .bind(pod_id)
        .bind(path)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub(crate) async fn create_stream(&self, s: &NewStream) -> Result<CreateStream> {
        let mut tx = self.pool.begin().await?;
        if let Some(parent) = s.parent_id {
            // Lock the parent's row (ordering this against its appends) and bump its child
            // version, which makes any append chained on the old version fail its
            // compare-and-swap. The record check runs after the lock, in a statement of its own,
            // so its snapshot includes every append committed before we got the lock.
            let locked: Option<i64> = sqlx::query_scalar(
                "UPDATE streams SET child_version = child_version + 1 WHERE id = $1 RETURNING id",
            )
            .bind(parent)
            .fetch_optional(&mut *tx)
            .await?;
            if locked.is_none() {
                return Err(Error::StreamNotFound(parent));
            }
            let conflict: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM records WHERE stream_id = $1 AND name = $2)",
            )
            .bind(parent)
            .bind(&s.name)
            .fetch_one(&mut *tx)
            .await?;
            if conflict {
                return Ok(CreateStream::NameConflict);
            }
        }
        let row: Option<StreamRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO streams (pod_id, parent_id, path, name, access, creator_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (pod_id, path) DO NOTHING \
             RETURNING {STREAM_COLUMNS}"
        )))
        .bind(s.pod_id)
        .bind(s.parent_id)
        .bind(&s.path)
        .bind(&s.name)
        .bind(&s.access)
        .bind(&s.creator_id)
        .bind(s.created_at)
        .fetch_optional(&mut *tx)
        .await?;
        let result = match row {
            Some(r) => CreateStream::Created(r),
            None => {
                let r = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = $1 AND path = $2"
                )))
                .bind(s.pod_id)
                .bind(&s.path)
                .fetch_one(&mut *tx)
                .await?;
                CreateStream::Exists(r)
            }
        };
        tx.commit().await?;
        Ok(result)
    }

    pub(crate) async fn append_batch<T, F>(
        &self,
        stream_id: i64,
        probe: &BatchProbe,
        build: F,
    ) -> Result<(BatchPlan, T)>
    where
        F: FnOnce(BatchContext) -> (BatchPlan, T) + Send,
        T: Send,
    {
        let mut tx = self.pool.begin().await?;
        // One round trip: lock the head and find record names that collide with child streams.
        // The name lookup runs on the statement's snapshot, which predates a wait for the lock;
        // the child version read on that same snapshot (`seen_version`) tells whether a child
        // stream was created meanwhile, and only then is the lookup repeated.
        let row = sqlx::query(
            "SELECT s.head_index, s.head_hash, s.head_timestamp, s.child_version, \
                    (SELECT o.child_version FROM streams o WHERE o.id = s.id), \
                    ARRAY(SELECT c.name FROM streams c WHERE c.parent_id = s.id AND c.name = ANY($2)) \
             FROM streams s WHERE s.id = $1 FOR UPDATE",
        )
        .bind(stream_id)
        .bind(&probe.names)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(Error::StreamNotFound(stream_id));
        };
        let head = Head {
            index: row.get(0),
            hash: row.get(1),
            timestamp: row.get(2),
        };
        let child_version: i64 = row.get(3);
        let seen_version: Option<i64> = row.get(4);
        let mut conflicting: Vec<String> = row.get(5);
        if seen_version != Some(child_version) {
            conflicting = sqlx::query_scalar(
                "SELECT name FROM streams WHERE parent_id = $1 AND name = ANY($2)",
            )
            .bind(stream_id)
            .bind(&probe.names)
            .fetch_all(&mut *tx)
            .await?;
        }
        let conflicting_names: HashSet<String> = conflicting.into_iter().collect();
        let mut existing_keys = HashMap::new();
        if !probe.idempotency_keys.is_empty() {
            let keys = sqlx::query(
                "SELECT key, first_index, count FROM idempotency_keys \
                 WHERE stream_id = $1 AND key = ANY($2)",
            )
            .bind(stream_id)
            .bind(&probe.idempotency_keys)
            .fetch_all(&mut *tx)
            .await?;
            for k in keys {
                let first: i64 = k.get(1);
                let count: i32 = k.get(2);
                let rows: Vec<RecordRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = $1 \
                     AND idx >= $2 AND idx < $3 ORDER BY idx"
                )))
                .bind(stream_id)
                .bind(first)
                .bind(first + i64::from(count))
                .fetch_all(&mut *tx)
                .await?;
                existing_keys.insert(k.get(0), rows);
            }
        }
        let (plan, out) = build(BatchContext {
            head,
            conflicting_names,
            existing_keys,
            child_version,
        });
        if let Some(last) = plan.records.last() {
            insert_records(&mut tx, stream_id, &plan.records).await?;
            set_head(&mut tx, stream_id, last).await?;
        }
        if !plan.idempotency_keys.is_empty() {
            let keys: Vec<&str> = plan
                .idempotency_keys
                .iter()
                .map(|k| k.key.as_str())
                .collect();
            let firsts: Vec<i64> = plan
                .idempotency_keys
                .iter()
                .map(|k| k.first_index)
                .collect();
            let counts: Vec<i32> = plan.idempotency_keys.iter().map(|k| k.count).collect();
            sqlx::query(
                "INSERT INTO idempotency_keys (stream_id, key, first_index, count) \
                 SELECT $1, * FROM UNNEST($2::text[], $3::bigint[], $4::int[])",
            )
            .bind(stream_id)
            .bind(&keys)
            .bind(&firsts)
            .bind(&counts)
            .execute(&mut *tx)
            .await?;
        }
        for (name, below) in &plan.purges {
            sqlx::query(
                "UPDATE records SET content = '\\x'::bytea, purged = TRUE \
                 WHERE stream_id = $1 AND name = $2 AND idx < $3 AND NOT deleted",
            )
            .bind(stream_id)
            .bind(name)
            .bind(below)
            .execute(&mut *tx)
            .await?;
        }
        if let Some((pod_id, owner)) = &plan.pod_owner {
            sqlx::query("UPDATE pods SET owner_id = $2 WHERE id = $1")
                .bind(pod_id)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((plan, out))
    }

    pub(crate) async fn get_record(&self, stream_id: i64, index: i64) -> Result<Option<RecordRow>> {
        let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = $1 AND idx = $2"
        )))
        .bind(stream_id)
        .bind(index)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub(crate) async fn latest_by_name(
        &self,
        stream_id: i64,
        name: &str,
    ) -> Result<Option<RecordRow>> {
        let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = $1 AND name = $2 \
             ORDER BY idx DESC LIMIT 1"
        )))
        .bind(stream_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub(crate) async fn has_unpurged(&self, stream_id: i64, name: &str) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1::int8 FROM records WHERE stream_id = $1 AND name = $2 \
             AND NOT deleted AND NOT purged LIMIT 1",
        )
        .bind(stream_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    pub(crate) async fn list_records(
        &self,
        stream_id: i64,
        range: RecordRange,
    ) -> Result<Vec<RecordRow>> {
        let unique = unique_clause(&range, "$1");
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = $1 \
             AND idx > $2 AND idx < $3{unique} ORDER BY idx LIMIT $4"
        )))
        .bind(stream_id)
        .bind(range.after.unwrap_or(-1))
        .bind(range.before.unwrap_or(i64::MAX))
        .bind(range.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn stream_head(&self, stream_id: i64) -> Result<Option<Head>> {
        let row = sqlx::query_as(
            "SELECT head_index, head_hash, head_timestamp FROM streams WHERE id = $1",
        )
        .bind(stream_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub(crate) async fn list_streams(&self, pod_id: i64) -> Result<Vec<StreamRow>> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = $1 ORDER BY path"
        )))
        .bind(pod_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn list_record_spans(
        &self,
        spans: &[(i64, i64, i64)],
    ) -> Result<Vec<(i64, RecordRow)>> {
        let ids: Vec<i64> = spans.iter().map(|s| s.0).collect();
        let firsts: Vec<i64> = spans.iter().map(|s| s.1).collect();
        let lasts: Vec<i64> = spans.iter().map(|s| s.2).collect();
        // One index range scan per span (the primary key).
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT q.sid AS span_stream, {} \
             FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS q(sid, lo, hi) \
             JOIN records r ON r.stream_id = q.sid AND r.idx BETWEEN q.lo AND q.hi",
            prefixed_record_columns()
        )))
        .bind(&ids)
        .bind(&firsts)
        .bind(&lasts)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("span_stream")?, RecordRow::from_row(r)?)))
            .collect()
    }

    pub(crate) async fn delete_stream_tree(&self, pod_id: i64, path: &str) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM streams WHERE pod_id = $1 AND (path = $2 OR substr(path, 1, length($3)) = $3)",
        )
        .bind(pod_id)
        .bind(path)
        .bind(format!("{path}/"))
        .fetch_all(&mut *tx)
        .await?;
        delete_streams(&mut tx, &ids).await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    pub(crate) async fn delete_pod(&self, pod_id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM streams WHERE pod_id = $1")
            .bind(pod_id)
            .fetch_all(&mut *tx)
            .await?;
        delete_streams(&mut tx, &ids).await?;
        sqlx::query("DELETE FROM pods WHERE id = $1")
            .bind(pod_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn set_domains(
        &self,
        pod_id: i64,
        domains: &[String],
    ) -> Result<DomainsOutcome> {
        let mut tx = self.pool.begin().await?;
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT domain FROM domains WHERE domain = ANY($1) AND pod_id <> $2 LIMIT 1",
        )
        .bind(domains)
        .bind(pod_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(d) = taken {
            return Ok(DomainsOutcome::Taken(d));
        }
        sqlx::query("DELETE FROM domains WHERE pod_id = $1")
            .bind(pod_id)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO domains (domain, pod_id) SELECT d, $2 FROM UNNEST($1::text[]) AS d \
             ON CONFLICT (domain) DO NOTHING",
        )
        .bind(domains)
        .bind(pod_id)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() != domains.len() as u64 {
            // Another pod claimed one of them concurrently.
            return Ok(DomainsOutcome::Taken(domains.join(", ")));
        }
        tx.commit().await?;
        Ok(DomainsOutcome::Set)
    }

    pub(crate) async fn pod_for_domain(&self, domain: &str) -> Result<Option<PodRow>> {
        let row = sqlx::query_as(
            "SELECT p.id, p.name, p.owner_id, p.created_at FROM domains d \
             JOIN pods p ON p.id = d.pod_id WHERE d.domain = $1",
        )
        .bind(domain)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }
}

/// `r.`-qualified record columns, for joins.
fn prefixed_record_columns() -> String {
    RECORD_COLUMNS
        .split(',')
        .map(|c| format!("r.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes streams with their records and idempotency keys.
async fn delete_streams(tx: &mut Transaction<'static, Postgres>, ids: &[i64]) -> Result<()> {
    for table in [
        "DELETE FROM records WHERE stream_id = ANY($1)",
        "DELETE FROM idempotency_keys WHERE stream_id = ANY($1)",
        "DELETE FROM streams WHERE id = ANY($1)",
    ] {
        sqlx::query(table).bind(ids).execute(&mut **tx).await?;
    }
    Ok(())
}

/// Inserts a batch with one statement, whatever its size.
impl PgStore {
    /// The statement of [`crate::Store::append_chained`] on PostgreSQL: `$1`–`$13` the
    /// records' columns, `$14`–`$20` one entry per batch (stream id, expected head index, hash
    /// and child version, new head index, hash and timestamp), `$21`–`$22` the (stream id,
    /// record name) pairs to check against child streams. It returns the ids of the streams it
    /// moved.
    ///
    /// Every stream row is reached through a `LATERAL` probe keyed by one batch, and updated
    /// through the `ctid` that probe locked, so the plan is an index lookup and a TID fetch per
    /// batch whatever the table's size. (A locked row that had moved on since the statement's
    /// snapshot carries a `ctid` the snapshot cannot see: it is not updated, and its batch is
    /// stale like any other whose head moved.) The plain joins this replaced were planned
    /// (generically: the arrays' lengths are unknown) as hash joins over a sequential scan of
    /// `streams` while it held a few thousand rows: 1,000 rows read per statement at 1,000
    /// streams, and PostgreSQL's CPU per appended record 64–71 µs instead of 48–49
    /// (BENCHMARKS.md). Public so that a test can check that plan.
    pub const APPEND_CHAINED: &'static str = concat!(
        "WITH r AS ( \
             SELECT * FROM ",
        record_arrays!(),
        " AS r(",
        record_columns!(),
        ") \
         ), v AS ( \
             SELECT * FROM UNNEST($14::bigint[], $15::bigint[], $16::text[], \
                                  $17::bigint[], $18::bigint[], $19::text[], \
                                  $20::bigint[]) \
                 AS v(id, old_index, old_hash, old_version, new_index, new_hash, new_ts) \
         ), taken AS MATERIALIZED ( \
             SELECT DISTINCT n.sid FROM UNNEST($21::bigint[], $22::text[]) AS n(sid, name) \
               CROSS JOIN LATERAL (SELECT 1 FROM streams c \
                                    WHERE c.parent_id = n.sid AND c.name = n.name \
                                    LIMIT 1) c \
         ), locked AS ( \
             SELECT l.ctid, v.* FROM v CROSS JOIN LATERAL ( \
                 SELECT s.ctid FROM streams s \
                  WHERE s.id = v.id AND s.head_index = v.old_index \
                    AND s.head_hash IS NOT DISTINCT FROM v.old_hash \
                    AND s.child_version = v.old_version \
                 FOR UPDATE OF s SKIP LOCKED) l \
              WHERE v.id NOT IN (SELECT sid FROM taken) \
         ), moved AS ( \
             UPDATE streams s \
                SET head_index = l.new_index, head_hash = l.new_hash, \
                    head_timestamp = l.new_ts \
               FROM locked l \
              WHERE s.ctid = l.ctid AND s.id = l.id \
                AND s.head_index = l.old_index AND s.child_version = l.old_version \
             RETURNING s.id \
         ), ins AS ( \
             INSERT INTO records (",
        record_columns!(),
        ") \
             SELECT r.* FROM r WHERE r.stream_id IN (SELECT id FROM moved) \
         ) \
         SELECT id FROM moved"
    );

    /// One autocommit statement for every batch: a compare-and-swap `UPDATE` of the heads whose
    /// `RETURNING` feeds the `INSERT` of the records, so only batches whose stream still has
    /// the expected head and child version (and no child named like one of the records) are
    /// written.
    ///
    /// The stream rows are locked with `SKIP LOCKED`: a row another transaction holds (another
    /// instance's locking append, a child stream being created) is simply not swapped, and
    /// that batch takes the locking path. So this statement never waits for a lock — an
    /// autocommit statement left waiting would still commit after its client gave up — and a
    /// row committed after the statement's snapshot is re-checked as committed, so a concurrent
    /// append or child creation makes the swap fail instead of forking the chain.
    /// The statement is [`PgStore::APPEND_CHAINED`].
    pub(crate) async fn append_chained(&self, batches: &[ChainedBatch]) -> Result<Vec<bool>> {
        let mut order: Vec<usize> = (0..batches.len()).collect();
        // Same lock order in every statement of every instance: fewer deadlocks between them.
        order.sort_by_key(|&i| batches[i].stream_id);
        let n: usize = batches.iter().map(|b| b.records.len()).sum();
        let mut heads = HeadColumns::default();
        let mut cols = RecordColumns::with_capacity(n);
        // Each batch's distinct record names, checked against its stream's children.
        let mut names: (Vec<i64>, Vec<&str>) = (Vec::new(), Vec::new());
        for &i in &order {
            let b = &batches[i];
            let Some(last) = b.records.last() else {
                continue;
            };
            heads.push(b, last);
            for r in &b.records {
                cols.push(b.stream_id, r);
            }
            for name in distinct_names(&b.records) {
                names.0.push(b.stream_id);
                names.1.push(name);
            }
        }
        let moved: Vec<i64> = cols
            .bind(sqlx::query_scalar(Self::APPEND_CHAINED))
            .bind(&heads.id)
            .bind(&heads.old_index)
            .bind(&heads.old_hash)
            .bind(&heads.old_version)
            .bind(&heads.new_index)
            .bind(&heads.new_hash)
            .bind(&heads.new_ts)
            .bind(&names.0)
            .bind(&names.1)
            .fetch_all(&self.pool)
            .await?;
        let moved: HashSet<i64> = moved.into_iter().collect();
        Ok(batches
            .iter()
            .map(|b| moved.contains(&b.stream_id))
            .collect())
    }
}

impl PgStore {
    /// Commits `batch`, which extends records of the same stream that another statement is
    /// committing right now (`batch.expected` is that statement's last record). The records are
    /// inserted first, in parallel with that statement; then the head update waits for its row
    /// lock, and is re-checked against the head that statement left. Anything else — the
    /// leader failed or was stale, another instance appended, a child took one of the names —
    /// makes [`webpods_require`] raise, and the whole statement rolls back: `Ok(false)`.
    ///
    /// While the leader has not committed, the snapshot shows the head before it; that row
    /// passes with a placeholder head that can only survive if the leader never moved the row,
    /// and then fails the final check.
    pub(crate) async fn append_following(&self, batch: &ChainedBatch) -> Result<bool> {
        let Some(last) = batch.records.last() else {
            return Ok(true);
        };
        let mut cols = RecordColumns::with_capacity(batch.records.len());
        for r in &batch.records {
            cols.push(batch.stream_id, r);
        }
        let names: Vec<&str> = distinct_names(&batch.records).collect();
        let result = cols
            .bind(sqlx::query_scalar::<_, bool>(concat!(
                "WITH ins AS ( \
                     INSERT INTO records (",
                record_columns!(),
                ") SELECT * FROM ",
                record_arrays!(),
                " RETURNING 1 \
                 ), moved AS ( \
                     UPDATE streams s \
                        SET head_index = CASE WHEN s.head_index = $15 \
                                               AND s.head_hash IS NOT DISTINCT FROM $16 \
                                               AND s.child_version = $17 \
                                               AND NOT EXISTS (SELECT 1 FROM streams c \
                                                                WHERE c.parent_id = s.id \
                                                                  AND c.name = ANY($21::text[])) \
                                              THEN $18 ELSE -2 END, \
                            head_hash = $19, head_timestamp = $20 \
                      WHERE s.id = $14 AND (SELECT count(*) FROM ins) = cardinality($2::bigint[]) \
                     RETURNING s.head_index \
                 ) \
                 SELECT webpods_require(COALESCE((SELECT head_index = $18 FROM moved), FALSE))"
            )))
            .bind(batch.stream_id)
            .bind(batch.expected.index)
            .bind(batch.expected.hash.as_deref())
            .bind(batch.child_version)
            .bind(last.index)
            .bind(&last.hash)
            .bind(last.timestamp)
            .bind(&names)
            .fetch_one(&self.pool)
            .await;
        match result.map_err(Error::from) {
            Ok(_) => Ok(true),
            // Rolled back: the head moved (WP409), an index of ours was taken (unique
            // violation), or PostgreSQL broke a lock cycle with another instance.
            Err(e)
                if e.is_conflict()
                    || matches!(e.sqlstate().as_deref(), Some("WP409" | "23505")) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The columns a record is inserted with, in [`RecordColumns`]' order.
macro_rules! record_columns {
    () => {
        "stream_id, idx, name, content, content_type, headers, size, author, ts, content_hash, \
         hash, previous_hash, deleted"
    };
}
use record_columns;

/// Rows of [`record_columns!`] from the arrays [`RecordColumns::bind`] binds as `$1`–`$13`.
macro_rules! record_arrays {
    () => {
        "UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bytea[], $5::text[], $6::text[], \
                $7::bigint[], $8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[], \
                $13::bool[])"
    };
}
use record_arrays;

/// Each name once, in first-seen order: a batch's names checked against child streams.
fn distinct_names(records: &[RecordRow]) -> impl Iterator<Item = &str> {
    let mut seen = HashSet::new();
    records
        .iter()
        .map(|r| r.name.as_str())
        .filter(move |name| seen.insert(*name))
}

/// The head columns of [`PgStore::append_chained`], one entry per batch.
#[derive(Default)]
struct HeadColumns<'a> {
    id: Vec<i64>,
    old_index: Vec<i64>,
    old_hash: Vec<Option<&'a str>>,
    old_version: Vec<i64>,
    new_index: Vec<i64>,
    new_hash: Vec<&'a str>,
    new_ts: Vec<i64>,
}

impl<'a> HeadColumns<'a> {
    fn push(&mut self, b: &'a ChainedBatch, last: &'a RecordRow) {
        self.id.push(b.stream_id);
        self.old_index.push(b.expected.index);
        self.old_hash.push(b.expected.hash.as_deref());
        self.old_version.push(b.child_version);
        self.new_index.push(last.index);
        self.new_hash.push(&last.hash);
        self.new_ts.push(last.timestamp);
    }
}

/// Records as column arrays, for `UNNEST` inserts.
struct RecordColumns<'a> {
    stream_id: Vec<i64>,
    idx: Vec<i64>,
    name: Vec<&'a str>,
    content: Vec<&'a [u8]>,
    content_type: Vec<&'a str>,
    headers: Vec<&'a str>,
    size: Vec<i64>,
    author: Vec<&'a str>,
    ts: Vec<i64>,
    content_hash: Vec<&'a str>,
    hash: Vec<&'a str>,
    previous_hash: Vec<Option<&'a str>>,
    deleted: Vec<bool>,
}

impl<'a> RecordColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            stream_id: Vec::with_capacity(n),
            idx: Vec::with_capacity(n),
            name: Vec::with_capacity(n),
            content: Vec::with_capacity(n),
            content_type: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
            size: Vec::with_capacity(n),
            author: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            content_hash: Vec::with_capacity(n),
            hash: Vec::with_capacity(n),
            previous_hash: Vec::with_capacity(n),
            deleted: Vec::with_capacity(n),
        }
    }

    /// Binds the columns as `$1`–`$13` (see [`record_arrays!`]); `query` must have no
    /// parameters bound yet.
    fn bind<'q, O>(
        &'q self,
        query: QueryScalar<'q, Postgres, O, <Postgres as sqlx::Database>::Arguments>,
    ) -> QueryScalar<'q, Postgres, O, <Postgres as sqlx::Database>::Arguments> {
        query
            .bind(&self.stream_id)
            .bind(&self.idx)
            .bind(&self.name)
            .bind(&self.content)
            .bind(&self.content_type)
            .bind(&self.headers)
            .bind(&self.size)
            .bind(&self.author)
            .bind(&self.ts)
            .bind(&self.content_hash)
            .bind(&self.hash)
            .bind(&self.previous_hash)
            .bind(&self.deleted)
    }

    fn push(&mut self, stream_id: i64, r: &'a RecordRow) {
        self.stream_id.push(stream_id);
        self.idx.push(r.index);
        self.name.push(&r.name);
        self.content.push(&r.content);
        self.content_type.push(&r.content_type);
        self.headers.push(&r.headers);
        self.size.push(r.size);
        self.author.push(&r.author);
        self.ts.push(r.timestamp);
        self.content_hash.push(&r.content_hash);
        self.hash.push(&r.hash);
        self.previous_hash.push(r.previous_hash.as_deref());
        self.deleted.push(r.deleted);
    }
}

async fn insert_records(
    tx: &mut Transaction<'static, Postgres>,
    stream_id: i64,
    records: &[RecordRow],
) -> Result<()> {
    let mut c = RecordColumns::with_capacity(records.len());
    for r in records {
        c.push(stream_id, r);
    }
    // A scalar query only to share `RecordColumns::bind`; the insert returns no rows.
    c.bind(sqlx::query_scalar::<_, i64>(concat!(
        "INSERT INTO records (",
        record_columns!(),
        ") SELECT * FROM ",
        record_arrays!()
    )))
    .fetch_all(&mut **tx)
    .await?;
    Ok(())
}

async fn set_head(
    tx: &mut Transaction<'static, Postgres>,
    stream_id: i64,
    last: &RecordRow,
) -> Result<()> {
    sqlx::query(
        "UPDATE streams SET head_index = $2, head_hash = $3, head_timestamp = $4 WHERE id = $1",
    )
    .bind(stream_id)
    .bind(last.index)
    .bind(&last.hash)
    .bind(last.timestamp)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ----- batch loads for the GraphQL frontend ---------------------------------------------------
// Kept apart from the core methods above: they exist so nested GraphQL queries load the heads of
// many streams, or many users, with one statement instead of one per item.

impl PgStore {
    pub(crate) async fn pods_by_names(&self, names: &[String]) -> Result<Vec<PodRow>> {
        let rows =
            sqlx::query_as("SELECT id, name, owner_id, created_at FROM pods WHERE name = ANY($1)")
                .bind(names)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    pub(crate) async fn streams_of_pods(&self, pod_ids: &[i64]) -> Result<Vec<StreamRow>> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = ANY($1) ORDER BY pod_id, path"
        )))
        .bind(pod_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<crate::UserBrief>> {
        let rows = sqlx::query_as(
            "SELECT u.id, \
                    (SELECT i.email FROM identities i WHERE i.user_id = u.id \
                     ORDER BY i.created_at, i.provider LIMIT 1) AS email, \
                    (SELECT i.name FROM identities i WHERE i.user_id = u.id \
                     ORDER BY i.created_at, i.provider LIMIT 1) AS name \
             FROM users u WHERE u.id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn head_records(
        &self,
        stream_ids: &[i64],
    ) -> Result<Vec<crate::StreamRecordRow>> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT stream_id, {RECORD_COLUMNS} FROM records \
             WHERE (stream_id, idx) IN (SELECT id, head_index FROM streams WHERE id = ANY($1))"
        )))
        .bind(stream_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
