use gpuctl_protocol::{Error, ReloadRequest, ReloadResponse, ReloadTrigger};

use crate::context::Context;

pub async fn handle(_request: ReloadRequest, ctx: &Context) -> Result<ReloadResponse, Error> {
    ctx.registry.reload(ReloadTrigger::Request).await
}
