//! A redis-server for tests: started on a free loopback port with no persistence, in a
//! directory of its own; stopped, paused, resumed, killed and restarted on the same port;
//! killed on drop. Only std, so that the library's unit tests include this same file
//! (`#[path = "../../../tests/common/redis.rs"]`).
//!
//! When redis-server is missing, [`RedisServer::start`] returns `None` after a loud message
//! (the caller skips), and panics under `CI=true`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's redis-server binary (found on PATH otherwise).
const BINARY: &str = "redis-server";
/// How long a start waits for PING to be answered.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running redis-server child; killed and its directory removed on drop.
pub struct RedisServer {
    /// The port it listens on (plain TCP, or TLS when started with TLS arguments).
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
    /// Whether the port answers plain PING (false for a TLS-only server).
    plain: bool,
}

/// Whether `CI=true` is set.
fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Whether redis-server can be run here; a loud message when not (and a panic under CI).
pub fn available() -> bool {
    let found = Command::new(BINARY)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if under_ci() {
        panic!("redis-server is required under CI=true; .ci/run installs it");
    }
    let bar = "!".repeat(72);
    eprintln!(
        "\n{bar}\n!!! SKIPPED: redis-server not installed, so this test did NOT run.\n\
         !!! CI (CI=true) treats a missing redis-server as a failure; .ci/run installs it.\n{bar}\n"
    );
    false
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

impl RedisServer {
    /// Starts redis-server on a free port; `None` (after a loud message) when it is not
    /// installed and `CI` is not `true`. The port is picked, then given to redis-server: if
    /// another process takes it in between, redis-server cannot listen and another port is
    /// tried.
    pub fn start() -> Option<RedisServer> {
        if !available() {
            return None;
        }
        let mut why = String::new();
        for _ in 0..5 {
            match Self::try_start_on(free_port(), &[]) {
                Ok(server) => return Some(server),
                Err(e) => why = e,
            }
        }
        panic!("redis-server would not start on any of 5 free ports; the last:\n{why}");
    }

    /// Starts redis-server on `port` with `extra` arguments added, and waits until it answers
    /// PING.
    pub fn start_on(port: u16, extra: &[&str]) -> Option<RedisServer> {
        if !available() {
            return None;
        }
        Some(Self::try_start_on(port, extra).unwrap_or_else(|e| panic!("{e}")))
    }

    /// [`RedisServer::start_on`]; `Err` with the log when redis-server ended at start (most
    /// likely the port was taken).
    fn try_start_on(port: u16, extra: &[&str]) -> Result<RedisServer, String> {
        // One directory per start: two tests that picked one port never share a log.
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsloop-redis-{}-{port}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("make the redis directory");
        let plain = !extra.contains(&"--tls-port");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            plain,
        };
        server.try_spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts the child and waits until it is ready: it answers on the port, and its own log
    /// says it accepts connections. The second half matters: another redis-server on the same
    /// port (another test's, started from a port picked at the same time) answers PING too.
    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(BINARY);
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"));
        if self.plain {
            cmd.args(["--port", &self.port.to_string()]);
        } else {
            cmd.args(["--port", "0"]);
        }
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start redis-server");
        let ready_line = format!("{}:", child.id());
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let answers = if self.plain {
                // NOAUTH is an answer too (a server started with --requirepass).
                self.try_command(&["PING"])
                    .is_ok_and(|r| r == "PONG" || r.starts_with("ERR: NOAUTH"))
            } else {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            };
            let ours = answers
                && self
                    .log()
                    .lines()
                    .any(|l| l.starts_with(&ready_line) && l.contains("Ready to accept connections"));
            if ours {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!(
                    "redis-server exited at start on port {} ({status}):\n{}",
                    self.port,
                    self.log()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within {READY_TIMEOUT:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id (while running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {} failed", self.pid());
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is read or answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server (SIGKILL) and reaps it; the port is free afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port (after `kill` or `stop`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs one command over a fresh plain connection and returns the reply as text: a
    /// status or bulk as itself, an integer in decimal, an error as `ERR: ...`, an array as
    /// its elements joined by newlines (sorted, as for `PUBSUB CHANNELS`).
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis command {args:?} failed: {e}"))
    }

    /// [`RedisServer::command`] with arguments that need not be UTF-8.
    pub fn command_bytes(&self, args: &[&[u8]]) -> String {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis command failed: {e}"))
    }

    fn try_command<A: AsRef<[u8]>>(&self, args: &[A]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            let a = a.as_ref();
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
        s.write_all(&cmd)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((reply, _)) = parse(&buf) {
                return Ok(reply);
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One reply as text (see [`RedisServer::command`]) and the bytes it took; `None` if not all
/// there yet.
fn parse(buf: &[u8]) -> Option<(String, usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    let mut used = end + 2;
    match buf.first()? {
        b'+' | b':' => Some((line, used)),
        b'-' => Some((format!("ERR: {line}"), used)),
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some((String::new(), used));
            }
            let n = n as usize;
            let data = buf.get(used..used + n)?;
            buf.get(used + n..used + n + 2)?;
            Some((String::from_utf8_lossy(data).into_owned(), used + n + 2))
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                let (item, k) = parse(&buf[used..])?;
                items.push(item);
                used += k;
            }
            items.sort();
            Some((items.join("\n"), used))
        }
        _ => Some((format!("?{line}"), used)),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
