//! One stream per request on a pod host: a WebSocket (`Upgrade: websocket`) or an SSE response
//! (`Accept: text/event-stream`) on the stream's URL.

use std::convert::Infallible;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use webpods_api_rest::{ApiError, PodHost, decoded_path, token_of};
use webpods_engine::{
    CLOSE_GRACE, Error, ErrorKind, LiveEnd, LiveEvent, LiveRequest, Subscription,
};

use crate::{
    LiveState, Out, authenticate, caught_up_frame, close, close_after_read_error, close_code,
    close_too_slow, error_body, error_frame, keep_alive, pump, send_timed, to_json,
};

/// Where the tail starts: `?after=K&afterHash=H`.
struct Query {
    after: Option<i64>,
    after_hash: Option<String>,
}

fn parse_query(q: Option<&str>) -> Result<Query, Error> {
    let mut out = Query {
        after: None,
        after_hash: None,
    };
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => {
                out.after = Some(v.parse().map_err(|_| {
                    Error::new(ErrorKind::InvalidIndex, format!("{v:?} is not an index"))
                })?)
            }
            "afterHash" => out.after_hash = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(out)
}

pub(crate) async fn handle(
    State(st): State<LiveState>,
    pod: Option<Extension<PodHost>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(Extension(PodHost(pod))) = pod else {
        return ApiError::new(ErrorKind::NotFound, "no pod is served on this host").into_response();
    };
    // As REST decodes it. Reserved paths (`/ws`, `/api/…`) never get here: `app_with_live`
    // sends them to the pod routes, which answer 404.
    let path = match decoded_path(uri.path()) {
        Ok(p) => p.trim_end_matches('/').to_string(),
        Err(e) => return e.into_response(),
    };
    let query = match parse_query(uri.query()) {
        Ok(q) => q,
        Err(e) => return ApiError(e).into_response(),
    };
    let token = token_of(&headers, true);
    match ws {
        Ok(ws) => {
            let engine = st.engine.clone();
            let sub = async {
                let (caller, expiry) = authenticate(&engine, token.as_deref())?;
                let req = LiveRequest {
                    after: query.after,
                    after_hash: query.after_hash,
                    token_expires_at: expiry,
                };
                engine.subscribe(&caller, &pod, &path, req).await
            }
            .await;
            st.upgrade(ws)
                .on_upgrade(move |socket| run_ws(st, socket, sub))
        }
        Err(rejection) => {
            if headers.contains_key(header::UPGRADE) {
                return webpods_api_rest::upgrade_refused(rejection.body_text());
            }
            sse(st, &pod, &path, query, &headers, token.as_deref()).await
        }
    }
}

/// Drives a single-stream socket until the subscription ends or the client leaves.
async fn run_ws(st: LiveState, socket: WebSocket, sub: Result<Subscription, Error>) {
    let _open = st.engine.live_connection();
    let cfg = st.config.clone();
    let (mut sink, mut stream) = socket.split();
    let sub = match sub {
        Ok(s) => s,
        Err(e) => {
            let frame = Message::Text(error_frame(None, &e).into());
            if send_timed(&mut sink, frame, &cfg).await {
                close(&mut sink, close_code(&e), e.kind().code()).await;
            }
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Out>(16);
    let pumping = tokio::spawn(pump(sub, None, tx, true));
    // At shutdown the subscription delivers what it still holds, then asks for the 1001 close
    // itself; this bounds a writer stuck behind a full socket.
    let shutdown = st.engine.live_shutdown().wait_then(CLOSE_GRACE);
    tokio::pin!(shutdown);
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => {
                close(&mut sink, 1001, "server shutting down").await;
                break;
            }
            out = rx.recv() => match out {
                Some(Out::Text(_, text)) => {
                    if !send_timed(&mut sink, Message::Text(text.into()), &cfg).await {
                        close_too_slow(&mut sink, &cfg).await;
                        break;
                    }
                }
                Some(Out::Close(code, reason)) => {
                    close(&mut sink, code, reason).await;
                    break;
                }
                Some(Out::Ended(..)) | None => {
                    close(&mut sink, 1000, "").await;
                    break;
                }
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        close_after_read_error(&mut sink, e).await;
                        break;
                    }
                Some(Ok(_)) => last_seen = Instant::now(),
            },
            _ = ping.tick() => {
                if !keep_alive(&mut sink, last_seen, &cfg).await {
                    break;
                }
            }
        }
    }
    pumping.abort();
}

/// The SSE form: `id: <index>`, `event: record`, `data: <record JSON>`; `event: caughtUp`;
/// `event: error` before the end; comment heartbeats. `Last-Event-ID` resumes after that index.
async fn sse(
    st: LiveState,
    pod: &str,
    path: &str,
    query: Query,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Response {
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let (after, after_hash) = match last_event_id {
        Some(id) => match id.parse::<i64>() {
            // The client holds everything up to its last event: its afterHash is older.
            Ok(k) => (Some(k), None),
            Err(_) => {
                return ApiError::new(ErrorKind::InvalidIndex, "Last-Event-ID is not an index")
                    .into_response();
            }
        },
        None => (query.after, query.after_hash),
    };
    let engine = &st.engine;
    let sub = async {
        let (caller, expiry) = authenticate(engine, token)?;
        let req = LiveRequest {
            after,
            after_hash,
            token_expires_at: expiry,
        };
        engine.subscribe(&caller, pod, path, req).await
    }
    .await;
    let sub = match sub {
        Ok(s) => s,
        Err(e) => return ApiError(e).into_response(),
    };
    let events = futures::stream::unfold(Some(sub), |state| async move {
        let mut sub = state?;
        let event = match sub.next().await {
            Ok(LiveEvent::Record(r)) => Event::default()
                .id(r.row.index.to_string())
                .event("record")
                .data(to_json(&r)),
            Ok(LiveEvent::CaughtUp { next_index }) => Event::default()
                .event("caughtUp")
                .data(caught_up_frame(None, next_index)),
            Err(LiveEnd::Shutdown) => return None,
            Err(LiveEnd::Error(e)) => {
                // The WebSocket frame's shape (SPEC §6.1), as `caughtUp`'s data is.
                let body = serde_json::json!({ "type": "error", "error": error_body(&e) });
                let event = Event::default().event("error").data(body.to_string());
                return Some((Ok::<_, Infallible>(event), None));
            }
        };
        Some((Ok(event), Some(sub)))
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(st.config.sse_heartbeat))
        .into_response();
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    resp
}
