//! The field mapping shared by the self-describing codecs (JSON, MessagePack, Hessian): one
//! flat map per frame with an `op` string, the optional `ref`, and the op's fields by name.
//!
//! Encoding goes through [`Serialize`] for [`Envelope`] (a map, `None` fields left out).
//! Decoding goes through [`WireIn`], a flat struct holding every field any op may carry, which
//! serde fills in one pass without buffering; [`WireIn::into_envelope`] then checks that the
//! op's required fields are present. Unknown fields are ignored (SPEC 3.3 versioning).

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::DecodeError;
use crate::protocol::{
    Ack, Deliver, Envelope, Error, ErrorCode, Ext, Goaway, GroupJoin, GroupLeave, Hello, Limits,
    Message, Ping, Pong, Presence, PresenceSet, PresenceSub, Resume, Send, SendAck, Status, Sync,
    Synced, Target, Welcome,
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
fn entry_count(env: &Envelope) -> usize {
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
        Message::Ack(_) => 1,
        Message::Sync(_) | Message::Synced(_) => 2,
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
            Message::Ack(a) => m.serialize_entry("inbox_seq", &a.inbox_seq)?,
            Message::Sync(x) => {
                m.serialize_entry("after_inbox_seq", &x.after_inbox_seq)?;
                m.serialize_entry("limit", &x.limit)?;
            }
            Message::Synced(x) => {
                m.serialize_entry("up_to", &x.up_to)?;
                m.serialize_entry("more", &x.more)?;
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

/// `to`: exactly one of `user` or `group`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct WireTarget {
    user: Option<String>,
    group: Option<String>,
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
pub(crate) struct WireIn {
    op: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<u64>,
    version: Option<u8>,
    token: Option<String>,
    device: Option<String>,
    codecs: Option<Vec<String>>,
    resume: Option<WireResume>,
    session: Option<u64>,
    user: Option<String>,
    heartbeat_ms: Option<u64>,
    server_time_ms: Option<u64>,
    limits: Option<WireLimits>,
    ts: Option<u64>,
    to: Option<WireTarget>,
    cmid: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    body: Option<String>,
    ext: Option<Ext>,
    mid: Option<u64>,
    seq: Option<u64>,
    from: Option<String>,
    inbox_seq: Option<u64>,
    after_inbox_seq: Option<u64>,
    limit: Option<u32>,
    up_to: Option<u64>,
    more: Option<bool>,
    status: Option<String>,
    users: Option<Vec<String>>,
    group: Option<String>,
    code: Option<String>,
    message: Option<String>,
    retry_after_ms: Option<u64>,
    reason: Option<String>,
    reconnect_ms: Option<u64>,
}

/// Only the op and ref. A frame whose full parse failed is parsed again with this, so that an
/// unknown op whose fields clash with ours still gets `unsupported` rather than `bad_frame`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct OpOnly {
    op: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<u64>,
}

impl OpOnly {
    /// Chooses the error to report for a frame whose full parse failed with `full`.
    pub(crate) fn classify(self, full: DecodeError) -> DecodeError {
        match self.op {
            Some(op) if crate::protocol::Op::from_name(&op).is_none() => DecodeError::UnknownOp {
                op,
                reference: self.reference,
            },
            _ => full,
        }
    }
}

/// Finishes a self-describing decode: the full parse's result, or on failure the better error
/// (`UnknownOp` when a second, op-only parse finds an op this version does not know).
pub(crate) fn finish(
    full: Result<WireIn, DecodeError>,
    op_only: impl FnOnce() -> Option<OpOnly>,
) -> Result<Envelope, DecodeError> {
    match full {
        Ok(wire) => wire.into_envelope(),
        Err(e) => Err(match op_only() {
            Some(op) => op.classify(e),
            None => e,
        }),
    }
}

fn req<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField(field))
}

fn target(t: Option<WireTarget>) -> Result<Target, DecodeError> {
    opt_target(t)?.ok_or(DecodeError::MissingField("to"))
}

fn opt_target(t: Option<WireTarget>) -> Result<Option<Target>, DecodeError> {
    let Some(t) = t else { return Ok(None) };
    match t {
        WireTarget {
            user: Some(u),
            group: None,
        } => Ok(Some(Target::User(u))),
        WireTarget {
            user: None,
            group: Some(g),
        } => Ok(Some(Target::Group(g))),
        _ => Err(DecodeError::InvalidValue { field: "to" }),
    }
}

fn status(s: Option<String>) -> Result<Status, DecodeError> {
    Status::from_name(&req(s, "status")?).ok_or(DecodeError::InvalidValue { field: "status" })
}

impl WireIn {
    /// Checks the op's required fields and builds the typed message.
    pub(crate) fn into_envelope(self) -> Result<Envelope, DecodeError> {
        let w = self;
        let op_name = req(w.op, "op")?;
        let Some(op) = crate::protocol::Op::from_name(&op_name) else {
            return Err(DecodeError::UnknownOp {
                op: op_name,
                reference: w.reference,
            });
        };
        use crate::protocol::Op;
        let msg = match op {
            Op::Hello => Message::Hello(Hello {
                version: w.version.unwrap_or(0),
                token: req(w.token, "token")?,
                device: req(w.device, "device")?,
                codecs: w.codecs.unwrap_or_default(),
                resume: w.resume.map(|r| Resume {
                    inbox_seq: r.inbox_seq,
                }),
            }),
            Op::Welcome => {
                let l = w.limits.unwrap_or_default();
                Message::Welcome(Welcome {
                    version: w.version.unwrap_or(0),
                    session: req(w.session, "session")?,
                    user: req(w.user, "user")?,
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
                to: target(w.to)?,
                cmid: req(w.cmid, "cmid")?,
                kind: w.kind,
                body: req(w.body, "body")?,
                ext: w.ext.unwrap_or_default(),
            }),
            Op::SendAck => Message::SendAck(SendAck {
                cmid: req(w.cmid, "cmid")?,
                mid: req(w.mid, "mid")?,
                seq: req(w.seq, "seq")?,
                ts: req(w.ts, "ts")?,
            }),
            Op::Deliver => Message::Deliver(Deliver {
                mid: req(w.mid, "mid")?,
                from: req(w.from, "from")?,
                to: opt_target(w.to)?,
                inbox_seq: req(w.inbox_seq, "inbox_seq")?,
                ts: req(w.ts, "ts")?,
                kind: w.kind,
                body: req(w.body, "body")?,
                ext: w.ext.unwrap_or_default(),
            }),
            Op::Ack => Message::Ack(Ack {
                inbox_seq: req(w.inbox_seq, "inbox_seq")?,
            }),
            Op::Sync => Message::Sync(Sync {
                after_inbox_seq: w.after_inbox_seq.unwrap_or(0),
                limit: w.limit.unwrap_or(0),
            }),
            Op::Synced => Message::Synced(Synced {
                up_to: req(w.up_to, "up_to")?,
                more: w.more.unwrap_or(false),
            }),
            Op::PresenceSet => Message::PresenceSet(PresenceSet {
                status: status(w.status)?,
            }),
            Op::PresenceSub => Message::PresenceSub(PresenceSub {
                users: req(w.users, "users")?,
            }),
            Op::Presence => Message::Presence(Presence {
                user: req(w.user, "user")?,
                status: status(w.status)?,
                ts: w.ts.unwrap_or(0),
            }),
            Op::GroupJoin => Message::GroupJoin(GroupJoin {
                group: req(w.group, "group")?,
            }),
            Op::GroupLeave => Message::GroupLeave(GroupLeave {
                group: req(w.group, "group")?,
            }),
            Op::Ok => Message::Ok,
            Op::Error => Message::Error(Error {
                code: ErrorCode::from_name(&req(w.code, "code")?)
                    .ok_or(DecodeError::InvalidValue { field: "code" })?,
                message: w.message.unwrap_or_default(),
                cmid: w.cmid,
                retry_after_ms: w.retry_after_ms,
            }),
            Op::Goaway => Message::Goaway(Goaway {
                reason: w.reason.unwrap_or_default(),
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
