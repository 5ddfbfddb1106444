"""launch/compare.py end to end on CI-sized inputs: the random tiny checkpoint, two demo domains
(4 calibration + 4 held-out demos each), M in {8, 16} of 16 experts, every criterion, 2 random
seeds. One comparison run (a subprocess, the documented CLI) is shared by every test here."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_easyep.scoring.demo_data import write_demo_files

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ["math", "code"]
KEEPS = [8, 16]
SEEDS = [0, 1]
METRICS = ["easyep", "easyep_no_token", "easyep_no_norm", "gate", "frequency"]
CRITERIA = [*METRICS, "reap", "random", "cprune", "cprune_global"]  # the grid's default order
MERGE_RULE = "output-frequency"
MERGED = f"easyep+merge:{MERGE_RULE}"  # easyep's kept sets with the dropped experts merged in
FIELDS = ["criterion", "seed", "selection_domain", "keep", "n_routed_experts", "group_policy", "eval_domain",
          "tokens", "kl", "top1", "nll", "ppl", "nll_full", "ppl_full", "selection_id"]
PLOTS = ["quality_vs_m.png", "score_heatmaps.png", "overlap_demos.png", "overlap_domains.png"]


@pytest.fixture(scope="module")
def compared(tiny_checkpoint_factory, tmp_path_factory):
    ckpt = tiny_checkpoint_factory()
    root = tmp_path_factory.mktemp("compare")
    demos = write_demo_files(root / "demos", per_domain=4, heldout=4)
    out = root / "out"
    cmd = [sys.executable, str(REPO / "launch" / "compare.py"), "--hf-checkpoint", str(ckpt),
           "--output", str(out), "--keep", *map(str, KEEPS), "--random-seeds", str(len(SEEDS)),
           "--seed", "0", "--threads", "1", "--batch-size", "4", "--merge", MERGE_RULE, "--merge-of", "easyep"]
    for d in DOMAINS:
        cmd += ["--demos", f"{demos[d]}:{d}", "--heldout", f"{demos[d + '_heldout']}:{d}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    return {"ckpt": ckpt, "demos": demos, "out": out, "header": header, "rows": rows, "stderr": proc.stderr,
            "cmd": cmd}


def _num(row, key):
    return float(row[key])


def test_csv_has_one_row_per_model_and_heldout_domain(compared):
    assert compared["header"] == FIELDS
    rows = compared["rows"]
    keys = [(r["criterion"], r["seed"], r["selection_domain"], int(r["keep"]), r["eval_domain"]) for r in rows]
    expected = {(c, str(s) if c == "random" else "", sel, k, e)
                for c in [*CRITERIA, MERGED] for s in (SEEDS if c == "random" else [None])
                for sel in [*DOMAINS, "mixed"] for k in KEEPS for e in DOMAINS}
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected
    for r in rows:
        assert int(r["tokens"]) > 0 and int(r["n_routed_experts"]) == 16
        assert r["group_policy"] == "equal-per-group"  # 8 and 16 are routable per group here
        kl, top1, nll, ppl = (_num(r, k) for k in ("kl", "top1", "nll", "ppl"))
        assert kl >= 0 and 0 <= top1 <= 1 and math.isfinite(nll)
        assert ppl == pytest.approx(math.exp(nll), rel=1e-9)
    # the full model's reference is the same in every row of a held-out domain
    for d in DOMAINS:
        assert len({r["ppl_full"] for r in rows if r["eval_domain"] == d}) == 1
    assert "[compare]" in compared["stderr"]  # progress lines


def test_keeping_every_expert_is_the_full_model(compared):
    """Oracle: M = E exports the same model, so KL is exactly 0, top-1 agreement 1, and the
    perplexity equals the full model's, for every criterion and selection domain."""
    full = [r for r in compared["rows"] if int(r["keep"]) == 16]
    assert full
    for r in full:
        assert _num(r, "kl") == 0.0, r
        assert _num(r, "top1") == 1.0, r
        assert _num(r, "ppl") == pytest.approx(_num(r, "ppl_full"), rel=1e-12)
    assert len({r["selection_id"] for r in full}) == 1


def test_merged_rows_are_their_own_models(compared):
    """Merging nothing (M = E) is the pruned model itself, so the row shares its evaluation; at M = 8
    the merged model is another checkpoint than the pruned one with the same kept experts."""
    rows = {(r["criterion"], r["selection_domain"], int(r["keep"]), r["eval_domain"]): r for r in compared["rows"]}
    for (criterion, sel, keep, ev), r in rows.items():
        if criterion != MERGED:
            continue
        pruned = rows[("easyep", sel, keep, ev)]
        if keep == 16:
            assert r["selection_id"] == pruned["selection_id"] and _num(r, "kl") == 0.0
        else:
            assert r["selection_id"] != pruned["selection_id"]
            assert _num(r, "kl") != _num(pruned, "kl") and _num(r, "kl") > 1e-3
    table = (compared["out"] / "table.md").read_text()
    assert f"| {MERGED} | 8 |" in table


def test_pruning_half_the_experts_changes_the_model(compared):
    half = [r for r in compared["rows"] if int(r["keep"]) == 8]
    assert half
    for r in half:
        assert _num(r, "kl") > 1e-3, r
        assert _num(r, "ppl") != _num(r, "ppl_full")
    assert min(_num(r, "top1") for r in half) < 1.0


def test_perplexities_match_an_independent_evaluation(compared, tmp_path):
    """The full model's and one pruned model's perplexity in results.csv == evaluation.py's
    (one sequence per forward, its own NLL code) on a re-export of the recorded selection."""
    from megatron_easyep.analysis.evaluation import EvalRun, run_evaluation
    from megatron_easyep.pruning.export import export_pruned
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.pruning.selection import load_scores, select_for_checkpoint

    demos = compared["demos"]
    heldout = [f"{demos[d + '_heldout']}:{d}" for d in DOMAINS]
    rows = compared["rows"]
    full = run_evaluation(EvalRun(hf_checkpoint=str(compared["ckpt"]), demos=heldout))
    for d in DOMAINS:
        csv_full = next(_num(r, "ppl_full") for r in rows if r["eval_domain"] == d)
        assert csv_full == pytest.approx(full[d]["ppl"], rel=1e-4)

    config = DeepseekV3Config.load(compared["ckpt"])
    selection = select_for_checkpoint(load_scores(compared["out"] / "scores"), config, keep=8, metric="easyep",
                                      domains=["math"], group_policy="equal-per-group")
    recorded = json.loads((compared["out"] / "selections.json").read_text())["easyep|None|math|8"]
    assert {int(k): tuple(v) for k, v in recorded["kept"].items()} == selection.kept
    export_pruned(compared["ckpt"], tmp_path / "pruned", selection, mtp="drop")
    pruned = run_evaluation(EvalRun(hf_checkpoint=str(tmp_path / "pruned"), demos=heldout))
    for d in DOMAINS:
        row = next(r for r in rows if (r["criterion"], r["selection_domain"], r["keep"], r["eval_domain"])
                   == ("easyep", "math", "8", d))
        assert _num(row, "ppl") == pytest.approx(pruned[d]["ppl"], rel=1e-4)
        assert abs(_num(row, "ppl") - _num(row, "ppl_full")) > 1e-3 * _num(row, "ppl_full")


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """{section title: table rows (header first, alignment row dropped)}."""
    out, title = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-+:?", c) for c in cells):
                out.setdefault(title, []).append(cells)
    return out


def test_table_is_laid_out_like_the_paper(compared):
    tables = _tables((compared["out"] / "table.md").read_text())
    rows = compared["rows"]
    single = tables["Single-domain selection: KL(full ‖ pruned), nats/token (lower is better)"]
    assert single[0] == ["criterion", "M", "in: math", "in: code", "in: mean", "out: math", "out: code",
                         "out: mean"]
    assert [(r[0], r[1]) for r in single[1:]] == [(c, str(k)) for c in [*CRITERIA, MERGED] for k in KEEPS]
    mixed = tables["Mixed-domain selection (all domains, L1-mixed): KL(full ‖ pruned), nats/token "
                   "(lower is better)"]
    assert mixed[0] == ["criterion", "M", "math", "code", "mean"]
    assert [(r[0], r[1]) for r in mixed[1:]] == [(c, str(k)) for c in [*CRITERIA, MERGED] for k in KEEPS]

    def csv_value(criterion, sel, keep, d, metric="kl"):
        return next(_num(r, metric) for r in rows if (r["criterion"], r["selection_domain"], r["keep"],
                                                      r["eval_domain"]) == (criterion, sel, str(keep), d))

    easyep8 = next(r for r in single if r[:2] == ["easyep", "8"])
    assert easyep8[2] == f"{csv_value('easyep', 'math', 8, 'math'):.4f}"  # in-domain
    assert easyep8[3] == f"{csv_value('easyep', 'code', 8, 'code'):.4f}"
    assert easyep8[5] == f"{csv_value('easyep', 'code', 8, 'math'):.4f}"  # out-of-domain
    gate8 = next(r for r in mixed if r[:2] == ["gate", "8"])
    assert gate8[3] == f"{csv_value('gate', 'mixed', 8, 'code'):.4f}"
    random8 = next(r for r in single if r[:2] == ["random", "8"])
    assert "±" in random8[2]
    ppl = tables["Single-domain selection: perplexity (lower is better)"]
    assert ppl[1][0] == "full model"
    assert all(r[2].split(" ±")[0] == ppl[1][2] for r in ppl if r[1] == "16")  # M = E: the full model
    demo = tables["Pruning for one domain (easyep)"]
    assert demo[0] == ["M", "experts selected on", "math", "code"]
    assert [r[:2] for r in demo[1:]] == [["16", "(full model)"], ["8 (equal-per-group)", "math"],
                                         ["8 (equal-per-group)", "code"], ["8 (equal-per-group)", "all (mixed)"]]
    in_domain = csv_value("easyep", "code", 8, "code", "ppl")
    assert demo[3][3].startswith(f"**{in_domain:.2f} (")  # bold: selected on the column's domain


def test_rerender_reproduces_table_and_plots(compared, tmp_path):
    """--rerender rebuilds table.md byte for byte (and the plots) from the written files."""
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(compared["out"], copy)
    original = (copy / "table.md").read_text()
    for name in ["table.md", *PLOTS]:
        (copy / name).unlink()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), "--rerender", str(copy)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (copy / "table.md").read_text() == original
    assert all((copy / name).is_file() for name in PLOTS)


def test_plots_are_valid_pngs(compared):
    import numpy as np
    from PIL import Image

    for name in PLOTS:
        path = compared["out"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] >= 200 and image.size[1] >= 150, (name, image.size)
            assert len(np.unique(np.asarray(image.convert("L")))) > 10, f"{name} is blank"


def test_random_seeds_select_different_sets(compared):
    selections = json.loads((compared["out"] / "selections.json").read_text())
    by_seed = {s: [v for v in selections.values() if v["criterion"] == "random" and v["seed"] == s
                   and v["keep"] == 8] for s in SEEDS}
    for seed, entries in by_seed.items():
        assert len(entries) == len(DOMAINS) + 1
        # random does not look at the domain: one selection per seed, evaluated once
        assert len({json.dumps(e["kept"], sort_keys=True) for e in entries}) == 1
        assert len({e["selection_id"] for e in entries}) == 1
    assert by_seed[0][0]["kept"] != by_seed[1][0]["kept"]
    ids = {r["seed"]: r["selection_id"] for r in compared["rows"] if r["criterion"] == "random" and r["keep"] == "8"}
    assert ids["0"] != ids["1"]
    for entries in by_seed.values():
        for layer, kept in entries[0]["kept"].items():  # equal-per-group: 2 of every group of 4
            assert len(kept) == 8 and [sum(1 for i in kept if i // 4 == g) for g in range(4)] == [2] * 4


def test_overlap_files(compared):
    with open(compared["out"] / "overlap_demos.csv", newline="") as f:
        demos = list(csv.DictReader(f))
    with open(compared["out"] / "overlap_domains.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert {int(r["demos"]) for r in demos} == {1, 2, 4}
    assert all(0.0 <= float(r["overlap"]) <= 1.0 for r in demos)
    assert all(float(r["overlap"]) == 1.0 for r in demos if r["demos"] == "4")  # all demos = itself
    assert all(float(r["jaccard"]) == 1.0 for r in pairs if r["domain_a"] == r["domain_b"])
    assert {r["metric"] for r in pairs} == set(METRICS)


def test_resume_reuses_stored_evaluations_and_is_deterministic(compared, tmp_path):
    """--resume on a finished run's copy: stored evaluations are reused; deleted ones are evaluated
    again and give the same numbers (same seed, same machine), so results.csv is identical."""
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(compared["out"], copy)
    stored = sorted((copy / "evaluations").glob("*.json"))
    assert len(stored) == len({r["selection_id"] for r in compared["rows"]})
    for path in stored[:2]:
        path.unlink()
    cmd = [*compared["cmd"], "--resume"]
    cmd[cmd.index("--output") + 1] = str(copy)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("(from the interrupted run)") == len(stored) - 2
    assert (copy / "results.csv").read_text() == (compared["out"] / "results.csv").read_text()


def test_bad_requests_fail_before_any_output(tiny_checkpoint_factory, tmp_path):
    from megatron_easyep.analysis.compare import CompareError, CompareRun, run_compare

    demos = write_demo_files(tmp_path / "demos", per_domain=1, heldout=1)
    base = dict(hf_checkpoint=str(tiny_checkpoint_factory()), demos=[f"{demos['math']}:math"],
                heldout=[f"{demos['math_heldout']}:math"], output=str(tmp_path / "out"))
    for keeps, criteria, match in (([17], None, "within 1..16"), ([2], None, "not routable"),
                                   ([8], ["easyep", "magic"], "unknown criteria")):
        run = CompareRun(**base, keeps=keeps, **({"criteria": criteria} if criteria else {}))
        with pytest.raises(CompareError, match=match):
            run_compare(run)
    with pytest.raises(CompareError, match="nothing to resume"):
        run_compare(CompareRun(**base, keeps=[8], resume=True))
    with pytest.raises(CompareError, match="exclude each other"):
        run_compare(CompareRun(**base, keeps=[8], resume=True, overwrite=True))
    with pytest.raises(CompareError, match="--merge 'output-magic'"):
        run_compare(CompareRun(**base, keeps=[8], merges=["output-magic"]))
    with pytest.raises(CompareError, match="only score criteria can be merged"):
        run_compare(CompareRun(**base, keeps=[8], merges=["output-frequency"], merge_of=["random"]))
    from megatron_easyep.scoring.demos import DemoError

    with pytest.raises(DemoError, match="missing.jsonl does not exist"):  # calibration files too, before the store
        run_compare(CompareRun(**{**base, "demos": [f"{tmp_path / 'missing.jsonl'}:math"]}, keeps=[8]))
    assert not (tmp_path / "out").exists()


def test_group_rounded_counts_known_values():
    from megatron_easyep.pruning.cprune import group_rounded_counts
    from megatron_easyep.pruning.selection import SelectionError

    assert group_rounded_counts([6, 10, 8], 4, [12, 12, 12]) == [4, 12, 8]  # tie: larger count
    assert group_rounded_counts([10, 10, 4], 4, [12, 12, 12]) == [12, 8, 4]  # then earlier layer
    assert group_rounded_counts([5, 11, 8], 4, [12, 12, 12]) == [4, 12, 8]
    assert group_rounded_counts([4, 12, 8], 4, [12, 12, 12]) == [4, 12, 8]
    with pytest.raises(SelectionError, match="cannot round"):
        group_rounded_counts([5, 10, 8], 4, [12, 12, 12])


def test_cprune_global_gives_a_redundant_layer_fewer_experts():
    """Known structure: layer A's 16 experts form 2 tight clusters (redundant), layer B's are
    spread out. The global step keeps M x 2 experts in all, fewer in A than in B; the spare slots
    of A are disabled, so every layer stores the same number of slots and the enabled experts
    average exactly M. Under equal-per-group every enabled count is a multiple of n_group."""
    import numpy as np

    from megatron_easyep.pruning.cprune import cprune_global_selection
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.checkpoint.tiny import build_config

    config = DeepseekV3Config.from_dict(build_config("tiny"))
    layers = config.moe_layer_ids
    assert len(layers) == 2 and config.n_routed_experts == 16 and config.n_group == 4
    rng = np.random.default_rng(0)
    n, h = 6, 8
    centres = rng.normal(size=(2, n, h)) * 10
    redundant = np.stack([centres[e % 2] + 0.01 * rng.normal(size=(n, h)) for e in range(16)])
    spread = rng.normal(size=(16, n, h)) * 10
    features = np.stack([redundant, spread]).astype(np.float32)
    # M = 8 under collapse (>= top_k = 4 per layer); M = 12 under equal-per-group (>= 2 per group)
    for policy, keep in (("collapse", 8), ("equal-per-group", 12)):
        sel = cprune_global_selection(config, features, range(n), keep, policy, None, layers)
        kept = {layer: set(ids) for layer, ids in sel.kept.items()}
        disabled = {layer: set((sel.disabled or {}).get(layer, ())) for layer in layers}
        enabled = {layer: kept[layer] - disabled[layer] for layer in layers}
        assert len(kept[layers[0]]) == len(kept[layers[1]])  # one n_routed_experts
        assert sum(len(e) for e in enabled.values()) == keep * len(layers), (policy, enabled)
        assert len(enabled[layers[0]]) < len(enabled[layers[1]]), (policy, enabled)
        assert disabled[layers[0]] and disabled[layers[0]] <= kept[layers[0]]
        if policy == "equal-per-group":
            for ids in enabled.values():
                per_group = [sum(1 for e in ids if e // 4 == g) for g in range(4)]
                assert len(set(per_group)) == 1, (ids, per_group)
