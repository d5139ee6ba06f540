#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time (default 30 s; FUZZ_SECONDS=N).
# A crash fails the run and leaves the input under fuzz/artifacts/<target>/.
# The gate runs with a fixed seed (FUZZ_SEED, default 1) so that a run which passed here walks
# the same inputs in CI; exploration is FUZZ_SEED=0 (libFuzzer picks one) and a longer
# FUZZ_SECONDS, and what it finds goes into the corpus as a regression seed (fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-30}
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
  echo "[fuzz] $t for ${secs}s"
  # Run on a scratch copy so the committed seed corpus stays as reviewed.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  log="$work.log"
  if ! cargo +nightly fuzz run -O "$t" "$work" -- -max_total_time="$secs" -seed="${FUZZ_SEED:-1}" -rss_limit_mb=2048 >"$log" 2>&1; then
    # Show what broke (the panic, the sanitizer summary, the saved input), not just the tail.
    grep -E -A2 "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -n 40
    crash=$(grep -o 'Test unit written to [^ ]*' "$log" | head -n 1 | awk '{print $NF}' || true)
    [ -n "$crash" ] && [ -f "$crash" ] && od -A x -t x1z "$crash" | head -n 40
    rm -rf "$work" "$log"
    exit 1
  fi
  tail -n 1 "$log"
  rm -rf "$work" "$log"
done
