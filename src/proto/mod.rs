//! The sans-IO protocol core: bytes in, events and bytes out, time in, next deadline out.
//!
//! Nothing here touches a socket, reads a clock or keeps a global: the caller passes the time
//! (milliseconds on any monotonic clock it likes) and a [`RandomSource`]. The core needs only
//! `core` and `alloc`, so it builds for firmware (`--no-default-features`).
//!
//! - [`Connection`]: one connection's whole life, for either role: the opening handshake, frames,
//!   the close handshake, heartbeat, idle, handshake and close timeouts.
//! - [`handshake`]: parsing and writing the HTTP upgrade, both sides.
//! - [`frame`]: frame headers and encoding, close codes.
//! - [`mask`]: payload masking.
//! - [`utf8`]: incremental UTF-8 validation.
//! - `deflate` (feature `deflate`, which needs `std`): permessage-deflate negotiation and the
//!   per-loop codec.

mod codec_stats;
pub mod conn;
#[cfg(feature = "deflate")]
pub mod deflate;
/// Without the `deflate` feature: the codec's zero-sized placeholder.
#[cfg(not(feature = "deflate"))]
#[path = "no_deflate.rs"]
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod rand;
pub mod utf8;

pub use conn::{
    Config, ConfigError, Connection, Error, Event, Message, NotOpen, Payload, ProtocolError, Role, State, Timeout,
};
pub use frame::{close_code, FrameHeader, OpCode};
pub use handshake::{
    Answer, ClientRequest, ClientRequestError, HeaderError, Headers, Reject, Request, Response, ResponseError,
};
pub use rand::RandomSource;
