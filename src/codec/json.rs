//! The JSON codec (serde_json): one object per frame, `op` names the message (SPEC 3.3).
//!
//! Encoding goes through serde_json and the `Serialize` impl of `fields.rs`.
//!
//! Decoding checks UTF-8 once for the whole payload, then tries the direct reader
//! (`direct::envelope` driven through serde_json's map access, so serde_json still does all
//! the JSON parsing): it reads the object key by key into the op's message, with unescaped
//! strings sliced from the input. Frames it gives up on (see `direct.rs`) go through the
//! general path, [`decode_serde`], which fills `WireIn`.

use std::borrow::Cow;
use std::marker::PhantomData;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};

use super::direct::{self, set_once, target_of, MapSource};
use super::fields::{finish, serde_error, BStr, OpOnly, WireIn};
use super::text::{ascii_str, share_str};
use super::{Codec, CodecId, DecodeError, EncodeError};
use crate::protocol::{Envelope, Ext, Limits, Resume, Str, Target};

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
        if let Some(env) = decode_direct(bytes, text) {
            return Ok(env);
        }
        general(bytes, text)
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

/// The direct reader's attempt: the envelope, or `None` to leave the frame to the general
/// path. `text` is `bytes` checked as UTF-8.
fn decode_direct(bytes: &Bytes, text: &str) -> Option<Envelope> {
    let mut de = serde_json::Deserializer::from_str(text);
    let env = (&mut de).deserialize_map(Top { src: bytes }).ok()?;
    de.end().ok()?;
    Some(env)
}

/// The error that makes serde_json unwind when the direct reader gives up.
fn give_up<E: de::Error>() -> E {
    E::custom("left to the general path")
}

/// A borrowed string as a [`Str`]: a slice of the input when serde_json could borrow it (no
/// escapes), else the unescaped copy.
fn to_str(src: &Bytes, s: BStr<'_>) -> Str {
    match s.0 {
        Cow::Borrowed(b) => share_str(src, b),
        Cow::Owned(o) => Str::from(o),
    }
}

/// A key as serde_json found it.
struct Key<'de>(Cow<'de, str>);

impl AsRef<[u8]> for Key<'_> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

struct Top<'a> {
    src: &'a Bytes,
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Envelope;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut s = Source {
            map: &mut map,
            src: self.src,
            err: PhantomData,
        };
        direct::envelope(&mut s, |_| true).ok_or_else(give_up)
    }
}

/// [`MapSource`] over serde_json's access to the top-level object.
struct Source<'a, 'de, A: MapAccess<'de>> {
    map: &'a mut A,
    src: &'a Bytes,
    err: PhantomData<&'de ()>,
}

impl<'de, A: MapAccess<'de>> Source<'_, 'de, A> {
    fn nested<T>(&mut self, read: fn(&Bytes, &mut dyn NestedMap<'de>) -> Option<T>) -> Option<T> {
        self.map
            .next_value_seed(Nested {
                src: self.src,
                read,
                _de: PhantomData,
            })
            .ok()
    }
}

impl<'de, A: MapAccess<'de>> MapSource for Source<'_, 'de, A> {
    type Key = Key<'de>;

    fn key(&mut self) -> Option<Option<Key<'de>>> {
        let k = self.map.next_key::<BStr<'de>>().ok()?;
        Some(k.map(|k| Key(k.0)))
    }

    fn str(&mut self) -> Option<Str> {
        let s = self.map.next_value::<BStr<'de>>().ok()?;
        Some(to_str(self.src, s))
    }

    fn name<T>(&mut self, f: impl FnOnce(&[u8]) -> Option<T>) -> Option<T> {
        let s = self.map.next_value::<BStr<'de>>().ok()?;
        f(s.0.as_bytes())
    }

    fn uint(&mut self) -> Option<u64> {
        self.map.next_value::<u64>().ok()
    }

    fn bool(&mut self) -> Option<bool> {
        self.map.next_value::<bool>().ok()
    }

    fn target(&mut self) -> Option<Target> {
        self.nested(|src, m| {
            let (mut user, mut group) = (None, None);
            while let Some(k) = m.key()? {
                match k.as_bytes() {
                    b"user" => set_once(&mut user, m.str(src))?,
                    b"group" => set_once(&mut group, m.str(src))?,
                    _ => m.skip()?,
                }
            }
            target_of(user, group)
        })
    }

    fn resume(&mut self) -> Option<Resume> {
        self.nested(|_, m| {
            let mut inbox_seq = None;
            while let Some(k) = m.key()? {
                match k.as_bytes() {
                    b"inbox_seq" => set_once(&mut inbox_seq, m.uint())?,
                    _ => m.skip()?,
                }
            }
            Some(Resume {
                inbox_seq: inbox_seq.unwrap_or(0),
            })
        })
    }

    fn limits(&mut self) -> Option<Limits> {
        self.nested(|_, m| {
            let (mut max_frame_bytes, mut sends_per_sec, mut window) = (None, None, None);
            let u32v = |m: &mut dyn NestedMap<'de>| m.uint().and_then(|v| u32::try_from(v).ok());
            while let Some(k) = m.key()? {
                match k.as_bytes() {
                    b"max_frame_bytes" => set_once(&mut max_frame_bytes, u32v(m))?,
                    b"sends_per_sec" => set_once(&mut sends_per_sec, u32v(m))?,
                    b"window" => set_once(&mut window, u32v(m))?,
                    _ => m.skip()?,
                }
            }
            Some(Limits {
                max_frame_bytes: max_frame_bytes.unwrap_or(0),
                sends_per_sec: sends_per_sec.unwrap_or(0),
                window: window.unwrap_or(0),
            })
        })
    }

    fn ext(&mut self, into: &mut Ext) -> Option<()> {
        let ext = self.nested(|src, m| {
            let mut ext = Ext::new();
            while let Some(k) = m.key()? {
                let v = m.str(src)?;
                ext.insert(to_str(src, BStr(k)), v);
            }
            Some(ext)
        })?;
        *into = ext;
        Some(())
    }

    fn strs(&mut self) -> Option<Vec<Str>> {
        self.map
            .next_value_seed(StrList {
                src: self.src,
                _de: PhantomData,
            })
            .ok()
    }

    fn skip(&mut self) -> Option<()> {
        self.map.next_value::<IgnoredAny>().ok().map(drop)
    }
}

/// The access to a nested object (`to`, `resume`, `limits`, `ext`) that its reader gets;
/// `None` gives up.
trait NestedMap<'de> {
    fn key(&mut self) -> Option<Option<Cow<'de, str>>>;
    fn str(&mut self, src: &Bytes) -> Option<Str>;
    fn uint(&mut self) -> Option<u64>;
    fn skip(&mut self) -> Option<()>;
}

impl<'de, A: MapAccess<'de>> NestedMap<'de> for A {
    fn key(&mut self) -> Option<Option<Cow<'de, str>>> {
        let k = self.next_key::<BStr<'de>>().ok()?;
        Some(k.map(|k| k.0))
    }

    fn str(&mut self, src: &Bytes) -> Option<Str> {
        let s = self.next_value::<BStr<'de>>().ok()?;
        Some(to_str(src, s))
    }

    fn uint(&mut self) -> Option<u64> {
        self.next_value::<u64>().ok()
    }

    fn skip(&mut self) -> Option<()> {
        self.next_value::<IgnoredAny>().ok().map(drop)
    }
}

/// Reads a nested object with `read`.
struct Nested<'a, 'de, T> {
    src: &'a Bytes,
    read: fn(&Bytes, &mut dyn NestedMap<'de>) -> Option<T>,
    _de: PhantomData<&'de ()>,
}

impl<'de, T> DeserializeSeed<'de> for Nested<'_, 'de, T> {
    type Value = T;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T> Visitor<'de> for Nested<'_, 'de, T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        (self.read)(self.src, &mut map).ok_or_else(give_up)
    }
}

/// `codecs`, `users`: an array of strings.
struct StrList<'a, 'de> {
    src: &'a Bytes,
    _de: PhantomData<&'de ()>,
}

impl<'de> DeserializeSeed<'de> for StrList<'_, 'de> {
    type Value = Vec<Str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<Str>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for StrList<'_, 'de> {
    type Value = Vec<Str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Str>, A::Error> {
        let mut v = Vec::new();
        while let Some(s) = seq.next_element::<BStr<'de>>()? {
            v.push(to_str(self.src, s));
        }
        Ok(v)
    }
}
