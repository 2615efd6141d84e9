//! What a model's worker gets and is expected to take: CPU threads, and the
//! GPU memory admission counts on before anything is measured.

use crate::measurements::Measured;

/// A file-size estimate is this much more than the file (CUDA context,
/// buffers, allocator slack), in per cent.
const FILE_ESTIMATE_PERCENT: u64 = 120;

/// Intra-op CPU threads for a model's worker: its `threads` if set (not 0),
/// else every core, as PyTorch itself does. A model busy alone then uses
/// the machine, and two busy at once lose nothing by sharing it: on 2
/// cores, waifu2x 448² took 2.8–3.2 s alone with 2 threads against
/// 5.8–6.5 s with 1 (the cores shared between two models), and two
/// requests on two models 5.6–5.9 s against 6.4–6.5 s.
pub fn worker_threads(threads: u32, cores: u32) -> u32 {
    if threads > 0 {
        threads
    } else {
        cores.max(1)
    }
}

/// Tiles per forward when a model's `batch` is unset: on CUDA a batch of
/// 4 keeps the device busy; on the CPU one tile at a time is faster (four
/// tiles' activations fall out of cache; measured with bench-tiles: 17.4
/// s against 19.9 s for waifu2x 1024² on 2 cores).
pub fn tile_batch(device: &str) -> u32 {
    if device.starts_with("cuda") {
        4
    } else {
        1
    }
}

/// Jobs that took at most this long keep their worker fed: the next ones
/// are sent ahead, so it never waits for a round trip through gpuctld.
/// Longer ones wait in the queue, where their clients see their place.
pub const SHORT_JOB_MS: u64 = 10;

/// The recent jobs whose times decide whether a model's jobs are short.
pub const RECENT_JOBS: usize = 4;

/// Whether a model's jobs are short enough to be sent ahead, going by its
/// recent ones (`recent_ms`, at most [`RECENT_JOBS`]): at least half of
/// them short, so that one job slowed down (the machine busy, the first
/// run's profiling) does not change how the rest are served. Unknown
/// until one has run.
pub fn short_jobs(recent_ms: &[u64]) -> bool {
    let short = recent_ms.iter().filter(|&&ms| ms <= SHORT_JOB_MS).count();
    !recent_ms.is_empty() && 2 * short >= recent_ms.len()
}

/// The wait that is worth telling a client about: shorter ones pass before
/// a client could show them.
pub const QUEUE_NEWS_MS: u64 = 500;

/// The first place in the queue of a model whose jobs are short at which
/// a waiting client hears its place: where the jobs ahead of it, each as
/// long as the model's typical recent one (the upper median of
/// `recent_ms`: one job slowed down by a busy machine does not decide),
/// take at least [`QUEUE_NEWS_MS`]. A queue of sub-millisecond jobs moves
/// faster than any client could show it, and telling each of its clients
/// would be one more frame written per request. `None`: nobody (jobs of
/// under a millisecond). Worked out once per telling, not per waiter.
pub fn first_place_told(recent_ms: &[u64]) -> Option<u32> {
    let mut recent = recent_ms.to_vec();
    recent.sort_unstable();
    match recent.get(recent.len() / 2) {
        None => Some(1),
        Some(0) => None,
        Some(&typical) => Some(u32::try_from(QUEUE_NEWS_MS.div_ceil(typical)).unwrap_or(u32::MAX)),
    }
}

/// How many of a model's requests its worker's supervisor holds at once:
/// `concurrency` runs, `ahead` runs sent ahead of them when its jobs are
/// short, and with batching one batch forming, each run of up to
/// `max_batch` requests. The rest wait in the model's queue, where their
/// clients are told their place.
pub fn worker_slots(concurrency: u32, max_batch: u32, ahead: u32) -> u32 {
    let forming = u32::from(max_batch > 1);
    concurrency
        .max(1)
        .saturating_add(ahead)
        .saturating_add(forming)
        .saturating_mul(max_batch.max(1))
}

/// Where a need figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedSource {
    /// The model's `vram` setting.
    Configured,
    /// The most its worker held when it last ran this file.
    Measured,
    /// Its file's size, plus slack.
    FileSize,
    /// Nothing to go by: no `vram`, no measurement, no file (a `command`
    /// model without a path, or a folder): it is admitted as needing
    /// nothing until its first load on a GPU measures it.
    Unknown,
}

impl NeedSource {
    /// As `gpuctl status` shows it.
    pub fn describe(self) -> &'static str {
        match self {
            NeedSource::Configured => "configured",
            NeedSource::Measured => "measured",
            NeedSource::FileSize => "file size × 1.2",
            NeedSource::Unknown => "unknown until measured",
        }
    }
}

/// The GPU memory a model is expected to take once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub bytes: u64,
    pub source: NeedSource,
}

/// A model's need: its configured `vram`, else what was measured with the
/// same file (same path and size), else its file size × 1.2. `file_bytes`
/// is the size last seen on disk (0 when unknown); a measurement larger than
/// the largest device (a damaged or hand-edited state file) would make the
/// model unloadable, so it is no measurement.
pub fn need(
    configured: Option<u64>,
    path: &str,
    file_bytes: u64,
    measured: Option<&Measured>,
    largest_device: Option<u64>,
) -> Need {
    if let Some(bytes) = configured {
        return Need {
            bytes,
            source: NeedSource::Configured,
        };
    }
    let measured = measured
        .filter(|m| m.path == path && m.file_bytes == file_bytes)
        .filter(|m| largest_device.is_none_or(|total| m.vram_bytes <= total));
    match measured {
        Some(m) => Need {
            bytes: m.vram_bytes,
            source: NeedSource::Measured,
        },
        None if file_bytes == 0 => Need {
            bytes: 0,
            source: NeedSource::Unknown,
        },
        None => Need {
            bytes: file_bytes.saturating_mul(FILE_ESTIMATE_PERCENT) / 100,
            source: NeedSource::FileSize,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_holds_its_runs_those_sent_ahead_and_a_batch_forming() {
        assert_eq!(worker_slots(1, 1, 0), 1, "long jobs: one at a time");
        assert_eq!(worker_slots(1, 1, 16), 17, "short ones: 16 sent ahead");
        assert_eq!(worker_slots(2, 1, 16), 18);
        assert_eq!(
            worker_slots(1, 8, 0),
            16,
            "batches of 8: one running, one forming"
        );
        assert_eq!(worker_slots(1, 8, 1), 24);
        assert_eq!(worker_slots(u32::MAX, 1024, 16), u32::MAX, "no overflow");
        assert_eq!(worker_slots(0, 0, 0), 1, "unset reads as 1");
    }

    #[test]
    fn tiles_are_batched_on_cuda_and_not_on_the_cpu() {
        assert_eq!(tile_batch("cuda:0"), 4);
        assert_eq!(tile_batch("cuda"), 4);
        assert_eq!(tile_batch("cpu"), 1);
    }

    #[test]
    fn jobs_are_short_when_most_recent_ones_were() {
        let long = SHORT_JOB_MS + 1;
        assert!(!short_jobs(&[]), "unknown until one has run");
        assert!(short_jobs(&[0]));
        assert!(short_jobs(&[SHORT_JOB_MS]));
        assert!(!short_jobs(&[long]));
        assert!(short_jobs(&[0, 0, long, 0]), "one slow job changes nothing");
        assert!(short_jobs(&[0, long]), "half");
        assert!(!short_jobs(&[0, long, long, long]));
    }

    fn wait_worth_telling(position: u32, recent_ms: &[u64]) -> bool {
        first_place_told(recent_ms).is_some_and(|first| position >= first)
    }

    #[test]
    fn a_place_in_a_queue_of_short_jobs_is_told_when_the_wait_is_noticeable() {
        assert!(!wait_worth_telling(499, &[1, 1, 0, 1]), "0.499 s");
        assert!(wait_worth_telling(500, &[1, 1, 0, 1]), "0.5 s");
        assert!(!wait_worth_telling(99, &[5, 8, 3, 2]), "0.495 s");
        assert!(wait_worth_telling(100, &[5, 8, 3, 2]), "the upper median");
        assert!(
            !wait_worth_telling(400, &[0, 0, 40, 0]),
            "one slow job does not decide"
        );
        assert!(!wait_worth_telling(u32::MAX, &[0]), "nothing to wait for");
        assert!(wait_worth_telling(1, &[]), "unknown: told");
        assert!(wait_worth_telling(u32::MAX, &[u64::MAX]), "no overflow");
    }

    #[test]
    fn a_worker_takes_every_core_unless_set() {
        assert_eq!(worker_threads(5, 16), 5, "set");
        assert_eq!(worker_threads(0, 16), 16);
        assert_eq!(worker_threads(0, 0), 1, "never 0");
    }

    #[test]
    fn the_need_is_configured_else_measured_with_the_same_file_else_the_file_size() {
        let measured = Measured {
            path: "/m/a.pt".into(),
            file_bytes: 1_000,
            vram_bytes: 5_000,
        };
        let gib = Some(1 << 30);
        let need_of = |configured, path, bytes, largest| {
            need(configured, path, bytes, Some(&measured), largest)
        };
        assert_eq!(
            need_of(Some(7), "/m/a.pt", 1_000, gib),
            Need {
                bytes: 7,
                source: NeedSource::Configured
            }
        );
        assert_eq!(
            need_of(None, "/m/a.pt", 1_000, gib),
            Need {
                bytes: 5_000,
                source: NeedSource::Measured
            }
        );
        assert_eq!(
            need_of(None, "/m/a.pt", 1_000, None),
            need_of(None, "/m/a.pt", 1_000, gib),
            "no sample yet"
        );
        // A command model with no file: nothing to go by, then its measurement.
        assert_eq!(
            need(None, "python -m sd", 0, None, gib),
            Need {
                bytes: 0,
                source: NeedSource::Unknown
            }
        );
        let sd = Measured {
            path: "python -m sd".into(),
            file_bytes: 0,
            vram_bytes: 9 << 30,
        };
        assert_eq!(
            need(None, "python -m sd", 0, Some(&sd), Some(80 << 30)).source,
            NeedSource::Measured
        );
        let estimate = Need {
            bytes: 1_200,
            source: NeedSource::FileSize,
        };
        assert_eq!(
            need_of(None, "/m/b.pt", 1_000, gib),
            estimate,
            "another file"
        );
        assert_eq!(
            need_of(None, "/m/a.pt", 2_000, gib),
            Need {
                bytes: 2_400,
                source: NeedSource::FileSize
            },
            "the file changed since"
        );
        assert_eq!(
            need_of(None, "/m/a.pt", 1_000, Some(4_999)),
            estimate,
            "larger than any device"
        );
        assert_eq!(
            need(None, "/m/a.pt", 0, None, None).bytes,
            0,
            "no file seen"
        );
        assert_eq!(need(None, "x", u64::MAX, None, None).bytes, u64::MAX / 100);
    }
}
