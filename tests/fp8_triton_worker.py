"""Subprocess for tests/test_fp8_resident.py: the Triton FP8 kernels of megatron_easyep.mcore.fp8_gemm
run on CPU tensors under TRITON_INTERPRET=1 (set by the test before this process starts, since
Triton reads it when a kernel is defined), against `fp8_emulation` (the CPU oracle).

    TRITON_INTERPRET=1 python tests/fp8_triton_worker.py OUT.pt
"""

from __future__ import annotations

import os
import sys

import torch


def main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise, quantize_fp8_blockwise
    from megatron_easyep.mcore import fp8_emulation, fp8_gemm

    gen = torch.Generator().manual_seed(0)
    result = {"cases": []}
    # (M, N, K, block): partial row blocks (N), partial K blocks, tiny and one-row M, block sizes
    # the checkpoints use (128 x 128, and the fixtures' 32 x 16 / 32 x 32)
    cases = [(5, 80, 72, (32, 16)), (33, 96, 160, (32, 32)), (1, 40, 48, (32, 16)),
             (17, 200, 300, (128, 128)), (64, 192, 256, (128, 128))]
    for m, n, k, block in cases:
        x = torch.randn(m, k, generator=gen) * 3
        x[0, : min(k, 7)] = 0.0  # a partly zero group
        x[-1, 1:4] = torch.tensor([-1e-9, -0.0, 1e-9])  # round to signed zeros: the codes keep the sign
        w = torch.randn(n, k, generator=gen) * 0.05
        wq, ws = quantize_fp8_blockwise(w, block)

        q_ref, s_ref = fp8_emulation.quantize_activation(x, block[1])
        q_tri, s_tri = fp8_gemm.quantize_activation_triton(x, block[1])

        # emulated: fake-quantised activation @ dequantised weight, float64 to keep the oracle exact
        x_deq = fp8_emulation.dequantize_activation(q_ref, s_ref, block[1], dtype=torch.float64)
        w_deq = dequantize_fp8_blockwise(wq, ws, block, dtype=torch.float64)
        y_ref = x_deq @ w_deq.t()
        y = fp8_gemm.triton_block_fp8_matmul(q_tri, s_tri, wq, ws, block, torch.float32)
        result["cases"].append({
            "shape": (m, n, k), "block": block,
            "codes_equal": torch.equal(q_ref.view(torch.uint8), q_tri.view(torch.uint8)),
            "scales_equal": torch.equal(s_ref, s_tri),
            "rel": float((y.double() - y_ref).abs().max() / y_ref.abs().max()),
        })

    # native_linear with two parts (gate, up: each its own block grid, partial last block) and a
    # row permutation, against the dequantised weight in Megatron's row order
    block = (32, 16)
    k = 40
    gate = torch.randn(36, k, generator=gen) * 0.1
    up = torch.randn(36, k, generator=gen) * 0.1
    (gq, gs), (uq, us) = quantize_fp8_blockwise(gate, block), quantize_fp8_blockwise(up, block)
    layout = fp8_gemm.Fp8Layout((36, 36), block)
    codes, scales = torch.cat([gq, uq]), torch.cat([gs, us])
    perm = torch.randperm(72, generator=gen)  # Megatron row i = HF row perm[i]
    x = torch.randn(3, 2, k, generator=gen)
    y = fp8_gemm.native_linear(x, codes, scales, layout, perm)
    w_hf = torch.cat([dequantize_fp8_blockwise(gq, gs, block, torch.float64),
                      dequantize_fp8_blockwise(uq, us, block, torch.float64)])
    xq, xs = fp8_emulation.quantize_activation(x.reshape(-1, k), block[1])
    x_deq = fp8_emulation.dequantize_activation(xq, xs, block[1], dtype=torch.float64)
    y_ref = (x_deq @ w_hf[perm].t()).reshape(3, 2, 72)
    result["native_linear_rel"] = float((y.double() - y_ref).abs().max() / y_ref.abs().max())
    dense = fp8_gemm.dequantize_weight(codes, scales, layout, torch.float32, torch.argsort(perm))
    result["dequantize_weight_equal"] = torch.equal(dense, w_hf[perm].float())
    torch.save(result, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
