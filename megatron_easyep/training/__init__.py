"""Research tooling: the small DeepSeek-V3-architecture MoE that the comparison and the demo run
on. `corpus` builds code / prose / math text that exists offline (and its tokenizer); `train`
trains Megatron-Core's GPTModel on it on CPU and writes HF checkpoints through `mcore.to_hf`."""
