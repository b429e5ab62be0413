//! Hostile and careless peers against a running `wsloop serve`: one subcommand per attack of
//! issue 9, each measuring what it costs the server and what a legitimate client sees meanwhile.
//!
//! Every subcommand runs a bounded attack against `--url ws://127.0.0.1:PORT/` (or `--addr`),
//! samples the server's `VmRSS` from `/proc/PID/status` every 10 ms while the attack lasts
//! (`--server-pid`), closes the attack's connections, waits `--settle` (5 s) and reads `VmRSS`
//! again. Beside the attack a fresh client connects, does `--probe-echoes` small echo round
//! trips, closes, and starts over every `--probe-interval`: its connect times, echo latencies
//! and errors are "what a fresh client saw". The attack traffic uses raw sockets and hand-built
//! masked frames, because hostile peers do not follow the protocol.
//!
//! | subcommand | start the server with | attack (defaults) |
//! |---|---|---|
//! | `partial-frames` | `serve` (with `--idle-timeout 5s --ping-interval 2s` and `--duration 20s`, the trickle still keeps every connection) | 5,000 connections each send the header of a 16 MiB frame and its first 1 MiB, then one more byte every 3 s for 10 s |
//! | `broadcast-flood` | `serve --mode broadcast --slow-consumer drop` (holds each queue at its bound; with `close` the peers are closed there) | 100 peers with 4 KiB receive buffers never read; one sender sends 700,000 empty messages and waits for all its echoes (at most `--duration` 120 s), then 2 s more |
//! | `echo-never-read` | `serve` | one peer sends 16 MiB messages for 10 s and never reads |
//! | `fin-after-close` | `serve` | a 4 MiB message, a close frame, then FIN (`shutdown(SHUT_WR)`) from a peer with a 4 KiB receive buffer (a slow link; `--rcvbuf 0`: the system's, where the loss is a race); reads what comes back; 3 rounds |
//! | `slow-consumer-1008` | `serve --mode broadcast` | a peer with a 4 KiB receive buffer reads nothing while a sender broadcasts 200 × 64 KiB; 5 s later it reads everything |
//! | `announce-churn` | `serve --mode broadcast --announce` | 2,000 peers read; 51 new connections per second join and leave for 20 s |
//! | `slowloris` | `serve --max-connections 1000` | 1,000 connections from one address send their request one byte a second for 30 s, reconnecting when dropped (`--upgrade`: complete it and sit idle) |
//! | `fd-limit` | `prlimit --nofile=4096 -- wsloop serve --max-connections 30000` | 4,200 idle connections, past the server's descriptor limit, held 20 s |
//! | `deflate-bomb` | `serve` (permessage-deflate on, as by default; `--max-message` sets the bound) | 100 connections agree on permessage-deflate and each sends one compressed message that inflates to 1 GiB of zeros (about 1 MB on the wire); each should be closed with 1009 (`--messages N --duration D`: N bombs each, below the limit, for at most D) |
//! | `tls-partial-records` | `serve --tls-cert C --tls-key K --max-memory 16MiB`, with `--url wss://localhost:PORT/ --ca CA` | 1,000 `wss://` connections each send all but the last 5 bytes of a 16,600-byte record and stall for 10 s, while 3 clients send 256 KiB messages (`--size 0`: idle connections) |
//!
//! `fd-limit` scales the issue's case (`--max-connections 30000` under a 20,000 limit) down with
//! `prlimit`, because this tool needs a descriptor per connection under the same limit.
//!
//! "RSS after" is the last row of the issue: every subcommand reports it, with the server's open
//! sockets at that moment to show its connections are gone.
//!
//! With `--server-log FILE` (the server's stderr, run with `--stats 1s`) the largest `queued=`
//! figure written during the attack is reported beside the RSS: what the server thinks it holds.
//!
//! ```text
//! cargo build --release --examples
//! target/release/wsloop serve --listen 127.0.0.1:9001 --log warn & PID=$!
//! target/release/examples/hostile partial-frames --url ws://127.0.0.1:9001/ --server-pid $PID
//! ```
//!
//! Attack connections come from `--source-ips` (127.0.0.2-127.0.0.60; `slowloris`: 127.0.0.2
//! alone), the fresh client from 127.0.0.1. Loopback targets only; every phase is bounded in
//! count and time.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Socket, Type};

const HELP: &str = "\
Usage: hostile ATTACK --url ws://127.0.0.1:PORT/ [--server-pid PID] [OPTIONS]

Attacks (see the source's header for the server flags each needs):
  partial-frames      connections each send part of a large frame and never finish it
  broadcast-flood     peers that never read while a sender floods empty messages
  echo-never-read     a peer sends large messages and never reads the echoes
  fin-after-close     a large message, a close frame, then FIN; checks what comes back
  slow-consumer-1008  a broadcast peer too slow to read, then reads; checks what it got
  announce-churn      many reading peers while new connections join and leave
  slowloris           connections that never finish their request, reconnecting
  fd-limit            idle connections past the server's descriptor limit
  deflate-bomb        compressed messages that inflate far past the message limit
  tls-partial-records wss:// connections holding TLS records received in part

Common options:
  --url URL | --addr HOST:PORT  the server (loopback only)
  --server-pid PID              sample this process's VmRSS and CPU time
  --server-log FILE             the server's stderr (with --stats): report its largest queued=
  --settle DUR                  wait after the attack before reading RSS again [5s]
  --source-ips A-B|A,B,...      attack source addresses [127.0.0.2-127.0.0.60]
  --probes N                    fresh-client connections at most [per attack]
  --probe-echoes N              echo round trips per fresh connection [per attack]
  --probe-interval DUR          pause between fresh connections [per attack]
  --probe-timeout DUR           connect, handshake and each echo [10s]
  --json                        print one JSON object instead of the summary

Sizing (defaults depend on the attack):
  --connections N   attack connections (partial-frames 5000, slowloris 1000, fd-limit 4200)
  --peers N         peers (broadcast-flood 100, echo-never-read 1, announce-churn 2000)
  --frame-size B    declared frame length (partial-frames 16MiB)
  --send B          bytes of it sent (partial-frames 1MiB)
  --size B          message size (echo-never-read 16MiB, fin-after-close 4MiB, slow-consumer-1008 64KiB)
  --messages N      messages (broadcast-flood 700000, slow-consumer-1008 200, deflate-bomb 1 per connection)
  --rounds N        fin-after-close rounds (3)
  --rate N          announce-churn new connections per second (51)
  --duration DUR    how long the attack holds after its set-up
  --trickle DUR     one more byte per connection this often (partial-frames 3s, slowloris 1s; 0: off)
  --interval DUR    slow-consumer-1008: pause between messages (10ms)
  --rcvbuf B        SO_RCVBUF of the slow peer (fin-after-close, slow-consumer-1008: 4KiB; 0: the system's)
                    or of the silent peers (broadcast-flood: 4KiB)
  --read-chunk B    fin-after-close, slow-consumer-1008: bytes per read when reading back [256KiB]
  --upgrade         slowloris: complete the handshake and sit idle instead
  --ca FILE         tls-partial-records: the CA that signed the server's certificate
";

/// Handshakes in progress at once (well under the server's listen backlog).
const IN_FLIGHT: usize = 256;
/// Any one phase gives up after this long.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hostile: {e}");
            2
        }
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Default)]
struct Opts {
    attack: String,
    url: Option<String>,
    server_pid: Option<u32>,
    server_log: Option<PathBuf>,
    json: bool,
    settle: Option<Duration>,
    sources: Option<Vec<IpAddr>>,
    probes: Option<usize>,
    probe_echoes: Option<usize>,
    probe_interval: Option<Duration>,
    probe_timeout: Option<Duration>,
    connections: Option<usize>,
    peers: Option<usize>,
    frame_size: Option<u64>,
    send: Option<u64>,
    size: Option<u64>,
    messages: Option<usize>,
    rounds: Option<usize>,
    rate: Option<f64>,
    duration: Option<Duration>,
    trickle: Option<Duration>,
    interval: Option<Duration>,
    rcvbuf: Option<usize>,
    read_chunk: Option<usize>,
    upgrade: bool,
    ca: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Opts>, String> {
    use lexopt::prelude::*;
    let mut o = Opts::default();
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        let v = |p: &mut lexopt::Parser| -> Result<String, String> {
            p.value()
                .map_err(|e| e.to_string())?
                .into_string()
                .map_err(|_| "not UTF-8".to_string())
        };
        match arg {
            Value(a) if o.attack.is_empty() => o.attack = a.into_string().map_err(|_| "not UTF-8")?,
            Long("url") | Long("addr") => o.url = Some(v(&mut p)?),
            Long("server-pid") => o.server_pid = Some(num(&v(&mut p)?)?),
            Long("server-log") => o.server_log = Some(PathBuf::from(v(&mut p)?)),
            Long("json") => o.json = true,
            Long("settle") => o.settle = Some(duration(&v(&mut p)?)?),
            Long("source-ips") => o.sources = Some(source_ips(&v(&mut p)?)?),
            Long("probes") => o.probes = Some(num(&v(&mut p)?)?),
            Long("probe-echoes") => o.probe_echoes = Some(num(&v(&mut p)?)?),
            Long("probe-interval") => o.probe_interval = Some(duration(&v(&mut p)?)?),
            Long("probe-timeout") => o.probe_timeout = Some(duration(&v(&mut p)?)?),
            Long("connections") => o.connections = Some(num(&v(&mut p)?)?),
            Long("peers") => o.peers = Some(num(&v(&mut p)?)?),
            Long("frame-size") => o.frame_size = Some(size(&v(&mut p)?)?),
            Long("send") => o.send = Some(size(&v(&mut p)?)?),
            Long("size") => o.size = Some(size(&v(&mut p)?)?),
            Long("messages") => o.messages = Some(num(&v(&mut p)?)?),
            Long("rounds") => o.rounds = Some(num(&v(&mut p)?)?),
            Long("rate") => o.rate = Some(num(&v(&mut p)?)?),
            Long("duration") => o.duration = Some(duration(&v(&mut p)?)?),
            Long("trickle") => o.trickle = Some(duration(&v(&mut p)?)?),
            Long("interval") => o.interval = Some(duration(&v(&mut p)?)?),
            Long("rcvbuf") => o.rcvbuf = Some(size(&v(&mut p)?)? as usize),
            Long("read-chunk") => o.read_chunk = Some(size(&v(&mut p)?)? as usize),
            Long("upgrade") => o.upgrade = true,
            Long("ca") => o.ca = Some(PathBuf::from(v(&mut p)?)),
            Short('h') | Long("help") => {
                print!("{HELP}");
                return Ok(None);
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    Ok(Some(o))
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.replace('_', "").parse().map_err(|_| format!("invalid number '{s}'"))
}

/// `500ms`, `3s`, `1.5s`, `1m`, or plain seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = split_unit(s);
    let n: f64 = n.parse().map_err(|_| format!("invalid duration '{s}'"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration '{s}'")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration '{s}'"))
}

/// `65536`, `64KiB`, `15.9MiB`, `1GiB`.
fn size(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s);
    let n: f64 = n.parse().map_err(|_| format!("invalid size '{s}'"))?;
    let mult = match unit {
        "" | "B" => 1.0,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" | "m" => 1024.0 * 1024.0,
        "GiB" | "G" | "g" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("invalid size '{s}' (B, KiB, MiB, GiB)")),
    };
    Ok((n * mult).round() as u64)
}

fn split_unit(s: &str) -> (&str, &str) {
    let i = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    (&s[..i], &s[i..])
}

/// `127.0.0.2-127.0.0.60` or a comma-separated list.
fn source_ips(s: &str) -> Result<Vec<IpAddr>, String> {
    let bad = || format!("invalid --source-ips '{s}'");
    if let Some((a, b)) = s.split_once('-') {
        let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 1024 {
            return Err(bad());
        }
        return Ok((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect());
    }
    s.split(',').map(|x| x.trim().parse().map_err(|_| bad())).collect()
}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    /// A `Sec-WebSocket-Extensions` offer for the attack's connections.
    offer: Option<&'static str>,
}

fn parse_target(s: &str) -> Result<Target, String> {
    if s.starts_with("wss://") {
        return Err("wss:// is not supported".into());
    }
    let rest = s.strip_prefix("ws://").unwrap_or(s);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{authority}': {e}"))?
        .next()
        .ok_or_else(|| format!("no address for '{authority}'"))?;
    // Attack traffic goes to this machine only.
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
        offer: None,
    })
}

#[derive(Clone)]
struct Env {
    target: Target,
    pid: Option<u32>,
    sources: Vec<IpAddr>,
    probe: ProbeCfg,
}

#[derive(Clone)]
struct ProbeCfg {
    max: usize,
    echoes: usize,
    interval: Duration,
    timeout: Duration,
}

fn run() -> Result<(), String> {
    let Some(o) = parse_args()? else { return Ok(()) };
    if o.attack.is_empty() {
        print!("{HELP}");
        return Err("name an attack".into());
    }
    raise_fd_limit();
    let url = o.url.as_deref().unwrap_or("ws://127.0.0.1:9001/");
    let tls_attack = o.attack.starts_with("tls-");
    let target = match url.strip_prefix("wss://") {
        Some(rest) if tls_attack => parse_target(rest)?,
        _ if tls_attack => return Err(format!("{} needs a wss:// URL", o.attack)),
        _ => parse_target(url)?,
    };
    // Fresh-client defaults: a few connections with many echoes, or many short ones where the
    // question is whether a connection gets in at all.
    let many_connects = matches!(o.attack.as_str(), "slowloris" | "fd-limit" | "announce-churn");
    let probe = ProbeCfg {
        max: o.probes.unwrap_or(if many_connects { 300 } else { 50 }),
        echoes: o.probe_echoes.unwrap_or(if many_connects { 2 } else { 20 }),
        interval: o
            .probe_interval
            .unwrap_or(Duration::from_millis(if many_connects { 100 } else { 250 })),
        timeout: o.probe_timeout.unwrap_or(Duration::from_secs(10)),
    };
    let default_sources = if o.attack == "slowloris" {
        "127.0.0.2"
    } else {
        "127.0.0.2-127.0.0.60"
    };
    let env = Env {
        target,
        pid: o.server_pid,
        sources: match &o.sources {
            Some(s) => s.clone(),
            None => source_ips(default_sources)?,
        },
        probe,
    };
    if let Some(pid) = env.pid {
        if rss_kib(pid).is_none() {
            return Err(format!("cannot read /proc/{pid}/status"));
        }
    }
    let mut report = Obj::default();
    report.set("attack", o.attack.as_str());
    report.set("target", env.target.addr.to_string());
    report.set("server_pid", env.pid.map(u64::from));
    let rss_before = env.pid.and_then(rss_kib);
    let fds_before = env.pid.and_then(sockets_open);
    let cpu_before = env.pid.and_then(cpu_secs);
    let log = o.server_log.as_ref().map(|p| LogWatch::start(p.clone()));
    let rss = Sampler::start(env.pid);
    let t0 = Instant::now();

    let outcome = match o.attack.as_str() {
        "partial-frames" => partial_frames(&env, &o),
        "broadcast-flood" => broadcast_flood(&env, &o),
        "echo-never-read" => echo_never_read(&env, &o),
        "fin-after-close" => fin_after_close(&env, &o),
        "slow-consumer-1008" => slow_consumer(&env, &o),
        "announce-churn" => announce_churn(&env, &o),
        "slowloris" => slowloris(&env, &o),
        "fd-limit" => fd_limit(&env, &o),
        "deflate-bomb" => deflate_bomb(&env, &o),
        "tls-partial-records" => tls_partial_records(&env, &o),
        a => return Err(format!("unknown attack '{a}' (see --help)")),
    };
    // The attack's connections are closed when its function returns.
    let attack_secs = t0.elapsed().as_secs_f64();
    let peak = rss.finish();
    let cpu_attack = env.pid.and_then(cpu_secs);
    let queued_max = log.map(LogWatch::finish);
    let (attack, fresh) = outcome?;
    let settle = o.settle.unwrap_or(Duration::from_secs(5));
    thread::sleep(settle);

    let mut server = Obj::default();
    server.set("rss_before_kib", rss_before);
    server.set("rss_peak_kib", peak);
    server.set("vm_hwm_kib", env.pid.and_then(|p| proc_status_kib(p, "VmHWM:")));
    server.set("rss_after_kib", env.pid.and_then(rss_kib));
    server.set("settle_s", settle.as_secs_f64());
    server.set("sockets_before", fds_before);
    server.set("sockets_after", env.pid.and_then(sockets_open));
    server.set(
        "cpu_pct_during_attack",
        match (cpu_before, cpu_attack) {
            (Some(a), Some(b)) if attack_secs > 0.0 => Some(100.0 * (b - a) / attack_secs),
            _ => None,
        },
    );
    if let Some(q) = queued_max {
        server.set("stats_queued_max_bytes", q);
    }
    report.set("attack_s", attack_secs);
    report.set("server", server);
    report.set("attack_detail", attack);
    report.set("fresh_client", fresh.summary(&env.probe));
    if o.json {
        println!("{}", Val::Obj(report).json());
    } else {
        print_human(&report, 0);
    }
    Ok(())
}

/// Every connection needs a descriptor: take the hard limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn fd_limit_now() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

fn check_fds(n: usize) -> Result<(), String> {
    let limit = fd_limit_now();
    if n as u64 + 64 > limit {
        return Err(format!(
            "{n} connections need more than this process's open-file limit ({limit})"
        ));
    }
    Ok(())
}

type Outcome = Result<(Obj, ProbeStats), String>;

// ---------------------------------------------------------------------------------------------
// The attacks

/// Connections each send the header of a `--frame-size` frame and its first `--send` bytes, then
/// keep the frame alive with one more byte every `--trickle`.
fn partial_frames(env: &Env, o: &Opts) -> Outcome {
    let n = o.connections.unwrap_or(5000);
    let frame_size = o.frame_size.unwrap_or(16 << 20);
    let send = o.send.unwrap_or(1 << 20).min(frame_size.saturating_sub(1));
    let hold = o.duration.unwrap_or(Duration::from_secs(10));
    let trickle = o.trickle.unwrap_or(Duration::from_secs(3));
    check_fds(n)?;
    let mut d = Obj::default();
    d.set("connections", n);
    d.set("frame_size", frame_size);
    d.set("sent_per_connection", send);
    let opened = open_many(env, n, true, 0)?;
    d.set("opened", opened.streams.len());
    d.set("open_failures", opened.failures_obj());
    d.set("open_s", opened.secs);
    let mut conns = opened.streams;

    // One buffer for everyone: the payload's bytes do not matter, only that they are part of a frame.
    let mut buf = Vec::with_capacity(send as usize + 14);
    frame_header(&mut buf, true, 2, frame_size, mask_key());
    let head_len = buf.len();
    buf.resize(head_len + send as usize, 0x5a);
    let probes = Prober::start(env);
    let t0 = Instant::now();
    let mut off = vec![0usize; conns.len()];
    let mut closed = vec![false; conns.len()];
    let deadline = t0 + PHASE_LIMIT;
    loop {
        let mut progress = false;
        let mut pending = 0;
        for (i, s) in conns.iter_mut().enumerate() {
            if closed[i] || off[i] >= buf.len() {
                continue;
            }
            pending += 1;
            match s.write(&buf[off[i]..]) {
                Ok(k) => {
                    off[i] += k;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => closed[i] = true,
            }
        }
        if pending == 0 || Instant::now() >= deadline {
            break;
        }
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let push_secs = t0.elapsed().as_secs_f64();
    let fully_sent = off.iter().filter(|&&x| x >= buf.len()).count();
    d.set("push_s", push_secs);
    d.set("connections_that_sent_it_all", fully_sent);

    // Hold: a byte every `trickle` keeps each connection active as far as timeouts can tell.
    let hold_end = Instant::now() + hold;
    let mut next = Instant::now() + trickle;
    let mut trickled = 0u64;
    let mut got_bytes = 0u64;
    let mut scratch = vec![0u8; 64 << 10];
    while Instant::now() < hold_end {
        if !trickle.is_zero() && Instant::now() >= next {
            next += trickle;
            for (i, s) in conns.iter_mut().enumerate() {
                if !closed[i] && s.write(&[0x5a]).is_ok() {
                    trickled += 1;
                }
            }
        }
        for (i, s) in conns.iter_mut().enumerate() {
            if closed[i] {
                continue;
            }
            let (n, eof) = drain(s, &mut scratch);
            got_bytes += n;
            closed[i] |= eof;
        }
        thread::sleep(Duration::from_millis(100).min(hold_end.saturating_duration_since(Instant::now())));
    }
    d.set("hold_s", hold.as_secs_f64());
    d.set("trickle_s", trickle.as_secs_f64());
    d.set("trickle_bytes_sent", trickled);
    d.set("closed_by_server", closed.iter().filter(|&&c| c).count());
    d.set("bytes_from_server", got_bytes);
    let fresh = probes.finish();
    conns.clear();
    Ok((d, fresh))
}

/// `--peers` connections never read; one sender sends `--messages` empty messages and reads
/// its own echoes; then the attack holds `--duration`.
fn broadcast_flood(env: &Env, o: &Opts) -> Outcome {
    let peers = o.peers.unwrap_or(100);
    let messages = o.messages.unwrap_or(700_000);
    let msg_size = o.size.unwrap_or(0) as usize;
    // The server is done with the flood when the sender has every echo back.
    let limit = o.duration.unwrap_or(Duration::from_secs(120));
    check_fds(peers + 1)?;
    let mut d = Obj::default();
    d.set("silent_peers", peers);
    d.set("messages", messages);
    d.set("message_size", msg_size);
    // Small receive buffers: the server's queues fill in seconds instead of minutes.
    let rcvbuf = o.rcvbuf.unwrap_or(4096);
    d.set("silent_peer_rcvbuf", rcvbuf);
    let opened = open_many(env, peers, true, rcvbuf)?;
    d.set("peers_opened", opened.streams.len());
    d.set("open_failures", opened.failures_obj());
    let silent = opened.streams;
    let mut sender = open_one(env, 0)?;

    // Every frame with its own mask, built once.
    let payload = vec![0x61u8; msg_size];
    let mut buf = Vec::with_capacity(messages * (msg_size + 14));
    for _ in 0..messages {
        masked_frame(&mut buf, 2, &payload);
    }
    let frame_len = buf.len() / messages.max(1);
    let probes = Prober::start(env);
    let t0 = Instant::now();
    let deadline = t0 + limit;
    let mut off = 0;
    let mut back = 0u64;
    let mut scratch = vec![0u8; 256 << 10];
    let mut sender_closed = false;
    while off < buf.len() && Instant::now() < deadline {
        let mut progress = false;
        let end = (off + (256 << 10)).min(buf.len());
        match sender.write(&buf[off..end]) {
            Ok(k) => {
                off += k;
                progress = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                sender_closed = true;
                break;
            }
        }
        let (k, eof) = drain(&mut sender, &mut scratch);
        back += k;
        if eof {
            sender_closed = true;
            break;
        }
        if !progress && k == 0 {
            thread::sleep(Duration::from_micros(200));
        }
    }
    d.set("send_s", t0.elapsed().as_secs_f64());
    let sent = off / frame_len.max(1);
    d.set("messages_sent", sent);
    let echoes = (sent * (server_header_len(msg_size as u64) + msg_size)) as u64;
    let mut hold_end = None;
    loop {
        let now = Instant::now();
        if sender_closed || now >= hold_end.unwrap_or(deadline) {
            break;
        }
        if hold_end.is_none() && back >= echoes {
            d.set("all_echoed_after_s", t0.elapsed().as_secs_f64());
            // A little longer: the silent peers' queues are now at their fullest.
            hold_end = Some(now + Duration::from_secs(2));
        }
        let (k, eof) = drain(&mut sender, &mut scratch);
        back += k;
        sender_closed |= eof;
        if k == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    d.set("attack_s", t0.elapsed().as_secs_f64());
    d.set("sender_bytes_back", back);
    d.set("sender_bytes_expected", echoes);
    d.set("sender_closed_by_server", sender_closed);
    let fresh = probes.finish();
    drop(silent);
    drop(sender);
    Ok((d, fresh))
}

/// `--peers` connections send `--size` messages for `--duration` and never read.
fn echo_never_read(env: &Env, o: &Opts) -> Outcome {
    let peers = o.peers.unwrap_or(1);
    let size = o.size.unwrap_or(16 << 20) as usize;
    let hold = o.duration.unwrap_or(Duration::from_secs(10));
    check_fds(peers)?;
    let mut d = Obj::default();
    d.set("peers", peers);
    d.set("message_size", size);
    let opened = open_many(env, peers, true, 0)?;
    d.set("opened", opened.streams.len());
    let mut conns = opened.streams;
    let mut msg = Vec::with_capacity(size + 14);
    masked_frame(&mut msg, 2, &vec![0x42u8; size]);
    let probes = Prober::start(env);
    let end = Instant::now() + hold;
    let mut sent = vec![0u64; conns.len()];
    let mut closed = vec![false; conns.len()];
    while Instant::now() < end {
        let mut progress = false;
        for (i, s) in conns.iter_mut().enumerate() {
            if closed[i] {
                continue;
            }
            let at = (sent[i] % msg.len() as u64) as usize;
            match s.write(&msg[at..]) {
                Ok(k) => {
                    sent[i] += k as u64;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => closed[i] = true,
            }
        }
        if !progress {
            thread::sleep(Duration::from_millis(5));
        }
    }
    let total: u64 = sent.iter().sum();
    d.set("duration_s", hold.as_secs_f64());
    d.set("bytes_sent", total);
    d.set(
        "whole_messages_sent",
        sent.iter().map(|s| s / msg.len() as u64).sum::<u64>(),
    );
    d.set("closed_by_server", closed.iter().filter(|&&c| c).count());
    // What the server had sent back and the kernel holds for us; the rest is in its queue or lost.
    let mut unread = 0u64;
    for s in &conns {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) } == 0 {
            unread += n.max(0) as u64;
        }
    }
    d.set("echo_bytes_waiting_in_our_socket", unread);
    let fresh = probes.finish();
    conns.clear();
    Ok((d, fresh))
}

/// A `--size` message, a close frame, then FIN; reads whatever comes back. `--rounds` times.
fn fin_after_close(env: &Env, o: &Opts) -> Outcome {
    let rounds = o.rounds.unwrap_or(3);
    let size = o.size.unwrap_or(4 << 20) as usize;
    let rcvbuf = o.rcvbuf.unwrap_or(4096);
    let mut d = Obj::default();
    d.set("message_size", size);
    d.set("peer_rcvbuf", rcvbuf);
    let probes = Prober::start(env);
    let mut list = Vec::new();
    let mut intact = 0;
    for round in 0..rounds {
        let mut r = Obj::default();
        r.set("round", round + 1);
        // A small receive window (a slow link) makes the server queue the echo's tail.
        let mut s = open_one(env, rcvbuf)?;
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::with_capacity(size + 32);
        masked_frame(&mut out, 2, &payload);
        masked_frame(&mut out, 8, &1000u16.to_be_bytes());
        if let Err(e) = s.write_all(&out) {
            r.set("write_error", e.to_string());
        }
        let _ = s.shutdown(Shutdown::Write);
        let (got, end) = read_to_end_bounded(
            &mut s,
            Duration::from_secs(15),
            Duration::from_secs(5),
            size * 2 + 4096,
            o.read_chunk.unwrap_or(256 << 10),
        );
        // The echo's frame and the close reply with its code.
        let expected = server_header_len(size as u64) + size + 4;
        let a = analyze(&got);
        let complete_echo = a
            .frames
            .first()
            .is_some_and(|f| f.opcode == 2 && f.fin && f.len == size && got[f.start..f.start + f.len] == payload[..]);
        let close = a.close_code();
        r.set("bytes_expected", expected);
        r.set("bytes_received", got.len());
        r.set("bytes_missing", expected.saturating_sub(got.len()));
        r.set("echo_complete_and_intact", complete_echo);
        r.set("close_code", close.map(u64::from));
        r.set("cut_frame", a.cut_obj());
        r.set("ended_by", end);
        if complete_echo && close.is_some() {
            intact += 1;
        }
        list.push(Val::Obj(r));
    }
    d.set("rounds", rounds);
    d.set("rounds_with_echo_and_close", intact);
    d.set("per_round", Val::List(list));
    Ok((d, probes.finish()))
}

/// A peer with a tiny receive buffer reads nothing while a sender broadcasts `--messages` of
/// `--size`; after `--duration` more it reads everything, and the bytes it got are checked.
fn slow_consumer(env: &Env, o: &Opts) -> Outcome {
    let messages = o.messages.unwrap_or(200);
    let size = (o.size.unwrap_or(64 << 10) as usize).max(8);
    let interval = o.interval.unwrap_or(Duration::from_millis(10));
    let linger = o.duration.unwrap_or(Duration::from_secs(5));
    let rcvbuf = o.rcvbuf.unwrap_or(4096);
    let mut d = Obj::default();
    d.set("messages", messages);
    d.set("message_size", size);
    d.set("slow_peer_rcvbuf", rcvbuf);
    let mut slow = open_one(env, rcvbuf)?;
    let mut sender = open_one(env, 0)?;
    let probes = Prober::start(env);
    let mut scratch = vec![0u8; 256 << 10];
    let mut sender_err = None;
    let t0 = Instant::now();
    'send: for i in 0..messages {
        let mut out = Vec::with_capacity(size + 14);
        masked_frame(&mut out, 2, &numbered_payload(i as u64, size));
        let mut off = 0;
        let give_up = Instant::now() + Duration::from_secs(10);
        while off < out.len() {
            match sender.write(&out[off..]) {
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    thread::sleep(Duration::from_micros(200))
                }
                Err(e) => {
                    sender_err = Some(e.to_string());
                    break 'send;
                }
            }
            drain(&mut sender, &mut scratch);
            if Instant::now() > give_up {
                sender_err = Some("sender blocked for 10 s".into());
                break 'send;
            }
        }
        let next = Instant::now() + interval;
        while Instant::now() < next {
            drain(&mut sender, &mut scratch);
            thread::sleep(Duration::from_millis(1));
        }
    }
    d.set("send_s", t0.elapsed().as_secs_f64());
    if let Some(e) = sender_err {
        d.set("sender_error", e);
    }
    let hold_end = Instant::now() + linger;
    while Instant::now() < hold_end {
        drain(&mut sender, &mut scratch);
        thread::sleep(Duration::from_millis(5));
    }
    d.set("waited_before_reading_s", linger.as_secs_f64());
    let fresh = probes.finish();
    slow.set_nonblocking(false).map_err(|e| e.to_string())?;
    let (got, end) = read_to_end_bounded(
        &mut slow,
        Duration::from_secs(30),
        Duration::from_secs(5),
        1 << 30,
        o.read_chunk.unwrap_or(256 << 10),
    );
    let a = analyze(&got);
    let mut data = 0;
    let mut bad = 0;
    let mut indices = Vec::new();
    for f in a.frames.iter().filter(|f| f.opcode == 2) {
        data += 1;
        let p = &got[f.start..f.start + f.len];
        match check_numbered(p, size) {
            Some(i) => indices.push(i),
            None => bad += 1,
        }
    }
    d.set("bytes_received", got.len());
    d.set("complete_messages", data);
    d.set("messages_with_wrong_content", bad);
    d.set("first_message", indices.first().copied());
    d.set("last_message", indices.last().copied());
    d.set(
        "out_of_order_or_skipped",
        indices.windows(2).filter(|w| w[1] != w[0] + 1).count(),
    );
    d.set("text_frames", a.frames.iter().filter(|f| f.opcode == 1).count());
    d.set("close_code", a.close_code().map(u64::from));
    d.set("close_reason", a.close_reason(&got));
    d.set("cut_frame", a.cut_obj());
    d.set("garbage_at", a.garbage_at);
    d.set("ended_by", end);
    drop(sender);
    Ok((d, fresh))
}

/// `--peers` connections read everything; `--rate` new connections per second join and leave
/// for `--duration`.
fn announce_churn(env: &Env, o: &Opts) -> Outcome {
    let peers = o.peers.unwrap_or(2000);
    let rate = o.rate.unwrap_or(51.0).max(0.1);
    let hold = o.duration.unwrap_or(Duration::from_secs(20));
    check_fds(peers + (rate * 12.0) as usize + 16)?;
    let mut d = Obj::default();
    d.set("reading_peers", peers);
    d.set("rate_per_s", rate);
    d.set("duration_s", hold.as_secs_f64());
    // Open in batches, reading the join announcements in between so nobody is a slow consumer.
    let mut conns: Vec<TcpStream> = Vec::with_capacity(peers);
    let mut failures = BTreeMap::new();
    let mut scratch = vec![0u8; 256 << 10];
    let t0 = Instant::now();
    while conns.len() < peers && t0.elapsed() < PHASE_LIMIT {
        let batch = (peers - conns.len()).min(100);
        let opened = open_many(env, batch, true, 0)?;
        for (k, v) in opened.failures {
            *failures.entry(k).or_insert(0) += v;
        }
        if opened.streams.is_empty() {
            break;
        }
        conns.extend(opened.streams);
        for s in &mut conns {
            drain(s, &mut scratch);
        }
    }
    d.set("peers_opened", conns.len());
    d.set("open_s", t0.elapsed().as_secs_f64());
    d.set("open_failures", failures_obj(&failures));

    let stop = Arc::new(AtomicBool::new(false));
    let read_bytes = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, read_bytes, closed) = (stop.clone(), read_bytes.clone(), closed.clone());
        thread::spawn(move || read_all_loop(conns, &stop, &read_bytes, &closed))
    };
    let probes = Prober::start(env);
    // Churn: start connections on schedule whether or not earlier ones got through.
    let mut dialer = Dialer::new(env, true, 0, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let cpu0 = env.pid.and_then(cpu_secs);
    let own0 = cpu_secs(std::process::id());
    let end = start + hold;
    let mut started = 0u64;
    let mut joined = Vec::new();
    while Instant::now() < end {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while started < due && dialer.pending.len() < 1000 {
            dialer.start();
            started += 1;
        }
        dialer.turn(Duration::from_millis(5));
        for (mut s, took) in dialer.done.drain(..) {
            joined.push(took.as_secs_f64() * 1000.0);
            // Leave politely: a close frame, then the socket goes.
            let mut c = Vec::new();
            masked_frame(&mut c, 8, &1000u16.to_be_bytes());
            let _ = s.write(&c);
        }
    }
    // The server's CPU over the churn alone (opening the peers costs a lot too).
    if let (Some(a), Some(b)) = (cpu0, env.pid.and_then(cpu_secs)) {
        d.set(
            "server_cpu_pct_during_churn",
            100.0 * (b - a) / start.elapsed().as_secs_f64(),
        );
    }
    // This tool shares the machine's cores with the server: its own share tells how fair that was.
    if let (Some(a), Some(b)) = (own0, cpu_secs(std::process::id())) {
        d.set(
            "hostile_cpu_pct_during_churn",
            100.0 * (b - a) / start.elapsed().as_secs_f64(),
        );
    }
    let in_flight = dialer.pending.len();
    drop(dialer);
    let fresh = probes.finish();
    stop.store(true, Ordering::Relaxed);
    let conns = reader.join().unwrap_or_default();
    d.set("churn_started", started);
    d.set("churn_joined", joined.len());
    d.set("churn_still_waiting_at_end", in_flight);
    d.set("churn_handshake_ms", ms_summary(&mut joined));
    d.set("peers_bytes_read", read_bytes.load(Ordering::Relaxed));
    d.set("peers_closed_by_server", closed.load(Ordering::Relaxed));
    drop(conns);
    Ok((d, fresh))
}

/// Reads and discards on every connection until `stop`; gives the connections back.
fn read_all_loop(
    mut conns: Vec<TcpStream>,
    stop: &AtomicBool,
    bytes: &AtomicU64,
    closed: &AtomicU64,
) -> Vec<TcpStream> {
    let Ok(mut poll) = Poll::new() else { return conns };
    let mut events = Events::with_capacity(1024);
    for (i, s) in conns.iter().enumerate() {
        let _ = poll
            .registry()
            .register(&mut SourceFd(&s.as_raw_fd()), Token(i), Interest::READABLE);
    }
    let mut scratch = vec![0u8; 256 << 10];
    let mut gone = vec![false; conns.len()];
    // Readiness is edge-triggered: read everything that arrived before registration first.
    let mut ready: Vec<usize> = (0..conns.len()).collect();
    while !stop.load(Ordering::Relaxed) {
        for &i in &ready {
            if gone[i] {
                continue;
            }
            let (n, eof) = drain(&mut conns[i], &mut scratch);
            bytes.fetch_add(n, Ordering::Relaxed);
            if eof {
                gone[i] = true;
                closed.fetch_add(1, Ordering::Relaxed);
            }
        }
        ready.clear();
        if poll.poll(&mut events, Some(Duration::from_millis(50))).is_err() {
            continue;
        }
        ready.extend(events.iter().map(|e| e.token().0));
    }
    conns
}

/// `--connections` from one address hold the server's slots without finishing their request
/// (or, with `--upgrade`, finish it and sit idle), reconnecting whenever they are dropped.
fn slowloris(env: &Env, o: &Opts) -> Outcome {
    let n = o.connections.unwrap_or(1000);
    let hold = o.duration.unwrap_or(Duration::from_secs(30));
    let trickle = o.trickle.unwrap_or(Duration::from_secs(1));
    check_fds(n + IN_FLIGHT)?;
    let mut d = Obj::default();
    d.set("connections", n);
    d.set("source_addresses", env.sources.len());
    d.set(
        "mode",
        if o.upgrade {
            "upgraded, idle"
        } else {
            "request one byte at a time"
        },
    );
    d.set("duration_s", hold.as_secs_f64());
    let request = upgrade_request(&env.target);
    let mut dialer = Dialer::new(env, o.upgrade, 0, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    // Each held connection and how much of its request it has sent.
    let mut conns: Vec<(TcpStream, usize)> = Vec::new();
    let mut scratch = vec![0u8; 16 << 10];
    let (mut started, mut dropped, mut answered) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    // Fill the slots before the fresh client starts: that is the state the attack keeps up.
    let mut probes = None;
    let end = t0 + hold + PHASE_LIMIT.min(Duration::from_secs(30));
    let mut hold_end = None;
    let mut next_trickle = t0 + trickle;
    let mut next_check = t0;
    while Instant::now() < hold_end.unwrap_or(end) {
        while conns.len() + dialer.pending.len() < n && dialer.pending.len() < IN_FLIGHT {
            dialer.start();
            started += 1;
        }
        dialer.turn(Duration::from_millis(10));
        conns.extend(dialer.done.drain(..).map(|(s, _)| (s, 0)));
        if probes.is_none() && (conns.len() >= n || t0.elapsed() > Duration::from_secs(30)) {
            d.set("fill_s", t0.elapsed().as_secs_f64());
            probes = Some(Prober::start(env));
            hold_end = Some(Instant::now() + hold);
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + Duration::from_millis(50);
            conns.retain_mut(|(s, _)| {
                let (k, eof) = drain(s, &mut scratch);
                answered += u64::from(k > 0);
                // Dropped, or answered (400, 408, 503...): reconnect.
                let gone = eof || (k > 0 && !o.upgrade);
                dropped += u64::from(gone);
                !gone
            });
        }
        if !o.upgrade && !trickle.is_zero() && now >= next_trickle {
            next_trickle = now + trickle;
            for (s, pos) in conns.iter_mut() {
                // Never the last byte: the request must stay unfinished.
                if *pos + 1 < request.len() && s.write(&request[*pos..*pos + 1]).is_ok() {
                    *pos += 1;
                }
            }
        }
    }
    let fresh = probes.map(Prober::finish).unwrap_or_default();
    d.set("attack_connects_started", started);
    d.set("attack_connections_held_at_end", conns.len());
    d.set("attack_connections_dropped_or_answered", dropped);
    d.set("attack_connections_that_got_bytes", answered);
    d.set("attack_connect_failures", failures_obj(&dialer.failures));
    drop(conns);
    Ok((d, fresh))
}

/// `--connections` upgraded idle connections, opened past the server's descriptor limit.
fn fd_limit(env: &Env, o: &Opts) -> Outcome {
    let n = o.connections.unwrap_or(4200);
    let hold = o.duration.unwrap_or(Duration::from_secs(20));
    check_fds(n)?;
    let mut d = Obj::default();
    d.set("connections", n);
    let opened = open_many(env, n, true, 0)?;
    d.set("opened", opened.streams.len());
    d.set("open_s", opened.secs);
    d.set("open_failures", opened.failures_obj());
    let probes = Prober::start(env);
    thread::sleep(hold);
    let fresh = probes.finish();
    drop(opened.streams);
    Ok((d, fresh))
}

/// `--connections` `wss://` connections (1,000) each send all but the last 5 bytes of a
/// `--size` (16,600-byte) application-data record and stall for `--duration` (10 s), while
/// `--peers` clients (3) each send one `--send` (256 KiB) message and wait for the echo or a
/// close. The attackers' close codes and what each client saw are reported. `--size 0` holds
/// idle connections instead. (The fresh client of the other attacks speaks plain TCP: none
/// runs here.)
#[cfg(feature = "tls")]
fn tls_partial_records(env: &Env, o: &Opts) -> Outcome {
    let n = o.connections.unwrap_or(1000);
    let record = o.size.unwrap_or(16_600) as usize;
    let hold = o.duration.unwrap_or(Duration::from_secs(10));
    let clients = o.peers.unwrap_or(3);
    let message = o.send.unwrap_or(256 << 10) as usize;
    check_fds(n + clients)?;
    if record > 0 && !(6..=16_640).contains(&record) {
        return Err("--size: a record of 6 to 16,640 bytes (or 0)".into());
    }
    let cfg = tls_client_config(o.ca.as_ref().ok_or("tls-partial-records needs --ca FILE")?)?;
    let mut d = Obj::default();
    d.set("connections", n);
    d.set("record_bytes", record);
    let t0 = Instant::now();
    // Four threads of blocking handshakes.
    let opened: Vec<Result<TlsPeer, String>> = thread::scope(|sc| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let cfg = &cfg;
                sc.spawn(move || {
                    (w..n)
                        .step_by(4)
                        .map(|i| tls_upgraded(env, cfg, env.sources.get(i % env.sources.len().max(1)).copied()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let mut failures = BTreeMap::new();
    let mut peers = Vec::new();
    for r in opened {
        match r {
            Ok(p) => peers.push(p),
            Err(e) => *failures.entry(e).or_insert(0) += 1,
        }
    }
    d.set("opened", peers.len());
    d.set("open_s", t0.elapsed().as_secs_f64());
    d.set("open_failures", failures_obj(&failures));
    if record > 0 {
        let body = record - 5;
        let mut part = vec![23, 3, 3, (body >> 8) as u8, body as u8];
        part.resize(record - 5, 0x42);
        for p in &mut peers {
            let _ = p.sock.write_all(&part);
        }
    }
    for p in &peers {
        let _ = p.sock.set_nonblocking(true);
    }
    let t1 = Instant::now();
    let senders: Vec<_> = (0..clients)
        .map(|_| {
            let (env, cfg) = (env.clone(), Arc::clone(&cfg));
            thread::spawn(move || {
                let t = Instant::now();
                let r = tls_send_and_wait(&env, &cfg, message);
                format!("{} after {:.3} s", r.unwrap_or_else(|e| e), t.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut got = vec![Vec::new(); peers.len()];
    let mut ended = vec![false; peers.len()];
    while t1.elapsed() < hold {
        for (i, p) in peers.iter_mut().enumerate() {
            if !ended[i] {
                ended[i] = tls_read_available(p, &mut got[i]);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for g in &got {
        let code = match parse_header(g) {
            Some((_, 8, len, hl)) if len >= 2 && g.len() >= hl + 2 => {
                u16::from_be_bytes([g[hl], g[hl + 1]]).to_string()
            }
            Some((_, op, _, _)) => format!("opcode {op}"),
            None => "nothing".into(),
        };
        *codes.entry(code).or_default() += 1;
    }
    let mut c = Obj::default();
    for (k, v) in codes {
        c.set(&k, v);
    }
    d.set("close_codes", c);
    d.set("ended_by_server", ended.iter().filter(|&&e| e).count());
    let mut seen = Obj::default();
    for (i, s) in senders.into_iter().enumerate() {
        seen.set(&format!("client_{i}"), s.join().unwrap_or_else(|_| "panicked".into()));
    }
    d.set("clients", seen);
    drop(peers);
    Ok((d, ProbeStats::default()))
}

#[cfg(feature = "tls")]
type TlsPeer = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

#[cfg(feature = "tls")]
fn tls_client_config(ca: &PathBuf) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A blocking `wss://` connection past its upgrade (10 s at most per read).
#[cfg(feature = "tls")]
fn tls_upgraded(env: &Env, cfg: &Arc<rustls::ClientConfig>, src: Option<IpAddr>) -> Result<TlsPeer, String> {
    let sock = Socket::new(Domain::for_address(env.target.addr), Type::STREAM, None).map_err(|e| e.to_string())?;
    if let Some(src) = src {
        sock.bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| classify(&e, "bind"))?;
    }
    sock.connect_timeout(&env.target.addr.into(), Duration::from_secs(10))
        .map_err(|e| classify(&e, "connect"))?;
    let tcp: TcpStream = sock.into();
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let name = env
        .target
        .host
        .rsplit_once(':')
        .map_or(env.target.host.as_str(), |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::clone(cfg), name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(&upgrade_request(&env.target))
        .map_err(|e| classify(&e, "handshake"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let k = s.read(&mut buf).map_err(|e| classify(&e, "response"))?;
        if k == 0 {
            return Err("closed before a response".into());
        }
        head.extend_from_slice(&buf[..k]);
        if let Some((code, _)) = response_status(&head) {
            return if code == 101 {
                Ok(s)
            } else {
                Err(format!("http {code}"))
            };
        }
    }
}

/// Reads what arrived on a non-blocking TLS peer (the first 64 bytes are kept); true once the
/// stream ended.
#[cfg(feature = "tls")]
fn tls_read_available(p: &mut TlsPeer, got: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match p.read(&mut buf) {
            Ok(0) => return true,
            Ok(k) => got.extend_from_slice(&buf[..k.min(64usize.saturating_sub(got.len()))]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// One client: a `size` message, then its echo or a close code back.
#[cfg(feature = "tls")]
fn tls_send_and_wait(env: &Env, cfg: &Arc<rustls::ClientConfig>, size: usize) -> Result<String, String> {
    let mut s = tls_upgraded(env, cfg, None)?;
    let payload = vec![0x5a; size];
    let mut frame = Vec::new();
    masked_frame(&mut frame, 2, &payload);
    s.write_all(&frame).map_err(|e| classify(&e, "write"))?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((_, op, len, hl)) = parse_header(&got) {
            if got.len() >= hl + len as usize {
                let p = &got[hl..hl + len as usize];
                return match op {
                    2 if p == &payload[..] => Ok("echo".into()),
                    8 if p.len() >= 2 => Ok(format!("close {}", u16::from_be_bytes([p[0], p[1]]))),
                    op => Err(format!("opcode {op}")),
                };
            }
        }
        if Instant::now() >= deadline {
            return Err("no answer in 30 s".into());
        }
        match s.read(&mut buf) {
            Ok(0) => return Err("ended without an answer".into()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(classify(&e, "read")),
        }
    }
}

#[cfg(not(feature = "tls"))]
fn tls_partial_records(_: &Env, _: &Opts) -> Outcome {
    Err("tls-partial-records needs the tls feature".into())
}

// ---------------------------------------------------------------------------------------------
// Opening connections

fn upgrade_request(t: &Target) -> Vec<u8> {
    let mut key = [0u8; 16];
    let mut rng = rng();
    rng.fill(&mut key);
    let key = wsloop::proto::handshake::client_key(key);
    let offer = t
        .offer
        .map_or(String::new(), |o| format!("Sec-WebSocket-Extensions: {o}\r\n"));
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
        t.path, t.host
    )
    .into_bytes()
}

/// The status code of a complete response head, and the head's length.
fn response_status(buf: &[u8]) -> Option<(u16, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let line = buf[..end].split(|&b| b == b'\n').next()?;
    let code = std::str::from_utf8(line)
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((code, end))
}

struct Pending {
    s: TcpStream,
    req: Vec<u8>,
    sent: usize,
    head: Vec<u8>,
    connected: bool,
    t0: Instant,
}

/// Non-blocking connects (and upgrades) from the attack's source addresses, many at a time.
struct Dialer<'a> {
    env: &'a Env,
    next_src: usize,
    upgrade: bool,
    rcvbuf: usize,
    timeout: Duration,
    poll: Poll,
    events: Events,
    pending: Slab<Pending>,
    /// Finished connections (non-blocking) and how long each took.
    done: Vec<(TcpStream, Duration)>,
    failures: BTreeMap<String, usize>,
}

impl<'a> Dialer<'a> {
    fn new(env: &'a Env, upgrade: bool, rcvbuf: usize, timeout: Duration) -> io::Result<Self> {
        Ok(Dialer {
            env,
            next_src: 0,
            upgrade,
            rcvbuf,
            timeout,
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            pending: Slab::new(),
            done: Vec::new(),
            failures: BTreeMap::new(),
        })
    }

    fn socket(&mut self) -> io::Result<TcpStream> {
        let target = self.env.target.addr;
        let sock = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        if self.rcvbuf > 0 {
            sock.set_recv_buffer_size(self.rcvbuf)?;
        }
        if !self.env.sources.is_empty() {
            let src = self.env.sources[self.next_src % self.env.sources.len()];
            self.next_src += 1;
            sock.bind(&SocketAddr::new(src, 0).into())?;
        }
        match sock.connect(&target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(sock.into())
    }

    fn start(&mut self) {
        let s = match self.socket() {
            Ok(s) => s,
            Err(e) => return self.count(classify(&e, "connect")),
        };
        let key = self.pending.vacant_key();
        let fd = s.as_raw_fd();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            return self.count(classify(&e, "register"));
        }
        self.pending.insert(Pending {
            s,
            req: upgrade_request(&self.env.target),
            sent: 0,
            head: Vec::new(),
            connected: false,
            t0: Instant::now(),
        });
    }

    fn count(&mut self, what: String) {
        *self.failures.entry(what).or_insert(0) += 1;
    }

    fn turn(&mut self, wait: Duration) {
        if self.poll.poll(&mut self.events, Some(wait)).is_ok() {
            let keys: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
            for key in keys {
                if self.pending.contains(key) {
                    let r = self.advance(key);
                    self.settle(key, r);
                }
            }
        }
        let expired: Vec<(usize, bool)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.t0.elapsed() > self.timeout)
            .map(|(k, p)| (k, p.connected))
            .collect();
        for (key, connected) in expired {
            let what = if connected {
                "no response (timeout)"
            } else {
                "connect timeout"
            };
            self.settle(key, Some(Err(what.to_string())));
        }
    }

    fn settle(&mut self, key: usize, r: Option<Result<(), String>>) {
        let Some(r) = r else { return };
        let p = self.pending.remove(key);
        let _ = self.poll.registry().deregister(&mut SourceFd(&p.s.as_raw_fd()));
        match r {
            Ok(()) => self.done.push((p.s, p.t0.elapsed())),
            Err(what) => self.count(what),
        }
    }

    /// Moves one connection on; `Some` once it is done either way.
    fn advance(&mut self, key: usize) -> Option<Result<(), String>> {
        let upgrade = self.upgrade;
        let p = &mut self.pending[key];
        if !p.connected {
            match p.s.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return Some(Err(classify(&e, "connect"))),
            }
            match p.s.peer_addr() {
                Ok(_) => p.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
                Err(e) => return Some(Err(classify(&e, "connect"))),
            }
            if !upgrade {
                return Some(Ok(()));
            }
        }
        while p.sent < p.req.len() {
            match p.s.write(&p.req[p.sent..]) {
                Ok(k) => p.sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(classify(&e, "request"))),
            }
        }
        let mut tmp = [0u8; 4096];
        loop {
            match p.s.read(&mut tmp) {
                Ok(0) => return Some(Err("closed before a response".into())),
                Ok(k) => {
                    p.head.extend_from_slice(&tmp[..k]);
                    if let Some((code, _)) = response_status(&p.head) {
                        return Some(if code == 101 {
                            Ok(())
                        } else {
                            Err(format!("http {code}"))
                        });
                    }
                    if p.head.len() > 16 << 10 {
                        return Some(Err("response head too large".into()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(classify(&e, "response"))),
            }
        }
    }
}

struct Opened {
    streams: Vec<TcpStream>,
    failures: BTreeMap<String, usize>,
    secs: f64,
}

impl Opened {
    fn failures_obj(&self) -> Obj {
        failures_obj(&self.failures)
    }
}

fn failures_obj(f: &BTreeMap<String, usize>) -> Obj {
    let mut o = Obj::default();
    for (k, v) in f {
        o.set(k, *v);
    }
    o
}

/// Opens `n` connections (upgraded or plain TCP), `IN_FLIGHT` at a time; non-blocking streams.
fn open_many(env: &Env, n: usize, upgrade: bool, rcvbuf: usize) -> Result<Opened, String> {
    let mut dialer = Dialer::new(env, upgrade, rcvbuf, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut started = 0;
    while (started < n || !dialer.pending.is_empty()) && t0.elapsed() < PHASE_LIMIT {
        while started < n && dialer.pending.len() < IN_FLIGHT {
            dialer.start();
            started += 1;
        }
        dialer.turn(Duration::from_millis(20));
    }
    Ok(Opened {
        streams: dialer.done.drain(..).map(|(s, _)| s).collect(),
        failures: std::mem::take(&mut dialer.failures),
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn open_one(env: &Env, rcvbuf: usize) -> Result<TcpStream, String> {
    let mut o = open_many(env, 1, true, rcvbuf)?;
    o.streams
        .pop()
        .ok_or_else(|| format!("could not connect: {:?}", o.failures))
}

fn classify(e: &io::Error, phase: &str) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => format!("{phase} refused"),
        ConnectionReset => format!("{phase} reset"),
        TimedOut | WouldBlock => format!("{phase} timeout"),
        UnexpectedEof => format!("{phase} closed"),
        BrokenPipe => format!("{phase} broken pipe"),
        k => format!("{phase} {k:?}"),
    }
}

/// Reads whatever is there without blocking. Returns the bytes read and whether the stream ended.
fn drain(s: &mut TcpStream, buf: &mut [u8]) -> (u64, bool) {
    let mut total = 0;
    loop {
        match s.read(buf) {
            Ok(0) => return (total, true),
            Ok(k) => total += k as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (total, false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (total, true),
        }
    }
}

/// Reads a blocking stream until it ends, fails, is silent for `idle`, or `limit` passes.
fn read_to_end_bounded(
    s: &mut TcpStream,
    limit: Duration,
    idle: Duration,
    max: usize,
    chunk: usize,
) -> (Vec<u8>, String) {
    let _ = s.set_read_timeout(Some(idle));
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        if Instant::now() >= end {
            return (got, format!("gave up after {} s", limit.as_secs()));
        }
        if got.len() >= max {
            return (got, "read limit".into());
        }
        match s.read(&mut buf) {
            Ok(0) => return (got, "FIN".into()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                return (got, format!("silence for {} s (no FIN)", idle.as_secs()))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, "RST".into()),
            Err(e) => return (got, format!("error: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

fn rng() -> fastrand::Rng {
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    fastrand::Rng::with_seed(u64::from_ne_bytes(seed))
}

/// `--connections` connections (100) agree on permessage-deflate; each sends one compressed
/// binary message that inflates to `--size` (1 GiB) of zeros, then reads until the server
/// closes. The close codes are counted: 1009 means the server stopped inflating at its limit.
#[cfg(feature = "deflate")]
fn deflate_bomb(env: &Env, o: &Opts) -> Outcome {
    use flate2::{Compress, Compression, FlushCompress};
    let n = o.connections.unwrap_or(100);
    let size = o.size.unwrap_or(1 << 30);
    check_fds(n)?;
    let mut d = Obj::default();
    d.set("connections", n);
    d.set("inflated_size", size);
    // Raw DEFLATE of `size` zeros at level 9, ending in a sync flush without its tail (RFC 7692).
    let mut z = Compress::new(Compression::best(), false);
    let zeros = vec![0u8; 1 << 20];
    let mut bomb = Vec::with_capacity((size / 1000) as usize + 1024);
    let mut left = size;
    while left > 0 {
        let chunk = &zeros[..left.min(zeros.len() as u64) as usize];
        let flush = if left <= chunk.len() as u64 {
            FlushCompress::Sync
        } else {
            FlushCompress::None
        };
        let mut done = 0;
        loop {
            bomb.reserve(64 << 10);
            let before = z.total_in();
            z.compress_vec(&chunk[done..], &mut bomb, flush)
                .map_err(|e| e.to_string())?;
            done += (z.total_in() - before) as usize;
            if done == chunk.len() && bomb.len() < bomb.capacity() {
                break;
            }
        }
        left -= chunk.len() as u64;
    }
    bomb.truncate(bomb.len().saturating_sub(4));
    d.set("compressed_size", bomb.len());
    let mut one = Vec::with_capacity(bomb.len() + 14);
    masked_frame(&mut one, 2, &bomb);
    one[0] |= 0x40; // RSV1: compressed
                    // `--messages N`: the same bomb N times on each connection.
    let repeat = o.messages.unwrap_or(1).max(1);
    d.set("messages_per_connection", repeat);
    let frame = one.repeat(repeat);
    let mut offering = env.clone();
    offering.target.offer = Some("permessage-deflate");
    let opened = open_many(&offering, n, true, 0)?;
    d.set("opened", opened.streams.len());
    d.set("open_failures", opened.failures_obj());
    let mut conns = opened.streams;
    let probes = Prober::start(env);
    let t0 = Instant::now();
    let deadline = t0 + o.duration.unwrap_or(PHASE_LIMIT).min(PHASE_LIMIT);
    let mut off = vec![0usize; conns.len()];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); conns.len()];
    let mut ended = vec![false; conns.len()];
    let mut scratch = vec![0u8; 64 << 10];
    while ended.iter().any(|e| !e) && Instant::now() < deadline {
        let mut progress = false;
        for (i, s) in conns.iter_mut().enumerate() {
            if ended[i] {
                continue;
            }
            if off[i] < frame.len() {
                match s.write(&frame[off[i]..]) {
                    Ok(k) => {
                        off[i] += k;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => off[i] = frame.len(), // reset: the server has closed
                }
            }
            loop {
                match s.read(&mut scratch) {
                    Ok(0) => {
                        ended[i] = true;
                        break;
                    }
                    Ok(k) => {
                        // The first bytes are all that matter: the close frame and its code.
                        if got[i].len() < 16 {
                            got[i].extend_from_slice(&scratch[..k.min(16)]);
                        }
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        ended[i] = true;
                        break;
                    }
                }
            }
        }
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
    d.set("attack_s", t0.elapsed().as_secs_f64());
    d.set("sent_whole", off.iter().filter(|&&x| x >= frame.len()).count());
    d.set("ended_by_server", ended.iter().filter(|&&e| e).count());
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for g in &got {
        let code = match parse_header(g) {
            Some((_, 8, len, hl)) if len >= 2 && g.len() >= hl + 2 => {
                u16::from_be_bytes([g[hl], g[hl + 1]]).to_string()
            }
            Some((_, op, _, _)) => format!("opcode {op}"),
            None => "nothing".into(),
        };
        *codes.entry(code).or_default() += 1;
    }
    let mut c = Obj::default();
    for (k, v) in codes {
        c.set(&k, v);
    }
    d.set("close_codes", c);
    let fresh = probes.finish();
    conns.clear();
    Ok((d, fresh))
}

#[cfg(not(feature = "deflate"))]
fn deflate_bomb(_: &Env, _: &Opts) -> Outcome {
    Err("deflate-bomb needs the deflate feature".into())
}

fn mask_key() -> [u8; 4] {
    thread_local! {
        static RNG: std::cell::RefCell<fastrand::Rng> = std::cell::RefCell::new(rng());
    }
    RNG.with(|r| r.borrow_mut().u32(..).to_ne_bytes())
}

/// A client frame header: always masked, as RFC 6455 requires of clients.
fn frame_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: u64, mask: [u8; 4]) {
    out.push((u8::from(fin) << 7) | opcode);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&mask);
}

/// The length of a server's (unmasked) header for a payload of `len`.
fn server_header_len(len: u64) -> usize {
    match len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

fn masked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let mask = mask_key();
    frame_header(out, true, opcode, payload.len() as u64, mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The header at the front of `buf`: (fin, opcode, payload length, header length).
fn parse_header(buf: &[u8]) -> Option<(bool, u8, u64, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut hl) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        l => (u64::from(l), 2),
    };
    if masked {
        hl += 4;
    }
    if buf.len() < hl {
        return None;
    }
    Some((b0 & 0x80 != 0, b0 & 0x0f, len, hl))
}

struct Frame {
    fin: bool,
    opcode: u8,
    start: usize,
    len: usize,
}

#[derive(Default)]
struct Analysis {
    frames: Vec<Frame>,
    /// A frame the stream ended inside: (opcode, declared payload, payload bytes present).
    cut: Option<(u8, u64, usize)>,
    /// Where bytes stopped parsing as server frames (a spliced stream).
    garbage_at: Option<usize>,
    /// The first close frame's code (1005 when it has none).
    close: Option<u16>,
}

impl Analysis {
    fn close_code(&self) -> Option<u16> {
        self.close
    }
    fn close_reason(&self, buf: &[u8]) -> Option<String> {
        let f = self.frames.iter().find(|f| f.opcode == 8)?;
        buf.get(f.start + 2..f.start + f.len)
            .map(|r| String::from_utf8_lossy(r).into_owned())
    }
    fn cut_obj(&self) -> Val {
        match self.cut {
            None => Val::Null,
            Some((op, declared, got)) => {
                let mut o = Obj::default();
                o.set("opcode", u64::from(op));
                o.set("declared_payload", declared);
                o.set("payload_received", got);
                Val::Obj(o)
            }
        }
    }
}

/// Splits what a server sent into frames, noting a frame cut short at the end and bytes that
/// cannot be a server frame (a reserved opcode, a mask bit, or reserved bits).
fn analyze(buf: &[u8]) -> Analysis {
    let mut a = Analysis::default();
    let mut at = 0;
    while at < buf.len() {
        let Some((fin, opcode, len, hl)) = parse_header(&buf[at..]) else {
            a.cut = Some((buf[at] & 0x0f, 0, 0));
            break;
        };
        let valid_op = matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10);
        if !valid_op || buf[at + 1] & 0x80 != 0 || buf[at] & 0x70 != 0 {
            a.garbage_at = Some(at);
            break;
        }
        let have = buf.len() - at - hl;
        if (have as u64) < len {
            a.cut = Some((opcode, len, have));
            break;
        }
        let start = at + hl;
        if opcode == 8 && a.close.is_none() {
            a.close = Some(if len >= 2 {
                u16::from_be_bytes([buf[start], buf[start + 1]])
            } else {
                1005
            });
        }
        a.frames.push(Frame {
            fin,
            opcode,
            start,
            len: len as usize,
        });
        at = start + len as usize;
    }
    a
}

/// A payload whose content says which message it is: the index, then its low byte repeated.
fn numbered_payload(i: u64, size: usize) -> Vec<u8> {
    let mut p = vec![i as u8; size];
    p[..8].copy_from_slice(&i.to_be_bytes());
    p
}

fn check_numbered(p: &[u8], size: usize) -> Option<u64> {
    if p.len() != size {
        return None;
    }
    let i = u64::from_be_bytes(p[..8].try_into().ok()?);
    p[8..].iter().all(|&b| b == i as u8).then_some(i)
}

// ---------------------------------------------------------------------------------------------
// The fresh client

#[derive(Default)]
struct ProbeStats {
    attempts: usize,
    upgraded: usize,
    errors: BTreeMap<String, usize>,
    connect_ms: Vec<f64>,
    echo_ms: Vec<f64>,
    echoes_sent: usize,
}

impl ProbeStats {
    fn summary(mut self, cfg: &ProbeCfg) -> Obj {
        let mut o = Obj::default();
        o.set("connects", self.attempts);
        o.set("upgraded", self.upgraded);
        o.set("errors", failures_obj(&self.errors));
        o.set("connect_ms", ms_summary(&mut self.connect_ms));
        o.set("echoes_per_connect", cfg.echoes);
        o.set("echoes_sent", self.echoes_sent);
        o.set("echoes_back", self.echo_ms.len());
        o.set("echo_ms", ms_summary(&mut self.echo_ms));
        o
    }
}

fn ms_summary(v: &mut [f64]) -> Obj {
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        let i = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Some((v[i] * 1000.0).round() / 1000.0)
    };
    let mut o = Obj::default();
    o.set("n", v.len());
    o.set("p50", pct(50.0));
    o.set("p99", pct(99.0));
    o.set("max", pct(100.0));
    o
}

/// Runs fresh clients one after another on a thread until stopped or `max` is reached.
struct Prober {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<ProbeStats>,
}

impl Prober {
    fn start(env: &Env) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = env.probe.clone();
        let addr = env.target.addr;
        let request = Target {
            addr,
            host: env.target.host.clone(),
            path: env.target.path.clone(),
            offer: None,
        };
        let s2 = stop.clone();
        let handle = thread::spawn(move || {
            let mut st = ProbeStats::default();
            for id in 0..cfg.max {
                if s2.load(Ordering::Relaxed) {
                    break;
                }
                probe_once(&request, &cfg, id, &mut st);
                let next = Instant::now() + cfg.interval;
                while Instant::now() < next && !s2.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(10));
                }
            }
            st
        });
        Prober { stop, handle }
    }

    fn finish(self) -> ProbeStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// One legitimate client: connect, upgrade, `echoes` round trips of a short text, close.
/// In broadcast mode its own message comes back among everyone else's: it waits for that one.
fn probe_once(t: &Target, cfg: &ProbeCfg, id: usize, st: &mut ProbeStats) {
    st.attempts += 1;
    let fail = |st: &mut ProbeStats, what: String| *st.errors.entry(what).or_insert(0) += 1;
    let t0 = Instant::now();
    let mut s = match TcpStream::connect_timeout(&t.addr, cfg.timeout) {
        Ok(s) => s,
        Err(e) => return fail(st, classify(&e, "connect")),
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(cfg.timeout));
    if let Err(e) = s.write_all(&upgrade_request(t)) {
        return fail(st, classify(&e, "request"));
    }
    let mut buf = Vec::new();
    let deadline = t0 + cfg.timeout;
    let used = loop {
        match read_some(&mut s, &mut buf, deadline) {
            Ok(()) => {}
            Err(what) => return fail(st, format!("response {what}")),
        }
        if let Some((code, used)) = response_status(&buf) {
            if code != 101 {
                return fail(st, format!("http {code}"));
            }
            break used;
        }
    };
    buf.drain(..used);
    st.upgraded += 1;
    st.connect_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    for j in 0..cfg.echoes {
        let text = format!("fresh client {id} echo {j}");
        let mut out = Vec::new();
        masked_frame(&mut out, 1, text.as_bytes());
        let sent = Instant::now();
        st.echoes_sent += 1;
        if let Err(e) = s.write_all(&out) {
            return fail(st, classify(&e, "echo write"));
        }
        let deadline = sent + cfg.timeout;
        loop {
            // Consume whole frames at the front; stop at our own text.
            let mut found = false;
            while let Some((_, op, len, hl)) = parse_header(&buf) {
                let total = hl + len as usize;
                if buf.len() < total {
                    break;
                }
                if op == 8 {
                    let code = if len >= 2 {
                        u16::from_be_bytes([buf[hl], buf[hl + 1]])
                    } else {
                        1005
                    };
                    return fail(st, format!("closed by server ({code})"));
                }
                found |= op == 1 && buf[hl..total] == *text.as_bytes();
                buf.drain(..total);
                if found {
                    break;
                }
            }
            if found {
                st.echo_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if let Err(what) = read_some(&mut s, &mut buf, deadline) {
                return fail(st, format!("echo {what}"));
            }
        }
    }
    let mut out = Vec::new();
    masked_frame(&mut out, 8, &1000u16.to_be_bytes());
    let _ = s.write_all(&out);
}

/// One read with what is left of `deadline` as the timeout; an error names what happened.
fn read_some(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timeout".into());
    }
    let _ = s.set_read_timeout(Some(left));
    let mut tmp = [0u8; 64 << 10];
    match s.read(&mut tmp) {
        Ok(0) => Err("closed".into()),
        Ok(k) => {
            buf.extend_from_slice(&tmp[..k]);
            // Broadcast floods must not grow this without bound: frames are consumed as they come.
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => Err("timeout".into()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err("reset".into()),
        Err(e) => Err(format!("{:?}", e.kind())),
    }
}

// ---------------------------------------------------------------------------------------------
// The server's memory and CPU

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// Sockets the process holds: listener and connections.
fn sockets_open(pid: u32) -> Option<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        dir.filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
            .count(),
    )
}

/// User plus system CPU time, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Samples `VmRSS` every 10 ms on a thread and keeps the largest.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: Option<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let handle = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = rss_kib(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        });
        Sampler { stop, peak, handle }
    }

    fn finish(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle?;
        let _ = h.join();
        Some(self.peak.load(Ordering::Relaxed))
    }
}

/// Follows the server's stderr for `stats ... queued=NB` lines written during the attack.
struct LogWatch {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<u64>,
}

impl LogWatch {
    fn start(path: PathBuf) -> LogWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let from = std::fs::metadata(&path).map_or(0, |m| m.len());
        let handle = thread::spawn(move || {
            let mut max = 0u64;
            let mut at = from;
            let mut partial = String::new();
            loop {
                let last = s2.load(Ordering::Relaxed);
                if let Ok(mut f) = std::fs::File::open(&path) {
                    use std::io::Seek;
                    let mut chunk = String::new();
                    if f.seek(io::SeekFrom::Start(at)).is_ok() && f.read_to_string(&mut chunk).is_ok() {
                        at += chunk.len() as u64;
                        partial.push_str(&chunk);
                        let mut done = 0;
                        while let Some(i) = partial[done..].find('\n') {
                            let line = &partial[done..done + i];
                            if let Some(q) = line.split_whitespace().find_map(|w| w.strip_prefix("queued=")) {
                                if let Ok(v) = q.trim_end_matches('B').parse::<u64>() {
                                    max = max.max(v);
                                }
                            }
                            done += i + 1;
                        }
                        partial.drain(..done);
                    }
                }
                if last {
                    return max;
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        LogWatch { stop, handle }
    }

    fn finish(self) -> u64 {
        // One more look: the last stats line may have come after the attack's end.
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting

enum Val {
    Int(i128),
    Num(f64),
    Str(String),
    Bool(bool),
    Null,
    Obj(Obj),
    List(Vec<Val>),
}

#[derive(Default)]
struct Obj(Vec<(String, Val)>);

impl Obj {
    fn set(&mut self, k: &str, v: impl Into<Val>) {
        self.0.push((k.to_string(), v.into()));
    }
}

macro_rules! int_val {
    ($($t:ty),*) => {$(
        impl From<$t> for Val {
            fn from(v: $t) -> Val {
                Val::Int(v as i128)
            }
        }
    )*};
}
int_val!(i32, u16, u32, u64, usize, i64);

impl From<f64> for Val {
    fn from(v: f64) -> Val {
        Val::Num(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Val {
        Val::Bool(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Str(v.to_string())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Str(v)
    }
}
impl From<Obj> for Val {
    fn from(v: Obj) -> Val {
        Val::Obj(v)
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Val {
        v.map_or(Val::Null, Into::into)
    }
}

impl Val {
    fn json(&self) -> String {
        match self {
            Val::Int(i) => i.to_string(),
            Val::Num(f) if f.is_finite() => format!("{}", (f * 1000.0).round() / 1000.0),
            Val::Num(_) | Val::Null => "null".into(),
            Val::Bool(b) => b.to_string(),
            Val::Str(s) => json_str(s),
            Val::List(l) => format!("[{}]", l.iter().map(Val::json).collect::<Vec<_>>().join(",")),
            Val::Obj(o) => format!(
                "{{{}}}",
                o.0.iter()
                    .map(|(k, v)| format!("{}:{}", json_str(k), v.json()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    fn text(&self) -> String {
        match self {
            Val::Num(f) => format!("{f:.3}"),
            Val::Null => "-".into(),
            Val::Str(s) => s.clone(),
            v => v.json(),
        }
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn print_human(o: &Obj, depth: usize) {
    let pad = "  ".repeat(depth);
    for (k, v) in &o.0 {
        match v {
            Val::Obj(inner) if inner.0.is_empty() => println!("{pad}{k}: none"),
            Val::Obj(inner) if inner.0.iter().all(|(_, v)| !matches!(v, Val::Obj(_) | Val::List(_))) => {
                let parts: Vec<String> = inner.0.iter().map(|(k, v)| format!("{k}={}", v.text())).collect();
                if parts.join(" ").len() < 100 {
                    println!("{pad}{k}: {}", parts.join(" "));
                } else {
                    println!("{pad}{k}:");
                    print_human(inner, depth + 1);
                }
            }
            Val::Obj(inner) => {
                println!("{pad}{k}:");
                print_human(inner, depth + 1);
            }
            Val::List(items) => {
                println!("{pad}{k}:");
                for item in items {
                    match item {
                        Val::Obj(inner) => {
                            let parts: Vec<String> = inner.0.iter().map(|(k, v)| format!("{k}={}", v.text())).collect();
                            println!("{pad}  - {}", parts.join(" "));
                        }
                        v => println!("{pad}  - {}", v.text()),
                    }
                }
            }
            v => println!("{pad}{k}: {}", v.text()),
        }
    }
}
