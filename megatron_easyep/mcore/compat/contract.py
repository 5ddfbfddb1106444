"""The start-up contract: every Megatron-Core internal megatron-easyep relies on, checked once
before the first model is built (check_installed), plus two checks on built models (the FP8 swap
reached every linear; g is applied inside the experts). A broken assumption raises ContractError
naming the assumption and the installed megatron-core version, instead of wrong numbers later.
"""

from __future__ import annotations

import inspect

SUPPORTED = (0, 19)  # megatron-core 0.19.x
GPT_MODEL_LOGGER = "megatron.core.models.gpt.gpt_model"  # where GPTModel logs its deprecation banner


class ContractError(RuntimeError):
    """An assumption about Megatron-Core internals does not hold for the installed version."""


def installed_version() -> str:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:  # noqa: BLE001 - the message must still be produced
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")


def _fail(assumption: str, detail: str) -> ContractError:
    return ContractError(f"megatron-core contract broken: {assumption} -- {detail} (installed "
                         f"megatron-core {installed_version()}; megatron-easyep is written against "
                         f"{SUPPORTED[0]}.{SUPPORTED[1]}.x; see megatron_easyep/mcore/compat/)")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)  # follows functools.wraps to the original


def _code_names(fn) -> set[str]:
    """Global/attribute names used by fn's code and every function nested in it."""
    names, stack = set(), [getattr(fn, "__code__", None)]
    while stack:
        code = stack.pop()
        if code is None:
            continue
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if inspect.iscode(c))
    return names


# --------------------------------------------------------------------------------------------
# Static assumptions: (name, check) where check() returns None or a detail string
# --------------------------------------------------------------------------------------------

def _version():
    parts = installed_version().split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return f"cannot parse version {installed_version()!r}"
    return None if major_minor == SUPPORTED else "version outside the supported range"


def _expect_params(fn_getter, expected: tuple[str, ...], prefix: bool = False):
    def check():
        got = _params(fn_getter())
        ok = got[:len(expected)] == list(expected) if prefix else got == list(expected)
        return None if ok else f"signature is ({', '.join(got)}), expected ({', '.join(expected)}{', ...' if prefix else ''})"
    return check


def _expect_calls(fn_getter, name: str):
    def check():
        return None if name in _code_names(fn_getter()) else f"no longer calls {name}"
    return check


def _moe_utils():
    from megatron.core.transformer.moe import moe_utils
    return moe_utils


def _mla():
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    return MLASelfAttention


def _linears():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    return ColumnParallelLinear, RowParallelLinear


def _linear_checks():
    for cls in _linears():
        got = _params(cls._forward_impl)
        if got[:3] != ["self", "input", "weight"]:
            return f"{cls.__name__}._forward_impl is ({', '.join(got)}), expected (self, input, weight, ...)"
        if "_forward_impl" not in _code_names(cls.forward):
            return f"{cls.__name__}.forward no longer calls _forward_impl"
        if _params(cls.forward)[:2] != ["self", "input_"]:
            return f"{cls.__name__}.forward is ({', '.join(_params(cls.forward))}), expected (self, input_, ...)"
    return None


def _sdpa_covers_dot_product_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_easyep.mcore.compat.mla import SDPACoreAttention

    ours = set(_params(SDPACoreAttention.forward))
    missing = [p for p in _params(DotProductAttention.forward) if p not in ours]
    return f"DotProductAttention.forward takes {missing}, SDPACoreAttention does not" if missing else None


def _moe_layer():
    from megatron.core.transformer.moe.moe_layer import MoELayer
    return MoELayer


def _postprocess_called():
    names = set()
    for _, fn in inspect.getmembers(_moe_layer(), inspect.isfunction):
        if fn.__name__ != "postprocess":
            names |= _code_names(fn)
    return None if "postprocess" in names else "MoELayer no longer calls self.postprocess"


def _router_forward():
    from megatron.core.transformer.moe.router import TopKRouter
    return TopKRouter.forward


def _sequential_mlp_forward():
    from megatron.core.transformer.moe.experts import SequentialMLP
    return SequentialMLP.forward


def _alltoall_forward():
    from megatron.core.tensor_parallel import mappings
    return mappings._AllToAll.forward


def _p2p():
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    return P2PCommunicator


def _p2p_checks():
    comm = _p2p()
    for fn, expected in ((comm.__init__, ["self", "pp_group", "config"]),
                         (comm.recv_forward, ["self", "tensor_shapes", "is_first_stage"]),
                         (comm.send_forward, ["self", "output_tensors", "is_last_stage"])):
        got = _params(fn)
        if got[:len(expected)] != expected:
            return f"P2PCommunicator.{fn.__name__} is ({', '.join(got)}), expected ({', '.join(expected)})"
    return None


def _seed_fn():
    from megatron.core import tensor_parallel
    return tensor_parallel.model_parallel_cuda_manual_seed


def _seed_check():
    return None if "inference_rng_tracker" in _params(_seed_fn()) else "no inference_rng_tracker parameter"


def _gpt_logger():
    from megatron.core.models.gpt import gpt_model

    name = getattr(getattr(gpt_model, "logger", None), "name", None)
    return None if name == GPT_MODEL_LOGGER else f"GPTModel logs through {name!r}, not {GPT_MODEL_LOGGER!r}"


ASSUMPTIONS = (
    ("megatron-core version is 0.19.x", _version),
    ("moe_utils.group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk), "
     "replaced by the DeepSeek group rule where it differs (compat/routing.py)",
     _expect_params(lambda: _moe_utils().group_limited_topk, ("scores", "topk", "num_tokens", "num_experts",
                                                               "num_groups", "group_topk"))),
    ("moe_utils.topk_routing_with_score_function reaches group_limited_topk through the module global "
     "(so the replacement takes effect)",
     _expect_calls(lambda: _moe_utils().topk_routing_with_score_function, "group_limited_topk")),
    ("tensor_parallel.mappings._AllToAll.forward(ctx, group, input, output_split_sizes, input_split_sizes, "
     "use_nccl_stream), wrapped on CPU to pass split sizes as lists (compat/cpu.py)",
     _expect_params(_alltoall_forward, ("ctx", "group", "input", "output_split_sizes", "input_split_sizes",
                                        "use_nccl_stream"))),
    ("MLASelfAttention._resolve_qk_norm_config(self, submodules), overridden for q_lora_rank = null "
     "(compat/mla.py)", _expect_params(lambda: _mla()._resolve_qk_norm_config, ("self", "submodules"))),
    ("MLASelfAttention.__init__ builds its Q/KV norms through self._resolve_qk_norm_config",
     _expect_calls(lambda: _mla().__init__, "_resolve_qk_norm_config")),
    ("SDPACoreAttention accepts every argument of DotProductAttention.forward (compat/mla.py)",
     _sdpa_covers_dot_product_attention),
    ("Column/RowParallelLinear.forward(self, input_) hands (input, weight) to _forward_impl(self, input, "
     "weight, ...), overridden by the FP8-resident linears; FP8 emulation's pre-hook knows input_ "
     "(compat/fp8_linears.py)", _linear_checks),
    ("TopKRouter.forward(self, input, ...) returns (probs, routing_map) (compat/hooks.py)",
     _expect_params(_router_forward, ("self", "input"), prefix=True)),
    ("SequentialMLP.forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs) "
     "(compat/hooks.py reads its arguments)",
     _expect_params(_sequential_mlp_forward, ("self", "permuted_local_hidden_states", "tokens_per_expert",
                                              "permuted_probs"))),
    ("MoELayer.postprocess(self, output, shared_expert_output) gets the routed and shared outputs "
     "separately (compat/hooks.py wraps it)",
     _expect_params(lambda: _moe_layer().postprocess, ("self", "output", "shared_expert_output"))),
    ("MoELayer's forward calls self.postprocess", _postprocess_called),
    ("P2PCommunicator(pp_group, config).recv_forward(tensor_shapes, is_first_stage) / "
     "send_forward(output_tensors, is_last_stage) (compat/pipeline_schedule.py)", _p2p_checks),
    ("tensor_parallel.model_parallel_cuda_manual_seed takes inference_rng_tracker (CPU seeding, "
     "compat/cpu.py)", _seed_check),
    ("moe_utils.get_updated_expert_bias(tokens_per_expert, expert_bias, expert_bias_update_rate, ...) "
     "(training, compat/routing.py)",
     _expect_params(lambda: _moe_utils().get_updated_expert_bias,
                    ("tokens_per_expert", "expert_bias", "expert_bias_update_rate"), prefix=True)),
    ("gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine, normalization, ...) "
     "builds the local spec (compat/gpt.py)",
     _expect_params(lambda: __import__("megatron.core.models.gpt.gpt_layer_specs", fromlist=["x"])
                    .get_gpt_decoder_block_spec, ("config", "use_transformer_engine", "normalization"),
                    prefix=True)),
    ("GPTModel's deprecation banner is logged by logger 'megatron.core.models.gpt.gpt_model' "
     "(compat/gpt.py filters it)", _gpt_logger),
)


def verify_installed() -> list[str]:
    """Every broken static assumption, as 'assumption -- detail' (empty when all hold)."""
    broken = []
    for assumption, check in ASSUMPTIONS:
        try:
            detail = check()
        except Exception as exc:  # noqa: BLE001 - a missing name is a broken assumption too
            detail = f"{type(exc).__name__}: {exc}"
        if detail:
            broken.append(f"{assumption} -- {detail}")
    return broken


_CHECKED = False


def check_installed(force: bool = False) -> None:
    """Raise ContractError when any static assumption is broken (checked once per process)."""
    global _CHECKED
    if _CHECKED and not force:
        return
    broken = verify_installed()
    if broken:
        raise ContractError(f"megatron-core contract broken (installed megatron-core {installed_version()}; "
                            f"megatron-easyep is written against {SUPPORTED[0]}.{SUPPORTED[1]}.x; "
                            "see megatron_easyep/mcore/compat/):\n  - " + "\n  - ".join(broken))
    _CHECKED = True


# --------------------------------------------------------------------------------------------
# Checks on specs and built models
# --------------------------------------------------------------------------------------------

def check_local_attention_spec(attention_spec) -> None:
    """The local spec's attention is MLASelfAttention (the exact class compat/mla.py subclasses),
    with the submodule fields it rewrites."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_easyep.mcore.compat.mla import mla_self_attention_class

    if attention_spec.module not in (MLASelfAttention, mla_self_attention_class()):
        raise _fail("the local layer spec's self_attention is MLASelfAttention",
                    f"it is {getattr(attention_spec.module, '__name__', attention_spec.module)!r}")
    missing = [f for f in ("core_attention", "q_layernorm", "kv_layernorm", "linear_q_proj")
               if not hasattr(attention_spec.submodules, f)]
    if missing:
        raise _fail("MLA's submodules have core_attention, q_layernorm, kv_layernorm, linear_q_proj",
                    f"missing {missing}")
    column, _ = _linears()
    for name in ("linear_q_down_proj", "linear_kv_down_proj"):
        value = getattr(attention_spec.submodules, name, None)
        if value is not column:
            raise _fail(f"the local spec builds MLA's {name} as exactly ColumnParallelLinear (the class "
                        "MLA's exact-class check accepts and compat/mla.py turns FP8-resident by a "
                        "__class__ swap)", f"it is {getattr(value, '__name__', value)!r}")


def check_fp8_resident_model(model) -> None:
    """Every linear DeepSeek stores in FP8 was built FP8-resident: the spec rewrite (functools.
    partial keywords) reached the experts and the __class__ swap past MLA's exact-class check
    reached the down projections."""
    from megatron_easyep.mcore.compat.fp8_linears import (FP8_ATTENTION_LINEARS, FP8_MLP_LINEARS,
                                                          Fp8ResidentLinear)

    column, row = _linears()
    names = set(FP8_ATTENTION_LINEARS) | set(FP8_MLP_LINEARS)
    plain = [n for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in names and isinstance(m, (column, row))
             and not isinstance(m, Fp8ResidentLinear)]
    if plain:
        raise _fail("the FP8-resident swap (layer-spec partial keywords, __class__ swap of MLA's down "
                    "projections) reaches every FP8 linear", f"still plain: {plain[:4]}")


class NonFiniteExpert(ValueError):
    """An expert whose output on ordinary inputs is NaN/Inf: its weights are not finite."""


def _check_experts_finite(moe_layer, layer_index: int, ungated) -> None:
    """Two rows per local expert, in order: name the experts with a non-finite output."""
    import torch

    bad_rows = (~torch.isfinite(ungated).all(dim=-1)).nonzero().flatten().tolist()
    if bad_rows:
        ids = sorted({int(moe_layer.local_expert_indices[row // 2]) for row in bad_rows})
        raise NonFiniteExpert(f"MoE layer {layer_index}: expert(s) {ids} give non-finite outputs (NaN/Inf) "
                              f"on ordinary inputs: a weight of model.layers.{layer_index}.mlp.experts."
                              f"{ids[0]}.* is not finite")


def check_gate_inside_experts(moe_layer, layer_index: int) -> None:
    """One tiny forward: the experts module applies g inside (row = g * e(x)), which the scorer
    relies on to recover ||e|| = ||row|| / g. Power-of-two gates keep the comparison exact in any
    dtype when g scales the expert output (fc2 is linear); g applied to the input would not."""
    import torch

    experts = moe_layer.experts
    try:
        param = next(p for p in experts.parameters())
    except StopIteration:
        return
    num_local = getattr(experts, "num_local_experts", len(moe_layer.local_expert_indices))
    hidden = moe_layer.config.hidden_size
    dtype = moe_layer.config.params_dtype
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * num_local, hidden, generator=generator).to(device=param.device, dtype=dtype)
    tokens = torch.full((num_local,), 2, dtype=torch.long)
    gate = torch.tensor([0.5, 0.25] * num_local, dtype=torch.float32, device=param.device)
    with torch.no_grad():
        ungated = experts(x, tokens, torch.ones_like(gate))[0].float()
        gated = experts(x, tokens, gate)[0].float()
    _check_experts_finite(moe_layer, layer_index, ungated)
    expected = ungated * gate[:, None]
    error = float((gated - expected).norm())
    scale = float(expected.norm())
    if not error <= 1e-3 * scale + 1e-6:
        raise _fail(f"{type(experts).__name__} applies the routing weight g inside the expert (row = g * e(x)), "
                    "which the scorer uses to recover ||e|| = ||row|| / g",
                    f"layer {layer_index}: ||row - g * e(x)|| = {error:.3g} against ||g * e(x)|| = {scale:.3g}")
