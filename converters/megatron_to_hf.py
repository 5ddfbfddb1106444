"""Megatron-Core GPTModel weights -> Hugging Face DeepseekV3ForCausalLM checkpoint.

    python converters/megatron_to_hf.py --megatron RUN/megatron --output DIR [--fp8]
        [--fp8-block-size ROWS COLS] [--dtype bfloat16|float32] [--num-shards N] [--overwrite]

--megatron is a directory written by `mcore.to_hf.save_megatron_state` (launch/train_tiny.py writes
one as RUN/megatron): model_state.pt (the GPTModel state dict, Megatron names, expert parallel 1),
config.json (the DeepSeek config that defines the architecture) and tokenizer.json. The weights go
back through the same name table the loader uses (megatron_easyep/mcore/mapping.py). Runs in one
process (expert parallel 1). Bad input: one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

USAGE_ERROR = 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron", required=True, help="Megatron state directory")
    parser.add_argument("--output", required=True, help="HF checkpoint directory to create")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="storage dtype of the non-FP8 tensors (expert bias is always fp32)")
    parser.add_argument("--fp8", action="store_true", help="DeepSeek block-wise FP8 + weight_scale_inv")
    parser.add_argument("--fp8-block-size", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        help="default: the config's quantization_config, else 128 128")
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from megatron_easyep.mcore.parallel import init_parallel
    from megatron_easyep.checkpoint.reader import CheckpointError
    from megatron_easyep.mcore.to_hf import HFWriteError, load_megatron_state, write_hf_checkpoint

    try:
        init_parallel(1)
        config, model, tokenizer_json = load_megatron_state(args.megatron)
        out = write_hf_checkpoint(model, config, args.output, dtype=args.dtype, fp8=args.fp8,
                                  weight_block_size=args.fp8_block_size, num_shards=args.num_shards,
                                  tokenizer_json=tokenizer_json, overwrite=args.overwrite)
    except (CheckpointError, HFWriteError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
