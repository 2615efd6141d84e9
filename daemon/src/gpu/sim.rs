//! A simulated GPU: sizes from the config, our workers counted with the
//! bytes they report, and "foreign" programs read at every sample from a
//! JSON file that tests and demos write to act out another program taking
//! and releasing memory.

use std::path::PathBuf;

use serde::Deserialize;

use super::{DeviceSample, OwnWorker, Probe, ProcessUse};
use crate::config::SimConfig;

/// One line of the foreign-usage file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Foreign {
    pid: u32,
    name: String,
    device: u32,
    bytes: u64,
}

pub struct SimProbe {
    devices: Vec<(String, u64)>,
    foreign_usage_file: Option<PathBuf>,
}

impl SimProbe {
    pub fn new(config: &SimConfig) -> SimProbe {
        SimProbe {
            devices: config
                .devices
                .iter()
                .map(|d| (d.name.clone(), d.total.0))
                .collect(),
            foreign_usage_file: Some(&config.foreign_usage_file)
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
        }
    }

    /// Other programs' usage; a missing file means none.
    fn foreign(&self) -> Result<Vec<Foreign>, String> {
        let Some(file) = &self.foreign_usage_file else {
            return Ok(Vec::new());
        };
        match std::fs::read_to_string(file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                format!(
                    "{}: {e}; expected a list of {{\"pid\": N, \"name\": \"…\", \"device\": N, \"bytes\": N}}",
                    file.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("{}: {e}", file.display())),
        }
    }
}

impl Probe for SimProbe {
    fn backend(&self) -> &'static str {
        "sim"
    }

    fn sample(&mut self, ours: &[OwnWorker]) -> Result<Vec<DeviceSample>, String> {
        let foreign = self.foreign()?;
        Ok(self
            .devices
            .iter()
            .enumerate()
            .map(|(index, (name, total))| {
                let index = index as u32;
                let mut processes: Vec<ProcessUse> = foreign
                    .iter()
                    .filter(|f| f.device == index)
                    .map(|f| ProcessUse {
                        pid: f.pid,
                        name: f.name.clone(),
                        bytes: f.bytes,
                        command: f.name.clone(),
                    })
                    .collect();
                processes.extend(
                    ours.iter()
                        .filter(|w| w.device == index)
                        .map(|w| ProcessUse {
                            pid: w.pid,
                            name: "gpuctl-worker".to_owned(),
                            bytes: w.bytes,
                            command: super::process_command(w.pid),
                        }),
                );
                let used = processes.iter().map(|p| p.bytes).sum::<u64>().min(*total);
                DeviceSample {
                    index,
                    name: name.clone(),
                    total: *total,
                    used,
                    processes,
                }
            })
            .collect())
    }
}
