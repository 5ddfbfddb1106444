"""Reading DeepSeek-V3-class Hugging Face checkpoints: config validation and lazy tensor access.

`DeepseekV3Config` parses and validates ``config.json`` (only the DeepSeek-V3 routing flavour that
Megatron-Core reproduces: sigmoid scores, expert bias, group-limited top-k, renormalised weights).
`HFCheckpoint` opens the safetensors index and reads one tensor at a time, dequantising FP8 weights
with their ``*_scale_inv``; it counts what it reads so tests can prove an expert-parallel rank only
touches its own experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
from typing import Any

import torch
from safetensors import safe_open

from megatron_easyep.checkpoint.fp8_blocks import DEFAULT_BLOCK_SIZE, dequantize_fp8_blockwise
from megatron_easyep.checkpoint.inventory import expected_tensors

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_ARCHITECTURE = "DeepseekV3ForCausalLM"
SUPPORTED_MODEL_TYPE = "deepseek_v3"
SCALE_SUFFIX = "_scale_inv"

# safetensors header dtype strings -> torch dtypes (the ones DeepSeek checkpoints use, and a few more).
SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# bytes per element of safetensors dtypes (sub-byte types are not supported)
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Set to 1 to accept tensors the config does not describe (vendor extras); the flag
# --allow-unexpected-tensors of the converters does the same for one call.
ALLOW_UNEXPECTED_ENV = "EASYEP_ALLOW_UNEXPECTED_TENSORS"
_PROBLEMS_SHOWN = 5


class CheckpointError(ValueError):
    """A checkpoint directory, config or tensor is missing or not what we support.

    The message always names the file, tensor or config field at fault.
    """


def expert_weight_name(layer: int, expert: int, proj: str) -> str:
    """HF name of a routed expert's weight; proj is gate_proj, up_proj or down_proj."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def scale_inv_name(weight_name: str) -> str:
    """DeepSeek's scale for an FP8 weight: ``x.weight`` -> ``x.weight_scale_inv``."""
    return weight_name + SCALE_SUFFIX


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------

# Shape-defining keys: no default is safe for these (transformers' defaults are DeepSeek-V3-671B's
# values, which would silently give wrong shapes for any other model). q_lora_rank must be present
# but may be null (Moonlight).
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)

# Optional keys and their defaults, as transformers' DeepseekV3Config (5.x) has them; scoring_func
# and topk_method are hard-wired there (sigmoid, noaux_tc). num_nextn_predict_layers is the one
# deliberate difference: transformers defaults num_mtp_layers to 1, but a config that does not
# declare an MTP layer has none in its safetensors, so we default to 0.
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # -> num_attention_heads
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_interleave": True,
}

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
    "n_group",
    "topk_group",
    "moe_layer_freq",
)
_NON_NEGATIVE_INT_FIELDS = ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers")

_YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0}


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    scoring_func: str
    topk_method: str
    norm_topk_prob: bool
    num_nextn_predict_layers: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    rope_theta: float
    # DeepSeek's yarn dict with every key filled in, or None for plain rope.
    rope_scaling: dict | None = dataclasses.field(hash=False)  # compared, not hashed (a dict)
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_interleave: bool
    weight_block_size: tuple[int, int] | None
    torch_dtype: str
    raw: dict = dataclasses.field(repr=False, compare=False)
    source: str = dataclasses.field(default=CONFIG_FILE, compare=False)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, ckpt_dir) -> "DeepseekV3Config":
        path = pathlib.Path(ckpt_dir) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist (every HF checkpoint needs {CONFIG_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG_FILE) -> "DeepseekV3Config":
        if not isinstance(d, dict):
            raise CheckpointError(f"{source} must hold a JSON object, got {type(d).__name__}")

        def fail(field: str, problem: str) -> CheckpointError:
            return CheckpointError(f"{problem} in {source} (field '{field}')")

        architectures = d.get("architectures")
        if architectures is not None:
            if not isinstance(architectures, list) or SUPPORTED_ARCHITECTURE not in architectures:
                single = isinstance(architectures, list) and len(architectures) == 1
                shown = architectures[0] if single else architectures
                raise CheckpointError(
                    f"unsupported architecture {shown} in {source} (field 'architectures'); "
                    f"supported: {SUPPORTED_ARCHITECTURE}"
                )
        elif d.get("model_type") != SUPPORTED_MODEL_TYPE:
            raise CheckpointError(
                f"unsupported model_type {d.get('model_type')!r} in {source} (field 'model_type', no "
                f"'architectures'); supported: {SUPPORTED_MODEL_TYPE} / {SUPPORTED_ARCHITECTURE}"
            )

        for key in _REQUIRED_KEYS:
            if key not in d:
                raise fail(key, f"missing required field '{key}'")
        values = {key: d[key] for key in _REQUIRED_KEYS}
        for key, default in _OPTIONAL_DEFAULTS.items():
            values[key] = d.get(key, default)
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            values["num_nextn_predict_layers"] = d["num_mtp_layers"]

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for key in _INT_FIELDS:
            if not is_int(values[key]) or values[key] <= 0:
                raise fail(key, f"'{key}' must be a positive integer, got {values[key]!r}")
        for key in _NON_NEGATIVE_INT_FIELDS:
            if not is_int(values[key]) or values[key] < 0:
                raise fail(key, f"'{key}' must be a non-negative integer, got {values[key]!r}")
        q_lora_rank = values["q_lora_rank"]
        if q_lora_rank is not None and (not is_int(q_lora_rank) or q_lora_rank <= 0):
            raise fail("q_lora_rank", f"'q_lora_rank' must be a positive integer or null, got {q_lora_rank!r}")
        for key in ("routed_scaling_factor", "rope_theta", "rms_norm_eps"):
            if not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or values[key] <= 0:
                raise fail(key, f"'{key}' must be a positive number, got {values[key]!r}")
            values[key] = float(values[key])
        for key in ("norm_topk_prob", "tie_word_embeddings", "rope_interleave"):
            if not isinstance(values[key], bool):
                raise fail(key, f"'{key}' must be true or false, got {values[key]!r}")

        # The routing Megatron-Core reproduces (and that transformers implements).
        if values["scoring_func"] != "sigmoid":
            raise fail("scoring_func", f"unsupported scoring_func {values['scoring_func']!r}; supported: 'sigmoid'")
        if values["topk_method"] != "noaux_tc":
            raise fail("topk_method", f"unsupported topk_method {values['topk_method']!r}; supported: 'noaux_tc'")
        if values["norm_topk_prob"] is not True:
            raise fail("norm_topk_prob", "norm_topk_prob must be true (Megatron always renormalises top-k weights)")
        if values["moe_layer_freq"] != 1:
            raise fail("moe_layer_freq", f"unsupported moe_layer_freq {values['moe_layer_freq']}; supported: 1")
        n_experts, n_group, topk_group = values["n_routed_experts"], values["n_group"], values["topk_group"]
        top_k = values["num_experts_per_tok"]
        if n_experts % n_group:
            raise fail("n_group", f"n_routed_experts {n_experts} is not divisible by n_group {n_group}")
        if topk_group > n_group:
            raise fail("topk_group", f"topk_group {topk_group} exceeds n_group {n_group}")
        if top_k > n_experts:
            raise fail("num_experts_per_tok", f"num_experts_per_tok {top_k} exceeds n_routed_experts {n_experts}")
        # Groups are scored by the sum of their top-2 experts (transformers, vLLM, SGLang).
        if n_experts // n_group < 2:
            raise fail("n_group", f"n_routed_experts / n_group = {n_experts}/{n_group} < 2 experts per group")
        if top_k > topk_group * (n_experts // n_group):
            raise fail(
                "num_experts_per_tok",
                f"num_experts_per_tok {top_k} exceeds the experts in the selected groups "
                f"(topk_group {topk_group} x {n_experts // n_group} experts per group)",
            )
        if values["first_k_dense_replace"] > values["num_hidden_layers"]:
            raise fail(
                "first_k_dense_replace",
                f"first_k_dense_replace {values['first_k_dense_replace']} exceeds num_hidden_layers "
                f"{values['num_hidden_layers']}",
            )

        values["rope_scaling"] = _normalise_rope(d, values, fail)
        values["weight_block_size"] = _parse_quantization(d.get("quantization_config"), fail)

        torch_dtype = d.get("torch_dtype", d.get("dtype", "bfloat16"))
        if not isinstance(torch_dtype, str):
            raise fail("torch_dtype", f"'torch_dtype' must be a string, got {torch_dtype!r}")
        values["torch_dtype"] = torch_dtype.removeprefix("torch.")

        return cls(**values, raw=json.loads(json.dumps(d)), source=str(source))

    # ---- derived facts -------------------------------------------------------------------------

    def is_moe_layer(self, layer: int) -> bool:
        """HF layer index -> MoE? MTP layers (index >= num_hidden_layers) are MoE layers too."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def mtp_layer_ids(self) -> list[int]:
        n = self.num_hidden_layers
        return list(range(n, n + self.num_nextn_predict_layers))

    @property
    def is_fp8(self) -> bool:
        return self.weight_block_size is not None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def config_hash(self) -> str:
        """sha256 of config.json as written: every key, storage format included."""
        canonical = json.dumps(self.raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def architecture(self) -> dict[str, Any]:
        """Every parsed field that changes the computation (shapes, routing, rope, norms, vocab,
        MTP), normalised, without the storage format (torch_dtype, quantization_config): a BF16
        copy of an FP8 checkpoint has the same architecture. hidden_act and attention_bias are
        not parsed (the model supports silu / no bias only) but are part of the computation."""
        storage_or_bookkeeping = {"weight_block_size", "torch_dtype", "raw", "source"}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in storage_or_bookkeeping}
        fields["hidden_act"] = self.raw.get("hidden_act", "silu")
        fields["attention_bias"] = self.raw.get("attention_bias", False)
        return fields

    @property
    def architecture_hash(self) -> str:
        canonical = json.dumps(self.architecture, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def storage_format(self) -> dict[str, Any]:
        """How the weights are stored: {"dtype": ..., "quantization": null or DeepSeek's FP8 blocks}."""
        quantization = None
        if self.weight_block_size is not None:
            quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(self.weight_block_size)}
        return {"dtype": self.torch_dtype, "quantization": quantization}


def describe_storage(storage: dict[str, Any] | None) -> str:
    """One phrase for a `DeepseekV3Config.storage_format` dict: "bfloat16" or "fp8 e4m3 (128x128 blocks)"."""
    if not storage:
        return "an unrecorded storage format"
    quantization = storage.get("quantization")
    if quantization:
        block = quantization.get("weight_block_size") or ["?", "?"]
        return f"{quantization.get('quant_method', 'fp8')} {quantization.get('fmt', 'e4m3')} ({block[0]}x{block[1]} blocks)"
    return str(storage.get("dtype"))


def _normalise_rope(d: dict, values: dict, fail) -> dict | None:
    """DeepSeek's ``rope_scaling`` or transformers-5's ``rope_parameters`` -> full yarn dict or None."""
    field = "rope_scaling" if d.get("rope_scaling") is not None else "rope_parameters"
    rope = d.get(field)
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise fail(field, f"'{field}' must be an object or null, got {rope!r}")
    if field == "rope_parameters" and "rope_theta" in rope:
        theta = rope["rope_theta"]
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise fail(field, f"rope_theta must be a positive number, got {theta!r}")
        values["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", "rope", None):
        return None
    if rope_type != "yarn":
        raise fail(field, f"unsupported rope type {rope_type!r}; supported: plain rope or 'yarn'")
    if not isinstance(rope.get("factor"), (int, float)) or rope["factor"] <= 0:
        raise fail(field, f"yarn needs a positive 'factor', got {rope.get('factor')!r}")
    normalised = {"type": "yarn", "rope_type": "yarn", "factor": float(rope["factor"])}
    normalised["original_max_position_embeddings"] = int(
        rope.get("original_max_position_embeddings", values["max_position_embeddings"])
    )
    for key, default in _YARN_DEFAULTS.items():
        value = rope.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise fail(field, f"yarn '{key}' must be a number, got {value!r}")
        normalised[key] = value
    return normalised


def _parse_quantization(qc, fail) -> tuple[int, int] | None:
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise fail("quantization_config", f"'quantization_config' must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise fail(
            "quantization_config.quant_method",
            f"unsupported quantization method {method!r}; supported: 'fp8' (DeepSeek block-wise e4m3)",
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise fail("quantization_config.fmt", f"unsupported fp8 format {fmt!r}; supported: 'e4m3'")
    block = qc.get("weight_block_size", list(DEFAULT_BLOCK_SIZE))
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise fail(
            "quantization_config.weight_block_size",
            f"weight_block_size must be two positive integers, got {block!r}",
        )
    return int(block[0]), int(block[1])


# --------------------------------------------------------------------------------------------------
# safetensors access
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it; begin/end are absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: pathlib.Path) -> tuple[dict[str, StoredTensor], dict[str, str] | None]:
    """(name -> StoredTensor, __metadata__) from a shard's header; no tensor data is read."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"shard file {path} is too short to be safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"shard file {path} has a corrupt safetensors header length (truncated file?)")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"shard file {path} has a corrupt safetensors header: {err}") from err
    except FileNotFoundError:
        raise CheckpointError(f"shard file {path} does not exist") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard file {path} has a corrupt safetensors header (not an object)")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard file {path} has a corrupt header entry for tensor {name}") from None
        if not 0 <= begin <= end <= size - data_start:
            raise CheckpointError(f"tensor {name} in {path} points outside the file (truncated shard?)")
        tensors[name] = StoredTensor(dtype, shape, data_start + begin, data_start + end)
    return tensors, metadata


def _allow_unexpected_default() -> bool:
    return os.environ.get(ALLOW_UNEXPECTED_ENV, "").strip().lower() not in ("", "0", "false", "no")


class HFCheckpoint:
    """A DeepSeek-V3 HF checkpoint directory, read lazily one tensor at a time.

    Counters (to prove what was touched): ``tensors_read`` and ``bytes_read`` count every tensor
    loaded from disk (scale tensors included), ``read_names`` lists them in order.
    """

    def __init__(self, path, *, check: bool = True, allow_unexpected: bool | None = None):
        """Open ``path``; with ``check`` (the default) the index and shard headers are checked
        against each other and against config.json first (`check_inventory`). ``allow_unexpected``
        accepts tensors the config does not describe; None takes $EASYEP_ALLOW_UNEXPECTED_TENSORS."""
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config = DeepseekV3Config.load(self.path)
        self.weight_map: dict[str, str] = self._load_weight_map()
        self._handles: dict[str, Any] = {}
        self.tensors_read = 0
        self.bytes_read = 0
        self.read_names: list[str] = []
        self.unexpected: list[str] = []  # tensors accepted by allow_unexpected
        if check:
            if allow_unexpected is None:
                allow_unexpected = _allow_unexpected_default()
            self.unexpected = self.check_inventory(allow_unexpected=allow_unexpected)

    def check_inventory(self, *, allow_unexpected: bool = False) -> list[str]:
        """Index <-> shard headers <-> config, from the headers only (no tensor data is read):
        every index entry is in the shard it names, every shard tensor is in the index, the
        index's total_size matches, every tensor the model needs is there, every FP8 weight has a
        scale of the right grid, and nothing else is (unless allow_unexpected; MTP layers, rotary
        buffers and scales are known extras). Raises CheckpointError naming tensors and files;
        returns the unexpected tensors that allow_unexpected let through."""
        index_path = self.path / INDEX_FILE
        has_index = index_path.is_file()
        headers = {shard: read_safetensors_header(self.path / shard)[0]
                   for shard in sorted(set(self.weight_map.values()))}
        holders: dict[str, list[str]] = {}
        for shard, tensors in headers.items():
            for name in tensors:
                holders.setdefault(name, []).append(shard)
        problems: list[str] = []

        for name, shard in sorted(self.weight_map.items()):
            if name not in headers[shard]:
                elsewhere = [s for s in holders.get(name, []) if s != shard]
                problems.append(f"{index_path} lists tensor {name} in {shard}, which does not hold it"
                                + (f" (it is in {', '.join(elsewhere)})" if elsewhere else ""))
        for shard, tensors in headers.items():
            for name, stored in tensors.items():
                listed = self.weight_map.get(name)
                if listed != shard:
                    problems.append(f"shard file {self.path / shard} holds tensor {name}, which {index_path} "
                                    + ("does not list" if listed is None else f"places in {listed}"))
                itemsize = SAFETENSORS_ITEMSIZE.get(stored.dtype)
                if itemsize is None or math.prod(stored.shape) * itemsize != stored.nbytes:
                    problems.append(f"tensor {name} in {self.path / shard}: dtype {stored.dtype} / shape "
                                    f"{stored.shape} do not match its {stored.nbytes} bytes")

        expected = expected_tensors(self.config)
        for name in sorted(expected.required - set(self.weight_map)):
            where = index_path if has_index else self.path / SINGLE_FILE
            problems.append(f"tensor {name}, which {self.config.source} requires, is in no shard "
                            f"(not in {where})")
        unexpected = []
        block = self.config.weight_block_size or DEFAULT_BLOCK_SIZE
        for name, shard in sorted(self.weight_map.items()):
            stored = headers[shard].get(name)
            if name.endswith(SCALE_SUFFIX):
                weight = name[: -len(SCALE_SUFFIX)]
                if weight in self.weight_map and expected.is_known(weight):
                    continue
            elif expected.is_known(name):
                if stored is not None and stored.dtype in FP8_DTYPES:
                    problems += self._scale_problems(name, stored, shard, headers, block)
                continue
            unexpected.append(name)
            if not allow_unexpected:
                where = self.path / shard if stored is not None else f"the entry of {INDEX_FILE}"
                problems.append(f"tensor {name} in {where} is not part of the model "
                                f"{self.config.source} describes (a damaged or foreign index or shard; "
                                f"set {ALLOW_UNEXPECTED_ENV}=1 or pass --allow-unexpected-tensors "
                                f"to accept vendor extras)")

        if has_index:
            total_size = self._index_metadata(index_path).get("total_size")
            if total_size is not None:
                held = sum(headers[shard][name].nbytes for name, shard in self.weight_map.items()
                           if name in headers[shard])
                if not isinstance(total_size, int) or isinstance(total_size, bool) or total_size != held:
                    problems.append(f"{index_path}: metadata.total_size is {total_size!r} but the tensors "
                                    f"it lists hold {held} bytes (damaged or hand-edited index)")
        if problems:
            more = len(problems) - _PROBLEMS_SHOWN
            raise CheckpointError(f"{self.path} fails the index/shard check: " + "; ".join(problems[:_PROBLEMS_SHOWN])
                                  + (f"; and {more} more problem(s)" if more > 0 else ""))
        return unexpected

    def _scale_problems(self, name, stored, shard, headers, block) -> list[str]:
        scale_name = scale_inv_name(name)
        scale_shard = self.weight_map.get(scale_name)
        scale = headers[scale_shard].get(scale_name) if scale_shard else None
        if scale is None:
            return [f"FP8 tensor {name} in {self.path / shard} has no {scale_name} in the checkpoint"]
        if len(stored.shape) == 2:
            grid = (math.ceil(stored.shape[0] / block[0]), math.ceil(stored.shape[1] / block[1]))
            if scale.shape != grid:
                return [f"FP8 tensor {name} {stored.shape} in {self.path / shard}: {scale_name} has shape "
                        f"{scale.shape}, expected {grid} for {block[0]}x{block[1]} blocks"]
        return []

    @staticmethod
    def _index_metadata(index_path: pathlib.Path) -> dict:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        metadata = index.get("metadata")
        return metadata if isinstance(metadata, dict) else {}

    def _load_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index_path} is not valid JSON: {exc}") from exc
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{index_path} has no 'weight_map' object of name -> file")
            for shard in sorted(set(weight_map.values())):
                if os.path.basename(shard) != shard:
                    raise CheckpointError(f"index {index_path} names shard {shard!r} outside the checkpoint")
                if not (self.path / shard).is_file():
                    raise CheckpointError(
                        f"index {index_path} names shard {shard} which does not exist in {self.path}"
                    )
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as handle:
                return {name: SINGLE_FILE for name in handle.keys()}
        raise CheckpointError(f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    # ---- lookup --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shard_file(self, name: str) -> pathlib.Path:
        try:
            return self.path / self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in index of {self.path}") from None

    def _handle(self, shard: pathlib.Path):
        handle = self._handles.get(shard.name)
        if handle is None:
            if not shard.is_file():
                raise CheckpointError(f"shard file {shard} does not exist")
            try:
                handle = safe_open(shard, framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot open shard file {shard}: {exc}") from exc
            self._handles[shard.name] = handle
        return handle

    def _check_in_shard(self, name: str):
        shard = self.shard_file(name)
        handle = self._handle(shard)
        if name not in handle.keys():
            raise CheckpointError(f"tensor {name} is in the index but missing from shard file {shard}")
        return shard, handle

    def tensor_info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string such as "BF16", "F32", "F8_E4M3"; shape) from the header only."""
        _, handle = self._check_in_shard(name)
        tensor_slice = handle.get_slice(name)
        return tensor_slice.get_dtype(), tuple(tensor_slice.get_shape())

    # ---- reading -------------------------------------------------------------------------------

    def read_raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored (FP8 stays FP8, no scale applied)."""
        _, handle = self._check_in_shard(name)
        tensor = handle.get_tensor(name)
        self.tensors_read += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.read_names.append(name)
        return tensor

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as ``dtype``; FP8 weights are dequantised with their ``*_scale_inv``."""
        tensor = self.read_raw(name)
        if tensor.dtype != torch.float8_e4m3fn:
            return tensor.to(dtype)
        scale_name = scale_inv_name(name)
        shard = self.shard_file(name)
        if scale_name not in self.weight_map:
            raise CheckpointError(f"FP8 tensor {name} in {shard} has no {scale_name}")
        scale_inv = self.read_raw(scale_name)
        block_size = self.config.weight_block_size or DEFAULT_BLOCK_SIZE
        try:
            return dequantize_fp8_blockwise(tensor, scale_inv, block_size, dtype=dtype)
        except ValueError as exc:
            raise CheckpointError(f"cannot dequantise FP8 tensor {name} in {shard}: {exc}") from exc

    def reset_counters(self) -> None:
        self.tensors_read = 0
        self.bytes_read = 0
        self.read_names = []

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, {len(self.weight_map)} tensors)"

