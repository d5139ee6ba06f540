#!/usr/bin/env bash
# Idempotent: the real clients and servers the proxy's tests drive (nginx as origin, curl and
# h2load as clients; unbound and dnsmasq as DNS upstreams, dig and dnsperf as DNS clients).
# Debian packages; nothing is left running here (services the packages start are stopped).
set -euo pipefail
missing=()
for bin_pkg in nginx:nginx curl:curl h2load:nghttp2-client openssl:openssl tinyproxy:tinyproxy \
  unbound:unbound dnsmasq:dnsmasq dig:dnsutils dnsperf:dnsperf; do
  bin=${bin_pkg%%:*}; pkg=${bin_pkg##*:}
  command -v "$bin" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup-proxy] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # Packages may start system services (unbound, dnsmasq on :53): tests run their own.
  for svc in unbound dnsmasq nginx tinyproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
fi

# The grpcio client/server venv and stubs for the gRPC tests (../shared/peers, idempotent).
peers="$(cd "$(dirname "$0")/../.." && pwd)/shared/peers"
if [ -x "$peers/install-py.sh" ]; then
  bash "$peers/install-py.sh" >/dev/null
  # shellcheck disable=SC1091
  venv=$(bash -c ". '$peers/env.sh' && echo \$VENV")
  "$venv/bin/python" -c "import websockets" 2>/dev/null || "$venv/bin/pip" install -q websockets
  echo "[setup-proxy] grpcio venv ok"
else
  echo "[setup-proxy] ERROR: $peers not found (the gRPC tests need ../shared/peers)" >&2
  exit 1
fi
