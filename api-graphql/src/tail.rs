//! Following a stream for the `records` subscription (SPEC §6.1 guarantees).
//!
//! [`follow`] is the one place that produces the records of a subscription. Today it reads
//! from storage: a catch-up of everything after the client's position, then polling of the
//! stream head every [`POLL`]. Each read asks for "the records from index `next`", and indices
//! are dense and committed atomically with the head, so the output is strictly increasing
//! with no gap and no duplicate, across the catch-up/live boundary and across reconnects with
//! `after`. Memory is bounded (one page at a time), and a slow client simply reads later pages
//! from storage. When the engine gets a live feed, only this function changes.

use std::collections::VecDeque;
use std::time::Duration;

use futures::Stream;
use webpods_engine::{Caller, Engine, Error, ErrorKind, Record, StreamInfo};

/// How often an idle subscription looks at the stream head.
pub(crate) const POLL: Duration = Duration::from_millis(200);
/// Records read (and held) at once: bounds a subscription's memory.
const PAGE: i64 = 100;

struct Tail {
    engine: Engine,
    caller: Caller,
    pod: String,
    stream: StreamInfo,
    /// Index of the next record to send.
    next: i64,
    page: i64,
    buf: VecDeque<Record>,
    done: bool,
    /// Whether the last read found nothing (sleep before the next one).
    idle: bool,
}

/// The records of `stream` from index `next` on, forever (until an error, which ends it).
/// Permission is checked again before every read, so a revoked reader gets `FORBIDDEN` (and a
/// deleted stream `STREAM_NOT_FOUND`) and the subscription ends.
pub(crate) fn follow(
    engine: Engine,
    caller: Caller,
    pod: String,
    stream: StreamInfo,
    next: i64,
) -> impl Stream<Item = Result<Record, Error>> + Send + 'static {
    let page = engine.config().max_list_records.clamp(1, PAGE);
    let state = Tail {
        engine,
        caller,
        pod,
        stream,
        next: next.max(0),
        page,
        buf: VecDeque::new(),
        done: false,
        idle: false,
    };
    futures::stream::unfold(state, |mut t| async move {
        loop {
            if t.done {
                return None;
            }
            if let Some(r) = t.buf.pop_front() {
                return Some((Ok(r), t));
            }
            if t.idle {
                tokio::time::sleep(POLL).await;
            }
            match t.read_more().await {
                Ok(()) => {}
                Err(e) => {
                    t.done = true;
                    return Some((Err(e), t));
                }
            }
        }
    })
}

impl Tail {
    async fn read_more(&mut self) -> Result<(), Error> {
        let current = self
            .engine
            .open_stream(&self.caller, &self.pod, &self.stream.path)
            .await?;
        if current.id != self.stream.id {
            return Err(Error::new(
                ErrorKind::StreamNotFound,
                "the stream was deleted",
            ));
        }
        let slice = self
            .engine
            .read_range(&self.stream, self.next, self.next + self.page)
            .await?;
        self.idle = slice.records.is_empty();
        for r in slice.records {
            // Dense indices from `next`: anything else would be a storage bug; never skip.
            if r.row.index != self.next {
                return Err(Error::Internal(format!(
                    "expected index {} in the tail of stream {}, read {}",
                    self.next, self.stream.id, r.row.index
                )));
            }
            self.next += 1;
            self.buf.push_back(r);
        }
        Ok(())
    }
}
