"""Teacher-forced evaluation of the Megatron model over demonstrations: per-domain NLL and
perplexity, and optionally every demo's fp32 logits (the parity tests compare these with
transformers). `json_out` keeps the table; `baseline` (an earlier `json_out`, e.g. of the full
model) adds its perplexity and the relative change per domain, which is how the demo shows a
pruned model holding its own domain."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_easyep.checkpoint import io
from megatron_easyep.runtime.observer import Observer
from megatron_easyep.runtime.session import ModelSession, SessionSpec, forward_loop
from megatron_easyep.scoring import demos as demos_lib


@dataclass
class EvalRun:
    hf_checkpoint: str
    demos: list[str]
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    pipeline_layout: str | None = None  # decoder layers per stage, "16,15,15,15"; default: even split
    dispatcher: str = "alltoall"
    dtype: str | None = None
    max_length: int | None = None
    dump_logits: str | None = None
    seed: int = 1234
    json_out: str | None = None  # write {"checkpoint", "demos", "results"} here (rank 0, atomic)
    baseline: str | None = None  # an earlier json_out to print the change against


class EvalError(ValueError):
    pass


class NllObserver(Observer):
    """Per-domain next-token NLL sums from the last stage's logits; finalize all-reduces them and
    returns {domain: {"tokens", "nll", "ppl"}} on every rank."""

    def __init__(self, domains: list[str]):
        self.domains = domains

    def setup(self, session) -> None:
        device = next(session.model.parameters()).device
        self.nll_sum = torch.zeros(len(self.domains), dtype=torch.float64, device=device)
        self.count = torch.zeros(len(self.domains), dtype=torch.float64, device=device)

    def after_micro_batch(self, batch, output) -> None:
        if output is None:  # not the last stage
            return
        for row, (_, demo) in enumerate(batch.members):
            ids = list(demo.input_ids)
            if len(ids) > 1:
                logits = output[row, :len(ids)].float()
                targets = torch.tensor(ids[1:], device=logits.device)
                nll = F.cross_entropy(logits[:-1], targets, reduction="sum")
                d = self.domains.index(demo.domain)
                self.nll_sum[d] += nll.double()
                self.count[d] += len(ids) - 1

    def finalize(self, session) -> dict:
        if dist.get_world_size() > 1:
            dist.all_reduce(self.nll_sum)
            dist.all_reduce(self.count)
        results = {}
        for d, domain in enumerate(self.domains):
            mean = (self.nll_sum[d] / self.count[d]).item() if self.count[d] > 0 else float("nan")
            results[domain] = {"tokens": int(self.count[d]), "nll": mean, "ppl": math.exp(mean)}
        return results


class LogitsObserver(Observer):
    """Every demo's fp32 logits [T, vocab]; finalize writes them to one file (rank 0 merges)."""

    def __init__(self, path: Path):
        self.path, self.mine = path, {}

    def after_micro_batch(self, batch, output) -> None:
        if output is None:
            return
        for row, (index, demo) in enumerate(batch.members):
            self.mine[f"demo_{index}"] = output[row, :len(demo.input_ids)].float().cpu().contiguous()

    def finalize(self, session) -> None:
        _write_logits(self.path, self.mine, session.layout)


def run_evaluation(run: EvalRun) -> dict:
    """Returns {domain: {"tokens", "nll", "ppl"}} (on every rank); rank 0 prints the table and
    writes the logits file (tensors demo_{i} [T, vocab] fp32, in input order). Under pipeline
    parallelism the last stage computes the logits and the NLL; the sums are all-reduced."""
    session = ModelSession.open(SessionSpec(run.hf_checkpoint, expert_parallel=run.expert_parallel,
                                            pipeline_parallel=run.pipeline_parallel,
                                            pipeline_layout=run.pipeline_layout, dispatcher=run.dispatcher,
                                            dtype=run.dtype, seed=run.seed))
    baseline = _load_baseline(run.baseline) if run.baseline else None  # fail before any compute
    demo_list = demos_lib.load_demos(run.demos, run.hf_checkpoint, vocab_size=session.cfg.vocab_size,
                                     max_length=run.max_length)
    domains = list(dict.fromkeys(d.domain for d in demo_list))
    nll = NllObserver(domains)
    observers = [nll] + ([LogitsObserver(Path(run.dump_logits))] if run.dump_logits else [])
    layout = session.init_parallel()
    session.load_model(observers)
    # one demo per micro-batch (logits [T, vocab] are large); 2 x PP per step so stages overlap
    plan = session.plan(demo_list, None, 2 * run.pipeline_parallel)
    forward_loop(session, plan, observers, progress="evaluate")
    results = nll.finalize(session)
    for observer in observers[1:]:
        observer.finalize(session)
    if layout.rank == 0:
        _print_table(results, baseline)
        if run.json_out:
            record = {"format": EVAL_FORMAT, "checkpoint": str(Path(run.hf_checkpoint).resolve()),
                      "demos": list(run.demos), "dtype": str(session.dtype),
                      "max_length": run.max_length, "results": results}
            io.write_json_atomic(Path(run.json_out), record, indent=1)
    return results


EVAL_FORMAT = "megatron-easyep-eval/1"


def _load_baseline(path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"--baseline {path}: cannot read it as JSON ({e})") from e
    if not isinstance(record, dict) or record.get("format") != EVAL_FORMAT:
        raise EvalError(f"--baseline {path}: not an evaluation written by --json (format {EVAL_FORMAT})")
    return record["results"]


def _print_table(results: dict, baseline: dict | None) -> None:
    header = f"{'domain':<20} {'tokens':>8} {'nll':>10} {'ppl':>12}"
    if baseline is not None:
        header += f" {'baseline ppl':>13} {'change':>8}"
    print(header)
    for domain, r in results.items():
        line = f"{domain:<20} {r['tokens']:>8} {r['nll']:>10.4f} {r['ppl']:>12.3f}"
        if baseline is not None:
            base = baseline.get(domain)
            if base is None:
                line += f" {'-':>13} {'-':>8}"
            else:
                line += f" {base['ppl']:>13.3f} {100 * (r['ppl'] / base['ppl'] - 1):>+7.1f}%"
                if base["tokens"] != r["tokens"]:
                    line += f"  (baseline has {base['tokens']} tokens: different text)"
        print(line)
    sys.stdout.flush()


def _write_logits(path: Path, mine: dict, layout) -> None:
    """Each rank writes its part; rank 0 merges them into one file (temp sibling + rename)."""
    from safetensors.torch import load_file

    path = path.resolve()
    part = path.with_name(f".{path.name}.rank{layout.rank}.part")
    io.write_tensors(part, mine)
    if dist.get_world_size() > 1:
        dist.barrier()
    if layout.rank == 0:
        merged = {}
        for r in range(layout.world_size):
            part_r = path.with_name(f".{path.name}.rank{r}.part")
            merged.update(load_file(str(part_r)))
            part_r.unlink()
        ordered = {k: merged[k] for k in sorted(merged, key=lambda k: int(k.split("_")[1]))}
        with io.staged_file(path) as tmp:
            io.write_tensors(tmp, ordered)
    if dist.get_world_size() > 1:
        dist.barrier()
