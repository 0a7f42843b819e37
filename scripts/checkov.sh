#!/usr/bin/env bash
# Install the checkov scanner (PyPI, pinned) into .tools/checkov-venv (git-ignored), apart from the
# project's venv: its many pinned dependencies must not move the trainer's. Idempotent.
# tests/chart/test_chart_scan.py runs it over every chart render the tests make, k8s/ and the
# Dockerfile; accepted findings and their reasons: security/checkov-accepted.yaml.
#
#   scripts/checkov.sh          # then: .tools/checkov-venv/bin/checkov --version
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
venv=.tools/checkov-venv

if [ -x "$venv/bin/checkov" ] && [ "$("$venv/bin/checkov" --version 2>/dev/null)" = "$CHECKOV_VERSION" ]; then
  exit 0
fi
echo "checkov: installing checkov $CHECKOV_VERSION into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
[ "$("$venv/bin/checkov" --version)" = "$CHECKOV_VERSION" ] || { echo "checkov: not $CHECKOV_VERSION after install" >&2; exit 1; }
