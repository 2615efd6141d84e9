//! `[gpu]`: which probe watches the GPUs, how often, the headroom kept
//! for other programs, and the simulated devices of the `sim` backend.

use serde::Deserialize;

use super::*;

/// `[gpu]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// `auto`, `nvml`, `sim` or `none`.
    pub backend: Backend,
    /// How often the GPUs are sampled while gpuctld has something on them
    /// (models, waiting loads, reservations).
    pub poll_interval: Duration,
    /// Memory gpuctld leaves free for other programs: loads must fit with
    /// it to spare, and idle models are unloaded when free memory falls below.
    pub min_free_vram: Bytes,
    /// How long a load waits for memory before failing with `InsufficientVram`.
    pub load_wait: Duration,
    /// Under sustained pressure, unload busy models once their work ends.
    pub yield_busy: bool,
    /// Members of this group may reserve GPU memory without limits, as
    /// administrators may.
    pub reserve_group: String,
    /// The largest reservation others may make; "0": none at all.
    pub reserve_max: Bytes,
    /// The longest others' reservations live (without a ttl they get this one).
    pub reserve_max_ttl: Duration,
    /// The simulated device, for `backend = "sim"`.
    pub sim: SimConfig,
}

/// How GPUs are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NVML if it loads and reports a device, else none.
    #[default]
    Auto,
    /// The NVIDIA driver's management library.
    Nvml,
    /// A simulated device (tests, demos).
    Sim,
    /// No GPU.
    None,
}

/// `[gpu.sim]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// JSON list of `{ pid, name, device, bytes }`, read at every sample;
    /// a missing file means no foreign usage.
    pub foreign_usage_file: String,
    /// The simulated devices.
    pub devices: Vec<SimDevice>,
}

/// `[[gpu.sim.devices]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimDevice {
    /// Shown as the device's name.
    pub name: String,
    /// Its memory.
    pub total: Bytes,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            backend: Backend::Auto,
            poll_interval: Duration(std::time::Duration::from_millis(500)),
            min_free_vram: Bytes(512 << 20),
            load_wait: Duration(std::time::Duration::from_secs(60)),
            yield_busy: true,
            reserve_group: String::new(),
            reserve_max: Bytes(0),
            reserve_max_ttl: Duration(std::time::Duration::from_secs(3600)),
            sim: SimConfig::default(),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            foreign_usage_file: "/run/gpuctl/sim-foreign.json".to_owned(),
            devices: vec![SimDevice {
                name: "Sim 24G".to_owned(),
                total: Bytes(24 << 30),
            }],
        }
    }
}
