//! `Vram`: devices, who holds their memory, reservations and headroom,
//! answered from a fresh sample.

use gpuctl_protocol::{Error, GpuDevice, GpuProcess, VramResponse};
use tokio::sync::oneshot;

use super::Registry;

impl Registry {
    /// `Vram`: answered from a fresh sample.
    pub(super) fn vram(&mut self, reply: oneshot::Sender<Result<VramResponse, Error>>) {
        if !self.gpu.active() {
            let _ = reply.send(Ok(self.vram_response()));
            return;
        }
        self.gpu.vram_replies.push(reply);
        self.request_sample();
    }

    pub(super) fn answer_vram(&mut self) {
        if self.gpu.vram_replies.is_empty() {
            return;
        }
        let response = self.vram_response();
        for reply in self.gpu.vram_replies.drain(..) {
            let _ = reply.send(Ok(response.clone()));
        }
    }

    fn vram_response(&self) -> VramResponse {
        let config = self.config();
        let min_free = config.gpu.min_free_vram.0;
        let models = self.own_pids();
        let reserved = self.reserved_by_device();
        let views = self.device_views();
        VramResponse {
            backend: self.gpu.backend.to_owned(),
            reason: self.gpu.reason.clone(),
            devices: self
                .gpu
                .last
                .iter()
                .map(|d| {
                    let free = d.total.saturating_sub(d.used);
                    let reserved = reserved.get(&d.index).copied().unwrap_or(0);
                    let loading = views
                        .iter()
                        .find(|v| v.index == d.index)
                        .map_or(0, |v| v.loading);
                    GpuDevice {
                        index: d.index,
                        name: d.name.clone(),
                        total: d.total,
                        used: d.used,
                        free,
                        processes: d
                            .processes
                            .iter()
                            .map(|p| GpuProcess {
                                model: models.get(&p.pid).cloned(),
                                pid: p.pid,
                                name: p.name.clone(),
                                bytes: p.bytes,
                                command: p.command.clone(),
                            })
                            .collect(),
                        reserved,
                        headroom: free.saturating_sub(min_free + reserved + loading),
                    }
                })
                .collect(),
            min_free,
            reservations: self
                .reservations
                .values()
                .map(|r| gpuctl_protocol::ReservationInfo {
                    id: r.id,
                    device: r.device,
                    bytes: r.bytes,
                    unused: r.device.map_or(r.bytes, |d| self.unused(r, d)),
                    pid: r.pid,
                    granted: r.device.is_some(),
                    age_ms: r.since.elapsed().as_millis() as u64,
                })
                .collect(),
            samples: self.gpu.samples,
        }
    }
}
