#!/usr/bin/env bash
# Where the tests run: CPU model, SIMD level, cores, load, memory, and the TensorFlow that picks
# its kernels from them (oneDNN on x86 by default). A failure on another machine then reads
# from its log: TensorFlow's oneDNN kernels differ between AVX2 and AVX-512, Intel and AMD.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
simd=none
for level in sse4_2 avx avx2 avx512f; do
  case " $flags " in *" $level "*) simd=$level ;; esac
done
extras=$(for f in avx512_bf16 avx512_vnni amx_tile; do case " $flags " in *" $f "*) printf ' %s' "$f" ;; esac; done)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(grep -m1 vendor_id /proc/cpuinfo | cut -d: -f2 | tr -d ' '))"
echo "machine: SIMD ${simd/avx512f/AVX-512}${extras}; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg); $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
if [ -x .venv/bin/python ]; then
  .venv/bin/python - 2>/dev/null <<'PY'
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
setting = "unset: on, TensorFlow's x86 default" if onednn is None else onednn
print(f"machine: TensorFlow {tf.__version__}; TF_ENABLE_ONEDNN_OPTS {setting}")
PY
fi
