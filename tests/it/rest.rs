//! The core REST flow of SPEC §4: pods, appends of every content kind, raw and list reads.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_valid_chain, error_code};

both_backends!(
    create_append_and_read_back,
    content_types_round_trip,
    pods_are_listed_for_their_owner,
    permissions_owner_writes_public_reads,
    preconditions_and_idempotency,
    numeric_names_and_indices,
);

async fn create_append_and_read_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("alice").await;
    let mut receipts = Vec::new();
    for i in 0..3 {
        receipts.push(
            app.append("alice", &format!("/blog/posts/p{i}"), &format!("hello {i}"))
                .await,
        );
    }
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(r["index"], i as i64);
        assert_eq!(r["path"], format!("blog/posts/p{i}"));
        assert_eq!(r["contentType"], "text/plain");
    }
    assert_eq!(receipts[0]["previousHash"], Value::Null);
    assert_eq!(receipts[1]["previousHash"], receipts[0]["hash"]);
    assert_eq!(receipts[2]["previousHash"], receipts[1]["hash"]);

    // Raw read by name: content and chain headers.
    let r = app
        .pod(Method::GET, "alice", "/blog/posts/p1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["x-index"], "1");
    assert_eq!(h["x-hash"], receipts[1]["hash"].as_str().expect("hash"));
    assert_eq!(
        h["x-previous-hash"],
        receipts[0]["hash"].as_str().expect("hash")
    );
    assert_eq!(
        h["etag"],
        format!("\"{}\"", receipts[1]["hash"].as_str().expect("hash"))
    );
    assert_eq!(h["content-type"], "text/plain");
    assert!(h.contains_key("x-request-id"));
    assert_eq!(r.text().await.expect("body"), "hello 1");

    // The client's request id comes back as sent (SPEC §4.7), a long one with spaces too;
    // only one past 1,024 bytes is replaced.
    for (sent, echoed) in [
        ("abc-123".to_string(), true),
        (format!("trace {}", "x".repeat(300)), true),
        ("y".repeat(1025), false),
    ] {
        let r = app
            .pod(Method::GET, "alice", "/blog/posts/p1")
            .header("x-request-id", &sent)
            .send()
            .await
            .expect("get");
        let got = r.headers()["x-request-id"].to_str().expect("ascii");
        assert_eq!(got == sent, echoed, "{sent:.20}…");
        assert!(!got.is_empty());
    }

    // The first record's previous hash is empty; ?i=N and negative indices address records.
    let r = app
        .pod(Method::GET, "alice", "/blog/posts?i=0")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-previous-hash"], "");
    assert_eq!(r.text().await.expect("body"), "hello 0");
    let r = app
        .pod(Method::GET, "alice", "/blog/posts?i=-1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.text().await.expect("body"), "hello 2");

    // List, verify the chain from the spec's formula, ranges, ETag.
    let records = app.all_records("alice", "blog/posts").await;
    assert_eq!(records.len(), 3);
    assert_valid_chain("alice", "blog/posts", &records);
    let r = app
        .pod(Method::GET, "alice", "/blog/posts?limit=2")
        .send()
        .await
        .expect("list");
    let etag = r.headers()["etag"].to_str().expect("etag").to_string();
    let page: Value = r.json().await.expect("page");
    assert_eq!(page["total"], 3);
    assert_eq!(page["hasMore"], true);
    assert_eq!(page["nextIndex"], 2);
    assert_eq!(page["records"].as_array().map(Vec::len), Some(2));
    let r = app
        .pod(Method::GET, "alice", "/blog/posts")
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("conditional list");
    assert_eq!(r.status(), 304);
    let page: Value = app
        .pod(Method::GET, "alice", "/blog/posts?after=-2")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("page");
    let names: Vec<&str> = page["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["p1", "p2"], "after=-2 is the last two records");
    let page: Value = app
        .pod(Method::GET, "alice", "/blog/posts?i=-2:3")
        .send()
        .await
        .expect("range")
        .json()
        .await
        .expect("range body");
    assert_eq!(page["range"], json!({ "start": 1, "end": 3 }));
    assert_eq!(page["records"][0]["name"], "p1");

    // The owner record written at pod creation.
    let r = app
        .pod(Method::GET, "alice", "/.config/owner/owner")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("owner");
    assert_eq!(r.status(), 200);
    let owner: Value = r.json().await.expect("owner json");
    assert!(owner["userId"].is_string());
    app.stop().await;
}

async fn content_types_round_trip(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("types").await;
    let json_body = r#"{ "b": 1.50, "a": [true, null] }"#;
    let r = app
        .pod(Method::POST, "types", "/data/doc")
        .bearer_auth(&app.token)
        .header("content-type", "application/json; charset=utf-8")
        .body(json_body)
        .send()
        .await
        .expect("append json");
    assert_eq!(r.status(), 201);
    let binary: Vec<u8> = (0..=255u8).collect();
    let r = app
        .pod(Method::POST, "types", "/data/blob")
        .bearer_auth(&app.token)
        .header("content-type", "application/octet-stream")
        .body(binary.clone())
        .send()
        .await
        .expect("append binary");
    assert_eq!(r.status(), 201);
    let r = app
        .pod(Method::POST, "types", "/data/page")
        .bearer_auth(&app.token)
        .header("content-type", "text/plain")
        .header("x-content-type", "text/html")
        .body("<h1>héllo</h1>")
        .send()
        .await
        .expect("append html");
    assert_eq!(r.status(), 201);

    // Byte-exact raw reads.
    let r = app
        .pod(Method::GET, "types", "/data/doc")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.expect("body"), json_body);
    let r = app
        .pod(Method::GET, "types", "/data/blob")
        .send()
        .await
        .expect("get");
    assert_eq!(r.bytes().await.expect("body").to_vec(), binary);
    let r = app
        .pod(Method::GET, "types", "/data/page")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["content-type"], "text/html");

    // JSON shapes in a list: JSON value, base64 with encoding, string.
    let records = app.all_records("types", "data").await;
    assert_eq!(
        records[0]["content"],
        json!({ "b": 1.50, "a": [true, null] })
    );
    assert_eq!(records[1]["encoding"], "base64");
    assert_eq!(records[2]["content"], "<h1>héllo</h1>");
    assert_valid_chain("types", "data", &records);
    app.stop().await;
}

async fn pods_are_listed_for_their_owner(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("p-one").await;
    app.create_pod("p-two").await;
    let (_, bob) = app.user("bob").await;
    let mine: Value = app
        .main(Method::GET, "/api/pods")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = mine
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["p-one", "p-two"]);
    let theirs: Value = app
        .main(Method::GET, "/api/pods")
        .bearer_auth(&bob)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(theirs, json!([]));
    app.stop().await;
}

async fn permissions_owner_writes_public_reads(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("perm").await;
    let (_, bob) = app.user("bob").await;
    app.append("perm", "/public-log/a", "x").await;
    let r = app
        .pod(Method::POST, "perm", "/secret?access=private")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("create private");
    assert_eq!(r.status(), 201);
    app.append("perm", "/secret/s", "hidden").await;

    // Anyone reads public; only the owner reads private.
    let r = app
        .pod(Method::GET, "perm", "/public-log/a")
        .send()
        .await
        .expect("anon read");
    assert_eq!(r.status(), 200);
    let r = app
        .pod(Method::GET, "perm", "/secret/s")
        .send()
        .await
        .expect("anon private");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    let r = app
        .pod(Method::GET, "perm", "/secret/s")
        .bearer_auth(&bob)
        .send()
        .await
        .expect("bob private");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));

    // A stranger may not create top-level streams in someone else's pod, nor write private ones.
    let post = |path: &str, token: &str| {
        app.pod(Method::POST, "perm", path)
            .bearer_auth(token)
            .header("content-type", "text/plain")
            .body("x")
    };
    let r = post("/bobs/x", &bob).send().await.expect("bob creates");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = post("/secret/x", &bob)
        .send()
        .await
        .expect("bob writes private");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    // Public streams take appends from any authenticated user.
    let r = post("/public-log/b", &bob)
        .send()
        .await
        .expect("bob writes public");
    assert_eq!(r.status(), 201);
    // .config is owner-only, and the owner stream only changes through its endpoint.
    let r = app
        .pod(Method::GET, "perm", "/.config/owner/owner")
        .bearer_auth(&bob)
        .send()
        .await
        .expect("read config");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = app
        .pod(Method::POST, "perm", "/.config/owner/x")
        .bearer_auth(&app.token)
        .body("{}x")
        .send()
        .await
        .expect("write owner stream");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    app.stop().await;
}

async fn preconditions_and_idempotency(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("cond").await;
    let post = |name: &str| {
        app.pod(Method::POST, "cond", &format!("/log/{name}"))
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .body("v")
    };
    let r = post("a")
        .header("if-none-match", "*")
        .send()
        .await
        .expect("first");
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.expect("receipt");
    let r = post("b")
        .header("if-none-match", "*")
        .send()
        .await
        .expect("not empty");
    assert_eq!(r.status(), 412);
    let body: Value = r.json().await.expect("error");
    assert_eq!(body["error"]["code"], "PRECONDITION_FAILED");
    assert_eq!(body["error"]["details"]["head"]["index"], 0);
    assert_eq!(body["error"]["details"]["head"]["hash"], first["hash"]);
    let r = post("b")
        .header(
            "if-match",
            format!("\"{}\"", first["hash"].as_str().expect("hash")),
        )
        .send()
        .await
        .expect("if-match");
    assert_eq!(r.status(), 201);
    let r = post("c")
        .header("x-expected-index", "5")
        .send()
        .await
        .expect("expected index");
    assert_eq!(r.status(), 412);
    let r = post("c")
        .header("x-expected-index", "2")
        .send()
        .await
        .expect("expected index");
    assert_eq!(r.status(), 201);

    // `If-Match: *` asks for a stream that has a record (RFC 9110 §13.1.1).
    let r = post("star")
        .header("if-match", "*")
        .send()
        .await
        .expect("if-match *");
    assert_eq!(r.status(), 201);
    // A precondition that fails on a stream that does not exist yet creates nothing: neither
    // the stream nor its parents.
    let fresh = |path: &str| {
        app.pod(Method::POST, "cond", path)
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .body("v")
    };
    let refused = [
        fresh("/new1/deep/x").header("if-match", "\"sha256:abc\""),
        fresh("/new2/deep/x").header("if-match", "*"),
        fresh("/new3/deep/x").header("x-expected-index", "7"),
        app.pod(Method::POST, "cond", "/new4/deep/x?batch=true")
            .bearer_auth(&app.token)
            .header("content-type", "application/json")
            .body(r#"[{"name":"a","content":"x"}]"#)
            .header("x-expected-index", "3"),
    ];
    for (i, req) in refused.into_iter().enumerate() {
        let r = req.send().await.expect("refused");
        assert_eq!(r.status(), 412, "case {i}");
        let body: Value = r.json().await.expect("envelope");
        assert_eq!(body["error"]["details"]["head"]["index"], -1, "{body}");
        let r = app
            .pod(Method::GET, "cond", &format!("/new{}", i + 1))
            .send()
            .await
            .expect("not created");
        assert_eq!(r.status(), 404, "case {i}: the stream was created");
    }
    let r = fresh("/new5/x")
        .header("x-expected-index", "0")
        .send()
        .await
        .expect("first record");
    assert_eq!(r.status(), 201);

    // Idempotency: the retry returns the original receipt and appends nothing.
    let r = post("d")
        .header("idempotency-key", "key-1")
        .send()
        .await
        .expect("keyed");
    assert_eq!(r.status(), 201);
    let original: Value = r.json().await.expect("receipt");
    let r = post("d")
        .header("idempotency-key", "key-1")
        .send()
        .await
        .expect("retry");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replay"], "true");
    let replay: Value = r.json().await.expect("receipt");
    assert_eq!(replay, original);
    // The same key on a different request is refused (IETF idempotency-key draft: 422), be it
    // another name, other content, another content type or another author.
    let other = app.user("other-writer").await.1;
    let reuses = [
        post("e"),
        post("d").body("w"),
        post("d").header("x-content-type", "text/markdown"),
        app.pod(Method::POST, "cond", "/log/d")
            .bearer_auth(&other)
            .header("content-type", "text/plain")
            .body("v"),
    ];
    for (case, req) in reuses.into_iter().enumerate() {
        let r = req
            .header("idempotency-key", "key-1")
            .send()
            .await
            .expect("reuse");
        assert_eq!(
            error_code(r).await,
            (422, "IDEMPOTENCY_KEY_REUSED".into()),
            "case {case}"
        );
    }
    let records = app.all_records("cond", "log").await;
    assert_eq!(records.len(), 5);
    assert_valid_chain("cond", "log", &records);
    app.stop().await;
}

async fn numeric_names_and_indices(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("nums").await;
    app.append("nums", "/s/zero", "0").await;
    app.append("nums", "/s/1", "named one").await;
    app.append("nums", "/s/two", "2").await;
    // A record named "1" wins over index 1; other integers fall back to indices.
    let body = |path: &'static str| {
        let app = &app;
        async move {
            app.pod(Method::GET, "nums", path)
                .send()
                .await
                .expect("get")
                .text()
                .await
                .expect("body")
        }
    };
    assert_eq!(body("/s/1").await, "named one");
    assert_eq!(body("/s/2").await, "2");
    assert_eq!(body("/s/-3").await, "0");
    let r = app
        .pod(Method::GET, "nums", "/s/7")
        .send()
        .await
        .expect("get");
    assert_eq!(error_code(r).await, (404, "RECORD_NOT_FOUND".into()));
    app.stop().await;
}
