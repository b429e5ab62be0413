//! Autobahn conformance of the client: kosoku is the fuzzing server and the driver in
//! `examples/autobahn_client.rs` is the client: compiled into this test (one copy of it), or
//! the prebuilt example `WSLOOP_AUTOBAHN_CLIENT` names (`.ci/run` names a release build).

mod common;

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../examples/autobahn_client.rs"]
mod driver;

use std::time::Duration;

use common::autobahn::{self, Kosoku, EXPECTED_CASES};

const AGENT: &str = "wsloop";

/// The driver gives up after this long. Without compression a run takes under a minute; the
/// 216 compression cases echo 1,000 messages each, one at a time, and take minutes.
const RUN_BUDGET: Duration = Duration::from_secs(45 * 60);

#[test]
fn autobahn_client_cases() {
    let Some(kosoku) = Kosoku::setup() else {
        return;
    };
    let outdir = autobahn::report_dir("client");
    let mut server = kosoku.start_fuzzingserver(&outdir);

    let driven = match autobahn::prebuilt(autobahn::CLIENT_BIN_VAR) {
        Some(binary) => autobahn::run_client_binary(&binary, &server.url(), AGENT, RUN_BUDGET),
        None => driver::run(&server.url(), AGENT, RUN_BUDGET),
    };
    let run = server.wait(Duration::from_secs(60));
    println!("autobahn client: kosoku ran {:.1?}", run.elapsed);
    let summary = driven.unwrap_or_else(|e| panic!("the client driver failed: {e}\n{}", run.describe()));
    println!("{summary}");
    if run.timed_out {
        panic!("kosoku did not exit after /updateReports\n{}", run.describe());
    }

    let results = autobahn::read_results(&kosoku, &outdir, Some(AGENT))
        .unwrap_or_else(|e| panic!("no Autobahn results: {e}\n{}", run.describe()));
    autobahn::assert_conformance("client", &outdir, &results, EXPECTED_CASES, &run.describe());
}
