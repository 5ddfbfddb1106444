"""The EASY-EP formula and its baselines, as pure torch (arXiv 2504.06792, section 3).

Nothing here knows about Megatron: the scoring hooks gather g, ||e||, h and h~ and call these.

For each MoE layer, token t and each of its k selected routed experts i:
    g_{i,t}  final combine weight (normalised top-k sigmoid scores x routed_scaling_factor)
    e_{i,t}  raw output of expert i on token t (before multiplying by g)
    h_t      residual stream entering the MoE block
    h~_t     h_t + sum_i g_{i,t} e_{i,t}      (routed experts only, no shared expert)

    c_{i,t} = g_{i,t} * ||e_{i,t}||_2               output-aware expert importance
    s_t     = max(0, 1 - cos(h_t, h~_t))            token contribution (fp32)
    I_i     = sum_t c_{i,t} * s_t                   EASY-EP score
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_easyep.checkpoint.io import SCORE_METRICS as METRICS  # their order in the score file



def token_contribution(h: torch.Tensor, h_tilde: torch.Tensor) -> torch.Tensor:
    """s_t = max(0, 1 - cos(h_t, h~_t)), computed in fp32. [T, H], [T, H] -> [T]."""
    cos = F.cosine_similarity(h.float(), h_tilde.float(), dim=-1)
    return (1.0 - cos).clamp_min(0.0)


def pair_scores(gate: torch.Tensor, expert_out_norm: torch.Tensor,
                token_contrib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (token, selected expert) pair: the contribution of that pair to each metric.
    gate = g_{i,t}, expert_out_norm = ||e_{i,t}||, token_contrib = s_t of the pair's token."""
    c = gate * expert_out_norm
    return {
        "easyep": c * token_contrib,             # sum g*||e||*s
        "easyep_no_token": c,                    # ablation "w/o token": sum g*||e||
        "easyep_no_norm": gate * token_contrib,  # ablation "w/o norm": sum g*s
        "gate": gate,                            # gating-score baseline: sum g
        "frequency": torch.ones_like(gate),      # frequency baseline: routed token count
    }


def expert_scores(expert_ids: torch.Tensor, gate: torch.Tensor, expert_out_norm: torch.Tensor,
                  token_contrib: torch.Tensor, num_experts: int,
                  dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Sum each metric's pair contributions per expert: -> {metric: [num_experts]}."""
    pairs = pair_scores(gate.to(dtype), expert_out_norm.to(dtype), token_contrib.to(dtype))
    stacked = torch.stack([pairs[name] for name in METRICS], dim=1)  # one scatter for all
    sums = torch.zeros(num_experts, len(METRICS), dtype=dtype, device=stacked.device)
    sums.index_add_(0, expert_ids.long(), stacked)
    return {name: sums[:, m] for m, name in enumerate(METRICS)}
