//! How `gpuctl generate` shows a long request's progress: a bar on a
//! terminal, JSON lines on stderr with `--json`, nothing otherwise (a pipe
//! or a log file gets no control characters).

use std::io::IsTerminal;

use gpuctl_protocol::ProgressEvent;
use indicatif::{ProgressBar, ProgressStyle};

use crate::Output;

pub enum Progress {
    Bar(Option<ProgressBar>),
    JsonLines,
    Silent,
}

impl Progress {
    pub fn new(output: Output) -> Progress {
        match output {
            Output::Json => Progress::JsonLines,
            Output::Human if std::io::stderr().is_terminal() => Progress::Bar(None),
            Output::Human => Progress::Silent,
        }
    }

    pub fn show(&mut self, event: &ProgressEvent) {
        match self {
            Progress::Bar(bar) => {
                let bar = bar.get_or_insert_with(|| {
                    let bar = ProgressBar::new(event.total);
                    let style = ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} tiles  {elapsed_precise}  {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    bar
                });
                bar.set_length(event.total);
                bar.set_position(event.done);
                if let Some(eta) = event.eta_ms {
                    bar.set_message(format!(
                        "ETA {}",
                        gpuctl_protocol::units::format_duration_ms(eta / 1000 * 1000)
                    ));
                }
            }
            Progress::JsonLines => {
                if let Ok(line) = serde_json::to_string(&serde_json::json!({ "progress": event })) {
                    eprintln!("{line}");
                }
            }
            Progress::Silent => {}
        }
    }

    pub fn finish(&mut self) {
        if let Progress::Bar(Some(bar)) = self {
            bar.finish_and_clear();
        }
    }
}
