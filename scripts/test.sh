#!/usr/bin/env bash
# Runs every test of tollgate: formatting, clippy, unit + integration tests (including the
# root-only kernel datapath tests), the policy conformance tables, and the bounded fuzz smoke
# run. Installs what it needs first (scripts/setup.sh, idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace 2>&1 | tee /tmp/tollgate-cargo-test.log

step "tollgate test conformance/policies/"
cargo run -q -p tollgate -- test conformance/policies/

for s in scripts/test-*.sh; do
  [ -e "$s" ] || continue
  step "$s"
  bash "$s"
done
step "all tests passed"
