#!/usr/bin/env bash
# README command 2: set up, lint, then run the whole test suite (slow multi-process tests included).
# Needs root or unprivileged user namespaces (for scripts/sandbox.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# First what machine this is (CPU, SIMD level, cores, TensorFlow and oneDNN): kernels differ between CPUs.
scripts/machine-info.sh
# Real helm and kubectl for the chart tests (tests/chart), into the git-ignored .tools/bin.
PYTHON=.venv/bin/python scripts/tools.sh
export PATH="$PWD/.tools/bin:$PATH"
# The checkov scanner (tests/chart/test_chart_scan.py), into the git-ignored .tools/checkov-venv.
scripts/checkov.sh
# Real Prometheus, promtool and Pushgateway for the observability tests (tests/observability).
scripts/prometheus.sh
# The image lock's wheels (docker/requirements.lock), downloaded from the index with every hash
# checked, into the git-ignored .tools/image-wheels: the sandboxed tests install them offline
# (tests/chart/test_chart_image.py). Once more on failure: an index can fail a request.
PYTHON=.venv/bin/python scripts/lock.sh --fetch .tools/image-wheels ||
  PYTHON=.venv/bin/python scripts/lock.sh --fetch .tools/image-wheels
.venv/bin/ruff check trainer tests
# The tests run in a private network namespace where the GCS host names resolve to the
# emulator on loopback (TensorFlow's gs:// has fixed endpoints); see scripts/sandbox.sh.
# Two lanes (pytest-xdist): tests/conftest.py says which tests share a lane and why.
exec scripts/sandbox.sh .venv/bin/python -m pytest --numprocesses=2 "$@"
