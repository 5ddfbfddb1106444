"""Small, real DeepseekV3ForCausalLM checkpoints for tests and benchmarks.

`make_tiny_checkpoint` writes a Hugging Face directory that is laid out exactly like DeepSeek-V3's
(config.json key set, tensor names, sharded safetensors + index, optional block-wise FP8 with
``*_scale_inv``, MTP layer ``model.layers.{num_hidden_layers}``) plus a small byte-level BPE
tokenizer with DeepSeek's special tokens. Weights are random but deterministic: every tensor is
drawn from its own generator seeded by (seed, tensor name), so the bf16 and FP8 variants of a seed
hold the same weights (FP8 = the bf16 weights quantised) and a tensor does not change when an
unrelated config value does.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import uuid
from typing import Any

import torch

from megatron_easyep.checkpoint.fp8_blocks import DEFAULT_BLOCK_SIZE, quantize_fp8_blockwise, scale_shape
from megatron_easyep.checkpoint.reader import DeepseekV3Config, scale_inv_name

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Their order fixes their ids: bos 0, eos 1 (as in DeepSeek-V3), then User 2, Assistant 3.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1
TOKENIZER_VOCAB_SIZE = 420  # 256 bytes + 4 specials + 160 merges; fits the tiny preset's 512

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

PRESETS: dict[str, dict[str, Any]] = {
    # CI: a few MB, seconds. 4 groups / top-2 groups / top-4 experts keeps top_k/topk_group == 2,
    # where Megatron's group scoring equals transformers'.
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "max_position_embeddings": 512,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 128,
            "type": "yarn",
        },
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-6,
    },
    # Benchmarks: Moonlight-16B-A3B widths with 3 layers (~1.3 B params, ~2.5 GB in bf16).
    "small": {
        "vocab_size": 4096,
        "hidden_size": 2048,
        "intermediate_size": 11264,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-6,
    },
    # Memory benches: DeepSeek-V3's true widths (hidden 7168, 128 MLA heads, q_lora 1536, kv_lora 512,
    # 256 experts of 2048 in 8 groups / top-4 groups / top-8, one shared expert, dense 18432, yarn x40)
    # with one dense and one MoE layer and a small vocabulary: 12.1 B parameters, 12 GB in FP8.
    "v3-width": {
        "vocab_size": 4096,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 0,
    },
}

# Overrides that are not config.json keys: the FP8 block size goes into quantization_config.
EXTRA_OVERRIDE_KEYS = ("weight_block_size",)
# Keys transformers' DeepseekV3Config reads that DeepSeek's own config.json leaves out (so
# they take their defaults); written to config.json only when given.
OPTIONAL_CONFIG_KEYS = ("rope_interleave",)


def build_config(preset: str = "tiny", *, fp8: bool = False, **overrides) -> dict[str, Any]:
    """The config.json dict for a preset with overrides (config.json keys), validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    config = copy.deepcopy(DEEPSEEK_V3_CONFIG)
    config.update(copy.deepcopy(PRESETS[preset]))
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
    DeepseekV3Config.from_dict(config, source=f"preset {preset!r} with overrides {overrides}")
    if config["vocab_size"] < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {TOKENIZER_VOCAB_SIZE}")
    return dict(sorted(config.items()))


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
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


def _decoder_layer_specs(c: DeepseekV3Config, layer: int) -> list[TensorSpec]:
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


def _mlp_specs(prefix: str, hidden: int, inner: int) -> list[TensorSpec]:
    return [
        _linear(f"{prefix}.gate_proj.weight", inner, hidden),
        _linear(f"{prefix}.up_proj.weight", inner, hidden),
        _linear(f"{prefix}.down_proj.weight", hidden, inner),
    ]


def _embedding(name: str, c: DeepseekV3Config, seed_name: str = "") -> TensorSpec:
    return TensorSpec(name, (c.vocab_size, c.hidden_size), "embedding", 1.0, seed_name=seed_name)


def _lm_head(name: str, c: DeepseekV3Config, seed_name: str = "") -> TensorSpec:
    H = c.hidden_size
    return TensorSpec(name, (c.vocab_size, H), "linear", 1.0 / math.sqrt(H), False, seed_name)


def checkpoint_units(c: DeepseekV3Config) -> list[list[TensorSpec]]:
    """Every tensor of the checkpoint (bf16 view), grouped in units that a shard never splits:
    the embedding, each decoder layer, each MTP layer, and the final norm + lm_head."""
    units = [[_embedding("model.embed_tokens.weight", c)]]
    units += [_decoder_layer_specs(c, layer) for layer in range(c.num_hidden_layers)]
    H = c.hidden_size
    for layer in c.mtp_layer_ids:
        p = f"model.layers.{layer}"
        units.append(
            _decoder_layer_specs(c, layer)
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


def _generator(seed: int, name: str, device=None) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device=device or "cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def generate_tensor(spec: TensorSpec, seed: int, device=None) -> torch.Tensor:
    """The bf16 (fp32 for the expert bias) value of one tensor; deterministic in (seed, name,
    device): a CUDA `device` draws from CUDA's generator, so its values differ from the CPU's."""
    g = _generator(seed, spec.seed_name or spec.name, device)
    if spec.init == "norm":
        return (1.0 + 0.1 * torch.randn(spec.shape, generator=g, device=device)).to(torch.bfloat16)
    if spec.init == "bias":
        # Small and positive: sigmoid + bias stays > 0, so masking unselected groups with 0 (some
        # engines) or -inf (others) picks the same experts.
        return 0.05 * torch.rand(spec.shape, generator=g, device=device)
    return (torch.randn(spec.shape, generator=g, device=device) * spec.std).to(torch.bfloat16)


def _stored_tensors(spec: TensorSpec, seed: int, block_size, device=None) -> dict[str, torch.Tensor]:
    tensor = generate_tensor(spec, seed, device)
    if block_size is None or not spec.quantizable:
        return {spec.name: tensor.cpu()}
    q, scale_inv = quantize_fp8_blockwise(tensor, block_size)
    return {spec.name: q.cpu(), scale_inv_name(spec.name): scale_inv.cpu()}


def _stored_bytes(spec: TensorSpec, block_size) -> int:
    numel = math.prod(spec.shape)
    if spec.init == "bias":
        return numel * 4
    if block_size is None or not spec.quantizable:
        return numel * 2
    return numel + math.prod(scale_shape(spec.shape, block_size)) * 4


def _stored_layout(spec: TensorSpec, block_size) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of what `_stored_tensors` returns, without generating it."""
    if spec.init == "bias":
        return [(spec.name, "F32", spec.shape)]
    if block_size is None or not spec.quantizable:
        return [(spec.name, "BF16", spec.shape)]
    return [(spec.name, "F8_E4M3", spec.shape), (scale_inv_name(spec.name), "F32", scale_shape(spec.shape, block_size))]


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F8_E4M3": 1}


def _write_shard_streaming(path: pathlib.Path, specs: list[TensorSpec], seed: int, block_size,
                           device=None) -> dict[str, int]:
    """A safetensors file written one tensor at a time (the header first, from the shapes), so a
    shard of any size needs the memory of its largest tensor only. Returns {name: bytes}."""
    layout = [entry for spec in specs for entry in _stored_layout(spec, block_size)]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    sizes, offset = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * _DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes[name] = size
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for spec in specs:
            for name, tensor in _stored_tensors(spec, seed, block_size, device).items():
                data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
                if data.nbytes != sizes[name]:
                    raise AssertionError(f"{name}: {data.nbytes} bytes, header says {sizes[name]}")
                f.write(data.tobytes() if data.nbytes < (1 << 26) else memoryview(data))
    return sizes


def split_units_into_shards(unit_bytes: list[int], num_shards: int) -> list[range]:
    """Contiguous, non-empty groups of units with roughly equal bytes."""
    n = len(unit_bytes)
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be between 1 and {n} (whole layers per shard), got {num_shards}")
    total = sum(unit_bytes)
    groups, start, acc = [], 0, 0
    for i, size in enumerate(unit_bytes):
        acc += size
        shards_left = num_shards - len(groups) - 1  # shards still to open after this one
        units_left = n - i - 1
        if shards_left == 0:
            continue
        if units_left == shards_left or acc >= total * (len(groups) + 1) / num_shards:
            groups.append(range(start, i + 1))
            start = i + 1
    groups.append(range(start, n))
    return groups


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    """A fixed English / code / math corpus, generated deterministically (no files, no network)."""
    english = [
        "The quick brown fox jumps over the lazy dog.",
        "A mixture of experts routes every token to a few experts chosen by a learned router.",
        "Each expert is a small feed-forward network; the shared expert sees every token.",
        "Expert parallelism places different experts on different devices and exchanges tokens.",
        "We prune the experts that the calibration data rarely uses and keep the model accurate.",
        "Multi-head latent attention compresses keys and values into a low-rank latent vector.",
        "The model reads a prompt, thinks step by step, and writes the answer at the end.",
        "Please summarise the following paragraph in one sentence.",
        "What is the capital of France? The capital of France is Paris.",
        "Hello! How can I help you today? I would like to learn about machine learning.",
        "In the beginning the universe was created. This has made a lot of people very angry.",
        "Language models predict the next token given all the tokens that came before it.",
    ]
    code = [
        "def forward(self, hidden_states):\n    return self.down_proj(self.act(self.gate_proj(hidden_states)))\n",
        "import torch\nimport torch.nn.functional as F\n\nx = torch.randn(4, 8)\ny = F.softmax(x, dim=-1)\n",
        "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        continue\n",
        "class Router(nn.Module):\n    def __init__(self, hidden, experts):\n        super().__init__()\n",
        'with open("config.json") as f:\n    config = json.load(f)\nprint(config["hidden_size"])\n',
        "int main(void) { for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } return 0; }\n",
    ]
    math_lines = [f"{a} + {b} = {a + b}, {a} * {b} = {a * b}" for a in range(3, 60, 7) for b in range(2, 40, 9)]
    math_lines += [f"Let x = {k}. Then x^2 = {k * k} and sqrt({k * k}) = {k}." for k in range(1, 30)]
    return (english + code) * 8 + math_lines


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """Train (once per process) the byte-level BPE tokenizer and return its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    if tokenizer.token_to_id(BOS_TOKEN) != BOS_TOKEN_ID or tokenizer.token_to_id(EOS_TOKEN) != EOS_TOKEN_ID:
        raise RuntimeError("tokenizer special token ids are not bos=0, eos=1")
    # DeepSeek's tokenizer prepends bos to every encoded text (chat templates encode without it).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)]
    )
    return tokenizer.to_str()


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def write_json(path: pathlib.Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_checkpoint(
    out_dir,
    preset: str = "tiny",
    *,
    fp8: bool = False,
    seed: int = 0,
    num_shards: int = 3,
    overwrite: bool = False,
    device=None,
    **overrides,
) -> pathlib.Path:
    """Write a DeepseekV3ForCausalLM HF checkpoint to ``out_dir`` and return its path.

    ``overrides`` are config.json keys (plus ``weight_block_size`` for FP8). With ``num_shards=1``
    the weights go to a single ``model.safetensors`` without index, as Hugging Face does.
    The directory appears atomically (written to a temporary sibling, then renamed); an existing
    non-empty ``out_dir`` is refused unless ``overwrite``. ``device="cuda"`` draws and quantises
    on the GPU (DeepSeek-V3 widths in seconds per layer instead of minutes; other values than the
    CPU's for the same seed).
    """
    out_dir = pathlib.Path(out_dir)
    config_dict = build_config(preset, fp8=fp8, **overrides)
    config = DeepseekV3Config.from_dict(config_dict)
    block_size = config.weight_block_size  # None unless fp8
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")

    units = checkpoint_units(config)
    groups = split_units_into_shards([sum(_stored_bytes(s, block_size) for s in unit) for unit in units], num_shards)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for shard_index, group in enumerate(groups):
            if num_shards == 1:
                shard_name = "model.safetensors"
            else:
                shard_name = f"model-{shard_index + 1:05d}-of-{num_shards:05d}.safetensors"
            specs = [spec for unit_index in group for spec in units[unit_index]]
            sizes = _write_shard_streaming(tmp_dir / shard_name, specs, seed, block_size, device)
            os.chmod(tmp_dir / shard_name, 0o644)
            for name, size in sizes.items():
                weight_map[name] = shard_name
                total_size += size
        if num_shards > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(tmp_dir / "model.safetensors.index.json", index)

        write_json(tmp_dir / "config.json", config_dict)
        write_json(
            tmp_dir / "generation_config.json",
            {
                "_from_model_config": True,
                "bos_token_id": BOS_TOKEN_ID,
                "eos_token_id": EOS_TOKEN_ID,
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.95,
            },
        )
        (tmp_dir / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
        write_json(tmp_dir / "tokenizer_config.json", tokenizer_config(config.max_position_embeddings))
        move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def move_into_place(tmp_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        tmp_dir.rename(out_dir)
        return
    # overwrite: swap the old directory out first so out_dir is never half-written.
    trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(trash)
    tmp_dir.rename(out_dir)
    if trash.is_dir():
        shutil.rmtree(trash)
    else:
        trash.unlink()
