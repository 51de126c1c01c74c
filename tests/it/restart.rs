//! A restarted server on the same database keeps the chain and continues it.

use crate::both_backends;
use reqwest::Method;

use crate::support::{Backend, TestApp, assert_valid_chain, fresh_database, terminate_backends};

both_backends!(restart_continues_the_chain);

async fn restart_continues_the_chain(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[]).await;
    app.create_pod("durable").await;
    for i in 0..5 {
        app.append("durable", "/log/r", &format!("before {i}"))
            .await;
    }
    app.stop().await;

    let app = TestApp::spawn_on(&url, &[]).await;
    let receipt = app.append("durable", "/log/r", "after").await;
    assert_eq!(receipt["index"], 5);
    let records = app.all_records("durable", "log").await;
    assert_eq!(records.len(), 6);
    assert_eq!(records[4]["content"], "before 4");
    assert_valid_chain("durable", "log", &records);
    app.stop().await;
}

/// PostgreSQL ends every connection of the server (a database restart, a proxy's idle cut).
/// The pool no longer pings every connection it hands out, so the first statement may meet a
/// dead connection: that append may be answered 503 (its outcome unknown to the server), but
/// from then on the pool checks every connection that idled through the failure, so the
/// appends after it succeed on live connections and the chain stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_database_connections_are_replaced_on_postgres() {
    let url = fresh_database(Backend::Postgres).await;
    let app = TestApp::spawn_on(&url, &[]).await;
    app.create_pod("cut").await;
    for i in 0..3 {
        app.append("cut", "/log/r", &format!("before {i}")).await;
    }
    // Many streams at once, so that the pool holds many connections when they are cut.
    let paths: Vec<String> = (0..64).map(|i| format!("/warm{}/r", i % 32)).collect();
    let warm: Vec<_> = paths.iter().map(|p| app.append("cut", p, "w")).collect();
    futures::future::join_all(warm).await;
    let killed = terminate_backends(&url, None).await;
    assert!(killed >= 4, "the server's connections: {killed}");

    let first = app
        .pod(Method::POST, "cut", "/log/r")
        .bearer_auth(&app.token)
        .header("content-type", "text/plain")
        .body("first after the cut")
        .send()
        .await
        .unwrap();
    let first_status = first.status().as_u16();
    assert!(
        first_status == 201 || first_status == 503,
        "first append after the cut: {first_status}"
    );
    for i in 0..5 {
        app.append("cut", "/log/r", &format!("after {i}")).await;
        app.append("cut", &format!("/warm{i}/r"), "after").await;
    }
    let records = app.all_records("cut", "log").await;
    let first_written = records
        .iter()
        .filter(|r| r["content"] == "first after the cut")
        .count();
    assert!(first_written <= 1, "written twice");
    if first_status == 201 {
        assert_eq!(first_written, 1, "acknowledged but missing");
    }
    assert_eq!(records.len(), 3 + first_written + 5);
    assert_valid_chain("cut", "log", &records);
    app.stop().await;
}
