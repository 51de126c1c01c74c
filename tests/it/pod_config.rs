//! SPEC §4.1 and §4.5: ownership transfer, routing links, custom domains and the root pod.

use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::support::{Backend, TestApp, error_code, fresh_database, json_of};

both_backends!(
    ownership_transfer,
    routing_links,
    custom_domains_and_root_pod
);

async fn ownership_transfer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("moving").await;
    let (bob_id, bob) = app.user("bob").await;
    let transfer = |token: &str, user: &str| {
        app.pod(Method::POST, "moving", "/.config/owner")
            .bearer_auth(token)
            .json(&json!({ "userId": user }))
    };
    let r = transfer(&bob, &bob_id).send().await.expect("stranger");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = transfer(&app.token, "00000000-0000-0000-0000-000000000000")
        .send()
        .await
        .expect("unknown");
    assert_eq!(error_code(r).await, (404, "USER_NOT_FOUND".into()));
    // A user id names the same user in any case (UUIDs are case-insensitive).
    let r = transfer(&app.token, &bob_id.to_uppercase())
        .send()
        .await
        .expect("transfer");
    assert_eq!(r.status(), 201);
    // The previous owner loses owner rights at once; the new one has them.
    let r = app
        .pod(Method::POST, "moving", "/new/x")
        .bearer_auth(&app.token)
        .body("x")
        .send()
        .await
        .expect("old owner");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    let r = app
        .pod(Method::POST, "moving", "/new/x")
        .bearer_auth(&bob)
        .body("x")
        .send()
        .await
        .expect("new owner");
    assert_eq!(r.status(), 201);
    let pods: serde_json::Value = app
        .main(Method::GET, "/api/pods")
        .bearer_auth(&bob)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(pods[0]["name"], "moving");
    app.stop().await;
}

async fn routing_links(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.create_pod("site").await;
    app.append("site", "/homepage/v", "<h1>v1</h1>").await;
    app.append("site", "/homepage/v", "<h1>v2</h1>").await;
    app.append("site", "/pages/about", "about us").await;
    let set = |body: serde_json::Value| {
        app.pod(Method::POST, "site", "/.config/routing")
            .bearer_auth(&app.token)
            .json(&body)
    };
    let r = set(json!({ "no-slash": "x" }))
        .send()
        .await
        .expect("bad route");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    // A key with a query could never match: requests are matched by path.
    let r = set(json!({ "/q?x=1": "pages/about" }))
        .send()
        .await
        .expect("bad route");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = set(json!({
        "/": "homepage?i=-1",
        "/about": "pages/about",
        "/all": "pages",
        "/short": "homepage?fields=index,content&maxContentSize=4&limit=1",
        "/check": "homepage?verify=true",
    }))
    .send()
    .await
    .expect("routes");
    assert_eq!(r.status(), 201);
    // Every option of a target's query applies, as it would on a direct request.
    let short = json_of(app.pod(Method::GET, "site", "/short")).await;
    assert_eq!(
        short["records"],
        json!([{ "index": 0, "content": "<h1>", "truncated": true }]),
        "{short}"
    );
    let check = json_of(app.pod(Method::GET, "site", "/check")).await;
    assert_eq!(
        (&check["valid"], &check["length"]),
        (&json!(true), &json!(2)),
        "{check}"
    );
    let body = |path: &'static str| {
        let req = app.pod(Method::GET, "site", path);
        async move { req.send().await.expect("get").text().await.expect("body") }
    };
    assert_eq!(body("/").await, "<h1>v2</h1>");
    assert_eq!(body("/about").await, "about us");
    assert!(body("/all").await.contains("\"records\""));
    // Keys that could never match, or that name what the server keeps, are refused.
    for key in [
        "/y/",
        "/.config/owner",
        "/login",
        "/auth/callback",
        "/api",
        "/ws/x",
    ] {
        let r = app
            .pod(Method::POST, "site", "/.config/routing")
            .bearer_auth(&app.token)
            .json(&json!({ key: "blog/p1" }))
            .send()
            .await
            .expect("bad key");
        assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()), "{key}");
    }
    // So is a target whose query a read would refuse.
    let r = app
        .pod(Method::POST, "site", "/.config/routing")
        .bearer_auth(&app.token)
        .json(&json!({ "/bad": "homepage?i=abc" }))
        .send()
        .await
        .expect("bad target query");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    // Writes to the routing stream only go through the endpoint.
    let r = app
        .pod(Method::POST, "site", "/.config/routing/routes")
        .bearer_auth(&app.token)
        .body("{\"/x\":\"y\"}x")
        .send()
        .await
        .expect("direct write");
    assert_eq!(error_code(r).await, (403, "FORBIDDEN".into()));
    app.stop().await;
}

async fn custom_domains_and_root_pod(backend: Backend) {
    let url = fresh_database(backend).await;
    let app = TestApp::spawn_on(&url, &[("WEBPODS_ROOT_POD", "home")]).await;
    app.create_pod("home").await;
    app.create_pod("blog").await;
    app.create_pod("other").await;
    app.append("blog", "/posts/hello", "hello from blog").await;
    app.append("home", "/index.html", "root page").await;
    let domains = |pod: &str, list: serde_json::Value| {
        app.pod(Method::POST, pod, "/.config/domains")
            .bearer_auth(&app.token)
            .json(&json!({ "domains": list }))
    };
    let r = domains("blog", json!(["blog.example.com"]))
        .send()
        .await
        .expect("set");
    assert_eq!(r.status(), 201);
    let r = domains("other", json!(["blog.example.com"]))
        .send()
        .await
        .expect("taken");
    assert_eq!(error_code(r).await, (409, "DOMAIN_TAKEN".into()));
    let r = domains("other", json!(["not a domain"]))
        .send()
        .await
        .expect("bad");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let r = domains("other", json!(["x.localhost"]))
        .send()
        .await
        .expect("own domain");
    assert_eq!(error_code(r).await, (400, "INVALID_INPUT".into()));
    let get = |host: &str, path: &str| {
        app.http
            .get(format!("http://{}{}", app.addr, path))
            .header("host", host.to_string())
            .send()
    };
    let r = get("blog.example.com", "/posts/hello")
        .await
        .expect("custom domain");
    assert_eq!(r.text().await.expect("body"), "hello from blog");
    // The fully qualified form (a trailing dot) and any port name the same host.
    let r = get("Blog.Example.com.:8080", "/posts/hello")
        .await
        .expect("fully qualified");
    assert_eq!(r.text().await.expect("body"), "hello from blog");
    let r = get("unknown.example.com", "/posts/hello")
        .await
        .expect("unknown domain");
    assert_eq!(error_code(r).await, (404, "POD_NOT_FOUND".into()));
    // The root pod answers on the main domain, except for system paths.
    let r = get("localhost", "/index.html").await.expect("root pod");
    assert_eq!(r.text().await.expect("body"), "root page");
    let r = get("localhost", "/health").await.expect("health");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").contains("uptimeSeconds"));
    // Replacing the list frees the old domain.
    let r = domains("blog", json!(["www.blog.example.com"]))
        .send()
        .await
        .expect("replace");
    assert_eq!(r.status(), 201);
    let r = domains("other", json!(["blog.example.com"]))
        .send()
        .await
        .expect("now free");
    assert_eq!(r.status(), 201);
    app.stop().await;
}
