//! Accounts: identities, login sessions, single-use OAuth states, permission records and
//! rate-limit counters.

use crate::{PgStore, RECORD_COLUMNS, RecordRow, Result, SqliteStore, Store};

/// A login session.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionRow {
    pub id: String,
    pub user_id: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A pending OAuth login (PKCE verifier kept server-side).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OAuthStateRow {
    pub state: String,
    pub provider: String,
    pub verifier: String,
    pub redirect: Option<String>,
    pub expires_at: i64,
}

/// What a user is called, from their first identity.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct IdentityRow {
    pub provider: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

/// Additions to one rate-limit counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateDelta {
    pub caller: String,
    pub action: String,
    pub slice: i64,
    pub count: i64,
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Postgres($s) => $e,
            Store::Sqlite($s) => $e,
        }
    };
}

impl Store {
    /// The first identity of a user.
    pub async fn identity_of(&self, user_id: &str) -> Result<Option<IdentityRow>> {
        dispatch!(self, s => s.identity_of(user_id).await)
    }

    pub async fn create_session(&self, s: &SessionRow) -> Result<()> {
        dispatch!(self, st => st.create_session(s).await)
    }

    /// A session that exists and has not expired at `now`.
    pub async fn get_session(&self, id: &str, now: i64) -> Result<Option<SessionRow>> {
        dispatch!(self, s => s.get_session(id, now).await)
    }

    pub async fn list_sessions(&self, user_id: &str, now: i64) -> Result<Vec<SessionRow>> {
        dispatch!(self, s => s.list_sessions(user_id, now).await)
    }

    /// Deletes a session of this user; `false` when there was none.
    pub async fn delete_session(&self, id: &str, user_id: &str) -> Result<bool> {
        dispatch!(self, s => s.delete_session(id, user_id).await)
    }

    pub async fn put_oauth_state(&self, s: &OAuthStateRow) -> Result<()> {
        dispatch!(self, st => st.put_oauth_state(s).await)
    }

    /// Removes and returns a login state: each state can be used once, on any instance.
    pub async fn take_oauth_state(&self, state: &str) -> Result<Option<OAuthStateRow>> {
        dispatch!(self, s => s.take_oauth_state(state).await)
    }

    /// Records of a stream written by `author`, newest first (permission streams).
    pub async fn records_by_author(&self, stream_id: i64, author: &str) -> Result<Vec<RecordRow>> {
        dispatch!(self, s => s.records_by_author(stream_id, author).await)
    }

    /// Adds counts (negative ones give back what was counted), unconditionally.
    pub async fn add_rate_counts(&self, deltas: &[RateDelta]) -> Result<()> {
        dispatch!(self, s => s.add_rate_counts(deltas).await)
    }

    /// Adds `count` to (caller, action)'s slice only if the total over slices `>= since`
    /// stays within `limit`, as one decision among concurrent callers on every instance (they
    /// wait for each other). Returns whether it was added, and the total with it if so
    /// (without it otherwise).
    pub async fn add_rate_count_within(
        &self,
        delta: &RateDelta,
        since: i64,
        limit: i64,
    ) -> Result<(bool, i64)> {
        dispatch!(self, s => s.add_rate_count_within(delta, since, limit).await)
    }

    /// One (caller, action)'s counts by slice over slices `>= since`, oldest first: when a
    /// refused caller may try again.
    pub async fn rate_slices(
        &self,
        caller: &str,
        action: &str,
        since: i64,
    ) -> Result<Vec<(i64, i64)>> {
        dispatch!(self, s => s.rate_slices(caller, action, since).await)
    }
}

impl PgStore {
    async fn identity_of(&self, user_id: &str) -> Result<Option<IdentityRow>> {
        Ok(sqlx::query_as(
            "SELECT provider, email, name FROM identities WHERE user_id = $1 \
             ORDER BY created_at LIMIT 1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn create_session(&self, s: &SessionRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&s.id)
        .bind(&s.user_id)
        .bind(s.created_at)
        .bind(s.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_session(&self, id: &str, now: i64) -> Result<Option<SessionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at FROM sessions WHERE id = $1 AND expires_at > $2",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn list_sessions(&self, user_id: &str, now: i64) -> Result<Vec<SessionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at FROM sessions \
             WHERE user_id = $1 AND expires_at > $2 ORDER BY created_at",
        )
        .bind(user_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_session(&self, id: &str, user_id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sessions WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn put_oauth_state(&self, s: &OAuthStateRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO oauth_states (state, provider, verifier, redirect, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&s.state)
        .bind(&s.provider)
        .bind(&s.verifier)
        .bind(&s.redirect)
        .bind(s.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_oauth_state(&self, state: &str) -> Result<Option<OAuthStateRow>> {
        Ok(sqlx::query_as(
            "DELETE FROM oauth_states WHERE state = $1 \
             RETURNING state, provider, verifier, redirect, expires_at",
        )
        .bind(state)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn records_by_author(&self, stream_id: i64, author: &str) -> Result<Vec<RecordRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = $1 AND author = $2 ORDER BY idx DESC"
        )))
        .bind(stream_id)
        .bind(author)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn add_rate_counts(&self, deltas: &[RateDelta]) -> Result<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        let callers: Vec<&str> = deltas.iter().map(|d| d.caller.as_str()).collect();
        let actions: Vec<&str> = deltas.iter().map(|d| d.action.as_str()).collect();
        let slices: Vec<i64> = deltas.iter().map(|d| d.slice).collect();
        let counts: Vec<i64> = deltas.iter().map(|d| d.count).collect();
        sqlx::query(
            "INSERT INTO rate_counts (caller, action, slice, count) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
             ON CONFLICT (caller, action, slice) DO UPDATE SET count = rate_counts.count + excluded.count",
        )
        .bind(&callers)
        .bind(&actions)
        .bind(&slices)
        .bind(&counts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn add_rate_count_within(
        &self,
        d: &RateDelta,
        since: i64,
        limit: i64,
    ) -> Result<(bool, i64)> {
        let mut tx = self.pool.begin().await?;
        // Concurrent decisions for one key, from any instance, take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("rate:{}:{}", d.caller, d.action))
            .execute(&mut *tx)
            .await?;
        let total: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(count), 0)::bigint FROM rate_counts \
             WHERE caller = $1 AND action = $2 AND slice >= $3",
        )
        .bind(&d.caller)
        .bind(&d.action)
        .bind(since)
        .fetch_one(&mut *tx)
        .await?;
        if total.saturating_add(d.count) > limit {
            return Ok((false, total));
        }
        sqlx::query(
            "INSERT INTO rate_counts (caller, action, slice, count) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (caller, action, slice) DO UPDATE SET count = rate_counts.count + excluded.count",
        )
        .bind(&d.caller)
        .bind(&d.action)
        .bind(d.slice)
        .bind(d.count)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((true, total + d.count))
    }

    async fn rate_slices(&self, caller: &str, action: &str, since: i64) -> Result<Vec<(i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT slice, count FROM rate_counts \
             WHERE caller = $1 AND action = $2 AND slice >= $3 ORDER BY slice",
        )
        .bind(caller)
        .bind(action)
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }
}

impl SqliteStore {
    async fn identity_of(&self, user_id: &str) -> Result<Option<IdentityRow>> {
        Ok(sqlx::query_as(
            "SELECT provider, email, name FROM identities WHERE user_id = ? ORDER BY created_at LIMIT 1",
        )
        .bind(user_id)
        .fetch_optional(&self.readers)
        .await?)
    }

    async fn create_session(&self, s: &SessionRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.user_id)
        .bind(s.created_at)
        .bind(s.expires_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_session(&self, id: &str, now: i64) -> Result<Option<SessionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at FROM sessions WHERE id = ? AND expires_at > ?",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.readers)
        .await?)
    }

    async fn list_sessions(&self, user_id: &str, now: i64) -> Result<Vec<SessionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at FROM sessions \
             WHERE user_id = ? AND expires_at > ? ORDER BY created_at",
        )
        .bind(user_id)
        .bind(now)
        .fetch_all(&self.readers)
        .await?)
    }

    async fn delete_session(&self, id: &str, user_id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sessions WHERE id = ? AND user_id = ?")
            .bind(id)
            .bind(user_id)
            .execute(&self.writer)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn put_oauth_state(&self, s: &OAuthStateRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO oauth_states (state, provider, verifier, redirect, expires_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&s.state)
        .bind(&s.provider)
        .bind(&s.verifier)
        .bind(&s.redirect)
        .bind(s.expires_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn take_oauth_state(&self, state: &str) -> Result<Option<OAuthStateRow>> {
        Ok(sqlx::query_as(
            "DELETE FROM oauth_states WHERE state = ? \
             RETURNING state, provider, verifier, redirect, expires_at",
        )
        .bind(state)
        .fetch_optional(&self.writer)
        .await?)
    }

    async fn records_by_author(&self, stream_id: i64, author: &str) -> Result<Vec<RecordRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE stream_id = ? AND author = ? ORDER BY idx DESC"
        )))
        .bind(stream_id)
        .bind(author)
        .fetch_all(&self.readers)
        .await?)
    }

    async fn add_rate_counts(&self, deltas: &[RateDelta]) -> Result<()> {
        let mut tx = self.begin().await?;
        for d in deltas {
            sqlite_add_count(&mut tx, d).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn add_rate_count_within(
        &self,
        d: &RateDelta,
        since: i64,
        limit: i64,
    ) -> Result<(bool, i64)> {
        // One writer connection: transactions take turns.
        let mut tx = self.begin().await?;
        let total = sqlite_window_total(&mut tx, &d.caller, &d.action, since).await?;
        if total.saturating_add(d.count) > limit {
            return Ok((false, total));
        }
        sqlite_add_count(&mut tx, d).await?;
        tx.commit().await?;
        Ok((true, total + d.count))
    }

    async fn rate_slices(&self, caller: &str, action: &str, since: i64) -> Result<Vec<(i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT slice, count FROM rate_counts \
             WHERE caller = ? AND action = ? AND slice >= ? ORDER BY slice",
        )
        .bind(caller)
        .bind(action)
        .bind(since)
        .fetch_all(&self.readers)
        .await?)
    }
}

/// Adds a delta to its (caller, action, slice) count (SQLite).
async fn sqlite_add_count(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    d: &RateDelta,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO rate_counts (caller, action, slice, count) VALUES (?, ?, ?, ?) \
         ON CONFLICT (caller, action, slice) DO UPDATE SET count = count + excluded.count",
    )
    .bind(&d.caller)
    .bind(&d.action)
    .bind(d.slice)
    .bind(d.count)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A (caller, action)'s total over slices `>= since` (SQLite).
async fn sqlite_window_total(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    caller: &str,
    action: &str,
    since: i64,
) -> Result<i64> {
    let sum: Option<i64> = sqlx::query_scalar(
        "SELECT SUM(count) FROM rate_counts WHERE caller = ? AND action = ? AND slice >= ?",
    )
    .bind(caller)
    .bind(action)
    .bind(since)
    .fetch_one(&mut **tx)
    .await?;
    Ok(sum.unwrap_or(0))
}
