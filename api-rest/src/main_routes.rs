//! Routes of the main domain: pods (`/api/pods`), the operational probes and `/metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use webpods_engine::ErrorKind;

use crate::AppState;
use crate::caller::Auth;
use crate::error::ApiError;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/pods", get(list_pods).post(create_pod))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "no such route") })
        .with_state(state)
}

#[derive(Deserialize)]
struct NewPod {
    name: String,
}

async fn create_pod(
    State(st): State<AppState>,
    Auth(caller): Auth,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NewPod = serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(
            ErrorKind::InvalidInput,
            "expected a JSON body {\"name\": …}",
        )
    })?;
    let pod = st.engine.create_pod(&caller, &req.name).await?;
    Ok((StatusCode::CREATED, Json(pod)).into_response())
}

async fn list_pods(State(st): State<AppState>, Auth(caller): Auth) -> Result<Response, ApiError> {
    Ok(Json(st.engine.list_pods(&caller).await?).into_response())
}

/// How long a probe waits for the database: probes must answer quickly even when the pool
/// cannot get a connection (a probe that hangs is as bad as one that lies).
const PROBE_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// `true` when the database answers `SELECT 1` within [`PROBE_DB_TIMEOUT`].
async fn database_answers(st: &AppState) -> bool {
    matches!(
        tokio::time::timeout(PROBE_DB_TIMEOUT, st.engine.store().ping()).await,
        Ok(Ok(()))
    )
}

/// Every metric in the Prometheus text format (SPEC §10).
async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.engine.render_metrics(),
    )
        .into_response()
}

/// What the listener answers while the server starts (connecting to the database, applying
/// migrations): `/live` 200, `/ready` and `/health` 503 (`"status": "starting"`), anything
/// else 503 `UNAVAILABLE` with `Retry-After`, so that probes and load balancers see a process
/// that is up but not ready rather than a refused connection.
pub fn starting_router() -> Router {
    let started = std::time::Instant::now();
    Router::new()
        .route("/live", get(live))
        .route(
            "/ready",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "status": "starting" })),
                )
            }),
        )
        .route(
            "/health",
            get(move || async move {
                let body = json!({
                    "status": "starting",
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptimeSeconds": started.elapsed().as_secs(),
                    "database": "connecting",
                });
                (StatusCode::SERVICE_UNAVAILABLE, Json(body))
            }),
        )
        .fallback(|| async {
            ApiError::new(
                ErrorKind::Unavailable,
                "the server is starting; retry in a moment",
            )
        })
}

/// `/live`: 200 while the process serves, starting or not.
async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn health(State(st): State<AppState>) -> Response {
    let db_ok = database_answers(&st).await;
    let body = json!({
        "status": if db_ok { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": st.started.elapsed().as_secs(),
        "database": if db_ok { "ok" } else { "unreachable" },
    });
    let status = if db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The OpenAPI 3.1 document of the REST surface (checked against the routes by a test).
pub const OPENAPI: &str = include_str!("../openapi/openapi.json");

/// The document, with its servers on this server's `public_url` (it is written for the default,
/// `http://localhost:3000`).
async fn openapi(State(st): State<AppState>) -> Response {
    let public = &st.engine.config().auth.public_url;
    let main = public.as_str().trim_end_matches('/');
    let pods = st.engine.pod_origin("{pod}");
    let doc = OPENAPI
        .replace("\"http://{pod}.localhost:3000", &format!("\"{pods}"))
        .replace("\"http://localhost:3000", &format!("\"{main}"));
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc,
    )
        .into_response()
}

async fn ready(State(st): State<AppState>) -> Response {
    let ready = st.ready.load(Ordering::SeqCst) && database_answers(&st).await;
    if ready {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready" })),
        )
            .into_response()
    }
}
