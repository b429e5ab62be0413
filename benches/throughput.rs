//! Throughput against peers: `wsloop serve` vs a tokio-tungstenite echo server (tokio
//! multi-thread runtime) and a fastwebsockets echo server, driven by the same load generator
//! (`wsloop::bench`, in this process) in the same run.
//!
//! Build the peers first (they are a separate Cargo workspace, so the library and `cargo test`
//! never compile them): `cargo build --release --manifest-path benches/peers/Cargo.toml`.
//! Then `cargo bench --bench throughput`. Environment: `WSLOOP_BENCH_REPS=5` (repetitions; the
//! medians are reported), `WSLOOP_BENCH_SECS=5` (measured seconds per run),
//! `WSLOOP_BENCH_CASE=64` (run only the cases whose name contains this), and
//! `WSLOOP_BENCH_ALT=/path/to/other/wsloop` (add another wsloop build as a server, for A/B tests).
//!
//! A second table runs the TLS cases (`wss://`, 100 connections x 1 and x 16 in flight, 16 B):
//! `wsloop serve --tls-cert --tls-key` vs `tt-tls-echo` (tokio-tungstenite over tokio-rustls,
//! ring), with a certificate made at run time; `WSLOOP_BENCH_TLS=0` skips it.
//!
//! Each repetition runs every server once per case, in rotating order, so slow drifts of a
//! shared machine spread over all of them. Reported per server: echoes per second, p99 round
//! trip, and echoes per server CPU-second (utime + stime of the server process during the
//! measured phase), with wsloop's ratio to each peer.

mod common;

use std::time::Duration;

use common::{certs, env_or, machine, median, peer_path, ServerProc};
use wsloop::bench::{self, BenchConfig as Config, Load, Target};
use wsloop::tls::ClientTls;

struct Case {
    name: &'static str,
    connections: usize,
    inflight: u32,
    size: usize,
}

const CASES: [Case; 4] = [
    Case {
        name: "1 conn x 1 in flight x 16 B",
        connections: 1,
        inflight: 1,
        size: 16,
    },
    Case {
        name: "100 x 1 x 16 B",
        connections: 100,
        inflight: 1,
        size: 16,
    },
    Case {
        name: "100 x 16 x 16 B",
        connections: 100,
        inflight: 16,
        size: 16,
    },
    Case {
        name: "10 x 1 x 64 KiB",
        connections: 10,
        inflight: 1,
        size: 64 << 10,
    },
];

const TLS_CASES: [Case; 2] = [
    Case {
        name: "wss 100 x 1 x 16 B",
        connections: 100,
        inflight: 1,
        size: 16,
    },
    Case {
        name: "wss 100 x 16 x 16 B",
        connections: 100,
        inflight: 16,
        size: 16,
    },
];

#[derive(Default)]
struct Samples {
    rate: Vec<f64>,
    p99_us: Vec<f64>,
    per_cpu: Vec<f64>,
    unclean: usize,
}

fn main() {
    let reps: usize = env_or("WSLOOP_BENCH_REPS", 5);
    let secs: u64 = env_or("WSLOOP_BENCH_SECS", 5);
    let only: String = env_or("WSLOOP_BENCH_CASE", String::new());
    let mut servers = vec![ServerProc::wsloop()];
    if let Ok(alt) = std::env::var("WSLOOP_BENCH_ALT") {
        servers.push(ServerProc::wsloop_at(std::path::Path::new(&alt), "wsloop-alt"));
    }
    for name in ["tt-echo", "fws-echo"] {
        match ServerProc::peer(name) {
            Some(s) => servers.push(s),
            None => eprintln!(
                "{} not built: run `cargo build --release --manifest-path benches/peers/Cargo.toml`; skipping it",
                peer_path(name).display()
            ),
        }
    }
    println!("wsloop throughput vs peers: echo servers driven by the same load generator, in one run");
    println!("machine: {}", machine());
    println!(
        "NOTE: the load generator (one thread) and the server under test share these cores; \
         the tokio peers run a multi-thread runtime (one worker per core)."
    );
    println!("{reps} repetition(s) x {secs} s per case and server; medians; binary messages, every echo verified\n");
    run_table(&servers, &CASES, &only, reps, secs, None);
    if env_or("WSLOOP_BENCH_TLS", 1) == 0 {
        return;
    }
    drop(servers);
    let dir = std::env::temp_dir().join(format!("wsloop-bench-certs-{}", std::process::id()));
    let c = certs::make(&dir);
    let mut tls_servers = vec![ServerProc::wsloop_tls(&c)];
    match ServerProc::peer_with("tt-tls-echo", Some(&c)) {
        Some(s) => tls_servers.push(s),
        None => eprintln!("{} not built; skipping it", peer_path("tt-tls-echo").display()),
    }
    let trust = ClientTls::with_ca_file(&c.ca).expect("the CA just made");
    println!("\nOver TLS (wss://, TLS 1.3, certificate made at run time):\n");
    run_table(&tls_servers, &TLS_CASES, &only, reps, secs, Some(&trust));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `cases` against `servers` and prints the table.
fn run_table(servers: &[ServerProc], cases: &[Case], only: &str, reps: usize, secs: u64, tls: Option<&ClientTls>) {
    let label = |name: &str| {
        match name {
            "tt-echo" => "tokio-tungstenite",
            "fws-echo" => "fastwebsockets",
            "tt-tls-echo" => "tokio-tungstenite + tokio-rustls",
            n => n,
        }
        .to_string()
    };
    let cases: Vec<&Case> = cases.iter().filter(|c| c.name.contains(only)).collect();
    let mut table = Vec::new();
    for case in &cases {
        let mut samples: Vec<Samples> = servers.iter().map(|_| Samples::default()).collect();
        for rep in 0..reps {
            for i in 0..servers.len() {
                let idx = (i + rep) % servers.len();
                let s = &servers[idx];
                let mut cfg = Config::new(Target::parse(&s.url()).expect("url"));
                cfg.connections = case.connections;
                cfg.load = Load::Saturate(case.inflight);
                cfg.size = case.size;
                cfg.duration = Duration::from_secs(secs);
                cfg.server_pid = Some(s.pid());
                cfg.tls = tls.cloned();
                match bench::run(&cfg, &mut |_| {}) {
                    Ok(r) => {
                        let out = &mut samples[idx];
                        out.rate.push(r.msgs_per_sec);
                        out.p99_us
                            .push(r.latency.map_or(f64::NAN, |l| l.p99.as_nanos() as f64 / 1e3));
                        out.per_cpu.push(r.msgs_per_server_cpu_sec().unwrap_or(f64::NAN));
                        if !r.is_clean() {
                            out.unclean += 1;
                            eprintln!("{} / {}: not clean: {:?}", case.name, s.name, r.first_error);
                        }
                    }
                    Err(e) => eprintln!("{} / {}: {e}", case.name, s.name),
                }
            }
        }
        let meds: Vec<(f64, f64, f64, usize)> = samples
            .iter_mut()
            .map(|m| {
                (
                    median(&mut m.rate),
                    median(&mut m.p99_us),
                    median(&mut m.per_cpu),
                    m.unclean,
                )
            })
            .collect();
        table.push(meds);
    }
    println!("| case | server | msgs/s | p99 | msgs per server CPU-s | wsloop ratio (msgs/CPU-s) | wsloop ratio (msgs/s) | wsloop p99 / peer p99 |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (case, meds) in cases.iter().zip(&table) {
        let ours = meds[0];
        for (s, m) in servers.iter().zip(meds) {
            let ratio = |a: f64, b: f64| {
                if s.name == "wsloop" {
                    "–".to_string()
                } else {
                    format!("{:.2}x", a / b)
                }
            };
            println!(
                "| {} | {} | {:.0} | {:.0} µs | {:.0} | {} | {} | {} |{}",
                case.name,
                label(s.name),
                m.0,
                m.1,
                m.2,
                ratio(ours.2, m.2),
                ratio(ours.0, m.0),
                ratio(ours.1, m.1),
                if m.3 > 0 {
                    format!(" ({} unclean runs)", m.3)
                } else {
                    String::new()
                }
            );
        }
    }
    println!("\nratio = wsloop / peer (above 1 is better for wsloop, except p99 where below 1 is better).");
}
