"""Stage 0, the checkpoint on disk. Reading a Hugging Face DeepSeek-V3 directory lazily (config
validation naming the field, per-tensor reads from the shard headers' offsets), DeepSeek's FP8
block format (e4m3 weights with one fp32 `weight_scale_inv` per block, any block size), DeepSeek's
published conventions (config.json, special tokens, chat template), the one writer of every file
the package produces (`io`: safetensors, shards and index, score files, atomic publish, one run per
output), and the tiny / preset checkpoint generator the tests and benches use (`tiny`; production
code never imports it). Nothing here knows Megatron."""
