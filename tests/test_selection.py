"""Expert selection from a score file: policies, domain mixing, ties, random, feasibility.

The expected kept ids are computed here independently (plain Python sorting over lists), never
with megatron_easyep.pruning.selection's own helpers.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.pruning.selection import (
    Selection,
    SelectionError,
    keep_from_ratio,
    load_scores,
    select_experts,
    select_for_checkpoint,
)
from megatron_easyep.checkpoint.io import write_score_file
from megatron_easyep.checkpoint.tiny import build_config

E, N_GROUP, TOPK_GROUP, TOP_K = 16, 4, 2, 4
LAYERS = [1, 2]
HASH = "0" * 64


def python_top(scores: list[float], ids: list[int], count: int) -> list[int]:
    """The `count` best ids by score; equal scores: lower id first."""
    return sorted(ids, key=lambda i: (-scores[i], i))[:count]


def expected_equal_per_group(row: list[float], keep: int, n_group: int = N_GROUP) -> list[int]:
    size = len(row) // n_group
    kept = []
    for g in range(n_group):
        kept += python_top(row, list(range(g * size, (g + 1) * size)), keep // n_group)
    return sorted(kept)


def expected_collapse(row: list[float], keep: int) -> list[int]:
    return sorted(python_top(row, list(range(len(row))), keep))


def l1(row: list[float]) -> list[float]:
    total = sum(abs(v) for v in row)
    return [v / total for v in row] if total else [0.0] * len(row)


@pytest.fixture
def score_dir(tmp_path):
    g = torch.Generator().manual_seed(1)
    scores = {
        "easyep": torch.rand(2, E, generator=g, dtype=torch.float64),
        "easyep@math": torch.rand(2, E, generator=g, dtype=torch.float64),
        # a domain on a 1000x larger scale: raw sums would be dominated by it
        "easyep@code": 1000 * torch.rand(2, E, generator=g, dtype=torch.float64),
        "gate": torch.rand(2, E, generator=g, dtype=torch.float64),
        "gate@math": torch.rand(2, E, generator=g, dtype=torch.float64),
        "gate@code": torch.rand(2, E, generator=g, dtype=torch.float64),
    }
    write_score_file(tmp_path / "scores", scores, LAYERS, HASH, ["math", "code"], tokens={"all": 100})
    return tmp_path / "scores", scores


def select(scores, **kw):
    args = dict(keep=8, metric="easyep", n_group=N_GROUP, topk_group=TOPK_GROUP, top_k=TOP_K)
    args.update(kw)
    return select_experts(scores, **args)


def test_round_trip_and_provenance(score_dir):
    directory, written = score_dir
    loaded = load_scores(directory)
    assert loaded.layers == tuple(LAYERS)
    assert loaded.metrics == ("easyep", "gate") and loaded.domains == ("math", "code")
    assert loaded.config_hash == HASH and loaded.tokens == {"all": 100}
    for name, value in written.items():
        assert torch.equal(loaded.tensors[name], value)
    meta = json.loads((directory / "scores.json").read_text())
    assert meta["format"] == "megatron-easyep-scores/1"
    assert not [p for p in directory.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_equal_per_group_keeps_best_inside_every_group(score_dir):
    directory, written = score_dir
    selection = select(load_scores(directory), group_policy="equal-per-group")
    assert (selection.n_group, selection.topk_group) == (N_GROUP, TOPK_GROUP)
    for row_index, layer in enumerate(LAYERS):
        row = written["easyep"][row_index].tolist()
        assert list(selection.kept[layer]) == expected_equal_per_group(row, 8)


def test_collapse_keeps_global_top_and_drops_groups(tmp_path):
    # All the mass in groups 0 and 1: the global top-8 leaves groups 2 and 3 empty.
    row = [float(E - i) for i in range(E)]
    write_score_file(tmp_path, {"easyep": torch.tensor([row, row[::-1]], dtype=torch.float64)}, LAYERS, HASH, [])
    selection = select(load_scores(tmp_path), group_policy="collapse")
    assert (selection.n_group, selection.topk_group) == (1, 1)
    assert list(selection.kept[1]) == list(range(8))
    assert list(selection.kept[2]) == list(range(8, 16))
    grouped = select(load_scores(tmp_path), group_policy="equal-per-group")
    assert list(grouped.kept[1]) == [0, 1, 4, 5, 8, 9, 12, 13]


def test_ties_lower_id_wins(tmp_path):
    write_score_file(tmp_path, {"easyep": torch.ones(2, E, dtype=torch.float64)}, LAYERS, HASH, [])
    scores = load_scores(tmp_path)
    assert list(select(scores, group_policy="collapse").kept[1]) == list(range(8))
    assert list(select(scores, group_policy="equal-per-group").kept[1]) == [0, 1, 4, 5, 8, 9, 12, 13]


def test_mixed_domains_l1_normalise_per_domain_and_layer(score_dir):
    directory, written = score_dir
    scores = load_scores(directory)
    for weights in (None, (1.0, 3.0)):
        selection = select(scores, domains=["math", "code"], domain_weights=weights, group_policy="collapse")
        w = weights or (1.0, 1.0)
        for row_index, layer in enumerate(LAYERS):
            math_row = l1(written["easyep@math"][row_index].tolist())
            code_row = l1(written["easyep@code"][row_index].tolist())
            mixed = [w[0] * a + w[1] * b for a, b in zip(math_row, code_row)]
            assert list(selection.kept[layer]) == expected_collapse(mixed, 8)
    # Without normalisation the 1000x code domain would decide alone: check the test can tell.
    raw = [a + b for a, b in zip(written["easyep@math"][0].tolist(), written["easyep@code"][0].tolist())]
    normalised = select(scores, domains=["math", "code"], group_policy="collapse").kept[1]
    assert list(normalised) != expected_collapse(raw, 8)
    # One domain alone uses that domain's tensor, not the all-domains one.
    only_math = select(scores, domains=["math"], group_policy="collapse").kept[1]
    assert list(only_math) == expected_collapse(written["easyep@math"][0].tolist(), 8)


def test_random_is_seeded_and_respects_policy(score_dir):
    scores = load_scores(score_dir[0])
    first = select(scores, metric="random", seed=3)
    assert first.kept == select(scores, metric="random", seed=3).kept
    assert first.kept != select(scores, metric="random", seed=4).kept
    assert first.seed == 3
    for ids in first.kept.values():
        assert [sum(1 for i in ids if i // 4 == g) for g in range(N_GROUP)] == [2, 2, 2, 2]
    with_mtp = select(scores, metric="random", seed=3, fallback_layers=[3])
    assert sorted(with_mtp.kept) == [1, 2, 3] and with_mtp.fallback_layers == ()  # drawn, not a fallback
    collapsed = select(scores, metric="random", seed=3, group_policy="collapse", keep=6)
    assert all(len(ids) == 6 for ids in collapsed.kept.values())


def test_fallback_layer_sums_l1_normalised_rows(score_dir):
    directory, written = score_dir
    selection = select(load_scores(directory), group_policy="collapse", fallback_layers=[3])
    assert selection.fallback_layers == (3,)
    rows = [l1(written["easyep"][i].tolist()) for i in range(2)]
    summed = [a + b for a, b in zip(*rows)]
    assert list(selection.kept[3]) == expected_collapse(summed, 8)
    # A layer the file scores is never replaced by the fallback.
    scored = select(load_scores(directory), fallback_layers=[2])
    assert scored.fallback_layers == () and list(scored.kept[2]) == expected_equal_per_group(
        written["easyep"][1].tolist(), 8
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(keep=17), "larger than the 16 routed experts"),
        (dict(keep=0), "positive integer"),
        (dict(keep=6), "not a multiple of n_group=4"),
        (dict(keep=4), "at least 2 per group"),
        (dict(keep=8, top_k=5), "unreachable"),
        (dict(keep=3, group_policy="collapse"), "unreachable"),
        (dict(keep=8, target_ep=3), "target expert-parallel size 3"),
        (dict(metric="nope"), "unknown metric 'nope'"),
        (dict(domains=["math", "law"]), "unknown domain(s) ['law']"),
        (dict(domains=["math"], domain_weights=[1.0, 2.0]), "2 domain weights for 1 domains"),
        (dict(group_policy="pad"), "unknown group policy"),
    ],
)
def test_infeasible_requests_are_refused(score_dir, overrides, message):
    with pytest.raises(SelectionError) as err:
        select(load_scores(score_dir[0]), **overrides)
    assert message in str(err.value)


def test_feasible_edge_cases(score_dir):
    scores = load_scores(score_dir[0])
    assert all(len(ids) == E for ids in select(scores, keep=E).kept.values())
    assert select(scores, keep=8, target_ep=8).keep == 8
    assert select(scores, keep=4, group_policy="collapse").n_group == 1


def test_keep_ratio():
    assert keep_from_ratio(0.5, 256) == 128
    assert keep_from_ratio(1.0, 16) == 16
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(SelectionError):
            keep_from_ratio(bad, 16)


def test_select_for_checkpoint_checks_the_checkpoint(tmp_path):
    config = DeepseekV3Config.from_dict(build_config("tiny", num_nextn_predict_layers=1))
    rows = torch.rand(2, E, dtype=torch.float64)
    write_score_file(tmp_path / "ok", {"easyep": rows}, config.moe_layer_ids, config.config_hash, [])
    selection = select_for_checkpoint(load_scores(tmp_path / "ok"), config, keep_ratio=0.5, metric="easyep")
    assert isinstance(selection, Selection)
    assert sorted(selection.kept) == [1, 2, 3] and selection.fallback_layers == (3,)
    assert selection.config_hash == config.config_hash

    write_score_file(tmp_path / "other", {"easyep": rows}, config.moe_layer_ids, "f" * 64, [])
    with pytest.raises(SelectionError, match="different checkpoint"):
        select_for_checkpoint(load_scores(tmp_path / "other"), config, keep=8, metric="easyep")
    write_score_file(tmp_path / "short", {"easyep": rows[:1]}, [1], config.config_hash, [])
    with pytest.raises(SelectionError, match=r"no row for MoE layer\(s\) \[2\]"):
        select_for_checkpoint(load_scores(tmp_path / "short"), config, keep=8, metric="easyep")
    dense_too = torch.rand(3, E, dtype=torch.float64)
    write_score_file(tmp_path / "dense", {"easyep": dense_too}, [0, 1, 2], config.config_hash, [])
    with pytest.raises(SelectionError, match="not MoE layers"):
        select_for_checkpoint(load_scores(tmp_path / "dense"), config, keep=8, metric="easyep")


def test_bad_score_files_are_refused(tmp_path, score_dir):
    with pytest.raises(SelectionError, match="does not exist"):
        load_scores(tmp_path / "missing")
    directory = score_dir[0]
    # a tensor file that no longer matches the json (torn write or hand edit)
    save_file({"easyep": torch.zeros(2, E, dtype=torch.float64)}, str(directory / "scores.safetensors"))
    with pytest.raises(SelectionError, match="sha256"):
        load_scores(directory)
    # float32 is accepted, a wrong shape is not
    write_score_file(tmp_path / "f32", {"gate": torch.rand(2, E)}, LAYERS, HASH, [])
    assert load_scores(tmp_path / "f32").tensors["gate"].dtype == torch.float64
    with pytest.raises(SelectionError, match="expected"):
        write_score_file(tmp_path / "bad", {"gate": torch.rand(3, E)}, LAYERS, HASH, [])


def test_many_random_rows_match_python_oracle(tmp_path):
    rng = random.Random(7)
    # few distinct values, so ties are frequent
    rows = [[float(rng.randint(0, 5)) for _ in range(E)] for _ in LAYERS]
    write_score_file(tmp_path, {"gate": torch.tensor(rows, dtype=torch.float64)}, LAYERS, HASH, [])
    scores = load_scores(tmp_path)
    for keep in (8, 12, 16):
        grouped = select(scores, metric="gate", keep=keep)
        collapsed = select(scores, metric="gate", keep=keep, group_policy="collapse")
        for row, layer in zip(rows, LAYERS):
            assert list(grouped.kept[layer]) == expected_equal_per_group(row, keep)
            assert list(collapsed.kept[layer]) == expected_collapse(row, keep)


def test_score_diff_bench_known_changes(tiny_ckpt, tmp_path):
    """bench/score_diff.py on constructed score pairs: a uniform 1% scale moves every score by
    exactly 1% and no selection; reversing the order of gate@code in every layer swaps exactly
    M experts per layer for M <= E/2 and E - M above it (both group policies), on code."""
    import subprocess
    import sys
    from pathlib import Path

    config = DeepseekV3Config.load(tiny_ckpt)
    assert (config.n_routed_experts, config.n_group) == (16, 4)
    layers = config.moe_layer_ids
    gen = torch.Generator().manual_seed(0)
    metrics = ("easyep", "easyep_no_token", "easyep_no_norm", "gate", "frequency")
    a = {f"{m}@{d}": torch.rand(len(layers), E, generator=gen, dtype=torch.float64) + 0.1
         for m in metrics for d in ("code", "math")}
    a.update({m: a[f"{m}@code"] + a[f"{m}@math"] for m in metrics})
    scaled = {k: v * 1.01 for k, v in a.items()}
    reversed_gate = dict(a)
    row = a["gate@code"]
    reversed_gate["gate@code"] = row.max(1, keepdim=True).values + row.min(1, keepdim=True).values - row
    for name, scores in (("a", a), ("scaled", scaled), ("reversed", reversed_gate)):
        write_score_file(tmp_path / name, scores, layers, config.config_hash, ["code", "math"])

    def run(b):
        proc = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "score_diff.py"),
                               "--hf-checkpoint", str(tiny_ckpt), str(tmp_path / "a"), str(tmp_path / b),
                               "--keep", "4", "6", "8", "12"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}

    for metric, (rel, same, swapped) in run("scaled").items():
        assert float(rel) == pytest.approx(0.01, abs=1e-4), metric
        assert (same, swapped) == ("12/12", "0"), metric

    table = run("reversed")
    expected_rel = ((row - reversed_gate["gate@code"]).abs().max() / row.abs().max()).item()
    assert float(table["gate"][0]) == pytest.approx(expected_rel, abs=1e-4)
    same, total = map(int, table["gate"][1].split("/"))
    assert total == 12 and 4 <= same <= 8  # math identical, code all moved, mixed may move
    per_layer_on_code = 4 + 6 + 8 + (16 - 12)
    assert int(table["gate"][2]) >= per_layer_on_code * len(layers)
    for metric in ("easyep", "easyep_no_token", "easyep_no_norm", "frequency"):
        assert table[metric] == ["0.0000", "12/12", "0"], metric

    write_score_file(tmp_path / "other", a, layers, "f" * 64, ["code", "math"])
    proc = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "score_diff.py"),
                           "--hf-checkpoint", str(tiny_ckpt), str(tmp_path / "a"), str(tmp_path / "other")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "different checkpoint" in proc.stderr
