//! [`Str`], the model's immutable UTF-8 string.
//!
//! Short strings (ids, device names, `ext` keys and values: most strings of a frame) are kept
//! inline, copied out of the received payload: making, cloning and dropping one touches no
//! shared memory. Longer ones (bodies) are [`Bytes`] slices of the payload: no copy, and
//! cloning one to fan a message out is a reference count increment. Decoding the typical
//! message with four reference-counted slices spent a quarter of its time on their atomic
//! increments and decrements (`perf`, bench/codecs.rs); inline, three of the four are gone.
//!
//! Invariant (what makes `as_str` sound): the bytes behind a `Str` are UTF-8. Every
//! constructor either takes a `str`, checks the bytes, or is `unsafe` and says so.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::Bytes;

/// Longest string kept inline. With the length byte this is the size of a `Bytes` minus its
/// niche, so a `Str` is no larger than the `Bytes` it would otherwise be (a test checks).
pub const INLINE_MAX: usize = 23;

/// An immutable UTF-8 string: inline up to [`INLINE_MAX`] bytes, else a shared [`Bytes`].
#[derive(Clone)]
pub struct Str(Repr);

#[derive(Clone)]
enum Repr {
    /// Up to `INLINE_MAX` bytes, copied.
    Inline(Inline),
    /// Longer than `INLINE_MAX`, or static.
    Shared(Bytes),
}

/// An inline string: bytes `0..len` are the string and the rest are zero, except the last
/// byte, which is `len` (at most [`INLINE_MAX`]). Word-aligned, so a decoder writes it as
/// whole words and a copy reads it back the same way (a `len: u8` field in front of a
/// `[u8; 23]` made the compiler store the bytes at odd offsets, and the wide loads of the
/// next copy then stalled: `perf` on the Protobuf decoder).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Inline([u8; INLINE_MAX + 1]);

impl Inline {
    const EMPTY: Inline = Inline([0; INLINE_MAX + 1]);

    fn as_bytes(&self) -> &[u8] {
        // The length byte is at most INLINE_MAX (type invariant), so the range is in bounds;
        // `get` keeps that from being a panic path if it ever were not.
        self.0
            .get(..usize::from(self.0[INLINE_MAX]))
            .unwrap_or_default()
    }
}

impl Str {
    /// The empty string (no allocation).
    pub const fn new() -> Str {
        Str(Repr::Inline(Inline::EMPTY))
    }

    /// A string pointing at static memory (no copy, no allocation).
    pub const fn from_static(s: &'static str) -> Str {
        Str(Repr::Shared(Bytes::from_static(s.as_bytes())))
    }

    /// `b` inline when it fits. Always inlined, as [`short_buf`] is: a decoder then builds the
    /// string in the field that keeps it, instead of in a temporary that is copied there
    /// (loading a temporary's bytes right after storing them piecewise stalls the CPU).
    #[inline(always)]
    fn inline(b: &[u8]) -> Option<Str> {
        if b.len() > INLINE_MAX {
            return None;
        }
        Some(Str(Repr::Inline(short_buf(b))))
    }

    /// `b` as a `Str` without checking that it is UTF-8: short strings are copied inline,
    /// longer ones share `b`'s memory.
    ///
    /// # Safety
    /// `b` must be valid UTF-8.
    #[allow(unsafe_code)]
    #[inline(always)]
    pub unsafe fn from_bytes_unchecked(b: Bytes) -> Str {
        Str::inline(&b).unwrap_or(Str(Repr::Shared(b)))
    }

    /// `b` as a `Str` if it is UTF-8.
    pub fn from_utf8(b: Bytes) -> Result<Str, std::str::Utf8Error> {
        std::str::from_utf8(&b)?;
        // SAFETY: checked just above.
        #[allow(unsafe_code)]
        let s = unsafe { Str::from_bytes_unchecked(b) };
        Ok(s)
    }

    /// Sets the string to `b` if it is UTF-8, else returns `false` and leaves it as it was.
    ///
    /// A short `b` is written over the inline buffer in place, so a decoder that fills a field
    /// this way leaves no temporary `Str` to move into it (moving one right after building it
    /// stalls the CPU; see [`short_buf`]). When it is ASCII (the usual ids and keys), it is
    /// checked on the words that copy it, with no pass of its own: with the byte loop of
    /// `<[u8]>::is_ascii` on short strings, Protobuf decoding took 126 ns instead of 111.
    /// A longer `b` is copied into a new buffer (decoders share the input instead).
    #[inline(always)]
    pub fn assign_utf8(&mut self, b: &[u8]) -> bool {
        if b.len() > INLINE_MAX {
            return match std::str::from_utf8(b) {
                Ok(s) => {
                    *self = Str::from(s);
                    true
                }
                Err(_) => false,
            };
        }
        let inline = short_buf(b);
        if !inline.is_ascii() && std::str::from_utf8(b).is_err() {
            return false;
        }
        match &mut self.0 {
            Repr::Inline(i) => *i = inline,
            _ => *self = Str(Repr::Inline(inline)),
        }
        true
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(i) => i.as_bytes(),
            Repr::Shared(b) => b,
        }
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: the bytes of a `Str` are UTF-8 (module invariant: every constructor
        // takes a `str`, checks, or is `unsafe` with that requirement).
        #[allow(unsafe_code)]
        let s = unsafe { std::str::from_utf8_unchecked(self.as_bytes()) };
        s
    }

    /// The bytes as a `Bytes`: shared when they already are, else copied.
    pub fn into_bytes(self) -> Bytes {
        match self.0 {
            Repr::Inline(_) => Bytes::copy_from_slice(self.as_bytes()),
            Repr::Shared(b) => b,
        }
    }
}

/// `b` (at most [`INLINE_MAX`] bytes) as an [`Inline`], assembled in registers from
/// overlapping loads of constant size (16, 8, 4 or 1 bytes) and stored as whole words.
/// Neither a `memcpy` call (which costs more than the copy itself at these lengths: a profile
/// of the Protobuf decoder showed the calls) nor piecewise stores into the buffer (which
/// stall the wide loads that copy the string next: a profile of the MessagePack decoder
/// showed those).
#[inline(always)]
fn short_buf(b: &[u8]) -> Inline {
    let n = b.len();
    debug_assert!(n <= INLINE_MAX);
    // `lo`: bytes 0..16; `hi`: bytes 16..24, whose last byte is the length.
    let (lo, hi) = if let (Some(a), Some(t)) = (b.first_chunk::<16>(), b.last_chunk::<8>()) {
        // Byte i of `t` is b[n - 8 + i], so b[16] is its byte 24 - n (1 to 8 for 16..=23).
        let shift = 8 * (INLINE_MAX + 1).saturating_sub(n) as u32;
        let tail = u64::from_le_bytes(*t).checked_shr(shift).unwrap_or(0);
        (u128::from_le_bytes(*a), tail)
    } else if let (Some(a), Some(c)) = (b.first_chunk::<8>(), b.last_chunk::<8>()) {
        // Two words overlapping on b[n - 8..8] (equal bytes, so or-ing them is exact).
        let c = u128::from(u64::from_le_bytes(*c)) << (8 * (n - 8));
        (u128::from(u64::from_le_bytes(*a)) | c, 0)
    } else if let (Some(a), Some(c)) = (b.first_chunk::<4>(), b.last_chunk::<4>()) {
        let c = u128::from(u32::from_le_bytes(*c)) << (8 * (n - 4));
        (u128::from(u32::from_le_bytes(*a)) | c, 0)
    } else if let (Some(&first), Some(&last)) = (b.first(), b.last()) {
        // 1 to 3 bytes: first, middle and last.
        let mid = u128::from(b[n / 2]) << (8 * (n / 2));
        (
            u128::from(first) | mid | u128::from(last) << (8 * (n - 1)),
            0,
        )
    } else {
        (0, 0)
    };
    // Cannot truncate: n <= INLINE_MAX < 256. Byte 7 of `hi` (byte 23) is zero above, as
    // b[23] would be the 24th byte.
    let hi = hi | (n as u64) << 56;
    let mut buf = [0; INLINE_MAX + 1];
    buf[..16].copy_from_slice(&lo.to_le_bytes());
    buf[16..].copy_from_slice(&hi.to_le_bytes());
    Inline(buf)
}

impl Inline {
    /// Whether the string is ASCII: one test over the words that hold it (the length byte is
    /// at most 23, below 0x80, and the padding is zero).
    #[inline(always)]
    fn is_ascii(&self) -> bool {
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let w = |i: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&self.0[i..i + 8]);
            u64::from_le_bytes(word)
        };
        (w(0) | w(8) | w(16)) & HIGH == 0
    }
}

impl Default for Str {
    fn default() -> Str {
        Str::new()
    }
}

impl Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Str {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<str> for Str {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

// Equality, order and hash are the `str`'s, whatever the representation (and `Borrow<str>`
// needs the hash to be the `str`'s).
impl<T: AsRef<str> + ?Sized> PartialEq<T> for Str {
    fn eq(&self, other: &T) -> bool {
        self.as_str() == other.as_ref()
    }
}

impl Eq for Str {}

impl PartialEq<Str> for str {
    fn eq(&self, other: &Str) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Str> for &str {
    fn eq(&self, other: &Str) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Str> for String {
    fn eq(&self, other: &Str) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialOrd for Str {
    fn partial_cmp(&self, other: &Str) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Str {
    fn cmp(&self, other: &Str) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Str {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl From<&str> for Str {
    #[inline(always)]
    fn from(s: &str) -> Str {
        Str::inline(s.as_bytes())
            .unwrap_or_else(|| Str(Repr::Shared(Bytes::copy_from_slice(s.as_bytes()))))
    }
}

impl From<String> for Str {
    fn from(s: String) -> Str {
        Str::inline(s.as_bytes()).unwrap_or_else(|| Str(Repr::Shared(Bytes::from(s))))
    }
}

impl TryFrom<Bytes> for Str {
    type Error = std::str::Utf8Error;
    fn try_from(b: Bytes) -> Result<Str, Self::Error> {
        Str::from_utf8(b)
    }
}

impl TryFrom<&[u8]> for Str {
    type Error = std::str::Utf8Error;
    fn try_from(b: &[u8]) -> Result<Str, Self::Error> {
        Ok(Str::from(std::str::from_utf8(b)?))
    }
}

impl serde::Serialize for Str {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Str {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Str, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Str;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Str, E> {
                Ok(Str::from(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Str, E> {
                Ok(Str::from(v))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Str, E> {
                Str::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(v), &self))
            }
        }
        d.deserialize_string(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn no_larger_than_bytes() {
        assert_eq!(std::mem::size_of::<Str>(), std::mem::size_of::<Bytes>());
    }

    #[test]
    fn inline_up_to_the_limit_then_shared() {
        let short = "x".repeat(INLINE_MAX);
        let long = "x".repeat(INLINE_MAX + 1);
        assert!(matches!(Str::from(short.as_str()).0, Repr::Inline(_)));
        assert!(matches!(Str::from(long.as_str()).0, Repr::Shared(_)));
        let src = Bytes::from(format!("{long}!"));
        let s = Str::from_utf8(src.slice(..INLINE_MAX + 1)).unwrap();
        assert_eq!(
            s.as_bytes().as_ptr(),
            src.as_ptr(),
            "long strings share the buffer"
        );
        let t = Str::from_utf8(src.slice(..3)).unwrap();
        assert_eq!(t, "xxx");
        assert_ne!(
            t.as_bytes().as_ptr(),
            src.as_ptr(),
            "short strings are copied"
        );
        assert_eq!(Str::from(String::from("é✓")).as_str(), "é✓");
        assert_eq!(Str::from(long.clone()).into_bytes(), long.as_bytes());
        assert_eq!(Str::from("ab").into_bytes(), &b"ab"[..]);
    }

    #[test]
    fn every_short_length_copies_exactly() {
        let text = "abcdefghijklmnopqrstuvw";
        for n in 0..=INLINE_MAX {
            let s = Str::from(&text[..n]);
            assert_eq!(s.as_str(), &text[..n], "length {n}");
            let Repr::Inline(Inline(buf)) = s.0 else {
                panic!("length {n}: not inline")
            };
            assert!(
                buf[n..INLINE_MAX].iter().all(|&b| b == 0),
                "length {n}: padding {buf:?}"
            );
            assert_eq!(usize::from(buf[INLINE_MAX]), n, "length byte");
        }
    }

    #[test]
    fn assign_utf8_checks_and_writes_in_place() {
        let mut s = Str::from("previous");
        // ASCII of every short length, then a non-ASCII one, each over the last.
        let text = "abcdefghijklmnopqrstuvw";
        for n in 0..=INLINE_MAX {
            assert!(s.assign_utf8(&text.as_bytes()[..n]));
            assert_eq!(s, &text[..n]);
        }
        assert!(s.assign_utf8("héllo ✓".as_bytes()));
        assert_eq!(s, "héllo ✓");
        // Invalid UTF-8 (short, at each end and in the word past 16 bytes; long) is refused
        // and leaves the string as it was.
        for bad in [
            &b"\xff"[..],
            b"ab\xc3",
            b"0123456789abcdefgh\xe2\x82",
            b"0123456789abcdefghijklmnopqrstuvwxyz\xff",
        ] {
            assert!(!s.assign_utf8(bad), "{bad:?}");
            assert_eq!(s, "héllo ✓");
        }
        // Over a shared string, and a long one (copied).
        let long = "z".repeat(INLINE_MAX + 5);
        let mut t = Str::from(long.as_str());
        assert!(t.assign_utf8(b"id"));
        assert_eq!(t, "id");
        assert!(t.assign_utf8(long.as_bytes()));
        assert_eq!(t, long.as_str());
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert!(Str::from_utf8(Bytes::from_static(b"a\xff")).is_err());
        assert!(Str::try_from(&b"\xc3"[..]).is_err());
    }

    #[test]
    fn equal_hash_and_order_whatever_the_representation() {
        let long = "y".repeat(40);
        let a = Str::from(long.as_str());
        // SAFETY: ASCII.
        #[allow(unsafe_code)]
        let b = unsafe { Str::from_bytes_unchecked(Bytes::from(long.clone())) };
        assert_eq!(a, b);
        assert_eq!(Str::from_static("id"), Str::from("id"));
        let (a, b) = (Str::from("a"), Str::from_static("b"));
        assert!(a < b);
        let mut m: HashMap<Str, u8> = HashMap::new();
        m.insert(Str::from_static("key"), 1);
        assert_eq!(m.get("key"), Some(&1));
        assert_eq!(
            format!("{:?} {}", Str::from("q\""), Str::from("d")),
            "\"q\\\"\" d"
        );
        assert_eq!(Str::default(), "");
        let k = Str::from("k");
        let owned = String::from("k");
        assert!("k" == k && *"k" == k && owned == k);
    }

    #[test]
    fn serde_round_trip() {
        let s = Str::from("héllo");
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "\"héllo\"");
        let back: Str = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
    }
}
