//! Loads that wait for GPU memory: admitted where they fit, idle models
//! evicted to make room, the rest told what they wait for and failed with
//! `InsufficientVram` after `gpu.load_wait`.

use std::time::Instant;

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{Error, ErrorCode, NoticeKind, UnloadReason};

use super::entry::Life;
use super::memory::preferred_device;
use super::queue::tell_waiting;
use super::Registry;
use crate::arbitration::{self, Placement, WaitingLoad};
use crate::policy::{self, Need};

impl Registry {
    /// Loads waiting for memory: the oldest first, each where it fits now,
    /// evicting idle models if that makes it fit; the rest are told what
    /// they wait for, and fail after `load_wait`.
    pub(super) fn admit_waiting_loads(&mut self) {
        let config = self.config();
        let min_free = config.gpu.min_free_vram.0;
        let load_wait = config.gpu.load_wait.0;
        let mut waiting: Vec<(Instant, String)> = self
            .models
            .iter()
            .filter_map(|(name, e)| match e.life {
                Life::WaitingForVram { since, .. } => Some((since, name.clone())),
                _ => None,
            })
            .collect();
        waiting.sort();
        // Those whose clients are still there, with what they need.
        let mut loads = Vec::new();
        for (since, name) in waiting {
            let Some(model) = config.models.get(&name) else {
                continue;
            };
            if let Some(entry) = self.models.get_mut(&name).filter(|e| e.queue.is_empty()) {
                // Its clients have all gone.
                entry.life = Life::Unloaded { retry_at: None };
                continue;
            }
            let need = self.need(&name, model, &config);
            loads.push((
                since,
                model,
                need,
                WaitingLoad {
                    name,
                    need: need.bytes,
                    preferred: preferred_device(model),
                },
            ));
        }
        // One snapshot for the whole pass.
        let placements = if self.gpu.error.is_some() {
            loads
                .iter()
                .map(|(_, _, need, _)| Placement::Wait {
                    device: 0,
                    short: need.bytes,
                })
                .collect()
        } else {
            let waiting: Vec<WaitingLoad> = loads.iter().map(|(.., load)| load.clone()).collect();
            arbitration::place_waiting(&self.device_views(), &self.residents(), &waiting, min_free)
        };
        for ((since, model, need, load), placement) in loads.into_iter().zip(placements) {
            let name = load.name;
            let Need {
                bytes: need,
                source,
            } = need;
            let source = source.describe();
            let waiting_for = match placement {
                Placement::Fits { device } => {
                    tracing::info!(model = %name, device, need = %format_bytes(need), source, "memory found");
                    self.start_load(&name, model, &config, Some(device));
                    continue;
                }
                Placement::NoSuchDevice { device } => {
                    let error = Error::new(
                        ErrorCode::InvalidConfig,
                        format!(
                            "model {name}: device cuda:{device} does not exist ({} GPUs: {})",
                            self.gpu.last.len(),
                            self.gpu.reason
                        ),
                    );
                    self.give_up(&name, &error);
                    continue;
                }
                Placement::Evict {
                    device,
                    ref victims,
                } => {
                    for victim in victims {
                        self.unload(victim, UnloadReason::Lru, false);
                    }
                    format!(
                        "{} on GPU {device}: unloading {} to make room",
                        format_bytes(need),
                        victims.join(", ")
                    )
                }
                Placement::AwaitRelease { device } => format!(
                    "{} on GPU {device}: models are being unloaded",
                    format_bytes(need)
                ),
                Placement::Wait { device, .. } => match &self.gpu.error {
                    Some(error) => format!("{}: {error}", format_bytes(need)),
                    None => format!(
                        "{} on GPU {device}: {}",
                        format_bytes(need),
                        self.who_holds(device)
                    ),
                },
            };
            if policy::load_wait_over(since, Instant::now(), load_wait) {
                let free = match &placement {
                    Placement::Wait { device, .. }
                    | Placement::Evict { device, .. }
                    | Placement::AwaitRelease { device } => self
                        .gpu
                        .device(*device)
                        .map_or(0, |d| d.total.saturating_sub(d.used)),
                    _ => 0,
                };
                let error = Error::new(
                    ErrorCode::InsufficientVram,
                    format!(
                        "model {name} needs {} ({source}) plus {} left free (gpu.min_free_vram), but only {} is free after waiting {} (gpu.load_wait): waiting for {waiting_for}",
                        format_bytes(need),
                        format_bytes(min_free),
                        format_bytes(free),
                        gpuctl_protocol::units::format_duration_ms(load_wait.as_millis() as u64),
                    ),
                );
                self.give_up(&name, &error);
                continue;
            }
            let Some(entry) = self.models.get_mut(&name) else {
                continue;
            };
            let Life::WaitingForVram { told, .. } = &mut entry.life else {
                continue;
            };
            if told.as_ref() == Some(&waiting_for) {
                continue;
            }
            *told = Some(waiting_for.clone());
            let message = format!("waiting for {waiting_for}");
            tell_waiting(&mut entry.queue, &name, &message, |_, _| true);
            tracing::info!(model = %name, %message, "load waits for GPU memory");
            self.notice(NoticeKind::WaitingForVram {
                model: name.clone(),
                message,
            });
        }
    }

    /// Fails the requests waiting to load `name`; no backoff, as its file
    /// is not at fault.
    fn give_up(&mut self, name: &str, error: &Error) {
        tracing::warn!(model = name, error = %error.message, "load gave up");
        if let Some(entry) = self.models.get_mut(name) {
            entry.life = Life::Unloaded { retry_at: None };
            entry.fail_waiters(error);
        }
        self.notice(NoticeKind::LoadFailed {
            model: name.to_owned(),
            error: error.message.clone(),
        });
    }
}
