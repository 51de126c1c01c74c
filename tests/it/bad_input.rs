//! Every bad input gets the spec's status and error code — never a 500, a hang or a panic.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header, encode};
use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::support::{Backend, SECRET, TestApp, error_code, fresh_database, json_of};

both_backends!(
    bad_tokens_are_refused,
    bad_names_and_paths,
    limits_and_conflicts,
    concurrent_creations_of_one_stream_have_one_winner,
    json_content_must_be_utf8,
    json_content_reads_back_exactly_on_every_path,
    delete_with_a_trailing_slash_names_no_record,
    batch_record_headers_must_be_replayable,
    odd_requests_get_the_envelope,
    wrong_methods_get_the_envelope_and_allow,
    one_precondition_at_a_time,
    endpoint_streams_have_no_children,
    nul_characters_and_long_paths_are_bad_input
);

fn sign(claims: serde_json::Value, secret: &str) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

async fn bad_tokens_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("tok").await;
    let (uid, _) = app.user("local").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let write = |token: &str| {
        app.pod(Method::POST, "tok", "/s/x")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "text/plain")
            .body("x")
    };
    let cases = [
        ("no token", None, 401, "UNAUTHORIZED"),
        (
            "garbage",
            Some("abc.def.ghi".to_string()),
            401,
            "INVALID_TOKEN",
        ),
        (
            "forged",
            Some(sign(
                json!({"sub": uid, "iat": now, "type": "webpods"}),
                "some-other-secret-xxxxxxxxxxxxxxx",
            )),
            401,
            "INVALID_TOKEN",
        ),
        (
            "expired",
            Some(sign(
                json!({"sub": uid, "iat": now - 7200, "exp": now - 3600, "type": "webpods"}),
                SECRET,
            )),
            401,
            "TOKEN_EXPIRED",
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD
                    .encode(json!({"sub": uid, "iat": now, "type": "webpods"}).to_string())
            )),
            401,
            "INVALID_TOKEN",
        ),
        (
            "wrong type",
            Some(sign(
                json!({"sub": uid, "iat": now, "type": "refresh"}),
                SECRET,
            )),
            401,
            "INVALID_TOKEN_TYPE",
        ),
        (
            "other pod",
            Some(sign(
                json!({"sub": uid, "iat": now, "type": "webpods", "pods": ["elsewhere"]}),
                SECRET,
            )),
            403,
            "POD_FORBIDDEN",
        ),
        (
            "read only",
            Some(sign(
                json!({"sub": uid, "iat": now, "type": "webpods", "scope": "read"}),
                SECRET,
            )),
            403,
            "FORBIDDEN",
        ),
    ];
    for (what, token, status, code) in cases {
        let req = match &token {
            Some(t) => write(t),
            None => app
                .pod(Method::POST, "tok", "/s/x")
                .header("content-type", "text/plain")
                .body("x"),
        };
        let r = req.send().await.expect("send");
        assert_eq!(error_code(r).await, (status, code.to_string()), "{what}");
    }
    // Not yet valid (`nbf` in the future): refused.
    let early = sign(
        json!({"sub": uid, "iat": now, "nbf": now + 3600, "type": "webpods"}),
        SECRET,
    );
    let r = write(&early).send().await.expect("send");
    assert_eq!(error_code(r).await, (401, "INVALID_TOKEN".into()));
    // Not ASCII: a token, and an invalid one.
    let r = app
        .pod(Method::POST, "tok", "/s/x")
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes("Bearer ñ€".as_bytes()).expect("bytes"),
        )
        .body("x")
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (401, "INVALID_TOKEN".into()));
    // HS384 with the right secret is an algorithm switch: refused.
    let hs384 = encode(
        &Header::new(jsonwebtoken::Algorithm::HS384),
        &json!({"sub": uid, "iat": now, "type": "webpods"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let r = write(&hs384).send().await.expect("send");
    assert_eq!(error_code(r).await, (401, "INVALID_TOKEN".into()));
    // A valid token in the other accepted places.
    let good = sign(json!({"sub": uid, "iat": now, "type": "webpods"}), SECRET);
    let r = app
        .pod(Method::POST, "tok", "/s/y")
        .header("authorization", good.as_str())
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .expect("raw authorization");
    assert_eq!(r.status(), 201);
    let r = app
        .pod(Method::POST, "tok", "/s/z")
        .header("cookie", format!("token={good}"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .expect("cookie");
    assert_eq!(r.status(), 201);
    app.stop().await;
}

async fn bad_names_and_paths(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("names").await;
    let create = |name: serde_json::Value| {
        app.main(Method::POST, "/api/pods")
            .bearer_auth(&app.token)
            .json(&json!({ "name": name }))
    };
    for bad in [
        json!("A"),
        json!("-x"),
        json!("x_y"),
        json!("a".repeat(64)),
        json!(42),
    ] {
        let r = create(bad.clone()).send().await.expect("send");
        assert_eq!(
            error_code(r).await,
            (400, "INVALID_INPUT".into()),
            "pod name {bad}"
        );
    }
    let r = app
        .main(Method::POST, "/api/pods")
        .bearer_auth(&app.token)
        .body("not json")
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = create(json!("names")).send().await.expect("send");
    assert_eq!(error_code(r).await, (409, "POD_EXISTS".into()));

    let post = |pod: &str, path: &str| {
        app.pod(Method::POST, pod, path)
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .body("x")
    };
    let cases = [
        ("names", "/s/a..b", 400, "INVALID_NAME"),
        ("names", "/s/.hidden", 400, "INVALID_NAME"),
        ("names", "/s/", 400, "MISSING_NAME"),
        ("names", "/a//b/c", 400, "INVALID_PATH"),
        ("names", "//v/a", 400, "INVALID_PATH"),
        // Not the root stream's record `x`: the first segment is empty.
        ("names", "//x", 400, "INVALID_PATH"),
        ("names", "/a%20b/c", 400, "INVALID_PATH"),
        ("names", "/s/bad%20name", 400, "INVALID_NAME"),
        ("names", "/a%2Fb/c", 400, "INVALID_PATH"),
        ("names", "/s/%FF", 400, "INVALID_PATH"),
        ("names", "/x/.config/c", 400, "INVALID_PATH"),
        ("nopod", "/s/x", 404, "POD_NOT_FOUND"),
    ];
    for (pod, path, status, code) in cases {
        let r = post(pod, path).send().await.expect("send");
        assert_eq!(
            error_code(r).await,
            (status, code.to_string()),
            "{pod} {path}"
        );
    }
    // An escaped unreserved character is that character (RFC 3986 §6.2.2.2).
    let r = post("names", "/s/%41bc").send().await.expect("send");
    assert_eq!(r.status(), 201);
    let receipt: serde_json::Value = r.json().await.expect("receipt");
    assert_eq!(receipt["name"], "Abc");
    let r = app
        .pod(Method::POST, "names", "/s/j")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body("{\"a\":")
        .send()
        .await
        .expect("bad json");
    assert_eq!(error_code(r).await, (400, "INVALID_CONTENT".into()));
    let r = app
        .pod(Method::POST, "names", "/s/ct")
        .bearer_auth(&app.token)
        .header("content-type", "not a type")
        .body("x")
        .send()
        .await
        .expect("bad content type");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = app
        .pod(Method::GET, "names", "/missing/x")
        .send()
        .await
        .expect("missing stream");
    assert_eq!(error_code(r).await, (404, "STREAM_NOT_FOUND".into()));
    let r = app
        .pod(Method::GET, "names", "/?i=abc")
        .send()
        .await
        .expect("bad index");
    assert_eq!(error_code(r).await, (400, "INVALID_INDEX".into()));
    let r = app
        .pod(Method::GET, "names", "/?i=3:1")
        .send()
        .await
        .expect("bad range");
    assert_eq!(error_code(r).await, (400, "INVALID_INDEX".into()));
    let r = app
        .main(Method::GET, "/no/such/route")
        .send()
        .await
        .expect("unknown route");
    assert_eq!(error_code(r).await, (404, "NOT_FOUND".into()));
    let r = app
        .http
        .get(format!("http://{}/s", app.addr))
        .header("host", "a.b.elsewhere.example")
        .send()
        .await
        .expect("unknown host");
    assert_eq!(r.status(), 404);
    app.stop().await;
}

async fn limits_and_conflicts(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_MAX_RECORD_BYTES", "1024")]).await;
    app.create_pod("lim").await;
    let post = |path: &str, body: Vec<u8>| {
        app.pod(Method::POST, "lim", path)
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .body(body)
    };
    let r = post("/s/big", vec![b'x'; 1025]).send().await.expect("big");
    assert_eq!(error_code(r).await, (413, "CONTENT_TOO_LARGE".into()));
    let r = post("/s/fits", vec![b'x'; 1024])
        .send()
        .await
        .expect("fits");
    assert_eq!(r.status(), 201);
    // Without Content-Length (chunked), the limit still holds.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..3).map(|_| Ok(vec![b'y'; 600])).collect();
    let r = app
        .pod(Method::POST, "lim", "/s/chunked")
        .bearer_auth(&app.token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("chunked");
    assert_eq!(error_code(r).await, (413, "CONTENT_TOO_LARGE".into()));

    // Record names and child stream names may not collide, either way round.
    let r = post("/s/sub/x", b"x".to_vec())
        .send()
        .await
        .expect("child stream");
    assert_eq!(r.status(), 201);
    let r = post("/s/sub", b"x".to_vec())
        .send()
        .await
        .expect("record named like a stream");
    assert_eq!(error_code(r).await, (409, "NAME_CONFLICT".into()));
    let r = post("/s/fits/deeper", b"x".to_vec())
        .send()
        .await
        .expect("stream named like a record");
    assert_eq!(error_code(r).await, (409, "NAME_CONFLICT".into()));
    // Explicit creation: 201, then 409; bad access values are refused.
    let create = |path: &str| app.pod(Method::POST, "lim", path).bearer_auth(&app.token);
    let r = create("/made").send().await.expect("create");
    assert_eq!(r.status(), 201);
    let r = create("/made").send().await.expect("create again");
    assert_eq!(error_code(r).await, (409, "STREAM_EXISTS".into()));
    // `{}` in any spacing is a creation too, not a record named like the stream.
    for (i, body) in ["{}", "{ }", " {\n\t} "].into_iter().enumerate() {
        let r = create(&format!("/spaced{i}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("create with {}");
        assert_eq!(r.status(), 201, "{body:?}");
        let info: serde_json::Value = r.json().await.expect("stream info");
        assert_eq!(info["path"], format!("spaced{i}"), "{info}");
    }
    // Whitespace alone is content: a record, stored exactly, not a creation that drops it.
    for (i, body) in [" ", "\n", "\t \r\n"].into_iter().enumerate() {
        let r = create(&format!("/blank/b{i}"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("whitespace record");
        assert_eq!(r.status(), 201, "{body:?}");
        let receipt: serde_json::Value = r.json().await.expect("receipt");
        assert_eq!(receipt["index"], i, "{receipt}");
        let stored = app
            .pod(Method::GET, "lim", &format!("/blank/b{i}"))
            .send()
            .await
            .expect("read back");
        assert_eq!(
            stored.bytes().await.expect("bytes").as_ref(),
            body.as_bytes()
        );
    }
    // Also on a write to an existing stream, where `access` would not apply.
    let r = post("/s/again?access=everyone", b"x".to_vec())
        .send()
        .await
        .expect("bad access on an existing stream");
    assert_eq!(r.status(), 400);
    // Another access than the existing stream's is refused, not ignored: the record would be
    // public though its writer asked for private.
    let r = post("/s/again?access=private", b"x".to_vec())
        .send()
        .await
        .expect("other access on an existing stream");
    assert_eq!(error_code(r).await, (409, "STREAM_EXISTS".into()));
    let r = post("/s/again?access=public", b"x".to_vec())
        .send()
        .await
        .expect("the same access");
    assert_eq!(r.status(), 201);
    // An empty Content-Type gives no type: text/plain.
    let r = app
        .pod(Method::POST, "lim", "/s/untyped")
        .bearer_auth(&app.token)
        .header("content-type", "")
        .body("x")
        .send()
        .await
        .expect("empty content type");
    assert_eq!(r.status(), 201);
    let receipt: serde_json::Value = r.json().await.expect("receipt");
    assert_eq!(receipt["contentType"], "text/plain");
    let r = create("/other?access=everyone")
        .send()
        .await
        .expect("bad access");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = post("/s/k", b"x".to_vec())
        .header("idempotency-key", "k".repeat(129))
        .send()
        .await
        .expect("long key");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = post("/s/h", b"x".to_vec())
        .header("x-record-header-x-source", "cli")
        .send()
        .await
        .expect("header");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    app.stop().await;
}

/// 16 clients create the same stream at once, half asking for `private` and half for `public`:
/// exactly one is told 201, every other one 409 `STREAM_EXISTS`, and the stream has the access
/// the winner asked for (a loser must never be told its stream is private when it is not).
async fn concurrent_creations_of_one_stream_have_one_winner(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("race").await;
    for round in 0..5 {
        let path = format!("/made-{round}");
        let tries = (0..16).map(|i| {
            let access = if i % 2 == 0 { "private" } else { "public" };
            let req = app
                .pod(Method::POST, "race", &format!("{path}?access={access}"))
                .bearer_auth(&app.token);
            async move { (access, req.send().await.expect("create")) }
        });
        let mut won = Vec::new();
        for (access, r) in futures::future::join_all(tries).await {
            match r.status().as_u16() {
                201 => won.push(access),
                _ => assert_eq!(error_code(r).await, (409, "STREAM_EXISTS".to_string())),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        let streams = app.streams("race").await;
        let stream = streams
            .iter()
            .find(|s| s["path"] == path.trim_start_matches('/'))
            .unwrap_or_else(|| panic!("{path} in {streams:?}"));
        assert_eq!(stream["accessPermission"], won[0], "{stream}");
    }
}

/// JSON text is UTF-8: bytes that are not are `INVALID_CONTENT`, single or in a batch. So is
/// JSON that strict parsers reject, which would make every listing page holding it unreadable
/// to them: nesting deeper than 100 levels, or an unpaired surrogate escape.
async fn json_content_must_be_utf8(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("utf").await;
    let deep = format!("{}{}", "[".repeat(101), "]".repeat(101)).into_bytes();
    for body in [
        &b"\"\xff\xfe\""[..],
        b"{\"k\": \"\xc3\"}",
        b"\xef\xbb\xbf{}",
        &deep,
        br#""\udc00""#,
        br#"{"k":["\ud83d"]}"#,
    ] {
        let r = app
            .pod(Method::POST, "utf", "/s/bad")
            .bearer_auth(&app.token)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("post");
        assert_eq!(
            error_code(r).await,
            (400, "INVALID_CONTENT".to_string()),
            "{body:?}"
        );
    }
    let r = app
        .pod(Method::POST, "utf", "/s/good")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body("\"h\u{e9}llo\"")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    let listing = json_of(app.pod(Method::GET, "utf", "/s")).await;
    assert_eq!(listing["records"][0]["content"], "h\u{e9}llo");
    assert_eq!(listing["records"].as_array().map(Vec::len), Some(1));
}

/// JSON content is stored byte-exact, and every read path gives it back so: list and range
/// alike, with numbers beyond `f64`, duplicate keys and the deepest nesting accepted (the
/// range read re-parsed content, then rounded it, or panicked on such records).
async fn json_content_reads_back_exactly_on_every_path(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("exact").await;
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let bodies = [
        "1e400".to_string(),
        r#"{"id":18446744073709551616,"p":0.1000000000000000055511151231257827,"a":1,"a":2}"#
            .to_string(),
        deep,
    ];
    for (i, body) in bodies.iter().enumerate() {
        let r = app
            .pod(Method::POST, "exact", &format!("/s/r{i}"))
            .bearer_auth(&app.token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 201, "{body}");
    }
    for path in ["/s", "/s?i=0:3", "/s?i=-3:3", "/s?unique=true"] {
        let r = app
            .pod(Method::GET, "exact", path)
            .send()
            .await
            .expect("read");
        assert_eq!(r.status(), 200, "{path}");
        let text = r.text().await.expect("body");
        for body in &bodies {
            assert!(
                text.contains(&format!("\"content\":{body}")),
                "{path}: {body} not found verbatim in {text}"
            );
        }
    }
    // A batch item's `content` given as a JSON value is stored as that value's text, not
    // re-serialized (which rounded the big integer and rewrote 1E2 as 100.0).
    let value = r#"{"n":123456789012345678901234567890, "e":1E2}"#;
    let r = app
        .pod(Method::POST, "exact", "/b?batch=true")
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body(format!(
            r#"[{{"name":"o","content":{value}}},{{"name":"t","content":"a\u00e9"}}]"#
        ))
        .send()
        .await
        .expect("batch");
    assert_eq!(r.status(), 201);
    for (name, stored, content_type) in [
        ("o", value, "application/json"),
        ("t", "a\u{e9}", "text/plain"),
    ] {
        let r = app
            .pod(Method::GET, "exact", &format!("/b/{name}"))
            .send()
            .await
            .expect("read");
        assert_eq!(r.headers()["content-type"], content_type);
        assert_eq!(r.text().await.expect("body"), stored, "{name}");
    }
}

/// `DELETE /stream/` (an empty record name) is a missing name, not the stream: it once fell
/// back to deleting the whole stream.
async fn delete_with_a_trailing_slash_names_no_record(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("del").await;
    let r = app
        .pod(Method::POST, "del", "/keep/me")
        .bearer_auth(&app.token)
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    for path in ["/keep/", "/keep//", "/keep/%2F"] {
        let r = app
            .pod(Method::DELETE, "del", path)
            .bearer_auth(&app.token)
            .send()
            .await
            .expect("delete");
        let (status, code) = error_code(r).await;
        assert_eq!(status, 400, "{path}");
        assert!(
            code == "MISSING_NAME" || code == "INVALID_PATH",
            "{path}: {code}"
        );
    }
    let r = app
        .pod(Method::GET, "del", "/keep/me")
        .send()
        .await
        .expect("read");
    assert_eq!(r.status(), 200, "the stream and its record are still there");
}

/// A record header is replayed as an HTTP header on raw reads, so a batch may not store one
/// that no HTTP header can carry (a single POST cannot send one): CR, LF, NUL and other
/// control characters are refused; tabs and non-ASCII text are kept and replayed.
async fn batch_record_headers_must_be_replayable(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_ALLOWED_RECORD_HEADERS", "x-source")]).await;
    app.create_pod("hdr").await;
    let batch = |value: &str| {
        app.pod(Method::POST, "hdr", "/s?batch=true")
            .bearer_auth(&app.token)
            .header("content-type", "application/json")
            .body(
                json!([{ "name": "n", "content": "x", "headers": { "x-source": value } }])
                    .to_string(),
            )
    };
    for bad in ["a\r\nSet-Cookie: e=1", "nul\0", "bell\u{7}", "del\u{7f}"] {
        let r = batch(bad).send().await.expect("batch");
        assert_eq!(
            error_code(r).await,
            (400, "INVALID_INPUT".into()),
            "{bad:?}"
        );
    }
    let r = batch("caf\u{e9}\tok").send().await.expect("batch");
    assert_eq!(r.status(), 201);
    let r = app
        .pod(Method::GET, "hdr", "/s/n")
        .send()
        .await
        .expect("raw read");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-source"].as_bytes(),
        "caf\u{e9}\tok".as_bytes()
    );
}

/// Requests outside the usual shapes still get the spec's envelope (SPEC §4.7): WebSocket
/// endpoints called without a valid upgrade, repeated query parameters on `/auth/*`, a Host
/// that is not text (it was served as the main domain), a negative index past the start.
async fn odd_requests_get_the_envelope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("odd").await;
    app.append("odd", "/s/one", "1").await;
    let cases = [
        app.main(Method::GET, "/ws"),
        app.main(Method::GET, "/graphql/ws"),
        app.main(Method::GET, "/graphql/ws")
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", "chat"),
        app.pod(Method::GET, "odd", "/s")
            .header("upgrade", "websocket")
            .header("connection", "upgrade"),
        app.main(Method::GET, "/auth/authorize?pod=a&pod=b"),
        app.main(Method::GET, "/login?redirect=a&redirect=b"),
        // Path segments that are not UTF-8 once decoded.
        app.main(Method::GET, "/auth/%ff%fe"),
        app.main(Method::DELETE, "/auth/sessions/%ff"),
        app.http.get(format!("http://{}/health", app.addr)).header(
            "host",
            reqwest::header::HeaderValue::from_bytes(b"\xe4lice.localhost").expect("bytes"),
        ),
    ];
    for (i, req) in cases.into_iter().enumerate() {
        let r = req.send().await.expect("send");
        assert_eq!(
            error_code(r).await,
            (400, "INVALID_INPUT".into()),
            "case {i}"
        );
    }
    let r = app
        .pod(Method::GET, "odd", "/s?i=-5")
        .send()
        .await
        .expect("read");
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "RECORD_NOT_FOUND");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("-5")),
        "{body}"
    );
}

/// A known path called with a method it does not take: 405 in the error envelope, with `Allow`,
/// on the main domain and on pod hosts alike.
async fn wrong_methods_get_the_envelope_and_allow(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("meth").await;
    let cases = [
        app.main(Method::POST, "/health"),
        app.main(Method::DELETE, "/health"),
        app.main(Method::PUT, "/api/pods").bearer_auth(&app.token),
        app.pod(Method::PUT, "meth", "/s/x").bearer_auth(&app.token),
        app.pod(Method::PATCH, "meth", "/s").bearer_auth(&app.token),
    ];
    for req in cases {
        let r = req.send().await.expect("send");
        let what = format!("{} {}", r.url(), r.status());
        let allow = r
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(allow.contains("GET"), "{what}: Allow {allow:?}");
        assert_eq!(
            error_code(r).await,
            (405, "METHOD_NOT_ALLOWED".to_string()),
            "{what}"
        );
    }
}

/// Two preconditions on one write would each be a condition; honouring one and ignoring the
/// other is refused instead, as GraphQL refuses `expectedHash` with `expectedIndex`.
async fn one_precondition_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("pre").await;
    let head = app.append("pre", "/s/a", "a").await;
    let hash = head["hash"].as_str().expect("hash").to_string();
    let pairs = [
        (
            "if-match",
            format!("\"{hash}\""),
            "x-expected-index",
            "0".to_string(),
        ),
        (
            "if-match",
            format!("\"{hash}\""),
            "if-none-match",
            "*".to_string(),
        ),
        (
            "x-expected-index",
            "1".to_string(),
            "if-none-match",
            "*".to_string(),
        ),
    ];
    for (h1, v1, h2, v2) in pairs {
        let r = app
            .pod(Method::POST, "pre", "/s/b")
            .bearer_auth(&app.token)
            .header("content-type", "text/plain")
            .header(h1, &v1)
            .header(h2, &v2)
            .body("b")
            .send()
            .await
            .expect("post");
        assert_eq!(
            error_code(r).await,
            (400, "INVALID_INPUT".to_string()),
            "{h1} with {h2}"
        );
    }
    assert_eq!(
        app.all_records("pre", "s").await.len(),
        1,
        "nothing written"
    );
}

/// `.config/owner`, `.config/routing` and `.config/domains` are written only through their
/// endpoints: no records in them, no streams below them, even for the owner.
async fn endpoint_streams_have_no_children(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("ends").await;
    for base in [".config/owner", ".config/routing", ".config/domains"] {
        let cases = [
            (format!("/{base}/x"), "text/plain", "x"),
            (format!("/{base}/sub/x"), "text/plain", "x"),
            (format!("/{base}/sub"), "", ""),
        ];
        for (path, ct, body) in cases {
            let mut req = app.pod(Method::POST, "ends", &path).bearer_auth(&app.token);
            if !ct.is_empty() {
                req = req.header("content-type", ct);
            }
            let r = req.body(body.to_string()).send().await.expect("post");
            assert_eq!(
                error_code(r).await,
                (403, "FORBIDDEN".to_string()),
                "{path}"
            );
        }
    }
    let streams = app.streams("ends").await;
    let paths: Vec<&str> = streams.iter().filter_map(|s| s["path"].as_str()).collect();
    assert!(
        paths.iter().all(|p| !p.contains("/sub")),
        "no stream below an endpoint stream: {paths:?}"
    );
}

/// A NUL character cannot be stored in PostgreSQL's text: each place one can arrive is a bad
/// request (on PostgreSQL these were 500s, and an idempotency key with a NUL failed the whole
/// group commit, other callers' appends with it). A path too long for PostgreSQL's unique
/// index is refused before any of its streams is created.
async fn nul_characters_and_long_paths_are_bad_input(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("nul").await;
    app.append("nul", "/s/a", "x").await;
    for (path, code) in [
        ("/a%00", "INVALID_NAME"),
        ("/s/a%00", "INVALID_NAME"),
        ("/a%00/b", "INVALID_PATH"),
        ("/s/a%00?i=0", "INVALID_NAME"),
    ] {
        for method in [Method::GET, Method::DELETE] {
            let r = app
                .pod(method.clone(), "nul", path)
                .bearer_auth(&app.token)
                .send()
                .await
                .expect("send");
            let (status, got) = error_code(r).await;
            assert_eq!(status, 400, "{method} {path}: {got}");
            if method == Method::GET {
                assert_eq!(got, code, "{method} {path}");
            }
        }
    }
    let r = app
        .pod(Method::POST, "nul", "/.config/owner")
        .bearer_auth(&app.token)
        .json(&json!({ "userId": "\u{0}" }))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (404, "USER_NOT_FOUND".into()));

    let graphql = |query: &str, variables: serde_json::Value| {
        app.main(Method::POST, "/graphql")
            .bearer_auth(&app.token)
            .json(&json!({ "query": query, "variables": variables }))
    };
    let body = json_of(graphql(
        "mutation($k: String!) { appendRecord(pod: \"nul\", stream: \"s\", name: \"b\", \
         content: \"x\", idempotencyKey: $k) { index } }",
        json!({ "k": "k\u{0}" }),
    ))
    .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "INVALID_INPUT",
        "{body}"
    );
    let body = json_of(graphql(
        "query($n: String!) { stream(pod: \"nul\", path: \"s\") { record(name: $n) { index } } }",
        json!({ "n": "a\u{0}" }),
    ))
    .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "RECORD_NOT_FOUND",
        "{body}"
    );
    // Nothing above was written.
    assert_eq!(app.all_records("nul", "s").await.len(), 1);

    // Eleven segments of 256 characters: 2,826 bytes, over the 2,048 a path may have. Varied
    // characters, as PostgreSQL compresses repeated ones below its index's limit.
    let segment = |i: usize| {
        (0..256)
            .map(|j| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + j * 13) % 36]))
            .collect::<String>()
    };
    let long: Vec<String> = (0..11).map(segment).collect();
    let r = app
        .pod(Method::POST, "nul", &format!("/{}/r", long.join("/")))
        .bearer_auth(&app.token)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (400, "INVALID_PATH".into()));
    let r = app
        .pod(Method::GET, "nul", &format!("/{}", long[0]))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404, "no stream of the refused path was created");
}
