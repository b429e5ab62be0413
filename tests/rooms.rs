//! examples/rooms.rs, run as a user runs it (`--listen`, `--token`), against raw TCP and
//! tungstenite. Python `websockets` (tests/interop.rs) and Chromium (tests/browser.rs) talk to it
//! too.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{example_binary, ServerProcess};
use tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "t0ken";

type Ws = tungstenite::WebSocket<common::Tcp>;

/// `rooms --listen 127.0.0.1:0 --token TOKEN`.
fn spawn_rooms() -> ServerProcess {
    common::spawn_example("rooms", &["--listen", "127.0.0.1:0", "--token", TOKEN])
}

/// The whole HTTP answer to an upgrade request for `target` with `extra` header lines.
fn answer(addr: SocketAddr, target: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    // A refusal ends with the connection; an upgrade goes on after its head.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
        let head_done = got.windows(4).any(|w| w == b"\r\n\r\n");
        if n == 0 || head_done && got.starts_with(b"HTTP/1.1 101") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn status_and_body(answer: &str) -> (&str, &str) {
    let status = answer.split("\r\n").next().unwrap_or("");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body)
}

fn join(addr: SocketAddr, target: &str, bearer: Option<&str>) -> Ws {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}{target}").into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    tungstenite::client(req, common::Tcp(stream)).expect("joined").0
}

fn next_text(ws: &mut Ws) -> String {
    match ws.read().expect("a message") {
        Message::Text(t) => t.to_string(),
        m => panic!("expected text, got {m:?}"),
    }
}

#[test]
fn refusals_carry_their_status_and_reason() {
    let server = spawn_rooms();
    let refused = [
        ("/rooms/a", "", "HTTP/1.1 401 Unauthorized", "missing or wrong token\n"),
        (
            "/rooms/a",
            "Authorization: Bearer nope\r\n",
            "HTTP/1.1 401 Unauthorized",
            "missing or wrong token\n",
        ),
        (
            "/rooms/a?token=t0ke",
            "",
            "HTTP/1.1 401 Unauthorized",
            "missing or wrong token\n",
        ),
        (
            "/rooms/a?token=t0ken&name=no%20spaces",
            "",
            "HTTP/1.1 400 Bad Request",
            "a name is 1 to 32 letters, digits, - or _\n",
        ),
        (
            "/rooms/",
            "Authorization: Bearer t0ken\r\n",
            "HTTP/1.1 404 Not Found",
            "rooms are at /rooms/NAME (letters, digits, - and _)\n",
        ),
        (
            "/rooms/a/b",
            "Authorization: Bearer t0ken\r\n",
            "HTTP/1.1 404 Not Found",
            "rooms are at /rooms/NAME (letters, digits, - and _)\n",
        ),
    ];
    for (target, extra, status, body) in refused {
        let got = answer(server.addr, target, extra);
        assert_eq!(status_and_body(&got), (status, body), "{target} {extra:?}: {got}");
        // A 401 tells how to authenticate.
        let challenge = "\r\nWWW-Authenticate: Bearer realm=\"rooms\"\r\n";
        assert_eq!(got.contains(challenge), status.contains("401"), "{got}");
    }
    let got = answer(server.addr, "/rooms/a", "Authorization: Bearer t0ken\r\n");
    assert!(got.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{got}");
}

#[test]
fn rooms_keep_their_conversations_apart() {
    let server = spawn_rooms();
    let mut alice = join(server.addr, "/rooms/a?name=alice", Some(TOKEN));
    assert_eq!(next_text(&mut alice), "* alice joined a (1 here)");
    let mut bob = join(server.addr, &format!("/rooms/a?name=bob&token={TOKEN}"), None);
    assert_eq!(next_text(&mut bob), "* bob joined a (2 here)");
    assert_eq!(next_text(&mut alice), "* bob joined a (2 here)");
    let mut carol = join(server.addr, "/rooms/b?name=carol", Some(TOKEN));
    assert_eq!(next_text(&mut carol), "* carol joined b (1 here)");
    // Without a name, the member is called by its address.
    let mut anon = join(server.addr, "/rooms/b", Some(TOKEN));
    let addr = anon.get_ref().0.local_addr().unwrap();
    assert_eq!(next_text(&mut anon), format!("* {addr} joined b (2 here)"));
    assert_eq!(next_text(&mut carol), format!("* {addr} joined b (2 here)"));

    alice.send(Message::text("hello a")).unwrap();
    assert_eq!(next_text(&mut bob), "alice: hello a");
    bob.send(Message::text("hi alice")).unwrap();
    assert_eq!(next_text(&mut alice), "bob: hi alice");
    carol.send(Message::text("hello b")).unwrap();
    // Nothing from room a is ahead of carol's line.
    assert_eq!(next_text(&mut anon), "carol: hello b");

    bob.close(None).unwrap();
    while bob.read().is_ok() {}
    assert_eq!(next_text(&mut alice), "* bob left a (1 here)");
    anon.close(None).unwrap();
    while anon.read().is_ok() {}
    assert_eq!(next_text(&mut carol), format!("* {addr} left b (1 here)"));
    drop(server);
}

#[test]
fn usage_errors_exit_2() {
    let rooms = example_binary("rooms");
    for args in [
        &[][..],
        &["--listen", "127.0.0.1:0"][..],
        &["--token"][..],
        &["--bogus", "x"][..],
    ] {
        let out = Command::new(&rooms).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "usage: rooms --token SECRET [--listen ADDR (default 127.0.0.1:9002)]\n"
        );
    }
}
