use gpuctl_protocol::{Error, Event, WatchRequest, WatchResponse};
use tokio::sync::broadcast::error::RecvError;

use crate::context::Context;
use crate::outbox::EventSink;

/// Forwards every notice until the client hangs up (which ends this task
/// with its connection) or the daemon stops.
pub async fn handle(
    _request: WatchRequest,
    ctx: &Context,
    events: EventSink,
) -> Result<WatchResponse, Error> {
    let mut notices = ctx.registry.subscribe();
    loop {
        tokio::select! {
            _ = ctx.stopping.cancelled() => return Ok(WatchResponse {}),
            notice = notices.recv() => match notice {
                Ok(notice) => events.send(Event::Notice(notice)),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "a watcher fell behind; notices dropped");
                }
                Err(RecvError::Closed) => return Ok(WatchResponse {}),
            },
        }
    }
}
