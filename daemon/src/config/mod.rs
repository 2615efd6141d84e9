//! The configuration file: its shape, its defaults, and its validation.
//!
//! `etc/gpuctld.toml` is the documented example and is embedded as the
//! default; a unit test keeps it equal to `Config::default()`.

mod error;
mod gpu;
mod model;
mod source;
mod values;

use std::collections::BTreeMap;
use std::path::PathBuf;

use gpuctl_protocol::{GenerateDefaults, KeepAlive, ModelInfo};
use serde::Deserialize;

pub use error::ConfigError;
pub use gpu::{Backend, GpuConfig, SimConfig, SimDevice};
pub use model::{check_tiling, Kind, LoraConfig, ModelConfig, ModelDefaults, Precision};
pub use source::{text_digest, ConfigSource, Loaded};
pub use values::{Bytes, Device, Duration, KeepAliveSetting, LogLevel, Mode, Size};

/// The smallest `daemon.max_frame`: a frame must hold a streamed tensor's
/// chunk, which is 1 MiB of data and its message's fields.
const MIN_MAX_FRAME: u64 = 2 << 20;

/// The most event-loop threads `daemon.threads` may ask for.
const MAX_DAEMON_THREADS: u32 = 64;

/// The embedded default configuration, also the documented example.
pub const DEFAULT_CONFIG: &str = include_str!("../../../etc/gpuctld.toml");

/// Where `gpuctld` looks for its config when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/gpuctl/gpuctld.toml";

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "GPUCTL_CONFIG";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Relative model paths are resolved against this directory.
    pub model_root: PathBuf,
    /// The daemon process and its socket.
    pub daemon: DaemonConfig,
    /// Defaults for models.
    pub policy: PolicyConfig,
    /// Which GPUs to watch, and how.
    pub gpu: GpuConfig,
    /// The configured models, by name.
    pub models: BTreeMap<String, ModelConfig>,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Empty: `--socket`, then `$GPUCTL_SOCKET`, then the built-in default.
    pub socket: String,
    /// Permission bits of the socket file.
    pub socket_mode: Mode,
    /// Group of the socket file; empty leaves the daemon's group.
    pub socket_group: String,
    /// Members of this group may make administrative requests.
    pub admin_group: String,
    /// Log filter when `RUST_LOG` is unset.
    pub log_level: LogLevel,
    /// Threads of gpuctld's own event loop (connections, the registry,
    /// worker supervision), besides the main thread that accepts
    /// connections. One by default: every request hops between a few
    /// tasks, and across threads each hop is a wake-up of another thread.
    pub threads: u32,
    /// Client connections served at once.
    pub max_connections: u32,
    /// Connections one user (uid) may hold at once; administrators are exempt.
    pub max_connections_per_uid: u32,
    /// Of `max_connections`, slots only administrators may take, so that
    /// root can still connect when other users hold the rest.
    pub admin_connections: u32,
    /// A connection with nothing in flight (no request, watch or
    /// reservation) for this long is closed; "0s": never.
    pub idle_timeout: Duration,
    /// A client that reads nothing of what it is sent for this long is
    /// disconnected, and its requests stop.
    pub send_timeout: Duration,
    /// Largest frame accepted or sent.
    pub max_frame: Bytes,
    /// Tensor bytes one connection may stream in ahead of its requests.
    pub max_upload: Bytes,
    /// Tensor bytes all connections together may hold: streamed ahead of
    /// their requests, and the inputs of requests still running.
    pub max_upload_total: Bytes,
    /// Tensors streamed for a request that does not come within this are
    /// dropped.
    pub upload_timeout: Duration,
    /// Bytes of answers (outputs) one connection's client may leave unread;
    /// past it, the request whose output does not fit fails.
    pub max_unread: Bytes,
    /// The largest output a request may make (an image model's is known
    /// before it runs: input pixels × scale² × 3 bytes).
    pub max_output: Bytes,
    /// A connection must say Hello within this.
    pub handshake_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// The gpuctl-worker binary; empty: next to gpuctld.
    pub worker: String,
    /// Where measured model sizes are kept across restarts; empty:
    /// `$STATE_DIRECTORY`, else /var/lib/gpuctl if writable, else
    /// `$XDG_STATE_HOME/gpuctl` or ~/.local/state/gpuctl.
    pub state_dir: String,
    /// Reload when the configuration file is saved, and replace a loaded
    /// model whose file was replaced.
    pub watch_config: bool,
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How long an idle model stays loaded unless it sets its own.
    pub keep_alive: KeepAliveSetting,
    /// The longest keep-alive a request may ask for.
    pub max_keep_alive: KeepAliveSetting,
    /// At most this many models are resident at once (LRU beyond).
    pub max_loaded: u32,
    /// Requests waiting per model; beyond it, `QueueFull` at once.
    pub queue_max: u32,
    /// After a failed load, requests fail at once for this long, then the
    /// next one tries again; each further failure doubles it (up to 10m).
    pub load_retry: Duration,
    /// A generate request that has not finished after this long (waiting
    /// included) is stopped with `Timeout`; "0s": no limit.
    pub request_timeout: Duration,
    /// A job that was stopped (timeout, cancel, client gone) and still runs
    /// after this has its worker killed: a forward cannot be interrupted.
    pub cancel_grace: Duration,
    /// The most sampling steps a `generate` request may ask for.
    pub max_steps: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model_root: PathBuf::from("/var/lib/gpuctl/models"),
            daemon: DaemonConfig::default(),
            policy: PolicyConfig::default(),
            gpu: GpuConfig::default(),
            models: BTreeMap::new(),
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: String::new(),
            socket_mode: Mode(0o660),
            socket_group: String::new(),
            admin_group: String::new(),
            log_level: LogLevel("info".to_owned()),
            threads: 1,
            max_connections: 256,
            max_connections_per_uid: 64,
            admin_connections: 16,
            idle_timeout: Duration(std::time::Duration::from_secs(600)),
            send_timeout: Duration(std::time::Duration::from_secs(60)),
            max_frame: Bytes(gpuctl_protocol::DEFAULT_MAX_FRAME as u64),
            max_upload: Bytes(2 << 30),
            max_upload_total: Bytes(4 << 30),
            upload_timeout: Duration(std::time::Duration::from_secs(60)),
            max_unread: Bytes(4 << 30),
            max_output: Bytes(4 << 30),
            handshake_timeout: Duration(std::time::Duration::from_secs(5)),
            shutdown_grace: Duration(std::time::Duration::from_secs(10)),
            worker: String::new(),
            state_dir: String::new(),
            watch_config: true,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            keep_alive: KeepAliveSetting(KeepAlive::Millis(5 * 60 * 1000)),
            max_keep_alive: KeepAliveSetting(KeepAlive::Forever),
            max_loaded: 3,
            queue_max: 64,
            load_retry: Duration(std::time::Duration::from_secs(10)),
            request_timeout: Duration(std::time::Duration::from_secs(3600)),
            cancel_grace: Duration(std::time::Duration::from_secs(10)),
            max_steps: 1000,
        }
    }
}

impl Config {
    /// Parses and validates `text`; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let deserializer =
            toml::Deserializer::parse(text).map_err(|e| ConfigError::syntax(origin, text, &e))?;
        let config: Config = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| ConfigError::field(origin, text, e))?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| Err(ConfigError::invalid(origin, key, problem));
        let daemon = &self.daemon;
        if !(1..=MAX_DAEMON_THREADS).contains(&daemon.threads) {
            return invalid(
                "daemon.threads",
                format!("must be between 1 and {MAX_DAEMON_THREADS}"),
            );
        }
        if daemon.max_connections == 0 {
            return invalid("daemon.max_connections", "must be at least 1".into());
        }
        if daemon.max_connections_per_uid == 0 {
            return invalid(
                "daemon.max_connections_per_uid",
                "must be at least 1".into(),
            );
        }
        if daemon.send_timeout.0.is_zero() {
            return invalid("daemon.send_timeout", "must be longer than 0s".into());
        }
        if daemon.upload_timeout.0.is_zero() {
            return invalid("daemon.upload_timeout", "must be longer than 0s".into());
        }
        if daemon.max_upload_total.0 < daemon.max_upload.0 {
            return invalid(
                "daemon.max_upload_total",
                format!(
                    "must be at least daemon.max_upload ({})",
                    gpuctl_protocol::units::format_bytes(daemon.max_upload.0)
                ),
            );
        }
        if self.policy.max_steps == 0 {
            return invalid("policy.max_steps", "must be at least 1".into());
        }
        if self.policy.cancel_grace.0.is_zero() {
            return invalid("policy.cancel_grace", "must be longer than 0s".into());
        }
        let max_frame = daemon.max_frame.0;
        let ceiling = gpuctl_protocol::MAX_FRAME_CEILING as u64;
        if !(MIN_MAX_FRAME..=ceiling).contains(&max_frame) {
            let format = gpuctl_protocol::units::format_bytes;
            return invalid(
                "daemon.max_frame",
                format!(
                    "must be between {} and {} (streamed tensors travel in frames of 1 MiB and a few bytes)",
                    format(MIN_MAX_FRAME),
                    format(ceiling)
                ),
            );
        }
        if self.policy.max_loaded == 0 {
            return invalid("policy.max_loaded", "must be at least 1".into());
        }
        if self.policy.queue_max == 0 {
            return invalid("policy.queue_max", "must be at least 1".into());
        }
        if self.gpu.poll_interval.0 < std::time::Duration::from_millis(10) {
            return invalid("gpu.poll_interval", "must be at least 10ms".into());
        }
        if self.gpu.backend == Backend::Sim && self.gpu.sim.devices.is_empty() {
            return invalid(
                "gpu.sim.devices",
                "backend \"sim\" needs at least one [[gpu.sim.devices]]".into(),
            );
        }
        if daemon.handshake_timeout.0.is_zero() {
            return invalid("daemon.handshake_timeout", "must be longer than 0s".into());
        }
        for (key, group) in [
            ("daemon.socket_group", &daemon.socket_group),
            ("daemon.admin_group", &daemon.admin_group),
            ("gpu.reserve_group", &self.gpu.reserve_group),
        ] {
            if !group.is_empty() && lookup_group(group).is_none() {
                return invalid(
                    key,
                    format!("there is no group named {group:?} on this system"),
                );
            }
        }
        for (name, model) in &self.models {
            model.validate(name).map_err(|(key, problem)| {
                ConfigError::invalid(origin, &format!("models.{name}.{key}"), problem)
            })?;
            if model
                .defaults
                .steps
                .is_some_and(|steps| steps > self.policy.max_steps)
            {
                return invalid(
                    &format!("models.{name}.defaults.steps"),
                    format!(
                        "must be at most policy.max_steps ({})",
                        self.policy.max_steps
                    ),
                );
            }
            if !valid_model_name(name) {
                return invalid(
                    &format!("models.{name}"),
                    "a model name may use only letters, digits, '.', '_' and '-', and must not start with '.'".into(),
                );
            }
        }
        Ok(())
    }

    /// A model's file, resolved against `model_root`; `None` for a
    /// `command` model that names none.
    pub fn model_path(&self, model: &ModelConfig) -> Option<PathBuf> {
        model.path.as_ref().map(|path| self.model_root.join(path))
    }

    /// What a model is loaded from, for people and for the measurements
    /// kept per model: its resolved file, else its command line.
    pub fn model_source(&self, model: &ModelConfig) -> String {
        match (self.model_path(model), &model.command) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(argv)) => argv.join(" "),
            (None, None) => String::new(),
        }
    }

    /// Where a `command` model's program runs: its `cwd` resolved against
    /// `model_root`, else `model_root`.
    pub fn model_cwd(&self, model: &ModelConfig) -> PathBuf {
        match &model.cwd {
            Some(cwd) => self.model_root.join(cwd),
            None => self.model_root.clone(),
        }
    }

    /// The effective settings of every model, sorted by name.
    pub fn model_infos(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|(name, model)| ModelInfo {
                name: name.clone(),
                kind: model.kind.into(),
                path: self.model_source(model),
                device: model.device.to_string(),
                keep_alive: model
                    .keep_alive
                    .as_ref()
                    .unwrap_or(&self.policy.keep_alive)
                    .0,
                preload: model.preload,
                pin: model.pin,
                group: model.group.clone(),
                scale: model.scale,
                tile: model.tile,
                overlap: model.overlap,
                concurrency: model.concurrency,
                defaults: GenerateDefaults {
                    size: model.defaults.size.map(|s| (s.width, s.height)),
                    steps: model.defaults.steps,
                    guidance: model.defaults.guidance,
                },
            })
            .collect()
    }
}

fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The gid of the group named `name`, through NSS.
pub fn lookup_group(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(test)]
mod tests;
