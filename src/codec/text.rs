//! Zero-copy strings: turning bytes of a received payload into [`Str`] slices of it.
//!
//! Every decoder checks UTF-8 exactly once. [`Str::try_from`] on a [`Bytes`] would check it a
//! second time, so the helpers here build the [`Str`] unchecked instead, right next to the
//! check that makes it sound. A short string is copied inline (no slice of `src` is taken,
//! so no reference count is touched); a long one is a slice sharing `src`'s memory. This
//! module is the only place in the codecs that needs `unsafe`.

use bytes::Bytes;

use crate::protocol::str::INLINE_MAX;
use crate::protocol::Str;

/// `raw`, a subslice of `src` (a reader's view of the input), as a [`Str`] if it is UTF-8:
/// inline when short, else a slice sharing `src`'s memory.
///
/// The short case (checked and copied inline) is inlined into the reader, so the string is
/// built where it is stored rather than returned through memory; the long case (a shared
/// slice) is not.
///
/// `raw` must lie inside `src`; a reader passes slices it split off `src` itself.
#[inline(always)]
pub(crate) fn sub_str(src: &Bytes, raw: &[u8]) -> Option<Str> {
    let mut s = Str::new();
    sub_str_into(src, raw, &mut s).then_some(s)
}

/// [`sub_str`] into `out` (see [`Str::assign_utf8`]); `false`, leaving `out` as it was, where
/// [`sub_str`] gives `None`.
#[inline(always)]
pub(crate) fn sub_str_into(src: &Bytes, raw: &[u8], out: &mut Str) -> bool {
    if raw.len() > INLINE_MAX {
        return match sub_str_shared(src, raw) {
            Some(s) => {
                *out = s;
                true
            }
            None => false,
        };
    }
    out.assign_utf8(raw)
}

/// [`sub_str`] beyond [`INLINE_MAX`]: a slice sharing `src`'s memory.
#[inline(never)]
fn sub_str_shared(src: &Bytes, raw: &[u8]) -> Option<Str> {
    if !raw.is_ascii() && std::str::from_utf8(raw).is_err() {
        return None;
    }
    // Bytes::slice_ref would panic on a `raw` outside `src`: check instead (never fails for
    // the slices readers pass).
    let start = (raw.as_ptr() as usize).checked_sub(src.as_ptr() as usize)?;
    let end = start.checked_add(raw.len())?;
    if end > src.len() {
        return None;
    }
    let shared = src.slice(start..end);
    // SAFETY: `shared` is `src[start..end]`, the very bytes of `raw` (same addresses in the
    // immutable buffer behind `src`, checked just above), checked as UTF-8 above.
    #[allow(unsafe_code)]
    let s = unsafe { Str::from_bytes_unchecked(shared) };
    Some(s)
}

/// `b` as a `&str` if it is ASCII (checked a word at a time), which is then UTF-8 without a
/// full validation.
#[inline]
pub(crate) fn ascii_str(b: &[u8]) -> Option<&str> {
    if !b.is_ascii() {
        return None;
    }
    // SAFETY: every byte is below 0x80 (checked just above), and ASCII is valid UTF-8.
    #[allow(unsafe_code)]
    let s = unsafe { std::str::from_utf8_unchecked(b) };
    Some(s)
}

/// `s` as a [`Str`]: inline when short, else a slice of `src` when `s` lies inside it (no
/// copy, no second UTF-8 check), else a copy.
#[inline]
pub(crate) fn share_str(src: &Bytes, s: &str) -> Str {
    if s.len() <= INLINE_MAX {
        return Str::from(s);
    }
    let base = src.as_ptr() as usize;
    let at = s.as_ptr() as usize;
    if at < base || at - base > src.len() || s.len() > src.len() - (at - base) {
        return Str::from(s);
    }
    let start = at - base;
    let shared = src.slice(start..start + s.len());
    // SAFETY: `shared` holds the same bytes as `s` (same address range of the immutable buffer
    // behind `src`, checked just above), and `s` is a `&str`, so they are UTF-8.
    #[allow(unsafe_code)]
    let out = unsafe { Str::from_bytes_unchecked(shared) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_str_inline_shared_and_refused() {
        let long = Bytes::from(format!("__{}\u{e9}!", "z".repeat(INLINE_MAX)));
        let s = sub_str(&long, &long[2..5]).unwrap();
        assert_eq!(&*s, "zzz");
        assert_ne!(s.as_bytes().as_ptr(), long[2..].as_ptr(), "short: inline");
        let l = sub_str(&long, &long[2..long.len() - 1]).unwrap();
        assert_eq!(l.len(), INLINE_MAX + 2);
        assert_eq!(l.as_bytes().as_ptr(), long[2..].as_ptr(), "long: shared");
        let e = sub_str(&long, &long[INLINE_MAX..INLINE_MAX + 4]).unwrap();
        assert_eq!(&*e, "zz\u{e9}");
        assert_eq!(
            sub_str(&long, &long[2..long.len() - 2]),
            None,
            "cut é (long)"
        );
        assert_eq!(
            sub_str(&long, &long[INLINE_MAX + 1..long.len() - 2]),
            None,
            "cut é (short)"
        );
        let foreign = "y".repeat(INLINE_MAX + 1);
        assert_eq!(sub_str(&long, foreign.as_bytes()), None, "outside src");
        assert_eq!(sub_str(&long, &long[3..3]).unwrap(), Str::new());
    }

    #[test]
    fn ascii_only() {
        assert_eq!(ascii_str(b"abc"), Some("abc"));
        assert_eq!(ascii_str(b""), Some(""));
        assert_eq!(ascii_str("é".as_bytes()), None);
        assert_eq!(ascii_str(&[b'a', 0xff]), None);
    }

    #[test]
    fn share_str_copies_foreign_strings() {
        let src = Bytes::from(format!("a{}", "b".repeat(40)));
        let inner = std::str::from_utf8(&src[1..]).unwrap();
        let s = share_str(&src, inner);
        assert_eq!(&*s, inner);
        assert_eq!(s.as_bytes().as_ptr(), src[1..].as_ptr());
        let other = inner.to_string();
        let t = share_str(&src, &other);
        assert_eq!(&*t, inner);
        assert_ne!(t.as_bytes().as_ptr(), src[1..].as_ptr());
        assert_eq!(share_str(&src, ""), Str::new());
        assert_eq!(share_str(&src, &inner[..3]), "bbb");
    }
}
