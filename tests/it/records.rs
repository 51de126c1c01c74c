//! SPEC §4.2–4.3 and §4.6 beyond the basics: batch appends, read options, deletes, purge and
//! chain verification.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_valid_chain, error_code};

both_backends!(
    batch_appends_are_atomic,
    read_options,
    recursive_listings_page_with_a_cursor,
    tombstones_purge_and_verify,
    delete_streams_and_pods,
    event_stream_is_chosen_by_weight_and_reads_keep_their_parameters,
);

async fn batch_appends_are_atomic(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("batch").await;
    let post = |body: String, ct: &str| {
        app.pod(Method::POST, "batch", "/log?batch=true")
            .bearer_auth(&app.token)
            .header("content-type", ct)
            .body(body)
    };
    let body = json!([
        { "name": "a", "content": "text a" },
        { "name": "b", "content": { "x": 1 } },
        { "name": "c", "contentBase64": "AAEC", "contentType": "application/octet-stream" },
        { "name": "d", "content": "h", "headers": { "X-Source": "cli" } },
    ]);
    // Custom headers must be allowed: this batch fails as a whole.
    let r = post(body.to_string(), "application/json")
        .send()
        .await
        .expect("batch");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    assert_eq!(
        app.all_records("batch", "log").await.len(),
        0,
        "nothing of a refused batch is stored"
    );

    let app = TestApp::spawn_on(
        &crate::support::fresh_database(backend).await,
        &[("WEBPODS_ALLOWED_RECORD_HEADERS", "x-source")],
    )
    .await;
    app.create_pod("batch").await;
    let r = app
        .pod(Method::POST, "batch", "/log?batch=true")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .header("idempotency-key", "b-1")
        .body(body.to_string())
        .send()
        .await
        .expect("batch");
    assert_eq!(r.status(), 201);
    let receipts: Vec<Value> = r.json().await.expect("receipts");
    let indices: Vec<i64> = receipts
        .iter()
        .map(|r| r["index"].as_i64().expect("i"))
        .collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    assert_eq!(receipts[1]["contentType"], "application/json");
    // The same key replays the whole batch.
    let r = app
        .pod(Method::POST, "batch", "/log?batch=true")
        .bearer_auth(&app.token)
        .header("idempotency-key", "b-1")
        .body(body.to_string())
        .send()
        .await
        .expect("replay");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Vec<Value>>().await.expect("receipts"), receipts);
    // NDJSON.
    let nd = "{\"name\":\"e\",\"content\":\"1\"}\n\n{\"name\":\"f\",\"content\":\"2\"}\n";
    let r = app
        .pod(Method::POST, "batch", "/log?batch=true")
        .bearer_auth(&app.token)
        .header("content-type", "application/x-ndjson")
        .body(nd)
        .send()
        .await
        .expect("ndjson");
    assert_eq!(r.status(), 201);
    let records = app.all_records("batch", "log").await;
    assert_eq!(records.len(), 6);
    assert_eq!(records[3]["headers"], json!({ "x-source": "cli" }));
    assert_valid_chain("batch", "log", &records);
    // Raw read replays the custom header.
    let r = app
        .pod(Method::GET, "batch", "/log/d")
        .send()
        .await
        .expect("raw");
    assert_eq!(r.headers()["x-source"], "cli");
    // A header sent twice is one field of both values (RFC 9110 §5.3), not the last alone.
    let r = app
        .pod(Method::POST, "batch", "/other/twice")
        .bearer_auth(&app.token)
        .header("x-record-header-x-source", "one")
        .header("x-record-header-x-source", "two")
        .body("x")
        .send()
        .await
        .expect("append");
    assert_eq!(r.status(), 201);
    let r = app
        .pod(Method::GET, "batch", "/other/twice")
        .send()
        .await
        .expect("raw");
    assert_eq!(r.headers()["x-source"], "one, two");

    // Bad batches: too many, bad item, invalid JSON content type, a bad name — all refused whole.
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({ "name": format!("n{i}"), "content": "x" }))
        .collect();
    let cases = [
        (json!(many).to_string(), "INVALID_INPUT"),
        (json!([{ "name": "x" }]).to_string(), "INVALID_INPUT"),
        (
            json!([{ "name": "x", "content": "{", "contentType": "application/json" }]).to_string(),
            "INVALID_CONTENT",
        ),
        (
            json!([{ "name": "ok", "content": "1" }, { "name": "a..b", "content": "2" }])
                .to_string(),
            "INVALID_NAME",
        ),
        ("[not json".to_string(), "INVALID_INPUT"),
    ];
    for (body, code) in cases {
        let r = app
            .pod(Method::POST, "batch", "/log?batch=true")
            .bearer_auth(&app.token)
            .body(body)
            .send()
            .await
            .expect("bad batch");
        assert_eq!(error_code(r).await.1, code);
    }
    assert_eq!(app.all_records("batch", "log").await.len(), 6);
    app.stop().await;
}

async fn read_options(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("opts").await;
    for (name, body) in [
        ("a", "a1"),
        ("b", "b1"),
        ("a", "a2"),
        ("c", "a long text body"),
    ] {
        app.append("opts", &format!("/s/{name}"), body).await;
    }
    app.append("opts", "/s/sub/x", "nested").await;
    let get = |path: &str| {
        let req = app.pod(Method::GET, "opts", path);
        async move {
            req.send()
                .await
                .expect("get")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    // unique: latest per name, in index order; a tombstoned name disappears.
    let page = get("/s?unique=true").await;
    let names: Vec<&str> = page["records"]
        .as_array()
        .expect("r")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["b", "a", "c"]);
    let r = app
        .pod(Method::DELETE, "opts", "/s/b")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let page = get("/s?unique=true").await;
    let names: Vec<&str> = page["records"]
        .as_array()
        .expect("r")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "c"]);
    // before, fields, maxContentSize.
    let page = get("/s?before=2&fields=index,name").await;
    assert_eq!(
        page["records"],
        json!([{ "index": 0, "name": "a" }, { "index": 1, "name": "b" }])
    );
    let r = app
        .pod(Method::GET, "opts", "/s?fields=index,bogus")
        .send()
        .await
        .expect("unknown field");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    // Parameters that cannot all be honoured are refused, never one of them dropped.
    for (path, code) in [
        ("/s?i=0:1&verify=true", "INVALID_INPUT"),
        ("/s?verify=true&limit=2", "INVALID_INPUT"),
        ("/s?i=0&after=1", "INVALID_INPUT"),
        ("/s?i=0:2&limit=1", "INVALID_INPUT"),
        ("/s?i=0&fields=name", "INVALID_INPUT"),
        ("/s/a?after=1", "INVALID_INPUT"),
        ("/s/a?fields=name", "INVALID_INPUT"),
        ("/s?before=-2", "INVALID_INDEX"),
    ] {
        let r = app
            .pod(Method::GET, "opts", path)
            .send()
            .await
            .expect("conflict");
        assert_eq!(error_code(r).await, (400, code.into()), "{path}");
    }
    let page = get("/s?i=0:2&fields=name").await;
    assert_eq!(page["records"], json!([{ "name": "a" }, { "name": "b" }]));
    // A missing top-level name: a record of the root stream, unless the query asks for a
    // stream.
    for (path, code) in [
        ("/nosuch", "RECORD_NOT_FOUND"),
        ("/nosuch?i=0", "STREAM_NOT_FOUND"),
        ("/nosuch?verify=true", "STREAM_NOT_FOUND"),
        ("/nosuch?after=-5", "STREAM_NOT_FOUND"),
    ] {
        let r = app
            .pod(Method::GET, "opts", path)
            .send()
            .await
            .expect("missing");
        assert_eq!(error_code(r).await, (404, code.into()), "{path}");
    }
    let page = get("/s?after=2&limit=1&maxContentSize=6").await;
    assert_eq!(page["records"][0]["content"], "a long");
    assert_eq!(page["records"][0]["truncated"], true);
    // recursive: this stream then its descendants, by path then index.
    let page = get("/s?recursive=true").await;
    let paths: Vec<&str> = page["records"]
        .as_array()
        .expect("r")
        .iter()
        .filter_map(|r| r["path"].as_str())
        .collect();
    assert_eq!(paths, ["s/a", "s/b", "s/a", "s/c", "s/b", "s/sub/x"]);
    assert_eq!(page["total"], 6);
    assert_eq!(page["hasMore"], false);
    // A page of it tells how many there are in all, and that more follow.
    let page = get("/s?recursive=true&limit=2").await;
    assert_eq!(page["records"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["total"], 6);
    assert_eq!(page["hasMore"], true);
    // Index cursors mean nothing across streams: refused, not silently ignored.
    for q in ["after=1", "after=-2", "before=1", "unique=true"] {
        let r = app
            .pod(Method::GET, "opts", &format!("/s?recursive=true&{q}"))
            .send()
            .await
            .expect("recursive with a cursor");
        assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()), "{q}");
    }
    // Stream listing with counts and hashes.
    let listing = get("/.config/api/streams?includeRecordCounts=true&includeHashes=true").await;
    assert_eq!(listing["pod"], "opts");
    let streams = listing["streams"].as_array().expect("streams");
    let s = streams.iter().find(|s| s["path"] == "s").expect("s listed");
    assert_eq!(s["recordCount"], 5);
    assert_eq!(s["hasChildren"], true);
    assert_eq!(s["depth"], 1);
    assert!(
        streams
            .iter()
            .all(|s| !s["path"].as_str().unwrap_or("").starts_with(".config")),
        "anonymous sees no .config"
    );
    // HEAD answers as GET does, without the body.
    let head = app
        .pod(Method::HEAD, "opts", "/.config/api/streams")
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "application/json");
    let listing = get("/.config/api/streams?path=s&recursive=false").await;
    assert_eq!(listing["streams"].as_array().map(Vec::len), Some(1));
    assert_eq!(listing["streams"][0]["path"], "s/sub");
    app.stop().await;
}

/// `recursive=true` pages through a whole subtree by `nextCursor` (`path:index` of the last
/// record): every readable record exactly once, by stream path (bytewise) then index, empty
/// and unreadable streams skipped; the last page's `nextCursor` is null.
async fn recursive_listings_page_with_a_cursor(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("tree").await;
    let r = app
        .pod(Method::POST, "tree", "/t/a")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("empty stream");
    assert_eq!(r.status(), 201);
    for (stream, n) in [("t", 3), ("t/a/c", 4), ("t/b", 1), ("t/a-b", 2)] {
        for i in 0..n {
            app.append("tree", &format!("/{stream}/n{i}"), "x").await;
        }
    }
    let r = app
        .pod(Method::POST, "tree", "/t/hidden/n0?access=private")
        .bearer_auth(&app.token)
        .body("secret")
        .send()
        .await
        .expect("private");
    assert_eq!(r.status(), 201);
    let mut expected = Vec::new();
    for (stream, n) in [("t", 3), ("t/a-b", 2), ("t/a/c", 4), ("t/b", 1)] {
        for i in 0..n {
            expected.push(format!("{stream}/n{i}@{i}"));
        }
    }
    let get = |query: String| {
        let req = app.pod(Method::GET, "tree", &format!("/t?recursive=true&{query}"));
        async move { req.send().await.expect("get") }
    };
    let seen = |page: &Value| -> Vec<String> {
        page["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| format!("{}@{}", r["path"].as_str().unwrap_or("?"), r["index"]))
            .collect()
    };
    // Anonymous: one page of everything it may read.
    let all: Value = get("limit=1000".into()).await.json().await.expect("json");
    assert_eq!(seen(&all), expected);
    assert_eq!(
        (&all["hasMore"], &all["nextCursor"]),
        (&json!(false), &Value::Null)
    );
    assert_eq!(all["total"], 10);
    // Pages of 3, following nextCursor.
    let (mut paged, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=3&cursor={c}"),
            None => "limit=3".into(),
        };
        let page: Value = get(query).await.json().await.expect("json");
        paged.extend(seen(&page));
        assert_eq!(page["nextIndex"], Value::Null);
        match page["nextCursor"].as_str() {
            Some(next) => {
                assert_eq!(page["hasMore"], true, "{page}");
                cursor = Some(next.to_string());
            }
            None => {
                assert_eq!(page["hasMore"], false, "{page}");
                break;
            }
        }
        assert!(
            paged.len() <= expected.len(),
            "paging does not end: {paged:?}"
        );
    }
    assert_eq!(paged, expected);
    assert_eq!(
        cursor.as_deref(),
        Some("t/a/c:3"),
        "the cursor names path and index"
    );
    // A cursor past every stream: an empty last page. Bad cursors and misplaced ones: 400.
    let page: Value = get("cursor=t/z:0".into()).await.json().await.expect("json");
    assert_eq!(seen(&page), Vec::<String>::new());
    assert_eq!(page["hasMore"], false);
    for bad in [
        "cursor=t",
        "cursor=t:x",
        "cursor=t:-1",
        "cursor=a..b:1",
        "cursor=t:1&after=2",
    ] {
        let r = get(bad.into()).await;
        assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()), "{bad}");
    }
    let r = app
        .pod(Method::GET, "tree", "/t?cursor=t:0")
        .send()
        .await
        .expect("get");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    app.stop().await;
}

async fn tombstones_purge_and_verify(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("del").await;
    app.append("del", "/d/secret", "v1").await;
    app.append("del", "/d/other", "keep").await;
    app.append("del", "/d/secret", "v2").await;
    let del = |path: &str| app.pod(Method::DELETE, "del", path).bearer_auth(&app.token);
    let r = del("/d/nothing").send().await.expect("unknown");
    assert_eq!(error_code(r).await, (404, "RECORD_NOT_FOUND".into()));
    let (_, bob) = app.user("bob").await;
    let r = app
        .pod(Method::DELETE, "del", "/d/other")
        .bearer_auth(&bob)
        .send()
        .await
        .expect("bob");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));

    let r = del("/d/secret").send().await.expect("tombstone");
    assert_eq!(r.status(), 204);
    let r = del("/d/secret").send().await.expect("again");
    assert_eq!(r.status(), 204, "deleting is idempotent");
    let r = app
        .pod(Method::GET, "del", "/d/secret")
        .send()
        .await
        .expect("read deleted");
    assert_eq!(error_code(r).await, (404, "RECORD_DELETED".into()));
    let r = app
        .pod(Method::GET, "del", "/d?i=0")
        .send()
        .await
        .expect("old version");
    assert_eq!(r.status(), 200, "a tombstone keeps history readable");
    assert!(r.headers().get("x-deleted").is_none());
    // The tombstone itself, read by index: empty, and marked as deleted.
    let r = app
        .pod(Method::GET, "del", "/d?i=-1")
        .send()
        .await
        .expect("tombstone by index");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-deleted"], "true");
    assert_eq!(r.text().await.expect("body"), "");

    let r = del("/d/secret?purge=true").send().await.expect("purge");
    assert_eq!(r.status(), 204);
    let r = app
        .pod(Method::GET, "del", "/d?i=0")
        .send()
        .await
        .expect("purged");
    assert_eq!(error_code(r).await, (410, "RECORD_PURGED".into()));
    let r = app
        .pod(Method::GET, "del", "/d?i=2")
        .send()
        .await
        .expect("purged");
    assert_eq!(error_code(r).await, (410, "RECORD_PURGED".into()));
    let r = app
        .pod(Method::GET, "del", "/d/other")
        .send()
        .await
        .expect("untouched");
    assert_eq!(r.text().await.expect("body"), "keep");
    // Purging again has nothing left to erase: it appends nothing (length stays 5 below).
    let r = del("/d/secret?purge=true")
        .send()
        .await
        .expect("purge again");
    assert_eq!(r.status(), 204);

    let v: Value = app
        .pod(Method::GET, "del", "/d?verify=true")
        .send()
        .await
        .expect("verify")
        .json()
        .await
        .expect("json");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["length"], 5);
    assert_eq!(v["headIndex"], 4);
    let records = app.all_records("del", "d").await;
    assert_eq!(records[0]["purged"], true);
    assert_eq!(records[0]["content"], Value::Null);
    assert_eq!(records[3]["deleted"], true);
    app.stop().await;
}

async fn delete_streams_and_pods(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("gone").await;
    app.append("gone", "/a/b/c/r", "1").await;
    app.append("gone", "/a/r", "1").await;
    app.append("gone", "/keep/r", "1").await;
    let r = app
        .pod(Method::DELETE, "gone", "/.config/owner")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("config");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = app
        .pod(Method::DELETE, "gone", "/a")
        .send()
        .await
        .expect("anonymous");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    let r = app
        .pod(Method::DELETE, "gone", "/a")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("delete stream");
    assert_eq!(r.status(), 204);
    for path in ["/a/r", "/a/b/c/r"] {
        let r = app
            .pod(Method::GET, "gone", path)
            .send()
            .await
            .expect("get");
        assert_eq!(
            error_code(r).await,
            (404, "STREAM_NOT_FOUND".into()),
            "{path}"
        );
    }
    assert_eq!(app.all_records("gone", "keep").await.len(), 1);
    // The path can be used again, from a fresh chain.
    let r = app.append("gone", "/a/r", "again").await;
    assert_eq!(r["index"], 0);

    let r = app
        .pod(Method::DELETE, "gone", "/")
        .bearer_auth(&app.token)
        .send()
        .await
        .expect("delete pod");
    assert_eq!(r.status(), 204);
    let r = app
        .pod(Method::GET, "gone", "/keep/r")
        .send()
        .await
        .expect("get");
    assert_eq!(error_code(r).await, (404, "POD_NOT_FOUND".into()));
    app.create_pod("gone").await;
    app.stop().await;
}

/// `?verify=true` notices content and links changed behind the server's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_tampering() {
    let url = crate::support::fresh_database(Backend::Postgres).await;
    let app = TestApp::spawn_on(&url, &[]).await;
    app.create_pod("tamper").await;
    for i in 0..5 {
        app.append("tamper", "/t/r", &format!("v{i}")).await;
    }
    let verify = || async {
        app.pod(Method::GET, "tamper", "/t?verify=true")
            .send()
            .await
            .expect("verify")
            .json::<Value>()
            .await
            .expect("json")
    };
    assert_eq!(verify().await["valid"], true);
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("db");
    sqlx::query("UPDATE records SET content = 'forged'::bytea WHERE idx = 2 AND name = 'r'")
        .execute(&mut db)
        .await
        .expect("tamper content");
    let v = verify().await;
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(v["firstInvalidIndex"], 2);
    assert_eq!(v["reason"], "contentHash does not match the content");
    sqlx::query("UPDATE records SET content = 'v2'::bytea, author = 'someone-else' WHERE idx = 2 AND name = 'r'")
        .execute(&mut db)
        .await
        .expect("tamper author");
    let v = verify().await;
    assert_eq!(v["firstInvalidIndex"], 2);
    assert_eq!(v["reason"], "hash does not match the record");
    app.stop().await;
}

/// `Accept` is negotiated by weight: a browser-like header that merely lists
/// `text/event-stream` at a low `q` gets the record, not a tail; read-only parameters
/// (`verify`, `i`, `unique`…) are answered as reads even with an SSE `Accept`.
async fn event_stream_is_chosen_by_weight_and_reads_keep_their_parameters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("neg").await;
    app.append("neg", "/rd/a", "a1").await;
    app.append("neg", "/rd/b", "b1").await;
    let get = |path: &str, accept: &str| {
        app.pod(Method::GET, "neg", path)
            .header("accept", accept)
            .send()
    };
    let r = get(
        "/rd/a",
        "text/html,application/xhtml+xml,text/event-stream;q=0.1",
    )
    .await
    .expect("record");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "a1");
    let r = get("/rd?verify=true", "text/event-stream")
        .await
        .expect("verify");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("verification, not a tail");
    assert_eq!((&v["valid"], &v["length"]), (&json!(true), &json!(2)));
    let r = get("/rd?i=1", "text/event-stream").await.expect("by index");
    assert_eq!(r.text().await.expect("body"), "b1");
    let r = get("/?recursive=true", "text/event-stream")
        .await
        .expect("recursive list");
    let v: Value = r.json().await.expect("a recursive list, not a tail");
    assert_eq!(v["records"].as_array().map(Vec::len), Some(2), "{v}");
    let r = get("/rd/a", "application/json, text/event-stream")
        .await
        .expect("a tie");
    assert_eq!(r.text().await.expect("body"), "a1");
    // A record path is no stream to tail: SSE asked of it reads the record.
    let r = get("/rd/a", "text/event-stream, */*;q=0.1")
        .await
        .expect("record with SSE preferred");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "a1");
    let r = get("/rd/none", "text/event-stream").await.expect("nothing");
    assert_eq!(error_code(r).await, (404, "RECORD_NOT_FOUND".into()));
    // A tail when SSE weighs most.
    let r = get("/rd", "text/event-stream, */*;q=0.5")
        .await
        .expect("tail");
    assert_eq!(
        r.headers()["content-type"].to_str().expect("type"),
        "text/event-stream"
    );
}
