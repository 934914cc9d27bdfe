#!/usr/bin/env bash
# Runs every cargo-fuzz target in tests/fuzz for a bounded time (default 60 s each) from
# the committed seed corpus, and fails if any target finds a crash (a panic, an abort, a
# sanitizer report) or does not build.
#     bash .ci/fuzz.sh [SECONDS_PER_TARGET]
#
# cargo fuzz needs nightly compiler flags (-Z); the machine's one toolchain is stable, so
# RUSTC_BOOTSTRAP=1 lets it accept them. AddressSanitizer is off (`--sanitizer none`): the
# code under test has no `unsafe` of its own, and ASan more than doubles the build time;
# libFuzzer still catches panics, aborts, timeouts and out-of-memory.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
targets="$(cargo fuzz list --fuzz-dir tests/fuzz)"
cargo fuzz build --fuzz-dir tests/fuzz --sanitizer none --release
for t in $targets; do
    echo "== fuzz $t: ${secs} s"
    # A copy of the seeds: what the fuzzer adds stays out of the tree.
    work="$(mktemp -d)"
    cp -r "tests/fuzz/corpus/$t/." "$work/"
    status=0
    cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none --release "$t" "$work" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$work.log" 2>&1 || status=$?
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|thread '|==[0-9]+== ERROR)" \
        "$work.log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$work.log" >&2
    fi
    rm -f "$work.log"
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $t failed (exit $status); the input is in tests/fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
