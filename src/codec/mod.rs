//! Codecs: the five encodings of the logical message model ([`crate::protocol::Envelope`]).
//!
//! This module owns the mapping between messages and payload bytes. Every codec implements
//! [`Codec`]; [`CodecId`] dispatches at run time for a connection's negotiated codec. Decoders
//! are total: any input gives an [`Envelope`] or a [`DecodeError`], never a panic, and never
//! allocate more than a small multiple of the input's length (tests/bad_input.rs proves it).

/// Decodes into the very value that is returned: `$read` fills the placeholder envelope
/// `$env` in place, and when it fails with `$e`, `$fallback` is the result. Every path
/// returns the one local `out`, so the compiler builds it in the caller's slot. (Building an
/// `Envelope` and returning `Ok` of it copied all 256 bytes, reading back strings just
/// stored, which stalls the CPU: `perf` on the Protobuf decoder.) A macro rather than a
/// function taking closures: a closure this large is not inlined, and the envelope then
/// escapes into it, which brings the copy back.
macro_rules! read_in_place {
    (|$env:ident| $read:expr, |$e:pat_param| $fallback:expr) => {{
        let mut out = Ok(crate::protocol::Envelope {
            reference: None,
            msg: crate::protocol::Message::Ok,
        });
        if let Ok($env) = &mut out {
            if let Err($e) = $read {
                out = $fallback;
            }
        }
        out
    }};
}

mod direct;
mod fields;
pub mod flatbuf;
pub mod hessian;
pub mod json;
mod json_read;
pub mod msgpack;
mod out;
pub mod protobuf;
pub(crate) mod text;

use bytes::Bytes;

use crate::protocol::Envelope;

/// Maximum nesting depth any decoder accepts (our messages nest at most 3 deep; unknown
/// fields may nest a little more).
pub const MAX_DEPTH: usize = 16;

/// Why payload bytes could not be turned into a message.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("truncated input")]
    Truncated,
    /// The bytes are not valid for this codec (bad tag, bad type, trailing bytes, ...).
    #[error("malformed {codec} payload: {detail}")]
    Malformed { codec: &'static str, detail: String },
    /// A string was not valid UTF-8.
    #[error("invalid UTF-8 in a string")]
    InvalidUtf8,
    /// Values nest deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// A declared length or count is larger than the remaining input could hold.
    #[error("declared length {declared} exceeds the {remaining} bytes left")]
    LengthLies { declared: u64, remaining: u64 },
    /// The `op` is not one this version knows. The connection stays open (`unsupported`).
    #[error("unknown op {op:?}")]
    UnknownOp { op: String, reference: Option<u64> },
    /// A field required by the op is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has a value outside its domain (unknown status, two targets, ...).
    #[error("invalid value for `{field}`")]
    InvalidValue { field: &'static str },
}

impl DecodeError {
    pub(crate) fn malformed(codec: &'static str, detail: impl std::fmt::Display) -> Self {
        DecodeError::Malformed {
            codec,
            detail: detail.to_string(),
        }
    }
}

/// Why a message could not be encoded. Encoding our own model only fails on values outside
/// what a format can carry.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string, list or map is longer than the format can express.
    #[error("value too large for the format")]
    TooLarge,
    /// The underlying serializer reported an error.
    #[error("{codec} encoder: {detail}")]
    Format { codec: &'static str, detail: String },
}

/// One encoding of the message model.
pub trait Codec {
    /// The id carried in the raw-TCP header and used for negotiation.
    const ID: CodecId;
    /// Appends the encoding of `env` to `out`.
    fn encode(env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError>;
    /// Decodes exactly one message from `bytes` (the whole payload). Strings of the result
    /// are slices of `bytes` where the encoding allows (no copy).
    fn decode_bytes(bytes: &Bytes) -> Result<Envelope, DecodeError>;

    /// Decodes from a borrowed slice, which is copied once into a [`Bytes`] first. Hot paths
    /// hold payloads as `Bytes` already and call [`Codec::decode_bytes`].
    fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Self::decode_bytes(&Bytes::copy_from_slice(bytes))
    }
}

/// Codec ids. Stable forever: the number goes in the raw-TCP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CodecId {
    Json = 1,
    Protobuf = 2,
    MessagePack = 3,
    FlatBuffers = 4,
    Hessian = 5,
}

impl CodecId {
    pub const ALL: [CodecId; 5] = [
        CodecId::Json,
        CodecId::Protobuf,
        CodecId::MessagePack,
        CodecId::FlatBuffers,
        CodecId::Hessian,
    ];

    /// Short name (`json`, `protobuf`, `msgpack`, `flatbuffers`, `hessian`).
    pub const fn name(self) -> &'static str {
        match self {
            CodecId::Json => "json",
            CodecId::Protobuf => "protobuf",
            CodecId::MessagePack => "msgpack",
            CodecId::FlatBuffers => "flatbuffers",
            CodecId::Hessian => "hessian",
        }
    }

    /// The WebSocket subprotocol that selects this codec.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            CodecId::Json => "imgw.v1.json",
            CodecId::Protobuf => "imgw.v1.protobuf",
            CodecId::MessagePack => "imgw.v1.msgpack",
            CodecId::FlatBuffers => "imgw.v1.flatbuffers",
            CodecId::Hessian => "imgw.v1.hessian",
        }
    }

    pub fn from_u8(n: u8) -> Option<CodecId> {
        CodecId::ALL.iter().copied().find(|c| *c as u8 == n)
    }

    pub fn from_name(name: &str) -> Option<CodecId> {
        CodecId::ALL.iter().copied().find(|c| c.name() == name)
    }

    pub fn from_subprotocol(name: &str) -> Option<CodecId> {
        CodecId::ALL
            .iter()
            .copied()
            .find(|c| c.subprotocol() == name)
    }

    /// JSON travels in WebSocket text frames; the others in binary frames.
    pub const fn is_text(self) -> bool {
        matches!(self, CodecId::Json)
    }

    pub fn encode(self, env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            CodecId::Json => json::Json::encode(env, out),
            CodecId::Protobuf => protobuf::Protobuf::encode(env, out),
            CodecId::MessagePack => msgpack::MessagePack::encode(env, out),
            CodecId::FlatBuffers => flatbuf::FlatBuffers::encode(env, out),
            CodecId::Hessian => hessian::Hessian::encode(env, out),
        }
    }

    /// Decodes from a borrowed slice (copied once into a [`Bytes`]; see [`Codec::decode`]).
    pub fn decode(self, bytes: &[u8]) -> Result<Envelope, DecodeError> {
        self.decode_bytes(&Bytes::copy_from_slice(bytes))
    }

    /// Decodes a payload held as [`Bytes`]: strings of the result share its memory.
    pub fn decode_bytes(self, bytes: &Bytes) -> Result<Envelope, DecodeError> {
        match self {
            CodecId::Json => json::Json::decode_bytes(bytes),
            CodecId::Protobuf => protobuf::Protobuf::decode_bytes(bytes),
            CodecId::MessagePack => msgpack::MessagePack::decode_bytes(bytes),
            CodecId::FlatBuffers => flatbuf::FlatBuffers::decode_bytes(bytes),
            CodecId::Hessian => hessian::Hessian::decode_bytes(bytes),
        }
    }
}

/// The keys an op's map may carry in the named-map formats (JSON, MessagePack, Hessian),
/// besides `op` and `ref` (docs/PROTOCOL.md). For tests and tools that build frames by hand.
pub fn map_keys(op: crate::protocol::Op) -> &'static [&'static str] {
    use crate::protocol::Op;
    match op {
        Op::Hello => &["version", "token", "device", "codecs", "resume"],
        Op::Welcome => &[
            "version",
            "session",
            "user",
            "heartbeat_ms",
            "server_time_ms",
            "limits",
        ],
        Op::Ping | Op::Pong => &["ts"],
        Op::Send => &["to", "cmid", "type", "body", "ext"],
        Op::SendAck => &["cmid", "mid", "seq", "ts"],
        Op::Deliver => &[
            "mid",
            "from",
            "to",
            "inbox_seq",
            "ts",
            "type",
            "body",
            "ext",
        ],
        Op::Ack => &["inbox_seq", "group"],
        Op::Sync => &["after_inbox_seq", "limit", "group"],
        Op::Synced => &["up_to", "more", "group", "groups"],
        Op::PresenceSet => &["status"],
        Op::PresenceSub => &["users"],
        Op::Presence => &["user", "status", "ts"],
        Op::GroupJoin | Op::GroupLeave => &["group"],
        Op::Ok => &[],
        Op::Error => &["code", "message", "cmid", "retry_after_ms"],
        Op::Goaway => &["reason", "reconnect_ms"],
    }
}
