"""DeepSeek-style block-wise FP8 (e4m3) weight quantisation, pure torch.

DeepSeek-V3/R1 store most linear weights as float8_e4m3fn plus a float32 ``weight_scale_inv`` with
one entry per (b0 x b1) block (128 x 128 in the released checkpoints). Despite its name the stored
``scale_inv`` *multiplies* on dequantisation:

    w[block] = q[block].float() * scale_inv[block_row, block_col]

and the re-quantisation reference is: per block, scale = amax / 448, q = (block / scale).to(e4m3fn),
stored scale_inv = scale. Edge blocks (when a dimension is not a multiple of the block size) are
partial: they cover only the rows/columns that exist.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# An all-zero block has amax 0; its scale would be 0 and the division 0/0. We floor amax at this
# value instead: the block still quantises to exact zeros and its stored scale is tiny but finite
# and non-zero (so a later dequantisation or re-scaling never sees 0, inf or NaN).
MIN_BLOCK_AMAX = 1e-12
DEFAULT_BLOCK_SIZE = (128, 128)


def _check_block_size(block_size) -> tuple[int, int]:
    if len(block_size) != 2 or any(int(b) != b or b <= 0 for b in block_size):
        raise ValueError(f"block_size must be two positive integers, got {tuple(block_size)}")
    return int(block_size[0]), int(block_size[1])


def scale_shape(weight_shape, block_size=DEFAULT_BLOCK_SIZE) -> tuple[int, int]:
    """Shape of the scale_inv tensor for a 2-D weight: (ceil(out/b0), ceil(in/b1))."""
    b0, b1 = _check_block_size(block_size)
    out_features, in_features = weight_shape
    return math.ceil(out_features / b0), math.ceil(in_features / b1)


def quantize_fp8_blockwise(
    w: torch.Tensor, block_size=DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight [out, in] to (q float8_e4m3fn [out, in], scale_inv float32 [nb0, nb1]).

    The arithmetic is done in float32 whatever the input dtype.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_blockwise expects a 2-D weight, got shape {tuple(w.shape)}")
    b0, b1 = _check_block_size(block_size)
    out_features, in_features = w.shape
    nb0, nb1 = scale_shape(w.shape, (b0, b1))
    w32 = w.detach().to(torch.float32).contiguous()
    owned = w.dtype != torch.float32  # .to() copied, so in-place ops below are safe
    pad_rows, pad_cols = nb0 * b0 - out_features, nb1 * b1 - in_features
    if pad_rows or pad_cols:
        # Zero-pad to whole blocks; padding cannot raise a block's amax.
        w32 = torch.nn.functional.pad(w32, (0, pad_cols, 0, pad_rows))
        owned = True
    blocks = w32.view(nb0, b0, nb1, b1)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb0, nb1]; NaN and inf propagate into it
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_fp8_blockwise: weight contains inf or NaN")
    scale = amax.clamp(min=MIN_BLOCK_AMAX) / FP8_E4M3_MAX
    divisor = scale[:, None, :, None]
    scaled = blocks.div_(divisor) if owned else blocks / divisor
    # amax / (amax / 448) can round to a hair above 448; e4m3fn has no inf, so clamp before the cast.
    q = scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    q = q.view(nb0 * b0, nb1 * b1)[:out_features, :in_features].contiguous()
    return q, scale.contiguous()


def dequantize_fp8_blockwise(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size=DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w[block] = q[block].float() * scale_inv[block_row, block_col], returned as ``dtype``."""
    if q.dim() != 2:
        raise ValueError(f"dequantize_fp8_blockwise expects a 2-D weight, got shape {tuple(q.shape)}")
    b0, b1 = _check_block_size(block_size)
    expected = scale_shape(q.shape, (b0, b1))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(q.shape)} "
            f"with block size {(b0, b1)}: expected {expected}"
        )
    out_features, in_features = q.shape
    per_element_scale = (
        scale_inv.to(torch.float32)
        .repeat_interleave(b0, dim=0)[:out_features]
        .repeat_interleave(b1, dim=1)[:, :in_features]
    )
    return (q.to(torch.float32) * per_element_scale).to(dtype)
