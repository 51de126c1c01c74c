//! Pod configuration written through its own endpoints (SPEC §4.5): routing links applied to
//! GETs, and custom domains that serve the pod. Both are kept as records of `.config` streams
//! (so they are chained like everything else) and cached, invalidated by their writes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use webpods_storage::DomainsOutcome;

use crate::error::{Error, ErrorKind, Result};
use crate::invalidation::Change;
use crate::metrics::CacheKind;
use crate::model::Caller;
use crate::names::check_stream_path;
use crate::{Engine, require_owner};

const ROUTING_STREAM: &str = ".config/routing";
const ROUTING_RECORD: &str = "routes";
const DOMAINS_STREAM: &str = ".config/domains";
const DOMAINS_RECORD: &str = "domains";
/// At most this many custom domains per pod.
const MAX_DOMAINS: usize = 32;
/// Routes per pod: the map is one record, loaded into every instance's cache.
const MAX_ROUTES: usize = 1000;
/// First path segments a route may not take: system streams, and what a pod host keeps for
/// the main domain or serves itself (SPEC §2: `/login`, `/auth/callback`).
const RESERVED_ROUTE_SEGMENTS: [&str; 6] = [".config", "auth", "api", "graphql", "ws", "login"];

/// A pod's routing map: request path → target (`stream/name`, `stream`, or `stream?query`).
pub type Routes = BTreeMap<String, String>;

impl Engine {
    /// Replaces the pod's routing map (owner only).
    pub async fn set_routing(&self, caller: &Caller, pod: &str, routes: Routes) -> Result<()> {
        let pod = self.owner_checked_pod(pod).await?;
        let user = require_owner(&pod, caller)?;
        if routes.len() > MAX_ROUTES {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("at most {MAX_ROUTES} routes per pod"),
            ));
        }
        for (from, to) in &routes {
            if !from.starts_with('/') {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("route {from:?} must start with '/'"),
                ));
            }
            if from.contains(['?', '#']) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("route {from:?} must be a path: requests are matched by path only"),
                ));
            }
            // Requests are matched without a trailing slash: such a key could never match.
            if from.len() > 1 && from.ends_with('/') {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("route {from:?} must not end with '/' (requests match without it)"),
                ));
            }
            let first = from[1..].split('/').next().unwrap_or("");
            if RESERVED_ROUTE_SEGMENTS.contains(&first) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("route {from:?} names a path the server keeps for itself"),
                ));
            }
            let target = to.split('?').next().unwrap_or("").trim_matches('/');
            if check_stream_path(target).is_err() || to.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("route target {to:?} must be stream/name, stream or stream?query"),
                ));
            }
            if let Some((_, query)) = to.split_once('?')
                && let Err(problem) = check_target_query(query)
            {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("route target {to:?}: {problem}"),
                ));
            }
        }
        let content = serde_json::to_value(&routes)
            .map_err(|e| Error::Internal(format!("encoding routes: {e}")))?;
        self.append_system(
            &pod,
            ROUTING_STREAM,
            ROUTING_RECORD,
            &content,
            &user.user_id,
        )
        .await?;
        // Every instance: a route written here is served everywhere on the next request.
        self.changed(Change::Routes(pod.name.clone())).await;
        Ok(())
    }

    /// The target a GET of `path` (with leading slash) is routed to, if any.
    pub async fn route(&self, pod: &str, path: &str) -> Result<Option<String>> {
        let cached = self.inner.routes.get(pod).await;
        self.metrics()
            .observe_cache(CacheKind::Routes, cached.is_some());
        let routes = match cached {
            Some(r) => r,
            None => {
                let pod_row = self.pod(pod).await?;
                let routes = match self.stream(&pod_row, ROUTING_STREAM).await? {
                    None => Routes::new(),
                    Some(s) => self
                        .inner
                        .store
                        .latest_by_name(s.id, ROUTING_RECORD)
                        .await?
                        .and_then(|r| serde_json::from_slice(&r.content).ok())
                        .unwrap_or_default(),
                };
                let routes = Arc::new(routes);
                self.inner
                    .routes
                    .insert(pod.to_string(), routes.clone())
                    .await;
                routes
            }
        };
        Ok(routes.get(path).cloned())
    }

    /// Replaces the pod's custom domains (owner only); a domain serves at most one pod.
    pub async fn set_domains(
        &self,
        caller: &Caller,
        pod: &str,
        domains: Vec<String>,
    ) -> Result<()> {
        let pod = self.owner_checked_pod(pod).await?;
        let user = require_owner(&pod, caller)?;
        let mut domains: Vec<String> = domains
            .iter()
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        domains.sort();
        domains.dedup();
        if domains.len() > MAX_DOMAINS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("at most {MAX_DOMAINS} domains per pod"),
            ));
        }
        if let Some(bad) = domains.iter().find(|d| !is_valid_domain(d)) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{bad:?} is not a domain name"),
            ));
        }
        // The main domain and every name under it are the service's own: a pod claiming
        // `www.alice.{main}` would serve on another pod's sub-host and pass as a login
        // redirect target. Checked here, so that REST and GraphQL refuse it alike.
        let main = self.main_host();
        if let Some(bad) = domains
            .iter()
            .find(|d| **d == main || d.ends_with(&format!(".{main}")))
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{bad:?} belongs to this service's own domain"),
            ));
        }
        if let DomainsOutcome::Taken(d) = self.inner.store.set_domains(pod.id, &domains).await? {
            return Err(Error::new(
                ErrorKind::DomainTaken,
                format!("{d} already serves another pod"),
            ));
        }
        self.changed(Change::Domains).await;
        self.append_system(
            &pod,
            DOMAINS_STREAM,
            DOMAINS_RECORD,
            &json!({ "domains": domains }),
            &user.user_id,
        )
        .await?;
        Ok(())
    }

    /// The pod a custom domain serves.
    pub async fn pod_for_domain(&self, host: &str) -> Result<Option<String>> {
        let cached = self.inner.domains.get(host).await;
        self.metrics()
            .observe_cache(CacheKind::Domains, cached.is_some());
        if let Some(hit) = cached {
            return Ok(hit);
        }
        let pod = self.inner.store.pod_for_domain(host).await?.map(|p| p.name);
        self.inner
            .domains
            .insert(host.to_string(), pod.clone())
            .await;
        Ok(pod)
    }
}

/// The query of a route target holds only read parameters, each well formed: a route is read
/// by everyone, so a mistake found at write time is told to the owner instead of to readers.
fn check_target_query(query: &str) -> std::result::Result<(), String> {
    let index = |v: &str| v.trim().parse::<i64>().is_ok();
    let positive = |v: &str| v.trim().parse::<i64>().is_ok_and(|n| n > 0);
    let flag = |v: &str| matches!(v, "" | "true" | "false" | "1" | "0");
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let ok = match k.as_ref() {
            "i" => match v.split_once(':') {
                Some((a, b)) => index(a) && index(b),
                None => index(&v),
            },
            "after" | "before" => index(&v),
            "limit" | "maxContentSize" => positive(&v),
            "unique" | "recursive" | "verify" => flag(&v),
            "fields" => v
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .all(|f| crate::model::RECORD_FIELDS.contains(&f)),
            "cursor" => true,
            other => return Err(format!("{other:?} is not a read parameter")),
        };
        if !ok {
            return Err(format!("bad value {v:?} for {k}"));
        }
    }
    Ok(())
}

/// A DNS name: dot-separated labels of `[a-z0-9-]`, not starting or ending with `-`, whose
/// last label is not all digits — so never an IP address, which always names the main domain
/// and could never serve a pod.
fn is_valid_domain(d: &str) -> bool {
    d.len() <= 253
        && d.contains('.')
        && !d
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        && d.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn domains() {
        assert!(super::is_valid_domain("blog.example.com"));
        assert!(!super::is_valid_domain("localhost"));
        assert!(!super::is_valid_domain("-a.com"));
        assert!(!super::is_valid_domain("a..com"));
        assert!(!super::is_valid_domain("127.0.0.1"));
        for ok in [
            "i=0",
            "i=-3:-1",
            "fields=index,content&maxContentSize=4&limit=1",
            "verify=true",
        ] {
            assert_eq!(super::check_target_query(ok), Ok(()), "{ok}");
        }
        for bad in [
            "i=abc",
            "limit=0",
            "fields=bogus",
            "verify=maybe",
            "batch=true",
        ] {
            assert!(super::check_target_query(bad).is_err(), "{bad}");
        }
        assert!(!super::is_valid_domain("10.0.0.300"));
        assert!(super::is_valid_domain("123.example.com"));
    }
}
