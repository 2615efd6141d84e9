//! `gpuctl watch`: the daemon's notices as they happen, until Ctrl-C.

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{Client, Event, Notice, NoticeKind, Request, Response, WatchRequest};

use crate::interrupt::Interrupt;
use crate::{unexpected, CliError, Output};

pub async fn run(client: &Client, output: Output) -> Result<(), CliError> {
    let mut interrupt = Interrupt::listen();
    let mut call = client.start(Request::Watch(WatchRequest {})).await?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            event = call.event() => match event {
                Some(Event::Notice(notice)) => print(&notice, output),
                Some(_) => {}
                None => break,
            },
        }
    }
    match call.response().await? {
        Response::Watch(_) => Ok(()),
        other => Err(unexpected(&other).into()),
    }
}

fn print(notice: &Notice, output: Output) {
    match output {
        Output::Json => match serde_json::to_string(notice) {
            Ok(line) => crate::emit(&format!("{line}\n")),
            Err(error) => eprintln!("gpuctl: cannot print JSON: {error}"),
        },
        Output::Human => crate::emit(&format!(
            "{}  {}\n",
            clock(notice.at_unix_ms),
            describe(&notice.what)
        )),
    }
}

/// UTC time of day with milliseconds: notices are read as they scroll by.
fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let s = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}

/// One line for people.
pub fn describe(what: &NoticeKind) -> String {
    match what {
        NoticeKind::Loaded {
            model,
            device,
            pid,
            load_ms,
        } => format!("loaded    {model} on {device} (pid {pid}) in {load_ms} ms"),
        NoticeKind::LoadFailed { model, error } => format!("failed    {model}: {error}"),
        NoticeKind::Unloaded {
            model,
            pid,
            reason,
            reclaimed,
            took_ms,
        } => format!(
            "unloaded  {model} (pid {pid}): {reason}; reclaimed {} in {took_ms} ms",
            format_bytes(*reclaimed)
        ),
        NoticeKind::Pressure {
            device,
            free,
            min_free,
            holder,
        } => format!(
            "pressure  GPU {device}: {} free, below {}{}",
            format_bytes(*free),
            format_bytes(*min_free),
            holder.as_ref().map_or_else(String::new, |h| format!(
                "; {} (pid {}) holds {}",
                h.name,
                h.pid,
                format_bytes(h.bytes)
            ))
        ),
        NoticeKind::Reserved {
            reservation,
            device,
            bytes,
            pid,
        } => format!(
            "reserved  {} on GPU {device} (reservation {reservation}{})",
            format_bytes(*bytes),
            pid.map_or_else(String::new, |p| format!(", pid {p}"))
        ),
        NoticeKind::Released {
            reservation,
            device,
            bytes,
            why,
        } => format!(
            "released  {} on GPU {device} (reservation {reservation}): {why}",
            format_bytes(*bytes)
        ),
        NoticeKind::Reloaded { generation, error } => match error {
            None => format!("reloaded  configuration generation {generation}"),
            Some(error) => format!("reload    FAILED, generation {generation} kept: {error}"),
        },
        NoticeKind::ReloadedBy {
            generation,
            trigger,
            error,
        } => match error {
            None => format!(
                "reloaded  configuration generation {generation}, by {}",
                trigger.describe()
            ),
            Some(error) => format!(
                "reload    FAILED, by {}, generation {generation} kept: {error}",
                trigger.describe()
            ),
        },
        NoticeKind::WaitingForVram { model, message } => format!("waiting   {model}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{Holder, UnloadReason};

    use super::*;

    #[test]
    fn describes_an_unload_under_pressure() {
        let line = describe(&NoticeKind::Unloaded {
            model: "up".into(),
            pid: 7,
            reason: UnloadReason::Pressure {
                holder: Some(Holder {
                    pid: 4121,
                    name: "ollama".into(),
                    bytes: 1 << 30,
                }),
            },
            reclaimed: 3 << 29,
            took_ms: 140,
        });
        assert_eq!(
            line,
            "unloaded  up (pid 7): pressure from ollama (pid 4121); reclaimed 1.5 GiB in 140 ms"
        );
        assert_eq!(clock(86_400_000 + 3_723_004), "01:02:03.004Z");
    }
}
