//! GraphQL end to end (SPEC §7): every query, mutation and subscription field over the real
//! server, permission refusals with their `extensions.code`, limits, the N+1 guard (a nested
//! query costs a constant number of storage calls), a subscription over a real
//! `graphql-transport-ws` WebSocket fed by REST appends, and the committed SDL.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::both_backends;
use crate::support::{Backend, TestApp, fresh_database, writers_until_shutdown};

both_backends!(
    graphql_reads_pods_streams_and_records,
    graphql_pagination,
    graphql_mutations,
    graphql_deletes_routing_domains_transfer,
    graphql_permissions_and_error_codes,
    graphql_limits_and_transport,
    graphql_nested_queries_are_batched,
    graphql_subscription_over_websocket,
    graphql_websocket_authentication,
    graphql_websocket_token_expiry_and_init_timeout,
    graphql_rate_limits,
    graphql_shutdown_delivers_acknowledged_records_first,
    graphql_field_errors_are_null_in_place,
    graphql_websocket_messages_are_bounded,
    graphql_subscriptions_select_one_root_field,
);

/// A GraphQL request to the main domain; returns the response body.
async fn gql(app: &TestApp, token: Option<&str>, query: &str, variables: Value) -> Value {
    let mut req = app
        .main(Method::POST, "/graphql")
        .json(&json!({ "query": query, "variables": variables }));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("graphql request");
    r.json().await.expect("graphql json")
}

/// `data`, asserting there were no errors.
async fn ok(app: &TestApp, token: Option<&str>, query: &str, variables: Value) -> Value {
    let body = gql(app, token, query, variables).await;
    assert!(
        body.get("errors").is_none(),
        "unexpected errors for {query}: {body}"
    );
    body["data"].clone()
}

/// The `extensions.code` of the first error.
fn code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("<no code>")
}

async fn spawn_with_headers(backend: Backend) -> TestApp {
    let url = fresh_database(backend).await;
    TestApp::spawn_on(&url, &[("WEBPODS_ALLOWED_RECORD_HEADERS", "x-source")]).await
}

async fn graphql_reads_pods_streams_and_records(backend: Backend) {
    let app = spawn_with_headers(backend).await;
    let t = Some(app.token.as_str());
    app.create_pod("alice").await;
    app.append("alice", "/blog/posts/first", "Hello WebPods!")
        .await;
    let r = app
        .pod(Method::POST, "alice", "/blog/posts/config")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .header("x-record-header-x-source", "cli")
        .body(r#"{"a":1,"b":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .pod(Method::POST, "alice", "/blog/posts/bin")
        .bearer_auth(&app.token)
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.append("alice", "/blog/drafts/d1", "draft").await;

    let me = ok(&app, t, "{ me { id name email } }", json!({})).await;
    assert!(me["me"]["id"].is_string());
    assert_eq!(me["me"]["name"], "local");
    let anon = ok(&app, None, "{ me { id } }", json!({})).await;
    assert_eq!(anon["me"], Value::Null);

    let d = ok(
        &app,
        t,
        "{ myPods { name createdAt owner { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(d["myPods"][0]["name"], "alice");
    assert_eq!(d["myPods"][0]["owner"]["id"], me["me"]["id"]);
    assert!(d["myPods"][0]["createdAt"].as_str().unwrap().ends_with('Z'));

    let q = r#"query($pod: String!) {
        pod(name: $pod) {
            name owner { id }
            streams { path name recordCount accessPermission createdAt pod }
            top: streams(prefix: "blog", recursive: false) { path }
            stream(path: "blog") { path children { path } }
        }
    }"#;
    let d = ok(&app, t, q, json!({ "pod": "alice" })).await;
    let paths: Vec<&str> = d["pod"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    for p in [
        "blog",
        "blog/drafts",
        "blog/posts",
        ".config",
        ".config/owner",
    ] {
        assert!(paths.contains(&p), "{p} listed for the owner: {paths:?}");
    }
    let posts = d["pod"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"] == "blog/posts")
        .unwrap();
    assert_eq!(posts["recordCount"], 3);
    assert_eq!(posts["name"], "posts");
    assert_eq!(posts["pod"], "alice");
    assert_eq!(posts["accessPermission"], "public");
    assert_eq!(
        d["pod"]["top"],
        json!([{ "path": "blog/drafts" }, { "path": "blog/posts" }])
    );
    assert_eq!(
        d["pod"]["stream"]["children"],
        json!([{ "path": "blog/drafts" }, { "path": "blog/posts" }])
    );

    // Anonymous callers see public streams only, and no owner.
    let d = ok(&app, None, q, json!({ "pod": "alice" })).await;
    assert_eq!(d["pod"]["owner"], Value::Null);
    let anon_paths: Vec<&str> = d["pod"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(anon_paths, ["blog", "blog/drafts", "blog/posts"]);

    // Stream fields and typed content accessors.
    let q = r#"{
        stream(pod: "alice", path: "blog/posts") {
            path recordCount
            head { index name base64 contentType size hash }
            text: record(name: "first") {
                index name path contentType text json base64 size contentHash hash previousHash
                userId author { id name email } timestamp headers deleted purged
            }
            json: record(name: "config") { text json headers contentType previousHash }
            last: record(index: -1) { name text }
            byIndex: record(index: 0) { name }
            verify { valid length headIndex headHash firstInvalidIndex reason }
        }
    }"#;
    let d = ok(&app, t, q, json!({})).await;
    let s = &d["stream"];
    assert_eq!(s["recordCount"], 3);
    assert_eq!(s["head"]["name"], "bin");
    assert_eq!(s["head"]["base64"], "AJ+Slg==");
    assert_eq!(s["head"]["contentType"], "application/octet-stream");
    assert_eq!(s["head"]["size"], 4);
    let first = &s["text"];
    assert_eq!(first["text"], "Hello WebPods!");
    assert_eq!(first["json"], Value::Null);
    assert_eq!(first["base64"], "SGVsbG8gV2ViUG9kcyE=");
    assert_eq!(
        first["contentHash"],
        "sha256:33657333ba761aebad23aff0c121309758ba34f920e077e5d55c5856c65f5973"
    );
    assert_eq!(first["previousHash"], Value::Null);
    assert_eq!(first["path"], "blog/posts/first");
    assert_eq!(first["author"]["id"], first["userId"]);
    assert_eq!(first["author"]["id"], me["me"]["id"]);
    assert_eq!(first["headers"], json!({}));
    assert_eq!(first["deleted"], false);
    assert_eq!(first["purged"], false);
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["json"]["json"], json!({ "a": 1, "b": "x" }));
    assert_eq!(s["json"]["text"], r#"{"a":1,"b":"x"}"#);
    assert_eq!(s["json"]["headers"], json!({ "x-source": "cli" }));
    assert_eq!(s["json"]["previousHash"], first["hash"]);
    assert_eq!(s["last"]["name"], "bin");
    assert_eq!(s["last"]["text"], Value::Null, "binary content has no text");
    assert_eq!(s["byIndex"]["name"], "first");
    assert_eq!(s["verify"]["valid"], true);
    assert_eq!(s["verify"]["length"], 3);
    assert_eq!(s["verify"]["headIndex"], 2);
    assert_eq!(s["verify"]["headHash"], s["head"]["hash"]);

    // Someone else's author view has no email.
    let (_, bob) = app.user("bob").await;
    let d = ok(
        &app,
        Some(&bob),
        r#"{ stream(pod: "alice", path: "blog/posts") { record(index: 0) { author { id name email } } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["stream"]["record"]["author"]["name"], "local");
    assert_eq!(d["stream"]["record"]["author"]["email"], Value::Null);

    // The root stream.
    app.append("alice", "/index.html", "<h1>hi</h1>").await;
    let d = ok(
        &app,
        None,
        r#"{ stream(pod: "alice", path: "") { path name recordCount record(name: "index.html") { path text } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["stream"]["path"], "");
    assert_eq!(d["stream"]["recordCount"], 1);
    assert_eq!(d["stream"]["record"]["path"], "index.html");

    // Fields come back in the order they were selected (GraphQL spec §7.2.2), also when the
    // later ones were resolved first (storage reads finish after plain fields).
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    let d = ok(
        &app,
        t,
        r#"{ stream(pod: "alice", path: "blog/posts") { recordCount head { hash index } path
               createdAt n: name } me { id } ...P }
           fragment P on Query { myPods { createdAt name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(keys(&d), ["stream", "me", "myPods"]);
    assert_eq!(
        keys(&d["stream"]),
        ["recordCount", "head", "path", "createdAt", "n"]
    );
    assert_eq!(keys(&d["stream"]["head"]), ["hash", "index"]);
    assert_eq!(keys(&d["myPods"][0]), ["createdAt", "name"]);
    app.stop().await;
}

async fn graphql_pagination(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_MAX_LIST_RECORDS", "7")]).await;
    let t = Some(app.token.as_str());
    app.create_pod("pages").await;
    for i in 0..10 {
        app.append("pages", &format!("/log/r{}", i % 4), &format!("v{i}"))
            .await;
    }
    let q = r#"query($a: String, $b: String, $f: Int, $l: Int, $u: Boolean) {
        stream(pod: "pages", path: "log") {
            records(after: $a, before: $b, first: $f, last: $l, unique: $u) {
                totalCount
                nodes { index }
                edges { cursor node { index name text } }
                pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
            }
        }
    }"#;
    let page = |d: &Value| d["stream"]["records"].clone();
    let idx = |p: &Value| -> Vec<i64> {
        p["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"]["index"].as_i64().unwrap())
            .collect()
    };

    let p = page(&ok(&app, t, q, json!({ "f": 3 })).await);
    assert_eq!(idx(&p), [0, 1, 2]);
    assert_eq!(p["totalCount"], 10);
    assert_eq!(
        p["pageInfo"],
        json!({ "hasNextPage": true, "hasPreviousPage": false, "startCursor": "0", "endCursor": "2" })
    );
    assert_eq!(p["edges"][1]["cursor"], "1");
    assert_eq!(
        p["nodes"],
        json!([{ "index": 0 }, { "index": 1 }, { "index": 2 }])
    );
    assert_eq!(p["edges"][1]["node"]["text"], "v1");

    let p = page(&ok(&app, t, q, json!({ "f": 3, "a": "2" })).await);
    assert_eq!(idx(&p), [3, 4, 5]);
    assert_eq!(p["pageInfo"]["hasPreviousPage"], true);

    // The page size is capped by max_list_records (7 here), like REST.
    let p = page(&ok(&app, t, q, json!({ "f": 100 })).await);
    assert_eq!(idx(&p), [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(p["pageInfo"]["hasNextPage"], true);
    let p = page(&ok(&app, t, q, json!({ "f": 100, "a": "6" })).await);
    assert_eq!(idx(&p), [7, 8, 9]);
    assert_eq!(p["pageInfo"]["hasNextPage"], false);

    // Backward: last / before.
    let p = page(&ok(&app, t, q, json!({ "l": 2 })).await);
    assert_eq!(idx(&p), [8, 9]);
    assert_eq!(p["pageInfo"]["hasPreviousPage"], true);
    assert_eq!(p["pageInfo"]["hasNextPage"], false);
    let p = page(&ok(&app, t, q, json!({ "l": 3, "b": "8" })).await);
    assert_eq!(idx(&p), [5, 6, 7]);
    assert_eq!(p["pageInfo"]["hasNextPage"], true);
    let p = page(&ok(&app, t, q, json!({ "a": "2", "b": "5" })).await);
    assert_eq!(idx(&p), [3, 4]);
    let p = page(&ok(&app, t, q, json!({ "f": 0 })).await);
    assert_eq!(idx(&p), Vec::<i64>::new());
    let p = page(&ok(&app, t, q, json!({ "a": "50" })).await);
    assert_eq!(idx(&p), Vec::<i64>::new());
    assert_eq!(p["pageInfo"]["hasNextPage"], false);
    assert_eq!(p["pageInfo"]["startCursor"], Value::Null);

    // unique: the latest of each name, in index order.
    let p = page(&ok(&app, t, q, json!({ "u": true })).await);
    assert_eq!(idx(&p), [6, 7, 8, 9]);
    let names: Vec<&str> = p["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r2", "r3", "r0", "r1"]);
    let p = page(&ok(&app, t, q, json!({ "u": true, "f": 2 })).await);
    assert_eq!(idx(&p), [6, 7]);
    assert_eq!(p["pageInfo"]["hasNextPage"], true);
    let p = page(&ok(&app, t, q, json!({ "u": true, "f": 2, "a": "7" })).await);
    assert_eq!(idx(&p), [8, 9]);
    assert_eq!(p["pageInfo"]["hasNextPage"], false);

    // Bad arguments.
    let body = gql(&app, t, q, json!({ "f": -1 })).await;
    assert_eq!(code(&body), "INVALID_INPUT");
    for cursor in ["x", "-2"] {
        let body = gql(&app, t, q, json!({ "a": cursor })).await;
        assert_eq!(code(&body), "INVALID_INDEX", "{cursor}");
    }
    let body = gql(&app, t, q, json!({ "u": true, "l": 2 })).await;
    assert_eq!(code(&body), "INVALID_INPUT");
    app.stop().await;
}

async fn graphql_mutations(backend: Backend) {
    let app = spawn_with_headers(backend).await;
    let t = Some(app.token.as_str());
    let d = ok(
        &app,
        t,
        r#"mutation { createPod(name: "gq") { name createdAt owner { id } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["createPod"]["name"], "gq");
    assert!(d["createPod"]["owner"]["id"].is_string());
    let body = gql(
        &app,
        t,
        r#"mutation { createPod(name: "gq") { name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "POD_EXISTS");
    let body = gql(
        &app,
        t,
        r#"mutation { createPod(name: "-bad") { name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "INVALID_INPUT");

    let d = ok(
        &app,
        t,
        r#"mutation { createStream(pod: "gq", path: "notes/private", access: "private") { path accessPermission recordCount } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        d["createStream"],
        json!({ "path": "notes/private", "accessPermission": "private", "recordCount": 0 })
    );
    let body = gql(
        &app,
        t,
        r#"mutation { createStream(pod: "gq", path: "notes/private") { path } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "STREAM_EXISTS");

    let append = r#"mutation($name: String!, $content: String, $json: JSON, $b64: String,
                              $ct: String, $h: JSON, $eh: String, $ei: Int, $key: String) {
        appendRecord(pod: "gq", stream: "notes", name: $name, content: $content, json: $json,
                     base64: $b64, contentType: $ct, headers: $h, expectedHash: $eh,
                     expectedIndex: $ei, idempotencyKey: $key) {
            index name path contentType size contentHash hash previousHash timestamp replayed
        }
    }"#;
    let r0 = ok(&app, t, append, json!({ "name": "a", "content": "hello" })).await["appendRecord"]
        .clone();
    assert_eq!(r0["index"], 0);
    assert_eq!(r0["path"], "notes/a");
    assert_eq!(r0["contentType"], "text/plain");
    assert_eq!(r0["size"], 5);
    assert_eq!(r0["replayed"], false);
    let r1 = ok(
        &app,
        t,
        append,
        json!({ "name": "b", "json": { "k": [1, 2] }, "h": { "X-Source": "gql" } }),
    )
    .await["appendRecord"]
        .clone();
    assert_eq!(r1["contentType"], "application/json");
    assert_eq!(r1["previousHash"], r0["hash"]);
    let r2 = ok(
        &app,
        t,
        append,
        json!({ "name": "c", "b64": "AAEC", "ct": "Image/PNG; q=1", "eh": r1["hash"] }),
    )
    .await["appendRecord"]
        .clone();
    assert_eq!(r2["contentType"], "image/png");
    assert_eq!(r2["size"], 3);
    // Precondition failures carry the current head.
    let body = gql(
        &app,
        t,
        append,
        json!({ "name": "d", "content": "x", "eh": r0["hash"] }),
    )
    .await;
    assert_eq!(code(&body), "PRECONDITION_FAILED");
    assert!(
        body["errors"][0]["extensions"]["details"].is_object(),
        "{body}"
    );
    let body = gql(
        &app,
        t,
        append,
        json!({ "name": "d", "content": "x", "ei": 7 }),
    )
    .await;
    assert_eq!(code(&body), "PRECONDITION_FAILED");
    ok(
        &app,
        t,
        append,
        json!({ "name": "d", "content": "x", "ei": 3 }),
    )
    .await;
    // Idempotency: the replay returns the original receipt and appends nothing.
    let k1 = ok(
        &app,
        t,
        append,
        json!({ "name": "e", "content": "once", "key": "k-1" }),
    )
    .await["appendRecord"]
        .clone();
    let k2 = ok(
        &app,
        t,
        append,
        json!({ "name": "e", "content": "once", "key": "k-1" }),
    )
    .await["appendRecord"]
        .clone();
    assert_eq!(k2["replayed"], true);
    assert_eq!(k2["hash"], k1["hash"]);
    // Content checks.
    let body = gql(
        &app,
        t,
        append,
        json!({ "name": "f", "content": "x", "b64": "AA==" }),
    )
    .await;
    assert_eq!(code(&body), "INVALID_INPUT");
    let body = gql(&app, t, append, json!({ "name": "f", "b64": "!!" })).await;
    assert_eq!(code(&body), "INVALID_CONTENT");
    let body = gql(
        &app,
        t,
        append,
        json!({ "name": "f", "content": "{", "ct": "application/json" }),
    )
    .await;
    assert_eq!(code(&body), "INVALID_CONTENT");
    let body = gql(
        &app,
        t,
        append,
        json!({ "name": "bad..name", "content": "x" }),
    )
    .await;
    assert_eq!(code(&body), "INVALID_NAME");
    let body = gql(
        &app,
        t,
        append,
        json!({ "name": "f", "content": "x", "h": { "x-other": "1" } }),
    )
    .await;
    assert_eq!(code(&body), "INVALID_INPUT");

    // Batch append: atomic, consecutive indices.
    let d = ok(
        &app,
        t,
        r#"mutation($recs: [RecordInput!]!) {
            appendRecords(pod: "gq", stream: "batch/in", records: $recs, access: "public") {
                index name contentType previousHash hash replayed
            }
        }"#,
        json!({ "recs": [
            { "name": "one", "content": "1" },
            { "name": "two", "json": { "n": 2 } },
            { "name": "three", "base64": "Mw==", "contentType": "text/plain" }
        ] }),
    )
    .await;
    let recs = d["appendRecords"].as_array().unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[2]["index"], 2);
    assert_eq!(recs[1]["previousHash"], recs[0]["hash"]);
    let d = ok(
        &app,
        None,
        r#"{ stream(pod: "gq", path: "batch/in") { record(name: "three") { text } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["stream"]["record"]["text"], "3");
    // An invalid record fails the whole batch.
    let body = gql(
        &app,
        t,
        r#"mutation { appendRecords(pod: "gq", stream: "batch/in", records: [{name: "ok", content: "1"}, {name: "..", content: "2"}]) { index } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "INVALID_NAME");
    let d = ok(
        &app,
        None,
        r#"{ stream(pod: "gq", path: "batch/in") { recordCount } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["stream"]["recordCount"], 3);
    // The records written over GraphQL read back over REST.
    let r = app.pod(Method::GET, "gq", "/notes/b").send().await.unwrap();
    assert_eq!(r.headers()["x-index"], "1");
    assert_eq!(r.text().await.unwrap(), r#"{"k":[1,2]}"#);
    let r = app.pod(Method::GET, "gq", "/notes/b").send().await.unwrap();
    assert_eq!(r.headers()["x-source"], "gql");
    app.stop().await;
}

async fn graphql_deletes_routing_domains_transfer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = Some(app.token.as_str());
    app.create_pod("del").await;
    app.append("del", "/docs/a", "one").await;
    app.append("del", "/docs/b", "two").await;
    app.append("del", "/docs/a", "three").await;

    // Tombstone: the latest "a" is deleted.
    let d = ok(
        &app,
        t,
        r#"mutation { deleteRecord(pod: "del", stream: "docs", name: "b") }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["deleteRecord"], true);
    let body = gql(
        &app,
        None,
        r#"{ stream(pod: "del", path: "docs") { record(name: "b") { text } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "RECORD_DELETED");
    assert_eq!(body["data"]["stream"]["record"], Value::Null);
    // Purge: earlier "a" records lose their content, hashes stay, the chain verifies.
    ok(
        &app,
        t,
        r#"mutation { deleteRecord(pod: "del", stream: "docs", name: "a", purge: true) }"#,
        json!({}),
    )
    .await;
    let body = gql(
        &app,
        None,
        r#"{ stream(pod: "del", path: "docs") {
            records { edges { node { index name deleted purged hash } } }
            purged: record(index: 0) { text }
            verify { valid length }
        } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "RECORD_PURGED");
    let s = &body["data"]["stream"];
    assert_eq!(s["verify"], json!({ "valid": true, "length": 5 }));
    let edges = s["records"]["edges"].as_array().unwrap();
    assert_eq!(edges[0]["node"]["purged"], true);
    assert_eq!(edges[4]["node"]["deleted"], true);
    let body = gql(
        &app,
        t,
        r#"mutation { deleteRecord(pod: "del", stream: "docs", name: "zzz") }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "RECORD_NOT_FOUND");

    // Routing: the map is served by REST GETs.
    ok(
        &app,
        t,
        r#"mutation($r: JSON!) { setRouting(pod: "del", routes: $r) }"#,
        json!({ "r": { "/home": "docs?i=-1" } }),
    )
    .await;
    let r = app.pod(Method::GET, "del", "/home").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = gql(
        &app,
        t,
        r#"mutation($r: JSON!) { setRouting(pod: "del", routes: $r) }"#,
        json!({ "r": { "nohash": "docs" } }),
    )
    .await;
    assert_eq!(code(&body), "INVALID_INPUT");

    // Domains: one pod per domain.
    ok(
        &app,
        t,
        r#"mutation { setDomains(pod: "del", domains: ["blog.example.com"]) }"#,
        json!({}),
    )
    .await;
    app.create_pod("other").await;
    let body = gql(
        &app,
        t,
        r#"mutation { setDomains(pod: "other", domains: ["blog.example.com"]) }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "DOMAIN_TAKEN");
    // Names of the service itself (another pod's sub-host) and IP addresses are refused, as
    // over REST.
    for domain in ["www.del.localhost", "localhost", "127.0.0.1"] {
        let body = gql(
            &app,
            t,
            &format!(r#"mutation {{ setDomains(pod: "other", domains: ["{domain}"]) }}"#),
            json!({}),
        )
        .await;
        assert_eq!(code(&body), "INVALID_INPUT", "{domain}: {body}");
    }

    // Deleting a stream.
    ok(
        &app,
        t,
        r#"mutation { deleteStream(pod: "del", path: "docs") }"#,
        json!({}),
    )
    .await;
    let body = gql(
        &app,
        t,
        r#"{ stream(pod: "del", path: "docs") { path } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "STREAM_NOT_FOUND");
    let body = gql(
        &app,
        t,
        r#"mutation { deleteStream(pod: "del", path: ".config/owner") }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "FORBIDDEN");

    // Transfer: the new owner sees the owner, the old one loses rights at once.
    let (bob_id, bob) = app.user("bob").await;
    let d = ok(
        &app,
        t,
        r#"mutation($u: String!) { transferPod(pod: "other", userId: $u) { name owner { id } } }"#,
        json!({ "u": bob_id }),
    )
    .await;
    assert_eq!(d["transferPod"]["name"], "other");
    let d = ok(
        &app,
        Some(&bob),
        r#"{ pod(name: "other") { owner { id } } myPods { name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["pod"]["owner"]["id"], bob_id.as_str());
    assert_eq!(d["myPods"], json!([{ "name": "other" }]));
    let body = gql(
        &app,
        t,
        r#"mutation { deletePod(name: "other") }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "FORBIDDEN");
    let body = gql(
        &app,
        t,
        r#"mutation { transferPod(pod: "del", userId: "no-such-user") { name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "USER_NOT_FOUND");
    let d = ok(
        &app,
        Some(&bob),
        r#"mutation { deletePod(name: "other") }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["deletePod"], true);
    let body = gql(&app, None, r#"{ pod(name: "other") { name } }"#, json!({})).await;
    assert_eq!(code(&body), "POD_NOT_FOUND");
    app.stop().await;
}

async fn graphql_permissions_and_error_codes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = Some(app.token.as_str());
    app.create_pod("perm").await;
    app.append("perm", "/open/a", "public").await;
    ok(
        &app,
        t,
        r#"mutation { createStream(pod: "perm", path: "secret", access: "private") { path } }"#,
        json!({}),
    )
    .await;
    app.append("perm", "/secret/s", "hidden").await;
    let (_, bob) = app.user("bob").await;
    let bob = Some(bob.as_str());
    let append = r#"mutation($s: String!) { appendRecord(pod: "perm", stream: $s, name: "x", content: "x") { index } }"#;
    let read =
        r#"query($s: String!) { stream(pod: "perm", path: $s) { record(index: 0) { text } } }"#;

    // Anonymous: reads public, nothing else.
    assert_eq!(
        code(&gql(&app, None, "{ myPods { name } }", json!({})).await),
        "UNAUTHORIZED"
    );
    assert_eq!(
        code(&gql(&app, None, append, json!({ "s": "open" })).await),
        "UNAUTHORIZED"
    );
    assert_eq!(
        code(&gql(&app, None, read, json!({ "s": "secret" })).await),
        "UNAUTHORIZED"
    );
    ok(&app, None, read, json!({ "s": "open" })).await;
    assert_eq!(
        code(
            &gql(
                &app,
                None,
                r#"mutation { createPod(name: "anon") { name } }"#,
                json!({})
            )
            .await
        ),
        "UNAUTHORIZED"
    );
    // Another user: appends to public streams, not to private ones; no top-level streams.
    ok(&app, bob, append, json!({ "s": "open" })).await;
    assert_eq!(
        code(&gql(&app, bob, append, json!({ "s": "secret" })).await),
        "FORBIDDEN"
    );
    assert_eq!(
        code(&gql(&app, bob, read, json!({ "s": "secret" })).await),
        "FORBIDDEN"
    );
    assert_eq!(
        code(&gql(&app, bob, append, json!({ "s": "newtop" })).await),
        "FORBIDDEN"
    );
    assert_eq!(
        code(&gql(&app, bob, read, json!({ "s": ".config/owner" })).await),
        "FORBIDDEN"
    );
    assert_eq!(
        code(
            &gql(
                &app,
                bob,
                r#"mutation { deleteRecord(pod: "perm", stream: "open", name: "a") }"#,
                json!({})
            )
            .await
        ),
        "FORBIDDEN"
    );
    assert_eq!(
        code(
            &gql(
                &app,
                bob,
                r#"mutation { deleteStream(pod: "perm", path: "open") }"#,
                json!({})
            )
            .await
        ),
        "FORBIDDEN"
    );
    assert_eq!(
        code(
            &gql(
                &app,
                bob,
                r#"mutation { setRouting(pod: "perm", routes: {}) }"#,
                json!({})
            )
            .await
        ),
        "FORBIDDEN"
    );
    // Tokens: bad, limited to other pods, read-only.
    let body = gql(&app, Some("not.a.token"), "{ me { id } }", json!({})).await;
    assert_eq!(code(&body), "INVALID_TOKEN");
    assert_eq!(body["data"], Value::Null);
    // A request-level error has no place in the query: no `locations` (they are 1-based).
    assert!(body["errors"][0].get("locations").is_none(), "{body}");
    let uid = app.engine.ensure_local_user("local").await.unwrap();
    let other_pod = app
        .engine
        .issue_token(
            &uid,
            Some(vec!["elsewhere".into()]),
            webpods_engine::Scope::ALL,
            None,
        )
        .unwrap();
    assert_eq!(
        code(&gql(&app, Some(&other_pod), read, json!({ "s": "open" })).await),
        "POD_FORBIDDEN"
    );
    let read_only = app
        .engine
        .issue_token(
            &uid,
            None,
            webpods_engine::Scope::parse("read").unwrap(),
            None,
        )
        .unwrap();
    ok(&app, Some(&read_only), read, json!({ "s": "secret" })).await;
    assert_eq!(
        code(&gql(&app, Some(&read_only), append, json!({ "s": "open" })).await),
        "FORBIDDEN"
    );
    // The token cookie works like the header.
    let r = app
        .main(Method::POST, "/graphql")
        .header("cookie", format!("token={}", app.token))
        .json(&json!({ "query": "{ myPods { name } }" }))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["myPods"], json!([{ "name": "perm" }]));
    // Not found, with partial data for the rest of the query.
    let body = gql(&app, None, r#"{ pod(name: "nope") { name } }"#, json!({})).await;
    assert_eq!(code(&body), "POD_NOT_FOUND");
    let body = gql(
        &app,
        None,
        r#"{ stream(pod: "perm", path: "open") { path missing: record(name: "zz") { text } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "RECORD_NOT_FOUND");
    assert_eq!(body["data"]["stream"]["path"], "open");
    // Empty segments are INVALID_PATH as in REST; one leading `/` is allowed.
    for bad in ["a//b", "open/", "//", "//open"] {
        assert_eq!(
            code(&gql(&app, None, read, json!({ "s": bad })).await),
            "INVALID_PATH",
            "{bad}"
        );
    }
    let body = gql(&app, None, read, json!({ "s": "/open" })).await;
    assert!(body.get("errors").is_none(), "{body}");
    let create = r#"mutation($p: String!) { createStream(pod: "perm", path: $p) { path } }"#;
    let body = gql(&app, Some(&app.token), create, json!({ "p": "made/" })).await;
    assert_eq!(code(&body), "INVALID_PATH", "{body}");
    // Errors never leak internals: every error has a code and a plain message.
    let body = gql(&app, None, "{ nosuchfield }", json!({})).await;
    assert_eq!(code(&body), "GRAPHQL_VALIDATION_FAILED");
    app.stop().await;
}

async fn graphql_limits_and_transport(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("lim").await;
    // Depth: a query nested beyond the limit is refused before it runs.
    let mut deep = String::from("name");
    for _ in 0..14 {
        deep = format!("ofType {{ {deep} }}");
    }
    let body = gql(
        &app,
        None,
        &format!("{{ __schema {{ types {{ fields {{ type {{ {deep} }} }} }} }} }}"),
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "QUERY_TOO_DEEP", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too deep")
    );
    // Complexity: big pages of nested lists.
    let body = gql(
        &app,
        None,
        r#"{ pod(name: "lim") { streams { children { records(first: 1000) { edges { node { index name text hash } } } } } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "QUERY_TOO_COMPLEX", "{body}");
    assert_eq!(body["data"], Value::Null);
    // Introspection is allowed (the query GraphiQL sends, abridged to its deepest part).
    let d = ok(
        &app,
        None,
        r#"{ __schema { queryType { name } types { name kind fields { name args { name type { ...T } } type { ...T } } } } }
           fragment T on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["__schema"]["queryType"]["name"], "Query");
    // GraphiQL (SPEC §7), and the JSON-only POST (no cross-site text/plain requests).
    let r = app.main(Method::GET, "/graphql").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("/graphql/ws") && page.contains("graphiql"),
        "{page}"
    );
    let r = app
        .main(Method::POST, "/graphql")
        .header("content-type", "text/plain")
        .body(r#"{"query":"{ me { id } }"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let body: Value = r.json().await.unwrap();
    assert_eq!(code(&body), "INVALID_INPUT");
    let r = app
        .main(Method::POST, "/graphql")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // GraphQL lives on the main domain only.
    let r = app
        .pod(Method::POST, "lim", "/graphql")
        .json(&json!({ "query": "{ me { id } }" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    app.stop().await;
}

async fn graphql_nested_queries_are_batched(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_, bob) = app.user("bob").await;
    app.create_pod("small").await;
    app.create_pod("big").await;
    for (pod, n) in [("small", 3), ("big", 50)] {
        for i in 0..n {
            app.append(pod, &format!("/s{i:02}/first"), "by local")
                .await;
            // Half of the heads are written by another user.
            if i % 2 == 0 {
                let r = app
                    .pod(Method::POST, pod, &format!("/s{i:02}/second"))
                    .bearer_auth(&bob)
                    .body("by bob")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }
    }
    let q = r#"query($p: String!) {
        pod(name: $p) {
            streams { path recordCount head { index name text author { id name } } }
        }
    }"#;
    let store = app.engine.store().clone();
    let mut costs = Vec::new();
    for (pod, n) in [("small", 3usize), ("big", 50)] {
        // Warm the engine's pod and stream caches, then count.
        ok(&app, Some(&app.token), q, json!({ "p": pod })).await;
        let before = store.query_count();
        let d = ok(&app, Some(&app.token), q, json!({ "p": pod })).await;
        let cost = store.query_count() - before;
        let streams: Vec<&Value> = d["pod"]["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["path"].as_str().unwrap().starts_with('s'))
            .collect();
        assert_eq!(streams.len(), n);
        for s in &streams {
            let head = &s["head"];
            let by_bob = head["name"] == "second";
            assert_eq!(head["author"]["name"], if by_bob { "bob" } else { "local" });
            assert_eq!(head["text"], if by_bob { "by bob" } else { "by local" });
        }
        costs.push(cost);
    }
    eprintln!("storage calls of the nested query (3 streams, 50 streams): {costs:?}");
    assert_eq!(
        costs[0], costs[1],
        "50 streams must cost what 3 cost (storage calls: {costs:?})"
    );
    // The stream listing, the heads, the authors.
    assert!(
        costs[1] <= 3,
        "a nested query costs 3 statements, not {}",
        costs[1]
    );

    // Pods → streams → children and heads → authors: 53 streams, a handful of statements
    // (the lists of both pods at each level, heads and authors per pod at most).
    let q = r#"{ myPods { name streams { path children { path } head { author { name } } } } }"#;
    ok(&app, Some(&app.token), q, json!({})).await;
    let before = store.query_count();
    let d = ok(&app, Some(&app.token), q, json!({})).await;
    let cost = store.query_count() - before;
    eprintln!("storage calls of myPods → streams → children/heads → authors: {cost}");
    let pods = d["myPods"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    let listed: usize = pods
        .iter()
        .map(|p| p["streams"].as_array().unwrap().len())
        .sum();
    assert!(listed >= 53, "{listed}");
    assert!(
        cost <= 8,
        "nested listings must be batched: {cost} statements"
    );
    app.stop().await;
}

async fn graphql_rate_limits(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(
        &url,
        &[
            ("WEBPODS_RATE_LIMITS", "on"),
            ("WEBPODS_RATE_LIMIT_WRITE", "3"),
            ("WEBPODS_RATE_LIMIT_READ", "4"),
            ("WEBPODS_RATE_LIMIT_POD_CREATE", "1"),
        ],
    )
    .await;
    let t = Some(app.token.as_str());
    // Creations refused as bad requests (an invalid name, a taken one) use up nothing, and
    // the headers say so.
    for query in [
        r#"mutation { createPod(name: "Bad_Name") { name } }"#,
        r#"mutation { createPod(name: "-x") { name } }"#,
    ] {
        let r = app
            .main(Method::POST, "/graphql")
            .bearer_auth(&app.token)
            .json(&json!({ "query": query }))
            .send()
            .await
            .expect("createPod");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "1");
        let body: Value = r.json().await.expect("json");
        assert_eq!(code(&body), "INVALID_INPUT", "{body}");
    }
    ok(
        &app,
        t,
        r#"mutation { createPod(name: "rl") { name } }"#,
        json!({}),
    )
    .await;
    let body = gql(
        &app,
        t,
        r#"mutation { createPod(name: "rl") { name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "RATE_LIMIT_EXCEEDED", "{body}");
    let body = gql(
        &app,
        t,
        r#"mutation { createPod(name: "rl2") { name } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "RATE_LIMIT_EXCEEDED", "{body}");
    // Every mutation field is a write, as every REST write is.
    let append =
        r#"mutation { appendRecord(pod: "rl", stream: "s", name: "a", content: "x") { index } }"#;
    for _ in 0..3 {
        ok(&app, t, append, json!({})).await;
    }
    let body = gql(&app, t, append, json!({})).await;
    assert_eq!(code(&body), "RATE_LIMIT_EXCEEDED", "{body}");
    // Every top-level query field is a read; anonymous callers count by address.
    let read = r#"{ stream(pod: "rl", path: "s") { recordCount } }"#;
    for _ in 0..4 {
        ok(&app, None, read, json!({})).await;
    }
    let body = gql(&app, None, read, json!({})).await;
    assert_eq!(code(&body), "RATE_LIMIT_EXCEEDED", "{body}");
    // Another caller has their own budget. The HTTP response carries SPEC §9's headers, and a
    // request refused outright is a 429 with Retry-After, as in REST.
    let post = |token: Option<&str>| {
        let req = app
            .main(Method::POST, "/graphql")
            .json(&json!({ "query": read }));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
        .send()
    };
    let r = post(t).await.expect("read");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit"], "4");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "3");
    assert!(r.headers().contains_key("x-ratelimit-reset"));
    assert!(!r.headers().contains_key("retry-after"));
    let r = post(None).await.expect("refused read");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=3600).contains(&retry), "{retry}");
    let body: Value = r.json().await.expect("json");
    assert_eq!(code(&body), "RATE_LIMIT_EXCEEDED", "{body}");
    app.stop().await;
}

// ----- subscriptions ---------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `graphql-transport-ws` upgrade with extra headers, not yet initialised.
async fn ws_open(app: &TestApp, headers: &[(&'static str, String)]) -> Ws {
    let mut req = format!("ws://{}/graphql/ws", app.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "graphql-transport-ws"
    );
    ws
}

/// A `graphql-transport-ws` connection, initialised with `init` as payload.
async fn ws_connect(app: &TestApp, init: Value) -> Ws {
    let mut ws = ws_open(app, &[]).await;
    ws.send(Message::text(
        json!({ "type": "connection_init", "payload": init }).to_string(),
    ))
    .await
    .unwrap();
    let ack = ws_next(&mut ws).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    ws
}

/// The next JSON message (pings answered), within 10 s.
async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("open")
            .expect("frame");
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ping" {
                    ws.send(Message::text(json!({ "type": "pong" }).to_string()))
                        .await
                        .unwrap();
                    continue;
                }
                return v;
            }
            Message::Close(c) => {
                return json!({
                    "type": "closed",
                    "code": c.as_ref().map(|f| u16::from(f.code)),
                    "reason": c.as_ref().map(|f| f.reason.to_string()),
                });
            }
            _ => continue,
        }
    }
}

async fn subscribe(ws: &mut Ws, id: &str, args: &str) {
    let query = format!(
        "subscription {{ records({args}) {{ index name text hash previousHash author {{ id }} }} }}"
    );
    ws.send(Message::text(
        json!({ "id": id, "type": "subscribe", "payload": { "query": query } }).to_string(),
    ))
    .await
    .unwrap();
}

async fn graphql_subscription_over_websocket(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("live").await;
    let mut hashes = Vec::new();
    for i in 0..3 {
        hashes.push(
            app.append("live", &format!("/feed/r{i}"), &format!("m{i}"))
                .await["hash"]
                .clone(),
        );
    }
    let mut ws = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", app.token) }),
    )
    .await;
    subscribe(&mut ws, "1", r#"pod: "live", stream: "feed", after: 0"#).await;

    // Appends over REST from 4 concurrent writers while the subscription catches up.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let http = app.http.clone();
            let addr = app.addr;
            let token = app.token.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let r = http
                        .post(format!("http://{addr}/feed/w{w}-{i}"))
                        .header("host", "live.localhost")
                        .bearer_auth(&token)
                        .body(format!("w{w}-{i}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            })
        })
        .collect();
    let mut got = Vec::new();
    while got.len() < 42 {
        let m = ws_next(&mut ws).await;
        assert_eq!(m["type"], "next", "{m}");
        assert_eq!(m["id"], "1");
        assert!(m["payload"].get("errors").is_none(), "{m}");
        got.push(m["payload"]["data"]["records"].clone());
    }
    for w in writers {
        w.await.unwrap();
    }
    // The open subscription counts in the live-subscriptions gauge of /metrics.
    assert_eq!(app.engine.metrics().live_subscriptions(), 1);
    // Strictly increasing from 1, no gap, no duplicate, each linked to the one before.
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["index"], i as i64 + 1, "gapless order");
    }
    assert_eq!(got[0]["previousHash"], hashes[0]);
    assert_eq!(got[0]["text"], "m1");
    for pair in got.windows(2) {
        assert_eq!(pair[1]["previousHash"], pair[0]["hash"]);
    }
    assert!(got[0]["author"]["id"].is_string());
    // In selection order, the author (a storage read) included.
    let keys: Vec<_> = got[0].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        ["index", "name", "text", "hash", "previousHash", "author"]
    );
    let all = app.all_records("live", "feed").await;
    assert_eq!(all.len(), 43);
    assert_eq!(got.last().unwrap()["hash"], all[42]["hash"]);

    // Stop, then resume with after/afterHash: no duplicates across the reconnect.
    ws.send(Message::text(
        json!({ "id": "1", "type": "complete" }).to_string(),
    ))
    .await
    .unwrap();
    let m = ws_next(&mut ws).await;
    assert_eq!(m, json!({ "type": "complete", "id": "1" }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.engine.metrics().live_subscriptions() != 0 {
        assert!(
            Instant::now() < deadline,
            "the stopped subscription still counts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = got.last().unwrap().clone();
    app.append("live", "/feed/after-stop", "later").await;
    subscribe(
        &mut ws,
        "2",
        &format!(
            r#"pod: "live", stream: "feed", after: {}, afterHash: {}"#,
            last["index"], last["hash"]
        ),
    )
    .await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["id"], "2", "{m}");
    assert_eq!(m["payload"]["data"]["records"]["index"], 43);
    assert_eq!(m["payload"]["data"]["records"]["text"], "later");

    // A negative after starts with the last records.
    subscribe(&mut ws, "4", r#"pod: "live", stream: "feed", after: -2"#).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["records"]["index"], 42, "{m}");
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["records"]["index"], 43, "{m}");
    ws.send(Message::text(
        json!({ "id": "4", "type": "complete" }).to_string(),
    ))
    .await
    .unwrap();
    let m = ws_next(&mut ws).await;
    assert_eq!(m, json!({ "type": "complete", "id": "4" }));

    // A wrong afterHash is a fork.
    subscribe(
        &mut ws,
        "3",
        r#"pod: "live", stream: "feed", after: 1, afterHash: "sha256:00""#,
    )
    .await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["id"], "3", "{m}");
    assert_eq!(code(&m["payload"]), "FORK_DETECTED", "{m}");
    drop(ws);

    // Permissions: anonymous subscribers may not follow a private stream…
    ok(
        &app,
        Some(&app.token),
        r#"mutation { createStream(pod: "live", path: "private", access: "private") { path } }"#,
        json!({}),
    )
    .await;
    let mut anon = ws_connect(&app, json!({})).await;
    subscribe(&mut anon, "p", r#"pod: "live", stream: "private""#).await;
    let m = ws_next(&mut anon).await;
    assert_eq!(code(&m["payload"]), "UNAUTHORIZED", "{m}");
    // …a bad token in connection_init closes the connection…
    let mut bad = ws_open(&app, &[]).await;
    bad.send(Message::text(
        json!({ "type": "connection_init", "payload": { "Authorization": "Bearer junk" } })
            .to_string(),
    ))
    .await
    .unwrap();
    let m = ws_next(&mut bad).await;
    assert_eq!(m["type"], "closed", "{m}");
    // graphql-transport-ws: 4403 Forbidden, our code in the reason.
    assert_eq!(m["code"], 4403, "{m}");
    assert!(
        m["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("INVALID_TOKEN")),
        "{m}"
    );
    // …a message that is not the protocol's closes with 4400, and a subscription before
    // connection_init with 4401, as the protocol says…
    let mut garbled = ws_connect(&app, json!({})).await;
    garbled.send(Message::text("not json")).await.unwrap();
    let m = ws_next(&mut garbled).await;
    assert_eq!(
        (&m["type"], &m["code"]),
        (&json!("closed"), &json!(4400)),
        "{m}"
    );
    let mut early = ws_open(&app, &[]).await;
    early
        .send(Message::text(
            json!({ "id": "1", "type": "subscribe", "payload": { "query": "subscription { records(pod: \"live\", stream: \"private\") { index } }" } })
                .to_string(),
        ))
        .await
        .unwrap();
    let m = ws_next(&mut early).await;
    assert_eq!(
        (&m["type"], &m["code"]),
        (&json!("closed"), &json!(4401)),
        "{m}"
    );
    // …a second subscription under a running id closes with 4409, while an id whose
    // subscription completed may be used again…
    let mut twice = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", app.token) }),
    )
    .await;
    subscribe(&mut twice, "gone", r#"pod: "live", stream: "nosuch""#).await;
    let m = ws_next(&mut twice).await;
    assert_eq!(code(&m["payload"]), "STREAM_NOT_FOUND", "{m}");
    assert_eq!(ws_next(&mut twice).await["type"], "complete");
    // A bad stream path is INVALID_PATH, as for queries and REST.
    for bad in ["a..b", "feed//x", "feed/"] {
        subscribe(
            &mut twice,
            "gone",
            &format!(r#"pod: "live", stream: "{bad}""#),
        )
        .await;
        let m = ws_next(&mut twice).await;
        assert_eq!(code(&m["payload"]), "INVALID_PATH", "{bad}: {m}");
        assert_eq!(ws_next(&mut twice).await["type"], "complete");
    }
    subscribe(&mut twice, "gone", r#"pod: "live", stream: "private""#).await;
    subscribe(&mut twice, "gone", r#"pod: "live", stream: "private""#).await;
    loop {
        let m = ws_next(&mut twice).await;
        if m["type"] == "closed" {
            assert_eq!(m["code"], 4409, "{m}");
            break;
        }
    }
    // …and a stream deleted while followed ends the subscription with its code.
    let mut owner = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", app.token) }),
    )
    .await;
    subscribe(&mut owner, "d", r#"pod: "live", stream: "private""#).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(
        &app,
        Some(&app.token),
        r#"mutation { deleteStream(pod: "live", path: "private") }"#,
        json!({}),
    )
    .await;
    let m = ws_next(&mut owner).await;
    assert_eq!(code(&m["payload"]), "STREAM_NOT_FOUND", "{m}");
    let m = ws_next(&mut owner).await;
    assert_eq!(m["type"], "complete", "{m}");

    // At most 100 subscriptions per connection; a finished one frees its slot.
    let mut many = ws_connect(&app, json!({})).await;
    for i in 0..101 {
        subscribe(
            &mut many,
            &format!("m{i}"),
            r#"pod: "live", stream: "feed", after: 100000"#,
        )
        .await;
    }
    let m = ws_next(&mut many).await;
    assert_eq!(m["type"], "next", "{m}");
    assert_eq!(code(&m["payload"]), "INVALID_INPUT", "{m}");
    assert!(
        m["payload"]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at most 100")
    );
    let refused = m["id"].as_str().unwrap().to_string();
    let m = ws_next(&mut many).await;
    assert_eq!(m, json!({ "type": "complete", "id": refused }));
    let done = if refused == "m0" { "m1" } else { "m0" };
    many.send(Message::text(
        json!({ "id": done, "type": "complete" }).to_string(),
    ))
    .await
    .unwrap();
    let m = ws_next(&mut many).await;
    assert_eq!(m, json!({ "type": "complete", "id": done }));
    subscribe(
        &mut many,
        "again",
        r#"pod: "live", stream: "feed", after: 42"#,
    )
    .await;
    let m = ws_next(&mut many).await;
    assert_eq!(m["id"], "again", "{m}");
    assert_eq!(m["payload"]["data"]["records"]["index"], 43, "{m}");
    app.stop().await;
}

/// A `graphql-transport-ws` connection with extra upgrade headers and no init payload.
async fn ws_connect_with(app: &TestApp, headers: &[(&'static str, String)]) -> Ws {
    let mut ws = ws_open(app, headers).await;
    ws.send(Message::text(
        json!({ "type": "connection_init" }).to_string(),
    ))
    .await
    .unwrap();
    let ack = ws_next(&mut ws).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    ws
}

/// A socket authenticates once, but its token's expiry holds for every operation on it: after
/// it, queries and mutations fail with `TOKEN_EXPIRED` and change nothing (as over HTTP). A
/// socket that never sends `connection_init` is closed with 4408.
async fn graphql_websocket_token_expiry_and_init_timeout(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let short = app.short_token(2);
    let mut ws = ws_connect(&app, json!({ "Authorization": format!("Bearer {short}") })).await;
    let op = |id: &str, query: &str| {
        Message::text(
            json!({ "id": id, "type": "subscribe", "payload": { "query": query } }).to_string(),
        )
    };
    ws.send(op("1", "{ myPods { name } }")).await.unwrap();
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["myPods"], json!([]), "{m}");
    assert_eq!(ws_next(&mut ws).await["type"], "complete");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(op("2", "{ myPods { name } }")).await.unwrap();
    let m = ws_next(&mut ws).await;
    assert_eq!(code(&m["payload"]), "TOKEN_EXPIRED", "{m}");
    ws.send(op("3", r#"mutation { createPod(name: "late") { name } }"#))
        .await
        .unwrap();
    let mut m = ws_next(&mut ws).await;
    if m["type"] == "complete" {
        m = ws_next(&mut ws).await;
    }
    assert_eq!(code(&m["payload"]), "TOKEN_EXPIRED", "{m}");
    let pods = ok(&app, Some(&app.token), "{ myPods { name } }", json!({})).await;
    assert_eq!(pods["myPods"], json!([]));

    // No connection_init: closed after the timeout (5 s), even though the client answers
    // every ping.
    let mut ws = ws_open(&app, &[]).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["type"], "closed", "{m}");
    assert_eq!(m["code"], 4408, "{m}");
}

async fn graphql_websocket_authentication(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("wsauth").await;
    ok(
        &app,
        Some(&app.token),
        r#"mutation { appendRecord(pod: "wsauth", stream: "p", name: "a", content: "x", access: "private") { index } }"#,
        json!({}),
    )
    .await;
    let args = r#"pod: "wsauth", stream: "p""#;
    // The Authorization header at upgrade.
    let mut ws = ws_connect_with(&app, &[("authorization", format!("Bearer {}", app.token))]).await;
    subscribe(&mut ws, "1", args).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["records"]["index"], 0, "{m}");
    // The token cookie, from a main-domain page (or no page at all).
    let cookie = format!("token={}", app.token);
    for origin in [None, Some("http://localhost")] {
        let mut headers = vec![("cookie", cookie.clone()), ("host", "localhost".into())];
        if let Some(o) = origin {
            headers.push(("origin", o.to_string()));
        }
        let mut ws = ws_connect_with(&app, &headers).await;
        subscribe(&mut ws, "1", args).await;
        let m = ws_next(&mut ws).await;
        assert_eq!(
            m["payload"]["data"]["records"]["index"], 0,
            "{origin:?}: {m}"
        );
    }
    // A pod's page is same-site: its cookie must not authenticate the socket.
    let mut ws = ws_connect_with(
        &app,
        &[
            ("cookie", cookie.clone()),
            ("host", "localhost".to_string()),
            ("origin", "http://evil.localhost".to_string()),
        ],
    )
    .await;
    subscribe(&mut ws, "1", args).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(code(&m["payload"]), "UNAUTHORIZED", "{m}");
    // A bad token at upgrade is refused before the upgrade.
    let mut req = format!("ws://{}/graphql/ws", app.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    req.headers_mut()
        .insert("authorization", "Bearer junk".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("expected a 401, got {other}"),
    }
    // Revocation: a reader who loses access gets FORBIDDEN and the subscription ends.
    let (bob_id, bob) = app.user("bob").await;
    let transfer = r#"mutation($u: String!) { transferPod(pod: "wsauth", userId: $u) { name } }"#;
    ok(&app, Some(&app.token), transfer, json!({ "u": bob_id })).await;
    let mut ws = ws_connect(&app, json!({ "Authorization": format!("Bearer {bob}") })).await;
    subscribe(&mut ws, "r", args).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(
        m["payload"]["data"]["records"]["index"], 0,
        "the owner reads: {m}"
    );
    let local_id = app.engine.ensure_local_user("local").await.unwrap();
    ok(&app, Some(&bob), transfer, json!({ "u": local_id })).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(code(&m["payload"]), "FORBIDDEN", "{m}");
    let m = ws_next(&mut ws).await;
    assert_eq!(m, json!({ "type": "complete", "id": "r" }));

    // Queries and mutations work over the socket too, with the socket's caller.
    let mut ws = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", app.token) }),
    )
    .await;
    ws.send(Message::text(
        json!({ "id": "q", "type": "subscribe", "payload": { "query": "{ myPods { name } }" } })
            .to_string(),
    ))
    .await
    .unwrap();
    let m = ws_next(&mut ws).await;
    assert_eq!(
        m["payload"]["data"]["myPods"],
        json!([{ "name": "wsauth" }]),
        "{m}"
    );
    assert_eq!(
        ws_next(&mut ws).await,
        json!({ "type": "complete", "id": "q" })
    );
    // Shutdown closes GraphQL sockets with 1001, as live tails.
    subscribe(&mut ws, "s", args).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["records"]["index"], 0, "{m}");
    let stopping = tokio::spawn(app.stop());
    loop {
        let m = ws_next(&mut ws).await;
        if m["type"] == "closed" {
            assert_eq!(m["code"], 1001, "{m}");
            break;
        }
        assert_eq!(m["type"], "complete", "{m}");
    }
    stopping.await.unwrap();
}

/// A graceful shutdown answers in-flight appends before it ends subscriptions: each subscription
/// receives every acknowledged record, and the socket closes with 1001 — without `complete`,
/// which would tell the client the subscription is over (it is to resubscribe elsewhere).
async fn graphql_shutdown_delivers_acknowledged_records_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("gqlflush").await;
    app.append("gqlflush", "/s/a", "x").await;
    let mut ws = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", app.token) }),
    )
    .await;
    subscribe(&mut ws, "s", r#"pod: "gqlflush", stream: "s""#).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["records"]["index"], 0, "{m}");
    let (acked, writers) = writers_until_shutdown(&app, "gqlflush", "s");
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopping = tokio::spawn(app.stop());
    let mut next = 1;
    loop {
        let m = ws_next(&mut ws).await;
        match m["type"].as_str() {
            Some("next") => {
                assert_eq!(m["payload"]["data"]["records"]["index"], next, "{m}");
                next += 1;
            }
            _ => {
                assert_eq!(
                    (&m["type"], &m["code"]),
                    (&json!("closed"), &json!(1001)),
                    "{m}"
                );
                break;
            }
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    stopping.await.unwrap();
    let acked = acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        next > acked,
        "closed at index {next}, but index {acked} was acknowledged"
    );
}

/// GraphQL spec §6.4.4: a field that raised an error is `null` in place (its key present, in
/// selection order); an error in a non-null field makes the nearest nullable parent `null`;
/// root fields and mutations are nullable, so siblings survive; `@skip` / `@include` still
/// leave fields out.
async fn graphql_field_errors_are_null_in_place(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = Some(app.token.as_str());
    app.create_pod("errs").await;
    app.append("errs", "/s/a", "x").await;
    app.append("errs", "/s/gone", "secret").await;
    let r = app
        .pod(Method::DELETE, "errs", "/s/gone?purge=true")
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();

    // Valid JSON that GraphQL's JSON cannot carry: an error saying so, not a silent null.
    let r = app
        .pod(Method::POST, "errs", "/s/huge")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body(r#"{"n":1e400}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body = gql(
        &app,
        t,
        r#"{ stream(pod: "errs", path: "s") { record(name: "huge") { text json } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(code(&body), "INVALID_CONTENT", "{body}");
    assert_eq!(body["data"]["stream"]["record"]["text"], r#"{"n":1e400}"#);

    // A nullable field fails: null in place, the rest in order, the error beside.
    let body = gql(
        &app,
        t,
        r#"{ stream(pod: "errs", path: "s") { path record(name: "zzz") { index } recordCount } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        keys(&body["data"]["stream"]),
        ["path", "record", "recordCount"]
    );
    assert_eq!(body["data"]["stream"]["record"], Value::Null, "{body}");
    assert_eq!(code(&body), "RECORD_NOT_FOUND");
    assert_eq!(body["errors"][0]["path"], json!(["stream", "record"]));
    // Its only selection failing does not make the (non-null) stream null.
    let body = gql(
        &app,
        t,
        r#"{ stream(pod: "errs", path: "s") { record(name: "zzz") { index } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        body["data"],
        json!({ "stream": { "record": null } }),
        "{body}"
    );
    // A missing stream under a pod is null in place; the pod and its other fields stay.
    let body = gql(
        &app,
        t,
        r#"{ pod(name: "errs") { name missing: stream(path: "nope") { path } found: stream(path: "s") { path } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        body["data"]["pod"],
        json!({ "name": "errs", "missing": null, "found": { "path": "s" } }),
        "{body}"
    );
    assert_eq!(code(&body), "STREAM_NOT_FOUND");
    // A purged record's text is null in place.
    let body = gql(
        &app,
        t,
        r#"{ stream(pod: "errs", path: "s") { records(first: 2) { edges { node { index text name base64 } } } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        body["data"]["stream"]["records"]["edges"][1]["node"],
        json!({ "index": 1, "text": null, "name": "gone", "base64": null }),
        "{body}"
    );
    assert_eq!(
        body["data"]["stream"]["records"]["edges"][0]["node"]["base64"], "eA==",
        "the other records of the page are whole: {body}"
    );
    assert_eq!(code(&body), "RECORD_PURGED");
    // Root fields are nullable: a failed one is null, its siblings answer.
    let body = gql(
        &app,
        t,
        r#"{ me { id } stream(pod: "errs", path: "nope") { path } }"#,
        json!({}),
    )
    .await;
    assert_eq!(body["data"]["stream"], Value::Null, "{body}");
    assert!(body["data"]["me"]["id"].is_string(), "{body}");
    assert_eq!(code(&body), "STREAM_NOT_FOUND");
    // A non-null field fails: its nearest nullable parent is null (§6.4.4 propagation).
    let body = gql(
        &app,
        t,
        r#"{ me { id } stream(pod: "errs", path: "s") { path records(first: -1) { edges { cursor } } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(body["data"]["stream"], Value::Null, "{body}");
    assert!(body["data"]["me"]["id"].is_string(), "{body}");
    assert_eq!(body["errors"][0]["path"], json!(["stream", "records"]));
    // Mutations run in order; a failed one does not hide the receipts of those before it.
    let body = gql(
        &app,
        t,
        r#"mutation {
             a: appendRecord(pod: "errs", stream: "m", name: "ok", content: "1") { index }
             b: appendRecord(pod: "errs", stream: "m", name: "bad name", content: "2") { index }
           }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        body["data"],
        json!({ "a": { "index": 0 }, "b": null }),
        "{body}"
    );
    assert_eq!(code(&body), "INVALID_NAME");
    // @skip / @include leave fields out, with literals and variables.
    let d = ok(
        &app,
        t,
        r#"query Q($no: Boolean!) { stream(pod: "errs", path: "s") {
               path @skip(if: true) name recordCount @include(if: $no) createdAt @include(if: true) } }"#,
        json!({ "no": false }),
    )
    .await;
    assert_eq!(keys(&d["stream"]), ["name", "createdAt"]);
    app.stop().await;
}

// ----- the committed schema --------------------------------------------------------------------

/// `api-graphql/schema.graphql` is the schema the code exports. Regenerate it with
/// `WEBPODS_UPDATE_SCHEMA=1 cargo test --test it graphql::sdl`.
#[test]
fn sdl_is_committed() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("api-graphql/schema.graphql");
    let current = webpods_api_graphql::sdl();
    if std::env::var_os("WEBPODS_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == current,
        "api-graphql/schema.graphql is out of date: run \
         WEBPODS_UPDATE_SCHEMA=1 cargo test --test it graphql::sdl and commit it"
    );
}

/// A `/graphql/ws` message is bounded like a `/graphql` body (a mutation carries content):
/// one over it is answered with close 1009, not read whole or dropped without a word.
async fn graphql_websocket_messages_are_bounded(backend: Backend) {
    let url = fresh_database(backend).await;
    // Body limit: twice the record limit plus 1 MiB.
    let app = TestApp::spawn_on(&url, &[("WEBPODS_MAX_RECORD_BYTES", "1024")]).await;
    let mut ws = ws_connect(&app, json!({})).await;
    // Within the limit: answered.
    let ping = json!({ "type": "ping", "payload": { "pad": "x".repeat(500_000) } });
    ws.send(Message::text(ping.to_string())).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "pong");
    let big = json!({ "type": "ping", "payload": { "pad": "x".repeat(1_200_000) } });
    // The server may close before the whole message is written.
    let _ = ws.send(Message::text(big.to_string())).await;
    let m = ws_next(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_u64()),
        (Some("closed"), Some(1009)),
        "{m}"
    );
}

/// A subscription selects exactly one root field (GraphQL spec, "Single root field"); two
/// would each yield `data: null` and lose their records without an error.
async fn graphql_subscriptions_select_one_root_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("one").await;
    app.append("one", "/a/r0", "x").await;
    let mut ws = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", app.token) }),
    )
    .await;
    let send = |id: &str, query: &str| {
        Message::text(
            json!({ "id": id, "type": "subscribe", "payload": { "query": query } }).to_string(),
        )
    };
    for (id, query) in [
        (
            "two",
            r#"subscription { a: records(pod: "one", stream: "a") { index } b: records(pod: "one", stream: "a") { index } }"#,
        ),
        (
            "spread",
            r#"subscription { ...F } fragment F on Subscription { a: records(pod: "one", stream: "a") { index } b: records(pod: "one", stream: "a") { index } }"#,
        ),
    ] {
        ws.send(send(id, query)).await.unwrap();
        let m = ws_next(&mut ws).await;
        assert_eq!(m["id"], id, "{m}");
        assert_eq!(code(&m["payload"]), "GRAPHQL_VALIDATION_FAILED", "{m}");
        let m = ws_next(&mut ws).await;
        assert_eq!(
            (m["type"].as_str(), m["id"].as_str()),
            (Some("complete"), Some(id))
        );
    }
    ws.send(send(
        "ok",
        r#"subscription { records(pod: "one", stream: "a") { index } }"#,
    ))
    .await
    .unwrap();
    let m = ws_next(&mut ws).await;
    assert_eq!(m["payload"]["data"]["records"]["index"], 0, "{m}");
}
