//! Reports as one self-contained HTML page: a summary table and SVG charts written here, with
//! no script, no external style sheet, font or image, so that the page reads offline and
//! prints. Several runs share each chart, one colour per run.

use std::fmt::Write as _;
use std::time::Duration;

use super::report::{fmt_bytes, fmt_duration, Fixed};
use super::Report;

/// One colour per run, in turn (distinct in print and for the commonest colour blindness).
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

const WIDTH: f64 = 540.0;
const HEIGHT: f64 = 250.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 26.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 40.0;

const STYLE: &str = "\
body{font-family:sans-serif;margin:12px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:0 0 4px}
p.note{color:#555;font-size:12px;margin:2px 0 10px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{text-align:left;background:#f3f3f3;font-weight:normal}
td.t{text-align:left;max-width:520px;overflow-wrap:anywhere}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #ddd;padding:6px;width:540px}
.legend span{margin-right:14px;font-size:12px;white-space:nowrap}
svg text{font-family:sans-serif;font-size:11px;fill:#333}
@media print{body{margin:0}.chart{break-inside:avoid}}
";

/// The page for one run or several (`label`, report): a legend, a summary table with one
/// column per run, and the charts: connections, throughput and latency percentiles over time,
/// the latency distribution (an HDR-style percentile plot) and the server's memory and CPU
/// over time.
pub fn html_page(title: &str, runs: &[(&str, &Report)]) -> String {
    let mut o = String::with_capacity(64 << 10);
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    let _ = writeln!(o, "<title>{}</title>", esc(title));
    let _ = writeln!(o, "<style>\n{STYLE}</style></head><body>");
    let _ = writeln!(o, "<h1>{}</h1>", esc(title));
    o.push_str("<p class=\"note\">Written by <code>wsloop</code> ");
    o.push_str(env!("CARGO_PKG_VERSION"));
    o.push_str(". Latency percentiles come from histograms (merged, never averaged).</p>\n");
    legend(&mut o, runs);
    summary(&mut o, runs);
    o.push_str("<div class=\"charts\">\n");
    let series = |f: &dyn Fn(&Report) -> Vec<(f64, f64)>| -> Vec<Series> {
        runs.iter()
            .enumerate()
            .map(|(i, (_, r))| Series::new(i, false, f(r)))
            .collect()
    };
    let t = |s: &super::Sample| s.at.as_secs_f64();
    chart(
        &mut o,
        "Connections open",
        "",
        &TIME,
        &Y_COUNT,
        // From none at the start.
        &series(&|r| {
            let from_zero = (!r.timeline.is_empty()).then_some((0.0, 0.0));
            from_zero
                .into_iter()
                .chain(r.timeline.iter().map(|s| (t(s), s.connections as f64)))
                .collect()
        }),
    );
    // Throughput: received solid, sent dashed.
    let mut through = series(&|r| rates(r, |s| s.received));
    through.extend(
        runs.iter()
            .enumerate()
            .map(|(i, (_, r))| Series::new(i, true, rates(r, |s| s.sent))),
    );
    chart(
        &mut o,
        "Throughput, messages per second",
        "received solid, sent dashed",
        &TIME,
        &Y_COUNT,
        &through,
    );
    let mut lat = series(&|r| percentile_points(r, |s| s.p99));
    lat.extend(
        runs.iter()
            .enumerate()
            .map(|(i, (_, r))| Series::new(i, true, percentile_points(r, |s| s.p50))),
    );
    chart(
        &mut o,
        "Latency per second",
        "p99 solid, p50 dashed, of the round trips that ended in each second",
        &TIME,
        &Y_MICROS,
        &lat,
    );
    chart(
        &mut o,
        "Latency distribution",
        "every round trip of the run; x: percentile on a scale of 1/(1-p)",
        &PERCENTILE,
        &Y_MICROS,
        &series(&hdr_points),
    );
    let server = runs
        .iter()
        .any(|(_, r)| r.timeline.iter().any(|s| s.server_rss.is_some()));
    if server {
        chart(
            &mut o,
            "Server resident memory",
            "summed over its processes",
            &TIME,
            &Y_MIB,
            &series(&|r| {
                (r.timeline.iter())
                    .filter_map(|s| Some((t(s), s.server_rss? as f64 / (1u64 << 20) as f64)))
                    .collect()
            }),
        );
        chart(
            &mut o,
            "Server CPU",
            "100% is one core busy",
            &TIME,
            &Y_PERCENT,
            &series(&|r| {
                (r.timeline.iter())
                    .filter_map(|s| Some((t(s), s.server_cpu? * 100.0)))
                    .collect()
            }),
        );
    } else {
        o.push_str(
            "<div class=\"chart\"><h2>Server memory and CPU</h2><p class=\"note\">Not measured: \
             give the server's process id with <code>--server-pid</code>.</p></div>\n",
        );
    }
    o.push_str("</div>\n</body></html>\n");
    o
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn swatch(i: usize, dashed: bool) -> String {
    format!(
        "<svg width=\"22\" height=\"10\"><line x1=\"1\" y1=\"5\" x2=\"21\" y2=\"5\" stroke=\"{}\" stroke-width=\"3\"{}/></svg>",
        COLOURS[i % COLOURS.len()],
        if dashed { " stroke-dasharray=\"4 3\"" } else { "" }
    )
}

fn legend(o: &mut String, runs: &[(&str, &Report)]) {
    o.push_str("<p class=\"legend\">");
    for (i, (label, _)) in runs.iter().enumerate() {
        let _ = write!(o, "<span>{} {}</span>", swatch(i, false), esc(label));
    }
    o.push_str("</p>\n");
}

fn summary(o: &mut String, runs: &[(&str, &Report)]) {
    type Row = (&'static str, fn(&Report) -> String);
    let rows: &[Row] = &[
        ("target", |r| r.url.clone()),
        ("load generator", |r| {
            let host = r.host.as_deref().unwrap_or("?");
            format!("{host}, {} core(s), {} process(es)", r.cores, r.processes)
        }),
        ("load", |r| {
            format!("{}, {} B {} messages", r.load, r.size, r.content.name())
        }),
        ("expected of the server", |r| r.expect.name().to_string()),
        ("schedule (open model)", |r| match r.schedule {
            Some(s) => {
                let mut t = format!("asked {}/s, sent {}/s", s.asked, Fixed(s.achieved, 0));
                if let Some(l) = s.lag {
                    t.push_str(&format!(
                        "; behind schedule p50 {}, p99 {}, max {}",
                        fmt_duration(l.p50),
                        fmt_duration(l.p99),
                        fmt_duration(l.max)
                    ));
                }
                if s.unsent > 0 {
                    t.push_str(&format!("; {} unsent", s.unsent));
                }
                t
            }
            None => "-".into(),
        }),
        ("fan-out", |r| match r.fanout {
            Some(x) => format!(
                "{} publisher(s), {} published, {} deliveries; missing {}, duplicated {}, out of order {}",
                x.publishers, x.published, r.received, x.missing, x.duplicated, x.reordered
            ),
            None => "-".into(),
        }),
        ("connections held", |r| format!("{} of {}", r.held, r.connections)),
        ("connect time", |r| fmt_duration(r.connect_time)),
        ("failures", |r| {
            format!(
                "connect {}, handshake {}, closed early {}, protocol {}, close timeouts {}",
                r.connect_failures, r.handshake_failures, r.closed_early, r.protocol_errors, r.close_timeouts
            )
        }),
        ("refused, by HTTP status", |r| codes(&r.handshake_statuses)),
        ("closed early, by close code", |r| codes(&r.close_codes)),
        ("measured", |r| fmt_duration(r.measured)),
        ("sent / received", |r| format!("{} / {}", r.sent, r.received)),
        ("lost / corrupted", |r| format!("{} / {}", r.lost, r.corrupted)),
        ("messages per second", |r| Fixed(r.msgs_per_sec, 0).to_string()),
        ("latency p50", |r| lat(r, |l| l.p50)),
        ("latency p90", |r| lat(r, |l| l.p90)),
        ("latency p99", |r| lat(r, |l| l.p99)),
        ("latency p99.9", |r| lat(r, |l| l.p999)),
        ("latency max", |r| lat(r, |l| l.max)),
        ("round trips", |r| r.latency.map_or("0".into(), |l| l.count.to_string())),
        ("server RSS before / held", |r| match r.server {
            Some(s) => format!(
                "{} / {}",
                s.rss_before.map_or("?".into(), fmt_bytes),
                s.rss_held.map_or("?".into(), fmt_bytes)
            ),
            None => "-".into(),
        }),
        ("server bytes per connection", |r| {
            r.server_bytes_per_connection()
                .map_or("-".into(), |b| Fixed(b, 0).to_string())
        }),
        ("server CPU", |r| {
            r.server
                .and_then(|s| s.cpu)
                .map_or("-".into(), |c| format!("{} s", Fixed(c.as_secs_f64(), 2)))
        }),
        ("messages per server CPU-second", |r| {
            r.msgs_per_server_cpu_sec()
                .map_or("-".into(), |m| Fixed(m, 0).to_string())
        }),
        ("first error", |r| r.first_error.clone().unwrap_or_else(|| "-".into())),
        ("clean", |r| {
            let mut s = if r.is_clean() { "yes" } else { "no" }.to_string();
            if r.interrupted {
                s.push_str(" (interrupted)");
            }
            s
        }),
    ];
    o.push_str("<table><tr><th></th>");
    for (i, (label, _)) in runs.iter().enumerate() {
        let _ = write!(o, "<th>{} {}</th>", swatch(i, false), esc(label));
    }
    o.push_str("</tr>\n");
    for (name, value) in rows {
        let _ = write!(o, "<tr><th>{name}</th>");
        for (_, r) in runs {
            let _ = write!(o, "<td class=\"t\">{}</td>", esc(&value(r)));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
}

fn codes(list: &[(u16, u64)]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    let v: Vec<String> = list.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
    v.join(", ")
}

fn lat(r: &Report, f: fn(&super::Latency) -> Duration) -> String {
    r.latency.as_ref().map_or("-".into(), |l| fmt_duration(f(l)))
}

/// Per-second rates of a count: the count over the sample's own length.
fn rates(r: &Report, f: fn(&super::Sample) -> u64) -> Vec<(f64, f64)> {
    let mut prev = Duration::ZERO;
    let mut out = Vec::with_capacity(r.timeline.len());
    for s in &r.timeline {
        let dt = s.at.saturating_sub(prev).as_secs_f64();
        prev = s.at;
        if dt > 0.0 {
            out.push((s.at.as_secs_f64(), f(s) as f64 / dt));
        }
    }
    out
}

fn percentile_points(r: &Report, f: fn(&super::Sample) -> Option<Duration>) -> Vec<(f64, f64)> {
    (r.timeline.iter())
        .filter_map(|s| Some((s.at.as_secs_f64(), f(s)?.as_nanos() as f64 / 1e3)))
        .collect()
}

/// The latency at each percentile, as a staircase: x is log10(1/(1-p)) (0 at p=0, 1 at 90%,
/// 2 at 99%...), y is the bucket's value in microseconds. The last step ends at the
/// percentile of one round trip short of all, log10(count).
fn hdr_points(r: &Report) -> Vec<(f64, f64)> {
    let s = r.hist.to_sparse();
    let total = s.total();
    if total == 0 {
        return Vec::new();
    }
    let end = (total as f64).log10();
    let x = |seen: u64| {
        let left = (total - seen.min(total)) as f64 / total as f64;
        if left <= 0.0 {
            end
        } else {
            (1.0 / left).log10().min(end)
        }
    };
    let mut out = Vec::with_capacity(s.buckets.len() * 2);
    let mut seen = 0u64;
    for &(v, c) in &s.buckets {
        let y = v.min(s.max) as f64 / 1e3;
        out.push((x(seen), y));
        seen = seen.saturating_add(c);
        out.push((x(seen), y));
    }
    out
}

/// A line in a chart.
struct Series {
    colour: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn new(run: usize, dashed: bool, points: Vec<(f64, f64)>) -> Series {
        Series {
            colour: COLOURS[run % COLOURS.len()],
            dashed,
            points,
        }
    }
}

/// How an axis places and labels its ticks.
struct Axis {
    /// The unit, under the axis.
    label: &'static str,
    /// A tick's text for a value.
    text: fn(f64) -> String,
    /// Ticks at whole numbers (the percentile scale) rather than at 1, 2 or 5 times a power of ten.
    whole: bool,
}

const TIME: Axis = Axis {
    label: "seconds since the start",
    text: |v| Fixed(v, 0).to_string(),
    whole: false,
};
const PERCENTILE: Axis = Axis {
    label: "percentile",
    text: percentile_text,
    whole: true,
};
const Y_COUNT: Axis = Axis {
    label: "",
    text: count_text,
    whole: false,
};
const Y_MICROS: Axis = Axis {
    label: "",
    text: micros_text,
    whole: false,
};
const Y_MIB: Axis = Axis {
    label: "",
    text: |v| format!("{} MiB", Fixed(v, if v.fract() == 0.0 { 0 } else { 1 })),
    whole: false,
};
const Y_PERCENT: Axis = Axis {
    label: "",
    text: |v| format!("{}%", Fixed(v, 0)),
    whole: false,
};

fn percentile_text(x: f64) -> String {
    // x = log10(1/(1-p)): 0 -> 0%, 1 -> 90%, 2 -> 99%, 3 -> 99.9%...
    let n = x.round() as u32;
    match n {
        0 => "0%".into(),
        1 => "90%".into(),
        n => format!("99.{}%", "9".repeat((n - 2) as usize)).replace("99.%", "99%"),
    }
}

fn count_text(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", Fixed(v / 1e6, if v % 1e6 == 0.0 { 0 } else { 1 }))
    } else if v >= 1e3 {
        format!("{}k", Fixed(v / 1e3, if v % 1e3 == 0.0 { 0 } else { 1 }))
    } else {
        Fixed(v, if v.fract() == 0.0 { 0 } else { 1 }).to_string()
    }
}

fn micros_text(us: f64) -> String {
    if us == 0.0 {
        "0".into()
    } else if us < 1e3 {
        format!("{}µs", Fixed(us, if us.fract() == 0.0 { 0 } else { 1 }))
    } else if us < 1e6 {
        let ms = us / 1e3;
        format!("{}ms", Fixed(ms, if ms.fract() == 0.0 { 0 } else { 1 }))
    } else {
        let s = us / 1e6;
        format!("{}s", Fixed(s, if s.fract() == 0.0 { 0 } else { 1 }))
    }
}

/// About five ticks from 0 to at least `max`: steps of 1, 2 or 5 times a power of ten (or of
/// whole numbers). Returns the step and the axis' top.
fn ticks(max: f64, whole: bool) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    if whole {
        let top = max.ceil().max(1.0);
        return (1.0, top);
    }
    let raw = max / 5.0;
    let mag = 10f64.powi(raw.log10().floor() as i32);
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (max / step).ceil() * step)
}

/// One chart: title, note, axes from 0, grid lines and the series as polylines.
fn chart(o: &mut String, title: &str, note: &str, x: &Axis, y: &Axis, series: &[Series]) {
    let _ = write!(o, "<div class=\"chart\"><h2>{}</h2>", esc(title));
    if !note.is_empty() {
        let _ = write!(o, "<p class=\"note\">{}</p>", esc(note));
    }
    let all = || series.iter().flat_map(|s| s.points.iter());
    let xmax = all().map(|p| p.0).fold(0.0, f64::max);
    let ymax = all().map(|p| p.1).fold(0.0, f64::max);
    let (xstep, xtop) = ticks(xmax, x.whole);
    let (ystep, ytop) = ticks(ymax, y.whole);
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let px = |v: f64| LEFT + v / xtop * pw;
    let py = |v: f64| TOP + ph - v / ytop * ph;
    let _ = write!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">",
        w = Fixed(WIDTH, 0),
        h = Fixed(HEIGHT, 0)
    );
    let _ = write!(o, "<title>{}</title>", esc(title));
    // Grid and tick labels.
    let mut v = 0.0;
    while v <= ytop * 1.000_001 {
        let at = Fixed(py(v), 1);
        let _ = write!(
            o,
            "<line x1=\"{}\" y1=\"{at}\" x2=\"{}\" y2=\"{at}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            Fixed(LEFT, 0),
            Fixed(WIDTH - RIGHT, 0),
            Fixed(LEFT - 4.0, 0),
            Fixed(py(v) + 4.0, 1),
            esc(&(y.text)(v))
        );
        v += ystep;
    }
    let mut v = 0.0;
    while v <= xtop * 1.000_001 {
        let at = Fixed(px(v), 1);
        let _ = write!(
            o,
            "<line x1=\"{at}\" y1=\"{}\" x2=\"{at}\" y2=\"{}\" stroke=\"#eeeeee\"/>\
             <text x=\"{at}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            Fixed(TOP, 0),
            Fixed(TOP + ph, 0),
            Fixed(TOP + ph + 14.0, 0),
            esc(&(x.text)(v))
        );
        v += xstep;
    }
    let _ = write!(
        o,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        Fixed(LEFT, 0),
        Fixed(TOP, 0),
        Fixed(pw, 0),
        Fixed(ph, 0),
        Fixed(LEFT + pw / 2.0, 0),
        Fixed(HEIGHT - 6.0, 0),
        esc(x.label)
    );
    if !y.label.is_empty() {
        let _ = write!(o, "<text x=\"4\" y=\"10\">{}</text>", esc(y.label));
    }
    let mut empty = true;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        empty = false;
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" stroke-linejoin=\"round\"{} points=\"",
            s.colour,
            if s.dashed { " stroke-dasharray=\"5 4\"" } else { "" }
        );
        for &(a, b) in &s.points {
            let _ = write!(o, "{},{} ", Fixed(px(a), 1), Fixed(py(b), 1));
        }
        o.push_str("\"/>");
        // A lone point would draw nothing as a line.
        if let [(a, b)] = s.points[..] {
            let _ = write!(
                o,
                "<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{}\"/>",
                Fixed(px(a), 1),
                Fixed(py(b), 1),
                s.colour
            );
        }
    }
    if empty {
        let _ = write!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text>",
            Fixed(LEFT + pw / 2.0, 0),
            Fixed(TOP + ph / 2.0, 0)
        );
    }
    o.push_str("</svg></div>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_data() {
        assert_eq!(ticks(9.3, false), (2.0, 10.0));
        assert_eq!(ticks(1234.0, false), (500.0, 1500.0));
        assert_eq!(ticks(0.0, false), (0.2, 1.0));
        assert_eq!(ticks(3.2, true), (1.0, 4.0));
        assert_eq!(percentile_text(0.0), "0%");
        assert_eq!(percentile_text(1.0), "90%");
        assert_eq!(percentile_text(2.0), "99%");
        assert_eq!(percentile_text(4.0), "99.99%");
        assert_eq!(micros_text(1500.0), "1.5ms");
        assert_eq!(micros_text(250.0), "250µs");
        assert_eq!(count_text(20_000.0), "20k");
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
