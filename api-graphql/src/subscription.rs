//! The `Subscription` root: `records(pod, stream, after, afterHash)` (SPEC §6.1, §7).

use async_graphql::{Context, Result, Subscription};
use futures::{Stream, StreamExt};
use webpods_engine::{Action, LiveRequest};

use crate::GraphqlSettings;
use crate::error::{OrGql, gql, invalid};
use crate::loaders::SubscriptionSlot;
use crate::tail;
use crate::types::{RecordObj, charge, parts, stream_arg};

pub struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Every record of the stream with index > `after` (all, without `after`; a negative
    /// `after` = the last `-after` records), then each new record as soon as it is committed:
    /// strictly increasing indices, no gaps, no duplicates.
    /// With `afterHash`, the record at `after` must have that hash, else `FORK_DETECTED`.
    /// Read permission is checked at subscribe time and again while following; a revoked
    /// reader gets `FORBIDDEN` and the subscription ends.
    async fn records(
        &self,
        ctx: &Context<'_>,
        pod: String,
        stream: String,
        after: Option<i64>,
        after_hash: Option<String>,
    ) -> Result<impl Stream<Item = Result<RecordObj>> + use<>> {
        charge(ctx, Action::Read).await?;
        let (engine, rc) = parts(ctx)?;
        let max = ctx.data::<GraphqlSettings>()?.max_subscriptions;
        let Some(slot) = SubscriptionSlot::take(&rc.subscriptions, max) else {
            return Err(invalid(format!(
                "at most {max} subscriptions per connection"
            )));
        };
        let req = LiveRequest {
            after,
            after_hash,
            token_expires_at: rc.token_expires_at,
        };
        let sub = engine
            .subscribe(&rc.caller, &pod, stream_arg(&stream), req)
            .await
            .gql()?;
        Ok(tail::follow(sub).map(move |item| {
            let _held = &slot; // the slot lives as long as the stream
            item.map(RecordObj::new).map_err(gql)
        }))
    }
}
