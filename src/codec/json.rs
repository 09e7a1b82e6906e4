//! The JSON codec (serde_json): one object per frame, `op` names the message (SPEC 3.3).

use super::fields::{finish, serde_error, OpOnly, WireIn};
use super::{Codec, CodecId, DecodeError, EncodeError};
use bytes::Bytes;

use crate::protocol::Envelope;

/// JSON encoding; travels in WebSocket text frames.
pub struct Json;

impl Codec for Json {
    const ID: CodecId = CodecId::Json;

    fn encode(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        serde_json::to_writer(out, env).map_err(|e| EncodeError::Format {
            codec: "json",
            detail: e.to_string(),
        })
    }

    fn decode_bytes(bytes: &Bytes) -> Result<Envelope, DecodeError> {
        // serde_json limits recursion to 128 levels; our own fields nest 3 deep, and unknown
        // fields are skipped without allocation, so the allocation bound holds.
        // Validate the whole payload once (ignored fields included), then parse without
        // re-checking every string.
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        finish(
            bytes,
            serde_json::from_str::<WireIn>(text).map_err(|e| serde_error("json", e)),
            || serde_json::from_str::<OpOnly>(text).ok(),
        )
    }
}
