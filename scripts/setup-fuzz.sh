#!/usr/bin/env bash
# Idempotent: cargo-fuzz for the fuzz smoke run (the nightly toolchain is set up by
# setup-datapath.sh).
set -euo pipefail
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "[setup-fuzz] cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
echo "[setup-fuzz] ok"
