"""Interop client for wsloop's tests, using the `websockets` library (asyncio API).

Usage: python interop_client.py ws://127.0.0.1:PORT/ echo|broadcast [deflate]

Checks text, binary, a 1 MiB message sent in 16 fragments, ping/pong and a clean close
with 1000. In broadcast mode a second connection checks that it receives the messages too.
With `deflate` (websockets offers permessage-deflate by default) it also checks that the
server agreed, and that 256 KiB of text round-trips compressed. Prints one "ok ..." line
per check; exits non-zero on the first failure.
"""

import asyncio
import os
import sys

from websockets.asyncio.client import connect

WAIT = 15  # seconds for any single step


async def main(url: str, mode: str, compression: str) -> None:
    async with connect(url, max_size=None, ping_interval=None, close_timeout=WAIT) as ws:
        others = []
        if mode == "broadcast":
            others.append(await connect(url, max_size=None, ping_interval=None, close_timeout=WAIT))

        async def expect(sent, what):
            for name, conn in [("sender", ws)] + [("listener", o) for o in others]:
                got = await asyncio.wait_for(conn.recv(), WAIT)
                if type(got) is not type(sent) or got != sent:
                    raise AssertionError(f"{what}: {name} got {type(got).__name__} of {len(got)}, "
                                         f"expected {type(sent).__name__} of {len(sent)}")
            print(f"ok {what}", flush=True)

        if compression == "deflate":
            for conn in [ws] + others:
                agreed = conn.response.headers.get("Sec-WebSocket-Extensions", "")
                if "permessage-deflate" not in agreed:
                    raise AssertionError(f"no permessage-deflate agreed: {agreed!r}")
            print(f"ok permessage-deflate agreed: {agreed}", flush=True)
            # Count what arrives compressed: wrap each connection's extension decoder.
            wire = {}
            for conn in [ws] + others:
                ext = conn.protocol.extensions[0]
                wire[id(conn)] = 0

                def decode(frame, *args, _orig=ext.decode, _key=id(conn), **kwargs):
                    if frame.rsv1:
                        wire[_key] += len(frame.data)
                    return _orig(frame, *args, **kwargs)

                ext.decode = decode
            words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
            long = " ".join(words[(i * 7919) % 8] for i in range(60000))[: 256 << 10]
            await ws.send(long)
            await expect(long, "256 KiB of text")
            for conn in [ws] + others:
                got = wire[id(conn)]
                if not 0 < got * 4 < len(long):
                    raise AssertionError(f"256 KiB of text arrived as {got} compressed bytes")
            print("ok 256 KiB of text came compressed", flush=True)

        text = "hello from python websockets \u2713 \u00e9"
        await ws.send(text)
        await expect(text, "text")

        blob = bytes(range(256)) * 4
        await ws.send(blob)
        await expect(blob, "binary")

        big = os.urandom(1 << 20)
        await ws.send([big[i:i + (64 << 10)] for i in range(0, len(big), 64 << 10)])
        await expect(big, "1 MiB in 16 fragments")

        pong = await ws.ping(b"python ping")
        await asyncio.wait_for(pong, WAIT)
        print("ok ping", flush=True)

        for o in others:
            await o.close(1000, "listener done")
        await ws.close(1000, "bye")
        if ws.close_code != 1000:
            raise AssertionError(f"close: the server answered {ws.close_code}, expected 1000")
        print("ok close 1000", flush=True)


if __name__ == "__main__":
    compression = sys.argv[3] if len(sys.argv) > 3 else ""
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2], compression), 4 * WAIT))
