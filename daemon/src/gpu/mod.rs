//! GPU probes behind one trait: `nvml` (the NVIDIA driver's management
//! library, loaded at run time), `sim` (a simulated device whose foreign
//! usage tests and demos act out), `none` (CPU only). `auto` picks NVML when
//! the library loads and reports a device, and says which it chose and why.

mod nvml;
mod sim;

use crate::config::{Backend, GpuConfig};

/// One device's memory and the processes using it, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSample {
    pub index: u32,
    pub name: String,
    pub total: u64,
    pub used: u64,
    pub processes: Vec<ProcessUse>,
}

/// A process's memory on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUse {
    pub pid: u32,
    pub name: String,
    pub bytes: u64,
    /// Its command line, for people.
    pub command: String,
}

/// One of our workers, as probes need to know it.
#[derive(Debug, Clone, Copy)]
pub struct OwnWorker {
    pub pid: u32,
    pub device: u32,
    /// What the worker reported holding (the sim device counts this).
    pub bytes: u64,
}

/// Reads the GPUs. Calls may block (NVML): run them off the async threads.
pub trait Probe: Send {
    /// `nvml`, `sim` or `none`.
    fn backend(&self) -> &'static str;
    /// Every device now.
    fn sample(&mut self, ours: &[OwnWorker]) -> Result<Vec<DeviceSample>, String>;
}

/// No GPU: nothing to arbitrate.
struct NoGpu;

impl Probe for NoGpu {
    fn backend(&self) -> &'static str {
        "none"
    }

    fn sample(&mut self, _ours: &[OwnWorker]) -> Result<Vec<DeviceSample>, String> {
        Ok(Vec::new())
    }
}

/// The probe the configuration asks for, and a sentence saying why. An
/// explicit `nvml` that cannot load falls back to none, saying so.
pub fn choose(config: &GpuConfig) -> (Box<dyn Probe>, String) {
    try_choose(config)
        .unwrap_or_else(|reason| (Box::new(NoGpu), format!("{reason}; running without a GPU")))
}

fn try_choose(config: &GpuConfig) -> Result<(Box<dyn Probe>, String), String> {
    match config.backend {
        Backend::None => Ok((Box::new(NoGpu), "gpu.backend = \"none\"".to_owned())),
        Backend::Sim => Ok((
            Box::new(sim::SimProbe::new(&config.sim)),
            "gpu.backend = \"sim\"".to_owned(),
        )),
        Backend::Nvml => nvml::NvmlProbe::open()
            .map(|(probe, devices)| {
                (
                    Box::new(probe) as Box<dyn Probe>,
                    format!("gpu.backend = \"nvml\": {devices} devices"),
                )
            })
            .map_err(|e| format!("gpu.backend = \"nvml\", but {e}")),
        Backend::Auto => Ok(match nvml::NvmlProbe::open() {
            Ok((probe, devices)) if devices > 0 => (
                Box::new(probe) as Box<dyn Probe>,
                format!("auto: NVML reports {devices} devices"),
            ),
            Ok(_) => (
                Box::new(NoGpu),
                "auto: NVML loaded but reports no device; running without a GPU".to_owned(),
            ),
            Err(e) => (
                Box::new(NoGpu),
                format!("auto: no NVIDIA GPU ({e}); running without a GPU"),
            ),
        }),
    }
}

/// A process's group, from `/proc/PID/stat` (the field after the state,
/// the parent); `None` when it is gone or unreadable.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Counts what processes in a worker's process group hold as the worker's:
/// a program started through a wrapper (`uv run`, `sh -c`) holds GPU
/// memory in a child, which the worker's unload ends with the group.
pub fn fold_into_workers(
    processes: Vec<ProcessUse>,
    ours: &[OwnWorker],
    group_of: impl Fn(u32) -> Option<u32>,
) -> Vec<ProcessUse> {
    let mut folded: Vec<ProcessUse> = Vec::with_capacity(processes.len());
    for process in processes {
        let leader = if ours.iter().any(|w| w.pid == process.pid) {
            process.pid
        } else {
            match group_of(process.pid) {
                Some(group) if ours.iter().any(|w| w.pid == group) => group,
                _ => {
                    folded.push(process);
                    continue;
                }
            }
        };
        match folded.iter_mut().find(|p| p.pid == leader) {
            Some(worker) => worker.bytes += process.bytes,
            None => folded.push(ProcessUse {
                pid: leader,
                name: process_name(leader),
                command: process_command(leader),
                ..process
            }),
        }
    }
    folded
}

/// A process's name for people: its `comm`, e.g. "ollama".
pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned())
}

/// A process's command line, arguments separated by spaces ("ollama
/// serve"); empty when it is gone or not ours to read.
pub fn process_command(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline")).map_or_else(
        |_| String::new(),
        |bytes| {
            bytes
                .split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_held_in_a_workers_group_counts_as_the_workers() {
        let process = |pid, bytes| ProcessUse {
            pid,
            name: "python".into(),
            bytes,
            command: String::new(),
        };
        let ours = [OwnWorker {
            pid: 100,
            device: 0,
            bytes: 0,
        }];
        // 101 is the python under the worker's `uv run`; 200 is Ollama.
        let groups = |pid| match pid {
            101 => Some(100),
            200 => Some(200),
            _ => None,
        };
        let folded = fold_into_workers(
            vec![
                process(101, 3 << 30),
                process(200, 5 << 30),
                process(100, 1 << 20),
            ],
            &ours,
            groups,
        );
        let bytes: Vec<(u32, u64)> = folded.iter().map(|p| (p.pid, p.bytes)).collect();
        assert_eq!(bytes, [(100, (3 << 30) + (1 << 20)), (200, 5 << 30)]);
    }

    #[test]
    fn names_a_process_from_proc() {
        let me = std::process::id();
        assert!(!process_name(me).is_empty());
        assert!(
            process_command(me).contains("gpuctld"),
            "{}",
            process_command(me)
        );
        assert_eq!(process_name(u32::MAX), "?");
        // SAFETY: getpgrp cannot fail.
        assert_eq!(process_group(me), Some(unsafe { libc::getpgrp() } as u32));
        assert_eq!(process_group(u32::MAX), None);
        assert_eq!(process_command(u32::MAX), "");
    }
}
