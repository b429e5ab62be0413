//! Instances joined over Redis pub/sub (`ServerConfig::cluster`, `wsloop serve --cluster`),
//! against a real redis-server: broadcasts reach every peer of every instance once, in the
//! sender's order; topics, sends to one connection and peer counts cross instances; delivery
//! here never waits for Redis. Library servers in this process (each its own bus and instance),
//! and the binary with `--threads` and `--processes`.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::redis::RedisServer as Redis;
use common::{next_text, send_text, Tcp};
use wsloop::server::HandleError;
use wsloop::server::{Broadcast, Timer};
use wsloop::server::{ClusterConfig, ClusterState, ServerConfigError};
use wsloop::{Conn, ConnId, Ctx, Handle, Handler, Message, Server, ServerConfig};

/// Upper bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A silent instance leaves the counts after three heartbeats (1 s each by default).
const LEAVE_BOUND: Duration = Duration::from_secs(8);

type Client = common::WsClient;

/// A redis-server of this test's own, or `None` (skipped loudly; a failure under CI=true).
fn redis() -> Option<Redis> {
    Redis::start()
}

/// Broadcast mode, plus commands a test sends as text: `/id`, `/sub T`, `/unsub T`,
/// `/pub T TEXT`, `/to ID TEXT`, `/count`, `/loop`.
#[derive(Clone)]
struct Lab {
    inner: Broadcast,
}

impl Handler for Lab {
    type State = ();
    fn on_upgrade(
        &mut self,
        _: &mut Ctx<'_, ()>,
        _: &mut wsloop::server::Upgrade<'_>,
    ) -> Result<(), wsloop::proto::Answer> {
        Ok(())
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>) {
        self.inner.on_open(ctx, conn);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, msg: Message<'_>) {
        let Message::Text(text) = msg else { return };
        let me = conn.id();
        let mut words = text.splitn(3, ' ');
        let reply = match (words.next(), words.next(), words.next()) {
            (Some("/id"), None, None) => format!("id {}", me.as_u128()),
            (Some("/sub"), Some(t), None) => format!("sub {t} {}", ctx.subscribe(me, t)),
            (Some("/unsub"), Some(t), None) => format!("unsub {t} {}", ctx.unsubscribe(me, t)),
            (Some("/pub"), Some(t), Some(m)) => {
                ctx.publish(t, Message::Text(m), None);
                return;
            }
            (Some("/to"), Some(id), Some(m)) => {
                let Ok(id) = id.parse::<u128>() else { return };
                format!("to {}", ctx.send_text(ConnId::from_u128(id), m).is_ok())
            }
            (Some("/count"), None, None) => format!("count {}", ctx.len_everywhere()),
            (Some("/loop"), None, None) => format!("loop {}", ctx.loop_index()),
            _ => return self.inner.on_message(ctx, conn, msg),
        };
        ctx.send_text(me, &reply).unwrap();
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_, ()>, conn: &mut Conn<()>, code: u16, reason: &str) {
        self.inner.on_close(ctx, conn, code, reason);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, timer: Timer) {
        self.inner.on_timer(ctx, timer);
    }
}

/// A library server in this process with a cluster: its own bus and instance id.
struct Node {
    addr: SocketAddr,
    handle: Handle,
    done: mpsc::Receiver<std::io::Result<()>>,
}

fn cluster_config(redis: &Redis) -> ClusterConfig {
    ClusterConfig::new(&redis.url()).expect("the helper's URL")
}

fn node_with(cluster: ClusterConfig, inner: Broadcast) -> Node {
    node_on_loops(cluster, inner, 1)
}

fn node_on_loops(cluster: ClusterConfig, inner: Broadcast, threads: usize) -> Node {
    let mut cfg = ServerConfig::default();
    cfg.cluster = Some(cluster);
    cfg.threads = threads;
    let (ready_tx, ready) = mpsc::channel();
    let (tx, done) = mpsc::channel();
    thread::spawn(move || {
        let server = Server::bind("127.0.0.1:0", cfg).expect("bind 127.0.0.1:0");
        let _ = ready_tx.send((server.local_addr(), server.handle()));
        let _ = tx.send(server.run_threads(|_| Lab { inner: inner.clone() }));
    });
    let (addr, handle) = ready.recv_timeout(WAIT).expect("the server thread did not start");
    Node { addr, handle, done }
}

fn node(redis: &Redis, inner: Broadcast) -> Node {
    node_with(cluster_config(redis), inner)
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.handle.shutdown();
        let _ = self.done.recv_timeout(WAIT);
    }
}

/// Waits until every node's bus is up and sees the others in their heartbeats.
fn wait_up(nodes: &[&Node]) {
    for n in nodes {
        wait_sees(n, nodes.len() - 1);
    }
}

/// Waits until the node's bus is up and sees `others` other instances.
fn wait_sees(node: &Node, others: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = node.handle.cluster_stats();
        if stats.is_some_and(|s| s.state == ClusterState::Up && s.instances == others) {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster did not come up: {stats:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn connect(addr: SocketAddr) -> Client {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/"), Tcp(s)).expect("handshake");
    assert_eq!(resp.status(), 101);
    // Short reads from here on: `next_text` polls against its own deadline.
    ws.get_ref()
        .0
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    ws
}

fn expect_text(ws: &mut Client, what: &str) -> String {
    next_text(ws, WAIT).unwrap_or_else(|| panic!("no message within {WAIT:?}: expected {what}"))
}

/// Asserts nothing more arrives for a while (a message delivered twice would).
fn expect_silence(ws: &mut Client, who: &str) {
    if let Some(t) = next_text(ws, Duration::from_millis(300)) {
        panic!("{who} got an extra message: {t}");
    }
}

/// Every client sends `per` messages `m SENDER K`; every client of `receivers` must get each
/// message of every sender in `senders` exactly once, each sender's in order (and none of its
/// own when `echo_self` is off).
fn check_broadcasts(clients: &mut [Client], senders: &[usize], per: usize, echo_self: bool) {
    for k in 0..per {
        for &s in senders {
            send_text(&mut clients[s], &format!("m {s} {k}"));
        }
    }
    for (r, c) in clients.iter_mut().enumerate() {
        let from: Vec<usize> = senders.iter().copied().filter(|&s| echo_self || s != r).collect();
        let mut next = vec![0usize; senders.iter().max().map_or(0, |m| m + 1)];
        for _ in 0..from.len() * per {
            let t = expect_text(c, &format!("client {r}: the broadcasts of {from:?}"));
            let mut w = t.split(' ');
            assert_eq!(w.next(), Some("m"), "client {r}: {t}");
            let s: usize = w.next().unwrap().parse().unwrap();
            let k: usize = w.next().unwrap().parse().unwrap();
            assert!(from.contains(&s), "client {r} got a message from {s}: {t}");
            assert_eq!(k, next[s], "client {r}: sender {s}'s messages out of order or doubled");
            next[s] += 1;
        }
        expect_silence(c, &format!("client {r}"));
    }
}

/// How many connections subscribe to `channel` (`PUBSUB NUMSUB`): one per instance that
/// listens to it.
fn numsub(redis: &Redis, channel: &str) -> usize {
    // An array of the channel and its count, sorted as text: the count comes first.
    let a = redis.command(&["PUBSUB", "NUMSUB", channel]);
    a.lines()
        .find_map(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("PUBSUB NUMSUB answered {a:?}"))
}

fn wait_numsub(redis: &Redis, channel: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    while numsub(redis, channel) != n {
        assert!(
            Instant::now() < deadline,
            "{channel}: {} subscribers, expected {n}",
            numsub(redis, channel)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn broadcast_mode_reaches_every_peer_of_two_servers_once_in_order() {
    let Some(redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(true, false));
    let b = node(&redis, Broadcast::new(true, false));
    wait_up(&[&a, &b]);
    let mut clients: Vec<Client> = (0..6).map(|i| connect(if i < 3 { a.addr } else { b.addr })).collect();
    check_broadcasts(&mut clients, &[0, 1, 2, 3, 4, 5], 20, true);
    // A broadcast from a handle on another thread crosses too.
    let h = a.handle.clone();
    thread::spawn(move || h.broadcast_text("m 0 20").unwrap())
        .join()
        .unwrap();
    for (r, c) in clients.iter_mut().enumerate() {
        assert_eq!(expect_text(c, "the handle's broadcast"), "m 0 20", "client {r}");
    }
    let sa = a.handle.cluster_stats().unwrap();
    assert!(sa.published >= 61 && sa.received >= 60, "{sa:?}");
    assert_eq!((sa.lost, sa.dropped_in, sa.dropped_out), (0, 0, 0), "{sa:?}");
}

#[test]
fn without_echo_self_a_message_skips_its_sender_on_every_instance() {
    let Some(redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(false, false));
    let b = node(&redis, Broadcast::new(false, false));
    wait_up(&[&a, &b]);
    let mut clients: Vec<Client> = (0..4).map(|i| connect(if i < 2 { a.addr } else { b.addr })).collect();
    check_broadcasts(&mut clients, &[0, 3], 10, false);
}

#[test]
fn announcements_of_joins_and_leaves_cross_instances() {
    let Some(redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(true, true));
    let b = node(&redis, Broadcast::new(true, true));
    wait_up(&[&a, &b]);
    let mut on_a = connect(a.addr);
    let mine = on_a.get_ref().0.local_addr().unwrap();
    assert_eq!(
        expect_text(&mut on_a, "its own join"),
        format!("* {mine} joined (1 online)")
    );
    let on_b = connect(b.addr);
    let theirs = on_b.get_ref().0.local_addr().unwrap();
    let joined = expect_text(&mut on_a, "the join on the other instance");
    assert!(joined.starts_with(&format!("* {theirs} joined (")), "{joined}");
    drop(on_b);
    let left = expect_text(&mut on_a, "the leave on the other instance");
    assert!(left.starts_with(&format!("* {theirs} left (")), "{left}");
}

#[test]
fn topics_cross_instances_and_each_listens_only_while_it_has_subscribers() {
    let Some(redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(true, false));
    let b = node(&redis, Broadcast::new(true, false));
    wait_up(&[&a, &b]);
    let channel = "wsloop:t:news";
    let mut a1 = connect(a.addr);
    let (mut b1, mut b2) = (connect(b.addr), connect(b.addr));
    assert_eq!(numsub(&redis, channel), 0);
    for c in [&mut b1, &mut b2] {
        send_text(c, "/sub news");
        assert_eq!(expect_text(c, "subscribed"), "sub news true");
    }
    // B listens once for both of its subscribers; A has none, so does not listen.
    wait_numsub(&redis, channel, 1);
    // From a handler on A, and (once that has arrived: the two race) from a handle on
    // another thread.
    send_text(&mut a1, "/pub news from a handler");
    for c in [&mut b1, &mut b2] {
        assert_eq!(expect_text(c, "the handler's publish"), "from a handler");
    }
    let h = a.handle.clone();
    thread::spawn(move || h.publish_text("news", "from a handle").unwrap())
        .join()
        .unwrap();
    for c in [&mut b1, &mut b2] {
        assert_eq!(expect_text(c, "the handle's publish"), "from a handle");
    }
    expect_silence(&mut a1, "the publisher, not subscribed");
    // A subscriber on A too: both instances listen, and a publish on B reaches A's.
    send_text(&mut a1, "/sub news");
    assert_eq!(expect_text(&mut a1, "subscribed"), "sub news true");
    wait_numsub(&redis, channel, 2);
    send_text(&mut b1, "/pub news from b");
    for c in [&mut a1, &mut b1, &mut b2] {
        assert_eq!(expect_text(c, "B's publish"), "from b");
    }
    // B stops listening when its last subscriber leaves, by unsubscribing or by closing.
    send_text(&mut b1, "/unsub news");
    assert_eq!(expect_text(&mut b1, "unsubscribed"), "unsub news true");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(numsub(&redis, channel), 2, "B keeps listening for b2");
    drop(b2);
    wait_numsub(&redis, channel, 1);
    send_text(&mut a1, "/unsub news");
    assert_eq!(expect_text(&mut a1, "unsubscribed"), "unsub news true");
    wait_numsub(&redis, channel, 0);
    let channels = redis.command(&["PUBSUB", "CHANNELS", "wsloop:t:*"]);
    assert_eq!(channels, "", "no topic channel is listened to");
    // And nothing reaches a topic without subscribers.
    send_text(&mut b1, "/pub news nobody");
    expect_silence(&mut a1, "a1, unsubscribed");
    expect_silence(&mut b1, "b1, unsubscribed");
}

#[test]
fn a_server_listens_to_a_topic_while_any_of_its_loops_has_a_subscriber() {
    let Some(redis) = redis() else { return };
    let a = node_on_loops(cluster_config(&redis), Broadcast::new(true, false), 2);
    let b = node(&redis, Broadcast::new(true, false));
    wait_up(&[&a, &b]);
    // One client on each of A's loops (the kernel picks the loop: connect until both have one).
    let mut on: [Option<Client>; 2] = [None, None];
    for _ in 0..64 {
        let mut c = connect(a.addr);
        send_text(&mut c, "/loop");
        let lp: usize = expect_text(&mut c, "its loop")[5..].parse().unwrap();
        on[lp].get_or_insert(c);
        if on.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(mut l0), Some(mut l1)] = on else {
        panic!("64 connections and one of the two loops got none")
    };
    let channel = "wsloop:t:news";
    for c in [&mut l0, &mut l1] {
        send_text(c, "/sub news");
        assert_eq!(expect_text(c, "subscribed"), "sub news true");
    }
    wait_numsub(&redis, channel, 1);
    let mut b1 = connect(b.addr);
    send_text(&mut b1, "/pub news to both loops");
    for c in [&mut l0, &mut l1] {
        assert_eq!(expect_text(c, "B's publish"), "to both loops");
    }
    // Loop 0 has no subscriber left, loop 1 still has one: A keeps listening.
    send_text(&mut l0, "/unsub news");
    assert_eq!(expect_text(&mut l0, "unsubscribed"), "unsub news true");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(numsub(&redis, channel), 1, "A still listens for loop 1's subscriber");
    send_text(&mut b1, "/pub news to loop 1");
    assert_eq!(expect_text(&mut l1, "B's publish"), "to loop 1");
    expect_silence(&mut l0, "loop 0's client, unsubscribed");
    drop(l1);
    wait_numsub(&redis, channel, 0);
}

#[test]
fn delivery_here_never_waits_for_redis_and_comes_once() {
    let Some(mut redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(true, false));
    wait_up(&[&a]);
    let mut clients: Vec<Client> = (0..3).map(|_| connect(a.addr)).collect();
    // Redis hands every broadcast back to the instance that published it: dropped there, so
    // each peer gets each message once.
    check_broadcasts(&mut clients, &[0, 1, 2], 10, true);
    let deadline = Instant::now() + WAIT;
    while a.handle.cluster_stats().unwrap().published < 30 {
        assert!(Instant::now() < deadline, "{:?}", a.handle.cluster_stats());
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        a.handle.cluster_stats().unwrap().received,
        0,
        "its own messages are not received"
    );
    // Redis gone: the peers here still get every message at once.
    redis.kill();
    let deadline = Instant::now() + WAIT;
    while a.handle.cluster_stats().unwrap().state != ClusterState::Down {
        assert!(Instant::now() < deadline, "{:?}", a.handle.cluster_stats());
        thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    check_broadcasts(&mut clients, &[0, 1, 2], 10, true);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let elsewhere = ConnId::from_u128((1 << 64) | 5);
    assert_eq!(
        a.handle.send_text(elsewhere, "for another instance"),
        Err(HandleError::Unreachable)
    );
    let s = a.handle.cluster_stats().unwrap();
    assert!(s.dropped_out >= 31, "sends to a Redis that is down are counted: {s:?}");
    // A server whose Redis never answers serves its own peers all the same.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let lone = node_with(ClusterConfig::new(&url).unwrap(), Broadcast::new(true, false));
    let mut clients: Vec<Client> = (0..2).map(|_| connect(lone.addr)).collect();
    check_broadcasts(&mut clients, &[0, 1], 5, true);
    assert_ne!(lone.handle.cluster_stats().unwrap().state, ClusterState::Up);
}

#[test]
fn a_connection_of_another_instance_is_reached_by_its_id() {
    let Some(redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(true, false));
    let b = node(&redis, Broadcast::new(true, false));
    wait_up(&[&a, &b]);
    assert_ne!(a.handle.instance(), 0);
    assert_ne!(a.handle.instance(), b.handle.instance());
    let (mut a1, mut b1) = (connect(a.addr), connect(b.addr));
    send_text(&mut b1, "/id");
    let id: u128 = expect_text(&mut b1, "its id")
        .strip_prefix("id ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ConnId::from_u128(id).instance(), b.handle.instance());
    send_text(&mut a1, &format!("/to {id} from a handler on A"));
    assert_eq!(expect_text(&mut a1, "queued"), "to true");
    assert_eq!(expect_text(&mut b1, "the message from A"), "from a handler on A");
    let h = a.handle.clone();
    thread::spawn(move || h.send_text(ConnId::from_u128(id), "from a handle of A").unwrap())
        .join()
        .unwrap();
    assert_eq!(expect_text(&mut b1, "the handle's message"), "from a handle of A");
    // Only that connection.
    expect_silence(&mut a1, "a1");
    let mut b2 = connect(b.addr);
    send_text(&mut a1, &format!("/to {id} once more"));
    assert_eq!(expect_text(&mut b1, "the second message"), "once more");
    expect_silence(&mut b2, "b2");
}

/// `len_everywhere` as the handler sees it.
fn count(c: &mut Client) -> usize {
    send_text(c, "/count");
    let t = expect_text(c, "the count");
    t.strip_prefix("count ").unwrap().parse().unwrap()
}

/// Waits (`within` at most) until `len_everywhere` is `n`.
fn wait_count(c: &mut Client, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = count(c);
        if got == n {
            return;
        }
        assert!(Instant::now() < deadline, "count {got}, expected {n}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// `wsloop serve --cluster URL ARGS`.
fn serve(redis: &Redis, args: &[&str]) -> common::ServerProcess {
    let url = redis.url();
    let mut all = vec!["--cluster", url.as_str()];
    all.extend_from_slice(args);
    common::spawn_server(&all)
}

#[test]
fn counts_add_up_over_instances_and_a_killed_one_leaves_them() {
    let Some(redis) = redis() else { return };
    let a = node(&redis, Broadcast::new(true, false));
    let b = node(&redis, Broadcast::new(true, false));
    wait_up(&[&a, &b]);
    let mut a1 = connect(a.addr);
    let _a2 = connect(a.addr);
    let _on_b: Vec<Client> = (0..3).map(|_| connect(b.addr)).collect();
    wait_count(&mut a1, 5, WAIT);
    // An instance in another process, killed without a word: it leaves the count within
    // three heartbeats.
    let mut other = serve(&redis, &["--mode", "broadcast"]);
    let _on_other: Vec<Client> = (0..4).map(|_| connect(other.addr)).collect();
    wait_count(&mut a1, 9, WAIT);
    other.child_mut().kill().unwrap();
    other.child_mut().wait().unwrap();
    let killed = Instant::now();
    wait_count(&mut a1, 5, LEAVE_BOUND);
    assert!(killed.elapsed() <= LEAVE_BOUND);
    // It stays so.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&mut a1), 5);
}

/// The last `cluster=…` part of the stats lines of `tag` (e.g. `w1` or `w1 t0`).
fn cluster_part(stderr: &str, tag: &str) -> Option<String> {
    let pat = format!("stats {tag} open=");
    let line = stderr.lines().rev().find(|l| l.starts_with(&pat))?;
    Some(line[line.find(" cluster=")? + 1..].to_string())
}

fn wait_stderr(what: &str, server: &common::ServerProcess, mut ok: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok(&server.stderr()) {
        assert!(Instant::now() < deadline, "{what}; stderr:\n{}", server.stderr());
        thread::sleep(Duration::from_millis(20));
    }
}

/// Worker `n`'s open connections (summed over its loops' last lines).
fn open_of(stderr: &str, tag: &str) -> u64 {
    let pat = format!("stats {tag} open=");
    let Some(line) = stderr.lines().rev().find(|l| l.starts_with(&pat)) else {
        return 0;
    };
    line[pat.len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_worker_processes_are_two_instances_of_one_chat() {
    let Some(redis) = redis() else { return };
    let server = serve(&redis, &["--processes", "2", "--mode", "broadcast", "--stats", "100ms"]);
    wait_stderr("both workers see each other", &server, |e| {
        (1..=2).all(|w| cluster_part(e, &format!("w{w}")).is_some_and(|c| c.starts_with("cluster=up instances=1 ")))
    });
    let mut clients: Vec<Client> = (0..16).map(|_| connect(server.addr)).collect();
    // The kernel spread them over both workers (all 16 on one: odds of 2^-15).
    wait_stderr("both workers hold some of the 16", &server, |e| {
        let (w1, w2) = (open_of(e, "w1"), open_of(e, "w2"));
        w1 + w2 == 16 && w1 > 0 && w2 > 0
    });
    check_broadcasts(&mut clients, &[0, 5, 10, 15], 10, true);
    let stderr = server.stderr();
    for w in 1..=2 {
        let part = cluster_part(&stderr, &format!("w{w}")).unwrap();
        assert!(part.contains(" lost=0"), "worker {w}: {part}");
    }
}

#[test]
fn two_servers_with_two_threads_each_are_one_chat_without_echo() {
    let Some(redis) = redis() else { return };
    let args = [
        "--threads",
        "2",
        "--mode",
        "broadcast",
        "--no-echo-self",
        "--stats",
        "100ms",
    ];
    let (s1, s2) = (serve(&redis, &args), serve(&redis, &args));
    for s in [&s1, &s2] {
        wait_stderr("the other server seen", s, |e| {
            cluster_part(e, "t0").is_some_and(|c| c.starts_with("cluster=up instances=1 "))
        });
        // The cluster's part is the process's: on loop 0's line only.
        assert!(cluster_part(&s.stderr(), "t1").is_none());
    }
    let mut clients: Vec<Client> = (0..24)
        .map(|i| connect(if i % 2 == 0 { s1.addr } else { s2.addr }))
        .collect();
    // Both loops of each server hold some of its 12 (all on one: odds of 2^-11 per server).
    for s in [&s1, &s2] {
        wait_stderr("both loops hold some of the 12", s, |e| {
            let (t0, t1) = (open_of(e, "t0"), open_of(e, "t1"));
            t0 + t1 == 12 && t0 > 0 && t1 > 0
        });
    }
    check_broadcasts(&mut clients, &[0, 1, 2, 3], 10, false);
}

#[test]
fn prefixes_keep_clusters_on_one_redis_apart() {
    let Some(redis) = redis() else { return };
    let with_prefix = |p: &str| {
        let mut c = cluster_config(&redis);
        c.prefix = p.to_string();
        node_with(c, Broadcast::new(true, false))
    };
    let (a, b) = (with_prefix("one"), with_prefix("two"));
    let server = serve(&redis, &["--cluster-prefix", "two", "--mode", "broadcast"]);
    // `two` has two instances (b and the binary), `one` only a.
    wait_sees(&a, 0);
    wait_sees(&b, 1);
    let channels = redis.command(&["PUBSUB", "CHANNELS", "two:*"]);
    let own = format!("two:i:{:016x}", b.handle.instance());
    for c in ["two:all", "two:hb", own.as_str()] {
        assert!(channels.lines().any(|l| l == c), "{c} not in {channels:?}");
    }
    let (mut a1, mut b1, mut s1) = (connect(a.addr), connect(b.addr), connect(server.addr));
    send_text(&mut b1, "m 0 0");
    assert_eq!(expect_text(&mut b1, "its own message"), "m 0 0");
    assert_eq!(expect_text(&mut s1, "from the same prefix"), "m 0 0");
    expect_silence(&mut a1, "a client of the other prefix");
}

#[test]
fn bad_cluster_options_are_usage_errors() {
    let mut cfg = ServerConfig::default();
    let mut cluster = ClusterConfig::new("redis://127.0.0.1").unwrap();
    cfg.cluster = Some(cluster.clone());
    assert_eq!(cfg.check(), Ok(()));
    cluster.heartbeat = Duration::ZERO;
    cfg.cluster = Some(cluster.clone());
    assert_eq!(cfg.check(), Err(ServerConfigError::ClusterHeartbeatZero));
    cluster.heartbeat = Duration::from_secs(1);
    cluster.prefix.clear();
    cfg.cluster = Some(cluster);
    let err = Server::bind("127.0.0.1:0", cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let why = err.get_ref().and_then(|e| e.downcast_ref::<ServerConfigError>());
    assert_eq!(why, Some(&ServerConfigError::ClusterPrefixEmpty), "{err}");
    assert!(err.to_string().contains("cluster prefix"), "{err}");

    let bin = env!("CARGO_BIN_EXE_wsloop");
    for (args, expect) in [
        (vec!["--cluster", "http://localhost:6379"], "not a Redis URL"),
        (vec!["--cluster", "redis://localhost:99999"], "port"),
        (vec!["--cluster", "redis://localhost/x"], "database"),
        (vec!["--cluster-prefix", "chat"], "--cluster-prefix needs --cluster"),
        (
            vec!["--cluster", "redis://localhost", "--cluster-prefix", "two words"],
            "invalid --cluster-prefix",
        ),
    ] {
        let out = Command::new(bin).arg("serve").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // The password never shows.
    let out = Command::new(bin)
        .args(["serve", "--cluster", "redis://:hunter2@localhost:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
