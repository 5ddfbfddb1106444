"""CPU bridges: let Megatron-Core's real MoE/MLA layers run without CUDA (gloo).

Applied only when CUDA is absent (a GPU run never goes through them), once per process, all at
the torch.cuda level plus one Megatron function (no edits to Megatron files). Each bridge names
the Megatron call it answers. See shared/reference/megatron-cpu.md for what was measured.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


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
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    _APPLIED = True

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
    # all_to_all_single wants Python lists. The signature is the one contract.py checks
    # (functools.wraps keeps it visible to inspect.signature).
    from megatron.core.tensor_parallel import mappings

    original_forward = mappings._AllToAll.forward

    @functools.wraps(original_forward)
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


def eager_fusions():
    """Context in which Megatron-Core's @jit_fuser functions (torch.compile since torch 2.2, e.g.
    TopKRouter._apply_expert_bias) run eagerly (training uses it on every device). On CPU,
    Inductor compiles them with the C++ compiler on first use and again when shapes change: ~10 s
    per process for a few tiny element-wise functions. Numerics are unchanged (they are eager
    PyTorch ops either way)."""
    import torch._dynamo

    return torch._dynamo.config.patch(disable=True)


def seed_model_parallel_rng(seed: int) -> None:
    """tensor_parallel.model_parallel_cuda_manual_seed, which needs CUDA unless the inference
    RNG tracker is used (it is on CPU; a GPU run uses the normal tracker)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
