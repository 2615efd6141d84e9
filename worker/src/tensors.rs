//! Wire tensors to libtorch tensors and back.

use gpuctl_protocol::{DType, WireTensor};
use tch::{Device, Kind, Tensor};

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::U8 => Kind::Uint8,
        DType::F16 => Kind::Half,
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::I32 => Kind::Int,
        DType::I64 => Kind::Int64,
        DType::BF16 => Kind::BFloat16,
    }
}

fn dtype_of(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Uint8 => DType::U8,
        Kind::Half => DType::F16,
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Int => DType::I32,
        Kind::Int64 => DType::I64,
        Kind::BFloat16 => DType::BF16,
        _ => return None,
    })
}

/// Builds a tensor on `device`. The byte count is checked first: libtorch
/// would read past a short buffer.
pub fn from_wire(wire: &WireTensor, device: Device) -> Result<Tensor, String> {
    wire.check()?;
    let shape: Vec<i64> = wire
        .shape
        .iter()
        .map(|d| i64::try_from(*d).map_err(|_| format!("dimension {d} is too large")))
        .collect::<Result<_, _>>()?;
    let tensor = Tensor::f_from_data_size(&wire.data, &shape, kind_of(wire.dtype))
        .map_err(|e| e.to_string())?;
    tensor.f_to_device(device).map_err(|e| e.to_string())
}

/// Copies a tensor (any device, any layout) into a wire tensor.
pub fn to_wire(tensor: &Tensor) -> Result<WireTensor, String> {
    let kind = tensor.f_kind().map_err(|e| e.to_string())?;
    let dtype = dtype_of(kind).ok_or_else(|| format!("outputs of type {kind:?} cannot be sent"))?;
    let host = tensor
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(|e| e.to_string())?;
    let shape: Vec<u64> = host.size().iter().map(|d| *d as u64).collect();
    let numel = host.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    host.f_copy_data_u8(&mut data, numel)
        .map_err(|e| e.to_string())?;
    WireTensor::new(dtype, shape, data)
}

/// What a failed forward raised. A TorchScript failure is a traceback
/// (source lines, which may quote any message) that ends in the exception,
/// "RuntimeError: The size of tensor a (2) must match …"; other libtorch
/// errors say what went wrong first, and a C++ backtrace follows.
pub fn raised(error: &tch::TchError) -> String {
    let text = error.to_string();
    if !text.contains("The following operation failed in the TorchScript interpreter") {
        return first_line(error);
    }
    let last = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    last.strip_prefix("builtins.").unwrap_or(last).to_owned()
}

/// The first line of a libtorch error: the rest is a C++ backtrace.
pub fn first_line(error: &tch::TchError) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}
