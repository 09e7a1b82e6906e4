//! The wire protocol as a sans-IO library: the logical messages ([`message`]) and the raw-TCP
//! frame layer ([`frame`]). Shared by the gateway, the loadgen and the tests; no sockets here.

pub mod frame;
pub mod message;
pub mod samples;
pub mod str;

pub use message::*;
pub use str::Str;

/// The longest id a client or the admin API may give (a device, a client message id, a user, a
/// group), in bytes. The stores take longer ones (`store::MAX_ID_BYTES`); this is the
/// gateway's bound on what it accepts.
pub const MAX_ID_BYTES: usize = 128;
