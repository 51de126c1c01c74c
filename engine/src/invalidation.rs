//! Keeping caches right across instances. Every change that can alter a cached answer (a
//! permission record, an ownership transfer, routing, domains, deleted streams or pods)
//! invalidates the local cache at once and is published as a [`Notice::Cache`] on the
//! instances' notice channel (PostgreSQL `NOTIFY` after commit, see `webpods_storage::notify`);
//! each instance's listener drops the same entries. If the listener
//! reconnects, messages may have been lost, so everything is dropped. The caches' TTL is only
//! a safety net. SQLite runs a single instance: there is nothing to publish.
//!
//! A change that can alter a read decision (a permission record, an ownership transfer, a
//! deleted pod) also tells the pod's live tails to re-check their permission (SPEC §6.1), on
//! every instance, right **after** the caches dropped the old answer: the same notice does
//! both, so a tail never re-checks against a stale cache.

use webpods_storage::Notice;

use crate::{Engine, Inner};

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A permission stream (of this pod) got a record, or a stream lost a record's content to
    /// a purge: its permission decisions and its cached reads are stale.
    Permissions {
        pod: String,
        stream_id: i64,
    },
    /// A pod's owner changed, or the pod was deleted.
    Pod(String),
    Routes(String),
    Domains,
    /// Streams were deleted.
    Streams,
}

impl Change {
    fn encode(&self) -> String {
        match self {
            Change::Permissions { pod, stream_id } => format!("perm:{stream_id}:{pod}"),
            Change::Pod(p) => format!("pod:{p}"),
            Change::Routes(p) => format!("routes:{p}"),
            Change::Domains => "domains".into(),
            Change::Streams => "streams".into(),
        }
    }

    fn decode(s: &str) -> Option<Change> {
        Some(match s.split_once(':') {
            Some(("perm", rest)) => {
                let (id, pod) = rest.split_once(':')?;
                Change::Permissions {
                    pod: pod.to_string(),
                    stream_id: id.parse().ok()?,
                }
            }
            Some(("pod", p)) => Change::Pod(p.to_string()),
            Some(("routes", p)) => Change::Routes(p.to_string()),
            None if s == "domains" => Change::Domains,
            None if s == "streams" => Change::Streams,
            _ => return None,
        })
    }

    /// The pod whose read decisions this change may alter.
    fn alters_reads_in(&self) -> Option<&str> {
        match self {
            Change::Permissions { pod, .. } | Change::Pod(pod) => Some(pod),
            // Deleted streams: `delete_stream` signals their pod itself.
            Change::Routes(_) | Change::Domains | Change::Streams => None,
        }
    }
}

impl Inner {
    async fn apply(&self, change: &Change) {
        match change {
            Change::Permissions { stream_id, .. } => {
                // Its cached reads too: a purge signals this before it answers, so another
                // instance stops serving the erased content with this notice, not with the
                // (batched) append notice that follows.
                self.reads.appended(*stream_id);
                self.perms.invalidate(stream_id).await;
            }
            Change::Pod(p) => {
                self.pods.invalidate(p).await;
                self.routes.invalidate(p).await;
                self.perms.invalidate_all();
            }
            Change::Routes(p) => self.routes.invalidate(p).await,
            Change::Domains => self.domains.invalidate_all(),
            Change::Streams => self.streams.invalidate_all(),
        }
        if let Some(pod) = change.alters_reads_in() {
            self.live.recheck_permissions(pod);
        }
    }

    /// After a listener reconnect: notices may have been missed.
    pub(crate) fn clear_all(&self) {
        self.pods.invalidate_all();
        self.streams.invalidate_all();
        self.routes.invalidate_all();
        self.domains.invalidate_all();
        self.perms.invalidate_all();
        self.reads.clear();
    }
}

impl Engine {
    /// Applies a change here and tells the other instances.
    pub(crate) async fn changed(&self, change: Change) {
        self.inner.apply(&change).await;
        let notice = Notice::Cache {
            origin: self.inner.live.origin,
            change: change.encode(),
        };
        if let Err(e) = self.inner.store.notify(&notice).await {
            // The TTL bounds how long other instances may serve the old answer.
            tracing::warn!(error = %e, "could not publish a cache invalidation");
        }
    }
}

/// Applies another instance's change (from the notice listener in [`crate::live`]).
pub(crate) async fn on_cache_notice(inner: &Inner, change: &str) {
    if let Some(change) = Change::decode(change) {
        inner.apply(&change).await;
    }
}

#[cfg(test)]
mod tests {
    use super::Change;

    #[test]
    fn changes_round_trip() {
        for c in [
            Change::Permissions {
                pod: "alice".into(),
                stream_id: 42,
            },
            Change::Pod("alice".into()),
            Change::Routes("alice".into()),
            Change::Domains,
            Change::Streams,
        ] {
            assert_eq!(Change::decode(&c.encode()), Some(c));
        }
        assert_eq!(Change::decode("nonsense"), None);
        assert_eq!(Change::decode("perm:42"), None);
    }
}
