//! WebSocket (RFC 6455), server side, sans-IO.
//!
//! This module owns the WebSocket protocol between raw bytes and whole messages:
//! - [`handshake`]: the HTTP/1.1 upgrade (path, Origin allow-list, version, key, subprotocol ->
//!   [`crate::codec::CodecId`] negotiation, bounded header size and count) and the response
//!   bytes, plus a client side for tests and the loadgen;
//! - [`frame`]: the incremental frame [`Decoder`] (masking, fragmentation, control frames, size
//!   limits, fail-fast UTF-8 validation, close codes) and the frame encoders;
//! - [`respond`]: what the protocol itself answers (Pong to Ping, Close to Close or to an error).
//!
//! It owns no socket, timer or buffer pool. The caller reads into its own (per-shard) scratch
//! buffer and feeds slices in; the handshake timeout and idle deadlines are the caller's. Per
//! connection the decoder keeps only a fixed header accumulator and the bytes of a partial frame
//! or fragmented message: an idle connection's decoder owns no heap memory.
//!
//! A server connection, in outline:
//!
//! ```
//! use imgw::ws::{self, frame, Decoder, Event, Handshake, HandshakeConfig, Limits, Next, Role};
//!
//! // Client bytes, as they might arrive: the upgrade request, then a masked text frame.
//! let client = ws::ClientHandshake::new([7; 16]);
//! let mut input = Vec::new();
//! client.write_request(&mut input, "localhost", "/ws", &["imgw.v1.json"], None);
//! frame::write_client_frame(&mut input, frame::OpCode::Text, true, [1, 2, 3, 4], b"{}");
//!
//! let mut out = Vec::new();
//! let cfg = HandshakeConfig::default();
//! let Handshake::Accepted(up) = ws::accept(&cfg, &input, &mut out) else { panic!() };
//! assert_eq!(up.codec, imgw::codec::CodecId::Json);
//!
//! let mut dec = Decoder::new(Role::Server, Limits::default());
//! let mut rest = &mut input[up.consumed..];
//! loop {
//!     match dec.next_event(&mut rest) {
//!         Ok(Some(Event::Text(t))) => frame::write_text(&mut out, t), // the application's part
//!         Ok(Some(Event::Binary(b))) => frame::write_binary(&mut out, b),
//!         Ok(Some(ev)) => {
//!             if ws::respond(&ev, false, &mut out) == Next::Close { break; }
//!         }
//!         Ok(None) => break, // wait for more bytes
//!         Err(e) => { ws::respond_error(e, &mut out); break; }
//!     }
//! }
//! ```

pub mod frame;
pub mod handshake;

pub use frame::{
    write_binary, write_close, write_message_with, write_ping, write_pong, write_text, CloseCode,
    Decoder, Event, Limits, OpCode, ProtocolError, Role,
};
pub use handshake::{
    accept, accept_key, hello_target, parse_request, ClientAccepted, ClientError, ClientHandshake,
    Handshake, HandshakeConfig, RejectReason, Upgrade, HELLO_PARAM,
};

/// What to do with the connection after [`respond`] or [`respond_error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep reading; Text and Binary messages are the application's to handle.
    Continue,
    /// The close handshake is done on our side (a Close frame was appended to `out` unless we
    /// had sent one before): flush `out`, then close the TCP connection. The server closes the
    /// TCP connection first (RFC 6455 section 7.1.1).
    Close,
}

/// The protocol's own answer to an event, appended to `out`: a Pong for a Ping, a Close
/// echoing the peer's code for a Close (1000 if the peer gave none). `close_sent` says we
/// already sent a Close (a server-initiated close awaiting the peer's answer): then nothing
/// more is written. Text, Binary and Pong need no answer.
pub fn respond(event: &Event<'_>, close_sent: bool, out: &mut Vec<u8>) -> Next {
    match event {
        Event::Ping(payload) => {
            if !close_sent {
                write_pong(out, payload);
            }
            Next::Continue
        }
        Event::Close { code, .. } => {
            if !close_sent {
                write_close(out, Some(code.unwrap_or(CloseCode::Normal)), "");
            }
            Next::Close
        }
        Event::Text(_) | Event::Binary(_) | Event::Pong(_) => Next::Continue,
    }
}

/// Appends the Close frame that fails the connection after a protocol error (its close code
/// and a short reason); always [`Next::Close`].
pub fn respond_error(err: ProtocolError, out: &mut Vec<u8>) -> Next {
    let reason = match err.close_code() {
        CloseCode::TooBig => "too big",
        CloseCode::InvalidPayload => "invalid utf-8",
        _ => "protocol error",
    };
    write_close(out, Some(err.close_code()), reason);
    Next::Close
}

#[cfg(test)]
mod tests_frame;
#[cfg(test)]
mod tests_handshake;
