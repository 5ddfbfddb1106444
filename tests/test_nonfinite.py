"""Non-finite values (issue 20, part 4), in real processes.

- A NaN in an expert's weight stops scoring at start, naming the MoE layer and the expert (global
  id, here on rank 1 of EP = 2): the check is the one tiny expert forward made when the scorer
  attaches, so it costs nothing per forward.
- A NaN produced in the forward (a NaN attention weight): without --check-finite the run ends at
  the score write, naming the layer and the experts whose score is non-finite, with no output;
  with --check-finite it stops at the first forward, naming the layer it entered.
- A score file never holds a non-finite value (write_score_file refuses, naming layer and expert;
  nothing is written), and selection and export refuse one that does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.io import ScoreFileError, write_score_file
from megatron_easyep.pruning.selection import SelectionError, load_scores

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SCORE = REPO / "launch" / "score.py"
EXPORT = REPO / "converters" / "export_pruned.py"
TIMEOUT = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EASYEP_ALLOW_UNEXPECTED_TENSORS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _run(cmd):
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=TIMEOUT)
    return proc, time.monotonic() - t0


def _with_nan(ckpt: Path, dst: Path, tensor: str) -> Path:
    """A copy of `ckpt` with element [0, 0] of `tensor` set to NaN (the source is never modified)."""
    shutil.copytree(ckpt, dst)
    shards = [p for p in dst.glob("*.safetensors")]
    for shard in shards:
        tensors = load_file(shard)
        if tensor in tensors:
            tensors[tensor] = tensors[tensor].clone()
            tensors[tensor][0, 0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
            return dst
    raise AssertionError(f"{tensor} not in {ckpt}")


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("demos") / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?",
                                        "response": f"{i} + {i + 1} = {2 * i + 1}."}) + "\n" for i in range(8)))
    return f"{path}:math"


@pytest.fixture(scope="module")
def moe_layer(tiny_ckpt) -> int:
    return json.loads((tiny_ckpt / "config.json").read_text())["first_k_dense_replace"]


def _score(ckpt, demos, out, *args, nproc=0):
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc else [PYTHON]
    return _run(launcher + [SCORE, "--hf-checkpoint", ckpt, "--demos", demos, "--output", out,
                            "--checkpoint-every", 2, "--expert-parallel", max(nproc, 1), *args])


def test_nan_expert_weight_stops_at_start_naming_layer_and_expert(tiny_ckpt, demos, moe_layer, tmp_path):
    experts = json.loads((tiny_ckpt / "config.json").read_text())["n_routed_experts"]
    expert = experts - 3  # held by rank 1 under EP = 2: the message gives the global id
    ckpt = _with_nan(tiny_ckpt, tmp_path / "ckpt", f"model.layers.{moe_layer}.mlp.experts.{expert}.down_proj.weight")
    out = tmp_path / "scores"
    proc, seconds = _score(ckpt, demos, out, nproc=2)
    print(f"NaN expert weight -> exit {proc.returncode} after {seconds:.1f} s (launch included)")
    assert proc.returncode != 0
    assert f"MoE layer {moe_layer}: expert(s) [{expert}] give non-finite outputs" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no .inprogress, no lock


def test_nan_in_the_forward_named_at_the_score_write_or_at_once(tiny_ckpt, demos, moe_layer, tmp_path):
    ckpt = _with_nan(tiny_ckpt, tmp_path / "ckpt", f"model.layers.{moe_layer}.self_attn.o_proj.weight")
    out = tmp_path / "scores"
    proc, seconds = _score(ckpt, demos, out)
    print(f"NaN in the forward, final check -> exit {proc.returncode} after {seconds:.1f} s (launch included)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(rf"error: non-finite scores \(NaN/Inf\), nothing written: '\w+': MoE layer {moe_layer}, "
                     r"expert\(s\) \[\d", proc.stderr), proc.stderr[-3000:]
    assert not out.exists() and not list(out.with_name("scores.inprogress").glob("scores.*"))

    proc, seconds = _score(ckpt, demos, tmp_path / "checked", "--check-finite")
    print(f"NaN in the forward, --check-finite -> exit {proc.returncode} after {seconds:.1f} s (launch included)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"non-finite values (NaN/Inf) in MoE layer {moe_layer}: the hidden states entering it"
            in proc.stderr), proc.stderr[-3000:]
    assert "snapshot at step" not in proc.stderr  # stopped in the first forward
    assert not (tmp_path / "checked").exists()


def _scores(layers, experts, nan_at=None):
    value = torch.arange(len(layers) * experts, dtype=torch.float64).reshape(len(layers), experts)
    if nan_at is not None:
        value[nan_at] = float("inf")
    return {"easyep": value, "easyep@math": value.clone()}


def test_score_file_write_refuses_non_finite_naming_layer_and_expert(tmp_path):
    layers = [3, 4, 7]
    with pytest.raises(ScoreFileError, match=r"'easyep': MoE layer 4, expert\(s\) \[5\]"):
        write_score_file(tmp_path / "s", _scores(layers, 8, nan_at=(1, 5)), layers, "h", ["math"])
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())


def test_selection_and_export_refuse_a_score_file_with_non_finite_values(tiny_ckpt, tmp_path):
    """A score file written past the check (another tool, an edit), with a valid sha256."""
    layers = [1, 2]
    directory = tmp_path / "scores"
    directory.mkdir()
    tensors = _scores(layers, 16, nan_at=(1, 9))
    io.write_tensors(directory / "scores.safetensors", tensors, metadata={"format": io.SCORE_FORMAT})
    meta = {"format": io.SCORE_FORMAT, "layers": layers, "metrics": ["easyep"], "domains": ["math"],
            "tokens": {}, "config_hash": "x", "tensors_sha256": io.file_sha256(directory / "scores.safetensors")}
    (directory / "scores.json").write_text(json.dumps(meta))
    with pytest.raises(SelectionError, match=r"non-finite scores \(NaN/Inf\) in 'easyep\S*': MoE layer 2, "
                                             r"expert\(s\) \[9\]"):
        load_scores(directory)
    proc, _ = _run([PYTHON, EXPORT, "--hf-checkpoint", tiny_ckpt, "--scores", directory, "--output",
                    tmp_path / "pruned", "--keep", 8, "--metric", "easyep"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "non-finite scores (NaN/Inf)" in proc.stderr and "MoE layer 2" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]
