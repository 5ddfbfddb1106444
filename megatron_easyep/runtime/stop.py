"""Stopping at a step boundary on SIGINT / SIGTERM (Ctrl-C; SLURM's and torchrun's first signal).

While the forward loop runs, the first SIGINT or SIGTERM only sets a flag. At the next step
boundary every rank takes the maximum of the flags (one all-reduce of one integer per step), so
all ranks agree to stop at the same step even though the signal reached them at different times;
the job's `on_stop` writes a snapshot there and the loop raises `RunInterrupted`. The launcher
turns that into exit 128 + signal (130 for SIGINT, 143 for SIGTERM). A second SIGINT ends the
process at once; a repeated SIGTERM is ignored (SLURM sends it to every process of the step and
torchrun forwards it to the workers again).
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped at a step boundary on a signal; `next_step` is where --resume continues."""

    def __init__(self, signum: int, next_step: int, saved: str | None):
        self.signum, self.next_step, self.saved = signum, next_step, saved
        name = signal.Signals(signum).name
        where = (f"; snapshot at step {next_step} in {saved}: the same command with --resume continues"
                 if saved else "")
        super().__init__(f"stopped by {name} at step boundary {next_step}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set a flag while inside (main thread only; elsewhere the
    signals keep their handlers). `agreed(device)` is the world's decision at a step boundary."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum:
            # A second Ctrl-C: the default action, now. A repeated SIGTERM is not impatience but
            # the same request twice (SLURM signals every process of the step and torchrun
            # forwards it to its workers again): it is ignored; SIGKILL follows by itself.
            if signum == signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if int(os.environ.get("RANK", "0")) == 0:
            os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next step boundary with a "
                        f"snapshot (a second Ctrl-C stops at once)\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False

    def agreed(self, device) -> int:
        """The signal number any rank got (0: none); every rank must call it at the same step."""
        flag = torch.tensor([self.signum], dtype=torch.long, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
