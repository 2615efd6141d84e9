//! Model outputs of `image` and `generate` kinds go to clients as RGB8:
//! what image files hold, and a quarter of the float32 bytes on the wire.

use gpuctl_protocol::{DType, WireTensor};

/// float32 in 0..1 (clamped) → u8 0..255, rounded; other dtypes unchanged.
pub fn to_rgb8(tensor: WireTensor) -> WireTensor {
    if tensor.dtype != DType::F32 {
        return tensor;
    }
    let data = tensor
        .data
        .chunks_exact(4)
        .map(|b| {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            // NaN clamps to 0: a broken pixel, not a broken reply.
            (v.clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect();
    WireTensor {
        dtype: DType::U8,
        shape: tensor.shape,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_become_clamped_rounded_bytes() {
        let values = [0.0f32, 1.0, 0.5, -3.0, 7.0, f32::NAN];
        let tensor = WireTensor::new(
            DType::F32,
            vec![6],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap();
        let pixels = to_rgb8(tensor);
        assert_eq!(pixels.dtype, DType::U8);
        assert_eq!(pixels.data, vec![0, 255, 128, 0, 255, 0]);
        assert!(pixels.check().is_ok());
    }
}
