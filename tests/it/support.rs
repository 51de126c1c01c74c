//! Test support: databases on both backends, the real server on 127.0.0.1:0, an HTTP client
//! that addresses pod hosts, and an independent checker of the SPEC §5.1 hash chain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use webpods::config::Config;
use webpods::startup::Server;
use webpods_engine::{Engine, Scope};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one `#[tokio::test]` per backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::support::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::support::Backend::Postgres).await
            }
        }
    )*};
}

/// The admin URL of the test PostgreSQL server (set by `scripts/test`).
pub fn pg_admin_url() -> String {
    std::env::var("WEBPODS_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "WEBPODS_TEST_DATABASE_URL is not set: run the suite with scripts/test, which starts \
             a throwaway PostgreSQL, or point it at a server where tests may CREATE DATABASE"
        )
    })
}

/// A test database. It is removed (a PostgreSQL database dropped, a SQLite directory deleted)
/// once its last holder is gone: this value, its clones, and every [`TestApp`] started on its
/// URL. A test that fails keeps its database for inspection and prints where it is.
#[derive(Clone)]
pub struct TestDb(Arc<DbGuard>);

struct DbGuard {
    url: String,
    place: Place,
}

enum Place {
    Postgres { admin: String, name: String },
    Sqlite(PathBuf),
}

/// Live test databases by URL, so that a [`TestApp`] started on one keeps it.
static LIVE: Mutex<Vec<Weak<DbGuard>>> = Mutex::new(Vec::new());

impl TestDb {
    /// The handle of the live test database with this URL, if any.
    fn find(url: &str) -> Option<TestDb> {
        let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.url == url)
            .map(TestDb)
    }
}

impl std::ops::Deref for TestDb {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0.url
    }
}

impl Drop for DbGuard {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|w| w.strong_count() > 0);
        if std::thread::panicking() {
            eprintln!("test failed: kept its database {}", self.url);
            return;
        }
        match &self.place {
            Place::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Place::Postgres { admin, name } => {
                // Drop may run on a runtime's worker: the statement gets a runtime of its own,
                // and the test waits for it (a test process may exit right after).
                let (admin, sql) = (
                    admin.clone(),
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                );
                let dropped = std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(admin_execute(&admin, sql))
                })
                .join();
                if let Ok(Err(e)) = dropped {
                    eprintln!("could not drop test database {name}: {e:#}");
                }
            }
        }
    }
}

/// Runs one statement (creating or dropping a database) on the admin connection.
pub async fn admin_execute(admin: &str, sql: String) -> anyhow::Result<()> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin).await?;
    sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(sql)).await?;
    Ok(())
}

/// A fresh, empty database of the given backend.
pub async fn fresh_database(backend: Backend) -> TestDb {
    let name = format!("wp_{}", uuid::Uuid::new_v4().simple());
    let guard = match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(&name);
            std::fs::create_dir_all(&dir).expect("temp dir");
            DbGuard {
                url: format!("sqlite://{}", dir.join("webpods.db").display()),
                place: Place::Sqlite(dir),
            }
        }
        Backend::Postgres => {
            let admin = pg_admin_url();
            admin_execute(&admin, format!("CREATE DATABASE {name}"))
                .await
                .expect("create a database on the test PostgreSQL");
            let mut url = url::Url::parse(&admin).expect("admin url");
            url.set_path(&name);
            DbGuard {
                url: url.to_string(),
                place: Place::Postgres { admin, name },
            }
        }
    };
    let db = Arc::new(guard);
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::downgrade(&db));
    TestDb(db)
}

/// The configuration tests run the server with; `extra` overrides any variable.
pub fn test_config(database_url: &str, extra: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = [
        ("WEBPODS_LISTEN", "127.0.0.1:0"),
        ("WEBPODS_PUBLIC_URL", "http://localhost"),
        ("WEBPODS_JWT_SECRET", SECRET),
        ("WEBPODS_DATABASE_URL", database_url),
        ("WEBPODS_LOG", "warn"),
        // Rate limits have their own tests; elsewhere they would only get in the way.
        ("WEBPODS_RATE_LIMITS", "off"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let token_file: PathBuf =
        std::env::temp_dir().join(format!("wp-{}.token", uuid::Uuid::new_v4().simple()));
    vars.insert(
        "WEBPODS_TOKEN_FILE".into(),
        token_file.display().to_string(),
    );
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    Config::from_lookup(|k| vars.get(k).cloned()).expect("test config")
}

/// A running server and a client for it.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Token of the local-mode user `local`.
    pub token: String,
    pub engine: Engine,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Kept until the server is gone.
    _db: Option<TestDb>,
    token_file: Option<PathBuf>,
}

impl TestApp {
    /// A server on a fresh database.
    pub async fn spawn(backend: Backend) -> TestApp {
        let url = fresh_database(backend).await;
        TestApp::spawn_on(&url, &[]).await
    }

    /// A server on an existing database, with extra configuration.
    pub async fn spawn_on(database_url: &str, extra: &[(&str, &str)]) -> TestApp {
        TestApp::spawn_with(test_config(database_url, extra)).await
    }

    /// A server with this configuration. `token` is empty unless it runs in local mode.
    pub async fn spawn_with(config: Config) -> TestApp {
        let db = TestDb::find(&config.database_url);
        let token_file = config.token_file.clone();
        let server = Server::build(config).await.expect("build server");
        let addr = server.local_addr().expect("addr");
        let token = server.local_token.clone().unwrap_or_default();
        let engine = server.engine().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestApp {
            addr,
            token,
            engine,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            stop: Some(stop),
            task: Some(task),
            _db: db,
            token_file,
        }
    }

    /// Graceful shutdown; returns once the server drained.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server run");
        }
    }

    /// A token of `local` that expires in `secs` seconds.
    pub fn short_token(&self, secs: i64) -> String {
        let user = self
            .engine
            .authenticate(Some(&self.token))
            .expect("local token")
            .user_id()
            .expect("a user")
            .to_string();
        self.engine
            .issue_token(&user, None, Scope::ALL, Some(secs))
            .expect("token")
    }

    /// A token for another local user (created if missing), and that user's id.
    pub async fn user(&self, name: &str) -> (String, String) {
        let id = self.engine.ensure_local_user(name).await.expect("user");
        let token = self
            .engine
            .issue_token(&id, None, Scope::ALL, None)
            .expect("token");
        (id, token)
    }

    /// A request to the main domain.
    pub fn main(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("http://{}{}", self.addr, path))
            .header("host", "localhost")
    }

    /// A request to a pod host.
    pub fn pod(&self, method: Method, pod: &str, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("http://{}{}", self.addr, path))
            .header("host", format!("{pod}.localhost"))
    }

    /// Creates a pod owned by `local`.
    pub async fn create_pod(&self, name: &str) {
        let r = self
            .main(Method::POST, "/api/pods")
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .expect("create pod");
        assert_eq!(
            r.status(),
            201,
            "create pod {name}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Appends a text record as `local`; returns the receipt.
    pub async fn append(&self, pod: &str, path: &str, body: &str) -> Value {
        let r = self
            .pod(Method::POST, pod, path)
            .bearer_auth(&self.token)
            .header("content-type", "text/plain")
            .body(body.to_string())
            .send()
            .await
            .expect("append");
        assert_eq!(r.status(), 201, "append to {path}");
        r.json().await.expect("receipt")
    }

    /// The streams of a pod, as `/.config/api/streams` lists them to `local`.
    pub async fn streams(&self, pod: &str) -> Vec<Value> {
        let listing = json_of(
            self.pod(Method::GET, pod, "/.config/api/streams")
                .bearer_auth(&self.token),
        )
        .await;
        listing["streams"].as_array().cloned().expect("streams")
    }

    /// Every record of a stream, in order (pages through the list).
    pub async fn all_records(&self, pod: &str, stream: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<i64> = None;
        loop {
            let query = after.map_or("limit=1000".to_string(), |a| {
                format!("after={a}&limit=1000")
            });
            let page: Value = self
                .pod(Method::GET, pod, &format!("/{stream}?{query}"))
                .bearer_auth(&self.token)
                .send()
                .await
                .expect("list")
                .json()
                .await
                .expect("page");
            let recs = page["records"].as_array().cloned().unwrap_or_default();
            if let Some(last) = recs.last() {
                after = last["index"].as_i64();
            }
            out.extend(recs);
            if !page["hasMore"].as_bool().unwrap_or(false) {
                return out;
            }
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(f) = &self.token_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The JSON body of a request that must succeed.
pub async fn json_of(req: RequestBuilder) -> Value {
    let r = req.send().await.expect("send");
    assert!(r.status().is_success(), "{} {}", r.url(), r.status());
    r.json().await.expect("json body")
}

/// The error code of an error response.
pub async fn error_code(r: Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or("<no code>")
            .to_string(),
    )
}

/// A `?batch=true` body of `n` small text records named `{prefix}-0` … `{prefix}-{n-1}`.
pub fn batch_body(prefix: &str, n: usize) -> String {
    let records: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({ "name": format!("{prefix}-{i}"), "content": "x" }))
        .collect();
    Value::from(records).to_string()
}

/// The first index of a batch append's answer, after checking it is `201` with `n` receipts
/// whose indices are one contiguous run (a batch is atomic and in order).
pub async fn batch_first_index(r: Response, n: usize) -> i64 {
    let status = r.status();
    let body: Value = r.json().await.expect("receipts");
    assert_eq!(status, 201, "{body}");
    let indices: Vec<i64> = body
        .as_array()
        .expect("receipts")
        .iter()
        .map(|r| r["index"].as_i64().expect("index"))
        .collect();
    assert_eq!(indices.len(), n, "{body}");
    assert_eq!(
        indices,
        (indices[0]..indices[0] + n as i64).collect::<Vec<_>>()
    );
    indices[0]
}

/// The first indices that tasks sending batches got (each task returns its own), sorted.
pub async fn sorted_firsts(tasks: Vec<JoinHandle<Vec<i64>>>) -> Vec<i64> {
    let mut firsts = Vec::new();
    for t in tasks {
        firsts.extend(t.await.expect("task"));
    }
    firsts.sort_unstable();
    firsts
}

/// `webpods_follower_statements_total{result}` of an engine: halves of split batches.
pub fn follower_statements(engine: &Engine, result: &str) -> u64 {
    metric(
        engine,
        &format!("webpods_follower_statements_total{{result=\"{result}\"}}"),
    )
}

/// The value of one series (`name{labels}`) in the engine's `/metrics` text.
pub fn metric(engine: &Engine, series: &str) -> u64 {
    let prefix = format!("{series} ");
    engine
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no metric {series}"))
}

/// Epoch milliseconds of `2025-01-01T00:00:00.000Z`.
pub fn parse_iso_ms(s: &str) -> i64 {
    let p = |a: usize, b: usize| s[a..b].parse::<i64>().expect("iso digits");
    let (y, m, d) = (p(0, 4), p(5, 7), p(8, 10));
    let (hh, mm, ss, ms) = (p(11, 13), p(14, 16), p(17, 19), p(20, 23));
    // days from civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Recomputes every hash of a list of record JSONs (text or JSON content) from SPEC §5.1 and
/// checks indices are dense from 0 and each record links to the one before.
pub fn assert_valid_chain(pod: &str, stream: &str, records: &[Value]) {
    let mut prev: Option<String> = None;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r["index"].as_i64(),
            Some(i as i64),
            "indices must be dense: {r}"
        );
        let content = match &r["content"] {
            Value::String(s) if r.get("encoding").is_none() => s.clone().into_bytes(),
            Value::String(s) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .expect("base64")
            }
            other => other.to_string().into_bytes(),
        };
        // JSON content is re-serialized by the JSON parser here, so only text and binary
        // content can be re-hashed from a list; raw reads check JSON bytes elsewhere.
        if r["content"].is_string() {
            assert_eq!(
                r["contentHash"].as_str(),
                Some(sha(&content).as_str()),
                "content hash of {r}"
            );
        }
        let headers = r["headers"].as_object().cloned().unwrap_or_default();
        let mut keys: Vec<_> = headers.keys().cloned().collect();
        keys.sort();
        let headers_json = format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!("{}:{}", Value::from(k.as_str()), headers[k]))
                .collect::<Vec<_>>()
                .join(",")
        );
        let payload = format!(
            "{{\"pod\":{},\"stream\":{},\"index\":{},\"name\":{},\"content_type\":{},\"content_hash\":{},\"headers\":{},\"deleted\":{},\"user_id\":{},\"timestamp\":{},\"previous_hash\":{}}}",
            Value::from(pod),
            Value::from(stream),
            i,
            r["name"],
            r["contentType"],
            r["contentHash"],
            headers_json,
            r["deleted"],
            r["userId"],
            parse_iso_ms(r["timestamp"].as_str().expect("timestamp")),
            prev.as_deref().map_or(Value::Null, Value::from),
        );
        assert_eq!(r["previousHash"].as_str(), prev.as_deref(), "link of {i}");
        assert_eq!(
            r["hash"].as_str(),
            Some(sha(payload.as_bytes()).as_str()),
            "hash of {i}"
        );
        prev = r["hash"].as_str().map(str::to_string);
    }
}

/// Ends the PostgreSQL connections to `url`'s database (other than the one asking), or only those
/// whose last query is `LIKE` `query_like`, as a restart or an administrator would; returns how
/// many were ended.
pub async fn terminate_backends(url: &str, query_like: Option<&str>) -> usize {
    let db = url::Url::parse(url)
        .expect("database url")
        .path()
        .trim_start_matches('/')
        .to_string();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .expect("admin connection");
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid() AND ($2::text IS NULL OR query LIKE $2)",
    )
    .bind(&db)
    .bind(query_like)
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    killed.len()
}

/// 16 concurrent writers appending to `pod/stream` until the server stops answering (a
/// shutdown), each sharing the highest index acknowledged so far (`-1`: none yet).
pub fn writers_until_shutdown(
    app: &TestApp,
    pod: &str,
    stream: &str,
) -> (Arc<AtomicI64>, Vec<JoinHandle<()>>) {
    let acked = Arc::new(AtomicI64::new(-1));
    let writers = (0..16)
        .map(|w| {
            let (http, addr, token) = (app.http.clone(), app.addr, app.token.clone());
            let (host, stream, acked) = (
                format!("{pod}.localhost"),
                stream.to_string(),
                acked.clone(),
            );
            tokio::spawn(async move {
                for i in 0.. {
                    let sent = http
                        .post(format!("http://{addr}/{stream}/w{w}-{i}"))
                        .header("host", &host)
                        .bearer_auth(&token)
                        .header("content-type", "text/plain")
                        .body("in flight")
                        .send()
                        .await;
                    let Ok(r) = sent else { return };
                    if r.status() != 201 {
                        return;
                    }
                    let Ok(receipt) = r.json::<Value>().await else {
                        return;
                    };
                    if let Some(index) = receipt["index"].as_i64() {
                        acked.fetch_max(index, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    (acked, writers)
}
