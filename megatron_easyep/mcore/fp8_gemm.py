"""GEMMs against weights held as DeepSeek's FP8 bytes: y = x @ W^T with W stored as e4m3 codes
plus one fp32 `weight_scale_inv` per (bm x bk) block.

A held weight (`Fp8Weight`) is the concatenation, in HF row order, of the HF tensors a Megatron
weight is built from (gate and up for a SwiGLU fc1), byte for byte, with their scale tensors
concatenated the same way. Each part keeps its own block grid, so a partial edge block of the gate
(576 rows, say) never mixes with the up projection's rows. Megatron's row order differs from HF's
only for rope_interleave = false checkpoints (the loader de-interleaves each head's rope rows, which
crosses block boundaries); rather than expanding scales per row, the weight stays in HF order and
the permutation is applied to the output columns (`out_index`): y_megatron[:, i] = y_hf[:, p[i]].

Compute modes:
* `dequantize` (`--fp8 none`, and `emulated` with its activation hooks): the weight is dequantised
  block-wise into the compute dtype just before the matmul, with the same float32 arithmetic the
  loader used to apply at load time, and the matmul is Megatron's own; results are bitwise those of
  the dequantise-at-load path. Extra memory: one weight matrix in the compute dtype.
* `native`: DeepSeek's FP8 numerics with real FP8 GEMMs. Activations are quantised per token in
  1 x bk groups (`quantize_activation_triton`, bit-exact with fp8_emulation.quantize_activation on
  CPU under the interpreter and on an H200: bench/results/gpu_check_h200.json),
  and the product runs with fp32 accumulation through
  - `torch._scaled_mm` in block-wise mode on sm_90 for 128 x 128 blocks and K a multiple of 512
    (cuBLAS's block-scaled FP8 GEMM, the kernel Transformer Engine's Float8BlockScaling recipe
    calls), or
  - the Triton kernel below elsewhere on CUDA (FP8 tensor cores: sm_89+; older GPUs are refused
    with a pointer to `emulated`) and for block shapes cuBLAS does not take.
  We wrote the Triton kernel instead of importing torchao's or transformers' fine-grained FP8
  kernels: those are not installable on the GPU image this project is checked on, they assume
  128-multiples, and ours must handle per-part block grids and partial edge blocks, and run under
  TRITON_INTERPRET=1 on CPU so CI can check its numerics against `emulated`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_easyep.checkpoint.fp8_blocks import FP8_DTYPE, FP8_E4M3_MAX, MIN_BLOCK_AMAX, dequantize_fp8_blockwise

# rows dequantised at a time (a multiple of every block height we meet): bounds the fp32 temporary
_DEQUANT_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Fp8Layout:
    """How a held FP8 weight is cut into HF tensors: rows per part (HF order) and the block size."""

    part_rows: tuple[int, ...]
    block: tuple[int, int]

    @property
    def scale_rows(self) -> tuple[int, ...]:
        return tuple(math.ceil(r / self.block[0]) for r in self.part_rows)


def _dequantize_chunk(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """float32 q * scale per block: the same single fp32 product per element as
    dequantize_fp8_blockwise (so the same values), broadcast over whole blocks in place when the
    chunk has no partial block instead of materialising a per-element scale."""
    (rows, cols), (bm, bk) = q.shape, block
    if rows % bm or cols % bk:
        return dequantize_fp8_blockwise(q, s, block, dtype=torch.float32)
    out = q.to(torch.float32)
    out.view(rows // bm, bm, cols // bk, bk).mul_(s.to(torch.float32)[:, None, :, None])
    return out


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, layout: Fp8Layout, dtype: torch.dtype,
                      dest_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in `dtype`, rows in Megatron's order: each part dequantised block-wise in float32
    (exactly `checkpoint.fp8_blocks.dequantize_fp8_blockwise`), a chunk of rows at a time, and
    written to its final rows (`dest_rows[hf_row]`, or in place when None)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    bm = layout.block[0]
    chunk = max(bm, _DEQUANT_CHUNK_ROWS // bm * bm)
    row0 = srow0 = 0
    for rows, srows in zip(layout.part_rows, layout.scale_rows):
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            q = weight[row0 + start:row0 + stop]
            s = scale_inv[srow0 + start // bm:srow0 + math.ceil(stop / bm)]
            values = _dequantize_chunk(q, s, layout.block).to(dtype)
            if dest_rows is None:
                out[row0 + start:row0 + stop] = values
            else:
                out.index_copy_(0, dest_rows[row0 + start:row0 + stop], values)
        row0 += rows
        srow0 += srows
    return out


# ------------------------------------------------------------------------------------------------
# native: activation quantisation and the block-scaled GEMM
# ------------------------------------------------------------------------------------------------

def native_unavailable_reason(device: torch.device) -> str | None:
    """Why `native` cannot run on `device` (None when it can)."""
    if device.type != "cuda":
        return (f"--fp8 native runs real FP8 GEMMs and needs a CUDA GPU (the model is on {device.type}); "
                "use --fp8 emulated for DeepSeek's FP8 numerics on any device")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"--fp8 native needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}; use --fp8 emulated")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"--fp8 native needs Triton on this GPU ({exc}); use --fp8 emulated"
    return None


def scaled_mm_blockwise_ok(device: torch.device, block: tuple[int, int], n: int, k: int) -> bool:
    """cuBLAS's block-scaled FP8 GEMM takes 128 x 128 weight blocks and 1 x 128 activation groups
    on sm_90 (torch built with CUDA >= 12.9), with N whole blocks and K a whole number of 4-block
    groups (K = 1408, 11 blocks, gives wrong products: see scaled_mm_blockwise)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or tuple(block) != (128, 128):
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return k % 512 == 0 and n % 128 == 0


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero rows up to a multiple of `multiple` (through uint8 for FP8, which has no pad kernel)."""
    extra = -t.shape[0] % multiple
    if not extra:
        return t
    if t.dtype == FP8_DTYPE:
        zeros = torch.zeros(extra, t.shape[1], dtype=torch.uint8, device=t.device).view(FP8_DTYPE)
        return torch.cat([t.view(torch.uint8), zeros.view(torch.uint8)]).view(FP8_DTYPE)
    return torch.cat([t, t.new_zeros(extra, t.shape[1])])


def scaled_mm_blockwise(xq, xs, wq, ws, out_dtype) -> torch.Tensor:
    """y [M, N] = (xq * xs) @ (wq * ws)^T through torch._scaled_mm's block-wise mode: activation
    scales [M, K/128] (1 x 128, outer-dim-major), weight scales [N/128, K/128] (128 x 128). M is
    padded to a multiple of 4 (cuBLAS's scale layout)."""
    if wq.shape[1] % 512:
        # measured on an H200 (bench/gpu_check.py part e): with K/128 not a multiple of 4 cuBLAS
        # reads the weight scales with a padded stride and returns wrong products without an error
        raise ValueError(f"cuBLAS block-wise FP8 needs K a multiple of 512, got K = {wq.shape[1]}")
    m = xq.shape[0]
    xq, xs = _pad_rows(xq, 4), _pad_rows(xs, 4)
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=out_dtype)
    return y[:m]


_TRITON_KERNELS = None
_SCALED_MM_REFUSED: dict = {}  # (N, K, block) shapes cuBLAS refused, with its message


def _triton_kernels():
    """Compile-on-first-use (Triton reads TRITON_INTERPRET when a kernel is defined)."""
    global _TRITON_KERNELS
    if _TRITON_KERNELS is not None:
        return _TRITON_KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                         GROUP: tl.constexpr, MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr):
        row = tl.program_id(0)
        group = tl.program_id(1)
        cols = group * GROUP + tl.arange(0, GROUP)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        # IEEE round-to-nearest divisions: Triton's `/` on fp32 compiles to an approximate divide on
        # CUDA (off by an ulp now and then), which would break bit-equality with torch's reference
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), MIN_AMAX), FP8_MAX)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        # Round to the nearest e4m3 value (ties to even) in fp32 so the cast below is exact: the
        # step is 2^(exponent - 3) for normals, 2^-9 below 2^-6; adding and removing 1.5 * 2^23
        # times the step rounds to a multiple of it. (Triton's interpreter rounds fp32 -> fp8
        # wrongly across a power of two; the hardware cvt does not, and both agree on this.)
        exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        magic = step * 12582912.0
        rounded = (v + magic) - magic
        # keep v's sign on values that round to zero (torch's cast gives -0 for a tiny negative)
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        v = ((rounded.to(tl.int32, bitcast=True) & 2147483647) | sign).to(tl.float32, bitcast=True)
        tl.store(q_ptr + row * stride_qm + cols, v.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * stride_sm + group, scale)

    @triton.jit
    def block_fp8_matmul_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                                stride_am, stride_ak, stride_asm, stride_ask,
                                stride_bn, stride_bk, stride_bsn, stride_bsk, stride_cm, stride_cn,
                                BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        # C = sum over K blocks of dot(A codes, B codes) * a_scale[m, kb] * b_scale[n // BLOCK_ROWS, kb]
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            k_mask = k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + k[:, None] * stride_bk,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            part = tl.dot(a, b, out_dtype=tl.float32)
            a_s = tl.load(as_ptr + offs_m * stride_asm + kb * stride_ask, mask=m_mask, other=0.0)
            b_s = tl.load(bs_ptr + (offs_n // BLOCK_ROWS) * stride_bsn + kb * stride_bsk, mask=n_mask, other=0.0)
            acc += part * a_s[:, None] * b_s[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    _TRITON_KERNELS = (triton, act_quant_kernel, block_fp8_matmul_kernel)
    return _TRITON_KERNELS


def _check_triton_group(group: int) -> None:
    if group < 16 or group & (group - 1):
        raise ValueError(f"the Triton FP8 kernels need a power-of-two K block of at least 16, got {group} "
                         "(weight_block_size in config.json); use --fp8 emulated")


def quantize_activation_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], fp32 scales [M, ceil(K / group)]), DeepSeek's dynamic 1 x group
    quantisation (scale = max(amax, MIN_BLOCK_AMAX) / 448), in one pass without an fp32 copy of x."""
    _check_triton_group(group)
    triton, kernel, _ = _triton_kernels()
    x = x.contiguous()
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m:
        kernel[(m, groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0),
                            GROUP=group, MIN_AMAX=MIN_BLOCK_AMAX, FP8_MAX=FP8_E4M3_MAX)
    return q, s


def triton_block_fp8_matmul(xq, xs, wq, ws, block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] = (xq * xs per 1 x bk group) @ (wq * ws per bm x bk block)^T, fp32 accumulation."""
    bm, bk = int(block[0]), int(block[1])
    _check_triton_group(bk)
    triton, _, kernel = _triton_kernels()
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    kernel[grid](xq, xs, wq, ws, y, m, n, k,
                 xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1),
                 wq.stride(0), wq.stride(1), ws.stride(0), ws.stride(1), y.stride(0), y.stride(1),
                 BLOCK_ROWS=bm, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk)
    return y


def native_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, layout: Fp8Layout,
                  out_index: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """x [..., K] @ W^T with DeepSeek's FP8 numerics, in x's dtype. Each HF part runs as its own
    block-scaled GEMM (its block grid starts at its first row); outputs are concatenated in HF row
    order and permuted to Megatron's (`out_index`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_activation_triton(x2, layout.block[1])
    outs, row0, srow0 = [], 0, 0
    for rows, srows in zip(layout.part_rows, layout.scale_rows):
        wq, ws = weight[row0:row0 + rows], scale_inv[srow0:srow0 + srows]
        key = (rows, shape[-1], tuple(layout.block))
        use = backend or ("scaled_mm" if scaled_mm_blockwise_ok(x.device, layout.block, rows, shape[-1])
                          and key not in _SCALED_MM_REFUSED else "triton")
        if use == "scaled_mm":
            try:
                outs.append(scaled_mm_blockwise(xq, xs, wq, ws, x.dtype))
            except RuntimeError as exc:  # a torch/cuBLAS build without block-wise FP8: Triton instead
                _SCALED_MM_REFUSED[key] = str(exc)[:200]
                use = "triton"
        if use == "triton":
            outs.append(triton_block_fp8_matmul(xq, xs, wq, ws, layout.block, x.dtype))
        row0 += rows
        srow0 += srows
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if out_index is not None:
        y = y.index_select(-1, out_index)
    return y.reshape(*shape[:-1], y.shape[-1])
