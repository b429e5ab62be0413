//! The server library as an application uses it: the upgrade decision, per-connection state,
//! timers, `on_start`, pings, topics, and `Handle` from other threads. Each test runs a
//! `Server` with its own handler on a thread of this process and talks to it with tungstenite
//! or raw TCP.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::read_text;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message as TMessage;
use wsloop::proto::frame::{write_frame, FrameHeader, OpCode};
use wsloop::proto::{Answer, Request};
use wsloop::server::{Conn, ConnId, Ctx, Handle, HandleError, Handler, Server, ServerConfig, Timer, TimerId, Upgrade};
use wsloop::Message;

const WAIT: Duration = Duration::from_secs(10);

type Ws = tungstenite::WebSocket<common::Tcp>;

/// A server running `handler` on a thread.
struct Running {
    addr: SocketAddr,
    handle: Handle,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Running {
    fn start<H: Handler + Send + 'static>(cfg: ServerConfig, handler: H) -> Running {
        let server = Server::bind("127.0.0.1:0", cfg).expect("bind");
        Running::run(server, handler)
    }

    fn run<H: Handler + Send + 'static>(server: Server, handler: H) -> Running {
        let addr = server.local_addr();
        let handle = server.handle();
        let thread = Some(thread::spawn(move || server.run(handler)));
        Running { addr, handle, thread }
    }

    /// Shuts the server down and waits for `run` to return.
    fn stop(mut self) {
        self.handle.shutdown().expect("the server is running");
        let t = self.thread.take().expect("running");
        t.join().expect("the loop panicked").expect("run failed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.handle.shutdown();
            let _ = t.join();
        }
    }
}

/// A shared event log that handlers write to and tests read.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// Waits until some entry satisfies `f`.
    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !self.get().iter().any(|e| f(e)) {
            assert!(Instant::now() < deadline, "no `{what}` in the log: {:?}", self.get());
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[allow(clippy::result_large_err)] // the error type is tungstenite's
fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        req.headers_mut().append(name, value.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    tungstenite::client(req, common::Tcp(stream)).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
    })
}

fn connect(addr: SocketAddr, path: &str) -> Ws {
    connect_with(addr, path, &[]).expect("handshake").0
}

/// Sends `request` on a raw socket and reads the whole answer (the server closes after it).
fn raw_http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8(got).expect("an HTTP answer is text here")
}

fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

// ---------------------------------------------------------------------------------------------
// The upgrade decision

/// Accepts `Authorization: Bearer s3cret` or `?token=s3cret`; logs what it saw of the request.
struct Gate {
    log: Log,
}

#[derive(Default)]
struct User {
    name: String,
    messages: u32,
}

impl Handler for Gate {
    type State = User;

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, User>, up: &mut Upgrade<'_>) -> Result<User, Answer> {
        let req = up.request();
        self.log.push(format!(
            "upgrade {} {} peer={} cookie={:?} xff={:?}",
            req.method(),
            req.path(),
            up.peer_addr().ip(),
            req.header_str("cookie"),
            req.header_str("x-forwarded-for"),
        ));
        let bearer = req.header_str("authorization").and_then(|v| v.strip_prefix("Bearer "));
        if bearer.or(req.query_param("token")) != Some("s3cret") {
            return Err(Answer::reject(401, "a valid token is needed"));
        }
        if req.path_only() != "/chat" {
            return Err(Answer::reject(404, "no such place"));
        }
        // The subprotocol: the client's last offer, whatever the configured preference.
        let last = req.protocols().last().map(String::from);
        up.set_protocol(last.as_deref());
        Ok(User {
            name: req.query_param("name").unwrap_or("anonymous").to_string(),
            messages: 0,
        })
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, User>, conn: &mut Conn<User>) {
        let line = format!("hello {} {}", conn.state.name, conn.id().as_u64());
        let _ = ctx.send_text(conn.id(), &line);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, User>, conn: &mut Conn<User>, msg: Message<'_>) {
        // `peek ID`: another connection's state, reached through the context.
        if let Message::Text(t) = msg {
            if let Some(id) = t.strip_prefix("peek ") {
                let target = ctx.peers().map(|(c, _)| c).find(|c| c.as_u64().to_string() == id);
                let seen = target
                    .and_then(|c| ctx.state_of(c))
                    .map_or("none".to_string(), |u| format!("{} sent {}", u.name, u.messages));
                let own = ctx.state_of(conn.id()).is_some();
                let _ = ctx.send_text(conn.id(), &format!("{seen}; own state through ctx: {own}"));
                return;
            }
        }
        conn.state.messages += 1;
        let _ = ctx.send_text(conn.id(), &format!("{} #{}", conn.state.name, conn.state.messages));
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_, User>, conn: &mut Conn<User>, code: u16, _reason: &str) {
        self.log.push(format!(
            "close {} after {} message(s) with {code}",
            conn.state.name, conn.state.messages
        ));
    }
}

/// `hello NAME ID` → ID.
fn greeting_id(line: &str, name: &str) -> String {
    let rest = line
        .strip_prefix(&format!("hello {name} "))
        .unwrap_or_else(|| panic!("{line}"));
    rest.to_string()
}

/// Closes without a status code (the server's `on_close` sees 1005) and reads to the end.
fn close_and_drain(ws: &mut Ws) {
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
}

#[test]
fn upgrade_refused_with_401_and_its_body() {
    let log = Log::default();
    let server = Running::start(ServerConfig::default(), Gate { log: log.clone() });

    let answer = raw_http(
        server.addr,
        &upgrade_request(
            "/chat?room=1",
            "Cookie: session=abc\r\nX-Forwarded-For: 203.0.113.7\r\nAuthorization: Bearer wrong\r\n",
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\na valid token is needed\n"), "{answer}");
    assert!(answer.contains("Content-Length: 24\r\n"), "{answer}");
    assert_eq!(
        log.get(),
        ["upgrade GET /chat?room=1 peer=127.0.0.1 cookie=Some(\"session=abc\") xff=Some(\"203.0.113.7\")"]
    );

    let answer = raw_http(server.addr, &upgrade_request("/elsewhere?token=s3cret", ""));
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert!(answer.ends_with("no such place\n"), "{answer}");

    // tungstenite sees the status and the body too.
    match connect_with(server.addr, "/chat", &[]) {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            assert_eq!(resp.body().as_deref(), Some(&b"a valid token is needed\n"[..]));
        }
        other => panic!("expected a 401, got {:?}", other.map(|(_, r)| r.status())),
    }
    // A refused upgrade never opened: no on_close for it.
    server.stop();
    assert!(!log.get().iter().any(|e| e.starts_with("close")), "{:?}", log.get());
}

#[test]
fn upgrade_accepted_with_chosen_protocol_and_initial_state() {
    let log = Log::default();
    let mut cfg = ServerConfig::default();
    cfg.protocols = vec!["v1".into()];
    let server = Running::start(cfg, Gate { log: log.clone() });

    let (mut alice, resp) = connect_with(
        server.addr,
        "/chat?name=alice",
        &[("Authorization", "Bearer s3cret"), ("Sec-WebSocket-Protocol", "v1, v2")],
    )
    .expect("accepted");
    assert_eq!(resp.status(), 101);
    // The handler overrode the configured preference (v1) with the client's last offer.
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v2");
    let alice_id = greeting_id(&read_text(&mut alice), "alice");

    // The query token works as well; no subprotocol offered, none answered.
    let (mut bob, resp) = connect_with(server.addr, "/chat?token=s3cret&name=bob", &[]).expect("accepted");
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    greeting_id(&read_text(&mut bob), "bob");

    // State changes in on_message persist from one message to the next...
    for i in 1..=3 {
        alice.send(TMessage::text("hi")).unwrap();
        assert_eq!(read_text(&mut alice), format!("alice #{i}"));
    }
    // ...are what another connection's callback sees through `Ctx::state_of`...
    bob.send(TMessage::text(format!("peek {alice_id}"))).unwrap();
    assert_eq!(read_text(&mut bob), "alice sent 3; own state through ctx: false");
    bob.send(TMessage::text("peek 12345")).unwrap();
    assert_eq!(read_text(&mut bob), "none; own state through ctx: false");

    // ...and what on_close gets.
    close_and_drain(&mut alice);
    log.wait_for("alice's close", |e| e.starts_with("close alice"));
    bob.send(TMessage::text(format!("peek {alice_id}"))).unwrap();
    assert_eq!(read_text(&mut bob), "none; own state through ctx: false");
    close_and_drain(&mut bob);
    log.wait_for("bob's close", |e| e.starts_with("close bob"));
    server.stop();
    let closes: Vec<String> = log.get().into_iter().filter(|e| e.starts_with("close")).collect();
    assert_eq!(
        closes,
        [
            "close alice after 3 message(s) with 1005",
            "close bob after 0 message(s) with 1005"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// on_start, timers, pings

/// Logs `on_start`, every upgrade and every timer; sets timers as messages ask.
struct Clockwork {
    log: Log,
    /// Timers set in on_start: (id, label).
    global: Vec<(TimerId, String)>,
    conn_timers: Vec<(TimerId, String)>,
    /// The first connection's id (stale once it has closed).
    first: Option<ConnId>,
}

impl Handler for Clockwork {
    type State = ();

    fn on_start(&mut self, ctx: &mut Ctx<'_, ()>) {
        self.log.push(format!("start with {} open", ctx.len()));
        // Many timers from one queue, set out of order; one cancelled.
        for ms in [50u64, 10, 40, 20, 30] {
            let id = ctx.set_timer(Duration::from_millis(ms));
            self.global.push((id, format!("global {ms}ms")));
        }
        let cancelled = ctx.set_timer(Duration::from_millis(15));
        assert!(ctx.cancel_timer(cancelled));
        assert!(!ctx.cancel_timer(cancelled), "a cancelled timer is no longer pending");
        // A burst of equal deadlines: each fires once.
        for i in 0..200 {
            let id = ctx.set_timer(Duration::from_millis(60));
            self.global.push((id, format!("burst {i}")));
        }
    }

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, ()>, _up: &mut Upgrade<'_>) -> Result<(), Answer> {
        self.log.push("upgrade");
        Ok(())
    }

    fn on_open(&mut self, _ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.first.get_or_insert(conn.id());
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        match msg {
            // `timers`: one connection timer soon, one much later, one cancelled.
            Message::Text("timers") => {
                for (ms, label) in [(30, "conn soon"), (800, "conn late"), (20, "conn cancelled")] {
                    let id = ctx.set_conn_timer(conn.id(), Duration::from_millis(ms));
                    self.conn_timers.push((id, label.to_string()));
                }
                let (id, _) = self.conn_timers.pop().unwrap();
                assert!(ctx.cancel_timer(id));
            }
            Message::Text("ping me") => {
                let pinged = ctx.ping(conn.id()).is_ok();
                let first = self.first.filter(|f| *f != conn.id()).map(|f| ctx.ping(f).is_ok());
                let _ = ctx.send_text(conn.id(), &format!("pinged {pinged}, first {first:?}"));
            }
            _ => {}
        }
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<'_, ()>, timer: Timer) {
        let all = self.global.iter().chain(&self.conn_timers);
        let label = all.clone().find(|(id, _)| *id == timer.id).map(|(_, l)| l.clone());
        let label = label.unwrap_or_else(|| format!("unknown timer {:?}", timer.id));
        let with_conn = timer.conn.is_some();
        self.log.push(format!("timer {label} conn={with_conn}"));
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_, ()>, _conn: &mut Conn<()>, code: u16, _reason: &str) {
        self.log.push(format!("close {code}"));
    }
}

fn clockwork(log: &Log) -> Clockwork {
    Clockwork {
        log: log.clone(),
        global: Vec::new(),
        conn_timers: Vec::new(),
        first: None,
    }
}

#[test]
fn on_start_runs_before_the_first_connection() {
    let log = Log::default();
    let server = Server::bind("127.0.0.1:0", ServerConfig::default()).unwrap();
    // The client connects before the loop runs: its connection waits in the backlog.
    let addr = server.local_addr();
    let client = thread::spawn(move || connect(addr, "/"));
    thread::sleep(Duration::from_millis(100));
    let server = Running::run(server, clockwork(&log));
    let mut ws = client.join().unwrap();
    log.wait_for("upgrade", |e| e == "upgrade");
    assert_eq!(log.get()[..2], ["start with 0 open", "upgrade"]);
    close_and_drain(&mut ws);
    server.stop();
}

#[test]
fn many_timers_fire_once_in_order_and_connection_timers_end_with_it() {
    let log = Log::default();
    let server = Running::start(ServerConfig::default(), clockwork(&log));
    let mut ws = connect(server.addr, "/");
    ws.send(TMessage::text("timers")).unwrap();
    log.wait_for("conn soon", |e| e.starts_with("timer conn soon"));
    close_and_drain(&mut ws);
    log.wait_for("close", |e| e.starts_with("close"));
    // Past the late timer's deadline: it must not fire for a closed connection.
    thread::sleep(Duration::from_millis(1000));
    server.stop();

    let timers: Vec<String> = log.get().into_iter().filter(|e| e.starts_with("timer")).collect();
    let globals: Vec<&str> = timers
        .iter()
        .map(String::as_str)
        .filter(|e| e.starts_with("timer global"))
        .collect();
    assert_eq!(
        globals,
        [
            "timer global 10ms conn=false",
            "timer global 20ms conn=false",
            "timer global 30ms conn=false",
            "timer global 40ms conn=false",
            "timer global 50ms conn=false",
        ]
    );
    let mut burst: Vec<&String> = timers.iter().filter(|e| e.starts_with("timer burst")).collect();
    assert_eq!(burst.len(), 200, "{timers:?}");
    burst.sort();
    burst.dedup();
    assert_eq!(burst.len(), 200, "a burst timer fired twice");
    let conn: Vec<&String> = timers.iter().filter(|e| e.starts_with("timer conn")).collect();
    assert_eq!(conn, ["timer conn soon conn=true"], "{timers:?}");
    assert!(!timers.iter().any(|e| e.contains("unknown")), "{timers:?}");
}

/// Reads raw frames after the 101 head until a frame with `op` arrives.
fn read_until_frame(s: &mut TcpStream, op: OpCode) -> Vec<(OpCode, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no {op:?} frame in {buf:?}");
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed before a {op:?} frame: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let mut rest = &buf[head + 4..];
        let mut frames = Vec::new();
        while let Ok(Some((h, len))) = FrameHeader::parse(rest) {
            let end = len + h.payload_len as usize;
            if rest.len() < end {
                break;
            }
            frames.push((h.opcode, rest[len..end].to_vec()));
            rest = &rest[end..];
        }
        if frames.iter().any(|(o, _)| *o == op) {
            return frames;
        }
    }
}

#[test]
fn ctx_ping_sends_a_ping_frame() {
    let log = Log::default();
    let server = Running::start(ServerConfig::default(), clockwork(&log));
    // A first connection, closed: its id is stale afterwards.
    let mut first = connect(server.addr, "/");
    close_and_drain(&mut first);
    log.wait_for("close", |e| e.starts_with("close"));

    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = upgrade_request("/", "").into_bytes();
    write_frame(&mut out, true, OpCode::Text, Some([1, 2, 3, 4]), b"ping me");
    s.write_all(&out).unwrap();
    let frames = read_until_frame(&mut s, OpCode::Text);
    assert_eq!(
        frames,
        [
            (OpCode::Ping, Vec::new()),
            (OpCode::Text, b"pinged true, first Some(false)".to_vec())
        ]
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// Topics and Handle

/// Rooms by path: `/room/NAME` subscribes to NAME. Messages: `leave`, `count ROOM`, `id`;
/// anything else is published to the sender's room (not back to the sender), and the sender is
/// told how many it reached.
struct Rooms {
    /// Each opened connection's id, for the test's `Handle` calls.
    ids: mpsc::Sender<ConnId>,
}

fn rooms() -> (Rooms, mpsc::Receiver<ConnId>) {
    let (ids, rx) = mpsc::channel();
    (Rooms { ids }, rx)
}

impl Handler for Rooms {
    type State = String;

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, String>, up: &mut Upgrade<'_>) -> Result<String, Answer> {
        match up.request().path_only().strip_prefix("/room/") {
            Some(room) if !room.is_empty() => Ok(room.to_string()),
            _ => Err(Answer::reject(404, "no such room")),
        }
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, String>, conn: &mut Conn<String>) {
        assert!(ctx.subscribe(conn.id(), &conn.state));
        assert!(!ctx.subscribe(conn.id(), &conn.state), "already subscribed");
        let n = ctx.subscribers(&conn.state);
        let _ = self.ids.send(conn.id());
        let _ = ctx.send_text(
            conn.id(),
            &format!("joined {} ({n}) as {}", conn.state, conn.id().as_u64()),
        );
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, String>, conn: &mut Conn<String>, msg: Message<'_>) {
        let id = conn.id();
        let reply = match msg {
            Message::Text("leave") => format!("left {}", ctx.unsubscribe(id, &conn.state)),
            Message::Text(t) if t.starts_with("count ") => ctx.subscribers(&t[6..]).to_string(),
            _ => format!("sent to {}", ctx.publish(&conn.state, msg, Some(id))),
        };
        let _ = ctx.send_text(id, &reply);
    }
}

/// `joined ROOM (N) as ID` → ID.
fn joined_id(ws: &mut Ws, room: &str, n: usize) -> u64 {
    let line = read_text(ws);
    let prefix = format!("joined {room} ({n}) as ");
    line.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("expected `{prefix}…`, got `{line}`"))
        .parse()
        .unwrap()
}

#[test]
fn topics_reach_their_subscribers_only() {
    let (handler, _ids) = rooms();
    let server = Running::start(ServerConfig::default(), handler);
    let mut a = connect(server.addr, "/room/x");
    joined_id(&mut a, "x", 1);
    let mut b = connect(server.addr, "/room/x");
    joined_id(&mut b, "x", 2);
    let mut c = connect(server.addr, "/room/y");
    joined_id(&mut c, "y", 1);
    let mut d = connect(server.addr, "/room/y");
    joined_id(&mut d, "y", 2);

    a.send(TMessage::text("hello x")).unwrap();
    assert_eq!(read_text(&mut a), "sent to 1");
    assert_eq!(read_text(&mut b), "hello x");
    // Had room x's message leaked into y, it would be ahead of this one.
    c.send(TMessage::binary(&b"hello y"[..])).unwrap();
    assert_eq!(read_text(&mut c), "sent to 1");
    assert_eq!(d.read().unwrap(), TMessage::binary(&b"hello y"[..]));

    b.send(TMessage::text("leave")).unwrap();
    assert_eq!(read_text(&mut b), "left true");
    b.send(TMessage::text("leave")).unwrap();
    assert_eq!(read_text(&mut b), "left false");
    a.send(TMessage::text("anyone?")).unwrap();
    assert_eq!(read_text(&mut a), "sent to 0");
    a.send(TMessage::text("count x")).unwrap();
    assert_eq!(read_text(&mut a), "1");
    a.send(TMessage::text("count nowhere")).unwrap();
    assert_eq!(read_text(&mut a), "0");
    // b, unsubscribed, got nothing since: its next message is the answer to this.
    b.send(TMessage::text("count y")).unwrap();
    assert_eq!(read_text(&mut b), "2");

    // A closed connection's subscriptions end with it.
    close_and_drain(&mut d);
    drop(d);
    let deadline = Instant::now() + WAIT;
    loop {
        c.send(TMessage::text("count y")).unwrap();
        if read_text(&mut c) == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "d's subscription outlived it");
        thread::sleep(Duration::from_millis(10));
    }
    server.stop();
}

#[test]
fn handle_sends_and_publishes_from_another_thread() {
    let (handler, server_ids) = rooms();
    let server = Running::start(ServerConfig::default(), handler);
    let mut a = connect(server.addr, "/room/x");
    let a_id = joined_id(&mut a, "x", 1);
    let mut b = connect(server.addr, "/room/x");
    joined_id(&mut b, "x", 2);
    let mut c = connect(server.addr, "/room/y");
    joined_id(&mut c, "y", 1);

    let handle = server.handle.clone();
    thread::spawn(move || {
        handle.publish_text("x", "news for x").unwrap();
        handle.publish_binary("y", &[1, 2, 3]).unwrap();
        handle.publish_text("nobody", "lost").unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(read_text(&mut a), "news for x");
    assert_eq!(read_text(&mut b), "news for x");
    assert_eq!(c.read().unwrap(), TMessage::binary(vec![1, 2, 3]));

    // A direct send reaches one connection.
    let a_conn = server_ids.recv_timeout(WAIT).unwrap();
    assert_eq!(a_conn.as_u64(), a_id);
    server.handle.send_text(a_conn, "just for a").unwrap();
    server.handle.send_binary(a_conn, b"bytes for a").unwrap();
    assert_eq!(read_text(&mut a), "just for a");
    assert_eq!(a.read().unwrap(), TMessage::binary(&b"bytes for a"[..]));
    // Large ones leave from the handle's buffer behind their header, in order with the rest.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    server.handle.send_binary(a_conn, &big).unwrap();
    server.handle.send_text(a_conn, "after the big one").unwrap();
    assert!(a.read().unwrap() == TMessage::binary(big), "the large message differs");
    assert_eq!(read_text(&mut a), "after the big one");
    b.send(TMessage::text("count x")).unwrap();
    assert_eq!(read_text(&mut b), "2", "b got nothing of a's direct messages");

    let handle = server.handle.clone();
    assert!(!handle.is_stopped());
    server.stop();
    // Once run has returned, every call says so, at once and for good.
    assert!(handle.is_stopped());
    assert_eq!(handle.send_text(a_conn, "late"), Err(HandleError::Stopped));
    assert_eq!(handle.publish_text("x", "late"), Err(HandleError::Stopped));
    assert_eq!(handle.broadcast_binary(b"late"), Err(HandleError::Stopped));
    assert_eq!(handle.wake(), Err(HandleError::Stopped));
    assert_eq!(handle.shutdown(), Err(HandleError::Stopped));
}

#[test]
fn a_server_dropped_without_running_is_stopped() {
    let server = Server::bind("127.0.0.1:0", ServerConfig::default()).unwrap();
    let handle = server.handle();
    assert_eq!(handle.wake(), Ok(()), "commands wait for the loop before it runs");
    drop(server);
    assert!(handle.is_stopped());
    assert_eq!(handle.publish_text("x", "never"), Err(HandleError::Stopped));
}

/// A client connection with a small receive buffer, so that it falls behind.
fn connect_slow(addr: SocketAddr, path: &str) -> Ws {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    tungstenite::client(format!("ws://{addr}{path}"), common::Tcp(stream))
        .expect("handshake")
        .0
}

#[test]
fn publish_applies_the_slow_consumer_policy() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CHUNK: usize = 16 << 10;
    const CHUNKS: usize = 1024; // 16 MiB: more than the kernel buffers for a stalled peer
    const BATCH: usize = 16;
    let mut cfg = ServerConfig::default();
    cfg.max_backpressure = 1 << 20;
    let (handler, _ids) = rooms();
    let server = Running::start(cfg, handler);
    let mut slow = connect_slow(server.addr, "/room/x");
    joined_id(&mut slow, "x", 1);
    let mut fast = connect(server.addr, "/room/x");
    joined_id(&mut fast, "x", 2);
    let fast_got = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fast_got);
    let fast = thread::spawn(move || loop {
        match fast.read().expect("fast reader") {
            TMessage::Binary(b) if b.len() == CHUNK => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            TMessage::Text(t) if t.as_str() == "END" => return,
            m => panic!("fast reader got {m:?}"),
        }
    });
    let payload = vec![7u8; CHUNK];
    let deadline = Instant::now() + Duration::from_secs(60);
    for sent in (BATCH..=CHUNKS).step_by(BATCH) {
        for _ in 0..BATCH {
            server.handle.publish_binary("x", &payload).unwrap();
        }
        // The fast subscriber keeps up within a batch or two: never near its queue bound.
        while fast_got.load(Ordering::Relaxed) + 2 * BATCH < sent {
            assert!(Instant::now() < deadline, "the fast subscriber stalled");
            thread::sleep(Duration::from_millis(1));
        }
    }
    server.handle.publish_text("x", "END").unwrap();
    fast.join().unwrap();
    assert_eq!(
        fast_got.load(Ordering::Relaxed),
        CHUNKS,
        "the fast subscriber got every message"
    );
    // The stalled one was closed with 1008 after what its queue held.
    let mut got = 0;
    let code = loop {
        match slow.read() {
            Ok(TMessage::Binary(b)) if b.len() == CHUNK => got += 1,
            Ok(TMessage::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            other => panic!("slow subscriber: {other:?} after {got} messages"),
        }
    };
    assert_eq!(code, Some(1008), "after {got} messages");
    assert!(got < CHUNKS, "{got}");
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// Signals after run

const SIGNAL_CHILD: &str = "WSLOOP_TEST_SIGNAL_CHILD";

/// In the child process: run a server that handles signals until a shutdown, then wait.
fn signal_child() -> ! {
    let mut cfg = ServerConfig::default();
    cfg.handle_signals = true;
    let server = Server::bind("127.0.0.1:0", cfg).unwrap();
    server.handle().shutdown().unwrap(); // waits for the loop, which then stops at once
    server.run(wsloop::server::Echo).unwrap();
    println!("server stopped");
    io::stdout().flush().unwrap();
    thread::sleep(WAIT);
    println!("still alive");
    std::process::exit(3)
}

/// Runs this test in a child process, sends it `signal` once its server has stopped, and
/// returns how the child ended.
fn signal_after_run(test: &str, signal: i32) -> std::process::ExitStatus {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(SIGNAL_CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        // libtest has written `test NAME ... ` on the same line.
        lines.any(|l| l.is_ok_and(|l| l.ends_with("server stopped"))),
        "the child never stopped its server"
    );
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child outlived signal {signal} by {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_after_run_terminates() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os(SIGNAL_CHILD).is_some() {
        signal_child();
    }
    let status = signal_after_run("sigterm_after_run_terminates", libc::SIGTERM);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
}

#[test]
fn sigint_after_run_terminates() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os(SIGNAL_CHILD).is_some() {
        signal_child();
    }
    let status = signal_after_run("sigint_after_run_terminates", libc::SIGINT);
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status}");
}

// ---------------------------------------------------------------------------------------------
// Fairness towards commands from other threads

/// Opens a WebSocket on a raw socket and returns it once the `101` has arrived; it is never
/// read again.
fn silent_peer(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(upgrade_request("/", "").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the upgrade's answer ended early");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[test]
fn a_flood_of_broadcasts_from_a_handle_leaves_room_for_a_fresh_client() {
    // A handle's broadcasts wait in the loop's inbox, up to 1,024 of them, each for every peer:
    // run in one go, a full inbox to 1,500 peers would hold the loop for seconds. The loop
    // runs a bounded share of them per turn, so a fresh client is served in between.
    const PEERS: usize = 1500;
    const FRESH: usize = 20;
    const BOUND: Duration = Duration::from_millis(750);
    let mut cfg = ServerConfig::default();
    cfg.slow_consumer = wsloop::server::SlowConsumer::Drop;
    let server = Running::start(cfg, wsloop::server::Echo);
    let peers: Vec<TcpStream> = (0..PEERS).map(|_| silent_peer(server.addr)).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = Arc::clone(&stop);
    let handle = server.handle.clone();
    let flooder = thread::spawn(move || {
        let (mut sent, deadline) = (0u64, Instant::now() + Duration::from_secs(60));
        while !flooding.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match handle.broadcast_text("") {
                Ok(()) => sent += 1,
                Err(HandleError::Busy) => thread::sleep(Duration::from_micros(100)),
                Err(e) => panic!("broadcast: {e}"),
            }
        }
        sent
    });
    thread::sleep(Duration::from_millis(300));
    let mut took = Vec::new();
    for _ in 0..FRESH {
        let t0 = Instant::now();
        let mut ws = connect(server.addr, "/");
        ws.send(TMessage::text("mine")).unwrap();
        // The echo comes back between the broadcasts.
        loop {
            match ws.read().expect("the fresh client's connection") {
                TMessage::Text(t) if t.as_str() == "mine" => break,
                _ => {}
            }
        }
        took.push(t0.elapsed());
        drop(ws);
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    drop(peers);
    // The inbox may still be full of the flood: the shutdown waits for room, as any command.
    let by = Instant::now() + WAIT;
    while server.handle.shutdown() == Err(HandleError::Busy) && Instant::now() < by {
        thread::sleep(Duration::from_millis(10));
    }
    took.sort();
    let worst = *took.last().unwrap();
    eprintln!(
        "{sent} broadcasts from a handle to {PEERS} peers: fresh client connect + upgrade + echo \
         median {:?}, worst {worst:?}",
        took[took.len() / 2]
    );
    assert!(sent > 1024, "the flood sent only {sent} broadcasts");
    assert!(
        worst < BOUND,
        "a fresh client waited {worst:?} for the handle's broadcasts"
    );
}

// ---------------------------------------------------------------------------------------------
// Plain requests, response headers, reason phrases

/// A connection's state that has no `Default`: only `on_upgrade` can build it.
struct Member {
    name: String,
}

/// Plain routes beside the upgrade, and answers with headers.
struct Site {
    log: Log,
}

impl Handler for Site {
    type State = Member;

    fn on_upgrade(&mut self, _ctx: &mut Ctx<'_, Member>, up: &mut Upgrade<'_>) -> Result<Member, Answer> {
        let req = up.request();
        match req.path_only() {
            "/busy" => return Err(Answer::reject(503, "full, come back later").with_header("Retry-After", "30")),
            "/teapot" => return Err(Answer::reject(418, "short and stout")),
            "/private" if req.header("Authorization").is_none() => {
                let challenge = "Basic realm=\"site\", charset=\"UTF-8\"";
                return Err(Answer::reject(401, "log in first").with_header("WWW-Authenticate", challenge));
            }
            _ => {}
        }
        let name = req.query_param("name").unwrap_or("anon").to_string();
        up.add_header("Set-Cookie", format!("member={name}; HttpOnly; SameSite=Strict"))
            .expect("a valid cookie");
        // A value that would split the response is refused and never sent.
        let injected = up.add_header("X-Note", "hi\r\nSet-Cookie: admin=1");
        self.log.push(format!("X-Note: {injected:?}"));
        Ok(Member { name })
    }

    fn on_request(&mut self, ctx: &mut Ctx<'_, Member>, req: &Request, peer: SocketAddr) -> Option<Answer> {
        self.log
            .push(format!("{} {} from {}", req.method(), req.path(), peer.ip()));
        match (req.method(), req.path_only()) {
            ("GET" | "HEAD", "/health") => {
                let body = format!("{{\"status\":\"ok\",\"connections\":{}}}", ctx.len());
                Some(
                    Answer::respond(200, "application/json", body.into_bytes())
                        .with_header("Cache-Control", "no-store"),
                )
            }
            (_, "/teapot") => Some(Answer::reject(418, "short and stout")),
            ("POST", "/items") => {
                Some(Answer::respond(201, "text/plain", b"made".as_slice()).with_header("Location", "/items/1"))
            }
            (_, "/items") => Some(Answer::reject(405, "POST only").with_header("Allow", "POST")),
            _ => None,
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Member>, conn: &mut Conn<Member>, msg: Message<'_>) {
        if let Message::Text(t) = msg {
            let _ = ctx.send_text(conn.id(), &format!("{}: {t}", conn.state.name));
        }
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_, Member>, conn: &mut Conn<Member>, _code: u16, _reason: &str) {
        self.log.push(format!("bye {}", conn.state.name));
    }
}

/// `(status line, headers, body)` of a raw answer.
fn split_answer(answer: &str) -> (&str, &str, &str) {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete head");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status, headers, body)
}

#[test]
fn plain_requests_reach_the_handler() {
    let log = Log::default();
    let server = Running::start(ServerConfig::default(), Site { log: log.clone() });
    let get = raw_http(server.addr, "GET /health?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (status, headers, body) = split_answer(&get);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, r#"{"status":"ok","connections":0}"#);
    assert!(headers.contains("Content-Type: application/json\r\n"), "{get}");
    assert!(
        headers.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{get}"
    );
    assert!(headers.ends_with("\r\nCache-Control: no-store"), "{get}");
    log.wait_for("the request", |e| e == "GET /health?x=1 from 127.0.0.1");
    // HEAD: the same head, no body.
    let head = raw_http(server.addr, "HEAD /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(head, get.strip_suffix(body).unwrap());
    // Another method and status, with a header.
    let post = raw_http(
        server.addr,
        "POST /items HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    let (status, headers, body) = split_answer(&post);
    assert_eq!((status, body), ("HTTP/1.1 201 Created", "made"));
    assert!(headers.ends_with("\r\nLocation: /items/1"), "{post}");
    // A body is not read, and the answer still arrives whole.
    let with_body = raw_http(
        server.addr,
        "POST /items HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(with_body, post);
    let put = raw_http(
        server.addr,
        "PUT /items HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    let (status, headers, _) = split_answer(&put);
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(
        headers.ends_with("\r\nAllow: POST") && !headers.contains("GET"),
        "{put}"
    );
    // What the handler leaves gets the server's own answer: 426 without a page.
    let other = raw_http(server.addr, "GET /elsewhere HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{other}");
    assert!(other.contains("\r\nUpgrade: websocket\r\n"), "{other}");
    server.stop();
}

#[test]
fn the_built_in_page_answers_what_the_handler_leaves() {
    let mut cfg = ServerConfig::default();
    cfg.page = Some("<p>hello</p>".into());
    let server = Running::start(cfg, Site { log: Log::default() });
    let page = raw_http(server.addr, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(
        page.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{page}"
    );
    assert!(page.ends_with("\r\n\r\n<p>hello</p>"), "{page}");
    let missing = raw_http(server.addr, "GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");
    let post = raw_http(
        server.addr,
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
    assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
    // The handler's routes still come first.
    let health = raw_http(server.addr, "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(
        health.starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"),
        "{health}"
    );
    server.stop();
}

#[test]
fn the_101_carries_the_handlers_headers_and_a_state_without_default() {
    let log = Log::default();
    let server = Running::start(ServerConfig::default(), Site { log: log.clone() });
    let (mut ws, response) = connect_with(server.addr, "/chat?name=ann", &[]).expect("handshake");
    assert_eq!(response.status(), 101);
    let cookies: Vec<_> = response.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["member=ann; HttpOnly; SameSite=Strict"]);
    assert!(response.headers().get("x-note").is_none(), "{response:?}");
    log.wait_for("the refused header", |e| e == "X-Note: Err(InvalidValue)");
    // The state on_upgrade built is the one every callback gets.
    ws.send(TMessage::text("hi")).unwrap();
    assert_eq!(read_text(&mut ws), "ann: hi");
    ws.close(None).unwrap();
    log.wait_for("the close", |e| e == "bye ann");
    // The same 101 on the wire: one Set-Cookie line, nothing injected.
    let raw = raw_http_upgrade(server.addr, &upgrade_request("/chat?name=bob", ""));
    assert!(raw.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{raw}");
    assert!(
        raw.ends_with("\r\nSet-Cookie: member=bob; HttpOnly; SameSite=Strict\r\n\r\n"),
        "{raw}"
    );
    assert!(!raw.contains("admin"), "{raw}");
    server.stop();
}

#[test]
fn refusals_carry_their_headers_and_phrases() {
    let server = Running::start(ServerConfig::default(), Site { log: Log::default() });
    let private = raw_http(server.addr, &upgrade_request("/private", ""));
    let (status, headers, body) = split_answer(&private);
    assert_eq!((status, body), ("HTTP/1.1 401 Unauthorized", "log in first\n"));
    assert!(
        headers.ends_with("\r\nWWW-Authenticate: Basic realm=\"site\", charset=\"UTF-8\""),
        "{private}"
    );
    // A real client sees the challenge too.
    match connect_with(server.addr, "/private", &[]) {
        Err(tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 401);
            assert_eq!(
                r.headers()["www-authenticate"],
                "Basic realm=\"site\", charset=\"UTF-8\""
            );
        }
        Err(e) => panic!("expected 401, got {e}"),
        Ok(_) => panic!("expected 401, got an upgrade"),
    }
    assert!(connect_with(server.addr, "/private", &[("Authorization", "Basic YTpi")]).is_ok());
    let busy = raw_http(server.addr, &upgrade_request("/busy", ""));
    let (status, headers, _) = split_answer(&busy);
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(headers.ends_with("\r\nRetry-After: 30"), "{busy}");
    for request in [
        upgrade_request("/teapot", ""),
        "GET /teapot HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
    ] {
        let teapot = raw_http(server.addr, &request);
        assert!(teapot.starts_with("HTTP/1.1 418 I'm a teapot\r\n"), "{teapot}");
        assert!(teapot.ends_with("\r\n\r\nshort and stout\n"), "{teapot}");
    }
    server.stop();
}

/// Sends an upgrade request on a raw socket and reads the head of the answer (the connection
/// stays open after a 101).
fn raw_http_upgrade(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + WAIT;
    while !got.ends_with(b"\r\n\r\n") && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(got).expect("an HTTP head is text")
}
