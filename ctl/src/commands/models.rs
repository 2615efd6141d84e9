use gpuctl_protocol::{Client, ClientError, ModelsRequest, Request, Response};

use crate::table::Table;
use crate::{unexpected, Output};

pub async fn run(client: &Client, output: Output) -> Result<(), ClientError> {
    let models = match client.call(Request::Models(ModelsRequest {})).await? {
        Response::Models(models) => models,
        other => return Err(unexpected(&other)),
    };
    if output == Output::Json {
        crate::print_json(&models);
        return Ok(());
    }
    if models.models.is_empty() {
        eprintln!("no models configured: add [models.NAME] tables to the config file, then `gpuctl reload`");
        return Ok(());
    }
    let mut table = Table::new(&[
        "NAME",
        "KIND",
        "DEVICE",
        "KEEP ALIVE",
        "PRELOAD",
        "PIN",
        "GROUP",
        "PATH",
    ]);
    for model in &models.models {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
        table.row(vec![
            model.name.clone(),
            model.kind.name().to_owned(),
            model.device.clone(),
            model.keep_alive.to_string(),
            yes_no(model.preload),
            yes_no(model.pin),
            model.group.clone().unwrap_or_else(|| "-".into()),
            model.path.clone(),
        ]);
    }
    crate::emit(&table.render());
    Ok(())
}
