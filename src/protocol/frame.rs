//! The raw-TCP frame layer: a fixed 12-byte header, TLV extensions, then the codec payload.
//!
//! This module owns the byte layout of docs/PROTOCOL.md section 2 and its incremental decoder.
//! The decoder takes the bytes a connection has buffered so far (split and coalesced frames
//! alike), refuses a frame above the configured maximum as soon as its header is readable, that
//! is before its body is buffered, and hands out the payload and extensions as [`Bytes`] slices of
//! the input without copying them.
//!
//! ```text
//! offset  size  field
//!  0      2     magic "IW" (0x49 0x57)
//!  2      1     version (1)
//!  3      1     op number
//!  4      1     codec id
//!  5      1     flags (none defined in v1; receivers ignore unknown bits, senders send 0)
//!  6      2     extensions length, big endian
//!  8      4     payload length, big endian
//! 12      ext   extensions: repeated { type u16 BE, length u16 BE, value }
//! 12+ext  len   payload (codec bytes)
//! ```

use bytes::{Buf, Bytes, BytesMut};

use crate::codec::{CodecId, EncodeError};
use crate::protocol::{Envelope, CURRENT_VERSION, PREVIOUS_VERSION};

/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
/// The two magic bytes, "IW".
pub const MAGIC: [u8; 2] = *b"IW";
/// Default maximum frame size (header + extensions + payload).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 64 * 1024;

/// Extension type: opaque trace id (at most 64 bytes), echoed on replies and deliveries.
pub const EXT_TRACE_ID: u16 = 0x0001;
/// Extension type: client send time, u64 microseconds since the Unix epoch, big endian.
pub const EXT_CLIENT_TS_US: u16 = 0x0002;
/// Extension types from here up are for private use and never defined by the protocol.
pub const EXT_PRIVATE_START: u16 = 0x8000;

/// Why the frame layer refused the bytes. Every variant closes the connection: after one of
/// them the stream position is unknown.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bytes are not "IW" (not our protocol, or a desynchronized stream).
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// The header's version is neither the current nor the previous protocol version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The header names a codec id this build does not know.
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    /// The frame's total size exceeds the configured maximum; refused before buffering it.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u32 },
    /// The extension block is not a whole number of well-formed TLV entries.
    #[error("malformed extensions")]
    BadExtensions,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    /// The raw op number: unknown numbers are kept so the session can answer `unsupported`.
    pub op: u8,
    pub codec: CodecId,
    pub flags: u8,
    pub ext_len: u16,
    pub payload_len: u32,
}

impl Header {
    /// Total frame length (header + extensions + payload).
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.ext_len) + u64::from(self.payload_len)
    }

    /// Parses and checks a header from the start of `buf`; `Ok(None)` if fewer than
    /// [`HEADER_LEN`] bytes are there yet. Checks the size against `max_frame_bytes`.
    pub fn parse(buf: &[u8], max_frame_bytes: u32) -> Result<Option<Header>, FrameError> {
        // Check the magic as soon as its bytes arrive so garbage is refused early.
        match buf {
            [a, ..] if *a != MAGIC[0] => return Err(FrameError::BadMagic([*a, 0])),
            [a, b, ..] if [*a, *b] != MAGIC => return Err(FrameError::BadMagic([*a, *b])),
            _ => {}
        }
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let version = h[2];
        if version != CURRENT_VERSION && version != PREVIOUS_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let codec = CodecId::from_u8(h[4]).ok_or(FrameError::UnknownCodec(h[4]))?;
        let header = Header {
            version,
            op: h[3],
            codec,
            flags: h[5],
            ext_len: u16::from_be_bytes([h[6], h[7]]),
            payload_len: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
        };
        if header.frame_len() > u64::from(max_frame_bytes) {
            return Err(FrameError::TooLarge {
                len: header.frame_len(),
                max: max_frame_bytes,
            });
        }
        Ok(Some(header))
    }

    /// Writes the 12 header bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[self.version, self.op, self.codec as u8, self.flags]);
        out.extend_from_slice(&self.ext_len.to_be_bytes());
        out.extend_from_slice(&self.payload_len.to_be_bytes());
    }
}

/// One complete frame; `ext` and `payload` share the input's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    /// The raw extension block (validated TLV).
    pub ext: Bytes,
    pub payload: Bytes,
}

impl Frame {
    /// The extensions, in order. Unknown types are yielded too; callers skip what they ignore.
    pub fn extensions(&self) -> Extensions<'_> {
        Extensions { rest: &self.ext }
    }

    /// The value of the first extension of type `ty`, if any.
    pub fn extension(&self, ty: u16) -> Option<&[u8]> {
        self.extensions().find(|(t, _)| *t == ty).map(|(_, v)| v)
    }
}

/// Iterator over a validated extension block.
pub struct Extensions<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Extensions<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (ty, value, rest) = split_tlv(self.rest)?;
        self.rest = rest;
        Some((ty, value))
    }
}

fn split_tlv(buf: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let head = buf.get(..4)?;
    let ty = u16::from_be_bytes([head[0], head[1]]);
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let value = buf.get(4..4 + len)?;
    Some((ty, value, &buf[4 + len..]))
}

fn validate_extensions(mut buf: &[u8]) -> Result<(), FrameError> {
    while !buf.is_empty() {
        let (_, _, rest) = split_tlv(buf).ok_or(FrameError::BadExtensions)?;
        buf = rest;
    }
    Ok(())
}

/// The incremental decoder. Stateless apart from its limit: the caller owns the buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    pub max_frame_bytes: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameDecoder { max_frame_bytes }
    }

    /// How many more bytes `buf` needs before the next frame is complete (0 when it is, or
    /// when the header is not readable yet and any read will do). Lets a reader size its read.
    pub fn needed(&self, buf: &[u8]) -> Result<usize, FrameError> {
        match Header::parse(buf, self.max_frame_bytes)? {
            Some(h) => Ok((h.frame_len() as usize).saturating_sub(buf.len())),
            None => Ok(0),
        }
    }

    /// Takes one complete frame off the front of `buf`, or returns `Ok(None)` when more bytes
    /// are needed (nothing is consumed). On error the connection must be closed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = Header::parse(buf, self.max_frame_bytes)? else {
            return Ok(None);
        };
        // Bounded by max_frame_bytes (u32) above, so the cast cannot truncate.
        let total = header.frame_len() as usize;
        if buf.len() < total {
            // Reserve what the frame needs (bounded by the maximum) so the next reads do not
            // reallocate repeatedly.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let ext_end = HEADER_LEN + usize::from(header.ext_len);
        validate_extensions(&buf[HEADER_LEN..ext_end])?;
        let mut frame = buf.split_to(total);
        frame.advance(HEADER_LEN);
        let ext = frame.split_to(usize::from(header.ext_len)).freeze();
        Ok(Some(Frame {
            header,
            ext,
            payload: frame.freeze(),
        }))
    }
}

/// Appends one extension entry to an extension block being built.
pub fn push_extension(block: &mut Vec<u8>, ty: u16, value: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(value.len()).map_err(|_| EncodeError::TooLarge)?;
    block.extend_from_slice(&ty.to_be_bytes());
    block.extend_from_slice(&len.to_be_bytes());
    block.extend_from_slice(value);
    Ok(())
}

/// Appends a whole frame carrying `env` encoded with `codec` to `out`. The payload is encoded
/// in place after a placeholder header, which is then patched: no intermediate copy.
/// `ext` is a TLV block built with [`push_extension`] (may be empty).
pub fn write_frame(
    out: &mut Vec<u8>,
    codec: CodecId,
    ext: &[u8],
    env: &Envelope,
) -> Result<(), EncodeError> {
    let ext_len = u16::try_from(ext.len()).map_err(|_| EncodeError::TooLarge)?;
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(ext);
    let payload_start = out.len();
    if let Err(e) = codec.encode(env, out) {
        out.truncate(start);
        return Err(e);
    }
    let payload_len = match u32::try_from(out.len() - payload_start) {
        Ok(n) => n,
        Err(_) => {
            out.truncate(start);
            return Err(EncodeError::TooLarge);
        }
    };
    let header = Header {
        version: CURRENT_VERSION,
        op: env.msg.op() as u8,
        codec,
        flags: 0,
        ext_len,
        payload_len,
    };
    let mut head = Vec::with_capacity(HEADER_LEN);
    header.write(&mut head);
    out[start..start + HEADER_LEN].copy_from_slice(&head);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Message, Ping};

    fn ping_frame(codec: CodecId, ts: u64, ext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(
            &mut out,
            codec,
            ext,
            &Envelope::new(Message::Ping(Ping { ts })),
        )
        .unwrap();
        out
    }

    #[test]
    fn split_and_coalesced() {
        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_TRACE_ID, b"abc").unwrap();
        push_extension(&mut ext, 0x9999, b"").unwrap();
        let mut stream = Vec::new();
        for i in 0..5 {
            stream.extend(ping_frame(CodecId::Json, i, &ext));
        }
        let dec = FrameDecoder::default();
        for chunk in [1usize, 2, 3, 7, 13, 64, 1000] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    got.push(f);
                }
            }
            assert!(buf.is_empty());
            assert_eq!(got.len(), 5);
            for (i, f) in got.iter().enumerate() {
                assert_eq!(f.extension(EXT_TRACE_ID), Some(&b"abc"[..]));
                assert_eq!(f.extensions().count(), 2);
                let env = f.header.codec.decode(&f.payload).unwrap();
                assert_eq!(env.msg, Message::Ping(Ping { ts: i as u64 }));
            }
        }
    }

    #[test]
    fn oversize_refused_from_header_alone() {
        let mut head = Vec::new();
        Header {
            version: 1,
            op: 5,
            codec: CodecId::Protobuf,
            flags: 0,
            ext_len: 0,
            payload_len: 1 << 30,
        }
        .write(&mut head);
        let mut buf = BytesMut::from(&head[..]);
        assert!(matches!(
            FrameDecoder::new(4096).decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        // Nothing was reserved for the body.
        assert!(buf.capacity() < 4096);
    }

    #[test]
    fn bad_magic_version_codec_ext() {
        let dec = FrameDecoder::default();
        let good = ping_frame(CodecId::Json, 1, &[]);
        let mut b = good.clone();
        b[0] = b'G';
        assert!(matches!(
            dec.decode(&mut BytesMut::from(&b[..1])),
            Err(FrameError::BadMagic(_))
        ));
        b = good.clone();
        b[2] = 9;
        assert_eq!(
            dec.decode(&mut BytesMut::from(&b[..])),
            Err(FrameError::UnsupportedVersion(9))
        );
        b = good.clone();
        b[4] = 77;
        assert_eq!(
            dec.decode(&mut BytesMut::from(&b[..])),
            Err(FrameError::UnknownCodec(77))
        );
        // ext_len 3: not a whole TLV entry.
        let mut f = Vec::new();
        Header {
            version: 1,
            op: 3,
            codec: CodecId::Json,
            flags: 0,
            ext_len: 3,
            payload_len: 0,
        }
        .write(&mut f);
        f.extend_from_slice(&[0, 1, 0]);
        assert_eq!(
            dec.decode(&mut BytesMut::from(&f[..])),
            Err(FrameError::BadExtensions)
        );
    }
}
