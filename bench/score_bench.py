"""Forward pass with the scoring hooks vs the same forward without them, in one process.

    python bench/score_bench.py                      # `small` preset, 4 x 256 tokens, repeat 3
    python bench/score_bench.py --layers 2 --dtype bfloat16

Generates the `small` preset checkpoint (Moonlight-16B-A3B widths, 3 layers, 64 experts, top-6;
--layers overrides num_hidden_layers) into a temporary directory (or uses --checkpoint DIR), loads
it into Megatron-Core exactly as `launch/score.py` does (world of 1, EP = 1), and times a "pass"
= one forward per demonstration (batch 1, as run_scoring steps), with and without
compat.attach_moe_observers(model, ExpertScorer.observe) + ExpertScorer.begin_step, as
run_scoring wires them. Conditions alternate forward by forward (ABBA) so drift hits both; the
table reports median seconds per pass and the ratio (on CPU also the process's CPU time, which
other load on a shared machine does not inflate). Hook attach/detach is outside the timed region
(run_scoring attaches once per run). Also checks that the hooks leave the logits unchanged (bitwise on CPU).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_easyep.mcore import parallel # noqa: E402
from megatron_easyep.mcore import compat
from megatron_easyep.mcore import model as model_lib # noqa: E402
from megatron_easyep.scoring.scorer import ExpertScorer  # noqa: E402
from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (default: the preset's)")
    p.add_argument("--checkpoint", help="use this checkpoint instead of generating one")
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", choices=list(model_lib.DTYPES),
                   help="default: float32 on CPU, bfloat16 on GPU (as launch/score.py)")
    p.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    p.add_argument("--breakdown", action="store_true",
                   help="also time the hooks with a no-op observer (plumbing vs scorer math)")
    return p.parse_args(argv)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = model_lib.DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]

    with tempfile.TemporaryDirectory(prefix="score_bench_") as tmp:
        ckpt = args.checkpoint
        overrides = {}
        if ckpt is None:
            if args.layers:
                overrides["num_hidden_layers"] = args.layers
            t = time.perf_counter()
            ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", args.preset, num_shards=4, **overrides)
            print(f"generated {args.preset} {overrides or ''} in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr, flush=True)

        parallel.init_parallel(1)
        from megatron.core import parallel_state

        t = time.perf_counter()
        hf, model = model_lib.load_megatron_model(ckpt, dtype=dtype, dispatcher=args.dispatcher)
        model.eval()
        cfg = hf.config
        n_params = sum(p.numel() for p in model.parameters())
        print(f"loaded {n_params / 1e9:.2f} B params ({dtype}) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr, flush=True)

    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, cfg.vocab_size, (1, args.seq_len), generator=gen).to(device)
            for _ in range(args.num_seqs)]
    position_ids = torch.arange(args.seq_len, device=device).unsqueeze(0)
    token_domain = torch.zeros(args.seq_len, dtype=torch.long, device=device)
    moe_layers = [i for i, _ in compat.iter_moe_layers(model)]
    scorer = ExpertScorer(moe_layers, cfg.n_routed_experts, ["bench"],
                          ep_group=parallel_state.get_expert_model_parallel_group(), device=device)

    conditions = ["plain", "scoring"] + (["hooks only"] if args.breakdown else [])

    def one_forward(ids, condition: str):
        detach = None
        if condition == "scoring":
            detach = compat.attach_moe_observers(model, scorer.observe)
        elif condition == "hooks only":  # the observation plumbing with a no-op observer
            detach = compat.attach_moe_observers(model, lambda index, obs: None)
        try:
            _sync()
            t0, c0 = time.perf_counter(), time.process_time()
            if condition == "scoring":
                scorer.begin_step(token_domain)
            logits = model(ids, position_ids, None)
            _sync()
            return (time.perf_counter() - t0, time.process_time() - c0), logits
        finally:
            if detach:
                detach()

    # A pass = one forward per sequence. Conditions alternate forward by forward (the order
    # rotates), so load from elsewhere on the machine hits all alike; a pass's time is the sum of
    # its forwards. The hooks must not change the forward: on CPU the logits are bitwise equal; on
    # GPU some kernels (scatter-add in the MoE unpermute) are not deterministic, so the
    # hooked-vs-plain difference is reported next to the plain-vs-plain (run to run) difference.
    times = {c: [] for c in conditions}
    cpu_times = {c: [] for c in conditions}
    diff = {"scoring vs plain": 0.0, "plain vs plain": 0.0}
    previous_plain = {}
    with torch.no_grad():
        for r in range(args.warmup + args.repeat):
            took = {c: 0.0 for c in conditions}
            took_cpu = {c: 0.0 for c in conditions}
            for i, ids in enumerate(seqs):
                shift = (r * len(seqs) + i) % len(conditions)
                order = conditions[shift:] + conditions[:shift]
                logits = {}
                for condition in order:
                    (seconds, cpu_seconds), logits[condition] = one_forward(ids, condition)
                    took[condition] += seconds
                    took_cpu[condition] += cpu_seconds
                if not on_gpu:
                    for condition in conditions[1:]:
                        assert torch.equal(logits["plain"], logits[condition]), \
                            f"{condition}: the hooks changed the logits"
                diff["scoring vs plain"] = max(diff["scoring vs plain"],
                                               (logits["scoring"] - logits["plain"]).abs().max().item())
                if i in previous_plain:
                    diff["plain vs plain"] = max(diff["plain vs plain"],
                                                 (logits["plain"] - previous_plain[i]).abs().max().item())
                previous_plain[i] = logits["plain"]
            if r >= args.warmup:
                for condition in conditions:
                    times[condition].append(took[condition])
                    cpu_times[condition].append(took_cpu[condition])
            print(f"round {r}{' (warm-up)' if r < args.warmup else ''}: "
                  + ", ".join(f"{c} {took[c]:.3f} s" for c in conditions), file=sys.stderr, flush=True)

    assert scorer.sums[0, -1].sum().item() > 0, "the scorer saw no tokens"
    plain, hooked = statistics.median(times["plain"]), statistics.median(times["scoring"])
    tokens = args.num_seqs * args.seq_len
    where = torch.cuda.get_device_name() if on_gpu else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\nScoring overhead: `{' '.join(['python'] + sys.argv)}`\n")
    print(f"- model: preset `{args.preset}`{' ' + str(overrides) if overrides else ''}, "
          f"{n_params / 1e9:.2f} B params, {dtype}, {cfg.n_routed_experts} experts top-"
          f"{cfg.num_experts_per_tok}, {len(moe_layers)} MoE layers, dispatcher {args.dispatcher}")
    print(f"- work: {args.num_seqs} sequences x {args.seq_len} tokens, one forward each (batch 1); "
          f"warm-up {args.warmup}, repeat {args.repeat}, interleaved; {where}; torch {torch.__version__}\n")
    print("| condition | median s / pass | tokens/s | ratio to forward | all runs (s) |")
    print("|---|---:|---:|---:|---|")
    names = {"plain": "forward", "scoring": "forward + scoring hooks",
             "hooks only": "forward + hooks, no-op observer"}
    for condition in conditions:
        med = statistics.median(times[condition])
        print(f"| {names[condition]} | {med:.3f} | {tokens / med:.0f} | {med / plain:.3f}x | "
              f"{', '.join(f'{t:.3f}' for t in times[condition])} |")
    print(f"\n**ratio (scoring / forward): {hooked / plain:.3f}x** (wall clock; target <= 1.05x)")
    if not on_gpu:
        # CPU time of this process: robust to other load on a shared machine (wall time is not)
        cpu_plain = statistics.median(cpu_times["plain"])
        print("\n| condition | median CPU s / pass (this process) | ratio to forward |")
        print("|---|---:|---:|")
        for condition in conditions:
            med = statistics.median(cpu_times[condition])
            print(f"| {names[condition]} | {med:.3f} | {med / cpu_plain:.3f}x |")
    print(f"\nmax |logit difference|: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
