"""Stock transformers' DeepseekV3 as the independent oracle for tests.

Facts about transformers 5.23 this helper relies on (read from its source):

* Routing (``DeepseekV3TopkRouter.forward``): scores = sigmoid(x @ W.T) in fp32; choice scores =
  scores + e_score_correction_bias; group score = sum of the top-2 choice scores in each of the
  n_group contiguous groups; the topk_group best groups are kept and every expert of the other
  groups gets choice score ``-inf`` (``masked_fill(~mask, float("-inf"))`` -- older transformers and
  DeepSeek's reference code used 0.0, which only matters if a choice score can be <= 0); top-k
  over the masked choice scores; weights = the *unbiased* sigmoid scores of the chosen experts,
  renormalised (norm_topk_prob) and multiplied by routed_scaling_factor.
* The routed experts are fused at load time into ``mlp.experts.gate_up_proj`` [E, 2F, H] and
  ``mlp.experts.down_proj`` [E, H, F]; ``e_score_correction_bias`` is kept in fp32.
* MTP: the main model never builds ``model.layers.{num_hidden_layers}``; it silences only
  ``model\\.layers\\.61.*`` (DeepSeek-V3's MTP index), so for smaller checkpoints the MTP tensors
  come back as "unexpected keys". We accept exactly those. ``MtpModel.from_pretrained(model)``
  (``generate(use_mtp=True)``) finds MTP weights through the same pattern, so
  `load_transformers_mtp` points it at the right layer index.
* FP8: ``from_pretrained`` of a ``quant_method: fp8`` checkpoint needs the ``accelerate`` package
  even with ``FineGrainedFP8Config(dequantize=True)`` (the quantizer's validate_environment raises
  ImportError without it), and accelerate is not a dependency of this project. So FP8 checkpoints
  are dequantised here, with a block loop written independently of megatron_easyep.checkpoint.fp8_blocks, into a
  temporary fp32 copy that stock ``from_pretrained`` then loads (so expert fusion and every other
  load-time conversion stay transformers' own).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCALE_SUFFIX = "_scale_inv"


def dequantize_blockwise_reference(q: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """Independent DeepSeek FP8 dequantisation: an explicit loop over blocks, in float32."""
    b0, b1 = block_size
    rows, cols = q.shape
    assert tuple(scale_inv.shape) == (math.ceil(rows / b0), math.ceil(cols / b1)), (q.shape, scale_inv.shape)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            out[block] = q[block].to(torch.float32) * scale_inv[i, j].item()
    return out


def read_checkpoint_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as stored, straight from safetensors (no megatron_easyep code)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    index_path = ckpt_dir / "model.safetensors.index.json"
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(ckpt_dir / file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def dequantized_state_dict(ckpt_dir) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors with FP8 weights dequantised and their scales dropped."""
    config = json.loads((pathlib.Path(ckpt_dir) / "config.json").read_text())
    block_size = tuple((config.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    stored = read_checkpoint_tensors(ckpt_dir)
    result = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = dequantize_blockwise_reference(tensor, stored[name + SCALE_SUFFIX], block_size)
        result[name] = tensor.to(torch.float32)
    return result


def mtp_key_pattern(config: dict) -> re.Pattern:
    first = config["num_hidden_layers"]
    last = first + config.get("num_nextn_predict_layers", 0) - 1
    layers = "|".join(str(i) for i in range(first, last + 1)) or "(?!)"
    return re.compile(rf"^model\.layers\.({layers})\.")


def _write_dequantized_copy(ckpt_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    config = json.loads((ckpt_dir / "config.json").read_text())
    config.pop("quantization_config")
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(dequantized_state_dict(ckpt_dir), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (ckpt_dir / extra).exists():
            shutil.copy(ckpt_dir / extra, out_dir / extra)


def load_transformers_model(ckpt_dir, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV3ForCausalLM with the checkpoint's weights, in eval mode.

    Asserts that no weight is missing or mismatched and that the only unexpected keys are the MTP
    layer's. For FP8 checkpoints the model is loaded from a dequantised temporary copy, kept alive
    as ``model._oracle_tmpdir`` (MTP loading reads the files again).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    ckpt_dir = pathlib.Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    tmpdir = None
    load_dir = ckpt_dir
    if (config.get("quantization_config") or {}).get("quant_method") == "fp8":
        tmpdir = tempfile.TemporaryDirectory(prefix="hf_oracle_fp8_")
        load_dir = pathlib.Path(tmpdir.name)
        _write_dequantized_copy(ckpt_dir, load_dir)

    # Quiet the progress bar and the (expected) unexpected-MTP-keys report; we check it ourselves.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(load_dir, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    assert type(model).__name__ == "DeepseekV3ForCausalLM", type(model)
    assert not info["missing_keys"], f"missing keys: {sorted(info['missing_keys'])}"
    assert not info["mismatched_keys"], f"mismatched keys: {sorted(info['mismatched_keys'])}"
    assert not info["error_msgs"], info["error_msgs"]
    mtp = mtp_key_pattern(config)
    not_mtp = sorted(k for k in info["unexpected_keys"] if not mtp.match(k))
    assert not not_mtp, f"unexpected non-MTP keys: {not_mtp}"
    if config.get("num_nextn_predict_layers", 0):
        assert info["unexpected_keys"], "MTP layer tensors were expected among the unexpected keys"
    model._oracle_tmpdir = tmpdir
    model._oracle_unexpected_keys = sorted(info["unexpected_keys"])
    return model.eval()


def load_transformers_mtp(model):
    """transformers' own MTP module (``MtpModel``) for a model from `load_transformers_model`.

    Its embedding and head are the main model's (DeepSeek's MTP copies of them are ignored).
    """
    from transformers.modeling_layers import MtpModel
    from transformers.utils import logging as hf_logging

    n = model.config.num_hidden_layers
    n_mtp = model.config.num_mtp_layers
    assert n_mtp > 0, "checkpoint has no MTP layer (num_nextn_predict_layers 0)"
    # MtpModel finds MTP weights through this pattern, which transformers hard-codes for layer 61.
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{i}\..*" for i in range(n, n + n_mtp)]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return MtpModel.from_pretrained(model).eval()  # raises if any MTP weight is missing
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
