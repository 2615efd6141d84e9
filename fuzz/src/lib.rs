//! What the decoder targets share: any payload decodes to a message or to
//! an error, never a panic or an allocation beyond the decode limit; what
//! decodes encodes, and that encoding decodes and encodes to the same bytes
//! (bytes, not values: a decoded float may be NaN, which equals nothing).

use gpuctl_protocol::{decode_payload, encode_payload};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as a `T`; returns the message when it decoded, after
/// checking that its encoding is stable.
pub fn decodes<T: Serialize + DeserializeOwned>(data: &[u8]) -> Option<T> {
    let message = decode_payload::<T>(data).ok()?;
    let payload = encode_payload(&message).expect("a decoded message encodes");
    let again: T = decode_payload(&payload).expect("its encoding decodes");
    let encoded_again = encode_payload(&again).expect("it encodes again");
    assert_eq!(encoded_again, payload, "the encoding is stable");
    Some(message)
}
