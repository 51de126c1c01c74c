//! Several instances on one PostgreSQL database extend one chain: two engines in this process,
//! and two `webpods` server processes.

use std::process::Stdio;

use reqwest::Method;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{
    Backend, SECRET, TestApp, assert_valid_chain, batch_body, batch_first_index,
    follower_statements, fresh_database, sorted_firsts,
};

/// Sends `n` appends, alternating between the given base URLs, all at once.
async fn append_through(bases: &[String], token: &str, pod: &str, n: usize) -> Vec<i64> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let req = http
            .post(format!("{}/shared/r{i}", bases[i % bases.len()]))
            .header("host", format!("{pod}.localhost"))
            .bearer_auth(token)
            .header("content-type", "text/plain")
            .body(format!("from {}", i % bases.len()));
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.expect("append");
            let status = r.status();
            let body: serde_json::Value = r.json().await.expect("json");
            assert_eq!(status, 201, "{body}");
            body["index"].as_i64().expect("index")
        }));
    }
    let mut indices = Vec::new();
    for t in tasks {
        indices.push(t.await.expect("task"));
    }
    indices.sort_unstable();
    indices
}

/// Two engines on one fresh PostgreSQL database, and their base URLs, with pod `shared` and
/// records 0 and 1 of its root stream, one appended through each engine, so that each instance
/// holds its own view of the head before a test races them.
async fn two_engines() -> (TestApp, TestApp, [String; 2]) {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("shared").await;
    let bases = [format!("http://{}", a.addr), format!("http://{}", b.addr)];
    append_through(&bases, &a.token, "shared", 2).await;
    (a, b, bases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_one_database_one_chain() {
    let (a, b, bases) = two_engines().await;
    let indices = append_through(&bases, &a.token, "shared", 64).await;
    assert_eq!(indices, (2..66).collect::<Vec<i64>>());
    let records = b.all_records("shared", "shared").await;
    assert_eq!(records.len(), 66);
    assert_valid_chain("shared", "shared", &records);
    a.stop().await;
    b.stop().await;
}

/// Two engines take batches of 40 records for one stream at once, so each splits its commits
/// into overlapping statements (issue 7) while the other moves the head under it: leads go
/// stale, followers must then write nothing, and every batch still lands whole, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_race_split_batches_on_one_chain() {
    let (a, b, bases) = two_engines().await;
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for client in 0..8 {
        let base = bases[client % 2].clone();
        let (http, token) = (http.clone(), a.token.clone());
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            for round in 0..6 {
                let r = http
                    .post(format!("{base}/shared?batch=true"))
                    .header("host", "shared.localhost")
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(batch_body(&format!("c{client}-{round}"), 40))
                    .send()
                    .await
                    .expect("batch");
                firsts.push(batch_first_index(r, 40).await);
            }
            firsts
        }));
    }
    let firsts = sorted_firsts(tasks).await;
    assert_eq!(firsts, (0..48).map(|b| 2 + b * 40).collect::<Vec<i64>>());
    let records = b.all_records("shared", "shared").await;
    assert_eq!(records.len(), 2 + 48 * 40);
    assert_valid_chain("shared", "shared", &records);
    let split: u64 = [&a, &b]
        .iter()
        .flat_map(|app| ["written", "not_written"].map(|r| follower_statements(&app.engine, r)))
        .sum();
    assert!(split > 0, "no commit was split");
    a.stop().await;
    b.stop().await;
}

/// A `webpods` process; killed when dropped.
pub(crate) struct Process {
    pub(crate) child: Child,
    /// `http://127.0.0.1:port`.
    pub(crate) base: String,
    /// The token of its local-mode user `local`.
    pub(crate) token: String,
}

/// Starts the `webpods` binary on a database and waits until it listens.
pub(crate) async fn spawn_process(database_url: &str) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_webpods"))
        .env("WEBPODS_LISTEN", "127.0.0.1:0")
        .env("WEBPODS_PUBLIC_URL", "http://localhost")
        .env("WEBPODS_DATABASE_URL", database_url)
        .env("WEBPODS_JWT_SECRET", SECRET)
        .env("WEBPODS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn webpods");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut base = None;
    let mut token = None;
    while let Some(line) = lines.next_line().await.expect("read stdout") {
        if let Some(rest) = line.strip_prefix("webpods listening on ") {
            base = rest.split_whitespace().next().map(str::to_string);
        } else if line.starts_with("local mode:") {
            token = lines.next_line().await.expect("token line");
            break;
        }
    }
    Process {
        child,
        base: base.expect("listening line"),
        token: token.expect("token"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_server_processes_one_chain() {
    let url = fresh_database(Backend::Postgres).await;
    let p1 = spawn_process(&url).await;
    let p2 = spawn_process(&url).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/pods", p1.base))
        .header("host", "localhost")
        .bearer_auth(&p1.token)
        .json(&serde_json::json!({ "name": "procs" }))
        .send()
        .await
        .expect("create pod");
    assert_eq!(r.status(), 201);
    let bases = [p1.base.clone(), p2.base.clone()];
    append_through(&bases, &p1.token, "procs", 2).await;
    let indices = append_through(&bases, &p2.token, "procs", 64).await;
    assert_eq!(indices, (2..66).collect::<Vec<i64>>());

    // Read the chain back through an in-process server on the same database.
    let reader = TestApp::spawn_on(&url, &[]).await;
    let records = reader.all_records("procs", "shared").await;
    assert_eq!(records.len(), 66);
    assert_valid_chain("procs", "shared", &records);
    reader.stop().await;
    for mut p in [p1, p2] {
        let _ = p.child.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explicit_and_auto_created_streams_race_across_instances() {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("race").await;
    // Both instances auto-create the same deep path at once: one tree, no error.
    let mut tasks = Vec::new();
    for (i, app) in [&a, &b, &a, &b].iter().enumerate() {
        let req = app
            .pod(Method::POST, "race", &format!("/x/y/z/r{i}"))
            .bearer_auth(&a.token)
            .header("content-type", "text/plain")
            .body("v");
        tasks.push(tokio::spawn(async move {
            req.send().await.expect("append").status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 201);
    }
    assert_eq!(a.all_records("race", "x/y/z").await.len(), 4);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_hold_across_instances_and_restarts() {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("idem").await;
    let send = |app: &TestApp| {
        app.pod(Method::POST, "idem", "/log/x")
            .bearer_auth(&a.token)
            .header("idempotency-key", "same-key")
            .header("content-type", "text/plain")
            .body("once")
            .send()
    };
    let first = send(&a).await.expect("first");
    assert_eq!(first.status(), 201);
    let receipt: serde_json::Value = first.json().await.expect("receipt");
    let again = send(&b).await.expect("through b");
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<serde_json::Value>().await.expect("receipt"),
        receipt
    );
    b.stop().await;
    let c = TestApp::spawn_on(&url, &[]).await;
    let after_restart = send(&c).await.expect("after restart");
    assert_eq!(after_restart.status(), 200);
    assert_eq!(
        after_restart
            .json::<serde_json::Value>()
            .await
            .expect("receipt"),
        receipt
    );
    assert_eq!(c.all_records("idem", "log").await.len(), 1);
    a.stop().await;
    c.stop().await;
}

/// Instance B has a stream cached (and its actor alive) when instance A deletes it; B's next
/// append finds the row gone, looks the path up again and creates the stream afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_after_another_instance_deleted_the_stream_recreates_it() {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("gone").await;
    assert_eq!(b.append("gone", "/s/one", "1").await["index"], 0);
    assert_eq!(b.append("gone", "/s/two", "2").await["index"], 1);
    let r = a
        .pod(Method::DELETE, "gone", "/s")
        .bearer_auth(&a.token)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let receipt = b.append("gone", "/s/three", "3").await;
    assert_eq!(receipt["index"], 0, "a new stream: {receipt}");
    assert!(receipt["previousHash"].is_null(), "{receipt}");
    let records = a.all_records("gone", "s").await;
    assert_eq!(records.len(), 1);
    assert_valid_chain("gone", "s", &records);
    a.stop().await;
    b.stop().await;
}
