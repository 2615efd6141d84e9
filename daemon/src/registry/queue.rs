//! The requests waiting for a model: jobs and explicit loads, in arrival
//! order, each answered once.

use std::collections::VecDeque;
use std::time::Instant;

use gpuctl_protocol::{Error, ErrorCode, GenerateResponse, LoadResponse, QueuedEvent};
use tokio::sync::{mpsc, oneshot};

use super::{Event, PreparedJob};

pub enum Waiter {
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
    pub fn since(&self) -> Instant {
        match self {
            Waiter::Job { since, .. } | Waiter::Load { since, .. } => *since,
        }
    }
}

/// Answers every waiting request with `error`.
pub fn fail_all(queue: &mut VecDeque<Waiter>, error: &Error) {
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

/// Tells waiting generate clients their place and what they wait for:
/// all of them when `what_changed`, else those whose place changed.
pub fn tell_waiting(
    queue: &mut VecDeque<Waiter>,
    model: &str,
    waiting_for: &str,
    what_changed: bool,
) {
    for (index, waiter) in queue.iter_mut().enumerate() {
        let Waiter::Job { job, told, .. } = waiter else {
            continue;
        };
        let position = index as u32 + 1;
        if !what_changed && *told == Some(position) {
            continue;
        }
        *told = Some(position);
        if let Some(events) = &job.events {
            events.send(gpuctl_protocol::Event::Queued(QueuedEvent {
                model: model.to_owned(),
                position,
                waiting_for: waiting_for.to_owned(),
            }));
        }
    }
}

/// Stands between a job's client and the registry: answers the client, or,
/// when the client goes first (disconnect, `Cancel`, timeout), tells the
/// registry so that the job leaves its queue. The registry's end of the
/// returned sender closes then too, which stops a job already running.
pub fn watch_departure(
    reply: oneshot::Sender<Result<GenerateResponse, Error>>,
    model: String,
    ticket: u64,
    events: mpsc::UnboundedSender<Event>,
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
