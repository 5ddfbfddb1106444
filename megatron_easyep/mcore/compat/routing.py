"""DeepSeek routing on Megatron-Core's router, and the router state training updates.

Group-limited top-k: DeepSeek-V3 (and transformers, vLLM, SGLang) score a group by the sum of its
top-2 experts; Megatron-Core's moe_utils.group_limited_topk sums the top (topk // group_topk).
The two agree whenever topk // group_topk equals min(2, group size), or every group is selected
(group_topk >= num_groups): DeepSeek-V3/R1 (top-8 of 256 experts, 8 groups, top-4 groups:
8 // 4 = 2) route with Megatron's own function, bitwise. Only a config where the rules differ
(e.g. top-6 with 2 of 4 groups) installs the DeepSeek rule, and even then Megatron's function
still answers every call whose arguments agree (the patch is process-wide, a process may build
several models).
"""

from __future__ import annotations

import functools

import torch

GROUP_LIMITED_TOPK_PARAMS = ("scores", "topk", "num_tokens", "num_experts", "num_groups", "group_topk")


def deepseek_group_limited_topk(scores: torch.Tensor, topk: int, num_tokens: int,
                                num_experts: int, num_groups: int, group_topk: int):
    """Group-limited top-k exactly as DeepSeek-V3 (and transformers, vLLM, SGLang) route: a group
    scores the sum of its top-2 experts. Megatron-Core sums the top (topk // group_topk), which
    agrees only when topk / group_topk == 2 and crashes when that exceeds the group size."""
    group_size = num_experts // num_groups
    group_scores = scores.view(num_tokens, num_groups, group_size).topk(
        min(2, group_size), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, group_size).reshape(num_tokens, -1)
    masked_scores = scores.masked_fill(~expert_mask, float("-inf"))
    return torch.topk(masked_scores, k=topk, dim=-1)


def group_rules_differ(topk: int, num_experts: int, num_groups: int | None, group_topk: int | None) -> bool:
    """Whether Megatron's group score (top topk // group_topk) routes differently from DeepSeek's
    (top-2). False for DeepSeek-V3/R1 (8 // 4 = 2), for one group, and when every group is kept."""
    if not group_topk or not num_groups or num_groups <= 1 or group_topk >= num_groups:
        return False
    group_size = num_experts // num_groups
    return topk // group_topk != min(2, group_size)


_ORIGINAL = None


def apply_deepseek_routing(topk: int, num_experts: int, num_groups: int | None, group_topk: int | None) -> bool:
    """Install the DeepSeek group rule when this model's routing needs it (see the module
    docstring); returns whether it is in effect for this config. moe_utils'
    topk_routing_with_score_function calls the module-level name group_limited_topk."""
    global _ORIGINAL
    if not group_rules_differ(topk, num_experts, num_groups, group_topk):
        return False
    from megatron.core.transformer.moe import moe_utils

    if _ORIGINAL is None:
        original = moe_utils.group_limited_topk
        _ORIGINAL = original

        @functools.wraps(original)  # keeps Megatron's signature visible to the contract check
        def group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk):
            if group_rules_differ(topk, num_experts, num_groups, group_topk):
                return deepseek_group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk)
            return original(scores=scores, topk=topk, num_tokens=num_tokens, num_experts=num_experts,
                            num_groups=num_groups, group_topk=group_topk)

        moe_utils.group_limited_topk = group_limited_topk
    return True


def megatron_group_limited_topk():
    """Megatron-Core's own group_limited_topk (the original, also after apply_deepseek_routing)."""
    from megatron.core.transformer.moe import moe_utils

    return _ORIGINAL if _ORIGINAL is not None else moe_utils.group_limited_topk


# --------------------------------------------------------------------------------------------
# Training: aux-loss-free expert-bias update from the router's own token counters
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def update_expert_bias(routers: list, rate: float) -> None:
    """Aux-loss-free balancing, as Megatron's finalize_model_grads: bias += rate * sign(mean load -
    load) from the counts TopKRouter gathers in `local_tokens_per_expert` while gradients are on;
    then reset the counts. Routers without an expert bias are skipped."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    rs = [r for r in routers if r.expert_bias is not None]
    if not rs:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in rs])
    biases = torch.stack([r.expert_bias for r in rs])
    group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    updated = get_updated_expert_bias(counts, biases, rate, tp_dp_cp_group=group)
    for router, bias in zip(rs, updated):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.zero_()
