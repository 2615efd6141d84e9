use gpuctl_protocol::{Error, ReserveRequest, ReserveResponse};

use crate::access::{self, Peer};
use crate::context::Context;
use crate::outbox::EventSink;

/// Waits until the memory is free; the reservation lives on with this
/// connection after the answer. Who may reserve how much, for how long,
/// is the operator's policy (`access::reservation_ttl`).
pub async fn handle(
    mut request: ReserveRequest,
    peer: &Peer,
    ctx: &Context,
    connection: EventSink,
) -> Result<ReserveResponse, Error> {
    request.ttl_ms = access::reservation_ttl(&request, peer, &ctx.registry.config())?;
    let pid = peer.pid.and_then(|p| u32::try_from(p).ok());
    ctx.registry.reserve(request, pid, connection).await
}
