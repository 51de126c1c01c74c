//! The SQLite backend, the embedded default: WAL journal, `synchronous=FULL` (a receipt means
//! the batch is on disk), one writer connection shared by every stream actor (SQLite has one
//! writer anyway; several would only trade `database is locked` errors) and a small pool of
//! readers. Write transactions start with `BEGIN IMMEDIATE`, so a second process on the same
//! file (e.g. `webpods token issue`) waits on `busy_timeout` instead of failing mid-transaction.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{FromRow, QueryBuilder, Row, Sqlite, Transaction};

use crate::{
    BatchContext, BatchPlan, BatchProbe, ChainedBatch, CreateStream, DomainsOutcome, Error, Head,
    NewStream, PodRow, PoolStats, RECORD_COLUMNS, RecordRange, RecordRow, Result, STREAM_COLUMNS,
    StoreOptions, StreamRow, UserRow, unique_clause,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per multi-row `INSERT` (13 parameters each, under SQLite's 32766-variable limit).
const INSERT_CHUNK: usize = 2000;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) writer: SqlitePool,
    pub(crate) readers: SqlitePool,
    /// Storage calls made through [`crate::Store`] (see [`crate::Store::query_count`]).
    pub(crate) queries: crate::QueryCounter,
}

impl SqliteStore {
    pub(crate) async fn connect(url: &str, options: &StoreOptions) -> Result<Self> {
        let base = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::InvalidUrl(e.to_string()))?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.acquire_timeout)
            .foreign_keys(true);
        let pool = |max: u32| {
            SqlitePoolOptions::new()
                // A local file's connection cannot be cut: no ping (a hop to the connection's
                // worker thread) before each use.
                .test_before_acquire(false)
                .max_connections(max)
                .acquire_timeout(options.acquire_timeout)
        };
        let writer = pool(1)
            .connect_with(base.clone().create_if_missing(true))
            .await?;
        let readers = pool(options.max_connections.clamp(1, 8))
            .connect_with(base.read_only(true))
            .await?;
        Ok(Self {
            writer,
            readers,
            queries: Default::default(),
        })
    }

    pub(crate) fn pool_stats(&self) -> PoolStats {
        let pools = [&self.writer, &self.readers];
        PoolStats {
            connections: pools.iter().map(|p| u64::from(p.size())).sum(),
            idle: pools.iter().map(|p| p.num_idle() as u64).sum(),
            max: pools
                .iter()
                .map(|p| u64::from(p.options().get_max_connections()))
                .sum(),
        }
    }

    /// A write transaction on the writer connection.
    ///
    /// When a `COMMIT` fails on a full disk or an I/O error, SQLite may roll the transaction
    /// back itself; sqlx then still counts it as open (its own `ROLLBACK` fails: no
    /// transaction is active) and refuses every later `BEGIN` on that connection, so the
    /// server could not write again until restarted. Such a connection is replaced.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        match self.writer.begin_with("BEGIN IMMEDIATE").await {
            Err(sqlx::Error::InvalidSavePointStatement) => {
                tracing::warn!(
                    "the SQLite writer connection was left inside a failed transaction; \
                     replacing it"
                );
                self.writer.acquire().await?.close().await?;
                Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
            }
            begun => Ok(begun?),
        }
    }

    pub(crate) async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    pub(crate) async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }

    pub(crate) async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        let v = sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.readers)
            .await?;
        Ok(v)
    }

    pub(crate) async fn put_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        let v: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(v)
    }

    pub(crate) async fn get_user(&self, id: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query_as("SELECT id, created_at FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.readers)
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
        let mut tx = self.begin().await?;
        let existing: Option<UserRow> = sqlx::query_as(
            "SELECT u.id, u.created_at FROM identities i JOIN users u ON u.id = i.user_id \
             WHERE i.provider = ? AND i.provider_id = ?",
        )
        .bind(provider)
        .bind(provider_id)
        .fetch_optional(&mut *tx)
        .await?;
        let user = match existing {
            Some(u) => u,
            None => {
                sqlx::query("INSERT INTO users (id, created_at) VALUES (?, ?)")
                    .bind(new_user_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO identities (provider, provider_id, user_id, email, name, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?)",
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
        let mut tx = self.begin().await?;
        let pod_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO pods (name, owner_id, created_at) VALUES (?, ?, ?) \
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
                 VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
        let row = sqlx::query_as("SELECT id, name, owner_id, created_at FROM pods WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.readers)
            .await?;
        Ok(row)
    }

    pub(crate) async fn list_pods_owned_by(&self, user_id: &str) -> Result<Vec<PodRow>> {
        let rows = sqlx::query_as(
            "SELECT id, name, owner_id, created_at FROM pods WHERE owner_id = ? ORDER BY name",
        )
        .bind(user_id)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn get_stream(&self, pod_id: i64, path: &str) -> Result<Option<StreamRow>> {
        let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = ? AND path = ?"
        )))
        .bind(pod_id)
        .bind(path)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row)
    }

    pub(crate) async fn create_stream(&self, s: &NewStream) -> Result<CreateStream> {
        let mut tx = self.begin().await?;
        if let Some(parent) = s.parent_id {
            // Bump the parent's child version: appends chained on the old one fail their
            // compare-and-swap (see `append_chained`).
            let conflict: Option<bool> = sqlx::query_scalar(
                "UPDATE streams SET child_version = child_version + 1 WHERE id = ?1 \
                 RETURNING EXISTS (SELECT 1 FROM records WHERE stream_id = ?1 AND name = ?2)",
            )
            .bind(parent)
            .bind(&s.name)
            .fetch_optional(&mut *tx)
            .await?;
            match conflict {
                None => return Err(Error::StreamNotFound(parent)),
                Some(true) => return Ok(CreateStream::NameConflict),
                Some(false) => {}
            }
        }
        let row: Option<StreamRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO streams (pod_id, parent_id, path, name, access, creator_id, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (pod_id, path) DO NOTHING \
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
                    "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = ? AND path = ?"
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

    /// One write transaction (one fsync) for every batch; a batch is written only if its
    /// stream still has the expected head and child version and no child stream is named like
    /// one of its records. SQLite has a single writer, so the checks and writes cannot race.
    pub(crate) async fn append_chained(&self, batches: &[ChainedBatch]) -> Result<Vec<bool>> {
        let mut tx = self.begin().await?;
        let mut written = Vec::with_capacity(batches.len());
        for b in batches {
            let Some(last) = b.records.last() else {
                written.push(false);
                continue;
            };
            let names: Vec<&str> = b.records.iter().map(|r| r.name.as_str()).collect();
            let names_json = serde_json::to_string(&names)
                .map_err(|e| Error::Corrupt(format!("encoding names: {e}")))?;
            let moved = sqlx::query(
                "UPDATE streams SET head_index = ?, head_hash = ?, head_timestamp = ? \
                 WHERE id = ? AND head_index = ? AND head_hash IS ? AND child_version = ? \
                   AND NOT EXISTS (SELECT 1 FROM streams c WHERE c.parent_id = streams.id \
                                     AND c.name IN (SELECT value FROM json_each(?)))",
            )
            .bind(last.index)
            .bind(&last.hash)
            .bind(last.timestamp)
            .bind(b.stream_id)
            .bind(b.expected.index)
            .bind(b.expected.hash.as_deref())
            .bind(b.child_version)
            .bind(names_json)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if moved {
                insert_records(&mut tx, b.stream_id, &b.records).await?;
            }
            written.push(moved);
        }
        tx.commit().await?;
        Ok(written)
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
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT head_index, head_hash, head_timestamp, child_version FROM streams WHERE id = ?",
        )
        .bind(stream_id)
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
        let names_json = serde_json::to_string(&probe.names)
            .map_err(|e| Error::Corrupt(format!("encoding names: {e}")))?;
        let conflicting_names: HashSet<String> = sqlx::query_scalar(
            "SELECT name FROM streams WHERE parent_id = ? \
             AND name IN (SELECT value FROM json_each(?))",
        )
        .bind(stream_id)
        .bind(names_json)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut existing_keys = HashMap::new();
        for key in &probe.idempotency_keys {
            let found = sqlx::query(
                "SELECT first_index, count FROM idempotency_keys WHERE stream_id = ? AND key = ?",
            )
            .bind(stream_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(k) = found {
                let first: i64 = k.get(0);
                let count: i64 = k.get(1);
                let rows: Vec<RecordRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = ? \
                     AND idx >= ? AND idx < ? ORDER BY idx"
                )))
                .bind(stream_id)
                .bind(first)
                .bind(first + count)
                .fetch_all(&mut *tx)
                .await?;
                existing_keys.insert(key.clone(), rows);
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
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO idempotency_keys (stream_id, key, first_index, count) ",
            );
            qb.push_values(&plan.idempotency_keys, |mut b, k| {
                b.push_bind(stream_id)
                    .push_bind(&k.key)
                    .push_bind(k.first_index)
                    .push_bind(k.count);
            });
            qb.build().execute(&mut *tx).await?;
        }
        for (name, below) in &plan.purges {
            sqlx::query(
                "UPDATE records SET content = X'', purged = 1 \
                 WHERE stream_id = ? AND name = ? AND idx < ? AND NOT deleted",
            )
            .bind(stream_id)
            .bind(name)
            .bind(below)
            .execute(&mut *tx)
            .await?;
        }
        if let Some((pod_id, owner)) = &plan.pod_owner {
            sqlx::query("UPDATE pods SET owner_id = ? WHERE id = ?")
                .bind(owner)
                .bind(pod_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((plan, out))
    }

    pub(crate) async fn get_record(&self, stream_id: i64, index: i64) -> Result<Option<RecordRow>> {
        let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = ? AND idx = ?"
        )))
        .bind(stream_id)
        .bind(index)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row)
    }

    pub(crate) async fn latest_by_name(
        &self,
        stream_id: i64,
        name: &str,
    ) -> Result<Option<RecordRow>> {
        let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = ? AND name = ? \
             ORDER BY idx DESC LIMIT 1"
        )))
        .bind(stream_id)
        .bind(name)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row)
    }

    pub(crate) async fn has_unpurged(&self, stream_id: i64, name: &str) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM records WHERE stream_id = ? AND name = ? \
             AND NOT deleted AND NOT purged LIMIT 1",
        )
        .bind(stream_id)
        .bind(name)
        .fetch_optional(&self.readers)
        .await?;
        Ok(found.is_some())
    }

    pub(crate) async fn list_records(
        &self,
        stream_id: i64,
        range: RecordRange,
    ) -> Result<Vec<RecordRow>> {
        let unique = unique_clause(&range, "?1");
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = ?1 \
             AND idx > ?2 AND idx < ?3{unique} ORDER BY idx LIMIT ?4"
        )))
        .bind(stream_id)
        .bind(range.after.unwrap_or(-1))
        .bind(range.before.unwrap_or(i64::MAX))
        .bind(range.limit)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn stream_head(&self, stream_id: i64) -> Result<Option<Head>> {
        let row = sqlx::query_as(
            "SELECT head_index, head_hash, head_timestamp FROM streams WHERE id = ?",
        )
        .bind(stream_id)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row)
    }

    pub(crate) async fn stream_pods(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query_as(
            "SELECT id, pod_id FROM streams WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(json_of(ids)?)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn list_streams(&self, pod_id: i64) -> Result<Vec<StreamRow>> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id = ? ORDER BY path"
        )))
        .bind(pod_id)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn list_record_spans(
        &self,
        spans: &[(i64, i64, i64)],
    ) -> Result<Vec<(i64, RecordRow)>> {
        let spans = serde_json::to_string(spans)
            .map_err(|e| Error::Corrupt(format!("encoding spans: {e}")))?;
        let cols = RECORD_COLUMNS
            .split(',')
            .map(|c| format!("r.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        // Each span is `[stream id, first, last]`; one primary-key range scan per span.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT r.stream_id AS span_stream, {cols} FROM json_each(?) AS q \
             JOIN records r ON r.stream_id = q.value ->> 0 \
             AND r.idx BETWEEN q.value ->> 1 AND q.value ->> 2"
        )))
        .bind(spans)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("span_stream")?, RecordRow::from_row(r)?)))
            .collect()
    }

    pub(crate) async fn delete_stream_tree(&self, pod_id: i64, path: &str) -> Result<u64> {
        let mut tx = self.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM streams WHERE pod_id = ? AND (path = ? OR substr(path, 1, length(?3)) = ?3)",
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
        let mut tx = self.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM streams WHERE pod_id = ?")
            .bind(pod_id)
            .fetch_all(&mut *tx)
            .await?;
        delete_streams(&mut tx, &ids).await?;
        sqlx::query("DELETE FROM domains WHERE pod_id = ?")
            .bind(pod_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM pods WHERE id = ?")
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
        let mut tx = self.begin().await?;
        for d in domains {
            let owner: Option<i64> =
                sqlx::query_scalar("SELECT pod_id FROM domains WHERE domain = ?")
                    .bind(d)
                    .fetch_optional(&mut *tx)
                    .await?;
            if owner.is_some_and(|o| o != pod_id) {
                return Ok(DomainsOutcome::Taken(d.clone()));
            }
        }
        sqlx::query("DELETE FROM domains WHERE pod_id = ?")
            .bind(pod_id)
            .execute(&mut *tx)
            .await?;
        for d in domains {
            sqlx::query("INSERT INTO domains (domain, pod_id) VALUES (?, ?)")
                .bind(d)
                .bind(pod_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(DomainsOutcome::Set)
    }

    pub(crate) async fn pod_for_domain(&self, domain: &str) -> Result<Option<PodRow>> {
        let row = sqlx::query_as(
            "SELECT p.id, p.name, p.owner_id, p.created_at FROM domains d \
             JOIN pods p ON p.id = d.pod_id WHERE d.domain = ?",
        )
        .bind(domain)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row)
    }
}

/// Removes streams with their records and idempotency keys.
async fn delete_streams(tx: &mut Transaction<'static, Sqlite>, ids: &[i64]) -> Result<()> {
    for id in ids {
        for sql in [
            "DELETE FROM records WHERE stream_id = ?",
            "DELETE FROM idempotency_keys WHERE stream_id = ?",
            "DELETE FROM streams WHERE id = ?",
        ] {
            sqlx::query(sql).bind(id).execute(&mut **tx).await?;
        }
    }
    Ok(())
}

/// Inserts a batch with one multi-row statement per [`INSERT_CHUNK`] records.
async fn insert_records(
    tx: &mut Transaction<'static, Sqlite>,
    stream_id: i64,
    records: &[RecordRow],
) -> Result<()> {
    for chunk in records.chunks(INSERT_CHUNK) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO records (stream_id, idx, name, content, content_type, headers, size, \
             author, ts, content_hash, hash, previous_hash, deleted) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(stream_id)
                .push_bind(r.index)
                .push_bind(&r.name)
                .push_bind(&r.content)
                .push_bind(&r.content_type)
                .push_bind(&r.headers)
                .push_bind(r.size)
                .push_bind(&r.author)
                .push_bind(r.timestamp)
                .push_bind(&r.content_hash)
                .push_bind(&r.hash)
                .push_bind(&r.previous_hash)
                .push_bind(r.deleted);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn set_head(
    tx: &mut Transaction<'static, Sqlite>,
    stream_id: i64,
    last: &RecordRow,
) -> Result<()> {
    sqlx::query(
        "UPDATE streams SET head_index = ?, head_hash = ?, head_timestamp = ? WHERE id = ?",
    )
    .bind(last.index)
    .bind(&last.hash)
    .bind(last.timestamp)
    .bind(stream_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ----- batch loads for the GraphQL frontend ---------------------------------------------------
// Kept apart from the core methods above: they exist so nested GraphQL queries load the heads of
// many streams, or many users, with one statement instead of one per item.

impl SqliteStore {
    pub(crate) async fn pods_by_names(&self, names: &[String]) -> Result<Vec<PodRow>> {
        let rows = sqlx::query_as("SELECT id, name, owner_id, created_at FROM pods WHERE name IN (SELECT value FROM json_each(?))")
            .bind(json_of(names)?)
            .fetch_all(&self.readers)
            .await?;
        Ok(rows)
    }

    pub(crate) async fn streams_of_pods(&self, pod_ids: &[i64]) -> Result<Vec<StreamRow>> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_COLUMNS} FROM streams WHERE pod_id IN (SELECT value FROM json_each(?)) ORDER BY pod_id, path"
        )))
        .bind(json_of(pod_ids)?)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<crate::UserBrief>> {
        let ids_json =
            serde_json::to_string(ids).map_err(|e| Error::Corrupt(format!("encoding ids: {e}")))?;
        let rows = sqlx::query_as(
            "SELECT u.id, \
                    (SELECT i.email FROM identities i WHERE i.user_id = u.id \
                     ORDER BY i.created_at, i.provider LIMIT 1) AS email, \
                    (SELECT i.name FROM identities i WHERE i.user_id = u.id \
                     ORDER BY i.created_at, i.provider LIMIT 1) AS name \
             FROM users u WHERE u.id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids_json)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn head_records(
        &self,
        stream_ids: &[i64],
    ) -> Result<Vec<crate::StreamRecordRow>> {
        let ids_json = serde_json::to_string(stream_ids)
            .map_err(|e| Error::Corrupt(format!("encoding ids: {e}")))?;
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT stream_id, {RECORD_COLUMNS} FROM records \
             WHERE (stream_id, idx) IN (SELECT id, head_index FROM streams \
                                       WHERE id IN (SELECT value FROM json_each(?)))"
        )))
        .bind(ids_json)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows)
    }
}

/// A JSON array for `json_each(?)`.
fn json_of<T: serde::Serialize>(items: &[T]) -> Result<String> {
    serde_json::to_string(items).map_err(|e| Error::Corrupt(format!("encoding a list: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated store in a new temporary directory (removed by the caller).
    async fn temp_store(tag: &str) -> (SqliteStore, std::path::PathBuf) {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("wp-sqlite-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}/db", dir.display());
        let store = SqliteStore::connect(&url, &StoreOptions::default())
            .await
            .expect("open");
        store.migrate().await.expect("migrate");
        (store, dir)
    }

    /// SQLite ends a transaction itself when its `COMMIT` fails on a full disk; here it is
    /// ended behind sqlx's back, so that the `COMMIT` fails the same way. Writing must go on.
    #[tokio::test]
    async fn a_failed_commit_does_not_wedge_the_writer() {
        let (store, dir) = temp_store("wedge").await;
        let mut tx = store.begin().await.expect("begin");
        sqlx::query("ROLLBACK")
            .execute(&mut *tx)
            .await
            .expect("rollback behind sqlx's back");
        assert!(tx.commit().await.is_err(), "no transaction is active");
        for i in 0..3 {
            let key = format!("after-{i}");
            let stored = store.put_setting_if_absent(&key, "v").await;
            assert_eq!(stored.expect("a write after the failed commit"), "v");
            assert_eq!(
                store.get_setting(&key).await.expect("read"),
                Some("v".into())
            );
        }
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A full disk (here: the database may not grow) is `Unavailable` (503, retry later), not
    /// an internal error, and writing resumes once there is room.
    #[tokio::test]
    async fn a_full_disk_is_unavailable_and_passes() {
        let (store, dir) = temp_store("full").await;
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&store.writer)
            .await
            .expect("page count");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {pages}"
        )))
        .execute(&store.writer)
        .await
        .expect("cap the size");
        let big = "x".repeat(64 * 1024);
        let full = store.put_setting_if_absent("big", &big).await;
        assert!(matches!(full, Err(Error::Unavailable(_))), "{full:?}");
        sqlx::query("PRAGMA max_page_count = 1073741823")
            .execute(&store.writer)
            .await
            .expect("room again");
        let stored = store.put_setting_if_absent("big", &big).await;
        assert_eq!(stored.expect("written once there is room"), big);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
