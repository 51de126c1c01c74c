//! Logging setup: `WEBPODS_LOG` filter, text or JSON lines on stderr (stdout carries tokens
//! and the bound address for scripts).
//!
//! **No secret reaches the log**, whatever the filter: our own lines never carry a token (see
//! `api-rest`'s request log), and the WebSocket crates' trace lines, which print every frame
//! received (an `auth` message or a GraphQL `connection_init` carries a token), are dropped
//! here. Colours only when stderr is a terminal.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// Targets whose trace lines hold message payloads.
const PAYLOAD_TARGETS: [&str; 2] = ["tungstenite", "tokio_tungstenite"];

pub fn init(filter: &str, format: LogFormat) {
    // The configuration has checked the filter already.
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let no_payloads = filter_fn(|meta| {
        let root = meta.target().split("::").next().unwrap_or_default();
        !(*meta.level() == Level::TRACE && PAYLOAD_TARGETS.contains(&root))
    });
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(layer.json().with_filter(no_payloads))
            .try_init(),
        LogFormat::Text => registry.with(layer.with_filter(no_payloads)).try_init(),
    };
}
