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
    fn on_open(&mut self, _: &mut Ctx<'_, ()>, _: &mut Conn<()>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        ctx.send(conn.id(), msg);
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
