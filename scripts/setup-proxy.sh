#!/usr/bin/env bash
# Idempotent: the real clients and servers the proxy's tests drive (nginx as origin, curl and
# h2load as clients; unbound and dnsmasq as DNS upstreams, dig and dnsperf as DNS clients; the
# tansu Kafka broker with kcat, confluent-kafka, aiokafka and kafka-python as Kafka clients).
# Debian packages; nothing is left running here (services the packages start are stopped).
set -euo pipefail
missing=()
for bin_pkg in nginx:nginx curl:curl h2load:nghttp2-client openssl:openssl tinyproxy:tinyproxy \
  unbound:unbound dnsmasq:dnsmasq dig:dnsutils dnsperf:dnsperf kcat:kcat; do
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
  # The Kafka clients of proxy/tests/kafka/clients.py (install-py.sh pins them; check anyway).
  "$venv/bin/python" -c "import confluent_kafka, aiokafka, kafka" 2>/dev/null \
    || "$venv/bin/pip" install -q confluent-kafka aiokafka kafka-python
  echo "[setup-proxy] venv ok (grpcio, websockets, confluent-kafka, aiokafka, kafka-python)"
  # tansu, the Kafka broker of the Kafka tests and bench/kafka, cached under $FEAS/opt: built
  # once (~9 min), rebuilt only when the cached binary is not the version below. flock: two
  # set-ups at once wait for one build instead of racing two.
  want_tansu=0.6.0
  feas=$(bash -c ". '$peers/env.sh' && echo \$FEAS")
  t0=$(date +%s)
  force=
  if [ -x "$feas/opt/bin/tansu" ] && ! "$feas/opt/bin/tansu" --version 2>/dev/null | grep -q " $want_tansu"; then force=1; fi
  if ! FORCE=$force flock "$feas/tansu-install.lock" bash "$peers/install-tansu.sh" >/tmp/tollgate-setup-tansu.log 2>&1; then
    tail -20 /tmp/tollgate-setup-tansu.log >&2
    echo "[setup-proxy] ERROR: tansu install failed (log /tmp/tollgate-setup-tansu.log)" >&2
    exit 1
  fi
  echo "[setup-proxy] $(tail -1 /tmp/tollgate-setup-tansu.log) ready in $(( $(date +%s) - t0 )) s"
else
  echo "[setup-proxy] ERROR: $peers not found (the gRPC and Kafka tests need ../shared/peers)" >&2
  exit 1
fi
