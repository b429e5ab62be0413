//! Open connections per peer IP address, for the per-IP limit.
//!
//! An open-addressing table (linear probing, deletion by backward shift, no tombstones) keyed by
//! the address as 128 bits. std's `HashMap` would do the same job for 9 KB of binary; this is a
//! few hundred bytes, and the server-only binary has a size budget. The hash is seeded per
//! process so that peers cannot choose addresses that collide.

use std::net::IpAddr;

/// Counts per address; an entry exists only while its count is above zero.
#[derive(Debug)]
pub(crate) struct IpCounts {
    /// `(address, count)`; count 0 marks an empty place. The length is a power of two.
    table: Vec<(u128, u32)>,
    len: usize,
    seed: u64,
}

fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl IpCounts {
    pub(crate) fn new() -> IpCounts {
        // Unknown to peers: the start time in nanoseconds and where this process's stack is
        // (address-space layout is randomised). Not a cryptographic key: it only has to keep
        // peers from picking addresses that collide.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let here = &t as *const u64 as u64;
        IpCounts {
            table: Vec::new(),
            len: 0,
            seed: (t ^ here.rotate_left(32)) | 1,
        }
    }

    fn home(&self, k: u128) -> usize {
        let x = (k as u64 ^ (k >> 64) as u64 ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (x >> 32) as usize & (self.table.len() - 1)
    }

    /// Where `k` is, or the empty place where it would go.
    fn find(&self, k: u128) -> usize {
        let mask = self.table.len() - 1;
        let mut i = self.home(k);
        while self.table[i].1 != 0 && self.table[i].0 != k {
            i = (i + 1) & mask;
        }
        i
    }

    /// Counts one more connection from `ip` unless it has `limit` already; returns whether it
    /// was counted.
    pub(crate) fn add_below(&mut self, ip: IpAddr, limit: u32) -> bool {
        if (self.len + 1) * 2 > self.table.len() {
            self.grow();
        }
        let k = key(ip);
        let i = self.find(k);
        let e = &mut self.table[i];
        if e.1 >= limit {
            return false;
        }
        if e.1 == 0 {
            *e = (k, 0);
            self.len += 1;
        }
        e.1 += 1;
        true
    }

    /// Counts one connection fewer from `ip`.
    pub(crate) fn remove(&mut self, ip: IpAddr) {
        if self.len == 0 {
            return;
        }
        let k = key(ip);
        let mut i = self.find(k);
        if self.table[i].1 == 0 {
            return;
        }
        self.table[i].1 -= 1;
        if self.table[i].1 > 0 {
            return;
        }
        self.len -= 1;
        // Backward shift: move later entries of the probe run into the hole.
        let mask = self.table.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if self.table[j].1 == 0 {
                break;
            }
            let home = self.home(self.table[j].0);
            // The entry at j may move to i if its home is not in (i, j] (cyclically).
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.table[i] = self.table[j];
                self.table[j].1 = 0;
                i = j;
            }
        }
        if self.len == 0 {
            self.table = Vec::new();
        }
    }

    fn grow(&mut self) {
        let size = (self.table.len() * 2).max(16);
        let old = std::mem::replace(&mut self.table, vec![(0, 0); size]);
        for (k, n) in old.into_iter().filter(|e| e.1 != 0) {
            let i = self.find(k);
            self.table[i] = (k, n);
        }
    }

    /// Addresses counted.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        if self.table.is_empty() {
            return 0;
        }
        self.table[self.find(key(ip))].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn counts_up_to_the_limit_and_back_to_empty() {
        let mut t = IpCounts::new();
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let b = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(t.add_below(a, 2));
        assert!(t.add_below(a, 2));
        assert!(!t.add_below(a, 2), "the third from one address is refused");
        assert!(t.add_below(b, 2));
        assert_eq!((t.count(a), t.count(b), t.len()), (2, 1, 2));
        t.remove(a);
        assert!(t.add_below(a, 2), "room again after one leaves");
        for _ in 0..2 {
            t.remove(a);
        }
        t.remove(b);
        t.remove(b); // more removals than additions change nothing
        assert_eq!(t.len(), 0);
        assert!(t.table.is_empty(), "an empty table gives its memory back");
    }

    #[test]
    fn agrees_with_a_hash_map_through_random_traffic() {
        let mut t = IpCounts::new();
        let mut model: HashMap<IpAddr, u32> = HashMap::new();
        let mut x: u64 = 0x1234_5678;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct addresses, so that runs collide, grow and shrink.
            let ip = IpAddr::V4(Ipv4Addr::from((x % 3000) as u32));
            if x & (1 << 40) != 0 {
                let counted = t.add_below(ip, 3);
                let n = model.entry(ip).or_insert(0);
                assert_eq!(counted, *n < 3, "step {step}");
                if counted {
                    *n += 1;
                }
            } else {
                t.remove(ip);
                if let Some(n) = model.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        model.remove(&ip);
                    }
                }
            }
            if step % 10_007 == 0 {
                assert_eq!(t.len(), model.len());
                for (ip, n) in &model {
                    assert_eq!(t.count(*ip), *n);
                }
            }
        }
    }
}
