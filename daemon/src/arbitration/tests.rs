use std::time::Duration;

use super::*;

const MIB: u64 = 1 << 20;

fn device(index: u32, free_mib: u64) -> DeviceView {
    DeviceView {
        index,
        free: free_mib * MIB,
        reserved: 0,
        loading: 0,
        releasing: 0,
    }
}

fn resident(name: &str, device: u32, mib: u64, idle: bool, age: u64) -> Resident {
    let t0 = Instant::now();
    Resident {
        name: name.into(),
        device,
        bytes: mib * MIB,
        idle,
        pin: false,
        last_used: t0 + Duration::from_secs(age),
    }
}

#[test]
fn fits_on_the_device_with_most_spare() {
    let devices = [device(0, 1000), device(1, 3000)];
    assert_eq!(
        place(&devices, &[], 500 * MIB, 100 * MIB, None),
        Placement::Fits { device: 1 }
    );
    assert_eq!(
        place(&devices, &[], 500 * MIB, 100 * MIB, Some(0)),
        Placement::Fits { device: 0 },
        "a configured device is kept"
    );
    assert_eq!(
        place(&devices, &[], 500 * MIB, 100 * MIB, Some(4)),
        Placement::NoSuchDevice { device: 4 }
    );
}

#[test]
fn keep_free_reservations_and_loads_in_progress_count_against_a_fit() {
    let mut d = device(0, 1000);
    assert_eq!(
        place(&[d.clone()], &[], 900 * MIB, 100 * MIB, None),
        Placement::Fits { device: 0 }
    );
    assert!(matches!(
        place(&[d.clone()], &[], 901 * MIB, 100 * MIB, None),
        Placement::Wait { short, .. } if short == MIB
    ));
    d.reserved = 300 * MIB;
    assert!(matches!(
        place(&[d.clone()], &[], 700 * MIB, 100 * MIB, None),
        Placement::Wait { .. }
    ));
    d.reserved = 0;
    d.loading = 300 * MIB;
    assert!(matches!(
        place(&[d.clone()], &[], 700 * MIB, 100 * MIB, None),
        Placement::Wait { .. }
    ));
    d.releasing = 200 * MIB;
    assert_eq!(
        place(&[d], &[], 700 * MIB, 100 * MIB, None),
        Placement::AwaitRelease { device: 0 },
        "memory on its way back is waited for, not evicted for"
    );
}

#[test]
fn evicts_idle_unpinned_least_recently_used_first_only_as_many_as_needed() {
    let mut pinned = resident("pinned", 0, 800, true, 0);
    pinned.pin = true;
    let residents = [
        pinned,
        resident("busy", 0, 800, false, 1),
        resident("old", 0, 200, true, 2),
        resident("older", 0, 200, true, 1),
        resident("new", 0, 200, true, 9),
    ];
    assert_eq!(
        place(&[device(0, 500)], &residents, 700 * MIB, 100 * MIB, None),
        Placement::Evict {
            device: 0,
            victims: vec!["older".into(), "old".into()]
        }
    );
    assert!(
        matches!(
            place(&[device(0, 500)], &residents, 1300 * MIB, 100 * MIB, None),
            Placement::Wait { short, .. } if short == 300 * MIB
        ),
        "busy and pinned models are never evicted for a load"
    );
}

#[test]
fn eviction_prefers_the_device_where_it_frees_least() {
    let residents = [
        resident("big", 0, 900, true, 0),
        resident("small", 1, 300, true, 0),
    ];
    assert_eq!(
        place(
            &[device(0, 400), device(1, 400)],
            &residents,
            500 * MIB,
            0,
            None
        ),
        Placement::Evict {
            device: 1,
            victims: vec!["small".into()]
        }
    );
}

#[test]
fn pressure_unloads_idle_first_then_busy_after_their_work() {
    let residents = [
        resident("busy", 0, 300, false, 0),
        resident("idle-old", 0, 100, true, 1),
        resident("idle-new", 0, 100, true, 2),
        resident("elsewhere", 1, 900, true, 0),
    ];
    assert_eq!(
        relieve(&device(0, 600), &residents, 512 * MIB, true),
        Yield::default(),
        "no pressure, nothing to do"
    );
    assert_eq!(
        relieve(&device(0, 450), &residents, 512 * MIB, true),
        Yield {
            now: vec!["idle-old".into()],
            after_work: vec![]
        }
    );
    assert_eq!(
        relieve(&device(0, 100), &residents, 512 * MIB, true),
        Yield {
            now: vec!["idle-old".into(), "idle-new".into()],
            after_work: vec!["busy".into()]
        }
    );
    assert_eq!(
        relieve(&device(0, 100), &residents, 512 * MIB, false).after_work,
        Vec::<String>::new(),
        "yield_busy = false leaves busy models alone"
    );
    let mut leaving = device(0, 100);
    leaving.releasing = 500 * MIB;
    assert_eq!(
        relieve(&leaving, &residents, 512 * MIB, true),
        Yield::default(),
        "memory already on its way back is not asked for twice"
    );
}

fn waiting(name: &str, mib: u64) -> WaitingLoad {
    WaitingLoad {
        name: name.into(),
        need: mib * MIB,
        preferred: None,
    }
}

#[test]
fn waiting_loads_are_placed_in_one_pass_as_the_earlier_ones_leave_the_devices() {
    let devices = [device(0, 1000)];
    // Both fit alone; together only the first does, and the second is
    // not placed on memory the first is about to take.
    let placements = place_waiting(&devices, &[], &[waiting("a", 600), waiting("b", 600)], 0);
    assert_eq!(
        placements,
        [
            Placement::Fits { device: 0 },
            Placement::Wait {
                device: 0,
                short: 200 * MIB
            }
        ]
    );
    // The first evicts the idle model; the second does not evict it
    // again, and waits for the memory it frees.
    let residents = [resident("idle", 0, 800, true, 1)];
    let placements = place_waiting(
        &[device(0, 500)],
        &residents,
        &[waiting("a", 700), waiting("b", 600)],
        0,
    );
    assert_eq!(
        placements,
        [
            Placement::Evict {
                device: 0,
                victims: vec!["idle".into()]
            },
            Placement::AwaitRelease { device: 0 }
        ]
    );
    // One load alone: what place() says.
    for need in [100, 500, 900, 1400] {
        assert_eq!(
            place_waiting(&[device(0, 500)], &residents, &[waiting("x", need)], 0),
            [place(&[device(0, 500)], &residents, need * MIB, 0, None)]
        );
    }
    assert!(place_waiting(&devices, &residents, &[], 0).is_empty());
}
