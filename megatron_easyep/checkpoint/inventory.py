"""Which tensors a DeepSeek-V3-class checkpoint must hold, and which it may hold, from its config.

`expected_tensors(config)` names every tensor of the model config.json describes (the model
transformers' DeepseekV3ForCausalLM builds: embedding, decoder layers, final norm, lm_head unless
tied), and the known extras a checkpoint may carry besides: the MTP layer(s) at
``model.layers.{num_hidden_layers}..`` with DeepSeek's enorm / hnorm / eh_proj / shared_head /
embed_tokens copies (not needed to run the main model; the exporter prunes or drops them), and
rotary ``inv_freq`` buffers that older exports saved. FP8 ``*_scale_inv`` companions depend on the
stored dtypes, not the config, so `HFCheckpoint` checks them against the shard headers.

Pure name logic: no file is read here (HFCheckpoint compares these names with the index and the
shard headers at open). `config` is a reader.DeepseekV3Config, not imported: reader imports this.
"""

from __future__ import annotations

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


def _mlp(prefix: str) -> list[str]:
    return [f"{prefix}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]


def decoder_layer_names(config: "DeepseekV3Config", layer: int) -> list[str]:
    """HF names of one decoder layer (attention, norms, dense MLP or MoE block)."""
    p = f"model.layers.{layer}"
    names = [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    a = f"{p}.self_attn"
    if config.q_lora_rank is None:
        names.append(f"{a}.q_proj.weight")
    else:
        names += [f"{a}.q_a_proj.weight", f"{a}.q_a_layernorm.weight", f"{a}.q_b_proj.weight"]
    names += [f"{a}.kv_a_proj_with_mqa.weight", f"{a}.kv_a_layernorm.weight", f"{a}.kv_b_proj.weight",
              f"{a}.o_proj.weight"]
    m = f"{p}.mlp"
    if not config.is_moe_layer(layer):
        return names + _mlp(m)
    names += [f"{m}.gate.weight", f"{m}.gate.e_score_correction_bias"]
    for expert in range(config.n_routed_experts):
        names += _mlp(f"{m}.experts.{expert}")
    if config.n_shared_experts:
        names += _mlp(f"{m}.shared_experts")
    return names


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
