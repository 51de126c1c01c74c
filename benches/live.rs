//! Live-tail fan-out: commit-to-delivery latency with 1,000 subscribers on one stream.
//!
//! Conditions (stated, not tuned): SQLite in a temp directory (WAL, `synchronous=FULL`), one
//! engine in this process, 1,000 engine-level subscriptions (the same `Subscription` the
//! WebSocket/SSE frontends drive, without the sockets) each in its own task, on a 2-worker
//! tokio runtime; one writer appends 100-byte text records, one per request, paced at
//! `RATE` appends per second (issued on schedule, not waiting for earlier ones). For every record
//! and every subscriber (1,000 × N samples) the report prints p50/p99/max of:
//! - **append-to-delivery**: from the moment the append was issued to the moment the subscriber
//!   had the record — includes the durable commit (group commit + fsync) and the fan-out;
//! - **publish-to-delivery**: from the first subscriber receiving the record to this one — the
//!   fan-out cost alone (the commit is published once, before the receipt is sent);
//! - and the append (commit) latency itself, as the writer sees it.
//!
//! Measured on the 2-core development machine while two other engineers were compiling (load
//! average 4–6), release build, 1,000 records at 200/s, 1,000,000 deliveries:
//! append-to-delivery p50 11.0 ms / p99 33.6 ms / max 69.9 ms; publish-to-delivery p50 1.8 ms /
//! p99 7.0 ms / max 12.6 ms; append (commit) p50 10.9 ms / p99 34.4 ms; criterion "append, then
//! all 1,000 subscribers have it": 3.9 ms [3.3, 4.5] per record, one writer at a time.
//!
//! `cargo bench --bench live` runs 1,000 records at 200/s and the criterion benchmark
//! "append one record and wait until all 1,000 subscribers have it";
//! `cargo test --benches` runs a 50-record smoke version once.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark: failing loudly is right

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::sync::Notify;
use webpods_engine::{
    AppendRequest, Caller, Engine, EngineConfig, LiveEvent, LiveRequest, NewRecord, Scope,
    TokenKeys,
};
use webpods_storage::{Store, StoreOptions};

const SUBSCRIBERS: usize = 1000;
const RATE: u64 = 200;
const MAX_RECORDS: usize = 100_000;

/// `(index, delivered at)` of every delivery, while recording.
type Deliveries = Arc<Mutex<Option<Vec<(u32, Instant)>>>>;

struct Fanout {
    engine: Engine,
    caller: Caller,
    /// When the append of each index was issued.
    issued: Arc<Vec<OnceLock<Instant>>>,
    /// Subscribers that received each index.
    delivered: Arc<Vec<AtomicUsize>>,
    all_delivered: Arc<Notify>,
    /// `(index, delivered at)` of every delivery (`None` while not recording).
    samples: Deliveries,
}

impl Fanout {
    async fn new() -> Fanout {
        let dir = std::env::temp_dir().join(format!("wp-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}", dir.join("bench.db").display());
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .expect("sqlite");
        store.migrate().await.expect("migrate");
        let engine = Engine::new(
            store,
            EngineConfig::default(),
            TokenKeys::new(b"bench-secret-0123456789"),
        );
        let user = engine.ensure_local_user("bench").await.expect("user");
        let token = engine
            .issue_token(&user, None, Scope::ALL, None)
            .expect("token");
        let caller = engine.authenticate(Some(&token)).expect("caller");
        engine.create_pod(&caller, "bench").await.expect("pod");
        let f = Fanout {
            engine,
            caller,
            issued: Arc::new((0..MAX_RECORDS).map(|_| OnceLock::new()).collect()),
            delivered: Arc::new((0..MAX_RECORDS).map(|_| AtomicUsize::new(0)).collect()),
            all_delivered: Arc::new(Notify::new()),
            samples: Arc::new(Mutex::new(None)),
        };
        f.append().await; // index 0: creates the stream
        for _ in 0..SUBSCRIBERS {
            let mut sub = f
                .engine
                .subscribe(&f.caller, "bench", "feed", LiveRequest::default())
                .await
                .expect("subscribe");
            let (delivered, notify, samples) = (
                f.delivered.clone(),
                f.all_delivered.clone(),
                f.samples.clone(),
            );
            tokio::spawn(async move {
                while let Ok(ev) = sub.next().await {
                    let LiveEvent::Record(r) = ev else { continue };
                    let i = usize::try_from(r.row.index).unwrap_or(0);
                    let now = Instant::now();
                    if let Some(v) = samples.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        v.push((u32::try_from(i).unwrap_or(u32::MAX), now));
                    }
                    if delivered[i].fetch_add(1, Ordering::SeqCst) + 1 == SUBSCRIBERS {
                        notify.notify_waiters();
                    }
                }
            });
        }
        f.wait_delivered(0).await;
        f
    }

    /// Appends one record; returns its index once committed.
    async fn append(&self) -> usize {
        append(&self.engine, &self.caller, &self.issued).await
    }

    async fn wait_delivered(&self, i: usize) {
        loop {
            let notified = self.all_delivered.notified();
            if self.delivered[i].load(Ordering::SeqCst) >= SUBSCRIBERS {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    /// `n` appends at `rate` per second; prints the latency distribution.
    async fn paced(&self, n: usize, rate: u64) {
        *self.samples.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        // Appends are issued on schedule without waiting for earlier ones (as independent
        // clients would), so the rate holds even when a commit takes longer than the period.
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let started = Instant::now();
        let mut writers = Vec::with_capacity(n);
        for _ in 0..n {
            tick.tick().await;
            let (engine, caller, issued) = (
                self.engine.clone(),
                self.caller.clone(),
                self.issued.clone(),
            );
            writers.push(tokio::spawn(async move {
                let t = Instant::now();
                let i = append(&engine, &caller, &issued).await;
                (
                    i,
                    u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX),
                )
            }));
        }
        let issued = started.elapsed();
        let mut commit_us = Vec::with_capacity(n);
        let mut last = 0;
        for w in writers {
            let (i, us) = w.await.expect("writer");
            last = last.max(i);
            commit_us.push(us);
        }
        self.wait_delivered(last).await;
        let deliveries = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let micros = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut first: std::collections::HashMap<u32, Instant> = Default::default();
        for (i, at) in &deliveries {
            let e = first.entry(*i).or_insert(*at);
            *e = (*e).min(*at);
        }
        let mut s: Vec<u32> = deliveries
            .iter()
            .filter_map(|(i, at)| {
                let issued = self.issued.get(*i as usize)?.get()?;
                Some(micros(at.saturating_duration_since(*issued)))
            })
            .collect();
        let mut fan: Vec<u32> = deliveries
            .iter()
            .map(|(i, at)| micros(at.saturating_duration_since(first[i])))
            .collect();
        s.sort_unstable();
        fan.sort_unstable();
        commit_us.sort_unstable();
        let pct = |v: &[u32], p: f64| {
            let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
            f64::from(v.get(idx).copied().unwrap_or(0)) / 1000.0
        };
        println!(
            "live fan-out: {n} records at {rate}/s (issued in {issued:.2?}) to {SUBSCRIBERS} \
             subscribers ({} deliveries): \
             append-to-delivery p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             publish-to-delivery p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             append (commit) p50 {:.2} ms, p99 {:.2} ms",
            s.len(),
            pct(&s, 0.50),
            pct(&s, 0.99),
            pct(&s, 1.0),
            pct(&fan, 0.50),
            pct(&fan, 0.99),
            pct(&fan, 1.0),
            pct(&commit_us, 0.50),
            pct(&commit_us, 0.99),
        );
    }
}

/// Appends one 100-byte record, noting when it was issued; returns its index.
async fn append(engine: &Engine, caller: &Caller, issued: &[OnceLock<Instant>]) -> usize {
    let t = Instant::now();
    let req = AppendRequest {
        records: vec![NewRecord {
            name: "r".into(),
            content: bytes::Bytes::from(vec![b'x'; 100]),
            content_type: "text/plain".into(),
            headers: Default::default(),
            deleted: false,
        }],
        precondition: None,
        idempotency_key: None,
        access: None,
    };
    let out = engine
        .append(caller, "bench", "feed", req)
        .await
        .expect("append");
    let i = usize::try_from(out.receipts[0].index).unwrap_or(0);
    let _ = issued[i].set(t);
    i
}

fn live(c: &mut Criterion) {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fanout = Arc::new(tokio::sync::Mutex::new(rt.block_on(Fanout::new())));
    rt.block_on(async {
        let n = if bench_mode { 1000 } else { 50 };
        fanout.lock().await.paced(n, RATE).await;
    });
    let mut group = c.benchmark_group("live");
    group.sample_size(20);
    group.bench_function("append_then_all_1000_subscribers_have_it", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let fanout = fanout.clone();
            async move {
                let f = fanout.lock().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let i = f.append().await;
                    f.wait_delivered(i).await;
                    total += t.elapsed();
                }
                total
            }
        });
    });
    group.finish();
}

criterion_group!(benches, live);
criterion_main!(benches);
