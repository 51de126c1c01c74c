//! `X-Request-Id` on every response (echoed when the client sent a sane one), and one log line
//! per request with id, method, path, status and duration. Tokens are never logged: only the
//! path is, never the query string or headers.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

const HEADER: &str = "x-request-id";

/// Middleware: assigns the request id and logs the request.
pub async fn request_id_layer(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid"));
    req.headers_mut().insert(HEADER, value.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = Instant::now();
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(HEADER, value);
    tracing::info!(
        request_id = %id,
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}
