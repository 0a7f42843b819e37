#!/usr/bin/env python3
"""Benchmark: training throughput with the metrics endpoint scraped at 20 requests/s vs not scraped.

One real `trainer train` process (VGG16 at 32x32 on a generated dataset, one worker) trains
for a few minutes. After a warm-up, the benchmark alternates segments of equal length: in
"scraped" segments a thread GETs /metrics 20 times per second, in "idle" ones nothing does.
Each segment's throughput comes from the trainer's own step-time histogram (sum and count read
at the segment's ends: one request each), so it is exact to the step. Alternating (A B A B ...)
spreads a shared machine's noise over both conditions. Wall time still varies with what else
runs on the machine, so the benchmark also reports the trainer's CPU seconds per step
(process_cpu_seconds_total): serving the scrapes costs CPU in the trainer's own process, and that
figure barely depends on other processes.

    .venv/bin/python scripts/bench-scrape.py                 # 6 pairs of 20 s segments
    .venv/bin/python scripts/bench-scrape.py --pairs 3 --segment 10

Prints one line per segment, then the median throughput of each condition and the overhead.
Last, a figure free of the machine's noise: the CPU an endpoint process (the trainer's metrics,
no training) spends serving the same scrape rate, as a share of the CPU the training used.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.config import PrepareConfig, set_args  # noqa: E402
from trainer.contract import Env  # noqa: E402
from trainer.launch import entrypoint_command, free_ports  # noqa: E402

BATCH = 16
SETTINGS = [
    "model.weights=none",
    "model.head.dense_units=[64]",
    "data.image_size=32",
    "data.shuffle_buffer=256",
    f"train.batch_size_per_replica={BATCH}",
    "train.steps_per_epoch=50",
    "train.validation_steps=1",
    "train.backup_every_steps=1000",
    "phases.feature_extraction.epochs=0",
    "phases.fine_tuning.epochs=100",  # block5 trains: a realistic step; stopped by the benchmark
    "monitoring.curves=false",
    "runtime.verbose=0",
]


def read_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    names = ("trainer_step_duration_seconds_sum", "trainer_step_duration_seconds_count", "process_cpu_seconds_total")
    for name in names:
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values


class Scraper:
    """GETs /metrics at ``rate`` per second while ``on`` is set, over one kept-alive connection (as Prometheus)."""

    def __init__(self, url: str, rate: float):
        self.url, self.period = urllib.parse.urlsplit(url), 1.0 / rate
        self.on = threading.Event()
        self.requests = 0
        self.seconds = 0.0  # time spent in requests
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        connection = None
        next_at = time.perf_counter()
        while True:
            self.on.wait()
            started = time.perf_counter()
            try:
                connection = connection or http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=10)
                connection.request("GET", self.url.path)
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                connection = None  # the server went away (end of a measurement): reconnect next time
                continue
            self.requests += 1
            self.seconds += time.perf_counter() - started
            next_at = max(next_at + self.period, time.perf_counter())
            time.sleep(max(next_at - time.perf_counter(), 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="scraped/idle segment pairs (default 6)")
    parser.add_argument("--segment", type=float, default=20.0, help="seconds per segment (default 20)")
    parser.add_argument("--rate", type=float, default=20.0, help="scrapes per second (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps before measuring (default 10)")
    args = parser.parse_args()

    from trainer.data.prepare import prepare_dataset
    from trainer.data.synthetic import make_demo_images

    workdir = tempfile.mkdtemp(prefix="bench-scrape-")
    make_demo_images(os.path.join(workdir, "images"), classes=4, per_class=64, size=40, seed=0)
    prepare_dataset(
        os.path.join(workdir, "images"),
        os.path.join(workdir, "dataset"),
        PrepareConfig(min_shards=4, processes=1),
        progress=lambda _: None,
    )
    (port,) = free_ports(1)
    env = {**os.environ, Env.METRICS_PORT.value: str(port), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop(Env.TF_CONFIG.value, None)
    settings = [*SETTINGS, f"data.dataset={workdir}/dataset", f"output.dir={workdir}/run"]
    log = open(os.path.join(workdir, "train.log"), "w")  # noqa: SIM115 - closed at the end
    trainer = subprocess.Popen(
        [*entrypoint_command(), "train", *set_args(*settings)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        return measure(args, url, trainer)
    finally:
        trainer.terminate()
        trainer.wait(timeout=60)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args, url: str, trainer: subprocess.Popen) -> int:
    count = "trainer_step_duration_seconds_count"
    while True:
        if trainer.poll() is not None:
            print(f"the trainer exited with {trainer.returncode} before the warm-up ended", file=sys.stderr)
            return 1
        try:
            if read_metrics(url)[count] >= args.warmup_steps:
                break
        except OSError:
            pass
        time.sleep(1)
    scraper = Scraper(url, args.rate)
    results: dict[str, list[float]] = {"scraped": [], "idle": []}
    cpu: dict[str, list[float]] = {"scraped": [], "idle": []}
    columns = [("segment", 8), ("condition", 9), ("steps", 6), ("s/step", 8), ("images/s", 9)]
    print(" ".join(f"{name:>{width}}" for name, width in [*columns, ("CPU s/step", 10), ("scrapes/s", 9)]))
    for index in range(2 * args.pairs):
        condition = "scraped" if index % 2 == 0 else "idle"
        before, requests_before = read_metrics(url), scraper.requests
        started = time.perf_counter()
        if condition == "scraped":
            scraper.on.set()
        time.sleep(args.segment)
        scraper.on.clear()
        elapsed = time.perf_counter() - started
        after = read_metrics(url)
        steps = after[count] - before[count]
        per_step = (after[count.replace("count", "sum")] - before[count.replace("count", "sum")]) / max(steps, 1)
        throughput = BATCH / per_step if steps else 0.0
        cpu_per_step = (after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]) / max(steps, 1)
        results[condition].append(throughput)
        cpu[condition].append(cpu_per_step)
        rate = (scraper.requests - requests_before) / elapsed
        print(
            f"{index + 1:>8} {condition:>9} {steps:>6.0f} {per_step:>8.4f} {throughput:>9.2f} "
            f"{cpu_per_step:>10.4f} {rate:>9.1f}"
        )
    scraped, idle = statistics.median(results["scraped"]), statistics.median(results["idle"])
    mean_scraped, mean_idle = statistics.mean(results["scraped"]), statistics.mean(results["idle"])
    print()
    print(f"median throughput: scraped {scraped:.2f} images/s, idle {idle:.2f} images/s")
    print(f"overhead of scraping at {args.rate:g}/s: median {100 * (1 - scraped / idle):+.2f}%, "
          f"mean {100 * (1 - mean_scraped / mean_idle):+.2f}% (negative = scraped was faster: noise)")  # fmt: skip
    cpu_scraped, cpu_idle = statistics.median(cpu["scraped"]), statistics.median(cpu["idle"])
    print(f"median trainer CPU per step: scraped {cpu_scraped:.4f} s, idle {cpu_idle:.4f} s "
          f"({100 * (cpu_scraped / cpu_idle - 1):+.2f}%)")  # fmt: skip
    if scraper.requests:
        print(f"scrapes: {scraper.requests}, mean latency {1000 * scraper.seconds / scraper.requests:.1f} ms")
    training_cpu_per_second = statistics.median(
        c / (BATCH / t) for c, t in zip(cpu["idle"], results["idle"], strict=True) if t
    )
    serving = endpoint_cpu_per_second(args.rate)
    print(
        f"endpoint alone at {args.rate:g} scrapes/s: {1000 * serving:.1f} ms CPU per second = "
        f"{100 * serving / training_cpu_per_second:.2f}% of the {training_cpu_per_second:.2f} CPU-s/s the training used"
    )
    return 0


ENDPOINT_ONLY = """
import sys, time
from trainer import metrics
m = metrics.process_metrics()
for split in metrics.SPLITS:
    m.loss.labels(split=split).set(1.0)
    m.accuracy.labels(split=split).set(0.5)
m.set_phase("fine_tuning")
for _ in range(100):
    m.step_duration.observe(0.5); m.step_compute.observe(0.3); m.backup_duration.observe(2.0)
endpoint = metrics.serve(m, 0, "127.0.0.1")
print(endpoint.port, flush=True)
sys.stdin.read()
"""


def endpoint_cpu_per_second(rate: float, seconds: float = 10.0) -> float:
    """CPU seconds per second a process serving only the trainer's metrics spends at ``rate`` scrapes/s."""
    child = subprocess.Popen(
        [sys.executable, "-c", ENDPOINT_ONLY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        port = int(child.stdout.readline())
        scraper = Scraper(f"http://127.0.0.1:{port}/metrics", rate)
        before = _cpu_seconds(child.pid)
        scraper.on.set()
        time.sleep(seconds)
        scraper.on.clear()
        return (_cpu_seconds(child.pid) - before) / seconds
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


if __name__ == "__main__":
    raise SystemExit(main())
