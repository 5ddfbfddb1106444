"""What a job measures on the shared forward loop, in the shape of llm-compressor's modifiers:

* `validate(session)` runs before any weight is read (feasibility first, then compute);
* `setup(session)` runs once the model is loaded (state sized from the model: its MoE layers,
  this rank's stage and experts), before the loop (and before a resumed run's state is loaded);
* `attached(session)` is a context manager that puts the observer's hooks on the loaded model
  and takes them off when the loop ends, by error too;
* `before_micro_batch(batch)` runs on every stage right before a micro-batch enters it (the
  hooks that fire during that forward read the batch's demos from here);
* `after_micro_batch(batch, output)` gets the last stage's output (None on other stages);
* `finalize(session)` runs once after the loop on every rank (the collectives go here) and
  returns the observer's result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One micro-batch as this rank runs it: `members` are (global demo index, demo) per row (rows
    beyond them are padding), `input_ids`/`position_ids` [rows, length]."""

    slot: object  # schedule.MicroBatch
    members: list
    input_ids: torch.Tensor
    position_ids: torch.Tensor

    @property
    def rows(self) -> int:
        return self.slot.rows

    @property
    def length(self) -> int:
        return self.slot.length

    @property
    def real_tokens(self) -> int:
        return sum(len(demo.input_ids) for _, demo in self.members)

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of a per-token tensor x [length * rows, ...] (sequence-major: Megatron's token
        order inside a layer) that are real tokens, padding dropped."""
        if self.rows == 1:
            return x[:self.real_tokens]
        lengths = torch.tensor([len(demo.input_ids) for _, demo in self.members]
                               + [0] * (self.rows - len(self.members)), device=x.device)
        mask = torch.arange(self.length, device=x.device)[:, None] < lengths[None, :]
        return x[mask.reshape(-1)]

    def demo_rows(self, x: torch.Tensor):
        """(global demo index, that demo's rows of x [length * rows, ...]) for every demo."""
        by_row = x.reshape(self.length, self.rows, *x.shape[1:])
        return [(index, by_row[:len(demo.input_ids), row]) for row, (index, demo) in enumerate(self.members)]


class StopMicroBatch(Exception):
    """Raised from a hook once an observer has what it needs from a micro-batch: the rest of that
    forward is skipped. Only without pipeline parallelism (later stages would wait for a send)
    and with one micro-batch per step."""


class Observer:
    """Base class: every step is optional."""

    def validate(self, session) -> None:
        pass

    def setup(self, session) -> None:
        pass

    @contextlib.contextmanager
    def attached(self, session):
        yield self

    def before_micro_batch(self, batch: Batch) -> None:
        pass

    def after_micro_batch(self, batch: Batch, output) -> None:
        pass

    def finalize(self, session):
        return None


@contextlib.contextmanager
def attach_all(session, observers):
    """Every observer's hooks on the model for the duration of the block; all detach on exit."""
    with contextlib.ExitStack() as stack:
        for observer in observers:
            stack.enter_context(observer.attached(session))
        yield
