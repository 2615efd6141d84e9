use gpuctl_protocol::{Error, UnloadRequest, UnloadResponse};

use crate::context::Context;

pub async fn handle(request: UnloadRequest, ctx: &Context) -> Result<UnloadResponse, Error> {
    ctx.registry.unload(request.model, request.force).await
}
