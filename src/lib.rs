//! imgw: a thread-per-core instant-messaging edge gateway.
//!
//! Layers, from the wire inwards:
//! - [`protocol`]: the logical message model and the raw-TCP frame codec (sans-IO).
//! - [`codec`]: the five payload encodings (JSON, Protobuf, MessagePack, FlatBuffers, Hessian).
//! - [`ws`]: WebSocket (RFC 6455) handshake and framing (sans-IO).
//! - [`auth`]: verification of `hello.token` (JWT HS256/RS256, insecure dev mode).
//! - [`shard`]: one shard's connections, sessions, routing and presence (sans-IO).
//! - [`runtime`]: the glommio executors, sockets and channels that drive the shards.
//! - [`client`]: a blocking client over both transports, for the integration tests and the loadgen.

#![deny(unsafe_code)]

pub mod auth;
pub mod client;
pub mod codec;
pub mod config;
pub mod control;
pub mod metrics;
pub mod runtime;
pub mod shard;
pub mod protocol;
pub mod ws;
