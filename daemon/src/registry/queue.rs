//! The requests waiting for a model: jobs and explicit loads, in arrival
//! order, each answered once.

use std::collections::VecDeque;
use std::time::Instant;

use gpuctl_protocol::{Error, GenerateResponse, LoadResponse, QueuedEvent};
use tokio::sync::oneshot;

use super::PreparedJob;

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
/// those for whom `tell(position, last told)` says so.
pub fn tell_waiting(
    queue: &mut VecDeque<Waiter>,
    model: &str,
    waiting_for: &str,
    tell: impl Fn(u32, Option<u32>) -> bool,
) {
    for (index, waiter) in queue.iter_mut().enumerate() {
        let Waiter::Job { job, told, .. } = waiter else {
            continue;
        };
        let position = index as u32 + 1;
        if !tell(position, *told) {
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
