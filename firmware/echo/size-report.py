#!/usr/bin/env python3
"""What the protocol core adds to the firmware image, and where it goes.

Run after `cargo build --release` in this directory:

    python3 size-report.py

Prints the section sizes of the `echo` and `baseline` images (the difference is what wsloop
adds) and a breakdown of `.text` by part of the core. Every 2-byte step of `.text` is looked up
with `llvm-symbolizer --inlining` (Debian package `llvm`) and charged to the innermost inlined
frame outside core/alloc/compiler-builtins, so a bounds check or `Vec` growth inlined into
wsloop counts as wsloop; only out-of-line standard-library code shows under its own name.
The release profile keeps line tables in the ELF for this (they are not loaded to flash).
"""
import collections
import os
import shutil
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "target", "thumbv7em-none-eabihf", "release")

# First match wins: (substring of the source path or function name, part).
PARTS = [
    ("/httparse-", "handshake: HTTP parsing (httparse)"),
    ("src/proto/handshake/key.rs", "handshake: accept key (SHA-1, base64)"),
    ("/sha1_smol-", "handshake: accept key (SHA-1, base64)"),
    ("/base64-", "handshake: accept key (SHA-1, base64)"),
    ("src/proto/handshake/", "handshake: request checks and answers"),
    ("src/proto/conn.rs", "Connection (state, reading, events)"),
    ("src/proto/frame.rs", "frame codec"),
    ("src/proto/mask.rs", "masking"),
    ("src/proto/utf8.rs", "UTF-8 (split messages)"),
    ("src/proto/rand.rs", "random source"),
    ("library/core/src/str/", "core: str::from_utf8"),
    ("compiler-builtins", "compiler-builtins: memcpy, memset, memcmp"),
    ("compiler_builtins", "compiler-builtins: memcpy, memset, memcmp"),
    ("library/alloc/", "alloc: Vec, Box growth and copies"),
    ("library/core/", "core: other"),
    ("/linked_list_allocator-", "allocator"),
    ("/embedded-alloc-", "allocator"),
    ("/critical-section-", "allocator"),
    ("/cortex-m", "cortex-m runtime"),
    ("firmware/echo/src/", "firmware (main, UART, heap set-up)"),
]
STD = ("library/core/", "library/alloc/", "compiler-builtins", "compiler_builtins")


def sections(path):
    """Section name -> size, from the ELF32 section headers."""
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
    headers = [struct.unpack_from("<IIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for name, _type, _flags, addr, _offset, size in headers:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name:end].decode()] = (addr, size)
    return out


def tool(name):
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found (Debian: apt-get install llvm)")
    return found


def text_by_part(path):
    addr, size = sections(path)[".text"]
    steps = list(range(addr, addr + size, 2))
    query = "".join(f"0x{a:x}\n" for a in steps)
    out = subprocess.run(
        [tool("llvm-symbolizer"), f"--obj={path}", "--inlining", "--output-style=LLVM"],
        input=query, capture_output=True, text=True, check=True,
    ).stdout
    parts = collections.Counter()
    for block in out.split("\n\n")[: len(steps)]:
        lines = [l for l in block.splitlines() if l.strip()]
        frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i in range(0, len(lines), 2)]
        outside = [f for f in frames if not any(s in f[1] for s in STD) and not f[1].startswith("??")]
        function, location = (outside or frames or [("??", "??")])[0]
        where = location + " " + function
        parts[next((p for key, p in PARTS if key in where), "other")] += 2
    return parts


def main():
    echo, baseline = os.path.join(IMAGES, "echo"), os.path.join(IMAGES, "baseline")
    for p in (echo, baseline):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: run `cargo build --release` in {HERE} first")
    se, sb = sections(echo), sections(baseline)
    print("| section | echo | baseline | added by wsloop |")
    print("|---|---:|---:|---:|")
    for name in (".vector_table", ".text", ".rodata", ".data", ".bss"):
        e, b = se.get(name, (0, 0))[1], sb.get(name, (0, 0))[1]
        print(f"| `{name}` | {e:,} | {b:,} | {e - b:,} |")
    pe, pb = text_by_part(echo), text_by_part(baseline)
    print()
    print("| `.text` by part | echo | baseline | added |")
    print("|---|---:|---:|---:|")
    for part in sorted(set(pe) | set(pb), key=lambda k: -(pe[k] - pb[k])):
        print(f"| {part} | {pe[part]:,} | {pb[part]:,} | {pe[part] - pb[part]:,} |")
    print(f"| total | {sum(pe.values()):,} | {sum(pb.values()):,} | {sum(pe.values()) - sum(pb.values()):,} |")


if __name__ == "__main__":
    main()
