//! A restarted server on the same database keeps the chain and continues it.

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_valid_chain, fresh_database};

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
