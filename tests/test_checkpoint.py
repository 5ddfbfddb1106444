"""FP8 block quantisation, tiny DeepSeek-V3 checkpoints (against stock transformers) and the
HFCheckpoint reader, including its errors on bad input."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hf_oracle import dequantize_blockwise_reference, load_transformers_mtp, load_transformers_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_easyep.checkpoint.fp8_blocks import MIN_BLOCK_AMAX, dequantize_fp8_blockwise, quantize_fp8_blockwise
from megatron_easyep.checkpoint.reader import CheckpointError, DeepseekV3Config, HFCheckpoint, expert_weight_name
from megatron_easyep.checkpoint.tiny import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    DEEPSEEK_V3_CONFIG,
    EOS_TOKEN,
    USER_TOKEN,
    build_config,
    make_tiny_checkpoint,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FP8_WEIGHT = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def e4m3_error_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest e4m3 (3 mantissa bits): relative error <= 2^-4 for normals, plus half the
    subnormal step 2^-9 (times the block scale) near zero."""
    return w.abs() * 2.0**-4 + scale * 2.0**-10 + 1e-12


def per_element(scale_inv: torch.Tensor, shape, block) -> torch.Tensor:
    return scale_inv.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


# ------------------------------------------------------------------------------------------------
# fp8
# ------------------------------------------------------------------------------------------------


def test_fp8_scales_are_block_amax_over_448_with_partial_edge_blocks():
    w = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.5, 4.0],
            [0.25, 8.0, -1.0, 2.0, 0.0],
            [3.5, 0.0, 0.0, -7.0, 1.0],
        ]
    )
    q, scale_inv = quantize_fp8_blockwise(w, (2, 2))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 5)
    assert scale_inv.dtype == torch.float32
    # blocks: rows {0,1},{2} x cols {0,1},{2,3},{4}
    expected = torch.tensor([[8.0, 3.0, 4.0], [3.5, 7.0, 1.0]]) / 448.0
    torch.testing.assert_close(scale_inv, expected, rtol=0, atol=0)
    # each block's largest magnitude lands exactly on +-448
    assert q.float()[1, 1] == 448 and q.float()[2, 3] == -448 and q.float()[0, 4] == 448
    deq = dequantize_fp8_blockwise(q, scale_inv, (2, 2))
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert (deq - w).abs().le(e4m3_error_bound(w, per_element(scale_inv, w.shape, (2, 2)))).all()
    assert deq[1, 4] == 0 and deq[2, 1] == 0


def test_fp8_roundtrip_is_exact_for_e4m3_representable_values():
    # amax 448 -> scale 1 and amax 56 -> scale 1/8: both exact, and all values have <= 3 mantissa bits
    w = torch.tensor([[448.0, 1.5, -2.75, 0.125], [240.0, -0.5, 3.0, 0.0]])
    w = torch.cat([w, w / 8], dim=1)
    w[:, 4] = torch.tensor([56.0, -56.0])  # make the second block's amax exactly 56
    q, scale_inv = quantize_fp8_blockwise(w, (2, 4))
    assert torch.equal(scale_inv, torch.tensor([[1.0, 0.125]]))
    assert torch.equal(dequantize_fp8_blockwise(q, scale_inv, (2, 4)), w)


@pytest.mark.parametrize(
    "shape,block", [((300, 200), (128, 128)), ((70, 45), (32, 16)), ((5, 7), (1, 1)), ((9, 9), (9, 9))]
)
def test_fp8_matches_blockwise_reference(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    q, scale_inv = quantize_fp8_blockwise(w.to(torch.bfloat16), block)
    assert scale_inv.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    w_bf16 = w.to(torch.bfloat16).float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            amax = w_bf16[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].abs().max()
            assert scale_inv[i, j] == amax / 448
    deq = dequantize_fp8_blockwise(q, scale_inv, block)
    assert torch.equal(deq, dequantize_blockwise_reference(q, scale_inv, block))
    assert (deq - w_bf16).abs().le(e4m3_error_bound(w_bf16, per_element(scale_inv, shape, block))).all()
    assert dequantize_fp8_blockwise(q, scale_inv, block, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_fp8_all_zero_block_and_shape_validation():
    w = torch.zeros(4, 4)
    w[0, 0] = 1.0
    q, scale_inv = quantize_fp8_blockwise(w, (2, 2))
    assert scale_inv[1, 1] == MIN_BLOCK_AMAX / 448 and scale_inv[1, 1] > 0
    assert torch.equal(dequantize_fp8_blockwise(q, scale_inv, (2, 2)), w)
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 2\).*weight shape \(4, 4\).*expected \(1, 1\)"):
        dequantize_fp8_blockwise(q, scale_inv, (128, 128))
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_blockwise(torch.ones(4))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_fp8_blockwise(torch.tensor([[1.0, float("nan")]]))
    # fp32 input is not modified in place; non-contiguous input works
    w = torch.randn(8, 6)
    before = w.clone()
    q, scale_inv = quantize_fp8_blockwise(w.t(), (4, 4))
    assert torch.equal(w, before) and q.shape == (6, 8) and scale_inv.shape == (2, 2)


# ------------------------------------------------------------------------------------------------
# tiny checkpoints vs stock transformers
# ------------------------------------------------------------------------------------------------

VARIANTS = {
    "bf16": dict(),
    "fp8": dict(fp8=True),
    "q_lora_null_plain_rope": dict(q_lora_rank=None, rope_scaling=None),
    "n_group_1": dict(n_group=1, topk_group=1),
    "mtp": dict(num_nextn_predict_layers=1),
    "first_k_dense_2": dict(first_k_dense_replace=2),
    "fp8_block_32x16_mtp_q_null": dict(
        fp8=True, weight_block_size=[32, 16], num_nextn_predict_layers=1, q_lora_rank=None
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_checkpoint_loads_in_transformers(variant, tiny_checkpoint_factory):
    path = tiny_checkpoint_factory(**VARIANTS[variant])
    model = load_transformers_model(path)  # asserts no missing / unexpected (non-MTP) keys
    stored = {}
    for file in sorted(path.glob("*.safetensors")):
        stored.update(load_file(file))
    config = json.loads((path / "config.json").read_text())
    block = tuple(config.get("quantization_config", {}).get("weight_block_size", (128, 128)))

    def stored_fp32(name):
        t = stored[name]
        if t.dtype == torch.float8_e4m3fn:
            return dequantize_blockwise_reference(t, stored[name + "_scale_inv"], block)
        return t.float()

    params = dict(model.named_parameters()) | dict(model.named_buffers())
    F = config["moe_intermediate_size"]
    layer = config["num_hidden_layers"] - 1  # a MoE layer
    q_name = "q_proj" if config["q_lora_rank"] is None else "q_b_proj"
    for name in (
        f"model.layers.{layer}.self_attn.{q_name}.weight",
        f"model.layers.{layer}.mlp.gate.e_score_correction_bias",
        "model.layers.0.mlp.down_proj.weight",
        "lm_head.weight",
    ):
        assert torch.equal(params[name], stored_fp32(name)), name
    experts = f"model.layers.{layer}.mlp.experts"
    gate_up = params[f"{experts}.gate_up_proj"][5]  # transformers fuses experts: [E, 2F, H]
    assert torch.equal(gate_up[:F], stored_fp32(expert_weight_name(layer, 5, "gate_proj")))
    assert torch.equal(gate_up[F:], stored_fp32(expert_weight_name(layer, 5, "up_proj")))
    assert torch.equal(params[f"{experts}.down_proj"][5], stored_fp32(expert_weight_name(layer, 5, "down_proj")))

    ids = torch.arange(40).reshape(2, 20) * 7 % config["vocab_size"]
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert out.logits.shape == (2, 20, config["vocab_size"]) and torch.isfinite(out.logits).all()
    assert 0.1 < out.logits.std() < 10

    if config["num_nextn_predict_layers"]:
        n = config["num_hidden_layers"]
        assert all(k.startswith(f"model.layers.{n}.") for k in model._oracle_unexpected_keys)
        mtp = load_transformers_mtp(model)
        assert torch.equal(mtp.layers[0].eh_proj.weight, stored_fp32(f"model.layers.{n}.eh_proj.weight"))
        assert torch.equal(mtp.layers[0].post_norm.weight, stored_fp32(f"model.layers.{n}.shared_head.norm.weight"))
        # DeepSeek's MTP copies of the embedding and head equal the main ones (transformers reuses those)
        assert torch.equal(stored[f"model.layers.{n}.embed_tokens.weight"], stored["model.embed_tokens.weight"])
        assert torch.equal(stored[f"model.layers.{n}.shared_head.head.weight"], stored["lm_head.weight"])


def test_routing_is_decisive(tiny_ckpt):
    """Typical margins between chosen and rejected groups/experts are far above fp32 noise, and every
    choice score is positive (masking rejected groups with 0 or with -inf then picks the same)."""
    model = load_transformers_model(tiny_ckpt)
    cfg = model.config
    ids = torch.randint(0, 400, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    for moe_index, router_logits in enumerate(out.router_logits):
        bias = model.model.layers[cfg.first_k_dense_replace + moe_index].mlp.gate.e_score_correction_bias
        scores = router_logits.sigmoid() + bias
        assert (scores > 0).all()
        grouped = scores.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
        group_gap = group_scores[:, cfg.topk_group - 1] - group_scores[:, cfg.topk_group]
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter(
            1, grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices, True
        )
        choice = grouped.masked_fill(~kept[..., None], -1.0).flatten(1).sort(dim=-1, descending=True).values
        expert_gap = choice[:, cfg.num_experts_per_tok - 1] - choice[:, cfg.num_experts_per_tok]
        assert group_gap.median() > 0.05 and expert_gap.median() > 0.05


def test_index_total_size_shards_and_dtypes(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 16], num_nextn_predict_layers=1, q_lora_rank=None)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(path.glob("*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(weight_map.values()) == {s.name for s in shards}
    total, seen = 0, {}
    for shard in shards:
        tensors = load_file(shard)
        assert tensors, f"{shard.name} is empty"
        for name, t in tensors.items():
            assert weight_map[name] == shard.name
            total += t.numel() * t.element_size()
            seen[name] = t
    assert set(seen) == set(weight_map)
    assert index["metadata"]["total_size"] == total
    # whole layers per shard
    layer_shards = {}
    for name, file in weight_map.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            layer_shards.setdefault(int(m.group(1)), set()).add(file)
    assert all(len(files) == 1 for files in layer_shards.values())

    for name, t in seen.items():
        if name.endswith("_scale_inv"):
            weight = seen[name.removesuffix("_scale_inv")]
            assert t.dtype == torch.float32
            assert t.shape == (math.ceil(weight.shape[0] / 32), math.ceil(weight.shape[1] / 16)), name
        elif FP8_WEIGHT.search(name) and ".eh_proj." not in name:
            assert t.dtype == torch.float8_e4m3fn, name
            assert name + "_scale_inv" in seen, name
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 0.05
        else:
            assert t.dtype == torch.bfloat16, name
    n = 3
    assert seen[f"model.layers.{n}.eh_proj.weight"].shape == (64, 128)
    assert seen[f"model.layers.{n}.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    for name in ("enorm", "hnorm", "shared_head.norm"):
        assert seen[f"model.layers.{n}.{name}.weight"].shape == (64,)
    assert seen[f"model.layers.{n}.mlp.gate.weight"].dtype == torch.bfloat16


def test_bf16_and_fp8_variants_hold_the_same_weights(tiny_checkpoint_factory):
    bf16 = {}
    for file in tiny_checkpoint_factory(weight_block_size=[32, 16]).glob("*.safetensors"):
        bf16.update(load_file(file))
    fp8 = {}
    for file in tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 16]).glob("*.safetensors"):
        fp8.update(load_file(file))
    assert set(fp8) == set(bf16) | {name + "_scale_inv" for name, t in fp8.items() if t.dtype == torch.float8_e4m3fn}
    for name, reference in bf16.items():
        stored = fp8[name]
        if stored.dtype != torch.float8_e4m3fn:
            assert torch.equal(stored, reference), name
            continue
        scale_inv = fp8[name + "_scale_inv"]
        q, expected_scale = quantize_fp8_blockwise(reference, (32, 16))
        assert torch.equal(scale_inv, expected_scale), name
        assert torch.equal(stored.view(torch.uint8), q.view(torch.uint8)), name
        deq = dequantize_blockwise_reference(stored, scale_inv, (32, 16))
        w = reference.float()
        assert (deq - w).abs().le(e4m3_error_bound(w, per_element(scale_inv, w.shape, (32, 16)))).all(), name


def test_tiny_checkpoint_is_deterministic_and_seeded(tmp_path, tiny_ckpt):
    again = make_tiny_checkpoint(tmp_path / "again")
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    for file in sorted(tiny_ckpt.iterdir()):
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    with safe_open(tiny_ckpt / "model-00001-of-00003.safetensors", "pt") as a, safe_open(
        other / "model-00001-of-00003.safetensors", "pt"
    ) as b:
        shard_a = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
        assert shard_a == "model-00001-of-00003.safetensors"
        assert not torch.equal(a.get_tensor(name), b.get_tensor(name))


def test_config_tokenizer_and_generation_files(tiny_ckpt):
    from transformers import AutoTokenizer

    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert set(DEEPSEEK_V3_CONFIG) <= set(config) and "quantization_config" not in config
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert (config["topk_method"], config["scoring_func"], config["norm_topk_prob"]) == ("noaux_tc", "sigmoid", True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert len(tokenizer) <= config["vocab_size"]
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.bos_token_id == config["bos_token_id"] == 0
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == config["eos_token_id"] == 1
    ids = tokenizer("The experts route 12 + 7 = 19 tokens.").input_ids
    assert ids[0] == 0 and tokenizer.decode(ids, skip_special_tokens=True) == "The experts route 12 + 7 = 19 tokens."
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == f"{BOS_TOKEN}{USER_TOKEN}Hi there{ASSISTANT_TOKEN}Hello!{EOS_TOKEN}"
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{BOS_TOKEN}{USER_TOKEN}Hi there{ASSISTANT_TOKEN}"
    for token in (USER_TOKEN, ASSISTANT_TOKEN):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    generation = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)


def test_make_tiny_checkpoint_refuses_overwrite_and_bad_overrides(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ck", num_shards=1)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny_checkpoint(out)
    make_tiny_checkpoint(out, overwrite=True, num_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    with pytest.raises(ValueError, match="unknown config key.*'n_groups'"):
        build_config(n_groups=2)
    with pytest.raises(CheckpointError, match="'n_group'"):
        build_config(n_group=3)
    with pytest.raises(ValueError, match="num_shards"):
        make_tiny_checkpoint(tmp_path / "too_many", num_shards=99)
    assert not (tmp_path / "too_many").exists()


# ------------------------------------------------------------------------------------------------
# DeepseekV3Config
# ------------------------------------------------------------------------------------------------


def test_config_parsing_and_derived_facts(tiny_ckpt, tiny_fp8_ckpt):
    cfg = DeepseekV3Config.load(tiny_ckpt)
    assert (cfg.hidden_size, cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.q_lora_rank) == (64, 16, 4, 2, 32)
    assert cfg.moe_layer_ids == [1, 2] and not cfg.is_moe_layer(0) and cfg.mtp_layer_ids == []
    assert not cfg.is_fp8 and cfg.weight_block_size is None and cfg.torch_dtype == "bfloat16"
    assert cfg.rope_interleave is True and cfg.rope_theta == 10000.0
    assert cfg.rope_scaling == {
        "type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    }
    assert cfg.source.endswith("config.json") and re.fullmatch(r"[0-9a-f]{64}", cfg.config_hash)
    fp8 = DeepseekV3Config.load(tiny_fp8_ckpt)
    assert fp8.is_fp8 and fp8.weight_block_size == (128, 128) and fp8.config_hash != cfg.config_hash
    assert cfg == DeepseekV3Config.load(tiny_ckpt) and hash(cfg) == hash(DeepseekV3Config.load(tiny_ckpt))

    raw = dict(cfg.raw)
    # transformers-5 style: rope_parameters with rope_type and rope_theta inside, "dtype" for torch_dtype
    raw5 = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    raw5["rope_parameters"] = dict(raw["rope_scaling"], rope_type="yarn", rope_theta=50000.0)
    del raw5["rope_parameters"]["type"]
    raw5["dtype"] = "float32"
    cfg5 = DeepseekV3Config.from_dict(raw5)
    assert cfg5.rope_scaling == cfg.rope_scaling and cfg5.rope_theta == 50000.0 and cfg5.torch_dtype == "float32"
    plain = DeepseekV3Config.from_dict(raw | {"rope_scaling": None, "num_nextn_predict_layers": 2})
    assert plain.rope_scaling is None and plain.mtp_layer_ids == [3, 4] and plain.config_hash != cfg.config_hash
    default_rope = raw5 | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert DeepseekV3Config.from_dict(default_rope).rope_scaling is None
    required = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "q_lora_rank", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    )
    minimal = {k: raw[k] for k in ("architectures", *required)}
    minimal |= {"n_group": 1, "topk_group": 1}
    defaults = DeepseekV3Config.from_dict(minimal)
    assert defaults.num_key_value_heads == 4 and defaults.first_k_dense_replace == 3
    assert defaults.num_nextn_predict_layers == 0
    assert defaults.rope_interleave and defaults.rope_scaling is None and defaults.routed_scaling_factor == 2.5


@pytest.mark.parametrize(
    "change,pattern",
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            r"unsupported architecture LlamaForCausalLM in .*config\.json \(field 'architectures'\); "
            r"supported: DeepseekV3ForCausalLM",
        ),
        ({"architectures": None, "model_type": "llama"}, r"model_type"),
        ({"scoring_func": "softmax"}, r"scoring_func"),
        ({"topk_method": "greedy"}, r"topk_method"),
        ({"norm_topk_prob": False}, r"norm_topk_prob"),
        ({"moe_layer_freq": 2}, r"moe_layer_freq"),
        ({"n_group": 3}, r"not divisible by n_group.*field 'n_group'"),
        ({"topk_group": 5}, r"topk_group 5 exceeds n_group 4"),
        ({"num_experts_per_tok": 17}, r"num_experts_per_tok"),
        ({"quantization_config": {"quant_method": "awq"}}, r"'awq'.*field 'quantization_config.quant_method'"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, r"rope_scaling"),
        ({"hidden_size": "64"}, r"hidden_size"),
    ],
)
def test_config_rejects_unsupported_values(tiny_ckpt, change, pattern):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(CheckpointError, match=pattern):
        DeepseekV3Config.from_dict(raw, source=str(tiny_ckpt / "config.json"))


# ------------------------------------------------------------------------------------------------
# HFCheckpoint
# ------------------------------------------------------------------------------------------------


def test_reader_matches_safetensors_and_counts_reads(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 16])
    ckpt = HFCheckpoint(path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert ckpt.names() == sorted(weight_map) and ckpt.weight_map == weight_map
    assert "lm_head.weight" in ckpt and "nope" not in ckpt and ckpt.config.weight_block_size == (32, 16)
    assert ckpt.tensors_read == 0 and ckpt.bytes_read == 0

    name = expert_weight_name(2, 7, "down_proj")
    assert ckpt.tensor_info(name) == ("F8_E4M3", (64, 32))
    assert ckpt.tensor_info("model.layers.2.mlp.gate.e_score_correction_bias") == ("F32", (16,))
    assert ckpt.tensors_read == 0  # header only
    with safe_open(path / weight_map[name], "pt") as f:
        q, scale_inv = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    weight = ckpt.read(name)
    assert weight.dtype == torch.float32
    assert torch.equal(weight, dequantize_blockwise_reference(q, scale_inv, (32, 16)))
    assert ckpt.read_names == [name, name + "_scale_inv"] and ckpt.tensors_read == 2
    assert ckpt.bytes_read == 64 * 32 * 1 + (2 * 2) * 4
    assert ckpt.read(name, dtype=torch.bfloat16).dtype == torch.bfloat16

    raw = ckpt.read_raw(name)
    assert raw.dtype == torch.float8_e4m3fn and torch.equal(raw.view(torch.uint8), q.view(torch.uint8))
    for plain in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        with safe_open(path / weight_map[plain], "pt") as f:
            expected = f.get_tensor(plain)
        assert torch.equal(ckpt.read_raw(plain), expected)
        assert torch.equal(ckpt.read(plain), expected.float())
    assert ckpt.tensors_read == 2 + 2 + 1 + 4
    assert ckpt.bytes_read == 2 * (64 * 32 + 16) + 64 * 32 + 2 * (512 * 64 * 2) + 2 * (16 * 4)

    # an expert-parallel rank reading its experts touches exactly those tensors
    ckpt.reset_counters()
    for expert in (4, 5):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            ckpt.read(expert_weight_name(1, expert, proj))
    assert all(re.match(r"model\.layers\.1\.mlp\.experts\.[45]\.", n) for n in ckpt.read_names)
    assert ckpt.tensors_read == 12


def test_reader_single_file_checkpoint(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory(num_shards=1)
    ckpt = HFCheckpoint(path)
    assert set(ckpt.weight_map.values()) == {"model.safetensors"}
    assert ckpt.read("model.norm.weight").dtype == torch.float32


def _copy(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(src, tmp_path / "ckpt"))


def _rewrite_index(path: pathlib.Path, edit) -> None:
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


def test_reader_errors_missing_shard(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path)
    (path / "model-00002-of-00003.safetensors").unlink()
    message = r"index .* names shard model-00002-of-00003\.safetensors which does not exist"
    with pytest.raises(CheckpointError, match=message):
        HFCheckpoint(path)


def test_reader_errors_index_names_unknown_file(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path)
    _rewrite_index(path, lambda wm: wm.__setitem__("model.norm.weight", "model-00009-of-00009.safetensors"))
    with pytest.raises(CheckpointError, match=r"model-00009-of-00009\.safetensors which does not exist"):
        HFCheckpoint(path)


def test_reader_errors_shard_deleted_after_open(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path)
    ckpt = HFCheckpoint(path)
    (path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard file .*model-00003-of-00003\.safetensors does not exist"):
        ckpt.read("lm_head.weight")


def test_reader_errors_tensor_missing_from_shard(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"lists tensor {re.escape(name)} in {shard.name}, which does not hold it"):
        HFCheckpoint(path)  # the check at open
    ckpt = HFCheckpoint(path, check=False)  # and the per-read check behind it
    message = rf"tensor {re.escape(name)} is in the index but missing from shard file .*{shard.name}"
    with pytest.raises(CheckpointError, match=message):
        ckpt.read(name)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        ckpt.tensor_info(name)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.9\.nope\.weight is not in index"):
        ckpt.read("model.layers.9.nope.weight")


def test_reader_errors_fp8_weight_without_scale(tiny_fp8_ckpt, tmp_path):
    path = _copy(tiny_fp8_ckpt, tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite_index(path, lambda wm: wm.pop(name + "_scale_inv"))
    message = rf"FP8 tensor {re.escape(name)} in .*safetensors has no {re.escape(name)}_scale_inv"
    with pytest.raises(CheckpointError, match=message):
        HFCheckpoint(path).read(name)


def test_reader_errors_bad_config(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"unsupported architecture LlamaForCausalLM in .*config\.json"):
        HFCheckpoint(path)
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing required field 'hidden_size' in .*config\.json"):
        HFCheckpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json does not exist"):
        HFCheckpoint(path)


# ------------------------------------------------------------------------------------------------
# converters/make_tiny_checkpoint.py
# ------------------------------------------------------------------------------------------------


def test_make_tiny_checkpoint_cli(tmp_path):
    script = REPO_ROOT / "converters" / "make_tiny_checkpoint.py"
    out = tmp_path / "cli"
    args = [sys.executable, str(script), "--output", str(out), "--fp8", "--seed", "3", "--num-shards", "2"]
    for override in ("q_lora_rank=null", "n_group=1", "topk_group=1", "weight_block_size=[32,16]"):
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    cfg = HFCheckpoint(out).config
    assert cfg.q_lora_rank is None and cfg.n_group == 1 and cfg.weight_block_size == (32, 16)
    assert len(list(out.glob("model-0000?-of-00002.safetensors"))) == 2
    # the tokenizer trains identically in another process
    in_process = make_tiny_checkpoint(tmp_path / "here")
    assert (out / "tokenizer.json").read_bytes() == (in_process / "tokenizer.json").read_bytes()

    bad = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "bad"), "--set", "n_groups=2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown config key" in bad.stderr and "'n_groups'" in bad.stderr
    assert not (tmp_path / "bad").exists()
