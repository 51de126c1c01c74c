//! `GET /ws` on the main domain (SPEC §6.2): many subscriptions on one socket.
//!
//! Client → server: `{"type":"auth","token":…}`, `{"type":"subscribe","id","pod","stream",
//! "after"?,"afterHash"?,"recursive"?,"afterPaths"?}`, `{"type":"unsubscribe","id"}`. Server →
//! client: `subscribed`, `record`, `caughtUp` and `error`, tagged with the subscription's `id`
//! (an `error` without `id` is about the connection or a message that could not be read).
//!
//! An `auth` message sets the identity of the subscriptions made after it; each running one
//! keeps the identity it was opened with, and its permission is re-checked as that identity's
//! changes. A refused `auth` is an `error` frame and leaves the identity as it was.
//!
//! ## Recursive subscriptions
//! `"recursive": true` follows the stream and every descendant the caller may read, including
//! streams created later (engine: [`webpods_engine::RecursiveSubscription`], which documents the
//! semantics). On the wire:
//! - `subscribed.headIndex` is the root stream's head;
//! - `after` / `afterHash` apply to the root only; `afterPaths: {"<stream path>": K, …}` gives
//!   descendants their own `after` (to resume); other descendants start at their first record;
//! - each `record` frame also carries `"stream"`, the record's stream path; indices increase
//!   by one per stream;
//! - one `caughtUp` (the root's `nextIndex`) once every stream followed at subscribe time has
//!   delivered its history;
//! - an `error` frame **with** `"stream"` says that one stream stopped (read permission revoked,
//!   stream deleted) and the subscription goes on; an `error` without `"stream"` ends it.
//!
//! A recursive subscription counts as **one** toward `limits.max_subscriptions_per_connection`;
//! the streams it follows are bounded by `limits.max_recursive_streams` instead.
//!
//! Each subscription runs in its own task and hands frames to this connection's writer through
//! one bounded channel; frames of a subscription that was unsubscribed meanwhile are dropped
//! (subscriptions are told apart by a generation number, so reusing an id is safe).

use std::collections::HashMap;
use std::future::Future;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use webpods_api_rest::token_of;
use webpods_engine::{
    CLOSE_GRACE, Caller, Engine, Error, ErrorKind, LiveRequest, RecursiveRequest,
};

use crate::{
    LiveState, Out, Tail, authenticate, close, close_after_read_error, close_too_slow, error_frame,
    keep_alive, pump, send_timed, subscribed_frame,
};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum ClientMsg {
    Auth {
        token: String,
    },
    Subscribe {
        id: String,
        pod: String,
        #[serde(default)]
        stream: String,
        #[serde(default)]
        after: Option<i64>,
        #[serde(default, rename = "afterHash")]
        after_hash: Option<String>,
        #[serde(default)]
        recursive: bool,
        #[serde(default, rename = "afterPaths")]
        after_paths: Option<HashMap<String, i64>>,
    },
    Unsubscribe {
        id: String,
    },
}

pub(crate) async fn handle(
    State(st): State<LiveState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return webpods_api_rest::upgrade_refused(rejection.body_text()),
    };
    let auth = authenticate(&st.engine, token_of(&headers, false).as_deref());
    st.upgrade(ws)
        .on_upgrade(move |socket| run(st, socket, auth))
}

/// One connection's state, owned by its writer loop.
struct Conn {
    engine: Engine,
    caller: Caller,
    expiry: Option<i64>,
    max_subscriptions: usize,
    /// Subscription id → (generation, task).
    subs: HashMap<String, (u64, JoinHandle<()>)>,
    generation: u64,
    tx: mpsc::Sender<Out>,
}

async fn run(st: LiveState, socket: WebSocket, auth: Result<(Caller, Option<i64>), Error>) {
    let _open = st.engine.live_connection();
    let cfg = st.config.clone();
    let (mut sink, mut stream) = socket.split();
    // A bad token at upgrade (say, an expired cookie) is reported, and the connection stays
    // open as anonymous so that the client can still send an `auth` message.
    let (caller, expiry) = match auth {
        Ok(a) => a,
        Err(e) => {
            let frame = Message::Text(error_frame(None, &e).into());
            if !send_timed(&mut sink, frame, &cfg).await {
                return;
            }
            (Caller::Anonymous, None)
        }
    };
    let (tx, mut rx) = mpsc::channel::<Out>(64);
    let mut conn = Conn {
        engine: st.engine.clone(),
        caller,
        expiry,
        max_subscriptions: cfg.max_subscriptions_per_connection,
        subs: HashMap::new(),
        generation: 0,
        tx,
    };
    // At shutdown each subscription delivers what it still holds and ends; the socket closes
    // with 1001 once none is left, or after the grace.
    let mut shutdown = st.engine.live_shutdown();
    let mut shutting_down = false;
    let grace = st.engine.live_shutdown().wait_then(CLOSE_GRACE);
    tokio::pin!(grace);
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    let mut last_seen = Instant::now();
    loop {
        if shutting_down && conn.subs.is_empty() {
            close(&mut sink, 1001, "server shutting down").await;
            break;
        }
        tokio::select! {
            biased;
            () = &mut grace => {
                close(&mut sink, 1001, "server shutting down").await;
                break;
            }
            () = shutdown.wait(), if !shutting_down => shutting_down = true,
            out = rx.recv() => match out {
                Some(Out::Text(tag, text)) => {
                    let current = tag.as_ref().is_none_or(|(id, g)| {
                        conn.subs.get(id).is_some_and(|(cur, _)| cur == g)
                    });
                    if current && !send_timed(&mut sink, Message::Text(text.into()), &cfg).await {
                        close_too_slow(&mut sink, &cfg).await;
                        break;
                    }
                }
                Some(Out::Close(code, reason)) => {
                    close(&mut sink, code, reason).await;
                    break;
                }
                Some(Out::Ended(id, g)) => {
                    if conn.subs.get(&id).is_some_and(|(cur, _)| *cur == g) {
                        conn.subs.remove(&id);
                    }
                }
                None => break,
            },
            msg = stream.next() => {
                last_seen = Instant::now();
                match msg {
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        close_after_read_error(&mut sink, e).await;
                        break;
                    }
                    Some(Ok(Message::Text(text))) => {
                        if let Some(reply) = conn.on_message(text.as_str())
                            && !send_timed(&mut sink, Message::Text(reply.into()), &cfg).await
                        {
                            close_too_slow(&mut sink, &cfg).await;
                            break;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let e = Error::new(ErrorKind::InvalidInput, "send JSON text frames");
                        let reply = Message::Text(error_frame(None, &e).into());
                        if !send_timed(&mut sink, reply, &cfg).await {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if !keep_alive(&mut sink, last_seen, &cfg).await {
                    break;
                }
            }
        }
    }
    for (_, (_, task)) in conn.subs.drain() {
        task.abort();
    }
}

impl Conn {
    /// Handles one client message; returns an immediate answer (an error) if there is one.
    fn on_message(&mut self, text: &str) -> Option<String> {
        let msg: ClientMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                // Tag the error with the message's id when it has a readable one.
                let id = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
                let err = Error::new(ErrorKind::InvalidInput, format!("bad message: {e}"));
                return Some(error_frame(id.as_deref(), &err));
            }
        };
        match msg {
            ClientMsg::Auth { token } => match authenticate(&self.engine, Some(&token)) {
                Ok((caller, expiry)) => {
                    self.caller = caller;
                    self.expiry = expiry;
                    None
                }
                Err(e) => Some(error_frame(None, &e)),
            },
            ClientMsg::Unsubscribe { id } => match self.subs.remove(&id) {
                Some((_, task)) => {
                    task.abort();
                    None
                }
                None => Some(error_frame(
                    Some(&id),
                    &Error::new(ErrorKind::NotFound, "no subscription with this id"),
                )),
            },
            ClientMsg::Subscribe {
                id,
                pod,
                stream,
                after,
                after_hash,
                recursive,
                after_paths,
            } => {
                let refuse = |msg: String| {
                    Some(error_frame(
                        Some(&id),
                        &Error::new(ErrorKind::InvalidInput, msg),
                    ))
                };
                if after_paths.is_some() && !recursive {
                    return refuse("afterPaths needs \"recursive\": true".into());
                }
                if self.subs.contains_key(&id) {
                    return refuse(format!("subscription id {id:?} is in use"));
                }
                if self.subs.len() >= self.max_subscriptions {
                    return refuse(format!(
                        "at most {} subscriptions per connection",
                        self.max_subscriptions
                    ));
                }
                self.generation += 1;
                let tag = (id.clone(), self.generation);
                let req = LiveRequest {
                    after,
                    after_hash,
                    token_expires_at: self.expiry,
                };
                let (engine, caller) = (self.engine.clone(), self.caller.clone());
                let stream = stream.trim_matches('/').to_string();
                let task = if recursive {
                    let after_paths = after_paths
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(p, k)| (p.trim_matches('/').to_string(), k))
                        .collect();
                    let req = RecursiveRequest {
                        live: req,
                        after_paths,
                    };
                    let open = async move {
                        let sub = engine
                            .subscribe_recursive(&caller, &pod, &stream, req)
                            .await?;
                        Ok((sub.head_index(), sub))
                    };
                    tokio::spawn(subscription(open, tag.clone(), self.tx.clone()))
                } else {
                    let open = async move {
                        let sub = engine.subscribe(&caller, &pod, &stream, req).await?;
                        Ok((sub.head_index(), sub))
                    };
                    tokio::spawn(subscription(open, tag.clone(), self.tx.clone()))
                };
                self.subs.insert(id, (tag.1, task));
                None
            }
        }
    }
}

/// Opens one subscription (`open` yields the root's head index and the subscription), answers
/// `subscribed`, and pumps it.
async fn subscription<T: Tail>(
    open: impl Future<Output = Result<(i64, T), Error>>,
    tag: (String, u64),
    tx: mpsc::Sender<Out>,
) {
    match open.await {
        Ok((head_index, sub)) => {
            let frame = subscribed_frame(&tag.0, head_index);
            if tx.send(Out::Text(Some(tag.clone()), frame)).await.is_ok() {
                pump(sub, Some(tag), tx, false).await;
            }
        }
        Err(e) => {
            let frame = error_frame(Some(&tag.0), &e);
            let _ = tx.send(Out::Text(Some(tag.clone()), frame)).await;
            let _ = tx.send(Out::Ended(tag.0, tag.1)).await;
        }
    }
}
