//! Moving models with waiters along: which ready models take work, which
//! failing ones refuse it, which unloaded ones load and whom they evict —
//! decided in one pass over one snapshot, each decision seeing what the
//! earlier ones in the pass did.

use std::time::Instant;

use gpuctl_protocol::Error;

use super::{admit, group_barrier, Admission, ModelView, Phase, UnloadReason};

/// A request waiting for a model, as the pump sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub since: Instant,
    /// A job takes one of the model's slots (`worker_slots`); a `Load`
    /// request is answered without one.
    pub job: bool,
}

/// Why a model that is not resident may not load now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Inside its retry window (`retry_later`'s error).
    RetryLater(Error),
    /// Its file cannot be read: a load failure, found before anything is
    /// evicted for it.
    Unreadable(Error),
}

/// A model the pump looks at, with what its view does not say.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    /// Its waiting requests, in queue order.
    pub waiting: Vec<Waiting>,
    /// The requests its worker may hold at once (`worker_slots`).
    pub slots: u32,
    /// Ready but leaving once its work is done (pressure): it starts nothing.
    pub yielding: bool,
    /// Set when it is not resident and may not load now.
    pub refused: Option<Refusal>,
    /// Ready models whose workers can become this one in place (other
    /// modes of its base: the same file and settings, other LoRAs).
    pub switch_from: Vec<String>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Hand waiting requests to its ready worker, up to its slots,
    /// none that arrived after `barrier` (a request waiting for another
    /// member of its group came first).
    Dispatch {
        model: String,
        barrier: Option<Instant>,
    },
    /// Fail its waiting requests.
    Refuse { model: String, why: Refusal },
    /// Unload these, then load it (or wait for GPU memory for it).
    Load {
        model: String,
        evict: Vec<(String, UnloadReason)>,
    },
    /// Unload these, and make `from`'s idle worker this model's in place
    /// instead of unloading it (`reason`) and loading this one afresh.
    Switch {
        model: String,
        from: String,
        reason: UnloadReason,
        evict: Vec<(String, UnloadReason)>,
    },
    /// It may not load yet (group, `max_loaded`), and why.
    Wait { model: String, because: String },
}

/// Plans the pump over `models` (every configured model) for `candidates`,
/// in order. Each step's effect is applied to the pass's copy of the
/// snapshot before the next candidate is decided: requests dispatched
/// occupy their slots and leave the queue, refused ones leave it, a model
/// admitted counts as loading and its victims as leaving.
pub fn plan_pump(models: &[ModelView], candidates: &[Candidate], max_loaded: usize) -> Vec<Step> {
    let mut views = models.to_vec();
    let mut steps = Vec::new();
    for candidate in candidates {
        let Some(at) = views.iter().position(|v| v.name == candidate.name) else {
            continue;
        };
        match views[at].phase {
            Phase::Ready { in_flight } if !candidate.yielding => {
                let barrier = group_barrier(&views, &candidate.name);
                let mut in_flight = in_flight;
                let mut taken = 0;
                for waiting in &candidate.waiting {
                    if in_flight >= candidate.slots || barrier.is_some_and(|b| waiting.since > b) {
                        break;
                    }
                    in_flight += u32::from(waiting.job);
                    taken += 1;
                }
                if taken == 0 {
                    continue;
                }
                let view = &mut views[at];
                view.phase = Phase::Ready { in_flight };
                view.queued = view.queued.saturating_sub(taken);
                view.oldest_waiter = candidate.waiting.get(taken).map(|w| w.since);
                steps.push(Step::Dispatch {
                    model: candidate.name.clone(),
                    barrier,
                });
            }
            Phase::Unloaded if views[at].queued > 0 => {
                if let Some(why) = &candidate.refused {
                    views[at].queued = 0;
                    views[at].oldest_waiter = None;
                    steps.push(Step::Refuse {
                        model: candidate.name.clone(),
                        why: why.clone(),
                    });
                    continue;
                }
                match admit(&views, &candidate.name, max_loaded) {
                    Admission::Load { mut evict } => {
                        let sibling = evict
                            .iter()
                            .position(|(victim, _)| candidate.switch_from.contains(victim))
                            .map(|i| evict.remove(i));
                        for view in views.iter_mut() {
                            if evict.iter().any(|(victim, _)| *victim == view.name) {
                                view.phase = Phase::Unloading;
                            }
                            if sibling.as_ref().is_some_and(|(from, _)| *from == view.name) {
                                view.phase = Phase::Unloaded;
                            }
                        }
                        views[at].phase = Phase::Loading;
                        steps.push(match sibling {
                            Some((from, reason)) => Step::Switch {
                                model: candidate.name.clone(),
                                from,
                                reason,
                                evict,
                            },
                            None => Step::Load {
                                model: candidate.name.clone(),
                                evict,
                            },
                        });
                    }
                    Admission::Wait { because } => steps.push(Step::Wait {
                        model: candidate.name.clone(),
                        because,
                    }),
                }
            }
            _ => {}
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{ErrorCode, KeepAlive};

    use super::*;
    use crate::policy::testing::{at, IDLE};

    fn view(name: &str, phase: Phase, waiting: &[Instant], t0: Instant) -> ModelView {
        ModelView {
            name: name.into(),
            phase,
            queued: waiting.len(),
            oldest_waiter: waiting.first().copied(),
            last_used: matches!(phase, Phase::Ready { .. }).then_some(t0),
            keep_alive: KeepAlive::Millis(300_000),
            pin: false,
            group: None,
        }
    }

    fn candidate(name: &str, waiting: &[Instant], slots: u32) -> Candidate {
        Candidate {
            name: name.into(),
            waiting: waiting
                .iter()
                .map(|since| Waiting {
                    since: *since,
                    job: true,
                })
                .collect(),
            slots,
            yielding: false,
            refused: None,
            switch_from: Vec::new(),
        }
    }

    #[test]
    fn a_ready_model_takes_work_up_to_its_slots_and_a_yielding_one_none() {
        let t0 = Instant::now();
        let queue = [at(t0, 1), at(t0, 2), at(t0, 3)];
        let models = [view("a", Phase::Ready { in_flight: 1 }, &queue, t0)];
        assert_eq!(
            plan_pump(&models, &[candidate("a", &queue, 2)], 3),
            [Step::Dispatch {
                model: "a".into(),
                barrier: None
            }]
        );
        assert!(
            plan_pump(&models, &[candidate("a", &queue, 1)], 3).is_empty(),
            "no free slot"
        );
        let mut yielding = candidate("a", &queue, 4);
        yielding.yielding = true;
        assert!(plan_pump(&models, &[yielding], 3).is_empty());
    }

    /// What the registry's fast path (`serve_ready`) counts on: a ready
    /// model that alone has waiters is only dispatched to, without a
    /// barrier, whatever the other models' states and its group.
    #[test]
    fn a_ready_model_that_alone_has_waiters_is_dispatched_to_without_a_barrier() {
        let t0 = Instant::now();
        let group = Some("g".to_owned());
        let queue = [at(t0, 1), at(t0, 2)];
        let a = ModelView {
            group: group.clone(),
            ..view("a", Phase::Ready { in_flight: 3 }, &queue, t0)
        };
        for other in [Phase::Unloaded, Phase::Loading, IDLE, Phase::Unloading] {
            let b = ModelView {
                group: group.clone(),
                ..view("b", other, &[], t0)
            };
            let c = view("c", other, &[], t0);
            assert_eq!(
                plan_pump(&[a.clone(), b, c], &[candidate("a", &queue, 5)], 1),
                [Step::Dispatch {
                    model: "a".into(),
                    barrier: None
                }],
                "{other:?}"
            );
        }
    }

    #[test]
    fn a_refused_model_fails_its_waiters_and_no_longer_holds_its_group() {
        let t0 = Instant::now();
        let group = Some("g".to_owned());
        // b's requests came first, so a (resident, idle) may not take its
        // own later ones, and c may not load: a holds the group for b.
        let a = ModelView {
            group: group.clone(),
            ..view("a", IDLE, &[at(t0, 3)], t0)
        };
        let b = ModelView {
            group: group.clone(),
            ..view("b", Phase::Unloaded, &[at(t0, 1)], t0)
        };
        let mut broken = candidate("b", &[at(t0, 1)], 1);
        broken.refused = Some(Refusal::Unreadable(Error::new(ErrorCode::NotFound, "gone")));
        let steps = plan_pump(
            &[a.clone(), b.clone()],
            &[broken, candidate("a", &[at(t0, 3)], 1)],
            3,
        );
        assert_eq!(
            steps,
            [
                Step::Refuse {
                    model: "b".into(),
                    why: Refusal::Unreadable(Error::new(ErrorCode::NotFound, "gone"))
                },
                Step::Dispatch {
                    model: "a".into(),
                    barrier: None
                }
            ],
            "once b's requests are refused, a serves its own"
        );
        // Without the refusal, b switches the group and a waits.
        let steps = plan_pump(
            &[a, b],
            &[
                candidate("b", &[at(t0, 1)], 1),
                candidate("a", &[at(t0, 3)], 1),
            ],
            3,
        );
        assert_eq!(
            steps,
            [Step::Load {
                model: "b".into(),
                evict: vec![("a".into(), UnloadReason::GroupSwitch)]
            }]
        );
    }

    #[test]
    fn each_admission_sees_the_ones_before_it_in_the_pass() {
        let t0 = Instant::now();
        let models = [
            view("old", IDLE, &[], t0),
            view("x", Phase::Unloaded, &[at(t0, 1)], t0),
            view("y", Phase::Unloaded, &[at(t0, 2)], t0),
        ];
        let steps = plan_pump(
            &models,
            &[
                candidate("x", &[at(t0, 1)], 1),
                candidate("y", &[at(t0, 2)], 1),
            ],
            2,
        );
        // x takes the second place; y, with x counted as loading, finds the
        // cap full and evicts old.
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(
            steps[0],
            Step::Load {
                model: "x".into(),
                evict: vec![]
            }
        );
        match &steps[1] {
            Step::Load { model, evict } => {
                assert_eq!(model, "y");
                assert_eq!(evict, &[("old".to_owned(), UnloadReason::Lru)]);
            }
            other => panic!("{other:?}"),
        }
        let steps = plan_pump(
            &models,
            &[
                candidate("x", &[at(t0, 1)], 1),
                candidate("y", &[at(t0, 2)], 1),
            ],
            1,
        );
        assert_eq!(
            steps[0],
            Step::Load {
                model: "x".into(),
                evict: vec![("old".into(), UnloadReason::Lru)]
            }
        );
        assert!(
            matches!(&steps[1], Step::Wait { model, .. } if model == "y"),
            "{steps:?}"
        );
    }

    #[test]
    fn a_load_request_is_answered_without_a_slot() {
        let t0 = Instant::now();
        let queue = [at(t0, 1), at(t0, 2)];
        let models = [
            view("a", IDLE, &queue, t0),
            view("b", Phase::Unloaded, &[at(t0, 3)], t0),
        ];
        let mut a = candidate("a", &queue, 1);
        a.waiting[0].job = false;
        // a answers the Load and runs the job: busy, it cannot be evicted,
        // so b (max_loaded 1) waits.
        let steps = plan_pump(&models, &[a, candidate("b", &[at(t0, 3)], 1)], 1);
        assert!(matches!(&steps[0], Step::Dispatch { model, .. } if model == "a"));
        assert!(
            matches!(&steps[1], Step::Wait { model, .. } if model == "b"),
            "{steps:?}"
        );
    }

    #[test]
    fn a_group_switch_to_another_mode_of_the_same_base_happens_in_place() {
        let t0 = Instant::now();
        let group = Some("g".to_owned());
        let member = |name: &str, phase, waiting: &[Instant]| ModelView {
            group: group.clone(),
            ..view(name, phase, waiting, t0)
        };
        let models = [
            member("portrait", IDLE, &[]),
            member("anime", Phase::Unloaded, &[at(t0, 1)]),
        ];
        let mut anime = candidate("anime", &[at(t0, 1)], 1);
        anime.switch_from = vec!["portrait".into()];
        assert_eq!(
            plan_pump(&models, &[anime.clone()], 3),
            [Step::Switch {
                model: "anime".into(),
                from: "portrait".into(),
                reason: UnloadReason::GroupSwitch,
                evict: vec![]
            }]
        );
        // Another base is unloaded and loaded as before.
        anime.switch_from.clear();
        assert_eq!(
            plan_pump(&models, &[anime.clone()], 3),
            [Step::Load {
                model: "anime".into(),
                evict: vec![("portrait".into(), UnloadReason::GroupSwitch)]
            }]
        );
        // A sibling that is busy is not taken: the switch waits for it.
        let busy = [
            member("portrait", Phase::Ready { in_flight: 1 }, &[]),
            member("anime", Phase::Unloaded, &[at(t0, 1)]),
        ];
        anime.switch_from = vec!["portrait".into()];
        assert!(matches!(
            &plan_pump(&busy, &[anime.clone()], 3)[..],
            [Step::Wait { model, .. }] if model == "anime"
        ));
        // Under the cap: a sibling evicted as least recently used is switched,
        // another victim is unloaded.
        let capped = [
            view("other", IDLE, &[], t0),
            view("portrait", IDLE, &[], t0),
            view("anime", Phase::Unloaded, &[at(t0, 1)], t0),
        ];
        assert_eq!(
            plan_pump(&capped, &[anime], 1),
            [Step::Switch {
                model: "anime".into(),
                from: "portrait".into(),
                reason: UnloadReason::Lru,
                evict: vec![("other".into(), UnloadReason::Lru)]
            }]
        );
    }
}
