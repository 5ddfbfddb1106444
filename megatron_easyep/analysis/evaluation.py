"""Teacher-forced evaluation of the Megatron model over demonstrations: per-domain NLL and
perplexity, and optionally every demo's fp32 logits (the parity tests compare these with
transformers). `json_out` keeps the table; `baseline` (an earlier `json_out`, e.g. of the full
model) adds its perplexity and the relative change per domain, which is how the demo shows a
pruned model holding its own domain."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


def run_evaluation(run: EvalRun) -> dict:
    """Returns {domain: {"tokens", "nll", "ppl"}} (on every rank); rank 0 prints the table and
    writes the logits file (tensors demo_{i} [T, vocab] fp32, in input order). Under pipeline
    parallelism the last stage computes the logits and the NLL; the sums are all-reduced."""
    from megatron_easyep.mcore import parallel, pipeline
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.scoring.run import plan_micro_batches

    cfg = DeepseekV3Config.load(run.hf_checkpoint)
    stage_layers = pipeline.stage_layer_counts(cfg.num_hidden_layers, run.pipeline_parallel,
                                               run.pipeline_layout, source=str(cfg.source))
    baseline = _load_baseline(run.baseline) if run.baseline else None  # fail before any compute
    demo_list = demos_lib.load_demos(run.demos, run.hf_checkpoint, vocab_size=cfg.vocab_size,
                                     max_length=run.max_length)
    domains = list(dict.fromkeys(d.domain for d in demo_list))
    layout = parallel.init_parallel(run.expert_parallel, seed=run.seed,
                                    pipeline_parallel=run.pipeline_parallel, stage_layers=stage_layers)
    _, model = model_lib.load_megatron_model(run.hf_checkpoint, dtype=model_lib.resolve_dtype(run.dtype, cfg),
                                             expert_parallel=run.expert_parallel,
                                             dispatcher=run.dispatcher,
                                             stage_layers=stage_layers if run.pipeline_parallel > 1 else None)
    device = next(model.parameters()).device
    replicas = [demos_lib.shard_for_rank(demo_list, r, layout.data_parallel)
                for r in range(layout.data_parallel)]
    my_demos = replicas[layout.dp_rank]
    # one demo per micro-batch (logits [T, vocab] are large); 2 x PP per step so stages overlap
    schedule = plan_micro_batches([[len(d.input_ids) for _, d in rep] for rep in replicas], None,
                                  2 * run.pipeline_parallel)
    nll_sum = torch.zeros(len(domains), dtype=torch.float64, device=device)
    count = torch.zeros(len(domains), dtype=torch.float64, device=device)
    my_logits = {}

    def _add_demo(logits, index, demo):
        ids = list(demo.input_ids)
        if len(ids) > 1:
            targets = torch.tensor(ids[1:], device=device)
            nll = F.cross_entropy(logits[:-1], targets, reduction="sum")
            d = domains.index(demo.domain)
            nll_sum[d] += nll.double()
            count[d] += len(ids) - 1
        if run.dump_logits:
            my_logits[f"demo_{index}"] = logits.cpu().contiguous()

    with torch.no_grad():
        for step in schedule:
            members = [[my_demos[pos] for pos in slot.members[layout.dp_rank]] for slot in step]
            batches = [pipeline.padded_batch([list(d.input_ids) for _, d in m], slot.length, slot.rows, device)
                       for m, slot in zip(members, step)]
            outputs = pipeline.forward_micro_batches(model, batches)
            for m, output in zip(members, outputs):
                if not m or output is None:  # an empty slot, or not the last stage
                    continue
                (index, demo), = m
                _add_demo(output[0, :len(demo.input_ids)].float(), index, demo)
    if dist.get_world_size() > 1:
        dist.all_reduce(nll_sum)
        dist.all_reduce(count)
    results = {}
    for d, domain in enumerate(domains):
        mean = (nll_sum[d] / count[d]).item() if count[d] > 0 else float("nan")
        results[domain] = {"tokens": int(count[d]), "nll": mean, "ppl": math.exp(mean)}
    if run.dump_logits:
        _write_logits(Path(run.dump_logits), my_logits, layout)
    if layout.rank == 0:
        _print_table(results, baseline)
        if run.json_out:
            record = {"format": EVAL_FORMAT, "checkpoint": str(Path(run.hf_checkpoint).resolve()),
                      "demos": list(run.demos), "dtype": str(model_lib.resolve_dtype(run.dtype, cfg)),
                      "max_length": run.max_length, "results": results}
            path = Path(run.json_out)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, path)
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
    from safetensors.torch import load_file, save_file

    path = path.resolve()
    part = path.with_name(f".{path.name}.rank{layout.rank}.part")
    save_file(mine, str(part))
    if dist.get_world_size() > 1:
        dist.barrier()
    if layout.rank == 0:
        merged = {}
        for r in range(layout.world_size):
            part_r = path.with_name(f".{path.name}.rank{r}.part")
            merged.update(load_file(str(part_r)))
            part_r.unlink()
        ordered = {k: merged[k] for k in sorted(merged, key=lambda k: int(k.split("_")[1]))}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(ordered, str(tmp))
        os.replace(tmp, path)
    if dist.get_world_size() > 1:
        dist.barrier()
