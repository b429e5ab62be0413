//! Runs the Autobahn client test cases against a fuzzing server:
//!
//! ```text
//! kosoku -m fuzzingserver -o reports 127.0.0.1:9001
//! cargo run --release --example autobahn_client -- ws://127.0.0.1:9001 [AGENT]
//! ```
//!
//! With the `deflate` feature the client offers permessage-deflate (groups 12 and 13 test it)
//! and compresses every message it sends: kosoku's cases fail with an error of their own on an
//! uncompressed message where compression was agreed (RFC 7692 §6 allows one), which the
//! default 64-byte threshold would send for short echoes. Without the feature, leave those
//! groups out with `-x '12.*' -x '13.*'`.
//!
//! The Autobahn convention: `GET /getCaseCount` answers with the number of cases; for each case
//! `GET /runCase?case=N&agent=AGENT` is a connection on which every message is echoed until the
//! server closes it; `GET /updateReports?agent=AGENT` makes the server write its reports.
//! `tests/autobahn_client.rs` runs this same file in-process.

use std::time::{Duration, Instant};

use wsloop::{Client, ClientConfig, ClientError, ClientEvent};

/// The whole run gives up after this long.
const RUN_BUDGET: Duration = Duration::from_secs(20 * 60);

fn main() {
    let mut args = std::env::args().skip(1);
    let base = args.next().unwrap_or_else(|| "ws://127.0.0.1:9001".to_string());
    let agent = args.next().unwrap_or_else(|| "wsloop".to_string());
    match run(&base, &agent, RUN_BUDGET) {
        Ok(summary) => println!("{summary}"),
        Err(e) => {
            eprintln!("autobahn_client: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs every case, then asks the server to write its reports. Returns a one-line summary.
/// Each case may be silent for at most a minute, and the whole run takes at most `budget`.
pub fn run(base: &str, agent: &str, budget: Duration) -> Result<String, String> {
    let deadline = Instant::now() + budget;
    let base = base.trim_end_matches('/');
    if agent.is_empty() || !agent.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(format!("agent name '{agent}' must be letters, digits, - _ ."));
    }
    let count = case_count(base, deadline)?;
    let (mut closed, mut failed, mut stuck) = (0, 0, Vec::new());
    for case in 1..=count {
        if Instant::now() >= deadline {
            return Err(format!("out of time after {} of {count} cases", case - 1));
        }
        match echo(&format!("{base}/runCase?case={case}&agent={agent}"), deadline) {
            Ok(()) => closed += 1,
            // Most failures are the point of a case (the server broke the protocol on purpose).
            Err(CaseEnd::Error(_)) => failed += 1,
            Err(CaseEnd::Silent) => stuck.push(case),
        }
    }
    // Some servers write the reports and drop the connection without a close frame: only a
    // failure to reach them is an error.
    let url = format!("{base}/updateReports?agent={agent}");
    match echo(&url, deadline) {
        Ok(()) | Err(CaseEnd::Error(ClientError::Abnormal(_))) => {}
        Err(CaseEnd::Error(e)) => return Err(format!("{url}: {e}")),
        Err(CaseEnd::Silent) => return Err(format!("{url}: no answer")),
    }
    Ok(format!(
        "autobahn_client: {count} cases run as agent {agent}: {closed} closed cleanly, {failed} ended in an error, {} got stuck {stuck:?}",
        stuck.len()
    ))
}

/// How a case connection ended when it did not close cleanly.
enum CaseEnd {
    Error(ClientError),
    /// Nothing happened for a minute (or the run's time is up).
    Silent,
}

fn config() -> ClientConfig {
    let mut cfg = ClientConfig::default();
    cfg.connect_timeout = Duration::from_secs(10);
    #[cfg(feature = "deflate")]
    {
        cfg.deflate.min_size = 0;
    }
    cfg
}

/// Asks for the number of cases: the server sends it as a text message, then closes.
fn case_count(base: &str, deadline: Instant) -> Result<usize, String> {
    let url = format!("{base}/getCaseCount");
    let mut client = Client::connect(&url, config()).map_err(|e| format!("{url}: {e}"))?;
    let mut count = None;
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(60));
        match client.next_event(Some(wait)) {
            Ok(Some(ClientEvent::Text(t))) => count = t.trim().parse().ok(),
            Ok(Some(ClientEvent::Closed { .. })) => break,
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("{url}: no answer")),
            Err(e) => return Err(format!("{url}: {e}")),
        }
    }
    count.ok_or_else(|| format!("{url}: the answer was not a number"))
}

/// Echoes every message until the server closes.
fn echo(url: &str, deadline: Instant) -> Result<(), CaseEnd> {
    let mut client = Client::connect(url, config()).map_err(CaseEnd::Error)?;
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(60));
        match client.next_event(Some(wait)).map_err(CaseEnd::Error)? {
            // A send can fail once the close has begun; the case then judges the close.
            Some(ClientEvent::Text(t)) => drop(client.send_text(&t)),
            Some(ClientEvent::Binary(b)) => drop(client.send_binary(&b)),
            Some(ClientEvent::Closed { .. }) => return Ok(()),
            Some(_) => {}
            None => return Err(CaseEnd::Silent),
        }
    }
}
