//! HTTP and WebSocket transport of the schema.
//!
//! - `POST /graphql`: a JSON GraphQL request (`Content-Type: application/json` is required, so
//!   a cross-site form or `text/plain` fetch cannot run mutations with the `token` cookie).
//!   The body is read with a size limit. The token comes from the `token` cookie or the
//!   `Authorization` header, as in REST; a bad token fails the request with its code.
//! - `GET /graphql`: GraphiQL.
//! - `GET /graphql/ws`: `graphql-transport-ws` (and the legacy `graphql-ws`). The token comes
//!   from the upgrade's `Authorization` header or `token` cookie (the cookie only when the
//!   page's `Origin` is the main domain), or from the `connection_init` payload
//!   `{"Authorization": "Bearer <token>"}`, which wins.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, GraphiQLSource};
use async_graphql::{Data, Executor, Request, Response};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message};
use axum::extract::{ConnectInfo, FromRequestParts, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use webpods_api_rest::{ApiError, token_of};
use webpods_engine::clock::now_ms;
use webpods_engine::{CLOSE_GRACE, Engine, Error, ErrorKind};

use crate::error::{add_codes, gql};
use crate::loaders::{Authenticated, RequestCtx};
use crate::{GraphqlConfig, WebPodsSchema};

#[derive(Clone)]
struct GqlState {
    executor: Coded,
    engine: Engine,
    config: Arc<GraphqlConfig>,
}

/// The schema, with codes added to every error it reports (also on subscriptions).
#[derive(Clone)]
struct Coded(WebPodsSchema);

impl Executor for Coded {
    async fn execute(&self, request: Request) -> Response {
        add_codes(self.0.execute(request).await)
    }

    /// Every operation on a WebSocket (query, mutation or subscription). The caller was
    /// authenticated when the socket opened, so the token's expiry is checked here, per
    /// operation: an expired token fails with `TOKEN_EXPIRED`, as it does over HTTP.
    fn execute_stream(
        &self,
        request: Request,
        session_data: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        let expires_at = session_data
            .as_deref()
            .and_then(|d| d.get(&std::any::TypeId::of::<RequestCtx>()))
            .and_then(|rc| rc.downcast_ref::<RequestCtx>())
            .and_then(|rc| rc.token_expires_at);
        if expires_at.is_some_and(|exp| exp <= now_ms() / 1000) {
            let expired = Error::new(ErrorKind::TokenExpired, "the token has expired");
            return refused(gql(expired));
        }
        if let Some(n) = subscription_root_fields(&request.query).filter(|n| *n != 1) {
            return refused(crate::error::coded(
                crate::error::VALIDATION_FAILED,
                format!("a subscription selects exactly one root field, not {n}"),
            ));
        }
        self.0
            .execute_stream_with_session_data(request, session_data.unwrap_or_default())
            .map(add_codes)
            .boxed()
    }
}

/// An operation refused before it ran: one response carrying `error`.
fn refused(error: async_graphql::Error) -> BoxStream<'static, Response> {
    let mut server_error = async_graphql::ServerError::new(error.message, None);
    server_error.extensions = error.extensions;
    futures::stream::once(async move { Response::from_errors(vec![server_error]) }).boxed()
}

/// The most root fields a subscription operation of `query` selects (fragments expanded), if
/// it has a subscription; the GraphQL spec allows exactly one ("Single root field"), and
/// async-graphql does not check it: two would each yield `data: null`.
fn subscription_root_fields(query: &str) -> Option<usize> {
    use async_graphql::parser::types::{OperationType, Selection, SelectionSet};
    fn count(
        set: &SelectionSet,
        doc: &async_graphql::parser::types::ExecutableDocument,
        depth: usize,
    ) -> usize {
        if depth > 16 {
            return 0; // a fragment cycle, which validation reports
        }
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(_) => 1,
                Selection::InlineFragment(f) => count(&f.node.selection_set.node, doc, depth + 1),
                Selection::FragmentSpread(s) => doc
                    .fragments
                    .get(&s.node.fragment_name.node)
                    .map_or(0, |f| count(&f.node.selection_set.node, doc, depth + 1)),
            })
            .sum()
    }
    let doc = async_graphql::parser::parse_query(query).ok()?;
    doc.operations
        .iter()
        .filter(|(_, op)| op.node.ty == OperationType::Subscription)
        .map(|(_, op)| count(&op.node.selection_set.node, &doc, 0))
        .max()
}

pub(crate) fn router(schema: WebPodsSchema, engine: Engine, config: GraphqlConfig) -> Router {
    let state = GqlState {
        executor: Coded(schema),
        engine,
        config: Arc::new(config),
    };
    Router::new()
        .route("/graphql", get(graphiql).post(post_graphql))
        .route("/graphql/ws", get(websocket))
        .with_state(state)
}

/// GraphiQL (SPEC §7), talking to this server's endpoints.
async fn graphiql() -> impl IntoResponse {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("WebPods GraphiQL")
            .finish(),
    )
}

/// A response carrying only request-level errors (`data: null`).
fn error_response(status: StatusCode, err: async_graphql::Error) -> axum::response::Response {
    let mut err = err.into_server_error(Default::default());
    // Not tied to a place in a query: no `locations` (they are 1-based; 0:0 is no place).
    err.locations.clear();
    let resp = Response::from_errors(vec![err]);
    (status, Json(resp)).into_response()
}

/// The client's address, when the server records it (`ConnectInfo`).
struct ClientIp(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| a.ip()),
        ))
    }
}

async fn post_graphql(
    State(st): State<GqlState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> axum::response::Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            crate::error::invalid("send the GraphQL request as Content-Type: application/json"),
        );
    }
    let limit = st.config.max_body_bytes;
    let bytes: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                crate::error::coded(
                    ErrorKind::ContentTooLarge.code(),
                    format!("the request exceeds {limit} bytes"),
                ),
            );
        }
    };
    let request: Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                crate::error::invalid(
                    "expected a JSON GraphQL request {\"query\", \"variables\"?, \"operationName\"?}",
                ),
            );
        }
    };
    let auth = match Authenticated::new(&st.engine, token_of(&headers, false).as_deref()) {
        Ok(a) => a,
        Err(e) => return error_response(StatusCode::UNAUTHORIZED, gql(e)),
    };
    let ctx = RequestCtx::new(&st.engine, auth, ip);
    let rate = ctx.rate.clone();
    let resp = st.executor.execute(request.data(ctx)).await;
    let seen = *rate.lock().unwrap_or_else(|p| p.into_inner());
    // Refused by a rate limit with nothing else answered: 429, as REST (SPEC §9).
    let refused = seen.is_some_and(|s| s.retry_after.is_some()) && !has_data(&resp.data);
    let mut out = Json(resp).into_response();
    if refused {
        *out.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    }
    let h = out.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(s) = seen {
        webpods_api_rest::rate_headers(h, s.limit, s.remaining, s.reset);
        if let Some(secs) = s.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
    out
}

/// Whether a response answered any root field (with something other than `null`).
fn has_data(data: &async_graphql::Value) -> bool {
    match data {
        async_graphql::Value::Object(fields) => fields
            .values()
            .any(|v| !matches!(v, async_graphql::Value::Null)),
        async_graphql::Value::Null => false,
        _ => true,
    }
}

async fn websocket(
    State(st): State<GqlState>,
    ClientIp(ip): ClientIp,
    protocol: Result<GraphQLProtocol, axum::http::StatusCode>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    headers: HeaderMap,
) -> axum::response::Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return webpods_api_rest::upgrade_refused(rejection.body_text()),
    };
    let Ok(protocol) = protocol else {
        return webpods_api_rest::upgrade_refused(
            "Sec-WebSocket-Protocol must be graphql-transport-ws or graphql-ws",
        );
    };
    // A pod's pages are same-site with the main domain: `token_of` lets the cookie count only
    // for pages of this host.
    let token = token_of(&headers, false);
    let auth = match Authenticated::new(&st.engine, token.as_deref()) {
        Ok(a) => a,
        Err(e) => return ApiError(e).into_response(),
    };
    let mut data = Data::default();
    data.insert(RequestCtx::new(&st.engine, auth, ip));
    let engine = st.engine.clone();
    let executor = st.executor.clone();
    let transport_ws = chosen_protocol(&headers) == Some("graphql-transport-ws");
    let init_timeout = st.config.init_timeout;
    let conn = TransportWs::default();
    let refused = conn.clone();
    // A message carries at most what an HTTP request may (a mutation carries content).
    let max_message = st.config.max_body_bytes;
    upgrade
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let _open = engine.live_connection();
            // When the server starts shutting down, each subscription delivers what it still
            // holds and completes; then (or after a grace) the socket's input ends, the
            // protocol stops, and the writer closes the socket with 1001 (SPEC §10).
            let (mut sink, input) = socket.split();
            let closing = Arc::new(AtomicBool::new(false));
            let mut shutdown = engine.live_shutdown();
            let flag = closing.clone();
            let incoming = conn.clone();
            let running = conn.clone();
            let waiting = conn.clone();
            let input = input
                .take_until(async move {
                    shutdown.wait().await;
                    let _ = tokio::time::timeout(CLOSE_GRACE, running.until_idle()).await;
                    flag.store(true, Ordering::SeqCst);
                })
                // A socket that never sends `connection_init` is closed (4408), so that
                // unauthenticated sockets cannot be held open by pongs alone.
                .take_until(async move {
                    tokio::time::sleep(init_timeout).await;
                    if !waiting.init_timed_out() {
                        std::future::pending::<()>().await;
                    }
                })
                .take_while(move |m| {
                    let go_on = match m {
                        Ok(Message::Text(t)) => incoming.client_sent(t, transport_ws),
                        Ok(_) => true,
                        // A message over the limit is answered with close 1009 (RFC 6455
                        // §7.4.1); any read error ends the input.
                        Err(e) => {
                            incoming.read_failed(e);
                            false
                        }
                    };
                    futures::future::ready(go_on)
                });
            let (tx, mut rx) = futures::channel::mpsc::channel::<Message>(16);
            let stopping = engine.clone();
            let writer = async move {
                while let Some(mut m) = rx.next().await {
                    let completes = matches!(&m, Message::Text(t) if is_complete(t));
                    if transport_ws {
                        m = conn.server_sent(m);
                    }
                    // A subscription ended by the shutdown is not complete: the socket closes
                    // with 1001 instead, and clients resubscribe elsewhere (a `complete` tells
                    // them the subscription is over and they would not).
                    if completes && stopping.is_draining() {
                        continue;
                    }
                    if sink.send(m).await.is_err() {
                        return;
                    }
                }
                let last = if closing.load(Ordering::SeqCst) {
                    Some(close_frame(1001, "server shutting down".into()))
                } else {
                    conn.protocol_close()
                };
                if let Some(frame) = last {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                let _ = sink.close().await;
            };
            let protocol_side = GraphQLWebSocket::new_with_pair(tx, input, executor, protocol)
                .with_data(data)
                .on_connection_init(move |payload| async move {
                    connection_init(&engine, &payload, ip).map_err(|e| {
                        refused.init_refused(&e);
                        gql(e)
                    })
                })
                .serve();
            futures::join!(protocol_side, writer);
        })
}

/// What async-graphql leaves out of `graphql-transport-ws`, kept per connection: its closes
/// carry generic codes, and a second `subscribe` under a running id silently replaces the
/// first. The protocol's own codes: 4403 for a refused `connection_init` (the reason carries
/// our error code), 4400 for a message that is not a valid protocol message, 4401 for a
/// subscription before the connection was acknowledged, 4409 for a reused running id (a
/// `subscribe` adds its id, a `complete` from either side removes it), 4408 for a socket
/// that sent no `connection_init` in time.
#[derive(Clone, Default)]
struct TransportWs(Arc<std::sync::Mutex<TransportState>>);

#[derive(Default)]
struct TransportState {
    running: HashSet<String>,
    /// A running id the client subscribed under again.
    reused: Option<String>,
    /// Why `connection_init` was refused (`CODE: message`).
    init_refused: Option<String>,
    /// The client sent `connection_init`.
    initialised: bool,
    /// The client sent no `connection_init` within the timeout.
    init_timed_out: bool,
    /// The client sent a message over the size limit.
    too_big: bool,
}

/// The part of a protocol message that names it.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
}

impl TransportWs {
    fn state(&self) -> std::sync::MutexGuard<'_, TransportState> {
        // Each update is a single insert or assignment: a poisoned state is still valid.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once no operation runs on the connection (every subscription completed; on
    /// the legacy `graphql-ws` protocol, which is not tracked, at once). Polled: it runs only
    /// during a shutdown.
    async fn until_idle(&self) {
        while !self.state().running.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A client message; false when it reuses a running id (the input then ends). Running
    /// ids are tracked on `graphql-transport-ws` only.
    fn client_sent(&self, text: &str, transport_ws: bool) -> bool {
        let Ok(Envelope { kind, id }) = serde_json::from_str::<Envelope>(text) else {
            return true;
        };
        let mut state = self.state();
        if kind == "connection_init" {
            state.initialised = true;
        }
        let (true, Some(id)) = (transport_ws, id) else {
            return true;
        };
        match kind.as_str() {
            "subscribe" if !state.running.insert(id.clone()) => {
                state.reused = Some(id);
                false
            }
            "complete" => {
                state.running.remove(&id);
                true
            }
            _ => true,
        }
    }

    fn init_refused(&self, e: &webpods_engine::Error) {
        self.state().init_refused = Some(format!("{}: {}", e.kind().code(), e.public_message()));
    }

    /// A server message on its way out: a `complete` ends a subscription (checked by prefix
    /// first, so record payloads are not parsed); a close gets the protocol's code.
    fn server_sent(&self, m: Message) -> Message {
        match &m {
            Message::Text(t) if is_complete(t) => {
                if let Ok(Envelope { id: Some(id), .. }) = serde_json::from_str::<Envelope>(t) {
                    self.state().running.remove(&id);
                }
                m
            }
            Message::Close(Some(frame)) => {
                let (code, reason) = match (frame.code, self.state().init_refused.clone()) {
                    (1002, Some(refused)) => (4403, refused),
                    (1002, None) => (4400, frame.reason.to_string()),
                    (1011, _) if frame.reason.as_str() == "The handshake is not completed." => {
                        (4401, "Unauthorized".to_string())
                    }
                    _ => return m,
                };
                Message::Close(Some(close_frame(code, reason)))
            }
            _ => m,
        }
    }

    /// The client's socket failed: remembered when it was a message over the size limit.
    fn read_failed(&self, e: &axum::Error) {
        let too_big = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<tokio_tungstenite::tungstenite::Error>())
            .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
        if too_big {
            self.state().too_big = true;
        }
    }

    /// Called when the `connection_init` timeout passes: true (and the socket is to close
    /// with 4408) unless the client sent `connection_init`.
    fn init_timed_out(&self) -> bool {
        let mut state = self.state();
        state.init_timed_out = !state.initialised;
        state.init_timed_out
    }

    /// The close for a client that broke the protocol (reused a running id, or sent no
    /// `connection_init` in time), if it did.
    fn protocol_close(&self) -> Option<CloseFrame> {
        let state = self.state();
        if state.too_big {
            return Some(close_frame(1009, "message too big".into()));
        }
        if state.init_timed_out {
            return Some(close_frame(
                4408,
                "Connection initialisation timeout".into(),
            ));
        }
        let id = state.reused.clone()?;
        Some(close_frame(
            4409,
            format!("Subscriber for {id} already exists"),
        ))
    }
}

/// Whether a server message is a `complete` (by prefix, so record payloads are not parsed).
fn is_complete(text: &str) -> bool {
    text.starts_with(r#"{"type":"complete""#)
}

/// A close frame; the reason is cut to the 123 bytes a close frame holds.
fn close_frame(code: u16, reason: String) -> CloseFrame {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].into(),
    }
}

/// The subprotocol the upgrade settles on: the client's first that the server speaks (as
/// `GraphQLProtocol` picks it).
fn chosen_protocol(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)?
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .find(|p| matches!(*p, "graphql-transport-ws" | "graphql-ws"))
}

/// `connection_init` with `{"Authorization": "Bearer <token>"}` replaces the caller of the
/// upgrade; without it the upgrade's caller stays. A bad token closes the connection (4403).
fn connection_init(
    engine: &Engine,
    payload: &serde_json::Value,
    ip: Option<IpAddr>,
) -> Result<Data, webpods_engine::Error> {
    let auth = payload
        .as_object()
        .and_then(|o| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v)
        })
        .and_then(|v| v.as_str());
    let mut data = Data::default();
    let Some(auth) = auth else {
        return Ok(data);
    };
    let mut h = HeaderMap::new();
    let value = HeaderValue::from_str(auth).map_err(|_| {
        webpods_engine::Error::new(
            ErrorKind::InvalidToken,
            "the Authorization value is not a header value",
        )
    })?;
    h.insert(header::AUTHORIZATION, value);
    let token = token_of(&h, false);
    let auth = Authenticated::new(engine, token.as_deref())?;
    data.insert(RequestCtx::new(engine, auth, ip));
    Ok(data)
}
