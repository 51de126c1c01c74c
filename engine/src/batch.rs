//! Building one group-commit batch against the head that storage locked.
//!
//! Pure and synchronous: given the real head, the names that collide with child streams and
//! the idempotency keys already used, it assigns indices, timestamps and hashes to every entry
//! that may go in, and decides the fate of each entry (appended, replayed, or refused). Because
//! it runs inside the commit transaction, preconditions and keys are checked against exactly
//! the head the batch extends, whichever instance moved it last.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::json;
use webpods_storage::{BatchContext, BatchPlan, BatchProbe, Head, NewIdempotencyKey, RecordRow};

use crate::error::{Error, ErrorKind};
use crate::hash::{HashInput, content_hash, headers_json, record_hash};
use crate::model::{NewRecord, Precondition};

/// The stream a batch extends.
#[derive(Debug, Clone)]
pub(crate) struct StreamCtx {
    pub stream_id: i64,
    pub pod_id: i64,
    pub pod: String,
    pub path: String,
}

impl StreamCtx {
    /// The stream whose latest record names the pod owner.
    fn is_owner_stream(&self) -> bool {
        self.path == ".config/owner"
    }
}

/// One queued append (one request): all its records commit together or not at all.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub records: Vec<NewRecord>,
    pub precondition: Option<Precondition>,
    pub idempotency_key: Option<String>,
    pub author: String,
    /// Erase the content of earlier records with these records' names (tombstone + purge).
    pub purge: bool,
}

impl Entry {
    pub fn bytes(&self) -> usize {
        self.records.iter().map(|r| r.content.len()).sum()
    }
}

/// What happened to one entry of a committed batch.
#[derive(Debug, Clone)]
pub(crate) enum EntryOutcome {
    /// Its records are `plan.records[range]`.
    Appended(Range<usize>),
    /// Its idempotency key was used before: these are the records that append wrote.
    Replayed(Vec<RecordRow>),
}

pub(crate) fn probe(entries: &[Entry]) -> BatchProbe {
    let mut names: Vec<String> = entries
        .iter()
        .flat_map(|e| e.records.iter().map(|r| r.name.clone()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let idempotency_keys = entries
        .iter()
        .filter_map(|e| e.idempotency_key.clone())
        .collect();
    BatchProbe {
        names,
        idempotency_keys,
    }
}

pub(crate) fn build(
    ctx: BatchContext,
    stream: &StreamCtx,
    entries: &[Entry],
    now_ms: i64,
) -> (BatchPlan, Vec<Result<EntryOutcome, Error>>) {
    let mut head = ctx.head;
    let mut plan = BatchPlan::default();
    let mut keys_in_batch: HashMap<&str, Range<usize>> = HashMap::new();
    let mut outcomes = Vec::with_capacity(entries.len());
    for entry in entries {
        if let Some(key) = entry.idempotency_key.as_deref() {
            let earlier = match ctx.existing_keys.get(key) {
                Some(rows) => Some(rows.as_slice()),
                None => keys_in_batch
                    .get(key)
                    .map(|range| &plan.records[range.clone()]),
            };
            if let Some(rows) = earlier {
                outcomes.push(if is_retry_of(entry, rows) {
                    Ok(EntryOutcome::Replayed(rows.to_vec()))
                } else {
                    Err(key_reused(key))
                });
                continue;
            }
        }
        if let Some(r) = entry
            .records
            .iter()
            .find(|r| ctx.conflicting_names.contains(&r.name))
        {
            outcomes.push(Err(Error::new(
                ErrorKind::NameConflict,
                format!("{:?} is the name of a child stream", r.name),
            )));
            continue;
        }
        if let Some(p) = &entry.precondition
            && let Err(e) = check_precondition(p, &head)
        {
            outcomes.push(Err(e));
            continue;
        }
        let start = plan.records.len();
        for rec in &entry.records {
            let row = chain_record(stream, &head, rec, &entry.author, now_ms);
            head = Head {
                index: row.index,
                hash: Some(row.hash.clone()),
                timestamp: row.timestamp,
            };
            plan.records.push(row);
        }
        let range = start..plan.records.len();
        if entry.purge {
            for r in &plan.records[range.clone()] {
                plan.purges.push((r.name.clone(), r.index));
            }
        }
        if let Some(key) = entry.idempotency_key.as_deref() {
            plan.idempotency_keys.push(NewIdempotencyKey {
                key: key.to_string(),
                first_index: plan.records[start].index,
                count: i32::try_from(range.len()).unwrap_or(i32::MAX),
            });
            keys_in_batch.insert(key, range.clone());
        }
        outcomes.push(Ok(EntryOutcome::Appended(range)));
    }
    if stream.is_owner_stream() {
        plan.pod_owner = plan
            .records
            .iter()
            .rev()
            .find_map(|r| owner_of(&r.content))
            .map(|owner| (stream.pod_id, owner));
    }
    (plan, outcomes)
}

/// Refuses the entry unless the head satisfies its precondition (412 `PRECONDITION_FAILED`, the
/// details carry the head). A stream that does not exist yet has the head of an empty one.
pub(crate) fn check_precondition(p: &Precondition, head: &Head) -> Result<(), Error> {
    let ok = match p {
        Precondition::LastHash(h) => head.hash.as_deref() == Some(h.as_str()),
        Precondition::NextIndex(n) => head.index + 1 == *n,
        Precondition::Empty => head.index < 0,
        Precondition::NotEmpty => head.index >= 0,
    };
    if ok {
        return Ok(());
    }
    Err(Error::with_details(
        ErrorKind::PreconditionFailed,
        "the stream's head does not match the precondition",
        json!({ "head": { "index": head.index, "hash": head.hash } }),
    ))
}

/// Whether `entry` is the same request as the append that wrote `rows` under its idempotency
/// key: the same author, and the same records (name, content, content type, headers, delete
/// flag). Content is compared by its hash, which survives a purge.
fn is_retry_of(entry: &Entry, rows: &[RecordRow]) -> bool {
    entry.records.len() == rows.len()
        && entry.records.iter().zip(rows).all(|(new, old)| {
            old.author == entry.author
                && old.name == new.name
                && old.content_type == new.content_type
                && old.deleted == new.deleted
                && old.headers == headers_json(&new.headers)
                && old.content_hash == content_hash(&new.content)
        })
}

/// An idempotency key sent again with a different request (IETF draft
/// `draft-ietf-httpapi-idempotency-key-header` §2.7: 422).
fn key_reused(key: &str) -> Error {
    Error::new(
        ErrorKind::IdempotencyKeyReused,
        format!(
            "the Idempotency-Key {key:?} was used on this stream for a different request; \
             a retry must repeat the original request exactly"
        ),
    )
}

/// The record that extends `head` with `rec`. Timestamps never go backwards.
pub(crate) fn chain_record(
    stream: &StreamCtx,
    head: &Head,
    rec: &NewRecord,
    author: &str,
    now_ms: i64,
) -> RecordRow {
    let index = head.index + 1;
    let timestamp = now_ms.max(head.timestamp);
    let ch = content_hash(&rec.content);
    let hash = record_hash(&HashInput {
        pod: &stream.pod,
        stream: &stream.path,
        index,
        name: &rec.name,
        content_type: &rec.content_type,
        content_hash: &ch,
        headers: &rec.headers,
        deleted: rec.deleted,
        user_id: author,
        timestamp,
        previous_hash: head.hash.as_deref(),
    });
    RecordRow {
        index,
        name: rec.name.clone(),
        content: rec.content.to_vec(),
        content_type: rec.content_type.clone(),
        headers: headers_json(&rec.headers),
        size: i64::try_from(rec.content.len()).unwrap_or(i64::MAX),
        author: author.to_string(),
        timestamp,
        content_hash: ch,
        hash,
        previous_hash: head.hash.clone(),
        deleted: rec.deleted,
        purged: false,
    }
}

/// The `userId` of an owner record, if it has one.
pub(crate) fn owner_of(content: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Owner {
        user_id: String,
    }
    serde_json::from_slice::<Owner>(content)
        .ok()
        .map(|o| o.user_id)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use bytes::Bytes;

    use super::*;

    fn stream() -> StreamCtx {
        StreamCtx {
            stream_id: 1,
            pod_id: 1,
            pod: "alice".into(),
            path: "log".into(),
        }
    }

    fn entry(name: &str, key: Option<&str>, pre: Option<Precondition>) -> Entry {
        Entry {
            records: vec![NewRecord {
                name: name.into(),
                content: Bytes::from_static(b"x"),
                content_type: "text/plain".into(),
                headers: BTreeMap::new(),
                deleted: false,
            }],
            precondition: pre,
            idempotency_key: key.map(str::to_string),
            author: "u".into(),
            purge: false,
        }
    }

    fn ctx(head: Head) -> BatchContext {
        BatchContext {
            head,
            conflicting_names: HashSet::new(),
            existing_keys: Default::default(),
            child_version: 0,
        }
    }

    #[test]
    fn chains_from_the_locked_head_and_never_goes_back_in_time() {
        let head = Head {
            index: 4,
            hash: Some("sha256:prev".into()),
            timestamp: 2_000,
        };
        let entries = [entry("a", None, None), entry("b", None, None)];
        let (plan, out) = build(ctx(head), &stream(), &entries, 1_000);
        assert!(out.iter().all(|o| o.is_ok()));
        assert_eq!(plan.records[0].index, 5);
        assert_eq!(
            plan.records[0].previous_hash.as_deref(),
            Some("sha256:prev")
        );
        assert_eq!(
            plan.records[1].previous_hash.as_deref(),
            Some(plan.records[0].hash.as_str())
        );
        assert!(plan.records.iter().all(|r| r.timestamp == 2_000));
    }

    #[test]
    fn preconditions_see_the_running_head() {
        let entries = [
            entry("a", None, Some(Precondition::Empty)),
            entry("b", None, Some(Precondition::Empty)),
            entry("c", None, Some(Precondition::NextIndex(1))),
        ];
        let (plan, out) = build(ctx(Head::EMPTY), &stream(), &entries, 1);
        assert!(out[0].is_ok());
        assert_eq!(
            out[1].as_ref().unwrap_err().kind(),
            ErrorKind::PreconditionFailed
        );
        assert!(out[2].is_ok());
        assert_eq!(plan.records.len(), 2);
    }

    #[test]
    fn a_repeated_key_in_one_batch_replays_the_first() {
        let entries = [entry("a", Some("k"), None), entry("a", Some("k"), None)];
        let (plan, out) = build(ctx(Head::EMPTY), &stream(), &entries, 1);
        assert_eq!(plan.records.len(), 1);
        assert_eq!(plan.idempotency_keys.len(), 1);
        match &out[1] {
            Ok(EntryOutcome::Replayed(rows)) => assert_eq!(rows[0].index, 0),
            other => panic!("expected a replay, got {other:?}"),
        }
    }

    #[test]
    fn names_of_child_streams_are_refused() {
        let mut c = ctx(Head::EMPTY);
        c.conflicting_names.insert("sub".into());
        let (plan, out) = build(c, &stream(), &[entry("sub", None, None)], 1);
        assert!(plan.records.is_empty());
        assert_eq!(out[0].as_ref().unwrap_err().kind(), ErrorKind::NameConflict);
    }
}
