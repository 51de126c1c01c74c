//! Chain verification (SPEC §4.3 `?verify=true`): recompute every content hash (unless purged),
//! every record hash and every link, a page at a time so memory stays bounded.

use std::collections::BTreeMap;

use serde::Serialize;
use webpods_storage::RecordRange;

use crate::Engine;
use crate::error::Result;
use crate::hash::{HashInput, content_hash, record_hash};
use crate::model::StreamInfo;

/// Records checked per storage read.
const PAGE: i64 = 1000;

/// The result of verifying a stream's chain.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub valid: bool,
    pub length: i64,
    pub head_index: i64,
    pub head_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_invalid_index: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Engine {
    /// Recomputes the whole chain of a stream (the caller's read permission was checked when
    /// `stream` was resolved).
    pub async fn verify(&self, pod: &str, stream: &StreamInfo) -> Result<Verification> {
        let store = &self.inner.store;
        let head = store
            .stream_head(stream.id)
            .await?
            .unwrap_or(webpods_storage::Head::EMPTY);
        let mut result = Verification {
            valid: true,
            length: head.index + 1,
            head_index: head.index,
            head_hash: head.hash.clone(),
            first_invalid_index: None,
            reason: None,
        };
        let mut prev: Option<String> = None;
        let mut expected = 0i64;
        loop {
            let rows = store
                .list_records(
                    stream.id,
                    RecordRange {
                        after: Some(expected - 1),
                        before: Some(head.index + 1),
                        limit: PAGE,
                        unique: false,
                    },
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let problem = if r.index != expected {
                    Some(format!("index {expected} is missing"))
                } else if r.previous_hash != prev {
                    Some("previousHash does not match the previous record".to_string())
                } else if !r.purged && content_hash(&r.content) != r.content_hash {
                    Some("contentHash does not match the content".to_string())
                } else {
                    let headers: BTreeMap<String, String> =
                        serde_json::from_str(&r.headers).unwrap_or_default();
                    let h = record_hash(&HashInput {
                        pod,
                        stream: &stream.path,
                        index: r.index,
                        name: &r.name,
                        content_type: &r.content_type,
                        content_hash: &r.content_hash,
                        headers: &headers,
                        deleted: r.deleted,
                        user_id: &r.author,
                        timestamp: r.timestamp,
                        previous_hash: prev.as_deref(),
                    });
                    (h != r.hash).then(|| "hash does not match the record".to_string())
                };
                if let Some(reason) = problem {
                    result.valid = false;
                    result.first_invalid_index = Some(expected);
                    result.reason = Some(reason);
                    return Ok(result);
                }
                prev = Some(r.hash.clone());
                expected += 1;
            }
        }
        if expected != head.index + 1 || prev != head.hash {
            result.valid = false;
            result.first_invalid_index = Some(expected);
            result.reason = Some("the stored head does not match the last record".to_string());
        }
        Ok(result)
    }
}
