#!/usr/bin/env bash
# Broker memory per idle authenticated connection (issue 8), on a fresh broker.
#
#   benches/idle.sh N [PROCS]
#
# Starts the release broker on a fresh temporary data directory, reads its VmRSS, then opens
# N sessions (hello done, then idle) from PROCS load processes (default: 1 per 9,500
# connections; one process may hold at most 20,000 open files), each bound to its own pair
# of loopback source addresses (127.0.0.2/3, 127.0.0.4/5, ...) to stay clear of the
# ephemeral port range. Once /health counts all N and RSS has settled for 3 s, reads VmRSS
# again and prints one JSON line: N, RSS before and after (KiB), KiB per connection, and
# each load process's own JSON line (open time, connect->sync latency) on stderr.
# Build first: cargo build --release --bins && cargo bench --bench load --no-run
set -euo pipefail
cd "$(dirname "$0")/.."
n="$1"
procs="${2:-$(( (n + 9499) / 9500 ))}"
bin="${SWITCHBOARD_BIN:-target/release/switchboard}"
load="$(ls -t target/release/deps/load-* 2>/dev/null | grep -v '\.d$' | head -1)"
[ -x "$load" ] || { echo "no load binary: cargo bench --bench load --no-run" >&2; exit 1; }
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${bpid:-}" ] && kill -TERM "$bpid" 2>/dev/null && wait "$bpid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
SWITCHBOARD_SERVER__LISTEN="127.0.0.1:$port" SWITCHBOARD_STORAGE__DIR="$work/data" \
SWITCHBOARD_LOGGING__LEVEL=warn \
    "$bin" serve >"$work/broker.log" 2>&1 &
bpid=$!
for _ in $(seq 1 200); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.05
done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$bpid/status"; }
conns() { curl -fs "http://127.0.0.1:$port/health" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("connections", 0))'; }
sleep 1
before="$(rss)"
per=$(( n / procs ))
for i in $(seq 0 $((procs - 1))); do
    count=$per
    [ "$i" -eq $((procs - 1)) ] && count=$(( n - per * (procs - 1) ))
    ips="127.0.0.$((2 + 2 * i)),127.0.0.$((3 + 2 * i))"
    "$load" --scenario idle --connections "$count" --source-ips "$ips" --hold-s 600 \
        --url "ws://127.0.0.1:$port/ws" --api-url "http://127.0.0.1:$port" --pid "$bpid" \
        --json >"$work/load.$i.json" 2>"$work/load.$i.err" &
    pids+=($!)
done
# Bounded: 10 minutes for all N to be open.
for _ in $(seq 1 1200); do
    [ "$(conns)" -ge "$n" ] && break
    for p in "${pids[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then
            echo "a load process ended early:" >&2
            cat "$work"/load.*.err "$work"/load.*.json >&2
            exit 1
        fi
    done
    sleep 0.5
done
open="$(conns)"
last=0
for _ in $(seq 1 60); do
    sleep 3
    now="$(rss)"
    [ "$now" -eq "$last" ] && break
    last="$now"
done
after="$(rss)"
python3 -c "import json; n=$open; print(json.dumps({'connections': n, 'load_processes': $procs, 'rss_before_kib': $before, 'rss_after_kib': $after, 'kib_per_connection': round(($after - $before) / n, 2)}))"
