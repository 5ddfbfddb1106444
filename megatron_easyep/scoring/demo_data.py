"""Built-in demonstrations for the CPU demo and tests: two domains of chat-formatted JSONL
(prompt/response), generated deterministically, no downloads.

    python -m megatron_easyep.scoring.demo_data OUT_DIR   ->  OUT_DIR/{math,code}{,_heldout}.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def math_demo(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    steps = " ".join(f"{a} + {k} = {a + k}." for k in range(1, rng.randint(3, 8)))
    return {"prompt": f"What is {a} * {b} + {a}?",
            "response": f"First, {a} * {b} = {a * b}. Then {a * b} + {a} = {a * b + a}. "
                        f"Check by counting: {steps} The answer is {a * b + a}."}


def code_demo(rng: random.Random) -> dict:
    n = rng.randint(3, 12)
    name = rng.choice(["total", "count", "acc", "result"])
    body = "\n".join(f"    {name} += x[{i}] * {rng.randint(1, 9)}" for i in range(rng.randint(2, 5)))
    return {"prompt": f"Write a Python function that loops over {n} items.",
            "response": f"def f(x):\n    {name} = 0\n{body}\n    for i in range({n}):\n"
                        f"        {name} += i\n    return {name}\n"}


def write_demo_files(out_dir, per_domain: int = 8, heldout: int = 4, seed: int = 0) -> dict:
    """Writes math.jsonl, code.jsonl and *_heldout.jsonl; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for domain, make in (("math", math_demo), ("code", code_demo)):
        for suffix, count in (("", per_domain), ("_heldout", heldout)):
            path = out_dir / f"{domain}{suffix}.jsonl"
            path.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(count)))
            paths[domain + suffix] = path
    return paths


if __name__ == "__main__":
    for name, path in write_demo_files(sys.argv[1]).items():
        print(f"{name}: {path}")
