//! The FlatBuffers codec: one `Frame` table per payload (schemas/imgw.fbs, file identifier
//! `IMGW`), the message carried in the `msg` union whose variant index is the op number.
//!
//! This module owns the mapping between [`Envelope`] and FlatBuffers bytes, in both directions,
//! plus a zero-copy read path:
//!
//! - [`FlatBuffers::encode`] builds the frame with a per-thread, reused `FlatBufferBuilder`
//!   (reset after every use, so steady-state encoding does not allocate a builder) and appends
//!   the finished bytes to `out`.
//! - [`FlatBuffers::decode_bytes`] is [`view`] followed by [`FrameView::to_envelope_in`]: it
//!   checks the file identifier, runs the FlatBuffers verifier with tight [`VerifierOptions`]
//!   (see [`verifier_options`]) and converts the frame into an [`Envelope`] whose strings are
//!   slices of the input `Bytes` (the verifier checked them as UTF-8), checking each op's
//!   required fields as the other codecs do.
//! - [`view`] does the same checks but returns a borrowed [`FrameView`] whose accessors
//!   (`op`, `reference`, `body`, `from`, `to`, ...) point into the input without copying; it is
//!   for hot paths that only inspect or route a frame. [`FrameView::to_envelope`] converts a
//!   view to an owned form that copies its strings (for input that is not held as `Bytes`).
//!
//! FlatBuffers carry no overall length: a frame is whatever the verifier can reach from the
//! root. A prefix that drops only the builder's trailing alignment padding (up to 3 zero
//! bytes after the first object written) therefore still decodes, to the identical message;
//! any prefix that cuts a real byte is refused. Framing (raw-TCP header, WebSocket) owns the
//! payload length.
//!
//! Scalars have no presence in FlatBuffers (absent reads as the schema default, 0), so only
//! strings, tables and vectors can be "missing". `ref` and `retry_after_ms` are declared
//! `= null` in the schema and map to `Option<u64>`. `version` is carried as the raw `u8`;
//! 0 (the default, so never written) means "not given", as in the other codecs.
//!
//! The generated code lives in `fb/imgw_generated.rs` (produced by
//! `flatc --rust -o src/codec/fb schemas/imgw.fbs`, committed unchanged).

use std::cell::RefCell;

use bytes::Bytes;

use flatbuffers::{
    FlatBufferBuilder, ForwardsUOffset, InvalidFlatbuffer, Vector, VerifierOptions, WIPOffset,
};

use super::text::share_str;
use super::{Codec, CodecId, DecodeError, EncodeError, MAX_DEPTH};
use crate::protocol::{
    Ack, Deliver, Envelope, Error, ErrorCode, Ext, Goaway, GroupJoin, GroupLeave, Hello, Limits,
    Message, Op, Ping, Pong, Presence, PresenceSet, PresenceSub, Resume, Send, SendAck, Status,
    Str, Sync, Synced, Target, Welcome,
};

#[allow(
    unsafe_code,
    clippy::all,
    clippy::pedantic,
    unused_imports,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_lifetimes,
    unreachable_pub,
    missing_docs
)]
#[rustfmt::skip]
#[path = "fb/imgw_generated.rs"]
mod generated;

use generated::imgw::v_1 as fb;

const CODEC: &str = "flatbuffers";

/// Most tables a frame may contain. A legitimate frame has a handful plus one per `ext` entry.
pub const MAX_TABLES: usize = 4096;

/// Initial capacity of the per-thread builder; a typical frame fits without growing.
const BUILDER_CAPACITY: usize = 1024;

/// A builder that grew past this while encoding is replaced, so one huge frame does not pin
/// its memory to the thread for good.
const BUILDER_KEEP: usize = 64 * 1024;

/// Frames larger than this are refused before building: the builder would panic at 2 GiB.
const MAX_ENCODED: usize = 1 << 30;

/// FlatBuffers encoding of the message model; travels in WebSocket binary frames.
pub struct FlatBuffers;

impl Codec for FlatBuffers {
    const ID: CodecId = CodecId::FlatBuffers;

    fn encode(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if size_bound(&env.msg) > MAX_ENCODED {
            return Err(EncodeError::TooLarge);
        }
        let reused = SCRATCH.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => {
                scratch.encode(env, out);
                true
            }
            Err(_) => false,
        });
        if reused != Ok(true) {
            // Thread-local being torn down, or (cannot happen: encode never re-enters) already
            // borrowed: fall back to a one-off builder.
            Scratch::new().encode(env, out);
        }
        Ok(())
    }

    fn decode_bytes(bytes: &Bytes) -> Result<Envelope, DecodeError> {
        view(bytes)?.to_envelope_in(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Per-thread encoding state: the builder plus offset lists for vectors, all reused.
struct Scratch {
    fbb: FlatBufferBuilder<'static>,
    strs: Vec<WIPOffset<&'static str>>,
    kvs: Vec<WIPOffset<fb::KeyValue<'static>>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

type StrVector = WIPOffset<Vector<'static, ForwardsUOffset<&'static str>>>;
type KvVector = WIPOffset<Vector<'static, ForwardsUOffset<fb::KeyValue<'static>>>>;

impl Scratch {
    fn new() -> Self {
        Scratch {
            fbb: FlatBufferBuilder::with_capacity(BUILDER_CAPACITY),
            strs: Vec::new(),
            kvs: Vec::new(),
        }
    }

    fn encode(&mut self, env: &Envelope, out: &mut Vec<u8>) {
        // Cheap when the previous use reset it already; recovers the builder if a previous
        // encode was interrupted by a panic elsewhere while it was mid-frame.
        self.fbb.reset();
        self.strs.clear();
        self.kvs.clear();
        let (msg_type, msg) = self.message(&env.msg);
        let frame = fb::Frame::create(
            &mut self.fbb,
            &fb::FrameArgs {
                msg_type,
                msg: Some(msg),
                ref_: env.reference,
            },
        );
        fb::finish_frame_buffer(&mut self.fbb, frame);
        let data = self.fbb.finished_data();
        out.extend_from_slice(data);
        let grew = data.len() > BUILDER_KEEP;
        self.fbb.reset();
        if grew {
            *self = Scratch::new();
        }
    }

    fn string_vector(&mut self, items: &[Str]) -> StrVector {
        self.strs.clear();
        for s in items {
            let off = self.fbb.create_string(s);
            self.strs.push(off);
        }
        let v = self.fbb.create_vector(&self.strs);
        self.strs.clear();
        v
    }

    /// `ext` as a vector of `KeyValue`, sorted by key (BTreeMap order); absent when empty.
    fn ext(&mut self, ext: &Ext) -> Option<KvVector> {
        if ext.is_empty() {
            return None;
        }
        self.kvs.clear();
        for (k, v) in ext {
            let key = Some(self.fbb.create_string(k));
            let value = Some(self.fbb.create_string(v));
            let kv = fb::KeyValue::create(&mut self.fbb, &fb::KeyValueArgs { key, value });
            self.kvs.push(kv);
        }
        let v = self.fbb.create_vector(&self.kvs);
        self.kvs.clear();
        Some(v)
    }

    fn target(&mut self, t: &Target) -> WIPOffset<fb::Target<'static>> {
        let (user, group) = match t {
            Target::User(u) => (Some(self.fbb.create_string(u)), None),
            Target::Group(g) => (None, Some(self.fbb.create_string(g))),
        };
        fb::Target::create(&mut self.fbb, &fb::TargetArgs { user, group })
    }

    fn opt_string(&mut self, s: Option<&Str>) -> Option<WIPOffset<&'static str>> {
        s.map(|s| self.fbb.create_string(s))
    }

    /// Builds the union value; returns its discriminant (== op number) and offset.
    fn message(&mut self, msg: &Message) -> (fb::Msg, WIPOffset<flatbuffers::UnionWIPOffset>) {
        let msg_type = fb::Msg(msg.op() as u8);
        let value = match msg {
            Message::Hello(h) => {
                let token = Some(self.fbb.create_string(&h.token));
                let device = Some(self.fbb.create_string(&h.device));
                let codecs = (!h.codecs.is_empty()).then(|| self.string_vector(&h.codecs));
                let resume = h.resume.as_ref().map(|r| {
                    fb::Resume::create(
                        &mut self.fbb,
                        &fb::ResumeArgs {
                            inbox_seq: r.inbox_seq,
                        },
                    )
                });
                let args = fb::HelloArgs {
                    version: h.version,
                    token,
                    device,
                    codecs,
                    resume,
                };
                fb::Hello::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Welcome(w) => {
                let user = Some(self.fbb.create_string(&w.user));
                let limits = Some(fb::Limits::create(
                    &mut self.fbb,
                    &fb::LimitsArgs {
                        max_frame_bytes: w.limits.max_frame_bytes,
                        sends_per_sec: w.limits.sends_per_sec,
                        window: w.limits.window,
                    },
                ));
                let args = fb::WelcomeArgs {
                    version: w.version,
                    session: w.session,
                    user,
                    heartbeat_ms: w.heartbeat_ms,
                    server_time_ms: w.server_time_ms,
                    limits,
                };
                fb::Welcome::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Ping(p) => {
                fb::Ping::create(&mut self.fbb, &fb::PingArgs { ts: p.ts }).as_union_value()
            }
            Message::Pong(p) => {
                fb::Pong::create(&mut self.fbb, &fb::PongArgs { ts: p.ts }).as_union_value()
            }
            Message::Send(s) => {
                let to = Some(self.target(&s.to));
                let cmid = Some(self.fbb.create_string(&s.cmid));
                let type_ = self.opt_string(s.kind.as_ref());
                let body = Some(self.fbb.create_string(&s.body));
                let ext = self.ext(&s.ext);
                let args = fb::SendArgs {
                    to,
                    cmid,
                    type_,
                    body,
                    ext,
                };
                fb::Send::create(&mut self.fbb, &args).as_union_value()
            }
            Message::SendAck(a) => {
                let cmid = Some(self.fbb.create_string(&a.cmid));
                let args = fb::SendAckArgs {
                    cmid,
                    mid: a.mid,
                    seq: a.seq,
                    ts: a.ts,
                };
                fb::SendAck::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Deliver(d) => {
                let from = Some(self.fbb.create_string(&d.from));
                let to = d.to.as_ref().map(|t| self.target(t));
                let type_ = self.opt_string(d.kind.as_ref());
                let body = Some(self.fbb.create_string(&d.body));
                let ext = self.ext(&d.ext);
                let args = fb::DeliverArgs {
                    mid: d.mid,
                    from,
                    to,
                    inbox_seq: d.inbox_seq,
                    ts: d.ts,
                    type_,
                    body,
                    ext,
                };
                fb::Deliver::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Ack(a) => {
                let group = self.opt_string(a.group.as_ref());
                let args = fb::AckArgs {
                    inbox_seq: a.inbox_seq,
                    group,
                };
                fb::Ack::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Sync(s) => {
                let group = self.opt_string(s.group.as_ref());
                let args = fb::SyncArgs {
                    after_inbox_seq: s.after_inbox_seq,
                    limit: s.limit,
                    group,
                };
                fb::Sync::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Synced(s) => {
                let group = self.opt_string(s.group.as_ref());
                // Absent when empty (an absent vector reads as empty).
                let groups = (!s.groups.is_empty()).then(|| self.string_vector(&s.groups));
                let args = fb::SyncedArgs {
                    up_to: s.up_to,
                    more: s.more,
                    group,
                    groups,
                };
                fb::Synced::create(&mut self.fbb, &args).as_union_value()
            }
            Message::PresenceSet(p) => fb::PresenceSet::create(
                &mut self.fbb,
                &fb::PresenceSetArgs {
                    status: fb::Status(p.status as u8),
                },
            )
            .as_union_value(),
            Message::PresenceSub(p) => {
                // Always written, even when empty: `users` is required on decode.
                let users = Some(self.string_vector(&p.users));
                fb::PresenceSub::create(&mut self.fbb, &fb::PresenceSubArgs { users })
                    .as_union_value()
            }
            Message::Presence(p) => {
                let user = Some(self.fbb.create_string(&p.user));
                let args = fb::PresenceArgs {
                    user,
                    status: fb::Status(p.status as u8),
                    ts: p.ts,
                };
                fb::Presence::create(&mut self.fbb, &args).as_union_value()
            }
            Message::GroupJoin(g) => {
                let group = Some(self.fbb.create_string(&g.group));
                fb::GroupJoin::create(&mut self.fbb, &fb::GroupJoinArgs { group }).as_union_value()
            }
            Message::GroupLeave(g) => {
                let group = Some(self.fbb.create_string(&g.group));
                fb::GroupLeave::create(&mut self.fbb, &fb::GroupLeaveArgs { group })
                    .as_union_value()
            }
            Message::Ok => fb::Ok::create(&mut self.fbb, &fb::OkArgs {}).as_union_value(),
            Message::Error(e) => {
                let message = Some(self.fbb.create_string(&e.message));
                let cmid = self.opt_string(e.cmid.as_ref());
                let args = fb::ErrorArgs {
                    code: e.code as u16,
                    message,
                    cmid,
                    retry_after_ms: e.retry_after_ms,
                };
                fb::Error::create(&mut self.fbb, &args).as_union_value()
            }
            Message::Goaway(g) => {
                let reason = Some(self.fbb.create_string(&g.reason));
                let args = fb::GoawayArgs {
                    reason,
                    reconnect_ms: g.reconnect_ms,
                };
                fb::Goaway::create(&mut self.fbb, &args).as_union_value()
            }
        };
        (msg_type, value)
    }
}

/// Upper bound on the encoded size, before alignment: strings with their length, terminator
/// and padding, plus a generous allowance per table, vector entry and scalar.
fn size_bound(msg: &Message) -> usize {
    fn s(x: &str) -> usize {
        x.len().saturating_add(12)
    }
    fn list(xs: &[Str]) -> usize {
        xs.iter().fold(8, |acc, x| acc.saturating_add(s(x)))
    }
    fn ext(e: &Ext) -> usize {
        e.iter().fold(8, |acc, (k, v)| {
            acc.saturating_add(s(k))
                .saturating_add(s(v))
                .saturating_add(64)
        })
    }
    fn target(t: &Target) -> usize {
        match t {
            Target::User(x) | Target::Group(x) => s(x),
        }
    }
    fn opt(x: &Option<Str>) -> usize {
        x.as_deref().map_or(0, s)
    }
    let strings = match msg {
        Message::Hello(h) => s(&h.token)
            .saturating_add(s(&h.device))
            .saturating_add(list(&h.codecs)),
        Message::Welcome(w) => s(&w.user),
        Message::Send(x) => target(&x.to)
            .saturating_add(s(&x.cmid))
            .saturating_add(opt(&x.kind))
            .saturating_add(s(&x.body))
            .saturating_add(ext(&x.ext)),
        Message::SendAck(a) => s(&a.cmid),
        Message::Deliver(d) => s(&d.from)
            .saturating_add(d.to.as_ref().map_or(0, target))
            .saturating_add(opt(&d.kind))
            .saturating_add(s(&d.body))
            .saturating_add(ext(&d.ext)),
        Message::PresenceSub(p) => list(&p.users),
        Message::Presence(p) => s(&p.user),
        Message::GroupJoin(GroupJoin { group }) | Message::GroupLeave(GroupLeave { group }) => {
            s(group)
        }
        Message::Error(e) => s(&e.message).saturating_add(opt(&e.cmid)),
        Message::Goaway(g) => s(&g.reason),
        Message::Ack(a) => opt(&a.group),
        Message::Sync(x) => opt(&x.group),
        Message::Synced(x) => opt(&x.group).saturating_add(list(&x.groups)),
        Message::Ping(_) | Message::Pong(_) | Message::PresenceSet(_) | Message::Ok => 0,
    };
    // Frame, message and nested tables with their vtables and scalars.
    strings.saturating_add(512)
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// The verifier limits for an input of `len` bytes.
///
/// - `max_depth` = [`MAX_DEPTH`] (16): our frames nest 3 tables deep.
/// - `max_tables` = [`MAX_TABLES`] (4096): bounds the work on DAG-shaped hostile input; a
///   legitimate frame has a few tables plus one per `ext` entry.
/// - `max_apparent_size` = 2 × `len`: the verifier counts every byte it visits, so offsets
///   that point many times at the same string or table (turning a small buffer into a huge
///   tree, and a huge owned copy) are refused. A legitimate frame visits each byte about once
///   (shared vtables are counted per use, which stays well under 2×).
pub fn verifier_options(len: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: MAX_DEPTH,
        max_tables: MAX_TABLES,
        max_apparent_size: len.saturating_mul(2),
        ignore_missing_null_terminator: false,
    }
}

fn verify_error(e: InvalidFlatbuffer) -> DecodeError {
    match e {
        // The verifier only reports this when a range ends past the input.
        InvalidFlatbuffer::RangeOutOfBounds { .. } => DecodeError::Truncated,
        InvalidFlatbuffer::DepthLimitReached => DecodeError::TooDeep,
        InvalidFlatbuffer::Utf8Error { .. } => DecodeError::InvalidUtf8,
        other => DecodeError::malformed(CODEC, other.to_string().trim_end()),
    }
}

/// Verifies `bytes` as an `IMGW` frame of a known op and returns a borrowed view of it.
///
/// Runs the same checks as [`FlatBuffers::decode`] up to the op (identifier, verifier, unknown
/// op, missing union); per-field requirements are checked by [`FrameView::to_envelope`], and
/// the accessors return `None` for what is absent.
pub fn view(bytes: &[u8]) -> Result<FrameView<'_>, DecodeError> {
    // Root offset (4 bytes) then the file identifier (4 bytes).
    let Some(ident) = bytes.get(4..8) else {
        return Err(DecodeError::Truncated);
    };
    if ident != fb::FRAME_IDENTIFIER.as_bytes() {
        return Err(DecodeError::malformed(CODEC, "file identifier is not IMGW"));
    }
    let opts = verifier_options(bytes.len());
    let frame = flatbuffers::root_with_opts::<fb::Frame>(&opts, bytes).map_err(verify_error)?;
    let n = frame.msg_type().0;
    if n == fb::Msg::NONE.0 {
        return Err(DecodeError::MissingField("op"));
    }
    let Some(op) = Op::from_u8(n) else {
        return Err(DecodeError::UnknownOp {
            op: n.to_string(),
            reference: frame.ref_(),
        });
    };
    Ok(FrameView { frame, op })
}

/// A verified frame, read in place: string accessors return slices of the input.
///
/// Accessors for fields the op does not have return `None`.
#[derive(Clone, Copy)]
pub struct FrameView<'a> {
    frame: fb::Frame<'a>,
    op: Op,
}

/// A borrowed [`Target`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetRef<'a> {
    User(&'a str),
    Group(&'a str),
}

impl<'a> TargetRef<'a> {
    /// The user or group id.
    pub fn as_str(&self) -> &'a str {
        match *self {
            TargetRef::User(s) | TargetRef::Group(s) => s,
        }
    }

    /// The owned [`Target`].
    pub fn to_target(&self) -> Target {
        self.target_with(&CopyStr)
    }

    fn target_with(&self, mk: &impl MakeStr) -> Target {
        match *self {
            TargetRef::User(s) => Target::User(mk.str(s)),
            TargetRef::Group(s) => Target::Group(mk.str(s)),
        }
    }
}

/// Exactly one of `user` / `group`.
fn target_ref(t: fb::Target<'_>) -> Result<TargetRef<'_>, DecodeError> {
    match (t.user(), t.group()) {
        (Some(u), None) => Ok(TargetRef::User(u)),
        (None, Some(g)) => Ok(TargetRef::Group(g)),
        _ => Err(DecodeError::InvalidValue { field: "to" }),
    }
}

fn req<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField(field))
}

fn req_string(mk: &impl MakeStr, v: Option<&str>, field: &'static str) -> Result<Str, DecodeError> {
    req(v, field).map(|s| mk.str(s))
}

/// How [`FrameView`] turns the strings it reads into [`Str`]s.
trait MakeStr {
    fn str(&self, s: &str) -> Str;
}

/// Copies every string ([`FrameView::to_envelope`]).
struct CopyStr;

impl MakeStr for CopyStr {
    fn str(&self, s: &str) -> Str {
        Str::from(s)
    }
}

/// Slices strings out of the input ([`FrameView::to_envelope_in`]); the verifier checked
/// them as UTF-8 already.
struct ShareStr<'a>(&'a Bytes);

impl MakeStr for ShareStr<'_> {
    fn str(&self, s: &str) -> Str {
        share_str(self.0, s)
    }
}

fn status(s: fb::Status) -> Result<Status, DecodeError> {
    Status::from_u8(s.0).ok_or(DecodeError::InvalidValue { field: "status" })
}

fn strings(mk: &impl MakeStr, v: flatbuffers::Vector<'_, ForwardsUOffset<&str>>) -> Vec<Str> {
    v.iter().map(|s| mk.str(s)).collect()
}

fn ext(
    mk: &impl MakeStr,
    v: Option<flatbuffers::Vector<'_, ForwardsUOffset<fb::KeyValue<'_>>>>,
) -> Result<Ext, DecodeError> {
    let mut out = Ext::with_capacity(v.map_or(0, |v| v.len()));
    for kv in v.iter().flatten() {
        // `key` is required by the schema (it is the sort key), so the verifier checked it.
        let value = req(kv.value(), "value")?;
        out.insert(mk.str(kv.key()), mk.str(value));
    }
    Ok(out)
}

/// The union value of a known op. After verification a present discriminant always has its
/// value (the verifier refuses one without the other), so the error is defensive only.
fn union<T>(v: Option<T>) -> Result<T, DecodeError> {
    v.ok_or_else(|| DecodeError::malformed(CODEC, "union value does not match its type"))
}

impl<'a> FrameView<'a> {
    pub fn op(&self) -> Op {
        self.op
    }

    /// The correlation id (`ref`), if the frame carries one.
    pub fn reference(&self) -> Option<u64> {
        self.frame.ref_()
    }

    /// `body` of `send` and `deliver`.
    pub fn body(&self) -> Option<&'a str> {
        match self.op {
            Op::Send => self.frame.msg_as_send()?.body(),
            Op::Deliver => self.frame.msg_as_deliver()?.body(),
            _ => None,
        }
    }

    /// `from` of `deliver`.
    pub fn from(&self) -> Option<&'a str> {
        self.frame.msg_as_deliver()?.from()
    }

    /// `to` of `send` and `deliver`; `None` when absent or not exactly one of user/group.
    pub fn to(&self) -> Option<TargetRef<'a>> {
        let t = match self.op {
            Op::Send => self.frame.msg_as_send()?.to()?,
            Op::Deliver => self.frame.msg_as_deliver()?.to()?,
            _ => return None,
        };
        target_ref(t).ok()
    }

    /// `type` of `send` and `deliver`.
    pub fn kind(&self) -> Option<&'a str> {
        match self.op {
            Op::Send => self.frame.msg_as_send()?.type_(),
            Op::Deliver => self.frame.msg_as_deliver()?.type_(),
            _ => None,
        }
    }

    /// `cmid` of `send`, `send_ack` and `error`.
    pub fn cmid(&self) -> Option<&'a str> {
        match self.op {
            Op::Send => self.frame.msg_as_send()?.cmid(),
            Op::SendAck => self.frame.msg_as_send_ack()?.cmid(),
            Op::Error => self.frame.msg_as_error()?.cmid(),
            _ => None,
        }
    }

    /// `mid` of `deliver` and `send_ack`.
    pub fn mid(&self) -> Option<u64> {
        match self.op {
            Op::Deliver => Some(self.frame.msg_as_deliver()?.mid()),
            Op::SendAck => Some(self.frame.msg_as_send_ack()?.mid()),
            _ => None,
        }
    }

    /// `inbox_seq` of `deliver` and `ack`.
    pub fn inbox_seq(&self) -> Option<u64> {
        match self.op {
            Op::Deliver => Some(self.frame.msg_as_deliver()?.inbox_seq()),
            Op::Ack => Some(self.frame.msg_as_ack()?.inbox_seq()),
            _ => None,
        }
    }

    /// Copies the frame into an owned [`Envelope`], checking the op's required fields.
    pub fn to_envelope(&self) -> Result<Envelope, DecodeError> {
        self.convert(&CopyStr)
    }

    /// Converts the frame into an [`Envelope`] whose strings are slices of `src`, the
    /// [`Bytes`] this view was made from (strings that are not inside `src` are copied).
    pub fn to_envelope_in(&self, src: &Bytes) -> Result<Envelope, DecodeError> {
        self.convert(&ShareStr(src))
    }

    fn convert(&self, mk: &impl MakeStr) -> Result<Envelope, DecodeError> {
        let f = self.frame;
        let msg = match self.op {
            Op::Hello => {
                let h = union(f.msg_as_hello())?;
                Message::Hello(Hello {
                    version: h.version(),
                    token: req_string(mk, h.token(), "token")?,
                    device: req_string(mk, h.device(), "device")?,
                    codecs: h.codecs().map(|v| strings(mk, v)).unwrap_or_default(),
                    resume: h.resume().map(|r| Resume {
                        inbox_seq: r.inbox_seq(),
                    }),
                })
            }
            Op::Welcome => {
                let w = union(f.msg_as_welcome())?;
                let limits = w.limits().map_or_else(Limits::default, |l| Limits {
                    max_frame_bytes: l.max_frame_bytes(),
                    sends_per_sec: l.sends_per_sec(),
                    window: l.window(),
                });
                Message::Welcome(Welcome {
                    version: w.version(),
                    session: w.session(),
                    user: req_string(mk, w.user(), "user")?,
                    heartbeat_ms: w.heartbeat_ms(),
                    server_time_ms: w.server_time_ms(),
                    limits,
                })
            }
            Op::Ping => Message::Ping(Ping {
                ts: union(f.msg_as_ping())?.ts(),
            }),
            Op::Pong => Message::Pong(Pong {
                ts: union(f.msg_as_pong())?.ts(),
            }),
            Op::Send => {
                let s = union(f.msg_as_send())?;
                Message::Send(Send {
                    to: target_ref(req(s.to(), "to")?)?.target_with(mk),
                    cmid: req_string(mk, s.cmid(), "cmid")?,
                    kind: s.type_().map(|x| mk.str(x)),
                    body: req_string(mk, s.body(), "body")?,
                    ext: ext(mk, s.ext())?,
                })
            }
            Op::SendAck => {
                let a = union(f.msg_as_send_ack())?;
                Message::SendAck(SendAck {
                    cmid: req_string(mk, a.cmid(), "cmid")?,
                    mid: a.mid(),
                    seq: a.seq(),
                    ts: a.ts(),
                })
            }
            Op::Deliver => {
                let d = union(f.msg_as_deliver())?;
                Message::Deliver(Deliver {
                    mid: d.mid(),
                    from: req_string(mk, d.from(), "from")?,
                    to: d
                        .to()
                        .map(target_ref)
                        .transpose()?
                        .map(|t| t.target_with(mk)),
                    inbox_seq: d.inbox_seq(),
                    ts: d.ts(),
                    kind: d.type_().map(|x| mk.str(x)),
                    body: req_string(mk, d.body(), "body")?,
                    ext: ext(mk, d.ext())?,
                })
            }
            Op::Ack => {
                let a = union(f.msg_as_ack())?;
                Message::Ack(Ack {
                    inbox_seq: a.inbox_seq(),
                    group: a.group().map(|x| mk.str(x)),
                })
            }
            Op::Sync => {
                let s = union(f.msg_as_sync())?;
                Message::Sync(Sync {
                    after_inbox_seq: s.after_inbox_seq(),
                    limit: s.limit(),
                    group: s.group().map(|x| mk.str(x)),
                })
            }
            Op::Synced => {
                let s = union(f.msg_as_synced())?;
                Message::Synced(Synced {
                    up_to: s.up_to(),
                    more: s.more(),
                    group: s.group().map(|x| mk.str(x)),
                    groups: s.groups().map(|v| strings(mk, v)).unwrap_or_default(),
                })
            }
            Op::PresenceSet => Message::PresenceSet(PresenceSet {
                status: status(union(f.msg_as_presence_set())?.status())?,
            }),
            Op::PresenceSub => Message::PresenceSub(PresenceSub {
                users: strings(mk, req(union(f.msg_as_presence_sub())?.users(), "users")?),
            }),
            Op::Presence => {
                let p = union(f.msg_as_presence())?;
                Message::Presence(Presence {
                    user: req_string(mk, p.user(), "user")?,
                    status: status(p.status())?,
                    ts: p.ts(),
                })
            }
            Op::GroupJoin => Message::GroupJoin(GroupJoin {
                group: req_string(mk, union(f.msg_as_group_join())?.group(), "group")?,
            }),
            Op::GroupLeave => Message::GroupLeave(GroupLeave {
                group: req_string(mk, union(f.msg_as_group_leave())?.group(), "group")?,
            }),
            Op::Ok => {
                union(f.msg_as_ok())?;
                Message::Ok
            }
            Op::Error => {
                let e = union(f.msg_as_error())?;
                // 0 is the scalar default (never written by an encoder), so it means absent.
                let code = match e.code() {
                    0 => return Err(DecodeError::MissingField("code")),
                    n => {
                        ErrorCode::from_u16(n).ok_or(DecodeError::InvalidValue { field: "code" })?
                    }
                };
                Message::Error(Error {
                    code,
                    message: mk.str(e.message().unwrap_or_default()),
                    cmid: e.cmid().map(|x| mk.str(x)),
                    retry_after_ms: e.retry_after_ms(),
                })
            }
            Op::Goaway => {
                let g = union(f.msg_as_goaway())?;
                Message::Goaway(Goaway {
                    reason: mk.str(g.reason().unwrap_or_default()),
                    reconnect_ms: g.reconnect_ms(),
                })
            }
        };
        Ok(Envelope {
            reference: f.ref_(),
            msg,
        })
    }
}

impl std::fmt::Debug for FrameView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameView")
            .field("op", &self.op)
            .field("reference", &self.reference())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(pairs: &[(&str, &str)]) -> Ext {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn deliver() -> Message {
        Message::Deliver(Deliver {
            mid: 9_000_000_001,
            from: "alice".into(),
            to: Some(Target::Group("g-42".into())),
            inbox_seq: 77,
            ts: 1_700_000_000_123,
            kind: Some("text".into()),
            body: "hello, world ✓".into(),
            ext: ext(&[("a", "1"), ("lang", "en"), ("z", "")]),
        })
    }

    /// At least one sample of every op; optional fields both present and absent.
    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: 1,
                token: "tok".into(),
                device: "dev-1".into(),
                codecs: vec!["flatbuffers".into(), "json".into()],
                resume: Some(Resume { inbox_seq: 12 }),
            }),
            Message::Hello(Hello {
                version: 0,
                token: Str::new(),
                device: "d".into(),
                codecs: vec![],
                resume: None,
            }),
            Message::Hello(Hello {
                version: 255,
                token: "t".into(),
                device: "d".into(),
                codecs: vec![],
                resume: Some(Resume { inbox_seq: 0 }),
            }),
            Message::Welcome(Welcome {
                version: 1,
                session: u64::MAX,
                user: "alice".into(),
                heartbeat_ms: 30_000,
                server_time_ms: 1_700_000_000_000,
                limits: Limits {
                    max_frame_bytes: 65_536,
                    sends_per_sec: 20,
                    window: 64,
                },
            }),
            Message::Welcome(Welcome::default()),
            Message::Ping(Ping { ts: 5 }),
            Message::Ping(Ping { ts: 0 }),
            Message::Pong(Pong { ts: u64::MAX }),
            Message::Send(Send {
                to: Target::User("bob".into()),
                cmid: "c-1".into(),
                kind: Some("text".into()),
                body: "hi".into(),
                ext: ext(&[("k", "v")]),
            }),
            Message::Send(Send {
                to: Target::Group("g".into()),
                cmid: "c-2".into(),
                kind: None,
                body: Str::new(),
                ext: Ext::new(),
            }),
            Message::SendAck(SendAck {
                cmid: "c-1".into(),
                mid: 1,
                seq: 2,
                ts: 3,
            }),
            deliver(),
            Message::Deliver(Deliver {
                mid: 0,
                from: "x".into(),
                to: Some(Target::User("y".into())),
                inbox_seq: 0,
                ts: 0,
                kind: None,
                body: "b".into(),
                ext: Ext::new(),
            }),
            Message::Ack(Ack {
                inbox_seq: 99,
                group: None,
            }),
            Message::Ack(Ack {
                inbox_seq: 9,
                group: Some("g".into()),
            }),
            Message::Sync(Sync {
                after_inbox_seq: 10,
                limit: 100,
                group: None,
            }),
            Message::Sync(Sync::default()),
            Message::Sync(Sync {
                after_inbox_seq: 0,
                limit: 5,
                group: Some("g".into()),
            }),
            Message::Synced(Synced {
                up_to: 110,
                more: true,
                ..Synced::default()
            }),
            Message::Synced(Synced {
                up_to: 0,
                more: false,
                group: Some("g".into()),
                groups: vec!["a".into(), "b".into()],
            }),
            Message::PresenceSet(PresenceSet {
                status: Status::Busy,
            }),
            Message::PresenceSet(PresenceSet {
                status: Status::Offline,
            }),
            Message::PresenceSub(PresenceSub {
                users: vec!["a".into(), "b".into(), Str::new()],
            }),
            Message::PresenceSub(PresenceSub { users: vec![] }),
            Message::Presence(Presence {
                user: "bob".into(),
                status: Status::Away,
                ts: 4,
            }),
            Message::GroupJoin(GroupJoin { group: "g1".into() }),
            Message::GroupLeave(GroupLeave { group: "g1".into() }),
            Message::Ok,
            Message::Error(Error {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                cmid: Some("c-9".into()),
                retry_after_ms: Some(250),
            }),
            Message::Error(Error {
                code: ErrorCode::BadFrame,
                message: Str::new(),
                cmid: None,
                retry_after_ms: None,
            }),
            Message::Error(Error {
                code: ErrorCode::Unavailable,
                message: "m".into(),
                cmid: None,
                retry_after_ms: Some(0),
            }),
            Message::Goaway(Goaway {
                reason: "restart".into(),
                reconnect_ms: 1000,
            }),
            Message::Goaway(Goaway::default()),
        ]
    }

    fn encode(env: &Envelope) -> Vec<u8> {
        let mut out = Vec::new();
        FlatBuffers::encode(env, &mut out).unwrap();
        out
    }

    /// Finishes `fbb` with a frame holding `msg` as union variant `msg_type`.
    fn finish(
        fbb: &mut FlatBufferBuilder<'static>,
        msg_type: fb::Msg,
        msg: WIPOffset<flatbuffers::UnionWIPOffset>,
        reference: Option<u64>,
    ) -> Vec<u8> {
        let frame = fb::Frame::create(
            fbb,
            &fb::FrameArgs {
                msg_type,
                msg: Some(msg),
                ref_: reference,
            },
        );
        fb::finish_frame_buffer(fbb, frame);
        fbb.finished_data().to_vec()
    }

    #[test]
    fn every_op_round_trips_with_and_without_ref() {
        let samples = samples();
        let mut seen: Vec<Op> = samples.iter().map(Message::op).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, Op::ALL.to_vec(), "a sample for every op");
        for msg in samples {
            for env in [
                Envelope::new(msg.clone()),
                Envelope::with_ref(msg.clone(), 1),
                Envelope::with_ref(msg.clone(), u64::MAX),
            ] {
                let bytes = encode(&env);
                assert_eq!(&bytes[4..8], b"IMGW");
                assert_eq!(FlatBuffers::decode(&bytes), Ok(env.clone()), "{env:?}");
                let v = view(&bytes).unwrap();
                assert_eq!(v.op(), env.msg.op());
                assert_eq!(v.reference(), env.reference);
                assert_eq!(v.to_envelope(), Ok(env.clone()));
                // Through the run-time dispatch too.
                let mut out = Vec::new();
                CodecId::FlatBuffers.encode(&env, &mut out).unwrap();
                assert_eq!(out, bytes, "deterministic with the reused builder");
                assert_eq!(CodecId::FlatBuffers.decode(&out), Ok(env));
            }
        }
    }

    #[test]
    fn union_index_is_the_op_number() {
        for msg in samples() {
            let bytes = encode(&Envelope::new(msg.clone()));
            let frame = flatbuffers::root::<fb::Frame>(&bytes).unwrap();
            assert_eq!(frame.msg_type().0, msg.op() as u8);
        }
    }

    #[test]
    fn encode_appends_to_out() {
        let env = Envelope::with_ref(deliver(), 3);
        let mut out = b"prefix".to_vec();
        FlatBuffers::encode(&env, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(FlatBuffers::decode(&out[6..]), Ok(env));
    }

    #[test]
    fn large_frames_round_trip_and_builder_recovers() {
        // Many tiny entries: the verifier's apparent size must stay under its 2x limit.
        let big_ext: Ext = (0..2000).map(|i| (format!("{i:04}"), Str::new())).collect();
        let users: Vec<Str> = (0..5000).map(|i| Str::from((i % 3).to_string())).collect();
        let big_body = "x".repeat(200_000);
        let msgs = [
            Message::Send(Send {
                to: Target::User("u".into()),
                cmid: "c".into(),
                kind: None,
                body: Str::new(),
                ext: big_ext,
            }),
            Message::PresenceSub(PresenceSub { users }),
            Message::PresenceSub(PresenceSub {
                users: vec![Str::new(); 3000],
            }),
            Message::Send(Send {
                to: Target::User("u".into()),
                cmid: "c".into(),
                kind: None,
                body: big_body.into(),
                ext: Ext::new(),
            }),
            deliver(),
        ];
        for msg in msgs {
            let env = Envelope::with_ref(msg, 8);
            let bytes = encode(&env);
            assert_eq!(FlatBuffers::decode(&bytes), Ok(env));
        }
    }

    #[test]
    fn view_is_zero_copy() {
        let env = Envelope::with_ref(deliver(), 42);
        let bytes = encode(&env);
        let v = view(&bytes).unwrap();
        let range = bytes.as_ptr_range();
        assert_eq!(v.op(), Op::Deliver);
        assert_eq!(v.reference(), Some(42));
        let body = v.body().unwrap();
        let from = v.from().unwrap();
        let to = v.to().unwrap();
        assert_eq!(body, "hello, world ✓");
        assert_eq!(from, "alice");
        assert_eq!(to, TargetRef::Group("g-42"));
        assert_eq!(v.kind(), Some("text"));
        assert_eq!(v.mid(), Some(9_000_000_001));
        assert_eq!(v.inbox_seq(), Some(77));
        assert_eq!(v.cmid(), None);
        for s in [body, from, to.as_str()] {
            assert!(range.contains(&s.as_ptr()), "{s:?} points into the input");
        }

        let send = Envelope::new(samples()[8].clone());
        let bytes = encode(&send);
        let v = view(&bytes).unwrap();
        assert_eq!(v.op(), Op::Send);
        assert_eq!(v.body(), Some("hi"));
        assert_eq!(v.to(), Some(TargetRef::User("bob")));
        assert_eq!(v.cmid(), Some("c-1"));
        assert_eq!(v.from(), None);
        assert_eq!(v.reference(), None);

        let ping = encode(&Envelope::new(Message::Ping(Ping { ts: 1 })));
        let v = view(&ping).unwrap();
        assert_eq!(
            (v.body(), v.from(), v.to(), v.mid()),
            (None, None, None, None)
        );
    }

    #[test]
    fn every_truncation_of_a_deliver_is_refused() {
        // The builder writes back to front, so the first object it creates (here the `from`
        // string) ends the buffer, followed by its alignment padding. Cutting only that
        // padding loses nothing: the prefix is still a valid, identical frame. Every prefix
        // that cuts a real byte is refused. With `from` = "bob" (3 bytes + NUL) there is no
        // trailing padding, so there every proper prefix is refused.
        for from in ["alice", "bob"] {
            let mut msg = deliver();
            if let Message::Deliver(d) = &mut msg {
                d.from = from.into();
            }
            let env = Envelope::with_ref(msg, 5);
            let bytes = encode(&env);
            let padding = (from.len() + 1).next_multiple_of(4) - (from.len() + 1);
            assert!(bytes[bytes.len() - padding..].iter().all(|b| *b == 0));
            assert_eq!(
                &bytes[bytes.len() - padding - 1..][..1],
                &[0],
                "NUL of `from`"
            );
            for n in 0..bytes.len() {
                let cut = &bytes[..n];
                if n >= bytes.len() - padding {
                    assert_eq!(
                        FlatBuffers::decode(cut),
                        Ok(env.clone()),
                        "padding cut: {n}"
                    );
                } else {
                    assert!(
                        FlatBuffers::decode(cut).is_err(),
                        "prefix of {n} bytes decoded"
                    );
                    assert!(view(cut).is_err(), "prefix of {n} bytes viewed");
                }
            }
            if from == "bob" {
                assert_eq!(padding, 0);
            }
        }
        assert_eq!(FlatBuffers::decode(&[]), Err(DecodeError::Truncated));
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_garbage_is_refused() {
        let mut next = rng(0x1234_5678);
        for i in 0..5000 {
            let len = (next() % 256) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(FlatBuffers::decode(&buf).is_err(), "garbage {i} decoded");
            // Past the identifier check, the verifier must catch it (and nothing may panic).
            if buf.len() >= 8 {
                buf[4..8].copy_from_slice(b"IMGW");
                let _ = FlatBuffers::decode(&buf);
                let _ = view(&buf).map(|v| (v.body(), v.from(), v.to(), v.cmid(), v.kind()));
            }
        }
    }

    #[test]
    fn mutated_frames_never_panic() {
        let mut next = rng(99);
        let originals: Vec<Vec<u8>> = samples()
            .into_iter()
            .map(|m| encode(&Envelope::with_ref(m, 7)))
            .collect();
        for _ in 0..20_000 {
            let orig = &originals[(next() as usize) % originals.len()];
            let mut buf = orig.clone();
            for _ in 0..=(next() % 4) {
                let pos = (next() as usize) % buf.len();
                buf[pos] = next() as u8;
            }
            if let Ok(env) = FlatBuffers::decode(&buf) {
                // Whatever decodes must encode again.
                let _ = encode(&env);
            }
            let _ = view(&buf).map(|v| (v.body(), v.from(), v.to(), v.mid(), v.inbox_seq()));
        }
    }

    #[test]
    fn wrong_or_missing_identifier_is_refused() {
        let mut bytes = encode(&Envelope::new(Message::Ok));
        bytes[4..8].copy_from_slice(b"IMGX");
        assert!(matches!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::Malformed {
                codec: "flatbuffers",
                ..
            })
        ));
        assert!(view(&bytes).is_err());

        // A structurally valid frame finished without an identifier.
        let mut fbb = FlatBufferBuilder::new();
        let ok = fb::Ok::create(&mut fbb, &fb::OkArgs {});
        let frame = fb::Frame::create(
            &mut fbb,
            &fb::FrameArgs {
                msg_type: fb::Msg::Ok,
                msg: Some(ok.as_union_value()),
                ref_: None,
            },
        );
        fbb.finish(frame, None);
        assert!(FlatBuffers::decode(fbb.finished_data()).is_err());
    }

    #[test]
    fn unknown_op_keeps_the_reference() {
        let mut fbb = FlatBufferBuilder::new();
        let ok = fb::Ok::create(&mut fbb, &fb::OkArgs {});
        let bytes = finish(&mut fbb, fb::Msg(19), ok.as_union_value(), Some(7));
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::UnknownOp {
                op: "19".into(),
                reference: Some(7)
            })
        );
        let mut fbb = FlatBufferBuilder::new();
        let ok = fb::Ok::create(&mut fbb, &fb::OkArgs {});
        let bytes = finish(&mut fbb, fb::Msg(200), ok.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::UnknownOp {
                op: "200".into(),
                reference: None
            })
        );
    }

    #[test]
    fn frame_without_message_is_missing_op() {
        let mut fbb = FlatBufferBuilder::new();
        let frame = fb::Frame::create(
            &mut fbb,
            &fb::FrameArgs {
                msg_type: fb::Msg::NONE,
                msg: None,
                ref_: Some(1),
            },
        );
        fb::finish_frame_buffer(&mut fbb, frame);
        assert_eq!(
            FlatBuffers::decode(fbb.finished_data()),
            Err(DecodeError::MissingField("op"))
        );
    }

    #[test]
    fn missing_required_fields() {
        let mut fbb = FlatBufferBuilder::new();
        let cmid = fbb.create_string("c");
        let body = fbb.create_string("b");
        let send = fb::Send::create(
            &mut fbb,
            &fb::SendArgs {
                to: None,
                cmid: Some(cmid),
                body: Some(body),
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Send, send.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::MissingField("to"))
        );

        let mut fbb = FlatBufferBuilder::new();
        let user = fbb.create_string("u");
        let to = fb::Target::create(
            &mut fbb,
            &fb::TargetArgs {
                user: Some(user),
                group: None,
            },
        );
        let body = fbb.create_string("b");
        let send = fb::Send::create(
            &mut fbb,
            &fb::SendArgs {
                to: Some(to),
                body: Some(body),
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Send, send.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::MissingField("cmid"))
        );
        // The view itself is fine; only the owned conversion requires the field.
        let v = view(&bytes).unwrap();
        assert_eq!((v.cmid(), v.body()), (None, Some("b")));

        let mut fbb = FlatBufferBuilder::new();
        let token = fbb.create_string("t");
        let hello = fb::Hello::create(
            &mut fbb,
            &fb::HelloArgs {
                token: Some(token),
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Hello, hello.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::MissingField("device"))
        );

        let mut fbb = FlatBufferBuilder::new();
        let user = fbb.create_string("u");
        let to = fb::Target::create(
            &mut fbb,
            &fb::TargetArgs {
                user: Some(user),
                group: None,
            },
        );
        let body = fbb.create_string("b");
        let deliver = fb::Deliver::create(
            &mut fbb,
            &fb::DeliverArgs {
                to: Some(to),
                body: Some(body),
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Deliver, deliver.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::MissingField("from"))
        );

        for (msg_type, field) in [
            (fb::Msg::PresenceSub, "users"),
            (fb::Msg::GroupJoin, "group"),
            (fb::Msg::GroupLeave, "group"),
            (fb::Msg::Presence, "user"),
            (fb::Msg::Welcome, "user"),
            (fb::Msg::SendAck, "cmid"),
            (fb::Msg::Error, "code"),
        ] {
            // An empty table reads as every field absent, whatever its type.
            let mut fbb = FlatBufferBuilder::new();
            let empty = fb::Ok::create(&mut fbb, &fb::OkArgs {});
            let bytes = finish(&mut fbb, msg_type, empty.as_union_value(), None);
            assert_eq!(
                FlatBuffers::decode(&bytes),
                Err(DecodeError::MissingField(field)),
                "{msg_type:?}"
            );
        }
    }

    #[test]
    fn target_needs_exactly_one_of_user_and_group() {
        for both in [true, false] {
            let mut fbb = FlatBufferBuilder::new();
            let (user, group) = if both {
                (Some(fbb.create_string("u")), Some(fbb.create_string("g")))
            } else {
                (None, None)
            };
            let to = fb::Target::create(&mut fbb, &fb::TargetArgs { user, group });
            let cmid = fbb.create_string("c");
            let body = fbb.create_string("b");
            let send = fb::Send::create(
                &mut fbb,
                &fb::SendArgs {
                    to: Some(to),
                    cmid: Some(cmid),
                    body: Some(body),
                    ..Default::default()
                },
            );
            let bytes = finish(&mut fbb, fb::Msg::Send, send.as_union_value(), None);
            assert_eq!(
                FlatBuffers::decode(&bytes),
                Err(DecodeError::InvalidValue { field: "to" })
            );
            assert_eq!(view(&bytes).unwrap().to(), None);
        }
    }

    #[test]
    fn unknown_status_and_code_are_invalid() {
        let mut fbb = FlatBufferBuilder::new();
        let p = fb::PresenceSet::create(
            &mut fbb,
            &fb::PresenceSetArgs {
                status: fb::Status(4),
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::PresenceSet, p.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::InvalidValue { field: "status" })
        );

        let mut fbb = FlatBufferBuilder::new();
        let user = fbb.create_string("u");
        let p = fb::Presence::create(
            &mut fbb,
            &fb::PresenceArgs {
                user: Some(user),
                status: fb::Status(200),
                ts: 1,
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Presence, p.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::InvalidValue { field: "status" })
        );

        let mut fbb = FlatBufferBuilder::new();
        let e = fb::Error::create(
            &mut fbb,
            &fb::ErrorArgs {
                code: 999,
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Error, e.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::InvalidValue { field: "code" })
        );
    }

    #[test]
    fn ext_value_is_required() {
        let mut fbb = FlatBufferBuilder::new();
        let key = fbb.create_string("k");
        let kv = fb::KeyValue::create(
            &mut fbb,
            &fb::KeyValueArgs {
                key: Some(key),
                value: None,
            },
        );
        let ext = fbb.create_vector(&[kv]);
        let from = fbb.create_string("f");
        let user = fbb.create_string("u");
        let to = fb::Target::create(
            &mut fbb,
            &fb::TargetArgs {
                user: Some(user),
                group: None,
            },
        );
        let body = fbb.create_string("b");
        let d = fb::Deliver::create(
            &mut fbb,
            &fb::DeliverArgs {
                from: Some(from),
                to: Some(to),
                body: Some(body),
                ext: Some(ext),
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Deliver, d.as_union_value(), None);
        assert_eq!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::MissingField("value"))
        );
    }

    #[test]
    fn shared_strings_cannot_inflate_the_copy() {
        // 2000 vector entries all pointing at one 1 KiB string: a ~10 KiB buffer that would
        // expand to ~2 MiB of owned strings. The apparent-size limit refuses it.
        let mut fbb = FlatBufferBuilder::new();
        let s = fbb.create_string(&"u".repeat(1024));
        let users = fbb.create_vector(&vec![s; 2000]);
        let sub = fb::PresenceSub::create(&mut fbb, &fb::PresenceSubArgs { users: Some(users) });
        let bytes = finish(&mut fbb, fb::Msg::PresenceSub, sub.as_union_value(), None);
        assert!(matches!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn shared_tables_hit_the_verifier_limits() {
        let mut fbb = FlatBufferBuilder::new();
        let key = fbb.create_string("k");
        let value = fbb.create_string("v");
        let kv = fb::KeyValue::create(
            &mut fbb,
            &fb::KeyValueArgs {
                key: Some(key),
                value: Some(value),
            },
        );
        // One table referenced more times than MAX_TABLES allows.
        let ext = fbb.create_vector(&vec![kv; MAX_TABLES + 1]);
        let cmid = fbb.create_string("c");
        let body = fbb.create_string("b");
        let user = fbb.create_string("u");
        let to = fb::Target::create(
            &mut fbb,
            &fb::TargetArgs {
                user: Some(user),
                group: None,
            },
        );
        let send = fb::Send::create(
            &mut fbb,
            &fb::SendArgs {
                to: Some(to),
                cmid: Some(cmid),
                body: Some(body),
                ext: Some(ext),
                ..Default::default()
            },
        );
        let bytes = finish(&mut fbb, fb::Msg::Send, send.as_union_value(), None);
        // Each reference re-counts the table, so the apparent-size limit trips (before
        // MAX_TABLES would).
        assert!(matches!(
            FlatBuffers::decode(&bytes),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
