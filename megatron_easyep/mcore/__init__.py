"""Stage 1, the model in Megatron-Core. The HF config mapped to a TransformerConfig, the GPTModel
built with the local layer spec, weights loaded through the ONE HF<->Megatron name table
(`mapping`), torch.distributed / parallel_state set-up (`parallel`), FP8 calibration numerics,
the Megatron -> HF writer used after training, and the memory plan of a layout. `patches` is the
only module that touches Megatron-Core internals (CPU bridges, DeepSeek's group rule, MLA fixes,
the hook points): a megatron-core upgrade is a change to that one file."""
