//! Reads served from memory: the latest record by name, records by index and list pages, so
//! the hot read paths cost no database round trip.
//!
//! Every entry is keyed by its stream's **generation**, a number that changes whenever the
//! stream gets records (which is also when a purge erases content: a purge appends a
//! tombstone). A changed generation makes every older entry of the stream unreachable at once;
//! the entries themselves age out. Generations come from one counter that only grows, so a
//! stream whose generation was forgotten (evicted, cleared) gets one no entry was ever stored
//! under.
//!
//! Invariants:
//! - **Read your writes on one instance.** The actor bumps the generation after the commit and
//!   before any receipt is sent, so a read that starts after a receipt never sees an entry from
//!   before that append. (A reader that took the old generation while the append was in flight
//!   may store the old answer under it — nobody asks for that generation again.)
//! - **Other instances** bump on the append notice (milliseconds after the commit), forget
//!   everything when their listener reconnects (notices may have been lost), and never keep an
//!   entry longer than the cache TTL, which bounds staleness if a notice is lost anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::sync::Cache;
use webpods_storage::{Head, RecordRow};

use crate::model::RecordPage;

/// What a cached record answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RecordKey {
    /// The latest record with this name.
    Name(String),
    /// The record at this (non-negative) index.
    Index(i64),
}

/// The parameters that shape a list page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PageKey {
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub limit: i64,
    pub unique: bool,
}

pub(crate) struct ReadCache {
    generations: Cache<i64, u64>,
    next_generation: AtomicU64,
    /// `None`: no such record (a miss is worth remembering too).
    records: Cache<(i64, u64, RecordKey), Option<Arc<RecordRow>>>,
    pages: Cache<(i64, u64, PageKey), Arc<RecordPage>>,
    /// The stream's head (`None`: the stream is gone).
    heads: Cache<(i64, u64), Option<Head>>,
}

/// Bytes the record and page caches may hold together (content dominates).
const MAX_BYTES: u64 = 64 * 1024 * 1024;

impl ReadCache {
    pub fn new(ttl: Duration) -> ReadCache {
        ReadCache {
            generations: Cache::builder().max_capacity(1_000_000).build(),
            next_generation: AtomicU64::new(1),
            records: Cache::builder()
                .max_capacity(MAX_BYTES / 2)
                .weigher(|_, v: &Option<Arc<RecordRow>>| {
                    let bytes = v.as_ref().map_or(0, |r| r.content.len() + 256);
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build(),
            pages: Cache::builder()
                .max_capacity(MAX_BYTES / 2)
                .weigher(|_, p: &Arc<RecordPage>| {
                    let bytes: usize = p.records.iter().map(|r| r.row.content.len() + 256).sum();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build(),
            heads: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The stream's current generation (a fresh one if it has none).
    pub fn generation(&self, stream_id: i64) -> u64 {
        self.generations.get_with(stream_id, || {
            self.next_generation.fetch_add(1, Ordering::Relaxed)
        })
    }

    /// The stream got records (here or on another instance): forget what was cached for it.
    pub fn appended(&self, stream_id: i64) {
        let fresh = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations.insert(stream_id, fresh);
    }

    /// Notices may have been lost: forget everything.
    pub fn clear(&self) {
        self.generations.invalidate_all();
        self.records.invalidate_all();
        self.pages.invalidate_all();
        self.heads.invalidate_all();
    }

    pub fn head(&self, stream_id: i64, generation: u64) -> Option<Option<Head>> {
        self.heads.get(&(stream_id, generation))
    }

    pub fn put_head(&self, stream_id: i64, generation: u64, head: Option<Head>) {
        self.heads.insert((stream_id, generation), head);
    }

    pub fn record(
        &self,
        stream_id: i64,
        generation: u64,
        key: &RecordKey,
    ) -> Option<Option<Arc<RecordRow>>> {
        self.records.get(&(stream_id, generation, key.clone()))
    }

    pub fn put_record(
        &self,
        stream_id: i64,
        generation: u64,
        key: RecordKey,
        row: Option<Arc<RecordRow>>,
    ) {
        self.records.insert((stream_id, generation, key), row);
    }

    pub fn page(&self, stream_id: i64, generation: u64, key: PageKey) -> Option<Arc<RecordPage>> {
        self.pages.get(&(stream_id, generation, key))
    }

    pub fn put_page(&self, stream_id: i64, generation: u64, key: PageKey, page: Arc<RecordPage>) {
        self.pages.insert((stream_id, generation, key), page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_or_a_clear_makes_older_entries_unreachable() {
        let cache = ReadCache::new(Duration::from_secs(60));
        let g1 = cache.generation(7);
        assert_eq!(cache.generation(7), g1, "stable until something changes");
        cache.put_record(7, g1, RecordKey::Name("a".into()), None);
        assert_eq!(
            cache.record(7, g1, &RecordKey::Name("a".into())),
            Some(None)
        );

        cache.appended(7);
        let g2 = cache.generation(7);
        assert_ne!(g2, g1);
        assert_eq!(cache.record(7, g2, &RecordKey::Name("a".into())), None);

        cache.clear();
        let g3 = cache.generation(7);
        assert!(g3 > g2 && g3 > g1, "a forgotten generation is never reused");
        assert_ne!(cache.generation(8), g3, "streams do not share generations");
    }
}
