#!/usr/bin/env python3
"""Group-commit load test for a running Switchboard broker (loopback only).

What it does
------------
Opens CONNS WebSocket sessions to ws://127.0.0.1:PORT/ws as users u0..u{CONNS-1}
(HS256 tokens signed with the development secret, claims `sub` + `exp`), sends
`{"op":"hello","id":1,"token":...,"device":"d1"}` on each and waits for the
`{"ev":"sync"}` frame. When every session is synced, all of them start at once and each
pipelines PER_CONN `send` frames

    {"op":"send","id":N,"to":"peerX","body":{"i":N},"cid":"cN"}

keeping at most WINDOW of them unanswered. It records the wall time from the start until
the last ack, the ack rate, and the ack round trip of every send (send -> `{"re":N}`),
then reads `GET /metrics` before and after the run and reports, for the run alone
(after - before):

- switchboard_batch_events:  events per committed batch (= per flush with
  durability = "flush"), mean = sum/count, plus histogram-bucket quantiles;
- switchboard_flush_seconds: append + flush latency per batch, mean and quantiles.

Usage
-----
    python3 -m venv /tmp/sbbench-venv
    /tmp/sbbench-venv/bin/pip install websockets==17.4 PyJWT==2.15.1
    SWITCHBOARD_SERVER__LISTEN=127.0.0.1:18080 SWITCHBOARD_STORAGE__DIR=$(mktemp -d) \
        target/release/switchboard serve &
    /tmp/sbbench-venv/bin/python benches/group_commit.py --conns 50 --per-conn 400 --window 32
    /tmp/sbbench-venv/bin/python benches/group_commit.py --conns 1 --per-conn 400 --window 32

Bounds: every loop is bounded by PER_CONN sends/acks; every receive has a timeout
(--timeout seconds), so a stuck broker ends the run with an error instead of hanging.
Only 127.0.0.1 is ever contacted. Users are prefixed with --run (default: a timestamp)
so repeated runs against one broker never collide on cids (which would be answered as
duplicates without being appended).
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.request

import jwt
import websockets

SECRET_DEFAULT = "switchboard-dev-secret-change-me"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--per-conn", type=int, default=400)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--secret", default=SECRET_DEFAULT)
    p.add_argument("--timeout", type=float, default=30.0, help="per-receive timeout, s")
    p.add_argument("--run", default=None, help="user-id prefix (default: r<unix time>)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    a = p.parse_args()
    if not (1 <= a.conns <= 1000 and 1 <= a.per_conn <= 100000 and 1 <= a.window <= 1024):
        p.error("conns 1..1000, per-conn 1..100000, window 1..1024")
    return a


# ----- metrics --------------------------------------------------------------------------

def scrape(port):
    """Histogram series of /metrics: {name: {"sum", "count", "buckets": {le: n}}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        name, _, labels = name_labels.partition("{")
        for base in ("switchboard_batch_events", "switchboard_flush_seconds"):
            h = out.setdefault(base, {"sum": 0.0, "count": 0.0, "buckets": {}, "quantiles": {}})
            if name == base + "_sum":
                h["sum"] = v
            elif name == base + "_count":
                h["count"] = v
            elif name == base + "_bucket":
                le = labels.split('le="', 1)[1].split('"', 1)[0]
                h["buckets"][le] = v
            elif name == base and "quantile=" in labels:
                q = labels.split('quantile="', 1)[1].split('"', 1)[0]
                h["quantiles"][q] = v
    return out


def delta(before, after):
    d = {}
    for k, a in after.items():
        b = before.get(k, {"sum": 0.0, "count": 0.0, "buckets": {}, "quantiles": {}})
        d[k] = {
            "sum": a["sum"] - b["sum"],
            "count": a["count"] - b["count"],
            "buckets": {le: n - b["buckets"].get(le, 0.0) for le, n in a["buckets"].items()},
            # Summary quantiles (if the exporter emits them) cannot be subtracted; they
            # are reported as the exporter gives them (whole process lifetime/window).
            "quantiles": a["quantiles"],
        }
    return d


def bucket_quantile(buckets, q):
    """Upper bound of the bucket holding quantile q (Prometheus-style, no interpolation)."""
    items = sorted(((float("inf") if le == "+Inf" else float(le), n) for le, n in buckets.items()))
    if not items or items[-1][1] <= 0:
        return None
    target = q * items[-1][1]
    for le, n in items:
        if n >= target:
            return le
    return items[-1][0]


# ----- load -----------------------------------------------------------------------------

def token(secret, user):
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


async def recv_json(ws, timeout):
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(raw)


async def session(i, a, prefix, ready, start, results):
    user = f"{prefix}u{i}"
    peer = f"{prefix}peer{i}"
    url = f"ws://127.0.0.1:{a.port}/ws"
    async with websockets.connect(url, max_queue=None, open_timeout=a.timeout) as ws:
        await ws.send(json.dumps({"op": "hello", "id": 1, "token": token(a.secret, user),
                                  "device": "d1"}))
        # hello reply, (replay), then {"ev":"sync"}; bounded by a frame count.
        for _ in range(10000):
            f = await recv_json(ws, a.timeout)
            if f.get("re") == 1 and not f.get("ok"):
                raise RuntimeError(f"{user}: hello refused: {f}")
            if f.get("ev") == "sync":
                break
        else:
            raise RuntimeError(f"{user}: no sync frame")
        ready.release()
        await start.wait()

        sent_at = {}
        rtts = []
        errors = 0
        next_id = 2
        last_id = 1 + a.per_conn
        acked = 0
        # Each pass either sends (bounded by per_conn) or receives one frame; frames other
        # than replies (our own message fan-out) are bounded by per_conn too.
        for _ in range(4 * a.per_conn + 100):
            if acked >= a.per_conn:
                break
            while next_id <= last_id and len(sent_at) < a.window:
                n = next_id
                sent_at[n] = time.perf_counter()
                await ws.send(json.dumps({"op": "send", "id": n, "to": peer,
                                          "body": {"i": n}, "cid": f"c{n}"}))
                next_id += 1
            f = await recv_json(ws, a.timeout)
            re = f.get("re")
            if re is None or re not in sent_at:
                continue
            rtts.append(time.perf_counter() - sent_at.pop(re))
            acked += 1
            if not f.get("ok") or f.get("dup"):
                errors += 1
        else:
            raise RuntimeError(f"{user}: loop bound hit with {acked} acks")
        results.append((time.perf_counter(), acked, errors, rtts))


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


async def main():
    a = parse_args()
    prefix = a.run if a.run is not None else f"r{int(time.time())}"
    before = scrape(a.port)
    ready = asyncio.Semaphore(0)
    start = asyncio.Event()
    results = []
    tasks = [asyncio.create_task(session(i, a, prefix, ready, start, results))
             for i in range(a.conns)]
    for _ in range(a.conns):
        await asyncio.wait_for(ready.acquire(), a.timeout)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    t_end = max(r[0] for r in results)
    elapsed = t_end - t0
    after = scrape(a.port)
    d = delta(before, after)

    acks = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    rtts = sorted(x for r in results for x in r[3])
    be, fs = d["switchboard_batch_events"], d["switchboard_flush_seconds"]
    summary = {
        "conns": a.conns, "per_conn": a.per_conn, "window": a.window,
        "acks": acks, "not_ok_or_dup": errors,
        "elapsed_s": round(elapsed, 3),
        "acks_per_s": round(acks / elapsed, 1),
        "ack_rtt_ms": {q: round(pct(rtts, p) * 1e3, 3)
                       for q, p in (("p50", .5), ("p90", .9), ("p99", .99), ("max", 1.0))},
        "batches": int(be["count"]),
        "events_in_batches": int(be["sum"]),
        "batch_events_mean": round(be["sum"] / be["count"], 2) if be["count"] else None,
        "batch_events_bucket_p50": bucket_quantile(be["buckets"], .5),
        "batch_events_bucket_p99": bucket_quantile(be["buckets"], .99),
        "flush_ms_mean": round(fs["sum"] / fs["count"] * 1e3, 3) if fs["count"] else None,
        "flush_ms_bucket_p50": (lambda v: v and v * 1e3)(bucket_quantile(fs["buckets"], .5)),
        "flush_ms_bucket_p99": (lambda v: v and v * 1e3)(bucket_quantile(fs["buckets"], .99)),
        "summary_quantiles": {"batch_events": be["quantiles"], "flush_seconds": fs["quantiles"]},
    }
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:24} {v}")
    return 0 if errors == 0 and acks == a.conns * a.per_conn else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
