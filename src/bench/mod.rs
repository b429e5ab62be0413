//! The load generator behind `wsloop bench`: many client connections on one poll loop, a thin
//! driver over the same engine as the server.
//!
//! A run has four phases, each bounded in time:
//!
//! 1. **connect**: open [`BenchConfig::connections`] sockets, at [`BenchConfig::ramp`] per
//!    second or as fast as handshakes complete (at most [`BenchConfig::max_pending`] at once),
//!    each bound to the next of [`BenchConfig::source_ips`] before it connects, and upgrade
//!    them. Each gets [`BenchConfig::connect_timeout`] for TCP and the handshake together.
//! 2. **measure**: for [`BenchConfig::duration`], apply the [`Load`].
//! 3. **drain**: stop sending; wait up to [`BenchConfig::drain_timeout`] for the echoes in flight.
//! 4. **close**: a close handshake on every connection, bounded by [`BenchConfig::close_timeout`].
//!
//! Every message is [`BenchConfig::size`] bytes long: a sequence number and the send time
//! (nanoseconds since the run started) in the first 16 bytes, then a body that is the same for
//! every message ([`Content`]: a binary pattern by default, or JSON-like or prose-like text).
//! Each echo is checked for kind, length, order and content, and its round-trip time goes into
//! a histogram. A server that answers in its own words is measured with [`Expect::Reply`]
//! (answers timed in order, not checked), one that may not answer with [`Expect::Nothing`];
//! a broadcasting server with [`BenchConfig::publishers`] (fan-out). [`Load::Rate`] is the
//! open model: latency counts from when each message was due, so a stalled server shows in the
//! percentiles. With `BenchConfig::deflate` the connections offer permessage-deflate and the
//! report says how many agreed and how well it compressed.
//!
//! Every second of the run is sampled too ([`Report::timeline`]: connections, messages,
//! latency percentiles of that second, the server's memory and CPU). A [`Report`] is written
//! and read as JSON ([`Report::to_json`], [`Report::from_json`]) with its histograms, so that
//! runs merge exactly ([`Report::merge`]), and drawn as a page ([`html_page`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::handshake::ClientRequest;

mod content;
mod driver;
mod histogram;
mod html;
mod json;
mod report;
mod timeline;

pub use content::Content;
pub use histogram::Latency;
pub use html::html_page;
pub use json::ReportError;
pub use report::{Compression, Fanout, KernelUsage, Report, Schedule, ServerUsage};
pub use timeline::Sample;

/// Descriptors the load generator keeps for itself (poll, stdio, /proc reads) beyond one per
/// connection.
pub(crate) const FD_RESERVE: u64 = 32;

/// Bytes at the start of every message: sequence number, then send time.
pub const MESSAGE_HEADER: usize = 16;

/// Publishers a fan-out run may have: the publisher's number travels in the top 16 bits of
/// the 48 the text header has for the sequence number.
pub const MAX_PUBLISHERS: usize = 1 << 16;

/// What each connection does during the measured phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Open and hold; send nothing.
    Idle,
    /// Send one message every period (the sends of different connections are spread evenly
    /// over the period).
    Periodic(Duration),
    /// Keep this many messages in flight: send a new one for every echo.
    Saturate(u32),
    /// The open model: this many messages per second over all connections (over the
    /// publishers in a fan-out run), each sent at its scheduled time whatever the server
    /// does, handed round-robin to the connections. A message due while the loop was held
    /// up is sent late, never skipped; its latency counts from when it was due, so a server
    /// stall shows in the percentiles instead of slowing the sending (no coordinated
    /// omission).
    Rate(u32),
}

/// What the server is expected to send back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Expect {
    /// Every message echoed: kind, length, order and content are checked (the default).
    #[default]
    Echo,
    /// One message answers each message sent, in order; its content is not checked.
    Reply,
    /// Nothing in particular: messages are sent, what arrives is counted and not checked.
    Nothing,
}

impl Expect {
    /// Parses `echo`, `reply` or `none`.
    pub fn parse(s: &str) -> Option<Expect> {
        match s {
            "echo" => Some(Expect::Echo),
            "reply" => Some(Expect::Reply),
            "none" => Some(Expect::Nothing),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) takes.
    pub fn name(self) -> &'static str {
        match self {
            Expect::Echo => "echo",
            Expect::Reply => "reply",
            Expect::Nothing => "none",
        }
    }
}

/// One payload sent as it is in every message, instead of the bench's own (which carries a
/// sequence number and a timestamp): round trips are then timed in order of sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedMessage {
    /// The payload.
    pub bytes: Vec<u8>,
    /// Sent as a text message (the bytes are UTF-8) rather than binary.
    pub text: bool,
}

impl FixedMessage {
    /// A text message.
    pub fn text(s: &str) -> FixedMessage {
        FixedMessage {
            bytes: s.as_bytes().to_vec(),
            text: true,
        }
    }

    /// A file's bytes: a text message when they are UTF-8, else binary.
    pub fn from_bytes(bytes: Vec<u8>) -> FixedMessage {
        let text = std::str::from_utf8(&bytes).is_ok();
        FixedMessage { bytes, text }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Idle => f.write_str("idle"),
            Load::Periodic(d) => write!(f, "periodic, one message every {}", report::fmt_duration(*d)),
            Load::Saturate(k) => write!(f, "saturate, {k} in flight per connection"),
            Load::Rate(r) => write!(f, "open model, {r} messages/s in all"),
        }
    }
}

/// Why a run could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum BenchError {
    /// A setting that cannot work, and why.
    InvalidConfig(String),
    /// The URL is not a usable `ws://` URL.
    Url(crate::client::UrlError),
    /// The host did not resolve.
    Resolve {
        /// The host name.
        host: String,
        /// Why.
        error: io::Error,
    },
    /// This process may not open enough sockets for the connections asked for.
    TooFewDescriptors {
        /// Connections asked for.
        connections: usize,
        /// Descriptors that needs (one per connection and 32 for the loop).
        needed: u64,
        /// The open-file limit this process could reach.
        limit: u64,
    },
    /// The source addresses do not have enough ports for the connections asked for.
    TooFewPorts {
        /// Connections asked for.
        connections: usize,
        /// Source addresses (at least one: the kernel's choice).
        sources: usize,
        /// Ephemeral ports per address.
        ports: u64,
    },
    /// The poll or another resource could not be set up.
    Io(io::Error),
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::InvalidConfig(why) => f.write_str(why),
            BenchError::Url(e) => e.fmt(f),
            BenchError::Resolve { host, error } => {
                write!(f, "cannot resolve '{host}': {}", crate::io::describe(error))
            }
            BenchError::TooFewDescriptors {
                connections,
                needed,
                limit,
            } => write!(
                f,
                "{connections} connections need {needed} open files (one per connection and {FD_RESERVE} for \
                 the loop), but the open-file limit of this process is {limit}: use {} connections or fewer per process",
                limit.saturating_sub(FD_RESERVE)
            ),
            BenchError::TooFewPorts {
                connections,
                sources,
                ports,
            } => write!(
                f,
                "{connections} connections need more local ports than {sources} source address(es) give \
                 ({ports} ports each): connect from more source addresses, e.g. 127.0.0.2-127.0.0.254"
            ),
            BenchError::Io(e) => write!(f, "I/O error: {}", crate::io::describe(e)),
        }
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BenchError::Url(e) => Some(e),
            BenchError::Resolve { error, .. } | BenchError::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for BenchError {
    fn from(e: io::Error) -> Self {
        BenchError::Io(e)
    }
}

/// Where to connect: `ws://HOST[:PORT][/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Target {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The `Host` header: host and port (the port left out when it is 80).
    pub host: String,
    /// The request target, e.g. `/` or `/echo?x=1`.
    pub path: String,
    /// A `wss://` URL: connections speak TLS.
    pub tls: bool,
    /// The host name or address alone (the TLS server name).
    pub server_name: String,
}

impl Target {
    /// Parses and resolves a `ws://` URL (a bare `HOST:PORT` is accepted too), with the
    /// client's URL parser.
    pub fn parse(url: &str) -> Result<Target, BenchError> {
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("ws://{url}")
        };
        let u = crate::client::WsUrl::parse(&full).map_err(BenchError::Url)?;
        let resolve = |error| BenchError::Resolve {
            host: u.host.clone(),
            error,
        };
        let addr = (u.host.as_str(), u.port)
            .to_socket_addrs()
            .map_err(resolve)?
            .next()
            .ok_or_else(|| resolve(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
        Ok(Target {
            addr,
            host: u.host_header(),
            path: u.resource,
            tls: u.tls,
            server_name: u.host,
        })
    }

    /// The target as a URL.
    pub fn url(&self) -> String {
        format!("{}://{}{}", if self.tls { "wss" } else { "ws" }, self.host, self.path)
    }
}

/// The source addresses used when none are given and the target is on loopback:
/// 127.0.0.2-127.0.0.254, 253 addresses, each with its own ephemeral port range. Many, because
/// the kernel finds a free port fast only while an address uses less than half of its range
/// (it searches one half first): past that, connects slow from thousands a second to hundreds
/// (seen at 826,000 connections over 59 addresses). 253 addresses stay fast to 3.5 million.
pub fn default_source_ips(target: &SocketAddr) -> Vec<IpAddr> {
    match target.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => (2..=254).map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))).collect(),
        _ => Vec::new(),
    }
}

/// Settings of one run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BenchConfig {
    /// The server.
    pub target: Target,
    /// Connections to open and hold.
    pub connections: usize,
    /// Connections opened per second; `None` opens them as fast as handshakes complete.
    pub ramp: Option<u32>,
    /// The load during the measured phase.
    pub load: Load,
    /// Bytes per message, at least [`MESSAGE_HEADER`].
    pub size: usize,
    /// What the messages carry (default: binary).
    pub content: Content,
    /// Offer permessage-deflate (default: off, so that figures measure the server's own work
    /// unless compression is asked for).
    #[cfg(feature = "deflate")]
    pub deflate: bool,
    /// Length of the measured phase (default 30 s).
    pub duration: Duration,
    /// Local addresses to bind before connecting, used in turn; empty lets the kernel choose.
    pub source_ips: Vec<IpAddr>,
    /// The server's process id, for its memory and CPU time from `/proc`.
    pub server_pid: Option<u32>,
    /// Time for TCP connect plus handshake, per connection (default 10 s).
    pub connect_timeout: Duration,
    /// Connects and handshakes in progress at once (default 128).
    pub max_pending: usize,
    /// How long to wait for echoes still in flight after the measured phase (default 5 s).
    pub drain_timeout: Duration,
    /// How long the close handshakes may take (default 5 s).
    pub close_timeout: Duration,
    /// Set it (from a signal handler, say) to cut the run short: no more connections are
    /// opened, the measured phase ends, the echoes in flight are awaited, every connection
    /// closes, and the report says it was interrupted.
    pub stop: Option<Arc<AtomicBool>>,
    /// Whom to trust on a `wss://` target (default none: the system's CA bundle).
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
    /// What the server is expected to answer (default: an echo of each message).
    pub expect: Expect,
    /// Fan-out: this many of the connections publish (with the [`Load`]) and every connection
    /// receives; 0 (the default) for one conversation per connection. Every publisher's
    /// messages carry its number, a sequence number and the publish time, and each receiver
    /// checks that it got each message once and in order.
    pub publishers: usize,
    /// Extra request headers, e.g. `("Authorization", "Bearer x")` or `("Origin", ...)`.
    pub headers: Vec<(String, String)>,
    /// Subprotocols to offer, in order of preference.
    pub protocols: Vec<String>,
    /// A fixed payload sent as it is, in place of the bench's messages (and of `size` and
    /// `content`).
    pub message: Option<FixedMessage>,
}

impl BenchConfig {
    /// A configuration with the defaults: one idle connection for 30 s, 16-byte messages.
    pub fn new(target: Target) -> Self {
        BenchConfig {
            target,
            connections: 1,
            ramp: None,
            load: Load::Idle,
            size: 16,
            content: Content::Binary,
            #[cfg(feature = "deflate")]
            deflate: false,
            duration: Duration::from_secs(30),
            source_ips: Vec::new(),
            server_pid: None,
            connect_timeout: Duration::from_secs(10),
            max_pending: 128,
            drain_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            stop: None,
            #[cfg(feature = "tls")]
            tls: None,
            expect: Expect::Echo,
            publishers: 0,
            headers: Vec::new(),
            protocols: Vec::new(),
            message: None,
        }
    }

    /// Bytes per message: the fixed message's length, else `size`.
    pub fn message_len(&self) -> usize {
        self.message.as_ref().map_or(self.size, |m| m.bytes.len())
    }

    /// The upgrade request every connection sends.
    fn request(&self) -> ClientRequest {
        let mut r = ClientRequest::new(self.target.host.clone(), self.target.path.clone());
        r.headers.clone_from(&self.headers);
        r.protocols.clone_from(&self.protocols);
        r
    }

    /// Whether the source addresses' local port ranges hold the connections.
    fn check_ports(&self) -> Result<(), BenchError> {
        let (lo, hi) = local_port_range();
        let ports = u64::from(hi.saturating_sub(lo)) + 1;
        let sources = self.source_ips.len().max(1);
        if self.connections as u64 > ports * sources as u64 {
            return Err(BenchError::TooFewPorts {
                connections: self.connections,
                sources,
                ports,
            });
        }
        Ok(())
    }

    /// Checks the settings and that the connections can fit in this process and in the source
    /// addresses' port ranges. Raises the soft open-file limit up to the hard one when needed.
    pub fn check(&self) -> Result<(), BenchError> {
        let invalid = |m: String| Err(BenchError::InvalidConfig(m));
        if self.connections == 0 {
            return invalid("at least one connection is needed".into());
        }
        if self.message.is_none() && self.size < MESSAGE_HEADER {
            return invalid(format!(
                "the message size must be at least {MESSAGE_HEADER} bytes (a sequence number and a timestamp)"
            ));
        }
        if self.message_len() > 64 << 20 {
            return invalid("the message size must be at most 64 MiB".into());
        }
        if self.ramp == Some(0) {
            return invalid("the ramp must be at least 1 connection per second".into());
        }
        match self.load {
            Load::Periodic(d) if d.is_zero() => return invalid("the send period must be above zero".into()),
            Load::Saturate(0) => return invalid("at least one message must be in flight".into()),
            Load::Rate(0) => return invalid("the rate must be at least 1 message per second".into()),
            Load::Saturate(_) if self.expect == Expect::Nothing && self.publishers == 0 => {
                return invalid(
                    "a saturating load sends on each answer: it cannot expect no answer (use a rate or a period)"
                        .into(),
                )
            }
            _ => {}
        }
        if let Some(m) = &self.message {
            if m.text && std::str::from_utf8(&m.bytes).is_err() {
                return invalid("a fixed text message must be UTF-8".into());
            }
        }
        if let Err(why) = self.request().check() {
            return invalid(format!("the upgrade request cannot be sent: {why}"));
        }
        if self.publishers > 0 {
            if self.publishers > self.connections {
                return invalid(format!(
                    "{} publishers need at least as many connections (there are {})",
                    self.publishers, self.connections
                ));
            }
            if self.publishers > MAX_PUBLISHERS {
                return invalid(format!("at most {MAX_PUBLISHERS} publishers"));
            }
            if self.load == Load::Idle {
                return invalid("publishers need a load: a rate, a period or a number in flight".into());
            }
            if self.message.is_some() {
                return invalid(
                    "a fan-out run sends its own messages (publisher, sequence number, time): no fixed message".into(),
                );
            }
            if self.expect != Expect::Echo {
                return invalid("a fan-out run checks what every receiver gets: leave the expectation at echo".into());
            }
        }
        if self.max_pending == 0 {
            return invalid("max_pending must be at least 1".into());
        }
        if [self.connect_timeout, self.drain_timeout, self.close_timeout]
            .iter()
            .any(|d| d.is_zero())
        {
            return invalid("the connect, drain and close timeouts must be above zero".into());
        }
        if let Some(ip) = self
            .source_ips
            .iter()
            .find(|ip| ip.is_ipv4() != self.target.addr.is_ipv4())
        {
            return invalid(format!(
                "source address {ip} and target {} are of different IP versions",
                self.target.addr
            ));
        }
        self.check_ports()?;
        check_fd_limit(self.connections).map(|_| ())
    }
}

/// Makes sure this process may open `connections` sockets plus `FD_RESERVE`: raises the soft
/// limit toward the hard one if needed. Returns the limit.
pub(crate) fn check_fd_limit(connections: usize) -> Result<u64, BenchError> {
    let needed = connections as u64 + FD_RESERVE;
    let mut limit = crate::io::sys::fd_limit();
    if limit < needed {
        limit = crate::io::sys::raise_fd_limit();
    }
    if limit < needed {
        return Err(BenchError::TooFewDescriptors {
            connections,
            needed,
            limit,
        });
    }
    Ok(limit)
}

fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo <= hi)
        .unwrap_or((32768, 60999))
}

/// The phase a run is in, in their order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Opening connections.
    Connect,
    /// Applying the load.
    Measure,
    /// Waiting for the last echoes.
    Drain,
    /// Closing every connection.
    Close,
}

/// A snapshot for the live progress line, taken once a second.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Progress {
    /// Time since the run started.
    pub elapsed: Duration,
    /// The current phase.
    pub phase: Phase,
    /// Connections open now.
    pub open: usize,
    /// Connections asked for.
    pub target: usize,
    /// Connect and handshake failures so far.
    pub failed: u64,
    /// Echoes received per second over the last interval.
    pub msgs_per_sec: f64,
    /// The 99th percentile round trip so far.
    pub p99: Option<Duration>,
    /// Load generator processes these figures sum (1 for one run; see [`split`]).
    pub processes: usize,
}

impl Progress {
    /// The figures of the parts of one split run as one: counts and rates summed, the phase
    /// the furthest behind, the highest p99 and the longest time. `None` for no parts.
    pub fn merge(parts: &[Progress]) -> Option<Progress> {
        let (first, rest) = parts.split_first()?;
        let mut m = *first;
        for p in rest {
            m.elapsed = m.elapsed.max(p.elapsed);
            m.phase = m.phase.min(p.phase);
            m.open += p.open;
            m.target += p.target;
            m.failed += p.failed;
            m.msgs_per_sec += p.msgs_per_sec;
            m.p99 = m.p99.max(p.p99);
            m.processes += p.processes;
        }
        Some(m)
    }

    /// The snapshot as one line of text, to pass it from one process of a run to another;
    /// [`decode`](Self::decode) reads it back. The form may change between versions.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} {}",
            self.elapsed.as_millis() as u64,
            self.phase as u8,
            self.open,
            self.target,
            self.failed,
            self.msgs_per_sec.to_bits(),
            self.p99.map_or(u64::MAX, |d| d.as_nanos() as u64),
            self.processes
        )
    }

    /// Reads a snapshot written by [`encode`](Self::encode); `None` if the text is not one.
    pub fn decode(line: &str) -> Option<Progress> {
        let mut n = [0u64; 8];
        let mut words = line.split(' ');
        for v in n.iter_mut() {
            *v = words.next()?.parse().ok()?;
        }
        let [elapsed, phase, open, target, failed, rate, p99, processes] = n;
        if words.next().is_some() {
            return None;
        }
        Some(Progress {
            elapsed: Duration::from_millis(elapsed),
            phase: [Phase::Connect, Phase::Measure, Phase::Drain, Phase::Close]
                .into_iter()
                .nth(phase as usize)?,
            open: usize::try_from(open).ok()?,
            target: usize::try_from(target).ok()?,
            failed,
            msgs_per_sec: f64::from_bits(rate),
            p99: (p99 != u64::MAX).then(|| Duration::from_nanos(p99)),
            processes: usize::try_from(processes).ok()?,
        })
    }
}

/// Runs a benchmark to the end and reports. `progress` is called once a second.
///
/// Fails only when the run cannot start (bad settings, too few descriptors, no poll); failures
/// of connections and messages are counted in the [`Report`].
pub fn run(cfg: &BenchConfig, mut progress: &mut dyn FnMut(&Progress)) -> Result<Report, BenchError> {
    run_observed(cfg, &mut progress)
}

/// What a run tells as it goes, and where it waits when it is one part of a run split over
/// several processes (see [`split`]).
pub trait Observer {
    /// Called once a second.
    fn progress(&mut self, p: &Progress);

    /// Called just before the run starts `phase` ([`Phase::Connect`], [`Phase::Measure`] and
    /// [`Phase::Close`]); the phase starts when this returns. A part of a split run returns
    /// once every part got there, so that the parts measure together and the server is
    /// measured while all of them hold their connections. The default returns at once.
    fn before(&mut self, phase: Phase) {
        let _ = phase;
    }
}

impl Observer for &mut dyn FnMut(&Progress) {
    fn progress(&mut self, p: &Progress) {
        self(p)
    }
}

/// [`run`] with an [`Observer`].
pub fn run_observed(cfg: &BenchConfig, observer: &mut dyn Observer) -> Result<Report, BenchError> {
    cfg.check()?;
    driver::run(cfg, observer)
}

/// Connections one process can hold: its open-file limit (the soft limit raised to the hard
/// one) less 32 for the loop's own descriptors.
pub fn connections_per_process() -> usize {
    crate::io::sys::raise_fd_limit()
        .saturating_sub(FD_RESERVE)
        .min(usize::MAX as u64) as usize
}

/// Splits a run into parts that each fit in one process: one part (the run itself) when
/// [`connections_per_process`] allows it, else as many parts as needed, with the connections
/// and the ramp shared out evenly. Connection number `n` of the whole run connects from source
/// address `n` modulo their count, whichever part opens it, so every address carries the same
/// number of connections. Only the first part measures the server (over all of its
/// processes) and its figures stand for the run: run the parts at once, with an [`Observer`]
/// that keeps them in step, and [`Report::merge`] their reports.
#[doc(hidden)] // Public only for the `wsloop bench` binary, which forks one process per part.
pub fn split(cfg: &BenchConfig) -> Result<Vec<BenchConfig>, BenchError> {
    split_by(cfg, connections_per_process())
}

fn split_by(cfg: &BenchConfig, per_process: usize) -> Result<Vec<BenchConfig>, BenchError> {
    if cfg.connections <= per_process {
        cfg.check()?;
        return Ok(vec![cfg.clone()]);
    }
    cfg.check_ports()?;
    if cfg.publishers > 0 {
        return Err(BenchError::InvalidConfig(format!(
            "a fan-out run is checked in one process, which may hold {per_process} connections here: \
             use fewer connections or raise the open-file limit"
        )));
    }
    let n = cfg.connections;
    let parts = n.div_ceil(per_process.max(1));
    let mut out = Vec::with_capacity(parts);
    let mut first = 0;
    for i in 0..parts {
        let share = n / parts + usize::from(i < n % parts);
        let mut part = cfg.clone();
        part.connections = share;
        part.ramp = cfg.ramp.map(|r| {
            u32::try_from(u64::from(r) * share as u64 / n as u64)
                .unwrap_or(r)
                .max(1)
        });
        if let Load::Rate(r) = cfg.load {
            part.load = Load::Rate(
                u32::try_from(u64::from(r) * share as u64 / n as u64)
                    .unwrap_or(r)
                    .max(1),
            );
        }
        if !part.source_ips.is_empty() {
            let at = first % part.source_ips.len();
            part.source_ips.rotate_left(at);
        }
        if i > 0 {
            part.server_pid = None;
        }
        part.check()?;
        first += share;
        out.push(part);
    }
    Ok(out)
}

/// This machine's name, from `/proc/sys/kernel/hostname`.
fn host_name() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

/// CPUs online, from `/sys/devices/system/cpu/online` (e.g. `0-1,4`).
fn online_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let n: usize = s
        .trim()
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some(b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1)
        })
        .sum();
    n.max(1)
}

/// TCP sockets in use, TCP buffer bytes, and kernel slab bytes, system-wide.
fn read_kernel() -> Option<KernelUsage> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let field = |name: &str| -> Option<u64> {
        let mut it = tcp.split_whitespace();
        it.find(|w| *w == name)?;
        it.next()?.parse().ok()
    };
    let inuse = field("inuse")?;
    let mem_pages = field("mem")?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("Slab:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(KernelUsage {
        tcp_inuse_before: inuse,
        tcp_mem_before: mem_pages * 4096,
        slab_before: slab_kb * 1024,
        ..KernelUsage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_source_ranges() {
        let t = Target::parse("ws://127.0.0.1:9001/chat?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!((t.host.as_str(), t.path.as_str()), ("127.0.0.1:9001", "/chat?x=1"));
        assert_eq!(Target::parse("127.0.0.1:80").unwrap().path, "/");
        assert_eq!(Target::parse("ws://[::1]:9/").unwrap().addr, "[::1]:9".parse().unwrap());
        assert_eq!(Target::parse("ws://127.0.0.1").unwrap().addr.port(), 80);
        let wss = Target::parse("wss://localhost/x");
        if cfg!(feature = "tls") {
            let t = wss.unwrap();
            assert_eq!((t.addr.port(), t.tls, t.server_name.as_str()), (443, true, "localhost"));
            assert_eq!(t.url(), "wss://localhost/x");
        } else {
            assert!(wss.is_err());
        }
        assert!(Target::parse("http://127.0.0.1/").is_err());
    }

    #[test]
    fn progress_crosses_processes_and_sums() {
        let a = Progress {
            elapsed: Duration::from_millis(2_500),
            phase: Phase::Measure,
            open: 10,
            target: 12,
            failed: 2,
            msgs_per_sec: 100.5,
            p99: Some(Duration::from_micros(900)),
            processes: 1,
        };
        let b = Progress {
            elapsed: Duration::from_millis(2_000),
            phase: Phase::Connect,
            open: 5,
            target: 8,
            failed: 0,
            msgs_per_sec: 0.0,
            p99: None,
            processes: 1,
        };
        for p in [a, b] {
            let back = Progress::decode(&p.encode()).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{p:?}"));
        }
        assert!(Progress::decode("1 9 0 0 0 0 0 1").is_none(), "no phase 9");
        assert!(Progress::decode(&format!("{} 1", a.encode())).is_none());
        let m = Progress::merge(&[a, b]).unwrap();
        assert_eq!((m.open, m.target, m.failed, m.processes), (15, 20, 2, 2));
        assert_eq!((m.phase, m.elapsed, m.p99), (Phase::Connect, a.elapsed, a.p99));
        assert_eq!(m.msgs_per_sec, 100.5);
        assert!(Progress::merge(&[]).is_none());
    }

    #[test]
    fn a_run_too_large_for_one_process_is_split_evenly() {
        let mut cfg = BenchConfig::new(Target::parse("ws://127.0.0.1:9/").unwrap());
        cfg.source_ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        cfg.connections = 100;
        cfg.ramp = Some(1000);
        cfg.server_pid = Some(7);
        assert_eq!(split_by(&cfg, 100).unwrap().len(), 1);
        let parts = split_by(&cfg, 30).unwrap();
        let shares: Vec<usize> = parts.iter().map(|p| p.connections).collect();
        assert_eq!(shares, [25, 25, 25, 25]);
        assert_eq!(parts.iter().filter_map(|p| p.ramp).sum::<u32>(), 1000);
        assert_eq!(parts[0].server_pid, Some(7));
        assert!(parts[1..].iter().all(|p| p.server_pid.is_none()));
        // Connection n of the whole run uses address n mod 3: part 1 starts at connection 25.
        assert_eq!(parts[1].source_ips[0], cfg.source_ips[25 % 3]);
        let mut sources = [0usize; 3];
        for p in &parts {
            for i in 0..p.connections {
                let ip = p.source_ips[i % 3];
                sources[cfg.source_ips.iter().position(|s| *s == ip).unwrap()] += 1;
            }
        }
        assert_eq!(sources, [34, 33, 33]);
        cfg.connections = 10_000_000;
        assert!(matches!(split_by(&cfg, 20_000), Err(BenchError::TooFewPorts { .. })));
    }

    #[test]
    fn errors_describe_settings_not_flags() {
        let mut cfg = BenchConfig::new(Target::parse("ws://127.0.0.1:9/").unwrap());
        for change in [
            (|c: &mut BenchConfig| c.size = 3) as fn(&mut BenchConfig),
            |c| c.connections = 0,
            |c| c.ramp = Some(0),
            |c| c.load = Load::Saturate(0),
            |c| c.load = Load::Periodic(Duration::ZERO),
        ] {
            let mut c = cfg.clone();
            change(&mut c);
            let e = c.check().unwrap_err().to_string();
            assert!(!e.contains("--"), "{e}");
        }
        cfg.connections = 1;
        assert!(cfg.check().is_ok());
    }
}
