"""The alert rules: valid for the real promtool, each alert unit-tested with `promtool test rules`,
and the unit tests able to fail (an alert that never fires breaks its test)."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from observability_helpers import RULE_TESTS, RULES_FILE, alert_rules, tool

ALERTS = [rule["alert"] for rule in alert_rules()]
TEST_FILES = sorted(p.name for p in RULE_TESTS.glob("*.test.yaml"))


def promtool(*args: str, cwd=RULE_TESTS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def alerts_tested_by(test_file) -> set[str]:
    spec = yaml.safe_load(test_file.read_text())
    return {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", [])}


def test_rules_file_passes_promtool_check():
    result = promtool("check", "rules", str(RULES_FILE))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_issue_s_alerts_exist_and_every_alert_has_a_unit_test():
    assert ALERTS == [
        "VggTrainerTrainingStalled",
        "VggTrainerWorkerDown",
        "VggTrainerStraggler",
        "VggTrainerInputBound",
        "VggTrainerBackupStale",
        "VggTrainerRepeatedGroupRestarts",
    ]
    covered = set().union(*(alerts_tested_by(RULE_TESTS / name) for name in TEST_FILES))
    assert covered == set(ALERTS)


@pytest.mark.parametrize("test_file", TEST_FILES)
def test_promtool_unit_tests_pass(test_file):
    result = promtool("test", "rules", test_file)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("test_file", TEST_FILES)
def test_unit_tests_fail_when_their_alert_never_fires(test_file, tmp_path):
    """Not vacuous: the same test against rules whose alert can never fire must fail."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    silenced = alerts_tested_by(RULE_TESTS / test_file)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] in silenced:
                rule["expr"] = "vector(1) > 2"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    spec = yaml.safe_load((RULE_TESTS / test_file).read_text())
    spec["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / test_file).write_text(yaml.safe_dump(spec))

    result = promtool("test", "rules", test_file, cwd=tmp_path)

    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stdout + result.stderr
