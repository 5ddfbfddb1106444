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


# --------------------------------------------------------------------------------------------
# The Megatron boundary: only mcore/compat/ knows Megatron-Core internals
# --------------------------------------------------------------------------------------------

COMPAT = PACKAGE / "mcore" / "compat"


def _is_megatron(module: str | None) -> bool:
    return bool(module) and (module == "megatron" or module.startswith("megatron."))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _megatron_internals(source: str) -> list[str]:
    """Private Megatron names imported, `._private` attributes read off Megatron names, and
    assignments (or setattr/delattr) onto Megatron modules, classes or their attributes."""
    tree = ast.parse(source)
    bound: set[str] = set()  # local names bound to Megatron modules/classes/functions
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_megatron(a.name):
                    if any(_private(p) for p in a.name.split(".")):
                        bad.append(f"line {node.lineno}: import {a.name} (private module)")
                    bound.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and _is_megatron(node.module):
            if any(_private(p) for p in node.module.split(".")):
                bad.append(f"line {node.lineno}: from {node.module} import ... (private module)")
            for a in node.names:
                if _private(a.name):
                    bad.append(f"line {node.lineno}: from {node.module} import {a.name} (private name)")
                bound.add(a.asname or a.name)

    def rooted(expr) -> str | None:
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) and expr.id in bound else None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)) and rooted(target):
                bad.append(f"line {node.lineno}: assignment onto {ast.unparse(target)} (monkey-patching Megatron)")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
                and node.args and rooted(node.args[0])):
            bad.append(f"line {node.lineno}: {node.func.id}({ast.unparse(node.args[0])}, ...) (monkey-patching Megatron)")
        if isinstance(node, ast.Attribute) and _private(node.attr) and rooted(node.value):
            bad.append(f"line {node.lineno}: {ast.unparse(node)} (private Megatron attribute)")
    return bad


def test_only_compat_touches_megatron_internals():
    """The package, its launchers and benches (tests may break Megatron on purpose)."""
    bad = []
    roots = [PACKAGE, PACKAGE.parent / "launch", PACKAGE.parent / "bench"]
    for path in sorted(p for root in roots if root.is_dir() for p in root.rglob("*.py")):
        if COMPAT in path.parents:
            continue
        bad += [f"{path.relative_to(PACKAGE.parent)}: {line}" for line in _megatron_internals(path.read_text())]
    assert not bad, "only megatron_easyep/mcore/compat/ may touch Megatron-Core internals:\n" + "\n".join(bad)


def test_megatron_internals_checker_can_fail():
    """Each kind the boundary check looks for, in a snippet, is caught; public use is not."""
    assert _megatron_internals("from megatron.core.parallel_state import get_data_parallel_group\n"
                               "from megatron.core import parallel_state\n"
                               "parallel_state.get_data_parallel_group()\n") == []
    cases = {
        "from megatron.core.transformer.moe.moe_utils import _private_helper\n": "private name",
        "from megatron.core._rank_utils import log_single_rank\n": "private module",
        "from megatron.core.transformer.moe import moe_utils\nmoe_utils.group_limited_topk = f\n": "monkey-patching",
        "from megatron.core.tensor_parallel import mappings\nx = mappings._AllToAll\n": "private Megatron attribute",
        "import megatron.core.tensor_parallel.mappings as m\nsetattr(m._AllToAll, 'forward', f)\n": "monkey-patching",
        "from megatron.core.transformer.moe.router import TopKRouter\nTopKRouter.forward = f\n": "monkey-patching",
        "def g():\n    from megatron.core.models.gpt import gpt_model\n    del gpt_model.logger\n": "monkey-patching",
    }
    for source, kind in cases.items():
        found = _megatron_internals(source)
        assert found and any(kind in line for line in found), (source, found)


# --------------------------------------------------------------------------------------------
# the synthetic checkpoint generator is test and bench tooling
# --------------------------------------------------------------------------------------------

TINY = "megatron_easyep.checkpoint.tiny"
# where production code lives; converters/make_tiny_checkpoint.py is the generator's own CLI
PRODUCTION_DIRS = ("megatron_easyep", "launch", "converters")
TINY_USERS_ALLOWED = {"megatron_easyep/checkpoint/tiny.py", "converters/make_tiny_checkpoint.py"}


def _imports_tiny(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == TINY or a.name.startswith(TINY + ".") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == TINY or (node.module == "megatron_easyep.checkpoint"
                                       and any(a.name == "tiny" for a in node.names)):
                return True
    return False


def test_production_does_not_import_the_synthetic_generator():
    root = PACKAGE.parent
    offenders = []
    for directory in PRODUCTION_DIRS:
        for path in sorted((root / directory).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel not in TINY_USERS_ALLOWED and _imports_tiny(path.read_text()):
                offenders.append(rel)
    assert not offenders, f"production code imports {TINY} (test and bench tooling): {offenders}"


def test_tiny_import_check_can_fail():
    assert _imports_tiny("def f():\n    from megatron_easyep.checkpoint.tiny import build_config\n")
    assert _imports_tiny("from megatron_easyep.checkpoint import io, tiny\n")
    assert _imports_tiny("import megatron_easyep.checkpoint.tiny as t\n")
    assert not _imports_tiny("from megatron_easyep.checkpoint import io\nimport megatron_easyep.checkpoint.tinyx\n")
