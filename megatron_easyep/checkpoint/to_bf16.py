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
import pathlib
import shutil
from dataclasses import dataclass

import torch

from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.reader import (
    CONFIG_FILE,
    FP8_DTYPES,
    INDEX_FILE,
    SCALE_SUFFIX,
    CheckpointError,
    DeepseekV3Config,
    HFCheckpoint,
    read_safetensors_header,
)


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
    with io.staged_output(dst, overwrite=overwrite, lock=True) as staging:
        weight_map: dict[str, str] = {}
        dequantized = copied = total_size = 0
        for shard in shards:
            if log:
                log(f"converting {shard}")
            headers, metadata = read_safetensors_header(src / shard)
            names = [n for n, s in checkpoint.weight_map.items() if s == shard]
            fp8 = {n for n in names if headers[n].dtype in FP8_DTYPES}
            out = [io.TensorEntry(n, "BF16" if n in fp8 else headers[n].dtype, headers[n].shape) for n in names
                   if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in fp8)]
            total_size += _write_shard(checkpoint, staging / shard, out, fp8, metadata)
            weight_map.update((entry.name, shard) for entry in out)
            dequantized += sum(1 for entry in out if entry.name in fp8)
            copied += sum(1 for entry in out if entry.name not in fp8)
        if (src / INDEX_FILE).is_file():
            source_index = json.loads((src / INDEX_FILE).read_text(encoding="utf-8"))
            io.write_index(staging, weight_map, total_size, source_index.get("metadata"))
        io.write_json(staging / CONFIG_FILE, new_config)
        for path in sorted(src.iterdir()):
            if path.name.startswith(".") or path.name in (CONFIG_FILE, INDEX_FILE) or path.name.endswith(".safetensors"):
                continue
            if path.is_dir():
                shutil.copytree(path, staging / path.name, symlinks=False)
            else:
                shutil.copy2(path, staging / path.name)
        HFCheckpoint(staging, allow_unexpected=allow_unexpected)  # the copy passes the same check
    return ConversionReport(dst, dequantized, copied, total_size)


def _write_shard(checkpoint: HFCheckpoint, path: pathlib.Path, out: list[io.TensorEntry], fp8: set[str],
                 metadata) -> int:
    """Header first, then each tensor's bytes; one tensor in memory at a time, larger element
    types first (`io.aligned`)."""

    def payload(entry: io.TensorEntry, f: io.ShardFile) -> None:
        if entry.name in fp8:
            f.write_tensor(checkpoint.read(entry.name, dtype=torch.float32).to(torch.bfloat16))
        else:
            f.write_tensor(checkpoint.read_raw(entry.name))

    return io.write_safetensors(path, io.aligned(out), payload, metadata=metadata, fsync=True)
