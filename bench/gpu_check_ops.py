"""GPU check, phases 3-5 (bench/gpu_check_run.py runs these).

nvml_slurm -- real NVML: every scores.json the run wrote holds per-rank telemetry samples (on the
              CPU dry mode: none, as documented); launch/slurm/launch_score.sh --dry-run picks the
              layout from the real nvidia-smi (dry mode: EASYEP_GPU_MEMORY_GIB=80) and prints the
              torchrun line without running it.
kernels    -- bench/gpu_check.py (the single-process FP8 kernel checks), parts from --kernel-parts.
fused_moe  -- python bench/fused_moe_bench.py --out FILE (another issue's bench): its JSON, or its failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_lib as lib  # noqa: E402


def _score_dirs(ctx: dict) -> list[Path]:
    layouts = ctx["results"].get("nccl_layouts") or {}
    dirs = [Path(d) for d in layouts.get("score_dirs", [])]
    dirs += [Path(ctx["workdir"]) / f"v3_scores_{role}" for role in ("none", "fp8")]
    return [d for d in dirs if (d / "scores.json").is_file()]


def _telemetry(ctx: dict, result: dict) -> None:
    rows = {}
    for d in _score_dirs(ctx):
        info = json.loads((d / "scores.json").read_text())
        tel = info.get("gpu_telemetry")
        world = info["layout"]["world_size"]
        rows[d.name] = {"world_size": world, "ranks_with_samples": None if tel is None else
                        sum(1 for r in tel if r and r.get("samples", 0) >= 1),
                        "per_rank": tel}
    result["telemetry"] = rows
    if not lib.check(result["checks"], "scores.json files from earlier phases", bool(rows), f"{len(rows)} found"):
        return
    if ctx["dry"]:
        lib.check(result["checks"], "no telemetry without a GPU", all(r["per_rank"] is None for r in rows.values()),
                  ", ".join(n for n, r in rows.items() if r["per_rank"] is not None))
        return
    missing = [n for n, r in rows.items() if r["ranks_with_samples"] != r["world_size"]]
    lib.check(result["checks"], "NVML samples for every rank in every scores.json", not missing,
              "missing in: " + ", ".join(missing) if missing else f"{len(rows)} score files")


def _slurm_dry_run(ctx: dict, result: dict) -> None:
    work = Path(ctx["workdir"])
    v3 = (ctx["results"].get("v3_generate") or {}).get("checkpoint")
    ckpt = Path(v3) if v3 and Path(v3, "config.json").is_file() else work / "layouts" / "tiny_fp8"
    demos = next((p for p in (work / "demos_math.jsonl", work / "layouts" / "demos_math.jsonl") if p.is_file()), None)
    if not lib.check(result["checks"], "a checkpoint and demos for launch_score.sh",
                     (ckpt / "config.json").is_file() and demos is not None, f"{ckpt}, {demos}"):
        return
    extra = {"EASYEP_PYTHON": lib.python(), "EASYEP_NO_SRUN": "1", "EASYEP_LOG_DIR": str(work / "slurm_logs")}
    if ctx["dry"]:
        extra.update(EASYEP_GPU_MEMORY_GIB="80", EASYEP_NPROC_PER_NODE="1")
    else:
        import torch

        extra["EASYEP_NPROC_PER_NODE"] = str(torch.cuda.device_count())
        os.environ.pop("EASYEP_GPU_MEMORY_GIB", None)
    output = work / "slurm_out"
    tokens = str(ctx.get("v3_tokens") or (64 if ctx["dry"] else 16384))
    run = lib.run_cmd(["bash", lib.REPO / "launch/slurm/launch_score.sh", "--dry-run", "--hf-checkpoint", ckpt,
                       "--demos", f"{demos}:math", "--output", output, "--max-length", tokens],
                      timeout=ctx["timeout_s"] - 10, env=lib.base_env(ctx, extra), log=work / "slurm_dry_run.log")
    text = (work / "slurm_dry_run.log").read_text()
    torchrun = [line for line in text.splitlines() if line.startswith("node 0:")]
    plan = [line for line in text.splitlines() if "converters/plan.py (" in line]
    result["slurm"] = {"run": run, "checkpoint": str(ckpt), "torchrun_line": torchrun[0] if torchrun else None,
                       "plan_line": plan[0] if plan else None,
                       "memory_from": "EASYEP_GPU_MEMORY_GIB=80 (dry mode)" if ctx["dry"] else "nvidia-smi"}
    lib.check(result["checks"], "launch_score.sh --dry-run", run["rc"] == 0 and bool(torchrun) and bool(plan)
              and "launch/score.py" in torchrun[0] and "--expert-parallel" in torchrun[0],
              lib.failure_text(run) if run["rc"] else (torchrun or ["no 'node 0:' line"])[0])
    lib.check(result["checks"], "the dry run ran nothing", not output.exists(),
              f"{output} {'exists' if output.exists() else 'was not created'}")


def phase_nvml_slurm(ctx: dict) -> dict:
    result = {"checks": []}
    _telemetry(ctx, result)
    _slurm_dry_run(ctx, result)
    return result


def phase_kernels(ctx: dict) -> dict:
    out = Path(ctx["workdir"]) / "kernels.json"
    run = lib.run_cmd([lib.python(), lib.REPO / "bench/gpu_check.py", "--out", out, "--parts", ctx["kernel_parts"],
                       "--quick"], timeout=ctx["timeout_s"] - 5, env=lib.base_env(ctx),
                      log=Path(ctx["workdir"]) / "kernels.log")
    result = {"run": run, "checks": []}
    if out.is_file():
        result["report"] = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in (result.get("report") or {}).items() if isinstance(v, dict) and "error" in v}
    lib.check(result["checks"], "bench/gpu_check.py", run["rc"] == 0 and not errors,
              lib.failure_text(run) if run["rc"] else json.dumps(errors)[:3000])
    return result


def phase_fused_moe(ctx: dict) -> dict:
    out = Path(ctx["workdir"]) / "fused_moe.json"
    run = lib.run_cmd([lib.python(), lib.REPO / "bench/fused_moe_bench.py", "--out", out],
                      timeout=ctx["timeout_s"] - 5, env=lib.base_env(ctx), log=Path(ctx["workdir"]) / "fused_moe.log")
    result = {"run": run, "checks": []}
    if out.is_file():
        result["report"] = json.loads(out.read_text())
    lib.check(result["checks"], "bench/fused_moe_bench.py", run["rc"] == 0 and out.is_file(),
              lib.failure_text(run) if run["rc"] else ("" if out.is_file() else f"wrote no {out}"))
    return result
