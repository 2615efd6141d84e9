//! The pure decisions of model life cycles: which models to evict to admit
//! a load, which idle models have outlived their keep-alive, how long a
//! client's keep-alive may be. Plain functions over a snapshot, so every
//! rule is unit-tested without processes, clocks or GPUs.

use std::time::{Duration, Instant};

use gpuctl_protocol::KeepAlive;

/// Where a model is in its life cycle, as far as policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not resident.
    Unloaded,
    /// A worker is starting and loading it.
    Loading,
    /// Resident; `in_flight` jobs running.
    Ready { in_flight: u32 },
    /// Its worker has been told to exit.
    Unloading,
}

/// One model as policy sees it.
#[derive(Debug, Clone)]
pub struct ModelView {
    pub name: String,
    pub phase: Phase,
    /// Requests waiting for this model.
    pub queued: usize,
    /// When the longest-waiting of them arrived.
    pub oldest_waiter: Option<Instant>,
    /// When its last job ended (or it finished loading).
    pub last_used: Instant,
    pub keep_alive: KeepAlive,
    pub pin: bool,
    pub group: Option<String>,
}

impl ModelView {
    fn resident(&self) -> bool {
        !matches!(self.phase, Phase::Unloaded)
    }

    /// Ready, nothing running, nobody waiting: the only models policy may
    /// take away without hurting a client.
    fn idle(&self) -> bool {
        matches!(self.phase, Phase::Ready { in_flight: 0 }) && self.queued == 0
    }

    /// Whether this group member must stay for now: it is loading, leaving,
    /// running work, or holds requests that arrived before `arrival` (the
    /// requests that came later wait their turn: FIFO across the group).
    fn holds_group(&self, arrival: Option<Instant>) -> bool {
        let earlier_waiters = match (self.oldest_waiter, arrival) {
            (Some(mine), Some(theirs)) => mine <= theirs,
            (Some(_), None) => true,
            (None, _) => false,
        };
        !matches!(self.phase, Phase::Ready { in_flight: 0 }) || earlier_waiters
    }
}

/// The arrival of the oldest request waiting for another member of
/// `model`'s group that is not resident: requests to `model` that arrived
/// later must not start, or a busy member could starve its group.
pub fn group_barrier(models: &[ModelView], model: &str) -> Option<Instant> {
    let group = models.iter().find(|m| m.name == model)?.group.as_ref()?;
    models
        .iter()
        .filter(|m| {
            m.name != model && m.group.as_ref() == Some(group) && m.phase == Phase::Unloaded
        })
        .filter_map(|m| m.oldest_waiter)
        .min()
}

pub use gpuctl_protocol::UnloadReason;

/// What to do about a request for a model that is not resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start loading now, after unloading these.
    Load { evict: Vec<(String, UnloadReason)> },
    /// Not now: wait for a resident model to become idle or to go.
    Wait { because: String },
}

/// Decides whether `wanted` may be loaded now.
///
/// Group first: at most one model of a group is resident, and a resident
/// member is switched out only once its in-flight work and the requests
/// that arrived before `wanted`'s are done; later ones wait for the switch
/// back. Then the LRU cap:
/// idle, unpinned models go least recently used first, only as many as
/// needed. Busy, loading or pinned models are never evicted here.
pub fn admit(models: &[ModelView], wanted: &str, max_loaded: usize) -> Admission {
    let Some(target) = models.iter().find(|m| m.name == wanted) else {
        return Admission::Wait {
            because: format!("unknown model {wanted}"),
        };
    };
    let mut evict: Vec<(String, UnloadReason)> = Vec::new();
    if let Some(group) = &target.group {
        let first = models.iter().filter(|m| m.name != wanted && m.group.as_ref() == Some(group)).find(|m| {
            m.phase == Phase::Unloaded
                && matches!((m.oldest_waiter, target.oldest_waiter), (Some(theirs), Some(mine)) if theirs < mine)
        });
        if let Some(first) = first {
            return Admission::Wait {
                because: format!("group {group}: requests for {} came first", first.name),
            };
        }
        for member in models
            .iter()
            .filter(|m| m.name != wanted && m.resident() && m.group.as_ref() == Some(group))
        {
            if member.holds_group(target.oldest_waiter) {
                return Admission::Wait {
                    because: format!("group {group}: {} is still in use", member.name),
                };
            }
            evict.push((member.name.clone(), UnloadReason::GroupSwitch));
        }
    }
    let resident_after = models
        .iter()
        .filter(|m| m.resident() && m.name != wanted)
        .count()
        - evict.len()
        + 1;
    let over = resident_after.saturating_sub(max_loaded.max(1));
    if over > 0 {
        let mut candidates: Vec<&ModelView> = models
            .iter()
            .filter(|m| {
                m.name != wanted && m.idle() && !m.pin && !evict.iter().any(|(n, _)| *n == m.name)
            })
            .collect();
        candidates.sort_by_key(|m| m.last_used);
        if candidates.len() < over {
            return Admission::Wait {
                because: format!("max_loaded = {max_loaded} models are resident and none of them is idle and unpinned"),
            };
        }
        evict.extend(
            candidates
                .iter()
                .take(over)
                .map(|m| (m.name.clone(), UnloadReason::Lru)),
        );
    }
    Admission::Load { evict }
}

/// Idle, unpinned models whose keep-alive has run out at `now`.
pub fn expired(models: &[ModelView], now: Instant) -> Vec<String> {
    models
        .iter()
        .filter(|m| m.idle() && !m.pin)
        .filter(|m| idle_deadline(m).is_some_and(|deadline| deadline <= now))
        .map(|m| m.name.clone())
        .collect()
}

/// When the next idle model will expire, to sleep until then.
pub fn next_expiry(models: &[ModelView]) -> Option<Instant> {
    models
        .iter()
        .filter(|m| m.idle() && !m.pin)
        .filter_map(idle_deadline)
        .min()
}

fn idle_deadline(model: &ModelView) -> Option<Instant> {
    match model.keep_alive {
        // A client may ask for any keep-alive: one past the end of time is forever.
        KeepAlive::Millis(ms) => model.last_used.checked_add(Duration::from_millis(ms)),
        KeepAlive::Forever => None,
    }
}

/// The keep-alive that applies after a request: the request's own if it set
/// one, else the model's; never longer than the operator's `max_keep_alive`,
/// so a client cannot pin VRAM against the configured policy.
pub fn keep_alive(model: KeepAlive, requested: Option<KeepAlive>, max: KeepAlive) -> KeepAlive {
    let wanted = requested.unwrap_or(model);
    match (wanted, max) {
        (_, KeepAlive::Forever) => wanted,
        (KeepAlive::Forever, limit) => limit,
        (KeepAlive::Millis(a), KeepAlive::Millis(b)) => KeepAlive::Millis(a.min(b)),
    }
}

/// What a reload means for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChange {
    /// New in the configuration: it appears, unloaded.
    Added,
    /// Gone from the configuration: unloaded once its work is done.
    Removed,
    /// Its settings or resolved path changed: replaced once idle.
    Changed,
    /// Same settings, but the file on disk is not the one it loaded.
    FileReplaced,
}

/// Compares two configurations model by model. `file_replaced` says whether
/// a loaded model's file changed on disk since it was loaded. Models not
/// listed are unchanged: their workers keep running, and a new keep-alive
/// applies to them at once.
pub fn reload_changes(
    old: &crate::config::Config,
    new: &crate::config::Config,
    file_replaced: &dyn Fn(&str) -> bool,
) -> Vec<(String, ModelChange)> {
    let mut changes = Vec::new();
    for (name, before) in &old.models {
        match new.models.get(name) {
            None => changes.push((name.clone(), ModelChange::Removed)),
            Some(after) => {
                // keep_alive alone never needs a new worker.
                let comparable = |m: &crate::config::ModelConfig| crate::config::ModelConfig {
                    keep_alive: None,
                    vram: None,
                    ..m.clone()
                };
                if comparable(before) != comparable(after)
                    || old.model_path(before) != new.model_path(after)
                {
                    changes.push((name.clone(), ModelChange::Changed));
                } else if file_replaced(name) {
                    changes.push((name.clone(), ModelChange::FileReplaced));
                }
            }
        }
    }
    for name in new
        .models
        .keys()
        .filter(|name| !old.models.contains_key(*name))
    {
        changes.push((name.clone(), ModelChange::Added));
    }
    changes
}

/// The longest a model backs off after failures.
pub const MAX_RETRY: Duration = Duration::from_secs(600);

/// What went wrong with a model, for its backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Its load failed (file, contract, worker binary).
    Load,
    /// Its worker died while loaded.
    Crash,
}

/// How long requests for a model fail at once after `failures` consecutive
/// failures, the last of kind `last`: `base` doubled for each further
/// failure, at most `MAX_RETRY`. One formula for both kinds; a crash is
/// forgiven once (a single crash reloads on the next request), so it counts
/// one failure less. None: no backoff.
pub fn retry_backoff(base: Duration, failures: u32, last: Failure) -> Option<Duration> {
    let strikes = match last {
        Failure::Load => failures,
        Failure::Crash => failures.saturating_sub(1),
    };
    if strikes == 0 {
        return None;
    }
    Some(
        base.saturating_mul(1 << (strikes - 1).min(10))
            .min(MAX_RETRY),
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_failed_load_backs_off_from_the_first_failure_doubling_up_to_the_cap() {
        let base = Duration::from_secs(10);
        let backoff = |n| retry_backoff(base, n, Failure::Load);
        assert_eq!(backoff(0), None);
        assert_eq!(backoff(1), Some(Duration::from_secs(10)));
        assert_eq!(backoff(2), Some(Duration::from_secs(20)));
        assert_eq!(backoff(3), Some(Duration::from_secs(40)));
        assert_eq!(backoff(6), Some(Duration::from_secs(320)));
        assert_eq!(backoff(7), Some(MAX_RETRY));
        assert_eq!(backoff(u32::MAX), Some(MAX_RETRY));
    }

    #[test]
    fn a_crash_is_forgiven_once_then_backs_off_by_the_same_formula() {
        let base = Duration::from_secs(10);
        assert_eq!(retry_backoff(base, 1, Failure::Crash), None);
        for failures in 2..20 {
            assert_eq!(
                retry_backoff(base, failures, Failure::Crash),
                retry_backoff(base, failures - 1, Failure::Load)
            );
        }
        assert_eq!(retry_backoff(base, 0, Failure::Crash), None);
    }

    #[test]
    fn a_huge_base_saturates_at_the_cap() {
        assert_eq!(
            retry_backoff(Duration::MAX, 11, Failure::Load),
            Some(MAX_RETRY)
        );
    }

    use super::*;

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn at_years(t0: Instant, years: u64) -> Instant {
        t0 + Duration::from_secs(years * 365 * 86_400)
    }

    fn model(name: &str, phase: Phase, last_used: Instant) -> ModelView {
        ModelView {
            name: name.into(),
            phase,
            queued: 0,
            oldest_waiter: None,
            last_used,
            keep_alive: KeepAlive::Millis(300_000),
            pin: false,
            group: None,
        }
    }

    const IDLE: Phase = Phase::Ready { in_flight: 0 };

    #[test]
    fn loads_at_once_under_the_cap() {
        let t0 = Instant::now();
        let models = [model("a", IDLE, t0), model("b", Phase::Unloaded, t0)];
        assert_eq!(admit(&models, "b", 3), Admission::Load { evict: vec![] });
    }

    #[test]
    fn the_cap_evicts_least_recently_used_idle_unpinned_only_as_many_as_needed() {
        let t0 = Instant::now();
        let mut pinned = model("pinned", IDLE, at(t0, 0));
        pinned.pin = true;
        let models = [
            pinned,
            model("old", IDLE, at(t0, 1)),
            model("busy", Phase::Ready { in_flight: 1 }, at(t0, 0)),
            model("new", IDLE, at(t0, 5)),
            model("want", Phase::Unloaded, t0),
        ];
        assert_eq!(
            admit(&models, "want", 4),
            Admission::Load {
                evict: vec![("old".into(), UnloadReason::Lru)]
            }
        );
        assert_eq!(
            admit(&models, "want", 3),
            Admission::Load {
                evict: vec![
                    ("old".into(), UnloadReason::Lru),
                    ("new".into(), UnloadReason::Lru)
                ]
            }
        );
        match admit(&models, "want", 1) {
            Admission::Wait { because } => assert!(because.contains("max_loaded = 1"), "{because}"),
            other => panic!("expected Wait, got {other:?}"),
        }
    }

    #[test]
    fn a_keep_alive_past_the_end_of_time_is_forever() {
        let t0 = Instant::now();
        let mut forever = model("a", IDLE, t0);
        forever.keep_alive = KeepAlive::Millis(u64::MAX);
        let models = [forever];
        // No panic; never, or later than anyone will wait.
        assert!(next_expiry(&models).is_none_or(|at| at > at_years(t0, 1000)));
        assert!(expired(&models, at(t0, 1 << 40)).is_empty());
    }

    #[test]
    fn a_model_with_waiters_is_not_idle() {
        let t0 = Instant::now();
        let mut waited_for = model("a", IDLE, t0);
        waited_for.queued = 1;
        let models = [waited_for, model("b", Phase::Unloaded, t0)];
        assert!(matches!(admit(&models, "b", 1), Admission::Wait { .. }));
        assert!(expired(&models, at(t0, 10_000)).is_empty());
    }

    #[test]
    fn a_group_switches_only_when_its_member_is_idle() {
        let t0 = Instant::now();
        let mut busy = model("portrait", Phase::Ready { in_flight: 1 }, t0);
        busy.group = Some("diffusion".into());
        let mut wanted = model("landscape", Phase::Unloaded, t0);
        wanted.group = Some("diffusion".into());
        let models = [busy.clone(), wanted.clone()];
        match admit(&models, "landscape", 3) {
            Admission::Wait { because } => {
                assert!(because.contains("portrait is still in use"), "{because}")
            }
            other => panic!("expected Wait, got {other:?}"),
        }
        busy.phase = IDLE;
        let models = [busy, wanted, model("other", IDLE, t0)];
        assert_eq!(
            admit(&models, "landscape", 2),
            Admission::Load {
                evict: vec![("portrait".into(), UnloadReason::GroupSwitch)]
            },
            "the group switch also makes room under the cap"
        );
    }

    #[test]
    fn a_group_is_fifo_across_its_members() {
        let t0 = Instant::now();
        let group = Some("g".to_owned());
        // a is resident and idle but holds a request that arrived before b's.
        let mut a = ModelView {
            group: group.clone(),
            ..model("a", IDLE, t0)
        };
        a.queued = 1;
        a.oldest_waiter = Some(at(t0, 1));
        let mut b = ModelView {
            group: group.clone(),
            ..model("b", Phase::Unloaded, t0)
        };
        b.queued = 1;
        b.oldest_waiter = Some(at(t0, 2));
        assert!(matches!(
            admit(&[a.clone(), b.clone()], "b", 3),
            Admission::Wait { .. }
        ));
        // a's waiting request arrived after b's: the switch goes ahead, and
        // a may not start it meanwhile.
        a.oldest_waiter = Some(at(t0, 3));
        assert_eq!(
            admit(&[a.clone(), b.clone()], "b", 3),
            Admission::Load {
                evict: vec![("a".into(), UnloadReason::GroupSwitch)]
            }
        );
        assert_eq!(group_barrier(&[a.clone(), b.clone()], "a"), Some(at(t0, 2)));
        // A member that is leaving still holds the group until it is gone.
        a.phase = Phase::Unloading;
        assert!(matches!(
            admit(&[a.clone(), b.clone()], "b", 3),
            Admission::Wait { .. }
        ));
        // Once it is gone, b loads before a comes back, whatever order the
        // registry asks in.
        a.phase = Phase::Unloaded;
        match admit(&[a.clone(), b.clone()], "a", 3) {
            Admission::Wait { because } => {
                assert!(because.contains("requests for b came first"), "{because}")
            }
            other => panic!("expected Wait, got {other:?}"),
        }
        assert_eq!(admit(&[a, b], "b", 3), Admission::Load { evict: vec![] });
    }

    #[test]
    fn idle_models_expire_after_their_keep_alive_unless_pinned_or_forever() {
        let t0 = Instant::now();
        let mut short = model("short", IDLE, t0);
        short.keep_alive = KeepAlive::Millis(1_000);
        let mut zero = model("zero", IDLE, t0);
        zero.keep_alive = KeepAlive::Millis(0);
        let mut forever = model("forever", IDLE, t0);
        forever.keep_alive = KeepAlive::Forever;
        let mut pinned = model("pinned", IDLE, t0);
        pinned.keep_alive = KeepAlive::Millis(0);
        pinned.pin = true;
        let busy = ModelView {
            keep_alive: KeepAlive::Millis(0),
            ..model("busy", Phase::Ready { in_flight: 2 }, t0)
        };
        let models = [
            short,
            zero,
            forever,
            pinned,
            busy,
            model("default", IDLE, t0),
        ];
        assert_eq!(expired(&models, t0), vec!["zero"]);
        assert_eq!(expired(&models, at(t0, 1)), vec!["short", "zero"]);
        assert_eq!(
            expired(&models, at(t0, 300)),
            vec!["short", "zero", "default"]
        );
        assert_eq!(next_expiry(&models), Some(t0));
    }

    #[test]
    fn a_reload_is_compared_model_by_model() {
        use crate::config::Config;
        let parse = |text: &str| Config::parse(text, "t.toml").unwrap();
        let old = parse(
            "[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n\
             [models.gone]\npath = \"g.pt\"\nkind = \"tensor\"\n\
             [models.tuned]\npath = \"t.pt\"\nkind = \"image\"\ntile = 256\n\
             [models.kept]\npath = \"k.pt\"\nkind = \"tensor\"\nkeep_alive = \"1m\"\n",
        );
        let new = parse(
            "[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n\
             [models.tuned]\npath = \"t.pt\"\nkind = \"image\"\ntile = 512\n\
             [models.kept]\npath = \"k.pt\"\nkind = \"tensor\"\nkeep_alive = \"1h\"\n\
             [models.fresh]\npath = \"f.pt\"\nkind = \"tensor\"\n",
        );
        let mut changes = reload_changes(&old, &new, &|_| false);
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            changes,
            vec![
                ("fresh".into(), ModelChange::Added),
                ("gone".into(), ModelChange::Removed),
                ("tuned".into(), ModelChange::Changed),
            ],
            "a keep_alive change alone needs no new worker"
        );
        let replaced = reload_changes(&old, &old, &|name| name == "same");
        assert_eq!(replaced, vec![("same".into(), ModelChange::FileReplaced)]);
        let moved = parse(
            "model_root = \"/elsewhere\"\n[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n",
        );
        assert!(reload_changes(
            &parse("[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n"),
            &moved,
            &|_| false
        )
        .contains(&("same".into(), ModelChange::Changed)));
    }

    #[test]
    fn a_client_keep_alive_is_clamped_by_max_keep_alive() {
        let five_min = KeepAlive::Millis(300_000);
        let hour = KeepAlive::Millis(3_600_000);
        assert_eq!(keep_alive(five_min, None, KeepAlive::Forever), five_min);
        assert_eq!(
            keep_alive(five_min, Some(KeepAlive::Forever), KeepAlive::Forever),
            KeepAlive::Forever
        );
        assert_eq!(keep_alive(five_min, Some(KeepAlive::Forever), hour), hour);
        assert_eq!(
            keep_alive(five_min, Some(KeepAlive::Millis(7_200_000)), hour),
            hour
        );
        assert_eq!(
            keep_alive(five_min, Some(KeepAlive::Millis(0)), hour),
            KeepAlive::Millis(0)
        );
        assert_eq!(keep_alive(KeepAlive::Forever, None, hour), hour);
    }
}
