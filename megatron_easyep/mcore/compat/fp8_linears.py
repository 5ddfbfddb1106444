"""FP8-resident linears, swapped in through the layer spec, and the linear-input hook FP8
emulation uses.

The local spec's Column/RowParallelLinear are replaced, in a copy of the layer spec, by
subclasses that hold DeepSeek's FP8 bytes and block scales under Megatron's own parameter name
(`weight`) and compute through mcore/fp8_gemm.py by overriding `_forward_impl` (the private step
where Megatron's forward hands (input, weight) to its matmul). MLP and MoE specs carry their
submodules in `functools.partial(..., submodules=...)` keywords; the spec walk rewrites those.
"""

from __future__ import annotations

import torch

# Linear modules DeepSeek stores and runs in FP8, by their attribute name in Megatron-Core's local
# spec (one list for the FP8-resident swap and for FP8 emulation).
FP8_ATTENTION_LINEARS = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_qkv_down_proj",
                         "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj")
FP8_MLP_LINEARS = ("linear_fc1", "linear_fc2")  # dense MLP, shared experts, routed experts
# built plain and converted by the attention module (see mla.mla_self_attention_class)
BUILT_PLAIN = ("linear_q_down_proj", "linear_kv_down_proj", "linear_qkv_down_proj")

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


def _swap_in_spec(layer_spec, names: set, linear_classes: tuple):
    """A copy of `layer_spec` with every field in `names` holding one of `linear_classes` swapped
    for its FP8-resident subclass; returns (spec, number swapped). Copies on the way down."""
    import copy
    import dataclasses
    import functools

    swapped = 0

    def swap_submodules(submodules):
        nonlocal swapped
        if not dataclasses.is_dataclass(submodules):
            return submodules
        changes = {}
        for field in dataclasses.fields(submodules):
            value = getattr(submodules, field.name)
            if field.name in names and field.name not in BUILT_PLAIN and value in linear_classes:
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
    return layer_spec, swapped


def fp8_resident_layer_spec(layer_spec):
    """A copy of one TransformerLayer spec (after mla.adapt_local_layer_spec with fp8_resident)
    with every attention / MLP / shared-expert / routed-expert linear swapped for its FP8-resident
    subclass; MLA's two down projections are converted by the attention module itself. Specs are
    copied on the way down, never changed in place, so a later dequantise-at-load build in the
    same process gets the plain classes."""
    import copy
    import dataclasses

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    names = set(FP8_ATTENTION_LINEARS) | set(FP8_MLP_LINEARS)
    layer_spec, swapped = _swap_in_spec(layer_spec, names, (ColumnParallelLinear, RowParallelLinear))
    attention = copy.copy(layer_spec.submodules.self_attention)
    attention.params = {**(attention.params or {}), "fp8_resident_down_projections": True}
    layer_spec.submodules = dataclasses.replace(layer_spec.submodules, self_attention=attention)
    if not swapped:
        raise RuntimeError("FP8-resident weights: no Column/RowParallelLinear found in the layer spec "
                           "(megatron-core's local spec changed?)")
    return layer_spec


def fp8_resident_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every FP8-resident linear in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8ResidentLinear)]


def holds_fp8_weights(module) -> bool:
    """Whether `module` is an FP8-resident linear currently holding the checkpoint's FP8 codes."""
    return isinstance(module, Fp8ResidentLinear) and module.holds_fp8


def register_linear_input_hook(module, transform):
    """Pre-hook on a Column/RowParallelLinear that replaces its input x by transform(x). Megatron
    calls them positionally or as `input_=` (the parameter name contract.py checks). Returns the
    torch hook handle."""

    def pre_hook(mod, args, kwargs):
        if args:
            return (transform(args[0]),) + tuple(args[1:]), kwargs
        if "input_" in kwargs:
            return args, {**kwargs, "input_": transform(kwargs["input_"])}
        raise RuntimeError(f"FP8 emulation: {type(mod).__name__} called without an input")

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
