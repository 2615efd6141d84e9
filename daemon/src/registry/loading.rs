//! Moving a model with waiters along: serve from its ready worker, or admit
//! a load (evicting what policy says), start its worker, and record how the
//! load went.

use std::time::Instant;

use gpuctl_protocol::worker::LoadModel;
use gpuctl_protocol::{Error, ErrorCode, NoticeKind};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::entry::{FileIdentity, Life, PendingUnload};
use super::queue::{fail_all, tell_waiting, Waiter};
use super::{ms, Event, Registry};
use crate::config::{Config, Kind, ModelConfig};
use crate::policy::{self, Candidate, Refusal, Step, UnloadReason, Waiting};
use crate::worker::{self, WorkerHandle};

impl Registry {
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

    /// Moves `name` along, first among the models with waiters: an unload
    /// or a finished job may have made room for any of them.
    pub(super) fn pump(&mut self, name: &str) {
        self.pump_first(vec![name.to_owned()]);
    }

    /// Moves `names` along, then every other model with waiters. A model
    /// nobody waits for has nothing to move (`plan_pump` plans nothing for
    /// it): when no model has waiters, as after most finished jobs, no
    /// snapshot is taken.
    pub(super) fn pump_first(&mut self, mut names: Vec<String>) {
        names.retain(|name| self.models.get(name).is_some_and(|e| !e.queue.is_empty()));
        let others: Vec<String> = self
            .models_with_waiters()
            .filter(|n| !names.contains(n))
            .collect();
        names.extend(others);
        match names.as_slice() {
            [] => {}
            [only] if self.takes_work(only) => {
                let only = only.clone();
                self.serve_ready(&only);
            }
            _ => self.pump_models(names),
        }
    }

    /// Whether `name` is ready and not yielding its memory: when it is the
    /// one model with waiters, `plan_pump` would dispatch to it up to its
    /// slots (no other model's waiters, no group barrier) and decide
    /// nothing else.
    fn takes_work(&self, name: &str) -> bool {
        self.models.get(name).is_some_and(|entry| {
            matches!(
                entry.life,
                Life::Ready {
                    yield_after_work: None,
                    ..
                }
            )
        })
    }

    /// What [`Self::pump_models`] does for a ready model that alone has
    /// waiters, without the snapshot: a job arriving, or one finishing
    /// while others wait, is the daemon's busiest path.
    fn serve_ready(&mut self, name: &str) {
        let slots = self.slots(name, &self.config());
        self.dispatch(name, slots, None);
        self.tell_positions(name);
    }

    /// How many of `name`'s requests its worker's supervisor holds.
    fn slots(&self, name: &str, config: &Config) -> u32 {
        match (config.models.get(name), self.models.get(name)) {
            (Some(config), Some(entry)) => slots(config, entry),
            _ => 1,
        }
    }

    /// Moves every model with waiters along.
    pub(super) fn pump_all(&mut self) {
        let names = self.models_with_waiters().collect();
        self.pump_models(names);
    }

    fn models_with_waiters(&self) -> impl Iterator<Item = String> + '_ {
        self.models
            .iter()
            .filter(|(_, e)| !e.queue.is_empty())
            .map(|(n, _)| n.clone())
    }

    /// Serves what can be served, from one snapshot: dispatches jobs to
    /// ready workers, refuses requests for models that may not load, and
    /// starts loads (evicting what policy says), as `policy::plan_pump`
    /// decides; then tells waiting clients where they stand.
    fn pump_models(&mut self, names: Vec<String>) {
        let config = self.config();
        let candidates: Vec<Candidate> = names
            .iter()
            .filter_map(|name| self.candidate(name, &config))
            .collect();
        let steps = policy::plan_pump(
            &self.views(&config),
            &candidates,
            config.policy.max_loaded as usize,
        );
        let mut failed_loads = false;
        for step in steps {
            match step {
                Step::Dispatch { model, barrier } => {
                    let slots = self.slots(&model, &config);
                    self.dispatch(&model, slots, barrier);
                }
                Step::Refuse {
                    model,
                    why: Refusal::RetryLater(error),
                } => {
                    if let Some(entry) = self.models.get_mut(&model) {
                        entry.fail_waiters(&error);
                    }
                }
                Step::Refuse {
                    model,
                    why: Refusal::Unreadable(error),
                } => {
                    self.fail_load(&model, error);
                    failed_loads = true;
                }
                Step::Load { model, evict } => {
                    for (victim, reason) in evict {
                        self.unload(&victim, reason, false);
                    }
                    self.begin_load(&model, &config);
                }
                Step::Switch {
                    model,
                    from,
                    reason,
                    evict,
                } => {
                    for (victim, reason) in evict {
                        self.unload(&victim, reason, false);
                    }
                    self.switch_in_place(&from, reason, &model, &config);
                }
                Step::Wait { model, because } => {
                    tracing::debug!(model, because, "load waits")
                }
            }
        }
        for name in &names {
            self.tell_positions(name);
        }
        if failed_loads {
            // Their requests have left: those that waited behind them may go.
            self.pump_all();
            self.request_sample();
        }
    }

    /// What the pump needs to know of `name` beyond its view: its waiting
    /// requests, its concurrency, and whether it may load at all (inside
    /// its retry window, or its file unreadable, it may not).
    fn candidate(&mut self, name: &str, config: &Config) -> Option<Candidate> {
        let model = config.models.get(name)?;
        let entry = self.models.get_mut(name)?;
        let waiting = entry
            .queue
            .iter()
            .map(|w| Waiting {
                since: w.since(),
                job: matches!(w, Waiter::Job { .. }),
            })
            .collect();
        let yielding = matches!(
            entry.life,
            Life::Ready {
                yield_after_work: Some(_),
                ..
            }
        );
        let mut refused = None;
        if matches!(entry.life, Life::Unloaded { .. }) && !entry.queue.is_empty() {
            let backing_off = policy::retry_later(
                name,
                entry.history.last_error.as_deref(),
                entry.retry_at(),
                Instant::now(),
            );
            // A file that is not there fails now, before anything is evicted
            // for it; what is there is what the need estimate counts on.
            // A command model without a path has nothing to check here.
            let path = config.model_path(model);
            refused = match (backing_off, path) {
                (Some(error), _) => Some(Refusal::RetryLater(error)),
                (None, None) => None,
                (None, Some(path)) => match std::fs::metadata(&path) {
                    Err(error) => Some(Refusal::Unreadable(Error::new(
                        ErrorCode::NotFound,
                        format!("model {name}: cannot read {}: {error}", path.display()),
                    ))),
                    Ok(_) => {
                        entry.history.seen_file = FileIdentity::of(&path);
                        None
                    }
                },
            };
        }
        let slots = slots(model, entry);
        let switch_from = if matches!(entry.life, Life::Unloaded { .. }) && refused.is_none() {
            self.siblings(name, model, config)
        } else {
            Vec::new()
        };
        Some(Candidate {
            name: name.to_owned(),
            waiting,
            slots,
            yielding,
            refused,
            switch_from,
        })
    }

    /// The ready, idle-able models whose workers could become `name` in
    /// place: other modes of its base whose workers can switch.
    fn siblings(&self, name: &str, model: &ModelConfig, config: &Config) -> Vec<String> {
        let launch = self.launch(model, config);
        self.models
            .iter()
            .filter(|(other, _)| other.as_str() != name)
            .filter_map(|(other, entry)| match &entry.life {
                Life::Ready {
                    worker,
                    placement,
                    yield_after_work: None,
                    ..
                } if worker
                    .can_become(&self.load_spec(name, model, config, *placement), &launch) =>
                {
                    Some(other.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Makes `from`'s idle worker `to`'s: `from` is unloaded (`reason`)
    /// without its worker exiting, and `to` loads by switching that worker
    /// to its LoRAs, the base not read again.
    fn switch_in_place(&mut self, from: &str, reason: UnloadReason, to: &str, config: &Config) {
        let Some(model) = config.models.get(to) else {
            return;
        };
        let Some(entry) = self.models.get_mut(from) else {
            return;
        };
        let (worker, placement) =
            match std::mem::replace(&mut entry.life, Life::Unloaded { retry_at: None }) {
                Life::Ready {
                    worker, placement, ..
                } => (worker, placement),
                other => {
                    // Not idle and ready after all: the ordinary way.
                    entry.life = other;
                    self.unload(from, reason, false);
                    self.begin_load(to, config);
                    return;
                }
            };
        entry.history.last_unload = Some(reason.clone());
        let pid = worker.pid;
        tracing::info!(model = from, to, pid, reason = %reason, "unloaded: its worker becomes {to} in place");
        self.notice(NoticeKind::Unloaded {
            model: from.to_owned(),
            pid,
            reason,
            reclaimed: 0,
            took_ms: 0,
        });
        let spec = self.load_spec(to, model, config, placement);
        let within = model.load_timeout();
        let kill = worker.kill_switch();
        self.spawn_load(to, model, config, placement, kill, move |on_exit| {
            worker.switch(spec, within, on_exit)
        });
    }

    /// Marks `name` as loading (a new load number, the file it loads now)
    /// and runs `load`, whose outcome comes back as `Event::Loaded` and
    /// whose worker's end, whenever it comes, as `Event::Exited` of this
    /// load.
    fn spawn_load<F, Loading>(
        &mut self,
        name: &str,
        model: &ModelConfig,
        config: &Config,
        placement: Option<u32>,
        kill: CancellationToken,
        load: F,
    ) where
        F: FnOnce(worker::OnExit) -> Loading + Send + 'static,
        Loading: std::future::Future<Output = Result<WorkerHandle, Error>> + Send,
    {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        entry.load += 1;
        entry.history.loaded_file = config
            .model_path(model)
            .as_deref()
            .and_then(FileIdentity::of);
        entry.history.seen_file = entry.history.loaded_file;
        entry.life = Life::Loading {
            since: Instant::now(),
            placement,
            kill,
            then: None,
        };
        let number = entry.load;
        let events = self.events.clone();
        let model = name.to_owned();
        tokio::spawn(async move {
            let on_exit: worker::OnExit = {
                let (events, model) = (events.clone(), model.clone());
                Box::new(move |exit| {
                    let _ = events.send(Event::Exited {
                        model,
                        load: number,
                        exit,
                    });
                })
            };
            let result = load(on_exit).await;
            let _ = events.send(Event::Loaded {
                model,
                load: number,
                result,
            });
        });
    }

    /// Tells waiting clients where they stand, when that changed.
    fn tell_positions(&mut self, name: &str) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let waiting_for = match entry.life {
            Life::WaitingForVram { .. } => return, // the GPU sampler tells them
            Life::Unloaded { .. } => "its turn to load (group switch or max_loaded)",
            Life::Loading { .. } => "the model to load",
            Life::Ready { .. } => "a free slot",
            Life::Unloading { .. } => "the previous worker to exit",
        };
        let recent = &entry.history.recent_run_ms;
        if matches!(entry.life, Life::Ready { .. }) && policy::short_jobs(recent) {
            // The places in a queue of short jobs change every few
            // microseconds: a client hears its first, and only when the
            // wait for the jobs ahead is long enough to show.
            let first = policy::first_place_told(recent);
            tell_waiting(&mut entry.queue, name, waiting_for, |position, told| {
                told.is_none() && first.is_some_and(|first| position >= first)
            });
        } else {
            tell_waiting(&mut entry.queue, name, waiting_for, |position, told| {
                told != Some(position)
            });
        }
    }

    /// An admitted model: its worker starts now, or, when its GPU memory is
    /// arbitrated, once the sampler finds room.
    fn begin_load(&mut self, name: &str, config: &Config) {
        let Some(model) = config.models.get(name) else {
            return;
        };
        if self.arbitrated(model) {
            if let Some(entry) = self.models.get_mut(name) {
                entry.life = Life::WaitingForVram {
                    since: Instant::now(),
                    told: None,
                };
            }
            self.request_sample();
        } else {
            self.start_load(name, model, config, None);
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
        let spec = self.load_spec(name, model, config, placement);
        tracing::info!(model = name, source = %config.model_source(model), device = %spec.device, "loading");
        let launch = self.launch(model, config);
        let limits = worker::Limits {
            max_output: config.daemon.max_output.0 as usize,
            feed: worker::FeedLimits {
                concurrency: model.concurrency as usize,
                max_batch: model.max_batch as usize,
                window: model.batch_window.0,
                cancel_grace: config.policy.cancel_grace.0,
            },
        };
        let kill = CancellationToken::new();
        let stop = kill.clone();
        self.spawn_load(
            name,
            model,
            config,
            placement,
            kill,
            move |on_exit| async move { worker::start(&launch, spec, limits, stop, on_exit).await },
        );
    }

    /// How a worker for `model` is started.
    fn launch(&self, model: &ModelConfig, config: &Config) -> worker::Launch {
        match &model.command {
            Some(argv) => worker::Launch::command(
                argv,
                &model.env,
                config.model_cwd(model),
                model.load_timeout(),
            ),
            None => worker::Launch::builtin(self.worker_program.clone(), model.load_timeout()),
        }
    }

    /// What `name`'s worker is told to load, on `placement`'s device.
    fn load_spec(
        &self,
        name: &str,
        model: &ModelConfig,
        config: &Config,
        placement: Option<u32>,
    ) -> LoadModel {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        LoadModel {
            name: name.to_owned(),
            path: config.model_path(model).map(|p| p.display().to_string()),
            kind: model.kind.into(),
            device: self.worker_device(model, placement),
            threads: policy::worker_threads(model.threads, cores),
            rgb8: model.kind != Kind::Tensor,
            fp16: model.precision == crate::config::Precision::Fp16,
            options: options_json(&model.options),
            loras: model
                .loras
                .iter()
                .map(|lora| gpuctl_protocol::worker::Lora {
                    path: config.model_root.join(&lora.path).display().to_string(),
                    strength: lora.strength,
                })
                .collect(),
        }
    }

    pub(super) fn on_loaded(&mut self, name: &str, load: u64, result: Result<WorkerHandle, Error>) {
        let Some(entry) = self.models.get_mut(name).filter(|e| e.load == load) else {
            return;
        };
        let Life::Loading {
            since,
            placement,
            then,
            ..
        } = std::mem::replace(&mut entry.life, Life::Unloaded { retry_at: None })
        else {
            return;
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
                entry.history.loads += 1;
                entry.history.last_load_ms = Some(took);
                entry.history.last_error = None;
                let now = Instant::now();
                entry.life = Life::Ready {
                    worker,
                    placement,
                    held: 0,
                    in_flight: 0,
                    loaded_at: now,
                    last_used: now,
                    yield_after_work: None,
                };
                self.notice(notice);
                match then {
                    Some(PendingUnload { reason, waiters }) => {
                        self.unload(name, reason, false);
                        if let Some(Life::Unloading { waiters: all, .. }) =
                            self.models.get_mut(name).map(|e| &mut e.life)
                        {
                            all.extend(waiters);
                        }
                    }
                    None => self.pump(name),
                }
                if placement.is_some() {
                    // Measure what it really holds.
                    self.request_sample();
                }
            }
            // Stopped by `unload --force`: not the model's failure.
            Err(error) if error.code == ErrorCode::Cancelled => {
                self.record_stopped_load(name, error, then)
            }
            Err(error) => {
                if let Some(then) = then {
                    then.notify();
                }
                self.record_load_failure(name, error)
            }
        }
    }

    /// A load stopped by `unload --force`: its waiters are cancelled, and
    /// the next request loads again without a backoff.
    fn record_stopped_load(&mut self, name: &str, error: Error, then: Option<PendingUnload>) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        tracing::info!(model = name, "load stopped");
        entry.life = Life::Unloaded { retry_at: None };
        let reason = match then {
            Some(then) => {
                let reason = then.reason.clone();
                then.notify();
                reason
            }
            None => UnloadReason::Explicit,
        };
        entry.history.last_unload = Some(reason);
        fail_all(&mut entry.queue, &error);
        self.pump_all();
        self.request_sample();
    }

    /// A load failed: its waiters get the error, and no new attempt is made
    /// before the backoff has passed.
    pub(super) fn record_load_failure(&mut self, name: &str, error: Error) {
        self.fail_load(name, error);
        self.pump_all();
        self.request_sample();
    }

    /// Records a failed load and fails its waiters, without moving the
    /// others along (the caller does).
    fn fail_load(&mut self, name: &str, error: Error) {
        // Whatever the cause (file, contract, worker binary), a client
        // sees one code for it.
        let error = Error::new(ErrorCode::LoadFailed, error.message);
        let retry_base = self.config().policy.load_retry.0;
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        entry.history.failures += 1;
        let backoff =
            policy::retry_backoff(retry_base, entry.history.failures, policy::Failure::Load)
                .unwrap_or_default();
        tracing::error!(model = name, error = %error.message, retry_in_ms = ms(backoff), "load failed");
        entry.life = Life::Unloaded {
            retry_at: Some(Instant::now() + backoff),
        };
        entry.history.last_error = Some(error.message.clone());
        fail_all(&mut entry.queue, &error);
        self.notice(NoticeKind::LoadFailed {
            model: name.to_owned(),
            error: error.message.clone(),
        });
    }
}

/// A model's `options` table as the JSON object its worker is handed.
/// TOML dates become strings; everything else maps one to one.
fn options_json(options: &toml::Table) -> String {
    fn json(value: &toml::Value) -> serde_json::Value {
        match value {
            toml::Value::String(s) => serde_json::Value::String(s.clone()),
            toml::Value::Integer(i) => serde_json::Value::from(*i),
            // NaN and infinities have no JSON form: null, as JSON encoders write them.
            toml::Value::Float(f) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
            toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
            toml::Value::Array(items) => serde_json::Value::Array(items.iter().map(json).collect()),
            toml::Value::Table(table) => {
                serde_json::Value::Object(table.iter().map(|(k, v)| (k.clone(), json(v))).collect())
            }
        }
    }
    json(&toml::Value::Table(options.clone())).to_string()
}

/// The requests `model`'s worker may hold at once: more when its jobs are
/// short (see `policy::short_jobs`).
fn slots(model: &ModelConfig, entry: &super::entry::ModelEntry) -> u32 {
    let ahead = if policy::short_jobs(&entry.history.recent_run_ms) {
        worker::RUNS_AHEAD as u32
    } else {
        0
    };
    policy::worker_slots(model.concurrency, model.max_batch, ahead)
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_reach_the_worker_as_json() {
        let table: toml::Table = toml::from_str(
            "steps = 20\nscale = 1.5\nname = \"sd\"\nfast = true\nwhen = 2026-12-01\nnan = nan\n[lora]\nfiles = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&super::options_json(&table)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"steps": 20, "scale": 1.5, "name": "sd", "fast": true, "when": "2026-12-01", "nan": null, "lora": {"files": ["a", "b"]}})
        );
        assert_eq!(super::options_json(&toml::Table::new()), "{}");
    }
}
