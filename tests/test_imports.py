"""The package's own import graph: every import of a deploy module resolves, there are no cycles (imports inside
functions count: a lazy import that closes a cycle still marks code without a home), and serving needs no torch."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "deploy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The deploy modules `path` imports, anywhere in the file (TYPE_CHECKING blocks included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module  # fmt: skip
            if not base.startswith("deploy"):
                continue
            for alias in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{base}.{alias.name}"
                found.add(sub if importlib.util.find_spec(base) and _is_module(sub) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("deploy")}
    return found - {name}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_resolves():
    missing = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets if not _is_module(t))
    assert not missing


def test_no_import_cycles():
    # a package's __init__ importing its own submodules is not a cycle of design; edges into a package are
    graph = {m: {t for t in ts if not (m in GRAPH and t.startswith(m + "."))} for m, ts in GRAPH.items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_import_deploy_is_light():
    # the serving install (`pip install edge-deploy`: `deploy run`) has no torch, onnx, pydantic or yaml
    heavy = ("torch", "onnx", "onnxruntime", "pydantic", "yaml")
    code = f"import sys, deploy, deploy.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
