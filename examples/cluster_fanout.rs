//! Broadcast fan-out through the cluster bus, measured: deliveries per server CPU-second,
//! delivery latency, and Redis's own CPU.
//!
//! Starts what it measures as child processes: optionally a private `redis-server`, and
//! `wsloop serve --mode broadcast --no-echo-self` (with `--processes N` and `--cluster` as
//! asked). Subscribers are spread over client processes (this program run again with
//! `--child`), each holding up to `--per-child` connections on one mio loop, connection `n`
//! bound to source address `127.0.0.(2 + n mod 253)` so that no address runs short of ports.
//! One publisher connection then sends binary messages at a fixed rate; each carries a round
//! number, a sequence number and its send time (`CLOCK_MONOTONIC`, which every process on
//! the machine shares), padded to `--sizes`. Every subscriber records the delivery latency
//! (whole frame received − sent) in a histogram and counts gaps and late (duplicate or
//! out-of-order) messages. The parent merges the histograms (percentiles of every delivery,
//! never an average of percentiles) and the per-message arrival counts.
//!
//! ```text
//! cargo build --release && cargo build --release --example cluster_fanout
//! F=target/release/examples/cluster_fanout
//! # one server process, no Redis, 10,000 subscribers: every size × rate, one row each
//! $F --subscribers 10000 --sizes 16,1024 --rates 10,100,1000 --seconds 10
//! # the same through a private Redis, then over 4 processes
//! $F --redis --subscribers 10000 --sizes 16,1024 --rates 10,100,1000 --seconds 10
//! $F --redis --processes 4 --subscribers 10000 --sizes 16,1024 --rates 10,100,1000 --seconds 10
//! # one message to a million peers over 53 processes, then 10 a second for a minute
//! $F --redis --processes 53 --subscribers 1000000 --sizes 16 --once --rates 10 --seconds 60 --reuse \
//!     --connect-timeout 600s --warmup-timeout 300s --drain-timeout 300s --settle-timeout 300s
//! ```
//!
//! Each round (one size and rate) gets a fresh server and fresh subscribers (`--reuse` keeps
//! one set for every round, lightest first), and is measured from just before its first
//! publish until every open subscriber has its last message, or `--drain-timeout` after the
//! last publish. Over that window the server's CPU time is the sum over its process and every
//! child of it (the workers, their loops and their Redis bridge threads) from `/proc/PID/stat`
//! (10 ms ticks), and Redis's is what its own `INFO cpu` says it used (private Redis only).
//! Before the rounds a warm-up message goes out, and another whenever the last one has stopped
//! reaching new subscribers for a second, until every subscriber has had one: every server
//! instance is then subscribed to Redis. The clients share the machine's cores with the
//! server and Redis; their CPU and the load average are reported too. `--json` prints one JSON
//! object per round with every figure (percentiles to p99.9, per-message reach, gaps, late and
//! duplicate messages, connect time).
//!
//! One server process holds at most its open-file limit less 64 connections (19,936 where the
//! limit is 20,000), so more subscribers need `--processes` (the tool refuses and says so);
//! `--processes N` needs ⌈subscribers ÷ N⌉ plus headroom for the spread of `SO_REUSEPORT`
//! within that limit (100,000 need 6 processes, a million 53).
//!
//! Every phase is bounded in count and time; every child dies with this process. Loopback only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{json, Value};

/// Bytes at the start of every published payload: round (u32), sequence (u32), send time in
/// monotonic nanoseconds (u64), big-endian.
const PAYLOAD_HEAD: usize = 16;
/// Source addresses: 127.0.0.2 ..= 127.0.0.254.
const SOURCES: u32 = 253;
/// Most subscribers in one run: the system-wide descriptor limit (`fs.file-max`, 2.47 million
/// here) must hold both ends of every connection.
const MAX_SUBSCRIBERS: usize = 1_200_000;
/// Most client processes.
const MAX_CHILDREN: usize = 100;
/// Most messages in one round (each child keeps a count and a time per message).
const MAX_MESSAGES: usize = 200_000;
/// Descriptors a client process keeps for itself beyond its connections.
const CHILD_FD_RESERVE: usize = 64;
/// The warm-up round's messages at most (one a second).
const WARMUP_MESSAGES: u32 = 30;
/// A child's answer to a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// Round 1 is the warm-up; measured rounds follow.
const WARMUP_ROUND: u32 = 1;

/// The monotonic clock in nanoseconds (`CLOCK_MONOTONIC`, shared by every process here).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ------------------------------------------------------------------------------------------
// Latency histogram: the load generator's log-linear buckets (exact below 256 ns, then 128 per
// power of two, each under 0.8 % wide), so the children's histograms merge exactly.

const SUB_BITS: u32 = 7;

#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

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

    /// `[max, [bucket, count], ...]`.
    fn to_json(&self) -> Value {
        let used: Vec<Value> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| json!([i, c]))
            .collect();
        json!([self.max, used])
    }

    fn merge_json(&mut self, v: &Value) -> Option<()> {
        self.max = self.max.max(v.get(0)?.as_u64()?);
        for pair in v.get(1)?.as_array()? {
            let i = usize::try_from(pair.get(0)?.as_u64()?).ok()?;
            let c = pair.get(1)?.as_u64()?;
            *self.counts.get_mut(i)? += c;
            self.total += c;
        }
        Some(())
    }
}

// ------------------------------------------------------------------------------------------
// Options.

struct Options {
    subscribers: usize,
    sizes: Vec<usize>,
    rates: Vec<u32>,
    /// A round of one single message before the rate rounds.
    once: bool,
    seconds: u32,
    processes: Option<usize>,
    redis: bool,
    /// An existing Redis instead of a private one (its CPU then is not measured).
    cluster_url: Option<String>,
    cluster_prefix: Option<String>,
    server: PathBuf,
    redis_server: String,
    server_args: Vec<String>,
    per_child: usize,
    in_flight: usize,
    connect_timeout: Duration,
    drain_timeout: Duration,
    warmup_timeout: Duration,
    settle_timeout: Duration,
    /// One server and one set of subscribers for every round (else fresh ones for each).
    reuse: bool,
    label: Option<String>,
    json: bool,
    /// A file each round's JSON object is appended to (one line each), beside the table.
    json_out: Option<PathBuf>,
}

fn usage() -> &'static str {
    "cluster_fanout [--subscribers N] [--sizes 16,1024] [--rates 10,100,1000] [--once] [--seconds 10]\n\
     \x20              [--processes N] [--redis | --cluster-url redis://HOST:PORT] [--cluster-prefix NAME]\n\
     \x20              [--server PATH] [--redis-server PATH] [--server-arg ARG]...\n\
     \x20              [--per-child N] [--in-flight N] [--connect-timeout 120s] [--drain-timeout 10s]\n\
     \x20              [--warmup-timeout 60s] [--settle-timeout 60s] [--reuse]\n\
     \x20              [--label TEXT] [--json] [--json-out FILE]"
}

fn parse_args() -> Result<Options, String> {
    use lexopt::prelude::*;
    let mut o = Options {
        subscribers: 10_000,
        sizes: vec![16, 1024],
        rates: vec![10, 100, 1000],
        once: false,
        seconds: 10,
        processes: None,
        redis: false,
        cluster_url: None,
        cluster_prefix: None,
        server: default_server_path(),
        redis_server: "redis-server".into(),
        server_args: Vec::new(),
        per_child: 19_000,
        in_flight: 128,
        connect_timeout: Duration::from_secs(120),
        drain_timeout: Duration::from_secs(10),
        warmup_timeout: Duration::from_secs(60),
        settle_timeout: Duration::from_secs(60),
        reuse: false,
        label: None,
        json: false,
        json_out: None,
    };
    let mut rates_given = false;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("subscribers") => o.subscribers = num(&mut p, "--subscribers")?,
            Long("sizes") => o.sizes = list(&mut p, "--sizes")?,
            Long("rates") => {
                o.rates = list(&mut p, "--rates")?;
                rates_given = true;
            }
            Long("once") => o.once = true,
            Long("seconds") => o.seconds = num(&mut p, "--seconds")?,
            Long("processes") => o.processes = Some(num(&mut p, "--processes")?),
            Long("redis") => o.redis = true,
            Long("cluster-url") => o.cluster_url = Some(val(&mut p)?),
            Long("cluster-prefix") => o.cluster_prefix = Some(val(&mut p)?),
            Long("server") => o.server = PathBuf::from(val(&mut p)?),
            Long("redis-server") => o.redis_server = val(&mut p)?,
            Long("server-arg") => o.server_args.push(val(&mut p)?),
            Long("per-child") => o.per_child = num(&mut p, "--per-child")?,
            Long("in-flight") => o.in_flight = num(&mut p, "--in-flight")?,
            Long("connect-timeout") => o.connect_timeout = dur(&val(&mut p)?, "--connect-timeout")?,
            Long("drain-timeout") => o.drain_timeout = dur(&val(&mut p)?, "--drain-timeout")?,
            Long("warmup-timeout") => o.warmup_timeout = dur(&val(&mut p)?, "--warmup-timeout")?,
            Long("settle-timeout") => o.settle_timeout = dur(&val(&mut p)?, "--settle-timeout")?,
            Long("reuse") => o.reuse = true,
            Long("label") => o.label = Some(val(&mut p)?),
            Long("json") => o.json = true,
            Long("json-out") => o.json_out = Some(PathBuf::from(val(&mut p)?)),
            Long("help") | Short('h') => {
                println!("{}", usage());
                std::process::exit(0);
            }
            _ => return Err(format!("{}\n{}", arg.unexpected(), usage())),
        }
    }
    if o.once && !rates_given {
        o.rates.clear();
    }
    if o.subscribers == 0 || o.subscribers > MAX_SUBSCRIBERS {
        return Err(format!("--subscribers must be 1..={MAX_SUBSCRIBERS}"));
    }
    if o.sizes.is_empty() || o.sizes.iter().any(|&s| !(PAYLOAD_HEAD..=16 << 20).contains(&s)) {
        return Err(format!(
            "--sizes must be {PAYLOAD_HEAD} bytes (round, sequence, send time) to 16 MiB each"
        ));
    }
    if o.rates.is_empty() && !o.once {
        return Err("nothing to send: give --rates or --once".into());
    }
    if o.rates.iter().any(|&r| r == 0 || r > 100_000) || o.seconds == 0 || o.seconds > 3600 {
        return Err("--rates must be 1..=100000 a second and --seconds 1..=3600".into());
    }
    if o.rates.iter().any(|&r| r as usize * o.seconds as usize > MAX_MESSAGES) {
        return Err(format!(
            "a round may send at most {MAX_MESSAGES} messages (rate × seconds)"
        ));
    }
    if o.processes.is_some_and(|n| n == 0 || n > 1024) {
        return Err("--processes must be 1..=1024".into());
    }
    if o.redis && o.cluster_url.is_some() {
        return Err("--redis starts a private Redis; --cluster-url uses another: give one".into());
    }
    if o.cluster_prefix.is_some() && !o.redis && o.cluster_url.is_none() {
        return Err("--cluster-prefix needs --redis or --cluster-url".into());
    }
    if o.per_child == 0 || o.in_flight == 0 {
        return Err("--per-child and --in-flight must be at least 1".into());
    }
    Ok(o)
}

fn val(p: &mut lexopt::Parser) -> Result<String, String> {
    p.value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|_| "not UTF-8".to_string())
}

fn num<T: std::str::FromStr>(p: &mut lexopt::Parser, name: &str) -> Result<T, String> {
    let v = val(p)?;
    v.parse().map_err(|_| format!("{name}: '{v}' is not a number"))
}

fn list<T: std::str::FromStr>(p: &mut lexopt::Parser, name: &str) -> Result<Vec<T>, String> {
    val(p)?
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| format!("{name}: '{s}' is not a number")))
        .collect()
}

/// `250ms`, `10s`, `2m`, or plain seconds.
fn dur(v: &str, name: &str) -> Result<Duration, String> {
    let bad = || format!("{name}: '{v}' is not a duration (e.g. 500ms, 10s, 2m)");
    let (n, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => v.split_at(at),
        None => (v, "s"),
    };
    let n: u64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err(format!("{name}: must be above 0 and at most 1 hour"));
    }
    Ok(d)
}

/// `target/<profile>/wsloop`, beside the `examples/` directory this example runs from.
fn default_server_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("wsloop")))
        .unwrap_or_else(|| PathBuf::from("target/release/wsloop"))
}

// ------------------------------------------------------------------------------------------
// Processes and /proc.

/// A child process, killed (SIGKILL) and reaped on drop.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server: on drop its supervisor is killed first (else it would restart its workers),
/// then its workers, and their end awaited (else a Redis stopped after the server sees them
/// complain).
struct ServerProc(Owned);

impl Drop for ServerProc {
    fn drop(&mut self) {
        let workers = children_of(self.0 .0.id());
        let _ = self.0 .0.kill();
        let _ = self.0 .0.wait();
        for &w in &workers {
            // SAFETY: kill takes integers. The workers were the server's children a moment ago;
            // they die with it (PR_SET_PDEATHSIG) and init reaps them, so a pid could only be
            // reused after that, which this loop does not wait for.
            unsafe { libc::kill(w as libc::pid_t, libc::SIGKILL) };
        }
        // Gone, or a zombie (state Z) waiting for init.
        let alive = |w: u32| {
            std::fs::read_to_string(format!("/proc/{w}/stat"))
                .is_ok_and(|s| s.rfind(')').and_then(|at| s[at + 1..].split_whitespace().next()) != Some("Z"))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers.iter().any(|&w| alive(w)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Asks for SIGKILL when this process's spawning thread dies, so that nothing outlives a run.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe and takes integers.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`, counted after the command name.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// CPU ticks (user + system, 1/100 s) of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_field(&s, 14)? + stat_field(&s, 15)?)
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&c| {
            std::fs::read_to_string(format!("/proc/{c}/stat")).is_ok_and(|s| stat_field(&s, 4) == Some(u64::from(pid)))
        })
        .collect()
}

/// CPU seconds of a process and all its children (the server's supervisor and workers).
fn tree_cpu(pid: u32) -> f64 {
    let ticks: u64 = std::iter::once(pid).chain(children_of(pid)).filter_map(cpu_ticks).sum();
    ticks as f64 / 100.0
}

// ------------------------------------------------------------------------------------------
// WebSocket bits.

const REQUEST_TAIL: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A masked binary frame carrying `payload`.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let size = payload.len();
    let mut f = vec![0x82u8];
    match size {
        0..=125 => f.push(0x80 | size as u8),
        126..=65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(size as u16).to_be_bytes());
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(size as u64).to_be_bytes());
        }
    }
    let key = [0x5au8, 0x17, 0xc3, 0x2e];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Source address of connection `n` of the whole run.
fn source_of(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + (n % SOURCES as usize) as u32)
}

/// A non-blocking connect from `src`, the port chosen at `connect` (`IP_BIND_ADDRESS_NO_PORT`:
/// `bind` would take a port no other socket holds on any address).
fn start_connect(server: SocketAddr, src: Ipv4Addr) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local, on a descriptor `sock` owns.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
    match sock.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}

// ------------------------------------------------------------------------------------------
// The client process: `--child`.

#[derive(Clone, Copy, PartialEq, Eq)]
enum SubPhase {
    Connecting,
    AwaitingResponse,
    Open,
    Closed,
}

/// One subscriber: its socket, where it is in the current frame, and what it got this round.
struct Sub {
    stream: TcpStream,
    phase: SubPhase,
    /// The handshake response while it comes in.
    response: Vec<u8>,
    /// The current frame's header and the first `PAYLOAD_HEAD` payload bytes.
    head: [u8; 10 + PAYLOAD_HEAD],
    head_len: u8,
    /// Whether `head` is whole and the rest of the frame is being skipped.
    body: bool,
    /// Bytes of the current frame still to come after `head`.
    skip: u64,
    /// The round `next` belongs to (reset lazily when a newer round's message arrives).
    round: u32,
    /// The next sequence number expected.
    next: u32,
}

/// What one client process counts in the current round.
struct RoundState {
    round: u32,
    messages: u32,
    delivered: u64,
    /// Sequence numbers skipped (messages that never came before a later one did).
    gaps: u64,
    /// Messages below the expected sequence number: duplicates or out of order.
    late: u64,
    /// Frames that were not a message of the current round (older rounds, control frames).
    other: u64,
    /// Frames a server should not send (masked, fragmented, short).
    malformed: u64,
    hist: Histogram,
    /// Per message: deliveries, and the last delivery's time (monotonic ns).
    seq_count: Vec<u32>,
    seq_last: Vec<u64>,
}

impl RoundState {
    fn new(round: u32, messages: u32) -> Self {
        RoundState {
            round,
            messages,
            delivered: 0,
            gaps: 0,
            late: 0,
            other: 0,
            malformed: 0,
            hist: Histogram::new(),
            seq_count: vec![0; messages as usize],
            seq_last: vec![0; messages as usize],
        }
    }
}

struct ChildOptions {
    server: SocketAddr,
    first: usize,
    count: usize,
    in_flight: usize,
    connect_timeout: Duration,
}

fn child_args(p: &mut lexopt::Parser) -> Result<ChildOptions, String> {
    use lexopt::prelude::*;
    let mut o = ChildOptions {
        server: SocketAddr::from(([127, 0, 0, 1], 0)),
        first: 0,
        count: 0,
        in_flight: 128,
        connect_timeout: Duration::from_secs(120),
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("server") => o.server = val(p)?.parse().map_err(|_| "--server: not an address")?,
            Long("first") => o.first = num(p, "--first")?,
            Long("count") => o.count = num(p, "--count")?,
            Long("in-flight") => o.in_flight = num(p, "--in-flight")?,
            Long("connect-timeout-ms") => o.connect_timeout = Duration::from_millis(num(p, "--connect-timeout-ms")?),
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    Ok(o)
}

const WAKER: Token = Token(usize::MAX);

/// Writes one line to the parent; a parent that is gone ends this process.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

fn child_main(o: ChildOptions) -> Result<(), String> {
    // The open-file limit, raised to the hard limit.
    let fds = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft))
        .unwrap_or(1024)
        .min(usize::MAX as u64) as usize;
    if o.count + CHILD_FD_RESERVE > fds {
        return Err(format!(
            "{} connections in one client process, but its open-file limit ({fds}) allows {}",
            o.count,
            fds.saturating_sub(CHILD_FD_RESERVE)
        ));
    }
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);
    // Commands come on stdin, read by a thread that wakes the loop.
    let (tx, commands) = mpsc::channel::<Option<String>>();
    {
        let waker = Arc::clone(&waker);
        thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(Some(line)).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
            let _ = tx.send(None);
            let _ = waker.wake();
        });
    }

    let started = Instant::now();
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n{REQUEST_TAIL}", o.server);
    let mut subs: Vec<Sub> = Vec::with_capacity(o.count);
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 256 << 10];
    let mut st = RoundState::new(0, 0);
    // Every frame received since the start: still growing means the server is still sending.
    let mut frames_total = 0u64;
    let (mut open, mut failed, mut pending) = (0usize, 0usize, 0usize);
    let mut first_error: Option<String> = None;
    let mut connect_done = false;
    let mut attempted = 0usize;

    loop {
        if !connect_done {
            while attempted < o.count && pending < o.in_flight && started.elapsed() < o.connect_timeout {
                // Connection n of the whole run always comes from source_of(n).
                let src = source_of(o.first + attempted);
                attempted += 1;
                match start_connect(o.server, src) {
                    Ok(mut stream) => {
                        poll.registry()
                            .register(&mut stream, Token(subs.len()), Interest::READABLE | Interest::WRITABLE)
                            .map_err(|e| e.to_string())?;
                        subs.push(Sub {
                            stream,
                            phase: SubPhase::Connecting,
                            response: Vec::new(),
                            head: [0; 10 + PAYLOAD_HEAD],
                            head_len: 0,
                            body: false,
                            skip: 0,
                            round: 0,
                            next: 0,
                        });
                        pending += 1;
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("connect from {src}: {e}"));
                    }
                }
            }
            let timed_out = started.elapsed() >= o.connect_timeout;
            if (attempted == o.count && pending == 0) || timed_out {
                connect_done = true;
                // Handshakes still pending at the deadline count as failed.
                for s in subs
                    .iter_mut()
                    .filter(|s| matches!(s.phase, SubPhase::Connecting | SubPhase::AwaitingResponse))
                {
                    s.phase = SubPhase::Closed;
                    let _ = poll.registry().deregister(&mut s.stream);
                    failed += 1;
                    pending -= 1;
                }
                failed += o.count - attempted;
                say(&format!(
                    "ready {}",
                    json!({"open": open, "failed": failed, "secs": started.elapsed().as_secs_f64(),
                           "error": first_error.clone().unwrap_or_default()})
                ));
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .or_else(|e| {
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            let i = ev.token().0;
            let Some(s) = subs.get_mut(i) else { continue };
            match s.phase {
                SubPhase::Connecting => {
                    if !(ev.is_writable() || ev.is_error()) {
                        continue;
                    }
                    let err = match s.stream.take_error() {
                        Ok(Some(e)) | Err(e) => Some(e.to_string()),
                        Ok(None) => None,
                    };
                    if err.is_none() && s.stream.peer_addr().is_err() {
                        continue; // not connected yet
                    }
                    // The request is small: a fresh socket's buffer takes it whole.
                    let why = match err {
                        Some(e) => Some(e),
                        None => match s.stream.write(request.as_bytes()) {
                            Ok(k) if k == request.len() => None,
                            other => Some(format!("handshake write: {other:?}")),
                        },
                    };
                    match why {
                        None => s.phase = SubPhase::AwaitingResponse,
                        Some(e) => {
                            first_error.get_or_insert(e);
                            s.phase = SubPhase::Closed;
                            let _ = poll.registry().deregister(&mut s.stream);
                            failed += 1;
                            pending -= 1;
                            continue;
                        }
                    }
                    if ev.is_readable() {
                        read_sub(
                            s,
                            &mut buf,
                            &mut st,
                            &mut open,
                            &mut pending,
                            &mut failed,
                            &mut first_error,
                        );
                    }
                }
                SubPhase::AwaitingResponse | SubPhase::Open => {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        read_sub(
                            s,
                            &mut buf,
                            &mut st,
                            &mut open,
                            &mut pending,
                            &mut failed,
                            &mut first_error,
                        );
                    }
                }
                SubPhase::Closed => {}
            }
            if s.phase == SubPhase::Closed {
                let _ = poll.registry().deregister(&mut s.stream);
            }
        }
        // Commands from the parent.
        while let Ok(cmd) = commands.try_recv() {
            let Some(cmd) = cmd else { return Ok(()) };
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let arg = |k: usize| words.get(k).and_then(|w| w.parse::<u32>().ok()).unwrap_or(0);
            match words.first().copied() {
                Some("start") => {
                    frames_total += st.delivered + st.late + st.other;
                    let messages = arg(2).min(MAX_MESSAGES as u32);
                    st = RoundState::new(arg(1), messages);
                    say(&format!("started {}", st.round));
                }
                Some("status") => {
                    // Subscribers that have had a message of this round, and that have message
                    // `target - 1` (the last one sent) or later.
                    let target = arg(2);
                    let (mut touched, mut complete) = (0usize, 0usize);
                    for s in subs.iter().filter(|s| s.phase == SubPhase::Open && s.round == st.round) {
                        touched += usize::from(s.next > 0);
                        complete += usize::from(s.next >= target);
                    }
                    let frames = frames_total + st.delivered + st.late + st.other;
                    say(&format!(
                        "status {} {touched} {complete} {open} {} {frames}",
                        st.round, st.delivered
                    ));
                }
                Some("report") => {
                    say(&format!(
                        "report {}",
                        json!({
                            "round": st.round, "open": open, "delivered": st.delivered, "gaps": st.gaps,
                            "late": st.late, "other": st.other, "malformed": st.malformed,
                            "hist": st.hist.to_json(), "seq_count": st.seq_count, "seq_last": st.seq_last,
                        })
                    ));
                }
                Some("quit") => return Ok(()),
                _ => return Err(format!("unknown command '{cmd}'")),
            }
        }
    }
}

/// Reads a subscriber's socket until it would block (mio is edge-triggered): the handshake
/// response, then frames.
#[allow(clippy::too_many_arguments)]
fn read_sub(
    s: &mut Sub,
    buf: &mut [u8],
    st: &mut RoundState,
    open: &mut usize,
    pending: &mut usize,
    failed: &mut usize,
    first_error: &mut Option<String>,
) {
    loop {
        let n = match s.stream.read(buf) {
            Ok(0) => {
                end_sub(s, "closed by the server", open, pending, failed, first_error);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                end_sub(s, &e.to_string(), open, pending, failed, first_error);
                return;
            }
        };
        let now = mono_ns();
        let mut data = &buf[..n];
        if s.phase == SubPhase::AwaitingResponse {
            s.response.extend_from_slice(data);
            let Some(end) = s.response.windows(4).position(|w| w == b"\r\n\r\n") else {
                if s.response.len() > 8192 {
                    end_sub(s, "handshake response too long", open, pending, failed, first_error);
                    return;
                }
                continue;
            };
            if !s.response.starts_with(b"HTTP/1.1 101") {
                let line = String::from_utf8_lossy(&s.response[..end])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                end_sub(
                    s,
                    &format!("handshake refused: {line}"),
                    open,
                    pending,
                    failed,
                    first_error,
                );
                return;
            }
            *pending -= 1;
            *open += 1;
            s.phase = SubPhase::Open;
            // Frame bytes that came along with the response.
            let rest = std::mem::take(&mut s.response).split_off(end + 4);
            if feed(s, &rest, now, st).is_err() {
                end_sub(s, "bad frame", open, pending, failed, first_error);
                return;
            }
            data = &[];
        }
        if feed(s, data, now, st).is_err() {
            end_sub(s, "bad frame", open, pending, failed, first_error);
            return;
        }
        if s.phase == SubPhase::Closed {
            *open -= 1;
            return;
        }
    }
}

fn end_sub(
    s: &mut Sub,
    why: &str,
    open: &mut usize,
    pending: &mut usize,
    failed: &mut usize,
    first_error: &mut Option<String>,
) {
    match s.phase {
        SubPhase::Open => *open -= 1,
        SubPhase::Connecting | SubPhase::AwaitingResponse => {
            *pending -= 1;
            *failed += 1;
            first_error.get_or_insert_with(|| why.to_string());
        }
        SubPhase::Closed => {}
    }
    s.phase = SubPhase::Closed;
    s.response = Vec::new();
}

/// Runs frame bytes through a subscriber's parser. A close frame marks it closed (the caller
/// counts it); a frame no server may send is an error.
fn feed(s: &mut Sub, mut data: &[u8], now: u64, st: &mut RoundState) -> Result<(), ()> {
    while s.phase == SubPhase::Open {
        if s.body {
            if data.is_empty() {
                break;
            }
            let k = s.skip.min(data.len() as u64) as usize;
            s.skip -= k as u64;
            data = &data[k..];
            if s.skip == 0 {
                frame_done(s, now, st);
            }
            continue;
        }
        // Collect the header, then up to PAYLOAD_HEAD payload bytes.
        let have = s.head_len as usize;
        let need = if have < 2 {
            2
        } else if s.head[1] & 0x80 != 0 {
            st.malformed += 1;
            return Err(()); // masked: servers never mask
        } else {
            let hdr = header_len(&s.head);
            if have < hdr {
                hdr
            } else {
                hdr + payload_len(&s.head).min(PAYLOAD_HEAD as u64) as usize
            }
        };
        if have < need {
            if data.is_empty() {
                break;
            }
            let k = (need - have).min(data.len());
            s.head[have..have + k].copy_from_slice(&data[..k]);
            s.head_len += k as u8;
            data = &data[k..];
            continue;
        }
        let len = payload_len(&s.head);
        s.skip = len - len.min(PAYLOAD_HEAD as u64);
        if s.skip == 0 {
            frame_done(s, now, st);
        } else {
            s.body = true;
        }
    }
    Ok(())
}

/// A server frame's header length (unmasked), from its second byte.
fn header_len(head: &[u8]) -> usize {
    2 + match head[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    }
}

/// A frame's payload length, from a whole header.
fn payload_len(head: &[u8]) -> u64 {
    match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => u64::from_be_bytes(head[2..10].try_into().unwrap_or_default()),
        l => u64::from(l),
    }
}

/// A whole frame is in: count it. `head` holds its header and first payload bytes.
fn frame_done(s: &mut Sub, now: u64, st: &mut RoundState) {
    let h = s.head;
    s.head_len = 0;
    s.skip = 0;
    s.body = false;
    let opcode = h[0] & 0x0f;
    let fin = h[0] & 0x80 != 0;
    if opcode == 8 {
        s.phase = SubPhase::Closed;
        return;
    }
    if !fin || !(opcode == 1 || opcode == 2) {
        st.other += 1;
        return;
    }
    let hdr = header_len(&h);
    let len = payload_len(&h);
    if len < PAYLOAD_HEAD as u64 {
        st.other += 1;
        return;
    }
    let p = &h[hdr..hdr + PAYLOAD_HEAD];
    let round = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
    let seq = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    let sent = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
    if round != st.round || seq >= st.messages {
        st.other += 1;
        return;
    }
    if s.round != round {
        s.round = round;
        s.next = 0;
    }
    if seq < s.next {
        st.late += 1;
        return;
    }
    st.gaps += u64::from(seq - s.next);
    s.next = seq + 1;
    st.delivered += 1;
    st.hist.record(now.saturating_sub(sent));
    let k = seq as usize;
    st.seq_count[k] += 1;
    st.seq_last[k] = st.seq_last[k].max(now);
}

// ------------------------------------------------------------------------------------------
// The parent.

/// A client process: its stdin for commands; its stdout lines arrive on the shared channel.
struct ClientProc {
    proc_: Owned,
    stdin: ChildStdin,
}

/// Lines from every client process, tagged with its index (`None`: its stdout ended).
type Lines = mpsc::Receiver<(usize, Option<String>)>;

fn spawn_clients(o: &Options, addr: SocketAddr) -> Result<(Vec<ClientProc>, Lines), String> {
    let per = o
        .per_child
        .min(wsloop::bench::connections_per_process().saturating_sub(CHILD_FD_RESERVE));
    let n = o.subscribers.div_ceil(per.max(1));
    if n > MAX_CHILDREN {
        return Err(format!(
            "{} subscribers need {n} client processes (at most {MAX_CHILDREN})",
            o.subscribers
        ));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let mut procs = Vec::with_capacity(n);
    let mut first = 0;
    // Fewer handshakes in flight per process when there are many: the listen backlogs hold
    // what all of them start at once.
    let in_flight = o.in_flight.min((8192 / n).max(16));
    for k in 0..n {
        let count = o.subscribers / n + usize::from(k < o.subscribers % n);
        let mut cmd = Command::new(&exe);
        cmd.args(["--child", "--server", &addr.to_string()])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--in-flight", &in_flight.to_string()])
            .args(["--connect-timeout-ms", &o.connect_timeout.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start a client process: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let stdin = child.stdin.take().ok_or("no stdin pipe")?;
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((k, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((k, None));
        });
        procs.push(ClientProc {
            proc_: Owned(child),
            stdin,
        });
        first += count;
    }
    Ok((procs, rx))
}

/// Sends `cmd` to every client process and collects one line from each that starts with
/// `answer` (the keyword is stripped).
fn ask_all(
    procs: &mut [ClientProc],
    lines: &Lines,
    cmd: &str,
    answer: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    for p in procs.iter_mut() {
        writeln!(p.stdin, "{cmd}").map_err(|e| format!("a client process is gone: {e}"))?;
    }
    collect(procs.len(), lines, answer, timeout)
}

fn collect(n: usize, lines: &Lines, answer: &str, timeout: Duration) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + timeout;
    let mut got: Vec<Option<String>> = vec![None; n];
    let mut left = n;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        let (k, line) = lines
            .recv_timeout(wait)
            .map_err(|_| format!("{left} client process(es) did not answer '{answer}' within {timeout:?}"))?;
        let line = line.ok_or_else(|| format!("client process {k} ended"))?;
        let rest = line
            .strip_prefix(answer)
            .ok_or_else(|| format!("client process {k} said '{line}' instead of '{answer}'"))?;
        if got[k].replace(rest.trim().to_string()).is_none() {
            left -= 1;
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// Starts a private Redis on a free port; returns it, its port and its directory.
fn start_redis(o: &Options) -> Result<(Owned, u16, PathBuf), String> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("cluster_fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = Command::new(&o.redis_server);
    cmd.args([
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--loglevel", "warning", "--daemonize", "no", "--dir"])
    .arg(&dir)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} (is Redis installed?): {e}", o.redis_server))?;
    let redis = Owned(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let mut reply = [0u8; 7];
            if c.write_all(b"PING\r\n").is_ok() && c.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n" {
                return Ok((redis, port, dir));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("Redis did not answer on 127.0.0.1:{port}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the server; returns it and its address once it (every worker) listens.
fn start_server(o: &Options, cluster: Option<&str>) -> Result<(ServerProc, SocketAddr), String> {
    if !o.server.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first",
            o.server.display()
        ));
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut cmd = Command::new(&o.server);
    cmd.args([
        "serve",
        "--mode",
        "broadcast",
        "--no-echo-self",
        "--no-page",
        "--log",
        "info",
    ])
    .args(["--listen", &addr.to_string()]);
    // Room for every subscriber and the publisher.
    let want = o.subscribers + 16;
    match o.processes {
        Some(n) => {
            cmd.args(["--processes", &n.to_string(), "--max-connections", &want.to_string()]);
        }
        None => {
            let one = wsloop::bench::connections_per_process().saturating_sub(32);
            if want > one {
                return Err(format!(
                    "one server process holds at most {one} connections here (its open-file limit less \
                     64) and {} subscribers need {want}: use --processes",
                    o.subscribers
                ));
            }
        }
    }
    if let Some(url) = cluster {
        cmd.args(["--cluster", url]);
        if let Some(p) = &o.cluster_prefix {
            cmd.args(["--cluster-prefix", p]);
        }
    }
    cmd.args(&o.server_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.server.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let mut server = Owned(child);
    // Passes the server's lines on, and says when it listens: with workers the supervisor says
    // so once every one of them does.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            } else if line.contains("WARN") || line.contains("ERROR") || line.starts_with("wsloop") {
                // `--log info` for the line above; the connections' comings and goings are noise
                // (and the workers' lines can mix: one write each, but not one line each).
                eprintln!("server: {line}");
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            return Ok((ServerProc(server), addr));
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            thread::sleep(Duration::from_millis(100)); // its last lines
            return Err(format!("the server exited ({status}) before it listened"));
        }
        if Instant::now() > deadline {
            return Err(format!("the server did not listen on {addr} within 60 s"));
        }
    }
}

/// The publisher: one connection, blocking writes.
struct Publisher {
    stream: std::net::TcpStream,
    /// Cut off in the middle of a frame: a new connection is needed.
    broken: bool,
}

impl Publisher {
    fn connect(addr: SocketAddr) -> Result<Self, String> {
        let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("publisher: {e}"))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(30))))
            .map_err(|e| e.to_string())?;
        write!(stream, "GET / HTTP/1.1\r\nHost: {addr}\r\n{REQUEST_TAIL}").map_err(|e| format!("publisher: {e}"))?;
        let mut response = Vec::new();
        let mut byte = [0u8; 1];
        while !response.ends_with(b"\r\n\r\n") {
            stream
                .read_exact(&mut byte)
                .map_err(|e| format!("publisher handshake: {e}"))?;
            response.push(byte[0]);
            if response.len() > 8192 {
                return Err("publisher handshake: response too long".into());
            }
        }
        if !response.starts_with(b"HTTP/1.1 101") {
            return Err(format!("publisher handshake: {}", String::from_utf8_lossy(&response)));
        }
        Ok(Publisher { stream, broken: false })
    }

    /// Sends message `seq` of `round`, stamped now; returns the stamp, or `None` if the server
    /// did not take the whole frame by `deadline` (the connection is then `broken`: part of a
    /// frame may have gone). Without a deadline a server that takes nothing for 30 s is an error.
    fn send(&mut self, round: u32, seq: u32, size: usize, deadline: Option<Instant>) -> Result<Option<u64>, String> {
        let mut payload = vec![0u8; size];
        for (i, b) in payload.iter_mut().enumerate().skip(PAYLOAD_HEAD) {
            *b = i as u8;
        }
        payload[0..4].copy_from_slice(&round.to_be_bytes());
        payload[4..8].copy_from_slice(&seq.to_be_bytes());
        let now = mono_ns();
        payload[8..16].copy_from_slice(&now.to_be_bytes());
        let frame = client_frame(&payload);
        let mut at = 0;
        while at < frame.len() {
            let left = deadline.map_or(Duration::from_secs(30), |d| d.saturating_duration_since(Instant::now()));
            let timed_out = |publisher: &mut Publisher| {
                publisher.broken = true;
                match deadline {
                    Some(_) => Ok(None),
                    None => Err("publisher: the server took nothing for 30 s".to_string()),
                }
            };
            if left.is_zero() {
                return timed_out(self);
            }
            self.stream.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.stream.write(&frame[at..]) {
                Ok(0) => return Err("publisher: the server closed the connection".into()),
                Ok(n) => at += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return timed_out(self)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("publisher: {e}")),
            }
        }
        Ok(Some(now))
    }
}

/// Sums of the children's `status` answers.
#[derive(Clone, Copy, Default)]
struct Status {
    /// Subscribers that had a message of the round.
    touched: u64,
    /// Subscribers that have the last message sent (or a later one).
    complete: u64,
    open: u64,
    /// Every frame the subscribers ever received.
    frames: u64,
}

fn status_sum(answers: &[String]) -> Result<Status, String> {
    let mut sum = Status::default();
    for a in answers {
        let v: Vec<u64> = a.split_whitespace().map(|w| w.parse().unwrap_or(0)).collect();
        if v.len() != 6 {
            return Err(format!("bad status '{a}'"));
        }
        sum.touched += v[1];
        sum.complete += v[2];
        sum.open += v[3];
        sum.frames += v[5];
    }
    Ok(sum)
}

/// Waits until no subscriber has received anything for half a second (the server's queues are
/// empty), at most `timeout`; returns the status then and whether it was quiet.
fn settle(procs: &mut [ClientProc], lines: &Lines, timeout: Duration) -> Result<(Status, bool), String> {
    let start = Instant::now();
    let mut last = status_sum(&ask_all(procs, lines, "status 0 0", "status", ANSWER_TIMEOUT)?)?;
    let mut since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = status_sum(&ask_all(procs, lines, "status 0 0", "status", ANSWER_TIMEOUT)?)?;
        if now.frames != last.frames {
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(500) {
            return Ok((now, true));
        }
        last = now;
        if start.elapsed() >= timeout {
            return Ok((now, false));
        }
    }
}

/// Redis's own CPU seconds (user + system, microseconds from its `INFO cpu`: finer than the
/// 10 ms ticks of `/proc`).
fn redis_cpu(port: u16) -> Option<f64> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"INFO cpu\r\n").ok()?;
    // A bulk string: `$LEN\r\n`, LEN bytes, `\r\n`.
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    let body = loop {
        let n = c.read(&mut chunk).ok().filter(|&n| n > 0)?;
        reply.extend_from_slice(&chunk[..n]);
        let end = reply.windows(2).position(|w| w == b"\r\n")?;
        let len: usize = std::str::from_utf8(reply.get(1..end)?).ok()?.parse().ok()?;
        if reply.len() >= end + 2 + len {
            break String::from_utf8_lossy(&reply[end + 2..end + 2 + len]).into_owned();
        }
        if reply.len() > 1 << 20 {
            return None;
        }
    };
    let field = |name: &str| -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// What the parent measures around a round.
struct Meters {
    server_pid: u32,
    redis_port: Option<u16>,
    client_pids: Vec<u32>,
}

impl Meters {
    /// Server, Redis and client CPU seconds.
    fn read(&self) -> (f64, Option<f64>, f64) {
        let server = tree_cpu(self.server_pid);
        let redis = self.redis_port.and_then(redis_cpu);
        let clients = self.client_pids.iter().filter_map(|&p| cpu_ticks(p)).sum::<u64>() as f64 / 100.0;
        (server, redis, clients)
    }
}

/// One measured round.
struct Round {
    size: usize,
    /// Messages a second; `None` for the single message.
    rate: Option<u32>,
    messages: u32,
}

fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=999_999 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.3}s", ns as f64 / 1e9),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_round(
    o: &Options,
    case: &str,
    procs: &mut [ClientProc],
    lines: &Lines,
    publisher: &mut Publisher,
    meters: &Meters,
    round_id: u32,
    r: &Round,
    subscribers_open: u64,
) -> Result<Value, String> {
    ask_all(
        procs,
        lines,
        &format!("start {round_id} {}", r.messages),
        "started",
        ANSWER_TIMEOUT,
    )?;
    // Redis's CPU with nothing published (its timers, the instances' heartbeats), for comparison.
    let redis_idle = meters.redis_port.and_then(|port| {
        let (a, t) = (redis_cpu(port)?, Instant::now());
        thread::sleep(Duration::from_secs(1));
        Some((redis_cpu(port)? - a) / t.elapsed().as_secs_f64())
    });
    let (cpu0, redis0, clients0) = meters.read();
    let t0 = Instant::now();
    let mut sent_at = Vec::with_capacity(r.messages as usize);
    // Paced from the start time: message i goes at t0 + i / rate (no drift); a publisher held
    // back by the server is cut off at twice the planned time.
    let planned = r.rate.map_or(Duration::ZERO, |rate| {
        Duration::from_secs_f64(f64::from(r.messages) / f64::from(rate))
    });
    let cutoff = planned * 2 + Duration::from_secs(1);
    for i in 0..r.messages {
        if let Some(rate) = r.rate {
            let due = t0 + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        match publisher.send(round_id, i, r.size, Some(t0 + cutoff))? {
            Some(stamp) => sent_at.push(stamp),
            None => break,
        }
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let sent = sent_at.len() as u32;
    // Drain: until every open subscriber has the last message sent, or the timeout.
    let drain_start = Instant::now();
    loop {
        let answers = ask_all(
            procs,
            lines,
            &format!("status {round_id} {sent}"),
            "status",
            ANSWER_TIMEOUT,
        )?;
        let now = status_sum(&answers)?;
        if now.complete >= now.open || drain_start.elapsed() >= o.drain_timeout {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let window = t0.elapsed().as_secs_f64();
    let (cpu1, redis1, clients1) = meters.read();
    let reports = ask_all(procs, lines, &format!("report {round_id}"), "report", ANSWER_TIMEOUT)?;

    // Merge.
    let mut hist = Histogram::new();
    let (mut delivered, mut gaps, mut late, mut other, mut malformed, mut open) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut per_msg_count = vec![0u64; sent as usize];
    let mut per_msg_last = vec![0u64; sent as usize];
    for rep in &reports {
        let v: Value = serde_json::from_str(rep).map_err(|e| format!("bad report: {e}"))?;
        let field = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        delivered += field("delivered");
        gaps += field("gaps");
        late += field("late");
        other += field("other");
        malformed += field("malformed");
        open += field("open");
        hist.merge_json(v.get("hist").ok_or("report without histogram")?)
            .ok_or("bad histogram")?;
        let counts = v
            .get("seq_count")
            .and_then(Value::as_array)
            .ok_or("report without counts")?;
        let lasts = v
            .get("seq_last")
            .and_then(Value::as_array)
            .ok_or("report without times")?;
        for s in 0..sent as usize {
            per_msg_count[s] += counts.get(s).and_then(Value::as_u64).unwrap_or(0);
            per_msg_last[s] = per_msg_last[s].max(lasts.get(s).and_then(Value::as_u64).unwrap_or(0));
        }
    }
    // Per message: how long until its last subscriber had it (from the send), and how many did.
    let mut to_last: Vec<u64> = (0..sent as usize)
        .filter(|&s| per_msg_count[s] > 0)
        .map(|s| per_msg_last[s].saturating_sub(sent_at[s]))
        .collect();
    to_last.sort_unstable();
    let reached_all = per_msg_count.iter().filter(|&&c| c >= subscribers_open).count();
    let min_reach = per_msg_count.iter().copied().min().unwrap_or(0);
    let expected = subscribers_open * u64::from(sent);
    let server_cpu = cpu1 - cpu0;
    let redis_cpu = match (redis0, redis1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let q = |x: f64| hist.quantile(x).unwrap_or(0);
    // The machine's load: the clients, other work, the server and Redis share its cores.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
    let mut row = json!({
        "case": case,
        "subscribers": subscribers_open,
        "server_processes": o.processes.unwrap_or(1),
        "redis": o.redis || o.cluster_url.is_some(),
        "size": r.size,
        "rate": r.rate,
        "messages_planned": r.messages,
        "messages_sent": sent,
        "publish_seconds": publish_secs,
        // The server stopped taking the publisher's messages and the round's time ran out.
        "publisher_cut_off": publisher.broken,
        "window_seconds": window,
        "deliveries": delivered,
        "expected": expected,
        "missing": expected.saturating_sub(delivered),
        "gaps": gaps,
        "late": late,
        "other_frames": other,
        "malformed": malformed,
        "open_at_end": open,
        "closed_during_round": subscribers_open.saturating_sub(open),
        "server_cpu_seconds": server_cpu,
        "deliveries_per_server_cpu_second": if server_cpu > 0.0 { Some(delivered as f64 / server_cpu) } else { None },
        "client_cpu_seconds": clients1 - clients0,
        "load_average_1min": load,
        "latency_ns": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": hist.max, "count": hist.total},
        "messages_reaching_every_subscriber": reached_all,
        "fewest_subscribers_reached_by_a_message": min_reach,
        "time_to_last_subscriber_ns": {
            "median": to_last.get(to_last.len() / 2).copied(),
            "worst": to_last.last().copied(),
        },
    });
    if let Some(rc) = redis_cpu {
        row["redis_cpu_seconds"] = json!(rc);
        row["redis_idle_cpu_seconds_per_second"] = json!(redis_idle);
        // Less what it would have used idle over the same window.
        let busy = redis_idle.map(|idle| (rc - idle * window).max(0.0));
        row["redis_cpu_us_per_delivery_above_idle"] =
            json!(busy.filter(|_| delivered > 0).map(|b| b * 1e6 / delivered as f64));
        row["redis_cpu_us_per_delivery"] = json!(if delivered > 0 {
            Some(rc * 1e6 / delivered as f64)
        } else {
            None
        });
        row["redis_cpu_us_per_message"] = json!(if sent > 0 {
            Some(rc * 1e6 / f64::from(sent))
        } else {
            None
        });
    }
    Ok(row)
}

const COLUMNS: [(&str, usize); 18] = [
    ("case", 22),
    ("subs", 8),
    ("size", 5),
    ("rate", 5),
    ("sent", 6),
    ("deliveries", 11),
    ("missing", 8),
    ("closed", 6),
    ("deliv/CPU-s", 11),
    ("p50", 9),
    ("p99", 9),
    ("max", 9),
    ("last peer", 9),
    ("all got", 7),
    ("srv CPU s", 9),
    ("redis µs/deliv", 14),
    ("cli CPU s", 9),
    ("load", 5),
];

fn print_header() {
    let cells: Vec<String> = COLUMNS.iter().map(|(h, w)| format!("{h:>w$}")).collect();
    println!("{}", cells.join(" "));
}

fn print_row(row: &Value) {
    let u = |k: &str| row.get(k).and_then(Value::as_u64).unwrap_or(0);
    let f = |k: &str| row.get(k).and_then(Value::as_f64);
    let lat = |k: &str| {
        row["latency_ns"]
            .get(k)
            .and_then(Value::as_u64)
            .map_or("-".into(), fmt_ns)
    };
    let cells = [
        row["case"].as_str().unwrap_or("").to_string(),
        u("subscribers").to_string(),
        u("size").to_string(),
        row["rate"].as_u64().map_or("once".into(), |r| r.to_string()),
        u("messages_sent").to_string(),
        u("deliveries").to_string(),
        u("missing").to_string(),
        u("closed_during_round").to_string(),
        f("deliveries_per_server_cpu_second").map_or("-".into(), |v| format!("{v:.0}")),
        lat("p50"),
        lat("p99"),
        lat("max"),
        row["time_to_last_subscriber_ns"]["worst"]
            .as_u64()
            .map_or("-".into(), fmt_ns),
        format!("{}/{}", u("messages_reaching_every_subscriber"), u("messages_sent")),
        f("server_cpu_seconds").map_or("-".into(), |v| format!("{v:.2}")),
        f("redis_cpu_us_per_delivery").map_or("-".into(), |v| format!("{v:.4}")),
        f("client_cpu_seconds").map_or("-".into(), |v| format!("{v:.2}")),
        f("load_average_1min").map_or("-".into(), |v| format!("{v:.1}")),
    ];
    let cells: Vec<String> = cells
        .iter()
        .zip(COLUMNS)
        .map(|(c, (_, w))| format!("{c:>w$}"))
        .collect();
    println!("{}", cells.join(" "));
}

fn run(o: &Options) -> Result<(), String> {
    // Figures taken while other work holds the cores measure the sharing, not the server.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
    let cores = wsloop::sys::cores();
    if let Some(load) = load.filter(|&l| l > cores as f64 / 2.0) {
        eprintln!(
            "warning: load average {load:.1} on {cores} core(s) before starting: other work shares the CPU \
             and will show in every figure"
        );
    }
    let (mut redis, mut redis_dir, mut redis_port) = (None, None, None);
    let cluster = match (&o.cluster_url, o.redis) {
        (Some(url), _) => Some(url.clone()),
        (None, true) => {
            let (r, port, dir) = start_redis(o)?;
            redis = Some(r);
            redis_dir = Some(dir);
            redis_port = Some(port);
            Some(format!("redis://127.0.0.1:{port}"))
        }
        (None, false) => None,
    };
    let result = measure(o, cluster.as_deref(), redis_port);
    drop(redis);
    if let Some(dir) = redis_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn measure(o: &Options, cluster: Option<&str>, redis_port: Option<u16>) -> Result<(), String> {
    let case = o.label.clone().unwrap_or_else(|| {
        let procs = match o.processes {
            None => "1 process".to_string(),
            Some(n) => format!("{n} process{}", if n == 1 { "" } else { "es" }),
        };
        format!("{procs}{}", if cluster.is_some() { " + Redis" } else { ", no Redis" })
    });
    // The lightest first: with --reuse a round that overloads the server can close slow
    // subscribers, or leave queues the next round would wait behind.
    let mut rounds = Vec::new();
    if o.once {
        rounds.extend(o.sizes.iter().map(|&size| Round {
            size,
            rate: None,
            messages: 1,
        }));
    }
    let mut rates = o.rates.clone();
    rates.sort_unstable();
    for rate in rates {
        rounds.extend(o.sizes.iter().map(|&size| Round {
            size,
            rate: Some(rate),
            messages: rate * o.seconds,
        }));
    }
    // A fresh server and fresh subscribers for each round unless asked otherwise.
    let sessions: Vec<&[Round]> = if o.reuse {
        vec![&rounds[..]]
    } else {
        rounds.chunks(1).collect()
    };
    if !o.json {
        print_header();
    }
    let mut round_id = WARMUP_ROUND + 1;
    for rounds in sessions {
        session(o, &case, cluster, redis_port, rounds, &mut round_id)?;
    }
    if !o.json {
        println!();
        println!("deliv/CPU-s: deliveries per second of server CPU (supervisor and workers, 10 ms ticks) over");
        println!("  the round, from the first publish until every subscriber had the last message (or the drain");
        println!("  timeout). p50/p99/max: delivery latency, whole frame received − sent, over every delivery.");
        println!("last peer: the worst message's time from its send until its last subscriber had it.");
        println!("all got: messages every subscriber received. missing: subscribers × sent − deliveries");
        println!("  (still queued at the drain timeout, dropped, or lost with a closed connection).");
        println!("closed: subscribers that lost their connection during the round.");
        println!("redis µs/deliv: Redis's CPU (user + system) over the round per delivery.");
        println!("cli CPU s: the subscribers' processes' CPU over the round (they share the cores).");
        println!("load: the machine's 1-minute load average at the round's end (2 cores shared by all).");
    }
    Ok(())
}

/// One server and one set of subscribers: connect, warm up, run `rounds`, stop.
fn session(
    o: &Options,
    case: &str,
    cluster: Option<&str>,
    redis_port: Option<u16>,
    rounds: &[Round],
    round_id: &mut u32,
) -> Result<(), String> {
    let (server, addr) = start_server(o, cluster)?;
    let t = Instant::now();
    let (mut procs, lines) = spawn_clients(o, addr)?;
    let readies = collect(
        procs.len(),
        &lines,
        "ready",
        o.connect_timeout + Duration::from_secs(30),
    )?;
    let (mut open, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    for r in &readies {
        let v: Value = serde_json::from_str(r).map_err(|e| format!("bad ready line: {e}"))?;
        open += v["open"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
        if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    let connect_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{case}: {open} of {} subscribers open in {connect_secs:.1} s over {} client processes, {failed} failed{}",
        o.subscribers,
        procs.len(),
        first_error.map_or(String::new(), |e| format!(" (first error: {e})"))
    );
    if open == 0 {
        return Err("no subscriber connected".into());
    }
    let mut publisher = Publisher::connect(addr)?;
    let meters = Meters {
        server_pid: server.0 .0.id(),
        redis_port,
        client_pids: procs.iter().map(|p| p.proc_.0.id()).collect(),
    };

    // Warm-up: a message a second until every subscriber has had one (every instance is then
    // subscribed to Redis, and every connection's path is warm).
    ask_all(
        &mut procs,
        &lines,
        &format!("start {WARMUP_ROUND} {WARMUP_MESSAGES}"),
        "started",
        ANSWER_TIMEOUT,
    )?;
    let warm_start = Instant::now();
    let warm_size = rounds.first().map_or(PAYLOAD_HEAD, |r| r.size);
    publisher.send(WARMUP_ROUND, 0, warm_size, None)?;
    let (mut probes, mut warmed, mut touched_seen) = (1, false, 0);
    let mut progress_at = Instant::now();
    // Another message only once the last one stopped reaching anyone new for a second: with a
    // million subscribers one message takes seconds, and more would only pile up.
    while warm_start.elapsed() < o.warmup_timeout {
        thread::sleep(Duration::from_millis(50));
        let answers = ask_all(
            &mut procs,
            &lines,
            &format!("status {WARMUP_ROUND} 1"),
            "status",
            ANSWER_TIMEOUT,
        )?;
        let now = status_sum(&answers)?;
        if now.touched >= now.open {
            warmed = true;
            break;
        }
        if now.touched > touched_seen {
            touched_seen = now.touched;
            progress_at = Instant::now();
        } else if progress_at.elapsed() >= Duration::from_secs(1) && probes < WARMUP_MESSAGES {
            publisher.send(WARMUP_ROUND, probes, warm_size, None)?;
            probes += 1;
            progress_at = Instant::now();
        }
    }
    let warm_secs = warm_start.elapsed().as_secs_f64();
    if warmed {
        eprintln!("warm-up: {probes} message(s), {warm_secs:.2} s until every subscriber had one");
    } else {
        eprintln!("warning: after {probes} warm-up message(s) in {warm_secs:.2} s, only {touched_seen} of {open} subscribers had one");
    }

    for r in rounds {
        // Nothing of the previous round (or the warm-up) may arrive in this one's window.
        let (now, quiet) = settle(&mut procs, &lines, o.settle_timeout)?;
        if !quiet {
            eprintln!("warning: subscribers were still receiving after {:?}", o.settle_timeout);
        }
        if publisher.broken {
            publisher = Publisher::connect(addr)?;
        }
        let mut row = run_round(
            o,
            case,
            &mut procs,
            &lines,
            &mut publisher,
            &meters,
            *round_id,
            r,
            now.open,
        )?;
        *round_id += 1;
        row["settled_before"] = json!(quiet);
        row["warmed_up"] = json!(warmed);
        row["connect_seconds"] = json!(connect_secs);
        row["connect_failed"] = json!(failed);
        row["client_processes"] = json!(procs.len());
        if o.json {
            println!("{row}");
        } else {
            print_row(&row);
        }
        if let Some(path) = &o.json_out {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{row}"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    for p in procs.iter_mut() {
        let _ = writeln!(p.stdin, "quit");
    }
    // Clients first (their connections end), then the server.
    drop(procs);
    drop(server);
    Ok(())
}

fn main() {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "--child") {
        let mut p = lexopt::Parser::from_args(args.skip(1));
        let result = child_args(&mut p).and_then(child_main);
        if let Err(e) = result {
            eprintln!("cluster_fanout client: {e}");
            std::process::exit(1);
        }
        return;
    }
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cluster_fanout: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("cluster_fanout: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked frame as a server sends it.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn message(round: u32, seq: u32, sent: u64, size: usize) -> Vec<u8> {
        let mut p = vec![0xa5u8; size];
        p[0..4].copy_from_slice(&round.to_be_bytes());
        p[4..8].copy_from_slice(&seq.to_be_bytes());
        p[8..16].copy_from_slice(&sent.to_be_bytes());
        p
    }

    fn open_sub() -> (Sub, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let sub = Sub {
            stream: TcpStream::from_std(stream),
            phase: SubPhase::Open,
            response: Vec::new(),
            head: [0; 10 + PAYLOAD_HEAD],
            head_len: 0,
            body: false,
            skip: 0,
            round: 0,
            next: 0,
        };
        (sub, listener)
    }

    #[test]
    fn frames_are_counted_whatever_the_reads_cut_them_into() {
        // Three header forms, a gap (seq 2 missing), a late one, another round, a ping, a close.
        let mut wire = Vec::new();
        for (seq, size) in [(0u32, 16usize), (1, 300), (3, 70_000), (1, 16)] {
            wire.extend(server_frame(2, &message(7, seq, 1_000, size)));
        }
        wire.extend(server_frame(2, &message(6, 4, 1_000, 16)));
        wire.extend(server_frame(9, b"ping"));
        wire.extend(server_frame(1, &message(7, 4, 2_000, 40)));
        wire.extend(server_frame(8, &[0x03, 0xe8]));
        wire.extend(server_frame(2, &message(7, 5, 1_000, 16))); // after the close: ignored
        for chunk in [1usize, 2, 3, 7, 16, 17, 1000, wire.len()] {
            let (mut sub, _l) = open_sub();
            let mut st = RoundState::new(7, 10);
            for part in wire.chunks(chunk) {
                feed(&mut sub, part, 5_000, &mut st).unwrap();
            }
            assert_eq!(st.delivered, 4, "chunk {chunk}");
            assert_eq!(
                (st.gaps, st.late, st.other, st.malformed),
                (1, 1, 2, 0),
                "chunk {chunk}"
            );
            assert_eq!(sub.next, 5, "chunk {chunk}");
            assert!(sub.phase == SubPhase::Closed, "chunk {chunk}");
            assert_eq!(&st.seq_count[..6], &[1, 1, 0, 1, 1, 0], "chunk {chunk}");
            assert_eq!(st.seq_last[4], 5_000);
            assert_eq!(st.hist.total, 4);
            assert_eq!(st.hist.max, 4_000);
        }
    }

    #[test]
    fn a_masked_frame_is_an_error() {
        let (mut sub, _l) = open_sub();
        let mut st = RoundState::new(1, 1);
        assert!(feed(&mut sub, &client_frame(&message(1, 0, 0, 16)), 1, &mut st).is_err());
        assert_eq!(st.malformed, 1);
    }

    #[test]
    fn histograms_merge_through_json() {
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for v in 1..=1000u64 {
            let part = if v % 3 == 0 { &mut a } else { &mut b };
            part.record(v * 997);
            all.record(v * 997);
        }
        let mut merged = Histogram::new();
        merged.merge_json(&a.to_json()).unwrap();
        merged.merge_json(&b.to_json()).unwrap();
        assert_eq!((merged.total, merged.max), (all.total, all.max));
        for q in [0.5, 0.99, 1.0] {
            assert_eq!(merged.quantile(q), all.quantile(q));
        }
        let p50 = all.quantile(0.5).unwrap();
        assert!((498_000..=503_000).contains(&p50), "{p50}");
        assert!(Histogram::new().merge_json(&json!([1, [[999_999, 1]]])).is_none());
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_name() {
        let stat = "42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 150 25 0 0 20 0 1 0";
        assert_eq!(stat_field(stat, 4), Some(7));
        assert_eq!(stat_field(stat, 14), Some(150));
        assert_eq!(stat_field(stat, 15), Some(25));
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
