//! One ractor actor per active stream: it serializes that stream's appends with group commit.
//!
//! - `Append` queues the entry; if no commit is in flight, one starts at once.
//! - A commit takes everything queued (up to the record/byte caps), runs one storage transaction
//!   in a spawned task and answers every entry from that task **after** the commit. The actor
//!   learns the outcome through `CommitDone` and starts the next commit if more queued meanwhile:
//!   batches grow with load, with no timer.
//! - A failed commit answers every entry of its batch with the error; nothing of it is stored.
//! - An idle actor leaves the registry and drains. An `Append` that reaches an actor that is
//!   stopping is handed back ([`AppendReply::Retry`] or the send error) and the engine resends it
//!   to a fresh actor: such an entry was never part of a transaction, so the retry is safe.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use webpods_storage::{Head, RecordRow, Store};

use crate::batch::{self, Entry, EntryOutcome, StreamCtx};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::live::LiveHub;
use crate::metrics::Metrics;

/// The records an entry ended up with, and whether they were replayed from an idempotency key.
#[derive(Debug)]
pub(crate) struct Committed {
    pub rows: Vec<RecordRow>,
    pub replayed: bool,
}

/// The answer to an `Append`.
#[derive(Debug)]
pub(crate) enum AppendReply {
    Done(Result<Committed>),
    /// The actor stopped before this entry joined a batch; send it again.
    Retry(Entry),
}

pub(crate) enum StreamMsg {
    Append(Entry, oneshot::Sender<AppendReply>),
    /// The in-flight commit finished; `Some(head)` when it wrote records.
    CommitDone(Option<Head>),
    IdleCheck,
    /// Answer once nothing is queued or in flight.
    Flush(oneshot::Sender<()>),
}

/// Limits of one group-commit batch and of an actor's idle life.
#[derive(Debug, Clone, Copy)]
pub struct ActorLimits {
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    pub idle_timeout: Duration,
}

pub(crate) struct StreamActor;

pub(crate) struct StreamArgs {
    pub ctx: Arc<StreamCtx>,
    pub store: Store,
    pub limits: ActorLimits,
    pub registry: Arc<Registry>,
    /// Where committed batches are published for live tails.
    pub live: Arc<LiveHub>,
}

pub(crate) struct StreamState {
    args: StreamArgs,
    pending: VecDeque<(Entry, oneshot::Sender<AppendReply>)>,
    committing: bool,
    /// The head after our last commit (another instance may have moved it since).
    head: Option<Head>,
    last_active: Instant,
    flushers: Vec<oneshot::Sender<()>>,
}

impl Actor for StreamActor {
    type Msg = StreamMsg;
    type State = StreamState;
    type Arguments = StreamArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<StreamMsg>,
        args: StreamArgs,
    ) -> Result<StreamState, ActorProcessingErr> {
        let period = (args.limits.idle_timeout / 2).max(Duration::from_millis(50));
        myself.send_interval(period, || StreamMsg::IdleCheck);
        Ok(StreamState {
            args,
            pending: VecDeque::new(),
            committing: false,
            head: None,
            last_active: Instant::now(),
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
                state.last_active = Instant::now();
                state.pending.push_back((entry, reply));
                start_commit(&myself, state);
            }
            StreamMsg::CommitDone(head) => {
                state.committing = false;
                state.last_active = Instant::now();
                if head.is_some() {
                    state.head = head;
                }
                start_commit(&myself, state);
            }
            StreamMsg::IdleCheck => {
                let idle = state.last_active.elapsed() >= state.args.limits.idle_timeout;
                if idle && !state.committing && state.pending.is_empty() {
                    state
                        .args
                        .registry
                        .remove(state.args.ctx.stream_id, &myself);
                    // Anything already in the mailbox is still handled; later sends bounce.
                    let _ = myself.drain();
                }
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
    let limits = state.args.limits;
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
    let store = state.args.store.clone();
    let ctx = state.args.ctx.clone();
    let live = state.args.live.clone();
    let me = myself.clone();
    let metrics = state.args.registry.metrics.clone();
    tokio::spawn(async move {
        let head = commit(&store, &ctx, &live, batch, &metrics).await;
        // If the actor is gone the next one reloads the head from storage anyway.
        let _ = me.send_message(StreamMsg::CommitDone(head));
    });
}

/// Runs one transaction for the batch and answers each entry. Returns the new head.
async fn commit(
    store: &Store,
    ctx: &StreamCtx,
    live: &LiveHub,
    batch: Vec<(Entry, oneshot::Sender<AppendReply>)>,
    metrics: &Metrics,
) -> Option<Head> {
    let started = Instant::now();
    let (entries, replies): (Vec<Entry>, Vec<_>) = batch.into_iter().unzip();
    let probe = batch::probe(&entries);
    let result = store
        .append_batch(ctx.stream_id, &probe, |bctx| {
            batch::build(bctx, ctx, &entries, now_ms())
        })
        .await;
    match result {
        Ok((plan, outcomes)) => {
            // Committed: live tails may see it (before the next batch of this stream commits).
            live.publish(store, ctx.stream_id, &plan.records);
            metrics.observe_commit(plan.records.len(), started.elapsed());
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let done = outcome.map(|o| match o {
                    EntryOutcome::Appended(range) => Committed {
                        rows: plan.records[range].to_vec(),
                        replayed: false,
                    },
                    EntryOutcome::Replayed(rows) => Committed {
                        rows,
                        replayed: true,
                    },
                });
                let _ = reply.send(AppendReply::Done(done));
            }
            plan.records.last().map(|r| Head {
                index: r.index,
                hash: Some(r.hash.clone()),
                timestamp: r.timestamp,
            })
        }
        Err(e) => {
            tracing::warn!(stream_id = ctx.stream_id, error = %e, "batch commit failed");
            metrics.observe_failed_commit();
            let err = Error::from(e);
            for reply in replies {
                let _ = reply.send(AppendReply::Done(Err(err.clone())));
            }
            None
        }
    }
}

/// The live stream actors of this instance, by stream id, and the metrics every actor feeds.
#[derive(Default)]
pub(crate) struct Registry {
    actors: Mutex<HashMap<i64, ActorRef<StreamMsg>>>,
    pub metrics: Arc<Metrics>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, ActorRef<StreamMsg>>> {
        // A poisoned map is still a valid map: every operation on it is a single insert/remove.
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, stream_id: i64) -> Option<ActorRef<StreamMsg>> {
        self.lock().get(&stream_id).cloned()
    }

    /// Registers `actor` unless another one won the race; returns the registered one.
    pub fn insert_or_get(&self, stream_id: i64, actor: ActorRef<StreamMsg>) -> ActorRef<StreamMsg> {
        self.lock().entry(stream_id).or_insert(actor).clone()
    }

    /// Forgets `actor` if it is still the one registered for the stream.
    pub fn remove(&self, stream_id: i64, actor: &ActorRef<StreamMsg>) {
        let mut map = self.lock();
        if map
            .get(&stream_id)
            .is_some_and(|a| a.get_id() == actor.get_id())
        {
            map.remove(&stream_id);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn all(&self) -> Vec<ActorRef<StreamMsg>> {
        self.lock().values().cloned().collect()
    }
}

/// Spawns (or finds) the actor of a stream.
pub(crate) async fn actor_for(
    registry: &Arc<Registry>,
    ctx: &Arc<StreamCtx>,
    store: &Store,
    live: &Arc<LiveHub>,
    limits: ActorLimits,
) -> Result<ActorRef<StreamMsg>> {
    if let Some(a) = registry.get(ctx.stream_id) {
        return Ok(a);
    }
    let args = StreamArgs {
        ctx: ctx.clone(),
        store: store.clone(),
        limits,
        registry: registry.clone(),
        live: live.clone(),
    };
    let (actor, _join) = Actor::spawn(None, StreamActor, args)
        .await
        .map_err(|e| Error::Internal(format!("spawning a stream actor: {e}")))?;
    let registered = registry.insert_or_get(ctx.stream_id, actor.clone());
    if registered.get_id() != actor.get_id() {
        actor.stop(None);
    }
    Ok(registered)
}

/// Sends an entry to its stream's actor and waits for the committed outcome, resending it to a
/// fresh actor when the first one was stopping.
pub(crate) async fn submit(
    registry: &Arc<Registry>,
    ctx: &Arc<StreamCtx>,
    store: &Store,
    live: &Arc<LiveHub>,
    limits: ActorLimits,
    mut entry: Entry,
) -> Result<Committed> {
    loop {
        let actor = actor_for(registry, ctx, store, live, limits).await?;
        let (tx, rx) = oneshot::channel();
        match actor.send_message(StreamMsg::Append(entry, tx)) {
            Ok(()) => {}
            Err(ractor::MessagingErr::SendErr(StreamMsg::Append(back, _))) => {
                registry.remove(ctx.stream_id, &actor);
                entry = back;
                continue;
            }
            Err(e) => return Err(Error::Internal(format!("stream actor refused: {e}"))),
        }
        match rx.await {
            Ok(AppendReply::Done(result)) => return result,
            Ok(AppendReply::Retry(back)) => entry = back,
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
