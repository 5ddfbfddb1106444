"""The README cannot rot: its quick-path commands (the fenced blocks after `<!-- readme-test -->`)
run as printed, on the shipped model and on a tiny checkpoint, and write what the README says they
write. Plus cheap checks: length, links, every marked step present."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARKER = "<!-- readme-test -->"
BIN = Path(sys.executable).parent


def marked_blocks(text: str) -> list[str]:
    """The bash blocks that directly follow a marker line, in order."""
    blocks = []
    for match in re.finditer(re.escape(MARKER) + r"\s*\n```bash\n(.*?)\n```", text, re.S):
        blocks.append(match.group(1))
    assert text.count(MARKER) == len(blocks), "a readme-test marker is not followed by a ```bash block"
    return blocks


def test_readme_is_a_short_guide_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text):
        if target.startswith("http"):
            continue
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"
    blocks = marked_blocks(text)
    joined = "\n".join(blocks)
    for step in ("converters/plan.py", "launch/score.py", "converters/export_pruned.py", "launch/evaluate.py",
                 "launch/routing_drift.py"):
        assert step in joined, f"the README's tested quick path lost {step}"


def test_docs_open_with_their_question():
    for doc in sorted((REPO / "docs").glob("*.md")):
        head = "\n".join(doc.read_text().splitlines()[:8])
        assert "question" in head.lower() or "?" in head, f"{doc.name} does not open with the question it answers"


def _run_quick_path(tmp_path: Path, **variables) -> dict[str, subprocess.CompletedProcess]:
    settings, *steps = marked_blocks(README.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT", "CALIB", "HELDOUT", "KEEP", "OUT")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OUT=str(tmp_path / "out"),
               EASYEP_WARNINGS_LOG_DIR=str(tmp_path / "logs"), **variables)
    results = {}
    for step in steps:
        script = "set -euo pipefail\n" + settings + "\n" + step + "\n"
        name = re.search(r"(converters|launch)/(\w+)\.py", step).group(2)
        proc = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO, env=env, timeout=600)
        assert proc.returncode == 0, f"README step {name} failed:\n{step}\n{proc.stdout[-6000:]}"
        results[name] = proc
    return results


def _check_outputs(out: Path, results, keep: int) -> None:
    assert (out / "scores" / "scores.safetensors").is_file() and (out / "scores" / "scores.json").is_file()
    config = json.loads((out / "pruned" / "config.json").read_text())
    assert config["n_routed_experts"] == keep
    pruning = json.loads((out / "pruned" / "pruning.json").read_text())
    assert all(len(ids) == keep for ids in pruning["kept_experts"].values())
    assert (out / "pruned" / "preflight.json").is_file()
    full = json.loads((out / "eval_full.json").read_text())["results"]
    pruned = json.loads((out / "eval_pruned.json").read_text())["results"]
    assert set(full) == set(pruned) == {"math"} and pruned["math"]["tokens"] == full["math"]["tokens"] > 0
    assert (out / "pruned" / "routing_drift.json").is_file()
    # a quiet launch: the first progress line comes right after rank 0's note on where the logs are
    lines = results["score"].stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "tokens" in line and re.search(r"\d+/\d+", line))
    assert first <= 3, "\n".join(lines[:first + 1])
    assert "UserWarning" not in results["score"].stdout and "IS DEPRECATED" not in results["score"].stdout


def test_quick_path_on_the_shipped_model(tmp_path):
    heldout = tmp_path / "math_heldout.jsonl"  # the README's held-out file, shortened for CI time
    heldout.write_text("".join((REPO / "models/demo-moe/demos/math_heldout.jsonl").read_text()
                               .splitlines(keepends=True)[:16]))
    results = _run_quick_path(tmp_path, HELDOUT=str(heldout))
    assert "layouts" in results["plan"].stdout.lower() or "PP" in results["plan"].stdout
    _check_outputs(tmp_path / "out", results, keep=8)


@pytest.fixture
def tiny_demos(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 3}?", "response": f"{i} + {i + 3} = {2 * i + 3}."})
                            + "\n" for i in range(20)))
    return path


def test_quick_path_on_a_tiny_checkpoint(tiny_checkpoint_factory, tiny_demos, tmp_path):
    ckpt = tiny_checkpoint_factory()
    experts = json.loads((Path(ckpt) / "config.json").read_text())["n_routed_experts"]
    results = _run_quick_path(tmp_path, CKPT=str(ckpt), CALIB=str(tiny_demos), HELDOUT=str(tiny_demos),
                              KEEP=str(experts // 2))
    _check_outputs(tmp_path / "out", results, keep=experts // 2)
