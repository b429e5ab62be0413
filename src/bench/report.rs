//! The outcome of a run: counters, latency, the server's and the kernel's memory, as text (the
//! JSON form is in `json.rs`).

use std::fmt;
use std::time::Duration;

use super::histogram::{Histogram, Latency};
use super::timeline::{self, Sample};
use super::{Content, Expect, Load};

/// What the server used, from `/proc/PID/status` and `/proc/PID/stat`: the process given and
/// its child processes (the workers of `wsloop serve --processes N`), summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Server processes at the end of the measured phase: the one given and its children.
    pub processes: u32,
    /// Fewest descriptors open in one process that serves connections (each child when there
    /// are children, else the process itself) at the end of the measured phase: how evenly
    /// the connections were spread.
    pub descriptors_min: Option<u64>,
    /// Most descriptors open in one such process.
    pub descriptors_max: Option<u64>,
}

/// The kernel's view of TCP, system-wide (both ends of loopback connections count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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

impl KernelUsage {
    /// Slab bytes per socket opened, when the reading means something: sockets were opened and
    /// slab memory grew by at least 1 KiB per socket (a loopback connection's two sockets
    /// take about 10 KiB). Other activity on a busy machine can shrink or swamp the growth.
    pub fn slab_per_socket(&self) -> Option<f64> {
        let socks = self.tcp_inuse_held.saturating_sub(self.tcp_inuse_before);
        let grew = self.slab_held.saturating_sub(self.slab_before);
        (socks >= 100 && grew >= socks * 1024).then(|| grew as f64 / socks as f64)
    }
}

/// permessage-deflate in a run where the connections offered it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Compression {
    /// Connections whose handshake agreed on it.
    pub agreed: u64,
    /// Payload bytes of the messages sent compressed, before compression.
    pub sent_raw: u64,
    /// The same messages' payload bytes on the wire.
    pub sent_wire: u64,
    /// Compressed payload bytes received (the server's compressed echoes).
    pub received_wire: u64,
    /// What they inflated to.
    pub received_raw: u64,
}

impl Compression {
    /// Wire bytes per payload byte of what was sent compressed.
    pub fn sent_ratio(&self) -> Option<f64> {
        (self.sent_raw > 0).then(|| self.sent_wire as f64 / self.sent_raw as f64)
    }

    /// Wire bytes per payload byte of what was received compressed.
    pub fn received_ratio(&self) -> Option<f64> {
        (self.received_raw > 0).then(|| self.received_wire as f64 / self.received_raw as f64)
    }
}

/// The open model's figures (a [`Load::Rate`] run).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Schedule {
    /// Messages per second asked for.
    pub asked: u32,
    /// Messages sent per second of the measured phase.
    pub achieved: f64,
    /// How late each message was handed to its connection, after its scheduled time.
    pub lag: Option<Latency>,
    /// Messages due when no connection was open to take them.
    pub unsent: u64,
}

/// A fan-out run's figures (see [`BenchConfig::publishers`](super::BenchConfig::publishers)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fanout {
    /// Connections that published.
    pub publishers: u64,
    /// Messages published (the run's `sent`).
    pub published: u64,
    /// Receivers that should have got each message: every connection, less the publisher
    /// itself when the server does not send a message back to its sender.
    pub expected: u64,
    /// Messages a receiver never got, summed over the receivers.
    pub missing: u64,
    /// Messages a receiver got more than once.
    pub duplicated: u64,
    /// Messages a receiver got after a later message of the same publisher.
    pub reordered: u64,
    /// Receivers that missed at least one message.
    pub receivers_missing: u64,
    /// The most messages one receiver missed.
    pub most_missing: u64,
    /// Messages that carried no publisher header (the server's own, e.g. join notices).
    pub other: u64,
}

/// The outcome of a run.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// The target URL.
    pub url: String,
    /// Connections asked for.
    pub connections: usize,
    /// The load applied.
    pub load: Load,
    /// Bytes per message.
    pub size: usize,
    /// What the messages carried.
    pub content: Content,
    /// permessage-deflate, when the connections offered it.
    pub deflate: Option<Compression>,
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
    /// Load generator processes whose reports were merged into this one (1 for one run).
    pub processes: usize,
    /// The load generator's host name (the first one's, for merged runs).
    pub host: Option<String>,
    /// The run second by second, from the start of the connect phase to the end of the run.
    pub timeline: Vec<Sample>,
    /// Every round trip, for merging reports exactly.
    pub(crate) hist: Box<Histogram>,
    /// The run was cut short through [`BenchConfig::stop`](super::BenchConfig::stop).
    pub interrupted: bool,
    /// What the server was expected to answer.
    pub expect: Expect,
    /// The open model's figures, for a [`Load::Rate`] run.
    pub schedule: Option<Schedule>,
    /// How late every message of a [`Load::Rate`] run was sent, for merging exactly.
    pub(crate) lag_hist: Box<Histogram>,
    /// A fan-out run's figures; then `received` counts deliveries and `latency` is from
    /// publish to each receiver.
    pub fanout: Option<Fanout>,
    /// Refused handshakes by HTTP status, in order of status.
    pub handshake_statuses: Vec<(u16, u64)>,
    /// Connections the server closed before the close phase, by close code, in order of code:
    /// 1005 for a close frame without a code, 1006 for a connection dropped without one.
    pub close_codes: Vec<(u16, u64)>,
}

/// Adds `n` to `code`'s count in a list kept in order of code.
pub(crate) fn count_code(list: &mut Vec<(u16, u64)>, code: u16, n: u64) {
    match list.binary_search_by_key(&code, |&(c, _)| c) {
        Ok(i) => list[i].1 += n,
        Err(i) => list.insert(i, (code, n)),
    }
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
            && self.deflate.is_none_or(|d| d.agreed == self.opened)
            && self.schedule.is_none_or(|s| s.unsent == 0)
            && self
                .fanout
                .is_none_or(|f| f.missing == 0 && f.duplicated == 0 && f.reordered == 0)
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

    /// Merges the reports of the parts of one run (see [`split`](super::split)), or of runs
    /// made at once from several machines against one server: counters and round-trip
    /// histograms are summed (the percentiles are those of every round trip, never an average
    /// of percentiles), the timelines second by second, the connect and measured times are
    /// the longest, and the server's and the kernel's figures are the first part's that has
    /// them (it measures for all). `None` for no parts.
    pub fn merge(parts: &[Report]) -> Option<Report> {
        let (first, rest) = parts.split_first()?;
        let mut m = first.clone();
        for p in rest {
            m.connections += p.connections;
            m.opened += p.opened;
            m.held += p.held;
            m.connect_failures += p.connect_failures;
            m.handshake_failures += p.handshake_failures;
            m.closed_early += p.closed_early;
            m.protocol_errors += p.protocol_errors;
            m.close_timeouts += p.close_timeouts;
            m.connect_time = m.connect_time.max(p.connect_time);
            m.measured = m.measured.max(p.measured);
            m.sent += p.sent;
            m.received += p.received;
            m.lost += p.lost;
            m.corrupted += p.corrupted;
            m.msgs_per_sec += p.msgs_per_sec;
            m.measured_received += p.measured_received;
            m.hist.merge(&p.hist);
            timeline::merge(&mut m.timeline, &p.timeline);
            m.host = m.host.take().or_else(|| p.host.clone());
            m.server = m.server.or(p.server);
            m.kernel = m.kernel.or(p.kernel);
            m.first_error = m.first_error.take().or_else(|| p.first_error.clone());
            m.processes += p.processes;
            m.interrupted |= p.interrupted;
            m.lag_hist.merge(&p.lag_hist);
            if let (Some(a), Some(b)) = (m.schedule.as_mut(), p.schedule) {
                a.asked += b.asked;
                a.achieved += b.achieved;
                a.unsent += b.unsent;
            }
            for &(c, n) in &p.handshake_statuses {
                count_code(&mut m.handshake_statuses, c, n);
            }
            for &(c, n) in &p.close_codes {
                count_code(&mut m.close_codes, c, n);
            }
            if let (Some(a), Some(b)) = (m.deflate.as_mut(), p.deflate) {
                a.agreed += b.agreed;
                a.sent_raw += b.sent_raw;
                a.sent_wire += b.sent_wire;
                a.received_wire += b.received_wire;
                a.received_raw += b.received_raw;
            }
        }
        m.latency = m.hist.summary();
        if let Some(s) = m.schedule.as_mut() {
            s.lag = m.lag_hist.summary();
        }
        Some(m)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "target       {}: {} connection(s), {}, {}-byte {} messages",
            self.url,
            self.connections,
            self.load,
            self.size,
            self.content.name()
        )?;
        write!(f, "machine      {} core(s), shared by this load generator", self.cores)?;
        if self.processes > 1 {
            write!(f, " ({} processes)", self.processes)?;
        }
        writeln!(f, " and a local server")?;
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
            "messages     sent {}, received {}, lost {}, corrupted {}; {} msgs/s over {}",
            self.sent,
            self.received,
            self.lost,
            self.corrupted,
            Fixed(self.msgs_per_sec, 0),
            fmt_duration(self.measured)
        )?;
        if let Some(d) = &self.deflate {
            // No ratio prints as "-" (Fixed's text for a value that is not finite).
            let ratio = |r: Option<f64>| Fixed(r.unwrap_or(f64::NAN), 3);
            writeln!(
                f,
                "deflate      agreed on {} of {} connection(s); sent {} as {} (ratio {}); received {} inflated to {} (ratio {})",
                d.agreed,
                self.opened,
                fmt_bytes(d.sent_raw),
                fmt_bytes(d.sent_wire),
                ratio(d.sent_ratio()),
                fmt_bytes(d.received_wire),
                fmt_bytes(d.received_raw),
                ratio(d.received_ratio()),
            )?;
        }
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
            write!(f, "server       pid {}", s.pid)?;
            if s.processes > 1 {
                write!(f, " and {} child processes, summed", s.processes - 1)?;
            }
            write!(
                f,
                ": RSS {} before, {} connected, {} held",
                rss(s.rss_before),
                rss(s.rss_connected),
                rss(s.rss_held)
            )?;
            if let Some(b) = self.server_bytes_per_connection() {
                write!(f, " ({} bytes per connection)", Fixed(b, 0))?;
            }
            if let Some(c) = s.cpu {
                write!(f, "; CPU {} s", Fixed(c.as_secs_f64(), 2))?;
                if let Some(m) = self.msgs_per_server_cpu_sec() {
                    write!(f, " ({} msgs per CPU-second)", Fixed(m, 0))?;
                }
            }
            if let (true, Some(lo), Some(hi)) = (s.processes > 1, s.descriptors_min, s.descriptors_max) {
                write!(f, "; descriptors per child {lo}..{hi}")?;
            }
            writeln!(f)?;
        }
        if let Some(k) = &self.kernel {
            write!(
                f,
                "kernel       TCP sockets {} -> {}; TCP buffers {} -> {}; slab {} -> {}",
                k.tcp_inuse_before,
                k.tcp_inuse_held,
                fmt_bytes(k.tcp_mem_before),
                fmt_bytes(k.tcp_mem_held),
                fmt_bytes(k.slab_before),
                fmt_bytes(k.slab_held),
            )?;
            match k.slab_per_socket() {
                Some(b) => writeln!(f, " ({} bytes of slab per socket; system-wide, both ends)", Fixed(b, 0))?,
                // Other activity on the machine outweighed the sockets: no per-socket figure.
                None => writeln!(f, " (system-wide, both ends; too noisy for a per-socket figure)")?,
            }
        }
        self.fmt_more(f)?;
        if let Some(e) = &self.first_error {
            writeln!(f, "first error  {e}")?;
        }
        if self.interrupted {
            writeln!(f, "interrupted  the run was cut short; the figures cover what ran")?;
        }
        Ok(())
    }
}

impl Report {
    /// The schedule, fan-out and status lines of the text report.
    fn fmt_more(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.schedule {
            write!(
                f,
                "schedule     asked {} msgs/s, sent {} msgs/s",
                s.asked,
                Fixed(s.achieved, 0)
            )?;
            if let Some(l) = &s.lag {
                write!(
                    f,
                    "; behind schedule p50 {}  p99 {}  max {}",
                    fmt_duration(l.p50),
                    fmt_duration(l.p99),
                    fmt_duration(l.max)
                )?;
            }
            if s.unsent > 0 {
                write!(f, "; {} due with no connection open to send them", s.unsent)?;
            }
            writeln!(f, " (latency counts from the scheduled time)")?;
        }
        if let Some(x) = &self.fanout {
            writeln!(
                f,
                "fan-out      {} publisher(s) published {}, {} receivers each; {} deliveries ({}/s); missing {} \
                 ({} receiver(s), at most {} on one), duplicated {}, out of order {}; other messages {}",
                x.publishers,
                x.published,
                x.expected,
                self.received,
                Fixed(self.msgs_per_sec, 0),
                x.missing,
                x.receivers_missing,
                x.most_missing,
                x.duplicated,
                x.reordered,
                x.other
            )?;
        }
        let list = |l: &[(u16, u64)]| {
            let v: Vec<String> = l.iter().map(|(c, n)| format!("{c} x{n}")).collect();
            v.join(", ")
        };
        if !self.handshake_statuses.is_empty() {
            writeln!(f, "refused      by HTTP status: {}", list(&self.handshake_statuses))?;
        }
        if !self.close_codes.is_empty() {
            writeln!(
                f,
                "closed       by the server, by close code: {}",
                list(&self.close_codes)
            )?;
        }
        Ok(())
    }
}

/// `value` with `digits` decimals (at most 9), written with integer arithmetic: the float
/// formatting machinery would add about 9 KB to the binary for a few report lines.
pub(crate) struct Fixed(pub(crate) f64, pub(crate) u32);

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Fixed(v, digits) = *self;
        if !v.is_finite() {
            return f.write_str("-");
        }
        let scale = 10u64.pow(digits.min(9));
        // `as` saturates: a value beyond u64 prints as the largest one, never wraps.
        let n = (v.abs() * scale as f64).round() as u64;
        if v < 0.0 && n != 0 {
            f.write_str("-")?;
        }
        if scale == 1 {
            write!(f, "{n}")
        } else {
            let width = digits.min(9) as usize;
            write!(f, "{}.{:0width$}", n / scale, n % scale)
        }
    }
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{}ns", Fixed(ns, 0))
    } else if ns < 1e6 {
        format!("{}µs", Fixed(ns / 1e3, 1))
    } else if ns < 1e9 {
        format!("{}ms", Fixed(ns / 1e6, 2))
    } else {
        format!("{}s", Fixed(ns / 1e9, 2))
    }
}

pub(crate) fn fmt_bytes(b: u64) -> String {
    if b < 10 << 10 {
        format!("{b} B")
    } else if b < 10 << 20 {
        format!("{} KiB", Fixed(b as f64 / 1024.0, 1))
    } else {
        format!("{} MiB", Fixed(b as f64 / (1 << 20) as f64, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_numbers_round_and_pad() {
        assert_eq!(Fixed(1234.5678, 0).to_string(), "1235");
        assert_eq!(Fixed(1234.5678, 2).to_string(), "1234.57");
        assert_eq!(Fixed(0.05, 3).to_string(), "0.050");
        assert_eq!(Fixed(-2.25, 1).to_string(), "-2.3");
        assert_eq!(Fixed(-0.0001, 2).to_string(), "0.00");
        assert_eq!(Fixed(f64::NAN, 1).to_string(), "-");
        assert_eq!(fmt_duration(Duration::from_micros(1500)), "1.50ms");
        assert_eq!(fmt_bytes(64 << 10), "64.0 KiB");
    }

    #[test]
    fn slab_per_socket_only_when_the_sockets_explain_the_growth() {
        let k = |sockets: u64, slab_before: u64, slab_held: u64| KernelUsage {
            tcp_inuse_before: 10,
            tcp_inuse_held: 10 + sockets,
            slab_before,
            slab_held,
            ..KernelUsage::default()
        };
        // 2,000 sockets, 9.6 MB more slab: 4,800 bytes each.
        assert_eq!(
            k(2000, 100 << 20, (100 << 20) + 9_600_000).slab_per_socket(),
            Some(4800.0)
        );
        // A busy machine freed slab meanwhile: no negative figure.
        assert_eq!(k(2000, 100 << 20, 90 << 20).slab_per_socket(), None);
        // Growth far below what the sockets take: other activity swamped it.
        assert_eq!(k(2000, 100 << 20, (100 << 20) + 100_000).slab_per_socket(), None);
        // Too few sockets for a reading.
        assert_eq!(k(10, 0, 1 << 20).slab_per_socket(), None);
        // Sockets closed rather than opened.
        assert_eq!(
            KernelUsage {
                tcp_inuse_before: 5000,
                tcp_inuse_held: 10,
                slab_before: 0,
                slab_held: 1 << 30,
                ..KernelUsage::default()
            }
            .slab_per_socket(),
            None
        );
    }
}
