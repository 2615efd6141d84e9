use gpuctl_protocol::{Error, ReleaseRequest, ReleaseResponse};

use crate::context::Context;
use crate::outbox::EventSink;

pub async fn handle(
    request: ReleaseRequest,
    ctx: &Context,
    connection: EventSink,
) -> Result<ReleaseResponse, Error> {
    ctx.registry.release(request.reservation, connection).await
}
