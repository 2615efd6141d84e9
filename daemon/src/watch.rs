//! Reload on save: inotify (through the `notify` crate) on the folders that
//! hold the configuration file and the models' files.
//!
//! Folders, not files: editors save by writing a new file and renaming it
//! over the old one, and configuration tools swap a symlink, and a watch on
//! the file itself would stay on the old inode. Events are many per save
//! and say little, so they only wake the watcher; once they settle it looks
//! at what matters: the configuration's bytes (a change, even of a symlink's
//! target, reloads; a save of the same bytes or another file in the folder
//! does nothing), and the identity of each model's file (a loaded model
//! whose file was replaced is replaced once idle).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::notify::{RecommendedWatcher, RecursiveMode, Watcher};
use gpuctl_protocol::ReloadTrigger;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::registry::RegistryHandle;

/// Events closer together than this are one save.
const SETTLE: Duration = Duration::from_millis(200);

/// A stream of events that never settles is looked at after this anyway.
const SETTLE_AT_MOST: Duration = Duration::from_secs(2);

/// Starts watching, for as long as the registry runs. `config_path`: the
/// configuration file; `None` (the embedded default) has nothing to watch.
pub fn spawn(registry: RegistryHandle, config_path: Option<PathBuf>) {
    let Some(config_path) = config_path else {
        return;
    };
    let (events, woken) = mpsc::unbounded_channel();
    let watcher = ::notify::recommended_watcher(move |event: ::notify::Result<::notify::Event>| {
        // Errors (a full inotify queue) are a wake-up too: look again.
        let _ = events.send(event.is_ok());
    });
    let watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(%error, "cannot watch files: saving the configuration does not reload it (SIGHUP and gpuctl reload do)");
            return;
        }
    };
    tokio::spawn(run(registry, config_path, watcher, woken));
}

async fn run(
    registry: RegistryHandle,
    config_path: PathBuf,
    mut watcher: RecommendedWatcher,
    mut woken: mpsc::UnboundedReceiver<bool>,
) {
    let mut configs = registry.config_changes();
    let mut watched = BTreeSet::new();
    rearm(
        &mut watcher,
        &mut watched,
        &folders(&config_path, &registry.config()),
    );
    loop {
        tokio::select! {
            event = woken.recv() => {
                if event.is_none() {
                    return;
                }
                settle(&mut woken).await;
                if registry.config().daemon.watch_config {
                    registry.request_reload(ReloadTrigger::FileChange);
                }
            }
            changed = configs.changed() => {
                if changed.is_err() {
                    return;
                }
                let config = configs.borrow_and_update().clone();
                rearm(&mut watcher, &mut watched, &folders(&config_path, &config));
            }
        }
    }
}

/// Waits until no event has come for [`SETTLE`] (at most [`SETTLE_AT_MOST`]).
async fn settle(woken: &mut mpsc::UnboundedReceiver<bool>) {
    let give_up = tokio::time::Instant::now() + SETTLE_AT_MOST;
    while tokio::time::Instant::now() < give_up {
        match tokio::time::timeout(SETTLE, woken.recv()).await {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
}

/// The folders to watch: those holding the configuration file and each
/// model's file, both as named and as their symlinks resolve.
pub fn folders(config_path: &Path, config: &Arc<Config>) -> BTreeSet<PathBuf> {
    let files = std::iter::once(config_path.to_path_buf())
        .chain(config.models.values().filter_map(|m| config.model_path(m)));
    let mut folders = BTreeSet::new();
    for file in files {
        let resolved = std::fs::canonicalize(&file).ok();
        for path in std::iter::once(file).chain(resolved) {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                folders.insert(parent.to_path_buf());
            }
        }
    }
    folders
}

/// Watches `wanted` and nothing else.
fn rearm(
    watcher: &mut RecommendedWatcher,
    watched: &mut BTreeSet<PathBuf>,
    wanted: &BTreeSet<PathBuf>,
) {
    for gone in watched.difference(wanted) {
        let _ = watcher.unwatch(gone);
    }
    watched.retain(|folder| wanted.contains(folder));
    for folder in wanted.difference(&watched.clone()) {
        match watcher.watch(folder, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(folder.clone());
            }
            // A folder that does not exist (yet) is looked for again at the next reload.
            Err(error) => tracing::debug!(folder = %folder.display(), %error, "cannot watch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folders_of_the_config_and_of_every_model_file_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("gpuctld.toml"), "").unwrap();
        let link = dir.path().join("gpuctld.toml");
        std::os::unix::fs::symlink(real.join("gpuctld.toml"), &link).unwrap();
        let config = Config::parse(
            "model_root = \"/srv/models\"\n\
             [models.a]\npath = \"a.pt\"\nkind = \"tensor\"\n\
             [models.b]\npath = \"/opt/b/b.pt\"\nkind = \"tensor\"\n\
             [models.c]\nkind = \"tensor\"\ncommand = [\"w\"]\n",
            "t.toml",
        )
        .unwrap();
        let root = dir.path().canonicalize().unwrap();
        let folders = folders(&link, &Arc::new(config));
        let expected: BTreeSet<PathBuf> = [
            dir.path().to_path_buf(),
            root.join("real"),
            "/srv/models".into(),
            "/opt/b".into(),
        ]
        .into_iter()
        .collect();
        assert_eq!(folders, expected);
    }
}
