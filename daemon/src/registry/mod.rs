//! The one owner of the daemon's state: the configuration in force and
//! every model's life cycle. Everything else sends it commands and awaits
//! replies; the configuration is also published read-only through a
//! `watch` channel. Decisions come from [`crate::policy`]; this module
//! carries them out.

mod admission;
mod gpu;
mod models;
mod pressure;
mod reservations;
mod vram;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use gpuctl_protocol::worker::Job;
use gpuctl_protocol::{
    ConfigStatus, Error, ErrorCode, GenerateResponse, KeepAlive, LoadResponse, ModelStatus, Notice,
    NoticeKind, ReleaseResponse, ReloadOutcome, ReloadResponse, ReloadTrigger, ReserveRequest,
    ReserveResponse, UnloadResponse, VramResponse,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::{Config, ConfigSource};
use crate::context::EventSink;
use crate::{notify, state};
use gpu::GpuState;
pub use models::not_found;
use models::{Event, ModelEntry};
use reservations::Reservation;

/// Notices kept for a watcher that falls behind before it misses some.
const NOTICE_BACKLOG: usize = 256;

/// A job ready for a worker, prepared (validated, noise made) by its handler.
pub struct PreparedJob {
    pub model: String,
    pub job: Job,
    pub seed: Option<u64>,
    pub keep_alive: Option<KeepAlive>,
    /// Where queue-position events go.
    pub events: Option<crate::context::EventSink>,
}

enum Command {
    ConfigStatus {
        reply: oneshot::Sender<ConfigStatus>,
    },
    Reload {
        trigger: ReloadTrigger,
        reply: Option<oneshot::Sender<Result<ReloadResponse, Error>>>,
    },
    Run {
        job: PreparedJob,
        reply: oneshot::Sender<Result<GenerateResponse, Error>>,
    },
    Load {
        model: String,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<LoadResponse, Error>>,
    },
    Unload {
        model: Option<String>,
        force: bool,
        reply: oneshot::Sender<Result<UnloadResponse, Error>>,
    },
    ModelStatus {
        reply: oneshot::Sender<Vec<ModelStatus>>,
    },
    Vram {
        reply: oneshot::Sender<Result<VramResponse, Error>>,
    },
    Reserve {
        request: ReserveRequest,
        pid: Option<u32>,
        connection: EventSink,
        reply: oneshot::Sender<Result<ReserveResponse, Error>>,
    },
    Release {
        reservation: u64,
        why: &'static str,
        /// The connection asking, which must be the one that reserved;
        /// `None` for the daemon's own releases (connection closed, ttl).
        connection: Option<EventSink>,
        reply: Option<oneshot::Sender<Result<ReleaseResponse, Error>>>,
    },
}

/// A handle to the registry task; cheap to clone.
#[derive(Clone)]
pub struct RegistryHandle {
    commands: mpsc::Sender<Command>,
    config: watch::Receiver<Arc<Config>>,
    notices: broadcast::Sender<Notice>,
}

impl RegistryHandle {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Which configuration is in force and how the last reload went.
    pub async fn config_status(&self) -> Result<ConfigStatus, Error> {
        self.ask(|reply| Command::ConfigStatus { reply }).await
    }

    /// GPU memory: devices, our models, other programs.
    pub async fn vram(&self) -> Result<VramResponse, Error> {
        self.ask(|reply| Command::Vram { reply }).await?
    }

    /// Keeps memory free for another program until the connection closes,
    /// `Release`, or the ttl; answers once granted.
    pub async fn reserve(
        &self,
        request: ReserveRequest,
        pid: Option<u32>,
        connection: EventSink,
    ) -> Result<ReserveResponse, Error> {
        self.ask(|reply| Command::Reserve {
            request,
            pid,
            connection,
            reply,
        })
        .await?
    }

    /// Ends a reservation made on `connection`.
    pub async fn release(
        &self,
        reservation: u64,
        connection: EventSink,
    ) -> Result<ReleaseResponse, Error> {
        self.ask(|reply| Command::Release {
            reservation,
            why: "released",
            connection: Some(connection),
            reply: Some(reply),
        })
        .await?
    }

    /// Every notice from now on (loads, unloads, pressure, …).
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Every configured model's state.
    pub async fn model_status(&self) -> Result<Vec<ModelStatus>, Error> {
        self.ask(|reply| Command::ModelStatus { reply }).await
    }

    /// Re-reads the configuration and waits for the outcome.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<ReloadResponse, Error> {
        self.ask(|reply| Command::Reload {
            trigger,
            reply: Some(reply),
        })
        .await?
    }

    /// Asks for a reload without waiting (SIGHUP): the outcome is logged
    /// and shown by `Status`.
    pub fn request_reload(&self, trigger: ReloadTrigger) {
        if self
            .commands
            .try_send(Command::Reload {
                trigger,
                reply: None,
            })
            .is_err()
        {
            tracing::warn!("registry busy; reload request dropped");
        }
    }

    /// Runs a job, loading its model first if needed.
    pub async fn run(&self, job: PreparedJob) -> Result<GenerateResponse, Error> {
        self.ask(|reply| Command::Run { job, reply }).await?
    }

    /// Loads a model now.
    pub async fn load(
        &self,
        model: String,
        keep_alive: Option<KeepAlive>,
    ) -> Result<LoadResponse, Error> {
        self.ask(|reply| Command::Load {
            model,
            keep_alive,
            reply,
        })
        .await?
    }

    /// Unloads one model or all, once their work is done (or at once with `force`).
    pub async fn unload(
        &self,
        model: Option<String>,
        force: bool,
    ) -> Result<UnloadResponse, Error> {
        self.ask(|reply| Command::Unload {
            model,
            force,
            reply,
        })
        .await?
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }
}

fn gone() -> Error {
    Error::new(ErrorCode::ShuttingDown, "gpuctld is shutting down")
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
    measured: state::State,
}

/// Starts the registry with the configuration loaded at start-up. It runs
/// until every handle is dropped.
pub fn spawn(source: ConfigSource, config: Config) -> RegistryHandle {
    let worker_program = crate::worker::worker_program(&config.daemon.worker);
    let (probe, probe_reason) = crate::gpu::choose(&config.gpu);
    tracing::info!(backend = probe.backend(), reason = %probe_reason, "gpu probe");
    let state_dir = state::locate(&config.daemon.state_dir);
    let measured = state_dir.as_deref().map(state::load).unwrap_or_default();
    tracing::debug!(state_dir = ?state_dir, measured = measured.models.len(), "state");
    let models = config
        .models
        .keys()
        .map(|name| (name.clone(), ModelEntry::new()))
        .collect();
    let (published, receiver) = watch::channel(Arc::new(config));
    let (commands, inbox) = mpsc::channel(64);
    let (events, event_inbox) = mpsc::unbounded_channel();
    let (notices, _) = broadcast::channel(NOTICE_BACKLOG);
    let registry = Registry {
        source,
        published,
        generation: 1,
        applied_at: SystemTime::now(),
        last_reload: None,
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
    };
    tokio::spawn(registry.run(inbox, event_inbox));
    RegistryHandle {
        commands,
        config: receiver,
        notices,
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
                command = inbox.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                Some(event) = events.recv() => self.on_event(event),
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
            Command::Run { job, reply } => self.submit_job(job, reply),
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

    fn config_status(&self) -> ConfigStatus {
        ConfigStatus {
            path: self.source.path().map(|p| p.display().to_string()),
            generation: self.generation,
            applied_at_unix_ms: unix_ms(self.applied_at),
            last_reload: self.last_reload.clone(),
        }
    }

    /// Reads, validates and swaps; a bad file leaves the running config alone.
    async fn reload(&mut self, trigger: ReloadTrigger) -> Result<ReloadResponse, Error> {
        notify::reloading();
        let result = self.read_and_apply().await;
        let at_unix_ms = unix_ms(SystemTime::now());
        match &result {
            Ok(applied) => {
                tracing::info!(
                    ?trigger,
                    generation = applied.generation,
                    changed = applied.changed,
                    models = applied.models,
                    "configuration reloaded"
                );
                notify::ready(&format!("config generation {} applied", applied.generation));
            }
            Err(error) => {
                tracing::error!(?trigger, error = %error.message, generation = self.generation, "reload failed; keeping the running configuration");
                notify::ready(&format!(
                    "reload failed, config generation {} kept: {}",
                    self.generation, error.message
                ));
            }
        }
        let error = result.as_ref().err().map(|e| e.message.clone());
        self.notice(NoticeKind::Reloaded {
            generation: self.generation,
            error: error.clone(),
        });
        self.last_reload = Some(ReloadOutcome {
            at_unix_ms,
            trigger,
            error,
        });
        result
    }

    async fn read_and_apply(&mut self) -> Result<ReloadResponse, Error> {
        if self.source == ConfigSource::Embedded {
            return Err(Error::new(
                ErrorCode::InvalidRequest,
                "gpuctld runs on its embedded default configuration: there is no file to reload (start it with --config FILE)",
            ));
        }
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || source.load())
            .await
            .map_err(|e| {
                Error::new(
                    ErrorCode::Internal,
                    format!("reading the configuration failed: {e}"),
                )
            })?;
        let config = loaded.map_err(|e| Error::new(ErrorCode::InvalidConfig, e.to_string()))?;
        let old = self.config();
        let changed = *old != config;
        let models = config.models.len() as u32;
        self.published.send_replace(Arc::new(config));
        self.generation += 1;
        self.applied_at = SystemTime::now();
        self.apply_model_changes(&old);
        Ok(ReloadResponse {
            generation: self.generation,
            changed,
            models,
        })
    }
}

impl Registry {
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
