"""The local spec's routed experts, all local experts of a layer run together (issue 22).

`FusedExperts` is Megatron-Core's SequentialMLP (it is swapped in for it through the layer spec,
fused_experts_layer_spec below) with the same contract (permuted rows grouped by local expert,
tokens per expert, combine weight per row -> g * e(x) per row, rows in the dispatcher's order, so
the scorer's hook on `moe.experts` reads the grouped output unchanged) and three ways to compute:

* `loop`: SequentialMLP's own per-expert loop (CPU, emulated, training, anything unusual);
* `fp8_fused` (`--fp8 native` on a CUDA GPU with FP8 tensor cores): the rows quantised once per
  1 x 128 group, one grouped block-FP8 Triton GEMM for gate+up over all experts with SiLU·mul and
  the second quantisation in its epilogue, one grouped GEMM for down (mcore/fused_moe_kernels.py);
* `grouped_mm` (bf16 on sm_90+, `--fp8 none`): the stacked weights dequantised block-wise per
  layer (FP8-resident) or used as they are, and two torch._grouped_mm calls.

Weights. Each expert keeps its own `linear_fc1` / `linear_fc2` Parameters under Megatron's names
(the loader, the state dict, C-Prune and the byte accounting see what they saw before), but every
one is a view into one stacked tensor per layer: fc1 [E, 2I, H] (gate rows then up rows, the
checkpoint's bytes), fc2 [E, H, I]. The loader's in-place copy therefore writes straight into the
stack, with no second copy. Block scales are held the same way ([E, 2 * cdiv(I, bm), cdiv(H, bk)]:
the gate's grid then the up's, so each part keeps its own block grid). Whether the views are
intact is checked on every forward (a linear the checkpoint stores in high precision, or anything
that re-points a Parameter, breaks them); when they are not, the layer runs the loop.

`backend` ("auto" by default) can be forced per module (tests, bench): `set_backend(model, name)`.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_easyep.mcore import fused_moe_kernels as kernels

BACKENDS = ("auto", "loop", "fp8_fused", "grouped_mm")
# "auto" on a GPU keeps the per-expert loop until the fused kernels have run on one: they are
# verified under the Triton interpreter only (docs/fused-moe.md). EASYEP_FUSED_EXPERTS=1 lets
# "auto" pick them; the GPU check's bench forces each backend itself.
FUSED_AUTO_ENV = "EASYEP_FUSED_EXPERTS"
# --fp8 none / bf16 dequantises a layer's stacked experts per forward; past this the loop (one
# expert's weight at a time) is kept
MAX_DENSE_BYTES = 8 << 30


class ExpertStack:
    """One stacked tensor holding the weight of the same linear (fc1 or fc2) of every local expert,
    each expert's Parameter a view into it; FP8 block scales stacked alike once loaded."""

    def __init__(self, linears: list):
        self.linears = linears
        first = linears[0].weight
        self.weights = torch.empty((len(linears), *first.shape), dtype=first.dtype, device=first.device)
        self.scales: torch.Tensor | None = None
        self.layout = None
        self.layout_mismatch = False
        self._point_weights_at_stack()

    def _point_weights_at_stack(self) -> None:
        with torch.no_grad():
            for e, linear in enumerate(self.linears):
                self.weights[e].copy_(linear.weight.detach())
                linear.weight.data = self.weights[e]

    def put_scales(self, slot: int, linear) -> None:
        """Move one expert's freshly loaded block scales into the stack (hold_fp8 calls this)."""
        scale = linear.weight_scale_inv
        shape = (len(self.linears), *scale.shape)
        if self.scales is None or tuple(self.scales.shape) != shape or self.scales.device != scale.device:
            self.scales = torch.zeros(shape, dtype=torch.float32, device=scale.device)
        if self.layout is None:
            self.layout = linear.fp8_layout
        elif linear.fp8_layout != self.layout:
            self.layout_mismatch = True
        self.scales[slot].copy_(scale)
        linear.weight_scale_inv = self.scales[slot]

    def restack(self) -> None:
        """After Module._apply (.cuda(), .to()) gave each expert its own storage: stack them again."""
        if self.broken_reason() is None:
            return
        weights = [linear.weight for linear in self.linears]
        if len({(w.dtype, w.device, tuple(w.shape)) for w in weights}) != 1:
            return  # a mixed layer (some expert stored in high precision): it runs the loop
        self.weights = torch.empty((len(weights), *weights[0].shape), dtype=weights[0].dtype,
                                   device=weights[0].device)
        self._point_weights_at_stack()
        scales = [getattr(linear, "weight_scale_inv", None) for linear in self.linears]
        if self.scales is not None and all(s is not None for s in scales):
            self.scales = torch.stack([s.detach() for s in scales])
            for e, linear in enumerate(self.linears):
                linear.weight_scale_inv = self.scales[e]

    def broken_reason(self) -> str | None:
        """Why the experts' tensors are not (all) views of this stack; None when they are."""
        step = self.weights.stride(0) * self.weights.element_size()
        base = self.weights.data_ptr()
        for e, linear in enumerate(self.linears):
            w = linear.weight
            if w.dtype != self.weights.dtype or w.data_ptr() != base + e * step or w.device != self.weights.device:
                return f"local expert {e}'s weight is no longer a view of the layer's stack"
        if self.weights.dtype == torch.float8_e4m3fn:
            if self.scales is None:
                return "FP8 weights without loaded block scales"
            if self.layout_mismatch:
                return "local experts have different FP8 block layouts"
            sstep = self.scales.stride(0) * self.scales.element_size()
            for e, linear in enumerate(self.linears):
                s = linear.weight_scale_inv
                if s is None or s.data_ptr() != self.scales.data_ptr() + e * sstep:
                    return f"local expert {e}'s block scales are not a view of the layer's stack"
                if getattr(linear, "fp8_out_index", None) is not None:
                    return f"local expert {e} permutes its output rows"
        return None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The stacked weights in `dtype` (dequantised block-wise when FP8-resident)."""
        if self.weights.dtype != torch.float8_e4m3fn:
            return self.weights if self.weights.dtype == dtype else self.weights.to(dtype)
        return kernels.dequantize_stacked(self.weights, self.scales, self.layout.part_rows, self.layout.block,
                                          dtype)


_STACKED_CLASSES: dict = {}


class StackedFp8Linear:
    """Mixin for a routed expert's Fp8ResidentLinear whose weight is a view into its layer's
    ExpertStack: loading copies the codes into the view (the parent's in-place copy) and moves the
    block scales into the stacked scales."""

    def hold_fp8(self, codes, scale_inv, layout, megatron_from_hf=None) -> None:
        super().hold_fp8(codes, scale_inv, layout, megatron_from_hf)
        self._easyep_stack.put_scales(self._easyep_slot, self)


def _stacked_class(base: type) -> type:
    if base not in _STACKED_CLASSES:
        _STACKED_CLASSES[base] = type(f"Stacked{base.__name__}", (StackedFp8Linear, base), {})
    return _STACKED_CLASSES[base]


class FusedExperts(SequentialMLP):
    """SequentialMLP whose local experts' weights are stacked per layer and which runs all of them
    in a few launches where it can (module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, name=name)
        from megatron_easyep.mcore.compat.fp8_linears import Fp8ResidentLinear

        self.backend = "auto"
        self.block_m = kernels.DEFAULT_BLOCK_M
        self.last_backend: str | None = None  # what the latest forward ran (tests, bench)
        self.fallback_reason: str | None = None  # set when an "auto" fused path failed once
        self.fc1_stack = ExpertStack([expert.linear_fc1 for expert in self.local_experts])
        self.fc2_stack = ExpertStack([expert.linear_fc2 for expert in self.local_experts])
        for stack in (self.fc1_stack, self.fc2_stack):
            for slot, linear in enumerate(stack.linears):
                if isinstance(linear, Fp8ResidentLinear):
                    linear.__class__ = _stacked_class(type(linear))
                    linear._easyep_stack = stack
                    linear._easyep_slot = slot

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.fc1_stack.restack()
        self.fc2_stack.restack()
        return self

    # ------------------------------------------------------------------ backend choice

    def unsupported_reason(self) -> str | None:
        """Why neither fused path can run this layer (None when one can)."""
        cfg = self.config
        if getattr(cfg, "fp8", None) or getattr(cfg, "fp4", None):
            return "Megatron's own FP8/FP4 recipe is configured"
        if not cfg.gated_linear_unit or cfg.add_bias_linear:
            return "the experts are not bias-free gated linear units"
        if cfg.moe_apply_probs_on_input or cfg.use_te_activation_func or cfg.bias_activation_fusion:
            return "moe_apply_probs_on_input / TE activation / bias-activation fusion"
        if getattr(cfg, "activation_func_clamp_value", None) is not None:
            return "activation_func_clamp_value is set"
        if self.tp_group is not None and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size(self.tp_group) > 1:
            return "expert tensor parallelism (fc2's reduction lives in the per-expert linears)"
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return "autograd is on (the fused kernels have no backward)"
        return self.fc1_stack.broken_reason() or self.fc2_stack.broken_reason()

    def _fp8_fused_reason(self, device) -> str | None:
        """Why the fused FP8 path cannot run (weights, layout, kernels); None when it can."""
        if self.fc1_stack.weights.dtype != torch.float8_e4m3fn or self.fc2_stack.weights.dtype != torch.float8_e4m3fn:
            return "the experts are not held FP8-resident"
        if self.config.activation_func is not F.silu:
            return "the fused epilogue computes SiLU only"
        fc1, fc2 = self.fc1_stack.layout, self.fc2_stack.layout
        inter = self.fc1_stack.weights.shape[1] // 2
        if fc1.part_rows != (inter, inter) or len(fc2.part_rows) != 1 or fc1.block != fc2.block:
            return f"unexpected FP8 layouts {fc1} / {fc2}"
        try:
            kernels.check_triton_block(fc1.block)
        except ValueError as exc:
            return str(exc)
        if device.type != "cuda" and not kernels._interpreting():
            return "the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)"
        return None

    def choose_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The forced `backend`, checked; or for "auto": fp8_fused under --fp8 native on CUDA,
        grouped_mm for bf16 on sm_90+, the loop otherwise (CPU, emulated's per-linear hooks)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"FusedExperts.backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.backend == "loop" or (self.backend == "auto" and (
                device.type != "cuda" or os.environ.get(FUSED_AUTO_ENV) != "1")):
            return "loop"
        reason = self.unsupported_reason()
        if self.backend == "fp8_fused":
            reason = reason or self._fp8_fused_reason(device)
        if self.backend != "auto":
            if reason:
                raise RuntimeError(f"FusedExperts backend {self.backend!r} cannot run: {reason}")
            return self.backend
        if reason or self._expert_hooks():
            return "loop"
        native = all(getattr(linear, "fp8_compute", None) == "native"
                     for linear in self.fc1_stack.linears + self.fc2_stack.linears)
        if native and self._fp8_fused_reason(device) is None:
            from megatron_easyep.mcore.fp8_gemm import native_unavailable_reason

            if native_unavailable_reason(device) is None:
                return "fp8_fused"
        if kernels.grouped_mm_available(device, dtype) and self._dense_bytes(dtype) <= MAX_DENSE_BYTES:
            return "grouped_mm"
        return "loop"

    def _expert_hooks(self) -> bool:
        """Hooks on the per-expert modules (--fp8 emulated's activation quantisation, a user's)
        fire only on the loop."""
        return any(m._forward_pre_hooks or m._forward_hooks for m in self.local_experts.modules())

    def _dense_bytes(self, dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return size * (self.fc1_stack.weights.numel() + self.fc2_stack.weights.numel())

    # ------------------------------------------------------------------ forward

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        backend = "loop" if self.fallback_reason else self.choose_backend(x.device, x.dtype)
        if backend != "loop":
            try:
                out = self._forward_fused(backend, x, tokens_per_expert, permuted_probs)
                self.last_backend = backend
                return out, None
            except Exception as exc:
                if self.backend != "auto":  # forced (tests, bench): the error is the result
                    raise
                # "auto" chose a fused path that failed (a Triton build or a torch without the
                # op): say so once, and keep this layer on the loop from now on
                self.fallback_reason = f"{backend} failed ({type(exc).__name__}: {str(exc)[:300]})"
                warnings.warn(f"FusedExperts: {self.fallback_reason}; this layer runs the per-expert loop")
        self.last_backend = "loop"
        return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    def _forward_fused(self, backend, x, tokens_per_expert, permuted_probs):
        if not isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = torch.tensor(list(tokens_per_expert), dtype=torch.int64)
        counts = tokens_per_expert.to(x.device, non_blocking=True)
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_cuda and int(counts.sum()) != x2.shape[0]:  # free on CPU; the loop's split checks it too
            raise RuntimeError(f"FusedExperts: {x2.shape[0]} rows but tokens_per_expert sums to "
                               f"{int(counts.sum())}")
        glu_offset = float(self.config.glu_linear_offset or 0.0)
        if backend == "fp8_fused":
            out = kernels.fused_moe_fp8(x2, counts, permuted_probs, self.fc1_stack.weights, self.fc1_stack.scales,
                                        self.fc2_stack.weights, self.fc2_stack.scales,
                                        block=self.fc1_stack.layout.block, glu_offset=glu_offset,
                                        block_m=self.block_m)
        else:
            out = kernels.grouped_mm_experts(x2, counts, permuted_probs, self.fc1_stack.dense(x.dtype),
                                             self.fc2_stack.dense(x.dtype), activation=self.config.activation_func,
                                             glu_offset=glu_offset)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def fused_experts_modules(model) -> list[FusedExperts]:
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


def set_backend(model, backend: str, block_m: int | None = None) -> int:
    """Force every FusedExperts of `model` onto `backend` (one of BACKENDS); returns how many."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    modules = fused_experts_modules(model)
    for module in modules:
        module.backend = backend
        module.fallback_reason = None
        if block_m is not None:
            module.block_m = block_m
    return len(modules)


def fused_experts_layer_spec(layer_spec):
    """A copy of one TransformerLayer spec whose routed experts (SequentialMLP) are
    FusedExperts: the same module with every local expert's weights stacked
    per layer, running all experts in a few launches on a GPU (the loop elsewhere). Everything
    else in the spec, the expert linears' classes included (FP8-resident or not), is kept; specs
    are copied on the way down, never changed in place. A spec without SequentialMLP (a dense
    layer) comes back as it is."""
    import copy
    import dataclasses
    import functools

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
