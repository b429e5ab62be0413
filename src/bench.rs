//! The load generator behind `wsloop bench`: many client connections on one mio poll loop.
//!
//! It is built straight on the sans-IO core ([`Connection`] and the client side of the
//! handshake), the crate's one timer queue and its outbound queue, not on the single-connection
//! client, so that one process holds as many connections as it has descriptors. A run has four
//! phases, each bounded in time:
//!
//! 1. **connect**: open [`Config::connections`] sockets, at [`Config::ramp`] per second or as fast
//!    as handshakes complete (at most [`Config::max_pending`] at once), each bound to the next of
//!    [`Config::source_ips`] before it connects, and upgrade them. Each gets
//!    [`Config::connect_timeout`] for TCP and the handshake together.
//! 2. **measure**: for [`Config::duration`], apply the [`Load`].
//! 3. **drain**: stop sending; wait up to [`Config::drain_timeout`] for the echoes in flight.
//! 4. **close**: a close handshake on every connection, bounded by [`Config::close_timeout`].
//!
//! Every message is binary and [`Config::size`] bytes long: a sequence number and the send time
//! (nanoseconds since the run started), little-endian, in the first 16 bytes, then a fixed
//! pattern. Each echo is checked for length, order and content, and its round-trip time goes into
//! a histogram. The server under test must echo.

use std::fmt::Write as _;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::outbox::{write_some, Outbox};
use crate::proto::handshake::{new_client_key, parse_response, write_request};
use crate::proto::{close_code, Connection, Event, HeadError, Message, Role};
use crate::timer::{millis, poll_timeout, TimerQueue};

/// Descriptors the load generator keeps for itself (poll, stdio, /proc reads) beyond one per
/// connection.
pub const FD_RESERVE: u64 = 32;

/// Bytes at the start of every message: sequence number, then send time.
pub const MESSAGE_HEADER: usize = 16;

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
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Idle => f.write_str("idle"),
            Load::Periodic(d) => write!(f, "periodic, one message every {}", fmt_duration(*d)),
            Load::Saturate(k) => write!(f, "saturate, {k} in flight per connection"),
        }
    }
}

/// Where to connect: `ws://HOST[:PORT][/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The `Host` header: host and port (the port left out when it is 80).
    pub host: String,
    /// The request target, e.g. `/` or `/echo?x=1`.
    pub path: String,
}

impl Target {
    /// Parses and resolves a `ws://` URL (a bare `HOST:PORT` is accepted too), with the
    /// client's URL parser.
    pub fn parse(url: &str) -> Result<Target, String> {
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("ws://{url}")
        };
        let u = crate::client::WsUrl::parse(&full).map_err(|e| e.to_string())?;
        let addr = (u.host.as_str(), u.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{}': {e}", u.host))?
            .next()
            .ok_or_else(|| format!("'{}' resolves to no address", u.host))?;
        Ok(Target {
            addr,
            host: u.host_header(),
            path: u.resource,
        })
    }

    /// The target as a URL.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.host, self.path)
    }
}

/// Parses source addresses: `127.0.0.2`, `127.0.0.2-127.0.0.60` (an IPv4 range, inclusive),
/// or a comma-separated list of either. At most 65,536 addresses.
pub fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, String> {
    const MAX: usize = 1 << 16;
    let mut ips = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || format!("invalid source address '{item}' (use e.g. 127.0.0.2 or 127.0.0.2-127.0.0.60)");
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || (b - a) as usize >= MAX - ips.len().min(MAX) {
                return Err(format!(
                    "source range '{item}' is empty or too large (at most {MAX} addresses)"
                ));
            }
            ips.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            ips.push(item.parse::<IpAddr>().map_err(|_| bad())?);
        }
        if ips.len() > MAX {
            return Err(format!("too many source addresses (at most {MAX})"));
        }
    }
    if ips.is_empty() {
        return Err(format!("no source address in '{s}'"));
    }
    Ok(ips)
}

/// The source addresses used when none are given and the target is on loopback: 59 addresses,
/// each with its own ephemeral port range.
pub fn default_source_ips(target: &SocketAddr) -> Vec<IpAddr> {
    match target.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => (2..=60).map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))).collect(),
        _ => Vec::new(),
    }
}

/// Settings of one run.
#[derive(Clone, Debug)]
pub struct Config {
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
}

impl Config {
    /// A configuration with the defaults: one idle connection for 30 s, 16-byte messages.
    pub fn new(target: Target) -> Self {
        Config {
            target,
            connections: 1,
            ramp: None,
            load: Load::Idle,
            size: 16,
            duration: Duration::from_secs(30),
            source_ips: Vec::new(),
            server_pid: None,
            connect_timeout: Duration::from_secs(10),
            max_pending: 128,
            drain_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the settings and that the connections can fit in this process and in the source
    /// addresses' port ranges. Raises the soft open-file limit up to the hard one when needed.
    pub fn check(&self) -> io::Result<()> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if self.size < MESSAGE_HEADER {
            return Err(invalid(format!(
                "--size must be at least {MESSAGE_HEADER} bytes (a sequence number and a timestamp)"
            )));
        }
        if self.size > 64 << 20 {
            return Err(invalid("--size must be at most 64 MiB".into()));
        }
        if self.ramp == Some(0) {
            return Err(invalid("--ramp must be at least 1 connection per second".into()));
        }
        match self.load {
            Load::Periodic(d) if d.is_zero() => return Err(invalid("--every must be more than 0".into())),
            Load::Saturate(0) => return Err(invalid("--inflight must be at least 1".into())),
            _ => {}
        }
        if self.max_pending == 0 {
            return Err(invalid("max_pending must be at least 1".into()));
        }
        if let Some(ip) = self
            .source_ips
            .iter()
            .find(|ip| ip.is_ipv4() != self.target.addr.is_ipv4())
        {
            return Err(invalid(format!(
                "source address {ip} and target {} are of different IP versions",
                self.target.addr
            )));
        }
        let (lo, hi) = local_port_range();
        let ports = u64::from(hi.saturating_sub(lo)) + 1;
        let capacity = ports * self.source_ips.len().max(1) as u64;
        if self.connections as u64 > capacity {
            return Err(invalid(format!(
                "{} connections need more local ports than {} source address(es) give ({} ports each, \
                 {lo}-{hi}): add source addresses, e.g. --source-ips 127.0.0.2-127.0.0.60",
                self.connections,
                self.source_ips.len().max(1),
                ports
            )));
        }
        check_fd_limit(self.connections).map(|_| ())
    }
}

/// Makes sure this process may open `connections` sockets plus [`FD_RESERVE`]: raises the soft
/// limit toward the hard one if needed, and otherwise says how many would fit. Returns the limit.
pub fn check_fd_limit(connections: usize) -> io::Result<u64> {
    let need = connections as u64 + FD_RESERVE;
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    let limit = if soft < need {
        rlimit::increase_nofile_limit(need).unwrap_or(soft)
    } else {
        soft
    };
    if limit < need {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{connections} connections need {need} open files (one per connection and {FD_RESERVE} for the loop), \
                 but this process may open only {limit} (open-file limit: soft {soft}, hard {hard}). \
                 Use --connections {} or fewer, or split the load over several bench processes",
                limit.saturating_sub(FD_RESERVE)
            ),
        ));
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

/// The phase a run is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// Round-trip latency percentiles (upper bounds of histogram buckets, under 1 % wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    /// Round trips measured.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// The slowest.
    pub max: Duration,
}

/// What the server process used, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerUsage {
    /// The server's process id.
    pub pid: u32,
    /// Resident memory before the first connection, in bytes.
    pub rss_before: Option<u64>,
    /// Resident memory when every connection was open, in bytes.
    pub rss_connected: Option<u64>,
    /// Resident memory at the end of the measured phase, in bytes.
    pub rss_held: Option<u64>,
    /// CPU time (user + system) the server used during the measured phase.
    pub cpu: Option<Duration>,
}

/// The kernel's view of TCP, system-wide (both ends of loopback connections count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelUsage {
    /// TCP sockets in use before the first connection (`/proc/net/sockstat`).
    pub tcp_inuse_before: u64,
    /// TCP sockets in use at the end of the measured phase.
    pub tcp_inuse_held: u64,
    /// Bytes of TCP buffer memory before (`mem` pages in `/proc/net/sockstat`).
    pub tcp_mem_before: u64,
    /// Bytes of TCP buffer memory at the end of the measured phase.
    pub tcp_mem_held: u64,
    /// Kernel slab memory before, in bytes (`Slab` in `/proc/meminfo`: socket, inode and file
    /// structures live there).
    pub slab_before: u64,
    /// Kernel slab memory at the end of the measured phase.
    pub slab_held: u64,
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// The target URL.
    pub url: String,
    /// Connections asked for.
    pub connections: usize,
    /// The load applied.
    pub load: Load,
    /// Bytes per message.
    pub size: usize,
    /// Connections whose handshake completed.
    pub opened: u64,
    /// Connections open at the end of the measured phase.
    pub held: usize,
    /// Sockets that could not be created, bound or connected, or timed out connecting.
    pub connect_failures: u64,
    /// Connections whose upgrade was refused, invalid or timed out.
    pub handshake_failures: u64,
    /// Open connections that the server closed or that broke before the close phase.
    pub closed_early: u64,
    /// Protocol errors in what the server sent.
    pub protocol_errors: u64,
    /// Connections that did not finish the close handshake in time.
    pub close_timeouts: u64,
    /// Time from the start until every connection was open or had failed.
    pub connect_time: Duration,
    /// Length of the measured phase as it ran.
    pub measured: Duration,
    /// Messages sent.
    pub sent: u64,
    /// Echoes received (corrupted ones included).
    pub received: u64,
    /// Messages never echoed: `sent - received`.
    pub lost: u64,
    /// Echoes with the wrong length, content or sequence number, or sent as text.
    pub corrupted: u64,
    /// Echoes received during the measured phase, per second of it.
    pub msgs_per_sec: f64,
    /// Echoes received during the measured phase.
    pub measured_received: u64,
    /// Round-trip latency of every echo.
    pub latency: Option<Latency>,
    /// The server's memory and CPU time, when its pid was given.
    pub server: Option<ServerUsage>,
    /// System-wide TCP and slab memory.
    pub kernel: Option<KernelUsage>,
    /// The first failure seen, for the summary.
    pub first_error: Option<String>,
    /// CPU cores of this machine (shared by the load generator and a local server).
    pub cores: usize,
}

impl Report {
    /// Whether every connection was held and every message came back intact.
    pub fn is_clean(&self) -> bool {
        self.held == self.connections
            && self.connect_failures == 0
            && self.handshake_failures == 0
            && self.closed_early == 0
            && self.protocol_errors == 0
            && self.lost == 0
            && self.corrupted == 0
    }

    /// Server resident memory per held connection: `(held - before) / held`, in bytes.
    pub fn server_bytes_per_connection(&self) -> Option<f64> {
        let s = self.server?;
        let (before, held) = (s.rss_before?, s.rss_held?);
        (self.held > 0).then(|| (held as f64 - before as f64) / self.held as f64)
    }

    /// Echoes per second of server CPU time during the measured phase.
    pub fn msgs_per_server_cpu_sec(&self) -> Option<f64> {
        let cpu = self.server?.cpu?.as_secs_f64();
        (cpu > 0.0).then(|| self.measured_received as f64 / cpu)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        let mut j = String::with_capacity(1024);
        let _ = write!(
            j,
            "{{\"url\":{},\"connections\":{},\"mode\":\"{}\",",
            json_str(&self.url),
            self.connections,
            match self.load {
                Load::Idle => "idle",
                Load::Periodic(_) => "periodic",
                Load::Saturate(_) => "saturate",
            }
        );
        match self.load {
            Load::Periodic(d) => {
                let _ = write!(j, "\"every_ms\":{},", d.as_millis());
            }
            Load::Saturate(k) => {
                let _ = write!(j, "\"inflight\":{k},");
            }
            Load::Idle => {}
        }
        let _ = write!(
            j,
            "\"size\":{},\"opened\":{},\"held\":{},\"connect_failures\":{},\"handshake_failures\":{},\
             \"closed_early\":{},\"protocol_errors\":{},\"close_timeouts\":{},\"connect_s\":{},\"measured_s\":{},\
             \"sent\":{},\"received\":{},\"lost\":{},\"corrupted\":{},\"measured_received\":{},\"msgs_per_sec\":{},",
            self.size,
            self.opened,
            self.held,
            self.connect_failures,
            self.handshake_failures,
            self.closed_early,
            self.protocol_errors,
            self.close_timeouts,
            json_f64(self.connect_time.as_secs_f64()),
            json_f64(self.measured.as_secs_f64()),
            self.sent,
            self.received,
            self.lost,
            self.corrupted,
            self.measured_received,
            json_f64(self.msgs_per_sec),
        );
        match &self.latency {
            Some(l) => {
                let us = |d: Duration| json_f64(d.as_nanos() as f64 / 1000.0);
                let _ = write!(
                    j,
                    "\"latency_us\":{{\"count\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"p99_9\":{},\"max\":{}}},",
                    l.count,
                    us(l.p50),
                    us(l.p90),
                    us(l.p99),
                    us(l.p999),
                    us(l.max)
                );
            }
            None => j.push_str("\"latency_us\":null,"),
        }
        match &self.server {
            Some(s) => {
                let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
                let _ = write!(
                    j,
                    "\"server\":{{\"pid\":{},\"rss_before\":{},\"rss_connected\":{},\"rss_held\":{},\
                     \"bytes_per_connection\":{},\"cpu_s\":{},\"msgs_per_cpu_s\":{}}},",
                    s.pid,
                    opt(s.rss_before),
                    opt(s.rss_connected),
                    opt(s.rss_held),
                    self.server_bytes_per_connection().map_or("null".to_string(), json_f64),
                    s.cpu.map_or("null".to_string(), |c| json_f64(c.as_secs_f64())),
                    self.msgs_per_server_cpu_sec().map_or("null".to_string(), json_f64),
                );
            }
            None => j.push_str("\"server\":null,"),
        }
        match &self.kernel {
            Some(k) => {
                let _ = write!(
                    j,
                    "\"kernel\":{{\"tcp_inuse_before\":{},\"tcp_inuse_held\":{},\"tcp_mem_before\":{},\
                     \"tcp_mem_held\":{},\"slab_before\":{},\"slab_held\":{}}},",
                    k.tcp_inuse_before, k.tcp_inuse_held, k.tcp_mem_before, k.tcp_mem_held, k.slab_before, k.slab_held
                );
            }
            None => j.push_str("\"kernel\":null,"),
        }
        let _ = write!(
            j,
            "\"first_error\":{},\"cores\":{},\"clean\":{}}}",
            self.first_error.as_deref().map_or("null".to_string(), json_str),
            self.cores,
            self.is_clean()
        );
        j
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "target       {}: {} connection(s), {}, {}-byte messages",
            self.url, self.connections, self.load, self.size
        )?;
        writeln!(
            f,
            "machine      {} core(s), shared by this load generator and a local server",
            self.cores
        )?;
        writeln!(
            f,
            "connections  held {} of {} (opened {} in {}); failed: connect {}, handshake {}; closed early {}; \
             protocol errors {}; close timeouts {}",
            self.held,
            self.connections,
            self.opened,
            fmt_duration(self.connect_time),
            self.connect_failures,
            self.handshake_failures,
            self.closed_early,
            self.protocol_errors,
            self.close_timeouts
        )?;
        writeln!(
            f,
            "messages     sent {}, received {}, lost {}, corrupted {}; {:.0} msgs/s over {}",
            self.sent,
            self.received,
            self.lost,
            self.corrupted,
            self.msgs_per_sec,
            fmt_duration(self.measured)
        )?;
        if let Some(l) = &self.latency {
            writeln!(
                f,
                "latency      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} round trips)",
                fmt_duration(l.p50),
                fmt_duration(l.p90),
                fmt_duration(l.p99),
                fmt_duration(l.p999),
                fmt_duration(l.max),
                l.count
            )?;
        }
        if let Some(s) = &self.server {
            let rss = |v: Option<u64>| v.map_or("?".to_string(), fmt_bytes);
            write!(
                f,
                "server       pid {}: RSS {} before, {} connected, {} held",
                s.pid,
                rss(s.rss_before),
                rss(s.rss_connected),
                rss(s.rss_held)
            )?;
            if let Some(b) = self.server_bytes_per_connection() {
                write!(f, " ({b:.0} bytes per connection)")?;
            }
            if let Some(c) = s.cpu {
                write!(f, "; CPU {:.2} s", c.as_secs_f64())?;
                if let Some(m) = self.msgs_per_server_cpu_sec() {
                    write!(f, " ({m:.0} msgs per CPU-second)")?;
                }
            }
            writeln!(f)?;
        }
        if let Some(k) = &self.kernel {
            let per = |before: u64, held: u64| {
                let socks = k.tcp_inuse_held.saturating_sub(k.tcp_inuse_before);
                if socks == 0 {
                    String::new()
                } else {
                    format!(
                        " ({:.0} bytes per socket)",
                        (held as f64 - before as f64) / socks as f64
                    )
                }
            };
            writeln!(
                f,
                "kernel       TCP sockets {} -> {}; TCP buffers {} -> {}{}; slab {} -> {}{} (system-wide, both ends)",
                k.tcp_inuse_before,
                k.tcp_inuse_held,
                fmt_bytes(k.tcp_mem_before),
                fmt_bytes(k.tcp_mem_held),
                per(k.tcp_mem_before, k.tcp_mem_held),
                fmt_bytes(k.slab_before),
                fmt_bytes(k.slab_held),
                per(k.slab_before, k.slab_held)
            )?;
        }
        if let Some(e) = &self.first_error {
            writeln!(f, "first error  {e}")?;
        }
        Ok(())
    }
}

fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

fn fmt_bytes(b: u64) -> String {
    if b < 10 << 10 {
        format!("{b} B")
    } else if b < 10 << 20 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    }
}

fn json_f64(v: f64) -> String {
    if v.is_finite() {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s.is_empty() || s == "-" {
            "0".into()
        } else {
            s.to_string()
        }
    } else {
        "null".into()
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A log-linear histogram of nanosecond values: exact below 256, then 128 buckets per power of
/// two, so every bucket is under 0.8 % wide. 7,424 counters, 58 KiB.
#[derive(Clone, Debug)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; ((64 - SUB_BITS as usize) + 1) << SUB_BITS],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        let msb = 63 - (v | 1).leading_zeros();
        let shift = msb.saturating_sub(SUB_BITS);
        ((shift as usize) << SUB_BITS) + (v >> shift) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn bucket_high(i: usize) -> u64 {
        let shift = ((i >> SUB_BITS) as u32).saturating_sub(1);
        let low = ((i - ((shift as usize) << SUB_BITS)) as u64) << shift;
        low + ((1u64 << shift) - 1)
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// The value at or below which a fraction `q` of the recorded values lie.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::bucket_high(i).min(self.max));
            }
        }
        Some(self.max)
    }

    fn summary(&self) -> Option<Latency> {
        let ns = |q: f64| Duration::from_nanos(self.quantile(q).unwrap_or(0));
        (self.total > 0).then(|| Latency {
            count: self.total,
            p50: ns(0.5),
            p90: ns(0.9),
            p99: ns(0.99),
            p999: ns(0.999),
            max: Duration::from_nanos(self.max),
        })
    }
}

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// TCP connect in progress.
    Connecting,
    /// Request sent, waiting for the 101.
    Handshaking,
    /// Upgraded.
    Open,
    /// Our close frame is sent, or the server's arrived; waiting for the end of the stream.
    Closing,
}

/// One client connection.
struct Client {
    stream: TcpStream,
    conn: Connection,
    stage: Stage,
    /// The `Sec-WebSocket-Key` while handshaking.
    key: Option<Box<str>>,
    out: Option<Box<Outbox>>,
    gen: u32,
    write_interest: bool,
    /// The deadline (connect) or next send (periodic) this slot's timer entry is for; 0 for none.
    due: u64,
    /// Sequence number of the next message to send.
    next_seq: u64,
    /// Sequence number of the next echo expected.
    expect_seq: u64,
}

// Timer keys that are not connection slots.
const PHASE_KEY: usize = usize::MAX;
const RAMP_KEY: usize = usize::MAX - 1;
const PROGRESS_KEY: usize = usize::MAX - 2;

fn token(key: usize, gen: u32) -> Token {
    Token(((u64::from(gen) << 32) | key as u64) as usize)
}

fn untoken(t: Token) -> (usize, u32) {
    let v = t.0 as u64;
    ((v & 0xffff_ffff) as usize, (v >> 32) as u32)
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    opened: u64,
    connect_failures: u64,
    handshake_failures: u64,
    closed_early: u64,
    protocol_errors: u64,
    close_timeouts: u64,
    sent: u64,
    received: u64,
    corrupted: u64,
    /// Messages in flight on connections that ended before answering them.
    abandoned: u64,
    measured_received: u64,
}

/// The loop's state.
struct Engine<'a> {
    cfg: &'a Config,
    poll: Poll,
    clients: Slab<Client>,
    timers: TimerQueue,
    start: Instant,
    /// Milliseconds since `start`, as of this wakeup.
    now: u64,
    phase: Phase,
    /// Incremented for each phase; a phase timer entry carries the number it was set in.
    phase_no: u32,
    next_gen: u32,
    /// Connections attempted.
    started: usize,
    /// Connections connecting or handshaking now.
    pending: usize,
    /// Connections in [`Stage::Open`] now.
    open: usize,
    ramp_due: u64,
    /// A message template: header space, then the pattern.
    template: Vec<u8>,
    /// Bytes to write to the current connection.
    wbuf: Vec<u8>,
    hist: Histogram,
    c: Counters,
    first_error: Option<String>,
    connect_time: Duration,
    measure_start: u64,
    /// Nanoseconds since `start` when the measured phase ended (`u64::MAX` before).
    measure_end_ns: u64,
    measured: Duration,
    held: usize,
    /// The close phase ran out of time.
    close_expired: bool,
    last_progress: (u64, u64),
    server: Option<ServerUsage>,
    server_cpu_start: Option<Duration>,
    kernel: Option<KernelUsage>,
}

/// Runs a benchmark to the end and reports. `progress` is called once a second.
///
/// Fails only when the run cannot start (bad settings, too few descriptors, no poll); failures
/// of connections and messages are counted in the [`Report`].
pub fn run(cfg: &Config, progress: &mut dyn FnMut(&Progress)) -> io::Result<Report> {
    cfg.check()?;
    let mut template = vec![0u8; cfg.size];
    for (i, b) in template.iter_mut().enumerate().skip(MESSAGE_HEADER) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    let mut e = Engine {
        cfg,
        poll: Poll::new()?,
        clients: Slab::with_capacity(cfg.connections),
        timers: TimerQueue::default(),
        start: Instant::now(),
        now: 0,
        phase: Phase::Connect,
        phase_no: 0,
        next_gen: 1,
        started: 0,
        pending: 0,
        open: 0,
        ramp_due: 0,
        template,
        wbuf: Vec::with_capacity(64 << 10),
        hist: Histogram::new(),
        c: Counters::default(),
        first_error: None,
        connect_time: Duration::ZERO,
        measure_start: 0,
        measure_end_ns: u64::MAX,
        measured: Duration::ZERO,
        held: 0,
        close_expired: false,
        last_progress: (0, 0),
        server: cfg.server_pid.map(|pid| ServerUsage {
            pid,
            rss_before: read_rss(pid),
            ..ServerUsage::default()
        }),
        server_cpu_start: None,
        kernel: read_kernel().map(|(inuse, mem, slab)| KernelUsage {
            tcp_inuse_before: inuse,
            tcp_mem_before: mem,
            slab_before: slab,
            ..KernelUsage::default()
        }),
    };
    e.run(progress)?;
    let lost = e.c.sent.saturating_sub(e.c.received);
    let secs = e.measured.as_secs_f64();
    Ok(Report {
        url: cfg.target.url(),
        connections: cfg.connections,
        load: cfg.load,
        size: cfg.size,
        opened: e.c.opened,
        held: e.held,
        connect_failures: e.c.connect_failures,
        handshake_failures: e.c.handshake_failures,
        closed_early: e.c.closed_early,
        protocol_errors: e.c.protocol_errors,
        close_timeouts: e.c.close_timeouts,
        connect_time: e.connect_time,
        measured: e.measured,
        sent: e.c.sent,
        received: e.c.received,
        lost,
        corrupted: e.c.corrupted,
        msgs_per_sec: if secs > 0.0 {
            e.c.measured_received as f64 / secs
        } else {
            0.0
        },
        measured_received: e.c.measured_received,
        latency: e.hist.summary(),
        server: e.server,
        kernel: e.kernel,
        first_error: e.first_error,
        cores: online_cpus(),
    })
}

impl Engine<'_> {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    fn run(&mut self, progress: &mut dyn FnMut(&Progress)) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut rbuf = vec![0u8; 256 << 10];
        self.timers.push(1000, PROGRESS_KEY, 0);
        self.open_more();
        self.advance();
        while !(self.phase == Phase::Close && (self.clients.is_empty() || self.close_expired)) {
            self.now = millis(self.start.elapsed());
            match self.poll.poll(&mut events, poll_timeout(self.now, self.timers.next())) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.now = millis(self.start.elapsed());
            for ev in events.iter() {
                let (key, gen) = untoken(ev.token());
                if self.clients.get(key).is_none_or(|c| c.gen != gen) {
                    continue; // a stale event for a slot since reused
                }
                if self.clients[key].stage == Stage::Connecting {
                    self.on_connect(key);
                    continue;
                }
                if ev.is_writable() {
                    self.on_writable(key);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(key, &mut rbuf);
                }
            }
            self.fire_timers(progress);
            self.advance();
        }
        // Whatever is left did not close in time.
        self.c.close_timeouts += self.clients.len() as u64;
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.remove(key);
        }
        Ok(())
    }

    fn note_error(&mut self, what: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    /// Opens as many connections as the ramp and the pending limit allow.
    fn open_more(&mut self) {
        if self.phase != Phase::Connect {
            return;
        }
        let n = self.cfg.connections;
        let allowed = match self.cfg.ramp {
            Some(r) => ((self.now.saturating_mul(u64::from(r)) / 1000) as usize)
                .saturating_add(1)
                .min(n),
            None => n,
        };
        while self.started < allowed && self.pending < self.cfg.max_pending {
            self.open_one();
        }
        if let Some(r) = self.cfg.ramp {
            if self.started < n && self.started >= allowed && self.ramp_due == 0 {
                // When the next connection is allowed: started * 1000 / r, rounded up.
                let when = (self.started as u64 * 1000).div_ceil(u64::from(r)).max(self.now + 1);
                self.ramp_due = when;
                self.timers.push(when, RAMP_KEY, 0);
            }
        }
    }

    fn open_one(&mut self) {
        let i = self.started;
        self.started += 1;
        let src = (!self.cfg.source_ips.is_empty()).then(|| self.cfg.source_ips[i % self.cfg.source_ips.len()]);
        let mut stream = match connect(self.cfg.target.addr, src) {
            Ok(s) => s,
            Err(e) => {
                self.c.connect_failures += 1;
                self.note_error(|| format!("connect from {}: {e}", src.map_or("any".into(), |s| s.to_string())));
                return;
            }
        };
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let entry = self.clients.vacant_entry();
        let key = entry.key();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, token(key, gen), Interest::READABLE | Interest::WRITABLE)
        {
            self.c.connect_failures += 1;
            self.note_error(|| format!("register: {e}"));
            return;
        }
        let due = self.now + millis(self.cfg.connect_timeout);
        entry.insert(Client {
            stream,
            conn: Connection::new(Role::Client),
            stage: Stage::Connecting,
            key: None,
            out: None,
            gen,
            write_interest: true,
            due,
            next_seq: 0,
            expect_seq: 0,
        });
        self.timers.push(due, key, gen);
        self.pending += 1;
    }

    /// A connecting socket became writable (or failed): send the upgrade request.
    fn on_connect(&mut self, key: usize) {
        let client = &mut self.clients[key];
        let err = match client.stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match client.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // not yet
                Err(e) => Some(e),
            },
        };
        if let Some(e) = err {
            self.c.connect_failures += 1;
            self.note_error(|| format!("connect: {e}"));
            self.end_pending(key);
            return;
        }
        let key_str = match new_client_key() {
            Ok(k) => k,
            Err(e) => {
                self.c.handshake_failures += 1;
                self.note_error(|| format!("no random key: {e}"));
                self.end_pending(key);
                return;
            }
        };
        self.wbuf.clear();
        write_request(
            &mut self.wbuf,
            &self.cfg.target.host,
            &self.cfg.target.path,
            &key_str,
            &[],
            &[],
        );
        let client = &mut self.clients[key];
        client.key = Some(key_str.into_boxed_str());
        client.stage = Stage::Handshaking;
        self.flush_wbuf(key);
    }

    /// Ends a connection that never opened, and lets the next one start.
    fn end_pending(&mut self, key: usize) {
        self.pending -= 1;
        self.remove(key);
        self.open_more();
    }

    fn remove(&mut self, key: usize) {
        let mut client = self.clients.remove(key);
        if client.stage == Stage::Open {
            self.open -= 1;
        }
        self.c.abandoned += client.next_seq - client.expect_seq;
        let _ = self.poll.registry().deregister(&mut client.stream);
    }

    /// Writes `wbuf` to the connection now, queueing what the kernel does not take.
    fn flush_wbuf(&mut self, key: usize) {
        if self.wbuf.is_empty() {
            return;
        }
        let client = &mut self.clients[key];
        let mut done = 0;
        if client.out.is_none() {
            match write_some(&mut client.stream, &self.wbuf) {
                Ok(n) => done = n,
                Err(e) => {
                    self.wbuf.clear();
                    self.on_broken(key, &e);
                    return;
                }
            }
        }
        if done < self.wbuf.len() {
            client
                .out
                .get_or_insert_with(Default::default)
                .push_slice(&self.wbuf[done..]);
        }
        self.wbuf.clear();
        self.update_interest(key);
    }

    fn update_interest(&mut self, key: usize) {
        let client = &mut self.clients[key];
        let want = client.out.is_some();
        if want == client.write_interest {
            return;
        }
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if self
            .poll
            .registry()
            .reregister(&mut client.stream, token(key, client.gen), interest)
            .is_ok()
        {
            client.write_interest = want;
        }
    }

    fn on_writable(&mut self, key: usize) {
        let client = &mut self.clients[key];
        let Some(out) = client.out.as_mut() else {
            self.update_interest(key);
            return;
        };
        match out.write_to(&mut client.stream) {
            Ok(true) => client.out = None,
            Ok(false) => {}
            Err(e) => {
                self.on_broken(key, &e);
                return;
            }
        }
        self.update_interest(key);
    }

    /// The stream ended or failed.
    fn on_broken(&mut self, key: usize, e: &io::Error) {
        match self.clients[key].stage {
            Stage::Connecting => {
                self.c.connect_failures += 1;
                self.note_error(|| format!("connect: {e}"));
                self.end_pending(key);
            }
            Stage::Handshaking => {
                self.c.handshake_failures += 1;
                self.note_error(|| format!("handshake: {e}"));
                self.end_pending(key);
            }
            Stage::Open => {
                self.c.closed_early += 1;
                self.note_error(|| format!("connection lost: {e}"));
                self.remove(key);
            }
            Stage::Closing => self.remove(key),
        }
    }

    fn on_readable(&mut self, key: usize, rbuf: &mut [u8]) {
        // Bounded: each read either fills `rbuf` from the socket or ends the loop.
        loop {
            let Some(client) = self.clients.get_mut(key) else {
                return;
            };
            let n = match client.stream.read(rbuf) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection");
                    self.on_broken(key, &e);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.on_broken(key, &e);
                    return;
                }
            };
            let mut data = &mut rbuf[..n];
            if client.stage == Stage::Handshaking {
                let k = client.key.as_deref().unwrap_or("");
                match client.conn.read_head(data, 8 << 10, |b| parse_response(b, k, &[])) {
                    Ok(None) => continue,
                    Ok(Some((_, used))) => {
                        client.conn.set_open();
                        client.stage = Stage::Open;
                        client.key = None;
                        client.due = 0;
                        self.pending -= 1;
                        self.open += 1;
                        self.c.opened += 1;
                        self.open_more();
                        data = &mut data[used..];
                        if data.is_empty() {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.c.handshake_failures += 1;
                        self.note_error(|| match e {
                            HeadError::TooLarge => "handshake: response head over 8 KiB".to_string(),
                            HeadError::Invalid(e) => format!("handshake: {e}"),
                        });
                        self.end_pending(key);
                        return;
                    }
                }
            }
            self.receive(key, data);
        }
    }

    /// Feeds WebSocket bytes to a connection, checks the echoes, and sends what follows.
    fn receive(&mut self, key: usize, data: &mut [u8]) {
        let now_ns = self.now_ns();
        let in_window = now_ns < self.measure_end_ns;
        let size = self.cfg.size;
        let Engine {
            clients,
            wbuf,
            hist,
            c,
            template,
            ..
        } = self;
        let Some(client) = clients.get_mut(key) else { return };
        if client.stage == Stage::Connecting || client.stage == Stage::Handshaking {
            return;
        }
        let expect = &mut client.expect_seq;
        let mut echoes = 0u32;
        let mut server_closed = false;
        wbuf.clear();
        let result = client
            .conn
            .receive(data, size.max(4096) * 2, wbuf, &mut |ev, _| match ev {
                Event::Message(Message::Binary(b)) => {
                    echoes += 1;
                    c.received += 1;
                    if in_window {
                        c.measured_received += 1;
                    }
                    match check_echo(b, expect, template) {
                        Some(ts) => hist.record(now_ns.saturating_sub(ts)),
                        None => c.corrupted += 1,
                    }
                }
                Event::Message(Message::Text(_)) => {
                    echoes += 1;
                    c.received += 1;
                    c.corrupted += 1;
                }
                Event::Close { .. } => server_closed = true,
                Event::Ping(_) | Event::Pong(_) => {}
            });
        if let Err(e) = result {
            self.c.protocol_errors += 1;
            self.note_error(|| format!("protocol error from server: {e}"));
            self.flush_wbuf(key);
            if self.clients.contains(key) {
                self.remove(key);
            }
            return;
        }
        if server_closed {
            let client = &mut self.clients[key];
            if client.stage == Stage::Open {
                client.stage = Stage::Closing;
                self.open -= 1;
                if self.phase != Phase::Close {
                    self.c.closed_early += 1;
                    self.note_error(|| "the server closed a connection".to_string());
                }
            }
        } else if echoes > 0 && self.phase == Phase::Measure {
            if let Load::Saturate(_) = self.cfg.load {
                for _ in 0..echoes {
                    self.push_message(key);
                }
            }
        }
        self.flush_wbuf(key);
    }

    /// Appends the connection's next message to `wbuf`.
    fn push_message(&mut self, key: usize) {
        let now_ns = self.now_ns();
        let client = &mut self.clients[key];
        self.template[..8].copy_from_slice(&client.next_seq.to_le_bytes());
        self.template[8..16].copy_from_slice(&now_ns.to_le_bytes());
        if client
            .conn
            .send(Message::Binary(&self.template), &mut self.wbuf)
            .is_ok()
        {
            client.next_seq += 1;
            self.c.sent += 1;
        }
    }

    fn fire_timers(&mut self, progress: &mut dyn FnMut(&Progress)) {
        while let Some((when, key, gen)) = self.timers.pop_due(self.now) {
            match key {
                PHASE_KEY => {
                    if gen == self.phase_no {
                        self.phase_timeout();
                    }
                }
                RAMP_KEY => {
                    if self.ramp_due == when {
                        self.ramp_due = 0;
                        self.open_more();
                    }
                }
                PROGRESS_KEY => {
                    self.report_progress(progress);
                    self.timers.push(when + 1000, PROGRESS_KEY, 0);
                }
                _ => {
                    let Some(client) = self.clients.get_mut(key) else {
                        continue;
                    };
                    if client.gen != gen || client.due != when {
                        continue; // stale entry
                    }
                    client.due = 0;
                    match client.stage {
                        Stage::Connecting => {
                            self.c.connect_failures += 1;
                            self.note_error(|| "connect: timed out".to_string());
                            self.end_pending(key);
                        }
                        Stage::Handshaking => {
                            self.c.handshake_failures += 1;
                            self.note_error(|| "handshake: timed out".to_string());
                            self.end_pending(key);
                        }
                        Stage::Open => self.periodic_send(key, when),
                        Stage::Closing => {}
                    }
                }
            }
        }
    }

    fn periodic_send(&mut self, key: usize, when: u64) {
        let Load::Periodic(every) = self.cfg.load else { return };
        if self.phase != Phase::Measure {
            return;
        }
        self.wbuf.clear();
        self.push_message(key);
        self.flush_wbuf(key);
        if let Some(client) = self.clients.get_mut(key) {
            // Keep the schedule; after a stall, start again from now rather than catch up.
            let next = (when + millis(every).max(1)).max(self.now);
            client.due = next;
            let gen = client.gen;
            self.timers.push(next, key, gen);
        }
    }

    fn report_progress(&mut self, progress: &mut dyn FnMut(&Progress)) {
        let (t, r) = self.last_progress;
        let dt = self.now.saturating_sub(t).max(1) as f64 / 1000.0;
        let rate = self.c.received.saturating_sub(r) as f64 / dt;
        self.last_progress = (self.now, self.c.received);
        progress(&Progress {
            elapsed: Duration::from_millis(self.now),
            phase: self.phase,
            open: self.open,
            target: self.cfg.connections,
            failed: self.c.connect_failures + self.c.handshake_failures,
            msgs_per_sec: rate,
            p99: self.hist.quantile(0.99).map(Duration::from_nanos),
        });
    }

    fn set_phase(&mut self, phase: Phase, timeout: Duration) {
        self.phase = phase;
        self.phase_no += 1;
        self.timers.push(self.now + millis(timeout), PHASE_KEY, self.phase_no);
    }

    /// Moves to the next phase when the current one is done.
    fn advance(&mut self) {
        if self.phase == Phase::Connect && self.started == self.cfg.connections && self.pending == 0 {
            self.begin_measure();
        }
        if self.phase == Phase::Measure && self.open == 0 {
            self.begin_drain(); // nothing left to measure: every connection failed or was closed
        }
        if self.phase == Phase::Drain && self.c.received + self.c.abandoned >= self.c.sent {
            self.begin_close();
        }
    }

    fn phase_timeout(&mut self) {
        match self.phase {
            Phase::Connect => {}
            Phase::Measure => self.begin_drain(),
            Phase::Drain => self.begin_close(),
            Phase::Close => self.close_expired = true,
        }
    }

    fn begin_measure(&mut self) {
        self.connect_time = Duration::from_millis(self.now);
        if let Some(s) = &mut self.server {
            s.rss_connected = read_rss(s.pid);
            self.server_cpu_start = read_cpu(s.pid);
        }
        self.measure_start = self.now;
        self.set_phase(Phase::Measure, self.cfg.duration);
        let keys: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.stage == Stage::Open)
            .map(|(k, _)| k)
            .collect();
        match self.cfg.load {
            Load::Idle => {}
            Load::Saturate(k) => {
                for key in keys {
                    self.wbuf.clear();
                    for _ in 0..k {
                        self.push_message(key);
                    }
                    self.flush_wbuf(key);
                }
            }
            Load::Periodic(every) => {
                // Spread the first sends evenly over one period.
                let n = keys.len().max(1) as u64;
                let every = millis(every).max(1);
                for (i, key) in keys.into_iter().enumerate() {
                    let when = self.now + every * i as u64 / n;
                    let client = &mut self.clients[key];
                    client.due = when;
                    let gen = client.gen;
                    self.timers.push(when, key, gen);
                }
            }
        }
    }

    fn begin_drain(&mut self) {
        self.measure_end_ns = self.now_ns();
        self.measured = Duration::from_millis(self.now - self.measure_start);
        self.held = self.open;
        if let Some(s) = &mut self.server {
            s.rss_held = read_rss(s.pid);
            if let (Some(a), Some(b)) = (self.server_cpu_start, read_cpu(s.pid)) {
                s.cpu = Some(b.saturating_sub(a));
            }
        }
        if let (Some(k), Some((inuse, mem, slab))) = (&mut self.kernel, read_kernel()) {
            k.tcp_inuse_held = inuse;
            k.tcp_mem_held = mem;
            k.slab_held = slab;
        }
        self.set_phase(Phase::Drain, self.cfg.drain_timeout);
    }

    fn begin_close(&mut self) {
        self.set_phase(Phase::Close, self.cfg.close_timeout);
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            let client = &mut self.clients[key];
            match client.stage {
                Stage::Open => {
                    self.wbuf.clear();
                    let _ = client.conn.close(close_code::NORMAL, "", &mut self.wbuf);
                    client.stage = Stage::Closing;
                    self.open -= 1;
                    self.flush_wbuf(key);
                }
                Stage::Closing => {}
                Stage::Connecting | Stage::Handshaking => {
                    self.pending -= 1;
                    self.remove(key);
                }
            }
        }
    }
}

/// Checks an echo against the next expected sequence number and the pattern; returns its send
/// time. A wrong sequence number resynchronises on it, so one reordering counts once.
fn check_echo(b: &[u8], expect: &mut u64, template: &[u8]) -> Option<u64> {
    if b.len() != template.len() {
        return None;
    }
    let seq = u64::from_le_bytes(b[..8].try_into().ok()?);
    let ts = u64::from_le_bytes(b[8..16].try_into().ok()?);
    if seq != *expect {
        *expect = (*expect).max(seq.saturating_add(1));
        return None;
    }
    *expect += 1;
    (b[MESSAGE_HEADER..] == template[MESSAGE_HEADER..]).then_some(ts)
}

/// Starts a non-blocking connect from `src` (port chosen by the kernel).
fn connect(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// CPUs online, from `/sys/devices/system/cpu/online` (e.g. `0-1,4`). Cheaper in code than
/// `std::thread::available_parallelism`, which parses cgroup quotas.
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

/// `VmRSS` of a process, in bytes.
pub fn read_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub fn read_cpu(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')' come field 3 (state) onward; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture (it is part of the ABI, unlike HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

/// TCP sockets in use, TCP buffer bytes, and kernel slab bytes, system-wide.
fn read_kernel() -> Option<(u64, u64, u64)> {
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
    Some((inuse, mem_pages * 4096, slab_kb * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_narrow() {
        let mut prev_high = None;
        for i in 0..Histogram::new().counts.len() - 1 {
            let high = Histogram::bucket_high(i);
            if let Some(p) = prev_high {
                assert!(high > p, "bucket {i}");
            }
            assert_eq!(Histogram::index(high), i, "bucket {i} high {high}");
            assert_eq!(Histogram::index(high + 1), i + 1, "bucket {i}");
            prev_high = Some(high);
        }
        for v in [0u64, 1, 255, 256, 1000, 123_456, 10_000_000_000, u64::MAX] {
            let high = Histogram::bucket_high(Histogram::index(v));
            assert!(
                high >= v && (high - v) as f64 <= v as f64 / 127.0 + 1.0,
                "{v} -> {high}"
            );
        }
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((500_000..=504_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((990_000..=998_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Some(1_000_000));
        assert_eq!(h.summary().unwrap().max, Duration::from_micros(1000));
    }

    #[test]
    fn echoes_are_checked_for_order_and_content() {
        let mut t = vec![0u8; 32];
        for (i, b) in t.iter_mut().enumerate().skip(MESSAGE_HEADER) {
            *b = i as u8;
        }
        let msg = |seq: u64, ts: u64| {
            let mut m = t.clone();
            m[..8].copy_from_slice(&seq.to_le_bytes());
            m[8..16].copy_from_slice(&ts.to_le_bytes());
            m
        };
        let mut expect = 0;
        assert_eq!(check_echo(&msg(0, 77), &mut expect, &t), Some(77));
        assert_eq!(check_echo(&msg(2, 5), &mut expect, &t), None, "skipped 1");
        assert_eq!(expect, 3);
        assert_eq!(check_echo(&msg(3, 5), &mut expect, &t), Some(5));
        let mut bad = msg(4, 5);
        bad[20] ^= 1;
        assert_eq!(check_echo(&bad, &mut expect, &t), None, "payload changed");
        assert_eq!(check_echo(&msg(5, 5)[..31], &mut expect, &t), None, "short");
    }

    #[test]
    fn urls_and_source_ranges() {
        let t = Target::parse("ws://127.0.0.1:9001/chat?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!((t.host.as_str(), t.path.as_str()), ("127.0.0.1:9001", "/chat?x=1"));
        assert_eq!(Target::parse("127.0.0.1:80").unwrap().path, "/");
        assert_eq!(Target::parse("ws://[::1]:9/").unwrap().addr, "[::1]:9".parse().unwrap());
        assert_eq!(Target::parse("ws://127.0.0.1").unwrap().addr.port(), 80);
        assert!(Target::parse("wss://127.0.0.1/").is_err());
        assert!(Target::parse("http://127.0.0.1/").is_err());
        let ips = parse_source_ips("127.0.0.2-127.0.0.60").unwrap();
        assert_eq!(ips.len(), 59);
        assert_eq!(ips[58], "127.0.0.60".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_ips("127.0.0.2, 127.0.0.9").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("10.0.0.0-10.255.255.255").is_err());
        assert!(parse_source_ips("nope").is_err());
    }

    /// The whole loop against the crate's own echo server: every load, every echo checked.
    #[test]
    fn runs_clean_against_the_echo_server() {
        let server = crate::server::Server::bind("127.0.0.1:0", crate::server::Config::default()).unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let thread = std::thread::spawn(move || server.run(crate::server::Echo));
        let target = Target::parse(&format!("ws://{addr}/")).unwrap();
        for (load, size) in [
            (Load::Saturate(4), 16),
            (Load::Saturate(1), 100_000),
            (Load::Periodic(Duration::from_millis(20)), 40),
            (Load::Idle, 16),
        ] {
            let mut cfg = Config::new(target.clone());
            cfg.connections = 20;
            cfg.load = load;
            cfg.size = size;
            cfg.duration = Duration::from_millis(300);
            cfg.server_pid = Some(std::process::id());
            let mut calls = 0;
            let r = run(&cfg, &mut |_| calls += 1).unwrap();
            assert!(r.is_clean(), "{load:?}: {r}");
            assert_eq!((r.held, r.opened), (20, 20), "{load:?}");
            if load != Load::Idle {
                assert!(r.received > 0 && r.received == r.sent, "{load:?}: {r}");
                assert!(r.latency.is_some());
            }
            assert!(r.server.and_then(|s| s.rss_held).is_some());
            assert!(r.to_json().contains("\"clean\":true"));
        }
        handle.shutdown().unwrap();
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn json_is_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
        assert_eq!(json_f64(2.5), "2.5");
        assert_eq!(json_f64(3.0), "3");
        assert_eq!(json_f64(f64::NAN), "null");
    }
}
