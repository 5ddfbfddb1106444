"""Subprocess for tests/test_fp8_emulation.py: the real Megatron-Core GPTModel (one process, world
size 1, gloo) on tiny checkpoints, with and without megatron_easyep.mcore.fp8_emulation.

    python tests/fp8_emulation_worker.py OUT.pt BF16_CKPT FP8_CKPT FP8_NONINTERLEAVED_CKPT

Writes a dict of tensors/facts that the test checks (the test process never imports Megatron).
"""

from __future__ import annotations

import sys

import torch

# Linears whose raw input, original weight and output are captured for the plain-torch reference:
# one attention projection (layer 0), one routed expert and one shared expert (layer 1).
CAPTURE = (
    "decoder.layers.0.self_attention.linear_kv_down_proj",
    "decoder.layers.1.mlp.experts.local_experts.{expert}.linear_fc1",
    "decoder.layers.1.mlp.shared_experts.linear_fc2",
)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main(out_path, bf16_ckpt, fp8_ckpt, fp8_nonint_ckpt):
    from megatron_easyep.mcore import parallel as distributed
    from megatron_easyep.mcore import fp8_emulation
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    distributed.init_parallel(1, seed=0)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    result: dict = {"ids": ids}

    # 1. bf16 checkpoint in float32: reference logits, then emulated FP8 logits.
    _, model = model_lib.load_megatron_model(bf16_ckpt, dtype=torch.float32)
    with torch.no_grad():
        result["logits_ref"] = model_lib.forward_padded(model, ids, len(ids)).float().clone()
    before = _weights(model)

    # Pick a routed expert of layer 1 that receives tokens in this forward.
    routed = {}

    def record_routing(module, args, output):
        routed["map"] = output[1].detach().clone()  # returns None: the output is not replaced

    handle = model.decoder.layers[1].mlp.router.register_forward_hook(record_routing)
    with torch.no_grad():
        model_lib.forward_padded(model, ids, len(ids))
    handle.remove()
    expert = int(routed["map"].sum(dim=0).argmax())
    capture_names = [n.format(expert=expert) for n in CAPTURE]

    captured: dict = {}
    modules = dict(model.named_modules())
    handles = []
    for name in capture_names:
        # Registered BEFORE enable_fp8_emulation, so this pre-hook sees the raw input.
        handles.append(modules[name].register_forward_pre_hook(
            lambda m, a, name=name: captured.__setitem__(name + ":x", a[0].detach().clone())))
        handles.append(modules[name].register_forward_hook(
            lambda m, a, out, name=name: captured.__setitem__(name + ":y", out[0].detach().clone())))

    cfg = DeepseekV3Config.load(bf16_ckpt)
    state = fp8_emulation.enable_fp8_emulation(model, (128, 128), hf_config=cfg)
    with torch.no_grad():
        result["logits_fp8"] = model_lib.forward_padded(model, ids, len(ids)).float().clone()
    after = _weights(model)
    result["state"] = state.as_dict()
    result["modules"] = list(state.modules)
    result["changed_params"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    result["captures"] = {
        name: {"x": captured[name + ":x"], "y": captured[name + ":y"],
               "w": before[name + ".weight"]} for name in capture_names}
    for h in handles:
        h.remove()

    # Removing the hooks leaves the quantised weights but full-precision activations.
    state.remove()
    with torch.no_grad():
        result["logits_weights_only"] = model_lib.forward_padded(model, ids, len(ids)).float().clone()
    result["attribute_cleared"] = getattr(model, "_easyep_fp8_emulation", None) is None
    del model

    # 2. FP8 checkpoints dequantised at load in float32: the weight step must be a no-op (already
    # representable). (FP8-resident weights, the default, skip the weight step altogether.)
    for key, ckpt in (("fp8", fp8_ckpt), ("fp8_noninterleaved", fp8_nonint_ckpt)):
        cfg = DeepseekV3Config.load(ckpt)
        _, model = model_lib.load_megatron_model(ckpt, dtype=torch.float32, dequantize_at_load=True)
        before = _weights(model)
        state = fp8_emulation.enable_fp8_emulation(model, cfg.weight_block_size, hf_config=cfg)
        after = _weights(model)
        result[key] = {"state": state.as_dict(),
                       "changed_params": sorted(n for n in before
                                                if not torch.equal(before[n], after[n]))}
        if key == "fp8_noninterleaved":
            # The same model quantised WITHOUT undoing the rope permutation: blocks straddle the
            # permuted rows, so values move (proves hf_config matters for such checkpoints).
            _, plain = model_lib.load_megatron_model(ckpt, dtype=torch.float32, dequantize_at_load=True)
            plain_state = fp8_emulation.enable_fp8_emulation(plain, cfg.weight_block_size)
            result[key]["changed_without_hf_config"] = plain_state.weight_elements_changed
            del plain
        del model

    torch.save(result, out_path)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
