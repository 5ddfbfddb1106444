"""What the comparison measures: the full model's reference distributions on held-out text,
KL(full || pruned), top-1 agreement and perplexity of a pruned model on the same positions, and
the overlap of top-M expert sets (between demonstration counts, between domains, and what random
selection would give).

Tokens: every held-out position that has a next token (positions 0..T-2 of each sequence); KL,
top-1 and perplexity use the same positions. KL is computed in float64 from float32
log-softmax, so identical logits give exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megatron_easyep.pruning.selection import EQUAL_PER_GROUP, KNOWN_METRICS, select_for_checkpoint

OVERLAP_METRICS = KNOWN_METRICS  # the criteria whose top-M sets the overlap analyses compare


def forward_batched(model, seqs: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """fp32 logits [len, V] of every sequence; batches right-padded with token 0 (attention is
    causal and MoE routing dropless, so padding never changes a real position)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long, device=device)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s, device=device)
        pos = torch.arange(length, device=device).unsqueeze(0).expand(len(chunk), length)
        logits = model(ids, pos, None)
        out.extend(logits[i, :len(s)].float().cpu() for i, s in enumerate(chunk))
    return out


@dataclass
class Reference:
    """The full model on one domain's held-out sequences (positions with a next token)."""

    seqs: list[list[int]]
    logp: list[torch.Tensor]  # [T-1, V] float32 log-softmax
    top1: list[torch.Tensor]  # [T-1]
    targets: list[torch.Tensor]  # [T-1]
    nll: float = 0.0
    tokens: int = 0


def reference_of(seqs: list[list[int]], logits: list[torch.Tensor]) -> Reference:
    ref = Reference(seqs=seqs, logp=[], top1=[], targets=[])
    nll = 0.0
    for s, lg in zip(seqs, logits):
        logp = torch.log_softmax(lg[:-1].float(), dim=-1)
        target = torch.tensor(s[1:], dtype=torch.long)
        ref.logp.append(logp)
        ref.top1.append(logp.argmax(-1))
        ref.targets.append(target)
        nll -= logp.double().gather(1, target[:, None]).sum().item()
        ref.tokens += len(s) - 1
    ref.nll = nll / max(ref.tokens, 1)
    return ref


def measure(ref: Reference, logits: list[torch.Tensor]) -> dict:
    """KL(full || pruned) mean per token, top-1 agreement, NLL and perplexity of the pruned
    model on the reference's positions."""
    kl = agree = nll = 0.0
    for p_log, p_top, target, lg in zip(ref.logp, ref.top1, ref.targets, logits):
        q_log = torch.log_softmax(lg[:-1].float(), dim=-1)
        p64, q64 = p_log.double(), q_log.double()
        kl += float((p64.exp() * (p64 - q64)).sum())
        agree += float((q_log.argmax(-1) == p_top).sum())
        nll -= float(q64.gather(1, target[:, None]).sum())
    n = max(ref.tokens, 1)
    return {"tokens": ref.tokens, "kl": kl / n, "top1": agree / n, "nll": nll / n,
            "ppl": math.exp(nll / n), "nll_full": ref.nll, "ppl_full": math.exp(ref.nll)}


def overlap(a, b) -> float:
    return len(set(a) & set(b)) / max(len(a), 1)


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / max(len(a | b), 1)


def random_jaccard(config, keep: int, policy: str) -> float:
    """Expected Jaccard index of two independent uniformly random top-M selections under the
    group policy (exact): the intersection is a sum of independent hypergeometric counts, one per
    routing group (equal-per-group) or one over all experts (collapse)."""
    from scipy.stats import hypergeom

    groups = config.n_group if policy == EQUAL_PER_GROUP else 1
    size, per_group = config.n_routed_experts // groups, keep // groups
    pmf = np.array([1.0])
    one = hypergeom.pmf(np.arange(per_group + 1), size, per_group, per_group)
    for _ in range(groups):
        pmf = np.convolve(pmf, one)
    k = np.arange(len(pmf))
    return float((pmf * k / (2 * keep - k)).sum())


def domain_selection(scores, config, metric, domain, keep, policy):
    return select_for_checkpoint(scores, config, keep=keep, metric=metric, domains=[domain],
                                 group_policy=policy).kept


def overlap_between_domains(scores, config, keep, policy) -> list[dict]:
    rows = []
    for m in OVERLAP_METRICS:
        kept = {d: domain_selection(scores, config, m, d, keep, policy) for d in scores.domains}
        for a in scores.domains:
            for b in scores.domains:
                for layer in scores.layers:
                    rows.append({"metric": m, "domain_a": a, "domain_b": b, "keep": keep,
                                 "group_policy": policy, "layer": layer,
                                 "jaccard": jaccard(kept[a][layer], kept[b][layer])})
    return rows

