//! wsloop: a small RFC 6455 WebSocket server and client on one mio poll loop.
#![warn(missing_docs)]

mod outbox;
pub mod proto;
pub mod server;
mod timer;

pub use proto::{Message, Request};
pub use server::{Config, ConnId, Ctx, Handle, Handler, Peer, Server};
