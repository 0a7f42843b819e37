"""One set of metric names: the code (trainer/metrics.py), the dashboard, the alert rules and the
operations guide agree. (test_prometheus.py checks the same names against a real scrape.)"""

from __future__ import annotations

from observability_helpers import EXTERNAL_METRICS, ROOT, alert_rules, dashboard_targets, family, metric_names

from trainer import metrics

CODE = {family(n) for n in metrics.SERVED + metrics.PUSHED}


def test_metric_names_are_found_in_expressions():
    expr = 'sum by (worker, le) (rate(trainer_step_duration_seconds_bucket{namespace="$namespace"}[5m])) / on (x) up'

    assert metric_names(expr) == {"trainer_step_duration_seconds_bucket", "up"}


def test_the_dashboard_reads_only_metrics_the_code_exports():
    used = {family(n) for _, target in dashboard_targets() for n in metric_names(target["expr"])}

    assert used - EXTERNAL_METRICS <= CODE
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= used  # GPU panels from the DCGM exporter
    # The dashboard shows every served metric except build info (a variable's source) and replicas.
    served = {family(n) for n in metrics.SERVED}
    assert served - used == {metrics.BUILD_INFO, metrics.REPLICAS}


def test_the_alerts_read_only_metrics_the_code_exports():
    used = {family(n) for rule in alert_rules() for n in metric_names(rule["expr"])}

    assert used and used - EXTERNAL_METRICS <= CODE


def test_the_operations_guide_lists_every_metric_and_alert():
    guide = (ROOT / "docs" / "operations.md").read_text()

    for name in metrics.SERVED + metrics.PUSHED:
        assert f"`{name}`" in guide, f"docs/operations.md does not describe {name}"
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in guide, f"docs/operations.md does not explain {rule['alert']}"
