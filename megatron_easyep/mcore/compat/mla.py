"""MLA on Megatron-Core's local (non-TE) layer spec.

  * core attention: the local DotProductAttention does not accept the k_channels/v_channels
    MultiLatentAttention passes (q/k head dim != v head dim), so the spec gets SDPACoreAttention.
    Needed for every MLA model on the local spec (DeepSeek-V3/R1 included).
  * q_lora_rank = null (DeepSeek-V2-Lite-style Q path): 0.19's Q/KV norm resolver wants a fused
    norm+linear for linear_q_proj, which HF does not have and the local spec cannot build. The
    resolver override gives a plain linear_q_proj, no Q norm and a standalone KV norm. It changes
    nothing when q_lora_rank is set (DeepSeek-V3/R1: 1536): there the stock MLASelfAttention is
    built, unless FP8-resident weights need the subclass for its two down projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class SDPACoreAttention(torch.nn.Module):
    """Causal core attention for MLA on the local spec. Megatron's local DotProductAttention does
    not accept MLA's k_channels/v_channels (q/k head dim != v head dim)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__()
        self.config = config
        # Attention.__init__ builds one without MLA's dims, then MLA rebuilds it with them.
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported on the local MLA spec")
        # Megatron layout [s, b, heads, dim] -> SDPA's [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scale = self.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


_MLA_CLASS = None


def mla_self_attention_class():
    """MLASelfAttention whose Q path matches DeepSeek when q_lora_rank is null (a plain q_proj
    with no Q norm), and which can turn its two down projections FP8-resident."""
    global _MLA_CLASS
    if _MLA_CLASS is not None:
        return _MLA_CLASS
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_easyep.mcore.compat.fp8_linears import BUILT_PLAIN, fp8_resident_class

    class DeepseekMLASelfAttention(MLASelfAttention):
        def __init__(self, *args, fp8_resident_down_projections: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            if fp8_resident_down_projections:
                # MLASelfAttention accepts only its own classes for the down projections (an
                # exact-class check, `submodules.linear_q_down_proj in [...]`), so they are built
                # plain and turned FP8-resident right here by a __class__ swap; the high-precision
                # weight of one layer's two projections exists only meanwhile.
                for name in BUILT_PLAIN:
                    module = getattr(self, name, None)
                    if module is not None and hasattr(module, "_forward_impl"):
                        module.__class__ = fp8_resident_class(type(module))
                        module._make_fp8_resident()

        def _resolve_qk_norm_config(self, submodules):
            if self.config.q_lora_rank is not None:
                return super()._resolve_qk_norm_config(submodules)
            from megatron.core.transformer.identity_op import IdentityOp

            return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                        linear_kv_up_proj=submodules.linear_kv_up_proj,
                        q_layernorm=IdentityOp, kv_layernorm=submodules.kv_layernorm)

    _MLA_CLASS = DeepseekMLASelfAttention
    return _MLA_CLASS


def adapt_local_layer_spec(layer_spec, config, *, fp8_resident: bool = False) -> None:
    """Adjust one local-spec TransformerLayer spec (in place) for MLA: SDPA core attention always;
    the DeepSeek attention subclass only where it changes something (q_lora_rank null, or
    FP8-resident down projections)."""
    attention = layer_spec.submodules.self_attention
    attention.submodules.core_attention = SDPACoreAttention
    if config.q_lora_rank is None or fp8_resident:
        attention.module = mla_self_attention_class()
    if config.q_lora_rank is None:
        from megatron.core.transformer.identity_op import IdentityOp

        attention.submodules.q_layernorm = IdentityOp
