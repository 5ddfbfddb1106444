"""Train a small DeepSeek-V3-architecture MoE with Megatron-Core on offline text (CPU, minutes)
and write it as DeepseekV3 HF checkpoints (BF16, optionally FP8) plus a training report.

    python launch/train_tiny.py --output runs/trained --seed 0 --steps 900 --fp8
    python launch/train_tiny.py --output runs/trained --minutes 8 --fp8 --overwrite

Writes OUTPUT/{hf, hf-fp8, megatron, demos, corpus_manifest.json, report.json}; see
megatron_easyep/training/train.py. One process, expert parallel 1; torchrun is not needed.
"""

from __future__ import annotations

import argparse
import json

import _cli


def main(argv=None):
    from megatron_easyep.training.train import PRESETS, TrainConfig

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="run directory (created atomically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="model + training defaults (default: the ~8M-parameter model)")
    parser.add_argument("--seed", type=int, default=0,
                        help="fixes corpus split, math text, initialisation and batch order")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    length.add_argument("--minutes", type=float,
                        help="training time budget; the step count is fixed from the speed of the "
                             "first steps and written to the report (reproduce with --steps)")
    parser.add_argument("--fp8", action="store_true", help="also write an FP8 (e4m3, block-wise) checkpoint")
    parser.add_argument("--fp8-block-size", type=int, nargs=2, metavar=("ROWS", "COLS"))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--seq-aux-loss-coeff", type=float, default=1e-4,
                        help="sequence-wise balance loss weight (0 disables)")
    parser.add_argument("--bias-update-rate", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, help="held-out eval on a subset every N steps (0: off)")
    parser.add_argument("--max-bytes-per-domain", type=int, help="cap the text per domain (quick runs)")
    parser.add_argument("--man-pages", type=int, default=0,
                        help="also render up to N man pages into the prose domain (if man exists)")
    parser.add_argument("--no-transformers-check", action="store_true",
                        help="skip re-measuring held-out loss with stock transformers")
    parser.add_argument("--threads", type=int, help="torch threads (default: the preset's; "
                        "default preset: one per core)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from megatron_easyep.training.train import run_training

    report = run_training(TrainConfig(
        output=args.output, preset=args.preset, seed=args.seed, steps=args.steps,
        minutes=args.minutes, fp8=args.fp8,
        fp8_block_size=tuple(args.fp8_block_size) if args.fp8_block_size else None,
        batch_size=args.batch_size, seq_length=args.seq_length, lr=args.lr,
        warmup_steps=args.warmup_steps, seq_aux_loss_coeff=args.seq_aux_loss_coeff,
        bias_update_rate=args.bias_update_rate, eval_every=args.eval_every,
        max_bytes_per_domain=args.max_bytes_per_domain, man_pages=args.man_pages,
        check_transformers=not args.no_transformers_check, threads=args.threads,
        overwrite=args.overwrite))
    print(json.dumps({"heldout_final": report["heldout"]["final"],
                      "js_divergence_bits": {layer: v["js_divergence_bits"]
                                             for layer, v in report["routing"]["final"].items()},
                      "steps": report["steps"], "timings": report["timings"]}, indent=1))


def _main_with_clear_errors():
    import signal
    import sys

    # SIGTERM -> SystemExit, so the half-written temporary run directory is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except FileExistsError as exc:  # _cli.run_main covers the other input errors
        raise ValueError(str(exc)) from None


if __name__ == "__main__":
    _cli.run_main(_main_with_clear_errors, quiet="train_tiny")
