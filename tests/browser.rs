//! The built-in page in a real browser: headless Chromium driven by playwright-core
//! (tests/js/browser.mjs). Two pages in broadcast mode each send a line and both see both lines;
//! a page in echo mode survives a server restart by reconnecting; with the `deflate` feature,
//! Chromium agrees on permessage-deflate and a large compressed broadcast arrives intact. Screenshots go to
//! `<target>/browser-chat.png` and `<target>/browser-reconnect.png`.
//!
//! The rooms example (examples/rooms.rs) is driven from a page too (tests/js/rooms.mjs): the
//! token in the query, topics, join and leave notices.
//!
//! Needs /usr/bin/chromium (Debian package `chromium`), `node`, and tests/js/node_modules
//! (`.ci/run` runs `npm ci` there). Outside CI a missing piece skips the test loudly; under
//! `CI=true` it fails.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{drain_lines, require_tool, spawn_server, tail, target_dir, ServerProcess};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The node script is killed after this long (a run takes a few seconds).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("js")
}

/// Whether everything the browser test needs is installed (see the module docs).
fn have_browser_tools() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require_tool("chromium (/usr/bin/chromium)", Path::new(CHROMIUM).is_file())
        && require_tool("node", node)
        && require_tool(
            "the npm package playwright-core (run `npm ci` in tests/js)",
            js_dir().join("node_modules/playwright-core/package.json").is_file(),
        )
}

/// `node browser.mjs SCENARIO URL SCREENSHOT PROFILE`, its output collected (and offered line by
/// line on the returned channel).
struct Script {
    child: Child,
    started: Instant,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
    screenshot: PathBuf,
}

impl Script {
    fn start(scenario: &str, server: &ServerProcess) -> Script {
        Self::start_at(scenario, scenario, &format!("http://{}/", server.addr))
    }

    /// `name` names the screenshot and the profile; `base` is the page's URL.
    fn start_at(scenario: &str, name: &str, base: &str) -> Script {
        let scenario_name = name;
        let screenshot = target_dir().join(format!("browser-{scenario_name}.png"));
        let profile = target_dir().join(format!("browser-profile-{scenario_name}"));
        let _ = fs::remove_file(&screenshot);
        let _ = fs::remove_dir_all(&profile); // a fresh --user-data-dir every run
        fs::create_dir_all(&profile).expect("create the browser profile directory");
        let mut child = Command::new("node")
            .arg(js_dir().join("browser.mjs"))
            .arg(scenario)
            .arg(base)
            .arg(&screenshot)
            .arg(&profile)
            .current_dir(js_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        drain_lines(child.stdout.take().expect("piped"), Arc::clone(&out), Some(tx));
        drain_lines(child.stderr.take().expect("piped"), Arc::clone(&err), None);
        Script {
            child,
            started: Instant::now(),
            out,
            err,
            lines,
            screenshot,
        }
    }

    fn report(&self, server: &ServerProcess) -> String {
        format!(
            "--- browser.mjs stdout ---\n{}--- browser.mjs stderr ---\n{}\n--- wsloop stderr ---\n{}--- end ---",
            tail(&self.out.lock().unwrap(), 8192),
            tail(&self.err.lock().unwrap(), 8192),
            tail(&server.stderr(), 8192)
        )
    }

    /// Waits for an output line equal to `want`.
    fn wait_line(&self, want: &str, server: &ServerProcess) {
        loop {
            let left = SCRIPT_TIMEOUT.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim_end() == want => return,
                Ok(_) => {}
                Err(_) => panic!("browser.mjs never printed `{want}`\n{}", self.report(server)),
            }
        }
    }

    /// Waits for the script to end; asserts success, the `checks` lines and the screenshot.
    fn finish(mut self, server: &ServerProcess, checks: &[&str]) {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for node") {
                break Some(s);
            }
            if self.started.elapsed() > SCRIPT_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(50)); // let the drain threads catch up
        let report = self.report(server);
        assert!(
            status.is_some_and(|s| s.success()),
            "browser.mjs {} after {:.1?}\n{report}",
            status.map_or("was killed (timeout)".to_string(), |s| s.to_string()),
            self.started.elapsed()
        );
        let out = self.out.lock().unwrap().clone();
        for check in checks {
            assert!(out.lines().any(|l| l == *check), "missing `{check}`\n{report}");
        }
        let png = fs::read(&self.screenshot).unwrap_or_default();
        assert!(
            png.len() > 1000 && png.starts_with(b"\x89PNG"),
            "no screenshot at {}",
            self.screenshot.display()
        );
        println!("screenshot: {}\n{report}", self.screenshot.display());
    }
}

#[test]
fn two_pages_chat_in_broadcast_mode() {
    if !have_browser_tools() {
        return;
    }
    let server = spawn_server(&["--mode", "broadcast"]);
    let script = Script::start("chat", &server);
    script.finish(
        &server,
        &[
            "ok A connected",
            "ok B connected",
            "ok A sees both lines",
            "ok B sees both lines",
        ],
    );
}

/// Chromium offers permessage-deflate; the server agrees, and a large text broadcast reaches two
/// sockets of the page intact.
#[cfg(feature = "deflate")]
#[test]
fn chromium_agrees_on_permessage_deflate() {
    if !have_browser_tools() {
        return;
    }
    let server = spawn_server(&["--mode", "broadcast"]);
    let script = Script::start("deflate", &server);
    script.finish(&server, &["ok A connected", "ok 256 KiB of text reached both sockets"]);
}

#[test]
fn page_reconnects_after_a_server_restart() {
    if !have_browser_tools() {
        return;
    }
    let first = spawn_server(&["--mode", "echo"]);
    let listen = first.addr.to_string();
    let script = Script::start("reconnect", &first);
    script.wait_line("ok A connected", &first);
    drop(first); // killed: the page loses its connection
    let second = spawn_server(&["--mode", "echo", "--listen", &listen]);
    script.finish(
        &second,
        &[
            "ok A saw the connection drop",
            "ok A reconnected",
            "ok A echo after reconnect",
        ],
    );
}

#[test]
fn rooms_example_from_chromium() {
    if !have_browser_tools() {
        return;
    }
    let server = common::spawn_example("rooms", &["--listen", "127.0.0.1:0", "--token", "s3cret"]);
    let profile = target_dir().join("browser-profile-rooms");
    let _ = fs::remove_dir_all(&profile); // a fresh --user-data-dir every run
    fs::create_dir_all(&profile).expect("create the browser profile directory");
    let out = Command::new("node")
        .arg(js_dir().join("rooms.mjs"))
        .arg(format!("ws://{}", server.addr))
        .arg("s3cret")
        .arg(&profile)
        .current_dir(js_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start node: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "rooms.mjs: {}\n--- stdout ---\n{stdout}--- stderr ---\n{}\n--- rooms stderr ---\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 8192),
        tail(&server.stderr(), 8192)
    );
    assert!(out.status.success(), "{report}");
    for check in [
        "ok wrong token refused",
        "ok joined with the query token; joins announced",
        "ok a message reaches the others in the room, not its sender",
        "ok nothing crosses rooms; binary goes as it is",
        "ok leave announced",
    ] {
        assert!(stdout.lines().any(|l| l == check), "missing `{check}`\n{report}");
    }
}

/// The page loaded over `https://` connects back over `wss://` (an `https://` page may not open
/// `ws://`). Chromium is told to accept the test certificate (made at test time).
#[cfg(feature = "tls")]
#[test]
fn page_over_https_chats_over_wss() {
    if !have_browser_tools() {
        return;
    }
    #[path = "common/certs.rs"]
    mod certs;
    let c = certs::make(&target_dir().join(format!("browser-tls-certs-{}", std::process::id())));
    let server = spawn_server(&[
        "--mode",
        "broadcast",
        "--tls-cert",
        c.cert.to_str().unwrap(),
        "--tls-key",
        c.key.to_str().unwrap(),
    ]);
    let script = Script::start_at(
        "chat",
        "chat-https",
        &format!("https://localhost:{}/", server.addr.port()),
    );
    script.finish(
        &server,
        &[
            "ok A connected",
            "ok B connected",
            "ok A sees both lines",
            "ok B sees both lines",
        ],
    );
}
