//! Engine benchmarks against PostgreSQL (SPEC-level API, in process, no HTTP):
//! - appends through the stream actors with group commit: 1 and 100 streams; 1, 64 and 1,000
//!   concurrent appenders; 256-byte records — reported as records/s;
//! - reads: latest record by name, and a list of 100.
//!
//! Database: `WEBPODS_BENCH_DATABASE_URL`, else `WEBPODS_TEST_DATABASE_URL` (set by
//! `scripts/test`), else `postgres://postgres@127.0.0.1:5432/test`. A fresh database is created
//! per run. Durability is whatever the server is configured with (state it with the figures;
//! `synchronous_commit=on` and fsync on for BENCHMARKS.md). `cargo bench --bench engine`;
//! `cargo test --benches` runs each case once as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use webpods_engine::{
    AppendRequest, Caller, Engine, EngineConfig, ListQuery, NewRecord, RateLimits, Scope, Target,
    TokenKeys,
};
use webpods_storage::{Store, StoreOptions};

/// The allocator the `webpods` binary runs with (`src/main.rs`), so the engine is measured as it
/// is shipped.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORD: [u8; 256] = [b'x'; 256];

fn admin_url() -> String {
    std::env::var("WEBPODS_BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("WEBPODS_TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

struct Setup {
    engine: Engine,
    caller: Caller,
    store: Store,
    admin: String,
    database: String,
}

impl Setup {
    /// Stops the actors, closes the pool and drops the run's database.
    async fn teardown(&self) {
        self.engine.shutdown().await;
        self.store.close().await;
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
        admin_execute(&self.admin, drop).await;
    }
}

/// Runs one statement (creating or dropping a database) on the admin connection.
async fn admin_execute(admin: &str, sql: String) {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin)
        .await
        .expect("connect to PostgreSQL");
    sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(sql.clone()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn setup() -> Setup {
    let admin = admin_url();
    let name = format!("wp_bench_{}", uuid::Uuid::new_v4().simple());
    admin_execute(&admin, format!("CREATE DATABASE {name}")).await;
    let mut url = url::Url::parse(&admin).expect("url");
    url.set_path(&name);
    let store = Store::connect(
        url.as_str(),
        &StoreOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(30),
            statement_timeout: None,
        },
    )
    .await
    .expect("store");
    store.migrate().await.expect("migrate");
    let config = EngineConfig {
        rate_limits: RateLimits {
            enabled: false,
            ..RateLimits::default()
        },
        ..EngineConfig::default()
    };
    let engine = Engine::new(
        store.clone(),
        config,
        TokenKeys::new(b"bench-secret-bench-secret-bench!"),
    );
    let user = engine.ensure_local_user("bench").await.expect("user");
    let token = engine
        .issue_token(&user, None, Scope::ALL, None)
        .expect("token");
    let caller = engine.authenticate(Some(&token)).expect("caller");
    engine.create_pod(&caller, "bench").await.expect("pod");
    Setup {
        engine,
        caller,
        store,
        admin,
        database: name,
    }
}

fn record(name: &str) -> AppendRequest {
    AppendRequest {
        records: vec![NewRecord {
            name: name.to_string(),
            content: Bytes::from_static(&RECORD),
            content_type: "text/plain".to_string(),
            headers: Default::default(),
            deleted: false,
        }],
        precondition: None,
        idempotency_key: None,
        access: None,
    }
}

/// `appenders` tasks append `per_task` records each, spread over `streams` streams.
async fn run_appends(
    s: &Arc<Setup>,
    streams: usize,
    appenders: usize,
    per_task: usize,
) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(appenders);
    for t in 0..appenders {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let stream = format!("s/{}", t % streams);
            for i in 0..per_task {
                s.engine
                    .append(&s.caller, "bench", &stream, record(&format!("r{i}")))
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    start.elapsed()
}

fn appends(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let setup = Arc::new(rt.block_on(setup()));
    let mut group = c.benchmark_group("engine_append_pg_256B");
    group.sample_size(10);
    for (streams, appenders) in [(1, 1), (1, 64), (1, 1000), (100, 64), (100, 1000)] {
        // Enough records per iteration that group commit reaches steady state.
        let per_task = (4000 / appenders).max(2);
        let total = (per_task * appenders) as u64;
        group.throughput(Throughput::Elements(total));
        let id = BenchmarkId::new(
            format!("{streams}_streams"),
            format!("{appenders}_appenders"),
        );
        // Warm the streams (their actors and rows) outside the measurement.
        rt.block_on(run_appends(&setup, streams, streams.min(appenders), 1));
        group.bench_function(id, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let s = setup.clone();
                async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        spent += run_appends(&s, streams, appenders, per_task).await;
                    }
                    spent
                }
            });
        });
    }
    group.finish();
    rt.block_on(setup.teardown());
}

fn reads(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let setup = Arc::new(rt.block_on(setup()));
    rt.block_on(run_appends(&setup, 1, 10, 20));
    let stream = match rt
        .block_on(setup.engine.resolve(&setup.caller, "bench", "s/0"))
        .expect("resolve")
    {
        Target::Stream(s) => s,
        Target::Record { .. } => panic!("s/0 is a stream"),
    };
    let mut group = c.benchmark_group("engine_read_pg");
    group.throughput(Throughput::Elements(1));
    group.bench_function("latest_by_name", |b| {
        b.to_async(&rt).iter(|| async {
            setup
                .engine
                .read_by_name(&stream, "r7")
                .await
                .expect("read");
        });
    });
    group.bench_function("list_100", |b| {
        b.to_async(&rt).iter(|| async {
            let page = setup
                .engine
                .list(
                    &stream,
                    ListQuery {
                        limit: Some(100),
                        ..ListQuery::default()
                    },
                )
                .await
                .expect("list");
            assert_eq!(page.records.len(), 100);
        });
    });
    group.finish();
    rt.block_on(setup.teardown());
}

criterion_group!(benches, appends, reads);
criterion_main!(benches);
