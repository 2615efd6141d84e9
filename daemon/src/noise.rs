//! Seeded Gaussian noise for `generate` models: the same seed gives the same
//! noise on every machine (no libtorch RNG involved), so a seed reproduces
//! an image.

use gpuctl_protocol::{DType, WireTensor};

/// SplitMix64: tiny, fast, and good enough to seed image noise.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1], never 0 (Box-Muller takes its logarithm).
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Bytes of float32 noise of shape `[1, channels, height, width]`.
pub fn bytes(channels: u32, height: u32, width: u32) -> u64 {
    4u64.saturating_mul(u64::from(channels))
        .saturating_mul(u64::from(height))
        .saturating_mul(u64::from(width))
}

/// Standard normal noise of shape `[1, channels, height, width]`, float32.
/// Its size comes from a client: the allocation may fail, and that is an
/// error, never an abort. CPU work: call it off the async runtime.
pub fn gaussian(seed: u64, channels: u32, height: u32, width: u32) -> Result<WireTensor, String> {
    let total = usize::try_from(bytes(channels, height, width))
        .map_err(|_| "the noise does not fit in memory".to_owned())?;
    let mut rng = SplitMix64(seed);
    let mut data = Vec::new();
    data.try_reserve_exact(total).map_err(|_| {
        format!(
            "cannot allocate {} of noise",
            gpuctl_protocol::units::format_bytes(total as u64)
        )
    })?;
    while data.len() < total {
        let (u, v) = (rng.unit(), rng.unit());
        let radius = (-2.0 * u.ln()).sqrt();
        let angle = std::f64::consts::TAU * v;
        for value in [radius * angle.cos(), radius * angle.sin()] {
            if data.len() < total {
                data.extend_from_slice(&(value as f32).to_le_bytes());
            }
        }
    }
    Ok(WireTensor {
        dtype: DType::F32,
        shape: vec![1, u64::from(channels), u64::from(height), u64::from(width)],
        data,
    })
}

/// A fresh seed when the request named none.
pub fn random_seed() -> u64 {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SplitMix64(time ^ u64::from(std::process::id()).rotate_left(32)).next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &WireTensor) -> Vec<f32> {
        t.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn a_seed_reproduces_its_noise_and_the_noise_is_standard_normal() {
        let a = gaussian(42, 4, 16, 16).unwrap();
        assert_eq!(a, gaussian(42, 4, 16, 16).unwrap());
        assert_ne!(a, gaussian(43, 4, 16, 16).unwrap());
        assert_eq!(a.shape, vec![1, 4, 16, 16]);
        assert!(a.check().is_ok());
        let v = values(&gaussian(7, 4, 64, 64).unwrap());
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        let error = gaussian(1, u32::MAX, u32::MAX, u32::MAX).unwrap_err();
        assert!(
            error.contains("does not fit") || error.contains("cannot allocate"),
            "{error}"
        );
    }
}
