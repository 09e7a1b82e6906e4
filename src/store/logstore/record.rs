//! The log store's records: what one committed write of the inbox store looks like on disk.
//!
//! This module owns the byte layout of the payloads the log store appends (the log layer,
//! `super::super::log`, frames each payload with its length, kind byte and checksum). The
//! layout is the store's own and versioned by the segment header's format version, not the
//! wire Protobuf envelope: a codec change on the wire never changes what is on disk.
//!
//! Layout: integers little-endian; an id (tenant, user, group, member, device, sender, cmid) is
//! a `u16` length and its UTF-8 bytes (ids are at most [`MAX_ID_BYTES`]); any other string (a
//! body, a kind, an extension) is a `u32` length and its bytes; an optional value is a tag byte
//! (0 absent) and the value.

use bytes::Bytes;

use crate::protocol::{Deliver, Ext, Str, Target};
use crate::store::{GroupRef, UserRef, MAX_ID_BYTES};

/// The kind byte of each record.
pub mod kind {
    /// The end of a committed batch: the store's clock (`now_ms`, never decreasing) and how
    /// many records the batch wrote before it. Recovery applies a batch only when it reaches
    /// its end record, so a torn batch is never half-applied.
    pub const BATCH: u8 = 1;
    /// A message appended to an inbox.
    pub const INBOX: u8 = 2;
    /// A message appended to a group timeline.
    pub const GROUP: u8 = 3;
    /// A device cursor written.
    pub const CURSOR: u8 = 4;
    /// A device cursor evicted.
    pub const CURSOR_GONE: u8 = 5;
    /// A member's group cursor written.
    pub const GROUP_CURSOR: u8 = 6;
    /// A member joined (with its starting group cursor).
    pub const JOIN: u8 = 7;
    /// A member left.
    pub const LEAVE: u8 = 8;
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The payload ended inside a field.
    #[error("record truncated")]
    Truncated,
    /// A string was not UTF-8.
    #[error("record holds a string that is not UTF-8")]
    NotUtf8,
    /// A tag byte has no meaning here.
    #[error("record holds an unknown tag {0}")]
    BadTag(u8),
    /// The kind byte names no record of this format.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// Bytes were left after the last field.
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    /// An id longer than [`MAX_ID_BYTES`] or a string longer than `u32::MAX` bytes.
    #[error("a field is too long to encode")]
    TooLong,
}

/// A message appended to an inbox (`INBOX`) or a group timeline (`GROUP`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub tenant: Str,
    /// The user (inbox) or the group (timeline).
    pub owner: Str,
    pub seq: u64,
    pub sender: Str,
    pub cmid: Str,
    /// The store's clock when it was appended: dates its dedupe record.
    pub stored_at_ms: u64,
    /// The message, encoded by [`encode_deliver`] (checked when it is decoded, by
    /// [`decode_deliver`]: replay only reads its `mid` and `ts`).
    pub deliver: Bytes,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Batch {
        now_ms: u64,
        records: u32,
    },
    Inbox(Appended),
    Group(Appended),
    Cursor {
        user: UserRef,
        device: Str,
        seq: u64,
    },
    CursorGone {
        user: UserRef,
        device: Str,
    },
    GroupCursor {
        group: GroupRef,
        member: Str,
        gseq: u64,
    },
    Join {
        group: GroupRef,
        member: Str,
        gseq: u64,
    },
    Leave {
        group: GroupRef,
        member: Str,
    },
}

/// Builds one payload.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn id(&mut self, s: &str) -> Result<(), RecordError> {
        let len = u16::try_from(s.len()).map_err(|_| RecordError::TooLong)?;
        debug_assert!(s.len() <= MAX_ID_BYTES);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn text(&mut self, s: &str) -> Result<(), RecordError> {
        let len = u32::try_from(s.len()).map_err(|_| RecordError::TooLong)?;
        self.u32(len);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Reads one payload. A message's strings share its buffer (`shared`, read path: a body is
/// not copied); a record's ids are copied (they are short, and held inline by `Str`), so that
/// replay makes no shared buffer per record.
struct Reader<'a> {
    buf: &'a [u8],
    shared: Option<&'a Bytes>,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, RecordError> {
        let end = self.at.checked_add(n).ok_or(RecordError::Truncated)?;
        if end > self.buf.len() {
            return Err(RecordError::Truncated);
        }
        let r = self.at..end;
        self.at = end;
        Ok(r)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        let r = self.take(1)?;
        Ok(self.buf[r.start])
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let r = self.take(4)?;
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.buf[r]);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let r = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[r]);
        Ok(u64::from_le_bytes(b))
    }
    fn str_of(&mut self, len: usize) -> Result<Str, RecordError> {
        let r = self.take(len)?;
        match self.shared {
            Some(b) => Str::from_utf8(b.slice(r)),
            None => Str::try_from(&self.buf[r]),
        }
        .map_err(|_| RecordError::NotUtf8)
    }
    fn id(&mut self) -> Result<Str, RecordError> {
        let r = self.take(2)?;
        let len = u16::from_le_bytes([self.buf[r.start], self.buf[r.start + 1]]);
        self.str_of(usize::from(len))
    }
    fn text(&mut self) -> Result<Str, RecordError> {
        let len = self.u32()?;
        self.str_of(len as usize)
    }
    fn end(&self) -> Result<(), RecordError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(RecordError::Trailing(n)),
        }
    }
}

/// Encodes a message's fields (not its `inbox_seq`: the record's `seq` holds it) into `out`
/// (cleared first): the message part of an [`Appended`] record. `mid` and `ts` come first, so
/// that [`mid_and_ts`] reads them without decoding the rest.
pub fn encode_deliver(d: &Deliver, out: &mut Vec<u8>) -> Result<(), RecordError> {
    out.clear();
    let w = &mut Writer(out);
    w.u64(d.mid);
    w.u64(d.ts);
    w.id(&d.from)?;
    match &d.to {
        None => w.u8(0),
        Some(Target::User(u)) => {
            w.u8(1);
            w.id(u)?;
        }
        Some(Target::Group(g)) => {
            w.u8(2);
            w.id(g)?;
        }
    }
    match &d.kind {
        None => w.u8(0),
        Some(k) => {
            w.u8(1);
            w.text(k)?;
        }
    }
    w.text(&d.body)?;
    let n = u32::try_from(d.ext.len()).map_err(|_| RecordError::TooLong)?;
    w.u32(n);
    for (k, v) in d.ext.iter() {
        w.text(k)?;
        w.text(v)?;
    }
    Ok(())
}

/// The `mid` and `ts` of an encoded message.
pub fn mid_and_ts(b: &[u8]) -> Result<(u64, u64), RecordError> {
    let r = &mut Reader {
        buf: b,
        shared: None,
        at: 0,
    };
    Ok((r.u64()?, r.u64()?))
}

/// Decodes a message encoded by [`encode_deliver`] (`inbox_seq` 0); its strings share `b`.
pub fn decode_deliver(b: &Bytes) -> Result<Deliver, RecordError> {
    let r = &mut Reader {
        buf: b,
        shared: Some(b),
        at: 0,
    };
    let mid = r.u64()?;
    let ts = r.u64()?;
    let from = r.id()?;
    let to = match r.u8()? {
        0 => None,
        1 => Some(Target::User(r.id()?)),
        2 => Some(Target::Group(r.id()?)),
        t => return Err(RecordError::BadTag(t)),
    };
    let kind = match r.u8()? {
        0 => None,
        1 => Some(r.text()?),
        t => return Err(RecordError::BadTag(t)),
    };
    let body = r.text()?;
    let n = r.u32()?;
    // Each entry takes at least 8 bytes: a count the bytes cannot hold is damage, and must not
    // size an allocation.
    if n as usize > (r.buf.len() - r.at) / 8 {
        return Err(RecordError::Truncated);
    }
    let mut ext = Ext::with_capacity(n as usize);
    for _ in 0..n {
        let k = r.text()?;
        let v = r.text()?;
        ext.insert(k, v);
    }
    r.end()?;
    Ok(Deliver {
        mid,
        from,
        to,
        inbox_seq: 0,
        ts,
        kind,
        body,
        ext,
    })
}

fn put_appended(w: &mut Writer<'_>, a: &Appended) -> Result<(), RecordError> {
    w.id(&a.tenant)?;
    w.id(&a.owner)?;
    w.u64(a.seq);
    w.id(&a.sender)?;
    w.id(&a.cmid)?;
    w.u64(a.stored_at_ms);
    w.0.extend_from_slice(&a.deliver);
    Ok(())
}

fn get_appended(r: &mut Reader<'_>) -> Result<Appended, RecordError> {
    let tenant = r.id()?;
    let owner = r.id()?;
    let seq = r.u64()?;
    let sender = r.id()?;
    let cmid = r.id()?;
    let stored_at_ms = r.u64()?;
    let deliver = Bytes::copy_from_slice(&r.buf[r.at..]);
    r.at = r.buf.len();
    Ok(Appended {
        tenant,
        owner,
        seq,
        sender,
        cmid,
        stored_at_ms,
        deliver,
    })
}

impl Record {
    /// The kind byte the log frames this record with.
    pub fn kind(&self) -> u8 {
        match self {
            Record::Batch { .. } => kind::BATCH,
            Record::Inbox(_) => kind::INBOX,
            Record::Group(_) => kind::GROUP,
            Record::Cursor { .. } => kind::CURSOR,
            Record::CursorGone { .. } => kind::CURSOR_GONE,
            Record::GroupCursor { .. } => kind::GROUP_CURSOR,
            Record::Join { .. } => kind::JOIN,
            Record::Leave { .. } => kind::LEAVE,
        }
    }

    /// Appends the payload to `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        out.clear();
        let w = &mut Writer(out);
        match self {
            Record::Batch { now_ms, records } => {
                w.u64(*now_ms);
                w.u32(*records);
            }
            Record::Inbox(a) | Record::Group(a) => put_appended(w, a)?,
            Record::Cursor { user, device, seq } => {
                w.id(&user.tenant)?;
                w.id(&user.user)?;
                w.id(device)?;
                w.u64(*seq);
            }
            Record::CursorGone { user, device } => {
                w.id(&user.tenant)?;
                w.id(&user.user)?;
                w.id(device)?;
            }
            Record::GroupCursor {
                group,
                member,
                gseq,
            }
            | Record::Join {
                group,
                member,
                gseq,
            } => {
                w.id(&group.tenant)?;
                w.id(&group.group)?;
                w.id(member)?;
                w.u64(*gseq);
            }
            Record::Leave { group, member } => {
                w.id(&group.tenant)?;
                w.id(&group.group)?;
                w.id(member)?;
            }
        }
        Ok(())
    }

    /// Decodes the payload of a record of `kind`.
    pub fn decode(kind_byte: u8, payload: &[u8]) -> Result<Record, RecordError> {
        let r = &mut Reader {
            buf: payload,
            shared: None,
            at: 0,
        };
        let rec = match kind_byte {
            kind::BATCH => Record::Batch {
                now_ms: r.u64()?,
                records: r.u32()?,
            },
            kind::INBOX => Record::Inbox(get_appended(r)?),
            kind::GROUP => Record::Group(get_appended(r)?),
            kind::CURSOR => Record::Cursor {
                user: UserRef::new(r.id()?, r.id()?),
                device: r.id()?,
                seq: r.u64()?,
            },
            kind::CURSOR_GONE => Record::CursorGone {
                user: UserRef::new(r.id()?, r.id()?),
                device: r.id()?,
            },
            kind::GROUP_CURSOR => Record::GroupCursor {
                group: GroupRef::new(r.id()?, r.id()?),
                member: r.id()?,
                gseq: r.u64()?,
            },
            kind::JOIN => Record::Join {
                group: GroupRef::new(r.id()?, r.id()?),
                member: r.id()?,
                gseq: r.u64()?,
            },
            kind::LEAVE => Record::Leave {
                group: GroupRef::new(r.id()?, r.id()?),
                member: r.id()?,
            },
            k => return Err(RecordError::UnknownKind(k)),
        };
        r.end()?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(body: &str) -> Deliver {
        Deliver {
            mid: 77,
            from: "alice".into(),
            to: Some(Target::Group("g1".into())),
            inbox_seq: 0,
            ts: 1_700_000_000_123,
            kind: Some("text".into()),
            body: body.into(),
            ext: [("a", "1"), ("zz", "ü")].into_iter().collect(),
        }
    }

    fn encoded(d: &Deliver) -> Bytes {
        let mut v = Vec::new();
        encode_deliver(d, &mut v).unwrap();
        Bytes::from(v)
    }

    fn samples() -> Vec<Record> {
        let appended = Appended {
            tenant: "t".into(),
            owner: "bob".into(),
            seq: 42,
            sender: "alice".into(),
            cmid: "c-1".into(),
            stored_at_ms: 9,
            deliver: encoded(&deliver("hello, wörld")),
        };
        let mut d = deliver("");
        d.to = None;
        d.kind = None;
        d.ext = Ext::new();
        let plain = Appended {
            deliver: encoded(&d),
            ..appended.clone()
        };
        vec![
            Record::Batch {
                now_ms: u64::MAX,
                records: 7,
            },
            Record::Inbox(appended.clone()),
            Record::Inbox(plain),
            Record::Group(appended),
            Record::Cursor {
                user: UserRef::new("t", "bob"),
                device: "phone".into(),
                seq: 3,
            },
            Record::CursorGone {
                user: UserRef::new("t", "bob"),
                device: "phone".into(),
            },
            Record::GroupCursor {
                group: GroupRef::new("t", "g"),
                member: "bob".into(),
                gseq: 5,
            },
            Record::Join {
                group: GroupRef::new("", "g"),
                member: "bob".into(),
                gseq: 0,
            },
            Record::Leave {
                group: GroupRef::new("t", "g"),
                member: "bob".into(),
            },
        ]
    }

    /// Decodes a record and, for a message, the message in it.
    fn decode_all(kind: u8, b: &[u8]) -> Result<Record, RecordError> {
        let rec = Record::decode(kind, b)?;
        if let Record::Inbox(a) | Record::Group(a) = &rec {
            decode_deliver(&a.deliver)?;
        }
        Ok(rec)
    }

    #[test]
    fn every_record_round_trips() {
        let mut buf = Vec::new();
        for rec in samples() {
            rec.encode(&mut buf).unwrap();
            assert_eq!(decode_all(rec.kind(), &buf).unwrap(), rec);
        }
        let d = deliver("hello, wörld");
        let b = encoded(&d);
        assert_eq!(decode_deliver(&b).unwrap(), d);
        assert_eq!(mid_and_ts(&b).unwrap(), (d.mid, d.ts));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let mut buf = Vec::new();
        for rec in samples() {
            rec.encode(&mut buf).unwrap();
            for cut in 0..buf.len() {
                let r = decode_all(rec.kind(), &buf[..cut]);
                assert!(r.is_err(), "{rec:?} cut at {cut} decoded");
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert_eq!(
                decode_all(rec.kind(), &longer),
                Err(RecordError::Trailing(1))
            );
        }
        assert_eq!(Record::decode(99, &[]), Err(RecordError::UnknownKind(99)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic sweep of byte strings under every kind: decode returns, never panics
        // and never allocates by a count the bytes cannot hold.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 96) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let _ = decode_all((x >> 40) as u8 % 10, &bytes);
            let _ = decode_deliver(&Bytes::from(bytes));
        }
    }
}
