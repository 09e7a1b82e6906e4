//! The logical message model: one Rust type per message of SPEC 3.3, independent of any codec.
//!
//! This module owns the shape of every frame a client and the gateway exchange. Codecs (in
//! `crate::codec`) translate between these types and bytes; the session state machine consumes
//! and produces them. Nothing here does I/O.

pub use super::str::Str;
use smallvec::SmallVec;

/// Extension map carried by `send` and `deliver` (`ext`): entries sorted by key, keys unique,
/// so encodings are deterministic. A sorted vector, cheap to scan, whose first entry is kept
/// inline (most messages carry one entry or none: no allocation then).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ext(SmallVec<[(Str, Str); 1]>);

impl Ext {
    pub fn new() -> Self {
        Ext(SmallVec::new())
    }

    pub fn with_capacity(n: usize) -> Self {
        Ext(SmallVec::with_capacity(n))
    }

    /// Inserts or replaces; returns the previous value of `key`.
    #[inline(always)]
    pub fn insert(&mut self, key: impl Into<Str>, value: impl Into<Str>) -> Option<Str> {
        let key = key.into();
        let value = value.into();
        // Decoders insert in key order: check the end first so that case is O(1) (and
        // inlined: the strings are then stored straight into the vector).
        if self.0.last().is_none_or(|(k, _)| *k < key) {
            if self.0.len() == 1 && !self.0.spilled() {
                // Past the inline entry: one allocation for the next few (cheaper than the
                // growth path's).
                self.0.reserve_exact(3);
            }
            self.0.push((key, value));
            return None;
        }
        self.insert_inside(key, value)
    }

    /// Adds an entry whose key and value `fill` writes in place, then puts it where
    /// [`Ext::insert`] would (replacing the value of an equal key). A decoder builds the
    /// strings where they are kept this way, instead of in temporaries that are then moved:
    /// those moves read the strings back right after the stores that built them, which
    /// stalls the CPU (`perf`, Protobuf decoder). If `fill` fails, the entry is removed and
    /// its error returned.
    #[inline(always)]
    pub fn insert_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Str, &mut Str) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.0.len() == 1 && !self.0.spilled() {
            self.0.reserve_exact(3);
        }
        self.0.push((Str::new(), Str::new()));
        let n = self.0.len();
        let Some((key, value)) = self.0.last_mut() else {
            unreachable!("an entry was pushed just above");
        };
        if let Err(e) = fill(key, value) {
            self.0.pop();
            return Err(e);
        }
        // In key order (the usual case): done. Else move it inside.
        if n >= 2 && self.0[n - 2].0 >= self.0[n - 1].0 {
            if let Some((key, value)) = self.0.pop() {
                self.insert_inside(key, value);
            }
        }
        Ok(())
    }

    /// [`Ext::insert`] of a key not greater than the last one.
    #[inline(never)]
    fn insert_inside(&mut self, key: Str, value: Str) -> Option<Str> {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Str, &Str)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<Str>, V: Into<Str>> FromIterator<(K, V)> for Ext {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut e = Ext::new();
        for (k, v) in iter {
            e.insert(k, v);
        }
        e
    }
}

impl<'a> IntoIterator for &'a Ext {
    type Item = (&'a Str, &'a Str);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Str, Str)>, fn(&'a (Str, Str)) -> (&'a Str, &'a Str)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// Protocol version spoken by this build. The server also accepts [`PREVIOUS_VERSION`].
pub const CURRENT_VERSION: u8 = 1;
/// Oldest protocol version the server still accepts (the current and previous version, SPEC 3.3).
pub const PREVIOUS_VERSION: u8 = 1;

/// Operation numbers. Stable forever: a number is never reused for another meaning.
///
/// The raw-TCP header carries the number; JSON, MessagePack and Hessian carry the name in `op`;
/// Protobuf and FlatBuffers carry it as the union/oneof variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Welcome = 2,
    Ping = 3,
    Pong = 4,
    Send = 5,
    SendAck = 6,
    Deliver = 7,
    Ack = 8,
    Sync = 9,
    Synced = 10,
    PresenceSet = 11,
    PresenceSub = 12,
    Presence = 13,
    GroupJoin = 14,
    GroupLeave = 15,
    Ok = 16,
    Error = 17,
    Goaway = 18,
}

impl Op {
    /// Every op, in number order.
    pub const ALL: [Op; 18] = [
        Op::Hello,
        Op::Welcome,
        Op::Ping,
        Op::Pong,
        Op::Send,
        Op::SendAck,
        Op::Deliver,
        Op::Ack,
        Op::Sync,
        Op::Synced,
        Op::PresenceSet,
        Op::PresenceSub,
        Op::Presence,
        Op::GroupJoin,
        Op::GroupLeave,
        Op::Ok,
        Op::Error,
        Op::Goaway,
    ];

    /// The name used in the `op` field of JSON, MessagePack and Hessian.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Welcome => "welcome",
            Op::Ping => "ping",
            Op::Pong => "pong",
            Op::Send => "send",
            Op::SendAck => "send_ack",
            Op::Deliver => "deliver",
            Op::Ack => "ack",
            Op::Sync => "sync",
            Op::Synced => "synced",
            Op::PresenceSet => "presence_set",
            Op::PresenceSub => "presence_sub",
            Op::Presence => "presence",
            Op::GroupJoin => "group_join",
            Op::GroupLeave => "group_leave",
            Op::Ok => "ok",
            Op::Error => "error",
            Op::Goaway => "goaway",
        }
    }

    /// Parses an op name; `None` for names this version does not know.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| op.name() == name)
    }

    /// Parses an op number; `None` for numbers this version does not know.
    pub fn from_u8(n: u8) -> Option<Op> {
        if (1..=Op::ALL.len() as u8).contains(&n) {
            Some(Op::ALL[usize::from(n) - 1])
        } else {
            None
        }
    }
}

/// Presence status. `Offline` is only ever reported by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Offline = 0,
    Online = 1,
    Busy = 2,
    Away = 3,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Offline, Status::Online, Status::Busy, Status::Away];

    pub const fn name(self) -> &'static str {
        match self {
            Status::Offline => "offline",
            Status::Online => "online",
            Status::Busy => "busy",
            Status::Away => "away",
        }
    }

    pub fn from_name(name: &str) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| s.name() == name)
    }

    pub fn from_u8(n: u8) -> Option<Status> {
        Status::ALL.get(usize::from(n)).copied()
    }
}

/// The stable error-code list (docs/PROTOCOL.md). Numbers and names never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be parsed (bad header, bad codec bytes, missing field).
    BadFrame = 1,
    /// The frame exceeds the configured maximum size.
    FrameTooLarge = 2,
    /// Unknown op or feature; the connection stays open.
    Unsupported = 3,
    /// Missing, malformed, expired or wrongly signed token.
    Unauthorized = 4,
    /// Authenticated, but not allowed (sending as another user, another tenant's id).
    Forbidden = 5,
    /// Well-formed, but semantically invalid (empty id, bad limit, bad target).
    BadRequest = 6,
    /// The server sheds this work; retry after `retry_after_ms`.
    Overloaded = 7,
    /// The connection exceeded its send rate; retry after `retry_after_ms`.
    RateLimited = 8,
    /// The target user or group does not exist.
    NotFound = 9,
    /// A bug or unexpected failure on the server.
    Internal = 10,
    /// `hello` did not arrive before the handshake timeout.
    HandshakeTimeout = 11,
    /// The protocol version is neither the current nor the previous one.
    VersionUnsupported = 12,
    /// A frame other than `hello` arrived before `hello` succeeded.
    NotAuthenticated = 13,
    /// A configured limit (groups per user, subscriptions, ...) was reached.
    LimitExceeded = 14,
    /// The backend could not make the message durable in time; it was not accepted.
    Unavailable = 15,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::Unsupported,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::BadRequest,
        ErrorCode::Overloaded,
        ErrorCode::RateLimited,
        ErrorCode::NotFound,
        ErrorCode::Internal,
        ErrorCode::HandshakeTimeout,
        ErrorCode::VersionUnsupported,
        ErrorCode::NotAuthenticated,
        ErrorCode::LimitExceeded,
        ErrorCode::Unavailable,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::VersionUnsupported => "version_unsupported",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.name() == name)
    }

    pub fn from_u16(n: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u16 == n)
    }
}

/// Where a `send` goes, or which conversation a `deliver` belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    User(Str),
    Group(Str),
}

/// `resume` in `hello`: the last inbox sequence this device has seen.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resume {
    pub inbox_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Hello {
    /// Protocol version the client speaks (0 on the wire means "not given" and reads as 1).
    pub version: u8,
    pub token: Str,
    pub device: Str,
    /// Codec names the client can switch to, most preferred first (informational in v1).
    pub codecs: Vec<Str>,
    pub resume: Option<Resume>,
}

impl Hello {
    /// A `hello` of `token` from `device` in [`CURRENT_VERSION`], naming no other codec and
    /// resuming nothing.
    pub fn new(token: &str, device: &str) -> Hello {
        Hello {
            version: CURRENT_VERSION,
            token: token.into(),
            device: device.into(),
            codecs: Vec::new(),
            resume: None,
        }
    }
}

/// Limits the server applies to this connection, announced in `welcome`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub sends_per_sec: u32,
    pub window: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Welcome {
    pub version: u8,
    pub session: u64,
    pub user: Str,
    pub heartbeat_ms: u64,
    pub server_time_ms: u64,
    pub limits: Limits,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Ping {
    pub ts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Pong {
    pub ts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Send {
    pub to: Target,
    pub cmid: Str,
    pub kind: Option<Str>,
    pub body: Str,
    pub ext: Ext,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SendAck {
    pub cmid: Str,
    pub mid: u64,
    pub seq: u64,
    pub ts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deliver {
    pub mid: u64,
    pub from: Str,
    /// The conversation: `None` means the receiving user (a 1:1 message to you), which is the
    /// common case and saves its bytes; a group, or the peer when a user's own message is
    /// synced to their other devices, is always given.
    pub to: Option<Target>,
    pub inbox_seq: u64,
    pub ts: u64,
    pub kind: Option<Str>,
    pub body: Str,
    pub ext: Ext,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Ack {
    /// Cumulative: everything up to here was received. The inbox's `inbox_seq`, or with
    /// `group` the group timeline's `gseq`.
    pub inbox_seq: u64,
    /// The group whose timeline is acked; `None`: the user's inbox.
    pub group: Option<Str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Sync {
    /// Messages after this sequence (`inbox_seq`, or `gseq` with `group`). 0 with `group`:
    /// after the member's stored group cursor.
    pub after_inbox_seq: u64,
    pub limit: u32,
    /// Page this group's timeline instead of the user's inbox.
    pub group: Option<Str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Synced {
    pub up_to: u64,
    pub more: bool,
    /// The group whose timeline was paged (echoes `sync.group`); `None`: the inbox.
    pub group: Option<Str>,
    /// On the last page of an inbox sync (`more` false): the user's groups with messages
    /// after the member's group cursor, to be fetched with `sync {group}`.
    pub groups: Vec<Str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceSet {
    pub status: Status,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PresenceSub {
    pub users: Vec<Str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub user: Str,
    pub status: Status,
    pub ts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupJoin {
    pub group: Str,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupLeave {
    pub group: Str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: Str,
    pub cmid: Option<Str>,
    pub retry_after_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Goaway {
    pub reason: Str,
    pub reconnect_ms: u64,
}

/// One message of SPEC 3.3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Ping(Ping),
    Pong(Pong),
    Send(Send),
    SendAck(SendAck),
    Deliver(Deliver),
    Ack(Ack),
    Sync(Sync),
    Synced(Synced),
    PresenceSet(PresenceSet),
    PresenceSub(PresenceSub),
    Presence(Presence),
    GroupJoin(GroupJoin),
    GroupLeave(GroupLeave),
    Ok,
    Error(Error),
    Goaway(Goaway),
}

impl Message {
    /// The message of `op` with every field at its default (required strings empty): what a
    /// decoder fills in place.
    #[inline]
    pub fn empty(op: Op) -> Message {
        match op {
            Op::Hello => Message::Hello(Hello::default()),
            Op::Welcome => Message::Welcome(Welcome::default()),
            Op::Ping => Message::Ping(Ping::default()),
            Op::Pong => Message::Pong(Pong::default()),
            Op::Send => Message::Send(Send {
                to: Target::User(Str::new()),
                cmid: Str::new(),
                kind: None,
                body: Str::new(),
                ext: Ext::new(),
            }),
            Op::SendAck => Message::SendAck(SendAck::default()),
            Op::Deliver => Message::Deliver(Deliver {
                mid: 0,
                from: Str::new(),
                to: None,
                inbox_seq: 0,
                ts: 0,
                kind: None,
                body: Str::new(),
                ext: Ext::new(),
            }),
            Op::Ack => Message::Ack(Ack::default()),
            Op::Sync => Message::Sync(Sync::default()),
            Op::Synced => Message::Synced(Synced::default()),
            Op::PresenceSet => Message::PresenceSet(PresenceSet {
                status: Status::Offline,
            }),
            Op::PresenceSub => Message::PresenceSub(PresenceSub::default()),
            Op::Presence => Message::Presence(Presence {
                user: Str::new(),
                status: Status::Offline,
                ts: 0,
            }),
            Op::GroupJoin => Message::GroupJoin(GroupJoin::default()),
            Op::GroupLeave => Message::GroupLeave(GroupLeave::default()),
            Op::Ok => Message::Ok,
            Op::Error => Message::Error(Error {
                code: ErrorCode::BadFrame,
                message: Str::new(),
                cmid: None,
                retry_after_ms: None,
            }),
            Op::Goaway => Message::Goaway(Goaway::default()),
        }
    }

    pub fn op(&self) -> Op {
        match self {
            Message::Hello(_) => Op::Hello,
            Message::Welcome(_) => Op::Welcome,
            Message::Ping(_) => Op::Ping,
            Message::Pong(_) => Op::Pong,
            Message::Send(_) => Op::Send,
            Message::SendAck(_) => Op::SendAck,
            Message::Deliver(_) => Op::Deliver,
            Message::Ack(_) => Op::Ack,
            Message::Sync(_) => Op::Sync,
            Message::Synced(_) => Op::Synced,
            Message::PresenceSet(_) => Op::PresenceSet,
            Message::PresenceSub(_) => Op::PresenceSub,
            Message::Presence(_) => Op::Presence,
            Message::GroupJoin(_) => Op::GroupJoin,
            Message::GroupLeave(_) => Op::GroupLeave,
            Message::Ok => Op::Ok,
            Message::Error(_) => Op::Error,
            Message::Goaway(_) => Op::Goaway,
        }
    }
}

/// One frame's logical content: the message and the optional correlation id (`ref`) that a
/// reply echoes. This is what every codec encodes and decodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Correlation id chosen by the client; replies carry the same value. 0 is never sent.
    pub reference: Option<u64>,
    pub msg: Message,
}

impl Envelope {
    pub fn new(msg: Message) -> Self {
        Envelope {
            reference: None,
            msg,
        }
    }

    pub fn with_ref(msg: Message, reference: u64) -> Self {
        Envelope {
            reference: Some(reference),
            msg,
        }
    }
}

impl From<Message> for Envelope {
    fn from(msg: Message) -> Self {
        Envelope::new(msg)
    }
}

impl serde::Serialize for Ext {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            m.serialize_entry(&**k, &**v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(e: &Ext) -> Vec<(String, String)> {
        e.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ext_keeps_keys_sorted_and_unique() {
        let mut e = Ext::new();
        assert_eq!(e.insert("m", "1"), None);
        assert_eq!(e.insert("a", "2"), None);
        assert_eq!(e.insert("z", "3"), None);
        assert_eq!(e.insert("m", "4"), Some(Str::from("1")));
        assert_eq!(entries(&e), pairs(&[("a", "2"), ("m", "4"), ("z", "3")]));
        assert_eq!(e.get("z"), Some(&Str::from("3")));
        assert_eq!(e.get("b"), None);
    }

    #[test]
    fn insert_with_fills_in_place_and_sorts_like_insert() {
        let fill = |k: &'static str, v: &'static str| {
            move |key: &mut Str, value: &mut Str| -> Result<(), ()> {
                *key = Str::from(k);
                *value = Str::from(v);
                Ok(())
            }
        };
        let mut e = Ext::new();
        // In order (the usual case), past the inline entry, out of order, and a repeated key
        // (its last value is kept, as with `insert`).
        for (k, v) in [("b", "1"), ("d", "2"), ("a", "3"), ("c", "4"), ("b", "5")] {
            e.insert_with(fill(k, v)).unwrap();
        }
        assert_eq!(
            entries(&e),
            pairs(&[("a", "3"), ("b", "5"), ("c", "4"), ("d", "2")])
        );
        // A failed fill leaves no entry behind, whatever it wrote first.
        let failed = e.insert_with(|key: &mut Str, _: &mut Str| {
            *key = Str::from("e");
            Err("bad value")
        });
        assert_eq!(failed, Err("bad value"));
        assert_eq!(e.len(), 4);
        assert_eq!(e.get("e"), None);
    }
}
