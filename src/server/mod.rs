//! The server: a thin driver over the IO layer's engine that accepts connections and
//! dispatches their events to a [`Handler`].
//!
//! ```no_run
//! use wsloop::proto::Answer;
//! use wsloop::server::{Conn, Ctx, Handler, Server, ServerConfig, Upgrade};
//! use wsloop::Message;
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
//!         Ok(())
//!     }
//!     fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
//!         let _ = ctx.send(conn.id(), msg);
//!     }
//! }
//!
//! Server::bind("127.0.0.1:9001", ServerConfig::default())?.run(Echo)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::net::SocketAddr;

use mio::Token;

mod accept;
#[cfg(feature = "cluster")]
pub mod cluster;
mod cluster_link;
pub mod config;
mod handle;
pub mod handler;
mod health;
mod ipcount;
mod loop_state;
mod metrics;
pub mod modes;
mod msglog;
mod run;
mod serve;
mod signals;
#[cfg(feature = "tls")]
mod tls_reload;
mod topics;

#[cfg(feature = "cluster")]
pub use cluster::{ClusterConfig, ClusterState, ClusterStats, ClusterUrlError, RedisUrl};
pub use config::{default_max_connections, default_max_memory, ServerConfig, ServerConfigError, SlowConsumer};
pub use handle::{Handle, HandleError};
pub use handler::{Conn, ConnId, Ctx, Handler, Stats, Timer, TimerId, Upgrade};
pub use metrics::MetricsBoard;
pub use modes::{Broadcast, Echo, Reply};
pub use run::Server;

use crate::io::engine::reserved_token;
use loop_state::LoopState;

const LISTENER: Token = reserved_token(0);
const WAKER: Token = reserved_token(1);
const SIGNALS: Token = reserved_token(2);
/// The `--metrics-listen` listener (first loop only).
const ADMIN: Token = reserved_token(3);

/// Logs a line about one peer: `ADDR` then `what`, with the target `wsloop::server::peer`
/// (message lines have `wsloop::server::message`). One function for every such line keeps the
/// binary small (each `log!` call site costs its own formatting and metadata).
#[inline(never)]
pub(crate) fn peer_log(level: log::Level, addr: SocketAddr, what: std::fmt::Arguments<'_>) {
    if level <= log::max_level() {
        log::log!(target: msglog::PEER_TARGET, level, "{addr}{what}");
    }
}

/// Loops one server can run: a [`ConnId`] names its loop in 8 bits.
pub const MAX_THREADS: usize = 256;
