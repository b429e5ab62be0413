#!/usr/bin/env python3
"""Writes the seed corpus: fuzz/corpus/<target>/<name>, small real inputs.

Inputs of the connection and handshake targets start with the 12-byte plan of
fuzz/src/lib.rs (`Plan`, little-endian fields in order); frame_header takes raw bytes.
Run from anywhere: python3 fuzz/make_seeds.py
"""

import base64
import hashlib
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

# Plan flags.
CLIENT, HANDSHAKE, LOCAL_CLOSE, EOF, WRAP, LONG = 1, 2, 4, 8, 0x10, 0x20
MSG_AS_IS, MSG_TINY = 0x40, 0x80


def plan(flags=0, max_message=0, max_head=0, cuts=0, seed=1, answer=0, timers=0):
    return struct.pack("<BHHBIBB", flags, max_message, max_head, cuts, seed, answer, timers)


def mask(payload, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame(opcode, payload=b"", fin=True, key=None, rsv=0):
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    m = 0x80 if key is not None else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if key is not None:
        return head + bytes(key) + mask(payload, key)
    return head + payload


KEY = (0x37, 0xFA, 0x21, 0x3D)  # RFC 6455 §5.7


def cf(opcode, payload=b"", fin=True, rsv=0):
    """A client's frame (masked)."""
    return frame(opcode, payload, fin, KEY, rsv)


def sf(opcode, payload=b"", fin=True, rsv=0):
    """A server's frame (unmasked)."""
    return frame(opcode, payload, fin, None, rsv)


def close(code, reason=b""):
    return struct.pack(">H", code) + reason


CLIENT_KEY = base64.b64encode(bytes(range(1, 17))).decode()


def accept(key):
    guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1((key + guid).encode()).digest()).decode()


RFC_REQUEST = (
    b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def response(extra=b"", key=CLIENT_KEY):
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept(key).encode() + b"\r\n" + extra + b"\r\n"
    )


def long_header(f, length):
    """A binary frame header with a 64-bit length (masked for a client's frames)."""
    if f is cf:
        return bytes([0x82, 0xFF]) + length + bytes(KEY)
    return bytes([0x82, 0x7F]) + length


def streams(f):
    """Frame streams for a peer that sends frames made by `f` (cf or sf)."""
    return {
        "hello": f(0x1, b"Hello"),
        "fragmented-hello": f(0x1, b"Hel", fin=False) + f(0x0, b"lo"),
        "fragmented-binary-empty-parts": f(0x2, b"", fin=False) + f(0x0, b"ab", fin=False) + f(0x0, b""),
        "ping-pong": f(0x9, b"Hello") + f(0xA, b"Hello"),
        "ping-inside-fragments": f(0x1, b"a", fin=False) + f(0x9, b"p") + f(0x0, b"b"),
        "binary-256": f(0x2, bytes(range(256))),
        "binary-64k-cut": f(0x2, bytes(65536))[:200],
        "close-1000-bye": f(0x8, close(1000, b"bye")) + f(0x1, b"after"),
        "close-empty": f(0x8),
        "close-1-byte": f(0x8, b"\x03"),
        "close-bad-code": f(0x8, close(1005)),
        "close-bad-reason": f(0x8, close(1000, b"\xff")),
        "utf8-split-char": f(0x1, "é€𝄞".encode()[:4], fin=False) + f(0x0, "é€𝄞".encode()[4:]),
        "utf8-invalid": f(0x1, b"ok\xc3\x28"),
        "utf8-truncated": f(0x1, b"ab\xe2\x82"),
        "utf8-invalid-fragment": f(0x1, b"\xce", fin=False) + f(0x0, b"\xba\xe1\xbd\xb9\xcf\x83\xff"),
        "continuation-first": f(0x0, b"x"),
        "new-message-inside": f(0x1, b"a", fin=False) + f(0x1, b"b"),
        "reserved-bits": f(0x1, b"x", rsv=0x40),
        "reserved-opcode": f(0x3, b""),
        "fragmented-ping": f(0x9, b"", fin=False),
        "oversized-length": long_header(f, b"\x7f" + b"\xff" * 7),
        "length-2^63": long_header(f, b"\x80" + bytes(7)),
        "control-126": bytes([0x89, 0xFE if f is cf else 0x7E, 0, 126]),
    }


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as fh:
        fh.write(data)


def main():
    # frame_header: raw headers and frames.
    rfc = {
        "rfc-unmasked-hello": bytes([0x81, 0x05]) + b"Hello",
        "rfc-masked-hello": bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58]),
        "rfc-fragment-1": bytes([0x01, 0x03]) + b"Hel",
        "rfc-fragment-2": bytes([0x80, 0x02]) + b"lo",
        "rfc-ping": bytes([0x89, 0x05]) + b"Hello",
        "rfc-masked-pong": bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58]),
        "rfc-binary-256-header": bytes([0x82, 0x7E, 0x01, 0x00]),
        "rfc-binary-64k-header": bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]),
        "masked-64bit-header": bytes([0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4]),
        "non-minimal-length": bytes([0x82, 0x7E, 0x00, 0x05]) + b"Hello",
        "reserved-bits": bytes([0xC1, 0x00]),
        "reserved-opcode": bytes([0x8B, 0x00]),
        "fragmented-control": bytes([0x09, 0x00]),
        "control-too-long": bytes([0x89, 0x7E, 0x00, 0x7E]),
        "length-overflow": bytes([0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        "close-1000": bytes([0x88, 0x02, 0x03, 0xE8]),
    }
    for name, data in rfc.items():
        write("frame_header", name, data)

    # connection_split: open connections of both roles, and after a handshake.
    for role, f, tag in ((0, cf, "server"), (CLIENT, sf, "client")):
        for name, data in streams(f).items():
            write("connection_split", f"{tag}-{name}", plan(flags=role, cuts=4, seed=7) + data)
        hello = streams(f)["fragmented-hello"] + streams(f)["ping-pong"]
        write("connection_split", f"{tag}-handshake-then-frames", plan(flags=role | HANDSHAKE, cuts=6, seed=3) + hello)
        write("connection_split", f"{tag}-tiny-max-message", plan(flags=role | MSG_TINY, max_message=3, cuts=3) + hello)
        write("connection_split", f"{tag}-local-close", plan(flags=role | LOCAL_CLOSE, cuts=2) + hello + f(0x8, close(1000)))
        write("connection_split", f"{tag}-timers", plan(flags=role | LONG | WRAP, cuts=5, seed=11, timers=0x21) + hello)
        write("connection_split", f"{tag}-eof-mid-frame", plan(flags=role | EOF, cuts=1) + f(0x2, b"abcdef")[:5])

    # server_handshake: requests, good and bad, some followed by frames.
    reqs = {
        "rfc": RFC_REQUEST,
        "rfc-then-hello": RFC_REQUEST + cf(0x1, b"Hello"),
        "plain-get": b"GET /index.html?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
        "head": b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
        "post-upgrade": RFC_REQUEST.replace(b"GET", b"POST"),
        "http-1.0": RFC_REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"),
        "http-2.0": RFC_REQUEST.replace(b"HTTP/1.1", b"HTTP/2.0"),
        "version-8": RFC_REQUEST.replace(b"Version: 13", b"Version: 8"),
        "short-key": RFC_REQUEST.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="),
        "two-hosts": RFC_REQUEST.replace(b"Host: server.example.com\r\n", b"Host: a\r\nHost: b\r\n"),
        "no-host": RFC_REQUEST.replace(b"Host: server.example.com\r\n", b""),
        "extensions": RFC_REQUEST.replace(
            b"Origin:", b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nOrigin:"
        ),
        "bare-lf": RFC_REQUEST.replace(b"\r\n", b"\n"),
        "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        "many-headers": RFC_REQUEST.replace(b"Origin:", b"".join(b"X-%d: y\r\n" % i for i in range(70)) + b"Origin:"),
    }
    for i, (name, data) in enumerate(reqs.items()):
        answer = (i * 37) & 0xFF
        write("server_handshake", name, plan(cuts=i % 5, seed=i + 1, answer=answer) + data)
    write("server_handshake", "rfc-small-max-head", plan(max_head=1, cuts=3, answer=1) + RFC_REQUEST)

    # client_handshake: answers to the client whose key is known.
    resps = {
        "101": response(),
        "101-then-hello": response() + sf(0x1, b"Hello") + sf(0x8, close(1000)),
        "101-chat": response(b"Sec-WebSocket-Protocol: chat\r\n"),
        "101-deflate": response(b"Sec-WebSocket-Extensions: permessage-deflate\r\n"),
        "101-wrong-accept": response(key="dGhlIHNhbXBsZSBub25jZQ=="),
        "101-no-upgrade": response().replace(b"Upgrade: websocket\r\n", b""),
        "404-body": b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot here\r\n",
        "403-cut-body": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nno",
        "truncated": response()[:40],
        "garbage": b"SSH-2.0-OpenSSH_9.2\r\n",
    }
    for i, (name, data) in enumerate(resps.items()):
        write("client_handshake", name, plan(flags=EOF if i % 2 else 0, cuts=i % 4, seed=i + 1, answer=i & 3) + data)


if __name__ == "__main__":
    main()
