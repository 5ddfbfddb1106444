"""Subprocess for tests/test_fp8_resident.py (run under torchrun): the real Megatron-Core GPTModel on
an FP8 checkpoint, held FP8-resident (the default) and dequantised at load, through the same
forward and the same scorer.

    torchrun --nproc-per-node N tests/fp8_resident_worker.py OUT.pt CKPT EXPERT_PARALLEL DISPATCHERS

Rank 0 writes {dispatcher: {"resident"|"dequantized": {"logits": [...], "sums": ..., "tokens": ...}}}
plus, with one rank, what the loaded model holds (for the byte checks).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _sequences(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (23, 40, 9)]


def _run(ckpt, ep: int, dispatcher: str, dequantize_at_load: bool, fp8_mode: str = "none") -> dict:
    from megatron.core import parallel_state

    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.mcore import compat, fp8_emulation
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.scoring.scorer import ExpertScorer

    cfg = DeepseekV3Config.load(ckpt)
    _, model = model_lib.load_megatron_model(ckpt, dtype=torch.float32, expert_parallel=ep,
                                             dispatcher=dispatcher, dequantize_at_load=dequantize_at_load)
    fp8 = fp8_emulation.configure_fp8(model, fp8_mode, cfg)
    layers = [i for i, _ in compat.iter_moe_layers(model)]
    scorer = ExpertScorer(layers, cfg.n_routed_experts, ["all"],
                          ep_group=parallel_state.get_expert_model_parallel_group())
    detach = compat.attach_moe_observers(model, scorer.observe)
    logits = []
    with torch.no_grad():
        for ids in _sequences(cfg.vocab_size):
            scorer.begin_step(torch.zeros(len(ids), dtype=torch.long))
            logits.append(model_lib.forward_padded(model, ids, len(ids)).float().clone())
    detach()
    scorer.all_reduce()
    out = {"logits": logits, "sums": scorer.sums.clone(), "tokens": scorer.tokens.clone(), "fp8": fp8}
    if dist.get_world_size() == 1:
        held = {}
        for name, module in compat.fp8_linears.fp8_resident_linears(model):
            if module.holds_fp8:
                held[name] = {"codes": module.weight.detach().clone(),
                              "scale_inv": module.weight_scale_inv.clone(),
                              "part_rows": list(module.fp8_layout.part_rows),
                              "out_index": None if module.fp8_out_index is None else module.fp8_out_index.clone()}
        out["held"] = held
        out["bytes"] = {name: t.numel() * t.element_size()
                        for name, t in list(model.named_parameters()) + list(model.named_buffers())}
        out["dtypes"] = {name: str(t.dtype) for name, t in
                         list(model.named_parameters()) + list(model.named_buffers())}
    del model
    return out


def main(out_path, ckpt, ep, dispatchers):
    from megatron_easyep.mcore import parallel

    ep = int(ep)
    parallel.init_parallel(ep, seed=0)
    result = {}
    for dispatcher in dispatchers.split(","):
        result[dispatcher] = {
            "resident": _run(ckpt, ep, dispatcher, dequantize_at_load=False),
            "dequantized": _run(ckpt, ep, dispatcher, dequantize_at_load=True),
        }
    if ep == 1:
        result["emulated"] = {"resident": _run(ckpt, ep, "alltoall", False, "emulated"),
                              "dequantized": _run(ckpt, ep, "alltoall", True, "emulated")}
    if dist.get_rank() == 0:
        torch.save(result, out_path)
    parallel.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
