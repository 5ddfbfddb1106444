"""Benchmark the streaming pruned export on the `small` preset.

    python bench/export_bench.py [--fp8] [--keep-ratio 0.5] [--trials 3] [--workdir DIR]

In one run: writes a `small` checkpoint (Moonlight widths, 3 layers, ~2.5 GB bf16) and a random
score file into a temporary directory, then measures
- export time (export_pruned, inside a fresh subprocess) against a plain copy of exactly the
  bytes the export keeps (same source ranges, same page-cache state), in two flavours: a
  user-space read/write loop and in-kernel copy_file_range; target: export >= 0.8x the faster;
- peak RSS of the export subprocess, via resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, against
  the largest source shard + 512 MiB; a subprocess that only imports the exporter is measured
  first so the interpreter + torch import share is visible.
Page cache: the source is read once before timing and os.sync() runs before every timed trial,
so every trial reads from cache and starts with no dirty pages. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_easyep.pruning.export import kept_byte_ranges
from megatron_easyep.checkpoint.reader import DeepseekV3Config, HFCheckpoint
from megatron_easyep.checkpoint.io import write_score_file
from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint
from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

MIB = 1 << 20
BUFFER = 16 * MIB

EXPORT_CHILD = """
import json, sys
from megatron_easyep.pruning.export import export_pruned
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint
src, scores, dst, keep_ratio = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
selection = select_for_checkpoint(load_scores(scores), DeepseekV3Config.load(src), keep_ratio=keep_ratio, metric="easyep")
report = export_pruned(src, dst, selection)
print(json.dumps({"seconds": report.seconds, "total_size": report.total_size}))
"""
IMPORT_ONLY_CHILD = "import megatron_easyep.pruning.export, megatron_easyep.pruning.selection"
# Runs argv[1:] as its child and reports that child's peak RSS. The indirection matters: when a
# process forks and execs, Linux carries the pre-exec memory's high-water mark into the child's
# ru_maxrss, so a child of this (large) benchmark process would report the benchmark's own RSS.
# This runner is a bare interpreter, a few MiB.
RSS_RUNNER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(done.stderr)
print(done.stdout, end="")
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # Linux reports KiB
sys.exit(done.returncode)
"""


def run_measuring_rss(argv: list[str], env) -> tuple[str, int]:
    """(stdout, peak RSS in bytes) of `argv` run in a fresh subprocess."""
    done = subprocess.run([sys.executable, "-c", RSS_RUNNER, *argv], check=True, env=env,
                          capture_output=True, text=True)
    *output, rss = done.stdout.strip().splitlines()
    return "\n".join(output), int(rss)


def copy_read_write(ranges, out_dir: Path) -> int:
    """User-space copy: read each kept range in BUFFER chunks and write it out."""
    copied = 0
    outputs = {}
    try:
        for path, offset, length in ranges:
            out = outputs.get(path)
            if out is None:
                out = outputs[path] = open(out_dir / path.name, "wb")
            with open(path, "rb") as src:
                src.seek(offset)
                while length:
                    chunk = src.read(min(length, BUFFER))
                    out.write(chunk)
                    length -= len(chunk)
                    copied += len(chunk)
    finally:
        for out in outputs.values():
            out.close()
    return copied


def copy_in_kernel(ranges, out_dir: Path) -> int:
    """In-kernel copy (copy_file_range), the mechanism `cp` uses on Linux."""
    copied = 0
    outputs = {}
    try:
        for path, offset, length in ranges:
            out = outputs.get(path)
            if out is None:
                out = outputs[path] = open(out_dir / path.name, "wb")
            with open(path, "rb") as src:
                while length:
                    n = os.copy_file_range(src.fileno(), out.fileno(), length, offset)
                    offset, length, copied = offset + n, length - n, copied + n
    finally:
        for out in outputs.values():
            out.close()
    return copied


def timed(fn) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp8", action="store_true", help="FP8 source (block-wise e4m3 + scales)")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where to build the temporary directory")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="export_bench_", dir=args.workdir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        src = make_tiny_checkpoint(root / "src", "small", fp8=args.fp8)
        make_seconds = time.perf_counter() - started
        config = DeepseekV3Config.load(src)
        layers = config.moe_layer_ids + config.mtp_layer_ids
        rows = torch.rand(len(layers), config.n_routed_experts, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
        write_score_file(root / "scores", {"easyep": rows}, layers, config.config_hash, [])
        selection = select_for_checkpoint(load_scores(root / "scores"), config, keep_ratio=args.keep_ratio,
                                          metric="easyep")
        ranges = list(kept_byte_ranges(src, selection))
        kept_bytes = sum(length for _, _, length in ranges)
        shards = sorted(set(HFCheckpoint(src).weight_map.values()))
        shard_sizes = [(src / s).stat().st_size for s in shards]
        source_bytes = sum(shard_sizes)
        for shard in shards:  # warm the page cache: every trial reads from memory
            with open(src / shard, "rb") as f:
                while f.read(BUFFER):
                    pass

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        _, import_rss = run_measuring_rss([sys.executable, "-c", IMPORT_ONLY_CHILD], env)

        export_times, export_walls, export_rss, rw_times, kernel_times = [], [], [], [], []
        for trial in range(args.trials):
            dst = root / f"pruned-{trial}"
            os.sync()
            wall_start = time.perf_counter()
            output, rss = run_measuring_rss(
                [sys.executable, "-c", EXPORT_CHILD, str(src), str(root / "scores"), str(dst), str(args.keep_ratio)],
                env,
            )
            export_walls.append(time.perf_counter() - wall_start)
            export_rss.append(rss)
            result = json.loads(output.splitlines()[-1])
            export_times.append(result["seconds"])
            shutil.rmtree(dst)
            for times, copy in ((rw_times, copy_read_write), (kernel_times, copy_in_kernel)):
                out = root / "copy"
                out.mkdir()
                times.append(timed(lambda: copy(ranges, out)))
                shutil.rmtree(out)
        export_rss = max(export_rss)

    export_s = statistics.median(export_times)
    rw_s, kernel_s = statistics.median(rw_times), statistics.median(kernel_times)
    best_copy = min(rw_s, kernel_s)
    rss_limit = max(shard_sizes) + 512 * MIB
    gbps = lambda s: kept_bytes / s / 1e9  # noqa: E731
    print(f"## export_pruned on the `small` preset ({'fp8' if args.fp8 else 'bf16'}), "
          f"keep {selection.keep}/{config.n_routed_experts} experts, median of {args.trials} trials\n")
    print(f"source {source_bytes / MIB:.0f} MiB in {len(shards)} shards (largest {max(shard_sizes) / MIB:.0f} MiB), "
          f"kept {kept_bytes / MIB:.0f} MiB; checkpoint written in {make_seconds:.0f} s\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| export_pruned (in the subprocess) | {export_s:.2f} s ({gbps(export_s):.2f} GB/s) | |")
    print(f"| export subprocess wall (with python + torch import) | {statistics.median(export_walls):.2f} s | |")
    print(f"| plain copy of kept bytes, read/write 16 MiB | {rw_s:.2f} s ({gbps(rw_s):.2f} GB/s) | |")
    print(f"| plain copy of kept bytes, copy_file_range | {kernel_s:.2f} s ({gbps(kernel_s):.2f} GB/s) | |")
    print(f"| export speed / faster copy speed | {best_copy / export_s:.2f}x | >= 0.8x "
          f"{'(met)' if best_copy / export_s >= 0.8 else '(MISSED)'} |")
    print(f"| peak RSS, export subprocess | {export_rss / MIB:.0f} MiB | <= {rss_limit / MIB:.0f} MiB "
          f"{'(met)' if export_rss <= rss_limit else '(MISSED)'} |")
    print(f"| peak RSS, subprocess that only imports the exporter | {import_rss / MIB:.0f} MiB | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
