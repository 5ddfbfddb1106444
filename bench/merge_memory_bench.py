"""Peak memory of the merged export (--merge) against the plain pruned export, `small` preset.

    python bench/merge_memory_bench.py [--fp8] [--keep-ratio 0.5] [--workdir DIR]

In one run: writes a `small` checkpoint (Moonlight widths, 3 layers, 64 experts of 1408 x 2048),
a random score file (easyep + frequency rows) and random C-Prune features, then runs, each in a
fresh subprocess whose peak RSS is read with getrusage (bench/export_bench.py's runner):
- the plain export (export_pruned);
- the merged export with `output-frequency` and with `router-score-aligned` (plan_merge, then
  export_pruned(merge=...)).
The budget is the exporter's (largest source shard + 512 MiB) plus one cluster in fp32 (the
largest cluster's members x gate/up/down x 4 bytes). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import MIB, run_measuring_rss  # noqa: E402

from megatron_easyep.checkpoint.io import write_score_file  # noqa: E402
from megatron_easyep.checkpoint.reader import DeepseekV3Config, HFCheckpoint  # noqa: E402
from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402

CHILD = """
import json, sys
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.cprune import load_features
from megatron_easyep.pruning.export import export_pruned
from megatron_easyep.pruning.merge import plan_merge
from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint
src, scores_dir, dst, keep_ratio, rule = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
scores = load_scores(scores_dir)
selection = select_for_checkpoint(scores, DeepseekV3Config.load(src), keep_ratio=keep_ratio, metric="easyep")
plan = None
if rule != "none":
    plan = plan_merge(src, selection, scores, rule, features=load_features(scores_dir))
report = export_pruned(src, dst, selection, merge=plan)
largest = max((len(m) for by_kept in (plan.clusters.values() if plan else []) for m in by_kept.values()), default=0)
print(json.dumps({"seconds": report.seconds, "largest_cluster": largest}))
"""
IMPORT_ONLY = CHILD.split("src, scores_dir")[0]  # the same imports, no work
RULES = ("none", "output-frequency", "router-score-aligned")
DEMOS = 8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp8", action="store_true", help="FP8 source (block-wise e4m3 + scales)")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--workdir", default=None, help="where to build the temporary directory")
    parser.add_argument("--preset", default="small", help="checkpoint preset (tiny: a seconds-long smoke run)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="merge_bench_", dir=args.workdir) as tmp:
        root = Path(tmp)
        src = make_tiny_checkpoint(root / "src", args.preset, fp8=args.fp8)
        config = DeepseekV3Config.load(src)
        layers = config.moe_layer_ids
        g = torch.Generator().manual_seed(0)
        rows = {m: torch.rand(len(layers), config.n_routed_experts, generator=g, dtype=torch.float64)
                for m in ("easyep", "frequency")}
        scores = write_score_file(root / "scores", rows, layers, config.config_hash, [])
        features = torch.randn(len(layers), config.n_routed_experts, DEMOS, config.hidden_size, generator=g)
        save_file({"features": features}, str(scores / "cprune_features.safetensors"))
        shard_sizes = [(src / s).stat().st_size for s in sorted(set(HFCheckpoint(src).weight_map.values()))]
        expert_fp32 = 3 * config.moe_intermediate_size * config.hidden_size * 4

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        _, import_rss = run_measuring_rss([sys.executable, "-c", IMPORT_ONLY], env)
        results = {}
        for rule in RULES:
            started = time.perf_counter()
            output, rss = run_measuring_rss(
                [sys.executable, "-c", CHILD, str(src), str(scores), str(root / f"out-{rule}"), str(args.keep_ratio),
                 rule], env)
            result = json.loads(output.splitlines()[-1])
            results[rule] = dict(result, rss=rss, wall=time.perf_counter() - started)

    budget = max(shard_sizes) + 512 * MIB
    print(f"## peak RSS of export_pruned with and without --merge, `{args.preset}` preset "
          f"({'fp8' if args.fp8 else 'bf16'}), keep ratio {args.keep_ratio}\n")
    print(f"source {sum(shard_sizes) / MIB:.0f} MiB (largest shard {max(shard_sizes) / MIB:.0f} MiB); one expert in "
          f"fp32 = {expert_fp32 / MIB:.1f} MiB\n")
    print(f"peak RSS of a subprocess that only does the same imports (python, torch, scipy, sklearn): "
          f"{import_rss / MIB:.0f} MiB; the budget applies to the peak above it\n")
    print("| export | peak RSS | above the imports | budget (shard + 512 MiB + one cluster fp32) | largest cluster "
          "| export s |")
    print("|---|---|---|---|---|---|")
    for rule, r in results.items():
        cluster = r["largest_cluster"] * expert_fp32
        limit, above = budget + cluster, r["rss"] - import_rss
        print(f"| {'plain' if rule == 'none' else '--merge ' + rule} | {r['rss'] / MIB:.0f} MiB | "
              f"{above / MIB:.0f} MiB | {limit / MIB:.0f} MiB {'(met)' if above <= limit else '(MISSED)'} | "
              f"{r['largest_cluster']} experts ({cluster / MIB:.0f} MiB) | {r['seconds']:.1f} |")
    plain = results["none"]["rss"]
    for rule in RULES[1:]:
        print(f"\n--merge {rule}: {(results[rule]['rss'] - plain) / MIB:+.0f} MiB over the plain export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
