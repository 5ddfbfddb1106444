"""Prune routed experts of a DeepSeek-V3-class HF checkpoint using a score file.

    python converters/export_pruned.py --hf-checkpoint SRC --scores SCORE_DIR --output DST \
        --keep 128 --metric easyep [--domains math,code --domain-weights 1,2] \
        [--group-policy equal-per-group|collapse] [--target-ep 8] [--seed 0] \
        [--mtp prune|drop] [--allow-unexpected-tensors] [--overwrite] \
        [--merge output-frequency|router-score-aligned|... [--cprune-features FILE]] \
        [--rebalance-bias --demos FILE:DOMAIN [--rebalance-steps N] [--rebalance-step-size S]
         [--expert-parallel EP] [--pipeline-parallel PP]]

The fit of --rebalance-bias runs on one process, or on a torchrun world with a PP x EP layout like
scoring (`torchrun --nproc-per-node 4 converters/export_pruned.py ... --expert-parallel 2
--pipeline-parallel 2`): rank 0 exports, every rank takes part in the fit, rank 0 publishes.

--rebalance-bias (off by default) re-fits the kept experts' e_score_correction_bias on the
demonstrations with DeepSeek's aux-loss-free rule, layer by layer in Megatron-Core
(megatron_easyep.analysis.rebalance), before the output is published.

--merge RULE folds every dropped expert into a kept one instead of dropping it (HC-SMoE / M-SMoE;
megatron_easyep.pruning.merge, docs/merging.md): RULE = ASSIGN-WEIGHTS[-aligned][-router-average],
ASSIGN `output` (C-Prune features, default SCORE_DIR/cprune_features.safetensors) or `router`, WEIGHTS
`frequency` or `score` (the --metric's scores); -router-average also averages the merged kept experts'
router rows (default: kept as they are). With --rebalance-bias, the bias is fitted on the merged model.

The library does the work (megatron_easyep.pruning.selection, .export, .preflight); this file only
parses arguments. Any problem with the request is reported on stderr with exit code 2, before
any output exists.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_easyep.analysis.rebalance import DEFAULT_ITERATIONS, DEFAULT_STEP, RebalanceRequest
from megatron_easyep.progress import Progress
from megatron_easyep.pruning.cprune import FEATURES_FILE, load_features
from megatron_easyep.pruning.export import MTP_ACTIONS, export_pruned
from megatron_easyep.pruning.merge import ASSIGNMENTS, WEIGHTINGS, MergeRule, plan_merge
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.preflight import format_preflight
from megatron_easyep.pruning.selection import GROUP_POLICIES, load_scores, select_for_checkpoint

USAGE_ERROR = 2


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _weights(text: str) -> list[float]:
    try:
        return [float(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"domain weights must be numbers, got {text!r}") from None


def _merge_rule(text: str) -> MergeRule:
    try:
        return MergeRule.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-checkpoint", required=True, help="source HF checkpoint directory (never modified)")
    parser.add_argument("--scores", required=True, help="score directory (scores.json + scores.safetensors)")
    parser.add_argument("--output", required=True, help="pruned checkpoint directory to create")
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep", type=int, help="experts kept per MoE layer (M)")
    keep.add_argument("--keep-ratio", type=float, help="fraction of experts kept per layer; M = round(R*E)")
    parser.add_argument("--metric", required=True,
                        help="a metric in the score file, 'reap' (mean g*||e|| over routed tokens, derived "
                             "from the file's sums), or 'random'")
    parser.add_argument("--domains", type=_csv, default=None, help="comma-separated domains to mix (default: all)")
    parser.add_argument("--domain-weights", type=_weights, default=None, help="comma-separated weight per domain")
    parser.add_argument("--group-policy", choices=GROUP_POLICIES, default=None,
                        help="equal-per-group (default) keeps M/n_group per routing group; "
                             "collapse keeps the global top-M and sets n_group=topk_group=1")
    parser.add_argument("--target-ep", type=int, default=None, help="require M divisible by this EP size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random metric")
    parser.add_argument("--mtp", choices=MTP_ACTIONS, default="prune",
                        help="prune the MTP layer with the same rule (default) or drop it")
    parser.add_argument("--allow-unexpected-tensors", action="store_true",
                        help="accept tensors the config does not describe (vendor extras; copied verbatim)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    merge = parser.add_argument_group("merging instead of dropping (off by default)")
    merge.add_argument("--merge", type=_merge_rule, default=None, metavar="RULE",
                       help=f"fold each dropped expert into the most similar kept one (same routing group under "
                            f"equal-per-group): ASSIGN-WEIGHTS[-aligned][-router-average] with ASSIGN in "
                            f"{list(ASSIGNMENTS)} (C-Prune output features / router rows), WEIGHTS in "
                            f"{list(WEIGHTINGS)} (routed frequency / the --metric's score); -aligned permutes "
                            f"neurons first (M-SMoE); -router-average gives each merged kept expert its "
                            f"cluster's weighted average router row (default: the router rows stay)")
    merge.add_argument("--cprune-features", default=None, metavar="FILE",
                       help=f"C-Prune features for --merge output-* (default: SCORE_DIR/{FEATURES_FILE})")
    rebalance = parser.add_argument_group("router bias rebalancing (off by default)")
    rebalance.add_argument("--rebalance-bias", action="store_true",
                           help="re-fit the kept experts' e_score_correction_bias on --demos with DeepSeek's "
                                "aux-loss-free rule (bias += step * sign(mean load - load)), layer by layer in "
                                "Megatron-Core on the pruned model's own hidden states; recorded in pruning.json")
    rebalance.add_argument("--demos", action="append", default=[], metavar="FILE[:DOMAIN]",
                           help="calibration demonstrations for --rebalance-bias (repeatable)")
    rebalance.add_argument("--rebalance-heldout", action="append", default=[], metavar="FILE[:DOMAIN]",
                           help="demonstrations whose per-expert loads are only measured, before and after "
                                "(recorded in pruning.json under rebalance_bias.heldout; repeatable)")
    rebalance.add_argument("--rebalance-steps", type=int, default=DEFAULT_ITERATIONS,
                           help=f"iterations of the rule per layer (default {DEFAULT_ITERATIONS})")
    rebalance.add_argument("--rebalance-step-size", type=float, default=DEFAULT_STEP,
                           help=f"bias change per iteration, in sigmoid-score units (default {DEFAULT_STEP})")
    rebalance.add_argument("--max-length", type=int, default=None,
                           help="keep each demonstration's first N tokens (default: all)")
    rebalance.add_argument("--expert-parallel", type=int, default=1,
                           help="EP of the fit's Megatron model (under torchrun; default 1)")
    rebalance.add_argument("--pipeline-parallel", type=int, default=1,
                           help="PP of the fit's Megatron model (under torchrun; default 1)")
    rebalance.add_argument("--pipeline-layout", default=None,
                           help="decoder layers per pipeline stage, e.g. 16,15,15,15 (default: even split)")
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class ExportProgress:
    """Bytes written of the total, one progress line (rank 0); the total comes with the first shard."""

    def __init__(self):
        self.bar: Progress | None = None

    def __call__(self, written: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress("export", total, unit="bytes")
        self.bar.update(written)
        if written >= total:  # before --rebalance-bias logs its own lines
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _features(args):
    """The C-Prune features memory map (--cprune-features, else the score directory's)."""
    path = Path(args.cprune_features) if args.cprune_features else Path(args.scores) / FEATURES_FILE
    if not path.is_file():
        raise ValueError(f"--merge {args.merge.label} needs C-Prune features: {path} does not exist (score with "
                         f"--cprune-features, or pass --cprune-features FILE)")
    return load_features(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.demos or args.rebalance_heldout) and not args.rebalance_bias:
        parser.error("--demos and --rebalance-heldout are only used by --rebalance-bias")
    if args.cprune_features and not args.merge:
        parser.error("--cprune-features is only used by --merge")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.rebalance_bias:
        parser.error("several ranks (torchrun) are only used by --rebalance-bias")
    rebalance = None
    try:
        if args.rebalance_bias:  # demonstrations are read and checked before anything is written
            rebalance = RebalanceRequest(tuple(args.demos), step=args.rebalance_step_size,
                                         iterations=args.rebalance_steps, max_length=args.max_length,
                                         heldout=tuple(args.rebalance_heldout),
                                         expert_parallel=args.expert_parallel,
                                         pipeline_parallel=args.pipeline_parallel,
                                         pipeline_layout=args.pipeline_layout).prepare(args.hf_checkpoint)
        if _rank() != 0:  # the other ranks of a multi-rank fit: rank 0 exports, all fit
            return 0 if rebalance.follow() else USAGE_ERROR
        scores = load_scores(args.scores)
        config = DeepseekV3Config.load(args.hf_checkpoint)
        selection = select_for_checkpoint(
            scores,
            config,
            keep=args.keep,
            keep_ratio=args.keep_ratio,
            metric=args.metric,
            domains=args.domains,
            domain_weights=args.domain_weights,
            group_policy=args.group_policy,
            target_ep=args.target_ep,
            seed=args.seed,
        )
        merge = None
        if args.merge is not None:
            merge = plan_merge(args.hf_checkpoint, selection, scores, args.merge,
                               features=_features(args) if args.merge.assign == "output" else None)
        progress = ExportProgress()
        report = export_pruned(
            args.hf_checkpoint,
            args.output,
            selection,
            mtp=args.mtp,
            overwrite=args.overwrite,
            allow_unexpected=args.allow_unexpected_tensors or None,
            log=lambda message: print(message, file=sys.stderr),
            finalize=rebalance.finalize if rebalance else None,
            progress=progress,
            merge=merge,
        )
        progress.close()
    except (ValueError, OSError) as err:  # CheckpointError, SelectionError, ExportError, RebalanceError, I/O
        print(f"export_pruned: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        if rebalance is not None and _rank() == 0:
            rebalance.abandon()  # other ranks waiting for a staged export stop (no-op once announced)
    print(
        f"wrote {report.path}: {report.num_tensors} tensors, {report.total_size / 2**20:.1f} MiB, "
        f"{selection.keep}/{selection.n_routed_experts} experts per layer "
        f"({selection.group_policy}, n_group={selection.n_group}, topk_group={selection.topk_group}), "
        f"{report.seconds:.1f} s"
    )
    print(format_preflight(report.preflight))
    if merge is not None:
        record = report.pruning["merge"]
        absorbed = sum(len(members) - 1 for by_kept in record["clusters"].values() for members in by_kept.values())
        print(f"merged ({record['rule']}): {absorbed} dropped experts folded into kept ones; max re-quantisation "
              f"error {record['max_requantization_error']:.3g} (relative Frobenius)")
    if rebalance:
        record = report.pruning["rebalance_bias"]
        for layer, row in record["per_layer"].items():
            line = (f"layer {layer}: max/mean expert load on the demonstrations "
                    f"{row['max_over_mean_before']:.3f} -> {row['max_over_mean_after']:.3f}")
            if "heldout" in record:
                held = record["heldout"]["per_layer"][layer]
                line += f", held out {held['max_over_mean_before']:.3f} -> {held['max_over_mean_after']:.3f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
