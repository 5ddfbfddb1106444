"""Teacher-forced evaluation of the Megatron model: torchrun --nproc-per-node N launch/evaluate.py
--hf-checkpoint DIR --demos FILE.jsonl [--demos ...] [--expert-parallel N]
[--dispatcher allgather|alltoall] [--dtype float32|bfloat16] [--dump-logits FILE]
[--json FILE] [--baseline FILE]

Prints per-domain mean NLL and perplexity; --dump-logits writes fp32 logits, one tensor demo_{i}
[T, vocab] per demonstration in input order (safetensors). --json saves the table; --baseline
(an earlier --json, e.g. of the full model) adds its perplexity and the change per domain.
"""

from __future__ import annotations

import argparse

import _cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-checkpoint", required=True)
    parser.add_argument("--demos", action="append", required=True,
                        help="FILE or FILE:DOMAIN (repeatable)")
    parser.add_argument("--expert-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1,
                        help="pipeline stages (must divide the number of ranks)")
    parser.add_argument("--pipeline-layout", help="decoder layers per stage, e.g. 16,15,15,15")
    parser.add_argument("--dispatcher", choices=["allgather", "alltoall"], default="alltoall")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, the checkpoint's dtype on GPU")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--dump-logits", metavar="FILE")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write the per-domain results here")
    parser.add_argument("--baseline", metavar="FILE",
                        help="an earlier --json (e.g. the full model): print its ppl and the change")
    _cli.add_allow_unexpected(parser)
    args = parser.parse_args(argv)
    _cli.apply_allow_unexpected(args.allow_unexpected_tensors)
    del args.allow_unexpected_tensors

    from megatron_easyep.analysis.evaluation import EvalRun, run_evaluation

    run_evaluation(EvalRun(**vars(args)))


if __name__ == "__main__":
    _cli.run_main(main, quiet="evaluate")
