"""The shared run driver (megatron_easyep.runtime): micro-batch plans by hand, and observers' hooks
come off the real Megatron model when the loop fails (a worker process: one tiny model, world of 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_easyep.runtime.schedule import deal_in_order, plan_fixed_rows, plan_micro_batches, shard_for_rank

REPO = Path(__file__).resolve().parents[1]


def _shape(steps):
    return [[(slot.rows, slot.length, slot.members) for slot in step] for step in steps]


def test_token_budget_packing_by_hand():
    # replica 0: lengths 5, 4, 3 -> (5, 4) fits 2 x 5 = 10 <= 10, 3 opens a new group;
    # replica 1: lengths 6, 2 -> 2 x 6 = 12 > 10, so one each. Slots pad to the larger rows/length.
    steps = plan_micro_batches([[5, 4, 3], [6, 2]], 10, per_step=2)
    assert _shape(steps) == [[(2, 6, ((0, 1), (0,))), (1, 3, ((2,), (1,)))]]
    # one demo each; a replica with fewer demos gets empty slots
    assert _shape(plan_micro_batches([[5, 4], [6]], None, 1)) == [[(1, 6, ((0,), (0,)))], [(1, 4, ((1,), ()))]]


def test_fixed_rows_keep_the_input_order():
    steps = plan_fixed_rows([[3, 9, 2, 4, 1]], 2, per_step=1)
    assert _shape(steps) == [[(2, 9, ((0, 1),))], [(2, 4, ((2, 3),))], [(1, 1, ((4,),))]]


def test_dealing_demos_over_replicas():
    class D:
        def __init__(self, n):
            self.input_ids = tuple(range(n))

    demos = [D(n) for n in (3, 7, 5, 7)]
    # longest first, ties by position, round-robin
    assert [i for i, _ in shard_for_rank(demos, 0, 2)] == [1, 2]
    assert [i for i, _ in shard_for_rank(demos, 1, 2)] == [3, 0]
    assert [i for i, _ in deal_in_order(demos, 1, 2)] == [1, 3]


_WORKER = r"""
import json, sys
import torch
from megatron_easyep.runtime.observer import Observer, StopMicroBatch
from megatron_easyep.runtime.session import ModelSession, SessionSpec, forward_loop
from megatron_easyep.scoring.demos import Demo
from megatron_easyep.scoring.scorer import ScoreObserver
from megatron_easyep.mcore import compat

class Fails(Observer):
    def after_micro_batch(self, batch, output):
        raise KeyError("observer failed")

class Counts(Observer):
    def before_micro_batch(self, batch):
        out["hooks_during"] = hooks()

class Stops(Observer):
    def before_micro_batch(self, batch):
        raise StopMicroBatch

session = ModelSession.open(SessionSpec(sys.argv[1], logits=False))
session.init_parallel()
score = ScoreObserver(["all"], 2)
session.load_model([score])
demos = [Demo(tuple(range(1, 9)), "all", "a"), Demo(tuple(range(3, 8)), "all", "b")]

def hooks():
    n = 0
    for _, layer in compat.iter_moe_layers(session.model):
        moe = layer.mlp
        n += len(moe.router._forward_hooks) + len(moe.experts._forward_hooks)
        n += len(layer.pre_mlp_layernorm._forward_pre_hooks) + ("postprocess" in vars(moe))
    return n

out = {}
try:
    forward_loop(session, session.plan(demos, None, 1), [score, Counts(), Fails()])
except KeyError as e:
    out["error"] = str(e)
out["hooks_after_error"] = hooks()
out["tokens_seen"] = float(score.scorer.tokens.sum())
try:
    forward_loop(session, session.plan(demos, None, 2), [Stops()])
except RuntimeError as e:
    out["stop_refused"] = str(e)

# packed micro-batches (several demos per forward, padded) against one demo per forward
from megatron_easyep.analysis.evaluation import NllObserver
from megatron_easyep.analysis.rebalance import LoadObserver
from megatron_easyep.runtime.session import LogitsCollector
session = ModelSession.open(SessionSpec(sys.argv[1], logits=True))
session.init_parallel()
demos = [Demo(tuple((7 * i + 3 * j) % 100 + 1 for j in range(n)), "ab"[i % 2], str(i))
         for i, n in enumerate((9, 4, 12, 6, 7))]
runs = {}
for name, budget in (("single", None), ("packed", 40)):
    nll, logits, loads = NllObserver(["a", "b"]), LogitsCollector(), LoadObserver()
    session.load_model([nll, logits, loads])
    plan = session.plan(demos, budget, 1)
    forward_loop(session, plan, [nll, logits, loads])
    runs[name] = (nll.finalize(session), logits.finalize(session), loads.finalize(session), plan.micro_batches)
(n1, l1, c1, m1), (n2, l2, c2, m2) = runs["single"], runs["packed"]
out["micro_batches"] = [m1, m2]
out["nll_diff"] = max(abs(n1[d]["nll"] - n2[d]["nll"]) for d in n1)
out["tokens"] = [n1[d]["tokens"] for d in n1] + [n2[d]["tokens"] for d in n2]
out["logits_diff"] = max(float((a - b).abs().max()) for a, b in zip(l1, l2))
out["logits_shapes_equal"] = [a.shape for a in l1] == [b.shape for b in l2] == [(len(d.input_ids), a.shape[1]) for d, a in zip(demos, l1)]
out["loads_equal"] = all(torch.equal(c1[k], c2[k]) for k in c1)
out["loads_total"] = [int(c1[k].sum()) for k in c1]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def worker(tiny_ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(tiny_ckpt)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hooks_detach_when_the_loop_fails(worker):
    out = worker
    assert out["error"] == "'observer failed'"
    assert out["tokens_seen"] == 8  # the scorer's hooks ran on the first demo before the failure
    assert out["hooks_during"] >= 8  # 2 MoE layers x (3 hooks + postprocess): the count sees them
    assert out["hooks_after_error"] == 0
    assert "one micro-batch per step" in out["stop_refused"]


def test_observers_read_packed_micro_batches_like_single_demos(worker, tiny_ckpt):
    """Evaluation's NLL, the logits and rebalancing's expert loads with several demos per forward
    (padded rows) equal one demo per forward: padding is dropped per row, not per batch."""
    out = worker
    assert out["micro_batches"][0] == 5 and out["micro_batches"][1] < 5  # really packed
    assert out["tokens"] == [9 + 12 + 7 - 3, 4 + 6 - 2] * 2
    assert out["nll_diff"] < 1e-6 and out["logits_diff"] < 1e-5 and out["logits_shapes_equal"]
    top_k = json.loads((tiny_ckpt / "config.json").read_text())["num_experts_per_tok"]
    assert out["loads_equal"] and out["loads_total"] == [top_k * (9 + 4 + 12 + 6 + 7)] * len(out["loads_total"])
