use gpuctl_protocol::{Error, LoadRequest, LoadResponse};

use crate::context::Context;

pub async fn handle(request: LoadRequest, ctx: &Context) -> Result<LoadResponse, Error> {
    ctx.registry.load(request.model, request.keep_alive).await
}
