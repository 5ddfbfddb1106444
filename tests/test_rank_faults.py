"""A dead rank, a hung rank and Ctrl-C / SIGTERM, in real torchrun processes (issue 20, parts 1-2).

- SIGKILL to one rank mid-run: the other rank stops (gloo sees the closed socket; torchrun stops
  the rest), torchrun exits non-zero naming the dead rank as the root cause, the snapshots every
  rank wrote are intact, and --resume gives scores bitwise equal to an uninterrupted run.
- A rank that hangs: a collective on the other rank fails after --dist-timeout seconds (measured
  on this torch with gloo), not after gloo's 30 minute default.
- SIGTERM to torchrun and every rank (what SLURM does; torchrun forwards it again): every rank
  stops at the next step boundary with a snapshot there, no output directory appears, --resume
  finishes bitwise equal.
  SIGINT to a single process exits 130.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faults import run_then_fault, signal_tree, snapshot_for_every_rank, snapshot_steps, worker_pid

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SCORE = REPO / "launch" / "score.py"
TIMEOUT = 300
DIST_TIMEOUT = 20  # --dist-timeout of these runs: every fault must end well inside it


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EASYEP_ALLOW_UNEXPECTED_TENSORS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> str:
    """40 short demos: 20 steps per rank at EP = DP = 2, long enough to fault mid-run."""
    path = tmp_path_factory.mktemp("demos") / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?",
                                        "response": f"{i} + {i + 1} = {2 * i + 1}. " * 3}) + "\n"
                            for i in range(40)))
    return f"{path}:math"


def _cmd(ckpt, demos, out, nproc=2):
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc else [PYTHON]
    return launcher + [SCORE, "--hf-checkpoint", ckpt, "--demos", demos, "--output", out,
                       "--expert-parallel", max(nproc, 1), "--checkpoint-every", 1,
                       "--dist-timeout", DIST_TIMEOUT]


def _run(cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, demos, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "scores"
    proc = _run(_cmd(tiny_ckpt, demos, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / "scores.safetensors")


def _inprogress(out: Path) -> Path:
    return out.with_name(out.name + ".inprogress")


def _snapshots(out: Path) -> dict[int, set[int]]:
    return snapshot_steps(_inprogress(out))


def _resume_equals(cmd, out: Path, reference: dict) -> int:
    """--resume finishes; returns the step it resumed at; the scores equal the reference bitwise."""
    proc = _run(cmd + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = int(re.search(r"resuming at step (\d+)/", proc.stderr).group(1))
    got = load_file(out / "scores.safetensors")
    assert set(got) == set(reference)
    for key in reference:
        assert torch.equal(got[key], reference[key]), f"{key}: resumed scores differ from an uninterrupted run"
    assert not _inprogress(out).exists() and not (out.parent / f".{out.name}.lock").exists()
    return step


def test_dead_rank_stops_the_others_and_resume_is_bitwise_equal(tiny_ckpt, demos, reference, tmp_path):
    out = tmp_path / "scores"
    cmd = _cmd(tiny_ckpt, demos, out)

    def kill_rank1(torchrun_pid):
        pid = worker_pid(torchrun_pid, 1)
        assert pid is not None, "no rank 1 worker under torchrun"
        os.kill(pid, signal.SIGKILL)

    faulted = run_then_fault(cmd, ready=snapshot_for_every_rank(_inprogress(out), 2, min_step=2),
                             fault=kill_rank1, env=_env(), cwd=REPO, timeout=TIMEOUT)
    print(f"SIGKILL of rank 1 -> torchrun exit {faulted.returncode} after {faulted.seconds_to_exit:.2f} s")
    assert faulted.returncode != 0
    assert faulted.seconds_to_exit < DIST_TIMEOUT, "the surviving rank waited for the collective timeout"
    root_cause = faulted.stderr.split("Root Cause", 1)[1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause) and "SIGKILL" in root_cause, \
        f"torchrun's summary does not name rank 1 as the dead rank:\n{faulted.stderr[-2000:]}"
    assert not out.exists()
    snapshots = _snapshots(out)
    common = snapshots[0] & snapshots[1]
    assert max(common) >= 2
    for rank in (0, 1):  # the last snapshot of every rank loads
        state = torch.load(_inprogress(out) / f"state_rank{rank}_step{max(common)}.pt")
        assert state["next_step"] == max(common)
    assert _resume_equals(cmd, out, reference) == max(common)


def test_hung_rank_fails_the_collective_within_the_timeout(tmp_path):
    """gloo on this torch: a collective whose peer never joins fails after --dist-timeout (world
    group and Megatron's expert group alike), rather than after gloo's 30 min default."""
    timeout = 3
    proc = _run([TORCHRUN, "--standalone", "--nproc-per-node=2", REPO / "tests" / "hung_rank_worker.py", timeout])
    assert proc.returncode != 0
    found = re.search(r"^collective failed after ([\d.]+) s", proc.stdout, re.M)
    assert found, proc.stdout + proc.stderr[-2000:]
    print(found.group(0))
    assert timeout * 0.9 <= float(found.group(1)) < timeout + 5
    group = re.search(r"expert-group collective failed after ([\d.]+) s", proc.stdout)
    assert group and float(group.group(1)) < timeout + 5


def test_sigterm_stops_every_rank_at_a_step_boundary_and_resumes(tiny_ckpt, demos, reference, tmp_path):
    """SLURM-style: SIGTERM to every process of the step (torchrun and its workers), so each worker
    gets it twice (torchrun forwards it again): the repeat must not cut the snapshot short."""
    out = tmp_path / "scores"
    cmd = _cmd(tiny_ckpt, demos, out)
    faulted = run_then_fault(cmd, ready=snapshot_for_every_rank(_inprogress(out), 2, min_step=2),
                             fault=lambda pid: signal_tree(pid, signal.SIGTERM), env=_env(), cwd=REPO,
                             timeout=TIMEOUT)
    print(f"SIGTERM to torchrun and every rank -> exit {faulted.returncode} after {faulted.seconds_to_exit:.2f} s")
    assert faulted.returncode != 0
    assert faulted.seconds_to_exit < DIST_TIMEOUT
    stopped = re.search(r"stopped by SIGTERM at step boundary (\d+); snapshot at step \1", faulted.stderr)
    assert stopped, faulted.stderr[-3000:]
    step = int(stopped.group(1))
    assert not out.exists()
    snapshots = _snapshots(out)
    assert step in snapshots[0] and step in snapshots[1], snapshots  # every rank stopped at the same step
    assert _resume_equals(cmd, out, reference) == step


def test_sigint_single_process_exits_130_with_a_snapshot(tiny_ckpt, demos, tmp_path):
    out = tmp_path / "scores"
    faulted = run_then_fault(_cmd(tiny_ckpt, demos, out, nproc=0),
                             ready=snapshot_for_every_rank(_inprogress(out), 1, min_step=2),
                             fault=lambda pid: os.kill(pid, signal.SIGINT), env=_env(), cwd=REPO,
                             timeout=TIMEOUT)
    print(f"SIGINT to one process -> exit {faulted.returncode} after {faulted.seconds_to_exit:.2f} s")
    assert faulted.returncode == 130, faulted.stderr[-3000:]
    assert "Traceback" not in faulted.stderr
    step = int(re.search(r"stopped by SIGINT at step boundary (\d+)", faulted.stderr).group(1))
    assert step in _snapshots(out)[0] and not out.exists()
    assert not (out.parent / f".{out.name}.lock").exists()
