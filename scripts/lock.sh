#!/usr/bin/env bash
# Regenerate the two locks:
#   constraints.txt           every package's exact version (dev included): pyproject's ranges resolved afresh
#   docker/requirements.lock  what the image's pip installs, those same versions with SHA-256 hashes
#
#   scripts/lock.sh           # both: constraints.txt afresh, then the image lock from it
#   scripts/lock.sh --image   # only the image lock, from constraints.txt as it stands
#   scripts/lock.sh --fetch DIR  # download the image lock's wheels into DIR, each checked against its
#                                # hash (scripts/test.sh: the tests install them offline)
#
# The image lock is resolved by uv (pinned, into the git-ignored .tools/uv-venv) for the image, not
# for this machine: CPython 3.11 on Linux x86-64. It leaves out tensorflow, which the base image
# ships (with the CUDA libraries built for it) and its digest pins; tests/chart/test_chart_image.py
# checks that the base image's TensorFlow is the tensorflow of constraints.txt. It includes the
# build backend (pyproject's build-system.requires), so that `pip install --no-build-isolation .`
# fetches nothing unhashed. uv uses PyPI, or the index UV_DEFAULT_INDEX names.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.8
# The image's platform: its Python, Linux x86-64 (glibc >= 2.28: pip takes each manylinux tag
# literally, so every older one is listed; manylinux2014 brings 2010 and 1), wheels only (an
# sdist's build would fetch its build dependencies unhashed).
IMAGE_PLATFORM=(--python-version 3.11 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64)
for glibc in $(seq 17 28); do IMAGE_PLATFORM+=(--platform "manylinux_2_${glibc}_x86_64"); done

case "${1:-}" in
  "" | --image | --fetch) ;;
  *) echo "usage: scripts/lock.sh [--image | --fetch DIR]" >&2; exit 64 ;;
esac
if [ "${1:-}" = --fetch ]; then
  exec "$PYTHON" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps \
    "${IMAGE_PLATFORM[@]}" -r docker/requirements.lock -d "${2:?usage: scripts/lock.sh --fetch DIR}"
fi

if [ "${1:-}" != --image ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
  {
    echo "# Exact versions for reproducible installs: pip install -c constraints.txt -e '.[dev]'"
    echo "# Regenerate: scripts/lock.sh (from a fresh venv with the project installed)"
    "$tmp/venv/bin/pip" freeze --exclude-editable
  } > constraints.txt
fi

uv=.tools/uv-venv/bin/uv
if [ ! -x "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PYTHON" -m venv .tools/uv-venv
  .tools/uv-venv/bin/pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
"$PYTHON" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" |
  "$uv" pip compile --quiet pyproject.toml - --constraints constraints.txt --generate-hashes \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package tensorflow \
    --custom-compile-command "scripts/lock.sh --image" --output-file docker/requirements.lock
