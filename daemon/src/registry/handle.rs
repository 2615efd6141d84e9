//! The registry's handle: what the rest of the daemon may ask of it, as
//! commands over a channel, each answered on its own oneshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gpuctl_protocol::{
    ConfigStatus, Error, ErrorCode, GenerateResponse, KeepAlive, LoadResponse, ModelStatus, Notice,
    ReleaseResponse, ReloadResponse, ReloadTrigger, ReserveRequest, ReserveResponse,
    UnloadResponse, VramResponse,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::{Event, PreparedJob};
use crate::config::Config;
use crate::outbox::EventSink;

pub(super) enum Command {
    ConfigStatus {
        reply: oneshot::Sender<ConfigStatus>,
    },
    Reload {
        trigger: ReloadTrigger,
        reply: Option<oneshot::Sender<Result<ReloadResponse, Error>>>,
    },
    Run {
        job: PreparedJob,
        /// Its number, daemon-wide: what its client's departure names.
        ticket: u64,
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
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) config: watch::Receiver<Arc<Config>>,
    pub(super) notices: broadcast::Sender<Notice>,
    /// Where a caller that stops waiting for its job says so.
    pub(super) departures: mpsc::UnboundedSender<Event>,
    pub(super) tickets: Arc<AtomicU64>,
}

/// Tells the registry that a job's caller stopped waiting (its client
/// disconnected, cancelled or timed out) unless it was answered first: a
/// queued job leaves the queue at once, a running one is stopped.
struct Departure<'a> {
    departures: &'a mpsc::UnboundedSender<Event>,
    /// `None` once answered.
    model: Option<String>,
    ticket: u64,
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        if let Some(model) = self.model.take() {
            let _ = self.departures.send(Event::Departed {
                model,
                ticket: self.ticket,
            });
        }
    }
}

impl RegistryHandle {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Each configuration as it comes into force.
    pub fn config_changes(&self) -> watch::Receiver<Arc<Config>> {
        self.config.clone()
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
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let mut departure = Departure {
            departures: &self.departures,
            model: Some(job.model.clone()),
            ticket,
        };
        let answer = self.ask(|reply| Command::Run { job, ticket, reply }).await;
        departure.model = None;
        answer?
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
