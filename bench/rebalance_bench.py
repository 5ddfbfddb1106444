"""Router-bias rebalancing after pruning: held-out quality and load balance with and without it.

    python bench/rebalance_bench.py --hf-checkpoint models/demo-moe/hf-fp8 \
        --scores runs/demo/scores --domain math \
        --calib models/demo-moe/demos/math_calib.jsonl --heldout models/demo-moe/demos/math_heldout.jsonl \
        --keep 4 6 8 --output runs/rebalance

For each M: the easyep selection on the domain, exported plain and with --rebalance-bias (fitted on
the calibration demos, loads also measured on the held-out ones), then both evaluated in Megatron
against the full model on the held-out text: KL(full || pruned), top-1 agreement and perplexity
(analysis/measures.py, the comparison's own measures). Load balance is max/mean tokens per kept
expert per layer on the held-out tokens, from the rebalanced export's pruning.json (its "before"
is the plain export's routing, the same selection). Prints a markdown table; --json keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--scores", required=True, help="a scoring run of this checkpoint with the domain")
    p.add_argument("--domain", required=True)
    p.add_argument("--calib", required=True, help="calibration demos the bias is fitted on")
    p.add_argument("--heldout", required=True, help="held-out demos of the domain")
    p.add_argument("--keep", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--group-policy", default="collapse", help="as the demo (M = 4, 6 are not routable per group)")
    p.add_argument("--output", required=True)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    from megatron_easyep.analysis.measures import forward_batched, measure, reference_of
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.mcore import parallel
    from megatron_easyep.scoring import demos as demos_lib

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    parallel.init_parallel(1, seed=0)
    cfg, full = model_lib.load_megatron_model(args.hf_checkpoint, dtype=torch.float32)
    seqs = [list(d.input_ids) for d in demos_lib.load_demos([f"{args.heldout}:{args.domain}"], args.hf_checkpoint,
                                                            vocab_size=cfg.config.vocab_size, max_length=None)
            if len(d.input_ids) >= 2]
    with torch.no_grad():
        ref = reference_of(seqs, forward_batched(full, seqs, 16))
    del full
    rows = []
    for keep in args.keep:
        for variant in ("plain", "rebalanced"):
            dst = out / f"{variant}_M{keep}"
            cmd = [sys.executable, str(REPO / "converters" / "export_pruned.py"), "--hf-checkpoint",
                   args.hf_checkpoint, "--scores", args.scores, "--output", str(dst), "--keep", str(keep),
                   "--metric", "easyep", "--domains", args.domain, "--overwrite",
                   "--group-policy", args.group_policy]
            if variant == "rebalanced":
                cmd += ["--rebalance-bias", "--demos", f"{args.calib}:{args.domain}",
                        "--rebalance-heldout", f"{args.heldout}:{args.domain}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"export failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
            _, model = model_lib.load_megatron_model(str(dst), dtype=torch.float32)
            with torch.no_grad():
                result = measure(ref, forward_batched(model, seqs, 16))
            del model
            rows.append({"keep": keep, "variant": variant, **result,
                         "pruning": json.loads((dst / "pruning.json").read_text())})
    print(f"{args.domain} held-out: {ref.tokens} tokens, full ppl {rows[0]['ppl_full']:.3f}")
    print("| M | router bias | KL(full ‖ pruned) | top-1 | ppl | held-out max/mean load per layer |")
    print("|---:|---|---:|---:|---:|---|")
    for r in rows:
        rebalanced = [x for x in rows if x["keep"] == r["keep"] and x["variant"] == "rebalanced"][0]
        held = rebalanced["pruning"]["rebalance_bias"]["heldout"]["per_layer"]
        key = "max_over_mean_after" if r["variant"] == "rebalanced" else "max_over_mean_before"
        loads = ", ".join(f"{held[layer][key]:.2f}" for layer in sorted(held, key=int))
        print(f"| {r['keep']} | {r['variant']} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['ppl']:.3f} | {loads} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "pruning"} for r in rows],
                                              indent=1) + "\n")
    parallel.shutdown()


if __name__ == "__main__":
    main()
