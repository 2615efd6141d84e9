//! What every connection and handler shares, daemon-wide. What one
//! connection shares with its requests is in [`crate::outbox`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::budget::Budget;
use crate::registry::RegistryHandle;

/// Shared, read-mostly facts about the running daemon.
pub struct Context {
    /// The state owner.
    pub registry: RegistryHandle,
    /// When the daemon started.
    pub started: Instant,
    /// The socket path, for `Status`.
    pub socket: String,
    /// Open client connections.
    pub connections: ConnectionCount,
    /// Cancelled when the daemon stops: requests that never end on their
    /// own (watch) end then.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Tensor bytes held for clients, daemon-wide (`daemon.max_upload_total`).
    pub budget: Budget,
}

/// Counts open connections; each holds a [`Counted`] guard.
#[derive(Clone, Default)]
pub struct ConnectionCount(Arc<AtomicU32>);

/// Decrements the count when the connection ends.
pub struct Counted(Arc<AtomicU32>);

impl ConnectionCount {
    /// Counts one more connection until the guard drops.
    pub fn open(&self) -> Counted {
        self.0.fetch_add(1, Ordering::Relaxed);
        Counted(self.0.clone())
    }

    /// Connections open now.
    pub fn current(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
