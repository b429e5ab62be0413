//! Round-trip latencies: a log-linear histogram with fixed memory.

use std::time::Duration;

/// Round-trip latency percentiles (upper bounds of histogram buckets, under 1 % wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// Round trips measured.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// The slowest.
    pub max: Duration,
}

/// A log-linear histogram of nanosecond values: exact below 256, then 128 buckets per power of
/// two, so every bucket is under 0.8 % wide. 7,424 counters, 58 KiB. Histograms of several
/// processes merge exactly: the buckets are the same everywhere.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            counts: vec![0; ((64 - SUB_BITS as usize) + 1) << SUB_BITS],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        let msb = 63 - (v | 1).leading_zeros();
        let shift = msb.saturating_sub(SUB_BITS);
        ((shift as usize) << SUB_BITS) + (v >> shift) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn bucket_high(i: usize) -> u64 {
        let shift = ((i >> SUB_BITS) as u32).saturating_sub(1);
        let low = ((i - ((shift as usize) << SUB_BITS)) as u64) << shift;
        low + ((1u64 << shift) - 1)
    }

    pub(crate) fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// The value at or below which a fraction `q` of the recorded values lie.
    pub(crate) fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::bucket_high(i).min(self.max));
            }
        }
        Some(self.max)
    }

    /// Adds another histogram's counts to this one.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Empties the histogram (the per-second one, at each second).
    pub(crate) fn clear(&mut self) {
        if self.total > 0 {
            self.counts.fill(0);
        }
        self.total = 0;
        self.max = 0;
    }

    /// The buckets in use, compact: what a report's JSON carries.
    pub(crate) fn to_sparse(&self) -> Sparse {
        Sparse {
            max: self.max,
            buckets: (self.counts.iter().enumerate())
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (Self::bucket_high(i), c))
                .collect(),
        }
    }

    /// The histogram that [`to_sparse`](Self::to_sparse) made: every value counts in the
    /// bucket it falls in, so values read from a file need not be bucket bounds.
    pub(crate) fn from_sparse(s: &Sparse) -> Histogram {
        let mut h = Histogram::new();
        for &(v, c) in &s.buckets {
            let slot = &mut h.counts[Self::index(v)];
            *slot = slot.saturating_add(c);
            h.total = h.total.saturating_add(c);
            h.max = h.max.max(v);
        }
        // A bucket's bound may lie above the largest value recorded in it.
        h.max = if h.total > 0 {
            s.max.min(h.max).max(Self::bucket_low(h.max))
        } else {
            0
        };
        h
    }

    /// The smallest value that falls in the bucket of `v`.
    fn bucket_low(v: u64) -> u64 {
        let i = Self::index(v);
        if i == 0 {
            0
        } else {
            Self::bucket_high(i - 1) + 1
        }
    }

    pub(crate) fn summary(&self) -> Option<Latency> {
        let ns = |q: f64| Duration::from_nanos(self.quantile(q).unwrap_or(0));
        (self.total > 0).then(|| Latency {
            count: self.total,
            p50: ns(0.5),
            p90: ns(0.9),
            p99: ns(0.99),
            p999: ns(0.999),
            max: Duration::from_nanos(self.max),
        })
    }
}

/// A histogram's buckets in use: `(largest value of the bucket, count)` in increasing order,
/// and the largest value recorded. Kept for every second of a run (a full [`Histogram`] is
/// 58 KiB) and written in the JSON so that runs merge exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sparse {
    pub(crate) max: u64,
    pub(crate) buckets: Vec<(u64, u64)>,
}

impl Sparse {
    /// Values recorded.
    pub(crate) fn total(&self) -> u64 {
        self.buckets.iter().fold(0u64, |t, &(_, c)| t.saturating_add(c))
    }

    /// As [`Histogram::quantile`]: the same buckets give the same answer.
    pub(crate) fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for &(v, c) in &self.buckets {
            seen = seen.saturating_add(c);
            if seen >= rank {
                return Some(v.min(self.max));
            }
        }
        Some(self.max)
    }

    /// Adds another's counts (both in increasing order, as made).
    pub(crate) fn merge(&mut self, other: &Sparse) {
        let mut h = Histogram::from_sparse(self);
        h.merge(&Histogram::from_sparse(other));
        *self = h.to_sparse();
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_narrow() {
        let mut prev_high = None;
        for i in 0..Histogram::new().counts.len() - 1 {
            let high = Histogram::bucket_high(i);
            if let Some(p) = prev_high {
                assert!(high > p, "bucket {i}");
            }
            assert_eq!(Histogram::index(high), i, "bucket {i} high {high}");
            assert_eq!(Histogram::index(high + 1), i + 1, "bucket {i}");
            prev_high = Some(high);
        }
        for v in [0u64, 1, 255, 256, 1000, 123_456, 10_000_000_000, u64::MAX] {
            let high = Histogram::bucket_high(Histogram::index(v));
            assert!(
                high >= v && (high - v) as f64 <= v as f64 / 127.0 + 1.0,
                "{v} -> {high}"
            );
        }
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((500_000..=504_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((990_000..=998_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Some(1_000_000));
        assert_eq!(h.summary().unwrap().max, Duration::from_micros(1000));
    }

    #[test]
    fn histograms_merge_exactly_and_survive_their_text_form() {
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for v in 1..=1000u64 {
            let part = if v % 3 == 0 { &mut a } else { &mut b };
            part.record(v * 997);
            all.record(v * 997);
        }
        let mut merged = Histogram::from_sparse(&a.to_sparse());
        merged.merge(&Histogram::from_sparse(&b.to_sparse()));
        assert!(merged == all);
        assert_eq!(merged.summary(), all.summary());
        assert_eq!(Histogram::from_sparse(&Histogram::new().to_sparse()).summary(), None);
        // The compact form answers the same quantiles, and merges the same way.
        let (mut sa, sall) = (a.to_sparse(), all.to_sparse());
        sa.merge(&b.to_sparse());
        assert_eq!(sa, sall);
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(sall.quantile(q), all.quantile(q), "{q}");
        }
        // Values that are not bucket bounds (a hand-edited file) land in their buckets.
        let odd = Sparse {
            max: 1_000_000,
            buckets: vec![(1000, 2), (999_999, 1)],
        };
        let h = Histogram::from_sparse(&odd);
        assert_eq!((h.total, h.quantile(1.0)), (3, Some(999_999)));
        let mut c = all.clone();
        c.clear();
        assert!(c == Histogram::new());
    }
}
