//! Every decision of gpuctld's model life cycles, as pure functions over a
//! snapshot ([`ModelView`]s, [`crate::arbitration`]'s device views) and
//! the clock reading they are given: unit-tested without processes, clocks
//! or GPUs. The registry builds the snapshot, asks, and carries out the
//! answer.
//!
//! | decision | where |
//! | --- | --- |
//! | may a model load now; whom to evict (groups, LRU cap) | [`admission`] |
//! | which idle models expire, when, and the keep-alive in force | [`expiry`] |
//! | how long a failing model backs off; the retry window | [`backoff`] |
//! | queue full; the load-wait deadline | [`gates`] |
//! | which models with waiters take work, refuse it, or load | [`pump`] |
//! | what a reload means for each model | [`reload`] |
//! | a worker's threads and slots; a model's expected memory need; which waiting clients hear their place | [`resources`] |
//! | who caused memory pressure | [`pressure`] |
//! | where a load fits on the GPUs; what yields under pressure | [`crate::arbitration`] |

mod admission;
mod backoff;
mod expiry;
mod gates;
mod pressure;
mod pump;
mod reload;
mod resources;

use std::time::Instant;

use gpuctl_protocol::KeepAlive;

pub use admission::{admit, group_barrier, Admission};
pub use backoff::{retry_backoff, retry_in, retry_later, Failure, MAX_RETRY};
pub use expiry::{expired, idle_deadline, keep_alive, next_expiry, unload_in};
pub use gates::{load_wait_over, queue_full};
pub use gpuctl_protocol::UnloadReason;
pub use pressure::pressure_holder;
pub use pump::{plan_pump, Candidate, Refusal, Step, Waiting};
pub use reload::{reload_changes, ModelChange};
pub use resources::{
    first_place_told, need, short_jobs, tile_batch, worker_slots, worker_threads, Need, NeedSource,
    QUEUE_NEWS_MS, RECENT_JOBS, SHORT_JOB_MS,
};

/// Where a model is in its life cycle, as far as policy cares: the one
/// derivation of a model's state, from which its status is shown too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not resident.
    Unloaded,
    /// Admitted, waiting for GPU memory: it holds its place under the cap.
    WaitingForVram,
    /// A worker is starting and loading it.
    Loading,
    /// Resident; `in_flight` jobs running.
    Ready { in_flight: u32 },
    /// Its worker has been told to exit and still runs `in_flight` jobs.
    Draining { in_flight: u32 },
    /// Its worker has been told to exit and runs nothing.
    Unloading,
}

impl Phase {
    /// Whether it occupies a place among `max_loaded` resident models.
    pub fn resident(self) -> bool {
        !matches!(self, Phase::Unloaded)
    }

    /// Whether its worker is on its way out.
    pub fn leaving(self) -> bool {
        matches!(self, Phase::Draining { .. } | Phase::Unloading)
    }
}

/// The one definition of idle: ready, nothing running, nobody waiting. Only
/// idle models may be taken away without hurting a client, and only they
/// count down their keep-alive.
pub fn idle(phase: Phase, queued: usize) -> bool {
    phase == Phase::Ready { in_flight: 0 } && queued == 0
}

/// One model as policy sees it.
#[derive(Debug, Clone)]
pub struct ModelView {
    pub name: String,
    pub phase: Phase,
    /// Requests waiting for this model.
    pub queued: usize,
    /// When the longest-waiting of them arrived.
    pub oldest_waiter: Option<Instant>,
    /// When its last job ended (or it finished loading); `None` while not
    /// ready.
    pub last_used: Option<Instant>,
    pub keep_alive: KeepAlive,
    pub pin: bool,
    pub group: Option<String>,
}

impl ModelView {
    fn idle(&self) -> bool {
        idle(self.phase, self.queued)
    }
}

/// What the policy modules' tests share: a clock reading, a model view.
#[cfg(test)]
mod testing {
    use std::time::{Duration, Instant};

    use gpuctl_protocol::KeepAlive;

    use super::{ModelView, Phase};

    pub const IDLE: Phase = Phase::Ready { in_flight: 0 };

    pub fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    /// A model with a five-minute keep-alive, no waiters, no pin, no group.
    pub fn model(name: &str, phase: Phase, last_used: Instant) -> ModelView {
        ModelView {
            name: name.into(),
            phase,
            queued: 0,
            oldest_waiter: None,
            last_used: Some(last_used),
            keep_alive: KeepAlive::Millis(300_000),
            pin: false,
            group: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_model_with_nothing_to_do_is_idle() {
        assert!(idle(Phase::Ready { in_flight: 0 }, 0));
        assert!(!idle(Phase::Ready { in_flight: 0 }, 1));
        assert!(!idle(Phase::Ready { in_flight: 1 }, 0));
        for phase in [
            Phase::Unloaded,
            Phase::WaitingForVram,
            Phase::Loading,
            Phase::Draining { in_flight: 0 },
            Phase::Unloading,
        ] {
            assert!(!idle(phase, 0), "{phase:?}");
        }
    }

    #[test]
    fn a_load_waiting_for_memory_holds_its_place_and_a_leaving_one_too() {
        assert!(Phase::WaitingForVram.resident());
        assert!(Phase::Unloading.resident() && Phase::Unloading.leaving());
        assert!(Phase::Draining { in_flight: 2 }.leaving());
        assert!(!Phase::Unloaded.resident());
        assert!(!Phase::Ready { in_flight: 0 }.leaving());
    }
}
