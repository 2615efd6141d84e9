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
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.read().and_then(|text| self.parse(&text))
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
