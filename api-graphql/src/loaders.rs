//! Batch loaders, so nested lists cost a constant number of statements (no N+1): the stream
//! lists of many pods, the head record of many streams, and many users (record authors, pod
//! owners), each in one or two statements per request "tick". They do not cache: a loader lives as long as a request or a WebSocket
//! connection, and a subscription must never see a stale head.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_graphql::dataloader::{DataLoader, Loader};
use webpods_engine::{Caller, Engine, Error, Record, StreamInfo, UserInfo};

/// `(stream id, stream path)` → the stream's head record (absent for empty streams).
pub(crate) struct HeadLoader {
    pub engine: Engine,
}

pub(crate) type StreamKey = (i64, String);

impl Loader<StreamKey> for HeadLoader {
    type Value = Record;
    type Error = Error;

    async fn load(&self, keys: &[StreamKey]) -> Result<HashMap<StreamKey, Record>, Error> {
        let by_id = self.engine.head_records(keys).await?;
        Ok(keys
            .iter()
            .filter_map(|k| by_id.get(&k.0).map(|r| (k.clone(), r.clone())))
            .collect())
    }
}

/// Pod name → every stream of the pod the caller may read (ordered by path, with record
/// counts). Nested listings (`myPods { streams { children } }`) filter this in memory, so
/// they cost two statements per tick whatever their width.
pub(crate) struct StreamListLoader {
    pub engine: Engine,
    pub caller: Caller,
}

pub(crate) type StreamList = Arc<Vec<(StreamInfo, i64)>>;

impl Loader<String> for StreamListLoader {
    type Value = StreamList;
    type Error = Error;

    async fn load(&self, keys: &[String]) -> Result<HashMap<String, StreamList>, Error> {
        Ok(self
            .engine
            .readable_streams_of(&self.caller, keys)
            .await?
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect())
    }
}

/// User id → the user as the caller may see them.
pub(crate) struct UserLoader {
    pub engine: Engine,
    pub caller: Caller,
}

impl Loader<String> for UserLoader {
    type Value = UserInfo;
    type Error = Error;

    async fn load(&self, keys: &[String]) -> Result<HashMap<String, UserInfo>, Error> {
        Ok(self
            .engine
            .users(&self.caller, keys)
            .await?
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect())
    }
}

/// A caller and when their token expires.
pub(crate) struct Authenticated {
    pub caller: Caller,
    pub token_expires_at: Option<i64>,
}

impl Authenticated {
    /// Authenticates a token (none = anonymous) as REST does.
    pub fn new(engine: &Engine, token: Option<&str>) -> Result<Authenticated, Error> {
        Ok(Authenticated {
            caller: engine.authenticate(token)?,
            token_expires_at: token.and_then(|t| engine.token_expiry(t)),
        })
    }
}

/// What every resolver of one request (or one WebSocket connection) shares.
pub(crate) struct RequestCtx {
    pub caller: Caller,
    /// Who rate limits count against: the user id, else `ip:<address>` (as REST).
    pub rate_key: String,
    /// Expiry of the caller's token (epoch seconds): live subscriptions end then.
    pub token_expires_at: Option<i64>,
    pub heads: DataLoader<HeadLoader>,
    pub users: DataLoader<UserLoader>,
    pub streams: DataLoader<StreamListLoader>,
    /// Live subscriptions of the connection (see [`SubscriptionSlot`]).
    pub subscriptions: Arc<AtomicUsize>,
    /// The rate-limit state the request's fields met, for the HTTP response's headers.
    pub rate: Arc<std::sync::Mutex<Option<RateSeen>>>,
}

/// One rate-limit bucket as a request's fields left it (SPEC §9): the headers of `POST
/// /graphql`. A refusal wins over a count, and of two counts the one with less left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateSeen {
    pub limit: u64,
    pub remaining: u64,
    pub reset: i64,
    /// Set when a field was refused: seconds until one more request fits.
    pub retry_after: Option<i64>,
}

impl RequestCtx {
    /// Notes what one field's rate-limit decision left.
    pub fn saw_rate(&self, seen: RateSeen) {
        let mut slot = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let keep_old = slot.is_some_and(|old| {
            (old.retry_after.is_some() && seen.retry_after.is_none())
                || (old.retry_after.is_some() == seen.retry_after.is_some()
                    && old.remaining < seen.remaining)
        });
        if !keep_old {
            *slot = Some(seen);
        }
    }

    /// The request counted last gave its count back (a refused pod creation).
    pub fn gave_back_one(&self) {
        let mut slot = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_mut().filter(|s| s.retry_after.is_none()) {
            s.remaining = (s.remaining + 1).min(s.limit);
        }
    }
}

/// One of a connection's limited subscription slots, freed when the subscription ends.
pub(crate) struct SubscriptionSlot(Arc<AtomicUsize>);

impl SubscriptionSlot {
    /// Takes a slot unless `max` are in use.
    pub fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<SubscriptionSlot> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SubscriptionSlot(counter.clone()))
    }
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RequestCtx {
    pub fn new(engine: &Engine, auth: Authenticated, client_ip: Option<IpAddr>) -> RequestCtx {
        let Authenticated {
            caller,
            token_expires_at,
        } = auth;
        let rate_key = match (caller.user_id(), client_ip) {
            (Some(u), _) => u.to_string(),
            (None, Some(ip)) => format!("ip:{ip}"),
            (None, None) => "ip:unknown".to_string(),
        };
        RequestCtx {
            rate_key,
            token_expires_at,
            heads: DataLoader::new(
                HeadLoader {
                    engine: engine.clone(),
                },
                tokio::spawn,
            ),
            users: DataLoader::new(
                UserLoader {
                    engine: engine.clone(),
                    caller: caller.clone(),
                },
                tokio::spawn,
            ),
            streams: DataLoader::new(
                StreamListLoader {
                    engine: engine.clone(),
                    caller: caller.clone(),
                },
                tokio::spawn,
            ),
            caller,
            subscriptions: Arc::new(AtomicUsize::new(0)),
            rate: Arc::default(),
        }
    }
}
