//! One file per request; [`handle`] dispatches with one exhaustive match.

mod cancel;
mod generate;
mod load;
mod models;
mod ping;
mod release;
mod reload;
mod reserve;
mod status;
mod unload;
mod vram;
mod watch;

use gpuctl_protocol::{Error, Request, Response};

use crate::access::{self, Peer};
use crate::context::Context;
use crate::outbox::EventSink;

/// The operations this daemon serves, as advertised in `Welcome`.
pub const CAPABILITIES: [&str; 12] = [
    "ping", "status", "models", "reload", "generate", "load", "unload", "vram", "reserve",
    "release", "watch", "cancel",
];

/// Runs one request for `peer`.
pub async fn handle(
    request: Request,
    peer: Peer,
    ctx: &Context,
    events: EventSink,
) -> Result<Response, Error> {
    access::authorize(&request, &peer, &ctx.registry.config())?;
    match request {
        Request::Ping(request) => Ok(Response::Ping(ping::handle(request))),
        Request::Status(request) => status::handle(request, ctx).await.map(Response::Status),
        Request::Models(request) => Ok(Response::Models(models::handle(request, ctx))),
        Request::Reload(request) => reload::handle(request, ctx).await.map(Response::Reload),
        Request::Generate(request) => generate::handle(request, ctx, events)
            .await
            .map(Response::Generate),
        Request::GenerateThen(request) => generate::chain::handle(request, ctx, events)
            .await
            .map(Response::GenerateThen),
        Request::Load(request) => load::handle(request, ctx).await.map(Response::Load),
        Request::Unload(request) => unload::handle(request, ctx).await.map(Response::Unload),
        Request::Vram(request) => vram::handle(request, ctx).await.map(Response::Vram),
        Request::Reserve(request) => reserve::handle(request, &peer, ctx, events)
            .await
            .map(Response::Reserve),
        Request::Release(request) => release::handle(request, ctx, events)
            .await
            .map(Response::Release),
        Request::Watch(request) => watch::handle(request, ctx, events)
            .await
            .map(Response::Watch),
        Request::Cancel(request) => Ok(Response::Cancel(cancel::handle(request, events).await)),
    }
}
