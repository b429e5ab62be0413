//! Several loops on one port (`ServerConfig::threads`): both loops accept, a broadcast or publish
//! made on either reaches every loop's peers, a connection id of one loop is refused on another
//! (and reached through the handle instead), the connection limit counts every loop, and a
//! shutdown asked on one loop closes the peers of all with 1001.

mod common;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::read_text;
use tungstenite::Message as TMessage;
use wsloop::server::{Conn, ConnId, Ctx, Handler, Server, ServerConfig, ServerConfigError};
use wsloop::Message;

const WAIT: Duration = Duration::from_secs(10);

type Ws = tungstenite::WebSocket<common::Tcp>;

/// Ids of open connections by their number, filled by every loop.
type Ids = Arc<Mutex<HashMap<u64, ConnId>>>;

/// Tells each peer `hello LOOP ID`, then obeys text commands:
/// `all TEXT` broadcasts, `sub TOPIC` subscribes, `pub TOPIC TEXT` publishes,
/// `poke ID TEXT` tries connection ID from here (answering `refused SEND ADDR STATE`) and then
/// sends TEXT to it through the handle, `stop` shuts the server down.
struct Room {
    ids: Ids,
}

impl Handler for Room {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.ids.lock().unwrap().insert(conn.id().as_u64(), conn.id());
        let hello = format!("hello {} {}", ctx.loop_index(), conn.id().as_u64());
        let _ = ctx.send_text(conn.id(), &hello);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        let Message::Text(text) = msg else { return };
        let (cmd, rest) = text.split_once(' ').unwrap_or((text, ""));
        match cmd {
            "all" => {
                ctx.broadcast(Message::Text(rest), None);
            }
            "sub" => {
                assert!(ctx.subscribe(conn.id(), rest));
                let _ = ctx.send_text(conn.id(), "subscribed");
            }
            "pub" => {
                let (topic, what) = rest.split_once(' ').unwrap();
                ctx.publish(topic, Message::Text(what), None);
            }
            "poke" => {
                let (n, what) = rest.split_once(' ').unwrap();
                let id = self.ids.lock().unwrap()[&n.parse::<u64>().unwrap()];
                let sent = ctx.send_text(id, "the wrong connection").is_ok();
                let addr = ctx.peer_addr(id).is_some();
                let state = ctx.state_of(id).is_some();
                ctx.close(id, 4000, "must not happen");
                let answer = format!("refused {} {} {}", !sent, !addr, !state);
                let _ = ctx.send_text(conn.id(), &answer);
                ctx.handle().send_text(id, what).expect("the server runs");
            }
            "count" => {
                let answer = format!("open {} {}", ctx.len(), ctx.len_everywhere());
                let _ = ctx.send_text(conn.id(), &answer);
            }
            "stop" => ctx.shutdown(),
            _ => {}
        }
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, _code: u16, _reason: &str) {
        self.ids.lock().unwrap().remove(&conn.id().as_u64());
    }
}

struct Running {
    addr: SocketAddr,
    thread: Option<JoinHandle<io::Result<()>>>,
}

fn start(cfg: ServerConfig) -> Running {
    let server = Server::bind("127.0.0.1:0", cfg).expect("bind");
    let addr = server.local_addr();
    let ids = Ids::default();
    let thread = Some(thread::spawn(move || {
        server.run_threads(|_| Room { ids: Arc::clone(&ids) })
    }));
    Running { addr, thread }
}

impl Running {
    fn join(mut self) -> io::Result<()> {
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + WAIT;
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the server did not stop");
            thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("a loop panicked")
    }
}

fn two_loops() -> ServerConfig {
    let mut cfg = ServerConfig::default();
    cfg.threads = 2;
    cfg
}

/// A peer: its socket, the loop that owns it and its id's number.
struct Peer {
    ws: Ws,
    lp: usize,
    id: u64,
}

fn connect(addr: SocketAddr) -> Result<Peer, Box<tungstenite::Error>> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/"), common::Tcp(stream)).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => Box::new(e),
        tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
    })?;
    let hello = read_text(&mut ws);
    let mut words = hello.split(' ').skip(1);
    let lp = words.next().unwrap().parse().unwrap();
    let id = words.next().unwrap().parse().unwrap();
    Ok(Peer { ws, lp, id })
}

fn send(p: &mut Peer, text: &str) {
    p.ws.send(TMessage::text(text)).expect("send");
}

/// Connects until both loops have `each` peers (the kernel spreads connections by a hash of
/// their addresses: 64 tries leave one loop empty with odds of 2^-63).
fn peers_on_both(addr: SocketAddr, each: usize) -> Vec<Peer> {
    let mut peers = Vec::new();
    for _ in 0..64 {
        peers.push(connect(addr).expect("handshake"));
        let on = |lp| peers.iter().filter(|p| p.lp == lp).count();
        if on(0) >= each && on(1) >= each {
            return peers;
        }
    }
    panic!(
        "64 connections all went to one loop: {:?}",
        peers.iter().map(|p| p.lp).collect::<Vec<_>>()
    );
}

#[test]
fn both_loops_accept_and_a_broadcast_from_either_reaches_all() {
    let server = start(two_loops());
    let mut peers = peers_on_both(server.addr, 2);
    let ids: HashSet<u64> = peers.iter().map(|p| p.id).collect();
    assert_eq!(
        ids.len(),
        peers.len(),
        "every connection has its own id, whatever loop holds it"
    );

    for lp in [0, 1] {
        let from = peers.iter().position(|p| p.lp == lp).unwrap();
        let text = format!("from loop {lp}");
        send(&mut peers[from], &format!("all {text}"));
        for (i, p) in peers.iter_mut().enumerate() {
            assert_eq!(read_text(&mut p.ws), text, "peer {i} on loop {}", p.lp);
        }
    }

    let mut counter = peers.iter().position(|p| p.lp == 1).unwrap();
    send(&mut peers[counter], "count");
    let on1 = peers.iter().filter(|p| p.lp == 1).count();
    assert_eq!(read_text(&mut peers[counter].ws), format!("open {on1} {}", peers.len()));

    // A shutdown asked on loop 1 closes the peers of both loops with 1001.
    counter = peers.iter().position(|p| p.lp == 1).unwrap();
    send(&mut peers[counter], "stop");
    for p in &mut peers {
        match p.ws.read() {
            Ok(TMessage::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001, "loop {}", p.lp),
            other => panic!("peer on loop {} expected close 1001, got {other:?}", p.lp),
        }
    }
    drop(peers);
    server.join().expect("run_threads");
}

#[test]
fn a_connection_id_of_another_loop_is_refused_and_the_handle_routes_it() {
    let server = start(two_loops());
    let mut peers = peers_on_both(server.addr, 1);
    let a = peers.iter().position(|p| p.lp == 0).unwrap();
    let b = peers.iter().position(|p| p.lp == 1).unwrap();
    let b_id = peers[b].id;
    send(&mut peers[a], &format!("poke {b_id} through the handle"));
    assert_eq!(read_text(&mut peers[a].ws), "refused true true true");
    assert_eq!(read_text(&mut peers[b].ws), "through the handle");
    // Nothing reached loop 0's connections in that slot, and no one was closed: a broadcast
    // is the next thing every peer reads.
    send(&mut peers[a], "all still here");
    for p in &mut peers {
        assert_eq!(read_text(&mut p.ws), "still here");
    }
}

#[test]
fn a_publish_on_one_loop_reaches_subscribers_on_the_other() {
    let server = start(two_loops());
    let mut peers = peers_on_both(server.addr, 2);
    let subs: Vec<usize> = [0, 1]
        .iter()
        .map(|lp| peers.iter().position(|p| p.lp == *lp).unwrap())
        .collect();
    for &s in &subs {
        send(&mut peers[s], "sub news");
        assert_eq!(read_text(&mut peers[s].ws), "subscribed");
    }
    for lp in [0, 1] {
        let from = (0..peers.len())
            .find(|&i| peers[i].lp == lp && !subs.contains(&i))
            .unwrap();
        let text = format!("published on loop {lp}");
        send(&mut peers[from], &format!("pub news {text}"));
        for &s in &subs {
            assert_eq!(read_text(&mut peers[s].ws), text);
        }
    }
    // The others got nothing: a broadcast is the next thing they read.
    let from = subs[0];
    send(&mut peers[from], "all after");
    for p in &mut peers {
        assert_eq!(read_text(&mut p.ws), "after");
    }
}

#[test]
fn the_connection_limit_counts_every_loop() {
    let mut cfg = two_loops();
    cfg.max_connections = 4;
    let server = start(cfg);
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match connect(server.addr) {
            Ok(p) => open.push(p),
            Err(e) if matches!(*e, tungstenite::Error::Http(_)) => {
                let tungstenite::Error::Http(r) = *e else {
                    unreachable!()
                };
                assert_eq!(r.status(), 503);
                refused += 1;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((open.len(), refused), (4, 6), "four connections over both loops");
    // A place given back is open to the next connection, whichever loop it lands on.
    drop(open.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        match connect(server.addr) {
            Ok(_) => break,
            Err(e) if matches!(&*e, tungstenite::Error::Http(r) if r.status() == 503) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the freed place was not given back: {e}"),
        }
    }
}

#[test]
fn run_with_one_handler_refuses_several_loops_and_the_config_checks_the_count() {
    let server = Server::bind("127.0.0.1:0", two_loops()).expect("bind");
    let err = server.run(Room { ids: Ids::default() }).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("run_threads"), "{err}");
    for bad in [0, wsloop::server::MAX_THREADS + 1] {
        let mut cfg = ServerConfig::default();
        cfg.threads = bad;
        assert_eq!(cfg.check(), Err(ServerConfigError::Threads));
    }
}

/// permessage-deflate with two loops: every connection agreed to it, and a broadcast made on
/// either loop reaches the peers of both, intact, compressed, and the same size on the wire for
/// every peer.
#[cfg(feature = "deflate")]
#[test]
fn a_compressed_broadcast_reaches_the_peers_of_both_loops() {
    use wsloop::{Client, ClientConfig, ClientEvent};

    fn next_text(c: &mut Client) -> String {
        loop {
            match c.next_event(Some(WAIT)).expect("next event") {
                Some(ClientEvent::Text(t)) => return t,
                Some(ClientEvent::Pong(_)) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    let server = start(two_loops());
    let url = format!("ws://{}/", server.addr);
    // (client, loop) until both loops hold two; ClientConfig's default offers permessage-deflate.
    let mut peers: Vec<(Client, usize)> = Vec::new();
    let on = |peers: &[(Client, usize)], lp| peers.iter().filter(|p| p.1 == lp).count();
    while on(&peers, 0) < 2 || on(&peers, 1) < 2 {
        assert!(peers.len() < 64, "64 connections and one loop has fewer than two");
        let mut c = Client::connect(&url, ClientConfig::default()).expect("connect");
        let hello = next_text(&mut c);
        let lp = hello.split(' ').nth(1).unwrap().parse().unwrap();
        peers.push((c, lp));
    }
    for (i, (c, lp)) in peers.iter().enumerate() {
        let agreed = c
            .deflate()
            .unwrap_or_else(|| panic!("peer {i} on loop {lp}: no permessage-deflate"));
        assert!(!agreed.recv_context_takeover, "the server declines context takeover");
    }

    let mut before: Vec<u64> = peers.iter().map(|p| p.0.deflate_stats().inflated_in).collect();
    for lp in [0, 1] {
        let text = format!("from loop {lp}: ").repeat(500);
        let from = peers.iter().position(|p| p.1 == lp).unwrap();
        peers[from].0.send_text(&format!("all {text}")).unwrap();
        let mut on_wire = Vec::new();
        for (i, (c, on)) in peers.iter_mut().enumerate() {
            let got = next_text(c);
            assert_eq!(got.len(), text.len(), "peer {i} on loop {on}");
            assert!(got == text, "peer {i} on loop {on}: not the message sent");
            let inflated = c.deflate_stats().inflated_in;
            on_wire.push(inflated - before[i]);
            before[i] = inflated;
        }
        assert!(
            on_wire[0] > 0 && on_wire[0] * 4 < text.len() as u64,
            "broadcast from loop {lp}: it came compressed ({on_wire:?} of {} bytes)",
            text.len()
        );
        assert!(
            on_wire.iter().all(|&n| n == on_wire[0]),
            "broadcast from loop {lp}: the same compressed bytes on both loops: {on_wire:?}"
        );
    }
}
