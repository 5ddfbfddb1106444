"""DeepSeek-V3 FP8 numerics, emulated in ordinary dtypes on any device (CPU included).

DeepSeek-V3/R1 run their attention and MLP/expert GEMMs in FP8 (e4m3) with fine-grained scales:

* weights: one float32 scale per 128x128 block (``quantization_config.weight_block_size``);
* activations: one float32 scale per token per 1x128 group along the GEMM's input (K) dimension,
  computed on the fly ("activation_scheme": "dynamic"): scale = amax(|group|) / 448;
* q = (x / scale) rounded to e4m3 (round to nearest, ties to even), saturated at +-448;
* the GEMM multiplies the codes and applies both scales with fp32 accumulation.

The emulation fake-quantises both operands (quantise, then dequantise in float32) and runs the
model's own matmul on the dequantised values, so the FP8 rounding of every operand is reproduced
exactly. What is *not* reproduced: the tensor core's limited-precision partial accumulation
(DeepSeek promotes to fp32 every 128 K-elements; the emulation accumulates in the model dtype),
and in a bf16 model the dequantised operands are rounded to bf16 (relative 2^-9, far below e4m3's
2^-4 step). The router, the embedding, the output layer and every norm stay in high precision, as
in DeepSeek's inference code.

Usage (after the model is loaded)::

    state = enable_fp8_emulation(model, block_size=cfg.weight_block_size or (128, 128),
                                 hf_config=cfg)
    ... forward passes ...
    state.remove()  # drops the activation hooks; weights stay fake-quantised

For an FP8 checkpoint loaded in float32 the weight step changes nothing (the loaded values are
already q * scale_inv, and re-quantising them gives the same codes and scales back); the returned
state counts the elements it changed so a run can log that. ``resolve_fp8_mode`` decides between
this path, real FP8 GEMMs (``native``) and Transformer Engine's.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from megatron_easyep.checkpoint.fp8_blocks import (
    DEFAULT_BLOCK_SIZE,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    MIN_BLOCK_AMAX,
    dequantize_fp8_blockwise,
    quantize_fp8_blockwise,
)
from megatron_easyep.mcore.compat import fp8_linears

FP8_MODES = ("none", "auto", "emulated", "native", "te")

# Linear modules that DeepSeek runs in FP8, by their attribute name in Megatron-Core's GPTModel
# (the one list, shared with the FP8-resident swap).
ATTENTION_LINEARS = frozenset(fp8_linears.FP8_ATTENTION_LINEARS)
MLP_LINEARS = frozenset(fp8_linears.FP8_MLP_LINEARS)  # dense MLP, shared experts, routed experts


class Fp8Unavailable(ValueError):
    """--fp8 asked for a path this machine cannot run (message says what is missing)."""


# ------------------------------------------------------------------------------------------------
# Mode selection
# ------------------------------------------------------------------------------------------------

def transformer_engine_status() -> tuple[bool, str]:
    """(usable, reason): Transformer Engine imports, a CUDA GPU of compute capability >= 9.0
    (Hopper: H100/H800/H200) is present, and TE's FP8 block-scaling recipe (DeepSeek's 128x128
    weights, 1x128 activations) is available on it."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from transformer_engine.common.recipe import Float8BlockScaling  # noqa: F401
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA install
        return False, f"transformer_engine.pytorch with Float8BlockScaling does not import ({exc})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return False, (f"GPU {torch.cuda.get_device_name()} has compute capability {major}.{minor}; "
                       "FP8 block scaling needs 9.0+ (Hopper)")
    manager = None
    for module in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization"):
        try:
            manager = __import__(module, fromlist=["FP8GlobalStateManager"]).FP8GlobalStateManager
            break
        except (ImportError, AttributeError):
            continue
    check = getattr(manager, "is_fp8_block_scaling_available", None)
    if check is not None:
        available, why = check()
        if not available:
            return False, f"Transformer Engine reports FP8 block scaling unavailable: {why}"
    return True, f"Transformer Engine on {torch.cuda.get_device_name()} (sm{major}{minor})"


def native_fp8_status() -> str | None:
    """Why real FP8 GEMMs cannot run on this machine's GPU (None when they can: CUDA with FP8
    tensor cores, sm_89+, through torch._scaled_mm on sm_90 or the Triton kernel; mcore/fp8_gemm.py)."""
    from megatron_easyep.mcore.fp8_gemm import native_unavailable_reason

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return native_unavailable_reason(device)


def resolve_fp8_mode(requested: str | None, te_status: tuple[bool, str] | None = None, *,
                     fp8_weights_resident: bool = True, native_status: str | None | bool = False) -> str:
    """--fp8 value -> the path to run: "none", "emulated", "native" or "te".

    none     -> "none" (FP8-resident weights dequantised per GEMM, or weights dequantised at load:
                the model dtype throughout).
    emulated -> "emulated" on any machine (this module).
    native   -> "native" (real FP8 GEMMs, mcore/fp8_gemm.py) when a CUDA GPU with FP8 tensor cores
                is visible; otherwise Fp8Unavailable naming --fp8 emulated.
    te       -> "te" when Transformer Engine and a Hopper GPU are usable; otherwise Fp8Unavailable
                naming what is missing and pointing at --fp8 emulated.
    auto     -> "native" where it is supported (a CUDA GPU with FP8 tensor cores, and the
                checkpoint's FP8 weights held FP8-resident: ``fp8_weights_resident``), otherwise
                "emulated", the exact path. Transformer Engine is never picked automatically.
    ``te_status`` is ``transformer_engine_status()`` and ``native_status`` (None = supported, else
    the reason) is ``native_fp8_status()`` unless given.
    """
    mode = "none" if requested is None else str(requested).lower()
    if mode not in FP8_MODES:
        raise ValueError(f"--fp8 {requested!r}: choose one of {', '.join(FP8_MODES)}")
    if mode in ("none", "emulated"):
        return mode
    if mode in ("native", "auto"):
        reason = native_fp8_status() if native_status is False else native_status
        if mode == "auto":
            return "native" if reason is None and fp8_weights_resident else "emulated"
        if reason:
            raise Fp8Unavailable(reason)
        return mode
    usable, reason = te_status if te_status is not None else transformer_engine_status()
    if usable:
        return "te"
    raise Fp8Unavailable(f"--fp8 te: no usable Transformer Engine FP8 path: {reason}. Install "
                         "transformer-engine[pytorch] on a Hopper GPU node, or use --fp8 emulated "
                         "(same DeepSeek FP8 numerics, emulated, any device)")


# ------------------------------------------------------------------------------------------------
# Quantisation primitives
# ------------------------------------------------------------------------------------------------

def _check_group(group_size) -> int:
    if int(group_size) != group_size or group_size <= 0:
        raise ValueError(f"activation group size must be a positive integer, got {group_size!r}")
    return int(group_size)


def quantize_activation(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-group quantisation along the last dim (DeepSeek's act_quant):
    x [..., K] -> (q float8_e4m3fn [..., K], scale float32 [..., ceil(K / group_size)]),
    scale = amax(|group|) / 448 (amax floored at MIN_BLOCK_AMAX so an all-zero group stays 0).
    A last, partial group covers only the columns that exist."""
    g = _check_group(group_size)
    k = x.shape[-1]
    groups = math.ceil(k / g)
    flat = x.detach().reshape(-1, k).to(torch.float32)
    if groups * g != k:
        flat = torch.nn.functional.pad(flat, (0, groups * g - k))  # zeros never raise an amax
    blocks = flat.view(-1, groups, g)
    amax = blocks.abs().amax(dim=-1).clamp(min=MIN_BLOCK_AMAX)
    # a tensor divisor: torch on CUDA turns division by a Python scalar into a multiplication by its
    # reciprocal (not the IEEE quotient), which would make this oracle device-dependent
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    q = (blocks / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    q = q.view(-1, groups * g)[:, :k].reshape(x.shape)
    return q, scale.reshape(*x.shape[:-1], groups)


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_activation: x[..., group j] = q[..., group j] * scale[..., j]."""
    g = _check_group(group_size)
    k = q.shape[-1]
    per_column = scale.to(torch.float32).repeat_interleave(g, dim=-1)[..., :k]
    return (q.to(torch.float32) * per_column).to(dtype)


def fake_quantize_activation(x: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """x rounded through DeepSeek's dynamic 1 x group_size e4m3 quantisation, in x's dtype."""
    q, scale = quantize_activation(x, group_size)
    return dequantize_activation(q, scale, group_size, dtype=x.dtype)


def fake_quantize_weight(w: torch.Tensor, block_size=DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """w rounded through DeepSeek's block-wise e4m3 weight quantisation, in w's dtype."""
    q, scale_inv = quantize_fp8_blockwise(w, block_size)
    return dequantize_fp8_blockwise(q, scale_inv, block_size, dtype=w.dtype)


# ------------------------------------------------------------------------------------------------
# Applying it to a Megatron-Core GPTModel
# ------------------------------------------------------------------------------------------------

def fp8_linear_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear DeepSeek runs in FP8: attention projections, dense MLP,
    shared and routed experts. Router, embedding, output layer and norms are not included.
    Modules without a 2-D ``weight`` (IdentityOp when q_lora_rank is null) are skipped."""
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ATTENTION_LINEARS:
            if ".self_attention." not in f".{name}":
                continue
        elif leaf in MLP_LINEARS:
            if ".mlp." not in f".{name}":
                continue
        else:
            continue
        if "LayerNorm" in type(module).__name__:
            # TE's fused norm+linear: its input is the pre-norm hidden state, so a pre-hook would
            # quantise the wrong tensor.
            raise NotImplementedError(
                f"{name} ({type(module).__name__}) fuses a norm into the linear; emulated FP8 "
                "needs Megatron-Core's local layer spec (use --fp8 te with Transformer Engine)")
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            found.append((name, module))
        elif any(p is not None for p in module.parameters(recurse=False)):
            raise NotImplementedError(
                f"{name} ({type(module).__name__}) is not a single-weight linear; emulated FP8 "
                "supports Megatron-Core's local spec (use --fp8 te for Transformer Engine layers)")
    return found


def _is_fp8_resident(module) -> bool:
    return fp8_linears.holds_fp8_weights(module)


def _row_splits(name: str, module, weight: torch.Tensor) -> list[int]:
    """Row sizes of the HF tensors a Megatron weight is concatenated from: FP8 blocks are per HF
    tensor, so gate and up (linear_fc1 with a gated unit) are quantised separately."""
    leaf = name.rsplit(".", 1)[-1]
    config = getattr(module, "config", None)
    if leaf == "linear_fc1" and getattr(config, "gated_linear_unit", False):
        half = weight.shape[0] // 2
        return [half, weight.shape[0] - half]
    if leaf == "linear_qkv_down_proj" and getattr(config, "q_lora_rank", None):
        return [config.q_lora_rank, weight.shape[0] - config.q_lora_rank]
    return [weight.shape[0]]


def _rope_row_permutation(name: str, weight: torch.Tensor, hf_config):
    """For checkpoints with rope_interleave = false, model.load_weights permutes each head's rope
    rows; FP8 blocks are defined on the HF row order. Returns (hf_from_megatron, megatron_from_hf)
    index tensors, or None when no permutation applies."""
    from megatron_easyep.mcore.mapping import ROPE_PERMUTED  # the HF tensor model.megatron_row_order keys on

    hf_name = ROPE_PERMUTED.get(name.rsplit(".", 1)[-1])
    if hf_config is None or hf_name is None:
        return None
    from megatron_easyep.mcore.model import megatron_row_order

    megatron_from_hf = megatron_row_order(hf_config, hf_name, weight.shape[0])
    if megatron_from_hf is None:
        return None
    return torch.argsort(megatron_from_hf), megatron_from_hf


@torch.no_grad()
def _fake_quantize_module_weight(name, module, block_size, hf_config) -> int:
    weight = module.weight
    perm = _rope_row_permutation(name, weight, hf_config)
    w = weight.detach()
    if perm is not None:
        w = w[perm[0].to(w.device)]  # HF row order
    parts = torch.split(w, _row_splits(name, module, w), dim=0)
    fq = torch.cat([fake_quantize_weight(p, block_size) for p in parts], dim=0)
    if perm is not None:
        fq = fq[perm[1].to(fq.device)]  # back to Megatron's order
    changed = int((fq != weight).sum())
    weight.copy_(fq)
    return changed


@dataclasses.dataclass
class Fp8EmulationState:
    """What enable_fp8_emulation did: the modules it touched and how many weight elements it
    changed (0 for an FP8 checkpoint loaded in float32)."""

    block_size: tuple[int, int]
    activation_group: int
    modules: list[str]
    weight_elements: int
    weight_elements_changed: int
    handles: list = dataclasses.field(default_factory=list, repr=False)
    model: object = dataclasses.field(default=None, repr=False, compare=False)

    def remove(self) -> None:
        """Detach the activation hooks (weights stay fake-quantised)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.model is not None and getattr(self.model, "_easyep_fp8_emulation", None) is self:
            del self.model._easyep_fp8_emulation
        self.model = None

    def as_dict(self) -> dict:
        return {"mode": "emulated", "weight_block_size": list(self.block_size),
                "activation_group_size": self.activation_group, "linear_modules": len(self.modules),
                "weight_elements": self.weight_elements,
                "weight_elements_changed": self.weight_elements_changed}


def enable_fp8_emulation(model, block_size=DEFAULT_BLOCK_SIZE, *, activation_group: int | None = None,
                         hf_config=None) -> Fp8EmulationState:
    """Emulate DeepSeek FP8 in the attention and MLP/expert GEMMs of a Megatron-Core GPTModel.

    (a) fake-quantises, in place, the weight of every module from fp8_linear_modules() per
        ``block_size`` block (of the HF tensors the weight was built from), and
    (b) registers a forward pre-hook on each that fake-quantises its input per token in groups of
        ``activation_group`` (default: block_size[1], the weight's K block, as DeepSeek pairs them).
    ``hf_config`` (DeepseekV3Config) is only needed for rope_interleave = false checkpoints.
    Calling it twice on one model is refused (the hooks would stack).
    """
    if getattr(model, "_easyep_fp8_emulation", None) is not None:
        raise RuntimeError("FP8 emulation is already enabled on this model")
    block = tuple(int(b) for b in (block_size or DEFAULT_BLOCK_SIZE))
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"block_size must be two positive integers, got {block_size!r}")
    group = _check_group(activation_group if activation_group is not None else block[1])
    modules = fp8_linear_modules(model)
    if not modules:
        raise ValueError("no attention or MLP linear layers found: is this a Megatron GPTModel?")

    def quantize_input(x):
        return fake_quantize_activation(x, group)

    state = Fp8EmulationState(block, group, [], 0, 0)
    for name, module in modules:
        if not _is_fp8_resident(module):  # FP8-resident weights are the checkpoint's codes already
            state.weight_elements_changed += _fake_quantize_module_weight(name, module, block, hf_config)
        state.weight_elements += module.weight.numel()
        state.handles.append(fp8_linears.register_linear_input_hook(module, quantize_input))
        state.modules.append(name)
    state.model = model
    model._easyep_fp8_emulation = state
    return state


def configure_fp8(model, mode: str, hf_config) -> dict:
    """Put a loaded model in the resolved --fp8 mode; returns the provenance record.

    none     FP8-resident linears dequantise per GEMM (bitwise the dequantise-at-load results).
    emulated enable_fp8_emulation (activation fake-quantisation; resident weights are exact already).
    native   FP8-resident linears run real block-scaled FP8 GEMMs (needs an FP8 checkpoint held
             FP8-resident, i.e. not --dequantize-at-load).
    """
    resident = [(n, m) for n, m in fp8_linears.fp8_resident_linears(model) if m.holds_fp8]
    weights = "fp8-resident" if resident else "high-precision"
    if mode == "native":
        if not resident:
            raise Fp8Unavailable("--fp8 native needs FP8 weights held as FP8: an FP8 checkpoint loaded "
                                 "without --dequantize-at-load (or use --fp8 emulated)")
        for _, module in resident:
            module.fp8_compute = "native"
        return {"mode": "native", "weights": weights, "fp8_linears": len(resident)}
    for _, module in resident:
        module.fp8_compute = "dequantize"
    if mode == "emulated":
        block = hf_config.weight_block_size or DEFAULT_BLOCK_SIZE
        return {**enable_fp8_emulation(model, block, hf_config=hf_config).as_dict(), "weights": weights}
    if mode != "none":
        raise ValueError(f"configure_fp8: unknown mode {mode!r}")
    return {"mode": "none", "weights": weights, "fp8_linears": len(resident)}
