#!/usr/bin/env bash
# Idempotent: the real clients and servers the proxy's tests drive (nginx as origin, curl and
# h2load as clients). Debian packages; nothing is started here.
set -euo pipefail
missing=()
for bin_pkg in nginx:nginx curl:curl h2load:nghttp2-client openssl:openssl tinyproxy:tinyproxy; do
  bin=${bin_pkg%%:*}; pkg=${bin_pkg##*:}
  command -v "$bin" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup-proxy] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
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
