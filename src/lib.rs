//! The `webpods` server: configuration at the edge, then storage → engine → frontends → listener.
//! `main.rs` only parses the command line; tests build the same [`startup::Server`].

pub mod config;
pub mod startup;
pub mod telemetry;
