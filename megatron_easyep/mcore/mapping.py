"""The one HF <-> Megatron-Core name table for DeepseekV3ForCausalLM (local layer spec).

Each entry maps a Megatron parameter (relative to the model, or to `decoder.layers.{layer}.`) to
the HF tensor(s) it is built from. Megatron's SwiGLU fc1 is cat([gate, up], dim 0); every other
weight is copied as is (both store [out, in]). `{expert}` is the GLOBAL expert id: local expert
`j` on EP rank `r` is `r * (E / EP) + j`, so a rank reads only its own experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODEL_TABLE = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "output_layer.weight": ("lm_head.weight",),
}

LAYER_TABLE = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_q_down_proj.weight": ("self_attn.q_a_proj.weight",),
    "self_attention.q_layernorm.weight": ("self_attn.q_a_layernorm.weight",),
    "self_attention.linear_q_up_proj.weight": ("self_attn.q_b_proj.weight",),
    "self_attention.linear_q_proj.weight": ("self_attn.q_proj.weight",),
    "self_attention.linear_kv_down_proj.weight": ("self_attn.kv_a_proj_with_mqa.weight",),
    "self_attention.kv_layernorm.weight": ("self_attn.kv_a_layernorm.weight",),
    "self_attention.linear_kv_up_proj.weight": ("self_attn.kv_b_proj.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    # dense MLP (layers < first_k_dense_replace)
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    # MoE
    "mlp.router.weight": ("mlp.gate.weight",),
    "mlp.router.expert_bias": ("mlp.gate.e_score_correction_bias",),
    "mlp.shared_experts.linear_fc1.weight": ("mlp.shared_experts.gate_proj.weight",
                                             "mlp.shared_experts.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": ("mlp.shared_experts.down_proj.weight",),
    "mlp.experts.local_experts.{local}.linear_fc1.weight": ("mlp.experts.{expert}.gate_proj.weight",
                                                            "mlp.experts.{expert}.up_proj.weight"),
    "mlp.experts.local_experts.{local}.linear_fc2.weight": ("mlp.experts.{expert}.down_proj.weight",),
}

# The HF tensors whose per-head rope rows the loader permutes when rope_interleave is false, by
# the Megatron linear that holds them: query projections (each head: qk_nope + qk_rope rows) and
# the compressed KV projection (one block whose last qk_rope rows are the rope key).
ROPE_PERMUTED_QUERY = {"linear_q_up_proj": "self_attn.q_b_proj.weight", "linear_q_proj": "self_attn.q_proj.weight"}
ROPE_PERMUTED_KV = {"linear_kv_down_proj": "self_attn.kv_a_proj_with_mqa.weight"}
ROPE_PERMUTED = {**ROPE_PERMUTED_QUERY, **ROPE_PERMUTED_KV}

# Megatron state-dict entries that carry no weights.
IGNORED_SUFFIXES = ("_extra_state", "local_tokens_per_expert")

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HFSource:
    """The HF tensors a Megatron parameter is built from (concatenated along dim 0)."""

    names: tuple[str, ...]
    layer: int | None = None
    expert: int | None = None


def hf_source(megatron_name: str, *, experts_per_rank: int, ep_rank: int,
              layer_offset: int = 0) -> HFSource | None:
    """HF tensors for one Megatron state-dict entry; None for entries that carry no weights.
    Raises KeyError for a name the table does not know (a model/table mismatch)."""
    if megatron_name.endswith(IGNORED_SUFFIXES):
        return None
    if megatron_name in MODEL_TABLE:
        return HFSource(MODEL_TABLE[megatron_name])
    match = _LAYER_RE.match(megatron_name)
    if not match:
        raise KeyError(megatron_name)
    layer = int(match.group(1)) + layer_offset
    rest = match.group(2)
    expert = None
    key = rest
    local = _LOCAL_EXPERT_RE.match(rest)
    if local:
        expert = ep_rank * experts_per_rank + int(local.group(1))
        key = "mlp.experts.local_experts.{local}." + local.group(2)
    if key not in LAYER_TABLE:
        raise KeyError(megatron_name)
    names = tuple(f"model.layers.{layer}." + n.format(expert=expert) for n in LAYER_TABLE[key])
    return HFSource(names, layer=layer, expert=expert)
