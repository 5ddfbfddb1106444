"""bench/fused_moe_bench.py (the GPU bench of issue 22) in its CPU dry mode: tiny widths, the Triton
interpreter, no process group. It proves the bench runs end to end and writes what it promises;
its timings mean nothing. The numbers checked are the ones that hold at any width: every variant
agrees with the fp32 reference on the dequantised weights to FP8 / bf16 accuracy, and the top-M
experts by score match the reference's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("fused_fp8", "native_loop", "bf16_grouped", "bf16_loop", "none_grouped", "none_loop")


def test_dry_run_writes_every_config_and_variant(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # --dry sets it itself
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "fused_moe_bench.py"), "--out", str(out), "--dry"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    shape = result["shape"]
    assert result["dry"] and len(result["configs"]) == len(shape["experts"]) * len(shape["tokens"]) * 2
    assert {c["routing"] for c in result["configs"]} == {"uniform", "zipf"}
    for config in result["configs"]:
        assert 0 < config["max_rows_per_expert"] <= config["rows"]
        variants = config["variants"]
        assert set(variants) == set(VARIANTS)
        for name, entry in variants.items():
            assert "error" not in entry, (name, entry.get("traceback"))
            assert entry["median_ms"] > 0 and math.isfinite(entry["layer_tflops"])
            # FP8 activations: a few percent of the largest output; bf16 weights: bf16 rounding
            bound = 0.1 if name in ("fused_fp8", "native_loop") else 0.02
            assert entry["max_rel_err_vs_dequant_ref"] <= bound, (name, entry)
            assert min(entry["top_overlap_vs_ref"].values()) >= 0.5, (name, entry)
        for gemm in ("w13", "w2"):
            assert variants["fused_fp8"]["gemms"][gemm]["tflops"] > 0
            assert variants["bf16_grouped"]["gemms"][gemm]["tflops"] > 0
        assert config["scoring_overhead"] > 0
        assert config["fused_vs_native_loop_max_rel"] <= 0.1
