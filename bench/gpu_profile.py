"""Where `--fp8 native` spends its GPU time, and where cuBLAS and Triton cross over (a lent H100/H200).

    bash bench/gpu_check.sh OUT.json --profile        (same set-up as the GPU check; see gpu_check.sh)

(p) one forward of the GPU check's V3-width MoE layer (32 experts, 8192 tokens) under `native` and
    under bf16 weights dequantised at load: CUDA kernel time summed by kernel, the top 15, and the
    total per kind (FP8 GEMM, activation quantisation, bf16 GEMM, attention, the rest).
(x) block-scaled FP8 GEMM time, cuBLAS (`_scaled_mm`) vs the Triton kernel, at the routed experts'
    shapes (fc1 one part N 2048 x K 7168, fc1 gate+up as one GEMM N 4096, fc2 N 7168 x K 2048)
    for M = 16 ... 4096 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402  (the check's loader, timer and set-up)
import torch  # noqa: E402

KINDS = (("fp8 gemm (cuBLAS)", ("sm90_xmma", "nvjet", "cutlass", "gemm_fp8", "f8f8")),
         ("fp8 gemm (Triton)", ("block_fp8_matmul",)),
         ("activation quantisation", ("act_quant",)),
         ("bf16 gemm", ("gemm", "sm90", "nvjet", "cutlass")),
         ("attention", ("sdpa", "fmha", "attention", "flash")))


def _kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def part_p(workdir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(workdir / "v3w-moe32", "v3-width", fp8=True, num_shards=2, n_routed_experts=32,
                                num_hidden_layers=1, first_k_dense_replace=0, n_group=8, topk_group=4)
    ids = torch.randint(0, 4096, (8192,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {}
    for label, deq, mode in (("native", False, "native"), ("bf16_at_load", True, "none")):
        cfg, model, _ = gpu_check._load(ckpt, dequantize_at_load=deq, mode=mode)
        for _ in range(2):
            gpu_check._score(model, cfg, [ids], attach=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gpu_check._score(model, cfg, [ids], attach=False)
            torch.cuda.synchronize()
        per_kernel: dict = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.time_range.elapsed_us()
        per_kind: dict = {}
        for name, us in per_kernel.items():
            per_kind[_kind(name)] = per_kind.get(_kind(name), 0.0) + us
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
        out[label] = {"total_ms": sum(per_kernel.values()) / 1e3,
                      "per_kind_ms": {k: v / 1e3 for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
                      "top_kernels_ms": [[n[:110], us / 1e3] for n, us in top]}
        print("(p)", label, json.dumps(out[label], indent=1), flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def part_x() -> list[dict]:
    from megatron_easyep.checkpoint.fp8_blocks import quantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_gemm

    rows = []
    for label, n, k in (("fc1 part", 2048, 7168), ("fc1 gate+up", 4096, 7168), ("fc2", 7168, 2048)):
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        wq, ws = quantize_fp8_blockwise(w, (128, 128))
        for m in (16, 64, 128, 256, 512, 1024, 2048, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = fp8_gemm.quantize_activation_triton(x, 128)
            row = {"gemm": label, "m": m, "n": n, "k": k,
                   "act_quant_us": gpu_check._time(lambda: fp8_gemm.quantize_activation_triton(x, 128)) * 1e6,
                   "bf16_us": gpu_check._time(lambda: x @ w.to(torch.bfloat16).t()) * 1e6}
            row["cublas_us"] = gpu_check._time(
                lambda: fp8_gemm.scaled_mm_blockwise(xq, xs, wq, ws, torch.bfloat16)) * 1e6
            row["triton_us"] = gpu_check._time(
                lambda: fp8_gemm.triton_block_fp8_matmul(xq, xs, wq, ws, (128, 128), torch.bfloat16)) * 1e6
            rows.append(row)
            print("(x)", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = {"torch": torch.__version__}
    if not torch.cuda.is_available():
        result["error"] = "no CUDA GPU visible: nothing to profile"
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(result["error"])
        return
    from megatron_easyep.mcore import compat, parallel

    compat.apply_runtime_patches()
    parallel.init_parallel(1, seed=0)
    result["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        for part, fn in (("x", part_x), ("p", lambda: part_p(Path(tmp)))):
            try:
                result[part] = fn()
            except Exception:  # noqa: BLE001 - one part's failure must not hide the other
                import traceback

                result[part] = {"error": traceback.format_exc()[-2000:]}
                print(f"({part}) failed:\n{result[part]['error']}", flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
