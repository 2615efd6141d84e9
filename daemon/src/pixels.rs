//! Workers send `image` and `generate` outputs as RGB8 rows of pixels
//! (`[N,H,W,3]`, as image files hold them); clients of protocol 1.0 and
//! 1.1 were promised planar `[N,3,H,W]`, and get that.

use gpuctl_protocol::{DType, WireTensor};

/// `[N,H,W,3]` RGB8 → `[N,3,H,W]`; anything else unchanged.
pub fn to_planar(tensor: WireTensor) -> WireTensor {
    let [n, h, w, 3] = tensor.shape[..] else {
        return tensor;
    };
    if tensor.dtype != DType::U8 || tensor.is_placeholder() || tensor.check().is_err() {
        return tensor;
    }
    let plane = (h * w) as usize;
    let mut data = vec![0u8; tensor.data.len()];
    for (image, pixels) in data
        .chunks_exact_mut(3 * plane)
        .zip(tensor.data.chunks_exact(3 * plane))
    {
        for (i, pixel) in pixels.chunks_exact(3).enumerate() {
            for (c, value) in pixel.iter().enumerate() {
                image[c * plane + i] = *value;
            }
        }
    }
    WireTensor {
        dtype: DType::U8,
        shape: vec![n, 3, h, w],
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_pixels_become_planes() {
        // Two images of 1x2 pixels.
        let rows = WireTensor::new(
            DType::U8,
            vec![2, 1, 2, 3],
            vec![1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 16],
        )
        .unwrap();
        let planar = to_planar(rows);
        assert_eq!(planar.shape, vec![2, 3, 1, 2]);
        assert_eq!(planar.data, vec![1, 4, 2, 5, 3, 6, 11, 14, 12, 15, 13, 16]);
        assert!(planar.check().is_ok());
        let other = WireTensor::new(DType::F32, vec![1, 1, 1, 3], vec![0; 12]).unwrap();
        assert_eq!(to_planar(other.clone()), other, "not RGB8: unchanged");
    }
}
