"""Plan GPUs for scoring and serving a DeepSeek-V3-class checkpoint, from its config.json alone.

    python converters/plan.py (--hf-checkpoint DIR | --config config.json) \
        --gpus-per-node 8 --gpu-memory-gib 80 [--keep 192 128 ...] [--dtype bf16|fp8] \
        [--max-length 4096] [--overhead-gib 3] [--serve-kv-tokens 65536] [--json FILE]

Prints the parameter and byte counts per component, (a) the expert-parallel layouts that fit the
full model for scoring with megatron-easyep (TP=1, PP=1, EP any divisor; PP>1 shown but not
supported), and (b) for each kept-expert count M the smallest GPU count that serves the pruned
model with FP8 weights. --dtype is the weight dtype in memory while scoring: bf16 is what the
loader does today (FP8 checkpoints are dequantised); fp8 assumes weights kept in FP8 (the
Transformer Engine path). No tensor is read. A bad request exits with code 2.
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
    parser.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16",
                        help="weights in memory while scoring (default bf16, what the loader does)")
    parser.add_argument("--max-length", type=int, default=4096,
                        help="tokens of the longest scored sequence (activation estimate)")
    parser.add_argument("--overhead-gib", type=float, default=3.0,
                        help="fixed per-rank overhead while scoring: CUDA context, NCCL, allocator")
    parser.add_argument("--serve-kv-tokens", type=int, default=plan.ServeAssumptions.kv_tokens,
                        help="KV-cache tokens reserved per GPU when serving")
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
            overhead_gib=args.overhead_gib,
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
