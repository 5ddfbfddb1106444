"""Routing drift of a pruned checkpoint: torchrun --nproc-per-node N launch/routing_drift.py
--hf-checkpoint SRC --pruned DST --demos FILE[:DOMAIN] [--demos ...] [--expert-parallel N]
[--dispatcher allgather|alltoall] [--output FILE] [--max-length N] [--dtype ...]

Runs the ORIGINAL model over the demos and, per MoE layer, compares the original routing with the
pruned checkpoint's routing (kept experts only, the pruned config's groups) on the same hidden
states. Prints a table and writes DST/routing_drift.json (or --output): per HF layer the token
count, agree_fraction (original top-k restricted to kept experts is inside the pruned top-k),
kept_gate_mass (share of the original combine weight carried by kept experts), and their means.
A plain `python launch/routing_drift.py ...` runs a world of one.
"""

from __future__ import annotations

import argparse

import _cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-checkpoint", required=True, help="the ORIGINAL (source) checkpoint")
    parser.add_argument("--pruned", required=True,
                        help="the pruned export (reads its pruning.json and config.json)")
    parser.add_argument("--demos", action="append", required=True,
                        help="FILE or FILE:DOMAIN (repeatable); held-out demonstrations")
    parser.add_argument("--expert-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1,
                        help="pipeline stages (must divide the number of ranks)")
    parser.add_argument("--pipeline-layout", help="decoder layers per stage, e.g. 16,15,15,15")
    parser.add_argument("--dispatcher", choices=["allgather", "alltoall"], default="alltoall")
    parser.add_argument("--output", metavar="FILE", help="default: PRUNED/routing_drift.json")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (routing itself is fp32); default: float32 on CPU, "
                             "the checkpoint's dtype on GPU")
    parser.add_argument("--seed", type=int, default=1234)
    _cli.add_allow_unexpected(parser)
    args = parser.parse_args(argv)
    _cli.apply_allow_unexpected(args.allow_unexpected_tensors)
    del args.allow_unexpected_tensors
    if args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be >= 1")

    from megatron_easyep.analysis.routing_drift import run_drift

    run_drift(args.hf_checkpoint, args.pruned, args.demos, expert_parallel=args.expert_parallel,
              pipeline_parallel=args.pipeline_parallel, pipeline_layout=args.pipeline_layout,
              dispatcher=args.dispatcher, output=args.output, max_length=args.max_length,
              dtype=args.dtype, seed=args.seed)


if __name__ == "__main__":
    _cli.run_main(main, quiet="routing_drift")
