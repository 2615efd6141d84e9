//! Requests for a model: queued (bounded by `policy.queue_max`), handed to
//! its ready worker up to its slots (`policy::worker_slots`), and answered
//! when the worker is done; one its worker went before starting waits in
//! the queue again; a client that leaves takes its request with it.

use std::time::Instant;

use gpuctl_protocol::worker::Job;
use gpuctl_protocol::{Error, ErrorCode, GenerateResponse, KeepAlive, LoadResponse};
use tokio::sync::{mpsc, oneshot};

use super::entry::Life;
use super::queue::Waiter;
use super::{ms, not_found, Event, PreparedJob, Registry};
use crate::policy;
use crate::worker::{JobEnd, JobOutput, WorkerJob};

impl Registry {
    /// Queues a job (bounded by `queue_max`) and moves things along.
    pub(super) fn submit_job(
        &mut self,
        job: PreparedJob,
        ticket: u64,
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
    /// so it holds no place in `queue_max` and the others move up; one its
    /// worker holds is stopped there.
    pub(super) fn on_departed(&mut self, name: &str, ticket: u64) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let before = entry.queue.len();
        entry
            .queue
            .retain(|w| !matches!(w, Waiter::Job { ticket: t, .. } if *t == ticket));
        if entry.queue.len() == before {
            match &entry.life {
                Life::Ready { worker, .. } => worker.canceller.cancel(ticket),
                Life::Unloading { jobs, .. } => jobs.cancel(ticket),
                _ => {}
            }
            return;
        }
        tracing::info!(
            model = name,
            queued = entry.queue.len(),
            "a waiting request's client has gone; it left the queue"
        );
        self.pump(name);
    }

    /// A job that worker `load` went without starting waits in the queue
    /// again, in its place by arrival.
    pub(super) fn on_requeue(&mut self, name: &str, load: u64, waiter: Waiter) {
        let Some(entry) = self.models.get_mut(name) else {
            if let Waiter::Job { reply, .. } = waiter {
                let _ = reply.send(Err(Error::new(
                    ErrorCode::NotFound,
                    format!("model {name} was removed from the configuration"),
                )));
            }
            return;
        };
        if entry.load == load {
            entry.job_done(None);
        }
        let since = waiter.since();
        let at = entry.queue.partition_point(|w| w.since() <= since);
        entry.queue.insert(at, waiter);
        self.pump(name);
    }

    /// A job of worker `load` has ended.
    pub(super) fn on_job_done(&mut self, name: &str, load: u64, run_ms: Option<u64>) {
        let mut leave = None;
        if let Some(entry) = self.models.get_mut(name).filter(|e| e.load == load) {
            entry.job_done(run_ms);
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
        // switch or the LRU cap for others. Once the events already in are
        // handled: a burst of finished jobs is one pump, not one each.
        if !self.pump_due.iter().any(|due| due == name) {
            self.pump_due.push(name.to_owned());
        }
    }

    /// Hands waiting requests to the ready worker of `name`, up to its
    /// `slots`, none that arrived after `barrier`: requests that
    /// arrived after one waiting for another member of the group wait for
    /// the switch and back (FIFO across the group).
    pub(super) fn dispatch(&mut self, name: &str, slots: u32, barrier: Option<Instant>) {
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
        while *in_flight < slots {
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
                    job,
                    reply,
                    since,
                    ticket,
                    ..
                } => {
                    let PreparedJob {
                        job: mut work,
                        seed,
                        events: progress,
                        keep_alive,
                        ..
                    } = *job;
                    if let Job::Image {
                        tiling: Some(tiling),
                        ..
                    } = &mut work
                    {
                        if tiling.batch == 0 {
                            tiling.batch = policy::tile_batch(&device);
                        }
                    }
                    let running = RunningJob {
                        model: name.to_owned(),
                        load,
                        device: device.clone(),
                        seed,
                        keep_alive,
                        ticket,
                        since,
                        queue_ms: ms(since.elapsed()),
                        load_ms: load_ms_since(since),
                        reply,
                        events: events.clone(),
                    };
                    worker.run(WorkerJob {
                        job: work,
                        ticket,
                        on_end: Box::new(move |end| running.end(end)),
                        progress,
                    });
                    *in_flight += 1;
                }
            }
        }
    }
}

/// A job handed to a worker, until its client has the answer: what its
/// end is turned into, on the worker's supervisor's task.
struct RunningJob {
    model: String,
    load: u64,
    device: String,
    seed: Option<u64>,
    keep_alive: Option<KeepAlive>,
    ticket: u64,
    since: Instant,
    queue_ms: u64,
    load_ms: Option<u64>,
    reply: oneshot::Sender<Result<GenerateResponse, Error>>,
    events: mpsc::UnboundedSender<Event>,
}

impl RunningJob {
    /// Answers the client and tells the registry; a job its worker went
    /// without starting goes back to the queue instead.
    fn end(self, end: JobEnd) {
        let outcome = match end {
            JobEnd::Done(output) => Ok(output),
            JobEnd::Failed(error) => {
                if self.reply.is_closed() {
                    tracing::info!(model = %self.model, error = %error.message, "job of a client that left has stopped");
                }
                Err(error)
            }
            JobEnd::NotStarted { job, progress } => {
                tracing::debug!(model = %self.model, "its worker went before starting it; it waits for the next");
                let waiter = Waiter::Job {
                    job: Box::new(PreparedJob {
                        model: self.model.clone(),
                        job,
                        seed: self.seed,
                        keep_alive: self.keep_alive,
                        events: progress,
                    }),
                    ticket: self.ticket,
                    reply: self.reply,
                    since: self.since,
                    told: None,
                };
                let _ = self.events.send(Event::Requeue {
                    model: self.model,
                    load: self.load,
                    waiter,
                });
                return;
            }
        };
        let run_ms = outcome.as_ref().ok().map(|output| output.run_ms);
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
        let _ = self.events.send(Event::JobDone {
            model: self.model.clone(),
            load: self.load,
            run_ms,
        });
        let _ = self.reply.send(answer);
    }
}
