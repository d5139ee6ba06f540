#!/usr/bin/env bash
# Idempotent set-up for tollgate's eBPF datapath (redirector-ebpf/): the nightly's rust-src
# (for -Z build-std=core), bpf-linker built against the nightly's own LLVM, and the tools the
# datapath tests and benchmark drive (iproute2, iperf3, bpftool). Every step checks first; re-running
# costs a few seconds.
set -euo pipefail

log() { printf '[setup-datapath] %s\n' "$*"; }

if ! rustup toolchain list | grep -q '^nightly'; then
  log "rustup toolchain install nightly --profile minimal"
  rustup toolchain install nightly --profile minimal
fi

if ! rustup component list --installed --toolchain nightly 2>/dev/null | grep -q '^rust-src'; then
  log "rustup component add rust-src --toolchain nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker links through the nightly's own libLLVM, so its LLVM major must match the
# nightly's. Rebuild when it is missing or was built for another LLVM.
SR=$(rustc +nightly --print sysroot)
LLVM_MAJOR=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
STAMP="$HOME/.cargo/bin/.bpf-linker-llvm"
if ! command -v bpf-linker >/dev/null 2>&1 || [ "$(cat "$STAMP" 2>/dev/null)" != "$LLVM_MAJOR" ]; then
  LIB=$(basename "$(ls "$SR"/lib/libLLVM-*.so | head -n1)" .so | sed 's/^lib//')
  log "cargo +nightly install bpf-linker (llvm-$LLVM_MAJOR, linking $LIB from $SR/lib)"
  RUSTFLAGS="-L $SR/lib -l dylib=$LIB -C link-arg=-Wl,-rpath,$SR/lib" \
    cargo +nightly install bpf-linker --force --no-default-features \
    --features "llvm-$LLVM_MAJOR,no-llvm-linking"
  echo "$LLVM_MAJOR" > "$STAMP"
fi

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
command -v bpftool >/dev/null 2>&1 || missing+=(bpftool)
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi

# The datapath pins under /sys/fs/bpf; mount the BPF filesystem when the machine has not.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  log "mount -t bpf bpf /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ok"
