"""megatron-easyep: expert scoring (EASY-EP and baselines) and pruning for DeepSeek-V3-class MoE
checkpoints, on Megatron-Core.

One subpackage per stage of the data flow; imports go one way only (tests/test_layout.py):

    checkpoint/  HF directory reading, FP8 block format, tiny checkpoints     (imports nothing here)
    mcore/       the Megatron-Core model: config, build, name table, compat/  -> checkpoint
    scoring/     demonstrations, hooks -> formula -> score file               -> mcore, checkpoint
    pruning/     selection, C-Prune, streaming export, serving preflight      -> mcore, checkpoint
    analysis/    evaluation, routing drift, the comparison grid               -> everything below
    training/    the small trained model's corpus and training                -> everything below
"""

__version__ = "0.1.0"
