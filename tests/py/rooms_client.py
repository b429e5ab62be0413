"""Python `websockets` against examples/rooms.rs.

Usage: python rooms_client.py ws://127.0.0.1:PORT TOKEN

Checks the refusals (401 without a token or with a wrong one, 404 elsewhere, each with the
server's explanation), the header and the query token, join and leave notices, that a message
reaches the others in its room and not its sender, and that nothing crosses rooms.
Prints one "ok ..." line per check; exits non-zero on the first failure.
"""

import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

WAIT = 15  # seconds for any single step


async def expect(ws, want, who):
    got = await asyncio.wait_for(ws.recv(), WAIT)
    if got != want:
        raise AssertionError(f"{who} got {got!r}, expected {want!r}")


async def refused(url, headers, status, body):
    try:
        async with connect(url, additional_headers=headers, open_timeout=WAIT):
            pass
    except InvalidStatus as e:
        got = (e.response.status_code, e.response.body)
        if got != (status, body):
            raise AssertionError(f"{url}: got {got!r}, expected {(status, body)!r}")
    else:
        raise AssertionError(f"{url} was accepted")


async def join(url, headers=None):
    return await connect(url, additional_headers=headers or {}, ping_interval=None, close_timeout=WAIT)


async def main(base, token):
    auth = {"Authorization": f"Bearer {token}"}
    no = b"missing or wrong token\n"
    await refused(f"{base}/rooms/a", {}, 401, no)
    print("ok no token: 401", flush=True)
    await refused(f"{base}/rooms/a", {"Authorization": "Bearer wrong"}, 401, no)
    await refused(f"{base}/rooms/a?token=wrong", {}, 401, no)
    print("ok wrong token: 401", flush=True)
    await refused(f"{base}/lobby", auth, 404, b"rooms are at /rooms/NAME (letters, digits, - and _)\n")
    print("ok other path: 404", flush=True)

    alice = await join(f"{base}/rooms/a?name=alice", auth)
    await expect(alice, "* alice joined a (1 here)", "alice")
    bob = await join(f"{base}/rooms/a?token={token}&name=bob")  # as a browser would
    await expect(bob, "* bob joined a (2 here)", "bob")
    await expect(alice, "* bob joined a (2 here)", "alice")
    carol = await join(f"{base}/rooms/b?name=carol", auth)
    await expect(carol, "* carol joined b (1 here)", "carol")
    print("ok header and query tokens; joins announced to the room", flush=True)

    await alice.send("hello room a")
    await expect(bob, "alice: hello room a", "bob")
    await bob.send("hi alice")
    # Had alice's message come back to her, it would be ahead of bob's.
    await expect(alice, "bob: hi alice", "alice")
    print("ok a message reaches the others in the room, not its sender", flush=True)

    dave = await join(f"{base}/rooms/b?name=dave", auth)
    await expect(dave, "* dave joined b (2 here)", "dave")
    # Had anything from room a reached carol, it would be ahead of this notice.
    await expect(carol, "* dave joined b (2 here)", "carol")
    await carol.send(b"\x00\x01binary")
    await expect(dave, b"\x00\x01binary", "dave")
    print("ok nothing crosses rooms; binary goes as it is", flush=True)

    await bob.close()
    await expect(alice, "* bob left a (1 here)", "alice")
    print("ok leave announced", flush=True)

    for ws in (alice, carol, dave):
        await ws.close()
        if ws.close_code != 1000:
            raise AssertionError(f"closed with {ws.close_code}")
    print("ok closed with 1000", flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 4 * WAIT))
