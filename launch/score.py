"""Score experts over demonstrations: torchrun --nproc-per-node N launch/score.py [options].

Options come from configs/score.yaml (or --config FILE), overridden by the command line.
Writes OUTPUT/scores.safetensors ({metric} and {metric}@{domain}, [moe_layers, experts]) and
OUTPUT/scores.json (provenance). A killed run continues with --resume.
"""

from __future__ import annotations

import argparse
import os

import _cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML defaults (default: configs/score.yaml)")
    parser.add_argument("--hf-checkpoint")
    parser.add_argument("--demos", action="append", help="FILE or FILE:DOMAIN (repeatable)")
    parser.add_argument("--output")
    parser.add_argument("--expert-parallel", type=int)
    parser.add_argument("--pipeline-parallel", type=int,
                        help="pipeline stages (must divide the number of ranks; EP groups stay inside a stage)")
    parser.add_argument("--pipeline-layout",
                        help="decoder layers per stage, e.g. 16,15,15,15 (default: even split, extra "
                             "layers on the leading stages)")
    parser.add_argument("--micro-batch-tokens", type=int,
                        help="pack several demos per forward, up to this many tokens including padding "
                             "(default: one demo per forward)")
    parser.add_argument("--micro-batches-per-step", type=int,
                        help="micro-batches per step (pipeline flush and --resume unit; default 2 x PP)")
    parser.add_argument("--dispatcher", choices=["allgather", "alltoall"])
    parser.add_argument("--max-demos", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cprune-features", action="store_true",
                        help="also write C-Prune expert features (cprune_features.safetensors)")
    parser.add_argument("--fp8", choices=["none", "auto", "emulated", "native", "te"],
                        help="FP8 calibration forward: emulated = DeepSeek's FP8 numerics (e4m3, "
                             "128x128 weight blocks, 1x128 dynamic activation groups) on any device; "
                             "native = the same numerics with real FP8 GEMMs (CUDA, FP8 checkpoint); "
                             "auto = native where supported (FP8 tensor cores, FP8-resident weights), "
                             "else emulated")
    parser.add_argument("--dequantize-at-load", action="store_true",
                        help="FP8 checkpoints: dequantise every FP8 weight at load instead of holding "
                             "the FP8 bytes (twice the weight memory; for comparison)")
    parser.add_argument("--check-finite", action="store_true",
                        help="check every MoE layer's forward for NaN/Inf and stop naming the layer and "
                             "expert (one host sync per layer and forward; the final scores are "
                             "always checked)")
    parser.add_argument("--dist-timeout", type=float,
                        help="seconds a collective waits for the other ranks before the run fails "
                             "(a dead or hung rank stops the others within this; default 300)")
    parser.add_argument("--telemetry-interval", type=float,
                        help="seconds between GPU memory/utilisation samples (GPUs only)")
    _cli.add_allow_unexpected(parser)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    values = _cli.load_yaml_defaults(args.config, _cli.REPO / "configs" / "score.yaml")
    for key, value in vars(args).items():
        if key != "config" and value is not None and value is not False:  # 0 is a value
            values[key] = value
    for required in ("hf_checkpoint", "output"):
        if not values.get(required):
            parser.error(f"--{required.replace('_', '-')} is required (or set it in the config)")
    if not values.get("demos"):
        parser.error("--demos is required (or set demos: in the config)")
    return values


def main(argv=None):
    from megatron_easyep.checkpoint import io
    from megatron_easyep.scoring.run import ScoreRun, run_scoring

    values = parse_args(argv)
    _cli.apply_allow_unexpected(values.pop("allow_unexpected_tensors", False))
    known = set(ScoreRun.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown config keys: {', '.join(unknown)}")
    run = ScoreRun(**values)
    if int(os.environ.get("RANK", "0")) != 0:
        run_scoring(run)  # rank 0 holds the output's lock for every rank (torchrun stops them if it cannot)
        return
    with io.output_lock(run.output, take_over_stale=run.resume,
                        stale_hint="the same command with --resume continues it and takes the lock over"):
        run_scoring(run)


if __name__ == "__main__":
    _cli.run_main(main, quiet="score")
