//! Live tails (SPEC §6): a feed of committed records per stream, and [`Subscription`]s that
//! deliver a stream's records from `after` onwards with no gap and no duplicate.
//!
//! ## The feed
//! [`LiveHub`] keeps one `tokio::sync::broadcast` per stream that has subscribers, keyed by stream
//! id and independent of the stream actor (actors stop when idle; tails outlive them). The actor
//! publishes a batch only after its transaction committed ([`LiveHub::publish`]); a batch too
//! large to keep in memory is published as its head index only, and subscribers read it from
//! storage. The broadcast has a fixed capacity, so a slow subscriber never blocks the actor or
//! the other subscribers: it *lags*, and goes back to storage.
//!
//! ## One subscription
//! 1. subscribe to the feed, **then** read the head (everything committed before is in storage,
//!    everything after arrives on the feed);
//! 2. read history from storage in pages after `after` up to the known head, send it;
//! 3. send `caughtUp`, then forward live records, skipping indices already sent; a batch that
//!    starts beyond the next index (another instance wrote in between) or a lag sends us back to
//!    step 2 from the last index sent. Once past catch-up, every storage page first measures the
//!    distance to the stored head: more than `max_behind` records → [`ErrorKind::TooSlow`]
//!    (a subscriber that can never catch up should reconnect later, not read storage forever).
//!
//! Memory per subscriber is one storage page or one published batch.
//!
//! ## Across instances
//! After each commit a [`Notice`] (stream id + head) goes to the other instances
//! (PostgreSQL `NOTIFY`); each instance's listener task turns it into a head message on the local
//! feed. Notices can be lost, so that task also re-reads the heads of every watched stream
//! periodically and after each listener reconnect.
//!
//! ## Permissions
//! Checked at subscribe with the same rules as reads ([`Engine::resolve`]), and again whenever
//! the pod's read decisions may have changed, locally or on another instance: an ownership
//! transfer, a permission-stream record or a deleted pod (signalled with their cache
//! invalidation, see `invalidation.rs`), a deleted stream, or [`Engine::permissions_changed`];
//! and every `permission_recheck` as a safety net. A token's expiry ends its subscriptions.
//! Such changes are looked at while waiting for records and between history pages, so a
//! revoked reader that is catching up gets at most the pages already read.
//!
//! ## Recursive subscriptions
//! A stream and all its readable descendants, including streams created later: a set of the
//! subscriptions above sharing one id, see [`recursive`].
//!
//! ## Shutdown
//! The server calls [`Engine::close_live`] once every in-flight request has been answered, so
//! every acknowledged record is committed and published by then. Each subscription then
//! delivers what it holds, what its feed still queues and at most one more storage page, and
//! ends with [`LiveEnd::Shutdown`]; transports close their connections (1001) within
//! [`CLOSE_GRACE`], and the server waits for them through [`Engine::live_connection`] guards.

mod recursive;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use webpods_storage::{Head, Notice, RecordRange, RecordRow, Store};

use crate::clock::now_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::in_flight::{InFlight, Running};
use crate::metrics::LiveSubscription;
use crate::model::{Caller, Record, Target};
use crate::{Engine, Inner};

pub use recursive::{RecursiveEvent, RecursiveRequest, RecursiveSubscription};

/// Tunables of live tails.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    /// Messages (committed batches) a stream's feed keeps for slow subscribers.
    pub feed_capacity: usize,
    /// Batches larger than this are published as their head only (read back from storage).
    pub max_feed_batch_bytes: usize,
    /// Records per storage read while catching up.
    pub page: i64,
    /// After a lag, a subscriber further behind the head than this is closed (`TOO_SLOW`).
    pub max_behind: i64,
    /// How often every watched stream's head is re-read (multi-instance safety net).
    pub head_recheck: Duration,
    /// How often a subscription re-checks its permission without being told to (a recursive
    /// subscription also re-lists its streams this often).
    pub permission_recheck: Duration,
    /// Most streams one recursive subscription follows (`limits.max_recursive_streams`).
    pub max_recursive_streams: usize,
}

impl Default for LiveLimits {
    fn default() -> Self {
        Self {
            feed_capacity: 256,
            max_feed_batch_bytes: 256 * 1024,
            page: 256,
            max_behind: 100_000,
            head_recheck: Duration::from_secs(2),
            permission_recheck: Duration::from_secs(30),
            max_recursive_streams: 256,
        }
    }
}

/// What a stream's feed carries.
#[derive(Debug, Clone)]
enum FeedMsg {
    /// A committed batch (consecutive indices).
    Records(Arc<[RecordRow]>),
    /// Records exist up to this index; read them from storage.
    Head(i64),
}

/// The live feeds of this instance.
pub(crate) struct LiveHub {
    feeds: Mutex<HashMap<i64, broadcast::Sender<FeedMsg>>>,
    /// Pods whose permissions may have changed.
    perms: broadcast::Sender<String>,
    /// `true` once the server is shutting down: every subscription ends.
    closing: watch::Sender<bool>,
    /// Identifies this instance's notices.
    pub(crate) origin: u64,
    listener_started: AtomicBool,
    subscriptions: AtomicUsize,
    /// Open live connections (WebSocket and GraphQL sockets: they outlive the HTTP server's
    /// graceful shutdown, which does not track upgraded connections).
    connections: Arc<InFlight>,
    limits: LiveLimits,
    /// Which pod each appended stream belongs to, for recursive subscriptions.
    trees: recursive::Directory,
}

impl LiveHub {
    pub(crate) fn new(limits: LiveLimits) -> LiveHub {
        LiveHub {
            feeds: Mutex::new(HashMap::new()),
            perms: broadcast::channel(64).0,
            closing: watch::channel(false).0,
            origin: uuid::Uuid::new_v4().as_u64_pair().0,
            listener_started: AtomicBool::new(false),
            subscriptions: AtomicUsize::new(0),
            connections: Arc::default(),
            limits,
            trees: recursive::Directory::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, broadcast::Sender<FeedMsg>>> {
        // Every operation on the map is a single insert/remove/lookup: a poisoned map is valid.
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feed(&self, stream_id: i64) -> Option<broadcast::Sender<FeedMsg>> {
        self.lock().get(&stream_id).cloned()
    }

    fn subscribe(&self, stream_id: i64) -> broadcast::Receiver<FeedMsg> {
        let capacity = self.limits.feed_capacity.max(1);
        self.lock()
            .entry(stream_id)
            .or_insert_with(|| broadcast::channel(capacity).0)
            .subscribe()
    }

    /// Forgets a stream's feed once nobody listens to it.
    fn release(&self, stream_id: i64) {
        let mut feeds = self.lock();
        if feeds
            .get(&stream_id)
            .is_some_and(|f| f.receiver_count() == 0)
        {
            feeds.remove(&stream_id);
        }
    }

    /// Tells this instance's subscriptions of `pod` to re-check their permission.
    pub(crate) fn recheck_permissions(&self, pod: &str) {
        // An error only means nobody subscribes.
        let _ = self.perms.send(pod.to_string());
    }

    /// Streams with local subscribers.
    fn watched(&self) -> Vec<i64> {
        self.lock().keys().copied().collect()
    }

    fn feed_head(&self, stream_id: i64, head: i64) {
        if let Some(f) = self.feed(stream_id) {
            let _ = f.send(FeedMsg::Head(head));
        }
    }

    /// Called by a stream actor once a batch has **committed**: local subscribers get the
    /// records, other instances a notice (sent in the background, after the commit).
    pub(crate) fn publish(&self, store: &Store, stream_id: i64, records: &[RecordRow]) {
        let Some(last) = records.last() else {
            return;
        };
        self.trees.appended(stream_id);
        if let Some(f) = self.feed(stream_id) {
            let bytes: usize = records.iter().map(|r| r.content.len()).sum();
            let msg = if bytes <= self.limits.max_feed_batch_bytes {
                FeedMsg::Records(records.into())
            } else {
                FeedMsg::Head(last.index)
            };
            let _ = f.send(msg);
        }
        // Sent soon, batched with other streams' notices; subscribers elsewhere also re-check
        // heads periodically in case it is lost.
        store.notify_appended(Notice::Appended {
            origin: self.origin,
            stream_id,
            head: last.index,
        });
    }
}

/// Where a subscription starts (SPEC §6.1).
#[derive(Debug, Clone, Default)]
pub struct LiveRequest {
    /// Deliver records with index > `after` (`None`: all; negative: the last `-after`).
    pub after: Option<i64>,
    /// The hash the client holds for record `after`; a mismatch is `FORK_DETECTED`.
    pub after_hash: Option<String>,
    /// Expiry of the caller's token (epoch seconds): the subscription ends then.
    pub token_expires_at: Option<i64>,
}

/// One step of a subscription.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // records are the common case; boxing them buys nothing
pub enum LiveEvent {
    /// The next record (indices strictly increase by one).
    Record(Record),
    /// History is delivered; the next record will have this index.
    CaughtUp { next_index: i64 },
}

/// Why a subscription ended.
#[derive(Debug, Clone)]
pub enum LiveEnd {
    /// The server is shutting down (WebSocket close 1001).
    Shutdown,
    /// Revoked permission (`FORBIDDEN`), expired token, `TOO_SLOW`, deleted stream, storage…
    Error(Error),
}

impl From<Error> for LiveEnd {
    fn from(e: Error) -> Self {
        LiveEnd::Error(e)
    }
}

impl From<webpods_storage::Error> for LiveEnd {
    fn from(e: webpods_storage::Error) -> Self {
        LiveEnd::Error(e.into())
    }
}

/// At shutdown, how long a live connection may take to deliver the records its subscriptions
/// still hold (every append acknowledged before the tails close) and close; a client that does
/// not read is dropped after it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Resolves when the server starts shutting down (for connections without subscriptions).
#[derive(Clone)]
pub struct LiveShutdown(watch::Receiver<bool>);

impl LiveShutdown {
    pub async fn wait(&mut self) {
        // An error means the engine is gone: shutting down as well.
        let _ = self.0.wait_for(|closing| *closing).await;
    }

    /// Resolves `grace` after the server started shutting down: time for subscriptions to
    /// deliver what they still hold before their connection is closed anyway.
    pub async fn wait_then(mut self, grace: Duration) {
        self.wait().await;
        tokio::time::sleep(grace).await;
    }
}

/// Where a subscription is in its close (see [`Subscription::step_closing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Delivering the buffer and the feed's queue.
    Draining,
    /// The last storage page was read; the buffer empties, then the subscription ends.
    LastPage,
}

/// A live tail of one stream. Call [`Subscription::next`] in a loop; once it returns `Err`
/// the subscription is over (later calls return the same end).
pub struct Subscription {
    engine: Engine,
    caller: Caller,
    pod: String,
    stream_path: String,
    stream_id: i64,
    head_at_start: i64,
    rx: Option<broadcast::Receiver<FeedMsg>>,
    perms: broadcast::Receiver<String>,
    closing: watch::Receiver<bool>,
    expires: Option<Instant>,
    recheck: Interval,
    /// Index of the next record to deliver.
    next: i64,
    /// Highest index known to be committed.
    known_head: i64,
    /// Records read or received, in order, starting at the next index to deliver.
    buf: VecDeque<RecordRow>,
    caught_up: bool,
    /// Set while a lag or a permission change is being handled (survives cancellation).
    lagged: bool,
    must_recheck: bool,
    /// The next index when the distance to the head was last measured.
    measured_at: i64,
    /// Set once the server began closing tails: what is left is delivered, then it ends.
    closing_up: Option<Closing>,
    ended: Option<LiveEnd>,
    /// Counts this subscription in the `live_subscriptions` gauge until it ends: set for what a
    /// client opened ([`Engine::subscribe`]), not for the parts of a recursive subscription.
    gauge: Option<LiveSubscription>,
}

impl Engine {
    /// Starts the cross-instance listener (PostgreSQL; nothing on SQLite). Idempotent; the
    /// first subscription starts it too.
    pub fn start_live(&self) {
        let hub = &self.inner.live;
        if hub.listener_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(mut notices) = self.inner.store.notices() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let mut tick = tokio::time::interval(hub.limits.head_recheck);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                let sweep = tokio::select! {
                    n = notices.recv() => match n {
                        None => return,
                        Some(Notice::Reconnected) => {
                            let Some(inner) = weak.upgrade() else { return };
                            inner.clear_all();
                            // Streams created meanwhile went unnoticed: recursive tails re-list.
                            inner.live.trees.rescan();
                            true
                        }
                        Some(notice) => {
                            let Some(inner) = weak.upgrade() else { return };
                            on_notice(&inner, notice).await;
                            false
                        }
                    },
                    _ = tick.tick() => true,
                };
                if sweep {
                    let Some(inner) = weak.upgrade() else { return };
                    let ids = inner.live.watched();
                    if ids.is_empty() {
                        continue;
                    }
                    match inner.store.stream_heads(&ids).await {
                        Ok(heads) => {
                            for (id, head) in heads {
                                inner.live.feed_head(id, head);
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "live head re-check failed"),
                    }
                }
            }
        });
    }

    /// Tells every subscription of `pod` (on every instance) to re-check its permission.
    /// Fire it after anything else that can change a read decision; the engine's own changes
    /// (ownership transfer, permission-stream records, deletions) already do.
    pub fn permissions_changed(&self, pod: &str) {
        let hub = &self.inner.live;
        hub.recheck_permissions(pod);
        let store = self.inner.store.clone();
        if store.backend() == "postgres" {
            let notice = Notice::Permissions {
                origin: hub.origin,
                pod: pod.to_string(),
            };
            tokio::spawn(async move {
                if let Err(e) = store.notify(&notice).await {
                    tracing::warn!(error = %e, "permission notice not sent");
                }
            });
        }
    }

    /// Ends every subscription (graceful shutdown: tails close with 1001).
    pub fn close_live(&self) {
        self.inner.live.closing.send_replace(true);
    }

    /// Resolves once [`Engine::close_live`] was called.
    pub fn live_shutdown(&self) -> LiveShutdown {
        LiveShutdown(self.inner.live.closing.subscribe())
    }

    /// Counts a live connection (a WebSocket or GraphQL socket) until the guard is dropped, so
    /// that a shutdown can wait for them ([`Engine::live_connections_closed`]).
    pub fn live_connection(&self) -> Running {
        self.inner.live.connections.start()
    }

    /// Live connections open now.
    pub fn live_connections(&self) -> usize {
        self.inner.live.connections.running()
    }

    /// Resolves once every live connection has closed (call after [`Engine::close_live`],
    /// which makes them close with 1001).
    pub async fn live_connections_closed(&self) {
        self.inner.live.connections.until_idle().await;
    }

    /// Live subscriptions open in this instance, per stream: a recursive subscription counts
    /// once for every stream it follows.
    pub fn live_subscriptions(&self) -> usize {
        self.inner.live.subscriptions.load(Ordering::Relaxed)
    }

    /// The expiry (epoch seconds) of a valid token, if it has one.
    pub fn token_expiry(&self, token: &str) -> Option<i64> {
        self.inner.keys.verify(token).ok().and_then(|c| c.exp)
    }

    /// Opens a live tail of the stream at `path` (SPEC §6.1), checking read permission exactly
    /// like a read does.
    pub async fn subscribe(
        &self,
        caller: &Caller,
        pod: &str,
        path: &str,
        req: LiveRequest,
    ) -> Result<Subscription> {
        self.start_live();
        let hub = &self.inner.live;
        if *hub.closing.borrow() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the server is shutting down",
            ));
        }
        if req
            .token_expires_at
            .is_some_and(|exp| exp * 1000 <= now_ms())
        {
            return Err(Error::new(ErrorKind::TokenExpired, "the token has expired"));
        }
        let stream = self.readable_stream(caller, pod, path).await?;
        // Subscribe before reading the head: nothing committed from now on can be missed.
        let feed = PendingFeed::new(hub, stream.id);
        let head = self
            .inner
            .store
            .stream_head(stream.id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::StreamNotFound, "the stream was deleted"))?;
        if let Some(expected) = &req.after_hash {
            self.check_fork(stream.id, req.after, expected).await?;
        }
        let mut sub = self.open_subscription(
            caller,
            pod,
            feed,
            Opening {
                stream_path: stream.path,
                head: head.index,
                after: req.after,
                token_expires_at: req.token_expires_at,
            },
        );
        sub.gauge = Some(self.metrics().live_subscription());
        Ok(sub)
    }

    /// A subscription on a feed subscribed to **before** `head` was read from storage.
    fn open_subscription(
        &self,
        caller: &Caller,
        pod: &str,
        mut feed: PendingFeed<'_>,
        at: Opening,
    ) -> Subscription {
        let hub = &self.inner.live;
        let after = match at.after {
            Some(a) if a < 0 => (at.head + a).max(-1),
            // `next` is `after + 1`: i64::MAX would wrap to i64::MIN and spin the catch-up
            // loop. No stream reaches that index; waiting just below it is the same wait.
            Some(a) => a.min(i64::MAX - 1),
            None => -1,
        };
        let expires = at.token_expires_at.map(|exp| {
            let left_ms = (exp * 1000 - now_ms()).max(0);
            Instant::now() + Duration::from_millis(u64::try_from(left_ms).unwrap_or(0))
        });
        let period = hub
            .limits
            .permission_recheck
            .max(Duration::from_millis(100));
        let mut recheck = tokio::time::interval_at(Instant::now() + period, period);
        recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Decremented by the subscription's Drop.
        hub.subscriptions.fetch_add(1, Ordering::Relaxed);
        Subscription {
            engine: self.clone(),
            caller: caller.clone(),
            pod: pod.to_string(),
            stream_path: at.stream_path,
            stream_id: feed.stream_id,
            head_at_start: at.head,
            rx: feed.rx.take(),
            perms: hub.perms.subscribe(),
            closing: hub.closing.subscribe(),
            expires,
            recheck,
            next: after + 1,
            known_head: at.head,
            buf: VecDeque::new(),
            caught_up: false,
            lagged: false,
            must_recheck: false,
            measured_at: -1,
            closing_up: None,
            ended: None,
            gauge: None,
        }
    }

    /// The stream at `path`, if the caller may read it (the read rules of [`Engine::resolve`]).
    async fn readable_stream(
        &self,
        caller: &Caller,
        pod: &str,
        path: &str,
    ) -> Result<crate::model::StreamInfo> {
        // A stream path, judged as one (`a..b`, `s/`): not as `stream/record name`.
        crate::names::check_stream_path(path)?;
        match self.resolve(caller, pod, path).await? {
            Target::Stream(s) => Ok(s),
            Target::Record { .. } => Err(Error::new(
                ErrorKind::StreamNotFound,
                format!("stream {path:?} does not exist"),
            )),
        }
    }

    async fn check_fork(&self, stream_id: i64, after: Option<i64>, expected: &str) -> Result<()> {
        let Some(k) = after.filter(|k| *k >= 0) else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "afterHash needs a non-negative after",
            ));
        };
        let actual = self
            .inner
            .store
            .get_record(stream_id, k)
            .await?
            .map(|r| r.hash);
        if actual.as_deref() == Some(expected) {
            return Ok(());
        }
        Err(Error::with_details(
            ErrorKind::ForkDetected,
            format!("record {k} does not have the hash you hold"),
            serde_json::json!({ "index": k, "expectedHash": expected, "actualHash": actual }),
        ))
    }
}

/// Where a new [`Subscription`] starts.
struct Opening {
    stream_path: String,
    /// The head read from storage after subscribing to the feed.
    head: i64,
    /// As [`LiveRequest::after`].
    after: Option<i64>,
    token_expires_at: Option<i64>,
}

/// A feed receiver not yet owned by a [`Subscription`]. Dropping it (an error, a cancelled
/// future) releases the feed, so the hub does not keep feeds nobody listens to.
struct PendingFeed<'a> {
    hub: &'a LiveHub,
    stream_id: i64,
    rx: Option<broadcast::Receiver<FeedMsg>>,
}

impl<'a> PendingFeed<'a> {
    fn new(hub: &'a LiveHub, stream_id: i64) -> Self {
        PendingFeed {
            hub,
            stream_id,
            rx: Some(hub.subscribe(stream_id)),
        }
    }
}

impl Drop for PendingFeed<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            drop(rx);
            self.hub.release(self.stream_id);
        }
    }
}

/// Reacts to another instance's notice.
async fn on_notice(inner: &Inner, notice: Notice) {
    match notice {
        Notice::Appended {
            origin,
            stream_id,
            head,
        } if origin != inner.live.origin => {
            inner.reads.appended(stream_id);
            inner.live.trees.appended(stream_id);
            inner.live.feed_head(stream_id, head);
        }
        Notice::Permissions { origin, pod } if origin != inner.live.origin => {
            inner.pods.invalidate(&pod).await;
            let _ = inner.live.perms.send(pod);
        }
        Notice::Cache { origin, change } if origin != inner.live.origin => {
            crate::invalidation::on_cache_notice(inner, &change).await;
        }
        _ => {}
    }
}

/// How a subscription whose token expired ends.
fn token_expired() -> LiveEnd {
    Error::new(ErrorKind::TokenExpired, "the token has expired").into()
}

impl Subscription {
    /// The stream's head index when the subscription started (`-1`: empty).
    pub fn head_index(&self) -> i64 {
        self.head_at_start
    }

    /// The stream's path.
    pub fn stream_path(&self) -> &str {
        &self.stream_path
    }

    /// The next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<LiveEvent, LiveEnd> {
        if let Some(end) = &self.ended {
            return Err(end.clone());
        }
        let step = self.step().await;
        if let Err(end) = &step {
            self.ended = Some(end.clone());
            self.buf.clear();
            self.gauge = None;
        }
        step
    }

    async fn step(&mut self) -> Result<LiveEvent, LiveEnd> {
        loop {
            if self.closing_up.is_some() || *self.closing.borrow() {
                return self.step_closing().await;
            }
            if self.must_recheck {
                self.engine
                    .readable_stream(&self.caller, &self.pod, &self.stream_path)
                    .await
                    .and_then(|s| {
                        if s.id == self.stream_id {
                            Ok(())
                        } else {
                            Err(Error::new(
                                ErrorKind::StreamNotFound,
                                "the stream was deleted",
                            ))
                        }
                    })?;
                self.must_recheck = false;
            }
            if self.lagged {
                // Behind the live feed: how far behind the stored head are we?
                let head = self.stored_head().await?;
                self.known_head = self.known_head.max(head.index);
                self.lagged = false;
                if head.index - self.next >= self.engine.inner.live.limits.max_behind {
                    return Err(Error::new(
                        ErrorKind::TooSlow,
                        "this subscriber fell too far behind; reconnect with after",
                    )
                    .into());
                }
            }
            if let Some(row) = self.buf.pop_front() {
                return Ok(LiveEvent::Record(Record {
                    stream_path: self.stream_path.clone(),
                    row,
                }));
            }
            if self.known_head >= self.next {
                // Past catch-up, reading from storage means we fell behind: re-measure the
                // distance to the stored head before each page.
                if self.caught_up && self.measured_at != self.next {
                    self.measured_at = self.next;
                    self.lagged = true;
                    continue;
                }
                // Catching up reads page after page without waiting: a revocation or an
                // expiry must be seen between pages too, not only once caught up (a probe's
                // revoked reader got 59,000 more records of history).
                self.note_changes()?;
                if self.must_recheck {
                    continue;
                }
                self.fill().await?;
                continue;
            }
            if !self.caught_up {
                self.caught_up = true;
                return Ok(LiveEvent::CaughtUp {
                    next_index: self.next,
                });
            }
            self.wait().await?;
        }
    }

    /// While the server closes tails (after every acknowledged append was answered): deliver
    /// what this subscription already holds, what its feed still queues, and at most one more
    /// storage page, then end. A record acknowledged before the close so reaches the tail; a
    /// tail far behind ends without reading everything and resumes elsewhere with `after`.
    async fn step_closing(&mut self) -> Result<LiveEvent, LiveEnd> {
        loop {
            let closing = match self.closing_up {
                Some(c) => c,
                None => {
                    self.drain_feed();
                    self.closing_up = Some(Closing::Draining);
                    Closing::Draining
                }
            };
            if let Some(row) = self.buf.pop_front() {
                return Ok(LiveEvent::Record(Record {
                    stream_path: self.stream_path.clone(),
                    row,
                }));
            }
            if closing == Closing::Draining {
                self.closing_up = Some(Closing::LastPage);
                if self.lagged {
                    // The feed lost messages: only storage knows the head.
                    self.lagged = false;
                    let head = self.stored_head().await?;
                    self.known_head = self.known_head.max(head.index);
                }
                if self.known_head >= self.next {
                    self.fill().await?;
                }
                continue;
            }
            return Err(LiveEnd::Shutdown);
        }
    }

    /// Takes every message already queued on the feed, without waiting.
    fn drain_feed(&mut self) {
        use broadcast::error::TryRecvError;
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        loop {
            match rx.try_recv() {
                Ok(FeedMsg::Records(rows)) => self.accept(&rows),
                Ok(FeedMsg::Head(h)) => self.known_head = self.known_head.max(h),
                Err(TryRecvError::Lagged(_)) => self.lagged = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        self.rx = Some(rx);
    }

    async fn stored_head(&self) -> Result<Head, LiveEnd> {
        self.engine
            .inner
            .store
            .stream_head(self.stream_id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::StreamNotFound, "the stream was deleted").into())
    }

    /// Reads the next page of committed records from storage into the buffer.
    async fn fill(&mut self) -> Result<(), LiveEnd> {
        let page = self.engine.inner.live.limits.page.max(1);
        let rows = self
            .engine
            .inner
            .store
            .list_records(
                self.stream_id,
                RecordRange {
                    after: Some(self.next - 1),
                    before: None,
                    limit: page,
                    unique: false,
                },
            )
            .await?;
        if rows.is_empty() {
            // The head said more exists but storage has none: the stream is gone or the head
            // we were told about is not ours. Trust storage.
            let head = self.stored_head().await?;
            self.known_head = head.index;
            return Ok(());
        }
        for row in rows {
            if row.index != self.next {
                break; // never skip an index: the rest is read again
            }
            self.next += 1;
            self.known_head = self.known_head.max(row.index);
            self.buf.push_back(row);
        }
        Ok(())
    }

    /// Takes note, without waiting, of what [`wait`](Self::wait) would wake for besides
    /// records: the token's expiry and permission changes of the pod.
    fn note_changes(&mut self) -> Result<(), LiveEnd> {
        use broadcast::error::TryRecvError;
        if self.expires.is_some_and(|at| at <= Instant::now()) {
            return Err(token_expired());
        }
        loop {
            match self.perms.try_recv() {
                Ok(pod) if pod != self.pod => {}
                Ok(_) | Err(TryRecvError::Lagged(_)) => self.must_recheck = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Waits for something that can produce an event.
    async fn wait(&mut self) -> Result<(), LiveEnd> {
        enum Woke {
            Closing,
            Expired,
            Perm(Result<String, broadcast::error::RecvError>),
            Tick,
            Feed(Result<FeedMsg, broadcast::error::RecvError>),
        }
        let expires = self.expires;
        let Some(rx) = self.rx.as_mut() else {
            return Err(LiveEnd::Shutdown);
        };
        let woke = tokio::select! {
            biased;
            _ = self.closing.changed() => Woke::Closing,
            () = async {
                match expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Woke::Expired,
            p = self.perms.recv() => Woke::Perm(p),
            _ = self.recheck.tick() => Woke::Tick,
            m = rx.recv() => Woke::Feed(m),
        };
        use broadcast::error::RecvError;
        match woke {
            // `step` delivers what is left, then ends.
            Woke::Closing => {}
            Woke::Perm(Err(RecvError::Closed)) | Woke::Feed(Err(RecvError::Closed)) => {
                return Err(LiveEnd::Shutdown);
            }
            Woke::Expired => return Err(token_expired()),
            Woke::Perm(Ok(pod)) if pod != self.pod => {}
            Woke::Perm(_) | Woke::Tick => self.must_recheck = true,
            Woke::Feed(Ok(FeedMsg::Records(rows))) => self.accept(&rows),
            Woke::Feed(Ok(FeedMsg::Head(h))) => self.known_head = self.known_head.max(h),
            Woke::Feed(Err(RecvError::Lagged(_))) => self.lagged = true,
        }
        Ok(())
    }

    /// Takes a committed batch from the feed: what continues the sequence goes to the buffer,
    /// what is already sent is skipped, a gap is left to storage.
    fn accept(&mut self, rows: &[RecordRow]) {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return;
        };
        self.known_head = self.known_head.max(last.index);
        if first.index > self.next || last.index < self.next {
            return;
        }
        let from = self.next;
        for row in rows.iter().filter(|r| r.index >= from) {
            if row.index != self.next {
                return;
            }
            self.next += 1;
            self.buf.push_back(row.clone());
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let hub = &self.engine.inner.live;
        hub.release(self.stream_id);
        hub.subscriptions.fetch_sub(1, Ordering::Relaxed);
    }
}
