//! The run second by second: connections, messages, latency and the server's memory and CPU.

use std::time::Duration;

use super::histogram::{Histogram, Sparse};

/// One second of a run (the last sample of a run may cover less).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// Time since the run started, at the end of this sample's second.
    pub at: Duration,
    /// Connections open at that time.
    pub connections: u64,
    /// Messages sent during the second.
    pub sent: u64,
    /// Messages received during the second.
    pub received: u64,
    /// Median round trip of the echoes received during the second.
    pub p50: Option<Duration>,
    /// 99th percentile round trip of the echoes received during the second.
    pub p99: Option<Duration>,
    /// The server's resident memory at that time, in bytes (with its pid given; summed over
    /// its processes).
    pub server_rss: Option<u64>,
    /// The server's CPU time during the second, per second: 1.0 is one core busy (`None` for
    /// a last sample under half a second, too short for `/proc`'s 10 ms ticks).
    pub server_cpu: Option<f64>,
    /// The second's round trips, so that the seconds of several runs merge exactly.
    pub(crate) hist: Sparse,
}

impl Sample {
    /// A sample whose percentiles come from `hist`.
    pub(crate) fn new(at: Duration, connections: u64, sent: u64, received: u64, hist: Sparse) -> Sample {
        let mut s = Sample {
            at,
            connections,
            sent,
            received,
            p50: None,
            p99: None,
            server_rss: None,
            server_cpu: None,
            hist,
        };
        s.percentiles();
        s
    }

    fn percentiles(&mut self) {
        self.p50 = self.hist.quantile(0.5).map(Duration::from_nanos);
        self.p99 = self.hist.quantile(0.99).map(Duration::from_nanos);
    }

    /// Round trips measured during the second.
    pub fn round_trips(&self) -> u64 {
        self.hist.total()
    }
}

/// Adds `other`'s seconds to `into`'s, second by second (runs that started together, as the
/// parts of one run, or runs started at once on several machines): counts summed, histograms
/// merged and the percentiles taken from the merged one, the later time; the server's figures
/// are the first run's that has them (one load generator measures it for all).
pub(crate) fn merge(into: &mut Vec<Sample>, other: &[Sample]) {
    for (i, o) in other.iter().enumerate() {
        match into.get_mut(i) {
            Some(s) => {
                s.at = s.at.max(o.at);
                s.connections += o.connections;
                s.sent += o.sent;
                s.received += o.received;
                s.hist.merge(&o.hist);
                s.percentiles();
                s.server_rss = s.server_rss.or(o.server_rss);
                s.server_cpu = s.server_cpu.or(o.server_cpu);
            }
            None => into.push(o.clone()),
        }
    }
}

/// What the driver keeps to take a sample each second.
pub(crate) struct Sampler {
    /// Round trips of the current second.
    pub(crate) hist: Histogram,
    /// When the next sample is due, in the engine's milliseconds.
    pub(crate) due: u64,
    /// When the run started, in the same milliseconds.
    start: u64,
    /// Messages sent and received up to the last sample.
    last: (u64, u64),
    /// The server's CPU time at the last sample, and when it was read.
    last_cpu: Option<(Duration, u64)>,
    pub(crate) samples: Vec<Sample>,
}

impl Sampler {
    /// A sampler whose first second ends at `start + 1000` ms.
    pub(crate) fn new(start: u64, server_cpu: Option<Duration>) -> Sampler {
        Sampler {
            hist: Histogram::new(),
            due: start + 1000,
            start,
            last: (0, 0),
            last_cpu: server_cpu.map(|c| (c, start)),
            samples: Vec::new(),
        }
    }

    /// Closes the current second at `now` (ms): `sent` and `received` are the run's totals so
    /// far, `rss` and `cpu` the server's readings now. The next one is due a whole second
    /// after the last one due, so that the seconds do not drift with the timer.
    pub(crate) fn take(
        &mut self,
        now: u64,
        connections: u64,
        (sent, received): (u64, u64),
        rss: Option<u64>,
        cpu: Option<Duration>,
    ) {
        let (s0, r0) = self.last;
        let mut s = Sample::new(
            Duration::from_millis(now.saturating_sub(self.start)),
            connections,
            sent.saturating_sub(s0),
            received.saturating_sub(r0),
            self.hist.to_sparse(),
        );
        s.server_rss = rss;
        if let (Some((c0, t0)), Some(c)) = (self.last_cpu, cpu) {
            let secs = now.saturating_sub(t0) as f64 / 1000.0;
            // /proc counts CPU time in 10 ms ticks: over a last sample of a few milliseconds
            // one tick would read as several cores busy.
            s.server_cpu = (secs >= 0.5).then(|| c.saturating_sub(c0).as_secs_f64() / secs);
        }
        self.last_cpu = cpu.map(|c| (c, now)).or(self.last_cpu);
        self.last = (sent, received);
        self.hist.clear();
        self.samples.push(s);
        while self.due <= now {
            self.due += 1000;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(at: u64, values: &[u64]) -> Sample {
        let mut h = Histogram::new();
        for &v in values {
            h.record(v);
        }
        Sample::new(
            Duration::from_secs(at),
            10,
            values.len() as u64,
            values.len() as u64,
            h.to_sparse(),
        )
    }

    #[test]
    fn seconds_merge_by_their_histograms_not_by_averaging_percentiles() {
        // Run a: 99 fast round trips and 1 slow one; run b: 100 slow ones.
        let fast: Vec<u64> = std::iter::repeat_n(1_000, 99).chain([9_000_000]).collect();
        let slow = vec![5_000_000; 100];
        let mut a = vec![second(1, &fast), second(2, &[2_000])];
        a[0].server_rss = Some(1 << 20);
        let b = vec![second(1, &slow)];
        merge(&mut a, &b);
        assert_eq!(a.len(), 2);
        let s = &a[0];
        assert_eq!(
            (s.connections, s.sent, s.received, s.round_trips()),
            (20, 200, 200, 200)
        );
        // Of the 200, the median is a slow one (99 fast below it), and p99 is 5 ms: the
        // average of the two runs' p50s (1 µs and 5 ms) would be neither.
        let p50 = s.p50.unwrap().as_nanos() as u64;
        assert!((5_000_000..=5_040_000).contains(&p50), "{p50}");
        let p99 = s.p99.unwrap().as_nanos() as u64;
        assert!((5_000_000..=5_040_000).contains(&p99), "{p99}");
        assert_eq!(s.server_rss, Some(1 << 20));
        assert_eq!(a[1].sent, 1, "a second only one run had stays as it was");
    }

    #[test]
    fn the_sampler_takes_differences_and_resets_its_histogram() {
        let mut s = Sampler::new(100, Some(Duration::from_secs(3)));
        s.hist.record(1_000);
        s.take(1_100, 5, (10, 8), Some(100), Some(Duration::from_millis(3_500)));
        s.take(2_100, 5, (25, 20), None, Some(Duration::from_millis(4_500)));
        let [a, b] = &s.samples[..] else { panic!("two samples") };
        assert_eq!((a.sent, a.received, a.round_trips()), (10, 8, 1));
        assert_eq!((b.sent, b.received, b.round_trips(), b.p50), (15, 12, 0, None));
        assert_eq!((a.server_cpu, b.server_cpu), (Some(0.5), Some(1.0)));
        assert_eq!((a.at, b.at), (Duration::from_secs(1), Duration::from_secs(2)));
        assert_eq!(s.due, 3_100);
        // A last sample of 20 ms: one 10 ms tick is not half a core.
        s.take(2_120, 5, (25, 20), None, Some(Duration::from_millis(4_510)));
        assert_eq!(s.samples[2].server_cpu, None);
    }
}
