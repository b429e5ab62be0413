//! The command line's manners: one exit-status table for every command (0 done, 1 failed,
//! 2 bad usage), one-line errors that point to `--help`, `help COMMAND` and `--version`
//! everywhere, zero and `off` handled alike, the page for `HEAD /` and `GET /?query`, the
//! server's reason when it refuses the client, `--count` that counts replies to our own sends,
//! a closed stdout, Ctrl-C, `--quiet`, and `bench` interrupted.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::spawn_server;

const WAIT: Duration = Duration::from_secs(15);

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `wsloop ARGS` to its end (killed after [`WAIT`]).
fn wsloop(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wsloop");
    let status = wait(&mut child, WAIT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`wsloop {}` did not finish within {WAIT:?}", args.join(" "))
    });
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Run { status, stdout, stderr }
}

fn wait(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// A local port with nothing listening on it.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--handshake-timeout", "0"],
            "--handshake-timeout must be above 0 (it cannot be off)",
        ),
        (
            &["serve", "--handshake-timeout", "off"],
            "--handshake-timeout must be above 0 (it cannot be off)",
        ),
        (
            &["serve", "--max-message", "0"],
            "--max-message must be at least 1 byte",
        ),
        (
            &["serve", "--max-backpressure", "0KiB"],
            "--max-backpressure must be at least 1 byte",
        ),
        (
            &["serve", "--max-connections", "0"],
            "--max-connections must be at least 1",
        ),
        (
            &["serve", "--threads", "0"],
            "invalid --threads '0' (1 to 256, or auto)",
        ),
        (
            &["serve", "--mode", "shout"],
            "invalid --mode 'shout' (echo, reply or broadcast)",
        ),
        (
            &["serve", "--stats", "often"],
            "invalid duration 'often' (use e.g. 2s, 500ms, 0.5s, 1m)",
        ),
        (
            &["serve", "--bogus"],
            "unknown option '--bogus' (see wsloop serve --help)",
        ),
        (&["--bogus"], "unknown option '--bogus' (see wsloop serve --help)"),
        (
            &["serve", "--listen", "nowhere"],
            "invalid --listen 'nowhere' (use IP:PORT, e.g. 127.0.0.1:9001 or [::1]:9001)",
        ),
        (
            &["client", "--every", "0"],
            "--every must be above 0 (it cannot be off)",
        ),
        (
            &["client", "--connect-timeout", "off"],
            "--connect-timeout must be above 0 (it cannot be off)",
        ),
        (&["client", "--count", "0"], "--count must be at least 1"),
        (
            &["client", "--max-message", "0"],
            "--max-message must be at least 1 byte",
        ),
        (
            &["client", "ws://a/", "ws://b/"],
            "unexpected argument 'ws://b/' (see wsloop client --help)",
        ),
        (
            &["client", "http://127.0.0.1/"],
            "cannot use URL 'http://127.0.0.1/': only ws:// and wss:// URLs are supported",
        ),
        (&["bench", "--connections", "0"], "--connections must be at least 1"),
        (
            &["bench", "--every", "off"],
            "--every must be above 0 (it cannot be off)",
        ),
        (&["bench", "--inflight", "0"], "--inflight must be at least 1"),
        (
            &["bench", "--ramp", "0/s"],
            "--ramp must be at least 1 connection per second",
        ),
        (
            &["bench", "--size", "3"],
            "the message size must be at least 16 bytes (a sequence number and a timestamp)",
        ),
        (&["bench", "-x"], "unknown option '-x' (see wsloop bench --help)"),
        (
            &["serve", "--max-memory", "64KiB"],
            "--max-memory must be at least 1MiB",
        ),
        (
            &["serve", "--max-connections-per-ip", "0"],
            "--max-connections-per-ip must be at least 1",
        ),
        (&["help", "dance"], "unknown command 'dance' (try: wsloop help)"),
        (&["dance"], "unknown command 'dance' (try: wsloop help)"),
    ];
    for (args, message) in cases {
        let run = wsloop(args);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr, format!("wsloop: {message}\n"), "{args:?}");
        assert_eq!(run.stdout, "", "{args:?}");
    }
}

#[test]
fn runtime_failures_exit_1() {
    let server = spawn_server(&[]);
    let taken = server.addr.to_string();
    let run = wsloop(&["serve", "--listen", &taken]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.starts_with(&format!("wsloop: cannot listen on {taken}: ")),
        "{}",
        run.stderr
    );

    let refused = format!("ws://127.0.0.1:{}/", free_port());
    // The client tells a failed connect apart (3); its exit statuses are in tests/client.rs.
    let run = wsloop(&["client", &refused]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    let run = wsloop(&[
        "bench",
        &refused,
        "--duration",
        "1s",
        "--quiet",
        "--source-ips",
        "127.0.0.1",
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stdout.contains("held 0 of 1"), "{}", run.stdout);
    // One socket says nothing about slab memory per socket: no figure, and it says why.
    let kernel = run
        .stdout
        .lines()
        .find(|l| l.starts_with("kernel"))
        .expect("a kernel line");
    assert!(
        kernel.ends_with("(system-wide, both ends; too noisy for a per-socket figure)"),
        "{kernel}"
    );
    assert!(
        run.stderr.ends_with("not every echo came back intact\n"),
        "{}",
        run.stderr
    );
    // The first error in plain words, in the report and its JSON: no Debug text.
    assert!(
        run.stdout.contains("first error  connect: connection refused\n"),
        "{}",
        run.stdout
    );
    let run = wsloop(&["bench", &refused, "--duration", "1s", "--quiet", "--json"]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("bench JSON");
    assert_eq!(report["first_error"], "connect: connection refused", "{report}");
    assert!(!run.stdout.contains("Os {"), "{}", run.stdout);
}

#[test]
fn help_and_version_for_every_command() {
    let top = wsloop(&["help"]);
    assert!(top.status.success());
    assert!(top.stdout.contains("Exit status: 0 done"), "{}", top.stdout);
    assert_eq!(wsloop(&["--help"]).stdout, top.stdout);
    let version = format!("wsloop {}\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(wsloop(&["--version"]).stdout, version);
    for command in ["serve", "client", "bench"] {
        let help = wsloop(&["help", command]);
        assert!(help.status.success(), "help {command}");
        assert!(
            help.stdout.starts_with(&format!("Usage: wsloop {command} ")),
            "help {command}: {}",
            help.stdout
        );
        assert!(help.stdout.contains("Exit status:"), "help {command}");
        assert_eq!(wsloop(&[command, "--help"]).stdout, help.stdout, "{command} --help");
        assert_eq!(wsloop(&[command, "-h"]).stdout, help.stdout, "{command} -h");
        for flag in ["--version", "-V"] {
            let run = wsloop(&[command, flag]);
            assert!(run.status.success(), "{command} {flag}: {}", run.stderr);
            assert_eq!(run.stdout, version, "{command} {flag}");
        }
    }
}

#[test]
fn help_into_a_closed_pipe_is_quiet() {
    // `wsloop help | head -1`, with the reader gone before anything is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(["help", "serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = wait(&mut child, WAIT).expect("exits");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(err, "");
}

#[test]
fn zero_or_off_turns_optional_durations_off() {
    let server = spawn_server(&[
        "--idle-timeout",
        "off",
        "--ping-interval",
        "0",
        "--tcp-keepalive",
        "0s",
        "--stats",
        "off",
    ]);
    let url = format!("ws://{}/", server.addr);
    let run = wsloop(&["client", &url, "--count", "1", "--every", "10ms", "-q"]);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout, "how are you?\n");
}

/// The whole answer to a plain request.
fn http(addr: SocketAddr, request_line: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "{request_line}\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    got
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

#[test]
fn head_and_a_query_get_the_page() {
    let server = spawn_server(&[]);
    let page = http(server.addr, "GET / HTTP/1.1");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    let body = page.split_once("\r\n\r\n").unwrap().1;
    assert!(body.contains("<title>wsloop echo console</title>"));

    let head = http(server.addr, "HEAD / HTTP/1.1");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&head, "content-length"), Some(body.len().to_string().as_str()));
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

    let query = http(server.addr, "GET /?x=1&utm_source=y HTTP/1.1");
    assert_eq!(query, page, "the query does not change the page");
    let head_query = http(server.addr, "HEAD /?x=1 HTTP/1.1");
    assert!(head_query.starts_with("HTTP/1.1 200 OK\r\n"), "{head_query}");

    assert!(http(server.addr, "GET /other HTTP/1.1").starts_with("HTTP/1.1 404 "));
    let post = http(server.addr, "POST / HTTP/1.1");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert_eq!(header(&post, "allow"), Some("GET, HEAD"));
}

#[test]
fn the_client_prints_the_servers_reason() {
    let server = spawn_server(&["--origin", "https://good.example"]);
    let url = format!("ws://{}/", server.addr);
    let run = wsloop(&["client", &url, "--header", "Origin: https://evil.example"]);
    assert_eq!(run.status.code(), Some(3));
    assert_eq!(
        run.stderr,
        "wsloop: server refused the upgrade: 403 Forbidden: origin not allowed\n"
    );

    let server = spawn_server(&["--max-connections", "1"]);
    let url = format!("ws://{}/", server.addr);
    let stream = TcpStream::connect(server.addr).unwrap();
    let (_held, _) = tungstenite::client(url.as_str(), common::Tcp(stream)).expect("the one connection");
    let run = wsloop(&["client", &url]);
    assert_eq!(run.status.code(), Some(3));
    assert_eq!(
        run.stderr,
        "wsloop: server refused the upgrade: 503 Service Unavailable: too many connections\n"
    );
}

#[test]
fn quiet_keeps_stderr_for_problems() {
    let server = spawn_server(&["--mode", "reply"]);
    let url = format!("ws://{}/", server.addr);
    let loud = wsloop(&["client", &url, "--count", "1", "--every", "10ms"]);
    assert!(loud.status.success());
    assert!(loud.stderr.contains("INFO  connected to "), "{}", loud.stderr);
    for q in ["-q", "--quiet"] {
        let run = wsloop(&["client", &url, "--count", "1", "--every", "10ms", q]);
        assert!(run.status.success(), "{}", run.stderr);
        assert_eq!(run.stdout, "fine thank you\n");
        assert_eq!(run.stderr, "", "{q}");
    }
}

/// Reads lines from `child`'s stdout until `n` have come.
fn read_lines(child: &mut Child, n: usize) -> (BufReader<std::process::ChildStdout>, Vec<String>) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "stdout ended after {lines:?}");
        lines.push(line);
    }
    (out, lines)
}

#[test]
fn a_closed_stdout_ends_the_client_quietly() {
    // `wsloop client URL --every 10ms | head -2`
    let server = spawn_server(&["--log", "debug"]);
    let url = format!("ws://{}/", server.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(["client", &url, "--every", "10ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, lines) = read_lines(&mut child, 2);
    assert_eq!(lines, ["how are you?\n", "how are you?\n"]);
    drop(out);
    let status = wait(&mut child, WAIT).expect("the client ends once its stdout is closed");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        !err.contains("wsloop:") && !err.to_lowercase().contains("pipe"),
        "{err}"
    );
    assert!(
        server.wait_for_stderr("disconnected (1000)", WAIT),
        "the client closes with 1000:\n{}",
        server.stderr()
    );
}

#[test]
fn ctrl_c_exits_0_connected_connecting_or_waiting_to_reconnect() {
    // Waiting to reconnect: nothing listens.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let url = format!("ws://127.0.0.1:{}/", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args(["client", &url, "--reconnect"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.contains("reconnecting in 500ms"), "{line}");
        signal(&child, sig);
        let status = wait(&mut child, WAIT).expect("exits on the signal");
        assert_eq!(
            status.code(),
            Some(0),
            "signal {sig} while waiting to reconnect: {status}"
        );
    }
    // Connected: closes with 1000 first.
    let server = spawn_server(&["--mode", "reply", "--log", "debug"]);
    let url = format!("ws://{}/", server.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(["client", &url, "--every", "20ms", "--reconnect"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (_out, lines) = read_lines(&mut child, 1);
    assert_eq!(lines, ["fine thank you\n"]);
    signal(&child, libc::SIGINT);
    let status = wait(&mut child, WAIT).expect("exits on the signal");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        server.wait_for_stderr("disconnected (1000)", WAIT),
        "{}",
        server.stderr()
    );
}

#[test]
fn sigterm_with_two_threads_closes_every_peer_with_1001_and_exits_0() {
    let mut server = spawn_server(&["--threads", "2"]);
    // 32 peers spread over both loops (all on one: odds of 2^-31).
    let mut peers: Vec<_> = (0..32)
        .map(|_| {
            let stream = TcpStream::connect(server.addr).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let url = format!("ws://{}/", server.addr);
            tungstenite::client(url, common::Tcp(stream)).unwrap().0
        })
        .collect();
    signal(server.child_mut(), libc::SIGTERM);
    for (i, ws) in peers.iter_mut().enumerate() {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001, "peer {i}"),
            other => panic!("peer {i}: expected close 1001, got {other:?}"),
        }
    }
    drop(peers);
    let status = wait(server.child_mut(), WAIT).expect("exits after the shutdown");
    assert_eq!(status.code(), Some(0), "{status}\n{}", server.stderr());
}

/// A broadcast room with a chatty member: a thread that keeps sending `noise` until dropped.
struct Chatter {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Chatter {
    fn join(addr: SocketAddr) -> Chatter {
        let stream = TcpStream::connect(addr).unwrap();
        let (mut ws, _) = tungstenite::client(format!("ws://{addr}/"), common::Tcp(stream)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            // Nonblocking reads: the broadcasts it gets back are read and dropped.
            ws.get_mut().0.set_nonblocking(true).unwrap();
            while !flag.load(Ordering::Relaxed) {
                if ws.send(tungstenite::Message::text("noise")).is_err() {
                    return;
                }
                while ws.read().is_ok() {}
                thread::sleep(Duration::from_millis(2));
            }
        });
        Chatter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn count_counts_replies_to_our_own_sends() {
    // Reply mode: the server never sends ours back, so each answer is a reply.
    let server = spawn_server(&["--mode", "reply"]);
    let url = format!("ws://{}/", server.addr);
    let run = wsloop(&["client", &url, "--count", "3", "--every", "10ms", "-q"]);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout, "fine thank you\n".repeat(3));

    // Broadcast mode with someone else talking: only our own messages coming back count.
    let server = spawn_server(&["--mode", "broadcast"]);
    let url = format!("ws://{}/", server.addr);
    let _chatter = Chatter::join(server.addr);
    let run = wsloop(&[
        "client", &url, "--count", "3", "--every", "100ms", "--send", "mine", "-q",
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.iter().filter(|l| **l == "mine").count(), 3, "{lines:?}");
    assert!(lines.contains(&"noise"), "the others' messages are printed: {lines:?}");
    // The run ended on our third echo, not on someone else's message.
    assert_eq!(lines.last(), Some(&"mine"), "{lines:?}");
}

#[test]
fn count_with_replies_missing_exits_1() {
    // Broadcast without echo to the sender, nobody else there: nothing ever comes back.
    let server = spawn_server(&["--mode", "broadcast", "--no-echo-self", "--log", "debug"]);
    let url = format!("ws://{}/", server.addr);
    let started = Instant::now();
    let run = wsloop(&["client", &url, "--count", "2", "--every", "10ms", "-q"]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert_eq!(
        run.stderr,
        "wsloop: 2 of 2 message(s) got no reply (waited 5s after the last)\n"
    );
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(
        server.wait_for_stderr("disconnected (1000)", WAIT),
        "it still closes cleanly: {}",
        server.stderr()
    );
}

#[test]
fn bench_interrupted_reports_what_ran() {
    let server = spawn_server(&[]);
    let url = format!("ws://{}/", server.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args([
            "bench",
            &url,
            "--connections",
            "5",
            "--every",
            "10ms",
            "--duration",
            "60s",
        ])
        .args(["--source-ips", "127.0.0.1", "--json", "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGINT);
    let status = wait(&mut child, WAIT).expect("the bench ends early");
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["interrupted"], true, "{out}");
    assert_eq!(json["held"], 5, "{out}");
    assert!(json["measured_s"].as_f64().unwrap() < 30.0, "{out}");
    assert!(json["measured_received"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(json["lost"], 0, "{out}");
    assert_eq!(status.code(), Some(0), "a clean run, cut short: {out}");
}

#[test]
fn the_help_says_what_max_connections_means_with_processes() {
    // `--max-connections 100 --processes 4` held 264 connections, and the help read as a total.
    let help = wsloop(&["serve", "--help"]).stdout;
    let start = help
        .find("  --max-connections N")
        .expect("--max-connections in the help");
    let entry: String = help[start..]
        .lines()
        .enumerate()
        .take_while(|(i, l)| *i == 0 || !l.trim_start().starts_with('-'))
        .map(|(_, l)| l.trim())
        .collect::<Vec<_>>()
        .join(" ");
    for words in [
        "With --processes P it is a limit per worker",
        "not a total",
        "the share N/P plus room for the kernel's uneven spread",
        "100 over 4: 66 each, up to 264 in all",
    ] {
        assert!(entry.contains(words), "{words:?} not in: {entry}");
    }
    // The example is what the workers are given.
    let server = spawn_server(&["--processes", "4", "--max-connections", "100"]);
    assert!(
        server
            .stderr()
            .contains("4 worker processes, up to 66 connections each"),
        "{}",
        server.stderr()
    );
}

#[test]
fn every_option_in_every_help_is_indented() {
    // A string continued with `\` at the end of a line drops the next line's indentation.
    for command in ["serve", "client", "bench"] {
        let help = wsloop(&["help", command]).stdout;
        let flush: Vec<&str> = help.lines().filter(|l| l.starts_with('-')).collect();
        assert!(flush.is_empty(), "help {command}: not indented: {flush:?}");
    }
}
