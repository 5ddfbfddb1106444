"""Minimal reproduction: vLLM-CPU's rotary kernel vs DeepSeek's interleaved rope (no model, no engine).

    .venv-serve/bin/python bench/rope_repro.py        # the serving venv (vllm-cpu 0.32.0)

DeepSeek-V3's MLA rotates q_pe = q[..., qk_nope_head_dim:] (a strided view of every head's query)
and k_pe (one shared head) with interleaved, GPT-J-style pairs (x0, x1), (x2, x3), ... vLLM builds
that rope with `get_rope(..., is_neox_style=False)`: a `DeepseekScalingRotaryEmbedding` when
config.json has YaRN `rope_scaling`, a plain `RotaryEmbedding` when it has none. This script builds
both exactly as vLLM's deepseek_v2.py does, rotates the same q_pe / k_pe with each of vLLM's
implementations and compares them with a hand-written numpy reference (DeepSeek's formula,
float64). It prints the largest |difference| per case, then which position the plain-rope CPU
kernel gave each (token, head) row of a 3-D query, and exits 1 if vLLM's CPU path disagrees.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

YARN = {"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
HEADS, NOPE, ROPE_DIM, KV_LORA, TOKENS = 4, 32, 64, 512, 6


def reference_inv_freq(rope: dict, dim: int) -> np.ndarray:
    """DeepSeek-V3's frequencies (inference/model.py precompute_freqs_cis, YaRN when scaled), float64."""
    base = rope["rope_theta"]
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope["rope_type"] == "default":
        return freqs

    def correction_dim(rotations):
        original = rope["original_max_position_embeddings"]
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rope["beta_slow"])), dim - 1)
    smooth = 1 - np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    return freqs / rope["factor"] * (1 - smooth) + freqs * smooth


def reference_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x: [tokens, heads, dim]; pair (x[2i], x[2i+1]) rotated by position * inv_freq[i] (mscale 1 here)."""
    angle = positions[:, None, None] * inv_freq[None, None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def check(rope_parameters: dict) -> float:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):  # as vLLM's deepseek_v2.py builds it for MLA
        rope = get_rope(ROPE_DIM, max_position=512, is_neox_style=False, rope_parameters=dict(rope_parameters),
                        dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(TOKENS)
    q = torch.randn(TOKENS, HEADS, NOPE + ROPE_DIM, generator=g)  # per head [q_nope | q_pe]
    kv = torch.randn(TOKENS, KV_LORA + ROPE_DIM, generator=g)  # kv_a_proj_with_mqa output [kv_c | k_pe]
    inv_freq = reference_inv_freq(rope_parameters, ROPE_DIM)
    want_q = reference_rope(q[..., NOPE:].double().numpy(), positions.numpy(), inv_freq)
    want_k = reference_rope(kv[:, None, KV_LORA:].double().numpy(), positions.numpy(), inv_freq)
    print(f"{rope_parameters['rope_type']}: vLLM builds {type(rope).__name__}; its forward_cpu is "
          f"{type(rope).forward_cpu.__qualname__}")
    worst_cpu = 0.0
    for method in ("forward_native", "forward_cpu"):
        for layout in ("strided (as the model passes)", "contiguous copies"):
            qq, kk = q.clone(), kv.clone()
            q_pe, k_pe = qq[..., NOPE:], kk[:, KV_LORA:].unsqueeze(1)
            if layout.startswith("contiguous"):
                q_pe, k_pe = q_pe.contiguous(), k_pe.contiguous()
            # the model uses the returned tensors: `q[..., nope:], k_pe = self.rotary_emb(positions, q_pe, k_pe)`
            got_q, got_k = getattr(rope, method)(positions, q_pe, k_pe)
            dq = np.abs(got_q.double().numpy() - want_q)
            dk = np.abs(got_k.double().numpy() - want_k)
            per_position = np.maximum(dq.max(axis=(1, 2)), dk.max(axis=(1, 2)))
            print(f"  {method:15s} {layout:30s} max|diff| {per_position.max():.2e}  by position "
                  + " ".join(f"{v:.1e}" for v in per_position))
            if method == "forward_cpu":
                worst_cpu = max(worst_cpu, per_position.max())
    return worst_cpu


def diagnose_plain() -> None:
    """What the plain-rope CPU kernel did to each [head] row of a 3-D [tokens, heads, dim] query."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(ROPE_DIM, max_position=512, is_neox_style=False, rope_parameters=dict(PLAIN),
                        dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(TOKENS, HEADS, ROPE_DIM, generator=g)
    rows_in = q.reshape(-1, ROPE_DIM).double().numpy()
    got_q, _ = rope.forward_cpu(torch.arange(TOKENS), q.clone(), torch.randn(TOKENS, 1, ROPE_DIM, generator=g))
    rows_out = got_q.reshape(-1, ROPE_DIM).double().numpy()
    inv_freq = reference_inv_freq(PLAIN, ROPE_DIM)
    seen = []
    for row in range(TOKENS * HEADS):
        token, head = divmod(row, HEADS)
        as_if = [reference_rope(rows_in[row][None, None], np.array([p]), inv_freq)[0, 0] for p in range(TOKENS)]
        at = [p for p, want in enumerate(as_if) if np.abs(rows_out[row] - want).max() < 1e-5]
        seen.append(f"t{token}h{head}:pos{at[0] if at else '?'}")
    print("plain forward_cpu, each (token t, head h) row of q -> the position it was rotated to (pos0 = unrotated):")
    print("  " + " ".join(seen))


def main() -> int:
    worst = {name: check(params) for name, params in (("yarn", YARN), ("plain", PLAIN))}
    diagnose_plain()
    bad = [name for name, value in worst.items() if value > 1e-5]
    print("vLLM CPU rope disagrees with the reference for: " + (", ".join(bad) if bad else "nothing"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
