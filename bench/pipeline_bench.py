"""Scoring throughput: pipeline parallel (PP=2) against one stage (PP=1), and micro-batches against
one demo per forward, at the same demonstrations, through the real `launch/score.py` (torchrun).

    python bench/pipeline_bench.py                       # tiny preset, 4 layers, 24 demos, CPU
    python bench/pipeline_bench.py --layers 6 --demos 48 --micro-batch-tokens 1024

Generates a checkpoint (megatron_easyep.checkpoint.tiny; --preset, --layers) and demos of random
token ids with lengths spread over [--min-len, --max-len], then runs every configuration once:

  pp1          1 process, one demo per forward
  pp1_micro    1 process, --micro-batch-tokens
  dp2          2 processes, PP=1 (data parallel: each rank scores half the demos)
  pp2          2 processes, PP=2 (one model split in two stages; 2 x PP micro-batches per step)
  pp2_micro    2 processes, PP=2 and --micro-batch-tokens

tokens/s is the world's scored tokens over the scoring loop's time (scores.json timing: the
slowest rank's loop, model loading excluded; the fastest of --repeat runs); wall is the whole
launch. Every
run's scores are compared with pp1's (max relative difference over all score tensors). On a
2-core machine the 2-process rows share the cores with each other (and with anything else
running), so PP's gain there is bounded by the cores, not by the schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers (default 4)")
    p.add_argument("--hidden", type=int, default=256,
                   help="hidden_size (intermediate 2x, expert intermediate 1/2x; default 256)")
    p.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest counts")
    p.add_argument("--demos", type=int, default=24)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--micro-batch-tokens", type=int, default=1024)
    p.add_argument("--only", nargs="+", help="run only these configurations")
    p.add_argument("--workdir", help="keep checkpoint, demos and outputs here")
    return p.parse_args(argv)


def _configs(mbt: int) -> dict:
    return {
        "pp1": (0, []),
        "pp1_micro": (0, ["--micro-batch-tokens", mbt]),
        "dp2": (2, []),
        "pp2": (2, ["--pipeline-parallel", 2]),
        "pp2_micro": (2, ["--pipeline-parallel", 2, "--micro-batch-tokens", mbt]),
    }


def _run(name, nproc, extra, ckpt, demos, out_root):
    output = out_root / name
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc else [sys.executable]
    cmd = launcher + [str(REPO / "launch" / "score.py"), "--hf-checkpoint", str(ckpt), "--demos",
                      f"{demos}:bench", "--output", str(output), "--overwrite",
                      "--max-length", "100000", *map(str, extra)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    info = json.loads((output / "scores.json").read_text())
    loop = info["timing"]["scoring_loop_seconds"]
    return {"name": name, "ranks": max(nproc, 1), "tokens": info["tokens"]["all"], "loop_s": loop,
            "tokens_per_s": info["tokens"]["all"] / loop, "wall_s": wall,
            "micro_batches": info["batching"]["micro_batches"], "output": output}


def _max_rel_diff(a_dir: Path, b_dir: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "scores.safetensors"), load_file(b_dir / "scores.safetensors")
    worst = 0.0
    for key in b:
        scale = b[key].abs().max().item() or 1.0
        worst = max(worst, (a[key].double() - b[key].double()).abs().max().item() / scale)
    return worst


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "checkpoint"
    if not (ckpt / "config.json").exists():
        make_tiny_checkpoint(ckpt, args.preset, num_hidden_layers=args.layers, hidden_size=args.hidden,
                             intermediate_size=2 * args.hidden, moe_intermediate_size=args.hidden // 2)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    demos = root / "demos.jsonl"
    demos.write_text("".join(json.dumps({"input_ids": [rng.randrange(3, vocab) for _ in range(
        rng.randint(args.min_len, args.max_len))]}) + "\n" for _ in range(args.demos)))
    configs = _configs(args.micro_batch_tokens)
    names = args.only or list(configs)
    rows = []
    for name in names:
        runs = [_run(name, *configs[name], ckpt, demos, root / "out") for _ in range(args.repeat)]
        rows.append(min(runs, key=lambda r: r["loop_s"]))
    ref = next((r for r in rows if r["name"] == "pp1"), rows[0])
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{__import__('torch').__version__}; preset {args.preset}, {args.layers} layers, "
          f"hidden {args.hidden}, {args.demos} demos of {args.min_len}-{args.max_len} tokens, "
          f"micro-batch {args.micro_batch_tokens} tokens, best of {args.repeat}")
    print("| run | ranks | forwards | tokens | loop s | tokens/s | vs pp1 | wall s | max rel diff vs pp1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = _max_rel_diff(r["output"], ref["output"])
        print(f"| {r['name']} | {r['ranks']} | {r['micro_batches']} | {r['tokens']} | {r['loop_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['wall_s']:.1f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
