"""megatron-easyep: expert scoring (EASY-EP and baselines) and pruning for DeepSeek-V3-class MoE
checkpoints, on Megatron-Core."""

__version__ = "0.1.0"
