//! One task per worker process: feeds it jobs, matches answers and
//! streamed outputs to them, stops cancelled jobs (killing the worker when
//! one does not stop within `policy.cancel_grace`), sends `Unload` once a
//! draining worker has nothing left, switches an idle one to another mode,
//! and reports its exit.

use std::process::ExitStatus;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use gpuctl_protocol::stream::{frames, take_streamed};
use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::worker::{DaemonToWorker, Job, Loaded, WorkerToDaemon};
use gpuctl_protocol::{
    Error, ErrorCode, FrameError, StreamError, TensorFrame, TensorReceiver, WireTensor,
};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::batch::split;
use super::feed::{Cancelled, Feed, Run};
use super::{
    describe, kill_group, stop, Channel, Exit, JobEnd, JobOutput, Limits, OnEnd, OnExit, Order,
    SwitchOrder, WorkerJob, EXIT_GRACE,
};

/// Whom a job's answer and progress go to.
struct Client {
    on_end: OnEnd,
    progress: Option<crate::outbox::EventSink>,
    /// What its progress counts: tiles, or a generation's steps.
    unit: &'static str,
}

impl Client {
    /// Tells the client how far its run is, with the time it has taken
    /// and an estimate of what is left at the same pace.
    fn progress(&self, started: Instant, done: u32, total: u32) {
        let Some(sink) = &self.progress else {
            return;
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let eta_ms = (done > 0 && total >= done)
            .then(|| elapsed_ms * u64::from(total - done) / u64::from(done));
        sink.send(gpuctl_protocol::Event::Progress(
            gpuctl_protocol::ProgressEvent {
                done: u64::from(done),
                total: u64::from(total),
                message: format!("{} {done}/{total}", self.unit),
                elapsed_ms,
                eta_ms,
            },
        ));
    }

    fn answer(self, end: JobEnd) {
        (self.on_end)(end);
    }
}

/// A started worker, as its supervisor holds it.
pub(super) struct Supervised {
    pub(super) model: String,
    pub(super) channel: Channel,
    pub(super) child: Child,
    pub(super) limits: Limits,
    /// Tickets of jobs whose clients have gone.
    pub(super) cancelled: mpsc::UnboundedReceiver<u64>,
}

/// Queues a job for the worker, its large tensors streamed ahead of it;
/// the caller flushes once it has queued what it has (one write, one
/// wake-up of the worker, for several small jobs).
async fn feed_job(channel: &mut Channel, id: u64, mut job: Job) -> Result<(), FrameError> {
    for tensor in take_streamed(job.tensors_mut()) {
        for frame in frames(tensor) {
            channel.feed(DaemonToWorker::Tensor(frame)).await?;
        }
    }
    channel.feed(DaemonToWorker::Run { id, job }).await
}

/// The outputs a worker streams ahead of a job's `Done`: kept to fill the
/// answer, or passed straight on to a client that takes them as they come
/// (so a tiled image's rows reach it while later tiles run). Either way
/// they are checked against their shapes and `daemon.max_output`.
struct Incoming {
    job: u64,
    received: TensorReceiver,
    relay: Option<crate::outbox::EventSink>,
}

impl Incoming {
    /// Outputs of run `id`, passed on when it is one client's and that
    /// client takes pixel rows (a batch's are shared out at the end).
    fn new(id: u64, run: Option<&Run<Client>>) -> Incoming {
        let relay = run
            .filter(|r| r.parts.len() == 1)
            .and_then(|r| r.parts[0].with.progress.clone())
            .filter(|sink| sink.relays_outputs());
        let received = match relay {
            Some(_) => TensorReceiver::passing_on(),
            None => TensorReceiver::default(),
        };
        Incoming {
            job: id,
            received,
            relay,
        }
    }

    fn frame(&mut self, frame: TensorFrame, limit: usize) {
        let room = limit.saturating_sub(self.received.bytes());
        self.received.frame(&frame, room);
        if let (Some(sink), true) = (&self.relay, self.received.is_sound()) {
            sink.output(frame);
        }
    }

    /// The job's outputs: placeholders filled with what was kept, or left
    /// as they are for what was passed on.
    fn finish(self, model: &str, limit: usize, outputs: &mut [WireTensor]) -> Result<(), Error> {
        self.received
            .fill(outputs)
            .map_err(|problem| stream_error(model, limit, problem))
    }
}

/// What a client hears of a worker's bad output stream.
fn stream_error(model: &str, limit: usize, error: StreamError) -> Error {
    match &error {
        StreamError::TooLarge { shape, bytes, .. } => Error::new(
            ErrorCode::TooLarge,
            format!(
                "model {model}: its output of shape {shape:?} ({}) exceeds daemon.max_output ({})",
                format_bytes(*bytes),
                format_bytes(limit as u64)
            ),
        ),
        StreamError::OutOfMemory { .. } => {
            Error::new(ErrorCode::TooLarge, format!("model {model}: {error}"))
        }
        StreamError::Broken(problem) => Error::new(
            ErrorCode::Internal,
            format!("model {model}: its worker streamed a bad output: {problem}"),
        ),
    }
}

/// Where a supervised worker is going.
enum Course {
    /// Taking jobs.
    Serving,
    /// Every handle is gone: it finishes its jobs, then is told to exit
    /// (`exit_by`: set then) and killed if it has not within EXIT_GRACE.
    Draining {
        exit_by: Option<tokio::time::Instant>,
    },
    /// Killed by us: `unload --force`, no exit within EXIT_GRACE, or a
    /// cancelled job that went on (`stuck`: why, for its log and status,
    /// and what the jobs running on it are told).
    Killed { stuck: Option<(String, Error)> },
}

/// Feeds jobs to the worker, matches answers to them, stops cancelled
/// jobs (killing the worker when one does not stop within the grace), and
/// reports its exit.
pub(super) async fn supervise(
    worker: Supervised,
    mut queue: mpsc::UnboundedReceiver<Order>,
    kill: CancellationToken,
    mut exited: OnExit,
) {
    let Supervised {
        mut model,
        mut channel,
        mut child,
        limits,
        mut cancelled,
    } = worker;
    let max_output = limits.max_output;
    let grace = limits.feed.cancel_grace;
    let mut incoming: Option<Incoming> = None;
    let pid = child.id().unwrap_or(0);
    let mut feed: Feed<Client> = Feed::new(limits.feed);
    let mut course = Course::Serving;
    // A switch sent and not yet answered.
    let mut switching: Option<oneshot::Sender<Result<Loaded, Error>>> = None;
    let ending: Result<ExitStatus, String> = loop {
        if !matches!(course, Course::Killed { .. }) {
            let mut sent = Vec::new();
            while let Some((id, job)) = feed.next_run(Instant::now()) {
                sent.push(id);
                if let Err(error) = unless_killed(&kill, feed_job(&mut channel, id, job)).await {
                    fail_sent(&mut feed, &model, &[id], &error);
                }
            }
            if !sent.is_empty() {
                if let Err(error) = unless_killed(&kill, channel.flush()).await {
                    fail_sent(&mut feed, &model, &sent, &error);
                }
            }
        }
        // The one place a draining worker is told to exit: once nothing is left.
        if let Course::Draining {
            exit_by: exit_by @ None,
        } = &mut course
        {
            if feed.is_empty() {
                *exit_by = Some(tokio::time::Instant::now() + EXIT_GRACE);
                let _ = unless_killed(&kill, channel.send(DaemonToWorker::Unload)).await;
            }
        }
        let killed = matches!(course, Course::Killed { .. });
        let exit_by = match course {
            Course::Draining { exit_by } => exit_by,
            _ => None,
        };
        let overdue = feed.overdue();
        let send_at = feed.ready_at().filter(|_| !killed);
        tokio::select! {
            // A kill must win over the closed job queue that comes with it.
            biased;
            _ = kill.cancelled(), if !killed => {
                course = Course::Killed { stuck: None };
                stop(&mut child, pid);
                let forced = Error::new(ErrorCode::Cancelled, format!("model {model} was unloaded with --force"));
                let (runs, unsent) = feed.take_all();
                for run in runs {
                    fail_run(run, &forced);
                }
                for task in unsent {
                    task.with.answer(JobEnd::Failed(forced.clone()));
                }
            }
            _ = sleep_until(overdue.map(|(at, _)| at.into())), if overdue.is_some() && !killed => {
                let job = overdue.map_or(0, |(_, id)| id);
                let grace = gpuctl_protocol::units::format_duration_ms(grace.as_millis() as u64);
                tracing::warn!(model, pid, job, grace = %grace, "a cancelled job did not stop within policy.cancel_grace; killing its worker");
                stop(&mut child, pid);
                // Its jobs are answered once it is gone (below), after the
                // registry has heard of its exit.
                course = Course::Killed {
                    stuck: Some((
                        format!("job {job} went on {grace} after it was cancelled"),
                        Error::new(
                            ErrorCode::Internal,
                            format!("model {model}: its worker (pid {pid}) was killed because a cancelled job on it did not stop within {grace} (policy.cancel_grace); the next request loads the model again"),
                        ),
                    )),
                };
            }
            _ = sleep_until(exit_by), if exit_by.is_some() => {
                tracing::warn!(model, pid, grace_ms = EXIT_GRACE.as_millis() as u64, "worker did not exit after Unload; killing it");
                stop(&mut child, pid);
                course = Course::Killed { stuck: None };
            }
            // A batch's window is over: the loop's top sends it.
            _ = sleep_until(send_at.map(Into::into)), if send_at.is_some() => {}
            order = queue.recv(), if matches!(course, Course::Serving) => match order {
                Some(Order::Switch(SwitchOrder { mode, on_exit, reply })) => {
                    if !feed.is_empty() || switching.is_some() {
                        let _ = reply.send(Err(Error::new(ErrorCode::Internal, format!("model {}: its worker is busy and cannot switch", mode.name))));
                        continue;
                    }
                    tracing::info!(from = model, to = mode.name, pid, "switching in place");
                    // From now on its end is the new mode's, whatever the answer.
                    exited = on_exit;
                    model = mode.name.clone();
                    match unless_killed(&kill, channel.send(DaemonToWorker::Switch(mode))).await {
                        Ok(()) => switching = Some(reply),
                        Err(error) => {
                            let _ = reply.send(Err(Error::new(ErrorCode::Internal, format!("model {model}: cannot talk to its worker: {error}"))));
                        }
                    }
                }
                Some(Order::Job(WorkerJob { job, ticket, on_end, progress })) => {
                    let unit = match job {
                        Job::Generate(_) => "step",
                        Job::Image { .. } | Job::Tensor { .. } => "tile",
                    };
                    feed.hold(job, ticket, Client { on_end, progress, unit }, Instant::now());
                }
                // Every handle is gone: finish what it has, then exit.
                None => course = Course::Draining { exit_by: None },
            },
            Some(ticket) = cancelled.recv() => match feed.cancel(ticket, Instant::now()) {
                Cancelled::Unsent(task) => task.with.answer(JobEnd::Failed(Error::new(
                    ErrorCode::Cancelled,
                    format!("model {model}: the request was cancelled before it started"),
                ))),
                Cancelled::Stop(id) => {
                    tracing::info!(model, job = id, "client gone; cancelling its job");
                    // A stopped worker may not read even this: the grace
                    // bounds the write too.
                    let cancel = unless_killed(&kill, channel.send(DaemonToWorker::Cancel { id }));
                    let _ = tokio::time::timeout(grace, cancel).await;
                }
                Cancelled::Noted | Cancelled::Unknown => {}
            },
            message = channel.next() => match message {
                Some(Ok(WorkerToDaemon::Progress { id, done, total })) => {
                    if let Some(run) = feed.run(id) {
                        let started = run.started.unwrap_or_else(Instant::now);
                        for part in &run.parts {
                            part.with.progress(started, done, total);
                        }
                    }
                }
                Some(Ok(WorkerToDaemon::Tensor { id, frame })) => {
                    if let TensorFrame::Begin { .. } = frame {
                        if incoming.as_ref().is_none_or(|current| current.job != id) {
                            incoming = Some(Incoming::new(id, feed.run(id)));
                        }
                    }
                    let limit = output_limit(max_output, feed.run(id));
                    match &mut incoming {
                        Some(current) if current.job == id => current.frame(frame, limit),
                        _ => tracing::warn!(model, job = id, "worker streamed a tensor frame without TensorBegin"),
                    }
                }
                Some(Ok(WorkerToDaemon::Done { id, mut outputs, run_ms, notes })) => {
                    let limit = output_limit(max_output, feed.run(id));
                    let streamed = incoming.take_if(|i| i.job == id).unwrap_or_else(|| Incoming::new(id, None));
                    let filled = streamed.finish(&model, limit, &mut outputs);
                    if let Some(run) = feed.finish(id, Instant::now()) {
                        match filled {
                            Ok(()) => answer_run(&model, run, JobOutput { outputs, run_ms, notes }),
                            Err(error) => fail_run(run, &error),
                        }
                    }
                }
                Some(Ok(WorkerToDaemon::Failed { id: Some(id), error })) => {
                    incoming = None;
                    if let Some(run) = feed.finish(id, Instant::now()) {
                        if error.code != ErrorCode::InsufficientVram {
                            fail_run(run, &error);
                        } else if let Err(run) = feed.retry_smaller(run, Instant::now()) {
                            fail_run(run, &error);
                        } else {
                            tracing::info!(model, error = %error.message, "a batch ran out of memory; running it again in halves");
                        }
                    }
                }
                Some(Ok(WorkerToDaemon::Switched(loaded))) if switching.is_some() => {
                    if let Some(reply) = switching.take() {
                        let _ = reply.send(Ok(loaded));
                    }
                }
                Some(Ok(WorkerToDaemon::Failed { id: None, error })) if switching.is_some() => {
                    if let Some(reply) = switching.take() {
                        let _ = reply.send(Err(error));
                    }
                }
                Some(Ok(other)) => tracing::warn!(model, ?other, "unexpected message from worker"),
                Some(Err(error)) => {
                    tracing::warn!(model, %error, "worker protocol error; stopping it");
                    stop(&mut child, pid);
                    break child.wait().await.map_err(|e| e.to_string());
                }
                None => break match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                    Ok(status) => status.map_err(|e| e.to_string()),
                    Err(_) => {
                        stop(&mut child, pid);
                        child.wait().await.map_err(|e| e.to_string())
                    }
                },
            },
        }
    };
    // What it started and left behind goes with it.
    kill_group(pid);
    let description = match &ending {
        Ok(status) => describe(*status),
        Err(error) => format!("cannot be waited for: {error}"),
    };
    let (expected, stuck, failed) = match course {
        Course::Killed {
            stuck: Some((why, error)),
        } => (true, Some(why), error),
        other => (
            !matches!(other, Course::Serving) && feed.is_empty(),
            None,
            Error::new(
                ErrorCode::Internal,
                format!("model {model}: its worker (pid {pid}) died while running this request: {description}"),
            ),
        ),
    };
    // The registry hears of the exit before any client does, so that no
    // new job is sent to a worker that is gone.
    queue.close();
    exited(Exit {
        pid,
        description,
        expected,
        stuck,
    });
    // What it was running fails; what it had not started waits for the
    // next worker, as do orders that arrived after the end.
    let (runs, unsent) = feed.take_all();
    for run in runs {
        if run.started.is_some() {
            fail_run(run, &failed);
            continue;
        }
        for part in run.parts {
            match part.job {
                Some(job) => {
                    let progress = part.with.progress.clone();
                    part.with.answer(JobEnd::NotStarted { job, progress });
                }
                None => part.with.answer(JobEnd::Failed(failed.clone())),
            }
        }
    }
    for task in unsent {
        let progress = task.with.progress.clone();
        task.with.answer(JobEnd::NotStarted {
            job: task.job,
            progress,
        });
    }
    while let Ok(order) = queue.try_recv() {
        match order {
            Order::Job(WorkerJob {
                job,
                on_end,
                progress,
                ..
            }) => on_end(JobEnd::NotStarted { job, progress }),
            Order::Switch(SwitchOrder { reply, .. }) => {
                let _ = reply.send(Err(Error::new(
                    ErrorCode::Internal,
                    format!("model {model}: its worker exited"),
                )));
            }
        }
    }
}

/// Runs that could not be written to the worker fail.
fn fail_sent(feed: &mut Feed<Client>, model: &str, ids: &[u64], error: &FrameError) {
    let error = Error::new(
        ErrorCode::Internal,
        format!("model {model}: cannot send the job to its worker: {error}"),
    );
    for id in ids {
        if let Some(run) = feed.finish(*id, Instant::now()) {
            fail_run(run, &error);
        }
    }
}

/// The most output bytes run `run` may stream: `daemon.max_output` for
/// each job in it.
fn output_limit(max_output: usize, run: Option<&Run<Client>>) -> usize {
    run.map_or(1, |r| r.parts.len()).saturating_mul(max_output)
}

/// Answers every job of `run` with `error`.
fn fail_run(run: Run<Client>, error: &Error) {
    for part in run.parts {
        part.with.answer(JobEnd::Failed(error.clone()));
    }
}

/// Answers the jobs of a finished run: a single job gets the outputs, a
/// batch's jobs each their rows of every output.
fn answer_run(model: &str, mut run: Run<Client>, output: JobOutput) {
    let JobOutput {
        outputs,
        run_ms,
        mut notes,
    } = output;
    let together = run.parts.len();
    if together == 1 {
        if let Some(part) = run.parts.pop() {
            notes.extend(part.notes);
            part.with.answer(JobEnd::Done(JobOutput {
                outputs,
                run_ms,
                notes,
            }));
        }
        return;
    }
    let rows: Vec<u64> = run.parts.iter().map(|p| p.rows).collect();
    match split(outputs, &rows) {
        Ok(shares) => {
            for (part, outputs) in run.parts.into_iter().zip(shares) {
                let mut notes = notes.clone();
                notes.extend(part.notes);
                notes.push(format!("ran in a batch of {together} requests"));
                part.with.answer(JobEnd::Done(JobOutput {
                    outputs,
                    run_ms,
                    notes,
                }));
            }
        }
        Err(problem) => fail_run(
            run,
            &Error::new(ErrorCode::Internal, format!("model {model}: {problem}")),
        ),
    }
}

/// A write to the worker, given up when the worker is killed: a stopped
/// worker that no longer reads its socket must not hold its supervisor.
async fn unless_killed(
    kill: &CancellationToken,
    send: impl std::future::Future<Output = Result<(), FrameError>>,
) -> Result<(), FrameError> {
    tokio::select! {
        sent = send => sent,
        _ = kill.cancelled() => Err(FrameError::Io(std::io::Error::other("the worker was killed"))),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
