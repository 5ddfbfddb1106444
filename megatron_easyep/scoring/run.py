"""The scoring run: demonstrations through the Megatron model with the scorer attached, resumable
per-rank snapshots, one all-reduce over the world at the end, and the score file with its
provenance (OUTPUT/scores.safetensors + scores.json, written atomically by rank 0).

The scorer itself (what is summed per token and expert) is `scoring.scorer.ExpertScorer`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.io import SCORE_FORMAT
from megatron_easyep.runtime.session import ModelSession, SessionSpec, forward_loop
from megatron_easyep.scoring import demos as demos_lib
from megatron_easyep.scoring import metrics
from megatron_easyep.scoring.scorer import ExpertScorer, ScoreObserver



class ScoringError(ValueError):
    """Bad scoring input or output location."""


@dataclass
class ScoreRun:
    """Everything a scoring run needs; built from the YAML config + command line."""

    hf_checkpoint: str
    demos: list[str]
    output: str
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    pipeline_layout: str | None = None  # decoder layers per stage, "16,15,15,15"; default: even split
    micro_batch_tokens: int | None = None  # tokens (padding included) per micro-batch; None = one demo
    micro_batches_per_step: int | None = None  # per step (pipeline flush); default 2 x PP (1 without PP)
    dispatcher: str = "alltoall"
    max_demos: int | None = None
    max_length: int | None = 4096
    dtype: str | None = None
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 20  # steps between resumable state saves
    seed: int = 1234
    cprune_features: bool = False  # also write cprune_features.safetensors (C-Prune)
    fp8: str = "none"  # none | auto | emulated | native | te (see fp8_emulation.resolve_fp8_mode)
    dequantize_at_load: bool = False  # FP8 checkpoints: dequantise every weight at load (old behaviour)
    telemetry_interval: float = 5.0  # seconds between GPU samples (nvidia-ml-py; GPUs only)
    check_finite: bool = False  # check every MoE layer's forward for NaN/Inf (final scores: always)
    dist_timeout: float | None = None  # seconds a collective waits for the other ranks (None: 300)


def _json_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _log(layout, message: str) -> None:
    if layout.rank == 0:
        print(message, file=sys.stderr, flush=True)


def _check_run(run: ScoreRun) -> None:
    for name in ("max_demos", "max_length", "checkpoint_every", "expert_parallel",
                 "pipeline_parallel", "micro_batch_tokens", "micro_batches_per_step"):
        value = getattr(run, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ScoringError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _check_output(run: ScoreRun, output: Path, work: Path) -> None:
    if output.exists() and not run.overwrite:
        raise ScoringError(f"output directory {output} exists; pass --overwrite to replace it")
    if run.resume and not work.is_dir():
        raise ScoringError(f"--resume: no interrupted run at {work}")


def _demo_files(specs: list[str]) -> list[dict]:
    files = []
    for spec in specs:
        demo_file = demos_lib.DemoFile.parse(spec)
        files.append({"path": str(demo_file.path), "domain": demo_file.domain,
                      "sha256": demos_lib.file_sha256(demo_file.path)})
    return files


def _fp8_mode(run: ScoreRun, cfg) -> str:
    """The FP8 numerics asked for, resolved with a clear error before any compute (`auto`
    follows the checkpoint: emulated for FP8-resident weights)."""
    from megatron_easyep.mcore import fp8_emulation

    fp8_mode = fp8_emulation.resolve_fp8_mode(
        run.fp8, fp8_weights_resident=cfg.is_fp8 and not run.dequantize_at_load)
    if fp8_mode == "te":
        raise fp8_emulation.Fp8Unavailable(
            "--fp8 te: Transformer Engine is usable here, but megatron-easyep builds Megatron's "
            "local layer spec only; use --fp8 emulated (DeepSeek's FP8 numerics, any device)")
    return fp8_mode


def _provenance(run: ScoreRun, session: ModelSession, demo_files: list[dict], fp8_mode: str,
                per_step: int) -> dict:
    cfg = session.cfg
    return {
        "format": SCORE_FORMAT,
        "checkpoint": str(Path(run.hf_checkpoint).resolve()),
        "config_hash": cfg.config_hash,
        # the model apart from how its weights are stored: scores made on a BF16 copy prune the FP8 original
        "architecture_hash": cfg.architecture_hash,
        "storage_format": cfg.storage_format,
        "demos": demo_files,
        "max_demos": run.max_demos,
        "max_length": run.max_length,
        "length_rule": "demos longer than max_length keep their first max_length tokens",
        "dtype": str(session.dtype).replace("torch.", ""),
        "dispatcher": run.dispatcher,
        "layout": session.layout.as_dict(),
        "batching": {"micro_batch_tokens": run.micro_batch_tokens, "micro_batches_per_step": per_step},
        "fp8": {"mode": fp8_mode,
                "weights": "dequantized" if run.dequantize_at_load or not cfg.is_fp8 else "fp8-resident"},
    }


def _prepare_work(run: ScoreRun, work: Path, layout, run_id: str) -> None:
    if layout.rank == 0 and not run.resume:
        # a stale interrupted run goes; the new one's folder appears at its first snapshot, so a
        # run that fails before one (bad shard, missing scale...) leaves nothing behind
        shutil.rmtree(work, ignore_errors=True)
    if dist.get_world_size() > 1:
        dist.barrier()
    if run.resume and json.loads((work / "run.json").read_text())["run_id"] != run_id:
        # every rank checks, so no rank is left waiting in a collective
        raise ScoringError(f"--resume: {work} belongs to a different run (checkpoint, demos, "
                           "length limits, dtype, FP8 mode or parallel layout differ)")


def _session_spec(run: ScoreRun) -> SessionSpec:
    return SessionSpec(run.hf_checkpoint, expert_parallel=run.expert_parallel,
                       pipeline_parallel=run.pipeline_parallel, pipeline_layout=run.pipeline_layout,
                       dispatcher=run.dispatcher, dtype=run.dtype, seed=run.seed,
                       logits=False,  # scores need no logits
                       dequantize_at_load=run.dequantize_at_load, dist_timeout=run.dist_timeout)


def run_scoring(run: ScoreRun) -> Path | None:
    """Score every demonstration; rank 0 writes OUTPUT/{scores.safetensors,scores.json}.
    Validates inputs before the model is built (feasibility first, then compute)."""
    from megatron_easyep.mcore import fp8_emulation

    _check_run(run)
    output = Path(run.output).resolve()
    work = output.with_name(output.name + ".inprogress")
    session = ModelSession.open(_session_spec(run))
    _check_output(run, output, work)
    demo_list = demos_lib.load_demos(run.demos, run.hf_checkpoint, vocab_size=session.cfg.vocab_size,
                                     max_length=run.max_length, max_demos=run.max_demos)
    domains = list(dict.fromkeys(d.domain for d in demo_list))
    demo_files = _demo_files(run.demos)
    fp8_mode = _fp8_mode(run, session.cfg)
    layout = session.init_parallel()
    per_step = run.micro_batches_per_step or session.default_per_step()
    provenance = _provenance(run, session, demo_files, fp8_mode, per_step)
    run_id = _json_hash({k: provenance[k] for k in ("config_hash", "demos", "max_demos",
                                                     "max_length", "dtype", "layout", "fp8",
                                                     "batching")})
    _prepare_work(run, work, layout, run_id)
    observer = ScoreObserver(domains, len(demo_list), cprune_features=run.cprune_features,
                             check_finite=run.check_finite)
    load_seconds = _timed(session.device, lambda: session.load_model([observer]))
    provenance["fp8"] = fp8_emulation.configure_fp8(session.model, fp8_mode, session.cfg)
    plan = session.plan(demo_list, run.micro_batch_tokens, per_step)
    provenance["batching"]["micro_batches"] = plan.micro_batches
    start = _resume(run, work, layout, observer.scorer, plan.steps)
    provenance["timing"], telemetry_summary = _timed_loop(run, session, plan, observer, work, run_id, start,
                                                          load_seconds)
    if telemetry_summary is not None:
        provenance["gpu_telemetry"] = telemetry_summary
    features = observer.finalize(session)
    if layout.rank == 0:
        provenance.update(_totals(session.cfg, observer, demo_list, domains))
        if features is not None:
            work.mkdir(parents=True, exist_ok=True)  # no snapshot was taken in a short run
            io.write_tensors(work / "cprune_features.safetensors", features)
            provenance["cprune_features"] = "cprune_features.safetensors"
        _write_scores(work, output, observer.scorer.score_tensors(), provenance, run.overwrite)
        _log(layout, f"wrote {output}/scores.safetensors")
    if dist.get_world_size() > 1:
        dist.barrier()
    return output if layout.rank == 0 else None


def _resume(run: ScoreRun, work: Path, layout, scorer: ExpertScorer, steps: int) -> int:
    """The step to start at: 0, or the latest one every rank has a snapshot of (loaded)."""
    start = _resume_step(work, layout.rank) if run.resume else 0
    if start:
        state = torch.load(_state_file(work, layout.rank, start))
        scorer.load_state_dict(state["scorer"])
        _log(layout, f"resuming at step {start}/{steps}")
    return start


def _timed(device, work) -> float:
    """Seconds `work()` takes on this rank, its GPU work included."""
    t0 = time.perf_counter()
    work()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _timed_loop(run: ScoreRun, session: ModelSession, plan, observer: ScoreObserver, work: Path,
                run_id: str, start: int, load_seconds: float) -> tuple[dict, dict | None]:
    """The forward loop with snapshots, timed (the slowest rank's: the last stage finishes last)
    and with GPU telemetry. Returns the timing record (with the slowest rank's model load) and
    every rank's telemetry (or None)."""
    from megatron_easyep.scoring import telemetry

    layout = session.layout

    def periodic(next_step: int) -> bool:
        return next_step % run.checkpoint_every == 0 and next_step < plan.steps

    def after_step(next_step: int) -> None:
        if periodic(next_step):
            _save_state(work, layout.rank, observer.scorer, next_step, run_id)

    def on_stop(next_step: int) -> str:  # SIGINT/SIGTERM: every rank snapshots this step boundary
        if not periodic(next_step):
            _save_state(work, layout.rank, observer.scorer, next_step, run_id)
        return str(work)

    gpu_telemetry = telemetry.GpuTelemetry(run.telemetry_interval).start()
    try:
        loop_seconds = _timed(session.device, lambda: forward_loop(
            session, plan, [observer], start=start, after_step=after_step, progress="score", on_stop=on_stop))
    except BaseException:  # stopped by a signal, a dead rank, non-finite values: the sampler goes too
        gpu_telemetry.stop()
        raise
    seconds = torch.tensor([loop_seconds, load_seconds], dtype=torch.float64, device=session.device)
    if dist.get_world_size() > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    timing = {"load_seconds": round(float(seconds[1]), 3),
              "scoring_loop_seconds": round(float(seconds[0]), 3), "steps_run": plan.steps - start}
    gpu_telemetry.stop()
    per_rank_telemetry = telemetry.gather_summaries(gpu_telemetry.summary())  # every rank
    if per_rank_telemetry is not None:
        _log(layout, telemetry.format_summary(per_rank_telemetry))
    return timing, per_rank_telemetry


def _totals(cfg, observer: ScoreObserver, demo_list: list, domains: list[str]) -> dict:
    scorer = observer.scorer
    return {
        "layers": [int(i) for i in observer.moe_layers],  # global layer ids == HF layer indices
        "metrics": list(metrics.METRICS),
        "domains": domains,
        "num_experts": cfg.n_routed_experts,
        "tokens": {"all": int(scorer.tokens.sum())} | {
            d: int(scorer.tokens[i]) for i, d in enumerate(domains)},
        "demos_per_domain": {d: sum(1 for x in demo_list if x.domain == d) for d in domains},
        "truncated_tokens": sum(d.truncated_tokens for d in demo_list),
        "megatron_core_version": _megatron_version(),
        "torch_version": torch.__version__,
    }


def _state_file(work: Path, rank: int, next_step: int) -> Path:
    return work / f"state_rank{rank}_step{next_step}.pt"


def _save_state(work: Path, rank: int, scorer: ExpertScorer, next_step: int, run_id: str) -> None:
    """Atomic per-rank snapshot; the previous one is kept, so a kill between two ranks' saves
    still leaves a step that every rank has. The first one creates `work` and its run.json."""
    run_file = work / "run.json"
    if not run_file.is_file():
        work.mkdir(parents=True, exist_ok=True)
        io.write_json_atomic(run_file, {"run_id": run_id}, indent=None)
    # serialised first: torch.save reports a failing write as a RuntimeError, io names the path and the OS error
    snapshot = BytesIO()
    torch.save({"scorer": scorer.state_dict(), "next_step": next_step}, snapshot)
    io.write_bytes_atomic(_state_file(work, rank, next_step), snapshot.getvalue())
    snapshots = sorted(work.glob(f"state_rank{rank}_step*.pt"),
                       key=lambda p: int(p.stem.rsplit("step", 1)[1]))
    for old in snapshots[:-2]:
        old.unlink(missing_ok=True)
    if rank == 0:
        print(f"snapshot at step {next_step} in {work}; if this run stops, the same command with "
              f"--resume continues from here", file=sys.stderr, flush=True)


def _resume_step(work: Path, rank: int) -> int:
    """The latest step for which every rank has a snapshot (0 = start over)."""
    mine = {int(p.stem.rsplit("step", 1)[1]) for p in work.glob(f"state_rank{rank}_step*.pt")}
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(mine))
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    else:
        common = mine
    return max(common, default=0)


def _megatron_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def _write_scores(work: Path, output: Path, tensors: dict, provenance: dict,
                  overwrite: bool) -> None:
    """scores.safetensors + scores.json (`io.write_score_file`, with the tensor file's sha256)
    into the in-progress dir, its snapshots removed, then published by one rename (`io.publish`:
    an existing output is replaced atomically with --overwrite)."""
    io.write_score_file(work, tensors, provenance["layers"], provenance["config_hash"], provenance["domains"],
                        tokens=provenance["tokens"], provenance=provenance)
    for leftover in list(work.glob("state_rank*")) + [work / "run.json"]:
        leftover.unlink(missing_ok=True)
    if io.output_in_the_way(output) and not overwrite:
        raise ScoringError(f"output directory {output} exists; pass --overwrite")
    io.publish(work, output, overwrite=overwrite)
