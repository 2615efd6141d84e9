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
    let mut text = format!(
        "backend {} ({}); gpuctld leaves {} free for others\n",
        vram.backend,
        vram.reason,
        format_bytes(vram.min_free)
    );
    for device in &vram.devices {
        text.push_str(&format!(
            "\nGPU {}  {}  total {}  used {}  free {}  reserved {}  headroom {}\n",
            device.index,
            device.name,
            format_bytes(device.total),
            format_bytes(device.used),
            format_bytes(device.free),
            format_bytes(device.reserved),
            format_bytes(device.headroom)
        ));
        let mut table = Table::new(&["PID", "PROCESS", "MEMORY", "MODEL", "COMMAND"]);
        for process in &device.processes {
            let mut command = process.command.clone();
            if command.chars().count() > 60 {
                command = command.chars().take(59).collect::<String>() + "…";
            }
            table.row(vec![
                process.pid.to_string(),
                process.name.clone(),
                format_bytes(process.bytes),
                process.model.clone().unwrap_or_else(|| "-".to_owned()),
                command,
            ]);
        }
        text.push_str(&table.render());
    }
    if !vram.reservations.is_empty() {
        text.push('\n');
        let mut table = Table::new(&["RESERVATION", "GPU", "SIZE", "UNUSED", "PID", "STATE"]);
        for r in &vram.reservations {
            table.row(vec![
                r.id.to_string(),
                r.device.map_or_else(|| "-".to_owned(), |d| d.to_string()),
                format_bytes(r.bytes),
                format_bytes(r.unused),
                r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                if r.granted { "granted" } else { "waiting" }.to_owned(),
            ]);
        }
        text.push_str(&table.render());
    }
    text
}
