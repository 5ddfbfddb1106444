"""The scoring run: demonstrations through the Megatron model with the scorer attached, resumable
per-rank snapshots, one all-reduce over the world at the end, and the score file with its
provenance (OUTPUT/scores.safetensors + scores.json, written atomically by rank 0).

The scorer itself (what is summed per token and expert) is `scoring.scorer.ExpertScorer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_easyep.mcore import patches
from megatron_easyep.scoring import demos as demos_lib
from megatron_easyep.scoring import metrics
from megatron_easyep.scoring.scorer import ExpertScorer, cprune_expert_features

SCORE_FORMAT = "megatron-easyep-scores/1"


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
    log_every: int = 10
    seed: int = 1234
    cprune_features: bool = False  # also write cprune_features.safetensors (C-Prune)
    fp8: str = "none"  # none | auto | emulated | native | te (see fp8_emulation.resolve_fp8_mode)
    dequantize_at_load: bool = False  # FP8 checkpoints: dequantise every weight at load (old behaviour)
    telemetry_interval: float = 5.0  # seconds between GPU samples (nvidia-ml-py; GPUs only)


def _json_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _log(layout, message: str) -> None:
    if layout.rank == 0:
        print(message, file=sys.stderr, flush=True)


def run_scoring(run: ScoreRun) -> Path | None:
    """Score every demonstration; rank 0 writes OUTPUT/{scores.safetensors,scores.json}.
    Validates inputs before the model is built (feasibility first, then compute)."""
    from megatron_easyep.mcore import parallel
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    from megatron_easyep.mcore import pipeline

    for name in ("max_demos", "max_length", "checkpoint_every", "log_every", "expert_parallel",
                 "pipeline_parallel", "micro_batch_tokens", "micro_batches_per_step"):
        value = getattr(run, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ScoringError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    output = Path(run.output).resolve()
    work = output.with_name(output.name + ".inprogress")
    cfg = DeepseekV3Config.load(run.hf_checkpoint)
    stage_layers = pipeline.stage_layer_counts(cfg.num_hidden_layers, run.pipeline_parallel,
                                               run.pipeline_layout, source=str(cfg.source))
    if run.cprune_features and (run.pipeline_parallel > 1 or run.micro_batch_tokens):
        raise ScoringError("--cprune-features needs --pipeline-parallel 1 and one demo per forward "
                           "(no --micro-batch-tokens): it pools each demo's MoE inputs on one rank")
    if output.exists() and not run.overwrite:
        raise ScoringError(f"output directory {output} exists; pass --overwrite to replace it")
    if run.resume and not work.is_dir():
        raise ScoringError(f"--resume: no interrupted run at {work}")
    demo_list = demos_lib.load_demos(run.demos, run.hf_checkpoint, vocab_size=cfg.vocab_size,
                                     max_length=run.max_length, max_demos=run.max_demos)
    domains = list(dict.fromkeys(d.domain for d in demo_list))
    demo_files = []
    for spec in run.demos:
        demo_file = demos_lib.DemoFile.parse(spec)
        demo_files.append({"path": str(demo_file.path), "domain": demo_file.domain,
                           "sha256": demos_lib.file_sha256(demo_file.path)})

    from megatron_easyep.mcore import fp8_emulation
    from megatron_easyep.scoring import telemetry

    fp8_mode = fp8_emulation.resolve_fp8_mode(run.fp8)  # a clear error before any compute
    if fp8_mode == "te" and run.fp8 == "auto":
        fp8_mode = "emulated"
    if fp8_mode == "te":
        raise fp8_emulation.Fp8Unavailable(
            "--fp8 te: Transformer Engine is usable here, but megatron-easyep builds Megatron's "
            "local layer spec only; use --fp8 emulated (DeepSeek's FP8 numerics, any device)")
    layout = parallel.init_parallel(run.expert_parallel, seed=run.seed,
                                    pipeline_parallel=run.pipeline_parallel, stage_layers=stage_layers)
    # several micro-batches per step let the stages overlap; without PP one forward is a step
    per_step = run.micro_batches_per_step or (2 * run.pipeline_parallel if run.pipeline_parallel > 1 else 1)
    dtype = model_lib.resolve_dtype(run.dtype, cfg)
    provenance = {
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
        "dtype": str(dtype).replace("torch.", ""),
        "dispatcher": run.dispatcher,
        "layout": layout.as_dict(),
        "batching": {"micro_batch_tokens": run.micro_batch_tokens, "micro_batches_per_step": per_step},
        "fp8": {"mode": fp8_mode,
                "weights": "dequantized" if run.dequantize_at_load or not cfg.is_fp8 else "fp8-resident"},
    }
    run_id = _json_hash({k: provenance[k] for k in ("config_hash", "demos", "max_demos",
                                                     "max_length", "dtype", "layout", "fp8",
                                                     "batching")})

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

    load_t0 = time.perf_counter()
    ckpt, model = model_lib.load_megatron_model(run.hf_checkpoint, dtype=dtype,
                                                expert_parallel=run.expert_parallel,
                                                dispatcher=run.dispatcher,
                                                dequantize_at_load=run.dequantize_at_load,
                                                stage_layers=stage_layers if run.pipeline_parallel > 1 else None,
                                                logits=False)  # scores need no logits
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - load_t0  # model build + this rank's weight reads
    from megatron.core import parallel_state

    provenance["fp8"] = fp8_emulation.configure_fp8(model, fp8_mode, cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    moe_layers = pipeline.moe_layer_ids(model.config)  # every stage's, global ids
    # tokens are counted on the first stage only; each stage fills the rows of its own layers
    scorer = ExpertScorer(moe_layers, cfg.n_routed_experts, domains,
                          ep_group=parallel_state.get_expert_model_parallel_group(), device=device,
                          pool_inputs=run.cprune_features, count_tokens=layout.first_stage)
    detach = patches.attach_moe_observers(model, scorer.observe)

    replicas = [demos_lib.shard_for_rank(demo_list, r, layout.data_parallel)
                for r in range(layout.data_parallel)]
    my_demos = replicas[layout.dp_rank]
    schedule = plan_micro_batches([[len(d.input_ids) for _, d in rep] for rep in replicas],
                                  run.micro_batch_tokens, per_step)
    steps = len(schedule)
    provenance["batching"]["micro_batches"] = sum(len(step) for step in schedule)
    start = _resume_step(work, layout.rank) if run.resume else 0
    if start:
        state = torch.load(_state_file(work, layout.rank, start))
        scorer.load_state_dict(state["scorer"])
        _log(layout, f"resuming at step {start}/{steps}")

    fault_after = int(os.environ.get("EASYEP_FAULT_AFTER_STEPS", "0"))  # tests: simulated kill
    t0, tokens_done = time.perf_counter(), 0
    gpu_telemetry = telemetry.GpuTelemetry(run.telemetry_interval).start()
    with torch.no_grad():
        for step in range(start, steps):
            batches, token_domains, demo_indices = [], [], []
            for slot in schedule[step]:
                members = [my_demos[pos] for pos in slot.members[layout.dp_rank]]
                seqs = [list(demo.input_ids) for _, demo in members]
                batches.append(pipeline.padded_batch(seqs, slot.length, slot.rows, device))
                # [s, b] flattened: Megatron's token order inside a layer is sequence-major
                token_domain = torch.full((slot.length, slot.rows), -1, dtype=torch.long, device=device)
                for row, (_, demo) in enumerate(members):
                    token_domain[:len(demo.input_ids), row] = domains.index(demo.domain)
                token_domains.append(token_domain.reshape(-1))
                demo_indices.append(members[0][0] if len(members) == 1 else None)
                tokens_done += sum(len(s) for s in seqs)

            def before_micro_batch(m):
                scorer.begin_step(token_domains[m], demo_indices[m])

            pipeline.forward_micro_batches(model, batches, before_micro_batch)
            if (step + 1) % run.checkpoint_every == 0 and step + 1 < steps:
                _save_state(work, layout.rank, scorer, step + 1, run_id)
                if fault_after and step + 1 >= fault_after:
                    os._exit(17)
            if layout.rank == 0 and ((step + 1) % run.log_every == 0 or step + 1 == steps):
                elapsed = time.perf_counter() - t0
                _log(layout, f"step {step + 1}/{steps}  rank0 tokens {tokens_done}  "
                             f"{tokens_done / max(elapsed, 1e-9):.0f} tokens/s")
    detach()
    # the scoring loop's and the load's time, the slowest rank's (the last stage finishes last)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = torch.tensor([time.perf_counter() - t0, load_seconds], dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    provenance["timing"] = {"load_seconds": round(float(seconds[1]), 3),
                            "scoring_loop_seconds": round(float(seconds[0]), 3),
                            "steps_run": steps - start}
    gpu_telemetry.stop()
    per_rank_telemetry = telemetry.gather_summaries(gpu_telemetry.summary())  # every rank
    if per_rank_telemetry is not None:
        provenance["gpu_telemetry"] = per_rank_telemetry
        _log(layout, telemetry.format_summary(per_rank_telemetry))
    scorer.all_reduce()
    features = (cprune_expert_features(model, scorer, len(demo_list))
                if run.cprune_features else None)

    if layout.rank == 0:
        provenance.update({
            "layers": [int(i) for i in moe_layers],  # global layer ids == HF layer indices
            "metrics": list(metrics.METRICS),
            "domains": domains,
            "num_experts": cfg.n_routed_experts,
            "tokens": {"all": int(scorer.tokens.sum())} | {
                d: int(scorer.tokens[i]) for i, d in enumerate(domains)},
            "demos_per_domain": {d: sum(1 for x in demo_list if x.domain == d) for d in domains},
            "truncated_tokens": sum(d.truncated_tokens for d in demo_list),
            "megatron_core_version": _megatron_version(),
            "torch_version": torch.__version__,
        })
        if features is not None:
            from safetensors.torch import save_file

            work.mkdir(parents=True, exist_ok=True)  # no snapshot was taken in a short run
            save_file(features, str(work / "cprune_features.safetensors"))
            provenance["cprune_features"] = "cprune_features.safetensors"
        _write_scores(work, output, scorer.score_tensors(), provenance, run.overwrite)
        _log(layout, f"wrote {output}/scores.safetensors")
    if dist.get_world_size() > 1:
        dist.barrier()
    return output if layout.rank == 0 else None


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch slot, the same shape on every rank: `members[r]` are positions in replica
    r's demo list (empty rows and positions beyond a demo's length are padding)."""

    rows: int
    length: int
    members: tuple[tuple[int, ...], ...]


def plan_micro_batches(lengths: list[list[int]], micro_batch_tokens: int | None,
                       per_step: int) -> list[list[MicroBatch]]:
    """Steps of micro-batches for every data-parallel replica, computed identically on every rank
    from the demo lengths (no communication): each replica packs its demos in order, greedily,
    while rows x longest <= micro_batch_tokens (None: one demo each); slot j of every replica is
    padded to the largest rows and length over replicas (EP collectives run in lockstep, and the
    allgather dispatcher needs equal token counts); `per_step` micro-batches make one step
    (a pipeline flush, and the unit of --resume)."""
    packed = []
    for replica in lengths:
        groups, current, longest = [], [], 0
        for pos, n in enumerate(replica):
            if current and micro_batch_tokens is None:
                groups.append(current)
                current, longest = [], 0
            elif current and (len(current) + 1) * max(longest, n) > micro_batch_tokens:
                groups.append(current)
                current, longest = [], 0
            current.append(pos)
            longest = max(longest, n)
        if current:
            groups.append(current)
        packed.append(groups)
    total = max((len(g) for g in packed), default=0)
    slots = []
    for j in range(max(total, 1)):
        members = tuple(tuple(groups[j]) if j < len(groups) else () for groups in packed)
        rows = max(max((len(m) for m in members), default=1), 1)
        length = max([lengths[r][pos] for r, m in enumerate(members) for pos in m] + [1])
        slots.append(MicroBatch(rows, length, members))
    return [slots[i:i + per_step] for i in range(0, len(slots), per_step)]


def _state_file(work: Path, rank: int, next_step: int) -> Path:
    return work / f"state_rank{rank}_step{next_step}.pt"


def _save_state(work: Path, rank: int, scorer: ExpertScorer, next_step: int, run_id: str) -> None:
    """Atomic per-rank snapshot; the previous one is kept, so a kill between two ranks' saves
    still leaves a step that every rank has. The first one creates `work` and its run.json."""
    run_file = work / "run.json"
    if not run_file.is_file():
        work.mkdir(parents=True, exist_ok=True)
        tmp_run = work / f".run.json.rank{rank}.tmp"
        tmp_run.write_text(json.dumps({"run_id": run_id}))
        os.replace(tmp_run, run_file)
    path = _state_file(work, rank, next_step)
    tmp = path.with_suffix(".tmp")
    torch.save({"scorer": scorer.state_dict(), "next_step": next_step}, tmp)
    os.replace(tmp, path)
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
    """scores.safetensors + scores.json into the in-progress dir, then one rename."""
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)  # made lazily (no snapshot in a short run)
    save_file(tensors, str(work / "scores.safetensors"),
              metadata={"format": SCORE_FORMAT, "config_hash": provenance["config_hash"]})
    (work / "scores.json").write_text(json.dumps(provenance, indent=2) + "\n")
    for leftover in list(work.glob("state_rank*")) + [work / "run.json"]:
        leftover.unlink(missing_ok=True)
    if output.exists():
        if not overwrite:
            raise ScoringError(f"output directory {output} exists; pass --overwrite")
        shutil.rmtree(output)
    os.replace(work, output)
