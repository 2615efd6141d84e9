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

    /// Reads, validates and swaps; a bad file leaves the running config
    /// alone. A `FileChange` whose text is the one in force (a save of the
    /// same bytes, another file in the folder, a SIGHUP that came first) or
    /// the one that failed last only looks at the models' files.
    pub(super) async fn reload(&mut self, trigger: ReloadTrigger) -> Result<ReloadResponse, Error> {
        if self.source == ConfigSource::Embedded {
            return Err(Error::new(
                ErrorCode::InvalidRequest,
                "gpuctld runs on its embedded default configuration: there is no file to reload (start it with --config FILE)",
            ));
        }
        let saved = trigger == ReloadTrigger::FileChange;
        let read = read(self.source.clone(), saved).await;
        if saved && !self.digests.is_news(read.digest) {
            if let Ok((_, files)) = read.result {
                let config = self.config();
                self.apply_model_changes(&config, files);
            }
            return Ok(ReloadResponse {
                generation: self.generation,
                changed: false,
                models: self.config().models.len() as u32,
            });
        }
        notify::reloading();
        let digest = read.digest;
        let result = read.result.map(|(config, files)| self.apply(config, files));
        let at_unix_ms = unix_ms(SystemTime::now());
        match &result {
            Ok(applied) => {
                self.digests.applied = digest;
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
                self.digests.failed = digest;
                tracing::error!(?trigger, error = %error.message, generation = self.generation, "reload failed; keeping the running configuration");
                notify::ready(&format!(
                    "reload failed, config generation {} kept: {}",
                    self.generation, error.message
                ));
            }
        }
        let error = result.as_ref().err().map(|e| e.message.clone());
        self.notice(NoticeKind::ReloadedBy {
            generation: self.generation,
            trigger,
            error: error.clone(),
        });
        self.last_reload = Some(ReloadOutcome {
            at_unix_ms,
            trigger,
            error,
        });
        result
    }

    /// Swaps in a configuration that was read and validated.
    fn apply(&mut self, config: Config, files: ModelFiles) -> ReloadResponse {
        let old = self.config();
        let changed = *old != config;
        let models = config.models.len() as u32;
        self.published.send_replace(Arc::new(config));
        self.generation += 1;
        self.applied_at = SystemTime::now();
        self.apply_model_changes(&old, files);
        ReloadResponse {
            generation: self.generation,
            changed,
            models,
        }
    }

    /// After a reload: new models appear; removed, changed and replaced
    /// ones are unloaded once their work is done, and the next request
    /// loads the new version. `files`: each model's file as it is now.
    pub(super) fn apply_model_changes(&mut self, old: &Config, files: ModelFiles) {
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

/// Each configured model's file identity, by name.
pub(super) type ModelFiles = Vec<(String, Option<FileIdentity>)>;

/// Each configured model's file as it is on disk now.
pub(super) fn model_files(config: &Config) -> ModelFiles {
    config
        .models
        .iter()
        .map(|(name, model)| {
            let file = config.model_path(model);
            (name.clone(), file.as_deref().and_then(FileIdentity::of))
        })
        .collect()
}

/// A configuration file as read: its text's digest (`None` when it could
/// not be read), and the configuration with its models' files, or why not.
struct Read {
    digest: Option<u64>,
    result: Result<(Config, ModelFiles), Error>,
}

/// Reads the file, off the registry's task; so are the model files'
/// identities. `regular_only`: anything but a regular file (a FIFO, which
/// would block the read until someone writes to it) reads as unreadable.
async fn read(source: ConfigSource, regular_only: bool) -> Read {
    let read = tokio::task::spawn_blocking(move || {
        let text = if regular_only {
            source.read_regular()
        } else {
            source.read()
        };
        let digest = text.as_ref().ok().map(|text| digest(text));
        let result = text
            .and_then(|text| source.parse(&text))
            .map(|config| {
                let files = model_files(&config);
                (config, files)
            })
            .map_err(|e| Error::new(ErrorCode::InvalidConfig, e.to_string()));
        Read { digest, result }
    })
    .await;
    read.unwrap_or_else(|e| Read {
        digest: None,
        result: Err(Error::new(
            ErrorCode::Internal,
            format!("reading the configuration failed: {e}"),
        )),
    })
}

use crate::config::text_digest as digest;

/// Which texts of the configuration file have been seen.
#[derive(Debug, Default)]
pub(super) struct Digests {
    /// The text in force.
    applied: Option<u64>,
    /// The text of the last reload that failed.
    failed: Option<u64>,
}

impl Digests {
    /// The text gpuctld started on.
    pub(super) fn at_start(digest: u64) -> Digests {
        Digests {
            applied: Some(digest),
            failed: None,
        }
    }

    /// Whether a save with this digest is worth a reload: it can be read,
    /// and it is neither the text in force nor the one that failed last.
    fn is_news(&self, digest: Option<u64>) -> bool {
        digest.is_some() && digest != self.applied && digest != self.failed
    }
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    #[test]
    fn a_save_reloads_once_and_a_broken_one_is_tried_once() {
        let (a, b, broken) = (digest("a = 1"), digest("a = 2"), digest("a ="));
        let mut seen = Digests {
            applied: Some(a),
            failed: None,
        };
        assert!(!seen.is_news(Some(a)), "the same bytes saved again");
        assert!(
            !seen.is_news(None),
            "unreadable mid-save: wait for the next event"
        );
        assert!(seen.is_news(Some(b)));
        seen.failed = Some(broken);
        assert!(
            !seen.is_news(Some(broken)),
            "a broken save is reported once"
        );
        assert!(seen.is_news(Some(b)), "fixing it reloads");
    }
}
