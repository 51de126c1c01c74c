//! The `Subscription` root: `records(pod, stream, after, afterHash)` (SPEC §6.1, §7).

use async_graphql::{Context, Result, Subscription};
use futures::{Stream, StreamExt};

use crate::GraphqlSettings;
use crate::error::{FORK_DETECTED, OrGql, TOO_MANY_SUBSCRIPTIONS, coded, gql, invalid};
use crate::loaders::SubscriptionSlot;
use crate::tail;
use crate::types::{RecordObj, charge, parts};
use webpods_engine::Action;

pub struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Every record of the stream with index > `after` (all, without `after`; a negative
    /// `after` = the last `-after` records), then each new record as soon as it is committed: strictly increasing indices, no gaps, no duplicates.
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
            return Err(coded(
                TOO_MANY_SUBSCRIPTIONS,
                format!("at most {max} subscriptions per connection"),
            ));
        };
        let path = stream.trim_matches('/').to_string();
        let info = engine.open_stream(&rc.caller, &pod, &path).await.gql()?;
        if let Some(hash) = &after_hash {
            let Some(k) = after.filter(|k| *k >= 0) else {
                return Err(invalid("afterHash needs after (a record index)"));
            };
            let at = engine.read_range(&info, k, k + 1).await.gql()?;
            let matches = at.records.first().is_some_and(|r| r.row.hash == *hash);
            if !matches {
                return Err(coded(
                    FORK_DETECTED,
                    format!("the record at index {k} does not have hash {hash}"),
                ));
            }
        }
        let next = match after {
            None => 0,
            Some(a) if a >= 0 => a.saturating_add(1),
            // The last -a records, like REST's after=-N.
            Some(a) => {
                let total = engine.read_range(&info, 0, 0).await.gql()?.total;
                total.saturating_add(a).max(0)
            }
        };
        Ok(
            tail::follow(engine.clone(), rc.caller.clone(), pod, info, next).map(move |item| {
                let _held = &slot; // the slot lives as long as the stream
                item.map(RecordObj::new).map_err(gql)
            }),
        )
    }
}
