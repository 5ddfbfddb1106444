"""The Triton kernels of mcore/fused_moe_kernels.py (see there for the layout and the numerics).

Imported on first use only: Triton decides between compiling and interpreting (TRITON_INTERPRET=1)
when a kernel is defined, and Triton resolves the helpers a kernel calls among this module's
globals, so the kernels live at module level here rather than inside a function.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(v):
    # v is already divided by its scale and clamped to +-448. Round to the nearest e4m3 value
    # (ties to even) in fp32 so the cast after it is exact: the step is 2^(exponent - 3) for
    # normals, 2^-9 below 2^-6; adding and removing 1.5 * 2^23 steps rounds to a multiple of
    # it (the interpreter's own fp32 -> fp8 cast rounds wrongly across powers of two). The
    # sign of values that round to zero is kept, as torch's cast keeps it.
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0
    rounded = (v + magic) - magic
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    return ((rounded.to(tl.int32, bitcast=True) & 2147483647) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    # fp32 v rounded to DTYPE (round to nearest, ties to even), returned in fp32. bf16 is rounded
    # in integer arithmetic first, because the interpreter's fp32 -> bf16 cast truncates (the GPU's
    # cvt.rn rounds); the cast of the rounded value is then exact on both.
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def load_tile(table_ptr, num_tiles, pid):
    expert = tl.load(table_ptr + pid)
    start = tl.load(table_ptr + num_tiles + pid)
    end = tl.load(table_ptr + 2 * num_tiles + pid)
    return expert, start, end


@triton.jit
def w13_glu_quant_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, probs_ptr, table_ptr, q_ptr, qs_ptr, pre_ptr,
                         num_tiles, I, K, up_scale_row0, glu_offset,
                         stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn,
                         stride_qm, stride_qsm, stride_pm,
                         BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         OUT_DTYPE: tl.constexpr, STORE_PRE: tl.constexpr,
                         MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr):
    expert, start, end = load_tile(table_ptr, num_tiles, tl.program_id(0))
    if expert < 0:  # past the last tile of the last expert
        return
    pid_n = tl.program_id(1)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_N)  # BLOCK_K = BLOCK_N = the K block of both weights
    m_mask = offs_m < end
    n_mask = offs_n < I
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    ws_e = ws_ptr + expert.to(tl.int64) * stride_wse
    gate_s_rows = offs_n // BLOCK_ROWS
    up_s_rows = up_scale_row0 + offs_n // BLOCK_ROWS
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_N)):
        k = kb * BLOCK_N + offs_k
        k_mask = k < K
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        b_gate = tl.load(w_e + offs_n[None, :] * stride_wn + k[:, None], mask=b_mask, other=0.0)
        b_up = tl.load(w_e + (I + offs_n[None, :]) * stride_wn + k[:, None], mask=b_mask, other=0.0)
        a_s = tl.load(as_ptr + offs_m.to(tl.int64) * stride_asm + kb, mask=m_mask, other=0.0)
        gate_s = tl.load(ws_e + gate_s_rows * stride_wsn + kb, mask=n_mask, other=0.0)
        up_s = tl.load(ws_e + up_s_rows * stride_wsn + kb, mask=n_mask, other=0.0)
        acc_gate += tl.dot(a, b_gate, out_dtype=tl.float32) * a_s[:, None] * gate_s[None, :]
        acc_up += tl.dot(a, b_up, out_dtype=tl.float32) * a_s[:, None] * up_s[None, :]
    # Megatron's MLP on the per-expert path: fc1 output in the model dtype, then
    # silu(gate) * (up + glu_linear_offset), times the row's combine weight, each rounded
    gate = round_to(acc_gate, OUT_DTYPE)
    up = round_to(round_to(acc_up, OUT_DTYPE) + glu_offset, OUT_DTYPE)
    silu = round_to(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), OUT_DTYPE)
    h = round_to(silu * up, OUT_DTYPE)
    prob = tl.load(probs_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    h = round_to(h * prob[:, None], OUT_DTYPE)
    mask = m_mask[:, None] & n_mask[None, :]
    h = tl.where(mask, h, 0.0)  # columns past I do not raise the group's amax
    if STORE_PRE:  # tests: the values the second quantisation saw
        tl.store(pre_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :], h, mask=mask)
    # DeepSeek's dynamic 1 x BLOCK_N quantisation of the intermediate (fp8_emulation's oracle)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(h), axis=1), MIN_AMAX), FP8_MAX)
    v = tl.minimum(tl.maximum(tl.math.div_rn(h, scale[:, None]), -FP8_MAX), FP8_MAX)
    v = round_to_e4m3(v)
    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_n[None, :],
             v.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(qs_ptr + offs_m.to(tl.int64) * stride_qsm + pid_n, scale, mask=m_mask)


@triton.jit
def w2_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, table_ptr, c_ptr, num_tiles, N, K,
              stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
              BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    expert, start, end = load_tile(table_ptr, num_tiles, tl.program_id(0))
    if expert < 0:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < end
    n_mask = offs_n < N
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    ws_e = ws_ptr + expert.to(tl.int64) * stride_wse
    s_rows = offs_n // BLOCK_ROWS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        k_mask = k < K
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_e + offs_n[None, :] * stride_wn + k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        a_s = tl.load(as_ptr + offs_m.to(tl.int64) * stride_asm + kb, mask=m_mask, other=0.0)
        b_s = tl.load(ws_e + s_rows * stride_wsn + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :],
             round_to(acc, OUT_DTYPE).to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, part0_rows, part1_scale_row0,
                   stride_qe, stride_qn, stride_se, stride_sn, stride_oe, stride_on,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_N: tl.constexpr,
                   OUT_DTYPE: tl.constexpr):
    # out[e, n, k] = float(q[e, n, k]) * scale(e, n, k): one fp32 product, rounded to out's dtype
    e = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)
    offs_k = tl.program_id(2) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    second = offs_n >= part0_rows  # rows of the second part use its own block grid
    s_rows = tl.where(second, part1_scale_row0 + (offs_n - part0_rows) // BLOCK_ROWS, offs_n // BLOCK_ROWS)
    s = tl.load(s_ptr + e * stride_se + s_rows * stride_sn + tl.program_id(2), mask=offs_n < N, other=0.0)
    q = tl.load(q_ptr + e * stride_qe + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0.0)
    out = q.to(tl.float32) * s[:, None]
    tl.store(out_ptr + e * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :],
             round_to(out, OUT_DTYPE).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tile_table_kernel(counts_ptr, table_ptr, num_experts, num_tiles,
                      BLOCK_M: tl.constexpr, EXPERTS_P2: tl.constexpr, TILES: tl.constexpr):
    # per tile t: its expert = how many experts end (in tiles) at or before t; its first row = the
    # rows of those experts plus t's offset inside its expert. Masked sums, no gather.
    t = tl.program_id(0) * TILES + tl.arange(0, TILES)
    e = tl.arange(0, EXPERTS_P2)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
    tiles = (counts + (BLOCK_M - 1)) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    before = tile_end[None, :] <= t[:, None]
    expert = tl.sum(before.to(tl.int32), axis=1)
    first_tile = tl.sum(tl.where(before, tiles[None, :], 0), axis=1)
    row_start = tl.sum(tl.where(before, counts[None, :], 0), axis=1)
    count = tl.sum(tl.where(e[None, :] == expert[:, None], counts[None, :], 0), axis=1)
    live = t < num_tiles
    valid = expert < num_experts  # past the last tile: (-1, 0, 0)
    tl.store(table_ptr + t, tl.where(valid, expert, -1).to(tl.int32), mask=live)
    tl.store(table_ptr + num_tiles + t, tl.where(valid, row_start + (t - first_tile) * BLOCK_M, 0).to(tl.int32),
             mask=live)
    tl.store(table_ptr + 2 * num_tiles + t, tl.where(valid, row_start + count, 0).to(tl.int32), mask=live)
