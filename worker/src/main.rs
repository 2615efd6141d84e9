//! gpuctl-worker: hosts one TorchScript model for gpuctld, in its own
//! process, so that unloading is exact (the process exits and the driver
//! frees everything, CUDA context included) and a crash costs one model.
//!
//! `gpuctl-worker --fd N --parent PID`: speaks the private protocol of
//! `gpuctl_protocol::worker` on the inherited socket N. It exits on
//! `Unload`, on EOF, and when its parent dies.

mod channel;
mod cuda;
mod host;
mod lora;
mod memory;
mod tensors;
mod tiling;

use std::collections::HashSet;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};

use gpuctl_protocol::stream::take_streamed;
use gpuctl_protocol::worker::{
    daemon_takes_capabilities, DaemonToWorker, WorkerCapabilities, WorkerHello, WorkerToDaemon,
    WORKER_PROTOCOL, WORKER_PROTOCOL_ENV,
};
use gpuctl_protocol::{Error, ErrorCode, TensorReceiver};

use crate::channel::Channel;
use crate::host::Host;

struct Args {
    fd: i32,
    parent: Option<i32>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        fd: gpuctl_protocol::worker::WORKER_FD,
        parent: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = |name: &str| {
            words
                .next()
                .and_then(|v| v.parse::<i32>().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match word.as_str() {
            "--fd" => args.fd = value("--fd")?,
            "--parent" => args.parent = Some(value("--parent")?),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: gpuctl-worker --fd N [--parent PID]"
                ))
            }
        }
    }
    Ok(args)
}

/// Dies with the daemon: no orphan may keep GPU memory.
fn die_with_parent(parent: Option<i32>) -> Result<(), String> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(format!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::last_os_error()
        ));
    }
    // The parent may have died before prctl took effect.
    // SAFETY: getppid cannot fail.
    if parent.is_some_and(|pid| unsafe { libc::getppid() } != pid) {
        return Err("the daemon exited before the worker started".to_owned());
    }
    Ok(())
}

fn main() -> ExitCode {
    memory::keep_freed_memory();
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("gpuctl-worker: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = die_with_parent(args.parent) {
        eprintln!("gpuctl-worker: {error}");
        return ExitCode::FAILURE;
    }
    // SAFETY: F_GETFD only inspects the descriptor.
    if unsafe { libc::fcntl(args.fd, libc::F_GETFD) } < 0 {
        eprintln!(
            "gpuctl-worker: fd {} is not open; gpuctl-worker is started by gpuctld",
            args.fd
        );
        return ExitCode::from(2);
    }
    // SAFETY: the daemon passed us this socket and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(args.fd) };
    match serve(&mut Channel::new(stream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gpuctl-worker: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Load, then run jobs until told to unload or the daemon hangs up.
fn serve(channel: &mut Channel) -> Result<(), String> {
    channel
        .send(&WorkerToDaemon::Hello(WorkerHello {
            protocol: WORKER_PROTOCOL,
            program: format!("gpuctl-worker {}", env!("CARGO_PKG_VERSION")),
        }))
        .map_err(|e| e.to_string())?;
    if daemon_takes_capabilities(std::env::var(WORKER_PROTOCOL_ENV).ok().as_deref()) {
        channel
            .send(&WorkerToDaemon::Capabilities(WorkerCapabilities {
                switch_loras: true,
            }))
            .map_err(|e| e.to_string())?;
    }
    let spec = match channel.receive().map_err(|e| e.to_string())? {
        Some(DaemonToWorker::Load(spec)) => spec,
        Some(other) => return Err(format!("the first message must be Load, got {other:?}")),
        None => return Ok(()),
    };
    let mut host = match Host::load(spec) {
        Ok((host, loaded)) => {
            channel
                .send(&WorkerToDaemon::Loaded(loaded))
                .map_err(|e| e.to_string())?;
            host
        }
        Err(error) => {
            let message = error.message.clone();
            channel
                .send(&WorkerToDaemon::Failed { id: None, error })
                .map_err(|e| e.to_string())?;
            return Err(message);
        }
    };
    // A reader thread hears Cancel while a job runs; everything else it
    // hands to this loop in order.
    let cancelled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let (inbox_tx, inbox) = mpsc::channel::<Inbound>();
    let reader = channel.try_clone().map_err(|e| e.to_string())?;
    let cancels = cancelled.clone();
    std::thread::spawn(move || read_messages(reader, &cancels, &inbox_tx));
    let is_cancelled = |id: u64| {
        cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    };
    // Whether memory was freed since it was last given back.
    let mut worked = false;
    loop {
        let next = if worked {
            match inbox.recv_timeout(memory::IDLE_TRIM) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    memory::return_freed_memory();
                    worked = false;
                    continue;
                }
                other => other.map_err(|_| ()),
            }
        } else {
            inbox.recv().map_err(|_| ())
        };
        let message = next.map_err(|()| "the socket reader stopped".to_owned())??;
        worked = true;
        match message {
            Some(DaemonToWorker::Run { id, job }) => {
                let started = std::time::Instant::now();
                // Progress is best effort: a daemon that cannot hear it
                // will not hear the answer either, and that is handled below.
                let mut progress = |done: usize, total: usize| {
                    let _ = channel.send(&WorkerToDaemon::Progress {
                        id,
                        done: done as u32,
                        total: total as u32,
                    });
                    !is_cancelled(id)
                };
                let mut output = |frame| {
                    channel
                        .send(&WorkerToDaemon::Tensor { id, frame })
                        .map_err(|e| format!("cannot send the output: {e}"))
                };
                let mut notes = Vec::new();
                let outcome = if is_cancelled(id) {
                    Err(Error::new(
                        ErrorCode::Cancelled,
                        "the request was cancelled before it started",
                    ))
                } else {
                    host.run(job, &mut progress, &mut output, &mut notes)
                };
                cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let answer = match outcome {
                    Ok(mut outputs) => {
                        for tensor in take_streamed(&mut outputs) {
                            channel.send_tensor(id, tensor).map_err(|e| e.to_string())?;
                        }
                        WorkerToDaemon::Done {
                            id,
                            outputs,
                            run_ms: started.elapsed().as_millis() as u64,
                            notes,
                        }
                    }
                    Err(error) => WorkerToDaemon::Failed {
                        id: Some(id),
                        error,
                    },
                };
                if let Err(error) = channel.send(&answer) {
                    let error = Error::new(
                        ErrorCode::Internal,
                        format!("cannot send the result: {error}"),
                    );
                    channel
                        .send(&WorkerToDaemon::Failed {
                            id: Some(id),
                            error,
                        })
                        .map_err(|e| e.to_string())?;
                }
            }
            Some(DaemonToWorker::Switch(mode)) => {
                let answer = match host.switch(mode) {
                    Ok(loaded) => WorkerToDaemon::Switched(loaded),
                    Err(error) => WorkerToDaemon::Failed { id: None, error },
                };
                channel.send(&answer).map_err(|e| e.to_string())?;
            }
            Some(DaemonToWorker::Unload) | None => return Ok(()),
            Some(DaemonToWorker::Load(_)) => {
                return Err("a worker loads one model; Load came twice".to_owned())
            }
            // The reader thread keeps these for itself.
            Some(DaemonToWorker::Cancel { .. } | DaemonToWorker::Tensor(_)) => {}
        }
    }
}

/// What the reader thread hands on: a message, the daemon hanging up
/// (`None`), or a broken socket.
type Inbound = Result<Option<DaemonToWorker>, String>;

/// Reads the socket for the job loop: Cancel is noted at once (a job may be
/// running), streamed tensors are put into the `Run` they precede, the rest
/// goes to `inbox` in order.
fn read_messages(
    mut reader: Channel,
    cancels: &Mutex<HashSet<u64>>,
    inbox: &mpsc::Sender<Inbound>,
) {
    let mut streamed = TensorReceiver::default();
    loop {
        let next = match reader.receive() {
            Err(error) => Err(error.to_string()),
            Ok(Some(DaemonToWorker::Cancel { id })) => {
                cancels.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
                continue;
            }
            // Checked when the Run they precede comes.
            Ok(Some(DaemonToWorker::Tensor(frame))) => {
                streamed.frame(&frame, usize::MAX);
                continue;
            }
            Ok(Some(DaemonToWorker::Run { id, mut job })) => std::mem::take(&mut streamed)
                .fill(job.tensors_mut())
                .map(|()| Some(DaemonToWorker::Run { id, job }))
                .map_err(|e| e.to_string()),
            Ok(other) => Ok(other),
        };
        let end = !matches!(next, Ok(Some(_)));
        if inbox.send(next).is_err() || end {
            return;
        }
    }
}
