"""Run under torchrun by test_parity.py: evaluate several checkpoints in one process (imports
cost more than the tiny forwards) and record which tensors each rank read from disk.

usage: parity_worker.py OUT_DIR EP DISPATCHER DEMOS.jsonl NAME=CKPT [NAME=CKPT ...]
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_easyep.mcore import parallel as distributed
from megatron_easyep.mcore import model as model_lib
from megatron_easyep.analysis.evaluation import EvalRun, run_evaluation


def main():
    out, ep, dispatcher, demos = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    for item in sys.argv[5:]:
        name, ckpt = item.split("=", 1)
        run_evaluation(EvalRun(hf_checkpoint=ckpt, demos=[demos], expert_parallel=ep,
                               dispatcher=dispatcher,
                               dump_logits=str(out / f"{name}.safetensors")))
        # What does this rank read from disk to build its model?
        hf, _ = model_lib.load_megatron_model(ckpt, expert_parallel=ep, dispatcher=dispatcher)
        rank = dist.get_rank()
        (out / f"{name}.reads.rank{rank}.json").write_text(json.dumps(
            {"names": hf.read_names, "bytes": hf.bytes_read, "tensors": hf.tensors_read}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
