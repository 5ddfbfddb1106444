"""Non-finite values (NaN / Inf) in scoring: named by MoE layer and expert, never written.

`check_observation` (the `--check-finite` switch) checks one MoE layer's forward on this rank: the
hidden states entering it, the router's combine weights, every local expert's output rows and the
combined routed output. It costs one device-to-host sync per MoE layer and forward (measured by
bench/check_finite_bench.py). Without the switch the final scores are still checked before they
are written (checkpoint.io.write_score_file) and that error names the layer and the experts.
"""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A NaN or Inf in a weight or produced in the forward."""


def check_observation(layer: int, obs, rank: int) -> None:
    """Raise NonFiniteError naming the layer (and the expert) if any value `obs` holds is not finite."""
    parts = {"hidden states entering the layer": obs.residual,
             "router combine weights": obs.probs,
             "expert outputs": obs.expert_rows,
             "routed output": obs.routed_output}
    finite = torch.stack([torch.isfinite(t).all() for t in parts.values()])
    if bool(finite.all()):  # the one sync per layer and forward
        return
    where = f"rank {rank}: non-finite values (NaN/Inf) in MoE layer {layer}"
    if not bool(finite[0]):
        raise NonFiniteError(f"{where}: the hidden states entering it are already non-finite "
                             "(an earlier layer's weights or its attention)")
    if not bool(finite[2]):
        experts = _experts_of_bad_rows(obs)
        raise NonFiniteError(f"{where}: the output of expert(s) {experts} (check "
                             f"model.layers.{layer}.mlp.experts.{experts[0]}.*)")
    if not bool(finite[1]):
        raise NonFiniteError(f"{where}: the router's combine weights (check model.layers.{layer}.mlp.gate.*)")
    raise NonFiniteError(f"{where}: the combined routed output")


def _experts_of_bad_rows(obs) -> list[int]:
    """Global ids of the local experts with a non-finite output row (rows grouped by local expert)."""
    bad_rows = ~torch.isfinite(obs.expert_rows).all(dim=-1)
    local_of_row = torch.repeat_interleave(
        torch.arange(len(obs.local_expert_ids), device=bad_rows.device),
        obs.tokens_per_local_expert.to(device=bad_rows.device, dtype=torch.long))
    return [obs.local_expert_ids[i] for i in sorted(set(local_of_row[bad_rows].tolist()))]

