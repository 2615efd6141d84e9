//! Admission under the LRU cap and groups: may a model that is not
//! resident load now, and whom must it evict first.

use std::time::Instant;

use super::{ModelView, Phase, UnloadReason};

impl ModelView {
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
            .filter(|m| m.name != wanted && m.phase.resident() && m.group.as_ref() == Some(group))
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
        .filter(|m| m.phase.resident() && m.name != wanted)
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::policy::expired;
    use crate::policy::testing::{at, model, IDLE};

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
}
