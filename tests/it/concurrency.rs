//! Concurrent appends to one stream are serialized by its actor: dense indices, one chain.

use std::time::Duration;

use reqwest::Method;

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_valid_chain};

both_backends!(
    sixty_four_concurrent_appenders,
    concurrent_batches_split_across_overlapping_commits,
    idle_actors_stop_and_restart
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
                let body: Vec<serde_json::Value> = (0..40)
                    .map(|i| serde_json::json!({ "name": format!("c{client}-{round}-{i}"), "content": "x" }))
                    .collect();
                app.pod(Method::POST, "split", "/log?batch=true")
                    .bearer_auth(&app.token)
                    .header("content-type", "application/json")
                    .body(serde_json::Value::from(body).to_string())
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            for req in requests {
                let r = req.send().await.expect("batch");
                assert_eq!(r.status(), 201);
                let receipts: Vec<serde_json::Value> = r.json().await.expect("receipts");
                let indices: Vec<i64> = receipts
                    .iter()
                    .map(|r| r["index"].as_i64().expect("index"))
                    .collect();
                // A batch is one contiguous run of indices.
                assert_eq!(indices, (indices[0]..indices[0] + 40).collect::<Vec<_>>());
                firsts.push(indices[0]);
            }
            firsts
        }));
    }
    let mut firsts = Vec::new();
    for t in tasks {
        firsts.extend(t.await.expect("task"));
    }
    firsts.sort_unstable();
    assert_eq!(firsts, (0..80).map(|b| b * 40).collect::<Vec<i64>>());
    let records = app.all_records("split", "log").await;
    assert_eq!(records.len(), 3_200);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["index"], i as i64);
    }
    assert_valid_chain("split", "log", &records);
    if backend == Backend::Postgres {
        let metrics = app.engine.render_metrics();
        let written = metrics
            .lines()
            .find_map(|l| l.strip_prefix("webpods_follower_statements_total{result=\"written\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("follower metric");
        assert!(written > 0, "no commit was split:\n{metrics}");
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
