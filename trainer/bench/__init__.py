"""`trainer bench`: the performance benchmark suite (see docs/benchmarks.md).

Every TensorFlow measurement runs in its own process (``python -m trainer.bench.worker``)
pinned to the cores it measures, so thread pools match the cores and no measurement
inherits another's warm caches or background threads.
"""
