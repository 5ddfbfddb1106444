"""C-Prune (arXiv 2504.07807): cluster-driven expert selection, layer-wise then across layers.

Pure functions of the expert features that `launch/score.py --cprune-features` writes
(`cprune_features.safetensors`: "features" [L, E, N, H] float32 = every routed expert of every
scored MoE layer run on the mean-pooled MoE input of each of the N demonstrations, layers in the
order of scores.json "layers", demos in input order). Clustering is scikit-learn's Ward
agglomerative clustering; nothing here is hand-written clustering.

Layer-wise step (`layer_votes`, `layerwise_selection`)
------------------------------------------------------
1. The N demonstrations are split into consecutive batches of `batch_size` (input order; the last
   batch may be smaller; default: one batch of all N).
2. In each batch an expert's feature is the concatenation of its outputs on the batch's demos
   ([b*H]); the experts are clustered into K clusters (Ward; K = `num_clusters`, default
   max(2, keep // 2), capped at the number of experts).
3. How many experts each cluster keeps (`cluster_quota`), so that the batch keeps ~`keep`:
   clusters with < 3 experts are kept whole; every larger cluster keeps at least 1, and the rest of
   the budget (keep minus the small clusters' experts) is shared among the larger clusters in
   proportion to their spare capacity (size - 1), largest remainder first (ties: larger cluster,
   then lower cluster index), never more than a cluster's size. When the small clusters alone
   exceed `keep`, the batch keeps more than `keep` (one per larger cluster on top).
4. Inside a cluster, the experts closest (Euclidean) to the cluster centroid are kept (ties: lower
   id). Each kept expert gets one vote.
5. A layer keeps its `keep` most-voted experts; ties: smaller mean distance to the centroid over
   the batches, then lower id. The full best-first order is the layer's *ranking*.

Global step (`global_selection`)
--------------------------------
The survivors of all layers are pooled (their features have the same [N, H] shape in every layer,
so they are comparable) and voted on exactly as above (K = `num_clusters`, default
max(2, total_keep // 2); the budget is `total_keep`). Ranked by (votes desc, mean distance asc,
layer, id), every layer first keeps its best `per_layer_min` survivors, then the best remaining
survivors fill up to `total_keep`, skipping layers that reached `per_layer_cap`. Counts per layer
become uneven: redundant layers (survivors in few clusters) lose more experts.

Making uneven counts exportable (`exportable_layout`) - the two documented options
-----------------------------------------------------------------------------------
A checkpoint has one `n_routed_experts`, so every layer gets M* expert SLOTS, M* = the largest
per-layer count rounded up to the smallest value routing feasibility accepts (the group policy's
n_group multiple, >= 2 per group, top_k reachable, the target EP size).
- `disable` (default): a layer that kept c < M* experts fills its M* - c spare slots with its
  next-best pruned experts (by its ranking) and DISABLES them: the exporter writes their
  `e_score_correction_bias` as -1e4 (fp32; selection.DISABLED_BIAS), so choice = sigmoid + bias
  never selects them, and the combine weights (unbiased sigmoid of the chosen experts) are what
  the clustering decided. Weights for disabled slots still cost memory (M* per layer), but the
  routing is exactly C-Prune's. Use `collapse` (n_group = topk_group = 1): group scores (sum of a
  group's top-2 choice scores) are then untouched by construction.
- `equalize`: the spare slots hold the same next-best experts but ENABLED (real experts): every
  layer routes over M* experts, i.e. the global step only decides which layers may keep more.
Group policies: `collapse` keeps exactly the clustering's survivors (recommended). With
`equal-per-group` every layer's count is rounded up to a feasible multiple of n_group and each
original routing group keeps its best c / n_group experts by the layer's ranking, so the group
rule can override the clustering inside a group (the C-Prune code knows no routing groups).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import AgglomerativeClustering

from megatron_easyep.pruning.selection import EQUAL_PER_GROUP, SelectionError, selection_from_kept, validate_feasibility

FEATURES_FILE = "cprune_features.safetensors"
UNEVEN_MODES = ("disable", "equalize")
DEFAULT_UNEVEN = "disable"
SMALL_CLUSTER = 3  # clusters with fewer experts are kept whole


# --------------------------------------------------------------------------------------------
# voting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Votes:
    """Votes of P items (experts of one layer, or pooled survivors of all layers)."""

    votes: np.ndarray  # [P] int64: batches in which the item was kept
    distance: np.ndarray  # [P] float64: mean over batches of the distance to its cluster centroid
    num_batches: int

    def ranking(self) -> np.ndarray:
        """Item indices best first: votes desc, mean distance asc, index asc."""
        index = np.arange(len(self.votes))
        return np.lexsort((index, self.distance, -self.votes))


def default_clusters(target: int) -> int:
    """K when none is given: half the experts to keep (clusters keep ~2 each), at least 2."""
    return max(2, int(target) // 2)


def demo_batches(num_demos: int, batch_size: int | None) -> list[np.ndarray]:
    """Consecutive batches of demo indices; the last may be smaller. None: one batch of all."""
    if num_demos < 1:
        raise SelectionError("C-Prune needs at least one demonstration")
    if batch_size is None:
        batch_size = num_demos
    if batch_size < 1:
        raise SelectionError(f"batch size must be >= 1, got {batch_size}")
    return [np.arange(start, min(start + batch_size, num_demos)) for start in range(0, num_demos, batch_size)]


def cluster_quota(sizes: Sequence[int], keep: int) -> np.ndarray:
    """How many experts each cluster keeps (module docstring, layer-wise step 3)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = np.where(sizes < SMALL_CLUSTER, sizes, 0)
    large = np.flatnonzero(sizes >= SMALL_CLUSTER)
    if large.size == 0:
        return quota
    quota[large] = 1
    capacity = sizes[large] - 1
    budget = int(min(max(keep - quota.sum(), 0), capacity.sum()))
    if budget and capacity.sum():
        share = budget * capacity / capacity.sum()
        extra = np.floor(share).astype(np.int64)
        remainder = share - extra
        left = budget - int(extra.sum())
        order = np.lexsort((large, -sizes[large], -remainder))  # largest remainder, larger, lower index
        for i in order[:left]:
            extra[i] += 1
        quota[large] += np.minimum(extra, capacity)
    return quota


def vote(batches: Sequence[np.ndarray], keep: int, num_clusters: int | None = None) -> Votes:
    """Vote over batches of item features, each [P, D_b] (module docstring, steps 2-4)."""
    if not batches:
        raise SelectionError("no batches to vote on")
    num_items = batches[0].shape[0]
    if keep < 1 or keep > num_items:
        raise SelectionError(f"keep must be within 1..{num_items}, got {keep}")
    clusters = default_clusters(keep) if num_clusters is None else int(num_clusters)
    if clusters < 1:
        raise SelectionError(f"the number of clusters must be >= 1, got {clusters}")
    clusters = min(clusters, num_items)
    votes = np.zeros(num_items, dtype=np.int64)
    distance = np.zeros(num_items, dtype=np.float64)
    for points in batches:
        points = np.asarray(points, dtype=np.float64).reshape(num_items, -1)
        if not np.isfinite(points).all():
            raise SelectionError("C-Prune features contain non-finite values")
        if clusters == num_items or num_items == 1:
            labels = np.arange(num_items)
        else:
            labels = AgglomerativeClustering(n_clusters=clusters, linkage="ward").fit_predict(points)
        members = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
        members = [m for m in members if m.size]
        quota = cluster_quota([m.size for m in members], keep)
        for ids, count in zip(members, quota):
            d = np.linalg.norm(points[ids] - points[ids].mean(axis=0), axis=1)
            distance[ids] += d
            closest = ids[np.lexsort((ids, d))[:count]]
            votes[closest] += 1
    return Votes(votes=votes, distance=distance / len(batches), num_batches=len(batches))


def layer_votes(features_l, keep: int, num_clusters: int | None = None, batch_size: int | None = None) -> Votes:
    """Votes of the E experts of one layer; features_l: [E, N, H] (array or memmap)."""
    features_l = np.asarray(features_l)
    if features_l.ndim != 3:
        raise SelectionError(f"layer features must be [E, N, H], got shape {features_l.shape}")
    num_experts, num_demos, _ = features_l.shape
    batches = [features_l[:, batch, :].reshape(num_experts, -1) for batch in demo_batches(num_demos, batch_size)]
    return vote(batches, keep, num_clusters)


@dataclass(frozen=True)
class LayerwiseResult:
    kept: list[np.ndarray]  # per layer row: the `keep` survivors, ascending ids
    ranking: list[np.ndarray]  # per layer row: all E ids best first (survivors first)
    votes: list[Votes]


def layerwise_selection(
    features, keep: int, *, num_clusters: int | None = None, batch_size: int | None = None
) -> LayerwiseResult:
    """Per layer row of features [L, E, N, H]: the `keep` most-voted experts."""
    kept, ranking, all_votes = [], [], []
    for row in range(len(features)):
        votes = layer_votes(features[row], keep, num_clusters, batch_size)
        order = votes.ranking()
        kept.append(np.sort(order[:keep]))
        ranking.append(order)
        all_votes.append(votes)
    return LayerwiseResult(kept=kept, ranking=ranking, votes=all_votes)


@dataclass(frozen=True)
class GlobalResult:
    kept: list[np.ndarray]  # per layer row: survivors of the global step, ascending ids
    counts: list[int]
    pool: list[tuple[int, int]]  # (layer row, expert id) of every pooled item, in vote order
    votes: Votes  # over the pool


def global_selection(
    features,
    layer_kept: Sequence[Sequence[int]],
    total_keep: int,
    *,
    per_layer_min: int = 1,
    per_layer_cap: int | None = None,
    num_clusters: int | None = None,
    batch_size: int | None = None,
) -> GlobalResult:
    """Re-cluster the survivors of every layer together and keep `total_keep` of them (module
    docstring); per_layer_min <= kept count of a layer <= per_layer_cap (None: no cap)."""
    num_layers = len(layer_kept)
    if num_layers != len(features):
        raise SelectionError(f"{num_layers} layers of survivors for {len(features)} layers of features")
    pool = [(row, int(e)) for row, ids in enumerate(layer_kept) for e in sorted(int(i) for i in ids)]
    sizes = [len(ids) for ids in layer_kept]
    cap = [size if per_layer_cap is None else min(size, int(per_layer_cap)) for size in sizes]
    if per_layer_min < 0 or (per_layer_cap is not None and per_layer_cap < per_layer_min):
        raise SelectionError(f"need 0 <= per-layer min ({per_layer_min}) <= per-layer cap ({per_layer_cap})")
    short = [row for row, size in enumerate(sizes) if size < per_layer_min]
    if short:
        raise SelectionError(f"layer row(s) {short} have fewer survivors than the per-layer min {per_layer_min}")
    if not num_layers * per_layer_min <= total_keep <= sum(cap):
        raise SelectionError(
            f"total keep {total_keep} must be within {num_layers} layers x min {per_layer_min} = "
            f"{num_layers * per_layer_min} and the capped survivors {sum(cap)}"
        )
    num_demos = np.asarray(features[0]).shape[1]
    batches = []
    for batch in demo_batches(num_demos, batch_size):
        batches.append(np.stack([np.asarray(features[row][e][batch]).reshape(-1) for row, e in pool]))
    votes = vote(batches, total_keep, num_clusters)
    rows = np.array([row for row, _ in pool])
    ids = np.array([e for _, e in pool])
    order = np.lexsort((ids, rows, votes.distance, -votes.votes))
    chosen = np.zeros(len(pool), dtype=bool)
    counts = [0] * num_layers
    for row in range(num_layers):  # the per-layer minimum first, best first
        for item in [i for i in order if rows[i] == row][:per_layer_min]:
            chosen[item] = True
            counts[row] += 1
    for item in order:
        if sum(counts) >= total_keep:
            break
        if not chosen[item] and counts[rows[item]] < cap[rows[item]]:
            chosen[item] = True
            counts[rows[item]] += 1
    kept = [np.sort(ids[chosen & (rows == row)]) for row in range(num_layers)]
    return GlobalResult(kept=kept, counts=counts, pool=pool, votes=votes)


# --------------------------------------------------------------------------------------------
# exportable layout
# --------------------------------------------------------------------------------------------


def feasible_count(
    count: int,
    *,
    n_routed_experts: int,
    group_policy: str,
    n_group: int,
    topk_group: int,
    top_k: int,
    target_ep: int | None = None,
) -> int:
    """The smallest M >= count that routing accepts (selection.validate_feasibility)."""
    for m in range(max(1, count), n_routed_experts + 1):
        try:
            validate_feasibility(keep=m, n_routed_experts=n_routed_experts, group_policy=group_policy,
                                 n_group=n_group, topk_group=topk_group, top_k=top_k, target_ep=target_ep)
            return m
        except SelectionError:
            continue
    raise SelectionError(
        f"no expert count in {count}..{n_routed_experts} is routable with group policy {group_policy!r}"
        + (f" and target EP {target_ep}" if target_ep else "")
    )


def take_ranked(ranking: Sequence[int], count: int, group_policy: str, n_routed_experts: int, n_group: int) -> list[int]:
    """The first `count` of a best-first ranking; equal-per-group: count/n_group per group."""
    ranking = [int(i) for i in ranking]
    if group_policy != "equal-per-group" or n_group == 1:
        return ranking[:count]
    size, per_group = n_routed_experts // n_group, count // n_group
    return [i for g in range(n_group) for i in [e for e in ranking if e // size == g][:per_group]]


@dataclass(frozen=True)
class Layout:
    slots: int  # M*: n_routed_experts of the pruned checkpoint
    kept: list[tuple[int, ...]]  # per layer row: the M* slot ids, ascending
    disabled: list[tuple[int, ...]]  # per layer row: slot ids never routed (disable), ascending
    enabled_counts: list[int]


def exportable_layout(
    rankings: Sequence[Sequence[int]],
    counts: Sequence[int],
    *,
    uneven: str = DEFAULT_UNEVEN,
    group_policy: str,
    n_routed_experts: int,
    n_group: int,
    topk_group: int,
    top_k: int,
    target_ep: int | None = None,
) -> Layout:
    """Turn per-layer counts (the first counts[l] of rankings[l] are the layer's survivors) into
    M* slots per layer (module docstring: `disable` / `equalize`)."""
    if uneven not in UNEVEN_MODES:
        raise SelectionError(f"unknown uneven mode {uneven!r}; choose one of {list(UNEVEN_MODES)}")
    routing = dict(n_routed_experts=n_routed_experts, group_policy=group_policy, n_group=n_group,
                   topk_group=topk_group, top_k=top_k)
    enabled_counts = [feasible_count(int(c), **routing) for c in counts]
    slots = feasible_count(max(enabled_counts), **routing, target_ep=target_ep)
    kept, disabled = [], []
    for ranking, count in zip(rankings, enabled_counts):
        if sorted(int(i) for i in ranking) != list(range(n_routed_experts)):
            raise SelectionError("a layer ranking must order every expert id exactly once")
        slot_ids = take_ranked(ranking, slots, group_policy, n_routed_experts, n_group)
        enabled = set(take_ranked(ranking, count, group_policy, n_routed_experts, n_group))
        kept.append(tuple(sorted(slot_ids)))
        disabled.append(tuple(sorted(set(slot_ids) - enabled)) if uneven == "disable" else ())
    if uneven == "equalize":
        enabled_counts = [slots] * len(kept)
    return Layout(slots=slots, kept=kept, disabled=disabled, enabled_counts=enabled_counts)


def final_ranking(layer_ranking: Sequence[int], survivors: Sequence[int]) -> list[int]:
    """A layer's ranking with `survivors` first (in layer-ranking order), then the others."""
    survivors = set(int(i) for i in survivors)
    ranking = [int(i) for i in layer_ranking]
    return [i for i in ranking if i in survivors] + [i for i in ranking if i not in survivors]


# --------------------------------------------------------------------------------------------
# the features file
# --------------------------------------------------------------------------------------------


def load_features(path: str | os.PathLike, name: str = "features") -> np.ndarray:
    """A read-only memory map of one float32 tensor of a safetensors file (no full read: the
    DeepSeek-R1 features are ~10 GB)."""
    path = Path(path)
    if path.is_dir():
        path = path / FEATURES_FILE
    if not path.is_file():
        raise SelectionError(f"C-Prune features {path} do not exist (score with --cprune-features)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(100 << 20, path.stat().st_size - 8):
            raise SelectionError(f"{path}: corrupt safetensors header")
        header = json.loads(f.read(header_len))
    entry = header.get(name)
    if entry is None:
        raise SelectionError(f"{path} has no tensor {name!r}")
    if entry["dtype"] != "F32":
        raise SelectionError(f"{path}: {name!r} is {entry['dtype']}, expected F32")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if (end - begin) != 4 * math.prod(shape):
        raise SelectionError(f"{path}: {name!r} byte size does not match its shape {shape}")
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + header_len + begin, shape=shape)


# --------------------------------------------------------------------------------------------
# Selections at an average of M experts per layer (the comparison grid's two C-Prune rows)
# --------------------------------------------------------------------------------------------

METRIC = "cprune"  # the layer-wise step
GLOBAL_METRIC = "cprune_global"  # with the global cross-layer step
GLOBAL_SURVIVORS = 1.5  # cprune_global: the layer-wise step keeps ceil(1.5 M) per layer


def cprune_selection(config, features: np.ndarray, demo_index, keep: int, group_policy: str,
                     scores_sha256: str | None, layers):
    """Layer-wise C-Prune on the given demonstrations' features -> Selection (converters/
    cprune_select.py without --global-keep-ratio, features restricted to `demo_index`)."""
    subset = np.asarray(features[:, :, list(demo_index), :])
    layerwise = layerwise_selection(subset, keep)
    layout = exportable_layout(
        [r.tolist() for r in layerwise.ranking], [keep] * len(layers), group_policy=group_policy,
        n_routed_experts=config.n_routed_experts, n_group=config.n_group,
        topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    return selection_from_kept(config, dict(zip(layers, layout.kept)), group_policy=group_policy,
                               metric=METRIC, scores_sha256=scores_sha256)


def group_rounded_counts(counts, multiple: int, caps) -> list[int]:
    """Per-layer counts rounded to multiples of `multiple` with the same sum (the sum and every
    cap must be multiples): round down, then give one `multiple` back to the layers with the
    largest remainders (ties: the larger count, as the global step ranked it higher; then the
    earlier layer), never above a layer's cap."""
    counts = [int(c) for c in counts]
    if sum(counts) % multiple or any(int(cap) % multiple for cap in caps):
        raise SelectionError(f"cannot round counts {counts} to multiples of {multiple} with caps {list(caps)}")
    rounded = [c - c % multiple for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-(counts[i] % multiple), -counts[i], i))
    for i in order[:(sum(counts) - sum(rounded)) // multiple]:
        rounded[i] += multiple  # c % multiple > 0 and c <= cap, so this stays <= cap
    return rounded


def cprune_global_selection(config, features: np.ndarray, demo_index, keep: int, group_policy: str,
                            scores_sha256: str | None, layers):
    """C-Prune with the global step at an average of `keep` enabled experts per layer, exported
    with `disable` slots: the layer-wise step keeps ceil(1.5 M) experts per layer (rounded up to a
    routable count), the global step re-clusters those survivors of all layers together and keeps
    M x layers of them; under equal-per-group the counts are rounded to multiples of n_group with
    the same sum (`group_rounded_counts`)."""
    subset = np.asarray(features[:, :, list(demo_index), :])
    routing = dict(n_routed_experts=config.n_routed_experts, group_policy=group_policy,
                   n_group=config.n_group, topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    survivors = feasible_count(min(config.n_routed_experts, math.ceil(GLOBAL_SURVIVORS * keep)), **routing)
    layerwise = layerwise_selection(subset, survivors)
    result = global_selection(subset, layerwise.kept, keep * len(layers),
                              per_layer_min=feasible_count(1, **routing))
    counts = result.counts
    if group_policy == EQUAL_PER_GROUP and config.n_group > 1:
        counts = group_rounded_counts(counts, config.n_group, [survivors] * len(counts))
    rankings = [final_ranking(r, k) for r, k in zip(layerwise.ranking, result.kept)]
    layout = exportable_layout(rankings, counts, uneven="disable", **routing)
    return selection_from_kept(config, dict(zip(layers, layout.kept)), dict(zip(layers, layout.disabled)),
                               group_policy=group_policy, metric=GLOBAL_METRIC, scores_sha256=scores_sha256)

