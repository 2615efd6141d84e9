use gpuctl_protocol::{Error, VramRequest, VramResponse};

use crate::context::Context;

pub async fn handle(_request: VramRequest, ctx: &Context) -> Result<VramResponse, Error> {
    ctx.registry.vram().await
}
