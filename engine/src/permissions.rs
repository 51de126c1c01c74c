//! Who may read and write a stream (SPEC §8).
//!
//! 1. The pod owner may do everything.
//! 2. `public`: anyone reads; any authenticated user appends.
//! 3. `private`: the stream's creator and the owner.
//! 4. `/perm-stream`: the latest record of that stream **written by the pod owner** whose
//!    `userId` is the caller decides `{read, write}`; no such record → deny. A record whose
//!    name was deleted since (a tombstone) or purged does not count.
//! 5. Anonymous callers get nothing but public reads; `.config` is owner-only.
//!
//! A permission stream's decisions are computed once into a table cached by stream id; an
//! append to that stream invalidates it here and, through the invalidation bus, on every
//! other instance.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use webpods_storage::{PodRow, StreamRow};

use crate::error::Result;
use crate::model::{Caller, UserCaller};
use crate::names::is_system_path;
use crate::{Engine, check_token_pod, forbidden, require_user};

/// Decisions of one permission stream for one owner: user id → (read, write).
#[derive(Debug, Default)]
pub(crate) struct PermTable {
    owner: String,
    grants: HashMap<String, (bool, bool)>,
}

/// A permission record's content.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Grant {
    user_id: String,
    #[serde(default)]
    read: bool,
    #[serde(default)]
    write: bool,
}

/// `true` for content shaped like a permission record (`{"userId": …}`).
pub(crate) fn looks_like_grant(content: &[u8]) -> bool {
    serde_json::from_slice::<Grant>(content).is_ok()
}

impl Engine {
    /// `(read, write)` granted to `user_id` by the permission stream at `perm_path`.
    async fn grant(&self, pod: &PodRow, perm_path: &str, user_id: &str) -> Result<(bool, bool)> {
        let Some(ps) = self.stream(pod, perm_path).await? else {
            return Ok((false, false));
        };
        let table = match self.inner.perms.get(&ps.id).await {
            Some(t) if t.owner == pod.owner_id => t,
            _ => {
                let mut grants = HashMap::new();
                // Names deleted by a tombstone newer than the records being looked at.
                let mut deleted = HashSet::new();
                // Newest first: the first live record seen for a user is the one that counts;
                // a record whose name was deleted afterwards (DELETE of the grant) counts no
                // more.
                for r in self
                    .inner
                    .store
                    .records_by_author(ps.id, &pod.owner_id)
                    .await?
                {
                    if r.deleted {
                        deleted.insert(r.name);
                    } else if !deleted.contains(&r.name)
                        && let Ok(g) = serde_json::from_slice::<Grant>(&r.content)
                    {
                        grants
                            .entry(crate::names::canonical_user_id(&g.user_id))
                            .or_insert((g.read, g.write));
                    }
                }
                let t = Arc::new(PermTable {
                    owner: pod.owner_id.clone(),
                    grants,
                });
                self.inner.perms.insert(ps.id, t.clone()).await;
                t
            }
        };
        Ok(table.grants.get(user_id).copied().unwrap_or((false, false)))
    }

    pub(crate) async fn check_read(
        &self,
        pod: &PodRow,
        s: &StreamRow,
        caller: &Caller,
    ) -> Result<()> {
        if let Caller::User(u) = caller {
            check_token_pod(u, &pod.name)?;
            if !u.scope.read {
                return Err(forbidden("this token may not read"));
            }
        }
        if s.access == "public" && !is_system_path(&s.path) {
            return Ok(());
        }
        let user = require_user(caller)?;
        if pod.owner_id == user.user_id {
            return Ok(());
        }
        let allowed = match s.access.as_str() {
            _ if is_system_path(&s.path) => false,
            "private" => s.creator_id == user.user_id,
            perm => match perm.strip_prefix('/') {
                Some(p) => self.grant(pod, p, &user.user_id).await?.0,
                None => false,
            },
        };
        if allowed {
            Ok(())
        } else {
            Err(forbidden("you may not read this stream"))
        }
    }

    pub(crate) async fn check_write(
        &self,
        pod: &PodRow,
        s: &StreamRow,
        user: &UserCaller,
    ) -> Result<()> {
        if pod.owner_id == user.user_id {
            return Ok(());
        }
        if is_system_path(&s.path) {
            return Err(forbidden(".config streams are owner-only"));
        }
        let allowed = match s.access.as_str() {
            "public" => true,
            "private" => s.creator_id == user.user_id,
            perm => match perm.strip_prefix('/') {
                Some(p) => self.grant(pod, p, &user.user_id).await?.1,
                None => false,
            },
        };
        if allowed {
            Ok(())
        } else {
            Err(forbidden("you may not write to this stream"))
        }
    }
}
