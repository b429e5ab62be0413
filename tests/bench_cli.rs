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
    // The parts' seconds merged: counts summed, so every message is in one second and the
    // seconds of the measured phase count all 600 connections; percentiles from the merged
    // histograms (their counts add up to every round trip).
    let t = j["timeline"].as_array().expect("a timeline");
    let sum = |k: &str| t.iter().map(|s| s[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("sent"), sent, "{j}");
    assert_eq!(sum("received"), sent);
    let round_trips: u64 = (t.iter())
        .flat_map(|s| s["histogram"]["buckets"].as_array().unwrap())
        .map(|b| b[1].as_u64().unwrap())
        .sum();
    assert_eq!(round_trips, sent);
    assert_eq!(t.iter().map(|s| s["connections"].as_u64().unwrap()).max(), Some(600));
    // The first part measures the server for all, each second (a part may end a second later).
    let measured = t.iter().filter(|s| s["server_rss"].as_u64().is_some()).count();
    assert!(measured + 1 >= t.len(), "{j}");
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

/// The JSON report of a run, with whether it exited 0.
fn bench_json(args: &[&str]) -> (bool, serde_json::Value) {
    let mut all = args.to_vec();
    all.extend(["--json", "--quiet"]);
    let (ok, out, err) = bench(&all);
    let j = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (ok, j)
}

#[test]
fn the_open_model_sends_at_the_rate_asked_and_reports_the_lag() {
    let server = common::spawn_server(&[]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[&url, "-c", "10", "--rate", "500", "--ramp", "1000", "-d", "2s"]);
    assert!(ok, "{j}");
    assert_eq!(j["mode"], "rate");
    assert_eq!(j["rate"], 500);
    let s = &j["schedule"];
    let achieved = s["achieved"].as_f64().unwrap();
    assert!((450.0..=550.0).contains(&achieved), "{j}");
    let sent = j["sent"].as_u64().unwrap();
    assert!((900..=1100).contains(&sent), "{j}");
    assert_eq!(j["received"].as_u64(), Some(sent));
    assert_eq!(j["latency_us"]["count"].as_u64(), Some(sent));
    assert_eq!(s["unsent"], 0);
    // The lag is reported, and a loop that keeps up is not seconds behind.
    assert!(s["lag_max_us"].as_f64().unwrap() < 1e6, "{j}");
    // With compression and text payloads too.
    let (ok, j) = bench_json(&[
        &url,
        "-c",
        "4",
        "--rate",
        "200",
        "--payload",
        "json",
        "--size",
        "300",
        "--deflate",
        "-d",
        "1s",
    ]);
    assert!(ok, "{j}");
    assert_eq!(j["deflate"]["agreed"], 4, "{j}");
    assert!(j["sent"].as_u64().unwrap() >= 150, "{j}");
}

/// A server stopped for a second: the open model's latency counts from when each message was
/// due, so the stall is in its p99; the closed model stops sending while the server is stopped,
/// so only the one message in flight waits and its p99 does not move.
#[test]
fn a_one_second_stall_shows_in_the_open_model_and_not_in_the_closed_one() {
    let run = |load: &[&str]| {
        let server = common::spawn_server(&[]);
        let url = format!("ws://{}/", server.addr);
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args(["bench", &url, "-c", "1", "-d", "3s", "--json"])
            .args(load)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run wsloop bench");
        // The first progress line of the measured phase comes a second into the run.
        let (stderr, measuring) =
            common::wait_for_line(child.stderr.take().unwrap(), std::time::Duration::from_secs(20), |l| {
                l.contains("measure").then_some(())
            });
        measuring.unwrap_or_else(|e| panic!("{e}: {}", stderr.lock().unwrap()));
        let pid = server.pid().to_string();
        assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        std::thread::sleep(std::time::Duration::from_millis(1000));
        assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let j: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
        let l = &j["latency_us"];
        (
            l["p99"].as_f64().unwrap(),
            l["max"].as_f64().unwrap(),
            j["sent"].as_u64().unwrap(),
        )
    };
    let (open_p99, open_max, open_sent) = run(&["--rate", "500"]);
    assert!(open_p99 >= 900_000.0, "open model p99 {open_p99} µs");
    assert!(open_max >= 950_000.0, "open model max {open_max} µs");
    assert!(
        (1300..=1700).contains(&open_sent),
        "sent on schedule through the stall: {open_sent}"
    );
    let (closed_p99, closed_max, closed_sent) = run(&["--inflight", "1"]);
    assert!(closed_sent > 1000, "{closed_sent}");
    assert!(
        closed_max >= 900_000.0,
        "the one message in flight waited: {closed_max} µs"
    );
    assert!(closed_p99 < 100_000.0, "closed model p99 {closed_p99} µs");
}

#[test]
fn expect_reply_times_each_answer_and_expect_none_only_counts() {
    let server = common::spawn_server(&["--mode", "reply"]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[&url, "-c", "5", "--inflight", "2", "--expect", "reply", "-d", "1s"]);
    assert!(ok, "{j}");
    assert_eq!(j["expect"], "reply");
    let sent = j["sent"].as_u64().unwrap();
    assert!(sent > 100, "{j}");
    assert_eq!(j["received"].as_u64(), Some(sent));
    assert_eq!(j["latency_us"]["count"].as_u64(), Some(sent), "{j}");
    assert_eq!(j["corrupted"], 0);
    // The same server measured as an echo server: every answer is wrong.
    let (ok, j) = bench_json(&[&url, "-c", "2", "--every", "100ms", "-d", "500ms"]);
    assert!(!ok);
    assert_eq!(j["corrupted"], j["received"], "{j}");
    assert!(j["corrupted"].as_u64().unwrap() > 0, "{j}");
    let (ok, j) = bench_json(&[&url, "-c", "5", "--rate", "100", "--expect", "none", "-d", "1s"]);
    assert!(ok, "{j}");
    assert!(j["sent"].as_u64().unwrap() >= 90, "{j}");
    assert_eq!(j["received"], j["sent"], "every answer arrives and is counted: {j}");
    assert_eq!(j["latency_us"], serde_json::Value::Null);
    let (_, out, err) = bench(&[&url, "--inflight", "1", "--expect", "none", "-q"]);
    assert!(err.contains("--expect none"), "{err}{out}");
}

/// An idle run checks nothing: it counts what a server sends by itself (here the join notices
/// of a broadcast server).
#[test]
fn an_idle_run_counts_what_arrives() {
    let server = common::spawn_server(&["--mode", "broadcast", "--announce"]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[&url, "-c", "5", "-d", "500ms"]);
    assert!(ok, "{j}");
    assert_eq!(j["sent"], 0);
    assert!(j["received"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["corrupted"], 0);
}

#[test]
fn fan_out_counts_every_delivery_against_a_broadcast_server() {
    let server = common::spawn_server(&["--mode", "broadcast"]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[&url, "-c", "20", "--publishers", "3", "--rate", "300", "-d", "1s"]);
    assert!(ok, "{j}");
    let f = &j["fanout"];
    let published = f["published"].as_u64().unwrap();
    assert!((250..=350).contains(&published), "{j}");
    assert_eq!(j["sent"].as_u64(), Some(published));
    // The server sends each message to its sender too: 20 receivers.
    assert_eq!(f["expected"], 20);
    assert_eq!(j["received"].as_u64(), Some(published * 20), "{j}");
    assert_eq!(j["latency_us"]["count"].as_u64(), Some(published * 20));
    for key in ["missing", "duplicated", "reordered", "receivers_missing", "other"] {
        assert_eq!(f[key], 0, "{key}: {j}");
    }
    assert!(f["deliveries_per_sec"].as_f64().unwrap() > 4000.0, "{j}");
    let server = common::spawn_server(&["--mode", "broadcast", "--no-echo-self"]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[&url, "-c", "10", "--publishers", "2", "--inflight", "1", "-d", "1s"]);
    assert!(ok, "{j}");
    let f = &j["fanout"];
    assert_eq!(f["expected"], 9, "not back to the sender: {j}");
    let published = f["published"].as_u64().unwrap();
    assert!(published > 10, "{j}");
    assert_eq!(j["received"].as_u64(), Some(published * 9), "{j}");
    assert_eq!(f["missing"], 0, "{j}");
}

/// The rooms example: a token in a header, text relayed with the sender's name in front, join
/// notices in between; without the token, 401 in the report.
#[test]
fn fan_out_through_the_rooms_example_with_a_header() {
    let server = common::spawn_example("rooms", &["--listen", "127.0.0.1:0", "--token", "SECRET"]);
    let url = format!("ws://{}/rooms/lobby", server.addr);
    let (ok, j) = bench_json(&[
        &url,
        "-c",
        "8",
        "-H",
        "Authorization: Bearer SECRET",
        "--publishers",
        "2",
        "--rate",
        "100",
        "--payload",
        "text",
        "--size",
        "64",
        "-d",
        "1s",
    ]);
    assert!(ok, "{j}");
    let f = &j["fanout"];
    assert_eq!(f["expected"], 7, "rooms does not send back to the sender: {j}");
    let published = f["published"].as_u64().unwrap();
    assert!(published >= 80, "{j}");
    assert_eq!(j["received"].as_u64(), Some(published * 7), "{j}");
    assert_eq!(f["missing"], 0);
    assert!(f["other"].as_u64().unwrap() > 0, "the join notices: {j}");
    let (ok, j) = bench_json(&[&url, "-c", "3", "-d", "200ms"]);
    assert!(!ok);
    assert_eq!(j["handshake_statuses"]["401"], 3, "{j}");
    assert!(j["first_error"].as_str().unwrap().contains("401"), "{j}");
}

#[test]
fn refusals_are_counted_by_status_and_closes_by_code() {
    let server = common::spawn_server(&["--origin", "http://good.example", "--max-message", "100"]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[&url, "-c", "4", "--origin", "http://evil.example", "-d", "200ms"]);
    assert!(!ok);
    assert_eq!(j["handshake_failures"], 4);
    assert_eq!(j["handshake_statuses"]["403"], 4, "{j}");
    let (ok, out, _) = bench(&[&url, "-c", "2", "--origin", "http://evil.example", "-d", "200ms", "-q"]);
    assert!(!ok);
    assert!(out.contains("refused      by HTTP status: 403 x2"), "{out}");
    // Allowed, but the messages are too large: the server closes with 1009.
    let (ok, j) = bench_json(&[
        &url,
        "-c",
        "3",
        "--origin",
        "http://good.example",
        "--size",
        "1000",
        "--inflight",
        "1",
        "-d",
        "500ms",
    ]);
    assert!(!ok);
    assert_eq!(j["handshake_failures"], 0, "{j}");
    assert_eq!(j["closed_early"], 3, "{j}");
    assert_eq!(j["close_codes"]["1009"], 3, "{j}");
    assert!(j["first_error"].as_str().unwrap().contains("1009"), "{j}");
}

#[test]
fn a_fixed_message_a_subprotocol_and_a_message_file() {
    let server = common::spawn_server(&["--protocol", "chat"]);
    let url = format!("ws://{}/", server.addr);
    let (ok, j) = bench_json(&[
        &url,
        "-c",
        "3",
        "--protocol",
        "chat",
        "--message",
        "hello",
        "--inflight",
        "2",
        "-d",
        "500ms",
    ]);
    assert!(ok, "{j}");
    assert_eq!(j["size"], 5);
    let sent = j["sent"].as_u64().unwrap();
    assert!(sent > 20, "{j}");
    assert_eq!(j["latency_us"]["count"].as_u64(), Some(sent), "{j}");
    let file = std::env::temp_dir().join(format!("wsloop-bench-message-{}", std::process::id()));
    std::fs::write(&file, [0u8, 159, 146, 150, 1, 2]).unwrap();
    let (ok, j) = bench_json(&[
        &url,
        "-c",
        "2",
        "--message-file",
        file.to_str().unwrap(),
        "--every",
        "50ms",
        "-d",
        "500ms",
    ]);
    std::fs::remove_file(&file).unwrap();
    assert!(ok, "{j}");
    assert_eq!(j["size"], 6);
    assert_eq!(j["corrupted"], 0);
    assert!(j["received"].as_u64().unwrap() >= 10, "{j}");
}
