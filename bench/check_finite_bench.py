"""What --check-finite costs: the scoring loop with and without it, in alternating full runs.

    python bench/check_finite_bench.py                       # tiny preset, 40 demos, 3 pairs
    python bench/check_finite_bench.py --preset small --repeat 2

Builds the preset checkpoint in a temporary directory, then runs `launch/score.py` (one process,
EP = 1) without and with --check-finite, alternating (ABAB...), and reads each run's own
scoring-loop time from scores.json (`timing.scoring_loop_seconds`: the forward loop only, not the
launch or the load). Reports the median of each and their ratio, within this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _run(ckpt: Path, demos: Path, out: Path, check: bool) -> float:
    cmd = [sys.executable, str(REPO / "launch" / "score.py"), "--hf-checkpoint", str(ckpt), "--demos",
           f"{demos}:math", "--output", str(out), "--checkpoint-every", "1000000"]
    if check:
        cmd.append("--check-finite")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads((out / "scores.json").read_text())["timing"]["scoring_loop_seconds"]


def main() -> None:
    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--demos", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_checkpoint(tmp / "ckpt", args.preset, seed=0, num_shards=1)
        demos = tmp / "demos.jsonl"
        demos.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?",
                                             "response": f"{i} + {i + 1} = {2 * i + 1}. " * 8}) + "\n"
                                 for i in range(args.demos)))
        times = {False: [], True: []}
        for i in range(args.repeat):
            for check in (False, True) if i % 2 == 0 else (True, False):
                times[check].append(_run(ckpt, demos, tmp / f"out{i}{int(check)}", check))
    plain, checked = statistics.median(times[False]), statistics.median(times[True])
    print(f"preset {args.preset}, {args.demos} demos, {args.repeat} runs each (scoring loop, median s)")
    print(f"  without --check-finite: {plain:.3f} s   {times[False]}")
    print(f"  with    --check-finite: {checked:.3f} s   {times[True]}")
    print(f"  ratio: {checked / plain:.3f}")


if __name__ == "__main__":
    main()
