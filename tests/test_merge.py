"""Merging instead of dropping (pruning/merge.py), checked against oracles written here.

- The plan (which kept expert each dropped one joins, and the weights) is recomputed in numpy from
  the raw score tensors, features and router rows this file wrote.
- Merged weights are recomputed in float64 from the source checkpoint read through safetensors
  and dequantised by tests/hf_oracle.py's block loop, with this file's own neuron alignment.
- FP8 re-quantisation is compared byte for byte with DeepSeek's rule written here as a block loop
  (scale = amax / 448, e4m3), on shapes that leave partial edge blocks and with an all-zero block.
- Router rows (`-router-average`): the cluster's weighted average of the source rows, in float64
  here, within one bf16 ulp; unmerged rows and every bias byte-identical.
- Logits: stock transformers on the export against the ORIGINAL model whose kept experts (and,
  with `-router-average`, router rows) were overwritten in memory with this file's merge and whose
  routing only reaches the kept experts.
"""

from __future__ import annotations

import json
import re
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from hf_oracle import dequantize_blockwise_reference, load_transformers_model, read_checkpoint_tensors
from test_export import masked_router_forward
from megatron_easyep.checkpoint.io import write_score_file
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint
from megatron_easyep.pruning.export import export_pruned
from megatron_easyep.pruning.merge import MergeError, MergePlan, MergeRule, plan_merge
from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint

REPO = Path(__file__).resolve().parents[1]
E, N_GROUP, GROUP = 16, 4, 4
KEEP = 8
MTP_LAYER = 3
BLOCK = [24, 20]  # experts are [32, 64] / [64, 32]: partial edge blocks in both dimensions
DEMOS = 3
DOMAINS, DOMAIN_WEIGHTS = ["math", "code"], [1.0, 2.0]
ZERO_GROUP_LAYER = 1  # group 3 of this layer gets zero frequency: its clusters use equal weights
PROJ = ("gate_proj", "up_proj", "down_proj")
INPUT_IDS = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _raw_scores(layers) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    rows = lambda: torch.rand(len(layers), E, generator=g, dtype=torch.float64) + 0.05  # noqa: E731
    out = {f"{m}{suffix}": rows() for m in ("easyep", "frequency") for suffix in ("", "@math", "@code")}
    for suffix in ("@math", "@code"):
        out[f"frequency{suffix}"][layers.index(ZERO_GROUP_LAYER), 12:16] = 0.0
    return out


def _write_features(path: Path, layers) -> np.ndarray:
    g = torch.Generator().manual_seed(12)
    features = torch.randn(len(layers), E, DEMOS, 64, generator=g)
    save_file({"features": features}, str(path))
    return features.numpy()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-sources")
    out = {}
    for kind in ("bf16", "fp8"):
        extra = dict(fp8=True, weight_block_size=BLOCK) if kind == "fp8" else {}
        src = make_tiny_checkpoint(root / kind, "tiny", num_nextn_predict_layers=1, seed=4, **extra)
        config = DeepseekV3Config.load(src)
        layers = config.moe_layer_ids
        raw = _raw_scores(layers)
        scores_dir = write_score_file(root / f"{kind}-scores", raw, layers, config.config_hash, DOMAINS)
        features = _write_features(scores_dir / "cprune_features.safetensors", layers)
        out[kind] = dict(src=src, config=config, layers=layers, raw=raw, scores=scores_dir, features=features)
    return out


def selection_for(source, policy="equal-per-group", metric="easyep"):
    return select_for_checkpoint(load_scores(source["scores"]), source["config"], keep=KEEP, metric=metric,
                                 domains=DOMAINS, domain_weights=DOMAIN_WEIGHTS, group_policy=policy)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------
# the oracle, independent of megatron_easyep
# --------------------------------------------------------------------------------------------


def oracle_mixed_rows(raw, metric) -> np.ndarray:
    """Σ_d weight_d · row_d / ||row_d||_1 per layer (a zero row contributes nothing)."""
    total = 0
    for domain, weight in zip(DOMAINS, DOMAIN_WEIGHTS):
        rows = raw[f"{metric}@{domain}"].numpy()
        norms = np.abs(rows).sum(axis=1, keepdims=True)
        total = total + weight * np.where(norms > 0, rows / np.where(norms > 0, norms, 1), 0)
    return total


def oracle_cosine(vectors: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit @ unit.T


def oracle_plan(source, selection, rule: MergeRule) -> dict:
    """layer -> kept id -> [(member, weight)], recomputed from what this file wrote."""
    stored = read_checkpoint_tensors(source["src"])
    weights = oracle_mixed_rows(source["raw"], "frequency" if rule.weights == "frequency" else "easyep")
    plan = {}
    for row, layer in enumerate(source["layers"]):
        if rule.assign == "output":
            sim = oracle_cosine(source["features"][row].reshape(E, -1))
        else:
            sim = oracle_cosine(stored[f"model.layers.{layer}.mlp.gate.weight"].float().numpy())
        kept = list(selection.kept[layer])
        members = {k: [k] for k in kept}
        for d in range(E):
            if d in kept:
                continue
            pool = [k for k in kept if selection.group_policy == "collapse" or k // GROUP == d // GROUP]
            best = max(pool, key=lambda k: (sim[d, k], -k))
            members[best].append(d)
        plan[layer] = {}
        for k, ids in members.items():
            if len(ids) == 1:
                continue
            w = weights[row, ids]
            w = np.full(len(ids), 1 / len(ids)) if w.sum() == 0 else w / w.sum()
            plan[layer][k] = list(zip(ids, w.tolist()))
    return plan


def oracle_experts(ckpt: Path) -> dict[str, np.ndarray]:
    """Every expert weight of a checkpoint in float64, FP8 dequantised by hf_oracle's block loop."""
    config = json.loads((ckpt / "config.json").read_text())
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    tensors = read_checkpoint_tensors(ckpt)
    out = {}
    for name, t in tensors.items():
        if ".experts." not in name or not name.endswith(".weight"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = dequantize_blockwise_reference(t, tensors[name + "_scale_inv"], block)
        out[name] = t.double().numpy()
    return out


def expert(weights, layer, i) -> dict[str, np.ndarray]:
    return {p: weights[f"model.layers.{layer}.mlp.experts.{i}.{p}.weight"] for p in PROJ}


def oracle_align(reference, other) -> dict[str, np.ndarray]:
    """M-SMoE weight matching: the neuron order of `other` that best matches `reference`'s
    concatenated gate/up rows (max Σ inner products), applied to gate/up rows and down columns."""
    score = np.hstack([reference["gate_proj"], reference["up_proj"]]) @ \
        np.hstack([other["gate_proj"], other["up_proj"]]).T
    rows, cols = linear_sum_assignment(-score)
    order = cols[np.argsort(rows)]
    return {"gate_proj": other["gate_proj"][order], "up_proj": other["up_proj"][order],
            "down_proj": other["down_proj"][:, order]}


def oracle_merge(weights, layer, members, align: bool) -> dict[str, np.ndarray]:
    """Σ_i w_i W_i in float64, with the weights as the fp32 numbers an fp32 merge multiplies by
    (equal thirds of bf16 weights hit bf16 rounding ties exactly in float64; 1/3 in fp32 does not)."""
    reference = expert(weights, layer, members[0][0])
    total = {p: np.zeros_like(reference[p]) for p in PROJ}
    for i, w in members:
        e = expert(weights, layer, i)
        if align and i != members[0][0]:
            e = oracle_align(reference, e)
        for p in PROJ:
            total[p] += float(np.float32(w)) * e[p]
    return total


def oracle_router_rows(stored, layer, members) -> np.ndarray:
    """Σ_i w_i r_i of the members' source router rows, in float64 with the fp32 weights."""
    rows = stored[f"model.layers.{layer}.mlp.gate.weight"].double().numpy()
    return sum(float(np.float32(w)) * rows[i] for i, w in members)


def deepseek_requant(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's rule as a block loop: per block scale = amax / 448, q = (block / scale) in e4m3,
    stored weight_scale_inv = scale; partial edge blocks cover what exists."""
    b0, b1 = block
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float()
            s = part.abs().max() / 448.0
            scale[i, j] = s
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (part / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def stored_rounding(value: np.ndarray, kind: str, block) -> torch.Tensor:
    """What storing `value` in the checkpoint's format gives back, as fp32."""
    t = torch.from_numpy(value).float()
    if kind == "bf16":
        return t.to(torch.bfloat16).float()
    q, s = deepseek_requant(t, block)
    return dequantize_blockwise_reference(q, s, block)


# --------------------------------------------------------------------------------------------
# must show: hand-computed merged weights (both weightings, with and without alignment)
# --------------------------------------------------------------------------------------------

RULES = [("bf16", "output-frequency", "equal-per-group"), ("bf16", "router-score-aligned", "equal-per-group"),
         ("fp8", "output-score", "collapse"), ("fp8", "router-frequency-aligned", "equal-per-group")]


@pytest.mark.parametrize("kind,label,policy", RULES)
def test_merged_weights_equal_the_hand_computed_merge(sources, tmp_path, kind, label, policy):
    source = sources[kind]
    rule = MergeRule.parse(label)
    selection = selection_for(source, policy)
    plan = plan_merge(source["src"], selection, load_scores(source["scores"]), rule, features=source["features"])

    expected_plan = oracle_plan(source, selection, rule)
    assert {layer: {k: [m for m, _ in ms] for k, ms in by_kept.items()} for layer, by_kept in plan.clusters.items()} \
        == {layer: {k: [m for m, _ in ms] for k, ms in by_kept.items()} for layer, by_kept in expected_plan.items()}
    for layer, by_kept in expected_plan.items():
        for k, members in by_kept.items():
            assert np.allclose([w for _, w in plan.clusters[layer][k]], [w for _, w in members], atol=1e-12)
    if rule.weights == "frequency" and policy == "equal-per-group":
        zero = [k for k in selection.kept[ZERO_GROUP_LAYER] if k // GROUP == 3 and k in plan.clusters[ZERO_GROUP_LAYER]]
        assert zero and list(plan.equal_weight_clusters[ZERO_GROUP_LAYER]) == zero
    assert MTP_LAYER not in plan.clusters and MTP_LAYER in plan.skipped_layers

    dst = export_pruned(source["src"], tmp_path / "merged", selection, merge=plan).path
    original, merged = oracle_experts(source["src"]), oracle_experts(dst)
    src_stored, out_stored = read_checkpoint_tensors(source["src"]), read_checkpoint_tensors(dst)
    record = json.loads((dst / "pruning.json").read_text())["merge"]
    assert record["rule"] == label and record["router_rule"] == "keep" and record["router"].startswith("keep:")
    untouched = 0
    for layer in (*source["layers"], MTP_LAYER):
        for new, k in enumerate(selection.kept[layer]):
            members = expected_plan.get(layer, {}).get(k)
            if members is None:  # no assignee: the bytes of the source, scales included
                untouched += 1
                for name in [n for n in src_stored if f"layers.{layer}.mlp.experts.{k}." in n]:
                    out_name = name.replace(f"experts.{k}.", f"experts.{new}.")
                    assert raw_bytes(out_stored[out_name]) == raw_bytes(src_stored[name]), out_name
                continue
            want = oracle_merge(original, layer, members, rule.align)
            got = expert(merged, layer, new)
            for p in PROJ:
                diff = np.abs(got[p] - want[p])
                if kind == "bf16":  # one bf16 ulp (a rounding tie may go either way in fp32), plus the
                    # fp32 sum's own rounding where the terms cancel to ~0
                    bound = np.abs(want[p]) * 2.0 ** -7 + 1e-7
                else:  # half an e4m3 step of the block's scale (3 mantissa bits, subnormals 2^-9)
                    scales = out_stored[f"model.layers.{layer}.mlp.experts.{new}.{p}.weight_scale_inv"].double().numpy()
                    per = np.repeat(np.repeat(scales, BLOCK[0], 0), BLOCK[1], 1)[:want[p].shape[0], :want[p].shape[1]]
                    bound = np.abs(want[p]) * 2.0 ** -4 + per * 2.0 ** -9 + 1e-12
                assert (diff <= bound).all(), f"layer {layer} expert {k} {p}: max excess {(diff - bound).max():.3g}"
                relative = np.linalg.norm(got[p] - want[p]) / np.linalg.norm(want[p])
                assert abs(record["requantization_error"][str(layer)][str(k)][p] - relative) < 1e-4
        router = f"model.layers.{layer}.mlp.gate.weight"
        assert raw_bytes(out_stored[router]) == raw_bytes(src_stored[router][list(selection.kept[layer])])
    assert untouched > 0, "the fixture should leave some kept experts without assignees"


# --------------------------------------------------------------------------------------------
# router rows: keep (default) or average
# --------------------------------------------------------------------------------------------


def test_merge_rule_labels_round_trip():
    rules = [MergeRule(a, w, al, r) for a in ("output", "router") for w in ("frequency", "score")
             for al in (False, True) for r in ("keep", "average")]
    assert len({rule.label for rule in rules}) == 16
    for rule in rules:
        assert MergeRule.parse(rule.label) == rule, rule.label
    # the default labels are unchanged; the router rule is a suffix
    assert MergeRule("output", "frequency").label == "output-frequency"
    assert MergeRule("router", "score", True).label == "router-score-aligned"
    assert MergeRule.parse("output-frequency-router-average") == MergeRule("output", "frequency", False, "average")
    assert MergeRule.parse("router-score-aligned-router-average") == MergeRule("router", "score", True, "average")
    for bad in ("output-frequency-router-median", "router-average", "output-frequency-router-average-aligned"):
        with pytest.raises(MergeError, match="unknown merge rule"):
            MergeRule.parse(bad)
    with pytest.raises(MergeError, match="unknown merge router rule 'mean'"):
        MergeRule("output", "frequency", router="mean")


@pytest.mark.parametrize("kind,label,policy", [("bf16", "router-score-router-average", "equal-per-group"),
                                               ("fp8", "output-frequency-aligned-router-average", "collapse")])
def test_router_average_rows_are_the_hand_computed_average(sources, tmp_path, kind, label, policy):
    source = sources[kind]
    rule = MergeRule.parse(label)
    selection = selection_for(source, policy)
    scores = load_scores(source["scores"])
    plan = plan_merge(source["src"], selection, scores, rule, features=source["features"])
    kept_plan = plan_merge(source["src"], selection, scores, MergeRule(rule.assign, rule.weights, rule.align),
                           features=source["features"])
    averaged = export_pruned(source["src"], tmp_path / "average", selection, merge=plan).path
    kept = export_pruned(source["src"], tmp_path / "keep", selection, merge=kept_plan).path
    src_stored, out, out_keep = (read_checkpoint_tensors(p) for p in (source["src"], averaged, kept))
    record = json.loads((averaged / "pruning.json").read_text())["merge"]
    assert record["rule"] == label and record["router_rule"] == "average" and record["router"].startswith("average:")

    expected_plan = oracle_plan(source, selection, rule)
    averaged_rows = unmerged_rows = 0
    for layer in (*source["layers"], MTP_LAYER):  # the MTP layer (no score row) is pruned: rows unchanged
        router, bias = f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        kept_ids = list(selection.kept[layer])
        assert raw_bytes(out[bias]) == raw_bytes(src_stored[bias][kept_ids]), "the bias stays the source's"
        for new, k in enumerate(kept_ids):
            members = expected_plan.get(layer, {}).get(k) if layer != MTP_LAYER else None
            got = out[router][new]
            if members is None:
                unmerged_rows += 1
                assert raw_bytes(got) == raw_bytes(src_stored[router][k]), f"layer {layer} row of {k}"
                continue
            averaged_rows += 1
            want = oracle_router_rows(src_stored, layer, members)
            # one bf16 ulp (the fp32 sum may round a tie either way), plus the fp32 sum's own rounding
            bound = np.abs(want) * 2.0 ** -7 + 1e-7
            assert (np.abs(got.double().numpy() - want) <= bound).all(), f"layer {layer} row of {k}"
            assert raw_bytes(got) != raw_bytes(src_stored[router][k]), "averaging should move the row"
            source_row = src_stored[router][k].double().numpy()
            assert abs(record["router_row_change"][str(layer)][str(k)]
                       - np.linalg.norm(want - source_row) / np.linalg.norm(source_row)) < 1e-2
        # the experts are merged exactly as under router 'keep'
        for name in [n for n in out if f"layers.{layer}.mlp.experts." in n]:
            assert raw_bytes(out[name]) == raw_bytes(out_keep[name]), name
        assert raw_bytes(out_keep[router]) == raw_bytes(src_stored[router][kept_ids])
    assert averaged_rows > 0 and unmerged_rows > 0, "the fixture should have both kinds of kept rows"
    assert set(out) == set(out_keep)


# --------------------------------------------------------------------------------------------
# must show: a permuted copy merged with alignment is the expert itself
# --------------------------------------------------------------------------------------------


def _edited_copy(src: Path, dst: Path, edits: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint `src` with some tensors replaced (same names, dtypes and shapes)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted({index[name] for name in edits}):
        tensors = load_file(dst / shard)
        for name, value in edits.items():
            if index[name] == shard:
                assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
                tensors[name] = value.contiguous()
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
    return dst


def test_a_permuted_copy_merged_with_alignment_is_the_expert_itself(sources, tmp_path):
    source = sources["bf16"]
    layer, kept_id, copy_id, other_kept, other_dropped = 1, 0, 2, 1, 3
    stored = read_checkpoint_tensors(source["src"])
    name = lambda i, p: f"model.layers.{layer}.mlp.experts.{i}.{p}.weight"  # noqa: E731
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))
    router = stored[f"model.layers.{layer}.mlp.gate.weight"].clone()
    router[copy_id], router[other_dropped] = router[kept_id], router[other_kept]  # cosine 1 to their partners
    edits = {name(copy_id, "gate_proj"): stored[name(kept_id, "gate_proj")][perm],
             name(copy_id, "up_proj"): stored[name(kept_id, "up_proj")][perm],
             name(copy_id, "down_proj"): stored[name(kept_id, "down_proj")][:, perm],
             f"model.layers.{layer}.mlp.gate.weight": router}
    src = _edited_copy(source["src"], tmp_path / "src", edits)
    config = DeepseekV3Config.load(src)
    raw = {k: v.clone() for k, v in source["raw"].items()}
    for key in ("easyep@math", "easyep@code"):  # keep experts 0, 1 of group 0 (and 2 of every group)
        raw[key][:, :] = torch.tensor([3.0, 3.0, 1.0, 1.0] * 4, dtype=torch.float64)
    scores = load_scores(write_score_file(tmp_path / "scores", raw, config.moe_layer_ids, config.config_hash, DOMAINS))
    selection = select_for_checkpoint(scores, config, keep=KEEP, metric="easyep", domains=DOMAINS,
                                      domain_weights=DOMAIN_WEIGHTS)
    assert selection.kept[layer][:2] == (kept_id, other_kept)

    out = {}
    for align in (True, False):
        plan = plan_merge(src, selection, scores, MergeRule("router", "frequency", align))
        assert [m for m, _ in plan.clusters[layer][kept_id]] == [kept_id, copy_id]
        dst = export_pruned(src, tmp_path / f"align-{align}", selection, merge=plan).path
        out[align] = read_checkpoint_tensors(dst)
    for p in PROJ:
        assert raw_bytes(out[True][name(0, p)]) == raw_bytes(stored[name(kept_id, p)]), p
        assert raw_bytes(out[False][name(0, p)]) != raw_bytes(stored[name(kept_id, p)]), "alignment should matter"


# --------------------------------------------------------------------------------------------
# must show: re-quantised FP8 blocks follow DeepSeek's rule bit for bit
# --------------------------------------------------------------------------------------------


def test_requantised_fp8_blocks_match_deepseeks_rule_bit_for_bit(sources, tmp_path):
    source = sources["fp8"]
    selection = selection_for(source)
    layer = source["layers"][0]
    kept_id = selection.kept[layer][0]
    dropped = [d for d in range(E) if d not in selection.kept[layer] and d // GROUP == kept_id // GROUP]
    members = ((kept_id, 0.5), (dropped[0], 0.25), (dropped[1], 0.25))  # powers of two: fp32 sums are exact
    stored = read_checkpoint_tensors(source["src"])
    gate = lambda i: f"model.layers.{layer}.mlp.experts.{i}.gate_proj.weight"  # noqa: E731
    edits = {}
    for i, _ in members:  # the first block of every member's gate_proj zero: the merged block is all zero
        q = stored[gate(i)].clone()
        q.view(torch.uint8)[:BLOCK[0], :BLOCK[1]] = 0
        edits[gate(i)] = q
    src = _edited_copy(source["src"], tmp_path / "src", edits)
    plan = MergePlan(rule=MergeRule("router", "frequency"), clusters={layer: {kept_id: members}},
                     kept=selection.kept, config_hash=source["config"].config_hash, weight_source="this test")
    dst = export_pruned(src, tmp_path / "merged", selection, merge=plan).path

    before, after = read_checkpoint_tensors(src), read_checkpoint_tensors(dst)
    new = selection.kept[layer].index(kept_id)
    for p in PROJ:
        weight = f"model.layers.{layer}.mlp.experts.{{}}.{p}.weight"
        merged = None
        for i, w in members:  # dequantise in fp32 (q * scale_inv), sum in the members' order
            q, s = before[weight.format(i)], before[weight.format(i) + "_scale_inv"]
            full = s.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:q.shape[0], :q.shape[1]]
            term = q.float() * full * w
            merged = term if merged is None else merged + term
        q, scale = deepseek_requant(merged, BLOCK)
        got_q, got_s = after[weight.format(new)], after[weight.format(new) + "_scale_inv"]
        assert got_q.shape == q.shape and got_s.shape == scale.shape
        assert q.shape[0] % BLOCK[0] and q.shape[1] % BLOCK[1], "the shapes should leave partial edge blocks"
        if p == "gate_proj":  # the all-zero block: zero codes, a finite positive scale (not 0/0)
            assert not merged[:BLOCK[0], :BLOCK[1]].any()
            assert not raw_bytes(got_q[:BLOCK[0], :BLOCK[1]]).strip(b"\0")
            assert 0 < got_s[0, 0].item() < 1e-10
            q[:BLOCK[0], :BLOCK[1]], scale[0, 0] = got_q[:BLOCK[0], :BLOCK[1]], got_s[0, 0]
        assert raw_bytes(got_q) == raw_bytes(q), f"{p}: FP8 codes differ from DeepSeek's rule"
        assert raw_bytes(got_s) == raw_bytes(scale), f"{p}: weight_scale_inv differs from DeepSeek's rule"


# --------------------------------------------------------------------------------------------
# must show: the exported logits equal the original with its experts merged in memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,label", [("bf16", "output-frequency-aligned"), ("fp8", "router-score"),
                                        ("fp8", "router-score-router-average")])
def test_logits_equal_the_in_memory_merged_original(sources, tmp_path, kind, label):
    source = sources[kind]
    selection = selection_for(source)
    rule = MergeRule.parse(label)
    plan = plan_merge(source["src"], selection, load_scores(source["scores"]), rule, features=source["features"])
    dst = export_pruned(source["src"], tmp_path / "merged", selection, merge=plan, mtp="drop").path
    record = json.loads((dst / "pruning.json").read_text())["merge"]
    clusters = {int(layer): {int(k): [(m, w) for m, w in ms] for k, ms in by_kept.items()}
                for layer, by_kept in record["clusters"].items()}
    assert set(clusters) == set(source["layers"])

    model = load_transformers_model(source["src"])
    weights = oracle_experts(source["src"])
    stored = read_checkpoint_tensors(source["src"])
    with torch.no_grad():
        for layer in source["layers"]:
            mlp = model.model.layers[layer].mlp
            mlp.gate.forward = lambda x, g=mlp.gate, ids=selection.kept[layer]: \
                masked_router_forward(g, ids, N_GROUP, 2, x)
        pruned_only = model(INPUT_IDS).logits
        for layer, by_kept in clusters.items():
            experts = model.model.layers[layer].mlp.experts
            for k, members in by_kept.items():
                merged = {p: stored_rounding(v, kind, BLOCK) for p, v in
                          oracle_merge(weights, layer, members, rule.align).items()}
                experts.gate_up_proj[k] = torch.cat([merged["gate_proj"], merged["up_proj"]])
                experts.down_proj[k] = merged["down_proj"]
        experts_only = model(INPUT_IDS).logits
        if rule.router == "average":  # each merged kept expert's row: the cluster's average, as stored
            for layer, by_kept in clusters.items():
                gate = model.model.layers[layer].mlp.gate
                for k, members in by_kept.items():
                    row = oracle_router_rows(stored, layer, members)
                    gate.weight[k] = torch.from_numpy(row).to(stored[f"model.layers.{layer}.mlp.gate.weight"].dtype)
        expected = model(INPUT_IDS).logits
        actual = load_transformers_model(dst)(INPUT_IDS).logits
    # bf16: an equal-weight cluster's average of bf16 weights often lands exactly on a bf16 rounding
    # tie, which the fp32 merge may round either way (one ulp on ~1% of that expert's elements:
    # ~3e-4 in these logits); merging itself moves them by ~2
    tolerance = 1e-3 if kind == "bf16" else 1e-4
    assert (actual - expected).abs().max().item() <= tolerance
    assert (actual - pruned_only).abs().max().item() > 0.1, "merging should change the pruned model"
    if rule.router == "average":
        assert (expected - experts_only).abs().max().item() > 0.1, "averaged router rows should change the logits"


# --------------------------------------------------------------------------------------------
# chaining with finalize (--rebalance-bias), bad input, the CLI
# --------------------------------------------------------------------------------------------


def test_finalize_sees_the_merged_experts(sources, tmp_path):
    """--rebalance-bias is export_pruned's finalize: it must run on the merged staged checkpoint."""
    source = sources["bf16"]
    selection = selection_for(source)
    plan = plan_merge(source["src"], selection, load_scores(source["scores"]), MergeRule("router", "frequency"))
    layer = source["layers"][0]
    kept_id = next(iter(plan.clusters[layer]))
    name = f"model.layers.{layer}.mlp.experts.{selection.kept[layer].index(kept_id)}.up_proj.weight"
    seen = {}

    def finalize(staging, pruning, log):
        seen["merge"] = "merge" in pruning
        seen["bytes"] = raw_bytes(read_checkpoint_tensors(staging)[name])

    dst = export_pruned(source["src"], tmp_path / "out", selection, merge=plan, finalize=finalize).path
    assert seen["merge"] and seen["bytes"] == raw_bytes(read_checkpoint_tensors(dst)[name])
    assert seen["bytes"] != raw_bytes(read_checkpoint_tensors(source["src"])[f"model.layers.{layer}.mlp.experts."
                                                                             f"{kept_id}.up_proj.weight"])


def _refused(call, parent: Path, match):
    before = sorted(p.name for p in parent.iterdir())
    with pytest.raises(ValueError, match=match):
        call()
    assert sorted(p.name for p in parent.iterdir()) == before, "nothing may be written on error"


def test_bad_input_is_refused_before_anything_is_written(sources, tmp_path):
    source = sources["bf16"]
    selection = selection_for(source)
    scores = load_scores(source["scores"])
    src, dst = source["src"], tmp_path / "out"
    with pytest.raises(MergeError, match=r"unknown merge rule 'output-often'.*router-score-aligned"):
        MergeRule.parse("output-often")
    with pytest.raises(MergeError, match="unknown merge assignment"):
        MergeRule("input", "frequency")
    _refused(lambda: plan_merge(src, selection, scores, "output-frequency"), tmp_path, "needs the C-Prune features")
    wrong = source["features"][:, :, :, :32]
    _refused(lambda: plan_merge(src, selection, scores, "output-frequency", features=wrong), tmp_path,
             r"shape \[2, 16, 3, 32\].*hidden_size = 64")
    _refused(lambda: plan_merge(src, selection, scores, "output-frequency", features=source["features"][:1]),
             tmp_path, r"layers of scores.json = 2")
    random_selection = selection_for(source, metric="random")
    _refused(lambda: plan_merge(src, random_selection, scores, "router-score"), tmp_path, "use weights 'frequency'")
    # a plan for another selection: refused by the export before its output exists
    plan = plan_merge(src, selection, scores, "router-frequency")
    other = selection_for(source, policy="collapse")
    _refused(lambda: export_pruned(src, dst, other, merge=plan), tmp_path, "not the export's selection")
    layer = next(iter(plan.clusters))
    kept_id = next(iter(plan.clusters[layer]))
    bad = {**plan.clusters, layer: {**plan.clusters[layer], kept_id: ((kept_id, 0.9), (kept_id + 100, 0.1))}}
    _refused(lambda: export_pruned(src, dst, selection, merge=MergePlan(**{**plan.__dict__, "clusters": bad})),
             tmp_path, "assignees must be distinct dropped experts")


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "converters" / "export_pruned.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_merge(sources, tmp_path):
    source = sources["fp8"]
    common = ("--hf-checkpoint", source["src"], "--scores", source["scores"], "--keep", KEEP, "--metric", "easyep",
              "--domains", ",".join(DOMAINS), "--domain-weights", "1,2")
    run = _cli(*common, "--output", tmp_path / "out", "--merge", "output-frequency-aligned")
    assert run.returncode == 0, run.stderr
    assert "merged (output-frequency-aligned)" in run.stdout
    members = sum(len(ms) for v in json.loads((tmp_path / "out" / "pruning.json").read_text())["merge"]["clusters"]
                  .values() for ms in v.values())
    assert re.search(rf"merge .*\b{members}/{members} experts", run.stderr), run.stderr  # the final progress line
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())["merge"]
    expected = oracle_plan(source, selection_for(source), MergeRule.parse("output-frequency-aligned"))
    assert {int(l): {int(k): [m for m, _ in ms] for k, ms in v.items()} for l, v in record["clusters"].items()} == \
        {l: {k: [m for m, _ in ms] for k, ms in v.items()} for l, v in expected.items()}

    wrong = tmp_path / "wrong.safetensors"
    save_file({"features": torch.zeros(2, E, DEMOS, 8)}, str(wrong))
    failed = _cli(*common, "--output", tmp_path / "nothing", "--merge", "output-score", "--cprune-features", wrong)
    assert failed.returncode == 2 and "hidden_size = 64" in failed.stderr, failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wrong.safetensors"]


def test_a_scored_mtp_layer_is_merged_and_dropped_with_it(sources, tmp_path):
    """An MTP layer with a score row (and features) is merged like any layer; with mtp='drop' its
    clusters go with it (recorded), and the main layers are merged the same way."""
    source = sources["bf16"]
    config = source["config"]
    layers = [*source["layers"], MTP_LAYER]
    scores = load_scores(write_score_file(tmp_path / "scores", _raw_scores(layers), layers, config.config_hash,
                                          DOMAINS))
    features = torch.randn(len(layers), E, DEMOS, 64, generator=torch.Generator().manual_seed(2)).numpy()
    selection = select_for_checkpoint(scores, config, keep=KEEP, metric="easyep", domains=DOMAINS)
    assert selection.fallback_layers == ()
    plan = plan_merge(source["src"], selection, scores, "output-score", features=features)
    assert plan.clusters[MTP_LAYER] and not plan.skipped_layers

    kept_id = next(iter(plan.clusters[MTP_LAYER]))
    name = f"model.layers.{MTP_LAYER}.mlp.experts.{{}}.down_proj.weight"
    pruned = read_checkpoint_tensors(export_pruned(source["src"], tmp_path / "prune", selection, merge=plan).path)
    new = selection.kept[MTP_LAYER].index(kept_id)
    want = oracle_merge(oracle_experts(source["src"]), MTP_LAYER, plan.clusters[MTP_LAYER][kept_id], False)
    assert np.allclose(pruned[name.format(new)].double().numpy(), want["down_proj"], rtol=2 ** -7, atol=1e-7)

    dropped = export_pruned(source["src"], tmp_path / "drop", selection, merge=plan, mtp="drop").path
    record = json.loads((dropped / "pruning.json").read_text())["merge"]
    assert str(MTP_LAYER) not in record["clusters"] and "dropped" in record["skipped_layers"][str(MTP_LAYER)]
    main = f"model.layers.{source['layers'][0]}.mlp.experts.0.up_proj.weight"
    assert raw_bytes(read_checkpoint_tensors(dropped)[main]) == raw_bytes(pruned[main])
