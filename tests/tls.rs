//! `wss://` end to end: `wsloop serve --tls-cert --tls-key` with certificates made at test time
//! (rcgen), against our client (library and CLI), the load generator, Python `websockets` and
//! Node `ws`; the certificate-file errors of `serve`; and bad input on both kinds of port
//! (plain HTTP on the TLS port, a ClientHello on the plain port, garbage, a stalled handshake),
//! after each of which the server keeps serving.
//!
//! Python and Node are found as in tests/interop.rs: missing ones skip loudly outside CI and
//! fail under `CI=true`.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use certs::TestCerts;
use common::venv::{python_venv, venv_python};
use common::{drain_lines, require_tool, runs_ok, spawn_server, tail, target_dir, ServerProcess, INTEROP_CHECKS};
use wsloop::client::{Client, ClientConfig, ClientError, ClientEvent};
use wsloop::tls::{ClientTls, TlsError};

/// One set of certificates for the whole test binary.
fn certs() -> &'static TestCerts {
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    CERTS.get_or_init(|| certs::make(&target_dir().join(format!("tls-test-certs-{}", std::process::id()))))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `wsloop serve` over TLS with the test certificate, plus `args`.
fn tls_server(args: &[&str]) -> ServerProcess {
    let c = certs();
    let mut all = vec!["--tls-cert", path(&c.cert), "--tls-key", path(&c.key)];
    all.extend_from_slice(args);
    spawn_server(&all)
}

fn wss(server: &ServerProcess, host: &str) -> String {
    format!("wss://{host}:{}/", server.addr.port())
}

fn trusting_client() -> ClientConfig {
    let mut cfg = ClientConfig::default();
    cfg.tls = Some(ClientTls::with_ca_file(&certs().ca).expect("load the test CA"));
    cfg
}

/// Waits for the next message, skipping pongs.
fn next_message(c: &mut Client) -> ClientEvent {
    loop {
        match c.next_event(Some(Duration::from_secs(10))).expect("next event") {
            Some(ClientEvent::Pong(_)) => {}
            Some(ev) => return ev,
            None => panic!("no event within 10 s"),
        }
    }
}

/// Text, a 1 MiB binary message (many TLS records), a ping and a clean close.
fn exchange(mut c: Client) {
    c.send_text("hello over TLS ✓").unwrap();
    assert_eq!(next_message(&mut c), ClientEvent::Text("hello over TLS ✓".into()));
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    c.send_binary(&big).unwrap();
    assert_eq!(next_message(&mut c), ClientEvent::Binary(big));
    c.ping(b"p").unwrap();
    match c.next_event(Some(Duration::from_secs(10))).unwrap() {
        Some(ClientEvent::Pong(p)) => assert_eq!(p, b"p"),
        other => panic!("expected the pong, got {other:?}"),
    }
    c.close(1000, "done").unwrap();
    loop {
        match c.next_event(Some(Duration::from_secs(10))) {
            Ok(Some(ClientEvent::Closed { code, .. })) => {
                assert_eq!(code, 1000);
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("close: {e}"),
        }
    }
}

#[test]
fn our_client_and_server_over_tls_1_3_and_1_2() {
    let server = tls_server(&[]);
    // TLS 1.3 (the default), by name and by IP address (both in the certificate).
    for host in ["localhost", "127.0.0.1"] {
        let c = Client::connect(&wss(&server, host), trusting_client()).unwrap_or_else(|e| panic!("{host}: {e}"));
        exchange(c);
    }
    // TLS 1.2 only.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&certs().ca).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg = ClientConfig::default();
    cfg.tls = Some(ClientTls::from_rustls(Arc::new(tls12)));
    exchange(Client::connect(&wss(&server, "localhost"), cfg).expect("TLS 1.2"));
}

/// permessage-deflate over `wss://`: agreed, and a large text message goes out and comes back
/// compressed inside the TLS records, intact.
#[cfg(feature = "deflate")]
#[test]
fn permessage_deflate_over_tls() {
    let server = tls_server(&[]);
    let mut c = Client::connect(&wss(&server, "localhost"), trusting_client()).expect("connect");
    let agreed = c.deflate().expect("the server agreed to permessage-deflate over TLS");
    assert!(!agreed.recv_context_takeover);
    let text = "a line of text that repeats, over TLS; ".repeat(4096);
    c.send_text(&text).unwrap();
    match next_message(&mut c) {
        ClientEvent::Text(t) => assert!(t == text, "the echo differs from what was sent"),
        other => panic!("expected the echo, got {other:?}"),
    }
    let stats = c.deflate_stats();
    assert_eq!(stats.compressed_in, text.len() as u64, "sent compressed");
    assert_eq!(stats.inflated_out, text.len() as u64, "the echo came compressed");
    assert!(stats.inflated_in * 20 < text.len() as u64, "{stats:?}");
    c.close(1000, "done").unwrap();
}

#[test]
fn certificate_problems_are_one_readable_error() {
    let server = tls_server(&[]);
    assert!(ClientTls::with_ca_pem(b"no PEM here").is_err());
    let other = certs::make(&target_dir().join(format!("tls-test-other-ca-{}", std::process::id())));
    let mut cfg_other = ClientConfig::default();
    cfg_other.tls = Some(ClientTls::with_ca_file(&other.ca).unwrap());
    let e = Client::connect(&wss(&server, "localhost"), cfg_other).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Tls {
                error: TlsError::NotTrusted,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.ends_with("failed: certificate not trusted (unknown issuer)"),
        "{msg}"
    );
    assert!(!msg.contains("--ca"), "no command-line advice in the library: {msg}");
    // A certificate for another name.
    let elsewhere = certs::make_for(
        &target_dir().join(format!("tls-test-elsewhere-{}", std::process::id())),
        &["example.test"],
    );
    let other_server = spawn_server(&["--tls-cert", path(&elsewhere.cert), "--tls-key", path(&elsewhere.key)]);
    let mut cfg = ClientConfig::default();
    cfg.tls = Some(ClientTls::with_ca_file(&elsewhere.ca).unwrap());
    let e = Client::connect(&wss(&other_server, "localhost"), cfg).unwrap_err();
    match &e {
        ClientError::Tls {
            error: TlsError::NameMismatch { expected, presented },
            ..
        } => {
            assert_eq!(expected, "localhost");
            assert_eq!(presented, &["example.test".to_string()]);
        }
        e => panic!("expected a name mismatch, got {e:?}"),
    }
    assert!(
        e.to_string()
            .ends_with("name does not match: localhost (the certificate is for example.test)"),
        "{e}"
    );
    // --insecure's config accepts it.
    let mut cfg = ClientConfig::default();
    cfg.tls = Some(ClientTls::insecure());
    exchange(Client::connect(&wss(&server, "localhost"), cfg).expect("insecure"));
    // wss:// to a plain server.
    let plain = spawn_server(&[]);
    let e = Client::connect(&format!("wss://127.0.0.1:{}/", plain.addr.port()), trusting_client()).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Tls {
                error: TlsError::NotTls,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("does not speak TLS"), "{e}");
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsloop"));
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run wsloop")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cli_client_and_bench_over_tls() {
    let server = tls_server(&[]);
    let url = wss(&server, "localhost");
    let ca = path(&certs().ca);
    let o = run(
        &[
            "client", &url, "--ca", ca, "--count", "2", "--every", "50ms", "--log", "off",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "how are you?\nhow are you?\n");

    let o = run(&["client", &url, "--insecure", "--count", "1", "--log", "off"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--insecure: the server's certificate is not verified"),
        "{}",
        stderr(&o)
    );

    // Without --ca, the system bundle (here: a file holding another CA) does not trust it.
    let other = certs::make(&target_dir().join(format!("tls-test-cli-other-{}", std::process::id())));
    let o = run(&["client", &url, "--count", "1"], &[("SSL_CERT_FILE", path(&other.ca))]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.starts_with("wsloop: TLS handshake with 127.0.0.1:"), "{err}");
    assert!(
        err.contains("certificate not trusted (unknown issuer) (--ca FILE trusts a private CA"),
        "{err}"
    );

    let o = run(&["client", &url, "--ca", "/nonexistent/ca.pem"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).starts_with("wsloop: cannot read CA file /nonexistent/ca.pem"),
        "{}",
        stderr(&o)
    );
    let o = run(&["client", &url, "--ca", ca, "--insecure"], &[]);
    assert!(stderr(&o).contains("exclude each other"), "{}", stderr(&o));

    let o = run(
        &[
            "bench",
            &url,
            "--ca",
            ca,
            "--connections",
            "50",
            "--inflight",
            "4",
            "--duration",
            "1s",
            "--json",
            "--quiet",
        ],
        &[],
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    assert_eq!(report["held"], 50, "{report}");
    assert!(report["received"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["corrupted"], 0, "{report}");
    assert_eq!(report["url"], url.as_str(), "{report}");

    // The open model over wss://, with compression: 400 messages a second for 2 s over 20
    // connections, sent on schedule and all echoed.
    let o = run(
        &[
            "bench",
            &url,
            "--ca",
            ca,
            "--connections",
            "20",
            "--rate",
            "400",
            "--deflate",
            "--duration",
            "2s",
            "--json",
            "--quiet",
        ],
        &[],
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    assert_eq!(report["mode"], "rate", "{report}");
    assert_eq!(report["held"], 20, "{report}");
    assert_eq!(report["deflate"]["agreed"], 20, "{report}");
    let achieved = report["schedule"]["achieved"].as_f64().expect("achieved rate");
    assert!((360.0..=440.0).contains(&achieved), "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["corrupted"], 0, "{report}");
    assert_eq!(report["received"], report["sent"], "{report}");
}

/// TLS across processes: `serve --processes 2` serves wss:// from both workers, and a bench
/// split over forked processes (past a low open-file limit) hands the TLS settings to each.
#[test]
fn a_split_bench_speaks_tls_to_a_server_of_two_processes() {
    let server = tls_server(&["--processes", "2"]);
    let url = wss(&server, "localhost");
    let o = Command::new("sh")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_wsloop"))
        .args(["bench", &url, "--ca", path(&certs().ca), "--connections", "300"])
        .args(["--inflight", "1", "--duration", "1s", "--json", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .expect("run wsloop bench under ulimit");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("bench JSON");
    assert_eq!(report["bench_processes"], 2, "{report}");
    assert_eq!(report["held"], 300, "{report}");
    assert_eq!(report["handshake_failures"], 0, "{report}");
    assert!(report["received"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["clean"], true, "{report}");
}

#[test]
fn serve_names_the_bad_certificate_file_in_one_line() {
    let c = certs();
    let garbage = target_dir().join(format!("tls-test-garbage-{}.pem", std::process::id()));
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--tls-cert", "/nonexistent/cert.pem", "--tls-key", path(&c.key)],
            "wsloop: cannot read certificate file /nonexistent/cert.pem: ",
        ),
        (
            &["--tls-cert", path(&c.cert), "--tls-key", "/nonexistent/key.pem"],
            "wsloop: cannot read key file /nonexistent/key.pem: ",
        ),
        (
            &["--tls-cert", path(&garbage), "--tls-key", path(&c.key)],
            "no certificate",
        ),
        (
            &["--tls-cert", path(&c.cert), "--tls-key", path(&c.other_key)],
            "is not the key of the certificate in",
        ),
        (&["--tls-cert", path(&c.cert)], "wsloop: --tls-cert needs --tls-key"),
    ];
    for (args, want) in cases {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let started = Instant::now();
        let o = run(&all, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // A key file holding a certificate only.
    let o = run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            path(&c.cert),
            "--tls-key",
            path(&c.cert),
        ],
        &[],
    );
    assert!(stderr(&o).contains("no usable PEM private key"), "{}", stderr(&o));
}

/// Reads until the peer closes (or `limit` passes); returns what came and how long it took.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "no close within {limit:?} ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (got, started.elapsed())
}

/// The server still completes a wss:// exchange.
fn still_serving(server: &ServerProcess) {
    let mut c = Client::connect(&wss(server, "localhost"), trusting_client()).expect("still serving");
    c.send_text("still here").unwrap();
    assert_eq!(next_message(&mut c), ClientEvent::Text("still here".into()));
}

/// A rustls client configuration trusting the test CA.
fn trusting_rustls() -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&certs().ca).unwrap() {
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

/// A real ClientHello, as rustls's client sends it.
fn client_hello() -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    assert!(hello.len() > 100 && hello[0] == 22, "a handshake record");
    hello
}

#[test]
fn bad_input_on_the_tls_port_gets_a_clean_close() {
    let server = tls_server(&["--handshake-timeout", "1s"]);
    let addr: SocketAddr = server.addr;

    // Plain HTTP: told in HTTP that this port speaks TLS, then closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("use https:// or wss://"), "{text}");
    assert!(took < Duration::from_millis(900), "took {took:?}");
    still_serving(&server);

    // Garbage instead of a ClientHello: a TLS alert at most, then the close.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.is_empty() || got[0] == 21, "an alert record or nothing: {got:?}");
    assert!(took < Duration::from_millis(900), "took {took:?}");
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    let (_, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(took < Duration::from_millis(900), "took {took:?}");
    still_serving(&server);

    // Stalled handshakes: nothing at all, or half a ClientHello; both end at the 1 s timeout.
    let hello = client_hello();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    let started = Instant::now();
    for s in [&mut silent, &mut half] {
        let (got, _) = read_to_close(s, Duration::from_secs(5));
        assert!(got.is_empty(), "{got:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(3),
            "took {took:?}"
        );
    }
    // A complete TLS handshake but no HTTP request: the same timeout.
    let conn = rustls::ClientConnection::new(trusting_rustls(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    let started = Instant::now();
    tls.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        other => panic!("expected the close, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    still_serving(&server);
    assert!(server.stderr().contains("handshake timeout"), "{}", server.stderr());
}

#[test]
fn a_client_hello_on_the_plain_port_gets_400_promptly() {
    let server = spawn_server(&[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(&client_hello()).unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(took < Duration::from_millis(900), "took {took:?}");
    let mut c = Client::connect(&format!("ws://{}/", server.addr), ClientConfig::default()).unwrap();
    c.send_text("plain still works").unwrap();
    assert_eq!(next_message(&mut c), ClientEvent::Text("plain still works".into()));
}

/// Runs `program script URL MODE` with `envs` against a TLS server; asserts the script's checks.
fn run_interop(program: &Path, script: &Path, envs: &[(&str, &str)]) {
    let server = tls_server(&[]);
    let url = wss(&server, "localhost");
    let started = Instant::now();
    let mut cmd = Command::new(program);
    cmd.arg(script)
        .arg(&url)
        .arg("echo")
        .current_dir(script.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    let t_out = drain_lines(child.stdout.take().unwrap(), Arc::clone(&out), None);
    let t_err = drain_lines(child.stderr.take().unwrap(), Arc::clone(&err), None);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = (t_out.join(), t_err.join());
    let (out, err) = (out.lock().unwrap().clone(), err.lock().unwrap().clone());
    let report = format!(
        "{} {url}: {status:?}\n--- stdout ---\n{out}--- stderr ---\n{}\n--- wsloop ---\n{}",
        script.display(),
        tail(&err, 8192),
        tail(&server.stderr(), 8192)
    );
    assert!(status.is_some_and(|s| s.success()), "{report}");
    for check in INTEROP_CHECKS {
        assert!(out.lines().any(|l| l == check), "missing `{check}`\n{report}");
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_websockets_over_tls() {
    let check = "import websockets, sys; sys.exit(websockets.version.version != '15.0.1')";
    let Some(venv) = python_venv("interop-venv", "websockets==15.0.1", |venv| {
        runs_ok(Command::new(venv_python(venv)).args(["-c", check]))
    }) else {
        return;
    };
    // Python's default SSL context (which websockets uses for wss://) trusts SSL_CERT_FILE.
    run_interop(
        &venv_python(&venv),
        &root().join("tests/py/interop_client.py"),
        &[("SSL_CERT_FILE", path(&certs().ca))],
    );
}

#[test]
fn node_ws_over_tls() {
    if !require_tool("node", runs_ok(Command::new("node").arg("--version"))) {
        return;
    }
    let ws = root().join("tests/js/node_modules/ws/package.json").is_file();
    if !require_tool("the npm package ws (run `npm ci` in tests/js)", ws) {
        return;
    }
    run_interop(
        Path::new("node"),
        &root().join("tests/js/interop.mjs"),
        &[("NODE_EXTRA_CA_CERTS", path(&certs().ca))],
    );
}

/// A `wss://` server for one connection, made of rustls and a few lines of WebSocket: it
/// answers the upgrade, takes part in the close handshake (closing first with `1001` when
/// `server_closes`), sends its close_notify, ends its side, and reads on to see how the
/// client's TLS stream ends: `Ok` when with close_notify (rustls reads a clean end), the error
/// otherwise (rustls reads an unexpected EOF).
fn close_notify_server(server_closes: bool) -> (u16, thread::JoinHandle<Result<(), String>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<_> = CertificateDer::pem_file_iter(&certs().cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&certs().key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve = move || -> Result<(), String> {
        let e = |what: &str| {
            let what = what.to_string();
            move |err: std::io::Error| format!("{what}: {err}")
        };
        let (tcp, _) = listener.accept().map_err(e("accept"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ServerConnection::new(Arc::new(cfg)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).map_err(e("the request"))?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .ok_or("no key")?;
        let accept = wsloop::proto::handshake::accept_key(key.trim().as_bytes());
        write!(
            tls,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .map_err(e("the answer"))?;
        if server_closes {
            tls.write_all(&[0x88, 2, 0x03, 0xE9]).map_err(e("the close"))?;
        }
        // The client's close frame, masked.
        let mut frame = [0u8; 2];
        tls.read_exact(&mut frame).map_err(e("the client's close"))?;
        if frame[0] != 0x88 || frame[1] & 0x80 == 0 || frame[1] & 0x7f > 125 {
            return Err(format!("not a masked close frame: {frame:?}"));
        }
        let mut rest = vec![0u8; 4 + usize::from(frame[1] & 0x7f)];
        tls.read_exact(&mut rest).map_err(e("the client's close"))?;
        if !server_closes {
            tls.write_all(&[0x88, 2, 0x03, 0xE8]).map_err(e("the close reply"))?;
        }
        // The server ends the TCP connection first (RFC 6455 §7.1.1), with close_notify.
        tls.conn.send_close_notify();
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut tls.sock).map_err(e("close_notify"))?;
        }
        tls.sock.shutdown(std::net::Shutdown::Write).map_err(e("FIN"))?;
        let mut after = [0u8; 64];
        match tls.read(&mut after) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("{n} bytes after the close frame")),
            Err(err) => Err(format!("the client's stream ended without close_notify: {err}")),
        }
    };
    (port, thread::spawn(serve))
}

#[test]
fn our_client_ends_its_tls_stream_with_close_notify() {
    for server_closes in [false, true] {
        let (port, server) = close_notify_server(server_closes);
        let mut c = Client::connect(&format!("wss://localhost:{port}/"), trusting_client()).expect("connect");
        if !server_closes {
            c.close(1000, "").unwrap();
        }
        let want = if server_closes { 1001 } else { 1000 };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no close");
            match c.next_event(Some(Duration::from_secs(1))) {
                Ok(Some(ClientEvent::Closed { code, .. })) => {
                    assert_eq!(code, want);
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("server_closes {server_closes}: {e}"),
            }
        }
        let seen = server.join().unwrap();
        assert_eq!(seen, Ok(()), "server_closes {server_closes}");
    }
}

#[test]
fn the_load_generator_ends_its_tls_streams_with_close_notify() {
    let (port, server) = close_notify_server(false);
    let o = run(
        &[
            "bench",
            &format!("wss://localhost:{port}/"),
            "--connections",
            "1",
            "--duration",
            "0",
            "--source-ips",
            "127.0.0.1",
            "--ca",
            path(&certs().ca),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.join().unwrap(), Ok(()));
}

/// A self-signed certificate for `localhost` made as docs/tls.md shows (`openssl req -x509`,
/// which marks it `CA:TRUE`): its certificate and key files, or `None` (said loudly) when
/// openssl is missing outside CI.
fn openssl_self_signed(dir: &Path, name: &str) -> Option<(PathBuf, PathBuf)> {
    if !require_tool("openssl", runs_ok(Command::new("openssl").arg("version"))) {
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-days",
            "365",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    Some((cert, key))
}

fn bench_json(url: &str, ca: &str) -> (Output, serde_json::Value) {
    let o = run(
        &[
            "bench",
            url,
            "--ca",
            ca,
            "--connections",
            "10",
            "--inflight",
            "2",
            "--duration",
            "1s",
            "--json",
            "--quiet",
        ],
        &[],
    );
    let report = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("bench JSON: {e}\n{}", String::from_utf8_lossy(&o.stdout)));
    (o, report)
}

#[test]
fn an_openssl_self_signed_certificate_given_with_ca_is_trusted_as_itself() {
    let dir = target_dir().join(format!("tls-openssl-{}", std::process::id()));
    let Some((cert, key)) = openssl_self_signed(&dir, "server") else {
        return;
    };
    let (other, _) = openssl_self_signed(&dir, "other").expect("openssl is there");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
        "the certificate this test is about carries CA:TRUE"
    );
    let server = spawn_server(&["--tls-cert", path(&cert), "--tls-key", path(&key)]);
    let url = wss(&server, "localhost");

    // Trusted: the library, the command-line client and the load generator.
    let mut cfg = ClientConfig::default();
    cfg.tls = Some(ClientTls::with_ca_file(&cert).unwrap());
    exchange(Client::connect(&url, cfg.clone()).expect("the certificate given with --ca is trusted"));
    let o = run(
        &[
            "client",
            &url,
            "--ca",
            path(&cert),
            "-1",
            "--send",
            "over openssl's cert",
            "-q",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "over openssl's cert\n");
    let (o, report) = bench_json(&url, path(&cert));
    assert!(o.status.success(), "{report}\n{}", stderr(&o));
    assert_eq!(report["held"], 10, "{report}");
    assert!(report["received"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["first_error"], serde_json::Value::Null, "{report}");

    // The name is still checked: the certificate is for localhost, not 127.0.0.1.
    let by_ip = wss(&server, "127.0.0.1");
    match Client::connect(&by_ip, cfg).unwrap_err() {
        ClientError::Tls {
            error: TlsError::NameMismatch { expected, presented },
            ..
        } => {
            assert_eq!(expected, "127.0.0.1");
            assert_eq!(presented, ["localhost"]);
        }
        e => panic!("expected a name mismatch, got {e:?}"),
    }
    let o = run(&["client", &by_ip, "--ca", path(&cert), "-1"], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("failed: name does not match: 127.0.0.1 (the certificate is for localhost)"),
        "{}",
        stderr(&o)
    );

    // Another self-signed certificate for the same name is not trusted.
    let mut cfg = ClientConfig::default();
    cfg.tls = Some(ClientTls::with_ca_file(&other).unwrap());
    let e = Client::connect(&url, cfg).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Tls {
                error: TlsError::NotTrusted,
                ..
            }
        ),
        "{e:?}"
    );
    let o = run(&["client", &url, "--ca", path(&other), "-1"], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("certificate not trusted (unknown issuer)"),
        "{}",
        stderr(&o)
    );
    let (o, report) = bench_json(&url, path(&other));
    assert!(!o.status.success(), "{report}");
    assert_eq!(report["held"], 0, "{report}");
    assert_eq!(
        report["first_error"], "handshake: certificate not trusted (unknown issuer)",
        "{report}"
    );
    let all = format!("{report}{}", String::from_utf8_lossy(&o.stdout));
    for debug in ["Os {", "InvalidCertificate", "CaUsedAsEndEntity", "UnknownIssuer"] {
        assert!(!all.contains(debug), "{debug} in {all}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A self-signed CA:TRUE certificate trusted as itself is still checked for its dates.
#[test]
fn a_certificate_trusted_as_itself_must_be_within_its_validity() {
    use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, IsCa, KeyPair};
    for (from, until, want) in [
        ((2001, 1, 1), (2002, 1, 1), TlsError::Expired),
        ((2999, 1, 1), (3000, 1, 1), TlsError::NotValidYet),
    ] {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = target_dir().join(format!("tls-dates-{}-{}", std::process::id(), from.0));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let server = spawn_server(&["--tls-cert", path(&cert_file), "--tls-key", path(&key_file)]);
        let mut cfg = ClientConfig::default();
        cfg.tls = Some(ClientTls::with_ca_pem(cert.pem().as_bytes()).unwrap());
        match Client::connect(&wss(&server, "localhost"), cfg).unwrap_err() {
            ClientError::Tls { error, .. } => assert_eq!(error, want),
            e => panic!("expected {want}, got {e:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
