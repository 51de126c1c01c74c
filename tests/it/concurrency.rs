//! Concurrent appends to one stream are serialized by its actor: dense indices, one chain.

use std::time::Duration;

use reqwest::Method;

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_valid_chain};

both_backends!(
    sixty_four_concurrent_appenders,
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
