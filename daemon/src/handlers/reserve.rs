use gpuctl_protocol::{Error, ReserveRequest, ReserveResponse};

use crate::access::Peer;
use crate::context::{Context, EventSink};

/// Waits until the memory is free; the reservation lives on with this
/// connection after the answer.
pub async fn handle(
    request: ReserveRequest,
    peer: &Peer,
    ctx: &Context,
    connection: EventSink,
) -> Result<ReserveResponse, Error> {
    let pid = peer.pid.and_then(|p| u32::try_from(p).ok());
    ctx.registry.reserve(request, pid, connection).await
}
