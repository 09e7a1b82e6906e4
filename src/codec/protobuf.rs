//! The Protobuf codec (work in progress: not wired yet).

use super::{Codec, CodecId, DecodeError, EncodeError};
use crate::protocol::Envelope;

/// Protobuf encoding of the message model.
pub struct Protobuf;

impl Codec for Protobuf {
    const ID: CodecId = CodecId::Protobuf;

    fn encode(_env: &Envelope, _out: &mut Vec<u8>) -> Result<(), EncodeError> {
        Err(EncodeError::Format { codec: "protobuf", detail: "not implemented".into() })
    }

    fn decode(_bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Err(DecodeError::malformed("protobuf", "not implemented"))
    }
}
