//! Raw tensors on the wire: dtype, shape, bytes. Images travel as tensors
//! too; decoding image files is the client's job, never the daemon's.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Element types a tensor may have on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    /// 8-bit unsigned (pixels).
    U8,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// A dense, row-major tensor: little-endian elements, `shape` outermost first.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// `product(shape) * dtype.size()` bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl WireTensor {
    /// A tensor whose byte length is checked against its shape.
    pub fn new(dtype: DType, shape: Vec<u64>, data: Vec<u8>) -> Result<WireTensor, String> {
        let tensor = WireTensor { dtype, shape, data };
        tensor.check()?;
        Ok(tensor)
    }

    /// Elements in the tensor, if the count fits in `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(usize::try_from(*d).ok()?))
    }

    /// Bytes its shape and dtype call for, if the count fits in `usize`.
    pub fn byte_len(&self) -> Option<usize> {
        self.numel()?.checked_mul(self.dtype.size())
    }

    /// Checks that the bytes match the shape: a peer may send anything.
    pub fn check(&self) -> Result<(), String> {
        let expected = self
            .byte_len()
            .ok_or_else(|| format!("tensor shape {:?} is too large", self.shape))?;
        if expected != self.data.len() {
            return Err(format!(
                "tensor of shape {:?} and dtype {:?} needs {expected} bytes, got {}",
                self.shape,
                self.dtype,
                self.data.len()
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for WireTensor {
    // The bytes can be hundreds of megabytes: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WireTensor({:?}, {:?}, {} bytes)",
            self.dtype,
            self.shape,
            self.data.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_must_match_the_shape() {
        assert!(WireTensor::new(DType::F32, vec![2, 3], vec![0; 24]).is_ok());
        let error = WireTensor::new(DType::F32, vec![2, 3], vec![0; 23]).unwrap_err();
        assert!(error.contains("needs 24 bytes, got 23"), "{error}");
        let error = WireTensor::new(DType::U8, vec![u64::MAX, 2], vec![]).unwrap_err();
        assert!(error.contains("too large"), "{error}");
        let tensor = WireTensor::new(DType::U8, vec![1], vec![7]).unwrap();
        assert_eq!(format!("{tensor:?}"), "WireTensor(U8, [1], 1 bytes)");
    }
}
