//! SPEC §3 and §8–9 end to end: OAuth login against a provider on loopback, sessions and SSO
//! to pod hosts, narrower tokens, permission streams (also across instances, with warm caches)
//! and rate limits shared by instances and surviving restarts.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::oauth_provider::FakeProvider;
use crate::support::{Backend, TestApp, error_code, fresh_database, test_config};

both_backends!(
    rate_counts_are_written_out_at_shutdown,
    login_and_whoami,
    login_errors,
    sessions_and_sso,
    narrower_tokens,
    accepted_token_still_expires,
    permission_streams,
    a_write_refused_by_the_stream_limit_creates_nothing,
    refused_pod_creations_use_up_nothing
);

/// A server with the loopback provider configured as `idp` (so not in local mode).
async fn auth_app(url: &str, provider: &FakeProvider) -> TestApp {
    let mut config = test_config(url, &[]);
    config.engine.auth.providers =
        vec![provider.config("idp").resolve(|_| None).expect("provider")];
    TestApp::spawn_with(config).await
}

struct LoggedIn {
    token: String,
    session: String,
    location: String,
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"]
        .to_str()
        .expect("location")
        .to_string()
}

fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.strip_prefix(&format!("{name}="))
                .map(|v| v.split(';').next().unwrap_or("").to_string())
        })
}

/// Our callback URL (built from public_url http://localhost) sent to the test server.
async fn follow_callback(app: &TestApp, url: &str) -> reqwest::Response {
    let u = url::Url::parse(url).expect("callback url");
    let path = format!("{}?{}", u.path(), u.query().unwrap_or(""));
    app.main(Method::GET, &path).send().await.expect("callback")
}

/// Runs the whole browser flow: /auth/idp → provider → /auth/idp/callback.
async fn login(app: &TestApp, user: &str, redirect: Option<&str>) -> LoggedIn {
    let start = match redirect {
        Some(r) => format!(
            "/auth/idp?redirect={}",
            url::form_urlencoded::byte_serialize(r.as_bytes()).collect::<String>()
        ),
        None => "/auth/idp".to_string(),
    };
    let r = app.main(Method::GET, &start).send().await.expect("start");
    assert_eq!(
        r.status(),
        302,
        "login start redirects to the provider (SPEC §3.2)"
    );
    let authorize = location(&r);
    assert!(
        authorize.contains("code_challenge_method=S256"),
        "{authorize}"
    );
    let r = app
        .http
        .get(format!("{authorize}&login_hint={user}"))
        .send()
        .await
        .expect("authorize");
    assert_eq!(r.status(), 303);
    let r = follow_callback(app, &location(&r)).await;
    assert_eq!(r.status(), 302, "callback redirects");
    let cookie = set_cookie(&r, "session").expect("session cookie");
    let all: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        all.iter()
            .all(|c| c.contains("HttpOnly") && c.contains("SameSite=Lax")),
        "{all:?}"
    );
    LoggedIn {
        token: set_cookie(&r, "token").expect("token cookie"),
        session: cookie,
        location: location(&r),
    }
}

async fn login_and_whoami(backend: Backend) {
    let provider = FakeProvider::start().await;
    let app = auth_app(&fresh_database(backend).await, &provider).await;
    let providers: Value = app
        .main(Method::GET, "/auth/providers")
        .send()
        .await
        .expect("providers")
        .json()
        .await
        .expect("json");
    assert_eq!(
        providers,
        json!({ "providers": [{ "id": "idp", "name": "Test IdP", "loginUrl": "/auth/idp" }] })
    );
    let page = app
        .main(Method::GET, "/login")
        .send()
        .await
        .expect("login page")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains("href=\"/auth/idp\"") && page.contains("Test IdP"),
        "{page}"
    );

    let alice = login(&app, "alice", None).await;
    assert_eq!(alice.location, "/auth/success");
    let who: Value = app
        .main(Method::GET, "/auth/whoami")
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("whoami")
        .json()
        .await
        .expect("json");
    assert_eq!(who["email"], "alice@example.com");
    assert_eq!(who["name"], "ALICE");
    // The same identity logs in as the same user.
    let again = login(&app, "alice", None).await;
    let who2: Value = app
        .main(Method::GET, "/auth/whoami")
        .bearer_auth(&again.token)
        .send()
        .await
        .expect("whoami")
        .json()
        .await
        .expect("json");
    assert_eq!(who2["userId"], who["userId"]);
    // The success page shows the token; the token works for real requests.
    let r = app
        .main(Method::GET, "/auth/success")
        .header("cookie", format!("token={}", alice.token))
        .send()
        .await
        .expect("success");
    assert_eq!(
        r.headers()["cache-control"],
        "no-store",
        "it shows a secret"
    );
    let page = r.text().await.expect("html");
    assert!(page.contains(&alice.token));
    let page = app
        .main(Method::GET, "/auth/success")
        .header("cookie", "token=garbage")
        .send()
        .await
        .expect("success")
        .text()
        .await
        .expect("html");
    assert!(page.contains("Not logged in"), "{page}");
    let r = app
        .main(Method::POST, "/api/pods")
        .bearer_auth(&alice.token)
        .json(&json!({ "name": "alices" }))
        .send()
        .await
        .expect("pod");
    assert_eq!(r.status(), 201);
    // A permitted redirect is honoured.
    let back = login(&app, "alice", Some("http://alices.localhost/notes")).await;
    assert_eq!(back.location, "http://alices.localhost/notes");
    app.stop().await;
}

async fn login_errors(backend: Backend) {
    let provider = FakeProvider::start().await;
    let app = auth_app(&fresh_database(backend).await, &provider).await;
    let get = |path: String| app.main(Method::GET, &path).send();
    let r = get("/auth/nope".into()).await.expect("unknown provider");
    assert_eq!(error_code(r).await, (400, "INVALID_PROVIDER".into()));
    for evil in [
        "https://evil.example/x",
        "//evil.example",
        "http://localhost.evil.example/",
        // Browsers drop tabs and newlines from a URL: `/\t/evil.example` is `//evil.example`.
        "/\t/evil.example",
        "/\n/evil.example",
        "/\r\n/evil.example",
        "/\\evil.example",
        "/x\\..\\/evil.example",
        "http://alices.localhost\t/x",
        // Our hosts, but another scheme or port (public_url is http://localhost).
        "https://localhost/",
        "http://localhost:8080/",
        "http://alice.localhost:8080/",
    ] {
        let r = get(format!(
            "/auth/idp?redirect={}",
            url::form_urlencoded::byte_serialize(evil.as_bytes()).collect::<String>()
        ))
        .await
        .expect("open redirect");
        assert_eq!(r.status(), 400, "{evil}");
    }
    let r = get("/auth/idp/callback".into()).await.expect("no params");
    assert_eq!(error_code(r).await, (400, "INVALID_CALLBACK".into()));
    let r = get("/auth/idp/callback?code=x&state=never-issued".into())
        .await
        .expect("bad state");
    assert_eq!(error_code(r).await, (400, "INVALID_STATE".into()));

    // A real state, then a provider error: 401, and the state is spent.
    let start = get("/auth/idp".into()).await.expect("start");
    let authorize = url::Url::parse(&location(&start)).expect("url");
    let state = authorize
        .query_pairs()
        .find(|(k, _)| k == "state")
        .expect("state")
        .1
        .into_owned();
    let r = get(format!(
        "/auth/idp/callback?error=access_denied&state={state}"
    ))
    .await
    .expect("refused");
    assert_eq!(error_code(r).await, (401, "OAUTH_ERROR".into()));
    let r = get(format!("/auth/idp/callback?code=x&state={state}"))
        .await
        .expect("spent");
    assert_eq!(error_code(r).await, (400, "INVALID_STATE".into()));

    // A tampered code is refused by the provider; the reused state after it too.
    let start = get("/auth/idp".into()).await.expect("start");
    let r = app
        .http
        .get(location(&start))
        .send()
        .await
        .expect("authorize");
    let cb = url::Url::parse(&location(&r)).expect("callback");
    let state = cb
        .query_pairs()
        .find(|(k, _)| k == "state")
        .expect("state")
        .1
        .into_owned();
    let r = get(format!("/auth/idp/callback?code=forged&state={state}"))
        .await
        .expect("tampered");
    assert_eq!(error_code(r).await, (401, "OAUTH_ERROR".into()));
    let r = follow_callback(&app, cb.as_str()).await;
    assert_eq!(
        error_code(r).await,
        (400, "INVALID_STATE".into()),
        "a state works once"
    );

    // The good flow still works, once.
    let start = get("/auth/idp".into()).await.expect("start");
    let r = app
        .http
        .get(location(&start))
        .send()
        .await
        .expect("authorize");
    let cb = location(&r);
    assert_eq!(follow_callback(&app, &cb).await.status(), 302);
    let r = follow_callback(&app, &cb).await;
    assert_eq!(error_code(r).await, (400, "INVALID_STATE".into()));
    app.stop().await;
}

async fn sessions_and_sso(backend: Backend) {
    let provider = FakeProvider::start().await;
    let app = auth_app(&fresh_database(backend).await, &provider).await;
    let alice = login(&app, "alice", None).await;
    let r = app
        .main(Method::POST, "/api/pods")
        .bearer_auth(&alice.token)
        .json(&json!({ "name": "wiki" }))
        .send()
        .await
        .expect("pod");
    assert_eq!(r.status(), 201);
    let session_cookie = format!("session={}", alice.session);
    let s: Value = app
        .main(Method::GET, "/auth/session")
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("session")
        .json()
        .await
        .expect("json");
    // Named by a public id (32 hex digits), never by the cookie's secret.
    let id = s["id"].as_str().expect("id");
    assert_ne!(id, alice.session.as_str());
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );

    // SSO: pod host /login → main /auth/authorize → pod /auth/callback → pod_token cookie.
    let r = app
        .pod(Method::GET, "wiki", "/login?redirect=/notes/today")
        .send()
        .await
        .expect("pod login");
    let to_main = url::Url::parse(&location(&r)).expect("authorize url");
    assert_eq!(to_main.path(), "/auth/authorize");
    let r = app
        .main(
            Method::GET,
            &format!("{}?{}", to_main.path(), to_main.query().unwrap_or("")),
        )
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("authorize");
    let to_pod = url::Url::parse(&location(&r)).expect("pod callback");
    assert_eq!(to_pod.host_str(), Some("wiki.localhost"));
    let r = app
        .pod(
            Method::GET,
            "wiki",
            &format!("{}?{}", to_pod.path(), to_pod.query().unwrap_or("")),
        )
        .send()
        .await
        .expect("pod callback");
    assert_eq!(location(&r), "/notes/today");
    let pod_token = set_cookie(&r, "pod_token").expect("pod_token");
    let r = app
        .pod(Method::POST, "wiki", "/notes/today")
        .header("cookie", format!("pod_token={pod_token}"))
        .body("written with SSO")
        .send()
        .await
        .expect("write");
    assert_eq!(r.status(), 201);
    // The same write sent by a page of the pod itself carries its cookie; sent by a page of
    // another pod (same site, so the browser sends the cookie) or the main domain, it does not
    // count: cross-site request forgery.
    let cookie_post = |origin: &str| {
        app.pod(Method::POST, "wiki", "/notes/forged")
            .header("cookie", format!("pod_token={pod_token}"))
            .header("origin", origin)
            .header("content-type", "text/plain")
            .body("{\"from\":\"a form\"}")
            .send()
    };
    let r = cookie_post("http://wiki.localhost")
        .await
        .expect("same origin");
    assert_eq!(r.status(), 201, "a page of the pod itself");
    for other in ["http://evil.localhost", "http://localhost", "null"] {
        let r = cookie_post(other).await.expect("cross origin");
        assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()), "{other}");
    }
    let r = app
        .main(Method::POST, "/api/pods")
        .header("cookie", format!("token={}", alice.token))
        .header("origin", "http://evil.localhost")
        .body("{\"name\":\"csrfpod\"}")
        .send()
        .await
        .expect("cross-origin pod creation");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    // Redirects that browsers would read as another host are refused or ignored.
    let r = app
        .main(
            Method::GET,
            "/auth/authorize?pod=wiki&redirect=/%09/evil.example",
        )
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("authorize with a tab");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = app
        .pod(
            Method::GET,
            "wiki",
            &format!("/auth/callback?token={pod_token}&redirect=/%09/evil.example"),
        )
        .send()
        .await
        .expect("pod callback with a tab");
    assert_eq!(location(&r), "/");
    // The pod token is limited to that pod; a forged callback token is refused.
    let r = app
        .pod(Method::GET, "wiki", "/auth/callback?token=bogus")
        .send()
        .await
        .expect("forged");
    assert_eq!(r.status(), 401);
    let r = app
        .pod(Method::GET, "wiki", "/auth/whoami")
        .send()
        .await
        .expect("reserved");
    assert_eq!(r.status(), 404, "pod hosts do not serve /auth/*");

    // Sessions: list, revoke, logout.
    let second = login(&app, "alice", None).await;
    let list: Value = app
        .main(Method::GET, "/auth/sessions")
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    // Listed by a public id, never by the cookie's secret: the secret mints tokens through
    // /auth/authorize, so listing it would let any token grow into a full one.
    let listed = list.to_string();
    assert!(!listed.contains(&second.session), "{listed}");
    assert!(
        !listed.contains(&session_cookie["session=".len()..]),
        "{listed}"
    );
    let current: Value = app
        .main(Method::GET, "/auth/session")
        .header("cookie", format!("session={}", second.session))
        .send()
        .await
        .expect("current")
        .json()
        .await
        .expect("json");
    let second_id = current["id"].as_str().expect("id").to_string();
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|s| s["id"] == second_id.as_str())),
        "{listed}"
    );
    // Sessions are the account's: a narrowed token may neither list nor revoke them.
    let narrow = app
        .main(Method::POST, "/api/tokens")
        .bearer_auth(&alice.token)
        .json(&json!({ "scope": "read", "pods": ["wiki"] }))
        .send()
        .await
        .expect("narrow")
        .json::<Value>()
        .await
        .expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    for (method, path) in [
        (Method::GET, "/auth/sessions".to_string()),
        (Method::DELETE, format!("/auth/sessions/{second_id}")),
    ] {
        let r = app
            .main(method, &path)
            .bearer_auth(&narrow)
            .send()
            .await
            .expect("narrow request");
        assert_eq!(r.status(), 403, "{path}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "FORBIDDEN");
    }
    // The secret itself names no session.
    let r = app
        .main(
            Method::DELETE,
            &format!("/auth/sessions/{}", second.session),
        )
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("revoke by secret");
    assert_eq!(r.status(), 404);
    let r = app
        .main(Method::DELETE, &format!("/auth/sessions/{second_id}"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    let r = app
        .main(Method::POST, "/auth/logout")
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 200);
    assert_eq!(set_cookie(&r, "session").as_deref(), Some(""));
    let r = app
        .main(Method::GET, "/auth/session")
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("session");
    assert_eq!(r.status(), 401);
    // Without a session, authorize starts a login at the (only) provider.
    let r = app
        .main(Method::GET, "/auth/authorize?pod=wiki&redirect=/")
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("authorize");
    assert!(
        location(&r).starts_with("/auth/idp?redirect="),
        "{}",
        location(&r)
    );
    app.stop().await;
}

/// Verified tokens are remembered (issue 7), but never past their `exp`: a token accepted a
/// moment ago is refused with `TOKEN_EXPIRED` once it has expired.
async fn accepted_token_still_expires(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("exp").await;
    let r = app
        .main(Method::POST, "/api/tokens")
        .bearer_auth(&app.token)
        .json(&json!({ "expiresIn": 2 }))
        .send()
        .await
        .expect("issue");
    assert_eq!(r.status(), 201);
    let short = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let write = |name: &'static str| {
        app.pod(Method::POST, "exp", &format!("/s/{name}"))
            .bearer_auth(&short)
            .body("x")
            .send()
    };
    for name in ["a", "b"] {
        assert_eq!(write(name).await.expect("write").status(), 201);
    }
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = write("c").await.expect("write after expiry");
    assert_eq!(error_code(r).await, (401, "TOKEN_EXPIRED".into()));
    app.stop().await;
}

async fn narrower_tokens(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("nar").await;
    let issue = |token: &str, body: Value| {
        app.main(Method::POST, "/api/tokens")
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let r = issue(
        &app.token,
        json!({ "pods": ["nar"], "scope": "read", "expiresIn": 600 }),
    )
    .await
    .expect("issue");
    assert_eq!(r.status(), 201);
    let read_only = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let r = app
        .pod(Method::POST, "nar", "/s/x")
        .bearer_auth(&read_only)
        .body("x")
        .send()
        .await
        .expect("write");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = app
        .main(Method::POST, "/api/pods")
        .bearer_auth(&read_only)
        .json(&json!({ "name": "other" }))
        .send()
        .await
        .expect("pod");
    assert_eq!(r.status(), 403);
    // A write-only token reads nothing, the stream listing included.
    app.append("nar", "/s/x", "x").await;
    let r = issue(&app.token, json!({ "scope": "write" }))
        .await
        .expect("write-only");
    let write_only = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    for path in ["/s/x", "/.config/api/streams"] {
        let r = app
            .pod(Method::GET, "nar", path)
            .bearer_auth(&write_only)
            .send()
            .await
            .expect("read");
        assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()), "{path}");
    }
    // Never wider or longer-lived than the token used.
    let r = issue(&read_only, json!({ "scope": "write" }))
        .await
        .expect("wider scope");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = issue(&read_only, json!({ "pods": ["nar", "elsewhere"] }))
        .await
        .expect("wider pods");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = issue(&read_only, json!({ "expiresIn": 100_000 }))
        .await
        .expect("longer");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = issue(&read_only, json!({ "expiresIn": 60 }))
        .await
        .expect("shorter");
    assert_eq!(r.status(), 201);
    // A duration as the CLI's --expires takes it.
    let r = issue(&app.token, json!({ "expiresIn": "15m" }))
        .await
        .expect("15m");
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.expect("token");
    let exp = app
        .engine
        .token_expiry(t["token"].as_str().expect("token"))
        .expect("an expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (now + 890..=now + 910).contains(&exp),
        "exp {exp}, now {now}"
    );
    // A life past any representable `exp` is refused, not wrapped around; so are bad units.
    for expires in [
        json!(i64::MAX),
        json!(100_i64 * 366 * 24 * 3600 + 1),
        json!("1y"),
        json!(1.5),
    ] {
        let r = issue(&app.token, json!({ "expiresIn": expires }))
            .await
            .expect("huge expiresIn");
        assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    }
    let r = issue(&app.token, json!({ "scope": "admin" }))
        .await
        .expect("bad scope");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = app
        .main(Method::POST, "/api/tokens")
        .json(&json!({}))
        .send()
        .await
        .expect("anonymous");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    app.stop().await;
}

async fn permission_streams(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("club").await;
    let (bob_id, bob) = app.user("bob").await;
    let (_, carol) = app.user("carol").await;
    let r = app
        .pod(Method::POST, "club", "/members?access=private")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("members");
    assert_eq!(r.status(), 201);
    let r = app
        .pod(Method::POST, "club", "/room?access=/members")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("room");
    assert_eq!(r.status(), 201);
    app.append("club", "/room/hello", "members only").await;
    let read = |token: &str| {
        app.pod(Method::GET, "club", "/room/hello")
            .bearer_auth(token)
            .send()
    };
    let grant = |v: Value| {
        app.pod(Method::POST, "club", "/members/grant")
            .bearer_auth(&app.token)
            .header("content-type", "application/json")
            .body(v.to_string())
            .send()
    };
    assert_eq!(read(&bob).await.expect("read").status(), 403);
    assert_eq!(
        read(&bob).await.expect("read again, cache warm").status(),
        403
    );
    // The id in upper case names bob too.
    assert_eq!(
        grant(json!({ "userId": bob_id.to_uppercase(), "read": true }))
            .await
            .expect("grant")
            .status(),
        201
    );
    assert_eq!(
        read(&bob).await.expect("read").status(),
        200,
        "granted at once"
    );
    assert_eq!(read(&carol).await.expect("carol").status(), 403);
    let r = app
        .pod(Method::POST, "club", "/room/bob")
        .bearer_auth(&bob)
        .body("x")
        .send()
        .await
        .expect("write");
    assert_eq!(r.status(), 403, "read does not grant write");
    assert_eq!(
        grant(json!({ "userId": bob_id, "read": true, "write": true }))
            .await
            .expect("grant")
            .status(),
        201
    );
    let r = app
        .pod(Method::POST, "club", "/room/bob")
        .bearer_auth(&bob)
        .body("x")
        .send()
        .await
        .expect("write");
    assert_eq!(r.status(), 201);
    assert_eq!(
        grant(json!({ "userId": bob_id, "read": false }))
            .await
            .expect("revoke")
            .status(),
        201
    );
    assert_eq!(
        read(&bob).await.expect("read").status(),
        403,
        "revoked at once"
    );
    let r = app
        .pod(Method::GET, "club", "/room/hello")
        .send()
        .await
        .expect("anonymous");
    assert_eq!(r.status(), 401);
    app.stop().await;
}

/// Grants and revocations reach another instance whose cache is warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permission_changes_reach_every_instance() {
    let url = fresh_database(Backend::Postgres).await;
    let a = TestApp::spawn_on(&url, &[]).await;
    let b = TestApp::spawn_on(&url, &[]).await;
    a.create_pod("club").await;
    let (bob_id, bob) = a.user("bob").await;
    for path in ["/members?access=private", "/room?access=/members"] {
        let r = a
            .pod(Method::POST, "club", path)
            .bearer_auth(&a.token)
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), 201);
    }
    a.append("club", "/room/hello", "members only").await;
    let read_on_b = || {
        b.pod(Method::GET, "club", "/room/hello")
            .bearer_auth(&bob)
            .send()
    };
    let grant = |read: bool| {
        a.pod(Method::POST, "club", "/members/grant")
            .bearer_auth(&a.token)
            .header("content-type", "application/json")
            .body(json!({ "userId": bob_id, "read": read }).to_string())
            .send()
    };
    assert_eq!(read_on_b().await.expect("read").status(), 403);
    grant(true).await.expect("grant");
    wait_for(|| async { read_on_b().await.expect("read").status() == 200 }).await;
    assert_eq!(read_on_b().await.expect("warm").status(), 200);
    grant(false).await.expect("revoke");
    wait_for(|| async { read_on_b().await.expect("read").status() == 403 }).await;

    // A route written through A is served by B (whose route cache is warm) within the
    // notice's milliseconds, not the cache's 5 s safety TTL.
    let routed_on_b = || {
        b.pod(Method::GET, "club", "/welcome")
            .bearer_auth(&a.token)
            .send()
    };
    assert_eq!(routed_on_b().await.expect("warm").status(), 404);
    let r = a
        .pod(Method::POST, "club", "/.config/routing")
        .bearer_auth(&a.token)
        .json(&json!({ "/welcome": "room/hello" }))
        .send()
        .await
        .expect("route");
    assert_eq!(r.status(), 201);
    wait_for(|| async { routed_on_b().await.expect("routed").status() == 200 }).await;

    // Ownership transfer through A: B refuses the old owner's owner-only actions.
    let r = a
        .pod(Method::POST, "club", "/.config/owner")
        .bearer_auth(&a.token)
        .json(&json!({ "userId": bob_id }))
        .send()
        .await
        .expect("transfer");
    assert_eq!(r.status(), 201);
    // Owner-only decisions read the owner of record: on B at once, without waiting for the
    // notice (B's pod cache is warm from the reads above).
    let r = b
        .pod(Method::POST, "club", "/.config/notes/n")
        .bearer_auth(&a.token)
        .body("x")
        .send()
        .await
        .expect("old owner's .config write");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = b
        .pod(Method::POST, "club", "/.config/routing")
        .bearer_auth(&bob)
        .json(&json!({ "/welcome": "room/hello" }))
        .send()
        .await
        .expect("new owner's routes");
    assert_eq!(r.status(), 201);
    wait_for(|| async {
        let r = b
            .pod(Method::DELETE, "club", "/room/hello")
            .bearer_auth(&a.token)
            .send()
            .await
            .expect("delete");
        r.status() == 403
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Polls until `check` holds; cross-instance notifications take milliseconds, far below the
/// caches' 5 s safety TTL, so a 2 s bound proves they were delivered.
async fn wait_for<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change did not reach the other instance in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests counted in the last sync interval before a graceful stop are written out by the
/// stop: without that, a client could get a fresh budget by each restart.
async fn rate_counts_are_written_out_at_shutdown(backend: Backend) {
    let url = fresh_database(backend).await;
    let limits = [
        ("WEBPODS_RATE_LIMITS", "on"),
        ("WEBPODS_RATE_LIMIT_WRITE", "3"),
    ];
    for round in 0..2 {
        let app = TestApp::spawn_on(&url, &limits).await;
        if round == 0 {
            app.create_pod("brief").await;
        }
        let mut statuses = Vec::new();
        for i in 0..3 {
            let r = app
                .pod(Method::POST, "brief", &format!("/s/r{round}-{i}"))
                .bearer_auth(&app.token)
                .body("x")
                .send()
                .await
                .expect("write");
            statuses.push(r.status().as_u16());
        }
        // Stopped at once, well within the 300 ms sync interval.
        app.stop().await;
        let expected = if round == 0 {
            [201, 201, 201]
        } else {
            [429, 429, 429]
        };
        assert_eq!(statuses, expected, "round {round}");
    }
}

/// Limits hold on every instance and survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_are_shared_and_durable() {
    let url = fresh_database(Backend::Postgres).await;
    let limits = [
        ("WEBPODS_RATE_LIMITS", "on"),
        ("WEBPODS_RATE_LIMIT_WRITE", "4"),
        ("WEBPODS_RATE_LIMIT_READ", "1000"),
    ];
    let a = TestApp::spawn_on(&url, &limits).await;
    let b = TestApp::spawn_on(&url, &limits).await;
    a.create_pod("limited").await;
    let token = a.token.clone();
    let write = |app: &TestApp, i: usize| {
        app.pod(Method::POST, "limited", &format!("/s/r{i}"))
            .bearer_auth(&token)
            .body("x")
            .send()
    };
    let r = write(&a, 0).await.expect("write");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-ratelimit-limit"], "4");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "3");
    // Reset: when this write has left the sliding hour (nothing resets at the next minute).
    let (reset, now) = (header_secs(&r, "x-ratelimit-reset"), unix_now());
    assert!(
        (now + 3540..=now + 3600).contains(&reset),
        "reset {reset}, now {now}"
    );
    for i in 1..4 {
        assert_eq!(write(&a, i).await.expect("write").status(), 201);
    }
    let r = write(&a, 4).await.expect("over");
    assert_eq!(r.status(), 429);
    let retry = header_secs(&r, "retry-after");
    // Every counted write is from this minute, so they all fill the sliding hour until they
    // leave it: a client told to come back sooner would only be refused again.
    assert!((3480..=3600).contains(&retry), "Retry-After {retry}");
    let (reset, now) = (header_secs(&r, "x-ratelimit-reset"), unix_now());
    assert!(reset.abs_diff(now + retry) <= 2, "reset {reset}, now {now}");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(error_code(r).await, (429, "RATE_LIMIT_EXCEEDED".into()));
    // B learns the count from the database within a flush interval.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(write(&b, 5).await.expect("b").status(), 429);
    // Reads have their own budget.
    assert_eq!(
        b.pod(Method::GET, "limited", "/s/r0")
            .bearer_auth(&token)
            .send()
            .await
            .expect("read")
            .status(),
        200
    );
    a.stop().await;
    b.stop().await;
    let c = TestApp::spawn_on(&url, &limits).await;
    assert_eq!(write(&c, 6).await.expect("after restart").status(), 429);
    // Anonymous callers are limited by IP address.
    let c2 = TestApp::spawn_on(
        &url,
        &[
            ("WEBPODS_RATE_LIMITS", "on"),
            ("WEBPODS_RATE_LIMIT_READ", "2"),
        ],
    )
    .await;
    for expected in [404, 404, 429] {
        let r = c2
            .pod(Method::GET, "limited", "/nothing/here")
            .send()
            .await
            .expect("anon");
        assert_eq!(r.status(), expected);
    }
    c.stop().await;
    c2.stop().await;
    // A limit the engine counts inside a request (stream creation) answers with its own
    // bucket's headers, not the request's write bucket.
    let db3 = fresh_database(Backend::Postgres).await;
    let c3 = TestApp::spawn_on(
        &db3,
        &[
            ("WEBPODS_RATE_LIMITS", "on"),
            ("WEBPODS_RATE_LIMIT_STREAM_CREATE", "1"),
            ("WEBPODS_RATE_LIMIT_WRITE", "5"),
        ],
    )
    .await;
    c3.create_pod("streamy").await;
    let create = |stream: &str| {
        c3.pod(Method::POST, "streamy", &format!("/{stream}/r"))
            .bearer_auth(&c3.token)
            .body("x")
            .send()
    };
    assert_eq!(create("first").await.expect("first").status(), 201);
    let r = create("second").await.expect("second");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-limit"], "1");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["details"]["limit"], 1);
    // Refused stream creations wrote nothing: they do not use up the write limit.
    for i in 0..4 {
        let r = create(&format!("more{i}")).await.expect("refused");
        assert_eq!(r.status(), 429);
    }
    for i in 0..4 {
        let r = c3
            .pod(Method::POST, "streamy", &format!("/first/w{i}"))
            .bearer_auth(&c3.token)
            .body("x")
            .send()
            .await
            .expect("write");
        assert_eq!(r.status(), 201, "write {i}");
    }
    c3.stop().await;
}

/// A write into a deep new path creates every missing stream of it, each counted by the
/// stream-creation limit: all of them fit, or the write is refused before the first is created.
async fn a_write_refused_by_the_stream_limit_creates_nothing(backend: Backend) {
    let app = TestApp::spawn_on(
        &fresh_database(backend).await,
        &[
            ("WEBPODS_RATE_LIMITS", "on"),
            ("WEBPODS_RATE_LIMIT_STREAM_CREATE", "5"),
        ],
    )
    .await;
    app.create_pod("deep").await;
    let write = |path: &str| {
        app.pod(Method::POST, "deep", path)
            .bearer_auth(&app.token)
            .body("x")
            .send()
    };
    let r = write("/a/b/c/d/e/f/r").await.expect("six streams");
    // More than the whole limit: it can never be made, and the headers say what is left.
    assert_eq!(r.headers()["x-ratelimit-remaining"], "5");
    assert!(
        header_secs(&r, "retry-after") > 3000,
        "not worth retrying soon"
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "RATE_LIMIT_EXCEEDED");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot be made at once")),
        "{body}"
    );
    let listed: Value = app
        .pod(Method::GET, "deep", "/.config/api/streams?recursive=true")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("streams")
        .json()
        .await
        .expect("json");
    let paths: Vec<&str> = listed["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .filter_map(|s| s["path"].as_str())
        .filter(|p| !p.starts_with(".config"))
        .collect();
    assert_eq!(
        paths,
        Vec::<&str>::new(),
        "a refused write left streams behind"
    );
    // The refused request used none of the five.
    let r = write("/a/b/c/d/e/r").await.expect("five streams");
    assert_eq!(r.status(), 201);
    let r = write("/a/b/c/d/e/r2").await.expect("no new stream");
    assert_eq!(r.status(), 201);
    let r = write("/z/r").await.expect("a sixth");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    // Deeper than 64 segments is not a path.
    let r = write(&format!("/{}/r", vec!["d"; 65].join("/")))
        .await
        .expect("too deep");
    assert_eq!(error_code(r).await, (400, "INVALID_PATH".into()));
    app.stop().await;
}

/// A pod creation refused as a bad request (an invalid name, a name taken) created nothing,
/// so it does not count against the small creation limit; the headers say what is left.
async fn refused_pod_creations_use_up_nothing(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(
        &url,
        &[
            ("WEBPODS_RATE_LIMITS", "on"),
            ("WEBPODS_RATE_LIMIT_POD_CREATE", "2"),
        ],
    )
    .await;
    let create = |name: &str| {
        app.main(Method::POST, "/api/pods")
            .bearer_auth(&app.token)
            .json(&json!({ "name": name }))
            .send()
    };
    let r = create("first").await.expect("create");
    assert_eq!(r.status(), 201);
    for (name, status) in [("Bad_Name", 400), ("-x", 400), ("first", 409), ("a", 400)] {
        let r = create(name).await.expect("create");
        assert_eq!(r.status(), status, "{name}");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "1", "{name}");
    }
    let r = create("second").await.expect("create");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let r = create("third").await.expect("create");
    assert_eq!(r.status(), 429);
    app.stop().await;
}

/// Creations are limited exactly across instances: a burst of pod creations for one user on
/// two instances at once never creates more pods than the limit (two instances counting
/// locally would each allow the full limit), and once it settles the limit is reached exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creation_limits_hold_across_instances_in_a_burst() {
    let url = fresh_database(Backend::Postgres).await;
    let limits = [
        ("WEBPODS_RATE_LIMITS", "on"),
        ("WEBPODS_RATE_LIMIT_POD_CREATE", "10"),
    ];
    let a = TestApp::spawn_on(&url, &limits).await;
    let b = TestApp::spawn_on(&url, &limits).await;
    let token = a.token.clone();
    let create = |app: &TestApp, name: String| {
        app.main(Method::POST, "/api/pods")
            .bearer_auth(&token)
            .json(&json!({ "name": name }))
            .send()
    };
    let burst = (0..24).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        create(app, format!("burst-{i}"))
    });
    let statuses: Vec<u16> = futures::future::join_all(burst)
        .await
        .into_iter()
        .map(|r| r.expect("create").status().as_u16())
        .collect();
    let created = statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(created, 10, "pods created with a limit of 10: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 429),
        "{statuses:?}"
    );
    // The refused ones took nothing, and the limit is used up on either instance.
    for app in [&a, &b] {
        let r = create(app, "after".to_string()).await.expect("create");
        assert_eq!(r.status(), 429);
    }
    a.stop().await;
    b.stop().await;
}

/// Writes (and reads, counted the same way) are limited exactly across instances too: a burst
/// of writes for one user spread over two instances never admits more than the limit, and the
/// quota one instance reserved but did not use is free for the other after a sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_limits_hold_across_instances_in_a_burst() {
    let url = fresh_database(Backend::Postgres).await;
    let limits = [
        ("WEBPODS_RATE_LIMITS", "on"),
        ("WEBPODS_RATE_LIMIT_WRITE", "40"),
    ];
    let a = TestApp::spawn_on(&url, &limits).await;
    let b = TestApp::spawn_on(&url, &limits).await;
    a.create_pod("burst").await;
    let token = a.token.clone();
    let write = |app: &TestApp, i: usize| {
        app.pod(Method::POST, "burst", &format!("/s/w{i}"))
            .bearer_auth(&token)
            .body("x")
            .send()
    };
    let burst = (0..100).map(|i| write(if i % 2 == 0 { &a } else { &b }, i));
    let statuses: Vec<u16> = futures::future::join_all(burst)
        .await
        .into_iter()
        .map(|r| r.expect("write").status().as_u16())
        .collect();
    let mut created = statuses.iter().filter(|s| **s == 201).count();
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 429),
        "{statuses:?}"
    );
    // The stream's first write created it: the burst counts 40 writes at most.
    assert!(
        created <= 40,
        "{created} writes admitted under a limit of 40"
    );
    // After a sync, what is left is used up exactly, through either instance.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut refused = [false, false];
    let mut i = 100;
    while refused != [true, true] && i < 200 {
        let which = i % 2;
        let r = write(if which == 0 { &a } else { &b }, i)
            .await
            .expect("write");
        match r.status().as_u16() {
            201 => created += 1,
            429 => refused[which] = true,
            other => panic!("status {other}"),
        }
        i += 1;
    }
    assert_eq!(created, 40, "writes admitted in all under a limit of 40");
    let records = a
        .pod(Method::GET, "burst", "/s?limit=1000")
        .send()
        .await
        .expect("list")
        .json::<serde_json::Value>()
        .await
        .expect("json");
    assert_eq!(records["total"], 40);
    a.stop().await;
    b.stop().await;
}

/// A caller who comes back every few seconds reads from the lease its first request reserved:
/// the database holds that one reservation, not one per request; a graceful shutdown gives
/// back what the lease did not use, leaving exactly the requests made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_returning_caller_costs_one_reservation_and_shutdown_gives_back_the_rest() {
    let url = fresh_database(Backend::Postgres).await;
    let app = TestApp::spawn_on(
        &url,
        &[
            ("WEBPODS_RATE_LIMITS", "on"),
            ("WEBPODS_RATE_LIMIT_READ", "1000"),
        ],
    )
    .await;
    app.create_pod("lease").await;
    app.append("lease", "/s/a", "x").await;
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let reads_counted = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(SUM(count), 0)::bigint FROM rate_counts WHERE action = 'read'",
        )
        .fetch_one(&pool)
        .await
        .expect("rate counts")
    };
    for i in 0..5 {
        let r = app
            .pod(Method::GET, "lease", "/s/a")
            .bearer_auth(&app.token)
            .send()
            .await
            .expect("read");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-ratelimit-remaining"],
            (999 - i).to_string().as_str()
        );
        // Longer than a sync: a lease given back at every sync would be reserved again.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // One lease of a tenth of the limit, reserved once.
    assert_eq!(reads_counted().await, 100);
    app.stop().await;
    assert_eq!(reads_counted().await, 5);
}

/// A header holding a number of seconds.
fn header_secs(r: &reqwest::Response, name: &str) -> u64 {
    r.headers()[name]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: not a number of seconds"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}
