//! The bytes on disk: segment headers, records and the checkpoint file (format version 1).
//!
//! ```text
//! segment header (32 bytes): magic "IMGWLOG\0" | version: u32 LE | segment: u64 LE
//!                            | prev_end: u64 LE | crc32: u32 LE (of the 28 bytes before)
//! record (9 + len bytes):    len: u32 LE | crc32: u32 LE (of kind ‖ payload) | kind: u8 | payload (len bytes)
//! checkpoint file:           magic "IMGWCKPT" | version: u32 LE | upto segment: u64 LE | upto offset: u64 LE
//!                            | len: u64 LE | payload (len bytes) | crc32: u32 LE (of everything before it)
//! ```
//!
//! CRC-32 is the IEEE polynomial (`crc32fast`). Records follow the header back to back. A
//! segment file is created at its full size (`segment_bytes`, sparse) so that a commit's
//! `fdatasync` has no file size to update; its records end at the first all-zero record header
//! followed by zeros to the end of the file (no valid record is all zeros: the checksum of a
//! zero kind byte is not 0). `prev_end` is where the previous segment's records end (0 in
//! segment 1), so that recovery notices a previous segment that lost committed records at its
//! end.

use super::Position;

pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"IMGWLOG\0";
pub(crate) const CHECKPOINT_MAGIC: [u8; 8] = *b"IMGWCKPT";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a segment header; the first record of a segment is at this offset.
pub const SEGMENT_HEADER_BYTES: u64 = 32;
/// Bytes before a record's payload (`len`, `crc32`, `kind`).
pub const RECORD_HEADER_BYTES: usize = 9;
/// The largest payload the format admits whatever the options (a length field above it is
/// damage, not a record).
pub const FORMAT_MAX_RECORD_BYTES: usize = 64 << 20;
const CHECKPOINT_FIXED_BYTES: usize = 8 + 4 + 8 + 8 + 8 + 4;

pub(crate) fn segment_header(segment: u64, prev_end: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&segment.to_le_bytes());
    h[20..28].copy_from_slice(&prev_end.to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What a segment header says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Header {
    /// Valid: the segment number and the previous segment's end.
    Valid(u64, u64),
    /// Valid magic and checksum, another format version.
    Version(u32),
    /// Short, torn or not a header.
    Bad,
}

pub(crate) fn parse_header(h: &[u8]) -> Header {
    if h.len() < SEGMENT_HEADER_BYTES as usize || h[..8] != SEGMENT_MAGIC {
        return Header::Bad;
    }
    if crc32fast::hash(&h[..28]) != le_u32(&h[28..32]) {
        return Header::Bad;
    }
    let version = le_u32(&h[8..12]);
    if version != FORMAT_VERSION {
        return Header::Version(version);
    }
    Header::Valid(le_u64(&h[12..20]), le_u64(&h[20..28]))
}

/// `b` holds at least 4 bytes (every caller slices or checked the length).
pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// `b` holds at least 8 bytes (every caller slices or checked the length).
pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Appends one record to `buf`. The caller has bounded `payload` (it fits a `u32`).
pub(crate) fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&h.finalize().to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

/// The record header's `(payload len, crc)`; `h` holds at least 8 bytes.
pub(crate) fn record_header(h: &[u8]) -> (usize, u32) {
    (le_u32(&h[..4]) as usize, le_u32(&h[4..8]))
}

/// Whether `crc` is that of `kind_and_payload` (the kind byte, then the payload).
pub(crate) fn record_crc_ok(crc: u32, kind_and_payload: &[u8]) -> bool {
    crc32fast::hash(kind_and_payload) == crc
}

pub(crate) fn encode_checkpoint(bytes: &[u8], upto: Position) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHECKPOINT_FIXED_BYTES + bytes.len());
    v.extend_from_slice(&CHECKPOINT_MAGIC);
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    v.extend_from_slice(&upto.segment.to_le_bytes());
    v.extend_from_slice(&upto.offset.to_le_bytes());
    v.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    v.extend_from_slice(bytes);
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// Why a checkpoint file was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CheckpointError {
    Version(u32),
    Bad(&'static str),
}

pub(crate) fn decode_checkpoint(v: &[u8]) -> Result<(Vec<u8>, Position), CheckpointError> {
    if v.len() < CHECKPOINT_FIXED_BYTES || v[..8] != CHECKPOINT_MAGIC {
        return Err(CheckpointError::Bad("short file or bad magic"));
    }
    let (body, crc) = v.split_at(v.len() - 4);
    if crc32fast::hash(body) != le_u32(crc) {
        return Err(CheckpointError::Bad("checksum mismatch"));
    }
    let version = le_u32(&v[8..12]);
    if version != FORMAT_VERSION {
        return Err(CheckpointError::Version(version));
    }
    let upto = Position {
        segment: le_u64(&v[12..20]),
        offset: le_u64(&v[20..28]),
    };
    let len = le_u64(&v[28..36]);
    if len != (body.len() - 36) as u64 {
        return Err(CheckpointError::Bad("length mismatch"));
    }
    Ok((body[36..].to_vec(), upto))
}
