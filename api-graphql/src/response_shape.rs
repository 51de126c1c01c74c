//! Responses shaped as the GraphQL spec says, where async-graphql 7 does not:
//!
//! - **Field order** (§7.2.2, "Serialized Map Ordering"): `{ name age }` answers
//!   `{"name": …, "age": …}`. async-graphql resolves a query's fields concurrently and writes
//!   each into the result as it completes (async-graphql/async-graphql#612), so a field that
//!   waits on storage landed after the ones that did not.
//! - **Field errors** (§6.4.4, "Handling Field Errors"): a field that raised an error is
//!   `null` in place (async-graphql left its key out, and an object whose every field failed
//!   became `null` even where its type is non-null); an error in a non-null field makes the
//!   nearest nullable parent `null`, up to `data` itself.
//!
//! [`ResponseShape`] is a schema extension that keeps the request's parsed document and
//! variables and, once the data is complete (each response of a query or mutation, each
//! event of a subscription), rebuilds every object from the selection sets that produced it
//! (aliases, fragments, merged fields, `@skip` / `@include`) and the schema's field types. A
//! key it does not find in the selection (none should exist) stays, after the selected ones.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextPrepareRequest,
    NextSubscribe,
};
use async_graphql::indexmap::IndexMap;
use async_graphql::parser::types::{
    Directive, DocumentOperations, ExecutableDocument, OperationDefinition, OperationType,
    Selection, SelectionSet,
};
use async_graphql::registry::{MetaTypeName, Registry};
use async_graphql::{
    Name, PathSegment, Positioned, Request, Response, ServerError, ServerResult, Value, Variables,
};
use futures::StreamExt;
use futures::stream::BoxStream;

/// Installs the extension on a schema (`.extension(ResponseShape)`).
pub(crate) struct ResponseShape;

impl ExtensionFactory for ResponseShape {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(Reshape::default())
    }
}

/// One request's document, operation name and variables.
#[derive(Default)]
struct Reshape(Arc<Mutex<Parsed>>);

#[derive(Default)]
struct Parsed {
    operation_name: Option<String>,
    variables: Variables,
    document: Option<ExecutableDocument>,
}

impl Parsed {
    fn reshape(&self, registry: &Registry, response: &mut Response) {
        let Some(doc) = &self.document else { return };
        let operation = match (&doc.operations, self.operation_name.as_deref()) {
            (DocumentOperations::Single(op), _) => &op.node,
            (DocumentOperations::Multiple(ops), Some(name)) => match ops.get(name) {
                Some(op) => &op.node,
                None => return,
            },
            // Several operations and no name: async-graphql refused the request already.
            (DocumentOperations::Multiple(_), None) => return,
        };
        let root = match operation.ty {
            OperationType::Query => registry.query_type.as_str(),
            OperationType::Mutation => match &registry.mutation_type {
                Some(t) => t.as_str(),
                None => return,
            },
            OperationType::Subscription => match &registry.subscription_type {
                Some(t) => t.as_str(),
                None => return,
            },
        };
        let shaper = Shaper {
            registry,
            doc,
            operation,
            variables: &self.variables,
            errors: &response.errors,
        };
        let data = std::mem::take(&mut response.data);
        if data == Value::Null && response.errors.is_empty() {
            return; // nothing was resolved (a refused request)
        }
        // `data` is the root object: non-null, but an error in a non-null root field makes it
        // `null` (§6.4.4).
        let sets = [&operation.selection_set.node];
        response.data = shaper
            .object(Some(data), root, &sets, &mut Vec::new())
            .unwrap_or(Value::Null);
    }
}

fn lock(parsed: &Mutex<Parsed>) -> std::sync::MutexGuard<'_, Parsed> {
    // Each update is one assignment: a poisoned state is still valid.
    parsed.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_graphql::async_trait::async_trait]
impl Extension for Reshape {
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
        let mut parsed = lock(&self.0);
        // Variables matter only to `@skip` / `@include`; a batch append's may be megabytes.
        if query.contains("@skip") || query.contains("@include") {
            parsed.variables = variables.clone();
        }
        parsed.document = Some(document.clone());
        Ok(document)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let mut response = next.run(ctx, operation_name).await;
        lock(&self.0).reshape(&ctx.schema_env.registry, &mut response);
        response
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let parsed = self.0.clone();
        let schema_env = ctx.schema_env.clone();
        next.run(ctx, stream)
            .map(move |mut response| {
                lock(&parsed).reshape(&schema_env.registry, &mut response);
                response
            })
            .boxed()
    }
}

/// A `null` that a non-null type cannot hold: the nearest nullable parent becomes `null`.
struct Propagate;

struct Shaper<'a> {
    registry: &'a Registry,
    doc: &'a ExecutableDocument,
    operation: &'a OperationDefinition,
    variables: &'a Variables,
    errors: &'a [ServerError],
}

impl<'a> Shaper<'a> {
    /// The value of a field of type `ty` at `path` (`None`: its key is missing, that is, the
    /// field raised an error).
    fn value(
        &self,
        value: Option<Value>,
        ty: &str,
        sets: &[&'a SelectionSet],
        path: &mut Vec<PathSegment>,
    ) -> Result<Value, Propagate> {
        match MetaTypeName::create(ty) {
            MetaTypeName::NonNull(inner) => match self.value(value, inner, sets, path)? {
                Value::Null => Err(Propagate),
                v => Ok(v),
            },
            MetaTypeName::List(inner) => match value {
                Some(Value::List(items)) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.into_iter().enumerate() {
                        path.push(PathSegment::Index(i));
                        let v = self.value(Some(item), inner, sets, path);
                        path.pop();
                        match v {
                            Ok(v) => out.push(v),
                            // The list is nullable here (a non-null list is handled above).
                            Err(Propagate) => return Ok(Value::Null),
                        }
                    }
                    Ok(Value::List(out))
                }
                other => Ok(other.unwrap_or(Value::Null)),
            },
            MetaTypeName::Named(name) if self.is_object(name) => {
                Ok(self.object(value, name, sets, path).unwrap_or(Value::Null))
            }
            MetaTypeName::Named(_) => Ok(value.unwrap_or(Value::Null)),
        }
    }

    fn is_object(&self, type_name: &str) -> bool {
        self.registry
            .types
            .get(type_name)
            .is_some_and(|t| t.fields().is_some())
    }

    /// An object of type `type_name`, its fields in selection order; `Err` when it must be
    /// `null` (a non-null field of it failed).
    fn object(
        &self,
        value: Option<Value>,
        type_name: &str,
        sets: &[&'a SelectionSet],
        path: &mut Vec<PathSegment>,
    ) -> Result<Value, Propagate> {
        let mut fields = match value {
            Some(Value::Object(map)) => map,
            // Every selected field failed (async-graphql then gives `null`), or the field
            // itself failed: rebuilt from the errors below it.
            Some(Value::Null) | None if self.errors_below(path) => IndexMap::new(),
            other => return Ok(other.unwrap_or(Value::Null)),
        };
        let mut keys: IndexMap<&'a Name, (&'a Name, Vec<&'a SelectionSet>)> = IndexMap::new();
        let mut seen = HashSet::new();
        for set in sets {
            self.collect(set, type_name, &mut keys, &mut seen);
        }
        let meta = self.registry.types.get(type_name);
        let mut out = IndexMap::with_capacity(fields.len());
        for (key, (field_name, subs)) in keys {
            let found = fields.swap_remove_entry(key);
            let ty = meta.and_then(|t| t.field_by_name(field_name));
            let (name, v) = match (found, ty) {
                // Introspection (`__typename`, `__schema`…): kept as resolved.
                (Some((name, v)), None) => (name, v),
                (None, None) => continue,
                (found, Some(field)) => {
                    let (name, v) = match found {
                        Some((name, v)) => (name, Some(v)),
                        None => (key.clone(), None),
                    };
                    path.push(PathSegment::Field(name.to_string()));
                    let v = self.value(v, &field.ty, &subs, path);
                    path.pop();
                    (name, v?)
                }
            };
            out.insert(name, v);
        }
        out.extend(fields);
        Ok(Value::Object(out))
    }

    /// Whether an error was raised below `path` (not at it).
    fn errors_below(&self, path: &[PathSegment]) -> bool {
        self.errors
            .iter()
            .any(|e| e.path.len() > path.len() && e.path.starts_with(path))
    }

    /// The response keys of `set` on an object of type `type_name`, in order, each with its
    /// field name and the selection sets of its sub-fields (one per occurrence: fields of the
    /// same key merge). Fragments count where they are spread, once; `@skip` / `@include`
    /// apply.
    fn collect(
        &self,
        set: &'a SelectionSet,
        type_name: &str,
        keys: &mut IndexMap<&'a Name, (&'a Name, Vec<&'a SelectionSet>)>,
        seen: &mut HashSet<&'a Name>,
    ) {
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => {
                    if self.included(&f.node.directives) {
                        keys.entry(&f.node.response_key().node)
                            .or_insert_with(|| (&f.node.name.node, Vec::new()))
                            .1
                            .push(&f.node.selection_set.node);
                    }
                }
                Selection::InlineFragment(i) => {
                    let applies = i
                        .node
                        .type_condition
                        .as_ref()
                        .is_none_or(|c| c.node.on.node.as_str() == type_name);
                    if applies && self.included(&i.node.directives) {
                        self.collect(&i.node.selection_set.node, type_name, keys, seen);
                    }
                }
                Selection::FragmentSpread(s) => {
                    let name = &s.node.fragment_name.node;
                    if self.included(&s.node.directives)
                        && let Some(fragment) = self.doc.fragments.get(name)
                        && fragment.node.type_condition.node.on.node.as_str() == type_name
                        && seen.insert(name)
                    {
                        self.collect(&fragment.node.selection_set.node, type_name, keys, seen);
                    }
                }
            }
        }
    }

    /// Whether `@skip` / `@include` keep a selection.
    fn included(&self, directives: &[Positioned<Directive>]) -> bool {
        directives.iter().all(|d| {
            let flag = d.node.get_argument("if").and_then(|v| {
                match v
                    .node
                    .clone()
                    .into_const_with(|name| self.variable(&name).ok_or(()))
                {
                    Ok(Value::Boolean(b)) => Some(b),
                    _ => None,
                }
            });
            !matches!(
                (d.node.name.node.as_str(), flag),
                ("skip", Some(true)) | ("include", Some(false))
            )
        })
    }

    /// A variable's value as sent, else its default.
    fn variable(&self, name: &Name) -> Option<Value> {
        self.variables.get(name).cloned().or_else(|| {
            self.operation
                .variable_definitions
                .iter()
                .find(|d| d.node.name.node == *name)
                .and_then(|d| d.node.default_value.as_ref())
                .map(|d| d.node.clone())
        })
    }
}
