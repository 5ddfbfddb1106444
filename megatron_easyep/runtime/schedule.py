"""Which rank runs which demonstration, and in which micro-batch: computed identically on every
rank from the demonstration lengths alone (no communication), so EP collectives and pipeline
stages stay in lockstep."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch slot, the same shape on every rank: `members[r]` are positions in replica
    r's demo list (empty rows and positions beyond a demo's length are padding)."""

    rows: int
    length: int
    members: tuple[tuple[int, ...], ...]


def deal_in_order(demos: list, dp_rank: int, dp_size: int) -> list[tuple[int, object]]:
    """Round-robin in input order (for fixed-size batches whose composition must not depend on
    lengths). Returns (global demo index, demo) pairs."""
    return [(i, demos[i]) for i in range(dp_rank, len(demos), dp_size)]


def shard_for_rank(demos: list, dp_rank: int, dp_size: int) -> list[tuple[int, object]]:
    """Deterministic split across data-parallel ranks: demos sorted by length (longest first,
    ties by position) dealt round-robin, so ranks get similar token counts. Returns
    (global demo index, demo) pairs."""
    order = sorted(range(len(demos)), key=lambda i: (-len(demos[i].input_ids), i))
    return [(i, demos[i]) for i in order[dp_rank::dp_size]]


def _pack(replica: list[int], micro_batch_tokens: int | None) -> list[list[int]]:
    """One replica's demo positions in order, greedily grouped while rows x longest <=
    micro_batch_tokens (None: one demo per group)."""
    groups, current, longest = [], [], 0
    for pos, n in enumerate(replica):
        if current and micro_batch_tokens is None:
            groups.append(current)
            current, longest = [], 0
        elif current and (len(current) + 1) * max(longest, n) > micro_batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(pos)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def plan_micro_batches(lengths: list[list[int]], micro_batch_tokens: int | None,
                       per_step: int) -> list[list[MicroBatch]]:
    """Steps of micro-batches for every data-parallel replica, computed identically on every rank
    from the demo lengths (no communication): each replica packs its demos in order, greedily,
    while rows x longest <= micro_batch_tokens (None: one demo each); slot j of every replica is
    padded to the largest rows and length over replicas (EP collectives run in lockstep, and the
    allgather dispatcher needs equal token counts); `per_step` micro-batches make one step
    (a pipeline flush, and the unit of --resume)."""
    return _steps(lengths, [_pack(replica, micro_batch_tokens) for replica in lengths], per_step)


def plan_fixed_rows(lengths: list[list[int]], rows: int, per_step: int) -> list[list[MicroBatch]]:
    """Like plan_micro_batches, but every micro-batch takes the next `rows` demos of a replica in
    its order, whatever their lengths (a fixed batch size)."""
    packed = [[list(range(i, min(i + rows, len(replica)))) for i in range(0, len(replica), rows)]
              for replica in lengths]
    return _steps(lengths, packed, per_step)


def _steps(lengths: list[list[int]], packed: list[list[list[int]]], per_step: int) -> list[list[MicroBatch]]:
    """Slot j of every replica padded to the largest rows and length over replicas, in steps."""
    total = max((len(g) for g in packed), default=0)
    slots = []
    for j in range(max(total, 1)):
        members = tuple(tuple(groups[j]) if j < len(groups) else () for groups in packed)
        rows = max(max((len(m) for m in members), default=1), 1)
        length = max([lengths[r][pos] for r, m in enumerate(members) for pos in m] + [1])
        slots.append(MicroBatch(rows, length, members))
    return [slots[i:i + per_step] for i in range(0, len(slots), per_step)]
