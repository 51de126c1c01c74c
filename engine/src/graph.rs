//! Reads the GraphQL frontend needs beyond the REST ones: batch loads (the heads of many
//! streams, many users at once) so nested queries cost a constant number of statements, and
//! lookups of a pod or a stream by themselves. Permission rules are the same as everywhere
//! else in the engine.

use std::collections::HashMap;

use crate::clock::iso8601;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Caller, Pod, Record, StreamInfo};
use crate::names::{check_stream_path, is_valid_pod_name};
use crate::{Engine, OWNER_STREAM, check_token_pod, stream_view};
use webpods_storage::PodRow;

/// A user as other users may see them. `email` is only filled for the caller themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

/// A pod with its current owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub created_at: String,
    /// Filled only when the caller may read `.config/owner` (the owner); `None` otherwise.
    pub owner_id: Option<String>,
}

impl Engine {
    /// A pod by name. Anyone may learn that a pod exists (its host serves it publicly); a token
    /// limited to other pods gets `POD_FORBIDDEN`. The owner is shown only to callers who may
    /// read `.config/owner`.
    pub async fn pod_info(&self, caller: &Caller, name: &str) -> Result<PodInfo> {
        let pod = self.pod(name).await?;
        if let Caller::User(u) = caller {
            check_token_pod(u, &pod.name)?;
        }
        let owner_visible = match self.stream(&pod, OWNER_STREAM).await? {
            Some(s) => self.check_read(&pod, &s, caller).await.is_ok(),
            None => false,
        };
        Ok(PodInfo {
            name: pod.name.clone(),
            created_at: iso8601(pod.created_at),
            owner_id: owner_visible.then(|| pod.owner_id.clone()),
        })
    }

    /// [`Engine::list_pods`] with owners.
    pub async fn my_pods(&self, caller: &Caller) -> Result<Vec<PodInfo>> {
        let user_id = caller.user_id().map(str::to_string);
        Ok(self
            .list_pods(caller)
            .await?
            .into_iter()
            .map(|p: Pod| PodInfo {
                name: p.name,
                created_at: p.created_at,
                owner_id: user_id.clone(),
            })
            .collect())
    }

    /// The stream at `path` (`""` = the root stream), if the caller may read it.
    pub async fn open_stream(&self, caller: &Caller, pod: &str, path: &str) -> Result<StreamInfo> {
        check_stream_path(path)?;
        let pod = self.pod(pod).await?;
        let s = self.existing_stream(&pod, path).await?;
        self.check_read(&pod, &s, caller).await?;
        Ok(stream_view(&s))
    }

    /// Every stream (root excluded) of each of these pods that the caller may read, ordered by
    /// path, with its record count — the selection of [`Engine::list_streams`], with the
    /// handles GraphQL resolves further fields on. Two statements for any number of pods (one
    /// when their rows are cached). Unknown pods, and pods the caller's token is not valid
    /// for, are absent.
    pub async fn readable_streams_of(
        &self,
        caller: &Caller,
        pods: &[String],
    ) -> Result<HashMap<String, Vec<(StreamInfo, i64)>>> {
        let mut rows: HashMap<i64, PodRow> = HashMap::new();
        let mut missing = Vec::new();
        for name in pods {
            match self.inner.pods.get(name).await {
                Some(p) => {
                    rows.insert(p.id, p);
                }
                None if is_valid_pod_name(name) => missing.push(name.clone()),
                None => {}
            }
        }
        if !missing.is_empty() {
            for p in self.inner.store.pods_by_names(&missing).await? {
                self.inner.pods.insert(p.name.clone(), p.clone()).await;
                rows.insert(p.id, p);
            }
        }
        rows.retain(|_, p| match caller {
            Caller::User(u) => check_token_pod(u, &p.name).is_ok(),
            Caller::Anonymous => true,
        });
        let ids: Vec<i64> = rows.keys().copied().collect();
        let mut out: HashMap<String, Vec<(StreamInfo, i64)>> = rows
            .values()
            .map(|p| (p.name.clone(), Vec::new()))
            .collect();
        if ids.is_empty() {
            return Ok(out);
        }
        for s in self.inner.store.streams_of_pods(&ids).await? {
            let Some(pod) = rows.get(&s.pod_id) else {
                continue;
            };
            if s.path.is_empty() || self.check_read(pod, &s, caller).await.is_err() {
                continue;
            }
            if let Some(list) = out.get_mut(&pod.name) {
                list.push((stream_view(&s), s.head.index + 1));
            }
        }
        for list in out.values_mut() {
            list.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        }
        Ok(out)
    }

    /// The head record of each stream `(id, path)` (absent for empty streams), in one
    /// statement.
    ///
    /// The streams must come from [`StreamInfo`]s the caller obtained through a
    /// permission-checked call (the same contract as [`Engine::read_by_index`]).
    pub async fn head_records(&self, streams: &[(i64, String)]) -> Result<HashMap<i64, Record>> {
        if streams.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<i64> = streams.iter().map(|(id, _)| *id).collect();
        let paths: HashMap<i64, &String> = streams.iter().map(|(id, p)| (*id, p)).collect();
        Ok(self
            .inner
            .store
            .head_records(&ids)
            .await?
            .into_iter()
            .filter_map(|r| {
                let path = paths.get(&r.stream_id)?;
                Some((
                    r.stream_id,
                    Record {
                        stream_path: (*path).clone(),
                        row: r.record,
                    },
                ))
            })
            .collect())
    }

    /// Users by id, in one statement; unknown ids are left out. Emails are shown only to the
    /// user themselves.
    pub async fn users(&self, caller: &Caller, ids: &[String]) -> Result<Vec<UserInfo>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let me = caller.user_id();
        Ok(self
            .inner
            .store
            .users_by_ids(ids)
            .await?
            .into_iter()
            .map(|u| UserInfo {
                email: if me == Some(u.id.as_str()) {
                    u.email
                } else {
                    None
                },
                id: u.id,
                name: u.name,
            })
            .collect())
    }

    /// The caller's own profile (`UNAUTHORIZED` when anonymous).
    pub async fn me(&self, caller: &Caller) -> Result<UserInfo> {
        let Some(id) = caller.user_id() else {
            return Err(Error::new(ErrorKind::Unauthorized, "a token is required"));
        };
        let found = self.users(caller, &[id.to_string()]).await?;
        Ok(found.into_iter().next().unwrap_or(UserInfo {
            id: id.to_string(),
            email: None,
            name: None,
        }))
    }
}
