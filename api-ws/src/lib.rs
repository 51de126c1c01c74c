//! Live tails over WebSocket and Server-Sent Events (SPEC §6): transport only.
//!
//! - [`pod_router`]: on a pod host, `GET /{stream…}?after=K[&afterHash=H]` with
//!   `Upgrade: websocket` (one stream per socket) or `Accept: text/event-stream` (SSE,
//!   `Last-Event-ID` resumes);
//! - [`main_router`]: `GET /ws` on the main domain, many subscriptions on one socket, driven by
//!   `auth` / `subscribe` / `unsubscribe` messages; `"recursive": true` follows a stream and its
//!   readable descendants under one id ([`webpods_engine::RecursiveSubscription`]).
//!
//! Ordering, de-duplication, catch-up, permission re-checks and slow-subscriber handling are the
//! engine's ([`webpods_engine::Subscription`]); this crate turns its events into frames, keeps
//! connections alive (ping/pong, idle timeout), bounds what a client may send, and closes
//! sockets with the right code: 1001 on shutdown, 4008 `TOO_SLOW` when a client stops taking
//! frames or falls hopelessly behind, `4000 + HTTP status` for other errors (4403 `FORBIDDEN`,
//! 4409 `FORK_DETECTED`, …).
//!
//! Memory per connection is bounded: each subscription hands frames to the socket writer
//! through a small bounded channel, so a client that does not read makes its subscriptions
//! wait (they fall back to storage reads in the engine) instead of queueing frames.

mod multiplex;
mod single;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::SinkExt;
use futures::stream::SplitSink;
use serde::Serialize;
use tokio::sync::mpsc;
use webpods_api_rest::ApiError;
use webpods_engine::{
    Engine, Error, ErrorKind, LiveEnd, LiveEvent, Record, RecursiveEvent, RecursiveSubscription,
    Subscription,
};

/// Settings of live tails, read once from configuration.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// `limits.max_subscriptions_per_connection` on `/ws`.
    pub max_subscriptions_per_connection: usize,
    /// Largest message a client may send.
    pub max_message_bytes: usize,
    /// How often the server pings an idle socket.
    pub ping_interval: Duration,
    /// A socket that sent nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// A frame the client does not take within this time closes the socket with 4008.
    pub send_timeout: Duration,
    /// SSE comment heartbeat period.
    pub sse_heartbeat: Duration,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            max_subscriptions_per_connection: 100,
            max_message_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            sse_heartbeat: Duration::from_secs(15),
        }
    }
}

/// Shared state of the live handlers.
#[derive(Clone)]
pub struct LiveState {
    pub engine: Engine,
    pub config: Arc<LiveConfig>,
}

impl LiveState {
    pub fn new(engine: Engine, config: LiveConfig) -> Self {
        LiveState {
            engine,
            config: Arc::new(config),
        }
    }

    fn upgrade(&self, ws: WebSocketUpgrade) -> WebSocketUpgrade {
        ws.max_message_size(self.config.max_message_bytes)
            .max_frame_size(self.config.max_message_bytes)
    }
}

/// The live tail of a stream on a pod host. Route here the GETs that are WebSocket upgrades or
/// ask for `text/event-stream`; the request must carry the pod as
/// [`webpods_api_rest::PodHost`].
pub fn pod_router(state: LiveState) -> Router {
    Router::new().fallback(single::handle).with_state(state)
}

/// `GET /ws` on the main domain.
pub fn main_router(state: LiveState) -> Router {
    Router::new()
        .route("/ws", get(multiplex::handle))
        .with_state(state)
}

/// Whether a request asks for a live tail (WebSocket upgrade or SSE).
pub fn is_live_request(headers: &HeaderMap) -> bool {
    webpods_api_rest::is_live_request(headers)
}

// ----- frames -----------------------------------------------------------------------------------

#[derive(Serialize)]
struct RecordFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    /// The record's stream, on recursive subscriptions.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    record: &'a Record,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CaughtUpFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    next_index: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubscribedFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    head_index: i64,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    /// On a recursive subscription: the one stream that ended (the others go on).
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    error: ErrorBody,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serializing these frames cannot fail (string keys, no non-finite floats).
    serde_json::to_string(v).unwrap_or_default()
}

fn record_frame(id: Option<&str>, stream: Option<&str>, record: &Record) -> String {
    to_json(&RecordFrame {
        kind: "record",
        id,
        stream,
        record,
    })
}

fn caught_up_frame(id: Option<&str>, next_index: i64) -> String {
    to_json(&CaughtUpFrame {
        kind: "caughtUp",
        id,
        next_index,
    })
}

fn subscribed_frame(id: &str, head_index: i64) -> String {
    to_json(&SubscribedFrame {
        kind: "subscribed",
        id,
        head_index,
    })
}

fn error_body(e: &Error) -> ErrorBody {
    log_error(e);
    ErrorBody {
        code: e.kind().code(),
        message: e.public_message(),
        details: e.details().cloned(),
    }
}

fn error_frame(id: Option<&str>, e: &Error) -> String {
    stream_error_frame(id, None, e)
}

fn stream_error_frame(id: Option<&str>, stream: Option<&str>, e: &Error) -> String {
    to_json(&ErrorFrame {
        kind: "error",
        id,
        stream,
        error: error_body(e),
    })
}

fn log_error(e: &Error) {
    match e {
        Error::Internal(detail) => tracing::error!(error = %detail, "live tail failed"),
        Error::Unavailable(detail) => {
            tracing::warn!(error = %detail, "live tail: database unavailable")
        }
        Error::Rejected { .. } => {}
    }
}

/// The WebSocket close code of an error: 4008 for `TOO_SLOW`, else 4000 + its HTTP status.
fn close_code(e: &Error) -> u16 {
    match e.kind() {
        ErrorKind::TooSlow => 4008,
        ErrorKind::Internal => 1011,
        _ => {
            let status = ApiError(Error::new(e.kind(), String::new()))
                .into_response()
                .status()
                .as_u16();
            4000 + status.min(999)
        }
    }
}

type Sink = SplitSink<WebSocket, Message>;

/// What the socket writer does next.
enum Out {
    /// A text frame, from subscription `(id, generation)` (`None`: the connection itself).
    Text(Option<(String, u64)>, String),
    /// Close the socket with this code and reason.
    Close(u16, &'static str),
    /// Subscription `(id, generation)` ended by itself.
    Ended(String, u64),
}

/// Sends a frame, giving up after `send_timeout` (the client is not reading): `false` then.
async fn send_timed(sink: &mut Sink, msg: Message, cfg: &LiveConfig) -> bool {
    matches!(
        tokio::time::timeout(cfg.send_timeout, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

/// One ping tick: closes an idle connection (1000) or one that does not take the ping in time
/// (4008 `TOO_SLOW`). `false` once the socket is closed.
async fn keep_alive(sink: &mut Sink, last_seen: tokio::time::Instant, cfg: &LiveConfig) -> bool {
    if last_seen.elapsed() >= cfg.idle_timeout {
        close(sink, 1000, "idle timeout").await;
        return false;
    }
    if !send_timed(sink, Message::Ping(Default::default()), cfg).await {
        close_too_slow(sink, cfg).await;
        return false;
    }
    true
}

/// After a read error: a message over `max_message_bytes` is answered with close 1009
/// (RFC 6455 §7.4.1) before the socket goes; other errors end it as they are.
async fn close_after_read_error(sink: &mut Sink, e: axum::Error) {
    let too_big = e
        .into_inner()
        .downcast::<tokio_tungstenite::tungstenite::Error>()
        .is_ok_and(|e| matches!(*e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
    if too_big {
        close(sink, 1009, "message too big").await;
    }
}

/// Closes the socket with a code (best effort, bounded in time).
async fn close(sink: &mut Sink, code: u16, reason: &'static str) {
    close_within(sink, code, reason, Duration::from_secs(2)).await;
}

/// Closes a socket whose client stopped taking frames with 4008 `TOO_SLOW`. Frames already
/// written stay ahead of the close frame; a paused client that resumes within `send_timeout`
/// still reads them and then the close code, so it knows to reconnect with `after`.
async fn close_too_slow(sink: &mut Sink, cfg: &LiveConfig) {
    close_within(sink, 4008, "TOO_SLOW", cfg.send_timeout).await;
}

async fn close_within(sink: &mut Sink, code: u16, reason: &'static str, within: Duration) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(within, async {
        let _ = sink.send(frame).await;
        let _ = sink.flush().await;
    })
    .await;
}

/// A subscription as a source of frames.
trait Tail: Send {
    /// The next frame for subscription `id`, or how the subscription ended.
    fn next_frame(
        &mut self,
        id: Option<&str>,
    ) -> impl Future<Output = Result<String, LiveEnd>> + Send;
}

impl Tail for Subscription {
    async fn next_frame(&mut self, id: Option<&str>) -> Result<String, LiveEnd> {
        Ok(match self.next().await? {
            LiveEvent::Record(r) => record_frame(id, None, &r),
            LiveEvent::CaughtUp { next_index } => caught_up_frame(id, next_index),
        })
    }
}

/// Records name their stream; one stream ending is an `error` frame naming it, and the
/// subscription goes on.
impl Tail for RecursiveSubscription {
    async fn next_frame(&mut self, id: Option<&str>) -> Result<String, LiveEnd> {
        Ok(match self.next().await? {
            RecursiveEvent::Record(r) => record_frame(id, Some(&r.stream_path), &r),
            RecursiveEvent::CaughtUp { next_index } => caught_up_frame(id, next_index),
            RecursiveEvent::StreamEnded { path, error } => {
                stream_error_frame(id, Some(&path), &error)
            }
        })
    }
}

/// Moves a subscription's events to the socket writer until it ends or the writer is gone.
/// `close_on_error`: an error ends the connection (single-stream sockets); otherwise only the
/// subscription ends, except `TOO_SLOW`, which means the whole socket is not keeping up.
async fn pump<T: Tail>(
    mut sub: T,
    tag: Option<(String, u64)>,
    tx: mpsc::Sender<Out>,
    close_on_error: bool,
) {
    let id = tag.as_ref().map(|(i, _)| i.clone());
    let id = id.as_deref();
    loop {
        let out = match sub.next_frame(id).await {
            Ok(frame) => Out::Text(tag.clone(), frame),
            Err(LiveEnd::Shutdown) => {
                // A single-stream socket closes now; a multiplexed one once all its
                // subscriptions have delivered what they held.
                let last = match tag {
                    Some((i, g)) => Out::Ended(i, g),
                    None => Out::Close(1001, "server shutting down"),
                };
                let _ = tx.send(last).await;
                return;
            }
            Err(LiveEnd::Error(e)) => {
                let _ = tx.send(Out::Text(tag.clone(), error_frame(id, &e))).await;
                let last = match tag {
                    Some(_) if e.kind() == ErrorKind::TooSlow => {
                        Out::Close(close_code(&e), e.kind().code())
                    }
                    _ if close_on_error => Out::Close(close_code(&e), e.kind().code()),
                    Some((i, g)) => Out::Ended(i, g),
                    None => Out::Close(close_code(&e), e.kind().code()),
                };
                let _ = tx.send(last).await;
                return;
            }
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

/// The token of a request, its caller and its expiry.
fn authenticate(
    engine: &Engine,
    token: Option<&str>,
) -> Result<(webpods_engine::Caller, Option<i64>), Error> {
    let caller = engine.authenticate(token)?;
    let expiry = token.and_then(|t| engine.token_expiry(t));
    Ok((caller, expiry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&Error::new(ErrorKind::TooSlow, "")), 4008);
        assert_eq!(close_code(&Error::new(ErrorKind::Forbidden, "")), 4403);
        assert_eq!(close_code(&Error::new(ErrorKind::ForkDetected, "")), 4409);
        assert_eq!(close_code(&Error::new(ErrorKind::Unauthorized, "")), 4401);
    }
}
