//! Reloading the configuration: read, validate, swap; then what the
//! difference means for each model (policy decides, this carries it out).

use std::sync::Arc;
use std::time::SystemTime;

use gpuctl_protocol::{
    ConfigStatus, Error, ErrorCode, NoticeKind, ReloadOutcome, ReloadResponse, ReloadTrigger,
};

use super::entry::{FileIdentity, Life, ModelEntry};
use super::queue::fail_all;
use super::{unix_ms, Registry};
use crate::config::{Config, ConfigSource};
use crate::notify;
use crate::policy::{self, ModelChange, UnloadReason};

impl Registry {
    pub(super) fn config_status(&self) -> ConfigStatus {
        ConfigStatus {
            path: self.source.path().map(|p| p.display().to_string()),
            generation: self.generation,
            applied_at_unix_ms: unix_ms(self.applied_at),
            last_reload: self.last_reload.clone(),
        }
    }

    /// Reads, validates and swaps; a bad file leaves the running config alone.
    pub(super) async fn reload(&mut self, trigger: ReloadTrigger) -> Result<ReloadResponse, Error> {
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
        // The files are read off the registry's task; so are the model files' identities.
        let loaded = tokio::task::spawn_blocking(move || {
            source.load().map(|config| {
                let files = model_files(&config);
                (config, files)
            })
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorCode::Internal,
                format!("reading the configuration failed: {e}"),
            )
        })?;
        let (config, files) =
            loaded.map_err(|e| Error::new(ErrorCode::InvalidConfig, e.to_string()))?;
        let old = self.config();
        let changed = *old != config;
        let models = config.models.len() as u32;
        self.published.send_replace(Arc::new(config));
        self.generation += 1;
        self.applied_at = SystemTime::now();
        self.apply_model_changes(&old, files);
        Ok(ReloadResponse {
            generation: self.generation,
            changed,
            models,
        })
    }

    /// After a reload: new models appear; removed, changed and replaced
    /// ones are unloaded once their work is done, and the next request
    /// loads the new version. `files`: each model's file as it is now.
    fn apply_model_changes(&mut self, old: &Config, files: Vec<(String, Option<FileIdentity>)>) {
        let new = self.config();
        let files: std::collections::HashMap<String, Option<FileIdentity>> =
            files.into_iter().collect();
        let file_replaced = |name: &str| {
            let loaded = self.models.get(name).and_then(|e| e.history.loaded_file);
            let now = files.get(name).copied().flatten();
            loaded.is_some() && loaded != now
        };
        let changes = policy::reload_changes(old, &new, &file_replaced);
        for (name, entry) in self.models.iter_mut() {
            if let Some(seen) = files.get(name) {
                entry.history.seen_file = *seen;
            }
        }
        for (name, change) in changes {
            tracing::info!(model = %name, ?change, "configuration change");
            match change {
                ModelChange::Added => {
                    let seen = files.get(&name).copied().flatten();
                    self.models
                        .entry(name)
                        .or_insert_with(|| ModelEntry::new(seen));
                }
                ModelChange::Removed | ModelChange::Changed | ModelChange::FileReplaced => {
                    self.unload(&name, UnloadReason::Reload, false);
                    if let Some(entry) = self.models.get_mut(&name) {
                        if change == ModelChange::Removed {
                            let error = Error::new(
                                ErrorCode::NotFound,
                                format!("model {name} was removed from the configuration"),
                            );
                            fail_all(&mut entry.queue, &error);
                        }
                        // A new file or new settings deserve a new attempt.
                        if let Life::Unloaded { retry_at } = &mut entry.life {
                            *retry_at = None;
                        }
                        entry.history.failures = 0;
                    }
                }
            }
        }
        // A removed model stays listed until its worker is gone.
        self.models.retain(|name, entry| {
            new.models.contains_key(name)
                || !matches!(
                    entry.life,
                    Life::Unloaded { .. } | Life::WaitingForVram { .. }
                )
        });
        self.pump_all();
    }
}

/// Each configured model's file as it is on disk now.
pub(super) fn model_files(config: &Config) -> Vec<(String, Option<FileIdentity>)> {
    config
        .models
        .iter()
        .map(|(name, model)| {
            let file = config.model_path(model);
            (name.clone(), file.as_deref().and_then(FileIdentity::of))
        })
        .collect()
}
