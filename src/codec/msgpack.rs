//! The MessagePack codec: the same named map as JSON, in MessagePack.
//!
//! Encoding writes the map directly with MessagePack's most compact forms, exactly the bytes
//! rmp-serde writes for the `Serialize` impl of `fields.rs` (a property test compares them;
//! the golden vectors pin them).
//!
//! Decoding first tries the direct reader ([`Direct`], driven by `direct::envelope`): it reads
//! the map key by key into the op's message, slicing strings from the input, and gives up on
//! anything but plain values (see `direct.rs` for the rule that keeps it equivalent). Frames
//! it gives up on go through the general path, [`decode_serde`]: [`check_structure`] walks the
//! value once, refusing counts that the remaining bytes could not hold and nesting past
//! [`MAX_DEPTH`] (so a hostile header such as "array of 4 billion elements" never reaches a
//! pre-allocating visitor), then rmp-serde fills `WireIn`.

use bytes::Bytes;
use rmp::Marker;

use super::direct::{self, MapSink, MapSource};
use super::fields::{finish, serde_error, OpOnly, WireIn};
use super::out::Sink;
use super::text::{sub_str, sub_str_into};
use super::{Codec, CodecId, DecodeError, EncodeError, MAX_DEPTH};
use crate::protocol::{Envelope, Ext, Str};

/// MessagePack encoding; travels in WebSocket binary frames.
pub struct MessagePack;

impl Codec for MessagePack {
    const ID: CodecId = CodecId::MessagePack;

    fn encode(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let r = direct::write_envelope(&mut Writer { out }, env);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn decode_bytes(bytes: &Bytes) -> Result<Envelope, DecodeError> {
        read_in_place!(
            |env| decode_direct(bytes, env).ok_or(()),
            |()| decode_serde(bytes)
        )
    }
}

/// Encodes through rmp-serde and the `Serialize` impl: the reference [`MessagePack::encode`]
/// is tested against.
pub fn encode_serde(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
    serde::Serialize::serialize(env, &mut ser).map_err(|e| EncodeError::Format {
        codec: "msgpack",
        detail: e.to_string(),
    })
}

/// The general decoding path (structure check, then rmp-serde into `WireIn`); it decides
/// every frame the direct reader gives up on, and the tests compare the two.
pub fn decode_serde(bytes: &Bytes) -> Result<Envelope, DecodeError> {
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

// ---- encoding ------------------------------------------------------------------------------

struct Writer<'a, S: Sink> {
    out: &'a mut S,
}

impl<S: Sink> Writer<'_, S> {
    /// A map or array header: fix form below 16, else 16 or 32 bits.
    #[inline]
    fn header(&mut self, n: usize, fix: u8, m16: u8, m32: u8) -> Result<(), EncodeError> {
        if n < 16 {
            self.out.put(fix | n as u8);
        } else if let Ok(n) = u16::try_from(n) {
            self.out.put(m16);
            self.out.put_slice(&n.to_be_bytes());
        } else {
            let n = u32::try_from(n).map_err(|_| EncodeError::TooLarge)?;
            self.out.put(m32);
            self.out.put_slice(&n.to_be_bytes());
        }
        Ok(())
    }
}

impl<S: Sink> MapSink for Writer<'_, S> {
    #[inline]
    fn map(&mut self, entries: usize) -> Result<(), EncodeError> {
        self.header(entries, 0x80, 0xde, 0xdf)
    }

    #[inline]
    fn end_map(&mut self) {}

    #[inline(always)]
    fn key(&mut self, key: &'static str) {
        // Our field names are shorter than 32 bytes: a fixstr.
        debug_assert!(key.len() < 32);
        self.out.put(0xa0 | key.len() as u8);
        self.out.put_slice(key.as_bytes());
    }

    #[inline(always)]
    fn str(&mut self, s: &str) -> Result<(), EncodeError> {
        let n = s.len();
        if n < 32 {
            self.out.put(0xa0 | n as u8);
        } else if n < 256 {
            self.out.put_slice(&[0xd9, n as u8]);
        } else if let Ok(n) = u16::try_from(n) {
            self.out.put(0xda);
            self.out.put_slice(&n.to_be_bytes());
        } else {
            let n = u32::try_from(n).map_err(|_| EncodeError::TooLarge)?;
            self.out.put(0xdb);
            self.out.put_slice(&n.to_be_bytes());
        }
        self.out.put_slice(s.as_bytes());
        Ok(())
    }

    #[inline(always)]
    fn uint(&mut self, v: u64) -> Result<(), EncodeError> {
        if v < 128 {
            self.out.put(v as u8);
        } else if v < 256 {
            self.out.put_slice(&[0xcc, v as u8]);
        } else if v < 65536 {
            self.out.put(0xcd);
            self.out.put_slice(&(v as u16).to_be_bytes());
        } else if v < 1 << 32 {
            self.out.put(0xce);
            self.out.put_slice(&(v as u32).to_be_bytes());
        } else {
            self.out.put(0xcf);
            self.out.put_slice(&v.to_be_bytes());
        }
        Ok(())
    }

    #[inline]
    fn bool(&mut self, v: bool) {
        self.out.put(if v { 0xc3 } else { 0xc2 });
    }

    fn strs(&mut self, items: &[Str]) -> Result<(), EncodeError> {
        self.header(items.len(), 0x90, 0xdc, 0xdd)?;
        for s in items {
            self.str(s)?;
        }
        Ok(())
    }
}

// ---- direct decoding -----------------------------------------------------------------------

/// The direct reader's attempt, into `env`; `None` leaves the frame to [`decode_serde`].
#[inline(always)]
fn decode_direct(bytes: &Bytes, env: &mut Envelope) -> Option<()> {
    let mut cur: &[u8] = bytes;
    let left = map_header(&mut cur)?;
    let mut r = Direct {
        src: bytes,
        cur,
        left,
    };
    // The top-level map was read to its end; nothing may follow it.
    direct::envelope(&mut r, |r| r.cur.is_empty(), env)
}

/// Splits `n` bytes off the front of `cur`.
#[inline(always)]
fn split<'a>(cur: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if n > cur.len() {
        return None;
    }
    let (head, rest) = cur.split_at(n);
    *cur = rest;
    Some(head)
}

#[inline(always)]
fn be_at(cur: &mut &[u8], width: usize) -> Option<usize> {
    let b = split(cur, width)?;
    Some(b.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
}

/// A map header; its entry count, checked against the bytes left (every key and value takes
/// at least one byte).
#[inline]
fn map_header(cur: &mut &[u8]) -> Option<usize> {
    let (&m, rest) = cur.split_first()?;
    *cur = rest;
    let n = match m {
        0x80..=0x8f => usize::from(m & 0x0f),
        0xde => be_at(cur, 2)?,
        0xdf => be_at(cur, 4)?,
        _ => return None,
    };
    (n.checked_mul(2)? <= cur.len()).then_some(n)
}

/// The bytes of a string value (a `str` of any width).
#[inline(always)]
fn str_bytes<'a>(cur: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&m, rest) = cur.split_first()?;
    *cur = rest;
    let n = match m {
        0xa0..=0xbf => usize::from(m & 0x1f),
        0xd9 => be_at(cur, 1)?,
        0xda => be_at(cur, 2)?,
        0xdb => be_at(cur, 4)?,
        _ => return None,
    };
    split(cur, n)
}

/// Skips one value whose enclosing containers number `level`, with [`check_structure`]'s
/// rules: lengths within the input, non-empty containers only below [`MAX_DEPTH`] levels.
/// Extension types (which the general path may treat differently) give up.
fn skip_value(cur: &mut &[u8], level: usize) -> Option<()> {
    let (&m, rest) = cur.split_first()?;
    *cur = rest;
    let (bytes, children) = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
        0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
        0x90..=0x9f => (0, usize::from(m & 0x0f)),
        0xa0..=0xbf => (usize::from(m & 0x1f), 0),
        0xc4 | 0xd9 => (be_at(cur, 1)?, 0),
        0xc5 | 0xda => (be_at(cur, 2)?, 0),
        0xc6 | 0xdb => (be_at(cur, 4)?, 0),
        0xcc | 0xd0 => (1, 0),
        0xcd | 0xd1 => (2, 0),
        0xca | 0xce | 0xd2 => (4, 0),
        0xcb | 0xcf | 0xd3 => (8, 0),
        0xdc => (0, be_at(cur, 2)?),
        0xdd => (0, be_at(cur, 4)?),
        0xde => (0, be_at(cur, 2)?.checked_mul(2)?),
        0xdf => (0, be_at(cur, 4)?.checked_mul(2)?),
        // 0xc1 (never used) and the extension types.
        _ => return None,
    };
    split(cur, bytes)?;
    if children > 0 {
        if children > cur.len() || level >= MAX_DEPTH {
            return None;
        }
        for _ in 0..children {
            skip_value(cur, level + 1)?;
        }
    }
    Some(())
}

/// The direct reader, inside the top-level map (`left` entries to go).
struct Direct<'a> {
    src: &'a Bytes,
    cur: &'a [u8],
    left: usize,
}

impl<'a> Direct<'a> {
    /// A string value (checked as UTF-8): inline when short, else a slice of the input.
    #[inline(always)]
    fn string(&mut self) -> Option<Str> {
        let b = str_bytes(&mut self.cur)?;
        sub_str(self.src, b)
    }

    /// [`Direct::string`] into `out` (see [`Str::assign_utf8`]); `false` to give up.
    #[inline(always)]
    fn string_into(&mut self, out: &mut Str) -> bool {
        match str_bytes(&mut self.cur) {
            Some(b) => sub_str_into(self.src, b, out),
            None => false,
        }
    }
}

impl<'a> MapSource for Direct<'a> {
    fn nested(&mut self, mut entry: impl FnMut(&mut Self, &[u8]) -> Option<bool>) -> Option<()> {
        let n = map_header(&mut self.cur)?;
        for _ in 0..n {
            let key = str_bytes(&mut self.cur)?;
            if !entry(self, key)? {
                // Values of this map are 2 containers deep.
                skip_value(&mut self.cur, 2)?;
            }
        }
        Some(())
    }

    type Key = &'a [u8];

    #[inline]
    fn key(&mut self) -> Option<Option<&'a [u8]>> {
        if self.left == 0 {
            return Some(None);
        }
        self.left -= 1;
        // A key that is not valid UTF-8 cannot be one of our (ASCII) names, and the general
        // path ignores unknown keys whatever their bytes, so keys are not checked.
        str_bytes(&mut self.cur).map(Some)
    }

    #[inline(always)]
    fn expect_key(&mut self, key: &'static [u8]) -> bool {
        // Our names are fixstrs: the marker, then the bytes.
        match self.cur.split_first() {
            Some((&m, rest))
                if self.left > 0 && usize::from(m ^ 0xa0) == key.len() && rest.starts_with(key) =>
            {
                self.cur = &rest[key.len()..];
                self.left -= 1;
                true
            }
            _ => false,
        }
    }

    #[inline(always)]
    fn str(&mut self) -> Option<Str> {
        self.string()
    }

    #[inline(always)]
    fn str_into(&mut self, out: &mut Str) -> Option<()> {
        self.string_into(out).then_some(())
    }

    #[inline]
    fn name<T>(&mut self, f: impl FnOnce(&[u8]) -> Option<T>) -> Option<T> {
        f(str_bytes(&mut self.cur)?)
    }

    #[inline(always)]
    fn uint(&mut self) -> Option<u64> {
        let (&m, rest) = self.cur.split_first()?;
        self.cur = rest;
        Some(match m {
            0x00..=0x7f => u64::from(m),
            0xcc => be_at(&mut self.cur, 1)? as u64,
            0xcd => be_at(&mut self.cur, 2)? as u64,
            0xce => be_at(&mut self.cur, 4)? as u64,
            0xcf => u64::from_be_bytes(*split(&mut self.cur, 8)?.first_chunk::<8>()?),
            _ => return None,
        })
    }

    #[inline]
    fn bool(&mut self) -> Option<bool> {
        let (&m, rest) = self.cur.split_first()?;
        self.cur = rest;
        match m {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    fn ext(&mut self, ext: &mut Ext) -> Option<()> {
        let n = map_header(&mut self.cur)?;
        for _ in 0..n {
            // Key and value are read straight into the entry (see `Ext::insert_with`).
            ext.insert_with(|k, v| {
                if self.string_into(k) && self.string_into(v) {
                    Ok(())
                } else {
                    Err(())
                }
            })
            .ok()?;
        }
        Some(())
    }

    fn strs(&mut self) -> Option<Vec<Str>> {
        let (&m, rest) = self.cur.split_first()?;
        self.cur = rest;
        let n = match m {
            0x90..=0x9f => usize::from(m & 0x0f),
            0xdc => be_at(&mut self.cur, 2)?,
            0xdd => be_at(&mut self.cur, 4)?,
            _ => return None,
        };
        if n > self.cur.len() {
            return None;
        }
        let mut v = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            v.push(self.string()?);
        }
        Some(v)
    }

    fn skip(&mut self) -> Option<()> {
        // Values of the top-level map are 1 container deep.
        skip_value(&mut self.cur, 1)
    }
}

// ---- the general path's structure check ----------------------------------------------------

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
