"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/). Run once when
the protocol changes: python3 tests/fuzz/seed.py (needs the msgpack package). The fuzzer
adds what it finds to the same folders while it runs; only these seeds are committed."""
import hashlib
import json
import os
import struct
import sys

import msgpack

here = os.path.dirname(os.path.abspath(__file__))
frames = [json.loads(l) for l in open(os.path.join(here, "seed_frames.txt")) if l.strip()]


def write(target, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def ws_frame(opcode, payload, fin=True, mask=b"\x11\x22\x33\x44"):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


for f in frames:
    text = json.dumps(f, separators=(",", ":")).encode()
    write("frame_json", text)
    write("frame_msgpack", msgpack.packb(f))
    write("ws_frames", ws_frame(0x1, text))
write("ws_frames", ws_frame(0x1, b"frag", fin=False) + ws_frame(0x9, b"ping") + ws_frame(0x0, b"ment"))
write("ws_frames", ws_frame(0x8, struct.pack(">H", 1000) + b"bye"))
write("ws_frames", ws_frame(0x2, bytes(300)))

records = [
    {"off": 1, "ts": 1700000000000, "to": ["alice", "bob"],
     "event": {"ev": "message", "conv": "dm:alice:bob", "seq": 1, "from": "alice",
               "device": "phone", "cid": "c1", "body": {"text": "hi"}}},
    {"off": 2, "ts": 1700000000001, "to": ["alice"],
     "event": {"ev": "presence", "user": "bob", "status": "online", "devices": 1,
               "last_seen": None}},
    {"off": 3, "ts": 1700000000002, "to": ["alice", "bob"],
     "event": {"ev": "message", "conv": "room:ops", "seq": 7, "from": "bob",
               "device": None, "cid": None, "body": "deploy done"}},
]
for r in records:
    write("stored_event", msgpack.packb(r))
print("seeds written", file=sys.stderr)
