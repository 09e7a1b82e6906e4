//! The wire protocol as a sans-IO library: the logical messages ([`message`]) and the raw-TCP
//! frame layer ([`frame`]). Shared by the gateway, the loadgen and the tests; no sockets here.

pub mod frame;
pub mod message;
pub mod samples;
pub mod str;

pub use message::*;
pub use str::Str;
