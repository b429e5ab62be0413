//! The client's side of the opening handshake: `parse_response` on arbitrary bytes, and a
//! client `Connection` (whose key is known) reading them, cut into pieces and whole, then the
//! end of the stream if the plan says so.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsloop::proto::handshake::parse_response;
use wsloop_fuzz::{check_split, Input, CLIENT_KEY};

fuzz_target!(|input: Input<'_>| {
    let plan = input.plan.with_role_client();
    let stream = input.stream;
    let req = plan.client_request();
    let offered_ext = req.extensions.is_some();
    let open = parse_response(stream, CLIENT_KEY, &req.protocols, offered_ext, false);
    let at_eof = parse_response(stream, CLIENT_KEY, &req.protocols, offered_ext, true);
    match &open {
        Ok(Some((resp, n))) => {
            assert!(*n <= stream.len());
            if let Some(p) = &resp.protocol {
                assert!(req.protocols.contains(p));
            }
            assert!(resp.extensions.is_none() || offered_ext);
            // Knowing that nothing more comes changes nothing about a complete answer.
            assert_eq!(&at_eof, &open);
        }
        // Nor about a refusal.
        Err(_) => assert_eq!(&at_eof, &open),
        // Something incomplete is an error once the stream has ended.
        Ok(None) => assert!(at_eof.is_err(), "{at_eof:?}"),
    }
    check_split(&plan, true, stream);
});
