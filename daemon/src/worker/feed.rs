//! What a worker's supervisor sends it, and when: the jobs the registry
//! handed over wait here until the worker has room — `concurrency` runs
//! at once plus one sent ahead (so the worker starts the next the moment
//! it finishes one, without a round trip through gpuctld) — and jobs that
//! share a [`BatchKey`] are sent as one run of up to `max_batch`, after
//! waiting at most `batch_window` for companions. Pure: the supervisor
//! does the I/O and says what time it is.
//!
//! A worker runs what it is sent in order; a run is *started* once it is
//! among the first `concurrency` unanswered ones. Only a started run's
//! cancellation is timed (`cancel_grace`): one still waiting behind
//! another client's long job is answered as soon as the worker reaches it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use gpuctl_protocol::worker::Job;

use super::batch::{batch_key, merge};

/// Runs sent ahead of the running ones at most: enough that a worker of
/// small jobs never waits for gpuctld between them, and that a few dozen
/// clients' requests go to it as they come instead of each waiting in the
/// registry's queue for a finished job (64 clients × 50 small requests:
/// 0.70–0.85 of the minimal relay's rate against 0.65–0.79 with 16 ahead,
/// three pairs of runs). What they commit the worker to is bounded: only
/// short jobs (at most 10 ms) are sent ahead, with 1 MiB of inputs in all.
pub const RUNS_AHEAD: usize = 64;

/// A run sent ahead keeps a copy of its jobs, to be run by the next
/// worker if this one dies before starting it; the runs ahead hold at
/// most this many input bytes (a larger job waits here for its turn: its
/// time dwarfs a round trip anyway).
pub const AHEAD_MAX_BYTES: usize = 1 << 20;

/// How the feed is bounded.
#[derive(Debug, Clone, Copy)]
pub struct FeedLimits {
    /// Runs the worker is given at once (the model's `concurrency`).
    pub concurrency: usize,
    /// Jobs per run at most (`max_batch`; 1: no batching).
    pub max_batch: usize,
    /// How long a job that could be batched waits for companions.
    pub window: Duration,
    /// How long a started, cancelled run may go on.
    pub cancel_grace: Duration,
}

/// A job handed over by the registry, with what answers it (`T`).
pub struct Task<T> {
    pub job: Job,
    pub with: T,
    pub ticket: u64,
    arrived: Instant,
    /// What was done to it, for its answer (a halved batch).
    pub notes: Vec<String>,
}

/// One job's share of a run.
pub struct Part<T> {
    pub with: T,
    pub ticket: u64,
    pub rows: u64,
    /// Its job, kept to be run again (a run sent ahead; a batch, which is
    /// re-formed smaller after running out of memory).
    pub job: Option<Job>,
    pub notes: Vec<String>,
    pub cancelled: bool,
}

/// What was sent as one `Run`.
pub struct Run<T> {
    pub parts: Vec<Part<T>>,
    /// When it became one of the first `concurrency` unanswered runs.
    pub started: Option<Instant>,
    pub cancelled_at: Option<Instant>,
}

/// What a cancellation comes to.
pub enum Cancelled<T> {
    /// It had not been sent: answer it now.
    Unsent(Task<T>),
    /// Every job of run `id` is cancelled: tell the worker.
    Stop(u64),
    /// Its run goes on for others (or is already stopping); its share is
    /// dropped when it ends.
    Noted,
    /// Not here (already answered).
    Unknown,
}

pub struct Feed<T> {
    limits: FeedLimits,
    held: VecDeque<Task<T>>,
    runs: BTreeMap<u64, Run<T>>,
    next_run: u64,
    /// The most jobs per run: `max_batch`, halved by each out-of-memory.
    batch_cap: usize,
}

impl<T> Feed<T> {
    pub fn new(limits: FeedLimits) -> Feed<T> {
        Feed {
            limits: FeedLimits {
                concurrency: limits.concurrency.max(1),
                max_batch: limits.max_batch.max(1),
                ..limits
            },
            held: VecDeque::new(),
            runs: BTreeMap::new(),
            next_run: 0,
            batch_cap: limits.max_batch.max(1),
        }
    }

    /// Takes a job; `ticket` is what cancels it.
    pub fn hold(&mut self, job: Job, ticket: u64, with: T, now: Instant) {
        self.held.push_back(Task {
            job,
            with,
            ticket,
            arrived: now,
            notes: Vec::new(),
        });
    }

    /// Nothing held and nothing sent.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.runs.is_empty()
    }

    /// The jobs the oldest held one would run with, by index in `held`.
    fn companions(&self) -> Vec<usize> {
        let Some(first) = self.held.front() else {
            return Vec::new();
        };
        // Without batching no key is worked out: this runs on every turn
        // of the supervisor's loop.
        let key = if self.batch_cap > 1 {
            batch_key(&first.job)
        } else {
            None
        };
        let Some((key, _)) = key else {
            return vec![0];
        };
        let mut taken = vec![0];
        for (index, task) in self.held.iter().enumerate().skip(1) {
            if taken.len() == self.batch_cap {
                break;
            }
            if batch_key(&task.job).is_some_and(|(k, _)| k == key) {
                taken.push(index);
            }
        }
        taken
    }

    /// The input bytes of the jobs kept by runs sent ahead.
    fn kept_bytes(&self) -> usize {
        self.runs
            .values()
            .flat_map(|run| &run.parts)
            .filter_map(|part| part.job.as_ref())
            .map(input_bytes)
            .sum()
    }

    /// When the next run may be sent: `None` until a run ends (or a job
    /// comes), a time in the past for now.
    pub fn ready_at(&self) -> Option<Instant> {
        let first = self.held.front()?;
        let ahead = self.runs.len() >= self.limits.concurrency;
        if self.runs.len() >= self.limits.concurrency + RUNS_AHEAD {
            return None;
        }
        let together = self.companions();
        if ahead {
            let bytes: usize = together
                .iter()
                .filter_map(|&i| self.held.get(i))
                .map(|t| input_bytes(&t.job))
                .sum();
            if self.kept_bytes() + bytes > AHEAD_MAX_BYTES {
                return None;
            }
        }
        let could_batch = self.batch_cap > 1 && batch_key(&first.job).is_some();
        if could_batch && together.len() < self.batch_cap {
            return Some(first.arrived + self.limits.window);
        }
        Some(first.arrived)
    }

    /// The next run to send, if its time has come: its id and its job.
    pub fn next_run(&mut self, now: Instant) -> Option<(u64, Job)> {
        if self.ready_at()? > now {
            return None;
        }
        let ahead = self.runs.len() >= self.limits.concurrency;
        let together = self.companions();
        let mut tasks: Vec<Task<T>> = Vec::with_capacity(together.len());
        for index in together.into_iter().rev() {
            tasks.extend(self.held.remove(index));
        }
        tasks.reverse();
        let (job, parts) = if tasks.len() == 1 {
            let task = tasks.pop()?;
            let rows = batch_key(&task.job).map_or(1, |(_, rows)| rows);
            let kept = ahead.then(|| task.job.clone());
            let part = Part {
                with: task.with,
                ticket: task.ticket,
                rows,
                job: kept,
                notes: task.notes,
                cancelled: false,
            };
            (task.job, vec![part])
        } else {
            let merged = match merge(&tasks.iter().map(|t| &t.job).collect::<Vec<_>>()) {
                Ok(job) => job,
                // Cannot happen for jobs of one key; run them one by one.
                Err(_) => {
                    self.batch_cap = 1;
                    for task in tasks.into_iter().rev() {
                        self.held.push_front(task);
                    }
                    return self.next_run(now);
                }
            };
            let parts = tasks
                .into_iter()
                .map(|task| Part {
                    rows: batch_key(&task.job).map_or(1, |(_, rows)| rows),
                    with: task.with,
                    ticket: task.ticket,
                    job: Some(task.job),
                    notes: task.notes,
                    cancelled: false,
                })
                .collect();
            (merged, parts)
        };
        self.next_run += 1;
        self.runs.insert(
            self.next_run,
            Run {
                parts,
                started: (!ahead).then_some(now),
                cancelled_at: None,
            },
        );
        Some((self.next_run, job))
    }

    /// The run `id` if it is unanswered.
    pub fn run(&self, id: u64) -> Option<&Run<T>> {
        self.runs.get(&id)
    }

    /// Run `id` has been answered: it leaves, and the next one in line
    /// starts.
    pub fn finish(&mut self, id: u64, now: Instant) -> Option<Run<T>> {
        let run = self.runs.remove(&id)?;
        for next in self.runs.values_mut().take(self.limits.concurrency) {
            next.started.get_or_insert(now);
        }
        Some(run)
    }

    /// A batch ran out of memory: its jobs go back to the front, and runs
    /// hold half as many from now on. A single job is given back (its
    /// error is its answer).
    pub fn retry_smaller(&mut self, run: Run<T>, now: Instant) -> Result<(), Run<T>> {
        if run.parts.len() < 2 || run.parts.iter().any(|p| p.job.is_none()) {
            return Err(run);
        }
        let was = run.parts.len();
        self.batch_cap = (was / 2).max(1);
        let note = format!(
            "out of memory in a batch of {was} requests; batches of at most {} from now on",
            self.batch_cap
        );
        for part in run.parts.into_iter().rev() {
            let Some(job) = part.job else { continue };
            let mut notes = part.notes;
            notes.push(note.clone());
            self.held.push_front(Task {
                job,
                with: part.with,
                ticket: part.ticket,
                // Its window has passed: it goes at the next chance.
                arrived: now.checked_sub(self.limits.window).unwrap_or(now),
                notes,
            });
        }
        Ok(())
    }

    /// The job with `ticket`'s client has gone.
    pub fn cancel(&mut self, ticket: u64, now: Instant) -> Cancelled<T> {
        if let Some(at) = self.held.iter().position(|t| t.ticket == ticket) {
            return self
                .held
                .remove(at)
                .map_or(Cancelled::Unknown, Cancelled::Unsent);
        }
        for (id, run) in &mut self.runs {
            let Some(part) = run.parts.iter_mut().find(|p| p.ticket == ticket) else {
                continue;
            };
            part.cancelled = true;
            if run.cancelled_at.is_none() && run.parts.iter().all(|p| p.cancelled) {
                run.cancelled_at = Some(now);
                return Cancelled::Stop(*id);
            }
            return Cancelled::Noted;
        }
        Cancelled::Unknown
    }

    /// The earliest time a started, cancelled run must have ended by, and
    /// which.
    pub fn overdue(&self) -> Option<(Instant, u64)> {
        self.runs
            .iter()
            .filter_map(|(id, run)| {
                let since = run.started?.max(run.cancelled_at?);
                Some((since + self.limits.cancel_grace, *id))
            })
            .min()
    }

    /// Everything here, when the worker is gone: the runs it had (started
    /// or not) and the jobs never sent.
    pub fn take_all(&mut self) -> (Vec<Run<T>>, Vec<Task<T>>) {
        let runs = std::mem::take(&mut self.runs).into_values().collect();
        (runs, self.held.drain(..).collect())
    }
}

/// A job's input bytes.
fn input_bytes(job: &Job) -> usize {
    match job {
        Job::Image { input, .. } => input.data.len(),
        Job::Generate(job) => job.noise.data.len(),
        Job::Tensor { inputs } => inputs.iter().map(|t| t.data.len()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuctl_protocol::{DType, WireTensor};

    const MS: Duration = Duration::from_millis(1);

    fn limits(concurrency: usize, max_batch: usize) -> FeedLimits {
        FeedLimits {
            concurrency,
            max_batch,
            window: 2 * MS,
            cancel_grace: 10 * MS,
        }
    }

    fn job(rows: u64, bytes_per_row: usize) -> Job {
        Job::Tensor {
            inputs: vec![WireTensor::new(
                DType::U8,
                vec![rows, bytes_per_row as u64],
                vec![1; rows as usize * bytes_per_row],
            )
            .unwrap()],
        }
    }

    /// Holds `job` for client `with` under a ticket of its own.
    fn hold<T>(feed: &mut Feed<T>, job: Job, with: T, now: Instant) -> u64 {
        static TICKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let ticket = TICKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        feed.hold(job, ticket, with, now);
        ticket
    }

    fn rows(job: &Job) -> u64 {
        batch_key(job).map_or(0, |(_, rows)| rows)
    }

    #[test]
    fn runs_go_ahead_of_the_running_one_up_to_a_bound() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 1));
        for client in 0..RUNS_AHEAD + 2 {
            hold(&mut feed, job(1, 4), client, t0);
        }
        let (first, _) = feed.next_run(t0).unwrap();
        let ahead: Vec<u64> = (0..RUNS_AHEAD)
            .filter_map(|_| feed.next_run(t0))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ahead.len(), RUNS_AHEAD);
        assert!(feed.next_run(t0).is_none(), "no more than RUNS_AHEAD ahead");
        assert!(feed.run(first).unwrap().started.is_some());
        let next = feed.run(ahead[0]).unwrap();
        assert!(next.started.is_none());
        assert!(next.parts[0].job.is_some(), "kept to be run again");
        feed.finish(first, t0 + MS);
        assert_eq!(feed.run(ahead[0]).unwrap().started, Some(t0 + MS));
        assert!(feed.run(ahead[1]).unwrap().started.is_none());
        assert!(feed.next_run(t0 + MS).is_some());
    }

    #[test]
    fn runs_ahead_keep_at_most_a_bound_of_input_bytes() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 1));
        let quarter = AHEAD_MAX_BYTES / 4;
        for client in 0..6 {
            hold(&mut feed, job(1, quarter), client, t0);
        }
        let sent = std::iter::from_fn(|| feed.next_run(t0)).count();
        assert_eq!(sent, 5, "the running one, and four quarters kept");
    }

    #[test]
    fn a_large_job_is_not_sent_ahead() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 1));
        hold(&mut feed, job(1, 4), 0, t0);
        hold(&mut feed, job(1, AHEAD_MAX_BYTES + 1), 1, t0);
        let (first, _) = feed.next_run(t0).unwrap();
        assert_eq!(feed.ready_at(), None);
        assert!(feed.next_run(t0).is_none());
        feed.finish(first, t0);
        assert!(feed.next_run(t0).is_some());
    }

    #[test]
    fn a_cancelled_run_waiting_behind_another_is_not_timed_until_it_starts() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 1));
        let _long = hold(&mut feed, job(1, 4), "long", t0);
        let waiting = hold(&mut feed, job(1, 4), "waiting", t0);
        let (first, _) = feed.next_run(t0).unwrap();
        let (second, _) = feed.next_run(t0).unwrap();
        assert!(matches!(feed.cancel(waiting, t0), Cancelled::Stop(id) if id == second));
        assert_eq!(feed.overdue(), None, "the worker has not reached it");
        feed.finish(first, t0 + 60_000 * MS);
        assert_eq!(feed.overdue(), Some((t0 + 60_010 * MS, second)));
    }

    #[test]
    fn an_unsent_job_is_answered_at_once_when_cancelled() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 1));
        hold(&mut feed, job(1, 4), 0, t0);
        hold(&mut feed, job(1, 4), 1, t0);
        let last = hold(&mut feed, job(1, 4), 2, t0);
        feed.next_run(t0);
        feed.next_run(t0);
        assert!(matches!(feed.cancel(last, t0), Cancelled::Unsent(task) if task.with == 2));
        assert!(matches!(feed.cancel(last, t0), Cancelled::Unknown));
    }

    #[test]
    fn jobs_that_agree_run_together_after_the_window_or_once_full() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 3));
        hold(&mut feed, job(1, 4), 0, t0);
        hold(&mut feed, job(2, 8), 1, t0);
        hold(&mut feed, job(2, 4), 2, t0 + MS);
        assert_eq!(feed.ready_at(), Some(t0 + 2 * MS), "waits for a third");
        assert!(feed.next_run(t0 + MS).is_none());
        let (id, merged) = feed.next_run(t0 + 2 * MS).unwrap();
        assert_eq!(rows(&merged), 3);
        let run = feed.run(id).unwrap();
        assert_eq!(run.parts.iter().map(|p| p.with).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(run.parts.iter().map(|p| p.rows).collect::<Vec<_>>(), [1, 2]);
        // The other shape, alone: its window.
        assert_eq!(feed.ready_at(), Some(t0 + 2 * MS));
        hold(&mut feed, job(1, 8), 3, t0 + 3 * MS);
        hold(&mut feed, job(1, 8), 4, t0 + 3 * MS);
        assert_eq!(feed.ready_at(), Some(t0), "full: at once");
        let (_, merged) = feed.next_run(t0 + 3 * MS).unwrap();
        assert_eq!(rows(&merged), 4);
    }

    #[test]
    fn a_batch_out_of_memory_runs_again_in_halves() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 4));
        for client in 0..4 {
            hold(&mut feed, job(1, 4), client, t0);
        }
        let (id, _) = feed.next_run(t0).unwrap();
        let run = feed.finish(id, t0).unwrap();
        assert!(feed.retry_smaller(run, t0).is_ok());
        let (id, merged) = feed.next_run(t0).unwrap();
        assert_eq!(rows(&merged), 2);
        let run = feed.run(id).unwrap();
        assert_eq!(run.parts.iter().map(|p| p.with).collect::<Vec<_>>(), [0, 1]);
        assert!(run.parts[0].notes[0].contains("out of memory in a batch of 4"));
        let single = {
            let mut feed = Feed::new(limits(1, 4));
            hold(&mut feed, job(1, 4), 9, t0);
            hold(&mut feed, Job::Tensor { inputs: vec![] }, 9, t0);
            let (id, _) = feed.next_run(t0 + 2 * MS).unwrap();
            feed.finish(id, t0).unwrap()
        };
        assert!(
            feed.retry_smaller(single, t0).is_err(),
            "a single job's error is its answer"
        );
    }

    #[test]
    fn a_batch_is_stopped_only_when_all_its_clients_left() {
        let t0 = Instant::now();
        let mut feed = Feed::new(limits(1, 2));
        let a = hold(&mut feed, job(1, 4), 0, t0);
        let b = hold(&mut feed, job(1, 4), 1, t0);
        let (id, _) = feed.next_run(t0).unwrap();
        assert!(matches!(feed.cancel(a, t0), Cancelled::Noted));
        assert_eq!(feed.overdue(), None);
        assert!(matches!(feed.cancel(b, t0), Cancelled::Stop(i) if i == id));
        assert_eq!(feed.overdue(), Some((t0 + 10 * MS, id)));
    }
}
