//! Server settings.

use std::borrow::Cow;
use std::time::Duration;

use crate::proto;

/// What a broadcast does to a peer whose outbound queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close it with 1008 (the default): the frame being written is finished, the rest of its
    /// queue dropped, and the close frame sent.
    Close,
    /// Skip this message for that peer and count it as dropped.
    Drop,
}

/// Server settings. Every limit has a default suited to a small machine; see each field.
///
/// ```
/// let mut cfg = wsloop::ServerConfig::default();
/// cfg.max_message = 1 << 20;
/// cfg.check().unwrap();
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Open connections allowed; above it a new connection gets `503`.
    /// Default: the process's open-file limit less 64 descriptors.
    pub max_connections: usize,
    /// Open connections allowed from one IP address; more get `503` (default: no limit).
    /// Behind a proxy every peer has the proxy's address: leave it off there.
    pub max_connections_per_ip: Option<u32>,
    /// Largest message accepted, in bytes (default 16 MiB); larger gets close `1009`.
    pub max_message: usize,
    /// Largest handshake request head (default 8 KiB); larger gets `431`.
    pub max_request_head: usize,
    /// Outbound bytes queued per connection before the server stops reading from it
    /// (default 1 MiB), counting what the queue really holds (entries, buffers and the shared
    /// frames it keeps alive). Broadcasts apply [`slow_consumer`](Self::slow_consumer) at this
    /// bound. One message larger than the bound is still queued if the memory budget allows.
    pub max_backpressure: usize,
    /// The memory budget: everything the server buffers for its peers (partial messages,
    /// outbound queues, shared frames, handshake heads), in bytes. Default: a quarter of the
    /// machine's physical memory, at least 16 MiB and at most 1 GiB. Past three quarters of
    /// it, connections holding more than their share stop being read; past it, they are
    /// closed with `1013` (try again later), their partial messages and queues dropped.
    pub max_memory: usize,
    /// What a broadcast does to a peer whose queue is full (default [`SlowConsumer::Close`]).
    pub slow_consumer: SlowConsumer,
    /// Time allowed from accepting a connection to the end of its handshake (default 10 s).
    pub handshake_timeout: Duration,
    /// Send a ping after this much silence from the peer (default: off). A peer silent for
    /// another interval after the ping is closed.
    pub ping_interval: Option<Duration>,
    /// Close a peer silent for this long with `1001` (default: off, as in the original design:
    /// no timeout but ours).
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the peer's close frame, and for its FIN after ours (default 3 s).
    pub close_timeout: Duration,
    /// How long a shutdown waits for peers to answer the close (default 3 s).
    pub shutdown_timeout: Duration,
    /// Size of the one read buffer shared by all connections (default 256 KiB). A frame that
    /// fits in one read is unmasked in place; a larger one is assembled per connection. Pages
    /// of the buffer that no read has reached are not resident.
    pub read_buffer_size: usize,
    /// TCP keep-alive probes after this much idle time (default: off).
    pub tcp_keepalive: Option<Duration>,
    /// Allowed `Origin` values; empty allows any (default). A request without `Origin` (not a
    /// browser) is always allowed: the check exists to stop cross-site pages, which always
    /// send one. Others get `403`.
    pub origins: Vec<String>,
    /// Subprotocols the server speaks, in order of preference (default none). The first one
    /// the client offers is chosen, unless [`Handler::on_upgrade`](super::Handler::on_upgrade)
    /// picks another.
    pub protocols: Vec<String>,
    /// An HTML page served for `GET /` and `HEAD /` (default: none; a plain request gets `426`).
    pub page: Option<Cow<'static, str>>,
    /// Stop gracefully on SIGINT and SIGTERM while running, and reload the certificate on
    /// SIGHUP (the files of a `ServerTls::from_pem_files` read again; a bad file is logged and
    /// the certificate in use kept; without TLS, SIGHUP is only logged). Default: off; the CLI
    /// turns it on.
    pub handle_signals: bool,
    /// Event loops, one per thread (default 1, at most [`MAX_THREADS`](super::MAX_THREADS)),
    /// each with its own listener on the same port (`SO_REUSEPORT`): the kernel spreads new
    /// connections over them by a hash of their addresses. Run them with
    /// [`Server::run_threads`](super::Server::run_threads). Each loop beyond the first holds
    /// four descriptors (poll, waker, listener, spare) from the reserve below `max_connections`.
    pub threads: usize,
    /// Set `SO_REUSEPORT` on the listening socket (default: off), so that several servers of
    /// the same user, in this process or others, listen on one port; the kernel hands each new
    /// connection to one of them by a hash of its addresses. Broadcasts and
    /// [`Ctx::peers`](super::Ctx::peers) stay within one server (broadcasts cross with
    /// [`cluster`](Self::cluster)). Always on with `threads` above 1.
    pub reuse_port: bool,
    /// Serve TLS (`wss://`, and the page over `https://`) with this certificate and key
    /// (default: none, plain TCP). The read buffer must then be at least 64 KiB.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ServerTls>,
    /// permessage-deflate (default: accepted when offered, messages of 64 bytes and more
    /// compressed at zlib level 1). The server always answers with `server_no_context_takeover`
    /// and `client_no_context_takeover`, so an idle connection holds no compression state: one
    /// compressor and one decompressor serve the whole loop.
    #[cfg(feature = "deflate")]
    pub deflate: proto::deflate::DeflateConfig,
    /// Join a cluster over Redis pub/sub (default: none): broadcasts, publishes to topics and
    /// sends to connections of other instances (other processes or machines with the same
    /// Redis and prefix) cross over, and [`Ctx::len_everywhere`](super::Ctx::len_everywhere)
    /// counts their connections. Delivery here never waits for Redis; across instances it is
    /// at most once, as Redis pub/sub gives. Each run picks a random instance id, carried in
    /// every [`ConnId`](super::ConnId).
    #[cfg(feature = "cluster")]
    pub cluster: Option<super::cluster::ClusterConfig>,
    /// Answer `GET /metrics` on the main listener with the server's metrics in the Prometheus
    /// text format (default: off; a plain request for `/metrics` then gets what any other path
    /// gets). See [`with_metrics`](Self::with_metrics) and `docs/operations.md`.
    pub metrics: bool,
    /// A second, plain-HTTP listener for `GET /metrics` and `GET /health` only (default:
    /// none), so that metrics need not be public; it serves metrics whatever
    /// [`metrics`](Self::metrics) says. Served by the first loop; it stays open while the
    /// server drains, so probes see `503`. With [`reuse_port`](Self::reuse_port) it is bound
    /// with `SO_REUSEPORT` too (every worker process of one port answers on it). See
    /// [`Server::metrics_addr`](super::Server::metrics_addr).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Shared memory through which the worker processes of one port publish their metrics to
    /// one another (default: none; see [`MetricsBoard`](super::MetricsBoard)).
    pub metrics_board: Option<super::MetricsBoard>,
    /// How long a shutdown (SIGTERM with [`handle_signals`](Self::handle_signals),
    /// [`Handle::shutdown`](super::Handle::shutdown), [`Ctx::shutdown`](super::Ctx::shutdown))
    /// drains before it closes the peers (default 0: close them at once). Draining stops
    /// accepting (the listeners close) and turns `GET /health` to `503`; connections go on
    /// until they leave or the time is up, then the rest are closed with `1001` and given
    /// [`shutdown_timeout`](Self::shutdown_timeout) to answer. The server returns as soon as
    /// none remain.
    pub drain_timeout: Duration,
}

/// A [`ServerConfig`] setting that cannot work, from [`ServerConfig::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerConfigError {
    /// `max_connections` is zero.
    MaxConnectionsZero,
    /// `max_connections_per_ip` is `Some(0)`.
    MaxConnectionsPerIpZero,
    /// `max_backpressure` is zero.
    MaxBackpressureZero,
    /// `max_memory` is under 1 MiB.
    MaxMemoryTooSmall,
    /// `read_buffer_size` is under 64 bytes.
    ReadBufferTooSmall,
    /// `threads` is not 1 to 256.
    Threads,
    /// `read_buffer_size` is under 64 KiB with TLS on.
    ReadBufferTooSmallForTls,
    /// `shutdown_timeout` is zero.
    ShutdownTimeoutZero,
    /// The cluster channel prefix is empty.
    ClusterPrefixEmpty,
    /// The cluster heartbeat is zero.
    ClusterHeartbeatZero,
    /// The cluster `queue_limit` is zero.
    ClusterQueueLimitZero,
    /// A setting of each connection's protocol core cannot work.
    Protocol(proto::ConfigError),
}

impl core::fmt::Display for ServerConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ServerConfigError::MaxConnectionsZero => "max_connections must be at least 1",
            ServerConfigError::MaxConnectionsPerIpZero => "max_connections_per_ip must be at least 1",
            ServerConfigError::MaxBackpressureZero => "max_backpressure must be at least 1 byte",
            ServerConfigError::MaxMemoryTooSmall => "max_memory must be at least 1 MiB",
            ServerConfigError::ReadBufferTooSmall => "read_buffer_size must be at least 64 bytes",
            ServerConfigError::Threads => "threads must be 1 to 256",
            ServerConfigError::ReadBufferTooSmallForTls => "read_buffer_size must be at least 64 KiB with TLS",
            ServerConfigError::ShutdownTimeoutZero => "shutdown_timeout must be above zero",
            ServerConfigError::ClusterPrefixEmpty => "cluster prefix must not be empty",
            ServerConfigError::ClusterHeartbeatZero => "cluster heartbeat must be above zero",
            ServerConfigError::ClusterQueueLimitZero => "cluster queue_limit must be at least 1 byte",
            ServerConfigError::Protocol(e) => e.message(),
        })
    }
}

impl std::error::Error for ServerConfigError {}

impl ServerConfig {
    /// Turns on `GET /metrics` on the main listener ([`metrics`](Self::metrics)).
    pub fn with_metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Serves `GET /metrics` and `GET /health` on a listener of their own at `addr`
    /// ([`metrics_listen`](Self::metrics_listen)).
    pub fn with_metrics_listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// Drains for `timeout` before closing the peers on a shutdown
    /// ([`drain_timeout`](Self::drain_timeout)).
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }
}

/// Descriptors kept free for the listener, the poll, logging and the like.
pub(crate) const FD_RESERVE: u64 = 64;

/// The open-file limit less a reserve: how many connections the process can hold.
pub fn default_max_connections() -> usize {
    let soft = crate::io::sys::fd_limit();
    soft.saturating_sub(FD_RESERVE).max(1).min(usize::MAX as u64) as usize
}

/// The default memory budget: a quarter of physical memory, within 16 MiB..=1 GiB (256 MiB when
/// the machine does not say).
pub fn default_max_memory() -> usize {
    let quarter = crate::io::sys::physical_memory().map_or(256 << 20, |m| m / 4);
    quarter.clamp(16 << 20, 1 << 30).min(usize::MAX as u64) as usize
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: default_max_connections(),
            max_connections_per_ip: None,
            max_message: 16 << 20,
            max_request_head: 8 << 10,
            max_backpressure: 1 << 20,
            max_memory: default_max_memory(),
            slow_consumer: SlowConsumer::Close,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: None,
            idle_timeout: None,
            close_timeout: Duration::from_secs(3),
            shutdown_timeout: Duration::from_secs(3),
            read_buffer_size: 256 << 10,
            tcp_keepalive: None,
            origins: Vec::new(),
            protocols: Vec::new(),
            page: None,
            handle_signals: false,
            threads: 1,
            reuse_port: false,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "deflate")]
            deflate: proto::deflate::DeflateConfig::default(),
            #[cfg(feature = "cluster")]
            cluster: None,
            metrics: false,
            metrics_listen: None,
            metrics_board: None,
            drain_timeout: Duration::ZERO,
        }
    }
}

impl ServerConfig {
    /// Refuses settings that cannot work (zero limits, zero timeouts), with what is wrong.
    pub fn check(&self) -> Result<(), ServerConfigError> {
        if self.max_connections == 0 {
            return Err(ServerConfigError::MaxConnectionsZero);
        }
        if self.max_connections_per_ip == Some(0) {
            return Err(ServerConfigError::MaxConnectionsPerIpZero);
        }
        if self.max_backpressure == 0 {
            return Err(ServerConfigError::MaxBackpressureZero);
        }
        if self.max_memory < 1 << 20 {
            return Err(ServerConfigError::MaxMemoryTooSmall);
        }
        if self.read_buffer_size < 64 {
            return Err(ServerConfigError::ReadBufferTooSmall);
        }
        if !(1..=super::MAX_THREADS).contains(&self.threads) {
            return Err(ServerConfigError::Threads);
        }
        #[cfg(feature = "tls")]
        if self.tls.is_some() && self.read_buffer_size < 64 << 10 {
            // Its upper half must hold a whole TLS record (up to 18 KiB) and what is joined to it.
            return Err(ServerConfigError::ReadBufferTooSmallForTls);
        }
        if self.shutdown_timeout.is_zero() {
            return Err(ServerConfigError::ShutdownTimeoutZero);
        }
        #[cfg(feature = "cluster")]
        if let Some(c) = &self.cluster {
            if c.prefix.is_empty() {
                return Err(ServerConfigError::ClusterPrefixEmpty);
            }
            if c.heartbeat.is_zero() {
                return Err(ServerConfigError::ClusterHeartbeatZero);
            }
            if c.queue_limit == 0 {
                return Err(ServerConfigError::ClusterQueueLimitZero);
            }
        }
        self.protocol_config().check().map_err(ServerConfigError::Protocol)
    }

    /// The settings of each connection's protocol core.
    pub(crate) fn protocol_config(&self) -> proto::Config {
        proto::Config {
            max_message: self.max_message,
            max_head: self.max_request_head,
            handshake_timeout: self.handshake_timeout,
            close_timeout: self.close_timeout,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
        }
    }
}
