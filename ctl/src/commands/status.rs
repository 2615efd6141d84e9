use gpuctl_protocol::units::{format_bytes, format_duration_ms};
use gpuctl_protocol::{
    Client, ClientError, KeepAlive, ModelState, ModelStatus, Request, Response, StatusRequest,
    StatusResponse,
};

use crate::table::Table;
use crate::{unexpected, Output};

pub async fn run(client: &Client, output: Output) -> Result<(), ClientError> {
    let status = match client.call(Request::Status(StatusRequest {})).await? {
        Response::Status(status) => status,
        other => return Err(unexpected(&other)),
    };
    match output {
        Output::Json => crate::print_json(&status),
        Output::Human => crate::emit(&render(&status, crate::now_unix_ms())),
    }
    Ok(())
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(then_ms) / 1000;
    format!("{} ago", format_duration_ms(seconds * 1000))
}

fn render(status: &StatusResponse, now_ms: u64) -> String {
    let mut table = Table::headless();
    let config = &status.config;
    table.row(vec![
        "daemon".into(),
        format!("gpuctld {} (pid {})", status.daemon_version, status.pid),
    ]);
    table.row(vec![
        "uptime".into(),
        format_duration_ms(status.uptime_ms / 1000 * 1000),
    ]);
    table.row(vec!["socket".into(), status.socket.clone()]);
    let path = config
        .path
        .clone()
        .unwrap_or_else(|| "embedded default".into());
    table.row(vec!["config".into(), path]);
    table.row(vec![
        "generation".into(),
        format!(
            "{} (applied {})",
            config.generation,
            ago(now_ms, config.applied_at_unix_ms)
        ),
    ]);
    let last_reload = match &config.last_reload {
        None => "none".to_owned(),
        Some(outcome) => {
            let trigger = outcome.trigger.describe();
            let when = ago(now_ms, outcome.at_unix_ms);
            match &outcome.error {
                None => format!("ok, by {trigger}, {when}"),
                Some(error) => format!("FAILED, by {trigger}, {when}: {error}"),
            }
        }
    };
    table.row(vec!["last reload".into(), last_reload]);
    table.row(vec!["connections".into(), status.connections.to_string()]);
    let mut text = table.render();
    if !status.models.is_empty() {
        text.push('\n');
        text.push_str(&render_models(&status.models));
    }
    text
}

fn render_models(models: &[ModelStatus]) -> String {
    let mut table = Table::new(&[
        "MODEL",
        "STATE",
        "DEVICE",
        "PID",
        "MEMORY",
        "NEED",
        "QUEUED",
        "RUNNING",
        "LAST USED",
        "UNLOAD IN",
        "LOADS",
        "LAST LOAD",
        "LAST ERROR",
    ]);
    let dash = || "-".to_owned();
    let seconds = |ms: u64| format_duration_ms(ms / 1000 * 1000);
    for model in models {
        let state = match model.state {
            ModelState::Unloaded => "unloaded".to_owned(),
            ModelState::Loading => "loading".to_owned(),
            ModelState::Ready if model.in_flight > 0 => "busy".to_owned(),
            ModelState::Ready => "idle".to_owned(),
            ModelState::Draining => "draining".to_owned(),
            ModelState::Unloading => "unloading".to_owned(),
            ModelState::WaitingForVram => "waiting for vram".to_owned(),
            ModelState::Failed { retry_in_ms } => {
                format!("failed (retry in {})", seconds(retry_in_ms + 999))
            }
        };
        table.row(vec![
            model.name.clone(),
            state,
            model.device.clone().unwrap_or_else(dash),
            model.pid.map_or_else(dash, |p| p.to_string()),
            if model.device_bytes > 0 {
                format_bytes(model.device_bytes)
            } else {
                dash()
            },
            if model.vram_need > 0 {
                format_bytes(model.vram_need)
            } else {
                dash()
            },
            model.queued.to_string(),
            model.in_flight.to_string(),
            model
                .idle_ms
                .map_or_else(dash, |ms| format!("{} ago", seconds(ms))),
            match (model.unload_in_ms, model.keep_alive) {
                (Some(ms), _) => seconds(ms),
                (None, KeepAlive::Forever) if model.state == ModelState::Ready => {
                    "never".to_owned()
                }
                _ => dash(),
            },
            model.loads.to_string(),
            model
                .last_load_ms
                .map_or_else(dash, |ms| format!("{ms} ms")),
            model.last_error.clone().unwrap_or_else(dash),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{ConfigStatus, ReloadOutcome, ReloadTrigger};

    use super::*;

    #[test]
    fn renders_a_failed_reload() {
        let status = StatusResponse {
            daemon_version: "0.1.0".into(),
            pid: 7,
            uptime_ms: 61_500,
            socket: "/s".into(),
            config: ConfigStatus {
                path: Some("/etc/g.toml".into()),
                generation: 2,
                applied_at_unix_ms: 10_000,
                last_reload: Some(ReloadOutcome {
                    at_unix_ms: 40_000,
                    trigger: ReloadTrigger::Signal,
                    error: Some("bad key".into()),
                }),
            },
            connections: 1,
            models: vec![],
        };
        let text = render(&status, 70_000);
        assert!(text.contains("uptime       1m1s\n"), "{text}");
        assert!(text.contains("generation   2 (applied 1m ago)\n"), "{text}");
        assert!(
            text.contains("last reload  FAILED, by SIGHUP, 30s ago: bad key\n"),
            "{text}"
        );
    }
}
