"""Fixtures of the chart, manifest and image tests (the helpers are in chart_helpers.py)."""

from __future__ import annotations

import pytest
from chart_helpers import KubernetesSchemas


@pytest.fixture(scope="session")
def k8s_schemas() -> KubernetesSchemas:
    """Strict Kubernetes OpenAPI schemas (kubernetes-validate), one validator per kind and version."""
    return KubernetesSchemas()
