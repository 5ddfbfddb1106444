"""Writing what the project writes: safetensors files, sharded checkpoints, score files, and
publishing a finished output atomically. Every writer in the package goes through here.

- **safetensors** (`write_safetensors`): the header is computed from (name, dtype, shape)
  entries first, then each tensor's bytes are appended by a callback (a tensor, a byte string or
  a byte range of another file), so a shard of any size needs the memory of one tensor. Bytes per
  element come from `reader.SAFETENSORS_ITEMSIZE`, the one table. `aligned` orders entries
  the way the safetensors library does (larger elements first), so every tensor starts at a
  multiple of its element size.
- **Shards and the index**: `shard_name` (``model.safetensors`` alone, else
  ``model-0000i-of-0000n.safetensors``), `split_units_into_shards` and `write_index`
  (``model.safetensors.index.json``).
- **Atomic publish** (`staged_output`, `publish`): an output directory is assembled in a hidden
  staging sibling and appears by one rename. Replacing an existing output swaps the two
  directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant the path
  holds the complete old or the complete new output; where the filesystem cannot exchange, the
  old output is renamed aside, the new one renamed in, and the old one put back if that fails.
  Nothing is left behind on failure; an OSError names the output path and the OS error. Single
  files: `atomic_file` / `write_text_atomic` / `write_json_atomic` (temporary sibling, fsync,
  ``os.replace``).
- **One run per output** (`output_lock`): a lock file beside the output (``.NAME.lock``) records
  the holder's host, pid, process start and start time; a second run refuses, naming the holder.
  A lock whose holder is gone (same host, the pid no longer that process) is stale: it can be
  taken over.
- **Score files** (`write_score_file`): ``scores.safetensors`` + ``scores.json``; the json is
  written last and records the tensor file's sha256 (`tensors_sha256`), which
  `pruning.selection.load_scores` checks, so a torn pair is detected.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_easyep.checkpoint.reader import INDEX_FILE, SAFETENSORS_ITEMSIZE, SINGLE_FILE

# ---- the score file format (written by scoring, read by pruning.selection) ----
SCORE_FORMAT = "megatron-easyep-scores/1"
SCORE_TENSORS_FILE = "scores.safetensors"
SCORE_META_FILE = "scores.json"
# What the scoring step sums per expert (scoring.metrics defines them); a score file may carry any subset.
SCORE_METRICS = ("easyep", "easyep_no_token", "easyep_no_norm", "gate", "frequency")
DOMAIN_SEPARATOR = "@"  # "{metric}@{domain}" names a per-domain score tensor

_COPY_CHUNK = 64 * 1024 * 1024
_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


class ScoreFileError(ValueError):
    """A score file, or a selection request made from one, that cannot produce a valid pruned
    checkpoint. `pruning.selection` raises it under the name SelectionError: one class, so the
    writer's checks and the reader's are caught alike."""


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file to write: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        if self.dtype not in SAFETENSORS_ITEMSIZE:
            raise ValueError(f"tensor {self.name}: safetensors dtype {self.dtype!r} is not supported")
        return math.prod(self.shape) * SAFETENSORS_ITEMSIZE[self.dtype]


def safetensors_dtype(tensor: torch.Tensor) -> str:
    try:
        return _TORCH_TO_SAFETENSORS[tensor.dtype]
    except KeyError:
        raise ValueError(f"no safetensors dtype for {tensor.dtype}") from None


def entry_of(name: str, tensor: torch.Tensor) -> TensorEntry:
    return TensorEntry(name, safetensors_dtype(tensor), tuple(tensor.shape))


def aligned(entries: Sequence, key: Callable = lambda e: 0) -> list:
    """`entries` (anything with a .dtype) with larger element types first, `key` breaking ties
    (a stable sort), as the safetensors library orders them: every tensor then starts at a
    multiple of its element size."""
    return sorted(entries, key=lambda e: (-SAFETENSORS_ITEMSIZE.get(e.dtype, 1), key(e)))


def safetensors_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header for `entries` laid out in the given order, padded with
    spaces so the data starts 8-byte aligned (as the safetensors library pads)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        if entry.name in header:
            raise ValueError(f"tensor {entry.name} appears twice")
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


class ShardFile:
    """The open file `write_safetensors` hands to its payload callback: unbuffered, so byte
    counts are exact and kernel copies (copy_file_range) mix with ordinary writes."""

    def __init__(self, f, path: Path):
        self._f, self.path = f, path

    def fileno(self) -> int:
        return self._f.fileno()

    def tell(self) -> int:
        return self._f.tell()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = self._f.write(view)
            view = view[written:]

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """The tensor's raw bytes (row-major, native little-endian)."""
        self.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())

    def copy_range(self, src_fd: int, offset: int, count: int) -> None:
        """Append src[offset:offset+count], in the kernel where it can (no user-space buffer)."""
        dst_fd = self.fileno()
        while count > 0:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    raise  # a real write failure (ENOSPC, EFBIG, EIO...), not "unsupported"
                copied = 0  # cross-device or unsupported: fall back to read/write
            if copied <= 0:
                break
            offset, count = offset + copied, count - copied
        while count > 0:
            chunk = os.pread(src_fd, min(count, _COPY_CHUNK), offset)
            if not chunk:
                raise OSError(errno.EIO, f"unexpected end of file while copying at offset {offset}")
            self.write(chunk)
            offset, count = offset + len(chunk), count - len(chunk)


def write_safetensors(path, entries: Sequence[TensorEntry], write_payload: Callable[[TensorEntry, ShardFile], None],
                      *, metadata: Mapping[str, str] | None = None, fsync: bool = False) -> int:
    """Write a safetensors file: the header for `entries` (in their order), then
    `write_payload(entry, f)` for each entry, which must append exactly entry.nbytes. Returns the
    bytes of tensor data. A payload of the wrong size raises, naming the tensor and the file."""
    path = Path(path)
    header = safetensors_header(entries, metadata)
    with open(path, "wb", buffering=0) as raw:
        f = ShardFile(raw, path)
        f.write(header)
        for entry in entries:
            start = f.tell()
            write_payload(entry, f)
            written = f.tell() - start
            if written != entry.nbytes:
                raise ValueError(f"tensor {entry.name} in {path}: wrote {written} bytes, its header says "
                                 f"{entry.nbytes} ({entry.dtype} {list(entry.shape)})")
        if fsync:
            os.fsync(raw.fileno())
    os.chmod(path, 0o644)
    return sum(entry.nbytes for entry in entries)


def write_tensors(path, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
                  fsync: bool = False) -> int:
    """A safetensors file of in-memory tensors, ordered as the safetensors library orders them
    (larger elements first, then by name)."""
    entries = aligned([entry_of(name, t) for name, t in tensors.items()], key=lambda e: e.name)
    return write_safetensors(path, entries, lambda entry, f: f.write_tensor(tensors[entry.name]),
                             metadata=metadata, fsync=fsync)


# --------------------------------------------------------------------------------------------
# sharded checkpoints: shard names, how units are split, the index
# --------------------------------------------------------------------------------------------


def shard_name(index: int, num_shards: int) -> str:
    """Hugging Face's names: ``model.safetensors`` alone, else ``model-00001-of-00003.safetensors``."""
    if num_shards == 1:
        return SINGLE_FILE
    return f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"


def split_units_into_shards(unit_bytes: list[int], num_shards: int) -> list[range]:
    """Contiguous, non-empty groups of units (layers, which a shard never splits) with roughly
    equal bytes."""
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


def write_index(directory, weight_map: Mapping[str, str], total_size: int,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """``model.safetensors.index.json``: `metadata` (a source index's, kept) with total_size, and
    the weight map sorted by tensor name."""
    meta = dict(metadata or {})
    meta["total_size"] = int(total_size)
    return write_json(Path(directory) / INDEX_FILE, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})


def write_json(path, data, *, indent: int = 2) -> Path:
    """JSON as the checkpoints have it (indented, UTF-8 kept, a final newline), written in place:
    for files inside a staging directory."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# atomic files and directories
# --------------------------------------------------------------------------------------------


def _temporary_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_file(path) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; on success it is renamed over `path`
    (readers see the old file or the new one, never a part); on failure it is removed, `path` is
    untouched, and a failed write comes out as an OutputWriteError naming `path`."""
    path = Path(path)
    tmp = _temporary_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # on a read-only filesystem even this unlink fails: keep `err`
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            raise naming_the_output(err, path) from err
        raise


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb", **open_kwargs) -> Iterator[Any]:
    """`staged_file` as an open file, flushed and fsynced before the rename."""
    with staged_file(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, data, *, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a, b) -> bool:
    """Swap two existing paths in one atomic step (renameat2 RENAME_EXCHANGE). False where the
    system or filesystem cannot (then nothing changed); other errors raise OSError."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def output_in_the_way(out: Path) -> bool:
    """True when `out` holds something a new output would replace (an empty directory does not count)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return True
    return out.is_dir() and any(out.iterdir())


def check_output(out, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists and may not be replaced."""
    out = Path(out)
    if output_in_the_way(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists and is not empty (pass --overwrite to replace it)")


def publish(staging, out, *, overwrite: bool = False) -> None:
    """Make the complete directory (or file) `staging` appear at `out` by one rename.

    An existing `out` is refused unless `overwrite` (an empty directory is simply replaced); with
    `overwrite` the two are exchanged atomically, or, where the filesystem cannot, renamed aside,
    replaced and put back if the replacement fails. The old output is deleted only once the new
    one is in place; `staging` never outlives a successful call."""
    staging, out = Path(staging), Path(out)
    if not (out.exists() or out.is_symlink()):
        os.rename(staging, out)
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        os.rename(staging, out)  # rename(2) replaces an empty directory in one step
        return
    if not overwrite:
        raise FileExistsError(f"output {out} already exists and is not empty (pass --overwrite to replace it)")
    if exchange(staging, out):
        _remove(staging)  # now the old output
        return
    retired = _temporary_sibling(out, "old")
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)  # put the previous output back
        raise
    _remove(retired)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def new_staging_dir(out) -> Path:
    """A new, empty, hidden directory beside `out`, for `publish` (the caller removes it on failure)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_sibling(out, "partial")
    staging.mkdir()
    return staging


# what a failing write reports: disk full, quota, file size limit, read-only or forbidden, I/O error
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EIO})


class OutputWriteError(OSError):
    """Writing an output failed (disk full, quota, file size limit, read-only directory...);
    the message names the output and the OS error, and nothing of the attempt is left."""


def naming_the_output(err: OSError, out: Path) -> OSError:
    """`err` as an OutputWriteError that names `out` (a write() error names no file)."""
    if isinstance(err, OutputWriteError):
        return err
    where = f" ({err.filename})" if err.filename and Path(str(err.filename)).name != out.name else ""
    return OutputWriteError(err.errno, f"writing {out} failed: {err.strerror or err}{where}")


@contextlib.contextmanager
def staged_output(out, *, overwrite: bool = False, lock: bool = False) -> Iterator[Path]:
    """Yields a new, empty staging directory beside `out`; when the block ends normally it is
    published to `out` (`publish`); when it raises, the staging directory is removed and `out`
    is as it was (an OSError comes out as an OutputWriteError naming `out`). With `lock`, the
    output's lock (`output_lock`, a stale one taken over) is held from start to publish."""
    out = Path(out)
    check_output(out, overwrite)
    with output_lock(out, take_over_stale=True) if lock else contextlib.nullcontext():
        check_output(out, overwrite)  # again: a run that held the lock may have just published
        try:
            staging = new_staging_dir(out)
        except OSError as err:
            raise (naming_the_output(err, out) if err.errno in WRITE_ERRNOS else err) from err
        try:
            yield staging
            publish(staging, out, overwrite=overwrite)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
                raise naming_the_output(err, out) from err
            raise


# --------------------------------------------------------------------------------------------
# one run per output
# --------------------------------------------------------------------------------------------


class OutputLocked(FileExistsError):
    """Another run holds the output's lock (or left it behind)."""


def lock_path(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), with the boot id: tells a live
    holder from a later process that reuses its pid. None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}/{stat.rsplit(')', 1)[1].split()[19]}"


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    recorded = holder.get("process_start")
    return recorded is None or _process_start(int(holder["pid"])) in (None, recorded)


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # a lock being written this instant, or torn by a crash: no holder named


@contextlib.contextmanager
def output_lock(out, *, take_over_stale: bool = False, stale_hint: str = "") -> Iterator[Path]:
    """Hold the lock beside `out` for the block. A lock held by a live run raises OutputLocked
    naming it; a stale one (its holder is gone) is taken over when `take_over_stale`, else it
    raises OutputLocked naming the dead holder and `stale_hint`. A taken-over run's staging
    directories are removed. The lock is removed when the block ends, however it ends."""
    out = Path(out)
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as err:
            if not isinstance(err, FileExistsError):
                raise _lock_write_error(err, out, path) from err
            holder = _read_holder(path)
            if not holder:
                raise OutputLocked(f"output {out} is locked by {path}, which names no holder (a run that died "
                                   f"while taking it?); remove it if no run is writing {out}") from None
            if _holder_alive(holder):
                raise OutputLocked(f"output {out} is in use by another run ({_describe(holder)}); its lock "
                                   f"is {path}. Wait for it to finish, or stop it first") from None
            if not take_over_stale:
                raise OutputLocked(f"output {out} has a lock left by a run that is no longer running "
                                   f"({_describe(holder)}); {stale_hint or 'remove ' + str(path)}") from None
            stale = _temporary_sibling(path, "stale")
            try:
                os.rename(path, stale)
            except FileNotFoundError:
                continue  # another run took it over first: look again
            if _read_holder(stale) != holder:  # ...and locked it again just before our rename: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(stale, path)
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
            for litter in out.parent.glob(f".{out.name}.partial-{holder.get('pid')}-*"):
                shutil.rmtree(litter, ignore_errors=True)
            print(f"taking over {path} from a run that is no longer running ({_describe(holder)})",
                  file=sys.stderr, flush=True)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
        except BaseException as err:
            path.unlink(missing_ok=True)
            raise _lock_write_error(err, out, path) from err
        break
    else:
        raise OutputLocked(f"output {out}: could not take the lock {path}")
    try:
        yield path
    finally:
        if _read_holder(path) == me:  # never remove a lock that is no longer ours
            try:
                path.unlink(missing_ok=True)
            except OSError as err:  # a filesystem turned read-only: keep the run's own error, say why the lock stays
                print(f"note: cannot remove the lock {path} ({err.strerror}); once this run has ended it is "
                      "stale and is taken over (scoring: with --resume)", file=sys.stderr, flush=True)


def _lock_write_error(err: BaseException, out: Path, path: Path) -> BaseException:
    """A lock that cannot be written (full disk, quota, read-only directory) as the output's write
    error, naming the output, the lock and the OS error (a failing write() names no file)."""
    if not isinstance(err, OSError) or err.errno not in WRITE_ERRNOS:
        return err
    return OutputWriteError(err.errno, f"writing {out} failed: {err.strerror or err} (its lock {path})")


# --------------------------------------------------------------------------------------------
# score files
# --------------------------------------------------------------------------------------------


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_non_finite(name: str, scores: torch.Tensor, layers) -> str | None:
    """'{name}: layer L, experts [...]' for the first layer of a [layers, experts] score tensor with a
    non-finite value (None when all are finite)."""
    bad = ~torch.isfinite(scores)
    if not bool(bad.any()):
        return None
    row = int(bad.any(dim=1).nonzero()[0])
    experts = bad[row].nonzero().flatten().tolist()
    more = f" (and {int(bad.any(dim=1).sum()) - 1} later layers)" if int(bad.any(dim=1).sum()) > 1 else ""
    return f"{name!r}: MoE layer {int(layers[row])}, expert(s) {experts[:16]}{' ...' if len(experts) > 16 else ''}{more}"


def _score_tensors(scores: Mapping[str, torch.Tensor], layers: list[int], domains: list[str]):
    """(metrics in first-seen order, {name: [L, E] float64}) after checking names and shapes."""
    if not scores:
        raise ScoreFileError("no score tensors to write")
    metrics: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, value in scores.items():
        metric, _, domain = name.partition(DOMAIN_SEPARATOR)
        if domain and domain not in domains:
            raise ScoreFileError(f"score tensor {name!r} names domain {domain!r} not in {domains}")
        if metric not in metrics:
            metrics.append(metric)
        value = torch.as_tensor(value).detach().to("cpu", torch.float64).contiguous()
        if value.dim() != 2 or value.shape[0] != len(layers):
            raise ScoreFileError(f"score tensor {name!r} has shape {tuple(value.shape)}, expected [{len(layers)}, E]")
        if (bad := first_non_finite(name, value, layers)) is not None:  # a score file never holds NaN/Inf
            raise ScoreFileError(f"non-finite scores (NaN/Inf), nothing written: {bad}; a weight of that "
                                 "layer/expert (or an earlier layer) is non-finite or the forward overflowed "
                                 "(--check-finite names where it first appears)")
        tensors[name] = value
    return metrics, tensors


def write_score_file(
    directory,
    scores: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    config_hash: str,
    domains: Sequence[str],
    *,
    tokens: Mapping[str, int] | None = None,
    provenance: Mapping[str, Any] | None = None,
    architecture_hash: str | None = None,
    storage_format: Mapping[str, Any] | None = None,
) -> Path:
    """Write `scores.safetensors` + `scores.json` into `directory` (created if missing).

    `scores` maps "{metric}" / "{metric}@{domain}" to [len(layers), n_routed_experts] tensors
    (stored float64). Each file goes to a temporary sibling and is renamed; the json, which
    records the tensor file's sha256, goes last, so readers never take a torn pair for a whole
    one. `provenance` keys are kept in scores.json (the format's own keys win).
    `architecture_hash` / `storage_format` (DeepseekV3Config's) let the scores prune another
    storage format of the same model; without them only an identical config.json matches.
    """
    directory = Path(directory)
    layers = [int(layer) for layer in layers]
    domains = [str(d) for d in domains]
    metrics, tensors = _score_tensors(scores, layers, domains)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / SCORE_TENSORS_FILE
    with staged_file(tensor_path) as staged:
        write_tensors(staged, tensors, metadata={"format": SCORE_FORMAT, "config_hash": config_hash}, fsync=True)
        tensors_sha256 = file_sha256(staged)
    meta: dict[str, Any] = dict(provenance or {})
    meta.update({"format": SCORE_FORMAT, "layers": layers, "metrics": metrics, "domains": domains,
                 "tokens": {k: int(v) for k, v in (tokens or {}).items()}, "config_hash": config_hash,
                 "tensors_sha256": tensors_sha256})
    if architecture_hash is not None:
        meta["architecture_hash"] = architecture_hash
    if storage_format is not None:
        meta["storage_format"] = dict(storage_format)
    write_json_atomic(directory / SCORE_META_FILE, meta)
    return directory
