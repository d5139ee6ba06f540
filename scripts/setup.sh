#!/usr/bin/env bash
# Idempotent set-up for building and testing tollgate on a fresh machine of this kind
# (Debian, root, Rust stable + nightly via rustup). Safe to run any number of times: every
# step checks whether it is already done. Area scripts (scripts/setup-*.sh) add what their
# tests need (eBPF toolchain, fuzzing, Kafka broker, peers).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

# Rust components the workspace needs.
for c in clippy rustfmt; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    log "rustup component add $c"
    rustup component add "$c"
  fi
done

# Area scripts, in a stable order. Each one is idempotent on its own.
for s in scripts/setup-*.sh; do
  [ -e "$s" ] || continue
  log "running $s"
  bash "$s"
done
log "done"
