//! The JSON codec (serde_json): one object per frame, `op` names the message (SPEC 3.3).
//!
//! Encoding goes through serde_json and the `Serialize` impl of `fields.rs`.
//!
//! Decoding checks UTF-8 once for the whole payload, then tries the direct reader:
//! `direct::envelope` driven by our own byte-level JSON reader (`json_read.rs`, no serde_json),
//! which reads the object key by key into the op's message, slicing strings without escapes
//! from the input and unescaping the others. It gives up on anything outside the plain JSON
//! it knows (see `json_read.rs`) and on the frames `direct.rs` leaves to the general path;
//! those go through [`decode_serde`]'s path, serde_json into `WireIn`, which decides them
//! (errors included).

use bytes::Bytes;

use super::fields::{finish, serde_error, OpOnly, WireIn};
use super::json_read;
use super::text::ascii_str;
use super::{Codec, CodecId, DecodeError, EncodeError};
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
        // Validate the whole payload once (ignored fields included; ASCII, the usual case,
        // a word at a time); both paths then parse the `str` without re-checking any string.
        let text = match ascii_str(bytes) {
            Some(t) => t,
            None => std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?,
        };
        read_in_place!(
            |env| json_read::envelope(bytes, text, env).ok_or(()),
            |()| general(bytes, text)
        )
    }
}

/// The general decoding path (serde_json into `WireIn`); it decides every frame the direct
/// reader gives up on, and the tests compare the two.
pub fn decode_serde(bytes: &Bytes) -> Result<Envelope, DecodeError> {
    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    general(bytes, text)
}

fn general(bytes: &Bytes, text: &str) -> Result<Envelope, DecodeError> {
    // serde_json limits recursion to 128 levels; our own fields nest 3 deep, and unknown
    // fields are skipped without allocation, so the allocation bound holds.
    finish(
        bytes,
        serde_json::from_str::<WireIn>(text).map_err(|e| serde_error("json", e)),
        || serde_json::from_str::<OpOnly>(text).ok(),
    )
}
