"""Run under torchrun (2 ranks) by test_pipeline.py: logits and disk reads of every pipeline stage,
then the same sequences through one whole model (PP = 1, the ordinary forward) in the same
processes (imports cost more than the tiny forwards).

usage: pipeline_worker.py OUT_DIR CKPT LAYOUT [LAYOUT ...]     (LAYOUT: "2,1" = layers per stage)
Writes OUT_DIR/pp{LAYOUT}.rank{R}.pt {"logits": [...] (last stage only), "reads": {...}} and
OUT_DIR/pp1.pt {"logits": [...]} (rank 0).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.mcore import model as model_lib
from megatron_easyep.mcore import parallel, pipeline

LENGTHS = (7, 19, 12)


def main():
    out, ckpt, layouts = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cfg = DeepseekV3Config.load(ckpt)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]
    for spec in layouts:
        counts = pipeline.stage_layer_counts(cfg.num_hidden_layers, 2, spec)
        layout = parallel.init_parallel(1, seed=0, pipeline_parallel=2, stage_layers=counts)
        # scoring build: no final norm, no output layer
        hf, _ = model_lib.load_megatron_model(ckpt, stage_layers=counts, logits=False)
        reads = {"names": hf.read_names, "bytes": hf.bytes_read}
        hf_logits, model = model_lib.load_megatron_model(ckpt, stage_layers=counts, logits=True)
        batches = [pipeline.padded_batch([ids], len(ids)) for ids in sequences]
        with torch.no_grad():
            outputs = pipeline.forward_micro_batches(model, batches)
        logits = [o[0].clone() for o in outputs] if layout.last_stage else None
        torch.save({"logits": logits, "reads": reads,
                    "logits_model_reads": {"names": hf_logits.read_names, "bytes": hf_logits.bytes_read},
                    "pp_rank": layout.pp_rank},
                   out / f"pp{spec.replace(',', '-')}.rank{dist.get_rank()}.pt")
    parallel.init_parallel(1, seed=0, pipeline_parallel=1)
    _, model = model_lib.load_megatron_model(ckpt)
    with torch.no_grad():
        logits = [model_lib.forward_padded(model, ids, len(ids)).clone() for ids in sequences]
    if dist.get_rank() == 0:
        torch.save({"logits": logits}, out / "pp1.pt")
    parallel.shutdown()


if __name__ == "__main__":
    main()
