//! Helpers shared by the benchmarks that run servers as child processes.

#![allow(dead_code)] // each bench uses a different part

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Certificates made at run time for the TLS cases (the tests' helper).
#[path = "../../tests/common/certs.rs"]
pub mod certs;

/// A server running as a child process; killed when dropped.
pub struct ServerProc {
    /// A short name for tables.
    pub name: &'static str,
    /// Where it listens.
    pub addr: SocketAddr,
    /// It speaks TLS (`wss://`).
    pub tls: bool,
    child: Child,
}

impl ServerProc {
    /// `wsloop serve` with default settings on a free loopback port.
    pub fn wsloop() -> ServerProc {
        Self::wsloop_at(Path::new(env!("CARGO_BIN_EXE_wsloop")), "wsloop")
    }

    /// `serve` with default settings from another build of wsloop (for A/B comparisons).
    pub fn wsloop_at(bin: &Path, name: &'static str) -> ServerProc {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", &addr.to_string(), "--log", "warn"]);
        Self::spawn(name, cmd, addr, Duration::from_secs(10))
    }

    /// `wsloop serve` over TLS with the given certificate, on a free loopback port.
    pub fn wsloop_tls(c: &certs::TestCerts) -> ServerProc {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsloop"));
        cmd.args(["serve", "--listen", &addr.to_string(), "--log", "warn", "--tls-cert"])
            .arg(&c.cert)
            .arg("--tls-key")
            .arg(&c.key);
        let mut s = Self::spawn("wsloop", cmd, addr, Duration::from_secs(10));
        s.tls = true;
        s
    }

    /// Runs `cmd`, a server that will listen on `addr`, and waits up to `startup` until it does.
    pub fn spawn(name: &'static str, mut cmd: Command, addr: SocketAddr, startup: Duration) -> ServerProc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", cmd.get_program().to_string_lossy()));
        let mut s = ServerProc {
            name,
            addr,
            tls: false,
            child,
        };
        s.wait_listening(startup);
        s
    }

    /// A reference peer from benches/peers (`tt-echo` or `fws-echo`), if it was built.
    pub fn peer(name: &'static str) -> Option<ServerProc> {
        Self::peer_with(name, None)
    }

    /// A peer from benches/peers; with `tls`, it is given the certificate and key (`tt-tls-echo`).
    pub fn peer_with(name: &'static str, tls: Option<&certs::TestCerts>) -> Option<ServerProc> {
        let path = peer_path(name);
        if !path.exists() {
            return None;
        }
        let mut cmd = Command::new(&path);
        cmd.arg("127.0.0.1:0");
        if let Some(c) = tls {
            cmd.arg(&c.cert).arg(&c.key);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        // It prints `listening on ADDR` first; later lines (errors) are passed through.
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        let addr: SocketAddr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name}: unexpected first line {first:?}"));
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                eprintln!("[{name}] {l}");
            }
        });
        // It bound before printing: no probe connection needed (the peers would log it).
        Some(ServerProc {
            name,
            addr,
            tls: tls.is_some(),
            child,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL to benchmark.
    pub fn url(&self) -> String {
        format!("{}://{}/", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    /// Sends SIGINT and waits up to `timeout` for the exit status (if it times out, the drop kills it).
    pub fn interrupt(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) } != 0 {
            return Err(format!("SIGINT to {}: {}", self.name, std::io::Error::last_os_error()));
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "{} still running {} s after SIGINT",
            self.name,
            timeout.as_secs()
        ))
    }

    /// Waits until a TCP connect succeeds (the server then sees one connection that closes
    /// without a handshake).
    fn wait_listening(&mut self, startup: Duration) {
        let deadline = Instant::now() + startup;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("{} exited early: {status}", self.name);
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                // Let it finish with the probe connection before measuring.
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} is not listening on {} after {} s",
            self.name,
            self.addr,
            startup.as_secs()
        );
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `cargo build --release --manifest-path benches/peers/Cargo.toml` puts a peer.
pub fn peer_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/peers/target/release")
        .join(name)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    l.local_addr().expect("local addr").port()
}

/// An environment variable parsed, or a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The machine, for the output's header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {} GiB RAM, Linux {}",
        mem_kb >> 20,
        kernel.trim()
    )
}
