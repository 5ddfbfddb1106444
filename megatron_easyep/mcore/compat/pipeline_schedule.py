"""The forward-only pipeline schedule over Megatron-Core's P2PCommunicator.

Megatron's built-in schedules (pipeline_parallel/schedules.py) hard-code device="cuda"; this loop
runs on CPU/gloo and GPU/NCCL alike: receive the hidden states of micro-batch m from the previous
stage, run this stage (model.set_input_tensor), send them on. Stages overlap across micro-batches:
stage 0 computes micro-batch m+1 while stage 1 computes m.
"""

from __future__ import annotations


def forward_pipelined(model, micro_batches, before_each=None) -> list:
    """One pass of `micro_batches` [(input_ids [b, s], position_ids [b, s])] through this rank's
    stage; returns the last stage's outputs, None per micro-batch on the other stages."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), model.config)
    hidden = model.config.hidden_size
    outputs = []
    for m, (input_ids, position_ids) in enumerate(micro_batches):
        batch, seq = input_ids.shape
        received = comm.recv_forward((seq, batch, hidden), is_first_stage=first)
        model.set_input_tensor(received)
        if before_each is not None:
            before_each(m)
        out = model(input_ids, position_ids, None)
        comm.send_forward(out, is_last_stage=last)
        outputs.append(out if last else None)
    return outputs
