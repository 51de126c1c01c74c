//! The GraphQL frontend (SPEC §7): an async-graphql schema over [`webpods_engine::Engine`],
//! served on the main domain at `POST /graphql`, `GET /graphql` (GraphiQL) and
//! `/graphql/ws` (`graphql-transport-ws` subscriptions).
//!
//! It owns the GraphQL surface only: the schema and its resolvers, Relay pagination of
//! records, batch loading of nested heads and users (`loaders`, so nested lists cost a
//! constant number of statements), query depth and complexity limits, and mapping engine
//! errors to GraphQL errors with `extensions.code` (`error`). Tokens are read exactly as REST
//! reads them and every rule — permissions, names, the chain — is the engine's; this crate
//! never sees storage. The exported SDL is committed as `schema.graphql` and a test fails when
//! it drifts from the code.

mod error;
mod http;
mod loaders;
mod query;
mod response_shape;
mod subscription;
mod tail;
mod types;

use async_graphql::Schema;
use axum::Router;
use webpods_engine::Engine;

pub use query::{MutationRoot, QueryRoot};
pub use subscription::SubscriptionRoot;

/// The WebPods schema.
pub type WebPodsSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// List fields over streams or pods count this many times their selection towards the
/// complexity of a query (their length is not known before they run).
pub(crate) const STREAMS_FACTOR: usize = 10;
/// With neither `first` nor `last`, a page holds this many records.
pub(crate) const DEFAULT_PAGE: i32 = 100;

/// The complexity weight of a page of records (`first`/`last`, capped at 1000).
pub(crate) fn page_complexity(first: Option<i32>, last: Option<i32>) -> usize {
    let n = match (first, last) {
        (None, None) => DEFAULT_PAGE,
        (f, l) => f.unwrap_or(0).max(l.unwrap_or(0)),
    };
    usize::try_from(n.clamp(0, 1000)).unwrap_or(0).max(1)
}

/// Settings of the GraphQL frontend.
#[derive(Debug, Clone)]
pub struct GraphqlConfig {
    /// Deepest selection nesting accepted (introspection needs about 13).
    pub max_depth: usize,
    /// Largest complexity accepted: fields counted once each, record pages multiplied by
    /// their size, stream and pod lists by 10, `verify` 50.
    pub max_complexity: usize,
    /// Largest request body, bytes (appends carry content, base64 inflates it by 4/3).
    pub max_body_bytes: usize,
    /// Live `records` subscriptions one WebSocket connection may hold (SPEC §6.2's default).
    pub max_subscriptions_per_connection: usize,
    /// How long a WebSocket may stay open without `connection_init` (then 4408).
    pub init_timeout: std::time::Duration,
}

impl GraphqlConfig {
    /// Defaults sized for an engine's `max_record_bytes`.
    pub fn new(max_record_bytes: usize) -> Self {
        GraphqlConfig {
            max_depth: 15,
            max_complexity: 20_000,
            max_body_bytes: max_record_bytes
                .saturating_mul(2)
                .saturating_add(1024 * 1024),
            max_subscriptions_per_connection: 100,
            init_timeout: std::time::Duration::from_secs(5),
        }
    }
}

/// Settings resolvers read from the schema data.
#[derive(Debug, Clone)]
pub(crate) struct GraphqlSettings {
    /// Page-size cap: the engine's `max_list_records`, as in REST.
    pub max_page: i64,
    pub max_subscriptions: usize,
}

/// The schema with its limits; `engine` is available to every resolver.
pub fn schema(engine: Engine, config: &GraphqlConfig) -> WebPodsSchema {
    let settings = GraphqlSettings {
        max_page: engine.config().max_list_records.max(1),
        max_subscriptions: config.max_subscriptions_per_connection,
    };
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(engine)
        .data(settings)
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity)
        .extension(response_shape::ResponseShape)
        .finish()
}

/// The schema in SDL, as committed in `api-graphql/schema.graphql`.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .finish()
        .sdl()
}

/// The routes of the main domain: `/graphql` and `/graphql/ws`.
pub fn router(engine: Engine, config: GraphqlConfig) -> Router {
    http::router(schema(engine.clone(), &config), engine, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_complexity_follows_the_page_size() {
        assert_eq!(page_complexity(None, None), 100);
        assert_eq!(page_complexity(Some(5), None), 5);
        assert_eq!(page_complexity(None, Some(7)), 7);
        assert_eq!(page_complexity(Some(0), None), 1);
        assert_eq!(page_complexity(Some(-3), None), 1);
        assert_eq!(page_complexity(Some(1_000_000), None), 1000);
    }

    #[test]
    fn the_schema_names_its_roots_as_the_spec_does() {
        let sdl = sdl();
        for needle in [
            "type Query {",
            "type Mutation {",
            "type Subscription {",
            "type RecordConnection {",
            "type PageInfo {",
            "records(pod: String!, stream: String!, after: Int, afterHash: String): Record!",
        ] {
            assert!(sdl.contains(needle), "missing {needle:?}");
        }
    }
}
