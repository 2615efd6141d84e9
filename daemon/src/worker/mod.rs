//! gpuctl-worker processes, seen from the daemon: start one per loaded
//! model, hand it jobs, notice when it exits. The worker dies with the
//! daemon (PR_SET_PDEATHSIG, armed against the thread that spawns it, so
//! workers are spawned from the runtime's long-lived threads, never from
//! `spawn_blocking`).

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gpuctl_protocol::worker::{
    DaemonToWorker, Job, LoadModel, Loaded, SwitchMode, WorkerCapabilities, WorkerToDaemon,
    WORKER_PROTOCOL,
};
use gpuctl_protocol::{Error, ErrorCode, FrameCodec, WireTensor, MAX_FRAME_CEILING};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

mod batch;
mod feed;
mod launch;
mod supervisor;

pub use feed::{FeedLimits, RUNS_AHEAD};

pub use launch::{kill_group, Launch};
use supervisor::{supervise, Supervised};

type Channel = Framed<UnixStream, FrameCodec<WorkerToDaemon, DaemonToWorker>>;

/// How long a worker gets to exit after `Unload` before it is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What one job returns.
pub struct JobOutput {
    pub outputs: Vec<WireTensor>,
    pub run_ms: u64,
    pub notes: Vec<String>,
}

/// How a job handed to a worker ended.
pub enum JobEnd {
    Done(JobOutput),
    Failed(Error),
    /// Its worker went before starting it (it died, or was killed for
    /// another job): it waits for the next worker like a queued request.
    NotStarted {
        job: Job,
        progress: Option<crate::outbox::EventSink>,
    },
}

/// What a job's end is handed to, once, on the supervisor's task: no task
/// of its own waits for it.
pub type OnEnd = Box<dyn FnOnce(JobEnd) + Send>;

/// A job on its way to a worker, with where its answer goes.
pub struct WorkerJob {
    pub job: Job,
    /// The registry's number for it: what [`Canceller::cancel`] names.
    pub ticket: u64,
    pub on_end: OnEnd,
    /// Where its progress goes (its client), if anywhere.
    pub progress: Option<crate::outbox::EventSink>,
}

/// Stops a worker's jobs by ticket, while it serves and while it drains:
/// one not sent yet is answered at once, a running one stops at the
/// worker's next batch boundary (or its worker is killed after
/// `policy.cancel_grace`). A ticket it does not hold is ignored.
#[derive(Clone)]
pub struct Canceller(mpsc::UnboundedSender<u64>);

impl Canceller {
    pub fn cancel(&self, ticket: u64) {
        let _ = self.0.send(ticket);
    }
}

/// Told once when a worker ends; whom it tells changes when the worker
/// becomes another mode.
pub type OnExit = Box<dyn FnOnce(Exit) + Send>;

/// What a worker's supervisor is asked to do.
enum Order {
    Job(WorkerJob),
    Switch(SwitchOrder),
}

/// Becoming another mode: from the answer on, the worker's exit is the new
/// mode's to hear of.
struct SwitchOrder {
    mode: SwitchMode,
    on_exit: OnExit,
    reply: oneshot::Sender<Result<Loaded, Error>>,
}

/// How a worker was started and what it was loaded with (the name and
/// LoRAs of its mode now): what decides whether it can become another mode.
struct Origin {
    spec: LoadModel,
    launch: Launch,
}

/// The daemon's handle on a running worker. Dropping `orders` (or calling
/// [`WorkerHandle::unload`]) makes it finish what it has and exit.
pub struct WorkerHandle {
    pub pid: u32,
    pub loaded: Loaded,
    /// How it was started and what it holds.
    origin: Box<Origin>,
    /// What it said it can do (worker protocol 1.1).
    pub capabilities: WorkerCapabilities,
    orders: mpsc::UnboundedSender<Order>,
    /// Stops its jobs by ticket; outlives the handle while it drains.
    pub canceller: Canceller,
    kill: CancellationToken,
}

impl WorkerHandle {
    /// Queues a job; if the worker is already gone, the job is answered
    /// with that.
    pub fn run(&self, job: WorkerJob) {
        if let Err(refused) = self.orders.send(Order::Job(job)) {
            if let Order::Job(WorkerJob {
                job,
                on_end,
                progress,
                ..
            }) = refused.0
            {
                on_end(JobEnd::NotStarted { job, progress });
            }
        }
    }

    /// Lets queued jobs finish, then asks the worker to exit; the returned
    /// switch still kills it at once (`unload --force` while it drains).
    pub fn unload(self) -> CancellationToken {
        self.kill
    }

    /// What kills it at once, whatever it is doing.
    pub fn kill_switch(&self) -> CancellationToken {
        self.kill.clone()
    }

    /// Whether it can become the mode `spec` started by `launch`, in
    /// place: it takes `Switch`, it was started the same way, and `spec`
    /// differs from what it was loaded with only in name and LoRAs.
    pub fn can_become(&self, spec: &LoadModel, launch: &Launch) -> bool {
        let base = |spec: &LoadModel| LoadModel {
            name: String::new(),
            loras: Vec::new(),
            ..spec.clone()
        };
        let started = |launch: &Launch| Launch {
            load_timeout: Duration::ZERO,
            ..launch.clone()
        };
        self.capabilities.switch_loras
            && base(&self.origin.spec) == base(spec)
            && started(&self.origin.launch) == started(launch)
    }

    /// Makes the idle worker `spec`'s mode (its LoRAs) without reading the
    /// base again; `on_exit` hears of its end from now on. On failure the
    /// worker is let go (it drains and exits) and the error says why, as a
    /// failed load of `spec` would.
    pub async fn switch(
        mut self,
        spec: LoadModel,
        within: Duration,
        on_exit: OnExit,
    ) -> Result<WorkerHandle, Error> {
        let name = spec.name.clone();
        let (reply, answer) = oneshot::channel();
        let order = Order::Switch(SwitchOrder {
            mode: SwitchMode {
                name: name.clone(),
                loras: spec.loras.clone(),
            },
            on_exit,
            reply,
        });
        let gone = || {
            Error::new(
                ErrorCode::Internal,
                format!(
                    "model {name}: the worker it was to switch in place (pid {}) has gone",
                    self.pid
                ),
            )
        };
        if self.orders.send(order).is_err() {
            return Err(gone());
        }
        let answer = match tokio::time::timeout(within, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) if self.kill.is_cancelled() => Err(Error::new(
                ErrorCode::Cancelled,
                format!("model {name}: its load was stopped (unload --force)"),
            )),
            Ok(Err(_)) => Err(gone()),
            Err(_) => {
                self.kill.cancel();
                Err(Error::new(
                    ErrorCode::Timeout,
                    format!(
                        "model {name}: its worker (pid {}) did not switch to it within load_timeout ({}); it was killed",
                        self.pid,
                        gpuctl_protocol::units::format_duration_ms(within.as_millis() as u64)
                    ),
                ))
            }
        };
        self.loaded = answer?;
        self.origin.spec = spec;
        Ok(self)
    }
}

/// What a worker's supervisor needs to know of the daemon's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most output bytes one job may stream back (`daemon.max_output`).
    pub max_output: usize,
    /// What it is sent at once, batched how, and how long a cancelled job
    /// may go on before it is killed (`policy.cancel_grace`).
    pub feed: FeedLimits,
}

/// How a worker ended, for logs and errors.
#[derive(Debug, Clone)]
pub struct Exit {
    pub pid: u32,
    pub description: String,
    /// It exited because it was told to (or killed by us).
    pub expected: bool,
    /// It was killed because a cancelled job did not stop in time: which
    /// job, and for how long it went on.
    pub stuck: Option<String>,
}

/// The worker binary: configured, else `gpuctl-worker` beside gpuctld.
pub fn worker_program(configured: &str) -> PathBuf {
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("gpuctl-worker")))
        .unwrap_or_else(|| PathBuf::from("gpuctl-worker"))
}

/// Starts a worker and waits until its model is loaded. `exited` receives
/// one message when the worker ends, whenever that is. Cancelling `kill`
/// kills the worker, while it loads or afterwards.
pub async fn start(
    launch: &Launch,
    spec: LoadModel,
    limits: Limits,
    kill: CancellationToken,
    exited: impl FnOnce(Exit) + Send + 'static,
) -> Result<WorkerHandle, Error> {
    let exited: OnExit = Box::new(exited);
    let name = spec.name.clone();
    let fail =
        |problem: String| Error::new(ErrorCode::Internal, format!("model {name}: {problem}"));
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| fail(format!("socketpair: {e}")))?;
    let mut child = launch
        .prepare(&name, theirs.as_raw_fd())
        .spawn()
        .map_err(|e| cannot_start(&name, launch, &e))?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    ours.set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    let stream = UnixStream::from_std(ours).map_err(|e| fail(e.to_string()))?;
    let mut channel: Channel = Framed::new(stream, FrameCodec::new(MAX_FRAME_CEILING));

    let stopped = || {
        Error::new(
            ErrorCode::Cancelled,
            format!("model {name}: its load was stopped (unload --force)"),
        )
    };
    let deadline = tokio::time::Instant::now() + launch.load_timeout;
    let too_slow = |what: &str| {
        Error::new(
            ErrorCode::Timeout,
            format!(
                "model {name}: its worker (pid {pid}) {what} within load_timeout ({}); it was killed",
                gpuctl_protocol::units::format_duration_ms(launch.load_timeout.as_millis() as u64)
            ),
        )
    };
    let greeted = tokio::select! {
        greeted = tokio::time::timeout_at(deadline, greet(&mut channel, &name)) => greeted.unwrap_or_else(|_| Err(too_slow(&format!("did not say which protocol it speaks (a worker's first frame is Hello, worker protocol {WORKER_PROTOCOL})")))),
        _ = kill.cancelled() => Err(stopped()),
    };
    let capabilities = match greeted {
        Ok(capabilities) => capabilities,
        Err(error) => {
            // A worker it cannot talk to is not left running.
            stop(&mut child, pid);
            return Err(end_load(&mut child, pid, error, false, exited).await);
        }
    };
    let loading = async {
        channel
            .send(DaemonToWorker::Load(spec.clone()))
            .await
            .map_err(|e| fail(format!("cannot talk to its worker: {e}")))?;
        match channel.next().await {
            Some(Ok(WorkerToDaemon::Loaded(loaded))) => Ok(loaded),
            Some(Ok(WorkerToDaemon::Failed { error, .. })) => Err(error),
            Some(Ok(other)) => Err(fail(format!(
                "unexpected first message from its worker: {other:?}"
            ))),
            Some(Err(e)) => Err(fail(format!("worker protocol error: {e}"))),
            None => Err(fail("its worker exited while loading".to_owned())),
        }
    };
    let loaded = tokio::select! {
        loaded = tokio::time::timeout_at(deadline, loading) => loaded.unwrap_or_else(|_| {
            stop(&mut child, pid);
            Err(too_slow("did not say it loaded"))
        }),
        _ = kill.cancelled() => {
            stop(&mut child, pid);
            Err(stopped())
        }
    };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return Err(end_load(&mut child, pid, error, true, exited).await),
    };
    let (orders, queue) = mpsc::unbounded_channel();
    let (cancels, cancelled) = mpsc::unbounded_channel();
    let worker = Supervised {
        model: name,
        channel,
        child,
        limits,
        cancelled,
    };
    tokio::spawn(supervise(worker, queue, kill.clone(), exited));
    Ok(WorkerHandle {
        pid,
        loaded,
        origin: Box::new(Origin {
            spec,
            launch: launch.clone(),
        }),
        capabilities,
        orders,
        canceller: Canceller(cancels),
        kill,
    })
}

/// A load that failed: waits briefly for the worker to end (and kills it
/// then), reports its exit, and returns the error, with the signal that
/// ended the worker when `with_signal` and there was one.
async fn end_load(
    child: &mut Child,
    pid: u32,
    mut error: Error,
    with_signal: bool,
    exited: impl FnOnce(Exit),
) -> Error {
    let status = wait_briefly(child).await;
    kill_group(pid);
    if let Some(status) = status.filter(|s| with_signal && s.signal().is_some()) {
        error.message = format!("{} ({})", error.message, describe(status));
    }
    exited(Exit {
        pid,
        description: status.map_or("killed".into(), describe),
        expected: true,
        stuck: None,
    });
    error
}

/// Reads the worker's first frame, which says the worker protocol it
/// speaks (a worker of another major version is refused with both
/// versions named), and from a 1.1 worker the `Capabilities` that follow.
async fn greet(channel: &mut Channel, model: &str) -> Result<WorkerCapabilities, Error> {
    let fail =
        |problem: String| Error::new(ErrorCode::Internal, format!("model {model}: {problem}"));
    match channel.next().await {
        Some(Ok(WorkerToDaemon::Hello(hello))) if WORKER_PROTOCOL.is_compatible_with(hello.protocol) => {
            tracing::debug!(model, program = %hello.program, protocol = %hello.protocol, "worker greeted");
            if hello.protocol.minor < 1 {
                return Ok(WorkerCapabilities { switch_loras: false });
            }
            match channel.next().await {
                Some(Ok(WorkerToDaemon::Capabilities(capabilities))) => Ok(capabilities),
                Some(Ok(other)) => Err(fail(format!(
                    "its worker ({}) speaks worker protocol {}, whose second frame is Capabilities, but sent {other:?}",
                    hello.program, hello.protocol
                ))),
                Some(Err(e)) => Err(fail(format!("its worker's Capabilities frame: {e}"))),
                None => Err(fail("its worker exited after its Hello".to_owned())),
            }
        }
        Some(Ok(WorkerToDaemon::Hello(hello))) => Err(fail(format!(
            "its worker ({}) speaks worker protocol {}, this gpuctld speaks {WORKER_PROTOCOL}: use a worker (or worker SDK) of major version {}",
            hello.program, hello.protocol, WORKER_PROTOCOL.major
        ))),
        Some(Ok(other)) => Err(fail(format!(
            "its worker's first message must be Hello (worker protocol {WORKER_PROTOCOL}), got {other:?}"
        ))),
        Some(Err(e)) => Err(fail(format!(
            "its worker's first frame is not a Hello of worker protocol {WORKER_PROTOCOL}: {e}"
        ))),
        None => Err(fail("its worker exited before saying which protocol it speaks".to_owned())),
    }
}

async fn wait_briefly(child: &mut Child) -> Option<ExitStatus> {
    match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            let pid = child.id().unwrap_or(0);
            kill_group(pid);
            let _ = child.kill().await;
            None
        }
    }
}

/// Kills a worker and its process group, now.
fn stop(child: &mut Child, pid: u32) {
    kill_group(pid);
    let _ = child.start_kill();
}

/// Why a worker could not be started, naming what was run.
fn cannot_start(model: &str, launch: &Launch, error: &std::io::Error) -> Error {
    let program = launch.program.display();
    let hint = match error.kind() {
        std::io::ErrorKind::NotFound if launch.cwd.as_ref().is_some_and(|cwd| !cwd.is_dir()) => {
            format!(
                " (its working directory {} does not exist)",
                launch
                    .cwd
                    .as_ref()
                    .map_or(String::new(), |c| c.display().to_string())
            )
        }
        std::io::ErrorKind::NotFound => {
            " (no such program; a bare name is looked up on gpuctld's PATH)".to_owned()
        }
        std::io::ErrorKind::PermissionDenied => " (not executable by gpuctld's user)".to_owned(),
        _ => String::new(),
    };
    Error::new(
        ErrorCode::LoadFailed,
        format!("model {model}: cannot start {program}: {error}{hint}"),
    )
}

/// Describes an exit status: "exit status 1", "signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => {
            let name = match signal {
                libc::SIGKILL => " (SIGKILL, e.g. the OOM killer)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            format!("signal {signal}{name}")
        }
        _ => "unknown exit".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use gpuctl_protocol::worker::Lora;
    use gpuctl_protocol::ModelKind;

    use super::*;

    fn spec(name: &str, loras: &[&str]) -> LoadModel {
        LoadModel {
            name: name.into(),
            path: Some("/models/base.pt".into()),
            kind: ModelKind::Image,
            device: "cpu".into(),
            threads: 2,
            rgb8: true,
            fp16: false,
            options: "{}".into(),
            loras: loras
                .iter()
                .map(|path| Lora {
                    path: (*path).into(),
                    strength: 1.0,
                })
                .collect(),
        }
    }

    fn worker(switch_loras: bool) -> WorkerHandle {
        let (orders, _) = mpsc::unbounded_channel();
        WorkerHandle {
            pid: 1,
            loaded: Loaded {
                device: "cpu".into(),
                load_ms: 0,
                parameter_bytes: 0,
                device_bytes: 0,
                precision: "fp32".into(),
            },
            capabilities: WorkerCapabilities { switch_loras },
            origin: Box::new(Origin {
                spec: spec("portrait", &["/loras/a.safetensors"]),
                launch: Launch::builtin("gpuctl-worker".into(), Duration::from_secs(60)),
            }),
            orders,
            canceller: Canceller(mpsc::unbounded_channel().0),
            kill: CancellationToken::new(),
        }
    }

    #[test]
    fn a_worker_becomes_another_mode_only_of_its_own_base_started_alike() {
        let launch = Launch::builtin("gpuctl-worker".into(), Duration::from_secs(5));
        let worker = worker(true);
        assert!(
            worker.can_become(&spec("anime", &["/loras/b.safetensors"]), &launch),
            "other LoRAs (and another load_timeout) of the same base"
        );
        assert!(worker.can_become(&spec("plain", &[]), &launch));
        let other_file = LoadModel {
            path: Some("/models/other.pt".into()),
            ..spec("anime", &[])
        };
        let half = LoadModel {
            fp16: true,
            ..spec("anime", &[])
        };
        let options = LoadModel {
            options: "{\"steps\":4}".into(),
            ..spec("anime", &[])
        };
        for other in [other_file, half, options] {
            assert!(!worker.can_become(&other, &launch), "{other:?}");
        }
        let wrapped = Launch::command(
            &["python".into(), "w.py".into()],
            &BTreeMap::new(),
            "/srv".into(),
            Duration::from_secs(5),
        );
        assert!(!worker.can_become(&spec("anime", &[]), &wrapped));
        assert!(
            !self::worker(false).can_become(&spec("anime", &[]), &launch),
            "a worker that did not say it can switch"
        );
    }
}
