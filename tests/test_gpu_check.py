"""The GPU check cannot rot: `bash bench/gpu_check.sh --dry` runs every phase's code on the CPU
(gloo instead of NCCL, tiny widths, real torchrun processes) and writes the JSON the GPU run
writes. The oracles are the check's own: every multi-rank layout against a 1-rank run, smoke
collectives against hand-computed values; here we assert the JSON says they passed, that the
comparisons can fail, and that failures and timeouts are recorded, not lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check_lib as lib  # noqa: E402
import gpu_check_run  # noqa: E402

LAYOUTS = {"ep2_alltoall", "ep2_allgather", "dp2", "pp2", "pp2_ep2"}


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASYEP_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "gpu_check.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--dry", "--keep-workdir", str(root / "work")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), root


def test_every_phase_is_recorded_with_a_status(dry):
    report, root = dry
    assert report["format"] == gpu_check_run.FORMAT and report["mode"] == "dry"
    phases = report["phases"]
    assert set(phases) == {p.name for p in gpu_check_run.PHASES}
    for name in ("nccl_smoke", "nccl_layouts", "nccl_dead_rank", "v3_generate", "v3", "nvml_slurm"):
        assert phases[name]["status"] == "ok", (name, phases[name].get("error"))
        assert all(c["ok"] for c in phases[name]["result"]["checks"])
    for name in ("kernels", "fused_moe"):  # CUDA only: skipped, and the JSON says why
        assert phases[name]["status"] == "skipped" and "CUDA" in phases[name]["reason"]
    assert report["total_seconds"] < report["budget_s"]
    assert (root / "gpu_check_logs.tar.gz").is_file()


def test_smoke_collectives_hold_their_values(dry):
    smoke = dry[0]["phases"]["nccl_smoke"]["result"]
    assert smoke["route"] == "gloo"
    ranks = smoke["routes_tried"][-1]["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
    names = {c["name"] for r in ranks for c in r["checks"] if c["ok"]}
    assert names == {"all_reduce", "all_to_all_single_uneven", "batch_isend_irecv_ring", "megatron_ep_group_all_reduce"}
    assert {r["layout"]["expert_parallel"] for r in ranks} == {2} and {r["layout"]["pp_rank"] for r in ranks} == {0, 1}


def test_every_layout_matches_one_rank(dry):
    layouts = dry[0]["phases"]["nccl_layouts"]["result"]
    assert set(layouts["layouts"]) == LAYOUTS
    for name, cmp in layouts["layouts"].items():
        assert cmp["ok"] and cmp["frequency_exact"] and cmp["tokens_equal"], name
        assert cmp["worst_rel_err"] <= 1e-5 and len(cmp["max_rel_err"]) >= 12, name
    ev = layouts["evaluate_pp2"]
    assert ev["ok"] and ev["demos"] == 6 and ev["logits_rel_err"] <= 1e-5


def test_a_dead_rank_stops_the_other_and_resume_is_bitwise_equal(dry):
    """nccl_dead_rank (gloo here): every check the GPU run makes is there and passed, and the
    figures behind them agree with their verdicts."""
    result = dry[0]["phases"]["nccl_dead_rank"]["result"]
    assert {c["name"] for c in result["checks"] if c["ok"]} == {
        "uninterrupted 2-rank run", "rank 1 killed mid-run, torchrun exited", "torchrun exits non-zero",
        "exit sooner than the dist timeout", "summary names rank 1 and SIGKILL", "no output directory",
        "last snapshot of every rank loads", "--resume finishes", "resumed at the last snapshot",
        "resumed scores bitwise equal to the uninterrupted run"}
    fault = result["fault"]
    print(f"dry nccl_dead_rank: SIGKILL of rank 1 -> torchrun exit {fault['rc']} after "
          f"{fault['seconds_kill_to_exit']} s (--dist-timeout {result['dist_timeout_s']})")
    assert fault["rc"] != 0 and 0 < fault["seconds_kill_to_exit"] < result["dist_timeout_s"]
    assert fault["survivor_reported_collective_failure"]  # gloo: the closed socket, not the timeout
    assert fault["summary_exitcodes"]["1"] == -9  # the killed rank, as torchrun's summary says
    assert result["resumed_at_step"] == result["snapshot"]["step"] >= result["kill_at_step"]
    assert not (dry[1] / "work" / "dead_rank" / "scores.inprogress").exists()  # the resume cleaned up


def test_every_phase_gets_its_full_limit_when_the_earlier_ones_keep_to_their_reserves():
    """The 7-minute budget: a phase's limit is cut to leave every later phase its reserve; when
    the earlier phases take no more than their reserves, no phase's own limit is cut."""
    run = [p for p in gpu_check_run.PHASES if p.name != gpu_check_run.BACKGROUND]
    for i, phase in enumerate(run):
        left = 420 - sum(p.reserve_s for p in run[:i]) - sum(p.reserve_s for p in run[i + 1:])
        assert left >= phase.timeout_s, (phase.name, left)


def test_the_score_comparison_can_fail(dry):
    """The comparator the layouts rely on catches a 1e-4 change and a frequency off by one."""
    work = dry[1] / "work" / "layouts"
    for key, change in (("easyep", lambda t: t.mul_(1 + 1e-4)), ("frequency", lambda t: t.view(-1)[0].add_(1))):
        copy = dry[1] / f"perturbed_{key}"
        shutil.copytree(work / "ref_1rank", copy)
        tensors = load_file(str(copy / "scores.safetensors"))
        change(tensors[key])
        save_file(tensors, str(copy / "scores.safetensors"))
        cmp = lib.compare_scores(copy, work / "ref_1rank", 1e-5)
        assert not cmp["ok"], key
    assert lib.compare_scores(work / "dp2", work / "ref_1rank", 1e-5)["ok"]


def test_v3_phase_scores_exports_and_evaluates(dry):
    phases = dry[0]["phases"]
    gen, v3 = phases["v3_generate"]["result"], phases["v3"]["result"]
    assert gen["choice"]["moe_layers"] == v3["moe_layers"] == 2 and gen["bytes"] > 0
    assert gen["cold_read"]["bytes"] > 0 and gen["write_GBps"] > 0
    for role, mode in (("none", "none"), ("fp8", "emulated")):
        row = v3["score"][role]
        assert row["mode"] == mode and row["weights"] == "fp8-resident"
        assert row["tokens"] == v3["demos"] * v3["tokens_per_demo"] and row["tokens_per_s"] > 0
        assert row["load_seconds"] > 0 and row["gpu_telemetry"] is None  # no NVML without a GPU
    overlap = v3["top_m_overlap"]
    assert overlap["m"] == v3["experts"] // 2 and len(overlap["per_layer"]) == 2
    assert all(0 < x <= 1 for x in overlap["per_layer"])
    assert v3["export"]["keep"] == 8 and v3["export"]["bytes"] > 0
    assert set(v3["evaluate_pruned"]["results"]) == {"math", "code"}
    plan = v3["memory_vs_plan"]
    assert plan["imbalance_2"]["weights_plus_activations"] > plan["imbalance_1"]["weights_plus_activations"]
    assert plan["none"]["measured"] is None and "no CUDA" in plan["none"]["reason"]


def test_slurm_dry_run_prints_the_torchrun_line(dry):
    result = dry[0]["phases"]["nvml_slurm"]["result"]
    line = result["slurm"]["torchrun_line"]
    assert line.startswith("node 0:") and "launch/score.py" in line and "--expert-parallel 1" in line
    assert "80 GiB per GPU" in result["slurm"]["plan_line"]
    assert len(result["telemetry"]) == 8 and all(r["per_rank"] is None for r in result["telemetry"].values())


def test_a_failing_phase_is_recorded_verbatim(tmp_path):
    out = tmp_path / "fail.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check_run.py", "--dry", "--out", str(out),
                           "--phases", "v3_generate,v3", "--v3-keep", "3"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    phases = json.loads(out.read_text())["phases"]
    assert phases["v3_generate"]["status"] == "failed"
    assert "n_routed_experts 3 is not divisible by n_group 4" in phases["v3_generate"]["error"]
    assert phases["v3"]["status"] == "not_run" and "v3_generate" in phases["v3"]["reason"]
    assert all(phases[n]["status"] == "skipped" and "--phases" in phases[n]["reason"]
               for n in ("nccl_smoke", "nccl_layouts", "nccl_dead_rank", "nvml_slurm", "kernels", "fused_moe"))


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t0 = time.monotonic()
    run = lib.run_cmd([sys.executable, "-c", script], timeout=3)
    assert run["timed_out"] and time.monotonic() - t0 < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # killed with its group (a zombie waiting for its reaper counts as dead)
        stat = Path(f"/proc/{child}/stat")
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived the timeout")
    assert "timed out" in lib.failure_text(run)


def test_compare_helpers_by_hand():
    a = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[3.0, 2.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    assert lib.topm_overlap(a, b, 2) == [1.0, 0.0]
    assert lib.rel_err(a, b) == 1.0 and lib.rel_err(b, b) == 0.0


def test_projection_reads_the_check_and_tags_every_figure(dry, capsys):
    """bench/gpu_check_projection.py: the GPU run's figures replace the estimates, tagged measured."""
    import gpu_check_projection

    path = dry[1] / "gpu_check.json"
    gpu_check_projection.main(["--from", str(path)])
    text = capsys.readouterr().out
    assert "measured, dry" in text and "| estimate: effective all-to-all" in text  # not measured yet
    assert text.count("| 2x8 H800") == 1 and text.count("| 1x8 H200") == 2
    measured = gpu_check_projection.from_gpu_check(path)
    assert set(measured) == {"layer_s_16k", "layer_s_16k_ep1", "loader_GBps", "storage_GBps", "export_GBps"}


def test_ranks_sharing_a_gpu_pick_their_device_and_nccl_hostid(monkeypatch):
    """mcore/parallel.py's device choice, with torch.cuda's device count and set_device replaced
    (no GPU here): two ranks on one GPU wrap to device 0 only with EASYEP_SHARE_GPU=1, and then
    get their own NCCL_HOSTID only when asked."""
    from megatron_easyep.mcore import parallel

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.delenv("NCCL_HOSTID", raising=False)
    monkeypatch.delenv(parallel.SHARE_GPU_ENV, raising=False)
    with pytest.raises(ValueError, match="LOCAL_RANK 1 but only 1 CUDA device"):
        parallel._select_cuda_device()
    monkeypatch.setenv(parallel.SHARE_GPU_ENV, "1")
    parallel._select_cuda_device()
    assert chosen == [0] and "NCCL_HOSTID" not in os.environ
    monkeypatch.setenv(parallel.NCCL_HOSTID_PER_RANK_ENV, "1")
    parallel._select_cuda_device()
    assert chosen == [0, 0] and os.environ["NCCL_HOSTID"] == "easyep-rank5"


def test_generator_on_an_explicit_cpu_device_draws_the_same_weights():
    from megatron_easyep.checkpoint import tiny
    from megatron_easyep.checkpoint.inventory import TensorSpec

    spec = TensorSpec("model.layers.1.mlp.experts.3.up_proj.weight", (48, 64), "linear", 0.125, True)
    assert torch.equal(tiny.generate_tensor(spec, 7), tiny.generate_tensor(spec, 7, "cpu"))
    q_default, q_cpu = tiny._stored_tensors(spec, 7, (32, 16)), tiny._stored_tensors(spec, 7, (32, 16), "cpu")
    assert all(torch.equal(q_default[k].view(torch.uint8), q_cpu[k].view(torch.uint8)) for k in q_default)
