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

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_easyep.mcore.compat import attach_router_hook, deepseek_group_limited_topk, moe_routers

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
    the source checkpoint before anything is exported."""

    demos: tuple[str, ...]
    step: float = DEFAULT_STEP
    iterations: int = DEFAULT_ITERATIONS
    max_length: int | None = None
    dtype: str | None = None  # compute dtype of the forward; the router and the fit run in fp32
    heldout: tuple[str, ...] = ()  # demonstrations whose loads are only measured, before and after

    def prepare(self, src_dir) -> "PreparedRebalance":
        from megatron_easyep.checkpoint.reader import DeepseekV3Config
        from megatron_easyep.scoring import demos as demos_lib

        if not self.demos:
            raise RebalanceError("--rebalance-bias needs calibration demonstrations (--demos FILE[:DOMAIN])")
        if not self.step > 0:
            raise RebalanceError(f"--rebalance-step-size must be > 0, got {self.step}")
        if self.iterations < 1:
            raise RebalanceError(f"--rebalance-steps must be >= 1, got {self.iterations}")
        cfg = DeepseekV3Config.load(src_dir)

        def read(specs):
            demo_list = demos_lib.load_demos(list(specs), src_dir, vocab_size=cfg.vocab_size,
                                             max_length=self.max_length)
            files = [demos_lib.DemoFile.parse(spec) for spec in specs]
            return demo_list, [{"file": str(f.path), "domain": f.domain, "sha256": demos_lib.file_sha256(f.path)}
                               for f in files]

        demo_list, demo_files = read(self.demos)
        heldout, heldout_files = read(self.heldout) if self.heldout else ([], [])
        return PreparedRebalance(self, demo_list, demo_files, heldout, heldout_files)


@dataclass
class PreparedRebalance:
    request: RebalanceRequest
    demo_list: list
    demo_files: list[dict]
    heldout_list: list = field(default_factory=list)
    heldout_files: list[dict] = field(default_factory=list)

    def finalize(self, staging_dir, pruning: dict, log=None) -> None:
        """export_pruned's `finalize` hook: rebalance the staged checkpoint and record it."""
        pruning[REBALANCE_KEY] = rebalance_staged(staging_dir, pruning, self, log=log)


class _StopForward(Exception):
    """Raised by a router hook once the layer being fitted has been seen (later layers are not needed)."""


def _demo_forwards(model, demo_list, on_start=None):
    """One forward per demonstration at its own length (no padding: every token is real)."""
    from megatron_easyep.mcore.model import forward_padded

    with torch.no_grad():
        for demo in demo_list:
            if on_start:
                on_start(demo)
            try:
                forward_padded(model, list(demo.input_ids), len(demo.input_ids))
            except _StopForward:
                pass


def _megatron_loads(model, routers: dict, demo_list) -> dict[int, torch.Tensor]:
    """Per layer: tokens Megatron's own routing map sends to each expert over the demonstrations."""
    loads = {layer: torch.zeros(r.weight.shape[0], dtype=torch.long) for layer, r in routers.items()}

    def hook(x, probs, routing_map, layer):
        loads[layer] += routing_map.reshape(-1, loads[layer].numel()).long().sum(0).cpu()

    handles = [attach_router_hook(r, lambda x, p, m, layer=layer: hook(x, p, m, layer))
               for layer, r in routers.items()]
    try:
        _demo_forwards(model, demo_list)
    finally:
        for h in handles:
            h.remove()
    return loads


def _router_inputs(model, router, demo_list) -> torch.Tensor:
    """[T, H] fp32 on the model's device: this router's input over every demonstration token, in
    demo order."""
    rows = []

    def hook(x, probs, routing_map):
        rows.append(x.reshape(-1, x.shape[-1]).float())
        raise _StopForward

    handle = attach_router_hook(router, hook)
    try:
        _demo_forwards(model, demo_list)
    finally:
        handle.remove()
    return torch.cat(rows)


def _stored_bias_dtype(ckpt, name: str) -> torch.dtype:
    dtype, shape = ckpt.tensor_info(name)
    if dtype not in _BIAS_DTYPES or len(shape) != 1:
        raise RebalanceError(f"tensor {name} in {ckpt.shard_file(name)} is {dtype} {list(shape)}; "
                             "--rebalance-bias writes a 1-D floating-point bias")
    return _BIAS_DTYPES[dtype]


def rebalance_staged(ckpt_dir, pruning: dict, prepared: PreparedRebalance, log=None) -> dict:
    """Fit every MoE layer's bias of the (staged) pruned checkpoint `ckpt_dir` in Megatron-Core, write
    the new values into its shards in place, and return the pruning.json record. `pruning` is the
    export's record (kept and disabled experts)."""
    from megatron_easyep.checkpoint.reader import HFCheckpoint, read_safetensors_header
    from megatron_easyep.mcore import model as model_lib
    from megatron_easyep.mcore import parallel

    request = prepared.request
    ckpt_dir = Path(ckpt_dir)
    ckpt = HFCheckpoint(ckpt_dir)
    cfg = ckpt.config
    dtype = model_lib.resolve_dtype(request.dtype, cfg)
    owns_world = not dist.is_initialized()
    layout = parallel.init_parallel(1)
    if layout.world_size != 1:
        raise RebalanceError(f"--rebalance-bias runs in one process; this one is rank {layout.rank} of "
                             f"{layout.world_size}")
    _, model = model_lib.load_megatron_model(ckpt_dir, dtype=dtype, logits=False)
    routers = moe_routers(model)
    disabled = {int(k): v for k, v in (pruning.get("disabled_experts") or {}).items()}
    kept = {int(k): v for k, v in pruning["kept_experts"].items()}
    demo_list = prepared.demo_list
    tokens = sum(len(d.input_ids) for d in demo_list)

    enabled, stored_dtype = {}, {}
    for layer, router in routers.items():
        mask = torch.ones(router.weight.shape[0], dtype=torch.bool)
        for expert in disabled.get(layer, ()):
            mask[kept[layer].index(expert)] = False
        enabled[layer] = mask
        stored_dtype[layer] = _stored_bias_dtype(ckpt, _BIAS_NAME.format(layer=layer))

    before = _megatron_loads(model, routers, demo_list)
    heldout_before = _megatron_loads(model, routers, prepared.heldout_list) if prepared.heldout_list else None
    fits: dict[int, BiasFit] = {}
    new_bias: dict[int, torch.Tensor] = {}
    start_bias: dict[int, torch.Tensor] = {}
    for layer, router in routers.items():
        x = _router_inputs(model, router, demo_list)
        # as Megatron's router computes them (moe_router_dtype fp32), on the model's device
        scores = torch.sigmoid(x @ router.weight.detach().float().T)
        del x
        start = start_bias[layer] = router.expert_bias.detach().float().cpu().clone()
        fit = fit_expert_bias(scores, start, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
                              topk_group=cfg.topk_group, step=request.step, iterations=request.iterations,
                              enabled=enabled[layer])
        # the value as it will be stored is the value later layers are fitted under
        fit.bias, fit.load_history = fit.bias.cpu(), fit.load_history.cpu()
        stored = fit.bias.to(stored_dtype[layer])
        stored[~enabled[layer]] = start.to(stored_dtype[layer])[~enabled[layer]]
        new_bias[layer] = stored
        with torch.no_grad():
            router.expert_bias.copy_(stored.float().to(router.expert_bias.device))
        fits[layer] = fit
        if log:
            log(f"rebalance layer {layer}: max/mean load {max_over_mean(before[layer], enabled[layer]):.3f} -> "
                f"{max_over_mean(fit.loads, enabled[layer]):.3f} (iterate {fit.iteration} of {request.iterations})")
    after = _megatron_loads(model, routers, demo_list)
    heldout_after = _megatron_loads(model, routers, prepared.heldout_list) if prepared.heldout_list else None
    mismatched = {layer: int((after[layer] - fits[layer].loads).abs().sum()) for layer in routers}
    if any(mismatched.values()) and log:
        log(f"warning: Megatron's routing loads differ from the fit's (sum of |difference| per layer: {mismatched})")

    # ---- write the new bias values into the staged shards (the export renames the whole dir) ----
    by_shard: dict[str, list[int]] = {}
    for layer in routers:
        by_shard.setdefault(ckpt.weight_map[_BIAS_NAME.format(layer=layer)], []).append(layer)
    ckpt.close()
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

    def ratio(loads, layer):
        return max_over_mean(loads, enabled[layer])

    record = {
        "rule": "bias += step * sign(mean load - load) over the enabled kept experts, fixed iterations, "
                "layer by layer on the pruned model's own hidden states; the iterate with the lowest "
                "max/mean load is kept",
        "step": request.step,
        "iterations": request.iterations,
        "max_length": request.max_length,
        "dtype": str(dtype).replace("torch.", ""),
        "demos": prepared.demo_files,
        "num_demos": len(demo_list),
        "tokens": tokens,
        "per_layer": {
            str(layer): {
                "max_over_mean_before": ratio(before[layer], layer),
                "max_over_mean_after": ratio(after[layer], layer),
                "chosen_iteration": fits[layer].iteration,
                "loads_before": before[layer].tolist(),
                "loads_after": after[layer].tolist(),
                "max_abs_bias_change": float((new_bias[layer].float() - start_bias[layer]).abs().max()),
                "megatron_vs_fit_load_difference": mismatched[layer],
            }
            for layer in routers
        },
        "skipped_layers": {str(layer): "MTP layer: not part of the Megatron model; bias kept as exported"
                           for layer in sorted(kept) if layer not in routers},
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
                for layer in routers
            },
        }
    if owns_world:
        parallel.shutdown()
    return record
