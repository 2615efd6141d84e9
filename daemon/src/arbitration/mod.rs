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
mod tests;
