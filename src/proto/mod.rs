//! The sans-IO protocol core: bytes in, events and bytes out. No sockets, no clocks.
//!
//! - [`handshake`]: the opening handshake, both sides.
//! - [`frame`]: frame headers and encoding, close codes.
//! - [`mask`]: payload masking and masking keys.
//! - [`utf8`]: incremental UTF-8 validation.
//! - [`conn`]: the connection state machine that ties them together.

pub mod conn;
#[cfg(feature = "deflate")]
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod utf8;

pub use conn::{Connection, Event, HeadError, Message, NotOpen, ProtocolError, Role, State};
pub use frame::{close_code, FrameHeader, OpCode};
pub use handshake::Request;
