#![allow(clippy::unwrap_used)]

use bytes::{BufMut, BytesMut};
use gpuctl_protocol::*;
use tokio_util::codec::{Decoder, Encoder};

type DaemonSide = FrameCodec<ClientMessage, DaemonMessage>;

fn ping(id: u64) -> ClientMessage {
    ClientMessage::Request {
        id,
        request: Request::Ping(PingRequest {}),
    }
}

fn encoded(messages: &[ClientMessage]) -> BytesMut {
    let mut client = FrameCodec::<DaemonMessage, ClientMessage>::default();
    let mut buffer = BytesMut::new();
    for message in messages {
        client.encode(message.clone(), &mut buffer).unwrap();
    }
    buffer
}

#[test]
fn several_frames_in_one_read() {
    let mut buffer = encoded(&[ping(1), ping(2), ping(3)]);
    let mut codec = DaemonSide::default();
    let decoded: Vec<_> = std::iter::from_fn(|| codec.decode(&mut buffer).unwrap()).collect();
    assert_eq!(decoded, vec![ping(1), ping(2), ping(3)]);
    assert!(buffer.is_empty());
}

#[test]
fn a_frame_split_across_reads() {
    let whole = encoded(&[ping(9)]);
    let mut codec = DaemonSide::default();
    let mut buffer = BytesMut::new();
    for (i, byte) in whole.iter().enumerate() {
        buffer.put_u8(*byte);
        let decoded = codec.decode(&mut buffer).unwrap();
        if i + 1 < whole.len() {
            assert_eq!(decoded, None, "decoded early at byte {i}");
        } else {
            assert_eq!(decoded, Some(ping(9)));
        }
    }
}

#[test]
fn an_oversized_prefix_is_refused_before_allocating() {
    let mut codec = DaemonSide::new(1024);
    let mut buffer = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..]);
    let error = codec.decode(&mut buffer).unwrap_err();
    assert!(
        matches!(error, FrameError::TooLarge { max: 1024 }),
        "{error}"
    );
    assert!(
        buffer.capacity() < 1 << 20,
        "buffer grew to {}",
        buffer.capacity()
    );
}

#[test]
fn an_oversized_outgoing_frame_is_refused() {
    let mut codec = FrameCodec::<DaemonMessage, ClientMessage>::new(32);
    let big = ClientMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        client: "x".repeat(64),
    });
    let mut buffer = BytesMut::new();
    assert!(matches!(
        codec.encode(big, &mut buffer),
        Err(FrameError::TooLarge { max: 32 })
    ));
    assert!(buffer.is_empty());
}

#[test]
fn the_configured_maximum_is_capped() {
    assert_eq!(DaemonSide::new(usize::MAX).max_frame(), MAX_FRAME_CEILING);
}

#[test]
fn a_forged_inner_length_is_an_error_not_an_allocation() {
    // Hello whose client string claims 2^40 bytes.
    let mut payload = vec![0, 0, 0, 0, 1, 0, 0, 0];
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let error = decode_payload::<ClientMessage>(&payload).unwrap_err();
    assert!(matches!(error, FrameError::Malformed(_)), "{error}");
}

#[test]
fn unknown_variants_and_trailing_bytes_are_malformed() {
    let unknown = 99u32.to_le_bytes();
    assert!(matches!(
        decode_payload::<ClientMessage>(&unknown),
        Err(FrameError::Malformed(_))
    ));
    let mut trailing = encode_payload(&ping(1)).unwrap();
    trailing.push(0);
    let error = decode_payload::<ClientMessage>(&trailing).unwrap_err();
    assert!(error.to_string().contains("1 trailing bytes"), "{error}");
}

#[test]
fn a_stream_ending_mid_frame_is_truncated() {
    let whole = encoded(&[ping(1)]);
    let mut buffer = BytesMut::from(&whole[..whole.len() - 3]);
    let mut codec = DaemonSide::default();
    let error = codec.decode_eof(&mut buffer).unwrap_err();
    assert!(matches!(error, FrameError::Truncated { .. }), "{error}");
    let mut empty = BytesMut::new();
    assert_eq!(codec.decode_eof(&mut empty).unwrap(), None);
}
