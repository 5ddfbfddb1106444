"""Prune routed experts of a DeepSeek-V3-class HF checkpoint using a score file.

    python converters/export_pruned.py --hf-checkpoint SRC --scores SCORE_DIR --output DST \
        --keep 128 --metric easyep [--domains math,code --domain-weights 1,2] \
        [--group-policy equal-per-group|collapse] [--target-ep 8] [--seed 0] \
        [--mtp prune|drop] [--allow-unexpected-tensors] [--overwrite]

The library does the work (megatron_easyep.pruning.selection, .export, .preflight); this file only
parses arguments. Any problem with the request is reported on stderr with exit code 2, before
any output exists.
"""

from __future__ import annotations

import argparse
import sys

from megatron_easyep.pruning.export import MTP_ACTIONS, export_pruned
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
        report = export_pruned(
            args.hf_checkpoint,
            args.output,
            selection,
            mtp=args.mtp,
            overwrite=args.overwrite,
            allow_unexpected=args.allow_unexpected_tensors or None,
            log=lambda message: print(message, file=sys.stderr),
        )
    except (ValueError, OSError) as err:  # CheckpointError, SelectionError, ExportError, I/O
        print(f"export_pruned: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(
        f"wrote {report.path}: {report.num_tensors} tensors, {report.total_size / 2**20:.1f} MiB, "
        f"{selection.keep}/{selection.n_routed_experts} experts per layer "
        f"({selection.group_policy}, n_group={selection.n_group}, topk_group={selection.topk_group}), "
        f"{report.seconds:.1f} s"
    )
    print(format_preflight(report.preflight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
