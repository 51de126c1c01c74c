//! Work in progress that a graceful shutdown waits for: HTTP handlers still running (the REST
//! layer counts them) and open live connections (WebSocket and GraphQL sockets, which the
//! HTTP server's own drain does not track once upgraded).
//!
//! A [`Running`] guard counts one piece of work until it is dropped, also when the work is
//! cancelled (a client that went away); [`InFlight::until_idle`] resolves once none is left.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// A count of work in progress.
#[derive(Debug, Default)]
pub struct InFlight {
    running: AtomicUsize,
    idle: Notify,
}

/// Counts one piece of work until dropped.
#[derive(Debug)]
pub struct Running(Arc<InFlight>);

impl InFlight {
    pub fn start(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(self.clone())
    }

    /// Work in progress now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Resolves once nothing is in progress.
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

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
