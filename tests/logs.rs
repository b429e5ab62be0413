//! `wsloop serve --log debug` message lines, their absence at `info`, and `--log-format json`
//! (every line parsed by a real JSON parser).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::Message as TMessage;

/// A text with characters the preview escapes, and longer than its 32 characters.
const TEXT: &str = "quote \" backslash \\ newline \n and more than thirty-two characters";

/// Opens a connection, echoes `TEXT` and 20 bytes of binary, closes; returns the client's
/// address (the peer the server logs).
fn exchange(addr: SocketAddr) -> SocketAddr {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = stream.local_addr().unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/"), common::Tcp(stream)).expect("handshake");
    ws.send(TMessage::text(TEXT)).unwrap();
    assert_eq!(common::read_text(&mut ws), TEXT);
    let bytes: Vec<u8> = (0..20).collect();
    ws.send(TMessage::binary(bytes.clone())).unwrap();
    loop {
        match ws.read().expect("read") {
            TMessage::Binary(b) => {
                assert_eq!(&b[..], &bytes[..]);
                break;
            }
            TMessage::Ping(_) | TMessage::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.close(None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ws.read().is_ok() && Instant::now() < deadline {}
    me
}

fn wait_for(server: &common::ServerProcess, needle: &str) {
    assert!(
        server.wait_for_stderr(needle, Duration::from_secs(10)),
        "no '{needle}' in stderr:\n{}",
        server.stderr()
    );
}

/// The preview of `TEXT`: its first 32 characters, escaped, and `...`.
fn text_preview() -> String {
    let head: String = TEXT.chars().take(32).collect();
    format!("\"{}\"...", head.escape_debug())
}

#[test]
fn debug_logs_each_message_with_direction_size_opcode_and_preview() {
    let server = common::spawn_server(&["--log", "debug"]);
    let me = exchange(server.addr);
    wait_for(&server, &format!("{me} disconnected"));
    let err = server.stderr();
    assert!(err.contains(&format!("DEBUG {me} connected")), "{err}");
    let n = TEXT.len();
    for dir in ["in", "out"] {
        let text = format!("DEBUG {me}: {dir} text {n} B {}", text_preview());
        assert!(err.lines().any(|l| l == text), "no line '{text}' in:\n{err}");
        let binary = format!("DEBUG {me}: {dir} binary 20 B 000102030405060708090a0b0c0d0e0f...");
        assert!(err.lines().any(|l| l == binary), "no line '{binary}' in:\n{err}");
    }
    // Received before sent, one line per message and direction.
    let pos = |s: &str| err.find(s).unwrap_or_else(|| panic!("no '{s}' in:\n{err}"));
    assert!(pos(&format!("{me}: in text")) < pos(&format!("{me}: out text")));
    assert_eq!(err.matches(&format!("{me}: in ")).count(), 2, "{err}");
    assert_eq!(err.matches(&format!("{me}: out ")).count(), 2, "{err}");
}

#[test]
fn info_logs_no_message_lines_and_sums_up_connections() {
    let server = common::spawn_server(&["--log", "info"]);
    let started = Instant::now();
    let me = exchange(server.addr);
    let _ = exchange(server.addr);
    // One line for both connections, 10 s after the first came.
    let summary = "INFO  connections: 0 open; 2 opened and 2 closed in the last 10 s";
    assert!(
        server.wait_for_stderr(summary, Duration::from_secs(20)),
        "no '{summary}' in:\n{}",
        server.stderr()
    );
    assert!(started.elapsed() >= Duration::from_secs(9), "{:?}", started.elapsed());
    let err = server.stderr();
    assert_eq!(err.matches("connections: ").count(), 1, "{err}");
    assert!(!err.contains(&me.to_string()), "a line per connection at info: {err}");
    assert!(!err.contains(" in text") && !err.contains(" out text"), "{err}");
    assert!(!err.contains(" binary ") && !err.contains("DEBUG"), "{err}");
}

#[test]
fn json_format_writes_one_parsable_object_a_line() {
    let server = common::spawn_server(&["--log", "debug", "--log-format", "json", "--stats", "100ms"]);
    let me = exchange(server.addr);
    wait_for(&server, "disconnected");
    wait_for(&server, "wsloop::stats");
    let err = server.stderr();
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let peer = me.to_string();
    for v in &lines {
        let o = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(o.get(key).is_some_and(|x| x.is_string()), "no string '{key}' in {v}");
        }
        assert!(o["pid"].is_u64(), "{v}");
        let ts = o["ts"].as_str().unwrap();
        // 2026-12-06T10:15:45.123Z
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert!(
            ["error", "warn", "info", "debug", "trace"].contains(&o["level"].as_str().unwrap()),
            "{v}"
        );
    }
    let find = |target: &str, msg: &str| {
        lines
            .iter()
            .find(|v| v["target"] == target && v["msg"].as_str().is_some_and(|m| m.starts_with(msg)))
    };
    let listening = find("wsloop::cli::serve", "listening on ").expect("the listening line");
    assert_eq!(listening["level"], "info");
    assert!(listening.get("peer").is_none(), "{listening}");
    let connected = find("wsloop::server::peer", "connected").expect("the connect line");
    assert_eq!(connected["peer"], peer.as_str(), "{connected}");
    assert_eq!(connected["level"], "debug");
    // The escaped preview comes back whole from the parser.
    let incoming = find("wsloop::server::message", "in text").expect("the message line");
    assert_eq!(incoming["peer"], peer.as_str());
    assert_eq!(incoming["level"], "debug");
    assert_eq!(
        incoming["msg"],
        format!("in text {} B {}", TEXT.len(), text_preview()).as_str()
    );
    assert!(
        find("wsloop::server::message", "out binary 20 B 0001").is_some(),
        "{err}"
    );
    let stats = find("wsloop::stats", "stats open=").expect("a stats line");
    assert_eq!(stats["level"], "info");
}

#[test]
fn a_bad_log_format_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(["serve", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid --log-format 'xml' (text or json)"), "{err}");
}
