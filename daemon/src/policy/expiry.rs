//! Keep-alive: which idle models have outlived it, when the next one will,
//! how long a model shown idle has left, and which keep-alive is in force.

use std::time::{Duration, Instant};

use gpuctl_protocol::KeepAlive;

use super::ModelView;

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

/// When an idle model expires; `None`: never.
pub fn idle_deadline(model: &ModelView) -> Option<Instant> {
    let last_used = model.last_used?;
    match model.keep_alive {
        // A client may ask for any keep-alive: one past the end of time is forever.
        KeepAlive::Millis(ms) => last_used.checked_add(Duration::from_millis(ms)),
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

/// What `gpuctl status` shows as "unloads in": the time left before an
/// idle, unpinned model expires at `now`; `None` when it is not counting
/// down (busy, pinned, forever).
pub fn unload_in(model: &ModelView, now: Instant) -> Option<Duration> {
    if !model.idle() || model.pin {
        return None;
    }
    idle_deadline(model).map(|deadline| deadline.saturating_duration_since(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{at, model, IDLE};
    use crate::policy::Phase;

    fn at_years(t0: Instant, years: u64) -> Instant {
        t0 + Duration::from_secs(years * 365 * 86_400)
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

    #[test]
    fn the_countdown_shown_is_the_deadline_expiry_uses() {
        let t0 = Instant::now();
        let mut short = model("short", IDLE, t0);
        short.keep_alive = KeepAlive::Millis(10_000);
        assert_eq!(unload_in(&short, at(t0, 4)), Some(Duration::from_secs(6)));
        assert_eq!(unload_in(&short, at(t0, 11)), Some(Duration::ZERO));
        assert_eq!(expired(&[short.clone()], at(t0, 10)), vec!["short"]);
        let mut pinned = short.clone();
        pinned.pin = true;
        assert_eq!(
            unload_in(&pinned, t0),
            None,
            "a pinned model never counts down"
        );
        let mut busy = short.clone();
        busy.phase = Phase::Ready { in_flight: 1 };
        assert_eq!(unload_in(&busy, t0), None);
        let mut waited_for = short.clone();
        waited_for.queued = 2;
        assert_eq!(unload_in(&waited_for, t0), None);
        let mut forever = short;
        forever.keep_alive = KeepAlive::Forever;
        assert_eq!(unload_in(&forever, t0), None);
    }
}
