"""One model session and one forward loop, shared by scoring, evaluation, routing drift and bias
rebalancing.

A session goes config -> pipeline stages -> (the caller's checks and demonstrations) ->
`init_parallel` -> `load_model` (this rank's stage and experts only) -> `plan` (demos dealt over
data-parallel replicas, packed into micro-batches, grouped into steps) -> `forward_loop`. The
steps are separate calls so each job keeps its own checks in the order it had them (feasibility
first: nothing slow runs before every input is checked).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from megatron_easyep.progress import Progress
from megatron_easyep.runtime.observer import Batch, Observer, StopMicroBatch, attach_all
from megatron_easyep.runtime.schedule import (MicroBatch, deal_in_order, plan_fixed_rows, plan_micro_batches,
                                              shard_for_rank)
from megatron_easyep.runtime.stop import RunInterrupted, StopOnSignal


@dataclass(frozen=True)
class SessionSpec:
    """The model and its layout; read from the checkpoint's config, never from presets."""

    hf_checkpoint: str
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    pipeline_layout: str | None = None  # decoder layers per stage, "16,15,15,15"; default: even split
    dispatcher: str = "alltoall"
    dtype: str | None = None
    seed: int = 1234
    logits: bool = True  # False: no final norm / output layer (hooks read what they need)
    dequantize_at_load: bool = False
    dist_timeout: float | None = None  # seconds per collective; None = parallel.DEFAULT_DIST_TIMEOUT_S


@dataclass
class RunPlan:
    """This rank's share of the demonstrations and the steps every rank runs."""

    replicas: list[list[tuple[int, object]]]  # per data-parallel replica: (global index, demo)
    mine: list[tuple[int, object]]
    schedule: list[list[MicroBatch]]

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def micro_batches(self) -> int:
        return sum(len(step) for step in self.schedule)

    def tokens_before(self, step: int, dp_rank: int) -> int:
        """Real tokens of this replica in steps [0, step) (a resumed run's work already done)."""
        return sum(len(self.mine[pos][1].input_ids) for s in self.schedule[:step] for slot in s
                   for pos in slot.members[dp_rank])


@dataclass
class ModelSession:
    spec: SessionSpec
    cfg: object = None  # checkpoint.reader.DeepseekV3Config
    stage_layers: list[int] = field(default_factory=list)
    layout: object = None  # mcore.parallel.Layout, after init_parallel
    ckpt: object = None
    model: object = None

    @classmethod
    def open(cls, spec: SessionSpec, cfg=None) -> "ModelSession":
        """Config and pipeline stages (checked: a bad layout fails before anything else)."""
        from megatron_easyep.checkpoint.reader import DeepseekV3Config
        from megatron_easyep.mcore import pipeline

        cfg = cfg if cfg is not None else DeepseekV3Config.load(spec.hf_checkpoint)
        stages = pipeline.stage_layer_counts(cfg.num_hidden_layers, spec.pipeline_parallel,
                                             spec.pipeline_layout, source=str(cfg.source))
        return cls(spec, cfg, stages)

    @property
    def dtype(self) -> torch.dtype:
        from megatron_easyep.mcore import model as model_lib

        return model_lib.resolve_dtype(self.spec.dtype, self.cfg)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def init_parallel(self):
        from megatron_easyep.mcore import parallel

        timeout = self.spec.dist_timeout if self.spec.dist_timeout is not None else parallel.DEFAULT_DIST_TIMEOUT_S
        self.layout = parallel.init_parallel(self.spec.expert_parallel, seed=self.spec.seed,
                                             pipeline_parallel=self.spec.pipeline_parallel,
                                             stage_layers=self.stage_layers, timeout_s=timeout)
        return self.layout

    def validate(self, observers) -> None:
        """Every observer's feasibility check, before anything slow runs."""
        for observer in observers:
            observer.validate(self)

    def load_model(self, observers=()):
        """This rank's pipeline stage and experts, in eval mode; then every observer's setup."""
        from megatron_easyep.mcore import model as model_lib

        spec = self.spec
        self.ckpt, self.model = model_lib.load_megatron_model(
            spec.hf_checkpoint, dtype=self.dtype, expert_parallel=spec.expert_parallel,
            dispatcher=spec.dispatcher, dequantize_at_load=spec.dequantize_at_load,
            stage_layers=self.stage_layers if spec.pipeline_parallel > 1 else None, logits=spec.logits)
        for observer in observers:
            observer.setup(self)
        return self.model

    def plan(self, demos: list, micro_batch_tokens: int | None, per_step: int) -> RunPlan:
        """Demos dealt over the data-parallel replicas and packed into steps of micro-batches."""
        dp = self.layout.data_parallel
        replicas = [shard_for_rank(demos, r, dp) for r in range(dp)]
        schedule = plan_micro_batches([[len(d.input_ids) for _, d in rep] for rep in replicas],
                                      micro_batch_tokens, per_step)
        return RunPlan(replicas, replicas[self.layout.dp_rank], schedule)

    def plan_fixed_rows(self, demos: list, rows: int) -> RunPlan:
        """`rows` demos per micro-batch in input order (a fixed batch size), one per step."""
        dp = self.layout.data_parallel
        replicas = [deal_in_order(demos, r, dp) for r in range(dp)]
        schedule = plan_fixed_rows([[len(d.input_ids) for _, d in rep] for rep in replicas], rows,
                                   self.default_per_step())
        return RunPlan(replicas, replicas[self.layout.dp_rank], schedule)

    def default_per_step(self) -> int:
        """Micro-batches per step: 2 x PP lets the stages overlap; without PP one forward is a step."""
        pp = self.spec.pipeline_parallel
        return 2 * pp if pp > 1 else 1

    def batch(self, plan: RunPlan, slot: MicroBatch) -> Batch:
        from megatron_easyep.mcore import pipeline

        members = [plan.mine[pos] for pos in slot.members[self.layout.dp_rank]]
        input_ids, position_ids = pipeline.padded_batch([list(d.input_ids) for _, d in members],
                                                        slot.length, slot.rows, self.device)
        return Batch(slot, members, input_ids, position_ids)


class LogitsCollector(Observer):
    """Every demo's fp32 logits [T, V] on the CPU, from the last stage; `finalize` returns them in
    demo order (this rank's demos: the caller gathers when there are several replicas)."""

    def __init__(self):
        self.logits: dict[int, torch.Tensor] = {}

    def after_micro_batch(self, batch: Batch, output) -> None:
        if output is None:
            return
        for row, (index, demo) in enumerate(batch.members):
            self.logits[index] = output[row, :len(demo.input_ids)].float().cpu()

    def finalize(self, session) -> list[torch.Tensor]:
        return [self.logits[i] for i in sorted(self.logits)]


def forward_loop(session: ModelSession, plan: RunPlan, observers, *, start: int = 0, after_step=None,
                 progress: str | None = None, on_stop=None) -> None:
    """Run steps [start, plan.steps) through the pipeline with every observer attached.
    `after_step(next_step)` runs after each step (resumable snapshots); `progress` labels rank 0's
    progress line (real tokens of its replica done of total; a resumed run starts where it was).
    With `on_stop`, SIGINT/SIGTERM stop every rank at the next step boundary (runtime.stop):
    `on_stop(next_step)` saves what --resume needs and returns where (or None), then
    RunInterrupted is raised. Without it the signals keep their default action."""
    layout = session.layout
    shown = progress is not None and layout.rank == 0
    line = Progress(progress or "", plan.tokens_before(plan.steps, layout.dp_rank),
                    start=plan.tokens_before(start, layout.dp_rank), enabled=shown, stream=sys.stderr)
    stop = StopOnSignal() if on_stop is not None else nullcontext()
    with torch.no_grad(), attach_all(session, observers), stop:
        for step in range(start, plan.steps):
            batches = [session.batch(plan, slot) for slot in plan.schedule[step]]

            def before(m, batches=batches):
                for observer in observers:
                    observer.before_micro_batch(batches[m])

            outputs = _forward_step(session, batches, before)
            for batch, output in zip(batches, outputs):
                for observer in observers:
                    observer.after_micro_batch(batch, output)
            line.advance(sum(b.real_tokens for b in batches))
            if after_step is not None:
                after_step(step + 1)
            if on_stop is not None and (signum := stop.agreed(session.device)):
                line.close()
                raise RunInterrupted(signum, step + 1, on_stop(step + 1))
    if plan.steps > start:
        line.close()


def _forward_step(session: ModelSession, batches: list[Batch], before) -> list:
    from megatron_easyep.mcore import pipeline

    try:
        return pipeline.forward_micro_batches(
            session.model, [(b.input_ids, b.position_ids) for b in batches], before)
    except StopMicroBatch:
        if session.layout.pipeline_parallel > 1 or len(batches) > 1:
            raise RuntimeError("an observer stopped a forward early, which needs one pipeline stage "
                               "and one micro-batch per step") from None
        return [None]
