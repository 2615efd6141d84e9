//! The registry's eyes on the GPUs: sampling (on blocking threads, and
//! only while gpuctld holds or waits for memory), measuring what each
//! worker holds, and verified unloads. What a sample means for loads,
//! pressure and reservations is decided in `waiting_loads.rs`,
//! `pressure.rs` and `reservations.rs`, from `memory.rs`'s views.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{Error, ErrorCode, NoticeKind, UnloadReason, VramResponse};
use tokio::sync::oneshot;

use super::entry::Life;
use super::{Event, Registry};
use crate::gpu::{DeviceSample, Probe};
use crate::measurements::Measured;

/// How long an exited worker's memory may still show on its device before
/// the unload is reported anyway (the driver is slow to tear a context down).
const RECLAIM_PATIENCE: Duration = Duration::from_secs(30);

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

impl Registry {
    pub(super) fn gpu_reason(&self) -> &str {
        &self.gpu.reason
    }

    /// When to sample next: never while nothing of ours is on a GPU or
    /// waiting for one, so an idle daemon costs nothing.
    pub(super) fn next_poll(&self) -> Option<Instant> {
        if self.gpu.sampling || !self.gpu.active() {
            return None;
        }
        let engaged = self
            .models
            .values()
            .any(|e| e.placement().is_some() || matches!(e.life, Life::WaitingForVram { .. }))
            || !self.reservations.is_empty()
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
            let loaded_file_bytes = entry.loaded_file_bytes();
            let Life::Ready {
                worker,
                placement: Some(device),
                held,
                ..
            } = &mut entry.life
            else {
                continue;
            };
            let (device, pid) = (*device, worker.pid);
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
            *held = bytes;
            let peak = entry.history.measured.unwrap_or(0).max(bytes);
            if entry.history.measured == Some(peak) {
                continue;
            }
            entry.history.measured = Some(peak);
            let Some(model) = config.models.get(name) else {
                continue;
            };
            tracing::debug!(model = %name, bytes = peak, "measured");
            // Keyed by the file as it was when loaded, which is what was measured.
            let measured = Measured {
                path: config.model_source(model),
                file_bytes: loaded_file_bytes,
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
                    if let Err(error) = crate::measurements::save(&dir, &state) {
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
}
