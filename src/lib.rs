//! imgw: a thread-per-core instant-messaging edge gateway.
//!
//! Layers, from the wire inwards:
//! - [`protocol`]: the logical message model and the raw-TCP frame codec (sans-IO).
//! - [`codec`]: the five payload encodings (JSON, Protobuf, MessagePack, FlatBuffers, Hessian).
//! - [`ws`]: WebSocket (RFC 6455) handshake and framing (sans-IO).
//!
//! Operations: [`cli`] (the command line and its merge over [`config`]), [`preflight`] (host
//! checks), [`admin`] (the admin HTTP port), [`control`] and [`metrics`] (shared with shards).

#![deny(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod metrics;
pub mod preflight;
pub mod protocol;
pub mod ws;
