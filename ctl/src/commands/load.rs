use gpuctl_protocol::{Client, ClientError, KeepAlive, LoadRequest, Request, Response};

use crate::{unexpected, Output};

pub async fn run(
    client: &Client,
    model: String,
    keep_alive: Option<KeepAlive>,
    output: Output,
) -> Result<(), ClientError> {
    let loaded = match client
        .call(Request::Load(LoadRequest { model, keep_alive }))
        .await?
    {
        Response::Load(loaded) => loaded,
        other => return Err(unexpected(&other)),
    };
    match output {
        Output::Json => crate::print_json(&loaded),
        Output::Human => crate::emit(&match loaded.load_ms {
            Some(ms) => format!("{} loaded on {} in {ms} ms\n", loaded.model, loaded.device),
            None => format!("{} was already loaded on {}\n", loaded.model, loaded.device),
        }),
    }
    Ok(())
}
