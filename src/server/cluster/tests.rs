//! The bus against a real redis-server (skipped with a loud message when it is not installed,
//! a failure under `CI=true`).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::resp::Limits;
use super::{Bus, ClusterConfig, ClusterState, Inbound, Target};
use crate::io::budget::Budget;
use crate::proto::frame::OpCode;

#[path = "../../../tests/common/redis.rs"]
mod redis_server;

use redis_server::RedisServer;

const MAX_MESSAGE: usize = 64 << 10;

/// A delivery as the fake server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    target: String,
    op: OpCode,
    payload: Vec<u8>,
    except: Option<u128>,
}

/// An `Inbound` that records what it is given; it can be made slow.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Got>>,
    open: AtomicUsize,
    slow: AtomicBool,
}

impl Inbound for Recorder {
    fn deliver(&self, target: Target<'_>, op: OpCode, payload: &[u8], except: Option<u128>) -> usize {
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let target = match target {
            Target::All => "all".to_string(),
            Target::Topic(t) => format!("topic {t}"),
            Target::Conn(c) => format!("conn {c:x}"),
        };
        self.got.lock().unwrap().push(Got {
            target,
            op,
            payload: payload.to_vec(),
            except,
        });
        0
    }

    fn local_open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Recorder {
    fn payloads(&self) -> Vec<String> {
        let got = self.got.lock().unwrap();
        got.iter()
            .map(|g| String::from_utf8_lossy(&g.payload).into_owned())
            .collect()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

/// The bus's log lines (those starting with "cluster:"), from every test of this process.
struct Capture(Mutex<Vec<(log::Level, String)>>);

static LOGS: Capture = Capture(Mutex::new(Vec::new()));

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = record.args().to_string();
        if line.starts_with("cluster:") {
            self.0.lock().unwrap().push((record.level(), line));
        }
    }
    fn flush(&self) {}
}

/// The captured lines at `level` that contain `needle`.
fn logged(level: log::Level, needle: &str) -> Vec<String> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&LOGS).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    });
    let logs = LOGS.0.lock().unwrap();
    logs.iter()
        .filter(|(l, s)| *l == level && s.contains(needle))
        .map(|(_, s)| s.clone())
        .collect()
}

struct Node {
    bus: Arc<Bus>,
    rec: Arc<Recorder>,
    budget: Arc<Budget>,
}

fn config(url: &str, heartbeat_ms: u64) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(url).unwrap();
    cfg.heartbeat = Duration::from_millis(heartbeat_ms);
    cfg
}

fn node_with(cfg: &ClusterConfig, instance: u64) -> Node {
    let rec = Arc::new(Recorder::default());
    let budget = Budget::new(64 << 20);
    let bus = Bus::start(cfg, instance, MAX_MESSAGE, Arc::clone(&budget), rec.clone()).unwrap();
    Node { bus, rec, budget }
}

fn node(url: &str, instance: u64) -> Node {
    node_with(&config(url, 1000), instance)
}

/// Waits (polling, at most `secs`) until `cond` holds.
fn wait(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn up(nodes: &[&Node]) {
    let ok = wait(10, || nodes.iter().all(|n| n.bus.stats().state == ClusterState::Up));
    let states: Vec<_> = nodes.iter().map(|n| (n.bus.stats(), n.bus.diagnostics())).collect();
    assert!(ok, "not all up: {states:?}");
}

fn text(bus: &Bus, target: Target<'_>, s: &str) -> bool {
    bus.send(target, OpCode::Text, s.as_bytes(), None)
}

#[test]
fn two_buses_deliver_each_others_broadcasts_once_in_order_never_their_own() {
    let Some(redis) = RedisServer::start() else { return };
    let a = node(&redis.url(), 0xa);
    let b = node(&redis.url(), 0xb);
    up(&[&a, &b]);
    for i in 0..200 {
        assert!(text(&a.bus, Target::All, &format!("a{i}")));
        assert!(text(&b.bus, Target::All, &format!("b{i}")));
    }
    assert!(a.bus.send(Target::All, OpCode::Binary, b"\xffa", Some(0xa << 64 | 5)));
    assert!(wait(10, || a.rec.count() >= 200 && b.rec.count() >= 201));
    // Nothing more comes (no duplicate, no echo of one's own).
    std::thread::sleep(Duration::from_millis(300));
    let want_a: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
    assert_eq!(a.rec.payloads(), want_a);
    let got_b = b.rec.got.lock().unwrap().clone();
    assert_eq!(got_b.len(), 201);
    for (i, g) in got_b[..200].iter().enumerate() {
        assert_eq!(
            (g.target.as_str(), g.op, g.payload.clone(), g.except),
            ("all", OpCode::Text, format!("a{i}").into_bytes(), None)
        );
    }
    assert_eq!(
        got_b[200],
        Got {
            target: "all".into(),
            op: OpCode::Binary,
            payload: b"\xffa".to_vec(),
            except: Some(0xa << 64 | 5)
        }
    );
    let (sa, sb) = (a.bus.stats(), b.bus.stats());
    assert_eq!((sa.published, sa.received, sa.lost, sa.dropped_out), (201, 200, 0, 0));
    assert_eq!((sb.published, sb.received, sb.lost, sb.dropped_out), (200, 201, 0, 0));
    assert_eq!(a.budget.used(), 0, "everything written, nothing left charged");
    assert!(a.bus.stop_cleanly() && b.bus.stop_cleanly());
}

#[test]
fn a_topic_is_subscribed_on_first_join_and_unsubscribed_on_last_leave() {
    let Some(redis) = RedisServer::start() else { return };
    let a = node(&redis.url(), 0xa);
    let b = node(&redis.url(), 0xb);
    up(&[&a, &b]);
    let channels = || redis.command(&["PUBSUB", "CHANNELS", "wsloop:t:*"]);
    assert_eq!(channels(), "");
    a.bus.topic_joined("news");
    a.bus.topic_joined("news");
    a.bus.topic_joined("sport");
    assert!(
        wait(5, || channels() == "wsloop:t:news\nwsloop:t:sport"),
        "{}",
        channels()
    );
    assert!(text(&b.bus, Target::Topic("news"), "headline"));
    assert!(wait(5, || a.rec.count() == 1));
    assert_eq!(a.rec.got.lock().unwrap()[0].target, "topic news");
    a.bus.topic_left("news");
    a.bus.topic_left("sport");
    assert!(wait(5, || channels() == "wsloop:t:news"), "{}", channels());
    a.bus.topic_left("news");
    assert!(wait(5, || channels().is_empty()), "{}", channels());
    // Leaving a topic never joined changes nothing.
    a.bus.topic_left("nothing");
    assert!(text(&b.bus, Target::Topic("news"), "unheard"));
    assert!(text(&b.bus, Target::All, "heard"));
    assert!(wait(5, || a.rec.count() == 2));
    assert_eq!(a.rec.payloads(), ["headline", "heard"]);
}

#[test]
fn a_message_for_one_connection_reaches_only_its_instance() {
    let Some(redis) = RedisServer::start() else { return };
    let a = node(&redis.url(), 0xa);
    let b = node(&redis.url(), 0xb);
    let c = node(&redis.url(), 0xc);
    up(&[&a, &b, &c]);
    assert_eq!(b.bus.instance(), 0xb);
    let conn = 0xb_u128 << 64 | 0x1234;
    assert!(text(&a.bus, Target::Conn(conn), "just you"));
    assert!(text(&a.bus, Target::All, "everyone"));
    assert!(wait(5, || b.rec.count() == 2 && c.rec.count() == 1));
    std::thread::sleep(Duration::from_millis(200));
    let got = b.rec.got.lock().unwrap().clone();
    assert_eq!(got[0].target, format!("conn {conn:x}"));
    assert_eq!(got[0].payload, b"just you");
    assert_eq!(c.rec.payloads(), ["everyone"]);
    assert_eq!(a.rec.count(), 0);
}

#[test]
fn malformed_envelopes_are_counted_and_dropped() {
    let Some(redis) = RedisServer::start() else { return };
    let a = node(&redis.url(), 0xa);
    up(&[&a]);
    // Not an envelope; a text message that is not UTF-8.
    redis.command(&["PUBLISH", "wsloop:all", "hello"]);
    let mut bad_text = super::wire::encode(super::wire::Kind::Broadcast, Some(OpCode::Text), 9, 1, 0, b"ok");
    bad_text.push(0xff);
    redis.command_bytes(&[b"PUBLISH", b"wsloop:all", &bad_text]);
    let good = super::wire::encode(super::wire::Kind::Broadcast, Some(OpCode::Text), 9, 2, 0, b"fine");
    redis.command_bytes(&[b"PUBLISH", b"wsloop:all", &good]);
    assert!(
        wait(5, || a.bus.diagnostics().malformed == 2 && a.rec.count() == 1),
        "{:?}",
        a.bus.diagnostics()
    );
    assert_eq!(a.rec.payloads(), ["fine"]);
    // The gap before seq 2 from instance 9 is not counted: the first seen starts the count.
    assert_eq!(a.bus.stats().lost, 0);
}

#[test]
fn heartbeats_count_remote_connections_and_silent_instances_drop_out() {
    let Some(redis) = RedisServer::start() else { return };
    let a = node_with(&config(&redis.url(), 300), 0xa);
    let b = node_with(&config(&redis.url(), 100), 0xb);
    let c = node_with(&config(&redis.url(), 100), 0xc);
    a.rec.open.store(5, Ordering::Relaxed);
    b.rec.open.store(7, Ordering::Relaxed);
    c.rec.open.store(3, Ordering::Relaxed);
    up(&[&a, &b, &c]);
    assert!(
        wait(5, || a.bus.remote_open() == 10 && a.bus.stats().instances == 2),
        "{}",
        a.bus.remote_open()
    );
    assert!(wait(5, || b.bus.remote_open() == 8));
    // Counts follow the heartbeats.
    b.rec.open.store(9, Ordering::Relaxed);
    assert!(wait(5, || a.bus.remote_open() == 12));
    // Killed without a word: gone after 3 of a's heartbeats (900 ms), not before.
    assert!(c.bus.halt());
    let t = Instant::now();
    assert!(wait(5, || a.bus.remote_open() == 9), "{}", a.bus.remote_open());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(a.bus.stats().instances, 1);
    // A stop sends a leave notice: gone at once.
    let t = Instant::now();
    assert!(b.bus.stop_cleanly());
    assert!(wait(5, || a.bus.remote_open() == 0 && a.bus.stats().instances == 0));
    assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
}

#[test]
fn redis_unreachable_at_start_then_started() {
    let port = redis_server::free_port();
    if !redis_server::available() {
        return;
    }
    let url = format!("redis://127.0.0.1:{port}");
    logged(log::Level::Warn, "");
    let a = node(&url, 0xa);
    assert!(wait(5, || a.bus.diagnostics().last_error.is_some()));
    let err = a.bus.diagnostics().last_error.unwrap();
    assert!(err.contains("refused"), "{err}");
    assert_eq!(a.bus.stats().state, ClusterState::Connecting);
    assert!(!text(&a.bus, Target::All, "nobody"));
    assert_eq!(a.bus.stats().dropped_out, 1);
    assert_eq!(a.budget.used(), 0);
    std::thread::sleep(Duration::from_millis(500));
    // Several attempts, one warning for the outage.
    assert!(a.bus.diagnostics().attempts >= 3);
    let warned = logged(log::Level::Warn, &format!("redis 127.0.0.1:{port} "));
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].starts_with(&format!(
            "cluster: redis 127.0.0.1:{port} unreachable: Connection refused"
        )) && warned[0].ends_with("; serving locally, retrying"),
        "{warned:?}"
    );
    let Some(_redis) = RedisServer::start_on(port, &[]) else {
        return;
    };
    let b = node(&url, 0xb);
    up(&[&a, &b]);
    let connected = logged(
        log::Level::Info,
        &format!("connected to redis 127.0.0.1:{port} as instance 000000000000000a"),
    );
    assert_eq!(connected.len(), 1, "{connected:?}");
    assert_eq!(a.bus.stats().reconnects, 0, "the first connection is not a reconnect");
    assert!(a.bus.diagnostics().attempts >= 2);
    assert!(text(&a.bus, Target::All, "hello"));
    assert!(wait(5, || b.rec.payloads() == ["hello"]));
}

#[test]
fn redis_killed_and_restarted_on_the_same_port() {
    let Some(mut redis) = RedisServer::start() else { return };
    logged(log::Level::Warn, "");
    let a = node(&redis.url(), 0xa);
    let b = node(&redis.url(), 0xb);
    up(&[&a, &b]);
    a.bus.topic_joined("room");
    assert!(wait(5, || redis.command(&["PUBSUB", "CHANNELS", "wsloop:t:*"])
        == "wsloop:t:room"));
    redis.kill();
    assert!(wait(5, || a.bus.stats().state == ClusterState::Down
        && b.bus.stats().state == ClusterState::Down));
    let before = a.bus.stats().dropped_out;
    assert!(!text(&a.bus, Target::All, "lost"));
    assert_eq!(a.bus.stats().dropped_out, before + 1);
    // Long enough for a few attempts.
    std::thread::sleep(Duration::from_millis(800));
    redis.restart();
    let t = Instant::now();
    up(&[&a, &b]);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!((a.bus.stats().reconnects, b.bus.stats().reconnects), (1, 1));
    // One warning per bus for the outage, however many attempts it took.
    let warned = logged(log::Level::Warn, &format!("redis 127.0.0.1:{} unreachable", redis.port));
    assert_eq!(warned.len(), 2, "{warned:?}");
    // Resubscribed: the topic and the broadcasts flow again.
    assert_eq!(redis.command(&["PUBSUB", "CHANNELS", "wsloop:t:*"]), "wsloop:t:room");
    assert!(text(&b.bus, Target::Topic("room"), "back"));
    assert!(text(&b.bus, Target::All, "all back"));
    assert!(wait(5, || a.rec.count() == 2));
    assert_eq!(a.rec.payloads(), ["back", "all back"]);
}

#[test]
fn a_frozen_redis_never_blocks_send_and_the_queue_stays_bounded() {
    let Some(redis) = RedisServer::start() else { return };
    let mut cfg = config(&redis.url(), 1000);
    cfg.queue_limit = 256 << 10;
    let a = node_with(&cfg, 0xa);
    let b = node(&redis.url(), 0xb);
    up(&[&a, &b]);
    redis.pause();
    let payload = vec![b'x'; 4096];
    let (mut times, mut sent) = (Vec::new(), 0u64);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        let s = Instant::now();
        sent += a.bus.send(Target::All, OpCode::Binary, &payload, None) as u64;
        times.push(s.elapsed());
        let st = a.bus.stats();
        assert!(st.queued <= cfg.queue_limit, "{} queued", st.queued);
        assert!(a.budget.used() <= cfg.queue_limit, "{} charged", a.budget.used());
    }
    let st = a.bus.stats();
    redis.resume();
    // A send that waited on Redis would wait for the whole freeze; the rest is the machine's
    // scheduling (two cores shared by parallel tests).
    times.sort();
    let (p99, slowest) = (times[times.len() * 99 / 100], times[times.len() - 1]);
    assert!(
        p99 < Duration::from_millis(5) && slowest < Duration::from_millis(500),
        "p99 {p99:?}, slowest {slowest:?}"
    );
    let tries = times.len() as u64;
    assert!(
        st.dropped_out > 0 && st.dropped_out == tries - sent,
        "{st:?} after {tries} tries"
    );
    assert!(sent > 0);
    // Redis takes the backlog and the bus goes on.
    assert!(wait(10, || text(&a.bus, Target::All, "after") && {
        std::thread::sleep(Duration::from_millis(50));
        b.rec.payloads().last().is_some_and(|p| p == "after")
    }));
    assert!(wait(5, || a.bus.stats().queued == 0 && a.budget.used() == 0));
}

#[test]
fn a_subscriber_cut_off_by_redis_reconnects_and_counts_what_it_lost() {
    let Some(redis) = RedisServer::start() else { return };
    redis.command(&["CONFIG", "SET", "client-output-buffer-limit", "pubsub 64kb 32kb 1"]);
    let a = node(&redis.url(), 0xa);
    let b = node(&redis.url(), 0xb);
    up(&[&a, &b]);
    a.rec.slow.store(true, Ordering::Relaxed);
    let payload = vec![b'y'; 8192];
    let t = Instant::now();
    while a.bus.diagnostics().last_error.is_none()
        && a.bus.stats().reconnects == 0
        && t.elapsed() < Duration::from_secs(8)
    {
        if !b.bus.send(Target::All, OpCode::Binary, &payload, None) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    a.rec.slow.store(false, Ordering::Relaxed);
    assert!(
        a.bus.diagnostics().last_error.is_some() || a.bus.stats().reconnects > 0,
        "redis never cut the slow subscriber off: {:?}",
        a.bus.stats()
    );
    assert!(
        wait(10, || a.bus.stats().reconnects >= 1
            && a.bus.stats().state == ClusterState::Up),
        "{:?}",
        a.bus.stats()
    );
    let received = a.bus.stats().received;
    let mut n = 0;
    assert!(wait(8, || {
        n += 1;
        text(&b.bus, Target::All, &format!("after {n}"));
        a.rec.payloads().last().is_some_and(|p| p.starts_with("after"))
    }));
    let st = a.bus.stats();
    assert!(st.received > received);
    assert!(st.lost > 0, "{st:?}");
}

/// A server that answers every connection with `reply`, then holds it open.
fn hostile(reply: &'static [u8], stop: Arc<AtomicBool>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let _ = s.read(&mut [0u8; 1024]);
                    s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
                    let _ = s.write_all(reply);
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    port
}

#[test]
fn a_hostile_server_gets_a_clear_error_bounded_memory_and_retries() {
    let long_line: &'static [u8] = Box::leak([b"+".as_slice(), &[b'a'; 1 << 20]].concat().into_boxed_slice());
    let huge_bulk: &'static [u8] = Box::leak([b"$60000\r\n".as_slice(), &[b'b'; 200_000]].concat().into_boxed_slice());
    let big_then_garbage: &'static [u8] = Box::leak(
        [b"$120000\r\n".as_slice(), &[b'c'; 120_000], b"\r\n!"]
            .concat()
            .into_boxed_slice(),
    );
    let cases: [(&'static [u8], &str); 7] = [
        (big_then_garbage, "not a Redis server: the reply starts with '!'"),
        (b"\x00\x01garbage", "not a Redis server: the reply starts with 0x00"),
        (b"$9999999999999\r\n", "bulk length 9999999999999 over the limit"),
        (
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            "not a Redis server: the reply starts with 'H'",
        ),
        (b"-ERR unknown command 'PING'\r\n", "redis refused"),
        (long_line, "status line longer than 65536 bytes"),
        (huge_bulk, "not followed by CRLF"),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let nodes: Vec<_> = cases
        .iter()
        .map(|(reply, _)| {
            let port = hostile(reply, Arc::clone(&stop));
            node(&format!("redis://127.0.0.1:{port}"), 0xa)
        })
        .collect();
    let bound = Limits::for_messages(MAX_MESSAGE).total + super::bridge::READ_SPACE;
    for (n, (_, want)) in nodes.iter().zip(cases) {
        assert!(
            wait(8, || n.bus.diagnostics().attempts >= 2
                && n.bus.diagnostics().last_error.is_some_and(|e| e.contains(want))),
            "{want}: {:?}",
            n.bus.diagnostics()
        );
        let d = n.bus.diagnostics();
        assert!(
            d.read_buffer <= bound,
            "{want}: read buffer {} over {bound}",
            d.read_buffer
        );
        assert_eq!(n.bus.stats().state, ClusterState::Connecting);
        assert!(!text(&n.bus, Target::All, "x"));
        assert_eq!(n.budget.used(), 0);
        assert!(n.bus.stop_cleanly(), "{want}: the bridge thread panicked");
    }
    stop.store(true, Ordering::Relaxed);
}

#[cfg(feature = "tls")]
#[test]
fn rediss_connects_over_tls_with_a_private_ca() {
    #[path = "../../../tests/common/certs.rs"]
    mod certs;
    if !redis_server::available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("wsloop-rediss-{}", std::process::id()));
    let c = certs::make(&dir);
    let port = redis_server::free_port();
    let (cert, key, ca) = (
        c.cert.to_str().unwrap(),
        c.key.to_str().unwrap(),
        c.ca.to_str().unwrap(),
    );
    let tls_port = port.to_string();
    let args = [
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert,
        "--tls-key-file",
        key,
        "--tls-ca-cert-file",
        ca,
        "--tls-auth-clients",
        "no",
    ];
    let Some(_redis) = RedisServer::start_on(port, &args) else {
        return;
    };
    let mut cfg = config(&format!("rediss://127.0.0.1:{port}"), 1000);
    cfg.tls = Some(crate::tls::ClientTls::with_ca_file(&c.ca).unwrap());
    let a = node_with(&cfg, 0xa);
    let b = node_with(&cfg, 0xb);
    up(&[&a, &b]);
    assert!(text(&a.bus, Target::All, "over tls"));
    assert!(wait(5, || b.rec.payloads() == ["over tls"]));
    // Trusting another CA, the certificate is refused with a clear error.
    let other = certs::make(&dir.join("other"));
    cfg.tls = Some(crate::tls::ClientTls::with_ca_file(&other.ca).unwrap());
    let c = node_with(&cfg, 0xc);
    assert!(
        wait(5, || c
            .bus
            .diagnostics()
            .last_error
            .is_some_and(|e| e.contains("certificate not trusted (unknown issuer)"))),
        "{:?}",
        c.bus.diagnostics()
    );
    assert_eq!(c.bus.stats().state, ClusterState::Connecting);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_silent_server_times_out_without_the_bridge_spinning() {
    let stop = Arc::new(AtomicBool::new(false));
    let port = hostile(b"", Arc::clone(&stop));
    let a = node(&format!("redis://127.0.0.1:{port}"), 0xa);
    std::thread::sleep(Duration::from_millis(1000));
    let d = a.bus.diagnostics();
    assert_eq!((d.attempts, d.last_error.as_deref()), (1, None));
    assert!(d.turns < 20, "the bridge woke {} times in a second of waiting", d.turns);
    assert!(wait(5, || a.bus.diagnostics().last_error.is_some()));
    assert_eq!(a.bus.diagnostics().last_error.as_deref(), Some("no answer within 3 s"));
    assert!(a.bus.stop_cleanly());
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn auth_and_database_from_the_url() {
    let Some(redis) = RedisServer::start_on(redis_server::free_port(), &["--requirepass", "s3cr:t@x"]) else {
        return;
    };
    // The helper's commands carry no password: the checks go through the buses.
    let url = format!("redis://:s3cr%3At%40x@127.0.0.1:{}/2", redis.port);
    let a = node(&url, 0xa);
    let b = node(&url, 0xb);
    up(&[&a, &b]);
    assert!(text(&a.bus, Target::All, "authenticated"));
    assert!(wait(5, || b.rec.payloads() == ["authenticated"]));
    let wrong = node(&format!("redis://:nope@127.0.0.1:{}", redis.port), 0xc);
    assert!(wait(5, || wrong.bus.diagnostics().last_error.is_some()));
    let err = wrong.bus.diagnostics().last_error.unwrap();
    assert!(err.starts_with("redis refused AUTH: WRONGPASS"), "{err}");
    let no_db = node(&format!("redis://:s3cr%3At%40x@127.0.0.1:{}/99", redis.port), 0xd);
    assert!(wait(5, || no_db.bus.diagnostics().last_error.is_some()));
    let err = no_db.bus.diagnostics().last_error.unwrap();
    assert!(
        err.starts_with("redis refused SELECT: ERR DB index is out of range"),
        "{err}"
    );
    assert_eq!(no_db.bus.stats().state, ClusterState::Connecting);
}

#[test]
fn over_long_topics_stay_local() {
    let Some(redis) = RedisServer::start() else { return };
    let a = node(&redis.url(), 0xa);
    up(&[&a]);
    let long = "t".repeat(super::bridge::MAX_TOPIC + 1);
    a.bus.topic_joined(&long);
    a.bus.topic_joined("short");
    assert!(wait(5, || redis.command(&["PUBSUB", "CHANNELS", "wsloop:t:*"])
        == "wsloop:t:short"));
    assert!(!text(&a.bus, Target::Topic(&long), "x"));
    assert_eq!(a.bus.stats().dropped_out, 1);
    a.bus.topic_left(&long);
}
