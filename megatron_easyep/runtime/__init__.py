"""Stage 1b, the run driver every job shares. One model session (`session.ModelSession`: config,
pipeline stages, torch.distributed + parallel_state, the sharded model load, the demonstrations
dealt over data-parallel replicas and packed into micro-batches) and one forward loop
(`session.forward_loop`: pipeline schedule, progress line, resume from a step). What a job measures
is an `observer.Observer` (validate before compute, observe through hooks that always detach,
finalize with the collectives): scoring, evaluation, routing drift and bias rebalancing are each
a few observers on the same loop. Imports mcore and checkpoint only."""
