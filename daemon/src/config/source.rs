//! Where a configuration comes from: `--config`, `$GPUCTL_CONFIG`, the
//! system file, or the embedded default.

use std::path::{Path, PathBuf};

use super::*;

/// Where a configuration came from, for error messages and `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file on disk, re-read on reload.
    File(PathBuf),
    /// [`DEFAULT_CONFIG`].
    Embedded,
}

/// A configuration as read at start-up, with the digest of the very text it
/// came from: a save is news when its text differs from this one (reading
/// the file a second time could see a later save, or block on a FIFO).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub digest: u64,
}

/// What tells one text of the configuration file from another.
pub fn text_digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl ConfigSource {
    /// `--config`, else `$GPUCTL_CONFIG`, else [`SYSTEM_CONFIG`] if it exists,
    /// else the embedded default.
    pub fn choose(flag: Option<PathBuf>) -> ConfigSource {
        let from_env = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        match flag.or(from_env) {
            Some(path) => ConfigSource::File(path),
            None if Path::new(SYSTEM_CONFIG).exists() => ConfigSource::File(SYSTEM_CONFIG.into()),
            None => ConfigSource::Embedded,
        }
    }

    /// The file's path, if there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::File(path) => Some(path),
            ConfigSource::Embedded => None,
        }
    }

    /// How error messages name this source.
    pub fn describe(&self) -> String {
        match self {
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Embedded => "<embedded default config>".to_owned(),
        }
    }

    /// Reads and validates the configuration.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let text = self.read()?;
        let config = self.parse(&text)?;
        Ok(Loaded {
            config,
            digest: text_digest(&text),
        })
    }

    /// The configuration's text if it is a regular file's (a FIFO put in
    /// its place is refused without waiting for a writer: the check and the
    /// read are of one open file, so a swap in between cannot block).
    pub fn read_regular(&self) -> Result<String, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let ConfigSource::File(path) = self else {
            return self.read();
        };
        let unreadable = |e| ConfigError::unreadable(self.describe(), e);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(unreadable)?;
        if !file.metadata().map_err(unreadable)?.is_file() {
            return Err(unreadable(std::io::Error::other("not a regular file")));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(unreadable)?;
        Ok(text)
    }

    /// The configuration's text.
    pub fn read(&self) -> Result<String, ConfigError> {
        match self {
            ConfigSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError::unreadable(self.describe(), e)),
            ConfigSource::Embedded => Ok(DEFAULT_CONFIG.to_owned()),
        }
    }

    /// Parses and validates `text`, naming this source in errors.
    pub fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &self.describe())
    }
}
