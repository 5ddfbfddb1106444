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
import functools
import hashlib
import pathlib
from typing import Any

import torch

from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.deepseek import (  # noqa: F401  (re-exported for tests and benches)
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    BOS_TOKEN_ID,
    CHAT_TEMPLATE,
    DEEPSEEK_V3_CONFIG,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    USER_TOKEN,
    deepseek_v3_config,
    generation_config,
    tokenizer_config,
)
from megatron_easyep.checkpoint.fp8_blocks import quantize_fp8_blockwise, scale_shape
from megatron_easyep.checkpoint.inventory import TensorSpec, checkpoint_units
from megatron_easyep.checkpoint.reader import DeepseekV3Config, scale_inv_name

TOKENIZER_VOCAB_SIZE = 420  # 256 bytes + 4 specials + 160 merges; fits the tiny preset's 512

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

def build_config(preset: str = "tiny", *, fp8: bool = False, **overrides) -> dict[str, Any]:
    """The config.json dict for a preset with overrides (config.json keys), validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    base = copy.deepcopy(DEEPSEEK_V3_CONFIG)
    base.update(copy.deepcopy(PRESETS[preset]))
    config = deepseek_v3_config(base, fp8=fp8, source=f"preset {preset!r} with overrides", **overrides)
    if config["vocab_size"] < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {TOKENIZER_VOCAB_SIZE}")
    return config


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------


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


def stored_layout(spec: TensorSpec, block_size) -> list[io.TensorEntry]:
    """What `_stored_tensors` returns, as safetensors entries, without generating it."""
    if spec.init == "bias":
        return [io.TensorEntry(spec.name, "F32", spec.shape)]
    if block_size is None or not spec.quantizable:
        return [io.TensorEntry(spec.name, "BF16", spec.shape)]
    return [io.TensorEntry(spec.name, "F8_E4M3", spec.shape),
            io.TensorEntry(scale_inv_name(spec.name), "F32", scale_shape(spec.shape, block_size))]


def _write_shard_streaming(path: pathlib.Path, specs: list[TensorSpec], seed: int, block_size,
                           device=None) -> dict[str, int]:
    """A safetensors file written one tensor at a time (the header first, from the shapes), so a
    shard of any size needs the memory of its largest tensor only. Returns {name: bytes}."""
    entries = [entry for spec in specs for entry in stored_layout(spec, block_size)]
    owner = {entry.name: spec for spec in specs for entry in stored_layout(spec, block_size)}
    generated: dict[str, torch.Tensor] = {}

    def payload(entry: io.TensorEntry, f: io.ShardFile) -> None:
        if entry.name not in generated:  # a weight and its scale come from one quantisation
            generated.clear()
            generated.update(_stored_tensors(owner[entry.name], seed, block_size, device))
        f.write_tensor(generated.pop(entry.name))

    io.write_safetensors(path, entries, payload, metadata={"format": "pt"})
    return {entry.name: entry.nbytes for entry in entries}


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


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


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
    The directory appears atomically (`io.staged_output`); an existing non-empty ``out_dir`` is
    refused unless ``overwrite``. ``device="cuda"`` draws and quantises on the GPU (DeepSeek-V3
    widths in seconds per layer instead of minutes; other values than the CPU's for the same seed).
    """
    out_dir = pathlib.Path(out_dir)
    config_dict = build_config(preset, fp8=fp8, **overrides)
    config = DeepseekV3Config.from_dict(config_dict)
    block_size = config.weight_block_size  # None unless fp8
    io.check_output(out_dir, overwrite)

    units = checkpoint_units(config)
    groups = io.split_units_into_shards([sum(e.nbytes for s in unit for e in stored_layout(s, block_size)) for unit in units],
                                        num_shards)
    with io.staged_output(out_dir, overwrite=overwrite) as staging:
        weight_map: dict[str, str] = {}
        total_size = 0
        for shard_index, group in enumerate(groups):
            shard_name = io.shard_name(shard_index, num_shards)
            specs = [spec for unit_index in group for spec in units[unit_index]]
            sizes = _write_shard_streaming(staging / shard_name, specs, seed, block_size, device)
            for name, size in sizes.items():
                weight_map[name] = shard_name
                total_size += size
        if num_shards > 1:
            io.write_index(staging, weight_map, total_size)
        io.write_json(staging / "config.json", config_dict)
        io.write_json(staging / "generation_config.json", generation_config(config_dict))
        (staging / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
        io.write_json(staging / "tokenizer_config.json", tokenizer_config(config.max_position_embeddings))
    return out_dir
