//! The MessagePack codec (rmp-serde): the same named map as JSON, in MessagePack.
//!
//! Before handing bytes to rmp-serde, [`check_structure`] walks the value once: it refuses
//! counts that the remaining bytes could not hold and nesting past [`MAX_DEPTH`], so a hostile
//! header such as "array of 4 billion elements" never reaches a pre-allocating visitor.

use bytes::Bytes;
use rmp::Marker;

use super::fields::{finish, serde_error, OpOnly, WireIn};
use super::{Codec, CodecId, DecodeError, EncodeError, MAX_DEPTH};
use crate::protocol::Envelope;

/// MessagePack encoding; travels in WebSocket binary frames.
pub struct MessagePack;

impl Codec for MessagePack {
    const ID: CodecId = CodecId::MessagePack;

    fn encode(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
        serde::Serialize::serialize(env, &mut ser).map_err(|e| EncodeError::Format {
            codec: "msgpack",
            detail: e.to_string(),
        })
    }

    fn decode_bytes(bytes: &Bytes) -> Result<Envelope, DecodeError> {
        let end = check_structure(bytes)?;
        if end != bytes.len() {
            return Err(DecodeError::malformed("msgpack", "trailing bytes"));
        }
        finish(
            bytes,
            rmp_serde::from_slice::<WireIn>(bytes).map_err(|e| serde_error("msgpack", e)),
            || rmp_serde::from_slice::<OpOnly>(bytes).ok(),
        )
    }
}

fn take(bytes: &[u8], pos: usize, n: u64) -> Result<usize, DecodeError> {
    let remaining = (bytes.len() - pos) as u64;
    if n > remaining {
        return Err(DecodeError::LengthLies {
            declared: n,
            remaining,
        });
    }
    Ok(pos + n as usize)
}

fn be(bytes: &[u8], pos: usize, width: usize) -> Result<(u64, usize), DecodeError> {
    let end = pos.checked_add(width).ok_or(DecodeError::Truncated)?;
    let slice = bytes.get(pos..end).ok_or(DecodeError::Truncated)?;
    let v = slice.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    Ok((v, end))
}

/// Validates one MessagePack value's framing and returns where it ends.
pub(crate) fn check_structure(bytes: &[u8]) -> Result<usize, DecodeError> {
    // Explicit stack of "values still to read" so hostile nesting cannot overflow ours.
    let mut pending: Vec<u64> = Vec::with_capacity(MAX_DEPTH);
    let mut pos = 0usize;
    let mut todo: u64 = 1;
    loop {
        while todo == 0 {
            match pending.pop() {
                Some(t) => todo = t,
                None => return Ok(pos),
            }
        }
        todo -= 1;
        let b = *bytes.get(pos).ok_or(DecodeError::Truncated)?;
        pos += 1;
        let children: u64 = match Marker::from_u8(b) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::U8 | Marker::I8 => {
                pos = take(bytes, pos, 1)?;
                0
            }
            Marker::U16 | Marker::I16 => {
                pos = take(bytes, pos, 2)?;
                0
            }
            Marker::U32 | Marker::I32 | Marker::F32 => {
                pos = take(bytes, pos, 4)?;
                0
            }
            Marker::U64 | Marker::I64 | Marker::F64 => {
                pos = take(bytes, pos, 8)?;
                0
            }
            Marker::FixStr(n) => {
                pos = take(bytes, pos, u64::from(n))?;
                0
            }
            Marker::Str8
            | Marker::Bin8
            | Marker::Str16
            | Marker::Bin16
            | Marker::Str32
            | Marker::Bin32 => {
                let w = match Marker::from_u8(b) {
                    Marker::Str8 | Marker::Bin8 => 1,
                    Marker::Str16 | Marker::Bin16 => 2,
                    _ => 4,
                };
                let (n, p) = be(bytes, pos, w)?;
                pos = take(bytes, p, n)?;
                0
            }
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16 => {
                let n = match Marker::from_u8(b) {
                    Marker::FixExt1 => 1,
                    Marker::FixExt2 => 2,
                    Marker::FixExt4 => 4,
                    Marker::FixExt8 => 8,
                    _ => 16,
                };
                pos = take(bytes, pos, 1 + n)?;
                0
            }
            Marker::Ext8 | Marker::Ext16 | Marker::Ext32 => {
                let w = match Marker::from_u8(b) {
                    Marker::Ext8 => 1,
                    Marker::Ext16 => 2,
                    _ => 4,
                };
                let (n, p) = be(bytes, pos, w)?;
                pos = take(bytes, p, n + 1)?;
                0
            }
            Marker::FixArray(n) => u64::from(n),
            Marker::FixMap(n) => 2 * u64::from(n),
            Marker::Array16 | Marker::Map16 | Marker::Array32 | Marker::Map32 => {
                let marker = Marker::from_u8(b);
                let w = if matches!(marker, Marker::Array16 | Marker::Map16) {
                    2
                } else {
                    4
                };
                let (n, p) = be(bytes, pos, w)?;
                pos = p;
                if matches!(marker, Marker::Map16 | Marker::Map32) {
                    2 * n
                } else {
                    n
                }
            }
            Marker::Reserved => {
                return Err(DecodeError::malformed("msgpack", "reserved marker 0xc1"))
            }
        };
        if children > 0 {
            // Every element takes at least one byte.
            let remaining = (bytes.len() - pos) as u64;
            if children > remaining {
                return Err(DecodeError::LengthLies {
                    declared: children,
                    remaining,
                });
            }
            if pending.len() >= MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            pending.push(todo);
            todo = children;
        }
    }
}
