"""Merge instead of drop: fold every pruned expert into a kept one (HC-SMoE / M-SMoE) in the export.

The selection keeps M experts per layer as for pruning; `plan_merge` then decides, before a byte is
written, which kept expert each dropped expert joins and with what weight, and `export_pruned(...,
merge=plan)` writes the merged experts into the kept slots (`MergeWriter`).

Assignment (`MergeRule.assign`)
-------------------------------
Each dropped expert joins the kept expert it is most similar to (cosine; ties: the lower id):
- ``output``: C-Prune's features (`cprune_features.safetensors`, [L, E, N, H]: every expert's output
  on the N pooled demonstration inputs), an expert's vector being its N outputs flattened (HC-SMoE's
  output similarity on the calibration inputs);
- ``router``: the rows of `mlp.gate.weight`.
Candidates are the ENABLED kept experts (disabled slots, `Selection.disabled`, are never routed, so
what is merged into them would be lost) and, under `equal-per-group`, only those of the dropped
expert's own original routing group (the pruned groups are the original ones); under `collapse`
any of them.

Weights (`MergeRule.weights`)
-----------------------------
w_i ∝ the routed frequency of expert i (HC-SMoE), or ∝ the selection's own metric score (EASY-EP,
REAP, ...), with the selection's domains and domain weights mixed exactly as `selection.mixed_scores`
mixes them, normalised to sum 1 over the cluster {kept} ∪ assignees. A cluster whose members all
have zero weight (no calibration token reached any of them) gets equal weights (recorded).

The merge (`merge_experts`)
---------------------------
    W_merged = Σ_i w_i · W_i        for W in (gate_proj, up_proj, down_proj), in fp32
With ``align``, each assignee's intermediate neurons are first permuted to match the kept expert's
(M-SMoE): `scipy.optimize.linear_sum_assignment` maximises Σ_j <[g_j; u_j]_kept, [g_π(j); u_π(j)]_a>
over the concatenated gate/up rows (equivalently minimises the squared distance); gate rows, up rows
and down COLUMNS take the same permutation, so the assignee's function is unchanged.

Router rows (`MergeRule.router`)
--------------------------------
- ``keep`` (the default): the kept experts' `mlp.gate.weight` rows stay as in a plain export.
- ``average`` (label suffix ``-router-average``): each kept expert WITH assignees gets the cluster's
  weighted average of its members' router rows, with the merge's weights,
      r_merged = Σ_i w_i · r_i
  computed in fp32 from the SOURCE rows and written in the row's stored dtype into the staged
  router tensor (which holds only the kept rows, renumbered 0..M-1). Rows of kept experts without
  assignees keep their bytes.
- `e_score_correction_bias` stays the kept experts' source values under both (a bias is a load
  correction learned for the expert it belongs to; --rebalance-bias refits it on the merged model).

What is written
---------------
- The kept experts' `e_score_correction_bias` as in a plain export; router rows per `router`.
- Kept experts without assignees keep their bytes (the exporter's byte copy).
- FP8 (F8_E4M3 + `weight_scale_inv`): members are dequantised with the config's
  `quantization_config.weight_block_size`, merged in fp32 and re-quantised per block with
  DeepSeek's rule (`fp8_blocks.quantize_fp8_blockwise`: scale = amax / 448, e4m3, stored as
  weight_scale_inv; partial edge blocks cover the rows/columns that exist; an all-zero block gets a
  tiny finite scale and zero codes). BF16/F16/F32: merged in fp32, cast back to the stored dtype.
  Same names, shapes and dtypes, so the merged bytes overwrite the kept expert's byte ranges in the
  staged output in place.
- Memory: one cluster at a time; the kept expert, the running sum and one assignee in fp32 (read
  with pread from the SOURCE shards, no memory map), plus the exporter's own budget; `average`
  adds one layer's source router weight ([E, H], 3.5 MiB for DeepSeek-V3).
- Layers without a score row (the MTP fallback selection) are pruned, not merged (recorded).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise, quantize_fp8_blockwise, scale_shape
from megatron_easyep.checkpoint.reader import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    DeepseekV3Config,
    HFCheckpoint,
    StoredTensor,
    expert_weight_name,
    read_safetensors_header,
    scale_inv_name,
)
from megatron_easyep.progress import Progress
from megatron_easyep.pruning.selection import (
    EQUAL_PER_GROUP,
    RANDOM_METRIC,
    ScoreFile,
    Selection,
    SelectionError,
    check_model_identity,
    mixed_scores,
)

ASSIGNMENTS = ("output", "router")
WEIGHTINGS = ("frequency", "score")
ROUTER_RULES = ("keep", "average")  # what happens to a merged kept expert's router row
ALIGNED = "aligned"
ROUTER_SUFFIX = "-router-"  # label suffix of a router rule other than the default "keep"
MERGE_KEY = "merge"  # in pruning.json
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_MERGEABLE_DTYPES = ("F8_E4M3", "BF16", "F16", "F32")
_ROUTER_DTYPES = ("BF16", "F16", "F32", "F64")
ROUTER_RECORDS = {
    "keep": ("keep: the kept experts' mlp.gate.weight rows and e_score_correction_bias are the source's, "
             "sliced as in a plain export"),
    "average": ("average: each merged kept expert's mlp.gate.weight row is the weighted average of its "
                "cluster's source rows (the merge's weights, fp32, stored in the row's dtype); rows of kept "
                "experts without assignees and every e_score_correction_bias are the source's"),
}
ZERO_WEIGHT_RULE = "equal weights (every member of the cluster had weight 0)"


class MergeError(ValueError):
    """The merge cannot be done as asked; nothing has been written."""


# --------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeRule:
    assign: str = "output"
    weights: str = "frequency"
    align: bool = False
    router: str = "keep"

    def __post_init__(self):
        if self.assign not in ASSIGNMENTS:
            raise MergeError(f"unknown merge assignment {self.assign!r}; choose one of {list(ASSIGNMENTS)}")
        if self.weights not in WEIGHTINGS:
            raise MergeError(f"unknown merge weighting {self.weights!r}; choose one of {list(WEIGHTINGS)}")
        if not isinstance(self.align, bool):
            raise MergeError(f"align must be True or False, got {self.align!r}")
        if self.router not in ROUTER_RULES:
            raise MergeError(f"unknown merge router rule {self.router!r}; choose one of {list(ROUTER_RULES)}")

    @property
    def label(self) -> str:
        return (f"{self.assign}-{self.weights}" + (f"-{ALIGNED}" if self.align else "")
                + (f"{ROUTER_SUFFIX}{self.router}" if self.router != "keep" else ""))

    @classmethod
    def parse(cls, text: str) -> "MergeRule":
        """ASSIGN-WEIGHTS[-aligned][-router-average], e.g. "output-frequency", "router-score-aligned",
        "output-frequency-router-average"."""
        body, router = str(text).strip().lower(), "keep"
        for choice in ROUTER_RULES[1:]:
            if body.endswith(ROUTER_SUFFIX + choice):
                body, router = body[:-len(ROUTER_SUFFIX + choice)], choice
        parts = body.split("-")
        align = len(parts) == 3 and parts[2] == ALIGNED
        if len(parts) not in (2, 3) or (len(parts) == 3 and not align) \
                or parts[0] not in ASSIGNMENTS or parts[1] not in WEIGHTINGS:
            choices = [MergeRule(a, w, al).label for a in ASSIGNMENTS for w in WEIGHTINGS for al in (False, True)]
            raise MergeError(f"unknown merge rule {text!r}; choose one of {choices}, each optionally followed "
                             f"by {ROUTER_SUFFIX}average")
        return cls(parts[0], parts[1], align, router)


# --------------------------------------------------------------------------------------------
# the formula (pure torch)
# --------------------------------------------------------------------------------------------


def merge_experts(members: Iterable[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """HC-SMoE / M-SMoE: W_merged = Σ_i w_i W_i (weights already normalised to sum 1), per
    projection, in fp32. `members` may be a generator: only the running sum is kept."""
    merged: dict[str, torch.Tensor] = {}
    for weight, expert in members:
        for name, w in expert.items():
            if name in merged:
                merged[name].add_(w.to(torch.float32), alpha=weight)
            else:
                merged[name] = w.to(torch.float32) * weight
    return merged


def average_router_rows(rows: torch.Tensor, members: Iterable[tuple[int, float]]) -> torch.Tensor:
    """r_merged = Σ_i w_i r_i over the cluster's rows of the router weight [E, H], in fp32."""
    merged = None
    for member, weight in members:
        row = rows[member].to(torch.float32)
        merged = row * weight if merged is None else merged.add_(row, alpha=weight)
    return merged


def router_weight_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def neuron_permutation(reference: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> np.ndarray:
    """π with expert's neuron π[j] matched to reference's neuron j, maximising the summed inner
    products of their concatenated gate/up rows (M-SMoE's weight matching)."""
    ref = torch.cat([reference["gate_proj"], reference["up_proj"]], dim=1).float()
    other = torch.cat([expert["gate_proj"], expert["up_proj"]], dim=1).float()
    rows, cols = linear_sum_assignment((ref @ other.T).double().numpy(), maximize=True)
    permutation = np.empty(len(rows), dtype=np.int64)
    permutation[rows] = cols
    return permutation


def permute_neurons(expert: dict[str, torch.Tensor], permutation: np.ndarray) -> dict[str, torch.Tensor]:
    """The same expert with its intermediate neurons reordered: gate/up rows and down columns."""
    index = torch.as_tensor(permutation)
    return {"gate_proj": expert["gate_proj"][index], "up_proj": expert["up_proj"][index],
            "down_proj": expert["down_proj"][:, index]}


# --------------------------------------------------------------------------------------------
# the plan: every decision before a byte is written
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    rule: MergeRule
    # HF layer -> kept original id -> ((member id, weight), ...), the kept expert first; only kept
    # experts with assignees appear
    clusters: dict[int, dict[int, tuple[tuple[int, float], ...]]]
    kept: dict[int, tuple[int, ...]]  # the selection's kept ids (checked against the export's)
    config_hash: str  # of the checkpoint the plan was made on
    weight_source: str  # what the weights are proportional to
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layer -> why it is pruned, not merged
    equal_weight_clusters: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> kept ids
    similarity: dict[int, dict[int, float]] = field(default_factory=dict)  # layer -> dropped id -> cosine

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.label,
            "assign": self.rule.assign,
            "weights": self.rule.weights,
            "align": self.rule.align,
            "weight_source": self.weight_source,
            "router_rule": self.rule.router,
            "router": ROUTER_RECORDS[self.rule.router],
            "zero_weight_clusters": ZERO_WEIGHT_RULE,
            "skipped_layers": {str(k): v for k, v in sorted(self.skipped_layers.items())},
            "equal_weight_clusters": {str(k): list(v) for k, v in sorted(self.equal_weight_clusters.items()) if v},
            # layer -> kept original id -> [[member original id, weight], ...], kept expert first
            "clusters": {str(layer): {str(k): [[m, w] for m, w in members] for k, members in by_kept.items()}
                         for layer, by_kept in sorted(self.clusters.items())},
            # layer -> dropped original id -> cosine similarity to the kept expert it joined
            "similarity": {str(layer): {str(d): round(s, 6) for d, s in sorted(sims.items())}
                           for layer, sims in sorted(self.similarity.items())},
        }


def _cosine(vectors: torch.Tensor) -> torch.Tensor:
    """[E, D] -> [E, E] cosine similarities in float64 (a zero vector is similar to nothing)."""
    v = vectors.double()
    norms = v.norm(dim=1).clamp_min(1e-300)
    return (v @ v.T) / norms[:, None] / norms[None, :]


def _feature_cosine(features, row: int, chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Cosine of the experts' flattened outputs [E, N*H] of one layer, summed over chunks of demos
    (the features file is a memory map; a layer of DeepSeek-R1's is GBs)."""
    _, experts, demos, hidden = features.shape
    step = max(1, chunk_bytes // max(1, experts * hidden * 4))
    gram = torch.zeros(experts, experts, dtype=torch.float64)
    for start in range(0, demos, step):
        block = torch.from_numpy(np.ascontiguousarray(features[row, :, start:start + step, :], dtype=np.float64))
        block = block.reshape(experts, -1)
        gram += block @ block.T
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-300)
    return gram / norms[:, None] / norms[None, :]


def _weight_rows(scores: ScoreFile, selection: Selection, rule: MergeRule) -> tuple[torch.Tensor, str]:
    """[num_scored_layers, E] weights per expert, mixed over domains as the selection mixed them."""
    metric = "frequency" if rule.weights == "frequency" else selection.metric
    if metric == RANDOM_METRIC or metric not in scores.available_metrics:
        raise MergeError(
            f"merge weights '{rule.weights}' need the metric {metric!r} in the score file {scores.directory} "
            f"(it has {list(scores.available_metrics)}); "
            + ("use weights 'frequency'" if rule.weights == "score" else "rescore with the frequency metric"))
    rows = mixed_scores(scores, metric, selection.domains, selection.domain_weights).to(torch.float64)
    if (rows < 0).any():
        layer = scores.layers[int((rows < 0).any(dim=1).nonzero()[0])]
        raise MergeError(f"metric {metric!r} has negative scores in layer {layer} of {scores.directory}; "
                         f"merge weights must be >= 0")
    if not selection.domains:
        return rows, f"{metric} (all domains)"
    weights = f", weighted {list(selection.domain_weights)}" if selection.domain_weights else ""
    return rows, (f"{metric} over domains {list(selection.domains)}{weights} "
                  f"(per-domain rows L1-normalised, as selected)")


def _check_features(features, scores: ScoreFile, config: DeepseekV3Config, source: str) -> None:
    if features is None:
        raise MergeError("merge assignment 'output' needs the C-Prune features (cprune_features.safetensors: score "
                         "with --cprune-features, or pass --cprune-features PATH)")
    shape = tuple(features.shape)
    expected = (len(scores.layers), config.n_routed_experts, "N", config.hidden_size)
    if len(shape) != 4 or shape[0] != expected[0] or shape[1] != expected[1] or shape[3] != expected[3] \
            or shape[2] < 1:
        raise MergeError(f"C-Prune features {source} have shape {list(shape)}; expected [layers of scores.json "
                         f"= {expected[0]}, n_routed_experts = {expected[1]}, demos N >= 1, hidden_size = "
                         f"{expected[3]}]")


def _candidates(selection: Selection, config: DeepseekV3Config, layer: int, dropped: int) -> list[int]:
    enabled = selection.enabled(layer)
    if selection.group_policy == EQUAL_PER_GROUP and config.n_group > 1:
        size = config.n_routed_experts // config.n_group
        enabled = tuple(k for k in enabled if k // size == dropped // size)
    if not enabled:
        raise MergeError(f"layer {layer}: dropped expert {dropped} has no enabled kept expert to merge into "
                         f"(group policy {selection.group_policy})")
    return list(enabled)


def _assign_layer(selection, config, layer: int, similarity: torch.Tensor) -> tuple[dict[int, list[int]], dict]:
    """kept id -> assignees, and dropped id -> its cosine to the chosen kept expert."""
    kept = set(selection.kept[layer])
    assignees: dict[int, list[int]] = {}
    chosen: dict[int, float] = {}
    for dropped in range(config.n_routed_experts):
        if dropped in kept:
            continue
        candidates = _candidates(selection, config, layer, dropped)
        sims = similarity[dropped, candidates]
        best = candidates[int(torch.argmax(sims))]  # first maximum: the lower id on ties
        assignees.setdefault(best, []).append(dropped)
        chosen[dropped] = float(similarity[dropped, best])
    return assignees, chosen


def plan_merge(src_dir, selection: Selection, scores: ScoreFile, rule: MergeRule | str, *,
               features=None) -> MergePlan:
    """Decide every cluster and weight of a merged export (module docstring). `features`: the
    [L, E, N, H] C-Prune features (array, memory map or tensor), needed for assign='output'."""
    rule = MergeRule.parse(rule) if isinstance(rule, str) else rule
    if not isinstance(rule, MergeRule):
        raise MergeError(f"merge rule must be a MergeRule or its label, got {rule!r}")
    src = Path(src_dir)
    config = DeepseekV3Config.load(src)
    try:
        check_model_identity(f"the score file {scores.directory}", scores.config_hash, scores.architecture_hash,
                             scores.storage_format, config)
        check_model_identity("the selection", selection.config_hash, selection.architecture_hash,
                             selection.storage_format, config)
    except SelectionError as err:
        raise MergeError(str(err)) from err
    if selection.n_routed_experts != config.n_routed_experts or scores.n_routed_experts != config.n_routed_experts:
        raise MergeError(f"selection ({selection.n_routed_experts}) / score file ({scores.n_routed_experts}) "
                         f"expert counts differ from the checkpoint's {config.n_routed_experts}")
    if selection.scores_sha256 not in (None, scores.sha256):
        raise MergeError(f"the selection was made from another score file than {scores.directory}")
    rows, weight_source = _weight_rows(scores, selection, rule)
    if rule.assign == "output":
        _check_features(features, scores, config, "(--cprune-features)")
    router = HFCheckpoint(src) if rule.assign == "router" else None

    clusters, similarity, skipped, equal = {}, {}, {}, {}
    for layer in sorted(selection.kept):
        if layer not in scores.layers:
            skipped[layer] = ("no score row (MTP fallback selection): no frequency, score or features for "
                              "its experts, so they are pruned, not merged")
            continue
        row = scores.layers.index(layer)
        if rule.assign == "output":
            sim = _feature_cosine(features, row)
        else:
            sim = _cosine(router.read(f"model.layers.{layer}.mlp.gate.weight"))
        assignees, similarity[layer] = _assign_layer(selection, config, layer, sim)
        clusters[layer] = {}
        for kept_id in sorted(assignees):
            members = [kept_id, *sorted(assignees[kept_id])]
            raw = rows[row, members]
            if float(raw.sum()) <= 0:
                weights = [1.0 / len(members)] * len(members)
                equal.setdefault(layer, []).append(kept_id)
            else:
                weights = (raw / raw.sum()).tolist()
            clusters[layer][kept_id] = tuple(zip(members, (float(w) for w in weights)))
    return MergePlan(rule=rule, clusters=clusters, kept={k: tuple(v) for k, v in selection.kept.items()},
                     config_hash=config.config_hash, weight_source=weight_source, skipped_layers=skipped,
                     equal_weight_clusters={k: tuple(v) for k, v in equal.items()}, similarity=similarity)


# --------------------------------------------------------------------------------------------
# applying the plan to a staged export
# --------------------------------------------------------------------------------------------

_EXPERT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")


class _SourceTensors:
    """Expert weights read with pread from the source shards (no memory map: RSS stays one
    cluster), dequantised to fp32."""

    def __init__(self, checkpoint: HFCheckpoint):
        self.checkpoint = checkpoint
        self.block = checkpoint.config.weight_block_size
        self._headers: dict[str, dict[str, StoredTensor]] = {}

    def stored(self, name: str) -> StoredTensor:
        shard = self.checkpoint.weight_map[name]
        if shard not in self._headers:
            self._headers[shard] = read_safetensors_header(self.checkpoint.path / shard)[0]
        if name not in self._headers[shard]:
            raise CheckpointError(f"tensor {name} is in the index but missing from shard file {shard}")
        return self._headers[shard][name]

    def raw(self, name: str) -> torch.Tensor:
        stored = self.stored(name)
        path = self.checkpoint.path / self.checkpoint.weight_map[name]
        with open(path, "rb") as f:
            data = bytearray(os.pread(f.fileno(), stored.nbytes, stored.begin))
        if len(data) != stored.nbytes:
            raise CheckpointError(f"tensor {name} in {path} is truncated")
        return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[stored.dtype]).reshape(stored.shape)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        out = {}
        for proj in PROJECTIONS:
            name = expert_weight_name(layer, expert, proj)
            weight = self.raw(name)
            if weight.dtype == torch.float8_e4m3fn:
                weight = dequantize_fp8_blockwise(weight, self.raw(scale_inv_name(name)), self.block)
            out[proj] = weight.to(torch.float32)
        return out


def _check_plan_against_export(plan: MergePlan, config, layer_kept, layer_disabled, dropped_layers) -> dict:
    """The clusters the export applies (layer -> kept id -> members); MergeError on any mismatch."""
    if plan.config_hash != config.config_hash:
        raise MergeError("the merge plan was made for another checkpoint (config hash differs)")
    applied = {}
    for layer, by_kept in plan.clusters.items():
        if layer in dropped_layers:
            continue  # the MTP layer is dropped (mtp='drop'): nothing to merge into
        if layer not in layer_kept or tuple(plan.kept.get(layer, ())) != tuple(layer_kept[layer]):
            raise MergeError(f"layer {layer}: the merge plan's kept experts are not the export's selection")
        kept, off, seen = set(layer_kept[layer]), set(layer_disabled.get(layer, ())), set()
        for kept_id, members in by_kept.items():
            ids, weights = [m for m, _ in members], [w for _, w in members]
            if kept_id not in kept or kept_id in off or ids[0] != kept_id:
                raise MergeError(f"layer {layer}: cluster of {kept_id} must start with an enabled kept expert")
            if any(i in kept or i in seen or not 0 <= i < config.n_routed_experts for i in ids[1:]) \
                    or len(set(ids)) != len(ids):
                raise MergeError(f"layer {layer}: cluster of {kept_id} has members {ids}; assignees must be "
                                 f"distinct dropped experts, each in one cluster")
            if not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
                raise MergeError(f"layer {layer}: cluster of {kept_id} has weights {weights} (need >= 0, sum 1)")
            seen.update(ids[1:])
        applied[layer] = by_kept
    return applied


def _check_expert_tensors(checkpoint: HFCheckpoint, source: _SourceTensors, applied: dict) -> None:
    """Every member's tensors exist, are gate/up/down (+ FP8 scales) only, mergeable and alike."""
    per_expert: dict[tuple[int, int], set[str]] = {}
    for name in checkpoint.weight_map:
        match = _EXPERT_TENSOR.match(name)
        if match:
            per_expert.setdefault((int(match.group(1)), int(match.group(2))), set()).add(match.group(3))
    allowed = {f"{p}.weight" for p in PROJECTIONS} | {f"{p}.weight_scale_inv" for p in PROJECTIONS}
    for layer, by_kept in applied.items():
        for kept_id, members in by_kept.items():
            reference = None
            for member, _ in members:
                extra = sorted(per_expert.get((layer, member), set()) - allowed)
                if extra:
                    raise MergeError(f"tensor model.layers.{layer}.mlp.experts.{member}.{extra[0]}: merging knows "
                                     f"only gate/up/down weights (and their FP8 scales)")
                layout = []
                for proj in PROJECTIONS:
                    name = expert_weight_name(layer, member, proj)
                    if name not in checkpoint.weight_map:
                        raise MergeError(f"tensor {name} is missing from {checkpoint.path}")
                    stored = source.stored(name)
                    if stored.dtype not in _MERGEABLE_DTYPES or len(stored.shape) != 2:
                        raise MergeError(f"tensor {name} is {stored.dtype} {list(stored.shape)}; merging needs a "
                                         f"2-D {'/'.join(_MERGEABLE_DTYPES)} weight")
                    if stored.dtype == "F8_E4M3":
                        _check_scale(checkpoint, source, name, stored)
                    layout.append((stored.dtype, stored.shape))
                if reference is None:
                    reference = layout
                elif layout != reference:
                    raise MergeError(f"layer {layer}: expert {member} is stored as {layout}, kept expert {kept_id} "
                                     f"as {reference}; a merge needs the same dtypes and shapes")


def _check_router_tensors(checkpoint: HFCheckpoint, source: _SourceTensors, applied: dict) -> None:
    """router='average' rewrites rows of each merged layer's router weight: it must be a float [E, H]."""
    config = checkpoint.config
    for layer in applied:
        name = router_weight_name(layer)
        if name not in checkpoint.weight_map:
            raise MergeError(f"tensor {name} is missing from {checkpoint.path}; the router rule 'average' needs it")
        stored = source.stored(name)
        if stored.dtype not in _ROUTER_DTYPES or tuple(stored.shape) != (config.n_routed_experts, config.hidden_size):
            raise MergeError(f"tensor {name} is {stored.dtype} {list(stored.shape)}; the router rule 'average' "
                             f"needs a {'/'.join(_ROUTER_DTYPES)} [n_routed_experts = {config.n_routed_experts}, "
                             f"hidden_size = {config.hidden_size}] weight")


def _check_scale(checkpoint, source, name, stored) -> None:
    block = checkpoint.config.weight_block_size
    if block is None:
        raise MergeError(f"tensor {name} is FP8 but {checkpoint.path}/config.json has no "
                         f"quantization_config.weight_block_size")
    scale = scale_inv_name(name)
    if scale not in checkpoint.weight_map:
        raise MergeError(f"FP8 tensor {name} has no {scale}")
    stored_scale = source.stored(scale)
    expected = scale_shape(stored.shape, block)
    if stored_scale.dtype != "F32" or tuple(stored_scale.shape) != expected:
        raise MergeError(f"tensor {scale} is {stored_scale.dtype} {list(stored_scale.shape)}; with "
                         f"weight_block_size {list(block)} it must be F32 {list(expected)}")


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((approx - exact).norm()) / norm if norm > 0 else float((approx - exact).norm())


@dataclass
class MergeWriter:
    """Checked against the export before anything is written (`prepare`); `apply` rewrites the
    merged experts' bytes in the staged output and returns pruning.json's "merge" record."""

    plan: MergePlan
    applied: dict  # layer -> kept id -> members
    layer_kept: dict
    source: _SourceTensors
    dropped_layers: tuple = ()

    @classmethod
    def prepare(cls, plan: MergePlan, checkpoint: HFCheckpoint, layer_kept, layer_disabled,
                dropped_layers=()) -> "MergeWriter":
        if not isinstance(plan, MergePlan):
            raise MergeError(f"merge must be a MergePlan (pruning.merge.plan_merge), got {type(plan).__name__}")
        applied = _check_plan_against_export(plan, checkpoint.config, layer_kept, layer_disabled, set(dropped_layers))
        source = _SourceTensors(checkpoint)
        _check_expert_tensors(checkpoint, source, applied)
        if plan.rule.router == "average":
            _check_router_tensors(checkpoint, source, applied)
        dropped = tuple(sorted(layer for layer in plan.clusters if layer in set(dropped_layers)))
        return cls(plan, applied, layer_kept, source, dropped)

    def _members(self, layer: int, members) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
        """(weight, fp32 expert) of each member, the kept expert first; assignees aligned to it."""
        reference = self.source.expert(layer, members[0][0])
        yield members[0][1], reference
        for member, weight in members[1:]:
            expert = self.source.expert(layer, member)
            if self.plan.rule.align:
                expert = permute_neurons(expert, neuron_permutation(reference, expert))
            yield weight, expert

    def _average_router_rows(self, staged: "_StagedTensors", layer: int, by_kept, renumber) -> dict[str, float]:
        """router='average': rewrite the merged kept experts' rows of the staged router weight;
        kept id -> ||r_merged - r_kept|| / ||r_kept|| (how far each row moved)."""
        rows = self.source.raw(router_weight_name(layer))
        moved = {}
        for kept_id, members in sorted(by_kept.items()):
            merged = average_router_rows(rows, members)
            staged.write_row(router_weight_name(layer), renumber[kept_id], merged)
            moved[str(kept_id)] = _relative_error(merged, rows[kept_id].to(torch.float32))
        return moved

    def apply(self, staging: Path, weight_map: dict[str, str], log=None) -> dict[str, Any]:
        staged = _StagedTensors(Path(staging), weight_map)
        errors: dict[str, dict[str, dict[str, float]]] = {}
        router_moved: dict[str, dict[str, float]] = {}
        # DeepSeek-V3 reads every expert once here (hours with -aligned on a CPU node): show an ETA
        progress = Progress("merge", sum(len(m) for by_kept in self.applied.values() for m in by_kept.values()),
                            unit="experts", enabled=log is not None)
        for layer, by_kept in sorted(self.applied.items()):
            renumber = {old: new for new, old in enumerate(self.layer_kept[layer])}
            errors[str(layer)] = {}
            for kept_id, members in sorted(by_kept.items()):
                merged = merge_experts(self._members(layer, members))
                errors[str(layer)][str(kept_id)] = {
                    proj: staged.write(expert_weight_name(layer, renumber[kept_id], proj), merged[proj],
                                       self.source.block)
                    for proj in PROJECTIONS}
                progress.advance(len(members))
            if self.plan.rule.router == "average":
                router_moved[str(layer)] = self._average_router_rows(staged, layer, by_kept, renumber)
            if log:
                log(f"merge: layer {layer}: {len(by_kept)} kept experts absorbed "
                    f"{sum(len(m) - 1 for m in by_kept.values())} dropped ones ({self.plan.rule.label})")
        progress.close()
        record = self.plan.to_json()
        record["clusters"] = {k: v for k, v in record["clusters"].items() if int(k) in self.applied}
        record["similarity"] = {k: v for k, v in record["similarity"].items() if int(k) in self.applied}
        if self.dropped_layers:
            record["skipped_layers"].update({str(layer): "dropped with the MTP layer (mtp='drop')"
                                             for layer in self.dropped_layers})
        # layer -> kept original id -> projection -> ||stored(merged) - merged||_F / ||merged||_F
        # (stored: dequant(requant) for FP8, the cast for BF16/F16)
        record["requantization_error"] = errors
        record["max_requantization_error"] = max(
            (e for by_kept in errors.values() for projs in by_kept.values() for e in projs.values()), default=0.0)
        if self.plan.rule.router == "average":
            # layer -> kept original id -> ||averaged row - kept expert's source row|| / ||source row||
            record["router_row_change"] = router_moved
        return record


class _StagedTensors:
    """Overwrites tensors of the staged output in place (same dtype and shape: same byte range)."""

    def __init__(self, staging: Path, weight_map: dict[str, str]):
        self.staging, self.weight_map = staging, weight_map
        self._headers: dict[str, dict[str, StoredTensor]] = {}

    def _locate(self, name: str) -> tuple[Path, StoredTensor]:
        shard = self.weight_map[name]
        if shard not in self._headers:
            self._headers[shard] = read_safetensors_header(self.staging / shard)[0]
        return self.staging / shard, self._headers[shard][name]

    @staticmethod
    def _pwrite(path: Path, name: str, value: torch.Tensor, offset: int) -> None:
        data = value.contiguous().view(torch.uint8).numpy().tobytes()
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError(f"short write of tensor {name} into {path}")
        finally:
            os.close(fd)

    def _overwrite(self, name: str, value: torch.Tensor, dtype: str) -> None:
        path, stored = self._locate(name)
        if stored.dtype != dtype or tuple(stored.shape) != tuple(value.shape):
            raise MergeError(f"staged tensor {name} is {stored.dtype} {list(stored.shape)}, the merged one "
                             f"{dtype} {list(value.shape)}")
        self._pwrite(path, name, value, stored.begin)

    def write_row(self, name: str, row: int, merged: torch.Tensor) -> None:
        """Store `merged` (fp32 [H]) as row `row` of the staged 2-D tensor `name`, in its dtype."""
        path, stored = self._locate(name)
        if stored.dtype not in _ROUTER_DTYPES or len(stored.shape) != 2 or stored.shape[1] != merged.numel() \
                or not 0 <= row < stored.shape[0]:
            raise MergeError(f"staged tensor {name} is {stored.dtype} {list(stored.shape)}; cannot write row {row} "
                             f"of {merged.numel()} values")
        value = merged.to(SAFETENSORS_DTYPES[stored.dtype])
        self._pwrite(path, name, value, stored.begin + row * value.numel() * value.element_size())

    def write(self, name: str, merged: torch.Tensor, block) -> float:
        """Store `merged` (fp32) as tensor `name` in its stored format; the relative error."""
        _, stored = self._locate(name)
        if stored.dtype == "F8_E4M3":
            q, scale_inv = quantize_fp8_blockwise(merged, block)
            self._overwrite(name, q, "F8_E4M3")
            self._overwrite(scale_inv_name(name), scale_inv, "F32")
            return _relative_error(dequantize_fp8_blockwise(q, scale_inv, block), merged)
        value = merged.to(SAFETENSORS_DTYPES[stored.dtype])
        self._overwrite(name, value, stored.dtype)
        return _relative_error(value.to(torch.float32), merged)
