//! Output for the hand-written encoders.
//!
//! Appending to a `Vec<u8>` piece by piece costs a capacity check, a length update and, for
//! every slice, a call to the out-of-line `extend_from_slice` (which then calls `memcpy` even
//! for a 3-byte key). The encoders instead compute an upper bound of the encoded size, zero-fill
//! that much room once ([`write_sized`]) and write into it through [`Out`]: a store and a
//! bounds check per write, and constant-length copies (keys, headers) inlined.
//!
//! The bound is a promise the encoders keep by construction; if it were ever short, [`Out`]
//! stops writing (it never panics) and [`write_sized`] redoes the encoding straight into the
//! `Vec`, so the output is the same either way.

use super::EncodeError;

/// Where an encoder writes bytes.
pub(crate) trait Sink {
    fn put(&mut self, b: u8);
    fn put_slice(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline(always)]
    fn put(&mut self, b: u8) {
        Vec::push(self, b);
    }

    #[inline(always)]
    fn put_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A pre-sized, zero-filled region of the output; `pos` bytes written so far.
pub(crate) struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
    /// A write did not fit: the bound was short (a bug), the caller starts over.
    short: bool,
}

impl Sink for Out<'_> {
    #[inline(always)]
    fn put(&mut self, b: u8) {
        match self.buf.get_mut(self.pos) {
            Some(slot) => {
                *slot = b;
                self.pos += 1;
            }
            None => self.short = true,
        }
    }

    #[inline(always)]
    fn put_slice(&mut self, bytes: &[u8]) {
        let end = self.pos.wrapping_add(bytes.len());
        match self.buf.get_mut(self.pos..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.pos = end;
            }
            None => self.short = true,
        }
    }
}

/// Appends to `out` what `write` writes, given that it writes at most `bound` bytes; if it
/// writes more (the bound was wrong), `fallback` writes the same bytes straight into the
/// `Vec` instead. On error `out` is left as it was.
#[inline]
pub(crate) fn write_sized(
    out: &mut Vec<u8>,
    bound: usize,
    write: impl FnOnce(&mut Out<'_>) -> Result<(), EncodeError>,
    fallback: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    let Some(end) = start.checked_add(bound) else {
        return Err(EncodeError::TooLarge);
    };
    out.resize(end, 0);
    let mut w = Out {
        buf: &mut out[start..],
        pos: 0,
        short: false,
    };
    let r = write(&mut w);
    let (written, short) = (w.pos, w.short);
    match r {
        Ok(()) if !short => {
            out.truncate(start + written);
            Ok(())
        }
        Ok(()) => {
            // A short bound is a bug in the encoder's bound: the integration tests (debug
            // assertions on) stop on it; release builds recover. This module's own tests
            // take this path on purpose.
            #[allow(clippy::assertions_on_constants)]
            {
                debug_assert!(cfg!(test), "encoder size bound too small");
            }
            out.truncate(start);
            let r = fallback(out);
            if r.is_err() {
                out.truncate(start);
            }
            r
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_within_the_bound() {
        let mut out = vec![9];
        write_sized(
            &mut out,
            8,
            |o| {
                o.put(1);
                o.put_slice(&[2, 3]);
                Ok(())
            },
            |_| unreachable!(),
        )
        .unwrap();
        assert_eq!(out, [9, 1, 2, 3]);
    }

    #[test]
    fn a_short_bound_falls_back() {
        let mut out = vec![9];
        write_sized(
            &mut out,
            2,
            |o| {
                o.put(1);
                o.put_slice(&[2, 3]);
                o.put(4);
                Ok(())
            },
            |v| {
                v.extend_from_slice(&[1, 2, 3, 4]);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, [9, 1, 2, 3, 4]);
    }

    #[test]
    fn errors_leave_out_unchanged() {
        let mut out = vec![9];
        let r = write_sized(
            &mut out,
            4,
            |o| {
                o.put(1);
                Err(EncodeError::TooLarge)
            },
            |_| unreachable!(),
        );
        assert_eq!(r, Err(EncodeError::TooLarge));
        assert_eq!(out, [9]);
        let r = write_sized(&mut out, usize::MAX, |_| Ok(()), |_| Ok(()));
        assert_eq!(r, Err(EncodeError::TooLarge));
        assert_eq!(out, [9]);
    }
}
