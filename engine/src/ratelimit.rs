//! Rate limits (SPEC §9): per caller (user id, else client IP) and action, over a sliding hour
//! made of one-minute slices, shared by all instances and surviving restarts.
//!
//! Every count is added to the database (`rate_counts`) *before* the request it admits, in one
//! short transaction that takes a per-key lock, reads the window's total and adds the count
//! only if it fits ([`Store::add_rate_count_within`]). So the limit holds exactly however many
//! instances share it: concurrent decisions for one caller take turns in the database.
//!
//! - **Reads and writes** do not pay that round trip per request: an instance reserves a
//!   *lease* of several requests at once (a tenth of the limit, less as the window fills: a
//!   quarter of what is left, so near the limit every request is decided alone) and admits
//!   requests from it locally, within the minute it was reserved in. Once the caller's
//!   window is three-quarters full, what a lease has left is given back at the next sync
//!   (every `flush_interval`), so near the limit quota reserved here but unused keeps another
//!   instance from it for at most that long; before that, a lease is kept while its caller
//!   keeps coming back (given back after [`LEASE_IDLE_MS`] without), so a caller who sends a
//!   request every few seconds costs no reservation per request. A process killed outright
//!   loses its leases: the caller is counted for up to one lease of requests it did not make,
//!   never the other way round.
//! - **Creations** (pods, streams) reserve exactly what each request needs: they write to the
//!   database anyway, and their limits are small (10 pods an hour).
//!
//! Refunds (a request counted and then refused by another rule, so it did nothing) go back
//! into the lease, or straight to the database for creations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use webpods_storage::{RateDelta, Store};

use crate::clock::now_ms;
use crate::error::{Error, ErrorKind, Result};

const SLICE_MS: i64 = 60_000;
/// A caller not seen for this long gives back its lease at the next sync, wherever the rest
/// of its window stands.
const LEASE_IDLE_MS: i64 = 10_000;
/// Slices in the sliding window (one hour).
const WINDOW_SLICES: i64 = 60;

/// What is being rate-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Read,
    Write,
    PodCreate,
    StreamCreate,
}

impl Action {
    /// Decided in the database, one caller at a time, so that every instance's count is in
    /// the decision (see the module doc).
    fn counted_in_the_database(self) -> bool {
        matches!(self, Action::PodCreate | Action::StreamCreate)
    }

    fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::PodCreate => "pod_create",
            Action::StreamCreate => "stream_create",
        }
    }
}

/// Limits per hour; `enabled = false` switches limiting off.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    pub enabled: bool,
    pub read: u64,
    pub write: u64,
    pub pod_create: u64,
    pub stream_create: u64,
    pub flush_interval: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enabled: true,
            read: 10_000,
            write: 1_000,
            pod_create: 10,
            stream_create: 100,
            flush_interval: Duration::from_millis(300),
        }
    }
}

impl RateLimits {
    fn limit(&self, a: Action) -> u64 {
        match a {
            Action::Read => self.read,
            Action::Write => self.write,
            Action::PodCreate => self.pod_create,
            Action::StreamCreate => self.stream_create,
        }
    }
}

/// The state of one caller's limit after a request, for the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Unix seconds: after a counted request, when every request counted so far has left the
    /// sliding window (the whole limit is free again unless more are made); after a refusal,
    /// when one more request fits.
    pub reset: i64,
}

#[derive(Default)]
struct Counter {
    /// Requests reserved in the database (in slice `lease_slice`) and not used yet.
    lease: i64,
    lease_slice: i64,
    /// What the window had left, every instance's reservations included, after this
    /// instance's last reservation (the `X-RateLimit-Remaining` beside the lease).
    remaining: i64,
    /// To add to the database at the next sync, by slice: unused leases and refunds given
    /// back (negative counts).
    pending: HashMap<i64, i64>,
    /// Last slice this key was used in (keys idle for a whole window are dropped).
    last_slice: i64,
    /// When this key was last used here (epoch ms): an idle key's lease goes back.
    last_used_ms: i64,
    /// After a refusal: when the caller may try again (unix seconds), so that a caller who
    /// keeps knocking costs no database read per refusal until the next sync.
    free_at: Option<i64>,
    /// One reservation at a time per key on this instance: the requests that arrive while it
    /// runs use its lease instead of reserving their own.
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Counter {
    /// Takes `n` from the lease if it holds them (a lease of an earlier slice is given back
    /// first: requests are counted in the slice they are made in); returns what is left.
    fn take(&mut self, slice: i64, n: i64) -> Option<i64> {
        if self.lease_slice != slice {
            self.give_back_lease();
            self.lease_slice = slice;
        }
        if self.lease < n {
            return None;
        }
        self.lease -= n;
        Some(self.remaining + self.lease)
    }

    fn give_back_lease(&mut self) {
        if self.lease > 0 {
            *self.pending.entry(self.lease_slice).or_default() -= self.lease;
            self.lease = 0;
        }
    }
}

/// How many requests to reserve at once when `available` are left of `limit` and `n` are
/// needed now.
fn lease_size(limit: i64, available: i64, n: i64) -> i64 {
    n.max((limit / 10).min(available / 4))
}

/// A count of `caller`'s `action` in `slice`, as the database stores it.
fn delta(caller: &str, action: Action, slice: i64, count: i64) -> RateDelta {
    RateDelta {
        caller: caller.to_string(),
        action: action.as_str().to_string(),
        slice,
        count,
    }
}

type Key = (String, Action);

pub(crate) struct RateLimiter {
    limits: RateLimits,
    store: Store,
    counters: Mutex<HashMap<Key, Counter>>,
}

impl RateLimiter {
    pub(crate) fn start(store: Store, limits: RateLimits) -> Arc<RateLimiter> {
        let limiter = Arc::new(RateLimiter {
            limits,
            store,
            counters: Mutex::new(HashMap::new()),
        });
        let weak: Weak<RateLimiter> = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(limits.flush_interval);
            loop {
                tick.tick().await;
                let Some(l) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = l.flush(false).await {
                    tracing::warn!(error = %e, "rate-limit counters could not be synced");
                }
            }
        });
        limiter
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Counter>> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `n` requests at once, or refuses them all with 429 `RATE_LIMIT_EXCEEDED`.
    pub(crate) async fn check(&self, caller: &str, action: Action, n: u64) -> Result<RateStatus> {
        let limit = self.limits.limit(action);
        if n > limit {
            // It would never fit: no point in telling the caller to come back.
            let reset = window_end(now_ms() / SLICE_MS);
            return Err(refusal(action, limit, n, limit, reset));
        }
        if action.counted_in_the_database() {
            return self.check_in_the_database(caller, action, limit, n).await;
        }
        let key = (caller.to_string(), action);
        let slice = now_ms() / SLICE_MS;
        // A sliding window has no moment when everything resets at once: the requests of this
        // slice are the last to leave it.
        let reset = window_end(slice);
        let need = i64::try_from(n).unwrap_or(i64::MAX);
        let cap = i64::try_from(limit).unwrap_or(i64::MAX);
        let status = |left: i64| RateStatus {
            limit,
            remaining: u64::try_from(left).unwrap_or(0),
            reset,
        };
        let gate = {
            let mut map = self.lock();
            let c = map.entry(key.clone()).or_default();
            c.last_slice = slice;
            c.last_used_ms = now_ms();
            if let Some(left) = c.take(slice, need) {
                return Ok(status(left));
            }
            if let Some(at) = c.free_at.filter(|at| *at > now_ms() / 1000) {
                let left = u64::try_from(c.remaining + c.lease).unwrap_or(0);
                return Err(refusal(action, limit, n, left, at));
            }
            c.gate.clone()
        };
        let _turn = gate.lock().await;
        let mut want = {
            let mut map = self.lock();
            let c = map.entry(key.clone()).or_default();
            // Reserved by the request this one waited for.
            if let Some(left) = c.take(slice, need) {
                return Ok(status(left));
            }
            lease_size(cap, if c.remaining > 0 { c.remaining } else { cap }, need)
        };
        let since = slice - WINDOW_SLICES + 1;
        let mut total = 0;
        for _ in 0..3 {
            let reservation = delta(caller, action, slice, want);
            let added;
            (added, total) = self
                .store
                .add_rate_count_within(&reservation, since, cap)
                .await?;
            if added {
                let mut map = self.lock();
                let c = map.entry(key).or_default();
                if c.lease_slice != slice {
                    c.give_back_lease();
                    c.lease_slice = slice;
                }
                c.lease += want - need;
                c.remaining = cap - total;
                c.free_at = None;
                return Ok(status(c.remaining + c.lease));
            }
            let available = cap - total;
            if available < need {
                break;
            }
            // Less is left than the lease asked for: ask for a part of what is.
            want = lease_size(cap, available, need);
        }
        let left = u64::try_from(cap - total).unwrap_or(0);
        // Unsynced give-backs are this instance's part of the counts; the database has the rest.
        let local: Vec<(i64, i64)> = match self.lock().get(&(caller.to_string(), action)) {
            Some(c) => c.pending.iter().map(|(s, n)| (*s, *n)).collect(),
            None => Vec::new(),
        };
        let at = self
            .reset_after_refusal(caller, action, limit, n, local)
            .await;
        if let Some(c) = self.lock().get_mut(&(caller.to_string(), action)) {
            c.free_at = Some(at);
        }
        Err(refusal(action, limit, n, left, at))
    }

    /// Adds `n` to the caller's count in the database only if the window's total (every
    /// instance's committed count) stays within the limit: concurrent decisions for one
    /// caller and action take turns there, so exactly the limit is admitted, on one instance
    /// or many.
    async fn check_in_the_database(
        &self,
        caller: &str,
        action: Action,
        limit: u64,
        n: u64,
    ) -> Result<RateStatus> {
        let slice = now_ms() / SLICE_MS;
        let since = slice - WINDOW_SLICES + 1;
        let count = delta(caller, action, slice, i64::try_from(n).unwrap_or(i64::MAX));
        let cap = i64::try_from(limit).unwrap_or(i64::MAX);
        let (added, total) = self.store.add_rate_count_within(&count, since, cap).await?;
        let total = u64::try_from(total).unwrap_or(0);
        if added {
            return Ok(RateStatus {
                limit,
                remaining: limit.saturating_sub(total),
                reset: window_end(slice),
            });
        }
        let left = limit.saturating_sub(total);
        let reset = self
            .reset_after_refusal(caller, action, limit, n, Vec::new())
            .await;
        Err(refusal(action, limit, n, left, reset))
    }

    /// Takes back `n` requests of `caller` for `action` counted in this window: they were
    /// refused after they were counted (a write whose stream creation was refused, a pod
    /// creation with a taken name), so they used nothing. A read or write goes back into this
    /// instance's lease (or, from an earlier minute, to the database at the next sync); a
    /// creation goes back to the database at once, where the next decision looks.
    pub(crate) async fn refund(&self, caller: &str, action: Action, n: u64) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let slice = now_ms() / SLICE_MS;
        if action.counted_in_the_database() {
            // The next decision reads the database: the count goes back there now.
            let back = delta(caller, action, slice, -n);
            if let Err(e) = self.store.add_rate_counts(&[back]).await {
                tracing::warn!(error = %e, "a rate-limit refund could not be written");
            }
            return;
        }
        // Back into the lease (of this slice; an older one's was given back already).
        if let Some(c) = self.lock().get_mut(&(caller.to_string(), action)) {
            if c.lease_slice == slice {
                c.lease += n;
            } else {
                *c.pending.entry(slice).or_default() -= n;
            }
        }
    }

    /// When a refused caller may try again (unix seconds): the end of the minute in which
    /// enough of the counted requests have left the sliding hour for one more to fit. Reads
    /// the caller's slices from the database (a refusal is the rare path); should that fail,
    /// the whole window from now is the safe answer.
    async fn reset_after_refusal(
        &self,
        caller: &str,
        action: Action,
        limit: u64,
        wanted: u64,
        local: Vec<(i64, i64)>,
    ) -> i64 {
        let slice = now_ms() / SLICE_MS;
        let since = slice - WINDOW_SLICES + 1;
        let stored = match self.store.rate_slices(caller, action.as_str(), since).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "rate-limit slices could not be read");
                return window_end(slice);
            }
        };
        free_at(stored.into_iter().chain(local), limit, wanted, slice)
    }

    /// Syncs now (at shutdown: requests counted since the last tick must not be forgotten).
    pub(crate) async fn flush_now(&self) {
        if let Err(e) = self.flush(true).await {
            tracing::warn!(error = %e, "rate-limit counters could not be synced at shutdown");
        }
    }

    /// Writes out refunds and unused leases given back, so that quota this instance reserved
    /// but did not use is free for the others again. A lease is given back here once its
    /// caller's window is three-quarters full, once the caller has not been seen here for
    /// [`LEASE_IDLE_MS`], or (`all`) at shutdown; until then it costs no one anything, and
    /// keeping it spares a caller who comes back every few seconds a reservation per request.
    async fn flush(&self, all: bool) -> Result<()> {
        let now_slice = now_ms() / SLICE_MS;
        let since = now_slice - WINDOW_SLICES + 1;
        // (key, slice, count) owed to the database.
        let owed: Vec<(Key, i64, i64)> = {
            let mut map = self.lock();
            let mut owed = Vec::new();
            for (key, c) in map.iter_mut() {
                let cap = i64::try_from(self.limits.limit(key.1)).unwrap_or(i64::MAX);
                let idle = now_ms() - c.last_used_ms >= LEASE_IDLE_MS;
                if all || idle || c.remaining < cap / 4 || c.last_slice < since {
                    c.give_back_lease();
                }
                // A cached refusal is re-checked after a sync: others may have given back.
                c.free_at = None;
                owed.extend(
                    c.pending
                        .drain()
                        .filter(|(_, count)| *count != 0)
                        .map(|(slice, count)| (key.clone(), slice, count)),
                );
            }
            map.retain(|_, c| c.last_slice >= since || c.lease > 0);
            owed
        };
        if owed.is_empty() {
            return Ok(());
        }
        let deltas: Vec<RateDelta> = owed
            .iter()
            .map(|((caller, action), slice, count)| delta(caller, *action, *slice, *count))
            .collect();
        if let Err(e) = self.store.add_rate_counts(&deltas).await {
            // Keep them for the next attempt.
            let mut map = self.lock();
            for (key, slice, count) in owed {
                *map.entry(key)
                    .or_default()
                    .pending
                    .entry(slice)
                    .or_default() += count;
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// The unix second at which a caller with these (slice, count) pairs, counted in the window
/// that ends with `now_slice`, has fewer than `limit` requests in the window again: the oldest
/// slices leave first, each at the end of the window it opened.
fn free_at(
    counts: impl Iterator<Item = (i64, i64)>,
    limit: u64,
    wanted: u64,
    now_slice: i64,
) -> i64 {
    let mut by_slice = std::collections::BTreeMap::<i64, i64>::new();
    for (slice, n) in counts {
        *by_slice.entry(slice).or_default() += n;
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let wanted = i64::try_from(wanted).unwrap_or(i64::MAX);
    let mut used: i64 = by_slice.values().sum();
    // Once `slice` leaves the window (the minute after its last one), its count no longer
    // counts; the first slice after which `wanted` more fit decides.
    let mut free_slice = now_slice + 1;
    for (slice, n) in by_slice {
        if used.saturating_add(wanted) <= limit {
            break;
        }
        used -= n;
        free_slice = slice + WINDOW_SLICES;
    }
    free_slice.max(now_slice + 1) * SLICE_MS / 1000
}

impl crate::Engine {
    /// Counts a request of `caller` (a user id or `ip:…`) for `action`. `Ok(None)` when rate
    /// limiting is off.
    pub async fn rate_limit(&self, caller: &str, action: Action) -> Result<Option<RateStatus>> {
        self.rate_limit_n(caller, action, 1).await
    }

    /// Counts `n` requests of `caller` for `action` at once, or none of them (429).
    pub(crate) async fn rate_limit_n(
        &self,
        caller: &str,
        action: Action,
        n: u64,
    ) -> Result<Option<RateStatus>> {
        match &self.inner.rate {
            Some(l) => l.check(caller, action, n).await.map(Some),
            None => Ok(None),
        }
    }

    /// Takes back `n` requests counted by [`rate_limit`](crate::Engine::rate_limit) that did
    /// nothing: another limit refused them, or (a pod creation) the request was refused before
    /// anything was created. Only for refusals that certainly changed nothing.
    pub async fn rate_refund(&self, caller: &str, action: Action, n: u64) {
        if let Some(l) = &self.inner.rate {
            l.refund(caller, action, n).await;
        }
    }
}

/// The unix second at which requests counted in `slice` leave the sliding window.
fn window_end(slice: i64) -> i64 {
    (slice + WINDOW_SLICES) * SLICE_MS / 1000
}

/// 429 `RATE_LIMIT_EXCEEDED` for `n` requests of which `left` would have fitted.
fn refusal(action: Action, limit: u64, n: u64, left: u64, reset: i64) -> Error {
    let retry_after = (reset - now_ms() / 1000).max(1);
    let message = if n > limit {
        format!(
            "this request counts as {n} {} requests, more than the {limit} allowed per hour: \
             it cannot be made at once",
            action.as_str()
        )
    } else if n > 1 {
        format!(
            "this request counts as {n} {} requests; {left} of the {limit} per hour are left",
            action.as_str()
        )
    } else {
        format!(
            "rate limit of {limit} {} requests per hour exceeded",
            action.as_str()
        )
    };
    Error::with_details(
        ErrorKind::RateLimitExceeded,
        message,
        serde_json::json!({ "limit": limit, "remaining": left, "reset": reset, "retryAfter": retry_after }),
    )
}

impl Error {
    /// The figures of a 429 `RATE_LIMIT_EXCEEDED` (as the limiter wrote them in the details),
    /// for a frontend's headers: the refused bucket's state, and the seconds until one more
    /// request fits (`Retry-After`).
    pub fn rate_refusal(&self) -> Option<(RateStatus, i64)> {
        if self.kind() != ErrorKind::RateLimitExceeded {
            return None;
        }
        let d = self.details()?;
        let num = |k: &str| d.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
        let status = RateStatus {
            limit: u64::try_from(num("limit")).unwrap_or(0),
            remaining: u64::try_from(num("remaining")).unwrap_or(0),
            reset: num("reset"),
        };
        Some((status, num("retryAfter").max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::{SLICE_MS, WINDOW_SLICES, free_at};

    #[test]
    fn a_refused_caller_is_told_when_enough_requests_have_left_the_window() {
        let now = 1_000;
        let at = |slice: i64| slice * SLICE_MS / 1000;
        // 5 requests 40 minutes ago and 5 now, limit 5: the recent 5 alone fill the window, so
        // only their leaving frees it.
        assert_eq!(
            free_at([(now - 40, 5), (now, 5)].into_iter(), 5, 1, now),
            at(now + WINDOW_SLICES)
        );
        // Limit 6: free as soon as the old slice leaves the window.
        assert_eq!(
            free_at([(now - 40, 5), (now, 5)].into_iter(), 6, 1, now),
            at(now - 40 + WINDOW_SLICES)
        );
        // Counts of one slice from several sources add up.
        assert_eq!(
            free_at(
                [(now - 59, 1), (now - 10, 2), (now - 10, 1)].into_iter(),
                4,
                1,
                now
            ),
            at(now - 59 + WINDOW_SLICES)
        );
        assert_eq!(
            free_at(
                [(now - 59, 1), (now - 10, 2), (now - 10, 1)].into_iter(),
                3,
                1,
                now
            ),
            at(now - 10 + WINDOW_SLICES)
        );
        // Never earlier than the next minute.
        assert_eq!(free_at(std::iter::empty(), 1, 1, now), at(now + 1));
        // A request counting as 3 under a limit of 5 with 3 used: free once 1 has left, not
        // at the next minute (when one more would fit).
        assert_eq!(
            free_at([(now - 50, 1), (now - 5, 2)].into_iter(), 5, 3, now),
            at(now - 50 + WINDOW_SLICES)
        );
    }
}
