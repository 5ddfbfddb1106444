"""Megatron-Core GPTModel -> Hugging Face DeepseekV3ForCausalLM checkpoint directory.

The reverse of `model.load_weights`, through the same name table (`mapping.hf_source`): every
Megatron state-dict entry names the HF tensor(s) it came from; SwiGLU ``linear_fc1`` = cat(gate,
up) is split back in two halves along dim 0, everything else is copied as is (both store
[out, in]). The router's ``expert_bias`` becomes ``e_score_correction_bias`` in fp32.

Scope: expert parallel 1 (the whole model in one process, which is what training on CPU uses);
a model built with EP > 1 holds only its rank's experts and is refused. No MTP layer (the
GPTModel from `model.build_model` has none), ``rope_interleave`` true and untied embeddings
(DeepSeek's settings, the ones whose parity with transformers is measured).

Output, like DeepSeek's own releases: ``config.json`` with every DeepSeek-V3 key (the caller
passes the dict, e.g. from `checkpoint.deepseek.deepseek_v3_config`), sharded safetensors +
``model.safetensors.index.json`` (a single ``model.safetensors`` when ``num_shards=1``; layers are
never split across shards), BF16 (or fp32, or FP8 e4m3 with per-block ``weight_scale_inv`` and
``quantization_config``; which tensors are FP8 follows `checkpoint.inventory.checkpoint_units`:
attention/MLP/expert projections yes; embeddings, lm_head, norms and router no),
``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json``. The directory is
assembled in a staging sibling and renamed into place (`checkpoint.io.staged_output`).

A trained model is also kept in Megatron form (`save_megatron_state`): ``model_state.pt`` (the
GPTModel state dict, weights only), ``config.json`` (the HF config that defines the architecture)
and ``tokenizer.json``; `converters/megatron_to_hf.py` turns such a directory into HF checkpoints.
"""

from __future__ import annotations

import json
import pathlib

import torch

from megatron_easyep.mcore import mapping
from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.deepseek import BOS_TOKEN_ID, EOS_TOKEN_ID, generation_config, tokenizer_config
from megatron_easyep.checkpoint.fp8_blocks import DEFAULT_BLOCK_SIZE, quantize_fp8_blockwise
from megatron_easyep.checkpoint.inventory import checkpoint_units
from megatron_easyep.checkpoint.reader import CheckpointError, DeepseekV3Config, scale_inv_name

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MEGATRON_STATE_FILE = "model_state.pt"


class HFWriteError(ValueError):
    """The model or the arguments cannot be written as asked; nothing has been written."""


def _check_supported(cfg: DeepseekV3Config) -> None:
    if cfg.num_nextn_predict_layers:
        raise HFWriteError("num_nextn_predict_layers > 0: MTP layers are not written (the GPTModel "
                           "built by model.build_model has none)")
    if not cfg.rope_interleave:
        raise HFWriteError("rope_interleave false is not supported by the writer (DeepSeek's "
                           "checkpoints use the interleaved layout Megatron's MLA reproduces)")
    if cfg.tie_word_embeddings:
        raise HFWriteError("tie_word_embeddings true is not supported (DeepSeek never ties them)")


@torch.no_grad()
def megatron_to_hf_tensors(model, cfg: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """{HF name: fp32 tensor (cpu)} for every weight of `model` (EP 1), checked against the full
    set of tensors a DeepseekV3ForCausalLM with `cfg` has."""
    _check_supported(cfg)
    experts = cfg.n_routed_experts
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=False).items():
        try:
            source = mapping.hf_source(name, experts_per_rank=experts, ep_rank=0)
        except KeyError:
            raise HFWriteError(f"Megatron tensor {name} has no entry in the HF name table "
                               "(megatron_easyep/mcore/mapping.py)") from None
        if source is None or not isinstance(value, torch.Tensor):
            continue
        value = value.detach().to("cpu", torch.float32)
        if value.shape[0] % len(source.names):
            raise HFWriteError(f"{name}: {value.shape[0]} rows cannot be split into "
                               f"{len(source.names)} equal parts {source.names}")
        parts = value.chunk(len(source.names), dim=0)  # fc1 = cat(gate, up)
        for hf_name, part in zip(source.names, parts):
            if hf_name in out:
                raise HFWriteError(f"HF tensor {hf_name} is produced twice (second time from {name})")
            out[hf_name] = part.clone()

    expected = {spec.name: spec for unit in checkpoint_units(cfg) for spec in unit}
    missing = sorted(set(expected) - set(out))
    if missing:
        hint = (" (the model holds fewer experts than n_routed_experts: built with expert "
                "parallel > 1? the writer needs EP 1)" if any(".experts." in m for m in missing) else "")
        raise HFWriteError(f"{len(missing)} HF tensor(s) have no Megatron source, e.g. "
                           f"{missing[:3]}{hint}")
    extra = sorted(set(out) - set(expected))
    if extra:
        raise HFWriteError(f"Megatron produced tensors DeepseekV3 with this config does not have: {extra[:3]}")
    for hf_name, spec in expected.items():
        if tuple(out[hf_name].shape) != tuple(spec.shape):
            raise HFWriteError(f"{hf_name}: Megatron gives shape {tuple(out[hf_name].shape)}, config "
                               f"{cfg.source} implies {tuple(spec.shape)}")
    return out


def _check_tokenizer(tokenizer_json: str, cfg: DeepseekV3Config, config: dict) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise HFWriteError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size "
                           f"{cfg.vocab_size}")
    for key, token_id in (("bos_token_id", BOS_TOKEN_ID), ("eos_token_id", EOS_TOKEN_ID)):
        if config.get(key) != token_id:
            raise HFWriteError(f"config {key} is {config.get(key)}, the DeepSeek tokenizer layout "
                               f"has {token_id}")


def write_hf_checkpoint(source, config: dict, out_dir, *, dtype: str = "bfloat16", fp8: bool = False,
                        weight_block_size=None, num_shards: int = 2, tokenizer_json: str | None = None,
                        overwrite: bool = False) -> pathlib.Path:
    """Write a DeepseekV3ForCausalLM directory from a Megatron GPTModel (or the dict that
    `megatron_to_hf_tensors` returns) and its config.json dict.

    dtype: storage dtype of the non-FP8 tensors ("bfloat16" as DeepSeek, or "float32"); the expert
    bias is always fp32. fp8: quantise the projection weights block-wise (block from
    `weight_block_size`, else the config's quantization_config, else 128x128) from their
    `dtype`-rounded values, so an FP8 and a BF16 checkpoint of one model hold the same weights up
    to the FP8 rounding.
    """
    if dtype not in STORAGE_DTYPES:
        raise HFWriteError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    out_dir = pathlib.Path(out_dir)
    io.check_output(out_dir, overwrite)

    config = json.loads(json.dumps(config))
    old_qc = config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    block_size = None
    if fp8:
        block_size = tuple(weight_block_size or (old_qc or {}).get("weight_block_size") or DEFAULT_BLOCK_SIZE)
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8",
                                         "weight_block_size": [int(b) for b in block_size]}
    config = dict(sorted(config.items()))
    try:
        cfg = DeepseekV3Config.from_dict(config, source="config for the HF writer")
    except CheckpointError as exc:
        raise HFWriteError(str(exc)) from exc
    _check_supported(cfg)
    if tokenizer_json is not None:
        _check_tokenizer(tokenizer_json, cfg, config)

    tensors = source if isinstance(source, dict) else megatron_to_hf_tensors(source, cfg)
    units = checkpoint_units(cfg)
    storage = STORAGE_DTYPES[dtype]

    def stored(spec) -> dict[str, torch.Tensor]:
        value = tensors[spec.name]
        if spec.init == "bias":  # e_score_correction_bias: fp32, as DeepSeek and transformers keep it
            return {spec.name: value.to(torch.float32).contiguous()}
        value = value.to(storage).contiguous()
        if block_size is not None and spec.quantizable:
            q, scale_inv = quantize_fp8_blockwise(value, block_size)
            return {spec.name: q, scale_inv_name(spec.name): scale_inv}
        return {spec.name: value}

    missing = [s.name for unit in units for s in unit if s.name not in tensors]
    if missing:
        raise HFWriteError(f"no value for HF tensor(s) {missing[:3]}")
    unit_bytes = [sum(tensors[s.name].numel() for s in unit) for unit in units]
    groups = io.split_units_into_shards(unit_bytes, num_shards)

    with io.staged_output(out_dir, overwrite=overwrite) as staging:
        weight_map: dict[str, str] = {}
        total_size = 0
        for index, group in enumerate(groups):
            shard = io.shard_name(index, num_shards)
            shard_tensors: dict[str, torch.Tensor] = {}
            for unit_index in group:
                for spec in units[unit_index]:
                    shard_tensors.update(stored(spec))
            total_size += io.write_tensors(staging / shard, shard_tensors, metadata={"format": "pt"})
            weight_map.update((name, shard) for name in shard_tensors)
        if num_shards > 1:
            io.write_index(staging, weight_map, total_size)
        io.write_json(staging / "config.json", config)
        io.write_json(staging / "generation_config.json", generation_config(config))
        if tokenizer_json is not None:
            (staging / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            io.write_json(staging / "tokenizer_config.json", tokenizer_config(cfg.max_position_embeddings))
    return out_dir


# --------------------------------------------------------------------------------------------
# the Megatron side on disk
# --------------------------------------------------------------------------------------------

def save_megatron_state(model, config: dict, out_dir, *, tokenizer_json: str | None = None) -> pathlib.Path:
    """A Megatron GPTModel's weights (state dict without extra state) + the HF config that
    defines its architecture + tokenizer, for `load_megatron_state` / the converter CLI."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith(mapping.IGNORED_SUFFIXES)}
    torch.save(state, out_dir / MEGATRON_STATE_FILE)
    io.write_json(out_dir / "config.json", config)
    if tokenizer_json is not None:
        (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return out_dir


def load_megatron_state(state_dir, *, dtype: torch.dtype = torch.float32):
    """(config dict, GPTModel with the saved weights, tokenizer.json text or None).
    parallel_state must be initialised with expert parallel 1 (parallel.init_parallel(1))."""
    from megatron_easyep.mcore.model import build_model, transformer_config

    state_dir = pathlib.Path(state_dir)
    config_path, state_path = state_dir / "config.json", state_dir / MEGATRON_STATE_FILE
    for path in (config_path, state_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (a Megatron state directory holds "
                                    f"config.json and {MEGATRON_STATE_FILE})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    cfg = DeepseekV3Config.from_dict(config, source=str(config_path))
    model = build_model(cfg, transformer_config(cfg, dtype=dtype, expert_parallel=1))
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(mapping.IGNORED_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{state_path} does not fit the model of {config_path}: missing "
                              f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    tokenizer_path = state_dir / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8") if tokenizer_path.is_file() else None
    return config, model, tokenizer_json
