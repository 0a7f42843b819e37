"""Shared pieces of the observability tests: the rules and dashboard files, promtool, PromQL names."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "vgg-trainer"
RULES_FILE = CHART / "rules" / "vgg-trainer.rules.yaml"
DASHBOARD_FILE = CHART / "dashboards" / "vgg-trainer.json"
RULE_TESTS = ROOT / "tests" / "observability" / "rules"
K8S_MONITORING = ROOT / "k8s" / "monitoring" / "vgg-trainer-monitoring.yaml"

#: Metrics the dashboard and rules read that others export: Prometheus itself, the client
#: library's process collector, NVIDIA's DCGM exporter.
EXTERNAL_METRICS = {"up", "process_start_time_seconds", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
#: PromQL words that look like metric names in an expression.
_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "sum", "min", "max", "avg", "count", "quantile", "rate", "increase", "changes", "time", "histogram_quantile",
    "last_over_time", "max_over_time", "min_over_time", "le", "inf", "nan",
}  # fmt: skip


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH; run scripts/prometheus.sh (installs Debian's prometheus packages)")
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_targets() -> list[tuple[str, dict]]:
    """(panel title, target) of every query of the dashboard."""
    return [(p["title"], t) for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers outside label matchers and strings)."""
    bare = re.sub(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]", " ", expr)  # matchers, strings, ranges
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)  # label lists
    names = set(re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b", bare)) - _PROMQL_WORDS
    return {n for n in names if not n.startswith("$") and not re.fullmatch(r"[0-9.e]+", n)}


def family(name: str) -> str:
    """The exposition family of a sample name: histogram series fold into their base name."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


# --------------------------------------------------------------------------- servers


def _bcrypt(password: str) -> str:
    """A bcrypt hash (cost 4: fast to check) as the Pushgateway's web config wants it, from glibc's crypt."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt goes in Python 3.13; fine on 3.11/3.12
        import crypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    assert hashed and hashed.startswith("$2"), "this libc's crypt() makes no bcrypt hashes"
    return hashed


def wait_http(url: str, timeout: float = 30.0, proc=None, headers: dict[str, str] | None = None) -> None:
    """Wait until ``url`` answers 200 (the server is up), failing early if ``proc`` died."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


class Pushgateway:
    """The real Pushgateway (Debian's prometheus-pushgateway) on a free loopback port.

    With ``basic_auth=(user, password)`` every request needs those credentials (the Pushgateway's
    --web.config.file with a bcrypt hash of the password), as a gateway behind auth does.
    """

    def __init__(self, log_path, basic_auth: tuple[str, str] | None = None) -> None:
        import base64
        import subprocess

        from trainer.launch import free_ports

        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers: dict[str, str] = {}
        args = [tool("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{self.port}"]
        if basic_auth is not None:
            user, password = basic_auth
            web_config = pathlib.Path(log_path).with_suffix(".web.yml")
            web_config.write_text(yaml.safe_dump({"basic_auth_users": {user: _bcrypt(password)}}))
            args.append(f"--web.config.file={web_config}")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers = {"Authorization": f"Basic {token}"}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/-/ready", proc=self.proc, headers=self.headers)

    def metrics(self) -> str:
        import urllib.request

        request = urllib.request.Request(self.url + "/metrics", headers=self.headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self._log.close()
