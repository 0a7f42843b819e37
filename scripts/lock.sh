#!/usr/bin/env bash
# Regenerate constraints.txt: resolve pyproject's ranges afresh in a throw-away venv.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
{
  echo "# Exact versions for reproducible installs: pip install -c constraints.txt -e '.[dev]'"
  echo "# Regenerate: scripts/lock.sh (from a fresh venv with the project installed)"
  "$tmp/venv/bin/pip" freeze --exclude-editable
} > constraints.txt
