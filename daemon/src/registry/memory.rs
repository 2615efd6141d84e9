//! What the GPUs look like to arbitration, built from the registry's
//! entries and the last sample: each model's need, the devices' free,
//! reserved, loading and releasing memory, the resident models, and who
//! else holds memory.

use std::collections::HashMap;

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::Holder;

use super::Registry;
use crate::arbitration::{DeviceView, Resident};
use crate::config::{Config, Device, ModelConfig};
use crate::gpu::OwnWorker;
use crate::policy::{self, Need, Phase};

pub(super) fn preferred_device(model: &ModelConfig) -> Option<u32> {
    match model.device {
        Device::Cuda(Some(index)) => Some(index),
        _ => None,
    }
}

/// Whether `pid` is `ancestor` or one of its descendants (a reservation's
/// holder and the command it runs).
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    for _ in 0..64 {
        if current == ancestor {
            return true;
        }
        if current <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{current}/stat")) else {
            return false;
        };
        // The command name may hold spaces and parentheses: ppid follows the last ')'.
        let Some(parent) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        current = parent;
    }
    false
}

impl Registry {
    /// Whether `model`'s memory is arbitrated: a GPU is watched and the
    /// model is not configured for the CPU.
    pub(super) fn arbitrated(&self, model: &ModelConfig) -> bool {
        self.gpu.active() && model.device != Device::Cpu
    }

    /// The device string its worker gets: the GPU placement chose, under NVML.
    pub(super) fn worker_device(&self, model: &ModelConfig, placement: Option<u32>) -> String {
        match (self.gpu.backend, placement, model.device) {
            ("nvml", Some(index), Device::Auto | Device::Cuda(_)) => format!("cuda:{index}"),
            _ => model.device.to_string(),
        }
    }

    /// What `name` is expected to need, and where the figure comes from.
    pub(super) fn need(&self, name: &str, model: &ModelConfig, config: &Config) -> Need {
        let path = config.model_source(model);
        let file_bytes = self.models.get(name).map_or(0, |e| e.seen_file_bytes());
        policy::need(
            model.vram.map(|b| b.0),
            &path,
            file_bytes,
            self.measured.models.get(name),
            self.gpu.last.iter().map(|d| d.total).max(),
        )
    }

    /// Our workers on GPUs, as the probe needs to know them. The simulated
    /// device counts a worker with what it reported, or with its configured
    /// `vram` when that is more (a simulated model holds what it is said to need).
    pub(super) fn own_workers(&self, config: &Config) -> Vec<OwnWorker> {
        self.models
            .iter()
            .filter_map(|(name, entry)| {
                let device = entry.placement()?;
                let pid = entry.pid()?;
                let configured = config
                    .models
                    .get(name)
                    .and_then(|m| m.vram)
                    .map_or(0, |b| b.0);
                let bytes = match entry.life {
                    super::entry::Life::Ready { .. } => entry.reported_bytes().max(configured),
                    _ => entry.held(),
                };
                Some(OwnWorker { pid, device, bytes })
            })
            .collect()
    }

    pub(super) fn own_pids(&self) -> HashMap<u32, String> {
        self.models
            .iter()
            .filter_map(|(name, entry)| entry.pid().map(|pid| (pid, name.clone())))
            .collect()
    }

    /// The unused part of each granted reservation, by device.
    pub(super) fn reserved_by_device(&self) -> HashMap<u32, u64> {
        let mut reserved = HashMap::new();
        for reservation in self.reservations.values() {
            if let Some(device) = reservation.device {
                *reserved.entry(device).or_insert(0) += self.unused(reservation, device);
            }
        }
        reserved
    }

    /// What a reservation's holder (and its children) does not use yet.
    pub(super) fn unused(&self, reservation: &super::Reservation, device: u32) -> u64 {
        let ours = self.own_pids();
        let used: u64 = match (reservation.pid, self.gpu.device(device)) {
            // Our workers may descend from the holder too (gpuctld started
            // from the same shell): they never count as its use.
            (Some(holder), Some(sample)) => sample
                .processes
                .iter()
                .filter(|p| !ours.contains_key(&p.pid) && descends_from(p.pid, holder))
                .map(|p| p.bytes)
                .sum(),
            _ => 0,
        };
        reservation.bytes.saturating_sub(used)
    }

    pub(super) fn device_views(&self) -> Vec<DeviceView> {
        let config = self.config();
        let reserved = self.reserved_by_device();
        self.gpu
            .last
            .iter()
            .map(|sample| {
                let on_it = |e: &&super::ModelEntry| e.placement() == Some(sample.index);
                let loading = self
                    .models
                    .iter()
                    .filter(|(_, e)| e.phase() == Phase::Loading && on_it(e))
                    .filter_map(|(name, _)| {
                        config
                            .models
                            .get(name)
                            .map(|m| self.need(name, m, &config).bytes)
                    })
                    .sum();
                let releasing = self
                    .models
                    .values()
                    .filter(|e| e.phase().leaving() && on_it(e))
                    .map(|e| e.held())
                    .sum();
                DeviceView {
                    index: sample.index,
                    free: sample.total.saturating_sub(sample.used),
                    reserved: reserved.get(&sample.index).copied().unwrap_or(0),
                    loading,
                    releasing,
                }
            })
            .collect()
    }

    pub(super) fn residents(&self) -> Vec<Resident> {
        let config = self.config();
        self.models
            .iter()
            .filter_map(|(name, entry)| {
                let last_used = entry.last_used()?; // ready
                let model = config.models.get(name);
                let bytes = match entry.held() {
                    0 => model.map_or(0, |m| self.need(name, m, &config).bytes),
                    held => held,
                };
                Some(Resident {
                    name: name.clone(),
                    device: entry.placement()?,
                    bytes,
                    idle: entry.idle(),
                    pin: model.is_some_and(|m| m.pin),
                    last_used,
                })
            })
            .collect()
    }

    /// The other programs on a device, biggest first.
    pub(super) fn foreign(&self, index: u32) -> Vec<Holder> {
        let ours = self.own_pids();
        let mut holders: Vec<Holder> = self
            .gpu
            .device(index)
            .map(|d| {
                d.processes
                    .iter()
                    .filter(|p| !ours.contains_key(&p.pid))
                    .map(|p| Holder {
                        pid: p.pid,
                        name: p.name.clone(),
                        bytes: p.bytes,
                    })
                    .collect()
            })
            .unwrap_or_default();
        holders.sort_by_key(|h| std::cmp::Reverse(h.bytes));
        holders
    }

    /// Who holds a device's memory, for people: the largest other programs,
    /// our busy models, reservations.
    pub(super) fn who_holds(&self, index: u32) -> String {
        let mut parts: Vec<String> = self
            .foreign(index)
            .iter()
            .take(3)
            .map(|h| format!("{} (pid {}) holds {}", h.name, h.pid, format_bytes(h.bytes)))
            .collect();
        for resident in self.residents() {
            if resident.device == index && !resident.idle {
                parts.push(format!(
                    "model {} (busy) holds {}",
                    resident.name,
                    format_bytes(resident.bytes)
                ));
            }
        }
        if let Some(reserved) = self.reserved_by_device().get(&index).filter(|r| **r > 0) {
            parts.push(format!("reservations keep {}", format_bytes(*reserved)));
        }
        if parts.is_empty() {
            "nothing gpuctld can evict".to_owned()
        } else {
            parts.join(", ")
        }
    }
}
