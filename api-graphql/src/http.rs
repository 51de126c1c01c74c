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
use webpods_api_rest::{ApiError, HostKind, token_of};
use webpods_engine::{Engine, ErrorKind};

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

    fn execute_stream(
        &self,
        request: Request,
        session_data: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        self.0
            .execute_stream_with_session_data(request, session_data.unwrap_or_default())
            .map(add_codes)
            .boxed()
    }
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
    let request = request.data(RequestCtx::new(&st.engine, auth, ip));
    let resp = st.executor.execute(request).await;
    let mut out = Json(resp).into_response();
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    out
}

/// Whether the upgrade's `Origin` (if any) is a page of the main domain.
fn same_origin(headers: &HeaderMap, config: &GraphqlConfig) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true; // not a browser page
    };
    let host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    config.main_host.classify(Some(host)) == HostKind::Main
}

async fn websocket(
    State(st): State<GqlState>,
    ClientIp(ip): ClientIp,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
    headers: HeaderMap,
) -> axum::response::Response {
    // A pod's pages are same-site with the main domain: never let them ride the cookie.
    let token = if same_origin(&headers, &st.config) {
        token_of(&headers, false)
    } else {
        bearer_only(&headers)
    };
    let auth = match Authenticated::new(&st.engine, token.as_deref()) {
        Ok(a) => a,
        Err(e) => return ApiError(e).into_response(),
    };
    let mut data = Data::default();
    data.insert(RequestCtx::new(&st.engine, auth, ip));
    let engine = st.engine.clone();
    let executor = st.executor.clone();
    let transport_ws = chosen_protocol(&headers) == Some("graphql-transport-ws");
    // Why `connection_init` was refused (`CODE: message`), for the close frame.
    let init_refused: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let refused = init_refused.clone();
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            // The socket's input ends when the server starts shutting down; the protocol then
            // stops, and the writer closes the socket with 1001 (SPEC §10).
            let (mut sink, input) = socket.split();
            let closing = Arc::new(AtomicBool::new(false));
            let mut shutdown = engine.live_shutdown();
            let flag = closing.clone();
            let ids = SubscriptionIds::default();
            let incoming = ids.clone();
            let input = input
                .take_until(async move {
                    shutdown.wait().await;
                    flag.store(true, Ordering::SeqCst);
                })
                .take_while(move |m| {
                    let go_on = match m {
                        Ok(Message::Text(t)) if transport_ws => incoming.client_sent(t),
                        _ => true,
                    };
                    futures::future::ready(go_on)
                });
            let (tx, mut rx) = futures::channel::mpsc::channel::<Message>(16);
            let writer = async move {
                while let Some(mut m) = rx.next().await {
                    if let (true, Message::Text(t)) = (transport_ws, &m) {
                        ids.server_sent(t);
                    }
                    if transport_ws {
                        let refused = init_refused.lock().map(|r| r.clone()).unwrap_or_default();
                        m = transport_ws_close(m, refused);
                    }
                    if sink.send(m).await.is_err() {
                        return;
                    }
                }
                if closing.load(Ordering::SeqCst) {
                    let frame = CloseFrame {
                        code: 1001,
                        reason: "server shutting down".into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                } else if let Some(id) = ids.duplicate() {
                    let frame = CloseFrame {
                        code: 4409,
                        reason: format!("Subscriber for {id} already exists").into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                let _ = sink.close().await;
            };
            let protocol_side = GraphQLWebSocket::new_with_pair(tx, input, executor, protocol)
                .with_data(data)
                .on_connection_init(move |payload| async move {
                    connection_init(&engine, &payload, ip).map_err(|e| {
                        if let Ok(mut r) = refused.lock() {
                            *r = Some(format!("{}: {}", e.kind().code(), e.public_message()));
                        }
                        gql(e)
                    })
                })
                .serve();
            futures::join!(protocol_side, writer);
        })
}

/// The ids of a `graphql-transport-ws` connection's running subscriptions. async-graphql lets
/// a second `subscribe` with a running id replace the first; the protocol closes the
/// connection with 4409 instead, which this tracks: a `subscribe` adds its id, a `complete`
/// from either side removes it.
#[derive(Clone, Default)]
struct SubscriptionIds(Arc<std::sync::Mutex<(HashSet<String>, Option<String>)>>);

/// The part of a protocol message that names it.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
}

impl SubscriptionIds {
    /// A client message; false when it reuses a running id (the input then ends).
    fn client_sent(&self, text: &str) -> bool {
        let Ok(Envelope { kind, id: Some(id) }) = serde_json::from_str::<Envelope>(text) else {
            return true;
        };
        let Ok(mut state) = self.0.lock() else {
            return true;
        };
        match kind.as_str() {
            "subscribe" if !state.0.insert(id.clone()) => {
                state.1 = Some(id);
                false
            }
            "complete" => {
                state.0.remove(&id);
                true
            }
            _ => true,
        }
    }

    /// A server message: `complete` ends a subscription (checked by prefix first, so record
    /// payloads are not parsed).
    fn server_sent(&self, text: &str) {
        if !text.starts_with(r#"{"type":"complete""#) {
            return;
        }
        if let (Ok(Envelope { id: Some(id), .. }), Ok(mut state)) =
            (serde_json::from_str::<Envelope>(text), self.0.lock())
        {
            state.0.remove(&id);
        }
    }

    /// The id a client reused, if it did.
    fn duplicate(&self) -> Option<String> {
        self.0.lock().ok().and_then(|s| s.1.clone())
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

/// async-graphql closes `graphql-transport-ws` connections with generic codes; the protocol
/// names its own: 4403 for a refused `connection_init` (the reason carries our error code),
/// 4400 for a message that is not a valid protocol message, 4401 for a subscription before
/// the connection was acknowledged.
fn transport_ws_close(m: Message, init_refused: Option<String>) -> Message {
    let Message::Close(Some(frame)) = &m else {
        return m;
    };
    let (code, reason) = match (frame.code, init_refused) {
        (1002, Some(refused)) => (4403, refused),
        (1002, None) => (4400, frame.reason.to_string()),
        (1011, _) if frame.reason.as_str() == "The handshake is not completed." => {
            (4401, "Unauthorized".to_string())
        }
        _ => return m,
    };
    // A close reason holds at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

/// The `Authorization` header only (no cookie).
fn bearer_only(headers: &HeaderMap) -> Option<String> {
    let mut only = HeaderMap::new();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        only.insert(header::AUTHORIZATION, v.clone());
    }
    token_of(&only, false)
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
