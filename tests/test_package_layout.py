"""The runtime a pod needs stays separable from the local tools (README's layout table)."""

from __future__ import annotations

import ast
from pathlib import Path

import trainer

PACKAGE = Path(trainer.__file__).parent
#: Never run in a pod: `trainer launch`, `job run`, `bench`, `demo`, their supervisor, and `trainer plan`.
LOCAL_TOOLS = (
    "trainer.launch", "trainer.supervisor", "trainer.jobrunner", "trainer.bench", "trainer.demo", "trainer.estimate",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_local_tool(name: str) -> bool:
    return any(name == tool or name.startswith(tool + ".") for tool in LOCAL_TOOLS)


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_runtime_module_imports_a_local_tool():
    # cli.py dispatches to every command, so it names the tools; it imports them only when one is asked for.
    runtime = [p for p in PACKAGE.rglob("*.py") if not is_local_tool(module_name(p)) and p.name != "cli.py"]

    offenders = {module_name(p): sorted(filter(is_local_tool, imported_modules(p))) for p in runtime}

    assert len(runtime) > 30
    assert {name: tools for name, tools in offenders.items() if tools} == {}
