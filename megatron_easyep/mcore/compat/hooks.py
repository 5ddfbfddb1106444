"""Hook points: where observers see the residual stream, the router, the experts and the combined
routed output of each MoE layer. Every attach returns an `Attachment`: call it, or leave its
`with` block (also on error), to detach everything it attached.

What the hooks rely on (contract.py checks each): TopKRouter.forward(input) returns
(probs [T, E], routing_map [T, E]); the experts module is called as
experts(permuted_hidden, tokens_per_expert, permuted_probs) and applies g inside (an output row
is g * e(x)); MoELayer.postprocess(output, shared_expert_output) receives the combined routed
output and the shared-expert output separately.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch


class Attachment:
    """Detaches what was attached: call it, or use it as a context manager."""

    def __init__(self, detach_fns: list[Callable[[], None]]):
        self._detach_fns = detach_fns

    def __call__(self) -> None:
        while self._detach_fns:
            self._detach_fns.pop()()

    remove = __call__  # the name torch's hook handles use

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self()
        return False


@dataclass
class MoEObservation:
    """What one MoE layer saw in one forward, on this rank.

    residual:      [T, H] residual stream h entering the MoE block (before pre_mlp_layernorm)
    moe_input:     [T, H] the normed hidden states the router and experts see
    routed_output: [T, H] sum_i g_i * e_i over routed experts only (no shared expert), per token
    routing_map:   [T, E] bool, this rank's tokens
    probs:         [T, E] final combine weights g (0 where not selected)
    expert_rows:   [R, H] expert outputs as dispatched to this rank's experts: row = g * e_i(x)
    row_probs:     [R] the g of each row
    tokens_per_local_expert: [num_local_experts] row counts, rows grouped by local expert
    local_expert_ids: global ids of this rank's experts
    """

    residual: torch.Tensor
    moe_input: torch.Tensor
    routed_output: torch.Tensor
    routing_map: torch.Tensor
    probs: torch.Tensor
    expert_rows: torch.Tensor
    row_probs: torch.Tensor
    tokens_per_local_expert: torch.Tensor
    local_expert_ids: list[int]


def iter_moe_layers(model):
    """(global layer id, TransformerLayer) for every MoE layer of a GPTModel (or of this rank's
    pipeline stage). The id is the layer's number in the whole model, 0-based (= the HF layer
    index), not its position inside the stage."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            yield layer.layer_number - 1, layer


def moe_routers(model) -> dict:
    """{global layer id: TopKRouter} of every MoE layer of this rank's model."""
    return {index: layer.mlp.router for index, layer in iter_moe_layers(model)}


def local_experts(moe_layer) -> list:
    """This rank's expert MLPs of one MoE layer, in local order (SequentialMLP on the local spec).
    Calling one on x gives (e(x), bias) with no gate applied."""
    experts = moe_layer.experts
    if not hasattr(experts, "local_experts"):
        raise NotImplementedError(f"{type(experts).__name__}: per-expert evaluation needs "
                                  "SequentialMLP (the local spec)")
    return list(experts.local_experts)


def attach_router_hook(router, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> Attachment:
    """fn(router_input [..., H], probs, routing_map) after every forward of one router. An
    exception raised by fn propagates out of the model's forward (to stop it early)."""

    def hook(module, args, output):
        probs, routing_map = output
        fn(args[0], probs, routing_map)

    handle = router.register_forward_hook(hook)
    return Attachment([handle.remove])


def attach_router_observers(model, fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None],
                            layers=None) -> Attachment:
    """fn(global layer id, router_input, probs, routing_map) after each router forward, for every
    MoE layer of `model` (or only the ids in `layers`)."""
    detach = []
    for index, router in moe_routers(model).items():
        if layers is None or index in layers:
            detach.extend(attach_router_hook(router, lambda x, p, m, index=index: fn(index, x, p, m))._detach_fns)
    return Attachment(detach)


_GATE_CHECKED = weakref.WeakSet()


def attach_moe_observers(model, on_layer: Callable[[int, MoEObservation], None]) -> Attachment:
    """Observe every MoE layer of `model`; `on_layer(global_layer_id, observation)` runs after
    the layer's routed output is combined.

    Residual, router and experts are read with ordinary forward hooks. The routed output is taken
    by wrapping MoELayer.postprocess (instance attribute): it is called with the combined routed
    output and the shared-expert output separately, so we see sum_i g_i e_i exactly, before the
    shared expert is added, at no extra cost and with identical numerics. The first attach on a
    model checks (one tiny expert forward per layer) that g is applied inside the experts.
    """
    from megatron_easyep.mcore.compat import contract

    if model not in _GATE_CHECKED:
        for index, layer in iter_moe_layers(model):
            contract.check_gate_inside_experts(layer.mlp, index)
        _GATE_CHECKED.add(model)
    detach = []
    for index, layer in list(iter_moe_layers(model)):
        detach.extend(_observe_layer(layer, index, on_layer))
    return Attachment(detach)


def _observe_layer(layer, index: int, on_layer) -> list:
    moe = layer.mlp
    seen: dict = {}

    def residual_hook(module, args):
        seen["residual"] = args[0]

    def router_hook(module, args, output):
        seen["moe_input"] = args[0]
        seen["probs"], seen["routing_map"] = output

    def experts_hook(module, args, output):
        _, tokens_per_expert, permuted_probs = args[:3]
        seen["expert_rows"] = output[0]
        seen["row_probs"] = permuted_probs
        seen["tokens_per_expert"] = tokens_per_expert

    handles = [layer.pre_mlp_layernorm.register_forward_pre_hook(residual_hook),
               moe.router.register_forward_hook(router_hook),
               moe.experts.register_forward_hook(experts_hook)]
    original_postprocess = moe.postprocess

    def postprocess(output, shared_expert_output):
        routed = original_postprocess(output, None)
        hidden = seen["residual"].shape[-1]
        tokens_per_expert = seen["tokens_per_expert"]
        if not isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = torch.tensor(list(tokens_per_expert))
        on_layer(index, MoEObservation(
            residual=seen["residual"].reshape(-1, hidden),
            moe_input=seen["moe_input"].reshape(-1, hidden),
            routed_output=routed.reshape(-1, hidden),
            routing_map=seen["routing_map"].reshape(-1, seen["routing_map"].shape[-1]),
            probs=seen["probs"].reshape(-1, seen["probs"].shape[-1]),
            expert_rows=seen["expert_rows"].reshape(-1, hidden),
            row_probs=seen["row_probs"].reshape(-1),
            tokens_per_local_expert=tokens_per_expert,
            local_expert_ids=list(moe.local_expert_indices),
        ))
        seen.clear()
        if shared_expert_output is not None:
            routed = routed + shared_expert_output
        return routed

    moe.postprocess = postprocess

    def restore():
        if moe.__dict__.get("postprocess") is postprocess:
            del moe.postprocess  # back to the class method

    return [h.remove for h in handles] + [restore]
