#!/usr/bin/env python3
"""Call reject latency: how long from the callee sending `call.reject` until the caller
receives `call.rejected`, measured over N sequential calls on one machine (one process
clock, loopback only).

Each call: the caller sends `call.invite {to:[callee]}`; the callee waits for
`call.invite`, stamps t0 and sends `call.reject`; the caller's reader stamps t1 when
`call.rejected` for that call arrives. Both sides then wait for `call.ended` so every call
is over before the next starts. Every frame is stamped by a reader task the moment it is
decoded, so the figure is the broker's relay latency plus one loopback hop each way and
the client's JSON decode.

Setup (a venv under /tmp):
    python3 -m venv /tmp/calls-venv
    /tmp/calls-venv/bin/pip install websockets==17.4 PyJWT==2.15.1

Run against a release broker:
    cargo build --release
    SWITCHBOARD_SERVER__LISTEN=127.0.0.1:18282 SWITCHBOARD_STORAGE__DIR=$(mktemp -d) \
        target/release/switchboard serve &
    /tmp/calls-venv/bin/python benches/call_reject.py --url ws://127.0.0.1:18282/ws

The token secret defaults to the embedded development secret; pass --secret (or set
SWITCHBOARD_AUTH__JWT_SECRET) when the broker runs with another one.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid

import jwt
import websockets

DEV_SECRET = "switchboard-dev-secret-change-me"
WAIT_S = 5.0  # longest wait for any one frame


def token(secret: str, user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "exp": now + 3600, "iat": now}, secret, algorithm="HS256")


class Peer:
    """One WebSocket session whose reader stamps every frame on arrival."""

    def __init__(self, ws):
        self.ws = ws
        self.queue: asyncio.Queue = asyncio.Queue()
        self.next_id = 100
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, secret: str, user: str, device: str) -> "Peer":
        ws = await asyncio.wait_for(
            websockets.connect(
                url,
                subprotocols=["switchboard.v1.json"],
                compression=None,
                max_size=1 << 20,
                open_timeout=WAIT_S,
            ),
            WAIT_S,
        )
        p = cls(ws)
        await ws.send(json.dumps({"op": "hello", "id": 1, "token": token(secret, user),
                                  "device": device, "platform": "desktop"}))
        reply, _ = await p.until(lambda f: f.get("re") == 1)
        if not reply.get("ok"):
            raise SystemExit(f"hello failed: {reply}")
        await p.until(lambda f: f.get("ev") == "presence.snapshot")
        return p

    async def _read(self):
        async for raw in self.ws:
            t = time.perf_counter()
            self.queue.put_nowait((json.loads(raw), t))

    async def send(self, op: str, **fields) -> int:
        self.next_id += 1
        await self.ws.send(json.dumps({"op": op, "id": self.next_id, **fields}))
        return self.next_id

    async def until(self, pred):
        """The first frame matching `pred` (others are dropped) and its arrival time."""
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching frame within %.1f s" % WAIT_S)
            frame, t = await asyncio.wait_for(self.queue.get(), left)
            if frame.get("re") is not None and frame.get("ok") is False:
                raise SystemExit(f"request failed: {frame}")
            if pred(frame):
                return frame, t

    async def close(self):
        await self.ws.close()
        self.reader.cancel()


def pct(sorted_ms, p):
    i = min(len(sorted_ms) - 1, max(0, round(p / 100 * len(sorted_ms)) - 1))
    return sorted_ms[i]


async def one_call(caller: Peer, callee: Peer, callee_user: str) -> float:
    rid = await caller.send("call.invite", to=[callee_user], media="audio", ring_ms=30000)
    reply, _ = await caller.until(lambda f: f.get("re") == rid)
    call = reply["call"]
    await callee.until(lambda f: f.get("ev") == "call.invite" and f.get("call") == call)
    t0 = time.perf_counter()
    await callee.send("call.reject", call=call, reason="declined")
    _, t1 = await caller.until(lambda f: f.get("ev") == "call.rejected" and f.get("call") == call)
    await caller.until(lambda f: f.get("ev") == "call.ended" and f.get("call") == call)
    await callee.until(lambda f: f.get("ev") == "call.ended" and f.get("call") == call)
    return (t1 - t0) * 1000.0


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:18282/ws")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--secret", default=os.environ.get("SWITCHBOARD_AUTH__JWT_SECRET", DEV_SECRET))
    args = ap.parse_args()
    if not args.url.startswith("ws://127.0.0.1:") and not args.url.startswith("ws://localhost:"):
        raise SystemExit("loopback only: --url must be ws://127.0.0.1:<port>/ws")

    run = uuid.uuid4().hex[:8]
    caller_user, callee_user = f"bench-caller-{run}", f"bench-callee-{run}"
    caller = await Peer.connect(args.url, args.secret, caller_user, "c1")
    callee = await Peer.connect(args.url, args.secret, callee_user, "e1")

    for _ in range(args.warmup):
        await one_call(caller, callee, callee_user)
    started = time.perf_counter()
    samples = [await one_call(caller, callee, callee_user) for _ in range(args.calls)]
    elapsed = time.perf_counter() - started
    await caller.close()
    await callee.close()

    s = sorted(samples)
    print(f"call.reject -> call.rejected (callee send to caller receive), {len(s)} calls "
          f"after {args.warmup} warm-up, sequential, one connection each side")
    print(f"  p50 {pct(s, 50):.3f} ms   p90 {pct(s, 90):.3f} ms   p99 {pct(s, 99):.3f} ms   "
          f"max {s[-1]:.3f} ms   (min {s[0]:.3f}, mean {statistics.fmean(s):.3f})")
    print(f"  {len(s) / elapsed:.0f} whole calls/s (invite, ring, reject, ended)")
    print(f"  command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(), 600))
    except KeyboardInterrupt:
        sys.exit(130)
