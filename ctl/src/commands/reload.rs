use gpuctl_protocol::{Client, ClientError, ReloadRequest, Request, Response};

use crate::{unexpected, Output};

pub async fn run(client: &Client, output: Output) -> Result<(), ClientError> {
    let reloaded = match client.call(Request::Reload(ReloadRequest {})).await? {
        Response::Reload(reloaded) => reloaded,
        other => return Err(unexpected(&other)),
    };
    match output {
        Output::Json => crate::print_json(&reloaded),
        Output::Human => crate::emit(&format!(
            "reloaded: config generation {} ({}, {} models)\n",
            reloaded.generation,
            if reloaded.changed {
                "changed"
            } else {
                "unchanged"
            },
            reloaded.models
        )),
    }
    Ok(())
}
