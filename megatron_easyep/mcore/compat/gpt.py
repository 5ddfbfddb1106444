"""GPTModel construction on Megatron-Core's local layer spec (MLA adapted, FP8-resident linears
swapped in), with the start-up contract check run before the first build.

GPTModel is deprecated in megatron-core 0.19 in favour of HybridModel; its constructor logs a
"GPTModel IS DEPRECATED" warning on every build. The migration is recorded in docs/hybrid-model.md;
until it is done the banner is filtered here (only that message, only during our construction).
"""

from __future__ import annotations

import contextlib
import logging

from megatron_easyep.mcore.compat import contract

_DEPRECATION_BANNER = "GPTModel IS DEPRECATED"


class _DropDeprecationBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DEPRECATION_BANNER)


@contextlib.contextmanager
def _without_deprecation_banner():
    """GPTModel's deprecation banner, silenced (see docs/hybrid-model.md for the migration)."""
    logger = logging.getLogger(contract.GPT_MODEL_LOGGER)
    banner_filter = _DropDeprecationBanner()
    logger.addFilter(banner_filter)
    try:
        yield
    finally:
        logger.removeFilter(banner_filter)


def local_block_spec(tcfg, *, fp8_resident: bool = False, fused_experts: bool = True):
    """The decoder block spec: Megatron's local (non-TE) spec with RMSNorm, each layer adapted for
    MLA (mla.adapt_local_layer_spec), with FP8-resident linears when asked, and with the routed
    experts stacked per layer (fused_experts.FusedExperts in place of SequentialMLP)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_easyep.mcore.compat import fp8_linears, mla

    block_spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm")
    for layer_spec in block_spec.layer_specs:
        contract.check_local_attention_spec(layer_spec.submodules.self_attention)
        mla.adapt_local_layer_spec(layer_spec, tcfg, fp8_resident=fp8_resident)
    if fp8_resident:
        block_spec.layer_specs = [fp8_linears.fp8_resident_layer_spec(s) for s in block_spec.layer_specs]
    if fused_experts:
        from megatron_easyep.mcore.compat.fused_experts import fused_experts_layer_spec

        block_spec.layer_specs = [fused_experts_layer_spec(s) for s in block_spec.layer_specs]
    return block_spec


def apply_runtime_patches(tcfg=None) -> None:
    """The process-wide patches: CPU bridges (no-op with CUDA) and, for a model config whose group
    rule differs from Megatron's, DeepSeek's group-limited top-k (compat/routing.py)."""
    from megatron_easyep.mcore.compat import cpu, routing

    cpu.apply_cpu_bridges()
    if tcfg is not None:
        routing.apply_deepseek_routing(tcfg.moe_router_topk, tcfg.num_moe_experts or 0,
                                       tcfg.moe_router_num_groups, tcfg.moe_router_group_topk)


def build_gpt_model(tcfg, *, vocab_size: int, max_sequence_length: int, pre_process: bool,
                    post_process: bool, share_embeddings_and_output_weights: bool, rotary_base: int,
                    fp8_resident: bool = False, fused_experts: bool = True):
    """GPTModel (this rank's pipeline stage) for an MLATransformerConfig, after the contract check
    and the runtime patches this config needs."""
    from megatron.core.models.gpt import GPTModel

    contract.check_installed()
    apply_runtime_patches(tcfg)
    block_spec = local_block_spec(tcfg, fp8_resident=fp8_resident, fused_experts=fused_experts)
    with _without_deprecation_banner():
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=block_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            parallel_output=True,  # TP = 1: nothing to gather
        )
    if fp8_resident:
        contract.check_fp8_resident_model(model)
    return model
