//! Stream listing and the owner's destructive operations: deleting records (tombstone and
//! purge), streams with their descendants, and whole pods.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;

use crate::batch::Entry;
use crate::clock::iso8601;
use crate::error::{Error, ErrorKind, Result};
use crate::invalidation::Change;
use crate::model::{Caller, NewRecord, Record, RecordPage, RecursiveCursor, StreamInfo};
use crate::names::{check_record_name, check_stream_path, is_system_path, split_last};
use crate::{Engine, check_token_pod, forbidden, require_owner};

/// Options of `GET /.config/api/streams`.
#[derive(Debug, Clone, Default)]
pub struct StreamListQuery {
    /// Only streams under this path (default: the whole pod).
    pub path: Option<String>,
    /// All descendants (default) or only direct children.
    pub recursive: Option<bool>,
    pub include_record_counts: bool,
    pub include_hashes: bool,
}

/// One stream of a listing.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSummary {
    pub path: String,
    pub name: String,
    pub parent_path: String,
    pub depth: usize,
    pub has_children: bool,
    pub access_permission: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_count: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_index: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<Option<String>>,
}

/// The answer of a stream listing.
#[derive(Debug, Clone, Serialize)]
pub struct StreamListing {
    pub pod: String,
    pub streams: Vec<StreamSummary>,
}

impl Engine {
    /// Streams of a pod the caller may read.
    pub async fn list_streams(
        &self,
        caller: &Caller,
        pod: &str,
        q: &StreamListQuery,
    ) -> Result<StreamListing> {
        let pod = self.pod(pod).await?;
        let base = q.path.as_deref().unwrap_or("").trim_matches('/');
        check_stream_path(base)?;
        // A token that may not read here is told so, as by every other read, rather than
        // shown an empty pod.
        if let Caller::User(u) = caller {
            check_token_pod(u, &pod.name)?;
            if !u.scope.read {
                return Err(forbidden("this token may not read"));
            }
        }
        let all = self.inner.store.list_streams(pod.id).await?;
        let parents: HashSet<i64> = all.iter().filter_map(|s| s.parent_id).collect();
        let prefix = format!("{base}/");
        let recursive = q.recursive.unwrap_or(true);
        let mut streams = Vec::new();
        for s in &all {
            if s.path.is_empty() {
                continue;
            }
            let under = base.is_empty() || s.path.starts_with(&prefix);
            let (parent_path, name) = split_last(&s.path);
            if !under || (!recursive && parent_path != base) {
                continue;
            }
            if self.check_read(&pod, s, caller).await.is_err() {
                continue;
            }
            streams.push(StreamSummary {
                path: s.path.clone(),
                name: name.to_string(),
                parent_path: parent_path.to_string(),
                depth: s.path.split('/').count(),
                has_children: parents.contains(&s.id),
                access_permission: s.access.clone(),
                created_at: iso8601(s.created_at),
                record_count: q.include_record_counts.then_some(s.head.index + 1),
                last_index: q.include_hashes.then_some(s.head.index),
                last_hash: q.include_hashes.then(|| s.head.hash.clone()),
            });
        }
        Ok(StreamListing {
            pod: pod.name.clone(),
            streams,
        })
    }

    /// This stream and every readable descendant, ordered by stream path (bytewise, whatever
    /// the database's collation) then index; a page starts after `cursor` (the stream path
    /// and index of the last record of the previous page, as in [`RecordPage::next_cursor`]).
    ///
    /// Streams have no gaps (indices `0..=head`), so the page is planned from the streams'
    /// committed heads and its records fetched in one query.
    pub async fn list_recursive(
        &self,
        caller: &Caller,
        pod: &str,
        stream: &StreamInfo,
        limit: Option<i64>,
        cursor: Option<&RecursiveCursor>,
    ) -> Result<RecordPage> {
        let pod = self.pod(pod).await?;
        let limit = limit
            .unwrap_or(100)
            .clamp(1, self.inner.config.max_list_records);
        let prefix = format!("{}/", stream.path);
        let mut streams = Vec::new();
        for s in self.inner.store.list_streams(pod.id).await? {
            let inside = s.id == stream.id || stream.path.is_empty() || s.path.starts_with(&prefix);
            if inside && self.check_read(&pod, &s, caller).await.is_ok() {
                streams.push(s);
            }
        }
        streams.sort_by(|a, b| a.path.cmp(&b.path));
        // Every record of the readable streams, not just this page.
        let total = streams.iter().map(|s| s.head.index + 1).sum();
        let (mut spans, mut left, mut has_more) = (Vec::new(), limit, false);
        for s in &streams {
            let first = match cursor {
                Some(c) if s.path < c.path => continue,
                Some(c) if s.path == c.path => c.index + 1,
                _ => 0,
            };
            if first > s.head.index {
                continue;
            }
            if left == 0 {
                has_more = true;
                break;
            }
            let last = s.head.index.min(first + left - 1);
            left -= last - first + 1;
            has_more |= last < s.head.index;
            spans.push((s.id, first, last));
        }
        let mut rows = self.inner.store.list_record_spans(&spans).await?;
        let order: HashMap<i64, usize> = spans.iter().enumerate().map(|(i, s)| (s.0, i)).collect();
        rows.sort_by_key(|(id, row)| (order.get(id).copied().unwrap_or(usize::MAX), row.index));
        let paths: HashMap<i64, &str> = streams.iter().map(|s| (s.id, s.path.as_str())).collect();
        let records: Vec<Record> = rows
            .into_iter()
            .map(|(id, row)| Record {
                stream_path: paths.get(&id).copied().unwrap_or_default().to_string(),
                row,
            })
            .collect();
        let next_cursor = match records.last() {
            Some(last) if has_more => Some(RecursiveCursor {
                path: last.stream_path.clone(),
                index: last.row.index,
            }),
            _ => None,
        };
        Ok(RecordPage {
            records,
            total,
            has_more,
            next_index: None,
            next_cursor,
            head_hash: None,
        })
    }

    /// Appends a tombstone for `name`; with `purge`, also erases the content of every earlier
    /// record with that name (hashes stay, so the chain still verifies). Owner only.
    pub async fn delete_record(
        &self,
        caller: &Caller,
        pod: &str,
        stream_path: &str,
        name: &str,
        purge: bool,
    ) -> Result<()> {
        check_stream_path(stream_path)?;
        check_record_name(name)?;
        let pod = self.owner_checked_pod(pod).await?;
        let user = require_owner(&pod, caller)?;
        if is_system_path(stream_path) {
            return Err(forbidden(".config records cannot be deleted"));
        }
        let stream = self.existing_stream(&pod, stream_path).await?;
        let latest = self.inner.store.latest_by_name(stream.id, name).await?;
        let Some(latest) = latest else {
            return Err(Error::new(
                ErrorKind::RecordNotFound,
                format!("no record named {name:?}"),
            ));
        };
        // Idempotent (SPEC §4.4): deleting a deleted name appends nothing, and so does purging
        // one whose content is already erased.
        if latest.deleted && !(purge && self.inner.store.has_unpurged(stream.id, name).await?) {
            return Ok(());
        }
        let entry = Entry {
            records: vec![NewRecord {
                name: name.to_string(),
                content: Bytes::new(),
                content_type: "text/plain".to_string(),
                headers: BTreeMap::new(),
                deleted: true,
            }],
            precondition: None,
            idempotency_key: None,
            author: user.user_id.clone(),
            purge,
        };
        self.submit(&pod, &stream, entry).await?;
        // A deleted grant, or erased content (any earlier version may have been a grant):
        // decisions drawn from this stream (if it is a permission stream) are made again, on
        // every instance, and its tails re-check — as after an append of a grant.
        if purge || crate::permissions::looks_like_grant(&latest.content) {
            self.changed(Change::Permissions {
                pod: pod.name.clone(),
                stream_id: stream.id,
            })
            .await;
        }
        Ok(())
    }

    /// Removes a stream, its descendants and their records. Owner only; not `.config`.
    pub async fn delete_stream(&self, caller: &Caller, pod: &str, path: &str) -> Result<()> {
        check_stream_path(path)?;
        let pod = self.owner_checked_pod(pod).await?;
        require_owner(&pod, caller)?;
        if is_system_path(path) {
            return Err(forbidden(".config streams cannot be deleted"));
        }
        if path.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidPath,
                "delete the pod to remove its root",
            ));
        }
        self.existing_stream(&pod, path).await?;
        self.inner.store.delete_stream_tree(pod.id, path).await?;
        self.changed(Change::Streams).await;
        // Live subscriptions of the deleted streams re-check (and end).
        self.permissions_changed(&pod.name);
        Ok(())
    }

    /// Removes a pod with all its streams and records. Owner only.
    pub async fn delete_pod(&self, caller: &Caller, pod: &str) -> Result<()> {
        let pod = self.owner_checked_pod(pod).await?;
        require_owner(&pod, caller)?;
        self.inner.store.delete_pod(pod.id).await?;
        self.changed(Change::Streams).await;
        self.changed(Change::Domains).await;
        // Last: it also makes the pod's live subscriptions re-check (and end).
        self.changed(Change::Pod(pod.name.clone())).await;
        Ok(())
    }
}
