"""Expert scoring inside the Megatron-Core forward: hooks -> metrics -> EP/DP all-reduce.

Each MoE layer, on each rank, after its routed output is combined (megatron_patches hook points):
  * s_t for this rank's tokens from the residual h and the routed output (h~ = h + routed);
  * s_t, the token's domain and the routing map are all-gathered over the expert-parallel group,
    so the rank can tell which token each of its expert rows belongs to: the dispatcher lays out
    a local expert's rows as the EP group's tokens routed to it, source rank by source rank, in
    token order (allgather and alltoall alike), which is the order of
    routing_map_of_group[:, local_experts].T.nonzero();
  * each row gives g (the row's prob) and ||e|| = ||row|| / g (Megatron multiplies the expert
    output by g inside the expert), and metrics.expert_scores sums them per (domain, expert).
Sums are kept online in float64 per rank (only local experts are filled), and all-reduced once
over the world at the end: every (token, expert) pair is counted exactly once, on the rank that
owns the expert within the token's EP group.
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

from megatron_easyep import demos as demos_lib
from megatron_easyep import megatron_patches, metrics

SCORE_FORMAT = "megatron-easyep-scores/1"


class ScoringError(ValueError):
    """Bad scoring input or output location."""


class ExpertScorer:
    """Online per-(domain, metric, layer, expert) sums for one model on one rank."""

    def __init__(self, moe_layer_indices: list[int], num_experts: int, domains: list[str],
                 ep_group=None, device="cpu", pool_inputs: bool = False):
        self.layer_row = {layer: row for row, layer in enumerate(moe_layer_indices)}
        # C-Prune: per demonstration, the mean of its MoE inputs in every MoE layer [L, H]
        self.pool_inputs = pool_inputs
        self.pooled_inputs: dict[int, torch.Tensor] = {}
        self.demo_index: int | None = None
        self.num_experts = num_experts
        self.domains = domains
        self.ep_group = ep_group
        self.sums = torch.zeros(len(domains), len(metrics.METRICS), len(moe_layer_indices),
                                num_experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(len(domains), dtype=torch.float64, device=device)
        self.token_domain: torch.Tensor | None = None  # [T] domain index, -1 = padding
        self._local_id_cache: dict = {}

    def begin_step(self, token_domain: torch.Tensor, demo_index: int | None = None) -> None:
        self.token_domain = token_domain
        self.demo_index = demo_index
        counts = torch.bincount(token_domain + 1, minlength=len(self.domains) + 1)  # 0 = padding
        self.tokens += counts[1:].to(self.tokens)

    def observe(self, layer_index: int, obs: megatron_patches.MoEObservation) -> None:
        if self.pool_inputs and self.demo_index is not None:
            valid = self.token_domain >= 0
            pooled = self.pooled_inputs.setdefault(
                self.demo_index, torch.zeros(len(self.layer_row), obs.moe_input.shape[-1],
                                             dtype=torch.float32))
            pooled[self.layer_row[layer_index]] = obs.moe_input[valid].float().mean(0).cpu()
        s = metrics.token_contribution(obs.residual, obs.residual + obs.routed_output)
        packed = torch.cat([s.double()[:, None], self.token_domain.double()[:, None].to(s.device),
                            obs.routing_map.double()], dim=1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(self.ep_group))]
            dist.all_gather(parts, packed.contiguous(), group=self.ep_group)
            packed = torch.cat(parts, dim=0)
        s_group, domain_group, routing_group = packed[:, 0], packed[:, 1].long(), packed[:, 2:]

        local = self._local_ids(obs.local_expert_ids, packed.device)
        rows = obs.expert_rows
        routed_here = routing_group[:, local].bool().T  # [E_local, T_group]
        # Rows are grouped by local expert, tokens in EP-group order: exactly the order of
        # routed_here.nonzero(). nonzero_static with the known row count avoids a GPU sync;
        # on CPU we also check the count (free there).
        if not rows.is_cuda and int(routed_here.sum()) != rows.shape[0]:
            raise RuntimeError(
                f"layer {layer_index}: {rows.shape[0]} expert rows but the routing map routes "
                f"{int(routed_here.sum())} tokens to this rank's experts; the dispatcher's row "
                "layout is not what megatron_easyep.scoring assumes")
        local_expert, token = torch.nonzero_static(routed_here, size=rows.shape[0]).unbind(1)
        gate = obs.row_probs.float()
        out_norm = rows.float().norm(dim=-1)
        expert_out_norm = torch.where(gate > 0, out_norm / gate.clamp_min(1e-30),
                                      torch.zeros_like(out_norm))
        # padding tokens (domain -1) land in one extra bin that is dropped
        domain = domain_group[token]
        num_bins = len(self.domains) * self.num_experts
        bins = torch.where(domain >= 0, domain * self.num_experts + local[local_expert], num_bins)
        sums = metrics.expert_scores(bins, gate, expert_out_norm, s_group[token], num_bins + 1)
        row = self.layer_row[layer_index]
        for m, name in enumerate(metrics.METRICS):
            self.sums[:, m, row] += sums[name][:num_bins].view(len(self.domains),
                                                               self.num_experts)

    def _local_ids(self, ids: list[int], device) -> torch.Tensor:
        key = (tuple(ids), str(device))
        if key not in self._local_id_cache:
            self._local_id_cache[key] = torch.tensor(ids, device=device)
        return self._local_id_cache[key]

    def all_reduce(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.tokens)

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "tokens": self.tokens.cpu(),
                "pooled_inputs": dict(self.pooled_inputs)}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.tokens.copy_(state["tokens"])
        self.pooled_inputs = dict(state.get("pooled_inputs", {}))

    def score_tensors(self) -> dict[str, torch.Tensor]:
        """{metric: [L, E]} over all domains and {metric@domain: [L, E]}."""
        out = {}
        for m, name in enumerate(metrics.METRICS):
            out[name] = self.sums[:, m].sum(dim=0).cpu().contiguous()
            for d, domain in enumerate(self.domains):
                out[f"{name}@{domain}"] = self.sums[d, m].cpu().contiguous()
        return out


@torch.no_grad()
def cprune_expert_features(model, scorer: ExpertScorer, num_demos: int) -> dict | None:
    """C-Prune's expert features (arXiv 2504.07807): every expert run on the mean-pooled MoE
    input of every demonstration. Pooled inputs come from the scoring forward; each rank runs
    its own experts on all of them, and rank 0 gathers {"features": [L, E, N, H],
    "pooled_inputs": [L, N, H]} (float32; N = demonstrations in input order)."""
    from megatron.core import parallel_state

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, scorer.pooled_inputs)
    by_demo = {k: v for part in gathered for k, v in part.items()}
    if sorted(by_demo) != list(range(num_demos)):
        raise RuntimeError("C-Prune: pooled inputs are missing for some demonstrations")
    pooled = torch.stack([by_demo[i] for i in range(num_demos)], dim=1)  # [L, N, H]
    ep_group = parallel_state.get_expert_model_parallel_group()
    features = []
    for row, (_, layer) in enumerate(megatron_patches.iter_moe_layers(model)):
        experts = megatron_patches.local_experts(layer.mlp)
        param = next(experts[0].parameters())
        x = pooled[row].to(device=param.device, dtype=param.dtype)
        local = torch.stack([expert(x)[0].float() for expert in experts])  # [E_local, N, H]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(ep_group))]
        dist.all_gather(parts, local.contiguous(), group=ep_group)
        features.append(torch.cat(parts).cpu())  # EP ranks hold contiguous global id blocks
    if dist.get_rank() != 0:
        return None
    return {"features": torch.stack(features).contiguous(), "pooled_inputs": pooled.contiguous()}


@dataclass
class ScoreRun:
    """Everything a scoring run needs; built from the YAML config + command line."""

    hf_checkpoint: str
    demos: list[str]
    output: str
    expert_parallel: int = 1
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
    fp8: str = "none"  # none | auto | emulated | te (see fp8_emulation.resolve_fp8_mode)
    telemetry_interval: float = 5.0  # seconds between GPU samples (nvidia-ml-py; GPUs only)


def _json_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _log(layout, message: str) -> None:
    if layout.rank == 0:
        print(message, file=sys.stderr, flush=True)


def run_scoring(run: ScoreRun) -> Path | None:
    """Score every demonstration; rank 0 writes OUTPUT/{scores.safetensors,scores.json}.
    Validates inputs before the model is built (feasibility first, then compute)."""
    from megatron_easyep import distributed, model as model_lib
    from megatron_easyep.hf_checkpoint import DeepseekV3Config

    for name in ("max_demos", "max_length", "checkpoint_every", "log_every", "expert_parallel"):
        value = getattr(run, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ScoringError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    output = Path(run.output).resolve()
    work = output.with_name(output.name + ".inprogress")
    cfg = DeepseekV3Config.load(run.hf_checkpoint)
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

    from megatron_easyep import fp8_emulation, telemetry

    fp8_mode = fp8_emulation.resolve_fp8_mode(run.fp8)  # a clear error before any compute
    if fp8_mode == "te" and run.fp8 == "auto":
        fp8_mode = "emulated"
    if fp8_mode == "te":
        raise fp8_emulation.Fp8Unavailable(
            "--fp8 te: Transformer Engine is usable here, but megatron-easyep builds Megatron's "
            "local layer spec only; use --fp8 emulated (DeepSeek's FP8 numerics, any device)")
    layout = distributed.init_parallel(run.expert_parallel, seed=run.seed)
    dtype = _resolve_dtype(run.dtype, cfg)
    provenance = {
        "format": SCORE_FORMAT,
        "checkpoint": str(Path(run.hf_checkpoint).resolve()),
        "config_hash": cfg.config_hash,
        "demos": demo_files,
        "max_demos": run.max_demos,
        "max_length": run.max_length,
        "length_rule": "demos longer than max_length keep their first max_length tokens",
        "dtype": str(dtype).replace("torch.", ""),
        "dispatcher": run.dispatcher,
        "layout": layout.as_dict(),
        "fp8": {"mode": fp8_mode},
    }
    run_id = _json_hash({k: provenance[k] for k in ("config_hash", "demos", "max_demos",
                                                     "max_length", "dtype", "layout", "fp8")})

    if layout.rank == 0 and not run.resume:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "run.json").write_text(json.dumps({"run_id": run_id}))
    if dist.get_world_size() > 1:
        dist.barrier()
    if run.resume and json.loads((work / "run.json").read_text())["run_id"] != run_id:
        # every rank checks, so no rank is left waiting in a collective
        raise ScoringError(f"--resume: {work} belongs to a different run (checkpoint, demos, "
                           "length limits, dtype, FP8 mode or parallel layout differ)")

    ckpt, model = model_lib.load_megatron_model(run.hf_checkpoint, dtype=dtype,
                                                expert_parallel=run.expert_parallel,
                                                dispatcher=run.dispatcher)
    from megatron.core import parallel_state

    if fp8_mode == "emulated":
        fp8_state = fp8_emulation.enable_fp8_emulation(
            model, cfg.weight_block_size or fp8_emulation.DEFAULT_BLOCK_SIZE, hf_config=cfg)
        provenance["fp8"] = fp8_state.as_dict()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    moe_layers = [index for index, _ in megatron_patches.iter_moe_layers(model)]
    scorer = ExpertScorer(moe_layers, cfg.n_routed_experts, domains,
                          ep_group=parallel_state.get_expert_model_parallel_group(), device=device,
                          pool_inputs=run.cprune_features)
    detach = megatron_patches.attach_moe_observers(model, scorer.observe)

    my_demos = demos_lib.shard_for_rank(demo_list, layout.dp_rank, layout.data_parallel)
    steps = demos_lib.num_steps(len(demo_list), layout.data_parallel)
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
            index, demo = my_demos[step] if step < len(my_demos) else (None, None)
            ids = list(demo.input_ids) if demo else []
            length = distributed.max_over_world(len(ids), device)
            token_domain = torch.full((length,), -1, dtype=torch.long, device=device)
            if demo:
                token_domain[:len(ids)] = domains.index(demo.domain)
            scorer.begin_step(token_domain, index)
            model_lib.forward_padded(model, ids, length)
            tokens_done += len(ids)
            if (step + 1) % run.checkpoint_every == 0 and step + 1 < steps:
                _save_state(work, layout.rank, scorer, step + 1)
                if fault_after and step + 1 >= fault_after:
                    os._exit(17)
            if layout.rank == 0 and ((step + 1) % run.log_every == 0 or step + 1 == steps):
                elapsed = time.perf_counter() - t0
                _log(layout, f"step {step + 1}/{steps}  rank0 tokens {tokens_done}  "
                             f"{tokens_done / max(elapsed, 1e-9):.0f} tokens/s")
    detach()
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
            "layers": [int(i) for i in moe_layers],  # decoder index == HF layer index (PP = 1)
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

            save_file(features, str(work / "cprune_features.safetensors"))
            provenance["cprune_features"] = "cprune_features.safetensors"
        _write_scores(work, output, scorer.score_tensors(), provenance, run.overwrite)
        _log(layout, f"wrote {output}/scores.safetensors")
    if dist.get_world_size() > 1:
        dist.barrier()
    return output if layout.rank == 0 else None


def _resolve_dtype(name: str | None, cfg) -> torch.dtype:
    from megatron_easyep.model import DTYPES

    if name is None:  # fp32 on CPU; the checkpoint's dtype on GPU (FP8 weights -> bf16)
        if not torch.cuda.is_available():
            return torch.float32
        name = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "bfloat16"
    if name not in DTYPES:
        raise ScoringError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _state_file(work: Path, rank: int, next_step: int) -> Path:
    return work / f"state_rank{rank}_step{next_step}.pt"


def _save_state(work: Path, rank: int, scorer: ExpertScorer, next_step: int) -> None:
    """Atomic per-rank snapshot; the previous one is kept, so a kill between two ranks' saves
    still leaves a step that every rank has."""
    path = _state_file(work, rank, next_step)
    tmp = path.with_suffix(".tmp")
    torch.save({"scorer": scorer.state_dict(), "next_step": next_step}, tmp)
    os.replace(tmp, path)
    snapshots = sorted(work.glob(f"state_rank{rank}_step*.pt"),
                       key=lambda p: int(p.stem.rsplit("step", 1)[1]))
    for old in snapshots[:-2]:
        old.unlink(missing_ok=True)


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
