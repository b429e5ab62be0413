//! `wsloop serve` flags from issue #4: `--mode broadcast`, `--no-echo-self`, `--announce`,
//! `--stats`, the built-in page and `--no-page`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{spawn_server, Tcp};
use tungstenite::{Message as WsMessage, WebSocket};

const WAIT: Duration = Duration::from_secs(10);

fn connect(addr: SocketAddr) -> WebSocket<Tcp> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    tungstenite::client(format!("ws://{addr}/"), Tcp(stream))
        .expect("handshake")
        .0
}

/// A plain HTTP/1.1 GET; returns the whole response.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the response");
    response
}

fn read_text(ws: &mut WebSocket<Tcp>) -> String {
    match ws.read().expect("read") {
        WsMessage::Text(t) => t.as_str().to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn page_is_served_in_every_mode_and_no_page_turns_it_off() {
    for (mode, title) in [
        ("echo", "wsloop echo console"),
        ("reply", "wsloop reply console"),
        ("broadcast", "wsloop chat"),
    ] {
        let server = spawn_server(&["--mode", mode]);
        let page = http_get(server.addr, "/");
        assert!(page.starts_with("HTTP/1.1 200"), "{mode}: {page}");
        assert!(page.contains("text/html"), "{mode}: {page}");
        assert!(page.contains(&format!("<title>{title}</title>")), "{mode}");
        let body = &page[page.find("\r\n\r\n").expect("a head") + 4..];
        assert!(body.len() < 8192, "{mode}: the page is {} bytes", body.len());
        let other = http_get(server.addr, "/favicon.ico");
        assert!(other.starts_with("HTTP/1.1 404"), "{mode}: {other}");
    }
    let server = spawn_server(&["--no-page"]);
    let r = http_get(server.addr, "/");
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
}

#[test]
fn broadcast_mode_with_announce_and_no_echo_self() {
    let server = spawn_server(&["--mode", "broadcast", "--no-echo-self", "--announce"]);
    let mut a = connect(server.addr);
    let a_addr = a.get_ref().0.local_addr().unwrap();
    assert_eq!(read_text(&mut a), format!("* {a_addr} joined (1 online)"));
    let mut b = connect(server.addr);
    let b_addr = b.get_ref().0.local_addr().unwrap();
    assert_eq!(read_text(&mut a), format!("* {b_addr} joined (2 online)"));
    assert_eq!(read_text(&mut b), format!("* {b_addr} joined (2 online)"));

    a.send(WsMessage::text("from a")).unwrap();
    assert_eq!(read_text(&mut b), "from a");
    b.send(WsMessage::text("from b")).unwrap();
    assert_eq!(read_text(&mut a), "from b", "a's own line did not come back");
    drop(b);
    assert_eq!(read_text(&mut a), format!("* {b_addr} left (1 online)"));
}

#[test]
fn broadcast_mode_echoes_to_the_sender_by_default() {
    let server = spawn_server(&["--mode", "broadcast"]);
    let mut a = connect(server.addr);
    let mut b = connect(server.addr);
    a.send(WsMessage::text("hi all")).unwrap();
    assert_eq!(read_text(&mut a), "hi all");
    assert_eq!(read_text(&mut b), "hi all");
}

#[test]
fn broadcast_mode_with_two_threads_reaches_every_peer() {
    let server = spawn_server(&["--mode", "broadcast", "--threads", "2", "--stats", "100ms"]);
    // 32 peers: the kernel spreads them over both loops (all on one: odds of 2^-31).
    let mut peers: Vec<_> = (0..32).map(|_| connect(server.addr)).collect();
    for from in [0, 31] {
        let text = format!("from peer {from}");
        peers[from].send(WsMessage::text(text.clone())).unwrap();
        for (i, p) in peers.iter_mut().enumerate() {
            assert_eq!(read_text(p), text, "peer {i}");
        }
    }
    // One stats line per loop, tagged; both loops hold peers.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let stderr = server.stderr();
        let open = |tag: &str| {
            stderr
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("stats {tag} open=")))
                .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
                .next_back()
        };
        if let (Some(a), Some(b)) = (open("t0"), open("t1")) {
            if a + b == 32 {
                assert!(a > 0 && b > 0, "{a} + {b}");
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stats lines for both loops:\n{stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stats_line_reports_connections_rates_and_rss() {
    let server = spawn_server(&["--mode", "broadcast", "--stats", "200ms"]);
    let mut a = connect(server.addr);
    let mut b = connect(server.addr);
    for i in 0..10 {
        a.send(WsMessage::text(format!("m{i}"))).unwrap();
        assert_eq!(read_text(&mut a), format!("m{i}"));
        assert_eq!(read_text(&mut b), format!("m{i}"));
    }
    // The line covering the burst shows 10 messages in and 20 out.
    let deadline = std::time::Instant::now() + WAIT;
    let line = loop {
        let stderr = server.stderr();
        let busy = stderr
            .lines()
            .find(|l| l.starts_with("stats open=2 ") && !l.contains(" in=0.0/s") && !l.contains(" out=0.0/s"));
        if let Some(line) = busy {
            break line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stats line with traffic:\n{stderr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for field in ["in=", "/s out=", "/s queued=", "B dropped=", "rss="] {
        assert!(line.contains(field), "`{field}` missing from `{line}`");
    }
    let rss: u64 = line
        .rsplit("rss=")
        .next()
        .and_then(|r| r.strip_suffix("KiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no RSS in KiB in `{line}`"));
    assert!(rss > 100, "{line}");
}

#[test]
fn broadcast_flags_need_broadcast_mode() {
    for args in [
        &["--no-echo-self"][..],
        &["--mode", "echo", "--announce"],
        &["--mode", "chat"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run wsloop");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
}
