//! Concurrent appends to one stream are serialized by its actor: dense indices, one chain.

use std::time::Duration;

use reqwest::Method;

use crate::both_backends;
use crate::support::{
    Backend, TestApp, assert_valid_chain, batch_body, batch_first_index, follower_statements,
    fresh_database, metric, sorted_firsts,
};

both_backends!(
    sixty_four_concurrent_appenders,
    concurrent_batches_split_across_overlapping_commits,
    idle_actors_stop_and_restart,
    actors_over_the_cap_are_evicted
);

async fn sixty_four_concurrent_appenders(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("busy").await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let req = app
            .pod(Method::POST, "busy", &format!("/events/e{i}"))
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .body(format!("event {i}"));
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.expect("append");
            assert_eq!(r.status(), 201);
            r.json::<serde_json::Value>().await.expect("receipt")["index"]
                .as_i64()
                .expect("index")
        }));
    }
    let mut indices = Vec::new();
    for t in tasks {
        indices.push(t.await.expect("task"));
    }
    indices.sort_unstable();
    assert_eq!(indices, (0..64).collect::<Vec<i64>>());
    let records = app.all_records("busy", "events").await;
    assert_eq!(records.len(), 64);
    assert_valid_chain("busy", "events", &records);
    app.stop().await;
}

/// Eight clients each send ten batches of 40 records to one stream. While one commit runs the
/// others queue, so commits hold several batches, and on PostgreSQL such a commit is split into
/// two overlapping statements (issue 7). Every batch must still land whole and contiguous, with
/// dense indices and one valid chain.
async fn concurrent_batches_split_across_overlapping_commits(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("split").await;
    let mut tasks = Vec::new();
    for client in 0..8 {
        let requests: Vec<_> = (0..10)
            .map(|round| {
                app.pod(Method::POST, "split", "/log?batch=true")
                    .bearer_auth(&app.token)
                    .header("content-type", "application/json")
                    .body(batch_body(&format!("c{client}-{round}"), 40))
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            for req in requests {
                let r = req.send().await.expect("batch");
                firsts.push(batch_first_index(r, 40).await);
            }
            firsts
        }));
    }
    let firsts = sorted_firsts(tasks).await;
    assert_eq!(firsts, (0..80).map(|b| b * 40).collect::<Vec<i64>>());
    let records = app.all_records("split", "log").await;
    assert_eq!(records.len(), 3_200);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["index"], i as i64);
    }
    assert_valid_chain("split", "log", &records);
    if backend == Backend::Postgres {
        assert!(
            follower_statements(&app.engine, "written") > 0,
            "no commit was split"
        );
    }
    app.stop().await;
}

async fn idle_actors_stop_and_restart(backend: Backend) {
    let url = crate::support::fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_ACTOR_IDLE_SECS", "1")]).await;
    app.create_pod("idle").await;
    app.append("idle", "/a/x", "1").await;
    app.append("idle", "/b/x", "1").await;
    assert_eq!(app.engine.active_actors(), 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.engine.active_actors() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle actors never stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A fresh actor picks the head up from storage.
    let r = app.append("idle", "/a/y", "2").await;
    assert_eq!(r["index"], 1);
    assert_valid_chain("idle", "a", &app.all_records("idle", "a").await);
    app.stop().await;
}

/// At most four actors may be alive (the idle timeout is the default 30 s, so only the cap
/// stops them). Twenty streams written one after another leave at most four actors; then 40
/// clients append concurrently across the same twenty streams, so actors are evicted while
/// appends reach them. Every acknowledged record must be stored at the index and with the hash
/// of its receipt, each stream's chain dense and valid.
async fn actors_over_the_cap_are_evicted(backend: Backend) {
    let url = crate::support::fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_ACTOR_MAX_ALIVE", "4")]).await;
    app.create_pod("cap").await;
    const STREAMS: usize = 20;
    for s in 0..STREAMS {
        let r = app.append("cap", &format!("/s{s}/first"), "0").await;
        assert_eq!(r["index"], 0);
        assert!(
            app.engine.active_actors() <= 4,
            "{} alive",
            app.engine.active_actors()
        );
    }
    assert!(metric(&app.engine, "webpods_evicted_stream_actors_total") >= 16);

    let mut tasks = Vec::new();
    for client in 0..40 {
        let requests: Vec<_> = (0..10)
            .map(|k| {
                let s = (client * 7 + k) % STREAMS;
                let req = app
                    .pod(Method::POST, "cap", &format!("/s{s}/c{client}-{k}"))
                    .bearer_auth(&app.token)
                    .header("content-type", "text/plain")
                    .body(format!("{client}/{k}"));
                (s, req)
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for (s, req) in requests {
                let r = req.send().await.expect("append");
                assert_eq!(r.status(), 201);
                let receipt: serde_json::Value = r.json().await.expect("receipt");
                receipts.push((s, receipt));
            }
            receipts
        }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.extend(t.await.expect("task"));
    }
    assert!(
        app.engine.active_actors() <= 4,
        "{} alive",
        app.engine.active_actors()
    );
    let mut stored = Vec::new();
    for s in 0..STREAMS {
        let records = app.all_records("cap", &format!("s{s}")).await;
        assert_valid_chain("cap", &format!("s{s}"), &records);
        stored.push(records);
    }
    let total: usize = stored.iter().map(Vec::len).sum();
    assert_eq!(total, STREAMS + 400, "each acknowledged append stored once");
    for (s, receipt) in receipts {
        let index = receipt["index"].as_u64().expect("index") as usize;
        let record = &stored[s][index];
        assert_eq!(record["hash"], receipt["hash"], "receipt {receipt}");
        assert_eq!(record["name"], receipt["name"]);
    }
    app.stop().await;
}

/// The cross-stream write statement must reach each stream's row by its key however many
/// streams the database holds. Its plan is generic (cached per connection, array lengths
/// unknown); written as plain joins, PostgreSQL planned it as hash joins over a sequential scan
/// of `streams` while the table held a few thousand rows, and every append statement then
/// read every stream (BENCHMARKS.md). This checks the plan the server's connections get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_statement_never_scans_every_stream() {
    use sqlx::{AssertSqlSafe, Connection, Row};

    let url = fresh_database(Backend::Postgres).await;
    let app = TestApp::spawn_on(&url, &[]).await;
    app.create_pod("plans").await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(
        "INSERT INTO streams (pod_id, parent_id, path, name, access, creator_id, created_at) \
         SELECT p.id, NULL, 'filler' || g, 'filler' || g, 'public', p.owner_id, 0 \
           FROM pods p, generate_series(1, 3000) g WHERE p.name = 'plans'; \
         ANALYZE streams",
    )
    .execute(&mut conn)
    .await
    .expect("fill streams");
    let prepare = format!(
        "SET plan_cache_mode = force_generic_plan; PREPARE w AS {}",
        webpods_storage::PgStore::APPEND_CHAINED
    );
    sqlx::raw_sql(AssertSqlSafe(prepare))
        .execute(&mut conn)
        .await
        .expect("prepare");
    let explain = "EXPLAIN EXECUTE w('{1}', '{0}', '{a}', '{\"\\\\x00\"}', '{text/plain}', '{\"{}\"}', \
                   '{1}', '{u}', '{0}', '{c}', '{h}', '{NULL}', '{f}', \
                   '{1,2,3}', '{-1,-1,-1}', '{NULL,NULL,NULL}', '{0,0,0}', '{0,0,0}', \
                   '{h,h,h}', '{0,0,0}', '{1}', '{a}')";
    let plan: Vec<String> = sqlx::raw_sql(explain)
        .fetch_all(&mut conn)
        .await
        .expect("explain")
        .iter()
        .map(|row| row.try_get::<String, _>(0).expect("plan line"))
        .collect();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on streams"), "{plan}");
    assert!(plan.contains("Index Scan using streams_pkey"), "{plan}");
    assert!(plan.contains("Tid Scan on streams"), "{plan}");
    conn.close().await.expect("close");
    app.stop().await;
}
