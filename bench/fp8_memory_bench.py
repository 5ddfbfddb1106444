"""Per-rank memory, load time and scoring throughput of FP8-resident weights vs dequantise-at-load,
at DeepSeek-V3's real widths, with 2 CPU ranks and expert parallel 2.

    python bench/fp8_memory_bench.py --workdir /tmp/v3w                     # 256 experts, resident
    python bench/fp8_memory_bench.py --workdir /tmp/v3w --experts 64 --modes resident,dequantized

Generates (once, into --workdir) the `v3-width` preset in FP8 (hidden 7168, 128 MLA heads, q_lora
1536, kv_lora 512, experts of 2048 in 8 groups, one shared expert, dense 18432, yarn x40, 128 x 128
blocks; one dense + one MoE layer; --experts overrides n_routed_experts, 256 = the real model's).
Then, per mode, two torchrun ranks load it exactly as launch/score.py does (bf16 compute) and score
--num-seqs demonstrations of --seq-len tokens with the scorer attached. Each rank reports:
- the FP8 bytes it owns (codes + scales of the FP8 tensors it read) and all checkpoint bytes read;
- peak anonymous memory (RssAnon, sampled every 20 ms from /proc/self/status) after the imports,
  after loading, and over the scoring forwards;
- load seconds and scored tokens per second (after one warm-up forward).
The dequantise-at-load arm at 256 experts needs ~12.5 GB per rank and does not fit two ranks on a
24 GiB machine: compare the modes at --experts 64.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1024 ** 3


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Max RssAnon of this process while running (a background thread, 20 ms period)."""

    def __init__(self):
        self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_anon())

    def reset(self) -> None:
        self.peak = _rss_anon()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon())


def worker(mode: str, ckpt_dir: str, out_path: str, num_seqs: int, seq_len: int) -> None:
    sampler = PeakSampler()
    import torch
    import torch.distributed as dist

    from megatron.core import parallel_state

    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.mcore import compat, parallel
    from megatron_easyep.scoring.scorer import ExpertScorer

    torch.set_num_threads(1)
    layout = parallel.init_parallel(2, seed=0)
    after_imports = _rss_anon()
    sampler.reset()
    t0 = time.perf_counter()
    ckpt, model = model_lib.load_megatron_model(ckpt_dir, dtype=torch.bfloat16, expert_parallel=2,
                                                dequantize_at_load=mode == "dequantized")
    load_s = time.perf_counter() - t0
    peak_load = sampler.peak
    fp8_bytes = 0
    for name in set(ckpt.read_names):
        dtype, shape = ckpt.tensor_info(name)
        scale = name.endswith("_scale_inv")
        if dtype == "F8_E4M3" or scale:
            numel = 1
            for d in shape:
                numel *= d
            fp8_bytes += numel * (4 if scale else 1)
    layers = [i for i, _ in compat.iter_moe_layers(model)]
    scorer = ExpertScorer(layers, ckpt.config.n_routed_experts, ["all"],
                          ep_group=parallel_state.get_expert_model_parallel_group())
    detach = compat.attach_moe_observers(model, scorer.observe)
    gen = torch.Generator().manual_seed(layout.rank)
    seqs = [torch.randint(0, ckpt.config.vocab_size, (seq_len,), generator=gen).tolist() for _ in range(num_seqs + 1)]
    sampler.reset()
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            if i == 1:
                dist.barrier()
                t1 = time.perf_counter()
            scorer.begin_step(torch.zeros(len(ids), dtype=torch.long))
            model_lib.forward_padded(model, ids, len(ids))
    dist.barrier()
    score_s = time.perf_counter() - t1
    detach()
    peak_run = sampler.stop()
    result = {"rank": layout.rank, "mode": mode, "fp8_bytes_owned": fp8_bytes, "bytes_read": ckpt.bytes_read,
              "rss_anon_after_imports": after_imports, "peak_rss_anon_load": peak_load,
              "peak_rss_anon_scoring": peak_run, "load_s": load_s,
              "tokens_per_s": num_seqs * seq_len / score_s, "scored_tokens": num_seqs * seq_len}
    Path(f"{out_path}.rank{layout.rank}").write_text(json.dumps(result))
    parallel.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where the generated checkpoint is kept (reused); required")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--modes", default="resident", help="comma list of resident, dequantized")
    p.add_argument("--num-seqs", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", help="write the per-rank results here")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.num_seqs, args.seq_len)
        return
    if not args.workdir:
        p.error("--workdir is required")

    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

    ckpt = Path(args.workdir) / f"v3-width-E{args.experts}-fp8"
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        print(f"generating {ckpt} ...", file=sys.stderr, flush=True)
        make_tiny_checkpoint(ckpt, "v3-width", fp8=True, num_shards=4, n_routed_experts=args.experts)
        print(f"generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    results = []
    for mode in args.modes.split(","):
        out = Path(args.workdir) / f"bench-{mode}-E{args.experts}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               __file__, "--worker", mode, str(ckpt), str(out), "--num-seqs", str(args.num_seqs),
               "--seq-len", str(args.seq_len)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"{mode}: worker failed\n{proc.stderr[-3000:]}")
        results += [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    print(f"checkpoint {ckpt}: {size / GIB:.2f} GiB on disk, {args.experts} experts, EP=2, bf16 compute, "
          f"{args.num_seqs} x {args.seq_len} tokens per rank")
    print("| mode | rank | FP8 bytes owned | peak RssAnon (load) | peak RssAnon (scoring) | peak − FP8 owned | "
          "load s | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        peak = max(r["peak_rss_anon_load"], r["peak_rss_anon_scoring"])
        print(f"| {r['mode']} | {r['rank']} | {r['fp8_bytes_owned'] / GIB:.2f} GiB | "
              f"{r['peak_rss_anon_load'] / GIB:.2f} GiB | {r['peak_rss_anon_scoring'] / GIB:.2f} GiB | "
              f"{(peak - r['fp8_bytes_owned']) / GIB:+.2f} GiB | {r['load_s']:.1f} | {r['tokens_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
