//! Who caused memory pressure, to name them in the notice and the unload
//! reason.

use std::collections::HashMap;

use gpuctl_protocol::Holder;

/// Among the other programs on a device under pressure (`foreign`, biggest
/// first), the one that grew most since the previous sample (`before`: bytes
/// by pid then); when none grew, the biggest.
pub fn pressure_holder(foreign: &[Holder], before: &HashMap<u32, u64>) -> Option<Holder> {
    foreign
        .iter()
        .filter_map(|h| {
            let grew = h
                .bytes
                .saturating_sub(before.get(&h.pid).copied().unwrap_or(0));
            (grew > 0).then_some((grew, h))
        })
        .max_by_key(|(grew, _)| *grew)
        .map(|(_, h)| h.clone())
        .or_else(|| foreign.first().cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(pid: u32, bytes: u64) -> Holder {
        Holder {
            pid,
            name: format!("p{pid}"),
            bytes,
        }
    }

    #[test]
    fn the_program_that_grew_most_is_named_else_the_biggest() {
        let foreign = [holder(1, 10_000), holder(2, 6_000), holder(3, 500)];
        let before = HashMap::from([(1, 9_000), (2, 1_000)]);
        assert_eq!(pressure_holder(&foreign, &before).map(|h| h.pid), Some(2));
        let still = HashMap::from([(1, 10_000), (2, 6_000), (3, 500)]);
        assert_eq!(
            pressure_holder(&foreign, &still).map(|h| h.pid),
            Some(1),
            "nobody grew: the biggest"
        );
        let new_arrival = HashMap::from([(1, 10_000), (2, 6_000)]);
        assert_eq!(
            pressure_holder(&foreign, &new_arrival).map(|h| h.pid),
            Some(3)
        );
        assert_eq!(pressure_holder(&[], &before), None);
    }
}
