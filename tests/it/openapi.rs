//! `/openapi.json` describes the routes the server really has: every documented operation is
//! answered by a route (not "no such route", not 405), and every route the server serves is
//! documented.

use reqwest::Method;
use serde_json::Value;

use crate::support::{Backend, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_matches_the_routes() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.create_pod("alice").await;
    let doc: Value = app
        .main(Method::GET, "/openapi.json")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    // The servers are this server's (public_url http://localhost), not the default's.
    assert_eq!(doc["servers"][0]["url"], "http://localhost");
    let text = doc.to_string();
    assert!(!text.contains("localhost:3000"), "default servers left");
    assert!(text.contains("http://{pod}.localhost\""), "pod servers");
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (path, item) in paths {
        let on_pod = item.get("servers").is_some();
        for method in ["get", "post", "delete", "put", "patch"] {
            if item.get(method).is_none() {
                continue;
            }
            documented.push((method.to_uppercase(), path.clone()));
            let concrete = path
                .replace("{path}", "some/stream/name")
                .replace("{provider}", "none")
                .replace("{id}", "none");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let req = if on_pod {
                app.pod(m, "alice", &concrete)
            } else {
                app.main(m, &concrete)
            };
            let r = req.send().await.expect("send");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert_ne!(
                body["error"]["code"], "NOT_FOUND",
                "{method} {path} is documented but not routed"
            );
        }
    }
    // The main-domain routes of api-rest/src/main_routes.rs, and the pod-host verbs.
    for (method, path) in [
        ("GET", "/health"),
        ("GET", "/live"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/api/pods"),
        ("POST", "/api/pods"),
        ("GET", "/{path}"),
        ("POST", "/{path}"),
        ("DELETE", "/{path}"),
        ("DELETE", "/"),
        ("GET", "/.config/api/streams"),
        ("POST", "/.config/owner"),
        ("POST", "/.config/routing"),
        ("POST", "/.config/domains"),
        ("GET", "/auth/providers"),
        ("GET", "/auth/{provider}"),
        ("GET", "/auth/{provider}/callback"),
        ("GET", "/auth/success"),
        ("GET", "/login"),
        ("GET", "/auth/whoami"),
        ("GET", "/auth/session"),
        ("GET", "/auth/sessions"),
        ("DELETE", "/auth/sessions/{id}"),
        ("POST", "/auth/logout"),
        ("GET", "/auth/authorize"),
        ("POST", "/api/tokens"),
    ] {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is served but not documented"
        );
    }
    app.stop().await;
}
