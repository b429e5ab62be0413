//! Instructions per echoed message: `wsloop serve` runs under `valgrind --tool=callgrind`, the
//! load generator (`wsloop bench`, a separate process, not under valgrind) echoes binary messages
//! through it, and the server's user-space instruction total is divided by the echoes counted.
//! Unlike wall-clock figures on shared machines, the count repeats to about 1 %. It depends on
//! how many ready connections one poll wake-up serves, so compare builds at the same load.
//!
//! Two server runs: a baseline whose connections do the handshake and the close but send nothing
//! (`--duration 0s` without a load), then the loaded run. Reported: raw = loaded total / echoes,
//! and net = (loaded total − baseline total) / echoes, which leaves out start-up, handshakes,
//! close and shutdown.
//!
//! `cargo bench --bench instructions` (needs valgrind). Environment: `WSLOOP_BENCH_SECS=5`,
//! `WSLOOP_BENCH_CONNS=10`, `WSLOOP_BENCH_INFLIGHT=1`, `WSLOOP_BENCH_SIZE=16` (bytes), and
//! `WSLOOP_BENCH_SERVER=/path/to/other/wsloop` (measure another build's `serve`, for A/B tests;
//! the load generator stays this build's), `WSLOOP_BENCH_SERVE_ARGS="--threads 2"` (more `serve`
//! options, split at spaces; callgrind runs a process's threads one at a time and counts them
//! all). The callgrind files are kept in target/tmp.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{env_or, free_port, machine, ServerProc};

/// What `wsloop bench` is asked to do against the server.
struct Load {
    connections: usize,
    /// `None`: hold the connections idle.
    inflight: Option<u32>,
    size: usize,
    secs: u64,
}

/// One server run under callgrind.
struct Run {
    /// Instructions executed by the server, all output files summed.
    instructions: u64,
    /// Echoes the load generator received and verified.
    echoes: u64,
    /// Echoes per second during the measured phase (slowed down by callgrind).
    rate: f64,
}

fn main() {
    let load = Load {
        connections: env_or("WSLOOP_BENCH_CONNS", 10),
        inflight: Some(env_or("WSLOOP_BENCH_INFLIGHT", 1)),
        size: env_or("WSLOOP_BENCH_SIZE", 16),
        secs: env_or("WSLOOP_BENCH_SECS", 5),
    };
    let server = std::env::var_os("WSLOOP_BENCH_SERVER")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wsloop")), PathBuf::from);
    let valgrind = match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            eprintln!("valgrind not found: skipping the instruction count");
            return;
        }
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("instructions");
    println!("wsloop instructions per echoed message: `serve` under callgrind, load generator outside it");
    println!("machine: {}; {valgrind}", machine());
    let extra = std::env::var("WSLOOP_BENCH_SERVE_ARGS").unwrap_or_default();
    println!("server: {} serve {extra}", server.display());
    println!(
        "load: {} connections x {} in flight x {} B binary, {} s; every echo verified\n",
        load.connections,
        load.inflight.unwrap_or(0),
        load.size,
        load.secs
    );
    let baseline = Load {
        inflight: None,
        secs: 0,
        ..load
    };
    let idle = run(&server, &baseline, &out.join("baseline")).unwrap_or_else(|e| fail("baseline run", &e));
    let busy = run(&server, &load, &out.join("load")).unwrap_or_else(|e| fail("loaded run", &e));
    if busy.echoes == 0 {
        fail("loaded run", "no echo received");
    }
    let per = |n: u64| n as f64 / busy.echoes as f64;
    println!("| run | server instructions | echoes | echoes/s under callgrind |");
    println!("|---|---:|---:|---:|");
    println!(
        "| baseline (handshakes, close) | {} | {} | – |",
        idle.instructions, idle.echoes
    );
    println!(
        "| loaded | {} | {} | {:.0} |",
        busy.instructions, busy.echoes, busy.rate
    );
    println!();
    println!("raw: {:.1} instructions per echoed message", per(busy.instructions));
    println!(
        "net: {:.1} instructions per echoed message (baseline subtracted)",
        per(busy.instructions.saturating_sub(idle.instructions))
    );
    println!("callgrind files: {}", out.display());
}

fn fail(what: &str, why: &str) -> ! {
    eprintln!("{what}: {why}");
    std::process::exit(1);
}

/// Starts `bin serve` under callgrind, writing into `dir` (emptied first), applies `load` with
/// this build's `wsloop bench`, stops the server with SIGINT and sums its instruction counts.
fn run(bin: &Path, load: &Load, dir: &Path) -> Result<Run, String> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", dir.display())),
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut cmd = Command::new("valgrind");
    cmd.arg("-q")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}/cg.out.%p", dir.display()))
        .arg(bin)
        .args(["serve", "--listen", &addr.to_string(), "--log", "warn"])
        .args(
            std::env::var("WSLOOP_BENCH_SERVE_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        );
    // Valgrind takes a few seconds to start; both runs see the same probe connection.
    let server = ServerProc::spawn("wsloop under callgrind", cmd, addr, Duration::from_secs(60));

    let mut gen = Command::new(env!("CARGO_BIN_EXE_wsloop"));
    gen.arg("bench")
        .arg(server.url())
        .args(["--connections", &load.connections.to_string()])
        .args(["--size", &load.size.to_string()])
        .args(["--duration", &format!("{}s", load.secs)])
        .args(["--json", "--quiet"]);
    if let Some(k) = load.inflight {
        gen.args(["--inflight", &k.to_string()]);
    }
    let out = gen
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("start wsloop bench: {e}"))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "wsloop bench ({}) printed no JSON report: {e}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let field = |k: &str| report.get(k).cloned().unwrap_or(serde_json::Value::Null);
    // A count from a run that lost or mangled echoes, or dropped connections, means nothing.
    if !out.status.success() || field("clean") != serde_json::Value::Bool(true) {
        return Err(format!(
            "wsloop bench run not clean ({}): held {}/{}, lost {}, corrupted {}, first error {}",
            out.status,
            field("held"),
            load.connections,
            field("lost"),
            field("corrupted"),
            field("first_error")
        ));
    }
    let echoes = field("received")
        .as_u64()
        .ok_or("wsloop bench report has no `received` count")?;
    let rate = field("msgs_per_sec").as_f64().unwrap_or(f64::NAN);

    // SIGINT: the server closes its peers and exits 0, and callgrind then writes its file.
    let status = server.interrupt(Duration::from_secs(60))?;
    if !status.success() {
        return Err(format!("server exited with {status}"));
    }
    Ok(Run {
        instructions: instructions(dir)?,
        echoes,
        rate,
    })
}

/// The instructions (`Ir`) in every callgrind output file in `dir`, summed.
fn instructions(dir: &Path) -> Result<u64, String> {
    let mut sum = 0u64;
    let mut files = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        sum += file_total(&text).ok_or_else(|| format!("{}: no `totals:` or `summary:` line", path.display()))?;
        files += 1;
    }
    if files == 0 {
        return Err(format!("callgrind wrote no file in {}", dir.display()));
    }
    Ok(sum)
}

/// A file's `totals:` line, or its `summary:` line when there is none; the first event (`Ir`,
/// callgrind's only default event).
fn file_total(text: &str) -> Option<u64> {
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    line("totals:").or_else(|| line("summary:"))
}
