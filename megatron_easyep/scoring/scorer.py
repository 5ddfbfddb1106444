"""The expert scorer: per-token quantities from the MoE hooks -> metrics -> per-rank sums.

Each MoE layer, on each rank, after its routed output is combined (mcore/compat/hooks.py):
  * s_t for this rank's tokens from the residual h and the routed output (h~ = h + routed);
  * s_t, the token's domain and the routing map are all-gathered over the expert-parallel group,
    so the rank can tell which token each of its expert rows belongs to: the dispatcher lays out
    a local expert's rows as the EP group's tokens routed to it, source rank by source rank, in
    token order (allgather and alltoall alike), which is the order of
    routing_map_of_group[:, local_experts].T.nonzero();
  * each row gives g (the row's prob) and ||e|| = ||row|| / g (Megatron multiplies the expert
    output by g inside the expert), and metrics.expert_scores sums them per (domain, expert).
Sums are kept online in float64 per rank (only local experts are filled), and all-reduced once
over the world at the end: every (token, expert) pair is counted exactly once, on the rank that
owns the expert within the token's EP group.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_easyep.mcore import compat
from megatron_easyep.runtime.observer import Observer
from megatron_easyep.scoring import metrics


class ExpertScorer:
    """Online per-(domain, metric, layer, expert) sums for one model on one rank."""

    def __init__(self, moe_layer_indices: list[int], num_experts: int, domains: list[str],
                 ep_group=None, device="cpu", pool_inputs: bool = False, count_tokens: bool = True):
        # global layer ids (all pipeline stages); a stage fills only its own layers' rows
        self.layer_row = {layer: row for row, layer in enumerate(moe_layer_indices)}
        # under pipeline parallelism only the first stage counts tokens, so the world-wide
        # all-reduce counts each token once
        self.count_tokens = count_tokens
        # C-Prune: per demonstration, the mean of its MoE inputs in every MoE layer [L, H]
        self.pool_inputs = pool_inputs
        self.pooled_inputs: dict[int, torch.Tensor] = {}
        self.demo_rows: list[tuple[int, int, int]] = []  # (row, global demo index, length)
        self.rows = 1
        self.num_experts = num_experts
        self.domains = domains
        self.ep_group = ep_group
        self.sums = torch.zeros(len(domains), len(metrics.METRICS), len(moe_layer_indices),
                                num_experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(len(domains), dtype=torch.float64, device=device)
        self.token_domain: torch.Tensor | None = None  # [T] domain index, -1 = padding
        self._local_id_cache: dict = {}
        self._top_k: int | None = None
        # per layer row: forwards whose expert rows did not match the routing map (checked on the
        # host at once on CPU; on GPU accumulated on the device and checked once, in
        # check_row_layout, so the hot path has no host sync)
        self.layout_mismatches = torch.zeros(len(moe_layer_indices), dtype=torch.int64,
                                             device=device)
        self.defer_layout_check = torch.device(device).type == "cuda"

    def begin_step(self, token_domain: torch.Tensor, demo_rows=(), rows: int = 1) -> None:
        """The next micro-batch: token_domain [length x rows] (sequence-major, -1 = padding) and,
        for C-Prune's pooling, (row, global demo index, length) of every demo in it."""
        self.token_domain = token_domain
        self.demo_rows, self.rows = list(demo_rows), rows
        if self.count_tokens:
            counts = torch.bincount(token_domain + 1, minlength=len(self.domains) + 1)  # 0 = padding
            self.tokens += counts[1:].to(self.tokens)

    def observe(self, layer_index: int, obs: compat.MoEObservation) -> None:
        if self.pool_inputs:
            self._pool(layer_index, obs.moe_input)
        s = metrics.token_contribution(obs.residual, obs.residual + obs.routed_output)
        # What the EP group shares per token: s_t (fp32 bits), its domain and its top-k expert
        # ids, as one int32 [T, 2 + k] tensor (not a float64 [T, 2 + E] routing map).
        top_k = self._top_k_of(obs.routing_map)
        ids = torch.nonzero_static(obs.routing_map, size=obs.routing_map.shape[0] * top_k)[:, 1]  # row-major
        packed = torch.cat([s.float().view(torch.int32)[:, None],
                            self.token_domain.to(device=s.device, dtype=torch.int32)[:, None],
                            ids.to(torch.int32).view(-1, top_k)], dim=1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(self.ep_group))]
            dist.all_gather(parts, packed.contiguous(), group=self.ep_group)
            packed = torch.cat(parts, dim=0)
        s_group, domain_group = packed[:, 0].view(torch.float32), packed[:, 1].long()
        ids_group = packed[:, 2:].long()  # [T_group, k]

        local = self._local_ids(obs.local_expert_ids, packed.device)
        rows = obs.expert_rows
        # [E_local, T_group]: which of the group's tokens each local expert received (EP ranks
        # hold contiguous id blocks, so the local index is id - first local id)
        first, num_local = obs.local_expert_ids[0], len(obs.local_expert_ids)
        routed_here = torch.zeros(num_local, ids_group.shape[0], dtype=torch.bool, device=packed.device)
        mine = (ids_group >= first) & (ids_group < first + num_local)
        token_of = torch.arange(ids_group.shape[0], device=packed.device)[:, None].expand_as(ids_group)
        routed_here[(ids_group - first)[mine], token_of[mine]] = True
        # Rows are grouped by local expert, tokens in EP-group order: exactly the order of
        # routed_here.nonzero(). nonzero_static with the known row count avoids a GPU sync; the
        # count itself is checked on every device (at once on CPU, where it is free; on GPU the
        # mismatch is counted on the device and check_row_layout raises before any result).
        routed_count = routed_here.sum()
        if rows.is_cuda or self.defer_layout_check:
            self.layout_mismatches[self.layer_row[layer_index]] += routed_count != rows.shape[0]
        elif int(routed_count) != rows.shape[0]:
            raise RuntimeError(self._layout_message(layer_index, f"{rows.shape[0]} expert rows but the "
                                                    f"routing map routes {int(routed_count)} tokens"))
        local_expert, token = torch.nonzero_static(routed_here, size=rows.shape[0]).unbind(1)
        gate = obs.row_probs.float()
        out_norm = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)  # no fp32 copy of rows
        expert_out_norm = torch.where(gate > 0, out_norm / gate.clamp_min(1e-30),
                                      torch.zeros_like(out_norm))
        # padding tokens (domain -1) land in one extra bin that is dropped
        domain = domain_group[token]
        num_bins = len(self.domains) * self.num_experts
        bins = torch.where(domain >= 0, domain * self.num_experts + local[local_expert], num_bins)
        sums = metrics.expert_scores(bins, gate, expert_out_norm, s_group[token], num_bins + 1)
        row = self.layer_row[layer_index]
        for m, name in enumerate(metrics.METRICS):
            self.sums[:, m, row] += sums[name][:num_bins].view(len(self.domains),
                                                               self.num_experts)

    @staticmethod
    def _layout_message(layer_index: int, what: str) -> str:
        return (f"layer {layer_index}: {what} to this rank's experts; the dispatcher's row layout is "
                "not what megatron_easyep.scoring.scorer assumes")

    def check_row_layout(self) -> None:
        """Raise if any forward's expert rows did not match its routing map (one host sync; CPU
        forwards were checked as they ran)."""
        bad = self.layout_mismatches.nonzero().flatten().tolist()
        if bad:
            layer = {row: layer for layer, row in self.layer_row.items()}[bad[0]]
            count = int(self.layout_mismatches[bad[0]])
            raise RuntimeError(self._layout_message(layer, f"in {count} forward(s) the expert row count "
                                                    "differed from the tokens the routing map routes"))
    def _pool(self, layer_index: int, moe_input: torch.Tensor) -> None:
        """C-Prune: each demo's mean MoE input in this layer (its real tokens: the first `length`
        positions of its row; Megatron's token order inside a layer is [sequence, row])."""
        hidden = moe_input.shape[-1]
        by_row = moe_input.view(-1, self.rows, hidden)
        for row, demo_index, length in self.demo_rows:
            pooled = self.pooled_inputs.setdefault(
                demo_index, torch.zeros(len(self.layer_row), hidden, dtype=torch.float32))
            pooled[self.layer_row[layer_index]] = by_row[:length, row].float().mean(0).cpu()

    def _top_k_of(self, routing_map: torch.Tensor) -> int:
        """Experts per token (constant: dropless top-k routing), read once from the first map."""
        if self._top_k is None and routing_map.shape[0]:
            self._top_k = int(routing_map[0].sum())
        return self._top_k or 0

    def _local_ids(self, ids: list[int], device) -> torch.Tensor:
        key = (tuple(ids), str(device))
        if key not in self._local_id_cache:
            self._local_id_cache[key] = torch.tensor(ids, device=device)
        return self._local_id_cache[key]

    def all_reduce(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.tokens)
            dist.all_reduce(self.layout_mismatches)  # every rank then raises the same error
        self.check_row_layout()

    def state_dict(self) -> dict:
        self.check_row_layout()  # a snapshot never holds misattributed rows
        return {"sums": self.sums.cpu(), "tokens": self.tokens.cpu(),
                "pooled_inputs": dict(self.pooled_inputs)}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.tokens.copy_(state["tokens"])
        self.pooled_inputs = dict(state.get("pooled_inputs", {}))

    def score_tensors(self) -> dict[str, torch.Tensor]:
        """{metric: [L, E]} over all domains and {metric@domain: [L, E]}."""
        out = {}
        for m, name in enumerate(metrics.METRICS):
            out[name] = self.sums[:, m].sum(dim=0).cpu().contiguous()
            for d, domain in enumerate(self.domains):
                out[f"{name}@{domain}"] = self.sums[d, m].cpu().contiguous()
        return out


class ScoreObserver(Observer):
    """The EASY-EP scorer on the shared forward loop: every MoE layer's routed output is scored
    as it is combined; finalize all-reduces the sums once (and, with `cprune_features`, runs every
    expert on the demos' pooled inputs)."""

    def __init__(self, domains: list[str], num_demos: int, *, cprune_features: bool = False,
                 check_finite: bool = False):
        self.domains, self.num_demos, self.cprune_features = domains, num_demos, cprune_features
        self.check_finite = check_finite  # every layer's forward (scoring.finite; one sync per layer)
        self.scorer: ExpertScorer | None = None

    def setup(self, session) -> None:
        from megatron.core import parallel_state

        from megatron_easyep.mcore import pipeline

        if self.cprune_features:  # fails now, not after the whole run, if experts cannot be run one by one
            for _, layer in compat.iter_moe_layers(session.model):
                compat.local_experts(layer.mlp)
        self.device = session.device
        self.moe_layers = pipeline.moe_layer_ids(session.model.config)  # every stage's, global ids
        # tokens are counted on the first stage only; each stage fills the rows of its own layers
        self.scorer = ExpertScorer(self.moe_layers, session.cfg.n_routed_experts, self.domains,
                                   ep_group=parallel_state.get_expert_model_parallel_group(),
                                   device=self.device, pool_inputs=self.cprune_features,
                                   count_tokens=session.layout.first_stage)

    @contextlib.contextmanager
    def attached(self, session):
        observe = self.scorer.observe
        if self.check_finite:
            from megatron_easyep.scoring.finite import check_observation

            rank = session.layout.rank

            def observe(layer_index, obs, score=self.scorer.observe):
                check_observation(layer_index, obs, rank)
                score(layer_index, obs)

        detach = compat.attach_moe_observers(session.model, observe)
        try:
            yield self
        finally:
            detach()

    def before_micro_batch(self, batch) -> None:
        # [s, b] flattened: Megatron's token order inside a layer is sequence-major
        token_domain = torch.full((batch.length, batch.rows), -1, dtype=torch.long, device=self.device)
        for row, (_, demo) in enumerate(batch.members):
            token_domain[:len(demo.input_ids), row] = self.domains.index(demo.domain)
        demo_rows = [(row, index, len(demo.input_ids)) for row, (index, demo) in enumerate(batch.members)]
        self.scorer.begin_step(token_domain.reshape(-1), demo_rows, batch.rows)

    def finalize(self, session) -> dict | None:
        """All-reduce the sums; the C-Prune features on rank 0 (None elsewhere or when not asked)."""
        self.scorer.all_reduce()
        if not self.cprune_features:
            return None
        return cprune_expert_features(session.model, self.scorer, self.num_demos)


def _pooled_by_demo(model, scorer: ExpertScorer, num_demos: int) -> torch.Tensor:
    """[L, N, H]: every demo's pooled MoE inputs, gathered over the world. A demo is pooled on one
    rank per pipeline stage (its data-parallel replica), each filling its own stage's layers."""
    mine = [scorer.layer_row[index] for index, _ in compat.iter_moe_layers(model)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, scorer.pooled_inputs))
    pooled = torch.zeros(len(scorer.layer_row), num_demos, *next(
        (t.shape[1:] for _, part in gathered for t in part.values()), (0,)))
    seen = torch.zeros(len(scorer.layer_row), num_demos, dtype=torch.bool)
    for rows, part in gathered:
        for demo, value in part.items():
            pooled[rows, demo] = value[rows]
            seen[rows, demo] = True
    if not bool(seen.all()):
        raise RuntimeError("C-Prune: pooled inputs are missing for some demonstrations")
    return pooled


@torch.no_grad()
def cprune_expert_features(model, scorer: ExpertScorer, num_demos: int) -> dict | None:
    """C-Prune's expert features (arXiv 2504.07807): every expert run on the mean-pooled MoE
    input of every demonstration. Pooled inputs come from the scoring forward (any PP x EP layout,
    any micro-batching); each rank runs its own experts of its own stage on all of them, and rank 0
    gathers {"features": [L, E, N, H], "pooled_inputs": [L, N, H]} (float32; N = demonstrations in
    input order)."""
    from megatron.core import parallel_state

    pooled = _pooled_by_demo(model, scorer, num_demos)
    ep_group = parallel_state.get_expert_model_parallel_group()
    features = {}
    for index, layer in compat.iter_moe_layers(model):
        row = scorer.layer_row[index]
        experts = compat.local_experts(layer.mlp)
        param = next(experts[0].parameters())  # its device; the dtype is the config's (weights may be FP8)
        x = pooled[row].to(device=param.device, dtype=layer.mlp.config.params_dtype)
        local = torch.stack([expert(x)[0].float() for expert in experts])  # [E_local, N, H]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(ep_group))]
        dist.all_gather(parts, local.contiguous(), group=ep_group)
        features[row] = torch.cat(parts).cpu()  # EP ranks hold contiguous global id blocks
    stages = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(features, stages, dst=0)  # the stages' layers meet on rank 0
    if dist.get_rank() != 0:
        return None
    by_row = {row: value for part in stages for row, value in part.items()}
    return {"features": torch.stack([by_row[row] for row in range(len(scorer.layer_row))]).contiguous(),
            "pooled_inputs": pooled.contiguous()}
