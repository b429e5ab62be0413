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
fn too_many_connections_for_the_descriptor_limit_is_refused_up_front() {
    let (ok, out, err) = bench(&["ws://127.0.0.1:9/", "--connections", "1000000", "--quiet"]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("open-file limit") || err.contains("descriptors"), "{err}");
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
