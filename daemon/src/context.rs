//! What every connection and handler shares.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

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

/// What a request sends its client before its answer.
#[derive(Debug)]
pub enum Outgoing {
    Event(gpuctl_protocol::Event),
    /// A frame of an output streamed while its job runs.
    Output(gpuctl_protocol::TensorFrame),
}

/// The channel to a connection: what its requests send, tagged with their ids.
pub type Outbox = tokio::sync::mpsc::UnboundedSender<(gpuctl_protocol::RequestId, Outgoing)>;

/// Where a request's events go: its connection, tagged with its id.
#[derive(Clone)]
pub struct EventSink {
    id: gpuctl_protocol::RequestId,
    events: Outbox,
    /// The client takes pixel rows (protocol 1.2): outputs reach it as the
    /// worker streams them.
    pixel_rows: bool,
}

impl EventSink {
    pub fn new(id: gpuctl_protocol::RequestId, events: Outbox, pixel_rows: bool) -> Self {
        EventSink {
            id,
            events,
            pixel_rows,
        }
    }

    /// Sends an event; a client that has gone simply misses it.
    pub fn send(&self, event: gpuctl_protocol::Event) {
        let _ = self.events.send((self.id, Outgoing::Event(event)));
    }

    /// Passes on a frame of a streamed output.
    pub fn output(&self, frame: gpuctl_protocol::TensorFrame) {
        let _ = self.events.send((self.id, Outgoing::Output(frame)));
    }

    /// Whether the client takes pixel rows, and outputs streamed as they
    /// are made (protocol 1.2).
    pub fn takes_pixel_rows(&self) -> bool {
        self.pixel_rows
    }

    /// Whether both belong to the same connection.
    pub fn same_connection(&self, other: &EventSink) -> bool {
        self.events.same_channel(&other.events)
    }

    /// Resolves when the connection has closed.
    pub async fn closed(&self) {
        self.events.closed().await;
    }
}
