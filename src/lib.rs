//! imgw: a thread-per-core instant-messaging edge gateway.
//!
//! Layers, from the wire inwards:
//! - [`protocol`]: the logical message model and the raw-TCP frame codec (sans-IO).
//! - [`codec`]: the five payload encodings (JSON, Protobuf, MessagePack, FlatBuffers, Hessian).
//! - [`ws`]: WebSocket (RFC 6455) handshake and framing (sans-IO).
//! - [`auth`]: verification of `hello.token` (JWT HS256/RS256, insecure dev mode).
//! - [`ids`]: the keys every layer shares (users, owner shards) and message id minting.
//! - [`ratelimit`]: the token bucket behind the per-connection and per-tenant rates.
//! - [`shard`]: one shard's connections, sessions, routing and presence (sans-IO).
//! - [`runtime`]: the glommio executors, sockets and channels that drive the shards.
//! - [`store`]: the durable store (inboxes, cursors, groups, dedupe) behind a backend trait.
//! - [`client`]: a blocking client over both transports, for the integration tests and the loadgen.
//!
//! Operations: [`cli`] (the command line and its merge over [`config`]), [`preflight`] (host
//! checks), [`admin`] (the admin HTTP port), [`control`] (flags and handles, above the shards
//! and the I/O core) and [`metrics`] (counters the shards and the I/O core write, below both).

#![deny(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod control;
pub mod ids;
pub mod iocore;
pub mod metrics;
pub mod preflight;
pub mod protocol;
pub mod ratelimit;
pub mod runtime;
pub mod services;
pub mod shard;
pub mod store;
pub mod tls;
pub mod twogen;
pub mod web;
pub mod ws;
