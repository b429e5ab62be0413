//! What the drivers read from the operating system: descriptor limits, memory and CPU use.

use std::io;
use std::time::Duration;

/// The process's soft open-file limit.
pub(crate) fn fd_limit() -> u64 {
    rlimit::Resource::NOFILE.get().map_or(1024, |(soft, _)| soft)
}

/// Raises the soft open-file limit to the hard one; returns the soft limit now in force.
pub(crate) fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or_else(|_| fd_limit())
}

/// Whether an accept or socket error means the process ran out of descriptors or memory.
pub(crate) fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Physical memory of this machine, in bytes (`MemTotal` in `/proc/meminfo`).
pub(crate) fn physical_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Gives the heap's free memory back to the operating system. glibc keeps freed memory for
/// reuse, so after a burst the process would stay at its peak; musl returns large blocks by
/// itself.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions: it only releases pages the allocator holds
    // free, and may be called at any time from the thread that owns no allocator lock (any
    // thread outside malloc).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The cores this process may run on (`Cpus_allowed_list` in `/proc/self/status`, e.g.
/// `0-3,8`), or 1 when that cannot be read. Smaller in the binary than
/// `std::thread::available_parallelism`, which also reads cgroup quotas (about 10 KB).
pub fn cores() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = s
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("");
    count_cpu_list(list).max(1)
}

/// How many CPUs a list like `0-3,8,10-11` names (0 when it is malformed).
fn count_cpu_list(list: &str) -> usize {
    let mut n = 0;
    for part in list.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        match (a.parse::<usize>(), b.parse::<usize>()) {
            (Ok(a), Ok(b)) if a <= b => n += b - a + 1,
            _ => return 0,
        }
    }
    n
}

/// `VmRSS` of a process, in bytes.
pub fn read_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub fn read_cpu(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')' come field 3 (state) onward; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture (it is part of the ABI, unlike HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), 2);
        assert_eq!(count_cpu_list("0-3,8,10-11"), 7);
        assert_eq!(count_cpu_list("5"), 1);
        assert_eq!(count_cpu_list(""), 0);
        assert_eq!(count_cpu_list("3-1"), 0);
        assert!(cores() >= 1);
    }
}
