//! What the registry shows: the snapshot policy decides on, and every
//! model's status, both derived from the same entries.

use std::time::Instant;

use gpuctl_protocol::{KeepAlive, ModelStatus};

use super::entry::Life;
use super::queue::Waiter;
use super::{ms, Registry};
use crate::config::Config;
use crate::policy::{self, ModelView};

impl Registry {
    /// The keep-alive in force for `name`: the request's, else its own,
    /// else the default, never beyond `max_keep_alive`.
    fn keep_alive_of(&self, name: &str, config: &Config) -> KeepAlive {
        let configured = config
            .models
            .get(name)
            .map(|m| m.keep_alive.unwrap_or(config.policy.keep_alive).0)
            .unwrap_or(config.policy.keep_alive.0);
        let requested = self.models.get(name).and_then(|e| e.keep_alive);
        policy::keep_alive(configured, requested, config.policy.max_keep_alive.0)
    }

    /// Every model as policy sees it.
    pub(super) fn views(&self, config: &Config) -> Vec<ModelView> {
        self.models
            .iter()
            .map(|(name, entry)| {
                let model = config.models.get(name);
                ModelView {
                    name: name.clone(),
                    phase: entry.phase(),
                    queued: entry.queue.len(),
                    oldest_waiter: entry.queue.front().map(Waiter::since),
                    last_used: entry.last_used(),
                    keep_alive: self.keep_alive_of(name, config),
                    pin: model.is_some_and(|m| m.pin),
                    group: model.and_then(|m| m.group.clone()),
                }
            })
            .collect()
    }

    pub(super) fn model_status(&self) -> Vec<ModelStatus> {
        let config = self.config();
        let now = Instant::now();
        self.views(&config)
            .into_iter()
            .filter_map(|view| {
                let entry = self.models.get(&view.name)?;
                let need = config
                    .models
                    .get(&view.name)
                    .map(|m| self.need(&view.name, m, &config));
                let (device, device_bytes) = match &entry.life {
                    Life::Ready {
                        worker,
                        placement,
                        held,
                        ..
                    } => (
                        Some(worker.loaded.device.clone()),
                        if placement.is_some() {
                            *held
                        } else {
                            worker.loaded.device_bytes
                        },
                    ),
                    _ => (None, 0),
                };
                let idle = policy::idle(view.phase, view.queued);
                Some(ModelStatus {
                    name: view.name.clone(),
                    state: entry.state(now),
                    device,
                    pid: entry.pid(),
                    device_bytes,
                    queued: view.queued as u32,
                    in_flight: match view.phase {
                        policy::Phase::Ready { in_flight }
                        | policy::Phase::Draining { in_flight } => in_flight,
                        _ => 0,
                    },
                    idle_ms: entry.idle_for(now).filter(|_| idle).map(ms),
                    unload_in_ms: policy::unload_in(&view, now).map(ms),
                    keep_alive: view.keep_alive,
                    loads: entry.history.loads,
                    last_load_ms: entry.history.last_load_ms,
                    last_error: entry.history.last_error.clone(),
                    vram_need: need.map_or(0, |n| n.bytes),
                    vram_need_source: need.map_or("unknown", |n| n.source.describe()).to_owned(),
                    last_unload: entry.history.last_unload.clone(),
                })
            })
            .collect()
    }
}
