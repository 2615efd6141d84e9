//! The real thing: NVML, opened at run time. Without the driver,
//! `Nvml::init` fails, which means "no NVIDIA GPU", not a crash.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

use super::{process_command, process_name, DeviceSample, OwnWorker, Probe, ProcessUse};

pub struct NvmlProbe {
    nvml: Nvml,
}

impl NvmlProbe {
    /// Loads libnvidia-ml; returns the probe and how many devices it sees.
    pub fn open() -> Result<(NvmlProbe, u32), String> {
        let nvml = Nvml::init().map_err(|e| format!("NVML did not load: {e}"))?;
        let devices = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count devices: {e}"))?;
        Ok((NvmlProbe { nvml }, devices))
    }
}

impl Probe for NvmlProbe {
    fn backend(&self) -> &'static str {
        "nvml"
    }

    fn sample(&mut self, _ours: &[OwnWorker]) -> Result<Vec<DeviceSample>, String> {
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        (0..count)
            .map(|index| {
                let device = self
                    .nvml
                    .device_by_index(index)
                    .map_err(|e| format!("GPU {index}: {e}"))?;
                let memory = device
                    .memory_info()
                    .map_err(|e| format!("GPU {index}: {e}"))?;
                let processes = device
                    .running_compute_processes()
                    .map_err(|e| format!("GPU {index}: {e}"))?
                    .into_iter()
                    .map(|p| ProcessUse {
                        pid: p.pid,
                        name: process_name(p.pid),
                        command: process_command(p.pid),
                        bytes: match p.used_gpu_memory {
                            UsedGpuMemory::Used(bytes) => bytes,
                            UsedGpuMemory::Unavailable => 0,
                        },
                    })
                    .collect();
                Ok(DeviceSample {
                    index,
                    name: device.name().unwrap_or_else(|_| format!("GPU {index}")),
                    total: memory.total,
                    used: memory.used,
                    processes,
                })
            })
            .collect()
    }
}
