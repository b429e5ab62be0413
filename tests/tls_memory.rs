//! What an idle `wss://` connection costs the server's heap, counted by a global allocator:
//!
//! - end to end: a TLS server runs in this process, `wsloop bench` (a child process) opens
//!   500 idle `wss://` connections, and the heap growth per connection is asserted to be at
//!   most 4 KiB (the slab slot, the TLS session, and the slab's growth, everything);
//! - the floor: the heap of one rustls server session after a TLS 1.3 and after a TLS 1.2
//!   handshake, made in memory (without the session cache, which is shared and bounded).
//!
//! Run with `--nocapture` to see the figures.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use wsloop::server::{Conn, Ctx, Handler, Server, ServerConfig};
use wsloop::tls::ServerTls;
use wsloop::Message;

/// Bytes allocated and not yet freed, by anyone in this process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only a counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `System` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this binary count one process-wide heap: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

/// Counts open connections.
struct Count(Arc<AtomicUsize>);

impl Handler for Count {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }
    fn on_open(&mut self, _: &mut Ctx<'_, ()>, _: &mut Conn<()>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        let _ = ctx.send(conn.id(), msg);
    }
}

const CONNECTIONS: usize = 500;

/// Heap bytes per idle connection of an in-process server, `tls` or plain, with `wsloop bench`
/// holding the connections.
fn heap_per_idle_connection(tls: Option<(&certs::TestCerts, ServerTls)>) -> f64 {
    let mut cfg = ServerConfig::default();
    cfg.tls = tls.as_ref().map(|(_, t)| t.clone());
    let server = Server::bind("127.0.0.1:0", cfg).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = Count(Arc::clone(&open));
    let thread = std::thread::spawn(move || server.run(counter));
    std::thread::sleep(Duration::from_millis(200));
    let base = live();
    let mut args = vec![
        "bench".to_string(),
        format!("{}://{addr}/", if tls.is_some() { "wss" } else { "ws" }),
        "--connections".into(),
        CONNECTIONS.to_string(),
        "--duration".into(),
        "3s".into(),
        // Debug builds of the crypto (and 32-bit ones) are slow: no handshake may time out.
        "--connect-timeout".into(),
        "120s".into(),
        "--quiet".into(),
    ];
    if let Some((c, _)) = &tls {
        args.extend(["--ca".to_string(), c.ca.to_str().unwrap().to_string()]);
    }
    let bench = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while open.load(Ordering::SeqCst) < CONNECTIONS {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "only {} opened",
            open.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the last handshakes' transient buffers go.
    std::thread::sleep(Duration::from_millis(500));
    let per = (live() - base) as f64 / CONNECTIONS as f64;
    let out = bench.wait_with_output().unwrap();
    assert!(out.status.success(), "bench: {}", String::from_utf8_lossy(&out.stderr));
    handle.shutdown().unwrap();
    thread.join().unwrap().unwrap();
    per
}

#[test]
fn an_idle_tls_connection_costs_at_most_4_kib_of_heap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::target_dir().join(format!("tls-memory-certs-{}", std::process::id()));
    let c = certs::make(&dir);
    let tls = ServerTls::from_pem_files(&c.cert, &c.key).unwrap();
    let plain = heap_per_idle_connection(None);
    let with_tls = heap_per_idle_connection(Some((&c, tls)));
    println!("heap per idle connection ({CONNECTIONS} held by wsloop bench): plain {plain:.0} B, TLS {with_tls:.0} B");
    // The plain figure (the slab slot, deadlines still queued, the growth of both, and whatever
    // else moved during the run) is printed for comparison only: it varies run to run.
    assert!(with_tls <= 4096.0, "TLS: {with_tls:.0} bytes per idle connection");
}

/// A server session after an in-memory handshake with a rustls client limited to `version`;
/// the client and every transient buffer are gone when it returns.
fn handshake_in_memory(
    scfg: &Arc<rustls::ServerConfig>,
    ccfg: &Arc<rustls::ClientConfig>,
) -> rustls::server::UnbufferedServerConnection {
    let mut srv = rustls::server::UnbufferedServerConnection::new(Arc::clone(scfg)).unwrap();
    let mut cli = rustls::ClientConnection::new(Arc::clone(ccfg), "localhost".try_into().unwrap()).unwrap();
    let mut to_srv: Vec<u8> = Vec::new();
    let mut to_cli: Vec<u8> = Vec::new();
    for _ in 0..20 {
        while cli.wants_write() {
            cli.write_tls(&mut to_srv).unwrap();
        }
        let mut srv_done = false;
        loop {
            let UnbufferedStatus { discard, state } = srv.process_tls_records(&mut to_srv);
            let mut stop = false;
            match state.unwrap() {
                ConnectionState::EncodeTlsData(mut e) => {
                    let start = to_cli.len();
                    to_cli.resize(start + 16384, 0);
                    match e.encode(&mut to_cli[start..]) {
                        Ok(n) => to_cli.truncate(start + n),
                        Err(EncodeError::InsufficientSize(_)) | Err(_) => panic!("encode"),
                    }
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::WriteTraffic(_) => {
                    srv_done = true;
                    stop = true;
                }
                _ => stop = true,
            }
            to_srv.drain(..discard);
            if stop {
                break;
            }
        }
        if !to_cli.is_empty() {
            cli.read_tls(&mut &to_cli[..]).unwrap();
            cli.process_new_packets().unwrap();
            to_cli.clear();
        }
        if srv_done && !cli.is_handshaking() && !cli.wants_write() && to_srv.is_empty() {
            return srv;
        }
    }
    panic!("the in-memory handshake did not finish");
}

#[test]
fn the_rustls_session_floor_for_tls_1_3_and_1_2() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::target_dir().join(format!("tls-memory-floor-{}", std::process::id()));
    let c = certs::make(&dir);
    // Without the shared session cache (256 entries at most, whatever the connection count):
    // what is counted is the sessions alone.
    let mut scfg = rustls_server_config(&c);
    Arc::get_mut(&mut scfg).unwrap().session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&c.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for (name, version) in [
        ("TLS 1.3", &rustls::version::TLS13),
        ("TLS 1.2", &rustls::version::TLS12),
    ] {
        let ccfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        );
        // Warm up (session caches fill, lazy statics initialise), then count.
        let warm: Vec<_> = (0..300).map(|_| handshake_in_memory(&scfg, &ccfg)).collect();
        drop(warm);
        const N: usize = 100;
        let base = live();
        let sessions: Vec<_> = (0..N).map(|_| handshake_in_memory(&scfg, &ccfg)).collect();
        // The sessions themselves sit in the vector: `per` counts them whole.
        let per = (live() - base) as f64 / N as f64;
        let inline = std::mem::size_of::<rustls::server::UnbufferedServerConnection>();
        println!("{name}: a rustls server session after the handshake: {per:.0} B ({inline} B of it inline)");
        assert_eq!(sessions.len(), N);
        assert!(per < 4096.0, "{name}: {per:.0} bytes");
    }
}

/// A rustls server configuration for the test certificate, as `ServerTls` makes it.
fn rustls_server_config(c: &certs::TestCerts) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&c.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&c.key).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

// ---------------------------------------------------------------------------------------------
// Peers holding partial TLS records under a small `--max-memory`

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

type TlsPeer = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A rustls client configuration trusting the test CA.
fn trusting_rustls(c: &certs::TestCerts) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&c.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A `wss://` connection past its upgrade (blocking, with a 10 s timeout on each read).
fn upgraded_tls(addr: std::net::SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> TlsPeer {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(Arc::clone(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(UPGRADE).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("the upgrade's answer");
        assert!(n > 0, "closed before the upgrade's answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    s
}

/// A masked binary frame of `payload`.
fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x82, 0x80 | 127];
    f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The first whole server frame in `buf`: opcode and payload.
fn server_frame(buf: &[u8]) -> Option<(u8, &[u8])> {
    let (len, at) = match *buf.get(1)? {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    Some((buf[0] & 0x0f, buf.get(at..at + len)?))
}

/// Reads what has arrived on a non-blocking TLS peer into `got`; true once the stream ended
/// (cleanly or not).
fn read_available(p: &mut TlsPeer, got: &mut Vec<u8>) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match p.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// What a legitimate client sending one large message saw: its echo, or a close with a code.
fn send_and_wait(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>, size: usize) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = upgraded_tls(addr, &cfg);
    let payload = vec![0x5a; size];
    s.write_all(&masked_binary(&payload))
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((op, p)) = server_frame(&got) {
            return match op {
                2 if p == &payload[..] => Ok("echo".into()),
                8 if p.len() >= 2 => Ok(format!("close {}", u16::from_be_bytes([p[0], p[1]]))),
                op => Err(format!("opcode {op}, {} bytes", p.len())),
            };
        }
        if Instant::now() >= deadline {
            return Err("no answer in 20 s".into());
        }
        match s.read(&mut buf) {
            Ok(0) => return Err("the stream ended without an answer".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e} ({:?})", e.kind())),
        }
    }
}

#[test]
fn peers_holding_partial_tls_records_are_shed_with_1013() {
    use std::io::Write;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 200 peers × 16.6 KB of unfinished records offered to a 2 MiB budget.
    const ATTACKERS: usize = 200;
    const RECORD: usize = 16_600;
    let dir = common::target_dir().join(format!("tls-memory-shed-{}", std::process::id()));
    let c = certs::make(&dir);
    let server = common::spawn_server(&[
        "--tls-cert",
        c.cert.to_str().unwrap(),
        "--tls-key",
        c.key.to_str().unwrap(),
        "--max-memory",
        "2MiB",
        "--stats",
        "1s",
    ]);
    let cfg = trusting_rustls(&c);
    let mut attackers: Vec<TlsPeer> = (0..ATTACKERS).map(|_| upgraded_tls(server.addr, &cfg)).collect();
    // An application-data record announcing 16,600 bytes, all but its last 5 sent.
    let mut part = vec![23, 3, 3, (RECORD >> 8) as u8, RECORD as u8];
    part.resize(RECORD, 0x42);
    for a in &mut attackers {
        a.sock.write_all(&part).unwrap();
        a.sock.set_nonblocking(true).unwrap();
    }
    // Legitimate clients meanwhile: each gets its echo or a 1013, never a reset.
    thread::sleep(Duration::from_millis(300));
    let legit: Vec<_> = (0..3)
        .map(|_| {
            let cfg = Arc::clone(&cfg);
            let addr = server.addr;
            thread::spawn(move || send_and_wait(addr, cfg, 256 << 10))
        })
        .collect();
    let mut got = vec![Vec::new(); ATTACKERS];
    let mut ended = [false; ATTACKERS];
    let deadline = Instant::now() + Duration::from_secs(10);
    let closes = loop {
        for (i, a) in attackers.iter_mut().enumerate() {
            if !ended[i] {
                ended[i] = read_available(a, &mut got[i]);
            }
        }
        let closes: Vec<u16> = got
            .iter()
            .filter_map(|g| match server_frame(g) {
                Some((8, p)) if p.len() >= 2 => Some(u16::from_be_bytes([p[0], p[1]])),
                _ => None,
            })
            .collect();
        if closes.len() >= ATTACKERS / 10 || Instant::now() >= deadline {
            break closes;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let seen: Vec<_> = legit.into_iter().map(|t| t.join().unwrap()).collect();
    let shed = closes.iter().filter(|&&c| c == 1013).count();
    println!(
        "partial TLS records: {shed} of {ATTACKERS} attackers closed with 1013 ({} ended); legitimate clients: {seen:?}",
        ended.iter().filter(|&&e| e).count()
    );
    assert!(
        shed > 0,
        "no attacker closed with 1013 (close codes: {closes:?}); server log:\n{}",
        common::tail(&server.stderr(), 2000)
    );
    assert!(closes.iter().all(|&c| c == 1013), "other close codes: {closes:?}");
    for s in &seen {
        assert!(
            matches!(s.as_deref(), Ok("echo" | "close 1013")),
            "a legitimate client saw {s:?}"
        );
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_comes_back_after_tls_peers_leave() {
    use std::io::Write;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const PEERS: usize = 500;
    const RECORD: usize = 16_600;
    // What may stay resident: lazily made state (the session cache, code first run under load)
    // and the allocator's pages still partly in use; a heap never trimmed keeps about 10 MiB.
    const SLACK_KIB: u64 = 4 << 10;
    let dir = common::target_dir().join(format!("tls-memory-back-{}", std::process::id()));
    let c = certs::make(&dir);
    let server = common::spawn_server(&[
        "--tls-cert",
        c.cert.to_str().unwrap(),
        "--tls-key",
        c.key.to_str().unwrap(),
        "--max-memory",
        "256MiB",
    ]);
    let pid = server.pid();
    let cfg = trusting_rustls(&c);
    // Warm: a few sessions made and gone, so that what the first ones make for good is in.
    drop((0..20).map(|_| upgraded_tls(server.addr, &cfg)).collect::<Vec<_>>());
    thread::sleep(Duration::from_millis(1500));
    let idle = rss_kib(pid);
    let mut peers: Vec<TlsPeer> = (0..PEERS).map(|_| upgraded_tls(server.addr, &cfg)).collect();
    let mut part = vec![23, 3, 3, (RECORD >> 8) as u8, RECORD as u8];
    part.resize(RECORD, 0x42);
    for p in &mut peers {
        p.sock.write_all(&part).unwrap();
    }
    thread::sleep(Duration::from_millis(500));
    let held = rss_kib(pid);
    drop(peers);
    let closed = Instant::now();
    let mut now = rss_kib(pid);
    while now > idle + SLACK_KIB && closed.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(100));
        now = rss_kib(pid);
    }
    println!(
        "{PEERS} wss:// peers holding partial records: RSS idle {idle} KiB, held {held} KiB, \
         {now} KiB {:.1} s after they closed",
        closed.elapsed().as_secs_f64()
    );
    assert!(held > idle + 6 * 1024, "the records were not held: {held} KiB");
    assert!(
        now <= idle + SLACK_KIB,
        "RSS {now} KiB 5 s after the peers closed, idle {idle} KiB"
    );
}
