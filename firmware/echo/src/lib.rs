//! What both images share: the heap, the input "received" from a client, the UART the output
//! goes to, the panic handler and the end of the program. Only `bin/echo.rs` calls wsloop, so
//! the difference between the two images is what the protocol core adds.
#![no_std]

use core::ptr::{read_volatile, write_volatile};

use embedded_alloc::LlffHeap as Heap;

/// What a client sends: the upgrade request of RFC 6455 §1.2 and the masked "Hello" text frame
/// of §5.7, as one read would deliver them (tests/firmware.rs checks the output against the
/// same file).
pub const INPUT: &[u8] = include_bytes!("input.bin");

/// The heap: 2 KiB, about three times the echo's high-water mark (the request's copy of its
/// head and header index, and the output), which the `qemu` build reports and
/// tests/firmware.rs keeps under half of it. A request head split across reads is also
/// buffered while it arrives, so a firmware that takes larger requests sizes its heap from
/// `Config::max_head`.
const HEAP_SIZE: usize = 2048;

#[cfg(not(feature = "qemu"))]
#[global_allocator]
static HEAP: Heap = Heap::empty();

#[cfg(feature = "qemu")]
#[global_allocator]
static HEAP: counting::Counting = counting::Counting::new();

/// Gives the allocator its memory: a static array in `.bss`. Call once, first.
pub fn init_heap() {
    use core::mem::MaybeUninit;
    static mut MEMORY: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
    // SAFETY: called once before any allocation; nothing else touches MEMORY.
    unsafe { HEAP.init(&raw mut MEMORY as usize, HEAP_SIZE) }
}

/// The received bytes in a receive buffer, read one by one with volatile reads as from a
/// peripheral: to the compiler they are unknown input, so nothing is computed ahead.
pub fn receive() -> [u8; INPUT.len()] {
    let mut rx = [0u8; INPUT.len()];
    for (i, b) in rx.iter_mut().enumerate() {
        // SAFETY: `i` is within INPUT, which is as long as `rx`.
        *b = unsafe { read_volatile(INPUT.as_ptr().add(i)) };
    }
    rx
}

/// CMSDK APB UART0 of the MPS2 boards (QEMU's `-serial` 0).
const UART0: usize = 0x4000_4000;
const UART_DATA: *mut u32 = UART0 as *mut u32;
const UART_STATE: *const u32 = (UART0 + 0x4) as *const u32;
const UART_CTRL: *mut u32 = (UART0 + 0x8) as *mut u32;
const UART_BAUDDIV: *mut u32 = (UART0 + 0x10) as *mut u32;

/// Writes `bytes` to the UART. Volatile device writes: the compiler must produce every byte,
/// so none of the work that computed them can be optimised away.
pub fn uart_write(bytes: &[u8]) {
    // SAFETY: the UART's registers on this board; nothing else drives it.
    unsafe {
        write_volatile(UART_BAUDDIV, 16);
        write_volatile(UART_CTRL, 1); // transmitter on
        for &b in bytes {
            while read_volatile(UART_STATE) & 1 != 0 {} // transmit buffer full
            write_volatile(UART_DATA, u32::from(b));
        }
    }
}

/// The end of the program: sleep forever (with `qemu`: report heap and stack use and exit).
pub fn finish() -> ! {
    #[cfg(feature = "qemu")]
    {
        cortex_m_semihosting::hprintln!(
            "heap peak {} of {} bytes, stack peak {} bytes",
            HEAP.peak(),
            HEAP_SIZE,
            counting::stack_used()
        );
        cortex_m_semihosting::debug::exit(cortex_m_semihosting::debug::EXIT_SUCCESS);
    }
    loop {
        cortex_m::asm::wfi();
    }
}

#[cfg(not(feature = "qemu"))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}

#[cfg(feature = "qemu")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    cortex_m_semihosting::hprintln!("panic: {}", info);
    cortex_m_semihosting::debug::exit(cortex_m_semihosting::debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

/// Heap and stack high-water marks, for the emulator run only.
#[cfg(feature = "qemu")]
mod counting {
    use core::alloc::{GlobalAlloc, Layout};
    use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use super::Heap;

    /// The heap, noting the most it ever had in use (allocator rounding included).
    pub struct Counting {
        heap: Heap,
        peak: AtomicUsize,
    }

    impl Counting {
        pub const fn new() -> Self {
            Counting {
                heap: Heap::empty(),
                peak: AtomicUsize::new(0),
            }
        }

        pub unsafe fn init(&self, start: usize, size: usize) {
            unsafe { self.heap.init(start, size) }
        }

        pub fn peak(&self) -> usize {
            self.peak.load(Relaxed)
        }
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { self.heap.alloc(layout) };
            self.peak.fetch_max(self.heap.used(), Relaxed);
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { self.heap.dealloc(ptr, layout) }
        }
    }

    /// Bytes of stack ever used: cortex-m-rt's `paint-stack` filled it with 0xCCCCCCCC at
    /// reset; the deepest word changed since marks the high-water line.
    pub fn stack_used() -> usize {
        unsafe extern "C" {
            static _stack_start: u32;
            static _stack_end: u32;
        }
        let top = &raw const _stack_start as usize;
        let mut at = &raw const _stack_end;
        // SAFETY: the words between the two linker symbols are the stack, all mapped RAM.
        unsafe {
            while (at as usize) < top && core::ptr::read_volatile(at) == cortex_m_rt::STACK_PAINT_VALUE {
                at = at.add(1);
            }
        }
        top - at as usize
    }
}
