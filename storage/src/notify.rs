//! Change notices between server instances (PostgreSQL `LISTEN`/`NOTIFY`).
//!
//! After a batch commits, the instance that wrote it sends a small [`Notice`] — stream id and
//! new head index, never a record body — on one channel; every instance listens and turns the
//! notice into storage reads for its local live subscribers. The same channel carries "the
//! permissions of pod X may have changed".
//!
//! `NOTIFY` is sent **after** the append transaction committed, on its own statement: inside the
//! transaction it would take PostgreSQL's global notify lock at commit and serialize every
//! appending transaction in the database. A notice can therefore be lost (a crash between commit
//! and notify, a listener that was reconnecting). Listeners get [`Notice::Reconnected`] after
//! every (re)connection, and callers re-check heads periodically: notices are a latency
//! optimisation, never the only path to a record.
//!
//! Append notices go through an **outbox** ([`PgStore::notify_appended`]): a task that sends
//! everything queued in one statement, one at a time. A `NOTIFY` transaction commits under
//! PostgreSQL's global notify lock (it writes no WAL of its own, so it waits for no flush): one
//! statement per commit would serialize thousands of commits a second on that lock and tie up
//! pooled connections waiting for it. One statement per burst costs one, and the notices of one
//! stream in a burst collapse to the highest head. Statements are at least
//! [`OUTBOX_INTERVAL`] apart, so a burst is whatever queued meanwhile.
//!
//! SQLite serves one instance, so it has no listener and notifying is a no-op.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use crate::postgres::PgStore;
use crate::{Error, Result};

/// The PostgreSQL channel every instance listens on.
pub const CHANNEL: &str = "webpods_events";

/// One change notice. `origin` identifies the instance that sent it, so an instance can skip
/// its own notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Records of `stream_id` were committed up to index `head`.
    Appended {
        origin: u64,
        stream_id: i64,
        head: i64,
    },
    /// Permission decisions in `pod` may have changed (owner transfer, permission records…).
    Permissions { origin: u64, pod: String },
    /// A cached answer changed (the engine's encoding of what: permission table, pod, routes…).
    Cache { origin: u64, change: String },
    /// The listener (re)connected: notices sent before this point may have been missed.
    Reconnected,
}

impl Notice {
    /// The wire payload: `a <origin> <stream> <head>`, `p <origin> <pod>` or
    /// `c <origin> <change>` (well under 8 kB).
    pub fn encode(&self) -> Option<String> {
        match self {
            Notice::Appended {
                origin,
                stream_id,
                head,
            } => Some(format!("a {origin} {stream_id} {head}")),
            Notice::Permissions { origin, pod } => Some(format!("p {origin} {pod}")),
            Notice::Cache { origin, change } => Some(format!("c {origin} {change}")),
            Notice::Reconnected => None,
        }
    }

    /// Parses a payload written by [`Notice::encode`]; anything else is ignored (`None`).
    pub fn decode(payload: &str) -> Option<Notice> {
        let mut parts = payload.split(' ');
        let kind = parts.next()?;
        let origin = parts.next()?.parse().ok()?;
        let notice = match kind {
            "a" => Notice::Appended {
                origin,
                stream_id: parts.next()?.parse().ok()?,
                head: parts.next()?.parse().ok()?,
            },
            "p" => Notice::Permissions {
                origin,
                pod: parts.next()?.to_string(),
            },
            "c" => Notice::Cache {
                origin,
                change: parts.next()?.to_string(),
            },
            _ => return None,
        };
        parts.next().is_none().then_some(notice)
    }
}

/// Most notices per outbox statement.
const OUTBOX_BATCH: usize = 4096;

/// Least time between two outbox statements. A notice that finds the outbox idle for longer
/// goes at once; under load, notices wait at most this long and share one statement, instead
/// of one statement (a transaction, and a turn on the global notify lock) per commit.
const OUTBOX_INTERVAL: Duration = Duration::from_millis(2);

/// The sending end of the append-notice outbox (see the module docs).
pub(crate) type Outbox = mpsc::UnboundedSender<Notice>;

fn start_outbox(pool: sqlx::PgPool) -> Outbox {
    let (tx, mut rx) = mpsc::unbounded_channel::<Notice>();
    tokio::spawn(async move {
        let mut last_sent: Option<tokio::time::Instant> = None;
        while let Some(first) = rx.recv().await {
            if let Some(at) = last_sent {
                // Let the rest of this burst gather (see OUTBOX_INTERVAL).
                tokio::time::sleep_until(at + OUTBOX_INTERVAL).await;
            }
            // (origin, stream) → highest head in this burst; other notices kept as they are.
            let mut heads: HashMap<(u64, i64), i64> = HashMap::new();
            let mut payloads: Vec<String> = Vec::new();
            let mut take = |n: Notice, payloads: &mut Vec<String>| match n {
                Notice::Appended {
                    origin,
                    stream_id,
                    head,
                } => {
                    let h = heads.entry((origin, stream_id)).or_insert(head);
                    *h = (*h).max(head);
                }
                other => payloads.extend(other.encode()),
            };
            take(first, &mut payloads);
            let mut n = 1;
            while n < OUTBOX_BATCH {
                let Ok(next) = rx.try_recv() else { break };
                take(next, &mut payloads);
                n += 1;
            }
            payloads.extend(heads.into_iter().filter_map(|((origin, stream_id), head)| {
                Notice::Appended {
                    origin,
                    stream_id,
                    head,
                }
                .encode()
            }));
            last_sent = Some(tokio::time::Instant::now());
            let sent = sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
                .bind(CHANNEL)
                .bind(&payloads)
                .execute(&pool)
                .await;
            if let Err(e) = sent {
                if pool.is_closed() {
                    return;
                }
                // Listeners still find the records through their periodic head re-check.
                tracing::warn!(error = %e, notices = payloads.len(), "append notices not sent");
            }
        }
    });
    tx
}

impl PgStore {
    /// Queues an append notice for the outbox, which sends it with whatever else is queued,
    /// soon after; never waits. A notice can be lost (see the module docs).
    pub(crate) fn notify_appended(&self, notice: Notice) {
        let outbox = self.outbox.get_or_init(|| start_outbox(self.pool.clone()));
        let _ = outbox.send(notice);
    }

    /// Sends a notice to every listening instance (this one included).
    pub(crate) async fn notify(&self, notice: &Notice) -> Result<()> {
        if let Some(payload) = notice.encode() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }

    /// Head indices of several streams in one query (streams that no longer exist are absent).
    pub(crate) async fn stream_heads(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query_as("SELECT id, head_index FROM streams WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(self.pool())
            .await?;
        Ok(rows)
    }

    /// Pod of several streams in one query (streams that no longer exist are absent).
    pub(crate) async fn stream_pods(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query_as("SELECT id, pod_id FROM streams WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(self.pool())
            .await?;
        Ok(rows)
    }

    /// Starts a task that listens on [`CHANNEL`] and forwards decoded notices. It reconnects by
    /// itself (sending [`Notice::Reconnected`] after each connection) and ends when the receiver
    /// is dropped or the pool is closed.
    pub(crate) fn listen(&self) -> mpsc::Receiver<Notice> {
        let (tx, rx) = mpsc::channel(1024);
        let pool = self.pool().clone();
        tokio::spawn(async move {
            loop {
                let mut listener = match connect(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        if pool.is_closed() || tx.is_closed() {
                            return;
                        }
                        tracing::warn!(error = %e, "notice listener cannot connect; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if tx.send(Notice::Reconnected).await.is_err() {
                    return;
                }
                loop {
                    let next = tokio::select! {
                        () = tx.closed() => return,
                        n = listener.try_recv() => n,
                    };
                    let notice = match next {
                        Ok(Some(n)) => match Notice::decode(n.payload()) {
                            Some(notice) => notice,
                            None => continue,
                        },
                        // The connection dropped and was re-established: notices may be lost.
                        Ok(None) => Notice::Reconnected,
                        Err(sqlx::Error::PoolClosed) => return,
                        Err(e) => {
                            tracing::warn!(error = %Error::from(e), "notice listener failed");
                            break;
                        }
                    };
                    if tx.send(notice).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        rx
    }
}

async fn connect(pool: &sqlx::PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for n in [
            Notice::Appended {
                origin: 7,
                stream_id: 42,
                head: 1000,
            },
            Notice::Permissions {
                origin: u64::MAX,
                pod: "alice".into(),
            },
        ] {
            let p = n.encode().unwrap_or_default();
            assert_eq!(Notice::decode(&p), Some(n));
        }
        assert_eq!(Notice::decode("a 1 2"), None);
        assert_eq!(Notice::decode("x 1 2 3"), None);
        assert_eq!(Notice::decode("a 1 2 3 4"), None);
    }
}
