//! The static 64-bit Arm build (`cargo build --release --target aarch64-unknown-linux-musl`,
//! docs/arm.md) run under `qemu-aarch64`: the original demo, an echo over `wss://` with
//! permessage-deflate agreed, and the Autobahn server cases of groups 1 to 10.
//!
//! The binary is `WSLOOP_ARM_BIN` when set, else the release build under the target directory.
//! A missing `qemu-aarch64` or binary skips loudly outside CI and fails under `CI=true`
//! (`.ci/run` installs the emulator and the cross compiler, and builds the binary first).

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::autobahn::{self, Kosoku, BASE_CASES, DEFLATE_GROUPS, SERVER_RUN_TIMEOUT};
use common::{require_tool, runs_ok, tail, target_dir, ServerProcess};

/// Names the aarch64 `wsloop` binary; unset, the release build under the target directory.
const ARM_BIN_VAR: &str = "WSLOOP_ARM_BIN";

/// The emulator, looked up on `PATH`.
const QEMU: &str = "qemu-aarch64";

/// A client run's time limit: emulated, a TLS handshake takes tenths of a second.
const CLIENT_WAIT: Duration = Duration::from_secs(60);

/// `e_machine` of a 64-bit Arm ELF file.
const EM_AARCH64: u16 = 183;

/// The aarch64 binary, or `None` (skip) when it or the emulator is missing outside CI.
fn arm_binary() -> Option<PathBuf> {
    if !require_tool(QEMU, runs_ok(Command::new(QEMU).arg("--version"))) {
        return None;
    }
    let binary = std::env::var_os(ARM_BIN_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("aarch64-unknown-linux-musl/release/wsloop"));
    if !binary.is_file() {
        let why = format!(
            "no aarch64 build at {} (`cargo build --release --target aarch64-unknown-linux-musl`, \
             docs/arm.md; or name one with {ARM_BIN_VAR})",
            binary.display()
        );
        assert!(!common::under_ci(), "{why}; .ci/run builds it under CI=true");
        let bar = "!".repeat(72);
        eprintln!("\n{bar}\n!!! SKIPPED: {why}, so this test did NOT run.\n!!! CI (CI=true) treats this as a failure.\n{bar}\n");
        return None;
    }
    let mut header = [0u8; 20];
    std::fs::File::open(&binary)
        .and_then(|mut f| f.read_exact(&mut header))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", binary.display()));
    assert_eq!(&header[..4], b"\x7fELF", "{} is not an ELF file", binary.display());
    assert_eq!(
        u16::from_le_bytes([header[18], header[19]]),
        EM_AARCH64,
        "{} is not a 64-bit Arm binary",
        binary.display()
    );
    Some(binary)
}

/// `qemu-aarch64 BINARY`, to which the subcommand and its options are added.
fn emulated(binary: &PathBuf) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.arg(binary);
    cmd
}

/// `qemu-aarch64 BINARY serve --listen 127.0.0.1:0 ARGS...`, once it listens.
fn serve(binary: &PathBuf, args: &[&str]) -> ServerProcess {
    autobahn::spawn_server_with(emulated(binary), args)
}

/// How a client run ended.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `qemu-aarch64 BINARY client ARGS...` to its end, killed after [`CLIENT_WAIT`].
fn client(binary: &PathBuf, args: &[&str]) -> Run {
    let started = Instant::now();
    let mut child = emulated(binary)
        .arg("client")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-aarch64");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break status;
        }
        if started.elapsed() > CLIENT_WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`wsloop client {}` under qemu did not finish within {CLIENT_WAIT:?}",
                args.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("client stdout");
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("client stderr");
    Run {
        success: status.success(),
        stdout,
        stderr,
        took: started.elapsed(),
    }
}

#[test]
fn the_original_demo_on_aarch64() {
    let Some(binary) = arm_binary() else {
        return;
    };
    let started = Instant::now();
    let server = serve(&binary, &["--mode", "reply"]);
    let url = format!("ws://{}/", server.addr);
    let run = client(&binary, &[&url, "--count", "1", "--every", "10ms", "-q"]);
    assert!(
        run.success,
        "client failed:\n{}\nserver:\n{}",
        run.stderr,
        server.stderr()
    );
    assert_eq!(run.stdout, "fine thank you\n", "stderr:\n{}", run.stderr);
    println!(
        "aarch64 demo: client {:.2?}, server and client {:.2?}",
        run.took,
        started.elapsed()
    );
}

#[test]
fn echo_over_wss_with_compression_on_aarch64() {
    let Some(binary) = arm_binary() else {
        return;
    };
    let started = Instant::now();
    let certs = certs::make(&target_dir().join("arm-certs"));
    let (cert, key, ca) = (
        certs.cert.to_str().expect("UTF-8 path"),
        certs.key.to_str().expect("UTF-8 path"),
        certs.ca.to_str().expect("UTF-8 path"),
    );
    // Every message compressed, the short demo text included.
    let server = serve(
        &binary,
        &[
            "--mode",
            "echo",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--deflate-min-size",
            "0",
        ],
    );
    let url = format!("wss://localhost:{}/", server.addr.port());
    let run = client(&binary, &[&url, "--ca", ca, "--count", "3", "--every", "10ms"]);
    assert!(
        run.success,
        "client failed:\n{}\nserver:\n{}",
        run.stderr,
        server.stderr()
    );
    assert_eq!(run.stdout, "how are you?\n".repeat(3), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("connected to {url} (permessage-deflate)")),
        "compression was not agreed:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("closed: 1000"), "no clean close:\n{}", run.stderr);
    println!(
        "aarch64 wss:// echo with permessage-deflate: client {:.2?}, all {:.2?}",
        run.took,
        started.elapsed()
    );
}

#[test]
fn autobahn_server_groups_1_to_10_on_aarch64() {
    let Some(binary) = arm_binary() else {
        return;
    };
    let Some(kosoku) = Kosoku::setup() else {
        return;
    };
    let mut server = serve(&binary, &["--mode", "echo"]);
    let outdir = autobahn::report_dir("server-aarch64");
    let run = kosoku.run_fuzzingclient(DEFLATE_GROUPS, server.addr, &outdir, 4, SERVER_RUN_TIMEOUT);
    println!(
        "autobahn server (aarch64 under qemu), groups 1-10: kosoku took {:.1?}",
        run.elapsed
    );
    let server_log = format!(
        "--- wsloop stderr (tail) ---\n{}\n--- end of wsloop stderr ---",
        tail(&server.stderr(), 16384)
    );
    assert!(
        !run.timed_out,
        "kosoku did not finish\n{}\n{server_log}",
        run.describe()
    );
    if let Ok(Some(status)) = server.child_mut().try_wait() {
        panic!(
            "the server exited during the run ({status})\n{}\n{server_log}",
            run.describe()
        );
    }
    let results = autobahn::read_results(&kosoku, &outdir, None)
        .unwrap_or_else(|e| panic!("no Autobahn results: {e}\n{}\n{server_log}", run.describe()));
    autobahn::assert_conformance(
        "server (aarch64 under qemu)",
        &outdir,
        &results,
        BASE_CASES,
        &format!("{}\n{server_log}", run.describe()),
    );
}
