//! What one connection shares with its requests and with the registry: the
//! events and streamed output frames a request sends its client before its
//! answer, the bytes its client has not read yet, and the reservations it
//! holds. Kept apart from the daemon-wide [`crate::context`], so that the
//! registry and the workers depend on this and not on the context that
//! holds the registry.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gpuctl_protocol::{RequestId, TensorFrame};

/// What a request sends its client before its answer.
#[derive(Debug)]
pub enum Outgoing {
    Event(gpuctl_protocol::Event),
    /// A frame of an output streamed while its job runs.
    Output(TensorFrame),
    /// Its output did not fit in what the client may leave unread
    /// (`daemon.max_unread`): the request fails, and its frames stop.
    Overflow,
    /// `Cancel`: stop request `target` of the same connection, which owns
    /// its requests; `found` is told whether it was in flight.
    Cancel {
        target: gpuctl_protocol::RequestId,
        found: tokio::sync::oneshot::Sender<bool>,
    },
}

/// What one connection shares with its requests and the registry: the
/// answers its client has not read yet, and the reservations it holds.
#[derive(Debug)]
pub struct Shared {
    unread: AtomicUsize,
    max_unread: usize,
    /// Requests whose output did not fit; their frames are dropped.
    overflowed: Mutex<HashSet<RequestId>>,
    reservations: AtomicU32,
}

impl Shared {
    pub fn new(max_unread: usize) -> Shared {
        Shared {
            unread: AtomicUsize::new(0),
            max_unread,
            overflowed: Mutex::default(),
            reservations: AtomicU32::new(0),
        }
    }

    /// Counts `bytes` more waiting for the client, if they fit.
    pub fn queue(&self, bytes: usize) -> bool {
        self.unread
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |unread| {
                unread
                    .checked_add(bytes)
                    .filter(|total| *total <= self.max_unread)
            })
            .is_ok()
    }

    /// `bytes` have been written to the client.
    pub fn written(&self, bytes: usize) {
        let _ = self
            .unread
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |unread| {
                Some(unread.saturating_sub(bytes))
            });
    }

    /// Bytes waiting for the client now.
    pub fn unread(&self) -> usize {
        self.unread.load(Ordering::Acquire)
    }

    pub fn max_unread(&self) -> usize {
        self.max_unread
    }

    fn overflowed(&self) -> std::sync::MutexGuard<'_, HashSet<RequestId>> {
        self.overflowed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether request `id`'s output did not fit; forgets it.
    pub fn take_overflowed(&self, id: RequestId) -> bool {
        self.overflowed().remove(&id)
    }

    /// Reservations granted on this connection and alive.
    pub fn reservations(&self) -> u32 {
        self.reservations.load(Ordering::Acquire)
    }
}

/// The channel to a connection: what its requests send, tagged with their ids.
pub type Outbox = tokio::sync::mpsc::UnboundedSender<(gpuctl_protocol::RequestId, Outgoing)>;

/// Where a request's events go: its connection, tagged with its id.
#[derive(Clone)]
pub struct EventSink {
    id: gpuctl_protocol::RequestId,
    events: Outbox,
    /// The protocol the client speaks: it decides what it may send and
    /// how outputs reach it.
    peer: gpuctl_protocol::ProtocolVersion,
    shared: Arc<Shared>,
    /// Outputs stay in the daemon (a step of a chain whose image feeds the
    /// next): they are not passed on to the client as they come.
    keeps_outputs: bool,
}

impl EventSink {
    pub fn new(
        id: gpuctl_protocol::RequestId,
        events: Outbox,
        peer: gpuctl_protocol::ProtocolVersion,
        shared: Arc<Shared>,
    ) -> Self {
        EventSink {
            id,
            events,
            peer,
            shared,
            keeps_outputs: false,
        }
    }

    /// The same sink for a job whose outputs the daemon keeps: its progress
    /// still reaches the client, its pixel rows do not.
    pub fn keeping_outputs(&self) -> EventSink {
        EventSink {
            keeps_outputs: true,
            ..self.clone()
        }
    }

    /// Whether a job's outputs go to the client as they are made.
    pub fn relays_outputs(&self) -> bool {
        self.takes_pixel_rows() && !self.keeps_outputs
    }

    /// The protocol version the client speaks.
    pub fn peer(&self) -> gpuctl_protocol::ProtocolVersion {
        self.peer
    }

    /// Sends an event; a client that has gone simply misses it.
    pub fn send(&self, event: gpuctl_protocol::Event) {
        let _ = self.events.send((self.id, Outgoing::Event(event)));
    }

    /// Stops request `target` of this connection; whether it was in flight.
    pub async fn cancel(&self, target: gpuctl_protocol::RequestId) -> bool {
        let (found, answer) = tokio::sync::oneshot::channel();
        if self
            .events
            .send((self.id, Outgoing::Cancel { target, found }))
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Passes on a frame of a streamed output, if the client's unread
    /// answers leave room for it; otherwise the request fails (once) and
    /// the rest of its frames are dropped.
    pub fn output(&self, frame: TensorFrame) {
        let mut overflowed = self.shared.overflowed();
        if overflowed.contains(&self.id) {
            return;
        }
        if let TensorFrame::Chunk(data) = &frame {
            if !self.shared.queue(data.len()) {
                overflowed.insert(self.id);
                let _ = self.events.send((self.id, Outgoing::Overflow));
                return;
            }
        }
        let _ = self.events.send((self.id, Outgoing::Output(frame)));
    }

    /// A reservation made on this connection was granted.
    pub fn hold_reservation(&self) {
        self.shared.reservations.fetch_add(1, Ordering::AcqRel);
    }

    /// A granted reservation of this connection ended.
    pub fn drop_reservation(&self) {
        let _ = self
            .shared
            .reservations
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Whether the client takes pixel rows, and outputs streamed as they
    /// are made (protocol 1.2).
    pub fn takes_pixel_rows(&self) -> bool {
        self.peer.takes_pixel_rows()
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
