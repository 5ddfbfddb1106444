"""Two runs on one output, and writes that fail, in real processes (issue 20, parts 3 and 5).

- A second run on an output refuses at start, naming the holder of the lock beside the output
  (host, pid, start time); the first run finishes untouched. A lock whose holder died is
  recognised: scoring takes it over with --resume (and then gives scores bitwise equal to an
  uninterrupted run), export and the BF16 converter take it over by themselves.
- A write that fails (here the file size limit, RLIMIT_FSIZE, which needs no privileges; a real full
  disk, quota and read-only filesystem are in test_disk_faults.py) ends the BF16 conversion, the
  export and the scoring snapshot with a non-zero exit and a message naming the path and the OS
  error; no output and no staging directory is left, and a failed snapshot keeps the previous one.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faults import kill_tree, run_then_kill, snapshot_for_every_rank
from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.io import write_score_file
from megatron_easyep.checkpoint.reader import DeepseekV3Config

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SCORE = REPO / "launch" / "score.py"
EXPORT = REPO / "converters" / "export_pruned.py"
TO_BF16 = REPO / "converters" / "fp8_to_bf16.py"
TIMEOUT = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EASYEP_ALLOW_UNEXPECTED_TENSORS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _run(cmd, *, fsize: int | None = None):
    def limit():  # the file size limit, as `ulimit -f` would set it for the command
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=TIMEOUT, preexec_fn=limit if fsize else None)


def _score_cmd(ckpt, demos, out, *args):
    return [PYTHON, SCORE, "--hf-checkpoint", ckpt, "--demos", demos, "--output", out, "--checkpoint-every", 1,
            *args]


def _siblings(out: Path) -> list[str]:
    """Everything beside `out` that belongs to it (the output, its staging, lock, in-progress dirs)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def _wait_for(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 32])


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    gen = torch.Generator().manual_seed(1)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(4, 400, (12 + 2 * i,), generator=gen).tolist()})
                            + "\n" for i in range(6)))
    return path


@pytest.fixture(scope="module")
def reference(ckpt, demos, tmp_path_factory) -> Path:
    """An uninterrupted scoring run."""
    out = tmp_path_factory.mktemp("ref") / "scores"
    proc = _run(_score_cmd(ckpt, demos, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def scores(ckpt, tmp_path_factory) -> Path:
    """A score file for the export (written directly: the export is under test, not the scoring)."""
    config = DeepseekV3Config.load(ckpt)
    moe = list(config.moe_layer_ids)
    rows = torch.arange(len(moe) * config.n_routed_experts, dtype=torch.float64).reshape(len(moe), -1)
    return write_score_file(tmp_path_factory.mktemp("sc") / "scores", {"easyep": rows}, moe, config.config_hash, [],
                            architecture_hash=config.architecture_hash, storage_format=config.storage_format)


# --------------------------------------------------------------------------------------------
# two runs on one output
# --------------------------------------------------------------------------------------------


def test_a_second_scoring_run_refuses_and_the_first_finishes_untouched(ckpt, demos, reference, tmp_path):
    out = tmp_path / "scores"
    first = subprocess.Popen([str(c) for c in _score_cmd(ckpt, demos, out)], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: io.lock_path(out).exists() or first.poll() is not None)
        os.kill(first.pid, signal.SIGSTOP)  # hold the first run inside its lock while the second starts
        holder = json.loads(io.lock_path(out).read_text())
        assert holder["pid"] == first.pid and holder["host"] and holder["started"]
        started = time.monotonic()
        second = _run(_score_cmd(ckpt, demos, out, "--overwrite"))
        refused_in = time.monotonic() - started
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=TIMEOUT)
    assert second.returncode == 2, second.stderr[-3000:]
    line = [ln for ln in second.stderr.splitlines() if "error:" in ln][-1]
    assert f"pid {first.pid}" in line and holder["host"] in line and holder["started"] in line, line
    assert str(io.lock_path(out)) in line
    print(f"\nsecond run refused in {refused_in:.1f} s: {line}")
    assert first.returncode == 0, err[-3000:]
    got, ref = load_file(out / "scores.safetensors"), load_file(reference / "scores.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert _siblings(out) == ["scores"]  # lock released, nothing left beside the output


def test_a_dead_runs_lock_is_taken_over_by_resume(ckpt, demos, reference, tmp_path):
    out = tmp_path / "scores"
    cmd = _score_cmd(ckpt, demos, out)
    killed = run_then_kill(cmd, ready=snapshot_for_every_rank(out.with_name("scores.inprogress"), 1, min_step=2),
                           env=_env(), cwd=REPO, timeout=TIMEOUT)
    assert killed.killed and killed.returncode != 0
    holder = json.loads(io.lock_path(out).read_text())  # SIGKILL leaves the lock behind
    fresh = _run(cmd)
    assert fresh.returncode == 2, fresh.stderr[-3000:]
    line = [ln for ln in fresh.stderr.splitlines() if "error:" in ln][-1]
    assert "no longer running" in line and f"pid {holder['pid']}" in line and "--resume" in line, line
    resumed = _run(cmd + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over" in resumed.stderr and "resuming at step" in resumed.stderr
    got, ref = load_file(out / "scores.safetensors"), load_file(reference / "scores.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert _siblings(out) == ["scores"]


_HOLD = """
import sys, time
from megatron_easyep.checkpoint import io
with io.output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("tool", ["export", "to_bf16"])
def test_export_and_conversion_refuse_a_held_output_and_take_over_a_dead_ones(tool, ckpt, scores, tmp_path):
    out = tmp_path / "out"
    cmd = ([PYTHON, EXPORT, "--hf-checkpoint", ckpt, "--scores", scores, "--output", out, "--keep", 8,
            "--metric", "easyep"] if tool == "export" else [PYTHON, TO_BF16, "--hf-checkpoint", ckpt, "--output", out])
    holder = subprocess.Popen([PYTHON, "-c", _HOLD, str(out)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _run(cmd)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"pid {holder.pid}" in refused.stderr and "in use" in refused.stderr, refused.stderr[-2000:]
        assert _siblings(out) == [".out.lock"]
    finally:
        kill_tree(holder.pid)
        holder.wait()
    assert io.lock_path(out).exists()  # the dead holder's lock is still there...
    done = _run(cmd)  # ...and taken over
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over" in done.stderr
    assert _siblings(out) == ["out"]


# --------------------------------------------------------------------------------------------
# write failures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["export", "to_bf16"])
def test_a_failing_write_names_the_path_and_leaves_nothing(tool, ckpt, scores, tmp_path):
    out = tmp_path / "out"
    cmd = ([PYTHON, EXPORT, "--hf-checkpoint", ckpt, "--scores", scores, "--output", out, "--keep", 8,
            "--metric", "easyep"] if tool == "export" else [PYTHON, TO_BF16, "--hf-checkpoint", ckpt, "--output", out])
    limit = min(p.stat().st_size for p in ckpt.glob("*.safetensors")) // 2  # every shard is larger
    started = time.monotonic()
    proc = _run(cmd, fsize=limit)
    print(f"\n{tool}: failed write ended in {time.monotonic() - started:.1f} s")
    assert proc.returncode != 0
    line = [ln for ln in proc.stderr.splitlines() if "error:" in ln][-1]
    assert str(out) in line and "File too large" in line, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _siblings(out) == [], _siblings(out)
    assert _run(cmd).returncode == 0  # the same command, with room, succeeds


def test_a_failing_snapshot_keeps_the_previous_one_and_resume_finishes(ckpt, demos, reference, tmp_path):
    out = tmp_path / "scores"
    work = out.with_name("scores.inprogress")
    cmd = _score_cmd(ckpt, demos, out)
    killed = run_then_kill(cmd, ready=snapshot_for_every_rank(work, 1, min_step=2), env=_env(), cwd=REPO,
                           timeout=TIMEOUT)
    assert killed.killed
    before = {p.name: p.read_bytes() for p in work.glob("state_rank0_step*.pt")}
    limit = min(len(b) for b in before.values()) // 2  # no snapshot fits any more
    failed = _run(cmd + ["--resume"], fsize=limit)
    assert failed.returncode != 0
    line = [ln for ln in failed.stderr.splitlines() if "error:" in ln][-1]
    assert str(work) in line and "state_rank0_step" in line and "File too large" in line, failed.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in work.glob("state_rank0_step*.pt")} == before  # previous snapshots intact
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary left
    assert not out.exists()
    resumed = _run(cmd + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, ref = load_file(out / "scores.safetensors"), load_file(reference / "scores.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert _siblings(out) == ["scores"]
