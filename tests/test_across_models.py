"""Aggregation of comparisons across trained models (analysis/across_models.py), on hand-made
results.csv files whose means, spreads and win counts are worked out by hand below."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_easyep.analysis import across_models
from megatron_easyep.analysis.report import CSV_FIELDS

REPO = Path(__file__).resolve().parent.parent


def _write_run(path: Path, kl: dict, keeps=(4,), criteria=("easyep", "gate", "random")) -> Path:
    """kl[(criterion, seed, selection_domain, eval_domain)] = value; ppl = 10 * (1 + kl), full ppl 10."""
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "run": {"hf_checkpoint": str(path / "hf"), "keeps": list(keeps), "criteria": list(criteria)},
        "domains": ["a", "b"], "heldout_domains": ["a", "b"], "heldout_tokens": {"a": 10, "b": 10},
        "full_ppl": {"a": 10.0, "b": 10.0}, "random_seeds": [0, 1], "group_policy_by_keep": {"4": "collapse"}}))
    with open(path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for (criterion, seed, sel, ev), value in kl.items():
            w.writerow({"criterion": criterion, "seed": seed, "selection_domain": sel, "keep": 4,
                        "n_routed_experts": 8, "group_policy": "collapse", "eval_domain": ev, "tokens": 10,
                        "kl": value, "top1": 0.5, "nll": 0.0, "ppl": 10 * (1 + value), "nll_full": 0.0,
                        "ppl_full": 10.0, "selection_id": f"{criterion}{seed}{sel}"})
    return path


def _kl(easyep, gate, random0, random1):
    """Each argument: {(sel, eval): kl} over sel in a, b, mixed and eval in a, b."""
    out = {}
    for name, seed, table in (("easyep", "", easyep), ("gate", "", gate), ("random", 0, random0),
                              ("random", 1, random1)):
        for (sel, ev), v in table.items():
            out[(name, seed, sel, ev)] = v
    return out


def _table(aa, ab, ba, bb, ma, mb):
    return {("a", "a"): aa, ("a", "b"): ab, ("b", "a"): ba, ("b", "b"): bb, ("mixed", "a"): ma, ("mixed", "b"): mb}


@pytest.fixture()
def two_models(tmp_path):
    m1 = _write_run(tmp_path / "m1", _kl(easyep=_table(0.1, 0.5, 0.7, 0.3, 0.2, 0.4),
                                         gate=_table(0.2, 0.4, 0.6, 0.2, 0.3, 0.3),
                                         random0=_table(0.4, 0.4, 0.4, 0.4, 0.4, 0.4),
                                         random1=_table(0.6, 0.6, 0.6, 0.6, 0.6, 0.6)))
    m2 = _write_run(tmp_path / "m2", _kl(easyep=_table(0.3, 0.5, 0.5, 0.1, 0.2, 0.2),
                                         gate=_table(0.2, 0.6, 0.6, 0.2, 0.1, 0.1),
                                         random0=_table(0.2, 0.2, 0.2, 0.2, 0.2, 0.2),
                                         random1=_table(0.2, 0.2, 0.2, 0.2, 0.2, 0.2)))
    return m1, m2


def test_means_spreads_and_counts_by_hand(two_models):
    runs = across_models.load_runs(two_models)
    agg = {(r["metric"], r["criterion"], r["setting"]): r for r in across_models.aggregate(runs)}
    # easyep "in": model 1 (0.1 + 0.3) / 2 = 0.2, model 2 (0.3 + 0.1) / 2 = 0.2
    assert agg[("kl", "easyep", "in")]["mean"] == pytest.approx(0.2)
    assert agg[("kl", "easyep", "in")]["min"] == pytest.approx(0.2)
    # easyep "out" (selected on a measured on b, and b on a): model 1 (0.5 + 0.7) / 2 = 0.6, model 2 0.5
    row = agg[("kl", "easyep", "out")]
    assert (row["mean"], row["min"], row["max"]) == pytest.approx((0.55, 0.5, 0.6))
    # random: its two seeds averaged inside model 1 (0.5) before the models (0.2): mean 0.35
    row = agg[("kl", "random", "in:a")]
    assert (row["mean"], row["min"], row["max"]) == pytest.approx((0.35, 0.2, 0.5))
    # ppl change = kl here by construction: gate mixed, model 1 0.3, model 2 0.1
    assert agg[("ppl_change", "gate", "mixed")]["mean"] == pytest.approx(0.2)

    wins = {(w["setting"], w["criterion"], w["other"]): w["wins"] for w in across_models.win_counts(runs)}
    # in: easyep 0.2 vs gate 0.2 (model 1), 0.2 vs 0.2 (model 2): ties count as "at most": 2 of 2
    assert wins[("in", "easyep", "gate")] == 2
    # out: easyep 0.6 vs gate 0.5 (loses), 0.5 vs 0.6 (wins): 1 of 2
    assert wins[("out", "easyep", "gate")] == 1
    # mixed: easyep 0.3 vs gate 0.3 (tie), 0.2 vs 0.1 (loses): 1 of 2; random 0.5 / 0.2
    assert wins[("mixed", "easyep", "gate")] == 1
    assert wins[("mixed", "easyep", "random")] == 2
    assert across_models.best_counts(runs, "kl", 4, "mixed") == {"easyep": 1, "gate": 2, "random": 0}
    # held-out a: model 1 selections a 0.1, b 0.7, mixed 0.2 -> a best; model 2 a 0.3, b 0.5, mixed 0.2
    # -> mixed best. Held-out b: b best in both (0.3 < 0.4, 0.5; 0.1 < 0.2, 0.5)
    assert across_models.protects_counts(runs, 4) == {"a": 1, "b": 2}


def test_outputs_and_the_command_line(two_models, tmp_path):
    out = tmp_path / "agg"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), "--across", *map(str, two_models),
                           "--output", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in ("table.md", "aggregate.csv", "wins.csv", "results_all.csv", "quality_vs_m.png"):
        assert (out / f).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| easyep | 4 | 0.2000 [0.2000, 0.2000]" in table
    assert "| gate | 2/2 | 1/2 | 1/2 |" in table  # easyep vs gate: in, out, mixed


def test_runs_with_different_grids_are_refused(two_models, tmp_path):
    other = _write_run(tmp_path / "m3", {("easyep", "", "a", "a"): 0.1}, keeps=(6,))
    with pytest.raises(across_models.AcrossModelsError, match="m3: keeps"):
        across_models.load_runs([two_models[0], other])
    with pytest.raises(across_models.AcrossModelsError, match="not a finished"):
        across_models.load_runs([two_models[0], tmp_path])
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), "--across", str(two_models[0]),
                           str(other), "--output", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode != 0 and "m3: keeps" in proc.stderr


def test_merged_rows_are_counted_against_pruning_the_same_kept_set(tmp_path):
    """A merged criterion ("easyep+merge:<rule>") is aggregated like any other and compared with the
    pruned rows of its own kept set: model 1 merges better in-domain (0.05 < 0.1 on a, 0.2 < 0.3 on
    b: mean 0.125 vs 0.2) and worse out-of-domain; model 2 worse in both. In-domain: 1 of 2."""
    merged = "easyep+merge:output-frequency"
    runs = []
    for name, easyep, merge in (("m1", _table(0.1, 0.5, 0.7, 0.3, 0.2, 0.4), _table(0.05, 0.9, 0.9, 0.2, 0.1, 0.4)),
                                ("m2", _table(0.3, 0.5, 0.5, 0.1, 0.2, 0.2), _table(0.4, 0.6, 0.6, 0.2, 0.3, 0.3))):
        kl = {("easyep", "", s, e): v for (s, e), v in easyep.items()}
        kl.update({(merged, "", s, e): v for (s, e), v in merge.items()})
        path = _write_run(tmp_path / name, kl, criteria=("easyep",))
        summary = json.loads((path / "summary.json").read_text())
        summary["run"].update(merges=["output-frequency"], merge_of=["easyep", "reap"])  # reap not run: no rows
        (path / "summary.json").write_text(json.dumps(summary))
        runs.append(path)
    out = across_models.aggregate_runs(runs, tmp_path / "agg")
    table = out.joinpath("table.md").read_text() if out.is_dir() else out.read_text()
    agg = {(r["metric"], r["criterion"], r["setting"]): r for r in csv.DictReader(open(tmp_path / "agg" / "aggregate.csv"))}
    assert float(agg[("kl", merged, "in")]["mean"]) == pytest.approx((0.125 + 0.3) / 2)
    section = table.split("## Merging against pruning the same kept set")[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| {merged} |"))
    assert row.split("|")[2:5] == [" 1/2 ", " 0/2 ", " 1/2 "]  # in, out, mixed (mixed: m1 0.25 vs 0.3, m2 0.3 vs 0.2)
