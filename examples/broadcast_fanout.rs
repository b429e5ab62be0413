//! Broadcast fan-out measurement: one message to many connected peers.
//!
//! Starts `wsloop serve --mode broadcast` as a child process, opens `--peers` WebSocket
//! connections to it (spread over the source addresses 127.0.0.2, 127.0.0.3, … so that no
//! address runs short of ephemeral ports), lets one of them send a message, and measures the time
//! from that send until every peer (the sender included: echo-self is on) has received the whole
//! frame. Around each broadcast it samples the server's `VmRSS` from `/proc/PID/status` every
//! millisecond: the growth shows whether the server copied the message per peer (10,000 × 64 KiB
//! would be 625 MiB) or queued one shared copy.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example broadcast_fanout -- --peers 10000 --sizes 16,4096,65536 --rounds 3
//! cargo run --release --example broadcast_fanout -- --peers 10000 --threads 2   # two loops
//! ```
//!
//! On loopback the kernel's socket buffers usually take a whole frame at once, so the server
//! queues nothing in user space and the RSS figures show only that nothing was copied on the
//! way. To make the server queue the frame for (nearly) every peer, shrink the peers' sockets:
//! `--mss 536 --rcvbuf 4096 --sizes 131072 --rounds 1` (fresh connections: their kernel buffers
//! grow with use). The `queued (max)` column then shows what the peers' queues hold by their own
//! accounting — hundreds of MiB — while the RSS peak grows by a few MiB at most.
//!
//! The server and this client are separate processes because each needs one descriptor per
//! connection and the open-file limit here is 20,000. Loopback only; every phase is bounded in
//! count and time.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Connections allowed on one source address (the ephemeral range has ~28,000 ports).
const PER_SOURCE_ADDR: usize = 5_000;
/// Handshakes in progress at once (well under the server's listen backlog).
const IN_FLIGHT: usize = 256;
/// Upper bounds on each phase.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_PEERS: usize = 19_000;

struct Options {
    peers: usize,
    sizes: Vec<usize>,
    rounds: usize,
    server: PathBuf,
    /// TCP_MAXSEG and SO_RCVBUF for the peers' sockets (0: the system's defaults).
    mss: u32,
    rcvbuf: usize,
    /// The server's `--threads` (its loops; a broadcast is handed from one to the others).
    threads: usize,
}

fn parse_args() -> Result<Options, String> {
    use lexopt::prelude::*;
    let mut o = Options {
        peers: 10_000,
        sizes: vec![16, 4096, 65536],
        rounds: 3,
        server: default_server_path(),
        mss: 0,
        rcvbuf: 0,
        threads: 1,
    };
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("peers") => o.peers = val(&mut p)?.parse().map_err(|e| format!("--peers: {e}"))?,
            Long("rounds") => o.rounds = val(&mut p)?.parse().map_err(|e| format!("--rounds: {e}"))?,
            Long("sizes") => {
                o.sizes = val(&mut p)?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            Long("server") => o.server = PathBuf::from(val(&mut p)?),
            Long("mss") => o.mss = val(&mut p)?.parse().map_err(|e| format!("--mss: {e}"))?,
            Long("rcvbuf") => o.rcvbuf = val(&mut p)?.parse().map_err(|e| format!("--rcvbuf: {e}"))?,
            Long("threads") => o.threads = val(&mut p)?.parse().map_err(|e| format!("--threads: {e}"))?,
            Long("help") | Short('h') => {
                println!(
                    "broadcast_fanout [--peers N] [--sizes 16,4096,65536] [--rounds 3] [--server PATH] \
                     [--mss BYTES] [--rcvbuf BYTES] [--threads N]"
                );
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    if o.peers == 0 || o.peers > MAX_PEERS {
        return Err(format!("--peers must be 1..={MAX_PEERS}"));
    }
    if o.rounds == 0 || o.rounds > 20 || o.sizes.is_empty() || o.sizes.iter().any(|&s| s > 16 << 20) {
        return Err("--rounds must be 1..=20 and --sizes 0..=16MiB each".into());
    }
    Ok(o)
}

fn val(p: &mut lexopt::Parser) -> Result<String, String> {
    p.value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|_| "not UTF-8".to_string())
}

/// `target/<profile>/wsloop`, beside the `examples/` directory this example runs from.
fn default_server_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("wsloop")))
        .unwrap_or_else(|| PathBuf::from("target/release/wsloop"))
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The server child process; killed on drop.
struct ServerChild(Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The largest `queued=` figure of the server's stats lines since the last reset: the bytes
/// its peers' queues hold by their own accounting (a shared frame counts once per peer).
#[derive(Default)]
struct QueuedWatch {
    max: AtomicU64,
}

/// Reads the server's stderr: remembers the largest `queued=` and passes other lines on.
fn watch_stderr(stderr: std::process::ChildStderr, watch: Arc<QueuedWatch>) {
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("stats ") {
                let queued = rest
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("queued=")?.strip_suffix('B')?.parse::<u64>().ok());
                if let Some(q) = queued {
                    watch.max.fetch_max(q, Ordering::Relaxed);
                }
            } else {
                eprintln!("server: {line}");
            }
        }
    });
}

fn start_server(path: &PathBuf, threads: usize, watch: &Arc<QueuedWatch>) -> Result<(ServerChild, SocketAddr), String> {
    if !path.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first",
            path.display()
        ));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let child = Command::new(path)
        .args([
            "serve",
            "--mode",
            "broadcast",
            "--log",
            "warn",
            "--stats",
            "10ms",
            "--threads",
            &threads.to_string(),
            "--listen",
        ])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
    let mut child = ServerChild(child);
    watch_stderr(child.0.stderr.take().ok_or("no stderr pipe")?, Arc::clone(watch));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!("the server did not listen on {addr}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitingResponse,
    Open,
}

struct PeerConn {
    stream: TcpStream,
    phase: Phase,
    /// The handshake response so far (freed once open).
    head: Vec<u8>,
    /// Bytes received in the current round.
    got: usize,
    done: bool,
}

const REQUEST_TAIL: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn open_socket(source: Ipv4Addr, server: SocketAddr, o: &Options) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    if o.mss > 0 {
        // Advertised in the SYN: the server's side then sends small segments and its kernel
        // send buffer stays small, so the server has to queue in user space.
        sock.set_tcp_mss(o.mss)?;
    }
    if o.rcvbuf > 0 {
        sock.set_recv_buffer_size(o.rcvbuf)?;
    }
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    match sock.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std_stream: std::net::TcpStream = sock.into();
    Ok(TcpStream::from_std(std_stream))
}

/// Reads until `WouldBlock`; returns the bytes read, or an error on EOF.
fn drain(stream: &mut TcpStream, buf: &mut [u8], mut sink: impl FnMut(&[u8])) -> io::Result<usize> {
    let mut total = 0;
    loop {
        match stream.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                sink(&buf[..n]);
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Opens `n` WebSocket connections, at most `IN_FLIGHT` handshakes at a time.
fn connect_all(poll: &mut Poll, server: SocketAddr, o: &Options) -> Result<Vec<PeerConn>, String> {
    let n = o.peers;
    let request = format!("GET / HTTP/1.1\r\nHost: {server}\r\n{REQUEST_TAIL}");
    let mut peers: Vec<PeerConn> = Vec::with_capacity(n);
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 4096];
    let mut open = 0;
    let started = Instant::now();
    while open < n {
        // Start more while fewer than IN_FLIGHT are pending.
        while peers.len() < n && peers.len() - open < IN_FLIGHT {
            let i = peers.len();
            let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + (i / PER_SOURCE_ADDR) as u32);
            let mut stream = open_socket(source, server, o).map_err(|e| format!("connect #{i} from {source}: {e}"))?;
            poll.registry()
                .register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            peers.push(PeerConn {
                stream,
                phase: Phase::Connecting,
                head: Vec::new(),
                got: 0,
                done: false,
            });
        }
        if started.elapsed() > CONNECT_TIMEOUT {
            return Err(format!("only {open} of {n} connections open after {CONNECT_TIMEOUT:?}"));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0;
            let p = &mut peers[i];
            if p.phase == Phase::Connecting && (ev.is_writable() || ev.is_error()) {
                if let Ok(Some(e)) | Err(e) = p.stream.take_error() {
                    return Err(format!("connect #{i}: {e}"));
                }
                if p.stream.peer_addr().is_err() {
                    continue; // not connected yet
                }
                // The request is small: a fresh socket's buffer takes it whole.
                match p.stream.write(request.as_bytes()) {
                    Ok(k) if k == request.len() => p.phase = Phase::AwaitingResponse,
                    other => return Err(format!("handshake write #{i}: {other:?}")),
                }
            }
            if p.phase == Phase::AwaitingResponse && ev.is_readable() {
                let head = &mut p.head;
                drain(&mut p.stream, &mut buf, |b| head.extend_from_slice(b))
                    .map_err(|e| format!("handshake read #{i}: {e}"))?;
                if let Some(end) = p.head.windows(4).position(|w| w == b"\r\n\r\n") {
                    if !p.head.starts_with(b"HTTP/1.1 101") {
                        return Err(format!("#{i}: {}", String::from_utf8_lossy(&p.head)));
                    }
                    p.got = p.head.len() - (end + 4); // frame bytes that came along
                    p.head = Vec::new();
                    p.phase = Phase::Open;
                    open += 1;
                }
            }
        }
    }
    // From now on only reads matter.
    for (i, p) in peers.iter_mut().enumerate() {
        poll.registry()
            .reregister(&mut p.stream, Token(i), Interest::READABLE)
            .map_err(|e| e.to_string())?;
    }
    Ok(peers)
}

/// A masked binary frame from a client, and the length of the server's unmasked copy.
fn client_frame(size: usize) -> (Vec<u8>, usize) {
    let mut f = vec![0x82u8];
    let server_header = match size {
        0..=125 => {
            f.push(0x80 | size as u8);
            2
        }
        126..=65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(size as u16).to_be_bytes());
            4
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(size as u64).to_be_bytes());
            10
        }
    };
    let key = [0x12u8, 0x34, 0x56, 0x78];
    f.extend_from_slice(&key);
    f.extend((0..size).map(|i| (i as u8) ^ key[i % 4]));
    (f, server_header + size)
}

struct RoundResult {
    first: Duration,
    last: Duration,
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
    /// The most the peers' queues held (by their own accounting) during the round.
    queued_max: u64,
}

/// One broadcast: peer 0 sends, everyone (peer 0 included) must receive `expect` bytes.
fn broadcast_round(
    poll: &mut Poll,
    peers: &mut [PeerConn],
    pid: u32,
    watch: &QueuedWatch,
    size: usize,
) -> Result<RoundResult, String> {
    let (frame, expect) = client_frame(size);
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 256 << 10];
    // Settle: nothing should be arriving now.
    thread::sleep(Duration::from_millis(200));
    let _ = poll.poll(&mut events, Some(Duration::ZERO));
    for p in peers.iter_mut() {
        p.got = 0;
        p.done = false;
    }
    let (rss_before, _) = memory_kib(pid).ok_or("cannot read the server's /proc status")?;
    watch.max.store(0, Ordering::Relaxed);

    // Sample the server's RSS every millisecond while the broadcast runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory_kib(pid) {
                    peak = peak.max(rss);
                }
                thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };

    let t0 = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    let mut first = None;
    let mut last = Duration::ZERO;
    let n = peers.len();
    while done < n {
        if sent < frame.len() {
            match peers[0].stream.write(&frame[sent..]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("send: {e}")),
            }
        }
        if t0.elapsed() > DELIVERY_TIMEOUT {
            return Err(format!(
                "only {done} of {n} peers got the message within {DELIVERY_TIMEOUT:?}"
            ));
        }
        poll.poll(
            &mut events,
            Some(Duration::from_millis(if sent < frame.len() { 1 } else { 100 })),
        )
        .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0;
            let p = &mut peers[i];
            let n_read = drain(&mut p.stream, &mut buf, |_| {}).map_err(|e| format!("peer #{i}: {e}"))?;
            p.got += n_read;
            if !p.done && p.got >= expect {
                p.done = true;
                done += 1;
                let t = t0.elapsed();
                first.get_or_insert(t);
                last = t;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rss_peak = sampler.join().unwrap_or(0);
    let (rss_after, _) = memory_kib(pid).ok_or("cannot read the server's /proc status")?;
    thread::sleep(Duration::from_millis(30)); // one more stats line
    let queued_max = watch.max.load(Ordering::Relaxed);
    if let Some((i, p)) = peers.iter().enumerate().find(|(_, p)| p.got != expect) {
        return Err(format!("peer #{i} got {} bytes, expected {expect}", p.got));
    }
    Ok(RoundResult {
        first: first.unwrap_or_default(),
        last,
        rss_before,
        rss_peak: rss_peak.max(rss_after),
        rss_after,
        queued_max,
    })
}

fn run(o: &Options) -> Result<(), String> {
    let watch = Arc::new(QueuedWatch::default());
    let (server, addr) = start_server(&o.server, o.threads, &watch)?;
    let pid = server.0.id();
    let (rss_idle, _) = memory_kib(pid).ok_or("cannot read the server's /proc status")?;
    println!(
        "server {} pid {pid} on {addr}, RSS {rss_idle} KiB before any connection",
        o.server.display()
    );

    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let mut peers = connect_all(&mut poll, addr, o)?;
    thread::sleep(Duration::from_millis(300));
    let (rss_conn, hwm_conn) = memory_kib(pid).ok_or("cannot read the server's /proc status")?;
    println!(
        "{} peers connected in {:.2?}; server RSS {rss_conn} KiB (peak so far {hwm_conn} KiB), \
         {:.0} bytes per connection over idle",
        peers.len(),
        t.elapsed(),
        (rss_conn.saturating_sub(rss_idle) * 1024) as f64 / peers.len() as f64
    );
    println!();
    println!(
        "{:>8} {:>6} {:>11} {:>11} {:>14} {:>14} {:>14} {:>14} {:>16}",
        "payload",
        "round",
        "first (ms)",
        "last (ms)",
        "RSS before",
        "RSS peak",
        "RSS after",
        "queued (max)",
        "per-peer copies"
    );
    for &size in &o.sizes {
        for round in 1..=o.rounds {
            let r = broadcast_round(&mut poll, &mut peers, pid, &watch, size)?;
            println!(
                "{:>8} {:>6} {:>11.2} {:>11.2} {:>10} KiB {:>10} KiB {:>10} KiB {:>10} KiB {:>12} KiB",
                size,
                round,
                r.first.as_secs_f64() * 1e3,
                r.last.as_secs_f64() * 1e3,
                r.rss_before,
                r.rss_peak,
                r.rss_after,
                r.queued_max / 1024,
                (size * peers.len()) / 1024,
            );
        }
    }
    println!();
    println!("RSS peak - RSS before: the server's growth during the broadcast (sampled every ms).");
    println!("queued (max): the most the peers' outbound queues held at once by their own accounting");
    println!("(from `--stats 10ms`; a shared frame counts once per peer that holds it).");
    println!("per-peer copies: what one copy of the payload per peer would have cost.");
    drop(peers);
    drop(server);
    Ok(())
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("broadcast_fanout: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("broadcast_fanout: {e}");
        std::process::exit(1);
    }
}
