"""checkpoint/io: what it writes is read back by independent readers (the safetensors library, a
hand parser of the header, hashlib), and publishing an output is atomic and leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.reader import HFCheckpoint
from megatron_easyep.pruning.selection import SelectionError, load_scores


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),  # 30 bytes: the next must be re-aligned
        "w.fp8": torch.randn(7, 4, generator=g).to(torch.float8_e4m3fn),
        "bias.f32": torch.randn(5, generator=g),
        "s.f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "ids.i64": torch.arange(6).reshape(2, 3),
        "mask.bool": torch.tensor([True, False, True]),
        "scalar.f32": torch.tensor(1.5),
        "empty.bf16": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def _raw_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (FP8 has no equality of its own)."""
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def test_written_tensors_read_back_with_the_safetensors_library(tmp_path):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    io.write_tensors(path, tensors, metadata={"format": "pt", "note": "x"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert _same(loaded[name], value), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    # laid out like the library lays out its own files: every tensor at a multiple of its element size
    header = _raw_header(path)
    for name, value in tensors.items():
        assert header[name]["data_offsets"][0] % value.element_size() == 0, name
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    # the library's own file of the same tensors holds the same values
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    ref = load_file(tmp_path / "ref.safetensors")
    assert all(_same(ref[k], loaded[k]) for k in tensors)


def test_byte_ranges_of_another_file_and_a_wrong_size_is_named(tmp_path):
    src = tmp_path / "src.safetensors"
    tensors = _tensors()
    save_file(tensors, str(src))
    header = _raw_header(src)
    base = 8 + struct.unpack("<Q", src.read_bytes()[:8])[0]
    entries = io.aligned([io.TensorEntry(n, h["dtype"], tuple(h["shape"])) for n, h in header.items()
                          if n != "__metadata__"], key=lambda e: e.name)
    with open(src, "rb") as f:
        def payload(entry, dst):
            begin, end = header[entry.name]["data_offsets"]
            dst.copy_range(f.fileno(), base + begin, end - begin)

        io.write_safetensors(tmp_path / "copy.safetensors", entries, payload)
    copy = load_file(tmp_path / "copy.safetensors")
    assert all(_same(copy[k], tensors[k]) for k in tensors)

    def short(entry, dst):
        dst.write(b"\0" * (entry.nbytes - (entry.name == "bias.f32")))

    with pytest.raises(ValueError, match=r"bias\.f32 in .*bad\.safetensors: wrote 19 bytes, its header says 20"):
        io.write_safetensors(tmp_path / "bad.safetensors", entries, short)


def test_shard_names_and_index_are_what_hugging_face_reads(tmp_path):
    assert io.shard_name(0, 1) == "model.safetensors"
    assert [io.shard_name(i, 3) for i in range(3)] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    groups = io.split_units_into_shards([10, 1, 1, 10, 1, 1], 3)
    assert [list(g) for g in groups] == [[0], [1, 2, 3], [4, 5]]
    assert [i for g in groups for i in g] == list(range(6))
    index = io.write_index(tmp_path, {"b": "s2", "a": "s1"}, 123, {"total_size": 1, "kept": "yes"})
    assert json.loads(index.read_text()) == {"metadata": {"total_size": 123, "kept": "yes"},
                                             "weight_map": {"a": "s1", "b": "s2"}}
    assert list(json.loads(index.read_text())["weight_map"]) == ["a", "b"]


def test_a_written_checkpoint_index_matches_its_shards(tiny_checkpoint_factory):
    """The index of a generated checkpoint against the shards as the safetensors library reads them."""
    path = tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 32])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    by_shard: dict[str, set] = {}
    for name, shard in index["weight_map"].items():
        by_shard.setdefault(shard, set()).add(name)
    assert sorted(by_shard) == [io.shard_name(i, 3) for i in range(3)]
    total = 0
    for shard, names in by_shard.items():
        tensors = load_file(path / shard)
        assert set(tensors) == names
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert HFCheckpoint(path).weight_map == index["weight_map"]


# --------------------------------------------------------------------------------------------
# atomic publish
# --------------------------------------------------------------------------------------------


def _write_version(directory: Path, tag: str) -> None:
    (directory / "data").write_text(tag * 1000)
    (directory / "tag").write_text(tag)


def _litter(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_publish_new_refused_and_overwritten(tmp_path):
    out = tmp_path / "out"
    with io.staged_output(out) as staging:
        _write_version(staging, "a")
    assert (out / "tag").read_text() == "a"
    with pytest.raises(FileExistsError, match="already exists"):
        with io.staged_output(out) as staging:
            _write_version(staging, "b")
    assert (out / "tag").read_text() == "a"
    with io.staged_output(out, overwrite=True) as staging:
        _write_version(staging, "c")
    assert (out / "tag").read_text() == "c" and (out / "data").read_text() == "c" * 1000
    assert _litter(tmp_path, "out") == []
    (tmp_path / "empty").mkdir()  # an empty directory is simply replaced
    with io.staged_output(tmp_path / "empty") as staging:
        _write_version(staging, "d")
    assert (tmp_path / "empty" / "tag").read_text() == "d"


def test_a_failure_while_staging_keeps_the_old_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with io.staged_output(out) as staging:
        _write_version(staging, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with io.staged_output(out, overwrite=True) as staging:
            _write_version(staging, "new")
            raise RuntimeError("disk on fire")
    assert (out / "tag").read_text() == "old" and (out / "data").read_text() == "old" * 1000
    assert _litter(tmp_path, "out") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_inside_publish_restores_the_old_output(tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two directories, publish renames the old output aside
    and the new one in; when that second rename fails (ENOSPC here), the old output comes back."""
    out = tmp_path / "out"
    with io.staged_output(out) as staging:
        _write_version(staging, "old")
    monkeypatch.setattr(io, "exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.partial-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        with io.staged_output(out, overwrite=True) as staging:
            _write_version(staging, "new")
    assert (out / "tag").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _reader(path: str, started, stop, misses, reads) -> None:
    """Reads PATH/data until stopped; a read that finds no file, or a part of one, is a miss."""
    n = bad = 0
    started.set()
    while not stop.is_set():
        try:
            with open(os.path.join(path, "data")) as f:
                text = f.read()
            if len(text) != 1000 or len(set(text)) != 1:
                bad += 1
        except FileNotFoundError:
            bad += 1
        n += 1
    misses.value, reads.value = bad, n


def test_overwrite_is_atomic_for_a_concurrent_reader(tmp_path):
    """Another process reads OUT/data in a loop while OUT is replaced 200 times: it never finds
    the path missing or a file half-written."""
    probe_a, probe_b = tmp_path / "pa", tmp_path / "pb"
    probe_a.mkdir(), probe_b.mkdir()
    if not io.exchange(probe_a, probe_b):
        pytest.skip("this filesystem cannot exchange directories (renameat2 RENAME_EXCHANGE)")
    out = tmp_path / "out"
    with io.staged_output(out) as staging:
        _write_version(staging, "0")
    ctx = multiprocessing.get_context("spawn")
    started, stop, misses, reads = ctx.Event(), ctx.Event(), ctx.Value("i", -1), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(out), started, stop, misses, reads))
    reader.start()
    assert started.wait(120), "the reader process did not start"
    try:
        for i in range(200):
            with io.staged_output(out, overwrite=True) as staging:
                _write_version(staging, str(i % 10))
    finally:
        stop.set()
        reader.join(60)
    assert reads.value > 0 and misses.value == 0, f"{misses.value} of {reads.value} reads missed"
    assert _litter(tmp_path, "out") == []


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    io.write_bytes_atomic(path, b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_file(path) as f:
            f.write(b"new, half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


# --------------------------------------------------------------------------------------------
# score files
# --------------------------------------------------------------------------------------------


def test_score_file_records_the_sha256_of_its_tensors(tmp_path):
    layers, E = [1, 2], 8
    scores = {"easyep": torch.rand(2, E, dtype=torch.float64), "easyep@math": torch.rand(2, E),
              "gate": torch.rand(2, E, dtype=torch.float64)}
    directory = io.write_score_file(tmp_path / "s", scores, layers, "c" * 64, ["math"], tokens={"all": 10},
                                    provenance={"demos": ["x"], "format": "overridden"})
    meta = json.loads((directory / "scores.json").read_text())
    assert meta["tensors_sha256"] == hashlib.sha256((directory / "scores.safetensors").read_bytes()).hexdigest()
    assert meta["format"] == io.SCORE_FORMAT and meta["demos"] == ["x"] and meta["metrics"] == ["easyep", "gate"]
    with safe_open(str(directory / "scores.safetensors"), "pt") as f:
        assert f.metadata() == {"format": io.SCORE_FORMAT, "config_hash": "c" * 64}
    got = load_file(directory / "scores.safetensors")
    assert all(torch.equal(got[k], scores[k].double()) for k in scores)
    assert load_scores(directory).sha256 == meta["tensors_sha256"]
    # a tensor file replaced after the json was written is a torn pair
    save_file({k: v + 1 for k, v in got.items()}, str(directory / "scores.safetensors"))
    with pytest.raises(SelectionError, match="sha256"):
        load_scores(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["scores.json", "scores.safetensors"]
