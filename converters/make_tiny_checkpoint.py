"""Write a small random DeepseekV3ForCausalLM checkpoint (HF layout, optional DeepSeek FP8).

    python converters/make_tiny_checkpoint.py --output DIR [--preset tiny|small] [--fp8] \
        [--seed 0] [--num-shards 3] [--set KEY=VALUE ...] [--overwrite]

--set takes a config.json key and a JSON value, e.g. --set q_lora_rank=null --set n_group=1
--set weight_block_size=[32,16]. The library does the work (megatron_easyep.checkpoint.tiny);
a bad request is reported on stderr with exit code 2 and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_easyep.checkpoint.reader import CheckpointError
from megatron_easyep.checkpoint.tiny import PRESETS, make_tiny_checkpoint

USAGE_ERROR = 2


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(
            f"--set {key}: value {value!r} is not JSON (strings need quotes, null for None)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--fp8", action="store_true", help="DeepSeek block-wise FP8 weights + *_scale_inv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=3)
    parser.add_argument("--device", default=None,
                        help="draw and quantise the weights here (cuda: fast at real widths; other values "
                             "than the CPU's for the same seed)")
    parser.add_argument(
        "--set", dest="overrides", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="config.json override, value parsed as JSON (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, _ in args.overrides:
        if key in ("fp8", "seed", "num_shards", "overwrite", "preset", "out_dir", "output", "device"):
            parser.error(f"--set {key}: not a config.json key; use the command-line option instead")
    try:
        path = make_tiny_checkpoint(
            args.output,
            args.preset,
            fp8=args.fp8,
            seed=args.seed,
            num_shards=args.num_shards,
            overwrite=args.overwrite,
            device=args.device,
            **dict(args.overrides),
        )
    except (CheckpointError, ValueError, FileExistsError) as exc:
        print(f"make_tiny_checkpoint: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
