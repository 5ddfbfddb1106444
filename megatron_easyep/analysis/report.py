"""The comparison's report: result rows to CSV, table.md (laid out like the paper: rows =
criterion x M, columns = domains) and the PNG plots. Everything here reads finished rows, so
`compare.rerender` can redraw a finished run without recomputing anything.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from megatron_easyep.checkpoint import io
from megatron_easyep.analysis.measures import OVERLAP_METRICS, domain_selection, random_jaccard
from megatron_easyep.pruning import cprune
from megatron_easyep.pruning.selection import RANDOM_METRIC, SELECTABLE_METRICS, group_policy_for

CPRUNE, CPRUNE_GLOBAL = cprune.METRIC, cprune.GLOBAL_METRIC
MIXED = "mixed"  # selection on all domains together (the L1 mixing rule)
CRITERIA = (*SELECTABLE_METRICS, RANDOM_METRIC, CPRUNE, CPRUNE_GLOBAL)
CSV_FIELDS = ("criterion", "seed", "selection_domain", "keep", "n_routed_experts", "group_policy",
              "eval_domain", "tokens", "kl", "top1", "nll", "ppl", "nll_full", "ppl_full",
              "selection_id")
DEMOS_OVERLAP_FIELDS = ("metric", "domain", "demos", "keep", "group_policy", "layer", "overlap")
DOMAINS_OVERLAP_FIELDS = ("metric", "domain_a", "domain_b", "keep", "group_policy", "layer", "jaccard")
MERGE_TAG = "+merge:"  # a merged row's criterion: "<kept-set criterion>+merge:<rule label>"


def merged_criterion(criterion: str, rule_label: str) -> str:
    return f"{criterion}{MERGE_TAG}{rule_label}"


def row_criteria(run: dict) -> list[str]:
    """Every criterion a comparison's rows carry: the selection criteria, then each merge rule applied
    to each merged kept set (`CompareRun.merges` x `CompareRun.merge_of`; absent in older runs)."""
    criteria = list(run["criteria"])
    merge_of = [c for c in run.get("merge_of", []) if c in criteria]
    return criteria + [merged_criterion(c, rule) for rule in run.get("merges", []) for c in merge_of]


PLOTS = ("quality_vs_m.png", "score_heatmaps.png", "overlap_demos.png", "overlap_domains.png")


def write_reports(output: Path, summary: dict, rows, scores, config, demos_overlap, domains_overlap) -> None:
    """table.md and the plots, from the measured rows (both run_compare and rerender)."""
    io.write_text_atomic(output / "table.md", render_tables(rows, summary, config, domains_overlap))
    write_plots(output, rows, scores, config, domains_overlap, demos_overlap, summary["overlap_keep"],
                group_policy_for(summary["overlap_keep"], config))


def read_csv(path: Path) -> list[dict]:
    ints = {"keep", "n_routed_experts", "tokens", "demos", "layer"}
    floats = {"kl", "top1", "nll", "ppl", "nll_full", "ppl_full", "overlap", "jaccard"}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in ints or (key == "seed" and value != ""):
                row[key] = int(value)
            elif key in floats:
                row[key] = float(value)
    return rows


def write_csv(path: Path, rows: list[dict], fields) -> None:
    with io.atomic_file(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})


def save_figure(fig, path: Path) -> None:
    """A PNG written atomically (a killed run leaves the previous plot or none, never a part)."""
    with io.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=90)


METRIC_LABEL = {"kl": "KL(full ‖ pruned), nats/token (lower is better)",
                "top1": "top-1 agreement with the full model, % (higher is better)",
                "ppl": "perplexity (lower is better)"}


def _fmt(metric: str, values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if metric == "top1":
        text = f"{100 * mean:.1f}"
        spread = 100 * _std(values)
        return text + (f" ± {spread:.1f}" if len(values) > 1 else "")
    if metric == "kl":
        text = f"{mean:.4f}" if mean < 10 else f"{mean:.2f}"
        return text + (f" ± {_std(values):.4f}" if len(values) > 1 else "")
    return f"{mean:.2f}" + (f" ± {_std(values):.2f}" if len(values) > 1 else "")


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def _index(rows):
    """{(criterion, keep, selection_domain, eval_domain): [values per seed row]} per metric."""
    index: dict = {}
    for r in rows:
        key = (r["criterion"], r["keep"], r["selection_domain"], r["eval_domain"])
        index.setdefault(key, []).append(r)
    return index


def _cell(index, metric, criterion, keep, sel_domains, eval_domain) -> list[float]:
    """Values for the cell; several selection domains: per seed, the mean over them."""
    per_seed: dict = {}
    for sel in sel_domains:
        for r in index.get((criterion, keep, sel, eval_domain), []):
            per_seed.setdefault(r["seed"], []).append(r[metric])
    return [sum(v) / len(v) for v in per_seed.values()]


def render_tables(rows, summary: dict, config, domains_overlap) -> str:
    index = _index(rows)
    run = summary["run"]
    domains, eval_domains = summary["domains"], summary["heldout_domains"]
    full_ppl, tokens = summary["full_ppl"], summary["heldout_tokens"]
    overlap_keep = summary["overlap_keep"]
    overlap_policy = group_policy_for(overlap_keep, config)
    keeps = sorted(run["keeps"])
    criteria = row_criteria(run)
    e = config.n_routed_experts
    policy = {k: group_policy_for(k, config) for k in keeps}
    out = ["# Expert-selection comparison", "",
           f"Checkpoint `{run['hf_checkpoint']}`: {config.num_hidden_layers} layers, {e} routed experts "
           f"per MoE layer, top-{config.num_experts_per_tok}, n_group {config.n_group} / topk_group "
           f"{config.topk_group}. Calibration domains: {', '.join(domains)}; held-out: "
           + ", ".join(f"{d} ({tokens[d]} tokens)" for d in eval_domains) + ". "
           f"Random: mean ± std over {run['random_seeds']} seeds. Group policy per M: "
           + ", ".join(f"M={k}: {policy[k]}" for k in keeps) + "."
           + (" cprune_global: C-Prune with the global cross-layer step, M = the average enabled "
              "experts per layer (uneven counts, disabled slots)." if CPRUNE_GLOBAL in criteria else ""),
           ""]

    # the README demo: prune for one domain
    demo_keeps = [k for k in keeps if k < e]
    if demo_keeps and "easyep" in criteria:
        out += ["## Pruning for one domain (easyep)", "",
                "Perplexity on each held-out domain; in parentheses the change vs the full model; "
                "bold: the domain the experts were selected on.", "",
                "| M | experts selected on | " + " | ".join(eval_domains) + " |",
                "|---:|---|" + "---:|" * len(eval_domains),
                f"| {e} | (full model) | " + " | ".join(f"{full_ppl[d]:.2f}" for d in eval_domains) + " |"]
        for keep in sorted(demo_keeps, reverse=True):
            for sel in [*domains, MIXED]:
                cells = []
                for d in eval_domains:
                    vals = _cell(index, "ppl", "easyep", keep, [sel], d)
                    if not vals:
                        cells.append("—")
                        continue
                    text = f"{vals[0]:.2f} ({100 * (vals[0] / full_ppl[d] - 1):+.0f}%)"
                    cells.append(f"**{text}**" if sel == d else text)
                label = "all (mixed)" if sel == MIXED else sel
                out.append(f"| {keep} ({policy[keep]}) | {label} | " + " | ".join(cells) + " |")
        out.append("")

    in_domains = [d for d in eval_domains if d in domains]
    for metric in ("kl", "top1", "ppl"):
        out += [f"## Single-domain selection: {METRIC_LABEL[metric]}", "",
                "In-domain: the row's experts were selected on the column's domain. Out-of-domain: "
                "mean over the selections made on each OTHER domain, measured on the column's domain.", "",
                "| criterion | M | " + " | ".join(f"in: {d}" for d in in_domains) + " | in: mean | "
                + " | ".join(f"out: {d}" for d in eval_domains) + " | out: mean |",
                "|---|---:|" + "---:|" * (len(in_domains) + len(eval_domains) + 2)]
        if metric == "ppl":
            full = [f"{full_ppl[d]:.2f}" for d in eval_domains]
            full_mean = sum(full_ppl[d] for d in eval_domains) / len(eval_domains)
            out.append(f"| full model | {e} | " + " | ".join(full[eval_domains.index(d)] for d in in_domains)
                       + f" | {full_mean:.2f} | " + " | ".join(full) + f" | {full_mean:.2f} |")
        for criterion in criteria:
            for keep in keeps:
                ins = [_cell(index, metric, criterion, keep, [d], d) for d in in_domains]
                outs = [_cell(index, metric, criterion, keep, [s for s in domains if s != d], d)
                        for d in eval_domains]
                out.append(f"| {criterion} | {keep} | " + " | ".join(_fmt(metric, v) for v in ins)
                           + f" | {_fmt(metric, _seedwise_mean(ins))} | "
                           + " | ".join(_fmt(metric, v) for v in outs)
                           + f" | {_fmt(metric, _seedwise_mean(outs))} |")
        out.append("")
        out += [f"## Mixed-domain selection (all domains, L1-mixed): {METRIC_LABEL[metric]}", "",
                "| criterion | M | " + " | ".join(eval_domains) + " | mean |",
                "|---|---:|" + "---:|" * (len(eval_domains) + 1)]
        if metric == "ppl":
            full = [full_ppl[d] for d in eval_domains]
            out.append(f"| full model | {e} | " + " | ".join(f"{v:.2f}" for v in full)
                       + f" | {sum(full) / len(full):.2f} |")
        for criterion in criteria:
            for keep in keeps:
                cells = [_cell(index, metric, criterion, keep, [MIXED], d) for d in eval_domains]
                out.append(f"| {criterion} | {keep} | " + " | ".join(_fmt(metric, v) for v in cells)
                           + f" | {_fmt(metric, _seedwise_mean(cells))} |")
        out.append("")

    out += [f"## Overlap of top-{overlap_keep} sets between domains ({overlap_policy})", "",
            "Jaccard index of the per-layer selected sets, averaged over MoE layers.", "",
            "| metric | " + " | ".join(f"{a}–{b}" for i, a in enumerate(domains) for b in domains[i + 1:])
            + " |", "|---|" + "---:|" * (len(domains) * (len(domains) - 1) // 2)]
    for m in OVERLAP_METRICS:
        cells = []
        for i, a in enumerate(domains):
            for b in domains[i + 1:]:
                vals = [r["jaccard"] for r in domains_overlap
                        if r["metric"] == m and r["domain_a"] == a and r["domain_b"] == b]
                cells.append(f"{sum(vals) / len(vals):.2f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append(f"| random (expected) | " + " | ".join(
        [f"{random_jaccard(config, overlap_keep, overlap_policy):.2f}"] * (len(domains) * (len(domains) - 1) // 2))
        + " |")
    out.append("")
    return "\n".join(out)


def _seedwise_mean(cells: list[list[float]]) -> list[float]:
    """Mean over columns, per seed (cells hold one value per seed, in the same seed order)."""
    cells = [c for c in cells if c]
    if not cells:
        return []
    return [sum(c[i] for c in cells) / len(cells) for i in range(min(len(c) for c in cells))]


STYLE = {"easyep": ("tab:red", "-", "o"), "easyep_no_token": ("tab:orange", "--", "v"),
         "easyep_no_norm": ("tab:pink", "--", "^"), "gate": ("tab:blue", "-", "s"),
         "frequency": ("tab:green", "-", "D"), "random": ("gray", ":", "x"),
         "cprune": ("tab:purple", "-.", "P"), "cprune_global": ("tab:brown", "-.", "*"),
         "reap": ("tab:olive", "--", "h")}


def write_plots(output, rows, scores, config, domains_overlap, demos_overlap, overlap_keep, policy) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8})
    domains = list(scores.domains)
    eval_domains = list(dict.fromkeys(r["eval_domain"] for r in rows))
    criteria = list(dict.fromkeys(r["criterion"] for r in rows))
    index = _index(rows)
    keeps = sorted({r["keep"] for r in rows})
    e = config.n_routed_experts

    # quality vs M: row 0 in-domain single-domain selection, row 1 mixed; one column per domain
    fig, axes = plt.subplots(2, len(eval_domains), figsize=(3.0 * len(eval_domains) + 0.6, 5.0),
                             squeeze=False, sharex=True)
    for col, d in enumerate(eval_domains):
        for row, sels in enumerate(([d] if d in domains else [], [MIXED])):
            ax = axes[row][col]
            for criterion in criteria:
                xs, ys, lo, hi = [], [], [], []
                for keep in keeps:
                    vals = _cell(index, "kl", criterion, keep, sels, d)
                    if not vals or max(vals) <= 0:  # M = E: exactly 0, not drawable on a log axis
                        continue
                    xs.append(keep)
                    ys.append(sum(vals) / len(vals))
                    lo.append(min(vals))
                    hi.append(max(vals))
                if not xs:
                    continue
                color, ls, marker = STYLE.get(criterion, ("black", "-", "."))
                ax.plot(xs, ys, color=color, linestyle=ls, marker=marker, markersize=4, label=criterion)
                if criterion == RANDOM_METRIC and len(xs):
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            title = f"held-out {d}: " + ("selected on " + d if row == 0 else "selected on all (mixed)")
            ax.set_title(title)
            ax.set_yscale("log")
            ax.set_xticks(keeps)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel(f"experts kept per layer, M (of {e})")
            if col == 0:
                ax.set_ylabel("KL(full ‖ pruned), nats/token")
    axes[0][0].legend(fontsize=7, loc="upper right")
    zero = [k for k in keeps if all(r["kl"] == 0 for r in rows if r["keep"] == k)]
    fig.suptitle("KL of the pruned model's next-token distribution vs M (lower is better; random: mean "
                 "and min–max over seeds)" + (f"\nM = {', '.join(map(str, zero))}: KL exactly 0 for every "
                                             "criterion (not drawn on the log axis)" if zero else ""))
    fig.tight_layout()
    save_figure(fig, output / "quality_vs_m.png")
    plt.close(fig)

    # per-layer easyep score heatmaps per domain, top-M marked
    fig, axes = plt.subplots(1, len(domains), figsize=(3.4 * len(domains), 0.5 + 0.45 * len(scores.layers) + 1.0),
                             squeeze=False)
    for col, d in enumerate(domains):
        ax = axes[0][col]
        rowsum = scores.rows("easyep", d).clone()
        norm = rowsum / rowsum.sum(dim=1, keepdim=True).clamp_min(1e-30)
        im = ax.imshow(norm.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        kept = domain_selection(scores, config, "easyep", d, overlap_keep, policy)
        for r, layer in enumerate(scores.layers):
            ax.scatter(kept[layer], [r] * len(kept[layer]), s=6, c="white", marker="o")
        ax.set_yticks(range(len(scores.layers)), [str(layer) for layer in scores.layers])
        ax.set_xticks(range(0, e, max(1, e // 8)))
        ax.set_xlabel("expert id")
        if col == 0:
            ax.set_ylabel("MoE layer")
        ax.set_title(f"easyep share per layer, {d}")
        if config.n_group > 1:
            for g in range(1, config.n_group):
                ax.axvline(g * e / config.n_group - 0.5, color="white", linewidth=0.5, alpha=0.6)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"EASY-EP scores (L1-normalised per layer); dots: top-{overlap_keep} ({policy})")
    fig.tight_layout()
    save_figure(fig, output / "score_heatmaps.png")
    plt.close(fig)

    # overlap vs number of demonstrations
    fig, axes = plt.subplots(1, len(domains), figsize=(3.0 * len(domains) + 0.6, 2.8), squeeze=False, sharey=True)
    for col, d in enumerate(domains):
        ax = axes[0][col]
        for m in OVERLAP_METRICS:
            pts: dict = {}
            for r in demos_overlap:
                if r["metric"] == m and r["domain"] == d:
                    pts.setdefault(r["demos"], []).append(r["overlap"])
            xs = sorted(pts)
            color, ls, marker = STYLE.get(m, ("black", "-", "."))
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], color=color, linestyle=ls, marker=marker,
                    markersize=4, label=m)
        ax.axhline(overlap_keep / e, color="gray", linestyle=":", label="random (M/E)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{d}")
        ax.set_xlabel("demonstrations scored")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel(f"overlap with all-demo top-{overlap_keep}")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Few-shot expert localisation: top-{overlap_keep} set from the first n demonstrations vs from "
                 "all of them (nested subsets; mean over layers)")
    fig.tight_layout()
    save_figure(fig, output / "overlap_demos.png")
    plt.close(fig)

    # overlap between domains: Jaccard matrices per metric (rows) and layer (+ mean)
    metrics = [m for m in ("easyep", "gate", "frequency") if m in OVERLAP_METRICS]
    cols = list(scores.layers) + ["mean"]
    fig, axes = plt.subplots(len(metrics), len(cols), figsize=(1.9 * len(cols) + 0.4, 1.9 * len(metrics) + 0.6),
                             squeeze=False)
    for r_i, m in enumerate(metrics):
        for c_i, layer in enumerate(cols):
            ax = axes[r_i][c_i]
            mat = np.zeros((len(domains), len(domains)))
            for i, a in enumerate(domains):
                for j, b in enumerate(domains):
                    vals = [r["jaccard"] for r in domains_overlap if r["metric"] == m and r["domain_a"] == a
                            and r["domain_b"] == b and (layer == "mean" or r["layer"] == layer)]
                    mat[i, j] = sum(vals) / len(vals)
            ax.imshow(mat, vmin=0, vmax=1, cmap="magma")
            for i in range(len(domains)):
                for j in range(len(domains)):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if mat[i, j] > 0.6 else "white")
            ax.set_xticks(range(len(domains)), domains, fontsize=6, rotation=45)
            ax.set_yticks(range(len(domains)), domains, fontsize=6)
            ax.set_title(f"{m}, " + (f"layer {layer}" if layer != "mean" else "mean"), fontsize=7)
    fig.suptitle(f"Jaccard of top-{overlap_keep} sets between domains "
                 f"(random expectation {random_jaccard(config, overlap_keep, policy):.2f})")
    fig.tight_layout()
    save_figure(fig, output / "overlap_domains.png")
    plt.close(fig)

