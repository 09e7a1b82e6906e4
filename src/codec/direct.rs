//! Direct decoding of the named-map formats (MessagePack, Hessian, JSON): the frame's map is
//! read key by key straight into the op's message, with strings sliced from the input.
//!
//! This is a fast path in front of the general serde path of `fields.rs` ([`super::fields::WireIn`]),
//! not a replacement. It handles the frames our encoders (and any encoder that writes `op`
//! first and plain values) produce, and gives up (`None`) on anything else, after which the
//! caller decodes the same bytes with the general path. The rule that makes this safe: the
//! fast path only ever returns a message the general path would return for the same bytes,
//! and never an error of its own. So the two agree by construction on errors (always the general
//! path's) and on every accepted frame; tests/roundtrip.rs checks it on arbitrary and mutated
//! frames for each format.
//!
//! It gives up when:
//! - the first key is not `op`, or `op` is not a known op's name;
//! - a field the general path knows is repeated (it refuses duplicates), or is present but not
//!   one of the op's (the general path would still type-check it), or a required field is
//!   missing, or `to` does not hold exactly one of `user` / `group`;
//! - a value is not in the plain form the format reader accepts (`null`, a negative or
//!   fractional number, a typed or chunked container, ...): see each format's reader;
//! - the reader's own framing checks fail (truncation, lengths, nesting, trailing bytes).
//!
//! Unknown keys are skipped, as the general path ignores them; the format reader's skip
//! applies the same framing and nesting checks as the general path.

use super::EncodeError;
use crate::protocol::{
    Ack, Envelope, Error, ErrorCode, Ext, Goaway, GroupJoin, GroupLeave, Hello, Limits, Message,
    Op, Ping, Pong, Presence, PresenceSet, PresenceSub, Resume, SendAck, Status, Str, Sync, Synced,
    Target, Welcome,
};

/// One format's reader, positioned inside the frame's top-level map after its header. Every
/// method returns `None` to give up.
pub(crate) trait MapSource {
    /// A key as found in the input (compared byte for byte with our field names).
    type Key: AsRef<[u8]>;

    /// The next key of the top-level map, or `Some(None)` at its end. A reader may leave
    /// checking the key's encoding to [`MapSource::unknown_key`]: a key equal to one of our
    /// (ASCII) names is well-formed.
    fn key(&mut self) -> Option<Option<Self::Key>>;
    /// Whether the next key of the top-level map is `key`; if so it is consumed (and its
    /// value is read next). Lets the op's fields be read in the order our encoders write
    /// them without a dispatch; a reader that cannot look ahead answers `false`.
    fn expect_key(&mut self, _key: &'static [u8]) -> bool {
        false
    }
    /// Called for a key that is none of our names, before its value is skipped.
    fn unknown_key(&mut self, _key: &Self::Key) -> Option<()> {
        Some(())
    }
    /// A string value, as a slice of the input where possible.
    fn str(&mut self) -> Option<Str>;
    /// [`MapSource::str`] written into `out`, for the fields read in place. A reader that can
    /// build the string in `out` (see [`Str::assign_utf8`]) does.
    #[inline(always)]
    fn str_into(&mut self, out: &mut Str) -> Option<()> {
        *out = self.str()?;
        Some(())
    }
    /// A string value that is only compared (`op`, `status`, `code`), passed to `f`.
    fn name<T>(&mut self, f: impl FnOnce(&[u8]) -> Option<T>) -> Option<T>;
    /// A non-negative integer value.
    fn uint(&mut self) -> Option<u64>;
    fn bool(&mut self) -> Option<bool>;
    /// The entries of a nested map (one level below the top-level map): `entry` reads the
    /// value of a key it knows and answers `true`, answers `false` for a key whose value is
    /// to be skipped, or `None` to give up.
    fn nested(&mut self, entry: impl FnMut(&mut Self, &[u8]) -> Option<bool>) -> Option<()>
    where
        Self: Sized;
    /// `to`: a map holding exactly one of `user` / `group` (other keys skipped).
    fn target(&mut self) -> Option<Target>
    where
        Self: Sized,
    {
        let (mut user, mut group) = (None, None);
        self.nested(|r, key| match key {
            b"user" => set(&mut user, r.str()).map(|()| true),
            b"group" => set(&mut group, r.str()).map(|()| true),
            _ => Some(false),
        })?;
        target_of(user, group)
    }
    /// `resume`: a map with an optional `inbox_seq` (other keys skipped).
    fn resume(&mut self) -> Option<Resume>
    where
        Self: Sized,
    {
        let mut inbox_seq = None;
        self.nested(|r, key| match key {
            b"inbox_seq" => set(&mut inbox_seq, r.uint()).map(|()| true),
            _ => Some(false),
        })?;
        Some(Resume {
            inbox_seq: inbox_seq.unwrap_or(0),
        })
    }
    /// `limits`: a map with optional `max_frame_bytes`, `sends_per_sec`, `window`.
    fn limits(&mut self) -> Option<Limits>
    where
        Self: Sized,
    {
        let (mut max_frame_bytes, mut sends_per_sec, mut window) = (None, None, None);
        let u32_of = |r: &mut Self| r.uint().and_then(|v| u32::try_from(v).ok());
        self.nested(|r, key| match key {
            b"max_frame_bytes" => set(&mut max_frame_bytes, u32_of(r)).map(|()| true),
            b"sends_per_sec" => set(&mut sends_per_sec, u32_of(r)).map(|()| true),
            b"window" => set(&mut window, u32_of(r)).map(|()| true),
            _ => Some(false),
        })?;
        Some(Limits {
            max_frame_bytes: max_frame_bytes.unwrap_or(0),
            sends_per_sec: sends_per_sec.unwrap_or(0),
            window: window.unwrap_or(0),
        })
    }
    /// `ext`: a map of strings to strings, added to `into` (empty); a repeated key keeps its
    /// last value. (Filled in place: moving a just-built value costs more than building it
    /// where it stays.)
    fn ext(&mut self, into: &mut Ext) -> Option<()>;
    /// `codecs`, `users`: a list of strings.
    fn strs(&mut self) -> Option<Vec<Str>>;
    /// Skips the value of a key we do not know.
    fn skip(&mut self) -> Option<()>;
}

/// Every key the general path knows (`WireIn`'s fields).
fn is_wire_field(key: &[u8]) -> bool {
    matches!(
        key,
        b"op"
            | b"ref"
            | b"version"
            | b"token"
            | b"device"
            | b"codecs"
            | b"resume"
            | b"session"
            | b"user"
            | b"heartbeat_ms"
            | b"server_time_ms"
            | b"limits"
            | b"ts"
            | b"to"
            | b"cmid"
            | b"type"
            | b"body"
            | b"ext"
            | b"mid"
            | b"seq"
            | b"from"
            | b"inbox_seq"
            | b"after_inbox_seq"
            | b"limit"
            | b"up_to"
            | b"more"
            | b"status"
            | b"users"
            | b"group"
            | b"groups"
            | b"code"
            | b"message"
            | b"retry_after_ms"
            | b"reason"
            | b"reconnect_ms"
    )
}

pub(crate) fn op_from_name(name: &[u8]) -> Option<Op> {
    Some(match name {
        b"hello" => Op::Hello,
        b"welcome" => Op::Welcome,
        b"ping" => Op::Ping,
        b"pong" => Op::Pong,
        b"send" => Op::Send,
        b"send_ack" => Op::SendAck,
        b"deliver" => Op::Deliver,
        b"ack" => Op::Ack,
        b"sync" => Op::Sync,
        b"synced" => Op::Synced,
        b"presence_set" => Op::PresenceSet,
        b"presence_sub" => Op::PresenceSub,
        b"presence" => Op::Presence,
        b"group_join" => Op::GroupJoin,
        b"group_leave" => Op::GroupLeave,
        b"ok" => Op::Ok,
        b"error" => Op::Error,
        b"goaway" => Op::Goaway,
        _ => return None,
    })
}

fn status_from_name(name: &[u8]) -> Option<Status> {
    std::str::from_utf8(name).ok().and_then(Status::from_name)
}

fn code_from_name(name: &[u8]) -> Option<ErrorCode> {
    std::str::from_utf8(name)
        .ok()
        .and_then(ErrorCode::from_name)
}

/// Stores the first value of a field; a repeated field gives up.
#[inline(always)]
fn set<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

/// Which of an op's fields a frame has given, for the ops read in place (bit `i`: the
/// `i`-th field of the op).
#[derive(Default)]
struct Seen(u32);

impl Seen {
    /// Marks field `bit` as given; a repeated field gives up.
    #[inline(always)]
    fn once(&mut self, bit: u32) -> Option<()> {
        let m = 1 << bit;
        if self.0 & m != 0 {
            return None;
        }
        self.0 |= m;
        Some(())
    }

    /// Gives up unless every field in `required` was given.
    #[inline(always)]
    fn all(&self, required: u32) -> Option<()> {
        (self.0 & required == required).then_some(())
    }
}

/// A key that is not one of the op's fields: `ref`, skipped if unknown, else give up.
#[inline]
fn other<S: MapSource>(s: &mut S, key: &S::Key, reference: &mut Option<u64>) -> Option<()> {
    let k = key.as_ref();
    if k == b"ref" {
        let v = s.uint();
        set(reference, v)
    } else if is_wire_field(k) {
        None
    } else {
        s.unknown_key(key)?;
        s.skip()
    }
}

/// Reads the top-level map (after its header) into `env`, or gives up (`env` then holds some
/// of the fields read). `done` checks what must hold after the map (nothing trailing).
///
/// Each format calls it from one place, so it is inlined there, into the value the decoder
/// returns ([`super::read_in_place`]).
#[inline(always)]
pub(crate) fn envelope<S: MapSource>(
    s: &mut S,
    done: impl FnOnce(&S) -> bool,
    env: &mut Envelope,
) -> Option<()> {
    let first = s.key()??;
    if first.as_ref() != b"op" {
        return None;
    }
    let op = s.name(op_from_name)?;
    let mut reference = None;
    // `ref` comes right after `op` in our encodings.
    if s.expect_key(b"ref") {
        let v = s.uint();
        set(&mut reference, v)?;
    }
    // Reads the remaining keys: `$key => $action` for the op's fields (listed in the order
    // our encoders write them, which is tried first), then any key in any order: the op's
    // fields, `ref`, unknown keys.
    macro_rules! fields {
        ($($name:literal => $action:expr,)*) => {
            $(
                if s.expect_key($name) {
                    $action?;
                }
            )*
            while let Some(k) = s.key()? {
                match k.as_ref() {
                    $($name => $action?,)*
                    _ => other(s, &k, &mut reference)?,
                }
            }
            if !done(s) {
                return None;
            }
        };
    }
    match op {
        // The ops that carry messages (the hot ones) are read in place, into the message
        // that is returned: strings are built where they stay (moving a just-built message
        // reads back what was just stored, which stalls the CPU: `perf`, MessagePack).
        Op::Send => {
            env.msg = Message::empty(op);
            let Message::Send(m) = &mut env.msg else {
                return None;
            };
            let mut seen = Seen::default();
            fields! {
                b"to" => { seen.once(0)?; m.to = s.target()?; Some(()) },
                b"cmid" => { seen.once(1)?; s.str_into(&mut m.cmid) },
                b"type" => { seen.once(2)?; s.str_into(m.kind.get_or_insert_with(Str::new)) },
                b"body" => { seen.once(3)?; s.str_into(&mut m.body) },
                b"ext" => { seen.once(4)?; s.ext(&mut m.ext) },
            }
            // `to`, `cmid` and `body` are required.
            seen.all(0b1011)?;
        }
        Op::Deliver => {
            env.msg = Message::empty(op);
            let Message::Deliver(m) = &mut env.msg else {
                return None;
            };
            let mut seen = Seen::default();
            fields! {
                b"mid" => { seen.once(0)?; m.mid = s.uint()?; Some(()) },
                b"from" => { seen.once(1)?; s.str_into(&mut m.from) },
                b"to" => { seen.once(2)?; m.to = Some(s.target()?); Some(()) },
                b"inbox_seq" => { seen.once(3)?; m.inbox_seq = s.uint()?; Some(()) },
                b"ts" => { seen.once(4)?; m.ts = s.uint()?; Some(()) },
                b"type" => { seen.once(5)?; s.str_into(m.kind.get_or_insert_with(Str::new)) },
                b"body" => { seen.once(6)?; s.str_into(&mut m.body) },
                b"ext" => { seen.once(7)?; s.ext(&mut m.ext) },
            }
            // `mid`, `from`, `inbox_seq`, `ts` and `body` are required.
            seen.all(0b101_1011)?;
        }
        _ => {
            env.msg = match op {
                Op::Hello => {
                    let (mut version, mut token, mut device, mut codecs, mut resume) =
                        (None, None, None, None, None);
                    fields! {
                        b"version" => set(&mut version, s.uint().and_then(|v| u8::try_from(v).ok())),
                        b"token" => set(&mut token, s.str()),
                        b"device" => set(&mut device, s.str()),
                        b"codecs" => set(&mut codecs, s.strs()),
                        b"resume" => set(&mut resume, s.resume()),
                    }
                    Message::Hello(Hello {
                        version: version.unwrap_or(0),
                        token: token?,
                        device: device?,
                        codecs: codecs.unwrap_or_default(),
                        resume,
                    })
                }
                Op::Welcome => {
                    let (mut version, mut session, mut user, mut heartbeat_ms, mut server_time_ms) =
                        (None, None, None, None, None);
                    let mut limits = None;
                    fields! {
                        b"version" => set(&mut version, s.uint().and_then(|v| u8::try_from(v).ok())),
                        b"session" => set(&mut session, s.uint()),
                        b"user" => set(&mut user, s.str()),
                        b"heartbeat_ms" => set(&mut heartbeat_ms, s.uint()),
                        b"server_time_ms" => set(&mut server_time_ms, s.uint()),
                        b"limits" => set(&mut limits, s.limits()),
                    }
                    Message::Welcome(Welcome {
                        version: version.unwrap_or(0),
                        session: session?,
                        user: user?,
                        heartbeat_ms: heartbeat_ms?,
                        server_time_ms: server_time_ms?,
                        limits: limits.unwrap_or_default(),
                    })
                }
                Op::Ping | Op::Pong => {
                    let mut ts = None;
                    fields! {
                        b"ts" => set(&mut ts, s.uint()),
                    }
                    let ts = ts.unwrap_or(0);
                    if op == Op::Ping {
                        Message::Ping(Ping { ts })
                    } else {
                        Message::Pong(Pong { ts })
                    }
                }
                Op::SendAck => {
                    let (mut cmid, mut mid, mut seq, mut ts) = (None, None, None, None);
                    fields! {
                        b"cmid" => set(&mut cmid, s.str()),
                        b"mid" => set(&mut mid, s.uint()),
                        b"seq" => set(&mut seq, s.uint()),
                        b"ts" => set(&mut ts, s.uint()),
                    }
                    Message::SendAck(SendAck {
                        cmid: cmid?,
                        mid: mid?,
                        seq: seq?,
                        ts: ts?,
                    })
                }
                // Read in place above.
                Op::Send | Op::Deliver => return None,
                Op::Ack => {
                    let (mut inbox_seq, mut group) = (None, None);
                    fields! {
                        b"inbox_seq" => set(&mut inbox_seq, s.uint()),
                        b"group" => set(&mut group, s.str()),
                    }
                    Message::Ack(Ack {
                        inbox_seq: inbox_seq?,
                        group,
                    })
                }
                Op::Sync => {
                    let (mut after_inbox_seq, mut limit, mut group) = (None, None, None);
                    fields! {
                        b"after_inbox_seq" => set(&mut after_inbox_seq, s.uint()),
                        b"limit" => set(&mut limit, s.uint().and_then(|v| u32::try_from(v).ok())),
                        b"group" => set(&mut group, s.str()),
                    }
                    Message::Sync(Sync {
                        after_inbox_seq: after_inbox_seq.unwrap_or(0),
                        limit: limit.unwrap_or(0),
                        group,
                    })
                }
                Op::Synced => {
                    let (mut up_to, mut more, mut group, mut groups) = (None, None, None, None);
                    fields! {
                        b"up_to" => set(&mut up_to, s.uint()),
                        b"more" => set(&mut more, s.bool()),
                        b"group" => set(&mut group, s.str()),
                        b"groups" => set(&mut groups, s.strs()),
                    }
                    Message::Synced(Synced {
                        up_to: up_to?,
                        more: more.unwrap_or(false),
                        group,
                        groups: groups.unwrap_or_default(),
                    })
                }
                Op::PresenceSet => {
                    let mut status = None;
                    fields! {
                        b"status" => set(&mut status, s.name(status_from_name)),
                    }
                    Message::PresenceSet(PresenceSet { status: status? })
                }
                Op::PresenceSub => {
                    let mut users = None;
                    fields! {
                        b"users" => set(&mut users, s.strs()),
                    }
                    Message::PresenceSub(PresenceSub { users: users? })
                }
                Op::Presence => {
                    let (mut user, mut status, mut ts) = (None, None, None);
                    fields! {
                        b"user" => set(&mut user, s.str()),
                        b"status" => set(&mut status, s.name(status_from_name)),
                        b"ts" => set(&mut ts, s.uint()),
                    }
                    Message::Presence(Presence {
                        user: user?,
                        status: status?,
                        ts: ts.unwrap_or(0),
                    })
                }
                Op::GroupJoin | Op::GroupLeave => {
                    let mut group = None;
                    fields! {
                        b"group" => set(&mut group, s.str()),
                    }
                    let group = group?;
                    if op == Op::GroupJoin {
                        Message::GroupJoin(GroupJoin { group })
                    } else {
                        Message::GroupLeave(GroupLeave { group })
                    }
                }
                Op::Ok => {
                    fields! {}
                    Message::Ok
                }
                Op::Error => {
                    let (mut code, mut message, mut cmid, mut retry_after_ms) =
                        (None, None, None, None);
                    fields! {
                        b"code" => set(&mut code, s.name(code_from_name)),
                        b"message" => set(&mut message, s.str()),
                        b"cmid" => set(&mut cmid, s.str()),
                        b"retry_after_ms" => set(&mut retry_after_ms, s.uint()),
                    }
                    Message::Error(Error {
                        code: code?,
                        message: message.unwrap_or_default(),
                        cmid,
                        retry_after_ms,
                    })
                }
                Op::Goaway => {
                    let (mut reason, mut reconnect_ms) = (None, None);
                    fields! {
                        b"reason" => set(&mut reason, s.str()),
                        b"reconnect_ms" => set(&mut reconnect_ms, s.uint()),
                    }
                    Message::Goaway(Goaway {
                        reason: reason.unwrap_or_default(),
                        reconnect_ms: reconnect_ms.unwrap_or(0),
                    })
                }
            }
        }
    }
    env.reference = reference;
    Some(())
}

/// Builds a [`Target`] from the `user` / `group` values found in `to`.
fn target_of(user: Option<Str>, group: Option<Str>) -> Option<Target> {
    match (user, group) {
        (Some(u), None) => Some(Target::User(u)),
        (None, Some(g)) => Some(Target::Group(g)),
        _ => None,
    }
}

/// One format's writer for the named map. Keys are our field names (ASCII).
pub(crate) trait MapSink {
    /// Starts a map of `entries` entries.
    fn map(&mut self, entries: usize) -> Result<(), EncodeError>;
    /// Ends the map started last.
    fn end_map(&mut self);
    fn key(&mut self, key: &'static str);
    fn str(&mut self, s: &str) -> Result<(), EncodeError>;
    fn uint(&mut self, v: u64) -> Result<(), EncodeError>;
    fn bool(&mut self, v: bool);
    fn strs(&mut self, items: &[Str]) -> Result<(), EncodeError>;
}

fn put_target<W: MapSink>(w: &mut W, t: &Target) -> Result<(), EncodeError> {
    w.map(1)?;
    match t {
        Target::User(u) => {
            w.key("user");
            w.str(u)?;
        }
        Target::Group(g) => {
            w.key("group");
            w.str(g)?;
        }
    }
    w.end_map();
    Ok(())
}

fn put_ext<W: MapSink>(w: &mut W, ext: &Ext) -> Result<(), EncodeError> {
    w.map(ext.len())?;
    for (k, v) in ext {
        w.str(k)?;
        w.str(v)?;
    }
    w.end_map();
    Ok(())
}

/// Writes `env` as the named map: the same entries, in the same order, as the `Serialize`
/// impl in `fields.rs` (the reference the property tests compare with).
pub(crate) fn write_envelope<W: MapSink>(w: &mut W, env: &Envelope) -> Result<(), EncodeError> {
    w.map(super::fields::entry_count(env))?;
    w.key("op");
    w.str(env.msg.op().name())?;
    if let Some(r) = env.reference {
        w.key("ref");
        w.uint(r)?;
    }
    match &env.msg {
        Message::Hello(h) => {
            w.key("version");
            w.uint(h.version.into())?;
            w.key("token");
            w.str(&h.token)?;
            w.key("device");
            w.str(&h.device)?;
            if !h.codecs.is_empty() {
                w.key("codecs");
                w.strs(&h.codecs)?;
            }
            if let Some(r) = &h.resume {
                w.key("resume");
                w.map(1)?;
                w.key("inbox_seq");
                w.uint(r.inbox_seq)?;
                w.end_map();
            }
        }
        Message::Welcome(x) => {
            w.key("version");
            w.uint(x.version.into())?;
            w.key("session");
            w.uint(x.session)?;
            w.key("user");
            w.str(&x.user)?;
            w.key("heartbeat_ms");
            w.uint(x.heartbeat_ms)?;
            w.key("server_time_ms");
            w.uint(x.server_time_ms)?;
            w.key("limits");
            w.map(3)?;
            w.key("max_frame_bytes");
            w.uint(x.limits.max_frame_bytes.into())?;
            w.key("sends_per_sec");
            w.uint(x.limits.sends_per_sec.into())?;
            w.key("window");
            w.uint(x.limits.window.into())?;
            w.end_map();
        }
        Message::Ping(Ping { ts }) | Message::Pong(Pong { ts }) => {
            w.key("ts");
            w.uint(*ts)?;
        }
        Message::Send(x) => {
            w.key("to");
            put_target(w, &x.to)?;
            w.key("cmid");
            w.str(&x.cmid)?;
            if let Some(k) = &x.kind {
                w.key("type");
                w.str(k)?;
            }
            w.key("body");
            w.str(&x.body)?;
            if !x.ext.is_empty() {
                w.key("ext");
                put_ext(w, &x.ext)?;
            }
        }
        Message::SendAck(a) => {
            w.key("cmid");
            w.str(&a.cmid)?;
            w.key("mid");
            w.uint(a.mid)?;
            w.key("seq");
            w.uint(a.seq)?;
            w.key("ts");
            w.uint(a.ts)?;
        }
        Message::Deliver(d) => {
            w.key("mid");
            w.uint(d.mid)?;
            w.key("from");
            w.str(&d.from)?;
            if let Some(t) = &d.to {
                w.key("to");
                put_target(w, t)?;
            }
            w.key("inbox_seq");
            w.uint(d.inbox_seq)?;
            w.key("ts");
            w.uint(d.ts)?;
            if let Some(k) = &d.kind {
                w.key("type");
                w.str(k)?;
            }
            w.key("body");
            w.str(&d.body)?;
            if !d.ext.is_empty() {
                w.key("ext");
                put_ext(w, &d.ext)?;
            }
        }
        Message::Ack(a) => {
            w.key("inbox_seq");
            w.uint(a.inbox_seq)?;
            if let Some(g) = &a.group {
                w.key("group");
                w.str(g)?;
            }
        }
        Message::Sync(x) => {
            w.key("after_inbox_seq");
            w.uint(x.after_inbox_seq)?;
            w.key("limit");
            w.uint(x.limit.into())?;
            if let Some(g) = &x.group {
                w.key("group");
                w.str(g)?;
            }
        }
        Message::Synced(x) => {
            w.key("up_to");
            w.uint(x.up_to)?;
            w.key("more");
            w.bool(x.more);
            if let Some(g) = &x.group {
                w.key("group");
                w.str(g)?;
            }
            if !x.groups.is_empty() {
                w.key("groups");
                w.strs(&x.groups)?;
            }
        }
        Message::PresenceSet(p) => {
            w.key("status");
            w.str(p.status.name())?;
        }
        Message::PresenceSub(p) => {
            w.key("users");
            w.strs(&p.users)?;
        }
        Message::Presence(p) => {
            w.key("user");
            w.str(&p.user)?;
            w.key("status");
            w.str(p.status.name())?;
            w.key("ts");
            w.uint(p.ts)?;
        }
        Message::GroupJoin(GroupJoin { group }) | Message::GroupLeave(GroupLeave { group }) => {
            w.key("group");
            w.str(group)?;
        }
        Message::Ok => {}
        Message::Error(e) => {
            w.key("code");
            w.str(e.code.name())?;
            w.key("message");
            w.str(&e.message)?;
            if let Some(c) = &e.cmid {
                w.key("cmid");
                w.str(c)?;
            }
            if let Some(r) = e.retry_after_ms {
                w.key("retry_after_ms");
                w.uint(r)?;
            }
        }
        Message::Goaway(g) => {
            w.key("reason");
            w.str(&g.reason)?;
            w.key("reconnect_ms");
            w.uint(g.reconnect_ms)?;
        }
    }
    w.end_map();
    Ok(())
}
