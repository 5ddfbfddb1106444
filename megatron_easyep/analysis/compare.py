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
   with the full model, perplexity. With `merges` (rule labels of pruning.merge.MergeRule), the
   kept sets of the `merge_of` criteria (default easyep, reap) are exported once more per rule with
   the dropped experts merged into the kept ones (export --merge); their rows' criterion is
   "<criterion>+merge:<rule>", and the merge uses the C-Prune features of the selection domain's
   demonstrations. Selections that come out identical (random does not depend
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
  experts by its vote ranking (pruning.cprune.exportable_layout), so the group rule can override the
  clustering inside a group.
- C-Prune (`cprune`): layer-wise step only (one batch of all the selection domain's demos,
  K = max(2, M//2) clusters, megatron_easyep.pruning.cprune); features of the selection domain's
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

import gc
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_easyep.analysis.measures import (
    OVERLAP_METRICS,
    domain_selection,
    measure,
    overlap,
    overlap_between_domains,
    reference_of,
)
from megatron_easyep.analysis.report import (
    CPRUNE,
    CPRUNE_GLOBAL,
    CRITERIA,
    CSV_FIELDS,
    DEMOS_OVERLAP_FIELDS,
    DOMAINS_OVERLAP_FIELDS,
    MIXED,
    merged_criterion,
    read_csv,
    write_csv,
    write_reports,
)
from megatron_easyep.checkpoint import io
from megatron_easyep.mcore import model as model_lib
from megatron_easyep.progress import Progress
from megatron_easyep.pruning import cprune
from megatron_easyep.pruning.merge import MergeRule, plan_merge
from megatron_easyep.pruning.selection import (
    RANDOM_METRIC,
    SELECTABLE_METRICS,
    SelectionError,
    group_policy_for,
    load_scores,
    select_for_checkpoint,
)

SUMMARY_FORMAT = "megatron-easyep-compare/1"
EVALUATIONS = "evaluations"  # one JSON per evaluated selection (for --resume)
MERGE_OF = ("easyep", "reap")  # the kept sets merged by default (--merge-of)


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
    merges: list[str] = field(default_factory=list)  # merge rule labels (pruning.merge.MergeRule.label)
    merge_of: list[str] = field(default_factory=lambda: list(MERGE_OF))  # kept sets that get merged rows


def _log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# selections
# --------------------------------------------------------------------------------------------


def demo_ranges(scores) -> dict[str, range]:
    """Indices of each domain's demonstrations in the scoring order (load_demos groups them by
    domain, domains in order of first appearance) = the N axis of the C-Prune features."""
    counts = scores.meta["demos_per_domain"]
    out, start = {}, 0
    for domain in scores.domains:
        out[domain] = range(start, start + int(counts[domain]))
        start += int(counts[domain])
    return out


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
    merge: str | None = None  # a merge rule label: the dropped experts are folded into the kept ones

    @property
    def row_criterion(self) -> str:
        return self.criterion if self.merge is None else merged_criterion(self.criterion, self.merge)

    @property
    def label(self) -> str:
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"{self.row_criterion}{seed} M={self.keep} sel={self.selection_domain}"


def build_requests(run: CompareRun, domains, config) -> list[Request]:
    """Every criterion's pruned models, then each merge rule over the merged kept sets, per M."""
    seeds = [run.seed + i for i in range(run.random_seeds)]
    merge_of = [c for c in run.merge_of if c in run.criteria] if run.merges else []
    out = []
    for keep in run.keeps:
        policy = group_policy_for(keep, config)
        for criterion in run.criteria:
            for sel in [*domains, MIXED]:
                for seed in (seeds if criterion == RANDOM_METRIC else [None]):
                    out.append(Request(criterion, keep, sel, seed, policy))
        for rule in run.merges:
            for criterion in merge_of:
                for sel in [*domains, MIXED]:
                    out.append(Request(criterion, keep, sel, None, policy, rule))
    return out


def model_id(req: Request, selection, merge) -> str:
    """What the evaluated checkpoint is: the selection, and the merge rule when it merges anything
    (a merge with nothing dropped, M = E, is the pruned model itself)."""
    sid = selection_id(selection)
    if merge is None or not any(merge.clusters.values()):
        return sid
    return hashlib.sha256(f"{sid}|merge|{req.merge}".encode()).hexdigest()[:12]


def merge_plan(req: Request, selection, scored, hf_checkpoint):
    """The merge of a merged request: C-Prune features restricted to the selection domain's demos."""
    scores, features, ranges = scored
    domains = list(scores.domains) if req.selection_domain == MIXED else [req.selection_domain]
    rule = MergeRule.parse(req.merge)
    own = None
    if features is not None:
        own = features[:, :, [i for d in domains for i in ranges[d]]]
    return plan_merge(hf_checkpoint, selection, scores, rule, features=own)


def make_selection(req: Request, scores, config, features, ranges):
    domains = list(scores.domains) if req.selection_domain == MIXED else [req.selection_domain]
    if req.criterion in (CPRUNE, CPRUNE_GLOBAL):
        index = [i for d in domains for i in ranges[d]]
        if req.criterion == CPRUNE_GLOBAL:
            return cprune.cprune_global_selection(config, features, index, req.keep, req.group_policy,
                                           scores.sha256, list(scores.layers))
        return cprune.cprune_selection(config, features, index, req.keep, req.group_policy, scores.sha256,
                                list(scores.layers))
    return select_for_checkpoint(scores, config, keep=req.keep, metric=req.criterion,
                                 domains=domains, group_policy=req.group_policy,
                                 seed=req.seed if req.seed is not None else 0)


# --------------------------------------------------------------------------------------------
# held-out evaluation
# --------------------------------------------------------------------------------------------


def load_heldout(run: CompareRun, config) -> dict[str, list[list[int]]]:
    from megatron_easyep.scoring import demos as demos_lib

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


def held_out_logits(ckpt_dir, heldout: dict[str, list[list[int]]], dtype: str | None, batch_size: int,
                    seed: int) -> dict[str, list[torch.Tensor]]:
    """fp32 logits [len, V] of every held-out sequence per domain, `batch_size` sequences per
    forward in file order (right-padded; attention is causal and routing dropless, so padding never
    changes a real position), on the shared model session (one process)."""
    from megatron_easyep.runtime.session import LogitsCollector, ModelSession, SessionSpec, forward_loop
    from megatron_easyep.scoring.demos import Demo

    session = ModelSession.open(SessionSpec(str(ckpt_dir), dtype=dtype, seed=seed))
    session.init_parallel()
    session.load_model()
    try:
        out = {}
        for domain, seqs in heldout.items():
            demos = [Demo(tuple(ids), domain, f"held-out {domain} #{i}") for i, ids in enumerate(seqs)]
            collector = LogitsCollector()
            forward_loop(session, session.plan_fixed_rows(demos, batch_size), [collector])
            out[domain] = collector.finalize(session)
        return out
    finally:
        session.model = None
        gc.collect()


def evaluate_checkpoint(ckpt_dir, heldout, refs, dtype: str | None, batch_size: int, seed: int) -> dict[str, dict]:
    logits = held_out_logits(ckpt_dir, heldout, dtype, batch_size, seed)
    return {d: measure(refs[d], logits[d]) for d in heldout}


# --------------------------------------------------------------------------------------------
# overlap analyses
# --------------------------------------------------------------------------------------------


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
        try:
            group_policy_for(keep, config)
        except SelectionError as err:
            raise CompareError(str(err)) from None
    for label in run.merges:
        try:
            MergeRule.parse(label)
        except ValueError as err:
            raise CompareError(f"--merge {label!r}: {err}") from None
    if len(set(run.merges)) != len(run.merges):
        raise CompareError(f"duplicate merge rules {run.merges}")
    if run.merges:
        unmergeable = [c for c in run.merge_of if c not in SELECTABLE_METRICS]
        if unmergeable:
            raise CompareError(f"--merge-of {unmergeable}: only score criteria can be merged "
                               f"({list(SELECTABLE_METRICS)})")
        if not any(c in run.criteria for c in run.merge_of):
            raise CompareError(f"--merge needs one of --merge-of {run.merge_of} among --criteria {run.criteria}")
    if run.demo_counts is not None and any(n < 1 for n in run.demo_counts):
        raise CompareError(f"demo counts must be positive, got {run.demo_counts}")


def _check_output(run: CompareRun) -> Path:
    output = Path(run.output).resolve()
    if run.resume and run.overwrite:
        raise CompareError("--resume and --overwrite exclude each other")
    if run.resume and not (output / EVALUATIONS).is_dir():
        raise CompareError(f"--resume: {output / EVALUATIONS} does not exist (nothing to resume)")
    if output.exists() and not (run.overwrite or run.resume):
        raise CompareError(f"output directory {output} exists; pass --overwrite to replace it "
                           "(or --resume to continue an interrupted run)")
    return output


def _pruned_models(run: CompareRun, output: Path, config, scored, heldout, refs, dtype: str, fingerprint: str):
    """Export and evaluate every requested selection (identical selections once; stored ones of
    an interrupted run reused). Returns (selections, csv rows, evaluations by id, how many resumed)."""
    from megatron_easyep.pruning.export import export_pruned

    scores, features, ranges = scored
    requests = build_requests(run, list(scores.domains), config)
    selections, rows, evaluated, resumed = {}, [], {}, 0
    t0 = time.perf_counter()
    progress = Progress("compare", len(requests), unit="models")
    # a cleanup that fails (read-only filesystem) must not hide the write error; run_compare removes
    # a leftover .compare-* at its next start
    with tempfile.TemporaryDirectory(prefix=".compare-exports-", dir=output, ignore_cleanup_errors=True) as tmp:
        for i, req in enumerate(requests, 1):
            sel = make_selection(req, scores, config, features, ranges)
            merge = None if req.merge is None else merge_plan(req, sel, (scores, features, ranges), run.hf_checkpoint)
            sid = model_id(req, sel, merge)
            selections[f"{req.row_criterion}|{req.seed}|{req.selection_domain}|{req.keep}"] = {
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
                    export_pruned(run.hf_checkpoint, dst, sel, mtp="drop", overwrite=True, merge=merge)
                    evaluated[sid] = evaluate_checkpoint(dst, heldout, refs, dtype, run.batch_size, run.seed)
                    shutil.rmtree(dst, ignore_errors=True)
                    _store_evaluation(output, sid, fingerprint, evaluated[sid])
            else:
                note = " (same selection as an earlier one: reused)"
            result = evaluated[sid]
            for d, r in result.items():
                rows.append({"criterion": req.row_criterion, "seed": "" if req.seed is None else req.seed,
                             "selection_domain": req.selection_domain, "keep": req.keep,
                             "n_routed_experts": config.n_routed_experts, "group_policy": req.group_policy,
                             "eval_domain": d, **r, "selection_id": sid})
            elapsed = time.perf_counter() - t0
            _log(f"{i}/{len(requests)} {req.label}: " + ", ".join(
                f"{d} KL {r['kl']:.4f} top1 {r['top1']:.3f} ppl {r['ppl']:.2f}" for d, r in result.items())
                + f"{note}  [{len(evaluated)} models, {elapsed:.0f} s]")
            progress.update(i)
    progress.close()
    return selections, rows, evaluated, resumed



def _write_outputs(run: CompareRun, output: Path, config, heldout, refs, timings: dict, started: float,
                   results) -> None:
    """results.csv, the overlap CSVs, selections.json, table.md, the plots and summary.json."""
    rows, selections, demos_overlap, domains_overlap, overlap_keep, scores = results
    write_csv(output / "results.csv", rows, CSV_FIELDS)
    write_csv(output / "overlap_demos.csv", demos_overlap, DEMOS_OVERLAP_FIELDS)
    write_csv(output / "overlap_domains.csv", domains_overlap, DOMAINS_OVERLAP_FIELDS)
    io.write_json_atomic(output / "selections.json", selections, indent=1)
    summary = {"format": SUMMARY_FORMAT, "run": asdict(run),
               "checkpoint_config_hash": config.config_hash, "domains": list(scores.domains),
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
    io.write_json_atomic(output / "summary.json", summary, indent=1)


def run_compare(run: CompareRun) -> Path:
    from megatron_easyep.mcore import parallel
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.scoring.demos import load_demos
    from megatron_easyep.scoring.run import ScoreRun, run_scoring

    started = time.perf_counter()
    config = DeepseekV3Config.load(run.hf_checkpoint)
    _validate(run, config)
    output = _check_output(run)
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    # the source's compute dtype, by name, for every model here (pruned ones included)
    dtype = str(model_lib.resolve_dtype(run.dtype, config)).replace("torch.", "")
    heldout = load_heldout(run, config)  # validates the files before any compute
    load_demos(run.demos, run.hf_checkpoint, vocab_size=config.vocab_size, max_length=run.max_length)  # and these
    if run.overwrite:
        shutil.rmtree(output / EVALUATIONS, ignore_errors=True)
    for stale in output.glob(".compare-*"):  # temporary exports of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    (output / EVALUATIONS).mkdir(parents=True, exist_ok=True)
    fingerprint = _evaluation_fingerprint(run, config)
    parallel.init_parallel(1, seed=run.seed)
    want_features = (CPRUNE in run.criteria or CPRUNE_GLOBAL in run.criteria
                     or any(MergeRule.parse(m).assign == "output" for m in run.merges))

    # 1. one scoring run with every demonstration
    _log(f"scoring {len(run.demos)} demo file(s) with all demonstrations"
         + (" (+ C-Prune features)" if want_features else ""))
    t0 = time.perf_counter()
    run_scoring(ScoreRun(hf_checkpoint=run.hf_checkpoint, demos=list(run.demos), output=str(output / "scores"),
                         max_length=run.max_length, dtype=run.dtype, overwrite=True, seed=run.seed,
                         cprune_features=want_features))
    timings = {"scoring_s": time.perf_counter() - t0}
    scores = load_scores(output / "scores")
    domains = list(scores.domains)
    ranges = demo_ranges(scores)
    features = cprune.load_features(scores.directory) if want_features else None
    _log(f"domains {domains}, demos per domain {scores.meta['demos_per_domain']}, tokens {scores.tokens}")

    # 2. the full model's reference distributions
    t0 = time.perf_counter()
    full = held_out_logits(run.hf_checkpoint, heldout, dtype, run.batch_size, run.seed)
    refs = {d: reference_of(seqs, full[d]) for d, seqs in heldout.items()}
    del full
    timings["reference_s"] = time.perf_counter() - t0
    _log("full model on held-out: " + ", ".join(
        f"{d} {r.tokens} tokens ppl {math.exp(r.nll):.3f}" for d, r in refs.items()))

    # 3. every pruned model
    t0 = time.perf_counter()
    selections, rows, evaluated, resumed = _pruned_models(run, output, config, (scores, features, ranges),
                                                          heldout, refs, dtype, fingerprint)
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
    _write_outputs(run, output, config, heldout, refs, timings, started,
                   (rows, selections, demos_overlap, domains_overlap, overlap_keep, scores))
    _log(f"wrote {output} ({len(evaluated)} pruned models, {timings['total_s']:.0f} s)")
    return output


def _evaluation_fingerprint(run: CompareRun, config) -> str:
    """What a stored evaluation depends on besides the selection: checkpoint, held-out text and
    how it is read, numerics."""
    from megatron_easyep.scoring import demos as demos_lib

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
    io.write_json_atomic(output / EVALUATIONS / f"{sid}.json", {"fingerprint": fingerprint, "result": result},
                         indent=1)


def rerender(output) -> Path:
    """Rewrite table.md and the plots of a finished comparison from its files (results.csv,
    overlap_*.csv, summary.json, scores/) without recomputing anything; the checkpoint's
    config.json must still be where the run read it."""
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

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
    write_reports(output, summary, read_csv(output / "results.csv"), load_scores(output / "scores"), config,
                  read_csv(output / "overlap_demos.csv"), read_csv(output / "overlap_domains.csv"))
    _log(f"re-rendered {output}/table.md and plots")
    return output


def _default_overlap_keep(config) -> int:
    half = config.n_routed_experts // 2
    try:
        group_policy_for(half, config)
        return half
    except SelectionError:
        return config.n_routed_experts


def overlap_vs_demos(run, scores, config, keep, policy, output) -> list[dict]:
    """Share of the all-demos top-M set (per layer) that the top-M set from the first n demos of
    the domain recovers; one real scoring run per n."""
    from megatron_easyep.scoring.run import ScoreRun, run_scoring

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
    with tempfile.TemporaryDirectory(prefix=".compare-subsets-", dir=output, ignore_cleanup_errors=True) as tmp:
        for n in ns:
            if n >= max(counts.values()):
                sub = scores
            else:
                _log(f"overlap vs demonstrations: scoring with max_demos={n}")
                run_scoring(ScoreRun(hf_checkpoint=run.hf_checkpoint, demos=list(run.demos),
                                     output=str(Path(tmp) / f"n{n}"), max_length=run.max_length,
                                     max_demos=n, dtype=run.dtype, seed=run.seed))
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


# --------------------------------------------------------------------------------------------
# table.md
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


