"""The Megatron-Core boundary: the only code in megatron-easyep that knows Megatron internals
(private names, monkey-patches, argument positions, class swaps). Written against megatron-core
0.19.x; contract.check_installed verifies every assumption before the first model is built.

One module per concern:
  cpu.py                CPU bridges (CUDA absent only), RNG seeding, eager jit fusions
  routing.py            DeepSeek's group-limited top-k (only where it differs), expert-bias update
  mla.py                MLA on the local spec: SDPA core attention, the q_lora_rank = null Q path
  fp8_linears.py        FP8-resident Column/RowParallelLinear, the linear-input hook
  hooks.py              observers on MoE layers, routers and experts (context-managed)
  pipeline_schedule.py  the forward-only P2P pipeline schedule
  gpt.py                GPTModel on the local spec (contract check first, deprecation banner off)
  contract.py           the start-up contract check
"""

from __future__ import annotations

from megatron_easyep.mcore.compat import contract, cpu, fp8_linears, gpt, hooks, mla, pipeline_schedule, routing  # noqa: F401
from megatron_easyep.mcore.compat.contract import ContractError, check_installed
from megatron_easyep.mcore.compat.cpu import eager_fusions, seed_model_parallel_rng
from megatron_easyep.mcore.compat.hooks import (
    Attachment,
    MoEObservation,
    attach_moe_observers,
    attach_router_hook,
    attach_router_observers,
    iter_moe_layers,
    local_experts,
    moe_routers,
)
from megatron_easyep.mcore.compat.gpt import apply_runtime_patches
from megatron_easyep.mcore.compat.routing import deepseek_group_limited_topk, update_expert_bias


__all__ = [
    "Attachment", "ContractError", "MoEObservation", "apply_runtime_patches", "attach_moe_observers",
    "attach_router_hook", "attach_router_observers", "check_installed", "deepseek_group_limited_topk",
    "eager_fusions", "iter_moe_layers", "local_experts", "moe_routers", "seed_model_parallel_rng",
    "update_expert_bias",
]
