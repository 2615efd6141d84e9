//! Tensors too large for one frame travel apart from the message that
//! holds them: `TensorBegin` (dtype and shape), `TensorChunk`s of at most
//! [`CHUNK_BYTES`], `TensorEnd`, then the message, in which each streamed
//! tensor is a *placeholder* — its dtype and shape with no data. The
//! receiver fills the placeholders in order with the tensors streamed just
//! before. Memory stays bounded: the sender never encodes more than one
//! chunk at a time, and the receiver grows one buffer of the announced size.

use crate::{DType, WireTensor};

/// The data of one `TensorChunk` frame, at most: 1 MiB.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Tensors larger than this stream; smaller ones travel inside their
/// message, which is cheaper for them.
pub const STREAM_ABOVE: usize = CHUNK_BYTES;

impl WireTensor {
    /// A tensor whose data travels in `TensorChunk` frames ahead of the
    /// message that holds it.
    pub fn placeholder(dtype: DType, shape: Vec<u64>) -> WireTensor {
        WireTensor {
            dtype,
            shape,
            data: Vec::new(),
        }
    }

    /// Whether this is a placeholder: it has elements but no data.
    pub fn is_placeholder(&self) -> bool {
        self.data.is_empty() && self.numel().is_none_or(|n| n > 0)
    }

    /// Whether this tensor should stream rather than ride in its message.
    pub fn should_stream(&self) -> bool {
        self.data.len() > STREAM_ABOVE
    }

    /// Takes the data out, leaving a placeholder of the same dtype and shape.
    pub fn take_data(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.data)
    }
}

/// Collects the tensors streamed ahead of one message.
#[derive(Debug, Default)]
pub struct TensorReceiver {
    finished: Vec<WireTensor>,
    current: Option<WireTensor>,
    expected: usize,
    bytes: usize,
}

impl TensorReceiver {
    /// Starts a tensor of `dtype` and `shape`, if it keeps everything this
    /// receiver holds within `limit` bytes. Reserves its whole size at once.
    pub fn begin(&mut self, dtype: DType, shape: Vec<u64>, limit: usize) -> Result<(), String> {
        if self.current.is_some() {
            return Err("TensorBegin before the previous tensor's TensorEnd".to_owned());
        }
        let mut tensor = WireTensor::placeholder(dtype, shape);
        let size = tensor
            .numel()
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| format!("tensor shape {:?} is too large", tensor.shape))?;
        if self.bytes.saturating_add(size) > limit {
            return Err(format!(
                "a streamed tensor of shape {:?} ({}) would exceed the limit of {}",
                tensor.shape,
                crate::units::format_bytes(size as u64),
                crate::units::format_bytes(limit as u64)
            ));
        }
        tensor
            .data
            .try_reserve_exact(size)
            .map_err(|_| format!("cannot allocate {size} bytes for a streamed tensor"))?;
        self.bytes += size;
        self.expected = size;
        self.current = Some(tensor);
        Ok(())
    }

    /// Appends one chunk to the tensor begun last.
    pub fn chunk(&mut self, data: &[u8]) -> Result<(), String> {
        let Some(tensor) = &mut self.current else {
            return Err("TensorChunk without TensorBegin".to_owned());
        };
        if tensor.data.len() + data.len() > self.expected {
            return Err(format!(
                "streamed tensor of shape {:?} got more than its {} bytes",
                tensor.shape, self.expected
            ));
        }
        tensor.data.extend_from_slice(data);
        Ok(())
    }

    /// Ends the tensor begun last; it must be complete.
    pub fn end(&mut self) -> Result<(), String> {
        let Some(tensor) = self.current.take() else {
            return Err("TensorEnd without TensorBegin".to_owned());
        };
        tensor.check()?;
        self.finished.push(tensor);
        Ok(())
    }

    /// Bytes announced so far (what the receiver holds or will hold).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Fills `slots`' placeholders, in order, with the tensors received;
    /// every placeholder needs one, of its dtype and shape, and every
    /// tensor received needs a placeholder.
    pub fn fill<'a>(
        self,
        slots: impl IntoIterator<Item = &'a mut WireTensor>,
    ) -> Result<(), String> {
        if self.current.is_some() {
            return Err("a streamed tensor was not ended before its message".to_owned());
        }
        let mut streamed = self.finished.into_iter();
        for slot in slots.into_iter().filter(|t| t.is_placeholder()) {
            let tensor = streamed.next().ok_or_else(|| {
                format!(
                    "the message holds a tensor of shape {:?} without data, and none was streamed for it",
                    slot.shape
                )
            })?;
            if tensor.dtype != slot.dtype || tensor.shape != slot.shape {
                return Err(format!(
                    "streamed tensor {:?} {:?} does not match its place in the message, {:?} {:?}",
                    tensor.dtype, tensor.shape, slot.dtype, slot.shape
                ));
            }
            *slot = tensor;
        }
        match streamed.len() {
            0 => Ok(()),
            n => Err(format!(
                "{n} streamed tensor(s) have no placeholder in the message"
            )),
        }
    }
}

/// The tensors of `slots` that should stream, in order, with their data
/// taken out (each slot left a placeholder).
pub fn take_streamed<'a>(slots: impl IntoIterator<Item = &'a mut WireTensor>) -> Vec<WireTensor> {
    slots
        .into_iter()
        .filter(|t| t.should_stream())
        .map(|t| {
            let data = t.take_data();
            WireTensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(len: usize) -> WireTensor {
        WireTensor::new(
            DType::U8,
            vec![len as u64],
            (0..len).map(|i| i as u8).collect(),
        )
        .unwrap()
    }

    fn send(receiver: &mut TensorReceiver, tensor: &WireTensor) -> Result<(), String> {
        receiver.begin(tensor.dtype, tensor.shape.clone(), usize::MAX)?;
        for chunk in tensor.data.chunks(CHUNK_BYTES) {
            receiver.chunk(chunk)?;
        }
        receiver.end()
    }

    #[test]
    fn large_tensors_stream_and_fill_their_placeholders_in_order() {
        let small = tensor(10);
        let (a, b) = (tensor(3 * CHUNK_BYTES + 5), tensor(CHUNK_BYTES + 1));
        let mut message = vec![a.clone(), small.clone(), b.clone()];
        let streamed = take_streamed(&mut message);
        assert_eq!(streamed, vec![a.clone(), b.clone()]);
        assert!(message[0].is_placeholder() && message[2].is_placeholder());
        assert_eq!(message[1], small);

        let mut receiver = TensorReceiver::default();
        for t in &streamed {
            send(&mut receiver, t).unwrap();
        }
        assert_eq!(receiver.bytes(), a.data.len() + b.data.len());
        receiver.fill(&mut message).unwrap();
        assert_eq!(message, vec![a, small, b]);
    }

    #[test]
    fn a_stream_that_breaks_the_rules_is_named() {
        let mut receiver = TensorReceiver::default();
        let error = receiver
            .begin(DType::F32, vec![1 << 20, 1 << 10], 1 << 30)
            .unwrap_err();
        assert!(
            error.contains("4.0 GiB") && error.contains("limit of 1.0 GiB"),
            "{error}"
        );
        assert!(receiver
            .chunk(&[1])
            .unwrap_err()
            .contains("without TensorBegin"));
        receiver.begin(DType::U8, vec![2], 10).unwrap();
        assert!(receiver
            .chunk(&[1, 2, 3])
            .unwrap_err()
            .contains("more than its 2 bytes"));
        receiver.chunk(&[1]).unwrap();
        assert!(receiver.end().unwrap_err().contains("needs 2 bytes, got 1"));

        let mut receiver = TensorReceiver::default();
        send(&mut receiver, &tensor(4)).unwrap();
        let mut wrong = vec![WireTensor::placeholder(DType::U8, vec![5])];
        let error = receiver.fill(&mut wrong).unwrap_err();
        assert!(error.contains("does not match"), "{error}");

        let mut missing = vec![WireTensor::placeholder(DType::U8, vec![5])];
        let error = TensorReceiver::default().fill(&mut missing).unwrap_err();
        assert!(error.contains("none was streamed"), "{error}");

        let mut receiver = TensorReceiver::default();
        send(&mut receiver, &tensor(4)).unwrap();
        let error = receiver.fill(&mut [tensor(2)]).unwrap_err();
        assert!(
            error.contains("1 streamed tensor(s) have no placeholder"),
            "{error}"
        );
    }

    #[test]
    fn an_empty_tensor_is_not_a_placeholder() {
        let empty = WireTensor::new(DType::F32, vec![0, 3], vec![]).unwrap();
        assert!(!empty.is_placeholder());
        assert!(WireTensor::placeholder(DType::F32, vec![1, 3]).is_placeholder());
    }
}
