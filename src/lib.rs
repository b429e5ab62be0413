//! wsloop: a small RFC 6455 WebSocket server and client on one mio poll loop.
//!
//! One `mio::Poll` per thread (one thread unless asked for more), connections in a `slab`. Built
//! for machines where memory is scarce and for measuring how many connections a box can hold.
//!
//! # Layers
//!
//! - [`proto`] is the sans-IO protocol core: one [`proto::Connection`] owns a connection's whole
//!   life for either role, the handshake, frames, masking, UTF-8 checks, the close handshake and
//!   every timeout. Bytes and time go in; events, bytes to send and the next deadline come out.
//!   No sockets, no clocks, no globals; it needs only `core` and `alloc`
//!   (`--no-default-features` builds it for firmware).
//! - One IO layer (crate-private) under every driver: the transport seam, outbound queues that
//!   exist only while bytes wait, interest updates, non-blocking connect, one timer queue, and
//!   the engine that runs many connections on a poll loop with one read buffer for all.
//! - Drivers: [`server`] accepts and dispatches to your [`Handler`]; [`client`] is one outgoing
//!   connection with a pull API; [`bench`](mod@bench) runs thousands of clients and measures.
//!
//! # Cargo features
//!
//! | feature | what | default |
//! |---|---|---|
//! | `std` | the IO layer (sockets, the OS-seeded random source) | yes (through the others) |
//! | `server` | [`Server`], [`Handler`], built-in modes | yes |
//! | `client` | [`Client`] | yes |
//! | `bench` | the load generator | yes |
//! | `cli` | the `wsloop` binary | yes |
//! | `tls` | `wss://` for the server, the client and the load generator ([`tls`]) | yes |
//! | `deflate` | permessage-deflate (RFC 7692) for server, client and load generator: `proto::deflate`; C zlib compiled and linked statically (needs a C compiler) | yes |
//!
//! # Quick start
//!
//! ```no_run
//! # #[cfg(feature = "server")] {
//! use wsloop::prelude::*;
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
//!         Ok(()) // accept; Err(Answer::reject(401, "…")) refuses
//!     }
//!     fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
//!         let _ = ctx.send(conn.id(), msg); // or ctx.broadcast(msg, None)
//!     }
//! }
//!
//! let server = Server::bind("127.0.0.1:9001", ServerConfig::default())?;
//! server.run(Echo)?;
//! # }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Limits and their defaults
//!
//! | limit | default | what happens at it |
//! |---|---|---|
//! | `ServerConfig::max_connections` | open-file limit − 64 | `503 Service Unavailable` |
//! | `ServerConfig::max_request_head` | 8 KiB | `431 Request Header Fields Too Large` |
//! | `ServerConfig::handshake_timeout` | 10 s | connection dropped |
//! | `ServerConfig::max_message` | 16 MiB | close `1009` (a compressed message: once it inflates past the limit) |
//! | `ServerConfig::max_backpressure` | 1 MiB queued per peer | reading from that peer pauses; a broadcast closes it with `1008` or skips it |
//! | `ServerConfig::idle_timeout` / `ping_interval` | off | ping after silence, close `1001` past the timeout |
//! | `ServerConfig::close_timeout` | 3 s | connection dropped without the peer's close |
//! | `ServerConfig::read_buffer_size` | 256 KiB, one for the whole loop | larger frames are assembled per connection |
//!
//! # Memory
//!
//! An idle open connection costs one slab slot (48 bytes on 64-bit Linux) and its kernel
//! socket, with or without permessage-deflate agreed: the server declines context takeover in
//! both directions, so one compressor and one decompressor per loop serve every connection. A
//! connection allocates only while a frame is split across reads or bytes wait to be
//! written, and frees that memory as soon as it is done. Every outbound queue in the server is
//! bounded, and everything the server buffers counts against one memory budget
//! (`ServerConfig::max_memory`); a client reports its own queue with
//! [`Client::queued`].
//!
//! # Not supported
//!
//! WebSockets over HTTP/2 (RFC 8441), extensions other than `permessage-deflate`, and
//! broadcasts or topics that cross processes (`wsloop serve --processes`): they reach every
//! loop of one process.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod proto;

#[cfg(feature = "std")]
pub(crate) mod io;

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;

/// Reading the operating system: memory and CPU use of a process (for stats lines and the
/// load generator's server figures).
#[cfg(feature = "std")]
#[doc(hidden)] // Public only for the `wsloop` binary's stats lines; the library uses it inside.
pub mod sys {
    pub use crate::io::sys::{cores, read_cpu, read_rss};
}

#[cfg(feature = "client")]
pub use client::{Client, ClientConfig, ClientError, ClientEvent};
pub use proto::{Message, Request};
#[cfg(feature = "server")]
pub use server::{Conn, ConnId, Ctx, Handle, Handler, Server, ServerConfig};

/// What a server needs, from one path: `use wsloop::prelude::*;`.
#[cfg(feature = "server")]
pub mod prelude {
    pub use crate::proto::{Answer, Message, NotOpen};
    pub use crate::server::{
        Conn, ConnId, Ctx, Handle, HandleError, Handler, Server, ServerConfig, ServerConfigError, Timer, TimerId,
        Upgrade,
    };
}

/// The README's Rust examples, compiled by `cargo test` so they cannot rot.
#[cfg(all(doctest, feature = "server", feature = "client"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The Rust examples of the library guide (docs/library.md), compiled by `cargo test` as well.
#[cfg(all(doctest, feature = "server", feature = "client", feature = "tls"))]
#[doc = include_str!("../docs/library.md")]
pub struct LibraryGuideDoctests;

/// The Rust examples of the scaling-out page (docs/scaling-out.md), compiled by `cargo test`.
#[cfg(all(doctest, feature = "cluster"))]
#[doc = include_str!("../docs/scaling-out.md")]
pub struct ScalingOutDoctests;
