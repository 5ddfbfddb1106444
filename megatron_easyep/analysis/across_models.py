"""Comparisons of several independently trained models, aggregated: which conclusions survive a
change of training seed.

Input: finished `compare` output directories, one per model (same recipe, different seed). Every
number becomes the mean over models with its spread (min–max); every comparison between criteria
becomes a count ("easyep has lower KL than gate in 3 of 3 models"), so a conclusion is stated only
where it holds in every model and a split is visible as a split. Random selections are averaged
over their seeds inside a model before the models are compared.

Settings (each a mean over (selection domain, evaluation domain) pairs of one model):
  in     selected on a domain, measured on the same domain (mean over domains; `in:D` for one)
  out    selected on a domain, measured on each other domain
  mixed  selected on all domains together, measured on each domain
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_easyep.analysis.report import MERGE_TAG, MIXED, STYLE, _index, _std, read_csv, row_criteria, save_figure, write_csv
from megatron_easyep.checkpoint import io

AGGREGATE_FIELDS = ("metric", "criterion", "keep", "setting", "models", "mean", "min", "max", "std", "per_model")
WIN_FIELDS = ("metric", "keep", "setting", "criterion", "other", "wins", "models")


class AcrossModelsError(ValueError):
    """Runs that cannot be aggregated (missing files, different grids or domains)."""


def load_runs(dirs) -> list[dict]:
    """[{name, summary, rows, index}] for each finished comparison directory, checked to share a
    grid; `index` is the rows keyed by (criterion, M, selection domain, evaluation domain)."""
    runs = []
    for d in map(Path, dirs):
        for f in ("summary.json", "results.csv"):
            if not (d / f).is_file():
                raise AcrossModelsError(f"{d}: no {f} (not a finished `launch/compare.py` output)")
        summary = json.loads((d / "summary.json").read_text())
        rows = read_csv(d / "results.csv")
        runs.append({"name": d.name, "summary": summary, "rows": rows, "index": _index(rows)})
    if len(runs) < 2:
        raise AcrossModelsError("aggregating across models needs at least two comparison directories")
    first = runs[0]["summary"]
    for run in runs[1:]:
        s = run["summary"]
        for key in ("domains", "heldout_domains"):
            if s[key] != first[key]:
                raise AcrossModelsError(f"{run['name']}: {key} {s[key]} differ from {runs[0]['name']}'s {first[key]}")
        for key, ours, theirs in (("keeps", s["run"]["keeps"], first["run"]["keeps"]),
                                  ("criteria", row_criteria(s["run"]), row_criteria(first["run"]))):
            if sorted(ours) != sorted(theirs):
                raise AcrossModelsError(f"{run['name']}: {key} {ours} differ from {runs[0]['name']}'s {theirs}")
    return runs


def setting_pairs(setting: str, domains, eval_domains) -> list[tuple[str, str]]:
    """(selection domain, evaluation domain) pairs averaged for one setting."""
    if setting == "in":
        return [(d, d) for d in eval_domains if d in domains]
    if setting.startswith("in:"):
        return [(setting[3:], setting[3:])]
    if setting == "out":
        return [(s, d) for d in eval_domains for s in domains if s != d]
    if setting == "mixed":
        return [(MIXED, d) for d in eval_domains]
    raise ValueError(f"unknown setting {setting!r}")


def model_value(index, metric: str, criterion: str, keep: int, pairs) -> float | None:
    """One model's number for a cell (`index`: a run's rows keyed as report._index keys them): per
    pair the mean over selection seeds (random's several), then the mean over pairs; `ppl_change`
    is ppl / full ppl - 1. None when a pair has no row."""
    per_pair = []
    for sel, ev in pairs:
        vals = index.get((criterion, keep, sel, ev))
        if not vals:
            return None
        if metric == "ppl_change":
            per_pair.append(sum(r["ppl"] / r["ppl_full"] - 1 for r in vals) / len(vals))
        else:
            per_pair.append(sum(r[metric] for r in vals) / len(vals))
    return sum(per_pair) / len(per_pair)


def _stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "std": _std(values)}


def aggregate(runs, metrics=("kl", "ppl_change", "top1"), settings=None) -> list[dict]:
    """One row per (metric, criterion, M, setting): the per-model values and their mean/min/max/std."""
    first = runs[0]["summary"]
    domains, eval_domains = first["domains"], first["heldout_domains"]
    settings = settings or ["in", *(f"in:{d}" for d in eval_domains if d in domains), "out", "mixed"]
    out = []
    for metric in metrics:
        for criterion in row_criteria(first["run"]):
            for keep in sorted(first["run"]["keeps"]):
                for setting in settings:
                    pairs = setting_pairs(setting, domains, eval_domains)
                    values = [model_value(run["index"], metric, criterion, keep, pairs) for run in runs]
                    if any(v is None for v in values):
                        continue
                    out.append({"metric": metric, "criterion": criterion, "keep": keep, "setting": setting,
                                "models": len(values), **_stats(values),
                                "per_model": ";".join(f"{v:.6g}" for v in values)})
    return out


def _at_least_as_good(a: float, b: float, higher_is_better: bool) -> bool:
    """a at least as good as b, equal within rounding (means of the same numbers summed in another
    order) counting as a tie."""
    tol = 1e-9 * max(abs(a), abs(b)) + 1e-15
    return a >= b - tol if higher_is_better else a <= b + tol


def win_counts(runs, metric: str = "kl", settings=("in", "out", "mixed")) -> list[dict]:
    """For every ordered pair of criteria, M and setting: in how many models the first is at least
    as good as the second (lower KL / perplexity, higher top-1)."""
    first = runs[0]["summary"]
    domains, eval_domains = first["domains"], first["heldout_domains"]
    criteria = row_criteria(first["run"])
    higher_is_better = metric == "top1"
    out = []
    for keep in sorted(first["run"]["keeps"]):
        for setting in settings:
            pairs = setting_pairs(setting, domains, eval_domains)
            values = {c: [model_value(run["index"], metric, c, keep, pairs) for run in runs] for c in criteria}
            for a in criteria:
                for b in criteria:
                    if a == b or any(v is None for v in values[a] + values[b]):
                        continue
                    wins = sum(_at_least_as_good(va, vb, higher_is_better) for va, vb in zip(values[a], values[b]))
                    out.append({"metric": metric, "keep": keep, "setting": setting, "criterion": a,
                                "other": b, "wins": wins, "models": len(runs)})
    return out


def best_counts(runs, metric: str, keep: int, setting: str) -> dict[str, int]:
    """How many models each criterion is the best of all criteria in (ties count for each)."""
    first = runs[0]["summary"]
    pairs = setting_pairs(setting, first["domains"], first["heldout_domains"])
    counts = {c: 0 for c in row_criteria(first["run"])}
    for run in runs:
        vals = {c: model_value(run["index"], metric, c, keep, pairs) for c in counts}
        vals = {c: v for c, v in vals.items() if v is not None}
        if not vals:
            continue
        best = max(vals.values()) if metric == "top1" else min(vals.values())
        for c, v in vals.items():
            counts[c] += _at_least_as_good(v, best, metric == "top1")
    return counts


def protects_counts(runs, keep: int, criterion: str = "easyep", metric: str = "ppl_change") -> dict[str, int]:
    """Per domain d: in how many models the selection made on d gives d the smallest change of all
    selections (each single domain, and mixed): selecting on a domain protects it best."""
    first = runs[0]["summary"]
    domains = first["domains"]
    counts = {}
    for d in (d for d in first["heldout_domains"] if d in domains):
        counts[d] = 0
        for run in runs:
            vals = {sel: model_value(run["index"], metric, criterion, keep, [(sel, d)]) for sel in [*domains, MIXED]}
            if any(v is None for v in vals.values()):
                continue
            counts[d] += all(_at_least_as_good(vals[d], v, False) for v in vals.values())
    return counts


def _fmt(metric: str, row: dict) -> str:
    if metric == "ppl_change":
        return f"{100 * row['mean']:+.1f}% [{100 * row['min']:+.1f}, {100 * row['max']:+.1f}]"
    if metric == "top1":
        return f"{100 * row['mean']:.1f} [{100 * row['min']:.1f}, {100 * row['max']:.1f}]"
    return f"{row['mean']:.4f} [{row['min']:.4f}, {row['max']:.4f}]"


def render(runs, agg: list[dict], wins: list[dict]) -> str:
    first = runs[0]["summary"]
    domains, eval_domains = first["domains"], first["heldout_domains"]
    criteria, keeps = row_criteria(first["run"]), sorted(first["run"]["keeps"])
    n = len(runs)
    e = next(r["n_routed_experts"] for r in runs[0]["rows"])
    keeps = [k for k in keeps if k < e]
    index = {(r["metric"], r["criterion"], r["keep"], r["setting"]): r for r in agg}
    win = {(w["metric"], w["keep"], w["setting"], w["criterion"], w["other"]): w["wins"] for w in wins}

    out = ["# Expert-selection comparison across independently trained models", "",
           f"{n} models trained with the same recipe and different seeds (the seed also draws the corpus "
           "split, so each model has its own calibration and held-out text). Each model's comparison "
           "is in its own folder; here every number is the **mean over models [min, max]**, and every "
           "comparison a count of models. Random: mean over its selection seeds inside each model.", "",
           "## The models", "",
           "| model | checkpoint | held-out tokens | " + " | ".join(f"full ppl {d}" for d in eval_domains)
           + " | random seeds | group policy per M |",
           "|---|---|---|" + "---:|" * len(eval_domains) + "---:|---|"]
    for run in runs:
        s = run["summary"]
        out.append(f"| {run['name']} | `{s['run']['hf_checkpoint']}` | "
                   + ", ".join(f"{d} {s['heldout_tokens'][d]}" for d in eval_domains) + " | "
                   + " | ".join(f"{s['full_ppl'][d]:.2f}" for d in eval_domains)
                   + f" | {len(s['random_seeds'])} | "
                   + ", ".join(f"{k}: {p}" for k, p in s["group_policy_by_keep"].items()) + " |")
    out.append("")

    # the demo's question: prune for one domain, what happens to each domain
    if "easyep" in criteria:
        out += ["## Pruning for one domain (easyep): perplexity change vs the full model", "",
                "Rows: the domain the experts were selected on; columns: the held-out domain measured. "
                "Bold: in-domain. Last column: in how many models the in-domain change is the "
                "smallest of the row (the pruned model loses least on the domain it was pruned for).", "",
                "| M | selected on | " + " | ".join(eval_domains) + " | in-domain smallest |",
                "|---:|---|" + "---:|" * len(eval_domains) + "---:|"]
        for keep in sorted(keeps, reverse=True):
            for sel in domains:
                cells, per_model_rows = [], []
                for d in eval_domains:
                    vals = [model_value(run["index"], "ppl_change", "easyep", keep, [(sel, d)]) for run in runs]
                    if any(v is None for v in vals):
                        cells.append("—")
                        continue
                    text = _fmt("ppl_change", _stats(vals))
                    cells.append(f"**{text}**" if d == sel else text)
                    per_model_rows.append((d, vals))
                smallest = "—"
                if sel in eval_domains and len(per_model_rows) == len(eval_domains):
                    own = dict(per_model_rows)[sel]
                    smallest = str(sum(all(own[i] <= v[i] for d, v in per_model_rows) for i in range(n))) + f"/{n}"
                out.append(f"| {keep} | {sel} | " + " | ".join(cells) + f" | {smallest} |")
        out.append("")
        out += ["Read down a column instead: for each held-out domain, in how many models the selection "
                "made on that domain gives it the smallest change of every selection (each single "
                "domain, and mixed).", "",
                "| M | " + " | ".join(d for d in eval_domains if d in domains) + " |",
                "|---:|" + "---:|" * len([d for d in eval_domains if d in domains])]
        for keep in sorted(keeps, reverse=True):
            counts = protects_counts(runs, keep)
            out.append(f"| {keep} | " + " | ".join(f"{counts[d]}/{n}" for d in counts) + " |")
        out.append("")

    label = {"kl": "KL(full ‖ pruned), nats/token (lower is better)",
             "ppl_change": "perplexity change vs the full model (lower is better)",
             "top1": "top-1 agreement with the full model, % (higher is better)"}
    settings = ["in", *(f"in:{d}" for d in eval_domains if d in domains), "out", "mixed"]
    for metric in ("kl", "ppl_change", "top1"):
        out += [f"## {label[metric]}", "",
                "in: selected and measured on the same domain (mean over domains, then per domain); "
                "out: measured on the other domains; mixed: selected on all domains together.", "",
                "| criterion | M | " + " | ".join(settings) + " |", "|---|---:|" + "---:|" * len(settings)]
        for criterion in criteria:
            for keep in keeps:
                cells = [_fmt(metric, index[(metric, criterion, keep, s)]) if (metric, criterion, keep, s) in index
                         else "—" for s in settings]
                out.append(f"| {criterion} | {keep} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Which criterion has the lowest KL, per model", "",
            f"Count of models (of {n}) in which each criterion had the lowest KL of all criteria (ties "
            "count for each); criteria never best are left out.", "",
            "| M | in | out | mixed |", "|---:|---|---|---|"]
    for keep in keeps:
        cells = []
        for setting in ("in", "out", "mixed"):
            counts = best_counts(runs, "kl", keep, setting)
            cells.append(", ".join(f"{c} {k}/{n}" for c, k in sorted(counts.items(), key=lambda x: -x[1]) if k)
                         or "—")
        out.append(f"| {keep} | " + " | ".join(cells) + " |")
    out.append("")

    if "easyep" in criteria:
        others = [c for c in criteria if c != "easyep"]
        out += ["## easyep against each other criterion", "",
                f"Models (of {n}) in which easyep's KL is at most the other criterion's. "
                f"{n}/{n}: easyep at least as good in every model; 0/{n}: worse in every model.", "",
                "| other criterion | " + " | ".join(f"M={k} {s}" for k in keeps for s in ("in", "out", "mixed")) + " |",
                "|---|" + "---:|" * (3 * len(keeps))]
        for other in others:
            cells = [f"{win.get(('kl', k, s, 'easyep', other), '—')}/{n}"
                     for k in keeps for s in ("in", "out", "mixed")]
            out.append(f"| {other} | " + " | ".join(cells) + " |")
        out.append("")
    out += _merged_vs_pruned(criteria, keeps, win, n)
    return "\n".join(out)


def _merged_vs_pruned(criteria, keeps, win, n: int) -> list[str]:
    """Per merged criterion: in how many models merging beats dropping the same experts."""
    merged = [c for c in criteria if MERGE_TAG in c]
    if not merged:
        return []
    out = ["## Merging against pruning the same kept set", "",
           f"Models (of {n}) in which the merged model's KL is at most the pruned one's (same kept experts, "
           f"the dropped ones folded in instead of removed). {n}/{n}: merging at least as good in every model.", "",
           "| merged | " + " | ".join(f"M={k} {s}" for k in keeps for s in ("in", "out", "mixed")) + " |",
           "|---|" + "---:|" * (3 * len(keeps))]
    for c in merged:
        base = c.split(MERGE_TAG)[0]
        cells = [f"{win.get(('kl', k, s, c, base), '—')}/{n}" for k in keeps for s in ("in", "out", "mixed")]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    return out + [""]


def write_plot(path: Path, runs, agg: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8})
    first = runs[0]["summary"]
    criteria = row_criteria(first["run"])
    e = next(r["n_routed_experts"] for r in runs[0]["rows"])
    keeps = [k for k in sorted(first["run"]["keeps"]) if k < e]
    index = {(r["criterion"], r["keep"], r["setting"]): r for r in agg if r["metric"] == "kl"}
    titles = {"in": "selected and measured on the same domain", "out": "measured on the other domains",
              "mixed": "selected on all domains (mixed)"}
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
    for ax, setting in zip(axes, ("in", "out", "mixed")):
        for criterion in criteria:
            pts = [(k, index[(criterion, k, setting)]) for k in keeps if (criterion, k, setting) in index]
            if not pts:
                continue
            color, ls, marker = STYLE.get(criterion, ("black", "-", "."))
            xs = [k for k, _ in pts]
            ax.plot(xs, [r["mean"] for _, r in pts], color=color, linestyle=ls, marker=marker, markersize=4,
                    label=criterion)
            ax.fill_between(xs, [r["min"] for _, r in pts], [r["max"] for _, r in pts], color=color, alpha=0.12,
                            linewidth=0)
        ax.set_title(titles[setting])
        ax.set_yscale("log")
        ax.set_xticks(keeps)
        ax.set_xlabel(f"experts kept per layer, M (of {e})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL(full ‖ pruned), nats/token")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"KL vs M over {len(runs)} independently trained models: line = mean, band = min–max")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def aggregate_runs(dirs, output) -> Path:
    """Writes OUTPUT/{table.md, aggregate.csv, wins.csv, results_all.csv, quality_vs_m.png}."""
    runs = load_runs(dirs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    wins = win_counts(runs)
    write_csv(output / "aggregate.csv", agg, AGGREGATE_FIELDS)
    write_csv(output / "wins.csv", wins, WIN_FIELDS)
    all_rows = [{"model": run["name"], **r} for run in runs for r in run["rows"]]
    write_csv(output / "results_all.csv", all_rows, ("model", *runs[0]["rows"][0].keys()))
    io.write_text_atomic(output / "table.md", render(runs, agg, wins))
    write_plot(output / "quality_vs_m.png", runs, agg)
    return output

