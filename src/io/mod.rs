//! The one IO layer under every driver: the transport seam, outbound queues with
//! write-or-queue, interest updates, non-blocking connect, one token scheme, one timer queue,
//! and the engine that runs many connections on one poll loop. The server, the client and the
//! load generator are thin drivers over it.

// Each driver uses part of this layer; builds with only some drivers leave the rest unused.
#![cfg_attr(not(all(feature = "server", feature = "bench")), allow(dead_code, unused_imports))]

pub(crate) mod budget;
pub(crate) mod connect;
#[cfg(any(feature = "server", feature = "bench"))]
pub(crate) mod engine;
pub(crate) mod outbox;
pub(crate) mod stream;
pub(crate) mod sys;
pub(crate) mod timer;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod transport;
