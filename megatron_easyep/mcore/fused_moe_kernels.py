"""Kernels for the fused MoE experts (mcore/compat/fused_experts.py): every local expert of a layer in a
few launches instead of a Python loop over experts.

Layout (what the experts module passes in):
* rows `x` [R, H] are the dispatcher's permuted tokens, already grouped by local expert
  (`counts[e]` rows each, experts in order), with one combine weight `probs[r]` per row;
* `w13` [E, 2I, H] e4m3: per expert gate rows [0, I) then up rows [I, 2I), the checkpoint's bytes;
  `s13` [E, 2 * ceil(I / bm), ceil(H / bk)] fp32: the gate's block scales then the up's, so each
  part keeps its own block grid (a partial last block of the gate never mixes with up rows);
* `w2` [E, H, I] e4m3 and `s2` [E, ceil(H / bm), ceil(I / bk)].

`native` (block FP8, DeepSeek's numerics):
1. `quantize_activation_triton`: the rows once, per 1 x bk group (one launch for all experts);
2. `block_table`: per BLOCK_M-row tile of the grouped rows, (expert, first row, end row), built on
   the device from `counts` in one launch (no host sync; a moe_align_block_size-style grouping, but the
   dispatcher already grouped the rows, so tiles only need aligning to expert boundaries and no
   row is gathered or padded). The grid is sized by the static bound cdiv(R, BLOCK_M) + E; tiles
   past the last one exit at once;
3. `w13_glu_quant_kernel`: one launch over all experts; a program owns BLOCK_M rows x BLOCK_N = bk
   intermediate columns and accumulates gate and up together (A read once), then in its epilogue
   applies SiLU(gate) * up, the row's combine weight, and quantises the result per 1 x bk group,
   writing e4m3 codes + scales: the intermediate never exists in high precision in memory;
4. `w2_kernel`: one launch over all experts, rows out in the dispatcher's order (the scorer reads
   g * e per row from it).
Rounding follows the per-expert path (Megatron's MLP on Fp8ResidentLinear): the GEMM result is
rounded to the model dtype, then SiLU, the product with up, and the product with the combine
weight are each rounded to the model dtype, exactly where Megatron's tensors are.

`none` / bf16: `dequantize_stacked` (one launch per stacked weight; the same single fp32 product
per element as fp8_gemm.dequantize_weight, so bitwise its values) and `grouped_mm_experts` over
torch._grouped_mm.

The Triton kernels are compiled on first use (Triton reads TRITON_INTERPRET when a kernel is
defined), and run on CPU tensors under TRITON_INTERPRET=1 in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_easyep.checkpoint.fp8_blocks import FP8_DTYPE, FP8_E4M3_MAX, MIN_BLOCK_AMAX

DEFAULT_BLOCK_M = 64
_KERNELS = None
_TL_DTYPES = None


def _kernels():
    """(triton, w13_glu_quant_kernel, w2_kernel, dequant_kernel, tile_table_kernel), on first use."""
    global _KERNELS, _TL_DTYPES
    if _KERNELS is None:
        import triton
        import triton.language as tl

        from megatron_easyep.mcore import fused_moe_triton as kernels

        _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
        _KERNELS = (triton, kernels.w13_glu_quant_kernel, kernels.w2_kernel, kernels.dequant_kernel,
                    kernels.tile_table_kernel)
    return _KERNELS


def check_triton_block(block: tuple[int, int]) -> None:
    """The kernels tile K by the weight's K block (and the intermediate by the activation group,
    the same number): it must be a power of two of at least 16."""
    bk = int(block[1])
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"the fused FP8 experts need a power-of-two K block of at least 16, got {bk} "
                         "(weight_block_size in config.json)")


# ------------------------------------------------------------------------------------------------
# grouping
# ------------------------------------------------------------------------------------------------

def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static bound on the tiles of rows grouped by expert: sum_e cdiv(c_e, BM) <= cdiv(R, BM) + E."""
    return -(-num_rows // block_m) + num_experts


def block_table(counts: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """int32 [3, max_tiles]: per BLOCK_M-row tile of rows grouped by expert, (expert, first row,
    end row); tiles past the last are (-1, 0, 0). Computed on `counts`' device, no host sync: one
    Triton launch on CUDA (and under the interpreter), a few torch ops elsewhere."""
    if counts.is_cuda or _interpreting():
        triton, _, _, _, kernel = _kernels()
        num_tiles = max_tiles(num_rows, counts.numel(), block_m)
        table = torch.empty((3, num_tiles), dtype=torch.int32, device=counts.device)
        tiles_per_program = 128
        kernel[(triton.cdiv(num_tiles, tiles_per_program),)](
            counts, table, counts.numel(), num_tiles, BLOCK_M=block_m,
            EXPERTS_P2=max(16, triton.next_power_of_2(counts.numel())), TILES=tiles_per_program)
        return table
    return block_table_torch(counts, num_rows, block_m)


def block_table_torch(counts: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """block_table in torch ops (CPU without the interpreter; the kernel's cross-check)."""
    counts = counts.to(torch.int64)
    num_experts = counts.numel()
    tiles = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")
    tile_end = torch.cumsum(tiles, 0)
    row_end = torch.cumsum(counts, 0)
    tile = torch.arange(max_tiles(num_rows, num_experts, block_m), device=counts.device)
    expert = torch.searchsorted(tile_end, tile, right=True)
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    start = row_end[e] - counts[e] + (tile - (tile_end[e] - tiles[e])) * block_m
    zero = torch.zeros_like(start)
    return torch.stack([torch.where(valid, e, -1), torch.where(valid, start, zero),
                        torch.where(valid, row_end[e], zero)]).to(torch.int32)


# ------------------------------------------------------------------------------------------------
# native: the two grouped block-FP8 GEMMs
# ------------------------------------------------------------------------------------------------

def w13_glu_quant(xq, xs, w13, s13, probs, table, *, block, out_dtype, glu_offset=0.0,
                  block_m=DEFAULT_BLOCK_M, store_pre=False):
    """(codes [R, I] e4m3, scales [R, cdiv(I, bk)] fp32[, pre-quantisation values fp32]) of
    quantise(silu(x W_gate^T) * (x W_up^T + offset) * probs) per 1 x bk group, all experts at once."""
    triton, kernel, _, _, _ = _kernels()
    check_triton_block(block)
    bm, bk = int(block[0]), int(block[1])
    rows, k = xq.shape
    inter = w13.shape[1] // 2
    q = torch.empty((rows, inter), dtype=FP8_DTYPE, device=xq.device)
    s = torch.empty((rows, triton.cdiv(inter, bk)), dtype=torch.float32, device=xq.device)
    pre = torch.empty((rows, inter) if store_pre else (1, 1), dtype=torch.float32, device=xq.device)
    num_tiles = table.shape[1]
    if rows and num_tiles:
        kernel[(num_tiles, triton.cdiv(inter, bk))](
            xq, xs, w13, s13, probs, table, q, s, pre, num_tiles, inter, k, math.ceil(inter / bm), float(glu_offset),
            xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
            q.stride(0), s.stride(0), pre.stride(0),
            BLOCK_ROWS=bm, BLOCK_M=block_m, BLOCK_N=bk, OUT_DTYPE=_TL_DTYPES[out_dtype], STORE_PRE=store_pre,
            MIN_AMAX=MIN_BLOCK_AMAX, FP8_MAX=FP8_E4M3_MAX,
            num_warps=8, num_stages=3)  # two BLOCK_M x bk fp32 accumulators: 8 warps keep them in registers
    return (q, s, pre) if store_pre else (q, s)


def w2_grouped(q, qs, w2, s2, table, *, block, out_dtype, block_m=DEFAULT_BLOCK_M, block_n=128):
    """y [R, H] = per row, (q * qs) @ W2[expert]^T with fp32 accumulation, in out_dtype."""
    triton, _, kernel, _, _ = _kernels()
    check_triton_block(block)
    bm, bk = int(block[0]), int(block[1])
    rows, k = q.shape
    n = w2.shape[1]
    y = torch.empty((rows, n), dtype=out_dtype, device=q.device)
    num_tiles = table.shape[1]
    if rows and num_tiles:
        kernel[(num_tiles, triton.cdiv(n, block_n))](
            q, qs, w2, s2, table, y, num_tiles, n, k,
            q.stride(0), qs.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), y.stride(0),
            BLOCK_ROWS=bm, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, OUT_DTYPE=_TL_DTYPES[out_dtype],
            num_warps=4, num_stages=3)
    return y


def fused_moe_fp8(x, counts, probs, w13, s13, w2, s2, *, block, glu_offset=0.0, block_m=DEFAULT_BLOCK_M,
                  block_n=128):
    """All local experts of a layer on rows grouped by expert, DeepSeek's block-FP8 numerics:
    rows [R, H] (counts[e] rows per expert, in expert order) -> g * e(x) per row [R, H], x's dtype.
    Four launches whatever the expert count: activation quantisation, the tile table,
    w13 + SiLU·mul + quantisation, w2 (plus the output allocations)."""
    from megatron_easyep.mcore.fp8_gemm import quantize_activation_triton

    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activation_triton(x2, int(block[1]))
    table = block_table(counts.to(x.device), x2.shape[0], block_m)
    q, qs = w13_glu_quant(xq, xs, w13, s13, probs.reshape(-1), table, block=block, out_dtype=x.dtype,
                          glu_offset=glu_offset, block_m=block_m)
    return w2_grouped(q, qs, w2, s2, table, block=block, out_dtype=x.dtype, block_m=block_m, block_n=block_n)


# ------------------------------------------------------------------------------------------------
# none / bf16: dequantised stacked weights and torch's grouped GEMM
# ------------------------------------------------------------------------------------------------

def dequantize_stacked(codes: torch.Tensor, scales: torch.Tensor, part_rows: tuple[int, ...], block,
                       dtype: torch.dtype) -> torch.Tensor:
    """codes [E, N, K] e4m3 with scales [E, sum_p cdiv(rows_p, bm), cdiv(K, bk)] (one block grid
    per part, at most two parts) -> [E, N, K] in `dtype`, each element q * s in fp32 rounded once:
    bitwise fp8_gemm.dequantize_weight of each expert. One Triton launch on CUDA (or under the
    interpreter); a per-expert torch loop elsewhere."""
    from megatron_easyep.mcore import fp8_gemm

    if len(part_rows) > 2:
        raise ValueError(f"dequantize_stacked takes at most two parts, got {part_rows}")
    bm, bk = int(block[0]), int(block[1])
    if not (codes.is_cuda or _interpreting()) or bk & (bk - 1):
        layout = fp8_gemm.Fp8Layout(tuple(part_rows), (bm, bk))
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
        for e in range(codes.shape[0]):
            out[e] = fp8_gemm.dequantize_weight(codes[e], scales[e], layout, dtype)
        return out
    triton, _, _, kernel, _ = _kernels()
    experts, n, k = codes.shape
    out = torch.empty((experts, n, k), dtype=dtype, device=codes.device)
    tile_n = 64
    if out.numel():
        kernel[(experts, triton.cdiv(n, tile_n), triton.cdiv(k, bk))](
            codes, scales, out, n, k, part_rows[0], math.ceil(part_rows[0] / bm),
            codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
            BLOCK_ROWS=bm, BLOCK_COLS=bk, TILE_N=tile_n, OUT_DTYPE=_TL_DTYPES[dtype])
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm (CUTLASS) runs bf16 on sm_90+; elsewhere the loop stays."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def grouped_mm_experts(x, counts, probs, w13, w2, *, activation=F.silu, glu_offset=0.0):
    """All local experts through two torch._grouped_mm calls over stacked weights (w13 [E, 2I, H],
    w2 [E, H, I], in x's dtype), with Megatron's MLP arithmetic between them (so the result is
    bitwise the per-expert loop's wherever the grouped GEMM is bitwise the per-expert GEMM).
    Rows are never padded past offs[-1] (where _grouped_mm leaves output rows uninitialised):
    offs[-1] = sum(counts) = R. Experts with no rows are empty groups."""
    offs = torch.cumsum(counts.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
    gate, up = torch.chunk(h, 2, dim=-1)
    inter = activation(gate) * (up + glu_offset)
    inter = (inter * probs.reshape(-1, 1)).to(x.dtype)
    return torch._grouped_mm(inter, w2.transpose(1, 2), offs=offs)
