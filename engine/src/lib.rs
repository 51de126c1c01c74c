//! The WebPods engine: every rule of the product, behind one cloneable [`Engine`] handle.
//!
//! Frontends (REST, GraphQL, WebSocket) authenticate a token into a [`Caller`] and call the
//! engine; they never see storage or actor types. The engine owns:
//! - **appends**: one ractor actor per active stream (`actor`) serializes appends with group
//!   commit; a receipt exists only after its batch committed; idle actors stop;
//! - **the hash chain** ([`hash`]) exactly as SPEC §5.1, computed against the head the actor
//!   holds and committed only if the stored head is still that one (compare-and-swap, several
//!   streams per statement), else recomputed inside a transaction against the locked head — so
//!   several instances on one database never fork a chain;
//! - **permissions** (SPEC §8), decided here for every frontend alike;
//! - **reads**, which never go through the actors: from storage, or from memory
//!   (`read_cache`) for the latest record by name, records by index and list pages.
//!
//! Errors are one enum, [`Error`], whose [`ErrorKind`] frontends map to their transport.

mod actor;
mod auth;
mod batch;
pub mod clock;
mod error;
mod graph;
pub mod hash;
mod in_flight;
mod invalidation;
mod live;
mod manage;
pub mod metrics;
mod model;
pub mod names;
mod permissions;
mod pod_config;
mod ratelimit;
mod read_cache;
pub mod token;
mod verify;
mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;
use webpods_storage::{CreateStream, NewStream, PodRow, RecordRange, RecordRow, Store, StreamRow};

pub use actor::ActorLimits;
pub use auth::{
    AuthSettings, Login, MAX_EXPIRES_IN_SECS, Provider, ProviderConfig, SessionInfo, WhoAmI,
    is_local_path, parse_expiry, provider_list, public_session_id,
};
pub use error::{Error, ErrorKind, Result};
pub use graph::{PodInfo, UserInfo};
pub use in_flight::{InFlight, Running};
pub use live::{
    CLOSE_GRACE, LiveEnd, LiveEvent, LiveLimits, LiveRequest, LiveShutdown, RecursiveEvent,
    RecursiveRequest, RecursiveSubscription, Subscription,
};
pub use manage::{StreamListQuery, StreamListing, StreamSummary};
pub use model::*;
pub use pod_config::Routes;
pub use ratelimit::{Action, RateLimits, RateStatus};
pub use token::{Claims, Scope, TokenKeys};
pub use verify::Verification;

use crate::actor::{ActorEnv, Registry};
use crate::batch::{Entry, StreamCtx};
use crate::clock::{iso8601, now_ms};
use crate::metrics::CacheKind;
use crate::names::{check_record_name, check_stream_path, is_system_path, is_valid_pod_name};
use crate::read_cache::{PageKey, RecordKey};

/// The stream holding the pod owner, and the name of its records.
const OWNER_STREAM: &str = ".config/owner";
const OWNER_RECORD: &str = "owner";
/// `.config` streams written only through their own endpoints.
const ENDPOINT_STREAMS: [&str; 3] = [".config/owner", ".config/routing", ".config/domains"];
/// Most records one append (a batch request) may carry.
pub const MAX_APPEND_RECORDS: usize = 1000;

/// Engine settings, read once from configuration by the binary.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub actors: ActorLimits,
    /// Largest content of one record.
    pub max_record_bytes: usize,
    /// Largest page of a list read.
    pub max_list_records: i64,
    /// Custom record headers that may be stored (lowercase names).
    pub allowed_record_headers: Vec<String>,
    /// Safety-net lifetime of cached pods and streams.
    pub cache_ttl: Duration,
    /// Login providers and session settings (no providers = local mode).
    pub auth: AuthSettings,
    pub rate_limits: RateLimits,
    /// Live tails (SPEC §6).
    pub live: LiveLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            actors: ActorLimits {
                max_batch_records: 4096,
                max_batch_bytes: 16 * 1024 * 1024,
                idle_timeout: Duration::from_secs(30),
                max_alive: 10_000,
            },
            max_record_bytes: 10 * 1024 * 1024,
            max_list_records: 1000,
            allowed_record_headers: Vec::new(),
            cache_ttl: Duration::from_secs(5),
            auth: AuthSettings::default(),
            rate_limits: RateLimits::default(),
            live: LiveLimits::default(),
        }
    }
}

/// Options of a list read (SPEC §4.3).
#[derive(Debug, Clone, Copy, Default)]
pub struct ListQuery {
    /// `after=K` (index > K); negative = the last `-K` records.
    pub after: Option<i64>,
    /// `before=K` (index < K).
    pub before: Option<i64>,
    pub limit: Option<i64>,
    /// Only the latest non-deleted record of each name.
    pub unique: bool,
}

/// The engine handle. Clone it freely.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: EngineConfig,
    keys: TokenKeys,
    /// The stream actors and what they share.
    actors: Arc<ActorEnv>,
    /// `true` once a graceful shutdown began (see [`Engine::draining`]).
    draining: tokio::sync::watch::Sender<bool>,
    pods: Cache<String, PodRow>,
    streams: Cache<(i64, String), StreamRow>,
    /// Routing maps by pod name.
    routes: Cache<String, Arc<pod_config::Routes>>,
    /// Custom domain → pod name (negative answers cached too).
    domains: Cache<String, Option<String>>,
    /// Decision tables of permission streams, by stream id.
    perms: Cache<i64, Arc<permissions::PermTable>>,
    /// `None` when rate limiting is off.
    rate: Option<Arc<ratelimit::RateLimiter>>,
    /// Tokens already verified, so a client's every request does not repeat the HMAC and JSON
    /// work. Tokens are stateless: a hit is re-checked against its expiry, nothing else can
    /// change.
    verified: moka::sync::Cache<String, UserCaller>,
    /// Feeds of committed records for live tails.
    live: Arc<live::LiveHub>,
    /// Records and pages served from memory; the actors bump a stream's entry on commit.
    reads: Arc<read_cache::ReadCache>,
}

impl Engine {
    pub fn new(store: Store, config: EngineConfig, keys: TokenKeys) -> Engine {
        let ttl = config.cache_ttl;
        let limits = config.rate_limits;
        let rate = limits
            .enabled
            .then(|| ratelimit::RateLimiter::start(store.clone(), limits));
        let pods = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(config.cache_ttl)
            .build();
        let streams = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.cache_ttl)
            .build();
        let live = Arc::new(live::LiveHub::new(config.live));
        let registry = Registry::default();
        let reads = Arc::new(read_cache::ReadCache::new(config.cache_ttl));
        let actors = Arc::new(ActorEnv {
            store: store.clone(),
            live: live.clone(),
            reads: reads.clone(),
            writer: writer::Writer::start(store.clone(), registry.metrics.clone()),
            limits: config.actors,
            registry,
        });
        actor::sweep_idle(&actors);
        Engine {
            inner: Arc::new(Inner {
                store,
                config,
                keys,
                actors,
                draining: tokio::sync::watch::Sender::new(false),
                pods,
                streams,
                routes: Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(ttl)
                    .build(),
                domains: Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(ttl)
                    .build(),
                perms: Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(ttl)
                    .build(),
                rate,
                verified: moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(std::time::Duration::from_secs(300))
                    .build(),
                live,
                reads,
            }),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The storage handle (for health checks and operator commands).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Stream actors alive in this instance.
    pub fn active_actors(&self) -> usize {
        self.inner.actors.registry.len()
    }

    /// This instance's metric registry (frontends count requests and live subscriptions in it).
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.inner.actors.registry.metrics
    }

    /// Every metric in the Prometheus text format, with gauges sampled now.
    pub fn render_metrics(&self) -> String {
        let pool = self.inner.store.pool_stats();
        self.metrics().render(&metrics::Snapshot {
            active_actors: self.active_actors(),
            pool_connections: pool.connections,
            pool_idle: pool.idle,
            pool_max: pool.max,
        })
    }

    /// Marks the start of a graceful shutdown: [`Engine::draining`] watchers wake up.
    pub fn start_draining(&self) {
        self.inner.draining.send_replace(true);
    }

    /// `true` once a graceful shutdown began ([`Engine::start_draining`]). A request that
    /// starts after this is refused, so that the tails' last look at the log, taken once the
    /// requests counted before it finished, cannot miss a record acknowledged after it.
    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Turns `true` when a graceful shutdown begins: long-lived work (live tails) should then
    /// end (WebSocket close code 1001) so the drain can finish before its deadline.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.draining.subscribe()
    }

    /// Commits everything queued in every stream actor and stops them, then writes out the
    /// rate-limit counts not yet synced, so that they survive the restart (graceful shutdown).
    pub async fn shutdown(&self) {
        actor::flush_all(&self.inner.actors.registry).await;
        if let Some(rate) = &self.inner.rate {
            rate.flush_now().await;
        }
    }

    // ----- identity -------------------------------------------------------------------------

    /// Turns an optional bearer token into a caller. No token = anonymous.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller> {
        let Some(token) = token else {
            return Ok(Caller::Anonymous);
        };
        if let Some(user) = self.inner.verified.get(token)
            && user.expires_at.is_none_or(|exp| exp > now_ms() / 1000)
        {
            return Ok(Caller::User(user));
        }
        let claims = self.inner.keys.verify(token)?;
        let scope = match claims.scope.as_deref() {
            None => Scope::ALL,
            Some(s) => Scope::parse(s).ok_or_else(|| {
                Error::new(ErrorKind::InvalidToken, "the token's scope is invalid")
            })?,
        };
        let user = UserCaller {
            user_id: claims.sub,
            pods: claims.pods,
            scope,
            expires_at: claims.exp,
        };
        self.inner.verified.insert(token.to_string(), user.clone());
        Ok(Caller::User(user))
    }

    /// Whether requests are counted against rate limits at all.
    pub fn rate_limiting(&self) -> bool {
        self.inner.rate.is_some()
    }

    /// Signs a token for `user_id`; `pods`, when given, must be valid pod names.
    pub fn issue_token(
        &self,
        user_id: &str,
        pods: Option<Vec<String>>,
        scope: Scope,
        expires_in_secs: Option<i64>,
    ) -> Result<String> {
        if let Some(list) = &pods
            && (list.is_empty() || !list.iter().all(|p| names::is_valid_pod_name(p)))
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "pods must be valid pod names",
            ));
        }
        let claims = token::new_claims(user_id, now_ms() / 1000, expires_in_secs, pods, scope);
        self.inner.keys.sign(&claims)
    }

    /// Finds or creates the local-mode user called `name`; returns its user id.
    pub async fn ensure_local_user(&self, name: &str) -> Result<String> {
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{name:?} is not a user name: it must be printable and not blank"),
            ));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let user = self
            .inner
            .store
            .upsert_identity_user("local", name, None, Some(name), &id, now_ms())
            .await?;
        Ok(user.id)
    }

    // ----- pods -----------------------------------------------------------------------------

    /// Creates a pod owned by the caller, with `.config/owner` index 0 naming them.
    pub async fn create_pod(&self, caller: &Caller, name: &str) -> Result<Pod> {
        let user = require_writer(caller)?;
        if !is_valid_pod_name(name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "invalid pod name: 2-63 of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
        check_token_pod(user, name)?;
        let now = now_ms();
        let content = serde_json::json!({ "userId": user.user_id }).to_string();
        let owner_stream = StreamCtx {
            stream_id: 0,
            pod_id: 0,
            pod: name.to_string(),
            path: OWNER_STREAM.to_string(),
        };
        let first = batch::chain_record(
            &owner_stream,
            &webpods_storage::Head::EMPTY,
            &NewRecord {
                name: OWNER_RECORD.to_string(),
                content: Bytes::from(content),
                content_type: "application/json".to_string(),
                headers: BTreeMap::new(),
                deleted: false,
            },
            &user.user_id,
            now,
        );
        let streams = [
            ("", "", "public"),
            (names::CONFIG, names::CONFIG, "private"),
            (OWNER_STREAM, OWNER_RECORD, "private"),
        ];
        let pod = self
            .inner
            .store
            .create_pod(name, &user.user_id, now, &streams, &first)
            .await?
            .ok_or_else(|| {
                Error::new(ErrorKind::PodExists, format!("pod {name:?} already exists"))
            })?;
        Ok(pod_view(&pod))
    }

    /// Pods owned by the caller.
    pub async fn list_pods(&self, caller: &Caller) -> Result<Vec<Pod>> {
        let user = require_user(caller)?;
        let pods = self.inner.store.list_pods_owned_by(&user.user_id).await?;
        Ok(pods
            .iter()
            .filter(|p| user.pods.as_ref().is_none_or(|l| l.contains(&p.name)))
            .map(pod_view)
            .collect())
    }

    /// Makes `new_owner` the pod's owner (owner only).
    pub async fn transfer_owner(&self, caller: &Caller, pod: &str, new_owner: &str) -> Result<()> {
        let pod = self.owner_checked_pod(pod).await?;
        let user = require_owner(&pod, caller)?;
        let new_owner = names::canonical_user_id(new_owner);
        if self.inner.store.get_user(&new_owner).await?.is_none() {
            return Err(Error::new(ErrorKind::UserNotFound, "no such user"));
        }
        let content = serde_json::json!({ "userId": new_owner });
        self.append_system(&pod, OWNER_STREAM, OWNER_RECORD, &content, &user.user_id)
            .await?;
        // Also makes the pod's live tails re-check at once, on every instance (SPEC §6.1).
        self.changed(invalidation::Change::Pod(pod.name.clone()))
            .await;
        Ok(())
    }

    /// Appends one JSON record to a `.config` stream written through its own endpoint,
    /// creating the stream (owner-only) if needed.
    pub(crate) async fn append_system(
        &self,
        pod: &PodRow,
        path: &str,
        name: &str,
        content: &serde_json::Value,
        author: &str,
    ) -> Result<Receipt> {
        let stream = match self.stream(pod, path).await? {
            Some(s) => s,
            None => {
                let new = NewStream {
                    pod_id: pod.id,
                    parent_id: Some(self.existing_stream(pod, names::CONFIG).await?.id),
                    path: path.to_string(),
                    name: names::split_last(path).1.to_string(),
                    access: "private".to_string(),
                    creator_id: author.to_string(),
                    created_at: now_ms(),
                };
                match self.inner.store.create_stream(&new).await? {
                    CreateStream::Created(s) | CreateStream::Exists(s) => s,
                    CreateStream::NameConflict => {
                        return Err(Error::new(
                            ErrorKind::NameConflict,
                            "name conflict in .config",
                        ));
                    }
                }
            }
        };
        let entry = Entry {
            records: vec![NewRecord {
                name: name.to_string(),
                content: Bytes::from(content.to_string()),
                content_type: "application/json".to_string(),
                headers: BTreeMap::new(),
                deleted: false,
            }],
            precondition: None,
            idempotency_key: None,
            author: author.to_string(),
            purge: false,
        };
        let committed = self.submit(pod, &stream, entry).await?;
        committed
            .rows()
            .first()
            .map(|r| Receipt::new(&stream.path, r))
            .ok_or_else(|| Error::Internal("system append wrote nothing".into()))
    }

    // ----- writes ---------------------------------------------------------------------------

    /// Appends records to a stream (creating it and its ancestors when missing).
    pub async fn append(
        &self,
        caller: &Caller,
        pod: &str,
        stream_path: &str,
        req: AppendRequest,
    ) -> Result<AppendOutcome> {
        check_stream_path(stream_path)?;
        if req.records.is_empty() {
            return Err(Error::new(ErrorKind::InvalidInput, "nothing to append"));
        }
        if req.records.len() > MAX_APPEND_RECORDS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a batch holds at most {MAX_APPEND_RECORDS} records"),
            ));
        }
        for r in &req.records {
            self.check_new_record(r)?;
        }
        // Checked here, not left to the database: a key it cannot store (a NUL) would fail
        // the whole group commit, and with it other callers' appends to the stream.
        if let Some(k) = &req.idempotency_key
            && (k.is_empty() || k.len() > 128 || k.chars().any(char::is_control))
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "Idempotency-Key must be 1-128 characters, none of them control characters",
            ));
        }
        // `access` applies only when the write creates the stream, but a bad value is a bad
        // request either way.
        if let Some(access) = req.access.as_deref() {
            check_access(access)?;
        }
        // Writes under `.config` are the owner's: decided on the owner of record, as below.
        let pod = if is_system_path(stream_path) {
            self.owner_checked_pod(pod).await?
        } else {
            self.pod(pod).await?
        };
        let user = require_writer(caller)?;
        check_token_pod(user, &pod.name)?;
        refuse_endpoint_path(stream_path)?;
        // A write refused by its precondition changes nothing: it must not create the stream
        // (or its parents) on the way.
        if let Some(p) = &req.precondition
            && self.stream(&pod, stream_path).await?.is_none()
        {
            batch::check_precondition(p, &webpods_storage::Head::EMPTY)?;
        }
        let access = req.access.as_deref();
        let stream = self
            .writable_stream(&pod, user, stream_path, access)
            .await?;
        let entry = Entry {
            records: req.records,
            precondition: req.precondition,
            idempotency_key: req.idempotency_key,
            author: user.user_id.clone(),
            purge: false,
        };
        let committed = match self.submit_once(&pod, &stream, entry).await? {
            actor::Submitted::Committed(c) => c,
            // Our cached stream was deleted (maybe recreated) through another instance.
            actor::Submitted::StreamGone(entry) => {
                let key = (pod.id, stream_path.to_string());
                self.inner.streams.invalidate(&key).await;
                let stream = self
                    .writable_stream(&pod, user, stream_path, access)
                    .await?;
                self.submit(&pod, &stream, entry).await?
            }
        };
        let grants_changed = !committed.replayed
            && pod.owner_id == user.user_id
            && committed
                .rows()
                .iter()
                .any(|r| permissions::looks_like_grant(&r.content));
        if grants_changed {
            self.changed(invalidation::Change::Permissions {
                pod: pod.name.clone(),
                stream_id: stream.id,
            })
            .await;
        }
        Ok(AppendOutcome {
            receipts: committed
                .rows()
                .iter()
                .map(|r| Receipt::new(&stream.path, r))
                .collect(),
            replayed: committed.replayed,
        })
    }

    /// The stream to append to, created with its ancestors when missing; checks write access.
    async fn writable_stream(
        &self,
        pod: &PodRow,
        user: &UserCaller,
        path: &str,
        access: Option<&str>,
    ) -> Result<StreamRow> {
        let stream = match self.stream(pod, path).await? {
            // `?access=` applies when the write creates the stream. On an existing stream with
            // other access, ignoring it would store a record the writer meant to be private
            // where everyone may read it.
            Some(s) if access.is_some_and(|a| a != s.access) => {
                return Err(Error::new(
                    ErrorKind::StreamExists,
                    format!(
                        "stream {path:?} exists with access {:?}; ?access= applies only to a \
                         write that creates the stream",
                        s.access
                    ),
                ));
            }
            Some(s) => s,
            // Boxed: creation is the rare path, and its future (lookups, rate limits, the
            // insert) need not be carried, and copied on each move, by every append's.
            None => {
                Box::pin(self.create_stream_path(pod, user, path, access))
                    .await?
                    .0
            }
        };
        self.check_write(pod, &stream, user).await?;
        Ok(stream)
    }

    /// Creates an empty stream explicitly (409 `STREAM_EXISTS` if it is there).
    pub async fn create_stream(
        &self,
        caller: &Caller,
        pod: &str,
        path: &str,
        access: Option<&str>,
    ) -> Result<StreamInfo> {
        check_stream_path(path)?;
        if path.is_empty() {
            return Err(Error::new(
                ErrorKind::StreamExists,
                "the root stream always exists",
            ));
        }
        let pod = self.pod(pod).await?;
        let user = require_writer(caller)?;
        check_token_pod(user, &pod.name)?;
        refuse_endpoint_path(path)?;
        if self.stream(&pod, path).await?.is_some() {
            return Err(stream_exists(path));
        }
        // Of concurrent creations of one stream exactly one succeeds: the others find it in the
        // database (the check above raced) and are told so, not that theirs has their access.
        let (row, created) = Box::pin(self.create_stream_path(&pod, user, path, access)).await?;
        if !created {
            return Err(stream_exists(path));
        }
        Ok(stream_view(&row))
    }

    fn check_new_record(&self, r: &NewRecord) -> Result<()> {
        check_record_name(&r.name)?;
        if r.content.len() > self.inner.config.max_record_bytes {
            return Err(Error::new(
                ErrorKind::ContentTooLarge,
                format!(
                    "a record may hold at most {} bytes",
                    self.inner.config.max_record_bytes
                ),
            ));
        }
        if is_json_type(&r.content_type)
            && let Some(problem) = json_content_problem(&r.content)
        {
            return Err(Error::new(
                ErrorKind::InvalidContent,
                format!(
                    "the content is not valid {} JSON: {problem}",
                    r.content_type
                ),
            ));
        }
        for (k, v) in &r.headers {
            // Replayed as an HTTP header on raw reads: a control character (CR, LF, NUL…)
            // could not be, and would be stored, hashed and then silently left out.
            if v.chars().any(|c| c.is_control() && c != '\t') {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("record header {k:?} holds a control character"),
                ));
            }
            if is_reserved_record_header(k) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{k:?} cannot be a record header: the server sends it itself"),
                ));
            }
            if !self
                .inner
                .config
                .allowed_record_headers
                .iter()
                .any(|a| a == k)
            {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("record header {k:?} is not allowed by server.allowed_record_headers"),
                ));
            }
        }
        Ok(())
    }

    /// Creates the streams of `path` that are missing, top-down. The last one gets `access`.
    /// Returns the stream, and whether this call created it (false: it was there, or another
    /// request created it first). A refusal (permission, rate limit) comes before the first
    /// creation, so a refused request leaves no streams behind.
    async fn create_stream_path(
        &self,
        pod: &PodRow,
        user: &UserCaller,
        path: &str,
        access: Option<&str>,
    ) -> Result<(StreamRow, bool)> {
        let access = access.unwrap_or("public");
        check_access(access)?;
        if is_system_path(path) && pod.owner_id != user.user_id {
            return Err(forbidden(".config streams are owner-only"));
        }
        // The deepest stream of the path that exists; everything below it is missing.
        let ends: Vec<usize> = path
            .match_indices('/')
            .map(|(i, _)| i)
            .chain([path.len()])
            .collect();
        let mut parent = self.existing_stream(pod, "").await?;
        let mut missing = ends.as_slice();
        while let Some((&end, rest)) = missing.split_first() {
            match self.stream(pod, &path[..end]).await? {
                Some(s) => (parent, missing) = (s, rest),
                None => break,
            }
        }
        if missing.is_empty() {
            return Ok((parent, false));
        }
        // Top-level streams are the owner's; deeper ones need write access to the parent (the
        // deeper missing ones will have this caller as their creator).
        let allowed = pod.owner_id == user.user_id
            || (!parent.path.is_empty() && self.check_write(pod, &parent, user).await.is_ok());
        if !allowed {
            return Err(forbidden("you may not create streams here"));
        }
        let count = u64::try_from(missing.len()).unwrap_or(u64::MAX);
        if let Err(e) = self
            .rate_limit_n(&user.user_id, Action::StreamCreate, count)
            .await
        {
            // Every frontend counted the request as a write before it came here; refused,
            // it wrote nothing.
            self.rate_refund(&user.user_id, Action::Write, 1).await;
            return Err(e);
        }
        let mut created = false;
        for (i, &end) in missing.iter().enumerate() {
            let prefix = &path[..end];
            let new = NewStream {
                pod_id: pod.id,
                parent_id: Some(parent.id),
                path: prefix.to_string(),
                name: names::split_last(prefix).1.to_string(),
                access: if end == path.len() { access } else { "public" }.to_string(),
                creator_id: user.user_id.clone(),
                created_at: now_ms(),
            };
            (parent, created) = match self.inner.store.create_stream(&new).await? {
                CreateStream::Created(s) => (s, true),
                CreateStream::Exists(s) => {
                    // Another request created it first: this one did not use its count.
                    self.rate_refund(&user.user_id, Action::StreamCreate, 1)
                        .await;
                    (s, false)
                }
                CreateStream::NameConflict => {
                    let unused = u64::try_from(missing.len() - i).unwrap_or(u64::MAX);
                    self.rate_refund(&user.user_id, Action::StreamCreate, unused)
                        .await;
                    return Err(Error::new(
                        ErrorKind::NameConflict,
                        format!("{prefix:?} is the name of a record in its parent stream"),
                    ));
                }
            };
        }
        Ok((parent, created))
    }

    /// Appends through the stream's actor; a stream deleted meanwhile is `STREAM_NOT_FOUND`.
    async fn submit(
        &self,
        pod: &PodRow,
        stream: &StreamRow,
        entry: Entry,
    ) -> Result<actor::Committed> {
        match self.submit_once(pod, stream, entry).await? {
            actor::Submitted::Committed(c) => Ok(c),
            actor::Submitted::StreamGone(_) => Err(Error::new(
                ErrorKind::StreamNotFound,
                format!(
                    "stream {:?} was deleted while the append waited; nothing was written",
                    stream.path
                ),
            )),
        }
    }

    /// Appends through the stream's actor; a stream deleted meanwhile hands the entry back.
    async fn submit_once(
        &self,
        pod: &PodRow,
        stream: &StreamRow,
        entry: Entry,
    ) -> Result<actor::Submitted> {
        let ctx = Arc::new(StreamCtx {
            stream_id: stream.id,
            pod_id: pod.id,
            pod: pod.name.clone(),
            path: stream.path.clone(),
        });
        actor::submit(&self.inner.actors, &ctx, entry).await
    }

    // ----- reads ----------------------------------------------------------------------------

    /// Whether `path` names an existing stream of `pod`, whoever asks (for a frontend choosing
    /// between a live tail and a read; the read or the tail then checks permissions).
    pub async fn is_stream(&self, pod: &str, path: &str) -> bool {
        if check_stream_path(path).is_err() {
            return false;
        }
        let Ok(pod) = self.pod(pod).await else {
            return false;
        };
        matches!(self.stream(&pod, path).await, Ok(Some(_)))
    }

    /// What a GET of `path` on a pod host addresses: a stream, or a record name in a stream.
    pub async fn resolve(&self, caller: &Caller, pod: &str, path: &str) -> Result<Target> {
        let pod = self.pod(pod).await?;
        // A record named like the last segment means the path is not a stream (below the top
        // level a record and a child stream never share a name), and that answer is cached:
        // asking for the path as a stream first would cost a query on every record read.
        let (stream_path, name) = names::split_last(path);
        if !stream_path.is_empty()
            && check_stream_path(stream_path).is_ok()
            && check_record_name(name).is_ok()
            && let Some(parent) = self.stream(&pod, stream_path).await?
            && self
                .cached_record(parent.id, RecordKey::Name(name.to_string()))
                .await?
                .is_some()
        {
            self.check_read(&pod, &parent, caller).await?;
            return Ok(Target::Record {
                stream: stream_view(&parent),
                name: name.to_string(),
            });
        }
        if let Some(s) = self.stream(&pod, path).await? {
            self.check_read(&pod, &s, caller).await?;
            return Ok(Target::Stream(stream_view(&s)));
        }
        let (stream_path, name) = names::split_last(path);
        check_stream_path(stream_path)?;
        check_record_name(name)?;
        let s = self.existing_stream(&pod, stream_path).await?;
        self.check_read(&pod, &s, caller).await?;
        Ok(Target::Record {
            stream: stream_view(&s),
            name: name.to_string(),
        })
    }

    /// The latest record called `name`; if none and `name` is an integer, the record at that
    /// index (negative counts from the end). Tombstoned → 404, purged → 410.
    pub async fn read_by_name(&self, stream: &StreamInfo, name: &str) -> Result<Record> {
        let row = match self
            .cached_record(stream.id, RecordKey::Name(name.to_string()))
            .await?
        {
            Some(r) => Some(r),
            None => match name.parse::<i64>() {
                Ok(i) => return self.read_by_index(stream, i).await,
                Err(_) => None,
            },
        };
        let row = row.ok_or_else(|| {
            Error::new(
                ErrorKind::RecordNotFound,
                format!("no record named {name:?}"),
            )
        })?;
        if row.deleted {
            return Err(Error::new(
                ErrorKind::RecordDeleted,
                format!("{name:?} was deleted"),
            ));
        }
        readable(stream, Arc::unwrap_or_clone(row))
    }

    /// The record at `index` (negative counts from the end).
    pub async fn read_by_index(&self, stream: &StreamInfo, asked: i64) -> Result<Record> {
        let index = if asked < 0 {
            self.cached_head(stream.id).await?.index + 1 + asked
        } else {
            asked
        };
        let row = if index < 0 {
            None
        } else {
            self.cached_record(stream.id, RecordKey::Index(index))
                .await?
                .map(Arc::unwrap_or_clone)
        };
        let row = row.ok_or_else(|| {
            Error::new(
                ErrorKind::RecordNotFound,
                format!("no record at index {asked}"),
            )
        })?;
        readable(stream, row)
    }

    /// A page of records in index order.
    pub async fn list(&self, stream: &StreamInfo, q: ListQuery) -> Result<RecordPage> {
        let limit = q
            .limit
            .unwrap_or(100)
            .clamp(1, self.inner.config.max_list_records);
        let reads = &self.inner.reads;
        let generation = reads.generation(stream.id);
        let key = PageKey {
            after: q.after,
            before: q.before,
            limit,
            unique: q.unique,
        };
        let cached = reads.page(stream.id, generation, key);
        self.metrics()
            .observe_cache(CacheKind::Pages, cached.is_some());
        if let Some(page) = cached {
            return Ok(RecordPage::clone(&page));
        }
        let page = self.list_uncached(stream, q, limit).await?;
        reads.put_page(stream.id, generation, key, Arc::new(page.clone()));
        Ok(page)
    }

    async fn list_uncached(
        &self,
        stream: &StreamInfo,
        q: ListQuery,
        limit: i64,
    ) -> Result<RecordPage> {
        let store = &self.inner.store;
        let head = self.cached_head(stream.id).await?;
        let after = match q.after {
            Some(a) if a < 0 => Some(head.index + a),
            other => other,
        };
        let mut rows = store
            .list_records(
                stream.id,
                RecordRange {
                    after,
                    before: q.before,
                    limit: limit + 1,
                    unique: q.unique,
                },
            )
            .await?;
        let has_more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_index = if has_more {
            rows.last().map(|r| r.index + 1)
        } else {
            None
        };
        Ok(RecordPage {
            records: rows
                .into_iter()
                .map(|row| Record {
                    stream_path: stream.path.clone(),
                    row,
                })
                .collect(),
            total: head.index + 1,
            has_more,
            next_index,
            next_cursor: None,
            head_hash: head.hash,
        })
    }

    /// Records `start..end` (end exclusive; negatives count from the end).
    pub async fn read_range(
        &self,
        stream: &StreamInfo,
        start: i64,
        end: i64,
    ) -> Result<RecordSlice> {
        let store = &self.inner.store;
        let head = self.cached_head(stream.id).await?;
        let total = head.index + 1;
        let from_end = |i: i64| if i < 0 { total + i } else { i };
        let (start, end) = (from_end(start), from_end(end));
        if start > end {
            return Err(Error::new(
                ErrorKind::InvalidIndex,
                "the range ends before it starts",
            ));
        }
        let (start, end) = (start.clamp(0, total), end.clamp(0, total));
        let max = self.inner.config.max_list_records;
        if end - start > max {
            return Err(Error::new(
                ErrorKind::InvalidIndex,
                format!("a range may span at most {max} records"),
            ));
        }
        let rows = if end > start {
            store
                .list_records(
                    stream.id,
                    RecordRange {
                        after: Some(start - 1),
                        before: Some(end),
                        limit: end - start,
                        unique: false,
                    },
                )
                .await?
        } else {
            Vec::new()
        };
        Ok(RecordSlice {
            records: rows
                .into_iter()
                .map(|row| Record {
                    stream_path: stream.path.clone(),
                    row,
                })
                .collect(),
            start,
            end,
            total,
        })
    }

    /// The latest record called so, or the record at an index, from the read cache (see
    /// [`read_cache`]) or storage.
    async fn cached_record(
        &self,
        stream_id: i64,
        key: RecordKey,
    ) -> Result<Option<Arc<RecordRow>>> {
        let reads = &self.inner.reads;
        let generation = reads.generation(stream_id);
        let cached = reads.record(stream_id, generation, &key);
        self.metrics()
            .observe_cache(CacheKind::Records, cached.is_some());
        if let Some(row) = cached {
            return Ok(row);
        }
        let store = &self.inner.store;
        let row = match &key {
            RecordKey::Name(name) => store.latest_by_name(stream_id, name).await?,
            RecordKey::Index(index) => store.get_record(stream_id, *index).await?,
        }
        .map(Arc::new);
        reads.put_record(stream_id, generation, key, row.clone());
        Ok(row)
    }

    /// The stream's committed head ([`Head::EMPTY`](webpods_storage::Head::EMPTY) when it has
    /// no records or is gone), from the read cache or storage.
    async fn cached_head(&self, stream_id: i64) -> Result<webpods_storage::Head> {
        let reads = &self.inner.reads;
        let generation = reads.generation(stream_id);
        let head = match reads.head(stream_id, generation) {
            Some(head) => head,
            None => {
                let head = self.inner.store.stream_head(stream_id).await?;
                reads.put_head(stream_id, generation, head.clone());
                head
            }
        };
        Ok(head.unwrap_or(webpods_storage::Head::EMPTY))
    }

    // ----- lookups and permissions ----------------------------------------------------------

    /// The pod as stored, for a decision that only its owner may take (transfer, routes,
    /// domains, deletes, `.config` writes): an ownership transfer made through another instance
    /// counts at once, not when its notice arrives, and the new owner is never refused. These
    /// are rare requests, so the database read costs little.
    async fn owner_checked_pod(&self, name: &str) -> Result<PodRow> {
        self.inner.pods.invalidate(name).await;
        self.pod(name).await
    }

    async fn pod(&self, name: &str) -> Result<PodRow> {
        let not_found = || {
            Error::new(
                ErrorKind::PodNotFound,
                format!("pod {name:?} does not exist"),
            )
        };
        if !is_valid_pod_name(name) {
            return Err(not_found());
        }
        let cached = self.inner.pods.get(name).await;
        self.metrics()
            .observe_cache(CacheKind::Pods, cached.is_some());
        if let Some(p) = cached {
            return Ok(p);
        }
        let pod = self
            .inner
            .store
            .get_pod(name)
            .await?
            .ok_or_else(not_found)?;
        self.inner.pods.insert(name.to_string(), pod.clone()).await;
        Ok(pod)
    }

    async fn stream(&self, pod: &PodRow, path: &str) -> Result<Option<StreamRow>> {
        let key = (pod.id, path.to_string());
        let cached = self.inner.streams.get(&key).await;
        self.metrics()
            .observe_cache(CacheKind::Streams, cached.is_some());
        if let Some(s) = cached {
            return Ok(Some(s));
        }
        let found = self.inner.store.get_stream(pod.id, path).await?;
        if let Some(s) = &found {
            self.inner.streams.insert(key, s.clone()).await;
        }
        Ok(found)
    }

    async fn existing_stream(&self, pod: &PodRow, path: &str) -> Result<StreamRow> {
        self.stream(pod, path).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::StreamNotFound,
                format!("stream {path:?} does not exist"),
            )
        })
    }
}

fn readable(stream: &StreamInfo, row: RecordRow) -> Result<Record> {
    if row.purged {
        return Err(Error::new(
            ErrorKind::RecordPurged,
            format!("the content of {:?} was purged", row.name),
        ));
    }
    Ok(Record {
        stream_path: stream.path.clone(),
        row,
    })
}

fn forbidden(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Forbidden, msg)
}

fn stream_exists(path: &str) -> Error {
    Error::new(ErrorKind::StreamExists, format!("stream {path:?} exists"))
}

/// 403 for one of [`ENDPOINT_STREAMS`] or a path below one: neither records nor child streams
/// are written there except through the endpoint.
fn refuse_endpoint_path(path: &str) -> Result<()> {
    let endpoint = ENDPOINT_STREAMS.iter().any(|e| {
        path.strip_prefix(e)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    });
    if endpoint {
        return Err(forbidden(format!(
            "{path} is written through its own endpoint"
        )));
    }
    Ok(())
}

fn require_user(caller: &Caller) -> Result<&UserCaller> {
    match caller {
        Caller::User(u) => Ok(u),
        Caller::Anonymous => Err(Error::new(ErrorKind::Unauthorized, "a token is required")),
    }
}

/// The caller, if they own the pod and their token may write to it.
fn require_owner<'a>(pod: &PodRow, caller: &'a Caller) -> Result<&'a UserCaller> {
    let user = require_writer(caller)?;
    check_token_pod(user, &pod.name)?;
    if pod.owner_id != user.user_id {
        return Err(forbidden("only the pod owner may do this"));
    }
    Ok(user)
}

fn require_writer(caller: &Caller) -> Result<&UserCaller> {
    let user = require_user(caller)?;
    if !user.scope.write {
        return Err(forbidden("this token may not write"));
    }
    Ok(user)
}

fn check_token_pod(user: &UserCaller, pod: &str) -> Result<()> {
    match &user.pods {
        Some(list) if !list.iter().any(|p| p == pod) => Err(Error::new(
            ErrorKind::PodForbidden,
            format!("this token is not valid for pod {pod:?}"),
        )),
        _ => Ok(()),
    }
}

/// `public`, `private` or `/permission-stream`.
fn check_access(access: &str) -> Result<()> {
    let ok = match access {
        "public" | "private" => true,
        a => a
            .strip_prefix('/')
            .is_some_and(|p| !p.is_empty() && check_stream_path(p).is_ok()),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            "access must be public, private or /permission-stream",
        ))
    }
}

fn pod_view(p: &PodRow) -> Pod {
    Pod {
        name: p.name.clone(),
        created_at: iso8601(p.created_at),
    }
}

fn stream_view(s: &StreamRow) -> StreamInfo {
    StreamInfo {
        id: s.id,
        path: s.path.clone(),
        access_permission: s.access.clone(),
        creator_id: s.creator_id.clone(),
        created_at: iso8601(s.created_at),
    }
}
