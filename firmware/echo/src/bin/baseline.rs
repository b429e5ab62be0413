//! The same image without the protocol core: the received bytes are copied to a heap buffer
//! that grows as they arrive, written to the UART, and the buffer is freed. So the allocator
//! is here in full (allocate, grow, free) and `echo` minus this is what wsloop adds.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use cortex_m_rt::entry;
use wsloop_firmware_echo as board;

#[entry]
fn main() -> ! {
    board::init_heap();
    let rx = board::receive();
    let mut out = Vec::new();
    for piece in rx.chunks(64) {
        out.extend_from_slice(piece);
    }
    board::uart_write(&out);
    drop(out);
    board::finish()
}
