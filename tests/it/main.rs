//! End-to-end tests: the real server on 127.0.0.1:0, real HTTP, on SQLite and PostgreSQL.
//! PostgreSQL comes from `WEBPODS_TEST_DATABASE_URL` (`scripts/test` starts a throwaway one).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod auth;
mod bad_input;
mod concurrency;
mod follow;
mod graphql;
mod live;
mod multi_instance;
mod oauth_provider;
mod openapi;
mod ops;
mod pod_config;
mod read_cache;
mod records;
mod rest;
mod restart;
