//! What gpuctld measured and keeps across restarts: each model's GPU
//! memory at its last load, so the next start admits it with a real
//! figure instead of a guess from its file size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "measured.json";

/// One model's measured need, valid while its file is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measured {
    /// The model file it was measured with.
    pub path: String,
    /// That file's size then.
    pub file_bytes: u64,
    /// The most GPU memory its worker held.
    pub vram_bytes: u64,
}

/// The state directory's contents: every measured model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurements {
    pub models: BTreeMap<String, Measured>,
}

/// The state directory: `daemon.state_dir`, else systemd's
/// `$STATE_DIRECTORY`, else /var/lib/gpuctl when writable, else the user's
/// XDG state directory.
pub fn locate(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
    }
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several, separated by ':'.
        let dir = dir.to_string_lossy().split(':').next()?.to_owned();
        return Some(PathBuf::from(dir));
    }
    let system = Path::new("/var/lib/gpuctl");
    if writable(system) {
        return Some(system.to_path_buf());
    }
    let xdg = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(xdg.join("gpuctl"))
}

fn writable(dir: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// Reads the state; a missing file is an empty state, a broken one is
/// reported and ignored (it only holds measurements, which come back).
pub fn load(dir: &Path) -> Measurements {
    let file = dir.join(FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|error| {
            tracing::warn!(file = %file.display(), %error, "ignoring unreadable state file");
            Measurements::default()
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Measurements::default(),
        Err(error) => {
            tracing::warn!(file = %file.display(), %error, "cannot read state file");
            Measurements::default()
        }
    }
}

/// Writes the state atomically (a new file renamed over the old one).
pub fn save(dir: &Path, state: &Measurements) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    let temporary = dir.join(format!(".{FILE}.{}", std::process::id()));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, dir.join(FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_survives_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Measurements::default(), "no file yet");
        let mut state = Measurements::default();
        state.models.insert(
            "up".into(),
            Measured {
                path: "/m/up.pt".into(),
                file_bytes: 10,
                vram_bytes: 1 << 30,
            },
        );
        save(&dir.path().join("sub"), &state).unwrap();
        assert_eq!(load(&dir.path().join("sub")), state);
        std::fs::write(dir.path().join(FILE), "{ not json").unwrap();
        assert_eq!(load(dir.path()), Measurements::default());
    }

    #[test]
    fn configured_directory_wins() {
        assert_eq!(locate("/tmp/x"), Some(PathBuf::from("/tmp/x")));
    }
}
