//! `wsloop serve --processes N`: a parent that forks N workers listening on one port with
//! `SO_REUSEPORT`, restarts a worker that dies, and stops them all on SIGINT or SIGTERM.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGCHLD, SIGINT, SIGKILL, SIGTERM};

use super::procs;

/// Most worker processes.
pub const MAX_PROCESSES: usize = 1000;

/// A forked worker: its number (from 1), the address to listen on, and the line to the parent.
pub struct Worker {
    pub index: usize,
    pub addr: SocketAddr,
    parent: UnixStream,
    /// While set, SIGINT and SIGTERM end the worker (it holds no connections yet).
    default_action: Arc<AtomicBool>,
}

impl Worker {
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
pub fn per_worker(total: Option<usize>, n: usize, room: usize) -> Result<usize, String> {
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
    Err(format!(
        "--max-connections {t} over {n} processes needs {} per process (a share and room for the uneven \
         spread of SO_REUSEPORT), but a process can hold {room} (its open-file limit less 64): use {enough}",
        need(n)
    ))
}

/// What the parent keeps per worker; times in milliseconds since the parent started.
struct Slot {
    pid: Option<i32>,
    started: u64,
    /// The wait before the next restart: doubled while the worker dies young.
    backoff: u64,
    start_at: Option<u64>,
}

/// Starts `n` workers on `addr` and supervises them. Returns `Ok(None)` in the parent once
/// every worker has stopped after a signal, and `Ok(Some(worker))` in a worker, which then
/// binds (with `SO_REUSEPORT`), runs its server and calls [`Worker::serving`].
pub fn supervise(addr: SocketAddr, n: usize, stop_timeout: Duration, per: usize) -> Result<Option<Worker>, String> {
    // Held bound but not listening (so it gets no connections): finds the port for port 0,
    // reports a busy port before any worker starts, and keeps the port while workers restart.
    let reserve = || -> std::io::Result<_> {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    let reserve = reserve().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = reserve.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(addr);
    let io = |e: std::io::Error| format!("cannot supervise workers: {e}");
    // Signals and workers write to `tx`: a signal one `X`, a worker that listens one `R`.
    let (mut rx, tx) = UnixStream::pair().map_err(io)?;
    let term = Arc::new(AtomicBool::new(false));
    let mut ids = Vec::new();
    let mut register = || -> std::io::Result<()> {
        for sig in [SIGINT, SIGTERM] {
            ids.push(signal_hook::flag::register(sig, Arc::clone(&term))?);
        }
        for sig in [SIGINT, SIGTERM, SIGCHLD] {
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
            match procs::fork().map_err(io)? {
                None => return become_worker(me, ids, i + 1, addr, &tx).map(Some).map_err(io),
                Some(pid) => {
                    say(log::Level::Info, format_args!("worker {} started (pid {pid})", i + 1));
                    *slot = Slot {
                        pid: Some(pid),
                        started: now,
                        backoff: slot.backoff,
                        start_at: None,
                    };
                }
            }
        }
        let wake = slots.iter().filter_map(|s| s.start_at).chain(stop_by).min();
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
        while let Some((pid, status)) = procs::reap(false) {
            let Some((i, slot)) = slots.iter_mut().enumerate().find(|(_, s)| s.pid == Some(pid)) else {
                continue;
            };
            slot.pid = None;
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
        Some(why) => Err(why),
        None => {
            say(log::Level::Info, format_args!("all {n} workers stopped"));
            Ok(None)
        }
    }
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
    fn workers_are_sized_for_the_total_with_headroom_for_the_spread() {
        assert_eq!(per_worker(None, 4, 19_936), Ok(19_936));
        // 1,000,000 over 53: a share of 18,868, 5 x 137 and 16 more.
        assert_eq!(per_worker(Some(1_000_000), 53, 19_936), Ok(18_868 + 5 * 137 + 16));
        let e = per_worker(Some(1_000_000), 50, 19_936).unwrap_err();
        assert!(e.contains("--processes 53 or more"), "{e}");
        assert_eq!(per_worker(Some(10), 2, 100), Ok(5 + 10 + 16));
        assert!(per_worker(Some(100_000_000), 10, 19_936)
            .unwrap_err()
            .contains("are too few"));
    }
}
