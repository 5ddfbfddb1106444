"""Routing drift of a pruned checkpoint, measured on the ORIGINAL model's hidden states.

For every MoE layer the router input x (the pre-MLP-normed hidden states of the original model,
real tokens only) is routed twice:

* original: DeepSeek-V3 routing over all E experts with the source config's groups;
* pruned:   the same routing over the kept experts only -- gate rows and correction bias sliced to
            the kept ids, renumbered 0..E'-1 in the order pruning.json lists them, grouped as the
            pruned config.json declares (n_group', topk_group').

Per token:
* ``agree``: the original top-k restricted to the kept experts is a subset of the pruned top-k
  (mapped back to original ids). A token whose original experts were all pruned agrees
  vacuously; its kept mass is 0, which is what ``kept_gate_mass`` reports.
* ``same_topk``: the pruned top-k is exactly the original top-k (no chosen expert was pruned).
* ``kept_mass``: sum of the original combine weights g over (original top-k ∩ kept) divided by
  their sum over the original top-k.

The core (`route`, `layer_drift`) is plain torch; `run_drift` runs the original model with
Megatron-Core over demonstrations (torchrun, any EP), all-reduces the per-layer sums and writes
``routing_drift.json``. Hidden states are the original model's everywhere: this measures how the
router's decision changes at each layer in isolation, not the compounding through later layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_easyep.checkpoint import io
from megatron_easyep.mcore.compat import deepseek_group_limited_topk
from megatron_easyep.runtime.observer import Observer
from megatron_easyep.runtime.session import ModelSession, SessionSpec, forward_loop

DRIFT_FORMAT = "megatron-easyep/routing-drift/1"
DRIFT_FILE = "routing_drift.json"
PRUNING_FILE = "pruning.json"
SUM_KEYS = ("tokens", "agree", "kept_mass", "same_topk")


class RoutingDriftError(ValueError):
    """Bad input to the drift report (the message names the file and the problem)."""


# --------------------------------------------------------------------------------------------
# core: routing and per-layer drift sums
# --------------------------------------------------------------------------------------------

def route(choice_scores: torch.Tensor, scores: torch.Tensor, top_k: int, n_group: int,
          topk_group: int, scaling: float, *, normalize: bool = True):
    """DeepSeek-V3 routing. choice_scores [T, E] (sigmoid + correction bias) pick the experts,
    group-limited when n_group > 1 (a group scores the sum of its top-2 choice scores, the
    topk_group best groups stay); the weights are the unbiased `scores` [T, E] of the chosen
    experts, renormalised and times `scaling`. Returns (ids [T, k], weights [T, k])."""
    num_tokens, num_experts = choice_scores.shape
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} is larger than the {num_experts} experts")
    if n_group > 1:
        if num_experts % n_group:
            raise ValueError(f"{num_experts} experts do not split into {n_group} groups")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group {topk_group} must be in [1, n_group={n_group}]")
        ids = deepseek_group_limited_topk(choice_scores, top_k, num_tokens, num_experts, n_group,
                                          topk_group)[1]
    else:
        ids = torch.topk(choice_scores, k=top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if normalize and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


@dataclass(frozen=True)
class Routing:
    """The routing values of one config: top-k, groups, scaling."""

    top_k: int
    n_group: int
    topk_group: int
    scaling: float = 1.0
    normalize: bool = True


def _route_logits(router_input, gate_weight, bias, routing: Routing):
    scores = torch.sigmoid(router_input @ gate_weight.T)
    return route(scores + bias, scores, routing.top_k, routing.n_group, routing.topk_group,
                 routing.scaling, normalize=routing.normalize)


def layer_drift(router_input: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor,
                kept_ids, original: Routing, pruned: Routing,
                megatron_routing_map: torch.Tensor | None = None, disabled_ids=(),
                disabled_bias: float = -1e4) -> dict:
    """Drift sums of one layer for tokens `router_input` [T, H].

    gate_weight [E, H] and bias [E] are the ORIGINAL router's; kept_ids lists the kept original
    ids, position = new id; disabled_ids (a subset) are kept as weights but carry
    `disabled_bias` in the pruned router (C-Prune's uneven layouts), so they count as pruned.
    Everything is computed in fp32. Returns
    {"tokens", "agree", "kept_mass", "same_topk"} (sums over tokens; add them across batches and
    ranks) and, when `megatron_routing_map` [T, E] (what the model itself routed) is given,
    "megatron_mismatch": tokens whose recomputed original top-k set differs from it.
    """
    x = router_input.reshape(-1, router_input.shape[-1]).float()
    weight, bias = gate_weight.float().to(x.device), bias.float().to(x.device)
    num_experts = weight.shape[0]
    kept = torch.as_tensor(list(kept_ids), dtype=torch.long, device=x.device)
    if kept.numel() == 0 or kept.unique().numel() != kept.numel():
        raise ValueError("kept_ids must be a non-empty list of distinct expert ids")
    if int(kept.min()) < 0 or int(kept.max()) >= num_experts:
        raise ValueError(f"kept_ids must lie in [0, {num_experts})")
    out = {"tokens": 0, "agree": 0, "kept_mass": 0.0, "same_topk": 0}
    if megatron_routing_map is not None:
        out["megatron_mismatch"] = 0
    if x.shape[0] == 0:
        return out

    orig_ids, orig_weights = _route_logits(x, weight, bias, original)
    pruned_bias = bias[kept].clone()
    disabled = [list(kept_ids).index(i) for i in disabled_ids]
    pruned_bias[disabled] = disabled_bias
    pruned_ids, _ = _route_logits(x, weight[kept], pruned_bias, pruned)
    pruned_as_original = kept[pruned_ids]  # [T, k] original ids

    is_kept = torch.zeros(num_experts, dtype=torch.bool, device=x.device)
    is_kept[kept] = True
    is_kept[torch.as_tensor(list(disabled_ids), dtype=torch.long, device=x.device)] = False
    chosen_kept = is_kept[orig_ids]  # [T, k]
    in_pruned = (orig_ids.unsqueeze(-1) == pruned_as_original.unsqueeze(-2)).any(-1)  # [T, k]
    agree = (in_pruned | ~chosen_kept).all(-1)
    same = in_pruned.all(-1)  # both sets have k distinct ids
    mass = (orig_weights * chosen_kept).sum(-1) / orig_weights.sum(-1)

    out.update(tokens=int(x.shape[0]), agree=int(agree.sum()), kept_mass=float(mass.double().sum()),
               same_topk=int(same.sum()))
    if megatron_routing_map is not None:
        recomputed = torch.zeros(x.shape[0], num_experts, dtype=torch.bool, device=x.device)
        recomputed.scatter_(1, orig_ids, True)
        megatron = megatron_routing_map.reshape(x.shape[0], num_experts).to(x.device).bool()
        out["megatron_mismatch"] = int((recomputed != megatron).any(-1).sum())
    return out


# --------------------------------------------------------------------------------------------
# the pruned checkpoint's routing plan
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrunedPlan:
    kept: dict[int, tuple[int, ...]]  # HF layer -> kept original ids (position = new id)
    disabled: dict[int, tuple[int, ...]]  # HF layer -> kept ids that the router never selects
    disabled_bias: float
    original: Routing
    pruned: Routing
    group_policy: str | None
    pruning_record: dict


def load_pruned_plan(src_ckpt, pruned_dir) -> PrunedPlan:
    """Read and cross-check pruned_dir/pruning.json and pruned_dir/config.json against the source
    checkpoint. Raises RoutingDriftError (or CheckpointError) on anything inconsistent."""
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    src_cfg = DeepseekV3Config.load(src_ckpt)
    pruned_dir = Path(pruned_dir)
    record_path = pruned_dir / PRUNING_FILE
    if not record_path.is_file():
        raise RoutingDriftError(f"{record_path} does not exist: --pruned must be a directory written "
                                "by converters/export_pruned.py")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        kept_raw = record["kept_experts"]
        source_hash = record["source"]["config_hash"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RoutingDriftError(f"{record_path}: not a pruning record ({e!r})") from None
    if source_hash != src_cfg.config_hash:
        raise RoutingDriftError(
            f"{pruned_dir} was exported from a different checkpoint than {src_ckpt} (config hash "
            f"{str(source_hash)[:12]}... in {PRUNING_FILE}, the source's is {src_cfg.config_hash[:12]}...)")
    pruned_cfg = DeepseekV3Config.load(pruned_dir)
    for field in ("n_group", "topk_group"):
        if field in record and record[field] != getattr(pruned_cfg, field):
            raise RoutingDriftError(
                f"{record_path} says {field}={record[field]} but {pruned_dir}/config.json has "
                f"{getattr(pruned_cfg, field)}")
    if pruned_cfg.num_experts_per_tok != src_cfg.num_experts_per_tok:
        raise RoutingDriftError(f"{pruned_dir}/config.json changes num_experts_per_tok "
                                f"({src_cfg.num_experts_per_tok} -> {pruned_cfg.num_experts_per_tok})")
    kept: dict[int, tuple[int, ...]] = {}
    for layer, ids in kept_raw.items():
        where = f"{record_path} layer {layer}"
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise RoutingDriftError(f"{where}: kept experts must be a list of integers")
        if len(set(ids)) != len(ids) or any(not 0 <= i < src_cfg.n_routed_experts for i in ids):
            raise RoutingDriftError(f"{where}: kept ids must be distinct and in "
                                    f"[0, {src_cfg.n_routed_experts})")
        if len(ids) != pruned_cfg.n_routed_experts:
            raise RoutingDriftError(f"{where}: {len(ids)} kept experts but {pruned_dir}/config.json "
                                    f"declares n_routed_experts={pruned_cfg.n_routed_experts}")
        kept[int(layer)] = tuple(ids)
    missing = [layer for layer in src_cfg.moe_layer_ids if layer not in kept]
    if missing:
        raise RoutingDriftError(f"{record_path} has no kept experts for MoE layer(s) {missing}")
    e_pruned = pruned_cfg.n_routed_experts
    if pruned_cfg.n_group > 1 and e_pruned % pruned_cfg.n_group:
        raise RoutingDriftError(f"{pruned_dir}/config.json: {e_pruned} experts do not split into "
                                f"n_group={pruned_cfg.n_group} groups")
    if src_cfg.num_experts_per_tok > e_pruned:
        raise RoutingDriftError(f"top_k {src_cfg.num_experts_per_tok} exceeds the {e_pruned} kept experts")

    def routing(cfg):
        return Routing(cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                       float(cfg.routed_scaling_factor), bool(cfg.norm_topk_prob))

    disabled = {int(layer): tuple(ids)
                for layer, ids in (record.get("disabled_experts") or {}).items()}
    for layer, ids in disabled.items():
        if not set(ids) <= set(kept.get(layer, ())):
            raise RoutingDriftError(f"{record_path} layer {layer}: disabled experts {list(ids)} "
                                    "are not among the kept experts")
    return PrunedPlan(kept=kept, disabled=disabled,
                      disabled_bias=float(record.get("disabled_bias", -1e4)),
                      original=routing(src_cfg), pruned=routing(pruned_cfg),
                      group_policy=record.get("group_policy"), pruning_record=record)


# --------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------

class DriftObserver(Observer):
    """Forward hooks on every MoE layer's router: route its input (this micro-batch's real tokens)
    both ways and add the drift sums per layer.
    finalize all-reduces them and returns (layer ids, [L, 5] float64 totals)."""

    def __init__(self, plan: PrunedPlan, pruned_dir, output=None):
        self.plan, self.batch = plan, None
        self.output = Path(output) if output else Path(pruned_dir) / DRIFT_FILE

    def validate(self, session) -> None:
        if self.output.is_dir():
            raise RoutingDriftError(f"--output {self.output} is a directory")
        if not self.output.resolve().parent.is_dir():
            raise RoutingDriftError(f"the directory of --output {self.output} does not exist")

    def setup(self, session) -> None:
        from megatron_easyep.mcore import pipeline

        # every stage's MoE layers (global ids); a stage fills its own rows, the all-reduce the rest
        self.layers = pipeline.moe_layer_ids(session.model.config)
        self.sums = {index: [0.0] * (len(SUM_KEYS) + 1) for index in self.layers}

    def before_micro_batch(self, batch) -> None:
        self.batch = batch

    @contextlib.contextmanager
    def attached(self, session):
        handles = _observe_routers(session.model, self.plan, self, self.sums)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def finalize(self, session):
        import torch.distributed as dist

        totals = torch.tensor([self.sums[i] for i in self.layers], dtype=torch.float64,
                              device=next(session.model.parameters()).device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        return totals.cpu()


def _observe_routers(model, plan: PrunedPlan, state, sums: dict):
    """Forward hooks on every MoE layer's router: route its input (this rank's real tokens of
    state.batch, padding dropped) both ways and add the drift sums to sums[hf_layer]."""
    from megatron_easyep.mcore import compat

    handles = []
    for index, router in compat.moe_routers(model).items():
        # replicated on every EP rank; read once, as the model holds them
        weight = router.weight.detach().float().clone()
        bias = router.expert_bias.detach().float().clone()

        def hook(x, probs, routing_map, index=index, weight=weight, bias=bias):
            if state.batch is None or state.batch.real_tokens == 0:
                return
            x = state.batch.real_rows(x.reshape(-1, x.shape[-1]))
            routing_map = state.batch.real_rows(routing_map.reshape(-1, weight.shape[0]))
            got = layer_drift(x, weight, bias, plan.kept[index], plan.original, plan.pruned,
                              megatron_routing_map=routing_map,
                              disabled_ids=plan.disabled.get(index, ()),
                              disabled_bias=plan.disabled_bias)
            row = sums[index]
            for k, key in enumerate((*SUM_KEYS, "megatron_mismatch")):
                row[k] += got[key]

        handles.append(compat.attach_router_hook(router, hook))
    return handles


def _skipped_layers(plan: PrunedPlan, measured, num_hidden_layers: int) -> dict:
    skipped = {}
    for layer in sorted(plan.kept):
        if layer in measured:
            continue
        if layer >= num_hidden_layers:
            skipped[str(layer)] = "MTP layer: not part of the Megatron model, not measured"
        else:
            skipped[str(layer)] = "not a MoE layer of the Megatron model"
    return skipped


def run_drift(src_ckpt, pruned_dir, demos: list[str], *, expert_parallel: int = 1,
              pipeline_parallel: int = 1, pipeline_layout: str | None = None,
              dispatcher: str = "alltoall", output: str | os.PathLike | None = None,
              max_length: int | None = None, dtype: str | None = None, seed: int = 1234) -> dict:
    """Run the ORIGINAL model (Megatron-Core, this process's rank of a torchrun world) over the
    demos, measure the per-layer routing drift of the pruned checkpoint, and return the report
    (on every rank). Rank 0 prints a table and writes the JSON to `output` (default
    pruned_dir/routing_drift.json) through a temporary sibling."""
    import torch.distributed as dist

    from megatron_easyep.scoring import demos as demos_lib

    # every input check before the (slow) model load
    plan = load_pruned_plan(src_ckpt, pruned_dir)
    session = ModelSession.open(SessionSpec(str(src_ckpt), expert_parallel=expert_parallel,
                                            pipeline_parallel=pipeline_parallel,
                                            pipeline_layout=pipeline_layout, dispatcher=dispatcher,
                                            dtype=dtype, seed=seed, logits=False))
    demo_list = demos_lib.load_demos(demos, src_ckpt, vocab_size=session.cfg.vocab_size,
                                     max_length=max_length)
    drift = DriftObserver(plan, pruned_dir, output)
    session.validate([drift])
    torch_dtype = session.dtype

    layout = session.init_parallel()
    session.load_model([drift])
    skipped = _skipped_layers(plan, drift.sums, session.cfg.num_hidden_layers)
    # one demo per micro-batch; 2 x PP per step so the stages overlap
    forward_loop(session, session.plan(demo_list, None, 2 * pipeline_parallel), [drift],
                 progress="routing drift")
    totals = drift.finalize(session)
    report = _report(src_ckpt, pruned_dir, demos, plan, session, totals, drift.layers, skipped,
                     len(demo_list), max_length, torch_dtype, layout)
    if layout.rank == 0:
        _print_table(report)
        mismatched = report["megatron_routing_mismatched_tokens"]
        if mismatched:
            print(f"warning: the recomputed original routing differs from the model's own for "
                  f"{mismatched} token-layers", file=sys.stderr, flush=True)
        _write_json(drift.output, report)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return report


def _report(src_ckpt, pruned_dir, demos, plan: PrunedPlan, session, totals, model_layers, skipped,
            num_demos: int, max_length, torch_dtype, layout) -> dict:
    layers = {}
    mismatched = 0
    for row, index in zip(totals.tolist(), model_layers):
        tokens, agree, mass, same, mismatch = row
        mismatched += int(mismatch)
        layers[str(index)] = {
            "tokens": int(tokens),
            "kept_experts": len(plan.kept[index]),
            "agree_fraction": agree / tokens if tokens else None,
            "kept_gate_mass": mass / tokens if tokens else None,
            "same_topk_fraction": same / tokens if tokens else None,
        }
    measured = [v for v in layers.values() if v["tokens"]]
    mean = {key: (sum(v[key] for v in measured) / len(measured) if measured else None)
            for key in ("agree_fraction", "kept_gate_mass", "same_topk_fraction")}
    return {
        "format": DRIFT_FORMAT,
        "source": str(Path(src_ckpt).resolve()),
        "pruned": str(Path(pruned_dir).resolve()),
        "config_hash": session.cfg.config_hash,
        "group_policy": plan.group_policy,
        "original_routing": dataclasses.asdict(plan.original),
        "pruned_routing": dataclasses.asdict(plan.pruned),
        "demos": [str(d) for d in demos],
        "num_demos": num_demos,
        "max_length": max_length,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "layout": layout.as_dict(),
        "definitions": DEFINITIONS,
        "layers": layers,
        "mean": mean,
        "skipped_layers": skipped,
        "megatron_routing_mismatched_tokens": mismatched,
    }


DEFINITIONS = {
    "agree_fraction": "share of tokens whose original top-k restricted to kept experts is a "
                      "subset of the pruned top-k (vacuously true when every chosen expert "
                      "was pruned)",
    "kept_gate_mass": "mean over tokens of sum(g, original top-k and kept) / "
                      "sum(g, original top-k), g = original combine weights",
    "same_topk_fraction": "share of tokens whose pruned top-k equals the original top-k",
    "hidden_states": "the original model's, at every layer (no compounding)",
}


def _print_table(report: dict) -> None:
    def fmt(v):
        return f"{v:.4f}" if v is not None else "-"

    print(f"{'layer':>6} {'tokens':>8} {'kept':>5} {'agree':>8} {'kept_mass':>10} {'same_topk':>10}")
    for layer, r in report["layers"].items():
        print(f"{layer:>6} {r['tokens']:>8} {r['kept_experts']:>5} {fmt(r['agree_fraction']):>8} "
              f"{fmt(r['kept_gate_mass']):>10} {fmt(r['same_topk_fraction']):>10}")
    m = report["mean"]
    print(f"{'mean':>6} {'':>8} {'':>5} {fmt(m['agree_fraction']):>8} {fmt(m['kept_gate_mass']):>10} "
          f"{fmt(m['same_topk_fraction']):>10}")
    for layer, why in report["skipped_layers"].items():
        print(f"{layer:>6} skipped: {why}")
    sys.stdout.flush()


def _write_json(path: Path, report: dict) -> None:
    io.write_json_atomic(path.resolve(), report, indent=2)
