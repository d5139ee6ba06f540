#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time (default 30 s; FUZZ_SECONDS=N).
# A crash fails the run and leaves the input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-30}
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
  echo "[fuzz] $t for ${secs}s"
  # Run on a scratch copy so the committed seed corpus stays as reviewed.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  cargo +nightly fuzz run -O "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
  rm -rf "$work"
done
