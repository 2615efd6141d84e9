//! Requests for a model: queued (bounded by `policy.queue_max`), handed to
//! its ready worker up to its `concurrency`, and answered when the worker
//! is done; a client that leaves takes its request with it.

use std::time::Instant;

use gpuctl_protocol::{Error, ErrorCode, GenerateResponse, KeepAlive, LoadResponse};
use tokio::sync::{mpsc, oneshot};

use super::entry::Life;
use super::queue::{watch_departure, Waiter};
use super::{ms, not_found, Event, PreparedJob, Registry};
use crate::policy;
use crate::worker::{JobOutput, WorkerJob};

impl Registry {
    /// Queues a job (bounded by `queue_max`) and moves things along.
    pub(super) fn submit_job(
        &mut self,
        job: PreparedJob,
        reply: oneshot::Sender<Result<GenerateResponse, Error>>,
    ) {
        let config = self.config();
        let name = job.model.clone();
        let queue_max = config.policy.queue_max;
        let Some(entry) = self.models.get_mut(&name) else {
            let _ = reply.send(Err(not_found(&name, &config)));
            return;
        };
        let in_flight = match entry.phase() {
            policy::Phase::Ready { in_flight } | policy::Phase::Draining { in_flight } => in_flight,
            _ => 0,
        };
        if policy::queue_full(entry.queue.len(), in_flight, queue_max) {
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

    /// `Load`: waits in the queue like a job, answered once it is ready.
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

    /// A waiting request whose client has gone leaves the queue at once,
    /// so it holds no place in `queue_max` and the others move up.
    pub(super) fn on_departed(&mut self, name: &str, ticket: u64) {
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

    /// A job of worker `load` has ended.
    pub(super) fn on_job_done(&mut self, name: &str, load: u64, succeeded: bool) {
        let mut leave = None;
        if let Some(entry) = self.models.get_mut(name).filter(|e| e.load == load) {
            entry.job_done(succeeded);
            if let Life::Ready {
                in_flight: 0,
                yield_after_work,
                ..
            } = &mut entry.life
            {
                leave = yield_after_work.take();
            }
        }
        if let Some(reason) = leave {
            self.unload(name, reason, false);
        }
        // Its own waiters first; its becoming idle may also unblock a group
        // switch or the LRU cap for others.
        self.pump(name);
    }

    /// Hands waiting requests to the ready worker of `name`, up to its
    /// `concurrency`, none that arrived after `barrier`: requests that
    /// arrived after one waiting for another member of the group wait for
    /// the switch and back (FIFO across the group).
    pub(super) fn dispatch(&mut self, name: &str, concurrency: u32, barrier: Option<Instant>) {
        let events = self.events.clone();
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let load = entry.load;
        let last_load_ms = entry.history.last_load_ms;
        let Life::Ready {
            worker,
            in_flight,
            loaded_at,
            last_used,
            yield_after_work,
            ..
        } = &mut entry.life
        else {
            return;
        };
        if yield_after_work.is_some() {
            return; // it leaves once its work is done; the rest wait for memory
        }
        let device = worker.loaded.device.clone();
        // The load time, for waiters that arrived before the load finished.
        let loaded_at = *loaded_at;
        let load_ms_since =
            move |since: Instant| (since < loaded_at).then_some(()).and(last_load_ms);
        while *in_flight < concurrency {
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
                    let _ = reply.send(Ok(LoadResponse {
                        model: name.to_owned(),
                        device: device.clone(),
                        load_ms: load_ms_since(since),
                    }));
                    *last_used = Instant::now();
                }
                Waiter::Job { reply, .. } if reply.is_closed() => {
                    tracing::debug!(model = name, "its client left while it waited; dropped");
                }
                Waiter::Job {
                    job, reply, since, ..
                } => {
                    let (done, result) = oneshot::channel();
                    let (cancel, cancelled) = oneshot::channel();
                    let PreparedJob {
                        job: work,
                        seed,
                        events: progress,
                        ..
                    } = *job;
                    worker.run(WorkerJob {
                        job: work,
                        reply: done,
                        progress,
                        cancel: cancelled,
                    });
                    *in_flight += 1;
                    let running = RunningJob {
                        model: name.to_owned(),
                        load,
                        device: device.clone(),
                        seed,
                        queue_ms: ms(since.elapsed()),
                        load_ms: load_ms_since(since),
                    };
                    tokio::spawn(running.answer(result, reply, cancel, events.clone()));
                }
            }
        }
    }
}

/// A job handed to a worker, until its client has the answer.
struct RunningJob {
    model: String,
    load: u64,
    device: String,
    seed: Option<u64>,
    queue_ms: u64,
    load_ms: Option<u64>,
}

impl RunningJob {
    /// Waits for the worker's answer and passes it on; a client that hangs
    /// up (or cancels) stops its job at the worker's next batch boundary.
    async fn answer(
        self,
        mut result: oneshot::Receiver<Result<JobOutput, Error>>,
        mut reply: oneshot::Sender<Result<GenerateResponse, Error>>,
        cancel: oneshot::Sender<()>,
        events: mpsc::UnboundedSender<Event>,
    ) {
        let finished = tokio::select! {
            finished = &mut result => finished,
            _ = reply.closed() => {
                let _ = cancel.send(());
                let finished = result.await;
                if let Ok(Err(error)) = &finished {
                    tracing::info!(model = %self.model, error = %error.message, "job of a client that left has stopped");
                }
                finished
            }
        };
        let outcome = finished.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorCode::Internal,
                format!("model {}: its worker is gone", self.model),
            ))
        });
        let succeeded = outcome.is_ok();
        let answer = outcome.map(
            |JobOutput {
                 outputs,
                 run_ms,
                 notes,
             }| GenerateResponse {
                model: self.model.clone(),
                device: self.device,
                seed: self.seed,
                outputs,
                queue_ms: self.queue_ms,
                load_ms: self.load_ms,
                run_ms,
                notes,
            },
        );
        let _ = reply.send(answer);
        let _ = events.send(Event::JobDone {
            model: self.model,
            load: self.load,
            succeeded,
        });
    }
}
