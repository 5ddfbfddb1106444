"""Everything that touches Megatron-Core internals lives here (written against megatron-core 0.19.x).

Five sections, so the next megatron-core release is a one-file change:
  1. CPU bridges: let the real MoE/MLA layers run without CUDA (gloo). Applied only when CUDA is
     absent; a GPU run never goes through them.
  2. DeepSeek routing: group-limited top-k with DeepSeek's own group score (sum of the top-2).
  3. MLA on the local (non-TE) spec: a core-attention module that accepts MLA's head dims, and the
     Q projection for q_lora_rank = null.
  4. Hook points: where the scorer observes the residual stream, the router, the experts and the
     combined routed output of each MoE layer.
  5. FP8-resident linears: the local spec's Column/RowParallelLinear swapped, through the layer
     spec, for subclasses that hold DeepSeek's FP8 bytes and block scales under Megatron's own
     parameter name (`weight`) and compute through mcore/fp8_gemm.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# 1. CPU bridges
# --------------------------------------------------------------------------------------------

_CPU_BRIDGES_APPLIED = False


class _NoStream:
    """Stand-in for torch.cuda.Stream/Event on CPU: everything is synchronous already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    def __hash__(self):
        return 0


_THE_CPU_STREAM = _NoStream()


def _split_sizes_as_list(sizes):
    if sizes is None or isinstance(sizes, list):
        return sizes
    if isinstance(sizes, torch.Tensor):
        return sizes.tolist()
    return [int(s) for s in sizes]  # numpy arrays from maybe_move_tensor_to_cpu(as_numpy=True)


def apply_cpu_bridges() -> None:
    """Make Megatron-Core's MoE and MLA layers run on CPU. No-op when CUDA is available."""
    global _CPU_BRIDGES_APPLIED
    if _CPU_BRIDGES_APPLIED or torch.cuda.is_available():
        return
    _CPU_BRIDGES_APPLIED = True

    # router.py builds expert-bias buffers with device=torch.cuda.current_device(); experts,
    # mappings.py (all_to_all output buffer) and moe_utils do the same.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # token_dispatcher.py (MoEAlltoAllTokenDispatcher.cuda_dtoh_stream) and shared_experts.py
    # create side streams and switch to them; on CPU there is one synchronous "stream".
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _THE_CPU_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # moe_utils.maybe_move_tensor_to_cpu(record_stream=True) calls Tensor.record_stream on CPU.
    torch.Tensor.record_stream = lambda self, stream: None

    # tensor_parallel/mappings.py _AllToAll: with EP > 1 the alltoall dispatcher passes split
    # sizes as tensors/arrays (moe_utils converts them to lists only on GPU); gloo's
    # all_to_all_single wants Python lists.
    from megatron.core.tensor_parallel import mappings

    original_forward = mappings._AllToAll.forward

    def forward_with_list_splits(ctx, group, input, output_split_sizes, input_split_sizes,
                                 use_nccl_stream=False):
        return original_forward(ctx, group, input, _split_sizes_as_list(output_split_sizes),
                                _split_sizes_as_list(input_split_sizes), use_nccl_stream)

    mappings._AllToAll.forward = staticmethod(forward_with_list_splits)

    # megatron/core/jit.py wraps small fusions (e.g. TopKRouter._apply_expert_bias) in
    # torch.compile; on CPU Inductor builds them with the C++ compiler on first use and on every
    # new shape (~10 s per process). Eager gives the same ops, so run them eagerly.
    import torch._dynamo as dynamo

    dynamo.config.disable = True


def seed_model_parallel_rng(seed: int) -> None:
    """tensor_parallel.model_parallel_cuda_manual_seed, which needs CUDA unless the inference
    RNG tracker is used (it is on CPU; a GPU run uses the normal tracker)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


# --------------------------------------------------------------------------------------------
# 2. DeepSeek routing
# --------------------------------------------------------------------------------------------

_ROUTING_PATCHED = False


def deepseek_group_limited_topk(scores: torch.Tensor, topk: int, num_tokens: int,
                                num_experts: int, num_groups: int, group_topk: int):
    """Group-limited top-k exactly as DeepSeek-V3 (and transformers, vLLM, SGLang) route: a group
    scores the sum of its top-2 experts. Megatron-Core sums the top (topk // group_topk), which
    agrees only when topk / group_topk == 2 and crashes when that exceeds the group size."""
    group_size = num_experts // num_groups
    group_scores = scores.view(num_tokens, num_groups, group_size).topk(
        min(2, group_size), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, group_size).reshape(num_tokens, -1)
    masked_scores = scores.masked_fill(~expert_mask, float("-inf"))
    return torch.topk(masked_scores, k=topk, dim=-1)


def apply_deepseek_routing() -> None:
    """moe_utils.topk_routing_with_score_function calls the module-level group_limited_topk."""
    global _ROUTING_PATCHED
    if _ROUTING_PATCHED:
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.group_limited_topk = deepseek_group_limited_topk
    _ROUTING_PATCHED = True


def apply_all() -> None:
    apply_cpu_bridges()
    apply_deepseek_routing()


# --------------------------------------------------------------------------------------------
# 3. MLA on the local spec
# --------------------------------------------------------------------------------------------

class SDPACoreAttention(torch.nn.Module):
    """Causal core attention for MLA on the local spec. Megatron's local DotProductAttention does
    not accept MLA's k_channels/v_channels (q/k head dim != v head dim)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__()
        self.config = config
        # Attention.__init__ builds one without MLA's dims, then MLA rebuilds it with them.
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported on the local MLA spec")
        # Megatron layout [s, b, heads, dim] -> SDPA's [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scale = self.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def mla_self_attention_class():
    """MLASelfAttention whose Q path matches DeepSeek when q_lora_rank is null: a plain q_proj
    with no Q norm. (0.19's resolver wants a fused norm+linear there, which HF does not have and
    the local spec cannot build.)"""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class DeepseekMLASelfAttention(MLASelfAttention):
        def __init__(self, *args, fp8_resident_down_projections: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            if fp8_resident_down_projections:
                # MLASelfAttention accepts only its own classes for the two down projections (an
                # exact-class check), so they are built plain and turned FP8-resident right here;
                # the high-precision weight of one layer's two projections exists only meanwhile.
                for name in ("linear_q_down_proj", "linear_kv_down_proj"):
                    module = getattr(self, name, None)
                    if module is not None and hasattr(module, "_forward_impl"):
                        module.__class__ = fp8_resident_class(type(module))
                        module._make_fp8_resident()

        def _resolve_qk_norm_config(self, submodules):
            if self.config.q_lora_rank is not None:
                return super()._resolve_qk_norm_config(submodules)
            from megatron.core.transformer.identity_op import IdentityOp

            return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                        linear_kv_up_proj=submodules.linear_kv_up_proj,
                        q_layernorm=IdentityOp, kv_layernorm=submodules.kv_layernorm)

    return DeepseekMLASelfAttention


def adapt_local_layer_spec(layer_spec, config) -> None:
    """Adjust one local-spec TransformerLayer spec (in place) for MLA on CPU."""
    attention = layer_spec.submodules.self_attention
    attention.module = mla_self_attention_class()
    attention.submodules.core_attention = SDPACoreAttention
    if config.q_lora_rank is None:
        from megatron.core.transformer.identity_op import IdentityOp

        attention.submodules.q_layernorm = IdentityOp


# --------------------------------------------------------------------------------------------
# 5. FP8-resident linears (swapped in through the layer spec)
# --------------------------------------------------------------------------------------------

# Linear modules DeepSeek stores in FP8, by their attribute name in Megatron-Core's local spec.
FP8_ATTENTION_LINEARS = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                         "linear_kv_up_proj", "linear_proj")
FP8_MLP_LINEARS = ("linear_fc1", "linear_fc2")  # dense MLP, shared experts, routed experts

_FP8_CLASSES: dict = {}


class Fp8ResidentLinear:
    """Mixin for Megatron's Column/RowParallelLinear (TP = 1): `weight` is a float8_e4m3fn
    Parameter holding the checkpoint's bytes (HF row order, parts concatenated), with
    `weight_scale_inv` (fp32 block scales of every part, concatenated) and the row permutation to
    Megatron's order as non-persistent buffers, filled by `hold_fp8` at load time. Megatron's
    forward runs unchanged up to `_forward_impl`, where the weight is either dequantised into the
    compute dtype for Megatron's own matmul (`dequantize`) or multiplied in FP8 (`native`).
    A linear the checkpoint stores in high precision gets a plain weight (`hold_high_precision`)."""

    fp8_compute = "dequantize"

    def _make_fp8_resident(self) -> None:
        shape, device = self.weight.shape, self.weight.device
        del self.weight  # the high-precision Parameter Megatron allocated (never filled)
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=torch.float8_e4m3fn, device=device),
                                         requires_grad=False)
        self.register_buffer("weight_scale_inv", None, persistent=False)
        self.register_buffer("fp8_dest_rows", None, persistent=False)  # Megatron row of each HF row
        self.register_buffer("fp8_out_index", None, persistent=False)  # HF row of each Megatron row
        self.fp8_layout = None

    @property
    def holds_fp8(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    def hold_fp8(self, codes: torch.Tensor, scale_inv: torch.Tensor, layout, megatron_from_hf=None) -> None:
        """Take the checkpoint's codes [N, K] (HF order) and scales; `megatron_from_hf[i]` is the HF
        row of Megatron row i when the loader permutes rows (rope_interleave = false)."""
        with torch.no_grad():
            self.weight.copy_(codes.to(self.weight.device))
        self.weight_scale_inv = scale_inv.to(device=self.weight.device, dtype=torch.float32).contiguous()
        self.fp8_layout = layout
        if megatron_from_hf is not None:
            self.fp8_out_index = megatron_from_hf.to(self.weight.device)
            self.fp8_dest_rows = torch.argsort(megatron_from_hf).to(self.weight.device)

    def hold_high_precision(self, value: torch.Tensor) -> None:
        """For a linear the checkpoint does not store in FP8: a plain weight in value's dtype."""
        device = self.weight.device
        del self.weight
        self.weight = torch.nn.Parameter(value.to(device), requires_grad=False)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not self.holds_fp8:
            return super()._forward_impl(input, weight, *args, **kwargs)
        if self.fp8_layout is None:
            raise RuntimeError("FP8-resident linear used before its weight was loaded")
        from megatron_easyep.mcore import fp8_gemm

        if input.numel() == 0:  # an expert that received no token: nothing to dequantise
            return super()._forward_impl(input, torch.empty(self.weight.shape, dtype=input.dtype,
                                                            device=input.device), *args, **kwargs)
        if self.fp8_compute == "native":
            out = fp8_gemm.native_linear(input, self.weight, self.weight_scale_inv, self.fp8_layout,
                                         self.fp8_out_index)
            bias = kwargs.get("bias")
            return out if bias is None else out + bias
        dense = fp8_gemm.dequantize_weight(self.weight, self.weight_scale_inv, self.fp8_layout, input.dtype,
                                           self.fp8_dest_rows)
        return super()._forward_impl(input, dense, *args, **kwargs)


def fp8_resident_class(base: type) -> type:
    """The FP8-resident subclass of a Megatron linear class (one per base, cached)."""
    if base not in _FP8_CLASSES:
        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            self._make_fp8_resident()

        _FP8_CLASSES[base] = type(f"Fp8Resident{base.__name__}", (Fp8ResidentLinear, base), {"__init__": __init__})
    return _FP8_CLASSES[base]


def fp8_resident_layer_spec(layer_spec):
    """A copy of one TransformerLayer spec (after adapt_local_layer_spec) with every attention /
    MLP / shared-expert / routed-expert linear swapped for its FP8-resident subclass; MLA's two
    down projections are converted by the attention module itself. Specs are copied on the way
    down, never changed in place, so a later dequantise-at-load build in the same process gets the
    plain classes."""
    import copy
    import dataclasses
    import functools

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    names = set(FP8_ATTENTION_LINEARS) | set(FP8_MLP_LINEARS)
    built_plain = {"linear_q_down_proj", "linear_kv_down_proj"}  # see mla_self_attention_class
    swapped = 0

    def swap_submodules(submodules):
        nonlocal swapped
        if not dataclasses.is_dataclass(submodules):
            return submodules
        changes = {}
        for field in dataclasses.fields(submodules):
            value = getattr(submodules, field.name)
            if field.name in names and field.name not in built_plain and value in (ColumnParallelLinear,
                                                                                    RowParallelLinear):
                changes[field.name] = fp8_resident_class(value)
                swapped += 1
            elif field.name not in names:
                new = swap_spec(value)
                if new is not value:
                    changes[field.name] = new
        return dataclasses.replace(submodules, **changes) if changes else submodules

    def swap_spec(value):
        if isinstance(value, functools.partial) and "submodules" in value.keywords:  # MLP / MoE specs
            sub = swap_submodules(value.keywords["submodules"])
            if sub is value.keywords["submodules"]:
                return value
            return functools.partial(value.func, *value.args, **{**value.keywords, "submodules": sub})
        if hasattr(value, "module") and hasattr(value, "submodules"):  # ModuleSpec
            sub = swap_submodules(value.submodules)
            if sub is value.submodules:
                return value
            spec = copy.copy(value)
            spec.submodules = sub
            return spec
        return value

    layer_spec = copy.copy(layer_spec)
    layer_spec.submodules = swap_submodules(layer_spec.submodules)
    attention = copy.copy(layer_spec.submodules.self_attention)
    attention.params = {**(attention.params or {}), "fp8_resident_down_projections": True}
    layer_spec.submodules = dataclasses.replace(layer_spec.submodules, self_attention=attention)
    if not swapped:
        raise RuntimeError("FP8-resident weights: no Column/RowParallelLinear found in the layer spec "
                           "(megatron-core's local spec changed?)")
    return layer_spec


# ---- fused experts (issue 22; helper "fused"): the one spec swap, to be ported into compat/ ----

def fused_experts_layer_spec(layer_spec):
    """A copy of one TransformerLayer spec whose routed experts (SequentialMLP) are
    mcore.fused_experts.FusedExperts: the same module with every local expert's weights stacked
    per layer, running all experts in a few launches on a GPU (the loop elsewhere). Everything
    else in the spec, the expert linears' classes included (FP8-resident or not), is kept; specs
    are copied on the way down, never changed in place. A spec without SequentialMLP (a dense
    layer) comes back as it is."""
    import copy
    import dataclasses
    import functools

    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_easyep.mcore.fused_experts import FusedExperts

    def swap(value):
        if isinstance(value, functools.partial):
            sub = value.keywords.get("submodules")
            new_sub = swap_fields(sub)
            func = FusedExperts if value.func is SequentialMLP else value.func
            if func is value.func and new_sub is sub:
                return value
            keywords = {**value.keywords, **({"submodules": new_sub} if sub is not None else {})}
            return functools.partial(func, *value.args, **keywords)
        if hasattr(value, "module") and hasattr(value, "submodules"):  # ModuleSpec
            new_sub = swap_fields(value.submodules)
            module = FusedExperts if value.module is SequentialMLP else value.module
            if module is value.module and new_sub is value.submodules:
                return value
            spec = copy.copy(value)
            spec.module, spec.submodules = module, new_sub
            return spec
        return value

    def swap_fields(submodules):
        if not dataclasses.is_dataclass(submodules) or isinstance(submodules, type):
            return submodules
        changes = {}
        for field in dataclasses.fields(submodules):
            old = getattr(submodules, field.name)
            new = swap(old)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(submodules, **changes) if changes else submodules

    return swap(layer_spec)

# ---- end of fused experts ----


def fp8_resident_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every FP8-resident linear in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8ResidentLinear)]


# --------------------------------------------------------------------------------------------
# 4. Hook points for scoring
# --------------------------------------------------------------------------------------------

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


def local_experts(moe_layer) -> list:
    """This rank's expert MLPs of one MoE layer, in local order (SequentialMLP on the local spec).
    Calling one on x gives (e(x), bias) with no gate applied."""
    experts = moe_layer.experts
    if not hasattr(experts, "local_experts"):
        raise NotImplementedError(f"{type(experts).__name__}: per-expert evaluation needs "
                                  "SequentialMLP (the local spec)")
    return list(experts.local_experts)


def iter_moe_layers(model):
    """(global layer id, TransformerLayer) for every MoE layer of a GPTModel (or of this rank's
    pipeline stage). The id is the layer's number in the whole model, 0-based (= the HF layer
    index), not its position inside the stage."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            yield layer.layer_number - 1, layer


def attach_moe_observers(model, on_layer: Callable[[int, MoEObservation], None]):
    """Observe every MoE layer of `model`; `on_layer(global_layer_id, observation)` runs after
    the layer's routed output is combined. Returns a function that detaches everything.

    Residual, router and experts are read with ordinary forward hooks. The routed output is taken
    by wrapping MoELayer.postprocess (instance attribute): it is called with the combined routed
    output and the shared-expert output separately, so we see sum_i g_i e_i exactly, before the
    shared expert is added, at no extra cost and with identical numerics.
    """
    handles = []
    restores = []
    for index, layer in list(iter_moe_layers(model)):
        moe = layer.mlp
        seen: dict = {}

        def residual_hook(module, args, seen=seen):
            seen["residual"] = args[0]

        def router_hook(module, args, output, seen=seen):
            seen["moe_input"] = args[0]
            seen["probs"], seen["routing_map"] = output

        def experts_hook(module, args, output, seen=seen):
            _, tokens_per_expert, permuted_probs = args[:3]
            seen["expert_rows"] = output[0]
            seen["row_probs"] = permuted_probs
            seen["tokens_per_expert"] = tokens_per_expert

        handles.append(layer.pre_mlp_layernorm.register_forward_pre_hook(residual_hook))
        handles.append(moe.router.register_forward_hook(router_hook))
        handles.append(moe.experts.register_forward_hook(experts_hook))

        original_postprocess = moe.postprocess

        def postprocess(output, shared_expert_output, original=original_postprocess, seen=seen,
                        index=index, moe=moe):
            routed = original(output, None)
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
        restores.append(moe)

    def detach():
        for handle in handles:
            handle.remove()
        for moe in restores:
            del moe.postprocess  # back to the class method

    return detach

