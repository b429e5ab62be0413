//! `wsloop bench` past what one process may open: forked parts, one live line, one report.
//!
//! Every part writes short lines (`INDEX KIND ...`) to one channel shared by all: its progress
//! once a second, `b` when it waits before a phase, `d` when done, `e` if it cannot start. The
//! parent answers a full round of `b` with one byte on each part's own line, and reads each
//! report from that line at the end.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use signal_hook::consts::SIGKILL;
use wsloop::bench::{self, BenchConfig, Observer, Phase, Progress, Report};

use super::procs;

/// One part of the run, in a forked child.
struct Part {
    index: usize,
    shared: UnixStream,
    own: UnixStream,
}

impl Part {
    /// Sends a line to the parent (one write: lines of different parts do not mix); a parent
    /// that is gone ends the part.
    fn send(&mut self, what: std::fmt::Arguments<'_>) {
        if self
            .shared
            .write_all(format!("{} {what}\n", self.index).as_bytes())
            .is_err()
        {
            std::process::exit(1);
        }
    }
}

impl Observer for Part {
    fn progress(&mut self, p: &Progress) {
        let phase = match p.phase {
            Phase::Connect => 0,
            Phase::Measure => 1,
            Phase::Drain => 2,
            Phase::Close => 3,
        };
        let p99 = p.p99.map_or(0, |d| d.as_nanos() as u64);
        let rate = p.msgs_per_sec as u64;
        self.send(format_args!("p {} {} {phase} {rate} {p99}", p.open, p.failed));
    }

    fn before(&mut self, _phase: Phase) {
        self.send(format_args!("b"));
        if self.own.read_exact(&mut [0u8]).is_err() {
            std::process::exit(1);
        }
    }
}

/// The figures of the live line, summed over the parts (the p99 is the highest of theirs).
pub struct Totals {
    pub elapsed: Duration,
    pub phase: Phase,
    pub open: usize,
    pub target: usize,
    pub failed: u64,
    pub msgs_per_sec: f64,
    pub p99: Option<Duration>,
    pub processes: usize,
}

impl From<&Progress> for Totals {
    fn from(p: &Progress) -> Totals {
        Totals {
            elapsed: p.elapsed,
            phase: p.phase,
            open: p.open,
            target: p.target,
            failed: p.failed,
            msgs_per_sec: p.msgs_per_sec,
            p99: p.p99,
            processes: 1,
        }
    }
}

pub type Line<'a> = &'a mut dyn FnMut(&Totals);

/// Runs the parts at once, one forked process each, keeps their phases in step and merges
/// their reports. `line` is called once a second with the sums (and the highest p99).
pub fn run(parts: &[BenchConfig], line: Line<'_>) -> Result<Report, String> {
    let me = std::process::id() as i32;
    let io = |e: io::Error| format!("load generator processes: {e}");
    let (mut shared, shared_tx) = UnixStream::pair().map_err(io)?;
    let mut links: Vec<UnixStream> = Vec::new();
    let mut pids = Vec::new();
    for (index, cfg) in parts.iter().enumerate() {
        let (link, own) = UnixStream::pair().map_err(io)?;
        match procs::fork().map_err(io)? {
            None => {
                // Only the parent keeps the other parts' lines and the channel's read end.
                drop((links, link, shared));
                procs::die_with_parent(me, SIGKILL);
                let mut p = Part {
                    index,
                    shared: shared_tx,
                    own,
                };
                match bench::run_observed(cfg, &mut p) {
                    Ok(r) => {
                        p.send(format_args!("d"));
                        let _ = p.own.write_all(r.encode().as_bytes());
                        std::process::exit(0);
                    }
                    Err(e) => {
                        p.send(format_args!("e {e}"));
                        std::process::exit(2);
                    }
                }
            }
            Some(pid) => {
                links.push(link);
                pids.push(pid);
            }
        }
    }
    let result = follow(&mut shared, &mut links, &pids, parts, line).and_then(|()| {
        let mut reports = Vec::new();
        for link in &mut links {
            let mut text = String::new();
            let _ = link.read_to_string(&mut text);
            reports.push(Report::decode(&text).ok_or("a load generator process sent no report")?);
        }
        Report::merge(&reports).ok_or_else(|| "no report".to_string())
    });
    for &pid in &pids {
        if result.is_err() {
            procs::kill(pid, SIGKILL);
        }
        procs::wait_for(pid);
    }
    result
}

/// Reads the parts' lines until every part is done: prints the live line, lets the parts go
/// past each wait together.
fn follow(
    shared: &mut UnixStream,
    links: &mut [UnixStream],
    pids: &[i32],
    parts: &[BenchConfig],
    line: Line<'_>,
) -> Result<(), String> {
    let n = parts.len();
    // Per part: open, failed, phase, echoes per second, p99 in ns.
    let mut seen = vec![[0u64; 5]; n];
    let (mut waiting, mut done) = (0, 0);
    let mut pending = Vec::new();
    let start = Instant::now();
    let mut next_line = start + Duration::from_secs(1);
    let mut chunk = [0u8; 4096];
    while done < n {
        let now = Instant::now();
        if now >= next_line {
            next_line += Duration::from_secs(1);
            // A part exits 0 only once it said it was done (its line may still be on its way);
            // any other end is a death.
            while let Some((pid, status)) = procs::reap(false) {
                if pids.contains(&pid) && !procs::exited_ok(status) {
                    return Err(format!(
                        "a load generator process (pid {pid}) {}",
                        procs::describe(status)
                    ));
                }
            }
            let sum = |k: usize| seen.iter().map(|s| s[k]).sum::<u64>();
            line(&Totals {
                elapsed: start.elapsed(),
                phase: match seen.iter().map(|s| s[2]).min() {
                    Some(0) => Phase::Connect,
                    Some(1) => Phase::Measure,
                    Some(2) => Phase::Drain,
                    _ => Phase::Close,
                },
                open: sum(0) as usize,
                target: parts.iter().map(|p| p.connections).sum(),
                failed: sum(1),
                msgs_per_sec: sum(3) as f64,
                p99: seen
                    .iter()
                    .map(|s| s[4])
                    .max()
                    .filter(|&v| v > 0)
                    .map(Duration::from_nanos),
                processes: n,
            });
        }
        let _ = shared.set_read_timeout(Some(
            next_line.saturating_duration_since(now).max(Duration::from_millis(1)),
        ));
        match shared.read(&mut chunk) {
            Ok(0) => return Err("the load generator processes ended early".into()),
            Ok(k) => pending.extend_from_slice(&chunk[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&text[..end]).into_owned();
            let mut words = text.splitn(3, ' ');
            let i: usize = words
                .next()
                .and_then(|w| w.parse().ok())
                .filter(|&i| i < n)
                .ok_or("bad line")?;
            match (words.next(), words.next().unwrap_or("")) {
                (Some("p"), rest) => {
                    for (slot, w) in seen[i].iter_mut().zip(rest.split(' ')) {
                        *slot = w.parse().unwrap_or(0);
                    }
                }
                (Some("b"), _) => {
                    waiting += 1;
                    if waiting == n {
                        // Every part is ready for its next phase: let them all go.
                        waiting = 0;
                        for l in links.iter_mut() {
                            l.write_all(b"g").map_err(|e| e.to_string())?;
                        }
                    }
                }
                (Some("d"), _) => done += 1,
                (Some("e"), why) => return Err(why.to_string()),
                _ => return Err(format!("a load generator process sent '{text}'")),
            }
        }
    }
    Ok(())
}
