//! Autobahn conformance runs with `kosoku` (PyPI), shared by the server and
//! client conformance tests.
//!
//! * [`Kosoku::setup`] makes (once) a Python venv at `<target>/autobahn-venv`
//!   with `kosoku` installed; it returns `None` (skip) when Python or its venv
//!   module is missing outside CI, and panics under `CI=true`.
//! * Server under test: [`Kosoku::run_fuzzingclient`] drives it.
//! * Client under test: [`Kosoku::start_fuzzingserver`] starts kosoku as the
//!   server; the client then calls `/getCaseCount`,
//!   `/runCase?case=N&agent=NAME` for N = 1..=count and finally
//!   `/updateReports?agent=NAME`, after which kosoku writes its reports and
//!   exits ([`FuzzingServer::wait`]).
//! * [`read_results`] reads `OUTDIR/index.json`, which kosoku writes as
//!   `{ agent: { case id: { "behavior", "behaviorClose", "remoteCloseCode",
//!   "duration", "reportfile" } } }`; [`assert_conformance`] checks it.

use std::fs;
use std::io::{BufRead, Cursor};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::venv::{python_venv, venv_dir, venv_python};
use super::{drain_lines, parse_listening_line, tail, wait_for_line, ServerProcess};

/// The kosoku release the tests are written against.
pub const KOSOKU_VERSION: &str = "0.1.0";

/// Case groups left out: none with the `deflate` feature; without it 12.* and 13.*, the
/// permessage-deflate cases.
#[cfg(feature = "deflate")]
pub const EXCLUDED_GROUPS: &[&str] = &[];
#[cfg(not(feature = "deflate"))]
pub const EXCLUDED_GROUPS: &[&str] = &["12.*", "13.*"];

/// The permessage-deflate groups, left out where a run tests something else (the TLS
/// transport) and compression is tested elsewhere.
#[allow(dead_code)]
pub const DEFLATE_GROUPS: &[&str] = &["12.*", "13.*"];

/// Cases of groups 1 to 10.
#[allow(dead_code)]
pub const BASE_CASES: usize = 301;

/// Number of cases kosoku 0.1.0 runs with [`EXCLUDED_GROUPS`] left out: 517 with the 216
/// permessage-deflate cases of groups 12 and 13, 301 without.
#[cfg(feature = "deflate")]
pub const EXPECTED_CASES: usize = 517;
#[cfg(not(feature = "deflate"))]
pub const EXPECTED_CASES: usize = 301;

/// `wsloop serve` options for the server cases. With compression every message is compressed
/// (`--deflate-min-size 0`): kosoku's cases fail with an error of their own ("Strings must be
/// encoded before hashing") on an uncompressed message where compression was agreed, which
/// RFC 7692 §6 allows and the default threshold sends for short messages.
#[cfg(feature = "deflate")]
pub const SERVER_ARGS: &[&str] = &["--mode", "echo", "--deflate-min-size", "0"];
#[cfg(not(feature = "deflate"))]
pub const SERVER_ARGS: &[&str] = &["--mode", "echo"];

/// kosoku's time for the server cases before it is killed. Without compression a run takes
/// seconds; the 216 compression cases echo 1,000 messages each, one at a time, and take minutes.
pub const SERVER_RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45 * 60);

/// Verdicts accepted for both `behavior` and `behaviorClose`.
pub const ACCEPTED: [&str; 2] = ["OK", "INFORMATIONAL"];

/// Names a prebuilt `wsloop` binary for the server runs (tests/autobahn_server.rs,
/// tests/autobahn_tls.rs); unset, they run the test build's own. `.ci/run` names a release
/// build: the cases and verdicts are the same, and an unoptimised server makes the 216
/// compression cases take several times longer.
pub const SERVER_BIN_VAR: &str = "WSLOOP_AUTOBAHN_SERVER";

/// Names a prebuilt `examples/autobahn_client` for tests/autobahn_client.rs; unset, the driver
/// compiled into the test runs in-process. `.ci/run` names a release build, as for the server.
pub const CLIENT_BIN_VAR: &str = "WSLOOP_AUTOBAHN_CLIENT";

/// The binary the environment variable `var` names, `None` when it is unset or empty. Panics
/// when it names no file: a mistyped path must not quietly test another binary.
pub fn prebuilt(var: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os(var).filter(|v| !v.is_empty())?);
    assert!(path.is_file(), "{var}={} is not a file", path.display());
    println!("autobahn: {var}={}", path.display());
    Some(path)
}

/// Names a command that runs a `wsloop` binary, words split at spaces (no quoting), for the
/// server runs: `qemu-aarch64 target/aarch64-unknown-linux-musl/release/wsloop` runs the Arm
/// build under emulation. Set, it goes before [`SERVER_BIN_VAR`].
pub const SERVER_CMD_VAR: &str = "WSLOOP_AUTOBAHN_SERVER_CMD";

/// The command [`SERVER_CMD_VAR`] names, `None` when it is unset or empty.
pub fn server_command() -> Option<Command> {
    let line = std::env::var(SERVER_CMD_VAR).ok().filter(|v| !v.trim().is_empty())?;
    println!("autobahn: {SERVER_CMD_VAR}={line}");
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next()?);
    cmd.args(words);
    Some(cmd)
}

/// `COMMAND serve --listen 127.0.0.1:0 ARGS...`, where `command` runs a `wsloop` binary (an
/// emulator and its argument, say), once it listens.
pub fn spawn_server_with(mut command: Command, args: &[&str]) -> ServerProcess {
    command.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
    super::spawn_listening(command)
}

/// `wsloop serve --listen 127.0.0.1:0 ARGS...` for the server cases: the command
/// [`SERVER_CMD_VAR`] names, else the binary [`SERVER_BIN_VAR`] names, else the test build's own.
pub fn spawn_server(args: &[&str]) -> ServerProcess {
    if let Some(command) = server_command() {
        return spawn_server_with(command, args);
    }
    match prebuilt(SERVER_BIN_VAR) {
        Some(binary) => super::spawn_server_from(&binary, args),
        None => super::spawn_server(args),
    }
}

/// Runs a prebuilt `autobahn_client BASE AGENT` (see [`CLIENT_BIN_VAR`]) to the end, killing it
/// after `timeout`. `Ok` holds the summary line it prints on success; `Err` says how it ended,
/// with its output.
pub fn run_client_binary(binary: &Path, base: &str, agent: &str, timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(binary)
        .arg(base)
        .arg(agent)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let t_out = drain_lines(child.stdout.take().expect("piped"), Arc::clone(&stdout), None);
    let t_err = drain_lines(child.stderr.take().expect("piped"), Arc::clone(&stderr), None);
    let (status, timed_out) = wait_with_timeout(&mut child, timeout);
    let _ = t_out.join();
    let _ = t_err.join();
    let (out, err) = (snapshot(&stdout), snapshot(&stderr));
    let ended = match status {
        Some(status) if status.success() => {
            return out
                .lines()
                .rev()
                .find(|line| line.starts_with("autobahn_client: "))
                .map(str::to_string)
                .ok_or_else(|| format!("{} printed no summary line:\n{out}{err}", binary.display()));
        }
        Some(status) => format!("exited with {status}"),
        None if timed_out => format!("was killed after {timeout:?}"),
        None => "ended in an unknown way".to_string(),
    };
    Err(format!(
        "{} {ended}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        binary.display(),
        tail(&out, 8192),
        tail(&err, 16384)
    ))
}

/// `<target>/autobahn-reports/NAME-ARCH`, a run's report directory: one per architecture, since
/// the x86_64 and i686 runs of one test may go at the same time (`.ci/run` does).
pub fn report_dir(name: &str) -> PathBuf {
    super::target_dir()
        .join("autobahn-reports")
        .join(format!("{name}-{}", std::env::consts::ARCH))
}

/// The venv's directory name under the target directory.
const VENV_NAME: &str = "autobahn-venv";

/// How long kosoku in fuzzingserver mode may take to start listening.
const FUZZINGSERVER_STARTUP: Duration = Duration::from_secs(30);

/// A venv with kosoku installed.
pub struct Kosoku {
    venv: PathBuf,
}

/// How a kosoku process ended.
#[derive(Debug)]
pub struct KosokuRun {
    /// Exit status; `None` when it was killed after the timeout.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl KosokuRun {
    /// The run's output, for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "kosoku {} after {:.1?}\n--- kosoku stdout ---\n{}\n--- kosoku stderr ---\n{}\n--- end of kosoku output ---",
            match (&self.status, self.timed_out) {
                (_, true) => "was KILLED (timeout)".to_string(),
                (Some(status), false) => format!("exited with {status}"),
                (None, false) => "ended in an unknown way".to_string(),
            },
            self.elapsed,
            tail(&self.stdout, 8192),
            tail(&self.stderr, 16384),
        )
    }
}

/// Whether `venv` has the pinned kosoku version's dist-info in site-packages.
fn has_pinned_kosoku(venv: &Path) -> bool {
    let wanted = format!("kosoku-{KOSOKU_VERSION}.dist-info");
    let Ok(entries) = fs::read_dir(venv.join("lib")) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| e.path().join("site-packages").join(&wanted).is_dir())
}

/// Removes `dir` if present and creates it empty.
pub fn fresh_dir(dir: &Path) {
    if dir.exists() {
        fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("cannot remove {}: {e}", dir.display()));
    }
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
}

/// Waits for `child` up to `timeout`, killing it when the time is up.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return (None, true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot wait for a child process: {e}"),
        }
    }
}

fn snapshot(buf: &Arc<Mutex<String>>) -> String {
    buf.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Kosoku {
    /// The venv directory used by all Autobahn tests.
    pub fn venv_dir() -> PathBuf {
        venv_dir(VENV_NAME)
    }

    /// Creates the venv and installs kosoku on first use; afterwards reuses it.
    /// Returns `None` when Python 3 or its venv module is missing and `CI` is
    /// not `true` (the caller skips); panics under `CI=true`.
    pub fn setup() -> Option<Kosoku> {
        let venv = python_venv(VENV_NAME, &format!("kosoku=={KOSOKU_VERSION}"), |venv| {
            venv.join("bin").join("kosoku").is_file() && has_pinned_kosoku(venv)
        })?;
        Some(Kosoku { venv })
    }

    pub fn venv(&self) -> &Path {
        &self.venv
    }

    /// `venv/bin/kosoku`.
    pub fn bin(&self) -> PathBuf {
        self.venv.join("bin").join("kosoku")
    }

    /// `venv/bin/python`.
    pub fn python(&self) -> PathBuf {
        venv_python(&self.venv)
    }

    /// Runs `kosoku [-x GROUP]... -p PARALLELISM -o OUTDIR SERVER` (fuzzingclient mode, the
    /// groups of [`EXCLUDED_GROUPS`] left out) against a server under test, in a fresh `outdir`,
    /// killing it after `timeout`.
    pub fn run_fuzzingclient(
        &self,
        excluded: &[&str],
        server: SocketAddr,
        outdir: &Path,
        parallelism: u32,
        timeout: Duration,
    ) -> KosokuRun {
        fresh_dir(outdir);
        let mut cmd = Command::new(self.bin());
        for group in excluded {
            cmd.args(["-x", group]);
        }
        cmd.arg("-p")
            .arg(parallelism.to_string())
            .arg("-o")
            .arg(outdir)
            .arg(server.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin().display()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let t_out = drain_lines(child.stdout.take().expect("piped"), Arc::clone(&stdout), None);
        let t_err = drain_lines(child.stderr.take().expect("piped"), Arc::clone(&stderr), None);
        let (status, timed_out) = wait_with_timeout(&mut child, timeout);
        let _ = t_out.join();
        let _ = t_err.join();
        KosokuRun {
            status,
            timed_out,
            elapsed: started.elapsed(),
            stdout: snapshot(&stdout),
            stderr: snapshot(&stderr),
        }
    }

    /// Starts `kosoku -m fuzzingserver [-x GROUP]... -o OUTDIR 127.0.0.1:0`
    /// (fresh `outdir`), reads the port it bound from its
    /// `fuzzingserver listening on ws://127.0.0.1:PORT` line and returns once
    /// that port accepts TCP connections.
    pub fn start_fuzzingserver(&self, outdir: &Path) -> FuzzingServer {
        fresh_dir(outdir);
        let mut cmd = Command::new(self.bin());
        cmd.args(["-m", "fuzzingserver"]);
        for group in EXCLUDED_GROUPS.iter().copied() {
            cmd.args(["-x", group]);
        }
        cmd.arg("-o")
            .arg(outdir)
            .arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin().display()));
        let stdout = Arc::new(Mutex::new(String::new()));
        drain_lines(child.stdout.take().expect("piped"), Arc::clone(&stdout), None);
        let (stderr, found) = wait_for_line(child.stderr.take().expect("piped"), FUZZINGSERVER_STARTUP, |line| {
            if line.contains("fuzzingserver listening on") {
                parse_listening_line(line)
            } else {
                None
            }
        });
        let mut server = FuzzingServer {
            addr: "127.0.0.1:0".parse().expect("valid address"),
            outdir: outdir.to_path_buf(),
            child,
            stdout,
            stderr,
            started,
        };
        match found {
            Ok(addr) => server.addr = addr,
            Err(why) => {
                let _ = server.child.kill();
                let _ = server.child.wait();
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "kosoku fuzzingserver did not start: {why}\n--- stderr ---\n{}\n--- stdout ---\n{}",
                    server.stderr(),
                    server.stdout()
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&server.addr, Duration::from_secs(1)).is_err() {
            if Instant::now() >= deadline {
                panic!(
                    "kosoku fuzzingserver said it listens on {} but the port refuses connections\n--- stderr ---\n{}",
                    server.addr,
                    server.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

/// kosoku running in fuzzingserver mode; killed on drop.
pub struct FuzzingServer {
    /// Where it listens (127.0.0.1 and the port it bound).
    pub addr: SocketAddr,
    /// Its report directory.
    pub outdir: PathBuf,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl FuzzingServer {
    /// `ws://127.0.0.1:PORT`, the base of `/getCaseCount`, `/runCase?...`, ...
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn stdout(&self) -> String {
        snapshot(&self.stdout)
    }

    pub fn stderr(&self) -> String {
        snapshot(&self.stderr)
    }

    /// Waits (up to `timeout`, then kills it) for kosoku to exit, which it
    /// does once the client has called `/updateReports?agent=NAME` and the
    /// reports are written.
    pub fn wait(&mut self, timeout: Duration) -> KosokuRun {
        let (status, timed_out) = wait_with_timeout(&mut self.child, timeout);
        // Let the drain threads pick up the last lines.
        thread::sleep(Duration::from_millis(100));
        KosokuRun {
            status,
            timed_out,
            elapsed: self.started.elapsed(),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for FuzzingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One row of `index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub agent: String,
    /// Case id, e.g. `7.1.5`.
    pub id: String,
    /// OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED, ...
    pub behavior: String,
    /// OK, INFORMATIONAL, WRONG CODE, UNCLEAN, FAILED, FAILED BY CLIENT, ...
    pub behavior_close: String,
    /// The close code the peer under test sent, empty when none.
    pub remote_close_code: String,
    pub duration_ms: u64,
    /// Per-case JSON report file name (the `.html` one sits beside it).
    pub report_file: String,
    /// kosoku's explanation of `behavior` / `behavior_close`; only filled in
    /// for cases outside [`ACCEPTED`].
    pub result: String,
    pub result_close: String,
}

impl CaseResult {
    /// Both verdicts are OK or INFORMATIONAL.
    pub fn accepted(&self) -> bool {
        ACCEPTED.contains(&self.behavior.as_str()) && ACCEPTED.contains(&self.behavior_close.as_str())
    }
}

/// Flattens index.json to one tab-separated line per case; for unaccepted
/// cases it adds kosoku's prose from the per-case report.
const SUMMARY_PY: &str = r#"
import json, os, sys
outdir = sys.argv[1]
accepted = ("OK", "INFORMATIONAL")
def clean(v):
    return "" if v is None else " ".join(str(v).split())
with open(os.path.join(outdir, "index.json"), encoding="utf-8") as f:
    index = json.load(f)
for agent, cases in index.items():
    for case_id, r in cases.items():
        result = result_close = ""
        if r.get("behavior") not in accepted or r.get("behaviorClose") not in accepted:
            try:
                with open(os.path.join(outdir, r.get("reportfile") or ""), encoding="utf-8") as f:
                    detail = json.load(f)
                result, result_close = detail.get("result"), detail.get("resultClose")
            except (OSError, ValueError):
                pass
        print("\t".join(clean(v) for v in (
            agent, case_id, r.get("behavior"), r.get("behaviorClose"),
            r.get("remoteCloseCode"), r.get("duration"), r.get("reportfile"),
            result, result_close)))
"#;

fn case_sort_key(id: &str) -> Vec<u64> {
    id.split('.').map(|p| p.parse().unwrap_or(u64::MAX)).collect()
}

/// Parses the output of [`SUMMARY_PY`].
pub fn parse_summary(text: &str) -> Result<Vec<CaseResult>, String> {
    let mut results = Vec::new();
    for line in Cursor::new(text).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 9 {
            return Err(format!(
                "unexpected summary line (want 9 tab-separated fields): {line:?}"
            ));
        }
        results.push(CaseResult {
            agent: f[0].to_string(),
            id: f[1].to_string(),
            behavior: f[2].to_string(),
            behavior_close: f[3].to_string(),
            remote_close_code: f[4].to_string(),
            duration_ms: f[5].parse().unwrap_or(0),
            report_file: f[6].to_string(),
            result: f[7].to_string(),
            result_close: f[8].to_string(),
        });
    }
    results.sort_by(|a, b| (a.agent.as_str(), case_sort_key(&a.id)).cmp(&(b.agent.as_str(), case_sort_key(&b.id))));
    Ok(results)
}

/// Reads `outdir/index.json` (with the venv's Python). With `agent`, keeps
/// only that agent's cases and fails if there are none; without, returns all.
pub fn read_results(kosoku: &Kosoku, outdir: &Path, agent: Option<&str>) -> Result<Vec<CaseResult>, String> {
    let index = outdir.join("index.json");
    if !index.is_file() {
        return Err(format!("{} was not written", index.display()));
    }
    let out = Command::new(kosoku.python())
        .args(["-c", SUMMARY_PY])
        .arg(outdir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", kosoku.python().display()))?;
    if !out.status.success() {
        return Err(format!(
            "summarising {} failed ({}):\n{}",
            index.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let all = parse_summary(&String::from_utf8_lossy(&out.stdout))?;
    let Some(agent) = agent else {
        return Ok(all);
    };
    let mut agents: Vec<&str> = all.iter().map(|r| r.agent.as_str()).collect();
    agents.dedup();
    let mine: Vec<CaseResult> = all.iter().filter(|r| r.agent == agent).cloned().collect();
    if mine.is_empty() {
        return Err(format!(
            "{} has no results for agent {agent:?}; agents present: {agents:?}",
            index.display()
        ));
    }
    Ok(mine)
}

/// Counts of a run: both verdicts OK; accepted with at least one
/// INFORMATIONAL; anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub total: usize,
    pub ok: usize,
    pub informational: usize,
    pub other: usize,
}

pub fn tally(results: &[CaseResult]) -> Tally {
    let mut t = Tally {
        total: results.len(),
        ..Tally::default()
    };
    for r in results {
        if r.behavior == "OK" && r.behavior_close == "OK" {
            t.ok += 1;
        } else if r.accepted() {
            t.informational += 1;
        } else {
            t.other += 1;
        }
    }
    t
}

/// Checks the count and that every case is accepted. `Ok` holds the summary
/// line, `Err` the summary line followed by every offending case.
pub fn check_conformance(
    label: &str,
    outdir: &Path,
    results: &[CaseResult],
    expected_cases: usize,
) -> Result<String, String> {
    let t = tally(results);
    let summary = format!(
        "autobahn {label}: {} cases: {} OK, {} INFORMATIONAL, {} other",
        t.total, t.ok, t.informational, t.other
    );
    let mut problems = Vec::new();
    if t.total != expected_cases {
        problems.push(format!("expected {expected_cases} cases, index.json has {}", t.total));
    }
    let bad: Vec<&CaseResult> = results.iter().filter(|r| !r.accepted()).collect();
    if !bad.is_empty() {
        problems.push(format!(
            "{} case(s) not OK/INFORMATIONAL (reports in {}):",
            bad.len(),
            outdir.display()
        ));
        for r in bad {
            let html = r
                .report_file
                .strip_suffix(".json")
                .map(|stem| format!("{stem}.html"))
                .unwrap_or_else(|| r.report_file.clone());
            problems.push(format!(
                "  {}: behavior={} behaviorClose={} remoteCloseCode={} duration={}ms [{}] [{}] {}",
                r.id,
                r.behavior,
                r.behavior_close,
                if r.remote_close_code.is_empty() {
                    "none"
                } else {
                    &r.remote_close_code
                },
                r.duration_ms,
                r.result,
                r.result_close,
                html
            ));
        }
    }
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}\n{}", problems.join("\n")))
    }
}

/// Prints the summary line and panics, listing every offending case (and
/// `context`, e.g. the tail of the peer's log), unless the run conforms.
pub fn assert_conformance(label: &str, outdir: &Path, results: &[CaseResult], expected_cases: usize, context: &str) {
    match check_conformance(label, outdir, results, expected_cases) {
        Ok(summary) => println!("{summary}"),
        Err(report) => {
            println!("{}", report.lines().next().unwrap_or_default());
            panic!("{report}\n{context}");
        }
    }
}
