"""Fused block-FP8 MoE experts vs today's per-expert paths, on one DeepSeek-V3-width MoE layer (issue 22).

    python bench/fused_moe_bench.py --out FILE.json            (a CUDA GPU; H100/H200)
    python bench/fused_moe_bench.py --out FILE.json --quick    (only 32 experts x 8192 tokens, both routings)
    python bench/fused_moe_bench.py --out FILE.json --budget-s 300   (the target point first, then what fits)
    python bench/fused_moe_bench.py --out FILE.json --dry      (CPU, tiny widths, Triton interpreter)

Workload: hidden 7168, expert intermediate 2048, 128 x 128 FP8 blocks, 256 routed experts, top-8;
this rank holds the first E_local experts (32 = the EP=8 share, 256 = EP=1) and receives every
(token, expert) pair routed to them, laid out as Megatron's dispatcher lays them out (rows grouped by
expert, tokens in order); 4096 / 8192 / 16384 tokens; uniform routing and a Zipf(1) skew over a
random expert order. One "layer" = gathering the rows, the experts, and the weighted combine back
to tokens (index_add), the same around every variant:

  fused_fp8     FusedExperts' fp8_fused: rows quantised once, one grouped block-FP8 GEMM for
                gate+up with SiLU·mul·g and the requantisation in its epilogue, one for down
  native_loop   today's --fp8 native: per expert, fp8_gemm.native_linear for fc1 and fc2 and
                Megatron's MLP arithmetic between them (the SequentialMLP + Fp8ResidentLinear path)
  bf16_grouped  bf16 weights held resident, two torch._grouped_mm calls
  bf16_loop     bf16 weights held resident, per expert F.linear (dequantise-at-load today)
  none_grouped  FP8-resident weights dequantised per layer (one launch each), two _grouped_mm
  none_loop     today's --fp8 none: per expert, the weight dequantised per GEMM

Reported per (experts, tokens, routing) and variant: whole-layer time (CUDA events, median after
warm-up), TFLOP/s of the layer and of each grouped GEMM (against DeepGEMM's 1346 TFLOP/s, its
contiguous-layout grouped FP8 figure at N 4096, K 7168 on H800, as the ceiling), kernel launches
per layer (torch.profiler), whether the forward ran without a host sync
(torch.cuda.set_sync_debug_mode("error")), the max error against the fp32 reference on the
dequantised weights, and the overlap of the top-M experts by EASY-EP score with the reference's;
the scoring overhead (the scorer's per-row norms, s_t and per-expert sums on the fused output)
as a ratio of layer times. Targets at 8192 tokens, 32 experts, uniform routing: fused_fp8 >= 1.3x
bf16_grouped, >= 2x native_loop, scoring overhead <= 1.05x. --dry runs the same code at tiny
widths on CPU (no process group, TRITON_INTERPRET=1) so tests/test_fused_moe_bench.py keeps it
from rotting; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEEPGEMM_TFLOPS = 1346.0
FULL = {"hidden": 7168, "inter": 2048, "block": (128, 128), "global_experts": 256, "top_k": 8,
        "experts": [32, 256], "tokens": [4096, 8192, 16384], "routing": ["uniform", "zipf"],
        "warmup": 2, "iters": 5}
# dry: a partial block (96 = 64 + 32) in the weights' grids; two expert counts, both routings
DRY = {"hidden": 128, "inter": 96, "block": (64, 64), "global_experts": 16, "top_k": 4,
       "experts": [2, 8], "tokens": [20], "routing": ["uniform", "zipf"], "warmup": 0, "iters": 1}
VARIANTS = ("fused_fp8", "native_loop", "bf16_grouped", "bf16_loop", "none_grouped", "none_loop")
TARGET = {"experts": 32, "tokens": 8192, "routing": "uniform"}


# ------------------------------------------------------------------------------------------------
# workload
# ------------------------------------------------------------------------------------------------

def make_weights(shape: dict, experts: int, device):
    """FP8 stacks (the checkpoint's layout: w13 [E, 2I, H] gate then up, w2 [E, H, I], block scales
    per part) and their bf16 dequantisation, built one expert at a time."""
    import torch

    from megatron_easyep.checkpoint.fp8_blocks import quantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_gemm

    hidden, inter, block = shape["hidden"], shape["inter"], shape["block"]
    gen = torch.Generator(device=device).manual_seed(0)
    sr, sk = math.ceil(inter / block[0]), math.ceil(hidden / block[1])
    w13 = torch.empty(experts, 2 * inter, hidden, dtype=torch.float8_e4m3fn, device=device)
    s13 = torch.empty(experts, 2 * sr, sk, dtype=torch.float32, device=device)
    w2 = torch.empty(experts, hidden, inter, dtype=torch.float8_e4m3fn, device=device)
    s2 = torch.empty(experts, math.ceil(hidden / block[0]), math.ceil(inter / block[1]), dtype=torch.float32,
                     device=device)
    for e in range(experts):
        for part, rows in ((0, slice(0, inter)), (1, slice(inter, 2 * inter))):
            q, s = quantize_fp8_blockwise(torch.randn(inter, hidden, generator=gen, device=device) / hidden ** 0.5,
                                          block)
            w13[e, rows], s13[e, part * sr:(part + 1) * sr] = q, s
        w2[e], s2[e] = quantize_fp8_blockwise(torch.randn(hidden, inter, generator=gen, device=device) / inter ** 0.5,
                                              block)
    l13, l2 = fp8_gemm.Fp8Layout((inter, inter), block), fp8_gemm.Fp8Layout((hidden,), block)
    b13 = torch.empty(w13.shape, dtype=torch.bfloat16, device=device)  # filled in place: no second copy
    b2 = torch.empty(w2.shape, dtype=torch.bfloat16, device=device)
    for e in range(experts):
        b13[e] = fp8_gemm.dequantize_weight(w13[e], s13[e], l13, torch.bfloat16)
        b2[e] = fp8_gemm.dequantize_weight(w2[e], s2[e], l2, torch.bfloat16)
    return {"w13": w13, "s13": s13, "w2": w2, "s2": s2, "b13": b13, "b2": b2, "l13": l13, "l2": l2}


def make_routing(shape: dict, tokens: int, local: int, routing: str, device):
    """The rows this rank's `local` experts receive: (token of each row, expert of each row, combine
    weight of each row, counts per local expert), rows grouped by expert, tokens in order."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(1 + tokens + local)
    experts, top_k = shape["global_experts"], shape["top_k"]
    if routing == "uniform":
        popularity = torch.ones(experts)
    else:  # Zipf(1) over a random order of the experts
        popularity = 1.0 / (torch.randperm(experts, generator=gen).float() + 1.0)
    ids = torch.multinomial(popularity.expand(tokens, experts), top_k, replacement=False, generator=gen)
    gates = torch.rand(tokens, top_k, generator=gen)
    gates = gates / gates.sum(-1, keepdim=True) * 2.5  # normalised top-k x routed_scaling_factor
    token = torch.arange(tokens).repeat_interleave(top_k)
    expert, gate = ids.reshape(-1), gates.reshape(-1)
    keep = expert < local
    token, expert, gate = token[keep], expert[keep], gate[keep]
    order = torch.argsort(expert * tokens + token)
    counts = torch.bincount(expert, minlength=local)
    return {"token": token[order].to(device), "expert": expert[order].to(device), "gate": gate[order].to(device),
            "counts": counts.to(device), "counts_host": counts.tolist()}


# ------------------------------------------------------------------------------------------------
# the variants: rows [R, H] grouped by expert -> g * e(x) per row
# ------------------------------------------------------------------------------------------------

def _glu(h, probs, dtype):
    """Megatron's MLP between fc1 and fc2 (gated, no bias): silu(gate) * (up + 0), times g."""
    import torch
    import torch.nn.functional as F

    gate, up = torch.chunk(h, 2, dim=-1)
    return ((F.silu(gate) * (up + 0.0)) * probs[:, None]).to(dtype)


def _loop(x, route, fc1, fc2):
    import torch

    outs = []
    for e, (xe, pe) in enumerate(zip(torch.split(x, route["counts_host"]), torch.split(route["gate"],
                                                                                       route["counts_host"]))):
        if xe.shape[0] == 0:  # Fp8ResidentLinear's shortcut for an expert with no token
            outs.append(xe.new_empty(0, x.shape[1]))
            continue
        outs.append(fc2(e, _glu(fc1(e, xe), pe, x.dtype)))
    return torch.cat(outs)


def run_variant(name, x, route, w, block):
    import torch
    import torch.nn.functional as F

    from megatron_easyep.mcore import fp8_gemm
    from megatron_easyep.mcore import fused_moe_kernels as K

    if name == "fused_fp8":
        return K.fused_moe_fp8(x, route["counts"], route["gate"], w["w13"], w["s13"], w["w2"], w["s2"], block=block)
    if name == "native_loop":
        return _loop(x, route, lambda e, a: fp8_gemm.native_linear(a, w["w13"][e], w["s13"][e], w["l13"]),
                     lambda e, a: fp8_gemm.native_linear(a, w["w2"][e], w["s2"][e], w["l2"]))
    if name == "bf16_grouped":
        return K.grouped_mm_experts(x, route["counts"], route["gate"], w["b13"], w["b2"])
    if name == "bf16_loop":
        return _loop(x, route, lambda e, a: F.linear(a, w["b13"][e]), lambda e, a: F.linear(a, w["b2"][e]))
    if name == "none_grouped":
        b13 = K.dequantize_stacked(w["w13"], w["s13"], w["l13"].part_rows, block, x.dtype)
        b2 = K.dequantize_stacked(w["w2"], w["s2"], w["l2"].part_rows, block, x.dtype)
        return K.grouped_mm_experts(x, route["counts"], route["gate"], b13, b2)
    if name == "none_loop":
        return _loop(x, route,
                     lambda e, a: F.linear(a, fp8_gemm.dequantize_weight(w["w13"][e], w["s13"][e], w["l13"], a.dtype)),
                     lambda e, a: F.linear(a, fp8_gemm.dequantize_weight(w["w2"][e], w["s2"][e], w["l2"], a.dtype)))
    raise ValueError(name)


def layer(name, x_tokens, route, w, block, score=None):
    """Gather rows, the experts, combine back to tokens; with `score`, also the scorer's work."""
    rows = run_variant(name, x_tokens.index_select(0, route["token"]), route, w, block)
    out = x_tokens.new_zeros(x_tokens.shape).index_add_(0, route["token"], rows)
    if score is not None:
        score["sums"] = expert_scores(rows, out, x_tokens, route, w["w13"].shape[0])
    return out, rows


def expert_scores(rows, routed, residual, route, experts):
    """The scorer's per-layer work on the grouped output (scoring/scorer.py without the EP
    all-gather): ||e|| = ||row|| / g from each row, s_t from h and h + routed, summed per expert."""
    import torch

    from megatron_easyep.scoring import metrics

    s = metrics.token_contribution(residual, residual + routed)
    gate = route["gate"].float()
    norm = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
    e_norm = torch.where(gate > 0, norm / gate.clamp_min(1e-30), torch.zeros_like(norm))
    return metrics.expert_scores(route["expert"], gate, e_norm, s[route["token"]], experts)["easyep"]


def reference(x_tokens, route, w):
    """fp32 on the fp32-dequantised weights, activations unquantised: (combined [T, H], rows)."""
    import torch
    import torch.nn.functional as F

    from megatron_easyep.mcore import fp8_gemm

    x = x_tokens.index_select(0, route["token"]).float()
    outs, row0 = [], 0
    for e, count in enumerate(route["counts_host"]):
        xe, pe = x[row0:row0 + count], route["gate"][row0:row0 + count].float()
        row0 += count
        w13 = fp8_gemm.dequantize_weight(w["w13"][e], w["s13"][e], w["l13"], torch.float32)
        w2 = fp8_gemm.dequantize_weight(w["w2"][e], w["s2"][e], w["l2"], torch.float32)
        outs.append(F.linear(_glu(F.linear(xe, w13), pe, torch.float32), w2))
    rows = torch.cat(outs)
    return x_tokens.float().new_zeros(x_tokens.shape).index_add_(0, route["token"], rows), rows


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------

def timed(fn, warmup: int, iters: int) -> float:
    """Median seconds of fn(): CUDA events per call on a GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_launches(fn) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def sync_free(fn) -> tuple[bool | None, str | None]:
    """Whether fn() runs without a host sync (None off CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True, None
    except RuntimeError as exc:
        return False, str(exc).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def top_overlap(scores, ref, experts: int) -> dict:
    out = {}
    for m in sorted({max(1, experts // 4), max(1, experts // 2)}):
        a = set(scores.topk(m).indices.tolist())
        b = set(ref.topk(m).indices.tolist())
        out[str(m)] = len(a & b) / m
    return out


def gemm_rates(name, x_tokens, route, w, block, warmup, iters) -> dict:
    """Time and TFLOP/s of each grouped GEMM of the grouped variants, alone."""
    import torch

    from megatron_easyep.mcore import fp8_gemm
    from megatron_easyep.mcore import fused_moe_kernels as K

    x = x_tokens.index_select(0, route["token"])
    rows, hidden = x.shape
    inter = w["w2"].shape[2]
    flops = {"w13": 2.0 * rows * 2 * inter * hidden, "w2": 2.0 * rows * hidden * inter}
    if name == "fused_fp8":
        xq, xs = fp8_gemm.quantize_activation_triton(x, block[1])
        table = K.block_table(route["counts"], rows, K.DEFAULT_BLOCK_M)
        q, qs = K.w13_glu_quant(xq, xs, w["w13"], w["s13"], route["gate"], table, block=block, out_dtype=x.dtype)
        fns = {"w13": lambda: K.w13_glu_quant(xq, xs, w["w13"], w["s13"], route["gate"], table, block=block,
                                              out_dtype=x.dtype),
               "w2": lambda: K.w2_grouped(q, qs, w["w2"], w["s2"], table, block=block, out_dtype=x.dtype),
               "act_quant": lambda: fp8_gemm.quantize_activation_triton(x, block[1])}
    elif name == "bf16_grouped":
        offs = torch.cumsum(route["counts"].to(torch.int32), 0, dtype=torch.int32)
        h = torch._grouped_mm(x, w["b13"].transpose(1, 2), offs=offs)
        inter_rows = _glu(h, route["gate"], x.dtype)
        fns = {"w13": lambda: torch._grouped_mm(x, w["b13"].transpose(1, 2), offs=offs),
               "w2": lambda: torch._grouped_mm(inter_rows, w["b2"].transpose(1, 2), offs=offs)}
    else:
        return {}
    out = {}
    for key, fn in fns.items():
        seconds = timed(fn, warmup, iters)
        out[key] = {"ms": seconds * 1e3}
        if key in flops:
            tflops = flops[key] / seconds / 1e12
            out[key].update(tflops=tflops, fraction_of_deepgemm=tflops / DEEPGEMM_TFLOPS)
    return out


def measure_config(shape, w_all, experts, tokens, routing, device, dtype) -> dict:
    import torch

    block = shape["block"]
    w = {k: (v[:experts] if isinstance(v, torch.Tensor) else v) for k, v in w_all.items()}
    route = make_routing(shape, tokens, experts, routing, device)
    gen = torch.Generator(device=device).manual_seed(tokens)
    x_tokens = torch.randn(tokens, shape["hidden"], generator=gen, device=device).to(dtype)
    counts = route["counts_host"]
    rows = sum(counts)
    flops = 2.0 * rows * 3 * shape["inter"] * shape["hidden"]
    ref_out, ref_rows = reference(x_tokens, route, w)
    ref_scores = expert_scores(ref_rows, ref_out, x_tokens.float(), route, experts)
    result = {"experts": experts, "tokens": tokens, "routing": routing, "rows": rows, "max_rows_per_expert": max(counts),
              "empty_experts": sum(c == 0 for c in counts), "variants": {}}
    native_out = None
    for name in VARIANTS:
        entry = result["variants"][name] = {}
        try:
            out, _ = layer(name, x_tokens, route, w, block)
            seconds = timed(lambda: layer(name, x_tokens, route, w, block), shape["warmup"], shape["iters"])
            score = {}
            layer(name, x_tokens, route, w, block, score)
            entry.update(
                median_ms=seconds * 1e3, layer_tflops=flops / seconds / 1e12,
                max_rel_err_vs_dequant_ref=float((out.float() - ref_out).abs().max() / ref_out.abs().max()),
                top_overlap_vs_ref=top_overlap(score["sums"], ref_scores, experts),
                launches=kernel_launches(lambda: layer(name, x_tokens, route, w, block)))
            entry["host_sync_free"], entry["sync_error"] = sync_free(lambda: layer(name, x_tokens, route, w, block))
            if name == "native_loop":
                native_out = out
            entry["gemms"] = gemm_rates(name, x_tokens, route, w, block, shape["warmup"], shape["iters"])
            if name == "fused_fp8":
                scored = timed(lambda: layer(name, x_tokens, route, w, block, {}), shape["warmup"], shape["iters"])
                result["scoring_overhead"] = scored / seconds
                result["_fused_out"] = out
        except Exception as exc:  # noqa: BLE001 - one variant's failure (OOM, a missing op) must not hide the others
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            entry["traceback"] = traceback.format_exc()[-1500:]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fused_out = result.pop("_fused_out", None)
    if fused_out is not None and native_out is not None:
        result["fused_vs_native_loop_max_rel"] = float((fused_out.float() - native_out.float()).abs().max()
                                                       / native_out.float().abs().max())
    return result


def targets(configs: list[dict]) -> dict:
    at = next((c for c in configs if all(c[k] == v for k, v in TARGET.items())), None)
    if at is None:
        return {}
    v = at["variants"]

    def ratio(a, b):
        if "median_ms" not in v.get(a, {}) or "median_ms" not in v.get(b, {}):
            return None
        return v[b]["median_ms"] / v[a]["median_ms"]

    out = {"at": TARGET,
           "fused_vs_bf16_grouped": {"speedup": ratio("fused_fp8", "bf16_grouped"), "target": 1.3},
           "fused_vs_native_loop": {"speedup": ratio("fused_fp8", "native_loop"), "target": 2.0},
           "scoring_overhead": {"ratio": at.get("scoring_overhead"), "target": 1.05}}
    for key in ("fused_vs_bf16_grouped", "fused_vs_native_loop"):
        out[key]["met"] = None if out[key]["speedup"] is None else out[key]["speedup"] >= out[key]["target"]
    r = out["scoring_overhead"]["ratio"]
    out["scoring_overhead"]["met"] = None if r is None else r <= 1.05
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--dry", action="store_true", help="tiny widths on CPU under the Triton interpreter")
    p.add_argument("--quick", action="store_true", help="only the target point: 32 experts, 8192 tokens")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new configuration after this many seconds (the target point runs first)")
    args = p.parse_args(argv)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined (on first use)
    import torch

    shape = dict(DRY if args.dry else FULL)
    if args.quick and not args.dry:
        shape.update(experts=[TARGET["experts"]], tokens=[TARGET["tokens"]])
    result = {"dry": args.dry, "torch": torch.__version__, "shape": {k: v for k, v in shape.items()},
              "deepgemm_ceiling_tflops": DEEPGEMM_TFLOPS, "configs": []}
    out_path = Path(args.out)

    def write():
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out_path)

    if not args.dry and not torch.cuda.is_available():
        result["error"] = "no CUDA GPU visible (use --dry for the CPU smoke run)"
        write()
        print(result["error"], file=sys.stderr)
        return 1
    device = torch.device("cuda" if not args.dry else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference
        result["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    dtype = torch.bfloat16
    began = time.time()
    w_all = make_weights(shape, max(shape["experts"]), device)
    points = [(e, t, r) for e in shape["experts"] for t in shape["tokens"] for r in shape["routing"]]
    points.sort(key=lambda p: (p[0], p[1]) != (TARGET["experts"], TARGET["tokens"]))  # the target first
    result["skipped"] = []
    for experts, tokens, routing in points:
        if args.budget_s is not None and time.time() - began > args.budget_s:
            result["skipped"].append({"experts": experts, "tokens": tokens, "routing": routing})
            continue
        started = time.time()
        config = measure_config(shape, w_all, experts, tokens, routing, device, dtype)
        config["wall_s"] = time.time() - started
        result["configs"].append(config)
        brief = {n: round(v.get("median_ms", float("nan")), 3) for n, v in config["variants"].items()}
        print(f"E={experts} T={tokens} {routing}: {brief}", flush=True)
        result["targets"] = targets(result["configs"])
        write()
    write()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
