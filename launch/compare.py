"""Compare every expert-selection criterion on one checkpoint (one process, world of 1).

    python launch/compare.py --hf-checkpoint runs/trained/hf \
        --demos runs/trained/demos/code_calib.jsonl:code --demos ...:prose --demos ...:math \
        --heldout runs/trained/demos/code_heldout.jsonl:code --heldout ... \
        --keep 4 8 12 --random-seeds 3 --seed 0 --output runs/compare

Scores the calibration demonstrations once (with C-Prune features), then for every M, criterion
(easyep, easyep_no_token, easyep_no_norm, gate, frequency, random x seeds, cprune; with --merge, also
easyep's and reap's kept sets merged by each rule) and selection
domain (each domain, and mixed) exports a pruned checkpoint into a temporary directory, loads it
in Megatron and measures KL(full || pruned), top-1 agreement and perplexity on the held-out text
of every domain. Writes results.csv, table.md, plots (PNG) and summary.json into --output; see
megatron_easyep/analysis/compare.py for every convention. Progress goes to stderr.

    python launch/compare.py --rerender DIR

rewrites DIR/table.md and the plots from a finished comparison's files, computing nothing.

    python launch/compare.py --across runs/compare_seed0 runs/compare_seed1 runs/compare_seed2 \
        --output docs/compare/aggregate

aggregates finished comparisons of independently trained models (same grid): every number as the
mean over models [min, max], every comparison between criteria as a count of models
(megatron_easyep/analysis/across_models.py). Writes table.md, aggregate.csv, wins.csv,
results_all.csv and quality_vs_m.png into --output.
"""

from __future__ import annotations

import argparse

import _cli


def parse_args(argv=None):
    from megatron_easyep.analysis.compare import CRITERIA

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rerender", metavar="DIR",
                        help="only rewrite table.md and the plots of a finished comparison in DIR")
    parser.add_argument("--across", nargs="+", metavar="DIR",
                        help="aggregate finished comparisons of several trained models into --output")
    parser.add_argument("--hf-checkpoint")
    parser.add_argument("--demos", action="append",
                        help="calibration FILE:DOMAIN (repeatable; scored once, all of them)")
    parser.add_argument("--heldout", action="append", help="held-out FILE:DOMAIN (repeatable)")
    parser.add_argument("--output")
    parser.add_argument("--keep", type=int, nargs="+", help="the M grid")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--merge", nargs="+", default=[], metavar="RULE",
                        help="also evaluate the --merge-of kept sets with the dropped experts merged into the "
                             "kept ones, one row per rule (export.py --merge; e.g. output-frequency, "
                             "router-score-aligned)")
    parser.add_argument("--merge-of", nargs="+", default=["easyep", "reap"], metavar="CRITERION",
                        help="the criteria whose kept sets get merged rows (default: easyep reap)")
    parser.add_argument("--random-seeds", type=int, default=3, help="random selections per M")
    parser.add_argument("--seed", type=int, default=0,
                        help="scoring seed; random uses seeds SEED..SEED+random_seeds-1")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--heldout-per-domain", type=int,
                        help="first N held-out sequences of each domain (default: all)")
    parser.add_argument("--demo-counts", type=int, nargs="+",
                        help="demonstration counts for the overlap analysis (default 1, 2, 4, ...)")
    parser.add_argument("--overlap-keep", type=int,
                        help="M of the overlap analyses and the heatmap marks (default E/2)")
    parser.add_argument("--batch-size", type=int, default=8, help="held-out sequences per forward")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, the checkpoint's dtype on GPU")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output: pruned models already evaluated "
                             "with the same checkpoint and held-out text are not evaluated again")
    args = parser.parse_args(argv)
    if args.across is not None and args.output is None:
        parser.error("--across needs --output")
    if args.rerender is None and args.across is None:
        missing = [flag for flag in ("hf_checkpoint", "demos", "heldout", "output", "keep")
                   if getattr(args, flag) is None]
        if missing:
            parser.error("the following arguments are required: "
                         + ", ".join("--" + m.replace("_", "-") for m in missing))
    return args


def main(argv=None):
    from megatron_easyep.analysis.compare import CompareRun, rerender, run_compare

    args = parse_args(argv)
    if args.rerender is not None:
        rerender(args.rerender)
        return
    if args.across is not None:
        from megatron_easyep.analysis.across_models import aggregate_runs

        print(aggregate_runs(args.across, args.output) / "table.md")
        return
    run_compare(CompareRun(
        hf_checkpoint=args.hf_checkpoint, demos=args.demos, heldout=args.heldout, output=args.output,
        keeps=args.keep, criteria=args.criteria, random_seeds=args.random_seeds, seed=args.seed,
        max_length=args.max_length, heldout_per_domain=args.heldout_per_domain,
        demo_counts=args.demo_counts, overlap_keep=args.overlap_keep,
        batch_size=args.batch_size, dtype=args.dtype, threads=args.threads, overwrite=args.overwrite,
        resume=args.resume, merges=args.merge, merge_of=args.merge_of))


if __name__ == "__main__":
    _cli.run_main(main, quiet="compare")
