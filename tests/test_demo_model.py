"""`make demo` on the shipped model (models/demo-moe) prints the numbers committed next to it and shown
in the README: a drift in scoring, selection, export or evaluation changes a printed digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "demo-moe"


def _tables(stdout: str) -> dict[str, list[str]]:
    """The printed per-domain rows after each '-- full/pruned for X' header."""
    out, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("-- "):
            current = line.split(" (")[0]
            out[current] = []
        elif current and line.split() and line.split()[0] in ("code", "prose", "math"):
            out[current].append(line)
        elif line.startswith("=="):
            current = None
    return out


def test_shipped_model_demo_prints_the_committed_numbers(tmp_path):
    expected = json.loads((MODEL / "expected_demo.json").read_text())
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("TRAINED", "RETRAIN", "KEEP"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reusing the trained model in models/demo-moe" in proc.stdout
    for name in ("eval_full", "eval_pruned_math", "eval_pruned_code"):
        got = json.loads((tmp_path / "demo" / f"{name}.json").read_text())["results"]
        printed = {d: {"tokens": r["tokens"], "nll": f"{r['nll']:.4f}", "ppl": f"{r['ppl']:.3f}"}
                   for d, r in got.items()}
        assert printed == expected[name], name
    # the change column is pruned / full perplexity of the saved evaluations
    full = json.loads((tmp_path / "demo" / "eval_full.json").read_text())["results"]
    tables = _tables(proc.stdout)
    for name, header in (("eval_pruned_math", "-- pruned for math"), ("eval_pruned_code", "-- pruned for code")):
        pruned = json.loads((tmp_path / "demo" / f"{name}.json").read_text())["results"]
        for row in tables[header]:
            domain = row.split()[0]
            assert row.split()[-1] == f"{100 * (pruned[domain]['ppl'] / full[domain]['ppl'] - 1):+.1f}%", row
    # the README shows exactly what the demo printed for the two pruned models
    readme = (REPO / "README.md").read_text()
    for header, rows in _tables(proc.stdout).items():
        if header.startswith("-- pruned"):
            assert rows and all(row in readme for row in rows), (header, rows)


def test_a_failing_demo_step_stops_the_demo(tmp_path):
    """A model directory with a shard missing: the scoring step fails at open, and the demo stops
    there with the error (exit non-zero, nothing exported)."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(MODEL, broken)
    next((broken / "hf-fp8").glob("model-*.safetensors")).unlink()
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "OMP_NUM_THREADS": "1", "TRAINED": str(broken),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RETRAIN", None)
    bad = subprocess.run(["bash", str(REPO / "launch" / "demo.sh")], capture_output=True, text=True, env=env,
                         timeout=900, cwd=REPO)
    assert bad.returncode != 0
    assert "error" in bad.stderr.lower() and ".safetensors" in bad.stderr
    assert not (tmp_path / "demo" / "pruned_math").exists()
