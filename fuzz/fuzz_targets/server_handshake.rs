//! The server's side of the opening handshake: `parse_request` on arbitrary bytes, and a server
//! `Connection` reading them (cut into pieces and whole) and answering as the plan says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsloop::proto::handshake::parse_request;
use wsloop_fuzz::{check_request, check_split, Input};

fuzz_target!(|input: Input<'_>| {
    let stream = input.stream;
    match parse_request(stream) {
        Ok(Some((req, n))) => {
            assert!(0 < n && n <= stream.len(), "used {n} of {}", stream.len());
            check_request(&req);
            // The head ends where the parser said: on its own it parses the same, and any
            // shorter prefix is incomplete.
            assert_eq!(parse_request(&stream[..n]), Ok(Some((req, n))));
            let k = input.plan.seed as usize % n;
            assert_eq!(parse_request(&stream[..k]), Ok(None), "prefix of {k} bytes");
        }
        Ok(None) => {}
        Err(r) => assert!((400..600).contains(&r.status), "{r}"),
    }
    check_split(&input.plan.with_role_server(), true, stream);
});
