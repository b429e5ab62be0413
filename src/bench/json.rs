//! A report as JSON, written and read with serde: what `--json` prints, what `wsloop report`
//! reads back and merges, and what each process of a split run hands its parent.
//!
//! Figures derived from others (`clean`, the ratios, per-connection and per-CPU-second
//! figures, the percentiles) are written for readers and recomputed on reading: the
//! histograms are the source of every percentile.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::histogram::{Histogram, Sparse};
use super::report::count_code;
use super::timeline::Sample;
use super::{Compression, Content, Expect, Fanout, KernelUsage, Load, Report, Schedule, ServerUsage};

/// Why a text is not a report.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReportError {
    /// Not JSON, or not of a report's shape: serde's words, with the line and column.
    Json(serde_json::Error),
    /// Well-formed, but a value makes no sense (an unknown mode or payload).
    Invalid(String),
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportError::Json(e) => write!(f, "not a wsloop bench report: {e}"),
            ReportError::Invalid(why) => write!(f, "not a wsloop bench report: {why}"),
        }
    }
}

impl std::error::Error for ReportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReportError::Json(e) => Some(e),
            ReportError::Invalid(_) => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ReportJson {
    url: String,
    connections: u64,
    mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    every_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inflight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate: Option<u32>,
    #[serde(default = "echo")]
    expect: String,
    size: u64,
    payload: String,
    deflate: Option<DeflateJson>,
    opened: u64,
    held: u64,
    connect_failures: u64,
    handshake_failures: u64,
    closed_early: u64,
    protocol_errors: u64,
    close_timeouts: u64,
    connect_s: f64,
    measured_s: f64,
    sent: u64,
    received: u64,
    lost: u64,
    corrupted: u64,
    measured_received: u64,
    msgs_per_sec: f64,
    latency_us: Option<LatencyJson>,
    server: Option<ServerJson>,
    kernel: Option<KernelJson>,
    first_error: Option<String>,
    cores: u64,
    bench_processes: u64,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    schedule: Option<ScheduleJson>,
    #[serde(default)]
    fanout: Option<FanoutJson>,
    /// Refused handshakes by HTTP status: `{"401": 3}`.
    #[serde(default)]
    handshake_statuses: BTreeMap<String, u64>,
    /// Early closes by close code: `{"1001": 2}`.
    #[serde(default)]
    close_codes: BTreeMap<String, u64>,
    interrupted: bool,
    clean: bool,
    #[serde(default)]
    timeline: Vec<SampleJson>,
    histogram: HistogramJson,
}

fn echo() -> String {
    "echo".into()
}

#[derive(Serialize, Deserialize)]
struct ScheduleJson {
    asked: u32,
    achieved: f64,
    unsent: u64,
    lag_p50_us: Option<f64>,
    lag_p99_us: Option<f64>,
    lag_max_us: Option<f64>,
    /// How late every message was sent: merged exactly, as the latency histogram.
    lag_histogram: HistogramJson,
}

#[derive(Serialize, Deserialize)]
struct FanoutJson {
    publishers: u64,
    published: u64,
    expected: u64,
    deliveries: u64,
    deliveries_per_sec: f64,
    missing: u64,
    duplicated: u64,
    reordered: u64,
    receivers_missing: u64,
    most_missing: u64,
    other: u64,
}

fn codes_out(list: &[(u16, u64)]) -> BTreeMap<String, u64> {
    list.iter().map(|(c, n)| (c.to_string(), *n)).collect()
}

fn codes_in(map: BTreeMap<String, u64>, what: &str) -> Result<Vec<(u16, u64)>, ReportError> {
    let mut out = Vec::with_capacity(map.len());
    for (c, n) in map {
        let code = c
            .parse::<u16>()
            .map_err(|_| ReportError::Invalid(format!("{what}: '{c}' is not a status or close code")))?;
        count_code(&mut out, code, n);
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct DeflateJson {
    agreed: u64,
    sent_raw: u64,
    sent_wire: u64,
    sent_ratio: Option<f64>,
    received_wire: u64,
    received_raw: u64,
    received_ratio: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct LatencyJson {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
}

#[derive(Serialize, Deserialize)]
struct ServerJson {
    pid: u32,
    rss_before: Option<u64>,
    rss_connected: Option<u64>,
    rss_held: Option<u64>,
    bytes_per_connection: Option<f64>,
    cpu_s: Option<f64>,
    msgs_per_cpu_s: Option<f64>,
    processes: u32,
    descriptors_min: Option<u64>,
    descriptors_max: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct KernelJson {
    tcp_inuse_before: u64,
    tcp_inuse_held: u64,
    tcp_mem_before: u64,
    tcp_mem_held: u64,
    slab_before: u64,
    slab_held: u64,
    slab_per_socket: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct SampleJson {
    t: f64,
    connections: u64,
    sent: u64,
    received: u64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    server_rss: Option<u64>,
    server_cpu: Option<f64>,
    histogram: HistogramJson,
}

/// A histogram, compact: the largest value, and `[bucket's largest value, count]` for each
/// bucket in use, in nanoseconds.
#[derive(Serialize, Deserialize)]
struct HistogramJson {
    max_ns: u64,
    buckets: Vec<(u64, u64)>,
}

impl From<&Sparse> for HistogramJson {
    fn from(s: &Sparse) -> Self {
        HistogramJson {
            max_ns: s.max,
            buckets: s.buckets.clone(),
        }
    }
}

impl From<HistogramJson> for Sparse {
    fn from(h: HistogramJson) -> Self {
        // Through the full form: values land in their buckets, in order, whatever the file says.
        Histogram::from_sparse(&Sparse {
            max: h.max_ns,
            buckets: h.buckets,
        })
        .to_sparse()
    }
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Seconds as written back to a duration, to the nanosecond (exact for what was written).
fn from_secs(s: f64) -> Duration {
    Duration::from_nanos((s.max(0.0) * 1e9).round() as u64)
}

impl Report {
    /// The report as one JSON object (one line): every figure of the text report, the
    /// latency histogram (compact) and the `timeline` of per-second samples.
    /// [`from_json`](Self::from_json) reads it back.
    pub fn to_json(&self) -> String {
        let (mode, every_ms, inflight, rate) = match self.load {
            Load::Idle => ("idle", None, None, None),
            Load::Periodic(d) => ("periodic", Some(d.as_nanos() as f64 / 1e6), None, None),
            Load::Saturate(k) => ("saturate", None, Some(k), None),
            Load::Rate(r) => ("rate", None, None, Some(r)),
        };
        let j = ReportJson {
            url: self.url.clone(),
            connections: self.connections as u64,
            mode: mode.into(),
            every_ms,
            inflight,
            rate,
            expect: self.expect.name().into(),
            size: self.size as u64,
            payload: self.content.name().into(),
            deflate: self.deflate.map(|d| DeflateJson {
                agreed: d.agreed,
                sent_raw: d.sent_raw,
                sent_wire: d.sent_wire,
                sent_ratio: d.sent_ratio(),
                received_wire: d.received_wire,
                received_raw: d.received_raw,
                received_ratio: d.received_ratio(),
            }),
            opened: self.opened,
            held: self.held as u64,
            connect_failures: self.connect_failures,
            handshake_failures: self.handshake_failures,
            closed_early: self.closed_early,
            protocol_errors: self.protocol_errors,
            close_timeouts: self.close_timeouts,
            connect_s: self.connect_time.as_secs_f64(),
            measured_s: self.measured.as_secs_f64(),
            sent: self.sent,
            received: self.received,
            lost: self.lost,
            corrupted: self.corrupted,
            measured_received: self.measured_received,
            msgs_per_sec: self.msgs_per_sec,
            latency_us: self.latency.map(|l| LatencyJson {
                count: l.count,
                p50: us(l.p50),
                p90: us(l.p90),
                p99: us(l.p99),
                p99_9: us(l.p999),
                max: us(l.max),
            }),
            server: self.server.map(|s| ServerJson {
                pid: s.pid,
                rss_before: s.rss_before,
                rss_connected: s.rss_connected,
                rss_held: s.rss_held,
                bytes_per_connection: self.server_bytes_per_connection(),
                cpu_s: s.cpu.map(|c| c.as_secs_f64()),
                msgs_per_cpu_s: self.msgs_per_server_cpu_sec(),
                processes: s.processes,
                descriptors_min: s.descriptors_min,
                descriptors_max: s.descriptors_max,
            }),
            kernel: self.kernel.map(|k| KernelJson {
                tcp_inuse_before: k.tcp_inuse_before,
                tcp_inuse_held: k.tcp_inuse_held,
                tcp_mem_before: k.tcp_mem_before,
                tcp_mem_held: k.tcp_mem_held,
                slab_before: k.slab_before,
                slab_held: k.slab_held,
                slab_per_socket: k.slab_per_socket(),
            }),
            first_error: self.first_error.clone(),
            cores: self.cores as u64,
            bench_processes: self.processes as u64,
            host: self.host.clone(),
            schedule: self.schedule.map(|s| ScheduleJson {
                asked: s.asked,
                achieved: s.achieved,
                unsent: s.unsent,
                lag_p50_us: s.lag.map(|l| us(l.p50)),
                lag_p99_us: s.lag.map(|l| us(l.p99)),
                lag_max_us: s.lag.map(|l| us(l.max)),
                lag_histogram: (&self.lag_hist.to_sparse()).into(),
            }),
            fanout: self.fanout.map(|x| FanoutJson {
                publishers: x.publishers,
                published: x.published,
                expected: x.expected,
                deliveries: self.received,
                deliveries_per_sec: self.msgs_per_sec,
                missing: x.missing,
                duplicated: x.duplicated,
                reordered: x.reordered,
                receivers_missing: x.receivers_missing,
                most_missing: x.most_missing,
                other: x.other,
            }),
            handshake_statuses: codes_out(&self.handshake_statuses),
            close_codes: codes_out(&self.close_codes),
            interrupted: self.interrupted,
            clean: self.is_clean(),
            timeline: self
                .timeline
                .iter()
                .map(|s| SampleJson {
                    t: s.at.as_secs_f64(),
                    connections: s.connections,
                    sent: s.sent,
                    received: s.received,
                    p50_us: s.p50.map(us),
                    p99_us: s.p99.map(us),
                    server_rss: s.server_rss,
                    server_cpu: s.server_cpu,
                    histogram: (&s.hist).into(),
                })
                .collect(),
            histogram: (&self.hist.to_sparse()).into(),
        };
        // Nothing in these types can fail to serialise (no maps with non-string keys).
        serde_json::to_string(&j).unwrap_or_default()
    }

    /// Reads a report that [`to_json`](Self::to_json) wrote (this version of the crate or a
    /// later one that only added fields).
    pub fn from_json(text: &str) -> Result<Report, ReportError> {
        let j: ReportJson = serde_json::from_str(text).map_err(ReportError::Json)?;
        let invalid = |m: String| ReportError::Invalid(m);
        let load = match (j.mode.as_str(), j.every_ms, j.inflight) {
            ("idle", _, _) => Load::Idle,
            ("periodic", Some(ms), _) if ms > 0.0 => Load::Periodic(from_secs(ms / 1e3)),
            ("saturate", _, Some(k)) if k > 0 => Load::Saturate(k),
            ("rate", _, _) => match j.rate {
                Some(r) if r > 0 => Load::Rate(r),
                _ => return Err(invalid("mode 'rate' without a valid rate".into())),
            },
            (m, _, _) => return Err(invalid(format!("mode '{m}' without a valid every_ms or inflight"))),
        };
        let expect = Expect::parse(&j.expect).ok_or_else(|| invalid(format!("unknown expect '{}'", j.expect)))?;
        let lag_hist = match &j.schedule {
            Some(s) => Histogram::from_sparse(&Sparse {
                max: s.lag_histogram.max_ns,
                buckets: s.lag_histogram.buckets.clone(),
            }),
            None => Histogram::new(),
        };
        let content = Content::parse(&j.payload).ok_or_else(|| invalid(format!("unknown payload '{}'", j.payload)))?;
        let hist = Histogram::from_sparse(&j.histogram.into());
        let size = |n: u64, what: &str| usize::try_from(n).map_err(|_| invalid(format!("{what} {n} is too large")));
        Ok(Report {
            url: j.url,
            connections: size(j.connections, "connections")?,
            load,
            size: size(j.size, "size")?,
            content,
            deflate: j.deflate.map(|d| Compression {
                agreed: d.agreed,
                sent_raw: d.sent_raw,
                sent_wire: d.sent_wire,
                received_wire: d.received_wire,
                received_raw: d.received_raw,
            }),
            opened: j.opened,
            held: size(j.held, "held")?,
            connect_failures: j.connect_failures,
            handshake_failures: j.handshake_failures,
            closed_early: j.closed_early,
            protocol_errors: j.protocol_errors,
            close_timeouts: j.close_timeouts,
            connect_time: from_secs(j.connect_s),
            measured: from_secs(j.measured_s),
            sent: j.sent,
            received: j.received,
            lost: j.lost,
            corrupted: j.corrupted,
            msgs_per_sec: j.msgs_per_sec,
            measured_received: j.measured_received,
            latency: hist.summary(),
            server: j.server.map(|s| ServerUsage {
                pid: s.pid,
                rss_before: s.rss_before,
                rss_connected: s.rss_connected,
                rss_held: s.rss_held,
                cpu: s.cpu_s.map(from_secs),
                processes: s.processes,
                descriptors_min: s.descriptors_min,
                descriptors_max: s.descriptors_max,
            }),
            kernel: j.kernel.map(|k| KernelUsage {
                tcp_inuse_before: k.tcp_inuse_before,
                tcp_inuse_held: k.tcp_inuse_held,
                tcp_mem_before: k.tcp_mem_before,
                tcp_mem_held: k.tcp_mem_held,
                slab_before: k.slab_before,
                slab_held: k.slab_held,
            }),
            first_error: j.first_error,
            cores: size(j.cores, "cores")?,
            processes: size(j.bench_processes, "bench_processes")?,
            host: j.host,
            timeline: j
                .timeline
                .into_iter()
                .map(|s| {
                    let mut out = Sample::new(from_secs(s.t), s.connections, s.sent, s.received, s.histogram.into());
                    out.server_rss = s.server_rss;
                    out.server_cpu = s.server_cpu;
                    out
                })
                .collect(),
            hist: Box::new(hist),
            interrupted: j.interrupted,
            expect,
            schedule: j.schedule.map(|s| Schedule {
                asked: s.asked,
                achieved: s.achieved,
                lag: lag_hist.summary(),
                unsent: s.unsent,
            }),
            lag_hist: Box::new(lag_hist),
            fanout: j.fanout.map(|x| Fanout {
                publishers: x.publishers,
                published: x.published,
                expected: x.expected,
                missing: x.missing,
                duplicated: x.duplicated,
                reordered: x.reordered,
                receivers_missing: x.receivers_missing,
                most_missing: x.most_missing,
                other: x.other,
            }),
            handshake_statuses: codes_in(j.handshake_statuses, "handshake_statuses")?,
            close_codes: codes_in(j.close_codes, "close_codes")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of `values` (nanoseconds), one round trip each, in one second.
    fn report_of(values: impl Iterator<Item = u64>) -> Report {
        let mut hist = Histogram::new();
        for v in values {
            hist.record(v);
        }
        let n = hist.summary().map_or(0, |l| l.count);
        Report {
            url: "ws://10.0.0.1:9001/".into(),
            connections: 10,
            load: Load::Periodic(Duration::from_micros(1500)),
            size: 32,
            content: Content::Json,
            deflate: Some(Compression {
                agreed: 10,
                sent_raw: 3200,
                sent_wire: 900,
                received_wire: 905,
                received_raw: 3200,
            }),
            opened: 10,
            held: 10,
            connect_failures: 0,
            handshake_failures: 0,
            closed_early: 0,
            protocol_errors: 0,
            close_timeouts: 0,
            connect_time: Duration::from_millis(12),
            measured: Duration::from_millis(1000),
            sent: n,
            received: n,
            lost: 0,
            corrupted: 0,
            msgs_per_sec: n as f64,
            measured_received: n,
            latency: hist.summary(),
            server: None,
            kernel: None,
            first_error: Some("a \"quoted\"\nline".into()),
            cores: 4,
            processes: 1,
            host: Some("loadgen-1".into()),
            timeline: vec![Sample::new(Duration::from_millis(1_000), 10, n, n, hist.to_sparse())],
            hist: Box::new(hist),
            interrupted: false,
            expect: Expect::Reply,
            schedule: None,
            lag_hist: Box::new(Histogram::new()),
            fanout: None,
            handshake_statuses: vec![(401, 2), (503, 1)],
            close_codes: vec![(1001, 1)],
        }
    }

    #[test]
    fn a_report_survives_its_json() {
        let r = report_of((1..=500).map(|v| v * 1_234));
        let text = r.to_json();
        let back = Report::from_json(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.to_json(), text);
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["every_ms"], 1.5);
        assert_eq!(j["timeline"][0]["sent"], 500);
        assert_eq!(j["host"], "loadgen-1");
        assert!(j["histogram"]["buckets"].as_array().unwrap().len() > 100);
    }

    #[test]
    fn the_open_model_and_fan_out_figures_survive_their_json() {
        let mut r = report_of((1..=300).map(|v| v * 777));
        r.load = Load::Rate(5_000);
        let mut lag = Histogram::new();
        for v in 1..=100u64 {
            lag.record(v * 10_000);
        }
        r.schedule = Some(Schedule {
            asked: 5_000,
            achieved: 4_987.25,
            lag: lag.summary(),
            unsent: 3,
        });
        *r.lag_hist = lag;
        r.fanout = Some(Fanout {
            publishers: 2,
            published: 300,
            expected: 9,
            missing: 4,
            duplicated: 1,
            reordered: 2,
            receivers_missing: 3,
            most_missing: 2,
            other: 7,
        });
        let text = r.to_json();
        assert_eq!(Report::from_json(&text).unwrap(), r);
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((j["mode"].as_str(), j["rate"].as_u64()), (Some("rate"), Some(5_000)));
        assert_eq!(j["handshake_statuses"]["401"], 2);
        assert_eq!(j["close_codes"]["1001"], 1);
        assert_eq!(j["schedule"]["unsent"], 3);
        assert_eq!(j["fanout"]["other"], 7);
        // Two parts of an open-model run: their lag histograms add up too.
        let m = Report::merge(&[r.clone(), Report::from_json(&text).unwrap()]).unwrap();
        let s = m.schedule.unwrap();
        assert_eq!((s.asked, s.unsent, s.lag.unwrap().count), (10_000, 6, 200));
        assert_eq!(s.lag.unwrap().p50, r.schedule.unwrap().lag.unwrap().p50);
    }

    #[test]
    fn merged_reports_take_percentiles_from_the_summed_histogram() {
        // Machine a saw 1..=1000 µs, machine b 1001..=2000 µs: together 1..=2000 µs.
        let a = report_of((1..=1000).map(|v| v * 1000));
        let b = report_of((1001..=2000).map(|v| v * 1000));
        let a = Report::from_json(&a.to_json()).unwrap();
        let b = Report::from_json(&b.to_json()).unwrap();
        let m = Report::merge(&[a.clone(), b.clone()]).unwrap();
        let mut all = Histogram::new();
        for v in 1..=2000u64 {
            all.record(v * 1000);
        }
        assert!(*m.hist == all, "the merged histogram is the sum");
        assert_eq!((m.sent, m.received, m.connections), (2000, 2000, 20));
        let l = m.latency.unwrap();
        assert_eq!(l.count, 2000);
        // Within a bucket (under 0.8 %) of the true percentiles of 1..=2000 µs.
        let near = |d: Duration, us: u64| {
            let ns = d.as_nanos() as u64;
            ns >= us * 1000 && ns <= us * 1008
        };
        assert!(near(l.p50, 1000), "{l:?}");
        assert!(near(l.p90, 1800), "{l:?}");
        assert!(near(l.p99, 1980), "{l:?}");
        assert_eq!(l.max, Duration::from_millis(2));
        // Averaging the two p99s (990 µs and 1,990 µs) would have said 1,490 µs.
        let avg = (a.latency.unwrap().p99 + b.latency.unwrap().p99) / 2;
        assert!(!near(avg, 1980));
        // The one second of both, merged the same way.
        assert_eq!(m.timeline.len(), 1);
        assert_eq!(m.timeline[0].round_trips(), 2000);
        assert!(near(m.timeline[0].p99.unwrap(), 1980));
        // And the merged report through its JSON again.
        assert_eq!(Report::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn what_is_not_a_report_says_why() {
        let good = report_of([1000u64].into_iter()).to_json();
        for (text, says) in [
            ("", "EOF"),
            ("{}", "missing field"),
            ("[1,2]", "invalid type"),
            (&good.replace("\"periodic\"", "\"sometimes\""), "mode 'sometimes'"),
            (&good.replace("\"json\"", "\"xml\""), "payload 'xml'"),
            (&good.replace("\"401\"", "\"x\""), "'x' is not a status"),
            (&good.replace("\"held\":10", "\"held\":-1"), "invalid value"),
        ] {
            let e = Report::from_json(text).unwrap_err().to_string();
            assert!(
                e.starts_with("not a wsloop bench report: ") && e.contains(says),
                "{text:.40}: {e}"
            );
        }
    }
}
