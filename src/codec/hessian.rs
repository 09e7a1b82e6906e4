//! The Hessian 2.0 codec: the same named map as JSON, in Hessian 2.0 serialization.
//!
//! No maintained Hessian crate exists, so this module owns a minimal serde data format for
//! Hessian 2.0 (written from the Hessian 2.0 serialization spec) and the [`Hessian`] codec on
//! top of it. [`to_writer`] and [`from_slice`] are that format.
//!
//! [`Hessian`] writes the frame's map directly (`direct::write_envelope` with this module's
//! primitive writers: the same bytes as [`to_writer`] on the `Serialize` impl, which
//! [`encode_serde`] keeps as the tested reference). It decodes with the direct reader first
//! (`direct::envelope`: an untyped map `H` read key by key into the op's message, plain UTF-8
//! strings sliced from the input, the compact long forms read in place, unknown keys skipped
//! with the general path's skipper), which gives up on anything else (typed maps, objects,
//! class definitions, chunked or CESU-8 strings, dates, ...); those frames go through
//! [`decode_serde`]: [`from_slice`] into `WireIn` (see `fields.rs` and `direct.rs`).
//!
//! # Writing
//! - maps and structs: untyped map `H` (key value)* `Z`, struct keys as strings;
//! - sequences: compact fixed-length untyped list `0x78+n` (n <= 7), else `X` int-length list
//!   (`W` ... `Z` when the length is not known up front);
//! - strings: `0x00-0x1f`, `0x30-0x33`, `S`, with `R` non-final chunks past 65535 UTF-16 units.
//!   Lengths count UTF-16 units and characters outside the BMP are written as a surrogate pair
//!   of two 3-byte sequences (CESU-8), as Java's Hessian and hessian.js write and require;
//!   chunks never split a pair;
//! - every integer (all our ids, sequences and timestamps) as a Hessian *long*, in its most
//!   compact form (`0xd8-0xef`, `0xf0-0xff`, `0x38-0x3f`, `0x59`, `L`): the Java side uses `long`
//!   for them. A `u64` above `i64::MAX` cannot be represented: [`EncodeError::TooLarge`];
//! - `bool` as `T`/`F`, `None` and unit as `N`, doubles in the compact integral forms or `D`
//!   (never `0x5f`, whose meaning differs between the spec and the implementations, see below).
//!
//! # Reading
//! Everything the grammar allows except references: null, booleans, int and long in every form
//! (both are accepted for any integer field), doubles, dates (visited as `i64` milliseconds),
//! strings in every form and chunking, binary (visited as bytes), untyped and typed maps (the
//! type is skipped), fixed and variable, typed and untyped lists, and class definitions with
//! objects (`C`, `O`, `0x60-0x6f`), which are read as maps from field name to value so a Java
//! client may send a plain object. A double is never accepted for an integer field (hessian.js
//! writes integral numbers as int or long, see `tests/hessian_interop.rs`). Deliberate choices:
//! - `0x5f b3..b0` is read as an `int` count of thousandths (`0.001 * n`), as Java's
//!   `Hessian2Input` and hessian.js read and write it; the spec text calls it a 32-bit float.
//! - Refs (`Q`) are refused: our messages are trees, never object graphs.
//! - Strings may hold standard 4-byte UTF-8 sequences (counting two units) or CESU-8 surrogate
//!   pairs (also across chunks); a lone or reversed surrogate is [`DecodeError::InvalidUtf8`].
//! - At most [`MAX_CLASSES`] class definitions with [`MAX_CLASS_FIELDS`] field names in all.
//!
//! Hostile input: every declared length or count is checked against the bytes left before
//! anything is allocated (a string of n units needs at least n bytes, a list of n elements at
//! least n bytes), so memory stays a small multiple of the input; containers nest at most
//! [`MAX_DEPTH`] deep (skipped values included); skipping an unknown field allocates nothing
//! except for class definitions, which later objects may use; trailing bytes after the
//! top-level value are malformed. No input makes the decoder panic.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, Serialize};
use serde::Deserialize;

use super::direct::{self, MapSink, MapSource};
use super::fields::{finish, OpOnly, WireIn};
use super::out::Sink;
use super::text::{ascii_str, share_str};
use super::{Codec, CodecId, DecodeError, EncodeError, MAX_DEPTH};
use crate::protocol::{Envelope, Ext, Str};

const CODEC: &str = "hessian";

/// Most class definitions one payload may declare.
pub const MAX_CLASSES: usize = 64;
/// Most field names all class definitions of one payload may declare together.
pub const MAX_CLASS_FIELDS: usize = 1024;

/// Longest string or binary chunk, in UTF-16 units or bytes (the 16-bit chunk length).
const MAX_CHUNK: usize = 0xffff;

/// Hessian 2.0 encoding; travels in WebSocket binary frames.
pub struct Hessian;

impl Codec for Hessian {
    const ID: CodecId = CodecId::Hessian;

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

/// Encodes through the serde data format ([`to_writer`]) and the `Serialize` impl: the
/// reference [`Hessian::encode`] is tested against.
pub fn encode_serde(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    to_writer(env, out)
}

/// The general decoding path ([`from_slice`] into `WireIn`); it decides every frame the
/// direct reader gives up on, and the tests compare the two.
pub fn decode_serde(bytes: &Bytes) -> Result<Envelope, DecodeError> {
    finish(bytes, from_slice::<WireIn>(bytes), || {
        from_slice::<OpOnly>(bytes).ok()
    })
}

/// Appends the Hessian 2.0 encoding of `value` to `out`. On error `out` is left as it was.
pub fn to_writer<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let mut ser = Ser { out };
    match value.serialize(&mut ser) {
        Ok(()) => Ok(()),
        Err(SerError(e)) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Decodes exactly one Hessian 2.0 value from `bytes`; bytes after it are an error.
pub fn from_slice<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, DecodeError> {
    let mut de = De::new(bytes);
    let value = T::deserialize(&mut de).map_err(|e| e.0)?;
    if de.pos != bytes.len() {
        return Err(DecodeError::malformed(
            CODEC,
            "trailing bytes after the value",
        ));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Primitive writers
// ---------------------------------------------------------------------------------------------

/// Writes a Hessian `int` in its most compact form.
fn write_int<S: Sink + ?Sized>(out: &mut S, v: i32) {
    match v {
        -0x10..=0x2f => out.put((0x90 + v) as u8),
        -0x800..=0x7ff => out.put_slice(&[(0xc8 + (v >> 8)) as u8, v as u8]),
        -0x40000..=0x3ffff => out.put_slice(&[(0xd4 + (v >> 16)) as u8, (v >> 8) as u8, v as u8]),
        _ => {
            out.put(b'I');
            out.put_slice(&v.to_be_bytes());
        }
    }
}

/// Writes a Hessian `long` in its most compact form.
fn write_long<S: Sink + ?Sized>(out: &mut S, v: i64) {
    match v {
        -0x08..=0x0f => out.put((0xe0 + v) as u8),
        -0x800..=0x7ff => out.put_slice(&[(0xf8 + (v >> 8)) as u8, v as u8]),
        -0x40000..=0x3ffff => out.put_slice(&[(0x3c + (v >> 16)) as u8, (v >> 8) as u8, v as u8]),
        _ => match i32::try_from(v) {
            Ok(v32) => {
                out.put(0x59);
                out.put_slice(&v32.to_be_bytes());
            }
            Err(_) => {
                out.put(b'L');
                out.put_slice(&v.to_be_bytes());
            }
        },
    }
}

/// Writes a Hessian `double`: the compact forms for integral values, else `D`.
fn write_double(out: &mut Vec<u8>, v: f64) {
    let integral = v.is_finite() && v.fract() == 0.0 && !(v == 0.0 && v.is_sign_negative());
    if integral && (-32768.0..=32767.0).contains(&v) {
        // In range and integral: the casts are exact.
        let n = v as i16;
        match n {
            0 => out.push(0x5b),
            1 => out.push(0x5c),
            -128..=127 => out.extend_from_slice(&[0x5d, n as u8]),
            _ => {
                out.push(0x5e);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    } else {
        out.push(b'D');
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Number of UTF-16 code units in `s` (Hessian's string length).
fn utf16_len(s: &str) -> usize {
    // Every char starts with a non-continuation byte; 4-byte sequences (lead 0xf0..) are pairs.
    s.bytes().filter(|b| b & 0xc0 != 0x80).count() + s.bytes().filter(|b| *b >= 0xf0).count()
}

/// Writes `s` as Hessian's UTF-8: BMP characters as in UTF-8, others as a CESU-8 pair.
fn write_utf8<S: Sink + ?Sized>(out: &mut S, s: &str) {
    if s.bytes().all(|b| b < 0xf0) {
        out.put_slice(s.as_bytes());
        return;
    }
    for c in s.chars() {
        if c.len_utf16() == 1 {
            let mut buf = [0u8; 4];
            out.put_slice(c.encode_utf8(&mut buf).as_bytes());
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.put_slice(&[
                    0xe0 | (*u >> 12) as u8,
                    0x80 | ((*u >> 6) & 0x3f) as u8,
                    0x80 | (*u & 0x3f) as u8,
                ]);
            }
        }
    }
}

/// Writes a Hessian `string`, chunked past [`MAX_CHUNK`] units without splitting a pair.
fn write_string<S: Sink + ?Sized>(out: &mut S, s: &str) {
    if s.len() <= 0x3ff && s.is_ascii() {
        // One unit per byte, one chunk: what the general code below writes, without its
        // passes over the characters.
        let units = s.len();
        if units <= 0x1f {
            out.put(units as u8);
        } else {
            out.put_slice(&[0x30 + (units >> 8) as u8, units as u8]);
        }
        out.put_slice(s.as_bytes());
        return;
    }
    write_string_general(out, s);
}

/// [`write_string`] for strings that are not short ASCII.
#[inline(never)]
fn write_string_general<S: Sink + ?Sized>(out: &mut S, s: &str) {
    let mut rest = s;
    let mut units = utf16_len(s);
    while units > MAX_CHUNK {
        let mut n = 0usize;
        let mut end = 0usize;
        for (i, c) in rest.char_indices() {
            if n + c.len_utf16() > MAX_CHUNK {
                break;
            }
            n += c.len_utf16();
            end = i + c.len_utf8();
        }
        out.put(b'R');
        // n <= MAX_CHUNK (0xffff), so it fits 16 bits.
        out.put_slice(&(n as u16).to_be_bytes());
        // `end` is a char boundary: it comes from `char_indices`.
        write_utf8(out, &rest[..end]);
        rest = &rest[end..];
        units -= n;
    }
    match units {
        0..=0x1f => out.put(units as u8),
        0x20..=0x3ff => out.put_slice(&[0x30 + (units >> 8) as u8, units as u8]),
        _ => {
            out.put(b'S');
            // units <= MAX_CHUNK here (the loop above ran until it was).
            out.put_slice(&(units as u16).to_be_bytes());
        }
    }
    write_utf8(out, rest);
}

/// Writes Hessian `binary`, chunked past [`MAX_CHUNK`] bytes.
fn write_binary(out: &mut Vec<u8>, mut b: &[u8]) {
    while b.len() > MAX_CHUNK {
        out.push(b'A');
        out.extend_from_slice(&(MAX_CHUNK as u16).to_be_bytes());
        out.extend_from_slice(&b[..MAX_CHUNK]);
        b = &b[MAX_CHUNK..];
    }
    let n = b.len();
    match n {
        0..=0x0f => out.push(0x20 + n as u8),
        0x10..=0x3ff => out.extend_from_slice(&[0x34 + (n >> 8) as u8, n as u8]),
        _ => {
            out.push(b'B');
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(b);
}

// ---------------------------------------------------------------------------------------------
// Serializer
// ---------------------------------------------------------------------------------------------

/// A serde error carrying an [`EncodeError`].
#[derive(Debug)]
struct SerError(EncodeError);

impl fmt::Display for SerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SerError {}

impl ser::Error for SerError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        SerError(EncodeError::Format {
            codec: CODEC,
            detail: msg.to_string(),
        })
    }
}

struct Ser<'a> {
    out: &'a mut Vec<u8>,
}

impl Ser<'_> {
    /// Starts a list; `true` if it needs a closing `Z`.
    fn list_start(&mut self, len: Option<usize>) -> Result<bool, SerError> {
        match len {
            Some(n) if n <= 7 => {
                self.out.push(0x78 + n as u8);
                Ok(false)
            }
            Some(n) => {
                let n = i32::try_from(n).map_err(|_| SerError(EncodeError::TooLarge))?;
                self.out.push(b'X');
                write_int(self.out, n);
                Ok(false)
            }
            None => {
                self.out.push(b'W');
                Ok(true)
            }
        }
    }
}

/// A list or map being written; `closes` is the number of `Z` markers its end writes.
struct Compound<'a, 'b> {
    ser: &'b mut Ser<'a>,
    closes: usize,
}

impl Compound<'_, '_> {
    fn finish(self) -> Result<(), SerError> {
        for _ in 0..self.closes {
            self.ser.out.push(b'Z');
        }
        Ok(())
    }
}

impl<'a, 'b> ser::Serializer for &'b mut Ser<'a> {
    type Ok = ();
    type Error = SerError;
    type SerializeSeq = Compound<'a, 'b>;
    type SerializeTuple = Compound<'a, 'b>;
    type SerializeTupleStruct = Compound<'a, 'b>;
    type SerializeTupleVariant = Compound<'a, 'b>;
    type SerializeMap = Compound<'a, 'b>;
    type SerializeStruct = Compound<'a, 'b>;
    type SerializeStructVariant = Compound<'a, 'b>;

    fn serialize_bool(self, v: bool) -> Result<(), SerError> {
        self.out.push(if v { b'T' } else { b'F' });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result<(), SerError> {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i16(self, v: i16) -> Result<(), SerError> {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i32(self, v: i32) -> Result<(), SerError> {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i64(self, v: i64) -> Result<(), SerError> {
        write_long(self.out, v);
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result<(), SerError> {
        let v = i64::try_from(v).map_err(|_| SerError(EncodeError::TooLarge))?;
        self.serialize_i64(v)
    }

    fn serialize_u8(self, v: u8) -> Result<(), SerError> {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_u16(self, v: u16) -> Result<(), SerError> {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_u32(self, v: u32) -> Result<(), SerError> {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_u64(self, v: u64) -> Result<(), SerError> {
        let v = i64::try_from(v).map_err(|_| SerError(EncodeError::TooLarge))?;
        self.serialize_i64(v)
    }

    fn serialize_u128(self, v: u128) -> Result<(), SerError> {
        let v = i64::try_from(v).map_err(|_| SerError(EncodeError::TooLarge))?;
        self.serialize_i64(v)
    }

    fn serialize_f32(self, v: f32) -> Result<(), SerError> {
        self.serialize_f64(f64::from(v))
    }

    fn serialize_f64(self, v: f64) -> Result<(), SerError> {
        write_double(self.out, v);
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), SerError> {
        let mut buf = [0u8; 4];
        self.serialize_str(v.encode_utf8(&mut buf))
    }

    fn serialize_str(self, v: &str) -> Result<(), SerError> {
        write_string(self.out, v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), SerError> {
        write_binary(self.out, v);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), SerError> {
        self.out.push(b'N');
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), SerError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), SerError> {
        self.serialize_none()
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), SerError> {
        self.serialize_none()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), SerError> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), SerError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), SerError> {
        self.out.push(b'H');
        write_string(self.out, variant);
        value.serialize(&mut *self)?;
        self.out.push(b'Z');
        Ok(())
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Compound<'a, 'b>, SerError> {
        let closes = usize::from(self.list_start(len)?);
        Ok(Compound { ser: self, closes })
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'a, 'b>, SerError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Compound<'a, 'b>, SerError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'a, 'b>, SerError> {
        self.out.push(b'H');
        write_string(self.out, variant);
        let closes = 1 + usize::from(self.list_start(Some(len))?);
        Ok(Compound { ser: self, closes })
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a, 'b>, SerError> {
        self.out.push(b'H');
        Ok(Compound {
            ser: self,
            closes: 1,
        })
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>, SerError> {
        self.serialize_map(None)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>, SerError> {
        self.out.push(b'H');
        write_string(self.out, variant);
        self.out.push(b'H');
        Ok(Compound {
            ser: self,
            closes: 2,
        })
    }
}

impl ser::SerializeSeq for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

impl ser::SerializeTuple for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), SerError> {
        key.serialize(&mut *self.ser)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

impl ser::SerializeStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerError> {
        write_string(self.ser.out, key);
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = SerError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerError> {
        write_string(self.ser.out, key);
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<(), SerError> {
        self.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Direct writer and reader of the frame's map (see `direct.rs`)
// ---------------------------------------------------------------------------------------------

/// Writes the frame's map with the same forms as [`to_writer`] (property-tested).
struct Writer<'a, S: Sink> {
    out: &'a mut S,
}

impl<S: Sink> MapSink for Writer<'_, S> {
    #[inline]
    fn map(&mut self, _entries: usize) -> Result<(), EncodeError> {
        self.out.put(b'H');
        Ok(())
    }

    #[inline]
    fn end_map(&mut self) {
        self.out.put(b'Z');
    }

    #[inline]
    fn key(&mut self, key: &'static str) {
        // Our field names are ASCII and shorter than 32 bytes: a one-byte length.
        debug_assert!(key.len() <= 0x1f && key.is_ascii());
        self.out.put(key.len() as u8);
        self.out.put_slice(key.as_bytes());
    }

    #[inline]
    fn str(&mut self, s: &str) -> Result<(), EncodeError> {
        write_string(self.out, s);
        Ok(())
    }

    #[inline]
    fn uint(&mut self, v: u64) -> Result<(), EncodeError> {
        let v = i64::try_from(v).map_err(|_| EncodeError::TooLarge)?;
        write_long(self.out, v);
        Ok(())
    }

    #[inline]
    fn bool(&mut self, v: bool) {
        self.out.put(if v { b'T' } else { b'F' });
    }

    fn strs(&mut self, items: &[Str]) -> Result<(), EncodeError> {
        let n = items.len();
        if n <= 7 {
            self.out.put(0x78 + n as u8);
        } else {
            let n = i32::try_from(n).map_err(|_| EncodeError::TooLarge)?;
            self.out.put(b'X');
            write_int(self.out, n);
        }
        for s in items {
            write_string(self.out, s);
        }
        Ok(())
    }
}

/// The direct reader's attempt: the envelope, or `None` to leave the frame to
/// [`decode_serde`]. Only an untyped map (`H`) at the top, untyped maps and lists inside, and
/// single-chunk strings that are plain UTF-8 are read; the rest gives up.
#[inline(always)]
fn decode_direct(bytes: &Bytes, env: &mut Envelope) -> Option<()> {
    let mut r = Direct {
        de: De::new(bytes),
        src: bytes,
    };
    if r.de.next().ok()? != b'H' {
        return None;
    }
    // Inside the top-level map, as the general path's `visit_map` would be.
    r.de.depth = 1;
    direct::envelope(&mut r, |r| r.de.pos == r.de.input.len(), env)
}

struct Direct<'a, 'de> {
    de: De<'de>,
    src: &'a Bytes,
}

impl<'de> Direct<'_, 'de> {
    /// A string that is one final chunk of plain UTF-8 (no CESU-8 surrogate pairs), as the
    /// input's bytes. Lengths count UTF-16 units: one per character, two for a 4-byte one.
    #[inline]
    fn plain(&mut self) -> Option<&'de str> {
        let input = self.de.input;
        let rest = input.get(self.de.pos..)?;
        let (units, header) = match *rest {
            [tag @ 0x00..=0x1f, ..] => (usize::from(tag), 1),
            [tag @ 0x30..=0x33, b0, ..] => ((usize::from(tag - 0x30) << 8) + usize::from(b0), 2),
            [b'S', b1, b0, ..] => (usize::from(u16::from_be_bytes([b1, b0])), 3),
            _ => return None,
        };
        let start = self.de.pos + header;
        self.de.pos = start;
        if let Some(s) = input.get(start..start + units).and_then(ascii_str) {
            self.de.pos = start + units;
            return Some(s);
        }
        // Not all ASCII: walk the characters to find the end.
        let mut end = start;
        let mut left = units;
        while left > 0 {
            let (width, n) = match *input.get(end)? {
                0x00..=0x7f => (1, 1),
                0xc0..=0xdf => (2, 1),
                0xe0..=0xef => (3, 1),
                0xf0..=0xf7 => (4, 2),
                _ => return None,
            };
            if n > left {
                return None;
            }
            end += width;
            left -= n;
        }
        // Surrogates (CESU-8) are not UTF-8: such strings are left to the general path.
        let s = std::str::from_utf8(input.get(start..end)?).ok()?;
        self.de.pos = end;
        Some(s)
    }

    /// [`MapSource::uint`] for the other int and long forms.
    fn uint_other(&mut self) -> Option<u64> {
        let tag = self.de.next().ok()?;
        let v = if is_int_tag(tag) {
            i64::from(self.de.int_body(tag).ok()?)
        } else if is_long_tag(tag) {
            self.de.long_body(tag).ok()?
        } else {
            return None;
        };
        u64::try_from(v).ok()
    }
}

/// A key of the top-level map, first taken as `units` ASCII bytes from `start`: if it is one
/// of our names it is exactly that; otherwise [`MapSource::unknown_key`] reads it properly.
struct Key<'de> {
    bytes: &'de [u8],
    start: usize,
    units: usize,
}

impl AsRef<[u8]> for Key<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes
    }
}

impl<'de> MapSource for Direct<'_, 'de> {
    fn nested(&mut self, mut entry: impl FnMut(&mut Self, &[u8]) -> Option<bool>) -> Option<()> {
        if self.de.next().ok()? != b'H' {
            return None;
        }
        self.de.enter().ok()?;
        loop {
            if self.de.peek().ok()? == b'Z' {
                self.de.pos += 1;
                break;
            }
            let key = self.plain()?;
            if !entry(self, key.as_bytes())? {
                self.de.skip_value().ok()?;
            }
        }
        self.de.leave();
        Some(())
    }

    type Key = Key<'de>;

    #[inline]
    fn key(&mut self) -> Option<Option<Key<'de>>> {
        let input = self.de.input;
        let rest = input.get(self.de.pos..)?;
        let (units, header) = match *rest {
            [b'Z', ..] => {
                self.de.pos += 1;
                return Some(None);
            }
            [len @ 0x00..=0x1f, ..] => (usize::from(len), 1),
            // Longer keys are none of ours: read them properly.
            _ => {
                let start = self.de.pos;
                let k = self.plain()?.as_bytes();
                return Some(Some(Key {
                    bytes: k,
                    start,
                    units: usize::MAX,
                }));
            }
        };
        let start = self.de.pos + header;
        let bytes = input.get(start..start + units)?;
        self.de.pos = start + units;
        Some(Some(Key {
            bytes,
            start,
            units,
        }))
    }

    #[inline(always)]
    fn expect_key(&mut self, key: &'static [u8]) -> bool {
        // Our names are ASCII strings of fewer than 32 units: the length, then the bytes.
        let pos = self.de.pos;
        match self.de.input.get(pos..) {
            Some([len, rest @ ..]) if usize::from(*len) == key.len() && rest.starts_with(key) => {
                self.de.pos = pos + 1 + key.len();
                true
            }
            _ => false,
        }
    }

    fn unknown_key(&mut self, key: &Key<'de>) -> Option<()> {
        if key.units == usize::MAX || key.bytes.is_ascii() {
            // Already read as a string, or plain ASCII: one byte per unit.
            return Some(());
        }
        // Back to the string's header and read it as any value string.
        self.de.pos = key.start - 1;
        self.plain().map(drop)
    }

    #[inline]
    fn str(&mut self) -> Option<Str> {
        let s = self.plain()?;
        Some(share_str(self.src, s))
    }

    #[inline]
    fn name<T>(&mut self, f: impl FnOnce(&[u8]) -> Option<T>) -> Option<T> {
        f(self.plain()?.as_bytes())
    }

    #[inline]
    fn uint(&mut self) -> Option<u64> {
        let rest = self.de.input.get(self.de.pos..)?;
        // The forms our encoder writes (non-negative longs), read in place.
        let (v, n) = match *rest {
            [t @ 0xe0..=0xef, ..] => (u64::from(t - 0xe0), 1),
            [t @ 0xf8..=0xff, b0, ..] => ((u64::from(t - 0xf8) << 8) | u64::from(b0), 2),
            [t @ 0x3c..=0x3f, b1, b0, ..] => (
                (u64::from(t - 0x3c) << 16) | (u64::from(b1) << 8) | u64::from(b0),
                3,
            ),
            [0x59, b3, b2, b1, b0, ..] => {
                (u64::try_from(i32::from_be_bytes([b3, b2, b1, b0])).ok()?, 5)
            }
            [b'L', b7, b6, b5, b4, b3, b2, b1, b0, ..] => (
                u64::try_from(i64::from_be_bytes([b7, b6, b5, b4, b3, b2, b1, b0])).ok()?,
                9,
            ),
            _ => return self.uint_other(),
        };
        self.de.pos += n;
        Some(v)
    }

    #[inline]
    fn bool(&mut self) -> Option<bool> {
        match self.de.next().ok()? {
            b'T' => Some(true),
            b'F' => Some(false),
            _ => None,
        }
    }

    fn ext(&mut self, ext: &mut Ext) -> Option<()> {
        if self.de.next().ok()? != b'H' {
            return None;
        }
        self.de.enter().ok()?;
        loop {
            if self.de.peek().ok()? == b'Z' {
                self.de.pos += 1;
                break;
            }
            let k = self.str()?;
            let v = self.str()?;
            ext.insert(k, v);
        }
        self.de.leave();
        Some(())
    }

    fn strs(&mut self) -> Option<Vec<Str>> {
        let tag = self.de.next().ok()?;
        let len = match tag {
            0x78..=0x7f => Some(usize::from(tag - 0x78)),
            b'X' => Some(self.de.read_count().ok()?),
            b'W' => None,
            _ => return None,
        };
        if let Some(n) = len {
            self.de.check_declared(n).ok()?;
        }
        self.de.enter().ok()?;
        let mut v = Vec::new();
        match len {
            Some(n) => {
                for _ in 0..n {
                    v.push(self.str()?);
                }
            }
            None => loop {
                if self.de.peek().ok()? == b'Z' {
                    self.de.pos += 1;
                    break;
                }
                v.push(self.str()?);
            },
        }
        self.de.leave();
        Some(v)
    }

    fn skip(&mut self) -> Option<()> {
        self.de.skip_value().ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Deserializer
// ---------------------------------------------------------------------------------------------

/// A serde error carrying a [`DecodeError`].
#[derive(Debug)]
struct DeError(DecodeError);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(DecodeError::malformed(CODEC, msg))
    }
}

impl From<DecodeError> for DeError {
    fn from(e: DecodeError) -> Self {
        DeError(e)
    }
}

fn malformed(detail: impl fmt::Display) -> DeError {
    DeError(DecodeError::malformed(CODEC, detail))
}

type Res<T> = Result<T, DeError>;

fn is_string_tag(tag: u8) -> bool {
    matches!(tag, 0x00..=0x1f | 0x30..=0x33 | b'R' | b'S')
}

fn is_binary_tag(tag: u8) -> bool {
    matches!(tag, 0x20..=0x2f | 0x34..=0x37 | b'A' | b'B')
}

fn is_int_tag(tag: u8) -> bool {
    matches!(tag, 0x80..=0xd7 | b'I')
}

fn is_long_tag(tag: u8) -> bool {
    matches!(tag, 0xd8..=0xff | 0x38..=0x3f | 0x59 | b'L')
}

fn is_list_tag(tag: u8) -> bool {
    matches!(tag, 0x55..=0x58 | 0x70..=0x7f)
}

fn is_object_tag(tag: u8) -> bool {
    matches!(tag, b'O' | 0x60..=0x6f)
}

/// A class definition: the field names of the objects that refer to it.
struct ClassDef<'de> {
    fields: Vec<Cow<'de, str>>,
}

struct De<'de> {
    input: &'de [u8],
    pos: usize,
    depth: usize,
    classes: Vec<ClassDef<'de>>,
    class_fields: usize,
}

impl<'de> De<'de> {
    fn new(input: &'de [u8]) -> Self {
        De {
            input,
            pos: 0,
            depth: 0,
            classes: Vec::new(),
            class_fields: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    fn peek(&self) -> Res<u8> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(DeError(DecodeError::Truncated))
    }

    fn next(&mut self) -> Res<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    /// The next `n` bytes of a fixed-width field.
    fn take(&mut self, n: usize) -> Res<&'de [u8]> {
        if n > self.remaining() {
            return Err(DeError(DecodeError::Truncated));
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// Refuses a declared length or count that the bytes left could not hold.
    fn check_declared(&self, declared: usize) -> Res<()> {
        let remaining = self.remaining();
        if declared > remaining {
            return Err(DeError(DecodeError::LengthLies {
                declared: declared as u64,
                remaining: remaining as u64,
            }));
        }
        Ok(())
    }

    fn enter(&mut self) -> Res<()> {
        if self.depth >= MAX_DEPTH {
            return Err(DeError(DecodeError::TooDeep));
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    // --- numbers ---

    /// The body of an `int` whose tag was consumed.
    fn int_body(&mut self, tag: u8) -> Res<i32> {
        let t = i32::from(tag);
        Ok(match tag {
            0x80..=0xbf => t - 0x90,
            0xc0..=0xcf => ((t - 0xc8) << 8) + i32::from(self.next()?),
            0xd0..=0xd7 => {
                let [b1, b0] = self.take_array()?;
                ((t - 0xd4) << 16) + (i32::from(b1) << 8) + i32::from(b0)
            }
            b'I' => i32::from_be_bytes(self.take_array()?),
            _ => return Err(malformed(format_args!("tag {tag:#04x} is not an int"))),
        })
    }

    /// The body of a `long` whose tag was consumed.
    fn long_body(&mut self, tag: u8) -> Res<i64> {
        let t = i64::from(tag);
        Ok(match tag {
            0xd8..=0xef => t - 0xe0,
            0xf0..=0xff => ((t - 0xf8) << 8) + i64::from(self.next()?),
            0x38..=0x3f => {
                let [b1, b0] = self.take_array()?;
                ((t - 0x3c) << 16) + (i64::from(b1) << 8) + i64::from(b0)
            }
            0x59 => i64::from(i32::from_be_bytes(self.take_array()?)),
            b'L' => i64::from_be_bytes(self.take_array()?),
            _ => return Err(malformed(format_args!("tag {tag:#04x} is not a long"))),
        })
    }

    /// The body of a `double` whose tag was consumed.
    fn double_body(&mut self, tag: u8) -> Res<f64> {
        Ok(match tag {
            0x5b => 0.0,
            0x5c => 1.0,
            0x5d => f64::from(i8::from_be_bytes(self.take_array()?)),
            0x5e => f64::from(i16::from_be_bytes(self.take_array()?)),
            // Thousandths, as Java's Hessian2Input and hessian.js read it (module doc).
            0x5f => 0.001 * f64::from(i32::from_be_bytes(self.take_array()?)),
            b'D' => f64::from_be_bytes(self.take_array()?),
            _ => return Err(malformed(format_args!("tag {tag:#04x} is not a double"))),
        })
    }

    /// The body of a `date` whose tag was consumed, in milliseconds since the epoch.
    fn date_body(&mut self, tag: u8) -> Res<i64> {
        Ok(match tag {
            0x4a => i64::from_be_bytes(self.take_array()?),
            // Minutes; i32::MAX * 60000 fits an i64.
            0x4b => i64::from(i32::from_be_bytes(self.take_array()?)) * 60_000,
            _ => return Err(malformed(format_args!("tag {tag:#04x} is not a date"))),
        })
    }

    /// Reads an int or long value used as a length, count or reference number.
    fn read_count(&mut self) -> Res<usize> {
        let tag = self.next()?;
        let v = if is_int_tag(tag) {
            i64::from(self.int_body(tag)?)
        } else if is_long_tag(tag) {
            self.long_body(tag)?
        } else {
            return Err(malformed(format_args!(
                "expected an int, found tag {tag:#04x}"
            )));
        };
        usize::try_from(v).map_err(|_| malformed(format_args!("negative length {v}")))
    }

    // --- strings and binary ---

    /// Length in units of the string chunk whose tag was consumed, and whether it is final.
    fn string_chunk(&mut self, tag: u8) -> Res<(usize, bool)> {
        let (len, last) = match tag {
            0x00..=0x1f => (usize::from(tag), true),
            0x30..=0x33 => (
                (usize::from(tag - 0x30) << 8) + usize::from(self.next()?),
                true,
            ),
            b'S' | b'R' => (
                usize::from(u16::from_be_bytes(self.take_array()?)),
                tag == b'S',
            ),
            _ => {
                return Err(malformed(format_args!(
                    "expected a string chunk, found tag {tag:#04x}"
                )))
            }
        };
        // Every UTF-16 unit takes at least one byte.
        self.check_declared(len)?;
        Ok((len, last))
    }

    /// Reads `units` UTF-16 units of Hessian UTF-8, appending them to `out` if given.
    /// `pending` carries a high surrogate across chunks. Returns whether the bytes were plain
    /// UTF-8 (no CESU-8 surrogate sequence), i.e. can be borrowed as they are.
    fn utf8_units(
        &mut self,
        units: usize,
        mut out: Option<&mut String>,
        pending: &mut Option<u32>,
    ) -> Res<bool> {
        let bad = || DeError(DecodeError::InvalidUtf8);
        let mut left = units;
        let mut plain = true;
        while left > 0 {
            let b0 = self.next()?;
            if b0 < 0x80 {
                if pending.is_some() {
                    return Err(bad());
                }
                if let Some(s) = out.as_deref_mut() {
                    s.push(char::from(b0));
                }
                left -= 1;
                continue;
            }
            let (lead, extra) = match b0 {
                0xc2..=0xdf => (b0 & 0x1f, 1),
                0xe0..=0xef => (b0 & 0x0f, 2),
                0xf0..=0xf4 => (b0 & 0x07, 3),
                _ => return Err(bad()),
            };
            let mut cp = u32::from(lead);
            for _ in 0..extra {
                let b = self.next()?;
                if b & 0xc0 != 0x80 {
                    return Err(bad());
                }
                cp = (cp << 6) | u32::from(b & 0x3f);
            }
            let c = match extra {
                2 if cp < 0x800 => return Err(bad()),
                3 if !(0x10000..=0x10ffff).contains(&cp) => return Err(bad()),
                3 => {
                    // A standard 4-byte sequence: one character, two units.
                    if left < 2 {
                        return Err(malformed("string length splits a character"));
                    }
                    if pending.is_some() {
                        return Err(bad());
                    }
                    left -= 1;
                    cp
                }
                _ if (0xd800..=0xdbff).contains(&cp) => {
                    if pending.replace(cp).is_some() {
                        return Err(bad());
                    }
                    plain = false;
                    left -= 1;
                    continue;
                }
                _ if (0xdc00..=0xdfff).contains(&cp) => {
                    let high = pending.take().ok_or_else(bad)?;
                    plain = false;
                    0x10000 + ((high - 0xd800) << 10) + (cp - 0xdc00)
                }
                _ => {
                    if pending.is_some() {
                        return Err(bad());
                    }
                    cp
                }
            };
            if let Some(s) = out.as_deref_mut() {
                s.push(char::from_u32(c).ok_or_else(bad)?);
            }
            left -= 1;
        }
        Ok(plain)
    }

    /// Reads the string whose first tag was consumed. With `keep == false` it is validated and
    /// skipped without allocating (the result is then empty).
    fn string_body(&mut self, tag: u8, keep: bool) -> Res<Cow<'de, str>> {
        let bad = || DeError(DecodeError::InvalidUtf8);
        let (mut units, mut last) = self.string_chunk(tag)?;
        let mut pending = None;
        if last {
            let start = self.pos;
            let plain = self.utf8_units(units, None, &mut pending)?;
            if pending.is_some() {
                return Err(bad());
            }
            if !keep {
                return Ok(Cow::Borrowed(""));
            }
            let bytes = &self.input[start..self.pos];
            if plain {
                return std::str::from_utf8(bytes)
                    .map(Cow::Borrowed)
                    .map_err(|_| bad());
            }
            let end = self.pos;
            self.pos = start;
            let mut s = String::with_capacity(bytes.len());
            self.utf8_units(units, Some(&mut s), &mut pending)?;
            debug_assert_eq!(self.pos, end);
            return Ok(Cow::Owned(s));
        }
        let mut s = String::new();
        loop {
            self.utf8_units(units, keep.then_some(&mut s), &mut pending)?;
            if last {
                break;
            }
            let tag = self.next()?;
            if !is_string_tag(tag) {
                return Err(malformed("string chunk expected after `R`"));
            }
            (units, last) = self.string_chunk(tag)?;
        }
        if pending.is_some() {
            return Err(bad());
        }
        Ok(Cow::Owned(s))
    }

    /// Length of the binary chunk whose tag was consumed, and whether it is final.
    fn binary_chunk(&mut self, tag: u8) -> Res<(usize, bool)> {
        let (len, last) = match tag {
            0x20..=0x2f => (usize::from(tag - 0x20), true),
            0x34..=0x37 => (
                (usize::from(tag - 0x34) << 8) + usize::from(self.next()?),
                true,
            ),
            b'A' | b'B' => (
                usize::from(u16::from_be_bytes(self.take_array()?)),
                tag == b'B',
            ),
            _ => {
                return Err(malformed(format_args!(
                    "expected a binary chunk, found tag {tag:#04x}"
                )))
            }
        };
        self.check_declared(len)?;
        Ok((len, last))
    }

    /// Reads the binary whose first tag was consumed (copied only when chunked and `keep`).
    fn binary_body(&mut self, tag: u8, keep: bool) -> Res<Cow<'de, [u8]>> {
        let (mut len, mut last) = self.binary_chunk(tag)?;
        if last {
            return self.take(len).map(Cow::Borrowed);
        }
        let mut v = Vec::new();
        loop {
            let chunk = self.take(len)?;
            if keep {
                v.extend_from_slice(chunk);
            }
            if last {
                break;
            }
            let tag = self.next()?;
            if !is_binary_tag(tag) {
                return Err(malformed("binary chunk expected after `A`"));
            }
            (len, last) = self.binary_chunk(tag)?;
        }
        Ok(Cow::Owned(v))
    }

    // --- types, lists, classes ---

    /// Skips the `type` of a typed list or map: a type string or a type-reference int.
    fn skip_type(&mut self) -> Res<()> {
        let tag = self.peek()?;
        if is_string_tag(tag) {
            self.pos += 1;
            self.string_body(tag, false).map(drop)
        } else if is_int_tag(tag) || is_long_tag(tag) {
            self.read_count().map(drop)
        } else {
            Err(malformed(format_args!(
                "expected a type, found tag {tag:#04x}"
            )))
        }
    }

    /// Reads the header of the list whose tag was consumed: its length, or `None` for a
    /// variable-length list ended by `Z`.
    fn list_header(&mut self, tag: u8) -> Res<Option<usize>> {
        let len = match tag {
            0x55 => {
                self.skip_type()?;
                None
            }
            b'V' => {
                self.skip_type()?;
                Some(self.read_count()?)
            }
            b'W' => None,
            b'X' => Some(self.read_count()?),
            0x70..=0x77 => {
                self.skip_type()?;
                Some(usize::from(tag - 0x70))
            }
            0x78..=0x7f => Some(usize::from(tag - 0x78)),
            _ => return Err(malformed(format_args!("tag {tag:#04x} is not a list"))),
        };
        if let Some(n) = len {
            // Every element takes at least one byte.
            self.check_declared(n)?;
        }
        Ok(len)
    }

    /// Reads a class definition whose `C` was consumed and registers it.
    fn class_def(&mut self) -> Res<()> {
        if self.classes.len() >= MAX_CLASSES {
            return Err(malformed("too many class definitions"));
        }
        let tag = self.next()?;
        if !is_string_tag(tag) {
            return Err(malformed("class definition without a type name"));
        }
        self.string_body(tag, false)?;
        let n = self.read_count()?;
        self.check_declared(n)?;
        if n > MAX_CLASS_FIELDS - self.class_fields {
            return Err(malformed("too many class fields"));
        }
        self.class_fields += n;
        let mut fields = Vec::with_capacity(n);
        for _ in 0..n {
            let tag = self.next()?;
            if !is_string_tag(tag) {
                return Err(malformed("class field name is not a string"));
            }
            fields.push(self.string_body(tag, true)?);
        }
        self.classes.push(ClassDef { fields });
        Ok(())
    }

    /// Reads any class definitions before the next value.
    fn class_defs(&mut self) -> Res<()> {
        while self.peek()? == b'C' {
            self.pos += 1;
            self.class_def()?;
        }
        Ok(())
    }

    /// Reads the header of the object whose tag was consumed: its class and field count.
    fn object_header(&mut self, tag: u8) -> Res<(usize, usize)> {
        let class = if tag == b'O' {
            self.read_count()?
        } else {
            usize::from(tag - 0x60)
        };
        let n = self
            .classes
            .get(class)
            .ok_or_else(|| malformed(format_args!("object of undefined class {class}")))?
            .fields
            .len();
        self.check_declared(n)?;
        Ok((class, n))
    }

    /// Skips one value without allocating (except to register class definitions).
    fn skip_value(&mut self) -> Res<()> {
        self.class_defs()?;
        let tag = self.next()?;
        match tag {
            b'N' | b'T' | b'F' => Ok(()),
            _ if is_int_tag(tag) => self.int_body(tag).map(drop),
            _ if is_long_tag(tag) => self.long_body(tag).map(drop),
            0x5b..=0x5f | b'D' => self.double_body(tag).map(drop),
            0x4a | 0x4b => self.date_body(tag).map(drop),
            _ if is_string_tag(tag) => self.string_body(tag, false).map(drop),
            _ if is_binary_tag(tag) => self.binary_body(tag, false).map(drop),
            b'H' | b'M' => {
                if tag == b'M' {
                    self.skip_type()?;
                }
                self.enter()?;
                while self.peek()? != b'Z' {
                    self.skip_value()?;
                    self.skip_value()?;
                }
                self.pos += 1;
                self.leave();
                Ok(())
            }
            _ if is_list_tag(tag) => {
                let len = self.list_header(tag)?;
                self.enter()?;
                match len {
                    Some(n) => {
                        for _ in 0..n {
                            self.skip_value()?;
                        }
                    }
                    None => {
                        while self.peek()? != b'Z' {
                            self.skip_value()?;
                        }
                        self.pos += 1;
                    }
                }
                self.leave();
                Ok(())
            }
            _ if is_object_tag(tag) => {
                let (_, n) = self.object_header(tag)?;
                self.enter()?;
                for _ in 0..n {
                    self.skip_value()?;
                }
                self.leave();
                Ok(())
            }
            _ => Err(unexpected(tag)),
        }
    }

    fn visit_map<V: Visitor<'de>>(&mut self, visitor: V) -> Res<V::Value> {
        self.enter()?;
        let mut access = MapAcc {
            de: self,
            done: false,
        };
        let value = visitor.visit_map(&mut access)?;
        if !access.done {
            return Err(malformed("map has more entries than were read"));
        }
        self.leave();
        Ok(value)
    }

    fn visit_list<V: Visitor<'de>>(&mut self, len: Option<usize>, visitor: V) -> Res<V::Value> {
        self.enter()?;
        let mut access = SeqAcc {
            de: self,
            left: len,
            done: false,
        };
        let value = visitor.visit_seq(&mut access)?;
        if !(access.done || access.left == Some(0)) {
            return Err(malformed("list has more elements than were read"));
        }
        self.leave();
        Ok(value)
    }

    fn visit_object<V: Visitor<'de>>(&mut self, tag: u8, visitor: V) -> Res<V::Value> {
        let (class, n) = self.object_header(tag)?;
        self.enter()?;
        let mut access = ObjAcc {
            de: self,
            class,
            next: 0,
            count: n,
        };
        let value = visitor.visit_map(&mut access)?;
        if access.next != n {
            return Err(malformed("object has more fields than were read"));
        }
        self.leave();
        Ok(value)
    }
}

/// The error for a tag that cannot start a value.
fn unexpected(tag: u8) -> DeError {
    match tag {
        b'Q' => malformed("references (`Q`) are not supported"),
        b'Z' => malformed("unexpected end marker `Z`"),
        _ => malformed(format_args!("tag {tag:#04x} cannot start a value")),
    }
}

impl<'de> de::Deserializer<'de> for &mut De<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        self.class_defs()?;
        let tag = self.next()?;
        match tag {
            b'N' => visitor.visit_unit(),
            b'T' => visitor.visit_bool(true),
            b'F' => visitor.visit_bool(false),
            _ if is_int_tag(tag) => visitor.visit_i64(i64::from(self.int_body(tag)?)),
            _ if is_long_tag(tag) => visitor.visit_i64(self.long_body(tag)?),
            0x5b..=0x5f | b'D' => visitor.visit_f64(self.double_body(tag)?),
            0x4a | 0x4b => visitor.visit_i64(self.date_body(tag)?),
            _ if is_string_tag(tag) => match self.string_body(tag, true)? {
                Cow::Borrowed(s) => visitor.visit_borrowed_str(s),
                Cow::Owned(s) => visitor.visit_string(s),
            },
            _ if is_binary_tag(tag) => match self.binary_body(tag, true)? {
                Cow::Borrowed(b) => visitor.visit_borrowed_bytes(b),
                Cow::Owned(b) => visitor.visit_byte_buf(b),
            },
            b'H' => self.visit_map(visitor),
            b'M' => {
                self.skip_type()?;
                self.visit_map(visitor)
            }
            _ if is_list_tag(tag) => {
                let len = self.list_header(tag)?;
                self.visit_list(len, visitor)
            }
            _ if is_object_tag(tag) => self.visit_object(tag, visitor),
            _ => Err(unexpected(tag)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        self.class_defs()?;
        if self.peek()? == b'N' {
            self.pos += 1;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        self.skip_value()?;
        visitor.visit_unit()
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
        self.class_defs()?;
        let tag = self.next()?;
        if !is_string_tag(tag) {
            return Err(malformed(format_args!(
                "map key is not a string (tag {tag:#04x})"
            )));
        }
        match self.string_body(tag, true)? {
            Cow::Borrowed(s) => visitor.visit_borrowed_str(s),
            Cow::Owned(s) => visitor.visit_string(s),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Res<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Res<V::Value> {
        self.class_defs()?;
        let tag = self.next()?;
        if is_string_tag(tag) {
            // A unit variant, written as its name.
            let name = self.string_body(tag, true)?;
            return visitor.visit_enum(IntoDeserializer::<DeError>::into_deserializer(name));
        }
        if tag != b'H' {
            return Err(malformed("an enum is a variant name or a one-entry map"));
        }
        // Other variants: a one-entry map from the variant name to its content.
        self.enter()?;
        let value = visitor.visit_enum(EnumAcc { de: self })?;
        if self.next()? != b'Z' {
            return Err(malformed("an enum map has exactly one entry"));
        }
        self.leave();
        Ok(value)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct
    }
}

struct MapAcc<'a, 'de> {
    de: &'a mut De<'de>,
    done: bool,
}

impl<'de> MapAccess<'de> for MapAcc<'_, 'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Res<Option<K::Value>> {
        if self.done {
            return Ok(None);
        }
        if self.de.peek()? == b'Z' {
            self.de.pos += 1;
            self.done = true;
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Res<V::Value> {
        seed.deserialize(&mut *self.de)
    }
}

struct SeqAcc<'a, 'de> {
    de: &'a mut De<'de>,
    /// Elements left in a fixed-length list; `None` for a variable-length one.
    left: Option<usize>,
    done: bool,
}

impl<'de> SeqAccess<'de> for SeqAcc<'_, 'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Res<Option<T::Value>> {
        match self.left {
            Some(0) => return Ok(None),
            Some(n) => self.left = Some(n - 1),
            None => {
                if self.done {
                    return Ok(None);
                }
                if self.de.peek()? == b'Z' {
                    self.de.pos += 1;
                    self.done = true;
                    return Ok(None);
                }
            }
        }
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        // Checked against the bytes left before the access was made.
        self.left
    }
}

/// An object read as a map from its class's field names to its values.
struct ObjAcc<'a, 'de> {
    de: &'a mut De<'de>,
    class: usize,
    next: usize,
    count: usize,
}

impl<'de> MapAccess<'de> for ObjAcc<'_, 'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Res<Option<K::Value>> {
        if self.next == self.count {
            return Ok(None);
        }
        let name = self
            .de
            .classes
            .get(self.class)
            .and_then(|c| c.fields.get(self.next))
            .ok_or_else(|| malformed("object field out of range"))?;
        self.next += 1;
        match *name {
            Cow::Borrowed(s) => seed
                .deserialize(de::value::BorrowedStrDeserializer::<DeError>::new(s))
                .map(Some),
            Cow::Owned(ref s) => seed
                .deserialize(IntoDeserializer::<DeError>::into_deserializer(s.as_str()))
                .map(Some),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Res<V::Value> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.count - self.next)
    }
}

struct EnumAcc<'a, 'de> {
    de: &'a mut De<'de>,
}

impl<'de> de::EnumAccess<'de> for EnumAcc<'_, 'de> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Res<(V::Value, Self)> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for EnumAcc<'_, 'de> {
    type Error = DeError;

    fn unit_variant(self) -> Res<()> {
        <() as Deserialize>::deserialize(&mut *self.de)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Res<T::Value> {
        seed.deserialize(&mut *self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Res<V::Value> {
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Res<V::Value> {
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocol::{
        Ack, Deliver, Error as ErrorMsg, ErrorCode, Ext, Goaway, GroupJoin, GroupLeave, Hello,
        Limits, Message, Op, Ping, Pong, Presence, PresenceSet, PresenceSub, Resume, Send, SendAck,
        Status, Str, Sync, Synced, Target, Welcome,
    };

    fn ext(pairs: &[(&str, &str)]) -> Ext {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Every op at least once, with and without `ref` and optional fields.
    fn samples() -> Vec<Envelope> {
        let deliver = Deliver {
            mid: 9_007_199_254_740_000,
            from: "alice".into(),
            to: Some(Target::Group("g-ünïcødé-😀".into())),
            inbox_seq: 4_294_967_296,
            ts: 1_767_225_600_123,
            kind: Some("text".into()),
            body: "héllo 世界 😀 \u{10ffff} end".into(),
            ext: ext(&[("lang", "fr"), ("reply_to", "m-12"), ("😀", "𝄞")]),
        };
        vec![
            Envelope::with_ref(
                Message::Hello(Hello {
                    version: 1,
                    token: "tok.abc.def".into(),
                    device: "phone-1".into(),
                    codecs: vec!["hessian".into(), "json".into()],
                    resume: Some(Resume { inbox_seq: 77 }),
                }),
                1,
            ),
            Envelope::new(Message::Hello(Hello {
                version: 1,
                token: "t".into(),
                device: "d".into(),
                codecs: vec![],
                resume: None,
            })),
            Envelope::with_ref(
                Message::Welcome(Welcome {
                    version: 1,
                    session: u64::MAX >> 1,
                    user: "alice".into(),
                    heartbeat_ms: 30_000,
                    server_time_ms: 1_767_225_600_000,
                    limits: Limits {
                        max_frame_bytes: 65_536,
                        sends_per_sec: 50,
                        window: 256,
                    },
                }),
                1,
            ),
            Envelope::with_ref(Message::Ping(Ping { ts: 0 }), 2),
            Envelope::new(Message::Pong(Pong { ts: 262_144 })),
            Envelope::with_ref(
                Message::Send(Send {
                    to: Target::User("bob".into()),
                    cmid: "c-1".into(),
                    kind: None,
                    body: "hi".into(),
                    ext: Ext::new(),
                }),
                3,
            ),
            Envelope::with_ref(
                Message::Send(Send {
                    to: Target::Group("team".into()),
                    cmid: "c-2".into(),
                    kind: Some("image".into()),
                    body: "x".repeat(70_000).into(),
                    ext: ext(&[("w", "640"), ("h", "480")]),
                }),
                4,
            ),
            Envelope::with_ref(
                Message::SendAck(SendAck {
                    cmid: "c-1".into(),
                    mid: 123_456_789,
                    seq: 2047,
                    ts: 1_767_225_600_123,
                }),
                3,
            ),
            Envelope::new(Message::Deliver(deliver.clone())),
            Envelope::new(Message::Deliver(Deliver {
                kind: None,
                ext: Ext::new(),
                to: Some(Target::User("bob".into())),
                body: Str::new(),
                ..deliver
            })),
            Envelope::new(Message::Ack(Ack {
                inbox_seq: 15,
                group: None,
            })),
            Envelope::new(Message::Ack(Ack {
                inbox_seq: 15,
                group: Some("g".into()),
            })),
            Envelope::with_ref(
                Message::Sync(Sync {
                    after_inbox_seq: 16,
                    limit: 100,
                    group: None,
                }),
                5,
            ),
            Envelope::with_ref(
                Message::Sync(Sync {
                    after_inbox_seq: 0,
                    limit: 100,
                    group: Some("g".into()),
                }),
                5,
            ),
            Envelope::with_ref(
                Message::Synced(Synced {
                    up_to: 2048,
                    more: true,
                    ..Synced::default()
                }),
                5,
            ),
            Envelope::new(Message::Synced(Synced {
                up_to: 0,
                more: false,
                group: Some("g".into()),
                groups: vec!["a".into(), "b".into()],
            })),
            Envelope::with_ref(
                Message::PresenceSet(PresenceSet {
                    status: Status::Busy,
                }),
                6,
            ),
            Envelope::with_ref(
                Message::PresenceSub(PresenceSub {
                    users: (0..9).map(|i| Str::from(format!("user-{i}"))).collect(),
                }),
                7,
            ),
            Envelope::new(Message::PresenceSub(PresenceSub { users: vec![] })),
            Envelope::new(Message::Presence(Presence {
                user: "bob".into(),
                status: Status::Offline,
                ts: 1_767_225_600_000,
            })),
            Envelope::with_ref(
                Message::GroupJoin(GroupJoin {
                    group: "team".into(),
                }),
                8,
            ),
            Envelope::with_ref(
                Message::GroupLeave(GroupLeave {
                    group: "team".into(),
                }),
                9,
            ),
            Envelope::with_ref(Message::Ok, 8),
            Envelope::with_ref(
                Message::Error(ErrorMsg {
                    code: ErrorCode::RateLimited,
                    message: "slow down".into(),
                    cmid: Some("c-9".into()),
                    retry_after_ms: Some(1500),
                }),
                10,
            ),
            Envelope::new(Message::Error(ErrorMsg {
                code: ErrorCode::BadFrame,
                message: Str::new(),
                cmid: None,
                retry_after_ms: None,
            })),
            Envelope::new(Message::Goaway(Goaway {
                reason: "restart".into(),
                reconnect_ms: 5000,
            })),
        ]
    }

    fn enc(env: &Envelope) -> Vec<u8> {
        let mut out = Vec::new();
        Hessian::encode(env, &mut out).expect("encode");
        out
    }

    fn bytes_of<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        to_writer(v, &mut out).expect("encode");
        out
    }

    fn int_bytes(v: i32) -> Vec<u8> {
        let mut out = Vec::new();
        write_int(&mut out, v);
        out
    }

    fn long_bytes(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        write_long(&mut out, v);
        out
    }

    /// `parts` concatenated: handy for writing byte strings with ASCII pieces.
    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn round_trips_every_op() {
        let samples = samples();
        let mut seen: Vec<Op> = samples.iter().map(|e| e.msg.op()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, Op::ALL.to_vec(), "samples cover every op");
        for env in &samples {
            let bytes = enc(env);
            assert_eq!(Hessian::decode(&bytes).as_ref(), Ok(env), "{env:?}");
        }
    }

    #[test]
    fn encode_appends_and_leaves_output_alone_on_error() {
        let mut out = vec![0xaa];
        Hessian::encode(&Envelope::new(Message::Ping(Ping { ts: 1 })), &mut out).unwrap();
        assert_eq!(out[0], 0xaa);
        assert_eq!(
            Hessian::decode(&out[1..]).unwrap().msg,
            Message::Ping(Ping { ts: 1 })
        );

        // u64 above i64::MAX has no Hessian long.
        let mut out = vec![1, 2, 3];
        let big = Envelope::with_ref(Message::Ping(Ping { ts: u64::MAX }), 1);
        assert_eq!(Hessian::encode(&big, &mut out), Err(EncodeError::TooLarge));
        assert_eq!(out, vec![1, 2, 3]);
        let mut out = Vec::new();
        let edge = Envelope::new(Message::Ping(Ping {
            ts: i64::MAX as u64,
        }));
        Hessian::encode(&edge, &mut out).unwrap();
        assert_eq!(Hessian::decode(&out).unwrap(), edge);
    }

    #[test]
    fn whole_message_exact_bytes() {
        let ping = Envelope::new(Message::Ping(Ping { ts: 0 }));
        assert_eq!(
            enc(&ping),
            cat(&[b"H", b"\x02op", b"\x04ping", b"\x02ts", b"\xe0", b"Z"])
        );
        let sub = Envelope::with_ref(
            Message::PresenceSub(PresenceSub {
                users: vec!["a".into(), "b".into()],
            }),
            300,
        );
        assert_eq!(
            enc(&sub),
            cat(&[
                b"H",
                b"\x02op\x0cpresence_sub",
                b"\x03ref\xf9\x2c",
                b"\x05users\x7a\x01a\x01b",
                b"Z"
            ])
        );
    }

    #[test]
    fn int_examples_from_the_spec() {
        let cases: &[(i32, &[u8])] = &[
            (0, &[0x90]),
            (-16, &[0x80]),
            (47, &[0xbf]),
            (48, &[0xc8, 0x30]),
            (-17, &[0xc7, 0xef]),
            (-256, &[0xc7, 0x00]),
            (-2048, &[0xc0, 0x00]),
            (2047, &[0xcf, 0xff]),
            (2048, &[0xd4, 0x08, 0x00]),
            (-262144, &[0xd0, 0x00, 0x00]),
            (262143, &[0xd7, 0xff, 0xff]),
            (262144, &[b'I', 0x00, 0x04, 0x00, 0x00]),
            (-262145, &[b'I', 0xff, 0xfb, 0xff, 0xff]),
            (i32::MAX, &[b'I', 0x7f, 0xff, 0xff, 0xff]),
            (i32::MIN, &[b'I', 0x80, 0x00, 0x00, 0x00]),
        ];
        for (v, bytes) in cases {
            assert_eq!(int_bytes(*v), *bytes, "int {v}");
            assert_eq!(from_slice::<i64>(bytes), Ok(i64::from(*v)), "int {v}");
        }
        // Non-compact forms from the spec decode too.
        let other: &[(&[u8], i64)] = &[
            (&[0xc8, 0x00], 0),
            (&[0xd4, 0x00, 0x00], 0),
            (&[b'I', 0, 0, 0, 0], 0),
            (&[b'I', 0, 0, 0x01, 0x2c], 300),
        ];
        for (bytes, v) in other {
            assert_eq!(from_slice::<i64>(bytes), Ok(*v));
        }
    }

    #[test]
    fn long_examples_from_the_spec() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0xe0]),
            (-8, &[0xd8]),
            (15, &[0xef]),
            (-9, &[0xf7, 0xf7]),
            (16, &[0xf8, 0x10]),
            (300, &[0xf9, 0x2c]),
            (-256, &[0xf7, 0x00]),
            (-2048, &[0xf0, 0x00]),
            (2047, &[0xff, 0xff]),
            (2048, &[0x3c, 0x08, 0x00]),
            (-262144, &[0x38, 0x00, 0x00]),
            (262143, &[0x3f, 0xff, 0xff]),
            (262144, &[0x59, 0x00, 0x04, 0x00, 0x00]),
            (i64::from(i32::MIN), &[0x59, 0x80, 0, 0, 0]),
            (1 << 31, &[b'L', 0, 0, 0, 0, 0x80, 0, 0, 0]),
            (
                i64::MAX,
                &[b'L', 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (i64::MIN, &[b'L', 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for (v, bytes) in cases {
            assert_eq!(long_bytes(*v), *bytes, "long {v}");
            assert_eq!(bytes_of(v), *bytes, "serialize_i64 {v}");
            assert_eq!(from_slice::<i64>(bytes), Ok(*v), "long {v}");
        }
        // Every integer of ours is a long, whatever its Rust type.
        assert_eq!(bytes_of(&0u8), [0xe0]);
        assert_eq!(bytes_of(&300u32), [0xf9, 0x2c]);
        assert_eq!(bytes_of(&(i64::MAX as u64)), long_bytes(i64::MAX));
        let mut out = Vec::new();
        assert_eq!(
            to_writer(&(1u64 << 63), &mut out),
            Err(EncodeError::TooLarge)
        );
        let other: &[(&[u8], i64)] = &[
            (&[0xf8, 0x00], 0),
            (&[0x3c, 0x00, 0x00], 0),
            (&[0x59, 0, 0, 0, 0], 0),
            (&[0x59, 0, 0, 0x01, 0x2c], 300),
            (&[b'L', 0, 0, 0, 0, 0, 0, 0x01, 0x2c], 300),
        ];
        for (bytes, v) in other {
            assert_eq!(from_slice::<i64>(bytes), Ok(*v));
        }
    }

    #[test]
    fn double_examples_from_the_spec() {
        let cases: &[(f64, &[u8])] = &[
            (0.0, &[0x5b]),
            (1.0, &[0x5c]),
            (-128.0, &[0x5d, 0x80]),
            (127.0, &[0x5d, 0x7f]),
            (2.0, &[0x5d, 0x02]),
            (-32768.0, &[0x5e, 0x80, 0x00]),
            (32767.0, &[0x5e, 0x7f, 0xff]),
            (12.25, &[b'D', 0x40, 0x28, 0x80, 0, 0, 0, 0, 0]),
            (-0.0, &[b'D', 0x80, 0, 0, 0, 0, 0, 0, 0]),
            (32768.0, &[b'D', 0x40, 0xe0, 0, 0, 0, 0, 0, 0]),
        ];
        for (v, bytes) in cases {
            assert_eq!(bytes_of(v), *bytes, "double {v}");
            assert_eq!(
                from_slice::<f64>(bytes).map(f64::to_bits),
                Ok(v.to_bits()),
                "double {v}"
            );
        }
        assert_eq!(from_slice::<f64>(&[0x5d, 0x00]), Ok(0.0));
        assert_eq!(from_slice::<f64>(&[0x5e, 0x00, 0x00]), Ok(0.0));
        // 0x5f: thousandths, as Java and hessian.js write it.
        let v = from_slice::<f64>(&[0x5f, 0x00, 0x00, 0x2f, 0xda]).unwrap();
        assert!((v - 12.25).abs() < 1e-9, "{v}");
        assert!(from_slice::<f64>(&[b'D', 0x7f, 0xf8, 0, 0, 0, 0, 0, 0])
            .unwrap()
            .is_nan());
        // A double is not an integer.
        assert!(from_slice::<u64>(&[0x5c]).is_err());
    }

    #[test]
    fn other_scalars() {
        assert_eq!(bytes_of(&true), b"T");
        assert_eq!(bytes_of(&false), b"F");
        assert_eq!(bytes_of(&()), b"N");
        assert_eq!(bytes_of(&None::<u64>), b"N");
        assert_eq!(bytes_of(&Some(1u64)), [0xe1]);
        assert_eq!(from_slice::<bool>(b"T"), Ok(true));
        assert_eq!(from_slice::<bool>(b"F"), Ok(false));
        assert_eq!(from_slice::<Option<u64>>(b"N"), Ok(None));
        assert_eq!(from_slice::<Option<u64>>(&[0x91]), Ok(Some(1)));
        assert_eq!(bytes_of(&'é'), [0x01, 0xc3, 0xa9]);
        assert_eq!(from_slice::<char>(&[0x01, 0xc3, 0xa9]), Ok('é'));
        // Dates read as milliseconds.
        let ms: i64 = 894_621_091_000;
        let mut date = vec![0x4a];
        date.extend_from_slice(&ms.to_be_bytes());
        assert_eq!(from_slice::<i64>(&date), Ok(ms));
        assert_eq!(
            from_slice::<i64>(&[0x4b, 0x00, 0xe3, 0x83, 0x8f]),
            Ok(894_621_060_000)
        );
        // Out of range for the target type.
        assert!(from_slice::<u8>(&[0xf9, 0x2c]).is_err());
        assert!(from_slice::<u64>(&[0xdf]).is_err());
    }

    #[test]
    fn string_examples_from_the_spec() {
        let cases: &[(&str, &[u8])] = &[
            ("", &[0x00]),
            ("hello", b"\x05hello"),
            ("\u{00c3}", &[0x01, 0xc3, 0x83]),
            ("€", &[0x01, 0xe2, 0x82, 0xac]),
        ];
        for (s, bytes) in cases {
            assert_eq!(bytes_of(s), *bytes, "{s:?}");
            assert_eq!(from_slice::<String>(bytes).as_deref(), Ok(*s));
        }
        assert_eq!(from_slice::<String>(b"S\x00\x05hello").unwrap(), "hello");
        assert_eq!(from_slice::<String>(b"\x30\x05hello").unwrap(), "hello");
        // The compact form boundaries.
        for (n, head) in [
            (31usize, vec![0x1f]),
            (32, vec![0x30, 0x20]),
            (1023, vec![0x33, 0xff]),
            (1024, vec![b'S', 0x04, 0x00]),
            (65535, vec![b'S', 0xff, 0xff]),
        ] {
            let s = "a".repeat(n);
            let bytes = bytes_of(&s);
            assert_eq!(&bytes[..head.len()], &head[..], "len {n}");
            assert_eq!(bytes.len(), head.len() + n);
            assert_eq!(from_slice::<String>(&bytes).unwrap(), s);
        }
        // Borrowed where the bytes are plain UTF-8.
        let bytes = b"\x05hello";
        let s: &str = from_slice(bytes).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn non_bmp_characters_count_two_units_and_go_out_as_cesu8() {
        // U+1F600 is the pair D83D DE00.
        let cesu = [0x04, b'a', 0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80, b'b'];
        assert_eq!(bytes_of("a😀b"), cesu);
        assert_eq!(from_slice::<String>(&cesu).unwrap(), "a😀b");
        // Standard 4-byte UTF-8 is accepted too, as two units.
        let utf8 = [0x04, b'a', 0xf0, 0x9f, 0x98, 0x80, b'b'];
        assert_eq!(from_slice::<String>(&utf8).unwrap(), "a😀b");
        let s: &str = from_slice(&utf8).unwrap();
        assert_eq!(s, "a😀b");
        for s in ["😀", "𝄞x", "\u{10000}\u{10ffff}", "é😀€"] {
            assert_eq!(from_slice::<String>(&bytes_of(s)).unwrap(), s);
        }
        let bad: &[&[u8]] = &[
            &[0x01, 0xed, 0xa0, 0xbd],                   // lone high surrogate
            &[0x01, 0xed, 0xb8, 0x80],                   // lone low surrogate
            &[0x02, 0xed, 0xb8, 0x80, 0xed, 0xa0, 0xbd], // reversed pair
            &[0x02, 0xed, 0xa0, 0xbd, b'x'],             // high then ASCII
            &[0x02, 0xed, 0xa0, 0xbd, 0xed, 0xa0, 0xbd], // two highs
            &[0x01, 0xc0, 0x80],                         // overlong NUL
            &[0x01, 0xe0, 0x80, 0x80],                   // overlong 3-byte
            &[0x01, 0x80],                               // bare continuation
            &[0x01, 0xc3, 0x28],                         // bad continuation
            &[0x02, 0xf4, 0x90, 0x80, 0x80],             // above U+10FFFF
            &[0x01, 0xff],
        ];
        for b in bad {
            assert_eq!(
                from_slice::<String>(b),
                Err(DecodeError::InvalidUtf8),
                "{b:02x?}"
            );
            // Skipped values are validated as well.
            let mut msg = cat(&[b"H\x02op\x04ping\x03zzz"]);
            msg.extend_from_slice(b);
            msg.push(b'Z');
            assert_eq!(Hessian::decode(&msg), Err(DecodeError::InvalidUtf8));
        }
        // A 4-byte sequence where only one unit is left.
        assert!(matches!(
            from_slice::<String>(&[0x01, 0xf0, 0x9f, 0x98, 0x80]),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn long_strings_are_chunked_without_splitting_pairs() {
        // The pair would straddle unit 65535: the first chunk stops before it.
        let s = format!("{}😀{}", "x".repeat(MAX_CHUNK - 1), "y".repeat(70_000));
        let bytes = bytes_of(&s);
        assert_eq!(&bytes[..3], &[b'R', 0xff, 0xfe]);
        let second = 3 + MAX_CHUNK - 1;
        assert_eq!(&bytes[second..second + 3], &[b'R', 0xff, 0xff]);
        assert_eq!(from_slice::<String>(&bytes).unwrap(), s);
        let n = utf16_len(&s);
        assert_eq!(n, MAX_CHUNK - 1 + 2 + 70_000);

        // hessian.js and Java use 0x8000-unit chunks and may end in any compact form; a pair
        // split across chunks is accepted.
        let mut b = vec![b'R', 0x00, 0x03, b'a', b'b', 0xed, 0xa0, 0xbd];
        b.extend_from_slice(&[0x03, 0xed, 0xb8, 0x80, b'c', b'd']);
        assert_eq!(from_slice::<String>(&b).unwrap(), "ab😀cd");
        let mut b = vec![b'R', 0x00, 0x01, b'a', b'R', 0x00, 0x00, 0x30, 0x01, b'b'];
        assert_eq!(from_slice::<String>(&b).unwrap(), "ab");
        // ... but not a chunk of another type, nor a dangling high surrogate at the end.
        b.truncate(4);
        b.push(0x90);
        assert!(from_slice::<String>(&b).is_err());
        let b = [b'R', 0x00, 0x01, 0xed, 0xa0, 0xbd, 0x00];
        assert_eq!(from_slice::<String>(&b), Err(DecodeError::InvalidUtf8));
    }

    struct Bin(Vec<u8>);

    impl<'de> Deserialize<'de> for Bin {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Bin;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                    Ok(Bin(v.to_vec()))
                }
            }
            d.deserialize_bytes(V)
        }
    }

    struct BinRef<'a>(&'a [u8]);

    impl Serialize for BinRef<'_> {
        fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    #[test]
    fn binary_examples_from_the_spec() {
        assert_eq!(bytes_of(&BinRef(&[])), [0x20]);
        assert_eq!(bytes_of(&BinRef(&[1, 2, 3])), [0x23, 1, 2, 3]);
        assert_eq!(from_slice::<Bin>(&[0x23, 1, 2, 3]).unwrap().0, [1, 2, 3]);
        let mid = vec![7u8; 1023];
        assert_eq!(&bytes_of(&BinRef(&mid))[..2], &[0x37, 0xff]);
        let big = vec![9u8; 4096];
        let bytes = bytes_of(&BinRef(&big));
        assert_eq!(&bytes[..3], &[b'B', 0x10, 0x00]);
        assert_eq!(from_slice::<Bin>(&bytes).unwrap().0, big);
        let huge: Vec<u8> = (0..140_000u32).map(|i| i as u8).collect();
        let bytes = bytes_of(&BinRef(&huge));
        assert_eq!(&bytes[..3], &[b'A', 0xff, 0xff]);
        assert_eq!(from_slice::<Bin>(&bytes).unwrap().0, huge);
        // A 1k non-final chunk then a compact final chunk.
        let mut b = vec![b'A', 0x04, 0x00];
        b.extend(std::iter::repeat_n(5u8, 1024));
        b.extend_from_slice(&[0x22, 6, 6]);
        assert_eq!(from_slice::<Bin>(&b).unwrap().0.len(), 1026);
        // serde's String takes bytes that are UTF-8 (as with MessagePack's bin), nothing else.
        assert_eq!(from_slice::<String>(b"\x22hi").unwrap(), "hi");
        assert!(matches!(
            from_slice::<String>(&[0x21, 0xff]),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn list_examples_from_the_spec() {
        let zero_one: &[&[u8]] = &[
            b"V\x04[int\x92\x90\x91",
            b"\x57\x90\x91Z",
            b"\x55\x04[int\x90\x91Z",
            b"\x72\x04[int\x90\x91",
            b"\x7a\x90\x91",
            b"X\x92\x90\x91",
            b"V\x90\x92\x90\x91", // type reference instead of a type name
            b"\x7a\xe0\xe1",      // longs
        ];
        for b in zero_one {
            assert_eq!(from_slice::<Vec<i64>>(b), Ok(vec![0, 1]), "{b:02x?}");
        }
        assert_eq!(bytes_of(&vec![0u64, 1]), b"\x7a\xe0\xe1");
        assert_eq!(bytes_of(&Vec::<u64>::new()), [0x78]);
        let eight: Vec<u64> = (0..8).collect();
        let bytes = bytes_of(&eight);
        assert_eq!(&bytes[..2], b"X\x98");
        assert_eq!(from_slice::<Vec<u64>>(&bytes), Ok(eight));
        let tuple = bytes_of(&(1u8, "a"));
        assert_eq!(tuple, b"\x7a\xe1\x01a");
        // A fixed list must be read to its end.
        assert!(from_slice::<(u8,)>(b"\x7a\x91\x92").is_err());
        // Negative lengths are malformed.
        assert!(matches!(
            from_slice::<Vec<u8>>(b"X\x8f"),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn map_examples_from_the_spec() {
        // map = {1: "fee", 16: "fie", 256: "foe"}
        let b = b"H\x91\x03fee\xa0\x03fie\xc9\x00\x03foeZ";
        let m: BTreeMap<i64, String> = from_slice(b).unwrap();
        let want: BTreeMap<i64, String> = [(1, "fee"), (16, "fie"), (256, "foe")]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        assert_eq!(m, want);
        // A typed map, then a typed map with a type reference.
        let car = cat(&[
            b"M\x13com.caucho.test.Car",
            b"\x05model\x06Beetle",
            b"\x05color\x0aaquamarine",
            b"\x07mileage\x59\x00\x01\x00\x00",
            b"Z",
        ]);
        let m: BTreeMap<String, serde_json::Value> = from_slice(&car).unwrap();
        assert_eq!(m["model"], "Beetle");
        assert_eq!(m["mileage"], 65536);
        let m: BTreeMap<String, String> = from_slice(b"M\x90\x01a\x01bZ").unwrap();
        assert_eq!(m["a"], "b");
        let mut ordered = BTreeMap::new();
        ordered.insert("k".to_string(), 1u64);
        assert_eq!(bytes_of(&ordered), b"H\x01k\xe1Z");
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Car {
        color: String,
        model: String,
    }

    #[test]
    fn object_examples_from_the_spec_read_as_maps() {
        let b = cat(&[
            b"\x7a",
            b"C\x0bexample.Car\x92\x05color\x05model",
            b"O\x90\x03red\x08corvette",
            b"\x60\x05green\x05civic",
        ]);
        let cars: Vec<Car> = from_slice(&b).unwrap();
        assert_eq!(
            cars,
            vec![
                Car {
                    color: "red".into(),
                    model: "corvette".into()
                },
                Car {
                    color: "green".into(),
                    model: "civic".into()
                },
            ]
        );
        // A Java client sending a POJO for the whole message.
        let ping = cat(&[
            b"C\x09imgw.Ping\x93\x02op\x02ts\x03ref",
            b"\x60\x04ping\xe5\xe7",
        ]);
        assert_eq!(
            Hessian::decode(&ping),
            Ok(Envelope::with_ref(Message::Ping(Ping { ts: 5 }), 7))
        );
        // An object inside a skipped field still registers its class for later objects.
        let msg = cat(&[
            b"H\x02op\x04pong\x05extra",
            b"C\x01X\x91\x02ts\x60\x91",
            b"\x02ts\x61\xe9",
            b"Z",
        ]);
        // Class 1 does not exist: only 0 was defined.
        assert!(matches!(
            Hessian::decode(&msg),
            Err(DecodeError::Malformed { .. })
        ));
        let msg = cat(&[
            b"H\x02op\x04pong\x05extra",
            b"C\x01X\x91\x02ts\x60\x91",
            b"\x02ts\xe9",
            b"Z",
        ]);
        assert_eq!(
            Hessian::decode(&msg).unwrap().msg,
            Message::Pong(Pong { ts: 9 })
        );
        // Undefined class, too many classes.
        assert!(Hessian::decode(b"\x60").is_err());
        let mut many = Vec::new();
        for _ in 0..=MAX_CLASSES {
            many.extend_from_slice(b"C\x00\x90");
        }
        many.push(b'N');
        assert!(matches!(
            from_slice::<Option<u8>>(&many),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn references_are_refused() {
        let msg = b"H\x02op\x04ping\x02ts\x51\x90Z";
        assert!(matches!(
            Hessian::decode(msg),
            Err(DecodeError::Malformed { .. })
        ));
        let msg = b"H\x02op\x04ping\x05extra\x51\x90Z";
        assert!(matches!(
            Hessian::decode(msg),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn integer_fields_accept_int_and_long_forms() {
        let forms: &[&[u8]] = &[
            &[0x95],
            &[0xc8, 0x05],
            &[0xd4, 0x00, 0x05],
            &[b'I', 0, 0, 0, 5],
            &[0xe5],
            &[0xf8, 0x05],
            &[0x3c, 0x00, 0x05],
            &[0x59, 0, 0, 0, 5],
            &[b'L', 0, 0, 0, 0, 0, 0, 0, 5],
        ];
        for f in forms {
            let msg = cat(&[b"H\x02op\x04ping\x02ts", f, b"Z"]);
            assert_eq!(
                Hessian::decode(&msg).unwrap().msg,
                Message::Ping(Ping { ts: 5 }),
                "{f:02x?}"
            );
        }
        for bad in [&b"\x5d\x05"[..], b"\x8f", b"\x01x", b"T"] {
            let msg = cat(&[b"H\x02op\x04ping\x02ts", bad, b"Z"]);
            assert!(
                matches!(Hessian::decode(&msg), Err(DecodeError::Malformed { .. })),
                "{bad:02x?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_skipped_and_ops_checked() {
        let msg = cat(&[
            b"H\x02op\x04ping\x02ts\xe3",
            b"\x04junk\x55\x01t\x91H\x01k\x5fabcdZ\x23abcZ",
            b"\x05later\x4a\x00\x00\x00\x00\x00\x00\x00\x01",
            b"\x03bin\x41\x00\x01\x00\x20",
            b"Z",
        ]);
        assert_eq!(
            Hessian::decode(&msg).unwrap().msg,
            Message::Ping(Ping { ts: 3 })
        );
        let msg = b"H\x02op\x04nope\x03ref\xe7Z";
        assert_eq!(
            Hessian::decode(msg),
            Err(DecodeError::UnknownOp {
                op: "nope".into(),
                reference: Some(7)
            })
        );
        assert_eq!(
            Hessian::decode(b"H\x02op\x04sendZ"),
            Err(DecodeError::MissingField("to"))
        );
        assert!(Hessian::decode(b"H\x90\x91Z").is_err(), "int key");
        assert!(Hessian::decode(b"N").is_err());
        assert!(Hessian::decode(b"\x7a\x90\x91").is_err());
    }

    #[test]
    fn truncation_trailing_bytes_and_depth() {
        assert_eq!(Hessian::decode(b""), Err(DecodeError::Truncated));
        assert_eq!(from_slice::<i64>(b"I\x00"), Err(DecodeError::Truncated));
        assert_eq!(from_slice::<f64>(b"D\x00"), Err(DecodeError::Truncated));
        assert_eq!(Hessian::decode(b"H\x02op"), Err(DecodeError::Truncated));
        let mut msg = enc(&Envelope::new(Message::Ok));
        msg.push(b'N');
        assert!(matches!(
            Hessian::decode(&msg),
            Err(DecodeError::Malformed { .. })
        ));

        // Top map plus 15 lists is 16 levels: fine. One more is too deep.
        let nested = |n: usize| {
            let mut m = b"H\x02op\x02ok\x01x".to_vec();
            m.extend(std::iter::repeat_n(b'W', n));
            m.extend(std::iter::repeat_n(b'Z', n));
            m.push(b'Z');
            m
        };
        assert_eq!(
            Hessian::decode(&nested(MAX_DEPTH - 1)).unwrap().msg,
            Message::Ok
        );
        assert_eq!(
            Hessian::decode(&nested(MAX_DEPTH)),
            Err(DecodeError::TooDeep)
        );
        let deep: Vec<u8> = b"H\x01x".repeat(100_000);
        assert_eq!(Hessian::decode(&deep), Err(DecodeError::TooDeep));
        let deep: Vec<u8> = std::iter::repeat_n(0x79, 100_000).collect();
        assert_eq!(
            from_slice::<serde_json::Value>(&deep),
            Err(DecodeError::TooDeep)
        );
    }

    #[test]
    fn every_prefix_of_a_deliver_is_an_error() {
        let env = samples()
            .into_iter()
            .find(|e| matches!(&e.msg, Message::Deliver(d) if !d.ext.is_empty()))
            .unwrap();
        let bytes = enc(&env);
        for n in 0..bytes.len() {
            assert!(Hessian::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        assert_eq!(Hessian::decode(&bytes), Ok(env));
    }

    #[test]
    fn huge_declared_lengths_are_refused_up_front() {
        let cases: &[&[u8]] = &[
            b"X\x49\x7f\xff\xff",
            b"X\x49\x7f\xff\xff\xff",
            b"S\xff\xffab",
            b"R\xff\xffab",
            b"\x33\xffab",
            b"B\xff\xffab",
            b"A\xff\xffab",
            b"V\x00\x49\x7f\xff\xff\xff",
            b"X\x4c\x7f\xff\xff\xff\xff\xff\xff\xff",
            b"C\x00\x49\x7f\xff\xff\xff",
        ];
        for b in cases {
            let err = from_slice::<serde_json::Value>(b).unwrap_err();
            assert!(
                matches!(err, DecodeError::LengthLies { .. } | DecodeError::Truncated),
                "{b:02x?}: {err:?}"
            );
        }
        let msg = b"H\x02op\x0cpresence_sub\x05usersX\x49\x7f\xff\xff\xffZ";
        assert!(matches!(
            Hessian::decode(msg),
            Err(DecodeError::LengthLies {
                declared: 0x7fff_ffff,
                ..
            })
        ));
    }

    /// xorshift64*: a small deterministic generator for the no-panic sweep.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Random bytes, biased towards container and string tags.
        const TAGS: &[u8] = b"HMZWXVUOCQRSNTF\x00\x05\x30\x78\x7a\x60\x90\xe0\x59IL";
        for _ in 0..100_000 {
            let len = (rng.next() % 48) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    if r.is_multiple_of(3) {
                        TAGS[(r >> 8) as usize % TAGS.len()]
                    } else {
                        (r >> 16) as u8
                    }
                })
                .collect();
            let _ = Hessian::decode(&bytes);
            let _ = from_slice::<serde_json::Value>(&bytes);
        }
        // Mutations of real messages.
        let encoded: Vec<Vec<u8>> = samples()
            .iter()
            .map(enc)
            .filter(|b| b.len() < 4096)
            .collect();
        for bytes in &encoded {
            for i in 0..bytes.len() {
                for _ in 0..8 {
                    let mut m = bytes.clone();
                    m[i] = rng.next() as u8;
                    let _ = Hessian::decode(&m);
                }
                let mut m = bytes.clone();
                m.remove(i);
                let _ = Hessian::decode(&m);
            }
        }
    }

    #[derive(serde::Serialize, Deserialize, Debug, PartialEq)]
    enum Shape {
        Dot,
        Circle(u32),
        Pair(u8, String),
        Rect { w: u16, h: u16 },
    }

    #[test]
    fn generic_values_round_trip() {
        let shapes = vec![
            Shape::Dot,
            Shape::Circle(7),
            Shape::Pair(1, "x".into()),
            Shape::Rect { w: 3, h: 4 },
        ];
        let bytes = bytes_of(&shapes);
        assert_eq!(from_slice::<Vec<Shape>>(&bytes), Ok(shapes));
        let v = serde_json::json!({"a": [1, -2, 3.5, null, true, "é😀"], "b": {"c": {}}});
        assert_eq!(from_slice::<serde_json::Value>(&bytes_of(&v)), Ok(v));
    }
}
