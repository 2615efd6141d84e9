use gpuctl_protocol::{Error, StatusRequest, StatusResponse};

use crate::context::Context;

pub async fn handle(_request: StatusRequest, ctx: &Context) -> Result<StatusResponse, Error> {
    Ok(StatusResponse {
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_ms: ctx.started.elapsed().as_millis() as u64,
        socket: ctx.socket.clone(),
        config: ctx.registry.config_status().await?,
        connections: ctx.connections.current(),
        models: ctx.registry.model_status().await?,
    })
}
