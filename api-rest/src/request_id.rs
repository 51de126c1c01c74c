//! `X-Request-Id` on every response (the client's own echoed when it is printable ASCII of at
//! most 1,024 bytes), one log line per request (request id, method, route, path, status,
//! duration), the request metrics, and the count of running handlers that a graceful shutdown
//! waits for ([`webpods_engine::InFlight`]).
//! Once the drain began, a request that was not yet counted is refused with 503 `UNAVAILABLE`
//! (probes excepted): live tails take their last look at the log when the counted requests
//! are done, and a record acknowledged after that look would never reach them.
//!
//! **No secret is ever logged here**, by construction: the line is built from the method, the
//! URI *path* and a fixed route name only — never the query string (which may carry
//! `?token=` on SSO callbacks), never a header (`Authorization`, `Cookie`) and never a body.
//! Paths carry pod, stream and record names, which are not secrets. The integration test
//! `ops::logs_are_json_and_never_contain_tokens` checks this against the real process at the
//! most verbose log level.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, HOST};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use webpods_engine::ErrorKind;

use crate::host::{HostKind, is_system_route};
use crate::{ApiError, AppState};

const HEADER: &str = "x-request-id";
/// The longest client-sent id echoed (SPEC §4.7); a longer one, or one that is not printable
/// ASCII, is replaced by a fresh UUID rather than copied into every log line.
const MAX_ECHOED: usize = 1024;

/// Middleware (`axum::middleware::from_fn_with_state`): assigns the request id, logs the
/// request and counts it in the metrics under its route name.
pub async fn request_id_layer(
    State(st): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_ECHOED
                && v.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid"));
    req.headers_mut().insert(HEADER, value.clone());
    let route = route_of(&st, &req);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = Instant::now();
    let running = st.in_flight.start();
    // Counted first, then checked (both sequentially consistent with the shutdown, which sets
    // the flag and then waits for the count to reach zero): a request either is counted and
    // waited for, or sees the drain and is refused. Probes still answer (`/ready` says 503).
    let mut resp = if st.engine.is_draining() && !is_probe(route) {
        drop(running);
        ApiError::new(
            ErrorKind::Unavailable,
            "the server is shutting down; retry on another instance",
        )
        .into_response()
    } else {
        let resp = next.run(req).await;
        drop(running);
        resp
    };
    if st.engine.is_draining() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // No more requests on this connection: the client reconnects elsewhere.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let elapsed = start.elapsed();
    resp.headers_mut().insert(HEADER, value);
    let status = resp.status().as_u16();
    st.engine.metrics().observe_request(route, status, elapsed);
    tracing::info!(
        request_id = %id,
        method = %method,
        route,
        path = %path,
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Routes that answer during a drain: the probes and the metrics.
fn is_probe(route: &str) -> bool {
    matches!(route, "health" | "live" | "ready" | "metrics")
}

/// The fixed name of what a request addresses, for logs and metric labels (never a raw path).
fn route_of(st: &AppState, req: &Request) -> &'static str {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let path = req.uri().path();
    let on_pod = match st.config.main_host.classify(host) {
        HostKind::Main => st.config.root_pod.is_some() && !is_system_route(path),
        // Custom domains serve pods.
        HostKind::Pod(_) | HostKind::Unknown => true,
    };
    if on_pod {
        pod_route(req)
    } else {
        main_route(path)
    }
}

fn main_route(path: &str) -> &'static str {
    match path {
        "/health" => "health",
        "/live" => "live",
        "/ready" => "ready",
        "/metrics" => "metrics",
        "/openapi.json" => "openapi",
        "/api/pods" => "api_pods",
        "/ws" => "ws",
        "/login" => "login",
        "/graphql" | "/graphql/ws" => "graphql",
        p if p.starts_with("/auth/") => "auth",
        p if p.starts_with("/api/") => "api_other",
        _ => "not_found",
    }
}

fn pod_route(req: &Request) -> &'static str {
    let path = req.uri().path().trim_start_matches('/');
    let query = req.uri().query().unwrap_or("");
    let flag = |name: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .any(|(k, v)| k == name && matches!(v.as_ref(), "" | "1" | "true"))
    };
    let config = path.starts_with(".config/") || path == ".config";
    match *req.method() {
        Method::GET | Method::HEAD => {
            if crate::asks_for_a_tail(req) {
                "pod_live"
            } else if path.trim_end_matches('/') == ".config/api/streams" {
                "pod_streams"
            } else if flag("verify") {
                "pod_verify"
            } else {
                "pod_read"
            }
        }
        Method::POST if config => "pod_config",
        Method::POST if flag("batch") => "pod_batch",
        Method::POST => "pod_write",
        Method::DELETE => "pod_delete",
        _ => "pod_other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn pod_routes_have_fixed_names() {
        assert_eq!(pod_route(&req(Method::GET, "/a/b", &[])), "pod_read");
        assert_eq!(
            pod_route(&req(Method::GET, "/a?verify=true", &[])),
            "pod_verify"
        );
        assert_eq!(
            pod_route(&req(Method::GET, "/a", &[("accept", "text/event-stream")])),
            "pod_live"
        );
        assert_eq!(pod_route(&req(Method::POST, "/a/b", &[])), "pod_write");
        assert_eq!(
            pod_route(&req(Method::POST, "/a?batch=true", &[])),
            "pod_batch"
        );
        assert_eq!(
            pod_route(&req(Method::POST, "/.config/owner", &[])),
            "pod_config"
        );
        assert_eq!(pod_route(&req(Method::DELETE, "/a/b", &[])), "pod_delete");
        assert_eq!(
            pod_route(&req(Method::GET, "/.config/api/streams", &[])),
            "pod_streams"
        );
    }

    #[test]
    fn main_routes_have_fixed_names() {
        assert_eq!(main_route("/api/pods"), "api_pods");
        assert_eq!(main_route("/auth/github/callback"), "auth");
        assert_eq!(main_route("/metrics"), "metrics");
        assert_eq!(main_route("/some/random/path"), "not_found");
    }
}
