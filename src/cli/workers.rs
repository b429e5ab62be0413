//! `wsloop serve --processes N`: a parent that forks N workers listening on one port with
//! `SO_REUSEPORT`, restarts a worker that dies or stops answering, and stops them all on
//! SIGINT or SIGTERM.
//!
//! A worker whose loop is stuck (stopped, deadlocked, in an endless callback) still gets its
//! share of new connections from the kernel, and they would wait forever. So every loop of a
//! worker beats (bumps a counter in memory shared with the parent) every [`HEARTBEAT`] from
//! a timer of its own, and the parent kills a worker with a loop silent for [`SILENCE`] that
//! has used no CPU meanwhile (stopped, deadlocked), or silent for [`BUSY_SILENCE`] whatever it
//! does (an endless callback), with SIGKILL (a stopped process acts on no other signal), and
//! starts a new one. A worker that is only slow (overloaded, or short of CPU on a busy
//! machine) keeps its connections.
//!
//! SIGHUP to the parent goes on to every worker, each of which reloads its certificate.

use super::Error;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGKILL, SIGTERM};

use super::procs;

/// Most worker processes.
pub const MAX_PROCESSES: usize = 1000;

/// How often each loop of a worker beats.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a loop may go without a beat before its worker counts as hung, when the worker has
/// used no CPU meanwhile (three beats missed: stopped or deadlocked).
const SILENCE: Duration = Duration::from_secs(3);

/// How long a loop may go without a beat while its worker still uses CPU: killing a worker
/// that is only slow would drop every connection it holds, so it gets much longer. (A million
/// connections over 53 workers on 2 cores, flooded with 40 times the broadcasts they can
/// carry, left loops silent for over 10 s while they worked.)
const BUSY_SILENCE: Duration = Duration::from_secs(60);

/// A loop's heartbeat: a counter in memory shared with the parent.
#[derive(Clone, Copy)]
pub struct Heartbeat(&'static AtomicU32);

impl Heartbeat {
    /// Tells the parent this loop still runs.
    pub fn beat(self) {
        // Never 0 again once it has beaten: 0 means "not started yet" to the parent.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.wrapping_add(1).max(1)));
    }
}

/// A forked worker: its number (from 1), the address to listen on, and the line to the parent.
pub struct Worker {
    pub index: usize,
    pub addr: SocketAddr,
    parent: UnixStream,
    /// While set, SIGINT and SIGTERM end the worker (it holds no connections yet).
    default_action: Arc<AtomicBool>,
    /// One counter per loop.
    beats: &'static [AtomicU32],
}

impl Worker {
    /// The heartbeat of loop `lp` (every loop beats: any of them stuck leaves its listener's
    /// connections waiting).
    pub fn heartbeat(&self, lp: usize) -> Option<Heartbeat> {
        self.beats.get(lp).map(Heartbeat)
    }

    /// Once the server runs (its own signal handling in place): tells the parent this worker
    /// listens, and leaves SIGINT and SIGTERM to the server.
    pub fn serving(mut self) {
        self.default_action.store(false, Ordering::SeqCst);
        let _ = self.parent.write_all(b"R");
    }
}

/// Connections each of `n` workers may hold. Without a total, all its descriptors allow
/// (`room`). With one, its share plus five standard deviations of how unevenly the kernel's
/// hash spreads connections over the listeners (and 16 for small counts), so that one worker
/// does not refuse while the others have room; an error, naming the processes needed, when
/// that is more than `room`.
pub fn per_worker(total: Option<usize>, n: usize, room: usize) -> Result<usize, Error> {
    let Some(t) = total else { return Ok(room) };
    let need = |n: usize| {
        let share = t.div_ceil(n);
        share + 5 * share.isqrt() + 16
    };
    if need(n) <= room {
        return Ok(need(n));
    }
    let enough = (n..=MAX_PROCESSES).find(|&m| need(m) <= room).map_or(
        format!("fewer connections (even {MAX_PROCESSES} processes are too few)"),
        |m| format!("--processes {m} or more"),
    );
    Err(Error::usage(format!(
        "--max-connections {t} over {n} processes needs {} per process (a share and room for the uneven \
         spread of SO_REUSEPORT), but a process can hold {room} (its open-file limit less 64): use {enough}",
        need(n)
    )))
}

/// What the parent keeps per worker; times in milliseconds since the parent started.
struct Slot {
    pid: Option<i32>,
    started: u64,
    /// The wait before the next restart: doubled while the worker dies young.
    backoff: u64,
    start_at: Option<u64>,
    /// Per loop: the count last read and when it changed.
    beats: Vec<(u32, u64)>,
    /// The worker's CPU time last read, and when it changed.
    cpu: (Option<Duration>, u64),
    /// Killed as hung, not reaped yet.
    hung: bool,
}

/// Starts `n` workers of `threads` loops each on `addr` and supervises them. Returns
/// `Ok(None)` in the parent once every worker has stopped after a signal, and
/// `Ok(Some(worker))` in a worker, which then binds (with `SO_REUSEPORT`), runs its server,
/// calls [`Worker::serving`] and has each loop beat its [`Worker::heartbeat`] every
/// [`HEARTBEAT`]. A worker that dies has its slot of `board` (the workers' metrics) emptied.
pub fn supervise(
    addr: SocketAddr,
    n: usize,
    threads: usize,
    stop_timeout: Duration,
    per: usize,
    board: wsloop::server::MetricsBoard,
) -> Result<Option<Worker>, Error> {
    // Held bound but not listening (so it gets no connections): finds the port for port 0,
    // reports a busy port before any worker starts, and keeps the port while workers restart.
    let reserve = || -> std::io::Result<_> {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    let reserve = reserve().map_err(|e| Error::runtime(format!("cannot listen on {addr}: {e}")))?;
    let addr = reserve.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(addr);
    let io = |e: std::io::Error| Error::runtime(format!("cannot supervise workers: {e}"));
    let threads = threads.max(1);
    let beats = procs::shared_counters(n * threads).map_err(io)?;
    // Signals and workers write to `tx`: a signal one `X`, a worker that listens one `R`.
    let (mut rx, tx) = UnixStream::pair().map_err(io)?;
    let term = Arc::new(AtomicBool::new(false));
    let hangup = Arc::new(AtomicBool::new(false));
    let mut ids = Vec::new();
    let mut register = || -> std::io::Result<()> {
        for sig in [SIGINT, SIGTERM] {
            ids.push(signal_hook::flag::register(sig, Arc::clone(&term))?);
        }
        ids.push(signal_hook::flag::register(SIGHUP, Arc::clone(&hangup))?);
        for sig in [SIGINT, SIGTERM, SIGCHLD, SIGHUP] {
            ids.push(signal_hook::low_level::pipe::register(sig, tx.try_clone()?)?);
        }
        Ok(())
    };
    register().map_err(io)?;
    let me = std::process::id() as i32;
    let t0 = Instant::now();
    let ms = || t0.elapsed().as_millis() as u64;
    let stop_ms = stop_timeout.as_millis() as u64 + 10_000;
    let mut slots: Vec<Slot> = (0..n)
        .map(|_| Slot {
            pid: None,
            started: 0,
            backoff: 100,
            start_at: Some(0),
            beats: Vec::new(),
            cpu: (None, 0),
            hung: false,
        })
        .collect();
    let (mut ready, mut serving, mut stop_by, mut killed) = (0, false, None, false);
    let mut failure = None;
    loop {
        let now = ms();
        for (i, slot) in slots.iter_mut().enumerate() {
            if stop_by.is_some() || slot.start_at.is_none_or(|t| t > now) {
                continue;
            }
            let own_beats = &beats[i * threads..(i + 1) * threads];
            for b in own_beats {
                b.store(0, Ordering::Relaxed);
            }
            match procs::fork().map_err(io)? {
                None => {
                    return become_worker(me, ids, i + 1, addr, &tx, own_beats)
                        .map(Some)
                        .map_err(io)
                }
                Some(pid) => {
                    say(log::Level::Info, format_args!("worker {} started (pid {pid})", i + 1));
                    *slot = Slot {
                        pid: Some(pid),
                        started: now,
                        backoff: slot.backoff,
                        start_at: None,
                        beats: vec![(0, now); threads],
                        cpu: (None, now),
                        hung: false,
                    };
                }
            }
        }
        // While serving, a look at the heartbeats twice per beat.
        let watch = (serving && stop_by.is_none()).then_some(now + HEARTBEAT.as_millis() as u64 / 2);
        let wake = slots
            .iter()
            .filter_map(|s| s.start_at)
            .chain(stop_by)
            .chain(watch)
            .min();
        let _ = rx.set_read_timeout(wake.map(|t| Duration::from_millis(t.saturating_sub(now).max(1))));
        let mut buf = [0u8; 64];
        if let Ok(k) = rx.read(&mut buf) {
            ready += buf[..k].iter().filter(|&&b| b == b'R').count();
        }
        if !serving && ready >= n {
            serving = true;
            say(
                log::Level::Info,
                format_args!("listening on {addr}: {n} worker processes, up to {per} connections each"),
            );
        }
        if term.swap(false, Ordering::SeqCst) {
            if stop_by.is_none() {
                say(log::Level::Info, format_args!("signal received: stopping the workers"));
                stop_by = Some(ms() + stop_ms);
            } else {
                say(log::Level::Warn, format_args!("second signal: the workers stop now"));
            }
            signal_all(&slots, SIGTERM);
        }
        if hangup.swap(false, Ordering::SeqCst) && stop_by.is_none() {
            say(
                log::Level::Info,
                format_args!("SIGHUP: passed on to every worker (each reloads its certificate)"),
            );
            signal_all(&slots, SIGHUP);
        }
        if serving && stop_by.is_none() {
            let now = ms();
            for (i, slot) in slots.iter_mut().enumerate() {
                let Some(pid) = slot.pid.filter(|_| !slot.hung) else {
                    continue;
                };
                let own_beats = &beats[i * threads..(i + 1) * threads];
                let cpu = wsloop::sys::read_cpu(pid as u32);
                if cpu != slot.cpu.0 {
                    slot.cpu = (cpu, now);
                }
                let idle_for = now.saturating_sub(slot.cpu.1);
                if let Some((silent, quiet)) = silent_loop(&mut slot.beats, own_beats, now) {
                    if !hung(quiet, idle_for) {
                        continue;
                    }
                    let busy = idle_for < SILENCE.as_millis() as u64;
                    slot.hung = true;
                    let what = if busy { "while using CPU" } else { "and no CPU used" };
                    say(
                        log::Level::Warn,
                        format_args!(
                            "worker {} (pid {pid}) stopped answering: no heartbeat from loop {silent} \
                             for {} s {what}; killing it",
                            i + 1,
                            quiet / 1000
                        ),
                    );
                    procs::kill(pid, SIGKILL);
                }
            }
        }
        while let Some((pid, status)) = procs::reap(false) {
            let Some((i, slot)) = slots.iter_mut().enumerate().find(|(_, s)| s.pid == Some(pid)) else {
                continue;
            };
            slot.pid = None;
            board.clear(i + 1);
            let what = procs::describe(status);
            if stop_by.is_some() {
                if !procs::stopped_cleanly(status) {
                    say(log::Level::Warn, format_args!("worker {} (pid {pid}) {what}", i + 1));
                    failure.get_or_insert_with(|| "not every worker stopped cleanly".to_string());
                }
            } else if !serving {
                // A worker that cannot start would not start on a retry either (its error is
                // on stderr): stop the others and give up.
                stop_by = Some(ms() + stop_ms);
                failure = Some(format!("worker {} {what} before it listened", i + 1));
                signal_all(&slots, SIGTERM);
            } else {
                let now = ms();
                if now - slot.started >= 10_000 {
                    slot.backoff = 100;
                }
                let delay = slot.backoff;
                slot.backoff = (delay * 2).min(10_000);
                slot.start_at = Some(now + delay);
                say(
                    log::Level::Warn,
                    format_args!("worker {} (pid {pid}) {what}; restarting it in {delay} ms", i + 1),
                );
            }
        }
        if let Some(by) = stop_by {
            if slots.iter().all(|s| s.pid.is_none()) {
                break;
            }
            if ms() >= by && !killed {
                killed = true;
                failure.get_or_insert_with(|| "not every worker stopped cleanly".to_string());
                say(
                    log::Level::Warn,
                    format_args!("workers still running after the shutdown timeout: killing them"),
                );
                signal_all(&slots, SIGKILL);
            }
        }
    }
    match failure {
        Some(why) => Err(Error::runtime(why)),
        None => {
            say(log::Level::Info, format_args!("all {n} workers stopped"));
            Ok(None)
        }
    }
}

/// Whether a worker with a loop silent for `quiet` ms, whose CPU time last moved `idle_for` ms
/// ago, is hung: silent for [`SILENCE`] with no CPU used meanwhile (stopped, deadlocked), or
/// silent for [`BUSY_SILENCE`] whatever it does (an endless callback). A worker silent but
/// working is slow, not hung: killing it would drop every connection it holds.
fn hung(quiet: u64, idle_for: u64) -> bool {
    let silence = SILENCE.as_millis() as u64;
    (quiet >= silence && idle_for >= silence) || quiet >= BUSY_SILENCE.as_millis() as u64
}

/// Reads a worker's heartbeats into `seen` (per loop: the count and when it changed); the
/// loop silent longest, if one has been silent for [`SILENCE`] since it started beating, and
/// for how long (ms). A loop that has not beaten yet is still starting (its server binds,
/// loads certificates) and is not judged.
fn silent_loop(seen: &mut [(u32, u64)], beats: &[AtomicU32], now: u64) -> Option<(usize, u64)> {
    let mut silent: Option<(usize, u64)> = None;
    for (lp, ((count, changed), beat)) in seen.iter_mut().zip(beats).enumerate() {
        let n = beat.load(Ordering::Relaxed);
        if n != *count {
            (*count, *changed) = (n, now);
        } else if n != 0 {
            let quiet = now.saturating_sub(*changed);
            if quiet >= SILENCE.as_millis() as u64 && silent.is_none_or(|(_, q)| quiet > q) {
                silent = Some((lp, quiet));
            }
        }
    }
    silent
}

/// In a forked worker: out of the terminal's process group, ended with the parent, and rid of
/// the parent's signal actions (copied into the child); SIGINT and SIGTERM end it until its
/// server handles them.
fn become_worker(
    parent: i32,
    ids: Vec<signal_hook::SigId>,
    index: usize,
    addr: SocketAddr,
    tx: &UnixStream,
    beats: &'static [AtomicU32],
) -> std::io::Result<Worker> {
    procs::leave_process_group();
    procs::die_with_parent(parent, SIGTERM);
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
    let default_action = Arc::new(AtomicBool::new(true));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_default(sig, Arc::clone(&default_action))?;
    }
    Ok(Worker {
        index,
        addr,
        parent: tx.try_clone()?,
        default_action,
        beats,
    })
}

/// Logs a line of the supervisor's (one call for every line keeps the binary small).
#[inline(never)]
fn say(level: log::Level, what: std::fmt::Arguments<'_>) {
    log::log!(level, "{what}");
}

fn signal_all(slots: &[Slot], signal: i32) {
    for pid in slots.iter().filter_map(|s| s.pid) {
        procs::kill(pid, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_hung_when_one_of_its_loops_stops_beating() {
        static BEATS: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
        let beats = &BEATS;
        let mut seen = vec![(0, 0); 2];
        let silence = SILENCE.as_millis() as u64;
        // Not started yet: never judged.
        assert_eq!(silent_loop(&mut seen, beats, 10 * silence), None);
        // Both beat; then only loop 0 goes on beating.
        for b in beats {
            Heartbeat(b).beat();
        }
        assert_eq!(silent_loop(&mut seen, beats, 10 * silence), None);
        for t in 1..=3 {
            Heartbeat(&beats[0]).beat();
            let now = 10 * silence + t * silence / 3;
            let want = (t == 3).then_some((1, silence));
            assert_eq!(silent_loop(&mut seen, beats, now), want, "after {t}/3 of the silence");
        }
        // A beat after a wrap of the count is still a beat, and never reads as "not started".
        beats[1].store(u32::MAX, Ordering::Relaxed);
        Heartbeat(&beats[1]).beat();
        assert_eq!(beats[1].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_silent_worker_that_still_works_is_slow_not_hung_until_the_busy_bound() {
        let (silence, busy) = (SILENCE.as_millis() as u64, BUSY_SILENCE.as_millis() as u64);
        // Stopped or deadlocked: silent and no CPU used for the silence.
        assert!(hung(silence, silence));
        assert!(!hung(silence - 1, silence));
        // Overloaded or short of CPU: silent, but its CPU time moved within the silence.
        assert!(!hung(silence, 0));
        assert!(!hung(busy - 1, silence - 1));
        // An endless callback uses CPU too, so past the longer bound it is hung all the same.
        assert!(hung(busy, 0));
    }

    #[test]
    fn workers_are_sized_for_the_total_with_headroom_for_the_spread() {
        assert_eq!(per_worker(None, 4, 19_936), Ok(19_936));
        // 1,000,000 over 53: a share of 18,868, 5 x 137 and 16 more.
        assert_eq!(per_worker(Some(1_000_000), 53, 19_936), Ok(18_868 + 5 * 137 + 16));
        let e = per_worker(Some(1_000_000), 50, 19_936).unwrap_err();
        assert!(e.to_string().contains("--processes 53 or more"), "{e}");
        assert_eq!(per_worker(Some(10), 2, 100), Ok(5 + 10 + 16));
        assert!(per_worker(Some(100_000_000), 10, 19_936)
            .unwrap_err()
            .to_string()
            .contains("are too few"));
    }
}
