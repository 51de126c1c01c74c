//! Requests whose handlers are running, so that a graceful shutdown can tell when every
//! in-flight request has been answered.
//!
//! A handler counts until it returns its response: a WebSocket upgrade or an SSE response
//! counts only until its head is sent, so live tails never hold the count up.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The number of running handlers.
#[derive(Debug, Default)]
pub struct InFlight {
    running: AtomicUsize,
    idle: Notify,
}

/// Counts one handler until dropped (also when the client goes away and the handler is
/// cancelled).
pub(crate) struct Running<'a>(&'a InFlight);

impl InFlight {
    pub(crate) fn start(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(self)
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Resolves once no handler runs.
    pub async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
