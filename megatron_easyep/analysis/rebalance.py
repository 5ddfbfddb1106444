"""Re-fit the kept experts' `e_score_correction_bias` after pruning (`export_pruned.py --rebalance-bias`).

DeepSeek-V3 balances expert load without an auxiliary loss: the router chooses experts by
sigmoid score + a per-expert correction bias, and training nudges each bias by
`step * sign(mean load - load)`. After pruning, the kept experts keep the bias learned for the
full expert set on general traffic, so their load on the domain can be very uneven. This module
re-runs that rule on the calibration demonstrations, for a fixed number of iterations, layer by
layer:

* `fit_expert_bias` is the rule itself, pure torch: per-token scores of one layer (fp32 sigmoid
  space), the routing constraints (group-limited top-k, DeepSeek's group score), a step and a
  number of iterations -> the new bias and the load history. It returns the iterate with the
  lowest max/mean load (the first one on ties, so a balanced layer is left as it is): with a fixed
  step the sign rule ends up oscillating around the balanced bias, and the best iterate is the
  honest stopping point of a fixed-length run.
* `rebalance_staged` runs the pruned checkpoint in Megatron-Core (one process, EP 1): for each
  MoE layer in order, it forwards the demonstrations, takes that layer's router input (the pruned
  model's own hidden states, with every earlier layer already rebalanced), fits the layer's bias
  and sets it in the model's router, so the next layer sees the new routing. A last forward checks
  that Megatron's own routing gives the loads the fit claims. It is the `finalize` step of
  `pruning.export.export_pruned`: it rewrites the bias bytes inside the export's staging
  directory (the output appears complete, by one rename, or not at all) and adds
  "rebalance_bias" to pruning.json.

Only the enabled kept experts' bias values change, written in the tensor's own dtype (fp32 in
DeepSeek checkpoints); disabled slots keep their bias; every other byte is the plain export's.
The MTP layer is not part of the Megatron model and keeps its sliced bias (recorded as skipped).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_easyep.mcore.compat import (attach_router_hook, attach_router_observers, deepseek_group_limited_topk,
                                          moe_routers)
from megatron_easyep.runtime.observer import Observer, StopMicroBatch

REBALANCE_KEY = "rebalance_bias"
DEFAULT_STEP = 1e-3
DEFAULT_ITERATIONS = 500
_BIAS_NAME = "model.layers.{layer}.mlp.gate.e_score_correction_bias"
_BIAS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class RebalanceError(ValueError):
    """The rebalancing cannot be done as asked (the message names the file or option)."""


# --------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------

def expert_loads(choice_scores: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64) when choice_scores [T, E] pick the top-k, group-limited
    as DeepSeek-V3 routes (a group scores the sum of its top-2 choice scores)."""
    num_tokens, num_experts = choice_scores.shape
    if n_group > 1:
        ids = deepseek_group_limited_topk(choice_scores, top_k, num_tokens, num_experts, n_group, topk_group)[1]
    else:
        ids = torch.topk(choice_scores, k=top_k, dim=-1)[1]
    return torch.bincount(ids.reshape(-1), minlength=num_experts)


def max_over_mean(loads: torch.Tensor, enabled: torch.Tensor | None = None) -> float:
    """Busiest expert's load over the mean load of the enabled experts (1.0 = perfectly even)."""
    loads = loads.double() if enabled is None else loads.double()[enabled]
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else float("nan")


@dataclass
class BiasFit:
    bias: torch.Tensor  # [E] fp32, the chosen iterate
    iteration: int  # which iterate (0 = the starting bias)
    load_history: torch.Tensor  # [iterations + 1, E] int64, loads at each iterate
    max_over_mean_history: list[float] = field(default_factory=list)

    @property
    def loads(self) -> torch.Tensor:
        return self.load_history[self.iteration]


def fit_expert_bias(scores: torch.Tensor, bias: torch.Tensor, *, top_k: int, n_group: int = 1,
                    topk_group: int = 1, step: float = DEFAULT_STEP, iterations: int = DEFAULT_ITERATIONS,
                    enabled: torch.Tensor | None = None) -> BiasFit:
    """DeepSeek's aux-loss-free rule on fixed tokens: bias += step * sign(mean load - load), for
    `iterations` steps, starting from `bias` [E]. scores [T, E] are the unbiased sigmoid router
    scores (the bias only chooses; it never weights). `enabled` [E] bool marks the experts that
    take part (disabled slots keep their bias and count in no mean). Everything runs in fp32.
    Returns the iterate with the lowest max/mean load, the earliest on ties."""
    if scores.dim() != 2 or bias.shape != (scores.shape[1],):
        raise ValueError(f"scores must be [T, E] and bias [E]; got {tuple(scores.shape)} and {tuple(bias.shape)}")
    if not step > 0 or iterations < 0:
        raise ValueError(f"step must be > 0 and iterations >= 0; got {step}, {iterations}")
    scores = scores.float()
    current = bias.detach().float().clone().to(scores.device)
    enabled = (torch.ones_like(current, dtype=torch.bool) if enabled is None
               else enabled.to(device=scores.device, dtype=torch.bool))
    history, ratios, biases = [], [], []
    for it in range(iterations + 1):
        loads = expert_loads(scores + current, top_k, n_group, topk_group)
        history.append(loads)
        ratios.append(max_over_mean(loads, enabled))
        biases.append(current.clone())
        if it == iterations:
            break
        mean = loads[enabled].double().mean()
        current = current + step * torch.sign(mean - loads.double()).float() * enabled
    best = min(range(len(ratios)), key=lambda i: (ratios[i], i))
    return BiasFit(bias=biases[best], iteration=best, load_history=torch.stack(history),
                   max_over_mean_history=ratios)


# --------------------------------------------------------------------------------------------
# the Megatron driver
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RebalanceRequest:
    """What `--rebalance-bias` asks for; `prepare` reads and checks the demonstrations against
    the source checkpoint before anything is exported. The fit runs on any PP x EP layout of the
    torchrun world (one process by default), like scoring."""

    demos: tuple[str, ...]
    step: float = DEFAULT_STEP
    iterations: int = DEFAULT_ITERATIONS
    max_length: int | None = None
    dtype: str | None = None  # compute dtype of the forward; the router and the fit run in fp32
    heldout: tuple[str, ...] = ()  # demonstrations whose loads are only measured, before and after
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    pipeline_layout: str | None = None
    dispatcher: str = "alltoall"

    def prepare(self, src_dir) -> "PreparedRebalance":
        from megatron_easyep.checkpoint.reader import DeepseekV3Config
        from megatron_easyep.mcore import pipeline
        from megatron_easyep.scoring import demos as demos_lib

        if not self.demos:
            raise RebalanceError("--rebalance-bias needs calibration demonstrations (--demos FILE[:DOMAIN])")
        if not self.step > 0:
            raise RebalanceError(f"--rebalance-step-size must be > 0, got {self.step}")
        if self.iterations < 1:
            raise RebalanceError(f"--rebalance-steps must be >= 1, got {self.iterations}")
        cfg = DeepseekV3Config.load(src_dir)
        # the pruned model has the source's layers: a bad layout fails before anything is written
        pipeline.stage_layer_counts(cfg.num_hidden_layers, self.pipeline_parallel, self.pipeline_layout,
                                    source=str(cfg.source))

        def read(specs):
            demo_list = demos_lib.load_demos(list(specs), src_dir, vocab_size=cfg.vocab_size,
                                             max_length=self.max_length)
            files = [demos_lib.DemoFile.parse(spec) for spec in specs]
            return demo_list, [{"file": str(f.path), "domain": f.domain, "sha256": demos_lib.file_sha256(f.path)}
                               for f in files]

        demo_list, demo_files = read(self.demos)
        heldout, heldout_files = read(self.heldout) if self.heldout else ([], [])
        return PreparedRebalance(self, demo_list, demo_files, heldout, heldout_files)


def _world_size_from_launcher() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class PreparedRebalance:
    request: RebalanceRequest
    demo_list: list
    demo_files: list[dict]
    heldout_list: list = field(default_factory=list)
    heldout_files: list[dict] = field(default_factory=list)
    _announced: bool = False

    def finalize(self, staging_dir, pruning: dict, log=None) -> None:
        """export_pruned's `finalize` hook (rank 0): rebalance the staged checkpoint and record it.
        Under torchrun the other ranks (in `follow`) are told where the staging directory is."""
        self._announce((str(staging_dir), pruning))
        pruning[REBALANCE_KEY] = rebalance_staged(staging_dir, pruning, self, log=log)

    def abandon(self) -> None:
        """Rank 0 when its export failed before `finalize`: the other ranks stop waiting."""
        if not self._announced:
            self._announce(None)

    def follow(self) -> bool:
        """Every rank but 0 under torchrun: wait for rank 0's staged export and take part in the
        fit. False when rank 0 gave up before staging (it reports why)."""
        shared = self._exchange(None)
        if shared is None:
            return False
        staging_dir, pruning = shared
        rebalance_staged(Path(staging_dir), pruning, self)
        return True

    def _announce(self, payload) -> None:
        self._announced = True
        if _world_size_from_launcher() > 1:
            self._exchange(payload)

    @staticmethod
    def _exchange(payload):
        from megatron_easyep.mcore import parallel

        if not dist.is_initialized():
            parallel.init_parallel(1)
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class LoadObserver(Observer):
    """Per MoE layer: tokens Megatron's own routing map sends to each expert (real tokens only);
    finalize sums them over the world."""

    batch = None

    def setup(self, session) -> None:
        from megatron_easyep.mcore import pipeline

        self.layers = pipeline.moe_layer_ids(session.model.config)
        self.loads = torch.zeros(len(self.layers), session.cfg.n_routed_experts, dtype=torch.long)

    def before_micro_batch(self, batch) -> None:
        self.batch = batch

    @contextlib.contextmanager
    def attached(self, session):
        def hook(layer, router_input, probs, routing_map):
            routing_map = self.batch.real_rows(routing_map.reshape(-1, self.loads.shape[1]))
            self.loads[self.layers.index(layer)] += routing_map.long().sum(0).cpu()

        with attach_router_observers(session.model, hook):
            yield self

    def finalize(self, session) -> dict[int, torch.Tensor]:
        totals = self.loads.to(session.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(totals)
        return {layer: totals[row].cpu() for row, layer in enumerate(self.layers)}


class RouterInputObserver(Observer):
    """One router's input over this rank's real tokens, kept per demo; without pipeline
    parallelism the forward stops right after that router (later layers are not needed).
    finalize: the sigmoid router scores [T, E] fp32 of every demo of the world in demo order, on
    the ranks of the stage that holds the layer (None elsewhere)."""

    def __init__(self, session, router):
        self.router, self.rows, self.batch = router, {}, None
        self.stop = session.layout.pipeline_parallel == 1

    def before_micro_batch(self, batch) -> None:
        self.batch = batch

    @contextlib.contextmanager
    def attached(self, session):
        def hook(x, probs, routing_map):
            for index, rows in self.batch.demo_rows(x.reshape(-1, x.shape[-1])):
                self.rows[index] = rows.float()
            if self.stop:
                raise StopMicroBatch

        with attach_router_hook(self.router, hook) if self.router is not None else contextlib.nullcontext():
            yield self

    def finalize(self, session) -> torch.Tensor | None:
        from megatron.core import parallel_state

        if self.router is None:
            return None
        order = sorted(self.rows)
        # as Megatron's router computes them (moe_router_dtype fp32), on the model's device
        scores = torch.sigmoid(torch.cat([self.rows[i] for i in order]) @ self.router.weight.detach().float().T)
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) == 1:
            return scores
        sizes = [self.rows[i].shape[0] for i in order]
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (order, sizes, scores.cpu()), group=group)
        blocks = {i: block for got, n, sc in parts for i, block in zip(got, sc.split(n))}
        return torch.cat([blocks[i] for i in sorted(blocks)]).to(scores.device)


def _stored_bias_dtype(ckpt, name: str) -> torch.dtype:
    dtype, shape = ckpt.tensor_info(name)
    if dtype not in _BIAS_DTYPES or len(shape) != 1:
        raise RebalanceError(f"tensor {name} in {ckpt.shard_file(name)} is {dtype} {list(shape)}; "
                             "--rebalance-bias writes a 1-D floating-point bias")
    return _BIAS_DTYPES[dtype]


def _open_session(ckpt_dir, request: RebalanceRequest):
    from megatron_easyep.runtime.session import ModelSession, SessionSpec

    session = ModelSession.open(SessionSpec(str(ckpt_dir), expert_parallel=request.expert_parallel,
                                            pipeline_parallel=request.pipeline_parallel,
                                            pipeline_layout=request.pipeline_layout,
                                            dispatcher=request.dispatcher, dtype=request.dtype, logits=False))
    session.init_parallel()
    session.load_model()
    return session


def _loads(session, demo_list) -> dict[int, torch.Tensor] | None:
    """Per layer (every stage's): tokens Megatron's own routing sends to each expert over the demos."""
    from megatron_easyep.runtime.session import forward_loop

    if not demo_list:
        return None
    observer = LoadObserver()
    observer.setup(session)
    forward_loop(session, session.plan(demo_list, None, session.default_per_step()), [observer])
    return observer.finalize(session)


def _router_scores(session, router, demo_list) -> torch.Tensor | None:
    """[T, E] fp32 sigmoid scores of one router over every demo token, in demo order, on the ranks
    holding it (every rank runs the forwards: pipeline stages and EP collectives go in lockstep)."""
    from megatron_easyep.runtime.session import forward_loop

    observer = RouterInputObserver(session, router)
    forward_loop(session, session.plan(demo_list, None, session.default_per_step()), [observer])
    return observer.finalize(session)


def _fit_layers(session, routers: dict, prepared: PreparedRebalance, enabled: dict, stored_dtype: dict) -> dict:
    """Layer by layer, in order: the router's scores on the pruned model's own hidden states (every
    earlier layer already rebalanced), the fit, the new bias set in the model. Returns this rank's
    {layer: (stored new bias, start bias, BiasFit)} for the layers of its stage."""
    from megatron_easyep.mcore import pipeline

    request, cfg, fits = prepared.request, session.cfg, {}
    for layer in pipeline.moe_layer_ids(session.model.config):
        router = routers.get(layer)
        scores = _router_scores(session, router, prepared.demo_list)
        if router is None:
            continue
        start = router.expert_bias.detach().float().cpu().clone()
        fit = fit_expert_bias(scores, start, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
                              topk_group=cfg.topk_group, step=request.step, iterations=request.iterations,
                              enabled=enabled[layer])
        del scores
        # the value as it will be stored is the value later layers are fitted under
        fit.bias, fit.load_history = fit.bias.cpu(), fit.load_history.cpu()
        stored = fit.bias.to(stored_dtype[layer])
        stored[~enabled[layer]] = start.to(stored_dtype[layer])[~enabled[layer]]
        with torch.no_grad():
            router.expert_bias.copy_(stored.float().to(router.expert_bias.device))
        fits[layer] = (stored, start, fit)
    return fits


def _fits_on_rank0(fits: dict) -> dict | None:
    """Every stage's fits, on rank 0 (the data-parallel copies of a stage are identical)."""
    if dist.get_world_size() == 1:
        return fits
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(fits, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in parts:
        for layer, value in part.items():
            merged.setdefault(layer, value)
    return dict(sorted(merged.items()))


def _write_biases(weight_map: dict, ckpt_dir: Path, new_bias: dict) -> None:
    """The new bias values into the staged shards, in place (the export renames the whole dir)."""
    from megatron_easyep.checkpoint.reader import read_safetensors_header

    by_shard: dict[str, list[int]] = {}
    for layer in new_bias:
        by_shard.setdefault(weight_map[_BIAS_NAME.format(layer=layer)], []).append(layer)
    for shard, layers in by_shard.items():
        headers, _ = read_safetensors_header(ckpt_dir / shard)
        fd = os.open(ckpt_dir / shard, os.O_WRONLY)
        try:
            for layer in layers:
                stored = headers[_BIAS_NAME.format(layer=layer)]
                data = new_bias[layer].contiguous().view(torch.uint8).numpy().tobytes()
                if len(data) != stored.nbytes:
                    raise RebalanceError(f"{_BIAS_NAME.format(layer=layer)} in {shard}: {stored.nbytes} bytes "
                                         f"stored, {len(data)} to write")
                os.pwrite(fd, data, stored.begin)
            os.fsync(fd)
        finally:
            os.close(fd)


def _enabled_and_dtypes(ckpt, layers, pruning: dict):
    disabled = {int(k): v for k, v in (pruning.get("disabled_experts") or {}).items()}
    kept = {int(k): v for k, v in pruning["kept_experts"].items()}
    enabled, stored_dtype = {}, {}
    for layer in layers:
        mask = torch.ones(len(kept[layer]), dtype=torch.bool)
        for expert in disabled.get(layer, ()):
            mask[kept[layer].index(expert)] = False
        enabled[layer] = mask
        stored_dtype[layer] = _stored_bias_dtype(ckpt, _BIAS_NAME.format(layer=layer))
    return kept, enabled, stored_dtype


def rebalance_staged(ckpt_dir, pruning: dict, prepared: PreparedRebalance, log=None) -> dict | None:
    """Fit every MoE layer's bias of the (staged) pruned checkpoint `ckpt_dir` in Megatron-Core, write
    the new values into its shards in place, and return the pruning.json record. `pruning` is the
    export's record (kept and disabled experts). Collective: every rank of the world calls it with
    the same arguments (the request's PP x EP layout); rank 0 writes and returns the record."""
    from megatron_easyep.checkpoint.reader import HFCheckpoint
    from megatron_easyep.mcore import parallel, pipeline

    ckpt_dir = Path(ckpt_dir)
    owns_world = not dist.is_initialized()
    session = _open_session(ckpt_dir, prepared.request)
    ckpt = HFCheckpoint(ckpt_dir)
    layers = pipeline.moe_layer_ids(session.model.config)
    kept, enabled, stored_dtype = _enabled_and_dtypes(ckpt, layers, pruning)
    weight_map = dict(ckpt.weight_map)
    ckpt.close()
    routers = moe_routers(session.model)

    before = _loads(session, prepared.demo_list)
    heldout_before = _loads(session, prepared.heldout_list)
    fits = _fits_on_rank0(_fit_layers(session, routers, prepared, enabled, stored_dtype))
    after = _loads(session, prepared.demo_list)
    heldout_after = _loads(session, prepared.heldout_list)
    record = None
    if session.layout.rank == 0:
        _write_biases(weight_map, ckpt_dir, {layer: fit[0] for layer, fit in fits.items()})
        record = _record(session, prepared, kept, enabled, fits, (before, after),
                         (heldout_before, heldout_after), log)
    if dist.get_world_size() > 1:
        dist.barrier()
    if owns_world:
        parallel.shutdown()
    return record


def _record(session, prepared: PreparedRebalance, kept: dict, enabled: dict, fits: dict, loads, heldout,
            log) -> dict:
    request, (before, after), (heldout_before, heldout_after) = prepared.request, loads, heldout

    def ratio(values, layer):
        return max_over_mean(values, enabled[layer])

    mismatched = {layer: int((after[layer] - fit.loads).abs().sum()) for layer, (_, _, fit) in fits.items()}
    if log:
        for layer, (_, _, fit) in fits.items():
            log(f"rebalance layer {layer}: max/mean load {ratio(before[layer], layer):.3f} -> "
                f"{ratio(fit.loads, layer):.3f} (iterate {fit.iteration} of {request.iterations})")
        if any(mismatched.values()):
            log(f"warning: Megatron's routing loads differ from the fit's (sum of |difference| per layer: {mismatched})")
    record = {
        "rule": "bias += step * sign(mean load - load) over the enabled kept experts, fixed iterations, "
                "layer by layer on the pruned model's own hidden states; the iterate with the lowest "
                "max/mean load is kept",
        "step": request.step,
        "iterations": request.iterations,
        "max_length": request.max_length,
        "dtype": str(session.dtype).replace("torch.", ""),
        "demos": prepared.demo_files,
        "num_demos": len(prepared.demo_list),
        "tokens": sum(len(d.input_ids) for d in prepared.demo_list),
        "per_layer": {
            str(layer): {
                "max_over_mean_before": ratio(before[layer], layer),
                "max_over_mean_after": ratio(after[layer], layer),
                "chosen_iteration": fit.iteration,
                "loads_before": before[layer].tolist(),
                "loads_after": after[layer].tolist(),
                "max_abs_bias_change": float((stored.float() - start).abs().max()),
                "megatron_vs_fit_load_difference": mismatched[layer],
            }
            for layer, (stored, start, fit) in fits.items()
        },
        "skipped_layers": {str(layer): "MTP layer: not part of the Megatron model; bias kept as exported"
                           for layer in sorted(kept) if layer not in fits},
    }
    if heldout_before is not None:  # measured only: these tokens never enter the fit
        record["heldout"] = {
            "demos": prepared.heldout_files,
            "num_demos": len(prepared.heldout_list),
            "tokens": sum(len(d.input_ids) for d in prepared.heldout_list),
            "per_layer": {
                str(layer): {
                    "max_over_mean_before": ratio(heldout_before[layer], layer),
                    "max_over_mean_after": ratio(heldout_after[layer], layer),
                    "loads_before": heldout_before[layer].tolist(),
                    "loads_after": heldout_after[layer].tolist(),
                }
                for layer in fits
            },
        }
    return record
