//! Frames shared by many connections' outputs. A group message (or a presence change, or a
//! user's devices) goes to thousands of connections in the same bytes; instead of copying
//! them onto each member's output, [`Shard::emit_many`](super::Shard) appends them once to a
//! chunk of this log and gives each member whose output is empty a [`SharedRef`]: a range of
//! that chunk. A member that gets the next frame of the same chunk while still holding the
//! one before (the usual case under load: several messages between two writes) has its
//! range extended, so its output stays one contiguous slice of hot, shared memory that the
//! driver writes from directly. What cannot be shared (a frame for a member with bytes of its
//! own queued, a range that is not the chunk's end, a full log) is copied as before; a
//! connection's output is always its shared range first, then its own bytes.
//!
//! Each chunk counts the connections that hold a range of it. A chunk that is full is
//! closed and freed when its last range is written (or dropped); the open chunk of an
//! encoding starts again from its beginning whenever no range holds it.
//!
//! Bounds: chunks of at most [`CHUNK_BYTES`] (offsets fit in a `u16`), at most
//! [`MAX_CHUNKS`] per shard (2 MiB in all), one open chunk per encoding; an open chunk no
//! range held for [`IDLE_MS`] is freed.

use crate::codec::CodecId;

/// The bytes of one chunk at most (and so of one shared frame).
pub const CHUNK_BYTES: usize = 32 * 1024;
/// Chunks per shard at most, open or closed; beyond them frames are copied.
pub const MAX_CHUNKS: usize = 64;
/// An open chunk that nothing held for this long gives its memory back.
pub const IDLE_MS: u64 = 1_000;

/// A connection's transport and codec: connections with the same encoding get the same
/// bytes for the same envelope.
pub(super) type Encoding = (bool, CodecId);

/// A range of a chunk held by one connection (`start == end`: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SharedRef {
    chunk: u16,
    start: u16,
    end: u16,
}

impl SharedRef {
    pub(super) fn len(&self) -> usize {
        usize::from(self.end - self.start)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

struct Chunk {
    buf: Vec<u8>,
    /// Connections holding a range of it.
    refs: u32,
    /// The encoding that appends to it, while it is open.
    open: Option<Encoding>,
    /// Appended to since the last sweep.
    used: bool,
}

/// The shard's chunks (see the module doc).
#[derive(Default)]
pub(super) struct FrameLog {
    chunks: Vec<Chunk>,
    /// Slots of `chunks` free for a new chunk.
    free: Vec<u16>,
    /// When the last sweep looked (monotonic ms).
    swept_ms: u64,
}

impl FrameLog {
    /// Appends `frame` to the open chunk of `enc` (opening one if there is none or it is
    /// full): the range it takes, for [`FrameLog::attach`] or [`FrameLog::extend`]. `None`
    /// when the frame is larger than a chunk or every chunk is in use: the caller copies.
    pub(super) fn append(&mut self, enc: Encoding, frame: &[u8]) -> Option<SharedRef> {
        if frame.is_empty() || frame.len() > CHUNK_BYTES {
            return None;
        }
        let open = self.chunks.iter().position(|c| c.open == Some(enc));
        if let Some(i) = open {
            let c = &mut self.chunks[i];
            if c.refs == 0 {
                // Nothing holds what is there: start again from the beginning.
                c.buf.clear();
            }
        }
        let slot = match open {
            Some(i) if self.chunks[i].buf.len() + frame.len() <= CHUNK_BYTES => i,
            _ => {
                if let Some(i) = open {
                    // Full, and held (an unheld chunk was emptied above): closed, and freed
                    // when its last holder lets it go.
                    self.chunks[i].open = None;
                }
                self.open_chunk(enc)?
            }
        };
        let c = &mut self.chunks[slot];
        if c.buf.capacity() == 0 {
            c.buf.reserve_exact(CHUNK_BYTES);
        }
        let start = c.buf.len();
        c.buf.extend_from_slice(frame);
        c.used = true;
        // Bounded by CHUNK_BYTES and MAX_CHUNKS, which fit in a u16 (asserted below).
        Some(SharedRef {
            chunk: slot as u16,
            start: start as u16,
            end: c.buf.len() as u16,
        })
    }

    fn open_chunk(&mut self, enc: Encoding) -> Option<usize> {
        let slot = match self.free.pop() {
            Some(i) => usize::from(i),
            None if self.chunks.len() < MAX_CHUNKS => {
                self.chunks.push(Chunk {
                    buf: Vec::new(),
                    refs: 0,
                    open: None,
                    used: false,
                });
                self.chunks.len() - 1
            }
            None => return None,
        };
        let c = &mut self.chunks[slot];
        debug_assert!(c.refs == 0 && c.open.is_none() && c.buf.is_empty());
        c.open = Some(enc);
        Some(slot)
    }

    /// A connection with nothing queued takes `r` as its output.
    pub(super) fn attach(&mut self, held: &mut SharedRef, r: SharedRef) {
        debug_assert!(held.is_empty() && !r.is_empty());
        self.chunks[usize::from(r.chunk)].refs += 1;
        *held = r;
    }

    /// Extends `held` by `r` when `r` follows it in the same chunk (true); otherwise the
    /// caller copies the frame.
    pub(super) fn extend(held: &mut SharedRef, r: SharedRef) -> bool {
        if !held.is_empty() && held.chunk == r.chunk && held.end == r.start {
            held.end = r.end;
            return true;
        }
        false
    }

    /// The bytes of `r`.
    pub(super) fn bytes(&self, r: &SharedRef) -> &[u8] {
        if r.is_empty() {
            return &[];
        }
        &self.chunks[usize::from(r.chunk)].buf[usize::from(r.start)..usize::from(r.end)]
    }

    /// `n` bytes of `held` were written (at most its length): the rest of the range; the
    /// chunk is let go once it is all written.
    pub(super) fn consume(&mut self, held: &mut SharedRef, n: usize) {
        debug_assert!(n <= held.len());
        // n <= held.len() <= CHUNK_BYTES.
        held.start += n.min(held.len()) as u16;
        if held.is_empty() {
            self.release(held);
        }
    }

    /// Drops `held` (the connection is gone, or its output dropped).
    pub(super) fn release(&mut self, held: &mut SharedRef) {
        let chunk = usize::from(held.chunk);
        if held.end != 0 {
            // Attached ranges end after their start, and a held range keeps its end.
            let c = &mut self.chunks[chunk];
            debug_assert!(c.refs > 0);
            c.refs -= 1;
            self.free_if_unheld(chunk);
        }
        *held = SharedRef::default();
    }

    fn free_if_unheld(&mut self, i: usize) {
        let c = &mut self.chunks[i];
        if c.refs == 0 && c.open.is_none() {
            c.buf = Vec::new();
            self.free.push(i as u16);
        }
    }

    /// Called on every tick: an open chunk nothing held or appended to since the last
    /// sweep, [`IDLE_MS`] ago at least, is freed.
    pub(super) fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.swept_ms) < IDLE_MS {
            return;
        }
        self.swept_ms = now_ms;
        for i in 0..self.chunks.len() {
            let c = &mut self.chunks[i];
            if c.open.is_some() && c.refs == 0 && !std::mem::take(&mut c.used) {
                c.open = None;
                self.free_if_unheld(i);
            }
        }
    }

    /// Chunks in use (open, or held).
    #[cfg(test)]
    pub(super) fn chunks_in_use(&self) -> usize {
        self.chunks.len() - self.free.len()
    }
}

// Offsets within a chunk and chunk slots are u16s.
const _: () = assert!(CHUNK_BYTES <= u16::MAX as usize);
const _: () = assert!(MAX_CHUNKS <= u16::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;

    const JSON_WS: Encoding = (true, CodecId::Json);
    const PB_TCP: Encoding = (false, CodecId::Protobuf);

    #[test]
    fn consecutive_frames_extend_one_range_and_the_chunk_is_reused_once_written() {
        let mut log = FrameLog::default();
        let (mut a, mut b) = (SharedRef::default(), SharedRef::default());
        let r1 = log.append(JSON_WS, b"one").unwrap();
        log.attach(&mut a, r1);
        log.attach(&mut b, r1);
        let r2 = log.append(JSON_WS, b"two").unwrap();
        assert!(FrameLog::extend(&mut a, r2));
        assert_eq!(log.bytes(&a), b"onetwo");
        // b wrote its first frame meanwhile: the second does not follow what it holds.
        log.consume(&mut b, 3);
        assert!(b.is_empty());
        assert!(!FrameLog::extend(&mut b, r2));
        // Another encoding has a chunk of its own.
        let r3 = log.append(PB_TCP, b"pb").unwrap();
        assert_ne!(r3.chunk, r2.chunk);
        assert!(!FrameLog::extend(&mut a, r3));
        // Partly written, then the rest.
        log.consume(&mut a, 4);
        assert_eq!(log.bytes(&a), b"wo");
        log.consume(&mut a, 2);
        assert!(a.is_empty());
        // Nothing holds the JSON chunk now: the next frame starts it again from the beginning.
        let r4 = log.append(JSON_WS, b"four").unwrap();
        assert_eq!((r4.chunk, r4.start), (r1.chunk, 0));
        assert_eq!(log.chunks_in_use(), 2);
    }

    #[test]
    fn full_chunks_are_closed_and_freed_when_written_and_the_count_is_bounded() {
        let mut log = FrameLog::default();
        let frame = vec![7u8; CHUNK_BYTES / 2];
        // Too large for a chunk, or empty: not shared.
        assert!(log.append(JSON_WS, &vec![0; CHUNK_BYTES + 1]).is_none());
        assert!(log.append(JSON_WS, &[]).is_none());
        // Every chunk held by a connection that does not write: two frames each.
        let mut held = Vec::new();
        for _ in 0..MAX_CHUNKS * 2 {
            let r = log.append(JSON_WS, &frame).unwrap();
            let mut h = SharedRef::default();
            log.attach(&mut h, r);
            held.push(h);
        }
        assert_eq!(log.chunks_in_use(), MAX_CHUNKS);
        // The bound: no chunk left, the caller copies.
        assert!(log.append(JSON_WS, &frame).is_none());
        assert!(log.append(PB_TCP, b"x").is_none());
        // The first chunk is closed (full): written by both holders, it is free again.
        let first = held[0].chunk;
        log.consume(&mut held[0], frame.len());
        assert_eq!(log.chunks_in_use(), MAX_CHUNKS);
        log.release(&mut held[1]);
        assert_eq!(log.chunks_in_use(), MAX_CHUNKS - 1);
        let r = log.append(PB_TCP, b"x").unwrap();
        assert_eq!(r.chunk, first);
        for h in &mut held[2..] {
            log.release(h);
        }
        // The last JSON chunk was closed by the append that found no chunk for the next
        // frame, and is free now; the open Protobuf chunk stays until the sweep finds it
        // unused.
        assert_eq!(log.chunks_in_use(), 1);
        log.sweep(IDLE_MS);
        assert_eq!(log.chunks_in_use(), 1, "used since the last sweep");
        log.sweep(2 * IDLE_MS - 1);
        assert_eq!(log.chunks_in_use(), 1, "not a second since the last sweep");
        log.sweep(2 * IDLE_MS);
        assert_eq!(log.chunks_in_use(), 0);
    }
}
