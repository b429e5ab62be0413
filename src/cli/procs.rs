//! Child processes of the command: fork, signal, reap.
//!
//! `fork` rather than `std::process::Command`: the child starts as a copy of the parent, with
//! the options already parsed, so nothing is passed on or parsed again, and it keeps the
//! server-only binary small (spawning through `Command` added 41,632 bytes to it, these calls
//! under 1 KB). Only a single-threaded process may fork (the command never starts a thread
//! before it does), so that the child's copy holds no lock another thread had taken.

#![cfg_attr(not(all(feature = "server", feature = "bench")), allow(dead_code))]

use std::io;
use std::sync::atomic::AtomicU32;

/// Forks this process: `Ok(None)` in the child, `Ok(Some(pid))` in the parent.
///
/// The caller must be single-threaded (see the module's text).
pub fn fork() -> io::Result<Option<i32>> {
    // SAFETY: fork has no memory-safety preconditions of its own; what makes using the child
    // sound is that the process has one thread (every caller forks before any thread is
    // started), so the child's copy of the address space holds no lock taken by a thread that
    // does not exist in it.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid)),
    }
}

/// `n` counters in memory shared with every child forked after this call (an anonymous
/// `MAP_SHARED` mapping), all 0. Never unmapped: they last as long as the process.
pub fn shared_counters(n: usize) -> io::Result<&'static [AtomicU32]> {
    let len = n.max(1) * std::mem::size_of::<AtomicU32>();
    // SAFETY: a fresh anonymous mapping, asking for no address: it aliases nothing.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping is page-aligned, `len` bytes long, zero-filled (a valid AtomicU32 is
    // any 4 bytes), and never unmapped, so the slice may live for 'static; atomics make the
    // writes of other processes sharing it sound.
    Ok(unsafe { std::slice::from_raw_parts(at.cast::<AtomicU32>(), n) })
}

/// Sends `signal` to process `pid`; false if it is gone.
pub fn kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill only takes integers; a stale pid is answered with ESRCH. Callers pass pids of
    // their own children that they have not reaped yet, so the pid cannot have been reused.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// A child that has ended, and its wait status; `None` if no child has (or there are none).
/// With `block` it waits for one.
pub fn reap(block: bool) -> Option<(i32, i32)> {
    let mut status = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: waitpid writes the status through a pointer to a live local.
    let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
    (pid > 0).then_some((pid, status))
}

/// Reaps child `pid`, waiting for it.
pub fn wait_for(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: as in `reap`.
    (unsafe { libc::waitpid(pid, &mut status, 0) } == pid).then_some(status)
}

/// A wait status in words: `exited with status 2`, `killed by signal 9`.
pub fn describe(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    }
}

/// Whether a wait status is an exit with status 0.
pub fn exited_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// Whether a worker told to stop did: it exited with status 0, or SIGINT or SIGTERM ended it
/// before its server ran (with no connections to close).
pub fn stopped_cleanly(status: i32) -> bool {
    if libc::WIFSIGNALED(status) {
        matches!(libc::WTERMSIG(status), libc::SIGINT | libc::SIGTERM)
    } else {
        libc::WEXITSTATUS(status) == 0
    }
}

/// In a forked child: asks for `signal` when the parent dies, so that no child outlives it;
/// exits if the parent is already gone.
pub fn die_with_parent(parent: i32, signal: i32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG), getppid and _exit take and return integers only.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, signal);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

/// Moves this process into a process group of its own, out of the terminal's reach: Ctrl-C
/// then goes to the parent alone, which passes it on once.
pub fn leave_process_group() {
    // SAFETY: setpgid takes integers only.
    unsafe {
        libc::setpgid(0, 0);
    }
}
