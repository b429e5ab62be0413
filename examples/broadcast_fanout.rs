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
//! With `--deflate` every peer offers permessage-deflate: the server then compresses each
//! broadcast once and shares the compressed frame. The frame's length comes from its header,
//! peer 0's copy is inflated and compared with what was sent, and the `CPU` column is the server
//! CPU time the whole broadcast took (compression, queueing, writes). `--payload json|text`
//! sends the load generator's JSON-like or prose-like text instead of the binary pattern:
//!
//! ```text
//! cargo run --release --example broadcast_fanout -- --peers 10000 --sizes 1024,65536 --payload json --deflate
//! ```
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
use wsloop::bench::Content;
use wsloop::proto::frame::FrameHeader;

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
    /// Offer permessage-deflate.
    deflate: bool,
    /// What the broadcast message carries.
    payload: Content,
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
        deflate: false,
        payload: Content::Binary,
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
            Long("deflate") => o.deflate = true,
            Long("payload") => {
                let v = val(&mut p)?;
                o.payload = Content::parse(&v).ok_or(format!("--payload: '{v}' is not binary, json or text"))?;
            }
            Long("threads") => o.threads = val(&mut p)?.parse().map_err(|e| format!("--threads: {e}"))?,
            Long("help") | Short('h') => {
                println!(
                    "broadcast_fanout [--peers N] [--sizes 16,4096,65536] [--rounds 3] [--server PATH] \
                     [--mss BYTES] [--rcvbuf BYTES] [--deflate] [--payload binary|json|text] [--threads N]"
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
    if o.payload.is_text() && o.sizes.iter().any(|&s| s < 16) {
        return Err("--payload json and text need --sizes of 16 bytes or more".into());
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
    /// The handshake response so far (freed once open); in a round, the frame's first bytes
    /// until its header is whole (peer 0: the whole frame).
    head: Vec<u8>,
    /// Bytes received in the current round.
    got: usize,
    /// The frame's length, once its header is in.
    expect: Option<usize>,
    done: bool,
}

const REQUEST_TAIL: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// What a browser offers.
const DEFLATE_OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

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
    let offer = if o.deflate { DEFLATE_OFFER } else { "" };
    let request = format!("GET / HTTP/1.1\r\nHost: {server}\r\n{REQUEST_TAIL}{offer}\r\n");
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
                expect: None,
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
                    let agreed = String::from_utf8_lossy(&p.head[..end]).contains("permessage-deflate");
                    if agreed != o.deflate {
                        return Err(format!(
                            "#{i}: permessage-deflate offered {}, agreed {agreed}",
                            o.deflate
                        ));
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

/// The message to broadcast: `size` bytes of `content` (its header left as the template has it).
fn message(content: Content, size: usize) -> Vec<u8> {
    if content.is_text() {
        content.template(size)
    } else {
        (0..size).map(|i| i as u8).collect()
    }
}

/// A masked frame from a client carrying `payload` (text for the text kinds).
fn client_frame(content: Content, payload: &[u8]) -> Vec<u8> {
    let size = payload.len();
    let mut f = vec![if content.is_text() { 0x81u8 } else { 0x82 }];
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
    let key = [0x12u8, 0x34, 0x56, 0x78];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

#[cfg(feature = "deflate")]
fn inflate(payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    wsloop::proto::deflate::Decompressor::new()
        .decompress(payload, 64 << 20, &mut out)
        .map_err(|e| format!("peer 0 could not inflate the broadcast: {e}"))?;
    Ok(out)
}

#[cfg(not(feature = "deflate"))]
fn inflate(_: &[u8]) -> Result<Vec<u8>, String> {
    Err("this build has no permessage-deflate to inflate the broadcast with".into())
}

/// Checks peer 0's copy of the broadcast: its kind, RSV1 as agreed, and its payload
/// (inflated when compressed). Returns the payload's length on the wire.
fn check_copy(frame: &[u8], content: Content, sent: &[u8], deflate: bool) -> Result<usize, String> {
    let (h, n) = FrameHeader::parse(frame)
        .map_err(|e| format!("peer 0 got a bad frame: {e}"))?
        .ok_or("peer 0 got a cut frame")?;
    let payload = &frame[n..];
    if !h.fin
        || (h.opcode == wsloop::proto::frame::OpCode::Text) != content.is_text()
        || payload.len() as u64 != h.payload_len
    {
        return Err(format!("peer 0 got {h:?} with {} payload bytes", payload.len()));
    }
    let got = if h.rsv1 {
        if !deflate {
            return Err("peer 0 got a compressed frame without having agreed to it".into());
        }
        inflate(payload)?
    } else {
        payload.to_vec()
    };
    if got != sent {
        return Err(format!(
            "peer 0 got {} bytes that differ from the {} sent",
            got.len(),
            sent.len()
        ));
    }
    Ok(payload.len())
}

struct RoundResult {
    first: Duration,
    last: Duration,
    /// The broadcast frame's payload on the wire.
    wire: usize,
    /// Server CPU time from the send until every peer had the frame (10 ms clock ticks).
    cpu: Option<Duration>,
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
    /// The most the peers' queues held (by their own accounting) during the round.
    queued_max: u64,
}

/// One broadcast: peer 0 sends, everyone (peer 0 included) must receive the whole frame.
fn broadcast_round(
    poll: &mut Poll,
    peers: &mut [PeerConn],
    pid: u32,
    watch: &QueuedWatch,
    size: usize,
    o: &Options,
) -> Result<RoundResult, String> {
    let sent_payload = message(o.payload, size);
    let frame = client_frame(o.payload, &sent_payload);
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 256 << 10];
    // Settle: nothing should be arriving now.
    thread::sleep(Duration::from_millis(200));
    let _ = poll.poll(&mut events, Some(Duration::ZERO));
    for p in peers.iter_mut() {
        p.got = 0;
        p.expect = None;
        p.head.clear();
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

    let cpu_before = wsloop::sys::read_cpu(pid);
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
            let keep_all = i == 0;
            let head = &mut p.head;
            let n_read = drain(&mut p.stream, &mut buf, |b| {
                // The header (and peer 0's whole frame) for the length and the check.
                let room = if keep_all {
                    b.len()
                } else {
                    14usize.saturating_sub(head.len()).min(b.len())
                };
                head.extend_from_slice(&b[..room]);
            })
            .map_err(|e| format!("peer #{i}: {e}"))?;
            p.got += n_read;
            if p.expect.is_none() {
                if let Ok(Some((h, n))) = FrameHeader::parse(&p.head) {
                    p.expect = Some(n + h.payload_len as usize);
                }
            }
            if !p.done && p.expect.is_some_and(|e| p.got >= e) {
                p.done = true;
                done += 1;
                let t = t0.elapsed();
                first.get_or_insert(t);
                last = t;
            }
        }
    }
    let cpu = match (cpu_before, wsloop::sys::read_cpu(pid)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    stop.store(true, Ordering::Relaxed);
    let rss_peak = sampler.join().unwrap_or(0);
    let (rss_after, _) = memory_kib(pid).ok_or("cannot read the server's /proc status")?;
    thread::sleep(Duration::from_millis(30)); // one more stats line
    let queued_max = watch.max.load(Ordering::Relaxed);
    let expect = peers[0].expect.unwrap_or(0);
    if let Some((i, p)) = peers
        .iter()
        .enumerate()
        .find(|(_, p)| p.got != expect || p.expect != Some(expect))
    {
        return Err(format!(
            "peer #{i} got {} bytes of a {:?}-byte frame, peer 0 {expect}",
            p.got, p.expect
        ));
    }
    let wire = check_copy(&peers[0].head, o.payload, &sent_payload, o.deflate)?;
    Ok(RoundResult {
        first: first.unwrap_or_default(),
        last,
        wire,
        cpu,
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
        "payload: {}{}",
        o.payload.name(),
        if o.deflate {
            ", permessage-deflate agreed by every peer"
        } else {
            ""
        }
    );
    println!(
        "{:>8} {:>8} {:>6} {:>11} {:>11} {:>9} {:>14} {:>14} {:>14} {:>14} {:>16}",
        "payload",
        "on wire",
        "round",
        "first (ms)",
        "last (ms)",
        "CPU (ms)",
        "RSS before",
        "RSS peak",
        "RSS after",
        "queued (max)",
        "per-peer copies"
    );
    for &size in &o.sizes {
        for round in 1..=o.rounds {
            let r = broadcast_round(&mut poll, &mut peers, pid, &watch, size, o)?;
            println!(
                "{:>8} {:>8} {:>6} {:>11.2} {:>11.2} {:>9} {:>10} KiB {:>10} KiB {:>10} KiB {:>10} KiB {:>12} KiB",
                size,
                r.wire,
                round,
                r.first.as_secs_f64() * 1e3,
                r.last.as_secs_f64() * 1e3,
                r.cpu.map_or("?".to_string(), |c| c.as_millis().to_string()),
                r.rss_before,
                r.rss_peak,
                r.rss_after,
                r.queued_max / 1024,
                (size * peers.len()) / 1024,
            );
        }
    }
    println!();
    println!("on wire: the frame's payload bytes as sent to each peer (compressed with --deflate).");
    println!("CPU: the server's CPU time (user + system, 10 ms ticks) from the send until every peer had it.");
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
