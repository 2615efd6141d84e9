use gpuctl_protocol::{ModelsRequest, ModelsResponse};

use crate::context::Context;

pub fn handle(_request: ModelsRequest, ctx: &Context) -> ModelsResponse {
    ModelsResponse {
        models: ctx.registry.config().model_infos(),
    }
}
