"""DeepSeek-V3's published conventions that the writers reproduce: the config.json every preset
and trained model starts from, the tokenizer's special tokens and chat format, and the
generation_config.json / tokenizer_config.json that accompany the weights.

Production code (training, the HF writer) takes these from here; the synthetic checkpoint
generator (`checkpoint.tiny`, test and bench tooling) builds on them too.
"""

from __future__ import annotations

import copy
from typing import Any

from megatron_easyep.checkpoint.fp8_blocks import DEFAULT_BLOCK_SIZE
from megatron_easyep.checkpoint.reader import DeepseekV3Config

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Their order fixes their ids: bos 0, eos 1 (as in DeepSeek-V3), then User 2, Assistant 3.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1

# DeepSeek-style chat format: {bos}{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER_TOKEN + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT_TOKEN + "' + message['content'] + '" + EOS_TOKEN + "' }}"
    "{% else %}{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "' }}{% endif %}"
)

# DeepSeek-V3's config.json (minus auto_map: we ship no remote code), the base every preset edits.
DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

# Overrides that are not config.json keys: the FP8 block size goes into quantization_config.
EXTRA_OVERRIDE_KEYS = ("weight_block_size",)
# Keys transformers' DeepseekV3Config reads that DeepSeek's own config.json leaves out (so
# they take their defaults); written to config.json only when given.
OPTIONAL_CONFIG_KEYS = ("rope_interleave",)


def deepseek_v3_config(base: dict[str, Any] | None = None, *, fp8: bool = False, source: str = "overrides",
                       **overrides) -> dict[str, Any]:
    """The config.json dict of DeepSeek-V3 (or `base`, a dict of the same keys) with `overrides`
    (config.json keys, plus ``weight_block_size`` with fp8), validated, keys sorted."""
    config = copy.deepcopy(DEEPSEEK_V3_CONFIG if base is None else base)
    known = set(config) | set(EXTRA_OVERRIDE_KEYS) | set(OPTIONAL_CONFIG_KEYS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(repr(k) for k in unknown)}; known keys: {', '.join(sorted(known))}"
        )
    # Only meaningful with fp8; accepted (and ignored) otherwise so callers can parametrise both variants.
    block_size = overrides.pop("weight_block_size", None) or list(DEFAULT_BLOCK_SIZE)
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]  # MLA: one kv head per head
    config.update(copy.deepcopy(overrides))
    if fp8:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [int(b) for b in block_size],
        }
    DeepseekV3Config.from_dict(config, source=f"{source} {overrides}")
    return dict(sorted(config.items()))


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json as DeepSeek-V3 ships it (sampling at temperature 0.6, top-p 0.95)."""
    return {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"], "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for a byte-level BPE tokenizer with DeepSeek's special tokens."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
