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

/// The largest payload of a frame that carries a chunk: its data and room
/// for its message's other fields.
pub const CHUNK_FRAME: usize = CHUNK_BYTES + 1024;

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

/// Why tensors streamed ahead of a message cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A tensor would take the receiver past the room it was given.
    TooLarge {
        /// The tensor's shape.
        shape: Vec<u64>,
        /// Its size.
        bytes: u64,
        /// The bytes the receiver had room for when it began.
        room: u64,
    },
    /// The frames broke the rules: order, sizes, placeholders.
    Broken(String),
    /// The receiver could not allocate the tensor's size.
    OutOfMemory {
        /// The tensor's shape.
        shape: Vec<u64>,
        /// Its size.
        bytes: u64,
    },
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::TooLarge { shape, bytes, room } => write!(
                f,
                "a streamed tensor of shape {shape:?} ({}) exceeds the {} left to receive",
                crate::units::format_bytes(*bytes),
                crate::units::format_bytes(*room)
            ),
            StreamError::Broken(problem) => f.write_str(problem),
            StreamError::OutOfMemory { shape, bytes } => write!(
                f,
                "cannot allocate {} for a streamed tensor of shape {shape:?}",
                crate::units::format_bytes(*bytes)
            ),
        }
    }
}

/// Collects the tensors streamed ahead of one message. The first problem
/// is kept and everything after it dropped (its memory freed at once); the
/// message hears of it when it asks for its tensors ([`TensorReceiver::fill`]).
#[derive(Debug, Default)]
pub struct TensorReceiver {
    finished: Vec<WireTensor>,
    current: Option<WireTensor>,
    expected: usize,
    /// Bytes of the current tensor so far.
    received: usize,
    bytes: usize,
    refused: Option<StreamError>,
    /// Checks the frames but keeps no data: they are passed on elsewhere.
    passing: bool,
}

impl TensorReceiver {
    /// A receiver that checks frames exactly as one that keeps them would,
    /// for a caller that passes them on as they come: it holds no data,
    /// and [`TensorReceiver::fill`] leaves the placeholders as they are.
    pub fn passing_on() -> TensorReceiver {
        TensorReceiver {
            passing: true,
            ..TensorReceiver::default()
        }
    }

    /// Takes one frame (`room`: see [`TensorReceiver::begin`]).
    pub fn frame(&mut self, frame: &TensorFrame, room: usize) {
        match frame {
            TensorFrame::Begin { dtype, shape } => self.begin(*dtype, shape.clone(), room),
            TensorFrame::Chunk(data) => self.chunk(data),
            TensorFrame::End => self.end(),
        }
    }

    /// Whether the frames so far kept the rules.
    pub fn is_sound(&self) -> bool {
        self.refused.is_none()
    }

    /// Starts a tensor of `dtype` and `shape`, if its size fits in `room`
    /// bytes. Reserves its whole size at once.
    pub fn begin(&mut self, dtype: DType, shape: Vec<u64>, room: usize) {
        if self.refused.is_some() {
            return;
        }
        let result = self.try_begin(dtype, shape, room);
        self.check(result);
    }

    fn try_begin(&mut self, dtype: DType, shape: Vec<u64>, room: usize) -> Result<(), StreamError> {
        if self.current.is_some() {
            return Err(broken("TensorBegin before the previous tensor's TensorEnd"));
        }
        let mut tensor = WireTensor::placeholder(dtype, shape);
        let size = match tensor.byte_len() {
            Some(size) if size <= room => size,
            too_large => {
                return Err(StreamError::TooLarge {
                    bytes: too_large.map_or(u64::MAX, |n| n as u64),
                    shape: tensor.shape,
                    room: room as u64,
                })
            }
        };
        if !self.passing && tensor.data.try_reserve_exact(size).is_err() {
            return Err(StreamError::OutOfMemory {
                shape: tensor.shape,
                bytes: size as u64,
            });
        }
        self.bytes += size;
        self.expected = size;
        self.received = 0;
        self.current = Some(tensor);
        Ok(())
    }

    /// Appends one chunk to the tensor begun last.
    pub fn chunk(&mut self, data: &[u8]) {
        let result = match &mut self.current {
            _ if self.refused.is_some() => Ok(()),
            None => Err(broken("TensorChunk without TensorBegin")),
            Some(_) if data.len() > CHUNK_BYTES => Err(broken(&format!(
                "a TensorChunk of {} bytes is over the limit of {CHUNK_BYTES}",
                data.len()
            ))),
            Some(tensor) if self.received + data.len() > self.expected => Err(broken(&format!(
                "streamed tensor of shape {:?} got more than its {} bytes",
                tensor.shape, self.expected
            ))),
            Some(tensor) => {
                if !self.passing {
                    tensor.data.extend_from_slice(data);
                }
                self.received += data.len();
                Ok(())
            }
        };
        self.check(result);
    }

    /// Ends the tensor begun last; it must be complete.
    pub fn end(&mut self) {
        let result = match self.current.take() {
            _ if self.refused.is_some() => Ok(()),
            None => Err(broken("TensorEnd without TensorBegin")),
            Some(tensor) if self.passing => {
                if self.received == self.expected {
                    self.finished.push(tensor);
                    Ok(())
                } else {
                    Err(broken(&format!(
                        "streamed tensor of shape {:?} ended after {} of its {} bytes",
                        tensor.shape, self.received, self.expected
                    )))
                }
            }
            Some(tensor) => tensor
                .check()
                .map(|()| self.finished.push(tensor))
                .map_err(StreamError::Broken),
        };
        self.check(result);
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
    ) -> Result<(), StreamError> {
        if let Some(refused) = self.refused {
            return Err(refused);
        }
        if self.current.is_some() {
            return Err(broken("a streamed tensor was not ended before its message"));
        }
        let mut streamed = self.finished.into_iter();
        for slot in slots.into_iter().filter(|t| t.is_placeholder()) {
            let tensor = streamed.next().ok_or_else(|| {
                broken(&format!(
                    "the message holds a tensor of shape {:?} without data, and none was streamed for it",
                    slot.shape
                ))
            })?;
            if tensor.dtype != slot.dtype || tensor.shape != slot.shape {
                return Err(broken(&format!(
                    "streamed tensor {:?} {:?} does not match its place in the message, {:?} {:?}",
                    tensor.dtype, tensor.shape, slot.dtype, slot.shape
                )));
            }
            if !self.passing {
                *slot = tensor;
            }
        }
        match streamed.len() {
            0 => Ok(()),
            n => Err(broken(&format!(
                "{n} streamed tensor(s) have no placeholder in the message"
            ))),
        }
    }

    fn check(&mut self, result: Result<(), StreamError>) {
        if let (Err(error), None) = (result, &self.refused) {
            // The rest of the stream is dropped; its memory goes now.
            *self = TensorReceiver {
                refused: Some(error),
                passing: self.passing,
                ..TensorReceiver::default()
            };
        }
    }
}

fn broken(problem: &str) -> StreamError {
    StreamError::Broken(problem.to_owned())
}

/// One frame of a streamed tensor, whatever message carries it: the
/// client protocol spells its three frames out (its bytes are frozen), the
/// worker protocol carries this enum as it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TensorFrame {
    /// `TensorBegin`.
    Begin {
        /// Element type.
        dtype: DType,
        /// Dimensions.
        shape: Vec<u64>,
    },
    /// `TensorChunk`: at most [`CHUNK_BYTES`].
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// `TensorEnd`.
    End,
}

/// The frames that stream `tensor`: begin, chunks, end.
pub fn frames(tensor: WireTensor) -> impl Iterator<Item = TensorFrame> + Send {
    let WireTensor { dtype, shape, data } = tensor;
    let chunks = (0..data.len()).step_by(CHUNK_BYTES).map(move |start| {
        TensorFrame::Chunk(data[start..(start + CHUNK_BYTES).min(data.len())].to_vec())
    });
    std::iter::once(TensorFrame::Begin { dtype, shape })
        .chain(chunks)
        .chain(std::iter::once(TensorFrame::End))
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

    fn receive(receiver: &mut TensorReceiver, tensor: WireTensor) {
        for frame in frames(tensor) {
            match frame {
                TensorFrame::Begin { dtype, shape } => receiver.begin(dtype, shape, usize::MAX),
                TensorFrame::Chunk(data) => {
                    assert!(data.len() <= CHUNK_BYTES);
                    receiver.chunk(&data)
                }
                TensorFrame::End => receiver.end(),
            }
        }
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
        assert_eq!(frames(a.clone()).count(), 1 + 4 + 1);

        let mut receiver = TensorReceiver::default();
        for t in streamed {
            receive(&mut receiver, t);
        }
        assert_eq!(receiver.bytes(), a.data.len() + b.data.len());
        receiver.fill(&mut message).unwrap();
        assert_eq!(message, vec![a, small, b]);
    }

    fn refused(receiver: TensorReceiver) -> String {
        let error = receiver.fill(&mut []).unwrap_err();
        error.to_string()
    }

    #[test]
    fn a_stream_that_breaks_the_rules_is_named_and_the_rest_dropped() {
        let mut receiver = TensorReceiver::default();
        receiver.begin(DType::F32, vec![1 << 20, 1 << 10], 1 << 30);
        assert_eq!(receiver.bytes(), 0);
        // What follows a refusal is dropped, not held.
        receiver.begin(DType::U8, vec![2], 10);
        receiver.chunk(&[1, 2]);
        assert_eq!(receiver.bytes(), 0);
        let error = receiver.fill(&mut []).unwrap_err();
        assert_eq!(
            error,
            StreamError::TooLarge {
                shape: vec![1 << 20, 1 << 10],
                bytes: 4 << 30,
                room: 1 << 30
            }
        );
        assert!(
            error
                .to_string()
                .contains("(4.0 GiB) exceeds the 1.0 GiB left"),
            "{error}"
        );

        let mut receiver = TensorReceiver::default();
        receiver.chunk(&[1]);
        assert!(refused(receiver).contains("without TensorBegin"));
        let mut receiver = TensorReceiver::default();
        receiver.begin(DType::U8, vec![2], 10);
        receiver.chunk(&[1, 2, 3]);
        assert!(refused(receiver).contains("more than its 2 bytes"));
        let mut receiver = TensorReceiver::default();
        receiver.begin(DType::U8, vec![2 * CHUNK_BYTES as u64], usize::MAX);
        receiver.chunk(&vec![0; CHUNK_BYTES + 1]);
        assert!(refused(receiver).contains("over the limit of 1048576"));
        let mut receiver = TensorReceiver::default();
        receiver.begin(DType::U8, vec![1 << 50], usize::MAX);
        assert_eq!(
            receiver.fill(&mut []).unwrap_err(),
            StreamError::OutOfMemory {
                shape: vec![1 << 50],
                bytes: 1 << 50
            }
        );
        let mut receiver = TensorReceiver::default();
        receiver.begin(DType::U8, vec![2], 10);
        receiver.chunk(&[1]);
        receiver.end();
        assert!(refused(receiver).contains("needs 2 bytes, got 1"));

        let mut receiver = TensorReceiver::default();
        receive(&mut receiver, tensor(4));
        let mut wrong = vec![WireTensor::placeholder(DType::U8, vec![5])];
        let error = receiver.fill(&mut wrong).unwrap_err().to_string();
        assert!(error.contains("does not match"), "{error}");

        let mut missing = vec![WireTensor::placeholder(DType::U8, vec![5])];
        let error = TensorReceiver::default()
            .fill(&mut missing)
            .unwrap_err()
            .to_string();
        assert!(error.contains("none was streamed"), "{error}");

        let mut receiver = TensorReceiver::default();
        receive(&mut receiver, tensor(4));
        let error = receiver.fill(&mut [tensor(2)]).unwrap_err().to_string();
        assert!(
            error.contains("1 streamed tensor(s) have no placeholder"),
            "{error}"
        );
    }

    #[test]
    fn passing_on_checks_the_same_rules_and_keeps_nothing() {
        let big = tensor(3 * CHUNK_BYTES / 2);
        let mut passing = TensorReceiver::passing_on();
        for frame in frames(big.clone()) {
            passing.frame(&frame, usize::MAX);
            assert!(passing.is_sound());
        }
        assert_eq!(passing.bytes(), big.data.len());
        let mut slots = [WireTensor::placeholder(big.dtype, big.shape.clone())];
        passing.fill(&mut slots).unwrap();
        assert!(slots[0].is_placeholder(), "passed on, not kept");

        let broken = |frames: &[TensorFrame], room: usize| {
            let mut passing = TensorReceiver::passing_on();
            for frame in frames {
                passing.frame(frame, room);
            }
            assert!(!passing.is_sound());
            let mut slots = [WireTensor::placeholder(big.dtype, big.shape.clone())];
            passing.fill(&mut slots).unwrap_err().to_string()
        };
        let begin = TensorFrame::Begin {
            dtype: big.dtype,
            shape: big.shape.clone(),
        };
        let short = broken(
            &[
                begin.clone(),
                TensorFrame::Chunk(vec![1; 10]),
                TensorFrame::End,
            ],
            usize::MAX,
        );
        assert!(short.contains("ended after 10 of its"), "{short}");
        let long = broken(
            &[
                begin.clone(),
                TensorFrame::Chunk(vec![1; CHUNK_BYTES]),
                TensorFrame::Chunk(vec![1; CHUNK_BYTES]),
            ],
            usize::MAX,
        );
        assert!(long.contains("got more than its"), "{long}");
        let large = broken(&[begin], 100);
        assert!(large.contains("exceeds the 100 B left"), "{large}");
    }

    #[test]
    fn an_empty_tensor_is_not_a_placeholder() {
        let empty = WireTensor::new(DType::F32, vec![0, 3], vec![]).unwrap();
        assert!(!empty.is_placeholder());
        assert!(WireTensor::placeholder(DType::F32, vec![1, 3]).is_placeholder());
        assert_eq!(frames(empty).count(), 2);
    }
}
