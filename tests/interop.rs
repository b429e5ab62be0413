//! Interop with clients nobody here wrote: Python `websockets` and Node `ws`, against
//! `wsloop serve` in echo and broadcast modes. Each client script (tests/py/interop_client.py,
//! tests/js/interop.mjs) checks text, binary, a 1 MiB fragmented message, ping and a clean
//! close with 1000, and in broadcast mode that a second connection gets the messages too.
//!
//! Python `websockets` is installed by the test into a venv under the target directory
//! (`<target>/interop-venv`); Node `ws` comes from tests/js/node_modules (`.ci/run` runs
//! `npm ci` there). Missing tools skip the test loudly outside CI and fail it under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{drain_lines, require_tool, spawn_server, tail, target_dir};

/// The `websockets` release the Python script is written against (asyncio API, 13.0+).
const WEBSOCKETS_VERSION: &str = "15.0.1";

/// A client script is killed after this long (a run takes well under a second).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn runs_ok(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes (once) `<target>/interop-venv` with `websockets` installed and returns its Python.
/// `None` means skip (no Python outside CI); under `CI=true` a missing Python panics.
fn python_with_websockets() -> Option<PathBuf> {
    // Tests in this binary run on parallel threads: build the venv once.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());

    let venv = target_dir().join("interop-venv");
    let python = venv.join("bin").join("python");
    let check = format!("import websockets, sys; sys.exit(websockets.version.version != '{WEBSOCKETS_VERSION}')");
    if runs_ok(Command::new(&python).args(["-c", &check])) {
        return Some(python);
    }
    if !require_tool("python3", runs_ok(Command::new("python3").arg("--version"))) {
        return None;
    }
    // Build beside the final place and rename it in, so that another test binary running at
    // the same time never sees a half-made venv.
    let tmp = target_dir().join(format!("interop-venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(target_dir()).expect("create the target directory");
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 -m venv");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        eprintln!(
            "python3 -m venv failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        require_tool("python3-venv (`python3 -m venv` with pip)", false);
        return None;
    }
    eprintln!(
        "interop: pip install websockets=={WEBSOCKETS_VERSION} into {}",
        venv.display()
    );
    let out = Command::new(tmp.join("bin").join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ])
        .arg(format!("websockets=={WEBSOCKETS_VERSION}"))
        .stdin(Stdio::null())
        .output()
        .expect("run pip");
    assert!(
        out.status.success(),
        "pip install websockets=={WEBSOCKETS_VERSION} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&venv);
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another process won the race; use its venv.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(
        runs_ok(Command::new(&python).args(["-c", &check])),
        "{} has no websockets {WEBSOCKETS_VERSION} after installing it",
        venv.display()
    );
    Some(python)
}

/// `node` with tests/js/node_modules/ws, or `None` (skip) outside CI.
fn node_with_ws() -> Option<()> {
    let have_node = runs_ok(Command::new("node").arg("--version"));
    if !require_tool("node", have_node) {
        return None;
    }
    let ws = root().join("tests/js/node_modules/ws/package.json").is_file();
    require_tool("the npm package ws (run `npm ci` in tests/js)", ws).then_some(())
}

/// Runs a client script against a fresh `wsloop serve --mode MODE` and asserts that it passed.
fn run_client(program: &Path, script: &Path, mode: &str) {
    let server = spawn_server(&["--mode", mode]);
    let url = format!("ws://{}/", server.addr);
    let started = Instant::now();
    let mut child = Command::new(program)
        .arg(script)
        .arg(&url)
        .arg(mode)
        .current_dir(script.parent().expect("script in a directory"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    let t_out = drain_lines(child.stdout.take().expect("piped"), Arc::clone(&out), None);
    let t_err = drain_lines(child.stderr.take().expect("piped"), Arc::clone(&err), None);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = t_out.join();
    let _ = t_err.join();
    let out = out.lock().unwrap().clone();
    let err = err.lock().unwrap().clone();
    let report = format!(
        "{} {} {url} {mode}: {} after {:.1?}\n--- client stdout ---\n{out}--- client stderr ---\n{}\n\
         --- wsloop stderr ---\n{}--- end ---",
        program.display(),
        script.display(),
        status.map_or("killed (timeout)".to_string(), |s| s.to_string()),
        started.elapsed(),
        tail(&err, 8192),
        tail(&server.stderr(), 8192),
    );
    assert!(status.is_some_and(|s| s.success()), "{report}");
    for check in [
        "ok text",
        "ok binary",
        "ok 1 MiB in 16 fragments",
        "ok ping",
        "ok close 1000",
    ] {
        assert!(out.lines().any(|l| l == check), "missing `{check}`\n{report}");
    }
    println!("{report}");
}

fn python_client(mode: &str) {
    let Some(python) = python_with_websockets() else {
        return;
    };
    run_client(&python, &root().join("tests/py/interop_client.py"), mode);
}

fn node_client(mode: &str) {
    if node_with_ws().is_none() {
        return;
    }
    run_client(Path::new("node"), &root().join("tests/js/interop.mjs"), mode);
}

#[test]
fn python_websockets_echo() {
    python_client("echo");
}

#[test]
fn python_websockets_broadcast() {
    python_client("broadcast");
}

#[test]
fn node_ws_echo() {
    node_client("echo");
}

#[test]
fn node_ws_broadcast() {
    node_client("broadcast");
}
