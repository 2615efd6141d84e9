//! The one owner of the daemon's state: the configuration in force and
//! every model's life cycle. Everything else sends it commands and awaits
//! replies; the configuration is also published read-only through a
//! `watch` channel. Decisions come from [`crate::policy`]; this module
//! carries them out. daemon/README.md ("Architecture") draws the whole.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `mod.rs` | the registry's state, its start, its loop, its events |
//! | `handle.rs` | the handle others hold, and the commands it sends |
//! | `entry.rs` | one model: its life-cycle enum, queue, history; its state derived |
//! | `queue.rs` | waiting requests and how they are answered |
//! | `jobs.rs` | queueing requests, handing them to a worker, answering |
//! | `loading.rs` | admitting a load, starting a worker, recording the outcome |
//! | `unloading.rs` | ending a worker, and what follows its exit |
//! | `status.rs` | the snapshot policy decides on; `Status`'s model list |
//! | `reload.rs` | reloading the configuration and applying the difference |
//! | `sampling.rs` | sampling the GPUs, measuring workers, verifying unloads |
//! | `memory.rs` | what the GPUs look like to arbitration: needs, devices, residents, holders |
//! | `waiting_loads.rs` | loads waiting for GPU memory |
//! | `pressure.rs` | yielding to other programs |
//! | `reservations.rs` | memory kept free for other programs |
//! | `vram.rs` | the `Vram` request |

mod entry;
mod handle;
mod jobs;
mod loading;
mod memory;
mod pressure;
mod queue;
mod reload;
mod reservations;
mod sampling;
mod status;
mod unloading;
mod vram;
mod waiting_loads;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use gpuctl_protocol::worker::Job;
use gpuctl_protocol::{Error, ErrorCode, KeepAlive, Notice, NoticeKind, ReloadOutcome};
use tokio::sync::{broadcast, mpsc, watch};

use crate::config::{Config, ConfigSource, Loaded};
use crate::gpu::DeviceSample;
use crate::measurements::{self, Measurements};
use crate::outbox::EventSink;
use crate::worker::{Exit, WorkerHandle};
use entry::ModelEntry;
use handle::Command;
pub use handle::RegistryHandle;
use reservations::Reservation;
use sampling::GpuState;

/// Notices kept for a watcher that falls behind before it misses some.
const NOTICE_BACKLOG: usize = 256;

/// A job ready for a worker, prepared (validated, noise made) by its handler.
pub struct PreparedJob {
    pub model: String,
    pub job: Job,
    pub seed: Option<u64>,
    pub keep_alive: Option<KeepAlive>,
    /// Where queue-position events go.
    pub events: Option<EventSink>,
}

/// What load and job tasks report back.
pub enum Event {
    Loaded {
        model: String,
        load: u64,
        result: Result<WorkerHandle, Error>,
    },
    JobDone {
        model: String,
        load: u64,
        /// How long it ran, when it succeeded.
        run_ms: Option<u64>,
    },
    Exited {
        model: String,
        load: u64,
        exit: Exit,
    },
    /// A job its worker (`load`) went without starting, to wait again.
    Requeue {
        model: String,
        load: u64,
        waiter: queue::Waiter,
    },
    /// A GPU sample, taken on a blocking thread.
    Sampled(Result<Vec<DeviceSample>, String>),
    /// The client of a waiting request has gone (disconnected, cancelled,
    /// timed out): it leaves the queue at once.
    Departed { model: String, ticket: u64 },
}

/// The error for a model name that is not configured, listing those that are.
pub fn not_found(model: &str, config: &Config) -> Error {
    let known: Vec<&str> = config.models.keys().map(String::as_str).collect();
    let known = if known.is_empty() {
        "none is configured".to_owned()
    } else {
        format!("configured: {}", known.join(", "))
    };
    Error::new(
        ErrorCode::NotFound,
        format!("no model named {model:?} ({known})"),
    )
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Registry {
    source: ConfigSource,
    published: watch::Sender<Arc<Config>>,
    generation: u64,
    applied_at: SystemTime,
    last_reload: Option<ReloadOutcome>,
    /// The digests of the file's text in force and of the last text that
    /// failed, so that a save seen by the file watcher reloads once.
    digests: reload::Digests,
    models: BTreeMap<String, ModelEntry>,
    worker_program: PathBuf,
    events: mpsc::UnboundedSender<Event>,
    /// What the GPUs look like and what is being done about it.
    gpu: GpuState,
    reservations: BTreeMap<u64, Reservation>,
    next_reservation: u64,
    /// To send itself commands from tasks it spawns; weak, so the registry
    /// still ends when every handle is gone.
    commands: mpsc::WeakSender<Command>,
    notices: broadcast::Sender<Notice>,
    state_dir: Option<PathBuf>,
    measured: Measurements,
    /// Models to pump once the events already received are handled.
    pump_due: Vec<String>,
}

/// Starts the registry with the configuration loaded at start-up. It runs
/// until every handle is dropped.
pub fn spawn(source: ConfigSource, loaded: Loaded) -> RegistryHandle {
    let Loaded { config, digest } = loaded;
    let worker_program = crate::worker::worker_program(&config.daemon.worker);
    let (probe, probe_reason) = crate::gpu::choose(&config.gpu);
    tracing::info!(backend = probe.backend(), reason = %probe_reason, "gpu probe");
    let state_dir = measurements::locate(&config.daemon.state_dir);
    let measured = state_dir
        .as_deref()
        .map(measurements::load)
        .unwrap_or_default();
    tracing::debug!(state_dir = ?state_dir, measured = measured.models.len(), "state");
    let models = reload::model_files(&config)
        .into_iter()
        .map(|(name, seen)| (name, ModelEntry::new(seen)))
        .collect();
    let (published, receiver) = watch::channel(Arc::new(config));
    let (commands, inbox) = mpsc::channel(64);
    let (events, event_inbox) = mpsc::unbounded_channel();
    let (notices, _) = broadcast::channel(NOTICE_BACKLOG);
    let registry = Registry {
        source: source.clone(),
        published,
        generation: 1,
        applied_at: SystemTime::now(),
        last_reload: None,
        digests: reload::Digests::at_start(digest),
        models,
        worker_program,
        events,
        gpu: GpuState::new(probe, probe_reason),
        reservations: BTreeMap::new(),
        next_reservation: 1,
        commands: commands.downgrade(),
        notices: notices.clone(),
        state_dir,
        measured,
        pump_due: Vec::new(),
    };
    let departures = registry.events.clone();
    tokio::spawn(registry.run(inbox, event_inbox));
    RegistryHandle {
        commands,
        config: receiver,
        notices,
        departures,
        tickets: Arc::new(std::sync::atomic::AtomicU64::new(1)),
    }
}

impl Registry {
    fn config(&self) -> Arc<Config> {
        self.published.borrow().clone()
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        self.preload();
        loop {
            let expiry = self.next_expiry();
            let poll = self.next_poll();
            tokio::select! {
                // Events first: a job's end is told before its client is
                // answered, so a client's next request never finds the
                // last one still counted as running (queue_max).
                biased;
                Some(event) = events.recv() => {
                    self.on_event(event);
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event);
                    }
                    let due = std::mem::take(&mut self.pump_due);
                    if !due.is_empty() {
                        self.pump_first(due);
                    }
                }
                command = inbox.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                _ = sleep_until(expiry) => self.expire_idle(),
                _ = sleep_until(poll) => self.request_sample(),
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::ConfigStatus { reply } => {
                let _ = reply.send(self.config_status());
            }
            Command::Reload { trigger, reply } => {
                let outcome = self.reload(trigger).await;
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
            Command::Run { job, ticket, reply } => self.submit_job(job, ticket, reply),
            Command::Load {
                model,
                keep_alive,
                reply,
            } => self.submit_load(model, keep_alive, reply),
            Command::Unload {
                model,
                force,
                reply,
            } => self.unload_request(model, force, reply),
            Command::ModelStatus { reply } => {
                let _ = reply.send(self.model_status());
            }
            Command::Vram { reply } => self.vram(reply),
            Command::Reserve {
                request,
                pid,
                connection,
                reply,
            } => self.reserve(request, pid, connection, reply),
            Command::Release {
                reservation,
                why,
                connection,
                reply,
            } => {
                let released = self.release(reservation, why, connection.as_ref());
                if let Some(reply) = reply {
                    let _ = reply.send(released);
                }
            }
        }
    }
}

impl Registry {
    fn on_event(&mut self, event: Event) {
        match event {
            Event::Loaded {
                model,
                load,
                result,
            } => self.on_loaded(&model, load, result),
            Event::JobDone {
                model,
                load,
                run_ms,
            } => self.on_job_done(&model, load, run_ms),
            Event::Exited { model, load, exit } => self.on_exited(&model, load, exit),
            Event::Sampled(sample) => self.on_sampled(sample),
            Event::Departed { model, ticket } => self.on_departed(&model, ticket),
            Event::Requeue {
                model,
                load,
                waiter,
            } => self.on_requeue(&model, load, waiter),
        }
    }

    /// Logs nothing (the caller has), and tells every watcher.
    fn notice(&self, what: NoticeKind) {
        let _ = self.notices.send(Notice {
            at_unix_ms: unix_ms(SystemTime::now()),
            what,
        });
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
