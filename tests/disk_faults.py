"""Real write failures on a real filesystem, for tests: a full disk (ENOSPC: a small tmpfs), a full
quota (EDQUOT: a btrfs image whose quota group has a limit) and a read-only filesystem (EROFS: a
remount read-only, as ext4's errors=remount-ro does after an I/O error).

`small_filesystem(kind, root, mountpoint)` mounts one at `mountpoint` (default root/fs) and
always unmounts it. Where mounting is not
permitted (not root, no CAP_SYS_ADMIN, no loop devices) or btrfs-progs is missing, the test is
skipped with the reason. This kernel's ext4, XFS and tmpfs were built without quota support, so
btrfs quota groups are the one real source of EDQUOT here.

`fault()` makes the next write fail (fills every free byte, or remounts read-only); `clear()` gives
the room back (deletes the filler, or remounts read-write).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

KINDS = ["enospc", "edquot", "erofs"]
STRERROR = {"enospc": os.strerror(errno.ENOSPC), "edquot": os.strerror(errno.EDQUOT),
            "erofs": os.strerror(errno.EROFS)}
_SIZE = "16m"  # tmpfs size; btrfs: the quota limit (the image is larger: btrfs needs ~110 MiB)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)


class SmallFilesystem:
    def __init__(self, kind: str, root: Path, mountpoint: Path | None = None):
        self.kind, self.mount = kind, mountpoint or root / "fs"
        self.image = root / "btrfs.img"
        self.filler = self.mount / "filler"

    def mount_it(self) -> None:
        self.mount.mkdir(parents=True)
        try:
            if self.kind == "edquot":
                if not (shutil.which("mkfs.btrfs") and shutil.which("btrfs")):
                    pytest.skip("EDQUOT needs btrfs-progs (mkfs.btrfs, btrfs) for a quota group limit "
                                "(`make tools` installs it); this kernel has no ext4/XFS/tmpfs quotas")
                with open(self.image, "wb") as f:
                    f.truncate(128 << 20)  # sparse
                _sh("mkfs.btrfs", "-q", "-f", str(self.image))
                _sh("mount", "-o", "loop", str(self.image), str(self.mount))
                _sh("btrfs", "quota", "enable", str(self.mount))
                _sh("btrfs", "qgroup", "limit", _SIZE, str(self.mount))
            else:
                _sh("mount", "-t", "tmpfs", "-o", f"size={_SIZE}", "tmpfs", str(self.mount))
        except subprocess.CalledProcessError as err:
            pytest.skip(f"cannot mount a test filesystem here ({' '.join(err.cmd[:3])}: "
                        f"{(err.stderr.strip().splitlines() or [''])[0][:200]}): needs root with CAP_SYS_ADMIN")

    def unmount(self) -> None:
        if os.path.ismount(self.mount):
            with contextlib.suppress(subprocess.CalledProcessError):
                _sh("umount", str(self.mount))
            if os.path.ismount(self.mount):  # a process still holds a file there: detach it anyway
                _sh("umount", "-l", str(self.mount))
        self.image.unlink(missing_ok=True)

    def fault(self, leave: int = 0) -> None:
        """The next write fails: every free byte filled (`leave` bytes kept free), or read-only."""
        if self.kind == "erofs":
            _sh("mount", "-o", "remount,ro", str(self.mount))
            return
        reserve = self.mount / "reserve"
        if leave:
            reserve.write_bytes(b"\0" * leave)
        fd = os.open(self.filler, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        try:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, bytes(chunk))
                        if self.kind == "edquot":
                            os.fsync(fd)
        finally:
            os.close(fd)
        if leave:
            reserve.unlink()
            self._sync()

    def clear(self) -> None:
        """Room again: the filler deleted, or read-write again."""
        if self.kind == "erofs":
            _sh("mount", "-o", "remount,rw", str(self.mount))
            return
        self.filler.unlink(missing_ok=True)
        self._sync()

    def _sync(self) -> None:
        if self.kind == "edquot":  # freed extents leave the quota group's count at the commit
            _sh("btrfs", "filesystem", "sync", str(self.mount))


def require_mounting(root: Path) -> None:
    """Skip now (before any costly fixture) where a tmpfs cannot be mounted."""
    with small_filesystem("enospc", root):
        pass


@contextlib.contextmanager
def small_filesystem(kind: str, root: Path, mountpoint: Path | None = None) -> Iterator[SmallFilesystem]:
    fs = SmallFilesystem(kind, root, mountpoint)
    try:
        fs.mount_it()
        yield fs
    finally:
        fs.unmount()


class Paused:
    """`run_then_fault`'s fault: stop the (single-process) run, apply `fault`, let it go on; the
    fault then meets the run's next write, whatever it was doing when stopped. `applied_in`: the
    seconds the run was held (to subtract from the measured time to exit)."""

    def __init__(self, fault):
        self.fault, self.applied_in = fault, 0.0

    def __call__(self, pid: int) -> None:
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            self.fault()
        finally:
            self.applied_in = time.monotonic() - started
            os.kill(pid, signal.SIGCONT)
