//! The registry's eyes on the GPUs: sampling (on blocking threads, and
//! only while gpuctld holds or waits for memory), what each model needs and
//! holds, verified unloads, and the snapshot that admission
//! (`admission.rs`), pressure (`pressure.rs`) and reservations decide on
//! through [`crate::arbitration`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{Error, ErrorCode, Holder, NoticeKind, UnloadReason, VramResponse};
use tokio::sync::oneshot;

use super::models::Event;
use super::Registry;
use crate::arbitration::{DeviceView, Resident};
use crate::config::{Config, Device, ModelConfig};
use crate::gpu::{DeviceSample, OwnWorker, Probe};
use crate::state::Measured;

/// How long an exited worker's memory may still show on its device before
/// the unload is reported anyway (the driver is slow to tear a context down).
const RECLAIM_PATIENCE: Duration = Duration::from_secs(30);

/// A file-size estimate is this much more than the file (CUDA context,
/// buffers, allocator slack), in per cent.
const FILE_ESTIMATE_PERCENT: u64 = 120;

/// An exited worker whose memory is not yet seen back on its device.
pub struct Reclaim {
    pub model: String,
    pub pid: u32,
    pub device: Option<u32>,
    pub bytes: u64,
    pub reason: UnloadReason,
    /// When the unload was decided (or the crash seen).
    pub since: Instant,
}

pub struct GpuState {
    /// Shared with the blocking threads that sample it (NVML calls block).
    pub(super) probe: Arc<Mutex<Box<dyn Probe>>>,
    pub(super) backend: &'static str,
    pub(super) reason: String,
    pub(super) sampling: bool,
    /// Someone asked for a sample while one was being taken.
    pub(super) again: bool,
    pub(super) last_at: Option<Instant>,
    pub(super) last: Vec<DeviceSample>,
    pub(super) samples: u64,
    pub(super) vram_replies: Vec<oneshot::Sender<Result<VramResponse, Error>>>,
    pub reclaims: Vec<Reclaim>,
    /// Devices under pressure now, so it is announced once per episode.
    pub(super) pressured: BTreeSet<u32>,
    /// Other programs' bytes at the previous sample, to name the one that grew.
    pub(super) foreign_before: HashMap<u32, u64>,
    pub(super) error: Option<String>,
}

impl GpuState {
    pub fn new(probe: Box<dyn Probe>, reason: String) -> GpuState {
        GpuState {
            backend: probe.backend(),
            probe: Arc::new(Mutex::new(probe)),
            reason,
            sampling: false,
            again: false,
            last_at: None,
            last: Vec::new(),
            samples: 0,
            vram_replies: Vec::new(),
            reclaims: Vec::new(),
            pressured: BTreeSet::new(),
            foreign_before: HashMap::new(),
            error: None,
        }
    }

    pub(super) fn active(&self) -> bool {
        self.backend != "none"
    }

    pub(super) fn device(&self, index: u32) -> Option<&DeviceSample> {
        self.last.iter().find(|d| d.index == index)
    }
}

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
    pub(super) fn gpu_reason(&self) -> &str {
        &self.gpu.reason
    }

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
    pub(super) fn need(
        &self,
        name: &str,
        model: &ModelConfig,
        config: &Config,
    ) -> (u64, &'static str) {
        if let Some(bytes) = model.vram {
            return (bytes.0, "configured");
        }
        let path = config.model_path(model);
        let file_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        // A measurement larger than any device (a damaged or hand-edited
        // state file) would make the model unloadable: it is no measurement.
        let largest = self.gpu.last.iter().map(|d| d.total).max();
        let measured = self
            .measured
            .models
            .get(name)
            .filter(|m| m.path == path.display().to_string() && m.file_bytes == file_bytes)
            .filter(|m| largest.is_none_or(|total| m.vram_bytes <= total));
        match measured {
            Some(m) => (m.vram_bytes, "measured"),
            None => (file_bytes * FILE_ESTIMATE_PERCENT / 100, "file size × 1.2"),
        }
    }

    /// Our workers on GPUs, as the probe needs to know them. The simulated
    /// device counts a worker with what it reported, or with its configured
    /// `vram` when that is more (a simulated model holds what it is said to need).
    fn own_workers(&self, config: &Config) -> Vec<OwnWorker> {
        self.models
            .iter()
            .filter_map(|(name, entry)| {
                let device = entry.placement?;
                let pid = entry.pid()?;
                let configured = config
                    .models
                    .get(name)
                    .and_then(|m| m.vram)
                    .map_or(0, |b| b.0);
                let bytes = if entry.ready() {
                    entry.reported_bytes().max(configured)
                } else {
                    entry.held
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

    /// When to sample next: never while nothing of ours is on a GPU or
    /// waiting for one, so an idle daemon costs nothing.
    pub(super) fn next_poll(&self) -> Option<Instant> {
        if self.gpu.sampling || !self.gpu.active() {
            return None;
        }
        let engaged = self.models.values().any(|e| {
            (e.placement.is_some() && (e.pid().is_some() || e.loading())) || e.vram_wait.is_some()
        }) || !self.reservations.is_empty()
            || !self.gpu.reclaims.is_empty();
        if !engaged {
            return None;
        }
        let interval = self.config().gpu.poll_interval.0;
        Some(
            self.gpu
                .last_at
                .map_or_else(Instant::now, |at| at + interval),
        )
    }

    /// Samples the GPUs on a blocking thread; the result comes back as an event.
    pub(super) fn request_sample(&mut self) {
        if self.gpu.sampling {
            self.gpu.again = true;
            return;
        }
        self.gpu.sampling = true;
        let ours = self.own_workers(&self.config());
        let probe = self.gpu.probe.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let sample = tokio::task::spawn_blocking(move || {
                let mut probe = probe
                    .lock()
                    .map_err(|_| "the GPU probe failed earlier".to_owned())?;
                probe.sample(&ours)
            })
            .await
            .map_err(|e| format!("GPU sampling failed: {e}"))
            .and_then(|r| r);
            let _ = events.send(Event::Sampled(sample));
        });
    }

    pub(super) fn on_sampled(&mut self, sample: Result<Vec<DeviceSample>, String>) {
        self.gpu.sampling = false;
        self.gpu.samples += 1;
        self.gpu.last_at = Some(Instant::now());
        match sample {
            Ok(devices) => {
                if self.gpu.error.take().is_some() {
                    tracing::info!("GPU sampling works again");
                }
                self.gpu.last = devices;
                self.measure();
                self.verify_reclaims();
                self.answer_vram();
                self.relieve_pressure();
                self.settle_reservations();
                self.admit_waiting_loads();
            }
            Err(error) => {
                if self.gpu.error.as_ref() != Some(&error) {
                    tracing::warn!(%error, "cannot sample the GPUs");
                }
                for reply in self.gpu.vram_replies.drain(..) {
                    let _ = reply.send(Err(Error::new(
                        ErrorCode::Internal,
                        format!("cannot read GPU memory: {error}"),
                    )));
                }
                self.gpu.error = Some(error);
                // Loads keep waiting on what was last seen, and time out.
                self.admit_waiting_loads();
            }
        }
        if std::mem::take(&mut self.gpu.again) {
            self.request_sample();
        }
    }

    /// Records what each worker holds; the most it held becomes its need,
    /// kept in the state directory.
    fn measure(&mut self) {
        let config = self.config();
        let mut changed = false;
        for (name, entry) in self.models.iter_mut() {
            let (Some(device), Some(pid), true) = (entry.placement, entry.pid(), entry.ready())
            else {
                continue;
            };
            let Some(bytes) = self
                .gpu
                .device(device)
                .and_then(|d| d.processes.iter().find(|p| p.pid == pid))
                .map(|p| p.bytes)
                // NVML reports 0 when it may not see per-process use (some
                // containers): no measurement, not a need of nothing.
                .filter(|bytes| *bytes > 0)
            else {
                continue;
            };
            entry.held = bytes;
            let peak = entry.measured.unwrap_or(0).max(bytes);
            if entry.measured == Some(peak) {
                continue;
            }
            entry.measured = Some(peak);
            let Some(model) = config.models.get(name) else {
                continue;
            };
            tracing::debug!(model = %name, bytes = peak, "measured");
            // Keyed by the file as it was when loaded, which is what was measured.
            let measured = Measured {
                path: config.model_path(model).display().to_string(),
                file_bytes: entry.loaded_file_bytes(),
                vram_bytes: peak,
            };
            if self.measured.models.get(name) != Some(&measured) {
                self.measured.models.insert(name.clone(), measured);
                changed = true;
            }
        }
        if changed {
            if let Some(dir) = self.state_dir.clone() {
                let state = self.measured.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(error) = crate::state::save(&dir, &state) {
                        tracing::warn!(dir = %dir.display(), %error, "cannot save measured model sizes");
                    }
                });
            }
        }
    }

    /// A worker has exited: its unload is reported once its memory is seen
    /// back on its device.
    pub(super) fn reclaim(&mut self, reclaim: Reclaim) {
        if reclaim.device.is_none() || !self.gpu.active() {
            return self.reclaimed(reclaim, 0);
        }
        self.gpu.reclaims.push(reclaim);
        self.request_sample();
    }

    fn verify_reclaims(&mut self) {
        let pending = std::mem::take(&mut self.gpu.reclaims);
        for reclaim in pending {
            let still_there = reclaim.device.is_some_and(|index| {
                self.gpu
                    .device(index)
                    .is_some_and(|d| d.processes.iter().any(|p| p.pid == reclaim.pid))
            });
            if !still_there {
                let bytes = reclaim.bytes;
                self.reclaimed(reclaim, bytes);
            } else if reclaim.since.elapsed() > RECLAIM_PATIENCE {
                tracing::warn!(model = %reclaim.model, pid = reclaim.pid, "the worker has exited but the GPU still lists its memory");
                self.reclaimed(reclaim, 0);
            } else {
                self.gpu.reclaims.push(reclaim);
            }
        }
    }

    fn reclaimed(&mut self, reclaim: Reclaim, bytes: u64) {
        let took_ms = reclaim.since.elapsed().as_millis() as u64;
        tracing::info!(
            model = %reclaim.model,
            pid = reclaim.pid,
            reason = %reclaim.reason,
            reclaimed = %format_bytes(bytes),
            took_ms,
            "unloaded: reclaimed {} in {took_ms} ms",
            format_bytes(bytes)
        );
        self.notice(NoticeKind::Unloaded {
            model: reclaim.model,
            pid: reclaim.pid,
            reason: reclaim.reason,
            reclaimed: bytes,
            took_ms,
        });
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
                let on_it = |e: &&super::ModelEntry| e.placement == Some(sample.index);
                let loading = self
                    .models
                    .iter()
                    .filter(|(_, e)| e.loading() && on_it(e))
                    .filter_map(|(name, _)| {
                        config
                            .models
                            .get(name)
                            .map(|m| self.need(name, m, &config).0)
                    })
                    .sum();
                let releasing = self
                    .models
                    .values()
                    .filter(|e| e.leaving() && on_it(e))
                    .map(|e| e.held)
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
            .filter(|(_, e)| e.ready())
            .filter_map(|(name, entry)| {
                let model = config.models.get(name);
                let bytes = match entry.held {
                    0 => model.map_or(0, |m| self.need(name, m, &config).0),
                    held => held,
                };
                Some(Resident {
                    name: name.clone(),
                    device: entry.placement?,
                    bytes,
                    idle: entry.idle(),
                    pin: model.is_some_and(|m| m.pin),
                    last_used: entry.last_used(),
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
