"""Streaming export of a pruned HF checkpoint, driven by a `selection.Selection`.

No model and no Megatron: the exporter rewrites safetensors shards at the byte level.

- Every output tensor is a byte range of a source shard (copied with copy_file_range, so FP8
  weights, their `weight_scale_inv` and every untouched tensor are byte-identical by construction),
  or, for `mlp.gate.weight` and `mlp.gate.e_score_correction_bias`, the kept rows of one (a
  row-major [E, ...] tensor's rows are contiguous byte runs, so slicing needs no dtype handling and
  the fp32 bias stays fp32).
- Disabled expert slots (`Selection.disabled`: kept as weights, never routed; C-Prune's uneven
  per-layer counts) get `e_score_correction_bias` = DISABLED_BIAS (-1e4) written in the bias's own
  dtype; every other byte is unchanged. pruning.json lists them under "disabled_experts".
- Memory is bounded by one router weight plus a copy buffer, never a shard or the model.
- Kept experts of a layer are renumbered 0..M-1 in ascending original id, which keeps routing
  groups contiguous (shared/reference/deepseek-checkpoint.md, constraint 4).
- Output shards keep the source shard names and tensor-to-shard assignment; a shard left empty
  (e.g. MTP dropped) is not written.
- Everything is validated before the first byte is written; the output is assembled in a
  temporary sibling of DST and renamed into place at the end.
- Merging instead of dropping (`merge=`, a `merge.MergePlan`): after the byte copy, each kept
  expert that absorbs dropped ones is overwritten in place with the merged weights (same names,
  dtypes, shapes; pruning.json "merge"), before `finalize` runs (so --rebalance-bias fits the
  merged model). See pruning/merge.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    SAFETENSORS_ITEMSIZE as _ITEMSIZE,
    SINGLE_FILE,
    CheckpointError,
    DeepseekV3Config,
    HFCheckpoint,
    StoredTensor as _StoredTensor,
    read_safetensors_header as _read_safetensors_header,
)
from megatron_easyep.pruning.merge import MERGE_KEY, MergePlan, MergeWriter
from megatron_easyep.pruning.preflight import PREFLIGHT_FILE, dumps_preflight, preflight_for_config
from megatron_easyep.pruning.selection import (
    DISABLED_BIAS,
    RANDOM_METRIC,
    Selection,
    SelectionError,
    check_model_identity,
    pruned_routing_groups,
    validate_disabled,
    validate_feasibility,
)

PRUNING_FILE = "pruning.json"
PRUNING_FORMAT = "megatron-easyep-pruning/1"
MTP_ACTIONS = ("prune", "drop")
MTP_FALLBACK_RULE = (
    "sum over the scored MoE layers of their L1-normalised rows of the chosen metric (domains "
    "mixed as for every layer), then the same group policy; expert ids are not aligned across "
    "layers, so this keeps the MTP layer consistent and servable but is not an importance estimate"
)

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")
_ROUTER_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
_BIAS_TENSOR = "mlp.gate.e_score_correction_bias"
# how DISABLED_BIAS is encoded for each floating bias dtype
_FILL_FORMATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ExportError(ValueError):
    """The export cannot be done as asked; nothing has been written."""


# --------------------------------------------------------------------------------------------
# safetensors headers (read and written here so tensors move as bytes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: _StoredTensor
    rows: tuple[int, ...] | None  # kept rows of dim 0, or None for a verbatim byte copy
    fill_rows: frozenset[int] = frozenset()  # output rows written as `fill` (disabled bias slots)
    fill: bytes = b""  # one row's bytes

    @property
    def nbytes(self) -> int:
        if self.rows is None:
            return self.source.end - self.source.begin
        return len(self.rows) * self._row_bytes

    @property
    def _row_bytes(self) -> int:
        return (self.source.end - self.source.begin) // self.source.shape[0]


def _write_shard(src_path: Path, dst_path: Path, tensors: list[_OutputTensor], metadata) -> None:
    # Larger element types first (`io.aligned`); within a size, source order keeps reads sequential.
    ordered = io.aligned(tensors, key=lambda t: t.source.begin)
    by_name = {tensor.name: tensor for tensor in ordered}
    entries = [io.TensorEntry(t.name, t.dtype, t.shape) for t in ordered]
    with open(src_path, "rb") as src:

        def payload(entry: io.TensorEntry, dst: io.ShardFile) -> None:
            tensor = by_name[entry.name]
            if tensor.rows is None:
                dst.copy_range(src.fileno(), tensor.source.begin, tensor.nbytes)
                return
            row_bytes = tensor._row_bytes
            data = os.pread(src.fileno(), tensor.source.end - tensor.source.begin, tensor.source.begin)
            dst.write(b"".join(tensor.fill if out_row in tensor.fill_rows
                               else data[r * row_bytes : (r + 1) * row_bytes]
                               for out_row, r in enumerate(tensor.rows)))

        io.write_safetensors(dst_path, entries, payload, metadata=metadata)


# --------------------------------------------------------------------------------------------
# planning: every decision is made (and checked) before anything is written
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    path: Path
    num_tensors: int
    total_size: int  # bytes of tensor data, as the index records it
    seconds: float
    preflight: dict[str, Any]
    pruning: dict[str, Any]


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise ExportError(f"source checkpoint {src} is not a directory")
    if dst == src:
        raise ExportError(f"output {dst} is the source checkpoint; write the pruned copy elsewhere")
    if src in dst.parents:
        raise ExportError(f"output {dst} is inside the source checkpoint {src}")
    if dst in src.parents:
        raise ExportError(f"the source checkpoint {src} is inside the output {dst}")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise ExportError(f"output {dst} already exists (pass overwrite / --overwrite to replace it)")
        if not dst.is_dir() or dst.is_symlink():
            raise ExportError(f"output {dst} exists and is not a directory; refusing to replace it")


def _pruned_config(
    raw_text: str, source: DeepseekV3Config, selection: Selection, drop_mtp: bool
) -> dict[str, Any]:
    """The source config.json with only the routing (and MTP) fields changed, key order kept.

    A key the source leaves to its default is only added when the pruned value differs from it.
    """
    config = json.loads(raw_text)
    config["n_routed_experts"] = selection.keep
    if "n_group" in config or selection.n_group != source.n_group:
        config["n_group"] = selection.n_group
    if "topk_group" in config or selection.topk_group != source.topk_group:
        config["topk_group"] = selection.topk_group
    if drop_mtp:
        for key in ("num_nextn_predict_layers", "num_mtp_layers"):
            if key in config:
                config[key] = 0
    return config


def _disabled_fill(name: str, stored: _StoredTensor) -> bytes:
    """DISABLED_BIAS as one element of the bias tensor's dtype."""
    if stored.dtype not in _FILL_FORMATS or len(stored.shape) != 1:
        raise CheckpointError(f"tensor {name}: cannot write a disabled-expert bias into a {stored.dtype} "
                              f"tensor of shape {stored.shape}")
    value = torch.tensor([DISABLED_BIAS], dtype=_FILL_FORMATS[stored.dtype])
    return value.view(torch.uint8).numpy().tobytes()


def _plan(
    checkpoint: HFCheckpoint,
    layer_kept: dict[int, tuple[int, ...]],
    dropped: set[int],
    layer_disabled: dict[int, tuple[int, ...]] | None = None,
) -> tuple[dict[str, list[_OutputTensor]], dict[str, Any]]:
    """Per source shard file: the tensors to write there (any order) and the shard's metadata."""
    config = checkpoint.config
    renumber = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in layer_kept.items()}
    experts_seen: dict[int, set[int]] = {layer: set() for layer in layer_kept}
    routers_seen: dict[int, set[str]] = {layer: set() for layer in layer_kept}
    plan: dict[str, list[_OutputTensor]] = {}
    headers: dict[str, dict[str, _StoredTensor]] = {}
    metadata: dict[str, Any] = {}

    for shard in sorted(set(checkpoint.weight_map.values())):
        headers[shard], metadata[shard] = _read_safetensors_header(checkpoint.path / shard)
        plan[shard] = []

    for name, shard in checkpoint.weight_map.items():
        stored = headers[shard].get(name)
        if stored is None:
            raise CheckpointError(f"tensor {name} is in the index but missing from shard file {shard}")
        itemsize = _ITEMSIZE.get(stored.dtype)
        if itemsize is None or math.prod(stored.shape) * itemsize != stored.end - stored.begin:
            raise CheckpointError(f"tensor {name} in {shard}: dtype {stored.dtype} / shape {stored.shape} "
                                  f"do not match its {stored.end - stored.begin} bytes")
        out = _OutputTensor(name, stored.dtype, stored.shape, stored, None)
        match = _LAYER_NAME.match(name)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            if layer in dropped:
                continue
            if layer in layer_kept:
                expert = _EXPERT_NAME.match(rest)
                if rest.startswith("mlp.experts.") and not expert:
                    raise CheckpointError(f"tensor {name}: unsupported expert layout (expected mlp.experts.<id>.*)")
                if expert:
                    old_id = int(expert.group(1))
                    if old_id >= config.n_routed_experts:
                        raise CheckpointError(f"tensor {name}: expert id {old_id} >= n_routed_experts "
                                              f"{config.n_routed_experts}")
                    experts_seen[layer].add(old_id)
                    if old_id not in renumber[layer]:
                        continue
                    new_name = f"model.layers.{layer}.mlp.experts.{renumber[layer][old_id]}.{expert.group(2)}"
                    out = _OutputTensor(new_name, stored.dtype, stored.shape, stored, None)
                elif rest in _ROUTER_TENSORS:
                    if not stored.shape or stored.shape[0] != config.n_routed_experts:
                        raise CheckpointError(f"tensor {name} has shape {stored.shape}; its first dimension "
                                              f"should be n_routed_experts={config.n_routed_experts}")
                    routers_seen[layer].add(rest)
                    kept = layer_kept[layer]
                    off = (layer_disabled or {}).get(layer, ())
                    if rest == _BIAS_TENSOR and off:
                        out = _OutputTensor(name, stored.dtype, (len(kept), *stored.shape[1:]), stored, kept,
                                            frozenset(kept.index(i) for i in off), _disabled_fill(name, stored))
                    else:
                        out = _OutputTensor(name, stored.dtype, (len(kept), *stored.shape[1:]), stored, kept)
                elif rest.startswith("mlp.gate."):
                    raise CheckpointError(f"tensor {name}: unknown router tensor; refusing to guess how to prune it")
        plan[shard].append(out)

    for layer in layer_kept:
        if experts_seen[layer] != set(range(config.n_routed_experts)):
            missing = sorted(set(range(config.n_routed_experts)) - experts_seen[layer])
            raise CheckpointError(f"MoE layer {layer} lacks tensors of expert(s) {missing[:8]}"
                                  f"{'...' if len(missing) > 8 else ''} in {checkpoint.path}")
        if routers_seen[layer] != set(_ROUTER_TENSORS):
            raise CheckpointError(f"MoE layer {layer} lacks {sorted(set(_ROUTER_TENSORS) - routers_seen[layer])}")
    return plan, metadata


def _validate_selection(
    selection: Selection, config: DeepseekV3Config, mtp: str
) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """Check the selection against the checkpoint; returns (layer -> kept ids, layer -> disabled
    ids) for the layers written."""
    try:
        check_model_identity("the selection's score file", selection.config_hash, selection.architecture_hash,
                             selection.storage_format, config)
    except SelectionError as err:
        raise ExportError(str(err)) from err
    if selection.n_routed_experts != config.n_routed_experts:
        raise ExportError(f"selection is for {selection.n_routed_experts} experts, source has {config.n_routed_experts}")
    validate_feasibility(
        keep=selection.keep,
        n_routed_experts=config.n_routed_experts,
        group_policy=selection.group_policy,
        n_group=config.n_group,
        topk_group=config.topk_group,
        top_k=config.num_experts_per_tok,
    )
    if (selection.n_group, selection.topk_group) != pruned_routing_groups(
        selection.group_policy, config.n_group, config.topk_group
    ):
        raise ExportError(
            f"selection declares n_group={selection.n_group}, topk_group={selection.topk_group}, which is not "
            f"what policy {selection.group_policy!r} gives for this source"
        )
    layers = list(config.moe_layer_ids) + (list(config.mtp_layer_ids) if mtp == "prune" else [])
    missing = [layer for layer in layers if layer not in selection.kept]
    if missing:
        raise ExportError(f"the selection has no kept experts for layer(s) {missing}")
    allowed = set(config.moe_layer_ids) | set(config.mtp_layer_ids)
    foreign = [layer for layer in selection.kept if layer not in allowed]
    if foreign:
        raise ExportError(f"the selection names layer(s) {foreign}, which are not MoE layers of the source")
    group_size = config.n_routed_experts // config.n_group
    for layer in layers:
        ids = selection.kept[layer]
        if len(ids) != selection.keep or list(ids) != sorted(set(ids)):
            raise ExportError(f"layer {layer}: kept ids must be {selection.keep} distinct ascending ids, got {ids}")
        if ids and not 0 <= ids[0] <= ids[-1] < config.n_routed_experts:
            raise ExportError(f"layer {layer}: kept ids out of range 0..{config.n_routed_experts - 1}")
        if selection.n_group > 1:
            # Pruned group g must be made of original group g's experts, or routing regroups silently.
            if selection.n_group != config.n_group:
                raise ExportError(f"grouped selection must keep n_group={config.n_group}, got {selection.n_group}")
            per_group = selection.keep // selection.n_group
            for group in range(selection.n_group):
                members = ids[group * per_group : (group + 1) * per_group]
                if any(i // group_size != group for i in members):
                    raise ExportError(
                        f"layer {layer}: kept experts are not {per_group} per original routing group; "
                        f"renumbering would silently regroup them (use the collapse policy)"
                    )
    foreign = [layer for layer in selection.disabled if layer not in selection.kept]
    if foreign:
        raise ExportError(f"the selection disables experts of layer(s) {foreign}, which keep no experts")
    layer_kept = {layer: tuple(selection.kept[layer]) for layer in layers}
    layer_disabled = {layer: tuple(selection.disabled[layer]) for layer in layers if selection.disabled.get(layer)}
    try:
        validate_disabled(layer_kept, layer_disabled, group_policy=selection.group_policy, n_group=config.n_group,
                          topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    except ValueError as err:
        raise ExportError(str(err)) from err
    return layer_kept, layer_disabled


def _mtp_rule(selection: Selection, layer: int) -> str:
    if layer in selection.fallback_layers:
        return "fallback: " + MTP_FALLBACK_RULE
    if selection.metric == RANDOM_METRIC:
        return f"random (seed {selection.seed})"
    return "scored"


def _dumps_layer_maps(value, level: int) -> str:
    """JSON of a nested record where a dict keyed by layer (or expert) numbers gets one line per
    key, and lists stay on one line (pruning.json's "merge": 61 layers x 128 clusters)."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    pad, close = "  " * (level + 1), "  " * level
    by_number = all(str(key).isdigit() for key in value)
    items = [f"{pad}{json.dumps(key)}: " + (json.dumps(item) if by_number else _dumps_layer_maps(item, level + 1))
             for key, item in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + close + "}"


def _dumps_pruning_record(record: dict[str, Any]) -> str:
    """JSON with one line per layer's kept (and disabled) ids (readable at 61 layers x 128 ids)."""
    compact = [key for key in ("disabled_experts", "kept_experts") if key in record]
    layered = [key for key in (MERGE_KEY,) if key in record]
    text = json.dumps({k: v for k, v in record.items() if k not in compact + layered}, indent=2)[: -len("\n}")]
    for key in compact:
        layers = ",\n".join(f"    {json.dumps(layer)}: {json.dumps(ids)}" for layer, ids in record[key].items())
        text += f',\n  "{key}": {{' + (f"\n{layers}\n  }}" if layers else "}")
    for key in layered:
        text += f',\n  "{key}": ' + _dumps_layer_maps(record[key], 1)
    return text + "\n}\n"


def _pruning_record(src: Path, checkpoint: HFCheckpoint, selection: Selection, identity_note: str | None,
                    mtp: str, layer_kept: dict, layer_disabled: dict) -> dict[str, Any]:
    """pruning.json: where the pruned checkpoint comes from and what was kept."""
    config = checkpoint.config
    mtp_layers = list(config.mtp_layer_ids)
    return {
        "format": PRUNING_FORMAT,
        "source": {
            "path": str(src),
            "config_hash": config.config_hash,
            "architecture_hash": config.architecture_hash,
            "storage_format": config.storage_format,
            "n_routed_experts": config.n_routed_experts,
            "n_group": config.n_group,
            "topk_group": config.topk_group,
            "unexpected_tensors": list(checkpoint.unexpected),  # let through by allow_unexpected
        },
        "scores_sha256": selection.scores_sha256,
        # the checkpoint the scores were made on (architecture_hash null: an older score file)
        "scores_checkpoint": {
            "config_hash": selection.config_hash,
            "architecture_hash": selection.architecture_hash,
            "storage_format": selection.storage_format,
        },
        "identity_note": identity_note,
        "metric": selection.metric,
        "domains": list(selection.domains) if selection.domains is not None else None,
        "domain_weights": list(selection.domain_weights) if selection.domain_weights is not None else None,
        "seed": selection.seed,
        "group_policy": selection.group_policy,
        "keep": selection.keep,
        "n_group": selection.n_group,
        "topk_group": selection.topk_group,
        "mtp": {
            "layers": mtp_layers,
            "action": mtp if mtp_layers else "none",
            "rule": {str(layer): _mtp_rule(selection, layer) for layer in mtp_layers if mtp == "prune"},
        },
        # HF layer index -> kept original ids whose slots are never routed (bias = disabled_bias)
        "disabled_bias": DISABLED_BIAS,
        "disabled_experts": {str(layer): list(ids) for layer, ids in sorted(layer_disabled.items())},
        # HF layer index -> kept original expert ids; new id j is the j-th entry
        "kept_experts": {str(layer): list(ids) for layer, ids in sorted(layer_kept.items())},
    }


def _other_files(src: Path, weight_files: set[str]) -> list[Path]:
    """Tokenizer, generation config, code, docs: everything but weights, index and our records."""
    skip = weight_files | {INDEX_FILE, CONFIG_FILE, PRUNING_FILE, PREFLIGHT_FILE}
    return sorted(
        path
        for path in src.iterdir()
        if not path.name.startswith(".")
        and path.name not in skip
        and not path.name.endswith(".safetensors")  # weight files the index does not list
    )


def _check_mtp_present(checkpoint: HFCheckpoint, mtp: str) -> None:
    present = {int(m.group(1)) for m in map(_LAYER_NAME.match, checkpoint.weight_map) if m}
    absent_mtp = [layer for layer in checkpoint.config.mtp_layer_ids if layer not in present]
    if absent_mtp and mtp == "prune":
        raise ExportError(
            f"config declares MTP layer(s) {absent_mtp} but the checkpoint has no tensors for them; "
            f"use mtp='drop' (--mtp drop) to write num_nextn_predict_layers 0"
        )


def _write_shards(src: Path, staging: Path, plan: dict, shard_metadata: dict, progress) -> tuple[dict[str, str], int]:
    """Every planned shard into the staging directory; (tensor name -> shard, bytes of tensor data)."""
    weight_map: dict[str, str] = {}
    total_size = 0
    planned_size = sum(tensor.nbytes for tensors in plan.values() for tensor in tensors)
    for shard, tensors in plan.items():
        if not tensors:
            continue
        _write_shard(src / shard, staging / shard, tensors, shard_metadata[shard])
        for tensor in tensors:
            weight_map[tensor.name] = shard
            total_size += tensor.nbytes
        if progress:
            progress(total_size, planned_size)
    return weight_map, total_size


def export_pruned(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    selection: Selection,
    *,
    mtp: str = "prune",
    overwrite: bool = False,
    allow_unexpected: bool | None = None,
    log=None,
    finalize=None,
    progress=None,
    merge: MergePlan | None = None,
) -> ExportReport:
    """Write a pruned copy of the HF checkpoint `src_dir` to `dst_dir` (see the module docstring).

    mtp="prune" prunes the MTP layer(s) with the selection's ids for them; mtp="drop" removes
    their tensors and sets num_nextn_predict_layers to 0. Raises ExportError / CheckpointError
    (both ValueError) before anything is created when the request cannot be honoured.
    The source passes HFCheckpoint's index/shard check first; `allow_unexpected` lets tensors
    the config does not describe through (copied verbatim, listed in pruning.json).
    Scores made on another storage format of the same architecture (a BF16 copy of an FP8
    checkpoint, or the reverse) are accepted with a one-line note (`log`, and pruning.json).
    `finalize(staging_dir, pruning, log)`, when given, runs on the complete staged checkpoint before
    pruning.json is written and the directory is renamed into place; it may rewrite tensor bytes
    in place and add keys to `pruning` (analysis/rebalance.py: --rebalance-bias). If it raises,
    nothing is published. `progress(bytes_written, total_bytes)` is called after each shard.
    `merge` (a `merge.MergePlan`): fold the dropped experts into the kept ones (pruning/merge.py);
    checked against this selection and the source's tensors before anything is written, applied
    to the staged output before `finalize`.
    """
    started = time.perf_counter()
    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    if mtp not in MTP_ACTIONS:
        raise ExportError(f"unknown MTP action {mtp!r}; choose one of {list(MTP_ACTIONS)}")
    _check_paths(src, dst, overwrite)
    checkpoint = HFCheckpoint(src, allow_unexpected=allow_unexpected)
    config = checkpoint.config
    layer_kept, layer_disabled = _validate_selection(selection, config, mtp)
    identity_note = check_model_identity("the score file", selection.config_hash, selection.architecture_hash,
                                         selection.storage_format, config)
    if identity_note and log:
        log(identity_note)
    _check_mtp_present(checkpoint, mtp)
    dropped = set(config.mtp_layer_ids) if mtp == "drop" else set()
    plan, shard_metadata = _plan(checkpoint, layer_kept, dropped, layer_disabled)
    merger = None
    if merge is not None:
        merger = MergeWriter.prepare(merge, checkpoint, layer_kept, layer_disabled, dropped_layers=dropped)
    config_text = (src / CONFIG_FILE).read_text(encoding="utf-8")
    new_config = _pruned_config(config_text, config, selection, drop_mtp=bool(dropped))
    DeepseekV3Config.from_dict(new_config, source=f"pruned {CONFIG_FILE}")  # the result must parse too
    source_index = {}
    if (src / INDEX_FILE).is_file():
        source_index = json.loads((src / INDEX_FILE).read_text(encoding="utf-8"))

    preflight = preflight_for_config(new_config)
    pruning = _pruning_record(src, checkpoint, selection, identity_note, mtp, layer_kept, layer_disabled)

    # ---- everything checked: write into a staging sibling, then rename into place ----
    with io.staged_output(dst, overwrite=overwrite, lock=True) as staging:
        weight_map, total_size = _write_shards(src, staging, plan, shard_metadata, progress)
        io.write_index(staging, weight_map, total_size, source_index.get("metadata"))
        io.write_json(staging / CONFIG_FILE, new_config)
        for path in _other_files(src, set(checkpoint.weight_map.values()) | {SINGLE_FILE}):
            if path.is_dir():
                shutil.copytree(path, staging / path.name, symlinks=False)
            else:
                shutil.copy2(path, staging / path.name)
        if merger is not None:
            pruning[MERGE_KEY] = merger.apply(staging, weight_map, log)
        if finalize is not None:
            finalize(staging, pruning, log)
        (staging / PRUNING_FILE).write_text(_dumps_pruning_record(pruning), encoding="utf-8")
        (staging / PREFLIGHT_FILE).write_text(dumps_preflight(preflight), encoding="utf-8")
    return ExportReport(
        path=dst,
        num_tensors=len(weight_map),
        total_size=total_size,
        seconds=time.perf_counter() - started,
        preflight=preflight,
        pruning=pruning,
    )


def kept_byte_ranges(src_dir: str | os.PathLike, selection: Selection, *, mtp: str = "prune") -> Iterable[tuple[Path, int, int]]:
    """(shard path, offset, length) per output tensor: the payload a plain copy of the kept bytes
    moves (bench/export_bench.py's speed baseline). A sliced router tensor is represented by a
    run of the same length from its start, which is the same amount of I/O."""
    src = Path(src_dir).resolve()
    checkpoint = HFCheckpoint(src)
    layer_kept, layer_disabled = _validate_selection(selection, checkpoint.config, mtp)
    dropped = set(checkpoint.config.mtp_layer_ids) if mtp == "drop" else set()
    plan, _ = _plan(checkpoint, layer_kept, dropped, layer_disabled)
    for shard, tensors in plan.items():
        for tensor in sorted(tensors, key=lambda t: t.source.begin):
            yield src / shard, tensor.source.begin, tensor.nbytes
