//! Backing off a model that keeps failing: one formula for failed loads and
//! crashes, and the error a request gets inside the retry window.

use std::time::{Duration, Instant};

use gpuctl_protocol::units::format_duration_ms;
use gpuctl_protocol::{Error, ErrorCode};

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

/// How long the retry window ending at `retry_at` still lasts at `now`;
/// `None` when there is none or it has passed.
pub fn retry_in(retry_at: Option<Instant>, now: Instant) -> Option<Duration> {
    retry_at?
        .checked_duration_since(now)
        .filter(|left| !left.is_zero())
}

/// A request for a model inside its retry window (`retry_at` later than
/// `now`) fails at once with `RetryLater`, naming the last failure and when
/// the next attempt is allowed (rounded up to the second); `None` once the
/// window has passed.
pub fn retry_later(
    model: &str,
    last_error: Option<&str>,
    retry_at: Option<Instant>,
    now: Instant,
) -> Option<Error> {
    let left = retry_in(retry_at, now)?;
    let wait = format_duration_ms((left.as_millis() as u64 / 1000 + 1) * 1000);
    let reason = last_error.map_or_else(|| format!("model {model} failed"), str::to_owned);
    Some(Error::new(
        ErrorCode::RetryLater,
        format!("{reason}; the next attempt is allowed in {wait}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn inside_the_retry_window_a_request_gets_retry_later_naming_the_failure() {
        let now = Instant::now();
        let error = retry_later(
            "x",
            Some("model x: cannot read x.pt"),
            Some(now + Duration::from_millis(19_400)),
            now,
        )
        .unwrap();
        assert_eq!(error.code, ErrorCode::RetryLater);
        assert_eq!(
            error.message,
            "model x: cannot read x.pt; the next attempt is allowed in 20s"
        );
        let unnamed = retry_later("x", None, Some(now + Duration::from_secs(1)), now).unwrap();
        assert!(
            unnamed.message.starts_with("model x failed;"),
            "{}",
            unnamed.message
        );
        assert_eq!(
            retry_later("x", None, Some(now), now),
            None,
            "the window has passed"
        );
        assert_eq!(retry_later("x", None, None, now), None, "no backoff");
        assert_eq!(
            retry_later("x", None, Some(now), now + Duration::from_secs(3)),
            None
        );
    }
}
