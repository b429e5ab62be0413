//! Autobahn conformance of `wsloop serve --mode echo`, driven by kosoku: all 517 cases with the
//! `deflate` feature (groups 12 and 13 are permessage-deflate), 301 without. The server is the
//! binary `WSLOOP_AUTOBAHN_SERVER` names when set (`.ci/run` names a release build), or the
//! command `WSLOOP_AUTOBAHN_SERVER_CMD` names (`qemu-aarch64 PATH`). tests/arm.rs runs groups 1
//! to 10 against the aarch64 build.

mod common;

use common::autobahn::{self, Kosoku, EXPECTED_CASES, SERVER_ARGS, SERVER_RUN_TIMEOUT};

#[test]
fn autobahn_server_cases() {
    let Some(kosoku) = Kosoku::setup() else {
        return;
    };
    let mut server = autobahn::spawn_server(SERVER_ARGS);
    let outdir = autobahn::report_dir("server");

    let run = kosoku.run_fuzzingclient(autobahn::EXCLUDED_GROUPS, server.addr, &outdir, 4, SERVER_RUN_TIMEOUT);
    println!("autobahn server: kosoku took {:.1?}", run.elapsed);

    let server_log = |server: &common::ServerProcess| {
        format!(
            "--- wsloop stderr (tail) ---\n{}\n--- end of wsloop stderr ---",
            common::tail(&server.stderr(), 16384)
        )
    };
    if run.timed_out {
        panic!(
            "kosoku did not finish within {SERVER_RUN_TIMEOUT:?}\n{}\n{}",
            run.describe(),
            server_log(&server)
        );
    }
    if let Ok(Some(status)) = server.child_mut().try_wait() {
        panic!(
            "the server exited during the Autobahn run ({status})\n{}\n{}",
            run.describe(),
            server_log(&server)
        );
    }

    let results = autobahn::read_results(&kosoku, &outdir, None)
        .unwrap_or_else(|e| panic!("no Autobahn results: {e}\n{}\n{}", run.describe(), server_log(&server)));
    autobahn::assert_conformance(
        "server",
        &outdir,
        &results,
        EXPECTED_CASES,
        &format!("{}\n{}", run.describe(), server_log(&server)),
    );
}
