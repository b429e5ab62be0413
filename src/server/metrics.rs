//! Metrics in the Prometheus text exposition format 0.0.4, answered for `GET /metrics` (see
//! [`ServerConfig::metrics`](super::ServerConfig::metrics)).
//!
//! Counting costs nothing shared: each loop counts in plain integers of its own state (only its
//! thread touches them), as it did for [`Stats`](super::Stats). Every
//! [`PUBLISH_EVERY`] (and only while metrics are on) each loop copies its counters into its
//! slot of the server's [`Board`], a mutex taken for that copy and by a scrape, never on a
//! message's way. A scrape, on whichever loop it lands, takes its own loop's counters fresh and
//! the others' last copies, and sums the loops (they share a process, start and stop together:
//! one series per metric is what a dashboard wants).
//!
//! Processes ([`MetricsBoard`], `wsloop serve --processes`) are different: a worker that dies is
//! restarted with its counters at zero. Its series are labelled `worker="N"`, so that
//! Prometheus sees a counter reset in that series alone (what `rate()` expects) rather than a
//! sum that goes back. Each worker copies its process's sums into its slot of memory shared
//! with the others every [`PUBLISH_EVERY`]; the worker a scrape lands on reads every slot.

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often each loop publishes its counters while metrics are on: what a scrape may lag
/// behind on the loops (and processes) it did not land on.
pub(crate) const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// The driver timer that publishes the loop's counters.
pub(super) const PUBLISH_TIMER: u64 = (u64::MAX >> 1) - 1;

/// Close codes with a label of their own; any other counts as `code="other"`.
const CLOSE_CODES: [u16; 15] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015,
];

/// Refusal statuses with a label of their own; any other counts as `status="other"`.
const STATUSES: [u16; 14] = [400, 401, 403, 404, 405, 408, 409, 413, 426, 429, 431, 500, 501, 503];

// Word indexes in a snapshot. Gauges first.
const CONNECTIONS: usize = 0;
const QUEUED: usize = 1;
const MEMORY: usize = 2;
const MEMORY_LIMIT: usize = 3;
const FDS: usize = 4;
const CLUSTER_UP: usize = 5;
const DRAINING: usize = 6;
const UPTIME: usize = 7;
// Counters.
const MSG_IN: usize = 8;
const MSG_OUT: usize = 9;
const BYTES_IN: usize = 10;
const BYTES_OUT: usize = 11;
const ACCEPTED: usize = 12;
const OPENED: usize = 13;
const SLOW_CLOSES: usize = 14;
const BUDGET_CLOSES: usize = 15;
const DROPPED: usize = 16;
const TLS_OK: usize = 17;
const TLS_FAILED: usize = 18;
const INFLATED_IN: usize = 19;
const INFLATED_OUT: usize = 20;
const COMPRESSED_IN: usize = 21;
const COMPRESSED_OUT: usize = 22;
const CLUSTER_DROPPED_OUT: usize = 23;
const CLUSTER_DROPPED_IN: usize = 24;
const CLUSTER_LOST: usize = 25;
/// 1 when a cluster is configured (its metrics are written only then).
const CLUSTER_ON: usize = 26;
const CLOSES: usize = 27;
const REFUSED: usize = CLOSES + CLOSE_CODES.len() + 1;
/// Words in a snapshot.
const WORDS: usize = REFUSED + STATUSES.len() + 1;

/// Metrics without labels: word, name, type, help.
const PLAIN: [(usize, &str, &str, &str); 26] = [
    (
        CONNECTIONS,
        "wsloop_connections",
        "gauge",
        "Open WebSocket connections.",
    ),
    (
        QUEUED,
        "wsloop_queued_bytes",
        "gauge",
        "Bytes waiting in outbound queues.",
    ),
    (
        MEMORY,
        "wsloop_memory_bytes",
        "gauge",
        "Memory counted against the budget (buffers for peers).",
    ),
    (
        MEMORY_LIMIT,
        "wsloop_memory_limit_bytes",
        "gauge",
        "The memory budget (--max-memory).",
    ),
    (FDS, "wsloop_open_fds", "gauge", "Open file descriptors of the process."),
    (
        DRAINING,
        "wsloop_draining",
        "gauge",
        "1 while the server drains before it stops, else 0.",
    ),
    (
        UPTIME,
        "wsloop_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
    ),
    (
        MSG_IN,
        "wsloop_messages_received_total",
        "counter",
        "Messages received.",
    ),
    (
        MSG_OUT,
        "wsloop_messages_sent_total",
        "counter",
        "Messages sent (a broadcast counts once per peer).",
    ),
    (
        BYTES_IN,
        "wsloop_received_bytes_total",
        "counter",
        "Bytes read from connections: frames and requests (after TLS).",
    ),
    (
        BYTES_OUT,
        "wsloop_sent_bytes_total",
        "counter",
        "Bytes handed to connections to send: frames and answers (before TLS).",
    ),
    (
        ACCEPTED,
        "wsloop_accepted_total",
        "counter",
        "TCP connections accepted (refused ones too).",
    ),
    (
        OPENED,
        "wsloop_connections_opened_total",
        "counter",
        "WebSocket handshakes completed.",
    ),
    (
        SLOW_CLOSES,
        "wsloop_slow_consumer_closes_total",
        "counter",
        "Peers closed with 1008 because their queue was full on a broadcast.",
    ),
    (
        BUDGET_CLOSES,
        "wsloop_budget_closes_total",
        "counter",
        "Peers closed with 1013 because the memory budget ran out.",
    ),
    (
        DROPPED,
        "wsloop_dropped_messages_total",
        "counter",
        "Broadcast messages skipped for slow consumers or a loop far behind.",
    ),
    (
        TLS_OK,
        "wsloop_tls_handshakes_total",
        "counter",
        "TLS handshakes completed.",
    ),
    (
        TLS_FAILED,
        "wsloop_tls_handshake_failures_total",
        "counter",
        "TLS sessions that failed.",
    ),
    (
        INFLATED_IN,
        "wsloop_deflate_received_compressed_bytes_total",
        "counter",
        "Compressed bytes received and inflated (permessage-deflate).",
    ),
    (
        INFLATED_OUT,
        "wsloop_deflate_received_inflated_bytes_total",
        "counter",
        "What the compressed bytes received inflated to.",
    ),
    (
        COMPRESSED_IN,
        "wsloop_deflate_sent_plain_bytes_total",
        "counter",
        "Payload bytes of the messages sent compressed, before compression.",
    ),
    (
        COMPRESSED_OUT,
        "wsloop_deflate_sent_compressed_bytes_total",
        "counter",
        "The same messages' bytes after compression.",
    ),
    (
        CLUSTER_UP,
        "wsloop_cluster_up",
        "gauge",
        "1 while the cluster bus is connected to Redis, else 0.",
    ),
    (
        CLUSTER_DROPPED_OUT,
        "wsloop_cluster_dropped_out_total",
        "counter",
        "Cluster messages not sent (Redis down, queue or budget full).",
    ),
    (
        CLUSTER_DROPPED_IN,
        "wsloop_cluster_dropped_in_total",
        "counter",
        "Cluster messages received that a full loop missed.",
    ),
    (
        CLUSTER_LOST,
        "wsloop_cluster_lost_total",
        "counter",
        "Broadcasts of other instances that never arrived.",
    ),
];

/// Whether word `w` is a cluster metric (written only with a cluster).
fn is_cluster(w: usize) -> bool {
    matches!(w, CLUSTER_UP | CLUSTER_DROPPED_OUT | CLUSTER_DROPPED_IN | CLUSTER_LOST)
}

/// Every metric of a server (or of one loop or process) at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot([u64; WORDS]);

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot([0; WORDS])
    }
}

impl Snapshot {
    /// Adds `other` word by word (the process's gauges are set after, not summed).
    fn add(&mut self, other: &Snapshot) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// A loop's counters that [`Stats`](super::Stats) does not hold: plain integers, touched only
/// by the loop's thread.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: u64,
    pub(crate) opened: u64,
    pub(crate) slow_closes: u64,
    pub(crate) budget_closes: u64,
    closes: [u64; CLOSE_CODES.len() + 1],
    refused: [u64; STATUSES.len() + 1],
}

impl Counters {
    /// A connection ended with `code` (the code `on_close` got).
    pub(crate) fn closed(&mut self, code: u16) {
        let i = CLOSE_CODES.iter().position(|&c| c == code).unwrap_or(CLOSE_CODES.len());
        self.closes[i] += 1;
    }

    /// A handshake was refused with `status`.
    pub(crate) fn refused(&mut self, status: u16) {
        let i = STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len());
        self.refused[i] += 1;
    }
}

/// What one loop knows of itself, for its snapshot.
pub(crate) struct LoopView {
    pub(crate) stats: super::Stats,
    pub(crate) counters: Counters,
    /// The engine's bytes in and out.
    pub(crate) bytes: (u64, u64),
    pub(crate) queued: u64,
    pub(crate) tls: (u64, u64),
    /// permessage-deflate: inflated in/out, compressed in/out.
    pub(crate) deflate: [u64; 4],
}

impl LoopView {
    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let (st, c) = (&self.stats, &self.counters);
        s.0[CONNECTIONS] = st.open as u64;
        s.0[QUEUED] = self.queued;
        s.0[MSG_IN] = st.messages_in;
        s.0[MSG_OUT] = st.messages_out;
        (s.0[BYTES_IN], s.0[BYTES_OUT]) = self.bytes;
        s.0[ACCEPTED] = c.accepted;
        s.0[OPENED] = c.opened;
        s.0[SLOW_CLOSES] = c.slow_closes;
        s.0[BUDGET_CLOSES] = c.budget_closes;
        s.0[DROPPED] = st.dropped;
        (s.0[TLS_OK], s.0[TLS_FAILED]) = self.tls;
        s.0[INFLATED_IN..=COMPRESSED_OUT].copy_from_slice(&self.deflate);
        s.0[CLOSES..REFUSED].copy_from_slice(&c.closes);
        s.0[REFUSED..WORDS].copy_from_slice(&c.refused);
        // Refusals for want of room are counted in the stats.
        let i = STATUSES.iter().position(|&s| s == 503).unwrap_or(STATUSES.len());
        s.0[REFUSED + i] += st.refused;
        s
    }
}

/// What the process knows of itself, set on the sum of its loops.
pub(crate) struct ProcessView {
    pub(crate) memory: usize,
    pub(crate) memory_limit: usize,
    /// `None` without a cluster; else whether it is up, and its drops out, in and losses.
    pub(crate) cluster: Option<(bool, [u64; 3])>,
}

/// Memory shared between forked worker processes serving one port
/// ([`ServerConfig::reuse_port`](super::ServerConfig::reuse_port)), through which each worker
/// publishes its metrics so that a scrape answered by any of them shows every worker, as
/// series labelled `worker="N"`.
///
/// Made once with [`new`](Self::new) before forking (the mapping is inherited), then given to
/// each worker's [`ServerConfig::metrics_board`](super::ServerConfig::metrics_board) as
/// [`for_worker(n)`](Self::for_worker). A supervisor [`clear`](Self::clear)s the slot of a
/// worker that died, so that its last gauges do not linger.
#[derive(Clone, Copy, Debug)]
pub struct MetricsBoard {
    words: &'static [AtomicU64],
    workers: usize,
    /// This worker's number, from 1 (0: not a worker).
    index: usize,
}

/// Words per worker: a published flag, then a snapshot.
const SLOT: usize = WORDS + 1;

impl MetricsBoard {
    /// LoopState memory for `workers` workers (numbered from 1), all empty: an anonymous
    /// `MAP_SHARED` mapping, never unmapped. Fails when `workers` is 0 or the mapping cannot be
    /// made.
    pub fn new(workers: usize) -> io::Result<MetricsBoard> {
        let n = workers
            .checked_mul(SLOT)
            .filter(|_| workers > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a metrics board needs 1 worker or more"))?;
        let len = n
            .checked_mul(std::mem::size_of::<AtomicU64>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many workers"))?;
        // SAFETY: a fresh anonymous mapping, asking for no address: it aliases nothing.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the mapping is page-aligned (enough for AtomicU64), `len` bytes long,
        // zero-filled (any 8 bytes are a valid AtomicU64) and never unmapped, so the slice may
        // live for 'static; atomics make the other processes' writes sound.
        let words = unsafe { std::slice::from_raw_parts(at.cast::<AtomicU64>(), n) };
        Ok(MetricsBoard {
            words,
            workers,
            index: 0,
        })
    }

    /// The board as worker `index` (from 1) uses it: it publishes into slot `index`.
    pub fn for_worker(self, index: usize) -> MetricsBoard {
        MetricsBoard { index, ..self }
    }

    /// Empties worker `index`'s slot (it died; its replacement publishes again from zero).
    pub fn clear(&self, index: usize) {
        if let Some(slot) = self.slot(index) {
            for w in slot {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    fn slot(&self, index: usize) -> Option<&'static [AtomicU64]> {
        let i = index.checked_sub(1).filter(|&i| i < self.workers)?;
        self.words.get(i * SLOT..(i + 1) * SLOT)
    }

    fn publish(&self, s: &Snapshot) {
        if let Some(slot) = self.slot(self.index) {
            for (w, v) in slot[1..].iter().zip(s.0.iter()) {
                w.store(*v, Ordering::Relaxed);
            }
            slot[0].store(1, Ordering::Release);
        }
    }

    fn read(&self, index: usize) -> Option<Snapshot> {
        let slot = self.slot(index)?;
        if slot[0].load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut s = Snapshot::default();
        for (v, w) in s.0.iter_mut().zip(slot[1..].iter()) {
            *v = w.load(Ordering::Relaxed);
        }
        Some(s)
    }
}

/// What the loops of one server share for metrics and health.
pub(crate) struct Board {
    pub(crate) started: Instant,
    /// Draining: accepting stopped, `/health` answers 503.
    pub(crate) draining: AtomicBool,
    loops: Box<[Mutex<Snapshot>]>,
    workers: Option<MetricsBoard>,
    /// Metrics are served: count the descriptors when publishing (workers without metrics
    /// publish only for `/health`'s connection count).
    fds: bool,
    /// The last count of open descriptors and when it was taken: counting reads every entry of
    /// `/proc/self/fd`, so scrapes in a row (a peer asking for `/metrics` in a loop) share one
    /// count a second instead of each walking every connection's descriptor.
    fd_count: Mutex<Option<(Instant, u64)>>,
}

/// How long a count of open descriptors serves.
const FD_COUNT_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Board {
    pub(crate) fn new(loops: usize, workers: Option<MetricsBoard>, fds: bool) -> Board {
        Board {
            started: Instant::now(),
            draining: AtomicBool::new(false),
            loops: (0..loops).map(|_| Mutex::new(Snapshot::default())).collect(),
            workers,
            fds,
            fd_count: Mutex::new(None),
        }
    }

    /// Open descriptors of this process, counted at most once per [`FD_COUNT_AGE`].
    fn open_fds(&self) -> u64 {
        let mut last = self.fd_count.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match *last {
            Some((at, n)) if now.duration_since(at) < FD_COUNT_AGE => n,
            _ => {
                let n = crate::io::sys::count_fds(std::process::id()).unwrap_or(0);
                *last = Some((now, n));
                n
            }
        }
    }

    /// Stores loop `lp`'s snapshot; loop 0 also publishes the process's sums for the other
    /// workers (once per process: it counts the descriptors).
    pub(crate) fn publish(&self, lp: usize, view: &LoopView, process: &ProcessView) {
        if let Some(slot) = self.loops.get(lp) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = view.snapshot();
        }
        if let Some(w) = self.workers.as_ref().filter(|_| lp == 0) {
            w.publish(&self.process_sum(None, process, self.fds));
        }
    }

    /// The process's loops summed (loop `fresh` taken from `fresh_view` rather than its last
    /// copy), with the process's own gauges.
    fn process_sum(&self, fresh: Option<(usize, &LoopView)>, process: &ProcessView, fds: bool) -> Snapshot {
        let mut sum = Snapshot::default();
        for (lp, slot) in self.loops.iter().enumerate() {
            match fresh {
                Some((f, view)) if f == lp => sum.add(&view.snapshot()),
                _ => sum.add(&slot.lock().unwrap_or_else(|e| e.into_inner())),
            }
        }
        sum.0[MEMORY] = process.memory as u64;
        sum.0[MEMORY_LIMIT] = process.memory_limit as u64;
        if fds {
            sum.0[FDS] = self.open_fds();
        }
        sum.0[DRAINING] = u64::from(self.draining.load(Ordering::Relaxed));
        sum.0[UPTIME] = self.started.elapsed().as_secs();
        if let Some((up, [out, inn, lost])) = process.cluster {
            sum.0[CLUSTER_ON] = 1;
            sum.0[CLUSTER_UP] = u64::from(up);
            sum.0[CLUSTER_DROPPED_OUT] = out;
            sum.0[CLUSTER_DROPPED_IN] = inn;
            sum.0[CLUSTER_LOST] = lost;
        }
        sum
    }

    /// Open connections of the whole server (every worker's, as last published), given this
    /// process's `here`.
    pub(crate) fn connections(&self, here: usize) -> u64 {
        let mut n = here as u64;
        if let Some(w) = &self.workers {
            for i in (1..=w.workers).filter(|&i| i != w.index) {
                n += w.read(i).map_or(0, |s| s.0[CONNECTIONS]);
            }
        }
        n
    }

    /// The page for `GET /metrics`, answered by loop `lp` with its fresh view.
    pub(crate) fn render(&self, lp: usize, view: &LoopView, process: &ProcessView) -> String {
        let here = self.process_sum(Some((lp, view)), process, true);
        // (label, snapshot): this process alone, or every worker that has published.
        let mut rows: Vec<(Option<usize>, Snapshot)> = Vec::new();
        match &self.workers {
            None => rows.push((None, here)),
            Some(w) => {
                w.publish(&here);
                for i in 1..=w.workers {
                    let s = if i == w.index { Some(here) } else { w.read(i) };
                    if let Some(s) = s {
                        rows.push((Some(i), s));
                    }
                }
            }
        }
        let cluster = rows.iter().any(|(_, s)| s.0[CLUSTER_ON] != 0);
        let mut out = String::with_capacity(8192);
        for (w, name, kind, help) in PLAIN {
            if is_cluster(w) && !cluster {
                continue;
            }
            head(&mut out, name, kind, help);
            for (worker, s) in &rows {
                series(&mut out, name, *worker, None, s.0[w]);
            }
        }
        head(
            &mut out,
            "wsloop_closes_total",
            "counter",
            "WebSocket connections ended, by the close code on_close got (1006: no close frame).",
        );
        for (worker, s) in &rows {
            for (i, code) in CLOSE_CODES
                .iter()
                .map(|c| c.to_string())
                .chain(["other".into()])
                .enumerate()
            {
                series(
                    &mut out,
                    "wsloop_closes_total",
                    *worker,
                    Some(("code", &code)),
                    s.0[CLOSES + i],
                );
            }
        }
        head(
            &mut out,
            "wsloop_handshakes_refused_total",
            "counter",
            "Handshakes refused, by HTTP status.",
        );
        for (worker, s) in &rows {
            for (i, status) in STATUSES
                .iter()
                .map(|c| c.to_string())
                .chain(["other".into()])
                .enumerate()
            {
                let name = "wsloop_handshakes_refused_total";
                series(&mut out, name, *worker, Some(("status", &status)), s.0[REFUSED + i]);
            }
        }
        out
    }
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// One sample line, with a `worker` label when there are workers and one more label.
fn series(out: &mut String, name: &str, worker: Option<usize>, label: Option<(&str, &str)>, v: u64) {
    out.push_str(name);
    match (worker, label) {
        (None, None) => {}
        (Some(w), None) => {
            let _ = write!(out, "{{worker=\"{w}\"}}");
        }
        (None, Some((k, l))) => {
            let _ = write!(out, "{{{k}=\"{l}\"}}");
        }
        (Some(w), Some((k, l))) => {
            let _ = write!(out, "{{worker=\"{w}\",{k}=\"{l}\"}}");
        }
    }
    let _ = writeln!(out, " {v}");
}

/// The content type of the text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> LoopView {
        let mut counters = Counters::default();
        counters.closed(1000);
        counters.closed(4000);
        counters.refused(403);
        LoopView {
            stats: super::super::Stats {
                open: 2,
                messages_in: 5,
                ..Default::default()
            },
            counters,
            bytes: (0, 0),
            queued: 0,
            tls: (0, 0),
            deflate: [0; 4],
        }
    }

    #[test]
    fn loops_are_summed_and_labels_kept_few() {
        let board = Board::new(2, None, true);
        let process = ProcessView {
            memory: 10,
            memory_limit: 100,
            cluster: None,
        };
        board.publish(1, &view(), &process);
        let text = board.render(0, &view(), &process);
        assert!(text.contains("\nwsloop_connections 4\n"), "{text}");
        assert!(text.contains("\nwsloop_messages_received_total 10\n"), "{text}");
        assert!(text.contains("\nwsloop_closes_total{code=\"1000\"} 2\n"), "{text}");
        assert!(text.contains("\nwsloop_closes_total{code=\"other\"} 2\n"), "{text}");
        assert!(
            text.contains("\nwsloop_handshakes_refused_total{status=\"403\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("\nwsloop_memory_limit_bytes 100\n"), "{text}");
        assert!(!text.contains("cluster"), "no cluster metrics without one");
    }

    #[test]
    fn workers_each_get_their_series() {
        let shared = MetricsBoard::new(3).unwrap();
        let process = ProcessView {
            memory: 0,
            memory_limit: 1,
            cluster: Some((true, [1, 2, 3])),
        };
        Board::new(1, Some(shared.for_worker(2)), true).publish(0, &view(), &process);
        let text = Board::new(1, Some(shared.for_worker(1)), true).render(0, &view(), &process);
        assert!(text.contains("\nwsloop_connections{worker=\"1\"} 2\n"), "{text}");
        assert!(text.contains("\nwsloop_connections{worker=\"2\"} 2\n"), "{text}");
        assert!(
            !text.contains("worker=\"3\""),
            "a worker that never published has no series"
        );
        assert!(text.contains("\nwsloop_cluster_lost_total{worker=\"2\"} 3\n"), "{text}");
        shared.clear(2);
        assert!(shared.read(2).is_none());
        assert!(MetricsBoard::new(0).is_err());
    }
}
