#!/usr/bin/env bash
# The product's model and training step on the GPU configurations it supports, for a fixed number
# of steps on synthetic data: MirroredStrategy over every GPU, 2 local MultiWorkerMirroredStrategy
# workers over NCCL, and mixed_float16 + XLA. Prints images/s per GPU and model FLOPs utilisation.
# On a machine without an NVIDIA GPU it says so and exits 0. docs/performance.md says how to read it.
#
#   scripts/gpu-check.sh                      # 224x224, batch 64 per GPU, 50 steps after 5 warm-up
#   scripts/gpu-check.sh --steps 100 --json gpu-check.json
#   scripts/gpu-check.sh --allow-cpu --steps 2 --warmup 1 --image-size 32 --batch 2   # the code, on CPU
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # no cd: --json PATH stays relative to the caller's directory
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  # The project's venv (an editable install: any directory works); the image has the trainer in python3.
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m trainer.bench.gpu_check "$@"
