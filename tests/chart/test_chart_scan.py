"""A maintained scanner: checkov over every chart render the tests make (the values matrix, the
documented examples), the k8s/ builds and the Dockerfile. Each finding must be listed, with its
reason, in security/checkov-accepted.yaml, and each listed finding must still occur (no stale
acceptances). The hand-written Pod Security "restricted" check (chart_helpers) stays: checkov has
no check for several of its controls (seccomp on every container, procMount, AppArmor, sysctls,
the volume type allow-list)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml
from chart_helpers import ROOT, kubectl, render
from test_chart_docs import EXAMPLES, render_example
from test_chart_render import SCENARIOS

CHECKOV = ROOT / ".tools" / "checkov-venv" / "bin" / "checkov"
ACCEPTED = ROOT / "security" / "checkov-accepted.yaml"


def checkov() -> str:
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV} not found; run scripts/checkov.sh (installs the pinned checkov from PyPI)")
    return str(CHECKOV)


def write_docs(directory, name: str, docs: list[dict]) -> None:
    (directory / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


def scanned_tree(tmp_path) -> str:
    """Every manifest to scan as files of one directory, and the Dockerfile."""
    tree = tmp_path / "scan"
    tree.mkdir()
    for name, values in SCENARIOS.items():
        write_docs(tree, f"chart-{name}", render(values))
    for i, example in enumerate(EXAMPLES):
        write_docs(tree, f"docs-{i}", render_example(example, tmp_path))
    for build in ("base", "overlays/multi-worker", "overlays/single-node-gpus", "monitoring"):
        out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / build)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        (tree / f"k8s-{build.replace('/', '-')}.yaml").write_text(out.stdout)
    shutil.copy(ROOT / "Dockerfile", tree / "Dockerfile")
    return str(tree)


def findings(tree: str) -> set[tuple[str, str]]:
    """(check id, resource kind) of every failed check ("Dockerfile" as the kind of Dockerfile findings)."""
    proc = subprocess.run(
        [checkov(), "-d", tree, "--framework", "kubernetes", "dockerfile", "--quiet", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, proc.stdout[:2000]
    found = set()
    for report in reports:
        for failed in report["results"]["failed_checks"]:
            kind = "Dockerfile" if report["check_type"] == "dockerfile" else failed["resource"].split(".")[0]
            found.add((failed["check_id"], kind))
    return found


def accepted() -> dict[tuple[str, str], str]:
    entries = yaml.safe_load(ACCEPTED.read_text())
    out = {}
    for entry in entries:
        assert entry["reason"].strip(), f"{entry['check']}: an accepted finding needs its reason"
        for kind in entry["kinds"]:
            out[(entry["check"], kind)] = entry["reason"]
    return out


@pytest.mark.timeout(600)
def test_every_checkov_finding_is_fixed_or_accepted_with_a_reason(tmp_path):
    found, listed = findings(scanned_tree(tmp_path)), accepted()

    new = sorted(found - set(listed))
    stale = sorted(set(listed) - found)
    assert not new, f"checkov findings neither fixed nor listed in {ACCEPTED.name}: {new}"
    assert not stale, f"{ACCEPTED.name} accepts findings checkov no longer reports (remove them): {stale}"
