//! The real thing: NVML, opened at run time. Without the driver,
//! `Nvml::init` fails, which means "no NVIDIA GPU", not a crash.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

use super::{
    fold_into_workers, process_command, process_group, process_name, DeviceSample, OwnWorker,
    Probe, ProcessUse,
};

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

    fn sample(&mut self, ours: &[OwnWorker]) -> Result<Vec<DeviceSample>, String> {
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
                        bytes: used_bytes(&p.used_gpu_memory),
                    })
                    .collect();
                let processes = fold_into_workers(processes, ours, process_group);
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

/// A process's memory; 0 when NVML cannot see it (in some containers and
/// under some drivers), which callers treat as "unknown", not as free.
fn used_bytes(used: &UsedGpuMemory) -> u64 {
    match used {
        UsedGpuMemory::Used(bytes) => *bytes,
        UsedGpuMemory::Unavailable => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_process_memory_unavailable_reads_as_zero() {
        assert_eq!(used_bytes(&UsedGpuMemory::Used(5 << 30)), 5 << 30);
        assert_eq!(used_bytes(&UsedGpuMemory::Unavailable), 0);
    }

    #[test]
    fn without_the_driver_opening_fails_with_a_reason_not_a_crash() {
        match NvmlProbe::open() {
            // A machine with the NVIDIA driver: it must see its devices.
            Ok((mut probe, devices)) => {
                let sample = probe.sample(&[]).expect("sampling a real GPU");
                assert_eq!(sample.len() as u32, devices);
            }
            Err(reason) => assert!(
                reason.starts_with("NVML did not load: ")
                    || reason.starts_with("NVML cannot count devices: "),
                "{reason}"
            ),
        }
    }
}
