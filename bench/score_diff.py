"""How far two scoring runs of the same checkpoint move apart: scores and the selections made
from them (e.g. FP8-emulated calibration vs BF16, or bf16 vs fp32).

    python bench/score_diff.py --hf-checkpoint runs/trained/hf-fp8 runs/s_bf16 runs/s_fp8 \
        [--keep 4 6 8 12]

Per metric: the largest |a - b| / max|a| over layers, experts and domains. Per selection of the
comparison's grid (every metric x {each domain, mixed} x M, with launch/compare.py's group policy
per M): whether the kept sets are identical, and how many experts were swapped. Identical
selections mean identical pruned models, so their rows of the comparison table do not move.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-checkpoint", required=True, help="the checkpoint both runs scored")
    parser.add_argument("a", help="scores directory (the reference)")
    parser.add_argument("b", help="scores directory to compare with it")
    parser.add_argument("--keep", type=int, nargs="+", help="M grid (default: E/4, 3E/8, E/2, 3E/4)")
    args = parser.parse_args(argv)

    from megatron_easyep.pruning.selection import group_policy_for
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.scoring.metrics import METRICS
    from megatron_easyep.pruning.selection import check_model_identity, load_scores, select_experts

    config = DeepseekV3Config.load(args.hf_checkpoint)
    a, b = load_scores(args.a), load_scores(args.b)
    for run in (a, b):  # the same model in another storage format (BF16 copy vs FP8) is fine
        try:
            check_model_identity(str(run.directory), run.config_hash, run.architecture_hash,
                                 run.storage_format, config)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    domains = list(a.domains)
    if list(b.domains) != domains:
        raise SystemExit(f"error: the runs scored different domains: {domains} vs {list(b.domains)}")
    experts = config.n_routed_experts
    keeps = args.keep or sorted({experts // 4, 3 * experts // 8, experts // 2, 3 * experts // 4})

    print(f"{args.a} (a) vs {args.b} (b), {experts} experts, domains {domains}")
    print(f"{'metric':<18} {'max rel |a-b|':>14} {'selections identical':>21} {'experts swapped':>16}")
    for metric in METRICS:
        names = [f"{metric}@{d}" for d in domains]
        rel = max(((a.tensors[n] - b.tensors[n]).abs().max() / a.tensors[n].abs().max()).item()
                  for n in names)
        same = total = swapped = 0
        for keep in keeps:
            policy = group_policy_for(keep, config)
            for selected_on in [[d] for d in domains] + [None]:
                kw = dict(keep=keep, metric=metric, domains=selected_on, group_policy=policy,
                          n_group=config.n_group, topk_group=config.topk_group,
                          top_k=config.num_experts_per_tok)
                kept_a, kept_b = select_experts(a, **kw).kept, select_experts(b, **kw).kept
                moved = sum(len(set(kept_a[layer]) - set(kept_b[layer])) for layer in kept_a)
                total += 1
                same += moved == 0
                swapped += moved
        print(f"{metric:<18} {rel:>14.4f} {f'{same}/{total}':>21} {swapped:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
