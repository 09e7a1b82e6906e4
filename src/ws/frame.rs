//! WebSocket frames (RFC 6455 section 5): an incremental [`Decoder`] and the frame encoders.
//!
//! The decoder is sans-IO and keeps almost nothing per connection: a fixed-size header
//! accumulator (for a header split across reads) plus one `Vec` that holds only the bytes that
//! cannot be handed out yet: the payload of a frame that arrived in pieces, or the fragments of a
//! message that is not complete. That `Vec` is empty and unallocated whenever the connection is
//! idle between frames. A frame that arrives whole in the caller's buffer is unmasked in place
//! and handed out without a copy.
//!
//! Every rule of RFC 6455 that a server must enforce on client frames is checked here, and a
//! violation is a [`ProtocolError`] whose [`ProtocolError::close_code`] is the code to close with.

use std::fmt;

/// Largest payload of a control frame (Close, Ping, Pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest frame header: 2 bytes, a 64-bit extended length and a 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// Largest close reason that fits a control frame after the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Which end of the connection the decoder or encoder sits on. Clients mask their frames,
/// servers never do (RFC 6455 section 5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Decodes masked client frames; the gateway.
    Server,
    /// Decodes unmasked server frames; tests and the loadgen.
    Client,
}

/// Size limits enforced by the [`Decoder`]. A frame or message above them is refused with
/// close code 1009 as soon as its header is seen, before any of its payload is buffered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one data frame, in bytes.
    pub max_frame: u32,
    /// Largest payload of one message (all its fragments together), in bytes.
    pub max_message: u32,
}

impl Limits {
    /// Limits with the given maxima.
    pub const fn new(max_frame: u32, max_message: u32) -> Limits {
        Limits {
            max_frame,
            max_message,
        }
    }
}

impl Default for Limits {
    /// 64 KiB frames and messages: far above any chat message, small enough that a hostile
    /// client cannot make a connection hold much memory.
    fn default() -> Limits {
        Limits::new(64 * 1024, 64 * 1024)
    }
}

/// Frame opcodes (RFC 6455 section 5.2). Other values are reserved and refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// A further fragment of a fragmented message.
    Continuation = 0x0,
    /// The first (or only) frame of a UTF-8 text message.
    Text = 0x1,
    /// The first (or only) frame of a binary message.
    Binary = 0x2,
    /// Close handshake.
    Close = 0x8,
    /// Ping; the peer answers with a Pong carrying the same payload.
    Ping = 0x9,
    /// Pong; an answer to a Ping, or an unsolicited heartbeat.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for a reserved one.
    pub const fn from_u8(n: u8) -> Option<OpCode> {
        match n {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// Close, Ping and Pong are control frames: at most 125 bytes, never fragmented.
    pub const fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A close status code (RFC 6455 section 7.4) that may appear in a Close frame on the wire.
///
/// Codes that must never be sent (1004, 1005, 1006, 1015), unassigned ones (1012 and up in the
/// 1xxx range, 0-999, 1100-2999) and anything above 4999 have no variant:
/// [`CloseCode::from_u16`] refuses them, and receiving one is a protocol error (1002).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure; the purpose of the connection is fulfilled.
    Normal,
    /// 1001: an endpoint is going away (server shutdown or drain, browser leaving the page).
    GoingAway,
    /// 1002: the peer broke the protocol (bad framing, bad close code, ...).
    Protocol,
    /// 1003: the peer sent a kind of data this endpoint cannot accept.
    Unsupported,
    /// 1007: a message's payload is inconsistent with its type (invalid UTF-8 in text).
    InvalidPayload,
    /// 1008: the message violates a policy; a generic code when no other fits.
    Policy,
    /// 1009: a frame or message is too big to process.
    TooBig,
    /// 1010: (sent by clients) the server did not negotiate a required extension.
    MandatoryExtension,
    /// 1011: the server hit an unexpected condition.
    Internal,
    /// 3000-3999: registered with IANA for libraries, frameworks and applications. Values
    /// outside that range are sent as 1008 by the encoder.
    Registered(u16),
    /// 4000-4999: private use by applications (imgw's own codes). Values outside that range are
    /// sent as 1008 by the encoder.
    Private(u16),
}

impl CloseCode {
    /// The code for a wire value, or `None` if the value is not valid in a Close frame.
    pub const fn from_u16(code: u16) -> Option<CloseCode> {
        Some(match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::Protocol,
            1003 => CloseCode::Unsupported,
            1007 => CloseCode::InvalidPayload,
            1008 => CloseCode::Policy,
            1009 => CloseCode::TooBig,
            1010 => CloseCode::MandatoryExtension,
            1011 => CloseCode::Internal,
            3000..=3999 => CloseCode::Registered(code),
            4000..=4999 => CloseCode::Private(code),
            _ => return None,
        })
    }

    /// The wire value. A [`CloseCode::Registered`] or [`CloseCode::Private`] built with a value
    /// outside its range gives 1008, so a bad value is never put on the wire.
    pub const fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::MandatoryExtension => 1010,
            CloseCode::Internal => 1011,
            CloseCode::Registered(n @ 3000..=3999) | CloseCode::Private(n @ 4000..=4999) => n,
            CloseCode::Registered(_) | CloseCode::Private(_) => 1008,
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// Why the decoder refused the peer's bytes. The connection must then be closed with
/// [`ProtocolError::close_code`] (the decoder discards everything it is fed afterwards).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A client frame without a masking key, or a server frame with one (1002).
    #[error("frame masking does not match the sender's role")]
    BadMask,
    /// One of the RSV1-3 bits is set; no extension is negotiated (1002).
    #[error("reserved bits set")]
    ReservedBits,
    /// A reserved opcode (3-7, 11-15) (1002).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame without FIN (1002).
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame whose payload is longer than 125 bytes (1002).
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    /// A continuation frame with no fragmented message in progress (1002).
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new Text or Binary frame while a fragmented message is in progress (1002).
    #[error("new data frame inside a fragmented message")]
    ExpectedContinuation,
    /// A 64-bit payload length with its most significant bit set (1002).
    #[error("invalid 64-bit payload length")]
    InvalidLength,
    /// A data frame above [`Limits::max_frame`] (1009).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Declared payload length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A message whose fragments add up to more than [`Limits::max_message`] (1009).
    #[error("message of at least {len} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// Bytes of the message so far, including the refused frame.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A text message that is not valid UTF-8, detected as early as the bytes allow (1007).
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A Close frame with a 1-byte payload (1002).
    #[error("close frame with a 1-byte payload")]
    ClosePayloadTooShort,
    /// A Close frame with a status code not allowed on the wire (1002).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A Close frame whose reason is not valid UTF-8 (1007).
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The code to close the connection with.
    pub const fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::FrameTooLarge { .. } | ProtocolError::MessageTooLarge { .. } => {
                CloseCode::TooBig
            }
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                CloseCode::InvalidPayload
            }
            _ => CloseCode::Protocol,
        }
    }
}

/// One thing the peer said. Data messages are whole (fragments already joined); text is
/// validated UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message.
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A Ping; answer with a Pong carrying the same payload ([`super::respond`] does).
    Ping(&'a [u8]),
    /// A Pong.
    Pong(&'a [u8]),
    /// The peer started or answered the close handshake. `code` is `None` for an empty Close
    /// payload. The decoder discards everything after it.
    Close {
        /// The status code, if the frame carried one.
        code: Option<CloseCode>,
        /// The reason text (possibly empty).
        reason: &'a str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a frame header (possibly partial, in `hdr`).
    Header,
    /// Reading the payload of the current frame: `remaining` bytes to go.
    Payload,
    /// After a Close or an error: everything is discarded.
    Closed,
}

/// What to do with `buf` at the start of the next call, once the event borrowing it is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nothing,
    /// A control frame's payload was handed out from `buf[msg_len..]`: drop it.
    DropControl,
    /// A whole message was handed out from `buf`: drop it.
    DropMessage,
}

/// The kind of data message in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Msg {
    None,
    Text,
    Binary,
}

/// Incremental WebSocket frame decoder; one per connection.
///
/// Feed it whatever bytes arrived with [`Decoder::next_event`], calling again until it returns
/// `Ok(None)` (all input consumed). Frames that arrive whole are unmasked in place in the input
/// and handed out without a copy; the decoder keeps only the bytes of a partial frame or
/// fragmented message, and owns no allocation between messages.
///
/// ```
/// use imgw::ws::frame::{Decoder, Event, Limits, OpCode, Role, write_client_frame};
/// let mut wire = Vec::new();
/// write_client_frame(&mut wire, OpCode::Text, true, [1, 2, 3, 4], b"hi");
/// let mut dec = Decoder::new(Role::Server, Limits::default());
/// let mut input = &mut wire[..];
/// assert_eq!(dec.next_event(&mut input), Ok(Some(Event::Text("hi"))));
/// assert_eq!(dec.next_event(&mut input), Ok(None));
/// ```
#[derive(Debug)]
pub struct Decoder {
    /// The assembled fragments of the message in progress (`msg_len` bytes, unmasked), then the
    /// part of the current frame's payload that has arrived (for a control frame, after the
    /// message). Empty and unallocated when no frame or message is partial.
    buf: Vec<u8>,
    limits: Limits,
    /// Payload bytes of the current frame still to come.
    remaining: u32,
    /// Bytes of the data message in `buf` (for a data frame in progress, including what has
    /// arrived of it).
    msg_len: u32,
    /// Length of the prefix of the text message in `buf` known to be valid UTF-8 (always on a
    /// character boundary).
    utf8_ok: u32,
    /// A partial frame header.
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    mask: [u8; 4],
    /// Offset into the masking key of the next payload byte.
    mask_pos: u8,
    op: OpCode,
    fin: bool,
    /// No payload byte of the current frame has been buffered (so it may go zero-copy).
    fresh: bool,
    msg: Msg,
    state: State,
    pending: Pending,
    role: Role,
}

/// Moves the first `n` bytes of `input` out as their own slice.
fn split_off<'i>(input: &mut &'i mut [u8], n: usize) -> &'i mut [u8] {
    let whole = std::mem::take(input);
    let (head, tail) = whole.split_at_mut(n.min(whole.len()));
    *input = tail;
    head
}

/// XORs `data` with the masking key, `pos` being the key offset of `data[0]`.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], pos: usize) {
    let m = [
        mask[pos & 3],
        mask[(pos + 1) & 3],
        mask[(pos + 2) & 3],
        mask[(pos + 3) & 3],
    ];
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // 8 is a multiple of 4: the remainder starts at key offset 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Parses a Close frame payload.
fn parse_close(payload: &[u8]) -> Result<(Option<CloseCode>, &str), ProtocolError> {
    match payload {
        [] => Ok((None, "")),
        [_] => Err(ProtocolError::ClosePayloadTooShort),
        [hi, lo, reason @ ..] => {
            let raw = u16::from_be_bytes([*hi, *lo]);
            let code = CloseCode::from_u16(raw).ok_or(ProtocolError::InvalidCloseCode(raw))?;
            let reason =
                std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok((Some(code), reason))
        }
    }
}

impl Decoder {
    /// A decoder for frames sent by the other end of `role`.
    pub const fn new(role: Role, limits: Limits) -> Decoder {
        Decoder {
            buf: Vec::new(),
            limits,
            remaining: 0,
            msg_len: 0,
            utf8_ok: 0,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            mask: [0; 4],
            mask_pos: 0,
            op: OpCode::Continuation,
            fin: false,
            fresh: false,
            msg: Msg::None,
            state: State::Header,
            pending: Pending::Nothing,
            role,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes held for a partial frame or message (0 when idle).
    pub fn buffered(&self) -> usize {
        self.buf.len() + usize::from(self.hdr_len)
    }

    /// Heap bytes owned by the decoder (0 when idle between messages, once
    /// [`Decoder::next_event`] has returned `Ok(None)`).
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// True after a Close frame or a protocol error: the decoder discards all further input.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Decodes the next event from `input`, advancing `input` past the bytes it consumed.
    ///
    /// Returns `Ok(Some(event))` for each complete message or control frame, `Ok(None)` once
    /// `input` is exhausted (the bytes of a partial frame are kept), and `Err` on a protocol
    /// violation, after which the connection must be closed with the error's close code.
    /// Masked payloads are unmasked in place in `input`.
    pub fn next_event<'d, 'i: 'd>(
        &'d mut self,
        input: &mut &'i mut [u8],
    ) -> Result<Option<Event<'d>>, ProtocolError> {
        self.settle();
        match self.advance(input) {
            Ok(Step::Direct(op, payload)) => self.emit_direct(op, payload),
            Ok(Step::Buffered) => self.emit_buffered(),
            Ok(Step::NeedMore) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Releases what the previous event borrowed.
    fn settle(&mut self) {
        match self.pending {
            Pending::Nothing => {}
            Pending::DropControl => self.buf.truncate(self.msg_len as usize),
            Pending::DropMessage => self.buf.clear(),
        }
        self.pending = Pending::Nothing;
        if self.buf.is_empty() && self.buf.capacity() != 0 {
            // Idle connections own no allocation.
            self.buf = Vec::new();
        }
    }

    fn fail(&mut self, e: ProtocolError) -> ProtocolError {
        self.state = State::Closed;
        self.buf = Vec::new();
        self.hdr_len = 0;
        self.msg_len = 0;
        self.utf8_ok = 0;
        e
    }

    /// Consumes input until a frame completes or the input runs out.
    fn advance<'i>(&mut self, input: &mut &'i mut [u8]) -> Result<Step<'i>, ProtocolError> {
        loop {
            match self.state {
                State::Closed => {
                    let _ = split_off(input, input.len());
                    return Ok(Step::NeedMore);
                }
                State::Header => {
                    if !self.read_header(input)? {
                        return Ok(Step::NeedMore);
                    }
                }
                State::Payload => {
                    let rem = self.remaining as usize;
                    let whole = self.fresh && input.len() >= rem;
                    if whole
                        && (self.op.is_control() || (self.op != OpCode::Continuation && self.fin))
                    {
                        // The whole frame is here and needs no joining: hand it out in place.
                        let payload = split_off(input, rem);
                        if self.role == Role::Server {
                            apply_mask(payload, self.mask, 0);
                        }
                        self.state = State::Header;
                        return Ok(Step::Direct(self.op, payload));
                    }
                    if input.is_empty() && rem != 0 {
                        return Ok(Step::NeedMore);
                    }
                    let chunk = split_off(input, rem);
                    if self.role == Role::Server {
                        apply_mask(chunk, self.mask, usize::from(self.mask_pos));
                    }
                    self.mask_pos = ((usize::from(self.mask_pos) + chunk.len()) & 3) as u8;
                    self.buf.extend_from_slice(chunk);
                    // `chunk.len() <= remaining`, a u32.
                    self.remaining -= chunk.len() as u32;
                    if !chunk.is_empty() {
                        self.fresh = false;
                    }
                    if !self.op.is_control() {
                        self.msg_len = self.buf.len() as u32;
                        if self.msg == Msg::Text {
                            self.check_utf8()?;
                        }
                    }
                    if self.remaining != 0 {
                        return Ok(Step::NeedMore);
                    }
                    self.state = State::Header;
                    if self.op.is_control() || self.fin {
                        return Ok(Step::Buffered);
                    }
                    // A non-final fragment is complete: read the next frame.
                }
            }
        }
    }

    /// Validates the not yet validated tail of the text message in `buf`, failing as soon as
    /// a byte makes the sequence invalid.
    fn check_utf8(&mut self) -> Result<(), ProtocolError> {
        let start = self.utf8_ok as usize;
        let tail = &self.buf[start..self.msg_len as usize];
        match std::str::from_utf8(tail) {
            Ok(_) => self.utf8_ok = self.msg_len,
            Err(e) if e.error_len().is_none() => self.utf8_ok = (start + e.valid_up_to()) as u32,
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }

    /// Reads (the rest of) a frame header. `Ok(false)`: the input ran out first.
    fn read_header(&mut self, input: &mut &mut [u8]) -> Result<bool, ProtocolError> {
        if self.hdr_len == 0 && input.len() >= 2 {
            let need = self.header_len(input[0], input[1])?;
            if input.len() >= need {
                let mut hdr = [0u8; MAX_HEADER_LEN];
                hdr[..need].copy_from_slice(split_off(input, need));
                self.start_frame(&hdr[..need])?;
                return Ok(true);
            }
        }
        loop {
            let have = usize::from(self.hdr_len);
            let need = if have < 2 {
                2
            } else {
                self.header_len(self.hdr[0], self.hdr[1])?
            };
            if have >= 2 && have == need {
                let hdr = self.hdr;
                self.hdr_len = 0;
                self.start_frame(&hdr[..need])?;
                return Ok(true);
            }
            if input.is_empty() {
                return Ok(false);
            }
            let take = (need - have).min(input.len());
            self.hdr[have..have + take].copy_from_slice(split_off(input, take));
            self.hdr_len += take as u8;
        }
    }

    /// Checks the first two header bytes and returns the full header length.
    fn header_len(&self, b0: u8, b1: u8) -> Result<usize, ProtocolError> {
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let op = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::ReservedOpcode(b0 & 0x0F))?;
        let fin = b0 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if op.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if usize::from(len7) > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlTooLong);
            }
        } else if op == OpCode::Continuation {
            if self.msg == Msg::None {
                return Err(ProtocolError::UnexpectedContinuation);
            }
        } else if self.msg != Msg::None {
            return Err(ProtocolError::ExpectedContinuation);
        }
        let masked = b1 & 0x80 != 0;
        if masked != (self.role == Role::Server) {
            return Err(ProtocolError::BadMask);
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Ok(2 + ext + if masked { 4 } else { 0 })
    }

    /// Sets up the frame whose complete, already `header_len`-checked header is `hdr`.
    fn start_frame(&mut self, hdr: &[u8]) -> Result<(), ProtocolError> {
        let (b0, b1) = (hdr[0], hdr[1]);
        let (len, rest): (u64, &[u8]) = match (b1 & 0x7F, &hdr[2..]) {
            (126, [a, b, rest @ ..]) => (u64::from(u16::from_be_bytes([*a, *b])), rest),
            (127, [a, b, c, d, e, f, g, h, rest @ ..]) => {
                let n = u64::from_be_bytes([*a, *b, *c, *d, *e, *f, *g, *h]);
                if n >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (n, rest)
            }
            (n, rest) => (u64::from(n), rest),
        };
        // `header_len` accepted the opcode.
        let op = OpCode::from_u8(b0 & 0x0F).unwrap_or(OpCode::Continuation);
        if !op.is_control() {
            if len > u64::from(self.limits.max_frame) {
                return Err(ProtocolError::FrameTooLarge {
                    len,
                    max: self.limits.max_frame,
                });
            }
            let total = u64::from(self.msg_len) + len;
            if total > u64::from(self.limits.max_message) {
                return Err(ProtocolError::MessageTooLarge {
                    len: total,
                    max: self.limits.max_message,
                });
            }
            match op {
                OpCode::Text => self.msg = Msg::Text,
                OpCode::Binary => self.msg = Msg::Binary,
                _ => {}
            }
        }
        self.mask = match rest {
            [a, b, c, d] => [*a, *b, *c, *d],
            _ => [0; 4],
        };
        self.mask_pos = 0;
        self.op = op;
        self.fin = b0 & 0x80 != 0;
        self.fresh = true;
        // Control lengths are <= 125; data lengths were just checked against a u32 limit.
        self.remaining = len as u32;
        self.state = State::Payload;
        Ok(())
    }

    /// Emits a frame that was handed out whole from the input.
    fn emit_direct<'d>(
        &mut self,
        op: OpCode,
        payload: &'d [u8],
    ) -> Result<Option<Event<'d>>, ProtocolError> {
        let ev = match op {
            OpCode::Text => {
                self.msg = Msg::None;
                // ASCII (the usual JSON frame) is checked a word at a time first.
                match crate::codec::text::ascii_str(payload)
                    .map_or_else(|| std::str::from_utf8(payload), Ok)
                {
                    Ok(s) => Event::Text(s),
                    Err(_) => return Err(self.fail(ProtocolError::InvalidUtf8)),
                }
            }
            OpCode::Binary => {
                self.msg = Msg::None;
                Event::Binary(payload)
            }
            OpCode::Ping => Event::Ping(payload),
            OpCode::Pong => Event::Pong(payload),
            OpCode::Close => match parse_close(payload) {
                Ok((code, reason)) => {
                    self.close_now();
                    Event::Close { code, reason }
                }
                Err(e) => return Err(self.fail(e)),
            },
            // Continuation frames are always joined in `buf`.
            OpCode::Continuation => return Ok(None),
        };
        Ok(Some(ev))
    }

    /// After a Close: nothing more is read, and `buf` goes at the next call.
    fn close_now(&mut self) {
        self.state = State::Closed;
        self.pending = Pending::DropMessage;
        self.msg_len = 0;
        self.utf8_ok = 0;
    }

    /// Emits the control frame or message completed in `buf`.
    fn emit_buffered(&mut self) -> Result<Option<Event<'_>>, ProtocolError> {
        let start = self.msg_len as usize;
        if self.op.is_control() {
            if self.op == OpCode::Close {
                if let Err(e) = parse_close(&self.buf[start..]) {
                    return Err(self.fail(e));
                }
                self.close_now();
            } else {
                self.pending = Pending::DropControl;
            }
            let payload = &self.buf[start..];
            return Ok(Some(match self.op {
                OpCode::Ping => Event::Ping(payload),
                OpCode::Pong => Event::Pong(payload),
                // Checked just above.
                _ => match parse_close(payload) {
                    Ok((code, reason)) => Event::Close { code, reason },
                    Err(_) => Event::Close {
                        code: Some(CloseCode::Protocol),
                        reason: "",
                    },
                },
            }));
        }
        // A message is complete.
        let kind = self.msg;
        let text_ok = kind != Msg::Text || self.utf8_ok == self.msg_len;
        self.msg = Msg::None;
        self.msg_len = 0;
        self.utf8_ok = 0;
        self.pending = Pending::DropMessage;
        if !text_ok {
            return Err(self.fail(ProtocolError::InvalidUtf8));
        }
        Ok(Some(match kind {
            Msg::Text => match std::str::from_utf8(&self.buf) {
                Ok(s) => Event::Text(s),
                // Unreachable: validated incrementally already. Kept as an error, never a
                // panic; the caller closes the connection on any error.
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            },
            _ => Event::Binary(&self.buf),
        }))
    }
}

/// What `advance` found.
enum Step<'i> {
    /// The input ran out inside a frame.
    NeedMore,
    /// A whole frame that needs no joining, unmasked in place in the input.
    Direct(OpCode, &'i mut [u8]),
    /// A control frame or a message completed in `buf`.
    Buffered,
}

// ---------------------------------------------------------------------------------------------
// Encoders.

/// Appends a frame header for a payload of `len` bytes.
fn write_header(out: &mut Vec<u8>, op: OpCode, fin: bool, len: usize, mask: Option<[u8; 4]>) {
    let b0 = (op as u8) | if fin { 0x80 } else { 0 };
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    if len <= 125 {
        out.extend_from_slice(&[b0, mbit | len as u8]);
    } else if len <= 0xFFFF {
        let l = (len as u16).to_be_bytes();
        out.extend_from_slice(&[b0, mbit | 126, l[0], l[1]]);
    } else {
        out.extend_from_slice(&[b0, mbit | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
}

/// The header length of an unmasked frame with a `len`-byte payload.
pub const fn header_len_for(len: usize) -> usize {
    if len <= 125 {
        2
    } else if len <= 0xFFFF {
        4
    } else {
        10
    }
}

/// Appends an unmasked (server) frame. Control frames must carry at most 125 bytes: a longer
/// control payload is truncated to 125 so that a bad frame is never produced.
pub fn write_frame(out: &mut Vec<u8>, op: OpCode, fin: bool, payload: &[u8]) {
    let payload = if op.is_control() && payload.len() > MAX_CONTROL_PAYLOAD {
        &payload[..MAX_CONTROL_PAYLOAD]
    } else {
        payload
    };
    write_header(out, op, fin || op.is_control(), payload.len(), None);
    out.extend_from_slice(payload);
}

/// Appends a text message as one unmasked frame.
pub fn write_text(out: &mut Vec<u8>, text: &str) {
    write_frame(out, OpCode::Text, true, text.as_bytes());
}

/// Appends a binary message as one unmasked frame.
pub fn write_binary(out: &mut Vec<u8>, data: &[u8]) {
    write_frame(out, OpCode::Binary, true, data);
}

/// Appends a Ping (payload truncated to 125 bytes).
pub fn write_ping(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame(out, OpCode::Ping, true, payload);
}

/// Appends a Pong (payload truncated to 125 bytes).
pub fn write_pong(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame(out, OpCode::Pong, true, payload);
}

/// The Close payload for `code` and `reason` (reason cut to 123 bytes on a char boundary).
fn close_payload(
    code: Option<CloseCode>,
    reason: &str,
    buf: &mut [u8; MAX_CONTROL_PAYLOAD],
) -> usize {
    let Some(code) = code else { return 0 };
    buf[..2].copy_from_slice(&code.as_u16().to_be_bytes());
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    buf[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    2 + end
}

/// Appends an unmasked Close frame. `None` sends an empty payload (the reason is then
/// ignored); the reason is cut to 123 bytes on a character boundary.
pub fn write_close(out: &mut Vec<u8>, code: Option<CloseCode>, reason: &str) {
    let mut buf = [0u8; MAX_CONTROL_PAYLOAD];
    let n = close_payload(code, reason, &mut buf);
    write_frame(out, OpCode::Close, true, &buf[..n]);
}

/// Appends one unmasked, final frame (normally Text or Binary) whose payload `body` writes
/// straight into `out` (a codec's encoder, say), so that the payload is never copied through a
/// temporary buffer. The header is fixed up afterwards (a short move of the payload when it is
/// below 126 or above 65535 bytes). A control frame's payload is cut to 125 bytes. On error
/// `out` is restored to its previous length.
pub fn write_message_with<E>(
    out: &mut Vec<u8>,
    op: OpCode,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let payload = start + 4;
    if let Err(e) = body(out) {
        out.truncate(start);
        return Err(e);
    }
    let mut len = out.len() - payload;
    if op.is_control() && len > MAX_CONTROL_PAYLOAD {
        out.truncate(payload + MAX_CONTROL_PAYLOAD);
        len = MAX_CONTROL_PAYLOAD;
    }
    let b0 = 0x80 | op as u8;
    if len <= 125 {
        out.copy_within(payload.., start + 2);
        out.truncate(out.len() - 2);
        out[start] = b0;
        out[start + 1] = len as u8;
    } else if len <= 0xFFFF {
        let l = (len as u16).to_be_bytes();
        out[start..payload].copy_from_slice(&[b0, 126, l[0], l[1]]);
    } else {
        out.resize(out.len() + 6, 0);
        out.copy_within(payload..payload + len, payload + 6);
        out[start] = b0;
        out[start + 1] = 127;
        out[start + 2..start + 10].copy_from_slice(&(len as u64).to_be_bytes());
    }
    Ok(())
}

/// Appends a masked (client) frame with the given masking key. For tests and the loadgen; a
/// real client must draw a fresh unpredictable key per frame.
pub fn write_client_frame(out: &mut Vec<u8>, op: OpCode, fin: bool, mask: [u8; 4], payload: &[u8]) {
    write_header(out, op, fin, payload.len(), Some(mask));
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

/// Appends a masked (client) Close frame, like [`write_close`].
pub fn write_client_close(out: &mut Vec<u8>, mask: [u8; 4], code: Option<CloseCode>, reason: &str) {
    let mut buf = [0u8; MAX_CONTROL_PAYLOAD];
    let n = close_payload(code, reason, &mut buf);
    write_client_frame(out, OpCode::Close, true, mask, &buf[..n]);
}
