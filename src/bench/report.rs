//! The outcome of a run: counters, latency, the server's and the kernel's memory, as text or
//! JSON.

use std::fmt;
use std::time::Duration;

use super::histogram::{Histogram, Latency};
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
#[derive(Clone, Debug)]
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

fn encode_codes(list: &[(u16, u64)]) -> String {
    let v: Vec<String> = list.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    v.join(",")
}

fn decode_codes(s: &str) -> Option<Vec<(u16, u64)>> {
    let mut out = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (c, n) = item.split_once(':')?;
        count_code(&mut out, c.parse().ok()?, n.parse().ok()?);
    }
    Some(out)
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

    /// Merges the reports of the parts of one run (see [`split`](super::split)): counters
    /// and round-trip histograms are summed (the percentiles are those of every round trip),
    /// the connect and measured times are the longest, and the server's and the kernel's
    /// figures are the first part's (it measures for all). `None` for no parts.
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

    /// The report as one line of text, its histogram included, to pass it from one process of
    /// a run to another; [`decode`](Self::decode) reads it back. The form may change between
    /// versions of this crate.
    pub fn encode(&self) -> String {
        let s = self.server.unwrap_or_default();
        let k = self.kernel.unwrap_or_default();
        let d = self.deflate.unwrap_or_default();
        let (load, param) = match self.load {
            Load::Idle => (0, 0),
            Load::Periodic(d) => (1, d.as_nanos() as u64),
            Load::Saturate(k) => (2, u64::from(k)),
            Load::Rate(r) => (3, u64::from(r)),
        };
        let opt = |v: Option<u64>| v.unwrap_or(NONE);
        let nums: [u64; WIRE_NUMBERS] = [
            self.connections as u64,
            load,
            param,
            self.size as u64,
            self.opened,
            self.held as u64,
            self.connect_failures,
            self.handshake_failures,
            self.closed_early,
            self.protocol_errors,
            self.close_timeouts,
            self.connect_time.as_nanos() as u64,
            self.measured.as_nanos() as u64,
            self.sent,
            self.received,
            self.lost,
            self.corrupted,
            self.msgs_per_sec.to_bits(),
            self.measured_received,
            self.cores as u64,
            self.processes as u64,
            u64::from(self.server.is_some()),
            u64::from(s.pid),
            opt(s.rss_before),
            opt(s.rss_connected),
            opt(s.rss_held),
            opt(s.cpu.map(|c| c.as_nanos() as u64)),
            u64::from(s.processes),
            opt(s.descriptors_min),
            opt(s.descriptors_max),
            u64::from(self.kernel.is_some()),
            k.tcp_inuse_before,
            k.tcp_inuse_held,
            k.tcp_mem_before,
            k.tcp_mem_held,
            k.slab_before,
            k.slab_held,
            u64::from(self.interrupted),
            self.content as u64,
            u64::from(self.deflate.is_some()),
            d.agreed,
            d.sent_raw,
            d.sent_wire,
            d.received_wire,
            d.received_raw,
        ];
        let mut out = String::new();
        for n in nums {
            out.push_str(&n.to_string());
            out.push(' ');
        }
        out.push_str(&self.hist.encode());
        out.push(' ');
        out.push_str(&self.encode_more());
        out.push(' ');
        out.push_str(&escape(&self.url));
        if let Some(e) = &self.first_error {
            out.push(' ');
            out.push_str(&escape(e));
        }
        out
    }

    /// Reads a report written by [`encode`](Self::encode); `None` if the text is not one.
    pub fn decode(line: &str) -> Option<Report> {
        let mut words = line.split(' ');
        let mut n = [0u64; WIRE_NUMBERS];
        for v in n.iter_mut() {
            *v = words.next()?.parse().ok()?;
        }
        let hist = Box::new(Histogram::decode(words.next()?)?);
        let more = words.next()?;
        let url = unescape(words.next()?)?;
        let first_error = match words.next() {
            Some(e) => Some(unescape(e)?),
            None => None,
        };
        if words.next().is_some() {
            return None;
        }
        let mut r = Report::decode_numbers(n, hist, url, first_error)?;
        r.decode_more(more)?;
        Some(r)
    }

    /// The figures added after the first wire form, as one word: the expectation, the
    /// schedule, the fan-out figures, the lag histogram and the status and close code counts.
    fn encode_more(&self) -> String {
        let s = self.schedule.unwrap_or_default();
        let f = self.fanout.unwrap_or_default();
        let nums = [
            self.expect as u64,
            u64::from(self.schedule.is_some()),
            u64::from(s.asked),
            s.achieved.to_bits(),
            s.unsent,
            u64::from(self.fanout.is_some()),
            f.publishers,
            f.published,
            f.expected,
            f.missing,
            f.duplicated,
            f.reordered,
            f.receivers_missing,
            f.most_missing,
            f.other,
        ];
        let nums: Vec<String> = nums.iter().map(u64::to_string).collect();
        format!(
            "{}|{}|{}|{}",
            nums.join("."),
            self.lag_hist.encode(),
            encode_codes(&self.handshake_statuses),
            encode_codes(&self.close_codes)
        )
    }

    fn decode_more(&mut self, word: &str) -> Option<()> {
        let mut parts = word.split('|');
        let mut n = [0u64; 15];
        let mut nums = parts.next()?.split('.');
        for v in n.iter_mut() {
            *v = nums.next()?.parse().ok()?;
        }
        let [expect, has_schedule, asked, achieved, unsent, has_fanout, publishers, published, expected, missing, duplicated, reordered, receivers_missing, most_missing, other] =
            n;
        *self.lag_hist = Histogram::decode(parts.next()?)?;
        self.handshake_statuses = decode_codes(parts.next()?)?;
        self.close_codes = decode_codes(parts.next()?)?;
        self.expect = [Expect::Echo, Expect::Reply, Expect::Nothing]
            .into_iter()
            .nth(usize::try_from(expect).ok()?)?;
        self.schedule = (has_schedule == 1).then(|| Schedule {
            asked: asked as u32,
            achieved: f64::from_bits(achieved),
            lag: self.lag_hist.summary(),
            unsent,
        });
        self.fanout = (has_fanout == 1).then_some(Fanout {
            publishers,
            published,
            expected,
            missing,
            duplicated,
            reordered,
            receivers_missing,
            most_missing,
            other,
        });
        Some(())
    }

    fn decode_numbers(
        n: [u64; WIRE_NUMBERS],
        hist: Box<Histogram>,
        url: String,
        first_error: Option<String>,
    ) -> Option<Report> {
        let opt = |v: u64| (v != NONE).then_some(v);
        let [connections, load, param, size, opened, held, connect_failures, handshake_failures, closed_early, protocol_errors, close_timeouts, connect_ns, measured_ns, sent, received, lost, corrupted, rate, measured_received, cores, processes, has_server, pid, rss_before, rss_connected, rss_held, cpu_ns, server_processes, descriptors_min, descriptors_max, has_kernel, tcp_inuse_before, tcp_inuse_held, tcp_mem_before, tcp_mem_held, slab_before, slab_held, interrupted, content, has_deflate, agreed, sent_raw, sent_wire, received_wire, received_raw] =
            n;
        Some(Report {
            url,
            connections: connections as usize,
            load: match load {
                0 => Load::Idle,
                1 => Load::Periodic(Duration::from_nanos(param)),
                2 => Load::Saturate(u32::try_from(param).ok()?),
                3 => Load::Rate(u32::try_from(param).ok()?),
                _ => return None,
            },
            size: size as usize,
            opened,
            held: held as usize,
            connect_failures,
            handshake_failures,
            closed_early,
            protocol_errors,
            close_timeouts,
            connect_time: Duration::from_nanos(connect_ns),
            measured: Duration::from_nanos(measured_ns),
            sent,
            received,
            lost,
            corrupted,
            msgs_per_sec: f64::from_bits(rate),
            measured_received,
            latency: hist.summary(),
            server: (has_server == 1).then(|| ServerUsage {
                pid: pid as u32,
                rss_before: opt(rss_before),
                rss_connected: opt(rss_connected),
                rss_held: opt(rss_held),
                cpu: opt(cpu_ns).map(Duration::from_nanos),
                processes: server_processes as u32,
                descriptors_min: opt(descriptors_min),
                descriptors_max: opt(descriptors_max),
            }),
            kernel: (has_kernel == 1).then_some(KernelUsage {
                tcp_inuse_before,
                tcp_inuse_held,
                tcp_mem_before,
                tcp_mem_held,
                slab_before,
                slab_held,
            }),
            first_error,
            cores: cores as usize,
            processes: processes as usize,
            hist,
            interrupted: interrupted == 1,
            content: match content {
                0 => Content::Binary,
                1 => Content::Json,
                2 => Content::Text,
                _ => return None,
            },
            deflate: (has_deflate == 1).then_some(Compression {
                agreed,
                sent_raw,
                sent_wire,
                received_wire,
                received_raw,
            }),
            expect: Expect::Echo,
            schedule: None,
            lag_hist: Box::new(Histogram::new()),
            fanout: None,
            handshake_statuses: Vec::new(),
            close_codes: Vec::new(),
        })
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        let mut j = Json::object();
        j.str("url", &self.url);
        j.num("connections", self.connections as f64);
        j.raw(
            "mode",
            match self.load {
                Load::Idle => "\"idle\"",
                Load::Periodic(_) => "\"periodic\"",
                Load::Saturate(_) => "\"saturate\"",
                Load::Rate(_) => "\"rate\"",
            },
        );
        match self.load {
            Load::Periodic(d) => j.num("every_ms", d.as_millis() as f64),
            Load::Saturate(k) => j.num("inflight", f64::from(k)),
            Load::Rate(r) => j.num("rate", f64::from(r)),
            Load::Idle => {}
        }
        j.str("expect", self.expect.name());
        j.num("size", self.size as f64);
        j.str("payload", self.content.name());
        match &self.deflate {
            Some(d) => {
                let mut o = Json::object();
                o.num("agreed", d.agreed as f64);
                o.num("sent_raw", d.sent_raw as f64);
                o.num("sent_wire", d.sent_wire as f64);
                o.opt("sent_ratio", d.sent_ratio());
                o.num("received_wire", d.received_wire as f64);
                o.num("received_raw", d.received_raw as f64);
                o.opt("received_ratio", d.received_ratio());
                j.raw("deflate", &o.finish());
            }
            None => j.raw("deflate", "null"),
        }
        j.num("opened", self.opened as f64);
        j.num("held", self.held as f64);
        j.num("connect_failures", self.connect_failures as f64);
        j.num("handshake_failures", self.handshake_failures as f64);
        j.num("closed_early", self.closed_early as f64);
        j.num("protocol_errors", self.protocol_errors as f64);
        j.num("close_timeouts", self.close_timeouts as f64);
        j.num("connect_s", self.connect_time.as_secs_f64());
        j.num("measured_s", self.measured.as_secs_f64());
        j.num("sent", self.sent as f64);
        j.num("received", self.received as f64);
        j.num("lost", self.lost as f64);
        j.num("corrupted", self.corrupted as f64);
        j.num("measured_received", self.measured_received as f64);
        j.num("msgs_per_sec", self.msgs_per_sec);
        match &self.latency {
            Some(l) => {
                let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
                let mut o = Json::object();
                o.num("count", l.count as f64);
                o.num("p50", us(l.p50));
                o.num("p90", us(l.p90));
                o.num("p99", us(l.p99));
                o.num("p99_9", us(l.p999));
                o.num("max", us(l.max));
                j.raw("latency_us", &o.finish());
            }
            None => j.raw("latency_us", "null"),
        }
        match &self.server {
            Some(s) => {
                let mut o = Json::object();
                o.num("pid", f64::from(s.pid));
                o.opt("rss_before", s.rss_before.map(|v| v as f64));
                o.opt("rss_connected", s.rss_connected.map(|v| v as f64));
                o.opt("rss_held", s.rss_held.map(|v| v as f64));
                o.opt("bytes_per_connection", self.server_bytes_per_connection());
                o.opt("cpu_s", s.cpu.map(|c| c.as_secs_f64()));
                o.opt("msgs_per_cpu_s", self.msgs_per_server_cpu_sec());
                o.num("processes", f64::from(s.processes));
                o.opt("descriptors_min", s.descriptors_min.map(|v| v as f64));
                o.opt("descriptors_max", s.descriptors_max.map(|v| v as f64));
                j.raw("server", &o.finish());
            }
            None => j.raw("server", "null"),
        }
        match &self.kernel {
            Some(k) => {
                let mut o = Json::object();
                o.num("tcp_inuse_before", k.tcp_inuse_before as f64);
                o.num("tcp_inuse_held", k.tcp_inuse_held as f64);
                o.num("tcp_mem_before", k.tcp_mem_before as f64);
                o.num("tcp_mem_held", k.tcp_mem_held as f64);
                o.num("slab_before", k.slab_before as f64);
                o.num("slab_held", k.slab_held as f64);
                o.opt("slab_per_socket", k.slab_per_socket());
                j.raw("kernel", &o.finish());
            }
            None => j.raw("kernel", "null"),
        }
        match &self.first_error {
            Some(e) => j.str("first_error", e),
            None => j.raw("first_error", "null"),
        }
        j.num("cores", self.cores as f64);
        j.num("bench_processes", self.processes as f64);
        self.json_more(&mut j);
        j.raw("interrupted", if self.interrupted { "true" } else { "false" });
        j.raw("clean", if self.is_clean() { "true" } else { "false" });
        j.finish()
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
    /// The schedule, fan-out and status fields of the JSON object.
    fn json_more(&self, j: &mut Json) {
        let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
        match &self.schedule {
            Some(s) => {
                let mut o = Json::object();
                o.num("asked", f64::from(s.asked));
                o.num("achieved", s.achieved);
                o.num("unsent", s.unsent as f64);
                o.opt("lag_p50_us", s.lag.map(|l| us(l.p50)));
                o.opt("lag_p99_us", s.lag.map(|l| us(l.p99)));
                o.opt("lag_max_us", s.lag.map(|l| us(l.max)));
                j.raw("schedule", &o.finish());
            }
            None => j.raw("schedule", "null"),
        }
        match &self.fanout {
            Some(x) => {
                let mut o = Json::object();
                o.num("publishers", x.publishers as f64);
                o.num("published", x.published as f64);
                o.num("expected", x.expected as f64);
                o.num("deliveries", self.received as f64);
                o.num("deliveries_per_sec", self.msgs_per_sec);
                o.num("missing", x.missing as f64);
                o.num("duplicated", x.duplicated as f64);
                o.num("reordered", x.reordered as f64);
                o.num("receivers_missing", x.receivers_missing as f64);
                o.num("most_missing", x.most_missing as f64);
                o.num("other", x.other as f64);
                j.raw("fanout", &o.finish());
            }
            None => j.raw("fanout", "null"),
        }
        let codes = |list: &[(u16, u64)]| {
            let mut o = Json::object();
            for (c, n) in list {
                o.num(&c.to_string(), *n as f64);
            }
            o.finish()
        };
        j.raw("handshake_statuses", &codes(&self.handshake_statuses));
        j.raw("close_codes", &codes(&self.close_codes));
    }

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

fn fmt_bytes(b: u64) -> String {
    if b < 10 << 10 {
        format!("{b} B")
    } else if b < 10 << 20 {
        format!("{} KiB", Fixed(b as f64 / 1024.0, 1))
    } else {
        format!("{} MiB", Fixed(b as f64 / (1 << 20) as f64, 1))
    }
}

/// Numbers in the text form of a report, before its histogram and strings.
const WIRE_NUMBERS: usize = 45;

/// An absent number in the text form.
const NONE: u64 = u64::MAX;

/// Percent-escapes bytes that are not printable ASCII, and `%` itself: one word of text.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// One JSON object, written field by field: keys are fixed names, strings are escaped, and a
/// number that is not finite becomes `null`.
struct Json(String);

impl Json {
    fn object() -> Json {
        Json(String::from("{"))
    }

    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(k);
        self.0.push_str("\":");
    }

    fn raw(&mut self, k: &str, v: &str) {
        self.key(k);
        self.0.push_str(v);
    }

    fn num(&mut self, k: &str, v: f64) {
        self.key(k);
        if !v.is_finite() {
            self.0.push_str("null");
        } else if v.fract() == 0.0 && v.abs() < 9e15 {
            self.0.push_str(&format!("{}", v as i64));
        } else {
            self.0.push_str(&Fixed(v, 3).to_string());
        }
    }

    fn opt(&mut self, k: &str, v: Option<f64>) {
        match v {
            Some(v) => self.num(k, v),
            None => self.raw(k, "null"),
        }
    }

    fn str(&mut self, k: &str, s: &str) {
        self.key(k);
        self.0.push('"');
        for c in s.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if (c as u32) < 0x20 => self.0.push_str(&format!("\\u{:04x}", c as u32)),
                c => self.0.push(c),
            }
        }
        self.0.push('"');
    }

    fn finish(mut self) -> String {
        self.0.push('}');
        self.0
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
    fn json_is_escaped_and_numbers_are_plain() {
        let mut j = Json::object();
        j.str("s", "a\"b\\c\n\u{1}");
        j.num("i", 3.0);
        j.num("f", 2.5);
        j.num("nan", f64::NAN);
        j.opt("none", None);
        assert_eq!(
            j.finish(),
            r#"{"s":"a\"b\\c\n\u0001","i":3,"f":2.500,"nan":null,"none":null}"#
        );
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
