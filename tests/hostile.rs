//! Hostile and careless peers against `wsloop serve`, sized to run in seconds: many connections
//! holding parts of large messages under a small `--max-memory`, a broadcast of tiny frames to
//! peers that never read, a FIN right behind a close frame, a slow consumer closed with 1008,
//! the per-address and descriptor limits, and the budget's bookkeeping after a busy session.
//!
//! Peers are raw sockets sending hand-built masked frames (hostile peers do not follow the
//! protocol). The server's memory is its `VmRSS` from `/proc/PID/status`, held against the
//! budget; what the server counts is its `--stats` line (`queued=`, `mem=USED/LIMIT`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::ServerProcess;
use socket2::{Domain, Socket, Type};
use wsloop::proto::frame::{write_frame, FrameHeader, OpCode};
use wsloop::server::{Broadcast, Stats};
use wsloop::{Conn, Ctx, Handler, Message, Server, ServerConfig};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Where attacks come from; the fresh client uses 127.0.0.1.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FRESH: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// What the server's resident memory may exceed its budget by, with `growing` connections
/// assembling messages.
///
/// The budget does not count (src/io/budget.rs): the loop's 256 KiB read buffer, every page of
/// which large reads touch; the cork and scratch buffers kept for reuse (64 KiB each); the
/// message handed to the handler and its reply (here a fresh client's few bytes); the slab of
/// slots (48 bytes a connection); and the allocator's holes. A partial message's buffer doubles
/// as it grows, and below glibc's mmap threshold (128 KiB, raised after large blocks are
/// freed) each step copies it and leaves the old block free in the heap, resident until reused
/// or until `malloc_trim` runs (at most once a second): up to 4 + 8 + ... + 64 KiB for every
/// connection growing at once. Measured on x86_64 glibc with the attack below (100
/// connections, 16 MiB budget), peak minus baseline minus budget: debug build at most 9.8 MiB in
/// 28 runs (median 3.5), release build at most 2.2 MiB in 20 runs; with
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4096` (no heap holes) at most 0.2 MiB in 10; on
/// i686 musl (debug) at most 1.3 MiB in 14.
/// The rest of the process (code, stacks) is the baseline, measured before each attack; 1 MiB
/// more covers code pages only an attack runs (`RssFile` grew by under 0.2 MiB) and the
/// allocator's own records.
fn over_budget(growing: usize) -> u64 {
    256 * KIB + 2 * 64 * KIB + growing as u64 * 128 * KIB + MIB
}

/// A server's RSS after an attack, once its connections are gone, may stay this far above the
/// idle baseline (issue 9: "within 10 MiB of the idle baseline within 5 s").
const RETURN_SLACK: u64 = 10 * MIB;
const RETURN_WITHIN: Duration = Duration::from_secs(5);

/// `VmRSS` of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * KIB
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Samples a process's `VmRSS` every 2 ms on its own thread and keeps the largest.
struct RssPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        });
        RssPeak {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Waits until the server's RSS is at most `target`; returns how long that took, or the last
/// reading when `RETURN_WITHIN` passes first.
fn wait_rss_down(pid: u32, target: u64) -> Result<Duration, u64> {
    let start = Instant::now();
    loop {
        let now = rss(pid);
        if now <= target {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= RETURN_WITHIN {
            return Err(now);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP connection from the loopback address `from`, with a receive buffer of `rcvbuf` bytes
/// (0: the system's). The buffer is set before connecting so that the window is sized by it.
fn connect_from(from: Ipv4Addr, to: SocketAddr, rcvbuf: usize) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    if rcvbuf > 0 {
        s.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    }
    s.bind(&SocketAddr::new(from.into(), 0).into()).expect("bind");
    s.connect(&to.into()).expect("connect");
    let s: TcpStream = s.into();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads an HTTP answer's head: its status and the bytes that followed it.
fn read_head(s: &mut TcpStream) -> Result<(u16, Vec<u8>), String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("no status in {head:?}"))?;
            return Ok((status, got[end + 4..].to_vec()));
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed after {} bytes of answer", got.len())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} after {} bytes of answer", got.len())),
        }
    }
}

/// Connects from `from`, upgrades, and returns the socket and any bytes after the `101`.
fn upgraded(from: Ipv4Addr, to: SocketAddr, rcvbuf: usize) -> (TcpStream, Vec<u8>) {
    let mut s = connect_from(from, to, rcvbuf);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(REQUEST).unwrap();
    let (status, rest) = read_head(&mut s).unwrap_or_else(|e| panic!("upgrade from {from}: {e}"));
    assert_eq!(status, 101, "upgrade from {from}");
    (s, rest)
}

/// A masked client frame.
fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    write_frame(&mut v, fin, op, Some(MASK), payload);
    v
}

fn close_frame(code: u16) -> Vec<u8> {
    frame(true, OpCode::Close, &code.to_be_bytes())
}

/// The header of a masked binary frame that announces `len` payload bytes.
fn header_of_large_frame(len: u64) -> Vec<u8> {
    let mut v = vec![0x82, 0x80 | 127];
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&MASK);
    v
}

/// The whole server frames at the start of `bytes`, and how many bytes they took.
fn parse_frames(bytes: &[u8]) -> (Vec<(OpCode, Vec<u8>)>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        let Some((h, n)) = FrameHeader::parse(rest).unwrap_or_else(|e| panic!("bad frame from the server: {e:?}"))
        else {
            break;
        };
        assert!(h.mask.is_none(), "server frames are never masked");
        assert!(h.fin, "the server sends whole messages");
        let end = n + h.payload_len as usize;
        if rest.len() < end {
            break;
        }
        frames.push((h.opcode, rest[n..end].to_vec()));
        at += end;
    }
    (frames, at)
}

fn close_code(payload: &[u8]) -> u16 {
    assert!(payload.len() >= 2, "close frame without a code: {payload:?}");
    u16::from_be_bytes([payload[0], payload[1]])
}

/// How a read ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The caller's condition held.
    Done,
    /// The peer ended the stream.
    Eof,
    /// The time ran out.
    TimedOut,
    /// Reading failed (a reset).
    Failed(String),
}

/// Reads into `got` until `done(got)`, the end of the stream, an error, or `limit`.
fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, limit: Duration, mut done: impl FnMut(&[u8]) -> bool) -> End {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        if done(got) {
            return End::Done;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return End::TimedOut;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return End::Failed(e.to_string()),
        }
    }
}

/// Reads whatever has arrived, without waiting.
fn read_available(s: &mut TcpStream, got: &mut Vec<u8>) {
    s.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    s.set_nonblocking(false).unwrap();
}

/// One fresh client from 127.0.0.1: connect, upgrade, `echoes` round trips of a small text,
/// close. Returns the slowest step, or what went wrong.
fn fresh_client(addr: SocketAddr, echoes: usize) -> Result<Duration, String> {
    let limit = Duration::from_secs(10);
    let start = Instant::now();
    let mut s = connect_from(FRESH, addr, 0);
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(REQUEST).map_err(|e| format!("request: {e}"))?;
    let (status, mut got) = read_head(&mut s).map_err(|e| format!("upgrade: {e}"))?;
    if status != 101 {
        return Err(format!("upgrade answered {status}"));
    }
    let mut slowest = start.elapsed();
    for i in 0..echoes {
        let text = format!("fresh client, echo {i}");
        let sent = Instant::now();
        s.write_all(&frame(true, OpCode::Text, text.as_bytes()))
            .map_err(|e| format!("echo {i}: {e}"))?;
        let end = read_until(&mut s, &mut got, limit, |b| !parse_frames(b).0.is_empty());
        if end != End::Done {
            return Err(format!("echo {i}: {end:?}"));
        }
        let (frames, used) = parse_frames(&got);
        got.drain(..used);
        if frames != [(OpCode::Text, text.into_bytes())] {
            return Err(format!("echo {i}: got {frames:?}"));
        }
        slowest = slowest.max(sent.elapsed());
    }
    let _ = s.write_all(&close_frame(1000));
    Ok(slowest)
}

/// Runs fresh clients one after another (a pause of 50 ms between them) until stopped.
struct FreshClients {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<Result<Duration, String>>>,
}

impl FreshClients {
    fn start(addr: SocketAddr) -> FreshClients {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                seen.push(fresh_client(addr, 5));
                thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        FreshClients { stop, thread }
    }

    fn finish(self) -> Vec<Result<Duration, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// One `--stats` line's figures.
#[derive(Clone, Copy, Debug, Default)]
struct StatsLine {
    open: u64,
    queued: u64,
    dropped: u64,
    mem: u64,
    mem_limit: u64,
}

fn stats_field(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(name)? + name.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `--stats` lines in `log` (mem= figures in bytes, as KiB-rounded down by the server).
fn stats_lines(log: &str) -> Vec<StatsLine> {
    log.lines()
        .filter(|l| l.contains("stats open="))
        .map(|l| {
            let f = |name| stats_field(l, name).unwrap_or_else(|| panic!("no {name} in {l:?}"));
            let mem_limit = l
                .find("mem=")
                .and_then(|i| stats_field(&l[i..], "KiB/"))
                .unwrap_or_else(|| panic!("no mem limit in {l:?}"));
            StatsLine {
                open: f(" open="),
                queued: f(" queued="),
                dropped: f(" dropped="),
                mem: f(" mem=") * KIB,
                mem_limit: mem_limit * KIB,
            }
        })
        .collect()
}

/// Waits for a `--stats` line written after the first `from` bytes of the server's stderr that
/// satisfies `want`.
fn wait_stats(
    server: &ServerProcess,
    from: usize,
    limit: Duration,
    want: impl Fn(&StatsLine) -> bool,
) -> Result<StatsLine, String> {
    let deadline = Instant::now() + limit;
    loop {
        let log = server.stderr();
        let lines = stats_lines(&log[from.min(log.len())..]);
        if let Some(l) = lines.iter().find(|l| want(l)) {
            return Ok(*l);
        }
        if Instant::now() >= deadline {
            return Err(format!("the last stats line: {:?}", lines.last()));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a server with a stats line every 100 ms, and an RSS baseline once it has served one
/// fresh client (so that what any connection touches once is in the baseline).
fn start_server(args: &[&str]) -> (ServerProcess, u64) {
    let mut all = vec!["--stats", "100ms"];
    all.extend_from_slice(args);
    let server = common::spawn_server(&all);
    fresh_client(server.addr, 1).expect("a fresh client before the attack");
    thread::sleep(Duration::from_millis(200));
    let baseline = rss(server.pid());
    (server, baseline)
}

/// Writes `bytes` to every stream, round robin without blocking, until each has taken all of
/// it, failed, or `limit` passed. Returns for each stream whether it took everything.
fn push_all(streams: &mut [TcpStream], bytes: &[u8], limit: Duration) -> Vec<bool> {
    for s in streams.iter() {
        s.set_nonblocking(true).unwrap();
    }
    let mut off = vec![0usize; streams.len()];
    let mut failed = vec![false; streams.len()];
    let deadline = Instant::now() + limit;
    loop {
        let mut pending = false;
        let mut progress = false;
        for (i, s) in streams.iter_mut().enumerate() {
            if failed[i] || off[i] == bytes.len() {
                continue;
            }
            pending = true;
            match s.write(&bytes[off[i]..]) {
                Ok(n) => {
                    off[i] += n;
                    progress = true;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => failed[i] = true,
            }
        }
        if !pending || Instant::now() >= deadline {
            break;
        }
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
    for s in streams.iter() {
        s.set_nonblocking(false).unwrap();
    }
    off.iter().map(|&o| o == bytes.len()).collect()
}

#[test]
fn partial_messages_from_many_connections_stay_within_the_budget() {
    const BUDGET: u64 = 16 * MIB;
    const CONNECTIONS: usize = 100;
    const SENT: usize = 512 << 10; // of an 8 MiB frame each: 50 MiB offered to a 16 MiB budget
    let (server, baseline) = start_server(&["--max-memory", "16MiB"]);
    let pid = server.pid();
    let mut attackers: Vec<TcpStream> = (0..CONNECTIONS).map(|_| upgraded(ATTACKER, server.addr, 0).0).collect();
    let mut bytes = header_of_large_frame(8 * MIB);
    bytes.resize(bytes.len() + SENT, 0x5a);

    let peak = RssPeak::start(pid);
    let fresh = FreshClients::start(server.addr);
    let log_from = server.stderr().len();
    let took_all = push_all(&mut attackers, &bytes, Duration::from_secs(20));
    // The kernel may have taken every byte before the server read much: the server reads on,
    // and closes (1013) the holders it cannot keep, at once past the budget or after 5 s paused.
    let mut received = vec![Vec::new(); CONNECTIONS];
    let collect_until = Instant::now() + Duration::from_secs(8);
    let closes: Vec<u16> = loop {
        for (s, got) in attackers.iter_mut().zip(&mut received) {
            read_available(s, got);
        }
        let closes: Vec<u16> = received
            .iter()
            .flat_map(|got| parse_frames(got).0)
            .filter(|(op, _)| *op == OpCode::Close)
            .map(|(_, p)| close_code(&p))
            .collect();
        if closes.contains(&1013) || Instant::now() >= collect_until {
            break closes;
        }
        thread::sleep(Duration::from_millis(50));
    };
    // The attack holds: one more fresh client now, while the server is full.
    let during = fresh_client(server.addr, 5);
    let mut fresh_seen = fresh.finish();
    fresh_seen.push(during);
    let counted = stats_lines(&server.stderr()[log_from..]);
    // The attackers leave with a reset: a plain close would leave their FIN behind the bytes
    // the server is not reading, and such a connection is gone only once the server closes it
    // (5 s after pausing it, while memory stays short).
    for s in &attackers {
        socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(attackers);
    let peak = peak.finish();

    let failures: Vec<_> = fresh_seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "fresh clients during the attack failed: {failures:?} ({} tried)",
        fresh_seen.len()
    );
    let shed = closes.iter().filter(|&&c| c == 1013).count();
    assert!(
        shed > 0,
        "no attacker was closed with 1013 (close codes seen: {closes:?}; took everything: {} of {CONNECTIONS}); \
         stats during the attack: {counted:?}",
        took_all.iter().filter(|&&t| t).count()
    );
    assert!(
        closes.iter().all(|&c| c == 1013),
        "attackers closed with other codes: {closes:?}"
    );
    let most = counted.iter().map(|l| l.mem).max().unwrap_or(0);
    assert!(counted.iter().all(|l| l.mem_limit == BUDGET), "{counted:?}");
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "partial messages: baseline {}, peak {} (+{}, {} over the budget), counted {} at most, \
         {shed} of {CONNECTIONS} closed with 1013, {} fresh clients, slowest step {:?}",
        mib(baseline),
        mib(peak),
        mib(grown),
        mib(grown.saturating_sub(BUDGET)),
        mib(most),
        fresh_seen.len(),
        fresh_seen.iter().filter_map(|r| r.as_ref().ok()).max()
    );
    assert!(
        grown <= BUDGET + over_budget(CONNECTIONS),
        "RSS grew by {} over a baseline of {}: more than the budget {} + {}",
        mib(grown),
        mib(baseline),
        mib(BUDGET),
        mib(over_budget(CONNECTIONS))
    );

    // Memory goes back once the attackers are gone.
    let log_from = server.stderr().len();
    if let Err(last) = wait_rss_down(pid, baseline + RETURN_SLACK) {
        panic!(
            "RSS still {} {RETURN_WITHIN:?} after the attack (baseline {})",
            mib(last),
            mib(baseline)
        );
    }
    let idle = wait_stats(&server, log_from, RETURN_WITHIN, |l| l.open == 0 && l.mem == 0);
    assert!(
        idle.is_ok(),
        "the budget never came back to 0 KiB: {}",
        idle.unwrap_err()
    );
}

#[test]
fn a_tiny_frame_broadcast_to_peers_that_never_read_holds_each_queue_at_its_bound() {
    // Each silent peer's kernel takes about 150 KB of 2-byte frames (about 77,000 messages)
    // before anything is queued; then about 260,000 more fill a queue to its bound (1 MiB,
    // the default, of which half is bytes and half room to grow).
    const PEERS: usize = 4;
    const BOUND: u64 = MIB;
    const MESSAGES: usize = 400_000;
    let (server, baseline) = start_server(&[
        "--mode",
        "broadcast",
        "--slow-consumer",
        "drop",
        "--max-memory",
        "64MiB",
    ]);
    let pid = server.pid();
    let silent: Vec<TcpStream> = (0..PEERS).map(|_| upgraded(ATTACKER, server.addr, 4096).0).collect();
    let (mut sender, _) = upgraded(FRESH, server.addr, 0);

    // The sender reads its own copies (and the end marker) on another thread.
    let mut reader = sender.try_clone().unwrap();
    let echoes = thread::spawn(move || {
        let mut got = Vec::new();
        let end = read_until(&mut reader, &mut got, Duration::from_secs(30), |b| {
            b.ends_with(b"\x81\x03end") // the last message
        });
        (end, got.len())
    });
    let peak = RssPeak::start(pid);
    let log_from = server.stderr().len();
    let empty = frame(true, OpCode::Text, b"");
    let mut flood = Vec::with_capacity(empty.len() * 1000);
    for _ in 0..1000 {
        flood.extend_from_slice(&empty);
    }
    let started = Instant::now();
    for _ in 0..MESSAGES / 1000 {
        sender.write_all(&flood).unwrap();
    }
    sender.write_all(&frame(true, OpCode::Text, b"end")).unwrap();
    let (end, echoed) = echoes.join().unwrap();
    assert_eq!(
        end,
        End::Done,
        "the sender's end marker never came back ({echoed} bytes did)"
    );
    let flood_took = started.elapsed();
    // The queues are full and held: let a stats line or two report them.
    thread::sleep(Duration::from_millis(300));
    let peak = peak.finish();
    let held = rss(pid);
    let lines = stats_lines(&server.stderr()[log_from..]);
    let last = *lines.last().expect("no stats line during the flood");
    let queued = lines.iter().map(|l| l.queued).max().unwrap();
    let counted = lines.iter().map(|l| l.mem).max().unwrap();
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "tiny broadcast: {flood_took:?}; baseline {}, peak {} (+{}), held {}; queued= {} B, mem= {} at most; dropped {}",
        mib(baseline),
        mib(peak),
        mib(grown),
        mib(held),
        queued,
        mib(counted),
        last.dropped
    );
    let peers = PEERS as u64;
    // The attack did fill every queue: messages were dropped for the silent peers, and each
    // queue came to its bound, which counts the memory a queue holds (its buffer's capacity).
    assert!(last.dropped > 0, "nothing was dropped: the queues never filled");
    assert!(
        counted >= peers * BOUND * 3 / 4,
        "mem= {counted} B at most for {PEERS} queues bound at {BOUND} B: they never filled"
    );
    // Besides the queues, the sender's read not yet handled may be counted: the loop handles
    // a bounded part of it per turn, and the rest waits its turn (src/io/engine.rs).
    let unread = 256 * KIB;
    // No queue holds more than its bound (the sender's own is nearly empty)...
    assert!(
        counted <= (peers + 1) * BOUND + unread,
        "the server counts {counted} B for {PEERS} queues bound at {BOUND} B"
    );
    // ...what waits to be sent is real bytes, not entries around 2-byte frames: a queue's
    // buffer is at least half full (it doubles as it grows)...
    assert!(
        queued <= counted && queued >= counted.saturating_sub(unread) / 2 - peers * 4 * KIB,
        "queued= {queued} B against mem= {counted} B"
    );
    // ...and the server's memory grew by what it counts, not a multiple of it (RSS/queued was
    // 12.4 before tiny frames were copied into the queues).
    assert!(
        grown <= counted + over_budget(PEERS + 1) && grown <= 2 * queued + over_budget(PEERS + 1),
        "RSS grew by {} for {} counted and {} queued",
        mib(grown),
        mib(counted),
        mib(queued)
    );

    drop(silent);
    drop(sender);
    let log_from = server.stderr().len();
    if let Err(last) = wait_rss_down(pid, baseline + RETURN_SLACK) {
        panic!(
            "RSS still {} after the peers left (baseline {})",
            mib(last),
            mib(baseline)
        );
    }
    let idle = wait_stats(&server, log_from, RETURN_WITHIN, |l| {
        l.open == 0 && l.mem == 0 && l.queued == 0
    });
    assert!(
        idle.is_ok(),
        "the budget never came back to 0 KiB: {}",
        idle.unwrap_err()
    );
}

#[test]
fn a_fin_right_after_a_close_frame_still_gets_the_whole_echo_and_the_close_reply() {
    const SIZE: usize = 4 << 20;
    let server = common::spawn_server(&[]);
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    for round in 0..3 {
        // A 4 KiB receive buffer (a slow link): the echo is still queued in the server when its
        // reads reach our FIN.
        let (mut s, mut got) = upgraded(FRESH, server.addr, 4096);
        let mut bytes = frame(true, OpCode::Binary, &payload);
        bytes.extend_from_slice(&close_frame(1000));
        s.write_all(&bytes).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let end = read_until(&mut s, &mut got, Duration::from_secs(20), |_| false);
        let (frames, used) = parse_frames(&got);
        let summary: Vec<_> = frames.iter().map(|(op, p)| (*op, p.len())).collect();
        assert_eq!(end, End::Eof, "round {round}: the stream did not end ({summary:?})");
        assert_eq!(
            used,
            got.len(),
            "round {round}: {} bytes of a cut frame after {summary:?}",
            got.len() - used
        );
        assert_eq!(summary.len(), 2, "round {round}: {summary:?}");
        assert_eq!(frames[0].0, OpCode::Binary, "round {round}");
        assert!(
            frames[0].1 == payload,
            "round {round}: the echo differs from the message"
        );
        assert_eq!(frames[1].0, OpCode::Close, "round {round}: {summary:?}");
        assert_eq!(close_code(&frames[1].1), 1000, "round {round}");
    }
}

#[test]
fn a_slow_consumer_closed_with_1008_gets_whole_frames_then_the_close_frame() {
    const SIZE: usize = 64 << 10;
    const MESSAGES: u32 = 150;
    let server = common::spawn_server(&["--mode", "broadcast"]);
    let (mut slow, mut got) = upgraded(ATTACKER, server.addr, 4096);
    let (mut sender, _) = upgraded(FRESH, server.addr, 0);
    let message = |i: u32| -> Vec<u8> {
        let mut m = vec![(i % 251) as u8; SIZE];
        m[..4].copy_from_slice(&i.to_be_bytes());
        m
    };
    // The sender reads its own copies on another thread, to the last one.
    let mut reader = sender.try_clone().unwrap();
    let want = MESSAGES as usize * (SIZE + 4);
    let echoes = thread::spawn(move || {
        let mut got = Vec::new();
        let end = read_until(&mut reader, &mut got, Duration::from_secs(30), |b| b.len() >= want);
        (end, got.len())
    });
    for i in 0..MESSAGES {
        sender.write_all(&frame(true, OpCode::Binary, &message(i))).unwrap();
    }
    let (end, echoed) = echoes.join().unwrap();
    assert_eq!(end, End::Done, "the sender got {echoed} of {want} bytes back");
    assert!(
        server.wait_for_stderr("slow consumer, closing", Duration::from_secs(5)),
        "the slow peer was never closed: {}",
        common::tail(&server.stderr(), 2000)
    );
    // The slow peer wakes up and reads everything.
    thread::sleep(Duration::from_secs(1));
    let end = read_until(&mut slow, &mut got, Duration::from_secs(20), |b| {
        parse_frames(b).0.iter().any(|(op, _)| *op == OpCode::Close)
    });
    let (frames, used) = parse_frames(&got);
    assert_eq!(end, End::Done, "no close frame came ({} whole frames)", frames.len());
    let (close, data) = frames.split_last().unwrap();
    assert_eq!(close.0, OpCode::Close);
    assert_eq!(close_code(&close.1), 1008, "close frame {:?}", close.1);
    assert_eq!(used, got.len(), "bytes after the close frame");
    assert!(!data.is_empty(), "no message arrived before the close");
    assert!(
        data.len() < MESSAGES as usize,
        "every message arrived: the peer was not slow"
    );
    for (i, (op, p)) in data.iter().enumerate() {
        assert_eq!(*op, OpCode::Binary, "frame {i}");
        assert!(*p == message(i as u32), "message {i} differs (length {})", p.len());
    }
    // Our close reply ends it.
    slow.write_all(&close_frame(1008)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        read_until(&mut slow, &mut rest, Duration::from_secs(5), |_| false),
        End::Eof
    );
    assert!(rest.is_empty(), "{} bytes after the close frame", rest.len());
}

#[test]
fn the_per_address_limit_refuses_only_that_address() {
    let server = common::spawn_server(&["--max-connections-per-ip", "3"]);
    let from = Ipv4Addr::new(127, 0, 0, 4);
    let held: Vec<_> = (0..3).map(|_| upgraded(from, server.addr, 0).0).collect();
    let mut fourth = connect_from(from, server.addr, 0);
    fourth.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    fourth.write_all(REQUEST).unwrap();
    assert_eq!(read_head(&mut fourth).map(|h| h.0), Ok(503), "the 4th from {from}");
    let other = Ipv4Addr::new(127, 0, 0, 5);
    let (mut s, _) = upgraded(other, server.addr, 0);
    s.write_all(&frame(true, OpCode::Text, b"still served")).unwrap();
    let mut got = Vec::new();
    read_until(&mut s, &mut got, Duration::from_secs(5), |b| {
        !parse_frames(b).0.is_empty()
    });
    assert_eq!(parse_frames(&got).0, [(OpCode::Text, b"still served".to_vec())]);
    // One of the three leaves: that address may connect again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect_from(from, server.addr, 0);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(REQUEST).unwrap();
        if read_head(&mut s).map(|h| h.0) == Ok(101) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{from} stayed refused after its connections left"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether util-linux's `prlimit` can run a program here.
fn have_prlimit() -> bool {
    common::runs_ok(Command::new("prlimit").args(["--nofile=256:256", "--", "true"]))
}

#[test]
fn max_connections_above_the_descriptor_limit_is_refused_at_start() {
    if !common::require_tool("prlimit (util-linux)", have_prlimit()) {
        return;
    }
    let out = Command::new("prlimit")
        .args(["--nofile=128:128", "--", env!("CARGO_BIN_EXE_wsloop")])
        .args(["serve", "--listen", "127.0.0.1:0", "--max-connections", "1000"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("max_connections 1000") && err.contains("open-file limit"),
        "{err}"
    );
}

/// Connects `n` clients from `from`, each sending its request; then reads every answer.
/// Returns the statuses (`Err` for a connection closed without one), failing on any that is
/// still silent `limit` after the last connect.
fn answers(addr: SocketAddr, from: Ipv4Addr, n: usize, limit: Duration) -> (Vec<Result<u16, String>>, Vec<TcpStream>) {
    let mut streams = Vec::new();
    for _ in 0..n {
        let mut s = connect_from(from, addr, 0);
        // A connection the server dropped at once may refuse the write: that is an answer too.
        let _ = s.write_all(REQUEST);
        streams.push(s);
    }
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    for (i, s) in streams.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let r = read_head(s);
        if let Err(e) = &r {
            assert!(
                !e.contains("timed out") && !e.contains("temporarily unavailable"),
                "connection {i} of {n} got no answer within {limit:?}: {e}"
            );
        }
        got.push(r.map(|h| h.0));
    }
    (got, streams)
}

#[test]
fn at_the_descriptor_limit_a_new_client_gets_503_or_a_close_never_a_hang() {
    if !common::require_tool("prlimit (util-linux)", have_prlimit()) {
        return;
    }
    // Started under a 128-descriptor limit: it holds 64 connections (the limit less its reserve).
    let exe = env!("CARGO_BIN_EXE_wsloop");
    let mut child = Command::new("prlimit")
        .args([
            "--nofile=128:128",
            "--",
            exe,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_log, addr) = common::wait_for_line(
        child.stderr.take().unwrap(),
        Duration::from_secs(10),
        common::parse_listening_line,
    );
    let addr = addr.expect("the server started");
    let (got, held) = answers(addr, ATTACKER, 200, Duration::from_secs(3));
    let upgraded = got.iter().filter(|r| **r == Ok(101)).count();
    let refused = got.iter().filter(|r| **r == Ok(503)).count();
    let closed = got.iter().filter(|r| r.is_err()).count();
    assert_eq!(upgraded + refused + closed, got.len(), "other answers: {got:?}");
    assert_eq!(upgraded, 64, "{refused} refused, {closed} closed");
    // A client from elsewhere, with the server full, is answered at once too.
    let (fresh, _) = answers(addr, FRESH, 1, Duration::from_secs(2));
    assert!(matches!(fresh[0], Ok(503) | Err(_)), "{fresh:?}");
    drop(held);
    let _ = child.kill();
    let _ = child.wait();

    // Out of descriptors for real: the limit lowered under a running server, far below what it
    // was started to hold.
    let server = common::spawn_server(&[]);
    let lowered = Command::new("prlimit")
        .args(["--pid", &server.pid().to_string(), "--nofile=64:64"])
        .status()
        .unwrap();
    assert!(lowered.success());
    let (got, held) = answers(server.addr, ATTACKER, 120, Duration::from_secs(3));
    let upgraded = got.iter().filter(|r| **r == Ok(101)).count();
    assert!(upgraded > 0 && upgraded < 64, "{upgraded} upgraded: {got:?}");
    assert!(got.iter().all(|r| matches!(r, Ok(101) | Ok(503) | Err(_))), "{got:?}");
    let (fresh, _) = answers(server.addr, FRESH, 1, Duration::from_secs(2));
    assert!(matches!(fresh[0], Ok(503) | Err(_)), "{fresh:?}");
    // Once descriptors free up, clients are served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fresh_client(server.addr, 1).is_err() {
        assert!(Instant::now() < deadline, "not served after descriptors freed up");
        thread::sleep(Duration::from_millis(100));
    }
}

/// [`Broadcast`], and the loop's counters read on each wake-up.
struct Counted {
    inner: Broadcast,
    stats: Arc<Mutex<Option<Stats>>>,
}

impl Handler for Counted {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }
    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.inner.on_open(ctx, conn);
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        self.inner.on_message(ctx, conn, msg);
    }
    fn on_close(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, code: u16, reason: &str) {
        self.inner.on_close(ctx, conn, code, reason);
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, timer: wsloop::server::Timer) {
        self.inner.on_timer(ctx, timer);
    }
    fn on_wake(&mut self, ctx: &mut Ctx<'_, ()>) {
        *self.stats.lock().unwrap() = Some(ctx.stats());
    }
}

/// A peer that reads everything on its own thread until the stream ends.
fn drain(mut s: TcpStream) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, Duration::from_secs(60), |_| false);
        got.len()
    })
}

#[test]
fn the_budget_counts_back_to_zero_after_a_busy_session() {
    let mut cfg = ServerConfig::default();
    cfg.max_memory = 4 << 20;
    cfg.max_backpressure = 256 << 10;
    cfg.close_timeout = Duration::from_millis(500);
    let server = Server::bind("127.0.0.1:0", cfg).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    let stats = Arc::new(Mutex::new(None));
    let handler = Counted {
        inner: Broadcast::new(true, true),
        stats: Arc::clone(&stats),
    };
    let loop_thread = thread::spawn(move || server.run(handler));
    let read_stats = || -> Stats {
        *stats.lock().unwrap() = None;
        handle.wake().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = *stats.lock().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the loop did not wake");
            thread::sleep(Duration::from_millis(5));
        }
    };

    // Readers, and a peer that never reads (closed as a slow consumer, 1008).
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (s, _) = upgraded(FRESH, addr, 0);
            (s.try_clone().unwrap(), drain(s))
        })
        .collect();
    let (silent, _) = upgraded(ATTACKER, addr, 4096);
    let (mut sender, _) = upgraded(FRESH, addr, 0);
    let sender_reads = drain(sender.try_clone().unwrap());
    // Small and large broadcasts, a fragmented message, a ping.
    let mut traffic = Vec::new();
    for i in 0..2000u32 {
        traffic.extend(frame(true, OpCode::Text, format!("message {i}").as_bytes()));
    }
    traffic.extend(frame(true, OpCode::Binary, &vec![1u8; 100 << 10]));
    traffic.extend(frame(false, OpCode::Binary, &vec![2u8; 300 << 10]));
    traffic.extend(frame(true, OpCode::Ping, b"ping"));
    traffic.extend(frame(false, OpCode::Continuation, &vec![3u8; 300 << 10]));
    traffic.extend(frame(true, OpCode::Continuation, &vec![4u8; 300 << 10]));
    for _ in 0..4 {
        traffic.extend(frame(true, OpCode::Binary, &vec![5u8; 1 << 20]));
    }
    sender.write_all(&traffic).unwrap();

    // A peer that leaves in the middle of a large frame, and one in the middle of its request.
    let (mut quitter, _) = upgraded(ATTACKER, addr, 0);
    let mut half = header_of_large_frame(2 * MIB);
    half.resize(half.len() + (1 << 20), 0x5a);
    quitter.write_all(&half).unwrap();
    let mut head_only = connect_from(ATTACKER, addr, 0);
    head_only.write_all(&REQUEST[..40]).unwrap();
    // The server counts what they hold.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut busy = read_stats();
    while busy.memory < 1 << 20 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        busy = read_stats();
    }
    assert!(busy.memory >= 1 << 20, "the partial frame was not counted: {busy:?}");
    drop(quitter);
    drop(head_only);

    // A peer whose partial message the budget cannot hold is closed with 1013.
    let (mut greedy, mut got) = upgraded(ATTACKER, addr, 0);
    let mut too_much = header_of_large_frame(8 * MIB);
    too_much.resize(too_much.len() + (6 << 20), 0x5a);
    let writer = {
        let mut w = greedy.try_clone().unwrap();
        thread::spawn(move || {
            let _ = w.write_all(&too_much);
        })
    };
    let end = read_until(&mut greedy, &mut got, Duration::from_secs(10), |b| {
        parse_frames(b).0.iter().any(|(op, _)| *op == OpCode::Close)
    });
    assert_eq!(end, End::Done, "the greedy peer was not closed");
    let (frames, _) = parse_frames(&got);
    let close = frames.iter().find(|(op, _)| *op == OpCode::Close).unwrap();
    assert_eq!(close_code(&close.1), 1013);
    drop(greedy);
    writer.join().unwrap();

    // Everyone leaves: readers with a close handshake, the rest by dropping the connection.
    sender.write_all(&close_frame(1000)).unwrap();
    sender.shutdown(Shutdown::Write).unwrap();
    sender_reads.join().unwrap();
    drop(sender);
    drop(silent);
    let mut closers = Vec::new();
    for _ in 0..3 {
        let (mut s, _) = upgraded(FRESH, addr, 0);
        s.write_all(&frame(true, OpCode::Text, b"bye")).unwrap();
        s.write_all(&close_frame(1000)).unwrap();
        closers.push(drain(s));
    }
    for c in closers {
        c.join().unwrap();
    }
    for (mut s, reads) in readers {
        s.write_all(&close_frame(1000)).unwrap();
        assert!(reads.join().unwrap() > 4 << 20, "a reader missed the broadcasts");
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = read_stats();
    while (last.memory != 0 || last.open != 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        last = read_stats();
    }
    assert_eq!(last.open, 0, "connections still open: {last:?}");
    assert_eq!(last.memory, 0, "bytes still counted with no connection: {last:?}");
    handle.shutdown().unwrap();
    loop_thread.join().unwrap().unwrap();
}

/// A fresh client in broadcast mode: connect, upgrade, send a text and read (past everyone
/// else's broadcasts) until it comes back. Returns how long that all took.
fn fresh_broadcast_client(addr: SocketAddr, i: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = connect_from(FRESH, addr, 0);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(REQUEST).map_err(|e| format!("request: {e}"))?;
    let (status, mut got) = read_head(&mut s).map_err(|e| format!("upgrade: {e}"))?;
    if status != 101 {
        return Err(format!("upgrade answered {status}"));
    }
    let text = format!("fresh client {i}");
    s.write_all(&frame(true, OpCode::Text, text.as_bytes()))
        .map_err(|e| format!("send: {e}"))?;
    let mut found = false;
    let end = read_until(&mut s, &mut got, Duration::from_secs(10), |b| {
        // Whole frames leave the buffer as they are looked at: the flood is large.
        let (frames, used) = parse_frames(b);
        found |= frames.iter().any(|(op, p)| *op == OpCode::Text && p == text.as_bytes());
        let _ = used;
        found
    });
    if end != End::Done {
        return Err(format!("its message: {end:?} after {:?}", start.elapsed()));
    }
    let _ = s.write_all(&close_frame(1000));
    Ok(start.elapsed())
}

#[test]
fn during_a_broadcast_flood_a_fresh_client_gets_in_and_its_message_back_promptly() {
    // One peer pumps empty broadcasts to peers that never read: every message of a read is
    // fanned out to every peer, and one read holds tens of thousands of them.
    const PEERS: usize = 20;
    const FRESH_CLIENTS: usize = 40;
    const P99_BOUND: Duration = Duration::from_millis(500);
    let (server, _) = start_server(&["--mode", "broadcast", "--slow-consumer", "drop"]);
    let silent: Vec<TcpStream> = (0..PEERS).map(|_| upgraded(ATTACKER, server.addr, 4096).0).collect();
    let (mut sender, _) = upgraded(ATTACKER, server.addr, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = Arc::clone(&stop);
    let flooder = thread::spawn(move || {
        let empty = frame(true, OpCode::Text, b"");
        let flood: Vec<u8> = empty.iter().copied().cycle().take(empty.len() * 32768).collect();
        sender.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let (mut sent, mut off) = (0u64, 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !flooding.load(Ordering::Relaxed) && Instant::now() < deadline {
            match sender.write(&flood[off..]) {
                Ok(n) => {
                    sent += n as u64;
                    off = (off + n) % flood.len();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    thread::sleep(Duration::from_micros(200))
                }
                Err(e) => panic!("the flood's sender: {e}"),
            }
            // Its own copies come back: read them, so that its queue never stops the flood.
            while let Ok(n) = sender.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
        sent
    });
    thread::sleep(Duration::from_millis(500));
    let mut took = Vec::new();
    let mut failures = Vec::new();
    for i in 0..FRESH_CLIENTS {
        match fresh_broadcast_client(server.addr, i) {
            Ok(t) => took.push(t),
            Err(e) => failures.push(e),
        }
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    drop(silent);
    took.sort();
    let pct = |p: usize| took.get((took.len() * p).div_ceil(100).max(1) - 1).copied();
    eprintln!(
        "broadcast flood ({} MB sent, {PEERS} silent peers): {} fresh clients, connect + upgrade + \
         own message back p50 {:?}, p99 {:?}; failures {failures:?}",
        sent / 1_000_000,
        took.len(),
        pct(50),
        pct(99)
    );
    assert!(failures.is_empty(), "fresh clients failed: {failures:?}");
    assert!(sent > 1_000_000, "the flood sent only {sent} bytes");
    let p99 = pct(99).unwrap();
    assert!(p99 < P99_BOUND, "p99 {p99:?}: a fresh client waited for the flood");
}
