//! The load generator's driver over the IO layer's engine: opens connections, applies the
//! load, checks the echoes, closes.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::io::stream::ClientStream;
use mio::{Events, Poll};

use super::histogram::Histogram;
use super::report::count_code;
use super::timeline::Sampler;
use super::{host_name, online_cpus, read_kernel, BenchConfig, BenchError, Load, Phase, Progress, Report, ServerUsage};
use super::{Compression, Content, Expect, Fanout, KernelUsage, Observer, Schedule, MESSAGE_HEADER};
use crate::io::budget::Budget;
use crate::io::describe;
use crate::io::engine::{Cause, Driver, Engine};
use crate::io::sys::{children_of, count_fds, read_cpu, read_rss};
use crate::io::timer::{deadline_after, poll_timeout};
use crate::proto::handshake::ClientRequest;
use crate::proto::rand::OsSeeded;
use crate::proto::{self, close_code, Connection, Event, Message, Payload, ResponseError, Timeout};

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
    /// Counted already; waiting to be removed.
    Done,
}

/// What the load generator keeps per connection beside the engine's slot.
struct BenchConn {
    stage: Stage,
    /// Sequence number of the next message to send.
    next_seq: u64,
    /// Sequence number of the next echo expected.
    expect_seq: u64,
    /// What only some runs need (boxed: an idle connection of a large run stays small).
    more: Option<Box<ConnMore>>,
}

/// Per connection, for answers timed in order of sending and for fan-out.
#[derive(Default)]
struct ConnMore {
    /// When each message awaiting an answer was sent (or due), oldest first: answers that
    /// carry no header of ours are timed with these.
    sent_at: VecDeque<u64>,
    /// Fan-out: this connection's publisher number, if it publishes.
    publisher: Option<u32>,
    /// Fan-out: what this receiver got from each publisher.
    fan: Vec<Track>,
}

/// What one receiver got from one publisher.
#[derive(Clone, Default)]
struct Track {
    /// The sequence number after the highest one received.
    next: u64,
    /// Sequence numbers skipped over and not received since (at most [`MAX_GAPS`]).
    gaps: Vec<u32>,
    /// Skipped numbers past [`MAX_GAPS`]: counted missing, not told apart from late ones.
    forgotten: u32,
}

/// Skipped sequence numbers remembered per receiver and publisher, to tell a late message
/// from a duplicate.
const MAX_GAPS: usize = 1024;

/// How a fan-out message arrived at one receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arrival {
    /// At or past the next number expected (numbers skipped over are remembered as gaps).
    Next,
    /// A number skipped over earlier: out of order.
    Late,
    /// A number already received.
    Again,
}

impl Track {
    fn arrive(&mut self, seq: u32) -> Arrival {
        if u64::from(seq) >= self.next {
            // Remember what fits; count the rest (one step however large the gap).
            let from = self.next as u32; // at most seq
            let room = (MAX_GAPS - self.gaps.len().min(MAX_GAPS)) as u32;
            let kept = (seq - from).min(room);
            self.gaps.extend(from..from + kept);
            self.forgotten = self.forgotten.saturating_add(seq - from - kept);
            self.next = u64::from(seq) + 1;
            Arrival::Next
        } else if let Some(i) = self.gaps.iter().position(|&g| g == seq) {
            self.gaps.swap_remove(i);
            Arrival::Late
        } else {
            Arrival::Again
        }
    }

    /// Messages not received of the first `published`.
    fn missing(&self, published: u64) -> u64 {
        published.saturating_sub(self.next) + self.gaps.len() as u64 + u64::from(self.forgotten)
    }
}

type BenchEngine = Engine<ClientStream, BenchConn, OsSeeded>;

// Driver timer ids: a kind in bits 60 and 61 (the engine keeps the top bits for itself).
const PROGRESS_TIMER: u64 = 1 << 60;
const RAMP_TIMER: u64 = (1 << 60) | 1;
const RATE_TIMER: u64 = (1 << 60) | 2;
const PHASE_TIMER: u64 = 2 << 60;
const SEND_TIMER: u64 = 3 << 60;
const KIND: u64 = 3 << 60;

fn send_timer(key: usize, gen: u32) -> u64 {
    SEND_TIMER | (u64::from(gen) << 32) | (key as u64 & 0xFFFF_FFFF)
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

struct Bench<'a> {
    cfg: &'a BenchConfig,
    observer: &'a mut dyn Observer,
    request: ClientRequest,
    phase: Phase,
    /// Incremented for each phase; a phase timer carries the number it was set in.
    phase_no: u64,
    /// Connections attempted.
    started: usize,
    /// Connections connecting or handshaking now.
    pending: usize,
    /// Connections open now.
    open: usize,
    ramp_armed: bool,
    /// A message template: header space, then the body.
    template: Vec<u8>,
    /// Connections whose handshake agreed on permessage-deflate.
    deflate_agreed: u64,
    hist: Histogram,
    /// The per-second samples.
    sampler: Sampler,
    c: Counters,
    first_error: Option<String>,
    /// When the connect phase began (after the other parts of the run, if any, were ready).
    connect_start: u64,
    connect_time: Duration,
    measure_start: u64,
    /// Nanoseconds since the start when the measured phase ended (`u64::MAX` before).
    measure_end_ns: u64,
    measured: Duration,
    held: usize,
    /// The close phase ran out of time.
    close_expired: bool,
    last_progress: (u64, u64),
    /// Whom to trust, for a `wss://` target.
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
    server: Option<ServerUsage>,
    server_cpu_start: Option<Duration>,
    kernel: Option<KernelUsage>,
    /// [`BenchConfig::stop`] was set.
    interrupted: bool,
    /// Answers are timed in order of sending (a fixed message, or replies).
    timed_in_order: bool,
    /// The open model: when message 0 was due (ns), the next message's number, the
    /// connections it goes to in turn, and whose turn it is.
    rate_start_ns: u64,
    rate_next: u64,
    rate_keys: Vec<(usize, u32)>,
    rate_turn: usize,
    /// How late each scheduled message was sent.
    lag: Histogram,
    /// Scheduled messages no connection was open to take.
    unsent: u64,
    /// Fan-out: the publishers' connections, and messages published by each.
    publishers: Vec<(usize, u32)>,
    published: Vec<u64>,
    fan: FanCounts,
    /// When the last message arrived (ms).
    last_arrival: u64,
    /// Refused handshakes by HTTP status, and early closes by close code.
    statuses: Vec<(u16, u64)>,
    closes: Vec<(u16, u64)>,
}

/// A fan-out run's counts, summed over the receivers.
#[derive(Default)]
struct FanCounts {
    receivers: u64,
    /// A publisher got its own message back (the server sends to the sender too).
    self_seen: bool,
    missing: u64,
    duplicated: u64,
    reordered: u64,
    receivers_missing: u64,
    most_missing: u64,
    other: u64,
}

/// The server's processes: the one given and its children (the workers of a server with
/// several processes).
fn server_processes(pid: u32) -> Vec<u32> {
    let mut pids = children_of(pid);
    pids.insert(0, pid);
    pids
}

/// Resident memory summed over the server's processes; `None` when the server is gone.
fn server_rss(pid: u32) -> Option<u64> {
    let pids = server_processes(pid);
    read_rss(pid)?;
    Some(pids.iter().filter_map(|&p| read_rss(p)).sum())
}

/// CPU time summed over the server's processes.
fn server_cpu(pid: u32) -> Option<Duration> {
    read_cpu(pid)?;
    Some(server_processes(pid).iter().filter_map(|&p| read_cpu(p)).sum())
}

pub(super) fn run(cfg: &BenchConfig, observer: &mut dyn Observer) -> Result<Report, BenchError> {
    // Answers other than echoes may be longer than what was sent.
    let floor = if cfg.expect == Expect::Echo && cfg.publishers == 0 {
        8 << 10
    } else {
        16 << 20
    };
    let pcfg = proto::Config {
        max_message: (cfg.message_len() * 2).max(floor),
        handshake_timeout: cfg.connect_timeout,
        close_timeout: cfg.close_timeout,
        ..proto::Config::default()
    };
    #[cfg(feature = "tls")]
    let tls = match (&cfg.tls, cfg.target.tls) {
        (_, false) => None,
        (Some(t), true) => Some(t.clone()),
        (None, true) => {
            Some(crate::tls::ClientTls::system_roots().map_err(|e| BenchError::InvalidConfig(e.to_string()))?)
        }
    };
    let mut eng: BenchEngine = Engine::new(Poll::new()?, pcfg, 1 << 20, OsSeeded::new()?, Budget::unlimited());
    let template = cfg.content.template(cfg.size);
    #[cfg_attr(not(feature = "deflate"), allow(unused_mut))]
    let mut request: ClientRequest = cfg.request();
    #[cfg(feature = "deflate")]
    if cfg.deflate {
        request.extensions = Some(proto::deflate::CLIENT_OFFER.into());
    }
    let mut b = Bench {
        cfg,
        observer,
        request,
        phase: Phase::Connect,
        phase_no: 0,
        started: 0,
        pending: 0,
        open: 0,
        ramp_armed: false,
        template,
        deflate_agreed: 0,
        hist: Histogram::new(),
        sampler: Sampler::new(0, None),
        c: Counters::default(),
        first_error: None,
        connect_start: 0,
        connect_time: Duration::ZERO,
        measure_start: 0,
        measure_end_ns: u64::MAX,
        measured: Duration::ZERO,
        held: 0,
        close_expired: false,
        last_progress: (0, 0),
        #[cfg(feature = "tls")]
        tls,
        server: cfg.server_pid.map(|pid| ServerUsage {
            pid,
            rss_before: server_rss(pid),
            ..ServerUsage::default()
        }),
        server_cpu_start: None,
        kernel: read_kernel(),
        interrupted: false,
        timed_in_order: cfg.message.is_some() || cfg.expect == Expect::Reply,
        rate_start_ns: 0,
        rate_next: 0,
        rate_keys: Vec::new(),
        rate_turn: 0,
        lag: Histogram::new(),
        unsent: 0,
        publishers: Vec::new(),
        published: Vec::new(),
        fan: FanCounts::default(),
        last_arrival: 0,
        statuses: Vec::new(),
        closes: Vec::new(),
    };
    let mut events = Events::with_capacity(1024);
    let mut rbuf = vec![0u8; 256 << 10];
    b.observer.before(Phase::Connect);
    b.connect_start = eng.tick();
    b.last_progress = (eng.now, 0);
    b.sampler = Sampler::new(eng.now, b.server.and_then(|s| server_cpu(s.pid)));
    eng.set_timer_at(b.sampler.due, PROGRESS_TIMER);
    b.open_more(&mut eng);
    b.advance(&mut eng);
    while !(b.phase == Phase::Close && (eng.slots.is_empty() || b.close_expired)) {
        // A signal interrupts the poll below, so the loop comes back here at once.
        if !b.interrupted && cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            b.interrupt(&mut eng);
        }
        let now = eng.tick();
        match eng.poll.poll(&mut events, poll_timeout(now, eng.next_deadline())) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        eng.tick();
        for ev in events.iter() {
            eng.on_ready(&mut b, ev.token().0, ev, &mut rbuf);
        }
        eng.fire_timers(&mut b);
        eng.apply_budget(&mut b);
        eng.reap(&mut b);
        b.advance(&mut eng);
    }
    // The last second, however short.
    eng.tick();
    if b.sampler
        .samples
        .last()
        .is_none_or(|s| s.at.as_millis() as u64 + b.connect_start < eng.now)
    {
        b.take_sample(&eng);
    }
    // Whatever is left did not close in time.
    let keys: Vec<usize> = eng.slots.iter().map(|(k, _)| k).collect();
    for key in keys {
        b.c.close_timeouts += 1;
        let data = &mut eng.slots[key].data;
        b.c.abandoned += data.next_seq.saturating_sub(data.expect_seq);
        if let Some(more) = data.more.take() {
            b.settle_receiver(&more);
        }
    }
    let fanout = (cfg.publishers > 0).then(|| Fanout {
        publishers: b.publishers.len() as u64,
        published: b.c.sent,
        expected: b.expected_receivers(),
        missing: b.fan.missing,
        duplicated: b.fan.duplicated,
        reordered: b.fan.reordered,
        receivers_missing: b.fan.receivers_missing,
        most_missing: b.fan.most_missing,
        other: b.fan.other,
    });
    let lost = match (&fanout, cfg.expect, cfg.load) {
        (Some(f), _, _) => f.missing,
        (None, Expect::Nothing, _) | (None, _, Load::Idle) => 0,
        _ => b.c.sent.saturating_sub(b.c.received),
    };
    let secs = b.measured.as_secs_f64();
    Ok(Report {
        url: cfg.target.url(),
        connections: cfg.connections,
        load: cfg.load,
        size: cfg.message_len(),
        content: cfg.content,
        deflate: compression(cfg, &eng, b.deflate_agreed),
        opened: b.c.opened,
        held: b.held,
        connect_failures: b.c.connect_failures,
        handshake_failures: b.c.handshake_failures,
        closed_early: b.c.closed_early,
        protocol_errors: b.c.protocol_errors,
        close_timeouts: b.c.close_timeouts,
        connect_time: b.connect_time,
        measured: b.measured,
        sent: b.c.sent,
        received: b.c.received,
        lost,
        corrupted: b.c.corrupted,
        msgs_per_sec: if secs > 0.0 {
            b.c.measured_received as f64 / secs
        } else {
            0.0
        },
        measured_received: b.c.measured_received,
        latency: b.hist.summary(),
        server: b.server,
        kernel: b.kernel,
        first_error: b.first_error,
        cores: online_cpus(),
        processes: 1,
        host: host_name(),
        timeline: std::mem::take(&mut b.sampler.samples),
        hist: Box::new(b.hist),
        interrupted: b.interrupted,
        expect: cfg.expect,
        schedule: match cfg.load {
            Load::Rate(asked) => Some(Schedule {
                asked,
                achieved: if secs > 0.0 { b.c.sent as f64 / secs } else { 0.0 },
                lag: b.lag.summary(),
                unsent: b.unsent,
            }),
            _ => None,
        },
        lag_hist: Box::new(b.lag),
        fanout,
        handshake_statuses: b.statuses,
        close_codes: b.closes,
    })
}

/// What the run's codec counted, when the connections offered permessage-deflate.
#[cfg(feature = "deflate")]
fn compression(cfg: &BenchConfig, eng: &BenchEngine, agreed: u64) -> Option<Compression> {
    let s = eng.codec.stats();
    cfg.deflate.then_some(Compression {
        agreed,
        sent_raw: s.compressed_in,
        sent_wire: s.compressed_out,
        received_wire: s.inflated_in,
        received_raw: s.inflated_out,
    })
}

#[cfg(not(feature = "deflate"))]
fn compression(_: &BenchConfig, _: &BenchEngine, _: u64) -> Option<Compression> {
    None
}

/// Checks an echo against the next expected sequence number and the body; returns its send
/// time. `sent` is how many messages went out: a sequence number never sent is corrupt and
/// moves nothing. A wrong (but sent) sequence number resynchronises on it, so one reordering
/// counts once.
fn check_echo(content: Content, b: &[u8], expect: &mut u64, sent: u64, template: &[u8]) -> Option<u64> {
    if b.len() != template.len() {
        return None;
    }
    let (seq, ts) = content.read_header(b)?;
    if seq >= sent {
        return None;
    }
    if seq != *expect {
        *expect = (*expect).max(seq + 1);
        return None;
    }
    *expect += 1;
    (b[MESSAGE_HEADER..] == template[MESSAGE_HEADER..]).then_some(ts)
}

impl Bench<'_> {
    fn note_error(&mut self, what: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    /// Opens as many connections as the ramp and the pending limit allow.
    fn open_more(&mut self, eng: &mut BenchEngine) {
        if self.phase != Phase::Connect {
            return;
        }
        let n = self.cfg.connections;
        let allowed = match self.cfg.ramp {
            Some(r) => ((eng.now.saturating_mul(u64::from(r)) / 1000) as usize)
                .saturating_add(1)
                .min(n),
            None => n,
        };
        while self.started < allowed && self.pending < self.cfg.max_pending {
            self.open_one(eng);
        }
        if let Some(r) = self.cfg.ramp {
            if self.started < n && self.started >= allowed && !self.ramp_armed {
                // When the next connection is allowed: started * 1000 / r, rounded up.
                let when = (self.started as u64 * 1000).div_ceil(u64::from(r)).max(eng.now + 1);
                self.ramp_armed = true;
                eng.set_timer_at(when, RAMP_TIMER);
            }
        }
    }

    fn open_one(&mut self, eng: &mut BenchEngine) {
        let i = self.started;
        self.started += 1;
        let ips = &self.cfg.source_ips;
        let src = (!ips.is_empty()).then(|| ips[i % ips.len()]);
        let stream = match crate::io::connect::start(self.cfg.target.addr, src) {
            Ok(s) => s,
            Err(e) => {
                self.c.connect_failures += 1;
                self.note_error(|| {
                    format!(
                        "connect from {}: {}",
                        src.map_or("any".into(), |s| s.to_string()),
                        describe(&e)
                    )
                });
                return;
            }
        };
        #[cfg(feature = "tls")]
        let stream = match &self.tls {
            Some(tls) => match tls.session(&self.cfg.target.server_name) {
                Ok(session) => ClientStream::Tls(crate::io::tls::TlsStream::new(stream, session)),
                Err(e) => {
                    self.c.connect_failures += 1;
                    self.note_error(|| format!("TLS: {e}"));
                    return;
                }
            },
            None => ClientStream::Plain(stream),
        };
        #[cfg(not(feature = "tls"))]
        let stream = ClientStream::Plain(stream);
        let mut first = Vec::new();
        let conn = Connection::client(&self.request, eng.now, &mut eng.rng, &mut first);
        let data = BenchConn {
            stage: Stage::Connecting,
            next_seq: 0,
            expect_seq: 0,
            more: None,
        };
        match eng.insert_connecting(stream, conn, data, &first) {
            Ok(_) => self.pending += 1,
            Err(e) => {
                self.c.connect_failures += 1;
                self.note_error(|| format!("register: {}", describe(&e)));
            }
        }
    }

    /// Sends the connection's next message, stamped with the time it was `due` (the open
    /// model) or with the time now. Whether the connection took it.
    fn push_message(&mut self, eng: &mut BenchEngine, key: usize, due: Option<u64>) -> bool {
        let now_ns = eng.clock.now_ns();
        let ts = due.unwrap_or(now_ns);
        let cfg = self.cfg;
        let data = &eng.slots[key].data;
        let msg = match &cfg.message {
            // UTF-8, checked with the settings.
            Some(m) if m.text => Message::Text(std::str::from_utf8(&m.bytes).unwrap_or_default()),
            Some(m) => Message::Binary(&m.bytes),
            None => {
                // A publisher's number travels above the 32 bits of its sequence number.
                let seq = match data.more.as_ref().and_then(|m| m.publisher) {
                    Some(p) => (u64::from(p) << 32) | (data.next_seq & 0xFFFF_FFFF),
                    None => data.next_seq,
                };
                cfg.content.write_header(&mut self.template, seq, ts);
                if cfg.content.is_text() {
                    // ASCII by construction (the header is base64 digits).
                    Message::Text(std::str::from_utf8(&self.template).unwrap_or_default())
                } else {
                    Message::Binary(&self.template)
                }
            }
        };
        if eng.send(key, msg).is_err() {
            return false;
        }
        self.c.sent += 1;
        let data = &mut eng.slots[key].data;
        data.next_seq += 1;
        if self.timed_in_order {
            data.more.get_or_insert_with(Default::default).sent_at.push_back(ts);
        }
        if let Some(p) = data.more.as_ref().and_then(|m| m.publisher) {
            self.published[p as usize] += 1;
        }
        if let Some(due) = due {
            self.lag.record(now_ns.saturating_sub(due));
        }
        true
    }

    /// Sends every message of the open model's schedule that is due, round-robin over its
    /// connections, and sets the timer for the next.
    fn rate_send(&mut self, eng: &mut BenchEngine) {
        let Load::Rate(r) = self.cfg.load else { return };
        if self.phase != Phase::Measure {
            return;
        }
        let r = u128::from(r);
        let due_at = |n: u64| (u128::from(n) * 1_000_000_000 / r) as u64;
        let now_ns = eng.clock.now_ns();
        let elapsed = u128::from(now_ns.saturating_sub(self.rate_start_ns));
        // Messages due by now: those numbered up to elapsed * r / 1e9.
        let due = (elapsed * r / 1_000_000_000) as u64 + 1;
        while self.rate_next < due {
            let at = self.rate_start_ns + due_at(self.rate_next);
            self.rate_next += 1;
            self.send_scheduled(eng, at);
        }
        let next_ns = self.rate_start_ns + due_at(self.rate_next);
        let wait_ms = next_ns.saturating_sub(now_ns).div_ceil(1_000_000).max(1);
        eng.set_timer_at(eng.now + wait_ms, RATE_TIMER);
    }

    /// Hands one scheduled message to the next open connection in turn.
    fn send_scheduled(&mut self, eng: &mut BenchEngine, due: u64) {
        for _ in 0..self.rate_keys.len() {
            let (key, gen) = self.rate_keys[self.rate_turn];
            self.rate_turn = (self.rate_turn + 1) % self.rate_keys.len();
            if eng.is_live(key, gen)
                && eng.slots[key].data.stage == Stage::Open
                && self.push_message(eng, key, Some(due))
            {
                return;
            }
        }
        self.unsent += 1;
    }

    fn on_echo(&mut self, eng: &mut BenchEngine, key: usize, payload: &Payload<'_>) {
        let now_ns = eng.clock.now_ns();
        self.last_arrival = eng.now;
        if self.cfg.publishers > 0 {
            self.on_delivery(eng, key, payload, now_ns);
            return;
        }
        self.c.received += 1;
        if now_ns < self.measure_end_ns {
            self.c.measured_received += 1;
        }
        // An idle run checks nothing either: it counts what the server sends by itself.
        let expect = if self.cfg.load == Load::Idle {
            Expect::Nothing
        } else {
            self.cfg.expect
        };
        let data = &mut eng.slots[key].data;
        let content = self.cfg.content;
        let ok = match (expect, &self.cfg.message) {
            (Expect::Nothing, _) => return,
            (Expect::Reply, _) => data.more.as_mut().and_then(|m| m.sent_at.pop_front()),
            (Expect::Echo, Some(fixed)) => {
                let ts = data.more.as_mut().and_then(|m| m.sent_at.pop_front());
                let same = match payload.as_message() {
                    Message::Text(t) => fixed.text && t.as_bytes() == fixed.bytes,
                    Message::Binary(b) => !fixed.text && b == fixed.bytes,
                };
                ts.filter(|_| same)
            }
            (Expect::Echo, None) => match payload.as_message() {
                Message::Binary(b) if !content.is_text() => {
                    check_echo(content, b, &mut data.expect_seq, data.next_seq, &self.template)
                }
                Message::Text(t) if content.is_text() => check_echo(
                    content,
                    t.as_bytes(),
                    &mut data.expect_seq,
                    data.next_seq,
                    &self.template,
                ),
                _ => None,
            },
        };
        if self.timed_in_order && data.expect_seq < data.next_seq {
            data.expect_seq += 1;
        }
        match ok {
            Some(ts) => {
                let rtt = now_ns.saturating_sub(ts);
                self.hist.record(rtt);
                self.sampler.hist.record(rtt);
            }
            None => self.c.corrupted += 1,
        }
        if self.phase == Phase::Measure && matches!(self.cfg.load, Load::Saturate(_)) {
            self.push_message(eng, key, None);
        }
    }

    /// A fan-out message: which publisher, which number, once and in order for this receiver.
    fn on_delivery(&mut self, eng: &mut BenchEngine, key: usize, payload: &Payload<'_>, now_ns: u64) {
        let content = self.cfg.content;
        let size = self.cfg.size;
        let bytes = match payload.as_message() {
            Message::Binary(b) if !content.is_text() => b,
            Message::Text(t) if content.is_text() => t.as_bytes(),
            _ => {
                self.fan.other += 1;
                return;
            }
        };
        // A server may put something before what it relays (the rooms example adds `NICK: `
        // to text): the message is the last `size` bytes.
        let Some(m) = bytes.len().checked_sub(size).map(|at| &bytes[at..]) else {
            self.fan.other += 1;
            return;
        };
        let Some((wire_seq, ts)) = content.read_header(m) else {
            self.fan.other += 1;
            return;
        };
        let (p, seq) = ((wire_seq >> 32) as usize, wire_seq & 0xFFFF_FFFF);
        if self.published.get(p).is_none_or(|&n| seq >= n) {
            self.fan.other += 1; // no message of this run
            return;
        }
        if m[MESSAGE_HEADER..] != self.template[MESSAGE_HEADER..] {
            self.c.corrupted += 1;
            return;
        }
        self.c.received += 1;
        if now_ns < self.measure_end_ns {
            self.c.measured_received += 1;
        }
        let publishers = self.published.len();
        let more = eng.slots[key].data.more.get_or_insert_with(Default::default);
        if more.publisher == Some(p as u32) {
            self.fan.self_seen = true;
        }
        if more.fan.len() < publishers {
            more.fan.resize(publishers, Track::default());
        }
        match more.fan[p].arrive(seq as u32) {
            Arrival::Next => {}
            Arrival::Late => self.fan.reordered += 1,
            Arrival::Again => {
                self.fan.duplicated += 1;
                return;
            }
        }
        let delay = now_ns.saturating_sub(ts);
        self.hist.record(delay);
        self.sampler.hist.record(delay);
    }

    /// Receivers each fan-out message should reach.
    fn expected_receivers(&self) -> u64 {
        self.fan
            .receivers
            .saturating_sub(u64::from(!self.fan.self_seen && !self.publishers.is_empty()))
    }

    /// Counts what a fan-out receiver missed, once it is gone or the run is over.
    fn settle_receiver(&mut self, more: &ConnMore) {
        if self.published.is_empty() {
            return;
        }
        let mut missing = 0u64;
        for (p, &published) in self.published.iter().enumerate() {
            if more.publisher == Some(p as u32) && !self.fan.self_seen {
                continue; // the server does not send a message back to its sender
            }
            missing += more.fan.get(p).map_or(published, |t| t.missing(published));
        }
        self.fan.missing += missing;
        if missing > 0 {
            self.fan.receivers_missing += 1;
            self.fan.most_missing = self.fan.most_missing.max(missing);
        }
    }

    /// Closes the current second of the timeline.
    fn take_sample(&mut self, eng: &BenchEngine) {
        let (rss, cpu) = match &self.server {
            Some(s) => (server_rss(s.pid), server_cpu(s.pid)),
            None => (None, None),
        };
        let totals = (self.c.sent, self.c.received);
        self.sampler.take(eng.now, self.open as u64, totals, rss, cpu);
    }

    fn report_progress(&mut self, eng: &BenchEngine) {
        let (t, r) = self.last_progress;
        let dt = eng.now.saturating_sub(t).max(1) as f64 / 1000.0;
        let rate = self.c.received.saturating_sub(r) as f64 / dt;
        self.last_progress = (eng.now, self.c.received);
        self.observer.progress(&Progress {
            elapsed: Duration::from_millis(eng.now),
            phase: self.phase,
            open: self.open,
            target: self.cfg.connections,
            failed: self.c.connect_failures + self.c.handshake_failures,
            msgs_per_sec: rate,
            p99: self.hist.quantile(0.99).map(Duration::from_nanos),
            processes: 1,
        });
    }

    fn set_phase(&mut self, eng: &mut BenchEngine, phase: Phase, timeout: Duration) {
        self.phase = phase;
        self.phase_no += 1;
        eng.set_timer_at(deadline_after(eng.now, timeout), PHASE_TIMER | self.phase_no);
    }

    /// Moves to the next phase when the current one is done.
    fn advance(&mut self, eng: &mut BenchEngine) {
        if self.phase == Phase::Connect && self.started == self.cfg.connections && self.pending == 0 {
            self.connect_time = Duration::from_millis(eng.now - self.connect_start);
            self.observer.before(Phase::Measure);
            eng.tick();
            self.begin_measure(eng);
        }
        if self.phase == Phase::Measure && self.open == 0 {
            self.begin_drain(eng); // nothing left to measure: every connection failed or was closed
        }
        if self.phase == Phase::Measure && !self.publishers.is_empty() {
            self.publish_saturating(eng);
        }
        if self.phase == Phase::Drain && self.drained(eng) {
            self.begin_close(eng);
        }
    }

    /// Whether the answers still awaited have come (or cannot come).
    fn drained(&self, eng: &BenchEngine) -> bool {
        // Where answers are not matched to messages: all of them, or nothing for half a
        // second (a server that dropped some, or does not answer).
        let quiet = eng.now >= self.last_arrival.max(self.measure_end_ms()) + 500;
        if !self.publishers.is_empty() {
            let all = self.c.sent.saturating_mul(self.expected_receivers());
            return self.c.received >= all || quiet;
        }
        match (self.cfg.load, self.cfg.expect) {
            (Load::Idle, _) => true,
            (_, Expect::Nothing) => self.c.received >= self.c.sent || quiet,
            _ => self.c.received + self.c.abandoned >= self.c.sent,
        }
    }

    fn measure_end_ms(&self) -> u64 {
        self.measure_start + self.measured.as_millis() as u64
    }

    /// Saturating fan-out: each publisher sends its batch again whenever the last one has
    /// left its queue.
    fn publish_saturating(&mut self, eng: &mut BenchEngine) {
        let Load::Saturate(k) = self.cfg.load else { return };
        for i in 0..self.publishers.len() {
            let (key, gen) = self.publishers[i];
            if eng.is_live(key, gen) && eng.slots[key].data.stage == Stage::Open && eng.backlog(key) == 0 {
                for _ in 0..k {
                    self.push_message(eng, key, None);
                }
            }
        }
    }

    fn phase_timeout(&mut self, eng: &mut BenchEngine) {
        match self.phase {
            Phase::Connect => {}
            Phase::Measure => self.begin_drain(eng),
            Phase::Drain => self.begin_close(eng),
            Phase::Close => self.close_expired = true,
        }
    }

    fn open_keys(eng: &BenchEngine) -> Vec<usize> {
        eng.slots
            .iter()
            .filter(|(_, s)| s.data.stage == Stage::Open && !s.is_dead())
            .map(|(k, _)| k)
            .collect()
    }

    /// Cuts the run short: stops opening connections and ends the measured phase now.
    fn interrupt(&mut self, eng: &mut BenchEngine) {
        self.interrupted = true;
        match self.phase {
            Phase::Connect => {
                self.started = self.cfg.connections;
                self.connect_time = Duration::from_millis(eng.now - self.connect_start);
                self.measure_start = eng.now;
                self.begin_drain(eng);
            }
            Phase::Measure => self.begin_drain(eng),
            Phase::Drain | Phase::Close => {}
        }
    }

    fn begin_measure(&mut self, eng: &mut BenchEngine) {
        if let Some(s) = &mut self.server {
            s.rss_connected = server_rss(s.pid);
            self.server_cpu_start = server_cpu(s.pid);
        }
        self.measure_start = eng.now;
        self.set_phase(eng, Phase::Measure, self.cfg.duration);
        let mut keys = Self::open_keys(eng);
        if self.cfg.publishers > 0 {
            // Every connection receives; the first ones publish.
            self.fan.receivers = keys.len() as u64;
            keys.truncate(self.cfg.publishers);
            for (i, &key) in keys.iter().enumerate() {
                let slot = &mut eng.slots[key];
                slot.data.more.get_or_insert_with(Default::default).publisher = Some(i as u32);
                self.publishers.push((key, slot.gen));
            }
            self.published = vec![0; keys.len()];
        }
        match self.cfg.load {
            Load::Idle => {}
            Load::Saturate(k) => {
                for key in keys {
                    for _ in 0..k {
                        self.push_message(eng, key, None);
                    }
                }
            }
            Load::Rate(_) => {
                self.rate_keys = keys.iter().map(|&k| (k, eng.slots[k].gen)).collect();
                self.rate_start_ns = eng.clock.now_ns();
                self.rate_send(eng);
            }
            Load::Periodic(every) => {
                // Spread the first sends evenly over one period.
                let n = keys.len().max(1) as u64;
                let every = every.as_millis().max(1) as u64;
                for (i, key) in keys.into_iter().enumerate() {
                    let gen = eng.slots[key].gen;
                    eng.set_timer_at(eng.now + every * i as u64 / n, send_timer(key, gen));
                }
            }
        }
    }

    fn periodic_send(&mut self, eng: &mut BenchEngine, key: usize, gen: u32) {
        let Load::Periodic(every) = self.cfg.load else { return };
        if self.phase != Phase::Measure || !eng.is_live(key, gen) || eng.slots[key].data.stage != Stage::Open {
            return;
        }
        self.push_message(eng, key, None);
        eng.set_timer_at(deadline_after(eng.now, every), send_timer(key, gen));
    }

    fn begin_drain(&mut self, eng: &mut BenchEngine) {
        self.measure_end_ns = eng.clock.now_ns();
        self.measured = Duration::from_millis(eng.now - self.measure_start);
        self.held = self.open;
        // The kernel first: listing a process's descriptors below fills kernel caches (an
        // inode and a dentry in /proc for each).
        if let (Some(k), Some(now)) = (&mut self.kernel, read_kernel()) {
            k.tcp_inuse_held = now.tcp_inuse_before;
            k.tcp_mem_held = now.tcp_mem_before;
            k.slab_held = now.slab_before;
        }
        if let Some(s) = &mut self.server {
            s.rss_held = server_rss(s.pid);
            if let (Some(a), Some(b)) = (self.server_cpu_start, server_cpu(s.pid)) {
                s.cpu = Some(b.saturating_sub(a));
            }
            let pids = server_processes(s.pid);
            s.processes = pids.len() as u32;
            // Connections are held by the children when there are any.
            let holders = if pids.len() > 1 { &pids[1..] } else { &pids[..] };
            let fds: Vec<u64> = holders.iter().filter_map(|&p| count_fds(p)).collect();
            s.descriptors_min = fds.iter().copied().min();
            s.descriptors_max = fds.iter().copied().max();
        }
        self.set_phase(eng, Phase::Drain, self.cfg.drain_timeout);
    }

    fn begin_close(&mut self, eng: &mut BenchEngine) {
        self.observer.before(Phase::Close);
        eng.tick();
        self.set_phase(eng, Phase::Close, self.cfg.close_timeout);
        let keys: Vec<usize> = eng.slots.iter().map(|(k, _)| k).collect();
        for key in keys {
            match eng.slots[key].data.stage {
                Stage::Open => {
                    eng.slots[key].data.stage = Stage::Closing;
                    self.open -= 1;
                    let _ = eng.close(key, close_code::NORMAL, "");
                }
                Stage::Connecting | Stage::Handshaking => {
                    eng.slots[key].data.stage = Stage::Done;
                    self.pending -= 1;
                    eng.kill(key, Cause::Dropped);
                }
                Stage::Closing | Stage::Done => {}
            }
        }
    }
}

impl Driver<ClientStream, BenchConn, OsSeeded> for Bench<'_> {
    fn on_connected(&mut self, eng: &mut BenchEngine, key: usize) {
        eng.slots[key].data.stage = Stage::Handshaking;
    }

    fn on_event(&mut self, eng: &mut BenchEngine, key: usize, ev: Event<'_>) {
        match ev {
            Event::Open(_) => {
                #[cfg(feature = "deflate")]
                if self.cfg.deflate {
                    if eng.slots[key].conn.deflate().is_some() {
                        self.deflate_agreed += 1;
                    } else {
                        self.note_error(|| "the server did not agree to permessage-deflate".to_string());
                    }
                }
                eng.slots[key].data.stage = Stage::Open;
                self.pending -= 1;
                self.open += 1;
                self.c.opened += 1;
                self.open_more(eng);
            }
            Event::Message(payload) => self.on_echo(eng, key, &payload),
            Event::Close { code, reason } => {
                let data = &mut eng.slots[key].data;
                if data.stage == Stage::Open {
                    data.stage = Stage::Closing;
                    self.open -= 1;
                    if self.phase != Phase::Close {
                        self.c.closed_early += 1;
                        let code = code.unwrap_or(close_code::NO_STATUS);
                        count_code(&mut self.closes, code, 1);
                        let reason = match reason.as_message() {
                            Message::Text(t) if !t.is_empty() => format!(" ({t})"),
                            _ => String::new(),
                        };
                        self.note_error(|| format!("the server closed a connection with code {code}{reason}"));
                    }
                }
            }
            Event::Ping(_) | Event::Pong(_) | Event::Request(_) => {}
        }
    }

    fn on_error(&mut self, eng: &mut BenchEngine, key: usize, err: &proto::Error) {
        let data = &mut eng.slots[key].data;
        let stage = std::mem::replace(&mut data.stage, Stage::Done);
        match (stage, err) {
            (Stage::Connecting | Stage::Handshaking, _) => {
                self.pending -= 1;
                self.c.handshake_failures += 1;
                if let proto::Error::Response(r) = err {
                    if let ResponseError::Status { code, .. } = **r {
                        count_code(&mut self.statuses, code, 1);
                    }
                }
                self.note_error(|| format!("handshake: {err}"));
                self.open_more(eng);
            }
            (Stage::Open, _) => {
                self.open -= 1;
                self.c.protocol_errors += 1;
                self.note_error(|| format!("protocol error from server: {err}"));
            }
            (_, _) => {
                self.c.protocol_errors += 1;
                self.note_error(|| format!("protocol error from server: {err}"));
            }
        }
    }

    fn on_removed(&mut self, eng: &mut BenchEngine, key: usize, cause: Cause) {
        let data = &mut eng.slots[key].data;
        self.c.abandoned += data.next_seq.saturating_sub(data.expect_seq);
        if let Some(more) = data.more.take() {
            self.settle_receiver(&more);
        }
        let data = &eng.slots[key].data;
        match data.stage {
            Stage::Connecting => {
                self.pending -= 1;
                self.c.connect_failures += 1;
                self.note_error(|| match &cause {
                    Cause::Timeout(_) => "connect: timed out".to_string(),
                    Cause::Io(e) => format!("connect: {}", describe(e)),
                    _ => "connect: the server closed the connection".to_string(),
                });
                self.open_more(eng);
            }
            Stage::Handshaking => {
                self.pending -= 1;
                self.c.handshake_failures += 1;
                self.note_error(|| match &cause {
                    Cause::Timeout(_) => "handshake: timed out".to_string(),
                    Cause::Io(e) => format!("handshake: {}", describe(e)),
                    _ => "handshake: the server closed the connection".to_string(),
                });
                self.open_more(eng);
            }
            Stage::Open => {
                self.open -= 1;
                self.c.closed_early += 1;
                count_code(&mut self.closes, close_code::ABNORMAL, 1);
                self.note_error(|| match &cause {
                    Cause::Io(e) => format!("connection lost: {}", describe(e)),
                    _ => "connection lost: the server closed it without a close frame".to_string(),
                });
            }
            Stage::Closing => {
                if matches!(cause, Cause::Timeout(Timeout::Close)) {
                    self.c.close_timeouts += 1;
                }
            }
            Stage::Done => {}
        }
    }

    fn on_timer(&mut self, eng: &mut BenchEngine, id: u64) {
        match id & KIND {
            SEND_TIMER => {
                let key = (id & 0xFFFF_FFFF) as usize;
                let gen = ((id >> 32) & 0xFF_FFFF) as u32;
                self.periodic_send(eng, key, gen);
            }
            PHASE_TIMER => {
                if id & !KIND == self.phase_no {
                    self.phase_timeout(eng);
                }
            }
            _ if id == RAMP_TIMER => {
                self.ramp_armed = false;
                self.open_more(eng);
            }
            _ if id == RATE_TIMER => self.rate_send(eng),
            _ => {
                self.take_sample(eng);
                self.report_progress(eng);
                eng.set_timer_at(self.sampler.due, PROGRESS_TIMER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Fanout;

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
        let sent = 10;
        assert_eq!(
            check_echo(Content::Binary, &msg(0, 77), &mut expect, sent, &t),
            Some(77)
        );
        assert_eq!(
            check_echo(Content::Binary, &msg(2, 5), &mut expect, sent, &t),
            None,
            "skipped 1"
        );
        assert_eq!(expect, 3);
        assert_eq!(check_echo(Content::Binary, &msg(3, 5), &mut expect, sent, &t), Some(5));
        let mut bad = msg(4, 5);
        bad[20] ^= 1;
        assert_eq!(
            check_echo(Content::Binary, &bad, &mut expect, sent, &t),
            None,
            "payload changed"
        );
        assert_eq!(
            check_echo(Content::Binary, &msg(5, 5)[..31], &mut expect, sent, &t),
            None,
            "short"
        );
        // A sequence number never sent is corrupt and does not move the expectation past
        // what was sent (no underflow when counting what is still in flight).
        let before = expect;
        assert_eq!(
            check_echo(Content::Binary, &msg(u64::MAX, 5), &mut expect, sent, &t),
            None
        );
        assert_eq!(check_echo(Content::Binary, &msg(sent, 5), &mut expect, sent, &t), None);
        assert_eq!(expect, before);
        assert!(expect <= sent);
    }

    #[test]
    fn fan_out_arrivals_tell_gaps_late_and_duplicate_messages_apart() {
        let mut t = Track::default();
        assert_eq!(t.arrive(0), Arrival::Next);
        assert_eq!(t.arrive(3), Arrival::Next, "1 and 2 skipped");
        assert_eq!(t.missing(4), 2);
        assert_eq!(t.arrive(2), Arrival::Late);
        assert_eq!(t.arrive(2), Arrival::Again);
        assert_eq!(t.arrive(3), Arrival::Again);
        assert_eq!(t.missing(6), 1 + 2, "1, then 4 and 5 never came");
        // A huge gap is counted in one step, its start remembered.
        let mut t = Track::default();
        assert_eq!(t.arrive(u32::MAX), Arrival::Next);
        assert_eq!(t.gaps.len(), MAX_GAPS);
        assert_eq!(t.missing(u64::from(u32::MAX) + 1), u64::from(u32::MAX));
        assert_eq!(t.arrive(5), Arrival::Late);
        assert_eq!(t.arrive(u32::MAX - 1), Arrival::Again, "forgotten: not told apart");
    }

    /// The crate's own echo server on a thread: its URL, its handle and the thread.
    #[cfg(feature = "server")]
    fn echo_server() -> (
        super::super::Target,
        crate::server::Handle,
        std::thread::JoinHandle<io::Result<()>>,
    ) {
        let server = crate::server::Server::bind("127.0.0.1:0", crate::server::ServerConfig::default()).unwrap();
        let target = super::super::Target::parse(&format!("ws://{}/", server.local_addr())).unwrap();
        let handle = server.handle();
        (
            target,
            handle,
            std::thread::spawn(move || server.run(crate::server::Echo)),
        )
    }

    /// The whole loop against the crate's own echo server: every load, every echo checked.
    #[cfg(feature = "server")]
    #[test]
    fn runs_clean_against_the_echo_server() {
        let (target, handle, thread) = echo_server();
        for (load, size) in [
            (Load::Saturate(4), 16),
            (Load::Saturate(1), 100_000),
            (Load::Periodic(Duration::from_millis(20)), 40),
            (Load::Rate(1000), 16),
            (Load::Idle, 16),
        ] {
            let mut cfg = BenchConfig::new(target.clone());
            cfg.connections = 20;
            cfg.load = load;
            cfg.size = size;
            cfg.duration = Duration::from_millis(300);
            cfg.server_pid = Some(std::process::id());
            let mut calls = 0;
            let r = super::super::run(&cfg, &mut |_| calls += 1).unwrap();
            assert!(r.is_clean(), "{load:?}: {r}");
            assert_eq!((r.held, r.opened), (20, 20), "{load:?}");
            if load != Load::Idle {
                assert!(r.received > 0 && r.received == r.sent, "{load:?}: {r}");
                assert!(r.latency.is_some());
            }
            assert!(r.server.and_then(|s| s.rss_held).is_some());
            let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("valid JSON");
            assert_eq!(json["clean"], serde_json::Value::Bool(true));
            assert_eq!(json["held"], 20);
            assert_eq!(json["sent"].as_u64(), Some(r.sent));
        }
        handle.shutdown().unwrap();
        thread.join().unwrap().unwrap();
    }

    /// One sample per second of the run, whose counts add up to the run's and whose values
    /// are those of a loopback echo server.
    #[cfg(feature = "server")]
    #[test]
    fn the_timeline_has_one_sane_sample_per_second() {
        let (target, handle, thread) = echo_server();
        let mut cfg = BenchConfig::new(target);
        cfg.connections = 20;
        cfg.load = Load::Periodic(Duration::from_millis(10));
        cfg.duration = Duration::from_millis(2_500);
        cfg.server_pid = Some(std::process::id());
        let r = super::super::run(&cfg, &mut |_| {}).unwrap();
        assert!(r.is_clean(), "{r}");
        let t = &r.timeline;
        let end = t.last().expect("samples").at;
        // Whole seconds, then the last part of one: ceil(end) samples.
        assert_eq!(t.len() as u128, end.as_millis().div_ceil(1000), "{t:#?}");
        for (i, s) in t.iter().enumerate() {
            let due = Duration::from_secs(i as u64 + 1);
            if i + 1 < t.len() {
                // A sample is taken when its second is due (a loaded machine may be late).
                assert!(s.at >= due && s.at < due + Duration::from_millis(900), "{i}: {s:?}");
            } else {
                assert!(s.at <= due, "{i}: {s:?}");
            }
            assert!(s.connections <= 20, "{s:?}");
            assert!(s.p50 <= s.p99, "{s:?}");
            assert_eq!(s.p50.is_some(), s.round_trips() > 0);
            let rss = s.server_rss.expect("the server's RSS each second");
            assert!((1 << 20..1 << 34).contains(&rss), "{s:?}");
            // The last sample may be too short for a CPU figure.
            if let Some(cpu) = s.server_cpu {
                assert!((0.0..=r.cores as f64 + 0.5).contains(&cpu), "{s:?}");
            } else {
                assert_eq!(i + 1, t.len(), "the server's CPU each whole second: {s:?}");
            }
        }
        // Every message of the run is in exactly one second.
        assert_eq!(t.iter().map(|s| s.sent).sum::<u64>(), r.sent);
        assert_eq!(t.iter().map(|s| s.received).sum::<u64>(), r.received);
        assert_eq!(t.iter().map(|s| s.round_trips()).sum::<u64>(), r.latency.unwrap().count);
        // The middle seconds are in the measured phase: every connection open, about 2,000
        // messages a second (20 connections, one every 10 ms).
        assert_eq!(t[1].connections, 20, "{t:#?}");
        assert!((500..=2_400).contains(&t[1].sent), "{t:#?}");
        assert!(t[1].p99.is_some());
        // In the JSON, as `timeline`.
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let tl = json["timeline"].as_array().unwrap();
        assert_eq!(tl.len(), t.len());
        assert_eq!(tl[1]["connections"], 20);
        assert_eq!(tl[1]["sent"].as_u64(), Some(t[1].sent));
        assert!(tl[1]["p99_us"].as_f64().unwrap() >= tl[1]["p50_us"].as_f64().unwrap());
        assert!(tl[1]["server_rss"].as_u64().is_some() && tl[1]["server_cpu"].as_f64().is_some());
        handle.shutdown().unwrap();
        thread.join().unwrap().unwrap();
    }

    /// A periodic load whose period is the measured phase sends exactly one message on every
    /// connection; reports pass through their text form unchanged and merge exactly.
    #[cfg(feature = "server")]
    #[test]
    fn one_message_per_connection_and_reports_merge() {
        use super::super::Target;
        let (target, handle, thread) = echo_server();
        let mut cfg = BenchConfig::new(target);
        cfg.connections = 30;
        cfg.load = Load::Periodic(Duration::from_millis(300));
        cfg.duration = Duration::from_millis(300);
        let a = super::super::run(&cfg, &mut |_| {}).unwrap();
        assert!(a.is_clean(), "{a}");
        assert_eq!((a.sent, a.received), (30, 30), "{a}");
        cfg.connections = 20;
        cfg.load = Load::Saturate(2);
        cfg.server_pid = Some(std::process::id());
        let b = super::super::run(&cfg, &mut |_| {}).unwrap();
        assert!(b.is_clean() && b.sent > 40, "{b}");
        for r in [&a, &b] {
            let back = Report::from_json(&r.to_json()).expect("reads back");
            assert_eq!(&back, r);
            assert_eq!(back.to_json(), r.to_json());
            assert!(*back.hist == *r.hist);
        }
        // A report with a first error (spaces, a colon) passes through too.
        let mut refused = BenchConfig::new(Target::parse("ws://127.0.0.1:9/").unwrap());
        refused.connections = 2;
        let r = super::super::run(&refused, &mut |_| {}).unwrap();
        assert!(r.first_error.as_deref().is_some_and(|e| e.contains(' ')), "{r}");
        assert_eq!(Report::from_json(&r.to_json()).unwrap(), r);
        assert!(Report::from_json("url=x").is_err());
        let m = Report::merge(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((m.connections, m.held, m.opened, m.processes), (50, 50, 50, 2));
        assert_eq!((m.sent, m.received), (a.sent + b.sent, a.received + b.received));
        let l = m.latency.unwrap();
        assert_eq!(l.count, m.received);
        assert_eq!(l.max, a.latency.unwrap().max.max(b.latency.unwrap().max));
        assert_eq!(m.server, b.server, "the first part with server figures");
        assert_eq!(m.connect_time, a.connect_time.max(b.connect_time));
        assert!(m.is_clean());
        assert!(Report::merge(&[]).is_none());
        // The timelines add up second by second.
        let seconds = a.timeline.len().max(b.timeline.len());
        assert_eq!(m.timeline.len(), seconds);
        let sum = |t: &[super::super::Sample]| t.iter().map(|s| s.received).sum::<u64>();
        assert_eq!(sum(&m.timeline), m.received);
        // A part cut short makes the whole run so.
        let mut cut = a.clone();
        cut.interrupted = true;
        assert_eq!(Report::from_json(&cut.to_json()).unwrap(), cut);
        assert!(Report::merge(&[b.clone(), cut]).unwrap().interrupted);
        assert!(!m.interrupted);
        handle.shutdown().unwrap();
        thread.join().unwrap().unwrap();
    }

    /// The open model's, the fan-out's and the status figures pass between processes and merge.
    #[cfg(feature = "server")]
    #[test]
    fn open_model_and_fan_out_figures_cross_processes_and_merge() {
        let (target, handle, thread) = echo_server();
        let mut cfg = BenchConfig::new(target);
        cfg.connections = 4;
        cfg.load = Load::Rate(400);
        cfg.duration = Duration::from_millis(500);
        let mut a = super::super::run(&cfg, &mut |_| {}).unwrap();
        assert!(a.is_clean(), "{a}");
        let s = a.schedule.expect("a schedule");
        assert_eq!((s.asked, s.unsent), (400, 0));
        assert!((150..=250).contains(&a.sent), "{a}");
        assert_eq!(s.lag.map(|l| l.count), Some(a.sent));
        a.handshake_statuses = vec![(401, 2), (503, 1)];
        a.close_codes = vec![(1006, 1)];
        a.fanout = Some(Fanout {
            publishers: 1,
            published: 7,
            expected: 3,
            missing: 2,
            ..Fanout::default()
        });
        let back = Report::from_json(&a.to_json()).expect("reads back");
        assert_eq!(back, a);
        assert!(!back.is_clean(), "messages missing");
        let mut b = a.clone();
        b.handshake_statuses = vec![(401, 1), (403, 4)];
        let m = Report::merge(&[a.clone(), b]).unwrap();
        assert_eq!(m.handshake_statuses, [(401, 3), (403, 4), (503, 1)]);
        assert_eq!(m.close_codes, [(1006, 2)]);
        let ms = m.schedule.unwrap();
        assert_eq!((ms.asked, ms.lag.map(|l| l.count)), (800, Some(2 * a.sent)));
        handle.shutdown().unwrap();
        thread.join().unwrap().unwrap();
    }
}
