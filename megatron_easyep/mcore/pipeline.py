"""Pipeline parallelism: stage layouts and a forward-only pipeline loop.

Each pipeline stage is its own GPTModel (embedding only on the first stage, the output layer only
on the last, and only when logits are wanted), holding a contiguous run of decoder layers; EP groups
live inside a stage (Megatron's default rank order tp-cp-ep-dp-pp). Stage sizes go to Megatron as
its own `pipeline_model_parallel_layout`, so Megatron computes the layer offsets.

The forward-only schedule over Megatron-Core's P2PCommunicator lives in
mcore/compat/pipeline_schedule.py (Megatron's built-in schedules hard-code device="cuda").
"""

from __future__ import annotations

import torch


class PipelineLayoutError(ValueError):
    """A pipeline layout that cannot be built (checked before any weight is read)."""


def stage_layer_counts(num_layers: int, pipeline_parallel: int, layout: str | None = None,
                       *, source: str = "config.json") -> list[int]:
    """Decoder layers per stage. `layout` is "16,15,15,15" (one count per stage); by default the
    layers are split as evenly as possible with the extra ones on the leading stages (61 over 4 ->
    16,15,15,15): the first stage also holds the dense layers, which are lighter than MoE ones."""
    if not isinstance(pipeline_parallel, int) or pipeline_parallel < 1:
        raise PipelineLayoutError(f"--pipeline-parallel must be a positive integer, got {pipeline_parallel!r}")
    if pipeline_parallel > num_layers:
        raise PipelineLayoutError(
            f"--pipeline-parallel {pipeline_parallel} is larger than num_hidden_layers={num_layers} "
            f"in {source}: every stage needs at least one decoder layer")
    if layout is None or str(layout).strip() == "":
        base, extra = divmod(num_layers, pipeline_parallel)
        return [base + (1 if stage < extra else 0) for stage in range(pipeline_parallel)]
    try:
        counts = [int(part) for part in str(layout).split(",")]
    except ValueError:
        raise PipelineLayoutError(f"--pipeline-layout {layout!r}: expected comma-separated layer counts, "
                                  "one per stage (e.g. 16,15,15,15)") from None
    if len(counts) != pipeline_parallel:
        raise PipelineLayoutError(f"--pipeline-layout {layout!r} has {len(counts)} stages, but "
                                  f"--pipeline-parallel is {pipeline_parallel}")
    if any(c < 1 for c in counts):
        raise PipelineLayoutError(f"--pipeline-layout {layout!r}: every stage needs at least one layer")
    if sum(counts) != num_layers:
        raise PipelineLayoutError(f"--pipeline-layout {layout!r} adds up to {sum(counts)} layers, but "
                                  f"num_hidden_layers={num_layers} in {source}")
    return counts


def megatron_layout(counts: list[int]) -> list[list[str]] | None:
    """Megatron-Core's pipeline_model_parallel_layout for these stage sizes (None for one stage):
    the embedding on the first stage, the loss (output layer) on the last."""
    if len(counts) == 1:
        return None
    stages = [["decoder"] * n for n in counts]
    stages[0].insert(0, "embedding")
    stages[-1].append("loss")
    return stages


def stage_layer_range(counts: list[int], stage: int) -> range:
    """Global (0-based, HF) layer ids of one stage."""
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def moe_layer_ids(tcfg) -> list[int]:
    """Global ids of every MoE layer of the whole model (all stages), from the Megatron config."""
    freq = tcfg.moe_layer_freq
    if isinstance(freq, int):
        return [i for i in range(tcfg.num_layers) if i % freq == 0]
    return [i for i, is_moe in enumerate(freq) if is_moe]


def forward_micro_batches(model, micro_batches, before_each=None) -> list:
    """Run micro-batches through the pipeline, forward only. `micro_batches` is a list of
    (input_ids [b, s], position_ids [b, s]); every stage of a pipeline passes the same shapes.
    `before_each(m)` runs on every stage right before micro-batch m enters the stage (the scorer
    sets its token domains there). Returns the last stage's outputs (logits [b, s, V], or hidden
    states [s, b, H] when the model has no output layer); None per micro-batch on other stages."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        outputs = []
        for m, (input_ids, position_ids) in enumerate(micro_batches):
            if before_each is not None:
                before_each(m)
            outputs.append(model(input_ids, position_ids, None))
        return outputs

    from megatron_easyep.mcore.compat import pipeline_schedule

    return pipeline_schedule.forward_pipelined(model, micro_batches, before_each)


def padded_batch(sequences: list[list[int]], length: int, batch: int | None = None,
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [b, length] right-padded with token 0 (b = len(sequences), or `batch` with empty
    rows), and position_ids. Attention is causal, so padding never changes the real positions."""
    rows = batch if batch is not None else max(len(sequences), 1)
    input_ids = torch.zeros(rows, length, dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, :len(ids)] = torch.tensor(ids, device=device)
    position_ids = torch.arange(length, device=device).unsqueeze(0).expand(rows, -1)
    return input_ids, position_ids
