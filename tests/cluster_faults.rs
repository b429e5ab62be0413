//! Redis faults end to end: `wsloop serve --cluster … --stats 200ms` against a real
//! redis-server on a free loopback port (its own directory, no persistence) that is missing at
//! start, killed and restarted, stalled with SIGSTOP under a publish flood, or cuts off a
//! subscriber that falls behind; and against a hostile server on the Redis port. Through all of
//! them the server serves its own peers, says what happened on stderr in a line, counts what it
//! could not send, and joins the cluster again once Redis is back.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::redis::{free_port, RedisServer as Redis};
use common::{next_text, send_text, ServerProcess, Tcp};

/// How soon a fresh client must have its handshake, and its own broadcast back, while Redis
/// is stalled under a flood.
const PROBE_BOUND: Duration = Duration::from_secs(1);

/// Upper bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// How soon a server joins again once Redis is back: the retry wait is at most 5 s (the
/// backoff's cap), plus the setup and a heartbeat.
const REJOIN: Duration = Duration::from_secs(8);

type Client = common::WsClient;

/// `wsloop serve --cluster URL --mode broadcast --stats 200ms ARGS`.
fn serve(url: &str, args: &[&str]) -> ServerProcess {
    let mut all = vec!["--cluster", url, "--mode", "broadcast", "--stats", "200ms"];
    all.extend_from_slice(args);
    common::spawn_server(&all)
}

/// One stats line of loop 0, the cluster's part included.
#[derive(Clone, Debug, Default)]
struct Stats {
    state: String,
    instances: u64,
    published: u64,
    received: u64,
    dropped_out: u64,
    dropped_in: u64,
    lost: u64,
    /// `mem=USED/LIMIT` in KiB.
    mem_kib: u64,
    mem_limit_kib: u64,
    rss_kib: Option<u64>,
}

/// The value after `key=` in `line`, up to the next space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    line[start..].split(' ').next()
}

fn kib(v: &str) -> Option<u64> {
    v.strip_suffix("KiB")?.parse().ok()
}

fn parse_stats(line: &str) -> Option<Stats> {
    if !line.starts_with("stats open=") {
        return None;
    }
    let num = |k: &str| field(line, k).and_then(|v| v.parse::<u64>().ok());
    let (mem, limit) = field(line, "mem")?.split_once('/')?;
    let cluster = &line[line.find(" cluster=")?..];
    let (dropped_out, dropped_in) = field(cluster, "dropped")?.split_once('/')?;
    Some(Stats {
        state: field(line, "cluster")?.to_string(),
        instances: num("instances")?,
        published: num("published")?,
        received: num("received")?,
        dropped_out: dropped_out.parse().ok()?,
        dropped_in: dropped_in.parse().ok()?,
        lost: field(cluster, "lost")?.parse().ok()?,
        mem_kib: kib(mem)?,
        mem_limit_kib: kib(limit)?,
        rss_kib: field(line, "rss").and_then(kib),
    })
}

/// Every stats line so far, oldest first.
fn all_stats(server: &ServerProcess) -> Vec<Stats> {
    server.stderr().lines().filter_map(parse_stats).collect()
}

fn last_stats(server: &ServerProcess) -> Option<Stats> {
    all_stats(server).pop()
}

/// Waits (`within` at most) until the last stats line satisfies `ok`, and returns it.
fn wait_stats(server: &ServerProcess, what: &str, within: Duration, ok: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = last_stats(server).filter(|s| ok(s)) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; last stats {:?}; stderr tail:\n{}",
            last_stats(server),
            common::tail(&server.stderr(), 3000)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the server's bus is up and sees `others` other instances.
fn wait_joined(server: &ServerProcess, others: u64, within: Duration) -> Stats {
    wait_stats(server, &format!("cluster=up instances={others}"), within, |s| {
        s.state == "up" && s.instances == others
    })
}

/// The server's lines that report Redis trouble (the warnings of the bus).
fn trouble_lines(server: &ServerProcess) -> Vec<String> {
    server
        .stderr()
        .lines()
        .filter(|l| l.starts_with("WARN") && l.contains("cluster:"))
        .map(str::to_string)
        .collect()
}

/// Asserts the server process is still running.
fn assert_alive(server: &mut ServerProcess) {
    let status = server.child_mut().try_wait().expect("try_wait");
    assert!(
        status.is_none(),
        "the server exited ({status:?}); stderr tail:\n{}",
        common::tail(&server.stderr(), 3000)
    );
}

fn connect(addr: SocketAddr) -> Client {
    connect_within(addr, WAIT)
}

/// A client whose handshake must be done within `bound`.
fn connect_within(addr: SocketAddr, bound: Duration) -> Client {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&addr, bound).expect("connect");
    s.set_read_timeout(Some(bound)).unwrap();
    s.set_write_timeout(Some(bound)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/"), Tcp(s))
        .unwrap_or_else(|e| panic!("handshake not done within {bound:?}: {e} after {:?}", t0.elapsed()));
    assert_eq!(resp.status(), 101);
    // Short reads from here on: `next_text` polls against its own deadline.
    ws.get_ref()
        .0
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    ws
}

/// Reads until the message `want` arrives (others skipped); whether it did within `wait`.
fn wait_text(ws: &mut Client, want: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_text(ws, left) {
            Some(t) if t == want => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

/// Sends `tag N` from `from` every 200 ms until `to` gets one of them; how long it took from
/// the first send, or `None` if none did within `within`. Redis pub/sub is at-most-once, so
/// the first one after a fault may be the one that is lost.
fn try_cross(from: &mut Client, to: &mut Client, tag: &str, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut first_send = None;
    let mut n = 0;
    while t0.elapsed() < within {
        // The sender reads too: a peer that leaves its own queue full is not read from.
        while next_text(from, Duration::ZERO).is_some() {}
        first_send.get_or_insert_with(Instant::now);
        send_text(from, &format!("{tag} {n}"));
        n += 1;
        let round = Instant::now() + Duration::from_millis(200);
        while let Some(t) = next_text(to, round.saturating_duration_since(Instant::now())) {
            if t.starts_with(&format!("{tag} ")) {
                return first_send.map(|t| t.elapsed());
            }
        }
    }
    None
}

/// [`try_cross`] that must succeed; the servers' stats and log tails otherwise.
fn cross(from: &mut Client, to: &mut Client, tag: &str, servers: &[&ServerProcess]) -> Duration {
    try_cross(from, to, tag, WAIT).unwrap_or_else(|| {
        let tails: Vec<String> = servers
            .iter()
            .map(|s| common::tail(&s.stderr(), 1500).to_string())
            .collect();
        panic!(
            "no `{tag}` message crossed within {WAIT:?}; stderr tails:\n{}",
            tails.join("\n---\n")
        )
    })
}

/// Asserts that a broadcast of `from` reaches `from` itself and the other local `peer`.
fn assert_local(from: &mut Client, peer: &mut Client, text: &str) {
    send_text(from, text);
    assert!(wait_text(from, text, WAIT), "{text:?} did not come back to its sender");
    assert!(
        wait_text(peer, text, WAIT),
        "{text:?} did not reach the other local peer"
    );
}

/// One masked WebSocket text frame of `len` bytes of `b'f'` (a zero mask leaves it as is).
fn text_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0x81];
    match len {
        0..=125 => f.push(0x80 | len as u8),
        126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0; 4]);
    f.resize(f.len() + len, b'f');
    f
}

/// A client that writes `len`-byte broadcasts as fast as the server takes them, in a thread
/// of its own, and reads (and discards) whatever comes back in another; until `for_how_long`
/// has passed or `count` frames have gone, then closes. Returns the frames written.
fn flood(addr: SocketAddr, len: usize, count: u64, for_how_long: Duration) -> thread::JoinHandle<u64> {
    let ws = connect(addr);
    let stream = ws.get_ref().0.try_clone().expect("clone the flooder's socket");
    let mut reader = stream.try_clone().expect("clone the flooder's socket");
    let done = Arc::new(AtomicBool::new(false));
    let done_r = Arc::clone(&done);
    let drain = thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        reader.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        // Until the server's answer to the close ends the connection (bounded).
        let mut until = None;
        loop {
            if until.is_none() && done_r.load(Ordering::Relaxed) {
                until = Some(Instant::now() + WAIT);
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                return;
            }
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    });
    thread::spawn(move || {
        let _keep = ws;
        let mut stream = stream;
        stream.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
        // Whole frames only in the buffer, so a partial write simply goes on from where it was.
        let frame = text_frame(len);
        let per = (256 << 10) / frame.len() + 1;
        let batch: Vec<u8> = frame.repeat(per);
        let (mut written, mut pos) = (0u64, 0usize);
        let limit = count.saturating_mul(frame.len() as u64);
        let deadline = Instant::now() + for_how_long;
        while Instant::now() < deadline && written < limit {
            let left = usize::try_from(limit - written).unwrap_or(usize::MAX);
            let end = batch.len().min(pos.saturating_add(left));
            match stream.write(&batch[pos..end]) {
                Ok(n) => {
                    written += n as u64;
                    pos = (pos + n) % batch.len();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("the flood's write failed: {e}"),
            }
        }
        // Finish the frame in flight so the connection stays valid.
        let rest = (frame.len() - (written as usize % frame.len())) % frame.len();
        if rest > 0 {
            stream.set_write_timeout(Some(WAIT)).unwrap();
            stream
                .write_all(&frame[frame.len() - rest..])
                .expect("finish the last frame");
            written += rest as u64;
        }
        // A close, read after every frame before it: the server has taken them all once it
        // ends the connection (closing at once could reset it with frames still unread).
        stream.set_write_timeout(Some(WAIT)).unwrap();
        stream.write_all(&[0x88, 0x80, 0, 0, 0, 0]).expect("send the close");
        done.store(true, Ordering::Relaxed);
        let _ = drain.join();
        written / frame.len() as u64
    })
}

/// The p50 and the max of `v`.
fn p50_max(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().expect("some samples"))
}

#[test]
fn redis_unreachable_at_start_then_started() {
    let port = free_port();
    if !common::redis::available() {
        return;
    }
    let url = format!("redis://127.0.0.1:{port}");
    // Debug: every failed retry is a line, to count them; warnings say it once.
    let mut a = serve(&url, &["--log", "debug"]);
    let (mut a1, mut a2) = (connect(a.addr), connect(a.addr));
    assert_local(&mut a1, &mut a2, "alone 1");
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(2500));
    assert_alive(&mut a);
    let warned = trouble_lines(&a);
    assert_eq!(warned.len(), 1, "one warning for the outage: {warned:#?}");
    assert!(
        warned[0].contains(&format!("127.0.0.1:{port} unreachable")) && warned[0].contains("retrying"),
        "{}",
        warned[0]
    );
    let retries = a
        .stderr()
        .lines()
        .filter(|l| l.starts_with("DEBUG") && l.contains(&format!("cluster: redis 127.0.0.1:{port}:")))
        .count();
    // Backoff from 100 ms, doubling: retries at 0.1, 0.3, 0.7 and 1.5 s (3.1 s next); a fixed
    // 100 ms would make ~24 in 2.5 s.
    assert!(
        (2..=8).contains(&retries),
        "{retries} failed retries in {:?}",
        t0.elapsed()
    );
    let s = last_stats(&a).expect("a stats line");
    assert_eq!(s.state, "connecting", "{s:?}");
    assert_local(&mut a1, &mut a2, "alone 2");

    let Some(_redis) = Redis::start_on(port, &[]) else {
        return;
    };
    let started = Instant::now();
    wait_stats(&a, "cluster=up once Redis runs", REJOIN, |s| s.state == "up");
    let up_after = started.elapsed();
    let mut b = serve(&url, &[]);
    wait_joined(&a, 1, WAIT);
    wait_joined(&b, 1, WAIT);
    let mut b1 = connect(b.addr);
    let crossed = cross(&mut a1, &mut b1, "across", &[&a, &b]);
    let back = cross(&mut b1, &mut a1, "back", &[&a, &b]);
    assert_alive(&mut a);
    assert_alive(&mut b);
    eprintln!(
        "unreachable at start: 1 warning, {retries} retries in 2.5 s; cluster=up {up_after:?} \
         after Redis started; A->B {crossed:?}, B->A {back:?}"
    );
}

#[test]
fn redis_killed_then_restarted_on_the_same_port() {
    let Some(mut redis) = Redis::start() else { return };
    let url = redis.url();
    let (mut a, mut b) = (serve(&url, &[]), serve(&url, &[]));
    wait_joined(&a, 1, WAIT);
    wait_joined(&b, 1, WAIT);
    let (mut a1, mut a2, mut b1) = (connect(a.addr), connect(a.addr), connect(b.addr));
    cross(&mut a1, &mut b1, "before", &[&a, &b]);

    redis.kill();
    let down = wait_stats(&a, "cluster=down after the kill", WAIT, |s| s.state == "down");
    // Local delivery goes on, at once; what is published meanwhile is dropped and counted.
    let sent = 20;
    let t0 = Instant::now();
    for k in 0..sent {
        send_text(&mut a1, &format!("during {k}"));
    }
    for k in 0..sent {
        let m = format!("during {k}");
        assert!(wait_text(&mut a1, &m, WAIT), "{m} did not come back");
        assert!(wait_text(&mut a2, &m, WAIT), "{m} did not reach the local peer");
    }
    let local = t0.elapsed();
    assert!(local < Duration::from_secs(3), "local delivery took {local:?}");
    let counted = wait_stats(&a, "the outage's broadcasts counted as dropped", WAIT, |s| {
        s.dropped_out >= down.dropped_out + sent
    });
    if let Some(t) = next_text(&mut b1, Duration::from_millis(300)) {
        panic!("B got {t:?} while Redis was down");
    }
    let warned = trouble_lines(&a);
    assert_eq!(warned.len(), 1, "one warning for the outage: {warned:#?}");

    thread::sleep(Duration::from_millis(500));
    redis.restart();
    let restarted = Instant::now();
    wait_joined(&a, 1, REJOIN);
    wait_joined(&b, 1, REJOIN);
    let joined = restarted.elapsed();
    let crossed = cross(&mut a1, &mut b1, "after", &[&a, &b]);
    cross(&mut b1, &mut a1, "back", &[&a, &b]);
    let total = restarted.elapsed();
    assert!(total < REJOIN + Duration::from_secs(2), "{total:?}");
    // Resubscribed: A listens on all, hb and its own channel again (and so does B).
    let channels = redis.command(&["PUBSUB", "CHANNELS", "wsloop:*"]);
    assert!(
        channels.lines().filter(|c| c.starts_with("wsloop:i:")).count() == 2
            && channels.lines().any(|c| c == "wsloop:all")
            && channels.lines().any(|c| c == "wsloop:hb"),
        "{channels:?}"
    );
    assert!(a.stderr().matches("cluster: connected to redis").count() >= 2);
    assert_alive(&mut a);
    assert_alive(&mut b);
    eprintln!(
        "killed: cluster=down, {sent} local broadcasts in {local:?}, dropped_out {} -> {}; \
         restarted: both joined in {joined:?}, a message crossed {crossed:?} later, {total:?} in all",
        down.dropped_out, counted.dropped_out
    );
}

#[test]
fn redis_stalled_under_a_publish_flood() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let max_memory_kib = 32 << 10;
    let args = ["--max-memory", "32MiB", "--slow-consumer", "drop"];
    let (mut a, mut b) = (serve(&url, &args), serve(&url, &args));
    wait_joined(&a, 1, WAIT);
    wait_joined(&b, 1, WAIT);
    let (mut a1, mut b1) = (connect(a.addr), connect(b.addr));
    cross(&mut a1, &mut b1, "before", &[&a, &b]);
    let before = last_stats(&a).unwrap();

    let flood_for = Duration::from_secs(3);
    let flooder = flood(a.addr, 1024, u64::MAX, flood_for + Duration::from_millis(300));
    thread::sleep(Duration::from_millis(300));
    redis.pause();
    let paused = Instant::now();
    // Fresh clients all along: each gets its handshake and its own message back.
    let (mut handshakes, mut round_trips) = (Vec::new(), Vec::new());
    while paused.elapsed() < flood_for {
        let n = handshakes.len();
        let t0 = Instant::now();
        let mut c = connect_within(a.addr, PROBE_BOUND);
        handshakes.push(t0.elapsed());
        let msg = format!("probe {n}");
        let t1 = Instant::now();
        send_text(&mut c, &msg);
        assert!(
            wait_text(&mut c, &msg, PROBE_BOUND),
            "{msg}: not back within {PROBE_BOUND:?} (Redis stalled for {:?})",
            paused.elapsed()
        );
        round_trips.push(t1.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    let flooded = flooder.join().expect("the flood");
    let stalled = all_stats(&a);
    let during = last_stats(&a).unwrap();
    redis.resume();
    let resumed = Instant::now();
    assert_alive(&mut a);
    assert!(
        during.dropped_out > before.dropped_out,
        "a full queue to a stalled Redis drops and counts: {during:?}"
    );
    let peak_mem = stalled.iter().map(|s| s.mem_kib).max().unwrap_or(0);
    let peak_rss = stalled.iter().filter_map(|s| s.rss_kib).max().unwrap_or(0);
    for s in &stalled {
        assert!(
            s.mem_kib <= s.mem_limit_kib && s.mem_limit_kib == max_memory_kib,
            "memory over --max-memory: {s:?}"
        );
    }
    let crossed = cross(&mut a1, &mut b1, "after", &[&a, &b]);
    assert_alive(&mut a);
    assert_alive(&mut b);
    let (hs50, hsmax) = p50_max(&mut handshakes);
    let (p50, max) = p50_max(&mut round_trips);
    eprintln!(
        "stalled: {flooded} broadcasts of 1 KiB flooded in {:?}; {} fresh clients: handshake \
         p50 {hs50:?} max {hsmax:?}, own message back p50 {p50:?} max {max:?}; published {}, dropped_out {} -> {}; peak mem {peak_mem} KiB of \
         {max_memory_kib} KiB, peak rss {peak_rss} KiB; a message crossed {crossed:?} after SIGCONT \
         ({:?} incl. reading the backlog)",
        flood_for + Duration::from_millis(300),
        handshakes.len(),
        during.published,
        before.dropped_out,
        during.dropped_out,
        resumed.elapsed(),
    );
}

/// `PUBSUB NUMSUB channel`: how many connections listen to it.
fn numsub(redis: &Redis, channel: &str) -> u64 {
    let a = redis.command(&["PUBSUB", "NUMSUB", channel]);
    a.lines()
        .find_map(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("PUBSUB NUMSUB answered {a:?}"))
}

/// Sends a signal to a process (`kill -SIG PID`).
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

#[test]
fn redis_cuts_off_a_subscriber_that_falls_behind() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    assert_eq!(
        redis.command(&["CONFIG", "SET", "client-output-buffer-limit", "pubsub 256kb 128kb 1"]),
        "OK"
    );
    // The burst passes the test's clients too: dropped for them rather than closing them.
    let drop = ["--slow-consumer", "drop"];
    let (mut a, mut b) = (serve(&url, &drop), serve(&url, &drop));
    wait_joined(&a, 1, WAIT);
    wait_joined(&b, 1, WAIT);
    let (mut a1, mut b1) = (connect(a.addr), connect(b.addr));
    cross(&mut a1, &mut b1, "before", &[&a, &b]);
    assert_eq!(numsub(&redis, "wsloop:all"), 2);
    let b_before = last_stats(&b).unwrap();

    // B's bus reads Redis at Redis's pace whatever its loops do, so B falls behind only when
    // it does not run at all: stopped while A sends 16 MiB in 16 KiB broadcasts.
    signal(b.pid(), "-STOP");
    let burst = 1024;
    let sent = flood(a.addr, 16 << 10, burst, WAIT).join().expect("the burst");
    assert_eq!(sent, burst);
    let t0 = Instant::now();
    let cut = loop {
        if numsub(&redis, "wsloop:all") == 1 {
            break t0.elapsed();
        }
        if t0.elapsed() > WAIT {
            signal(b.pid(), "-CONT");
            panic!(
                "Redis did not cut B off; stats of A {:?}; its log:\n{}",
                last_stats(&a),
                redis.log()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    signal(b.pid(), "-CONT");
    let continued = Instant::now();
    assert!(
        redis.log().contains("for overcoming of output buffer limits"),
        "{}",
        redis.log()
    );
    // B notices, says so, reconnects and resubscribes.
    assert!(
        b.wait_for_stderr("unreachable: redis closed the connection", WAIT),
        "{}",
        common::tail(&b.stderr(), 3000)
    );
    let deadline = Instant::now() + REJOIN;
    while b.stderr().matches("cluster: connected to redis").count() < 2 {
        assert!(Instant::now() < deadline, "{}", common::tail(&b.stderr(), 3000));
        thread::sleep(Duration::from_millis(20));
    }
    let reconnected = continued.elapsed();
    // A later message crosses again, and B saw the gap in A's broadcasts.
    let crossed = cross(&mut a1, &mut b1, "after", &[&a, &b]);
    let b_after = wait_stats(&b, "B counts A's broadcasts it lost", WAIT, |s| s.lost > b_before.lost);
    assert_eq!(numsub(&redis, "wsloop:all"), 2);
    assert_alive(&mut a);
    assert_alive(&mut b);
    let warned = trouble_lines(&b);
    let a_after = last_stats(&a).unwrap();
    eprintln!(
        "cut off: {sent} x 16 KiB from A (A published {}, dropped {}); Redis cut stopped B in \
         {cut:?}; B reconnected {reconnected:?} after SIGCONT, a message crossed {crossed:?} \
         later; B's stats: lost={} received={} dropped_in={}; B's warning: {warned:?}",
        a_after.published, a_after.dropped_out, b_after.lost, b_after.received, b_after.dropped_in
    );
}

/// What the hostile server answers, by connection, in turn.
const HOSTILE: [&[u8]; 3] = [
    b"\x00\xffgarbage, not RESP\r\n",
    b"$9999999999999\r\n",
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
];

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn a_hostile_server_on_the_redis_port() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicU64::new(0));
    let streamed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let server_thread = {
        let (accepted, streamed, stop) = (Arc::clone(&accepted), Arc::clone(&streamed), Arc::clone(&stop));
        listener.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let n = accepted.fetch_add(1, Ordering::Relaxed) as usize;
                s.set_nonblocking(false).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
                let _ = s.write_all(HOSTILE[n % HOSTILE.len()]);
                if n % HOSTILE.len() == 1 {
                    // The promised bulk's bytes, 32 MiB or until the reader gives up.
                    let chunk = vec![b'x'; 64 << 10];
                    for _ in 0..512 {
                        match s.write(&chunk) {
                            Ok(k) => {
                                streamed.fetch_add(k as u64, Ordering::Relaxed);
                            }
                            Err(_) => break,
                        }
                    }
                }
                conns.push(s);
            }
        })
    };
    // Debug: each failure's reason is a line of its own after the one warning.
    let mut a = serve(&url, &["--max-message", "1MiB", "--log", "debug"]);
    let (mut a1, mut a2) = (connect(a.addr), connect(a.addr));
    let t0 = Instant::now();
    let mut peak_rss = 0;
    let mut k = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        assert_alive(&mut a);
        peak_rss = peak_rss.max(rss_kib(a.pid()));
        assert_local(&mut a1, &mut a2, &format!("local {k}"));
        k += 1;
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    server_thread.join().unwrap();
    assert_alive(&mut a);
    let attempts = accepted.load(Ordering::Relaxed);
    // Two connections per attempt; backoff from 100 ms, doubling: about 5 attempts in 4 s.
    assert!((3..=40).contains(&attempts), "{attempts} connections in 4 s");
    assert!(peak_rss < 64 << 10, "RSS {peak_rss} KiB");
    let s = last_stats(&a).unwrap();
    assert_eq!(s.state, "connecting", "{s:?}");
    let warned = trouble_lines(&a);
    assert_eq!(warned.len(), 1, "one warning: {warned:#?}");
    let line = &warned[0];
    assert!(line.contains("unreachable") && line.contains("retrying"), "{line}");
    let stderr = a.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let mut reasons: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("DEBUG cluster: redis"))
        .filter_map(|l| {
            l.splitn(4, ' ')
                .nth(3)
                .map(|r| r.split_once(": ").map_or(r, |(_, w)| w))
        })
        .collect();
    reasons.sort();
    reasons.dedup();
    eprintln!("hostile: the reasons given: {reasons:#?}");
    eprintln!(
        "hostile: {attempts} connections in 4 s, {} KiB of a bulk streamed, peak RSS {peak_rss} \
         KiB, {k} local round trips; warning: {line}",
        streamed.load(Ordering::Relaxed) >> 10
    );
}

/// The tests' Redis is their own: a redis-server started on a port another one already holds
/// cannot listen, and must not be taken for ready because the other one answers PING there
/// (two tests that picked one free port would share a Redis).
#[test]
fn the_test_harness_never_takes_another_redis_for_its_own() {
    let Some(first) = Redis::start() else { return };
    let second = std::panic::catch_unwind(|| Redis::start_on(first.port, &[]));
    let why = match second {
        Ok(_) => panic!(
            "a redis-server on port {} that could not listen was taken as started",
            first.port
        ),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(why.contains("exited at start"), "{why}");
    assert_eq!(first.command(&["PING"]), "PONG", "the first one is untouched");
}
