//! One ractor actor per active stream: it serializes that stream's appends with group commit.
//!
//! - `Append` queues the entry; if no commit is in flight, one starts at once.
//! - A commit takes everything queued (up to the record/byte caps), commits it in a spawned task
//!   and answers every entry from that task **after** the commit. The actor learns the outcome
//!   through `CommitDone` and starts the next commit if more queued meanwhile: batches grow
//!   with load, with no timer.
//! - Two ways to commit. **Fast**: the actor knows the chain head (from its last commit), so
//!   the task chains the batch onto it and hands it to the [`Writer`], which commits it together
//!   with other streams' batches in one compare-and-swap statement. **Locking**: when the head
//!   is unknown (a fresh actor), the swap failed (another instance appended, a child stream
//!   appeared), or the batch needs more than the head (idempotency keys, purges, an owner
//!   change, a precondition that fails on the cached head), one transaction locks the stream
//!   row and builds the batch on the head as stored (`Store::append_batch`).
//! - On PostgreSQL a large fast-path batch (at least [`SPLIT_RECORDS`] records, two entries or
//!   more) is split at an entry boundary into a lead and a follower chained onto it, committed by
//!   two overlapping statements ([`Writer::commit_pair`]): the follower inserts while the lead
//!   commits and is kept only if the lead was. If only the lead was written, the remaining
//!   entries take the locking path within the same commit, so order is kept.
//! - A failed commit answers every entry of its batch with the error; nothing of it is stored.
//!   A failure that may have been applied (the connection broke mid-statement) is never retried
//!   by the locking path: that could store the batch twice.
//! - An idle actor leaves the registry and drains; so do the least recently active ones when
//!   more than [`ActorLimits::max_alive`] are alive, so that memory stays bounded however many
//!   streams are written within one idle timeout. An `Append` that reaches an actor that is
//!   stopping is handed back ([`AppendReply::Retry`] or the send error) and the engine resends it
//!   to a fresh actor: such an entry was never part of a transaction, so the retry is safe.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use webpods_storage::{BatchContext, BatchPlan, ChainedBatch, Head, RecordRow, Store};

use crate::batch::{self, Entry, EntryOutcome, StreamCtx};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::live::LiveHub;
use crate::metrics::Metrics;
use crate::read_cache::ReadCache;
use crate::writer::{Outcome, Writer};

/// The records an entry ended up with, and whether they were replayed from an idempotency key.
#[derive(Debug)]
pub(crate) struct Committed {
    /// Every record of the commit, shared by the entries' answers (no copy per entry).
    records: Arc<Vec<RecordRow>>,
    range: std::ops::Range<usize>,
    pub replayed: bool,
}

impl Committed {
    /// This entry's records.
    pub fn rows(&self) -> &[RecordRow] {
        &self.records[self.range.clone()]
    }
}

/// The answer to an `Append`.
#[derive(Debug)]
pub(crate) enum AppendReply {
    Done(Result<Committed>),
    /// The actor stopped before this entry joined a batch; send it again.
    Retry(Entry),
    /// The stream's row is gone (deleted, maybe through another instance): nothing of the entry
    /// was written, and it comes back so the caller can look the stream up again.
    StreamGone(Entry),
}

/// What became of a submitted entry.
pub(crate) enum Submitted {
    Committed(Committed),
    /// See [`AppendReply::StreamGone`].
    StreamGone(Entry),
}

pub(crate) enum StreamMsg {
    Append(Entry, oneshot::Sender<AppendReply>),
    /// The in-flight commit finished: the chain as it stands after it, `None` when unknown
    /// (the next commit then takes the locking path).
    CommitDone(Option<Chain>),
    /// From the idle sweeper ([`sweep_idle`]): stop if idle for the timeout with nothing queued
    /// or in flight.
    IdleCheck,
    /// The registry has let this actor go (too many alive): stop once the mailbox is handled.
    Evict,
    /// Answer once nothing is queued or in flight.
    Flush(oneshot::Sender<()>),
}

/// Limits of one group-commit batch and of an actor's idle life.
#[derive(Debug, Clone, Copy)]
pub struct ActorLimits {
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    pub idle_timeout: Duration,
    /// Stream actors alive at most (each holds a few kilobytes); beyond it, the least recently
    /// active are stopped early.
    pub max_alive: usize,
}

/// Milliseconds since the first call: the clock of actors' last activity.
fn ticks() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64
}

/// Whether an actor last active at `active` ([`ticks`]) has been idle for `timeout`.
fn idle_for(active: &AtomicU64, timeout: Duration) -> bool {
    u128::from(ticks().saturating_sub(active.load(Ordering::Relaxed))) >= timeout.as_millis()
}

/// The committed end of a stream's chain as an actor last saw it, with the stream's child
/// version (see [`ChainedBatch`]). Another instance may have moved it since: the fast path's
/// compare-and-swap finds out.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    head: Head,
    child_version: i64,
}

/// What every stream actor of an engine shares.
pub(crate) struct ActorEnv {
    pub store: Store,
    /// Where committed batches are published for live tails.
    pub live: Arc<LiveHub>,
    /// Cached reads: a commit bumps the stream's generation before any receipt is sent.
    pub reads: Arc<ReadCache>,
    pub writer: Writer,
    pub limits: ActorLimits,
    pub registry: Registry,
}

pub(crate) struct StreamActor;

pub(crate) struct StreamArgs {
    pub ctx: Arc<StreamCtx>,
    /// When the actor was last active ([`ticks`]), shared with the registry.
    pub active: Arc<AtomicU64>,
    pub env: Arc<ActorEnv>,
}

pub(crate) struct StreamState {
    args: StreamArgs,
    pending: VecDeque<(Entry, oneshot::Sender<AppendReply>)>,
    committing: bool,
    chain: Option<Chain>,
    flushers: Vec<oneshot::Sender<()>>,
}

impl Actor for StreamActor {
    type Msg = StreamMsg;
    type State = StreamState;
    type Arguments = StreamArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<StreamMsg>,
        args: StreamArgs,
    ) -> Result<StreamState, ActorProcessingErr> {
        Ok(StreamState {
            args,
            pending: VecDeque::new(),
            committing: false,
            chain: None,
            flushers: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<StreamMsg>,
        msg: StreamMsg,
        state: &mut StreamState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StreamMsg::Append(entry, reply) => {
                state.args.active.store(ticks(), Ordering::Relaxed);
                state.pending.push_back((entry, reply));
                start_commit(&myself, state);
            }
            StreamMsg::CommitDone(chain) => {
                state.committing = false;
                state.args.active.store(ticks(), Ordering::Relaxed);
                state.chain = chain;
                start_commit(&myself, state);
            }
            StreamMsg::IdleCheck => {
                let idle = idle_for(&state.args.active, state.args.env.limits.idle_timeout);
                if idle && !state.committing && state.pending.is_empty() {
                    state
                        .args
                        .env
                        .registry
                        .remove(state.args.ctx.stream_id, &myself);
                    // Anything already in the mailbox is still handled; later sends bounce.
                    let _ = myself.drain();
                }
            }
            StreamMsg::Evict => {
                // Out of the registry already, so no new entry comes here. A commit in flight
                // still answers its callers; entries queued are handed back (`post_stop`).
                let _ = myself.drain();
            }
            StreamMsg::Flush(done) => {
                state.flushers.push(done);
                answer_flushers(state);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<StreamMsg>,
        state: &mut StreamState,
    ) -> Result<(), ActorProcessingErr> {
        state
            .args
            .env
            .registry
            .remove(state.args.ctx.stream_id, &myself);
        for (entry, reply) in state.pending.drain(..) {
            let _ = reply.send(AppendReply::Retry(entry));
        }
        Ok(())
    }
}

fn answer_flushers(state: &mut StreamState) {
    if !state.committing && state.pending.is_empty() {
        for f in state.flushers.drain(..) {
            let _ = f.send(());
        }
    }
}

/// Starts a commit of everything queued, unless one is in flight.
fn start_commit(myself: &ActorRef<StreamMsg>, state: &mut StreamState) {
    if state.committing || state.pending.is_empty() {
        answer_flushers(state);
        return;
    }
    let limits = state.args.env.limits;
    let (mut records, mut bytes) = (0usize, 0usize);
    let mut batch = Vec::new();
    while let Some((entry, _)) = state.pending.front() {
        let (r, b) = (entry.records.len(), entry.bytes());
        if !batch.is_empty()
            && (records + r > limits.max_batch_records || bytes + b > limits.max_batch_bytes)
        {
            break;
        }
        records += r;
        bytes += b;
        if let Some(item) = state.pending.pop_front() {
            batch.push(item);
        }
    }
    state.committing = true;
    let env = state.args.env.clone();
    let ctx = state.args.ctx.clone();
    let chain = state.chain.take();
    let me = myself.clone();
    tokio::spawn(async move {
        let (chain, answers) = commit(&env, &ctx, chain, batch).await.unzip();
        // The actor first, so that its next commit is queued to run ahead of the request
        // tasks the answers wake (each writes its response before yielding). Answering first
        // left one stream without a statement in flight a third of the time under load.
        // If the actor is gone the next one reloads the head from storage anyway.
        let _ = me.send_message(StreamMsg::CommitDone(chain));
        if let Some(answers) = answers {
            answers.send();
        }
    });
}

type Replies = Vec<oneshot::Sender<AppendReply>>;
type Outcomes = Vec<Result<EntryOutcome, Error>>;

/// Commits the batch (fast path if it can, else the locking path) and returns the chain as it
/// stands afterwards, with the answers to the committed entries still to send; `None` when it
/// failed, its entries answered here (the next commit then finds the head in storage).
async fn commit(
    env: &ActorEnv,
    ctx: &StreamCtx,
    chain: Option<Chain>,
    batch: Vec<(Entry, oneshot::Sender<AppendReply>)>,
) -> Option<(Chain, Answers)> {
    let mut started = Instant::now();
    let (mut entries, mut replies): (Vec<Entry>, Replies) = batch.into_iter().unzip();
    if let Some(chain) = chain {
        match commit_chained(env, ctx, &chain, &entries).await {
            Fast::Written(plan, outcomes) => {
                let chain = Chain {
                    head: head_after(&plan, chain.head),
                    child_version: chain.child_version,
                };
                return Some((chain, finish(env, ctx, plan, outcomes, replies, started)));
            }
            Fast::LeadWritten {
                plan,
                outcomes,
                rest,
            } => {
                // The first entries are committed; the rest were not written (or may have
                // been: then they are answered with the error, as any uncertain commit is).
                let rest_entries = entries.split_off(outcomes.len());
                let rest_replies = replies.split_off(outcomes.len());
                finish(env, ctx, plan, outcomes, replies, started).send();
                if let Some(err) = rest {
                    fail(env, ctx, rest_replies, err);
                    return None;
                }
                (entries, replies) = (rest_entries, rest_replies);
                // The rest is a commit of its own (the commit-duration metric).
                started = Instant::now();
            }
            Fast::NotTaken => {}
            Fast::Failed(err) => {
                fail(env, ctx, replies, err);
                return None;
            }
        }
    }
    let probe = batch::probe(&entries);
    let mut attempts = 0;
    let result = loop {
        // Boxed: the locking transaction's future is large, and would otherwise make every
        // commit task (mostly fast-path ones) that large to spawn.
        let result = Box::pin(env.store.append_batch(ctx.stream_id, &probe, |bctx| {
            let (head, child_version) = (bctx.head.clone(), bctx.child_version);
            let (plan, outcomes) = batch::build(bctx, ctx, &entries, now_ms());
            (plan, (outcomes, head, child_version))
        }))
        .await;
        // A lock cycle with another instance's overlapping commit (its follower holds records
        // our indices need while it waits for our row): PostgreSQL rolled one side back.
        match result {
            Err(e) if e.is_conflict() && attempts < LOCKING_ATTEMPTS => attempts += 1,
            result => break result,
        }
    };
    match result {
        Ok((plan, (outcomes, head, child_version))) => {
            let chain = Chain {
                head: head_after(&plan, head),
                child_version,
            };
            Some((chain, finish(env, ctx, plan, outcomes, replies, started)))
        }
        Err(webpods_storage::Error::StreamNotFound(_)) => {
            for (entry, reply) in entries.into_iter().zip(replies) {
                let _ = reply.send(AppendReply::StreamGone(entry));
            }
            None
        }
        Err(e) => {
            fail(env, ctx, replies, Error::from(e));
            None
        }
    }
}

/// Tries of the locking path when PostgreSQL rolls it back for a conflict ([`is_conflict`]).
///
/// [`is_conflict`]: webpods_storage::Error::is_conflict
const LOCKING_ATTEMPTS: u32 = 3;

enum Fast {
    Written(BatchPlan, Outcomes),
    /// Split batch: the entries of `outcomes` (the first ones) are committed as `plan`. The
    /// others were not written and take the locking path — unless `rest` holds an error, when
    /// they may have been written and are answered with it.
    LeadWritten {
        plan: BatchPlan,
        outcomes: Outcomes,
        rest: Option<Error>,
    },
    /// Not committed, nothing written: take the locking path.
    NotTaken,
    /// Failed in a way that may have written the batch: answer with the error.
    Failed(Error),
}

/// A batch of at least this many records and two entries or more is committed as two
/// overlapping statements (on a store that [`overlaps_commits`](Store::overlaps_commits)): one
/// stream's commits are otherwise strictly one after another, and a large batch kept one
/// PostgreSQL backend busy while the other core idled (`benches/load/run.sh`, batches of 100).
const SPLIT_RECORDS: usize = 64;

/// The fast path: chain the batch onto the cached head and let the [`Writer`] swap it in.
async fn commit_chained(env: &ActorEnv, ctx: &StreamCtx, chain: &Chain, entries: &[Entry]) -> Fast {
    if entries
        .iter()
        .any(|e| e.purge || e.idempotency_key.is_some())
    {
        return Fast::NotTaken;
    }
    let bctx = BatchContext {
        head: chain.head.clone(),
        // Checked by the swap itself: a name taken by a child stream makes it fail.
        conflicting_names: Default::default(),
        existing_keys: Default::default(),
        child_version: chain.child_version,
    };
    let (plan, outcomes) = batch::build(bctx, ctx, entries, now_ms());
    let simple =
        plan.idempotency_keys.is_empty() && plan.purges.is_empty() && plan.pod_owner.is_none();
    // A refusal (a failed precondition) is only exact on the stored head: let the lock decide.
    if !simple || plan.records.is_empty() || outcomes.iter().any(|o| o.is_err()) {
        return Fast::NotTaken;
    }
    let chained = |expected: Head, records: Vec<RecordRow>| ChainedBatch {
        stream_id: ctx.stream_id,
        expected,
        child_version: chain.child_version,
        records,
    };
    let split = if env.store.overlaps_commits() && plan.records.len() >= SPLIT_RECORDS {
        split_point(&outcomes, plan.records.len())
    } else {
        None
    };
    let Some((lead_entries, lead_records)) = split else {
        return match env
            .writer
            .commit(chained(chain.head.clone(), plan.records))
            .await
        {
            Outcome::Written(records) => Fast::Written(appending(records), outcomes),
            Outcome::Stale
            | Outcome::Failed {
                retry_safe: true, ..
            } => Fast::NotTaken,
            Outcome::Failed { error, .. } => Fast::Failed(error),
        };
    };
    let mut records = plan.records;
    let tail = records.split_off(lead_records);
    let Some(lead_head) = records.last().map(head_at) else {
        return Fast::NotTaken;
    };
    let (lead, follower) = env
        .writer
        .commit_pair(
            chained(chain.head.clone(), records),
            chained(lead_head, tail),
        )
        .await;
    let mut outcomes = outcomes;
    match (lead, follower) {
        (Outcome::Written(mut records), Outcome::Written(tail)) => {
            records.extend(tail);
            Fast::Written(appending(records), outcomes)
        }
        (Outcome::Written(records), follower) => {
            outcomes.truncate(lead_entries);
            let rest = match follower {
                Outcome::Failed {
                    error,
                    retry_safe: false,
                } => Some(error),
                _ => None,
            };
            Fast::LeadWritten {
                plan: appending(records),
                outcomes,
                rest,
            }
        }
        (
            Outcome::Failed {
                error,
                retry_safe: false,
            },
            _,
        ) => Fast::Failed(error),
        // A follower's swap needs the lead's last record as the stored head: it cannot
        // commit without its lead. Should it ever, the outcome is unknown, as above.
        (_, Outcome::Written(_)) => Fast::Failed(Error::Internal(
            "a follower committed although its lead did not".into(),
        )),
        // The lead was not written, so neither was the follower.
        _ => Fast::NotTaken,
    }
}

/// Where to split a batch for [`Writer::commit_pair`]: the number of entries of the lead and
/// the number of records they hold, about half of `total`; `None` for a single entry (an
/// entry is atomic).
fn split_point(outcomes: &Outcomes, total: usize) -> Option<(usize, usize)> {
    let mut records = 0;
    for (i, outcome) in outcomes.iter().enumerate() {
        if let Ok(EntryOutcome::Appended(range)) = outcome {
            records = range.end;
        }
        if records * 2 >= total {
            return (i + 1 < outcomes.len()).then_some((i + 1, records));
        }
    }
    None
}

/// The head after `plan`: its last record, or `before` when it wrote none.
fn head_after(plan: &BatchPlan, before: Head) -> Head {
    plan.records.last().map_or(before, head_at)
}

/// The head that `record` is when it is a stream's last.
fn head_at(record: &RecordRow) -> Head {
    Head {
        index: record.index,
        hash: Some(record.hash.clone()),
        timestamp: record.timestamp,
    }
}

/// A plan that only appends `records` (what the fast path commits).
fn appending(records: Vec<RecordRow>) -> BatchPlan {
    BatchPlan {
        records,
        ..BatchPlan::default()
    }
}

/// After a commit: mark cached reads stale, publish to live tails, count, and return the
/// answers to each entry.
fn finish(
    env: &ActorEnv,
    ctx: &StreamCtx,
    plan: BatchPlan,
    outcomes: Outcomes,
    replies: Replies,
    started: Instant,
) -> Answers {
    // Committed: cached reads of the stream are stale from now on, and live tails may see it
    // (before the next batch of this stream commits).
    if !plan.records.is_empty() {
        env.reads.appended(ctx.stream_id);
    }
    env.live.publish(&env.store, ctx.stream_id, &plan.records);
    env.registry
        .metrics
        .observe_commit(plan.records.len(), started.elapsed());
    Answers {
        records: Arc::new(plan.records),
        outcomes,
        replies,
    }
}

/// The answers to a committed batch's entries, built once the commit is durable and its
/// effects published ([`finish`]), sent by [`Answers::send`].
#[must_use = "the entries wait for their answers"]
struct Answers {
    records: Arc<Vec<RecordRow>>,
    outcomes: Outcomes,
    replies: Replies,
}

impl Answers {
    fn send(self) {
        let Answers {
            records,
            outcomes,
            replies,
        } = self;
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let done = outcome.map(|o| match o {
                EntryOutcome::Appended(range) => Committed {
                    records: records.clone(),
                    range,
                    replayed: false,
                },
                EntryOutcome::Replayed(rows) => Committed {
                    range: 0..rows.len(),
                    records: Arc::new(rows),
                    replayed: true,
                },
            });
            let _ = reply.send(AppendReply::Done(done));
        }
    }
}

fn fail(env: &ActorEnv, ctx: &StreamCtx, replies: Replies, err: Error) {
    tracing::warn!(stream_id = ctx.stream_id, error = %err, "batch commit failed");
    env.registry.metrics.observe_failed_commit();
    for reply in replies {
        let _ = reply.send(AppendReply::Done(Err(err.clone())));
    }
}

/// The live stream actors of this instance, by stream id, and the metrics every actor feeds.
#[derive(Default)]
pub(crate) struct Registry {
    actors: Mutex<HashMap<i64, Registered>>,
    pub metrics: Arc<Metrics>,
}

struct Registered {
    actor: ActorRef<StreamMsg>,
    /// When it was last active ([`ticks`]).
    active: Arc<AtomicU64>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Registered>> {
        // A poisoned map is still a valid map: every operation on it is a single insert/remove.
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, stream_id: i64) -> Option<ActorRef<StreamMsg>> {
        self.lock().get(&stream_id).map(|r| r.actor.clone())
    }

    /// Registers `actor` unless another one won the race; returns the registered one, and how
    /// many actors are registered now.
    fn insert_or_get(
        &self,
        stream_id: i64,
        actor: ActorRef<StreamMsg>,
        active: Arc<AtomicU64>,
    ) -> (ActorRef<StreamMsg>, usize) {
        let mut map = self.lock();
        let registered = map
            .entry(stream_id)
            .or_insert(Registered { actor, active })
            .actor
            .clone();
        (registered, map.len())
    }

    /// Forgets `actor` if it is still the one registered for the stream.
    pub fn remove(&self, stream_id: i64, actor: &ActorRef<StreamMsg>) {
        let mut map = self.lock();
        if map
            .get(&stream_id)
            .is_some_and(|r| r.actor.get_id() == actor.get_id())
        {
            map.remove(&stream_id);
        }
    }

    /// Lets the `n` least recently active actors go: out of the registry at once (a new
    /// append to their stream starts a fresh actor), and each told to stop.
    fn evict(&self, n: usize) {
        let evicted: Vec<ActorRef<StreamMsg>> = {
            let mut map = self.lock();
            let mut by_age: Vec<(u64, i64)> = map
                .iter()
                .map(|(id, r)| (r.active.load(Ordering::Relaxed), *id))
                .collect();
            let n = n.min(by_age.len());
            if n == 0 {
                return;
            }
            by_age.select_nth_unstable(n - 1);
            by_age[..n]
                .iter()
                .filter_map(|(_, id)| map.remove(id))
                .map(|r| r.actor)
                .collect()
        };
        self.metrics.observe_evicted_actors(evicted.len());
        for actor in evicted {
            let _ = actor.send_message(StreamMsg::Evict);
        }
    }

    /// The actors idle for at least `timeout`.
    fn idle(&self, timeout: Duration) -> Vec<ActorRef<StreamMsg>> {
        self.lock()
            .values()
            .filter(|r| idle_for(&r.active, timeout))
            .map(|r| r.actor.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn all(&self) -> Vec<ActorRef<StreamMsg>> {
        self.lock().values().map(|r| r.actor.clone()).collect()
    }
}

/// Every half idle timeout, asks the actors idle that long to check themselves (each stops if
/// nothing is queued or in flight): one timer for all actors, not one each. Ends once the
/// engine and its actors are gone.
pub(crate) fn sweep_idle(env: &Arc<ActorEnv>) {
    let period = (env.limits.idle_timeout / 2).max(Duration::from_millis(50));
    let env = Arc::downgrade(env);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(env) = env.upgrade() else {
                return;
            };
            for actor in env.registry.idle(env.limits.idle_timeout) {
                let _ = actor.send_message(StreamMsg::IdleCheck);
            }
        }
    });
}

/// Spawns (or finds) the actor of a stream.
pub(crate) async fn actor_for(
    env: &Arc<ActorEnv>,
    ctx: &Arc<StreamCtx>,
) -> Result<ActorRef<StreamMsg>> {
    let registry = &env.registry;
    if let Some(a) = registry.get(ctx.stream_id) {
        return Ok(a);
    }
    let active = Arc::new(AtomicU64::new(ticks()));
    let args = StreamArgs {
        ctx: ctx.clone(),
        active: active.clone(),
        env: env.clone(),
    };
    let (actor, _join) = Actor::spawn(None, StreamActor, args)
        .await
        .map_err(|e| Error::Internal(format!("spawning a stream actor: {e}")))?;
    let (registered, alive) = registry.insert_or_get(ctx.stream_id, actor.clone(), active);
    if registered.get_id() != actor.get_id() {
        actor.stop(None);
    } else {
        // Over the cap: a tenth more than the excess goes, so that eviction is not a scan of
        // the registry per new actor.
        let max = env.limits.max_alive.max(1);
        if alive > max {
            registry.evict(alive - max + max / 10);
        }
    }
    Ok(registered)
}

/// Sends an entry to its stream's actor and waits for the committed outcome, resending it to a
/// fresh actor when the first one was stopping.
pub(crate) async fn submit(
    env: &Arc<ActorEnv>,
    ctx: &Arc<StreamCtx>,
    mut entry: Entry,
) -> Result<Submitted> {
    loop {
        let actor = actor_for(env, ctx).await?;
        let (tx, rx) = oneshot::channel();
        match actor.send_message(StreamMsg::Append(entry, tx)) {
            Ok(()) => {}
            Err(ractor::MessagingErr::SendErr(StreamMsg::Append(back, _))) => {
                env.registry.remove(ctx.stream_id, &actor);
                entry = back;
                continue;
            }
            Err(e) => return Err(Error::Internal(format!("stream actor refused: {e}"))),
        }
        match rx.await {
            Ok(AppendReply::Done(result)) => return result.map(Submitted::Committed),
            Ok(AppendReply::Retry(back)) => entry = back,
            Ok(AppendReply::StreamGone(back)) => return Ok(Submitted::StreamGone(back)),
            Err(_) => {
                return Err(Error::Internal(
                    "the stream actor stopped before answering".into(),
                ));
            }
        }
    }
}

/// Waits until every actor has committed what it had queued, then stops them.
pub(crate) async fn flush_all(registry: &Registry) {
    let actors = registry.all();
    let mut waits = Vec::with_capacity(actors.len());
    for a in &actors {
        let (tx, rx) = oneshot::channel();
        if a.send_message(StreamMsg::Flush(tx)).is_ok() {
            waits.push(rx);
        }
    }
    for w in waits {
        let _ = w.await;
    }
    for a in actors {
        a.stop(None);
    }
}
