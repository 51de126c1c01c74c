//! `Query` and `Mutation` roots (SPEC §7): thin resolvers over the engine, errors mapped by
//! [`crate::error`].

use std::collections::BTreeMap;

use async_graphql::{Context, InputObject, Json, Object, Result};
use base64::Engine as _;
use bytes::Bytes;
use webpods_engine::{Action, AppendRequest, ErrorKind, NewRecord, Precondition};

use crate::STREAMS_FACTOR;
use crate::error::{OrGql, coded, invalid};
use crate::types::{
    PodObj, ReceiptObj, StreamObj, UserObj, caller, charge, open_stream, parts, stream_arg,
};

pub struct QueryRoot;

/// The top-level fields are nullable, so that one failed field (a stream the caller may not
/// read) is `null` with its error, and its siblings still answer.
#[Object(name = "Query")]
impl QueryRoot {
    /// The caller (`null` when anonymous).
    async fn me(&self, ctx: &Context<'_>) -> Result<Option<UserObj>> {
        charge(ctx, Action::Read).await?;
        let (engine, rc) = parts(ctx)?;
        if rc.caller.user_id().is_none() {
            return Ok(None);
        }
        Ok(Some(UserObj(engine.me(&rc.caller).await.gql()?)))
    }
    /// Pods the caller owns (`UNAUTHORIZED` when anonymous).
    #[graphql(complexity = "STREAMS_FACTOR * child_complexity + 1")]
    async fn my_pods(&self, ctx: &Context<'_>) -> Result<Option<Vec<PodObj>>> {
        charge(ctx, Action::Read).await?;
        let (engine, rc) = parts(ctx)?;
        Ok(Some(
            engine
                .my_pods(&rc.caller)
                .await
                .gql()?
                .into_iter()
                .map(PodObj)
                .collect(),
        ))
    }
    /// A pod by name (`POD_NOT_FOUND`).
    async fn pod(&self, ctx: &Context<'_>, name: String) -> Result<Option<PodObj>> {
        charge(ctx, Action::Read).await?;
        let (engine, rc) = parts(ctx)?;
        Ok(Some(PodObj(
            engine.pod_info(&rc.caller, &name).await.gql()?,
        )))
    }
    /// A stream the caller may read (`path` `""` = the pod's root stream).
    async fn stream(
        &self,
        ctx: &Context<'_>,
        pod: String,
        path: String,
    ) -> Result<Option<StreamObj>> {
        charge(ctx, Action::Read).await?;
        open_stream(ctx, &pod, &path).await.map(Some)
    }
}

/// The content of a record to append: exactly one of `content` (text), `json` (stored as
/// compact JSON) or `base64` (any bytes).
#[derive(InputObject)]
pub(crate) struct RecordInput {
    name: String,
    content: Option<String>,
    json: Option<Json<serde_json::Value>>,
    base64: Option<String>,
    /// Default: `text/plain` for `content`, `application/json` for `json`,
    /// `application/octet-stream` for `base64`.
    content_type: Option<String>,
    /// Custom record headers (`{"x-source": "cli"}`), names allowed by the server's
    /// `allowed_record_headers`.
    headers: Option<Json<BTreeMap<String, String>>>,
}

impl RecordInput {
    fn into_new_record(self) -> Result<NewRecord> {
        let (content, default_type) = match (self.content, self.json, self.base64) {
            (Some(t), None, None) => (Bytes::from(t), "text/plain"),
            (None, Some(Json(v)), None) => (Bytes::from(v.to_string()), "application/json"),
            (None, None, Some(b)) => (
                Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .map_err(|_| {
                            coded(
                                ErrorKind::InvalidContent.code(),
                                "base64 is not valid base64",
                            )
                        })?,
                ),
                "application/octet-stream",
            ),
            _ => {
                return Err(invalid("give exactly one of content, json and base64"));
            }
        };
        let content_type = match self.content_type {
            Some(ct) => media_type(&ct)?,
            None => default_type.to_string(),
        };
        let headers = self
            .headers
            .map(|Json(h)| {
                h.into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect()
            })
            .unwrap_or_default();
        Ok(NewRecord {
            name: self.name,
            content,
            content_type,
            headers,
            deleted: false,
        })
    }
}

/// The media type of a content type (parameters dropped, lowercased), as REST does.
fn media_type(raw: &str) -> Result<String> {
    let media = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let tok = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let valid = media.len() <= 255 && media.split_once('/').is_some_and(|(t, s)| tok(t) && tok(s));
    if valid {
        Ok(media)
    } else {
        Err(invalid(format!("invalid content type {raw:?}")))
    }
}

fn precondition(
    expected_hash: Option<String>,
    expected_index: Option<i64>,
) -> Result<Option<Precondition>> {
    match (expected_hash, expected_index) {
        (Some(h), None) => Ok(Some(Precondition::LastHash(
            h.trim_matches('"').to_string(),
        ))),
        (None, Some(i)) => Ok(Some(Precondition::NextIndex(i))),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(invalid(
            "give at most one of expectedHash and expectedIndex",
        )),
    }
}

pub struct MutationRoot;

/// Every mutation's result is nullable (GraphQL's advice for top-level fields): mutations run
/// in order, and a failed one must not null the receipts of those committed before it.
#[Object(name = "Mutation")]
impl MutationRoot {
    /// Creates a pod owned by the caller (`POD_EXISTS`, `INVALID_INPUT`).
    async fn create_pod(&self, ctx: &Context<'_>, name: String) -> Result<Option<PodObj>> {
        charge(ctx, Action::PodCreate).await?;
        let (engine, rc) = parts(ctx)?;
        if let Err(e) = engine.create_pod(&rc.caller, &name).await {
            // Refused before anything was created (an invalid name, a name taken): the
            // creation limit is not used up.
            if !matches!(e.kind(), ErrorKind::Internal | ErrorKind::Unavailable) {
                engine.rate_refund(&rc.rate_key, Action::PodCreate, 1).await;
                rc.gave_back_one();
            }
            return Err(e).gql();
        }
        Ok(Some(PodObj(
            engine.pod_info(&rc.caller, &name).await.gql()?,
        )))
    }
    /// Deletes a pod with all its streams and records (owner only).
    async fn delete_pod(&self, ctx: &Context<'_>, name: String) -> Result<Option<bool>> {
        charge(ctx, Action::Write).await?;
        let (engine, rc) = parts(ctx)?;
        engine.delete_pod(&rc.caller, &name).await.gql()?;
        Ok(Some(true))
    }
    /// Makes `userId` the pod's owner (owner only; `USER_NOT_FOUND`). The previous owner
    /// loses owner rights at once.
    async fn transfer_pod(
        &self,
        ctx: &Context<'_>,
        pod: String,
        user_id: String,
    ) -> Result<Option<PodObj>> {
        charge(ctx, Action::Write).await?;
        let (engine, rc) = parts(ctx)?;
        engine
            .transfer_owner(&rc.caller, &pod, &user_id)
            .await
            .gql()?;
        Ok(Some(PodObj(engine.pod_info(&rc.caller, &pod).await.gql()?)))
    }
    /// Creates an empty stream (and missing ancestors); `access` = `public` (default),
    /// `private` or `/permission-stream`. `STREAM_EXISTS` if it exists.
    async fn create_stream(
        &self,
        ctx: &Context<'_>,
        pod: String,
        path: String,
        access: Option<String>,
    ) -> Result<Option<StreamObj>> {
        charge(ctx, Action::Write).await?;
        let (engine, rc) = parts(ctx)?;
        let path = stream_arg(&path).to_string();
        let info = engine
            .create_stream(&rc.caller, &pod, &path, access.as_deref())
            .await
            .gql()?;
        Ok(Some(StreamObj {
            pod,
            info,
            count: Some(0),
            head: Some(None),
        }))
    }
    /// Removes a stream, its descendants and their records (owner only; not `.config`).
    async fn delete_stream(
        &self,
        ctx: &Context<'_>,
        pod: String,
        path: String,
    ) -> Result<Option<bool>> {
        charge(ctx, Action::Write).await?;
        let (engine, rc) = parts(ctx)?;
        engine
            .delete_stream(&rc.caller, &pod, stream_arg(&path))
            .await
            .gql()?;
        Ok(Some(true))
    }
    /// Appends one record (creating the stream when missing, with `access`). Give exactly one
    /// of `content`, `json`, `base64`. `expectedHash` / `expectedIndex`: append only if the
    /// stream's last record has that hash / the record gets that index, else
    /// `PRECONDITION_FAILED` with the current head in `extensions.details`. `idempotencyKey`:
    /// a retry returns the original receipt with `replayed: true`.
    #[allow(clippy::too_many_arguments)]
    async fn append_record(
        &self,
        ctx: &Context<'_>,
        pod: String,
        stream: String,
        name: String,
        content: Option<String>,
        json: Option<Json<serde_json::Value>>,
        base64: Option<String>,
        content_type: Option<String>,
        headers: Option<Json<BTreeMap<String, String>>>,
        expected_hash: Option<String>,
        expected_index: Option<i64>,
        idempotency_key: Option<String>,
        access: Option<String>,
    ) -> Result<Option<ReceiptObj>> {
        charge(ctx, Action::Write).await?;
        let record = RecordInput {
            name,
            content,
            json,
            base64,
            content_type,
            headers,
        };
        let mut receipts = append(
            ctx,
            &pod,
            &stream,
            vec![record],
            precondition(expected_hash, expected_index)?,
            idempotency_key,
            access,
        )
        .await?;
        receipts
            .pop()
            .map(Some)
            .ok_or_else(|| coded(ErrorKind::Internal.code(), "internal error"))
    }
    /// Appends records atomically at consecutive indices (at most 1000). Preconditions and the
    /// idempotency key apply to the whole batch.
    #[allow(clippy::too_many_arguments)]
    async fn append_records(
        &self,
        ctx: &Context<'_>,
        pod: String,
        stream: String,
        records: Vec<RecordInput>,
        expected_hash: Option<String>,
        expected_index: Option<i64>,
        idempotency_key: Option<String>,
        access: Option<String>,
    ) -> Result<Option<Vec<ReceiptObj>>> {
        charge(ctx, Action::Write).await?;
        append(
            ctx,
            &pod,
            &stream,
            records,
            precondition(expected_hash, expected_index)?,
            idempotency_key,
            access,
        )
        .await
        .map(Some)
    }
    /// Appends a tombstone for `name` (owner only); with `purge`, also erases the content of
    /// every earlier record with that name (hashes stay, the chain still verifies).
    async fn delete_record(
        &self,
        ctx: &Context<'_>,
        pod: String,
        stream: String,
        name: String,
        purge: Option<bool>,
    ) -> Result<Option<bool>> {
        charge(ctx, Action::Write).await?;
        let purge = purge.unwrap_or(false);
        let (engine, rc) = parts(ctx)?;
        engine
            .delete_record(&rc.caller, &pod, stream_arg(&stream), &name, purge)
            .await
            .gql()?;
        Ok(Some(true))
    }
    /// Replaces the pod's routing map `{"/path": "target"}` (owner only).
    async fn set_routing(
        &self,
        ctx: &Context<'_>,
        pod: String,
        routes: Json<BTreeMap<String, String>>,
    ) -> Result<Option<bool>> {
        charge(ctx, Action::Write).await?;
        let (engine, rc) = parts(ctx)?;
        engine.set_routing(&rc.caller, &pod, routes.0).await.gql()?;
        Ok(Some(true))
    }
    /// Replaces the pod's custom domains (owner only; `DOMAIN_TAKEN`).
    async fn set_domains(
        &self,
        ctx: &Context<'_>,
        pod: String,
        domains: Vec<String>,
    ) -> Result<Option<bool>> {
        charge(ctx, Action::Write).await?;
        let (engine, rc) = parts(ctx)?;
        engine.set_domains(&rc.caller, &pod, domains).await.gql()?;
        Ok(Some(true))
    }
}

async fn append(
    ctx: &Context<'_>,
    pod: &str,
    stream: &str,
    records: Vec<RecordInput>,
    precondition: Option<Precondition>,
    idempotency_key: Option<String>,
    access: Option<String>,
) -> Result<Vec<ReceiptObj>> {
    let (engine, _) = parts(ctx)?;
    let caller = caller(ctx)?;
    let records = records
        .into_iter()
        .map(RecordInput::into_new_record)
        .collect::<Result<Vec<_>>>()?;
    let outcome = engine
        .append(
            caller,
            pod,
            stream_arg(stream),
            AppendRequest {
                records,
                precondition,
                idempotency_key,
                access,
            },
        )
        .await
        .gql()?;
    let replayed = outcome.replayed;
    Ok(outcome
        .receipts
        .into_iter()
        .map(|receipt| ReceiptObj { receipt, replayed })
        .collect())
}
