//! `wsloop report`: reads `wsloop bench --json` files, lays them side by side in one page, or
//! merges runs made from several machines into one.

use std::ffi::OsString;
use std::path::Path;

use wsloop::bench::{self, Report};

use super::{dispatch, print_out, unexpected, Asked, Error, Outcome};

/// `wsloop report --help`.
pub const HELP: &str = "\
Usage: wsloop report FILE.json... [OPTIONS]

Reads reports written by `wsloop bench --json` and compares them, or merges them into one.

Options:
  --html FILE    write one self-contained page: a table with a column per run, and the
                 runs overlaid in the same charts (connections, throughput and latency
                 over time, the latency distribution, the server's memory and CPU)
  --merge        merge runs made at once, from several machines, against one target into
                 one result: counts summed, histograms merged (percentiles are those of
                 every round trip, never averages), timelines added second by second;
                 prints it as `wsloop bench` would
  --json FILE    with --merge: write the merged report as JSON

Without --merge, prints each run's summary. Exit status: 0 done, 1 a file that cannot be
read or is not a report, 2 bad usage.
";

struct Parsed {
    files: Vec<OsString>,
    html: Option<OsString>,
    json: Option<OsString>,
    merge: bool,
}

/// Parses the options and reports.
pub fn run(args: Vec<OsString>) -> Outcome {
    dispatch(parse(args), HELP, report)
}

fn parse(args: Vec<OsString>) -> Result<Asked<Parsed>, Error> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut out = Parsed {
        files: Vec::new(),
        html: None,
        json: None,
        merge: false,
    };
    while let Some(arg) = p.next()? {
        match arg {
            Value(v) => out.files.push(v),
            Long("html") => out.html = Some(p.value()?),
            Long("json") => out.json = Some(p.value()?),
            Long("merge") => out.merge = true,
            Short('h') | Long("help") => return Ok(Asked::Help),
            Short('V') | Long("version") => return Ok(Asked::Version),
            _ => return Err(unexpected(arg, "report")),
        }
    }
    if out.files.is_empty() {
        return Err(Error::usage(
            "no report given (wsloop report A.json B.json ... --html OUT.html)",
        ));
    }
    if out.json.is_some() && !out.merge {
        return Err(Error::usage("--json writes the merged report: add --merge"));
    }
    Ok(Asked::Run(out))
}

/// A run's name in the page: its file name without `.json`.
fn label(file: &Path) -> String {
    let name = file.file_name().unwrap_or(file.as_os_str()).to_string_lossy();
    name.strip_suffix(".json").unwrap_or(&name).to_string()
}

fn read(file: &Path) -> Result<Report, Error> {
    let text =
        std::fs::read_to_string(file).map_err(|e| Error::runtime(format!("cannot read {}: {e}", file.display())))?;
    Report::from_json(&text).map_err(|e| Error::runtime(format!("{}: {e}", file.display())))
}

fn write(file: &OsString, text: &str) -> Outcome {
    std::fs::write(file, text).map_err(|e| Error::runtime(format!("cannot write {}: {e}", Path::new(file).display())))
}

fn report(o: Parsed) -> Outcome {
    let mut runs = Vec::with_capacity(o.files.len());
    for f in &o.files {
        let path = Path::new(f);
        runs.push((label(path), read(path)?));
    }
    if o.merge {
        if let Some((other, r)) = runs.iter().find(|(_, r)| r.url != runs[0].1.url) {
            return Err(Error::runtime(format!(
                "--merge combines runs against one target: {} measured {}, {other} measured {}",
                runs[0].0, runs[0].1.url, r.url
            )));
        }
        let reports: Vec<Report> = runs.iter().map(|(_, r)| r.clone()).collect();
        let merged = Report::merge(&reports).ok_or_else(|| Error::runtime("no report"))?;
        if let Some(f) = &o.json {
            write(f, &format!("{}\n", merged.to_json()))?;
        }
        if let Some(f) = &o.html {
            let names: Vec<&str> = runs.iter().map(|(l, _)| l.as_str()).collect();
            let label = format!("merged: {}", names.join(" + "));
            let title = format!("wsloop bench: {}, {} runs merged", merged.url, runs.len());
            write(f, &bench::html_page(&title, &[(&label, &merged)]))?;
        }
        return print_out(&merged.to_string());
    }
    if let Some(f) = &o.html {
        let page: Vec<(&str, &Report)> = runs.iter().map(|(l, r)| (l.as_str(), r)).collect();
        let title = if runs.len() == 1 {
            format!("wsloop bench: {}", runs[0].1.url)
        } else {
            format!("wsloop bench: {} runs compared", runs.len())
        };
        write(f, &bench::html_page(&title, &page))?;
    }
    let mut text = String::new();
    for (label, r) in &runs {
        text.push_str(&format!("== {label}\n{r}\n"));
    }
    print_out(&text)
}
