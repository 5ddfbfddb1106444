"""The package layout: every module imports, and imports flow one way between stages
(analysis/training -> pruning/scoring -> mcore -> checkpoint), with no import cycle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_easyep"
# A stage may import from stages of lower rank, and from itself; never upwards or sideways.
# runtime (the shared run driver) sits between the model (mcore) and the jobs that drive it.
RANK = {"checkpoint": 0, "mcore": 1, "runtime": 1.5, "scoring": 2, "pruning": 2, "analysis": 3, "training": 3}


def _modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _imports(module: str, source: str | None = None) -> set[str]:
    """Every megatron_easyep module `module` imports, at top level or inside functions."""
    if source is None:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
        source = path.read_text()
    found = set()
    known = set(_modules())
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("megatron_easyep"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_easyep"):
            for a in node.names:  # `from pkg import module` names a module; `from module import x` does not
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found - {module}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_module_imports():
    for module in _modules():
        importlib.import_module(module)


def test_subpackages_have_a_docstring():
    for stage in RANK:
        doc = importlib.import_module(f"megatron_easyep.{stage}").__doc__
        assert doc and len(doc.split()) > 20, f"megatron_easyep/{stage}/__init__.py needs a one-paragraph docstring"
    assert set(RANK) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def _violations(module: str, imports: set[str]) -> list[str]:
    src, bad = _stage(module), []
    for target in sorted(imports):
        dst = _stage(target)
        if src is None or dst is None or dst == src:
            continue
        if RANK[dst] >= RANK[src]:
            bad.append(f"{module} imports {target} ({src} may only import from lower stages)")
    return bad


def test_imports_flow_one_way():
    bad = [line for module in _modules() for line in _violations(module, _imports(module))]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    modules = set(_modules())
    graph = {m: {t for t in _imports(m) if t in modules} for m in modules}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                chain = path + [node]
                pytest.fail("import cycle: " + " -> ".join(chain[chain.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_checker_catches_upward_and_sideways_imports():
    """Guard against a check that can never fail: a checkpoint module importing from analysis (at
    top level) and a scoring module importing from pruning (inside a function) are both caught."""
    up = _imports("megatron_easyep.checkpoint.reader", "from megatron_easyep.analysis import compare\n")
    assert up == {"megatron_easyep.analysis.compare"}
    assert _violations("megatron_easyep.checkpoint.reader", up)
    side = _imports("megatron_easyep.scoring.run",
                    "def f():\n    from megatron_easyep.pruning.export import export_pruned\n")
    assert side == {"megatron_easyep.pruning.export"}
    assert _violations("megatron_easyep.scoring.run", side)
    assert not _violations("megatron_easyep.analysis.compare", side)
