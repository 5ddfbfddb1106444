"""Stage 2a, expert scores. Demonstrations are read and formatted (`demos`), run teacher-forced
through the Megatron model with observers on every MoE layer (`scorer`), and summed per
(domain, metric, layer, expert) with the EASY-EP formula and its baselines (`metrics`, pure
torch). `run` is the resumable scoring job that all-reduces once and writes the score file with
its provenance; `telemetry` samples GPU memory while it runs."""
