//! Host routing (SPEC §2): the main domain serves the API, `{pod}.{main domain}` serves a pod.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::HOST;
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use tower::ServiceExt;
use webpods_engine::Action;
use webpods_engine::ErrorKind;

use crate::AppState;
use crate::error::ApiError;

/// The main domain's host name (lowercase, without port).
#[derive(Debug, Clone)]
pub struct MainHost(pub String);

/// Which part of the service a request's host addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    Main,
    Pod(String),
    Unknown,
}

impl MainHost {
    /// Classifies a `Host` header value.
    pub fn classify(&self, host: Option<&str>) -> HostKind {
        let Some(host) = host else {
            return HostKind::Main;
        };
        let name = strip_port(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if name == self.0 || name.parse::<std::net::IpAddr>().is_ok() {
            return HostKind::Main;
        }
        match name.strip_suffix(&self.0).and_then(|p| p.strip_suffix('.')) {
            Some(pod) if !pod.is_empty() && !pod.contains('.') => HostKind::Pod(pod.to_string()),
            _ => HostKind::Unknown,
        }
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The rate-limited action of a request (SPEC §9); stream creation is counted by the engine.
fn rate_action(on_pod: bool, method: &Method, path: &str) -> Option<Action> {
    match (on_pod, method) {
        (true, &Method::GET | &Method::HEAD) => Some(Action::Read),
        (true, &Method::POST | &Method::DELETE) => Some(Action::Write),
        (false, &Method::POST) if path == "/api/pods" => Some(Action::PodCreate),
        _ => None,
    }
}

/// The caller a limit applies to: the token's user, else the client's IP address.
fn rate_key(st: &AppState, req: &Request, on_pod: bool) -> String {
    let user = token_of(req.headers(), on_pod)
        .and_then(|t| st.engine.authenticate(Some(&t)).ok())
        .and_then(|c| c.user_id().map(str::to_string));
    match user {
        Some(u) => u,
        None => match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
            None => "ip:unknown".to_string(),
        },
    }
}

/// Paths the main domain keeps for itself even when a root pod is configured (SPEC §2).
pub(crate) fn is_system_route(path: &str) -> bool {
    const EXACT: [&str; 8] = [
        "/health",
        "/live",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/ws",
        "/login",
        "/graphql",
    ];
    const PREFIXES: [&str; 3] = ["/auth/", "/api/", "/graphql/"];
    EXACT.contains(&path) || PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The pod a request addresses, set by `dispatch` for the pod router.
#[derive(Debug, Clone)]
pub struct PodHost(pub String);

/// Routes each request by host to the main router or the pod router.
pub fn dispatch(state: AppState, main: Router, pods: Router) -> Router {
    Router::new()
        .fallback(move |State(st): State<AppState>, mut req: Request| {
            let main = main.clone();
            let pods = pods.clone();
            async move {
                // A Host that is not text names no host we serve: not the main domain either.
                let host = match req.headers().get(HOST).map(|h| h.to_str()) {
                    Some(Ok(h)) => Some(h.to_string()),
                    Some(Err(_)) => {
                        return ApiError::new(
                            ErrorKind::InvalidInput,
                            "the Host header is not a valid host name",
                        )
                        .into_response();
                    }
                    None => req.uri().authority().map(|a| a.to_string()),
                };
                let pod = match st.config.main_host.classify(host.as_deref()) {
                    HostKind::Main => match &st.config.root_pod {
                        Some(root) if !is_system_route(req.uri().path()) => Some(root.clone()),
                        _ => None,
                    },
                    HostKind::Pod(pod) => Some(pod),
                    HostKind::Unknown => {
                        // `example.com.` (fully qualified) is `example.com`, as for pod hosts.
                        let name = strip_port(host.as_deref().unwrap_or(""))
                            .trim_end_matches('.')
                            .to_ascii_lowercase();
                        match st.engine.pod_for_domain(&name).await {
                            Ok(Some(pod)) => Some(pod),
                            Ok(None) => {
                                return ApiError::new(
                                    ErrorKind::PodNotFound,
                                    "no pod is served on this host",
                                )
                                .into_response();
                            }
                            Err(e) => return ApiError(e).into_response(),
                        }
                    }
                };
                let action = st
                    .engine
                    .rate_limiting()
                    .then(|| rate_action(pod.is_some(), req.method(), req.uri().path()))
                    .flatten();
                let (rate, key) = match action {
                    None => (None, None),
                    Some(action) => {
                        let key = rate_key(&st, &req, pod.is_some());
                        match st.engine.rate_limit(&key, action).await {
                            Ok(status) => (status, Some(key)),
                            // 429 with `Retry-After` and the limit headers (`ApiError`).
                            Err(e) => return ApiError(e).into_response(),
                        }
                    }
                };
                let result = match pod {
                    None => main.oneshot(req).await,
                    Some(pod) => {
                        req.extensions_mut().insert(PodHost(pod));
                        pods.oneshot(req).await
                    }
                };
                let mut resp = match result {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                };
                // A pod creation refused as a bad request (an invalid name, a name taken)
                // created nothing: it does not use up the small creation limit.
                let mut rate = rate;
                if action == Some(Action::PodCreate)
                    && resp.status().is_client_error()
                    && let (Some(key), Some(s)) = (key, rate.as_mut())
                {
                    st.engine.rate_refund(&key, Action::PodCreate, 1).await;
                    s.remaining = (s.remaining + 1).min(s.limit);
                }
                // A 429 from inside (stream creation) carries its own bucket's headers.
                if let Some(s) = rate
                    && resp.status() != StatusCode::TOO_MANY_REQUESTS
                {
                    crate::error::rate_headers(resp.headers_mut(), s.limit, s.remaining, s.reset);
                }
                resp
            }
        })
        .with_state(state)
}

/// The value of a cookie.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

/// The token of a request (SPEC §3.1): cookie `pod_token` (pod hosts), cookie `token`,
/// `Authorization: Bearer <t>`, `Authorization: <t>`.
///
/// The cookies count only for a request sent by a page of the same origin ([`cross_origin`]):
/// every pod host is same-site with the main domain and with every other pod, so a page that
/// any user serves from their pod would otherwise write, take pods over or open live tails
/// with its visitors' cookies (cross-site request forgery and WebSocket hijacking).
pub fn token_of(headers: &axum::http::HeaderMap, pod_host: bool) -> Option<String> {
    if !cross_origin(headers) {
        if pod_host && let Some(t) = cookie(headers, "pod_token") {
            return Some(t);
        }
        if let Some(t) = cookie(headers, "token") {
            return Some(t);
        }
    }
    // Not ASCII: still a token (an invalid one), so the answer is INVALID_TOKEN.
    let auth = String::from_utf8_lossy(headers.get(axum::http::header::AUTHORIZATION)?.as_bytes());
    let auth = auth.trim();
    match auth.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Some(t.trim().to_string()),
        Some(_) => None,
        None if !auth.is_empty() => Some(auth.to_string()),
        None => None,
    }
}

/// Whether a browser sent the request from a page of another origin: its `Origin` header (sent
/// with every WebSocket handshake, form post and cross-origin `fetch`; never with a plain
/// navigation) is present and names another host and port than `Host`. `Origin: null`
/// (sandboxed pages, some redirects) counts as another origin.
pub fn cross_origin(headers: &axum::http::HeaderMap) -> bool {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return false;
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let (Ok(origin), Some(host)) = (origin.to_str(), host) else {
        return true;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return true;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return true,
    };
    let bare = |a: &str| -> String {
        let a = a.trim().trim_end_matches('/').to_ascii_lowercase();
        a.strip_suffix(default_port)
            .map(str::to_string)
            .unwrap_or(a)
    };
    bare(authority) != bare(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_hosts() {
        let m = MainHost("localhost".into());
        assert_eq!(m.classify(Some("localhost:3000")), HostKind::Main);
        assert_eq!(m.classify(Some("127.0.0.1:3000")), HostKind::Main);
        assert_eq!(
            m.classify(Some("alice.localhost:3000")),
            HostKind::Pod("alice".into())
        );
        assert_eq!(
            m.classify(Some("ALICE.localhost")),
            HostKind::Pod("alice".into())
        );
        assert_eq!(m.classify(Some("a.b.localhost")), HostKind::Unknown);
        assert_eq!(m.classify(Some("example.com")), HostKind::Unknown);
        assert_eq!(m.classify(Some("[::1]:3000")), HostKind::Main);
    }

    #[test]
    fn token_sources_in_order() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(token_of(&h, false).as_deref(), Some("abc"));
        h.insert("authorization", "abc".parse().unwrap());
        assert_eq!(token_of(&h, false).as_deref(), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(token_of(&h, false), None);
        h.insert("cookie", "x=1; token=ck; pod_token=pk".parse().unwrap());
        assert_eq!(token_of(&h, false).as_deref(), Some("ck"));
        assert_eq!(token_of(&h, true).as_deref(), Some("pk"));
    }

    #[test]
    fn cookies_count_only_for_pages_of_the_same_origin() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("host", "alice.localhost:3000".parse().unwrap());
        h.insert("cookie", "token=ck; pod_token=pk".parse().unwrap());
        h.insert("authorization", "Bearer hdr".parse().unwrap());
        assert_eq!(
            token_of(&h, true).as_deref(),
            Some("pk"),
            "no Origin: not a page"
        );
        for same in [
            "http://alice.localhost:3000",
            "HTTP://Alice.LOCALHOST:3000/",
        ] {
            h.insert("origin", same.parse().unwrap());
            assert!(!cross_origin(&h), "{same}");
            assert_eq!(token_of(&h, true).as_deref(), Some("pk"));
        }
        for other in [
            "http://evil.localhost:3000",
            "http://localhost:3000",
            "http://alice.localhost:3001",
            "null",
            "file://",
        ] {
            h.insert("origin", other.parse().unwrap());
            assert!(cross_origin(&h), "{other}");
            assert_eq!(token_of(&h, true).as_deref(), Some("hdr"), "{other}");
        }
        h.insert("host", "example.com".parse().unwrap());
        h.insert("origin", "https://example.com:443".parse().unwrap());
        assert!(!cross_origin(&h), "default ports are the same origin");
        h.insert("origin", "http://example.com".parse().unwrap());
        assert!(!cross_origin(&h));
        h.insert("host", "example.com:443".parse().unwrap());
        h.insert("origin", "https://example.com".parse().unwrap());
        assert!(!cross_origin(&h));
    }
}
