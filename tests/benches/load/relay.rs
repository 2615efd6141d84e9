//! The reference the load bench compares gpuctld with: a minimal relay
//! doing the same hops for `tensor` requests — client → server process →
//! `gpuctl-worker` → server → client, over Unix sockets with the same
//! framing — and nothing else: no queue, no admission, no accounting, no
//! limits, every request written to the worker as soon as it arrives.
//!
//! It runs as its own process (the load bench starts itself with
//! `relay-serve SOCKET WORKER MODEL`), as gpuctld does.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use gpuctl_protocol::worker::{install_worker_fd, DaemonToWorker, Job, LoadModel, WorkerToDaemon};
use gpuctl_protocol::{
    ClientMessage, DaemonMessage, Error, ErrorCode, FrameCodec, GenerateResponse, ModelKind,
    Request, RequestId, Response, Welcome, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

type ToClient = mpsc::UnboundedSender<DaemonMessage>;
type Pending = Arc<Mutex<HashMap<u64, (ToClient, RequestId)>>>;

/// Serves `socket` until killed: `args` are SOCKET WORKER MODEL.
pub fn serve(args: &[String]) {
    let [socket, worker, model] = args else {
        panic!("relay-serve SOCKET WORKER MODEL");
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(relay(socket.into(), worker.into(), model.into()));
}

async fn relay(socket: PathBuf, worker: PathBuf, model: PathBuf) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(worker);
    command.args(["--fd", "3", "--parent", &std::process::id().to_string()]);
    // SAFETY: install_worker_fd only calls async-signal-safe functions.
    unsafe {
        command.pre_exec(move || install_worker_fd(fd));
    }
    let mut child = command.spawn().unwrap();
    // The worker dies with the relay (its --parent); reap it if it goes first.
    std::thread::spawn(move || child.wait());
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let mut to_worker: Framed<UnixStream, FrameCodec<WorkerToDaemon, DaemonToWorker>> = Framed::new(
        UnixStream::from_std(ours).unwrap(),
        FrameCodec::new(DEFAULT_MAX_FRAME),
    );
    match to_worker.next().await {
        Some(Ok(WorkerToDaemon::Hello(_))) => {}
        other => panic!("worker said {other:?}"),
    }
    to_worker
        .send(DaemonToWorker::Load(LoadModel {
            name: "rows".into(),
            path: Some(model.display().to_string()),
            kind: ModelKind::Tensor,
            device: "cpu".into(),
            threads: 1,
            rgb8: false,
            fp16: false,
            options: "{}".into(),
            loras: Vec::new(),
        }))
        .await
        .unwrap();
    match to_worker.next().await {
        Some(Ok(WorkerToDaemon::Loaded(_))) => {}
        other => panic!("worker said {other:?}"),
    }
    let (mut worker_in, mut worker_out) = to_worker.split();
    let pending: Pending = Arc::default();
    let (jobs, mut job_queue) = mpsc::unbounded_channel::<DaemonToWorker>();
    tokio::spawn(async move {
        while let Some(job) = job_queue.recv().await {
            worker_in.send(job).await.unwrap();
        }
    });
    let answers = pending.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = worker_out.next().await {
            let (id, answer) = match message {
                WorkerToDaemon::Done {
                    id,
                    outputs,
                    run_ms,
                    notes,
                } => (
                    id,
                    Ok(GenerateResponse {
                        model: "rows".into(),
                        device: "cpu".into(),
                        seed: None,
                        outputs,
                        queue_ms: 0,
                        load_ms: None,
                        run_ms,
                        notes,
                    }),
                ),
                WorkerToDaemon::Failed {
                    id: Some(id),
                    error,
                } => (id, Err(error)),
                _ => continue,
            };
            let Some((client, request)) = answers.lock().unwrap().remove(&id) else {
                continue;
            };
            let _ = client.send(match answer {
                Ok(response) => DaemonMessage::Response {
                    id: request,
                    response: Response::Generate(response),
                },
                Err(error) => DaemonMessage::Error { id: request, error },
            });
        }
    });
    let listener = UnixListener::bind(&socket).unwrap();
    let next_job = Arc::new(std::sync::atomic::AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::spawn(client(
            stream,
            jobs.clone(),
            pending.clone(),
            next_job.clone(),
        ));
    }
}

async fn client(
    stream: UnixStream,
    jobs: mpsc::UnboundedSender<DaemonToWorker>,
    pending: Pending,
    next_job: Arc<std::sync::atomic::AtomicU64>,
) {
    let connection: Framed<UnixStream, FrameCodec<ClientMessage, DaemonMessage>> =
        Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME));
    let (mut sink, mut frames) = connection.split();
    let (out, mut outbox) = mpsc::unbounded_channel::<DaemonMessage>();
    tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(message)) = frames.next().await {
        match message {
            ClientMessage::Hello(_) => {
                let _ = out.send(DaemonMessage::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: "relay".into(),
                    capabilities: Vec::new(),
                }));
            }
            ClientMessage::Request {
                id,
                request: Request::Generate(request),
            } => {
                let job = next_job.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pending.lock().unwrap().insert(job, (out.clone(), id));
                let _ = jobs.send(DaemonToWorker::Run {
                    id: job,
                    job: Job::Tensor {
                        inputs: request.inputs,
                    },
                });
            }
            ClientMessage::Request { id, .. } => {
                let _ = out.send(DaemonMessage::Error {
                    id,
                    error: Error::new(ErrorCode::InvalidRequest, "the relay relays Generate only"),
                });
            }
            _ => {}
        }
    }
}
