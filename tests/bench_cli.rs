//! `wsloop bench` end to end: against a real `wsloop serve`, in each load mode.

mod common;

use std::process::Command;

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run wsloop bench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The number after `"key":` in a flat JSON text.
fn field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat).unwrap_or_else(|| panic!("no {key} in {json}")) + pat.len();
    json[at..].chars().take_while(|c| !matches!(c, ',' | '}')).collect()
}

#[test]
fn saturate_mode_holds_every_connection_and_verifies_every_echo() {
    let server = common::spawn_server(&[]);
    let url = format!("ws://{}/", server.addr);
    let pid = server.pid().to_string();
    let (ok, json, err) = bench(&[
        &url,
        "--connections",
        "300",
        "--inflight",
        "4",
        "--size",
        "100",
        "--duration",
        "1s",
        "--source-ips",
        "127.0.0.2-127.0.0.4",
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
    ]);
    assert!(ok, "bench failed: {err}\n{json}");
    assert_eq!(field(&json, "held"), "300", "{json}");
    for key in [
        "connect_failures",
        "handshake_failures",
        "lost",
        "corrupted",
        "protocol_errors",
    ] {
        assert_eq!(field(&json, key), "0", "{key} in {json}");
    }
    let received: u64 = field(&json, "measured_received").parse().unwrap();
    assert!(received > 300, "only {received} echoes in 1 s: {json}");
    assert_eq!(field(&json, "clean"), "true");
    let rss: u64 = field(&json, "rss_held").parse().expect("server RSS reported");
    assert!(rss > 0);
    assert!(field(&json, "p99").parse::<f64>().unwrap() > 0.0, "{json}");
}

#[test]
fn periodic_and_idle_modes_print_a_summary() {
    let server = common::spawn_server(&[]);
    let url = format!("ws://{}/", server.addr);
    let (ok, out, err) = bench(&[
        &url,
        "--connections",
        "20",
        "--every",
        "100ms",
        "--duration",
        "1s",
        "--quiet",
    ]);
    assert!(ok, "{err}\n{out}");
    assert!(out.contains("held 20 of 20"), "{out}");
    assert!(out.contains("lost 0, corrupted 0"), "{out}");
    // 20 connections, one message each per 100 ms, for a second: about 200 round trips.
    let sent: u64 = out
        .split("sent ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((100..=300).contains(&sent), "sent {sent}: {out}");
    let (ok, json, err) = bench(&[&url, "--connections", "50", "--duration", "500ms", "--json", "--quiet"]);
    assert!(ok, "{err}\n{json}");
    assert_eq!(field(&json, "held"), "50");
    assert_eq!(field(&json, "sent"), "0", "idle mode sends nothing: {json}");
}

#[test]
fn more_connections_than_source_ports_are_refused_up_front() {
    // 253 default source addresses give about 7.1 million ports; one gives about 28,000.
    for args in [
        &["ws://127.0.0.1:9/", "--connections", "8000000", "--quiet"][..],
        &[
            "ws://127.0.0.1:9/",
            "--connections",
            "100000",
            "--source-ips",
            "127.0.0.2",
            "--quiet",
        ],
    ] {
        let (ok, out, err) = bench(args);
        assert!(!ok);
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("local ports"), "{err}");
    }
}

/// Past the open-file limit (here 256, set for the bench alone) the bench forks as many
/// processes as it needs, keeps them in step and sums them in one report; the server's RSS is
/// summed over its parent and workers.
#[test]
fn a_bench_above_the_descriptor_limit_forks_helpers_and_sums_them() {
    let server = common::spawn_server(&["--processes", "2"]);
    let url = format!("ws://{}/", server.addr);
    let pid = server.pid().to_string();
    let out = Command::new("sh")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_wsloop"))
        .args([
            "bench",
            &url,
            "--connections",
            "600",
            "--every",
            "200ms",
            "--duration",
            "1s",
        ])
        .args(["--server-pid", &pid, "--json", "--quiet"])
        .output()
        .expect("run wsloop bench under ulimit");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let j: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    // 256 descriptors less 32 for the loop: 224 connections a process, so three processes.
    assert_eq!(j["bench_processes"], 3, "{j}");
    assert_eq!(j["connections"], 600);
    assert_eq!(j["held"], 600);
    assert_eq!(j["opened"], 600);
    for key in [
        "connect_failures",
        "handshake_failures",
        "closed_early",
        "lost",
        "corrupted",
    ] {
        assert_eq!(j[key], 0, "{key}: {j}");
    }
    // One message per connection every 200 ms for a second: about 3,000, all echoed, every
    // round trip in the merged latency histogram.
    let sent = j["sent"].as_u64().unwrap();
    assert!((1800..=3600).contains(&sent), "{j}");
    assert_eq!(j["received"].as_u64(), Some(sent));
    assert_eq!(j["latency_us"]["count"].as_u64(), Some(sent));
    assert_eq!(j["clean"], true);
    let s = &j["server"];
    assert_eq!(s["processes"], 3, "the parent and two workers: {j}");
    let (rss, lo, hi) = (
        s["rss_held"].as_u64().unwrap(),
        s["descriptors_min"].as_u64().unwrap(),
        s["descriptors_max"].as_u64().unwrap(),
    );
    // Three processes' RSS, each at least a few hundred KiB.
    assert!(rss > 3 * 300 * 1024, "{j}");
    // Each worker holds some of the 600 connections; together about 600 descriptors.
    assert!(lo > 100 && hi < 600 && lo <= hi, "{j}");
}

/// SIGTERM to a bench split over processes reaches every part once: they all end the measured
/// phase early, close their connections and report, and the merged report says so.
#[test]
fn sigterm_to_a_split_bench_cuts_every_part_short() {
    let server = common::spawn_server(&[]);
    let url = format!("ws://{}/", server.addr);
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_wsloop"))
        .args(["bench", &url, "--connections", "500", "--every", "100ms"])
        .args(["--duration", "60s", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wsloop bench under ulimit");
    let (stderr, measuring) =
        common::wait_for_line(child.stderr.take().unwrap(), std::time::Duration::from_secs(20), |l| {
            l.contains("measure").then(|| l.to_string())
        });
    let text = || stderr.lock().unwrap().clone();
    // One live line for all the parts: their sums.
    let live = measuring.unwrap_or_else(|e| panic!("{e}: {}", text()));
    assert!(
        live.contains("connected 500/500") && live.contains("(3 processes)"),
        "{live}"
    );
    let asked = std::time::Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(20),
        "the parts did not stop: {}",
        text()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text());
    let j: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(j["bench_processes"], 3, "{j}");
    assert_eq!(j["interrupted"], true, "{j}");
    assert_eq!(j["held"], 500, "{j}");
    assert_eq!(j["close_timeouts"], 0, "{j}");
    assert!(j["received"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["received"], j["sent"], "{j}");
}

#[test]
fn a_refused_server_counts_as_connect_failures() {
    // Nothing listens on port 9 of 127.0.0.1 (discard, not running here).
    let (ok, json, _) = bench(&[
        "ws://127.0.0.1:9/",
        "--connections",
        "5",
        "--duration",
        "500ms",
        "--json",
        "--quiet",
    ]);
    assert!(!ok, "a run with failures exits non-zero");
    assert_eq!(field(&json, "held"), "0");
    assert_eq!(field(&json, "connect_failures"), "5", "{json}");
}
