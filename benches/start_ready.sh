#!/usr/bin/env bash
# Start-to-ready time of the release broker on an existing data directory (issue 7).
#
#   benches/start_ready.sh DATA_DIR [snapshot|nosnapshot]
#
# `nosnapshot` moves DATA_DIR/snapshots aside first (a full replay); `snapshot` (default)
# keeps them. Prints one JSON line: the mode, the milliseconds from spawning the process to
# the first 200 from GET /health (the listener opens only after State is rebuilt), and the
# broker's own "state ..." log line. The broker is then stopped with SIGTERM, which writes a
# snapshot at the head (snapshot.every_events > 0), so a `nosnapshot` run followed by a
# `snapshot` run measures both. Build first: cargo build --release --bins
set -euo pipefail
dir="$1"
mode="${2:-snapshot}"
bin="${SWITCHBOARD_BIN:-target/release/switchboard}"
if [ "$mode" = nosnapshot ] && [ -d "$dir/snapshots" ]; then
    rm -rf "$dir/snapshots.aside"
    mv "$dir/snapshots" "$dir/snapshots.aside"
fi
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$(mktemp)"
t0=$(date +%s%N)
SWITCHBOARD_SERVER__LISTEN="127.0.0.1:$port" SWITCHBOARD_STORAGE__DIR="$dir" \
SWITCHBOARD_LOGGING__FORMAT=json SWITCHBOARD_SNAPSHOT__CRON="" \
    "$bin" serve >"$log" 2>&1 &
pid=$!
# Bounded: at most 30 minutes.
for _ in $(seq 1 90000); do
    if curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the broker exited:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.02
done
t1=$(date +%s%N)
line="$(grep -m1 '"state ' "$log" || true)"
kill -TERM "$pid"
wait "$pid" || true
echo "{\"mode\":\"$mode\",\"ready_ms\":$(( (t1 - t0) / 1000000 )),\"log\":$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$line")}"
rm -f "$log"
