//! Following a stream for the `records` subscription (SPEC §6.1 guarantees).
//!
//! [`follow`] is the one place that turns a stream into the records of a subscription. It
//! rides the engine's live feed ([`webpods_engine::Subscription`]): catch-up from storage, then
//! each record as soon as it is committed (on any instance), strictly increasing with no gap
//! and no duplicate across the catch-up/live boundary; fork detection (`afterHash`),
//! permission re-checks, token expiry and slow-consumer handling (`TOO_SLOW`) are the
//! engine's. GraphQL has no `caughtUp` frame, so that event is skipped.

use futures::Stream;
use webpods_engine::{Error, LiveEnd, LiveEvent, Record, Subscription};

/// The records of a live subscription until it ends: an engine error is the last item
/// (`FORBIDDEN` when access is revoked, `STREAM_NOT_FOUND` when the stream is deleted,
/// `TOKEN_EXPIRED`, `TOO_SLOW`…); a server shutdown ends the stream quietly.
pub(crate) fn follow(
    sub: Subscription,
) -> impl Stream<Item = Result<Record, Error>> + Send + 'static {
    futures::stream::unfold(Some(sub), |state| async move {
        let mut sub = state?;
        loop {
            match sub.next().await {
                Ok(LiveEvent::Record(r)) => return Some((Ok(r), Some(sub))),
                Ok(LiveEvent::CaughtUp { .. }) => continue,
                Err(LiveEnd::Shutdown) => return None,
                Err(LiveEnd::Error(e)) => return Some((Err(e), None)),
            }
        }
    })
}
