//! The GraphQL object types of SPEC §7 (`Pod`, `Stream`, `Record`, `User`, …) and the Relay
//! pagination of records. Every field resolves through the engine with the request's caller;
//! nested heads and users go through the batch loaders of [`crate::loaders`].

use std::collections::{HashMap, HashSet};

use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, ID, Json, Object, Result, SimpleObject};
use base64::Engine as _;
use webpods_engine::{
    Action, Caller, Engine, ErrorKind, ListQuery, PodInfo, Receipt, Record, StreamInfo, UserInfo,
    Verification, is_json_type,
};

use webpods_engine::names::{check_stream_path, split_last};

use crate::error::{OrGql, coded, gql, invalid};
use crate::loaders::{RateSeen, RequestCtx};
use crate::{GraphqlSettings, STREAMS_FACTOR, page_complexity};

/// A stream path argument as the engine takes it: one leading `/` is allowed (`/blog/posts`),
/// anything else is checked as given, so `a/`, `//` or `a//b` are `INVALID_PATH` as in REST.
pub(crate) fn stream_arg(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
}

/// The engine and the request context of a resolver.
pub(crate) fn parts<'a>(ctx: &'a Context<'_>) -> Result<(&'a Engine, &'a RequestCtx)> {
    Ok((ctx.data::<Engine>()?, ctx.data::<RequestCtx>()?))
}

/// Counts one `action` of the request's caller against the rate limits (SPEC §9), as REST
/// counts one per request: every top-level query field is a read, every mutation field a write
/// (a pod creation for `createPod`), every subscription a read.
pub(crate) async fn charge(ctx: &Context<'_>, action: Action) -> Result<()> {
    let (engine, rc) = parts(ctx)?;
    match engine.rate_limit(&rc.rate_key, action).await {
        Ok(None) => Ok(()),
        Ok(Some(s)) => {
            rc.saw_rate(RateSeen {
                limit: s.limit,
                remaining: s.remaining,
                reset: s.reset,
                retry_after: None,
            });
            Ok(())
        }
        Err(e) => {
            if let Some((s, retry_after)) = e.rate_refusal() {
                rc.saw_rate(RateSeen {
                    limit: s.limit,
                    remaining: s.remaining,
                    reset: s.reset,
                    retry_after: Some(retry_after),
                });
            }
            Err(gql(e))
        }
    }
}

pub(crate) fn caller<'a>(ctx: &'a Context<'_>) -> Result<&'a Caller> {
    Ok(&ctx.data::<RequestCtx>()?.caller)
}

// ----- User -------------------------------------------------------------------------------------

/// A user. `email` is shown only to the user themselves.
pub(crate) struct UserObj(pub UserInfo);

impl UserObj {
    pub fn unknown(id: &str) -> UserObj {
        UserObj(UserInfo {
            id: id.to_string(),
            email: None,
            name: None,
        })
    }
}

#[Object(name = "User")]
impl UserObj {
    /// The user's id (`userId` in REST).
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn name(&self) -> Option<&str> {
        self.0.name.as_deref()
    }
    /// Only for the caller's own user; `null` for everyone else.
    async fn email(&self) -> Option<&str> {
        self.0.email.as_deref()
    }
}

async fn load_user(ctx: &Context<'_>, id: &str) -> Result<UserObj> {
    let (_, rc) = parts(ctx)?;
    Ok(match rc.users.load_one(id.to_string()).await.gql()? {
        Some(u) => UserObj(u),
        None => UserObj::unknown(id),
    })
}

// ----- Pod --------------------------------------------------------------------------------------

/// A pod.
pub(crate) struct PodObj(pub PodInfo);

#[Object(name = "Pod")]
impl PodObj {
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// ISO 8601 UTC with milliseconds.
    async fn created_at(&self) -> &str {
        &self.0.created_at
    }
    /// The current owner — `null` unless the caller may read `.config/owner` (the owner).
    async fn owner(&self, ctx: &Context<'_>) -> Result<Option<UserObj>> {
        match &self.0.owner_id {
            Some(id) => Ok(Some(load_user(ctx, id).await?)),
            None => Ok(None),
        }
    }
    /// Streams of the pod the caller may read, ordered by path: those under `prefix` (a stream
    /// path; default: the whole pod), all descendants (`recursive`, default) or only direct
    /// children. The root stream itself is `stream(path: "")`. `null` with the error beside
    /// it (a bad `prefix`), so that the pod's other fields survive.
    #[graphql(complexity = "STREAMS_FACTOR * child_complexity + 1")]
    async fn streams(
        &self,
        ctx: &Context<'_>,
        prefix: Option<String>,
        recursive: Option<bool>,
    ) -> Result<Option<Vec<StreamObj>>> {
        let recursive = recursive.unwrap_or(true);
        list_streams(
            ctx,
            &self.0.name,
            prefix.as_deref().unwrap_or(""),
            recursive,
        )
        .await
        .map(Some)
    }
    /// One stream by path (`""` = the root stream). `null` with the error beside it
    /// (`STREAM_NOT_FOUND`, `FORBIDDEN`…), so that the pod's other fields survive.
    async fn stream(&self, ctx: &Context<'_>, path: String) -> Result<Option<StreamObj>> {
        open_stream(ctx, &self.0.name, &path).await.map(Some)
    }
}

pub(crate) async fn open_stream(ctx: &Context<'_>, pod: &str, path: &str) -> Result<StreamObj> {
    let (engine, rc) = parts(ctx)?;
    let path = stream_arg(path);
    let info = engine.open_stream(&rc.caller, pod, path).await.gql()?;
    Ok(StreamObj {
        pod: pod.to_string(),
        info,
        count: None,
        head: None,
    })
}

async fn list_streams(
    ctx: &Context<'_>,
    pod: &str,
    base: &str,
    recursive: bool,
) -> Result<Vec<StreamObj>> {
    let (_, rc) = parts(ctx)?;
    let base = stream_arg(base);
    check_stream_path(base).gql()?;
    let all = rc.streams.load_one(pod.to_string()).await.gql()?;
    let prefix = format!("{base}/");
    let found: Vec<(StreamInfo, i64)> = all
        .iter()
        .flat_map(|list| list.iter())
        .filter(|(s, _)| {
            let under = base.is_empty() || s.path.starts_with(&prefix);
            under && (recursive || split_last(&s.path).0 == base)
        })
        .cloned()
        .collect();
    // Heads (and their authors) of the whole list in one load each, whatever the timing of
    // the resolvers (the loaders' batching window alone could split a long list).
    let want_head = ctx.look_ahead().field("head");
    let mut heads = if want_head.exists() {
        let keys = found.iter().map(|(s, _)| (s.id, s.path.clone()));
        rc.heads.load_many(keys).await.gql()?
    } else {
        HashMap::new()
    };
    let authors = if want_head.field("author").exists() {
        prefetch_users(ctx, heads.values().map(|r| r.row.author.clone())).await?
    } else {
        HashMap::new()
    };
    Ok(found
        .into_iter()
        .map(|(info, count)| {
            let head = want_head.exists().then(|| {
                heads
                    .remove(&(info.id, info.path.clone()))
                    .map(|r| RecordObj::with_author(r, &authors))
            });
            StreamObj {
                pod: pod.to_string(),
                info,
                count: Some(count),
                head,
            }
        })
        .collect())
}

/// Users by id in one load (for lists whose records show their author).
async fn prefetch_users(
    ctx: &Context<'_>,
    ids: impl Iterator<Item = String>,
) -> Result<HashMap<String, UserInfo>> {
    let (_, rc) = parts(ctx)?;
    let ids: HashSet<String> = ids.collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    rc.users.load_many(ids).await.gql()
}

/// Records as objects, their authors loaded at once when the selection shows them.
async fn record_objs(
    ctx: &Context<'_>,
    records: Vec<Record>,
    wants_author: bool,
) -> Result<Vec<RecordObj>> {
    let authors = if wants_author {
        prefetch_users(ctx, records.iter().map(|r| r.row.author.clone())).await?
    } else {
        HashMap::new()
    };
    Ok(records
        .into_iter()
        .map(|r| RecordObj::with_author(r, &authors))
        .collect())
}

// ----- Stream -----------------------------------------------------------------------------------

/// A stream the caller may read.
pub(crate) struct StreamObj {
    pub pod: String,
    pub info: StreamInfo,
    /// Record count known from a listing (else loaded with the head).
    pub count: Option<i64>,
    /// Head prefetched by a listing (`Some(None)` = empty stream).
    pub head: Option<Option<RecordObj>>,
}

impl StreamObj {
    async fn head_record(&self, ctx: &Context<'_>) -> Result<Option<Record>> {
        let (_, rc) = parts(ctx)?;
        rc.heads
            .load_one((self.info.id, self.info.path.clone()))
            .await
            .gql()
    }

    async fn total(&self, ctx: &Context<'_>) -> Result<i64> {
        Ok(self.head_record(ctx).await?.map_or(0, |r| r.row.index + 1))
    }
}

/// Extra fields of a record connection.
#[derive(SimpleObject)]
pub(crate) struct RecordConnectionFields {
    /// Records in the stream (head index + 1), whatever the page.
    total_count: i64,
}

pub(crate) type RecordConnection = Connection<i64, RecordObj, RecordConnectionFields, EmptyFields>;

#[Object(name = "Stream")]
impl StreamObj {
    /// The pod's name.
    async fn pod(&self) -> &str {
        &self.pod
    }
    /// Full path without leading slash (`""` = the root stream).
    async fn path(&self) -> &str {
        &self.info.path
    }
    /// Last segment of the path.
    async fn name(&self) -> &str {
        self.info.path.rsplit('/').next().unwrap_or("")
    }
    /// `public`, `private`, or the path of a permission stream (`/members`).
    async fn access_permission(&self) -> &str {
        &self.info.access_permission
    }
    async fn created_at(&self) -> &str {
        &self.info.created_at
    }
    /// Records in the stream (tombstones included): head index + 1.
    async fn record_count(&self, ctx: &Context<'_>) -> Result<i64> {
        match self.count {
            Some(c) => Ok(c),
            None => self.total(ctx).await,
        }
    }
    /// The last record (`null` for an empty stream).
    async fn head(&self, ctx: &Context<'_>) -> Result<Option<RecordObj>> {
        if let Some(known) = &self.head {
            return Ok(known.clone());
        }
        Ok(self.head_record(ctx).await?.map(RecordObj::new))
    }
    /// Records in index order, Relay-style. Cursors are record indices (decimal strings).
    /// `after`/`first` page forward, `before`/`last` backward; with neither `first` nor
    /// `last`, the first 100. Page sizes are capped by the server's `max_list_records`.
    /// `unique`: only the latest non-deleted record of each name (forward paging only).
    /// `hasNextPage`/`hasPreviousPage` tell whether the stream has records after/before the
    /// page.
    #[graphql(complexity = "page_complexity(first, last) * child_complexity + 1")]
    async fn records(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        before: Option<String>,
        first: Option<i32>,
        last: Option<i32>,
        unique: Option<bool>,
    ) -> Result<RecordConnection> {
        let unique = unique.unwrap_or(false);
        let engine = ctx.data::<Engine>()?;
        let cap = ctx.data::<GraphqlSettings>()?.max_page;
        let after = after.as_deref().map(cursor).transpose()?;
        let before = before.as_deref().map(cursor).transpose()?;
        let size = |n: Option<i32>, what: &str| match n {
            Some(n) if n < 0 => Err(invalid(format!("{what} must not be negative"))),
            Some(n) => Ok(Some(i64::from(n).min(cap))),
            None => Ok(None),
        };
        let (first, last) = (size(first, "first")?, size(last, "last")?);
        let first = match (first, last) {
            (None, None) => Some(100.min(cap)),
            (f, _) => f,
        };
        if unique {
            return self
                .unique_page(ctx, engine, after, before, first, last)
                .await;
        }
        let total = self.total(ctx).await?;
        let mut lo = after.map_or(0, |a| a.saturating_add(1)).max(0);
        let mut hi = before.map_or(total, |b| b.min(total));
        if hi < lo {
            hi = lo;
        }
        if let Some(f) = first {
            hi = hi.min(lo.saturating_add(f));
        }
        if let Some(l) = last {
            lo = lo.max(hi - l);
        }
        let records = if hi > lo {
            engine.read_range(&self.info, lo, hi).await.gql()?.records
        } else {
            Vec::new()
        };
        let mut conn = Connection::with_additional_fields(
            lo > 0 && total > 0,
            hi < total,
            RecordConnectionFields { total_count: total },
        );
        let objs = record_objs(ctx, records, wants_author(ctx)).await?;
        conn.edges
            .extend(objs.into_iter().map(|r| Edge::new(r.0.row.index, r)));
        Ok(conn)
    }
    /// One record: the latest called `name` (integer names fall back to indices), or the one
    /// at `index` (negative counts from the end). Errors as in REST: `RECORD_NOT_FOUND`,
    /// `RECORD_DELETED` (the latest with that name is a tombstone), `RECORD_PURGED`.
    async fn record(
        &self,
        ctx: &Context<'_>,
        name: Option<String>,
        index: Option<i64>,
    ) -> Result<Option<RecordObj>> {
        let engine = ctx.data::<Engine>()?;
        let rec = match (name, index) {
            (Some(n), None) => engine.read_by_name(&self.info, &n).await,
            (None, Some(i)) => engine.read_by_index(&self.info, i).await,
            _ => return Err(invalid("give exactly one of name and index")),
        };
        Ok(Some(RecordObj::new(rec.gql()?)))
    }
    /// Direct child streams the caller may read.
    #[graphql(complexity = "STREAMS_FACTOR * child_complexity + 1")]
    async fn children(&self, ctx: &Context<'_>) -> Result<Vec<StreamObj>> {
        list_streams(ctx, &self.pod, &self.info.path, false).await
    }
    /// Recomputes every hash and link of the chain server-side (expensive: counts 50 towards
    /// the query's complexity).
    #[graphql(complexity = 50)]
    async fn verify(&self, ctx: &Context<'_>) -> Result<VerificationObj> {
        let engine = ctx.data::<Engine>()?;
        Ok(VerificationObj(
            engine.verify(&self.pod, &self.info).await.gql()?,
        ))
    }
}

impl StreamObj {
    /// A page of `unique` records: forward only (the storage reads them in index order).
    async fn unique_page(
        &self,
        ctx: &Context<'_>,
        engine: &Engine,
        after: Option<i64>,
        before: Option<i64>,
        first: Option<i64>,
        last: Option<i64>,
    ) -> Result<RecordConnection> {
        if last.is_some() {
            return Err(invalid("unique lists page forward only: use first/after"));
        }
        let limit = first.unwrap_or(100);
        let mut conn = if limit == 0 {
            let total = self.total(ctx).await?;
            Connection::with_additional_fields(
                after.is_some(),
                false,
                RecordConnectionFields { total_count: total },
            )
        } else {
            let page = engine
                .list(
                    &self.info,
                    ListQuery {
                        // A negative `after` means "the last N" to the engine; cursors are >= 0.
                        after: after.filter(|a| *a >= 0),
                        before,
                        limit: Some(limit),
                        unique: true,
                    },
                )
                .await
                .gql()?;
            let mut conn = Connection::with_additional_fields(
                after.is_some_and(|a| a >= 0),
                page.has_more,
                RecordConnectionFields {
                    total_count: page.total,
                },
            );
            let objs = record_objs(ctx, page.records, wants_author(ctx)).await?;
            conn.edges
                .extend(objs.into_iter().map(|r| Edge::new(r.0.row.index, r)));
            conn
        };
        conn.has_previous_page &= conn.additional_fields.total_count > 0;
        Ok(conn)
    }
}

/// Whether a connection's selection shows the records' authors.
fn wants_author(ctx: &Context<'_>) -> bool {
    let la = ctx.look_ahead();
    la.field("edges").field("node").field("author").exists()
        || la.field("nodes").field("author").exists()
}

/// A cursor is a record index (`last: N` asks for the end of a stream; a negative cursor is
/// no record's).
fn cursor(s: &str) -> Result<i64> {
    s.parse::<i64>().ok().filter(|i| *i >= 0).ok_or_else(|| {
        coded(
            ErrorKind::InvalidIndex.code(),
            format!("invalid cursor {s:?}: a cursor is a record index, 0 or more"),
        )
    })
}

// ----- Record -----------------------------------------------------------------------------------

/// A record, with its author when a list prefetched it.
#[derive(Clone)]
pub(crate) struct RecordObj(pub Record, pub Option<UserInfo>);

impl RecordObj {
    pub fn new(r: Record) -> RecordObj {
        RecordObj(r, None)
    }

    fn with_author(r: Record, authors: &HashMap<String, UserInfo>) -> RecordObj {
        let author = authors.get(&r.row.author).cloned();
        RecordObj(r, author)
    }

    fn content(&self) -> Result<&[u8]> {
        if self.0.row.purged {
            return Err(gql(webpods_engine::Error::new(
                ErrorKind::RecordPurged,
                format!("the content of {:?} was purged", self.0.row.name),
            )));
        }
        Ok(&self.0.row.content)
    }
}

#[Object(name = "Record")]
impl RecordObj {
    /// Position in the stream, from 0.
    async fn index(&self) -> i64 {
        self.0.row.index
    }
    async fn name(&self) -> &str {
        &self.0.row.name
    }
    /// `stream/name`.
    async fn path(&self) -> String {
        self.0.path()
    }
    async fn content_type(&self) -> &str {
        &self.0.row.content_type
    }
    /// The content as a string when it is valid UTF-8 (`null` for binary content).
    /// `RECORD_PURGED` when the content was erased.
    async fn text(&self) -> Result<Option<String>> {
        Ok(std::str::from_utf8(self.content()?)
            .ok()
            .map(str::to_string))
    }
    /// The content parsed, for JSON content types (`application/json`, `*+json`); `null`
    /// otherwise. `INVALID_CONTENT` for valid JSON that GraphQL cannot carry (a number beyond
    /// a 64-bit float, such as `1e400`): read it as `text`.
    async fn json(&self) -> Result<Option<Json<serde_json::Value>>> {
        let bytes = self.content()?;
        if !is_json_type(&self.0.row.content_type) {
            return Ok(None);
        }
        match serde_json::from_slice(bytes) {
            Ok(v) => Ok(Some(Json(v))),
            Err(e) => Err(crate::error::coded(
                webpods_engine::ErrorKind::InvalidContent.code(),
                format!("the content cannot be given as GraphQL JSON ({e}); read it as text"),
            )),
        }
    }
    /// The content, base64 (standard alphabet, padded). `RECORD_PURGED` (and `null`, so that
    /// the rest of a list survives) when the content was erased.
    async fn base64(&self) -> Result<Option<String>> {
        Ok(Some(
            base64::engine::general_purpose::STANDARD.encode(self.content()?),
        ))
    }
    /// Content length in bytes.
    async fn size(&self) -> i64 {
        self.0.row.size
    }
    async fn content_hash(&self) -> &str {
        &self.0.row.content_hash
    }
    async fn hash(&self) -> &str {
        &self.0.row.hash
    }
    /// `null` for index 0.
    async fn previous_hash(&self) -> Option<&str> {
        self.0.row.previous_hash.as_deref()
    }
    /// The author's user id.
    async fn user_id(&self) -> &str {
        &self.0.row.author
    }
    async fn author(&self, ctx: &Context<'_>) -> Result<UserObj> {
        match &self.1 {
            Some(u) => Ok(UserObj(u.clone())),
            None => load_user(ctx, &self.0.row.author).await,
        }
    }
    /// ISO 8601 UTC with milliseconds (as REST's `X-Timestamp`).
    async fn timestamp(&self) -> String {
        webpods_engine::clock::iso8601(self.0.row.timestamp)
    }
    /// Custom record headers, an object of lowercase names to values.
    async fn headers(&self) -> Json<std::collections::BTreeMap<String, String>> {
        Json(self.0.headers())
    }
    /// A tombstone (written by `deleteRecord`).
    async fn deleted(&self) -> bool {
        self.0.row.deleted
    }
    /// The content was erased by a purge (hashes remain).
    async fn purged(&self) -> bool {
        self.0.row.purged
    }
}

// ----- results of mutations and checks -------------------------------------------------------

/// The receipt of an appended record.
pub(crate) struct ReceiptObj {
    pub receipt: Receipt,
    pub replayed: bool,
}

#[Object(name = "Receipt")]
impl ReceiptObj {
    async fn index(&self) -> i64 {
        self.receipt.index
    }
    async fn name(&self) -> &str {
        &self.receipt.name
    }
    async fn path(&self) -> &str {
        &self.receipt.path
    }
    async fn content_type(&self) -> &str {
        &self.receipt.content_type
    }
    async fn size(&self) -> i64 {
        self.receipt.size
    }
    async fn content_hash(&self) -> &str {
        &self.receipt.content_hash
    }
    async fn hash(&self) -> &str {
        &self.receipt.hash
    }
    async fn previous_hash(&self) -> Option<&str> {
        self.receipt.previous_hash.as_deref()
    }
    async fn timestamp(&self) -> &str {
        &self.receipt.timestamp
    }
    /// `true` when the idempotency key matched an earlier append: nothing new was written and
    /// this is the original receipt.
    async fn replayed(&self) -> bool {
        self.replayed
    }
}

/// The result of verifying a stream's chain.
pub(crate) struct VerificationObj(pub Verification);

#[Object(name = "Verification")]
impl VerificationObj {
    async fn valid(&self) -> bool {
        self.0.valid
    }
    /// Records checked (head index + 1).
    async fn length(&self) -> i64 {
        self.0.length
    }
    async fn head_index(&self) -> i64 {
        self.0.head_index
    }
    async fn head_hash(&self) -> Option<&str> {
        self.0.head_hash.as_deref()
    }
    async fn first_invalid_index(&self) -> Option<i64> {
        self.0.first_invalid_index
    }
    async fn reason(&self) -> Option<&str> {
        self.0.reason.as_deref()
    }
}
