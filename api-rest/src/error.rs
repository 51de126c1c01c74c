//! Engine errors as HTTP responses: the spec's status codes and
//! `{"error":{"code","message","details"?}}` envelope. Internals are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use webpods_engine::{Error, ErrorKind};

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError(Error::new(kind, message))
    }
}

/// The HTTP status of each error kind.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    use ErrorKind::*;
    match kind {
        Unauthorized | InvalidToken | TokenExpired | InvalidTokenType => StatusCode::UNAUTHORIZED,
        PodForbidden | Forbidden => StatusCode::FORBIDDEN,
        InvalidInput | InvalidName | InvalidPath | MissingName | InvalidIndex | InvalidContent => {
            StatusCode::BAD_REQUEST
        }
        ContentTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        PodExists | StreamExists | NameConflict | DomainTaken => StatusCode::CONFLICT,
        PodNotFound | StreamNotFound | RecordNotFound | RecordDeleted | UserNotFound | NotFound => {
            StatusCode::NOT_FOUND
        }
        RecordPurged => StatusCode::GONE,
        PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
        InvalidProvider | InvalidCallback | InvalidState => StatusCode::BAD_REQUEST,
        OauthError => StatusCode::UNAUTHORIZED,
        RateLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ForkDetected => StatusCode::CONFLICT,
        TooSlow => StatusCode::SERVICE_UNAVAILABLE,
        IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let kind = e.kind();
        match &e {
            Error::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            Error::Unavailable(detail) => tracing::warn!(error = %detail, "database unavailable"),
            Error::Rejected { .. } => {}
        }
        let mut body = json!({ "code": kind.code(), "message": e.public_message() });
        if let Some(d) = e.details() {
            body["details"] = d.clone();
        }
        let mut resp = (status_of(kind), Json(json!({ "error": body }))).into_response();
        if kind == ErrorKind::ContentTooLarge {
            // The rest of the body was not read: tell the client this connection ends here,
            // or it may reuse it for its next request and see it closed (RFC 9110 §15.5.14).
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        // The refused bucket's own figures (SPEC §9): the request-level bucket or one the
        // engine counts itself (stream creation), never another's; what is left may be more
        // than 0 (a request counting as several).
        if let Some((s, retry_after)) = e.rate_refusal() {
            let h = resp.headers_mut();
            rate_headers(h, s.limit, s.remaining, s.reset);
            h.insert("retry-after", axum::http::HeaderValue::from(retry_after));
        }
        if kind == ErrorKind::Unavailable {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The `X-RateLimit-*` headers of SPEC §9 (REST, and GraphQL's `POST /graphql`).
pub fn rate_headers(h: &mut axum::http::HeaderMap, limit: u64, remaining: u64, reset: i64) {
    h.insert("x-ratelimit-limit", axum::http::HeaderValue::from(limit));
    h.insert(
        "x-ratelimit-remaining",
        axum::http::HeaderValue::from(remaining),
    );
    h.insert("x-ratelimit-reset", axum::http::HeaderValue::from(reset));
}

/// A WebSocket endpoint asked without a valid upgrade (no `Upgrade`/`Connection` headers, no
/// `Sec-WebSocket-Key`, an unknown subprotocol…): 400 `INVALID_INPUT` in the envelope, with the
/// reason, instead of axum's plain-text or empty answer.
pub fn upgrade_refused(reason: impl std::fmt::Display) -> Response {
    ApiError::new(
        ErrorKind::InvalidInput,
        format!("this endpoint takes a WebSocket upgrade: {reason}"),
    )
    .into_response()
}

/// 405 in the error envelope, with the `Allow` header RFC 9110 §15.5.6 requires.
pub fn method_not_allowed(allow: &str) -> Response {
    let mut resp = (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "error": {
            "code": "METHOD_NOT_ALLOWED",
            "message": format!("this path takes {allow}"),
        }})),
    )
        .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(allow) {
        resp.headers_mut().insert(axum::http::header::ALLOW, v);
    }
    resp
}

/// axum answers a known route called with another method with a bare 405 (it does set
/// `Allow`); this gives that answer the envelope every other error has (SPEC §4.7).
pub async fn envelope_bare_405(resp: Response) -> Response {
    if resp.status() != StatusCode::METHOD_NOT_ALLOWED
        || resp
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE)
    {
        return resp;
    }
    let allow = resp
        .headers()
        .get(axum::http::header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    method_not_allowed(&allow)
}
