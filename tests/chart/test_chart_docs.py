"""Every documented chart example renders and is valid Kubernetes.

The examples are read from the Markdown itself (docs/helm.md, README.md), so a new example is
tested as soon as it is written: each `helm install|upgrade|template` command of a ```sh block
is rendered with `helm template` and the command's own flags, and each ```yaml block that is a
values snippet (no `kind:`) is rendered on top of the required values. Every object is then
validated, strict, against the schemas of K8S_VERSIONS.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

import pytest
import yaml
from chart_helpers import CHART, NAMESPACE, OPERATOR, REQUIRED, ROOT, helm, kubernetes_errors, run

DOCUMENTS = ("docs/helm.md", "README.md")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: Flags of helm install/upgrade that `helm template` takes as they are (name -> takes a value).
_PASSED = {"--set": True, "--set-string": True, "--set-json": True, "-f": True, "--values": True}
_NAMESPACE = ("-n", "--namespace")
_DROPPED = {"--create-namespace": False, "--reuse-values": False, "--wait": False, "--atomic": False}


@dataclass(frozen=True)
class Example:
    where: str  # file:line
    kind: str  # "command" or "values"
    text: str

    def __str__(self) -> str:
        return self.where


def blocks(path: str) -> list[tuple[str, str, int]]:
    """(language, body, line) of each fenced code block of a Markdown file."""
    text = (ROOT / path).read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _FENCE.finditer(text)]


def helm_commands(body: str) -> list[str]:
    """The helm install/upgrade/template commands of a shell block (continuations joined)."""
    lines = body.replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines if re.match(r"\s*helm (install|upgrade|template)\b", line)]


def examples() -> list[Example]:
    found = []
    for path in DOCUMENTS:
        for lang, body, line in blocks(path):
            if lang == "sh":
                found += [Example(f"{path}:{line}", "command", cmd) for cmd in helm_commands(body)]
            elif lang == "yaml" and not any("kind" in (d or {}) for d in yaml.safe_load_all(body)):
                found.append(Example(f"{path}:{line}", "values", body))
    return found


EXAMPLES = examples()


def template_args(command: str, base_file: str) -> list[str]:
    """`helm template` arguments equivalent to a documented install/upgrade command.

    A command that builds on values it does not show (--reuse-values, or a values file that is not
    in the repository, like `-f my-values.yaml`) gets the required dataset and output first.
    """
    words = shlex.split(command)[2:]  # after "helm install"
    positional, flags, needs_base = [], [], False
    namespace = NAMESPACE
    while words:
        word = words.pop(0)
        name, _, inline = word.partition("=")
        if name in _NAMESPACE:
            namespace = inline or words.pop(0)
        elif name in _PASSED:
            value = inline or words.pop(0)
            if name in ("-f", "--values") and not (ROOT / value).is_file():
                needs_base = True
                continue
            flags += [name, str(ROOT / value) if name in ("-f", "--values") else value]
        elif name in _DROPPED:
            needs_base |= name == "--reuse-values"
        elif word.startswith("-"):
            raise AssertionError(f"unknown helm flag {word} in a documented example: teach test_chart_docs.py")
        else:
            positional.append(word)
    release, chart = positional
    assert ROOT / chart == CHART, f"the example installs {chart}, not the chart in this repository"
    base = ["-f", base_file] if needs_base else []
    return [release, str(CHART), "--namespace", namespace, *base, *flags]


def render_example(example: Example, tmp_path) -> list[dict]:
    base, snippet = tmp_path / "required.yaml", tmp_path / "snippet.yaml"
    base.write_text(json.dumps(REQUIRED))
    if example.kind == "command":
        args = template_args(example.text, str(base))
    else:
        snippet.write_text(example.text)
        args = ["flowers", str(CHART), "--namespace", NAMESPACE, "-f", str(base), "-f", str(snippet)]
    proc = run([helm(), "template", *args, *OPERATOR], check=False)  # a cluster with the Prometheus Operator
    assert proc.returncode == 0, f"{example} does not render: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_documents_hold_the_examples_this_test_reads():
    counts = {kind: sum(e.kind == kind for e in EXAMPLES) for kind in ("command", "values")}

    assert counts["command"] >= 7 and counts["values"] >= 1, counts  # the extraction found them
    assert any(e.where.startswith("README.md") for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_every_documented_example_renders_into_valid_kubernetes(example, k8s_schemas, tmp_path):
    docs = render_example(example, tmp_path)
    errors = kubernetes_errors(docs, k8s_schemas)

    assert any(d["kind"] == "Job" for d in docs)
    assert not errors, "\n".join(errors)
