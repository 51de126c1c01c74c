//! The metrics of one server instance (SPEC §10), rendered in the Prometheus text exposition
//! format (version 0.0.4) by [`Metrics::render`].
//!
//! Every series is defined here, so the engine and every frontend share one registry: the
//! engine counts commits and cache lookups, the REST layer counts requests, and every live
//! subscription the engine opens for a frontend (WebSocket, SSE, GraphQL) holds a
//! [`LiveSubscription`] until it ends. Gauges that are cheaper to read than to
//! maintain (active stream actors, database pool) are sampled at scrape time and passed to
//! [`Metrics::render`] as a [`Snapshot`].
//!
//! The implementation is deliberately small (atomics, fixed histogram buckets, no dependency):
//! labels are `&'static str`, so a label can never carry a raw path, a user id or a token, and
//! the number of series is bounded by the code, not by traffic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds (seconds) of request and commit latencies.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of batch sizes (records per commit transaction).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A histogram with fixed buckets. Observations are lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts, one per bound plus `+Inf`.
    buckets: Vec<AtomicU64>,
    /// Sum of observations, as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// The engine's caches, each counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Pods,
    Streams,
    Routes,
    Domains,
    /// Records read by name or index.
    Records,
    /// Pages of record lists.
    Pages,
}

impl CacheKind {
    const ALL: [CacheKind; 6] = [
        CacheKind::Pods,
        CacheKind::Streams,
        CacheKind::Routes,
        CacheKind::Domains,
        CacheKind::Records,
        CacheKind::Pages,
    ];

    fn label(self) -> &'static str {
        match self {
            CacheKind::Pods => "pods",
            CacheKind::Streams => "streams",
            CacheKind::Routes => "routes",
            CacheKind::Domains => "domains",
            CacheKind::Records => "records",
            CacheKind::Pages => "pages",
        }
    }
}

#[derive(Debug, Default)]
struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Values sampled at scrape time by whoever owns them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Stream actors alive in this instance.
    pub active_actors: usize,
    /// Open database connections (in use + idle).
    pub pool_connections: u64,
    /// Idle database connections.
    pub pool_idle: u64,
    /// Most connections the pool may open.
    pub pool_max: u64,
}

/// The metric registry of one server instance. Shared through [`crate::Engine::metrics`].
#[derive(Debug)]
pub struct Metrics {
    /// Requests by (route, status): the histogram's count is the request count.
    requests: Mutex<BTreeMap<(&'static str, u16), Histogram>>,
    appended_records: AtomicU64,
    commits_failed: AtomicU64,
    /// Stream actors stopped to keep the live ones under the cap.
    evicted_actors: AtomicU64,
    batch_records: Histogram,
    commit_seconds: Histogram,
    /// Streams per cross-stream write statement, and its latency.
    statement_streams: Histogram,
    statement_seconds: Histogram,
    /// Chained batches whose compare-and-swap missed (they took the locking path).
    stale_swaps: AtomicU64,
    /// Follower statements (the second half of a split batch): written, not written.
    followers: [AtomicU64; 2],
    live_subscriptions: AtomicI64,
    caches: [CacheCounters; 6],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            appended_records: AtomicU64::new(0),
            commits_failed: AtomicU64::new(0),
            evicted_actors: AtomicU64::new(0),
            batch_records: Histogram::new(BATCH_BUCKETS),
            commit_seconds: Histogram::new(LATENCY_BUCKETS),
            statement_streams: Histogram::new(BATCH_BUCKETS),
            statement_seconds: Histogram::new(LATENCY_BUCKETS),
            stale_swaps: AtomicU64::new(0),
            followers: Default::default(),
            live_subscriptions: AtomicI64::new(0),
            caches: Default::default(),
        }
    }
}

/// Counts one live subscription for as long as it is held (see [`Metrics::live_subscription`]).
#[derive(Debug)]
pub struct LiveSubscription {
    metrics: std::sync::Arc<Metrics>,
}

impl Drop for LiveSubscription {
    fn drop(&mut self) {
        self.metrics
            .live_subscriptions
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// One finished HTTP request. `route` is a fixed, low-cardinality name (never a raw path).
    pub fn observe_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        // A poisoned map is still a valid map (every update is a single insert or add).
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((route, status))
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    /// A committed group-commit transaction that wrote `records` records.
    pub fn observe_commit(&self, records: usize, elapsed: Duration) {
        self.appended_records
            .fetch_add(records as u64, Ordering::Relaxed);
        self.batch_records.observe(records as f64);
        self.commit_seconds.observe(elapsed.as_secs_f64());
    }

    /// One cross-stream write statement that carried `streams` streams' batches.
    pub fn observe_statement(&self, streams: usize, elapsed: Duration) {
        self.statement_streams.observe(streams as f64);
        self.statement_seconds.observe(elapsed.as_secs_f64());
    }

    /// A chained batch found its stream moved on and went to the locking path.
    pub fn observe_stale_swap(&self) {
        self.stale_swaps.fetch_add(1, Ordering::Relaxed);
    }

    /// A follower statement (the second half of a split batch) that was or was not written.
    pub fn observe_follower(&self, written: bool) {
        self.followers[usize::from(!written)].fetch_add(1, Ordering::Relaxed);
    }

    /// A commit transaction that failed (nothing of it was stored).
    pub fn observe_failed_commit(&self) {
        self.commits_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` stream actors stopped because more than the cap were alive.
    pub fn observe_evicted_actors(&self, n: usize) {
        self.evicted_actors.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One lookup in an engine cache.
    pub fn observe_cache(&self, cache: CacheKind, hit: bool) {
        let c = &self.caches[cache as usize];
        if hit {
            c.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            c.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a live subscription (WebSocket, SSE or GraphQL) until the guard is dropped.
    pub fn live_subscription(self: &std::sync::Arc<Self>) -> LiveSubscription {
        self.live_subscriptions.fetch_add(1, Ordering::Relaxed);
        LiveSubscription {
            metrics: self.clone(),
        }
    }

    /// Live subscriptions open now.
    pub fn live_subscriptions(&self) -> i64 {
        self.live_subscriptions.load(Ordering::Relaxed)
    }

    /// Records committed since start.
    pub fn appended_records(&self) -> u64 {
        self.appended_records.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        // A series with one value, and an unlabelled histogram.
        let scalar = |out: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      value: &dyn std::fmt::Display| {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        let histogram = |out: &mut String, name: &str, help: &str, h: &Histogram| {
            header(out, name, "histogram", help);
            h.write(out, name, "");
        };
        {
            let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            header(
                &mut out,
                "webpods_http_requests_total",
                "counter",
                "HTTP requests by route and status.",
            );
            for ((route, status), h) in map.iter() {
                let _ = writeln!(
                    out,
                    "webpods_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {}",
                    h.count()
                );
            }
            header(
                &mut out,
                "webpods_http_request_duration_seconds",
                "histogram",
                "HTTP request latency by route and status.",
            );
            for ((route, status), h) in map.iter() {
                h.write(
                    &mut out,
                    "webpods_http_request_duration_seconds",
                    &format!("route=\"{route}\",status=\"{status}\""),
                );
            }
        }
        scalar(
            &mut out,
            "webpods_appended_records_total",
            "counter",
            "Records committed to streams.",
            &self.appended_records(),
        );
        scalar(
            &mut out,
            "webpods_commit_failures_total",
            "counter",
            "Group-commit transactions that failed (nothing of them was stored).",
            &self.commits_failed.load(Ordering::Relaxed),
        );
        histogram(
            &mut out,
            "webpods_commit_batch_records",
            "Records per group-commit transaction.",
            &self.batch_records,
        );
        histogram(
            &mut out,
            "webpods_commit_duration_seconds",
            "Latency of group-commit transactions.",
            &self.commit_seconds,
        );
        histogram(
            &mut out,
            "webpods_write_statement_streams",
            "Streams per cross-stream write statement (group commit across streams).",
            &self.statement_streams,
        );
        histogram(
            &mut out,
            "webpods_write_statement_duration_seconds",
            "Latency of cross-stream write statements.",
            &self.statement_seconds,
        );
        scalar(
            &mut out,
            "webpods_stale_swaps_total",
            "counter",
            "Chained batches whose stream had moved on (committed through the locking path).",
            &self.stale_swaps.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "webpods_follower_statements_total",
            "counter",
            "Second halves of split batches, committed overlapping the first (not written: the \
             first half was not, or the head moved).",
        );
        for (result, n) in ["written", "not_written"].iter().zip(&self.followers) {
            let _ = writeln!(
                out,
                "webpods_follower_statements_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        scalar(
            &mut out,
            "webpods_active_stream_actors",
            "gauge",
            "Stream actors alive in this instance.",
            &snap.active_actors,
        );
        scalar(
            &mut out,
            "webpods_evicted_stream_actors_total",
            "counter",
            "Stream actors stopped before their idle timeout because more than the cap were alive.",
            &self.evicted_actors.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "webpods_live_subscriptions",
            "gauge",
            "Open live-tail subscriptions (WebSocket, SSE, GraphQL).",
            &self.live_subscriptions(),
        );
        header(
            &mut out,
            "webpods_cache_requests_total",
            "counter",
            "Lookups in the engine's caches by cache and result (hit or miss).",
        );
        for kind in CacheKind::ALL {
            let c = &self.caches[kind as usize];
            for (result, v) in [("hit", &c.hits), ("miss", &c.misses)] {
                let _ = writeln!(
                    out,
                    "webpods_cache_requests_total{{cache=\"{}\",result=\"{result}\"}} {}",
                    kind.label(),
                    v.load(Ordering::Relaxed)
                );
            }
        }
        header(
            &mut out,
            "webpods_db_pool_connections",
            "gauge",
            "Open database connections by state.",
        );
        let busy = snap.pool_connections.saturating_sub(snap.pool_idle);
        let _ = writeln!(
            out,
            "webpods_db_pool_connections{{state=\"idle\"}} {}",
            snap.pool_idle
        );
        let _ = writeln!(
            out,
            "webpods_db_pool_connections{{state=\"in_use\"}} {busy}"
        );
        scalar(
            &mut out,
            "webpods_db_pool_max_connections",
            "gauge",
            "Most connections the database pool may open.",
            &snap.pool_max,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Arc::new(Metrics::default());
        m.observe_request("pod_write", 201, Duration::from_millis(3));
        m.observe_request("pod_write", 201, Duration::from_millis(30));
        m.observe_commit(3, Duration::from_millis(2));
        m.observe_cache(CacheKind::Pods, true);
        m.observe_cache(CacheKind::Pods, false);
        let sub = m.live_subscription();
        let text = m.render(&Snapshot {
            active_actors: 2,
            pool_connections: 5,
            pool_idle: 4,
            pool_max: 16,
        });
        for line in [
            "webpods_http_requests_total{route=\"pod_write\",status=\"201\"} 2",
            "webpods_http_request_duration_seconds_bucket{route=\"pod_write\",status=\"201\",le=\"0.005\"} 1",
            "webpods_http_request_duration_seconds_bucket{route=\"pod_write\",status=\"201\",le=\"+Inf\"} 2",
            "webpods_http_request_duration_seconds_count{route=\"pod_write\",status=\"201\"} 2",
            "webpods_appended_records_total 3",
            "webpods_commit_batch_records_bucket{le=\"2\"} 0",
            "webpods_commit_batch_records_bucket{le=\"4\"} 1",
            "webpods_commit_batch_records_sum 3",
            "webpods_active_stream_actors 2",
            "webpods_live_subscriptions 1",
            "webpods_cache_requests_total{cache=\"pods\",result=\"hit\"} 1",
            "webpods_cache_requests_total{cache=\"pods\",result=\"miss\"} 1",
            "webpods_db_pool_connections{state=\"in_use\"} 1",
            "webpods_db_pool_max_connections 16",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        drop(sub);
        assert_eq!(m.live_subscriptions(), 0);
        // Every non-comment line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {l}");
        }
    }
}
