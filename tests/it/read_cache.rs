//! Reads served from the engine's read cache (latest by name, by index, list pages) never show
//! an answer older than an acknowledged append: at once on the instance that took the append,
//! and within the notice latency on another instance sharing the database.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::both_backends;
use crate::support::{Backend, TestApp, error_code, fresh_database};

both_backends!(reads_follow_every_acknowledged_append);

async fn get_text(app: &TestApp, path: &str) -> (u16, String) {
    let r = app
        .pod(Method::GET, "cache", path)
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("get");
    (r.status().as_u16(), r.text().await.expect("body"))
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let (status, body) = get_text(app, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("json")
}

async fn reads_follow_every_acknowledged_append(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("cache").await;
    app.append("cache", "/s/x", "v1").await;
    // Warm every cached read.
    assert_eq!(get_text(&app, "/s/x").await, (200, "v1".into()));
    assert_eq!(get_text(&app, "/s?i=0").await, (200, "v1".into()));
    assert_eq!(get_text(&app, "/s?i=-1").await, (200, "v1".into()));
    assert_eq!(get_json(&app, "/s").await["total"], 1);
    let (status, _) = get_text(&app, "/s/y").await;
    assert_eq!(status, 404, "no record y yet");

    // Each acknowledged append shows at once, with no waiting.
    for v in 2..=20 {
        let body = format!("v{v}");
        app.append("cache", "/s/x", &body).await;
        assert_eq!(get_text(&app, "/s/x").await, (200, body.clone()));
        assert_eq!(get_text(&app, "/s?i=-1").await, (200, body.clone()));
        let page = get_json(&app, "/s?limit=100").await;
        assert_eq!(page["total"], v);
        assert_eq!(page["records"].as_array().map(Vec::len), Some(v as usize));
        assert_eq!(
            get_json(&app, "/s?after=-1").await["records"][0]["content"],
            body
        );
    }
    app.append("cache", "/s/y", "now").await;
    assert_eq!(
        get_text(&app, "/s/y").await,
        (200, "now".into()),
        "a cached miss is forgotten too"
    );

    // A purge erases content that was cached by index and by name.
    let r = app
        .pod(Method::DELETE, "cache", "/s/x?purge=true")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status(), 204);
    let r = app
        .pod(Method::GET, "cache", "/s?i=0")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("get");
    assert_eq!(error_code(r).await, (410, "RECORD_PURGED".into()));
    let r = app
        .pod(Method::GET, "cache", "/s/x")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("get");
    assert_eq!(error_code(r).await, (404, "RECORD_DELETED".into()));
    app.stop().await;
}

/// Instance B caches a record, instance A appends a newer one: B serves it within the notice
/// latency — well before the cache's 5 s time-to-live could have hidden a missing invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_instance_sees_appends_through_notices() {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("cache").await;
    a.append("cache", "/s/x", "v1").await;
    for round in 2..=5 {
        // B caches the current answers.
        let before = format!("v{}", round - 1);
        assert_eq!(get_text(&b, "/s/x").await, (200, before));
        let total = get_json(&b, "/s").await["total"].as_i64();
        assert_eq!(total, Some(round - 1));

        let now = format!("v{round}");
        a.append("cache", "/s/x", &now).await;
        let started = Instant::now();
        loop {
            let by_name = get_text(&b, "/s/x").await;
            let total = get_json(&b, "/s").await["total"].as_i64();
            if by_name == (200, now.clone()) && total == Some(round) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "instance B still serves {by_name:?}, total {total:?} after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}

/// Instance B cached a record's content by name and by index; instance A purges it: B stops
/// serving the erased content within the notice latency, well before the cache's 5 s
/// time-to-live could hide a missing invalidation. (Which notice arrives first, the purge's
/// own or the append notice after it, this test cannot tell: in one process both are quick.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_instance_stops_serving_purged_content() {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("cache").await;
    for round in 0..10 {
        let path = format!("/s/secret{round}");
        a.append("cache", &path, "erase me").await;
        // B caches the content, by name and by index.
        let by_index = format!("/s?i={}", round * 2);
        assert_eq!(get_text(&b, &path).await, (200, "erase me".into()));
        assert_eq!(get_text(&b, &by_index).await, (200, "erase me".into()));
        let r = a
            .pod(Method::DELETE, "cache", &format!("{path}?purge=true"))
            .bearer_auth(&a.token)
            .send()
            .await
            .expect("purge");
        assert_eq!(r.status(), 204);
        let started = Instant::now();
        loop {
            let (status, body) = get_text(&b, &by_index).await;
            let (by_name, _) = get_text(&b, &path).await;
            if status == 410 && by_name == 404 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "instance B still serves {status} {body:?} after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}
