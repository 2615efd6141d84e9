//! One configured model inside the registry: its life cycle as one enum
//! whose variants carry what belongs to them, the requests waiting for it,
//! and what it has been through. Its state, as policy and `gpuctl status`
//! see it, is derived here and nowhere else.
//!
//! ```text
//! Unloaded ──request──▶ WaitingForVram ──fits──▶ Loading ──ok──▶ Ready
//!    ▲  │                    │ load_wait            │ failed     │ idle timeout, LRU,
//!    │  └──request (no GPU)──┼──────────────────────▶ (backoff)  │ group, pressure,
//!    │                       ▼                      ▼            ▼ reload, unload
//!    └──────────────────── Unloaded ◀──exited── Unloading ◀── (Draining while jobs run)
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use gpuctl_protocol::{Error, KeepAlive, ModelState};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::queue::{self, Waiter};
use crate::policy::{self, Phase, UnloadReason};
use crate::worker::WorkerHandle;

/// A model's life cycle.
pub enum Life {
    /// Not resident. After failures it backs off: requests before
    /// `retry_at` fail at once.
    Unloaded { retry_at: Option<Instant> },
    /// Admitted under the cap, waiting for GPU memory (`gpu.load_wait`).
    WaitingForVram {
        since: Instant,
        /// What its clients were last told they wait for.
        told: Option<String>,
    },
    /// Its worker is starting and loading it.
    Loading {
        since: Instant,
        /// The GPU arbitration put it on; `None` when not arbitrated.
        placement: Option<u32>,
        /// Stops the load (`unload --force`).
        kill: CancellationToken,
        /// Unload it as soon as it is loaded.
        then: Option<PendingUnload>,
    },
    /// Resident and serving.
    Ready {
        worker: WorkerHandle,
        placement: Option<u32>,
        /// GPU bytes its worker holds, as last measured.
        held: u64,
        in_flight: u32,
        /// Waiters older than this waited for the load and are told how
        /// long it took.
        loaded_at: Instant,
        /// When its last job ended (or it finished loading).
        last_used: Instant,
        /// Under pressure: unload it once its in-flight work ends, and
        /// start nothing new meanwhile.
        yield_after_work: Option<UnloadReason>,
    },
    /// Its worker has been told to exit; it finishes `in_flight` jobs first
    /// (draining) unless killed.
    Unloading {
        pid: u32,
        /// Ends the worker at once, whatever it is doing.
        kill: CancellationToken,
        /// Stops a job whose client has gone while it drains.
        jobs: crate::worker::Canceller,
        placement: Option<u32>,
        held: u64,
        in_flight: u32,
        reason: UnloadReason,
        /// When the unload was decided.
        since: Instant,
        /// Told when the worker has exited.
        waiters: Vec<oneshot::Sender<()>>,
    },
}

/// An unload asked for while the model was loading.
pub struct PendingUnload {
    pub reason: UnloadReason,
    /// Told when the worker has exited (or the load ended).
    pub waiters: Vec<oneshot::Sender<()>>,
}

impl PendingUnload {
    pub fn notify(self) {
        for waiter in self.waiters {
            let _ = waiter.send(());
        }
    }
}

/// A model file's version: its modification time and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub modified: SystemTime,
    pub bytes: u64,
}

impl FileIdentity {
    /// Reads it from disk; `None` when the file cannot be read.
    pub fn of(path: &std::path::Path) -> Option<FileIdentity> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileIdentity {
            modified: meta.modified().ok()?,
            bytes: meta.len(),
        })
    }
}

/// What a model has been through, whatever its state now.
#[derive(Default)]
pub struct History {
    pub loads: u64,
    pub last_load_ms: Option<u64>,
    /// How long its last few successful jobs took in the worker (the
    /// newest last): whether its jobs are short enough to be sent ahead.
    pub recent_run_ms: Vec<u64>,
    pub last_error: Option<String>,
    /// Consecutive failures (failed loads, crashes); a job that succeeds
    /// resets it. Decides the backoff.
    pub failures: u32,
    pub last_unload: Option<UnloadReason>,
    /// The most its workers have held: the need used for admission.
    pub measured: Option<u64>,
    /// The file as it was when last loaded (the reload diff and the
    /// measurement are keyed by it).
    pub loaded_file: Option<FileIdentity>,
    /// The file as last seen on disk (at a reload or before a load): the
    /// need estimate reads this instead of the disk.
    pub seen_file: Option<FileIdentity>,
}

/// One configured model's state.
pub struct ModelEntry {
    pub life: Life,
    pub queue: VecDeque<Waiter>,
    /// Set by a request's keep-alive; otherwise the config decides.
    pub keep_alive: Option<KeepAlive>,
    /// Numbers each load, so events of an older worker are recognised.
    pub load: u64,
    pub history: History,
}

impl ModelEntry {
    pub fn new(seen_file: Option<FileIdentity>) -> ModelEntry {
        ModelEntry {
            life: Life::Unloaded { retry_at: None },
            queue: VecDeque::new(),
            keep_alive: None,
            load: 0,
            history: History {
                seen_file,
                ..History::default()
            },
        }
    }

    /// The one derivation of where it is in its life cycle.
    pub fn phase(&self) -> Phase {
        match &self.life {
            Life::Unloaded { .. } => Phase::Unloaded,
            Life::WaitingForVram { .. } => Phase::WaitingForVram,
            Life::Loading { .. } => Phase::Loading,
            Life::Ready { in_flight, .. } => Phase::Ready {
                in_flight: *in_flight,
            },
            Life::Unloading { in_flight: 0, .. } => Phase::Unloading,
            Life::Unloading { in_flight, .. } => Phase::Draining {
                in_flight: *in_flight,
            },
        }
    }

    /// Its state for `gpuctl status`: the phase, and the retry window of a
    /// model that backs off.
    pub fn state(&self, now: Instant) -> ModelState {
        match self.phase() {
            Phase::Unloaded => match policy::retry_in(self.retry_at(), now) {
                Some(left) => ModelState::Failed {
                    retry_in_ms: left.as_millis() as u64,
                },
                None => ModelState::Unloaded,
            },
            Phase::WaitingForVram => ModelState::WaitingForVram,
            Phase::Loading => ModelState::Loading,
            Phase::Ready { .. } => ModelState::Ready,
            Phase::Draining { .. } => ModelState::Draining,
            Phase::Unloading => ModelState::Unloading,
        }
    }

    /// Ready, nothing running, nobody waiting.
    pub fn idle(&self) -> bool {
        policy::idle(self.phase(), self.queue.len())
    }

    pub fn retry_at(&self) -> Option<Instant> {
        match self.life {
            Life::Unloaded { retry_at } => retry_at,
            _ => None,
        }
    }

    /// The worker's pid while it is running.
    pub fn pid(&self) -> Option<u32> {
        match &self.life {
            Life::Ready { worker, .. } => Some(worker.pid),
            Life::Unloading { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// The GPU its worker is on (or loads on), as arbitration counts it.
    pub fn placement(&self) -> Option<u32> {
        match &self.life {
            Life::Loading { placement, .. }
            | Life::Ready { placement, .. }
            | Life::Unloading { placement, .. } => *placement,
            _ => None,
        }
    }

    /// GPU bytes its worker holds, as last measured.
    pub fn held(&self) -> u64 {
        match &self.life {
            Life::Ready { held, .. } | Life::Unloading { held, .. } => *held,
            _ => 0,
        }
    }

    /// When its last job ended, while it is ready.
    pub fn last_used(&self) -> Option<Instant> {
        match &self.life {
            Life::Ready { last_used, .. } => Some(*last_used),
            _ => None,
        }
    }

    /// The device bytes its worker reported at load.
    pub fn reported_bytes(&self) -> u64 {
        match &self.life {
            Life::Ready { worker, .. } => worker.loaded.device_bytes,
            _ => 0,
        }
    }

    /// The size of its file when it was last loaded.
    pub fn loaded_file_bytes(&self) -> u64 {
        self.history.loaded_file.map_or(0, |f| f.bytes)
    }

    /// The size of its file as last seen on disk.
    pub fn seen_file_bytes(&self) -> u64 {
        self.history.seen_file.map_or(0, |f| f.bytes)
    }

    /// Fails every waiting request with `error`.
    pub fn fail_waiters(&mut self, error: &Error) {
        queue::fail_all(&mut self.queue, error);
    }

    /// A job of its current worker has ended.
    /// A job has left its worker: `run_ms` when it succeeded.
    pub fn job_done(&mut self, run_ms: Option<u64>) {
        if let Some(run_ms) = run_ms {
            self.history.failures = 0;
            let recent = &mut self.history.recent_run_ms;
            if recent.len() == crate::policy::RECENT_JOBS {
                recent.remove(0);
            }
            recent.push(run_ms);
        }
        match &mut self.life {
            Life::Ready {
                in_flight,
                last_used,
                ..
            } => {
                *in_flight = in_flight.saturating_sub(1);
                *last_used = Instant::now();
            }
            Life::Unloading { in_flight, .. } => *in_flight = in_flight.saturating_sub(1),
            _ => {}
        }
    }

    /// How long ago it was last used, while it is ready.
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        self.last_used().map(|at| now.saturating_duration_since(at))
    }
}
