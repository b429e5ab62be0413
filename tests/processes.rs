//! `wsloop serve --processes N`: workers on one port, a killed worker restarted, SIGTERM passed
//! on to every worker (close 1001 to every peer).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tungstenite::Message as TMessage;

type Ws = tungstenite::WebSocket<common::Tcp>;

fn ws_connect(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/"), common::Tcp(stream)).expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Whether the connection still echoes.
fn echoes(ws: &mut Ws, text: &str) -> bool {
    ws.send(TMessage::text(text)).is_ok() && matches!(ws.read(), Ok(TMessage::Text(t)) if t.as_str() == text)
}

/// The pid in the last `worker N started (pid P)` line.
fn worker_pid(stderr: &str, n: usize) -> Option<u32> {
    let pat = format!("worker {n} started (pid ");
    let at = stderr.rfind(&pat)? + pat.len();
    stderr[at..].split(')').next()?.parse().ok()
}

/// Worker `n`'s open connections in its last stats line after byte `from` of stderr.
fn worker_open(stderr: &str, n: usize, from: usize) -> Option<u64> {
    let pat = format!("stats w{n} open=");
    let at = stderr.get(from..)?.rfind(&pat)? + from + pat.len();
    stderr[at..].split(' ').next()?.parse().ok()
}

fn wait_until(what: &str, server: &common::ServerProcess, mut ok: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&server.stderr()) {
        assert!(Instant::now() < deadline, "{what}; stderr:\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn two_processes_share_the_port_restart_a_killed_worker_and_stop_on_sigterm() {
    let mut server = common::spawn_server(&["--processes", "2", "--stats", "100ms"]);
    let addr = server.addr;
    // The listening line comes from the parent once both workers listen.
    let (w1, w2) = {
        let e = server.stderr();
        (
            worker_pid(&e, 1).expect("worker 1"),
            worker_pid(&e, 2).expect("worker 2"),
        )
    };
    assert_ne!(w1, w2);
    let mut peers: Vec<Ws> = (0..40).map(|_| ws_connect(addr)).collect();
    for (i, ws) in peers.iter_mut().enumerate() {
        assert!(echoes(ws, &format!("hello {i}")));
    }
    // The kernel spread the connections over both workers (all 40 on one: odds of 2^-39).
    let mut on_w1 = 0;
    wait_until(
        "both workers report their share of 40 connections",
        &server,
        |e| match (worker_open(e, 1, 0), worker_open(e, 2, 0)) {
            (Some(a), Some(b)) if a + b == 40 => {
                on_w1 = a;
                a > 0 && b > 0
            }
            _ => false,
        },
    );

    // A killed worker is reported and replaced; its peers lost their connections, the other
    // worker's peers did not notice.
    signal("-KILL", w1);
    wait_until("worker 1's death reported and a new worker 1 started", &server, |e| {
        e.contains(&format!(
            "worker 1 (pid {w1}) killed by signal 9; restarting it in 100 ms"
        )) && worker_pid(e, 1).is_some_and(|p| p != w1)
    });
    let after_restart = server.stderr().len();
    let mut alive = Vec::new();
    for (i, mut ws) in peers.drain(..).enumerate() {
        if echoes(&mut ws, &format!("still there {i}")) {
            alive.push(ws);
        }
    }
    assert_eq!(alive.len() as u64, 40 - on_w1, "the connections of worker 2 survive");
    // New connections reach the new worker 1 too (all 30 on worker 2: odds of 2^-30).
    for _ in 0..30 {
        let mut ws = ws_connect(addr);
        assert!(echoes(&mut ws, "new"));
        alive.push(ws);
    }
    wait_until("the new worker 1 serves", &server, |e| {
        worker_open(e, 1, after_restart).is_some_and(|n| n > 0)
    });

    // SIGTERM to the parent: every peer of every worker gets close 1001, and the parent
    // exits 0 once the workers have.
    signal("-TERM", server.pid());
    for mut ws in alive {
        match ws.read() {
            Ok(TMessage::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
        let _ = ws.flush();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = server.child_mut().try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the parent did not exit: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}: {}", server.stderr());
    for pid in [w2, worker_pid(&server.stderr(), 1).unwrap()] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} left behind"
        );
    }
}

#[test]
fn a_busy_port_and_bad_counts_give_one_line_errors() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_wsloop");
    // A busy port is a failure (status 1), bad counts are bad usage (status 2).
    for (args, status, expect) in [
        (
            vec!["serve", "--listen", &port, "--processes", "2"],
            1,
            "cannot listen on",
        ),
        (vec!["serve", "--processes", "0"], 2, "invalid --processes"),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--processes",
                "2",
                "--max-connections",
                "100000000",
            ],
            2,
            "processes are too few",
        ),
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

/// Loop `t` of worker `n`: its open connections in its last stats line.
fn loop_open(stderr: &str, n: usize, t: usize) -> Option<u64> {
    let pat = format!("stats w{n} t{t} open=");
    let at = stderr.rfind(&pat)? + pat.len();
    stderr[at..].split(' ').next()?.parse().ok()
}

/// Whether the text message has arrived (waiting 50 ms at most).
fn received(ws: &mut Ws, text: &str) -> bool {
    ws.get_mut()
        .0
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    matches!(ws.read(), Ok(TMessage::Text(t)) if t.as_str() == text)
}

#[test]
fn workers_run_their_threads_and_a_broadcast_reaches_every_loop_of_its_process_only() {
    let server = common::spawn_server(&[
        "--processes",
        "2",
        "--threads",
        "2",
        "--mode",
        "broadcast",
        "--stats",
        "100ms",
    ]);
    let mut peers: Vec<Ws> = (0..48).map(|_| ws_connect(server.addr)).collect();
    // Four listeners on the port, two per worker; each gets some of the 48 (all 48 missing
    // one of them: odds of 4 x (3/4)^48, under 1 in 20,000).
    let mut open = [[0u64; 2]; 2];
    wait_until("every loop of both workers reports its share of 48", &server, |e| {
        for (w, row) in open.iter_mut().enumerate() {
            for (t, n) in row.iter_mut().enumerate() {
                *n = loop_open(e, w + 1, t).unwrap_or(0);
            }
        }
        open.iter().flatten().sum::<u64>() == 48 && open.iter().flatten().all(|&n| n > 0)
    });
    // One peer's message reaches every peer of its own worker, on both of its loops (the
    // sender included), and no peer of the other worker.
    assert!(peers[0].send(TMessage::text("to my process")).is_ok());
    std::thread::sleep(Duration::from_millis(500));
    let got = peers
        .iter_mut()
        .map(|ws| received(ws, "to my process"))
        .filter(|&r| r)
        .count() as u64;
    let per_worker = [open[0][0] + open[0][1], open[1][0] + open[1][1]];
    assert!(
        per_worker.contains(&got),
        "{got} peers got it; per worker {per_worker:?}, per loop {open:?}"
    );
}

/// Sends SIGKILL to a stopped worker when dropped, so that a failing test leaves no process
/// stopped forever (a stopped worker does not act on the SIGTERM it gets when the parent dies).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::path::Path::new(&format!("/proc/{}", self.0)).exists() {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
}

#[test]
fn a_hung_worker_is_killed_and_replaced_and_every_new_client_is_served() {
    let server = common::spawn_server(&["--processes", "4"]);
    let e = server.stderr();
    let pids: Vec<u32> = (1..=4).map(|n| worker_pid(&e, n).expect("worker pid")).collect();
    // Worker 2 stops answering: its loop runs no more, but the kernel still hands its
    // listener a share of new connections.
    let hung = pids[1];
    let _cleanup = KillOnDrop(hung);
    let stopped_at = Instant::now();
    signal("-STOP", hung);
    wait_until("worker 2 found hung, killed and started anew", &server, |e| {
        e.contains(&format!("worker 2 (pid {hung}) stopped answering"))
            && e.contains(&format!("worker 2 (pid {hung}) killed by signal 9"))
            && worker_pid(e, 2).is_some_and(|p| p != hung)
    });
    let replaced_in = stopped_at.elapsed();
    assert!(replaced_in <= Duration::from_secs(10), "replaced after {replaced_in:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{hung}")).exists(),
        "the hung worker is gone"
    );
    eprintln!("a stopped worker was replaced {replaced_in:?} after SIGSTOP");
    // The other workers, idle all along, were not taken for hung.
    let e = server.stderr();
    for n in [1, 3, 4] {
        assert_eq!(worker_pid(&e, n), Some(pids[n - 1]), "worker {n} kept: {e}");
    }
    assert_eq!(e.matches("stopped answering").count(), 1, "{e}");
    // Every fresh client is served, by a live worker: none hangs on the stopped one's queue
    // (ws_connect gives up after 10 s without an answer).
    for i in 0..40 {
        let mut ws = ws_connect(server.addr);
        assert!(echoes(&mut ws, &format!("fresh {i}")), "client {i}");
    }
}

#[test]
fn a_busy_worker_is_not_taken_for_a_hung_one() {
    let server = common::spawn_server(&["--processes", "2"]);
    let e = server.stderr();
    let pids = [worker_pid(&e, 1).unwrap(), worker_pid(&e, 2).unwrap()];
    // Eight peers keep both workers echoing 256 KiB messages for longer than the silence
    // after which a worker counts as hung (3 s).
    let payload = vec![7u8; 256 << 10];
    let deadline = Instant::now() + Duration::from_secs(5);
    let peers: Vec<_> = (0..8)
        .map(|_| {
            let mut ws = ws_connect(server.addr);
            let payload = payload.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u32;
                while Instant::now() < deadline {
                    ws.send(TMessage::binary(payload.clone())).unwrap();
                    match ws.read().unwrap() {
                        TMessage::Binary(b) => assert_eq!(b.len(), payload.len()),
                        other => panic!("{other:?}"),
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let rounds: u32 = peers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(rounds > 8, "the workers were kept busy ({rounds} echoes)");
    let e = server.stderr();
    assert!(!e.contains("stopped answering"), "{e}");
    assert_eq!([worker_pid(&e, 1), worker_pid(&e, 2)], pids.map(Some), "{e}");
}
