//! The connection registry and broadcast, driven through the library with tungstenite clients:
//! broadcast reaches everyone (or everyone but the sender), slow consumers are dropped or closed
//! with their queues bounded, `Handle` reaches the loop from another thread, and the handler sees
//! ids and peer addresses.

mod common;

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::Tcp;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message as WsMessage, WebSocket};
use wsloop::server::{Broadcast, SlowConsumer, Stats};
use wsloop::{Conn, ConnId, Ctx, Handle, Handler, Message, Server, ServerConfig as Config};

/// A connection as the handler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Peer {
    id: ConnId,
    addr: SocketAddr,
}

impl Peer {
    fn of(conn: &Conn<()>) -> Peer {
        Peer {
            id: conn.id(),
            addr: conn.peer_addr(),
        }
    }
}

type Client = WebSocket<Tcp>;

/// Upper bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// Something the handler saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Open(Peer),
    Message(Peer, Vec<u8>),
    Close(Peer, u16),
}

/// Something the test asks the handler to do on its next wake-up.
enum Action {
    Send(ConnId, String),
    Close(ConnId, u16, String),
}

/// What the handler reports; read by the test.
#[derive(Default)]
struct Shared {
    seen: Vec<Seen>,
    actions: Vec<Action>,
    /// Counters, `Ctx::len` and `Ctx::peers` as of the last wake-up.
    stats: Stats,
    len: usize,
    peers: Vec<Peer>,
    wakes: u64,
}

/// [`Broadcast`] plus a record of every callback; on wake-up it runs the queued actions and
/// takes a snapshot of the registry.
struct Recorder {
    inner: Broadcast,
    shared: Arc<Mutex<Shared>>,
}

impl Handler for Recorder {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }
    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.shared.lock().unwrap().seen.push(Seen::Open(Peer::of(conn)));
        self.inner.on_open(ctx, conn);
    }
    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        let bytes = msg.as_bytes().to_vec();
        self.shared
            .lock()
            .unwrap()
            .seen
            .push(Seen::Message(Peer::of(conn), bytes));
        self.inner.on_message(ctx, conn, msg);
    }
    fn on_close(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, code: u16, reason: &str) {
        self.shared.lock().unwrap().seen.push(Seen::Close(Peer::of(conn), code));
        self.inner.on_close(ctx, conn, code, reason);
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, timer: wsloop::server::Timer) {
        self.inner.on_timer(ctx, timer);
    }
    fn on_wake(&mut self, ctx: &mut Ctx<'_, ()>) {
        let actions = std::mem::take(&mut self.shared.lock().unwrap().actions);
        for a in actions {
            match a {
                Action::Send(id, text) => {
                    let _ = ctx.send_text(id, &text);
                }
                Action::Close(id, code, reason) => ctx.close(id, code, &reason),
            }
        }
        let mut s = self.shared.lock().unwrap();
        s.stats = ctx.stats();
        s.len = ctx.len();
        s.peers = ctx.peers().map(|(id, addr)| Peer { id, addr }).collect();
        s.wakes += 1;
    }
}

/// A server running on its own thread; shut down (and joined, bounded) on drop.
struct Running {
    addr: SocketAddr,
    handle: Handle,
    shared: Arc<Mutex<Shared>>,
    done: mpsc::Receiver<std::io::Result<()>>,
}

fn start(cfg: Config, inner: Broadcast) -> Running {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let handler = Recorder {
        inner,
        shared: Arc::clone(&shared),
    };
    // A `Server` stays on the thread that runs it (its broadcast frames are `Rc`): bind there.
    let (ready_tx, ready) = mpsc::channel();
    let (tx, done) = mpsc::channel();
    thread::spawn(move || {
        let server = Server::bind("127.0.0.1:0", cfg).expect("bind 127.0.0.1:0");
        let _ = ready_tx.send((server.local_addr(), server.handle()));
        let _ = tx.send(server.run(handler));
    });
    let (addr, handle) = ready.recv_timeout(WAIT).expect("the server thread did not start");
    Running {
        addr,
        handle,
        shared,
        done,
    }
}

impl Running {
    /// Wakes the handler and waits until it has taken a fresh snapshot.
    fn snapshot(&self) -> (Stats, usize, Vec<Peer>) {
        let before = self.shared.lock().unwrap().wakes;
        self.handle.wake().expect("wake");
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let s = self.shared.lock().unwrap();
                if s.wakes > before {
                    return (s.stats, s.len, s.peers.clone());
                }
            }
            assert!(Instant::now() < deadline, "the handler did not wake within {WAIT:?}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn act(&self, action: Action) {
        self.shared.lock().unwrap().actions.push(action);
        self.snapshot();
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }

    /// Waits until the handler has seen something `pred` accepts, and returns it.
    fn wait_seen(&self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.seen().into_iter().find(&pred) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the handler never saw {what}: {:?}",
                self.seen()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `n` connections have been opened (in total).
    fn wait_opens(&self, n: usize) -> Vec<Peer> {
        let deadline = Instant::now() + WAIT;
        loop {
            let opens: Vec<Peer> = self
                .seen()
                .into_iter()
                .filter_map(|s| match s {
                    Seen::Open(p) => Some(p),
                    _ => None,
                })
                .collect();
            if opens.len() >= n {
                return opens;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} connections opened",
                opens.len()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.handle.shutdown();
        match self.done.recv_timeout(WAIT) {
            Ok(result) => {
                if !thread::panicking() {
                    result.expect("Server::run failed");
                }
            }
            Err(_) if thread::panicking() => {}
            Err(_) => panic!("the server did not stop within {WAIT:?} of Handle::shutdown"),
        }
    }
}

/// Opens a client connection, with a small receive buffer if `rcvbuf` is given.
fn connect(addr: SocketAddr, rcvbuf: Option<usize>) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    sock.connect(&addr.into()).expect("connect");
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), Tcp(stream)).expect("handshake");
    ws
}

/// The next data message (pings and pongs are skipped).
fn next_data(ws: &mut Client) -> WsMessage {
    loop {
        match ws.read().expect("read a message") {
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            m => return m,
        }
    }
}

fn text(m: &WsMessage) -> &str {
    match m {
        WsMessage::Text(t) => t.as_str(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[test]
fn broadcast_reaches_every_client() {
    let srv = start(Config::default(), Broadcast::default());
    let mut clients: Vec<Client> = (0..4).map(|_| connect(srv.addr, None)).collect();
    srv.wait_opens(4);

    clients[0].send(WsMessage::text("hello from 0")).unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(text(&next_data(c)), "hello from 0", "client {i}");
    }
    let blob: Vec<u8> = (0..=255).collect();
    clients[3].send(WsMessage::binary(blob.clone())).unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(next_data(c), WsMessage::binary(blob.clone()), "client {i}");
    }
    let (stats, len, _) = srv.snapshot();
    assert_eq!(len, 4);
    assert_eq!(stats.messages_in, 2);
    assert_eq!(stats.messages_out, 8, "a broadcast counts once per peer");
}

#[test]
fn no_echo_self_skips_only_the_sender() {
    let srv = start(Config::default(), Broadcast::new(false, false));
    let mut c: Vec<Client> = (0..3).map(|_| connect(srv.addr, None)).collect();
    srv.wait_opens(3);

    c[0].send(WsMessage::text("first, from 0")).unwrap();
    assert_eq!(text(&next_data(&mut c[1])), "first, from 0");
    assert_eq!(text(&next_data(&mut c[2])), "first, from 0");
    c[1].send(WsMessage::text("second, from 1")).unwrap();
    // Client 0's next message is client 1's: its own never came back.
    assert_eq!(text(&next_data(&mut c[0])), "second, from 1");
    assert_eq!(text(&next_data(&mut c[2])), "second, from 1");
    c[2].send(WsMessage::text("third, from 2")).unwrap();
    assert_eq!(text(&next_data(&mut c[0])), "third, from 2");
    assert_eq!(text(&next_data(&mut c[1])), "third, from 2");
}

#[test]
fn announce_tells_everyone_about_joins_and_leaves() {
    let srv = start(Config::default(), Broadcast::new(true, true));
    let mut a = connect(srv.addr, None);
    let a_addr = a.get_ref().0.local_addr().unwrap();
    assert_eq!(text(&next_data(&mut a)), format!("* {a_addr} joined (1 online)"));
    let mut b = connect(srv.addr, None);
    let b_addr = b.get_ref().0.local_addr().unwrap();
    assert_eq!(text(&next_data(&mut a)), format!("* {b_addr} joined (2 online)"));
    assert_eq!(text(&next_data(&mut b)), format!("* {b_addr} joined (2 online)"));
    b.close(None).unwrap();
    assert_eq!(text(&next_data(&mut a)), format!("* {b_addr} left (1 online)"));
}

#[test]
fn handler_sees_ids_and_peer_addresses() {
    let srv = start(Config::default(), Broadcast::default());
    let mut c: Vec<Client> = (0..3).map(|_| connect(srv.addr, None)).collect();
    let local: Vec<SocketAddr> = c.iter().map(|w| w.get_ref().0.local_addr().unwrap()).collect();
    let opens = srv.wait_opens(3);

    // Every open names a distinct id and the client's own address.
    let ids: HashSet<ConnId> = opens.iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), 3, "ids must be distinct: {opens:?}");
    let addrs: HashSet<SocketAddr> = opens.iter().map(|p| p.addr).collect();
    assert_eq!(addrs, local.iter().copied().collect());
    let peer_of = |addr: SocketAddr| *opens.iter().find(|p| p.addr == addr).unwrap();

    // The registry lists the same peers.
    let (_, len, peers) = srv.snapshot();
    assert_eq!(len, 3);
    let listed: HashSet<(ConnId, SocketAddr)> = peers.iter().map(|p| (p.id, p.addr)).collect();
    assert_eq!(listed, opens.iter().map(|p| (p.id, p.addr)).collect());

    // A message carries its sender's id and address.
    c[1].send(WsMessage::text("who am I")).unwrap();
    let p1 = peer_of(local[1]);
    srv.wait_seen("client 1's message", |s| *s == Seen::Message(p1, b"who am I".to_vec()));
    for w in c.iter_mut() {
        assert_eq!(text(&next_data(w)), "who am I");
    }

    // Send to one connection by id: only that one gets it.
    let p2 = peer_of(local[2]);
    srv.act(Action::Send(p2.id, "just for 2".into()));
    assert_eq!(text(&next_data(&mut c[2])), "just for 2");
    c[0].send(WsMessage::text("to all")).unwrap();
    assert_eq!(text(&next_data(&mut c[1])), "to all", "client 1 got nothing in between");
    assert_eq!(text(&next_data(&mut c[2])), "to all");
    assert_eq!(text(&next_data(&mut c[0])), "to all");

    // Close one by id with a code and reason: the client sees them; on_close names it.
    let p0 = peer_of(local[0]);
    srv.act(Action::Close(p0.id, 4001, "go away".into()));
    match c[0].read().expect("the close frame") {
        WsMessage::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4001);
            assert_eq!(f.reason.as_str(), "go away");
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    // Reading on sends tungstenite's close reply and then sees the end of the stream.
    assert!(matches!(c[0].read(), Err(tungstenite::Error::ConnectionClosed)));
    srv.wait_seen("client 0's close", |s| matches!(s, Seen::Close(p, _) if *p == p0));

    // A clean close from the client: on_close with its id, address and code.
    c[1].close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    srv.wait_seen("client 1's close", |s| *s == Seen::Close(p1, 1000));

    // A client that vanishes without a close frame: 1006.
    drop(c.pop());
    srv.wait_seen("client 2's disappearance", |s| *s == Seen::Close(p2, 1006));

    let (stats, len, peers) = srv.snapshot();
    assert_eq!((len, stats.open, peers.len()), (0, 0, 0), "everyone left: {peers:?}");
    let closes = srv.seen().iter().filter(|s| matches!(s, Seen::Close(..))).count();
    assert_eq!(closes, 3, "on_close exactly once per connection: {:?}", srv.seen());
}

#[test]
fn handle_broadcasts_from_another_thread() {
    let srv = start(Config::default(), Broadcast::default());
    let mut c: Vec<Client> = (0..3).map(|_| connect(srv.addr, None)).collect();
    srv.wait_opens(3);

    // A "sensor thread": it only has the Handle.
    let handle = srv.handle.clone();
    let sensor = thread::spawn(move || {
        for i in 0..20 {
            handle.broadcast_text(&format!("reading {i}")).unwrap();
            if i % 5 == 0 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        handle.broadcast_binary(&[1, 2, 3]).unwrap();
    });
    sensor.join().unwrap();
    for w in c.iter_mut() {
        for i in 0..20 {
            assert_eq!(text(&next_data(w)), format!("reading {i}"));
        }
        assert_eq!(next_data(w), WsMessage::binary(vec![1u8, 2, 3]));
    }
}

/// Message size and count for the slow-consumer tests: enough to fill the kernel's socket
/// buffers (which grow to a few MiB on loopback) and then the queue.
const CHUNK: usize = 16 << 10;
const MAX_CHUNKS: usize = 4000;
const BATCH: usize = 4;
const SLOW_DEADLINE: Duration = Duration::from_secs(60);

/// A client that reads until the text message `END`; returns how many binary messages it got,
/// and the client (still open).
fn reader(mut ws: Client) -> thread::JoinHandle<(usize, Client)> {
    thread::spawn(move || {
        let mut n = 0;
        loop {
            match next_data(&mut ws) {
                WsMessage::Binary(b) => {
                    assert_eq!(b.len(), CHUNK);
                    n += 1;
                }
                WsMessage::Text(t) if t.as_str() == "END" => return (n, ws),
                other => panic!("fast client: unexpected {other:?}"),
            }
        }
    })
}

/// Broadcasts `CHUNK`-byte messages in small batches (so the loop also serves the fast
/// client) until `stop` says so; checks that the queues stay bounded. Returns the number sent
/// and the last snapshot.
fn flood(srv: &Running, max_backpressure: usize, stop: impl Fn(usize, &Stats) -> bool) -> (usize, Stats) {
    let payload = vec![0xabu8; CHUNK];
    let started = Instant::now();
    let mut sent = 0;
    loop {
        for _ in 0..BATCH {
            srv.handle.broadcast_binary(&payload).unwrap();
        }
        sent += BATCH;
        let (stats, _, _) = srv.snapshot();
        assert!(
            stats.bytes_queued <= 2 * max_backpressure,
            "queues exceed their bound: {stats:?}"
        );
        if stop(sent, &stats) {
            return (sent, stats);
        }
        assert!(
            sent < MAX_CHUNKS && started.elapsed() < SLOW_DEADLINE,
            "the slow consumer never hit its bound after {sent} messages in {:?}: {stats:?}",
            started.elapsed()
        );
    }
}

#[test]
fn drop_policy_skips_messages_for_a_slow_consumer() {
    let max = 256 << 10;
    let mut cfg = Config::default();
    cfg.max_backpressure = max;
    cfg.slow_consumer = SlowConsumer::Drop;
    let srv = start(cfg, Broadcast::default());
    let mut slow = connect(srv.addr, Some(4096)); // never reads until the end
    let slow_addr = slow.get_ref().0.local_addr().unwrap();
    let fast = reader(connect(srv.addr, None));
    let opens = srv.wait_opens(2);
    let slow_peer = *opens.iter().find(|p| p.addr == slow_addr).unwrap();

    let (sent, flooded) = flood(&srv, max, |_, s| s.dropped >= 10);
    srv.handle.broadcast_text("END").unwrap();
    let (fast_got, _fast) = fast.join().expect("fast client");
    // The broadcast END may itself be dropped for the slow consumer; a direct send is not.
    srv.act(Action::Send(slow_peer.id, "END".into()));
    let (stats, len, _) = srv.snapshot();
    assert_eq!(
        len,
        2,
        "drop policy keeps the slow consumer connected: {stats:?} {:?}",
        srv.seen()
    );
    assert!(flooded.dropped >= 10, "{flooded:?}");
    // Every (peer, message) pair was either queued or dropped (+1: the direct END).
    assert_eq!(
        stats.messages_out + stats.dropped,
        2 * (sent as u64 + 1) + 1,
        "{stats:?}"
    );

    // The slow consumer now reads: an intact stream of whole messages, with the gaps.
    let mut slow_got = 0;
    loop {
        match next_data(&mut slow) {
            WsMessage::Binary(b) => {
                assert_eq!(b.len(), CHUNK);
                slow_got += 1;
            }
            WsMessage::Text(t) if t.as_str() == "END" => break,
            other => panic!("slow client: unexpected {other:?}"),
        }
    }
    assert_eq!(
        (slow_got + fast_got) as u64 + flooded.dropped,
        2 * sent as u64,
        "slow got {slow_got}, fast got {fast_got}, {flooded:?}"
    );
    assert!(slow_got < sent, "the slow consumer missed some messages");
}

#[test]
fn close_policy_closes_a_slow_consumer_with_1008() {
    let max = 256 << 10;
    let mut cfg = Config::default();
    cfg.max_backpressure = max;
    cfg.slow_consumer = SlowConsumer::Close;
    cfg.close_timeout = Duration::from_secs(8);
    let srv = start(cfg, Broadcast::default());
    let mut slow = connect(srv.addr, Some(4096));
    let slow_addr = slow.get_ref().0.local_addr().unwrap();
    let fast = reader(connect(srv.addr, None));
    let opens = srv.wait_opens(2);
    let slow_peer = *opens.iter().find(|p| p.addr == slow_addr).unwrap();

    // Once a broadcast reaches only one of the two peers, the slow one is being closed.
    let (sent, stats) = flood(&srv, max, |sent, s| s.messages_out < 2 * sent as u64);
    assert_eq!(stats.dropped, 0, "close policy drops nothing: {stats:?}");

    // The slow consumer reads now: whole messages, then a close frame with 1008.
    let mut slow_got = 0;
    let close = loop {
        match slow.read() {
            Ok(WsMessage::Binary(b)) => {
                assert_eq!(b.len(), CHUNK);
                slow_got += 1;
            }
            Ok(WsMessage::Close(f)) => break f,
            Ok(other) => panic!("slow client: unexpected {other:?}"),
            Err(e) => panic!(
                "slow client: {e} after {slow_got} messages (expected a close frame); {:?}",
                srv.seen()
            ),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(slow_got < sent, "slow got {slow_got} of {sent}");
    // Drain to the end so the closing handshake completes.
    loop {
        match slow.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("after the close: {e}"),
        }
    }
    // The handler hears the code the server sent, not a later timeout.
    srv.wait_seen(
        "the slow consumer's close with 1008",
        |s| matches!(s, Seen::Close(p, 1008) if *p == slow_peer),
    );

    // The fast client is still there and still served.
    srv.handle.broadcast_text("END").unwrap();
    let (fast_got, _fast) = fast.join().expect("fast client");
    assert_eq!(fast_got, sent, "the fast client got every message");
    let (stats, len, _) = srv.snapshot();
    assert_eq!(len, 1);
    assert_eq!(stats.bytes_queued, 0, "{stats:?}");
}

#[test]
fn a_message_larger_than_the_queue_bound_reaches_idle_peers() {
    // The default bound is 1 MiB and the default largest message 16 MiB: a peer with nothing
    // queued must still get a 1 MiB chat message (its frame is a few bytes over 1 MiB).
    let srv = start(Config::default(), Broadcast::default());
    let mut a = connect(srv.addr, None);
    let mut b = connect(srv.addr, None);
    srv.wait_opens(2);
    let big = vec![0x5au8; 1 << 20];
    a.send(WsMessage::binary(big.clone())).unwrap();
    for (name, w) in [("sender", &mut a), ("other", &mut b)] {
        match w.read() {
            Ok(WsMessage::Binary(got)) => assert!(got[..] == big[..], "{name}: wrong payload"),
            other => panic!("{name}: expected the 1 MiB message, got {other:?}"),
        }
    }
}

/// With permessage-deflate agreed by some peers: one broadcast reaches every peer intact,
/// compressed for those that agreed (with the window each asked for) and plain for the others;
/// a message under the size threshold goes plain to all.
#[cfg(feature = "deflate")]
#[test]
fn a_broadcast_is_compressed_for_the_peers_that_agreed() {
    use wsloop::proto::deflate::DeflateConfig;
    use wsloop::{ClientConfig, ClientEvent};

    let srv = start(Config::default(), Broadcast::default());
    let url = format!("ws://{}/", srv.addr);
    let with = |deflate: DeflateConfig| {
        let mut cfg = ClientConfig::default();
        cfg.deflate = deflate;
        wsloop::Client::connect(&url, cfg).expect("connect")
    };
    let mut peers = [
        with(DeflateConfig::default()),
        with(DeflateConfig::default()),
        with(DeflateConfig::disabled()),
    ];
    // tungstenite offers nothing.
    let mut plain = connect(srv.addr, None);
    // A raw peer that asks for a 10-bit server window: a second compressed variant.
    let mut small = TcpStream::connect(srv.addr).unwrap();
    small.set_read_timeout(Some(WAIT)).unwrap();
    std::io::Write::write_all(
        &mut small,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut small, &mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.contains("server_max_window_bits=10\r\n"), "{head}");
    srv.wait_opens(5);
    assert!(peers[0].deflate().is_some() && peers[1].deflate().is_some());
    assert!(peers[2].deflate().is_none());

    // 3,000 letters and digits in no order, then the same again: the only repeat is farther back
    // than a 10-bit window reaches.
    let mut x = 0x2545_f491_u32;
    let digits = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let half: String = (0..3000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(digits[(x % 64) as usize])
        })
        .collect();
    let long = format!("{half}{half}");
    peers[0].send_text(&long).unwrap();
    let short = "under the threshold";
    peers[0].send_text(short).unwrap();
    for (i, p) in peers.iter_mut().enumerate() {
        for want in [&long[..], short] {
            let got = loop {
                match p.next_event(Some(WAIT)).expect("next event") {
                    Some(ClientEvent::Text(t)) => break t,
                    Some(_) => {}
                    None => panic!("peer {i}: nothing within {WAIT:?}"),
                }
            };
            assert_eq!(got.len(), want.len(), "peer {i}");
            assert!(got == want, "peer {i}");
        }
    }
    let inflated: Vec<u64> = peers.iter().map(|p| p.deflate_stats().inflated_in).collect();
    assert!(inflated[0] > 0 && inflated[0] * 2 < long.len() as u64, "{inflated:?}");
    assert_eq!(inflated[0], inflated[1], "the same compressed bytes for both");
    assert_eq!(inflated[2], 0, "plain for the peer that did not agree");
    assert_eq!(text(&next_data(&mut plain)), long);
    assert_eq!(text(&next_data(&mut plain)), short);
    // The 10-bit variant: compressed within its window, and not the same bytes.
    let read_frame = |s: &mut TcpStream| {
        let mut h = [0u8; 4];
        std::io::Read::read_exact(s, &mut h[..2]).unwrap();
        let len = match h[1] {
            126 => {
                std::io::Read::read_exact(s, &mut h[2..4]).unwrap();
                usize::from(u16::from_be_bytes([h[2], h[3]]))
            }
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        std::io::Read::read_exact(s, &mut payload).unwrap();
        (h[0], payload)
    };
    let (b0, z) = read_frame(&mut small);
    assert_eq!(b0, 0xc1, "FIN, RSV1, text");
    assert!(
        z.len() as u64 > inflated[0] * 3 / 2,
        "a 10-bit window cannot reach the repeat: {} against {} bytes",
        z.len(),
        inflated[0]
    );
    let mut out = Vec::new();
    wsloop::proto::deflate::Decompressor::new()
        .decompress(&z, 1 << 20, &mut out)
        .unwrap();
    assert!(out == long.as_bytes());
    let (b0, raw) = read_frame(&mut small);
    assert_eq!((b0, &raw[..]), (0x81, short.as_bytes()));
}
