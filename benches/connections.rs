//! Connection count: how much one `wsloop serve` process (default settings) costs per idle,
//! upgraded connection.
//!
//! For each count (1,000 / 10,000 / 19,000), a fresh server is started as a child process,
//! the load generator in this process opens that many connections from 127.0.0.2-127.0.0.60,
//! holds them idle, and reads the server's `VmRSS` before and after: (after − before) / N is the
//! server's user-space memory per connection. The kernel's side (socket buffers from
//! `/proc/net/sockstat`, slab from `/proc/meminfo`) is system-wide and counts both ends.
//!
//! `cargo bench --bench connections`. Environment: `WSLOOP_BENCH_CONNS=1000,10000,19000`,
//! `WSLOOP_BENCH_HOLD=15` (seconds held; longer than the 10 s handshake timeout, so the
//! handshake deadlines have fired and the server is in its steady idle state).

mod common;

use std::time::Duration;

use common::{env_or, machine, ServerProc};
use wsloop::bench::{self, BenchConfig as Config, Load, Report, Target};

fn main() {
    let counts: Vec<usize> = std::env::var("WSLOOP_BENCH_CONNS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 19_000]);
    let hold = Duration::from_secs(env_or("WSLOOP_BENCH_HOLD", 15));
    println!("wsloop connection count: idle upgraded connections held by one `wsloop serve` (defaults)");
    println!("machine: {}", machine());
    println!(
        "held {} s each; server and load generator are separate processes on the same cores\n",
        hold.as_secs()
    );
    println!(
        "| connections | held | failures | connect time | server RSS before | server RSS held | server bytes/conn | kernel TCP buffers | kernel slab/socket |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut all_clean = true;
    for n in counts {
        let server = ServerProc::wsloop();
        let target = Target::parse(&server.url()).expect("server url");
        let mut cfg = Config::new(target);
        cfg.connections = n;
        cfg.load = Load::Idle;
        cfg.duration = hold;
        cfg.source_ips = bench::default_source_ips(&cfg.target.addr);
        cfg.server_pid = Some(server.pid());
        let report = match bench::run(&cfg, &mut |_| {}) {
            Ok(r) => r,
            Err(e) => {
                println!("| {n} | – | cannot run: {e} |");
                all_clean = false;
                continue;
            }
        };
        all_clean &= report.is_clean();
        println!("{}", row(n, &report));
        drop(server);
        // Let the kernel finish the previous sockets before the next count.
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("\nbytes/conn = (VmRSS held − VmRSS before) / connections held; RSS has 4 KiB page granularity.");
    println!("Kernel figures are system-wide (client and server sockets both count; slab per socket = Δslab / ΔTCP sockets).");
    if !all_clean {
        println!("NOTE: some connections failed; see the rows above.");
    }
}

fn row(n: usize, r: &Report) -> String {
    let s = r.server.unwrap_or_default();
    let kib = |b: Option<u64>| b.map_or("?".into(), |b| format!("{:.0} KiB", b as f64 / 1024.0));
    let failures = r.connect_failures + r.handshake_failures + r.closed_early;
    let (tcp, slab) = match r.kernel {
        Some(k) => (
            format!("{} KiB", k.tcp_mem_held / 1024),
            // Only when the sockets explain the growth: other activity can swamp it.
            k.slab_per_socket().map_or("– (noisy)".into(), |b| format!("{b:.0} B")),
        ),
        None => ("?".into(), "?".into()),
    };
    format!(
        "| {n} | {} | {failures} | {:.2} s | {} | {} | {} | {tcp} | {slab} |",
        r.held,
        r.connect_time.as_secs_f64(),
        kib(s.rss_before),
        kib(s.rss_held),
        r.server_bytes_per_connection()
            .map_or("?".into(), |b| format!("{b:.0} B")),
    )
}
