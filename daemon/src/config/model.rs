//! `[models.NAME]`: one model's settings and their checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gpuctl_protocol::ModelKind;
use serde::Deserialize;

use super::*;

/// `[models.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The TorchScript file, absolute or relative to `model_root`; for a
    /// `command` model, optional, and whatever the program makes of it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A program that hosts the model instead of gpuctl-worker (argv, no
    /// shell), speaking the worker protocol, e.g. through `gpuctl.worker`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment variables for the `command`, on top of gpuctld's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The `command`'s working directory, relative to `model_root`;
    /// default: `model_root`.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// How long its worker may take from start to loaded before it is
    /// killed and the load fails; default 10 minutes.
    #[serde(default)]
    pub load_timeout: Option<Duration>,
    /// Settings for a `command` worker's code (`spec.options`), any table.
    #[serde(default)]
    pub options: toml::Table,
    /// LoRA files merged into the weights at load (TorchScript models), or
    /// handed to a `command` worker (`spec.loras`).
    #[serde(default)]
    pub loras: Vec<LoraConfig>,
    /// `image`, `generate` or `tensor`.
    pub kind: Kind,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: Device,
    /// Overrides `policy.keep_alive`.
    #[serde(default)]
    pub keep_alive: Option<KeepAliveSetting>,
    /// Load at start-up instead of on first use.
    #[serde(default)]
    pub preload: bool,
    /// Never evicted by the LRU cap or the idle timer.
    #[serde(default)]
    pub pin: bool,
    /// At most one model of a group is resident at a time.
    #[serde(default)]
    pub group: Option<String>,
    /// Output size / input size (`image`).
    #[serde(default)]
    pub scale: Option<u32>,
    /// Tile edge in pixels (`image`).
    #[serde(default)]
    pub tile: Option<u32>,
    /// Tile overlap in pixels (`image`).
    #[serde(default)]
    pub overlap: Option<u32>,
    /// Tiles per forward (`image` with `tile`); unset: what suits the
    /// device the model runs on (`policy::tile_batch`).
    #[serde(default)]
    pub batch: Option<u32>,
    /// Times a failing batch of tiles is retried before the request fails.
    #[serde(default = "two")]
    pub tile_retries: u32,
    /// The floating-point precision of the forward on CUDA (`image` and
    /// `generate`); the CPU always runs float32.
    #[serde(default)]
    pub precision: Precision,
    /// Requests run at once on this model.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Waiting requests with inputs of one shape and dtype run as one
    /// forward of at most this many (`image`, `tensor`); 1: each alone.
    #[serde(default = "one")]
    pub max_batch: u32,
    /// How long a request that could be batched waits for companions.
    #[serde(default = "two_ms")]
    pub batch_window: Duration,
    /// Request defaults (`generate`).
    #[serde(default)]
    pub defaults: ModelDefaults,
    /// Channels of the noise a `generate` model takes.
    #[serde(default = "four")]
    pub noise_channels: u32,
    /// Output size / noise size of a `generate` model.
    #[serde(default = "eight")]
    pub latent_scale: u32,
    /// CPU threads for its worker; 0: every core.
    #[serde(default)]
    pub threads: u32,
    /// The GPU memory it needs; unset: measured at its last load, else its
    /// file size × 1.2.
    #[serde(default)]
    pub vram: Option<Bytes>,
}

fn two() -> u32 {
    2
}

fn four() -> u32 {
    4
}

fn eight() -> u32 {
    8
}

fn one() -> u32 {
    1
}

fn two_ms() -> Duration {
    Duration(std::time::Duration::from_millis(2))
}

/// The most requests one batched forward may hold.
pub const MAX_BATCH_CEILING: u32 = 1024;

/// The longest a request may wait for companions.
pub const BATCH_WINDOW_CEILING: std::time::Duration = std::time::Duration::from_secs(1);

/// `loras = [{ path = "portrait.safetensors", strength = 0.8 }]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The safetensors file, relative to `model_root`.
    pub path: PathBuf,
    /// How much of it; default 1.
    #[serde(default = "full_strength")]
    pub strength: f32,
}

fn full_strength() -> f32 {
    1.0
}

/// A model's kind, as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// See [`ModelKind::Image`].
    Image,
    /// See [`ModelKind::Generate`].
    Generate,
    /// See [`ModelKind::Tensor`].
    Tensor,
}

impl From<Kind> for ModelKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Image => ModelKind::Image,
            Kind::Generate => ModelKind::Generate,
            Kind::Tensor => ModelKind::Tensor,
        }
    }
}

/// `defaults = { size = "896x1152", steps = 40, guidance = 8.0 }`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    /// Output size, `WIDTHxHEIGHT`.
    pub size: Option<Size>,
    /// Sampling steps.
    pub steps: Option<u32>,
    /// Guidance scale.
    pub guidance: Option<f32>,
}

/// How long a worker may take to load when the model does not say.
pub const DEFAULT_LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl ModelConfig {
    /// Its `load_timeout`, or the default.
    pub fn load_timeout(&self) -> std::time::Duration {
        self.load_timeout.map_or(DEFAULT_LOAD_TIMEOUT, |t| t.0)
    }

    /// Checks one model; the error names the key below `models.NAME`.
    pub(super) fn validate(&self, _name: &str) -> Result<(), (&'static str, String)> {
        match (&self.command, &self.path) {
            (None, None) => {
                return Err((
                    "path",
                    "is missing: name a TorchScript file, or set command to a program that hosts the model".into(),
                ))
            }
            (_, Some(path)) if path.as_os_str().is_empty() => {
                return Err(("path", "must not be empty".into()));
            }
            (Some(argv), _) if argv.first().is_none_or(|program| program.is_empty()) => {
                return Err((
                    "command",
                    "must name a program first, e.g. [\"python\", \"-m\", \"myapp.worker\"]".into(),
                ));
            }
            _ => {}
        }
        if self.command.is_none() {
            for (key, set) in [
                ("env", !self.env.is_empty()),
                ("cwd", self.cwd.is_some()),
                ("options", !self.options.is_empty()),
            ] {
                if set {
                    return Err((key, "applies only to models with a command".into()));
                }
            }
        }
        if let Some(argv) = &self.command {
            if argv.iter().any(|arg| arg.contains('\0')) {
                return Err(("command", "must not contain NUL characters".into()));
            }
        }
        if let Some((name, _)) = self.env.iter().find(|(name, value)| {
            name.is_empty() || name.contains(['=', '\0']) || value.contains('\0')
        }) {
            return Err((
                "env",
                format!("{name:?} is not a valid environment variable: a name is not empty and has no '=', and neither name nor value has NUL"),
            ));
        }
        if let Some(lora) = self.loras.iter().find(|l| l.path.as_os_str().is_empty()) {
            return Err((
                "loras",
                format!("a LoRA needs a path (strength {})", lora.strength),
            ));
        }
        if let Some(lora) = self.loras.iter().find(|l| !l.strength.is_finite()) {
            return Err((
                "loras",
                format!(
                    "the strength of {} must be a finite number",
                    lora.path.display()
                ),
            ));
        }
        if matches!(self.load_timeout, Some(Duration(t)) if t.is_zero()) {
            return Err(("load_timeout", "must be longer than 0s".into()));
        }
        if self.concurrency == 0 {
            return Err(("concurrency", "must be at least 1".into()));
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH_CEILING {
            return Err((
                "max_batch",
                format!("must be from 1 (no batching) to {MAX_BATCH_CEILING}"),
            ));
        }
        if self.kind == Kind::Generate && self.max_batch > 1 {
            return Err((
                "max_batch",
                "applies only to models of kind \"image\" and \"tensor\" (each generation runs alone)".into(),
            ));
        }
        if self.batch_window.0 > BATCH_WINDOW_CEILING {
            return Err((
                "batch_window",
                "must be at most 1s: a request waits that long for companions even when the model is idle".into(),
            ));
        }
        if matches!(&self.group, Some(group) if group.trim().is_empty()) {
            return Err((
                "group",
                "must not be empty; leave it out for no group".into(),
            ));
        }
        if self.kind != Kind::Image {
            for (key, set) in [
                ("scale", self.scale.is_some()),
                ("tile", self.tile.is_some()),
                ("overlap", self.overlap.is_some()),
            ] {
                if set {
                    return Err((key, "applies only to models of kind \"image\"".into()));
                }
            }
        }
        if self.kind == Kind::Tensor && self.precision != Precision::Fp32 {
            return Err((
                "precision",
                "applies only to models of kind \"image\" and \"generate\" (a tensor model takes its inputs in the dtypes they are sent in)".into(),
            ));
        }
        if self.kind != Kind::Generate && self.defaults != ModelDefaults::default() {
            return Err((
                "defaults",
                "applies only to models of kind \"generate\"".into(),
            ));
        }
        if self.batch == Some(0) {
            return Err(("batch", "must be at least 1".into()));
        }
        if self.scale == Some(0) {
            return Err(("scale", "must be at least 1".into()));
        }
        if let Some(tile) = self.tile {
            check_tiling(tile, self.overlap.unwrap_or(0))?;
        }
        if self.kind == Kind::Generate && self.noise_channels == 0 {
            return Err(("noise_channels", "must be at least 1".into()));
        }
        if self.kind == Kind::Generate && self.latent_scale == 0 {
            return Err(("latent_scale", "must be at least 1".into()));
        }
        if self.defaults.steps == Some(0) {
            return Err(("defaults.steps", "must be at least 1".into()));
        }
        if matches!(self.defaults.guidance, Some(g) if !g.is_finite() || g < 0.0) {
            return Err(("defaults.guidance", "must be a finite number ≥ 0".into()));
        }
        Ok(())
    }
}

/// Whether tiles of `tile` pixels overlapping by `overlap` can be cut; the
/// key at fault and why not. Configured tilings and requested ones alike.
pub fn check_tiling(tile: u32, overlap: u32) -> Result<(), (&'static str, String)> {
    if tile < 16 {
        return Err((
            "tile",
            format!("tile {tile} is too small: at least 16 pixels"),
        ));
    }
    if overlap.saturating_mul(2) >= tile {
        return Err((
            "overlap",
            format!("overlap {overlap} is too large for tile {tile}: twice the overlap must be less than the tile"),
        ));
    }
    Ok(())
}

/// The precision a model runs in on CUDA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32.
    #[default]
    Fp32,
    /// float16: half the memory and, on tensor cores, several times the
    /// speed; inputs and outputs stay float32 outside the forward.
    Fp16,
}
