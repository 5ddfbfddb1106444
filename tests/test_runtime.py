"""The shared run driver (megatron_easyep.runtime): micro-batch plans by hand, and observers' hooks
come off the real Megatron model when the loop fails (a worker process: one tiny model, world of 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
from megatron_easyep.mcore import patches

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
    for _, layer in patches.iter_moe_layers(session.model):
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
print(json.dumps(out))
"""


def test_hooks_detach_when_the_loop_fails(tiny_ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(tiny_ckpt)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "'observer failed'"
    assert out["tokens_seen"] == 8  # the scorer's hooks ran on the first demo before the failure
    assert out["hooks_during"] >= 8  # 2 MoE layers x (3 hooks + postprocess): the count sees them
    assert out["hooks_after_error"] == 0
    assert "one micro-batch per step" in out["stop_refused"]
