//! Overlapping commits of one stream on PostgreSQL (`Store::append_following`, issue 7): a
//! follower batch inserts its records while the batch it extends (the lead) is still being
//! committed, and is kept only if the lead committed and nothing else moved the head.
//! The lead is played by a transaction held open here, so each outcome is forced, not hoped for.

use std::time::Duration;

use sqlx::PgPool;
use webpods_storage::{ChainedBatch, Head, RecordRow, Store, StoreOptions};

use crate::support::{Backend, TestDb, fresh_database};

struct Fixture {
    /// Kept while the fixture is.
    _db: TestDb,
    store: Store,
    pool: PgPool,
    stream: i64,
}

async fn fixture() -> Fixture {
    let url = fresh_database(Backend::Postgres).await;
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&url).await.expect("pool");
    let pod: i64 = sqlx::query_scalar(
        "INSERT INTO pods (name, owner_id, created_at) VALUES ('p', 'u', 0) RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .expect("pod");
    let stream: i64 = sqlx::query_scalar(
        "INSERT INTO streams (pod_id, path, name, access, creator_id, created_at) \
         VALUES ($1, 's', 's', 'public', 'u', 0) RETURNING id",
    )
    .bind(pod)
    .fetch_one(&pool)
    .await
    .expect("stream");
    Fixture {
        _db: url,
        store,
        pool,
        stream,
    }
}

fn hash(index: i64) -> String {
    format!("{index:064x}")
}

/// Records `from..from + n`, each chained to the one before.
fn records(from: i64, n: i64) -> Vec<RecordRow> {
    (from..from + n)
        .map(|i| RecordRow {
            index: i,
            name: format!("r{i}"),
            content: b"x".to_vec(),
            content_type: "text/plain".into(),
            headers: "{}".into(),
            size: 1,
            author: "u".into(),
            timestamp: i,
            content_hash: hash(1_000_000 + i),
            hash: hash(i),
            previous_hash: (i > 0).then(|| hash(i - 1)),
            deleted: false,
            purged: false,
        })
        .collect()
}

fn head(index: i64) -> Head {
    Head {
        index,
        hash: (index >= 0).then(|| hash(index)),
        timestamp: index.max(0),
    }
}

fn batch(f: &Fixture, after: i64, n: i64) -> ChainedBatch {
    ChainedBatch {
        stream_id: f.stream,
        expected: head(after),
        child_version: 0,
        records: records(after + 1, n),
    }
}

async fn stored(f: &Fixture) -> (i64, i64) {
    let head = f.store.stream_head(f.stream).await.expect("head");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM records WHERE stream_id = $1")
        .bind(f.stream)
        .fetch_one(&f.pool)
        .await
        .expect("count");
    (head.expect("stream").index, count)
}

/// Commits records 0..n as the lead would, inside a transaction left open.
async fn open_lead(f: &Fixture, n: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = f.pool.begin().await.expect("begin");
    for r in records(0, n) {
        sqlx::query(
            "INSERT INTO records (stream_id, idx, name, content, content_type, headers, size, \
             author, ts, content_hash, hash, previous_hash, deleted) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, false)",
        )
        .bind(f.stream)
        .bind(r.index)
        .bind(&r.name)
        .bind(&r.content)
        .bind(&r.content_type)
        .bind(&r.headers)
        .bind(r.size)
        .bind(&r.author)
        .bind(r.timestamp)
        .bind(&r.content_hash)
        .bind(&r.hash)
        .bind(&r.previous_hash)
        .execute(&mut *tx)
        .await
        .expect("lead record");
    }
    sqlx::query(
        "UPDATE streams SET head_index = $2, head_hash = $3, head_timestamp = $4 WHERE id = $1",
    )
    .bind(f.stream)
    .bind(n - 1)
    .bind(hash(n - 1))
    .bind(n - 1)
    .execute(&mut *tx)
    .await
    .expect("lead head");
    tx
}

/// Commits `batch` the ordinary way (as a lead or as another instance would).
async fn commit(f: &Fixture, batch: ChainedBatch) {
    assert_eq!(
        f.store.append_chained(&[batch]).await.expect("commit"),
        vec![true]
    );
}

/// The follower of records 0..=2: records 3..=6.
async fn follow(f: &Fixture) -> bool {
    f.store
        .append_following(&batch(f, 2, 4))
        .await
        .expect("follow")
}

/// [`follow`] in a task, given time to insert its records and reach the lead's row lock.
async fn follow_in_background(f: &Fixture) -> tokio::task::JoinHandle<bool> {
    let store = f.store.clone();
    let follower = batch(f, 2, 4);
    let task =
        tokio::spawn(async move { store.append_following(&follower).await.expect("follow") });
    tokio::time::sleep(Duration::from_millis(500)).await;
    task
}

#[tokio::test]
async fn follows_a_committed_lead() {
    let f = fixture().await;
    commit(&f, batch(&f, -1, 3)).await;
    assert!(follow(&f).await);
    assert_eq!(stored(&f).await, (6, 7));
}

#[tokio::test]
async fn writes_nothing_without_its_lead() {
    let f = fixture().await;
    // The lead (records 0..=2) was never written: the head is still empty.
    assert!(!follow(&f).await);
    assert_eq!(stored(&f).await, (-1, 0));
}

#[tokio::test]
async fn waits_for_a_lead_in_flight_and_commits_after_it() {
    let f = fixture().await;
    let lead = open_lead(&f, 3).await;
    let task = follow_in_background(&f).await;
    assert!(!task.is_finished(), "the follower must wait for its lead");
    lead.commit().await.expect("commit lead");
    assert!(task.await.expect("task"));
    assert_eq!(stored(&f).await, (6, 7));
}

#[tokio::test]
async fn rolls_back_when_the_lead_in_flight_fails() {
    let f = fixture().await;
    let lead = open_lead(&f, 3).await;
    let task = follow_in_background(&f).await;
    lead.rollback().await.expect("roll back lead");
    // Its records were inserted before it waited; they must be gone with it.
    assert!(!task.await.expect("task"));
    assert_eq!(stored(&f).await, (-1, 0));
}

#[tokio::test]
async fn refuses_a_name_taken_by_a_child_stream() {
    let f = fixture().await;
    commit(&f, batch(&f, -1, 3)).await;
    sqlx::query(
        "INSERT INTO streams (pod_id, parent_id, path, name, access, creator_id, created_at) \
         SELECT pod_id, id, 's/r5', 'r5', 'public', 'u', 0 FROM streams WHERE id = $1",
    )
    .bind(f.stream)
    .execute(&f.pool)
    .await
    .expect("child");
    assert!(!follow(&f).await);
    assert_eq!(stored(&f).await, (2, 3));
}

#[tokio::test]
async fn refuses_when_another_writer_moved_the_head() {
    let f = fixture().await;
    commit(&f, batch(&f, -1, 3)).await;
    // Another instance appended 3..=4 with other hashes; a follower of the old head loses.
    let mut other = batch(&f, 2, 2);
    for r in &mut other.records {
        r.hash = hash(5_000 + r.index);
    }
    commit(&f, other).await;
    assert!(!follow(&f).await);
    assert_eq!(stored(&f).await, (4, 5));
}
