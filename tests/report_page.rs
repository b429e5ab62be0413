//! `wsloop bench --json --html` and `wsloop report`: the JSON's timeline and histogram, the
//! page (self-contained, rendered by headless Chromium), comparing and merging runs, and the
//! errors for files that are not reports.
//!
//! The rendering test needs /usr/bin/chromium: outside CI a missing one skips it loudly; under
//! `CI=true` it fails.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{require_tool, spawn_server, target_dir, ServerProcess};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";
/// A page of a few hundred kilobytes renders in a second or two; a hung browser is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// The run's colour in the page (the first of its palette).
const FIRST_COLOUR: [u8; 3] = [0x1f, 0x77, 0xb4];

fn wsloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wsloop"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run wsloop")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = target_dir().join(format!("report-page-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// A 2-second periodic run against `server`, its JSON in `json` and its page in `html`.
fn bench_run(server: &ServerProcess, json: &Path, html: &Path) -> Value {
    let url = format!("ws://{}/", server.addr);
    let pid = server.pid().to_string();
    let out = wsloop(&[
        "bench",
        &url,
        "-c",
        "20",
        "--every",
        "20ms",
        "-d",
        "2s",
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    std::fs::write(json, &out.stdout).unwrap();
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// `histogram.buckets` as (value, count) pairs.
fn buckets(h: &Value) -> Vec<(u64, u64)> {
    h["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| (b[0].as_u64().unwrap(), b[1].as_u64().unwrap()))
        .collect()
}

/// The value at quantile `q` of bucket pairs, computed here from the file alone.
fn quantile(b: &[(u64, u64)], max: u64, q: f64) -> u64 {
    let total: u64 = b.iter().map(|p| p.1).sum();
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for &(v, c) in b {
        seen += c;
        if seen >= rank {
            return v.min(max);
        }
    }
    max
}

/// What a page must not do: load anything, or run anything.
fn assert_self_contained(page: &str) {
    let lower = page.to_ascii_lowercase();
    assert!(!lower.contains("<script"), "a script in the page");
    for attr in ["src=", "href=", "url("] {
        for (at, _) in lower.match_indices(attr) {
            let rest = lower[at + attr.len()..].trim_start_matches(['"', '\'', ' ']);
            assert!(
                !rest.starts_with("http:") && !rest.starts_with("https:") && !rest.starts_with("//"),
                "an external reference: {}",
                &page[at..(at + 80).min(page.len())]
            );
        }
    }
    assert!(!lower.contains("<link"), "a linked resource");
    assert!(!lower.contains("@import") && !lower.contains("@font-face"));
}

#[test]
fn a_run_writes_its_timeline_histogram_and_page_and_reports_compare_and_merge() {
    let server = spawn_server(&[]);
    let dir = scratch("runs");
    let (a_json, b_json) = (dir.join("a.json"), dir.join("b.json"));
    let a = bench_run(&server, &a_json, &dir.join("a.html"));
    let b = bench_run(&server, &b_json, &dir.join("b.html"));

    // The timeline: one sample per second of the run, adding up to the run.
    for j in [&a, &b] {
        let t = j["timeline"].as_array().expect("a timeline");
        assert!((2..=5).contains(&t.len()), "{} samples", t.len());
        let sum = |k: &str| t.iter().map(|s| s[k].as_u64().unwrap()).sum::<u64>();
        assert_eq!(sum("sent"), j["sent"].as_u64().unwrap());
        assert_eq!(sum("received"), j["received"].as_u64().unwrap());
        assert_eq!(t[1]["connections"], 20, "{}", t[1]);
        assert!(t[1]["p99_us"].as_f64().unwrap() >= t[1]["p50_us"].as_f64().unwrap());
        assert!(t[1]["server_rss"].as_u64().unwrap() > 1 << 20);
        assert!(t.iter().all(|s| s["t"].as_f64().unwrap() > 0.0));
        let total: u64 = buckets(&j["histogram"]).iter().map(|p| p.1).sum();
        assert_eq!(total, j["latency_us"]["count"].as_u64().unwrap());
    }
    let page = std::fs::read_to_string(dir.join("a.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.matches("<svg").count() >= 6);
    assert_self_contained(&page);

    // Side by side: one page, both runs, one legend entry each.
    let cmp = dir.join("compare.html");
    let out = wsloop(&[
        "report",
        a_json.to_str().unwrap(),
        b_json.to_str().unwrap(),
        "--html",
        cmp.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("== a\n") && text(&out.stdout).contains("== b\n"));
    let page = std::fs::read_to_string(&cmp).unwrap();
    assert_self_contained(&page);
    assert!(page.contains("2 runs compared"));
    for colour in ["#1f77b4", "#d62728"] {
        assert!(page.matches(&format!("stroke=\"{colour}\"")).count() >= 6, "{colour}");
    }

    // Merged: counts summed, histograms summed, percentiles from the sum.
    let merged_json = dir.join("merged.json");
    let out = wsloop(&[
        "report",
        a_json.to_str().unwrap(),
        b_json.to_str().unwrap(),
        "--merge",
        "--json",
        merged_json.to_str().unwrap(),
        "--html",
        dir.join("merged.html").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("latency      p50"), "{}", text(&out.stdout));
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&merged_json).unwrap()).unwrap();
    for k in ["connections", "held", "sent", "received", "measured_received"] {
        assert_eq!(
            m[k].as_u64(),
            Some(a[k].as_u64().unwrap() + b[k].as_u64().unwrap()),
            "{k}"
        );
    }
    assert_eq!(m["bench_processes"], 2);
    let mut sum = std::collections::BTreeMap::new();
    for (v, c) in buckets(&a["histogram"]).into_iter().chain(buckets(&b["histogram"])) {
        *sum.entry(v).or_insert(0u64) += c;
    }
    let sum: Vec<(u64, u64)> = sum.into_iter().collect();
    assert_eq!(
        buckets(&m["histogram"]),
        sum,
        "the merged histogram is the bucket-wise sum"
    );
    let max = m["histogram"]["max_ns"].as_u64().unwrap();
    assert_eq!(
        max,
        a["histogram"]["max_ns"]
            .as_u64()
            .unwrap()
            .max(b["histogram"]["max_ns"].as_u64().unwrap())
    );
    for (q, key) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99_9")] {
        let want = quantile(&sum, max, q) as f64 / 1000.0;
        assert_eq!(m["latency_us"][key].as_f64(), Some(want), "{key}");
    }
    let secs = a["timeline"]
        .as_array()
        .unwrap()
        .len()
        .max(b["timeline"].as_array().unwrap().len());
    assert_eq!(m["timeline"].as_array().unwrap().len(), secs);
    assert!(std::fs::read_to_string(dir.join("merged.html"))
        .unwrap()
        .contains("merged: a + b"));
}

#[test]
fn files_that_are_not_reports_get_clear_errors() {
    let dir = scratch("errors");
    let missing = dir.join("missing.json");
    let out = wsloop(&["report", missing.to_str().unwrap(), "--html", "/dev/null"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot read") && err.contains("missing.json"), "{err}");

    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"url\": 3}").unwrap();
    let out = wsloop(&["report", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("junk.json: not a wsloop bench report"), "{err}");
    assert!(err.contains("line 1"), "serde says where: {err}");

    for (args, says) in [
        (&["report"][..], "no report given"),
        (&["report", "x.json", "--json", "m.json"], "add --merge"),
        (&["report", "x.json", "--bogus"], "unknown option '--bogus'"),
    ] {
        let out = wsloop(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    }
    // A page that cannot be written is refused before the run.
    let out = wsloop(&["bench", "ws://127.0.0.1:9/", "--html", "/nonexistent-dir/x.html"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot write /nonexistent-dir/x.html"));
}

/// Runs `cmd` with a deadline; its stdout.
fn run_bounded(mut cmd: Command) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (reader.join().unwrap(), err_reader.join().unwrap());
    (status.is_some_and(|s| s.success()), out, err)
}

fn chromium(profile: &Path, extra: &[&str], page: &Path) -> (bool, String, String) {
    let _ = std::fs::remove_dir_all(profile);
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(format!("file://{}", page.display()));
    run_bounded(cmd)
}

/// A PNG's size and pixels (8-bit RGB or RGBA, as Chromium writes them), as RGB.
fn decode_png(png: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut at, mut idat) = (8, Vec::new());
    let (mut w, mut h, mut channels) = (0u32, 0u32, 0usize);
    while at + 8 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let kind = &png[at + 4..at + 8];
        let data = &png[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap());
                h = u32::from_be_bytes(data[4..8].try_into().unwrap());
                assert_eq!((data[8], data[12]), (8, 0), "8-bit, not interlaced");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    t => panic!("PNG colour type {t}"),
                };
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .expect("inflate");
    let stride = w as usize * channels;
    assert_eq!(raw.len(), (stride + 1) * h as usize, "scanlines");
    let mut img = vec![0u8; stride * h as usize];
    for y in 0..h as usize {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= channels {
                img[y * stride + x - channels] as i32
            } else {
                0
            };
            let b = if y > 0 { img[(y - 1) * stride + x] as i32 } else { 0 };
            let c = if x >= channels && y > 0 {
                img[(y - 1) * stride + x - channels] as i32
            } else {
                0
            };
            let predict = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("PNG filter {f}"),
            };
            img[y * stride + x] = (line[x] as i32 + predict) as u8;
        }
    }
    let pixels = img.chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
    (w, h, pixels)
}

#[test]
fn the_page_renders_in_chromium() {
    if !require_tool("chromium (/usr/bin/chromium)", Path::new(CHROMIUM).is_file()) {
        return;
    }
    let server = spawn_server(&[]);
    let dir = scratch("chromium");
    let page = dir.join("run.html");
    bench_run(&server, &dir.join("run.json"), &page);
    let shot = dir.join("run.png");
    let (ok, _, err) = chromium(
        &dir.join("profile-shot"),
        &[&format!("--screenshot={}", shot.display()), "--window-size=1200,2000"],
        &page,
    );
    assert!(ok && shot.is_file(), "chromium made no screenshot: {err}");
    let (w, h, pixels) = decode_png(&std::fs::read(&shot).unwrap());
    assert_eq!((w, h), (1200, 2000));
    let mut colours: Vec<[u8; 3]> = pixels.clone();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 16, "a blank page: {} colours", colours.len());
    // The charts drew their lines: pixels of the run's own colour.
    let run_colour = pixels.iter().filter(|p| **p == FIRST_COLOUR).count();
    assert!(run_colour > 500, "{run_colour} pixels of the run's colour");

    let (ok, dom, err) = chromium(&dir.join("profile-dom"), &["--dump-dom"], &page);
    assert!(ok, "chromium --dump-dom failed: {err}");
    assert!(dom.matches("<svg").count() >= 6, "{}", &dom[..dom.len().min(2000)]);
    assert!(dom.matches("<polyline").count() >= 6);
    assert!(dom.contains("Latency distribution") && dom.contains("Server CPU"));
}
