"""Dependencies a cluster can install: pyproject.toml declares tested ranges, constraints.txt the
exact versions CI runs, and the two must agree (every pin inside its range, every requirement
pinned). The install itself is checked by CI: `make test` builds its venv with
`pip install -c constraints.txt -e '.[test]'` from a clean clone."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def test_every_requirement_is_pinned_inside_its_range():
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} (pyproject.toml) has no exact version in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")


def test_torch_range_starts_at_the_gpu_checks_torch():
    """The lower bound is the oldest torch a GPU check ran on (its JSON records the version)."""
    import json

    checked = Version(json.loads((REPO / "bench/results/gpu_check_h200.json").read_text())["torch"].split("+")[0])
    torch_req = next(r for r in _requirements() if r.name == "torch")
    assert torch_req.specifier.contains(checked), (checked, str(torch_req))
    assert not torch_req.specifier.contains(Version(f"{checked.major}.{checked.minor - 1}")), str(torch_req)
    assert torch_req.specifier.contains(_pins()["torch"])


def test_this_environment_satisfies_the_ranges():
    """Whatever torch this environment came with (CI's pin, or a cluster's own CUDA build in range),
    the installed distributions are inside the declared ranges and pip sees no conflict."""
    for requirement in _requirements():
        installed = Version(importlib.metadata.version(requirement.name))
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"installed {requirement.name} {installed} is outside pyproject.toml's {requirement}")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_make_installs_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-e " in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
