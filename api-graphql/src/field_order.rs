//! Response fields in the order the query selected them (GraphQL spec §7.2.2, "Serialized Map
//! Ordering": `{ name age }` answers `{"name": …, "age": …}`).
//!
//! async-graphql resolves a query's fields concurrently and writes each into the result as it
//! completes (async-graphql/async-graphql#612), so a field that waits on storage lands after
//! the ones that did not. [`FieldOrder`] is a schema extension that puts every object of the
//! response back in selection order: it keeps the parsed document of the request and, once the
//! data is complete (each response of a query or mutation, each event of a subscription),
//! reorders each object by the response keys (aliases included) of the selection sets that
//! produced it, fragments followed. A key it does not find stays, after the selected ones.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextPrepareRequest,
    NextSubscribe,
};
use async_graphql::indexmap::IndexMap;
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, Selection, SelectionSet,
};
use async_graphql::{Name, Request, Response, ServerResult, Value, Variables};
use futures::StreamExt;
use futures::stream::BoxStream;

/// Installs [`FieldOrder`] on a schema (`.extension(FieldOrder)`).
pub(crate) struct FieldOrder;

impl ExtensionFactory for FieldOrder {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(Reorder::default())
    }
}

/// One request's document and chosen operation.
#[derive(Default)]
struct Reorder(Arc<Mutex<Parsed>>);

#[derive(Default)]
struct Parsed {
    operation_name: Option<String>,
    document: Option<ExecutableDocument>,
}

impl Parsed {
    fn reorder(&self, data: &mut Value) {
        let Some(doc) = &self.document else { return };
        let operation = match (&doc.operations, self.operation_name.as_deref()) {
            (DocumentOperations::Single(op), _) => op,
            (DocumentOperations::Multiple(ops), Some(name)) => match ops.get(name) {
                Some(op) => op,
                None => return,
            },
            // Several operations and no name: async-graphql refused the request already.
            (DocumentOperations::Multiple(_), None) => return,
        };
        order(data, &[&operation.node.selection_set.node], doc);
    }
}

fn lock(parsed: &Mutex<Parsed>) -> std::sync::MutexGuard<'_, Parsed> {
    // Each update is one assignment: a poisoned state is still valid.
    parsed.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_graphql::async_trait::async_trait]
impl Extension for Reorder {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        lock(&self.0).operation_name = request.operation_name.clone();
        next.run(ctx, request).await
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        lock(&self.0).document = Some(document.clone());
        Ok(document)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let mut response = next.run(ctx, operation_name).await;
        lock(&self.0).reorder(&mut response.data);
        response
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let parsed = self.0.clone();
        next.run(ctx, stream)
            .map(move |mut response| {
                lock(&parsed).reorder(&mut response.data);
                response
            })
            .boxed()
    }
}

/// Puts `value`'s objects in the order of `sets`, the selection sets that produced it.
fn order(value: &mut Value, sets: &[&SelectionSet], doc: &ExecutableDocument) {
    match value {
        Value::Object(map) => {
            let mut keys: IndexMap<&Name, Vec<&SelectionSet>> = IndexMap::new();
            let mut seen = HashSet::new();
            for set in sets {
                collect(set, doc, &mut keys, &mut seen);
            }
            let mut rest = std::mem::take(map);
            let mut ordered = IndexMap::with_capacity(rest.len());
            for (key, subs) in keys {
                if let Some((name, mut v)) = rest.swap_remove_entry(key) {
                    order(&mut v, &subs, doc);
                    ordered.insert(name, v);
                }
            }
            ordered.extend(rest);
            *map = ordered;
        }
        Value::List(items) => {
            for item in items {
                order(item, sets, doc);
            }
        }
        _ => {}
    }
}

/// The response keys of `set` in order, each with the selection sets of its sub-fields (one per
/// occurrence: fields of the same key merge). Fragments count where they are spread, once.
fn collect<'d>(
    set: &'d SelectionSet,
    doc: &'d ExecutableDocument,
    keys: &mut IndexMap<&'d Name, Vec<&'d SelectionSet>>,
    seen: &mut HashSet<&'d Name>,
) {
    for item in &set.items {
        match &item.node {
            Selection::Field(f) => keys
                .entry(&f.node.response_key().node)
                .or_default()
                .push(&f.node.selection_set.node),
            Selection::InlineFragment(i) => collect(&i.node.selection_set.node, doc, keys, seen),
            Selection::FragmentSpread(s) => {
                let name = &s.node.fragment_name.node;
                if seen.insert(name)
                    && let Some(fragment) = doc.fragments.get(name)
                {
                    collect(&fragment.node.selection_set.node, doc, keys, seen);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reordered(query: &str, operation: Option<&str>, data: serde_json::Value) -> String {
        let parsed = Parsed {
            operation_name: operation.map(str::to_string),
            document: Some(async_graphql::parser::parse_query(query).unwrap()),
        };
        let mut value = Value::from_json(data).unwrap();
        parsed.reorder(&mut value);
        value.into_json().unwrap().to_string()
    }

    #[test]
    fn objects_follow_the_selection() {
        let data = serde_json::json!({
            "b": 1,
            "list": [{"y": 1, "x": 2}, {"y": 3, "x": 4}],
            "a": {"q": true, "p": false},
            "extra": 0
        });
        assert_eq!(
            reordered("{ a { p q } list { x y } b }", None, data),
            r#"{"a":{"p":false,"q":true},"list":[{"x":2,"y":1},{"x":4,"y":3}],"b":1,"extra":0}"#
        );
    }

    #[test]
    fn aliases_fragments_and_named_operations() {
        let query = "query Other { z } \
                     query Q { second: n ...F ... on Query { first: m { y } } first: m { x } } \
                     fragment F on Query { k }";
        let data = serde_json::json!({"k": 0, "first": {"x": 1, "y": 2}, "second": 3});
        assert_eq!(
            reordered(query, Some("Q"), data),
            r#"{"second":3,"k":0,"first":{"y":2,"x":1}}"#
        );
    }
}
