//! Every message that crosses the socket.
//!
//! bincode encodes enums by position and structs by field order, so the
//! rules are: append variants and fields at the end, never reorder, never
//! use `serde(tag)`, `untagged`, `flatten` or `skip_serializing_if`.

use serde::{Deserialize, Serialize};

use crate::{Error, ProtocolVersion};

/// A client-chosen number that ties responses and events to their request.
pub type RequestId = u64;

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Must be the first frame of a connection, and only the first.
    Hello(Hello),
    /// A request; the daemon answers with exactly one `Response` or `Error`
    /// carrying the same id, possibly preceded by `Event`s.
    Request {
        /// Chosen by the client, unique among its requests in flight.
        id: RequestId,
        /// The operation.
        request: Request,
    },
}

/// A frame sent by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DaemonMessage {
    /// The answer to a compatible `Hello`.
    Welcome(Welcome),
    /// The successful end of request `id`.
    Response {
        /// The request this answers.
        id: RequestId,
        /// The result.
        response: Response,
    },
    /// The failed end of request `id`.
    Error {
        /// The request this answers.
        id: RequestId,
        /// What went wrong.
        error: Error,
    },
    /// Progress of request `id`, which has not ended yet.
    Event {
        /// The request this belongs to.
        id: RequestId,
        /// What happened.
        event: Event,
    },
    /// The daemon is closing this connection, for this reason (incompatible
    /// version, malformed frame, handshake timeout, shutdown, …).
    Closing(Error),
}

/// The client's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub protocol: ProtocolVersion,
    /// A free-form name for logs, such as `gpuctl 0.1.0`.
    pub client: String,
}

/// The daemon's answer to a compatible `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the daemon speaks.
    pub protocol: ProtocolVersion,
    /// The daemon's package version.
    pub daemon_version: String,
    /// Names of the operations this daemon serves, e.g. `"reload"`.
    pub capabilities: Vec<String>,
}

/// One variant per operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and round-trip check.
    Ping(PingRequest),
    /// The daemon's own state.
    Status(StatusRequest),
    /// The configured models.
    Models(ModelsRequest),
    /// Re-read the configuration file (administrative).
    Reload(ReloadRequest),
    /// Run a model, loading it first if needed.
    Generate(GenerateRequest),
    /// Load a model now (administrative).
    Load(LoadRequest),
    /// Unload one model or all (administrative).
    Unload(UnloadRequest),
    /// GPU memory: devices, our models, other programs.
    Vram(VramRequest),
}

impl Request {
    /// The operation's name, as used in capabilities, logs and errors.
    pub fn operation(&self) -> &'static str {
        match self {
            Request::Ping(_) => "ping",
            Request::Status(_) => "status",
            Request::Models(_) => "models",
            Request::Reload(_) => "reload",
            Request::Generate(_) => "generate",
            Request::Load(_) => "load",
            Request::Unload(_) => "unload",
            Request::Vram(_) => "vram",
        }
    }
}

/// The successful result of a request; variants mirror [`Request`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Ping(PingResponse),
    /// Answer to [`Request::Status`].
    Status(StatusResponse),
    /// Answer to [`Request::Models`].
    Models(ModelsResponse),
    /// Answer to [`Request::Reload`].
    Reload(ReloadResponse),
    /// Answer to [`Request::Generate`].
    Generate(GenerateResponse),
    /// Answer to [`Request::Load`].
    Load(LoadResponse),
    /// Answer to [`Request::Unload`].
    Unload(UnloadResponse),
    /// Answer to [`Request::Vram`].
    Vram(VramResponse),
}

/// Something that happened while a request runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Work done so far.
    Progress(ProgressEvent),
    /// The request waits; sent when it starts waiting and when its place
    /// in the line changes.
    Queued(QueuedEvent),
}

/// Where a waiting request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedEvent {
    /// The model it waits for.
    pub model: String,
    /// 1 = next to run.
    pub position: u32,
    /// What it waits for, for people ("model is loading", …).
    pub waiting_for: String,
}

/// Work done so far on a long request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// Units done.
    pub done: u64,
    /// Units in all; 0 when unknown.
    pub total: u64,
    /// What is happening, for people.
    pub message: String,
}

/// `Ping` takes no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingRequest {}

/// `Ping`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {}

/// `Status` takes no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {}

/// The daemon's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The daemon's package version.
    pub daemon_version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// The socket the daemon listens on.
    pub socket: String,
    /// The configuration in force.
    pub config: ConfigStatus,
    /// Client connections open now, this one included.
    pub connections: u32,
    /// Every configured model's state, sorted by name.
    pub models: Vec<ModelStatus>,
}

/// One model's life-cycle state and history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The model's name.
    pub name: String,
    /// Where it is in its life cycle.
    pub state: ModelState,
    /// The device it is loaded on.
    pub device: Option<String>,
    /// The worker process hosting it.
    pub pid: Option<u32>,
    /// Bytes it holds on its device, as its worker reported.
    pub device_bytes: u64,
    /// Requests waiting for it.
    pub queued: u32,
    /// Requests running on it.
    pub in_flight: u32,
    /// Milliseconds since its last request ended.
    pub idle_ms: Option<u64>,
    /// Milliseconds until it is unloaded for being idle; `None`: not counting down.
    pub unload_in_ms: Option<u64>,
    /// The keep-alive in force (a request may have changed it).
    pub keep_alive: KeepAlive,
    /// Times it has been loaded since the daemon started.
    pub loads: u64,
    /// How long its last load took.
    pub last_load_ms: Option<u64>,
    /// Its last failure, if any.
    pub last_error: Option<String>,
}

/// The life-cycle states of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelState {
    /// Not resident.
    Unloaded,
    /// Its worker is starting.
    Loading,
    /// Resident and serving.
    Ready,
    /// Finishing its work before it is unloaded.
    Draining,
    /// Its worker is exiting.
    Unloading,
    /// The last load failed; a request after `retry_in_ms` tries again.
    Failed {
        /// Milliseconds until a new load may be tried.
        retry_in_ms: u64,
    },
}

/// Which configuration is in force and how the last reload went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// The file it came from; `None` for the embedded default.
    pub path: Option<String>,
    /// 1 at start-up, +1 for every configuration applied since.
    pub generation: u64,
    /// When the configuration in force was applied (Unix time, ms).
    pub applied_at_unix_ms: u64,
    /// The most recent reload attempt, successful or not.
    pub last_reload: Option<ReloadOutcome>,
}

/// What became of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// When it was attempted (Unix time, ms).
    pub at_unix_ms: u64,
    /// What asked for it.
    pub trigger: ReloadTrigger,
    /// `None` when it succeeded; otherwise why the running config was kept.
    pub error: Option<String>,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReloadTrigger {
    /// SIGHUP (`systemctl reload`).
    Signal,
    /// A `Reload` request (`gpuctl reload`).
    Request,
}

/// `Models` takes no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsRequest {}

/// The configured models, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsResponse {
    /// One entry per `[models.NAME]` table.
    pub models: Vec<ModelInfo>,
}

/// A configured model and its effective settings (defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name requests use.
    pub name: String,
    /// How a request becomes the model's inputs.
    pub kind: ModelKind,
    /// The TorchScript file, resolved against `model_root`.
    pub path: String,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// How long the model stays loaded once idle.
    pub keep_alive: KeepAlive,
    /// Loaded at start-up rather than on first use.
    pub preload: bool,
    /// Never evicted by the LRU cap or the idle timer.
    pub pin: bool,
    /// At most one model of a group is resident at a time.
    pub group: Option<String>,
    /// Output size / input size, for `image` models.
    pub scale: Option<u32>,
    /// Tile edge in pixels, for `image` models.
    pub tile: Option<u32>,
    /// Tile overlap in pixels, for `image` models.
    pub overlap: Option<u32>,
    /// Requests run at once on this model.
    pub concurrency: u32,
    /// Defaults for `generate` requests.
    pub defaults: GenerateDefaults,
}

/// The model contracts of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelKind {
    /// `(x: [N,3,H,W] 0..1) -> [N,3,sH,sW]`.
    Image,
    /// `(noise, prompt, negative, steps, guidance) -> [1,3,H,W]`.
    Generate,
    /// Tensors in, tensors out.
    Tensor,
}

impl ModelKind {
    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Image => "image",
            ModelKind::Generate => "generate",
            ModelKind::Tensor => "tensor",
        }
    }
}

/// How long an idle model stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeepAlive {
    /// This many milliseconds; 0 unloads as soon as the model is idle.
    Millis(u64),
    /// Until evicted or unloaded explicitly.
    Forever,
}

/// Defaults for `generate` requests; `None` leaves the choice to the model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateDefaults {
    /// Output width and height in pixels.
    pub size: Option<(u32, u32)>,
    /// Sampling steps.
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    pub guidance: Option<f32>,
}

/// `Reload` takes no arguments: the daemon re-reads the file it started with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRequest {}

/// A reload that was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResponse {
    /// The generation now in force.
    pub generation: u64,
    /// Whether the new configuration differs from the previous one.
    pub changed: bool,
    /// Models configured now.
    pub models: u32,
}

/// Run `model` once. Fields that do not apply to its kind must be empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The configured model's name.
    pub model: String,
    /// `image` models: the picture, `[N,3,H,W]` u8 0..255 or float 0..1.
    pub input: Option<crate::WireTensor>,
    /// `tensor` models: the forward's arguments.
    pub inputs: Vec<crate::WireTensor>,
    /// `generate` models: what to make.
    pub prompt: String,
    /// `generate` models: what to avoid.
    pub negative: String,
    /// `generate` models: the noise seed; `None` picks one and reports it.
    pub seed: Option<u64>,
    /// `generate` models: sampling steps (default: the model's `defaults`).
    pub steps: Option<u32>,
    /// `generate` models: guidance scale.
    pub guidance: Option<f32>,
    /// `generate` models: output width and height.
    pub size: Option<(u32, u32)>,
    /// Keep the model this long once idle (clamped by `max_keep_alive`).
    pub keep_alive: Option<KeepAlive>,
}

/// What ran and what it made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    /// The model that ran.
    pub model: String,
    /// Where it ran.
    pub device: String,
    /// The seed used (`generate` models).
    pub seed: Option<u64>,
    /// The forward's outputs.
    pub outputs: Vec<crate::WireTensor>,
    /// Milliseconds spent waiting (for a load, a queue, a group switch).
    pub queue_ms: u64,
    /// The load this request waited for, if any.
    pub load_ms: Option<u64>,
    /// Milliseconds in the model.
    pub run_ms: u64,
}

/// Load `model` now, ahead of requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadRequest {
    /// The configured model's name.
    pub model: String,
    /// Keep it this long once idle (clamped by `max_keep_alive`).
    pub keep_alive: Option<KeepAlive>,
}

/// A model that is resident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadResponse {
    /// The model.
    pub model: String,
    /// Where it is.
    pub device: String,
    /// How long the load took; `None` when it was already loaded.
    pub load_ms: Option<u64>,
}

/// Unload a model, or every model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadRequest {
    /// The model; `None` for all of them.
    pub model: Option<String>,
    /// Cancel work in flight instead of waiting for it.
    pub force: bool,
}

/// What was unloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadResponse {
    /// Models whose workers have exited, by name.
    pub unloaded: Vec<String>,
}

/// `Vram` takes no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramRequest {}

/// GPU memory as the daemon's probe sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramResponse {
    /// `nvml`, `sim` or `none`.
    pub backend: String,
    /// Why that backend (e.g. "auto: no NVIDIA GPU (…)").
    pub reason: String,
    /// One entry per device; empty without a GPU.
    pub devices: Vec<GpuDevice>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// Its index (`cuda:N`).
    pub index: u32,
    /// Its name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Bytes in all.
    pub total: u64,
    /// Bytes in use, by anyone.
    pub used: u64,
    /// Bytes free.
    pub free: u64,
    /// Processes holding memory on it.
    pub processes: Vec<GpuProcess>,
}

/// A process's memory on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Its pid.
    pub pid: u32,
    /// Its name, e.g. "ollama".
    pub name: String,
    /// Bytes it holds.
    pub bytes: u64,
    /// The model, when it is one of our workers.
    pub model: Option<String>,
}
