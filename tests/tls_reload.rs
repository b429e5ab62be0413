//! Certificate reload: SIGHUP makes `wsloop serve` read `--tls-cert`/`--tls-key` again while
//! 1,000 TLS connections stay open and keep echoing; new clients see the new certificate; a bad
//! file is refused and the certificate in use kept; with `--processes` every worker reloads.
//! And the library's `Handle::reload_tls`.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tungstenite::Message as TMessage;

use certs::TestCerts;

type Tls = rustls::StreamOwned<rustls::ClientConnection, common::Tcp>;
type Ws = tungstenite::WebSocket<Tls>;

/// Two certificates from two CAs, and the files the server is told to serve (a copy of one).
struct Rotation {
    old: TestCerts,
    new: TestCerts,
    cert: PathBuf,
    key: PathBuf,
    client: Arc<rustls::ClientConfig>,
}

impl Rotation {
    fn new(name: &str) -> Rotation {
        let dir = common::target_dir().join("tmp").join(format!("tls-reload-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        let old = certs::make(&dir.join("old"));
        let new = certs::make(&dir.join("new"));
        let (cert, key) = (dir.join("served-cert.pem"), dir.join("served-key.pem"));
        std::fs::copy(&old.cert, &cert).unwrap();
        std::fs::copy(&old.key, &key).unwrap();
        // The client trusts both CAs: what it is shown is checked byte for byte below.
        let mut roots = rustls::RootCertStore::empty();
        for ca in [&old.ca, &new.ca] {
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Rotation {
            old,
            new,
            cert,
            key,
            client: Arc::new(client),
        }
    }

    fn serve_args(&self) -> Vec<String> {
        let p = |p: &Path| p.to_str().unwrap().to_string();
        vec!["--tls-cert".into(), p(&self.cert), "--tls-key".into(), p(&self.key)]
    }

    /// Replaces the served files (each written whole, then renamed into place).
    fn install(&self, cert: &Path, key: &Path) {
        for (from, to) in [(cert, &self.cert), (key, &self.key)] {
            let tmp = to.with_extension("tmp");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    }

    /// A `wss://` connection from `from` (127.0.0.x spreads the addresses): the WebSocket and
    /// the server's leaf certificate.
    fn connect(&self, addr: SocketAddr, from: Option<std::net::IpAddr>) -> (Ws, Vec<u8>) {
        let tcp = match from {
            Some(ip) => {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.bind(&SocketAddr::new(ip, 0).into()).unwrap();
                s.connect(&addr.into()).unwrap();
                TcpStream::from(s)
            }
            None => TcpStream::connect(addr).unwrap(),
        };
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn = rustls::ClientConnection::new(Arc::clone(&self.client), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, common::Tcp(tcp));
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        let leaf = tls.conn.peer_certificates().expect("a certificate")[0].to_vec();
        let (ws, resp) = tungstenite::client(format!("wss://localhost:{}/", addr.port()), tls).expect("upgrade");
        assert_eq!(resp.status(), 101);
        (ws, leaf)
    }
}

/// The first certificate of a PEM file: the leaf a server serves from it.
fn leaf_of(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Whether the connection still echoes.
fn echoes(ws: &mut Ws, text: &str) -> bool {
    if ws.send(TMessage::text(text)).is_err() {
        return false;
    }
    loop {
        match ws.read() {
            Ok(TMessage::Text(t)) => return t.as_str() == text,
            Ok(TMessage::Ping(_) | TMessage::Pong(_)) => {}
            _ => return false,
        }
    }
}

fn hangup(pid: u32) {
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// Waits until `needle` occurs `times` times in the server's stderr.
fn wait_count(server: &common::ServerProcess, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.stderr().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "'{needle}' not {times} times in stderr:\n{}",
            common::tail(&server.stderr(), 4000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const RELOADED: &str = "SIGHUP: certificate reloaded from ";
const REFUSED: &str = "SIGHUP: certificate reload refused, the old one stays in use: ";

/// Sockets listening on `port` (IPv4), from /proc/net/tcp.
fn listeners(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
        })
        .count()
}

/// Holds `n` connections (over 127.0.0.1..=127.0.0.4), every one shown `leaf`.
fn hold(r: &Rotation, addr: SocketAddr, n: usize, leaf: &[u8]) -> Vec<Ws> {
    (0..n)
        .map(|i| {
            let from = std::net::IpAddr::from([127, 0, 0, 1 + (i % 4) as u8]);
            let (ws, served) = r.connect(addr, Some(from));
            assert!(served == leaf, "connection {i} was not shown the expected certificate");
            ws
        })
        .collect()
}

fn all_echo(held: &mut [Ws], what: &str) {
    for (i, ws) in held.iter_mut().enumerate() {
        assert!(
            echoes(ws, &format!("{what} {i}")),
            "connection {i} no longer echoes ({what})"
        );
    }
}

#[test]
fn sighup_rotates_the_certificate_under_load_and_refuses_bad_files() {
    let r = Rotation::new("one");
    let (old_leaf, new_leaf) = (leaf_of(&r.old.cert), leaf_of(&r.new.cert));
    assert_ne!(old_leaf, new_leaf);
    let args = r.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::spawn_server(&args);
    let mut held = hold(&r, server.addr, 1000, &old_leaf);
    all_echo(&mut held, "before");

    r.install(&r.new.cert, &r.new.key);
    hangup(server.pid());
    wait_count(&server, RELOADED, 1);
    let (mut fresh, leaf) = r.connect(server.addr, None);
    assert!(leaf == new_leaf, "a new client was not shown the new certificate");
    assert!(echoes(&mut fresh, "fresh"));
    all_echo(&mut held, "after the reload");

    // Bad files: each refused with its reason, the new certificate kept.
    let err = common::target_dir().join("tmp").join("tls-reload-one");
    let garbage = err.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases: [(&Path, &Path, &str); 3] = [
        (&garbage, &r.new.key, "no certificate (BEGIN CERTIFICATE) in it"),
        (&r.new.cert, &r.new.other_key, "is not the key of the certificate in"),
        (&r.old.cert, &r.new.key, "is not the key of the certificate in"),
    ];
    for (i, (cert, key, why)) in cases.into_iter().enumerate() {
        r.install(cert, key);
        hangup(server.pid());
        wait_count(&server, REFUSED, i + 1);
        let line = server
            .stderr()
            .lines()
            .filter(|l| l.contains(REFUSED))
            .nth(i)
            .unwrap()
            .to_string();
        assert!(line.starts_with("ERROR ") && line.contains(why), "{line}");
        let (_, leaf) = r.connect(server.addr, None);
        assert!(
            leaf == new_leaf,
            "case {i}: the certificate changed after a refused reload"
        );
    }
    // A file gone.
    std::fs::remove_file(&r.cert).unwrap();
    hangup(server.pid());
    wait_count(&server, REFUSED, 4);
    assert!(
        server.stderr().contains("cannot read certificate file"),
        "{}",
        server.stderr()
    );
    let (_, leaf) = r.connect(server.addr, None);
    assert!(leaf == new_leaf);
    all_echo(&mut held, "after the refusals");
    assert_eq!(server.stderr().matches(RELOADED).count(), 1);
    assert!(
        !server.stderr().contains("shutting down"),
        "SIGHUP must not stop the server"
    );
}

#[test]
fn sighup_reaches_every_worker_of_processes() {
    let r = Rotation::new("processes");
    let (old_leaf, new_leaf) = (leaf_of(&r.old.cert), leaf_of(&r.new.cert));
    let mut args = r.serve_args();
    args.extend(["--processes".to_string(), "2".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::spawn_server(&args);
    // Spread over four source addresses and many ports: both workers hold some.
    let mut held = hold(&r, server.addr, 200, &old_leaf);
    r.install(&r.new.cert, &r.new.key);
    hangup(server.pid());
    wait_count(&server, "SIGHUP: passed on to every worker", 1);
    wait_count(&server, RELOADED, 2);
    for i in 0..16 {
        let from = std::net::IpAddr::from([127, 0, 0, 1 + (i % 4) as u8]);
        let (mut ws, leaf) = r.connect(server.addr, Some(from));
        assert!(leaf == new_leaf, "new client {i} was not shown the new certificate");
        assert!(echoes(&mut ws, "new"));
    }
    all_echo(&mut held, "after the reload");
    r.install(&r.old.cert, &r.new.key);
    hangup(server.pid());
    wait_count(&server, REFUSED, 2);
    for i in 0..16 {
        let from = std::net::IpAddr::from([127, 0, 0, 1 + (i % 4) as u8]);
        let (_, leaf) = r.connect(server.addr, Some(from));
        assert!(leaf == new_leaf, "client {i}: a refused reload changed the certificate");
    }
    all_echo(&mut held, "after the refusal");
    assert!(!server.stderr().contains("stopping the workers"), "{}", server.stderr());

    // A worker restarted after the reload serves the files as they are, not what the parent
    // read at start.
    drop(held);
    r.install(&r.new.cert, &r.new.key);
    let err = server.stderr();
    let pat = "worker 1 started (pid ";
    let at = err.find(pat).unwrap() + pat.len();
    let pid: u32 = err[at..].split(')').next().unwrap().parse().unwrap();
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_count(&server, "worker 1 started (pid ", 2);
    let err = server.stderr();
    let at = err.rfind(pat).unwrap() + pat.len();
    let restarted: u32 = err[at..].split(')').next().unwrap().parse().unwrap();
    // Both workers listen again: two sockets in LISTEN on the port.
    let deadline = Instant::now() + Duration::from_secs(10);
    while listeners(server.addr.port()) < 2 {
        assert!(Instant::now() < deadline, "the restarted worker does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let before = fds(restarted);
    let mut fresh = Vec::new();
    for i in 0..16 {
        let from = std::net::IpAddr::from([127, 0, 0, 1 + (i % 4) as u8]);
        let (mut ws, leaf) = r.connect(server.addr, Some(from));
        assert!(
            leaf == new_leaf,
            "client {i} after the restart was not shown the new certificate"
        );
        assert!(echoes(&mut ws, "restarted"));
        fresh.push(ws);
    }
    assert!(fds(restarted) > before, "no new client reached the restarted worker");
}

#[test]
fn sighup_reaches_every_loop_of_threads() {
    let r = Rotation::new("threads");
    let (old_leaf, new_leaf) = (leaf_of(&r.old.cert), leaf_of(&r.new.cert));
    let mut args = r.serve_args();
    args.extend(["--threads".to_string(), "3".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::spawn_server(&args);
    let mut held = hold(&r, server.addr, 60, &old_leaf);
    r.install(&r.new.cert, &r.new.key);
    hangup(server.pid());
    wait_count(&server, RELOADED, 1);
    // New connections spread over the loops by the kernel's hash: every one sees the new one.
    for i in 0..24 {
        let from = std::net::IpAddr::from([127, 0, 0, 1 + (i % 4) as u8]);
        let (mut ws, leaf) = r.connect(server.addr, Some(from));
        assert!(leaf == new_leaf, "new client {i} was not shown the new certificate");
        assert!(echoes(&mut ws, "new"));
    }
    all_echo(&mut held, "after the reload");
    assert_eq!(
        server.stderr().matches(RELOADED).count(),
        1,
        "one reload for the process"
    );
}

#[test]
fn sighup_without_tls_says_so_and_keeps_serving() {
    let server = common::spawn_server(&[]);
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{}/", server.addr), common::Tcp(stream)).unwrap();
    hangup(server.pid());
    wait_count(&server, "SIGHUP: this server has no TLS: no certificate to reload", 1);
    ws.send(TMessage::text("still here")).unwrap();
    assert_eq!(common::read_text(&mut ws), "still here");
    assert!(!server.stderr().contains("shutting down"), "{}", server.stderr());
}

#[test]
fn handle_reload_tls_swaps_the_certificate_for_new_handshakes() {
    use wsloop::server::{Echo, HandleError, Server, ServerConfig};
    use wsloop::tls::ServerTls;
    let r = Rotation::new("library");
    let (old_leaf, new_leaf) = (leaf_of(&r.old.cert), leaf_of(&r.new.cert));
    let mut cfg = ServerConfig::default();
    let tls = ServerTls::from_pem_files(&r.cert, &r.key).unwrap();
    assert_eq!(tls.files(), Some((r.cert.as_path(), r.key.as_path())));
    cfg.tls = Some(tls.clone());
    let server = Server::bind("127.0.0.1:0", cfg).unwrap();
    let (addr, handle) = (server.local_addr(), server.handle());
    let t = std::thread::spawn(move || server.run(Echo));
    let (mut before, leaf) = r.connect(addr, None);
    assert!(leaf == old_leaf);
    // The same files read again, once they hold the new pair.
    r.install(&r.new.cert, &r.new.key);
    handle.reload_tls(tls.reload().unwrap()).unwrap();
    let (mut after, leaf) = r.connect(addr, None);
    assert!(leaf == new_leaf);
    assert!(echoes(&mut before, "old") && echoes(&mut after, "new"));
    // A bad pair fails when it is made, before anything is swapped.
    r.install(&r.new.cert, &r.new.other_key);
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains("is not the key of the certificate"), "{e}");
    handle.shutdown().unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(handle.reload_tls(tls.clone()), Err(HandleError::Stopped));

    let plain = Server::bind("127.0.0.1:0", ServerConfig::default()).unwrap();
    assert_eq!(plain.handle().reload_tls(tls), Err(HandleError::NotTls));
}
