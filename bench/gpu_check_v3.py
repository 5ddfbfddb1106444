"""GPU check, phase 2: DeepSeek-V3 widths at the full expert count on one GPU.

v3_generate -- the streaming generator writes a v3-width FP8 checkpoint on this machine (drawn and
               quantised on the GPU): all 256 experts, 1 dense + N MoE layers. N: the largest that
               fits the memory target (60 GiB) and the free disk (checkpoint + the M-expert export),
               and the time model below, unless given. Records generation time, the fsync of every
               shard (so write GB/s is the disk's), and a cold read of one shard (page cache dropped
               for it with posix_fadvise) as the disk's read GB/s.
v3          -- launch/score.py EP=1 with --fp8 none and --fp8 native on K demos of T tokens; export
               M (equal-per-group) with converters/export_pruned.py; launch/evaluate.py on the
               pruned model. Records load time and GB/s (page cache), tokens/s per mode, peak
               torch.cuda.max_memory_allocated (scores.json telemetry) against plan.py's per-rank
               estimate for the same checkpoint and layout (within 10 %), top-M overlap native vs
               none per layer, export time and GB/s.
The dry mode (CPU CI) runs the same steps on tiny widths (16 experts, 64-token demos, `emulated`
standing in for `native`, generated on the CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_lib as lib  # noqa: E402

sys.path.insert(0, str(lib.REPO))

GIB = 1024 ** 3
MEMORY_TARGET_GIB = 60.0
DISK_MARGIN_GIB = 2.0
# The time model that picks N before anything is measured (estimates, conservative; the JSON
# records them next to the measured figures so the next run can use those instead).
ASSUMED = {"load_GBps": 2.0, "export_GBps": 2.0, "fixed_s_per_process": 15.0}
PLAN_TOLERANCE = 0.10


def _overrides(ctx: dict, moe_layers: int, experts: int | None = None) -> tuple[str, dict]:
    if ctx["dry"]:
        over = {"num_hidden_layers": 1 + moe_layers, "first_k_dense_replace": 1, "weight_block_size": [32, 16]}
        return "tiny", over | ({"n_routed_experts": experts} if experts else {})
    return "v3-width", {"num_hidden_layers": 1 + moe_layers, "first_k_dense_replace": 1,
                        "n_routed_experts": experts or ctx.get("v3_experts") or 256}


def _config(ctx: dict, moe_layers: int, experts: int | None = None):
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.checkpoint.tiny import build_config

    preset, over = _overrides(ctx, moe_layers, experts)
    return DeepseekV3Config.from_dict(build_config(preset, fp8=True, **over))


def stored_bytes(cfg) -> int:
    """Bytes the streaming generator writes for `cfg`."""
    from megatron_easyep.checkpoint import tiny

    return sum(entry.nbytes for unit in tiny.checkpoint_units(cfg) for s in unit
               for entry in tiny.stored_layout(s, cfg.weight_block_size))


def choose_moe_layers(ctx: dict, workdir: Path) -> dict:
    """N from the memory target, the free disk and the time model (each limit recorded)."""
    from megatron_easyep.mcore import plan

    keep = ctx.get("v3_keep") or _config(ctx, 1).n_routed_experts // 2
    full = [stored_bytes(_config(ctx, n)) for n in (1, 2)]
    pruned = [stored_bytes(_config(ctx, n, keep)) for n in (1, 2)]
    moe_ckpt, moe_export = full[1] - full[0], pruned[1] - pruned[0]

    def ckpt_bytes(n):  # linear in N: everything but the MoE layers, plus N of them
        return full[0] + (n - 1) * moe_ckpt

    def export_bytes(n):
        return pruned[0] + (n - 1) * moe_export

    one = _config(ctx, 1)
    dense, moe = plan.layer_bytes(one, "fp8", 1)  # one rank's bytes per layer (EP=1): dense, MoE
    embedding = plan.model_size(one).bytes("fp8", scope="main", categories={"embedding"})
    limits = {"memory": int((MEMORY_TARGET_GIB * GIB - dense - embedding) // moe)}
    free_work = shutil.disk_usage(workdir).free
    free_shm = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    margin = DISK_MARGIN_GIB * GIB

    def fits_disk(n):  # the checkpoint on the work disk, its export there or in /dev/shm
        ck, ex = ckpt_bytes(n), export_bytes(n)
        return ck + margin <= free_work and (ck + ex + margin <= free_work or ex + margin <= free_shm)

    n = 0
    while n < 1000 and fits_disk(n + 1):
        n += 1
    limits["disk"] = n
    budget = ctx["v3_timeout_s"] - 4 * ASSUMED["fixed_s_per_process"]
    per_layer_s = (2 * moe / ASSUMED["load_GBps"] + moe_export / ASSUMED["load_GBps"]
                   + 2 * moe_export / ASSUMED["export_GBps"]) / 1e9
    limits["time"] = int(max(budget, 0) // per_layer_s) if per_layer_s else 10 ** 6
    chosen = ctx.get("v3_moe_layers") or (2 if ctx["dry"] else max(1, min(limits.values())))
    return {"moe_layers": chosen, "limits": limits, "keep": keep,
            "free_disk_gib": {"workdir": free_work / GIB, "dev_shm": free_shm / GIB},
            "bytes_per_moe_layer": {"checkpoint": moe_ckpt, "export": moe_export, "plan_fp8_resident": moe},
            "assumed": ASSUMED, "memory_target_gib": MEMORY_TARGET_GIB}


def _fsync_all(path: Path) -> float:
    t0 = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def cold_read(path: Path, limit_bytes: int) -> dict:
    """Drop one file's pages from the page cache (it is fsynced: clean pages go), then read up to
    `limit_bytes` of it in 64 MiB pieces: the disk's sequential read speed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0, done = time.perf_counter(), 0
        while done < limit_bytes:
            chunk = os.read(fd, min(64 << 20, limit_bytes - done))
            if not chunk:
                break
            done += len(chunk)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {"file": path.name, "bytes": done, "seconds": round(seconds, 3), "GBps": done / seconds / 1e9}


def phase_v3_generate(ctx: dict) -> dict:
    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

    workdir = Path(ctx["workdir"])
    choice = choose_moe_layers(ctx, workdir)
    n = choice["moe_layers"]
    result = {"choice": choice, "checks": []}
    if not ctx["dry"]:
        lib.check(result["checks"], "at least 4 MoE layers", n >= 4, f"N = {n}, limits {choice['limits']}")
    preset, over = _overrides(ctx, n)
    ckpt = workdir / "v3_checkpoint"
    device = None if ctx["dry"] else "cuda"
    lib.save_partial(ctx, result)
    print(f"generating {preset} FP8, 1 dense + {n} MoE layers, on {device or 'cpu'} -> {ckpt}", flush=True)
    t0 = time.perf_counter()
    make_tiny_checkpoint(ckpt, preset, fp8=True, num_shards=1 + n, overwrite=True, device=device, **over)
    gen_s = time.perf_counter() - t0
    sync_s = _fsync_all(ckpt)
    shards = sorted(ckpt.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    result.update(checkpoint=str(ckpt), bytes=size, shards=len(shards), preset=preset, overrides=over,
                  generate_seconds=round(gen_s, 3), fsync_seconds=round(sync_s, 3),
                  write_GBps=size / (gen_s + sync_s) / 1e9,
                  cold_read=cold_read(max(shards, key=lambda f: f.stat().st_size),
                                      int(ctx.get("cold_read_gib", 4) * GIB)))
    return result


# ------------------------------------------------------------------------------------------------
# scoring, export, evaluation
# ------------------------------------------------------------------------------------------------

def _score(ctx, ckpt, demos, out: Path, mode: str, tokens: int, deadline: float) -> dict:
    cmd = [lib.python(), lib.REPO / "launch/score.py", "--hf-checkpoint", ckpt, "--output", out, "--fp8", mode,
           "--max-length", tokens, "--telemetry-interval", 1, "--overwrite"]
    for spec in demos:
        cmd += ["--demos", spec]
    run = lib.run_cmd(cmd, timeout=deadline - time.monotonic(), env=lib.base_env(ctx), log=out.with_suffix(".log"))
    row = {"mode": mode, "run": run}
    if run["rc"] != 0:
        row["error"] = lib.failure_text(run)
        return row
    info = json.loads((out / "scores.json").read_text())
    timing = info["timing"]
    row.update(load_seconds=timing["load_seconds"], scoring_loop_seconds=timing["scoring_loop_seconds"],
               tokens=info["tokens"]["all"], tokens_per_s=info["tokens"]["all"] / timing["scoring_loop_seconds"],
               dtype=info["dtype"], weights=info["fp8"].get("weights"), gpu_telemetry=info.get("gpu_telemetry"))
    return row


def plan_estimate(cfg, tokens: int) -> dict:
    """plan.py's per-rank figure for EP=1, PP=1, FP8-resident, one micro-batch of `tokens`: its
    default routing imbalance (2) and the exact one for a single rank (1)."""
    from megatron_easyep.mcore import plan

    weights = plan.stage_weights(cfg, "fp8", 1, [cfg.num_hidden_layers])[0]
    out = {"weights_bytes": weights, "overhead_bytes_not_in_torch": 3 * GIB}
    for imbalance in (2.0, 1.0):
        act = plan.scoring_activation_bytes(cfg, tokens=tokens, expert_parallel=1, dtype_bytes=2,
                                            imbalance=imbalance, fp8_resident=True)
        out[f"imbalance_{imbalance:g}"] = {"activation_bytes": act, "weights_plus_activations": weights + sum(act.values())}
    return out


def _memory_vs_plan(ctx, result: dict, cfg, tokens: int) -> None:
    est = plan_estimate(cfg, tokens)
    result["memory_vs_plan"] = est
    for role in ("none", "fp8"):
        tel = (result["score"].get(role) or {}).get("gpu_telemetry")
        if ctx["dry"]:
            est[role] = {"measured": None, "reason": "no CUDA in the dry mode: nothing to measure"}
            continue
        peak = tel[0].get("torch_peak_allocated_mib") if tel and tel[0] else None
        if peak is None:
            lib.check(result["checks"], f"memory vs plan ({role})", False, "no torch_peak_allocated_mib in scores.json")
            continue
        measured = peak * 2 ** 20
        ratios = {k: measured / v["weights_plus_activations"] for k, v in est.items() if k.startswith("imbalance")}
        est[role] = {"torch_peak_bytes": measured, "ratio_to_plan": ratios}
        lib.check(result["checks"], f"memory vs plan ({role})", abs(ratios["imbalance_2"] - 1) <= PLAN_TOLERANCE,
                  f"peak {measured / GIB:.2f} GiB; plan (imbalance 2) "
                  f"{est['imbalance_2']['weights_plus_activations'] / GIB:.2f} GiB, ratio {ratios['imbalance_2']:.3f}; "
                  f"imbalance 1 ratio {ratios['imbalance_1']:.3f}")


def _export_and_evaluate(ctx, result, ckpt: Path, scores: Path, demos, keep: int, tokens: int, deadline) -> None:
    work = Path(ctx["workdir"])
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    free = shutil.disk_usage(work).free
    expected = size * keep / json.loads((ckpt / "config.json").read_text())["n_routed_experts"]
    root = work if free > expected + DISK_MARGIN_GIB * GIB or not Path("/dev/shm").is_dir() else Path("/dev/shm")
    pruned = root / "easyep_gpu_check_pruned"
    run = lib.run_cmd([lib.python(), lib.REPO / "converters/export_pruned.py", "--hf-checkpoint", ckpt, "--scores", scores,
                       "--output", pruned, "--keep", keep, "--metric", "easyep", "--group-policy", "equal-per-group",
                       "--overwrite"], timeout=deadline - time.monotonic(), env=lib.base_env(ctx),
                      log=work / "v3_export.log")
    written = sum(f.stat().st_size for f in pruned.glob("*.safetensors")) if run["rc"] == 0 else 0
    result["export"] = {"run": run, "output_dir": str(pruned), "keep": keep, "bytes": written,
                        "seconds": run["seconds"], "GBps": written / run["seconds"] / 1e9 if written else None}
    lib.save_partial(ctx, result)
    if not lib.check(result["checks"], "export", run["rc"] == 0, lib.failure_text(run) if run["rc"] else f"{written} bytes"):
        return
    cfg = json.loads((pruned / "config.json").read_text())
    lib.check(result["checks"], "export keeps M experts", cfg["n_routed_experts"] == keep, f"{cfg['n_routed_experts']}")
    out = work / "v3_eval_pruned.json"
    cmd = [lib.python(), lib.REPO / "launch/evaluate.py", "--hf-checkpoint", pruned, "--max-length", tokens, "--json", out]
    for spec in demos:
        cmd += ["--demos", spec]
    run = lib.run_cmd(cmd, timeout=deadline - time.monotonic(), env=lib.base_env(ctx), log=work / "v3_eval.log")
    result["evaluate_pruned"] = {"run": run, "seconds": run["seconds"]}
    if lib.check(result["checks"], "evaluate pruned", run["rc"] == 0, lib.failure_text(run) if run["rc"] else ""):
        res = json.loads(out.read_text())["results"]
        result["evaluate_pruned"]["results"] = res
        lib.check(result["checks"], "pruned NLL finite", all(math.isfinite(r["nll"]) for r in res.values()), str(res))
    shutil.rmtree(pruned, ignore_errors=True)


def phase_v3(ctx: dict) -> dict:
    from safetensors.torch import load_file

    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    gen = ctx["results"].get("v3_generate") or {}
    if "checkpoint" not in gen:
        raise RuntimeError("v3_generate wrote no checkpoint (see its entry): nothing to score")
    deadline = time.monotonic() + ctx["timeout_s"] - 5
    work, ckpt = Path(ctx["workdir"]), Path(gen["checkpoint"])
    cfg = DeepseekV3Config.load(ckpt)
    tokens = ctx.get("v3_tokens") or (64 if ctx["dry"] else 16384)
    demos = lib.write_demo_files(work, per_domain=max(1, (ctx.get("v3_demos") or 4) // 2), lengths=[tokens],
                                 vocab=cfg.vocab_size, seed=1)
    keep = gen["choice"]["keep"]
    result = {"tokens_per_demo": tokens, "demos": 2 * max(1, (ctx.get("v3_demos") or 4) // 2),
              "checkpoint_bytes": gen["bytes"], "moe_layers": gen["choice"]["moe_layers"],
              "experts": cfg.n_routed_experts, "score": {}, "checks": []}
    fp8_mode = "emulated" if ctx["dry"] else "native"
    for role, mode in (("none", "none"), ("fp8", fp8_mode)):
        row = _score(ctx, ckpt, demos, work / f"v3_scores_{role}", mode, tokens, deadline)
        result["score"][role] = row
        if lib.check(result["checks"], f"score --fp8 {mode}", "error" not in row, row.get("error", "")):
            row["load_GBps"] = gen["bytes"] / row["load_seconds"] / 1e9
        lib.save_partial(ctx, result)
    if all("error" not in result["score"][r] for r in ("none", "fp8")):
        a = load_file(str(work / "v3_scores_none" / "scores.safetensors"))["easyep"]
        b = load_file(str(work / "v3_scores_fp8" / "scores.safetensors"))["easyep"]
        result["top_m_overlap"] = {"m": keep, "per_layer": lib.topm_overlap(b, a, keep),
                                   "easyep_max_rel_diff": lib.rel_err(b, a)}
        _memory_vs_plan(ctx, result, cfg, tokens)
    if "error" not in result["score"]["none"]:
        _export_and_evaluate(ctx, result, ckpt, work / "v3_scores_none", demos, keep, tokens, deadline)
    return result
