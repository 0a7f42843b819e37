#!/usr/bin/env bash
# README command 1: set up, then run the embedded end-to-end demo (no cluster, no cloud account).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/trainer demo --workdir "${DEMO_DIR:-demo-run}" "$@"
