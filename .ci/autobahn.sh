#!/usr/bin/env bash
# WebSocket conformance: the Autobahn test suite's cases 1-7, 9 and 10 (12 and 13 are
# permessage-deflate, which the broker does not negotiate), driven by kosoku from PyPI,
# against the broker's /echo endpoint (debug.echo_endpoint = true), which runs through the
# same frame reader, limits and writer as /ws.
#
# limits.max_frame_bytes is raised to 16 MiB for the run: case 9 sends messages of up to
# 16 MiB, which the default (64 KiB) refuses with 1009 by design. Every case must end OK,
# NON-STRICT or INFORMATIONAL; the counts are printed, the reports are left in $AB_OUT.
#     bash .ci/autobahn.sh            (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."

KOSOKU_VERSION=0.1.0
py=python3
command -v python3.11 >/dev/null 2>&1 && py=python3.11
venv="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard-ci/kosoku-$KOSOKU_VERSION"
if [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
    touch "$venv/.installed"
fi

work="$(mktemp -d)"
AB_OUT="${AB_OUT:-$work/reports}"
port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
pid=""
stop() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$work/data"
}
trap stop EXIT

SWITCHBOARD_SERVER__LISTEN="127.0.0.1:$port" \
SWITCHBOARD_STORAGE__DIR="$work/data" \
SWITCHBOARD_DEBUG__ECHO_ENDPOINT=true \
SWITCHBOARD_LIMITS__MAX_FRAME_BYTES=16777216 \
SWITCHBOARD_LOGGING__LEVEL=warn \
    target/release/switchboard serve >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/health" >/dev/null

# About 15 s on 2 cores; bounded at 10 minutes. kosoku's own exit status counts
# NON-STRICT as a pass but is not relied on: the report is checked below.
timeout 600 "$venv/bin/kosoku" "ws://127.0.0.1:$port/echo" -x '11.*' -x '12.*' -x '13.*' \
    -o "$AB_OUT" || true
if ! kill -0 "$pid" 2>/dev/null; then
    echo "the broker exited during the run:" >&2
    tail -n 50 "$work/server.log" >&2
    exit 1
fi

"$py" - "$AB_OUT/index.json" <<'PY'
import json, sys
from collections import Counter

with open(sys.argv[1]) as f:
    index = json.load(f)
accepted = {"OK", "NON-STRICT", "INFORMATIONAL"}
counts, bad, groups = Counter(), [], set()
for cases in index.values():
    for case, r in cases.items():
        groups.add(int(case.split(".")[0]))
        counts[r["behavior"]] += 1
        if r["behavior"] not in accepted or r["behaviorClose"] not in accepted:
            bad.append(f'{case}: {r["behavior"]} (close {r["behaviorClose"]})')
        elif r["behavior"] != "OK":
            print(f'  {case}: {r["behavior"]}')
want = {1, 2, 3, 4, 5, 6, 7, 9, 10}
print(f"autobahn: {sum(counts.values())} cases, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
if not want <= groups:
    print(f"autobahn: case groups missing from the run: {sorted(want - groups)}", file=sys.stderr)
    sys.exit(1)
if bad:
    print("autobahn: failed cases:", *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
PY
