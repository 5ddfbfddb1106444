"""Prune routed experts of a DeepSeek-V3-class HF checkpoint with C-Prune (expert clustering).

    python converters/cprune_select.py --hf-checkpoint SRC --scores SCORE_DIR --output DST \
        --keep M [--global-keep-ratio R [--per-layer-cap C] [--per-layer-min N] \
        [--uneven disable|equalize]] [--clusters K] [--global-clusters KG] [--batch-size B] \
        [--group-policy collapse|equal-per-group] [--target-ep EP] [--mtp prune|drop] [--overwrite]

SCORE_DIR is a scoring run made with `launch/score.py --cprune-features` (scores.json +
cprune_features.safetensors). Layer-wise step: every MoE layer keeps its M most-voted experts.
With --global-keep-ratio R the survivors of all layers are re-clustered together and
round(R * M * L) of them are kept (L = scored MoE layers), between --per-layer-min (default: the
smallest routable count) and --per-layer-cap (default M) per layer; the uneven counts are made
exportable by --uneven (see megatron_easyep/pruning/cprune.py): `disable` (default) gives every layer M*
slots and writes the spare slots' e_score_correction_bias as -1e4 so routing never selects them;
`equalize` enables them. --group-policy collapse (default, recommended) routes plain biased top-k.

MTP layers without features get M* experts ranked by the sum over the scored layers of their
L1-normalised vote rows (a placeholder like export_pruned's fallback; expert ids are not aligned
across layers), or --mtp drop. The selection goes through megatron_easyep.pruning.export (the same
streaming exporter as every criterion); DST/cprune.json records the parameters, votes and counts.
Any problem with the request is reported on stderr with exit code 2, before any output exists.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import numpy as np

from megatron_easyep.pruning import cprune
from megatron_easyep.pruning.export import MTP_ACTIONS, export_pruned
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.preflight import format_preflight
from megatron_easyep.pruning.selection import (
    check_model_identity,
    GROUP_POLICIES,
    SelectionError,
    load_scores,
    selection_from_kept,
    validate_feasibility,
)

USAGE_ERROR = 2
DEFAULT_GROUP_POLICY = "collapse"
METRIC = "cprune"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-checkpoint", required=True, help="source HF checkpoint directory (never modified)")
    parser.add_argument("--scores", required=True, help="score directory with cprune_features.safetensors")
    parser.add_argument("--output", required=True, help="pruned checkpoint directory to create")
    parser.add_argument("--keep", type=int, required=True, help="experts kept per layer by the layer-wise step (M)")
    parser.add_argument("--global-keep-ratio", type=float, default=None,
                        help="global step: keep round(R * M * layers) survivors across layers (uneven counts)")
    parser.add_argument("--per-layer-cap", type=int, default=None, help="global step: at most C experts per layer")
    parser.add_argument("--per-layer-min", type=int, default=None,
                        help="global step: at least N experts per layer (default: the smallest routable count)")
    parser.add_argument("--uneven", choices=cprune.UNEVEN_MODES, default=cprune.DEFAULT_UNEVEN,
                        help="disable: spare slots are never routed (bias -1e4); equalize: spare slots are "
                             "real, enabled experts")
    parser.add_argument("--clusters", type=int, default=None, help="clusters per layer (default max(2, M // 2))")
    parser.add_argument("--global-clusters", type=int, default=None,
                        help="clusters of the global step (default max(2, total keep // 2))")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="demonstrations per clustering batch (default: all in one batch)")
    parser.add_argument("--group-policy", choices=GROUP_POLICIES, default=DEFAULT_GROUP_POLICY,
                        help="collapse (default): n_group=topk_group=1; equal-per-group: counts rounded to "
                             "multiples of n_group, each group keeps its best by votes")
    parser.add_argument("--target-ep", type=int, default=None, help="require the slot count divisible by this")
    parser.add_argument("--mtp", choices=MTP_ACTIONS, default="prune",
                        help="prune the MTP layer (vote fallback, when not scored) or drop it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def _dumps(record: dict) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(record, indent=1)
    return re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def plan_cprune(args, config: DeepseekV3Config, scores, features: np.ndarray) -> tuple:
    """(selection, record) from parsed arguments; raises SelectionError (ValueError)."""
    num_experts = config.n_routed_experts
    routing = dict(n_routed_experts=num_experts, group_policy=args.group_policy, n_group=config.n_group,
                   topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    if features.ndim != 4 or features.shape[:2] != (len(scores.layers), num_experts):
        raise SelectionError(
            f"C-Prune features have shape {tuple(features.shape)}, expected [{len(scores.layers)} layers, "
            f"{num_experts} experts, N, H]"
        )
    if not 1 <= args.keep <= num_experts:
        raise SelectionError(f"--keep must be within 1..{num_experts}, got {args.keep}")
    use_global = args.global_keep_ratio is not None
    if not use_global:
        for flag in ("per_layer_cap", "per_layer_min", "global_clusters"):
            if getattr(args, flag) is not None:
                raise SelectionError(f"--{flag.replace('_', '-')} needs --global-keep-ratio")
        validate_feasibility(keep=args.keep, target_ep=args.target_ep, **routing)

    layerwise = cprune.layerwise_selection(features, args.keep, num_clusters=args.clusters,
                                           batch_size=args.batch_size)
    record: dict = {
        "format": "megatron-easyep-cprune/1",
        "keep": args.keep,
        "clusters": args.clusters if args.clusters is not None else cprune.default_clusters(args.keep),
        "batch_size": args.batch_size,
        "group_policy": args.group_policy,
        "layers": list(scores.layers),
        "layerwise_votes": {str(layer): v.votes.tolist() for layer, v in zip(scores.layers, layerwise.votes)},
        "layerwise_kept": {str(layer): k.tolist() for layer, k in zip(scores.layers, layerwise.kept)},
        "num_batches": layerwise.votes[0].num_batches,
    }
    if use_global:
        ratio = args.global_keep_ratio
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise SelectionError(f"--global-keep-ratio must be in (0, 1], got {ratio}")
        total = _round_half_up(ratio * args.keep * len(scores.layers))
        minimum = args.per_layer_min if args.per_layer_min is not None else cprune.feasible_count(1, **routing)
        result = cprune.global_selection(features, layerwise.kept, total, per_layer_min=minimum,
                                         per_layer_cap=args.per_layer_cap, num_clusters=args.global_clusters,
                                         batch_size=args.batch_size)
        counts = result.counts
        rankings = [cprune.final_ranking(r, k) for r, k in zip(layerwise.ranking, result.kept)]
        record["global"] = {
            "keep_ratio": ratio, "total_keep": total, "per_layer_min": minimum, "per_layer_cap": args.per_layer_cap,
            "clusters": (args.global_clusters if args.global_clusters is not None
                         else cprune.default_clusters(total)),
            "kept": {str(layer): k.tolist() for layer, k in zip(scores.layers, result.kept)},
            "counts": {str(layer): c for layer, c in zip(scores.layers, counts)},
        }
    else:
        counts = [args.keep] * len(scores.layers)
        rankings = [r.tolist() for r in layerwise.ranking]
    layout = cprune.exportable_layout(rankings, counts, uneven=args.uneven, target_ep=args.target_ep, **routing)
    kept = dict(zip(scores.layers, layout.kept))
    disabled = dict(zip(scores.layers, layout.disabled))

    fallback = [layer for layer in config.mtp_layer_ids if layer not in kept] if args.mtp == "prune" else []
    if fallback:
        row = np.zeros(num_experts)
        for v in layerwise.votes:
            row += v.votes / max(int(v.votes.sum()), 1)
        ranking = np.lexsort((np.arange(num_experts), -row)).tolist()
        slot_ids = tuple(sorted(cprune.take_ranked(ranking, layout.slots, args.group_policy, num_experts, config.n_group)))
        for layer in fallback:
            kept[layer] = slot_ids
    selection = selection_from_kept(config, kept, disabled, group_policy=args.group_policy, metric=METRIC,
                                    scores_sha256=scores.sha256, target_ep=args.target_ep,
                                    fallback_layers=fallback)
    record.update({
        "uneven": args.uneven,
        "slots": layout.slots,
        "enabled_counts": {str(layer): c for layer, c in zip(scores.layers, layout.enabled_counts)},
        "mtp_fallback_layers": fallback,
    })
    return selection, record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = DeepseekV3Config.load(args.hf_checkpoint)
        scores = load_scores(args.scores)
        note = check_model_identity(f"the score file {scores.directory}", scores.config_hash,
                                    scores.architecture_hash, scores.storage_format, config)
        if note:
            print(f"note: {note}", file=sys.stderr)
        missing = [layer for layer in config.moe_layer_ids if layer not in scores.layers]
        if missing:
            raise SelectionError(f"the score file has no row for MoE layer(s) {missing}")
        features = cprune.load_features(scores.directory)
        selection, record = plan_cprune(args, config, scores, features)
        report = export_pruned(args.hf_checkpoint, args.output, selection, mtp=args.mtp, overwrite=args.overwrite,
                               log=lambda message: print(message, file=sys.stderr))
        (report.path / "cprune.json").write_text(_dumps(record), encoding="utf-8")
    except (ValueError, OSError) as err:  # CheckpointError, SelectionError, ExportError, I/O
        print(f"cprune_select: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    counts = ", ".join(f"{layer}:{count}" for layer, count in record["enabled_counts"].items())
    print(
        f"wrote {report.path}: {selection.keep}/{selection.n_routed_experts} expert slots per layer "
        f"({selection.group_policy}, n_group={selection.n_group}, topk_group={selection.topk_group}), "
        f"enabled per layer {counts} ({record['uneven'] if 'global' in record else 'even'}), {report.seconds:.1f} s"
    )
    print(format_preflight(report.preflight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
