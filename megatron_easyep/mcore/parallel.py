"""torch.distributed + Megatron parallel_state set-up (TP = 1; PP and EP from the command line).

Rank order is Megatron's default (tp-cp-ep-dp-pp): the ranks of one pipeline stage are contiguous
blocks of world / PP, and EP groups stay inside a stage.

Works under torchrun (reads RANK/WORLD_SIZE/...) and in a plain single process (world size 1),
with gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_easyep.mcore import compat

# Seconds one collective may wait for the other ranks before it fails (every process group, the
# world's and Megatron's). A rank that dies or hangs then stops the others within this bound
# instead of gloo's 30 min / NCCL's 10 min default. It must cover the largest imbalance between
# ranks at one collective: weight loading (the first collective after it waits for the slowest
# rank) and one forward step. See docs/outputs-and-faults.md.
DEFAULT_DIST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Layout:
    world_size: int
    rank: int
    expert_parallel: int
    ep_rank: int
    data_parallel: int  # replicas of the dense part = world_size / PP (TP = 1)
    dp_rank: int
    backend: str
    pipeline_parallel: int = 1
    pp_rank: int = 0
    stage_layers: tuple[int, ...] | None = None  # decoder layers per stage (PP > 1)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_parallel - 1

    def as_dict(self) -> dict:
        out = dict(world_size=self.world_size, tensor_parallel=1, pipeline_parallel=self.pipeline_parallel,
                   expert_parallel=self.expert_parallel, data_parallel=self.data_parallel,
                   backend=self.backend)
        if self.pipeline_parallel > 1:
            out["stage_layers"] = list(self.stage_layers)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layout(world: int, expert_parallel: int, pipeline_parallel: int = 1) -> None:
    """Clear errors for a PP x EP layout that does not fit the world (before any weight is read)."""
    if pipeline_parallel < 1 or world % pipeline_parallel:
        raise ValueError(f"--pipeline-parallel {pipeline_parallel} must divide the world size {world}")
    per_stage = world // pipeline_parallel
    if expert_parallel < 1 or per_stage % expert_parallel:
        raise ValueError(f"--expert-parallel {expert_parallel} must divide the ranks per pipeline stage "
                         f"({world} ranks / --pipeline-parallel {pipeline_parallel} = {per_stage})"
                         if pipeline_parallel > 1 else
                         f"--expert-parallel {expert_parallel} must divide the world size {world}")


SHARE_GPU_ENV = "EASYEP_SHARE_GPU"  # "1": several ranks per GPU (bench/gpu_check_run.py on one GPU)
NCCL_HOSTID_PER_RANK_ENV = "EASYEP_NCCL_HOSTID_PER_RANK"


def _select_cuda_device() -> None:
    """One GPU per local rank. With EASYEP_SHARE_GPU=1 local ranks wrap onto the visible GPUs;
    EASYEP_NCCL_HOSTID_PER_RANK=1 then gives each rank its own NCCL_HOSTID before the first NCCL
    call, because NCCL < 2.30.3 refuses two ranks of one host on one GPU ("Duplicate GPU")."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if os.environ.get(SHARE_GPU_ENV) == "1":
        if os.environ.get(NCCL_HOSTID_PER_RANK_ENV) == "1":
            os.environ["NCCL_HOSTID"] = f"easyep-rank{os.environ.get('RANK', '0')}"
        local %= count
    elif local >= count:
        raise ValueError(f"LOCAL_RANK {local} but only {count} CUDA device(s) are visible: start at most "
                         f"one process per GPU (or set {SHARE_GPU_ENV}=1 to share GPUs, for tests)")
    torch.cuda.set_device(local)


def init_parallel(expert_parallel: int = 1, seed: int = 1234, pipeline_parallel: int = 1,
                  stage_layers: list[int] | None = None,
                  timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Layout:
    """Initialise torch.distributed (if needed) and Megatron's parallel_state. `stage_layers`
    (decoder layers per stage, pipeline.stage_layer_counts) is recorded in the layout;
    `timeout_s` bounds every collective of every process group (DEFAULT_DIST_TIMEOUT_S)."""
    from megatron.core import parallel_state

    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout_s!r}")
    compat.apply_runtime_patches()
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            _select_cuda_device()
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM launcher
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A plain process is a world of one. Not through os.environ: child processes (tests,
            # launchers) would inherit a MASTER_PORT this process is still listening on.
            dist.init_process_group(backend=backend, rank=0, world_size=1, timeout=timeout,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
    world = dist.get_world_size()
    check_layout(world, expert_parallel, pipeline_parallel)
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_expert_model_parallel_world_size() != expert_parallel
                or parallel_state.get_pipeline_model_parallel_world_size() != pipeline_parallel):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=pipeline_parallel,
            expert_model_parallel_size=expert_parallel,
            distributed_timeout_minutes=timeout_s / 60)  # timedelta(minutes=...): a fraction is fine
    compat.seed_model_parallel_rng(seed)
    return Layout(
        world_size=world,
        rank=dist.get_rank(),
        expert_parallel=expert_parallel,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        data_parallel=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        backend=dist.get_backend(),
        pipeline_parallel=pipeline_parallel,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        stage_layers=tuple(stage_layers) if stage_layers is not None and pipeline_parallel > 1 else None,
    )


def max_over_world(value: int, device) -> int:
    """Every rank pads its step to the same length: EP collectives need equal token counts
    (allgather dispatcher) and all ranks must run the same number of forwards."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return max(int(t.item()), 1)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
