#!/usr/bin/env bash
# Coverage of each fuzz target: fuzz it for SECONDS from its seed corpus (on a scratch copy),
# then replay the grown corpus with `cargo fuzz coverage` and report llvm-cov's region and line
# coverage of the source files that target is about. Not part of CI (it takes minutes).
#
# usage: scripts/fuzz-coverage.sh [SECONDS [TARGET...]]   (default 60 s, every target; run
#        scripts/setup-fuzz.sh first)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
cov="$(rustc +nightly --print sysroot)/lib/rustlib/$triple/bin/llvm-cov"
[ -x "$cov" ] || { echo "llvm-cov missing: run scripts/setup-fuzz.sh" >&2; exit 1; }
sources() {
  case $1 in
    path_normalize) echo ../parsers/src/path.rs ;;
    tls_client_hello) echo ../parsers/src/tls.rs ;;
    dns_message) echo ../parsers/src/dns.rs ;;
    http1_framing) echo ../parsers/src/http1.rs ;;
    grpc_path) echo ../parsers/src/grpc.rs ;;
    kafka_request | kafka_response) echo ../parsers/src/kafka.rs ;;
    policy_load) echo ../policy/src/load.rs ../policy/src/model.rs ../policy/src/yaml.rs ;;
    *) echo "" ;;
  esac
}
printf '| target | seconds | corpus after | regions covered | lines covered | sources |\n|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  cargo +nightly fuzz run -O "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 >/dev/null 2>&1
  cargo +nightly fuzz coverage "$t" "$work" >/dev/null 2>&1
  bin="target/$triple/coverage/$triple/release/$t"
  # shellcheck disable=SC2046
  total=$("$cov" report "$bin" -instr-profile="coverage/$t/coverage.profdata" $(sources "$t") | tail -n 1)
  # TOTAL regions missed cover functions missed executed lines missed cover ...
  read -r _ _ _ rcover _ _ _ _ _ lcover _ <<<"$total"
  printf '| `%s` | %s | %s | %s | %s | %s |\n' "$t" "$secs" "$(ls "$work" | wc -l)" "$rcover" "$lcover" "$(sources "$t" | sed 's|\.\./||g')"
  rm -rf "$work"
done
