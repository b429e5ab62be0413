//! Interop with clients nobody here wrote: Python `websockets` and Node `ws`, against
//! `wsloop serve` in echo and broadcast modes. Each client script (tests/py/interop_client.py,
//! tests/js/interop.mjs) checks text, binary, a 1 MiB fragmented message, ping and a clean
//! close with 1000, and in broadcast mode that a second connection gets the messages too.
//! Both libraries offer permessage-deflate by default; with the `deflate` feature the scripts
//! also check that the server agreed and that 256 KiB of text came back compressed to every
//! connection. Python `websockets` also uses examples/rooms.rs (tests/py/rooms_client.py):
//! refusals with their status and reason, tokens, topics.
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

use common::venv::{python_venv, venv_python};
use common::{drain_lines, require_tool, runs_ok, spawn_server, tail, INTEROP_CHECKS};

/// The `websockets` release the Python script is written against (asyncio API, 13.0+).
const WEBSOCKETS_VERSION: &str = "15.0.1";

/// What the scripts are told to check about permessage-deflate.
#[cfg(feature = "deflate")]
const COMPRESSION: &[&str] = &["deflate"];
#[cfg(not(feature = "deflate"))]
const COMPRESSION: &[&str] = &[];

/// A client script is killed after this long (a run takes well under a second).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Makes (once) `<target>/interop-venv` with `websockets` installed and returns its Python.
/// `None` means skip (no Python outside CI); under `CI=true` a missing Python panics.
fn python_with_websockets() -> Option<PathBuf> {
    let check = format!("import websockets, sys; sys.exit(websockets.version.version != '{WEBSOCKETS_VERSION}')");
    let venv = python_venv("interop-venv", &format!("websockets=={WEBSOCKETS_VERSION}"), |venv| {
        runs_ok(Command::new(venv_python(venv)).args(["-c", &check]))
    })?;
    Some(venv_python(&venv))
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
        .args(COMPRESSION)
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
    for check in INTEROP_CHECKS
        .into_iter()
        .chain(COMPRESSION.iter().map(|_| "ok 256 KiB of text came compressed"))
    {
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

#[test]
fn python_websockets_rooms_example() {
    let Some(python) = python_with_websockets() else {
        return;
    };
    let server = common::spawn_example("rooms", &["--listen", "127.0.0.1:0", "--token", "s3cret"]);
    let out = Command::new(&python)
        .arg(root().join("tests/py/rooms_client.py"))
        .arg(format!("ws://{}", server.addr))
        .arg("s3cret")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "rooms_client.py: {}\n--- stdout ---\n{stdout}--- stderr ---\n{}\n--- rooms stderr ---\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 8192),
        tail(&server.stderr(), 8192)
    );
    assert!(out.status.success(), "{report}");
    for check in [
        "ok no token: 401",
        "ok wrong token: 401",
        "ok other path: 404",
        "ok header and query tokens; joins announced to the room",
        "ok a message reaches the others in the room, not its sender",
        "ok nothing crosses rooms; binary goes as it is",
        "ok leave announced",
        "ok closed with 1000",
    ] {
        assert!(stdout.lines().any(|l| l == check), "missing `{check}`\n{report}");
    }
}
