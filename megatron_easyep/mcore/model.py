"""HF DeepseekV3 config -> Megatron-Core MLATransformerConfig -> GPTModel, and the weight loader.

Every shape and option comes from the checkpoint's config.json (DeepseekV3Config); the settings
that give logit parity with transformers are the measured ones in shared/reference/mla-parity.md.
"""

from __future__ import annotations

import torch

from megatron_easyep.checkpoint.fp8_blocks import DEFAULT_BLOCK_SIZE, scale_shape
from megatron_easyep.checkpoint.reader import CheckpointError, DeepseekV3Config, HFCheckpoint, scale_inv_name
from megatron_easyep.mcore import mapping
from megatron_easyep.mcore.compat.fp8_linears import fp8_resident_linears
from megatron_easyep.mcore.fp8_gemm import Fp8Layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, cfg: DeepseekV3Config) -> torch.dtype:
    """The compute dtype for `--dtype NAME`: fp32 on CPU when unset; on GPU the checkpoint's own
    dtype (FP8 weights -> bf16)."""
    if name is None:
        if not torch.cuda.is_available():
            return torch.float32
        name = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def transformer_config(cfg: DeepseekV3Config, *, dtype: torch.dtype = torch.float32,
                       expert_parallel: int = 1, dispatcher: str = "alltoall",
                       stage_layers: list[int] | None = None):
    """MLATransformerConfig for a DeepseekV3 checkpoint (TP = 1). `stage_layers`: decoder layers
    per pipeline stage (mcore.pipeline.stage_layer_counts); None = one stage."""
    from megatron_easyep.mcore import pipeline
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    if cfg.n_routed_experts % expert_parallel:
        raise CheckpointError(
            f"n_routed_experts={cfg.n_routed_experts} in {cfg.source} is not divisible by "
            f"--expert-parallel {expert_parallel}")
    if dispatcher not in ("allgather", "alltoall"):
        raise ValueError(f"unsupported dispatcher {dispatcher!r}: use allgather or alltoall")

    rope = cfg.rope_scaling
    yarn = rope is not None and rope.get("type", rope.get("rope_type")) == "yarn"
    if rope is not None and not yarn:
        raise CheckpointError(
            f"rope_scaling type {rope.get('type', rope.get('rope_type'))!r} in {cfg.source} is "
            "not supported (field 'rope_scaling'): only yarn or none")
    rope_kwargs = dict(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    if yarn:
        rope_kwargs = dict(
            rope_type="yarn",
            rotary_scaling_factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast", 32)),
            beta_slow=float(rope.get("beta_slow", 1)),
            mscale=float(rope.get("mscale", 1.0)),
            # DeepSeek's softmax scale uses mscale_all_dim; Megatron's default 0.0 is wrong.
            mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
        )

    on_gpu = torch.cuda.is_available()
    num_layers = cfg.num_hidden_layers
    return MLATransformerConfig(
        num_layers=num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        # MLA
        multi_latent_attention=True,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,  # Megatron's qk_head_dim is HF's nope part
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
        rotary_base=cfg.rope_theta,
        rotary_percent=1.0,
        rotary_interleaved=False,
        apply_rope_fusion=False,
        **rope_kwargs,
        # norms and MLPs
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # MoE
        num_moe_experts=cfg.n_routed_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(cfg.moe_intermediate_size * cfg.n_shared_experts
                                             if cfg.n_shared_experts else None),
        moe_shared_expert_overlap=False,
        moe_layer_freq=[0 if i < cfg.first_k_dense_replace else 1 for i in range(num_layers)],
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=cfg.n_group if cfg.n_group > 1 else None,
        moe_router_group_topk=cfg.topk_group if cfg.n_group > 1 else None,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        expert_model_parallel_size=expert_parallel,
        # parallelism / precision
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=len(stage_layers) if stage_layers else 1,
        pipeline_model_parallel_layout=pipeline.megatron_layout(stage_layers) if stage_layers else None,
        pipeline_dtype=dtype,  # the hidden states passed between stages
        batch_p2p_sync=on_gpu,  # True calls torch.cuda.synchronize()
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # every parameter is loaded from the checkpoint
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_model(cfg: DeepseekV3Config, tcfg, *, fp8_resident: bool = False,
                logits: bool = True, fused_experts: bool = True):
    """GPTModel with Megatron-Core's local layer spec (MLA adapted in mcore/compat). With
    `fp8_resident`, every attention / MLP / expert linear holds FP8 codes + block scales instead of
    a high-precision weight (compat/fp8_linears.py; filled by load_weights).
    Under pipeline parallelism this builds this rank's stage (parallel_state must be initialised):
    its decoder layers, the embedding on the first stage, the final norm + output layer on the
    last. `logits=False` builds no final norm and no output layer at all (scoring: the model
    returns hidden states). `fused_experts=False` keeps Megatron's SequentialMLP (the experts'
    weights then live in separate tensors; compat/fused_experts.py)."""
    from megatron.core import parallel_state

    from megatron_easyep.mcore.compat import gpt

    model = gpt.build_gpt_model(
        tcfg,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=logits and parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        rotary_base=int(cfg.rope_theta),
        fp8_resident=fp8_resident,
        fused_experts=fused_experts,
    )
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def _deinterleave_rope_rows(weight: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """For configs with rope_interleave=false: permute each head's rope rows [0, d/2, 1, d/2+1,
    ...] so Megatron's de-interleaving rope reproduces HF's half-split rope."""
    order = torch.stack([torch.arange(rope_dim // 2), torch.arange(rope_dim // 2, rope_dim)],
                        dim=1).reshape(-1)
    rows = weight.reshape(-1, head_dim, weight.shape[-1]).clone()
    rope = rows[:, head_dim - rope_dim:]
    rows[:, head_dim - rope_dim:] = rope[:, order]
    return rows.reshape(weight.shape)


def _rope_head_dim(cfg: DeepseekV3Config, hf_name: str, rows: int) -> int | None:
    """The per-head row count whose rope rows the loader permutes for rope_interleave = false (None
    when this tensor is not permuted)."""
    if cfg.rope_interleave:
        return None
    if hf_name.endswith(tuple(mapping.ROPE_PERMUTED_QUERY.values())):
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if hf_name.endswith(tuple(mapping.ROPE_PERMUTED_KV.values())):
        return rows
    return None


def megatron_row_order(cfg: DeepseekV3Config, hf_name: str, rows: int) -> torch.Tensor | None:
    """megatron_from_hf[i] = the HF row that Megatron's row i holds, or None when the loader keeps
    HF's row order (the loader's own permutation applied to row indices)."""
    head = _rope_head_dim(cfg, hf_name, rows)
    if head is None:
        return None
    index = torch.arange(rows, dtype=torch.float64)[:, None]
    return _deinterleave_rope_rows(index, head, cfg.qk_rope_head_dim)[:, 0].long()


def _hf_tensor(ckpt: HFCheckpoint, source: mapping.HFSource, dtype) -> torch.Tensor:
    cfg = ckpt.config
    parts = [ckpt.read(name, dtype=torch.float32) for name in source.names]
    tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    head = _rope_head_dim(cfg, source.names[0], tensor.shape[0])
    if head is not None:
        tensor = _deinterleave_rope_rows(tensor, head, cfg.qk_rope_head_dim)
    return tensor.to(dtype)


def _load_fp8_resident(module, ckpt: HFCheckpoint, source: mapping.HFSource, megatron_name: str) -> None:
    """Hold the checkpoint's FP8 bytes and scales of `source` in an FP8-resident linear; a linear
    the checkpoint stores in high precision is held as stored (in the model's params dtype)."""
    dtypes = [ckpt.tensor_info(n)[0] for n in source.names]
    if not any(d == "F8_E4M3" for d in dtypes):
        module.hold_high_precision(_hf_tensor(ckpt, source, module.config.params_dtype))
        return
    if not all(d == "F8_E4M3" for d in dtypes):
        raise CheckpointError(f"Megatron {megatron_name} concatenates {', '.join(source.names)} in {ckpt.path}, "
                              f"stored as {', '.join(dtypes)}: they must all be FP8 or none")
    block = tuple(ckpt.config.weight_block_size or DEFAULT_BLOCK_SIZE)
    codes, scales = [], []
    for name in source.names:
        code = ckpt.read_raw(name)
        sname = scale_inv_name(name)
        if sname not in ckpt:
            raise CheckpointError(f"FP8 tensor {name} in {ckpt.shard_file(name)} has no {sname}")
        scale = ckpt.read_raw(sname)
        expected = scale_shape(code.shape, block) if code.dim() == 2 else None
        if expected is None or tuple(scale.shape) != expected:
            raise CheckpointError(
                f"{sname} in {ckpt.shard_file(sname)} has shape {tuple(scale.shape)}, but weight {name} "
                f"{tuple(code.shape)} with weight_block_size {list(block)} needs {expected}")
        codes.append(code)
        scales.append(scale)
    value = torch.cat(codes) if len(codes) > 1 else codes[0]
    if tuple(value.shape) != tuple(module.weight.shape):
        raise CheckpointError(f"tensor {' + '.join(source.names)} in {ckpt.path} has shape "
                              f"{tuple(value.shape)}; Megatron {megatron_name} expects "
                              f"{tuple(module.weight.shape)} (config {ckpt.config.source})")
    layout = Fp8Layout(tuple(c.shape[0] for c in codes), block)
    module.hold_fp8(value, torch.cat(scales) if len(scales) > 1 else scales[0], layout,
                    megatron_row_order(ckpt.config, source.names[0], value.shape[0]))


@torch.no_grad()
def load_weights(model, ckpt: HFCheckpoint, *, ep_rank: int = 0, expert_parallel: int = 1,
                 layer_offset: int = 0):
    """Fill every parameter/buffer of `model` from the HF checkpoint through the name table.
    Reads only the tensors this rank's model holds (its own experts plus replicated weights);
    `layer_offset` is the global id of the stage's first decoder layer (pipeline parallelism)."""
    experts_per_rank = ckpt.config.n_routed_experts // expert_parallel
    state = model.state_dict(keep_vars=True)
    fp8_resident = {f"{n}.weight": m for n, m in fp8_resident_linears(model)}
    for name, target in state.items():
        try:
            source = mapping.hf_source(name, experts_per_rank=experts_per_rank, ep_rank=ep_rank,
                                       layer_offset=layer_offset)
        except KeyError:
            raise CheckpointError(f"Megatron parameter {name} has no entry in the HF name table "
                                  "(megatron_easyep/mcore/mapping.py)") from None
        if source is None or not isinstance(target, torch.Tensor):
            continue
        for hf_name in source.names:
            if hf_name not in ckpt:
                raise CheckpointError(f"tensor {hf_name} (for Megatron {name}) is missing from "
                                      f"{ckpt.path}")
        if name in fp8_resident:
            _load_fp8_resident(fp8_resident[name], ckpt, source, name)
            continue
        value = _hf_tensor(ckpt, source, target.dtype)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {' + '.join(source.names)} in {ckpt.path} has shape "
                                  f"{tuple(value.shape)}; Megatron {name} expects "
                                  f"{tuple(target.shape)} (config {ckpt.config.source})")
        target.copy_(value.to(target.device))
    return model


def _return_large_frees_to_the_os() -> None:
    """On CPU, FP8-resident linears allocate and free a weight-sized buffer per GEMM. glibc raises
    its mmap threshold after such frees and keeps later ones in the heap, which grew a rank's
    RssAnon by ~1.7 GiB at DeepSeek-V3 widths (bench/fp8_memory_bench.py); a fixed 4 MiB threshold
    hands them back at once. No-op where mallopt is not glibc's."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_megatron_model(ckpt_dir, *, dtype: torch.dtype = torch.float32, expert_parallel: int = 1,
                        dispatcher: str = "alltoall", ep_rank: int | None = None,
                        dequantize_at_load: bool = False, stage_layers: list[int] | None = None,
                        logits: bool = True, fused_experts: bool = True):
    """Checkpoint dir -> (HFCheckpoint, loaded GPTModel in eval mode). parallel_state must be
    initialised (see parallel.init_parallel). FP8 checkpoints are held FP8-resident (the
    checkpoint's bytes + block scales, dequantised per GEMM) unless `dequantize_at_load`.
    With `stage_layers` (pipeline parallelism) this rank builds and reads only its stage;
    `logits=False` skips the final norm and output layer (and lm_head is never read)."""
    from megatron.core import parallel_state

    ckpt = HFCheckpoint(ckpt_dir)
    fp8_resident = ckpt.config.is_fp8 and not dequantize_at_load
    if fp8_resident and not torch.cuda.is_available():
        _return_large_frees_to_the_os()
    tcfg = transformer_config(ckpt.config, dtype=dtype, expert_parallel=expert_parallel,
                              dispatcher=dispatcher, stage_layers=stage_layers)
    model = build_model(ckpt.config, tcfg, fp8_resident=fp8_resident, logits=logits,
                        fused_experts=fused_experts)
    if ep_rank is None:
        ep_rank = parallel_state.get_expert_model_parallel_rank()
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    load_weights(model, ckpt, ep_rank=ep_rank, expert_parallel=expert_parallel,
                 layer_offset=get_transformer_layer_offset(tcfg) if stage_layers else 0)
    return ckpt, model


def forward_padded(model, ids: list[int], length: int) -> torch.Tensor:
    """Logits [length, vocab] for one sequence right-padded with token 0 to `length`. Attention
    is causal, so padding never changes the real positions; callers drop padded positions."""
    device = next(model.parameters()).device
    input_ids = torch.zeros(1, length, dtype=torch.long, device=device)
    if ids:
        input_ids[0, :len(ids)] = torch.tensor(ids, device=device)
    position_ids = torch.arange(length, device=device).unsqueeze(0)
    return model(input_ids, position_ids, None)[0]
