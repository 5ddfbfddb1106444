"""A full disk (ENOSPC), a full quota (EDQUOT) and a read-only filesystem (EROFS), met for real
(tests/disk_faults.py mounts a small filesystem; skipped where mounting is not permitted) during:
the scoring snapshot, the final score write, the export, the BF16 conversion and the comparison's
evaluation store (issue 20, part 5; the file size limit is in test_output_faults.py).

Each run ends non-zero with one line naming the path and the OS error, no traceback; no output and
no staging directory is left; the snapshots (or stored evaluations) written before the fault are
intact, and once the room is back `--resume` finishes with results bitwise equal to an
uninterrupted run (the comparison's resume is run once, after ENOSPC: for every fault the store it
reads is checked to be as it was before the fault). A read-only filesystem cannot have anything
removed: there the run's lock stays, and is taken over by the next run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from disk_faults import KINDS, STRERROR, Paused, require_mounting, small_filesystem
from faults import run_then_fault
from megatron_easyep.checkpoint.io import write_score_file
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.scoring.demo_data import write_demo_files

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TIMEOUT = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EASYEP_ALLOW_UNEXPECTED_TENSORS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=TIMEOUT)


def _fault_run(cmd, ready: str, fault: Paused):
    """Run `cmd`; when its stderr shows `ready`, hold it and apply the fault. Returns the run and
    the seconds from the end of the fault to the exit."""
    run = run_then_fault([str(c) for c in cmd], ready=lambda err: ready in err, fault=fault, env=_env(),
                         cwd=REPO, timeout=TIMEOUT)
    return run, run.seconds_to_exit - fault.applied_in


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if "error:" in ln][-1]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} if directory.is_dir() else {}


def _report(what: str, kind: str, seconds: float, line: str) -> None:
    print(f"\n{what} [{kind}]: exit {seconds:.2f} s after the fault: {line}")


@pytest.fixture(scope="module", autouse=True)
def mounting(tmp_path_factory) -> None:
    """Every test here mounts: where that is not permitted, skip before the module's costly fixtures."""
    require_mounting(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 32])


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    """12 demonstrations: 12 scoring steps, room for a fault after a snapshot and before the end."""
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    gen = torch.Generator().manual_seed(2)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(4, 400, (12 + i,), generator=gen).tolist()})
                            + "\n" for i in range(12)))
    return path


def _score_cmd(ckpt, demos, out, *args):
    return [PYTHON, REPO / "launch" / "score.py", "--hf-checkpoint", ckpt, "--demos", demos, "--output", out, *args]


@pytest.fixture(scope="module")
def reference(ckpt, demos, tmp_path_factory) -> dict[str, torch.Tensor]:
    """An uninterrupted scoring run's scores."""
    out = tmp_path_factory.mktemp("ref") / "scores"
    proc = _run(_score_cmd(ckpt, demos, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / "scores.safetensors")


# --------------------------------------------------------------------------------------------
# scoring: a snapshot after the first one, then (resumed) the final score write, then --resume
# --------------------------------------------------------------------------------------------


def _check_scoring_failure(kind: str, fs, failed, held: dict, names: str) -> str:
    out, work = fs.mount / "scores", fs.mount / "scores.inprogress"
    assert failed.returncode != 0
    line = _error_line(failed.stderr)
    assert str(work) in line and names in line and STRERROR[kind] in line, failed.stderr[-3000:]
    snapshots = {n: b for n, b in _files(work).items() if n.startswith("state_rank0_step")}
    assert snapshots == {n: b for n, b in held.items() if n.startswith("state_rank0_step")} and snapshots
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary file
    assert not out.exists()
    left = {p.name for p in fs.mount.iterdir()} - {"filler"}
    if kind == "erofs":  # nothing can be removed from a read-only filesystem: the lock stays, and says so
        assert left == {"scores.inprogress", ".scores.lock"}, left
        assert "cannot remove the lock" in failed.stderr
    else:
        assert left == {"scores.inprogress"}, left
    return line


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_snapshot_and_final_write_fail_cleanly_and_resume(kind, ckpt, demos, reference, tmp_path):
    with small_filesystem(kind, tmp_path) as fs:
        work = fs.mount / "scores.inprogress"
        cmd = _score_cmd(ckpt, demos, fs.mount / "scores")
        held: dict[str, bytes] = {}

        def fault():
            held.update(_files(work))  # what is on disk when the disk fills / turns read-only
            fs.fault()

        # 1. the disk fills after the first snapshot: a later snapshot fails, the earlier ones stay
        failed, seconds = _fault_run(cmd + ["--checkpoint-every", 1], "snapshot at step 1 in", Paused(fault))
        line = _check_scoring_failure(kind, fs, failed, held, "state_rank0_step")
        _report("scoring snapshot", kind, seconds, line)
        fs.clear()

        # 2. resumed, the disk fills after the last snapshot: the final score write fails
        held.clear()
        failed, seconds = _fault_run(cmd + ["--resume", "--checkpoint-every", 4], "snapshot at step 8 in",
                                     Paused(fault))
        assert "resuming at step" in failed.stderr
        assert ("taking over" in failed.stderr) == (kind == "erofs")  # the lock the read-only run had to leave
        line = _check_scoring_failure(kind, fs, failed, held, "scores.safetensors")
        _report("final score write", kind, seconds, line)
        fs.clear()

        # 3. room again: --resume finishes, bitwise equal to the uninterrupted run
        resumed = _run(cmd + ["--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ("taking over" in resumed.stderr) == (kind == "erofs")
        got = load_file(fs.mount / "scores" / "scores.safetensors")
        assert set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
        assert {p.name for p in fs.mount.iterdir()} - {"filler"} == {"scores"}


# --------------------------------------------------------------------------------------------
# export and the BF16 conversion on a full disk / quota / read-only filesystem
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(ckpt, tmp_path_factory) -> Path:
    """A score file for the export (written directly: the export is under test, not the scoring)."""
    config = DeepseekV3Config.load(ckpt)
    moe = list(config.moe_layer_ids)
    rows = torch.arange(len(moe) * config.n_routed_experts, dtype=torch.float64).reshape(len(moe), -1)
    return write_score_file(tmp_path_factory.mktemp("sc") / "scores", {"easyep": rows}, moe, config.config_hash, [],
                            architecture_hash=config.architecture_hash, storage_format=config.storage_format)


@pytest.mark.parametrize("tool", ["export", "to_bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_and_conversion_fail_cleanly(kind, tool, ckpt, scores, tmp_path):
    with small_filesystem(kind, tmp_path) as fs:
        out = fs.mount / "out"
        cmd = ([PYTHON, REPO / "converters" / "export_pruned.py", "--hf-checkpoint", ckpt, "--scores", scores,
                "--output", out, "--keep", 8, "--metric", "easyep"] if tool == "export"
               else [PYTHON, REPO / "converters" / "fp8_to_bf16.py", "--hf-checkpoint", ckpt, "--output", out])
        # room for the lock and the small files, not for the shards (read-only: the lock is the first write)
        fs.fault(leave=64 * 1024)
        started = time.monotonic()
        failed = _run(cmd)
        seconds = time.monotonic() - started
        assert failed.returncode != 0
        line = _error_line(failed.stderr)
        assert str(out) in line and STRERROR[kind] in line, failed.stderr[-3000:]
        _report(f"{tool} (whole command)", kind, seconds, line)
        assert {p.name for p in fs.mount.iterdir()} - {"filler"} == set()  # no output, staging or lock


# --------------------------------------------------------------------------------------------
# the comparison's evaluation store
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_inputs(tiny_checkpoint_factory, tmp_path_factory):
    demos = write_demo_files(tmp_path_factory.mktemp("cdemos"), per_domain=2, heldout=2)
    return tiny_checkpoint_factory(), demos


def _compare_cmd(ckpt, demos, out, *args):
    # two pruned models (easyep, gate; "mixed" is the math selection again); no overlap rescoring
    return [PYTHON, REPO / "launch" / "compare.py", "--hf-checkpoint", ckpt, "--output", out, "--keep", 8,
            "--criteria", "easyep", "gate", "--random-seeds", 0, "--demo-counts", 2, "--seed", 0, "--threads", 1,
            "--batch-size", 2, "--demos", f"{demos['math']}:math", "--heldout", f"{demos['math_heldout']}:math",
            *args]


@pytest.fixture(scope="module")
def compare_reference(compare_inputs, tmp_path_factory) -> str:
    """An uninterrupted comparison's results.csv."""
    out = tmp_path_factory.mktemp("cref") / "cmp"
    proc = _run(_compare_cmd(*compare_inputs, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "results.csv").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_comparison_store_fails_cleanly_and_resume_finishes(kind, compare_inputs, compare_reference, tmp_path):
    out = tmp_path / "cmp"
    store = out / "evaluations"
    # the store on its own small filesystem: the fault meets the store's write, not the exports beside it
    with small_filesystem(kind, tmp_path, mountpoint=store) as fs:
        held: dict[str, bytes] = {}

        def fault():
            held.update(_files(store))
            fs.fault()

        cmd = _compare_cmd(*compare_inputs, out)
        failed, seconds = _fault_run(cmd + ["--overwrite"], "[compare] 1/", Paused(fault))
        assert failed.returncode != 0
        line = _error_line(failed.stderr)
        assert str(store) in line and ".json" in line and STRERROR[kind] in line, failed.stderr[-3000:]
        _report("comparison store", kind, seconds, line)
        assert {n: b for n, b in _files(store).items() if n != "filler"} == held and held  # stored ones intact
        assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temporary file
        assert not (out / "results.csv").exists() and not (out / "summary.json").exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".compare-")]  # temporary exports removed
        if kind != "enospc":
            return  # what --resume reads, the store, is as before the fault: resuming is shown once
        fs.clear()
        resumed = _run(cmd + ["--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "(from the interrupted run)" in resumed.stderr
        assert (out / "results.csv").read_text() == compare_reference


def test_a_read_only_working_directory_does_not_stop_a_run(ckpt, demos, tmp_path):
    """runs/logs (other libraries' warnings) is under the working directory: where it cannot be
    written the warnings go to the terminal, and the run (its output elsewhere) goes on."""
    with small_filesystem("erofs", tmp_path) as fs:
        fs.fault()
        out = tmp_path / "scores"
        proc = subprocess.run([str(c) for c in _score_cmd(ckpt, demos, out, "--max-demos", 1)], capture_output=True,
                              text=True, cwd=fs.mount, env=_env(), timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "note: cannot write runs/logs/" in proc.stderr and "Read-only file system" in proc.stderr
        assert (out / "scores.safetensors").is_file()
