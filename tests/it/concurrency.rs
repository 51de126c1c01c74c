//! Concurrent appends to one stream are serialized by its actor: dense indices, one chain.

use std::time::Duration;

use reqwest::Method;

use crate::both_backends;
use crate::support::{
    Backend, TestApp, assert_valid_chain, batch_body, batch_first_index, follower_statements,
    sorted_firsts,
};

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
