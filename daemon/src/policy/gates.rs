//! The limits a request meets before it waits: a model's queue, and how
//! long a load may wait for GPU memory.

use std::time::{Duration, Instant};

/// Whether a model already has `queue_max` requests waiting or running
/// (`policy.queue_max`): a new one is refused with `QueueFull`.
pub fn queue_full(queued: usize, in_flight: u32, queue_max: u32) -> bool {
    queued.saturating_add(in_flight as usize) >= queue_max as usize
}

/// Whether a load that has waited for GPU memory since `since` has waited
/// `load_wait` (`gpu.load_wait`) at `now`: its requests fail with
/// `InsufficientVram`.
pub fn load_wait_over(since: Instant, now: Instant, load_wait: Duration) -> bool {
    now.saturating_duration_since(since) >= load_wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_counts_waiting_and_running_requests() {
        assert!(!queue_full(0, 0, 1));
        assert!(queue_full(1, 0, 1));
        assert!(queue_full(0, 1, 1));
        assert!(!queue_full(30, 33, 64));
        assert!(queue_full(31, 33, 64));
        assert!(queue_full(0, 0, 0), "queue_max 0 refuses everything");
        assert!(queue_full(usize::MAX, u32::MAX, u32::MAX));
    }

    #[test]
    fn a_load_waits_for_memory_until_load_wait_and_no_longer() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(30);
        assert!(!load_wait_over(t0, t0, wait));
        assert!(!load_wait_over(
            t0,
            t0 + Duration::from_millis(29_999),
            wait
        ));
        assert!(load_wait_over(t0, t0 + wait, wait));
        assert!(
            load_wait_over(t0, t0, Duration::ZERO),
            "load_wait 0: no wait"
        );
        assert!(
            !load_wait_over(t0 + wait, t0, wait),
            "a clock reading before the start is no wait"
        );
    }
}
