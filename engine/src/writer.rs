//! Group commit across streams. Each stream actor chains its batch onto the head it holds
//! (indices, hashes) and hands the result here as a [`ChainedBatch`]; this writer puts
//! everything that is waiting into one compare-and-swap statement
//! ([`Store::append_chained`]), so a thousand streams with one record each cost one commit, not
//! a thousand.
//!
//! - At most [`IN_FLIGHT`] statements run at once. While they do, new batches queue, and the
//!   next statement takes everything queued (up to [`MAX_STATEMENT_RECORDS`]): statements grow
//!   with load, with no timer. An idle writer sends a lone batch at once; while a statement
//!   runs, the next one waits for it to end or for [`EARLY_START_RECORDS`] to queue.
//! - A stream actor has at most one batch here at a time, so two statements in flight never
//!   touch the same stream of this instance; other instances are kept apart by the swap itself.
//! - The writer only reports: [`Outcome::Written`] (committed), [`Outcome::Stale`] (the
//!   stream's head or children moved; nothing of it was written) or [`Outcome::Failed`]. The
//!   actor decides what follows (the locking path, or an error to its callers).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};
use webpods_storage::{ChainedBatch, RecordRow, Store};

use crate::error::Error;
use crate::metrics::Metrics;

/// Statements in flight at once.
pub(crate) const IN_FLIGHT: usize = 2;
/// While another statement runs, a new one starts only once this many records wait (or when
/// the running one ends). Starting at once with whatever arrived first made most statements
/// carry one stream, and every statement costs PostgreSQL a commit (`/metrics`,
/// `webpods_write_statement_streams`: 54% single-stream statements at 1,000 streams with 4 in
/// flight and no threshold; ~20 streams each with this rule, and 50% more records/s).
pub(crate) const EARLY_START_RECORDS: usize = 16;
/// Records per statement; a batch is never split, so one may go over.
pub(crate) const MAX_STATEMENT_RECORDS: usize = 8192;

/// What became of one [`ChainedBatch`].
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Committed: the batch's records, as written.
    Written(Vec<RecordRow>),
    /// Not written: the stream no longer has the head (or child version) the batch expected.
    Stale,
    /// The statement failed. `retry_safe`: it certainly wrote nothing
    /// ([`webpods_storage::Error::certainly_not_applied`]), so the batch may be tried again.
    Failed { error: Error, retry_safe: bool },
}

impl Outcome {
    /// Never handed to the writer: nothing was written.
    fn never_sent() -> Outcome {
        Outcome::Failed {
            error: Error::Internal("the writer task has stopped".into()),
            retry_safe: true,
        }
    }

    fn from_answer(answer: Result<Outcome, oneshot::error::RecvError>) -> Outcome {
        answer.unwrap_or_else(|_| {
            // The statement's task ended without answering (it panicked): outcome unknown.
            Outcome::Failed {
                error: Error::Internal("the commit task ended without an answer".into()),
                retry_safe: false,
            }
        })
    }
}

struct Job {
    batch: ChainedBatch,
    done: oneshot::Sender<Outcome>,
    /// A second batch of the same stream, chained onto `batch`, committed by a statement of
    /// its own that overlaps this one ([`Store::append_following`]).
    follower: Option<(ChainedBatch, oneshot::Sender<Outcome>)>,
}

/// The handle; the writer task ends when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Starts the writer task (needs a Tokio runtime).
    pub fn start(store: Store, metrics: Arc<Metrics>) -> Writer {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, metrics, rx));
        Writer { jobs }
    }

    /// Commits `batch` with whatever else is waiting, and tells what became of it.
    pub async fn commit(&self, batch: ChainedBatch) -> Outcome {
        match self.send(batch, None) {
            Some(answer) => Outcome::from_answer(answer.await),
            None => Outcome::never_sent(),
        }
    }

    /// Hands a job to the writer task; `None` if it has stopped.
    fn send(
        &self,
        batch: ChainedBatch,
        follower: Option<(ChainedBatch, oneshot::Sender<Outcome>)>,
    ) -> Option<oneshot::Receiver<Outcome>> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            batch,
            done,
            follower,
        };
        self.jobs.send(job).is_ok().then_some(answer)
    }

    /// Commits `lead` as [`commit`](Writer::commit) does and, overlapping with it, `follower`:
    /// the rest of the same stream's batch, chained onto `lead`'s last record. The follower is
    /// written only if `lead` is.
    pub async fn commit_pair(
        &self,
        lead: ChainedBatch,
        follower: ChainedBatch,
    ) -> (Outcome, Outcome) {
        let (follower_done, follower_answer) = oneshot::channel();
        let Some(answer) = self.send(lead, Some((follower, follower_done))) else {
            return (Outcome::never_sent(), Outcome::never_sent());
        };
        let lead = Outcome::from_answer(answer.await);
        (lead, Outcome::from_answer(follower_answer.await))
    }
}

async fn run(store: Store, metrics: Arc<Metrics>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let finished = Arc::new(tokio::sync::Notify::new());
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let (mut jobs, mut records) = (Vec::new(), 0);
        let mut next = Some(first);
        loop {
            // The job in hand, then whatever is queued, up to the statement's size.
            while let Some(job) = next
                .take()
                .or_else(|| (records < MAX_STATEMENT_RECORDS).then(|| rx.try_recv().ok())?)
            {
                records += job.batch.records.len();
                jobs.push(job);
            }
            // Registered before looking, so a statement ending in between still wakes us.
            let done = finished.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let others_running = permits.available_permits() < IN_FLIGHT - 1;
            if records >= EARLY_START_RECORDS || !others_running {
                break;
            }
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => next = Some(job),
                    None => break,
                },
                () = &mut done => {}
            }
        }
        let store = store.clone();
        let metrics = metrics.clone();
        let finished = finished.clone();
        tokio::spawn(async move {
            let mut followers = Vec::new();
            let (batches, replies): (Vec<ChainedBatch>, Vec<_>) = jobs
                .into_iter()
                .map(|j| {
                    followers.extend(j.follower);
                    (j.batch, j.done)
                })
                .unzip();
            let started = Instant::now();
            // A follower inserts its records before it asks for its stream's row, so the lead
            // statement normally holds the row by then; if not, the lead skips the row and both
            // report stale, and the stream takes the locking path.
            if !followers.is_empty() {
                tokio::spawn(commit_followers(store.clone(), metrics.clone(), followers));
            }
            let result = store.append_chained(&batches).await;
            drop(permit);
            finished.notify_waiters();
            metrics.observe_statement(batches.len(), started.elapsed());
            match result {
                Ok(written) => {
                    for ((batch, reply), ok) in batches.into_iter().zip(replies).zip(written) {
                        let outcome = if ok {
                            Outcome::Written(batch.records)
                        } else {
                            metrics.observe_stale_swap();
                            Outcome::Stale
                        };
                        let _ = reply.send(outcome);
                    }
                }
                Err(e) => {
                    let retry_safe = e.certainly_not_applied();
                    tracing::warn!(error = %e, retry_safe, "cross-stream commit failed");
                    let error = Error::from(e);
                    for reply in replies {
                        let _ = reply.send(Outcome::Failed {
                            error: error.clone(),
                            retry_safe,
                        });
                    }
                }
            }
        });
    }
}

/// Commits each follower ([`Store::append_following`]) and answers it.
async fn commit_followers(
    store: Store,
    metrics: Arc<Metrics>,
    followers: Vec<(ChainedBatch, oneshot::Sender<Outcome>)>,
) {
    let (store, metrics) = (&store, &metrics);
    let statements = followers.into_iter().map(|(batch, done)| async move {
        let result = store.append_following(&batch).await;
        metrics.observe_follower(matches!(result, Ok(true)));
        let outcome = match result {
            Ok(true) => Outcome::Written(batch.records),
            Ok(false) => Outcome::Stale,
            Err(e) => Outcome::Failed {
                retry_safe: e.certainly_not_applied(),
                error: Error::from(e),
            },
        };
        let _ = done.send(outcome);
    });
    futures::future::join_all(statements).await;
}
