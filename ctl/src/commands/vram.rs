use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{Client, ClientError, Request, Response, VramRequest, VramResponse};

use crate::table::Table;
use crate::{unexpected, Output};

pub async fn run(client: &Client, output: Output) -> Result<(), ClientError> {
    let vram = match client.call(Request::Vram(VramRequest {})).await? {
        Response::Vram(vram) => vram,
        other => return Err(unexpected(&other)),
    };
    match output {
        Output::Json => crate::print_json(&vram),
        Output::Human => crate::emit(&render(&vram)),
    }
    Ok(())
}

fn render(vram: &VramResponse) -> String {
    if vram.devices.is_empty() {
        return format!("no GPU ({})\n", vram.reason);
    }
    let mut text = format!("backend {} ({})\n", vram.backend, vram.reason);
    for device in &vram.devices {
        text.push_str(&format!(
            "\nGPU {}  {}  total {}  used {}  free {}\n",
            device.index,
            device.name,
            format_bytes(device.total),
            format_bytes(device.used),
            format_bytes(device.free)
        ));
        let mut table = Table::new(&["PID", "PROCESS", "MEMORY", "MODEL"]);
        for process in &device.processes {
            table.row(vec![
                process.pid.to_string(),
                process.name.clone(),
                format_bytes(process.bytes),
                process.model.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        text.push_str(&table.render());
    }
    text
}
