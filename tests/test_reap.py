"""REAP as a selection criterion: the mean over routed tokens of g * ||e||, derived from the sums a
score file keeps (easyep_no_token / frequency). Oracle: values computed by hand below."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.selection import (
    SelectionError,
    load_scores,
    reap_scores,
    select_experts,
    select_for_checkpoint,
)
from megatron_easyep.checkpoint.io import write_score_file

REPO = Path(__file__).resolve().parent.parent
E = 8
LAYERS = [1, 2]

# Sums per domain, layer 1 (layer 2 is the reverse order of experts):
#   expert:              0    1    2    3    4    5    6    7
MATH_GNORM = [12.0, 3.0, 0.0, 8.0, 1.0, 9.0, 2.0, 6.0]   # sum of g * ||e||
MATH_COUNT = [4.0, 1.0, 0.0, 8.0, 2.0, 3.0, 1.0, 2.0]    # tokens routed (expert 2: none)
CODE_GNORM = [1.0, 10.0, 4.0, 0.0, 6.0, 2.0, 5.0, 1.0]
CODE_COUNT = [1.0, 2.0, 2.0, 0.0, 3.0, 4.0, 1.0, 1.0]    # expert 3: none
# by hand: math REAP = 12/4, 3/1, 0 (no tokens), 8/8, 1/2, 9/3, 2/1, 6/2
MATH_REAP = [3.0, 3.0, 0.0, 1.0, 0.5, 3.0, 2.0, 3.0]
CODE_REAP = [1.0, 5.0, 2.0, 0.0, 2.0, 0.5, 5.0, 1.0]


def _rows(values):
    return torch.tensor([values, values[::-1]], dtype=torch.float64)


@pytest.fixture
def score_dir(tmp_path):
    tensors = {}
    for domain, gnorm, count in (("math", MATH_GNORM, MATH_COUNT), ("code", CODE_GNORM, CODE_COUNT)):
        tensors[f"easyep_no_token@{domain}"] = _rows(gnorm)
        tensors[f"frequency@{domain}"] = _rows(count)
        tensors[f"easyep@{domain}"] = _rows([1.0] * E)
    tensors["easyep_no_token"] = _rows([a + b for a, b in zip(MATH_GNORM, CODE_GNORM)])
    tensors["frequency"] = _rows([a + b for a, b in zip(MATH_COUNT, CODE_COUNT)])
    tensors["easyep"] = _rows([2.0] * E)
    return write_score_file(tmp_path / "scores", tensors, LAYERS, "0" * 64, ["math", "code"])


def test_reap_values_by_hand(score_dir):
    scores = load_scores(score_dir)
    assert "reap" in scores.available_metrics and "reap" not in scores.metrics
    assert scores.rows("reap", "math")[0].tolist() == MATH_REAP
    assert scores.rows("reap", "math")[1].tolist() == MATH_REAP[::-1]
    assert scores.rows("reap", "code")[0].tolist() == CODE_REAP
    # all domains together: summed sums over summed counts (expert 2: 4/2, expert 3: 8/8)
    both = [(a + b) / (c + d) for a, b, c, d in zip(MATH_GNORM, CODE_GNORM, MATH_COUNT, CODE_COUNT)]
    assert scores.rows("reap")[0].tolist() == both
    assert reap_scores(torch.tensor([5.0, 0.0]), torch.tensor([0.0, 0.0])).tolist() == [0.0, 0.0]


def _select(scores, keep, domains):
    return select_experts(scores, keep=keep, metric="reap", domains=domains, group_policy="collapse",
                          n_group=1, topk_group=1, top_k=2)


def test_reap_selection_single_domain_and_zero_routed_expert_goes_first(score_dir):
    scores = load_scores(score_dir)
    kept = _select(scores, 7, ["math"]).kept
    assert 2 not in kept[1]  # the expert math never routed to is the one dropped
    assert 7 - 2 not in kept[2]  # layer 2 holds the reversed rows
    # top 4 of MATH_REAP: 3.0 at experts 0, 1, 5, 7 (ties broken by id: selection's own rule)
    assert set(_select(scores, 4, ["math"]).kept[1]) == {0, 1, 5, 7}


def test_reap_selection_mixed_domains_uses_the_l1_rule(score_dir):
    scores = load_scores(score_dir)
    math_l1 = [v / sum(MATH_REAP) for v in MATH_REAP]
    code_l1 = [v / sum(CODE_REAP) for v in CODE_REAP]
    mixed = [a + b for a, b in zip(math_l1, code_l1)]
    expected = sorted(range(E), key=lambda i: (-mixed[i], i))[:3]
    assert set(_select(scores, 3, ["math", "code"]).kept[1]) == set(expected)


def test_reap_needs_its_two_sums(tmp_path):
    path = write_score_file(tmp_path / "s", {"easyep": _rows([1.0] * E)}, LAYERS, "0" * 64, [])
    with pytest.raises(SelectionError, match="unknown metric 'reap'"):
        _select(load_scores(path), 4, None)


def test_export_cli_accepts_reap(tiny_checkpoint_factory, tmp_path):
    ckpt = tiny_checkpoint_factory()
    config = DeepseekV3Config.load(ckpt)
    gen = torch.Generator().manual_seed(0)
    layers = config.moe_layer_ids
    shape = (len(layers), config.n_routed_experts)
    gnorm, count = torch.rand(shape, generator=gen, dtype=torch.float64), torch.randint(0, 5, shape, generator=gen)
    scores = write_score_file(tmp_path / "scores", {"easyep_no_token": gnorm, "frequency": count.double()},
                              layers, config.config_hash, [], architecture_hash=config.architecture_hash,
                              storage_format=config.storage_format)
    proc = subprocess.run([sys.executable, str(REPO / "converters" / "export_pruned.py"), "--hf-checkpoint",
                           str(ckpt), "--scores", str(scores), "--output", str(tmp_path / "pruned"), "--keep", "8",
                           "--metric", "reap"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pruning = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    reap = reap_scores(gnorm, count.double())
    direct = select_for_checkpoint(load_scores(scores), config, keep=8, metric="reap")
    assert pruning["metric"] == "reap"
    for row, layer in enumerate(layers):
        assert pruning["kept_experts"][str(layer)] == list(direct.kept[layer])
        assert all(reap[row, i] > 0 or count[row, i] == 0 for i in direct.kept[layer])
