//! Yielding to other programs: where free memory fell below
//! `gpu.min_free_vram`, idle models are unloaded now and busy ones once
//! their work ends.

use std::collections::HashMap;

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{NoticeKind, UnloadReason};

use super::entry::Life;
use super::Registry;
use crate::arbitration;
use crate::policy;

impl Registry {
    /// Where free memory fell below `min_free_vram`: idle models go now,
    /// busy ones once their work ends (`yield_busy`).
    pub(super) fn relieve_pressure(&mut self) {
        let gpu = self.config().gpu.clone();
        let min_free = gpu.min_free_vram.0;
        let residents = self.residents();
        let ours = self.own_pids();
        let foreign_now: HashMap<u32, u64> = self
            .gpu
            .last
            .iter()
            .flat_map(|d| d.processes.iter())
            .filter(|p| !ours.contains_key(&p.pid))
            .map(|p| (p.pid, p.bytes))
            .collect();
        for view in self.device_views() {
            if view.free >= min_free {
                if self.gpu.pressured.remove(&view.index) {
                    tracing::info!(device = view.index, free = %format_bytes(view.free), "memory pressure is over");
                    let mut resumed = false;
                    for entry in self.models.values_mut() {
                        if let Life::Ready {
                            placement: Some(device),
                            yield_after_work,
                            ..
                        } = &mut entry.life
                        {
                            if *device == view.index {
                                resumed |= yield_after_work.take().is_some();
                            }
                        }
                    }
                    if resumed {
                        // They took no new work while about to yield.
                        self.pump_all();
                    }
                }
                continue;
            }
            let holder =
                policy::pressure_holder(&self.foreign(view.index), &self.gpu.foreign_before);
            if self.gpu.pressured.insert(view.index) {
                tracing::warn!(
                    device = view.index,
                    free = %format_bytes(view.free),
                    min_free = %format_bytes(min_free),
                    holder = holder.as_ref().map(|h| format!("{} (pid {})", h.name, h.pid)),
                    "memory pressure"
                );
                self.notice(NoticeKind::Pressure {
                    device: view.index,
                    free: view.free,
                    min_free,
                    holder: holder.clone(),
                });
            }
            let reason = UnloadReason::Pressure { holder };
            let relief = arbitration::relieve(&view, &residents, min_free, gpu.yield_busy);
            for name in relief.now {
                self.unload(&name, reason.clone(), false);
            }
            for name in relief.after_work {
                let Some(entry) = self.models.get_mut(&name) else {
                    continue;
                };
                match &mut entry.life {
                    Life::Ready { in_flight: 0, .. } => {
                        self.unload(&name, reason.clone(), false);
                    }
                    Life::Ready {
                        yield_after_work: yield_after_work @ None,
                        ..
                    } => {
                        tracing::info!(model = %name, "busy under pressure: unloading once its work is done");
                        *yield_after_work = Some(reason.clone());
                    }
                    _ => {}
                }
            }
        }
        self.gpu.foreign_before = foreign_now;
    }
}
