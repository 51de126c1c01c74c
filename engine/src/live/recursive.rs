//! Recursive live subscriptions (SPEC §6.2, `"recursive": true`): under one subscription id,
//! the records of a stream **and of every descendant stream the caller may read**, including
//! streams created after the subscription started, on any instance.
//!
//! ## Shape
//! A [`RecursiveSubscription`] is a set of ordinary [`Subscription`]s, one per followed stream
//! ("parts"), polled together. Each part keeps every guarantee of a single tail — catch-up then
//! live, strictly increasing indices with no gap and no duplicate, storage fallback, `TOO_SLOW`,
//! permission re-checks — so the records of one stream arrive in index order. Records of
//! different streams interleave in no promised order; each carries its stream path.
//!
//! ## Where each stream starts
//! - the root: `after` / `afterHash` exactly as for a single subscription;
//! - a descendant that exists at subscribe time: after its entry of
//!   [`RecursiveRequest::after_paths`] when the client gave one (to resume without
//!   duplicates), else from its first record;
//! - a descendant found later (created, or made readable, after subscribe): from its first
//!   record, since all of it is news to the client — except a stream this subscription
//!   followed before (revoked, then granted again), which resumes after the last record
//!   delivered.
//!
//! One `caughtUp`, carrying the root's next index, comes once every stream followed at
//! subscribe time has delivered its history; streams found later deliver theirs without one.
//!
//! ## Noticing new streams
//! A stream has something to deliver only after an append, and every committed append reaches
//! every instance as a stream id: from the local stream actor ([`LiveHub::publish`]), and from
//! other instances as an `Appended` notice (PostgreSQL `NOTIFY`). The [`Directory`] turns those
//! ids into "pod P may have a new stream": it remembers the pod of every stream id it has seen
//! (ids are never reused, so an entry never goes stale) and a resolver task looks unknown ids up
//! in one query per burst. The recursive subscriptions of pod P then re-list P's streams and
//! follow the new readable ones under their root. An empty stream (created without records) is
//! thus picked up at its first append — there is nothing to deliver before.
//!
//! Alternatives rejected: re-listing periodically only (seconds of latency, and a pod listing
//! per subscription per tick), and letting every subscription react to every unknown id (every
//! append anywhere would wake every recursive subscription and cost it a listing).
//!
//! Notices can be lost: after a listener reconnect every recursive subscription re-lists; a
//! periodic re-list (`permission_recheck`) covers a notice lost without a reconnect and streams
//! that became readable through a permission record. A permission change signalled for the pod
//! ([`Engine::permissions_changed`]) re-lists at once.
//!
//! ## Limits
//! One recursive subscription follows at most [`LiveLimits::max_recursive_streams`] streams
//! (root included). More readable streams at subscribe time: refused with `INVALID_INPUT`;
//! reached later: the subscription ends with `INVALID_INPUT` — never silently incomplete. The
//! client should subscribe to a narrower subtree. Memory is that of as many single
//! subscriptions (each at most one storage page or one published batch).
//!
//! ## How it ends
//! A part that ends on its own — `FORBIDDEN` / `UNAUTHORIZED` (read permission revoked) or
//! `STREAM_NOT_FOUND` (stream deleted) — ends only that stream ([`RecursiveEvent::StreamEnded`]);
//! the others go on, the root included in this rule. Anything else — shutdown, token expiry,
//! `TOO_SLOW`, the pod deleted, the stream limit, a storage failure — ends the whole
//! subscription.
//!
//! [`LiveHub::publish`]: super::LiveHub::publish
//! [`LiveLimits::max_recursive_streams`]: super::LiveLimits::max_recursive_streams

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use webpods_storage::StreamRow;

use super::{LiveEnd, LiveEvent, LiveRequest, Opening, PendingFeed, Subscription};
use crate::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::LiveSubscription;
use crate::model::{Caller, Record};
use crate::names::check_stream_path;

/// Most stream ids whose pod the directory remembers; past it, it starts over (ids are then
/// looked up again when they are appended to).
const KNOWN_CAP: usize = 100_000;
/// Most ids waiting for the resolver; past it, every recursive subscription re-lists instead.
const UNRESOLVED_CAP: usize = 10_000;
/// Shortest time between two listings of one subscription (bursts of new streams).
const RELIST_GAP: Duration = Duration::from_millis(100);

// ----- the directory: stream id → pod ------------------------------------------------------------

/// This instance's map from appended stream ids to the pods of recursive subscriptions.
#[derive(Default)]
pub(super) struct Directory {
    /// Recursive subscriptions alive here; appends are ignored while there are none.
    watchers: AtomicUsize,
    state: Mutex<DirState>,
    /// Wakes the resolver task.
    wake: Arc<Notify>,
    resolver_started: AtomicBool,
}

#[derive(Default)]
struct DirState {
    /// Pods with recursive subscriptions.
    pods: HashMap<i64, PodWatch>,
    /// Stream id → pod id, for every stream seen in a listing or looked up.
    known: HashMap<i64, i64>,
    /// Appended stream ids whose pod is not known yet.
    unresolved: HashSet<i64>,
    /// Ids were dropped because `unresolved` was full.
    overflow: bool,
}

struct PodWatch {
    subscriptions: usize,
    /// Bumped whenever the pod may have a stream its subscriptions have not listed.
    version: watch::Sender<u64>,
}

impl Directory {
    fn lock(&self) -> MutexGuard<'_, DirState> {
        // Every update leaves the maps valid: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records were committed to `stream_id`, here or on another instance. Cheap: one atomic
    /// load while no recursive subscription exists, a map lookup otherwise.
    pub(super) fn appended(&self, stream_id: i64) {
        if self.watchers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut st = self.lock();
        if st.known.contains_key(&stream_id) {
            return;
        }
        if st.unresolved.len() >= UNRESOLVED_CAP {
            st.overflow = true;
        } else {
            st.unresolved.insert(stream_id);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Notices may have been missed: every recursive subscription re-lists its pod.
    pub(super) fn rescan(&self) {
        for w in self.lock().pods.values() {
            w.version.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Registers a recursive subscription of `pod_id`; the receiver changes when the pod may
    /// have a new stream. Pair with [`Directory::unwatch`].
    fn watch(&self, pod_id: i64) -> watch::Receiver<u64> {
        let mut st = self.lock();
        self.watchers.fetch_add(1, Ordering::Relaxed);
        let w = st.pods.entry(pod_id).or_insert_with(|| PodWatch {
            subscriptions: 0,
            version: watch::channel(0).0,
        });
        w.subscriptions += 1;
        w.version.subscribe()
    }

    fn unwatch(&self, pod_id: i64) {
        let mut st = self.lock();
        if let Some(w) = st.pods.get_mut(&pod_id) {
            w.subscriptions = w.subscriptions.saturating_sub(1);
            if w.subscriptions == 0 {
                st.pods.remove(&pod_id);
            }
        }
        self.watchers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Streams of `pod_id` seen in a listing: appends to them need no look-up.
    fn learn(&self, pod_id: i64, ids: impl Iterator<Item = i64>) {
        let mut st = self.lock();
        for id in ids {
            if st.known.len() >= KNOWN_CAP {
                st.known.clear();
            }
            st.known.insert(id, pod_id);
        }
    }

    /// The ids to look up, and whether some were dropped.
    fn take_unresolved(&self) -> (Vec<i64>, bool) {
        let mut st = self.lock();
        let ids = st.unresolved.drain().collect();
        (ids, std::mem::take(&mut st.overflow))
    }

    /// Puts ids back after a failed look-up.
    fn unresolved_again(&self, ids: Vec<i64>) {
        let mut st = self.lock();
        for id in ids {
            if st.unresolved.len() >= UNRESOLVED_CAP {
                st.overflow = true;
                break;
            }
            st.unresolved.insert(id);
        }
    }

    /// Looked-up `(stream, pod)` pairs: the pods with recursive subscriptions are told.
    fn resolved(&self, pairs: &[(i64, i64)]) {
        let mut st = self.lock();
        let mut touched = HashSet::new();
        for &(id, pod) in pairs {
            if st.known.len() >= KNOWN_CAP {
                st.known.clear();
            }
            st.known.insert(id, pod);
            touched.insert(pod);
        }
        for pod in touched {
            if let Some(w) = st.pods.get(&pod) {
                w.version.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }
}

impl Engine {
    /// Starts the task that looks up the pods of unknown appended streams (idempotent).
    fn start_stream_resolver(&self) {
        let dir = &self.inner.live.trees;
        if dir.resolver_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let wake = dir.wake.clone();
        let weak = Arc::downgrade(&self.inner);
        let mut closing = self.inner.live.closing.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = wake.notified() => {}
                    // Shutting down, or the engine is gone.
                    _ = closing.wait_for(|c| *c) => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                let dir = &inner.live.trees;
                let (ids, overflow) = dir.take_unresolved();
                if overflow {
                    dir.rescan();
                }
                if ids.is_empty() {
                    continue;
                }
                match inner.store.stream_pods(&ids).await {
                    // Ids that are gone (deleted streams) have nothing left to deliver.
                    Ok(pairs) => dir.resolved(&pairs),
                    Err(e) => {
                        tracing::warn!(error = %e, "looking up new streams failed; retrying");
                        dir.unresolved_again(ids);
                        drop(inner);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        wake.notify_one();
                    }
                }
            }
        });
    }
}

// ----- the subscription --------------------------------------------------------------------------

/// Where a recursive subscription starts (SPEC §6.2).
#[derive(Debug, Clone, Default)]
pub struct RecursiveRequest {
    /// `after` / `afterHash` apply to the root stream; the token expiry to every stream.
    pub live: LiveRequest,
    /// Per-descendant `after` (full stream path → index, negative = the last N), to resume
    /// without duplicates. Descendants not named here start at their first record.
    pub after_paths: HashMap<String, i64>,
}

/// One step of a recursive subscription.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // records are the common case
pub enum RecursiveEvent {
    /// The next record of the stream `record.stream_path` (per stream: indices strictly
    /// increase by one).
    Record(Record),
    /// Every stream followed at subscribe time has delivered its history; the root's next
    /// record will have this index.
    CaughtUp { next_index: i64 },
    /// One stream is no longer followed (read permission revoked, stream deleted); the others
    /// go on. It is followed again, from where it stopped, if it becomes readable again.
    StreamEnded { path: String, error: Error },
}

/// One followed stream (boxed: a part moves in and out of its future at every event).
struct Part {
    sub: Box<Subscription>,
    /// Index of the next record to deliver (where to resume if it ends).
    next: i64,
}

type PartStep = Pin<Box<dyn Future<Output = (Part, Result<LiveEvent, LiveEnd>)> + Send>>;

/// The part's next event, owning the part until then (so that many can be awaited at once).
fn step_of(mut part: Part) -> PartStep {
    Box::pin(async move {
        let event = part.sub.next().await;
        (part, event)
    })
}

/// A live tail of a stream and its readable descendants. Call
/// [`RecursiveSubscription::next`] in a loop; once it returns `Err` the subscription is over
/// (later calls return the same end).
pub struct RecursiveSubscription {
    engine: Engine,
    caller: Caller,
    pod: String,
    pod_id: i64,
    root_path: String,
    head_at_start: i64,
    token_expires_at: Option<i64>,
    expires: Option<Instant>,
    max_streams: usize,
    /// The next event of every followed stream.
    parts: FuturesUnordered<PartStep>,
    /// Ids of the followed streams.
    followed: HashSet<i64>,
    /// Streams that stopped being followed: id → next index to deliver if followed again.
    left: HashMap<i64, i64>,
    /// Client-given starting points of descendants not opened yet.
    after_paths: HashMap<String, i64>,
    /// Streams followed since subscribe that have not caught up yet.
    catching_up: HashSet<i64>,
    caught_up: bool,
    /// The root's next index to deliver.
    root_next: i64,
    pod_version: watch::Receiver<u64>,
    perms: broadcast::Receiver<String>,
    closing: watch::Receiver<bool>,
    relist_tick: Interval,
    /// The pod's streams must be listed again (not before `relist_at`).
    relist: bool,
    relist_at: Instant,
    ended: Option<LiveEnd>,
    /// Counts this subscription (once, whatever it follows) in the `live_subscriptions` gauge
    /// until it ends.
    gauge: Option<LiveSubscription>,
}

/// Whether `path` is `root` or below it.
fn covers(root: &str, path: &str) -> bool {
    root.is_empty()
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A part's end that concerns its stream only.
fn ends_one_stream(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Forbidden | ErrorKind::Unauthorized | ErrorKind::StreamNotFound
    )
}

fn too_many(limit: usize, root: &str) -> Error {
    Error::with_details(
        ErrorKind::InvalidInput,
        format!(
            "a recursive subscription follows at most {limit} streams; more are readable \
             under {root:?} (subscribe to a narrower subtree)"
        ),
        serde_json::json!({ "maxStreams": limit }),
    )
}

impl Engine {
    /// Opens a live tail of the stream at `path` and of every descendant stream the caller may
    /// read, now or later (see the module documentation of `live::recursive`). The root must be
    /// readable, exactly as for [`Engine::subscribe`].
    pub async fn subscribe_recursive(
        &self,
        caller: &Caller,
        pod: &str,
        path: &str,
        req: RecursiveRequest,
    ) -> Result<RecursiveSubscription> {
        let max_streams = self.inner.live.limits.max_recursive_streams.max(1);
        if req.after_paths.len() >= max_streams {
            return Err(too_many(max_streams, path));
        }
        for p in req.after_paths.keys() {
            check_stream_path(p)?;
            if p == path {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "afterPaths names the root stream; use after for it",
                ));
            }
            if !covers(path, p) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("afterPaths: {p:?} is not below {path:?}"),
                ));
            }
        }
        self.start_stream_resolver();
        let mut root = self.subscribe(caller, pod, path, req.live.clone()).await?;
        // The gauge counts this subscription, which outlives its root part.
        let gauge = root.gauge.take();
        let pod_row = self.pod(pod).await?;
        let hub = &self.inner.live;
        // Watch the pod and its permissions before listing: nothing created from now on is
        // missed.
        let pod_version = hub.trees.watch(pod_row.id);
        let perms = hub.perms.subscribe();
        let period = hub
            .limits
            .permission_recheck
            .max(Duration::from_millis(100));
        let mut relist_tick = tokio::time::interval_at(Instant::now() + period, period);
        relist_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let root_id = root.stream_id;
        let root_next = root.next;
        let mut sub = RecursiveSubscription {
            engine: self.clone(),
            caller: caller.clone(),
            pod: pod.to_string(),
            pod_id: pod_row.id,
            root_path: root.stream_path.clone(),
            head_at_start: root.head_at_start,
            token_expires_at: req.live.token_expires_at,
            expires: root.expires,
            max_streams,
            parts: FuturesUnordered::new(),
            followed: HashSet::from([root_id]),
            left: HashMap::new(),
            after_paths: req.after_paths,
            catching_up: HashSet::from([root_id]),
            caught_up: false,
            root_next,
            pod_version,
            perms,
            closing: hub.closing.subscribe(),
            relist_tick,
            relist: true,
            relist_at: Instant::now(),
            ended: None,
            gauge,
        };
        sub.parts.push(step_of(Part {
            sub: Box::new(root),
            next: root_next,
        }));
        sub.relist(true).await?;
        Ok(sub)
    }
}

impl RecursiveSubscription {
    /// The root stream's head index when the subscription started (`-1`: empty).
    pub fn head_index(&self) -> i64 {
        self.head_at_start
    }

    /// The root stream's path.
    pub fn stream_path(&self) -> &str {
        &self.root_path
    }

    /// Streams followed now.
    pub fn streams(&self) -> usize {
        self.followed.len()
    }

    /// The next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<RecursiveEvent, LiveEnd> {
        if let Some(end) = &self.ended {
            return Err(end.clone());
        }
        let step = self.step().await;
        if let Err(end) = &step {
            self.ended = Some(end.clone());
            self.parts = FuturesUnordered::new();
            self.followed.clear();
            self.gauge = None;
        }
        step
    }

    async fn step(&mut self) -> Result<RecursiveEvent, LiveEnd> {
        loop {
            if *self.closing.borrow() {
                return self.step_closing().await;
            }
            if !self.caught_up && self.catching_up.is_empty() {
                self.caught_up = true;
                return Ok(RecursiveEvent::CaughtUp {
                    next_index: self.root_next,
                });
            }
            if self.relist && Instant::now() >= self.relist_at {
                self.relist(false).await?;
                continue;
            }
            if let Some(event) = self.wait().await? {
                return Ok(event);
            }
        }
    }

    /// While the server closes tails: every part delivers what it has left (see
    /// [`Subscription`]'s close) and ends; once all have, so does this subscription.
    async fn step_closing(&mut self) -> Result<RecursiveEvent, LiveEnd> {
        while let Some((part, event)) = self.parts.next().await {
            let event = match event {
                Err(LiveEnd::Shutdown) => continue, // this part is done
                other => other,
            };
            if let Some(event) = self.on_part(part, event)? {
                return Ok(event);
            }
        }
        Err(LiveEnd::Shutdown)
    }

    /// Lists the pod's streams and follows the readable ones under the root not followed yet.
    /// `initial`: at subscribe time (they count for `caughtUp`, `after_paths` apply).
    async fn relist(&mut self, initial: bool) -> Result<()> {
        // Anything signalled from here on triggers another listing.
        self.pod_version.borrow_and_update();
        let engine = self.engine.clone();
        let pod = engine.pod(&self.pod).await?;
        if pod.id != self.pod_id {
            return Err(Error::new(ErrorKind::PodNotFound, "the pod was deleted"));
        }
        let rows = engine.inner.store.list_streams(pod.id).await?;
        engine
            .inner
            .live
            .trees
            .learn(pod.id, rows.iter().map(|s| s.id));
        let mut under = HashSet::new();
        let mut fresh: Vec<(StreamRow, Option<i64>)> = Vec::new();
        for s in rows {
            if !covers(&self.root_path, &s.path) {
                continue;
            }
            under.insert(s.id);
            if self.followed.contains(&s.id) {
                continue;
            }
            match engine.check_read(&pod, &s, &self.caller).await {
                Ok(()) => {}
                Err(e) if ends_one_stream(&e) || e.kind() == ErrorKind::PodForbidden => continue,
                Err(e) => return Err(e),
            }
            let after = match self.left.get(&s.id) {
                Some(&next) => (next > 0).then_some(next - 1),
                None => self.after_paths.get(&s.path).copied(),
            };
            fresh.push((s, after));
        }
        // Forget where deleted streams stopped.
        self.left.retain(|id, _| under.contains(id));
        if self.followed.len() + fresh.len() > self.max_streams {
            return Err(too_many(self.max_streams, &self.root_path));
        }
        if !fresh.is_empty() {
            let parts = open(
                &engine,
                &self.caller,
                &self.pod,
                self.token_expires_at,
                fresh,
            )
            .await?;
            for part in parts {
                let id = part.sub.stream_id;
                self.left.remove(&id);
                self.after_paths.remove(&part.sub.stream_path);
                if part.sub.stream_path == self.root_path {
                    self.root_next = part.next;
                }
                if initial {
                    self.catching_up.insert(id);
                }
                self.followed.insert(id);
                self.parts.push(step_of(part));
            }
        }
        self.relist = false;
        self.relist_at = Instant::now() + RELIST_GAP;
        Ok(())
    }

    /// Waits for something that can produce an event or calls for a listing.
    async fn wait(&mut self) -> Result<Option<RecursiveEvent>, LiveEnd> {
        #[allow(clippy::large_enum_variant)] // a record, on the stack for a moment
        enum Woke {
            Closing,
            Expired,
            Perm(Result<String, broadcast::error::RecvError>),
            Pod(bool),
            Relist,
            Due,
            Part(Option<(Part, Result<LiveEvent, LiveEnd>)>),
        }
        let expires = self.expires;
        let due = self.relist.then_some(self.relist_at);
        let until = |at: Option<Instant>| async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let has_parts = !self.parts.is_empty();
        let woke = tokio::select! {
            biased;
            _ = self.closing.changed() => Woke::Closing,
            () = until(expires) => Woke::Expired,
            p = self.perms.recv() => Woke::Perm(p),
            r = self.pod_version.changed() => Woke::Pod(r.is_ok()),
            _ = self.relist_tick.tick() => Woke::Relist,
            () = until(due) => Woke::Due,
            p = self.parts.next(), if has_parts => Woke::Part(p),
        };
        use broadcast::error::RecvError;
        match woke {
            // `step` lets the parts deliver what is left, then ends.
            Woke::Closing => Ok(None),
            Woke::Perm(Err(RecvError::Closed)) | Woke::Pod(false) => Err(LiveEnd::Shutdown),
            Woke::Expired => {
                Err(Error::new(ErrorKind::TokenExpired, "the token has expired").into())
            }
            Woke::Perm(Ok(pod)) if pod != self.pod => Ok(None),
            Woke::Perm(_) | Woke::Pod(true) | Woke::Relist => {
                // Coalesce a burst of permission signals into one listing.
                while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) =
                    self.perms.try_recv()
                {}
                self.relist = true;
                Ok(None)
            }
            Woke::Due | Woke::Part(None) => Ok(None),
            Woke::Part(Some((part, event))) => self.on_part(part, event),
        }
    }

    /// Turns a part's event into this subscription's event (if any).
    fn on_part(
        &mut self,
        mut part: Part,
        event: Result<LiveEvent, LiveEnd>,
    ) -> Result<Option<RecursiveEvent>, LiveEnd> {
        let id = part.sub.stream_id;
        let is_root = part.sub.stream_path == self.root_path;
        match event {
            Ok(LiveEvent::Record(record)) => {
                part.next = record.row.index + 1;
                if is_root {
                    self.root_next = part.next;
                }
                self.parts.push(step_of(part));
                Ok(Some(RecursiveEvent::Record(record)))
            }
            Ok(LiveEvent::CaughtUp { .. }) => {
                self.catching_up.remove(&id);
                self.parts.push(step_of(part));
                Ok(None)
            }
            Err(LiveEnd::Error(error)) if ends_one_stream(&error) => {
                self.followed.remove(&id);
                self.catching_up.remove(&id);
                self.left.insert(id, part.next);
                tracing::debug!(pod = %self.pod, stream = %part.sub.stream_path,
                    code = error.kind().code(), "recursive live tail: one stream ended");
                Ok(Some(RecursiveEvent::StreamEnded {
                    path: part.sub.stream_path.clone(),
                    error,
                }))
            }
            Err(end) => Err(end),
        }
    }
}

/// Subscribes to the feeds of these streams (each with its `after`), then reads their heads in
/// one query. (A free function: the subscription itself is not `Sync`, so it must not be
/// borrowed across an await.)
async fn open(
    engine: &Engine,
    caller: &Caller,
    pod: &str,
    token_expires_at: Option<i64>,
    streams: Vec<(StreamRow, Option<i64>)>,
) -> Result<Vec<Part>> {
    let hub = &engine.inner.live;
    let ids: Vec<i64> = streams.iter().map(|(s, _)| s.id).collect();
    let feeds: Vec<_> = streams
        .into_iter()
        .map(|(s, after)| (PendingFeed::new(hub, s.id), s, after))
        .collect();
    let heads: HashMap<i64, i64> = engine
        .inner
        .store
        .stream_heads(&ids)
        .await?
        .into_iter()
        .collect();
    let mut parts = Vec::with_capacity(feeds.len());
    for (feed, s, after) in feeds {
        // Absent: deleted meanwhile (dropping the feed releases it).
        let Some(&head) = heads.get(&s.id) else {
            continue;
        };
        let sub = engine.open_subscription(
            caller,
            pod,
            feed,
            Opening {
                stream_path: s.path,
                head,
                after,
                token_expires_at,
            },
        );
        parts.push(Part {
            next: sub.next,
            sub: Box::new(sub),
        });
    }
    Ok(parts)
}

impl Drop for RecursiveSubscription {
    fn drop(&mut self) {
        self.engine.inner.live.trees.unwatch(self.pod_id);
    }
}

impl std::fmt::Debug for RecursiveSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecursiveSubscription")
            .field("pod", &self.pod)
            .field("root", &self.root_path)
            .field("streams", &self.followed.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_paths() {
        assert!(covers("", "a/b"));
        assert!(covers("a", "a"));
        assert!(covers("a", "a/b/c"));
        assert!(!covers("a", "ab"));
        assert!(!covers("a/b", "a"));
        assert!(!covers("a", "b/a"));
    }

    #[test]
    fn directory_signals_only_new_streams_of_watched_pods() {
        let dir = Directory::default();
        dir.appended(1); // nobody watches: ignored
        assert!(dir.take_unresolved().0.is_empty());
        let mut rx = dir.watch(7);
        dir.learn(7, [1, 2].into_iter());
        dir.appended(1);
        dir.appended(3);
        dir.appended(4);
        let (mut ids, overflow) = dir.take_unresolved();
        ids.sort_unstable();
        assert_eq!((ids, overflow), (vec![3, 4], false));
        assert!(!rx.has_changed().unwrap_or(true));
        dir.resolved(&[(3, 8)]); // another pod
        assert!(!rx.has_changed().unwrap_or(true));
        dir.resolved(&[(4, 7)]);
        assert!(rx.has_changed().unwrap_or(false));
        rx.borrow_and_update();
        dir.appended(4); // known now
        assert!(dir.take_unresolved().0.is_empty());
        dir.rescan();
        assert!(rx.has_changed().unwrap_or(false));
        dir.unwatch(7);
        dir.appended(5);
        assert!(dir.take_unresolved().0.is_empty());
    }
}
