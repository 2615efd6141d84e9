//! Streamed tensor frames in any order, with any shapes and sizes, into a
//! receiver with any room: refused or accepted, never a panic, never more
//! held than the room allowed, and placeholders filled only as the rules say.
#![no_main]

use arbitrary::Arbitrary;
use gpuctl_protocol::{DType, TensorFrame, TensorReceiver, WireTensor};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Frame {
    Begin { dtype: u8, shape: Vec<u16> },
    Chunk { len: u16, byte: u8 },
    BigChunk,
    End,
}

#[derive(Debug, Arbitrary)]
struct Case {
    passing: bool,
    room: u32,
    frames: Vec<Frame>,
    placeholders: Vec<(u8, Vec<u16>)>,
}

const DTYPES: [DType; 7] = [
    DType::U8,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::I32,
    DType::I64,
    DType::BF16,
];

fn dtype(byte: u8) -> DType {
    DTYPES[usize::from(byte) % DTYPES.len()]
}

fuzz_target!(|case: Case| {
    // At most 16 MiB, so a case cannot exhaust the fuzzer's memory.
    let room = (case.room % (16 << 20)) as usize;
    let mut receiver = if case.passing {
        TensorReceiver::passing_on()
    } else {
        TensorReceiver::default()
    };
    for frame in case.frames {
        let frame = match frame {
            Frame::Begin { dtype: d, shape } => TensorFrame::Begin {
                dtype: dtype(d),
                shape: shape.into_iter().map(u64::from).collect(),
            },
            Frame::Chunk { len, byte } => TensorFrame::Chunk(vec![byte; usize::from(len)]),
            Frame::BigChunk => TensorFrame::Chunk(vec![0; gpuctl_protocol::CHUNK_BYTES + 1]),
            Frame::End => TensorFrame::End,
        };
        receiver.frame(&frame, room.saturating_sub(receiver.bytes()));
        assert!(receiver.bytes() <= room, "held more than its room");
    }
    let mut slots: Vec<WireTensor> = case
        .placeholders
        .into_iter()
        .map(|(d, shape)| {
            WireTensor::placeholder(dtype(d), shape.into_iter().map(u64::from).collect())
        })
        .collect();
    let passing = case.passing;
    if receiver.fill(&mut slots).is_ok() && !passing {
        for slot in &slots {
            slot.check()
                .expect("a filled placeholder matches its shape");
        }
    }
});
