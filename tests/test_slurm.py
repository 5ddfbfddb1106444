"""SLURM templates (launch/slurm/): the launch logic run locally with SLURM's environment for a
1-node, 2-process job on a tiny checkpoint (a real torchrun + launch/score.py run), the layout
and resume decisions in dry-run mode, node-list parsing, and shellcheck.

`srun` and `scontrol` do not exist here; where a test needs them, a shim on PATH stands in (srun:
records its arguments and runs the command once per node with SLURM_NODEID set; scontrol: prints
a fixed host list). They are SLURM, not the code under test. shellcheck is a system package:
CI installs it (`apt-get install -y shellcheck`); the shellcheck test skips only when it is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_easyep.scoring.demo_data import write_demo_files
from test_plan import DEEPSEEK_V3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
LAUNCH = SLURM_DIR / "launch_score.sh"
SCRIPTS = [LAUNCH, SLURM_DIR / "score_single_node.sbatch", SLURM_DIR / "score_multi_node.sbatch"]

SRUN_SHIM = """#!/usr/bin/env bash
# srun stand-in: record the call, then run the command once per node (sequentially).
printf '%s\\n' "$*" >> "$SRUN_LOG"
nodes=1
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --nodes=*) nodes="${1#--nodes=}"; shift ;;
    --ntasks|--ntasks-per-node|--cpus-per-task) shift 2 ;;
    *) shift ;;
  esac
done
status=0
for ((n = 0; n < nodes; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" || status=$?
done
exit $status
"""

SCONTROL_SHIM = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
printf 'alpha-node\\nbeta-node\\n'
"""


def _shim_dir(tmp_path: Path, *names: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text({"srun": SRUN_SHIM, "scontrol": SCONTROL_SHIM}[name])
        path.chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, *, shims=(), **slurm) -> dict:
    """A clean environment: no inherited SLURM_*/EASYEP_* variables; PATH without srun/scontrol
    unless shimmed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EASYEP_"))}
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if not (Path(p) / "srun").exists() and not (Path(p) / "scontrol").exists()]
    if shims:
        path.insert(0, str(_shim_dir(tmp_path, *shims)))
    env["PATH"] = os.pathsep.join(path)
    env["EASYEP_PYTHON"] = sys.executable
    env["EASYEP_GPU_MEMORY_GIB"] = "none"  # no converters/plan.py layout unless a test asks (GPU hosts)
    env["SRUN_LOG"] = str(tmp_path / "srun.log")
    env.update({k: str(v) for k, v in slurm.items()})
    return env


def _launch(tmp_path, args, *, script=LAUNCH, shims=(), timeout=60, **slurm):
    return subprocess.run(["bash", str(script), *args], env=_env(tmp_path, shims=shims, **slurm),
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict:
    return write_demo_files(tmp_path_factory.mktemp("slurm_demos"), per_domain=3, heldout=0)


def _score_args(ckpt, demos, output, *extra):
    return ["--hf-checkpoint", str(ckpt), "--demos", f"{demos['math']}:math",
            "--demos", f"{demos['code']}:code", "--output", str(output), *extra]


# --------------------------------------------------------------------------------------------
# 1. a real 1-node, 2-process job
# --------------------------------------------------------------------------------------------

def test_one_node_two_process_job_scores(tmp_path, tiny_ckpt, demos):
    """SLURM gives 1 node with 2 tasks (no GPUs): the launcher runs srun (shim) -> one torchrun
    with 2 processes -> launch/score.py, EP = 2, per-rank logs on "shared" storage."""
    proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, "scores", "--max-length", "48"),
                   shims=("srun",), timeout=300, SLURM_JOB_ID=777, SLURM_JOB_NUM_NODES=1,
                   SLURM_JOB_NODELIST="localhost", SLURM_NTASKS_PER_NODE=2, SLURM_SUBMIT_DIR=tmp_path,
                   SLURM_CPUS_ON_NODE=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "scores"  # relative --output resolved against SLURM_SUBMIT_DIR
    provenance = json.loads((out / "scores.json").read_text())
    assert provenance["layout"]["world_size"] == 2
    assert provenance["layout"]["expert_parallel"] == 2  # gcd(2 ranks, 16 experts)
    assert provenance["demos_per_domain"] == {"math": 3, "code": 3}
    assert (out / "scores.safetensors").stat().st_size > 0
    assert not (tmp_path / "scores.inprogress").exists()
    # srun was asked for one task per node
    assert (tmp_path / "srun.log").read_text().split()[:8] == [
        "--nodes", "1", "--ntasks", "1", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--export=ALL"]
    # one log file pair per rank, and rank 0's stderr has the run's progress
    logs = tmp_path / "scores.logs" / "job777-restart0" / "node0"
    per_rank = sorted(p.relative_to(logs).parts[-2:] for p in logs.rglob("*.log"))
    assert per_rank == [("0", "stderr.log"), ("0", "stdout.log"), ("1", "stderr.log"), ("1", "stdout.log")]
    rank0_err = next(logs.rglob("0/stderr.log")).read_text()
    assert "wrote" in rank0_err and "scores.safetensors" in rank0_err
    assert re.search(r"\[\S+ rank 0\]:", proc.stdout + proc.stderr)  # tee'd with a rank prefix
    # other libraries' warnings: one file per rank in the run's log directory (launch/_cli.py)
    run_logs = tmp_path / "scores.logs" / "job777-restart0"
    assert (run_logs / "score-rank0.log").is_file() and (run_logs / "score-rank1.log").is_file()
    # a requeue of a finished job does nothing and succeeds
    again = _launch(tmp_path, _score_args(tiny_ckpt, demos, "scores"), shims=("srun",),
                    SLURM_JOB_ID=777, SLURM_RESTART_COUNT=1, SLURM_NTASKS_PER_NODE=2,
                    SLURM_SUBMIT_DIR=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr


# --------------------------------------------------------------------------------------------
# 2. decisions, in dry-run mode (EASYEP_DRY_RUN=1 prints the commands)
# --------------------------------------------------------------------------------------------

def _torchrun_line(proc) -> list[str]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert lines, proc.stdout + proc.stderr
    return lines[0].split()


def test_multi_node_command_line(tmp_path, tiny_ckpt, demos):
    proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, tmp_path / "out"), shims=("srun",),
                   EASYEP_DRY_RUN=1, SLURM_JOB_ID=123456, SLURM_JOB_NUM_NODES=4,
                   SLURM_JOB_NODELIST="gpu[07-10]", SLURM_GPUS_ON_NODE=8, SLURM_NTASKS_PER_NODE=1,
                   SLURM_CPUS_PER_TASK=64)
    assert proc.returncode == 0, proc.stderr
    assert "srun: srun --nodes 4 --ntasks 4 --ntasks-per-node 1" in proc.stdout
    assert "--cpus-per-task 64 bash" in proc.stdout
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert [line.split()[1] for line in nodes] == ["0:", "1:", "2:", "3:"]  # one torchrun per node
    cmd = " ".join(_torchrun_line(proc))
    port = 20000 + 123456 % 20000
    assert f"--nnodes 4 --rdzv-backend c10d --rdzv-endpoint gpu07:{port} --rdzv-id easyep-123456" in cmd
    assert "--nproc-per-node 8" in cmd  # GPUs on the node win over tasks per node
    assert cmd.endswith("--expert-parallel 16")  # gcd(4 x 8, 16 experts)
    assert "--resume" not in cmd
    assert f"--log-dir {tmp_path}/out.logs/job123456-restart0/node0 --redirects 3 --tee 3" in cmd
    assert "world 32: pipeline parallel 1, expert parallel 16, data parallel 2" in proc.stderr


V3_CONFIG = DEEPSEEK_V3  # tests/test_plan.py: DeepSeek-V3's config.json


@pytest.mark.parametrize("extra, nodes, layout", [
    # bf16 (FP8 checkpoint dequantised at load): PP=4 x EP=8, a stage per node
    (["--dequantize-at-load"], 4, ("4", "8", "16,15,15,15", "data parallel 1")),
    # FP8-resident (the loader's default): PP=2 x EP=8 fits 2 nodes; 4 nodes run 2 replicas
    ([], 4, ("2", "8", "31,30", "data parallel 2")),
])
def test_layout_comes_from_the_plan(tmp_path, demos, extra, nodes, layout):
    """DeepSeek-V3 (config only: nothing is read in a dry run) on 8 x 80 GB nodes at 16k tokens:
    the layout is converters/plan.py's, not gcd(world, E) (EP=32 on 4 nodes runs out of memory)."""
    import json

    ckpt = tmp_path / "v3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(V3_CONFIG))
    proc = _launch(tmp_path, _score_args(ckpt, demos, tmp_path / "out", "--max-length", "16384", *extra),
                   shims=("srun",), EASYEP_DRY_RUN=1, SLURM_JOB_ID=7, SLURM_JOB_NUM_NODES=nodes,
                   SLURM_JOB_NODELIST="gpu[1-4]", SLURM_GPUS_ON_NODE=8, EASYEP_GPU_MEMORY_GIB="79.6")
    assert proc.returncode == 0, proc.stderr
    pp, ep, stages, dp = layout
    cmd = " ".join(_torchrun_line(proc)).replace("\\,", ",")  # the dry run prints printf %q
    assert f"--pipeline-parallel {pp} --pipeline-layout {stages} --expert-parallel {ep}" in cmd
    assert cmd.count("--expert-parallel") == 1
    assert f"pipeline parallel {pp}, expert parallel {ep}, {dp}" in proc.stderr
    plan = json.loads((tmp_path / "out.logs" / "job7-restart0" / "plan.json").read_text())
    assert plan["recommended"]["pp"] == int(pp)


def test_one_h200_node_gets_the_plans_best_layout_for_its_eight_gpus(tmp_path, demos):
    """The smallest layout (PP=6 x EP=1 on 6 of the 8 H200s) does not divide the allocation: the
    launcher takes the best one that does, PP=1 x EP=8 (92 GiB of FP8 weights per rank fit 139.8)."""
    import json

    ckpt = tmp_path / "v3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(V3_CONFIG))
    proc = _launch(tmp_path, _score_args(ckpt, demos, tmp_path / "out", "--max-length", "16384"),
                   EASYEP_DRY_RUN=1, SLURM_JOB_ID=8, SLURM_JOB_NUM_NODES=1, SLURM_GPUS_ON_NODE=8,
                   EASYEP_GPU_MEMORY_GIB="139.8")
    assert proc.returncode == 0, proc.stderr
    cmd = " ".join(_torchrun_line(proc)).replace("\\,", ",")
    assert "--pipeline-parallel 1 --pipeline-layout 61 --expert-parallel 8" in cmd
    assert "pipeline parallel 1, expert parallel 8, data parallel 1" in proc.stderr
    plan = json.loads((tmp_path / "out.logs" / "job8-restart0" / "plan.json").read_text())
    assert (plan["recommended"]["gpus"], plan["for_world"]["gpus"]) == (6, 8)


def test_plan_layout_larger_than_the_allocation_is_refused(tmp_path, demos):
    import json

    ckpt = tmp_path / "v3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(V3_CONFIG))
    proc = _launch(tmp_path, _score_args(ckpt, demos, tmp_path / "out", "--max-length", "16384",
                                         "--dequantize-at-load"),
                   shims=("srun",), EASYEP_DRY_RUN=1, SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="gpu[1-2]",
                   SLURM_GPUS_ON_NODE=8, EASYEP_GPU_MEMORY_GIB="79.6")
    assert proc.returncode == 2
    assert "PP=4 x EP=8 (32 GPUs)" in proc.stderr and "16 ranks" in proc.stderr


def test_head_node_from_scontrol_and_explicit_settings(tmp_path, tiny_ckpt, demos):
    proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, tmp_path / "out", "--expert-parallel", "4"),
                   shims=("srun", "scontrol"), EASYEP_DRY_RUN=1, SLURM_JOB_ID=5,
                   SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="whatever[1-2]", SLURM_GPUS_ON_NODE=8,
                   EASYEP_NPROC_PER_NODE=4, EASYEP_MASTER_PORT=29999)
    assert proc.returncode == 0, proc.stderr
    cmd = " ".join(_torchrun_line(proc))
    assert "--rdzv-endpoint alpha-node:29999" in cmd
    assert "--nproc-per-node 4" in cmd
    assert cmd.count("--expert-parallel") == 1 and "--expert-parallel 4" in cmd


def test_single_node_without_srun_runs_torchrun_directly(tmp_path, tiny_ckpt, demos):
    proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, tmp_path / "out"), EASYEP_DRY_RUN=1,
                   SLURM_JOB_NUM_NODES=1, SLURM_NTASKS_PER_NODE=2)
    assert proc.returncode == 0, proc.stderr
    assert "srun:" not in proc.stdout
    cmd = _torchrun_line(proc)
    assert cmd[2:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert not (tmp_path / "srun.log").exists()


def test_resume_when_requeued_or_interrupted(tmp_path, tiny_ckpt, demos):
    out = tmp_path / "out"
    common = dict(EASYEP_DRY_RUN=1, SLURM_NTASKS_PER_NODE=2)
    fresh = _launch(tmp_path, _score_args(tiny_ckpt, demos, out), SLURM_RESTART_COUNT=1, **common)
    assert fresh.returncode == 0 and "--resume" not in _torchrun_line(fresh)
    assert "starting from the beginning" in fresh.stderr  # requeued before any snapshot existed
    (tmp_path / "out.inprogress").mkdir()
    for restarts in (0, 2):
        proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, out), SLURM_RESTART_COUNT=restarts,
                       **common)
        assert proc.returncode == 0, proc.stderr
        assert _torchrun_line(proc)[-1] == "--resume"
        assert f"restart{restarts}" in " ".join(_torchrun_line(proc))
    explicit = _launch(tmp_path, _score_args(tiny_ckpt, demos, out, "--resume"), **common)
    assert _torchrun_line(explicit).count("--resume") == 1


@pytest.mark.parametrize("script", SCRIPTS[1:], ids=lambda p: p.name)
def test_sbatch_templates_call_the_launcher(tmp_path, tiny_ckpt, demos, script):
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --ntasks-per-node=1" in text
    proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, tmp_path / "out"), script=script,
                   EASYEP_DRY_RUN=1, EASYEP_REPO=REPO, SLURM_NTASKS_PER_NODE=2, SLURM_JOB_NUM_NODES=1)
    assert proc.returncode == 0, proc.stderr
    assert str(REPO / "launch" / "score.py") in _torchrun_line(proc)


@pytest.mark.parametrize("slurm, args, message", [
    (dict(SLURM_JOB_NUM_NODES=2, SLURM_NTASKS_PER_NODE=2), [], "needs srun"),
    (dict(SLURM_NTASKS_PER_NODE=3), ["--expert-parallel", "3"],
     "expert parallel 3 does not divide n_routed_experts 16"),
    (dict(SLURM_NTASKS_PER_NODE=2), ["--expert-parallel", "4"], "does not divide the world size 2"),
    (dict(SLURM_NTASKS_PER_NODE="x"), [], "bad processes per node"),
], ids=["multi-node-no-srun", "ep-vs-experts", "ep-vs-world", "bad-nproc"])
def test_bad_allocations_are_refused(tmp_path, tiny_ckpt, demos, slurm, args, message):
    proc = _launch(tmp_path, _score_args(tiny_ckpt, demos, tmp_path / "out", *args),
                   EASYEP_DRY_RUN=1, **slurm)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out.logs").exists() or "needs srun" in message


def test_missing_output_or_checkpoint(tmp_path, tiny_ckpt):
    proc = _launch(tmp_path, ["--hf-checkpoint", str(tiny_ckpt)])
    assert proc.returncode == 2 and "--output DIR is required" in proc.stderr
    proc = _launch(tmp_path, ["--hf-checkpoint", str(tmp_path / "none"), "--output", "o"])
    assert proc.returncode == 2 and "config.json does not exist" in proc.stderr


# --------------------------------------------------------------------------------------------
# 3. node lists without scontrol, shellcheck
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"),
    ("gpu[03-05,09],cpu1", "gpu03"),
    ("gpu[003,010-012]", "gpu003"),
    ("rack1-n[7]", "rack1-n7"),
    ("a[1-2]-b[07-08],c1", "a1-b07"),
    ("x1,y[1-3]", "x1"),
])
def test_first_host_of_a_node_list(nodelist, first):
    proc = subprocess.run(["bash", "-c", f'source "{LAUNCH}"; first_host "$1"', "_", nodelist],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == first + "\n"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (CI installs it: apt-get install -y shellcheck)")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", "--severity=style", *map(str, SCRIPTS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
