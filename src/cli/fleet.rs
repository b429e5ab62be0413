//! `wsloop bench` past what one process may open: forked parts, one live line, one report.
//!
//! Every part writes short lines (`INDEX KIND ...`) to one channel shared by all: its progress
//! once a second, `b` when it waits before a phase, `d` when done, `e` if it cannot start. The
//! parent answers a full round of `b` with one byte on each part's own line, and reads each
//! report from that line at the end (its JSON, histograms and timeline included, so that the
//! merged run's percentiles, per second too, are those of every round trip). A signal to the parent is passed on to every part once
//! (each then cuts its run short, as one process would).

use super::Error;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGKILL, SIGTERM};
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
        self.send(format_args!("p {}", p.encode()));
    }

    fn before(&mut self, _phase: Phase) {
        self.send(format_args!("b"));
        if self.own.read_exact(&mut [0u8]).is_err() {
            std::process::exit(1);
        }
    }
}

pub type Line<'a> = &'a mut dyn FnMut(&Progress);

/// Runs the parts at once, one forked process each, keeps their phases in step and merges
/// their reports. `line` is called once a second with the sums (and the highest p99).
pub fn run(parts: &[BenchConfig], line: Line<'_>) -> Result<Report, Error> {
    let me = std::process::id() as i32;
    let io = |e: io::Error| Error::runtime(format!("load generator processes: {e}"));
    let (mut shared, shared_tx) = UnixStream::pair().map_err(io)?;
    let mut links: Vec<UnixStream> = Vec::new();
    let mut pids = Vec::new();
    for (index, cfg) in parts.iter().enumerate() {
        let (link, own) = UnixStream::pair().map_err(io)?;
        match procs::fork().map_err(io)? {
            None => {
                // Only the parent keeps the other parts' lines and the channel's read end.
                drop((links, link, shared));
                // Out of the terminal's process group: Ctrl-C reaches the parent alone, which
                // passes it on once (a second signal would end a part at once).
                procs::leave_process_group();
                procs::die_with_parent(me, SIGKILL);
                let mut p = Part {
                    index,
                    shared: shared_tx,
                    own,
                };
                match bench::run_observed(cfg, &mut p) {
                    Ok(r) => {
                        p.send(format_args!("d"));
                        let _ = p.own.write_all(r.to_json().as_bytes());
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
            if text.is_empty() {
                return Err(Error::runtime("a load generator process sent no report"));
            }
            reports
                .push(Report::from_json(&text).map_err(|e| Error::runtime(format!("a load generator process: {e}")))?);
        }
        Report::merge(&reports).ok_or_else(|| Error::runtime("no report"))
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
) -> Result<(), Error> {
    let n = parts.len();
    // Each part's latest snapshot.
    let mut seen: Vec<Option<Progress>> = vec![None; n];
    // Parts waiting before a phase.
    let mut waits = vec![false; n];
    let (mut done, mut stopping) = (0, false);
    let stop = parts.first().and_then(|p| p.stop.as_ref());
    let mut pending = Vec::new();
    let start = Instant::now();
    let mut next_line = start + Duration::from_secs(1);
    let mut chunk = [0u8; 4096];
    while done < n {
        if !stopping && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            stopping = true;
            for &pid in pids {
                procs::kill(pid, SIGTERM);
            }
        }
        let now = Instant::now();
        if now >= next_line {
            next_line += Duration::from_secs(1);
            // A part exits 0 only once it said it was done (its line may still be on its way);
            // any other end is a death.
            while let Some((pid, status)) = procs::reap(false) {
                if pids.contains(&pid) && !procs::exited_ok(status) {
                    return Err(Error::runtime(format!(
                        "a load generator process (pid {pid}) {}",
                        procs::describe(status)
                    )));
                }
            }
            let reported: Vec<Progress> = seen.iter().flatten().copied().collect();
            if let Some(mut sum) = Progress::merge(&reported) {
                // Parts that have not reported yet count in the target and the processes.
                sum.elapsed = start.elapsed();
                sum.target = parts.iter().map(|p| p.connections).sum();
                sum.processes = n;
                line(&sum);
            }
        }
        let _ = shared.set_read_timeout(Some(
            next_line.saturating_duration_since(now).max(Duration::from_millis(1)),
        ));
        match shared.read(&mut chunk) {
            Ok(0) => return Err(Error::runtime("the load generator processes ended early")),
            Ok(k) => pending.extend_from_slice(&chunk[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(Error::runtime(e.to_string())),
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&text[..end]).into_owned();
            let mut words = text.splitn(3, ' ');
            let i: usize = words
                .next()
                .and_then(|w| w.parse().ok())
                .filter(|&i| i < n)
                .ok_or_else(|| Error::runtime("bad line"))?;
            match (words.next(), words.next().unwrap_or("")) {
                (Some("p"), rest) => {
                    seen[i] = Some(Progress::decode(rest).ok_or_else(|| Error::runtime("bad progress line"))?)
                }
                (Some("b"), _) => waits[i] = true,
                (Some("d"), _) => done += 1,
                (Some("e"), why) => return Err(Error::runtime(why.to_string())),
                _ => return Err(Error::runtime(format!("a load generator process sent '{text}'"))),
            }
            // Every part is ready for its next phase or done (a part cut short skips the wait
            // before measuring): let the waiting ones go.
            let waiting = waits.iter().filter(|&&w| w).count();
            if waiting > 0 && waiting + done == n {
                for (l, w) in links.iter_mut().zip(waits.iter_mut()) {
                    if std::mem::take(w) {
                        l.write_all(b"g").map_err(|e| Error::runtime(e.to_string()))?;
                    }
                }
            }
        }
    }
    Ok(())
}
