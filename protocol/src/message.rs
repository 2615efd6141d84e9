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
// Hello is sent once per connection; boxing Request would only make every
// client write `Box::new`.
#[allow(clippy::large_enum_variant)]
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
    /// The start of a tensor streamed for request `id` (sent before it);
    /// see [`crate::stream`].
    TensorBegin {
        /// The request the tensor belongs to.
        id: RequestId,
        /// Its element type.
        dtype: crate::DType,
        /// Its dimensions.
        shape: Vec<u64>,
    },
    /// The next bytes of the tensor begun last for request `id`.
    TensorChunk {
        /// The request the tensor belongs to.
        id: RequestId,
        /// At most [`crate::CHUNK_BYTES`].
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The tensor begun last for request `id` is complete.
    TensorEnd {
        /// The request the tensor belongs to.
        id: RequestId,
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
    /// The start of an output tensor of request `id`, streamed before its
    /// `Response` (clients of protocol 1.1 and later); see [`crate::stream`].
    TensorBegin {
        /// The request the tensor answers.
        id: RequestId,
        /// Its element type.
        dtype: crate::DType,
        /// Its dimensions.
        shape: Vec<u64>,
    },
    /// The next bytes of the tensor begun last for request `id`.
    TensorChunk {
        /// The request the tensor answers.
        id: RequestId,
        /// At most [`crate::CHUNK_BYTES`].
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The tensor begun last for request `id` is complete.
    TensorEnd {
        /// The request the tensor answers.
        id: RequestId,
    },
}

impl ClientMessage {
    /// A frame of a tensor streamed for request `id`.
    pub fn tensor_frame(id: RequestId, frame: crate::TensorFrame) -> ClientMessage {
        match frame {
            crate::TensorFrame::Begin { dtype, shape } => {
                ClientMessage::TensorBegin { id, dtype, shape }
            }
            crate::TensorFrame::Chunk(data) => ClientMessage::TensorChunk { id, data },
            crate::TensorFrame::End => ClientMessage::TensorEnd { id },
        }
    }
}

impl DaemonMessage {
    /// A frame of an output tensor of request `id`.
    pub fn tensor_frame(id: RequestId, frame: crate::TensorFrame) -> DaemonMessage {
        match frame {
            crate::TensorFrame::Begin { dtype, shape } => {
                DaemonMessage::TensorBegin { id, dtype, shape }
            }
            crate::TensorFrame::Chunk(data) => DaemonMessage::TensorChunk { id, data },
            crate::TensorFrame::End => DaemonMessage::TensorEnd { id },
        }
    }
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
// Generate is the request that matters; boxing it would make every client
// write `Box::new`.
#[allow(clippy::large_enum_variant)]
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
    /// Keep GPU memory free for another program (cooperative arbitration).
    Reserve(ReserveRequest),
    /// End a reservation made on this connection.
    Release(ReleaseRequest),
    /// Stream the daemon's notices (loads, unloads, pressure, …) as events
    /// until the client hangs up.
    Watch(WatchRequest),
    /// Cancel another request of this connection: it ends with
    /// `Error(Cancelled)`, a running job at its next batch boundary.
    Cancel(CancelRequest),
    /// Run a model, then each of the `image` models named in `then` on the
    /// previous step's image, inside gpuctld (1.6).
    GenerateThen(GenerateThenRequest),
}

impl Request {
    /// The `Generate` request inside a `Generate` or `GenerateThen`: the one
    /// whose tensors stream.
    pub fn generate_mut(&mut self) -> Option<&mut GenerateRequest> {
        match self {
            Request::Generate(request) => Some(request),
            Request::GenerateThen(chain) => Some(&mut chain.request),
            _ => None,
        }
    }

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
            Request::Reserve(_) => "reserve",
            Request::Release(_) => "release",
            Request::Watch(_) => "watch",
            Request::Cancel(_) => "cancel",
            Request::GenerateThen(_) => "generate",
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
    /// Answer to [`Request::Reserve`]: granted.
    Reserve(ReserveResponse),
    /// Answer to [`Request::Release`].
    Release(ReleaseResponse),
    /// Answer to [`Request::Watch`], sent only when the daemon shuts down.
    Watch(WatchResponse),
    /// Answer to [`Request::Cancel`].
    Cancel(CancelResponse),
    /// Answer to [`Request::GenerateThen`].
    GenerateThen(GenerateThenResponse),
}

impl Response {
    /// The `Generate` response inside a `Generate` or `GenerateThen`: the
    /// one whose outputs stream.
    pub fn generate_mut(&mut self) -> Option<&mut GenerateResponse> {
        match self {
            Response::Generate(response) => Some(response),
            Response::GenerateThen(chain) => Some(&mut chain.response),
            _ => None,
        }
    }
}

/// Something that happened while a request runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Work done so far.
    Progress(ProgressEvent),
    /// The request waits; sent when it starts waiting and when its place
    /// in the line changes.
    Queued(QueuedEvent),
    /// Something the daemon did or saw (`Watch` streams these).
    Notice(Notice),
}

/// Something the daemon did or saw, as `gpuctl watch` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// When (Unix time, ms).
    pub at_unix_ms: u64,
    /// What.
    pub what: NoticeKind,
}

/// The kinds of [`Notice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// A model finished loading.
    Loaded {
        /// The model.
        model: String,
        /// Its device, e.g. `cuda:0`.
        device: String,
        /// Its worker.
        pid: u32,
        /// How long the load took.
        load_ms: u64,
    },
    /// A model's load failed.
    LoadFailed {
        /// The model.
        model: String,
        /// Why.
        error: String,
    },
    /// A model's worker has exited and its memory is back.
    Unloaded {
        /// The model.
        model: String,
        /// Its worker.
        pid: u32,
        /// Why it was unloaded.
        reason: UnloadReason,
        /// GPU bytes given back (0 without a GPU).
        reclaimed: u64,
        /// From the decision to unload to the memory being back.
        took_ms: u64,
    },
    /// Free memory on a device fell below `min_free_vram`.
    Pressure {
        /// The device's index.
        device: u32,
        /// Bytes free.
        free: u64,
        /// `gpu.min_free_vram`.
        min_free: u64,
        /// The other program whose use grew most (or holds most).
        holder: Option<Holder>,
    },
    /// A reservation was granted.
    Reserved {
        /// Its id.
        reservation: u64,
        /// The device.
        device: u32,
        /// Bytes kept free.
        bytes: u64,
        /// The process that asked.
        pid: Option<u32>,
    },
    /// A reservation ended.
    Released {
        /// Its id.
        reservation: u64,
        /// The device.
        device: u32,
        /// Bytes it kept.
        bytes: u64,
        /// Why it ended ("released", "connection closed", "ttl expired").
        why: String,
    },
    /// A configuration reload was applied or failed. Peers of 1.6 get
    /// [`NoticeKind::ReloadedBy`] instead, which says what asked for it.
    Reloaded {
        /// The generation in force afterwards.
        generation: u64,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// A request waits for GPU memory.
    WaitingForVram {
        /// The model to load.
        model: String,
        /// For people: "waiting for 6.1 GiB on GPU 0: ollama (pid 4121) holds 18.2 GiB".
        message: String,
    },
    /// A configuration reload was applied or failed, and what asked for
    /// it (protocol 1.6; older peers get [`NoticeKind::Reloaded`]).
    ReloadedBy {
        /// The generation in force afterwards.
        generation: u64,
        /// SIGHUP, a `Reload` request, or the file being saved.
        trigger: ReloadTrigger,
        /// Why it failed, if it did.
        error: Option<String>,
    },
}

/// Why a model was unloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnloadReason {
    /// Idle for longer than its keep-alive.
    IdleTimeout,
    /// Evicted, least recently used first, to stay within `max_loaded` or to
    /// make room for another model.
    Lru,
    /// Another program needed the memory.
    Pressure {
        /// That program, when one could be named.
        holder: Option<Holder>,
    },
    /// Evicted to grant a reservation.
    Reservation,
    /// Another model of its group was requested.
    GroupSwitch,
    /// `gpuctl unload`.
    Explicit,
    /// Its configuration changed, its file was replaced, or it was removed.
    Reload,
    /// Its worker died.
    Crash {
        /// How ("signal 9 (SIGKILL, …)").
        description: String,
    },
    /// A job it ran was stopped (timeout, `Cancel`, its client left) and
    /// did not end within `policy.cancel_grace`, since a forward cannot be
    /// interrupted: its worker was killed, and the next request loads the
    /// model again (protocol 1.3).
    Stuck {
        /// Which job, and for how long it went on ("job 3 went on 10s
        /// after it was cancelled").
        description: String,
    },
}

impl std::fmt::Display for UnloadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnloadReason::IdleTimeout => f.write_str("idle timeout"),
            UnloadReason::Lru => f.write_str("lru"),
            UnloadReason::Pressure { holder: Some(h) } => {
                write!(f, "pressure from {} (pid {})", h.name, h.pid)
            }
            UnloadReason::Pressure { holder: None } => f.write_str("pressure"),
            UnloadReason::Reservation => f.write_str("reservation"),
            UnloadReason::GroupSwitch => f.write_str("group switch"),
            UnloadReason::Explicit => f.write_str("explicit"),
            UnloadReason::Reload => f.write_str("reload"),
            UnloadReason::Crash { description } => write!(f, "crash ({description})"),
            UnloadReason::Stuck { description } => write!(f, "stuck ({description})"),
        }
    }
}

/// Another program holding GPU memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its name, e.g. "ollama".
    pub name: String,
    /// Bytes it holds.
    pub bytes: u64,
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
    /// What is happening, for people ("tile 12/81").
    pub message: String,
    /// Milliseconds since the work started.
    pub elapsed_ms: u64,
    /// Estimated milliseconds left; `None` when unknown.
    pub eta_ms: Option<u64>,
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
    /// The GPU memory it is expected to need.
    pub vram_need: u64,
    /// Where that figure comes from: "configured", "measured" or "file size × 1.2".
    pub vram_need_source: String,
    /// Why it was last unloaded.
    pub last_unload: Option<UnloadReason>,
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
    /// Requests wait for GPU memory to load it.
    WaitingForVram,
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
    /// The configuration file was saved (`daemon.watch_config`).
    FileChange,
}

impl ReloadTrigger {
    /// For people: "SIGHUP", "gpuctl reload", "file change".
    pub fn describe(self) -> &'static str {
        match self {
            ReloadTrigger::Signal => "SIGHUP",
            ReloadTrigger::Request => "gpuctl reload",
            ReloadTrigger::FileChange => "file change",
        }
    }
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
    /// `image` models: the picture, u8 0..255 or float 0..1, as planes
    /// `[N,3,H,W]` or (from clients of 1.4) rows of pixels `[N,H,W,3]`.
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
    /// Give up after this many milliseconds, waiting included; `None`:
    /// `policy.request_timeout`.
    pub timeout_ms: Option<u64>,
    /// `image` models: tile edge in input pixels, overriding the model's
    /// `tile`; `Some(0)`: one forward over the whole image.
    pub tile: Option<u32>,
    /// `image` models: overlap between tiles, overriding the model's.
    pub overlap: Option<u32>,
}

impl GenerateRequest {
    /// Its tensors, in wire order (`input`, then `inputs`): the order in
    /// which streamed ones fill their placeholders.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut crate::WireTensor> {
        self.input.iter_mut().chain(self.inputs.iter_mut())
    }

    /// A request for `model` with every argument left to its defaults; fill
    /// in what its kind takes with struct update syntax.
    pub fn new(model: impl Into<String>) -> GenerateRequest {
        GenerateRequest {
            model: model.into(),
            input: None,
            inputs: Vec::new(),
            prompt: String::new(),
            negative: String::new(),
            seed: None,
            steps: None,
            guidance: None,
            size: None,
            keep_alive: None,
            timeout_ms: None,
            tile: None,
            overlap: None,
        }
    }
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
    /// What the worker had to do to finish: out-of-memory back-off (smaller
    /// batches or tiles), retried tiles.
    pub notes: Vec<String>,
}

/// A generation (or an `image` request) followed by more `image` models,
/// each run on the previous step's image inside gpuctld, never back through
/// the client: e.g. generate, then upscale ×4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateThenRequest {
    /// The first step, as a `Generate` request; its timeout and keep-alive
    /// apply to the whole chain and to every step.
    pub request: GenerateRequest,
    /// The `image` models to run next, in order.
    pub then: Vec<String>,
}

/// The last step's result, and what each step took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateThenResponse {
    /// The last step's response (its `notes` are that step's).
    pub response: GenerateResponse,
    /// Every step, the first included, in order.
    pub steps: Vec<StepReport>,
}

/// What one step of a chain took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step's model.
    pub model: String,
    /// Where it ran.
    pub device: String,
    /// Milliseconds it waited (for a load, a queue, a group switch).
    pub queue_ms: u64,
    /// The load it waited for, if any.
    pub load_ms: Option<u64>,
    /// Milliseconds in the model.
    pub run_ms: u64,
    /// What its worker had to do to finish, and what happened between steps.
    pub notes: Vec<String>,
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
    /// `gpu.min_free_vram`: what gpuctld leaves free for others.
    pub min_free: u64,
    /// Reservations alive or waiting.
    pub reservations: Vec<ReservationInfo>,
    /// GPU samples taken since gpuctld started (it samples only while it
    /// holds or waits for memory, and for `Vram`).
    pub samples: u64,
}

/// A reservation, as `gpuctl vram` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationInfo {
    /// Its id.
    pub id: u64,
    /// The device; `None` while not yet placed.
    pub device: Option<u32>,
    /// Bytes asked for.
    pub bytes: u64,
    /// The part its holder does not use yet, kept out of admissions.
    pub unused: u64,
    /// The process that asked.
    pub pid: Option<u32>,
    /// Whether it has been granted.
    pub granted: bool,
    /// Milliseconds since it was asked for.
    pub age_ms: u64,
}

/// Keep `bytes` free on a GPU for another program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// Bytes to keep free.
    pub bytes: u64,
    /// The device; `None`: the one where it fits best.
    pub device: Option<u32>,
    /// Give up with `InsufficientVram` after this many milliseconds.
    pub timeout_ms: u64,
    /// End the reservation after this many milliseconds; `None`: when the
    /// connection closes or `Release` is sent.
    pub ttl_ms: Option<u64>,
}

/// A granted reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveResponse {
    /// Its id, for `Release`.
    pub reservation: u64,
    /// Where the memory is kept.
    pub device: u32,
    /// Bytes kept free.
    pub bytes: u64,
}

/// End a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The id `Reserve` returned.
    pub reservation: u64,
}

/// `Release`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// Bytes no longer kept free.
    pub bytes: u64,
}

/// Cancel request `id` of this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The request to cancel.
    pub id: RequestId,
}

/// `Cancel`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResponse {
    /// Whether that request was still in flight.
    pub cancelled: bool,
}

/// `Watch` takes no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {}

/// The end of a watch (the daemon is shutting down).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchResponse {}

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
    /// Bytes kept free for reservations and not yet used by their holders.
    pub reserved: u64,
    /// What gpuctld could still load here: free − min_free − reserved.
    pub headroom: u64,
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
    /// Its command line, from /proc (empty when unreadable).
    pub command: String,
}
