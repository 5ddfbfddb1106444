"""Side-by-side comparison of every expert-selection criterion on one checkpoint.

    python launch/compare.py --hf-checkpoint CKPT --demos CALIB.jsonl:DOMAIN [...] \
        --heldout HELDOUT.jsonl:DOMAIN [...] --keep 4 8 12 --output DIR

What it does (one process, world of 1, CPU or one GPU):
1. Scores every calibration demonstration once (`scoring.run_scoring`, with C-Prune features).
2. Runs the FULL model once over the held-out text of every domain and keeps its next-token
   log-probabilities (the reference for KL and top-1 agreement).
3. For every M in the grid, every criterion (easyep, its ablations easyep_no_token /
   easyep_no_norm, gate, frequency, random over several seeds, layer-wise C-Prune) and every
   selection domain (each single domain, and `mixed` = all domains with the reference's L1 mixing
   rule): builds the Selection, exports the pruned HF checkpoint into a temporary directory with
   the project's exporter, loads it in Megatron and measures on the held-out text of EVERY
   domain: KL(full || pruned) of the next-token distribution (mean per token), top-1 agreement
   with the full model, perplexity. Selections that come out identical (random does not depend
   on the domain; every criterion keeps everything at M = E) are evaluated once and share a
   `selection_id`.
4. Re-scores with the first n = 1, 2, 4, ... demonstrations of each domain (`max_demos=n`, a
   real scoring run per n; with equal-length demos "the n longest" are the first n in file order,
   so the sets are nested) and measures how much of the all-demos top-M set the n-demo top-M set
   recovers; and the Jaccard index of top-M sets between domains, per layer.

Conventions
-----------
- Tokens: every held-out position that has a next token (positions 0..T-2 of each sequence).
  KL, top-1 and perplexity use the same positions. KL is computed in float64 from float32
  log-softmax; identical logits give exactly 0.
- Group policy per M: `equal-per-group` when the routing constraints accept M
  (selection.validate_feasibility), else `collapse`; the same for every criterion at that M
  (recorded in every row). C-Prune under equal-per-group keeps each routing group's best M/n_group
  experts by its vote ranking (cprune.exportable_layout), so the group rule can override the
  clustering inside a group.
- C-Prune (`cprune`): layer-wise step only (one batch of all the selection domain's demos,
  K = max(2, M//2) clusters, megatron_easyep.cprune); features of the selection domain's
  demonstrations only.
- C-Prune with the global step (`cprune_global`): the layer-wise step keeps ceil(1.5 M) experts
  per layer (rounded up to a routable count), then the global step re-clusters those survivors of
  all layers together and keeps M x layers of them, at least the smallest routable count per layer
  (converters/cprune_select.py --global-keep-ratio). Same group policy as every criterion at that
  M; under equal-per-group the per-layer counts are rounded to multiples of n_group keeping their
  sum (largest remainder first; `group_rounded_counts`). The uneven counts are exported as
  `disable` slots, so the AVERAGE enabled count per layer is exactly M (the checkpoint stores the
  largest layer's count as slots; selections.json has the kept and disabled ids).
- Random: seeds seed, seed+1, ..., seed+random_seeds-1 (selection.select_experts' generator).
- Held-out: the first `heldout_per_domain` sequences of each domain in file order (all if None).
- The MTP layer (if any) is dropped from the pruned checkpoints: evaluation does not use it.

Outputs in DIR: results.csv (one row per pruned model x held-out domain), table.md, selections.json,
overlap_demos.csv, overlap_domains.csv, summary.json, the plots quality_vs_m.png,
score_heatmaps.png, overlap_demos.png, overlap_domains.png, scores/ (the scoring run) and
evaluations/ (one JSON per evaluated pruned model, keyed by selection_id and a fingerprint of the
checkpoint and held-out inputs: `resume=True` continues a killed run without evaluating those
again). `rerender(DIR)` rewrites table.md and the plots from these files alone.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_easyep import cprune
from megatron_easyep.selection import (
    KNOWN_METRICS,
    RANDOM_METRIC,
    SelectionError,
    load_scores,
    select_for_checkpoint,
    selection_from_kept,
    validate_feasibility,
)

CPRUNE = "cprune"
CPRUNE_GLOBAL = "cprune_global"
CRITERIA = (*KNOWN_METRICS, RANDOM_METRIC, CPRUNE, CPRUNE_GLOBAL)
GLOBAL_SURVIVORS = 1.5  # cprune_global: the layer-wise step keeps ceil(1.5 M) per layer
MIXED = "mixed"
EQUAL, COLLAPSE = "equal-per-group", "collapse"
CSV_FIELDS = ("criterion", "seed", "selection_domain", "keep", "n_routed_experts", "group_policy",
              "eval_domain", "tokens", "kl", "top1", "nll", "ppl", "nll_full", "ppl_full",
              "selection_id")
OVERLAP_METRICS = KNOWN_METRICS
DEMOS_OVERLAP_FIELDS = ("metric", "domain", "demos", "keep", "group_policy", "layer", "overlap")
DOMAINS_OVERLAP_FIELDS = ("metric", "domain_a", "domain_b", "keep", "group_policy", "layer", "jaccard")
SUMMARY_FORMAT = "megatron-easyep-compare/1"
EVALUATIONS = "evaluations"  # one JSON per evaluated selection (for --resume)
PLOTS = ("quality_vs_m.png", "score_heatmaps.png", "overlap_demos.png", "overlap_domains.png")


class CompareError(ValueError):
    """A comparison request that cannot be run as asked."""


@dataclass
class CompareRun:
    hf_checkpoint: str
    demos: list[str]  # calibration FILE:DOMAIN
    heldout: list[str]  # held-out FILE:DOMAIN
    output: str
    keeps: list[int]  # the M grid
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    random_seeds: int = 3
    seed: int = 0
    max_length: int | None = 4096
    heldout_per_domain: int | None = None
    demo_counts: list[int] | None = None  # default: 1, 2, 4, ... below the smallest domain's count
    overlap_keep: int | None = None  # M of the overlap analyses and the heatmap marks (default E/2)
    batch_size: int = 8
    dtype: str | None = None
    threads: int | None = None
    overwrite: bool = False
    resume: bool = False  # reuse OUTPUT/evaluations/ of an interrupted run with the same inputs


def _log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# selections
# --------------------------------------------------------------------------------------------


def group_policy_for(keep: int, config) -> str:
    """equal-per-group when routing accepts M under it, else collapse (CompareError if neither)."""
    routing = dict(n_routed_experts=config.n_routed_experts, n_group=config.n_group,
                   topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    try:
        validate_feasibility(keep=keep, group_policy=EQUAL, **routing)
        return EQUAL
    except SelectionError:
        pass
    try:
        validate_feasibility(keep=keep, group_policy=COLLAPSE, **routing)
    except SelectionError as err:
        raise CompareError(f"M={keep} is not routable under either group policy: {err}") from None
    return COLLAPSE


def demo_ranges(scores) -> dict[str, range]:
    """Indices of each domain's demonstrations in the scoring order (load_demos groups them by
    domain, domains in order of first appearance) = the N axis of the C-Prune features."""
    counts = scores.meta["demos_per_domain"]
    out, start = {}, 0
    for domain in scores.domains:
        out[domain] = range(start, start + int(counts[domain]))
        start += int(counts[domain])
    return out


def cprune_selection(config, features: np.ndarray, demo_index, keep: int, group_policy: str,
                     scores_sha256: str | None, layers):
    """Layer-wise C-Prune on the given demonstrations' features -> Selection (converters/
    cprune_select.py without --global-keep-ratio, features restricted to `demo_index`)."""
    subset = np.asarray(features[:, :, list(demo_index), :])
    layerwise = cprune.layerwise_selection(subset, keep)
    layout = cprune.exportable_layout(
        [r.tolist() for r in layerwise.ranking], [keep] * len(layers), group_policy=group_policy,
        n_routed_experts=config.n_routed_experts, n_group=config.n_group,
        topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    return selection_from_kept(config, dict(zip(layers, layout.kept)), group_policy=group_policy,
                               metric=CPRUNE, scores_sha256=scores_sha256)


def group_rounded_counts(counts, multiple: int, caps) -> list[int]:
    """Per-layer counts rounded to multiples of `multiple` with the same sum (the sum and every
    cap must be multiples): round down, then give one `multiple` back to the layers with the
    largest remainders (ties: the larger count, as the global step ranked it higher; then the
    earlier layer), never above a layer's cap."""
    counts = [int(c) for c in counts]
    if sum(counts) % multiple or any(int(cap) % multiple for cap in caps):
        raise CompareError(f"cannot round counts {counts} to multiples of {multiple} with caps {list(caps)}")
    rounded = [c - c % multiple for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-(counts[i] % multiple), -counts[i], i))
    for i in order[:(sum(counts) - sum(rounded)) // multiple]:
        rounded[i] += multiple  # c % multiple > 0 and c <= cap, so this stays <= cap
    return rounded


def cprune_global_selection(config, features: np.ndarray, demo_index, keep: int, group_policy: str,
                            scores_sha256: str | None, layers):
    """C-Prune with the global step at an average of `keep` enabled experts per layer (module
    docstring), exported with `disable` slots."""
    subset = np.asarray(features[:, :, list(demo_index), :])
    routing = dict(n_routed_experts=config.n_routed_experts, group_policy=group_policy,
                   n_group=config.n_group, topk_group=config.topk_group, top_k=config.num_experts_per_tok)
    survivors = cprune.feasible_count(min(config.n_routed_experts, math.ceil(GLOBAL_SURVIVORS * keep)),
                                      **routing)
    layerwise = cprune.layerwise_selection(subset, survivors)
    result = cprune.global_selection(subset, layerwise.kept, keep * len(layers),
                                     per_layer_min=cprune.feasible_count(1, **routing))
    counts = result.counts
    if group_policy == EQUAL and config.n_group > 1:
        counts = group_rounded_counts(counts, config.n_group, [survivors] * len(counts))
    rankings = [cprune.final_ranking(r, k) for r, k in zip(layerwise.ranking, result.kept)]
    layout = cprune.exportable_layout(rankings, counts, uneven="disable", **routing)
    return selection_from_kept(config, dict(zip(layers, layout.kept)), dict(zip(layers, layout.disabled)),
                               group_policy=group_policy, metric=CPRUNE_GLOBAL, scores_sha256=scores_sha256)


def selection_id(selection) -> str:
    """Short hash of what the pruned model is: kept (and disabled) ids and routing groups."""
    key = {"kept": {str(k): list(v) for k, v in selection.kept.items()},
           "disabled": {str(k): list(v) for k, v in (selection.disabled or {}).items()},
           "n_group": selection.n_group, "topk_group": selection.topk_group}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Request:
    criterion: str
    keep: int
    selection_domain: str  # a domain or MIXED
    seed: int | None
    group_policy: str

    @property
    def label(self) -> str:
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"{self.criterion}{seed} M={self.keep} sel={self.selection_domain}"


def build_requests(run: CompareRun, domains, config) -> list[Request]:
    seeds = [run.seed + i for i in range(run.random_seeds)]
    out = []
    for keep in run.keeps:
        policy = group_policy_for(keep, config)
        for criterion in run.criteria:
            for sel in [*domains, MIXED]:
                for seed in (seeds if criterion == RANDOM_METRIC else [None]):
                    out.append(Request(criterion, keep, sel, seed, policy))
    return out


def make_selection(req: Request, scores, config, features, ranges):
    domains = list(scores.domains) if req.selection_domain == MIXED else [req.selection_domain]
    if req.criterion in (CPRUNE, CPRUNE_GLOBAL):
        index = [i for d in domains for i in ranges[d]]
        if req.criterion == CPRUNE_GLOBAL:
            return cprune_global_selection(config, features, index, req.keep, req.group_policy,
                                           scores.sha256, list(scores.layers))
        return cprune_selection(config, features, index, req.keep, req.group_policy, scores.sha256,
                                list(scores.layers))
    return select_for_checkpoint(scores, config, keep=req.keep, metric=req.criterion,
                                 domains=domains, group_policy=req.group_policy,
                                 seed=req.seed if req.seed is not None else 0)


# --------------------------------------------------------------------------------------------
# held-out evaluation
# --------------------------------------------------------------------------------------------


def forward_batched(model, seqs: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """fp32 logits [len, V] of every sequence; batches right-padded with token 0 (attention is
    causal and MoE routing dropless, so padding never changes a real position)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long, device=device)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s, device=device)
        pos = torch.arange(length, device=device).unsqueeze(0).expand(len(chunk), length)
        logits = model(ids, pos, None)
        out.extend(logits[i, :len(s)].float().cpu() for i, s in enumerate(chunk))
    return out


@dataclass
class Reference:
    """The full model on one domain's held-out sequences (positions with a next token)."""

    seqs: list[list[int]]
    logp: list[torch.Tensor]  # [T-1, V] float32 log-softmax
    top1: list[torch.Tensor]  # [T-1]
    targets: list[torch.Tensor]  # [T-1]
    nll: float = 0.0
    tokens: int = 0


def reference_of(seqs: list[list[int]], logits: list[torch.Tensor]) -> Reference:
    ref = Reference(seqs=seqs, logp=[], top1=[], targets=[])
    nll = 0.0
    for s, lg in zip(seqs, logits):
        logp = torch.log_softmax(lg[:-1].float(), dim=-1)
        target = torch.tensor(s[1:], dtype=torch.long)
        ref.logp.append(logp)
        ref.top1.append(logp.argmax(-1))
        ref.targets.append(target)
        nll -= logp.double().gather(1, target[:, None]).sum().item()
        ref.tokens += len(s) - 1
    ref.nll = nll / max(ref.tokens, 1)
    return ref


def measure(ref: Reference, logits: list[torch.Tensor]) -> dict:
    """KL(full || pruned) mean per token, top-1 agreement, NLL and perplexity of the pruned
    model on the reference's positions."""
    kl = agree = nll = 0.0
    for p_log, p_top, target, lg in zip(ref.logp, ref.top1, ref.targets, logits):
        q_log = torch.log_softmax(lg[:-1].float(), dim=-1)
        p64, q64 = p_log.double(), q_log.double()
        kl += float((p64.exp() * (p64 - q64)).sum())
        agree += float((q_log.argmax(-1) == p_top).sum())
        nll -= float(q64.gather(1, target[:, None]).sum())
    n = max(ref.tokens, 1)
    return {"tokens": ref.tokens, "kl": kl / n, "top1": agree / n, "nll": nll / n,
            "ppl": math.exp(nll / n), "nll_full": ref.nll, "ppl_full": math.exp(ref.nll)}


def load_heldout(run: CompareRun, config) -> dict[str, list[list[int]]]:
    from megatron_easyep import demos as demos_lib

    demo_list = demos_lib.load_demos(run.heldout, run.hf_checkpoint, vocab_size=config.vocab_size,
                                     max_length=run.max_length)
    out: dict[str, list[list[int]]] = {}
    for demo in demo_list:
        if len(demo.input_ids) < 2:
            continue  # predicts nothing
        seqs = out.setdefault(demo.domain, [])
        if run.heldout_per_domain is None or len(seqs) < run.heldout_per_domain:
            seqs.append(list(demo.input_ids))
    if not out:
        raise CompareError(f"no held-out sequence of >= 2 tokens in {run.heldout}")
    return out


def evaluate_checkpoint(ckpt_dir, heldout, refs, dtype, batch_size) -> dict[str, dict]:
    from megatron_easyep import model as model_lib

    _, model = model_lib.load_megatron_model(str(ckpt_dir), dtype=dtype)
    try:
        with torch.no_grad():
            return {d: measure(refs[d], forward_batched(model, seqs, batch_size))
                    for d, seqs in heldout.items()}
    finally:
        del model
        gc.collect()


# --------------------------------------------------------------------------------------------
# overlap analyses
# --------------------------------------------------------------------------------------------


def overlap(a, b) -> float:
    return len(set(a) & set(b)) / max(len(a), 1)


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / max(len(a | b), 1)


def random_jaccard(config, keep: int, policy: str) -> float:
    """Expected Jaccard index of two independent uniformly random top-M selections under the
    group policy (exact): the intersection is a sum of independent hypergeometric counts, one per
    routing group (equal-per-group) or one over all experts (collapse)."""
    from scipy.stats import hypergeom

    groups = config.n_group if policy == EQUAL else 1
    size, per_group = config.n_routed_experts // groups, keep // groups
    pmf = np.array([1.0])
    one = hypergeom.pmf(np.arange(per_group + 1), size, per_group, per_group)
    for _ in range(groups):
        pmf = np.convolve(pmf, one)
    k = np.arange(len(pmf))
    return float((pmf * k / (2 * keep - k)).sum())


def domain_selection(scores, config, metric, domain, keep, policy):
    return select_for_checkpoint(scores, config, keep=keep, metric=metric, domains=[domain],
                                 group_policy=policy).kept


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _validate(run: CompareRun, config) -> None:
    if not run.demos:
        raise CompareError("no calibration demonstrations (--demos)")
    if not run.heldout:
        raise CompareError("no held-out text (--heldout)")
    if not run.keeps:
        raise CompareError("empty M grid (--keep)")
    unknown = [c for c in run.criteria if c not in CRITERIA]
    if unknown:
        raise CompareError(f"unknown criteria {unknown}; choose from {list(CRITERIA)}")
    if len(set(run.criteria)) != len(run.criteria) or len(set(run.keeps)) != len(run.keeps):
        raise CompareError("duplicate criteria or M values")
    if RANDOM_METRIC in run.criteria and run.random_seeds < 1:
        raise CompareError(f"random needs at least one seed, got {run.random_seeds}")
    for name in ("batch_size", "heldout_per_domain", "overlap_keep", "threads"):
        value = getattr(run, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CompareError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for keep in run.keeps + ([run.overlap_keep] if run.overlap_keep is not None else []):
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= config.n_routed_experts:
            raise CompareError(f"M={keep!r} must be within 1..{config.n_routed_experts}")
        group_policy_for(keep, config)
    if run.demo_counts is not None and any(n < 1 for n in run.demo_counts):
        raise CompareError(f"demo counts must be positive, got {run.demo_counts}")


def run_compare(run: CompareRun) -> Path:
    from megatron_easyep import distributed
    from megatron_easyep.export import export_pruned
    from megatron_easyep.hf_checkpoint import DeepseekV3Config
    from megatron_easyep.scoring import ScoreRun, _resolve_dtype, run_scoring

    started = time.perf_counter()
    config = DeepseekV3Config.load(run.hf_checkpoint)
    _validate(run, config)
    output = Path(run.output).resolve()
    if run.resume and run.overwrite:
        raise CompareError("--resume and --overwrite exclude each other")
    if run.resume and not (output / EVALUATIONS).is_dir():
        raise CompareError(f"--resume: {output / EVALUATIONS} does not exist (nothing to resume)")
    if output.exists() and not (run.overwrite or run.resume):
        raise CompareError(f"output directory {output} exists; pass --overwrite to replace it "
                           "(or --resume to continue an interrupted run)")
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    dtype = _resolve_dtype(run.dtype, config)
    heldout = load_heldout(run, config)  # validates the files before any compute
    if run.overwrite:
        shutil.rmtree(output / EVALUATIONS, ignore_errors=True)
    for stale in output.glob(".compare-*"):  # temporary exports of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    (output / EVALUATIONS).mkdir(parents=True, exist_ok=True)
    fingerprint = _evaluation_fingerprint(run, config)
    distributed.init_parallel(1, seed=run.seed)
    want_features = CPRUNE in run.criteria or CPRUNE_GLOBAL in run.criteria

    # 1. one scoring run with every demonstration
    _log(f"scoring {len(run.demos)} demo file(s) with all demonstrations"
         + (" (+ C-Prune features)" if want_features else ""))
    t0 = time.perf_counter()
    run_scoring(ScoreRun(hf_checkpoint=run.hf_checkpoint, demos=list(run.demos), output=str(output / "scores"),
                         max_length=run.max_length, dtype=run.dtype, overwrite=True, seed=run.seed,
                         cprune_features=want_features, log_every=50))
    timings = {"scoring_s": time.perf_counter() - t0}
    scores = load_scores(output / "scores")
    domains = list(scores.domains)
    ranges = demo_ranges(scores)
    features = cprune.load_features(scores.directory) if want_features else None
    _log(f"domains {domains}, demos per domain {scores.meta['demos_per_domain']}, tokens {scores.tokens}")

    # 2. the full model's reference distributions
    t0 = time.perf_counter()
    from megatron_easyep import model as model_lib

    _, full = model_lib.load_megatron_model(run.hf_checkpoint, dtype=dtype)
    with torch.no_grad():
        refs = {d: reference_of(seqs, forward_batched(full, seqs, run.batch_size)) for d, seqs in heldout.items()}
    del full
    gc.collect()
    timings["reference_s"] = time.perf_counter() - t0
    _log("full model on held-out: " + ", ".join(
        f"{d} {r.tokens} tokens ppl {math.exp(r.nll):.3f}" for d, r in refs.items()))

    # 3. every pruned model
    requests = build_requests(run, domains, config)
    selections, rows, evaluated, resumed = {}, [], {}, 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".compare-exports-", dir=output) as tmp:
        for i, req in enumerate(requests, 1):
            sel = make_selection(req, scores, config, features, ranges)
            sid = selection_id(sel)
            selections[f"{req.criterion}|{req.seed}|{req.selection_domain}|{req.keep}"] = {
                **asdict(req), "selection_id": sid,
                "kept": {str(k): list(v) for k, v in sel.kept.items()},
                "disabled": {str(k): list(v) for k, v in (sel.disabled or {}).items()}}
            note = ""
            if sid not in evaluated:
                stored = _load_evaluation(output, sid, fingerprint) if run.resume else None
                if stored is not None:
                    evaluated[sid] = stored
                    resumed += 1
                    note = " (from the interrupted run)"
                else:
                    dst = Path(tmp) / sid
                    export_pruned(run.hf_checkpoint, dst, sel, mtp="drop", overwrite=True)
                    evaluated[sid] = evaluate_checkpoint(dst, heldout, refs, dtype, run.batch_size)
                    shutil.rmtree(dst, ignore_errors=True)
                    _store_evaluation(output, sid, fingerprint, evaluated[sid])
            else:
                note = " (same selection as an earlier one: reused)"
            result = evaluated[sid]
            for d, r in result.items():
                rows.append({"criterion": req.criterion, "seed": "" if req.seed is None else req.seed,
                             "selection_domain": req.selection_domain, "keep": req.keep,
                             "n_routed_experts": config.n_routed_experts, "group_policy": req.group_policy,
                             "eval_domain": d, **r, "selection_id": sid})
            elapsed = time.perf_counter() - t0
            _log(f"{i}/{len(requests)} {req.label}: " + ", ".join(
                f"{d} KL {r['kl']:.4f} top1 {r['top1']:.3f} ppl {r['ppl']:.2f}" for d, r in result.items())
                + f"{note}  [{len(evaluated)} models, {elapsed:.0f} s]")
    timings["pruned_models_s"] = time.perf_counter() - t0
    timings["pruned_models"] = len(evaluated)
    timings["pruned_models_from_interrupted_run"] = resumed  # their time is not in pruned_models_s

    # 4. overlap analyses
    t0 = time.perf_counter()
    overlap_keep = run.overlap_keep or _default_overlap_keep(config)
    overlap_policy = group_policy_for(overlap_keep, config)
    demos_overlap = overlap_vs_demos(run, scores, config, overlap_keep, overlap_policy, output)
    domains_overlap = overlap_between_domains(scores, config, overlap_keep, overlap_policy)
    timings["overlap_s"] = time.perf_counter() - t0

    # 5. files
    _write_csv(output / "results.csv", rows, CSV_FIELDS)
    _write_csv(output / "overlap_demos.csv", demos_overlap, DEMOS_OVERLAP_FIELDS)
    _write_csv(output / "overlap_domains.csv", domains_overlap, DOMAINS_OVERLAP_FIELDS)
    (output / "selections.json").write_text(json.dumps(selections, indent=1) + "\n")
    summary = {"format": SUMMARY_FORMAT, "run": asdict(run),
               "checkpoint_config_hash": config.config_hash, "domains": domains,
               "heldout_domains": list(heldout),
               "heldout_sequences": {d: len(s) for d, s in heldout.items()},
               "heldout_tokens": {d: r.tokens for d, r in refs.items()},
               "full_ppl": {d: math.exp(r.nll) for d, r in refs.items()},
               "group_policy_by_keep": {str(k): group_policy_for(k, config) for k in run.keeps},
               "overlap_keep": overlap_keep,
               "random_seeds": [run.seed + i for i in range(run.random_seeds)]
               if RANDOM_METRIC in run.criteria else [],
               "timings": timings}
    write_reports(output, summary, rows, scores, config, demos_overlap, domains_overlap)
    timings["total_s"] = time.perf_counter() - started
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log(f"wrote {output} ({len(evaluated)} pruned models, {timings['total_s']:.0f} s)")
    return output


def _evaluation_fingerprint(run: CompareRun, config) -> str:
    """What a stored evaluation depends on besides the selection: checkpoint, held-out text and
    how it is read, numerics."""
    from megatron_easyep import demos as demos_lib

    files = [{"spec": spec, "sha256": demos_lib.file_sha256(demos_lib.DemoFile.parse(spec).path)}
             for spec in run.heldout]
    key = {"config_hash": config.config_hash, "heldout": files, "heldout_per_domain": run.heldout_per_domain,
           "max_length": run.max_length, "dtype": run.dtype, "batch_size": run.batch_size,
           "weights": _weights_digest(run.hf_checkpoint)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _weights_digest(ckpt_dir) -> list:
    """Names, sizes and modification times of the weight files (cheap; a retrained checkpoint
    with the same config differs here)."""
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in Path(ckpt_dir).glob("*.safetensors"))


def _load_evaluation(output: Path, sid: str, fingerprint: str) -> dict | None:
    path = output / EVALUATIONS / f"{sid}.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn write of a killed run: evaluate again
    return stored["result"] if stored.get("fingerprint") == fingerprint else None


def _store_evaluation(output: Path, sid: str, fingerprint: str, result: dict) -> None:
    path = output / EVALUATIONS / f"{sid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "result": result}, indent=1) + "\n")
    os.replace(tmp, path)


def write_reports(output: Path, summary: dict, rows, scores, config, demos_overlap, domains_overlap) -> None:
    """table.md and the plots, from the measured rows (both run_compare and rerender)."""
    (output / "table.md").write_text(render_tables(rows, summary, config, domains_overlap))
    write_plots(output, rows, scores, config, domains_overlap, demos_overlap, summary["overlap_keep"],
                group_policy_for(summary["overlap_keep"], config))


def _read_csv(path: Path) -> list[dict]:
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


def rerender(output) -> Path:
    """Rewrite table.md and the plots of a finished comparison from its files (results.csv,
    overlap_*.csv, summary.json, scores/) without recomputing anything; the checkpoint's
    config.json must still be where the run read it."""
    from megatron_easyep.hf_checkpoint import DeepseekV3Config

    output = Path(output).resolve()
    summary_path = output / "summary.json"
    if not summary_path.is_file():
        raise CompareError(f"{summary_path} does not exist: not a finished comparison")
    summary = json.loads(summary_path.read_text())
    if summary.get("format") != SUMMARY_FORMAT:
        raise CompareError(f"{summary_path}: format {summary.get('format')!r}, expected {SUMMARY_FORMAT!r}")
    config = DeepseekV3Config.load(summary["run"]["hf_checkpoint"])
    if config.config_hash != summary["checkpoint_config_hash"]:
        raise CompareError(f"{summary['run']['hf_checkpoint']} is no longer the checkpoint the comparison ran on")
    write_reports(output, summary, _read_csv(output / "results.csv"), load_scores(output / "scores"), config,
                  _read_csv(output / "overlap_demos.csv"), _read_csv(output / "overlap_domains.csv"))
    _log(f"re-rendered {output}/table.md and plots")
    return output


def _default_overlap_keep(config) -> int:
    half = config.n_routed_experts // 2
    try:
        group_policy_for(half, config)
        return half
    except CompareError:
        return config.n_routed_experts


def overlap_vs_demos(run, scores, config, keep, policy, output) -> list[dict]:
    """Share of the all-demos top-M set (per layer) that the top-M set from the first n demos of
    the domain recovers; one real scoring run per n."""
    from megatron_easyep.scoring import ScoreRun, run_scoring

    counts = {d: int(n) for d, n in scores.meta["demos_per_domain"].items()}
    if run.demo_counts is not None:
        ns = sorted(set(run.demo_counts))
    else:
        ns, n = [], 1
        while n < max(counts.values()):
            ns.append(n)
            n *= 2
    full = {(m, d): domain_selection(scores, config, m, d, keep, policy)
            for m in OVERLAP_METRICS for d in scores.domains}
    rows = []
    with tempfile.TemporaryDirectory(prefix=".compare-subsets-", dir=output) as tmp:
        for n in ns:
            if n >= max(counts.values()):
                sub = scores
            else:
                _log(f"overlap vs demonstrations: scoring with max_demos={n}")
                run_scoring(ScoreRun(hf_checkpoint=run.hf_checkpoint, demos=list(run.demos),
                                     output=str(Path(tmp) / f"n{n}"), max_length=run.max_length,
                                     max_demos=n, dtype=run.dtype, seed=run.seed, log_every=1000))
                sub = load_scores(Path(tmp) / f"n{n}")
            for m in OVERLAP_METRICS:
                for d in scores.domains:
                    kept = domain_selection(sub, config, m, d, keep, policy)
                    for layer in scores.layers:
                        rows.append({"metric": m, "domain": d, "demos": min(n, counts[d]), "keep": keep,
                                     "group_policy": policy, "layer": layer,
                                     "overlap": overlap(kept[layer], full[(m, d)][layer])})
    for m in OVERLAP_METRICS:  # the all-demos point (1 by definition; the curve's end)
        for d in scores.domains:
            if counts[d] not in ns:
                for layer in scores.layers:
                    rows.append({"metric": m, "domain": d, "demos": counts[d], "keep": keep,
                                 "group_policy": policy, "layer": layer, "overlap": 1.0})
    return rows


def overlap_between_domains(scores, config, keep, policy) -> list[dict]:
    rows = []
    for m in OVERLAP_METRICS:
        kept = {d: domain_selection(scores, config, m, d, keep, policy) for d in scores.domains}
        for a in scores.domains:
            for b in scores.domains:
                for layer in scores.layers:
                    rows.append({"metric": m, "domain_a": a, "domain_b": b, "keep": keep,
                                 "group_policy": policy, "layer": layer,
                                 "jaccard": jaccard(kept[a][layer], kept[b][layer])})
    return rows


def _write_csv(path: Path, rows: list[dict], fields) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})


# --------------------------------------------------------------------------------------------
# table.md
# --------------------------------------------------------------------------------------------


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
    criteria = list(run["criteria"])
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


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


STYLE = {"easyep": ("tab:red", "-", "o"), "easyep_no_token": ("tab:orange", "--", "v"),
         "easyep_no_norm": ("tab:pink", "--", "^"), "gate": ("tab:blue", "-", "s"),
         "frequency": ("tab:green", "-", "D"), "random": ("gray", ":", "x"),
         "cprune": ("tab:purple", "-.", "P"), "cprune_global": ("tab:brown", "-.", "*")}


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
    fig.savefig(output / "quality_vs_m.png", dpi=90)
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
    fig.savefig(output / "score_heatmaps.png", dpi=90)
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
    fig.savefig(output / "overlap_demos.png", dpi=90)
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
    fig.savefig(output / "overlap_domains.png", dpi=90)
    plt.close(fig)
