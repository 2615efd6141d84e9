use gpuctl_protocol::{Client, ClientError, Request, Response, UnloadRequest};

use crate::{unexpected, Output};

pub async fn run(
    client: &Client,
    model: Option<String>,
    force: bool,
    output: Output,
) -> Result<(), ClientError> {
    let unloaded = match client
        .call(Request::Unload(UnloadRequest { model, force }))
        .await?
    {
        Response::Unload(unloaded) => unloaded,
        other => return Err(unexpected(&other)),
    };
    match output {
        Output::Json => crate::print_json(&unloaded),
        Output::Human if unloaded.unloaded.is_empty() => crate::emit("nothing was loaded\n"),
        Output::Human => crate::emit(&format!("unloaded {}\n", unloaded.unloaded.join(", "))),
    }
    Ok(())
}
