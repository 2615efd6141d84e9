//! `Cancel`: stops another request of the same connection. The connection
//! owns its requests, so the stop is carried out by it.

use gpuctl_protocol::{CancelRequest, CancelResponse};

use crate::outbox::EventSink;

pub async fn handle(request: CancelRequest, events: EventSink) -> CancelResponse {
    CancelResponse {
        cancelled: events.cancel(request.id).await,
    }
}
