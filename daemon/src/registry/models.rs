//! Model life cycles inside the registry: queues, loads, jobs, unloads.
//!
//! `Unloaded → Loading → Ready → Unloading → Unloaded`, and a failed load
//! back to `Unloaded` with a retry time. Loads and jobs run in their own
//! tasks and report back as [`Event`]s, so the registry never waits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use gpuctl_protocol::worker::LoadModel;
use gpuctl_protocol::{
    Error, ErrorCode, GenerateResponse, KeepAlive, LoadResponse, ModelState, ModelStatus,
    NoticeKind, UnloadResponse,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::gpu::Reclaim;
use super::{PreparedJob, Registry};
use crate::config::{Config, Kind, ModelConfig};
use crate::gpu::DeviceSample;
use crate::pixels;
use crate::policy::{self, Admission, ModelChange, ModelView, Phase, UnloadReason};
use crate::worker::{self, Exit, JobOutput, WorkerHandle, WorkerJob};

/// What load and job tasks report back.
pub enum Event {
    Loaded {
        model: String,
        load: u64,
        result: Result<WorkerHandle, Error>,
    },
    JobDone {
        model: String,
        load: u64,
        succeeded: bool,
    },
    Exited {
        model: String,
        load: u64,
        exit: Exit,
    },
    /// A GPU sample, taken on a blocking thread.
    Sampled(Result<Vec<DeviceSample>, String>),
    /// The client of a waiting request has gone (disconnected, cancelled,
    /// timed out): it leaves the queue at once.
    Departed { model: String, ticket: u64 },
}

/// A load that waits for GPU memory.
pub struct VramWait {
    pub since: Instant,
    /// What its clients were last told.
    pub told: Option<String>,
}

enum Life {
    Unloaded,
    /// `kill` stops the load (`unload --force`).
    Loading {
        since: Instant,
        kill: CancellationToken,
    },
    Ready {
        worker: WorkerHandle,
    },
    /// `kill` ends the worker at once, whatever it is doing.
    Unloading {
        pid: u32,
        kill: CancellationToken,
    },
}

enum Waiter {
    Job {
        job: Box<PreparedJob>,
        /// Numbers it, so that its client's departure finds it.
        ticket: u64,
        reply: oneshot::Sender<Result<GenerateResponse, Error>>,
        since: Instant,
        /// The last queue position its client was told.
        told: Option<u32>,
    },
    Load {
        reply: oneshot::Sender<Result<LoadResponse, Error>>,
        since: Instant,
    },
}

impl Waiter {
    fn since(&self) -> Instant {
        match self {
            Waiter::Job { since, .. } | Waiter::Load { since, .. } => *since,
        }
    }
}

/// One configured model's state.
pub struct ModelEntry {
    life: Life,
    queue: VecDeque<Waiter>,
    pub in_flight: u32,
    last_used: Instant,
    /// Set by a request's keep-alive; otherwise the config decides.
    keep_alive: Option<KeepAlive>,
    /// Tickets handed to queued jobs so far.
    tickets: u64,
    /// Numbers each load, so events of an older worker are recognised.
    load: u64,
    loads: u64,
    last_load_ms: Option<u64>,
    last_error: Option<String>,
    failures: u32,
    retry_at: Option<Instant>,
    /// When the current worker finished loading: waiters older than this
    /// waited for the load, and are told how long it took.
    loaded_at: Option<Instant>,
    /// Unload once the current load finishes.
    unload_when_loaded: Option<UnloadReason>,
    /// The file's modification time and size when it was last loaded.
    loaded_file: Option<(std::time::SystemTime, u64)>,
    /// Told when the worker has exited.
    unload_waiters: Vec<oneshot::Sender<()>>,
    /// Set while its load waits for GPU memory.
    pub vram_wait: Option<VramWait>,
    /// The GPU its worker is on (as arbitration counts it); `None` when
    /// nothing is arbitrated (no GPU, or a CPU model).
    pub placement: Option<u32>,
    /// GPU bytes its current worker holds, as last measured.
    pub held: u64,
    /// The most its worker has held: the need used for admission.
    pub measured: Option<u64>,
    /// Why its worker is being unloaded, and since when.
    pub unloading: Option<(UnloadReason, Instant)>,
    /// Unload it as soon as its in-flight work ends (pressure).
    pub yield_after_work: Option<UnloadReason>,
    /// Why it was last unloaded.
    last_unload: Option<UnloadReason>,
}

impl ModelEntry {
    pub fn new() -> ModelEntry {
        ModelEntry {
            life: Life::Unloaded,
            queue: VecDeque::new(),
            in_flight: 0,
            last_used: Instant::now(),
            keep_alive: None,
            tickets: 0,
            load: 0,
            loads: 0,
            last_load_ms: None,
            last_error: None,
            failures: 0,
            retry_at: None,
            loaded_at: None,
            unload_when_loaded: None,
            loaded_file: None,
            unload_waiters: Vec::new(),
            vram_wait: None,
            placement: None,
            held: 0,
            measured: None,
            unloading: None,
            yield_after_work: None,
            last_unload: None,
        }
    }

    /// The size of its file when it was last loaded.
    pub fn loaded_file_bytes(&self) -> u64 {
        self.loaded_file.map_or(0, |(_, bytes)| bytes)
    }

    /// The worker's pid while it is running.
    pub fn pid(&self) -> Option<u32> {
        match &self.life {
            Life::Ready { worker } => Some(worker.pid),
            Life::Unloading { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Whether it is being loaded (its memory may not show yet).
    pub fn loading(&self) -> bool {
        matches!(self.life, Life::Loading { .. })
    }

    /// Whether its worker is on its way out.
    pub fn leaving(&self) -> bool {
        matches!(self.life, Life::Unloading { .. })
    }

    /// Ready, nothing running, nobody waiting.
    pub fn idle(&self) -> bool {
        matches!(self.life, Life::Ready { .. }) && self.in_flight == 0 && self.queue.is_empty()
    }

    /// Ready (idle or not).
    pub fn ready(&self) -> bool {
        matches!(self.life, Life::Ready { .. })
    }

    pub fn last_used(&self) -> Instant {
        self.last_used
    }

    /// The device bytes its worker reported at load.
    pub fn reported_bytes(&self) -> u64 {
        match &self.life {
            Life::Ready { worker } => worker.loaded.device_bytes,
            _ => 0,
        }
    }

    pub fn has_waiters(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Fails every waiting request with `error`.
    pub fn fail_waiters(&mut self, error: &Error) {
        fail_all(&mut self.queue, error);
    }

    /// Tells waiting generate clients their place and what they wait for:
    /// all of them when `what changed`, else those whose place changed.
    pub fn tell_waiting(&mut self, model: &str, waiting_for: &str, what_changed: bool) {
        for (index, waiter) in self.queue.iter_mut().enumerate() {
            let Waiter::Job { job, told, .. } = waiter else {
                continue;
            };
            let position = index as u32 + 1;
            if !what_changed && *told == Some(position) {
                continue;
            }
            *told = Some(position);
            if let Some(events) = &job.events {
                events.send(gpuctl_protocol::Event::Queued(
                    gpuctl_protocol::QueuedEvent {
                        model: model.to_owned(),
                        position,
                        waiting_for: waiting_for.to_owned(),
                    },
                ));
            }
        }
    }

    fn phase(&self) -> Phase {
        match self.life {
            // Admitted, waiting for memory: it holds its place.
            Life::Unloaded if self.vram_wait.is_some() => Phase::Loading,
            Life::Unloaded => Phase::Unloaded,
            Life::Loading { .. } => Phase::Loading,
            Life::Ready { .. } => Phase::Ready {
                in_flight: self.in_flight,
            },
            Life::Unloading { .. } => Phase::Unloading,
        }
    }
}

/// The error for a model name that is not configured, listing those that are.
pub fn not_found(model: &str, config: &Config) -> Error {
    let known: Vec<&str> = config.models.keys().map(String::as_str).collect();
    let known = if known.is_empty() {
        "none is configured".to_owned()
    } else {
        format!("configured: {}", known.join(", "))
    };
    Error::new(
        ErrorCode::NotFound,
        format!("no model named {model:?} ({known})"),
    )
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Registry {
    fn keep_alive_of(&self, name: &str, config: &Config) -> KeepAlive {
        let configured = config
            .models
            .get(name)
            .map(|m| m.keep_alive.unwrap_or(config.policy.keep_alive).0)
            .unwrap_or(config.policy.keep_alive.0);
        let requested = self.models.get(name).and_then(|e| e.keep_alive);
        policy::keep_alive(configured, requested, config.policy.max_keep_alive.0)
    }

    fn views(&self, config: &Config) -> Vec<ModelView> {
        self.models
            .iter()
            .map(|(name, entry)| {
                let model = config.models.get(name);
                ModelView {
                    name: name.clone(),
                    phase: entry.phase(),
                    queued: entry.queue.len(),
                    oldest_waiter: entry.queue.front().map(Waiter::since),
                    last_used: entry.last_used,
                    keep_alive: self.keep_alive_of(name, config),
                    pin: model.is_some_and(|m| m.pin),
                    group: model.and_then(|m| m.group.clone()),
                }
            })
            .collect()
    }

    pub(super) fn next_expiry(&self) -> Option<Instant> {
        policy::next_expiry(&self.views(&self.config()))
    }

    pub(super) fn expire_idle(&mut self) {
        let config = self.config();
        for name in policy::expired(&self.views(&config), Instant::now()) {
            self.unload(&name, UnloadReason::IdleTimeout, false);
        }
    }

    pub(super) fn preload(&mut self) {
        let config = self.config();
        for (name, model) in &config.models {
            if model.preload {
                tracing::info!(model = %name, "preloading");
                self.enqueue_preload(name);
            }
        }
    }

    fn enqueue_preload(&mut self, name: &str) {
        let (reply, answer) = oneshot::channel();
        if let Some(entry) = self.models.get_mut(name) {
            entry.queue.push_back(Waiter::Load {
                reply,
                since: Instant::now(),
            });
        }
        let model = name.to_owned();
        tokio::spawn(async move {
            if let Ok(Err(error)) = answer.await {
                tracing::warn!(model, error = %error.message, "preload failed");
            }
        });
        self.pump(name);
    }

    /// Queues a job (bounded by `queue_max`) and moves things along.
    pub(super) fn submit_job(
        &mut self,
        job: PreparedJob,
        reply: oneshot::Sender<Result<GenerateResponse, Error>>,
    ) {
        let config = self.config();
        let name = job.model.clone();
        let queue_max = config.policy.queue_max as usize;
        let Some(entry) = self.models.get_mut(&name) else {
            let _ = reply.send(Err(not_found(&name, &config)));
            return;
        };
        if entry.queue.len() + entry.in_flight as usize >= queue_max {
            let error = Error::new(
                ErrorCode::QueueFull,
                format!("model {name} has {queue_max} requests queued or running (policy.queue_max); try again later"),
            );
            let _ = reply.send(Err(error));
            return;
        }
        if job.keep_alive.is_some() {
            entry.keep_alive = job.keep_alive;
        }
        entry.tickets += 1;
        let ticket = entry.tickets;
        let reply = watch_departure(reply, name.clone(), ticket, self.events.clone());
        entry.queue.push_back(Waiter::Job {
            job: Box::new(job),
            ticket,
            reply,
            told: None,
            since: Instant::now(),
        });
        self.pump(&name);
    }

    /// A waiting request whose client has gone leaves the queue at once,
    /// so it holds no place in `queue_max` and the others move up.
    fn on_departed(&mut self, name: &str, ticket: u64) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let before = entry.queue.len();
        entry
            .queue
            .retain(|w| !matches!(w, Waiter::Job { ticket: t, .. } if *t == ticket));
        if entry.queue.len() < before {
            tracing::info!(
                model = name,
                queued = entry.queue.len(),
                "a waiting request's client has gone; it left the queue"
            );
            self.pump(name);
        }
    }

    pub(super) fn submit_load(
        &mut self,
        name: String,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<LoadResponse, Error>>,
    ) {
        let config = self.config();
        let Some(entry) = self.models.get_mut(&name) else {
            let _ = reply.send(Err(not_found(&name, &config)));
            return;
        };
        if keep_alive.is_some() {
            entry.keep_alive = keep_alive;
        }
        entry.queue.push_back(Waiter::Load {
            reply,
            since: Instant::now(),
        });
        self.pump(&name);
    }

    /// Serves what can be served: dispatches jobs to a ready worker, or
    /// starts a load (evicting what policy says) for a model with waiters.
    fn pump(&mut self, name: &str) {
        self.advance(name);
        self.tell_positions(name);
    }

    /// Tells waiting clients where they stand, when that changed.
    fn tell_positions(&mut self, name: &str) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        if entry.vram_wait.is_some() {
            return; // the GPU sampler tells them
        }
        let waiting_for = match entry.life {
            Life::Unloaded => "its turn to load (group switch or max_loaded)",
            Life::Loading { .. } => "the model to load",
            Life::Ready { .. } => "a free slot",
            Life::Unloading { .. } => "the previous worker to exit",
        };
        entry.tell_waiting(name, waiting_for, false);
    }

    /// Dispatches jobs to a ready worker, or starts a load (evicting what
    /// policy says) for a model with waiters.
    fn advance(&mut self, name: &str) {
        let config = self.config();
        let Some(model) = config.models.get(name) else {
            return;
        };
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        match entry.life {
            Life::Ready { .. } => return self.dispatch(name, model),
            Life::Unloaded if !entry.queue.is_empty() && entry.vram_wait.is_none() => {}
            _ => return,
        }
        let now = Instant::now();
        if let Some(retry_at) = entry.retry_at.filter(|t| *t > now) {
            let reason = entry.last_error.clone().unwrap_or_default();
            let wait =
                gpuctl_protocol::units::format_duration_ms((ms(retry_at - now) / 1000 + 1) * 1000);
            let error = Error::new(
                ErrorCode::LoadFailed,
                format!("{reason}; the next attempt is allowed in {wait}"),
            );
            fail_all(&mut entry.queue, &error);
            return;
        }
        // A file that is not there fails now, before anything is evicted for it.
        let path = config.model_path(model);
        if let Err(error) = std::fs::metadata(&path) {
            let error = Error::new(
                ErrorCode::NotFound,
                format!("model {name}: cannot read {}: {error}", path.display()),
            );
            return self.record_load_failure(name, error);
        }
        match policy::admit(
            &self.views(&config),
            name,
            config.policy.max_loaded as usize,
        ) {
            Admission::Load { evict } => {
                for (victim, reason) in evict {
                    self.unload(&victim, reason, false);
                }
                if self.arbitrated(model) {
                    // The GPU sampler admits it once it fits.
                    if let Some(entry) = self.models.get_mut(name) {
                        entry.vram_wait = Some(VramWait {
                            since: Instant::now(),
                            told: None,
                        });
                    }
                    self.request_sample();
                } else {
                    self.start_load(name, model, &config, None);
                }
            }
            Admission::Wait { because } => tracing::debug!(model = name, because, "load waits"),
        }
    }

    /// Pumps every model with waiters: an unload may have made room.
    pub(super) fn pump_all(&mut self) {
        let waiting: Vec<String> = self
            .models
            .iter()
            .filter(|(_, e)| !e.queue.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in waiting {
            self.pump(&name);
        }
    }

    fn dispatch(&mut self, name: &str, model: &ModelConfig) {
        let events = self.events.clone();
        // Requests that arrived after one waiting for another member of the
        // group wait for the switch and back: FIFO across the group.
        let barrier = policy::group_barrier(&self.views(&self.config()), name);
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let Life::Ready { worker } = &entry.life else {
            return;
        };
        if entry.yield_after_work.is_some() {
            return; // it leaves once its work is done; the rest wait for memory
        }
        let device = worker.loaded.device.clone();
        // The load time, for waiters that arrived before the load finished.
        let (loaded_at, last_load_ms) = (entry.loaded_at, entry.last_load_ms);
        let load_ms_since =
            move |since: Instant| loaded_at.filter(|at| since < *at).and(last_load_ms);
        let as_pixels = model.kind != Kind::Tensor;
        while entry.in_flight < model.concurrency {
            if entry
                .queue
                .front()
                .is_some_and(|w| barrier.is_some_and(|b| w.since() > b))
            {
                break;
            }
            let Some(waiter) = entry.queue.pop_front() else {
                break;
            };
            match waiter {
                Waiter::Load { reply, since } => {
                    let answer = LoadResponse {
                        model: name.to_owned(),
                        device: device.clone(),
                        load_ms: load_ms_since(since),
                    };
                    let _ = reply.send(Ok(answer));
                    entry.last_used = Instant::now();
                }
                Waiter::Job { reply, .. } if reply.is_closed() => {
                    tracing::debug!(model = name, "its client left while it waited; dropped");
                }
                Waiter::Job {
                    job, reply, since, ..
                } => {
                    let (done, result) = oneshot::channel();
                    let queue_ms = ms(since.elapsed());
                    let PreparedJob {
                        model: model_name,
                        job,
                        seed,
                        events: progress,
                        ..
                    } = *job;
                    // Workers send pictures as rows of RGB8 pixels; clients
                    // before protocol 1.2 take them planar.
                    let planar =
                        as_pixels && !progress.as_ref().is_some_and(|p| p.takes_pixel_rows());
                    let (cancel, cancelled) = oneshot::channel();
                    if let Err(refused) = worker.run(WorkerJob {
                        job,
                        reply: done,
                        progress,
                        cancel: cancelled,
                    }) {
                        let _ = refused.reply.send(Err(Error::new(
                            ErrorCode::Internal,
                            format!("model {name}: its worker is gone"),
                        )));
                    }
                    entry.in_flight += 1;
                    let (events, device, load) = (events.clone(), device.clone(), entry.load);
                    let waited_for_load = load_ms_since(since);
                    let mut reply = reply;
                    tokio::spawn(async move {
                        let mut result = result;
                        // A client that hangs up (or cancels) stops its job
                        // at the worker's next batch boundary.
                        let finished = tokio::select! {
                            finished = &mut result => Some(finished),
                            _ = reply.closed() => None,
                        };
                        let finished = match finished {
                            Some(finished) => finished,
                            None => {
                                let _ = cancel.send(());
                                let finished = result.await;
                                if let Ok(Err(error)) = &finished {
                                    tracing::info!(model = %model_name, error = %error.message, "job of a client that left has stopped");
                                }
                                finished
                            }
                        };
                        let outcome = finished.unwrap_or_else(|_| {
                            Err(Error::new(
                                ErrorCode::Internal,
                                format!("model {model_name}: its worker is gone"),
                            ))
                        });
                        let succeeded = outcome.is_ok();
                        let outcome = match outcome {
                            // Up to max_output of pixels: CPU work, off the runtime.
                            Ok(mut output) if planar => {
                                let outputs = std::mem::take(&mut output.outputs);
                                match tokio::task::spawn_blocking(move || {
                                    outputs.into_iter().map(pixels::to_planar).collect()
                                })
                                .await
                                {
                                    Ok(outputs) => {
                                        output.outputs = outputs;
                                        Ok(output)
                                    }
                                    Err(error) => Err(Error::new(
                                        ErrorCode::Internal,
                                        format!("model {model_name}: making its output planar failed: {error}"),
                                    )),
                                }
                            }
                            other => other,
                        };
                        let answer = outcome.map(
                            |JobOutput {
                                 outputs,
                                 run_ms,
                                 notes,
                             }| GenerateResponse {
                                model: model_name.clone(),
                                device,
                                seed,
                                outputs,
                                queue_ms,
                                load_ms: waited_for_load,
                                run_ms,
                                notes,
                            },
                        );
                        let _ = reply.send(answer);
                        let _ = events.send(Event::JobDone {
                            model: model_name,
                            load,
                            succeeded,
                        });
                    });
                }
            }
        }
    }

    /// Starts a worker for `name`; `placement`: the GPU arbitration put it on.
    pub(super) fn start_load(
        &mut self,
        name: &str,
        model: &ModelConfig,
        config: &Config,
        placement: Option<u32>,
    ) {
        let device = self.worker_device(model, placement);
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        entry.vram_wait = None;
        entry.placement = placement;
        entry.held = 0;
        entry.load += 1;
        entry.loaded_file = file_identity(&config.model_path(model));
        let kill = CancellationToken::new();
        entry.life = Life::Loading {
            since: Instant::now(),
            kill: kill.clone(),
        };
        let load = entry.load;
        let spec = LoadModel {
            name: name.to_owned(),
            path: config.model_path(model).display().to_string(),
            kind: model.kind.into(),
            device,
            threads: worker_threads(model, config),
            rgb8: model.kind != Kind::Tensor,
            fp16: model.precision == crate::config::Precision::Fp16,
        };
        tracing::info!(model = name, path = %spec.path, device = %spec.device, "loading");
        let program = self.worker_program.clone();
        let limits = worker::Limits {
            max_output: config.daemon.max_output.0 as usize,
            cancel_grace: config.policy.cancel_grace.0,
        };
        let events = self.events.clone();
        let model_name = name.to_owned();
        tokio::spawn(async move {
            let on_exit = {
                let (events, model) = (events.clone(), model_name.clone());
                move |exit| {
                    let _ = events.send(Event::Exited { model, load, exit });
                }
            };
            let result = worker::start(&program, spec, limits, kill, on_exit).await;
            let _ = events.send(Event::Loaded {
                model: model_name,
                load,
                result,
            });
        });
    }

    pub(super) fn on_event(&mut self, event: Event) {
        match event {
            Event::Loaded {
                model,
                load,
                result,
            } => self.on_loaded(&model, load, result),
            Event::JobDone {
                model,
                load,
                succeeded,
            } => {
                let mut leave = None;
                if let Some(entry) = self.models.get_mut(&model).filter(|e| e.load == load) {
                    entry.in_flight = entry.in_flight.saturating_sub(1);
                    entry.last_used = Instant::now();
                    if succeeded {
                        entry.failures = 0;
                    }
                    if entry.in_flight == 0 {
                        leave = entry.yield_after_work.take();
                    }
                }
                if let Some(reason) = leave {
                    self.unload(&model, reason, false);
                }
                self.pump(&model);
                // Its becoming idle may unblock a group switch or the LRU cap.
                self.pump_all();
            }
            Event::Exited { model, load, exit } => self.on_exited(&model, load, exit),
            Event::Sampled(sample) => self.on_sampled(sample),
            Event::Departed { model, ticket } => self.on_departed(&model, ticket),
        }
    }

    fn on_loaded(&mut self, name: &str, load: u64, result: Result<WorkerHandle, Error>) {
        let Some(entry) = self.models.get_mut(name).filter(|e| e.load == load) else {
            return;
        };
        let since = match entry.life {
            Life::Loading { since, .. } => since,
            _ => return,
        };
        match result {
            Ok(worker) => {
                let took = ms(since.elapsed());
                tracing::info!(model = name, pid = worker.pid, device = %worker.loaded.device, load_ms = took, parameter_bytes = worker.loaded.parameter_bytes, precision = %worker.loaded.precision, "loaded");
                let notice = NoticeKind::Loaded {
                    model: name.to_owned(),
                    device: worker.loaded.device.clone(),
                    pid: worker.pid,
                    load_ms: took,
                };
                let _ = self.notices.send(gpuctl_protocol::Notice {
                    at_unix_ms: super::unix_ms(std::time::SystemTime::now()),
                    what: notice,
                });
                let Some(entry) = self.models.get_mut(name) else {
                    return;
                };
                entry.loads += 1;
                entry.last_load_ms = Some(took);
                entry.last_error = None;
                entry.retry_at = None;
                entry.last_used = Instant::now();
                entry.loaded_at = Some(Instant::now());
                entry.life = Life::Ready { worker };
                let arbitrated = entry.placement.is_some();
                if let Some(reason) = entry.unload_when_loaded.take() {
                    self.unload(name, reason, false);
                } else {
                    self.pump(name);
                }
                if arbitrated {
                    // Measure what it really holds.
                    self.request_sample();
                }
            }
            // Stopped by `unload --force`: not the model's failure.
            Err(error) if error.code == ErrorCode::Cancelled => {
                self.record_stopped_load(name, error)
            }
            Err(error) => self.record_load_failure(name, error),
        }
    }

    /// A load stopped by `unload --force`: its waiters are cancelled, and
    /// the next request loads again without a backoff.
    fn record_stopped_load(&mut self, name: &str, error: Error) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        tracing::info!(model = name, "load stopped");
        let reason = entry
            .unload_when_loaded
            .take()
            .unwrap_or(UnloadReason::Explicit);
        entry.vram_wait = None;
        entry.life = Life::Unloaded;
        entry.last_unload = Some(reason);
        fail_all(&mut entry.queue, &error);
        for waiter in entry.unload_waiters.drain(..) {
            let _ = waiter.send(());
        }
        entry.placement = None;
        self.pump_all();
        self.request_sample();
    }

    /// A load failed: its waiters get the error, and no new attempt is made
    /// before the backoff has passed.
    fn record_load_failure(&mut self, name: &str, error: Error) {
        // Whatever the cause (file, contract, worker binary), a client
        // sees one code for it, now and while it backs off.
        let error = Error::new(ErrorCode::LoadFailed, error.message);
        let retry_base = self.config().policy.load_retry.0;
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        entry.failures += 1;
        let backoff = policy::retry_backoff(retry_base, entry.failures, policy::Failure::Load)
            .unwrap_or_default();
        tracing::error!(model = name, error = %error.message, retry_in_ms = ms(backoff), "load failed");
        entry.vram_wait = None;
        entry.retry_at = Some(Instant::now() + backoff);
        entry.last_error = Some(error.message.clone());
        entry.life = Life::Unloaded;
        entry.unload_when_loaded = None;
        fail_all(&mut entry.queue, &error);
        for waiter in entry.unload_waiters.drain(..) {
            let _ = waiter.send(());
        }
        self.notice(NoticeKind::LoadFailed {
            model: name.to_owned(),
            error: error.message.clone(),
        });
        self.pump_all();
        self.request_sample();
    }

    fn on_exited(&mut self, name: &str, load: u64, exit: Exit) {
        let retry_base = self.config().policy.load_retry.0;
        let Some(entry) = self.models.get_mut(name).filter(|e| e.load == load) else {
            return;
        };
        if matches!(entry.life, Life::Loading { .. }) {
            return; // a failed load; on_loaded reports it
        }
        let (reason, since) = match (entry.unloading.take(), &exit.stuck) {
            // Killed by its supervisor: not a crash, and no backoff.
            (_, Some(stuck)) => (
                UnloadReason::Stuck {
                    description: stuck.clone(),
                },
                Instant::now(),
            ),
            (Some(unloading), None) if exit.expected => unloading,
            _ => (
                UnloadReason::Crash {
                    description: exit.description.clone(),
                },
                Instant::now(),
            ),
        };
        entry.last_unload = Some(reason.clone());
        entry.yield_after_work = None;
        let reclaim = Reclaim {
            model: name.to_owned(),
            pid: exit.pid,
            device: entry.placement.take(),
            bytes: std::mem::take(&mut entry.held),
            reason,
            since,
        };
        if let Some(stuck) = &exit.stuck {
            let message = format!(
                "model {name}: its worker (pid {}) was killed: {stuck} (policy.cancel_grace); the next request loads it again",
                exit.pid
            );
            tracing::warn!(model = name, pid = exit.pid, reason = %stuck, "worker killed: a cancelled job did not stop");
            entry.last_error = Some(message);
        } else if exit.expected {
            tracing::info!(model = name, pid = exit.pid, status = %exit.description, "worker exited");
        } else {
            entry.failures += 1;
            let message = format!(
                "model {name}: its worker (pid {}) died: {}",
                exit.pid, exit.description
            );
            tracing::error!(model = name, pid = exit.pid, status = %exit.description, failures = entry.failures, "worker crashed");
            entry.last_error = Some(message);
            // One crash reloads on the next request; repeated ones back off.
            if let Some(backoff) =
                policy::retry_backoff(retry_base, entry.failures, policy::Failure::Crash)
            {
                entry.retry_at = Some(Instant::now() + backoff);
            }
        }
        entry.life = Life::Unloaded;
        entry.in_flight = 0;
        for waiter in entry.unload_waiters.drain(..) {
            let _ = waiter.send(());
        }
        self.reclaim(reclaim);
        self.pump(name);
        self.pump_all();
    }

    /// Starts unloading `name`: its worker finishes its jobs (or is killed
    /// with `force`) and exits. Returns a receiver told when it is gone.
    pub(super) fn unload(
        &mut self,
        name: &str,
        reason: UnloadReason,
        force: bool,
    ) -> Option<oneshot::Receiver<()>> {
        let entry = self.models.get_mut(name)?;
        let (done, gone) = oneshot::channel();
        let cancelled = Error::new(
            ErrorCode::Cancelled,
            format!("model {name} was unloaded with --force"),
        );
        match std::mem::replace(&mut entry.life, Life::Unloaded) {
            Life::Unloaded => {
                let _ = done.send(());
            }
            Life::Loading { since, kill } => {
                if force {
                    tracing::info!(model = name, "stopping its load (--force)");
                    kill.cancel();
                    fail_all(&mut entry.queue, &cancelled);
                }
                entry.life = Life::Loading { since, kill };
                entry.unload_when_loaded = Some(reason);
                entry.unload_waiters.push(done);
            }
            Life::Ready { worker } => {
                tracing::info!(
                    model = name,
                    pid = worker.pid,
                    reason = reason.to_string().as_str(),
                    in_flight = entry.in_flight,
                    force,
                    "unloading"
                );
                let pid = worker.pid;
                entry.unloading = Some((reason, Instant::now()));
                entry.yield_after_work = None;
                // Without force it drains; the switch still ends it at once
                // if a later `unload --force` asks.
                let kill = worker.unload();
                if force {
                    kill.cancel();
                    fail_all(&mut entry.queue, &cancelled);
                }
                entry.life = Life::Unloading { pid, kill };
                entry.unload_waiters.push(done);
            }
            Life::Unloading { pid, kill } => {
                if force && !kill.is_cancelled() {
                    tracing::info!(model = name, pid, "killing its draining worker (--force)");
                    kill.cancel();
                    fail_all(&mut entry.queue, &cancelled);
                }
                entry.life = Life::Unloading { pid, kill };
                entry.unload_waiters.push(done);
            }
        }
        Some(gone)
    }

    pub(super) fn unload_request(
        &mut self,
        model: Option<String>,
        force: bool,
        reply: oneshot::Sender<Result<UnloadResponse, Error>>,
    ) {
        let config = self.config();
        let names: Vec<String> = match model {
            Some(name) if self.models.contains_key(&name) => vec![name],
            Some(name) => {
                let _ = reply.send(Err(not_found(&name, &config)));
                return;
            }
            None => self.models.keys().cloned().collect(),
        };
        let mut gone = Vec::new();
        for name in names {
            let resident = !matches!(
                self.models.get(&name).map(|e| &e.life),
                Some(Life::Unloaded) | None
            );
            if let Some(waiter) = self.unload(&name, UnloadReason::Explicit, force) {
                if resident {
                    gone.push((name, waiter));
                }
            }
        }
        tokio::spawn(async move {
            let mut unloaded = Vec::new();
            for (name, waiter) in gone {
                let _ = waiter.await;
                unloaded.push(name);
            }
            let _ = reply.send(Ok(UnloadResponse { unloaded }));
        });
    }

    /// After a reload: models removed or changed are unloaded once their
    /// work is done (the next request loads the new version); new ones appear.
    /// After a reload: new models appear; removed, changed and replaced
    /// ones are unloaded once their work is done, and the next request
    /// loads the new version.
    pub(super) fn apply_model_changes(&mut self, old: &Config) {
        let new = self.config();
        let file_replaced = |name: &str| {
            let loaded = self.models.get(name).and_then(|e| e.loaded_file);
            let now = new
                .models
                .get(name)
                .and_then(|m| file_identity(&new.model_path(m)));
            loaded.is_some() && loaded != now
        };
        let changes = policy::reload_changes(old, &new, &file_replaced);
        for (name, change) in changes {
            tracing::info!(model = %name, ?change, "configuration change");
            match change {
                ModelChange::Added => {
                    self.models.entry(name).or_insert_with(ModelEntry::new);
                }
                ModelChange::Removed | ModelChange::Changed | ModelChange::FileReplaced => {
                    self.unload(&name, UnloadReason::Reload, false);
                    if let Some(entry) = self.models.get_mut(&name) {
                        if change == ModelChange::Removed {
                            let error = Error::new(
                                ErrorCode::NotFound,
                                format!("model {name} was removed from the configuration"),
                            );
                            fail_all(&mut entry.queue, &error);
                        }
                        entry.retry_at = None;
                        entry.failures = 0;
                    }
                }
            }
        }
        self.models.retain(|name, entry| {
            new.models.contains_key(name) || !matches!(entry.life, Life::Unloaded)
        });
        self.pump_all();
    }

    pub(super) fn model_status(&self) -> Vec<ModelStatus> {
        let config = self.config();
        let now = Instant::now();
        self.models
            .iter()
            .map(|(name, entry)| {
                let keep_alive = self.keep_alive_of(name, &config);
                let pinned = config.models.get(name).is_some_and(|m| m.pin);
                let need = config
                    .models
                    .get(name)
                    .map_or((0, "unknown"), |m| self.need(name, m, &config));
                let idle = matches!(entry.life, Life::Ready { .. })
                    && entry.in_flight == 0
                    && entry.queue.is_empty();
                let (state, device, pid, device_bytes) = match &entry.life {
                    Life::Unloaded if entry.vram_wait.is_some() => {
                        (ModelState::WaitingForVram, None, None, 0)
                    }
                    Life::Unloaded => match entry.retry_at.filter(|t| *t > now) {
                        Some(t) => (
                            ModelState::Failed {
                                retry_in_ms: ms(t - now),
                            },
                            None,
                            None,
                            0,
                        ),
                        None => (ModelState::Unloaded, None, None, 0),
                    },
                    Life::Loading { .. } => (ModelState::Loading, None, None, 0),
                    Life::Ready { worker } => (
                        ModelState::Ready,
                        Some(worker.loaded.device.clone()),
                        Some(worker.pid),
                        if entry.placement.is_some() {
                            entry.held
                        } else {
                            worker.loaded.device_bytes
                        },
                    ),
                    Life::Unloading { pid, .. } => {
                        let state = if entry.in_flight > 0 {
                            ModelState::Draining
                        } else {
                            ModelState::Unloading
                        };
                        (state, None, Some(*pid), 0)
                    }
                };
                let unload_in_ms = match keep_alive {
                    KeepAlive::Millis(keep) if idle && !pinned => Some(
                        keep.saturating_sub(ms(now.saturating_duration_since(entry.last_used))),
                    ),
                    _ => None,
                };
                ModelStatus {
                    name: name.clone(),
                    state,
                    device,
                    pid,
                    device_bytes,
                    queued: entry.queue.len() as u32,
                    in_flight: entry.in_flight,
                    idle_ms: idle.then(|| ms(now.saturating_duration_since(entry.last_used))),
                    unload_in_ms,
                    keep_alive,
                    loads: entry.loads,
                    last_load_ms: entry.last_load_ms,
                    last_error: entry.last_error.clone(),
                    vram_need: need.0,
                    vram_need_source: need.1.to_owned(),
                    last_unload: entry.last_unload.clone(),
                }
            })
            .collect()
    }
}

/// What identifies a model file's version: its modification time and size.
fn file_identity(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Stands between a job's client and the registry: answers the client, or,
/// when the client goes first (disconnect, `Cancel`, timeout), tells the
/// registry so that the job leaves its queue. The registry's end of the
/// returned sender closes then too, which stops a job already running.
fn watch_departure(
    reply: oneshot::Sender<Result<GenerateResponse, Error>>,
    model: String,
    ticket: u64,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> oneshot::Sender<Result<GenerateResponse, Error>> {
    let (answer, answered) = oneshot::channel();
    tokio::spawn(async move {
        let mut reply = reply;
        tokio::select! {
            answer = answered => {
                let answer = answer.unwrap_or_else(|_| {
                    Err(Error::new(ErrorCode::Internal, format!("model {model}: its request was dropped")))
                });
                let _ = reply.send(answer);
            }
            _ = reply.closed() => {
                let _ = events.send(Event::Departed { model, ticket });
            }
        }
    });
    answer
}

fn fail_all(queue: &mut VecDeque<Waiter>, error: &Error) {
    for waiter in queue.drain(..) {
        match waiter {
            Waiter::Job { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            Waiter::Load { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Intra-op CPU threads for a model's worker: its `threads` if set, else
/// the cores shared among the models that can be resident at once, so that
/// busy workers together never oversubscribe the machine.
fn worker_threads(model: &ModelConfig, config: &Config) -> u32 {
    if model.threads > 0 {
        return model.threads;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let resident = config
        .policy
        .max_loaded
        .min(config.models.len() as u32)
        .max(1);
    (cores / resident).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_share_the_cores_unless_set() {
        let text = "[policy]\nmax_loaded = 2\n[models.a]\npath = \"a.pt\"\nkind = \"tensor\"\n\
                    [models.b]\npath = \"b.pt\"\nkind = \"tensor\"\nthreads = 5\n[models.c]\npath = \"c.pt\"\nkind = \"tensor\"\n";
        let config = Config::parse(text, "t.toml").unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        assert_eq!(
            worker_threads(&config.models["a"], &config),
            (cores / 2).max(1)
        );
        assert_eq!(worker_threads(&config.models["b"], &config), 5);
        let single =
            Config::parse("[models.a]\npath = \"a.pt\"\nkind = \"tensor\"\n", "t.toml").unwrap();
        assert_eq!(
            worker_threads(&single.models["a"], &single),
            cores,
            "one model may use every core"
        );
    }
}
