"""The dequantised BF16 copy of a DeepSeek FP8 checkpoint (the A100/A800 workflow).

Users without FP8 GEMMs convert DeepSeek's FP8 release to BF16, score the copy, and prune the FP8
original with those scores (score files record the architecture apart from the storage format).

`convert_fp8_to_bf16` streams: one tensor in memory at a time, each output shard written with its
header first (shapes and dtypes are known from the source headers) and then its tensors in order.
FP8 weights become ``(q.float() * scale_inv per block).bfloat16()`` (DeepSeek's fp8_cast_bf16
rule); their ``*_scale_inv`` disappear; every other tensor (the fp32 expert bias, BF16 norms,
router and embeddings) is copied byte for byte. config.json loses ``quantization_config`` and says
torch_dtype bfloat16; the index is rebuilt; tokenizer and other files are copied. The copy is
assembled in a temporary sibling and renamed into place; the source is never modified.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import uuid
from dataclasses import dataclass

import torch

from megatron_easyep.checkpoint.reader import (
    CONFIG_FILE,
    FP8_DTYPES,
    INDEX_FILE,
    SAFETENSORS_ITEMSIZE,
    SCALE_SUFFIX,
    CheckpointError,
    DeepseekV3Config,
    HFCheckpoint,
    read_safetensors_header,
)
from megatron_easyep.checkpoint.tiny import move_into_place


@dataclass(frozen=True)
class ConversionReport:
    path: pathlib.Path
    dequantized: int  # FP8 weights turned into BF16
    copied: int  # tensors copied byte for byte
    total_size: int  # bytes of tensor data in the copy


def bf16_config(raw: dict) -> dict:
    """The copy's config.json: the source's, key order kept, without quantization_config and
    with torch_dtype (and transformers 5's dtype, where present) bfloat16."""
    config = {k: v for k, v in raw.items() if k != "quantization_config"}
    config["torch_dtype"] = "bfloat16"
    if "dtype" in config:
        config["dtype"] = "bfloat16"
    return config


def convert_fp8_to_bf16(src_dir, dst_dir, *, overwrite: bool = False, allow_unexpected: bool | None = None,
                        log=None) -> ConversionReport:
    """Write the BF16 copy of the FP8 checkpoint `src_dir` to `dst_dir` (see the module docstring).
    Raises CheckpointError (a ValueError) before anything is created when the source is not an
    FP8 checkpoint, fails HFCheckpoint's index/shard check, or `dst_dir` is in the way."""
    src, dst = pathlib.Path(src_dir).resolve(), pathlib.Path(dst_dir).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise CheckpointError(f"output {dst} overlaps the source checkpoint {src}; write the copy elsewhere")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"output {dst} already exists (pass --overwrite to replace it)")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output {dst} exists and is not a directory; refusing to replace it")
    checkpoint = HFCheckpoint(src, allow_unexpected=allow_unexpected)
    if not checkpoint.config.is_fp8:
        raise CheckpointError(f"{src / CONFIG_FILE} has no FP8 quantization_config: nothing to dequantise")
    raw_config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    new_config = bf16_config(raw_config)
    DeepseekV3Config.from_dict(new_config, source=f"BF16 copy of {src / CONFIG_FILE}")

    shards = sorted(set(checkpoint.weight_map.values()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        weight_map: dict[str, str] = {}
        dequantized = copied = total_size = 0
        for shard in shards:
            if log:
                log(f"converting {shard}")
            headers, metadata = read_safetensors_header(src / shard)
            names = [n for n, s in checkpoint.weight_map.items() if s == shard]
            fp8 = {n for n in names if headers[n].dtype in FP8_DTYPES}
            out = [(n, "BF16" if n in fp8 else headers[n].dtype, headers[n].shape) for n in names
                   if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in fp8)]
            sizes = _write_shard(checkpoint, staging / shard, out, fp8, metadata)
            for name, _, _ in out:
                weight_map[name] = shard
            dequantized += sum(1 for n, _, _ in out if n in fp8)
            copied += sum(1 for n, _, _ in out if n not in fp8)
            total_size += sizes
        if (src / INDEX_FILE).is_file():
            source_index = json.loads((src / INDEX_FILE).read_text(encoding="utf-8"))
            metadata = dict(source_index.get("metadata") or {})
            metadata["total_size"] = total_size
            index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (staging / CONFIG_FILE).write_text(json.dumps(new_config, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        for path in sorted(src.iterdir()):
            if path.name.startswith(".") or path.name in (CONFIG_FILE, INDEX_FILE) or path.name.endswith(".safetensors"):
                continue
            if path.is_dir():
                shutil.copytree(path, staging / path.name, symlinks=False)
            else:
                shutil.copy2(path, staging / path.name)
        HFCheckpoint(staging, allow_unexpected=allow_unexpected)  # the copy passes the same check
        move_into_place(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionReport(dst, dequantized, copied, total_size)


def _write_shard(checkpoint: HFCheckpoint, path: pathlib.Path, out: list, fp8: set[str], metadata) -> int:
    """Header first, then each tensor's bytes; one tensor in memory at a time. Larger element
    types first, so every tensor starts at a multiple of its element size."""
    ordered = sorted(out, key=lambda t: -SAFETENSORS_ITEMSIZE[t[1]])
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in ordered:
        nbytes = SAFETENSORS_ITEMSIZE[dtype] * _numel(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for name, dtype, shape in ordered:
            if name in fp8:
                tensor = checkpoint.read(name, dtype=torch.float32).to(torch.bfloat16)
            else:
                tensor = checkpoint.read_raw(name)
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise CheckpointError(f"tensor {name}: read {data.nbytes} bytes, its header says otherwise")
            f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)
    return offset


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
