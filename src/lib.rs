//! wsloop: a small RFC 6455 WebSocket server and client on one mio poll loop.
//!
//! One thread, one `mio::Poll`, connections in a `slab`. Built for machines where memory is
//! scarce and for measuring how many connections a box can hold.
//!
//! # Layers
//!
//! - [`proto`] is the sans-IO protocol core: the handshake ([`proto::handshake`]), the frame
//!   codec ([`proto::frame`]), masking, incremental UTF-8 checks, and the per-connection state
//!   machine [`proto::Connection`]. Bytes go in, events and bytes to send come out; no sockets,
//!   no clocks. Server, client and load generator all use it.
//! - [`server`] drives the core for many peers: accept, read into one buffer shared by every
//!   connection, write until `WouldBlock`, one timer queue for every deadline. Your code is a
//!   [`Handler`]; it talks back through [`Ctx`] (send, broadcast, close, iterate) and other
//!   threads reach the loop through a [`Handle`].
//! - [`client`] drives the core for one outgoing connection, with timers for periodic sends.
//! - [`bench`](mod@bench) drives it for thousands of outgoing connections: the load generator.
//!
//! # Quick start
//!
//! ```no_run
//! use wsloop::server::{Config, Ctx, Handler, Peer};
//! use wsloop::{Message, Server};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn on_message(&mut self, ctx: &mut Ctx<'_>, peer: Peer, msg: Message<'_>) {
//!         ctx.send(peer.id, msg); // or ctx.broadcast(msg, None)
//!     }
//! }
//!
//! let server = Server::bind("127.0.0.1:9001", Config::default())?;
//! server.run(Echo)?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Limits and their defaults
//!
//! | limit | default | what happens at it |
//! |---|---|---|
//! | [`Config::max_connections`] | open-file limit − 64 | `503 Service Unavailable` |
//! | [`Config::max_request_head`] | 8 KiB | `431 Request Header Fields Too Large` |
//! | [`Config::handshake_timeout`] | 10 s | connection dropped |
//! | [`Config::max_message`] | 16 MiB | close `1009` |
//! | [`Config::max_backpressure`] | 1 MiB queued per peer | reading from that peer pauses; a broadcast closes it with `1008` or skips it ([`server::SlowConsumer`]) |
//! | [`Config::idle_timeout`] / [`Config::ping_interval`] | off | ping after silence, close `1001` past the timeout |
//! | [`Config::close_timeout`] | 3 s | connection dropped without the peer's close |
//! | [`Config::read_buffer_size`] | 256 KiB, one for the whole loop | larger frames are assembled per connection |
//!
//! # Memory
//!
//! An idle open connection costs one slab slot (80 bytes on 64-bit Linux) and its kernel socket.
//! A connection allocates only while a frame is split across reads or bytes wait to be written,
//! and frees that memory as soon as it is done. Every outbound queue in the server is bounded;
//! a client reports its own with [`Client::buffered_amount`].
//!
//! # Not supported
//!
//! TLS (`wss://`; put a TLS proxy in front), extensions such as `permessage-deflate`, HTTP/2
//! WebSockets (RFC 8441), and more than one thread per loop.
#![warn(missing_docs)]

pub mod bench;
pub mod client;
pub mod modes;
mod outbox;
pub mod proto;
pub mod server;
mod timer;

pub use client::{Client, ClientConfig, ClientError, ClientEvent};
pub use proto::{Message, Request};
pub use server::{Config, ConnId, Ctx, Handle, Handler, Peer, Server};

/// The README's Rust examples, compiled by `cargo test` so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
