"""torchrun worker: rank 1 never joins the collective (a hung rank); rank 0 times the error of its
all-reduce under parallel.init_parallel(timeout_s=...) and prints `collective failed after S s`.

Usage: torchrun --nproc-per-node 2 tests/hung_rank_worker.py TIMEOUT_S
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_easyep.mcore import parallel

timeout_s = float(sys.argv[1])
layout = parallel.init_parallel(expert_parallel=2, timeout_s=timeout_s)
if layout.rank == 1:
    time.sleep(120)  # hung: torchrun stops it once rank 0 has failed
    sys.exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:  # noqa: BLE001 (which class a timeout raises is what this measures)
    print(f"collective failed after {time.monotonic() - t0:.2f} s: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
    # Megatron's expert group has the same timeout
    from megatron.core import parallel_state
    t1 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=parallel_state.get_expert_model_parallel_group())
    except Exception as e2:  # noqa: BLE001
        print(f"expert-group collective failed after {time.monotonic() - t1:.2f} s: {type(e2).__name__}",
              flush=True)
    os._exit(3)
print("collective returned", flush=True)
os._exit(0)
