//! The pure decisions of GPU memory: where a model fits and whom to evict
//! for it, whom to unload when another program needs memory, when a
//! reservation can be granted. Plain functions over one sample, so every
//! rule is unit-tested without processes or GPUs.

use std::time::Instant;

/// One device as arbitration sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub index: u32,
    /// Free bytes in the latest sample.
    pub free: u64,
    /// Bytes granted to reservations and not yet used by their holders.
    pub reserved: u64,
    /// Bytes our loads in progress are expected to take that the sample
    /// may not show yet.
    pub loading: u64,
    /// Bytes of our workers that are exiting: free soon.
    pub releasing: u64,
}

impl DeviceView {
    /// What is left after reservations, loads in progress and `keep` free.
    fn spare(&self, keep: u64) -> i128 {
        self.free as i128 - self.reserved as i128 - self.loading as i128 - keep as i128
    }
}

/// One of our resident models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub name: String,
    pub device: u32,
    /// Bytes it holds on the device.
    pub bytes: u64,
    /// Ready, nothing running, nobody waiting.
    pub idle: bool,
    pub pin: bool,
    pub last_used: Instant,
}

impl Resident {
    fn evictable(&self) -> bool {
        self.idle && !self.pin
    }
}

/// Where a load (or a reservation) can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// It fits on this device now.
    Fits { device: u32 },
    /// It fits once these idle models are gone (least recently used first,
    /// only as many as needed): unload them and decide again.
    Evict { device: u32, victims: Vec<String> },
    /// It fits once our workers that are exiting are gone.
    AwaitRelease { device: u32 },
    /// It does not fit even with every idle model gone: other programs,
    /// busy models or reservations hold the memory. `short` is what is
    /// missing on the most promising device.
    Wait { device: u32, short: u64 },
    /// The device asked for does not exist.
    NoSuchDevice { device: u32 },
}

/// Where `need` bytes (plus `keep` left free) can go: `preferred` if given,
/// else the device with the most spare memory where it fits. Evicting is
/// the last resort, and takes the fewest bytes that do.
pub fn place(
    devices: &[DeviceView],
    residents: &[Resident],
    need: u64,
    keep: u64,
    preferred: Option<u32>,
) -> Placement {
    let candidates: Vec<&DeviceView> = devices
        .iter()
        .filter(|d| preferred.is_none_or(|p| d.index == p))
        .collect();
    let Some(first) = candidates.first() else {
        return Placement::NoSuchDevice {
            device: preferred.unwrap_or(0),
        };
    };
    let need = need as i128;
    let most_spare = |fits: &dyn Fn(&DeviceView) -> Option<i128>| {
        candidates
            .iter()
            .filter_map(|d| fits(d).map(|spare| (spare, d.index)))
            .max_by_key(|(spare, index)| (*spare, std::cmp::Reverse(*index)))
            .map(|(_, index)| index)
    };
    if let Some(device) = most_spare(&|d| Some(d.spare(keep)).filter(|s| *s >= need)) {
        return Placement::Fits { device };
    }
    if let Some(device) =
        most_spare(&|d| Some(d.spare(keep) + d.releasing as i128).filter(|s| *s >= need))
    {
        return Placement::AwaitRelease { device };
    }
    let mut best: Option<(u64, u32, Vec<String>)> = None;
    for device in &candidates {
        let mut available = device.spare(keep) + device.releasing as i128;
        let mut idle: Vec<&Resident> = residents
            .iter()
            .filter(|r| r.device == device.index && r.evictable())
            .collect();
        idle.sort_by_key(|r| r.last_used);
        let mut victims = Vec::new();
        let mut freed = 0u64;
        for resident in idle {
            if available >= need {
                break;
            }
            available += resident.bytes as i128;
            freed += resident.bytes;
            victims.push(resident.name.clone());
        }
        if available >= need && best.as_ref().is_none_or(|(f, _, _)| freed < *f) {
            best = Some((freed, device.index, victims));
        }
    }
    if let Some((_, device, victims)) = best {
        return Placement::Evict { device, victims };
    }
    let (short, device) = candidates
        .iter()
        .map(|d| {
            let idle: u64 = residents
                .iter()
                .filter(|r| r.device == d.index && r.evictable())
                .map(|r| r.bytes)
                .sum();
            let available = d.spare(keep) + d.releasing as i128 + idle as i128;
            ((need - available).max(0) as u64, d.index)
        })
        .min()
        .unwrap_or((need as u64, first.index));
    Placement::Wait { device, short }
}

/// A load waiting for GPU memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingLoad {
    pub name: String,
    pub need: u64,
    /// The device its model is configured for, if any.
    pub preferred: Option<u32>,
}

/// Where each of `waiting` (oldest first) goes, decided in one pass over
/// one snapshot: each as [`place`] would decide it on the devices as the
/// earlier decisions leave them. A load that fits counts as loading on its
/// device from then on; models evicted for one leave the residents and
/// count as releasing, so a later load neither evicts them again nor
/// overlooks the memory they will free.
pub fn place_waiting(
    devices: &[DeviceView],
    residents: &[Resident],
    waiting: &[WaitingLoad],
    keep: u64,
) -> Vec<Placement> {
    let mut devices = devices.to_vec();
    let mut residents = residents.to_vec();
    waiting
        .iter()
        .map(|load| {
            let placement = place(&devices, &residents, load.need, keep, load.preferred);
            match &placement {
                Placement::Fits { device } => {
                    if let Some(view) = devices.iter_mut().find(|d| d.index == *device) {
                        view.loading = view.loading.saturating_add(load.need);
                    }
                }
                Placement::Evict { device, victims } => {
                    let freed: u64 = residents
                        .iter()
                        .filter(|r| victims.contains(&r.name))
                        .map(|r| r.bytes)
                        .sum();
                    residents.retain(|r| !victims.contains(&r.name));
                    if let Some(view) = devices.iter_mut().find(|d| d.index == *device) {
                        view.releasing = view.releasing.saturating_add(freed);
                    }
                }
                _ => {}
            }
            placement
        })
        .collect()
}

/// What to unload on a device where free memory fell below `min_free`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Yield {
    /// Idle models to unload now, least recently used first.
    pub now: Vec<String>,
    /// Busy models to unload once their in-flight work ends.
    pub after_work: Vec<String>,
}

/// Frees memory on `device` until `min_free` is back: idle unpinned models
/// first, least recently used first, only as many as needed; then, with
/// `yield_busy`, busy ones once their work ends. Memory already on its way
/// back (exiting workers) counts as free.
pub fn relieve(
    device: &DeviceView,
    residents: &[Resident],
    min_free: u64,
    yield_busy: bool,
) -> Yield {
    let mut missing = min_free as i128 - device.free as i128 - device.releasing as i128;
    let mut relief = Yield::default();
    if missing <= 0 {
        return relief;
    }
    let mut here: Vec<&Resident> = residents
        .iter()
        .filter(|r| r.device == device.index && !r.pin)
        .collect();
    here.sort_by_key(|r| r.last_used);
    for resident in here.iter().filter(|r| r.idle) {
        if missing <= 0 {
            return relief;
        }
        missing -= resident.bytes as i128;
        relief.now.push(resident.name.clone());
    }
    if yield_busy {
        for resident in here.iter().filter(|r| !r.idle) {
            if missing <= 0 {
                break;
            }
            missing -= resident.bytes as i128;
            relief.after_work.push(resident.name.clone());
        }
    }
    relief
}

#[cfg(test)]
mod tests {
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
}
