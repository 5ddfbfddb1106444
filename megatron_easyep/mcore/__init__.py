"""Stage 1, the model in Megatron-Core. The HF config mapped to a TransformerConfig, the GPTModel
built with the local layer spec, weights loaded through the ONE HF<->Megatron name table
(`mapping`), torch.distributed / parallel_state set-up (`parallel`), FP8 calibration numerics,
the Megatron -> HF writer used after training, and the memory plan of a layout. `compat/` is the
only package that touches Megatron-Core internals (CPU bridges, DeepSeek's group rule, MLA fixes,
FP8-resident linears, the hook points, the pipeline schedule), and checks them at start-up: a
megatron-core upgrade is a change inside that one package."""
