//! The FlatBuffers codec (work in progress: not wired yet).

use super::{Codec, CodecId, DecodeError, EncodeError};
use crate::protocol::Envelope;

/// FlatBuffers encoding of the message model.
pub struct FlatBuffers;

impl Codec for FlatBuffers {
    const ID: CodecId = CodecId::FlatBuffers;

    fn encode(_env: &Envelope, _out: &mut Vec<u8>) -> Result<(), EncodeError> {
        Err(EncodeError::Format { codec: "flatbuf", detail: "not implemented".into() })
    }

    fn decode(_bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Err(DecodeError::malformed("flatbuf", "not implemented"))
    }
}
