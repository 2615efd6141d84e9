//! The one owner of the daemon's state. Everything else sends it commands
//! and awaits replies; the configuration in force is published read-only
//! through a `watch` channel.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use gpuctl_protocol::{
    ConfigStatus, Error, ErrorCode, ReloadOutcome, ReloadResponse, ReloadTrigger,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, ConfigSource};
use crate::notify;

enum Command {
    ConfigStatus {
        reply: oneshot::Sender<ConfigStatus>,
    },
    Reload {
        trigger: ReloadTrigger,
        reply: Option<oneshot::Sender<Result<ReloadResponse, Error>>>,
    },
}

/// A handle to the registry task; cheap to clone.
#[derive(Clone)]
pub struct RegistryHandle {
    commands: mpsc::Sender<Command>,
    config: watch::Receiver<Arc<Config>>,
}

impl RegistryHandle {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Which configuration is in force and how the last reload went.
    pub async fn config_status(&self) -> Result<ConfigStatus, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ConfigStatus { reply }).await?;
        answer.await.map_err(|_| gone())
    }

    /// Re-reads the configuration and waits for the outcome.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<ReloadResponse, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Reload {
            trigger,
            reply: Some(reply),
        })
        .await?;
        answer.await.map_err(|_| gone())?
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

    async fn send(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).await.map_err(|_| gone())
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
}

/// Starts the registry with the configuration loaded at start-up. It runs
/// until every handle is dropped.
pub fn spawn(source: ConfigSource, config: Config) -> RegistryHandle {
    let (published, receiver) = watch::channel(Arc::new(config));
    let (commands, inbox) = mpsc::channel(64);
    let registry = Registry {
        source,
        published,
        generation: 1,
        applied_at: SystemTime::now(),
        last_reload: None,
    };
    tokio::spawn(registry.run(inbox));
    RegistryHandle {
        commands,
        config: receiver,
    }
}

impl Registry {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        while let Some(command) = inbox.recv().await {
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
        let changed = **self.published.borrow() != config;
        let models = config.models.len() as u32;
        self.published.send_replace(Arc::new(config));
        self.generation += 1;
        self.applied_at = SystemTime::now();
        Ok(ReloadResponse {
            generation: self.generation,
            changed,
            models,
        })
    }
}
