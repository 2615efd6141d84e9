//! The private protocol between gpuctld and its `gpuctl-worker` processes,
//! one per loaded model, over an inherited socketpair with the same framing
//! as clients use (length prefix + bincode).
//!
//! ```text
//! gpuctld                                  gpuctl-worker
//!   | <------------ Hello { protocol, .. } |  the worker's first frame
//!   | -- Load(LoadModel) ---------------->  |  the daemon's first frame
//!   | <--------------------- Loaded(..)     |  or Failed { id: None }, then exit
//!   | -- Run { id, job } ---------------->  |  one at a time per worker
//!   | <------------ Progress { id, .. }     |  tiles done, any number
//!   | <------------ Done { id, outputs }    |  or Failed { id: Some(id) }
//!   | -- Switch(SwitchMode) ------------->  |  (1.1) another mode, in place
//!   | <------------------- Switched(..)     |  or Failed { id: None }
//!   | -- Unload ------------------------->  |  the worker exits, freeing all
//! ```
//!
//! Worker protocol 1.1: gpuctld says the version it speaks in the
//! environment variable [`WORKER_PROTOCOL_ENV`]; a worker that reads 1.1 or
//! later there and speaks 1.1 sends `Capabilities` right after its `Hello`.
//! Neither side sends the other a message it does not know.
//!
//! Tensors over [`crate::stream::STREAM_ABOVE`] bytes travel as `Tensor`
//! frames (a [`TensorFrame`]: begin, chunks, end) just before the `Run` or
//! `Done` that holds them as placeholders (see [`crate::stream`]).
//!
//! EOF on the socket also makes the worker exit, and the worker dies with
//! its parent (PR_SET_PDEATHSIG), so no orphan ever holds GPU memory.

use serde::{Deserialize, Serialize};

use crate::{Error, ModelKind, TensorFrame, WireTensor};

/// A frame from the daemon to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DaemonToWorker {
    /// Load this model; always the first frame.
    Load(LoadModel),
    /// Run one job on the loaded model.
    Run {
        /// Chosen by the daemon; echoed in the answer.
        id: u64,
        /// What to compute.
        job: Job,
    },
    /// Exit, releasing everything.
    Unload,
    /// Stop job `id` at its next batch boundary (or before it starts); it
    /// answers `Failed` with `Cancelled`.
    Cancel {
        /// The job.
        id: u64,
    },
    /// A frame of a tensor of the next `Run`, streamed ahead of it.
    Tensor(TensorFrame),
    /// (1.1) Become another mode of the same model, in place: the same
    /// base with other LoRAs. Sent only to a worker whose `Capabilities`
    /// said it can, only while it runs no job. Answered by `Switched`, or
    /// by `Failed { id: None }` after which gpuctld ends the worker.
    Switch(SwitchMode),
}

/// (1.1) The mode a worker switches to: everything else of its
/// `LoadModel` stays as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchMode {
    /// The mode's configured name, for messages from now on.
    pub name: String,
    /// Its LoRA files, in order, in place of the current ones.
    pub loras: Vec<Lora>,
}

/// Which model to load, where, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadModel {
    /// The model's configured name, for error messages.
    pub name: String,
    /// The model's file or folder (`path`, resolved against `model_root`);
    /// `None` when a `command` model names none.
    pub path: Option<String>,
    /// The contract its forward follows.
    pub kind: ModelKind,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA if available).
    pub device: String,
    /// Intra-op threads for CPU work; 0 leaves libtorch's default.
    pub threads: u32,
    /// Send `image` and `generate` outputs as RGB8 (float 0..1 clamped,
    /// ×255, rounded; NaN → 0): what clients get anyway, in a quarter of
    /// the bytes.
    pub rgb8: bool,
    /// Run the forward in float16 when the device is CUDA (the CPU keeps
    /// float32).
    pub fp16: bool,
    /// The model's `options` table as a JSON object (`{}` when it has
    /// none): settings for a `command` worker's own code.
    pub options: String,
    /// LoRA files to merge into the model's weights at load, in order.
    pub loras: Vec<Lora>,
}

/// One LoRA overlay: `W += strength · scale · B·A` for each weight its file
/// names (`scale`: the file's `alpha / rank`, else 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lora {
    /// The safetensors file, resolved against `model_root`.
    pub path: String,
    /// How much of it: 0 leaves the base, 1 the file as trained.
    pub strength: f32,
}

/// One unit of work, shaped by the model's kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Job {
    /// `image`: float 0..1 or u8 0..255, in `layout`.
    Image {
        /// The input batch.
        input: WireTensor,
        /// Cut it into tiles; `None`: one forward over the whole image.
        tiling: Option<Tiling>,
        /// `[N,3,H,W]` or `[N,H,W,3]`, as the client sent it.
        layout: crate::ImageLayout,
    },
    /// `generate`: the daemon made `noise` from the seed.
    Generate(GenerateJob),
    /// `tensor`: positional tensors.
    Tensor {
        /// The forward's arguments, in order.
        inputs: Vec<WireTensor>,
    },
}

impl Job {
    /// Its tensors, in wire order: the order in which streamed ones fill
    /// their placeholders.
    pub fn tensors_mut(&mut self) -> Box<dyn Iterator<Item = &mut WireTensor> + '_> {
        match self {
            Job::Image { input, .. } => Box::new(std::iter::once(input)),
            Job::Generate(job) => Box::new(std::iter::once(&mut job.noise)),
            Job::Tensor { inputs } => Box::new(inputs.iter_mut()),
        }
    }
}

/// How an image job is cut into tiles (input pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiling {
    /// Tile edge.
    pub tile: u32,
    /// Overlap between neighbouring tiles; `2 * overlap < tile`.
    pub overlap: u32,
    /// Tiles per forward.
    pub batch: u32,
    /// Times a failing batch is retried (out of memory aside) before the
    /// job fails naming its tile.
    pub retries: u32,
}

/// The inputs of a `generate` forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateJob {
    /// `[1,C,h,w]` float noise.
    pub noise: WireTensor,
    /// What to generate.
    pub prompt: String,
    /// What to avoid.
    pub negative: String,
    /// Sampling steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance: f32,
    /// The request's seed (gpuctld's pick when it gave none): a worker that
    /// makes its own latents (16-channel ones, its own layout) seeds them
    /// with it, so a seed reproduces an image; gpuctl-worker uses `noise`.
    pub seed: u64,
    /// The image's width in pixels.
    pub width: u32,
    /// The image's height in pixels.
    pub height: u32,
}

/// A frame from a worker to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerToDaemon {
    /// The model is loaded and ready.
    Loaded(Loaded),
    /// A job's results.
    Done {
        /// The job's id.
        id: u64,
        /// The forward's outputs (a tuple becomes several).
        outputs: Vec<WireTensor>,
        /// Milliseconds spent in the forward, transfers included.
        run_ms: u64,
        /// What the worker had to do to finish (out-of-memory back-off,
        /// retries), for people.
        notes: Vec<String>,
    },
    /// A job failed (`id: Some`), or loading failed (`id: None`, and the
    /// worker exits).
    Failed {
        /// The job's id; `None` for the load.
        id: Option<u64>,
        /// What went wrong, naming the model.
        error: Error,
    },
    /// A job's progress: `done` of `total` units (tiles) finished.
    Progress {
        /// The job's id.
        id: u64,
        /// Units done.
        done: u32,
        /// Units in all.
        total: u32,
    },
    /// A frame of an output of job `id`, streamed ahead of its `Done` (a
    /// tiled image's rows as they are finished, while the job runs).
    Tensor {
        /// The job.
        id: u64,
        /// Begin, a chunk, or end.
        frame: TensorFrame,
    },
    /// The first frame a worker sends, before anything else: which worker
    /// protocol it speaks. Variant 5 in every version, so that any daemon
    /// can read it and refuse a worker it cannot talk to, naming both.
    Hello(WorkerHello),
    /// (1.1) What the worker can do beyond 1.0, sent right after `Hello`
    /// when [`WORKER_PROTOCOL_ENV`] says gpuctld speaks 1.1 or later.
    Capabilities(WorkerCapabilities),
    /// (1.1) The answer to `Switch`: the new mode is in place.
    Switched(Loaded),
}

/// (1.1) What a worker can do beyond 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCapabilities {
    /// It takes `Switch`: its LoRAs change in place, without reading the
    /// base model again.
    pub switch_loras: bool,
}

/// The version of this protocol, which programs outside this repository
/// speak too (the Python worker SDK, any `command` worker): peers with the
/// same `major` talk; `minor` grows when messages are appended.
pub const WORKER_PROTOCOL: crate::ProtocolVersion = crate::ProtocolVersion { major: 1, minor: 1 };

/// The environment variable in which gpuctld tells its workers the worker
/// protocol it speaks (`1.1`); a worker started without it talks to a 1.0
/// daemon.
pub const WORKER_PROTOCOL_ENV: &str = "GPUCTL_WORKER_PROTOCOL";

/// Whether a worker started with `value` in [`WORKER_PROTOCOL_ENV`] may
/// send `Capabilities` (the daemon speaks 1.1 or later of major 1).
pub fn daemon_takes_capabilities(value: Option<&str>) -> bool {
    value
        .and_then(|v| v.split_once('.'))
        .and_then(|(major, minor)| Some((major.parse::<u16>().ok()?, minor.parse::<u16>().ok()?)))
        .is_some_and(|(major, minor)| major == WORKER_PROTOCOL.major && minor >= 1)
}

/// A worker's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// The worker protocol it speaks.
    pub protocol: crate::ProtocolVersion,
    /// What it is, for logs and errors: e.g. `gpuctl-worker 0.1.0`.
    pub program: String,
}

/// What loading cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    /// The device the model is on, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Milliseconds to load.
    pub load_ms: u64,
    /// Bytes of parameters.
    pub parameter_bytes: u64,
    /// Bytes of parameters and buffers on the device.
    pub device_bytes: u64,
    /// The precision the forward runs in: `fp32` or `fp16`.
    pub precision: String,
}

/// The descriptor a worker finds its socket on.
pub const WORKER_FD: i32 = 3;

/// Makes `fd` the child's [`WORKER_FD`]. Call it from `pre_exec`, between
/// fork and exec: it only calls async-signal-safe functions. `dup2` onto
/// itself would keep close-on-exec set, so that case clears the flag.
pub fn install_worker_fd(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: dup2 and fcntl take plain integers and touch no memory.
    let ok = unsafe {
        if fd == WORKER_FD {
            libc::fcntl(WORKER_FD, libc::F_SETFD, 0) >= 0
        } else {
            libc::dup2(fd, WORKER_FD) >= 0
        }
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_go_only_to_a_daemon_that_said_it_takes_them() {
        assert!(daemon_takes_capabilities(Some("1.1")));
        assert!(daemon_takes_capabilities(Some("1.12")));
        for older_or_other in [
            None,
            Some("1.0"),
            Some("2.1"),
            Some("1"),
            Some("x.y"),
            Some(""),
        ] {
            assert!(
                !daemon_takes_capabilities(older_or_other),
                "{older_or_other:?}"
            );
        }
    }
}
