//! The cluster bus (feature `cluster`): broadcasts, topic publishes and messages for one
//! connection reach the server's other processes and machines through Redis pub/sub.
//!
//! Each running server keeps two connections to Redis on a thread of its own,
//! `wsloop-cluster`: one SUBSCRIBEd to the channels it serves, one for PUBLISH. The channels,
//! under a prefix `P` (`wsloop` unless configured):
//!
//! - `P:all`: broadcasts,
//! - `P:t:<topic>`: publishes to a topic (subscribed while the process has a subscriber),
//! - `P:i:<instance, 16 hex digits>`: messages for one connection of that instance,
//! - `P:hb`: heartbeats (each instance's open connections) and leave notices.
//!
//! Delivery is at most once, as Redis pub/sub gives; each instance's messages keep their
//! order. While Redis is unreachable the server serves locally, drops (and counts) what it
//! would have sent, and reconnects with backoff. Every buffer is bounded, against a hostile
//! server too.

// Parts of the bus are used only by the server's configuration and loops.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

mod bridge;
mod resp;
mod url;
mod wire;

use std::time::Duration;

pub(crate) use bridge::Bus;
pub use url::{ClusterUrlError, RedisUrl};

use crate::proto::frame::OpCode;

/// How a server joins a cluster: where Redis is, the channel prefix, and the bounds.
///
/// ```
/// let cfg = wsloop::server::ClusterConfig::new("redis://127.0.0.1:6379")?;
/// assert_eq!(cfg.prefix, "wsloop");
/// # Ok::<(), wsloop::server::ClusterUrlError>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The Redis server.
    pub url: RedisUrl,
    /// The first part of every channel name (`wsloop` unless set): servers with the same
    /// prefix on the same Redis form one cluster.
    pub prefix: String,
    /// The most bytes waiting to go to Redis (4 MiB unless set); also counted against the
    /// server's memory budget. Past it, messages for the cluster are dropped and counted.
    pub queue_limit: usize,
    /// How often this instance tells the others its open connections (1 s unless set); an
    /// instance silent for 3 heartbeats leaves the counts.
    pub heartbeat: Duration,
    /// The CA to trust for `rediss://` (`None`: the system's CA bundle).
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
}

impl ClusterConfig {
    /// The defaults for the Redis server at `url` (see [`RedisUrl`]).
    pub fn new(url: &str) -> Result<Self, ClusterUrlError> {
        Ok(ClusterConfig {
            url: RedisUrl::parse(url)?,
            prefix: "wsloop".to_string(),
            queue_limit: 4 << 20,
            heartbeat: Duration::from_secs(1),
            #[cfg(feature = "tls")]
            tls: None,
        })
    }
}

/// Where the bus stands with Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterState {
    /// Not connected yet, never was.
    #[default]
    Connecting,
    /// Connected and subscribed: messages flow both ways.
    Up,
    /// Connected once, lost since; retrying with backoff and serving locally.
    Down,
}

/// The bus's counters, since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Where the bus stands with Redis.
    pub state: ClusterState,
    /// Messages (broadcasts, publishes, messages for one connection) written to Redis.
    pub published: u64,
    /// Messages from other instances handed to the loops.
    pub received: u64,
    /// Messages not sent: Redis down, the queue full, or the memory budget full.
    pub dropped_out: u64,
    /// Messages received that a loop's inbox had no room for (one per loop that missed one).
    pub dropped_in: u64,
    /// Broadcasts from other instances that never arrived (gaps in their sequence numbers),
    /// e.g. when Redis cut this instance off for reading too slowly.
    pub lost: u64,
    /// Times the bus connected to Redis again after losing it.
    pub reconnects: u64,
    /// Bytes waiting to go to Redis now.
    pub queued: usize,
    /// Other live instances (heard from within the last 3 heartbeats).
    pub instances: usize,
}

/// Who a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    /// Every connection of every instance.
    All,
    /// The subscribers of a topic, on every instance.
    Topic(&'a str),
    /// One connection, by its 128-bit id (the instance in the high 64 bits).
    Conn(u128),
}

/// What the bus hands to the server. It must never block: it pushes into the loops' inboxes
/// within their bounds and returns how many loops missed the message (counted as
/// `dropped_in`).
pub(crate) trait Inbound: Send + Sync + 'static {
    /// Delivers a message from another instance to this instance's connections.
    fn deliver(&self, target: Target<'_>, op: OpCode, payload: &[u8], except: Option<u128>) -> usize;
    /// Open WebSocket connections of this instance (sent in heartbeats).
    fn local_open(&self) -> usize;
}

#[cfg(test)]
mod tests;
