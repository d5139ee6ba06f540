#!/usr/bin/env bash
# Idempotent: cargo-fuzz for the fuzz smoke run, llvm-tools for the coverage report (the
# nightly toolchain is set up by setup-datapath.sh).
set -euo pipefail
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "[setup-fuzz] cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# llvm-cov for scripts/fuzz-coverage.sh.
if ! rustup component list --installed --toolchain nightly 2>/dev/null | grep -q '^llvm-tools'; then
  echo "[setup-fuzz] rustup component add llvm-tools-preview --toolchain nightly"
  rustup component add llvm-tools-preview --toolchain nightly
fi
echo "[setup-fuzz] ok"
