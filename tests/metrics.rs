//! Metrics (`GET /metrics`, `--metrics-listen`), health (`GET /health`) and draining
//! (`--drain-timeout`): counters that move with traffic, every loop and worker seen by one
//! scrape, the page read by the official Python parser, health 503 while draining.

#[cfg(feature = "tls")]
#[path = "common/certs.rs"]
mod certs;
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tungstenite::Message as TMessage;

type Ws = tungstenite::WebSocket<common::Tcp>;

/// A complete HTTP answer: status, headers (lowercase names), body.
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a new connection; the server closes after answering.
fn get(addr: SocketAddr, path: &str) -> Http {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Http {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Samples of a text-format page: `name{labels}` to value (lines checked for shape).
fn samples(page: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in page.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        m.insert(
            key.to_string(),
            value.parse().unwrap_or_else(|_| panic!("bad value {line:?}")),
        );
    }
    m
}

/// Scrapes `addr` until `ok` holds for the samples (other loops and workers publish every
/// 500 ms), at most 10 s; returns the last page.
fn scrape_until(addr: SocketAddr, path: &str, ok: impl Fn(&BTreeMap<String, f64>) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(addr, path);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        if ok(&samples(&r.body)) {
            return r.body;
        }
        assert!(Instant::now() < deadline, "the metrics never got there:\n{}", r.body);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ws_connect(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/"), common::Tcp(stream)).expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// The address in the `metrics and health on http://ADDR/metrics` line.
fn metrics_addr(server: &common::ServerProcess) -> SocketAddr {
    assert!(
        server.wait_for_stderr("metrics and health on http://", Duration::from_secs(5)),
        "{}",
        server.stderr()
    );
    let err = server.stderr();
    let at = err.find("metrics and health on http://").unwrap() + "metrics and health on http://".len();
    err[at..].split('/').next().unwrap().parse().unwrap()
}

fn sigterm(pid: u32) {
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

/// Echoes `n` messages; returns their payload bytes.
fn echo_some(ws: &mut Ws, n: usize) -> usize {
    let mut bytes = 0;
    for i in 0..n {
        let text = format!("message {i}");
        bytes += text.len();
        ws.send(TMessage::text(text.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), TMessage::text(text));
    }
    bytes
}

#[test]
fn counters_move_with_traffic_closes_and_refusals() {
    let server = common::spawn_server(&["--metrics", "--origin", "http://good.example"]);
    let addr = server.addr;
    // Two connections: one closes normally (1000), one breaks the protocol (1002).
    let mut a = ws_connect(addr);
    let bytes = echo_some(&mut a, 3);
    a.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }))
    .unwrap();
    while a.read().is_ok() {}
    let mut b = ws_connect(addr);
    // FIN, opcode 3 (reserved), masked, no payload.
    b.get_mut().0.write_all(&[0x83, 0x80, 1, 2, 3, 4]).unwrap();
    let code = loop {
        match b.read() {
            Ok(TMessage::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, 1002);
    // A page from a foreign origin is refused with 403.
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/")).unwrap();
    req.headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match tungstenite::client(req, common::Tcp(stream)) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let page = scrape_until(addr, "/metrics", |m| {
        m.get("wsloop_closes_total{code=\"1002\"}") == Some(&1.0) && m.get("wsloop_connections") == Some(&0.0)
    });
    let m = samples(&page);
    assert_eq!(value(&m, "wsloop_messages_received_total"), 3.0, "{page}");
    assert_eq!(value(&m, "wsloop_messages_sent_total"), 3.0, "{page}");
    // Bytes on the connections: the messages with their frame headers (6 bytes each from the
    // client, masked; 2 from the server), the handshakes, the close frames.
    let (read, written) = (
        value(&m, "wsloop_received_bytes_total"),
        value(&m, "wsloop_sent_bytes_total"),
    );
    assert!(read >= (bytes + 3 * 6 + 2 * 100) as f64, "{page}");
    assert!(written >= (bytes + 3 * 2 + 2 * 100) as f64, "{page}");
    assert!(read < (bytes + 3 * 6 + 10_000) as f64, "{page}");
    assert_eq!(value(&m, "wsloop_closes_total{code=\"1000\"}"), 1.0, "{page}");
    assert_eq!(value(&m, "wsloop_closes_total{code=\"1002\"}"), 1.0, "{page}");
    assert_eq!(
        value(&m, "wsloop_handshakes_refused_total{status=\"403\"}"),
        1.0,
        "{page}"
    );
    assert_eq!(value(&m, "wsloop_connections_opened_total"), 2.0, "{page}");
    // Three upgrades and the scrapes so far (each on a connection of its own).
    assert!(value(&m, "wsloop_accepted_total") >= 4.0, "{page}");
    assert!(value(&m, "wsloop_memory_limit_bytes") >= (1 << 20) as f64, "{page}");
    assert!(value(&m, "wsloop_open_fds") >= 3.0, "{page}");
    assert_eq!(value(&m, "wsloop_draining"), 0.0, "{page}");
    // Every sample has its HELP and TYPE, and counters end in _total.
    for line in page.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line[7..].split(' ');
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(page.contains(&format!("# HELP {name} ")), "{name} has no HELP");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
    }
    assert!(!page.contains("cluster"), "no cluster metrics without --cluster");
}

#[test]
fn metrics_listen_serves_metrics_apart_from_the_main_port() {
    let server = common::spawn_server(&["--no-page", "--metrics-listen", "127.0.0.1:0"]);
    let admin = metrics_addr(&server);
    assert_ne!(admin.port(), server.addr.port());
    // Without --metrics the main port has no /metrics: a plain request there gets 426.
    assert_eq!(get(server.addr, "/metrics").status, 426);
    let mut ws = ws_connect(server.addr);
    echo_some(&mut ws, 2);
    scrape_until(admin, "/metrics", |m| {
        m.get("wsloop_connections") == Some(&1.0) && m.get("wsloop_messages_received_total") == Some(&2.0)
    });
    assert_eq!(get(admin, "/health").status, 200);
    assert_eq!(get(admin, "/").status, 404);
    // No upgrade on the metrics listener.
    let stream = TcpStream::connect(admin).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(tungstenite::client(format!("ws://{admin}/"), stream).is_err());
    // With the page, the main port's /metrics is the page's 404.
    let paged = common::spawn_server(&["--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(get(paged.addr, "/metrics").status, 404);
}

#[test]
fn health_is_json_and_always_on() {
    let server = common::spawn_server(&[]);
    let mut ws = ws_connect(server.addr);
    echo_some(&mut ws, 1);
    let r = get(server.addr, "/health");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(j["status"], "ok");
    assert_eq!(j["connections"], 1);
    assert_eq!(j["cluster"], "off");
    assert!(j["uptime_s"].as_u64().is_some(), "{j}");
    assert!(j["memory"].as_u64().is_some(), "{j}");
    assert!(j["memory_limit"].as_u64().unwrap() >= 1 << 20, "{j}");
}

#[test]
fn one_scrape_sees_every_loop() {
    let server = common::spawn_server(&["--metrics", "--threads", "2", "--stats", "100ms"]);
    // The kernel spreads connections over the loops by a hash: connect until both hold some
    // (their stats lines say so), so that a scrape on either must add the other's.
    let open_on = |lp: usize| -> u64 {
        let err = server.stderr();
        let pat = format!("stats t{lp} open=");
        err.rfind(&pat)
            .and_then(|at| err[at + pat.len()..].split(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let mut peers: Vec<Ws> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while peers.len() < 8 || open_on(0) == 0 || open_on(1) == 0 {
        assert!(peers.len() < 64, "64 connections, all on one loop");
        assert!(Instant::now() < deadline, "{}", server.stderr());
        if peers.len() < 8 || open_on(0) + open_on(1) == peers.len() as u64 {
            let mut ws = ws_connect(server.addr);
            echo_some(&mut ws, 1);
            peers.push(ws);
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let n = peers.len() as f64;
    for _ in 0..4 {
        scrape_until(server.addr, "/metrics", |m| {
            m.get("wsloop_connections") == Some(&n) && m.get("wsloop_messages_received_total") == Some(&n)
        });
    }
}

#[test]
fn one_scrape_sees_every_worker() {
    let server = common::spawn_server(&["--metrics", "--processes", "2", "--stats", "200ms"]);
    let mut peers: Vec<Ws> = (0..12).map(|_| ws_connect(server.addr)).collect();
    for ws in &mut peers {
        echo_some(ws, 1);
    }
    // Whichever worker answers, both workers' series are there and add up.
    for _ in 0..4 {
        let page = scrape_until(server.addr, "/metrics", |m| {
            let w1 = m.get("wsloop_connections{worker=\"1\"}").copied().unwrap_or(-1.0);
            let w2 = m.get("wsloop_connections{worker=\"2\"}").copied().unwrap_or(-1.0);
            w1 >= 0.0 && w2 >= 0.0 && w1 + w2 == 12.0
        });
        let m = samples(&page);
        let received: f64 = (1..=2)
            .map(|w| value(&m, &format!("wsloop_messages_received_total{{worker=\"{w}\"}}")))
            .sum();
        assert_eq!(received, 12.0, "{page}");
    }
    // /health counts every worker's connections too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j: serde_json::Value = serde_json::from_str(&get(server.addr, "/health").body).unwrap();
        if j["connections"] == 12 {
            break;
        }
        assert!(Instant::now() < deadline, "health says {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_drains_health_503_no_new_connections_then_1001() {
    let mut server = common::spawn_server(&["--drain-timeout", "2s", "--metrics-listen", "127.0.0.1:0"]);
    let admin = metrics_addr(&server);
    let mut ws = ws_connect(server.addr);
    echo_some(&mut ws, 1);
    assert_eq!(get(admin, "/health").status, 200);
    let t0 = Instant::now();
    sigterm(server.pid());
    // Health turns 503 on the metrics listener, which stays open.
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = get(admin, "/health");
        if r.status == 503 {
            break r;
        }
        assert!(Instant::now() < deadline, "health stayed {}", r.status);
        std::thread::sleep(Duration::from_millis(20));
    };
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(j["status"], "draining");
    let m = samples(&get(admin, "/metrics").body);
    assert_eq!(value(&m, "wsloop_draining"), 1.0);
    // New connections are refused: the listener is closed.
    let refused = TcpStream::connect(server.addr);
    assert!(refused.is_err(), "a new connection was accepted while draining");
    // The open connection goes on working during the drain.
    assert_eq!(echo_some(&mut ws, 2), "message 0message 1".len());
    // Then the drain time is up: close 1001.
    let code = loop {
        match ws.read() {
            Ok(TMessage::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, 1001);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "closed after {waited:?}, before the drain time"
    );
    let _ = ws.flush();
    let deadline = Instant::now() + Duration::from_secs(6);
    let status = loop {
        if let Some(st) = server.child_mut().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "server did not exit after the drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_drain_ends_as_soon_as_the_last_peer_leaves() {
    let mut server = common::spawn_server(&["--drain-timeout", "60s"]);
    let mut ws = ws_connect(server.addr);
    echo_some(&mut ws, 1);
    sigterm(server.pid());
    assert!(
        server.wait_for_stderr("draining", Duration::from_secs(5)),
        "{}",
        server.stderr()
    );
    let t0 = Instant::now();
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = server.child_mut().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "server still draining with no peer left");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_official_python_parser_reads_the_page() {
    let Some(venv) = common::venv::python_venv("prometheus-venv", "prometheus_client==0.26.0", |venv| {
        common::runs_ok(Command::new(common::venv::venv_python(venv)).args(["-c", "import prometheus_client"]))
    }) else {
        return;
    };
    let server = common::spawn_server(&["--metrics"]);
    let mut ws = ws_connect(server.addr);
    let bytes = echo_some(&mut ws, 4);
    let page = scrape_until(server.addr, "/metrics", |m| {
        m.get("wsloop_messages_received_total") == Some(&4.0)
    });
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(out))
"#;
    let mut child = Command::new(common::venv::venv_python(&venv))
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let families: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The parser strips `_total` from a counter family's name, not from its samples.
    let family = |name: &str, kind: &str| {
        let f = &families[name];
        assert_eq!(f["type"], kind, "{name}: {f}");
        f["samples"].as_array().unwrap().clone()
    };
    assert_eq!(family("wsloop_connections", "gauge")[0][2], 1.0);
    let received = family("wsloop_messages_received", "counter");
    assert_eq!(received[0][0], "wsloop_messages_received_total");
    assert_eq!(received[0][2], 4.0);
    let read = family("wsloop_received_bytes", "counter")[0][2].as_f64().unwrap();
    assert!(read >= (bytes + 4 * 6) as f64, "{read}");
    let closes = family("wsloop_closes", "counter");
    assert!(closes.iter().any(|s| s[1]["code"] == "1000"), "{closes:?}");
    let refused = family("wsloop_handshakes_refused", "counter");
    assert!(refused.iter().any(|s| s[1]["status"] == "403"), "{refused:?}");
    for name in [
        "wsloop_queued_bytes",
        "wsloop_memory_bytes",
        "wsloop_memory_limit_bytes",
        "wsloop_open_fds",
    ] {
        family(name, "gauge");
    }
    for name in [
        "wsloop_messages_sent",
        "wsloop_sent_bytes",
        "wsloop_accepted",
        "wsloop_slow_consumer_closes",
        "wsloop_budget_closes",
        "wsloop_dropped_messages",
        "wsloop_tls_handshakes",
        "wsloop_tls_handshake_failures",
    ] {
        family(name, "counter");
    }
}

#[test]
fn the_library_serves_metrics_and_health_on_its_own_listener() {
    let cfg = wsloop::ServerConfig::default()
        .with_metrics_listen("127.0.0.1:0".parse().unwrap())
        .with_drain_timeout(Duration::from_secs(30));
    let server = wsloop::server::Server::bind("127.0.0.1:0", cfg).unwrap();
    let (addr, admin) = (server.local_addr(), server.metrics_addr().expect("a metrics listener"));
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run(wsloop::server::Echo));
    let mut ws = ws_connect(addr);
    echo_some(&mut ws, 5);
    scrape_until(admin, "/metrics", |m| m.get("wsloop_messages_sent_total") == Some(&5.0));
    // A shutdown through the handle drains as SIGTERM does.
    handle.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(admin, "/health").status != 503 {
        assert!(Instant::now() < deadline, "health never turned 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(echo_some(&mut ws, 1), "message 0".len());
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    thread.join().unwrap().unwrap();
}

#[cfg(feature = "cluster")]
#[test]
fn health_is_503_while_a_configured_cluster_is_down() {
    // Nothing listens there: the bus never connects.
    let url = format!("redis://127.0.0.1:{}", common::redis::free_port());
    let server = common::spawn_server(&["--metrics", "--cluster", &url]);
    let r = get(server.addr, "/health");
    assert_eq!(r.status, 503, "{}", r.body);
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (j["status"].as_str(), j["cluster"].as_str()),
        (Some("cluster down"), Some("down"))
    );
    let m = samples(&get(server.addr, "/metrics").body);
    assert_eq!(value(&m, "wsloop_cluster_up"), 0.0);
    // With Redis there, the same server is healthy once the bus is up.
    let Some(redis) = common::redis::RedisServer::start() else {
        return;
    };
    let server = common::spawn_server(&["--metrics", "--cluster", &redis.url()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(server.addr, "/health");
        if r.status == 200 {
            assert!(r.body.contains("\"cluster\":\"up\""), "{}", r.body);
            break;
        }
        assert!(Instant::now() < deadline, "health stayed {}: {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(50));
    }
    scrape_until(server.addr, "/metrics", |m| m.get("wsloop_cluster_up") == Some(&1.0));
}

#[cfg(feature = "tls")]
#[test]
fn tls_handshakes_and_failures_are_counted() {
    let dir = common::target_dir().join(format!("metrics-certs-{}", std::process::id()));
    let c = certs::make(&dir);
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (cert, key) = (path(&c.cert), path(&c.key));
    let server = common::spawn_server(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let admin = metrics_addr(&server);
    let mut cfg = wsloop::client::ClientConfig::default();
    cfg.tls = Some(wsloop::tls::ClientTls::with_ca_file(&c.ca).unwrap());
    for _ in 0..2 {
        let url = format!("wss://localhost:{}/", server.addr.port());
        let mut client = wsloop::client::Client::connect(&url, cfg.clone()).unwrap();
        client.close(1000, "").unwrap();
    }
    // A plain HTTP request on the TLS port is a failed session.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    scrape_until(admin, "/metrics", |m| {
        m.get("wsloop_tls_handshakes_total") == Some(&2.0)
            && m.get("wsloop_tls_handshake_failures_total") == Some(&1.0)
            && m.get("wsloop_connections_opened_total") == Some(&2.0)
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_dashboard_in_the_docs_uses_only_metrics_the_server_has() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let at = doc.find("```json\n{").expect("a dashboard JSON block") + "```json\n".len();
    let json = &doc[at..at + doc[at..].find("\n```").unwrap()];
    let dash: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    let server = common::spawn_server(&["--metrics"]);
    let page = get(server.addr, "/metrics").body;
    let families: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut exprs = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if name.starts_with("wsloop_") {
                    assert!(families.contains(&name), "{name} in {expr:?} is not on the page");
                }
            }
        }
    }
    assert!(exprs >= 12, "{exprs} queries");
}

#[test]
fn workers_drain_when_the_parent_gets_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = common::spawn_server(&["--processes", "2", "--drain-timeout", "2s", "--metrics-listen", &listen]);
    let admin: SocketAddr = listen.parse().unwrap();
    let mut peers: Vec<Ws> = (0..6).map(|_| ws_connect(server.addr)).collect();
    for ws in &mut peers {
        echo_some(ws, 1);
    }
    let t0 = Instant::now();
    sigterm(server.pid());
    // Every worker drains: whichever answers on the shared metrics port says 503.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut draining = 0;
    while draining < 4 {
        assert!(Instant::now() < deadline, "health did not turn 503 on every answer");
        // A refused connection here panics: the listener must stay open while draining.
        let r = get(admin, "/health");
        draining = if r.status == 503 { draining + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(20));
    }
    // The peers still work, then get 1001 once the drain time is up.
    for ws in &mut peers {
        echo_some(ws, 1);
    }
    for ws in &mut peers {
        let code = loop {
            match ws.read() {
                Ok(TMessage::Close(Some(f))) => break u16::from(f.code),
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(code, 1001);
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(1800),
        "closed after {:?}",
        t0.elapsed()
    );
    for ws in &mut peers {
        let _ = ws.flush();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = server.child_mut().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the parent did not exit after the drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}\n{}", server.stderr());
}

#[test]
fn bad_values_are_usage_errors_with_one_line() {
    let bin = env!("CARGO_BIN_EXE_wsloop");
    for (args, want) in [
        (
            &["--metrics-listen", "localhost"][..],
            "invalid --metrics-listen 'localhost'",
        ),
        (&["--drain-timeout", "soon"][..], "invalid duration 'soon'"),
    ] {
        let out = Command::new(bin).arg("serve").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A metrics listener on the main port could not tell its connections apart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = wsloop::ServerConfig::default().with_metrics_listen(addr);
    let e = wsloop::server::Server::bind(addr, cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("port of its own"), "{e}");
}
