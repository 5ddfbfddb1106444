"""Which tensors a DeepSeek-V3-class checkpoint must hold, and which it may hold, from its config.

`expected_tensors(config)` names every tensor of the model config.json describes (the model
transformers' DeepseekV3ForCausalLM builds: embedding, decoder layers, final norm, lm_head unless
tied), and the known extras a checkpoint may carry besides: the MTP layer(s) at
``model.layers.{num_hidden_layers}..`` with DeepSeek's enorm / hnorm / eh_proj / shared_head /
embed_tokens copies (not needed to run the main model; the exporter prunes or drops them), and
rotary ``inv_freq`` buffers that older exports saved. FP8 ``*_scale_inv`` companions depend on the
stored dtypes, not the config, so `HFCheckpoint` checks them against the shard headers.

`checkpoint_units(config)` gives the same tensors with their shapes, grouped in the units a shard
never splits, as the writers lay them out (`mcore.to_hf`, and `checkpoint.tiny` for synthetic
checkpoints).

Pure name logic: no file is read here (HFCheckpoint compares these names with the index and the
shard headers at open). `config` is a reader.DeepseekV3Config, not imported: reader imports this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Rotary buffers some exports include (transformers < 4.40 saved inv_freq with the weights).
_ROTARY_BUFFER = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ExpectedTensors:
    required: frozenset[str]  # the model config.json describes cannot run without these
    optional: frozenset[str]  # known extras (MTP layers, a tied lm_head); never required

    def is_known(self, name: str) -> bool:
        return name in self.required or name in self.optional or bool(_ROTARY_BUFFER.match(name))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a DeepSeek-V3 checkpoint as written: its shape, how the synthetic generator
    initialises it, and whether DeepSeek stores it in FP8 (with a ``*_scale_inv``)."""

    name: str
    shape: tuple[int, ...]
    init: str  # "linear" | "router" | "norm" | "bias" | "embedding"
    std: float = 0.0
    quantizable: bool = False  # stored as FP8 + scale in FP8 checkpoints
    seed_name: str = ""  # draw from this name's generator (MTP copies of embed_tokens / lm_head)


def _linear(name: str, out_features: int, in_features: int, quantizable: bool = True) -> TensorSpec:
    return TensorSpec(name, (out_features, in_features), "linear", 1.0 / math.sqrt(in_features), quantizable)


def _norm(name: str, size: int) -> TensorSpec:
    return TensorSpec(name, (size,), "norm")


def _mlp_specs(prefix: str, hidden: int, inner: int) -> list[TensorSpec]:
    return [
        _linear(f"{prefix}.gate_proj.weight", inner, hidden),
        _linear(f"{prefix}.up_proj.weight", inner, hidden),
        _linear(f"{prefix}.down_proj.weight", hidden, inner),
    ]


def decoder_layer_specs(c: "DeepseekV3Config", layer: int) -> list[TensorSpec]:
    """One decoder layer's tensors (attention, norms, dense MLP or MoE block)."""
    p = f"model.layers.{layer}"
    H, heads = c.hidden_size, c.num_attention_heads
    specs = [_norm(f"{p}.input_layernorm.weight", H), _norm(f"{p}.post_attention_layernorm.weight", H)]
    a = f"{p}.self_attn"
    if c.q_lora_rank is None:
        specs.append(_linear(f"{a}.q_proj.weight", heads * c.qk_head_dim, H))
    else:
        specs += [
            _linear(f"{a}.q_a_proj.weight", c.q_lora_rank, H),
            _norm(f"{a}.q_a_layernorm.weight", c.q_lora_rank),
            _linear(f"{a}.q_b_proj.weight", heads * c.qk_head_dim, c.q_lora_rank),
        ]
    specs += [
        _linear(f"{a}.kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim, H),
        _norm(f"{a}.kv_a_layernorm.weight", c.kv_lora_rank),
        _linear(f"{a}.kv_b_proj.weight", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        _linear(f"{a}.o_proj.weight", H, heads * c.v_head_dim),
    ]
    m = f"{p}.mlp"
    if not c.is_moe_layer(layer):
        return specs + _mlp_specs(m, H, c.intermediate_size)
    E = c.n_routed_experts
    # A wide router makes top-k choices decisive (no near-ties between implementations).
    specs.append(TensorSpec(f"{m}.gate.weight", (E, H), "router", 2.0 / math.sqrt(H)))
    specs.append(TensorSpec(f"{m}.gate.e_score_correction_bias", (E,), "bias"))
    for expert in range(E):
        specs += _mlp_specs(f"{m}.experts.{expert}", H, c.moe_intermediate_size)
    if c.n_shared_experts:
        specs += _mlp_specs(f"{m}.shared_experts", H, c.moe_intermediate_size * c.n_shared_experts)
    return specs


def _embedding(name: str, c: "DeepseekV3Config", seed_name: str = "") -> TensorSpec:
    return TensorSpec(name, (c.vocab_size, c.hidden_size), "embedding", 1.0, seed_name=seed_name)


def _lm_head(name: str, c: "DeepseekV3Config", seed_name: str = "") -> TensorSpec:
    H = c.hidden_size
    return TensorSpec(name, (c.vocab_size, H), "linear", 1.0 / math.sqrt(H), False, seed_name)


def checkpoint_units(c: "DeepseekV3Config") -> list[list[TensorSpec]]:
    """Every tensor of the checkpoint (bf16 view), grouped in units that a shard never splits:
    the embedding, each decoder layer, each MTP layer, and the final norm + lm_head."""
    units = [[_embedding("model.embed_tokens.weight", c)]]
    units += [decoder_layer_specs(c, layer) for layer in range(c.num_hidden_layers)]
    H = c.hidden_size
    for layer in c.mtp_layer_ids:
        p = f"model.layers.{layer}"
        units.append(
            decoder_layer_specs(c, layer)
            + [
                _norm(f"{p}.enorm.weight", H),
                _norm(f"{p}.hnorm.weight", H),
                _linear(f"{p}.eh_proj.weight", H, 2 * H, quantizable=False),
                _norm(f"{p}.shared_head.norm.weight", H),
                # DeepSeek ships duplicates of the main embedding and head in the MTP layer.
                _embedding(f"{p}.embed_tokens.weight", c, seed_name="model.embed_tokens.weight"),
                _lm_head(f"{p}.shared_head.head.weight", c, seed_name="lm_head.weight"),
            ]
        )
    units.append([_norm("model.norm.weight", H), _lm_head("lm_head.weight", c)])
    return units


def decoder_layer_names(config: "DeepseekV3Config", layer: int) -> list[str]:
    """HF names of one decoder layer (attention, norms, dense MLP or MoE block)."""
    return [spec.name for spec in decoder_layer_specs(config, layer)]


def mtp_layer_extra_names(layer: int) -> list[str]:
    """DeepSeek's MTP-layer tensors besides a decoder layer's."""
    p = f"model.layers.{layer}"
    return [f"{p}.enorm.weight", f"{p}.hnorm.weight", f"{p}.eh_proj.weight", f"{p}.shared_head.norm.weight",
            f"{p}.shared_head.head.weight", f"{p}.embed_tokens.weight"]


def expected_tensors(config: "DeepseekV3Config") -> ExpectedTensors:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    optional: list[str] = []
    (optional if config.tie_word_embeddings else required).append("lm_head.weight")
    for layer in range(config.num_hidden_layers):
        required += decoder_layer_names(config, layer)
    for layer in config.mtp_layer_ids:
        optional += decoder_layer_names(config, layer) + mtp_layer_extra_names(layer)
    return ExpectedTensors(frozenset(required), frozenset(optional))
