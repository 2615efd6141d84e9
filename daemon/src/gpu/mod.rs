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
    fn names_a_process_from_proc() {
        let me = std::process::id();
        assert!(!process_name(me).is_empty());
        assert!(
            process_command(me).contains("gpuctld"),
            "{}",
            process_command(me)
        );
        assert_eq!(process_name(u32::MAX), "?");
        assert_eq!(process_command(u32::MAX), "");
    }
}
