"""The one GPU check (run by bench/gpu_check.sh on a lent H100/H200; <= 8 minutes; JSON to one file).

    python bench/gpu_check.py --out gpu_check.json [--parts a,b,c,d] [--quick]

(a) block-scaled FP8 GEMMs at DeepSeek-V3's shapes (N x K = 1536x7168, 24576x1536, 576x7168,
    32768x512, 7168x16384, 4096x7168, 7168x2048; M = 1, 128, 4096): torch._scaled_mm block-wise
    (cuBLAS) and the Triton kernel vs the dequantised fp32 reference: max relative error, TFLOP/s.
(b) the `small` preset (Moonlight widths, 64 experts, FP8 128 x 128) scored with --fp8 none, emulated,
    native and native on the Triton kernel alone: non-finite values and the first module making
    them, logits and easyep-sum differences, top-M overlap of the selection per layer (M = E/4, E/2).
(c) one real-width MoE layer (v3-width preset, 32 experts, FP8): torch.cuda.max_memory_allocated
    after load and over a forward, FP8-resident vs dequantised-at-load bf16, and tokens/s with and
    without the scorer attached.
(d) one real-width MLA attention at 16k tokens in bf16: which scaled-dot-product-attention
    backends accept q/k head dim 192 with v head dim 128, which one the default call runs, and the
    peak memory of a forward of the layer.
(e) cuBLAS block-wise coverage: K and N block counts that are not multiples of 4, M not a multiple
    of 4: the raw torch._scaled_mm call vs the fp32 reference, and whether the code routes it there.
Each part records its own error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GEMM_SHAPES = [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GIB = 1024 ** 3


def _time(fn, repeat=10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeat


def part_a(quick: bool) -> list[dict]:
    from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise, quantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_emulation, fp8_gemm

    rows = []
    for n, k in GEMM_SHAPES[:2] if quick else GEMM_SHAPES:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        wq, ws = quantize_fp8_blockwise(w, (128, 128))
        w_ref = dequantize_fp8_blockwise(wq, ws, (128, 128), torch.float32)
        for m in (1, 128, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = fp8_gemm.quantize_activation_triton(x, 128)
            q_ref, s_ref = fp8_emulation.quantize_activation(x, 128)
            x_ref = fp8_emulation.dequantize_activation(q_ref, s_ref, 128, torch.float32)
            y_ref = x_ref @ w_ref.t()
            code_diff = int((xq.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            scale_diff = int((xs != s_ref).sum())
            row = {"m": m, "n": n, "k": k, "act_quant_bitexact": code_diff == 0 and scale_diff == 0,
                   "act_codes_differing": code_diff, "act_scales_differing": scale_diff}
            flops = 2 * m * n * k
            row["bf16_tflops"] = flops / _time(lambda: x @ w_ref.to(torch.bfloat16).t()) / 1e12
            for name, fn in (("scaled_mm", lambda: fp8_gemm.scaled_mm_blockwise(xq, xs, wq, ws, torch.bfloat16)),
                             ("triton", lambda: fp8_gemm.triton_block_fp8_matmul(xq, xs, wq, ws, (128, 128),
                                                                                  torch.bfloat16))):
                try:
                    y = fn()
                    row[f"{name}_rel_err"] = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
                    row[f"{name}_tflops"] = flops / _time(fn) / 1e12
                except Exception as exc:  # noqa: BLE001 - recorded, the other backend still runs
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:400]
            rows.append(row)
            print("(a)", row, flush=True)
    return rows


def _load(ckpt, dequantize_at_load=False, mode="none"):
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.mcore import fp8_emulation
    from megatron_easyep.mcore import model as model_lib

    cfg = DeepseekV3Config.load(ckpt)
    _, model = model_lib.load_megatron_model(ckpt, dtype=torch.bfloat16, dequantize_at_load=dequantize_at_load)
    fp8 = fp8_emulation.configure_fp8(model, mode, cfg)
    return cfg, model, fp8


def _score(model, cfg, seqs, attach=True):
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.mcore import compat
    from megatron_easyep.scoring.scorer import ExpertScorer

    layers = [i for i, _ in compat.iter_moe_layers(model)]
    scorer = ExpertScorer(layers, cfg.n_routed_experts, ["all"], device="cuda")
    detach = compat.attach_moe_observers(model, scorer.observe) if attach else (lambda: None)
    with torch.no_grad():
        for ids in seqs:
            scorer.begin_step(torch.zeros(len(ids), dtype=torch.long, device="cuda"))
            model_lib.forward_padded(model, ids, len(ids))
    detach()
    return scorer


def _first_nonfinite_hooks(model, found: list):
    """Forward hooks on every module: the first (innermost) module whose output is not finite."""
    def hook(name):
        def fn(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if found or not (torch.is_tensor(out) and out.is_floating_point()) or torch.isfinite(out).all():
                return
            x = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
            found.append({"module": name, "type": type(module).__name__, "output_shape": list(out.shape),
                          "input_finite": None if x is None else bool(torch.isfinite(x).all()),
                          "input_shape": None if x is None else list(x.shape),
                          "nonfinite_outputs": int((~torch.isfinite(out)).sum())})
        return fn
    return [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]


def part_b(workdir: Path, quick: bool) -> dict:
    """The `small` preset scored under --fp8 none / emulated / native (cuBLAS where it applies) /
    native with every GEMM on the Triton kernel: non-finite values (and the first module that makes
    them), logits and easyep-sum differences, and top-M selection overlap between modes."""
    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint
    from megatron_easyep.mcore import fp8_gemm
    from megatron_easyep.mcore import model as model_lib

    ckpt = make_tiny_checkpoint(workdir / "small-fp8", "small", fp8=True, num_shards=2)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 4096, (256,), generator=gen).tolist() for _ in range(4 if quick else 16)]
    runs, out = {}, {}
    scaled_mm_ok = fp8_gemm.scaled_mm_blockwise_ok
    for label, mode in (("none", "none"), ("emulated", "emulated"), ("native", "native"),
                        ("native_triton", "native")):
        fp8_gemm.scaled_mm_blockwise_ok = (lambda *a, **k: False) if label == "native_triton" else scaled_mm_ok
        try:
            cfg, model, _ = _load(ckpt, mode=mode)
            found: list = []
            handles = _first_nonfinite_hooks(model, found)
            sums = _score(model, cfg, seqs).sums[0, 0].cpu()  # easyep, [L, E]
            with torch.no_grad():
                logits = model_lib.forward_padded(model, seqs[0], len(seqs[0])).float().cpu()
            for h in handles:
                h.remove()
            runs[label] = (sums, logits)
            out[label] = {"nonfinite_sums": int((~torch.isfinite(sums)).sum()),
                          "nonfinite_logits": int((~torch.isfinite(logits)).sum()),
                          "first_nonfinite": found[0] if found else None}
        finally:
            fp8_gemm.scaled_mm_blockwise_ok = scaled_mm_ok
        del model
        torch.cuda.empty_cache()
    e = cfg.n_routed_experts
    out.update(experts=e, layers=int(runs["none"][0].shape[0]))

    def compare(a: str, b: str) -> dict:
        (sa, la), (sb, lb) = runs[a], runs[b]
        row = {"logits_max_rel_diff": float((la - lb).abs().max() / lb.abs().max()),
               "sums_max_rel_diff": float((sa - sb).abs().max() / sb.abs().max())}
        for m in (e // 4, e // 2):
            row[f"top{m}_overlap"] = [len(set(sa[r].topk(m).indices.tolist()) & set(sb[r].topk(m).indices.tolist())) / m
                                      for r in range(sa.shape[0])]
        return row

    out["native_vs_emulated"] = compare("native", "emulated")
    out["native_triton_vs_emulated"] = compare("native_triton", "emulated")
    out["emulated_vs_none"] = compare("emulated", "none")
    print("(b)", out, flush=True)
    return out


def part_c(workdir: Path, quick: bool) -> dict:
    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(workdir / "v3w-moe32", "v3-width", fp8=True, num_shards=2, n_routed_experts=32,
                                num_hidden_layers=1, first_k_dense_replace=0, n_group=8, topk_group=4)
    gen = torch.Generator().manual_seed(0)
    tokens = 2048 if quick else 8192
    seqs = [torch.randint(0, 4096, (tokens,), generator=gen).tolist()]
    out = {}
    for label, deq, mode in (("fp8_resident_native", False, "native"), ("fp8_resident_dequantize", False, "none"),
                             ("bf16_dequantized_at_load", True, "none")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cfg, model, _ = _load(ckpt, dequantize_at_load=deq, mode=mode)
        loaded = torch.cuda.max_memory_allocated() - base
        held = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        t_plain = _time(lambda: _score(model, cfg, seqs, attach=False), repeat=3)
        t_scored = _time(lambda: _score(model, cfg, seqs, attach=True), repeat=3)
        out[label] = {"weights_gib": held / GIB, "peak_load_gib": loaded / GIB,
                      "peak_forward_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
                      "tokens_per_s": tokens / t_plain, "tokens_per_s_scored": tokens / t_scored,
                      "scoring_overhead": t_scored / t_plain}
        print("(c)", label, out[label], flush=True)
        del model
    return out


def part_d(quick: bool) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = 4096 if quick else 16384
    q = torch.randn(1, 128, tokens, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(1, 128, tokens, 128, device="cuda", dtype=torch.bfloat16)
    out = {"tokens": tokens, "backends": {}}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        torch.cuda.reset_peak_memory_stats()
        try:
            with sdpa_kernel([backend]):
                t = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeat=3)
            out["backends"][backend.name] = {"ok": True, "ms": t * 1e3,
                                             "peak_gib": torch.cuda.max_memory_allocated() / GIB}
        except Exception as exc:  # noqa: BLE001
            out["backends"][backend.name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    out["default_kernels"] = [n[:120] for n in kernels][:12]
    out["default_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    print("(d)", out, flush=True)
    return out


def part_e() -> list[dict]:
    """cuBLAS block-wise coverage: K- and N-block counts that are not multiples of 4 and M not a
    multiple of 4: whether `scaled_mm_blockwise_ok` sends the shape to cuBLAS, and the raw
    torch._scaled_mm call against the dequantised fp32 reference."""
    from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise, quantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_emulation, fp8_gemm

    rows = []
    for n, k in ((1408, 2048), (2048, 1408), (1536, 1408), (1408, 640), (2816, 2048), (512, 1536)):
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        wq, ws = quantize_fp8_blockwise(w, (128, 128))
        w_ref = dequantize_fp8_blockwise(wq, ws, (128, 128), torch.float32)
        for m in (1, 3, 37, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = fp8_emulation.quantize_activation(x, 128)
            y_ref = fp8_emulation.dequantize_activation(xq, xs, 128, torch.float32) @ w_ref.t()
            row = {"m": m, "n": n, "k": k,
                   "routed_to_cublas": fp8_gemm.scaled_mm_blockwise_ok(x.device, (128, 128), n, k)}
            try:  # the call scaled_mm_blockwise makes, without its K guard
                xs4 = fp8_gemm._pad_rows(xs, 4).t().contiguous().t()
                y = torch._scaled_mm(fp8_gemm._pad_rows(xq, 4), wq.t(), scale_a=xs4, scale_b=ws.t(),
                                     out_dtype=torch.bfloat16)[:m].float()
                row["raw_rel_err"] = float((y - y_ref).abs().max() / y_ref.abs().max())
            except Exception as exc:  # noqa: BLE001
                row["raw_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print("(e)", row, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="a,b,c,d,e")
    p.add_argument("--quick", action="store_true", help="fewer shapes and tokens (a dry run)")
    args = p.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
    if not torch.cuda.is_available():
        result["error"] = "no CUDA GPU visible: nothing to check"
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(result["error"])
        return
    import triton

    from megatron_easyep.mcore import compat

    compat.apply_runtime_patches()
    from megatron_easyep.mcore import parallel

    parallel.init_parallel(1, seed=0)
    result.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                  triton=triton.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            try:
                fn = {"a": lambda: part_a(args.quick), "b": lambda: part_b(Path(tmp), args.quick),
                      "c": lambda: part_c(Path(tmp), args.quick), "d": lambda: part_d(args.quick),
                      "e": part_e}[part]
                result[part] = fn()
            except Exception:  # noqa: BLE001 - one part's failure must not hide the others
                result[part] = {"error": traceback.format_exc()[-2000:]}
                print(f"({part}) failed:\n{result[part]['error']}", flush=True)
            result[f"{part}_seconds"] = time.perf_counter() - t0
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
