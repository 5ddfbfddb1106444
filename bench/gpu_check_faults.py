"""GPU check: a rank dies under NCCL (issue 20, part 1; bench/gpu_check_run.py runs this phase).

nccl_dead_rank -- 2 ranks of launch/score.py under torchrun on one GPU, over the route nccl_smoke
               picked, on nccl_layouts' small FP8 checkpoint, EP=2, --dist-timeout 20 and a
               snapshot every step. First an uninterrupted run (the reference); then the same
               command, and once every rank has a snapshot of step >= 2, SIGKILL to rank 1's
               worker. Checks: torchrun exits non-zero; it exits sooner after the kill than the
               dist timeout (the survivor does not sit in an NCCL collective until the timeout);
               its summary names rank 1 and SIGKILL; no output directory appears; every rank's last
               snapshot loads; the same command with --resume resumes there and its scores equal
               the reference bitwise.
The dry mode (CPU CI) runs the same code with gloo. The fault is injected from outside, as in
tests/test_rank_faults.py, with the helpers of tests/faults.py (standard library only).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_lib as lib  # noqa: E402
from gpu_check_nccl import _tiny_fp8_checkpoint, smoke_route_env  # noqa: E402

sys.path.insert(0, str(lib.REPO / "tests"))
from faults import run_then_fault, snapshot_for_every_rank, snapshot_steps, worker_pid  # noqa: E402

DIST_TIMEOUT_S = 20  # --dist-timeout of these runs: the survivor must be gone well before it
KILL_AT_STEP = 2  # SIGKILL once every rank has a snapshot of this step (or a later one)


def _score_cmd(ckpt: Path, demos: list[str], out: Path) -> list:
    cmd = lib.torchrun(2) + [lib.REPO / "launch/score.py", "--hf-checkpoint", ckpt, "--output", out,
                             "--dtype", "float32", "--expert-parallel", 2, "--checkpoint-every", 1,
                             "--dist-timeout", DIST_TIMEOUT_S]
    for spec in demos:
        cmd += ["--demos", spec]
    return cmd


def _inprogress(out: Path) -> Path:
    return out.with_name(out.name + ".inprogress")


def _kill_rank1(torchrun_pid: int) -> None:
    pid = worker_pid(torchrun_pid, 1)
    if pid is None:
        raise RuntimeError("no rank 1 worker under torchrun")
    os.kill(pid, signal.SIGKILL)


def _fault(cmd: list, out: Path, env: dict, timeout: float, work: Path) -> dict:
    """The killed run: what torchrun did after rank 1's SIGKILL."""
    try:
        faulted = run_then_fault(cmd, ready=snapshot_for_every_rank(_inprogress(out), 2, min_step=KILL_AT_STEP),
                                 fault=_kill_rank1, env=env, cwd=lib.REPO, timeout=timeout)
    except (AssertionError, TimeoutError, RuntimeError) as exc:  # ended early / never got there
        return {"error": str(exc)}
    except subprocess.TimeoutExpired:  # killed (the whole tree) when the phase's time ran out
        return {"error": f"torchrun still running at the phase's deadline ({timeout:.0f} s after its start)"}
    (work / "faulted.log").write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{faulted.stdout}\n"
                                      f"--- stderr\n{faulted.stderr}\n")
    root_cause = faulted.stderr.split("Root Cause", 1)[-1] if "Root Cause" in faulted.stderr else ""
    return {"rc": faulted.returncode, "seconds_kill_to_exit": round(faulted.seconds_to_exit, 3),
            "summary_names_rank1": bool(re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause)),
            "summary_names_sigkill": "SIGKILL" in root_cause,
            "survivor_reported_collective_failure": "a collective with the other ranks failed" in faulted.stderr,
            # how each rank ended, from torchrun's summary: on NCCL -6 = the watchdog's abort after the
            # dist timeout, -15 / -9 = torchrun's SIGTERM / SIGKILL, 1 = the collective's error
            "summary_exitcodes": {r: int(c) for r, c in re.findall(
                r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", faulted.stderr)},
            "stderr_tail": faulted.stderr[-3000:]}


def _snapshots_load(out: Path) -> dict:
    """The latest step every rank has a snapshot of, and whether each rank's file there loads."""
    import torch

    steps = snapshot_steps(_inprogress(out))
    common = set.intersection(*steps.values()) if len(steps) == 2 else set()
    if not common:
        return {"step": None, "loads": False, "detail": f"snapshots per rank: {steps}"}
    step, detail = max(common), []
    for rank in (0, 1):
        try:
            state = torch.load(_inprogress(out) / f"state_rank{rank}_step{step}.pt")
            if state["next_step"] != step:
                detail.append(f"rank {rank}: next_step {state['next_step']} in the step-{step} file")
        except Exception as exc:  # noqa: BLE001 - recorded
            detail.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return {"step": step, "loads": not detail, "detail": "; ".join(detail) or f"step {step}, both ranks"}


def _bitwise_equal(got_dir: Path, ref_dir: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    got, ref = load_file(str(got_dir / "scores.safetensors")), load_file(str(ref_dir / "scores.safetensors"))
    if sorted(got) != sorted(ref):
        return False, f"tensors {sorted(got)} vs {sorted(ref)}"
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    return not differ, f"differ: {differ}" if differ else f"{len(ref)} tensors bitwise equal"


def phase_nccl_dead_rank(ctx: dict) -> dict:
    env = smoke_route_env(ctx, "the ranks")
    work = Path(ctx["workdir"]) / "dead_rank"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = _tiny_fp8_checkpoint(Path(ctx["workdir"]) / "layouts")  # nccl_layouts' one, made if missing
    # enough steps that the run is still going when the kill lands (a GPU steps far faster)
    demos = lib.write_demo_files(work, per_domain=12 if ctx["dry"] else 40, lengths=[24, 40, 32], vocab=512)
    deadline = time.monotonic() + ctx["timeout_s"] - 5
    result = {"dist_timeout_s": DIST_TIMEOUT_S, "kill_at_step": KILL_AT_STEP, "checks": []}
    checks = result["checks"]

    ref, out = work / "reference", work / "scores"
    result["reference"] = run = lib.run_cmd(_score_cmd(ckpt, demos, ref), timeout=deadline - time.monotonic(),
                                            env=env, log=work / "reference.log")
    if not lib.check(checks, "uninterrupted 2-rank run", run["rc"] == 0, lib.failure_text(run) if run["rc"] else ""):
        return result
    lib.save_partial(ctx, result)
    cmd = _score_cmd(ckpt, demos, out)
    result["fault"] = fault = _fault(cmd, out, env, deadline - time.monotonic(), work)
    if not lib.check(checks, "rank 1 killed mid-run, torchrun exited", "error" not in fault, fault.get("error", "")):
        return result
    lib.check(checks, "torchrun exits non-zero", fault["rc"] != 0, f"exit {fault['rc']}")
    lib.check(checks, "exit sooner than the dist timeout", fault["seconds_kill_to_exit"] < DIST_TIMEOUT_S,
              f"{fault['seconds_kill_to_exit']} s from the SIGKILL to torchrun's exit; --dist-timeout {DIST_TIMEOUT_S}")
    lib.check(checks, "summary names rank 1 and SIGKILL", fault["summary_names_rank1"] and fault["summary_names_sigkill"],
              f"rank 1: {fault['summary_names_rank1']}, SIGKILL: {fault['summary_names_sigkill']}")
    lib.check(checks, "no output directory", not out.exists(), str(out))
    result["snapshot"] = snap = _snapshots_load(out)
    lib.check(checks, "last snapshot of every rank loads", snap["loads"], snap["detail"])
    lib.save_partial(ctx, result)

    result["resume"] = run = lib.run_cmd(cmd + ["--resume"], timeout=deadline - time.monotonic(), env=env,
                                         log=work / "resume.log")
    if not lib.check(checks, "--resume finishes", run["rc"] == 0, lib.failure_text(run) if run["rc"] else ""):
        return result
    resumed = re.search(r"resuming at step (\d+)/", (work / "resume.log").read_text())
    result["resumed_at_step"] = int(resumed.group(1)) if resumed else None
    lib.check(checks, "resumed at the last snapshot", result["resumed_at_step"] == snap["step"],
              f"resumed at {result['resumed_at_step']}, last common snapshot {snap['step']}")
    equal, detail = _bitwise_equal(out, ref)
    lib.check(checks, "resumed scores bitwise equal to the uninterrupted run", equal, detail)
    return result
