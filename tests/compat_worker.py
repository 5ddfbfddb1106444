"""Worker for tests/test_compat.py (its own process: it initialises a world of one and patches
Megatron-Core's routing process-wide). Prints one JSON line of findings.

    python tests/compat_worker.py FP8_CHECKPOINT
"""

from __future__ import annotations

import json
import logging
import sys

import torch


def _error(fn) -> str | None:
    from megatron_easyep.mcore.compat import ContractError

    try:
        fn()
    except ContractError as exc:
        return str(exc)
    return None


def routing_findings() -> dict:
    """Megatron's own entry point (topk_routing_with_score_function) with the rule installed: its
    original answer, bitwise, where the rules agree; the DeepSeek rule where they differ."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_easyep.mcore.compat import routing

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=gen)
    bias = torch.rand(16, generator=gen) * 0.1

    def route(topk, groups, group_topk):
        return moe_utils.topk_routing_with_score_function(
            logits, topk, num_groups=groups, group_topk=group_topk, scaling_factor=2.5,
            score_function="sigmoid", expert_bias=bias)

    agree_before = route(4, 4, 2)
    differ_before = route(6, 4, 2)
    installed_for_agreeing = routing.apply_deepseek_routing(4, 16, 4, 2)
    untouched = moe_utils.group_limited_topk is routing.megatron_group_limited_topk()
    installed = routing.apply_deepseek_routing(6, 16, 4, 2)
    agree_after, differ_after = route(4, 4, 2), route(6, 4, 2)
    scores = torch.sigmoid(logits) + bias
    deepseek_ids = routing.deepseek_group_limited_topk(scores, 6, 64, 16, 4, 2)[1]
    return {
        "installed_for_agreeing_config": installed_for_agreeing,
        "moe_utils_untouched_for_agreeing_config": untouched,
        "installed_for_differing_config": installed,
        "agreeing_bitwise_equal": all(torch.equal(a, b) for a, b in zip(agree_before, agree_after)),
        "differing_changed": not torch.equal(differ_before[1], differ_after[1]),
        "differing_is_deepseek": torch.equal(differ_after[1], torch.zeros_like(differ_after[1]).scatter_(
            1, deepseek_ids, True)),
    }


def model_findings(checkpoint: str) -> dict:
    from megatron_easyep.mcore import compat, parallel
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.mcore.compat import contract

    parallel.init_parallel(1)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(contract.GPT_MODEL_LOGGER).addHandler(handler)
    _, model = model_lib.load_megatron_model(checkpoint, dtype=torch.float32)
    banner = [r.getMessage()[:40] for r in records if "DEPRECATED" in r.getMessage()]
    out = {"banner_lines": banner, "fp8_linears": len(compat.fp8_linears.fp8_resident_linears(model))}

    # the FP8-resident swap reached every linear; one put back to its plain class is caught
    out["fp8_check_ok"] = _error(lambda: contract.check_fp8_resident_model(model))
    _, layer = next(compat.iter_moe_layers(model))
    expert_fc1 = compat.local_experts(layer.mlp)[0].linear_fc1
    real_class = type(expert_fc1)
    # back to Megatron's plain class (past Fp8Resident* and the fused experts' Stacked* classes)
    expert_fc1.__class__ = next(c for c in real_class.__mro__ if c.__module__.startswith("megatron."))
    out["fp8_check_broken"] = _error(lambda: contract.check_fp8_resident_model(model))
    expert_fc1.__class__ = real_class

    # g inside the experts: holds for SequentialMLP; an experts module that scales its input
    # instead (the scorer's ||row|| / g would then be wrong) is refused at attach
    out["gate_ok"] = _error(lambda: compat.attach_moe_observers(model, lambda i, o: None)())
    _, second = list(compat.iter_moe_layers(model))[-1]
    experts = second.mlp.experts
    original_forward = experts.forward

    def gate_on_input(hidden, tokens_per_expert, probs):
        scaled = hidden * probs[:, None].to(hidden.dtype)
        return original_forward(scaled, tokens_per_expert, torch.ones_like(probs))

    experts.forward = gate_on_input
    fresh = compat.hooks._GATE_CHECKED
    fresh.discard(model)
    out["gate_broken"] = _error(lambda: compat.attach_moe_observers(model, lambda i, o: None)())
    del experts.forward
    return out


if __name__ == "__main__":
    findings = {"routing": routing_findings(), "model": model_findings(sys.argv[1])}
    print(json.dumps(findings))
