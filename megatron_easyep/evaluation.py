"""Teacher-forced evaluation of the Megatron model over demonstrations: per-domain NLL and
perplexity, and optionally every demo's fp32 logits (the parity tests compare these with
transformers)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_easyep import demos as demos_lib


@dataclass
class EvalRun:
    hf_checkpoint: str
    demos: list[str]
    expert_parallel: int = 1
    dispatcher: str = "alltoall"
    dtype: str | None = None
    max_length: int | None = None
    dump_logits: str | None = None
    seed: int = 1234


def run_evaluation(run: EvalRun) -> dict:
    """Returns {domain: {"tokens", "nll", "ppl"}} (on every rank); rank 0 prints the table and
    writes the logits file (tensors demo_{i} [T, vocab] fp32, in input order)."""
    from megatron_easyep import distributed, model as model_lib
    from megatron_easyep.hf_checkpoint import DeepseekV3Config
    from megatron_easyep.scoring import _resolve_dtype

    cfg = DeepseekV3Config.load(run.hf_checkpoint)
    demo_list = demos_lib.load_demos(run.demos, run.hf_checkpoint, vocab_size=cfg.vocab_size,
                                     max_length=run.max_length)
    domains = list(dict.fromkeys(d.domain for d in demo_list))
    layout = distributed.init_parallel(run.expert_parallel, seed=run.seed)
    _, model = model_lib.load_megatron_model(run.hf_checkpoint, dtype=_resolve_dtype(run.dtype, cfg),
                                             expert_parallel=run.expert_parallel,
                                             dispatcher=run.dispatcher)
    device = next(model.parameters()).device
    my_demos = demos_lib.shard_for_rank(demo_list, layout.dp_rank, layout.data_parallel)
    steps = demos_lib.num_steps(len(demo_list), layout.data_parallel)
    nll_sum = torch.zeros(len(domains), dtype=torch.float64, device=device)
    count = torch.zeros(len(domains), dtype=torch.float64, device=device)
    my_logits = {}
    with torch.no_grad():
        for step in range(steps):
            index, demo = my_demos[step] if step < len(my_demos) else (None, None)
            ids = list(demo.input_ids) if demo else []
            length = distributed.max_over_world(len(ids), device)
            logits = model_lib.forward_padded(model, ids, length)[:len(ids)].float()
            if demo is None:
                continue
            if len(ids) > 1:
                targets = torch.tensor(ids[1:], device=device)
                nll = F.cross_entropy(logits[:-1], targets, reduction="sum")
                d = domains.index(demo.domain)
                nll_sum[d] += nll.double()
                count[d] += len(ids) - 1
            if run.dump_logits:
                my_logits[f"demo_{index}"] = logits.cpu().contiguous()
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
        print(f"{'domain':<20} {'tokens':>8} {'nll':>10} {'ppl':>12}")
        for domain, r in results.items():
            print(f"{domain:<20} {r['tokens']:>8} {r['nll']:>10.4f} {r['ppl']:>12.3f}")
        sys.stdout.flush()
    return results


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
