"""C-Prune: clustering on features with known structure, the global step, the exportable layout of
uneven counts, and end to end on a tiny checkpoint against stock transformers.

Synthetic features are built so that the right answer is known by construction: tight clusters
with far-apart centres, and inside a cluster members at +-r offsets (so the centroid is the centre)
with the smallest |r| the closest to the centroid. The end-to-end test scores a tiny checkpoint
with the real `launch/score.py --cprune-features`, runs the CLI with uneven counts + `disable`,
and checks the export in stock transformers: no token ever reaches a disabled slot, and the logits
equal the ORIGINAL model with every non-enabled expert masked out of routing (the oracle of
tests/test_export.py). The features themselves are checked against transformers' own experts run
on the mean of its post_attention_layernorm outputs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_oracle import load_transformers_model, read_checkpoint_tensors
from megatron_easyep.pruning import cprune
from megatron_easyep.scoring.demo_data import write_demo_files
from megatron_easyep.pruning.export import ExportError, export_pruned
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.selection import DISABLED_BIAS, SelectionError, selection_from_kept
from test_export import restore_routing, route_only_kept

REPO = Path(__file__).resolve().parents[1]


def _cluster_features(groups, offsets_by_batch, batch_size, hidden=8, centre_scale=100.0, noise=1e-4, seed=0):
    """[E, N, H] features: expert e of group k sits at centre_k + offset * u_k in every demo of a
    batch (offsets_by_batch[b][e]); centres are far apart, u_k orthogonal to every centre."""
    rng = np.random.default_rng(seed)
    num_experts = sum(len(g) for g in groups)
    num_batches = len(offsets_by_batch)
    feats = np.zeros((num_experts, num_batches * batch_size, hidden))
    for k, members in enumerate(groups):
        centre = np.zeros(hidden)
        centre[k % (hidden // 2)] = centre_scale * (1 + k // (hidden // 2))
        direction = np.zeros(hidden)
        direction[hidden // 2 + k % (hidden // 2)] = 1.0
        for b, offsets in enumerate(offsets_by_batch):
            for e in members:
                feats[e, b * batch_size : (b + 1) * batch_size] = centre + offsets[e] * direction
    return (feats + noise * rng.standard_normal(feats.shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the per-cluster quota
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,keep,expected", [
    ([4, 4, 4, 4], 8, [2, 2, 2, 2]),
    ([6, 4, 2], 6, [2, 2, 2]),        # the 2-cluster whole; 4 left: 1 + 1 base, then by spare capacity 5:3
    ([8, 8], 8, [4, 4]),
    ([10, 3, 3, 3], 4, [1, 1, 1, 1]),  # every large cluster keeps >= 1
    ([1, 2, 1, 5], 2, [1, 2, 1, 1]),   # small clusters whole even past the budget
    ([5, 3], 8, [5, 3]),               # never more than a cluster holds
    ([9, 5, 2], 7, [3, 2, 2]),
])
def test_cluster_quota(sizes, keep, expected):
    assert cprune.cluster_quota(sizes, keep).tolist() == expected


def test_cluster_quota_keeps_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 9, size=rng.integers(1, 8))
        keep = int(rng.integers(1, sizes.sum() + 1))
        quota = cprune.cluster_quota(sizes, keep)
        small = sizes[sizes < 3].sum()
        assert (quota <= sizes).all() and (quota >= 1).all()
        assert (quota[sizes < 3] == sizes[sizes < 3]).all()
        assert quota.sum() == min(sizes.sum(), max(keep, small + (sizes >= 3).sum())), (sizes, keep, quota)


# --------------------------------------------------------------------------------------------
# layer-wise clustering on known structure
# --------------------------------------------------------------------------------------------


def test_layer_votes_keep_the_experts_closest_to_each_centre():
    """4 clusters of 4 (ids interleaved), keep 8 -> 2 per cluster: the +-r1 pair of each cluster.
    Batches 0 and 1 put pair P nearest the centre, batch 2 the other pair Q: votes are 2 vs 1, so
    the layer keeps P although the last batch alone would keep Q."""
    groups = [[0, 5, 10, 15], [1, 6, 11, 12], [2, 7, 8, 13], [3, 4, 9, 14]]
    near_first = {}
    for members in groups:
        a, b, c, d = members
        near_first.update({a: 1.0, b: -1.0, c: 3.0, d: -3.0})
    near_last = {e: (3.0 if r > 0 else -3.0) if abs(r) == 1.0 else (1.0 if r > 0 else -1.0)
                 for e, r in near_first.items()}
    feats = _cluster_features(groups, [near_first, near_first, near_last], batch_size=2)
    votes = cprune.layer_votes(feats, keep=8, num_clusters=4, batch_size=2)
    assert votes.num_batches == 3
    expected = [2 if abs(near_first[e]) == 1.0 else 1 for e in range(16)]
    assert votes.votes.tolist() == expected
    # mean distance to the centroid: |r| * sqrt(batch of 2 demos), averaged over the batches
    mean_r = np.array([(2 * abs(near_first[e]) + abs(near_last[e])) / 3 for e in range(16)])
    assert np.allclose(votes.distance, mean_r * np.sqrt(2), rtol=1e-3)

    result = cprune.layerwise_selection(feats[None], 8, num_clusters=4, batch_size=2)
    pairs_p = sorted(e for e in range(16) if abs(near_first[e]) == 1.0)
    assert result.kept[0].tolist() == pairs_p
    assert sorted(result.ranking[0][:8].tolist()) == pairs_p
    # one batch of all 6 demos: distance sqrt(4*1 + 2*9) vs sqrt(4*9 + 2*1) -> the same experts
    single = cprune.layer_votes(feats, keep=8, num_clusters=4)
    assert single.num_batches == 1 and sorted(np.flatnonzero(single.votes).tolist()) == pairs_p
    # the last batch alone keeps the other pairs
    last = cprune.layer_votes(feats[:, 4:], keep=8, num_clusters=4)
    assert sorted(np.flatnonzero(last.votes).tolist()) == sorted(set(range(16)) - set(pairs_p))


def test_small_clusters_are_kept_whole():
    """Clusters of 6, 4 and 2 experts, keep 6: the 2-cluster is kept whole (both members, even the
    one farther from its centroid), the others keep their 2 closest."""
    groups = [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7], [9, 11]]
    offsets = {0: 1.0, 2: -1.0, 4: 2.0, 6: -2.0, 8: 3.0, 10: -3.0,
               1: 1.0, 3: -1.0, 5: 2.0, 7: -2.0,
               9: 4.0, 11: -4.0}
    feats = _cluster_features(groups, [offsets], batch_size=3)
    votes = cprune.layer_votes(feats, keep=6, num_clusters=3)
    assert np.flatnonzero(votes.votes).tolist() == [0, 1, 2, 3, 9, 11]
    # as many clusters as experts: every cluster is a singleton, kept whole (more than keep)
    votes = cprune.layer_votes(feats, keep=2, num_clusters=12)
    assert votes.votes.tolist() == [1] * 12


def test_ranking_ties():
    votes = cprune.Votes(votes=np.array([2, 2, 1, 2, 2]), distance=np.array([0.5, 0.1, 0.0, 0.5, 0.1]),
                         num_batches=2)
    assert votes.ranking().tolist() == [1, 4, 0, 3, 2]  # votes, then distance, then id


# --------------------------------------------------------------------------------------------
# global step: uneven counts, min and cap
# --------------------------------------------------------------------------------------------


def _two_layer_features():
    """Layer 0: four far-apart pairs (diverse); layer 1: one tight clump of 8 (redundant), the
    clump member nearest its centroid is expert 5. [2, 8, N=2, H=8]."""
    rng = np.random.default_rng(1)
    layer0 = np.zeros((8, 2, 8))
    for pair in range(4):
        centre = np.zeros(8)
        centre[pair] = 100.0
        layer0[2 * pair] = centre + 5.0 * np.eye(8)[4]
        layer0[2 * pair + 1] = centre - 5.0 * np.eye(8)[4]
    offsets = np.array([0.5, -0.5, 0.4, -0.4, 0.3, 0.05, -0.3, 0.25])
    layer1 = np.zeros((8, 2, 8))
    for e in range(8):
        layer1[e] = -100.0 * np.eye(8)[7] + offsets[e] * np.eye(8)[6]
    layer1[:, :, 5] = 0.01 * rng.standard_normal((8, 2))
    return np.stack([layer0, layer1]).astype(np.float32)


@pytest.mark.parametrize("kwargs,counts", [
    (dict(), [7, 1]),                      # the redundant layer keeps only its representative
    (dict(per_layer_cap=6), [6, 2]),       # the cap moves one slot to the other layer
    (dict(per_layer_min=3), [5, 3]),       # so does the minimum
])
def test_global_selection_gives_uneven_counts(kwargs, counts):
    feats = _two_layer_features()
    everyone = [np.arange(8), np.arange(8)]
    result = cprune.global_selection(feats, everyone, 8, num_clusters=5, batch_size=1, **kwargs)
    assert result.counts == counts and sum(result.counts) == 8
    assert [len(k) for k in result.kept] == counts
    # 5 clusters = 4 pairs (kept whole) + the clump (keeps its centroid-nearest member) in both batches
    voted = sorted(result.pool[i] for i in np.flatnonzero(result.votes.votes == 2))
    assert voted == [(0, e) for e in range(8)] + [(1, 5)]
    assert 5 in result.kept[1].tolist()


def test_global_selection_only_prunes_survivors_and_checks_bounds():
    feats = _two_layer_features()
    survivors = [np.array([0, 1, 2, 3, 6, 7]), np.array([0, 5, 7])]
    result = cprune.global_selection(feats, survivors, 6, num_clusters=4)
    for kept, alive in zip(result.kept, survivors):
        assert set(kept.tolist()) <= set(alive.tolist())
    assert sum(result.counts) == 6
    with pytest.raises(SelectionError, match="total keep"):
        cprune.global_selection(feats, survivors, 1, per_layer_min=1)
    with pytest.raises(SelectionError, match="fewer survivors"):
        cprune.global_selection(feats, survivors, 8, per_layer_min=4)
    with pytest.raises(SelectionError, match="total keep"):
        cprune.global_selection(feats, survivors, 7, per_layer_cap=3)


# --------------------------------------------------------------------------------------------
# exportable layout and the selection it becomes
# --------------------------------------------------------------------------------------------

ROUTING = dict(n_routed_experts=16, n_group=4, topk_group=2, top_k=4)  # the tiny preset's


def _rankings():
    rng = np.random.default_rng(3)
    return [rng.permutation(16).tolist(), rng.permutation(16).tolist()]


def test_layout_disable_and_equalize():
    rankings = _rankings()
    layout = cprune.exportable_layout(rankings, [5, 6], uneven="disable", group_policy="collapse", **ROUTING)
    assert layout.slots == 6 and layout.enabled_counts == [5, 6]
    assert layout.kept == [tuple(sorted(r[:6])) for r in rankings]
    assert layout.disabled == [(rankings[0][5],), ()]  # the next-best pruned expert, disabled
    layout = cprune.exportable_layout(rankings, [5, 6], uneven="equalize", group_policy="collapse", **ROUTING)
    assert layout.slots == 6 and layout.disabled == [(), ()] and layout.enabled_counts == [6, 6]
    # rounded up to what routing needs: target EP 4 -> 8 slots; top_k 4 -> a count of 3 becomes 4
    layout = cprune.exportable_layout(rankings, [3, 6], group_policy="collapse", target_ep=4, **ROUTING)
    assert layout.slots == 8 and layout.enabled_counts == [4, 6]
    assert [len(d) for d in layout.disabled] == [4, 2]

    # equal-per-group: counts 8 and 12 -> 2 and 3 per original group of 4; 12 slots everywhere
    layout = cprune.exportable_layout(rankings, [8, 12], group_policy="equal-per-group", **ROUTING)
    assert layout.slots == 12 and layout.enabled_counts == [8, 12]
    for g in range(4):
        in_group = [e for e in rankings[0] if e // 4 == g]
        assert [e for e in layout.kept[0] if e // 4 == g] == sorted(in_group[:3])
        assert [e for e in layout.disabled[0] if e // 4 == g] == [in_group[2]]
    assert layout.disabled[1] == ()


def test_selection_from_kept_validates(tiny_checkpoint_factory, tmp_path):
    config = DeepseekV3Config.load(tiny_checkpoint_factory())
    moe = config.moe_layer_ids
    kept = {moe[0]: (0, 1, 4, 5, 8, 9), moe[1]: (2, 3, 6, 7, 10, 11)}
    sel = selection_from_kept(config, kept, {moe[0]: (9,)}, group_policy="collapse", metric="cprune")
    assert (sel.keep, sel.n_group, sel.topk_group) == (6, 1, 1)
    assert sel.disabled == {moe[0]: (9,)} and sel.enabled(moe[0]) == (0, 1, 4, 5, 8)
    assert sel.to_json()["disabled_experts"] == {str(moe[0]): [9]}

    bad = [
        (dict(kept_by_layer={moe[0]: (0, 1, 2, 3, 4), moe[1]: kept[moe[1]]}), "same number of expert slots"),
        (dict(kept_by_layer={moe[0]: kept[moe[0]]}), "no kept experts for MoE layer"),
        (dict(disabled_by_layer={moe[0]: (2,)}), "not among the kept ids"),
        (dict(disabled_by_layer={moe[0]: (0, 1, 4)}), "top_k=4"),  # 3 enabled < top_k
        (dict(group_policy="equal-per-group"), "not a multiple of n_group"),
        (dict(kept_by_layer={layer: tuple(range(8)) for layer in moe}, group_policy="equal-per-group"),
         r"needs 2 kept experts in every original routing group, got \[4, 4, 0, 0\]"),
        (dict(target_ep=4), "not divisible by the target expert-parallel size 4"),
    ]
    for change, message in bad:
        args = dict(kept_by_layer=kept, disabled_by_layer=None, group_policy="collapse")
        args.update(change)
        with pytest.raises(SelectionError, match=message):
            selection_from_kept(config, args.pop("kept_by_layer"), args.pop("disabled_by_layer"),
                                metric="cprune", **args)
    # equal-per-group: 3 slots per group; a group left with one enabled expert is refused
    grouped = {layer: tuple(e for g in range(4) for e in (4 * g, 4 * g + 1, 4 * g + 2)) for layer in moe}
    ok = selection_from_kept(config, grouped, {moe[0]: (2, 6, 10, 14)}, group_policy="equal-per-group",
                             metric="cprune")
    assert (ok.n_group, ok.topk_group) == (4, 2)
    with pytest.raises(SelectionError, match="keeps 1 enabled expert"):
        selection_from_kept(config, grouped, {moe[0]: (1, 2)}, group_policy="equal-per-group", metric="cprune")
    # the exporter re-checks a hand-made Selection before writing anything
    forged = dataclasses.replace(sel, disabled={moe[0]: (0, 1, 4)})
    with pytest.raises(ExportError, match="top_k=4"):
        export_pruned(tiny_checkpoint_factory(), tmp_path / "never-written", forged)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# end to end: real scoring run -> CLI -> stock transformers
# --------------------------------------------------------------------------------------------


def _load_cli():
    spec = importlib.util.spec_from_file_location("cprune_select", REPO / "converters" / "cprune_select.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scored(tiny_checkpoint_factory, tmp_path_factory):
    """The tiny checkpoint scored with --cprune-features on 8 demos (4 math, 4 code)."""
    ckpt = tiny_checkpoint_factory()
    root = tmp_path_factory.mktemp("cprune")
    demos = write_demo_files(root / "demos", per_domain=4, heldout=1)
    out = root / "scores"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(REPO / "launch" / "score.py"), "--hf-checkpoint", str(ckpt), "--output", str(out),
           "--demos", f"{demos['math']}:math", "--demos", f"{demos['code']}:code", "--cprune-features"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"ckpt": ckpt, "scores": out, "demos": demos, "root": root}


def _demo_ids(ckpt, demos):
    """Token ids of every demo in the scoring order (math file, then code file), tokenised with
    transformers' own tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    out = []
    for name in ("math", "code"):
        for line in Path(demos[name]).read_text().splitlines():
            record = json.loads(line)
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["response"]}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            out.append(list(ids["input_ids"] if not isinstance(ids, list) else ids))
    return out


@pytest.fixture(scope="module")
def original(scored):
    return load_transformers_model(scored["ckpt"])


def test_features_match_transformers_experts(scored, original):
    """features[l, e, n] == expert e of layer l (transformers' fused experts module) applied to the
    mean over demo n's tokens of transformers' post_attention_layernorm output."""
    stored = load_file(scored["scores"] / "cprune_features.safetensors")
    layers = json.loads((scored["scores"] / "scores.json").read_text())["layers"]
    ids = _demo_ids(scored["ckpt"], scored["demos"])
    num_experts = original.config.n_routed_experts
    assert stored["features"].shape == (len(layers), num_experts, len(ids), original.config.hidden_size)
    captured = {}
    handles = [original.model.layers[layer].post_attention_layernorm.register_forward_hook(
        lambda module, args, output, layer=layer: captured.__setitem__(layer, output.detach()))
        for layer in layers]
    expected = torch.zeros_like(stored["features"])
    pooled = torch.zeros_like(stored["pooled_inputs"])
    try:
        with torch.no_grad():
            for n, demo in enumerate(ids):
                original(input_ids=torch.tensor([demo]), use_cache=False)
                for row, layer in enumerate(layers):
                    mean = captured[layer][0].float().mean(0)
                    pooled[row, n] = mean
                    experts = original.model.layers[layer].mlp.experts
                    for e in range(num_experts):
                        expected[row, e, n] = experts(mean[None], torch.tensor([[e]]), torch.ones(1, 1))[0]
    finally:
        for handle in handles:
            handle.remove()
    for name, want in (("features", expected), ("pooled_inputs", pooled)):
        err = (stored[name] - want).abs().max() / want.abs().max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
    # not a degenerate agreement: experts differ, demos differ
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-3
    assert (expected[:, :, 0] - expected[:, :, 1]).abs().max() > 1e-3


INPUT_IDS = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def test_cli_uneven_disable_routes_as_the_clustering_decided(scored, original, tmp_path):
    cli = _load_cli()
    dst = tmp_path / "pruned"
    # 2 MoE layers x keep 8 x 0.7 = 11 survivors: necessarily uneven across the 2 layers
    code = cli.main(["--hf-checkpoint", str(scored["ckpt"]), "--scores", str(scored["scores"]),
                     "--output", str(dst), "--keep", "8", "--global-keep-ratio", "0.7", "--batch-size", "2",
                     "--uneven", "disable", "--group-policy", "collapse"])
    assert code == 0
    record = json.loads((dst / "cprune.json").read_text())
    pruning = json.loads((dst / "pruning.json").read_text())
    config = DeepseekV3Config.load(scored["ckpt"])
    moe = config.moe_layer_ids
    counts = [record["global"]["counts"][str(layer)] for layer in moe]
    slots = max(counts)
    assert sum(counts) == 11 and counts[0] != counts[1]
    assert record["slots"] == slots == pruning["keep"] == json.loads((dst / "config.json").read_text())[
        "n_routed_experts"]
    kept = {layer: tuple(pruning["kept_experts"][str(layer)]) for layer in moe}
    disabled = {layer: tuple(pruning["disabled_experts"].get(str(layer), [])) for layer in moe}
    enabled = {layer: tuple(i for i in kept[layer] if i not in disabled[layer]) for layer in moe}
    for layer, count in zip(moe, counts):
        assert len(disabled[layer]) == slots - count
        assert list(enabled[layer]) == record["global"]["kept"][str(layer)]  # exactly the survivors
    assert any(disabled.values())

    # stored bias: disabled slots -1e4 (fp32), every other slot the source's bias
    before, after = read_checkpoint_tensors(scored["ckpt"]), read_checkpoint_tensors(dst)
    for layer in moe:
        name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        want = before[name][list(kept[layer])].clone()
        for i in disabled[layer]:
            want[kept[layer].index(i)] = DISABLED_BIAS
        assert after[name].dtype == torch.float32 and torch.equal(after[name], want)

    pruned = load_transformers_model(dst)
    routed = {layer: [] for layer in moe}
    handles = [pruned.model.layers[layer].mlp.gate.register_forward_hook(
        lambda module, args, output, layer=layer: routed[layer].append(output[2].flatten()))
        for layer in moe]
    inputs = [torch.tensor([d]) for d in _demo_ids(scored["ckpt"], scored["demos"])] + [INPUT_IDS]
    try:
        with torch.no_grad():
            actual = [pruned(input_ids=x).logits for x in inputs]
    finally:
        for handle in handles:
            handle.remove()
    for layer in moe:
        used = torch.cat(routed[layer]).unique().tolist()
        never = [kept[layer].index(i) for i in disabled[layer]]
        assert not set(used) & set(never), f"layer {layer}: a disabled slot was routed"
        assert len(used) == len(enabled[layer])  # and every enabled expert was used

    original_moe = {layer: original.model.layers[layer].mlp for layer in moe}
    try:
        route_only_kept(original_moe, enabled, 1, 1)
        with torch.no_grad():
            expected = [original(input_ids=x).logits for x in inputs]
        route_only_kept(original_moe, kept, 1, 1)  # the disabled slots left routable
        with torch.no_grad():
            leaky = [original(input_ids=x).logits for x in inputs]
    finally:
        restore_routing(original_moe)
    err = max((a - e).abs().max().item() for a, e in zip(actual, expected))
    assert err <= 1e-5, err
    assert max((a - e).abs().max().item() for a, e in zip(actual, leaky)) > 1e-3, "disabling should matter"


def test_cli_equalize_and_errors(scored, tmp_path, capsys):
    cli = _load_cli()
    base = ["--hf-checkpoint", str(scored["ckpt"]), "--scores", str(scored["scores"]), "--batch-size", "4"]
    dst = tmp_path / "equalized"
    assert cli.main([*base, "--output", str(dst), "--keep", "8", "--global-keep-ratio", "0.7",
                     "--uneven", "equalize", "--per-layer-cap", "6"]) == 0
    pruning = json.loads((dst / "pruning.json").read_text())
    record = json.loads((dst / "cprune.json").read_text())
    assert pruning["disabled_experts"] == {} and pruning["keep"] == 6
    assert sorted(record["global"]["counts"].values()) == [5, 6]
    # layer-wise only, equal-per-group: 2 per original group in every layer
    dst = tmp_path / "even"
    assert cli.main([*base, "--output", str(dst), "--keep", "8", "--group-policy", "equal-per-group"]) == 0
    pruning = json.loads((dst / "pruning.json").read_text())
    assert (pruning["keep"], pruning["n_group"], pruning["disabled_experts"]) == (8, 4, {})
    for ids in pruning["kept_experts"].values():
        assert [sum(1 for i in ids if i // 4 == g) for g in range(4)] == [2, 2, 2, 2]

    for args, message in [
        (["--keep", "6", "--group-policy", "equal-per-group"], "not a multiple of n_group"),
        (["--keep", "8", "--per-layer-cap", "6"], "needs --global-keep-ratio"),
        (["--keep", "8", "--global-keep-ratio", "0.1"], "total keep"),
    ]:
        capsys.readouterr()
        code = cli.main([*base, "--output", str(tmp_path / "nothing"), *args])
        stderr = capsys.readouterr().err
        assert code == 2 and message in stderr, stderr
        assert not (tmp_path / "nothing").exists()
