"""Faults injected from outside the run, as a cluster does them: the production code has no hook.

`run_then_kill` starts a command (launch/score.py, alone or under torchrun), waits until a
condition on disk and on its stderr holds (a snapshot every rank has), then SIGKILLs the whole
process tree at once, as a node loss or a cancelled job's cgroup kill would. torchrun starts its
workers in their own sessions, so the tree is found through /proc rather than a process group.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Killed:
    returncode: int
    stdout: str
    stderr: str
    killed: bool  # False: the run ended on its own before the condition held


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def kill_tree(pid: int) -> None:
    """SIGSTOP every process of the tree (so none reacts or spawns), then SIGKILL them all."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += tree.get(p, [])
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in found:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to every process of the tree under `pid`, as slurmstepd signals a job step."""
    tree, todo = _children(), [pid]
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def snapshot_steps(inprogress: Path) -> dict[int, set[int]]:
    """The steps each rank has a snapshot of in a run's OUTPUT.inprogress ({rank: {step, ...}})."""
    steps: dict[int, set[int]] = {}
    for p in Path(inprogress).glob("state_rank*_step*.pt"):
        if m := re.fullmatch(r"state_rank(\d+)_step(\d+)\.pt", p.name):
            steps.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return steps


def snapshot_for_every_rank(inprogress: Path, world: int, min_step: int = 1):
    """Condition: some step >= min_step has a snapshot of every rank, and rank 0 has announced it."""

    def ready(stderr: str) -> bool:
        if "--resume continues" not in stderr:
            return False
        steps = snapshot_steps(inprogress)
        common = set.intersection(*(steps.get(rank, set()) for rank in range(world)))
        return any(step >= min_step for step in common)

    return ready


def run_then_kill(cmd, *, ready, env, cwd, timeout: float = 600, poll: float = 0.002) -> Killed:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, cwd=cwd, env=env, text=True)
        deadline, killed = time.monotonic() + timeout, False
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                err.seek(0)
                if ready(err.read()):
                    kill_tree(proc.pid)
                    killed = True
                    break
                time.sleep(poll)
            else:
                if proc.poll() is None:
                    kill_tree(proc.pid)
                    raise TimeoutError(f"{cmd[:3]}... did not reach the kill condition in {timeout} s")
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
        out.seek(0)
        err.seek(0)
        return Killed(proc.returncode, out.read(), err.read(), killed)


def worker_pid(root: int, rank: int) -> int | None:
    """The process of the tree under `root` whose environment says RANK=rank (a torchrun worker)."""
    tree, todo = _children(), list(_children().get(root, []))
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return p
    return None


@dataclass
class Faulted:
    returncode: int
    stdout: str
    stderr: str
    seconds_to_exit: float  # from the fault to the exit of the whole command


def run_then_fault(cmd, *, ready, fault, env, cwd, timeout: float = 600, poll: float = 0.002) -> Faulted:
    """Start `cmd`; once `ready(stderr)` holds, call `fault(pid)` (signal a rank, the launcher...)
    and time how long the command takes to exit by itself (killed after `timeout`)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, cwd=cwd, env=env, text=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    err.seek(0)
                    raise AssertionError(f"the run ended (exit {proc.returncode}) before the fault:\n"
                                         f"{err.read()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd[:3]}... did not reach the fault condition in {timeout} s")
                err.seek(0)
                if ready(err.read()):
                    break
                time.sleep(poll)
            t0 = time.monotonic()
            fault(proc.pid)
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
        out.seek(0)
        err.seek(0)
        return Faulted(proc.returncode, out.read(), err.read(), seconds)
