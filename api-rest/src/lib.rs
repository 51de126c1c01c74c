//! The REST frontend (SPEC §2, §4): a thin axum layer over [`webpods_engine::Engine`].
//!
//! It owns HTTP concerns only — host routing (main domain vs `{pod}.{domain}`), reading tokens
//! from cookies and headers, request bodies and their size limit, query strings, and mapping
//! [`webpods_engine::ErrorKind`] to the spec's status codes and error envelope. Every rule
//! (names, permissions, the chain) is the engine's; this crate never touches storage.

mod auth_routes;
mod caller;
mod error;
mod host;
mod main_routes;
mod pod_routes;
mod request_id;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use webpods_engine::{Engine, InFlight};

pub use error::{ApiError, rate_headers, upgrade_refused};
pub use host::{HostKind, MainHost, PodHost, cross_origin, token_of};
pub use main_routes::starting_router;
pub use pod_routes::decoded_path;
pub use request_id::request_id_layer;

/// Settings of the REST frontend, read once from configuration.
#[derive(Debug, Clone)]
pub struct RestConfig {
    /// The main domain (host of `public_url`, lowercase, no port).
    pub main_host: MainHost,
    /// Largest request body accepted for a single-record append.
    pub max_body_bytes: usize,
    /// Largest request body accepted for a batch append.
    pub max_batch_bytes: usize,
    /// The pod also served on the main domain for non-system paths.
    pub root_pod: Option<String>,
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<RestConfig>,
    pub started: Instant,
    /// `false` while starting or draining: `/ready` answers 503.
    pub ready: Arc<AtomicBool>,
    /// Handlers running now (graceful shutdown waits for them before closing live tails).
    pub in_flight: Arc<InFlight>,
}

impl AppState {
    pub fn new(engine: Engine, config: RestConfig) -> Self {
        AppState {
            engine,
            config: Arc::new(config),
            started: Instant::now(),
            ready: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(InFlight::default()),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// The whole HTTP surface: `main` serves the main domain (REST routes of this crate merged with
/// whatever the caller adds, e.g. GraphQL), pod hosts get the pod routes.
pub fn app(state: AppState, extra_main_routes: Router) -> Router {
    app_with_live(state, extra_main_routes, None)
}

/// [`app`], with the pod-host GETs that ask for a live tail ([`is_live_request`]) sent to
/// `pod_live` (the WebSocket/SSE frontend) instead of the pod routes.
pub fn app_with_live(
    state: AppState,
    extra_main_routes: Router,
    pod_live: Option<Router>,
) -> Router {
    let main = main_routes::router(state.clone())
        .merge(auth_routes::router(state.clone()))
        .merge(extra_main_routes);
    // Around the whole router: inside it, a route's own 405 has no `Allow` header yet.
    let main = Router::new()
        .fallback_service(main)
        .layer(axum::middleware::map_response(error::envelope_bare_405));
    let mut pods = pod_routes::router(state.clone());
    if let Some(live) = pod_live {
        let reads = pods;
        let engine = state.engine.clone();
        pods = Router::new().fallback(move |req: axum::extract::Request| {
            // A path that does not decode goes to the pod routes, which say why.
            let path = decoded_path(req.uri().path())
                .ok()
                .filter(|p| !pod_routes::reserved_on_pod_host(p));
            // SSE asked of a path that is not a stream (a record, or nothing) is a read: the
            // read serves the record or says what is missing. A WebSocket tail says it itself.
            let pod = req.extensions().get::<PodHost>().map(|p| p.0.clone());
            let route = match (asks_for_a_tail(&req), path, pod) {
                (true, Some(path), Some(pod)) if is_sse_only(req.headers()) => {
                    let path = path.trim_matches('/').to_string();
                    PodRoute::TailIfStream { pod, path }
                }
                (true, Some(_), _) => PodRoute::Tail,
                _ => PodRoute::Read,
            };
            let (live, reads, engine) = (live.clone(), reads.clone(), engine.clone());
            async move {
                let target = match route {
                    PodRoute::Tail => live,
                    PodRoute::TailIfStream { pod, path } if engine.is_stream(&pod, &path).await => {
                        live
                    }
                    PodRoute::TailIfStream { .. } | PodRoute::Read => reads,
                };
                match tower::ServiceExt::oneshot(target, req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        });
    }
    host::dispatch(state, main, pods)
}

/// Where a pod host's request goes: a live tail, a read, or (SSE) a tail only if `path` is an
/// existing stream of `pod`.
enum PodRoute {
    Tail,
    Read,
    TailIfStream { pod: String, path: String },
}

/// Whether a request asks for a live tail (SPEC §4.4): a WebSocket upgrade, or SSE
/// ([`prefers_event_stream`]).
pub fn is_live_request(headers: &axum::http::HeaderMap) -> bool {
    is_websocket_upgrade(headers) || prefers_event_stream(headers)
}

/// A GET that is a tail rather than a read: [`is_live_request`], unless it is SSE with a
/// parameter only reads take (`?verify=true`, `?i=N`, `?recursive=true`…: answered as reads,
/// not silently dropped by a tail). Whether the path is a stream is decided later.
pub(crate) fn asks_for_a_tail(req: &axum::extract::Request) -> bool {
    req.method() == axum::http::Method::GET
        && is_live_request(req.headers())
        && !(is_sse_only(req.headers()) && pod_routes::has_read_only_parameters(req.uri().query()))
}

fn is_websocket_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("websocket"))
}

/// SSE without a WebSocket upgrade.
fn is_sse_only(headers: &axum::http::HeaderMap) -> bool {
    !is_websocket_upgrade(headers) && prefers_event_stream(headers)
}

/// Whether `Accept` names `text/event-stream` with a weight (`q`) above zero and above every
/// other media range: `text/html, text/event-stream;q=0.1` asks for a page, not for a tail,
/// and so does a tie (`application/json, text/event-stream`: a tail never ends, a read does).
/// Wildcards (`*/*`, `text/*`) never choose SSE on their own.
pub fn prefers_event_stream(headers: &axum::http::HeaderMap) -> bool {
    let ranges = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            (media, q)
        });
    let (mut sse, mut other) = (0.0f32, 0.0f32);
    for (media, q) in ranges {
        if media == "text/event-stream" {
            sse = sse.max(q);
        } else if !media.is_empty() {
            other = other.max(q);
        }
    }
    sse > 0.0 && sse > other
}

#[cfg(test)]
mod tests {
    use super::is_live_request;
    use axum::http::HeaderMap;

    #[test]
    fn live_requests_are_websocket_upgrades_or_sse() {
        let mut h = HeaderMap::new();
        assert!(!is_live_request(&h));
        h.insert("accept", "application/json".parse().unwrap());
        assert!(!is_live_request(&h));
        h.insert("accept", "text/event-stream".parse().unwrap());
        assert!(is_live_request(&h));
        for (accept, live) in [
            ("text/event-stream, */*;q=0.5", true),
            ("Text/Event-Stream; charset=utf-8", true),
            ("text/html, text/event-stream", false),
            ("text/event-stream;q=1, application/json;q=0.9", true),
            (
                "text/html,application/xhtml+xml,text/event-stream;q=0.1",
                false,
            ),
            ("text/event-stream;q=0", false),
            ("text/event-stream;q=0.5, application/json;q=0.9", false),
            ("*/*", false),
            ("text/*", false),
        ] {
            h.insert("accept", accept.parse().unwrap());
            assert_eq!(is_live_request(&h), live, "{accept}");
        }
        let mut h = HeaderMap::new();
        h.insert("upgrade", "WebSocket".parse().unwrap());
        assert!(is_live_request(&h));
    }
}
