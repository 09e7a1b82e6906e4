//! The field mapping shared by the self-describing codecs (JSON, MessagePack, Hessian): one
//! flat map per frame with an `op` string, the optional `ref`, and the op's fields by name.
//!
//! Encoding goes through [`Serialize`] for [`Envelope`] (a map, `None` fields left out); JSON
//! uses it directly, MessagePack and Hessian write the same entries with `direct.rs` and test
//! against it. The general decoding path goes through [`WireIn`], a flat struct holding every
//! field any op may carry, which serde fills in one pass without buffering;
//! [`WireIn::into_envelope`] then checks that the op's required fields are present. Unknown
//! fields are ignored (SPEC 3.3 versioning). The codecs try the direct readers of `direct.rs`
//! first and use this path for the frames those give up on.

use std::borrow::Cow;

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::text::share_str;
use super::DecodeError;
use crate::protocol::{
    Ack, Deliver, Envelope, Error, ErrorCode, Ext, Goaway, GroupJoin, GroupLeave, Hello, Limits,
    Message, Ping, Pong, Presence, PresenceSet, PresenceSub, Resume, Send, SendAck, Status, Str,
    Sync, Synced, Target, Welcome,
};

struct TargetSer<'a>(&'a Target);

impl Serialize for TargetSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        match self.0 {
            Target::User(u) => m.serialize_entry("user", u)?,
            Target::Group(g) => m.serialize_entry("group", g)?,
        }
        m.end()
    }
}

struct ResumeSer<'a>(&'a Resume);

impl Serialize for ResumeSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("inbox_seq", &self.0.inbox_seq)?;
        m.end()
    }
}

struct LimitsSer<'a>(&'a Limits);

impl Serialize for LimitsSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("max_frame_bytes", &self.0.max_frame_bytes)?;
        m.serialize_entry("sends_per_sec", &self.0.sends_per_sec)?;
        m.serialize_entry("window", &self.0.window)?;
        m.end()
    }
}

/// Number of map entries `env` serializes to (some formats need it up front).
pub(crate) fn entry_count(env: &Envelope) -> usize {
    let body = match &env.msg {
        Message::Hello(h) => {
            3 + usize::from(!h.codecs.is_empty()) + usize::from(h.resume.is_some())
        }
        Message::Welcome(_) => 6,
        Message::Ping(_) | Message::Pong(_) => 1,
        Message::Send(s) => 3 + usize::from(s.kind.is_some()) + usize::from(!s.ext.is_empty()),
        Message::SendAck(_) => 4,
        Message::Deliver(d) => {
            5 + usize::from(d.to.is_some())
                + usize::from(d.kind.is_some())
                + usize::from(!d.ext.is_empty())
        }
        Message::Ack(a) => 1 + usize::from(a.group.is_some()),
        Message::Sync(x) => 2 + usize::from(x.group.is_some()),
        Message::Synced(x) => {
            2 + usize::from(x.group.is_some()) + usize::from(!x.groups.is_empty())
        }
        Message::PresenceSet(_) | Message::PresenceSub(_) => 1,
        Message::Presence(_) => 3,
        Message::GroupJoin(_) | Message::GroupLeave(_) => 1,
        Message::Ok => 0,
        Message::Error(e) => {
            2 + usize::from(e.cmid.is_some()) + usize::from(e.retry_after_ms.is_some())
        }
        Message::Goaway(_) => 2,
    };
    1 + usize::from(env.reference.is_some()) + body
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(entry_count(self)))?;
        m.serialize_entry("op", self.msg.op().name())?;
        if let Some(r) = self.reference {
            m.serialize_entry("ref", &r)?;
        }
        match &self.msg {
            Message::Hello(h) => {
                m.serialize_entry("version", &h.version)?;
                m.serialize_entry("token", &h.token)?;
                m.serialize_entry("device", &h.device)?;
                if !h.codecs.is_empty() {
                    m.serialize_entry("codecs", &h.codecs)?;
                }
                if let Some(r) = &h.resume {
                    m.serialize_entry("resume", &ResumeSer(r))?;
                }
            }
            Message::Welcome(w) => {
                m.serialize_entry("version", &w.version)?;
                m.serialize_entry("session", &w.session)?;
                m.serialize_entry("user", &w.user)?;
                m.serialize_entry("heartbeat_ms", &w.heartbeat_ms)?;
                m.serialize_entry("server_time_ms", &w.server_time_ms)?;
                m.serialize_entry("limits", &LimitsSer(&w.limits))?;
            }
            Message::Ping(p) => m.serialize_entry("ts", &p.ts)?,
            Message::Pong(p) => m.serialize_entry("ts", &p.ts)?,
            Message::Send(x) => {
                m.serialize_entry("to", &TargetSer(&x.to))?;
                m.serialize_entry("cmid", &x.cmid)?;
                if let Some(k) = &x.kind {
                    m.serialize_entry("type", k)?;
                }
                m.serialize_entry("body", &x.body)?;
                if !x.ext.is_empty() {
                    m.serialize_entry("ext", &x.ext)?;
                }
            }
            Message::SendAck(a) => {
                m.serialize_entry("cmid", &a.cmid)?;
                m.serialize_entry("mid", &a.mid)?;
                m.serialize_entry("seq", &a.seq)?;
                m.serialize_entry("ts", &a.ts)?;
            }
            Message::Deliver(d) => {
                m.serialize_entry("mid", &d.mid)?;
                m.serialize_entry("from", &d.from)?;
                if let Some(t) = &d.to {
                    m.serialize_entry("to", &TargetSer(t))?;
                }
                m.serialize_entry("inbox_seq", &d.inbox_seq)?;
                m.serialize_entry("ts", &d.ts)?;
                if let Some(k) = &d.kind {
                    m.serialize_entry("type", k)?;
                }
                m.serialize_entry("body", &d.body)?;
                if !d.ext.is_empty() {
                    m.serialize_entry("ext", &d.ext)?;
                }
            }
            Message::Ack(a) => {
                m.serialize_entry("inbox_seq", &a.inbox_seq)?;
                if let Some(g) = &a.group {
                    m.serialize_entry("group", g)?;
                }
            }
            Message::Sync(x) => {
                m.serialize_entry("after_inbox_seq", &x.after_inbox_seq)?;
                m.serialize_entry("limit", &x.limit)?;
                if let Some(g) = &x.group {
                    m.serialize_entry("group", g)?;
                }
            }
            Message::Synced(x) => {
                m.serialize_entry("up_to", &x.up_to)?;
                m.serialize_entry("more", &x.more)?;
                if let Some(g) = &x.group {
                    m.serialize_entry("group", g)?;
                }
                if !x.groups.is_empty() {
                    m.serialize_entry("groups", &x.groups)?;
                }
            }
            Message::PresenceSet(p) => m.serialize_entry("status", p.status.name())?,
            Message::PresenceSub(p) => m.serialize_entry("users", &p.users)?,
            Message::Presence(p) => {
                m.serialize_entry("user", &p.user)?;
                m.serialize_entry("status", p.status.name())?;
                m.serialize_entry("ts", &p.ts)?;
            }
            Message::GroupJoin(g) => m.serialize_entry("group", &g.group)?,
            Message::GroupLeave(g) => m.serialize_entry("group", &g.group)?,
            Message::Ok => {}
            Message::Error(e) => {
                m.serialize_entry("code", e.code.name())?;
                m.serialize_entry("message", &e.message)?;
                if let Some(c) = &e.cmid {
                    m.serialize_entry("cmid", c)?;
                }
                if let Some(r) = e.retry_after_ms {
                    m.serialize_entry("retry_after_ms", &r)?;
                }
            }
            Message::Goaway(g) => {
                m.serialize_entry("reason", &g.reason)?;
                m.serialize_entry("reconnect_ms", &g.reconnect_ms)?;
            }
        }
        m.end()
    }
}

/// A string as the deserializer found it: borrowed from the input when it could be (no
/// escapes, plain UTF-8), owned otherwise. [`Src::str`] turns it into a [`Str`] without a copy
/// in the borrowed case.
pub(crate) struct BStr<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = BStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// `ext`: a map of strings, kept as pairs in input order.
pub(crate) struct WireExt<'a>(Vec<(BStr<'a>, BStr<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for WireExt<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = WireExt<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                // The size hint is bounded by the input (callers check counts against the
                // bytes left), but cap the pre-allocation anyway.
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(0).min(16));
                while let Some(entry) = m.next_entry::<BStr<'a>, BStr<'a>>()? {
                    v.push(entry);
                }
                Ok(WireExt(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// The input a message was decoded from, so borrowed strings become slices of it.
pub(crate) struct Src<'b>(pub(crate) &'b Bytes);

impl Src<'_> {
    pub(crate) fn str(&self, s: BStr<'_>) -> Str {
        match s.0 {
            Cow::Borrowed(b) => share_str(self.0, b),
            Cow::Owned(o) => Str::from(o),
        }
    }

    fn opt(&self, s: Option<BStr<'_>>) -> Option<Str> {
        s.map(|s| self.str(s))
    }

    fn req(&self, s: Option<BStr<'_>>, field: &'static str) -> Result<Str, DecodeError> {
        Ok(self.str(req(s, field)?))
    }

    fn list(&self, v: Vec<BStr<'_>>) -> Vec<Str> {
        v.into_iter().map(|s| self.str(s)).collect()
    }

    fn ext(&self, e: Option<WireExt<'_>>) -> Ext {
        let Some(e) = e else { return Ext::new() };
        let mut out = Ext::with_capacity(e.0.len());
        for (k, v) in e.0 {
            out.insert(self.str(k), self.str(v));
        }
        out
    }
}

/// `to`: exactly one of `user` or `group`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct WireTarget<'a> {
    #[serde(borrow)]
    user: Option<BStr<'a>>,
    #[serde(borrow)]
    group: Option<BStr<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct WireResume {
    inbox_seq: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct WireLimits {
    max_frame_bytes: u32,
    sends_per_sec: u32,
    window: u32,
}

/// Every field any op may carry. Filled by serde in one pass; unknown keys are skipped.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct WireIn<'a> {
    #[serde(borrow)]
    op: Option<BStr<'a>>,
    #[serde(rename = "ref")]
    reference: Option<u64>,
    version: Option<u8>,
    #[serde(borrow)]
    token: Option<BStr<'a>>,
    #[serde(borrow)]
    device: Option<BStr<'a>>,
    #[serde(borrow)]
    codecs: Option<Vec<BStr<'a>>>,
    resume: Option<WireResume>,
    session: Option<u64>,
    #[serde(borrow)]
    user: Option<BStr<'a>>,
    heartbeat_ms: Option<u64>,
    server_time_ms: Option<u64>,
    limits: Option<WireLimits>,
    ts: Option<u64>,
    #[serde(borrow)]
    to: Option<WireTarget<'a>>,
    #[serde(borrow)]
    cmid: Option<BStr<'a>>,
    #[serde(rename = "type", borrow)]
    kind: Option<BStr<'a>>,
    #[serde(borrow)]
    body: Option<BStr<'a>>,
    #[serde(borrow)]
    ext: Option<WireExt<'a>>,
    mid: Option<u64>,
    seq: Option<u64>,
    #[serde(borrow)]
    from: Option<BStr<'a>>,
    inbox_seq: Option<u64>,
    after_inbox_seq: Option<u64>,
    limit: Option<u32>,
    up_to: Option<u64>,
    more: Option<bool>,
    #[serde(borrow)]
    status: Option<BStr<'a>>,
    #[serde(borrow)]
    users: Option<Vec<BStr<'a>>>,
    #[serde(borrow)]
    group: Option<BStr<'a>>,
    #[serde(borrow)]
    groups: Option<Vec<BStr<'a>>>,
    #[serde(borrow)]
    code: Option<BStr<'a>>,
    #[serde(borrow)]
    message: Option<BStr<'a>>,
    retry_after_ms: Option<u64>,
    #[serde(borrow)]
    reason: Option<BStr<'a>>,
    reconnect_ms: Option<u64>,
}

/// Only the op and ref. A frame whose full parse failed is parsed again with this, so that an
/// unknown op whose fields clash with ours still gets `unsupported` rather than `bad_frame`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct OpOnly<'a> {
    #[serde(borrow)]
    op: Option<BStr<'a>>,
    #[serde(rename = "ref")]
    reference: Option<u64>,
}

impl OpOnly<'_> {
    /// Chooses the error to report for a frame whose full parse failed with `full`.
    pub(crate) fn classify(self, full: DecodeError) -> DecodeError {
        match self.op {
            Some(op) if crate::protocol::Op::from_name(&op.0).is_none() => DecodeError::UnknownOp {
                op: op.0.into_owned(),
                reference: self.reference,
            },
            _ => full,
        }
    }
}

/// Finishes a self-describing decode: the full parse's result, or on failure the better error
/// (`UnknownOp` when a second, op-only parse finds an op this version does not know).
pub(crate) fn finish<'a>(
    src: &Bytes,
    full: Result<WireIn<'a>, DecodeError>,
    op_only: impl FnOnce() -> Option<OpOnly<'a>>,
) -> Result<Envelope, DecodeError> {
    match full {
        Ok(wire) => wire.into_envelope(&Src(src)),
        Err(e) => Err(match op_only() {
            Some(op) => op.classify(e),
            None => e,
        }),
    }
}

fn req<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField(field))
}

fn target(src: &Src, t: Option<WireTarget>) -> Result<Target, DecodeError> {
    opt_target(src, t)?.ok_or(DecodeError::MissingField("to"))
}

fn opt_target(src: &Src, t: Option<WireTarget>) -> Result<Option<Target>, DecodeError> {
    let Some(t) = t else { return Ok(None) };
    match t {
        WireTarget {
            user: Some(u),
            group: None,
        } => Ok(Some(Target::User(src.str(u)))),
        WireTarget {
            user: None,
            group: Some(g),
        } => Ok(Some(Target::Group(src.str(g)))),
        _ => Err(DecodeError::InvalidValue { field: "to" }),
    }
}

fn status(s: Option<BStr>) -> Result<Status, DecodeError> {
    Status::from_name(&req(s, "status")?.0).ok_or(DecodeError::InvalidValue { field: "status" })
}

impl WireIn<'_> {
    /// Checks the op's required fields and builds the typed message.
    pub(crate) fn into_envelope(self, src: &Src) -> Result<Envelope, DecodeError> {
        let w = self;
        let op_name = req(w.op, "op")?;
        let Some(op) = crate::protocol::Op::from_name(&op_name.0) else {
            return Err(DecodeError::UnknownOp {
                op: op_name.0.into_owned(),
                reference: w.reference,
            });
        };
        use crate::protocol::Op;
        let msg = match op {
            Op::Hello => Message::Hello(Hello {
                version: w.version.unwrap_or(0),
                token: src.req(w.token, "token")?,
                device: src.req(w.device, "device")?,
                codecs: src.list(w.codecs.unwrap_or_default()),
                resume: w.resume.map(|r| Resume {
                    inbox_seq: r.inbox_seq,
                }),
            }),
            Op::Welcome => {
                let l = w.limits.unwrap_or_default();
                Message::Welcome(Welcome {
                    version: w.version.unwrap_or(0),
                    session: req(w.session, "session")?,
                    user: src.req(w.user, "user")?,
                    heartbeat_ms: req(w.heartbeat_ms, "heartbeat_ms")?,
                    server_time_ms: req(w.server_time_ms, "server_time_ms")?,
                    limits: Limits {
                        max_frame_bytes: l.max_frame_bytes,
                        sends_per_sec: l.sends_per_sec,
                        window: l.window,
                    },
                })
            }
            Op::Ping => Message::Ping(Ping {
                ts: w.ts.unwrap_or(0),
            }),
            Op::Pong => Message::Pong(Pong {
                ts: w.ts.unwrap_or(0),
            }),
            Op::Send => Message::Send(Send {
                to: target(src, w.to)?,
                cmid: src.req(w.cmid, "cmid")?,
                kind: src.opt(w.kind),
                body: src.req(w.body, "body")?,
                ext: src.ext(w.ext),
            }),
            Op::SendAck => Message::SendAck(SendAck {
                cmid: src.req(w.cmid, "cmid")?,
                mid: req(w.mid, "mid")?,
                seq: req(w.seq, "seq")?,
                ts: req(w.ts, "ts")?,
            }),
            Op::Deliver => Message::Deliver(Deliver {
                mid: req(w.mid, "mid")?,
                from: src.req(w.from, "from")?,
                to: opt_target(src, w.to)?,
                inbox_seq: req(w.inbox_seq, "inbox_seq")?,
                ts: req(w.ts, "ts")?,
                kind: src.opt(w.kind),
                body: src.req(w.body, "body")?,
                ext: src.ext(w.ext),
            }),
            Op::Ack => Message::Ack(Ack {
                inbox_seq: req(w.inbox_seq, "inbox_seq")?,
                group: src.opt(w.group),
            }),
            Op::Sync => Message::Sync(Sync {
                after_inbox_seq: w.after_inbox_seq.unwrap_or(0),
                limit: w.limit.unwrap_or(0),
                group: src.opt(w.group),
            }),
            Op::Synced => Message::Synced(Synced {
                up_to: req(w.up_to, "up_to")?,
                more: w.more.unwrap_or(false),
                group: src.opt(w.group),
                groups: src.list(w.groups.unwrap_or_default()),
            }),
            Op::PresenceSet => Message::PresenceSet(PresenceSet {
                status: status(w.status)?,
            }),
            Op::PresenceSub => Message::PresenceSub(PresenceSub {
                users: src.list(req(w.users, "users")?),
            }),
            Op::Presence => Message::Presence(Presence {
                user: src.req(w.user, "user")?,
                status: status(w.status)?,
                ts: w.ts.unwrap_or(0),
            }),
            Op::GroupJoin => Message::GroupJoin(GroupJoin {
                group: src.req(w.group, "group")?,
            }),
            Op::GroupLeave => Message::GroupLeave(GroupLeave {
                group: src.req(w.group, "group")?,
            }),
            Op::Ok => Message::Ok,
            Op::Error => Message::Error(Error {
                code: ErrorCode::from_name(&req(w.code, "code")?.0)
                    .ok_or(DecodeError::InvalidValue { field: "code" })?,
                message: src.opt(w.message).unwrap_or_default(),
                cmid: src.opt(w.cmid),
                retry_after_ms: w.retry_after_ms,
            }),
            Op::Goaway => Message::Goaway(Goaway {
                reason: src.opt(w.reason).unwrap_or_default(),
                reconnect_ms: w.reconnect_ms.unwrap_or(0),
            }),
        };
        Ok(Envelope {
            reference: w.reference,
            msg,
        })
    }
}

/// Maps a serde error message from a self-describing format to a [`DecodeError`].
pub(crate) fn serde_error(codec: &'static str, e: impl std::fmt::Display) -> DecodeError {
    let text = e.to_string();
    if text.contains("EOF") || text.contains("unexpected end") {
        DecodeError::Truncated
    } else if text.contains("recursion limit") || text.contains("depth limit") {
        DecodeError::TooDeep
    } else if text.contains("UTF-8") || text.contains("utf-8") || text.contains("utf8") {
        DecodeError::InvalidUtf8
    } else {
        DecodeError::malformed(codec, text)
    }
}
