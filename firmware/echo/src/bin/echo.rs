//! One WebSocket connection, server side, through wsloop's no_std core: the client's upgrade
//! request is answered with `accept`, its one text message is echoed with `send`, and all the
//! output goes to the UART.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use cortex_m_rt::entry;
use wsloop::proto::handshake::Answer;
use wsloop::proto::rand::NoRandom;
use wsloop::proto::{Config, Connection, Event};
use wsloop_firmware_echo as board;

#[entry]
fn main() -> ! {
    board::init_heap();
    let mut rx = board::receive();
    let cfg = Config::default();
    let mut conn = Connection::server(0);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < rx.len() {
        // An error has queued its answer (HTTP refusal or close frame) in `out`.
        let Ok((used, event)) = conn.read(&cfg, 0, &mut rx[pos..], &mut NoRandom, &mut out) else {
            break;
        };
        pos += used;
        match event {
            Some(Event::Request(request)) => {
                conn.accept(&request, &Answer::accept(), None, 0, &mut out);
            }
            Some(Event::Message(message)) => {
                let _ = conn.send(message.as_message(), &mut NoRandom, &mut out);
            }
            Some(_) => {}
            None if used == 0 => break,
            None => {}
        }
    }
    board::uart_write(&out);
    board::finish()
}
