//! What a model's worker gets and is expected to take: CPU threads, and the
//! GPU memory admission counts on before anything is measured.

use crate::measurements::Measured;

/// A file-size estimate is this much more than the file (CUDA context,
/// buffers, allocator slack), in per cent.
const FILE_ESTIMATE_PERCENT: u64 = 120;

/// Intra-op CPU threads for a model's worker: its `threads` if set (not 0),
/// else the `cores` shared among the models that can be resident at once
/// (`max_loaded`, or fewer when fewer are configured), so that busy workers
/// together never oversubscribe the machine.
pub fn worker_threads(threads: u32, cores: u32, max_loaded: u32, models: usize) -> u32 {
    if threads > 0 {
        return threads;
    }
    let models = u32::try_from(models).unwrap_or(u32::MAX);
    let resident = max_loaded.min(models).max(1);
    (cores / resident).max(1)
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
    fn worker_threads_share_the_cores_unless_set() {
        assert_eq!(worker_threads(5, 16, 2, 3), 5, "set");
        assert_eq!(worker_threads(0, 16, 2, 3), 8, "16 cores, 2 resident");
        assert_eq!(
            worker_threads(0, 16, 3, 1),
            16,
            "one model may use every core"
        );
        assert_eq!(worker_threads(0, 2, 3, 5), 1, "never 0");
        assert_eq!(worker_threads(0, 8, 0, 0), 8, "no models: as if one");
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
