//! A `Connection` of either role fed arbitrary bytes, cut at arbitrary points with time passing
//! between the pieces, must do exactly what it does with the bytes whole: same events, same
//! output, same state, same error. The plan picks the role, the message limit (small ones too),
//! heartbeat and idle timers, a local close first, the end of the stream last, and whether the
//! bytes follow a valid handshake (so the handshake-to-frames hand-over is cut too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsloop::proto::Role;
use wsloop_fuzz::{check_split, response_101, Ev, Input, REQUEST};

fuzz_target!(|input: Input<'_>| {
    let mut plan = input.plan;
    if plan.flags & 2 == 0 {
        check_split(&plan, false, input.stream);
        return;
    }
    let mut stream = match plan.role() {
        Role::Server => {
            plan.answer = 0; // the server accepts, without a subprotocol or an extension
            REQUEST.to_vec()
        }
        Role::Client => response_101(),
    };
    stream.extend_from_slice(input.stream);
    let whole = check_split(&plan, true, &stream);
    assert!(
        matches!(whole.events.first(), Some(Ev::Request(_, true) | Ev::Open(_))),
        "the handshake did not open: {:?}",
        whole.events.first()
    );
});
