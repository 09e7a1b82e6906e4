//! The Hessian codec (work in progress: not wired yet).

use super::{Codec, CodecId, DecodeError, EncodeError};
use crate::protocol::Envelope;

/// Hessian encoding of the message model.
pub struct Hessian;

impl Codec for Hessian {
    const ID: CodecId = CodecId::Hessian;

    fn encode(_env: &Envelope, _out: &mut Vec<u8>) -> Result<(), EncodeError> {
        Err(EncodeError::Format { codec: "hessian", detail: "not implemented".into() })
    }

    fn decode(_bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Err(DecodeError::malformed("hessian", "not implemented"))
    }
}
