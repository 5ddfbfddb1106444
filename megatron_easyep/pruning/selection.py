"""Expert selection: from a score file to the kept expert ids of every MoE layer.

Selection is kept apart from slicing (ModelOpt Minitron style): this module decides *which*
experts survive and which routing groups the pruned config declares; `export.py` only rewrites
tensors from the resulting `Selection`. Everything here is a pure function of the score tensors
except `load_scores`, which reads the score file (`checkpoint.io.write_score_file` writes it).

Score file (written by the scoring step, read here)
--------------------------------------------------
`DIR/scores.safetensors`: one tensor per metric and domain, `{metric}` (all domains together) and
`{metric}@{domain}`, each [num_scored_layers, n_routed_experts] float64 (float32 accepted).
`DIR/scores.json`: {"format": "megatron-easyep-scores/1", "layers": [HF layer index per row],
"metrics": [...], "domains": [...], "tokens": {"all": N, "<domain>": n}, "config_hash": ...,
"architecture_hash": ..., "storage_format": {...}, ...provenance}. `scores.json` is written last
and records the sha256 of the tensor file, so a torn pair (a crash between the two writes) is
detected on load.

Model identity (`check_model_identity`): a score file belongs to a checkpoint when their
config.json hashes agree or, for score files that record one, when their architecture hashes agree
(`DeepseekV3Config.architecture_hash`: every field that changes the computation, not the storage
format). Scores made on a BF16 copy of an FP8 checkpoint therefore prune the FP8 original (and the
other way round), with a one-line note. A score file that records only config_hash (older
versions) needs an identical config.json.

Group policies (DeepSeek group-limited routing views the E router scores as [n_group, E/n_group]
contiguous id blocks; see shared/reference/deepseek-checkpoint.md):
- `equal-per-group`: keep M/n_group best experts inside every original group. Renumbering the
  kept ids densely in ascending order then maps original group g onto pruned group g, so the
  pruned config keeps n_group/topk_group and routing semantics are preserved.
- `collapse`: global top-M per layer, then n_group = topk_group = 1 (plain biased top-k).

MTP layer fallback (when the score file has no row for a layer the checkpoint needs pruned, i.e.
the MTP layer `model.layers.{num_hidden_layers}`): its score row is the sum over the scored
layers of their L1-normalised (domain-mixed) rows of the chosen metric, and the same group policy
applies. Expert ids are not aligned across layers, so this is a placeholder that keeps the MTP
layer consistent and servable, not an importance estimate: score the MTP layer for a real one.
The layers chosen this way are listed in `Selection.fallback_layers` (and in pruning.json). The
`random` metric draws a row for every layer, the MTP layer included, so it needs no fallback.

Disabled experts (`Selection.disabled`, used by C-Prune's uneven per-layer counts, see cprune.py)
-----------------------------------------------------------------------------------------------
One `n_routed_experts` cannot express a different expert count per layer. A layer that keeps fewer
experts than the checkpoint's slot count M can fill its spare slots with experts that are kept as
weights but never routed: the exporter writes their `e_score_correction_bias` as `DISABLED_BIAS`
(-1e4, in the bias's own dtype). The choice score is sigmoid(logit) + bias, in (bias, bias + 1),
so a disabled expert can neither reach a top-k nor enter a group's top-2 score as long as every
(pruned) routing group keeps >= 2 enabled experts and the topk_group smallest groups hold >= top_k
enabled experts (`validate_disabled`). The combine weights are the UNBIASED sigmoid scores of the
chosen experts, so the model routes exactly as if the disabled experts were absent (assuming the
enabled experts' biases are far above -1e4, as in every DeepSeek checkpoint). `selection_from_kept`
builds such a selection from explicit kept / disabled ids and validates it like `select_experts`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from megatron_easyep.checkpoint.io import (
    DOMAIN_SEPARATOR,
    SCORE_FORMAT,
    SCORE_META_FILE,
    SCORE_METRICS,
    SCORE_TENSORS_FILE,
    ScoreFileError,
    file_sha256,
    first_non_finite,
)
from megatron_easyep.checkpoint.reader import describe_storage

if TYPE_CHECKING:  # only for type hints; the config object comes from hf_checkpoint
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

# The metrics the scoring step writes; a score file may carry any subset (or others).
KNOWN_METRICS = SCORE_METRICS
RANDOM_METRIC = "random"  # not stored in the file: drawn from `seed`
# REAP (Cerebras; llm-compressor's REAPPruningModifier): the MEAN over the tokens routed to an
# expert of g * ||e||, where EASY-EP SUMS g * ||e|| * s. Derived from the sums the scorer keeps:
# reap = easyep_no_token / frequency, per layer, expert and domain.
REAP_METRIC = "reap"
DERIVED_METRICS = {REAP_METRIC: ("easyep_no_token", "frequency")}
SELECTABLE_METRICS = (*KNOWN_METRICS, REAP_METRIC)


def reap_scores(gate_norm_sums: torch.Tensor, routed_counts: torch.Tensor) -> torch.Tensor:
    """REAP_i = (sum over tokens routed to i of g * ||e||) / (number of tokens routed to i).
    An expert no token was routed to gets 0: there is no evidence it matters, so it goes first
    (ties among such experts break by id, as every selection here does)."""
    routed = routed_counts > 0
    return torch.where(routed, gate_norm_sums / routed_counts.clamp_min(1), torch.zeros_like(gate_norm_sums))
GROUP_POLICIES = ("equal-per-group", "collapse")
EQUAL_PER_GROUP, COLLAPSE = GROUP_POLICIES
DEFAULT_GROUP_POLICY = "equal-per-group"
# e_score_correction_bias written for a disabled (kept but never routed) expert slot
DISABLED_BIAS = -1.0e4


# A score file or a selection request that cannot produce a valid pruned checkpoint (the score
# file writer, checkpoint.io.write_score_file, raises the same class).
SelectionError = ScoreFileError


# --------------------------------------------------------------------------------------------
# Score file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreFile:
    """A loaded score file: per-metric (and per-domain) [num_layers, n_routed_experts] float64."""

    directory: Path
    layers: tuple[int, ...]  # HF layer index of each row
    metrics: tuple[str, ...]
    domains: tuple[str, ...]
    tokens: dict[str, int]
    config_hash: str
    sha256: str  # of scores.safetensors, for provenance
    tensors: dict[str, torch.Tensor] = field(repr=False)  # "{metric}" / "{metric}@{domain}"
    meta: dict[str, Any] = field(repr=False)  # scores.json as written
    architecture_hash: str | None = None  # None: an older score file (config_hash only)
    storage_format: dict[str, Any] | None = None  # DeepseekV3Config.storage_format of the scored copy

    @property
    def n_routed_experts(self) -> int:
        return next(iter(self.tensors.values())).shape[1]

    @property
    def available_metrics(self) -> tuple[str, ...]:
        """The stored metrics plus those derivable from them (REAP)."""
        derived = [m for m, parts in DERIVED_METRICS.items()
                   if m not in self.metrics and all(p in self.metrics for p in parts)]
        return (*self.metrics, *derived)

    def rows(self, metric: str, domain: str | None = None) -> torch.Tensor:
        """[num_layers, n_routed_experts] float64 for `metric`, all domains when domain is None."""
        name = metric if domain is None else f"{metric}{DOMAIN_SEPARATOR}{domain}"
        if name not in self.tensors and metric == REAP_METRIC and metric in self.available_metrics:
            return reap_scores(*(self.rows(part, domain).double() for part in DERIVED_METRICS[metric]))
        if name not in self.tensors:
            raise SelectionError(
                f"score file {self.directory} has no tensor {name!r} (it has {sorted(self.tensors)})"
            )
        return self.tensors[name]


def load_scores(directory: str | os.PathLike) -> ScoreFile:
    """Read and validate a score directory (scores.json + scores.safetensors)."""
    directory = Path(directory)
    meta_path, tensor_path = directory / SCORE_META_FILE, directory / SCORE_TENSORS_FILE
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise SelectionError(f"score file {path} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise SelectionError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != SCORE_FORMAT:
        raise SelectionError(f"{meta_path}: format is {meta.get('format')!r}, expected {SCORE_FORMAT!r}")
    for key in ("layers", "metrics", "domains", "config_hash"):
        if key not in meta:
            raise SelectionError(f"{meta_path} lacks {key!r}")
    layers = tuple(int(layer) for layer in meta["layers"])
    if len(set(layers)) != len(layers):
        raise SelectionError(f"{meta_path}: duplicate layers in {list(layers)}")
    metrics, domains = tuple(meta["metrics"]), tuple(meta["domains"])
    if RANDOM_METRIC in metrics:
        raise SelectionError(f"{meta_path}: {RANDOM_METRIC!r} is reserved (drawn from a seed)")

    sha256 = file_sha256(tensor_path)
    if meta.get("tensors_sha256") not in (None, sha256):
        raise SelectionError(
            f"{tensor_path} does not match the sha256 recorded in {meta_path} (torn or edited score file)"
        )
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(tensor_path), framework="pt") as f:
        for name in f.keys():
            metric, _, domain = name.partition(DOMAIN_SEPARATOR)
            if metric not in metrics or (domain and domain not in domains):
                raise SelectionError(
                    f"{tensor_path}: tensor {name!r} is not a declared metric/domain "
                    f"(metrics {list(metrics)}, domains {list(domains)})"
                )
            value = f.get_tensor(name)
            if value.dtype not in (torch.float64, torch.float32):
                raise SelectionError(f"{tensor_path}: {name!r} is {value.dtype}, expected float64/float32")
            tensors[name] = value.to(torch.float64)
    if not tensors:
        raise SelectionError(f"{tensor_path} holds no score tensors")
    widths = {t.shape[1] if t.dim() == 2 else -1 for t in tensors.values()}
    heights = {t.shape[0] if t.dim() == 2 else -1 for t in tensors.values()}
    if len(widths) != 1 or heights != {len(layers)} or -1 in widths:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise SelectionError(
            f"{tensor_path}: every tensor must be [{len(layers)} layers, n_routed_experts]; got {shapes}"
        )
    for name, value in tensors.items():
        if (bad := first_non_finite(name, value, layers)) is not None:
            raise SelectionError(f"{tensor_path}: non-finite scores (NaN/Inf) in {bad}; rescore")
    return ScoreFile(
        directory=directory,
        layers=layers,
        metrics=metrics,
        domains=domains,
        tokens={str(k): int(v) for k, v in meta.get("tokens", {}).items()},
        config_hash=str(meta["config_hash"]),
        sha256=sha256,
        tensors=tensors,
        meta=meta,
        architecture_hash=str(meta["architecture_hash"]) if meta.get("architecture_hash") else None,
        storage_format=meta.get("storage_format") if isinstance(meta.get("storage_format"), dict) else None,
    )


def check_model_identity(
    what: str,
    config_hash: str,
    architecture_hash: str | None,
    storage_format: Mapping[str, Any] | None,
    config: DeepseekV3Config,
) -> str | None:
    """Does something made on the checkpoint (config_hash, architecture_hash, storage_format)
    belong to `config`'s checkpoint? SelectionError when not; a one-line note when it is the same
    architecture with another storage format (or other non-computational config keys); None when
    config.json is the same."""
    if config_hash == config.config_hash:
        return None
    if architecture_hash is None:
        raise SelectionError(
            f"{what} was made for a different checkpoint (config hash {config_hash[:12]}..., this "
            f"checkpoint's is {config.config_hash[:12]}...; it records no architecture hash, so only an "
            f"identical config.json matches)"
        )
    if architecture_hash != config.architecture_hash:
        raise SelectionError(
            f"{what} was made for a different checkpoint (architecture hash {architecture_hash[:12]}..., "
            f"this checkpoint's is {config.architecture_hash[:12]}...: shapes, routing, rope, norms or "
            f"vocabulary differ)"
        )
    theirs, ours = describe_storage(storage_format), describe_storage(config.storage_format)
    if storage_format is not None and dict(storage_format) == config.storage_format:
        return (f"{what} was made on a checkpoint of the same architecture and storage ({ours}) whose "
                f"config.json differs only in keys that do not change the computation")
    return f"{what} was made on a {theirs} copy of this architecture; this checkpoint stores {ours} (same model, other storage format)"


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which experts every pruned layer keeps, and the routing groups the pruned config declares."""

    kept: dict[int, tuple[int, ...]]  # HF layer index -> kept original expert ids, ascending
    n_routed_experts: int  # E of the source checkpoint
    keep: int  # M, the same in every layer
    n_group: int  # of the pruned config
    topk_group: int  # of the pruned config
    group_policy: str
    metric: str
    domains: tuple[str, ...] | None  # None: the all-domains tensor
    domain_weights: tuple[float, ...] | None
    seed: int | None  # only meaningful for the random metric
    config_hash: str  # DeepseekV3Config.config_hash of the checkpoint the scores came from
    scores_sha256: str | None
    fallback_layers: tuple[int, ...] = ()  # layers selected by the MTP fallback rule
    # HF layer index -> original ids kept as weights but never routed (a subset of kept[layer],
    # ascending); the exporter writes their bias as DISABLED_BIAS. Empty for every layer alike.
    disabled: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # of the checkpoint the scores came from; None: an older score file (config_hash must match)
    architecture_hash: str | None = None
    storage_format: dict[str, Any] | None = None

    def enabled(self, layer: int) -> tuple[int, ...]:
        """Kept ids of `layer` that routing can select (kept minus disabled), ascending."""
        off = set(self.disabled.get(layer, ()))
        return tuple(i for i in self.kept[layer] if i not in off)

    def to_json(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "n_routed_experts": self.n_routed_experts,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "group_policy": self.group_policy,
            "metric": self.metric,
            "domains": list(self.domains) if self.domains is not None else None,
            "domain_weights": list(self.domain_weights) if self.domain_weights is not None else None,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "architecture_hash": self.architecture_hash,
            "storage_format": self.storage_format,
            "scores_sha256": self.scores_sha256,
            "fallback_layers": list(self.fallback_layers),
            "disabled_experts": {str(layer): list(ids) for layer, ids in sorted(self.disabled.items()) if ids},
            "kept_experts": {str(layer): list(ids) for layer, ids in sorted(self.kept.items())},
        }


def keep_from_ratio(keep_ratio: float, n_routed_experts: int) -> int:
    """M = round(R * E) (half up); feasibility is checked by select_experts."""
    if not (0.0 < keep_ratio <= 1.0) or math.isnan(keep_ratio):
        raise SelectionError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
    return max(1, math.floor(keep_ratio * n_routed_experts + 0.5))


def pruned_routing_groups(group_policy: str, n_group: int, topk_group: int) -> tuple[int, int]:
    """(n_group, topk_group) the pruned config declares under `group_policy`."""
    if group_policy == "collapse":
        return 1, 1
    return n_group, topk_group


def validate_feasibility(
    *,
    keep: int,
    n_routed_experts: int,
    group_policy: str,
    n_group: int,
    topk_group: int,
    top_k: int,
    target_ep: int | None = None,
) -> None:
    """Raise SelectionError naming the first routing constraint that M violates."""
    if group_policy not in GROUP_POLICIES:
        raise SelectionError(f"unknown group policy {group_policy!r}; choose one of {list(GROUP_POLICIES)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise SelectionError(f"keep must be a positive integer, got {keep!r}")
    if keep > n_routed_experts:
        raise SelectionError(f"keep={keep} is larger than the {n_routed_experts} routed experts per layer")
    if n_group < 1 or n_routed_experts % n_group:
        raise SelectionError(f"source n_group={n_group} does not divide n_routed_experts={n_routed_experts}")
    if not 1 <= topk_group <= n_group:
        raise SelectionError(f"source topk_group={topk_group} is not within 1..n_group={n_group}")
    new_n_group, new_topk_group = pruned_routing_groups(group_policy, n_group, topk_group)
    if keep % new_n_group:
        raise SelectionError(
            f"group policy {group_policy!r}: keep={keep} is not a multiple of n_group={new_n_group} "
            f"(group-limited routing views the experts as [n_group, E/n_group]); "
            f"choose a multiple of {new_n_group} or --group-policy collapse"
        )
    per_group = keep // new_n_group
    if per_group < 2:
        raise SelectionError(
            f"group policy {group_policy!r}: keep={keep} leaves {per_group} expert(s) per group; "
            f"group scores sum the top-2 experts of a group, so at least 2 per group are needed"
        )
    if top_k > new_topk_group * per_group:
        raise SelectionError(
            f"group policy {group_policy!r}: top_k={top_k} experts are unreachable with "
            f"topk_group={new_topk_group} groups of {per_group} experts (keep={keep})"
        )
    if target_ep is not None:
        if target_ep < 1:
            raise SelectionError(f"target EP must be >= 1, got {target_ep}")
        if keep % target_ep:
            raise SelectionError(f"keep={keep} is not divisible by the target expert-parallel size {target_ep}")


def _top_ids(row: torch.Tensor, count: int) -> torch.Tensor:
    """Ids of the `count` highest scores; equal scores: the lower id wins (stable sort)."""
    return torch.sort(row, descending=True, stable=True).indices[:count]


def select_from_row(row: torch.Tensor, keep: int, group_policy: str, n_group: int) -> tuple[int, ...]:
    """Kept ids (ascending) of one layer's score row [E] under `group_policy`."""
    num_experts = row.shape[0]
    if group_policy == "equal-per-group":
        group_size, per_group = num_experts // n_group, keep // n_group
        kept = [
            group * group_size + _top_ids(row[group * group_size : (group + 1) * group_size], per_group)
            for group in range(n_group)
        ]
        ids = torch.cat(kept)
    else:  # collapse: global top-M, groups are dropped from the pruned config
        ids = _top_ids(row, keep)
    return tuple(sorted(int(i) for i in ids))


def _l1_normalised(row: torch.Tensor) -> torch.Tensor:
    # A layer that received no score mass (e.g. no tokens of a domain) contributes nothing.
    total = row.abs().sum()
    return row / total if total > 0 else torch.zeros_like(row)


def mixed_scores(
    scores: ScoreFile,
    metric: str,
    domains: Sequence[str] | None,
    domain_weights: Sequence[float] | None,
) -> torch.Tensor:
    """[num_layers, E] scores of `metric`; with domains, per domain and layer L1-normalised rows
    summed with `domain_weights` (the reference's mixed-domain rule)."""
    if not domains:
        return scores.rows(metric)
    weights = domain_weights if domain_weights is not None else [1.0] * len(domains)
    mixed = torch.zeros_like(scores.rows(metric, domains[0]))
    for domain, weight in zip(domains, weights):
        rows = scores.rows(metric, domain)
        for i in range(rows.shape[0]):
            mixed[i] += float(weight) * _l1_normalised(rows[i])
    return mixed


def select_experts(
    scores: ScoreFile,
    *,
    keep: int,
    metric: str,
    domains: Sequence[str] | None = None,
    domain_weights: Sequence[float] | None = None,
    group_policy: str = DEFAULT_GROUP_POLICY,
    n_group: int,
    topk_group: int,
    top_k: int,
    target_ep: int | None = None,
    seed: int = 0,
    fallback_layers: Sequence[int] = (),
) -> Selection:
    """Choose `keep` experts in every scored layer (and every `fallback_layers` layer, see the
    module docstring) of a score file. Everything is validated before any score is looked at."""
    num_experts = scores.n_routed_experts
    domains = list(domains) if domains else None
    if metric != RANDOM_METRIC and metric not in scores.available_metrics:
        raise SelectionError(
            f"unknown metric {metric!r}; the score file has {list(scores.available_metrics)} "
            f"(or use {RANDOM_METRIC!r})"
        )
    if domains is not None:
        unknown = [d for d in domains if d not in scores.domains]
        if unknown:
            raise SelectionError(f"unknown domain(s) {unknown}; the score file has {list(scores.domains)}")
        if len(set(domains)) != len(domains):
            raise SelectionError(f"duplicate domains in {domains}")
    if domain_weights is not None:
        if domains is None:
            raise SelectionError("domain weights need --domains")
        if len(domain_weights) != len(domains):
            raise SelectionError(f"{len(domain_weights)} domain weights for {len(domains)} domains")
        if not all(math.isfinite(w) and w > 0 for w in domain_weights):
            raise SelectionError(f"domain weights must be positive and finite, got {list(domain_weights)}")
    validate_feasibility(
        keep=keep,
        n_routed_experts=num_experts,
        group_policy=group_policy,
        n_group=n_group,
        topk_group=topk_group,
        top_k=top_k,
        target_ep=target_ep,
    )
    fallback_layers = [int(layer) for layer in fallback_layers if int(layer) not in scores.layers]

    layer_rows: dict[int, torch.Tensor] = {}
    if metric == RANDOM_METRIC:
        # One generator, layers in ascending order: the same seed gives the same selection.
        generator = torch.Generator().manual_seed(seed)
        for layer in sorted([*scores.layers, *fallback_layers]):
            layer_rows[layer] = torch.rand(num_experts, generator=generator, dtype=torch.float64)
    else:
        table = mixed_scores(scores, metric, domains, domain_weights)
        for layer, row in zip(scores.layers, table):
            layer_rows[layer] = row
        if fallback_layers:
            fallback_row = sum(_l1_normalised(row) for row in table)
            for layer in fallback_layers:
                layer_rows[layer] = fallback_row

    kept = {
        layer: select_from_row(row, keep, group_policy, n_group) for layer, row in sorted(layer_rows.items())
    }
    new_n_group, new_topk_group = pruned_routing_groups(group_policy, n_group, topk_group)
    return Selection(
        kept=kept,
        n_routed_experts=num_experts,
        keep=keep,
        n_group=new_n_group,
        topk_group=new_topk_group,
        group_policy=group_policy,
        metric=metric,
        domains=tuple(domains) if domains is not None else None,
        domain_weights=tuple(float(w) for w in domain_weights) if domain_weights is not None else None,
        seed=seed if metric == RANDOM_METRIC else None,
        config_hash=scores.config_hash,
        scores_sha256=scores.sha256,
        # random draws a row for every layer alike: no layer needs the fallback rule
        fallback_layers=tuple(sorted(fallback_layers)) if metric != RANDOM_METRIC else (),
        architecture_hash=scores.architecture_hash,
        storage_format=scores.storage_format,
    )


def select_for_checkpoint(
    scores: ScoreFile,
    config: DeepseekV3Config,
    *,
    keep: int | None = None,
    keep_ratio: float | None = None,
    metric: str,
    domains: Sequence[str] | None = None,
    domain_weights: Sequence[float] | None = None,
    group_policy: str | None = None,
    target_ep: int | None = None,
    seed: int = 0,
) -> Selection:
    """select_experts with the routing values and layer list taken from the checkpoint's config.

    Checks that the score file belongs to this checkpoint (`check_model_identity`: the same
    config.json, or the same architecture in another storage format; expert count; a row for
    every MoE layer); MTP layers without a row get the fallback rule.
    """
    check_model_identity(f"the score file {scores.directory}", scores.config_hash, scores.architecture_hash,
                         scores.storage_format, config)
    if scores.n_routed_experts != config.n_routed_experts:
        raise SelectionError(
            f"score rows have {scores.n_routed_experts} experts, the checkpoint has {config.n_routed_experts}"
        )
    moe_layers, mtp_layers = list(config.moe_layer_ids), list(config.mtp_layer_ids)
    missing = [layer for layer in moe_layers if layer not in scores.layers]
    if missing:
        raise SelectionError(f"the score file has no row for MoE layer(s) {missing}")
    foreign = [layer for layer in scores.layers if layer not in moe_layers and layer not in mtp_layers]
    if foreign:
        raise SelectionError(f"the score file has rows for layer(s) {foreign}, which are not MoE layers here")
    if (keep is None) == (keep_ratio is None):
        raise SelectionError("give exactly one of keep (M) or keep_ratio (R)")
    if keep is None:
        keep = keep_from_ratio(keep_ratio, config.n_routed_experts)
    return select_experts(
        scores,
        keep=keep,
        metric=metric,
        domains=domains,
        domain_weights=domain_weights,
        group_policy=group_policy or DEFAULT_GROUP_POLICY,
        n_group=config.n_group,
        topk_group=config.topk_group,
        top_k=config.num_experts_per_tok,
        target_ep=target_ep,
        seed=seed,
        fallback_layers=mtp_layers,
    )


# --------------------------------------------------------------------------------------------
# Explicit kept / disabled ids (C-Prune and any other criterion that decides ids itself)
# --------------------------------------------------------------------------------------------


def validate_disabled(
    kept: Mapping[int, Sequence[int]],
    disabled: Mapping[int, Sequence[int]],
    *,
    group_policy: str,
    n_group: int,
    topk_group: int,
    top_k: int,
) -> None:
    """Raise SelectionError unless routing can never select a disabled expert and the enabled
    experts route exactly as if the disabled ones were absent (see the module docstring).

    `kept` holds the ascending kept ids of every layer (the pruned expert slots, all layers the
    same count M); `n_group` / `topk_group` are the SOURCE config's. Pruned group g is slots
    [g*M/n', (g+1)*M/n') with n' the pruned config's n_group.
    """
    new_n_group, new_topk_group = pruned_routing_groups(group_policy, n_group, topk_group)
    for layer, off in disabled.items():
        if layer not in kept:
            raise SelectionError(f"disabled experts given for layer {layer}, which keeps no experts")
        ids = list(kept[layer])
        off = [int(i) for i in off]
        if len(set(off)) != len(off):
            raise SelectionError(f"layer {layer}: duplicate disabled ids {off}")
        foreign = sorted(set(off) - set(ids))
        if foreign:
            raise SelectionError(f"layer {layer}: disabled ids {foreign} are not among the kept ids")
        if not off:
            continue
        if len(ids) % new_n_group:
            raise SelectionError(f"layer {layer}: {len(ids)} kept ids do not split into {new_n_group} groups")
        size = len(ids) // new_n_group
        enabled_per_group = sorted(
            sum(1 for i in ids[g * size : (g + 1) * size] if i not in set(off)) for g in range(new_n_group)
        )
        if new_n_group > 1 and enabled_per_group[0] < 2:
            raise SelectionError(
                f"layer {layer}: a routing group keeps {enabled_per_group[0]} enabled expert(s); group scores "
                f"sum the top-2 choice scores, so a disabled expert would enter them (need >= 2 enabled "
                f"per group, or the collapse policy)"
            )
        reachable = sum(enabled_per_group[:new_topk_group])
        if reachable < top_k:
            raise SelectionError(
                f"layer {layer}: only {reachable} enabled experts in the {new_topk_group} weakest routing "
                f"group(s) for top_k={top_k}: routing could select a disabled expert"
            )


def selection_from_kept(
    config: DeepseekV3Config,
    kept_by_layer: Mapping[int, Sequence[int]],
    disabled_by_layer: Mapping[int, Sequence[int]] | None = None,
    *,
    group_policy: str = DEFAULT_GROUP_POLICY,
    metric: str,
    scores_sha256: str | None = None,
    target_ep: int | None = None,
    fallback_layers: Sequence[int] = (),
) -> Selection:
    """A Selection from explicit kept (and disabled) original expert ids per HF layer.

    Every MoE layer of `config` needs ids; MTP layers may be given (the exporter's mtp="prune"
    needs them). Every layer must keep the same number M of expert slots (one n_routed_experts);
    M is validated exactly like `select_experts` validates keep (routing groups, top-k, target EP),
    under equal-per-group every original routing group must keep M/n_group experts (the pruned
    groups are the original ones), and disabled ids must pass `validate_disabled`.
    """
    allowed = set(config.moe_layer_ids) | set(config.mtp_layer_ids)
    kept: dict[int, tuple[int, ...]] = {}
    for layer, ids in kept_by_layer.items():
        layer = int(layer)
        if layer not in allowed:
            raise SelectionError(f"layer {layer} is not a MoE (or MTP) layer of this checkpoint")
        ids = [int(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise SelectionError(f"layer {layer}: duplicate kept ids {ids}")
        if any(not 0 <= i < config.n_routed_experts for i in ids):
            raise SelectionError(f"layer {layer}: kept ids out of range 0..{config.n_routed_experts - 1}: {ids}")
        kept[layer] = tuple(sorted(ids))
    missing = [layer for layer in config.moe_layer_ids if layer not in kept]
    if missing:
        raise SelectionError(f"no kept experts for MoE layer(s) {missing}")
    counts = {layer: len(ids) for layer, ids in kept.items()}
    if len(set(counts.values())) != 1:
        raise SelectionError(
            f"every layer must keep the same number of expert slots (one n_routed_experts), got {counts}; "
            f"express uneven counts with disabled slots"
        )
    keep = next(iter(counts.values()))
    validate_feasibility(
        keep=keep,
        n_routed_experts=config.n_routed_experts,
        group_policy=group_policy,
        n_group=config.n_group,
        topk_group=config.topk_group,
        top_k=config.num_experts_per_tok,
        target_ep=target_ep,
    )
    new_n_group, new_topk_group = pruned_routing_groups(group_policy, config.n_group, config.topk_group)
    if new_n_group > 1:
        group_size, per_group = config.n_routed_experts // config.n_group, keep // new_n_group
        for layer, ids in kept.items():
            counts_per_group = [sum(1 for i in ids if i // group_size == g) for g in range(config.n_group)]
            if any(c != per_group for c in counts_per_group):
                raise SelectionError(
                    f"layer {layer}: group policy {group_policy!r} needs {per_group} kept experts in every "
                    f"original routing group, got {counts_per_group} (use the collapse policy)"
                )
    disabled = {
        int(layer): tuple(sorted(int(i) for i in ids)) for layer, ids in (disabled_by_layer or {}).items() if len(ids)
    }
    validate_disabled(
        kept,
        disabled,
        group_policy=group_policy,
        n_group=config.n_group,
        topk_group=config.topk_group,
        top_k=config.num_experts_per_tok,
    )
    return Selection(
        kept=dict(sorted(kept.items())),
        n_routed_experts=config.n_routed_experts,
        keep=keep,
        n_group=new_n_group,
        topk_group=new_topk_group,
        group_policy=group_policy,
        metric=metric,
        domains=None,
        domain_weights=None,
        seed=None,
        config_hash=config.config_hash,
        scores_sha256=scores_sha256,
        fallback_layers=tuple(sorted(int(layer) for layer in fallback_layers)),
        disabled=dict(sorted(disabled.items())),
        architecture_hash=config.architecture_hash,
        storage_format=config.storage_format,
    )


def group_policy_for(keep: int, config) -> str:
    """equal-per-group when routing accepts M under it, else collapse (SelectionError if neither)."""
    routing = dict(n_routed_experts=config.n_routed_experts, n_group=config.n_group,
                   topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    try:
        validate_feasibility(keep=keep, group_policy=EQUAL_PER_GROUP, **routing)
        return EQUAL_PER_GROUP
    except SelectionError:
        pass
    try:
        validate_feasibility(keep=keep, group_policy=COLLAPSE, **routing)
    except SelectionError as err:
        raise SelectionError(f"M={keep} is not routable under either group policy: {err}") from None
    return COLLAPSE

