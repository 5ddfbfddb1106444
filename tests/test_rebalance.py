"""--rebalance-bias: DeepSeek's aux-loss-free rule re-fitting the kept experts' correction bias.

* The rule on synthetic routers with known loads (every load counted here by an independent
  per-token loop): it converges to equal loads within the stated tolerance, under plain and
  group-limited top-k, leaves a balanced layer alone and never touches disabled slots.
* End to end on a tiny checkpoint: `converters/export_pruned.py --rebalance-bias` (Megatron-Core,
  one process), then stock transformers routes the exported model over the same demonstrations:
  its per-expert loads are exactly the ones pruning.json claims (before: the plain export's; after:
  the rebalanced export's), and the only bytes that differ from the plain export are the kept
  rows of the MoE layers' e_score_correction_bias.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_easyep.analysis.rebalance import fit_expert_bias

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
EXPORT_CLI = REPO / "converters" / "export_pruned.py"
TIMEOUT = 300
# stated tolerance of the synthetic convergence: busiest expert within 3% of the mean
TOLERANCE = 1.03


# --------------------------------------------------------------------------------------------
# the rule on synthetic routers
# --------------------------------------------------------------------------------------------

def loads_by_hand(choice: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> list[int]:
    """Per-token DeepSeek-V3 routing in plain Python: a group scores the sum of its two best
    choice scores, the topk_group best groups stay, top_k over their experts."""
    num_experts = choice.shape[1]
    size = num_experts // n_group
    loads = [0] * num_experts
    for row in choice.tolist():
        groups = sorted(range(n_group), key=lambda g: -sum(sorted(row[g * size:(g + 1) * size])[-2:]))
        allowed = [e for g in groups[:topk_group] for e in range(g * size, (g + 1) * size)]
        for e in sorted(allowed, key=lambda e: -row[e])[:top_k]:
            loads[e] += 1
    return loads


def skewed_scores(tokens: int, experts: int, seed: int) -> torch.Tensor:
    """Sigmoid scores where expert e's logit is shifted by a known, decreasing offset: expert 0
    is the busiest, the last ones nearly idle."""
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(tokens, experts, generator=g) + torch.linspace(2.0, -2.0, experts))


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_rule_converges_to_equal_loads(n_group, topk_group):
    scores = skewed_scores(1200, 16, seed=n_group)
    start = torch.zeros(16)
    before = loads_by_hand(scores + start, 4, n_group, topk_group)
    assert max(before) / (sum(before) / 16) > 2.5  # badly unbalanced to begin with
    fit = fit_expert_bias(scores, start, top_k=4, n_group=n_group, topk_group=topk_group,
                          step=1e-3, iterations=500)
    after = loads_by_hand(scores + fit.bias, 4, n_group, topk_group)
    assert sum(after) == 1200 * 4
    assert max(after) / (sum(after) / 16) <= TOLERANCE, after
    assert fit.loads.tolist() == after  # what the fit reports is what routing gives
    assert fit.load_history[0].tolist() == before
    assert fit.max_over_mean_history[fit.iteration] == min(fit.max_over_mean_history)
    # the busiest expert was pushed down, the idlest up
    assert fit.bias[0] < 0 < fit.bias[-1]


def test_rule_follows_the_sign_update_exactly():
    scores = skewed_scores(300, 8, seed=5)
    fit = fit_expert_bias(scores, torch.zeros(8), top_k=2, step=0.01, iterations=3)
    bias, biases = torch.zeros(8), []
    for it in range(4):  # the rule, written out
        loads = loads_by_hand(scores + bias, 2, 1, 1)
        assert fit.load_history[it].tolist() == loads
        biases.append(bias)
        mean = sum(loads) / 8
        bias = bias + torch.tensor([0.01 * ((mean > l) - (mean < l)) for l in loads])
    ratios = [_ratio(loads) for loads in fit.load_history.tolist()]
    assert fit.iteration == ratios.index(min(ratios))  # the best iterate, the first on ties
    assert torch.allclose(fit.bias, biases[fit.iteration], atol=1e-6)


def test_balanced_layer_is_left_alone():
    # every token scores the experts in a rotated order: loads are exactly equal from the start
    base = torch.linspace(0.9, 0.1, 8)
    scores = torch.stack([base.roll(t % 8) for t in range(64)])
    start = torch.full((8,), 0.05)  # the same for every expert: no effect on the choice
    fit = fit_expert_bias(scores, start, top_k=2, step=1e-3, iterations=50)
    assert fit.iteration == 0 and torch.equal(fit.bias, start)
    assert fit.loads.tolist() == [16] * 8


def test_disabled_slots_keep_their_bias_and_count_in_no_mean():
    scores = skewed_scores(800, 8, seed=9)
    start = torch.zeros(8)
    start[5] = -1e4  # a disabled slot, never routed
    enabled = torch.ones(8, dtype=torch.bool)
    enabled[5] = False
    fit = fit_expert_bias(scores, start, top_k=2, step=1e-3, iterations=400, enabled=enabled)
    assert fit.bias[5] == -1e4
    after = loads_by_hand(scores + fit.bias, 2, 1, 1)
    assert after[5] == 0
    live = [l for e, l in enumerate(after) if e != 5]
    assert max(live) / (sum(live) / 7) <= TOLERANCE, after


def test_rule_rejects_bad_input():
    with pytest.raises(ValueError, match="step"):
        fit_expert_bias(torch.rand(4, 8), torch.zeros(8), top_k=2, step=0.0)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        fit_expert_bias(torch.rand(4, 8), torch.zeros(7), top_k=2)


# --------------------------------------------------------------------------------------------
# end to end: Megatron fit, transformers routing of the exported model
# --------------------------------------------------------------------------------------------

def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _spawn(cmd):
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=_env(), start_new_session=True)


def _run(cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=TIMEOUT)


# A library run: collapse policy (n_group 1) with one disabled slot per MoE layer, which the
# CLI cannot ask for (C-Prune's uneven layouts make them).
_DISABLED_RUN = """
import dataclasses, json, sys
from megatron_easyep.analysis.rebalance import RebalanceRequest
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.export import export_pruned
from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint
src, scores, dst, demos = sys.argv[1:5]
config = DeepseekV3Config.load(src)
sel = select_for_checkpoint(load_scores(scores), config, keep=8, metric="gate", group_policy="collapse")
sel = dataclasses.replace(sel, disabled={layer: (sel.kept[layer][1],) for layer in config.moe_layer_ids})
prepared = RebalanceRequest((demos,), step=2e-3, iterations=300).prepare(src)
export_pruned(src, dst, sel, finalize=prepared.finalize)
"""


@pytest.fixture(scope="module")
def e2e(tiny_checkpoint_factory, tmp_path_factory):
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.pruning.export import export_pruned
    from megatron_easyep.checkpoint.io import write_score_file
    from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint

    root = tmp_path_factory.mktemp("rebalance")
    src = tiny_checkpoint_factory(num_nextn_predict_layers=1)
    config = DeepseekV3Config.load(src)
    layers = [*config.moe_layer_ids, *config.mtp_layer_ids]
    rows = torch.rand(len(layers), 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    write_score_file(root / "scores", {"gate": rows}, layers, config.config_hash, [])
    scores = load_scores(root / "scores")
    selection = select_for_checkpoint(scores, config, keep=12, metric="gate")
    plain = export_pruned(src, root / "plain", selection).path
    g = torch.Generator().manual_seed(3)
    demo_ids = [torch.randint(0, config.vocab_size, (int(n),), generator=g).tolist()
                for n in torch.randint(20, 48, (10,), generator=g)]
    demos = root / "calib.jsonl"
    demos.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in demo_ids))
    heldout_ids = [torch.randint(0, config.vocab_size, (30,), generator=g).tolist() for _ in range(4)]
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in heldout_ids))
    procs = {
        "cli": _spawn([PYTHON, EXPORT_CLI, "--hf-checkpoint", src, "--scores", root / "scores", "--output",
                       root / "rebalanced", "--keep", 12, "--metric", "gate", "--rebalance-bias",
                       "--demos", f"{demos}:math", "--rebalance-steps", 400,
                       "--rebalance-heldout", f"{heldout}:math"]),
        "disabled": _spawn([PYTHON, "-c", _DISABLED_RUN, src, root / "scores", root / "disabled", demos]),
    }
    try:
        yield dict(root=root, src=src, config=config, plain=plain, demos=demos, demo_ids=demo_ids,
                   heldout=heldout, heldout_ids=heldout_ids,
                   selection=selection, procs=procs, results={})
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.communicate()


def _result(e2e, name):
    if name not in e2e["results"]:
        proc = e2e["procs"][name]
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{err[-4000:]}\n{out[-2000:]}"
        e2e["results"][name] = (out, err)
    return e2e["results"][name]


def _tensors(ckpt_dir) -> dict[str, bytes]:
    """name -> (dtype, shape, raw bytes), straight from safetensors."""
    index = json.loads((Path(ckpt_dir) / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(Path(ckpt_dir) / shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@torch.no_grad()
def _transformers_loads(ckpt_dir, demo_ids, moe_layers) -> dict[int, list[int]]:
    """Per MoE layer, tokens stock transformers routes to each expert over the demonstrations."""
    from hf_oracle import load_transformers_model

    model = load_transformers_model(ckpt_dir)
    num_experts = model.config.n_routed_experts
    loads = {layer: [0] * num_experts for layer in moe_layers}

    def hook(module, args, output, layer):
        for e in output[-1].reshape(-1).tolist():  # (logits, weights, indices)
            loads[layer][e] += 1

    handles = [model.model.layers[layer].mlp.gate.register_forward_hook(
        lambda m, a, o, layer=layer: hook(m, a, o, layer)) for layer in moe_layers]
    try:
        for ids in demo_ids:
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return loads


def _ratio(loads, enabled=None):
    live = [l for e, l in enumerate(loads) if enabled is None or e in enabled]
    return max(live) / (sum(live) / len(live))


def test_cli_rebalanced_loads_match_transformers(e2e):
    out, _ = _result(e2e, "cli")
    dst = e2e["root"] / "rebalanced"
    assert not [p for p in e2e["root"].iterdir() if p.name.startswith(".rebalanced")], "staging left behind"
    record = json.loads((dst / "pruning.json").read_text())["rebalance_bias"]
    moe = e2e["config"].moe_layer_ids
    assert record["step"] == 1e-3 and record["iterations"] == 400
    assert record["demos"] == [{"file": str(e2e["demos"]), "domain": "math",
                                "sha256": hashlib.sha256(e2e["demos"].read_bytes()).hexdigest()}]
    assert record["tokens"] == sum(len(ids) for ids in e2e["demo_ids"])
    assert sorted(record["per_layer"], key=int) == [str(layer) for layer in moe]
    assert record["skipped_layers"] == {"3": "MTP layer: not part of the Megatron model; bias kept as exported"}

    after = _transformers_loads(dst, e2e["demo_ids"], moe)
    before = _transformers_loads(e2e["plain"], e2e["demo_ids"], moe)
    for layer in moe:
        row = record["per_layer"][str(layer)]
        assert row["loads_after"] == after[layer], layer
        assert row["loads_before"] == before[layer], layer
        assert row["max_over_mean_after"] == pytest.approx(_ratio(after[layer]), rel=1e-12)
        assert row["max_over_mean_before"] == pytest.approx(_ratio(before[layer]), rel=1e-12)
        assert row["megatron_vs_fit_load_difference"] == 0
        assert _ratio(after[layer]) < _ratio(before[layer])
        assert _ratio(after[layer]) <= 1.1, (layer, after[layer])
        assert f"layer {layer}: max/mean expert load on the demonstrations" in out


def test_heldout_loads_are_measured_not_fitted(e2e):
    out, _ = _result(e2e, "cli")
    record = json.loads((e2e["root"] / "rebalanced" / "pruning.json").read_text())["rebalance_bias"]
    held = record["heldout"]
    moe = e2e["config"].moe_layer_ids
    assert held["demos"][0]["sha256"] == hashlib.sha256(e2e["heldout"].read_bytes()).hexdigest()
    assert held["tokens"] == sum(len(ids) for ids in e2e["heldout_ids"])
    after = _transformers_loads(e2e["root"] / "rebalanced", e2e["heldout_ids"], moe)
    before = _transformers_loads(e2e["plain"], e2e["heldout_ids"], moe)
    for layer in moe:
        row = held["per_layer"][str(layer)]
        assert row["loads_before"] == before[layer] and row["loads_after"] == after[layer], layer
        assert row["max_over_mean_after"] == pytest.approx(_ratio(after[layer]), rel=1e-12)
        assert f"held out {row['max_over_mean_before']:.3f} -> {row['max_over_mean_after']:.3f}" in out


def test_only_the_moe_bias_bytes_change(e2e):
    _result(e2e, "cli")
    dst = e2e["root"] / "rebalanced"
    plain, rebalanced = _tensors(e2e["plain"]), _tensors(dst)
    assert plain.keys() == rebalanced.keys()
    bias_names = {f"model.layers.{layer}.mlp.gate.e_score_correction_bias" for layer in e2e["config"].moe_layer_ids}
    for name, (dtype, shape, data) in plain.items():
        got = rebalanced[name]
        assert got[:2] == (dtype, shape), name
        if name in bias_names:
            assert dtype == torch.float32 and got[2] != data, name
        else:
            assert got[2] == data, f"{name} changed"
    for name in ("config.json", "model.safetensors.index.json", "preflight.json"):
        assert (dst / name).read_bytes() == (e2e["plain"] / name).read_bytes(), name
    plain_record = json.loads((e2e["plain"] / "pruning.json").read_text())
    record = json.loads((dst / "pruning.json").read_text())
    assert {k: v for k, v in record.items() if k != "rebalance_bias"} == plain_record


def test_disabled_slots_stay_disabled_end_to_end(e2e):
    _result(e2e, "disabled")
    dst = e2e["root"] / "disabled"
    pruning = json.loads((dst / "pruning.json").read_text())
    record = pruning["rebalance_bias"]
    moe = e2e["config"].moe_layer_ids
    loads = _transformers_loads(dst, e2e["demo_ids"], moe)
    stored = _tensors(dst)
    for layer in moe:
        slot = pruning["kept_experts"][str(layer)].index(pruning["disabled_experts"][str(layer)][0])
        bias = torch.frombuffer(bytearray(stored[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][2]),
                                dtype=torch.float32)
        assert bias[slot] == pruning["disabled_bias"]
        assert loads[layer][slot] == 0
        row = record["per_layer"][str(layer)]
        assert row["loads_after"] == loads[layer]
        enabled = [e for e in range(8) if e != slot]
        assert row["max_over_mean_after"] == pytest.approx(_ratio(loads[layer], enabled), rel=1e-12)
        assert row["max_over_mean_after"] < row["max_over_mean_before"]


def _export_main():
    spec = importlib.util.spec_from_file_location("export_pruned_cli", EXPORT_CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_refuses_bad_requests_before_writing(e2e, tmp_path, capsys):
    common = ["--hf-checkpoint", e2e["src"], "--scores", e2e["root"] / "scores", "--keep", 12, "--metric", "gate"]
    cases = {
        "no_demos": (["--rebalance-bias"], "needs calibration demonstrations"),
        "bad_step": (["--rebalance-bias", "--demos", e2e["demos"], "--rebalance-step-size", "0"],
                     "--rebalance-step-size must be > 0"),
        "bad_steps": (["--rebalance-bias", "--demos", e2e["demos"], "--rebalance-steps", "0"],
                      "--rebalance-steps must be >= 1"),
        "demos_alone": (["--demos", e2e["demos"]], "are only used by --rebalance-bias"),
    }
    main = _export_main()  # in-process: each case fails before any model or output exists
    for case, (extra, message) in cases.items():
        out_dir = tmp_path / case
        try:
            code = main([str(a) for a in [*common, "--output", out_dir, *extra]])
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and message in err, (case, code, err[-2000:])
        assert not out_dir.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # and once as a real process: the exit status and a one-line message, no traceback
    result = _run([PYTHON, EXPORT_CLI, *common, "--output", tmp_path / "missing", "--rebalance-bias",
                   "--demos", tmp_path / "nope.jsonl"])
    assert result.returncode == 2 and "nope.jsonl does not exist" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "missing").exists()


def test_failed_finalize_publishes_nothing(e2e, tmp_path):
    from megatron_easyep.pruning.export import export_pruned

    def finalize(staging, pruning, log):
        assert (staging / "config.json").is_file() and "kept_experts" in pruning
        raise ValueError("fit failed")

    with pytest.raises(ValueError, match="fit failed"):
        export_pruned(e2e["src"], tmp_path / "out", e2e["selection"], finalize=finalize)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# multi-rank: the fit under torchrun (EP, PP x EP) against the one-process fit
# --------------------------------------------------------------------------------------------

TORCHRUN = str(Path(PYTHON).with_name("torchrun"))


def _bias_values(ckpt_dir, layers) -> dict[int, torch.Tensor]:
    stored = _tensors(ckpt_dir)
    return {layer: torch.frombuffer(bytearray(stored[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][2]),
                                    dtype=torch.float32) for layer in layers}


@pytest.mark.parametrize("nproc,layout", [(2, ["--expert-parallel", 2]),
                                          (4, ["--expert-parallel", 2, "--pipeline-parallel", 2])])
def test_multi_rank_fit_matches_one_process(e2e, nproc, layout):
    """The same CLI request as the one-process `cli` run, on 2 ranks (EP 2) and 4 ranks (PP 2 x EP 2):
    the same biases within 1e-6, the same loads and chosen iterates, and the same published bytes
    everywhere else."""
    _result(e2e, "cli")
    root, moe = e2e["root"], e2e["config"].moe_layer_ids
    dst = root / f"rebalanced_{nproc}"
    proc = _run([TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", EXPORT_CLI,
                 "--hf-checkpoint", e2e["src"], "--scores", root / "scores", "--output", dst, "--keep", 12,
                 "--metric", "gate", "--rebalance-bias", "--demos", f"{e2e['demos']}:math",
                 "--rebalance-steps", 400, "--rebalance-heldout", f"{e2e['heldout']}:math", *layout])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not [p for p in root.iterdir() if p.name.startswith(f".rebalanced_{nproc}")], "staging left behind"
    one, many = _bias_values(root / "rebalanced", moe), _bias_values(dst, moe)
    for layer in moe:
        assert (one[layer] - many[layer]).abs().max() <= 1e-6, (layer, one[layer], many[layer])
    ref = json.loads((root / "rebalanced" / "pruning.json").read_text())["rebalance_bias"]
    got = json.loads((dst / "pruning.json").read_text())["rebalance_bias"]
    for layer in map(str, moe):
        for key in ("loads_before", "loads_after", "chosen_iteration", "megatron_vs_fit_load_difference"):
            assert got["per_layer"][layer][key] == ref["per_layer"][layer][key], (layer, key)
        assert got["heldout"]["per_layer"][layer]["loads_after"] == ref["heldout"]["per_layer"][layer]["loads_after"]
    assert got["skipped_layers"] == ref["skipped_layers"] and got["tokens"] == ref["tokens"]
    plain, rebalanced = _tensors(root / "rebalanced"), _tensors(dst)
    assert plain.keys() == rebalanced.keys()
    for name, value in plain.items():
        if not name.endswith("e_score_correction_bias"):
            assert rebalanced[name] == value, name
