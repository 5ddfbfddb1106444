"""Routing-drift report: the per-layer core on hand-made routers, and `launch/routing_drift.py`
end to end on tiny exports, checked against stock transformers' own DeepseekV3 routers.

Hand-made routers: gate_weight = I (H = E) and router input = logit(s), so the sigmoid scores are
exactly the numbers written in the test, and every top-k / group / mass can be worked out by hand.

End to end: a tiny checkpoint (with an MTP layer) exported keeping all 16 experts and keeping 8
(equal-per-group). The keep=half report is compared with an independent computation: transformers'
DeepseekV3ForCausalLM of the ORIGINAL checkpoint is run over the same demos, its `mlp.gate`
inputs and outputs are captured with forward hooks, and the PRUNED checkpoint's own transformers
gate (loaded from the export, so its groups are the exported config's) routes those same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_easyep.analysis.routing_drift import Routing, RoutingDriftError, layer_drift, load_pruned_plan, route

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
CLI = str(REPO / "launch" / "routing_drift.py")
LAUNCH_TIMEOUT = 300
# keep=half runs on 2 torchrun ranks with EP 2: each rank holds 8 of the 16 experts, the shorter
# demo of each step is padded (the padded positions must not be counted), sums are all-reduced
HALF_LAUNCHER, HALF_EP = [TORCHRUN, "--standalone", "--nproc-per-node=2"], 2


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).to(torch.float32)


def identity_router(score_rows, bias=None):
    """(router_input, gate_weight, bias) whose sigmoid scores are `score_rows` [T, E]."""
    x = logit(score_rows)
    num_experts = x.shape[-1]
    b = torch.zeros(num_experts) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
    return x, torch.eye(num_experts), b


def ids_set(ids_row):
    return set(ids_row.tolist())


# --------------------------------------------------------------------------------------------
# route(): hand-checked DeepSeek routing
# --------------------------------------------------------------------------------------------

# 16 experts, 4 groups of 4. Expert 0 has the best score, but group 1 wins the group vote
# (top-2 sum 0.6 + 0.59 = 1.19 > group 0's 0.9 + 0.2 = 1.1).
GROUPED = [0.9, 0.2, 0.19, 0.18,
           0.6, 0.59, 0.1, 0.11,
           0.05, 0.04, 0.03, 0.02,
           0.06, 0.01, 0.015, 0.012]


def test_route_group_limit_bias_and_weights():
    s = torch.tensor([GROUPED])
    ids, w = route(s, s, top_k=2, n_group=4, topk_group=1, scaling=2.5)
    assert ids_set(ids[0]) == {4, 5}  # expert 0 is outside the one selected group
    got = dict(zip(ids[0].tolist(), w[0].tolist()))
    assert got[4] == pytest.approx(2.5 * 0.6 / 1.19, rel=1e-5) and got[5] == pytest.approx(2.5 * 0.59 / 1.19, rel=1e-5)
    ids, _ = route(s, s, top_k=2, n_group=4, topk_group=2, scaling=1.0)
    assert ids_set(ids[0]) == {0, 4}
    ids, _ = route(s, s, top_k=3, n_group=1, topk_group=1, scaling=1.0)
    assert ids_set(ids[0]) == {0, 4, 5}
    # the bias moves the choice, the weights stay the unbiased scores
    bias = torch.zeros(16)
    bias[13] = 1.2  # group 3 now scores 1.21 + 0.06 = 1.27 > 1.19 and wins
    ids, w = route(s + bias, s, top_k=2, n_group=4, topk_group=1, scaling=1.0)
    assert ids_set(ids[0]) == {12, 13}
    got = dict(zip(ids[0].tolist(), w[0].tolist()))
    assert got[13] == pytest.approx(0.01 / 0.07, rel=1e-5) and got[12] == pytest.approx(0.06 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="groups"):
        route(torch.rand(2, 10), torch.rand(2, 10), top_k=2, n_group=4, topk_group=1, scaling=1.0)


# --------------------------------------------------------------------------------------------
# layer_drift(): hand-made routers
# --------------------------------------------------------------------------------------------

FLAT = Routing(top_k=2, n_group=1, topk_group=1, scaling=2.5)
# 8 experts, ungrouped top-2: experts 0 (0.9) and 1 (0.8) are chosen; weight shares 9/17, 8/17
FLAT_SCORES = [[0.9, 0.8, 0.7, 0.6, 0.15, 0.14, 0.13, 0.12]]


def test_keep_all_experts_agrees_everywhere():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(200, 32, generator=g), torch.randn(16, 32, generator=g), torch.rand(16, generator=g)
    grouped = Routing(top_k=4, n_group=4, topk_group=2, scaling=2.5)
    got = layer_drift(x, weight, bias, list(range(16)), grouped, grouped)
    assert got == {"tokens": 200, "agree": 200, "kept_mass": pytest.approx(200.0), "same_topk": 200}
    # keeping all but collapsing the groups changes routing for some tokens: the test can fail
    collapsed = layer_drift(x, weight, bias, list(range(16)), grouped, Routing(4, 1, 1, 2.5))
    assert collapsed["kept_mass"] == pytest.approx(200.0) and collapsed["agree"] < 200


@pytest.mark.parametrize("kept, agree, same, mass", [
    ([0, 1, 4, 5], 1, 1, 1.0),  # exactly the used experts (plus others) kept
    ([0, 1], 1, 1, 1.0),  # exactly the used experts
    ([1, 2, 3, 4], 1, 0, 8 / 17),  # 0 pruned, 2 enters: 1 is still chosen
    ([0, 3, 5, 7], 1, 0, 9 / 17),  # 1 pruned, 3 enters
    ([2, 3, 4, 5], 1, 0, 0.0),  # both pruned: vacuous agreement, no mass kept
])
def test_flat_routing_by_hand(kept, agree, same, mass):
    x, weight, bias = identity_router(FLAT_SCORES)
    got = layer_drift(x, weight, bias, kept, FLAT, FLAT)
    assert (got["tokens"], got["agree"], got["same_topk"]) == (1, agree, same)
    assert got["kept_mass"] == pytest.approx(mass, abs=1e-6)


@pytest.mark.parametrize("routing", [FLAT, Routing(top_k=2, n_group=1, topk_group=1, scaling=1.0, normalize=False)])
def test_bias_picks_mass_uses_unbiased_scores(routing):
    # bias +0.5 on expert 3: choice 0.9, 0.8, 0.7, 1.1 -> top-2 {3, 0}, weights 0.6 and 0.9
    # (the share does not depend on renormalisation or scaling)
    x, weight, bias = identity_router(FLAT_SCORES, bias=[0, 0, 0, 0.5, 0, 0, 0, 0])
    got = layer_drift(x, weight, bias, [1, 2, 3, 4], routing, routing)  # 0 pruned: pruned top-2 {3, 1}
    assert (got["agree"], got["same_topk"]) == (1, 0)
    assert got["kept_mass"] == pytest.approx(0.6 / 1.5, abs=1e-6)


def test_pruned_groups_can_lose_a_kept_chosen_expert():
    """Original: group 1 wins (1.19 vs 1.1), top-2 = {4, 5}. Kept 2 per group: [0, 1 | 4, 6 | 8, 9
    | 12, 13]; with 5 gone, group 1 of the pruned router scores 0.6 + 0.1 = 0.7 and loses to group
    0 (0.9 + 0.2): pruned top-2 = {0, 1}, so kept expert 4 is dropped -> disagreement."""
    kept = [0, 1, 4, 6, 8, 9, 12, 13]
    original = Routing(top_k=2, n_group=4, topk_group=1, scaling=2.5)
    x, weight, bias = identity_router([GROUPED])
    got = layer_drift(x, weight, bias, kept, original, original)
    assert (got["tokens"], got["agree"], got["same_topk"]) == (1, 0, 0)
    assert got["kept_mass"] == pytest.approx(0.6 / 1.19, abs=1e-6)  # 4 carried 0.6 of 1.19
    # collapse (n_group' = topk_group' = 1): top-2 over kept = {0, 4} -> agrees
    got = layer_drift(x, weight, bias, kept, original, Routing(2, 1, 1, 2.5))
    assert (got["agree"], got["same_topk"]) == (1, 0) and got["kept_mass"] == pytest.approx(0.6 / 1.19, abs=1e-6)
    # pruned topk_group' = 2: groups 0 and 1 stay, top-2 = {0, 4} -> agrees
    got = layer_drift(x, weight, bias, kept, original, Routing(2, 4, 2, 2.5))
    assert got["agree"] == 1


def test_kept_ids_are_renumbered_in_listed_order():
    """The pruned router's new id j is kept_ids[j]: a wrong mapping back breaks agreement."""
    x, weight, bias = identity_router(FLAT_SCORES)
    got = layer_drift(x, weight, bias, [7, 1, 0, 5], FLAT, FLAT)
    assert (got["agree"], got["same_topk"]) == (1, 1)


def test_sums_add_over_tokens_and_empty_input():
    kept = [0, 1, 4, 6, 8, 9, 12, 13]
    grouped = Routing(2, 4, 1, 2.5)
    padded_flat = [FLAT_SCORES[0] + [0.011] * 8]  # 16 experts; extra ones never chosen
    x, weight, bias = identity_router([GROUPED, padded_flat[0], GROUPED])
    got = layer_drift(x, weight, bias, kept, grouped, grouped)
    # token 2 (flat scores over 16 experts, 4 groups): group 0 (0.9+0.8) wins, chosen {0, 1}, both kept
    assert got["tokens"] == 3 and got["agree"] == 1 and got["same_topk"] == 1
    assert got["kept_mass"] == pytest.approx(2 * 0.6 / 1.19 + 1.0, abs=1e-6)
    empty = layer_drift(torch.zeros(0, 16), weight, bias, kept, grouped, grouped)
    assert empty == {"tokens": 0, "agree": 0, "kept_mass": 0.0, "same_topk": 0}


def test_megatron_routing_map_cross_check():
    x, weight, bias = identity_router(FLAT_SCORES)
    right = torch.zeros(1, 8, dtype=torch.bool)
    right[0, [0, 1]] = True
    assert layer_drift(x, weight, bias, [0, 1], FLAT, FLAT, megatron_routing_map=right)["megatron_mismatch"] == 0
    wrong = torch.zeros(1, 8, dtype=torch.bool)
    wrong[0, [0, 2]] = True
    assert layer_drift(x, weight, bias, [0, 1], FLAT, FLAT, megatron_routing_map=wrong)["megatron_mismatch"] == 1
    with pytest.raises(ValueError, match="distinct"):
        layer_drift(x, weight, bias, [0, 0], FLAT, FLAT)


# --------------------------------------------------------------------------------------------
# end to end: exports, CLI runs (started concurrently), transformers as the independent check
# --------------------------------------------------------------------------------------------

DEMO_IDS = [
    [3, 17, 92, 45, 201, 7, 66, 311, 12, 5, 480, 33],
    list(range(100, 131)),  # 31 tokens: truncated to MAX_LENGTH
    [9, 8, 7],
    [400, 12, 77, 250, 250, 1, 90, 333, 41, 18, 222, 149, 8, 64, 500, 321, 11],
    [57],
]
MAX_LENGTH = 24


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _spawn(cmd):
    # own session: a leftover torchrun and its ranks can be stopped as one process group
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=_env(), start_new_session=True)


@pytest.fixture(scope="module")
def e2e(tiny_checkpoint_factory, tmp_path_factory):
    from megatron_easyep.pruning.export import export_pruned
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.checkpoint.io import write_score_file
    from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint

    root = tmp_path_factory.mktemp("drift")
    src = tiny_checkpoint_factory(num_nextn_predict_layers=1)
    config = DeepseekV3Config.load(src)
    layers = [*config.moe_layer_ids, *config.mtp_layer_ids]
    rows = torch.rand(len(layers), 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    write_score_file(root / "scores", {"gate": rows}, layers, config.config_hash, [])
    scores = load_scores(root / "scores")
    half = select_for_checkpoint(scores, config, keep=8, metric="gate")
    dst_all = export_pruned(src, root / "all", select_for_checkpoint(scores, config, keep=16, metric="gate")).path
    dst_half = export_pruned(src, root / "half", half).path

    (root / "a.jsonl").write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in DEMO_IDS[:3]))
    (root / "b.jsonl").write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in DEMO_IDS[3:]))
    demo_args = ["--demos", root / "a.jsonl", "--demos", f"{root / 'b.jsonl'}:heldout", "--max-length", MAX_LENGTH]

    foreign = root / "foreign"  # the half export, claiming another source checkpoint
    shutil.copytree(dst_half, foreign)
    record = json.loads((foreign / "pruning.json").read_text())
    record["source"]["config_hash"] = "0" * 64
    (foreign / "pruning.json").write_text(json.dumps(record))

    procs = {
        "half": _spawn([*HALF_LAUNCHER, CLI, "--hf-checkpoint", src, "--pruned", dst_half,
                        "--expert-parallel", HALF_EP, *demo_args]),
        # keep=all on one plain process, explicit --output
        "all": _spawn([PYTHON, CLI, "--hf-checkpoint", src, "--pruned", dst_all, "--output",
                       root / "all-drift.json", *demo_args]),
        "foreign": _spawn([PYTHON, CLI, "--hf-checkpoint", src, "--pruned", foreign, *demo_args]),
    }
    try:
        # the independent transformers computation runs here, while the CLI processes work
        expected = _transformers_drift(src, dst_half, half.kept, config.moe_layer_ids)
        yield dict(root=root, src=src, config=config, dst_all=dst_all, dst_half=dst_half, half=half,
                   foreign=foreign, procs=procs, results={}, expected=expected)
    finally:
        for proc in procs.values():  # only if a test stopped before collecting it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


def _result(e2e, name):
    if name not in e2e["results"]:
        out, err = e2e["procs"][name].communicate(timeout=LAUNCH_TIMEOUT)
        e2e["results"][name] = (e2e["procs"][name].returncode, out, err)
    return e2e["results"][name]


def _report(e2e, name, path):
    rc, out, err = _result(e2e, name)
    assert rc == 0, f"{name} failed (exit {rc}):\n{err[-4000:]}\n{out[-2000:]}"
    assert "mean" in out and "skipped" in out
    return json.loads(Path(path).read_text())


def _expected_tokens():
    return sum(min(len(ids), MAX_LENGTH) for ids in DEMO_IDS)


@torch.no_grad()
def _transformers_drift(src, pruned_dir, kept: dict[int, tuple[int, ...]], moe_layers):
    """Per layer (tokens, agree, kept mass sum) from stock transformers routers, in plain Python."""
    from hf_oracle import load_transformers_model

    original = load_transformers_model(src)
    pruned = load_transformers_model(pruned_dir)
    seen = {}
    handles = [original.model.layers[layer].mlp.gate.register_forward_hook(
        lambda module, args, output, layer=layer: seen.__setitem__(layer, (args[0], output)))
        for layer in moe_layers]
    totals = {layer: [0, 0, 0.0] for layer in moe_layers}
    try:
        for ids in DEMO_IDS:
            ids = ids[:MAX_LENGTH]
            original(torch.tensor([ids]))
            for layer in moe_layers:
                hidden, (_, weights, indices) = seen[layer]
                _, _, pruned_indices = pruned.model.layers[layer].mlp.gate(hidden)
                assert indices.shape[0] == len(ids)
                for t in range(len(ids)):
                    chosen = indices[t].tolist()
                    g = dict(zip(chosen, weights[t].tolist()))
                    pruned_chosen = {kept[layer][j] for j in pruned_indices[t].tolist()}
                    still_kept = [e for e in chosen if e in kept[layer]]
                    totals[layer][0] += 1
                    totals[layer][1] += all(e in pruned_chosen for e in still_kept)
                    totals[layer][2] += sum(g[e] for e in still_kept) / sum(g.values())
    finally:
        for handle in handles:
            handle.remove()
    return totals


def test_keep_all_reports_no_drift(e2e):
    report = _report(e2e, "all", e2e["root"] / "all-drift.json")
    assert not (e2e["dst_all"] / "routing_drift.json").exists()  # --output was given
    moe = e2e["config"].moe_layer_ids
    assert sorted(report["layers"], key=int) == [str(layer) for layer in moe]
    for layer in report["layers"].values():
        assert layer["tokens"] == _expected_tokens()
        assert layer["agree_fraction"] == 1.0 and layer["same_topk_fraction"] == 1.0
        assert layer["kept_gate_mass"] == pytest.approx(1.0, abs=1e-12)
    assert report["mean"]["agree_fraction"] == 1.0
    assert report["skipped_layers"] == {"3": "MTP layer: not part of the Megatron model, not measured"}
    assert report["megatron_routing_mismatched_tokens"] == 0
    assert report["layout"]["world_size"] == 1


def test_keep_half_matches_transformers(e2e):
    moe = e2e["config"].moe_layer_ids
    expected = e2e["expected"]
    report = _report(e2e, "half", e2e["dst_half"] / "routing_drift.json")
    assert not [p for p in e2e["dst_half"].iterdir() if p.name.startswith(".")], "temp file left behind"
    assert report["layout"]["world_size"] == HALF_EP and report["layout"]["expert_parallel"] == HALF_EP
    assert report["megatron_routing_mismatched_tokens"] == 0
    assert report["pruned_routing"]["n_group"] == 4 and report["group_policy"] == "equal-per-group"
    assert "3" in report["skipped_layers"]
    for layer in moe:
        tokens, agree, mass = expected[layer]
        got = report["layers"][str(layer)]
        assert got["tokens"] == tokens == _expected_tokens()
        assert round(got["agree_fraction"] * tokens) == agree, (layer, got, expected[layer])
        assert got["kept_gate_mass"] == pytest.approx(mass / tokens, abs=1e-5)
        assert got["kept_experts"] == 8
    assert report["mean"]["agree_fraction"] < 1.0 and report["mean"]["kept_gate_mass"] < 1.0
    mean = sum(expected[layer][1] / expected[layer][0] for layer in moe) / len(moe)
    assert report["mean"]["agree_fraction"] == pytest.approx(mean, abs=1e-12)


def test_foreign_export_is_refused(e2e):
    rc, out, err = _result(e2e, "foreign")
    assert rc == 2, err[-3000:]
    assert "error:" in err and "different checkpoint" in err and "Traceback" not in err
    assert not (e2e["foreign"] / "routing_drift.json").exists()


def test_plan_checks(e2e, tmp_path):
    plan = load_pruned_plan(e2e["src"], e2e["dst_half"])
    assert plan.kept == e2e["half"].kept and plan.pruned.n_group == 4 and plan.original.top_k == 4
    with pytest.raises(RoutingDriftError, match="pruning.json"):
        load_pruned_plan(e2e["src"], e2e["src"])  # not an export
    broken = tmp_path / "broken"
    shutil.copytree(e2e["dst_half"], broken)
    record = json.loads((broken / "pruning.json").read_text())
    del record["kept_experts"]["1"]
    (broken / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(RoutingDriftError, match=r"MoE layer\(s\) \[1\]"):
        load_pruned_plan(e2e["src"], broken)
    record["kept_experts"]["1"] = list(range(6))
    (broken / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(RoutingDriftError, match="n_routed_experts=8"):
        load_pruned_plan(e2e["src"], broken)


def test_disabled_slots_count_as_pruned():
    """A C-Prune `disable` export keeps expert 0's weights but gives it bias -1e4: the pruned
    router must skip it exactly as if it were not kept."""
    x, weight, bias = identity_router(FLAT_SCORES)
    as_pruned = layer_drift(x, weight, bias, [1, 2, 3, 4], FLAT, FLAT)
    disabled = layer_drift(x, weight, bias, [0, 1, 2, 3, 4], FLAT, FLAT, disabled_ids=(0,))
    assert disabled == as_pruned
    assert disabled["kept_mass"] == pytest.approx(8 / 17, abs=1e-6)
    # without the disable, expert 0 is routed again and nothing drifts
    enabled = layer_drift(x, weight, bias, [0, 1, 2, 3, 4], FLAT, FLAT)
    assert enabled["kept_mass"] == pytest.approx(1.0, abs=1e-6)
