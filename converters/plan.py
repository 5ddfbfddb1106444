"""Plan GPUs for scoring and serving a DeepSeek-V3-class checkpoint, from its config.json alone.

    python converters/plan.py (--hf-checkpoint DIR | --config config.json) \
        --gpus-per-node 8 --gpu-memory-gib 80 [--keep 192 128 ...] [--dtype bf16|fp8] \
        [--max-length 4096] [--imbalance 2] [--max-pp 16] [--overhead-gib 3] \
        [--serve-kv-tokens 65536] [--json FILE]

Prints the parameter and byte counts per component, (a) the PP x EP layouts that fit the full
model for scoring with megatron-easyep (TP=1; per-stage memory with uneven stages, no lm_head or
logits) with the exact torchrun line, and (b) for each kept-expert count M the smallest GPU count
that serves the pruned model with FP8 weights. --dtype is the weight dtype in memory while
scoring; by default as the loader holds them: FP8-resident for an FP8 checkpoint (fp8), bf16
otherwise; bf16 for an FP8 checkpoint means --dequantize-at-load. --json writes the plan,
including "recommended" {pp, ep, gpus, nodes, stage_layers}, which the SLURM templates read.
No tensor is read. A bad request exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_easyep.mcore import plan
from megatron_easyep.checkpoint.reader import CheckpointError, DeepseekV3Config

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-checkpoint", help="checkpoint directory (its config.json is read)")
    source.add_argument("--config", help="a config.json file")
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU, GiB")
    parser.add_argument("--keep", type=int, nargs="+", default=None,
                        help="kept experts per layer to plan serving for (default: E, 3E/4, E/2, "
                             "3E/8, E/4, E/8)")
    parser.add_argument("--dtype", choices=["bf16", "fp8"], default=None,
                        help="weights in memory while scoring (default: as the loader holds them, "
                             "fp8 = FP8-resident for an FP8 checkpoint, else bf16)")
    parser.add_argument("--max-length", type=int, default=4096,
                        help="tokens of the longest scored sequence / micro-batch (activation estimate)")
    parser.add_argument("--imbalance", type=float, default=2.0,
                        help="routing imbalance: the busiest rank's routed rows over its fair share")
    parser.add_argument("--max-pp", type=int, default=16, help="largest pipeline size to consider")
    parser.add_argument("--checkpoint-path", default=None,
                        help="checkpoint path to print in the torchrun line (default: --hf-checkpoint or CKPT)")
    parser.add_argument("--demos", action="append", metavar="FILE[:DOMAIN]",
                        help="demonstrations for the printed launch line (repeatable; default a placeholder)")
    parser.add_argument("--output", help="score directory for the printed launch line (default a placeholder)")
    parser.add_argument("--overhead-gib", type=float, default=3.0,
                        help="fixed per-rank overhead while scoring: CUDA context, NCCL, allocator")
    parser.add_argument("--serve-kv-tokens", type=int, default=plan.ServeAssumptions.kv_tokens,
                        help="KV-cache tokens reserved per GPU when serving")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks of an allocation: also print (and put in the JSON as \"for_world\") the best "
                             "layout whose GPU count divides it, the other ranks being data-parallel replicas")
    parser.add_argument("--json", dest="json_path", help="also write the plan as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        if not args.gpu_memory_gib > 0:
            raise ValueError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}")
        if args.max_length < 1 or args.serve_kv_tokens < 0 or args.overhead_gib < 0:
            raise ValueError("--max-length must be >= 1; --serve-kv-tokens, --overhead-gib >= 0")
        if args.world_size is not None and args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        if not args.imbalance >= 1 or args.max_pp < 1:
            raise ValueError("--imbalance must be >= 1 and --max-pp >= 1")
        if args.config:
            path = Path(args.config)
            if not path.is_file():
                raise CheckpointError(f"{path} does not exist")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
            cfg = DeepseekV3Config.from_dict(data, source=str(path))
        else:
            cfg = DeepseekV3Config.load(args.hf_checkpoint)
        for kept in args.keep or []:
            if not 1 <= kept <= cfg.n_routed_experts:
                raise ValueError(f"--keep {kept}: must be between 1 and n_routed_experts "
                                 f"{cfg.n_routed_experts}")
        report = plan.build_report(
            cfg, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
            keeps=args.keep, dtype=args.dtype, tokens=args.max_length,
            overhead_gib=args.overhead_gib, imbalance=args.imbalance, max_pp=args.max_pp,
            checkpoint=args.checkpoint_path or args.hf_checkpoint or "CKPT", demos=args.demos,
            output=args.output, world_size=args.world_size,
            serve=plan.ServeAssumptions(kv_tokens=args.serve_kv_tokens))
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"plan: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(plan.format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(plan.report_as_json(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
