//! The client: the original demo end to end with the real binary, the library against a
//! tungstenite server, and failures against small hand-made TCP servers. Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::handshake::server::{Request, Response};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode as TOpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message as TMessage, WebSocket};

use wsloop::client::{Client, ClientConfig, ClientError, ClientEvent};
use wsloop::proto::frame::{FrameHeader, OpCode};
use wsloop::proto::handshake::{accept_key, ResponseError};
use wsloop::proto::mask::apply_mask;
use wsloop::proto::ProtocolError;

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers

/// The next event, which must come within [`WAIT`].
fn next(c: &mut Client) -> ClientEvent {
    match c.next_event(Some(WAIT)) {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("no event within {WAIT:?}"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The error that ends the connection, which must come within [`WAIT`] after at most a few events.
fn next_error(c: &mut Client) -> ClientError {
    for _ in 0..8 {
        match c.next_event(Some(WAIT)) {
            Err(e) => return e,
            Ok(Some(ClientEvent::Closed { code, reason })) => panic!("closed cleanly ({code} {reason}), not an error"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("no error within {WAIT:?}"),
        }
    }
    panic!("too many events before the error")
}

fn connect(addr: SocketAddr) -> Client {
    Client::connect(&format!("ws://{addr}/"), ClientConfig::default())
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

fn connect_err(url: &str, cfg: ClientConfig) -> ClientError {
    let started = Instant::now();
    let e = Client::connect(url, cfg).expect_err("connecting should fail");
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    e
}

/// A tungstenite server for one connection, running `f` in a thread.
fn tungstenite_server<F>(f: F) -> (SocketAddr, JoinHandle<()>)
where
    F: FnOnce(WebSocket<TcpStream>) + Send + 'static,
{
    tungstenite_server_hdr(|_req, res| res, f)
}

/// Like [`tungstenite_server`], with `on_request` inspecting the request and shaping the answer.
fn tungstenite_server_hdr<C, F>(on_request: C, f: F) -> (SocketAddr, JoinHandle<()>)
where
    C: FnOnce(&Request, Response) -> Response + Send + 'static,
    F: FnOnce(WebSocket<TcpStream>) + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (addr, serve_tungstenite(listener, on_request, f))
}

fn serve_tungstenite<C, F>(listener: TcpListener, on_request: C, f: F) -> JoinHandle<()>
where
    C: FnOnce(&Request, Response) -> Response + Send + 'static,
    F: FnOnce(WebSocket<TcpStream>) + Send + 'static,
{
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(None);
        #[allow(clippy::result_large_err)] // the error type is tungstenite's
        let callback = |req: &Request, res: Response| Ok(on_request(req, res));
        let ws = tungstenite::accept_hdr_with_config(stream, callback, Some(cfg)).expect("tungstenite handshake");
        f(ws);
    })
}

/// Echoes until the client closes; returns the client's close frame.
fn echo_until_close(ws: &mut WebSocket<TcpStream>) -> Option<CloseFrame> {
    loop {
        match ws.read() {
            Ok(m @ (TMessage::Text(_) | TMessage::Binary(_))) => ws.send(m).expect("echo"),
            Ok(TMessage::Close(frame)) => {
                drain_close(ws);
                return frame;
            }
            Ok(_) => {}
            Err(e) => panic!("server read failed: {e}"),
        }
    }
}

/// Drives a close handshake to its end on the tungstenite side.
fn drain_close(ws: &mut WebSocket<TcpStream>) {
    for _ in 0..100 {
        match ws.read() {
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn join(h: JoinHandle<()>) {
    h.join().expect("the server thread panicked");
}

/// A one-connection TCP server running `f` on the accepted stream.
fn raw_server<F>(f: F) -> (SocketAddr, JoinHandle<()>)
where
    F: FnOnce(TcpStream) + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let h = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        f(stream);
    });
    (addr, h)
}

/// Reads a request head; returns its text.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => panic!("the request head ended early: {:?}", String::from_utf8_lossy(&head)),
        }
    }
    String::from_utf8(head).expect("ASCII head")
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Reads the request and answers `101` with the right accept value; returns the request head.
fn accept(s: &mut TcpStream) -> String {
    let head = read_head(s);
    let key = header(&head, "Sec-WebSocket-Key").expect("a key");
    write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key.as_bytes())
    )
    .expect("write answer");
    head
}

/// A server frame: `first` is the whole first byte (FIN, RSV, opcode); never masked.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// One frame from the client: checks it is masked, returns opcode, FIN, mask key and payload.
fn read_frame(s: &mut TcpStream) -> (OpCode, bool, [u8; 4], Vec<u8>) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let (h, _) = loop {
        s.read_exact(&mut b).expect("a frame header");
        head.push(b[0]);
        if let Some(parsed) = FrameHeader::parse(&head).expect("a valid header") {
            break parsed;
        }
    };
    let key = h.mask.expect("client frames are masked");
    let mut payload = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut payload).expect("the payload");
    apply_mask(&mut payload, key, 0);
    (h.opcode, h.fin, key, payload)
}

fn close_code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Reads until the client ends the TCP connection (or the read timeout).
fn wait_eof(s: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

struct CliRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `wsloop ARGS` with `input` on stdin (or none), killing it after `timeout`.
fn run_cli(args: &[&str], input: Option<&str>, timeout: Duration) -> CliRun {
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    run_cli_with(args, stdin, input, timeout)
}

/// Like [`run_cli`] with the given stdin; `input` is written to it when it is a pipe.
fn run_cli_with(args: &[&str], stdin: Stdio, input: Option<&str>, timeout: Duration) -> CliRun {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wsloop");
    if let Some(input) = input {
        let mut w = child.stdin.take().expect("piped");
        let input = input.to_string();
        thread::spawn(move || {
            let _ = w.write_all(input.as_bytes());
        });
    }
    let read_all = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("piped")));
    let err = read_all(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`wsloop {}` did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                args.join(" "),
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    CliRun {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A local port with nothing listening on it (just released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

// ---------------------------------------------------------------------------------------------
// The command line

#[test]
fn original_demo_prints_five_replies() {
    let server = common::spawn_server(&["--mode", "reply", "--log", "debug"]);
    let url = format!("ws://{}/", server.addr);
    let run = run_cli(&["client", &url, "--every", "50ms", "--count", "5"], None, WAIT);
    assert!(run.status.success(), "exit {}; stderr:\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "fine thank you\n".repeat(5), "stderr:\n{}", run.stderr);
    assert!(
        server.wait_for_stderr("disconnected (1000)", WAIT),
        "the client should close with 1000; server log:\n{}",
        server.stderr()
    );
}

#[test]
fn stdin_lines_are_sent_as_they_come() {
    let server = common::spawn_server(&["--mode", "echo"]);
    let url = format!("ws://{}", server.addr);
    let run = run_cli(
        &["client", &url, "--stdin"],
        Some("one\r\ntwo\n\nlast without newline"),
        WAIT,
    );
    assert!(run.status.success(), "exit {}; stderr:\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "one\ntwo\n\nlast without newline\n");

    let run = run_cli(&["client", &url, "--stdin", "--count", "2"], Some("a\nb\nc\nd\n"), WAIT);
    assert!(run.status.success(), "exit {}; stderr:\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "a\nb\n");

    // epoll cannot watch a regular file or /dev/null; reading them never waits, so the loop
    // reads them directly.
    let path = common::target_dir().join("client-stdin-test.txt");
    std::fs::write(&path, "from\na file\n").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let run = run_cli_with(&["client", &url, "--stdin"], Stdio::from(file), None, WAIT);
    assert!(run.status.success(), "exit {}; stderr:\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "from\na file\n");
    let _ = std::fs::remove_file(&path);
    let run = run_cli(&["client", &url, "--stdin"], None, WAIT);
    assert!(run.status.success(), "exit {}; stderr:\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "");
    // A socket can be read neither without waiting nor through a reopen: a clear refusal.
    let (sock, _other_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let run = run_cli_with(
        &["client", &url, "--stdin"],
        Stdio::from(std::os::fd::OwnedFd::from(sock)),
        None,
        WAIT,
    );
    assert!(!run.status.success());
    assert!(run.stderr.contains("standard input is a socket"), "{}", run.stderr);
}

#[test]
fn cli_failures_are_one_line() {
    let port = free_port();
    let run = run_cli(&["client", &format!("ws://127.0.0.1:{port}/")], None, WAIT);
    assert!(!run.status.success());
    assert_eq!(
        run.stderr.trim_end(),
        format!("wsloop: connection refused to 127.0.0.1:{port}")
    );

    let (addr, h) = raw_server(|mut s| {
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let run = run_cli(&["client", &format!("ws://{addr}/nope")], None, WAIT);
    join(h);
    assert!(!run.status.success());
    assert_eq!(
        run.stderr.trim_end(),
        "wsloop: server refused the upgrade: 404 Not Found"
    );

    if cfg!(feature = "tls") {
        // wss:// to a plain server: one line saying so (tests/tls.rs has the rest).
        let plain = common::spawn_server(&[]);
        let run = run_cli(&["client", &format!("wss://{}/", plain.addr), "--insecure"], None, WAIT);
        assert!(!run.status.success());
        assert!(run.stderr.contains("does not speak TLS"), "{}", run.stderr);
    } else {
        let run = run_cli(&["client", "wss://example.com/"], None, WAIT);
        assert!(!run.status.success());
        assert!(run.stderr.contains("TLS (wss://) is not supported"), "{}", run.stderr);
    }

    // The server closes with 1001 (going away) after 300 ms of silence: a normal close, said
    // in the closing line.
    let server = common::spawn_server(&["--idle-timeout", "300ms"]);
    let url = format!("ws://{}/", server.addr);
    let run = run_cli(&["client", &url, "--every", "10s"], None, WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "how are you?\n");
    assert!(
        run.stderr
            .ends_with("INFO  server closed the connection: 1001 idle timeout\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn reconnect_retries_until_the_server_is_up() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/");
    let starter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(800));
        common::spawn_server(&["--listen", &format!("127.0.0.1:{port}"), "--mode", "reply"])
    });
    let run = run_cli(
        &["client", &url, "--reconnect", "--every", "50ms", "--count", "2"],
        None,
        Duration::from_secs(20),
    );
    let server = starter.join().expect("server started");
    assert!(run.status.success(), "exit {}; stderr:\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "fine thank you\n".repeat(2));
    assert!(
        run.stderr.contains(&format!(
            "connection refused to 127.0.0.1:{port}; reconnecting in 500ms"
        )),
        "{}",
        run.stderr
    );
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// The library against tungstenite

#[test]
fn text_binary_and_16_mib() {
    let (addr, h) = tungstenite_server(|mut ws| {
        let close = echo_until_close(&mut ws).expect("a close frame");
        assert_eq!((u16::from(close.code), close.reason.as_str()), (1000, "done"));
    });
    let mut c = connect(addr);
    assert!(c.is_open());
    c.send_text("hello").unwrap();
    assert_eq!(next(&mut c), ClientEvent::Text("hello".into()));
    c.send_binary(&[0, 1, 2, 255]).unwrap();
    assert_eq!(next(&mut c), ClientEvent::Binary(vec![0, 1, 2, 255]));
    c.send_text("").unwrap();
    assert_eq!(next(&mut c), ClientEvent::Text(String::new()));
    let big: Vec<u8> = (0..16usize << 20).map(|i| (i * 7 % 251) as u8).collect();
    c.send_binary(&big).unwrap();
    assert_eq!(next(&mut c), ClientEvent::Binary(big));
    let text = "κόσμε ".repeat(100_000);
    c.send_text(&text).unwrap();
    assert_eq!(next(&mut c), ClientEvent::Text(text));
    c.close(1000, "done").unwrap();
    assert!(!c.is_open());
    assert!(matches!(c.send_text("late"), Err(ClientError::NotOpen)));
    assert_eq!(
        next(&mut c),
        ClientEvent::Closed {
            code: 1000,
            reason: "done".into()
        }
    );
    assert!(matches!(c.next_event(None), Err(ClientError::NotOpen)));
    join(h);
}

#[test]
fn fragments_both_ways() {
    let (addr, h) = tungstenite_server(|mut ws| {
        for (data, op, fin) in [
            ("frag", TOpCode::Data(Data::Text), false),
            ("men", TOpCode::Data(Data::Continue), false),
            ("ted κ", TOpCode::Data(Data::Continue), true),
        ] {
            ws.send(TMessage::Frame(Frame::message(data.as_bytes().to_vec(), op, fin)))
                .unwrap();
        }
        match ws.read().unwrap() {
            TMessage::Binary(b) => assert_eq!(&b[..], b"abcdef"),
            m => panic!("expected the reassembled binary message, got {m:?}"),
        }
        echo_until_close(&mut ws);
    });
    let mut c = connect(addr);
    assert_eq!(next(&mut c), ClientEvent::Text("fragmented κ".into()));
    c.send_frame(OpCode::Binary, false, b"ab").unwrap();
    c.send_frame(OpCode::Continuation, false, b"").unwrap();
    c.send_frame(OpCode::Continuation, true, b"cdef").unwrap();
    c.close(1000, "").unwrap();
    assert!(matches!(next(&mut c), ClientEvent::Closed { code: 1000, .. }));
    join(h);
}

#[test]
fn pings_both_ways() {
    let (addr, h) = tungstenite_server(|mut ws| {
        ws.send(TMessage::Ping(b"server ping".to_vec().into())).unwrap();
        loop {
            match ws.read().unwrap() {
                TMessage::Pong(p) => {
                    assert_eq!(&p[..], b"server ping");
                    break;
                }
                TMessage::Ping(_) => {} // tungstenite answers on its own
                m => panic!("unexpected {m:?}"),
            }
        }
        ws.send(TMessage::text("pong seen")).unwrap();
        echo_until_close(&mut ws);
    });
    let mut c = connect(addr);
    c.ping(b"client ping").unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next(&mut c));
    }
    got.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        got,
        vec![
            ClientEvent::Pong(b"client ping".to_vec()),
            ClientEvent::Text("pong seen".into())
        ]
    );
    c.close(1000, "").unwrap();
    assert!(matches!(next(&mut c), ClientEvent::Closed { code: 1000, .. }));
    join(h);
}

#[test]
fn close_codes_both_ways() {
    // The client closes with an application code; tungstenite echoes it.
    let (addr, h) = tungstenite_server(|mut ws| {
        let close = echo_until_close(&mut ws).expect("a close frame");
        assert_eq!((u16::from(close.code), close.reason.as_str()), (4000, "bye"));
    });
    let mut c = connect(addr);
    c.close(4000, "bye").unwrap();
    assert_eq!(
        next(&mut c),
        ClientEvent::Closed {
            code: 4000,
            reason: "bye".into()
        }
    );
    join(h);

    // The server closes; the client answers and reports the server's code and reason.
    for (code, reason) in [(1001u16, "going away"), (4001, "server bye"), (1011, "")] {
        let (addr, h) = tungstenite_server(move |mut ws| {
            ws.close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            }))
            .unwrap();
            drain_close(&mut ws);
        });
        let mut c = connect(addr);
        assert_eq!(
            next(&mut c),
            ClientEvent::Closed {
                code,
                reason: reason.into()
            }
        );
        join(h);
    }
}

#[test]
fn subprotocols_and_extra_headers() {
    let (addr, h) = tungstenite_server_hdr(
        |req, mut res| {
            assert_eq!(req.uri().path(), "/chat");
            assert_eq!(req.uri().query(), Some("room=1"));
            assert_eq!(req.headers()["x-test"], "yes");
            assert_eq!(req.headers()["sec-websocket-protocol"], "superchat, chat");
            res.headers_mut()
                .insert("Sec-WebSocket-Protocol", "chat".parse().unwrap());
            res
        },
        |mut ws| {
            echo_until_close(&mut ws);
        },
    );
    let mut cfg = ClientConfig::default();
    cfg.protocols = vec!["superchat".into(), "chat".into()];
    cfg.headers = vec![("X-Test".into(), "yes".into())];
    let mut c = Client::connect(&format!("ws://{addr}/chat?room=1"), cfg).unwrap();
    assert_eq!(c.protocol(), Some("chat"));
    assert_eq!(c.peer_addr(), addr);
    c.close(1000, "").unwrap();
    assert!(matches!(next(&mut c), ClientEvent::Closed { code: 1000, .. }));
    join(h);
}

#[test]
fn timers_and_timeouts() {
    let (addr, h) = tungstenite_server(|mut ws| {
        echo_until_close(&mut ws);
    });
    let mut c = connect(addr);
    let t = Instant::now();
    assert_eq!(c.next_event(Some(Duration::from_millis(30))).unwrap(), None);
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert_eq!(c.next_event(Some(Duration::ZERO)).unwrap(), None);

    let t = Instant::now();
    c.set_timer(Duration::from_millis(50));
    assert_eq!(next(&mut c), ClientEvent::Timer);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // A new timer replaces the old one.
    let t = Instant::now();
    c.set_timer(Duration::from_secs(30));
    c.set_timer(Duration::from_millis(20));
    assert_eq!(next(&mut c), ClientEvent::Timer);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(c.next_event(Some(Duration::from_millis(50))).unwrap(), None);

    // Timers and messages interleave.
    c.set_timer(Duration::from_millis(100));
    c.send_text("x").unwrap();
    assert_eq!(next(&mut c), ClientEvent::Text("x".into()));
    assert_eq!(next(&mut c), ClientEvent::Timer);
    c.close(1000, "").unwrap();
    assert!(matches!(next(&mut c), ClientEvent::Closed { .. }));
    join(h);
}

#[test]
fn a_timer_fires_while_the_server_never_stops_sending() {
    // The server keeps the socket full: every read fills the client's small buffer, so the
    // client always has received bytes left. Its timer must still come between the messages.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let burst: Vec<u8> = (0..640).flat_map(|_| frame(0x81, &[b'x'; 100])).collect();
        let until = Instant::now() + WAIT;
        // Until the client leaves (a write fails) or the bound runs out.
        while Instant::now() < until && s.write_all(&burst).is_ok() {}
    });
    let mut cfg = ClientConfig::default();
    cfg.read_buffer_size = 1024;
    let mut c = Client::connect(&format!("ws://{addr}/"), cfg).expect("connect");
    let t = Instant::now();
    c.set_timer(Duration::from_millis(100));
    let mut messages = 0u32;
    let fired = loop {
        match c.next_event(Some(WAIT)) {
            Ok(Some(ClientEvent::Text(_))) => messages += 1,
            Ok(Some(ClientEvent::Timer)) => break t.elapsed(),
            other => panic!("unexpected {other:?} after {messages} messages"),
        }
        assert!(t.elapsed() < WAIT, "no timer within {WAIT:?} ({messages} messages)");
    };
    assert!(
        fired >= Duration::from_millis(100) && fired < Duration::from_secs(2),
        "the timer fired after {fired:?}, behind {messages} messages"
    );
    assert!(messages > 0, "the server's messages did not arrive before the timer");
    drop(c);
    join(h);
}

#[test]
fn ipv6_and_host_names() {
    // A host name: `localhost` may resolve to ::1 first, where nothing listens; 127.0.0.1 follows.
    let (addr, h) = tungstenite_server(|mut ws| {
        echo_until_close(&mut ws);
    });
    let mut c = Client::connect(&format!("ws://localhost:{}/", addr.port()), ClientConfig::default()).unwrap();
    c.send_text("by name").unwrap();
    assert_eq!(next(&mut c), ClientEvent::Text("by name".into()));
    c.close(1000, "").unwrap();
    assert!(matches!(next(&mut c), ClientEvent::Closed { .. }));
    join(h);

    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here: skipping the [::1] part");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let h = serve_tungstenite(
        listener,
        move |req, res| {
            assert_eq!(req.headers()["host"], format!("[::1]:{port}").as_str());
            res
        },
        |mut ws| {
            echo_until_close(&mut ws);
        },
    );
    let mut c = Client::connect(&format!("ws://[::1]:{port}/"), ClientConfig::default()).unwrap();
    c.send_text("over IPv6").unwrap();
    assert_eq!(next(&mut c), ClientEvent::Text("over IPv6".into()));
    c.close(1000, "").unwrap();
    assert!(matches!(next(&mut c), ClientEvent::Closed { .. }));
    join(h);
}

#[test]
fn fresh_key_per_connection_and_fresh_mask_per_frame() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = thread::spawn(move || {
        let mut keys = Vec::new();
        let mut masks = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let head = accept(&mut s);
            keys.push(header(&head, "Sec-WebSocket-Key").unwrap().to_string());
            for _ in 0..8 {
                let (op, fin, mask, payload) = read_frame(&mut s);
                assert_eq!((op, fin, &payload[..]), (OpCode::Text, true, &b"same text"[..]));
                masks.push(mask);
            }
        }
        (keys, masks)
    });
    for _ in 0..2 {
        let mut c = connect(addr);
        for _ in 0..8 {
            c.send_text("same text").unwrap();
        }
        // Let the bytes go out before the client is dropped.
        let _ = c.next_event(Some(Duration::from_millis(50)));
    }
    let (keys, mut masks) = h.join().unwrap();
    assert_ne!(keys[0], keys[1]);
    for k in &keys {
        assert_eq!(k.len(), 24, "base64 of 16 bytes: {k}");
    }
    masks.sort();
    masks.dedup();
    assert!(masks.len() >= 14, "mask keys repeat: {masks:?}");
}

// ---------------------------------------------------------------------------------------------
// Failures: each a clear error, never a panic or a hang

#[test]
fn refused_port() {
    let port = free_port();
    let e = connect_err(&format!("ws://127.0.0.1:{port}/"), ClientConfig::default());
    assert!(matches!(e, ClientError::Refused(_)), "{e:?}");
    assert_eq!(e.to_string(), format!("connection refused to 127.0.0.1:{port}"));
}

#[test]
fn http_answers_that_are_not_upgrades() {
    for (answer, message) in [
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "server refused the upgrade: 200 OK: hello",
        ),
        (
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            "server refused the upgrade: 404 Not Found",
        ),
        // No reason phrase: the status named all the same.
        (
            "HTTP/1.1 401 \r\nContent-Length: 0\r\n\r\n",
            "server refused the upgrade: 401 Unauthorized",
        ),
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
            "invalid handshake answer: wrong Sec-WebSocket-Accept",
        ),
        ("SSH-2.0-OpenSSH\r\n\r\n", "server answered with something that is not HTTP"),
    ] {
        let (addr, h) = raw_server(move |mut s| {
            read_head(&mut s);
            s.write_all(answer.as_bytes()).unwrap();
            wait_eof(&mut s);
        });
        let e = connect_err(&format!("ws://{addr}/"), ClientConfig::default());
        assert!(matches!(e, ClientError::Handshake(_)), "{e:?}");
        assert_eq!(e.to_string(), message);
        join(h);
    }
    let (addr, h) = raw_server(|mut s| {
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
    });
    let e = connect_err(&format!("ws://{addr}/"), ClientConfig::default());
    assert!(
        matches!(e, ClientError::Handshake(ResponseError::Status { code: 200, .. })),
        "{e:?}"
    );
    join(h);
}

#[test]
fn handshake_cut_short_or_never_answered() {
    let (addr, h) = raw_server(|mut s| {
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 101 Swit").unwrap();
    });
    let e = connect_err(&format!("ws://{addr}/"), ClientConfig::default());
    assert_eq!(
        e.to_string(),
        "handshake failed: the server closed the connection in the middle of its answer"
    );
    join(h);

    let (addr, h) = raw_server(|mut s| {
        read_head(&mut s);
    });
    let e = connect_err(&format!("ws://{addr}/"), ClientConfig::default());
    assert_eq!(
        e.to_string(),
        "handshake failed: the server closed the connection without answering"
    );
    join(h);

    let (addr, h) = raw_server(|mut s| {
        read_head(&mut s);
        wait_eof(&mut s);
    });
    let mut cfg = ClientConfig::default();
    cfg.connect_timeout = Duration::from_millis(300);
    let t = Instant::now();
    let e = connect_err(&format!("ws://{addr}/"), cfg);
    assert!(matches!(e, ClientError::Timeout { handshake: true, .. }), "{e:?}");
    assert_eq!(e.to_string(), format!("no handshake answer from {addr} within 300ms"));
    assert!(t.elapsed() >= Duration::from_millis(300));
    join(h);
}

#[test]
fn server_drops_the_connection() {
    // In the middle of a message.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let f = frame(0x82, &[7u8; 100]);
        s.write_all(&f[..30]).unwrap();
    });
    let mut c = connect(addr);
    let e = next_error(&mut c);
    assert!(matches!(e, ClientError::Abnormal(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "connection closed abnormally (1006): the server dropped the connection mid-message"
    );
    join(h);

    // Between messages, without a close frame: what came before still arrives.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        s.write_all(&frame(0x81, b"last words")).unwrap();
    });
    let mut c = connect(addr);
    assert_eq!(next(&mut c), ClientEvent::Text("last words".into()));
    let e = next_error(&mut c);
    assert_eq!(
        e.to_string(),
        "connection closed abnormally (1006): the server closed the TCP connection without a close frame"
    );
    join(h);

    // Reset while the client waits for the answer to its close.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let (op, _, _, _) = read_frame(&mut s);
        assert_eq!(op, OpCode::Close);
        let _ = s.shutdown(Shutdown::Both);
    });
    let mut c = connect(addr);
    c.close(1000, "").unwrap();
    let e = next_error(&mut c);
    assert!(matches!(e, ClientError::Abnormal(_)), "{e:?}");
    assert!(
        e.to_string().contains("before the server answered the close")
            || e.to_string().ends_with("without answering the close"),
        "{e}"
    );
    join(h);
}

#[test]
fn protocol_errors_close_with_their_code() {
    let masked = {
        let mut f = vec![0x81, 0x80 | 2, 1, 2, 3, 4];
        f.extend_from_slice(&[b'h' ^ 1, b'i' ^ 2]);
        f
    };
    let cases: [(Vec<u8>, ProtocolError); 4] = [
        (masked, ProtocolError::MaskedServerFrame),
        (frame(0x81, &[0xce, 0xba, 0xff]), ProtocolError::InvalidUtf8),
        (frame(0x82, &[0u8; 2000]), ProtocolError::MessageTooBig),
        (frame(0x83, b""), ProtocolError::ReservedOpcode),
    ];
    for (bytes, want) in cases {
        let (code, reason) = (want.code(), want.reason());
        let (addr, h) = raw_server(move |mut s| {
            accept(&mut s);
            s.write_all(&bytes).unwrap();
            let (op, _, _, payload) = read_frame(&mut s);
            assert_eq!((op, close_code_of(&payload)), (OpCode::Close, code));
            // The server answers the close and ends the connection, as a server should.
            s.write_all(&frame(0x88, &code.to_be_bytes())).unwrap();
        });
        let mut cfg = ClientConfig::default();
        cfg.max_message = 1000;
        let mut c = Client::connect(&format!("ws://{addr}/"), cfg).unwrap();
        let e = next_error(&mut c);
        match &e {
            ClientError::Protocol(p) => assert_eq!(*p, want),
            e => panic!("expected a protocol error, got {e:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!("protocol error by the server: {reason} (closed with {code})")
        );
        join(h);
    }
}

#[test]
fn answers_go_out_before_the_close_frame() {
    // A message then a protocol error in one write: the echo still precedes the close (1002).
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let mut bytes = frame(0x81, b"first");
        bytes.extend(frame(0x81 | 0x20, b"bad RSV"));
        bytes.extend(frame(0x89, b"never answered"));
        s.write_all(&bytes).unwrap();
        let (op, _, _, payload) = read_frame(&mut s);
        assert_eq!((op, &payload[..]), (OpCode::Text, &b"first"[..]));
        let (op, _, _, payload) = read_frame(&mut s);
        assert_eq!((op, close_code_of(&payload)), (OpCode::Close, 1002));
    });
    let mut c = connect(addr);
    assert_eq!(next(&mut c), ClientEvent::Text("first".into()));
    c.send_text("first").unwrap();
    assert!(matches!(
        next_error(&mut c),
        ClientError::Protocol(ProtocolError::ReservedBits)
    ));
    join(h);

    // A message, a ping and the server's close in one write: echo, pong, then the close reply.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let mut bytes = frame(0x82, b"data");
        bytes.extend(frame(0x89, b"ping"));
        bytes.extend(frame(0x88, &[0x0f, 0xa0, b'o', b'k']));
        s.write_all(&bytes).unwrap();
        let (op, _, _, payload) = read_frame(&mut s);
        assert_eq!((op, &payload[..]), (OpCode::Binary, &b"data"[..]));
        let (op, _, _, payload) = read_frame(&mut s);
        assert_eq!((op, &payload[..]), (OpCode::Pong, &b"ping"[..]));
        let (op, _, _, payload) = read_frame(&mut s);
        assert_eq!((op, close_code_of(&payload)), (OpCode::Close, 4000));
    });
    let mut c = connect(addr);
    assert_eq!(next(&mut c), ClientEvent::Binary(b"data".to_vec()));
    c.send_binary(b"data").unwrap();
    assert_eq!(
        next(&mut c),
        ClientEvent::Closed {
            code: 4000,
            reason: "ok".into()
        }
    );
    assert!(matches!(c.send_text("too late"), Err(ClientError::NotOpen)));
    join(h);
}

#[test]
fn no_close_answer_times_out() {
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let (op, _, _, _) = read_frame(&mut s);
        assert_eq!(op, OpCode::Close);
        wait_eof(&mut s);
    });
    let mut cfg = ClientConfig::default();
    cfg.close_timeout = Duration::from_millis(200);
    let mut c = Client::connect(&format!("ws://{addr}/"), cfg).unwrap();
    c.close(1000, "").unwrap();
    let e = next_error(&mut c);
    assert_eq!(
        e.to_string(),
        "connection closed abnormally (1006): the server did not answer the close within 200ms"
    );
    join(h);
}

#[test]
fn ctrl_c_closes_cleanly_with_1000_and_exits_0() {
    let server = common::spawn_server(&["--mode", "reply", "--log", "debug"]);
    let url = format!("ws://{}/", server.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(["client", &url, "--every", "50ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wsloop client");
    // Wait for the first reply, so the connection is open.
    let mut out = child.stdout.take().expect("piped");
    let mut first = [0u8; 15];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"fine thank you\n");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "client did not exit after SIGINT");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit {status}");
    assert!(
        server.wait_for_stderr("disconnected (1000)", Duration::from_secs(2)),
        "{}",
        server.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// The probe: -1, -b, -H, -v, pings, exit statuses, piped input

/// Runs `wsloop ARGS` with `stdin`, its output taken as bytes; killed (and failing) after
/// [`WAIT`].
fn run_cli_bytes(args: &[&str], stdin: Stdio) -> (ExitStatus, Vec<u8>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wsloop");
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`wsloop {}` did not finish within {WAIT:?}", args.join(" "));
        }
        thread::sleep(Duration::from_millis(10));
    };
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

#[test]
fn one_message_round_trip_exits_0_with_the_reply() {
    // `--log debug`: the server logs each close's code.
    let server = common::spawn_server(&["--mode", "echo", "--log", "debug"]);
    let url = format!("ws://{}/", server.addr);
    let run = run_cli(&["client", &url, "-1", "--send", "hello probe"], None, WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "hello probe\n");
    assert!(run.stderr.contains("INFO  closed: 1000"), "{}", run.stderr);
    // The first line of stdin, the rest left alone.
    let run = run_cli(&["client", &url, "-1", "-q"], Some("first line\r\nsecond line\n"), WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "first line\n");
    assert_eq!(run.stderr, "");
    assert!(
        server.wait_for_stderr("disconnected (1000)", WAIT),
        "-1 closes with 1000:\n{}",
        server.stderr()
    );
    // A server that answers in its own words: the first message is the reply.
    let server = common::spawn_server(&["--mode", "reply"]);
    let run = run_cli(&["client", &format!("ws://{}/", server.addr), "-1", "-q"], None, WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "fine thank you\n");
    // -1 is one message: a count or a period make no sense with it.
    let run = run_cli(&["client", &url, "-1", "--count", "2"], None, WAIT);
    assert_eq!(run.status.code(), Some(2));
    assert!(run.stderr.contains("-1 sends one message"), "{}", run.stderr);
}

#[test]
fn binary_round_trip_is_byte_exact() {
    let server = common::spawn_server(&["--mode", "echo"]);
    let url = format!("ws://{}/", server.addr);
    // Not UTF-8, with line feeds inside and at the end: one message, back as it went.
    let mut data: Vec<u8> = (0..=255u8).rev().collect();
    data.extend_from_slice(b"\n\xff\xfe\x80 middle\r\n\n");
    data.extend((0..70_000u32).map(|i| (i * 31 % 251) as u8));
    data.push(b'\n');
    let path = common::target_dir().join(format!("client-binary-{}.bin", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    for one in [false, true] {
        let mut args = vec!["client", url.as_str(), "-b", "-q"];
        if one {
            args.push("-1");
        }
        let (status, out, err) = run_cli_bytes(&args, Stdio::from(std::fs::File::open(&path).unwrap()));
        assert_eq!(status.code(), Some(0), "-1: {one}: {err}");
        assert!(
            out == data,
            "-1: {one}: {} bytes back for {} sent",
            out.len(),
            data.len()
        );
        assert_eq!(err, "");
    }
    // From a pipe too.
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(["client", &url, "-b", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent));
    let mut out = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "-b from a pipe did not finish");
        thread::sleep(Duration::from_millis(10));
    };
    writer.join().unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert!(reader.join().unwrap() == data, "the pipe's bytes came back changed");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn headers_and_origin_reach_the_server() {
    // The server sends back what it got: the header's value and the Origin.
    let (addr, h) = raw_server(|mut s| {
        let head = accept(&mut s);
        let answer = format!(
            "{} {}",
            header(&head, "X-Probe").unwrap_or("-"),
            header(&head, "Origin").unwrap_or("-")
        );
        s.write_all(&frame(0x81, answer.as_bytes())).unwrap();
        loop {
            let (op, _, _, payload) = read_frame(&mut s);
            if op == OpCode::Close {
                s.write_all(&frame(0x88, &payload[..2])).unwrap();
                break;
            }
        }
        wait_eof(&mut s);
    });
    let url = format!("ws://{addr}/");
    let run = run_cli(
        &[
            "client",
            &url,
            "-1",
            "-q",
            "-H",
            "X-Probe: 42 and more",
            "--origin",
            "http://origin.example",
        ],
        None,
        WAIT,
    );
    join(h);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "42 and more http://origin.example\n");
    // A malformed header is a usage error that says what is wrong.
    for (bad, why) in [
        ("no colon here", "expected NAME: VALUE"),
        ("Bad Name: x", "the name must be a token"),
        (": empty name", "the name must be a token"),
    ] {
        let run = run_cli(&["client", &url, "-H", bad], None, WAIT);
        assert_eq!(run.status.code(), Some(2), "{bad}");
        assert!(
            run.stderr
                .starts_with(&format!("wsloop: invalid header '{bad}': {why}")),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn verbose_prints_the_request_and_response_heads() {
    let server = common::spawn_server(&["--mode", "echo"]);
    let url = format!("ws://{}/path?q=1", server.addr);
    let run = run_cli(&["client", &url, "-1", "-v", "-q", "-H", "X-Seen: yes"], None, WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    for line in [
        "> GET /path?q=1 HTTP/1.1\n",
        &format!("> Host: {}\n", server.addr),
        "> X-Seen: yes\n",
        "< HTTP/1.1 101 Switching Protocols\n",
        "< Sec-WebSocket-Accept: ",
    ] {
        assert!(run.stderr.contains(line), "{line:?} missing from:\n{}", run.stderr);
    }
    assert_eq!(run.stdout, "how are you?\n");
    // A refused upgrade: its head shown, its status named, exit 3.
    let (addr, h) = raw_server(|mut s| {
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        wait_eof(&mut s);
    });
    let run = run_cli(&["client", &format!("ws://{addr}/"), "-v"], None, WAIT);
    join(h);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("< HTTP/1.1 401 Unauthorized\n< WWW-Authenticate: Bearer\n"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .ends_with("wsloop: server refused the upgrade: 401 Unauthorized\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn ping_every_sends_pings_and_logs_the_pongs() {
    // The server answers two pings, then closes normally.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        let mut pings = 0;
        for _ in 0..20 {
            let (op, _, _, payload) = read_frame(&mut s);
            if op == OpCode::Ping {
                assert_eq!(payload, b"wsloop");
                s.write_all(&frame(0x8A, &payload)).unwrap();
                pings += 1;
                if pings == 2 {
                    break;
                }
            }
        }
        assert_eq!(pings, 2, "two pings within 20 frames");
        s.write_all(&frame(0x88, b"\x03\xe8enough")).unwrap();
        let (op, ..) = read_frame(&mut s);
        assert_eq!(op, OpCode::Close);
        s.shutdown(Shutdown::Both).unwrap();
    });
    let run = run_cli(
        &[
            "client",
            &format!("ws://{addr}/"),
            "--every",
            "10s",
            "--ping-every",
            "50ms",
        ],
        None,
        WAIT,
    );
    join(h);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stderr.matches("INFO  pong in ").count(), 2, "{}", run.stderr);
    assert!(
        run.stderr
            .ends_with("INFO  server closed the connection: 1000 enough\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_abnormal_close_has_its_own_exit_status_and_closing_line() {
    // A close code that is not a normal one: exit 4, the code and reason on stderr.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        read_frame(&mut s);
        s.write_all(&frame(0x88, b"\x0f\xa1gone fishing")).unwrap();
        let (op, ..) = read_frame(&mut s);
        assert_eq!(op, OpCode::Close);
        s.shutdown(Shutdown::Both).unwrap();
    });
    let run = run_cli(&["client", &format!("ws://{addr}/"), "--log", "off"], None, WAIT);
    join(h);
    assert_eq!(run.status.code(), Some(4), "{}", run.stderr);
    assert_eq!(run.stderr, "wsloop: server closed the connection: 4001 gone fishing\n");
    // No close frame at all (1006): exit 4 as well.
    let (addr, h) = raw_server(|mut s| {
        accept(&mut s);
        read_frame(&mut s);
        s.shutdown(Shutdown::Both).unwrap();
    });
    let run = run_cli(&["client", &format!("ws://{addr}/"), "--log", "off"], None, WAIT);
    join(h);
    assert_eq!(run.status.code(), Some(4), "{}", run.stderr);
    assert!(
        run.stderr.starts_with("wsloop: connection closed abnormally (1006): "),
        "{}",
        run.stderr
    );
    // A failed connect is 3, apart from both.
    let run = run_cli(&["client", &format!("ws://127.0.0.1:{}/", free_port())], None, WAIT);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
}

#[test]
fn piped_stdin_sends_its_lines_and_ends() {
    // `echo hi | wsloop client URL`: the line is sent, its reply printed, and the client ends.
    let server = common::spawn_server(&["--mode", "echo"]);
    let url = format!("ws://{}/", server.addr);
    let run = run_cli(&["client", &url], Some("hi\n"), WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "hi\n");
    assert!(run.stderr.contains("INFO  closed: 1000"), "{}", run.stderr);
    // An empty pipe: nothing sent, a clean end.
    let run = run_cli(&["client", &url, "-q"], Some(""), WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    // --send or --every choose the demo whatever stdin is.
    let run = run_cli(
        &["client", &url, "--send", "demo", "--count", "2", "--every", "10ms"],
        Some("ignored\n"),
        WAIT,
    );
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "demo\ndemo\n");
}
