//! An append-only log of checksummed records in numbered segment files: the storage layer of the
//! log-structured store (issue 13).
//!
//! This module owns the bytes on disk and nothing of their meaning: records are a `kind` byte
//! and an opaque payload, addressed by a stable [`Position`] (segment number, byte offset). It
//! owns the segment files (header, records, rollover at [`LogOptions::segment_bytes`]), group
//! commit (every record appended since the last [`Log::commit`] goes out in one write and one
//! `fdatasync`), recovery at [`Log::open`] (every record is checked, a torn tail of the last
//! segment is cut off and reported, damage elsewhere is refused), reads by position, retention by
//! whole segments, and one checkpoint file replaced atomically. What the records mean (inboxes,
//! timelines, dedupe, cursors) and which segments may go are the caller's: the store builds its
//! in-memory indexes from the records [`Log::open`] hands over.
//!
//! The files go through the [`Storage`] trait: [`FsStorage`] on a directory, [`sim::SimStorage`]
//! in memory for crash tests. The format is in [`format`].

pub mod format;
pub mod sim;
mod storage;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io;

pub use storage::{FsFile, FsStorage, SegmentFile, Storage};

use format::{
    Header, FORMAT_MAX_RECORD_BYTES, FORMAT_VERSION, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};

/// The first read of [`Log::read`]: a record this small takes one `pread`.
const READ_GUESS_BYTES: u64 = 512;

/// The name of the checkpoint file in the log's directory.
const CHECKPOINT_FILE: &str = "checkpoint";

/// Where a record starts: its segment and its byte offset in it. Stable until the segment is
/// deleted. Ordered like the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl Position {
    /// Before every record.
    pub const MIN: Position = Position {
        segment: 0,
        offset: 0,
    };
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {} offset {}", self.segment, self.offset)
    }
}

/// The log's bounds.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// A segment is closed and the next one started when a record would take it past this
    /// size (a record never spans segments); segment files are created at this size (sparse).
    /// At least `max_record_bytes` + 41.
    pub segment_bytes: u64,
    /// The largest payload [`Log::append`] takes ([`LogError::TooLarge`] above it); at most
    /// [`format::FORMAT_MAX_RECORD_BYTES`].
    pub max_record_bytes: usize,
    /// The most bytes appended and not yet committed: [`Log::append`] refuses a record past it
    /// with [`LogError::BatchFull`] (the caller commits, then appends again). At least
    /// `max_record_bytes` + 41. It also bounds the torn tail recovery will cut off: damage
    /// further than this before the last written byte of the last segment is refused as
    /// [`LogError::Corrupt`].
    pub max_pending_bytes: usize,
    /// Size of the reads that scan the segments at [`Log::open`].
    pub scan_chunk_bytes: usize,
    /// The largest checkpoint [`Log::write_checkpoint`] takes and [`Log::read_checkpoint`]
    /// reads.
    pub max_checkpoint_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            max_record_bytes: (1 << 20) + (64 << 10),
            max_pending_bytes: 32 << 20,
            scan_chunk_bytes: 1 << 20,
            max_checkpoint_bytes: 256 << 20,
        }
    }
}

/// Why the log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A storage call failed (not for lack of space). `op` names the call.
    #[error("log {op}: {source}")]
    Io { op: &'static str, source: io::Error },
    /// The disk or the quota is full (ENOSPC, EDQUOT); the error is kept. Recognised by
    /// [`LogError::is_storage_full`] (also through a [`crate::store::StoreError::Engine`]).
    #[error("log {op}: storage full: {source}")]
    StorageFull { op: &'static str, source: io::Error },
    /// A record or header that cannot be what this log wrote: checksum, length or segment
    /// number wrong in a segment other than the last, damage further from the end of the last
    /// segment than one batch, a missing segment, or a position that is not a record.
    #[error("log corrupt at segment {segment} offset {offset}: {detail}")]
    Corrupt {
        segment: u64,
        offset: u64,
        detail: String,
    },
    /// The checkpoint file is damaged (it is replaced atomically, so this is not a crash).
    #[error("log checkpoint corrupt: {detail}")]
    CorruptCheckpoint { detail: &'static str },
    /// A segment or checkpoint of another format version.
    #[error("log format version {found}, this build reads version {expected}")]
    Format { found: u32, expected: u32 },
    /// A record (or checkpoint) larger than its configured maximum.
    #[error("log record of {bytes} bytes, the maximum is {max}")]
    TooLarge { bytes: usize, max: usize },
    /// The records appended since the last commit would exceed
    /// [`LogOptions::max_pending_bytes`]: commit first. Nothing was appended.
    #[error("log batch full: {pending_bytes} bytes pending, the maximum is {max}")]
    BatchFull { pending_bytes: usize, max: usize },
    /// An earlier commit failed (its write or sync): whether its bytes are durable is unknown,
    /// so the log takes no more writes. Reopen (restart) to recover: recovery keeps what is
    /// valid on disk. `storage_full`: that failure was [`LogError::StorageFull`].
    #[error("log refuses writes after a failed commit ({cause}); reopen to recover")]
    Failed { cause: String, storage_full: bool },
    /// A read of a position not in the log (a deleted segment, past the committed end).
    #[error("no record at {position}")]
    NotFound { position: Position },
    /// Unusable options, or a checkpoint position past the committed end.
    #[error("log configuration: {0}")]
    Config(String),
}

impl LogError {
    fn io(op: &'static str, source: io::Error) -> Self {
        if matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) {
            LogError::StorageFull { op, source }
        } else {
            LogError::Io { op, source }
        }
    }

    /// The disk was full: now ([`LogError::StorageFull`]) or at the failed commit that stopped
    /// the log ([`LogError::Failed`]).
    pub fn is_storage_full(&self) -> bool {
        matches!(
            self,
            LogError::StorageFull { .. }
                | LogError::Failed {
                    storage_full: true,
                    ..
                }
        )
    }
}

impl From<LogError> for crate::store::StoreError {
    fn from(e: LogError) -> Self {
        use crate::store::StoreError;
        match e {
            LogError::Corrupt { .. } | LogError::CorruptCheckpoint { .. } => StoreError::Corrupt {
                table: "log",
                detail: e.to_string(),
            },
            LogError::Format { found, expected } => StoreError::Format { found, expected },
            LogError::Config(s) => StoreError::Config(s),
            // A full disk now, or at the failed commit that stopped the log.
            full if full.is_storage_full() => StoreError::Full(Box::new(full)),
            // Io, TooLarge, BatchFull, Failed (not for lack of space), NotFound.
            other => StoreError::Engine(Box::new(other)),
        }
    }
}

/// The tail recovery cut off the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub segment: u64,
    /// Where the first bad byte was: the segment now ends here.
    pub offset: u64,
    pub dropped_bytes: u64,
    pub reason: String,
}

impl fmt::Display for Truncation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log recovery dropped a torn tail of {} bytes at segment {} offset {} ({})",
            self.dropped_bytes, self.segment, self.offset, self.reason
        )
    }
}

/// What [`Log::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    /// Valid records handed to the visitor.
    pub records: u64,
    /// The torn tail that was cut off, if any: worth one line in the log.
    pub truncated: Option<Truncation>,
}

/// A committed segment, as [`Log::segments`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub segment: u64,
    /// Committed bytes (header included).
    pub bytes: u64,
    /// The first and last records (`None`: no record yet).
    pub first: Option<Position>,
    pub last: Option<Position>,
}

/// The checkpoint: the caller's snapshot and the position it covers up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub bytes: Vec<u8>,
    /// The snapshot reflects every record before this position; replay from it.
    pub upto: Position,
}

struct Segment<F> {
    file: F,
    /// The committed end (the next write's offset).
    end: u64,
    first: Option<u64>,
    last: Option<u64>,
}

/// Appended records not yet written, all for one segment, contiguous from `start`. A chunk for
/// a segment that does not exist yet starts with its header (`start` 0).
struct Chunk {
    segment: u64,
    start: u64,
    buf: Vec<u8>,
    first: Option<u64>,
    last: Option<u64>,
}

/// The log (module doc). Single writer: `&mut self` for appends and commits, `&self` for reads.
pub struct Log<S: Storage> {
    storage: S,
    opts: LogOptions,
    segments: BTreeMap<u64, Segment<S::File>>,
    /// The newest segment on disk (where committed records end).
    active: u64,
    pending: Vec<Chunk>,
    pending_bytes: usize,
    /// A written chunk's buffer, kept for the next batch (no allocation per commit).
    spare: Vec<u8>,
    failed: Option<(String, bool)>,
}

/// Sequential reads of one segment at recovery, `chunk` bytes at a time.
struct Reader<'a, F> {
    file: &'a F,
    buf: Vec<u8>,
    start: u64,
    chunk: usize,
    size: u64,
}

impl<F: SegmentFile> Reader<'_, F> {
    /// Bytes `off..off + n`; the caller checked that they are within the file.
    fn get(&mut self, off: u64, n: usize) -> Result<&[u8], LogError> {
        let have = off >= self.start && off + n as u64 <= self.start + self.buf.len() as u64;
        if !have {
            let want = (n.max(self.chunk) as u64).min(self.size - off) as usize;
            self.buf.resize(want, 0);
            self.file
                .read_at(off, &mut self.buf)
                .map_err(|e| LogError::io("read segment", e))?;
            self.start = off;
        }
        let at = (off - self.start) as usize;
        Ok(&self.buf[at..at + n])
    }
}

/// The end of one segment's scan.
struct Scanned {
    end: u64,
    first: Option<u64>,
    last: Option<u64>,
    /// The first bad record's offset and what was wrong.
    bad: Option<(u64, &'static str)>,
}

fn scan_records<F: SegmentFile, E: From<LogError>>(
    file: &F,
    segment: u64,
    size: u64,
    chunk: usize,
    records: &mut u64,
    visit: &mut impl FnMut(Position, u8, &[u8]) -> Result<(), E>,
) -> Result<Scanned, E> {
    let mut r = Reader {
        file,
        buf: Vec::new(),
        start: 0,
        chunk,
        size,
    };
    let mut s = Scanned {
        end: SEGMENT_HEADER_BYTES,
        first: None,
        last: None,
        bad: None,
    };
    let mut off = SEGMENT_HEADER_BYTES;
    while off < size {
        if size - off < RECORD_HEADER_BYTES as u64 {
            s.bad = Some((off, "short record header"));
            break;
        }
        let (len, crc) = format::record_header(r.get(off, RECORD_HEADER_BYTES)?);
        if len > FORMAT_MAX_RECORD_BYTES {
            s.bad = Some((off, "record length over the format's maximum"));
            break;
        }
        let total = RECORD_HEADER_BYTES + len;
        if size - off < total as u64 {
            s.bad = Some((off, "record past the end of the file"));
            break;
        }
        let rec = r.get(off, total)?;
        if !format::record_crc_ok(crc, &rec[RECORD_HEADER_BYTES - 1..]) {
            s.bad = Some((off, "checksum mismatch"));
            break;
        }
        visit(
            Position {
                segment,
                offset: off,
            },
            rec[RECORD_HEADER_BYTES - 1],
            &rec[RECORD_HEADER_BYTES..],
        )?;
        *records += 1;
        s.first.get_or_insert(off);
        s.last = Some(off);
        off += total as u64;
        s.end = off;
    }
    Ok(s)
}

/// The offset of the last byte that is not zero in `from..size`, `None` if all are zero.
fn last_nonzero<F: SegmentFile>(
    file: &F,
    from: u64,
    size: u64,
    chunk: usize,
) -> Result<Option<u64>, LogError> {
    let mut found = None;
    let mut buf = vec![0u8; chunk.min((size - from.min(size)) as usize)];
    let mut off = from;
    while off < size {
        let n = buf.len().min((size - off) as usize);
        file.read_at(off, &mut buf[..n])
            .map_err(|e| LogError::io("read segment", e))?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
            found = Some(off + i as u64);
        }
        off += n as u64;
    }
    Ok(found)
}

impl<S: Storage> Log<S> {
    /// Opens the log in `storage` (creating segment 1 in an empty one), checks every record of
    /// every segment in order and hands each valid one to `visit` (position, kind, payload) so
    /// that the caller rebuilds its state; an error from `visit` stops the open.
    ///
    /// A segment's records end at an all-zero record header followed by zeros (the unwritten
    /// rest of the file). A bad record or header in the last segment, within one batch
    /// ([`LogOptions::max_pending_bytes`]) of its last written byte, is a torn write of a
    /// commit that never returned: the bytes from there are zeroed (cut, synced) and
    /// [`Recovery::truncated`] says where.
    /// Anywhere else it is [`LogError::Corrupt`]; another format version is
    /// [`LogError::Format`]. Then the last segment and the directory are synced (a restart
    /// after a failed commit, without a crash, may find bytes that were never synced), so that
    /// what was visited is durable.
    pub fn open<E, F>(storage: S, opts: LogOptions, mut visit: F) -> Result<(Log<S>, Recovery), E>
    where
        E: From<LogError>,
        F: FnMut(Position, u8, &[u8]) -> Result<(), E>,
    {
        check_options(&opts)?;
        let mut log = Log {
            storage,
            opts,
            segments: BTreeMap::new(),
            active: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            spare: Vec::new(),
            failed: None,
        };
        let numbers = log
            .storage
            .list_segments()
            .map_err(|e| LogError::io("list segments", e))?;
        let mut recovery = Recovery {
            segments: numbers.len(),
            ..Recovery::default()
        };
        if numbers.is_empty() {
            log.create_first()?;
            recovery.segments = 1;
            return Ok((log, recovery));
        }
        let mut prev_end = None;
        for (i, &no) in numbers.iter().enumerate() {
            if i > 0 && numbers[i - 1] + 1 != no {
                return Err(LogError::Corrupt {
                    segment: numbers[i - 1] + 1,
                    offset: 0,
                    detail: format!("segment missing between {} and {no}", numbers[i - 1]),
                }
                .into());
            }
            let last = i + 1 == numbers.len();
            let seg = log.recover_segment(no, last, prev_end, &mut recovery, &mut visit)?;
            prev_end = Some(seg.end);
            log.segments.insert(no, seg);
            log.active = no;
        }
        // What recovery found may not be durable yet when the previous process stopped after
        // a failed commit (its bytes written, not synced; a new segment's directory entry not
        // synced) and the machine did not crash: the caller now builds on it, so sync it. Only
        // the last segment can hold unsynced bytes (a commit syncs a segment before it starts
        // the next one).
        if let Some(seg) = log.segments.get(&log.active) {
            seg.file
                .sync_data()
                .map_err(|e| LogError::io("sync segment", e))?;
        }
        log.storage
            .sync_dir()
            .map_err(|e| LogError::io("sync directory", e))?;
        Ok((log, recovery))
    }

    fn create_first(&mut self) -> Result<(), LogError> {
        self.create_segment(
            1,
            &format::segment_header(1, 0),
            SEGMENT_HEADER_BYTES,
            None,
            None,
        )
    }

    /// Creates segment `no` at its full size (sparse: no size to update at each sync) with
    /// `bytes` at its start (its header, and the records of the commit that starts it), synced,
    /// then its directory entry made durable; it becomes the active segment.
    fn create_segment(
        &mut self,
        no: u64,
        bytes: &[u8],
        end: u64,
        first: Option<u64>,
        last: Option<u64>,
    ) -> Result<(), LogError> {
        let file = self
            .storage
            .create_segment(no)
            .map_err(|e| LogError::io("create segment", e))?;
        file.truncate(self.opts.segment_bytes)
            .map_err(|e| LogError::io("size segment", e))?;
        file.write_at(0, bytes)
            .map_err(|e| LogError::io("write segment", e))?;
        file.sync_data()
            .map_err(|e| LogError::io("sync segment", e))?;
        self.storage
            .sync_dir()
            .map_err(|e| LogError::io("sync directory", e))?;
        self.segments.insert(
            no,
            Segment {
                file,
                end,
                first,
                last,
            },
        );
        self.active = no;
        Ok(())
    }

    /// Scans segment `no`. `prev_end`: where the previous segment's records ended (`None` for
    /// the oldest segment present).
    fn recover_segment<E, F>(
        &mut self,
        no: u64,
        last: bool,
        prev_end: Option<u64>,
        recovery: &mut Recovery,
        visit: &mut F,
    ) -> Result<Segment<S::File>, E>
    where
        E: From<LogError>,
        F: FnMut(Position, u8, &[u8]) -> Result<(), E>,
    {
        let file = self
            .storage
            .open_segment(no)
            .map_err(|e| LogError::io("open segment", e))?;
        let size = file.size().map_err(|e| LogError::io("stat segment", e))?;
        let mut head = vec![0u8; size.min(SEGMENT_HEADER_BYTES) as usize];
        file.read_at(0, &mut head)
            .map_err(|e| LogError::io("read segment", e))?;
        let torn_limit = self.opts.max_pending_bytes as u64;
        let chunk = self.opts.scan_chunk_bytes;
        let corrupt = |offset: u64, detail: String| LogError::Corrupt {
            segment: no,
            offset,
            detail,
        };
        match format::parse_header(&head) {
            Header::Valid(n, _) if n != no => {
                return Err(corrupt(0, format!("header names segment {n}")).into())
            }
            Header::Valid(_, recorded) => {
                if let Some(prev) = prev_end.filter(|&p| p != recorded) {
                    return Err(LogError::Corrupt {
                        segment: no - 1,
                        offset: prev,
                        detail: format!(
                            "records end at {prev}, segment {no} says {recorded}: records lost"
                        ),
                    }
                    .into());
                }
            }
            Header::Version(found) => {
                return Err(LogError::Format {
                    found,
                    expected: FORMAT_VERSION,
                }
                .into())
            }
            Header::Bad => {
                // A segment whose first write never completed (nothing in it was committed,
                // so at most a batch of bytes), or damage.
                let written = last_nonzero(&file, 0, size, chunk)?.map_or(0, |b| b + 1);
                if !last || written > torn_limit {
                    return Err(corrupt(0, "bad segment header".into()).into());
                }
                let header = format::segment_header(no, prev_end.unwrap_or(0));
                (|| {
                    file.truncate(0)?;
                    file.truncate(self.opts.segment_bytes)?;
                    file.write_at(0, &header)?;
                    file.sync_data()
                })()
                .map_err(|e| LogError::io("rewrite torn segment header", e))?;
                if written > 0 {
                    recovery.truncated = Some(Truncation {
                        segment: no,
                        offset: 0,
                        dropped_bytes: written,
                        reason: "torn segment header".into(),
                    });
                }
                return Ok(Segment {
                    file,
                    end: SEGMENT_HEADER_BYTES,
                    first: None,
                    last: None,
                });
            }
        }
        let s = scan_records(&file, no, size, chunk, &mut recovery.records, visit)?;
        if let Some((off, why)) = s.bad {
            // Zeros from here to the end: the unwritten rest of the file, its clean end.
            if let Some(last_byte) = last_nonzero(&file, off, size, chunk)? {
                let torn = last_byte + 1 - off;
                if !last || torn > torn_limit {
                    let detail = if last {
                        format!(
                            "{why}, {torn} bytes before the last written byte: more than a batch"
                        )
                    } else {
                        why.to_string()
                    };
                    return Err(corrupt(off, detail).into());
                }
                // Cut the torn bytes and give the file its full size back (zeros).
                (|| {
                    file.truncate(off)?;
                    file.truncate(size.max(self.opts.segment_bytes))?;
                    file.sync_data()
                })()
                .map_err(|e| LogError::io("truncate torn tail", e))?;
                recovery.truncated = Some(Truncation {
                    segment: no,
                    offset: off,
                    dropped_bytes: torn,
                    reason: why.into(),
                });
            }
        }
        Ok(Segment {
            file,
            end: s.end,
            first: s.first,
            last: s.last,
        })
    }

    /// The checkpoint in `storage`, read before [`Log::open`] so that the caller knows which
    /// records its snapshot already holds (those before [`Checkpoint::upto`]).
    pub fn read_checkpoint_in(
        storage: &S,
        opts: &LogOptions,
    ) -> Result<Option<Checkpoint>, LogError> {
        let Some(v) = storage
            .read_file(CHECKPOINT_FILE)
            .map_err(|e| LogError::io("read checkpoint", e))?
        else {
            return Ok(None);
        };
        if v.len() > opts.max_checkpoint_bytes + 64 {
            return Err(LogError::TooLarge {
                bytes: v.len(),
                max: opts.max_checkpoint_bytes,
            });
        }
        match format::decode_checkpoint(&v) {
            Ok((bytes, upto)) => Ok(Some(Checkpoint { bytes, upto })),
            Err(format::CheckpointError::Version(found)) => Err(LogError::Format {
                found,
                expected: FORMAT_VERSION,
            }),
            Err(format::CheckpointError::Bad(detail)) => {
                Err(LogError::CorruptCheckpoint { detail })
            }
        }
    }

    /// The checkpoint, if one was written ([`Log::read_checkpoint_in`]).
    pub fn read_checkpoint(&self) -> Result<Option<Checkpoint>, LogError> {
        Self::read_checkpoint_in(&self.storage, &self.opts)
    }

    /// Replaces the checkpoint atomically and durably: `bytes` is the caller's snapshot of
    /// every record before `upto` (at most [`Log::committed_end`]). A crash leaves the old or
    /// the new checkpoint, whole. A failure here leaves the old one and does not stop the log.
    pub fn write_checkpoint(&mut self, bytes: &[u8], upto: Position) -> Result<(), LogError> {
        if bytes.len() > self.opts.max_checkpoint_bytes {
            return Err(LogError::TooLarge {
                bytes: bytes.len(),
                max: self.opts.max_checkpoint_bytes,
            });
        }
        if upto > self.committed_end() {
            return Err(LogError::Config(format!(
                "checkpoint up to {upto}, past the committed end {}",
                self.committed_end()
            )));
        }
        self.storage
            .replace_file(CHECKPOINT_FILE, &format::encode_checkpoint(bytes, upto))
            .map_err(|e| LogError::io("write checkpoint", e))
    }

    /// Appends a record to the current batch and returns where it will be. Nothing reaches the
    /// disk before [`Log::commit`]; the position is readable after it. Refused with
    /// [`LogError::TooLarge`] above [`LogOptions::max_record_bytes`], [`LogError::BatchFull`]
    /// past [`LogOptions::max_pending_bytes`], [`LogError::Failed`] after a failed commit.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<Position, LogError> {
        self.check_failed()?;
        if payload.len() > self.opts.max_record_bytes {
            return Err(LogError::TooLarge {
                bytes: payload.len(),
                max: self.opts.max_record_bytes,
            });
        }
        let rec_bytes = RECORD_HEADER_BYTES + payload.len();
        let (segment, offset) = match self.pending.last() {
            Some(c) => (c.segment, c.start + c.buf.len() as u64),
            None => (self.active, self.committed_end().offset),
        };
        let roll =
            offset > SEGMENT_HEADER_BYTES && offset + rec_bytes as u64 > self.opts.segment_bytes;
        let added = rec_bytes
            + if roll {
                SEGMENT_HEADER_BYTES as usize
            } else {
                0
            };
        if self.pending_bytes + added > self.opts.max_pending_bytes {
            return Err(LogError::BatchFull {
                pending_bytes: self.pending_bytes,
                max: self.opts.max_pending_bytes,
            });
        }
        let (segment, offset) = if roll {
            let next = segment + 1;
            let mut buf = std::mem::take(&mut self.spare);
            buf.extend_from_slice(&format::segment_header(next, offset));
            self.pending.push(Chunk {
                segment: next,
                start: 0,
                buf,
                first: None,
                last: None,
            });
            (next, SEGMENT_HEADER_BYTES)
        } else {
            if self.pending.last().is_none_or(|c| c.segment != segment) {
                self.pending.push(Chunk {
                    segment,
                    start: offset,
                    buf: std::mem::take(&mut self.spare),
                    first: None,
                    last: None,
                });
            }
            (segment, offset)
        };
        let Some(chunk) = self.pending.last_mut() else {
            // Unreachable: a chunk was pushed above or existed.
            return Err(LogError::Config("no pending chunk".into()));
        };
        format::encode_record(&mut chunk.buf, kind, payload);
        chunk.first.get_or_insert(offset);
        chunk.last = Some(offset);
        self.pending_bytes += added;
        Ok(Position { segment, offset })
    }

    /// Writes every record appended since the last commit with one write and one `fdatasync`
    /// (per segment touched: a batch that crosses into a new segment also creates it and syncs
    /// the directory). When it returns `Ok`, the records are durable. On `Err` the batch's
    /// records may or may not be on disk (a whole-record prefix of them, after recovery) and
    /// the log refuses further writes ([`LogError::Failed`]). A commit with nothing appended
    /// does nothing.
    pub fn commit(&mut self) -> Result<(), LogError> {
        self.check_failed()?;
        let chunks = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        for chunk in chunks {
            if let Err(e) = self.write_chunk(chunk) {
                self.failed = Some((e.to_string(), e.is_storage_full()));
                return Err(e);
            }
        }
        Ok(())
    }

    fn write_chunk(&mut self, mut chunk: Chunk) -> Result<(), LogError> {
        self.write_chunk_inner(&chunk)?;
        chunk.buf.clear();
        self.spare = chunk.buf;
        Ok(())
    }

    fn write_chunk_inner(&mut self, chunk: &Chunk) -> Result<(), LogError> {
        let end = chunk.start + chunk.buf.len() as u64;
        if let Some(seg) = self.segments.get_mut(&chunk.segment) {
            seg.file
                .write_at(chunk.start, &chunk.buf)
                .map_err(|e| LogError::io("write segment", e))?;
            seg.file
                .sync_data()
                .map_err(|e| LogError::io("sync segment", e))?;
            seg.end = end;
            if seg.first.is_none() {
                seg.first = chunk.first;
            }
            seg.last = chunk.last.or(seg.last);
            return Ok(());
        }
        // A new segment, before the commit returns.
        self.create_segment(chunk.segment, &chunk.buf, end, chunk.first, chunk.last)
    }

    fn check_failed(&self) -> Result<(), LogError> {
        match &self.failed {
            Some((cause, full)) => Err(LogError::Failed {
                cause: cause.clone(),
                storage_full: *full,
            }),
            None => Ok(()),
        }
    }

    /// Bytes appended and not yet committed.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Just past the last committed record: a checkpoint taken now covers every record before
    /// it, and the next committed record is at or after it.
    pub fn committed_end(&self) -> Position {
        Position {
            segment: self.active,
            offset: self.segments.get(&self.active).map_or(0, |s| s.end),
        }
    }

    /// Reads the committed record at `pos` (a position [`Log::append`] returned or
    /// [`Log::open`] visited), checking its checksum: `(kind, payload)`.
    pub fn read(&self, pos: Position) -> Result<(u8, Vec<u8>), LogError> {
        let mut payload = Vec::new();
        let kind = self.read_into(pos, &mut payload)?;
        Ok((kind, payload))
    }

    /// [`Log::read`] into `payload` (cleared first), reusing its allocation.
    pub fn read_into(&self, pos: Position, payload: &mut Vec<u8>) -> Result<u8, LogError> {
        let seg = self
            .segments
            .get(&pos.segment)
            .filter(|s| pos.offset >= SEGMENT_HEADER_BYTES && pos.offset < s.end)
            .ok_or(LogError::NotFound { position: pos })?;
        let corrupt = |detail: &str| LogError::Corrupt {
            segment: pos.segment,
            offset: pos.offset,
            detail: detail.to_string(),
        };
        let avail = seg.end - pos.offset;
        if avail < RECORD_HEADER_BYTES as u64 {
            return Err(corrupt("not a record: past the end"));
        }
        // One read of the header and (for a small record) the payload; a second one for the
        // rest of a larger record.
        let first = avail.min(READ_GUESS_BYTES) as usize;
        payload.clear();
        payload.resize(first, 0);
        seg.file
            .read_at(pos.offset, payload)
            .map_err(|e| LogError::io("read segment", e))?;
        let (len, crc) = format::record_header(payload);
        let total = RECORD_HEADER_BYTES + len;
        if len > FORMAT_MAX_RECORD_BYTES || avail < total as u64 {
            return Err(corrupt("not a record: length past the end"));
        }
        if total > first {
            payload.resize(total, 0);
            seg.file
                .read_at(pos.offset + first as u64, &mut payload[first..])
                .map_err(|e| LogError::io("read segment", e))?;
        }
        payload.truncate(total);
        if !format::record_crc_ok(crc, &payload[RECORD_HEADER_BYTES - 1..]) {
            return Err(corrupt("checksum mismatch"));
        }
        let kind = payload[RECORD_HEADER_BYTES - 1];
        payload.drain(..RECORD_HEADER_BYTES);
        Ok(kind)
    }

    /// The committed segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|(&segment, s)| SegmentInfo {
                segment,
                bytes: s.end,
                first: s.first.map(|offset| Position { segment, offset }),
                last: s.last.map(|offset| Position { segment, offset }),
            })
            .collect()
    }

    /// Deletes every segment numbered below `segment`, never the newest one (the committed
    /// end's), oldest first, then syncs the directory; returns how many went. Their positions
    /// are no longer readable. A crash midway leaves the newer ones (the log stays contiguous).
    /// A failure here does not stop the log.
    pub fn delete_segments_before(&mut self, segment: u64) -> Result<usize, LogError> {
        let upto = segment.min(self.active);
        let doomed: Vec<u64> = self.segments.range(..upto).map(|(&n, _)| n).collect();
        let mut deleted = 0;
        for n in doomed {
            self.storage
                .delete_segment(n)
                .map_err(|e| LogError::io("delete segment", e))?;
            self.segments.remove(&n);
            deleted += 1;
        }
        if deleted > 0 {
            self.storage
                .sync_dir()
                .map_err(|e| LogError::io("sync directory", e))?;
        }
        Ok(deleted)
    }

    /// The storage (tests inspect it).
    pub fn storage(&self) -> &S {
        &self.storage
    }
}

fn check_options(o: &LogOptions) -> Result<(), LogError> {
    let record_room = (o.max_record_bytes + RECORD_HEADER_BYTES) as u64 + SEGMENT_HEADER_BYTES;
    let bad = if o.max_record_bytes > FORMAT_MAX_RECORD_BYTES {
        Some(format!(
            "max_record_bytes {} over the format's {FORMAT_MAX_RECORD_BYTES}",
            o.max_record_bytes
        ))
    } else if o.segment_bytes < record_room {
        Some(format!(
            "segment_bytes {} below max_record_bytes + {}",
            o.segment_bytes,
            RECORD_HEADER_BYTES as u64 + SEGMENT_HEADER_BYTES
        ))
    } else if (o.max_pending_bytes as u64) < record_room {
        Some(format!(
            "max_pending_bytes {} below max_record_bytes + {}",
            o.max_pending_bytes,
            RECORD_HEADER_BYTES as u64 + SEGMENT_HEADER_BYTES
        ))
    } else if o.scan_chunk_bytes == 0 {
        Some("scan_chunk_bytes 0".to_string())
    } else {
        None
    };
    bad.map_or(Ok(()), |s| Err(LogError::Config(s)))
}
