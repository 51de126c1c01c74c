//! Operations (SPEC §10) and crash safety (SPEC §5.2): `/metrics`, request logs without
//! secrets, the config file, graceful shutdown on SIGTERM, `kill -9` under load, and a database
//! outage in the middle of appends (a TCP proxy in front of the test PostgreSQL is cut and
//! restored).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::both_backends;
use crate::support::{
    Backend, SECRET, TestApp, TestDb, assert_valid_chain, error_code, fresh_database,
};

// ----- a `webpods` process ------------------------------------------------------------------

/// A port no one listens on now (for a process that must bind it itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `webpods` server process; killed when dropped. Its stderr (the logs) is collected.
struct Process {
    child: Child,
    base: String,
    token: String,
    /// Where the process writes its token; removed on drop.
    token_file: PathBuf,
    logs: Arc<Mutex<String>>,
}

impl Process {
    async fn spawn(database_url: &str, extra: &[(&str, &str)]) -> Process {
        let token_file =
            std::env::temp_dir().join(format!("wp-{}.token", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_webpods"));
        cmd.env("WEBPODS_LISTEN", "127.0.0.1:0")
            .env("WEBPODS_PUBLIC_URL", "http://localhost")
            .env("WEBPODS_DATABASE_URL", database_url)
            .env("WEBPODS_JWT_SECRET", SECRET)
            .env("WEBPODS_LOG", "warn")
            .env("WEBPODS_TOKEN_FILE", &token_file)
            .env_remove("WEBPODS_CONFIG");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn webpods");
        // Drain stderr continuously so a chatty log level never blocks the server on a pipe.
        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut base, mut token) = (None, None);
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(rest) = line.strip_prefix("webpods listening on ") {
                base = rest.split_whitespace().next().map(str::to_string);
            } else if line.starts_with("local mode:") {
                token = lines.next_line().await.expect("token line");
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (Some(base), Some(token)) = (base, token) else {
            panic!("webpods did not start; its log:\n{}", logs.lock().unwrap());
        };
        Process {
            child,
            base,
            token,
            token_file,
            logs,
        }
    }

    /// Sends a signal (`-TERM`, `-KILL`) through the shell's `kill` builtin (`/bin/sh` exists
    /// everywhere; a `kill` executable does not, e.g. in slim images without procps).
    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("kill {signal} {pid}")])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// Waits for the process to exit; returns its exit code (`None` = killed by a signal).
    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("webpods did not exit within {within:?}"))
            .expect("wait");
        status.code()
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    async fn create_pod(&self, name: &str) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/pods", self.base))
            .header("host", "localhost")
            .bearer_auth(&self.token)
            .json(&json!({ "name": name }))
            .send()
            .await
            .expect("create pod");
        assert_eq!(r.status(), 201);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.token_file);
    }
}

// ----- appenders under load -----------------------------------------------------------------

/// What the appenders were told had been committed.
#[derive(Default)]
struct Acked {
    /// index → (name, hash) of every record with a 2xx receipt.
    records: BTreeMap<i64, (String, String)>,
    /// Batch ids whose request got a receipt.
    batches: Vec<String>,
}

/// Records of one batch append, named `{batch}-{k}`.
const BATCH_SIZE: usize = 5;

/// `clients` tasks append to `pod`'s stream `load` in a loop — single records, and every
/// fourth request a batch of [`BATCH_SIZE`] — until `stop` is set or the server goes away.
/// With `unavailable`, 503 answers are counted there and the loop goes on.
fn start_appenders(
    base: &str,
    token: &str,
    pod: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
    unavailable: Option<Arc<AtomicUsize>>,
) -> Vec<JoinHandle<Acked>> {
    (0..clients)
        .map(|c| {
            let (base, token, pod, stop, progress, unavailable) = (
                base.to_string(),
                token.to_string(),
                pod.to_string(),
                stop.clone(),
                progress.clone(),
                unavailable.clone(),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .expect("client");
                let mut acked = Acked::default();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let batch = n % 4 == 0;
                    let id = format!("c{c}-n{n}");
                    let req = if batch {
                        let body: Vec<Value> = (0..BATCH_SIZE)
                            .map(|k| json!({ "name": format!("{id}-{k}"), "content": format!("{id} part {k}") }))
                            .collect();
                        http.post(format!("{base}/load?batch=true"))
                            .header("content-type", "application/json")
                            .body(Value::from(body).to_string())
                    } else {
                        http.post(format!("{base}/load/{id}"))
                            .header("content-type", "text/plain")
                            .body(format!("single {id}"))
                    };
                    let resp = req
                        .header("host", format!("{pod}.localhost"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    let Ok(resp) = resp else { break };
                    if resp.status() == 503 && unavailable.is_some() {
                        // The database is down: count it and keep trying.
                        if let Some(u) = &unavailable {
                            u.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    if !resp.status().is_success() {
                        // Draining or gone: the server answered, but not with a receipt.
                        break;
                    }
                    let Ok(body) = resp.json::<Value>().await else {
                        break;
                    };
                    let receipts = match body {
                        Value::Array(a) => a,
                        one => vec![one],
                    };
                    for r in &receipts {
                        acked.records.insert(
                            r["index"].as_i64().expect("index"),
                            (
                                r["name"].as_str().expect("name").to_string(),
                                r["hash"].as_str().expect("hash").to_string(),
                            ),
                        );
                    }
                    progress.fetch_add(receipts.len(), Ordering::SeqCst);
                    if batch {
                        acked.batches.push(id);
                    }
                }
                acked
            })
        })
        .collect()
}

/// Waits until the appenders got `n` receipts (so the server is busy when it is stopped).
async fn wait_for_load(progress: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the appenders never got {n} receipts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn collect(tasks: Vec<JoinHandle<Acked>>) -> Acked {
    let mut all = Acked::default();
    for t in tasks {
        let a = t.await.expect("appender");
        for (i, r) in a.records {
            assert!(
                all.records.insert(i, r).is_none(),
                "two receipts for index {i}"
            );
        }
        all.batches.extend(a.batches);
    }
    all
}

/// Reads the stream back through a fresh server on the same database and checks SPEC §5.2:
/// every acknowledged record is there with its hash, the chain is valid and gapless, and every
/// batch is stored whole or not at all. Returns how many records are stored.
async fn check_after_restart(url: &str, pod: &str, acked: &Acked) -> usize {
    let app = TestApp::spawn_on(url, &[]).await;
    let records = app.all_records(pod, "load").await;
    assert_valid_chain(pod, "load", &records);
    for (i, (name, hash)) in &acked.records {
        let r = records
            .get(usize::try_from(*i).expect("index"))
            .unwrap_or_else(|| panic!("acknowledged record {i} ({name}) is missing"));
        assert_eq!(r["name"].as_str(), Some(name.as_str()), "record {i}");
        assert_eq!(r["hash"].as_str(), Some(hash.as_str()), "record {i}");
    }
    // No half batch: the parts of a batch are all there, consecutive, or none is.
    let mut parts: HashMap<String, Vec<i64>> = HashMap::new();
    for r in &records {
        let name = r["name"].as_str().expect("name");
        if let Some((batch, _k)) = name.rsplit_once('-').filter(|(b, _)| b.contains("-n")) {
            parts
                .entry(batch.to_string())
                .or_default()
                .push(r["index"].as_i64().expect("index"));
        }
    }
    for (batch, idx) in &parts {
        assert_eq!(
            idx.len(),
            BATCH_SIZE,
            "batch {batch} is stored in part: {idx:?}"
        );
        assert!(
            idx.windows(2).all(|w| w[1] == w[0] + 1),
            "batch {batch} is not consecutive: {idx:?}"
        );
    }
    for b in &acked.batches {
        assert!(parts.contains_key(b), "acknowledged batch {b} is missing");
    }
    // The chain continues after the restart.
    let receipt = app.append(pod, "/load/after-restart", "after").await;
    assert_eq!(receipt["index"].as_i64(), Some(records.len() as i64));
    app.stop().await;
    records.len()
}

// ----- graceful shutdown and crashes --------------------------------------------------------

both_backends!(sigterm_drains_every_acknowledged_append);

/// SIGTERM under concurrent appends: the process exits 0 within the deadline, and every append
/// that got a receipt is stored (read back through a fresh server), in one valid chain.
async fn sigterm_drains_every_acknowledged_append(backend: Backend) {
    let url = fresh_database(backend).await;
    let mut p = Process::spawn(&url, &[("WEBPODS_SHUTDOWN_TIMEOUT_SECS", "20")]).await;
    p.create_pod("drain").await;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let tasks = start_appenders(
        &p.base,
        &p.token,
        "drain",
        16,
        stop.clone(),
        progress.clone(),
        None,
    );
    wait_for_load(&progress, 150).await;
    // The metrics of a loaded server: every receipt so far was counted as a committed record.
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", p.base))
        .header("host", "localhost")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let m = samples(&text);
    let appended = m["webpods_appended_records_total"];
    assert!(appended >= 150.0, "{text}");
    eprintln!(
        "{backend:?} under load: {appended} records in {} commits ({:.1} per batch), \
         mean commit {:.2} ms",
        m["webpods_commit_batch_records_count"],
        m["webpods_commit_batch_records_sum"] / m["webpods_commit_batch_records_count"],
        1000.0 * m["webpods_commit_duration_seconds_sum"]
            / m["webpods_commit_duration_seconds_count"],
    );
    let signalled = Instant::now();
    p.signal("-TERM");
    let code = p.exit_code(Duration::from_secs(25)).await;
    eprintln!(
        "{backend:?}: exited {:?} after SIGTERM under load",
        signalled.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    assert_eq!(code, Some(0), "exit code after SIGTERM; log:\n{}", p.logs());
    let acked = collect(tasks).await;
    assert!(acked.records.len() >= 150);
    let stored = check_after_restart(&url, "drain", &acked).await;
    eprintln!(
        "{backend:?}: SIGTERM after {} acknowledged records",
        acked.records.len()
    );
    // A graceful shutdown answers every request it committed.
    assert_eq!(
        stored,
        acked.records.len(),
        "committed but never acknowledged"
    );
}

both_backends!(kill_9_loses_no_acknowledged_record);

/// `kill -9` while 16 clients append singles and batches: after a restart on the same database
/// every acknowledged record is present, the chain is valid and gapless, and no batch is
/// visible in part (SPEC §5.2).
async fn kill_9_loses_no_acknowledged_record(backend: Backend) {
    let url = fresh_database(backend).await;
    let mut p = Process::spawn(&url, &[]).await;
    p.create_pod("crash").await;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let tasks = start_appenders(
        &p.base,
        &p.token,
        "crash",
        16,
        stop.clone(),
        progress.clone(),
        None,
    );
    wait_for_load(&progress, 150).await;
    p.signal("-KILL");
    assert_eq!(p.exit_code(Duration::from_secs(10)).await, None, "killed");
    stop.store(true, Ordering::SeqCst);
    let acked = collect(tasks).await;
    assert!(acked.records.len() >= 150);
    let stored = check_after_restart(&url, "crash", &acked).await;
    eprintln!(
        "{backend:?}: kill -9 after {} acknowledged records ({} batches), {stored} stored",
        acked.records.len(),
        acked.batches.len()
    );
    // Records committed in the instant of the kill may lack a receipt, never the reverse.
    assert!(stored >= acked.records.len());
}

// ----- logs ---------------------------------------------------------------------------------

/// At the most verbose level, in JSON: one parseable line per request with id, method, route,
/// status and duration, and no token or secret anywhere — whether the token came in the
/// `Authorization` header, a cookie, or the query string, valid or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_are_json_and_never_contain_tokens() {
    let url = fresh_database(Backend::Sqlite).await;
    let mut p = Process::spawn(
        &url,
        &[("WEBPODS_LOG", "trace"), ("WEBPODS_LOG_FORMAT", "json")],
    )
    .await;
    p.create_pod("logs").await;
    let http = reqwest::Client::new();
    let pod = |m: Method, path: &str| {
        http.request(m, format!("{}{path}", p.base))
            .header("host", "logs.localhost")
    };
    let r = pod(Method::POST, "/diary/today")
        .bearer_auth(&p.token)
        .header("x-request-id", "req-with-token")
        .header("content-type", "text/plain")
        .body("dear diary")
        .send()
        .await
        .expect("append");
    assert_eq!(r.status(), 201);
    let r = pod(Method::GET, "/diary/today")
        .header("cookie", format!("token={}", p.token))
        .send()
        .await
        .expect("read");
    assert_eq!(r.status(), 200);
    let r = pod(Method::GET, &format!("/diary?token={}", p.token))
        .send()
        .await
        .expect("query token");
    assert_eq!(r.status(), 200);
    let forged = format!("{}x", p.token);
    let r = pod(Method::POST, "/diary/forged")
        .header("authorization", format!("Bearer {forged}"))
        .body("x")
        .send()
        .await
        .expect("forged");
    assert_eq!(r.status(), 401);
    // Tokens inside WebSocket messages: `/ws` auth messages (a forged one is answered with an
    // error, the real one lets the subscription through) and GraphQL's connection_init.
    let ws_url = |path: &str| {
        let mut req = format!("{}{path}", p.base.replacen("http", "ws", 1))
            .into_client_request()
            .expect("ws url");
        req.headers_mut()
            .insert("host", "localhost".parse().expect("host"));
        req
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url("/ws"))
        .await
        .expect("/ws");
    for (token, sub) in [(&forged, "a"), (&p.token, "b")] {
        let auth = json!({"type": "auth", "token": token}).to_string();
        let subscribe = json!({"type":"subscribe","id":sub,"pod":"logs","stream":"diary"});
        ws.send(Message::text(auth)).await.expect("auth");
        ws.send(Message::text(subscribe.to_string()))
            .await
            .expect("subscribe");
    }
    let mut subscribed = false;
    while !subscribed {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = m {
            subscribed = t.contains("\"subscribed\"") && t.contains("\"b\"");
        }
    }
    let mut req = ws_url("/graphql/ws");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().expect("protocol"),
    );
    let (mut gql, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("/graphql/ws");
    let init = json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", p.token)}});
    gql.send(Message::text(init.to_string()))
        .await
        .expect("init");
    let ack = tokio::time::timeout(Duration::from_secs(10), gql.next())
        .await
        .expect("ack")
        .expect("open")
        .expect("frame");
    assert!(ack.to_string().contains("connection_ack"), "{ack}");
    p.signal("-TERM");
    assert_eq!(p.exit_code(Duration::from_secs(20)).await, Some(0));

    let logs = p.logs();
    assert!(logs.lines().count() > 5, "expected a verbose log:\n{logs}");
    // The signature part is the secret-bearing part of a JWT; check it and the whole token.
    let signature = p.token.rsplit('.').next().expect("jwt");
    for secret in [p.token.as_str(), signature, forged.as_str(), SECRET] {
        assert!(
            !logs.contains(secret),
            "a token or secret was logged:\n{logs}"
        );
    }
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["fields"]["request_id"] == "req-with-token")
        .unwrap_or_else(|| panic!("no request line for req-with-token:\n{logs}"));
    let f = &request["fields"];
    assert_eq!(f["message"], "request");
    assert_eq!(f["method"], "POST");
    assert_eq!(f["route"], "pod_write");
    assert_eq!(f["path"], "/diary/today");
    assert_eq!(f["status"], 201);
    assert!(f["duration_ms"].is_number(), "{request}");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["route"] == "pod_read" && l["fields"]["status"] == 200),
        "{logs}"
    );
}

// ----- metrics ------------------------------------------------------------------------------

/// The samples of a Prometheus text page, by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse::<f64>().expect("sample value"))
        })
        .collect()
}

both_backends!(metrics_count_requests_commits_and_caches);

async fn metrics_count_requests_commits_and_caches(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("metered").await;
    for i in 0..5 {
        app.append("metered", "/m/r", &format!("v{i}")).await;
    }
    let r = app
        .pod(Method::POST, "metered", "/m?batch=true")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body(json!([{"name":"a","content":"1"},{"name":"b","content":"2"},{"name":"c","content":"3"}]).to_string())
        .send()
        .await
        .expect("batch");
    assert_eq!(r.status(), 201);
    for _ in 0..2 {
        let r = app
            .pod(Method::GET, "metered", "/m/r")
            .send()
            .await
            .expect("read");
        assert_eq!(r.status(), 200);
    }
    let r = app
        .pod(Method::GET, "metered", "/m/nothing-here")
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);

    let r = app
        .main(Method::GET, "/metrics")
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.expect("text");
    let s = samples(&text);
    let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no sample {k}:\n{text}"));
    assert_eq!(
        get(r#"webpods_http_requests_total{route="api_pods",status="201"}"#),
        1.0
    );
    assert_eq!(
        get(r#"webpods_http_requests_total{route="pod_write",status="201"}"#),
        5.0
    );
    assert_eq!(
        get(r#"webpods_http_requests_total{route="pod_batch",status="201"}"#),
        1.0
    );
    assert_eq!(
        get(r#"webpods_http_requests_total{route="pod_read",status="200"}"#),
        2.0
    );
    assert_eq!(
        get(r#"webpods_http_requests_total{route="pod_read",status="404"}"#),
        1.0
    );
    assert_eq!(
        get(r#"webpods_http_request_duration_seconds_count{route="pod_write",status="201"}"#),
        5.0
    );
    // Pod creation writes `.config/owner` in its own transaction, not through an actor.
    assert_eq!(get("webpods_appended_records_total"), 8.0);
    assert_eq!(get("webpods_commit_batch_records_count"), 6.0);
    assert_eq!(get(r#"webpods_commit_batch_records_bucket{le="4"}"#), 6.0);
    assert_eq!(get(r#"webpods_commit_batch_records_bucket{le="2"}"#), 5.0);
    assert_eq!(get("webpods_commit_duration_seconds_count"), 6.0);
    assert_eq!(get("webpods_active_stream_actors"), 1.0);
    assert_eq!(get("webpods_live_subscriptions"), 0.0);
    assert!(get(r#"webpods_cache_requests_total{cache="pods",result="hit"}"#) >= 7.0);
    assert!(get(r#"webpods_cache_requests_total{cache="pods",result="miss"}"#) >= 1.0);
    assert!(get(r#"webpods_cache_requests_total{cache="streams",result="hit"}"#) >= 1.0);
    assert!(get("webpods_db_pool_max_connections") >= 2.0);
    assert!(get(r#"webpods_db_pool_connections{state="idle"}"#) >= 0.0);
    // Labels are route names, never raw paths.
    assert!(!text.contains("/m/r"), "{text}");
    app.stop().await;
}

both_backends!(metrics_count_live_subscriptions);

/// `webpods_live_subscriptions` counts open tails, whichever frontend opened them (GraphQL's
/// are checked in its own tests): one per single-stream WebSocket or SSE tail, one per
/// recursive `/ws` subscription however many streams it follows; a tail stops counting when
/// the client leaves, unsubscribes, or the tail ends.
async fn metrics_count_live_subscriptions(backend: Backend) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let app = TestApp::spawn(backend).await;
    app.create_pod("gauge").await;
    app.append("gauge", "/t/r0", "0").await;
    app.append("gauge", "/t/sub/r0", "0").await;
    app.append("gauge", "/gone/r0", "0").await;
    let gauge = || async {
        let text = app
            .main(Method::GET, "/metrics")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        samples(&text)["webpods_live_subscriptions"]
    };
    // Closing happens on the server after the client's side of it: wait for the count.
    let settles_at = |want: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = gauge().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gauge stuck at {got}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ws_open = |host: &str, path: &str| {
        let mut req = format!("ws://{}{path}", app.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("host", host.parse().unwrap());
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", app.token).parse().unwrap(),
        );
        async move {
            tokio_tungstenite::connect_async(req)
                .await
                .expect("websocket handshake")
                .0
        }
    };
    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
    async fn until_caught_up(ws: &mut Ws) {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("a frame in time")
                .expect("open")
                .expect("frame");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["type"], "error", "{v}");
                if v["type"] == "caughtUp" {
                    return;
                }
            }
        }
    }
    assert_eq!(gauge().await, 0.0);

    // A single-stream WebSocket tail, closed by the client.
    let mut ws = ws_open("gauge.localhost", "/t").await;
    until_caught_up(&mut ws).await;
    assert_eq!(gauge().await, 1.0);
    ws.close(None).await.unwrap();
    drop(ws);
    settles_at(0.0).await;

    // A recursive `/ws` subscription following two streams counts once, until unsubscribed.
    let mut mux = ws_open("localhost", "/ws").await;
    let msg = json!({"type":"subscribe","id":"r","pod":"gauge","stream":"t","recursive":true});
    mux.send(Message::text(msg.to_string())).await.unwrap();
    until_caught_up(&mut mux).await;
    assert_eq!(gauge().await, 1.0);
    assert!(app.engine.live_subscriptions() >= 2, "per-stream tails");
    let msg = json!({"type":"unsubscribe","id":"r"});
    mux.send(Message::text(msg.to_string())).await.unwrap();
    settles_at(0.0).await;

    // An SSE tail, ended by the server: its stream is deleted.
    let r = app
        .pod(Method::GET, "gauge", "/gone")
        .bearer_auth(&app.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("sse");
    assert_eq!(r.status(), 200);
    settles_at(1.0).await;
    let del = app
        .pod(Method::DELETE, "gauge", "/gone")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("delete");
    assert!(del.status().is_success(), "{}", del.status());
    settles_at(0.0).await;
    drop(r);
    drop(mux);
    app.stop().await;
}

// ----- configuration ------------------------------------------------------------------------

/// `--config FILE` is read by the binary; variables override it; every problem of a bad file
/// is reported at once and the process exits non-zero before touching the database.
#[tokio::test]
async fn the_binary_reads_its_config_file() {
    let dir = std::env::temp_dir().join(format!("wp-cfg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("from-file.db");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[database]\nurl = \"sqlite://{}\"\n[log]\nformat = \"json\"\n",
            db.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_webpods"));
        c.args(args)
            .env_remove("WEBPODS_DATABASE_URL")
            .env_remove("WEBPODS_CONFIG");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run webpods")
    };
    let out = run(&["migrate", "--config", good.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists(), "the database named in the file was created");

    // `token issue` checks pod names as the API does.
    let cfg = good.to_str().unwrap();
    let out = run(
        &[
            "token", "issue", "ann", "--pods", "Bad Pod", "--config", cfg,
        ],
        &[],
    );
    assert!(!out.status.success(), "a bad pod name is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pods must be valid pod names"), "{stderr}");
    let out = run(&["token", "issue", " ", "--config", cfg], &[]);
    assert!(!out.status.success(), "a blank user name is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a user name"), "{stderr}");
    let out = run(
        &[
            "token", "issue", "ann", "--pods", "good-pod", "--config", cfg,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split('.')
            .count(),
        3,
        "a JWT"
    );

    // The variable wins over the file; WEBPODS_CONFIG names the file.
    let db2 = dir.join("from-env.db");
    let url2 = format!("sqlite://{}", db2.display());
    let out = run(
        &["migrate"],
        &[
            ("WEBPODS_CONFIG", good.to_str().unwrap()),
            ("WEBPODS_DATABASE_URL", &url2),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db2.exists());

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"nowhere\"\nlistne = 1\n[limits]\nmax_record_bytes = \"big\"\n",
    )
    .unwrap();
    let out = run(
        &["--config", bad.to_str().unwrap()],
        &[("WEBPODS_LOG_FORMAT", "yaml")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "server.listen (WEBPODS_LISTEN): \"nowhere\"",
        "unknown key `listne` in [server]",
        "limits.max_record_bytes: expected an integer",
        "WEBPODS_LOG_FORMAT: expected text or json",
        "4 configuration problem(s)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ----- database outages ---------------------------------------------------------------------

/// A TCP proxy in front of the test PostgreSQL that can be cut (every connection closed, new
/// ones refused — what clients see when the database goes down) and restored.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    /// The database behind the proxy, kept while the proxy is.
    db: Option<TestDb>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns2.lock().unwrap().push(task);
            }
        });
        Proxy {
            port,
            up,
            conns,
            accept,
            db: None,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A fresh PostgreSQL database reached through a [`Proxy`].
async fn proxied_database() -> (String, Proxy) {
    let db = fresh_database(Backend::Postgres).await;
    let direct = url::Url::parse(&db).expect("url");
    let target = format!(
        "{}:{}",
        direct.host_str().expect("host"),
        direct.port().unwrap_or(5432)
    );
    let mut proxy = Proxy::start(target).await;
    proxy.db = Some(db);
    let mut via = direct.clone();
    via.set_host(Some("127.0.0.1")).expect("host");
    via.set_port(Some(proxy.port)).expect("port");
    (via.to_string(), proxy)
}

/// While the database is unreachable, appends fail fast with 503 `UNAVAILABLE` (never hang)
/// and `/ready` is 503; once it is back, appends work again and the chain is gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_fails_fast_and_recovers() {
    let (url, proxy) = proxied_database().await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_DB_ACQUIRE_TIMEOUT_SECS", "2")]).await;
    app.create_pod("outage").await;
    let mut ok = 0;
    for i in 0..3 {
        app.append("outage", "/log/before", &format!("{i}")).await;
        ok += 1;
    }
    let append = |body: &'static str| {
        app.pod(Method::POST, "outage", "/log/during")
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .timeout(Duration::from_secs(30))
            .body(body)
            .send()
    };

    proxy.cut();
    for _ in 0..3 {
        let started = Instant::now();
        let r = append("lost").await.expect("answered");
        eprintln!(
            "append during the outage answered in {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "an append during the outage took {:?}",
            started.elapsed()
        );
        assert_eq!(
            r.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert_eq!(error_code(r).await, (503, "UNAVAILABLE".into()));
    }
    let started = Instant::now();
    let r = app.main(Method::GET, "/ready").send().await.expect("ready");
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(4), "/ready hung");
    let r = app
        .main(Method::GET, "/health")
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["database"], "unreachable");
    let r = app.main(Method::GET, "/live").send().await.expect("live");
    assert_eq!(r.status(), 200, "the process itself still serves");

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = append("back").await.expect("answered");
        if r.status() == 201 {
            ok += 1;
            break;
        }
        assert_eq!(error_code(r).await.0, 503);
        assert!(Instant::now() < deadline, "appends did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..3 {
        app.append("outage", "/log/after", &format!("{i}")).await;
        ok += 1;
    }
    let r = app.main(Method::GET, "/ready").send().await.expect("ready");
    assert_eq!(r.status(), 200);
    let records = app.all_records("outage", "log").await;
    assert_eq!(
        records.len(),
        ok,
        "exactly the acknowledged appends are stored"
    );
    assert!(records.iter().all(|r| r["content"] != "lost"));
    assert_valid_chain("outage", "log", &records);
    app.stop().await;
}

/// A database that is up but refuses new connections (here `ALLOW_CONNECTIONS false` with its
/// sessions ended; likewise too many connections or a failed login) is an outage too: 503
/// `UNAVAILABLE` with `Retry-After`, not a 500 that reads as our bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_refusing_connections_is_unavailable() {
    let db = fresh_database(Backend::Postgres).await;
    let app = TestApp::spawn_on(&db, &[("WEBPODS_DB_ACQUIRE_TIMEOUT_SECS", "2")]).await;
    app.create_pod("refused").await;
    app.append("refused", "/log/before", "1").await;
    let name = url::Url::parse(&db)
        .expect("url")
        .path()
        .trim_start_matches('/')
        .to_string();
    let admin = crate::support::pg_admin_url();
    let refuse = |allow: bool| {
        crate::support::admin_execute(
            &admin,
            format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS {allow}"),
        )
    };
    refuse(false).await.expect("refuse connections");
    crate::support::admin_execute(
        &admin,
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    )
    .await
    .expect("end sessions");
    for _ in 0..3 {
        let r = app
            .pod(Method::POST, "refused", "/log/during")
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .timeout(Duration::from_secs(30))
            .body("x")
            .send()
            .await
            .expect("answered");
        assert_eq!(
            r.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert_eq!(error_code(r).await, (503, "UNAVAILABLE".into()));
    }
    let r = app
        .main(Method::GET, "/api/pods")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("pods");
    assert_eq!(error_code(r).await, (503, "UNAVAILABLE".into()));
    refuse(true).await.expect("allow connections");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app
            .pod(Method::POST, "refused", "/log/after")
            .bearer_auth(&app.token)
            .body("y")
            .send()
            .await
            .expect("answered");
        if r.status() == 201 {
            break;
        }
        assert_eq!(error_code(r).await.0, 503);
        assert!(Instant::now() < deadline, "appends did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

/// A server started while its database is down keeps retrying (bounded) and starts once the
/// database is reachable; with no retry budget it gives up at once with the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn startup_waits_for_the_database() {
    let (url, proxy) = proxied_database().await;
    proxy.cut();
    let config = crate::support::test_config(&url, &[("WEBPODS_DB_CONNECT_RETRY_SECS", "0")]);
    let err = webpods::startup::Server::build(config)
        .await
        .err()
        .expect("no database, no retries: startup fails");
    assert!(
        format!("{err:#}").contains("connecting to the database"),
        "{err:#}"
    );
    // It retries for the whole budget: the backoff (0.2, 0.4, 0.8, 1.6 s…) once gave up after
    // 1.4 s of a 3 s budget, as the next step would have passed it.
    let config = crate::support::test_config(&url, &[("WEBPODS_DB_CONNECT_RETRY_SECS", "3")]);
    let started = Instant::now();
    let err = webpods::startup::Server::build(config)
        .await
        .err()
        .expect("the database stays down: startup fails");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "gave up after {took:?}: {err:#}"
    );

    let config = crate::support::test_config(&url, &[("WEBPODS_DB_CONNECT_RETRY_SECS", "30")]);
    let token_file = config.token_file.clone();
    let build = tokio::spawn(webpods::startup::Server::build(config));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!build.is_finished(), "startup is still retrying");
    proxy.restore();
    let server = tokio::time::timeout(Duration::from_secs(15), build)
        .await
        .expect("startup finished after the database came back")
        .expect("task")
        .expect("server");
    assert!(server.local_addr().is_ok());
    if let Some(f) = token_file {
        let _ = std::fs::remove_file(f);
    }
}

/// While the database is awaited at startup, the process already answers on its port (SPEC
/// §10): `/live` 200, `/ready` and `/health` 503, anything else 503 `UNAVAILABLE`; once the
/// database is reachable it serves, and `/ready` turns 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_answer_while_the_database_is_awaited() {
    let (url, proxy) = proxied_database().await;
    proxy.cut();
    let port = free_port();
    let starting = tokio::spawn(async move {
        let listen = format!("127.0.0.1:{port}");
        Process::spawn(
            &url,
            &[
                ("WEBPODS_LISTEN", listen.as_str()),
                ("WEBPODS_DB_CONNECT_RETRY_SECS", "60"),
            ],
        )
        .await
    });
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "localhost")
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(get("/live").await, Ok(r) if r.status() == 200) {
        assert!(
            Instant::now() < deadline,
            "/live never answered while starting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get("/ready").await.expect("ready").status(), 503);
    let r = get("/health").await.expect("health");
    assert_eq!(r.status(), 503);
    let health: Value = r.json().await.expect("health json");
    assert_eq!(health["status"], "starting", "{health}");
    let r = get("/api/pods").await.expect("pods");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, (503, "UNAVAILABLE".into()));
    assert!(!starting.is_finished(), "still waiting for the database");

    proxy.restore();
    let mut p = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("started once the database came back")
        .expect("task");
    assert_eq!(get("/ready").await.expect("ready").status(), 200);
    p.signal("-TERM");
    assert_eq!(p.exit_code(Duration::from_secs(20)).await, Some(0));
}

/// A SIGTERM while the database is still awaited ends the start cleanly (exit 0), rather than
/// killing the process by the signal's default action (143).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_the_database_is_awaited_exits_0() {
    let (url, proxy) = proxied_database().await;
    proxy.cut();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_webpods"))
        .env("WEBPODS_LISTEN", format!("127.0.0.1:{port}"))
        .env("WEBPODS_PUBLIC_URL", "http://localhost")
        .env("WEBPODS_DATABASE_URL", &url)
        .env("WEBPODS_JWT_SECRET", SECRET)
        .env("WEBPODS_LOG", "warn")
        .env("WEBPODS_DB_CONNECT_RETRY_SECS", "60")
        .env_remove("WEBPODS_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn webpods");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = http
            .get(format!("http://127.0.0.1:{port}/live"))
            .header("host", "localhost")
            .send()
            .await;
        if matches!(live, Ok(r) if r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "/live never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{status}");
    drop(proxy);
}

/// With a drain delay, a SIGTERM first turns `/ready` to 503 while requests are still served
/// (so a load balancer can stop routing here), then the server drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_turns_ready_to_503_while_still_serving() {
    let url = fresh_database(Backend::Sqlite).await;
    let mut p = Process::spawn(
        &url,
        &[
            ("WEBPODS_DRAIN_DELAY_SECS", "2"),
            ("WEBPODS_SHUTDOWN_TIMEOUT_SECS", "10"),
        ],
    )
    .await;
    p.create_pod("lb").await;
    let http = reqwest::Client::new();
    let ready = || {
        http.get(format!("{}/ready", p.base))
            .header("host", "localhost")
            .send()
    };
    assert_eq!(ready().await.expect("ready").status(), 200);
    let signalled = Instant::now();
    p.signal("-TERM");
    loop {
        let status = ready().await.expect("still serving").status();
        if status == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/ready stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = http
        .post(format!("{}/log/during-drain", p.base))
        .header("host", "lb.localhost")
        .bearer_auth(&p.token)
        .body("still served")
        .send()
        .await
        .expect("append while draining");
    assert_eq!(r.status(), 201);
    assert_eq!(p.exit_code(Duration::from_secs(10)).await, Some(0));
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "left before the delay"
    );
    let app = TestApp::spawn_on(&url, &[]).await;
    assert_eq!(app.all_records("lb", "log").await.len(), 1);
    app.stop().await;
}

/// Every PostgreSQL connection of the pool runs with the configured `statement_timeout` and
/// `idle_in_transaction_session_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_have_a_statement_timeout() {
    let url = fresh_database(Backend::Postgres).await;
    let config = crate::support::test_config(&url, &[("WEBPODS_DB_STATEMENT_TIMEOUT_SECS", "7")]);
    let store = webpods_storage::Store::connect(&url, &config.store)
        .await
        .expect("connect");
    let webpods_storage::Store::Postgres(pg) = &store else {
        panic!("postgres")
    };
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(pg.pool())
        .await
        .expect("show");
    assert_eq!(timeout, "7s");
    let idle: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(pg.pool())
        .await
        .expect("show");
    assert_eq!(idle, "7s");
    store.close().await;
}

/// The database goes away and comes back while 8 clients keep appending: appends in between
/// get 503 (never hang), and afterwards every acknowledged record is stored in one valid,
/// gapless chain with no batch in part — a commit cut off mid-transaction left nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_under_concurrent_appends_keeps_the_chain_whole() {
    let (url, proxy) = proxied_database().await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_DB_ACQUIRE_TIMEOUT_SECS", "1")]).await;
    app.create_pod("flaky").await;
    let (stop, progress, unavailable) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let base = format!("http://{}", app.addr);
    let tasks = start_appenders(
        &base,
        &app.token,
        "flaky",
        8,
        stop.clone(),
        progress.clone(),
        Some(unavailable.clone()),
    );
    wait_for_load(&progress, 60).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = progress.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        progress.load(Ordering::SeqCst),
        during,
        "receipts while the database was unreachable"
    );
    proxy.restore();
    wait_for_load(&progress, during + 60).await;
    stop.store(true, Ordering::SeqCst);
    let acked = collect(tasks).await;
    let refused = unavailable.load(Ordering::SeqCst);
    assert!(refused > 0, "no 503 during the outage");
    let stored = check_after_restart(&url, "flaky", &acked).await;
    eprintln!(
        "outage under load: {} receipts, {refused} answers 503, {stored} records stored",
        acked.records.len()
    );
    app.stop().await;
}

/// An append waiting for a stream's row lock held elsewhere (another instance stuck in its
/// transaction) is cancelled by `statement_timeout` and answered 503 `UNAVAILABLE` — it never
/// hangs, and is never a 500 — and appends work again once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_row_lock_gives_503_not_a_hang() {
    let url = fresh_database(Backend::Postgres).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_DB_STATEMENT_TIMEOUT_SECS", "1")]).await;
    app.create_pod("locked").await;
    app.append("locked", "/log/first", "1").await;

    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    sqlx::Executor::execute(&mut other, "BEGIN")
        .await
        .expect("begin");
    sqlx::Executor::execute(
        &mut other,
        "SELECT id FROM streams WHERE path = 'log' FOR UPDATE",
    )
    .await
    .expect("lock the stream row");

    let started = Instant::now();
    let r = app
        .pod(Method::POST, "locked", "/log/second")
        .bearer_auth(&app.token)
        .header("content-type", "text/plain")
        .body("2")
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("answered");
    assert_eq!(error_code(r).await, (503, "UNAVAILABLE".into()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    sqlx::Executor::execute(&mut other, "ROLLBACK")
        .await
        .expect("release");
    app.append("locked", "/log/third", "3").await;
    let records = app.all_records("locked", "log").await;
    assert_eq!(records.len(), 2);
    assert_valid_chain("locked", "log", &records);
    app.stop().await;
}

/// The shutdown deadline holds even when a request cannot finish (here an append waits for a
/// stream's row lock held elsewhere, with no statement timeout): the process exits non-zero
/// once `WEBPODS_SHUTDOWN_TIMEOUT_SECS` have passed since the signal, and stored nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shutdown_deadline_bounds_a_stuck_drain() {
    let url = fresh_database(Backend::Postgres).await;
    let mut p = Process::spawn(
        &url,
        &[
            ("WEBPODS_SHUTDOWN_TIMEOUT_SECS", "2"),
            ("WEBPODS_DB_STATEMENT_TIMEOUT_SECS", "0"),
        ],
    )
    .await;
    p.create_pod("stuck").await;
    let http = reqwest::Client::new();
    let append = |name: &str| {
        http.post(format!("{}/log/{name}", p.base))
            .header("host", "stuck.localhost")
            .bearer_auth(&p.token)
            .body("x")
            .send()
    };
    assert_eq!(append("first").await.expect("first").status(), 201);

    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    sqlx::Executor::execute(&mut other, "BEGIN")
        .await
        .expect("begin");
    sqlx::Executor::execute(
        &mut other,
        "SELECT id FROM streams WHERE path = 'log' FOR UPDATE",
    )
    .await
    .expect("lock the stream row");
    let stuck = tokio::spawn(append("stuck"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stuck.is_finished(), "the append waits for the lock");

    let signalled = Instant::now();
    p.signal("-TERM");
    let code = p.exit_code(Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    assert_eq!(
        code,
        Some(1),
        "a missed deadline is a failure; log:\n{}",
        p.logs()
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "exited after {took:?}"
    );
    assert!(p.logs().contains("shutdown deadline"), "{}", p.logs());
    assert!(
        stuck.await.expect("task").is_err(),
        "no receipt for the stuck append"
    );
    sqlx::Executor::execute(&mut other, "ROLLBACK")
        .await
        .expect("release");
    let app = TestApp::spawn_on(&url, &[]).await;
    let records = app.all_records("stuck", "log").await;
    assert_eq!(records.len(), 1, "the stuck append never committed");
    app.stop().await;
}
