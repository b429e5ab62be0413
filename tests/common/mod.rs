//! Helpers shared by the integration tests.
//!
//! Every test binary that says `mod common;` compiles this module on its own,
//! and not every binary uses every helper, hence the blanket `dead_code` allow.
#![allow(dead_code)]

pub mod autobahn;
pub mod events;
pub mod redis;
pub mod venv;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long `spawn_server` waits for the "listening on" line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `wsloop serve` child process; killed and reaped on drop.
pub struct ServerProcess {
    /// The address the server reported it is listening on.
    pub addr: SocketAddr,
    child: Child,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything the server wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The child's process id (for `/proc/PID/status`, signals, ...).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child process itself, e.g. to send a signal and `wait` for it.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits up to `timeout` until the server's stderr contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends everything read from `pipe` to `buf`, line by line, until EOF.
/// Each complete line is also offered to `lines` (ignored once nobody listens).
pub fn drain_lines(
    pipe: impl Read + Send + 'static,
    buf: Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) -> thread::JoinHandle<()> {
    let mut reader = BufReader::new(pipe);
    thread::spawn(move || {
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw).into_owned();
                    buf.lock().unwrap_or_else(|e| e.into_inner()).push_str(&line);
                    if let Some(tx) = &lines {
                        let _ = tx.send(line);
                    }
                }
            }
        }
    })
}

/// Starts draining `stderr` into a shared buffer and waits (up to `timeout`)
/// for a line for which `find` returns `Some`. On timeout or early EOF the
/// error carries what was collected so far.
pub fn wait_for_line<T>(
    stderr: ChildStderr,
    timeout: Duration,
    mut find: impl FnMut(&str) -> Option<T>,
) -> (Arc<Mutex<String>>, Result<T, String>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    drain_lines(stderr, Arc::clone(&buf), Some(tx));
    let deadline = Instant::now() + timeout;
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(found) = find(&line) {
                    break Ok(found);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("no such line within {timeout:?}"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err("the process closed its stderr (exited?)".to_string());
            }
        }
    };
    (buf, result)
}

/// Parses the address out of a line like `... listening on 127.0.0.1:PORT`
/// (an optional `ws://` prefix and trailing punctuation are tolerated).
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let token = rest.split_whitespace().next()?;
    let token = token.strip_prefix("ws://").unwrap_or(token);
    let token = token.trim_end_matches(|c: char| !c.is_ascii_digit());
    token.parse().ok()
}

/// Runs `wsloop serve --listen 127.0.0.1:0 ARGS...` and waits until it logs
/// `listening on 127.0.0.1:PORT` on stderr. Panics (with the stderr collected)
/// if that line does not appear within 10 seconds.
pub fn spawn_server(args: &[&str]) -> ServerProcess {
    spawn_server_from(std::path::Path::new(env!("CARGO_BIN_EXE_wsloop")), args)
}

/// [`spawn_server`] with another `wsloop` binary.
pub fn spawn_server_from(binary: &std::path::Path, args: &[&str]) -> ServerProcess {
    let mut cmd = Command::new(binary);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
    spawn_listening(cmd)
}

/// Starts `cmd` and waits until it logs `listening on 127.0.0.1:PORT` on stderr. Panics (with
/// the stderr collected) if that line does not appear within 10 seconds.
pub fn spawn_listening(mut cmd: Command) -> ServerProcess {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));

    let stdout = Arc::new(Mutex::new(String::new()));
    drain_lines(child.stdout.take().expect("stdout is piped"), Arc::clone(&stdout), None);
    let (stderr, found) = wait_for_line(
        child.stderr.take().expect("stderr is piped"),
        STARTUP_TIMEOUT,
        parse_listening_line,
    );
    match found {
        Ok(addr) => ServerProcess {
            addr,
            child,
            stderr,
            stdout,
        },
        Err(why) => {
            let _ = child.kill();
            let status = match child.wait() {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            // Give the drain thread a moment to pick up the last lines.
            thread::sleep(Duration::from_millis(50));
            let collected = stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
            panic!(
                "{what} did not log `listening on 127.0.0.1:PORT`: {why}; the process ended with \
                 {status}\n--- stderr ---\n{collected}--- end of stderr ---"
            );
        }
    }
}

/// Runs `examples/NAME.rs` with `args` and waits until it logs `listening on 127.0.0.1:PORT`.
pub fn spawn_example(name: &str, args: &[&str]) -> ServerProcess {
    let mut cmd = Command::new(example_binary(name));
    cmd.args(args);
    spawn_listening(cmd)
}

/// The features this test binary was built with, for building an example the same way.
fn features() -> Vec<&'static str> {
    [
        ("std", cfg!(feature = "std")),
        ("server", cfg!(feature = "server")),
        ("client", cfg!(feature = "client")),
        ("bench", cfg!(feature = "bench")),
        ("cli", cfg!(feature = "cli")),
    ]
    .into_iter()
    .filter_map(|(f, on)| on.then_some(f))
    .collect()
}

/// Builds `examples/NAME.rs` (once per test process) with this test's profile, target and
/// features, as `cargo build --example NAME` does, and returns the binary's path. `cargo test`
/// has usually built it already, so this only checks that it is fresh.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // target/[TRIPLE/]PROFILE/deps/TEST-HASH
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/PROFILE/deps");
    let binary = profile_dir.join("examples").join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|b| b == name) {
        return binary;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--example", name, "--no-default-features"])
        .args(["--features", &features().join(",")])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => panic!("no profile directory in {}", exe.display()),
    }
    let triple_dir = profile_dir.parent().expect("a target directory");
    if std::fs::canonicalize(triple_dir).ok() != std::fs::canonicalize(target_dir()).ok() {
        cmd.arg("--target")
            .arg(triple_dir.file_name().expect("a target triple"));
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(binary.is_file(), "{cmd:?} made no {}", binary.display());
    built.push(name.to_string());
    binary
}

/// Whether `CI=true` is set (as `.ci/run` is run).
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Whether `cmd` runs and exits successfully (its output discarded).
pub fn runs_ok(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Decides what to do when an external tool a test needs is missing:
/// returns `true` when `found`; otherwise panics under `CI=true` and, outside
/// CI, prints a loud warning and returns `false` (the caller then skips).
pub fn require_tool(name: &str, found: bool) -> bool {
    if found {
        return true;
    }
    if under_ci() {
        panic!("{name} is required under CI=true; .ci/run installs it");
    }
    let bar = "!".repeat(72);
    eprintln!(
        "\n{bar}\n!!! SKIPPED: {name} not installed, so this test did NOT run.\n\
         !!! CI (CI=true) treats a missing {name} as a failure; .ci/run installs it.\n{bar}\n"
    );
    false
}

/// A `TcpStream` whose reads and writes retry on `EINTR`.
///
/// A blocking socket call with a timeout (`set_read_timeout`) can fail with `Interrupted` on
/// Linux even with no signal handler installed (signal(7): after a stop and continue); this was
/// seen here under load. tungstenite passes it up as a failed handshake or read, so test
/// clients wrap their socket in this.
pub struct Tcp(pub std::net::TcpStream);

impl Read for Tcp {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl std::io::Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The next text message, skipping pings and pongs; panics on anything else.
pub fn read_text<S: std::io::Read + std::io::Write>(ws: &mut tungstenite::WebSocket<S>) -> String {
    loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => return t.to_string(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            m => panic!("expected text, got {m:?}"),
        }
    }
}

/// The last `max_bytes` (or slightly fewer, on a char boundary) of `text`.
pub fn tail(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut start = text.len() - max_bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The cargo target directory: `CARGO_TARGET_DIR` (relative to the package
/// root if relative) or `<package root>/target`.
pub fn target_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Debian's nginx binary.
#[allow(dead_code)]
pub const NGINX: &str = "/usr/sbin/nginx";

/// nginx in the foreground (`daemon off; master_process off;`), in a directory of its own under
/// the target directory (kept after the test for a look at its logs); killed on drop.
#[allow(dead_code)]
pub struct Nginx {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its prefix: configuration and logs.
    pub dir: PathBuf,
    child: Child,
    stderr: Arc<Mutex<String>>,
}

#[allow(dead_code)]
impl Nginx {
    /// Starts nginx in `<target>/nginx-test/NAME` on a free loopback port with the
    /// configuration `conf(dir, port)` gives, and waits until it listens; retries a few ports
    /// in case another process takes the one picked.
    pub fn start(name: &str, conf: impl Fn(&std::path::Path, u16) -> String) -> Nginx {
        let dir = target_dir().join("nginx-test").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the nginx directory");
        let wait = Duration::from_secs(10);
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("bind 127.0.0.1:0")
                .port();
            let path = dir.join("nginx.conf");
            std::fs::write(&path, conf(&dir, port)).expect("write nginx.conf");
            let mut child = Command::new(NGINX)
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {NGINX}: {e}"));
            let stderr = Arc::new(Mutex::new(String::new()));
            drain_lines(child.stderr.take().expect("piped"), Arc::clone(&stderr), None);
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut nginx = Nginx {
                addr,
                dir: dir.clone(),
                child,
                stderr,
            };
            let deadline = Instant::now() + wait;
            loop {
                if let Ok(Some(_)) = nginx.child.try_wait() {
                    last_log = nginx.log();
                    break; // exited: most likely the port was taken; try another
                }
                // Ours, not another listener on a port taken between the pick and nginx's
                // bind: nginx writes its pid file only once it listens (and exits when it
                // cannot bind).
                let pid = std::fs::read_to_string(dir.join("nginx.pid")).unwrap_or_default();
                if pid.trim() == nginx.child.id().to_string()
                    && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                {
                    return nginx;
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on {addr} within {wait:?}\n{}",
                    nginx.log()
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx would not start\n{last_log}");
    }

    /// Its stderr and the end of its error log.
    pub fn log(&self) -> String {
        let file = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        let err = self.stderr.lock().unwrap().clone();
        format!("{}{}", tail(&err, 4096), tail(&file, 8192))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines every interop script prints when all its checks passed.
#[allow(dead_code)]
pub const INTEROP_CHECKS: [&str; 5] = [
    "ok text",
    "ok binary",
    "ok 1 MiB in 16 fragments",
    "ok ping",
    "ok close 1000",
];

/// A WebSocket client (tungstenite) over a plain test socket.
pub type WsClient = tungstenite::WebSocket<Tcp>;

/// Sends a text message.
pub fn send_text(ws: &mut WsClient, text: &str) {
    ws.send(tungstenite::Message::text(text)).expect("send");
}

/// The next text message within `wait`, or `None` (the socket has a short read timeout, so
/// this polls against its own deadline).
pub fn next_text(ws: &mut WsClient, wait: std::time::Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Some(t.to_string()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                if std::time::Instant::now() >= deadline {
                    return None;
                }
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}
