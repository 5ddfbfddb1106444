"""Write the dequantised BF16 copy of a DeepSeek FP8 checkpoint (for GPUs without FP8: A100/A800).

    python converters/fp8_to_bf16.py --hf-checkpoint FP8_DIR --output BF16_DIR \
        [--allow-unexpected-tensors] [--overwrite]

Streams shard by shard (one tensor in memory), drops the *_scale_inv tensors and
quantization_config, and appears atomically. Scores made on the copy prune the FP8 original
(converters/export_pruned.py accepts scores from another storage format of the same architecture).
The library does the work (megatron_easyep.checkpoint.to_bf16); a bad request is reported on
stderr with exit code 2 and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from megatron_easyep.checkpoint.to_bf16 import convert_fp8_to_bf16

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-checkpoint", required=True, help="FP8 HF checkpoint directory (never modified)")
    parser.add_argument("--output", required=True, help="BF16 checkpoint directory to create")
    parser.add_argument("--allow-unexpected-tensors", action="store_true",
                        help="accept tensors the config does not describe (vendor extras; copied verbatim)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert_fp8_to_bf16(args.hf_checkpoint, args.output, overwrite=args.overwrite,
                                     allow_unexpected=args.allow_unexpected_tensors or None,
                                     log=lambda message: print(message, file=sys.stderr))
    except (ValueError, OSError) as err:  # CheckpointError, FileExistsError, I/O
        print(f"fp8_to_bf16: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {report.path}: {report.dequantized} FP8 weights dequantised to BF16, {report.copied} tensors "
          f"copied, {report.total_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
