#!/usr/bin/env bash
# README command 2: set up, lint, then run the whole test suite (slow multi-process tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check trainer tests
exec .venv/bin/python -m pytest "$@"
