"""Subprocess for tests/test_fused_experts.py: the fused MoE kernels (mcore/fused_moe_kernels.py) on
CPU tensors under TRITON_INTERPRET=1, against an independent per-expert oracle, and a whole model
with the fused experts against Megatron's own SequentialMLP.

    TRITON_INTERPRET=1 python tests/fused_moe_worker.py kernels OUT.pt
    TRITON_INTERPRET=1 python tests/fused_moe_worker.py model OUT.pt CKPT
    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 tests/fused_moe_worker.py ep OUT.pt CKPT

kernels: per case, tokens are routed top-k, laid out as Megatron's dispatcher lays them out (rows
grouped by local expert, tokens in order), and run through the fused path; the oracle is the
per-expert path written out in torch: DeepSeek's activation quantisation
(fp8_emulation.quantize_activation), the block-dequantised weights, a float64 matmul, Megatron's
SiLU·mul and combine weight in the model dtype, the second quantisation, the second matmul.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

# (name, experts, hidden, intermediate, block, tokens, top_k, routing, block_m, dtype)
CASES = [
    # partial edge blocks: intermediate 192 = 128 + 64 (gate/up row grids, w2's K), hidden 200
    # ends in a partial K group of the layer input; one expert gets no token
    ("edge_blocks_empty_expert", 4, 200, 192, (128, 128), 40, 2, "skip_expert_1", 16, torch.float32),
    ("top8_32_experts", 32, 256, 256, (128, 128), 24, 8, "uniform", 16, torch.float32),
    ("one_expert_top1", 1, 256, 256, (128, 128), 33, 1, "uniform", 16, torch.float32),
    ("all_tokens_one_expert", 8, 256, 192, (128, 128), 37, 1, "all_to_3", 16, torch.float32),
    ("top8_of_8", 8, 128, 96, (128, 128), 9, 8, "uniform", 32, torch.float32),
    # the fixtures' odd blocks: 20-row blocks (gate 40 rows = 20 + 20, w2 64 rows = 3 blocks + 4),
    # 16-column groups
    ("odd_blocks", 6, 64, 40, (20, 16), 21, 3, "uniform", 16, torch.float32),
    # a bf16 model: the roundings to the model dtype sit where Megatron's bf16 tensors are
    ("bf16", 8, 256, 192, (128, 128), 30, 2, "uniform", 16, torch.bfloat16),
]


def _route(tokens, experts, top_k, routing, gen):
    """[T, k] distinct expert ids per token."""
    if routing == "all_to_3":
        return torch.full((tokens, 1), 3, dtype=torch.long)
    pool = experts - 1 if routing == "skip_expert_1" else experts
    ids = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(tokens)])
    if routing == "skip_expert_1":
        ids = torch.where(ids >= 1, ids + 1, ids)
    return ids


def _dispatch(x, ids, weights, experts):
    """Megatron's layout: rows grouped by local expert, tokens in order within an expert."""
    tokens, top_k = ids.shape
    expert_of_slot, token_of_slot = ids.reshape(-1), torch.arange(tokens).repeat_interleave(top_k)
    order = torch.argsort(expert_of_slot * tokens + token_of_slot)
    counts = torch.bincount(expert_of_slot, minlength=experts)
    return x[token_of_slot[order]], weights.reshape(-1)[order], counts


def _weights(experts, hidden, inter, block, gen):
    from megatron_easyep.checkpoint.fp8_blocks import quantize_fp8_blockwise

    w13, s13, w2, s2 = [], [], [], []
    for _ in range(experts):
        gate, gs = quantize_fp8_blockwise(torch.randn(inter, hidden, generator=gen) / hidden ** 0.5, block)
        up, us = quantize_fp8_blockwise(torch.randn(inter, hidden, generator=gen) / hidden ** 0.5, block)
        down, ds = quantize_fp8_blockwise(torch.randn(hidden, inter, generator=gen) / inter ** 0.5, block)
        w13.append(torch.cat([gate, up]))
        s13.append(torch.cat([gs, us]))
        w2.append(down)
        s2.append(ds)
    return torch.stack(w13), torch.stack(s13), torch.stack(w2), torch.stack(s2)


def _oracle(x, probs, counts, w13, s13, w2, s2, block, inter):
    """Per expert: (intermediate before its quantisation, its codes, its scales, output rows in
    float64), the model dtype where Megatron's tensors have it."""
    from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_emulation as fe

    pres, codes, scales, outs = [], [], [], []
    row0, gate_blocks = 0, -(-inter // block[0])
    for e, count in enumerate(counts.tolist()):
        xe, pe = x[row0:row0 + count], probs[row0:row0 + count]
        row0 += count
        xq, xs = fe.quantize_activation(xe, block[1])
        x64 = fe.dequantize_activation(xq, xs, block[1], torch.float64)
        gate_w = dequantize_fp8_blockwise(w13[e, :inter], s13[e, :gate_blocks], block, torch.float64)
        up_w = dequantize_fp8_blockwise(w13[e, inter:], s13[e, gate_blocks:], block, torch.float64)
        gate, up = (x64 @ gate_w.t()).to(x.dtype), (x64 @ up_w.t()).to(x.dtype)
        h = ((F.silu(gate) * (up + 0.0)) * pe[:, None]).to(x.dtype)  # Megatron's MLP, in its order
        hq, hs = fe.quantize_activation(h, block[1])
        h64 = fe.dequantize_activation(hq, hs, block[1], torch.float64)
        outs.append(h64 @ dequantize_fp8_blockwise(w2[e], s2[e], block, torch.float64).t())
        pres.append(h.float())
        codes.append(hq)
        scales.append(hs)
    return torch.cat(pres), torch.cat(codes), torch.cat(scales), torch.cat(outs)


def _table_oracle(counts, block_m):
    rows, row0 = [], 0
    for e, count in enumerate(counts.tolist()):
        for start in range(row0, row0 + count, block_m):
            rows.append((e, start, row0 + count))
        row0 += count
    return rows


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _second_gemm(codes, scales, counts, w2, s2, block):
    """float64 rows of (codes * scales) @ W2[expert]^T: the oracle's w2 step on given codes."""
    from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_emulation as fe

    h64 = fe.dequantize_activation(codes, scales, block[1], torch.float64)
    outs, row0 = [], 0
    for e, count in enumerate(counts.tolist()):
        outs.append(h64[row0:row0 + count] @ dequantize_fp8_blockwise(w2[e], s2[e], block, torch.float64).t())
        row0 += count
    return torch.cat(outs)


def _code_flips(codes, ref_codes, pre, ref_pre) -> list[dict]:
    """Where the fused and the per-expert codes of the intermediate differ: how far apart the codes
    are (e4m3 codes of one sign are ordered like their bytes) and how far apart the values that were
    quantised are. A rounding tie between two neighbouring codes, straddled by two values an ulp
    apart, is the only legitimate cause."""
    a, b = codes.view(torch.uint8).long(), ref_codes.view(torch.uint8).long()
    flips = []
    for r, c in (a != b).nonzero().tolist():
        same_sign = (a[r, c] >> 7) == (b[r, c] >> 7)
        flips.append({"code_step": int((a[r, c] - b[r, c]).abs()) if same_sign else 999,
                      "value_rel": float((pre[r, c] - ref_pre[r, c]).abs() / ref_pre[r, c].abs().clamp_min(1e-30))})
    return flips


def run_case(case, gen) -> dict:
    from megatron_easyep.mcore import fp8_emulation as fe
    from megatron_easyep.mcore import fp8_gemm
    from megatron_easyep.mcore import fused_moe_kernels as K

    name, experts, hidden, inter, block, tokens, top_k, routing, block_m, dtype = case
    x_tokens = (torch.randn(tokens, hidden, generator=gen) * 2).to(dtype)
    ids = _route(tokens, experts, top_k, routing, gen)
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    x, probs, counts = _dispatch(x_tokens, ids, weights, experts)
    w13, s13, w2, s2 = _weights(experts, hidden, inter, block, gen)

    table = K.block_table(counts, x.shape[0], block_m)
    live = [tuple(t) for t in table.t().tolist() if t[0] >= 0]
    xq, xs = fp8_gemm.quantize_activation_triton(x, block[1])
    q_ref, s_ref = fe.quantize_activation(x, block[1])
    hq, hs, pre = K.w13_glu_quant(xq, xs, w13, s13, probs, table, block=block, out_dtype=x.dtype,
                                  block_m=block_m, store_pre=True)
    pre_q, pre_s = fe.quantize_activation(pre, block[1])  # the fused epilogue's own input, re-quantised
    y = K.fused_moe_fp8(x, counts, probs, w13, s13, w2, s2, block=block, block_m=block_m, block_n=64)
    o_pre, o_codes, o_scales, o_out = _oracle(x, probs, counts, w13, s13, w2, s2, block, inter)
    return {
        "case": name, "dtype": str(dtype), "rows": x.shape[0], "counts": counts.tolist(),
        "table_matches": live == _table_oracle(counts, block_m),
        "table_equals_torch_ops": torch.equal(table, K.block_table_torch(counts, x.shape[0], block_m)),
        "input_codes_equal": torch.equal(xq.view(torch.uint8), q_ref.view(torch.uint8)),
        "input_scales_equal": torch.equal(xs, s_ref),
        "epilogue_codes_equal": torch.equal(hq.view(torch.uint8), pre_q.view(torch.uint8)),
        "epilogue_scales_equal": torch.equal(hs, pre_s),
        "pre_rel": _rel(pre, o_pre),
        "pre_differing": int((pre != o_pre).sum()), "pre_elements": pre.numel(),
        "code_flips": _code_flips(hq, o_codes, pre, o_pre),
        "w2_rel": _rel(y, _second_gemm(hq, hs, counts, w2, s2, block)),
        "out_rel": _rel(y, o_out),
        "out_finite": bool(torch.isfinite(y).all()),
    }


def grouped_checks(gen) -> dict:
    """bf16/none path pieces: the stacked dequantisation (Triton under the interpreter) is bitwise
    fp8_gemm.dequantize_weight per expert, and the grouped GEMM with an empty group is bitwise the
    per-expert loop (torch's CPU grouped GEMM multiplies group by group)."""
    from megatron_easyep.mcore import fp8_gemm
    from megatron_easyep.mcore import fused_moe_kernels as K

    out = {}
    for block, inter, hidden in (((128, 128), 192, 200), ((20, 16), 40, 64)):
        w13, s13, w2, s2 = _weights(3, hidden, inter, block, gen)
        layout13 = fp8_gemm.Fp8Layout((inter, inter), block)
        layout2 = fp8_gemm.Fp8Layout((hidden,), block)
        for dtype in (torch.float32, torch.bfloat16):
            d13 = K.dequantize_stacked(w13, s13, (inter, inter), block, dtype)
            d2 = K.dequantize_stacked(w2, s2, (hidden,), block, dtype)
            out[f"dequant_{block}_{dtype}"] = all(
                torch.equal(d13[e], fp8_gemm.dequantize_weight(w13[e], s13[e], layout13, dtype))
                and torch.equal(d2[e], fp8_gemm.dequantize_weight(w2[e], s2[e], layout2, dtype)) for e in range(3))
        counts = torch.tensor([4, 0, 7])
        x = torch.randn(11, hidden, generator=gen)
        probs = torch.rand(11, generator=gen)
        d13 = K.dequantize_stacked(w13, s13, (inter, inter), block, torch.float32)
        d2 = K.dequantize_stacked(w2, s2, (hidden,), block, torch.float32)
        y = K.grouped_mm_experts(x, counts, probs, d13, d2)
        ref, row0 = [], 0
        for e, count in enumerate(counts.tolist()):
            h = F.linear(x[row0:row0 + count], d13[e])
            gate, up = torch.chunk(h, 2, dim=-1)
            ref.append(F.linear((F.silu(gate) * (up + 0.0) * probs[row0:row0 + count, None]).float(), d2[e]))
            row0 += count
        out[f"grouped_{block}_bitwise"] = torch.equal(y, torch.cat(ref))
    return out


def kernels_main(out_path: str) -> None:
    gen = torch.Generator().manual_seed(1234)
    result = {"cases": [run_case(case, gen) for case in CASES], "grouped": grouped_checks(gen)}
    torch.save(result, out_path)


# ------------------------------------------------------------------------------------------------
# whole model
# ------------------------------------------------------------------------------------------------

def _sequences(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (23, 40, 9)]


def _score(model, cfg) -> dict:
    from megatron_easyep.mcore.compat import fused_experts as FE
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.mcore import compat
    from megatron_easyep.scoring.scorer import ExpertScorer

    layers = [i for i, _ in compat.iter_moe_layers(model)]
    scorer = ExpertScorer(layers, cfg.n_routed_experts, ["all"])
    detach = compat.attach_moe_observers(model, scorer.observe)
    logits = []
    with torch.no_grad():
        for ids in _sequences(cfg.vocab_size):
            scorer.begin_step(torch.zeros(len(ids), dtype=torch.long))
            logits.append(model_lib.forward_padded(model, ids, len(ids)).float().clone())
    detach()
    ran = sorted({m.last_backend for m in FE.fused_experts_modules(model)} - {None})
    return {"logits": logits, "sums": scorer.sums.clone(), "ran": ran}


def _views_of_stack(model) -> bool:
    from megatron_easyep.mcore.compat import fused_experts as FE

    modules = FE.fused_experts_modules(model)
    return bool(modules) and all(s.broken_reason() is None for m in modules for s in (m.fc1_stack, m.fc2_stack))


def model_main(out_path: str, ckpt: str) -> None:
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.mcore import fp8_emulation, parallel
    from megatron_easyep.mcore.compat import fused_experts as FE
    from megatron_easyep.mcore import model as model_lib

    parallel.init_parallel(1, seed=0)
    cfg = DeepseekV3Config.load(ckpt)
    _, plain = model_lib.load_megatron_model(ckpt, dtype=torch.float32, fused_experts=False)
    _, fused = model_lib.load_megatron_model(ckpt, dtype=torch.float32)
    result = {"plain_has_no_fused": not FE.fused_experts_modules(plain), "stacked_views": _views_of_stack(fused)}
    result["none"] = {"plain": _score(plain, cfg), "auto": _score(fused, cfg)}
    FE.set_backend(fused, "grouped_mm")
    result["none"]["grouped_mm"] = _score(fused, cfg)
    # fault injection: "auto" picks the fused path, which fails (no valid tile size): the layer
    # warns once and runs the loop, with the loop's results
    FE.set_backend(fused, "auto", block_m=0)
    for module in FE.fused_experts_modules(fused):
        module.choose_backend = lambda device, dtype: "fp8_fused"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["none"]["failed_fused"] = _score(fused, cfg)
    result["none"]["failed_fused"]["warnings"] = [str(w.message) for w in caught if "FusedExperts" in str(w.message)]
    result["none"]["failed_fused"]["fallback"] = [m.fallback_reason for m in FE.fused_experts_modules(fused)]
    for module in FE.fused_experts_modules(fused):
        del module.choose_backend
    fp8_emulation.configure_fp8(plain, "emulated", cfg)
    fp8_emulation.configure_fp8(fused, "emulated", cfg)
    FE.set_backend(fused, "auto", block_m=16)
    result["emulated"] = {"plain": _score(plain, cfg), "auto": _score(fused, cfg)}
    FE.set_backend(fused, "fp8_fused", block_m=16)
    result["emulated"]["fp8_fused"] = _score(fused, cfg)
    torch.save(result, out_path)
    parallel.shutdown()


def ep_main(out_path: str, ckpt: str) -> None:
    """Under torchrun with 2 ranks: each MoE layer's experts input as the real dispatchers deliver
    it at EP=2 (both dispatchers; tokens_per_expert as they pass it), run again through the fused
    FP8 path of the same module; per layer, the largest row difference relative to the layer's
    largest output, against the per-expert --fp8 emulated rows."""
    import torch.distributed as dist

    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.mcore import compat, fp8_emulation, parallel
    from megatron_easyep.mcore.compat import fused_experts as FE
    from megatron_easyep.mcore import model as model_lib

    parallel.init_parallel(2, seed=0)
    cfg = DeepseekV3Config.load(ckpt)
    mine = []
    for dispatcher in ("alltoall", "allgather"):
        _, model = model_lib.load_megatron_model(ckpt, dtype=torch.float32, expert_parallel=2, dispatcher=dispatcher)
        fp8_emulation.configure_fp8(model, "emulated", cfg)
        seen = []
        handles = [layer.mlp.experts.register_forward_hook(
            lambda module, args, out: seen.append((module, args[0].clone(), args[1], args[2].clone(), out[0].clone())))
            for _, layer in compat.iter_moe_layers(model)]
        with torch.no_grad():
            for ids in _sequences(cfg.vocab_size):
                model_lib.forward_padded(model, ids, len(ids))
        for handle in handles:
            handle.remove()
        for module, x, tokens_per_expert, probs, rows in seen:
            module.backend, module.block_m = "fp8_fused", 16
            with torch.no_grad():
                fused, _ = module(x, tokens_per_expert, probs)
            module.backend = "auto"
            per_row = (fused - rows).abs().amax(-1) / rows.abs().max()
            mine.append({"dispatcher": dispatcher, "rank": dist.get_rank(), "rows": rows.shape[0],
                         "counts_type": type(tokens_per_expert).__name__, "ran": module.last_backend,
                         "max_rel": float(per_row.max()) if rows.shape[0] else 0.0,
                         "rows_over_1e-6": int((per_row > 1e-6).sum())})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        torch.save([entry for part in gathered for entry in part], out_path)
    parallel.shutdown()


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    {"kernels": kernels_main, "model": model_main, "ep": ep_main}[sys.argv[1]](*sys.argv[2:])
